//! The controller process: reconcile BalancedServices (discover endpoints,
//! hand them to the one prober, apply owned objects), and a status writer that
//! turns probe transitions into batched status patches, Events and the healthy
//! EndpointSlice.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ObjectReference, Service, ServiceAccount};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::utils::{Backoff, ResetTimerBackoff};
use kube::runtime::{WatchStreamExt, predicates, watcher};
use kube::{Client, Resource, ResourceExt};
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;

use super::desired::{FIELD_MANAGER, Owned, RenderOptions, desired, healthy_name, owner_ref};
use super::discovery::{Discovered, SERVICE_NAME_LABEL, app_protocols, endpoints_from_slices};
use super::status::{EndpointView, Observed, assemble, seed_from};
use crate::api::config::{Config, ServiceKey};
use crate::api::{BalancedService, BalancedServiceStatus, validate};
use crate::health::report::rfc3339;
use crate::health::{Health, Prober, Target, Transition};
use crate::metrics::Metrics;

/// How often dirty statuses are flushed: at most one write per object per period.
pub const STATUS_PERIOD: Duration = Duration::from_millis(500);

/// Why a reconcile failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The API server refused or failed a call.
    #[error("{action}: {source}")]
    Api {
        /// What was being done.
        action: String,
        /// The API error.
        source: kube::Error,
    },
}

/// What the status writer knows of one BalancedService besides probe states.
#[derive(Clone, Debug, Default)]
struct View {
    generation: Option<i64>,
    owner: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference>,
    reference: Option<ObjectReference>,
    config: Option<Arc<Config>>,
    endpoints: Vec<Discovered>,
    listeners: Vec<crate::api::spec::ListenerStatus>,
    invalid: Option<Vec<String>>,
    proxy: Option<(bool, String)>,
    written: Option<BalancedServiceStatus>,
    slice_written: Option<Vec<(String, bool)>>,
}

struct Ctx {
    client: Client,
    prober: Prober,
    render: RenderOptions,
    slices: Store<EndpointSlice>,
    views: Mutex<HashMap<ServiceKey, View>>,
    dirty: mpsc::UnboundedSender<ServiceKey>,
    recorder: Recorder,
    metrics: Arc<Metrics>,
    backoff: Mutex<HashMap<ServiceKey, Duration>>,
    reconciled: std::sync::atomic::AtomicBool,
    // Bumped when a view changes: what xDS publishes comes from the views as
    // well as from the prober, whose own changes come first.
    views_changed: Arc<tokio::sync::watch::Sender<u64>>,
}

fn key_of(bsvc: &BalancedService) -> ServiceKey {
    ServiceKey::new(bsvc.namespace().unwrap_or_else(|| "default".into()), bsvc.name_any())
}

/// The leading controller's state, shared with the assign API and the xDS
/// server, which answer from it while this replica leads.
#[derive(Clone)]
pub struct Leading {
    ctx: Arc<Mutex<Option<Arc<Ctx>>>>,
    changes: Arc<tokio::sync::watch::Sender<u64>>,
}

impl Default for Leading {
    fn default() -> Self {
        Self {
            ctx: Arc::default(),
            changes: Arc::new(tokio::sync::watch::Sender::new(0)),
        }
    }
}

impl Leading {
    fn set(&self, ctx: Option<Arc<Ctx>>) {
        *self.ctx.lock().expect("leading lock") = ctx;
        self.changes.send_modify(|g| *g += 1);
    }

    fn get(&self) -> Option<Arc<Ctx>> {
        self.ctx.lock().expect("leading lock").clone()
    }

    /// Bumped whenever what xDS publishes may have changed.
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Every BalancedService's `default` endpoints for the xDS server; `None`
    /// while standing by.
    pub fn xds_services(&self) -> Option<Vec<crate::xds::Service>> {
        let ctx = self.get()?;
        let views = ctx.views.lock().expect("views lock");
        let mut keys: Vec<&ServiceKey> = views.keys().collect();
        keys.sort();
        Some(
            keys.into_iter()
                .filter_map(|key| lookaside(&ctx, key, &views[key]))
                .collect(),
        )
    }

