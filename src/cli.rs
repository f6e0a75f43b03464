//! The command line: arguments and what each command runs.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use tokio::net::TcpListener;

use crate::api::config::ServiceKey;
use crate::controller::desired::RenderOptions;
use crate::standalone;

/// `balanced` and its global flags.
#[derive(Parser)]
#[command(
    name = "balanced",
    version,
    about = "Active health checks, least connections and retries for a Service"
)]
pub struct Args {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "BALANCED_LOG_FORMAT")]
    pub log_format: LogFormat,
    /// What to run.
    #[command(subcommand)]
    pub command: Command,
}

/// Log formats.
#[derive(Clone, Copy, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// JSON lines.
    Json,
}

/// The commands.
#[derive(Subcommand)]
pub enum Command {
    /// Probe and serve the BalancedServices of a YAML file, without a cluster.
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
        #[arg(long, default_value = "1s", value_parser = duration)]
        poll: Duration,
        /// Address the listeners bind.
        #[arg(long, default_value = "0.0.0.0")]
        bind: IpAddr,
        /// On SIGTERM, fail /readyz for this long before closing listeners.
        #[arg(long, default_value = "0", value_parser = duration)]
        drain_delay: Duration,
        /// Time in-flight requests get to finish on shutdown.
        #[arg(long, default_value = "30s", value_parser = duration)]
        grace: Duration,
        /// Write one JSON line per request or TCP connection to this file (`-` for standard output).
        #[arg(long, value_name = "PATH|-")]
        access_log: Option<String>,
    },
    /// Run local backends and a proxy, kill and revive a backend, show what clients saw.
    Demo,
    /// Print the BalancedService CRD.
    Crd,
    /// Print the objects the controller would apply for the BalancedServices in a file.
    Render {
        /// BalancedService YAML.
        #[arg(short, long)]
        file: PathBuf,
        /// Proxy image.
        #[arg(long, env = "BALANCED_PROXY_IMAGE")]
        image: Option<String>,
    },
    /// The operator: watch BalancedServices, probe endpoints, write status, run proxies.
    Controller {
        /// Proxy image for the Deployments it creates.
        #[arg(long, env = "BALANCED_PROXY_IMAGE")]
        image: Option<String>,
        /// Default proxy resources as JSON (a Kubernetes ResourceRequirements).
        #[arg(long, env = "BALANCED_PROXY_RESOURCES")]
        proxy_resources: Option<String>,
        /// Admin server address (/metrics, /healthz, /readyz).
        #[arg(long, default_value = "0.0.0.0:9901")]
        admin: SocketAddr,
        /// Elect a leader on a Lease (run two replicas for failover).
        #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
        leader_elect: bool,
        /// Namespace of the Lease.
        #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
        lease_namespace: String,
        /// Name of the Lease.
        #[arg(long, default_value = "balanced-controller")]
        lease_name: String,
        /// Lease duration: a standby takes over this long after the leader stops renewing.
        #[arg(long, default_value = "15s", value_parser = duration)]
        lease_duration: Duration,
    },
    /// The data plane of one BalancedService in a cluster.
    Proxy {
        /// Namespace of the BalancedService.
        #[arg(long, env = "POD_NAMESPACE")]
        namespace: String,
        /// Name of the BalancedService.
        #[arg(long)]
        name: String,
        /// Admin server address.
        #[arg(long, default_value = "0.0.0.0:9901")]
        admin: SocketAddr,
        /// Address the listeners bind.
        #[arg(long, default_value = "0.0.0.0")]
        bind: IpAddr,
        /// On SIGTERM, fail /readyz for this long before closing listeners.
        #[arg(long, default_value = "5s", value_parser = duration)]
        drain_delay: Duration,
        /// Time in-flight requests get to finish on shutdown.
        #[arg(long, default_value = "30s", value_parser = duration)]
        grace: Duration,
        /// Write one JSON line per request or TCP connection to this file (`-` for standard output).
        #[arg(long, value_name = "PATH|-")]
        access_log: Option<String>,
    },
}

