//! The attempt loop every listener kind shares (HTTP requests, upgrades, TCP
//! connections): pick an endpoint not tried yet, let the caller make one
//! attempt, then settle its outcome: live counters, passive health, the retry
//! decision ([`decide`], pure) and the retry budget.
//!
//! It is a state machine with no I/O, so the caller owns the await and the
//! request, and the loop is tested without sockets:
//!
//! ```text
//! let mut attempts = Attempts::new(&service, &config, &snap, key);
//! while let Some(i) = attempts.next_endpoint() {
//!     match try_endpoint(i).await {
//!         Ok(answer) => { attempts.succeeded(i); return answer }
//!         Err(failure) => if !attempts.failed(i, failure, request) { break },
//!     }
//! }
//! answer_with(attempts.exhausted())
//! ```

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use http::Method;
use tokio::time::Instant;

use super::access::Flags;
use super::retry::{self, Attempted, Failure, NoRetry, decide};
use super::service::{Current, ServiceRuntime};
use super::upstream::pool::Pool;
use crate::api::config::{Config, RetryPolicy};
use crate::balance::{ActiveGuard, Snapshot, Tried, now_ms};

/// What the retry rules need to know about the request being attempted.
#[derive(Clone, Copy, Debug)]
pub struct RequestFacts<'a> {
    /// The HTTP method; `None` for a TCP connection.
    pub method: Option<&'a Method>,
    /// The request body can be sent again.
    pub replayable: bool,
    /// The request is a gRPC call (`content-type: application/grpc*`).
    pub grpc: bool,
}

impl RequestFacts<'_> {
    /// A TCP connection or an upgrade: nothing is replayed but the connect.
    pub const CONNECTION: RequestFacts<'static> = RequestFacts {
        method: None,
        replayable: true,
        grpc: false,
    };
}

/// The attempts of one request against one snapshot.
pub struct Attempts<'a> {
    service: &'a ServiceRuntime,
    config: &'a Config,
    retry: &'a RetryPolicy,
    snap: &'a Snapshot,
    key: Option<u64>,
    groups: u64,
    started: Instant,
    tried: Tried,
    last: Option<(SocketAddr, Failure)>,
    errors: Vec<(SocketAddr, Failure)>,
    refused: Option<NoRetry>,
}

/// Why the attempts ended without an answer to pass on.
#[derive(Debug)]
pub struct Exhausted {
    /// The last endpoint tried and its failure; `None` when no endpoint could be picked.
    pub last: Option<(SocketAddr, Failure)>,
    /// Endpoints tried.
    pub tries: usize,
    /// Every failure, in order (kept only with `debug.errorDetail`).
    pub errors: Vec<(SocketAddr, Failure)>,
    /// Why the last failure was not retried, when the rules or the budget said no.
    pub refused: Option<NoRetry>,
}

impl<'a> Attempts<'a> {
    /// Starts the attempts of one request (counted by the retry budget).
    pub fn new(service: &'a ServiceRuntime, config: &'a Config, snap: &'a Snapshot, key: Option<u64>) -> Self {
        service.budget.deposit(service.budget_now());
        Self {
            service,
            config,
            retry: &config.retry,
            snap,
            key,
            // `default`: TCP connections and requests no route took.
            groups: 1,
            started: Instant::now(),
            tried: Tried::default(),
            last: None,
            errors: Vec::new(),
            refused: None,
        }
    }

    /// Retries by a route's policy instead of the service's (the budget stays
    /// the service's).
    pub fn with_retry(mut self, retry: &'a RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// Keeps every attempt inside the groups in `groups` (a route's backend).
    pub fn within(mut self, groups: u64) -> Self {
        self.groups = groups;
        self
    }

    /// The next endpoint to try (an index into the snapshot's members), or
    /// `None` when every candidate was tried.
    pub fn next_endpoint(&mut self) -> Option<usize> {
        let i = self
            .service
            .balancer
            .pick_in(self.snap, &self.tried, self.key, now_ms(), self.groups)?;
        self.tried.add(i);
        Some(i)
    }

    /// Endpoints tried so far.
    pub fn tries(&self) -> usize {
        self.tried.len()
    }

    /// Whether a request that fails after being sent could still be retried
    /// (so the caller keeps a copy of what it sends): [`retry::may_retry_after_send`].
    pub fn may_retry_after_send(&self, request: RequestFacts<'_>) -> bool {
        retry::may_retry_after_send(self.retry, &self.attempted(&Failure::Timeout, request))
    }

