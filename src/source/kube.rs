//! `balanced proxy`: the data plane of one BalancedService, configured by
//! watching that object (its spec) and the healthy EndpointSlices the
//! controller writes for it (endpoint health, weights, drain): kube-proxy's
//! path, so a transition costs each proxy one slice, not the whole object.
//!
//! A bad spec, a lost API server or a stopped controller never takes away
//! the last good snapshot (fail static: the slices stay as they were).

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Client;
use kube::api::Api;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::secrets::SecretFiles;
use super::{Change, Source, SourceView};
use crate::api::config::{Config, ServiceKey};
use crate::api::{BalancedService, validate};
use crate::metrics::Metrics;
use crate::proxy::{Dataplane, Serving};
use crate::shell;

/// Settings of `balanced proxy`.
#[derive(Clone, Debug)]
pub struct ProxyOptions {
    /// Which BalancedService.
    pub key: ServiceKey,
    /// Address the listeners bind.
    pub bind: IpAddr,
    /// Shutdown grace and access log.
    pub serving: Serving,
    /// On SIGTERM, how long `/readyz` fails before listeners close.
    pub drain_delay: Duration,
}

/// One BalancedService watched in the cluster: its spec is the config, its
/// healthy EndpointSlices (written by the controller's prober) the endpoints.
pub struct ClusterSource {
    key: ServiceKey,
    inputs: std::pin::Pin<Box<dyn futures::Stream<Item = Input> + Send>>,
    slices: Store<EndpointSlice>,
    slices_listed: bool,
    config: Option<Arc<Config>>,
    // A valid spec held until the Secrets it names are written, and its generation.
    waiting: Option<(Arc<Config>, Option<i64>)>,
    secrets: Arc<SecretFiles>,
    view: Arc<ClusterView>,
    pending: Option<Change>,
}

/// What the two watches bring (one at a time: their sizes do not matter).
#[allow(clippy::large_enum_variant)]
enum Input {
    Object(Result<BalancedService, watcher::Error>),
    Slices(Result<watcher::Event<EndpointSlice>, watcher::Error>),
    SecretsChanged,
}

struct ClusterView {
    key: ServiceKey,
    has_snapshot: AtomicBool,
    last: std::sync::Mutex<Option<serde_json::Value>>,
    // Why the newest spec is not the one serving, and why a watch is
    // failing, for `/status` (cleared by the next good spec or event).
    rejected: std::sync::Mutex<Option<String>>,
    watch_error: std::sync::Mutex<Option<String>>,
    secrets: Arc<SecretFiles>,
}

impl ClusterSource {
    /// Watches `key` and its healthy slices through `client`.
    pub fn new(client: Client, key: ServiceKey) -> Self {
        let api: Api<BalancedService> = Api::namespaced(client.clone(), &key.namespace);
        let config = watcher::Config::default().fields(&format!("metadata.name={}", key.name));
        // default_backoff: watch errors (API server gone, 410 Gone) restart the
        // watch with backoff; the snapshot stays while they do.
        let objects = watcher(api, config)
            .default_backoff()
            .applied_objects()
            .map(Input::Object);
        let (slices, writer) = reflector::store::<EndpointSlice>();
        let secrets = SecretFiles::new(client.clone(), SecretFiles::default_dir());
        let secret_changes = futures::stream::unfold(secrets.changed(), |mut rx| async move {
            rx.changed().await.ok()?;
            Some((Input::SecretsChanged, rx))
        });
        let slice_api: Api<EndpointSlice> = Api::namespaced(client, &key.namespace);
        let slice_events = watcher(
            slice_api,
            watcher::Config::default().labels(&crate::controller::slices::selector(&key.name)),
        )
        .default_backoff()
        .reflect(writer)
        .map(Input::Slices);
        Self {
            view: Arc::new(ClusterView {
                key: key.clone(),
                has_snapshot: AtomicBool::new(false),
                last: std::sync::Mutex::new(None),
                rejected: std::sync::Mutex::new(None),
                watch_error: std::sync::Mutex::new(None),
                secrets: secrets.clone(),
            }),
            key,
            inputs: futures::stream::select(futures::stream::select(objects, slice_events), secret_changes).boxed(),
            slices,
            slices_listed: false,
            config: None,
            waiting: None,
            secrets,
            pending: None,
        }
    }

