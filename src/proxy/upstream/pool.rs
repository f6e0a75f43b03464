//! Upstream connections, owned per endpoint (nginx `keepalive`, HAProxy
//! `http-reuse`): idle HTTP/1.1 connections are kept most-recently-used first,
//! capped and closed after an idle timeout; HTTP/2 connections are shared by
//! requests up to the stream limit the endpoint announced, and another one is
//! opened when they are full or gone. An answer's body ([`Tracked`]) holds
//! its connection and its endpoint's active count until its last byte, then
//! gives them back.
//!
//! A checkout never waits on another request: it takes an idle connection or
//! connects. The small mutexes here guard a push or a pop and are never held
//! across an `.await`.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::answer::EndpointBody;
use super::body::{BoxError, UpBody};
use super::http2::{self, H2Sender};
use crate::balance::ActiveGuard;
use crate::net::{io_text, is_local_exhaustion};
use crate::proxy::retry::Failure;
use crate::tls::upstream::{Alpn, Connector, MaybeTls, wrap};

/// The most an upstream HTTP/1.1 connection reads ahead of its client.
const UPSTREAM_READ_BUFFER: usize = 8 * 1024;

/// Streams one HTTP/2 connection carries before another is opened: at or
/// under what common servers allow (nginx 128, HAProxy 100, Go 250), so
/// requests rarely queue behind an endpoint's own limit.
const H2_STREAMS: usize = 100;

/// How the pool behaves, from the service's config.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolSettings {
    /// Time to establish a connection.
    pub connect_timeout: Duration,
    /// An idle connection is closed after this long (nginx `keepalive_timeout`).
    pub idle_timeout: Duration,
    /// Idle HTTP/1.1 connections kept per endpoint (nginx `keepalive`).
    pub max_idle: usize,
}

impl PoolSettings {
    /// Connections made within `connect_timeout` (`timeouts.connect`), kept
    /// idle 60 s, at most 128 idle per endpoint.
    pub fn new(connect_timeout: Duration) -> Self {
        Self {
            connect_timeout,
            idle_timeout: Duration::from_secs(60),
            max_idle: 128,
        }
    }
}

/// The protocol spoken to an endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// HTTP/1.1, one request at a time per connection.
    Http1,
    /// HTTP/2 with prior knowledge (h2c), many streams per connection.
    H2c,
}

/// The connections to one endpoint address.
#[derive(Debug)]
pub struct Pool {
    target: SocketAddr,
    settings: PoolSettings,
    tls: Option<Arc<Connector>>,
    idle: Mutex<VecDeque<Idle>>,
    raw: Mutex<VecDeque<(RawConn, Instant)>>,
    h2: Mutex<Vec<H2Conn>>,
    /// Held while an HTTP/2 connection is being made, with the last
    /// attempt's failure and when it came (see [`Pool::checkout`]).
    h2_connecting: tokio::sync::Mutex<Option<(Instant, Failure)>>,
}

/// An HTTP/1.1 connection the fast path speaks on itself (no hyper task
/// behind it): the stream and what was read from it beyond the last answer.
#[derive(Debug)]
pub struct RawConn {
    /// The stream.
    pub io: MaybeTls,
    /// Read buffer, kept with the connection so its allocation is reused.
    pub buf: bytes::BytesMut,
    /// Taken from the idle list (it may have been closed by the endpoint meanwhile).
    pub reused: bool,
}

impl RawConn {
    /// Whether an idle connection still looks usable: no end of stream, no
    /// error and no unasked-for bytes waiting on it.
    fn is_open(&mut self) -> bool {
        use tokio::io::AsyncRead;
        let mut probe = [0u8; 1];
        let mut rb = tokio::io::ReadBuf::new(&mut probe);
        let mut cx = Context::from_waker(futures::task::noop_waker_ref());
        matches!(Pin::new(&mut self.io).poll_read(&mut cx, &mut rb), Poll::Pending)
    }
}

#[derive(Debug)]
struct Idle {
    sender: http1::SendRequest<UpBody>,
    since: Instant,
}

#[derive(Debug)]
struct H2Conn {
    sender: H2Sender,
    streams: Arc<AtomicUsize>,
    last_used: Instant,
}

