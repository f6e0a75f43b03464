//! The scheduler: one timer task per endpoint, started, re-targeted and stopped
//! as services change, with every health transition sent to subscribers.
//!
//! Probes of one endpoint never overlap (the next is scheduled after the last
//! finished) and the first probe of each endpoint lands at a random point of its
//! interval, so 10,000 endpoints do not fire in the same millisecond.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use rand::Rng;
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::probe::{HttpScratch, ProbeError, probe_with};
use super::state::{Health, HealthState};
use super::tls::TlsClients;
use crate::api::config::{AgentCheck, GroupTls, HealthCheck, ServiceKey};
use crate::metrics::{EndpointLabels, ProbeLabels, ProbeMetrics, ServiceLabels, TransitionLabels};
use crate::tls::upstream::{Connector, Connectors};

/// A change of an endpoint's health.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transition {
    /// The BalancedService.
    pub service: ServiceKey,
    /// The endpoint.
    pub endpoint: SocketAddr,
    /// Health before.
    pub from: Health,
    /// Health now.
    pub to: Health,
    /// The failure that caused it, for transitions to Unhealthy.
    pub error: Option<String>,
    /// When it happened.
    pub at: SystemTime,
}

/// An endpoint to probe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// The endpoint's identity: its address and port.
    pub addr: SocketAddr,
    /// A state to start from instead of Unknown (inherited from an earlier status).
    pub seed: Option<HealthState>,
    /// The groups it is in, a bit each (bit 0 is `default`): its first
    /// group's TLS is the one its checks speak.
    pub groups: u64,
}

impl Target {
    /// A target of the default group with no inherited state.
    pub fn new(addr: SocketAddr) -> Self {
        Self {
            addr,
            seed: None,
            groups: 1,
        }
    }
}

/// Runs probes for every endpoint of every service it is given.
#[derive(Clone)]
pub struct Prober {
    inner: Arc<Inner>,
}

/// Called after every passing probe with the service and endpoint.
pub type PassHook = Arc<dyn Fn(&ServiceKey, SocketAddr) + Send + Sync>;

/// Stands in for the network in unit tests: the probe's outcome for an address.
#[cfg(test)]
type FakeProbe = Arc<
    dyn Fn(SocketAddr) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), ProbeError>> + Send>>
        + Send
        + Sync,
>;

/// Stands in for an agent in unit tests: its answer for an address.
#[cfg(test)]
type FakeAgent = Arc<dyn Fn(SocketAddr) -> Result<String, ProbeError> + Send + Sync>;

struct Inner {
    #[cfg(test)]
    fake: Option<FakeProbe>,
    #[cfg(test)]
    fake_agent: Option<FakeAgent>,
    on_pass: std::sync::OnceLock<PassHook>,
    services: Mutex<HashMap<ServiceKey, ServiceEntry>>,
    // Services with a transition since `take_changed` last ran.
    changed: Mutex<HashSet<ServiceKey>>,
    // Made on the first `subscribe`: tokio writes every slot of a broadcast
    // channel when it is made (4,096 here: 0.6 MiB of RSS), and a standalone
    // proxy never subscribes.
    transitions: std::sync::OnceLock<broadcast::Sender<Transition>>,
    generation: watch::Sender<u64>,
    metrics: ProbeMetrics,
    tls: TlsClients,
    backend_tls: Connectors,
    shutdown: CancellationToken,
    tasks: TaskTracker,
}

struct ServiceEntry {
    check: Arc<HealthCheck>,
    tls: GroupTls,
    endpoints: HashMap<SocketAddr, EndpointEntry>,
}

struct EndpointEntry {
    state: Arc<Mutex<HealthState>>,
    stop: CancellationToken,
    groups: u64,
}

/// Transitions a subscriber may fall behind by before it gets `Lagged`.
const TRANSITIONS_KEPT: usize = 4096;