    /// Whether the rules would retry this request after it timed out once
    /// sent (`Timeout` in `retry.on`, an idempotent method or
    /// `NonIdempotent`, a buffered body): what a hedge after
    /// `retry.perTryTimeout` needs, since it sends the request again.
    pub fn may_hedge(&self, request: RequestFacts<'_>) -> bool {
        decide(self.retry, &self.attempted(&Failure::Timeout, request)).is_ok()
    }

    fn attempted<'f>(&self, failure: &'f Failure, request: RequestFacts<'f>) -> Attempted<'f> {
        Attempted {
            failure,
            method: request.method.unwrap_or(&Method::GET),
            replayable: request.replayable,
            grpc: request.grpc,
            attempts: self.tried.len() as u32,
            endpoints: self.snap.members.len() as u32,
            elapsed: self.started.elapsed(),
        }
    }

    /// The attempt on endpoint `i` succeeded (a connection, or an answer that
    /// is not a retry condition).
    pub fn succeeded(&mut self, i: usize) {
        self.snap.members[i].endpoint.passive.record_success();
    }

    /// Endpoint `i` answered `status` (and, for a gRPC call answered in its
    /// head, `grpc` status): true when that answer should be retried
    /// elsewhere (a `retry.on` status within the rules and budget), false when
    /// it goes to the client.
    pub fn answered(&mut self, i: usize, status: u16, grpc: Option<u8>, request: RequestFacts<'_>) -> bool {
        let failure = match grpc {
            Some(code) if status == 200 => Failure::Grpc(code),
            _ => Failure::Status(status),
        };
        let retryable = failure.condition().is_some_and(|c| self.retry.retries_on(c));
        if retryable {
            return self.failed(i, failure, request);
        }
        let member = &self.snap.members[i];
        member.endpoint.stats.record_status(status);
        if failure.counts_for_passive(&self.config.passive) {
            self.service.record_failure(self.config, member, &failure);
        } else {
            member.endpoint.passive.record_success();
        }
        false
    }

    /// No connection to endpoint `i` could be had: nothing was sent, so
    /// even a body that cannot be sent twice can still go elsewhere.
    pub fn unreached(&mut self, i: usize, failure: Failure, request: RequestFacts<'_>) -> bool {
        let untouched = RequestFacts {
            replayable: true,
            ..request
        };
        self.failed(i, failure, untouched)
    }

    /// Endpoint `i` failed: counts it, and says whether to try another.
    pub fn failed(&mut self, i: usize, failure: Failure, request: RequestFacts<'_>) -> bool {
        let member = &self.snap.members[i];
        match &failure {
            Failure::Status(s) => member.endpoint.stats.record_status(*s),
            Failure::Grpc(_) => member.endpoint.stats.record_status(200),
            // Our own exhaustion says nothing about the endpoint.
            Failure::Local(_) => {}
            f => member.endpoint.stats.record_failure(*f == Failure::Timeout),
        }
        self.service.record_failure(self.config, member, &failure);
        let decision = decide(self.retry, &self.attempted(&failure, request));
        let verdict = decision.and_then(|condition| {
            // A request the endpoint never processed is resent for free.
            if matches!(failure, Failure::Refused(_))
                || self
                    .service
                    .budget
                    .try_withdraw(&self.config.retry.budget, self.service.budget_now())
            {
                Ok(condition)
            } else {
                self.service.record_budget_refusal();
                Err(NoRetry::BudgetExhausted)
            }
        });
        let addr = member.spec.addr;
        tracing::debug!(service = %self.service.key, endpoint = %addr, failure = ?failure, verdict = ?verdict, "attempt failed");
        if self.config.error_detail {
            self.errors.push((addr, failure.clone()));
        }
        self.last = Some((addr, failure));
        match verdict {
            Ok(condition) => {
                self.service.record_retry(condition.name());
                tracing::debug!(service = %self.service.key, endpoint = %addr, reason = condition.name(), "retrying on another endpoint");
                true
            }
            Err(why) => {
                self.refused = Some(why);
                false
            }
        }
    }

    /// Endpoint `i` has not answered within `retry.perTryTimeout` while a
    /// hedge goes elsewhere: a timeout for passive health (as it would be
    /// without hedging), so an endpoint that hangs is ejected rather than
    /// costing every request routed to it a per-try wait. The attempt itself
    /// runs on and may still win.
    pub fn late(&mut self, i: usize) {
        self.service
            .record_failure(self.config, &self.snap.members[i], &Failure::Timeout);
    }

