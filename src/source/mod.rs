//! Where configuration comes from, and the one shape it reaches the data
//! plane in ([`Change`]): a file probed by our own prober ([`file`]), the
//! cluster (one BalancedService and the healthy EndpointSlices the controller
//! writes for it, [`kube`]), or a fixed list ([`StaticSource`]). Whatever the
//! source, endpoints become balancer members through
//! [`crate::balance::members`], and `/status` is rendered by [`add_live`].

pub mod file;
pub mod kube;
pub mod secrets;

use std::collections::VecDeque;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use crate::api::config::{Config, ServiceKey};
use crate::balance::MemberSpec;
use crate::proxy::Dataplane;

/// A change a source hands to the runtime.
#[derive(Clone, Debug)]
pub enum Change {
    /// Every service now configured; services not in the list are removed,
    /// listeners that stay keep their sockets.
    Services(Vec<Arc<Config>>),
    /// A service's endpoints and their health: a new snapshot for its balancer.
    Endpoints(Arc<Config>, Vec<MemberSpec>),
}

/// Where configuration comes from: a file, the cluster, a fixed list.
pub trait Source: Send + 'static {
    /// Called once before the first change, with the data plane the changes go to.
    fn attach(&mut self, _dataplane: &Arc<Dataplane>) {}
    /// The next change; `None` when the source has ended for good.
    fn next(&mut self) -> impl Future<Output = Option<Change>> + Send;
    /// What `/status` and `/readyz` show of this source.
    fn view(&self) -> Arc<dyn SourceView>;
    /// Stops what the source runs (probes, watches), after the listeners drained.
    fn stop(self) -> impl Future<Output = ()> + Send;
}

/// The admin server's view of a source.
pub trait SourceView: Send + Sync + 'static {
    /// The `/status` document.
    fn status(&self, dataplane: &Dataplane) -> serde_json::Value;
    /// Whether the source has given something worth serving (`/readyz`).
    fn ready(&self) -> bool {
        true
    }
}

/// A source that hands out a fixed list of changes, then waits: for tests and
/// for embedding the proxy with a configuration built in code.
#[derive(Debug, Default)]
pub struct StaticSource {
    changes: VecDeque<Change>,
}

impl StaticSource {
    /// The services `configs`, each with its `members`.
    pub fn new(services: Vec<(Arc<Config>, Vec<MemberSpec>)>) -> Self {
        let mut changes = VecDeque::new();
        changes.push_back(Change::Services(services.iter().map(|(c, _)| c.clone()).collect()));
        changes.extend(services.into_iter().map(|(c, m)| Change::Endpoints(c, m)));
        Self { changes }
    }
}

struct StaticView;

impl SourceView for StaticView {
    fn status(&self, _: &Dataplane) -> serde_json::Value {
        serde_json::json!({ "source": "static" })
    }
}

impl Source for StaticSource {
    async fn next(&mut self) -> Option<Change> {
        match self.changes.pop_front() {
            Some(c) => Some(c),
            None => std::future::pending().await,
        }
    }

    fn view(&self) -> Arc<dyn SourceView> {
        Arc::new(StaticView)
    }

    async fn stop(self) {}
}

/// Adds what the data plane knows to a `/status` document whose `services`
/// follow `keys`: each endpoint's `activeConnections` and `ejected` (an
/// endpoint the source did not list is added with its address and port),
/// and each service's `requestsInFlight` and `requestsWaiting` (overload
/// protection).
pub fn add_live(value: &mut serde_json::Value, keys: &[ServiceKey], dataplane: &Dataplane) {
    let Some(services) = value.get_mut("services").and_then(|s| s.as_array_mut()) else {
        return;
    };
    for (svc, key) in services.iter_mut().zip(keys) {
        let mut live = dataplane.live(key);
        if !svc["endpoints"].is_array() {
            svc["endpoints"] = serde_json::Value::Array(Vec::new());
        }
        let endpoints = svc["endpoints"].as_array_mut().expect("made an array above");
        for ep in endpoints.iter_mut() {
            let addr = ep["address"]
                .as_str()
                .and_then(|ip| ip.parse().ok())
                .zip(ep["port"].as_u64().and_then(|p| u16::try_from(p).ok()))
                .map(|(ip, port)| SocketAddr::new(ip, port));
            if let Some(l) = addr.and_then(|a| live.remove(&a)) {
                ep["activeConnections"] = l.active.into();
                ep["ejected"] = l.ejected_for.is_some().into();
                if let Some(p) = l.ramp_percent {
                    ep["slowStartPercent"] = p.into();
                }
            }
        }
        let mut rest: Vec<_> = live.into_iter().collect();
        rest.sort_by_key(|(addr, _)| *addr);
        endpoints.extend(rest.into_iter().map(|(addr, l)| {
            serde_json::json!({
                "address": addr.ip().to_string(), "port": addr.port(),
                "activeConnections": l.active, "ejected": l.ejected_for.is_some(),
            })
        }));
        let tls = dataplane.tls_status(key);
        if !tls.is_empty() {
            svc["tls"] = serde_json::Value::Object(tls.into_iter().collect());
        }
        if let Some(runtime) = dataplane.service(key) {
            if let Some(tls) = runtime.backend_tls_status() {
                svc["backendTLS"] = tls;
            }
            svc["requestsInFlight"] = runtime.gate.in_flight().into();
            svc["requestsWaiting"] = runtime.gate.waiting().into();
        }
    }
}