    /// The snapshot members of `key`'s `default` group as the assign API
    /// sees them, with its config.
    fn members(
        &self,
        key: &ServiceKey,
    ) -> Result<(Arc<Config>, Vec<crate::balance::MemberSpec>), (http::StatusCode, String)> {
        let ctx = self.get().ok_or_else(|| {
            (
                http::StatusCode::SERVICE_UNAVAILABLE,
                "this controller is standing by: ask the leader\n".to_string(),
            )
        })?;
        let svc = {
            let views = ctx.views.lock().expect("views lock");
            views.get(key).and_then(|view| lookaside(&ctx, key, view))
        }
        .ok_or_else(|| (http::StatusCode::NOT_FOUND, format!("no BalancedService {key}\n")))?;
        let members = svc
            .endpoints
            .iter()
            .map(|e| crate::balance::MemberSpec {
                addr: e.addr,
                weight: e.weight,
                backup: svc.config.endpoints.iter().any(|s| s.addr == e.addr && s.backup),
                max_connections: 0,
                healthy: e.health == Health::Healthy && !e.not_ready,
                draining: e.draining,
                ports: e.ports.clone(),
                groups: 1,
            })
            .collect();
        Ok((svc.config, members))
    }
}

/// One BalancedService's `default` endpoints as lookaside clients see them
/// (xDS and the assign API); `None` while its spec is invalid.
fn lookaside(ctx: &Ctx, key: &ServiceKey, view: &View) -> Option<crate::xds::Service> {
    let config = view.config.clone()?;
    let states: HashMap<_, _> = ctx.prober.states(key).into_iter().collect();
    let statics: HashMap<_, _> = config.endpoints.iter().map(|e| (e.addr, e.weight)).collect();
    let endpoints = view
        .endpoints
        .iter()
        .filter(|d| d.backends.is_empty() || d.backends.iter().any(|b| b == "default"))
        .map(|d| {
            let state = states.get(&d.addr).cloned().unwrap_or_default();
            crate::xds::Endpoint {
                addr: d.addr,
                ports: d.ports.clone(),
                zone: d.zone.clone(),
                health: state.health,
                not_ready: !d.ready || d.terminating,
                draining: state.agent.draining(),
                weight: state.agent.scale(statics.get(&d.addr).copied().unwrap_or(1)),
            }
        })
        .collect();
    Some(crate::xds::Service { config, endpoints })
}

/// Runs the controller until `stop` is cancelled.
pub async fn run(client: Client, render: RenderOptions, metrics: Arc<Metrics>, stop: CancellationToken) {
    run_leading(client, render, metrics, stop, &Leading::default()).await
}

