//! Every service's runtime and listeners, kept in step with the configs:
//! listeners that stay keep their sockets and connections, new ones are bound,
//! removed ones drain. A listener that cannot be bound is reported and the
//! rest of the change still applies.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::http::HttpProxy;
use super::http::serve::serve_http;
use super::listen::Serving;
use super::service::ServiceRuntime;
use super::tasks::Tasks;
use super::tcp::serve_tcp;
use super::tls::Terminator;
use crate::api::config::{Config, ListenerProtocol, ServiceKey};
use crate::balance::{MemberSpec, now_ms};
use crate::metrics::ProxyMetrics;

/// Live data-plane facts about one endpoint, for `/status`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointLive {
    /// Requests or connections in flight.
    pub active: u64,
    /// Remaining passive ejection, if ejected.
    pub ejected_for: Option<Duration>,
    /// The percent of its weight it takes while it ramps up (slow start).
    pub ramp_percent: Option<u32>,
}

/// A listener that could not be bound.
#[derive(Debug, thiserror::Error)]
#[error("{service}: spec.listeners[{index}] ({listener}): cannot listen on {addr}: {source}")]
pub struct ListenError {
    /// The service.
    pub service: ServiceKey,
    /// Position of the listener in `spec.listeners`.
    pub index: usize,
    /// The listener's name.
    pub listener: String,
    /// The address it asked for.
    pub addr: SocketAddr,
    /// What `bind` or `listen` said.
    pub source: std::io::Error,
}

struct Running {
    port: u16,
    protocol: ListenerProtocol,
    tls: Option<Arc<Terminator>>,
    stop: CancellationToken,
}

/// The data plane of a process: services, their listeners, their endpoints.
pub struct Dataplane {
    metrics: ProxyMetrics,
    bind: IpAddr,
    serving: Serving,
    shutdown: CancellationToken,
    tasks: Tasks,
    services: Mutex<HashMap<ServiceKey, Arc<ServiceRuntime>>>,
    listeners: Mutex<HashMap<(ServiceKey, String), Running>>,
    // When the last passive ejection of any service ends ([`now_ms`]).
    ejections_until: Arc<AtomicU64>,
}

