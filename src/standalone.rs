//! `balanced standalone`: the prober (and, with the proxy, the listeners) driven
//! by a YAML file instead of the cluster.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::api::config::Config;
use crate::api::load::LoadErrors;
use crate::balance::MemberSpec;
use crate::health::Health;
use crate::health::report::report;
use crate::health::{Prober, Target, TlsClients, probe};
use crate::metrics::Metrics;
use crate::proxy::admin::{self, AdminView};
use crate::proxy::{Dataplane, Serving};
use crate::source::file;

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
        }
    }
}

/// Why standalone could not run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file at start-up is invalid (exit code 2).
    #[error("invalid configuration in {file}:\n  {}", .errors.0.join("\n  "))]
    InvalidConfig {
        /// The file.
        file: String,
        /// Every problem.
        errors: LoadErrors,
    },
    /// Listeners could not be bound at start-up.
    #[error("cannot start listeners:\n  {}", .0.join("\n  "))]
    Listen(Vec<String>),
    /// Signal handlers could not be installed.
    #[error("cannot watch for SIGHUP: {0}")]
    Signal(std::io::Error),
}

/// Probes and serves the file's BalancedServices until `shutdown` is cancelled,
/// with the admin server on `admin_listener`.
pub async fn run(opts: Options, admin_listener: TcpListener, shutdown: CancellationToken) -> Result<(), Error> {
    let configs = file::read_configs(&opts.file).map_err(|errors| Error::InvalidConfig {
        file: opts.file.display().to_string(),
        errors,
    })?;
    // Everything runs on `stop`, cancelled after the drain delay, so `/readyz`
    // can fail while listeners still serve.
    let stop = CancellationToken::new();
    let mut updates = file::watch(opts.file.clone(), opts.poll, stop.clone()).map_err(Error::Signal)?;

    let metrics = Arc::new(Metrics::new());
    let prober = Prober::new(metrics.probe.clone(), stop.clone());
    let dataplane = Dataplane::new(metrics.proxy.clone(), opts.bind, opts.serving.clone(), stop.clone());
    let state = Arc::new(State {
        configs: ArcSwap::from_pointee(Vec::new()),
        prober: prober.clone(),
        dataplane,
        metrics,
        draining: AtomicBool::new(false),
    });
    let weak = Arc::downgrade(&state);
    prober.on_pass(Arc::new(move |key, addr| {
        if let Some(state) = weak.upgrade() {
            state.dataplane.lift_ejection(key, addr);
        }
    }));
    let errors = state.apply(configs);
    if !errors.is_empty() {
        stop.cancel();
        return Err(Error::Listen(errors));
    }
    let mut health_changes = prober.generation();
    tracing::info!(
        file = %opts.file.display(),
        admin = %admin_listener.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        services = state.configs.load().len(),
        "standalone running"
    );
    let admin_task = tokio::spawn(admin::serve(admin_listener, state.clone(), stop.clone()));

    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(configs) = updates.recv() => {
                for e in state.apply(configs) {
                    tracing::error!(error = %e, "listener not changed");
                }
            }
            changed = health_changes.changed() => {
                if changed.is_err() {
                    break;
                }
                state.refresh_changed();
            }
        }
    }
    state.draining.store(true, Ordering::Relaxed);
    if !opts.drain_delay.is_zero() {
        tracing::info!(delay = ?opts.drain_delay, "draining: /readyz fails, listeners still serve");
        tokio::time::sleep(opts.drain_delay).await;
    }
    stop.cancel();
    state.dataplane.stopped().await;
    prober.stopped().await;
    let _ = admin_task.await;
    Ok(())
}

struct State {
    configs: ArcSwap<Vec<Arc<Config>>>,
    prober: Prober,
    dataplane: Dataplane,
    metrics: Arc<Metrics>,
    draining: AtomicBool,
}

impl State {
    /// Applies the difference: services and endpoints that stay keep their
    /// state, listeners that stay keep their sockets. Returns listener errors.
    fn apply(&self, configs: Vec<Config>) -> Vec<String> {
        let configs: Vec<Arc<Config>> = configs.into_iter().map(Arc::new).collect();
        let old = self.configs.load();
        for gone in old.iter().filter(|o| !configs.iter().any(|c| c.key == o.key)) {
            tracing::info!(service = %gone.key, "service removed");
            self.prober.remove_service(&gone.key);
        }
        for cfg in &configs {
            let targets: Vec<Target> = cfg.endpoints.iter().map(|e| Target::new(e.addr)).collect();
            self.prober.update_service(&cfg.key, &cfg.health, &targets);
        }
        let errors = self.dataplane.apply(&configs);
        self.configs.store(Arc::new(configs));
        self.refresh();
        errors
    }

    /// Rebuilds every service's endpoint snapshot from its config and the probes.
    fn refresh(&self) {
        self.prober.take_changed();
        for cfg in self.configs.load().iter() {
            self.refresh_one(cfg);
        }
    }

    /// Rebuilds the snapshots of the services whose health changed: a
    /// transition in one of 500 services costs one rebuild, not 500.
    fn refresh_changed(&self) {
        let changed = self.prober.take_changed();
        if changed.is_empty() {
            return;
        }
        for cfg in self.configs.load().iter().filter(|c| changed.contains(&c.key)) {
            self.refresh_one(cfg);
        }
    }

    fn refresh_one(&self, cfg: &Arc<Config>) {
        let healthy: std::collections::HashSet<SocketAddr> = self
            .prober
            .states(&cfg.key)
            .into_iter()
            .filter(|(_, s)| s.health == Health::Healthy)
            .map(|(a, _)| a)
            .collect();
        let members = cfg
            .endpoints
            .iter()
            .map(|e| MemberSpec {
                addr: e.addr,
                weight: e.weight,
                backup: e.backup,
                max_connections: e.max_connections,
                healthy: healthy.contains(&e.addr),
            })
            .collect();
        self.dataplane.set_endpoints(cfg.clone(), members);
    }
}

impl AdminView for State {
    fn status(&self) -> String {
        let keys: Vec<_> = self.configs.load().iter().map(|c| c.key.clone()).collect();
        let mut status = report(&self.prober, &keys);
        for (svc, key) in status.services.iter_mut().zip(&keys) {
            let live = self.dataplane.live(key);
            for ep in &mut svc.endpoints {
                let addr = ep.address.parse().map(|ip| SocketAddr::new(ip, ep.port));
                if let Some(l) = addr.ok().and_then(|a| live.get(&a)) {
                    ep.active_connections = l.active;
                    ep.ejected = l.ejected_for.is_some();
                }
            }
        }
        serde_json::to_string_pretty(&status).unwrap_or_default()
    }

    fn ready(&self) -> bool {
        !self.draining.load(Ordering::Relaxed)
    }

    fn metrics(&self) -> String {
        self.metrics.encode()
    }
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
        cfg.endpoints.iter().map(move |ep| {
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
