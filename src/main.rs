//! `balanced`: parse the command line, set up logging, run one command.

use std::process::ExitCode;

use balanced::cli::{Args, Command, LogFormat};

// The request path allocates per request and per HTTP/2 stream inside hyper
// and h2; mimalloc's thread-local free lists make that cheaper than glibc's
// malloc (measured with bench/compare.sh; see the README's Benchmarks).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use clap::Parser;

fn main() -> ExitCode {
    let args = Args::parse();
    match balanced::runtime::build() {
        Ok(rt) => rt.block_on(run(args)),
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            ExitCode::from(1)
        }
    }
}

async fn run(args: Args) -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_env("BALANCED_LOG").unwrap_or_else(|_| "info".into());
    // The demo prints its own timeline; its log lines go to a file it names.
    let demo_log = matches!(args.command, Command::Demo)
        .then(|| std::fs::File::create(balanced::demo::log_path()).ok())
        .flatten();
    let logs = tracing_subscriber::fmt().with_env_filter(filter);
    match (demo_log, args.log_format) {
        (Some(file), _) => logs.with_ansi(false).with_writer(std::sync::Mutex::new(file)).init(),
        (None, LogFormat::Text) => logs
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        (None, LogFormat::Json) => logs.json().flatten_event(true).with_writer(std::io::stderr).init(),
    }
    match balanced::cli::run(args.command).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
