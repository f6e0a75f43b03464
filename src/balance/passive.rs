//! Passive ejection (nginx `max_fails` / `fail_timeout`): `maxFails` failures
//! within `failTimeout` take an endpoint out of rotation for `failTimeout`.
//!
//! Lock-free atomics on the request path; the counting is approximate under
//! races (two failures landing together may both start a window), as nginx's
//! per-worker counters are.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// Milliseconds since the first call: the monotonic clock ejection windows use
/// (tokio's, so tests can run it paused).
pub fn now_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    // Start at 1 so that 0 can mean "never".
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

/// Failure window and ejection state of one endpoint.
#[derive(Debug, Default)]
pub struct Passive {
    fails: AtomicU32,
    window_start: AtomicU64,
    ejected_until: AtomicU64,
}

impl Passive {
    /// Counts a failure at `now`; true when this failure ejects the endpoint.
    pub fn record_failure(&self, now: u64, max_fails: u32, fail_timeout: Duration) -> bool {
        if max_fails == 0 {
            return false;
        }
        let window = fail_timeout.as_millis() as u64;
        let start = self.window_start.load(Ordering::Relaxed);
        let fails = if start == 0 || now.saturating_sub(start) >= window {
            self.window_start.store(now, Ordering::Relaxed);
            self.fails.store(1, Ordering::Relaxed);
            1
        } else {
            self.fails.fetch_add(1, Ordering::Relaxed) + 1
        };
        if fails >= max_fails && !self.is_ejected(now) {
            self.ejected_until.store(now + window, Ordering::Relaxed);
            self.fails.store(0, Ordering::Relaxed);
            self.window_start.store(0, Ordering::Relaxed);
            return true;
        }
        false
    }

    /// A success ends the failure run (nginx resets `fails` the same way).
    pub fn record_success(&self) {
        if self.fails.load(Ordering::Relaxed) != 0 {
            self.fails.store(0, Ordering::Relaxed);
        }
    }

    /// Ends an ejection early (an active probe passed: Envoy's
    /// `successful_active_health_check_uneject_host`); true when one was in force.
    pub fn lift(&self, now: u64) -> bool {
        let was = self.is_ejected(now);
        if was {
            self.ejected_until.store(0, Ordering::Relaxed);
        }
        self.fails.store(0, Ordering::Relaxed);
        self.window_start.store(0, Ordering::Relaxed);
        was
    }

    /// Whether the endpoint is ejected at `now`.
    pub fn is_ejected(&self, now: u64) -> bool {
        now < self.ejected_until.load(Ordering::Relaxed)
    }

    /// Remaining ejection at `now`.
    pub fn ejected_for(&self, now: u64) -> Option<Duration> {
        let until = self.ejected_until.load(Ordering::Relaxed);
        (now < until).then(|| Duration::from_millis(until - now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEN_S: Duration = Duration::from_secs(10);

    #[test]
    fn max_fails_within_the_window_ejects_for_fail_timeout() {
        let p = Passive::default();
        assert!(!p.record_failure(1_000, 3, TEN_S));
        assert!(!p.record_failure(2_000, 3, TEN_S));
        assert!(p.record_failure(3_000, 3, TEN_S));
        assert!(p.is_ejected(3_000) && p.is_ejected(12_999));
        assert!(!p.is_ejected(13_000), "ejection lasts fail_timeout");
    }

    #[test]
    fn failures_spread_wider_than_the_window_do_not_eject() {
        let p = Passive::default();
        assert!(!p.record_failure(1_000, 2, TEN_S));
        assert!(
            !p.record_failure(11_000, 2, TEN_S),
            "the first failure's window has closed"
        );
        assert!(p.record_failure(12_000, 2, TEN_S));
    }

    #[test]
    fn lifting_ends_an_ejection_at_once() {
        let p = Passive::default();
        assert!(p.record_failure(1_000, 1, TEN_S));
        assert!(p.lift(2_000), "it was ejected");
        assert!(!p.is_ejected(2_000));
        assert!(!p.lift(2_001), "nothing left to lift");
        assert!(p.record_failure(2_500, 1, TEN_S), "a new failure ejects again");
    }

    #[test]
    fn success_resets_the_run_and_zero_disables() {
        let p = Passive::default();
        p.record_failure(1_000, 2, TEN_S);
        p.record_success();
        assert!(!p.record_failure(1_500, 2, TEN_S));
        let off = Passive::default();
        for t in 0..100 {
            assert!(!off.record_failure(t, 0, TEN_S));
        }
        assert!(!off.is_ejected(50));
    }
}