impl Prober {
    /// A prober whose tasks all stop when `shutdown` is cancelled.
    pub fn new(metrics: ProbeMetrics, shutdown: CancellationToken) -> Self {
        let (generation, _) = watch::channel(0);
        Self {
            inner: Arc::new(Inner {
                #[cfg(test)]
                fake: None,
                #[cfg(test)]
                fake_agent: None,
                on_pass: std::sync::OnceLock::new(),
                services: Mutex::new(HashMap::new()),
                changed: Mutex::new(HashSet::new()),
                transitions: std::sync::OnceLock::new(),
                generation,
                metrics,
                tls: TlsClients::default(),
                backend_tls: Connectors::default(),
                shutdown,
                tasks: TaskTracker::new(),
            }),
        }
    }

    /// A prober whose probes are `fake` instead of the network.
    #[cfg(test)]
    fn with_fake(metrics: ProbeMetrics, fake: FakeProbe) -> Self {
        let mut prober = Self::new(metrics, CancellationToken::new());
        Arc::get_mut(&mut prober.inner).expect("not shared yet").fake = Some(fake);
        prober
    }

    /// Sets what runs after every passing probe (the data plane lifts a passive
    /// ejection there); only the first hook set counts.
    pub fn on_pass(&self, hook: PassHook) {
        let _ = self.inner.on_pass.set(hook);
    }

    /// Every transition from now on. A receiver that lags gets `Lagged` and should
    /// re-read [`Prober::states`].
    pub fn subscribe(&self) -> broadcast::Receiver<Transition> {
        self.inner
            .transitions
            .get_or_init(|| broadcast::channel(TRANSITIONS_KEPT).0)
            .subscribe()
    }

    /// A counter bumped on every transition and every change of targets: cheap
    /// "something changed" for consumers that rebuild a snapshot.
    pub fn generation(&self) -> watch::Receiver<u64> {
        self.inner.generation.subscribe()
    }

    /// The services whose endpoints changed health since the last call: with
    /// thousands of services, a consumer rebuilds only those.
    pub fn take_changed(&self) -> HashSet<ServiceKey> {
        std::mem::take(&mut *self.inner.changed.lock().expect("prober lock poisoned"))
    }

    /// Sets what a service probes, and the TLS each group's endpoints speak.
    /// Endpoints that stay keep their state (and keep their timers unless
    /// the check or their TLS changed); removed ones stop at once.
    pub fn update_service(&self, key: &ServiceKey, check: &HealthCheck, tls: &GroupTls, targets: &[Target]) {
        let mut services = self.inner.services.lock().expect("prober lock poisoned");
        let entry = services.entry(key.clone()).or_insert_with(|| ServiceEntry {
            check: Arc::new(check.clone()),
            tls: tls.clone(),
            endpoints: HashMap::new(),
        });
        let check_changed = *entry.check != *check || entry.tls != *tls;
        if check_changed {
            entry.check = Arc::new(check.clone());
            entry.tls = tls.clone();
        }
        // One connector per group, looked up once rather than per endpoint.
        let connectors: Vec<Option<Arc<Connector>>> = tls
            .0
            .iter()
            .map(|t| t.as_ref().map(|t| self.inner.backend_tls.get(t)))
            .collect();
        let connector_of = |groups: u64| -> Option<Arc<Connector>> {
            connectors.get(groups.trailing_zeros() as usize).cloned().flatten()
        };

        let wanted: HashMap<SocketAddr, &Target> = targets.iter().map(|t| (t.addr, t)).collect();
        entry.endpoints.retain(|addr, ep| {
            let keep = wanted.contains_key(addr);
            if !keep {
                ep.stop.cancel();
                self.inner.metrics.forget_endpoint(&key.to_string(), &addr.to_string());
            }
            keep
        });
        for (addr, target) in wanted {
            match entry.endpoints.get_mut(&addr) {
                Some(ep) if check_changed || (tls.any() && ep.groups != target.groups) => {
                    ep.stop.cancel();
                    ep.groups = target.groups;
                    let tls = connector_of(target.groups);
                    ep.stop = self.spawn(key, addr, entry.check.clone(), tls, ep.state.clone());
                }
                Some(_) => {}
                None => {
                    let state = Arc::new(Mutex::new(target.seed.clone().unwrap_or_default()));
                    let tls = connector_of(target.groups);
                    let stop = self.spawn(key, addr, entry.check.clone(), tls, state.clone());
                    entry.endpoints.insert(
                        addr,
                        EndpointEntry {
                            state,
                            stop,
                            groups: target.groups,
                        },
                    );
                }
            }
        }
        drop(services);
        self.inner.generation.send_modify(|g| *g += 1);
    }

