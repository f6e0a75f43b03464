//! Whether a failed attempt goes to another endpoint: nginx's
//! `proxy_next_upstream` rules plus an Envoy-style retry budget. Pure.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use http::Method;

use crate::api::config::{PassiveCondition, PassiveHealth, RetryCondition, RetryPolicy};

/// How one upstream attempt went wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Failure {
    /// No connection: nothing was sent, any request may go elsewhere.
    Connect(String),
    /// Connect or response timeout.
    Timeout,
    /// The connection failed after the request was (maybe) sent.
    Error(String),
    /// The upstream's response header was malformed.
    InvalidHeader(String),
    /// The upstream answered with this status.
    Status(u16),
}

impl Failure {
    /// The `retry.on` condition this failure matches, if any.
    pub fn condition(&self) -> Option<RetryCondition> {
        Some(match self {
            Failure::Connect(_) | Failure::Error(_) => RetryCondition::Error,
            Failure::Timeout => RetryCondition::Timeout,
            Failure::InvalidHeader(_) => RetryCondition::InvalidHeader,
            Failure::Status(500) => RetryCondition::Http500,
            Failure::Status(502) => RetryCondition::Http502,
            Failure::Status(503) => RetryCondition::Http503,
            Failure::Status(504) => RetryCondition::Http504,
            Failure::Status(403) => RetryCondition::Http403,
            Failure::Status(404) => RetryCondition::Http404,
            Failure::Status(429) => RetryCondition::Http429,
            Failure::Status(_) => return None,
        })
    }

    /// Whether passive health counts this failure against the endpoint.
    pub fn counts_for_passive(&self, passive: &PassiveHealth) -> bool {
        let condition = match self {
            Failure::Connect(_) | Failure::Error(_) | Failure::InvalidHeader(_) => PassiveCondition::Error,
            Failure::Timeout => PassiveCondition::Timeout,
            Failure::Status(500) => PassiveCondition::Http500,
            Failure::Status(502) => PassiveCondition::Http502,
            Failure::Status(503) => PassiveCondition::Http503,
            Failure::Status(504) => PassiveCondition::Http504,
            Failure::Status(_) => return false,
        };
        passive.on.contains(&condition)
    }
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
}

/// Decides whether the attempt described by `a` may be retried under `policy`.
pub fn decide(policy: &RetryPolicy, a: &Attempted<'_>) -> Result<RetryCondition, NoRetry> {
    let condition = a.failure.condition().ok_or(NoRetry::NotConfigured)?;
    if !policy.retries_on(condition) {
        return Err(NoRetry::NotConfigured);
    }
    let nothing_sent = matches!(a.failure, Failure::Connect(_));
    if !nothing_sent && !is_idempotent(a.method) && !policy.retries_on(RetryCondition::NonIdempotent) {
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

/// Caps retries in flight at 20% of requests in flight, with a floor of 3
/// (Envoy's and Linkerd's budgets), so a sick service is not hit by a retry storm.
#[derive(Debug, Default)]
pub struct RetryBudget {
    requests: AtomicU64,
    retries: AtomicU64,
}

/// Releases a request (or retry) slot of a [`RetryBudget`] when dropped.
#[derive(Debug)]
pub struct BudgetGuard<'a>(&'a AtomicU64);

impl Drop for BudgetGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl RetryBudget {
    /// Counts a request in flight.
    pub fn request(&self) -> BudgetGuard<'_> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        BudgetGuard(&self.requests)
    }

    /// Takes a retry slot, or `None` when the budget is spent.
    pub fn try_retry(&self) -> Option<BudgetGuard<'_>> {
        let allowed = (self.requests.load(Ordering::Relaxed) / 5).max(3);
        let prev = self.retries.fetch_add(1, Ordering::Relaxed);
        if prev >= allowed {
            self.retries.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        Some(BudgetGuard(&self.retries))
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
        }
    }

    fn attempt<'a>(failure: &'a Failure, method: &'a Method) -> Attempted<'a> {
        Attempted {
            failure,
            method,
            replayable: true,
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

    #[test]
    fn budget_allows_three_then_a_fifth_of_requests() {
        let b = RetryBudget::default();
        let _requests: Vec<_> = (0..5).map(|_| b.request()).collect();
        let held: Vec<_> = (0..3).map(|_| b.try_retry().expect("floor of 3")).collect();
        assert!(b.try_retry().is_none());
        drop(held);
        let _more: Vec<_> = (0..20).map(|_| b.request()).collect();
        let held: Vec<_> = (0..5).map(|_| b.try_retry().expect("20% of 25")).collect();
        assert!(b.try_retry().is_none());
        drop(held);
        assert!(b.try_retry().is_some());
    }
}
