//! The policies routes and services share (retries, their budget, rate
//! limits), validated. Their own module so `config` and `route` both use
//! them without using each other.

use std::time::Duration;

use super::spec::RetryCondition;

/// A validated `spec.rateLimit`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RateLimit {
    /// Requests per `per` (at least 1).
    pub requests: u32,
    /// The period.
    pub per: Duration,
    /// Requests beyond the rate held or let through.
    pub burst: u32,
    /// Hold the burst (leaky bucket) rather than pass it at once (token bucket).
    pub delay: bool,
    /// What requests are counted by.
    pub key: RateLimitKey,
}

impl RateLimit {
    /// The share one of `replicas` proxies enforces: the rate and burst divided
    /// among them (at least one request, at least one replica).
    pub fn per_replica(&self, replicas: u32) -> RateLimit {
        let n = replicas.max(1);
        RateLimit {
            requests: (self.requests / n).max(1),
            burst: self.burst / n,
            ..self.clone()
        }
    }
}

/// What a rate limit counts requests by.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RateLimitKey {
    /// One bucket.
    None,
    /// The client IP.
    SourceIp,
    /// A header's value.
    Header(http::HeaderName),
    /// A cookie's value.
    Cookie(String),
}

/// Retry settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Conditions that retry.
    pub on: Vec<RetryCondition>,
    /// Total attempts; 0 is one per endpoint.
    pub tries: u32,
    /// Overall retry deadline; `None` is no limit.
    pub timeout: Option<Duration>,
    /// Largest request body buffered for replay.
    pub max_body_bytes: u64,
    /// How many retries recent traffic allows.
    pub budget: BudgetPolicy,
    /// One attempt's wait for its response head; `None`: the response timeout.
    pub per_try_timeout: Option<Duration>,
    /// After `per_try_timeout`, another attempt races the first.
    pub hedge: bool,
}

/// The retry budget: `percent` of the requests seen over `interval`, plus a
/// floor of `min_count` retries per `min_interval`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BudgetPolicy {
    /// Retries as a percentage of requests, 0..=100.
    pub percent: u32,
    /// Window over which requests and retries are counted.
    pub interval: Duration,
    /// Retries always allowed per `min_interval`.
    pub min_count: u32,
    /// The floor's interval.
    pub min_interval: Duration,
}

impl RetryPolicy {
    /// How long one attempt waits for its response head, given the route's
    /// response timeout: the per-try timeout, unless it hedges (then the
    /// first attempt goes on waiting beside the second).
    pub fn attempt_timeout(&self, response: Duration) -> Duration {
        match self.per_try_timeout {
            Some(t) if !self.hedge => t.min(response),
            _ => response,
        }
    }

    /// Whether `condition` is in `retry.on`.
    pub fn retries_on(&self, condition: RetryCondition) -> bool {
        self.on.contains(&condition)
    }
}