    /// Stops probing every endpoint of a service.
    pub fn remove_service(&self, key: &ServiceKey) {
        let removed = self.inner.services.lock().expect("prober lock poisoned").remove(key);
        if let Some(entry) = removed {
            for (addr, ep) in entry.endpoints {
                ep.stop.cancel();
                self.inner.metrics.forget_endpoint(&key.to_string(), &addr.to_string());
            }
            self.inner.generation.send_modify(|g| *g += 1);
        }
    }

    /// The services being probed.
    pub fn services(&self) -> Vec<ServiceKey> {
        let services = self.inner.services.lock().expect("prober lock poisoned");
        let mut keys: Vec<_> = services.keys().cloned().collect();
        keys.sort();
        keys
    }

    /// Current state of every endpoint of a service, sorted by address.
    pub fn states(&self, key: &ServiceKey) -> Vec<(SocketAddr, HealthState)> {
        let services = self.inner.services.lock().expect("prober lock poisoned");
        let mut out: Vec<_> = services
            .get(key)
            .map(|entry| {
                entry
                    .endpoints
                    .iter()
                    .map(|(addr, ep)| (*addr, ep.state.lock().expect("state lock poisoned").clone()))
                    .collect()
            })
            .unwrap_or_default();
        out.sort_by_key(|(addr, _)| *addr);
        out
    }

    /// Waits until every probe task has stopped (after shutdown was cancelled).
    pub async fn stopped(&self) {
        self.inner.tasks.close();
        self.inner.tasks.wait().await;
    }

    fn spawn(
        &self,
        key: &ServiceKey,
        addr: SocketAddr,
        check: Arc<HealthCheck>,
        tls: Option<Arc<Connector>>,
        state: Arc<Mutex<HealthState>>,
    ) -> CancellationToken {
        let stop = self.inner.shutdown.child_token();
        if let Some(agent) = check.agent.clone() {
            let task = AgentTask {
                service: key.clone(),
                addr,
                agent,
                state: state.clone(),
                inner: self.inner.clone(),
                stop: stop.clone(),
            };
            self.inner.tasks.spawn(task.run());
        }
        let task = EndpointTask {
            service: key.clone(),
            addr,
            check,
            tls,
            state,
            inner: self.inner.clone(),
            stop: stop.clone(),
        };
        self.inner.tasks.spawn(task.run());
        stop
    }
}

struct EndpointTask {
    service: ServiceKey,
    addr: SocketAddr,
    check: Arc<HealthCheck>,
    tls: Option<Arc<Connector>>,
    state: Arc<Mutex<HealthState>>,
    inner: Arc<Inner>,
    stop: CancellationToken,
}

/// Late probes, logged at most once every 10 s with a count.
static LATE: crate::throttle::LogThrottle = crate::throttle::LogThrottle::new(Duration::from_secs(10));

/// Probes that could not run for want of a local resource, logged at most once a second.
static LOCAL_FAILURES: crate::throttle::LogThrottle = crate::throttle::LogThrottle::new(Duration::from_secs(1));

