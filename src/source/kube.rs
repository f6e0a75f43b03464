//! `balanced proxy`: the data plane of one BalancedService, configured by
//! watching that object (spec for config, status for endpoint health).
//!
//! A bad spec or a lost API server never takes away the last good snapshot.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::StreamExt;
use kube::Client;
use kube::api::Api;
use kube::runtime::{WatchStreamExt, watcher};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::api::config::{Config, ServiceKey};
use crate::api::{BalancedService, validate};
use crate::balance::MemberSpec;
use crate::metrics::Metrics;
use crate::proxy::{Dataplane, Serving};
use crate::shell::{self, Change, Source, SourceView};

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

/// The snapshot members a BalancedService's status implies: every endpoint the
/// controller reports, healthy or not (so "all down, try all" still has
/// somewhere to go), with weights and flags of matching static endpoints.
pub fn members(cfg: &Config, bsvc: &BalancedService) -> Vec<MemberSpec> {
    let statics: HashMap<SocketAddr, _> = cfg.endpoints.iter().map(|e| (e.addr, e)).collect();
    let mut out: Vec<MemberSpec> = Vec::new();
    for e in bsvc.status.iter().flat_map(|s| &s.endpoints) {
        let (Ok(ip), Ok(port)) = (e.address.parse::<IpAddr>(), u16::try_from(e.port)) else {
            continue;
        };
        let addr = SocketAddr::new(ip, port);
        let st = statics.get(&addr);
        let percent = e.weight_percent.map_or(100, |p| p.clamp(0, 1000) as u32);
        let agent = crate::health::agent::AgentState {
            weight_percent: percent,
            ..Default::default()
        };
        out.push(MemberSpec {
            draining: e.draining || percent == 0,
            addr,
            weight: agent.scale(st.map_or(1, |s| s.weight)),
            backup: st.is_some_and(|s| s.backup),
            max_connections: st.map_or(0, |s| s.max_connections),
            healthy: e.healthy,
            ports: e
                .ports
                .iter()
                .filter_map(|p| Some((p.listener.clone(), u16::try_from(p.port).ok().filter(|p| *p > 0)?)))
                .collect(),
            groups: group_mask(cfg, &e.backends),
        });
    }
    // Before the controller's first status, static endpoints are all there is.
    for e in &cfg.endpoints {
        if !out.iter().any(|m| m.addr == e.addr) {
            out.push(MemberSpec {
                draining: false,
                addr: e.addr,
                weight: crate::health::agent::AgentState::default().scale(e.weight),
                backup: e.backup,
                max_connections: e.max_connections,
                healthy: false,
                ports: Vec::new(),
                groups: 1,
            });
        }
    }
    out
}

/// One BalancedService watched in the cluster: its spec is the config, its
/// status (written by the controller's prober) the endpoints' health.
pub struct ClusterSource {
    key: ServiceKey,
    objects: std::pin::Pin<Box<dyn futures::Stream<Item = Result<BalancedService, watcher::Error>> + Send>>,
    view: Arc<ClusterView>,
    pending: Option<Change>,
}

struct ClusterView {
    key: ServiceKey,
    has_snapshot: AtomicBool,
    last: std::sync::Mutex<Option<serde_json::Value>>,
    // Why the newest spec is not the one serving, and why the watch is
    // failing, for `/status` (cleared by the next good spec or event).
    rejected: std::sync::Mutex<Option<String>>,
    watch_error: std::sync::Mutex<Option<String>>,
}

impl ClusterSource {
    /// Watches `key` through `client`.
    pub fn new(client: Client, key: ServiceKey) -> Self {
        let api: Api<BalancedService> = Api::namespaced(client, &key.namespace);
        let config = watcher::Config::default().fields(&format!("metadata.name={}", key.name));
        // default_backoff: watch errors (API server gone, 410 Gone) restart the
        // watch with backoff; the snapshot stays while they do.
        let objects = watcher(api, config).default_backoff().applied_objects().boxed();
        Self {
            view: Arc::new(ClusterView {
                key: key.clone(),
                has_snapshot: AtomicBool::new(false),
                last: std::sync::Mutex::new(None),
                rejected: std::sync::Mutex::new(None),
                watch_error: std::sync::Mutex::new(None),
            }),
            key,
            objects,
            pending: None,
        }
    }

