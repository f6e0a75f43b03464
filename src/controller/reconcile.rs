//! Reconcile one BalancedService: validate its spec, discover its endpoints
//! (each group's Service and static endpoints, each address once), hand them
//! to the one prober seeded from the healthy slices, and apply the owned
//! objects. What the status writer needs is left in the object's [`View`].

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ObjectReference, Service, ServiceAccount};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::reflector::Store;
use kube::{Client, Resource, ResourceExt};
use tokio::sync::mpsc;

use super::desired::{FIELD_MANAGER, Owned, RenderOptions, desired, owner_ref};
use super::discovery::{Discovered, SERVICE_NAME_LABEL, app_protocols, endpoints_from_slices};
use super::events::{Events, Note};
use super::slices::{self, Assignment};
use super::status::seed_from;
use crate::api::config::{Config, ServiceKey};
use crate::api::{BalancedService, BalancedServiceStatus, validate};
use crate::health::{Prober, Target};
use crate::metrics::Metrics;

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
    /// The EndpointSlice watch has not listed yet.
    #[error("EndpointSlices not listed yet")]
    NotListed,
}

/// What the status writer knows of one BalancedService besides probe states.
#[derive(Clone, Debug, Default)]
pub(crate) struct View {
    pub generation: Option<i64>,
    pub owner: Option<OwnerReference>,
    pub reference: Option<ObjectReference>,
    pub config: Option<Arc<Config>>,
    pub endpoints: Vec<Discovered>,
    pub listeners: Vec<crate::api::spec::ListenerStatus>,
    pub invalid: Option<Vec<String>>,
    pub proxy: Option<(bool, String)>,
    /// The status last written (or found at the first reconcile).
    pub written: Option<BalancedServiceStatus>,
    /// Which endpoints each healthy slice holds, and what each slice was
    /// last written with; `None` until read from the existing slices.
    pub slices: Option<(Assignment, BTreeMap<String, serde_json::Value>)>,
}

/// What reconciles, the status writer and the lookaside APIs share.
pub(crate) struct Ctx {
    pub client: Client,
    pub prober: Prober,
    /// The Secrets endpoint TLS names, written for the prober's connectors.
    pub secrets: Arc<crate::source::secrets::SecretFiles>,
    pub render: RenderOptions,
    pub slices: Store<EndpointSlice>,
    pub views: Mutex<HashMap<ServiceKey, View>>,
    pub dirty: mpsc::UnboundedSender<ServiceKey>,
    pub events: Events,
    pub metrics: Arc<Metrics>,
    pub backoff: Mutex<HashMap<ServiceKey, Duration>>,
    pub reconciled: std::sync::atomic::AtomicBool,
    /// Endpoints per healthy slice.
    pub max_per_slice: usize,
    // Bumped when a view changes: what xDS publishes comes from the views as
    // well as from the prober, whose own changes come first.
    pub views_changed: Arc<tokio::sync::watch::Sender<u64>>,
}

impl Ctx {
    /// The slices in the store labelled `kubernetes.io/service-name: service` in `namespace`.
    pub fn slices_of(&self, namespace: &str, service: &str) -> Vec<Arc<EndpointSlice>> {
        self.slices
            .state()
            .into_iter()
            .filter(|s| {
                s.metadata.namespace.as_deref() == Some(namespace)
                    && s.labels().get(SERVICE_NAME_LABEL).map(String::as_str) == Some(service)
            })
            .collect()
    }

    /// Our own healthy slices of `key`, as the store has them.
    pub fn healthy_slices(&self, key: &ServiceKey) -> Vec<Arc<EndpointSlice>> {
        self.slices_of(&key.namespace, &slices::healthy_name(&key.name))
            .into_iter()
            .filter(|s| {
                s.labels()
                    .get("endpointslice.kubernetes.io/managed-by")
                    .map(String::as_str)
                    == Some(slices::MANAGED_BY)
            })
            .collect()
    }
}

pub(crate) fn key_of(bsvc: &BalancedService) -> ServiceKey {
    ServiceKey::new(bsvc.namespace().unwrap_or_else(|| "default".into()), bsvc.name_any())
}

