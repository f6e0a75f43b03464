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
    // The demo prints its own timeline; only warnings would add to it.
    let default_level = if matches!(args.command, Command::Demo) {
        "warn"
    } else {
        "info"
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("BALANCED_LOG").unwrap_or_else(|_| default_level.into());
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match args.log_format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().flatten_event(true).init(),
    }
    match balanced::cli::run(args.command).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            let invalid = matches!(
                e.downcast_ref(),
                Some(balanced::standalone::Error::InvalidConfig { .. })
            );
            ExitCode::from(if invalid { 2 } else { 1 })
        }
    }
}
