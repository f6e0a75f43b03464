//! One BalancedService as the data plane holds it: its config, its balancer,
//! its retry budget, its upstream connection pools, and the failure
//! bookkeeping every listener shares.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use prometheus_client::metrics::counter::Counter;
use tokio::time::Instant;

use super::gate::RequestGate;
use super::ratelimit::Limiter;
use super::retry::{Failure, RetryBudget};
use super::upstream::pool::{Pool, PoolSettings};
use crate::api::config::{Config, ServiceKey};
use crate::balance::{Balancer, Endpoint, Member, MemberSpec, Snapshot, now_ms};
use crate::metrics::{ProxyMetrics, RetryLabels, ServiceLabels};
use crate::tls::upstream::Connectors;

/// What one request reads, swapped whole on every config or endpoint change:
/// the config, the endpoint snapshot, and each listener's connection pools in
/// snapshot order. The request path loads it once.
pub struct Current {
    /// The config in force.
    pub config: Arc<Config>,
    /// The endpoints.
    pub snap: Arc<Snapshot>,
    /// `pools[listener][member]`: where that listener reaches that member.
    pools: Vec<Vec<Arc<Pool>>>,
    /// `route_counters[route][status class]`, resolved once per config.
    route_counters: Vec<[Counter; 5]>,
    /// Each route's rate limiter and its refusal counter.
    route_limits: Vec<Option<(Arc<Limiter>, Counter)>>,
}

impl Current {
    /// Index of the listener named `name`.
    pub fn listener(&self, name: &str) -> Option<usize> {
        self.config.listeners.iter().position(|l| l.name == name)
    }

    /// Route `route`'s rate limiter, if it has one.
    pub fn route_limiter(&self, route: usize) -> Option<&Arc<Limiter>> {
        self.route_limits.get(route)?.as_ref().map(|(l, _)| l)
    }

    /// Counts a request refused by route `route`'s rate limit.
    pub fn count_route_limited(&self, route: usize) {
        if let Some(Some((_, counter))) = self.route_limits.get(route) {
            counter.inc();
        }
    }

    /// Counts an answer of `status` on route `route`.
    pub fn count_route(&self, route: usize, status: u16) {
        if let Some(counters) = self.route_counters.get(route) {
            counters[usize::from(status / 100).clamp(1, 5) - 1].inc();
        }
    }

    /// The pool through which `listener` reaches member `member`.
    pub fn pool(&self, listener: usize, member: usize) -> &Arc<Pool> {
        &self.pools[listener][member]
    }
}

/// The data plane's view of one BalancedService.
pub struct ServiceRuntime {
    /// Which service.
    pub key: ServiceKey,
    label: String,
    current: ArcSwap<Current>,
    /// Endpoint snapshots and pickers.
    pub balancer: Balancer,
    /// Retries allowed by recent traffic.
    pub budget: RetryBudget,
    budget_epoch: Instant,
    // Touched only by `update` and the sweeper, never per request.
    pools: Mutex<HashMap<SocketAddr, Arc<Pool>>>,
    // One TLS client per backend TLS setting, shared by its endpoints' pools.
    tls: Connectors,
    metrics: ProxyMetrics,
    budget_refused: Counter,
    overflow: Counter,
    /// In-flight requests under `spec.limits.maxRequests`.
    pub gate: Arc<RequestGate>,
    // The service's rateLimit; rebuilt only when the policy changes, so a
    // reload keeps every client's bucket.
    limiter: ArcSwap<Option<Arc<Limiter>>>,
    rate_limited: Counter,
    // Routes' limiters by route name, kept across updates while the policy
    // stays, so a reload or an endpoint change keeps every bucket.
    route_limiters: Mutex<HashMap<String, Arc<Limiter>>>,
    ejections_until: std::sync::OnceLock<Arc<AtomicU64>>,
}