    /// Whether another attempt may race the ones in flight (`retry.hedge`,
    /// after `retry.perTryTimeout`): within `retry.tries` and `retry.timeout`,
    /// and paid for by the retry budget as a retry is.
    pub fn hedge(&mut self) -> bool {
        let members = self.snap.members.len();
        let limit = match self.retry.tries {
            0 => members,
            n => (n as usize).min(members),
        };
        if self.tried.len() >= limit || self.retry.timeout.is_some_and(|t| self.started.elapsed() >= t) {
            return false;
        }
        if !self
            .service
            .budget
            .try_withdraw(&self.config.retry.budget, self.service.budget_now())
        {
            self.service.record_budget_refusal();
            return false;
        }
        self.service.record_retry("Hedge");
        true
    }

    /// How the attempts ended.
    pub fn exhausted(self) -> Exhausted {
        Exhausted {
            tries: self.tried.len(),
            last: self.last,
            errors: self.errors,
            refused: self.refused,
        }
    }
}

impl Exhausted {
    /// Envoy's flags for attempts that ended without an answer: `UH` when no
    /// endpoint passes its health checks (even if the unhealthy ones were
    /// tried as a last resort), `UO` when the healthy ones were all at
    /// `maxConnections`, then what the last attempt met.
    pub fn flags(&self, snap: &Snapshot) -> Flags {
        let mut flags = Flags::default();
        let healthy = snap.members.iter().filter(|m| m.spec.serves()).count();
        if healthy == 0 {
            flags.set(Flags::NO_HEALTHY_UPSTREAM);
        }
        match &self.last {
            None if healthy > 0 => flags.set(Flags::UPSTREAM_OVERFLOW),
            Some((_, Failure::Connect(_))) => flags.set(Flags::UPSTREAM_CONNECT_FAILURE),
            Some((_, Failure::Timeout)) => flags.set(Flags::UPSTREAM_TIMEOUT),
            _ => {}
        }
        if self.tries > 1 {
            flags.set(Flags::RETRIES_EXHAUSTED);
        }
        flags
    }
}

/// A connection to an endpoint, counted on it while held.
pub struct Connected<S> {
    /// The connection.
    pub stream: S,
    /// Counts the connection on its endpoint.
    pub guard: ActiveGuard,
    /// The endpoint.
    pub endpoint: SocketAddr,
    /// Endpoints tried to get it.
    pub tries: usize,
}