    /// The changes an object implies, or `None` (logged) when its spec is invalid.
    fn changes(&self, bsvc: &BalancedService) -> Option<(Change, Change)> {
        let cfg = match validate(self.key.clone(), &bsvc.spec) {
            Ok(mut cfg) => {
                // The limit is the service's: each replica enforces its share.
                cfg.rate_limit = cfg.rate_limit.map(|r| r.per_replica(cfg.replicas));
                for route in &mut cfg.routes {
                    route.rate_limit = route.rate_limit.take().map(|r| r.per_replica(cfg.replicas));
                }
                Arc::new(with_status_protocols(cfg, bsvc))
            }
            Err(errors) => {
                tracing::warn!(service = %self.key, errors = %errors, "invalid spec; serving the last good snapshot");
                *self.view.rejected.lock().expect("rejected lock") = Some(format!(
                    "generation {}: {errors}",
                    bsvc.metadata.generation.unwrap_or_default()
                ));
                return None;
            }
        };
        *self.view.rejected.lock().expect("rejected lock") = None;
        let members = members(&cfg, bsvc);
        let healthy = members.iter().filter(|m| m.healthy).count();
        tracing::info!(service = %self.key, algorithm = cfg.algorithm.name(), endpoints = members.len(), healthy, "snapshot applied");
        *self.view.last.lock().expect("last lock") = Some(serde_json::json!({
            "generation": bsvc.metadata.generation,
            "algorithm": cfg.algorithm.name(),
            "endpoints": members.len(),
            "healthy": healthy,
        }));
        Some((Change::Services(vec![cfg.clone()]), Change::Endpoints(cfg, members)))
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
            let next = self.objects.next().await?;
            *self.view.watch_error.lock().expect("watch error lock") = next.as_ref().err().map(|e| e.to_string());
            match next {
                Ok(bsvc) => {
                    if let Some((services, endpoints)) = self.changes(&bsvc) {
                        self.pending = Some(endpoints);
                        return Some(services);
                    }
                }
                Err(e) => tracing::warn!(error = %e, "watch failed; serving the last snapshot"),
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
        let live = dataplane.live(&self.key);
        let endpoints: Vec<_> = live
            .iter()
            .map(|(addr, l)| {
                serde_json::json!({
                    "address": addr.ip().to_string(), "port": addr.port(),
                    "activeConnections": l.active, "ejected": l.ejected_for.is_some(),
                })
            })
            .collect();
        let (in_flight, waiting) = dataplane
            .service(&self.key)
            .map_or((0, 0), |r| (r.gate.in_flight(), r.gate.waiting()));
        serde_json::json!({
            "services": [{
                "namespace": self.key.namespace, "name": self.key.name, "endpoints": endpoints,
                "requestsInFlight": in_flight, "requestsWaiting": waiting,
            }],
            "lastApplied": self.last.lock().expect("last lock").clone(),
            "lastRejected": self.rejected.lock().expect("rejected lock").clone(),
            "watchError": self.watch_error.lock().expect("watch error lock").clone(),
        })
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

/// The groups an endpoint of status belongs to: the ones it names, or
/// `default` when it names none.
fn group_mask(cfg: &Config, names: &[String]) -> u64 {
    if names.is_empty() {
        return 1;
    }
    names
        .iter()
        .filter_map(|n| cfg.group_index(n))
        .fold(0, |mask, g| mask | 1 << g)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_agent_reports_reach_the_members() {
        let bsvc: BalancedService = serde_json::from_value(serde_json::json!({
            "apiVersion": "balanced.dev/v1alpha1", "kind": "BalancedService",
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"service": "web", "listeners": [{"name": "http", "port": 8080}]},
            "status": {"endpoints": [
                {"address": "10.0.0.1", "port": 80, "healthy": true, "state": "Healthy"},
                {"address": "10.0.0.2", "port": 80, "healthy": true, "state": "Healthy", "weightPercent": 50},
                {"address": "10.0.0.3", "port": 80, "healthy": true, "state": "Healthy", "draining": true},
                {"address": "10.0.0.4", "port": 80, "healthy": true, "state": "Healthy", "weightPercent": 0}
            ]}
        }))
        .unwrap();
        let cfg = crate::api::validate::validate(ServiceKey::new("shop", "web"), &bsvc.spec).unwrap();
        let got: Vec<(u32, bool)> = members(&cfg, &bsvc).iter().map(|m| (m.weight, m.draining)).collect();
        assert_eq!(got, vec![(100, false), (50, false), (100, true), (1, true)]);
    }
}