async fn run_leading(
    client: Client,
    render: RenderOptions,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
    leading: &Leading,
) {
    let prober = Prober::new(metrics.probe.clone(), stop.clone());
    let (slice_reader, slice_writer) = reflector::store::<EndpointSlice>();
    let slice_stream = watcher(
        Api::<EndpointSlice>::all(client.clone()),
        watcher::Config::default().labels(SERVICE_NAME_LABEL),
    )
    .backoff(watch_backoff())
    .reflect(slice_writer)
    .applied_objects();

    let (bsvc_reader, bsvc_writer) = reflector::store::<BalancedService>();
    let bsvc_stream = watcher(Api::<BalancedService>::all(client.clone()), watcher::Config::default())
        .backoff(watch_backoff())
        .reflect(bsvc_writer)
        .applied_objects()
        // Our own status writes must not re-trigger reconciles.
        .predicate_filter(predicates::generation, Default::default());

    let (dirty_tx, dirty_rx) = mpsc::unbounded_channel();
    let reporter = Reporter {
        controller: "balanced-controller".into(),
        instance: std::env::var("POD_NAME").ok(),
    };
    let ctx = Arc::new(Ctx {
        client: client.clone(),
        prober: prober.clone(),
        render,
        slices: slice_reader,
        views: Mutex::new(HashMap::new()),
        dirty: dirty_tx,
        recorder: Recorder::new(client.clone(), reporter),
        metrics: metrics.clone(),
        backoff: Mutex::new(HashMap::new()),
        reconciled: std::sync::atomic::AtomicBool::new(false),
        views_changed: leading.changes.clone(),
    });

    let writer = tokio::spawn(status_writer(ctx.clone(), bsvc_reader.clone(), dirty_rx, stop.clone()));
    leading.set(Some(ctx.clone()));
    // Probes, agents and reconciles (which re-target the prober) all bump the
    // prober's generation: that is what xDS rebuilds on.
    let forward = {
        let (mut generation, leading, stop) = (prober.generation(), leading.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    changed = generation.changed() => if changed.is_err() { return },
                }
                leading.changes.send_modify(|g| *g += 1);
            }
        })
    };
    let store = bsvc_reader.clone();
    let controller = Controller::for_stream(bsvc_stream, bsvc_reader)
        // The owned-object watches share one backoff, so a 410 Gone on each
        // (every watch expires at once when the API server compacts or
        // restarts) compounded kube's default (800 ms doubling to 30 s) to
        // ~16 s before new endpoints were seen.
        .trigger_backoff(watch_backoff())
        .owns(
            Api::<Deployment>::all(client.clone()),
            watcher::Config::default().labels("app.kubernetes.io/managed-by=balanced"),
        )
        .owns(
            Api::<Service>::all(client.clone()),
            watcher::Config::default().labels("app.kubernetes.io/managed-by=balanced"),
        )
        .watches_stream(slice_stream, move |slice: EndpointSlice| {
            let ns = slice.namespace();
            let svc = slice.labels().get(SERVICE_NAME_LABEL).cloned();
            store
                .state()
                .into_iter()
                .filter(|b| {
                    b.namespace() == ns
                        && svc.is_some()
                        && (b.spec.service == svc || b.spec.backends.iter().any(|g| g.service == svc))
                })
                .map(|b| ObjectRef::from_obj(&*b))
                .collect::<Vec<_>>()
        })
        .with_config(kube::runtime::controller::Config::default().concurrency(4))
        .graceful_shutdown_on(stop.clone().cancelled_owned())
        .run(reconcile, error_policy, ctx.clone());
    let looping = controller.for_each(|result| async move {
        if let Err(e) = result {
            tracing::debug!(error = %e, "reconcile loop");
        }
    });
    // Graceful shutdown waits for running reconciles; bound it so a stuck API
    // call cannot keep the process from exiting.
    let deadline = async {
        stop.cancelled().await;
        tokio::time::sleep(Duration::from_secs(10)).await;
    };
    tokio::select! {
        _ = looping => tracing::debug!("controller loop ended"),
        _ = deadline => tracing::warn!("controller did not stop within 10 s; dropping it"),
    }
    stop.cancel();
    leading.set(None);
    let _ = forward.await;
    let _ = writer.await;
    tracing::debug!("status writer ended");
    prober.stopped().await;
    tracing::debug!("probes ended");
}

async fn reconcile(bsvc: Arc<BalancedService>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    ctx.reconciled.store(true, std::sync::atomic::Ordering::Relaxed);
    let key = key_of(&bsvc);
    let result = reconcile_inner(&bsvc, &key, &ctx).await;
    let outcome = if result.is_ok() { "success" } else { "error" };
    ctx.metrics
        .controller
        .reconciles
        .get_or_create(&crate::metrics::ResultLabels { result: outcome })
        .inc();
    if result.is_ok() {
        ctx.backoff.lock().expect("backoff lock").remove(&key);
    }
    result
}