impl EndpointTask {
    async fn run(self) {
        let service = self.service.to_string();
        let endpoint = self.addr.to_string();
        let probe_addr = SocketAddr::new(self.addr.ip(), self.check.port.unwrap_or(self.addr.port()));
        let labels = |result| ProbeLabels {
            service: service.clone(),
            endpoint: endpoint.clone(),
            result,
        };
        // Failures and timeouts are registered when they first happen: most
        // endpoints never time out, and a series is memory for each of 10,000.
        const RESULTS: [&str; 3] = ["success", "failure", "timeout"];
        let mut counters: [Option<prometheus_client::metrics::counter::Counter>; 3] = [
            Some(self.inner.metrics.probes.get_or_create(&labels(RESULTS[0])).clone()),
            None,
            None,
        ];
        let histogram = self
            .inner
            .metrics
            .duration
            .get_or_create(&ServiceLabels {
                service: service.clone(),
            })
            .clone();
        let healthy_gauge = self
            .inner
            .metrics
            .healthy
            .get_or_create(&EndpointLabels {
                service: service.clone(),
                endpoint: endpoint.clone(),
            })
            .clone();
        healthy_gauge.set(i64::from(self.state.lock().expect("state lock poisoned").is_healthy()));

        // Built once: the request is the same for every probe of this endpoint.
        let mut scratch = match &self.check.probe {
            crate::api::config::ProbeKind::Http(http) => Some(HttpScratch::new(http, probe_addr)),
            _ => None,
        };
        let first = spread(self.check.interval);
        let Ok(mut woke_late) = self.sleep(first).await else {
            return;
        };
        loop {
            let started = Instant::now();
            let result = tokio::select! {
                _ = self.stop.cancelled() => return,
                r = self.probe(probe_addr, scratch.as_mut()) => r,
            };
            let took = started.elapsed();
            histogram.observe(took.as_secs_f64());
            let result = result.and_then(|line| {
                if let Some(line) = line {
                    hear(
                        &self.inner,
                        &self.service,
                        self.addr,
                        &self.state,
                        &line,
                        "agent header",
                    );
                }
                // An agent that says down fails the check, at the check's own pace.
                match &self.state.lock().expect("state lock poisoned").agent.down {
                    Some(why) => Err(ProbeError::failed(format!("agent: {why}"))),
                    None => Ok(()),
                }
            });
            // A timeout while the prober itself was measurably behind (its
            // wake-up, or the timeout's own timer, late by over half an
            // interval) says nothing about the endpoint: 50,000 HTTP checks
            // on one core once marked every endpoint down this way.
            let behind = woke_late.max(took.saturating_sub(self.check.timeout)) > self.check.interval / 2;
            if let Err(e) = &result
                && (e.local || (e.timed_out && behind))
            {
                // Our failure, not the endpoint's: its state stays as it was.
                if let Some(n) = LOCAL_FAILURES.hit() {
                    let why = if e.local {
                        "probe could not run: the prober is out of a local resource; endpoint state left unchanged"
                    } else {
                        "probe timed out while the prober was over half an interval behind; not counted against the endpoint"
                    };
                    tracing::warn!(service = %self.service, endpoint = %self.addr, error = %e.message, times = n, "{why}");
                }
                match self.sleep(jitter(self.check.interval)).await {
                    Ok(late) => woke_late = late,
                    Err(()) => return,
                }
                continue;
            }
            let i = match &result {
                Ok(()) => 0,
                Err(e) if e.timed_out => 2,
                Err(_) => 1,
            };
            counters[i]
                .get_or_insert_with(|| self.inner.metrics.probes.get_or_create(&labels(RESULTS[i])).clone())
                .inc();

            let now = SystemTime::now();
            let (changed, delay, error) = {
                let mut state = self.state.lock().expect("state lock poisoned");
                let outcome = result.as_ref().map(|_| ()).map_err(|e| e.message.as_str());
                let changed = state.record(outcome, self.check.rise, self.check.fall, now);
                let delay = state.next_delay(self.check.interval, self.check.down_interval);
                (
                    changed.map(|from| (from, state.health)),
                    delay,
                    state.last_error.clone(),
                )
            };
            if let Some((from, to)) = changed {
                self.announce(from, to, error, now, &healthy_gauge);
            }
            if result.is_ok()
                && let Some(hook) = self.inner.on_pass.get()
            {
                hook(&self.service, self.addr);
            }
            match self.sleep(jitter(delay)).await {
                Ok(late) => woke_late = late,
                Err(()) => return,
            }
        }
    }