/// Connects through `listener`'s pools with `open`, one endpoint after
/// another as `attempts` allows: what TCP listeners and upgrades share, so
/// both get the tries, timeout, budget and passive accounting a request gets.
pub async fn connect<S, F, Fut>(
    mut attempts: Attempts<'_>,
    current: &Current,
    listener: usize,
    open: F,
) -> Result<Connected<S>, Exhausted>
where
    F: Fn(Arc<Pool>) -> Fut,
    Fut: Future<Output = Result<S, Failure>>,
{
    while let Some(i) = attempts.next_endpoint() {
        let member = &current.snap.members[i];
        let guard = ActiveGuard::new(member.endpoint.clone());
        match open(current.pool(listener, i).clone()).await {
            Ok(stream) => {
                attempts.succeeded(i);
                return Ok(Connected {
                    stream,
                    guard,
                    endpoint: member.spec.addr,
                    tries: attempts.tries(),
                });
            }
            Err(failure) => {
                if !attempts.failed(i, failure, RequestFacts::CONNECTION) {
                    break;
                }
            }
        }
    }
    Err(attempts.exhausted())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::api::config::RetryCondition;
    use crate::api::load::load_configs;
    use crate::balance::MemberSpec;
    use crate::metrics::Metrics;

    fn runtime(yaml_extra: &str, healthy: &[bool]) -> (Arc<ServiceRuntime>, Arc<Config>) {
        let yaml = format!(
            "apiVersion: balanced.dev/v1alpha1\nkind: BalancedService\nmetadata: {{name: t}}\nspec:\n  endpoints: [{}]\n  listeners: [{{name: http, port: 8080}}]\n{yaml_extra}",
            (0..healthy.len())
                .map(|i| format!("{{address: 127.0.0.1, port: {}}}", 9000 + i))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let cfg = Arc::new(load_configs(&yaml).expect("valid spec").remove(0));
        let rt = ServiceRuntime::new(cfg.clone(), Metrics::new().proxy);
        let members = cfg
            .endpoints
            .iter()
            .zip(healthy)
            .map(|(e, h)| MemberSpec {
                draining: false,
                addr: e.addr,
                weight: e.weight,
                backup: e.backup,
                max_connections: 0,
                healthy: *h,
                ports: Vec::new(),
                groups: 1,
            })
            .collect();
        rt.update(cfg.clone(), members);
        (rt, cfg)
    }

    const GET: RequestFacts<'static> = RequestFacts {
        method: Some(&Method::GET),
        replayable: true,
        grpc: false,
    };

    #[tokio::test]
    async fn each_endpoint_is_tried_once_up_to_tries() {
        let (rt, cfg) = runtime("  retry: {tries: 0}\n", &[true, true, true]);
        let snap = rt.current().snap.clone();
        let mut a = Attempts::new(&rt, &cfg, &snap, None);
        let mut seen = Vec::new();
        while let Some(i) = a.next_endpoint() {
            seen.push(i);
            if !a.failed(i, Failure::Connect("refused".into()), GET) {
                break;
            }
        }
        seen.sort();
        assert_eq!(seen, vec![0, 1, 2], "tries: 0 is one per endpoint, none twice");
        let end = a.exhausted();
        assert_eq!(end.tries, 3);
        assert_eq!(end.refused, Some(NoRetry::TriesExhausted));
    }

    #[tokio::test]
    async fn hedges_stay_within_tries_the_budget_and_the_rules() {
        let hedging = "  retry: {tries: 2, perTryTimeout: 100ms, hedge: true}\n";
        let (rt, cfg) = runtime(hedging, &[true, true, true]);
        let snap = rt.current().snap.clone();
        let mut a = Attempts::new(&rt, &cfg, &snap, None);
        assert!(a.may_hedge(GET));
        let post = RequestFacts {
            method: Some(&Method::POST),
            replayable: true,
            grpc: false,
        };
        assert!(!a.may_hedge(post), "a POST would run twice");
        let streamed = RequestFacts {
            replayable: false,
            ..GET
        };
        assert!(!a.may_hedge(streamed), "a streamed body cannot be sent twice");
        a.next_endpoint().unwrap();
        assert!(a.hedge(), "one more is within tries: 2");
        a.next_endpoint().unwrap();
        assert!(!a.hedge(), "a third is not");

        // Fewer endpoints than tries: no hedge once each was asked.
        let (rt, cfg) = runtime(hedging.replace("tries: 2", "tries: 3").as_str(), &[true, true]);
        let snap = rt.current().snap.clone();
        let mut a = Attempts::new(&rt, &cfg, &snap, None);
        a.next_endpoint().unwrap();
        assert!(a.hedge());
        a.next_endpoint().unwrap();
        assert!(!a.hedge(), "both endpoints are racing already");

        // No budget left: no hedge, and it is counted as a refusal.
        let broke = "  retry: {perTryTimeout: 100ms, hedge: true, budget: {percent: 0, minRetryRate: {count: 0}}}\n";
        let (rt, cfg) = runtime(broke, &[true, true, true]);
        let snap = rt.current().snap.clone();
        let mut a = Attempts::new(&rt, &cfg, &snap, None);
        a.next_endpoint().unwrap();
        assert!(!a.hedge());
    }

    #[tokio::test]
    async fn a_status_in_retry_on_goes_elsewhere_and_others_go_to_the_client() {
        let (rt, cfg) = runtime("  retry: {on: [Http503]}\n", &[true, true]);
        let snap = rt.current().snap.clone();
        let mut a = Attempts::new(&rt, &cfg, &snap, None);
        let i = a.next_endpoint().unwrap();
        assert!(a.answered(i, 503, None, GET), "503 is in retry.on");
        let j = a.next_endpoint().unwrap();
        assert_ne!(i, j);
        assert!(!a.answered(j, 500, None, GET), "500 is not");
        assert_eq!(cfg.retry.on, vec![RetryCondition::Http503]);
    }

    #[tokio::test]
    async fn a_connect_failure_of_a_post_is_retried_but_a_reset_is_not() {
        let (rt, cfg) = runtime("", &[true, true, true]);
        let snap = rt.current().snap.clone();
        let post = RequestFacts {
            method: Some(&Method::POST),
            replayable: true,
            grpc: false,
        };
        let mut a = Attempts::new(&rt, &cfg, &snap, None);
        let i = a.next_endpoint().unwrap();
        assert!(
            a.failed(i, Failure::Connect("refused".into()), post),
            "nothing was sent"
        );
        let j = a.next_endpoint().unwrap();
        assert!(!a.failed(j, Failure::Error("reset".into()), post));
        assert_eq!(a.exhausted().refused, Some(NoRetry::NonIdempotent));
    }

    #[tokio::test]
    async fn a_spent_budget_refuses_the_retry_and_says_so() {
        let (rt, cfg) = runtime(
            "  retry: {budget: {percent: 0, minRetryRate: {count: 1, interval: 10s}}}\n",
            &[true, true, true],
        );
        let snap = rt.current().snap.clone();
        let mut a = Attempts::new(&rt, &cfg, &snap, None);
        let i = a.next_endpoint().unwrap();
        assert!(a.failed(i, Failure::Timeout, GET), "the floor allows one");
        let j = a.next_endpoint().unwrap();
        assert!(!a.failed(j, Failure::Timeout, GET));
        assert_eq!(a.exhausted().refused, Some(NoRetry::BudgetExhausted));
    }

    #[tokio::test(start_paused = true)]
    async fn the_budget_refills_as_its_window_slides() {
        let (rt, cfg) = runtime(
            "  retry: {tries: 0, budget: {percent: 0, interval: 10s, minRetryRate: {count: 1, interval: 10s}}}\n",
            &[true, true, true],
        );
        let snap = rt.current().snap.clone();
        let spend = || {
            let mut a = Attempts::new(&rt, &cfg, &snap, None);
            let i = a.next_endpoint().unwrap();
            a.failed(i, Failure::Timeout, GET)
        };
        assert!(spend(), "one retry per 10 s window");
        assert!(!spend(), "spent");
        tokio::time::advance(std::time::Duration::from_secs(5)).await;
        assert!(!spend(), "still inside the window");
        tokio::time::advance(std::time::Duration::from_secs(6)).await;
        assert!(spend(), "the first retry left the window");
    }

    #[tokio::test(start_paused = true)]
    async fn an_ejected_endpoint_returns_when_its_fail_timeout_ends() {
        let (rt, cfg) = runtime(
            "  algorithm: RoundRobin\n  passiveHealth: {maxFails: 2, failTimeout: 10s}\n  retry: {tries: 0}\n",
            &[true, true],
        );
        let snap = rt.current().snap.clone();
        let fail_first = || {
            let member = &snap.members[0];
            rt.record_failure(&cfg, member, &Failure::Connect("refused".into()));
        };
        let picks = |n: usize| {
            (0..n)
                .map(|_| Attempts::new(&rt, &cfg, &snap, None).next_endpoint().unwrap())
                .collect::<Vec<_>>()
        };
        fail_first();
        tokio::time::advance(Duration::from_secs(11)).await;
        fail_first();
        assert!(
            picks(4).contains(&0),
            "two failures 11 s apart are not two within failTimeout 10 s"
        );
        fail_first();
        assert_eq!(picks(4), vec![1; 4], "two failures within 10 s eject for 10 s");
        tokio::time::advance(Duration::from_secs(9)).await;
        assert_eq!(picks(4), vec![1; 4], "still ejected after 9 s");
        tokio::time::advance(Duration::from_millis(1001)).await;
        assert!(picks(4).contains(&0), "back after failTimeout");
    }

    #[tokio::test]
    async fn when_every_endpoint_is_down_all_are_tried_anyway() {
        let (rt, cfg) = runtime("  retry: {tries: 0}\n", &[false, true, false]);
        let snap = rt.current().snap.clone();
        let mut a = Attempts::new(&rt, &cfg, &snap, None);
        let first = a.next_endpoint().unwrap();
        assert_eq!(first, 1, "the healthy one first");
        assert!(a.failed(first, Failure::Connect("refused".into()), GET));
        // The healthy endpoint was tried (and is now ejected): the rest are
        // still tried rather than giving up.
        let mut rest = vec![a.next_endpoint().unwrap()];
        assert!(a.failed(rest[0], Failure::Connect("refused".into()), GET));
        rest.push(a.next_endpoint().unwrap());
        rest.sort();
        assert_eq!(rest, vec![0, 2]);
    }
}