/// A connection ready for one request.
pub enum Conn {
    /// An HTTP/1.1 connection, owned until the response body ends.
    H1 {
        /// The sender.
        sender: http1::SendRequest<UpBody>,
        /// Taken from the idle list (it may have been closed by the endpoint meanwhile).
        reused: bool,
    },
    /// A stream slot on a shared HTTP/2 connection.
    H2 {
        /// The sender (a handle on the shared connection).
        sender: H2Sender,
        /// Holds the stream slot until the response body ends.
        slot: StreamSlot,
    },
}

/// Counts a stream on an HTTP/2 connection until dropped.
#[derive(Debug)]
pub struct StreamSlot(Arc<AtomicUsize>);

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Pool {
    /// An empty pool for `target`, whose connections speak TLS when `tls` is given.
    pub fn new(target: SocketAddr, settings: PoolSettings, tls: Option<Arc<Connector>>) -> Self {
        Self {
            target,
            settings,
            tls,
            idle: Mutex::new(VecDeque::new()),
            raw: Mutex::new(VecDeque::new()),
            h2: Mutex::new(Vec::new()),
            h2_connecting: tokio::sync::Mutex::new(None),
        }
    }

    /// The endpoint's address.
    pub fn target(&self) -> SocketAddr {
        self.target
    }

    /// The settings it was made with.
    pub fn settings(&self) -> PoolSettings {
        self.settings
    }

    /// Whether it was made with these settings and this TLS.
    pub fn made_with(&self, settings: PoolSettings, tls: Option<&Arc<Connector>>) -> bool {
        self.settings == settings
            && match (&self.tls, tls) {
                (None, None) => true,
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                _ => false,
            }
    }

    /// A connection for one request: an idle or shared one, or a new one
    /// established within the connect timeout.
    pub async fn checkout(&self, protocol: Protocol) -> Result<Conn, Failure> {
        match protocol {
            Protocol::Http1 => {
                while let Some(mut sender) = self.pop_idle() {
                    // A connection returned at the end of a body may still be
                    // finishing that response: ready() waits for it, or says it closed.
                    if std::future::poll_fn(|cx| sender.poll_ready(cx)).await.is_ok() {
                        return Ok(Conn::H1 { sender, reused: true });
                    }
                }
                // New connections are boxed: a checkout's future (held by
                // every request in flight) stays the size of taking one.
                Ok(Conn::H1 {
                    sender: Box::pin(self.connect_h1()).await?,
                    reused: false,
                })
            }
            Protocol::H2c => {
                if let Some(conn) = self.shared_h2() {
                    return Ok(conn);
                }
                // One connection made at a time: the requests that come
                // meanwhile share it (a burst of 320 streams opened 150
                // connections, 30-40 KiB each, where 4 carry them), and
                // share its failure too rather than each trying in turn.
                let asked = Instant::now();
                let mut connecting = self.h2_connecting.lock().await;
                if let Some(conn) = self.shared_h2() {
                    return Ok(conn);
                }
                if let Some((at, failure)) = &*connecting
                    && *at >= asked
                {
                    return Err(failure.clone());
                }
                let conn = match Box::pin(self.connect_h2()).await {
                    Ok(conn) => conn,
                    Err(failure) => {
                        *connecting = Some((Instant::now(), failure.clone()));
                        return Err(failure);
                    }
                };
                conn.streams.fetch_add(1, Ordering::Relaxed);
                let out = Conn::H2 {
                    sender: conn.sender.clone(),
                    slot: StreamSlot(conn.streams.clone()),
                };
                self.h2.lock().expect("pool lock poisoned").push(conn);
                Ok(out)
            }
        }
    }

    /// A fresh HTTP/1.1 connection, never pooled (used to retry a request that a
    /// reused connection lost before sending it).
    pub async fn fresh_h1(&self) -> Result<http1::SendRequest<UpBody>, Failure> {
        self.connect_h1().await
    }

    /// A connection for the fast path: the most recently used idle one that
    /// is still open, or a new one.
    pub async fn checkout_raw(&self) -> Result<RawConn, Failure> {
        loop {
            let popped = self.raw.lock().expect("pool lock poisoned").pop_back();
            let Some((mut conn, since)) = popped else {
                break;
            };
            if since.elapsed() < self.settings.idle_timeout && conn.is_open() {
                conn.reused = true;
                return Ok(conn);
            }
        }
        self.fresh_raw().await
    }

    /// A new connection for the fast path, never taken from the idle list.
    pub async fn fresh_raw(&self) -> Result<RawConn, Failure> {
        Ok(RawConn {
            io: self.connect(Alpn::Http1).await?,
            buf: bytes::BytesMut::new(),
            reused: false,
        })
    }

    /// Gives back a fast-path connection whose response ended cleanly.
    pub fn release_raw(&self, mut conn: RawConn) {
        if self.settings.max_idle == 0 || !conn.buf.is_empty() {
            return;
        }
        conn.reused = false;
        let mut raw = self.raw.lock().expect("pool lock poisoned");
        let now = Instant::now();
        while raw
            .front()
            .is_some_and(|(_, since)| now.duration_since(*since) >= self.settings.idle_timeout)
            || raw.len() >= self.settings.max_idle
        {
            raw.pop_front();
        }
        raw.push_back((conn, now));
    }

    /// Gives back an HTTP/1.1 connection whose response ended cleanly.
    pub fn release(&self, sender: http1::SendRequest<UpBody>) {
        if sender.is_closed() || self.settings.max_idle == 0 {
            return;
        }
        let mut idle = self.idle.lock().expect("pool lock poisoned");
        let now = Instant::now();
        // The oldest sit at the front: trim what timed out, and over the cap.
        while idle
            .front()
            .is_some_and(|i| now.duration_since(i.since) >= self.settings.idle_timeout)
            || idle.len() >= self.settings.max_idle
        {
            idle.pop_front();
        }
        idle.push_back(Idle { sender, since: now });
    }

    /// Closes idle connections past the idle timeout (HTTP/1.1 and HTTP/2
    /// connections with no stream open); called periodically.
    pub fn sweep(&self) {
        let now = Instant::now();
        let timeout = self.settings.idle_timeout;
        self.idle
            .lock()
            .expect("pool lock poisoned")
            .retain(|i| !i.sender.is_closed() && now.duration_since(i.since) < timeout);
        self.raw
            .lock()
            .expect("pool lock poisoned")
            .retain_mut(|(conn, since)| now.duration_since(*since) < timeout && conn.is_open());
        self.h2.lock().expect("pool lock poisoned").retain(|c| {
            !c.sender.is_closed()
                && (c.streams.load(Ordering::Relaxed) > 0 || now.duration_since(c.last_used) < timeout)
        });
    }

    /// Idle HTTP/1.1 connections now.
    pub fn idle_count(&self) -> usize {
        self.idle.lock().expect("pool lock poisoned").len() + self.raw.lock().expect("pool lock poisoned").len()
    }

    /// Open HTTP/2 connections now.
    pub fn h2_count(&self) -> usize {
        self.h2.lock().expect("pool lock poisoned").len()
    }

    fn pop_idle(&self) -> Option<http1::SendRequest<UpBody>> {
        let mut idle = self.idle.lock().expect("pool lock poisoned");
        let now = Instant::now();
        while let Some(i) = idle.pop_back() {
            if !i.sender.is_closed() && now.duration_since(i.since) < self.settings.idle_timeout {
                return Some(i.sender);
            }
        }
        None
    }

    fn shared_h2(&self) -> Option<Conn> {
        let mut conns = self.h2.lock().expect("pool lock poisoned");
        conns.retain(|c| !c.sender.is_closed());
        let conn = conns
            .iter_mut()
            .find(|c| c.streams.load(Ordering::Relaxed) < H2_STREAMS)?;
        conn.streams.fetch_add(1, Ordering::Relaxed);
        conn.last_used = Instant::now();
        Some(Conn::H2 {
            sender: conn.sender.clone(),
            slot: StreamSlot(conn.streams.clone()),
        })
    }

    async fn tcp(&self) -> Result<TcpStream, Failure> {
        match tokio::time::timeout(self.settings.connect_timeout, TcpStream::connect(self.target)).await {
            Ok(Ok(stream)) => {
                let _ = stream.set_nodelay(true);
                Ok(stream)
            }
            Ok(Err(e)) if is_local_exhaustion(&e) => Err(Failure::Local(io_text(&e))),
            Ok(Err(e)) => Err(Failure::Connect(io_text(&e))),
            Err(_) => Err(Failure::Timeout),
        }
    }

    /// A new TCP connection to the endpoint (TCP listeners).
    pub async fn connect_tcp(&self) -> Result<TcpStream, Failure> {
        self.tcp().await
    }

    /// A new connection to the endpoint, over TLS when the endpoint's group
    /// speaks it, the handshake within the same connect timeout.
    pub async fn connect(&self, alpn: Alpn) -> Result<MaybeTls, Failure> {
        let started = Instant::now();
        let tcp = self.tcp().await?;
        let Some(tls) = &self.tls else {
            return Ok(MaybeTls::Plain(tcp));
        };
        let left = self.settings.connect_timeout.saturating_sub(started.elapsed());
        match tokio::time::timeout(left, wrap(Some(tls), tcp, self.target, alpn)).await {
            Ok(Ok(stream)) => Ok(stream),
            Ok(Err(why)) => Err(Failure::Connect(why)),
            Err(_) => Err(Failure::Connect("tls: no handshake within the connect timeout".into())),
        }
    }

    async fn connect_h1(&self) -> Result<http1::SendRequest<UpBody>, Failure> {
        let stream = self.connect(Alpn::Http1).await?;
        let (sender, conn) = http1::Builder::new()
            .writev(false)
            // hyper's read buffer grows to ~400 KiB by default, and a response
            // chunk that size waits whole for a client that does not read:
            // 32 KiB bounds what one stalled reader holds (issue: 300 such
            // clients took 20 MiB) and still reads big downloads in big reads.
            .max_buf_size(UPSTREAM_READ_BUFFER)
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| Failure::Connect(e.to_string()))?;
        let target = self.target;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(endpoint = %target, error = %e, "upstream connection ended with an error");
            }
        });
        Ok(sender)
    }

    async fn connect_h2(&self) -> Result<H2Conn, Failure> {
        let stream = self.connect(Alpn::H2).await?;
        let sender = tokio::time::timeout(self.settings.connect_timeout, http2::handshake(stream, self.target))
            .await
            .map_err(|_| Failure::Timeout)?
            .map_err(|e| Failure::Connect(format!("h2 handshake: {e}")))?;
        Ok(H2Conn {
            sender,
            streams: Arc::new(AtomicUsize::new(0)),
            last_used: Instant::now(),
        })
    }
}

