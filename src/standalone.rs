//! `balanced standalone`: the prober (and, with the proxy, the listeners) driven
//! by a YAML file instead of the cluster.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::api::load::LoadErrors;
use crate::health::{TlsClients, probe};
use crate::metrics::Metrics;
use crate::proxy::Serving;
use crate::shell;
use crate::source::file::{self, FileSource, OpenError};

/// Options of `balanced standalone`.
#[derive(Clone, Debug)]
pub struct Options {
    /// The BalancedService YAML file.
    pub file: PathBuf,
    /// How often the file is checked for changes.
    pub poll: Duration,
    /// Address the listeners bind.
    pub bind: IpAddr,
    /// Shutdown grace and access log.
    pub serving: Serving,
    /// On SIGTERM, how long `/readyz` fails before listeners stop accepting.
    pub drain_delay: Duration,
    /// Serve xDS (ADS) here, if set.
    pub xds: Option<SocketAddr>,
}

impl Options {
    /// Options for `file` with the command-line defaults.
    pub fn new(file: impl Into<PathBuf>) -> Self {
        Self {
            file: file.into(),
            poll: Duration::from_secs(1),
            bind: IpAddr::from([0, 0, 0, 0]),
            serving: Serving::default(),
            drain_delay: Duration::ZERO,
            xds: None,
        }
    }
}

/// Why standalone could not run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file at start-up is invalid (exit code 2).
    #[error("invalid configuration in {file}:\n  {errors}", errors = .errors.to_string().replace('\n', "\n  "))]
    InvalidConfig {
        /// The file.
        file: String,
        /// Every problem.
        errors: LoadErrors,
    },
    /// Listeners could not be bound at start-up.
    #[error(transparent)]
    Listen(#[from] shell::Error),
    /// Signal handlers could not be installed.
    #[error("cannot watch for SIGHUP: {0}")]
    Signal(std::io::Error),
    /// The xDS address could not be bound.
    #[error("--xds {addr}: cannot listen: {source}")]
    Xds {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// Probes and serves the file's BalancedServices until `shutdown` is cancelled,
/// with the admin server on `admin_listener`.
pub async fn run(opts: Options, admin_listener: TcpListener, shutdown: CancellationToken) -> Result<(), Error> {
    let metrics = Arc::new(Metrics::new());
    let source = FileSource::open(&opts.file, opts.poll, &metrics).map_err(|e| match e {
        OpenError::Invalid(errors) => Error::InvalidConfig {
            file: opts.file.display().to_string(),
            errors,
        },
        OpenError::Signal(e) => Error::Signal(e),
    })?;
    tracing::info!(
        file = %opts.file.display(),
        admin = %admin_listener.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        services = source.services(),
        "standalone running"
    );
    if let Some(addr) = opts.xds {
        let listener = crate::xds::bind(addr)
            .await
            .map_err(|source| Error::Xds { addr, source })?;
        let lookaside = source.lookaside();
        let snapshots = crate::xds::publish(move || Some(lookaside()), source.health_generation(), shutdown.clone());
        tokio::spawn(crate::xds::serve(listener, snapshots, shutdown.clone()));
    }
    let shell_opts = shell::Options {
        bind: opts.bind,
        serving: opts.serving,
        drain_delay: opts.drain_delay,
        metrics,
    };
    shell::run(source, shell_opts, admin_listener, shutdown).await?;
    Ok(())
}

/// One probe of one endpoint, as `--once` prints it.
#[derive(Clone, Debug)]
pub struct OnceResult {
    /// `namespace/name`.
    pub service: String,
    /// The endpoint.
    pub endpoint: SocketAddr,
    /// `TCP`, `HTTP` or `TLS`.
    pub check: &'static str,
    /// The probe's error, if it failed.
    pub error: Option<String>,
    /// How long it took.
    pub took: Duration,
}

/// `--once`: probes every endpoint of the file once, concurrently.
pub async fn once(path: &std::path::Path) -> Result<Vec<OnceResult>, Error> {
    let configs = file::read_configs(path).map_err(|errors| Error::InvalidConfig {
        file: path.display().to_string(),
        errors,
    })?;
    let tls = TlsClients::default();
    let probes = configs.iter().flat_map(|cfg| {
        let tls = tls.clone();
        cfg.static_members().into_iter().map(move |(ep, _)| {
            let tls = tls.clone();
            async move {
                let hc = &cfg.health;
                let addr = SocketAddr::new(ep.addr.ip(), hc.port.unwrap_or(ep.addr.port()));
                let started = Instant::now();
                let result = probe(&hc.probe, addr, hc.timeout, &tls).await;
                OnceResult {
                    service: cfg.key.to_string(),
                    endpoint: ep.addr,
                    check: hc.probe.name(),
                    error: result.err().map(|e| e.message),
                    took: started.elapsed(),
                }
            }
        })
    });
    Ok(futures::future::join_all(probes).await)
}

/// Renders `--once` results as a table; the bool is whether every service has a healthy endpoint.
pub fn once_table(results: &[OnceResult]) -> (String, bool) {
    let mut rows = vec![[
        "SERVICE".to_string(),
        "ENDPOINT".to_string(),
        "CHECK".to_string(),
        "RESULT".to_string(),
        "TIME".to_string(),
        "DETAIL".to_string(),
    ]];
    for r in results {
        rows.push([
            r.service.clone(),
            r.endpoint.to_string(),
            r.check.to_string(),
            if r.error.is_none() { "healthy" } else { "unhealthy" }.to_string(),
            format!("{:.1}ms", r.took.as_secs_f64() * 1000.0),
            r.error.clone().unwrap_or_default(),
        ]);
    }
    let widths: Vec<usize> = (0..6)
        .map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in &rows {
        let line: Vec<String> = row.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    let mut services: Vec<&str> = results.iter().map(|r| r.service.as_str()).collect();
    services.dedup();
    let all_served = services
        .iter()
        .all(|s| results.iter().any(|r| r.service == *s && r.error.is_none()));
    (out, all_served)
}
