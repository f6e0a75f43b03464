//! One BalancedService as the data plane holds it: its config, its balancer,
//! its retry budget, its upstream clients, and the failure bookkeeping every
//! listener shares.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::net::TcpStream;

use super::body::ProxyBody;
use super::retry::{Failure, RetryBudget};
use crate::api::config::{Config, HashKey, ListenerConfig, ServiceKey, TargetPort};
use crate::balance::{Balancer, Endpoint, Member, MemberSpec, Snapshot, Tried, now_ms};
use crate::metrics::{ProxyMetrics, RetryLabels};

/// Counts a request or connection on an endpoint until dropped: what least
/// connections reads and `balanced_upstream_active_requests` shows.
#[derive(Debug)]
pub struct ActiveGuard(Arc<Endpoint>);

impl ActiveGuard {
    /// Starts counting on `endpoint`.
    pub fn new(endpoint: Arc<Endpoint>) -> Self {
        endpoint.stats.active.inc();
        Self(endpoint)
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.stats.active.dec();
    }
}

/// Upstream HTTP clients for one connect timeout.
pub struct Clients {
    connect_timeout: Duration,
    /// HTTP/1.1 with keep-alive pooling.
    pub http1: Client<HttpConnector, ProxyBody>,
    /// HTTP/2 cleartext (prior knowledge), for HTTP/2 clients such as gRPC.
    pub http2: Client<HttpConnector, ProxyBody>,
}

impl Clients {
    fn new(connect_timeout: Duration) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(connect_timeout));
        connector.set_nodelay(true);
        connector.enforce_http(true);
        let mut builder = Client::builder(TokioExecutor::new());
        builder
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(256);
        let http1 = builder.build(connector.clone());
        builder.http2_only(true);
        let http2 = builder.build(connector);
        Self {
            connect_timeout,
            http1,
            http2,
        }
    }
}

/// The data plane's view of one BalancedService.
pub struct ServiceRuntime {
    /// Which service.
    pub key: ServiceKey,
    label: String,
    config: ArcSwap<Config>,
    /// Endpoint snapshots and pickers.
    pub balancer: Balancer,
    /// Retries in flight vs requests in flight.
    pub budget: RetryBudget,
    clients: ArcSwap<Clients>,
    metrics: ProxyMetrics,
}

impl ServiceRuntime {
    /// A runtime with no endpoints yet.
    pub fn new(config: Arc<Config>, metrics: ProxyMetrics) -> Arc<Self> {
        Arc::new(Self {
            key: config.key.clone(),
            label: config.key.to_string(),
            clients: ArcSwap::from_pointee(Clients::new(config.timeouts.connect)),
            config: ArcSwap::new(config),
            balancer: Balancer::new(),
            budget: RetryBudget::default(),
            metrics,
        })
    }

    /// `namespace/name`, as metrics label it.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// The config in force.
    pub fn config(&self) -> Arc<Config> {
        self.config.load_full()
    }

    /// The upstream clients in force.
    pub fn clients(&self) -> Arc<Clients> {
        self.clients.load_full()
    }

    /// Data-plane metrics.
    pub fn metrics(&self) -> &ProxyMetrics {
        &self.metrics
    }

    /// Swaps in a new config and endpoint set; live counters of endpoints that
    /// stay are kept.
    pub fn update(&self, config: Arc<Config>, members: Vec<MemberSpec>) {
        if self.clients.load().connect_timeout != config.timeouts.connect {
            self.clients.store(Arc::new(Clients::new(config.timeouts.connect)));
        }
        let removed = self.balancer.update(config.algorithm.clone(), members, |addr| {
            Endpoint::with_stats(addr, self.metrics.endpoint_stats(&self.label, &addr.to_string()))
        });
        for addr in removed {
            self.metrics.forget_endpoint(&self.label, &addr.to_string());
        }
        self.config.store(config);
    }