impl ServiceRuntime {
    /// A runtime with no endpoints yet. Idle upstream connections are swept
    /// by a task that ends with the runtime.
    pub fn new(config: Arc<Config>, metrics: ProxyMetrics) -> Arc<Self> {
        let label = config.key.to_string();
        let budget_refused = metrics
            .retries_refused
            .get_or_create(&ServiceLabels { service: label.clone() })
            .clone();
        let overflow = metrics
            .overflow
            .get_or_create(&ServiceLabels { service: label.clone() })
            .clone();
        let rate_limited = metrics
            .rate_limited
            .get_or_create(&crate::metrics::RouteLabels {
                service: label.clone(),
                route: String::new(),
            })
            .clone();
        let runtime = Arc::new(Self {
            key: config.key.clone(),
            label,
            current: ArcSwap::from_pointee(Current {
                pools: vec![Vec::new(); config.listeners.len()],
                snap: Arc::new(Snapshot::empty()),
                route_counters: Vec::new(),
                route_limits: Vec::new(),
                config: config.clone(),
            }),
            balancer: Balancer::new(),
            budget: RetryBudget::new(&config.retry.budget),
            budget_epoch: Instant::now(),
            pools: Mutex::new(HashMap::new()),
            tls: Connectors::default(),
            metrics,
            budget_refused,
            overflow,
            gate: Arc::default(),
            limiter: ArcSwap::from_pointee(config.rate_limit.as_ref().map(|r| Arc::new(Limiter::new(r)))),
            rate_limited,
            route_limiters: Mutex::new(HashMap::new()),
            ejections_until: std::sync::OnceLock::new(),
        });
        let weak = Arc::downgrade(&runtime);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(SWEEP_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(runtime) = weak.upgrade() else { return };
                let pools: Vec<Arc<Pool>> = runtime
                    .pools
                    .lock()
                    .expect("pools lock poisoned")
                    .values()
                    .cloned()
                    .collect();
                for pool in pools {
                    pool.sweep();
                }
            }
        });
        runtime
    }

    /// Keeps `until` at or past the end of every ejection this service makes,
    /// so lifting can skip services with nothing ejected.
    pub fn report_ejections_to(&self, until: Arc<AtomicU64>) {
        let _ = self.ejections_until.set(until);
    }

    /// `namespace/name`, as metrics label it.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// Each group's TLS to its endpoints, with load errors and warnings, for `/status`.
    pub fn backend_tls_status(&self) -> Option<serde_json::Value> {
        let current = self.current();
        let config = &current.config;
        if !config.backend_tls.any() {
            return None;
        }
        let groups = config.backend_tls.0.iter().enumerate().filter_map(|(i, t)| {
            let mut v = self.tls.get(t.as_ref()?).status();
            v["group"] = config.group_name(i).into();
            Some(v)
        });
        Some(serde_json::Value::Array(groups.collect()))
    }

    /// The config, endpoints and pools in force: load once per request.
    pub fn current(&self) -> Arc<Current> {
        self.current.load_full()
    }

    /// Data-plane metrics.
    pub fn metrics(&self) -> &ProxyMetrics {
        &self.metrics
    }

    /// Milliseconds on the retry budget's clock (tokio's, so tests can pause it).
    pub fn budget_now(&self) -> u64 {
        self.budget_epoch.elapsed().as_millis() as u64
    }

    /// Swaps in a new config and endpoint set; live counters, ejections and
    /// upstream connections of endpoints that stay are kept. An endpoint that
    /// active checks now call healthy, after they did not, is no longer ejected:
    /// probes have seen it answer since the proxy's failures.
    pub fn update(&self, config: Arc<Config>, members: Vec<MemberSpec>) {
        let previous = self.current.load_full();
        let limiter = self.limiter.load();
        if limiter.as_ref().as_ref().map(|l| l.policy()) != config.rate_limit.as_ref() {
            self.limiter
                .store(Arc::new(config.rate_limit.as_ref().map(|r| Arc::new(Limiter::new(r)))));
        }
        let now = now_ms();
        for m in members.iter().filter(|m| m.healthy) {
            let was_healthy = previous
                .snap
                .members
                .iter()
                .find(|o| o.spec.addr == m.addr)
                .is_some_and(|o| o.spec.healthy);
            if !was_healthy {
                self.lift_ejection_in(&previous.snap, m.addr, now);
            }
        }
        let removed = self
            .balancer
            .update(config.algorithm.clone(), config.slow_start, members, |addr| {
                Endpoint::with_stats(addr, self.metrics.endpoint_stats(&self.label, &addr.to_string()))
            });
        for addr in removed {
            self.metrics.forget_endpoint(&self.label, &addr.to_string());
        }
        let snap = self.balancer.snapshot();
        let settings = PoolSettings::new(config.timeouts.connect);
        let mut pools = self.pools.lock().expect("pools lock poisoned");
        let mut wanted: HashMap<SocketAddr, Arc<Pool>> = HashMap::new();
        let tables = config
            .listeners
            .iter()
            .map(|l| {
                snap.members
                    .iter()
                    .map(|m| {
                        let target = l.target_of(m.spec.addr, &m.spec.ports);
                        wanted
                            .entry(target)
                            .or_insert_with(|| {
                                let tls = config.backend_tls.for_groups(m.spec.groups).map(|t| self.tls.get(t));
                                match pools.get(&target) {
                                    Some(p) if p.made_with(settings, tls.as_ref()) => p.clone(),
                                    _ => Arc::new(Pool::new(target, settings, tls)),
                                }
                            })
                            .clone()
                    })
                    .collect()
            })
            .collect();
        *pools = wanted;
        drop(pools);
        self.budget.set_window(&config.retry.budget);
        let route_counters = config
            .routes
            .iter()
            .map(|r| {
                ["1xx", "2xx", "3xx", "4xx", "5xx"].map(|code| {
                    self.metrics
                        .routes
                        .get_or_create(&crate::metrics::RouteCodeLabels {
                            service: self.label.clone(),
                            route: r.name.clone(),
                            code,
                        })
                        .clone()
                })
            })
            .collect();
        let route_limits = {
            let mut kept = self.route_limiters.lock().expect("route limiters lock poisoned");
            let limits: Vec<_> = config
                .routes
                .iter()
                .map(|r| {
                    let policy = r.rate_limit.as_ref()?;
                    let limiter = match kept.get(&r.name) {
                        Some(l) if l.policy() == policy => l.clone(),
                        _ => Arc::new(Limiter::new(policy)),
                    };
                    let counter = self
                        .metrics
                        .rate_limited
                        .get_or_create(&crate::metrics::RouteLabels {
                            service: self.label.clone(),
                            route: r.name.clone(),
                        })
                        .clone();
                    Some((limiter, counter))
                })
                .collect();
            *kept = config
                .routes
                .iter()
                .zip(&limits)
                .filter_map(|(r, l)| Some((r.name.clone(), l.as_ref()?.0.clone())))
                .collect();
            limits
        };
        self.current.store(Arc::new(Current {
            config,
            snap,
            pools: tables,
            route_counters,
            route_limits,
        }));
    }

    /// Ends a passive ejection of `addr` because an active probe passed.
    pub fn lift_ejection(&self, addr: SocketAddr) {
        self.lift_ejection_in(&self.current.load().snap, addr, now_ms());
    }

    fn lift_ejection_in(&self, snap: &Snapshot, addr: SocketAddr, now: u64) {
        if let Some(m) = snap.members.iter().find(|m| m.spec.addr == addr)
            && m.endpoint.passive.lift(now)
        {
            m.endpoint.stats.record_lift();
            tracing::info!(service = %self.key, endpoint = %addr, "ejection lifted: active health check passed");
        }
    }

    /// The service's rate limiter, if it has a `rateLimit`.
    pub fn limiter(&self) -> Option<Arc<Limiter>> {
        self.limiter.load().as_ref().clone()
    }

    /// Counts a request refused by a rate limit.
    pub fn count_rate_limited(&self) {
        self.rate_limited.inc();
    }

    /// Counts a request refused by overload protection.
    pub fn count_overflow(&self) {
        self.overflow.inc();
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
            member.endpoint.stats.record_ejection();
            if let Some(until) = self.ejections_until.get() {
                until.fetch_max(now_ms() + p.fail_timeout.as_millis() as u64, Ordering::Relaxed);
            }
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

    /// Counts a retry the budget refused.
    pub fn record_budget_refusal(&self) {
        self.budget_refused.inc();
    }
}

/// How often idle upstream connections past their timeout are closed.
const SWEEP_EVERY: Duration = Duration::from_secs(5);
