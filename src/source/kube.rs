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
use crate::proxy::admin::{self, AdminView};
use crate::proxy::{Dataplane, Serving};

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
        out.push(MemberSpec {
            addr,
            weight: st.map_or(1, |s| s.weight),
            backup: st.is_some_and(|s| s.backup),
            max_connections: st.map_or(0, |s| s.max_connections),
            healthy: e.healthy,
        });
    }
    // Before the controller's first status, static endpoints are all there is.
    for e in &cfg.endpoints {
        if !out.iter().any(|m| m.addr == e.addr) {
            out.push(MemberSpec {
                addr: e.addr,
                weight: e.weight,
                backup: e.backup,
                max_connections: e.max_connections,
                healthy: false,
            });
        }
    }
    out
}

struct ProxyState {
    key: ServiceKey,
    dataplane: Dataplane,
    metrics: Arc<Metrics>,
    has_snapshot: AtomicBool,
    draining: AtomicBool,
    last: std::sync::Mutex<Option<serde_json::Value>>,
}

impl AdminView for ProxyState {
    fn status(&self) -> String {
        let live = self.dataplane.live(&self.key);
        let endpoints: Vec<_> = live
            .iter()
            .map(|(addr, l)| {
                serde_json::json!({
                    "address": addr.ip().to_string(), "port": addr.port(),
                    "activeConnections": l.active, "ejected": l.ejected_for.is_some(),
                })
            })
            .collect();
        serde_json::json!({
            "services": [{ "namespace": self.key.namespace, "name": self.key.name, "endpoints": endpoints }],
            "lastApplied": self.last.lock().expect("last lock").clone(),
        })
        .to_string()
    }
    fn ready(&self) -> bool {
        self.has_snapshot.load(Ordering::Relaxed) && !self.draining.load(Ordering::Relaxed)
    }
    fn metrics(&self) -> String {
        self.metrics.encode()
    }
}

/// Watches the BalancedService and serves it until `shutdown`.
pub async fn run_proxy(client: Client, opts: ProxyOptions, admin_listener: TcpListener, shutdown: CancellationToken) {
    let stop = CancellationToken::new();
    let metrics = Arc::new(Metrics::new());
    let state = Arc::new(ProxyState {
        key: opts.key.clone(),
        dataplane: Dataplane::new(metrics.proxy.clone(), opts.bind, opts.serving.clone(), stop.clone()),
        metrics,
        has_snapshot: AtomicBool::new(false),
        draining: AtomicBool::new(false),
        last: std::sync::Mutex::new(None),
    });
    let admin_task = tokio::spawn(admin::serve(admin_listener, state.clone(), stop.clone()));
    let api: Api<BalancedService> = Api::namespaced(client, &opts.key.namespace);
    let config = watcher::Config::default().fields(&format!("metadata.name={}", opts.key.name));
    // default_backoff: watch errors (API server gone, 410 Gone) restart the
    // watch with backoff; the snapshot stays while they do.
    let mut objects = std::pin::pin!(watcher(api, config).default_backoff().applied_objects());
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            next = objects.next() => match next {
                Some(Ok(bsvc)) => apply(&state, &bsvc),
                Some(Err(e)) => tracing::warn!(error = %e, "watch failed; serving the last snapshot"),
                None => break,
            },
        }
    }
    state.draining.store(true, Ordering::Relaxed);
    if !opts.drain_delay.is_zero() {
        tokio::time::sleep(opts.drain_delay).await;
    }
    stop.cancel();
    state.dataplane.stopped().await;
    let _ = admin_task.await;
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

fn apply(state: &ProxyState, bsvc: &BalancedService) {
    let cfg = match validate(state.key.clone(), &bsvc.spec) {
        Ok(cfg) => Arc::new(with_status_protocols(cfg, bsvc)),
        Err(errors) => {
            tracing::warn!(service = %state.key, errors = %errors, "invalid spec; serving the last good snapshot");
            return;
        }
    };
    let members = members(&cfg, bsvc);
    let healthy = members.iter().filter(|m| m.healthy).count();
    for e in state.dataplane.apply(std::slice::from_ref(&cfg)) {
        tracing::error!(error = %e, "listener not changed");
    }
    state.dataplane.set_endpoints(cfg.clone(), members.clone());
    tracing::info!(service = %state.key, algorithm = cfg.algorithm.name(), endpoints = members.len(), healthy, "snapshot applied");
    *state.last.lock().expect("last lock") = Some(serde_json::json!({
        "generation": bsvc.metadata.generation,
        "algorithm": cfg.algorithm.name(),
        "endpoints": members.len(),
        "healthy": healthy,
    }));
    state.has_snapshot.store(true, Ordering::Relaxed);
}
