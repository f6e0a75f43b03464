//! What every listener's accept loop shares, HTTP or TCP: room under
//! `limits.maxConnections` (the oldest idle connection closed to make it),
//! accepts backed off when the process is out of descriptors, the
//! per-client limit, and the drain when the listener stops.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use super::access::AccessLog;
use super::client::conn::{ConnCounters, ConnState, ConnTable, Registration};
use super::service::ServiceRuntime;
use super::tasks::Tasks;
use crate::throttle::LogThrottle;

/// How listeners serve, whatever the service: set by the command line.
#[derive(Clone, Debug)]
pub struct Serving {
    /// Time in-flight requests get to finish on shutdown.
    pub grace: Duration,
    /// Where access-log lines go, when asked for.
    pub access_log: Option<AccessLog>,
}

impl Default for Serving {
    fn default() -> Self {
        Self {
            grace: Duration::from_secs(30),
            access_log: None,
        }
    }
}

/// A listener's accept loop: hands out connections the limits admit.
pub struct Gatekeeper {
    acceptor: Acceptor,
    table: Arc<ConnTable>,
    counters: Arc<ConnCounters>,
    what: String,
    full: LogThrottle,
    refused: LogThrottle,
    tunnels: bool,
}

/// An admitted connection.
pub struct Admitted {
    /// The client's socket.
    pub stream: TcpStream,
    /// The client's address.
    pub peer: SocketAddr,
    /// What the connection's task and its requests share.
    pub state: Arc<ConnState>,
    /// Keeps the connection counted: hold it as long as the connection lives.
    pub held: Held,
}

/// A connection's place in its listener's table and open-connections gauge,
/// given back when dropped.
pub struct Held {
    _registration: Registration,
    counters: Arc<ConnCounters>,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.counters.open.dec();
    }
}

impl Gatekeeper {
    /// The accept loop of `listener`, named `name` in `service`. With
    /// `tunnels` every connection is a byte stream (a TCP listener): never
    /// idle in the eviction sense, however quiet it looks.
    pub fn new(listener: TcpListener, service: &ServiceRuntime, name: &str, tunnels: bool) -> Self {
        Self {
            acceptor: Acceptor::new(listener),
            table: Arc::new(ConnTable::default()),
            counters: Arc::new(ConnCounters::new(service.metrics(), service.label(), name)),
            what: format!("{}/{name}", service.key),
            full: LogThrottle::new(Duration::from_secs(10)),
            refused: LogThrottle::new(Duration::from_secs(10)),
            tunnels,
        }
    }

    /// The listener's counters.
    pub fn counters(&self) -> &Arc<ConnCounters> {
        &self.counters
    }

    /// `namespace/name/listener`, for logs.
    pub fn what(&self) -> &str {
        &self.what
    }

    /// The next connection within `service`'s limits; `None` on `stop`.
    pub async fn next(&mut self, service: &ServiceRuntime, stop: &CancellationToken) -> Option<Admitted> {
        loop {
            let max = service.current().config.limits.max_connections;
            if !room(&self.table, max, &self.counters, &self.full, &self.what, stop).await {
                return None;
            }
            let (stream, peer) = self.acceptor.accept(stop).await?;
            let state = Arc::new(ConnState::new(peer));
            if self.tunnels {
                state.set_tunnel();
            }
            let per_client = service.current().config.limits.max_connections_per_client;
            let Ok(registration) = self.table.admit(&state, per_client) else {
                self.counters.per_client.inc();
                if let Some(n) = self.refused.hit() {
                    tracing::warn!(listener = %self.what, client = %peer.ip(), max = per_client, times = n, "spec.limits.maxConnectionsPerClient reached; connection closed");
                }
                continue;
            };
            self.counters.open.inc();
            return Some(Admitted {
                stream,
                peer,
                state,
                held: Held {
                    _registration: registration,
                    counters: self.counters.clone(),
                },
            });
        }
    }

    /// Stops accepting and asks every connection to close, then gives them
    /// (and `tasks`) `grace` to finish.
    pub async fn drain(self, tasks: &Tasks, grace: Duration) {
        // Close the listening socket now: connections that reach it during the
        // grace would wait in its backlog and never be served.
        drop(self.acceptor);
        self.table.close_all();
        let left = tasks.drain(grace).await;
        if left > 0 {
            tracing::warn!(?grace, listener = %self.what, connections = left, "grace period over; closed the remaining connections and tunnels");
        }
    }
}

/// Accepts connections, backing off when the process is out of descriptors
/// (as tokio's and hyper's examples do) and logging failures at most once a second.
struct Acceptor {
    listener: TcpListener,
    failures: LogThrottle,
    backoff: Duration,
}

impl Acceptor {
    fn new(listener: TcpListener) -> Self {
        Self {
            listener,
            failures: LogThrottle::new(Duration::from_secs(1)),
            backoff: Duration::ZERO,
        }
    }

    async fn accept(&mut self, stop: &CancellationToken) -> Option<(TcpStream, SocketAddr)> {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return None,
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        self.backoff = Duration::ZERO;
                        let _ = stream.set_nodelay(true);
                        return Some((stream, peer));
                    }
                    Err(e) => {
                        self.backoff = (self.backoff * 2).clamp(Duration::from_millis(5), Duration::from_secs(1));
                        if let Some(n) = self.failures.hit() {
                            let local = self.listener.local_addr().ok();
                            tracing::warn!(error = %e, times = n, backoff = ?self.backoff, listen = ?local, "accept failed; backing off");
                        }
                        tokio::select! {
                            _ = stop.cancelled() => return None,
                            _ = tokio::time::sleep(self.backoff) => {}
                        }
                    }
                },
            }
        }
    }
}

/// Waits for room under `limits.maxConnections`, closing the oldest idle
/// connection to make it; false on shutdown.
async fn room(
    table: &ConnTable,
    max: usize,
    counters: &ConnCounters,
    full: &LogThrottle,
    what: &str,
    stop: &CancellationToken,
) -> bool {
    while table.len() >= max {
        if table.evict_oldest_idle() {
            counters.evicted.inc();
        } else {
            counters.at_max.inc();
            if let Some(n) = full.hit() {
                tracing::warn!(
                    listener = what,
                    max_connections = max,
                    times = n,
                    "spec.limits.maxConnections reached with no idle connection to close; new connections wait"
                );
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return false,
            _ = table.freed() => {}
            // An evicted h2 connection may take a moment to send GOAWAY and go.
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    }
    true
}
