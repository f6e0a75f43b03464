//! The leading replica: the controller loop (reconciles, the status writer,
//! the event sender) while this replica holds the Lease, and the state the
//! assign API and the xDS server answer from while it does.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::Api;
use kube::runtime::controller::Controller;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::utils::{Backoff, ResetTimerBackoff};
use kube::runtime::{WatchStreamExt, predicates, watcher};
use kube::{Client, ResourceExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::desired::RenderOptions;
use super::discovery::SERVICE_NAME_LABEL;
use super::reconcile::{Ctx, View, error_policy, reconcile};
use super::status_writer::status_writer;
use crate::api::BalancedService;
use crate::api::config::{Config, ServiceKey};
use crate::health::{Health, Prober};
use crate::metrics::Metrics;

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
        let states: HashMap<_, _> = ctx.prober.states(key).into_iter().collect();
        let observed = svc.endpoints.iter().map(|e| crate::balance::Observed {
            addr: e.addr,
            healthy: e.health == Health::Healthy && !e.not_ready,
            draining: e.draining,
            weight_percent: states.get(&e.addr).map_or(100, |s| s.agent.weight_percent),
            ports: e.ports.clone(),
            groups: 1,
        });
        let members = crate::balance::members(&svc.config, observed);
        Ok((svc.config, members))
    }
}

/// One BalancedService's `default` endpoints as lookaside clients see them
/// (xDS and the assign API); `None` while its spec is invalid.
fn lookaside(ctx: &Ctx, key: &ServiceKey, view: &View) -> Option<crate::xds::Service> {
    let config = view.config.clone()?;
    let states: HashMap<_, _> = ctx.prober.states(key).into_iter().collect();
    let statics: HashMap<_, _> = config.endpoints.iter().map(|e| (e.addr, e.weight)).collect();
    let serving = view
        .endpoints
        .iter()
        .filter(|d| d.ready && !d.terminating && states.get(&d.addr).is_some_and(|s| s.health == Health::Healthy))
        .count();
    // Below the panic threshold every endpoint is published as serving, as
    // the proxies and the healthy slices treat them.
    let panic = crate::balance::in_panic(config.panic_threshold, serving, view.endpoints.len());
    let now = std::time::SystemTime::now();
    let endpoints = view
        .endpoints
        .iter()
        .filter(|d| d.backends.is_empty() || d.backends.iter().any(|b| b == "default"))
        .map(|d| {
            let state = states.get(&d.addr).cloned().unwrap_or_default();
            let configured = statics.get(&d.addr).copied().unwrap_or(1);
            let (weight, ramping) = state.published_weight(configured, config.slow_start, now);
            if panic {
                return crate::xds::Endpoint {
                    addr: d.addr,
                    ports: d.ports.clone(),
                    zone: d.zone.clone(),
                    health: Health::Healthy,
                    not_ready: d.terminating,
                    draining: state.agent.draining(),
                    weight,
                    ramping,
                };
            }
            crate::xds::Endpoint {
                addr: d.addr,
                ports: d.ports.clone(),
                zone: d.zone.clone(),
                health: state.health,
                not_ready: !d.ready || d.terminating,
                draining: state.agent.draining(),
                weight,
                ramping,
            }
        })
        .collect();
    Some(crate::xds::Service { config, endpoints })
}

async fn run_leading(
    client: Client,
    opts: &ControllerOptions,
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
    let (events, event_task) = super::events::start(
        Recorder::new(client.clone(), reporter),
        metrics.controller.events_dropped.clone(),
        stop.clone(),
    );
    let ctx = Arc::new(Ctx {
        client: client.clone(),
        prober: prober.clone(),
        secrets: crate::source::secrets::SecretFiles::new(
            client.clone(),
            crate::source::secrets::SecretFiles::default_dir(),
        ),
        render: opts.render.clone(),
        slices: slice_reader,
        views: Mutex::new(HashMap::new()),
        dirty: dirty_tx,
        events,
        max_per_slice: opts.max_endpoints_per_slice,
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
    let _ = event_task.await;
    tracing::debug!("status writer ended");
    prober.stopped().await;
    tracing::debug!("probes ended");
}

/// Settings of `balanced controller`.
#[derive(Clone, Debug)]
pub struct ControllerOptions {
    /// Image and default resources of the proxies it creates.
    pub render: RenderOptions,
    /// Leader election; `None` runs without (a single replica).
    pub lease: Option<super::leader::LeaseConfig>,
    /// Endpoints per healthy EndpointSlice (Kubernetes' `--max-endpoints-per-slice`).
    pub max_endpoints_per_slice: usize,
}

struct ControllerAdmin {
    metrics: Arc<Metrics>,
    leading: Leading,
    balancers: Mutex<HashMap<ServiceKey, Arc<crate::balance::Balancer>>>,
}

impl crate::admin::AdminView for ControllerAdmin {
    /// Every endpoint of every BalancedService as the leader's prober sees
    /// it (state, last error, counts, agent weight): the full table that the
    /// objects' status, kept small, leaves out.
    fn status(&self) -> String {
        let leader = self.metrics.controller.leader.get() == 1;
        let services = self.leading.get().map(|ctx| {
            let keys = ctx.prober.services();
            crate::health::report::report(&ctx.prober, &keys).services
        });
        serde_json::json!({ "leader": leader, "services": services.unwrap_or_default() }).to_string()
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
        balancer.update(
            config.algorithm.clone(),
            config.slow_start,
            members,
            crate::balance::Endpoint::new,
        );
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
    let admin_task = tokio::spawn(crate::admin::serve(admin, view, shutdown.clone()));
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
            run_leading(client.clone(), &opts, metrics.clone(), lead.clone(), &leading),
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
