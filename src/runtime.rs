//! The async runtime: one worker thread per core the process may use.
//!
//! With a single core (a pinned proxy, a 1-CPU container limit) the
//! current-thread scheduler is used: every task runs on the thread that polls
//! the sockets, with none of the work-stealing bookkeeping a one-worker
//! multi-thread runtime still pays per wake-up. `BALANCED_WORKERS=N` overrides
//! the count; `BALANCED_RUNTIME=multi-thread` keeps the multi-thread scheduler
//! even with one worker.

use std::io;

/// Builds the runtime for this process.
pub fn build() -> io::Result<tokio::runtime::Runtime> {
    let workers = std::env::var("BALANCED_WORKERS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|n| *n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let multi = std::env::var("BALANCED_RUNTIME").is_ok_and(|v| v == "multi-thread");
    if workers == 1 && !multi {
        tokio::runtime::Builder::new_current_thread().enable_all().build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .enable_all()
            .build()
    }
}