    /// The config an object implies, or `None` (logged) when its spec is invalid.
    fn config(&self, bsvc: &BalancedService) -> Option<Arc<Config>> {
        match validate(self.key.clone(), &bsvc.spec) {
            Ok(mut cfg) => {
                // The limit is the service's: each replica enforces its share.
                cfg.rate_limit = cfg.rate_limit.map(|r| r.per_replica(cfg.replicas));
                for route in &mut cfg.routes {
                    route.rate_limit = route.rate_limit.take().map(|r| r.per_replica(cfg.replicas));
                }
                *self.view.rejected.lock().expect("rejected lock") = None;
                self.secrets.want(&self.key, cfg.secret_names());
                let namespace = self.key.namespace.clone();
                let cfg = cfg.with_secret_files(|name| self.secrets.dir_of(&namespace, name));
                Some(Arc::new(with_status_protocols(cfg, bsvc)))
            }
            Err(errors) => {
                tracing::warn!(service = %self.key, errors = %errors, "invalid spec; serving the last good snapshot");
                *self.view.rejected.lock().expect("rejected lock") = Some(format!(
                    "generation {}: {errors}",
                    bsvc.metadata.generation.unwrap_or_default()
                ));
                None
            }
        }
    }

    /// The config held for its Secrets, once they are all written: a listener
    /// must not start (nor a running one be replaced) without its certificate,
    /// as a Pod does not start without its Secret volumes.
    fn take_waiting(&mut self) -> Option<Change> {
        let (cfg, generation) = self.waiting.as_ref()?;
        if let Err(why) = self.secrets.ready(&self.key.namespace, &cfg.secret_names()) {
            tracing::info!(service = %self.key, %why, "spec held until its Secrets are written");
            *self.view.rejected.lock().expect("rejected lock") =
                Some(format!("generation {}: {why}", generation.unwrap_or_default()));
            return None;
        }
        let (cfg, generation) = self.waiting.take()?;
        *self.view.rejected.lock().expect("rejected lock") = None;
        self.config = Some(cfg.clone());
        // Endpoints wait for the slices' first list: before it, every
        // endpoint would look unhealthy.
        if self.slices_listed {
            self.pending = Some(self.endpoints(&cfg, generation));
        }
        Some(Change::Services(vec![cfg]))
    }

    /// The endpoints of `cfg` as the healthy slices have them.
    fn endpoints(&self, cfg: &Arc<Config>, generation: Option<i64>) -> Change {
        let state = self.slices.state();
        let slices: Vec<&EndpointSlice> = state.iter().map(|s| &**s).collect();
        let members = crate::controller::slices::members(cfg, &slices);
        let healthy = members.iter().filter(|m| m.healthy).count();
        tracing::info!(service = %self.key, algorithm = cfg.algorithm.name(), endpoints = members.len(), healthy, slices = slices.len(), "snapshot applied");
        let mut last = self.view.last.lock().expect("last lock");
        let generation = generation.or_else(|| last.as_ref().and_then(|l| l["generation"].as_i64()));
        *last = Some(serde_json::json!({
            "generation": generation,
            "algorithm": cfg.algorithm.name(),
            "endpoints": members.len(),
            "healthy": healthy,
            "slices": slices.len(),
        }));
        Change::Endpoints(cfg.clone(), members)
    }
}