    fn announce(
        &self,
        from: Health,
        to: Health,
        error: Option<String>,
        at: SystemTime,
        gauge: &prometheus_client::metrics::gauge::Gauge,
    ) {
        gauge.set(i64::from(to == Health::Healthy));
        self.inner
            .metrics
            .transitions
            .get_or_create(&TransitionLabels {
                service: self.service.to_string(),
                to: to.as_str(),
            })
            .inc();
        let error = if to == Health::Healthy { None } else { error };
        tracing::info!(
            service = %self.service,
            endpoint = %self.addr,
            from = %from,
            to = %to,
            error = error.as_deref(),
            "endpoint health changed"
        );
        self.inner
            .changed
            .lock()
            .expect("prober lock poisoned")
            .insert(self.service.clone());
        // Nobody listening is fine: standalone has no subscribers.
        if let Some(transitions) = self.inner.transitions.get() {
            let _ = transitions.send(Transition {
                service: self.service.clone(),
                endpoint: self.addr,
                from,
                to,
                error,
                at,
            });
        }
        self.inner.generation.send_modify(|g| *g += 1);
    }

    async fn probe(
        &self,
        addr: SocketAddr,
        scratch: Option<&mut HttpScratch>,
    ) -> Result<super::probe::AgentLine, ProbeError> {
        #[cfg(test)]
        if let Some(fake) = &self.inner.fake {
            return tokio::time::timeout(self.check.timeout, fake(addr))
                .await
                .unwrap_or_else(|_| {
                    Err(ProbeError {
                        timed_out: true,
                        local: false,
                        message: "timeout".into(),
                    })
                })
                .map(|()| None);
        }
        let tls = self.tls.as_deref();
        probe_with(
            &self.check.probe,
            addr,
            self.check.timeout,
            &self.inner.tls,
            tls,
            scratch,
        )
        .await
    }

    /// Waits `d`, then records how late the wake-up came: a prober that cannot
    /// keep up shows it here first. Each endpoint schedules from the end of
    /// its own last probe, so a late prober spreads its probes out rather than
    /// bunching them to catch up.
    async fn sleep(&self, d: Duration) -> Result<Duration, ()> {
        let due = tokio::time::Instant::now() + d;
        tokio::select! {
            _ = self.stop.cancelled() => return Err(()),
            _ = tokio::time::sleep_until(due) => {}
        }
        let lag = tokio::time::Instant::now().saturating_duration_since(due);
        let metrics = &self.inner.metrics;
        metrics.lag.observe(lag.as_secs_f64());
        if lag > self.check.interval / 10 {
            metrics.late.inc();
            if let Some(n) = LATE.hit() {
                tracing::warn!(
                    service = %self.service,
                    endpoint = %self.addr,
                    late_ms = lag.as_millis() as u64,
                    interval = %crate::api::duration::format_duration(self.check.interval),
                    times = n,
                    "the prober is not keeping up: probes start more than a tenth of their interval late (CPU starved, or too many endpoints for one process)"
                );
            }
        }
        Ok(lag)
    }
}

/// Asks one endpoint's agent every `agent.interval`, apart from its probes.
struct AgentTask {
    service: ServiceKey,
    addr: SocketAddr,
    agent: AgentCheck,
    state: Arc<Mutex<HealthState>>,
    inner: Arc<Inner>,
    stop: CancellationToken,
}

/// Agents that did not answer, logged at most once every 10 s with a count.
static AGENT_UNREACHABLE: crate::throttle::LogThrottle = crate::throttle::LogThrottle::new(Duration::from_secs(10));

/// Agent answers that were not agent words, logged at most once a second.
static AGENT_GARBAGE: crate::throttle::LogThrottle = crate::throttle::LogThrottle::new(Duration::from_secs(1));