impl Dataplane {
    /// A data plane binding listeners on `bind`; everything stops on `shutdown`.
    pub fn new(metrics: ProxyMetrics, bind: IpAddr, mut serving: Serving, shutdown: CancellationToken) -> Self {
        serving.access_log = serving
            .access_log
            .map(|log| log.with_dropped(metrics.access_log_dropped.clone()));
        Self {
            metrics,
            bind,
            serving,
            shutdown,
            tasks: Tasks::new(),
            services: Mutex::new(HashMap::new()),
            listeners: Mutex::new(HashMap::new()),
            ejections_until: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Brings services and listeners in line with `configs`. Returns the
    /// listeners that could not be bound (the old one, if any, keeps serving).
    pub fn apply(&self, configs: &[Arc<Config>]) -> Vec<ListenError> {
        let mut errors = Vec::new();
        let mut services = self.services.lock().expect("dataplane lock poisoned");
        let mut listeners = self.listeners.lock().expect("dataplane lock poisoned");

        services.retain(|key, _| configs.iter().any(|c| c.key == *key));
        listeners.retain(|(key, name), running| {
            let keep = configs
                .iter()
                .any(|c| c.key == *key && c.listeners.iter().any(|l| l.name == *name));
            if !keep {
                running.stop.cancel();
            }
            keep
        });

        for config in configs {
            let runtime = services
                .entry(config.key.clone())
                .or_insert_with(|| {
                    let runtime = ServiceRuntime::new(config.clone(), self.metrics.clone());
                    runtime.report_ejections_to(self.ejections_until.clone());
                    runtime
                })
                .clone();
            for (i, l) in config.listeners.iter().enumerate() {
                let id = (config.key.clone(), l.name.clone());
                // What the proxy terminates: passthrough has no certificate to hold.
                let terminated = l.tls.as_ref().filter(|t| !t.passthrough);
                let same_tls = |r: &Running| match (&r.tls, terminated) {
                    (None, None) => true,
                    (Some(t), Some(settings)) => t.serves(settings),
                    _ => false,
                };
                if let Some(r) = listeners.get(&id)
                    && r.port == l.port
                    && r.protocol == l.protocol
                    && same_tls(r)
                {
                    continue;
                }
                let addr = SocketAddr::new(self.bind, l.port);
                let failed = |source: std::io::Error| ListenError {
                    service: config.key.clone(),
                    index: i,
                    listener: l.name.clone(),
                    addr,
                    source,
                };
                // Other certificates on the same socket: swapped in for new
                // connections, no rebind (the port is still held).
                if let Some(r) = listeners.get(&id)
                    && r.port == l.port
                    && r.protocol == l.protocol
                    && let (Some(t), Some(settings)) = (&r.tls, terminated)
                {
                    if let Err(e) = t.update(settings) {
                        errors.push(failed(std::io::Error::other(e)));
                    }
                    continue;
                }
                // Certificates first: a listener whose files do not load does
                // not start, and the one it would replace goes on serving.
                let tls = match terminated {
                    None => None,
                    Some(settings) => match Terminator::load(settings, &self.metrics, runtime.label(), &l.name) {
                        Ok(t) => Some(t),
                        Err(e) => {
                            errors.push(failed(std::io::Error::other(e)));
                            continue;
                        }
                    },
                };
                let socket = match bind(addr) {
                    Ok(s) => s,
                    Err(source) => {
                        errors.push(failed(source));
                        continue;
                    }
                };
                if let Some(old) = listeners.remove(&id) {
                    old.stop.cancel();
                }
                let stop = self.shutdown.child_token();
                match l.protocol {
                    ListenerProtocol::Http => {
                        let proxy = Arc::new(HttpProxy::new(
                            runtime.clone(),
                            &l.name,
                            self.serving.access_log.clone(),
                        ));
                        if let Some(t) = &tls {
                            self.tasks.spawn(t.clone().watch(stop.clone()));
                        }
                        self.tasks.spawn(serve_http(
                            socket,
                            proxy,
                            tls.clone(),
                            self.serving.clone(),
                            self.tasks.scope(),
                            stop.clone(),
                        ));
                    }
                    ListenerProtocol::Tcp => {
                        if let Some(t) = &tls {
                            self.tasks.spawn(t.clone().watch(stop.clone()));
                        }
                        self.tasks.spawn(serve_tcp(
                            socket,
                            runtime.clone(),
                            l.name.clone(),
                            tls.clone(),
                            self.serving.clone(),
                            self.tasks.scope(),
                            stop.clone(),
                        ));
                    }
                }
                tracing::info!(service = %config.key, listener = %l.name, %addr, protocol = ?l.protocol, "listening");
                listeners.insert(
                    id,
                    Running {
                        port: l.port,
                        protocol: l.protocol,
                        tls,
                        stop,
                    },
                );
            }
        }
        errors
    }

    /// Sets a service's config and endpoints (a new snapshot, swapped atomically).
    pub fn set_endpoints(&self, config: Arc<Config>, members: Vec<MemberSpec>) {
        if let Some(runtime) = self.service(&config.key) {
            runtime.update(config, members);
        }
    }

    /// The runtime of a service.
    pub fn service(&self, key: &ServiceKey) -> Option<Arc<ServiceRuntime>> {
        self.services.lock().expect("dataplane lock poisoned").get(key).cloned()
    }

    /// Ends a passive ejection of `addr` in `key`'s service because an active
    /// probe passed. Cheap when nothing was ejected lately (the common case).
    pub fn lift_ejection(&self, key: &ServiceKey, addr: SocketAddr) {
        if now_ms() >= self.ejections_until.load(Ordering::Relaxed) {
            return;
        }
        if let Some(runtime) = self.service(key) {
            runtime.lift_ejection(addr);
        }
    }

    /// Each TLS listener's certificates (files, expiry, load error) of a service.
    pub fn tls_status(&self, key: &ServiceKey) -> Vec<(String, serde_json::Value)> {
        let listeners = self.listeners.lock().expect("dataplane lock poisoned");
        let mut out: Vec<(String, serde_json::Value)> = listeners
            .iter()
            .filter(|((k, _), _)| k == key)
            .filter_map(|((_, name), r)| r.tls.as_ref().map(|t| (name.clone(), t.status())))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Active requests and ejection per endpoint of a service.
    pub fn live(&self, key: &ServiceKey) -> HashMap<SocketAddr, EndpointLive> {
        let Some(runtime) = self.service(key) else {
            return HashMap::new();
        };
        let now = now_ms();
        let snap = runtime.balancer.snapshot();
        snap.members
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let factor = snap.factor_at(i, now);
                (
                    m.spec.addr,
                    EndpointLive {
                        active: m.endpoint.active(),
                        ejected_for: m.endpoint.passive.ejected_for(now),
                        ramp_percent: (factor < 1.0).then(|| (factor * 100.0).round() as u32),
                    },
                )
            })
            .collect()
    }

    /// Waits for every listener, connection and tunnel to drain after
    /// shutdown; each listener closes what outlives the grace period.
    pub async fn stopped(&self) {
        // Each listener gives its connections the grace and then drops them,
        // so this bound is only reached if a listener task itself hangs.
        let left = self.tasks.drain(self.serving.grace + Duration::from_secs(1)).await;
        if left > 0 {
            tracing::warn!(
                tasks = left,
                "data plane tasks still running after the grace period; closed"
            );
        }
    }
}

fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    // A deep accept queue rides out bursts (nginx uses 511).
    socket.listen(1024)
}
