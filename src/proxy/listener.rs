//! Accept loops for HTTP and TCP listeners, with a cap on open connections,
//! hyper's timers set, and graceful shutdown (GOAWAY on h2, close-after-response
//! on HTTP/1, in-flight requests finished within a grace period).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::answer::failure_text;
use super::attempt::{Attempts, RequestFacts};
use super::headers::Downstream;
use super::http::HttpProxy;
use super::service::{ActiveGuard, ServiceRuntime};

/// Limits every listener applies.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Open client connections per listener.
    pub max_connections: usize,
    /// Time a client has to send request headers (also bounds idle keep-alive).
    pub header_read_timeout: Duration,
    /// Time in-flight requests get to finish on shutdown.
    pub grace: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 10_000,
            header_read_timeout: Duration::from_secs(30),
            grace: Duration::from_secs(30),
        }
    }
}

async fn accept(
    listener: &TcpListener,
    permits: &Arc<Semaphore>,
    stop: &CancellationToken,
) -> Option<(TcpStream, SocketAddr, tokio::sync::OwnedSemaphorePermit)> {
    loop {
        let permit = tokio::select! {
            _ = stop.cancelled() => return None,
            p = permits.clone().acquire_owned() => p.ok()?,
        };
        tokio::select! {
            _ = stop.cancelled() => return None,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    return Some((stream, peer, permit));
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
}

/// Serves HTTP/1.1 and h2c on `listener` until `stop`, then drains.
pub async fn serve_http(listener: TcpListener, proxy: Arc<HttpProxy>, limits: Limits, stop: CancellationToken) {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = GracefulShutdown::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        // Small answers: one flattened buffer per write beats writev's iovecs
        // (A/B: about 4% less CPU per request).
        .writev(false)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(100)
        .max_header_list_size(16 * 1024)
        .keep_alive_interval(Some(Duration::from_secs(30)));
    while let Some((stream, peer, permit)) = accept(&listener, &permits, &stop).await {
        let proxy = proxy.clone();
        let client = Arc::new(Downstream::new(peer));
        let service = service_fn(move |req| {
            let proxy = proxy.clone();
            let client = client.clone();
            async move { Ok::<_, Infallible>(proxy.handle(req, &client).await) }
        });
        let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
        let conn = graceful.watch(conn.into_owned());
        tokio::spawn(async move {
            let _permit = permit;
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "client connection ended with an error");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(limits.grace, graceful.shutdown()).await.is_err() {
        tracing::warn!(grace = ?limits.grace, "grace period over; closing remaining connections");
    }
}

/// Serves a TCP listener: one endpoint per connection, bytes copied both ways
/// with half-close, until `stop`; open connections get the grace period.
pub async fn serve_tcp(
    listener: TcpListener,
    service: Arc<ServiceRuntime>,
    name: String,
    limits: Limits,
    stop: CancellationToken,
) {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let tracker = TaskTracker::new();
    let kill = CancellationToken::new();
    while let Some((mut client, peer, permit)) = accept(&listener, &permits, &stop).await {
        let service = service.clone();
        let name = name.clone();
        let kill = kill.clone();
        tracker.spawn(async move {
            let _permit = permit;
            let Some((mut upstream, _guard, endpoint)) = connect(&service, &name, peer).await else {
                return;
            };
            let copied = tokio::select! {
                _ = kill.cancelled() => return,
                r = copy_both_ways(&mut client, &mut upstream) => r,
            };
            if let Err(e) = copied {
                tracing::debug!(service = %service.key, %peer, %endpoint, error = %e, "tcp connection ended with an error");
            }
        });
    }
    drop(listener);
    tracker.close();
    if tokio::time::timeout(limits.grace, tracker.wait()).await.is_err() {
        kill.cancel();
        tracker.wait().await;
    }
}

/// Connects a TCP client to an endpoint through the attempt loop: the same
/// `retry.tries`, `retry.timeout`, budget and passive accounting as HTTP.
async fn connect(
    service: &ServiceRuntime,
    listener: &str,
    peer: SocketAddr,
) -> Option<(TcpStream, ActiveGuard, SocketAddr)> {
    let current = service.current();
    let li = current.listener(listener)?;
    let config = &current.config;
    let key = ServiceRuntime::hash_source_ip(config, peer);
    let mut attempts = Attempts::new(service, config, &current.snap, key);
    while let Some(i) = attempts.next_endpoint() {
        let member = &current.snap.members[i];
        let guard = ActiveGuard::new(member.endpoint.clone());
        match current.pool(li, i).connect_tcp().await {
            Ok(stream) => {
                attempts.succeeded(i);
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
    let last = end
        .last
        .as_ref()
        .map(|(addr, f)| format!("{addr}: {}", failure_text(f)));
    tracing::warn!(service = %service.key, %peer, tries = end.tries, last = last.as_deref().unwrap_or("no endpoint available"), refused = ?end.refused, "no endpoint accepted the connection");
    None
}

#[cfg(target_os = "linux")]
async fn copy_both_ways(client: &mut TcpStream, upstream: &mut TcpStream) -> std::io::Result<(u64, u64)> {
    super::splice::copy_bidirectional(client, upstream).await
}

#[cfg(not(target_os = "linux"))]
async fn copy_both_ways(client: &mut TcpStream, upstream: &mut TcpStream) -> std::io::Result<(u64, u64)> {
    tokio::io::copy_bidirectional_with_sizes(client, upstream, 64 * 1024, 64 * 1024).await
}
