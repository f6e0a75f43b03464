//! Whether a failed attempt goes to another endpoint: nginx's
//! `proxy_next_upstream` rules plus an Envoy-style retry budget. Pure.
//!
//! [`decide`] is the one place the rules live: the attempt loop asks it after
//! every failure, and [`may_retry_after_send`] asks it in advance whether a
//! copy of the request is worth keeping.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use http::Method;

use crate::api::config::{BudgetPolicy, PassiveCondition, PassiveHealth, RetryCondition, RetryPolicy};

/// How one upstream attempt went wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Failure {
    /// No connection: nothing was sent, any request may go elsewhere.
    Connect(String),
    /// The endpoint took the request but did not process it (h2
    /// `REFUSED_STREAM`, a stream above a GOAWAY's last stream id, a
    /// connection that closed before the request went out): any request
    /// may go elsewhere, and it does not spend the retry budget (Envoy's
    /// `refused-stream`).
    Refused(String),
    /// Connect or response timeout.
    Timeout,
    /// The connection failed after the request was (maybe) sent.
    Error(String),
    /// The upstream's response header was malformed.
    InvalidHeader(String),
    /// The upstream answered with this status.
    Status(u16),
    /// The upstream answered a gRPC call with this status and no message
    /// (a trailers-only response: `grpc-status` in the response head).
    Grpc(u8),
    /// The proxy itself could not open a connection (out of descriptors,
    /// buffers or local ports): not the endpoint's fault, and no other
    /// endpoint would fare better.
    Local(String),
}

impl Failure {
    /// The `retry.on` condition this failure matches, if any.
    pub fn condition(&self) -> Option<RetryCondition> {
        Some(match self {
            Failure::Connect(_) | Failure::Refused(_) | Failure::Error(_) => RetryCondition::Error,
            Failure::Timeout => RetryCondition::Timeout,
            Failure::InvalidHeader(_) => RetryCondition::InvalidHeader,
            Failure::Status(500) => RetryCondition::Http500,
            Failure::Status(502) => RetryCondition::Http502,
            Failure::Status(503) => RetryCondition::Http503,
            Failure::Status(504) => RetryCondition::Http504,
            Failure::Status(403) => RetryCondition::Http403,
            Failure::Status(404) => RetryCondition::Http404,
            Failure::Status(429) => RetryCondition::Http429,
            Failure::Grpc(1) => RetryCondition::GrpcCancelled,
            Failure::Grpc(4) => RetryCondition::GrpcDeadlineExceeded,
            Failure::Grpc(8) => RetryCondition::GrpcResourceExhausted,
            Failure::Grpc(13) => RetryCondition::GrpcInternal,
            Failure::Grpc(14) => RetryCondition::GrpcUnavailable,
            Failure::Status(_) | Failure::Grpc(_) | Failure::Local(_) => return None,
        })
    }

    /// Whether passive health counts this failure against the endpoint.
    pub fn counts_for_passive(&self, passive: &PassiveHealth) -> bool {
        let condition = match self {
            Failure::Connect(_) | Failure::Refused(_) | Failure::Error(_) | Failure::InvalidHeader(_) => {
                PassiveCondition::Error
            }
            Failure::Timeout => PassiveCondition::Timeout,
            Failure::Status(500) => PassiveCondition::Http500,
            Failure::Status(502) => PassiveCondition::Http502,
            Failure::Status(503) => PassiveCondition::Http503,
            Failure::Status(504) => PassiveCondition::Http504,
            Failure::Status(_) | Failure::Grpc(_) | Failure::Local(_) => return false,
        };
        passive.on.contains(&condition)
    }
}

impl std::fmt::Display for Failure {
    /// The failure as one line of text, as answers and logs give it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Connect(e) => write!(f, "connect: {e}"),
            Failure::Refused(e) => write!(f, "not processed: {e}"),
            Failure::Timeout => f.write_str("timeout"),
            Failure::Error(e) => f.write_str(e),
            Failure::InvalidHeader(e) => write!(f, "invalid response header: {e}"),
            Failure::Status(s) => write!(f, "status {s}"),
            Failure::Grpc(s) => write!(f, "grpc-status {s}"),
            Failure::Local(e) => write!(f, "local: {e}"),
        }
    }
}