async fn reconcile_inner(bsvc: &BalancedService, key: &ServiceKey, ctx: &Ctx) -> Result<Action, Error> {
    if bsvc.meta().deletion_timestamp.is_some() {
        forget(ctx, key);
        return Ok(Action::await_change());
    }
    let reference = bsvc.object_ref(&());
    let cfg = match validate(key.clone(), &bsvc.spec) {
        Ok(cfg) => Arc::new(cfg),
        Err(errors) => {
            let messages: Vec<String> = errors.0.iter().map(ToString::to_string).collect();
            let changed = {
                let mut views = ctx.views.lock().expect("views lock");
                let view = views.entry(key.clone()).or_default();
                view.generation = bsvc.meta().generation;
                view.reference = Some(reference.clone());
                let changed = view.invalid.as_ref() != Some(&messages);
                view.invalid = Some(messages.clone());
                changed
            };
            let _ = ctx.dirty.send(key.clone());
            if changed {
                tracing::warn!(service = %key, errors = %messages.join("; "), "invalid spec; keeping the last good configuration");
                publish(
                    ctx,
                    &reference,
                    EventType::Warning,
                    "InvalidSpec",
                    "Validate",
                    messages.join("; "),
                )
                .await;
            }
            // The last good config keeps being probed and served.
            return Ok(Action::requeue(Duration::from_secs(300)));
        }
    };

    let slices_of = |svc: &String| -> Vec<EndpointSlice> {
        ctx.slices
            .state()
            .iter()
            .filter(|s| {
                s.namespace().as_deref() == Some(key.namespace.as_str())
                    && s.labels().get(SERVICE_NAME_LABEL) == Some(svc)
            })
            .map(|s| (**s).clone())
            .collect()
    };
    let mut listeners = Vec::new();
    // Every group's endpoints (the default Service and static endpoints,
    // then each backend's), each address once with the groups it is in.
    let groups = std::iter::once((0, cfg.service.as_ref(), &cfg.endpoints)).chain(
        cfg.backends
            .iter()
            .enumerate()
            .map(|(i, b)| (i + 1, b.service.as_ref(), &b.endpoints)),
    );
    let mut discovered: Vec<Discovered> = Vec::new();
    for (group, service, statics) in groups {
        let mut found = match service {
            Some(svc) => {
                let slices = slices_of(svc);
                if group == 0 {
                    listeners = app_protocols(&slices, &cfg.listeners);
                }
                endpoints_from_slices(&slices, &cfg.listeners)
            }
            None => Vec::new(),
        };
        for ep in statics {
            if !found.iter().any(|d| d.addr == ep.addr) {
                found.push(Discovered {
                    addr: ep.addr,
                    target_ref: None,
                    zone: None,
                    ready: true,
                    terminating: false,
                    ports: Vec::new(),
                    backends: Vec::new(),
                });
            }
        }
        let name = cfg.group_name(group).to_string();
        for mut d in found {
            match discovered.iter_mut().find(|o| o.addr == d.addr) {
                Some(o) => o.backends.push(name.clone()),
                None => {
                    d.backends.push(name.clone());
                    discovered.push(d);
                }
            }
        }
    }
    // Without backends every endpoint is `default`'s: status says nothing.
    if cfg.backends.is_empty() {
        for d in &mut discovered {
            d.backends.clear();
        }
    }
    discovered.sort_by_key(|d| d.addr);

    let previous = bsvc.status.as_ref();
    let targets: Vec<Target> = discovered
        .iter()
        .map(|d| Target {
            addr: d.addr,
            seed: seed_from(previous, d.addr),
        })
        .collect();
    ctx.prober.update_service(key, &cfg.health, &targets);

    let mut proxy = None;
    for object in desired(bsvc, &cfg, &ctx.render) {
        if let Some(available) = apply(&ctx.client, &key.namespace, &object).await? {
            proxy = Some(available);
        }
    }
    {
        let mut views = ctx.views.lock().expect("views lock");
        let view = views.entry(key.clone()).or_default();
        if view.written.is_none() {
            view.written = previous.cloned();
        }
        view.generation = bsvc.meta().generation;
        view.owner = owner_ref(bsvc);
        view.reference = Some(reference);
        view.config = Some(cfg);
        view.endpoints = discovered;
        view.listeners = listeners;
        view.invalid = None;
        view.proxy = proxy.or(view.proxy.take());
    }
    ctx.views_changed.send_modify(|g| *g += 1);
    let _ = ctx.dirty.send(key.clone());
    Ok(Action::requeue(Duration::from_secs(300)))
}

