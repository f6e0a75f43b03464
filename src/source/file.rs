//! BalancedServices from a YAML file, for `balanced standalone`: the
//! configs come from the file, the endpoints' health from our own prober
//! ([`FileSource`]).
//!
//! The file is re-read when it changes or on SIGHUP. A bad new file is reported
//! and ignored: the last good configuration keeps serving (nginx `-s reload`).

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{Change, Source, SourceView};
use crate::api::config::{Config, TargetPort};
use crate::api::load::{LoadError, LoadErrors, parse_documents};
use crate::api::validate::FieldError;
use crate::api::validate::validate;
use crate::balance::{MemberSpec, Observed};
use crate::health::report::report;
use crate::health::{Health, HealthState, Prober, Target};
use crate::metrics::Metrics;
use crate::proxy::Dataplane;

/// Reads, parses and validates a standalone file.
pub fn read_configs(path: &Path) -> Result<Vec<Config>, LoadErrors> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        LoadErrors(vec![LoadError::Read {
            file: path.display().to_string(),
            message: e.to_string(),
        }])
    })?;
    configs_from_text(&text)
}

/// Parses and validates standalone YAML: the API's rules plus standalone's own
/// (no cluster, so no `spec.service` and no named target ports).
pub fn configs_from_text(text: &str) -> Result<Vec<Config>, LoadErrors> {
    let docs = parse_documents(text)?;
    let mut configs = Vec::new();
    let mut errors = Vec::new();
    for doc in docs {
        let invalid = |path: String, message: String| LoadError::Invalid {
            index: doc.index,
            key: doc.key.clone(),
            error: FieldError { path, message },
        };
        if doc.spec.service.is_some() {
            errors.push(invalid(
                "spec.service".into(),
                "standalone has no cluster to read a Service's endpoints from; list them in spec.endpoints".into(),
            ));
        }
        for (i, b) in doc.spec.backends.iter().enumerate() {
            if b.service.is_some() {
                errors.push(invalid(
                    format!("spec.backends[{i}].service"),
                    "standalone has no cluster to read a Service's endpoints from; list them in endpoints".into(),
                ));
            }
        }
        match validate(doc.key.clone(), &doc.spec) {
            Ok(cfg) => {
                for (i, l) in cfg.listeners.iter().enumerate() {
                    if let Some(TargetPort::Name(name)) = &l.target_port {
                        errors.push(invalid(
                            format!("spec.listeners[{i}].targetPort"),
                            format!("the port name {name:?} needs a Service; standalone takes port numbers"),
                        ));
                    }
                }
                let secrets = cfg.secret_names();
                if !secrets.is_empty() {
                    let names: Vec<String> = secrets.into_iter().collect();
                    errors.push(invalid(
                        "spec".into(),
                        format!(
                            "names Secrets ({}), which need the cluster; standalone reads PEM files (certFile and keyFile, caFile)",
                            names.join(", ")
                        ),
                    ));
                }
                configs.push(cfg);
            }
            Err(errs) => errors.extend(errs.0.into_iter().map(|e| invalid(e.path, e.message))),
        }
    }
    if errors.is_empty() {
        Ok(configs)
    } else {
        Err(LoadErrors(errors))
    }
}

/// Sends the file's configs each time its content changes or SIGHUP arrives;
/// a bad file is logged and sent as its errors, so the receiver can say why
/// the previous configs stay.
pub fn watch(
    path: PathBuf,
    poll: Duration,
    shutdown: CancellationToken,
) -> std::io::Result<mpsc::Receiver<Result<Vec<Config>, LoadErrors>>> {
    let mut hangup = signal(SignalKind::hangup())?;
    let (tx, rx) = mpsc::channel(1);
    tokio::spawn(async move {
        let mut last_seen = std::fs::read(&path).ok();
        let unreadable = crate::throttle::LogThrottle::new(Duration::from_secs(10));
        let mut tick = tokio::time::interval(poll);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let forced = tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = hangup.recv() => true,
                _ = tick.tick() => false,
            };
            let now = match std::fs::read(&path) {
                Ok(bytes) => bytes,
                Err(e) => {
                    // Unreadable is not invalid (out of descriptors, a
                    // half-done rename): the running configuration stays and
                    // nothing is called rejected.
                    if let Some(n) = unreadable.hit() {
                        tracing::warn!(file = %path.display(), error = %e, times = n, "cannot read the configuration file; keeping the running configuration");
                    }
                    continue;
                }
            };
            if !forced && last_seen.as_ref() == Some(&now) {
                continue;
            }
            let text = String::from_utf8_lossy(&now).into_owned();
            // Remember what we tried, so a bad file is reported once, not every poll.
            last_seen = Some(now);
            let trigger = if forced { "SIGHUP" } else { "file changed" };
            match configs_from_text(&text) {
                Ok(configs) => {
                    tracing::info!(file = %path.display(), trigger, services = configs.len(), "reloading configuration");
                    if tx.send(Ok(configs)).await.is_err() {
                        return;
                    }
                }
                Err(errors) => {
                    for e in &errors.0 {
                        tracing::error!(file = %path.display(), trigger, error = %e, "configuration rejected; keeping the last good one");
                    }
                    if tx.send(Err(errors)).await.is_err() {
                        return;
                    }
                }
            }
        }
    });
    Ok(rx)
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