fn open_access_log(path: Option<&str>) -> anyhow::Result<Option<crate::proxy::access::AccessLog>> {
    path.map(|p| crate::proxy::access::AccessLog::open(p).with_context(|| format!("--access-log: cannot open {p:?}")))
        .transpose()
}

fn duration(s: &str) -> Result<Duration, String> {
    crate::api::duration::parse_duration(s)
}

async fn bind(addr: SocketAddr, flag: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} ({flag})"))
}

/// What `controller` and `proxy` both start with: signals, the admin socket, a kube client.
async fn in_cluster(
    admin: SocketAddr,
) -> anyhow::Result<(tokio_util::sync::CancellationToken, TcpListener, kube::Client)> {
    let shutdown = crate::signal::shutdown_token()?;
    let admin = bind(admin, "--admin").await?;
    let client = kube::Client::try_default()
        .await
        .context("no Kubernetes API to talk to")?;
    Ok((shutdown, admin, client))
}

fn render_options(image: Option<String>, resources: Option<String>) -> anyhow::Result<RenderOptions> {
    let mut opts = RenderOptions::default();
    if let Some(image) = image {
        opts.image = image;
    }
    if let Some(json) = resources {
        opts.default_resources = Some(
            serde_json::from_str(&json)
                .with_context(|| format!("--proxy-resources: not a ResourceRequirements: {json}"))?,
        );
    }
    Ok(opts)
}

/// Runs one command; the exit code is the command's verdict.
pub async fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Crd => print!("{}", crate::api::crd_yaml()),
        Command::Demo => {
            if crate::demo::run().await?.errors > 0 {
                return Ok(ExitCode::FAILURE);
            }
        }
        Command::Render { file, image } => {
            let text = std::fs::read_to_string(&file).with_context(|| format!("cannot read {}", file.display()))?;
            match crate::controller::desired::render(&text, &render_options(image, None)?) {
                Ok(yaml) => print!("{yaml}"),
                Err(errors) => {
                    eprintln!(
                        "error: invalid configuration in {}:\n  {}",
                        file.display(),
                        errors.0.join("\n  ")
                    );
                    return Ok(ExitCode::from(2));
                }
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
            bind: listen,
            drain_delay,
            grace,
            access_log,
            ..
        } => {
            let access_log = open_access_log(access_log.as_deref())?;
            let shutdown = crate::signal::shutdown_token()?;
            let admin = bind(admin, "--admin").await?;
            let mut opts = standalone::Options::new(file);
            opts.poll = poll;
            opts.bind = listen;
            opts.drain_delay = drain_delay;
            opts.serving.grace = grace;
            opts.serving.access_log = access_log;
            standalone::run(opts, admin, shutdown).await?;
        }
        Command::Controller {
            image,
            proxy_resources,
            admin,
            leader_elect,
            lease_namespace,
            lease_name,
            lease_duration,
        } => {
            let (shutdown, admin, client) = in_cluster(admin).await?;
            let identity = std::env::var("POD_NAME")
                .or_else(|_| std::env::var("HOSTNAME"))
                .unwrap_or_else(|_| format!("balanced-{}", std::process::id()));
            let lease = leader_elect.then(|| crate::controller::leader::LeaseConfig {
                namespace: lease_namespace,
                name: lease_name,
                identity,
                duration: lease_duration,
                renew: lease_duration / 3,
            });
            let opts = crate::controller::run::ControllerOptions {
                render: render_options(image, proxy_resources)?,
                lease,
            };
            crate::controller::run::serve(client, opts, admin, shutdown).await;
        }
        Command::Proxy {
            namespace,
            name,
            admin,
            bind: listen,
            drain_delay,
            grace,
            access_log,
        } => {
            let access_log = open_access_log(access_log.as_deref())?;
            let (shutdown, admin, client) = in_cluster(admin).await?;
            let serving = crate::proxy::Serving { grace, access_log };
            let opts = crate::source::kube::ProxyOptions {
                key: ServiceKey::new(namespace, name),
                bind: listen,
                serving,
                drain_delay,
            };
            crate::source::kube::run_proxy(client, opts, admin, shutdown).await;
        }
    }
    Ok(ExitCode::SUCCESS)
}