impl Source for ClusterSource {
    async fn next(&mut self) -> Option<Change> {
        if let Some(change) = self.pending.take() {
            // The snapshot is in once its endpoints are: /readyz may pass.
            self.view.has_snapshot.store(true, Ordering::Relaxed);
            return Some(change);
        }
        loop {
            match self.inputs.next().await? {
                Input::Object(next) => {
                    *self.view.watch_error.lock().expect("watch error lock") =
                        next.as_ref().err().map(|e| e.to_string());
                    match next {
                        Ok(bsvc) => {
                            let Some(cfg) = self.config(&bsvc) else { continue };
                            self.waiting = Some((cfg, bsvc.metadata.generation));
                            if let Some(change) = self.take_waiting() {
                                return Some(change);
                            }
                        }
                        Err(e) => tracing::warn!(error = %e, "BalancedService watch failed; serving the last snapshot"),
                    }
                }
                Input::Slices(Ok(event)) => {
                    *self.view.watch_error.lock().expect("watch error lock") = None;
                    match event {
                        watcher::Event::Init | watcher::Event::InitApply(_) => continue,
                        watcher::Event::InitDone | watcher::Event::Apply(_) | watcher::Event::Delete(_) => {}
                    }
                    self.slices_listed = true;
                    if let Some(cfg) = self.config.clone() {
                        self.view.has_snapshot.store(true, Ordering::Relaxed);
                        return Some(self.endpoints(&cfg, None));
                    }
                }
                Input::SecretsChanged => {
                    if let Some(change) = self.take_waiting() {
                        return Some(change);
                    }
                }
                Input::Slices(Err(e)) => {
                    *self.view.watch_error.lock().expect("watch error lock") = Some(e.to_string());
                    tracing::warn!(error = %e, "EndpointSlice watch failed; serving the last endpoints");
                }
            }
        }
    }

    fn view(&self) -> Arc<dyn SourceView> {
        self.view.clone()
    }

    async fn stop(self) {}
}

impl SourceView for ClusterView {
    fn status(&self, dataplane: &Dataplane) -> serde_json::Value {
        let mut value = serde_json::json!({
            "services": [{
                "namespace": self.key.namespace, "name": self.key.name, "endpoints": [],
                "requestsInFlight": 0, "requestsWaiting": 0,
            }],
            "lastApplied": self.last.lock().expect("last lock").clone(),
            "lastRejected": self.rejected.lock().expect("rejected lock").clone(),
            "watchError": self.watch_error.lock().expect("watch error lock").clone(),
        });
        let secret_errors = self.secrets.errors(&self.key.namespace);
        if !secret_errors.is_empty() {
            value["secretErrors"] = secret_errors
                .into_iter()
                .map(|(name, e)| (name, serde_json::Value::from(e)))
                .collect::<serde_json::Map<_, _>>()
                .into();
        }
        super::add_live(&mut value, std::slice::from_ref(&self.key), dataplane);
        value
    }

    fn ready(&self) -> bool {
        self.has_snapshot.load(Ordering::Relaxed)
    }
}

/// Watches the BalancedService and serves it until `shutdown`.
pub async fn run_proxy(
    client: Client,
    opts: ProxyOptions,
    admin_listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), shell::Error> {
    let source = ClusterSource::new(client, opts.key);
    let shell_opts = shell::Options {
        bind: opts.bind,
        serving: opts.serving,
        drain_delay: opts.drain_delay,
        metrics: Arc::new(Metrics::new()),
    };
    shell::run(source, shell_opts, admin_listener, shutdown).await
}

/// Listeners whose spec names no `appProtocol` take the one the controller
/// found on the Service port (`status.listeners`).
pub fn with_status_protocols(mut cfg: Config, bsvc: &BalancedService) -> Config {
    for found in bsvc.status.iter().flat_map(|s| &s.listeners) {
        if let Some(l) = cfg
            .listeners
            .iter_mut()
            .find(|l| l.name == found.name && l.app_protocol.is_none())
        {
            l.app_protocol = crate::api::config::AppProtocol::parse(&found.app_protocol);
        }
    }
    cfg
}
