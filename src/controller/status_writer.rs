//! The status writer: turns probe transitions and reconciles into at most one
//! status patch per changed object and one write per changed healthy slice
//! every [`STATUS_PERIOD`], whatever happened in the period; events go to
//! their own queue and never stand in front of a write.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::runtime::reflector::Store;
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;

use super::desired::FIELD_MANAGER;
use super::reconcile::{Ctx, forget, key_of};
use super::slices::{self, SliceEndpoint};
use super::status::{EndpointView, Observed, assemble, slice_endpoint};
use crate::api::BalancedService;
use crate::api::config::ServiceKey;
use crate::health::Transition;
use crate::health::report::rfc3339;
use crate::metrics::ResultLabels;

/// How often dirty statuses are flushed: at most one write per object per period.
pub const STATUS_PERIOD: Duration = Duration::from_millis(500);

/// Flushes the objects marked dirty (by reconciles, transitions and agent
/// reports) once per [`STATUS_PERIOD`], sums the period's transitions up into
/// events, and drops probing of objects that left the store.
pub(crate) async fn status_writer(
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
    let mut period: Vec<Transition> = Vec::new();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            Some(key) = dirty_rx.recv() => { dirty.insert(key); }
            t = transitions.recv() => match t {
                Ok(t) => {
                    dirty.insert(t.service.clone());
                    period.push(t);
                }
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    dirty.extend(ctx.prober.services());
                    tracing::debug!(missed = n, "transitions missed for events; status is rebuilt from probe states");
                }
                Err(broadcast::error::RecvError::Closed) => return,
            },
            Ok(()) = generation.changed() => {
                dirty.extend(ctx.prober.take_changed());
            }
            _ = tick.tick() => {
                sweep(&ctx, &store);
                announce(&ctx, &period);
                period.clear();
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

/// Queues the period's transitions as one event per object and reason.
fn announce(ctx: &Ctx, period: &[Transition]) {
    if period.is_empty() {
        return;
    }
    for note in super::events::summarize(period) {
        let reference = ctx
            .views
            .lock()
            .expect("views lock")
            .get(&note.key)
            .and_then(|v| v.reference.clone());
        if let Some(reference) = reference {
            ctx.events.send(note, reference);
        }
    }
}

/// Writes one object's status and its changed healthy slices; false on API failure.
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
    let panic_threshold = view.config.as_ref().map_or(0, |c| c.panic_threshold);
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
        panic_threshold,
        unverified_tls: view.config.as_ref().filter(|c| c.backend_tls.any()).map(|c| {
            (0..c.backend_tls.0.len())
                .filter(|&i| c.backend_tls.0[i].as_ref().is_some_and(|t| t.insecure_skip_verify))
                .map(|i| c.group_name(i).to_string())
                .collect()
        }),
    };
    let status = assemble(&seen, view.written.as_ref(), &now);
    let mut ok = true;
    if view.written.as_ref() != Some(&status) {
        let api = Api::<BalancedService>::namespaced(ctx.client.clone(), &key.namespace);
        let patch = serde_json::json!({ "status": status_patch(&status, view.written.as_ref()) });
        let params = PatchParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..Default::default()
        };
        let result = api.patch_status(&key.name, &params, &Patch::Merge(&patch)).await;
        count(&ctx.metrics.controller.status_writes, result.is_ok());
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
    // The slices follow only a valid spec's endpoints: an invalid one keeps
    // the last good set serving.
    if view.config.is_some() {
        let serving = endpoints.iter().filter(|e| e.serves()).count();
        let panic = crate::balance::in_panic(panic_threshold, serving, endpoints.len());
        let wanted: Vec<SliceEndpoint> = endpoints.iter().map(|e| slice_endpoint(e, panic)).collect();
        ok &= write_slices(ctx, key, &view, &wanted).await;
    }
    ok
}