/// The status of a gRPC answer given in its head (a trailers-only
/// response, the form a server uses when it has no message to send).
pub fn grpc_status(headers: &http::HeaderMap) -> Option<u8> {
    const GRPC_STATUS: http::HeaderName = http::HeaderName::from_static("grpc-status");
    std::str::from_utf8(headers.get(GRPC_STATUS)?.as_bytes())
        .ok()?
        .parse()
        .ok()
}

/// Methods nginx refuses to resend after they were sent (`non_idempotent`).
pub fn is_idempotent(method: &Method) -> bool {
    !matches!(method.as_str(), "POST" | "PATCH" | "LOCK")
}

/// What a retry decision looks at.
#[derive(Clone, Debug)]
pub struct Attempted<'a> {
    /// The failure of the last attempt.
    pub failure: &'a Failure,
    /// The request's method.
    pub method: &'a Method,
    /// The request body can be sent again (buffered or empty).
    pub replayable: bool,
    /// The request is a gRPC call (`content-type: application/grpc*`).
    pub grpc: bool,
    /// Attempts made so far.
    pub attempts: u32,
    /// Endpoints in the service (the limit when `tries` is 0).
    pub endpoints: u32,
    /// Time since the first attempt.
    pub elapsed: Duration,
}

/// Why a failure is not retried; `None` from [`decide`] means retry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NoRetry {
    /// The condition is not in `retry.on`.
    NotConfigured,
    /// POST/PATCH/LOCK already sent, and `NonIdempotent` is not in `retry.on`.
    NonIdempotent,
    /// The body was streamed and cannot be sent again.
    BodyNotBuffered,
    /// `retry.tries` reached.
    TriesExhausted,
    /// `retry.timeout` passed.
    TimeoutExceeded,
    /// The retry budget (`retry.budget`) is spent.
    BudgetExhausted,
}

/// Decides whether the attempt described by `a` may be retried under `policy`.
pub fn decide(policy: &RetryPolicy, a: &Attempted<'_>) -> Result<RetryCondition, NoRetry> {
    let condition = match a.failure {
        // A gRPC client sees a call whose connection broke before any answer
        // as UNAVAILABLE, and gRPC's own retry policy resends it under
        // `retryableStatusCodes: [UNAVAILABLE]`: a stopping grpcio server
        // closes the connections of calls it had taken but not started.
        Failure::Error(_) if a.grpc && policy.retries_on(RetryCondition::GrpcUnavailable) => {
            RetryCondition::GrpcUnavailable
        }
        f => f.condition().ok_or(NoRetry::NotConfigured)?,
    };
    if !policy.retries_on(condition) {
        return Err(NoRetry::NotConfigured);
    }
    // gRPC calls are all POSTs: a gRPC condition in `retry.on` is the
    // service saying its calls may be retried on that status.
    let nothing_sent = matches!(a.failure, Failure::Connect(_) | Failure::Refused(_));
    if !nothing_sent
        && !condition.is_grpc()
        && !is_idempotent(a.method)
        && !policy.retries_on(RetryCondition::NonIdempotent)
    {
        return Err(NoRetry::NonIdempotent);
    }
    if !a.replayable {
        return Err(NoRetry::BodyNotBuffered);
    }
    let limit = if policy.tries == 0 { a.endpoints } else { policy.tries };
    if a.attempts >= limit {
        return Err(NoRetry::TriesExhausted);
    }
    if policy.timeout.is_some_and(|t| a.elapsed >= t) {
        return Err(NoRetry::TimeoutExceeded);
    }
    Ok(condition)
}

/// Whether a request could still go elsewhere if it fails after being sent
/// (so the caller keeps a copy of what it sends): some failure that can
/// follow a send passes [`decide`]. `a.failure` is ignored.
pub fn may_retry_after_send(policy: &RetryPolicy, a: &Attempted<'_>) -> bool {
    policy.on.iter().any(|&condition| {
        after_send(condition)
            .iter()
            .any(|failure| decide(policy, &Attempted { failure, ..a.clone() }).is_ok())
    })
}