/// Server-side applies one owned object; for the Deployment, returns whether it is available.
async fn apply(client: &Client, ns: &str, object: &Owned) -> Result<Option<(bool, String)>, Error> {
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let failed = |source| Error::Api {
        action: format!("apply {}", object.describe()),
        source,
    };
    macro_rules! ssa {
        ($t:ty, $o:expr) => {{
            let name = $o.metadata.name.clone().unwrap_or_default();
            Api::<$t>::namespaced(client.clone(), ns)
                .patch(&name, &params, &Patch::Apply(&**$o))
                .await
                .map_err(failed)?
        }};
    }
    match object {
        Owned::Deployment(d) => {
            let applied = ssa!(Deployment, d);
            let available = applied
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .and_then(|c| c.iter().find(|c| c.type_.as_deref() == Some("Available")))
                .map(|c| {
                    (
                        c.status.as_deref() == Some("True"),
                        c.message.clone().unwrap_or_default(),
                    )
                });
            let replicas = applied.status.as_ref().and_then(|s| s.available_replicas).unwrap_or(0);
            return Ok(Some(
                available.unwrap_or((false, format!("{replicas} proxy replicas available"))),
            ));
        }
        Owned::Service(s) => drop(ssa!(Service, s)),
        Owned::ServiceAccount(s) => drop(ssa!(ServiceAccount, s)),
        Owned::Role(r) => drop(ssa!(Role, r)),
        Owned::RoleBinding(r) => drop(ssa!(RoleBinding, r)),
    }
    Ok(None)
}

