//! Accept loops for HTTP and TCP listeners: `spec.limits` on connections
//! (the oldest idle one closed to make room), accept failures backed off,
//! each HTTP connection on its own clock (see `conn`), idle TCP connections
//! closed, and graceful shutdown (GOAWAY on h2, close-after-response on
//! HTTP/1, in-flight requests finished within a grace period).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::access::{self, AccessLog, Entry};
use super::answer::failure_text;
use super::attempt::{Attempts, RequestFacts};
use super::conn::Activity;
use super::conn::{ClientIo, Clock, ConnCounters, ConnState, ConnTable};
use super::headers::Downstream;
use super::http::HttpProxy;
use super::service::{ActiveGuard, ServiceRuntime};
use super::tasks::Tasks;
use crate::api::config::ListenerProtocol;
use crate::throttle::LogThrottle;

/// The most an h2 stream queues for a client beyond its flow-control window.
const H2_SEND_BUFFER: usize = 32 * 1024;

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

/// Serves HTTP/1.1 and h2c on `listener` until `stop`, then drains.
pub async fn serve_http(
    listener: TcpListener,
    proxy: Arc<HttpProxy>,
    serving: Serving,
    tasks: Tasks,
    stop: CancellationToken,
) {
    let service = proxy.service().clone();
    let what = format!("{}/{}", service.key, proxy.listener());
    let counters = Arc::new(ConnCounters::new(service.metrics(), service.label(), proxy.listener()));
    let table = Arc::new(ConnTable::default());
    let (full, refused) = (
        LogThrottle::new(Duration::from_secs(10)),
        LogThrottle::new(Duration::from_secs(10)),
    );
    let mut acceptor = Acceptor::new(listener);
    loop {
        let limits = service.current().config.limits.clone();
        if !room(&table, limits.max_connections, &counters, &full, &what, &stop).await {
            break;
        }
        let Some((stream, peer)) = acceptor.accept(&stop).await else {
            break;
        };
        let current = service.current();
        let state = Arc::new(ConnState::new(peer));
        let registration = match table.admit(&state, usize::MAX, current.config.limits.max_connections_per_client) {
            Ok(r) => r,
            Err(_) => {
                counters.per_client.inc();
                if let Some(n) = refused.hit() {
                    tracing::warn!(listener = %what, client = %peer.ip(), max = current.config.limits.max_connections_per_client, times = n, "spec.limits.maxConnectionsPerClient reached; connection closed");
                }
                continue;
            }
        };
        let clock = Clock {
            request_header: current.config.timeouts.request_header,
            idle: current.config.timeouts.idle_for(ListenerProtocol::Http),
            max_uri: current.config.limits.max_uri_bytes,
            response_write: current.config.timeouts.response_write,
        };
        let max_headers = current.config.limits.max_request_headers_bytes;
        let max_fields = current.config.limits.max_request_headers;
        drop(current);
        let io = ClientIo::new(stream, state.clone(), clock, counters.clone());
        let proxy = proxy.clone();
        let counters = counters.clone();
        let conn_tasks = tasks.clone();
        tasks.spawn(async move {
            let _registration = registration;
            counters.open.inc();
            let _open = scopeguard(|| {
                counters.open.dec();
            });
            serve_connection(io, proxy, state, clock, (max_headers, max_fields), conn_tasks).await;
        });
    }
    // Close the listening socket now: connections that reach it during the
    // grace would wait in its backlog and never be served.
    drop(acceptor);
    table.close_all();
    let left = tasks.drain(serving.grace).await;
    if left > 0 {
        tracing::warn!(grace = ?serving.grace, listener = %what, connections = left, "grace period over; closed the remaining connections and tunnels");
    }
}