/// Failures that can follow a send and match `condition`.
fn after_send(condition: RetryCondition) -> &'static [Failure] {
    use RetryCondition::*;
    match condition {
        // A refused stream is resent whatever the method; a reset is not.
        Error => const { &[Failure::Refused(String::new()), Failure::Error(String::new())] },
        Timeout => &[Failure::Timeout],
        InvalidHeader => const { &[Failure::InvalidHeader(String::new())] },
        Http500 => &[Failure::Status(500)],
        Http502 => &[Failure::Status(502)],
        Http503 => &[Failure::Status(503)],
        Http504 => &[Failure::Status(504)],
        Http403 => &[Failure::Status(403)],
        Http404 => &[Failure::Status(404)],
        Http429 => &[Failure::Status(429)],
        GrpcCancelled => &[Failure::Grpc(1)],
        GrpcDeadlineExceeded => &[Failure::Grpc(4)],
        GrpcResourceExhausted => &[Failure::Grpc(8)],
        GrpcInternal => &[Failure::Grpc(13)],
        GrpcUnavailable => &[Failure::Grpc(14)],
        NonIdempotent => &[],
    }
}

/// Retries allowed by recent traffic (Gateway API GEP-3388 `retryConstraint`,
/// Linkerd's retry budget): within any `interval`, retries may be up to
/// `percent` of the requests seen plus `min_count` per `min_interval`.
///
/// It counts arrivals, not requests in flight: when several requests are stuck
/// on one hung endpoint and time out together, all of them may retry as long
/// as the service as a whole is not retrying more than its share.
/// Counting is approximate under races (a bucket reset can lose a count), like
/// the counters of the proxies it copies.
#[derive(Debug)]
pub struct RetryBudget {
    requests: Window,
    retries: Window,
}

/// Number of buckets a window slides over.
const BUCKETS: usize = 10;

/// A sliding count over `BUCKETS` buckets of `width` milliseconds.
#[derive(Debug)]
struct Window {
    width: AtomicU64,
    epochs: [AtomicU64; BUCKETS],
    counts: [AtomicU64; BUCKETS],
}

impl Window {
    fn new(span: Duration) -> Self {
        Self {
            width: AtomicU64::new(Self::width_of(span)),
            epochs: Default::default(),
            counts: Default::default(),
        }
    }

    fn width_of(span: Duration) -> u64 {
        (span.as_millis() as u64 / BUCKETS as u64).max(1)
    }

    fn set_span(&self, span: Duration) {
        self.width.store(Self::width_of(span), Ordering::Relaxed);
    }

    fn add(&self, now_ms: u64) {
        let epoch = now_ms / self.width.load(Ordering::Relaxed) + 1;
        let i = (epoch % BUCKETS as u64) as usize;
        if self.epochs[i].load(Ordering::Relaxed) != epoch {
            self.epochs[i].store(epoch, Ordering::Relaxed);
            self.counts[i].store(0, Ordering::Relaxed);
        }
        self.counts[i].fetch_add(1, Ordering::Relaxed);
    }

    fn sum(&self, now_ms: u64) -> u64 {
        let epoch = now_ms / self.width.load(Ordering::Relaxed) + 1;
        let oldest = epoch.saturating_sub(BUCKETS as u64 - 1);
        (0..BUCKETS)
            .filter(|&i| (oldest..=epoch).contains(&self.epochs[i].load(Ordering::Relaxed)))
            .map(|i| self.counts[i].load(Ordering::Relaxed))
            .sum()
    }
}

impl RetryBudget {
    /// A budget with `policy`'s window.
    pub fn new(policy: &BudgetPolicy) -> Self {
        Self {
            requests: Window::new(policy.interval),
            retries: Window::new(policy.interval),
        }
    }

    /// Follows a changed `interval` (counts made with the old one blur for one window).
    pub fn set_window(&self, policy: &BudgetPolicy) {
        self.requests.set_span(policy.interval);
        self.retries.set_span(policy.interval);
    }

    /// Counts a request (or TCP connection) arriving at `now_ms`.
    pub fn deposit(&self, now_ms: u64) {
        self.requests.add(now_ms);
    }