pub(crate) async fn reconcile(bsvc: Arc<BalancedService>, ctx: Arc<Ctx>) -> Result<Action, Error> {
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
                let note = Note {
                    key: key.clone(),
                    warning: true,
                    reason: "InvalidSpec",
                    action: "Validate",
                    count: 1,
                    text: messages.join("; "),
                };
                ctx.events.send(note, reference);
            }
            // The last good config keeps being probed and served.
            return Ok(Action::requeue(Duration::from_secs(300)));
        }
    };

    // Discovery and the seeds both read the slice store: before its first
    // list it would say "no endpoints" and "nothing healthy".
    if tokio::time::timeout(Duration::from_secs(10), ctx.slices.wait_until_ready())
        .await
        .is_err()
    {
        return Err(Error::NotListed);
    }
    let mut listeners = Vec::new();
    let mut groups = Vec::new();
    for group in 0..=cfg.backends.len() {
        let (service, statics) = match group {
            0 => (cfg.service.as_ref(), &cfg.endpoints),
            i => (cfg.backends[i - 1].service.as_ref(), &cfg.backends[i - 1].endpoints),
        };
        let found = match service {
            Some(svc) => {
                let owned: Vec<EndpointSlice> = ctx
                    .slices_of(&key.namespace, svc)
                    .iter()
                    .map(|s| (**s).clone())
                    .collect();
                if group == 0 {
                    listeners = app_protocols(&owned, &cfg.listeners);
                }
                endpoints_from_slices(&owned, &cfg.listeners)
            }
            None => Vec::new(),
        };
        groups.push((
            cfg.group_name(group).to_string(),
            found,
            statics.iter().map(|e| e.addr).collect(),
        ));
    }
    let discovered = merge_groups(groups, !cfg.backends.is_empty());

    // A new leader starts each endpoint from what the healthy slices (and
    // the not-serving list in status) say, so nothing flaps back to Unknown.
    let previous = bsvc.status.as_ref();
    let healthy_slices = ctx.healthy_slices(key);
    let slice_refs: Vec<&EndpointSlice> = healthy_slices.iter().map(|s| &**s).collect();
    let in_slices: HashMap<_, _> = slices::read(&slice_refs).into_iter().map(|e| (e.addr, e)).collect();
    let targets: Vec<Target> = discovered
        .iter()
        .map(|d| Target {
            addr: d.addr,
            seed: seed_from(in_slices.get(&d.addr), previous, d.addr),
            groups: d
                .backends
                .iter()
                .filter_map(|b| cfg.group_index(b))
                .fold(0u64, |mask, g| mask | 1 << g)
                .max(1),
        })
        .collect();
    // Checks speak the endpoints' TLS, whose Secrets are written as files
    // (a check fails with the reason until they are).
    ctx.secrets.want(key, cfg.endpoint_secret_names());
    let tls = cfg
        .backend_tls
        .with_secret_files(&|name| ctx.secrets.dir_of(&key.namespace, name));
    ctx.prober.update_service(key, &cfg.health, &tls, &targets);

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
        if view.slices.is_none() {
            let written = slice_refs
                .iter()
                .filter_map(|s| Some((s.metadata.name.clone()?, slices::content(s))))
                .collect();
            view.slices = Some((slices::assignment_of(&slice_refs), written));
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

/// Every group's endpoints (its Service's, then its static ones not found
/// there), each address once with the groups it is in, sorted. Without
/// `spec.backends` every endpoint is `default`'s and names no group.
pub fn merge_groups(
    groups: Vec<(String, Vec<Discovered>, Vec<std::net::SocketAddr>)>,
    has_backends: bool,
) -> Vec<Discovered> {
    let mut out: Vec<Discovered> = Vec::new();
    let mut index: HashMap<std::net::SocketAddr, usize> = HashMap::new();
    for (name, found, statics) in groups {
        let mut in_group: std::collections::HashSet<std::net::SocketAddr> = std::collections::HashSet::new();
        let statics = statics.into_iter().map(|addr| Discovered {
            addr,
            target_ref: None,
            zone: None,
            ready: true,
            terminating: false,
            ports: Vec::new(),
            backends: Vec::new(),
        });
        for d in found.into_iter().chain(statics) {
            if !in_group.insert(d.addr) {
                continue;
            }
            match index.get(&d.addr) {
                Some(&i) => out[i].backends.push(name.clone()),
                None => {
                    index.insert(d.addr, out.len());
                    let mut d = d;
                    d.backends.push(name.clone());
                    out.push(d);
                }
            }
        }
    }
    if !has_backends {
        for d in &mut out {
            d.backends.clear();
        }
    }
    out.sort_by_key(|d| d.addr);
    out
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

pub(crate) fn error_policy(bsvc: Arc<BalancedService>, error: &Error, ctx: Arc<Ctx>) -> Action {
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

pub(crate) fn forget(ctx: &Ctx, key: &ServiceKey) {
    ctx.prober.remove_service(key);
    ctx.secrets.want(key, Default::default());
    ctx.views.lock().expect("views lock").remove(key);
    ctx.views_changed.send_modify(|g| *g += 1);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn found(i: u8) -> Discovered {
        Discovered {
            addr: ([10, 0, 0, i], 80).into(),
            target_ref: Some(format!("pod/p{i}")),
            zone: None,
            ready: true,
            terminating: false,
            ports: Vec::new(),
            backends: Vec::new(),
        }
    }

    #[test]
    fn groups_merge_each_address_once_with_its_groups() {
        let static_addr = ([10, 0, 0, 9], 80).into();
        let merged = merge_groups(
            vec![
                (
                    "default".into(),
                    vec![found(2), found(1)],
                    vec![static_addr, found(1).addr],
                ),
                ("api".into(), vec![found(2), found(3)], vec![]),
            ],
            true,
        );
        let got: Vec<(u8, Vec<String>, bool)> = merged
            .iter()
            .map(|d| {
                let std::net::IpAddr::V4(ip) = d.addr.ip() else {
                    unreachable!()
                };
                (ip.octets()[3], d.backends.clone(), d.target_ref.is_some())
            })
            .collect();
        assert_eq!(
            got,
            vec![
                (1, vec!["default".to_string()], true),
                (2, vec!["default".to_string(), "api".to_string()], true),
                (3, vec!["api".to_string()], true),
                (9, vec!["default".to_string()], false),
            ]
        );
        let plain = merge_groups(vec![("default".into(), vec![found(1)], vec![])], false);
        assert!(plain[0].backends.is_empty());
    }
}