fn error_policy(bsvc: Arc<BalancedService>, error: &Error, ctx: Arc<Ctx>) -> Action {
    let key = key_of(&bsvc);
    // kube has no per-object backoff: double per consecutive failure, 1 s .. 5 min.
    let delay = {
        let mut backoff = ctx.backoff.lock().expect("backoff lock");
        let d = backoff.entry(key.clone()).or_insert(Duration::from_millis(500));
        *d = (*d * 2).min(Duration::from_secs(300));
        *d
    };
    tracing::warn!(service = %key, error = %error, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

fn forget(ctx: &Ctx, key: &ServiceKey) {
    ctx.prober.remove_service(key);
    ctx.views.lock().expect("views lock").remove(key);
    ctx.views_changed.send_modify(|g| *g += 1);
}

async fn publish(ctx: &Ctx, reference: &ObjectReference, type_: EventType, reason: &str, action: &str, note: String) {
    let event = Event {
        type_,
        reason: reason.into(),
        note: Some(note.chars().take(1000).collect()),
        action: action.into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&event, reference).await {
        tracing::debug!(error = %e, "event not published");
    }
}

/// Flushes statuses of objects marked dirty (by reconciles and transitions),
/// at most once per object per [`STATUS_PERIOD`], and drops probing of objects
/// that left the store.
async fn status_writer(
    ctx: Arc<Ctx>,
    store: Store<BalancedService>,
    mut dirty_rx: mpsc::UnboundedReceiver<ServiceKey>,
    stop: CancellationToken,
) {
    let mut transitions = ctx.prober.subscribe();
    // Agent reports (weight, drain) change status without a transition.
    let mut generation = ctx.prober.generation();
    let mut tick = tokio::time::interval(STATUS_PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut dirty: HashSet<ServiceKey> = HashSet::new();
    let mut events: Vec<Transition> = Vec::new();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            Some(key) = dirty_rx.recv() => { dirty.insert(key); }
            t = transitions.recv() => match t {
                Ok(t) => {
                    dirty.insert(t.service.clone());
                    events.push(t);
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    dirty.extend(ctx.prober.services());
                }
                Err(broadcast::error::RecvError::Closed) => return,
            },
            Ok(()) = generation.changed() => {
                dirty.extend(ctx.prober.take_changed());
            }
            _ = tick.tick() => {
                sweep(&ctx, &store);
                for t in events.drain(..) {
                    announce(&ctx, &t).await;
                }
                let keys: Vec<ServiceKey> = dirty.drain().collect();
                for key in keys {
                    if !flush(&ctx, &key).await {
                        // The API server is away: try again next period.
                        dirty.insert(key);
                    }
                }
            }
        }
    }
}

/// Stops probing services that are no longer in the store (deleted).
fn sweep(ctx: &Ctx, store: &Store<BalancedService>) {
    // kube runs reconciles only once the store has listed; before that an empty
    // store would look like every BalancedService was deleted. (Waiting on the
    // store's readiness here as well starves the controller's own wait.)
    if !ctx.reconciled.load(std::sync::atomic::Ordering::Relaxed) {
        return;
    }
    let present: HashSet<ServiceKey> = store.state().iter().map(|b| key_of(b)).collect();
    for key in ctx.prober.services() {
        if !present.contains(&key) {
            tracing::info!(service = %key, "BalancedService deleted; probes stopped");
            forget(ctx, &key);
        }
    }
}

async fn announce(ctx: &Ctx, t: &Transition) {
    let reference = ctx
        .views
        .lock()
        .expect("views lock")
        .get(&t.service)
        .and_then(|v| v.reference.clone());
    let Some(reference) = reference else { return };
    let (type_, reason) = match t.to {
        Health::Healthy => (EventType::Normal, "EndpointHealthy"),
        _ => (EventType::Warning, "EndpointUnhealthy"),
    };
    let note = match &t.error {
        Some(e) => format!("{} {} -> {}: {e}", t.endpoint, t.from, t.to),
        None => format!("{} {} -> {}", t.endpoint, t.from, t.to),
    };
    publish(ctx, &reference, type_, reason, "Probe", note).await;
}

/// Writes one object's status (and healthy EndpointSlice) if it changed; false on API failure.
async fn flush(ctx: &Ctx, key: &ServiceKey) -> bool {
    let Some(view) = ctx.views.lock().expect("views lock").get(key).cloned() else {
        return true;
    };
    let states: HashMap<_, _> = ctx.prober.states(key).into_iter().collect();
    let endpoints: Vec<EndpointView> = view
        .endpoints
        .iter()
        .map(|d| EndpointView {
            addr: d.addr,
            target_ref: d.target_ref.clone(),
            zone: d.zone.clone(),
            ready: d.ready,
            terminating: d.terminating,
            ports: d.ports.clone(),
            backends: d.backends.clone(),
            health: states.get(&d.addr).cloned().unwrap_or_default(),
        })
        .collect();
    let now = rfc3339(std::time::SystemTime::now());
    let seen = Observed {
        generation: view.generation,
        endpoints: &endpoints,
        listeners: &view.listeners,
        invalid: view.invalid.as_deref(),
        proxy: view.proxy.clone(),
        groups: view
            .config
            .as_ref()
            .filter(|c| !c.backends.is_empty())
            .map(|c| (0..=c.backends.len()).map(|i| c.group_name(i).to_string()).collect())
            .unwrap_or_default(),
    };
    let status = assemble(&seen, view.written.as_ref(), &now);
    let mut ok = true;
    if view.written.as_ref() != Some(&status) {
        let api = Api::<BalancedService>::namespaced(ctx.client.clone(), &key.namespace);
        let patch = serde_json::json!({ "status": status });
        let params = PatchParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..Default::default()
        };
        let result = api.patch_status(&key.name, &params, &Patch::Merge(&patch)).await;
        let outcome = if result.is_ok() { "success" } else { "error" };
        ctx.metrics
            .controller
            .status_writes
            .get_or_create(&crate::metrics::ResultLabels { result: outcome })
            .inc();
        match result {
            Ok(_) => {
                if let Some(v) = ctx.views.lock().expect("views lock").get_mut(key) {
                    v.written = Some(status.clone());
                }
            }
            Err(e) => {
                tracing::warn!(service = %key, error = %e, "status write failed; will retry");
                ok = false;
            }
        }
    }
    if let Some(cfg) = view.config.as_ref().filter(|c| c.publish_endpoint_slice) {
        let wanted: Vec<(String, bool)> = endpoints
            .iter()
            .map(|e| (e.addr.to_string(), e.serves() && !e.health.agent.draining()))
            .collect();
        if view.slice_written.as_ref() != Some(&wanted) {
            let slice = healthy_slice(key, cfg, view.owner.clone(), &endpoints);
            let api = Api::<EndpointSlice>::namespaced(ctx.client.clone(), &key.namespace);
            let params = PatchParams::apply(FIELD_MANAGER).force();
            match api
                .patch(&healthy_name(&key.name), &params, &Patch::Apply(&slice))
                .await
            {
                Ok(_) => {
                    if let Some(v) = ctx.views.lock().expect("views lock").get_mut(key) {
                        v.slice_written = Some(wanted);
                    }
                }
                Err(e) => {
                    tracing::warn!(service = %key, error = %e, "healthy EndpointSlice write failed; will retry");
                    ok = false;
                }
            }
        }
    }
    ok
}