    /// Takes one retry at `now_ms` if `policy` allows it.
    pub fn try_withdraw(&self, policy: &BudgetPolicy, now_ms: u64) -> bool {
        let requests = self.requests.sum(now_ms);
        let floor = u64::from(policy.min_count) * policy.interval.as_millis() as u64
            / (policy.min_interval.as_millis() as u64).max(1);
        let allowed = requests * u64::from(policy.percent) / 100 + floor;
        if self.retries.sum(now_ms) >= allowed {
            return false;
        }
        self.retries.add(now_ms);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(on: &[RetryCondition], tries: u32) -> RetryPolicy {
        RetryPolicy {
            on: on.to_vec(),
            tries,
            timeout: Some(Duration::from_secs(10)),
            max_body_bytes: 65536,
            budget: budget(20, 10),
            per_try_timeout: None,
            hedge: false,
        }
    }

    fn attempt<'a>(failure: &'a Failure, method: &'a Method) -> Attempted<'a> {
        Attempted {
            failure,
            method,
            replayable: true,
            grpc: false,
            attempts: 1,
            endpoints: 3,
            elapsed: Duration::ZERO,
        }
    }

    use RetryCondition::*;

    #[test]
    fn only_configured_conditions_retry() {
        let p = policy(&[Error, Timeout], 3);
        let get = Method::GET;
        assert_eq!(decide(&p, &attempt(&Failure::Timeout, &get)), Ok(Timeout));
        assert_eq!(
            decide(&p, &attempt(&Failure::Status(502), &get)),
            Err(NoRetry::NotConfigured)
        );
        let p = policy(&[Http502], 3);
        assert_eq!(decide(&p, &attempt(&Failure::Status(502), &get)), Ok(Http502));
        assert_eq!(
            decide(&p, &attempt(&Failure::Status(418), &get)),
            Err(NoRetry::NotConfigured)
        );
    }

    #[test]
    fn post_is_retried_after_send_only_with_non_idempotent() {
        let post = Method::POST;
        let sent = Failure::Error("connection reset".into());
        assert_eq!(
            decide(&policy(&[Error], 3), &attempt(&sent, &post)),
            Err(NoRetry::NonIdempotent)
        );
        assert_eq!(
            decide(&policy(&[Error, NonIdempotent], 3), &attempt(&sent, &post)),
            Ok(Error)
        );
        let unsent = Failure::Connect("refused".into());
        assert_eq!(
            decide(&policy(&[Error], 3), &attempt(&unsent, &post)),
            Ok(Error),
            "nothing was sent"
        );
        assert!(is_idempotent(&Method::PUT) && is_idempotent(&Method::DELETE));
        assert!(!is_idempotent(&Method::PATCH));
    }

    #[test]
    fn grpc_statuses_retry_calls_when_named_and_only_then() {
        let post = Method::POST;
        let unavailable = Failure::Grpc(14);
        assert_eq!(
            decide(&policy(&[Error, Timeout], 3), &attempt(&unavailable, &post)),
            Err(NoRetry::NotConfigured)
        );
        assert_eq!(
            decide(&policy(&[GrpcUnavailable], 3), &attempt(&unavailable, &post)),
            Ok(GrpcUnavailable),
            "a gRPC POST needs no NonIdempotent"
        );
        assert_eq!(
            decide(&policy(&[GrpcUnavailable], 3), &attempt(&Failure::Grpc(13), &post)),
            Err(NoRetry::NotConfigured)
        );
        assert_eq!(Failure::Grpc(2).condition(), None, "UNKNOWN has no condition");
        let streamed = Attempted {
            replayable: false,
            ..attempt(&unavailable, &post)
        };
        assert_eq!(
            decide(&policy(&[GrpcUnavailable], 3), &streamed),
            Err(NoRetry::BodyNotBuffered)
        );
        assert!(may_retry_after_send(
            &policy(&[GrpcUnavailable], 3),
            &attempt(&Failure::Timeout, &post)
        ));
        let mut head = http::HeaderMap::new();
        assert_eq!(grpc_status(&head), None);
        head.insert("grpc-status", http::HeaderValue::from_static("14"));
        assert_eq!(grpc_status(&head), Some(14));
        head.insert("grpc-status", http::HeaderValue::from_static("x"));
        assert_eq!(grpc_status(&head), None);
    }

    #[test]
    fn a_grpc_call_whose_connection_broke_is_unavailable_to_the_retry_rules() {
        let post = Method::POST;
        let broke = Failure::Error("stream closed because of a broken pipe".into());
        let call = Attempted {
            grpc: true,
            ..attempt(&broke, &post)
        };
        assert_eq!(decide(&policy(&[GrpcUnavailable], 3), &call), Ok(GrpcUnavailable));
        assert_eq!(
            decide(&policy(&[Error, Timeout], 3), &call),
            Err(NoRetry::NonIdempotent),
            "without GrpcUnavailable a sent call is a POST like any other"
        );
        assert_eq!(
            decide(&policy(&[GrpcUnavailable], 3), &attempt(&broke, &post)),
            Err(NoRetry::NotConfigured),
            "a POST that is not gRPC is not made retryable by a gRPC condition"
        );
        assert_eq!(
            decide(
                &policy(&[GrpcUnavailable], 3),
                &Attempted {
                    grpc: true,
                    ..attempt(&Failure::Timeout, &post)
                }
            ),
            Err(NoRetry::NotConfigured),
            "a timeout is DEADLINE_EXCEEDED's business, not UNAVAILABLE's"
        );
    }

    #[test]
    fn tries_timeout_and_streamed_bodies_stop_retries() {
        let get = Method::GET;
        let f = Failure::Timeout;
        let p = policy(&[Timeout], 2);
        assert_eq!(
            decide(
                &p,
                &Attempted {
                    attempts: 2,
                    ..attempt(&f, &get)
                }
            ),
            Err(NoRetry::TriesExhausted)
        );
        let per_endpoint = policy(&[Timeout], 0);
        assert!(
            decide(
                &per_endpoint,
                &Attempted {
                    attempts: 2,
                    ..attempt(&f, &get)
                }
            )
            .is_ok()
        );
        assert_eq!(
            decide(
                &per_endpoint,
                &Attempted {
                    attempts: 3,
                    ..attempt(&f, &get)
                }
            ),
            Err(NoRetry::TriesExhausted)
        );
        assert_eq!(
            decide(
                &p,
                &Attempted {
                    elapsed: Duration::from_secs(11),
                    ..attempt(&f, &get)
                }
            ),
            Err(NoRetry::TimeoutExceeded)
        );
        assert_eq!(
            decide(
                &p,
                &Attempted {
                    replayable: false,
                    ..attempt(&f, &get)
                }
            ),
            Err(NoRetry::BodyNotBuffered)
        );
    }

    #[test]
    fn passive_health_counts_errors_and_timeouts_but_not_5xx_by_default() {
        let passive = PassiveHealth {
            max_fails: 1,
            fail_timeout: Duration::from_secs(10),
            on: vec![PassiveCondition::Error, PassiveCondition::Timeout],
        };
        assert!(Failure::Connect("x".into()).counts_for_passive(&passive));
        assert!(Failure::Timeout.counts_for_passive(&passive));
        assert!(!Failure::Status(500).counts_for_passive(&passive));
        let with_5xx = PassiveHealth {
            on: vec![PassiveCondition::Http500],
            ..passive
        };
        assert!(Failure::Status(500).counts_for_passive(&with_5xx));
    }

    fn budget(percent: u32, min_count: u32) -> BudgetPolicy {
        BudgetPolicy {
            percent,
            interval: Duration::from_secs(10),
            min_count,
            min_interval: Duration::from_secs(1),
        }
    }

    #[test]
    fn budget_allows_a_share_of_recent_requests_plus_the_floor() {
        let p = budget(20, 0);
        let b = RetryBudget::new(&p);
        for t in 0..100 {
            b.deposit(1_000 + t);
        }
        let granted = (0..50).filter(|_| b.try_withdraw(&p, 1_200)).count();
        assert_eq!(granted, 20, "20% of 100 requests");
        let p = budget(20, 10);
        let b = RetryBudget::new(&p);
        let granted = (0..200).filter(|_| b.try_withdraw(&p, 500)).count();
        assert_eq!(granted, 100, "no traffic yet: the floor, 10/s over a 10 s window");
    }

    #[test]
    fn many_requests_failing_together_may_all_retry() {
        // 16 requests stuck on a hung endpoint time out at the same moment,
        // among 1,600 req/s: every one of them gets its retry.
        let p = budget(20, 10);
        let b = RetryBudget::new(&p);
        for ms in 0..3_000u64 {
            if ms % 10 < 16 {
                b.deposit(ms);
            }
        }
        assert!((0..16).all(|_| b.try_withdraw(&p, 3_000)));
    }

    #[test]
    fn the_window_slides_and_old_requests_stop_counting() {
        let p = budget(50, 0);
        let b = RetryBudget::new(&p);
        for _ in 0..10 {
            b.deposit(0);
        }
        assert!((0..5).all(|_| b.try_withdraw(&p, 100)));
        assert!(!b.try_withdraw(&p, 100), "half of 10 spent");
        assert!(
            !b.try_withdraw(&p, 20_000),
            "20 s later the requests are out of the window"
        );
        for _ in 0..4 {
            b.deposit(20_000);
        }
        assert!((0..2).all(|_| b.try_withdraw(&p, 20_001)));
        assert!(!b.try_withdraw(&p, 20_001));
    }
}