    /// Where `member` is reached for `listener`: its address with the listener's
    /// numeric target port, or its own port.
    pub fn target(member: &Member, listener: &ListenerConfig) -> SocketAddr {
        match listener.target_port {
            Some(TargetPort::Number(port)) => SocketAddr::new(member.spec.addr.ip(), port),
            _ => member.spec.addr,
        }
    }

    /// Counts a failed attempt for passive health; ejects at `maxFails`.
    pub fn record_failure(&self, config: &Config, member: &Member, failure: &Failure) {
        if !failure.counts_for_passive(&config.passive) {
            return;
        }
        let p = &config.passive;
        if member
            .endpoint
            .passive
            .record_failure(now_ms(), p.max_fails, p.fail_timeout)
        {
            member.endpoint.stats.ejections.inc();
            tracing::warn!(
                service = %self.key,
                endpoint = %member.spec.addr,
                max_fails = p.max_fails,
                fail_timeout = ?p.fail_timeout,
                "endpoint ejected after failures"
            );
        }
    }

    /// Counts a retry by its reason.
    pub fn record_retry(&self, reason: &'static str) {
        self.metrics
            .retries
            .get_or_create(&RetryLabels {
                service: self.label.clone(),
                reason,
            })
            .inc();
    }

    /// Connects to an endpoint for a TCP listener or an HTTP upgrade: picks,
    /// connects within `timeouts.connect`, and on failure tries the next
    /// endpoint, up to `retry.tries`.
    pub async fn connect(
        &self,
        snap: &Snapshot,
        listener: &ListenerConfig,
        key: Option<u64>,
    ) -> Result<(TcpStream, ActiveGuard, SocketAddr), ConnectError> {
        let config = self.config();
        let limit = match config.retry.tries {
            0 => snap.members.len(),
            n => n as usize,
        };
        let mut tried = Tried::default();
        let mut last = None;
        while tried.len() < limit {
            let Some(i) = self.balancer.pick(snap, &tried, key, now_ms()) else {
                break;
            };
            tried.add(i);
            let member = &snap.members[i];
            let guard = ActiveGuard::new(member.endpoint.clone());
            let target = Self::target(member, listener);
            let failure = match tokio::time::timeout(config.timeouts.connect, TcpStream::connect(target)).await {
                Ok(Ok(stream)) => {
                    let _ = stream.set_nodelay(true);
                    member.endpoint.passive.record_success();
                    return Ok((stream, guard, member.spec.addr));
                }
                Ok(Err(e)) => Failure::Connect(crate::health::probe::io_text(&e)),
                Err(_) => Failure::Timeout,
            };
            member.endpoint.stats.record_failure(failure == Failure::Timeout);
            self.record_failure(&config, member, &failure);
            if tried.len() < limit {
                self.record_retry(if failure == Failure::Timeout {
                    "Timeout"
                } else {
                    "Error"
                });
            }
            last = Some((member.spec.addr, failure));
        }
        Err(ConnectError { last })
    }

    /// The consistent-hash key of a client, when the algorithm hashes.
    pub fn hash_source_ip(config: &Config, peer: SocketAddr) -> Option<u64> {
        match &config.algorithm {
            crate::api::config::Algorithm::ConsistentHash(HashKey::SourceIp) => {
                Some(crate::balance::picker::hash_key(&ip_bytes(peer)))
            }
            crate::api::config::Algorithm::ConsistentHash(_) => Some(crate::balance::picker::hash_key(&ip_bytes(peer))),
            _ => None,
        }
    }
}

/// Bytes of a peer's IP, for hashing.
pub fn ip_bytes(peer: SocketAddr) -> Vec<u8> {
    match peer.ip() {
        std::net::IpAddr::V4(v4) => v4.octets().to_vec(),
        std::net::IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

/// No endpoint could be connected.
#[derive(Debug)]
pub struct ConnectError {
    /// The last endpoint tried and why it failed; `None` when none was available.
    pub last: Option<(SocketAddr, Failure)>,
}
