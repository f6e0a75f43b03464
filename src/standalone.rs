//! `balanced standalone`: the prober (and, with the proxy, the listeners) driven
//! by a YAML file instead of the cluster.

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::api::config::Config;
use crate::api::load::LoadErrors;
use crate::balance::MemberSpec;
use crate::health::report::report;
use crate::health::{Health, HealthState};
use crate::health::{Prober, Target, TlsClients, probe};
use crate::metrics::Metrics;
use crate::proxy::{Dataplane, Serving};
use crate::shell::{self, Change, Source, SourceView};
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
    let source = FileSource::open(&opts.file, opts.poll, &metrics)?;
    tracing::info!(
        file = %opts.file.display(),
        admin = %admin_listener.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        services = source.view.configs.load().len(),
        "standalone running"
    );
    if let Some(addr) = opts.xds {
        let listener = crate::xds::bind(addr)
            .await
            .map_err(|source| Error::Xds { addr, source })?;
        let view = source.view.clone();
        let snapshots = crate::xds::publish(
            move || Some(view.xds_services()),
            source.prober.generation(),
            shutdown.clone(),
        );
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

/// A standalone file and our own prober: the configs come from the file, the
/// endpoints' health from the probes.
pub struct FileSource {
    prober: Prober,
    updates: tokio::sync::mpsc::Receiver<Result<Vec<Config>, LoadErrors>>,
    health_changes: tokio::sync::watch::Receiver<u64>,
    view: Arc<FileView>,
    pending: VecDeque<Change>,
    stop: CancellationToken,
}

struct FileView {
    configs: ArcSwap<Vec<Arc<Config>>>,
    prober: Prober,
    // Why the file's newest content is not what serves (cleared by a good one).
    rejected: std::sync::Mutex<Option<String>>,
}

impl FileSource {
    /// Reads `file` (an invalid one is an error), starts probing its
    /// endpoints and watching it for changes every `poll` and on SIGHUP.
    pub fn open(file: &Path, poll: Duration, metrics: &Metrics) -> Result<Self, Error> {
        let configs = file::read_configs(file).map_err(|errors| Error::InvalidConfig {
            file: file.display().to_string(),
            errors,
        })?;
        let stop = CancellationToken::new();
        let updates = file::watch(file.to_path_buf(), poll, stop.clone()).map_err(Error::Signal)?;
        let prober = Prober::new(metrics.probe.clone(), stop.clone());
        let mut source = Self {
            health_changes: prober.generation(),
            view: Arc::new(FileView {
                configs: ArcSwap::from_pointee(Vec::new()),
                prober: prober.clone(),
                rejected: std::sync::Mutex::new(None),
            }),
            prober,
            updates,
            pending: VecDeque::new(),
            stop,
        };
        source.apply(configs);
        Ok(source)
    }

    /// Probes what the new configs list (services and endpoints that stay
    /// keep their state) and queues the services and all their snapshots.
    fn apply(&mut self, configs: Vec<Config>) {
        let configs: Vec<Arc<Config>> = configs.into_iter().map(Arc::new).collect();
        let old = self.view.configs.load();
        for gone in old.iter().filter(|o| !configs.iter().any(|c| c.key == o.key)) {
            tracing::info!(service = %gone.key, "service removed");
            self.prober.remove_service(&gone.key);
        }
        for cfg in &configs {
            // Each endpoint once, whichever groups it is in.
            let targets: Vec<Target> = cfg.static_members().iter().map(|(e, _)| Target::new(e.addr)).collect();
            self.prober.update_service(&cfg.key, &cfg.health, &targets);
        }
        self.view.configs.store(Arc::new(configs.clone()));
        self.prober.take_changed();
        self.pending.push_back(Change::Services(configs.clone()));
        for cfg in configs {
            let members = self.members(&cfg);
            self.pending.push_back(Change::Endpoints(cfg, members));
        }
    }

    /// Queues new snapshots of the services whose health changed: a
    /// transition in one of 500 services costs one rebuild, not 500.
    fn refresh_changed(&mut self) {
        let changed = self.prober.take_changed();
        if changed.is_empty() {
            return;
        }
        for cfg in self.view.configs.load().iter().filter(|c| changed.contains(&c.key)) {
            let members = self.members(cfg);
            self.pending.push_back(Change::Endpoints(cfg.clone(), members));
        }
    }

    fn members(&self, cfg: &Config) -> Vec<MemberSpec> {
        let states: std::collections::HashMap<SocketAddr, HealthState> =
            self.prober.states(&cfg.key).into_iter().collect();
        let unreported = HealthState::new();
        let mut members = cfg
            .static_members()
            .into_iter()
            .map(|(e, groups)| {
                let state = states.get(&e.addr).unwrap_or(&unreported);
                (e, groups, state)
            })
            .map(|(e, groups, state)| MemberSpec {
                draining: state.agent.draining(),
                addr: e.addr,
                weight: state.agent.scale(e.weight),
                backup: e.backup,
                max_connections: e.max_connections,
                healthy: state.health == Health::Healthy,
                ports: Vec::new(),
                groups,
            })
            .collect::<Vec<_>>();
        crate::balance::apply_panic(cfg.panic_threshold, &mut members);
        members
    }
}

impl Source for FileSource {
    fn attach(&mut self, dataplane: &Arc<Dataplane>) {
        // A passing active probe ends a passive ejection at once.
        let weak = Arc::downgrade(dataplane);
        self.prober.on_pass(Arc::new(move |key, addr| {
            if let Some(dataplane) = weak.upgrade() {
                dataplane.lift_ejection(key, addr);
            }
        }));
    }

    async fn next(&mut self) -> Option<Change> {
        loop {
            if let Some(change) = self.pending.pop_front() {
                return Some(change);
            }
            tokio::select! {
                Some(update) = self.updates.recv() => {
                    let rejected = update.as_ref().err().map(ToString::to_string);
                    *self.view.rejected.lock().expect("rejected lock") = rejected;
                    if let Ok(configs) = update {
                        self.apply(configs);
                    }
                }
                changed = self.health_changes.changed() => {
                    if changed.is_err() {
                        return None;
                    }
                    self.refresh_changed();
                }
            }
        }
    }

    fn view(&self) -> Arc<dyn SourceView> {
        self.view.clone()
    }

    async fn stop(self) {
        self.stop.cancel();
        self.prober.stopped().await;
    }
}

impl FileView {
    /// Every service's `default` endpoints as the xDS server publishes them.
    fn xds_services(&self) -> Vec<crate::xds::Service> {
        self.configs
            .load()
            .iter()
            .map(|cfg| {
                let states: std::collections::HashMap<SocketAddr, HealthState> =
                    self.prober.states(&cfg.key).into_iter().collect();
                let unreported = HealthState::new();
                let endpoints = cfg
                    .static_members()
                    .into_iter()
                    .filter(|(_, groups)| groups & 1 != 0)
                    .map(|(e, _)| {
                        let state = states.get(&e.addr).unwrap_or(&unreported);
                        crate::xds::Endpoint {
                            addr: e.addr,
                            ports: Vec::new(),
                            zone: None,
                            health: state.health,
                            not_ready: false,
                            draining: state.agent.draining(),
                            weight: state.agent.scale(e.weight),
                        }
                    })
                    .collect();
                crate::xds::Service {
                    config: cfg.clone(),
                    endpoints,
                }
            })
            .collect()
    }
}

impl SourceView for FileView {
    fn status(&self, dataplane: &Dataplane) -> serde_json::Value {
        let keys: Vec<_> = self.configs.load().iter().map(|c| c.key.clone()).collect();
        let mut status = report(&self.prober, &keys);
        for (svc, key) in status.services.iter_mut().zip(&keys) {
            let live = dataplane.live(key);
            for ep in &mut svc.endpoints {
                let addr = ep.address.parse().map(|ip| SocketAddr::new(ip, ep.port));
                if let Some(l) = addr.ok().and_then(|a| live.get(&a)) {
                    ep.active_connections = l.active;
                    ep.ejected = l.ejected_for.is_some();
                }
            }
        }
        let mut value = serde_json::to_value(&status).unwrap_or_default();
        add_requests(&mut value, &keys, dataplane);
        add_routes(&mut value, &self.configs.load(), &self.prober);
        if let Some(why) = self.rejected.lock().expect("rejected lock").clone() {
            value["lastRejected"] = why.into();
        }
        value
    }
}

/// Adds each service's `requestsInFlight` and `requestsWaiting` (overload
/// protection) to a `/status` document whose `services` follow `keys`.
pub(crate) fn add_requests(
    value: &mut serde_json::Value,
    keys: &[crate::api::config::ServiceKey],
    dataplane: &Dataplane,
) {
    let Some(services) = value.get_mut("services").and_then(|s| s.as_array_mut()) else {
        return;
    };
    for (svc, key) in services.iter_mut().zip(keys) {
        if let Some(runtime) = dataplane.service(key) {
            svc["requestsInFlight"] = runtime.gate.in_flight().into();
            svc["requestsWaiting"] = runtime.gate.waiting().into();
        }
    }
}

/// Adds each service's groups (`backends`, ready x/y) and `routes` to a
/// `/status` document whose `services` follow `configs`.
fn add_routes(value: &mut serde_json::Value, configs: &[Arc<Config>], prober: &Prober) {
    let Some(services) = value.get_mut("services").and_then(|s| s.as_array_mut()) else {
        return;
    };
    for (svc, cfg) in services.iter_mut().zip(configs) {
        if cfg.backends.is_empty() && cfg.routes.is_empty() {
            continue;
        }
        let states: std::collections::HashMap<SocketAddr, Health> = prober
            .states(&cfg.key)
            .into_iter()
            .map(|(a, s)| (a, s.health))
            .collect();
        let members = cfg.static_members();
        let groups: Vec<serde_json::Value> = (0..=cfg.backends.len())
            .map(|g| {
                let in_group: Vec<_> = members.iter().filter(|(_, mask)| mask & (1 << g) != 0).collect();
                let ready = in_group
                    .iter()
                    .filter(|(e, _)| states.get(&e.addr) == Some(&Health::Healthy))
                    .count();
                serde_json::json!({"name": cfg.group_name(g), "ready": format!("{ready}/{}", in_group.len())})
            })
            .collect();
        let routes: Vec<serde_json::Value> = cfg
            .routes
            .iter()
            .map(|r| {
                let refs: Vec<_> = r
                    .refs
                    .iter()
                    .map(|b| serde_json::json!({"name": cfg.group_name(b.group), "weight": b.weight}))
                    .collect();
                serde_json::json!({"name": r.name, "matches": r.matches.len(), "backendRefs": refs})
            })
            .collect();
        svc["backends"] = groups.into();
        svc["routes"] = routes.into();
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