/// What a response body gives back when it ends.
pub enum Release {
    /// Nothing (a tunnel's answer, an unpooled connection).
    None,
    /// An HTTP/1.1 connection that goes back to its pool after a clean end.
    H1(Arc<Pool>, http1::SendRequest<UpBody>),
    /// A stream slot on a shared HTTP/2 connection.
    H2(StreamSlot),
}

/// An upstream response body that holds its endpoint's active count, and its
/// connection, until it ends.
pub struct Tracked {
    inner: EndpointBody,
    guard: Option<ActiveGuard>,
    release: Release,
}

impl Tracked {
    /// Wraps `inner`, releasing `guard` and `release` at end of stream or drop.
    pub fn new(inner: EndpointBody, guard: ActiveGuard, release: Release) -> Self {
        Self {
            inner,
            guard: Some(guard),
            release,
        }
    }

    fn finish(&mut self, clean: bool) {
        self.guard = None;
        match std::mem::replace(&mut self.release, Release::None) {
            Release::H1(pool, sender) if clean => pool.release(sender),
            // A connection whose response was cut short is dropped: hyper closes it.
            _ => {}
        }
    }
}

impl Body for Tracked {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => self.finish(true),
            Poll::Ready(Some(Err(_))) => self.finish(false),
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        // hyper may drop a body it knows is empty (HEAD, 204, Content-Length: 0)
        // without polling it: that is still a clean end for the connection.
        let clean = self.inner.is_end_stream();
        self.finish(clean);
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;

