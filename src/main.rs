//! The `balanced` command line: parse, set up logging, run one command.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(
    name = "balanced",
    version,
    about = "Active health checks, least connections and retries for a Service"
)]
struct Args {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "BALANCED_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Probe (and serve) the BalancedServices of a YAML file, without a cluster.
    Standalone {
        /// BalancedService YAML (one or more documents).
        #[arg(short, long)]
        file: PathBuf,
        /// Admin server address (/status, /metrics, /healthz, /readyz).
        #[arg(long, default_value = "127.0.0.1:9901")]
        admin: SocketAddr,
        /// Probe every endpoint once, print a table, exit 0 if every service has a healthy endpoint.
        #[arg(long)]
        once: bool,
        /// How often to check the file for changes (SIGHUP reloads at once).
        #[arg(long, default_value = "1s", value_parser = parse_duration)]
        poll: std::time::Duration,
        /// Address the listeners bind.
        #[arg(long, default_value = "0.0.0.0")]
        bind: std::net::IpAddr,
        /// On SIGTERM, fail /readyz for this long before closing listeners.
        #[arg(long, default_value = "0", value_parser = parse_duration)]
        drain_delay: std::time::Duration,
        /// Time in-flight requests get to finish on shutdown.
        #[arg(long, default_value = "30s", value_parser = parse_duration)]
        grace: std::time::Duration,
    },
    /// Run local backends and a proxy, kill and revive a backend, show what clients saw.
    Demo,
    /// Print the BalancedService CRD.
    Crd,
}

fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    balanced::api::duration::parse_duration(s)
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
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
    match run(args.command).await {
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

async fn run(command: Command) -> anyhow::Result<ExitCode> {
    use balanced::standalone;
    match command {
        Command::Crd => print!("{}", balanced::api::crd_yaml()),
        Command::Demo => {
            let summary = balanced::demo::run().await?;
            if summary.errors > 0 {
                return Ok(ExitCode::FAILURE);
            }
        }
        Command::Standalone { file, once: true, .. } => {
            let (table, all_served) = standalone::once_table(&standalone::once(&file).await?);
            print!("{table}");
            return Ok(if all_served {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            });
        }
        Command::Standalone {
            file,
            admin,
            poll,
            bind,
            drain_delay,
            grace,
            ..
        } => {
            let shutdown = balanced::signal::shutdown_token()?;
            let admin = tokio::net::TcpListener::bind(admin)
                .await
                .map_err(|e| anyhow::anyhow!("cannot listen on {admin} (--admin): {e}"))?;
            let mut opts = standalone::Options::new(file);
            opts.poll = poll;
            opts.bind = bind;
            opts.drain_delay = drain_delay;
            opts.limits.grace = grace;
            standalone::run(opts, admin, shutdown).await?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
