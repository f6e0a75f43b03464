//! Rate-limited logging: a condition that can repeat thousands of times a
//! second (accept failing on EMFILE, a connection limit reached) is logged at
//! most once per interval, with how many times it happened since.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// Lets one log line through per interval and counts the rest.
#[derive(Debug)]
pub struct LogThrottle {
    interval: Duration,
    last: Mutex<Option<Instant>>,
    since: AtomicU64,
}

impl LogThrottle {
    /// At most one line per `interval`.
    pub const fn new(interval: Duration) -> Self {
        Self {
            interval,
            last: Mutex::new(None),
            since: AtomicU64::new(0),
        }
    }

    /// Records one occurrence; `Some(n)` when it is time to log, `n` being the
    /// occurrences since the last line (this one included).
    pub fn hit(&self) -> Option<u64> {
        self.since.fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_some_and(|at| now.duration_since(at) < self.interval) {
            return None;
        }
        *last = Some(now);
        Some(self.since.swap(0, Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn one_line_per_interval_with_the_count() {
        let t = LogThrottle::new(Duration::from_secs(1));
        assert_eq!(t.hit(), Some(1));
        for _ in 0..20 {
            assert_eq!(t.hit(), None);
        }
        tokio::time::advance(Duration::from_millis(1001)).await;
        assert_eq!(t.hit(), Some(21), "twenty held back plus this one");
        assert_eq!(t.hit(), None);
    }
}