/// One client connection: sniff the protocol, serve it with hyper, and close
/// it gracefully when asked (shutdown, eviction, h2 idle).
async fn serve_connection(
    mut io: ClientIo,
    proxy: Arc<HttpProxy>,
    state: Arc<ConnState>,
    clock: Clock,
    (max_headers, max_fields): (usize, usize),
    tasks: Tasks,
) {
    // A connection that has not sent its first bytes is idle: evictable.
    let sniffed = tokio::select! {
        s = io.sniff() => s,
        _ = state.close_asked() => None,
    };
    let Some(h2) = sniffed else {
        return;
    };
    let client = Arc::new(Downstream::new(state.peer, state.clone(), tasks));
    let service = service_fn(move |req| {
        let flight = client.conn.begin();
        let proxy = proxy.clone();
        let client = client.clone();
        async move { Ok::<_, Infallible>(proxy.handle(req, &client, flight).await) }
    });
    let io = TokioIo::new(io);
    let peer = state.peer;
    let close = state.close_asked();
    tokio::pin!(close);
    let result = if h2 {
        let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .max_concurrent_streams(100)
            .max_header_list_size(max_headers as u32)
            // What one stream may queue beyond the client's flow-control
            // window (hyper: 400 KiB): a client that opens a window and never
            // reads would otherwise hold that much per stream.
            .max_send_buf_size(H2_SEND_BUFFER)
            .keep_alive_interval(Some(Duration::from_secs(30)))
            .serve_connection(io, service);
        tokio::pin!(conn);
        tokio::select! {
            r = conn.as_mut() => r,
            _ = &mut close => {
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        }
    } else {
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            // Our clock (ClientIo) keeps the header and idle deadlines apart
            // and always fires first; hyper's, set past ours, only makes
            // hyper read (so ours is armed) as soon as a connection goes idle.
            .header_read_timeout(clock.idle + clock.request_header + Duration::from_secs(1))
            // hyper's buffer cannot be smaller than 8 KiB; validation keeps
            // the limit at or above 1 KiB, and the smaller limit is checked
            // on the parsed head.
            .max_buf_size(max_headers.max(8192))
            .max_headers(max_fields)
            // Small answers: one flattened buffer per write beats writev's iovecs
            // (A/B: about 4% less CPU per request).
            .writev(false)
            .keep_alive(true)
            .serve_connection(io, service)
            .with_upgrades();
        tokio::pin!(conn);
        tokio::select! {
            r = conn.as_mut() => r,
            _ = &mut close => {
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        }
    };
    if let Err(e) = result {
        tracing::debug!(%peer, error = %e, "client connection ended with an error");
    }
}

/// Serves a TCP listener: one endpoint per connection, bytes copied both ways
/// with half-close, until `stop`; a connection with no bytes either way for
/// `timeouts.idle` is closed; open connections get the grace period.
pub async fn serve_tcp(
    listener: TcpListener,
    service: Arc<ServiceRuntime>,
    name: String,
    serving: Serving,
    tasks: Tasks,
    stop: CancellationToken,
) {
    let what = format!("{}/{}", service.key, name);
    let counters = Arc::new(ConnCounters::new(service.metrics(), service.label(), &name));
    let table = Arc::new(ConnTable::default());
    let (full, refused) = (
        LogThrottle::new(Duration::from_secs(10)),
        LogThrottle::new(Duration::from_secs(10)),
    );
    let mut acceptor = Acceptor::new(listener);
    loop {
        let limits = service.current().config.limits.clone();
        if !room(&table, limits.max_connections, &counters, &full, &what, &stop).await {
            break;
        }
        let Some((mut client, peer)) = acceptor.accept(&stop).await else {
            break;
        };
        let state = Arc::new(ConnState::new(peer));
        // A TCP connection is never idle in the eviction sense: it may be
        // mid-stream however quiet it looks.
        state.set_tunnel();
        let registration = match table.admit(&state, usize::MAX, limits.max_connections_per_client) {
            Ok(r) => r,
            Err(_) => {
                counters.per_client.inc();
                if let Some(n) = refused.hit() {
                    tracing::warn!(listener = %what, client = %peer.ip(), max = limits.max_connections_per_client, times = n, "spec.limits.maxConnectionsPerClient reached; connection closed");
                }
                continue;
            }
        };
        let idle = service.current().config.timeouts.idle_for(ListenerProtocol::Tcp);
        let service = service.clone();
        let name = name.clone();
        let counters = counters.clone();
        let log = serving.access_log.clone();
        tasks.spawn_closable(|kill| async move {
            let _registration = registration;
            counters.open.inc();
            let _open = scopeguard(|| {
                counters.open.dec();
            });
            let (start, started) = (SystemTime::now(), Instant::now());
            let mut up = access::Upstream::default();
            let activity = Activity::new();
            if let Some((mut upstream, _guard, endpoint)) = connect(&service, &name, peer, &mut up).await {
                tokio::select! {
                    _ = kill.cancelled() => {}
                    _ = activity.idle_for(idle) => {
                        counters.idle_timeout.inc();
                        tracing::debug!(service = %service.key, %peer, %endpoint, ?idle, "tcp connection idle; closed");
                    }
                    r = copy_both_ways(&mut client, &mut upstream, &activity) => {
                        if let Err(e) = r {
                            tracing::debug!(service = %service.key, %peer, %endpoint, error = %e, "tcp connection ended with an error");
                        }
                    }
                }
            }
            if let Some(log) = log {
                let (bytes_in, bytes_out) = activity.totals();
                log.send(Entry {
                    start,
                    client: peer,
                    service: Arc::from(service.label()),
                    listener: Arc::from(name.as_str()),
                    method: None,
                    uri: None,
                    authority: None,
                    version: None,
                    status: 0,
                    bytes_in,
                    bytes_out,
                    duration: started.elapsed(),
                    upstream: up,
                });
            }
        });
    }
    drop(acceptor);
    drop(table);
    let left = tasks.drain(serving.grace).await;
    if left > 0 {
        tracing::warn!(grace = ?serving.grace, listener = %what, connections = left, "grace period over; closed the remaining connections");
    }
}

/// Connects a TCP client to an endpoint through the attempt loop: the same
/// `retry.tries`, `retry.timeout`, budget and passive accounting as HTTP.
async fn connect(
    service: &ServiceRuntime,
    listener: &str,
    peer: SocketAddr,
    up: &mut access::Upstream,
) -> Option<(TcpStream, ActiveGuard, SocketAddr)> {
    let current = service.current();
    let li = current.listener(listener)?;
    let config = &current.config;
    let key = ServiceRuntime::hash_source_ip(config, peer);
    let mut attempts = Attempts::new(service, config, &current.snap, key);
    while let Some(i) = attempts.next_endpoint() {
        let member = &current.snap.members[i];
        let guard = ActiveGuard::new(member.endpoint.clone());
        up.endpoint = Some(member.spec.addr);
        match current.pool(li, i).connect_tcp().await {
            Ok(stream) => {
                attempts.succeeded(i);
                up.attempts = attempts.tries() as u32;
                return Some((stream, guard, member.spec.addr));
            }
            Err(failure) => {
                if !attempts.failed(i, failure, RequestFacts::CONNECTION) {
                    break;
                }
            }
        }
    }
    let end = attempts.exhausted();
    up.attempts = end.tries as u32;
    up.flags.set(super::http::exhausted_flags(&end, &current.snap));
    let last = end
        .last
        .as_ref()
        .map(|(addr, f)| format!("{addr}: {}", failure_text(f)));
    tracing::warn!(service = %service.key, %peer, tries = end.tries, last = last.as_deref().unwrap_or("no endpoint available"), refused = ?end.refused, "no endpoint accepted the connection");
    None
}

#[cfg(target_os = "linux")]
async fn copy_both_ways(
    client: &mut TcpStream,
    upstream: &mut TcpStream,
    activity: &Activity,
) -> std::io::Result<(u64, u64)> {
    super::splice::copy_bidirectional(client, upstream, activity).await
}

#[cfg(not(target_os = "linux"))]
async fn copy_both_ways(
    client: &mut TcpStream,
    upstream: &mut TcpStream,
    activity: &Activity,
) -> std::io::Result<(u64, u64)> {
    let mut client = super::conn::Touching::new(client, activity);
    tokio::io::copy_bidirectional_with_sizes(&mut client, upstream, 64 * 1024, 64 * 1024).await
}

/// Runs `f` on drop.
fn scopeguard<F: FnOnce()>(f: F) -> impl Drop {
    struct Guard<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for Guard<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f();
            }
        }
    }
    Guard(Some(f))
}