/// The EndpointSlice of `<name>-healthy`: every endpoint, `ready` following the probes.
pub fn healthy_slice(
    key: &ServiceKey,
    cfg: &Config,
    owner: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference>,
    endpoints: &[EndpointView],
) -> EndpointSlice {
    let v6 = endpoints.first().is_some_and(|e| e.addr.is_ipv6());
    let name = healthy_name(&key.name);
    let mut labels = super::desired::labels(&key.name);
    labels.insert(SERVICE_NAME_LABEL.into(), name.clone());
    labels.insert("endpointslice.kubernetes.io/managed-by".into(), "balanced.dev".into());
    EndpointSlice {
        metadata: ObjectMeta {
            name: Some(name),
            namespace: Some(key.namespace.clone()),
            labels: Some(labels),
            owner_references: owner.map(|o| vec![o]),
            ..Default::default()
        },
        address_type: if v6 { "IPv6" } else { "IPv4" }.into(),
        endpoints: Some(
            endpoints
                .iter()
                .filter(|e| e.addr.is_ipv6() == v6)
                .map(|e| Endpoint {
                    addresses: vec![e.addr.ip().to_string()],
                    conditions: Some(EndpointConditions {
                        // A draining endpoint is serving but not ready, as a terminating pod is.
                        ready: Some(e.serves() && !e.health.agent.draining()),
                        serving: Some(e.health.health == Health::Healthy),
                        terminating: Some(e.terminating),
                    }),
                    zone: e.zone.clone(),
                    ..Default::default()
                })
                .collect(),
        ),
        ports: Some(
            cfg.listeners
                .first()
                .map(|l| EndpointPort {
                    name: Some(l.name.clone()),
                    port: endpoints.first().map(|e| i32::from(e.addr.port())),
                    protocol: Some("TCP".into()),
                    ..Default::default()
                })
                .into_iter()
                .collect(),
        ),
    }
}

/// Settings of `balanced controller`.
#[derive(Clone, Debug)]
pub struct ControllerOptions {
    /// Image and default resources of the proxies it creates.
    pub render: RenderOptions,
    /// Leader election; `None` runs without (a single replica).
    pub lease: Option<super::leader::LeaseConfig>,
}

struct ControllerAdmin {
    metrics: Arc<Metrics>,
    leading: Leading,
    balancers: Mutex<HashMap<ServiceKey, Arc<crate::balance::Balancer>>>,
}

impl crate::proxy::admin::AdminView for ControllerAdmin {
    fn status(&self) -> String {
        serde_json::json!({ "leader": self.metrics.controller.leader.get() == 1 }).to_string()
    }
    fn ready(&self) -> bool {
        true
    }
    fn metrics(&self) -> String {
        self.metrics.encode()
    }

    fn pick(&self, key: &ServiceKey, hash: Option<&str>) -> Result<std::net::SocketAddr, (http::StatusCode, String)> {
        let (config, members) = self.leading.members(key)?;
        let n = members.len();
        // One balancer per service, kept between calls: round robin's
        // cursor moves on from one assignment to the next.
        let balancer = self
            .balancers
            .lock()
            .expect("balancers lock")
            .entry(key.clone())
            .or_default()
            .clone();
        balancer.update(config.algorithm.clone(), members, crate::balance::Endpoint::new);
        let snap = balancer.snapshot();
        let hash = match (&config.algorithm, hash) {
            (crate::api::config::Algorithm::ConsistentHash(_), Some(k)) => {
                Some(crate::balance::picker::hash_key(k.as_bytes()))
            }
            _ => None,
        };
        match balancer.assign(&snap, config.health.reports_load(), hash, crate::balance::now_ms()) {
            Some(i) => Ok(snap.members[i].spec.addr),
            None => Err((
                http::StatusCode::SERVICE_UNAVAILABLE,
                format!("no healthy endpoint in {key} (0/{n} serving)\n"),
            )),
        }
    }
}

