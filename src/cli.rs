//! The command line: arguments and what each command runs.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

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
        /// Serve xDS (Envoy's ADS, v3) on this address for proxyless gRPC clients and Envoy.
        #[arg(long, value_name = "ADDR")]
        xds: Option<SocketAddr>,
    },
    /// Run local backends and a proxy, kill and revive a backend, show what clients saw.
    Demo,
    /// A test backend (the demo's): answers every HTTP/1.1 or h2c request 200 with its name, until SIGTERM.
    Backend {
        /// Address to listen on.
        #[arg(long, default_value = "0.0.0.0:8080")]
        listen: SocketAddr,
        /// Name it answers with (body and `x-backend` header).
        #[arg(long, default_value = "backend")]
        name: String,
    },
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
        /// Serve xDS (Envoy's ADS, v3) on this address for proxyless gRPC clients and Envoy.
        #[arg(long, value_name = "ADDR")]
        xds: Option<SocketAddr>,
        /// Endpoints per healthy EndpointSlice (Kubernetes' own default is 100; the API server refuses more than 1000).
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u16).range(1..=1000))]
        max_endpoints_per_slice: u16,
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

/// Why a command could not run; [`Error::exit_code`] is the one place that
/// maps errors to exit codes.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file's BalancedServices are invalid.
    #[error("invalid configuration in {file}:\n  {errors}", errors = .errors.to_string().replace('\n', "\n  "))]
    InvalidConfig {
        /// The file.
        file: PathBuf,
        /// Every problem, each naming its document and field.
        errors: crate::api::LoadErrors,
    },
    /// A file could not be read.
    #[error("cannot read {}: {source}", .file.display())]
    Read {
        /// The file.
        file: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A flag's value is unusable.
    #[error("{flag}: {message}")]
    Flag {
        /// The flag, as typed (`--access-log`).
        flag: &'static str,
        /// What is wrong, with the value.
        message: String,
    },
    /// A socket the command needs could not be bound.
    #[error("cannot listen on {addr} ({flag}): {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The flag that named it.
        flag: &'static str,
        /// Why.
        source: std::io::Error,
    },
    /// Signal handlers could not be installed.
    #[error("cannot install signal handlers: {0}")]
    Signal(std::io::Error),
    /// No Kubernetes API is configured or reachable.
    #[error("no Kubernetes API to talk to: {0}")]
    NoCluster(kube::Error),
    /// `standalone` stopped.
    #[error(transparent)]
    Standalone(#[from] standalone::Error),
    /// The serving runtime stopped.
    #[error(transparent)]
    Serve(#[from] crate::shell::Error),
    /// The demo could not run.
    #[error(transparent)]
    Demo(#[from] crate::demo::Error),
}

impl Error {
    /// The process exit code: 2 for a configuration the user must fix, 1 for
    /// everything else (as `nginx -t` and `haproxy -c` distinguish them).
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::InvalidConfig { .. } | Error::Standalone(standalone::Error::InvalidConfig { .. }) => 2,
            _ => 1,
        }
    }
}

fn open_access_log(path: Option<&str>) -> Result<Option<crate::proxy::access::AccessLog>, Error> {
    path.map(|p| {
        crate::proxy::access::AccessLog::open(p).map_err(|e| Error::Flag {
            flag: "--access-log",
            message: format!("cannot open {p:?}: {e}"),
        })
    })
    .transpose()
}

fn duration(s: &str) -> Result<Duration, crate::api::duration::DurationError> {
    crate::api::duration::parse_duration(s)
}

async fn bind(addr: SocketAddr, flag: &'static str) -> Result<TcpListener, Error> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Bind { addr, flag, source })
}

/// What `controller` and `proxy` both start with: signals, the admin socket, a kube client.
async fn in_cluster(
    admin: SocketAddr,
) -> Result<(tokio_util::sync::CancellationToken, TcpListener, kube::Client), Error> {
    let shutdown = crate::signal::shutdown_token().map_err(Error::Signal)?;
    let admin = bind(admin, "--admin").await?;
    let client = kube::Client::try_default().await.map_err(Error::NoCluster)?;
    Ok((shutdown, admin, client))
}

fn render_options(image: Option<String>, resources: Option<String>) -> Result<RenderOptions, Error> {
    let mut opts = RenderOptions::default();
    if let Some(image) = image {
        opts.image = image;
    }
    if let Some(json) = resources {
        opts.default_resources = Some(serde_json::from_str(&json).map_err(|e| Error::Flag {
            flag: "--proxy-resources",
            message: format!("not a ResourceRequirements ({e}): {json}"),
        })?);
    }
    Ok(opts)
}

/// Runs one command; the exit code is the command's verdict.
pub async fn run(command: Command) -> Result<ExitCode, Error> {
    match command {
        Command::Crd => print!("{}", crate::api::crd_yaml()),
        Command::Demo => {
            if crate::demo::run().await?.errors > 0 {
                return Ok(ExitCode::FAILURE);
            }
        }
        Command::Backend { listen, name } => {
            let shutdown = crate::signal::shutdown_token().map_err(Error::Signal)?;
            let _backend =
                crate::demo::backend::Backend::try_http_at(&name, crate::demo::backend::Behavior::Status(200), listen)
                    .await
                    .map_err(|source| Error::Bind {
                        addr: listen,
                        flag: "--listen",
                        source,
                    })?;
            tracing::info!(%listen, %name, "backend serving");
            shutdown.cancelled().await;
        }
        Command::Render { file, image } => {
            let text = std::fs::read_to_string(&file).map_err(|source| Error::Read {
                file: file.clone(),
                source,
            })?;
            match crate::controller::desired::render(&text, &render_options(image, None)?) {
                Ok(yaml) => print!("{yaml}"),
                Err(errors) => return Err(Error::InvalidConfig { file, errors }),
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
            xds,
            ..
        } => {
            let access_log = open_access_log(access_log.as_deref())?;
            let shutdown = crate::signal::shutdown_token().map_err(Error::Signal)?;
            let admin = bind(admin, "--admin").await?;
            let mut opts = standalone::Options::new(file);
            opts.poll = poll;
            opts.bind = listen;
            opts.drain_delay = drain_delay;
            opts.serving.grace = grace;
            opts.serving.access_log = access_log;
            opts.xds = xds;
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
            xds,
            max_endpoints_per_slice,
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
            let opts = crate::controller::leading::ControllerOptions {
                render: render_options(image, proxy_resources)?,
                lease,
                max_endpoints_per_slice: usize::from(max_endpoints_per_slice),
            };
            let xds = match xds {
                Some(addr) => Some(bind(addr, "--xds").await?),
                None => None,
            };
            crate::controller::leading::serve(client, opts, admin, xds, shutdown).await;
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
            crate::source::kube::run_proxy(client, opts, admin, shutdown).await?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