    use super::*;
    use crate::demo::backend::{Backend, Behavior};

    /// One GET on `conn`; returns the connection once the answer was read.
    async fn get(conn: Conn) -> (u16, http1::SendRequest<UpBody>) {
        let Conn::H1 { mut sender, .. } = conn else {
            panic!("asked for HTTP/1.1")
        };
        let req = http::Request::get("/").header("host", "t").body(UpBody::Empty).unwrap();
        let resp = sender.send_request(req).await.unwrap();
        let status = resp.status().as_u16();
        resp.into_body().collect().await.unwrap();
        (status, sender)
    }

    #[tokio::test]
    async fn http1_connections_are_reused_and_capped() {
        let backend = Backend::http("a", Behavior::Status(200)).await;
        let pool = Pool::new(
            backend.addr,
            PoolSettings {
                max_idle: 2,
                ..PoolSettings::new(Duration::from_secs(1))
            },
            None,
        );
        let first = pool.checkout(Protocol::Http1).await.unwrap();
        assert!(matches!(first, Conn::H1 { reused: false, .. }));
        let (status, sender) = get(first).await;
        assert_eq!(status, 200);
        pool.release(sender);
        assert_eq!(pool.idle_count(), 1);
        let again = pool.checkout(Protocol::Http1).await.unwrap();
        assert!(matches!(again, Conn::H1 { reused: true, .. }), "keep-alive reuse");
        assert_eq!(backend.accepted(), 1);
        // Three at once, all given back: the cap keeps two.
        let conns = [
            again,
            pool.checkout(Protocol::Http1).await.unwrap(),
            pool.checkout(Protocol::Http1).await.unwrap(),
        ];
        for c in conns {
            let (_, sender) = get(c).await;
            pool.release(sender);
        }
        assert_eq!(pool.idle_count(), 2);
    }