/// `balanced controller`: waits for leadership, runs the controller while it
/// leads, stands by again if it loses the Lease, releases it on shutdown.
pub async fn serve(
    client: Client,
    opts: ControllerOptions,
    admin: tokio::net::TcpListener,
    xds: Option<tokio::net::TcpListener>,
    shutdown: CancellationToken,
) {
    let metrics = Arc::new(Metrics::new());
    let leading = Leading::default();
    let view = Arc::new(ControllerAdmin {
        metrics: metrics.clone(),
        leading: leading.clone(),
        balancers: Mutex::new(HashMap::new()),
    });
    if let Some(listener) = xds {
        let l = leading.clone();
        let snapshots = crate::xds::publish(move || l.xds_services(), leading.changes(), shutdown.clone());
        tokio::spawn(crate::xds::serve(listener, snapshots, shutdown.clone()));
    }
    let admin_task = tokio::spawn(crate::proxy::admin::serve(admin, view, shutdown.clone()));
    loop {
        if let Some(cfg) = &opts.lease
            && !super::leader::acquire(client.clone(), cfg, &shutdown).await
        {
            break;
        }
        let lead = shutdown.child_token();
        metrics.controller.leader.set(1);
        // Renewal runs inside this future, not as a detached task: whatever ends
        // the controller ends the renewals, and a lost Lease ends the controller.
        let renewing = async {
            match &opts.lease {
                Some(cfg) => super::leader::renew(client.clone(), cfg, &lead).await,
                None => lead.cancelled().await,
            }
        };
        tokio::join!(
            run_leading(
                client.clone(),
                opts.render.clone(),
                metrics.clone(),
                lead.clone(),
                &leading
            ),
            renewing
        );
        metrics.controller.leader.set(0);
        if shutdown.is_cancelled() {
            break;
        }
        tracing::warn!("leadership lost; standing by");
    }
    if let Some(cfg) = &opts.lease {
        super::leader::release(client, cfg).await;
    }
    let _ = admin_task.await;
}

/// The backoff of every watch; a minute without errors starts it over.
fn watch_backoff() -> ResetTimerBackoff<WatchBackoff> {
    ResetTimerBackoff::new(WatchBackoff::default(), Duration::from_secs(60))
}

/// Watch retry delays: 250 ms doubling to 10 s, each with up to 50% jitter so
/// replicas do not retry in step.
#[derive(Debug)]
struct WatchBackoff {
    next: Duration,
}

impl WatchBackoff {
    const FIRST: Duration = Duration::from_millis(250);
    const MAX: Duration = Duration::from_secs(10);
}

impl Default for WatchBackoff {
    fn default() -> Self {
        Self { next: Self::FIRST }
    }
}

impl Iterator for WatchBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let base = self.next;
        self.next = (base * 2).min(Self::MAX);
        Some(base.mul_f64(1.0 + rand::random::<f64>() * 0.5))
    }
}

impl Backoff for WatchBackoff {
    fn reset(&mut self) {
        self.next = Self::FIRST;
    }
}

#[cfg(test)]
mod backoff_tests {
    use super::*;

    #[test]
    fn watch_backoff_doubles_to_ten_seconds_with_jitter_and_resets() {
        let mut b = WatchBackoff::default();
        let delays: Vec<Duration> = (0..8).map(|_| b.next().unwrap()).collect();
        let bases = [250, 500, 1000, 2000, 4000, 8000, 10_000, 10_000].map(Duration::from_millis);
        for (d, base) in delays.iter().zip(bases) {
            assert!(
                *d >= base && *d <= base.mul_f64(1.5),
                "{d:?} not within [{base:?}, 1.5x]"
            );
        }
        b.reset();
        assert!(b.next().unwrap() < Duration::from_millis(400));
    }
}