impl AgentTask {
    async fn run(self) {
        let at = SocketAddr::new(self.addr.ip(), self.agent.port);
        let mut delay = spread(self.agent.interval);
        loop {
            tokio::select! {
                _ = self.stop.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
            delay = jitter(self.agent.interval);
            let answer = tokio::select! {
                _ = self.stop.cancelled() => return,
                a = ask_agent(&self.inner, at, self.agent.timeout) => a,
            };
            match answer {
                Ok(line) => hear(&self.inner, &self.service, self.addr, &self.state, &line, "agent"),
                Err(e) => {
                    // HAProxy too: an agent that cannot be reached changes
                    // nothing, the regular check decides health.
                    self.inner
                        .metrics
                        .agent_errors
                        .get_or_create(&ServiceLabels {
                            service: self.service.to_string(),
                        })
                        .inc();
                    if let Some(n) = AGENT_UNREACHABLE.hit() {
                        tracing::warn!(service = %self.service, endpoint = %self.addr, error = %e, times = n, "agent check got no answer; the endpoint keeps its last report");
                    }
                }
            }
        }
    }
}

async fn ask_agent(inner: &Inner, at: SocketAddr, timeout: Duration) -> Result<String, ProbeError> {
    #[cfg(test)]
    if let Some(fake) = &inner.fake_agent {
        return fake(at);
    }
    let _ = inner;
    super::agent::ask(at, timeout).await
}

/// Applies one agent answer (`via` says where it came from) to an
/// endpoint's state; garbage is logged and changes nothing.
fn hear(inner: &Inner, service: &ServiceKey, addr: SocketAddr, state: &Mutex<HealthState>, line: &str, via: &str) {
    let words = match super::agent::parse(line) {
        Ok(w) => w,
        Err(why) => {
            inner
                .metrics
                .agent_errors
                .get_or_create(&ServiceLabels {
                    service: service.to_string(),
                })
                .inc();
            if let Some(n) = AGENT_GARBAGE.hit() {
                tracing::warn!(service = %service, endpoint = %addr, via, error = %why, times = n, "agent answer ignored: not agent words");
            }
            return;
        }
    };
    let now = {
        let mut state = state.lock().expect("state lock poisoned");
        if !state.agent.apply(&words) {
            return;
        }
        state.agent.clone()
    };
    let labels = EndpointLabels {
        service: service.to_string(),
        endpoint: addr.to_string(),
    };
    inner
        .metrics
        .weight_percent
        .get_or_create(&labels)
        .set(i64::from(now.weight_percent));
    inner
        .metrics
        .draining
        .get_or_create(&labels)
        .set(i64::from(now.draining()));
    tracing::info!(
        service = %service,
        endpoint = %addr,
        via,
        weight_percent = now.weight_percent,
        admin = now.admin.as_str(),
        down = now.down.as_deref(),
        "endpoint agent report changed"
    );
    inner
        .changed
        .lock()
        .expect("prober lock poisoned")
        .insert(service.clone());
    inner.generation.send_modify(|g| *g += 1);
}

/// A random point in `[0, interval)`: where an endpoint's first probe lands.
fn spread(interval: Duration) -> Duration {
    let millis = interval.as_millis().max(1) as u64;
    Duration::from_millis(rand::rng().random_range(0..millis))
}

/// `delay` give or take 5%, so endpoints started together drift apart.
fn jitter(delay: Duration) -> Duration {
    let factor = rand::rng().random_range(0.95..1.05);
    delay.mul_f64(factor)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::config::ProbeKind;
    use crate::metrics::Metrics;

    fn check(interval: Duration) -> HealthCheck {
        HealthCheck {
            probe: ProbeKind::Tcp,
            interval,
            timeout: interval / 2,
            rise: 1,
            fall: 1,
            down_interval: interval,
            port: None,
            agent: None,
        }
    }

    type Log = Arc<Mutex<Vec<(SocketAddr, tokio::time::Instant)>>>;

    /// Probes that record when they ran; `hung` never answers.
    fn recording(hung: Option<SocketAddr>) -> (FakeProbe, Log) {
        let log: Log = Arc::default();
        let rec = log.clone();
        let fake: FakeProbe = Arc::new(move |addr| {
            rec.lock().unwrap().push((addr, tokio::time::Instant::now()));
            Box::pin(async move {
                if Some(addr) == hung {
                    std::future::pending::<()>().await;
                }
                Ok(())
            })
        });
        (fake, log)
    }

    /// Real time on purpose: the prober's lateness is the runtime's own
    /// (a thread blocked past the timeout), which a paused clock cannot show.
    #[tokio::test(flavor = "current_thread")]
    async fn a_timeout_while_the_prober_is_behind_does_not_count_against_the_endpoint() {
        let addr: SocketAddr = "10.0.0.1:80".parse().unwrap();
        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let seen = calls.clone();
        let fake: FakeProbe = Arc::new(move |_| {
            let n = seen.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Box::pin(async move {
                if n == 0 {
                    return Ok(());
                }
                // The whole prober stalls (a starved core), and the endpoint
                // does not answer in time either.
                std::thread::sleep(Duration::from_millis(300));
                std::future::pending::<()>().await;
                Ok(())
            })
        });
        let prober = Prober::with_fake(Metrics::new().probe, fake);
        let key = ServiceKey::new("d", "web");
        prober.update_service(
            &key,
            &check(Duration::from_millis(100)),
            &Default::default(),
            &[Target::new(addr)],
        );
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert!(calls.load(std::sync::atomic::Ordering::Relaxed) >= 3, "probes ran");
        assert_eq!(
            prober.states(&key)[0].1.health,
            crate::health::state::Health::Healthy,
            "timeouts of a stalled prober were counted against the endpoint"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_hung_endpoint_does_not_delay_another() {
        let hung: SocketAddr = "10.0.0.1:80".parse().unwrap();
        let fine: SocketAddr = "10.0.0.2:80".parse().unwrap();
        let (fake, log) = recording(Some(hung));
        let metrics = Metrics::new().probe;
        let prober = Prober::with_fake(metrics.clone(), fake);
        let key = ServiceKey::new("d", "web");
        prober.update_service(
            &key,
            &check(Duration::from_secs(1)),
            &Default::default(),
            &[Target::new(hung), Target::new(fine)],
        );
        tokio::time::sleep(Duration::from_secs(20)).await;

        let times: Vec<_> = log
            .lock()
            .unwrap()
            .iter()
            .filter(|(a, _)| *a == fine)
            .map(|(_, t)| *t)
            .collect();
        assert!(
            times.len() >= 18,
            "{} probes of the healthy endpoint in 20 s",
            times.len()
        );
        for gap in times.windows(2).map(|w| w[1] - w[0]) {
            assert!(
                gap >= Duration::from_millis(950) && gap <= Duration::from_millis(1050),
                "the healthy endpoint's probes came {gap:?} apart, not every 1 s ± 5%"
            );
        }
        let states = prober.states(&key);
        assert_eq!(
            states[0].1.health,
            crate::health::state::Health::Unhealthy,
            "the hung one timed out"
        );
        assert_eq!(states[1].1.health, crate::health::state::Health::Healthy);
        assert_eq!(metrics.late.get(), 0, "nothing started late");
    }

    #[tokio::test(start_paused = true)]
    async fn probes_of_a_large_set_stay_spread_over_the_interval() {
        let (fake, log) = recording(None);
        let prober = Prober::with_fake(Metrics::new().probe, fake);
        let targets: Vec<Target> = (0..2000u32)
            .map(|i| Target::new(SocketAddr::from(([10, 1, (i / 250) as u8, (i % 250) as u8], 80))))
            .collect();
        let start = tokio::time::Instant::now();
        prober.update_service(
            &ServiceKey::new("d", "many"),
            &check(Duration::from_secs(1)),
            &Default::default(),
            &targets,
        );
        tokio::time::sleep(Duration::from_secs(5)).await;

        let log = log.lock().unwrap();
        // Every second of the five, in tenths: each tenth holds about a tenth
        // of the probes (200), never a burst.
        let mut tenths = [0usize; 50];
        for (_, t) in log.iter() {
            let i = ((*t - start).as_millis() / 100) as usize;
            if i < 50 {
                tenths[i] += 1;
            }
        }
        assert!(log.len() >= 9000, "{} probes of 2000 endpoints in 5 s", log.len());
        for (i, n) in tenths.iter().enumerate() {
            assert!(
                (120..=280).contains(n),
                "tenth {i} of the run held {n} probes, expected about 200: {tenths:?}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn rise_and_fall_count_consecutive_probes_on_their_intervals() {
        use crate::health::state::Health;
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
        // The endpoint answers while `up` is set; rise 3, fall 2, probes every
        // second, and every 5 s while down (`downInterval`).
        let addr: SocketAddr = "10.0.0.9:80".parse().unwrap();
        let up = Arc::new(AtomicBool::new(true));
        let probes = Arc::new(AtomicUsize::new(0));
        let (u, n) = (up.clone(), probes.clone());
        let fake: FakeProbe = Arc::new(move |_| {
            n.fetch_add(1, Relaxed);
            let ok = u.load(Relaxed);
            Box::pin(async move {
                if ok {
                    Ok(())
                } else {
                    Err(ProbeError::failed("connect: connection refused"))
                }
            })
        });
        let prober = Prober::with_fake(Metrics::new().probe, fake);
        let key = ServiceKey::new("d", "web");
        let hc = HealthCheck {
            rise: 3,
            fall: 2,
            down_interval: Duration::from_secs(5),
            ..check(Duration::from_secs(1))
        };
        prober.update_service(&key, &hc, &Default::default(), &[Target::new(addr)]);
        let health = || prober.states(&key)[0].1.health;
        // Waits (on the paused clock) until the `n`th probe has been counted;
        // returns when that was seen (up to one 5 ms step late, hence the
        // 10 ms of slack in the bounds below).
        let probe_number = |n: usize| {
            let probes = probes.clone();
            async move {
                while probes.load(Relaxed) < n {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                let at = tokio::time::Instant::now();
                // Let the probe task record the result.
                tokio::time::sleep(Duration::from_millis(1)).await;
                at
            }
        };

        probe_number(2).await;
        assert_eq!(health(), Health::Unknown, "two passes are fewer than rise 3");
        let third = probe_number(3).await;
        assert_eq!(health(), Health::Healthy, "three passes in a row");

        up.store(false, Relaxed);
        let fourth = probe_number(4).await;
        let gap = fourth - third;
        assert!(
            gap >= Duration::from_millis(940) && gap <= Duration::from_millis(1060),
            "healthy: every 1 s, got {gap:?}"
        );
        assert_eq!(health(), Health::Healthy, "one failure is fewer than fall 2");
        let fifth = probe_number(5).await;
        assert_eq!(health(), Health::Unhealthy, "two failures in a row");

        let sixth = probe_number(6).await;
        let gap = sixth - fifth;
        assert!(
            gap >= Duration::from_millis(4740) && gap <= Duration::from_millis(5260),
            "down: every 5 s (downInterval), got {gap:?}"
        );

        up.store(true, Relaxed);
        let seventh = probe_number(7).await;
        assert!(
            seventh - sixth >= Duration::from_millis(4740),
            "still down until a probe passes"
        );
        assert_eq!(health(), Health::Unhealthy, "one pass is fewer than rise 3");
        let eighth = probe_number(8).await;
        let gap = eighth - seventh;
        assert!(
            gap <= Duration::from_millis(1060),
            "after a pass, probes return to the 1 s interval, got {gap:?}"
        );
        assert_eq!(health(), Health::Unhealthy, "two passes are fewer than rise 3");
        probe_number(9).await;
        assert_eq!(health(), Health::Healthy, "back after three passes");
    }

    #[test]
    fn spread_and_jitter_stay_in_bounds() {
        let interval = Duration::from_secs(1);
        for _ in 0..1000 {
            assert!(spread(interval) < interval);
            let j = jitter(interval);
            assert!(
                j >= Duration::from_millis(950) && j <= Duration::from_millis(1050),
                "{j:?}"
            );
        }
    }
}