/// Applies the healthy slices whose content changed and deletes the ones
/// left empty; the assignment keeps every endpoint in the slice that held it.
async fn write_slices(ctx: &Ctx, key: &ServiceKey, view: &super::reconcile::View, wanted: &[SliceEndpoint]) -> bool {
    let (previous, mut written) = view.slices.clone().unwrap_or_default();
    let assignment = slices::assign(&key.name, &previous, wanted, ctx.max_per_slice);
    let by_addr: HashMap<_, _> = wanted.iter().map(|e| (e.addr, e)).collect();
    let api = Api::<EndpointSlice>::namespaced(ctx.client.clone(), &key.namespace);
    let mut ok = true;
    for (name, addrs) in &assignment {
        let slice = slices::render(key, name, view.owner.clone(), addrs, &by_addr);
        let content = slices::content(&slice);
        if written.get(name) == Some(&content) {
            continue;
        }
        let params = PatchParams::apply(FIELD_MANAGER).force();
        let result = api.patch(name, &params, &Patch::Apply(&slice)).await;
        count(&ctx.metrics.controller.slice_writes, result.is_ok());
        match result {
            Ok(_) => {
                written.insert(name.clone(), content);
            }
            Err(e) => {
                tracing::warn!(service = %key, slice = %name, error = %e, "healthy EndpointSlice write failed; will retry");
                // Forget what it held, so the next flush writes it again.
                written.remove(name);
                ok = false;
            }
        }
    }
    let gone: Vec<String> = written
        .keys()
        .chain(previous.keys())
        .filter(|n| !assignment.contains_key(*n))
        .cloned()
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    for name in gone {
        let result = api.delete(&name, &DeleteParams::default()).await;
        let ok_or_gone = match &result {
            Ok(_) => true,
            Err(kube::Error::Api(e)) if e.code == 404 => true,
            Err(_) => false,
        };
        count(&ctx.metrics.controller.slice_writes, ok_or_gone);
        if ok_or_gone {
            written.remove(&name);
        } else {
            tracing::warn!(service = %key, slice = %name, "emptied healthy EndpointSlice not deleted; will retry");
            ok = false;
        }
    }
    // Deletions that failed stay in the assignment as empty slices to retry.
    let mut kept: BTreeMap<String, Vec<std::net::SocketAddr>> = assignment;
    for name in written.keys() {
        kept.entry(name.clone()).or_default();
    }
    if let Some(v) = ctx.views.lock().expect("views lock").get_mut(key) {
        v.slices = Some((kept, written));
    }
    ok
}

/// The merge patch from `previous` to `status`: a field that status leaves
/// out when empty (the not-serving list once all serve) must be sent as
/// null, or a merge patch keeps the old value.
fn status_patch(
    status: &crate::api::BalancedServiceStatus,
    previous: Option<&crate::api::BalancedServiceStatus>,
) -> serde_json::Value {
    let mut patch = serde_json::to_value(status).unwrap_or_default();
    let old = previous.and_then(|p| serde_json::to_value(p).ok()).unwrap_or_default();
    if let (Some(patch), Some(old)) = (patch.as_object_mut(), old.as_object()) {
        for key in old.keys() {
            if !patch.contains_key(key) {
                patch.insert(key.clone(), serde_json::Value::Null);
            }
        }
    }
    patch
}

fn count(
    family: &prometheus_client::metrics::family::Family<ResultLabels, prometheus_client::metrics::counter::Counter>,
    ok: bool,
) {
    family
        .get_or_create(&ResultLabels {
            result: if ok { "success" } else { "error" },
        })
        .inc();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_field_status_drops_is_sent_as_null() {
        let mut before = crate::api::BalancedServiceStatus {
            endpoints_omitted: 3,
            ..Default::default()
        };
        before.endpoints.push(crate::api::spec::EndpointStatus {
            address: "10.0.0.1".into(),
            port: 80,
            backends: Vec::new(),
            target_ref: None,
            zone: None,
            state: "Unhealthy".into(),
            kubernetes: None,
            last_transition_time: None,
            last_error: None,
            draining: false,
        });
        let patch = status_patch(&crate::api::BalancedServiceStatus::default(), Some(&before));
        assert_eq!(patch["endpoints"], serde_json::Value::Null);
        assert!(patch.as_object().unwrap().contains_key("endpoints"));
        assert!(patch.as_object().unwrap().contains_key("endpointsOmitted"));
        assert_eq!(patch["readyEndpoints"], 0);
    }
}
