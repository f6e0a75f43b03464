//! Overload protection (`spec.limits.maxRequests` / `maxPendingRequests`,
//! Envoy's circuit-breaker thresholds): at most `max` requests of a service in
//! flight; a bounded number wait for a slot, for a bounded time; the rest are
//! refused at once, so a sick backend does not collect an unbounded pile of
//! requests (and client connections) in the proxy.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::Notify;

/// The in-flight count of one service and its waiters.
#[derive(Debug, Default)]
pub struct RequestGate {
    in_flight: AtomicUsize,
    waiting: AtomicUsize,
    freed: Notify,
}

/// Why a request was not let through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Overflow {
    /// `max` in flight and `max_pending` already waiting.
    QueueFull,
    /// Waited the whole queue timeout for a slot.
    Waited(Duration),
}

/// A request's slot; freed (and the next waiter woken) on drop.
#[derive(Debug)]
pub struct Pass(Arc<RequestGate>);

impl Drop for Pass {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
        self.0.freed.notify_one();
    }
}

impl RequestGate {
    /// Requests in flight through the gate.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Requests waiting for a slot.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    fn try_take(self: &Arc<Self>, max: usize) -> Option<Pass> {
        self.in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1))
            .ok()
            .map(|_| Pass(self.clone()))
    }

    /// A slot for one request: at once if fewer than `max` are in flight, else
    /// after waiting (if fewer than `max_pending` wait) up to `wait`.
    /// `max == 0` is no limit: nothing is counted.
    pub async fn admit(
        self: &Arc<Self>,
        max: usize,
        max_pending: usize,
        wait: Duration,
    ) -> Result<Option<Pass>, Overflow> {
        if max == 0 {
            return Ok(None);
        }
        if let Some(pass) = self.try_take(max) {
            return Ok(Some(pass));
        }
        if self
            .waiting
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max_pending).then_some(n + 1)
            })
            .is_err()
        {
            return Err(Overflow::QueueFull);
        }
        let _waiting = Waiting(self);
        let waited = tokio::time::timeout(wait, async {
            loop {
                let freed = self.freed.notified();
                tokio::pin!(freed);
                // Registered before the check, so a slot freed in between wakes us.
                freed.as_mut().enable();
                if let Some(pass) = self.try_take(max) {
                    return pass;
                }
                freed.await;
            }
        })
        .await;
        waited.map(Some).map_err(|_| Overflow::Waited(wait))
    }
}

struct Waiting<'a>(&'a RequestGate);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::AcqRel);
        // A waiter that gives up may have been the one woken for a free slot.
        if self.0.in_flight.load(Ordering::Acquire) > 0 {
            self.0.freed.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn no_limit_counts_nothing() {
        let gate = Arc::new(RequestGate::default());
        assert!(gate.admit(0, 0, Duration::ZERO).await.unwrap().is_none());
        assert_eq!(gate.in_flight(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn beyond_max_requests_wait_then_beyond_pending_are_refused() {
        let gate = Arc::new(RequestGate::default());
        let wait = Duration::from_secs(1);
        let a = gate.admit(2, 1, wait).await.unwrap();
        let _b = gate.admit(2, 1, wait).await.unwrap();
        assert_eq!(gate.in_flight(), 2);

        // The third waits for a slot; the fourth finds the queue full.
        let g = gate.clone();
        let third = tokio::spawn(async move { g.admit(2, 1, wait).await });
        tokio::task::yield_now().await;
        assert_eq!(gate.waiting(), 1);
        assert_eq!(gate.admit(2, 1, wait).await.unwrap_err(), Overflow::QueueFull);

        // A finished request lets the waiting one through.
        drop(a);
        let _third = third.await.unwrap().unwrap().expect("a slot");
        assert_eq!((gate.in_flight(), gate.waiting()), (2, 0));

        // Nobody finishes: the waiter gives up after the queue timeout.
        let started = tokio::time::Instant::now();
        assert_eq!(gate.admit(2, 1, wait).await.unwrap_err(), Overflow::Waited(wait));
        assert_eq!(started.elapsed(), wait);
        assert_eq!(gate.waiting(), 0);
    }
}