/// Why a file source could not open.
#[derive(Debug)]
pub enum OpenError {
    /// The file is invalid.
    Invalid(LoadErrors),
    /// SIGHUP could not be watched.
    Signal(std::io::Error),
}

impl FileSource {
    /// Services in the file now.
    pub fn services(&self) -> usize {
        self.view.configs.load().len()
    }

    /// Every service's `default` endpoints as lookaside clients (xDS) see them, on demand.
    pub fn lookaside(&self) -> impl Fn() -> Vec<crate::xds::Service> + Send + Sync + 'static {
        let view = self.view.clone();
        move || view.xds_services()
    }

    /// Bumped whenever an endpoint's health changes.
    pub fn health_generation(&self) -> tokio::sync::watch::Receiver<u64> {
        self.prober.generation()
    }

    /// Reads `file` (an invalid one is an error), starts probing its
    /// endpoints and watching it for changes every `poll` and on SIGHUP.
    pub fn open(file: &Path, poll: Duration, metrics: &Metrics) -> Result<Self, OpenError> {
        let configs = read_configs(file).map_err(OpenError::Invalid)?;
        let stop = CancellationToken::new();
        let updates = watch(file.to_path_buf(), poll, stop.clone()).map_err(OpenError::Signal)?;
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
            let targets: Vec<Target> = cfg
                .static_members()
                .iter()
                .map(|(e, groups)| Target {
                    groups: *groups,
                    ..Target::new(e.addr)
                })
                .collect();
            self.prober
                .update_service(&cfg.key, &cfg.health, &cfg.backend_tls, &targets);
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
        let observed = cfg.static_members().into_iter().map(|(e, groups)| {
            let state = states.get(&e.addr).unwrap_or(&unreported);
            Observed {
                addr: e.addr,
                healthy: state.health == Health::Healthy,
                draining: state.agent.draining(),
                weight_percent: state.agent.weight_percent,
                ports: Vec::new(),
                groups,
            }
        });
        crate::balance::members(cfg, observed)
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
                let now = std::time::SystemTime::now();
                let endpoints = cfg
                    .static_members()
                    .into_iter()
                    .filter(|(_, groups)| groups & 1 != 0)
                    .map(|(e, _)| {
                        let state = states.get(&e.addr).unwrap_or(&unreported);
                        let (weight, ramping) = state.published_weight(e.weight, cfg.slow_start, now);
                        crate::xds::Endpoint {
                            addr: e.addr,
                            ports: Vec::new(),
                            zone: None,
                            health: state.health,
                            not_ready: false,
                            draining: state.agent.draining(),
                            weight,
                            ramping,
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
        let mut value = serde_json::to_value(report(&self.prober, &keys)).unwrap_or_default();
        super::add_live(&mut value, &keys, dataplane);
        add_routes(&mut value, &self.configs.load(), &self.prober);
        if let Some(why) = self.rejected.lock().expect("rejected lock").clone() {
            value["lastRejected"] = why.into();
        }
        value
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standalone_refuses_service_named_ports_and_secrets() {
        let text = "
apiVersion: balanced.dev/v1alpha1
kind: BalancedService
metadata: {name: web}
spec:
  service: web
  endpoints: [{address: 127.0.0.1, port: 8081}]
  listeners: [{name: http, port: 8080, targetPort: http, tls: {secretName: site}}]
  backendTLS: {caSecretName: ca}
";
        let err = configs_from_text(text).unwrap_err();
        assert_eq!(
            err.lines(),
            vec![
                "document 1 (default/web): spec.service: standalone has no cluster to read a Service's endpoints from; list them in spec.endpoints",
                "document 1 (default/web): spec.listeners[0].targetPort: the port name \"http\" needs a Service; standalone takes port numbers",
                "document 1 (default/web): spec: names Secrets (ca, site), which need the cluster; standalone reads PEM files (certFile and keyFile, caFile)",
            ]
        );
    }
}