    #[tokio::test]
    async fn idle_connections_close_after_the_idle_timeout() {
        let backend = Backend::http("a", Behavior::Status(200)).await;
        let pool = Pool::new(
            backend.addr,
            PoolSettings {
                idle_timeout: Duration::from_millis(200),
                ..PoolSettings::new(Duration::from_secs(1))
            },
            None,
        );
        let (_, sender) = get(pool.checkout(Protocol::Http1).await.unwrap()).await;
        pool.release(sender);
        tokio::time::pause();
        tokio::time::advance(Duration::from_millis(250)).await;
        pool.sweep();
        assert_eq!(pool.idle_count(), 0, "swept after the idle timeout");
        tokio::time::resume();
        let fresh = pool.checkout(Protocol::Http1).await.unwrap();
        assert!(matches!(fresh, Conn::H1 { reused: false, .. }));
    }

    #[tokio::test]
    async fn h2_streams_share_one_connection() {
        let backend = Backend::http("a", Behavior::Status(200)).await;
        let pool = Pool::new(backend.addr, PoolSettings::new(Duration::from_secs(1)), None);
        let mut held = Vec::new();
        for _ in 0..10 {
            held.push(pool.checkout(Protocol::H2c).await.unwrap());
        }
        assert_eq!(pool.h2_count(), 1, "10 streams, one connection");
        // Past the stream limit another connection opens.
        for _ in 10..H2_STREAMS + 1 {
            held.push(pool.checkout(Protocol::H2c).await.unwrap());
        }
        assert_eq!(pool.h2_count(), 2);
        // Slots are given back when their streams end.
        held.truncate(5);
        assert!(matches!(pool.checkout(Protocol::H2c).await.unwrap(), Conn::H2 { .. }));
        assert_eq!(pool.h2_count(), 2, "room again on the first connection");
    }

    #[tokio::test]
    async fn a_burst_of_h2_requests_shares_the_connection_being_made() {
        let backend = Backend::http("a", Behavior::Status(200)).await;
        let pool = Pool::new(backend.addr, PoolSettings::new(Duration::from_secs(1)), None);
        let burst = (0..50).map(|_| pool.checkout(Protocol::H2c));
        let conns = futures::future::join_all(burst).await;
        assert!(conns.iter().all(Result::is_ok));
        assert_eq!(pool.h2_count(), 1, "50 streams arriving at once, one connection");
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_waiting_on_a_failed_connect_shares_its_failure() {
        // A listener that never accepts: its backlog of one fills, and later
        // connects hang (a blackholed endpoint) until the connect timeout.
        let listener = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        listener.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into()).unwrap();
        listener.listen(0).unwrap();
        let addr = listener.local_addr().unwrap().as_socket().unwrap();
        let _fill: Vec<_> = (0..4)
            .filter_map(|_| std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_millis(200)).ok())
            .collect();
        let pool = Pool::new(addr, PoolSettings::new(Duration::from_secs(2)), None);
        let started = Instant::now();
        let burst = (0..20).map(|_| pool.checkout(Protocol::H2c));
        let outcomes = futures::future::join_all(burst).await;
        assert!(outcomes.iter().all(Result::is_err), "nothing connected");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "one connect timeout for the burst, not one each in turn: {:?}",
            started.elapsed()
        );
    }
}
