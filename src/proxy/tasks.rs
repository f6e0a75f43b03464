//! Every long-lived task of the data plane (client connections, WebSocket and
//! upgrade tunnels, TCP copies) is spawned here, so shutdown can wait for all
//! of them within the grace period and then close what is left.
//!
//! A listener works in its own [`Tasks::scope`]: removing one listener drains
//! just its connections, while the root set still sees every task, so the
//! process does not exit under a tunnel that is still carrying bytes.

use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// A set of spawned tasks that can be waited for and, past a deadline, closed.
#[derive(Clone, Debug, Default)]
pub struct Tasks {
    own: TaskTracker,
    // The root set, when this is a scope of it.
    root: Option<TaskTracker>,
    kill: CancellationToken,
}

impl Tasks {
    /// An empty root set.
    pub fn new() -> Self {
        Self::default()
    }

    /// A subset that can be drained on its own; its tasks count in `self` too
    /// and are closed when `self` is.
    pub fn scope(&self) -> Self {
        Self {
            own: TaskTracker::new(),
            root: Some(self.root.clone().unwrap_or_else(|| self.own.clone())),
            kill: self.kill.child_token(),
        }
    }

    /// Spawns `task`; it is dropped (its sockets closed) if it is still
    /// running when the set's grace runs out.
    pub fn spawn<F>(&self, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let kill = self.kill.clone();
        let task = self.own.track_future(async move {
            tokio::select! {
                _ = task => {}
                _ = kill.cancelled() => {}
            }
        });
        match &self.root {
            Some(root) => tokio::spawn(root.track_future(task)),
            None => tokio::spawn(task),
        };
    }

    /// Spawns a task that ends itself once `closing` fires (to finish its
    /// bookkeeping, such as an access-log line), instead of being dropped.
    pub fn spawn_closable<F, Fut>(&self, task: F)
    where
        F: FnOnce(CancellationToken) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let task = self.own.track_future(task(self.kill.clone()));
        match &self.root {
            Some(root) => tokio::spawn(root.track_future(task)),
            None => tokio::spawn(task),
        };
    }

    /// How many tasks of this set are running.
    pub fn len(&self) -> usize {
        self.own.len()
    }

    /// Whether no task of this set is running.
    pub fn is_empty(&self) -> bool {
        self.own.is_empty()
    }

    /// Waits up to `grace` for every task to end, then drops the rest.
    /// Returns how many were still running when the grace ran out.
    pub async fn drain(&self, grace: Duration) -> usize {
        self.own.close();
        if tokio::time::timeout(grace, self.own.wait()).await.is_ok() {
            return 0;
        }
        let left = self.own.len();
        self.kill.cancel();
        self.own.wait().await;
        left
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn drain_waits_for_tasks_up_to_the_grace_then_drops_them() {
        let tasks = Tasks::new();
        let (quick_done, mut quick_rx) = tokio::sync::oneshot::channel::<()>();
        tasks.spawn(async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let _ = quick_done.send(());
        });
        let (slow_tx, slow_rx) = tokio::sync::oneshot::channel::<()>();
        tasks.spawn(async move {
            // Dropped, not finished: its sender goes with it.
            tokio::time::sleep(Duration::from_secs(3600)).await;
            let _ = slow_tx.send(());
        });
        let started = tokio::time::Instant::now();
        assert_eq!(
            tasks.drain(Duration::from_secs(5)).await,
            1,
            "one task outlived the grace"
        );
        assert_eq!(started.elapsed(), Duration::from_secs(5));
        assert!(quick_rx.try_recv().is_ok(), "the quick task finished on its own");
        assert!(slow_rx.await.is_err(), "the slow task was dropped");
    }

    #[tokio::test(start_paused = true)]
    async fn a_scope_drains_alone_and_its_tasks_count_in_the_root() {
        let root = Tasks::new();
        let listener = root.scope();
        listener.spawn(tokio::time::sleep(Duration::from_secs(2)));
        assert_eq!(
            (root.len(), listener.len()),
            (1, 1),
            "a scope's task counts in the root"
        );
        let started = tokio::time::Instant::now();
        assert_eq!(listener.drain(Duration::from_secs(10)).await, 0);
        assert_eq!(started.elapsed(), Duration::from_secs(2));

        let other = root.scope();
        other.spawn(std::future::pending());
        assert_eq!(
            root.drain(Duration::from_secs(1)).await,
            1,
            "the scope's task outlived the grace"
        );
        assert!(other.is_empty(), "closing the root closed the scope's task");
    }
}
