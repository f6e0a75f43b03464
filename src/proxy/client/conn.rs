//! One client connection's clock and its listener's table of connections.
//!
//! hyper's own HTTP/1 header timeout starts when it starts reading a head, so
//! it cannot tell a keep-alive connection waiting for its next request (`idle`)
//! from one dribbling headers (`requestHeader`), and HTTP/2 has neither. So
//! the socket is wrapped ([`ClientIo`]): it sees every byte the client sends
//! and knows, through [`ConnState`], whether a request is in flight, which is
//! all that decides the deadline:
//!
//! - connected, nothing sent yet, or the h2 preface unfinished: `requestHeader`
//!   from connecting (HAProxy `timeout http-request`);
//! - HTTP/1 head begun: `requestHeader` from its first byte; the answer is 408;
//! - between requests (and an h2 connection with no open stream): `idle`
//!   from the end of the last response (nginx `keepalive_timeout`); h2 gets a
//!   GOAWAY, HTTP/1 a clean close;
//! - a request in flight: nothing here (its body has `requestBody`, the
//!   upstream `response`);
//! - an upgraded tunnel: `idle` with no bytes either way.
//!
//! The one timer is reset lazily: a deadline that moves later (every request
//! on a busy connection) costs a store, not a timer-wheel operation.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use futures::task::AtomicWaker;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::time::{Instant, Sleep};

use crate::metrics::{ConnectionLabels, ListenerLabels, ProxyMetrics};

/// The HTTP/2 connection preface (RFC 9113 3.4).
pub const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

const NO_IDLE: u64 = u64::MAX;

/// What a connection's task and its requests share.
#[derive(Debug)]
pub struct ConnState {
    born: Instant,
    /// The client's address.
    pub peer: SocketAddr,
    in_flight: AtomicU32,
    requests: AtomicU64,
    // Milliseconds after `born` when the last request finished; NO_IDLE before any.
    idle_since: AtomicU64,
    tunnel: AtomicBool,
    close: Notify,
    closing: AtomicBool,
    // The h2 reader waiting while streams were open: when the last one ends
    // (in another task) it must look at its deadline again.
    reader: AtomicWaker,
}

impl ConnState {
    /// A connection from `peer`, opened now.
    pub fn new(peer: SocketAddr) -> Self {
        Self {
            born: Instant::now(),
            peer,
            in_flight: AtomicU32::new(0),
            requests: AtomicU64::new(0),
            idle_since: AtomicU64::new(NO_IDLE),
            tunnel: AtomicBool::new(false),
            close: Notify::new(),
            closing: AtomicBool::new(false),
            reader: AtomicWaker::new(),
        }
    }

    /// Marks a request as begun; it is over when the guard drops (with the
    /// response body, so a long download is not "idle").
    pub fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Relaxed);
        self.requests.fetch_add(1, Relaxed);
        InFlight(self.clone())
    }

    /// The connection now carries an upgraded tunnel.
    pub fn set_tunnel(&self) {
        self.tunnel.store(true, Relaxed);
    }

    /// Whether no request is in flight (a candidate for eviction).
    pub fn is_idle(&self) -> bool {
        self.in_flight.load(Relaxed) == 0 && !self.tunnel.load(Relaxed)
    }

    /// When the connection last became idle (when it opened, before any request).
    pub fn idle_since(&self) -> Instant {
        match self.idle_since.load(Relaxed) {
            NO_IDLE => self.born,
            ms => self.born + Duration::from_millis(ms),
        }
    }

    fn finished_request(&self) -> Option<Instant> {
        match self.idle_since.load(Relaxed) {
            NO_IDLE => None,
            ms => Some(self.born + Duration::from_millis(ms)),
        }
    }

    /// Asks the connection's task to close it gracefully (GOAWAY on h2, close
    /// when idle on HTTP/1). Returns false if it was asked already.
    pub fn ask_close(&self) -> bool {
        if self.closing.swap(true, Relaxed) {
            return false;
        }
        self.close.notify_one();
        true
    }

    /// Whether the connection was asked to close.
    pub fn is_closing(&self) -> bool {
        self.closing.load(Relaxed)
    }

    /// Resolves when the connection was asked to close.
    pub async fn close_asked(&self) {
        self.close.notified().await
    }
}

/// A request in flight on a connection.
#[derive(Debug)]
pub struct InFlight(Arc<ConnState>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let s = &self.0;
        let ms = u64::try_from(s.born.elapsed().as_millis()).unwrap_or(NO_IDLE - 1);
        // Set before the count drops, so a reader that sees zero sees the time.
        s.idle_since.store(ms.min(NO_IDLE - 1), Relaxed);
        if s.in_flight.fetch_sub(1, Relaxed) == 1 {
            s.reader.wake();
        }
    }
}

/// Why a connection was closed by the proxy, as the spec names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// `timeouts.requestHeader`.
    RequestHeader,
    /// `timeouts.idle`.
    Idle,
}

/// Per-listener counters, resolved once.
#[derive(Clone, Debug)]
pub struct ConnCounters {
    /// Open connections.
    pub open: Gauge,
    /// Closed at `requestHeader`.
    pub header_timeout: Counter,
    /// Closed at `idle`.
    pub idle_timeout: Counter,
    /// Closed at `responseWrite`: the client left what it was sent unread.
    pub write_timeout: Counter,
    /// Closed to make room under `maxConnections`.
    pub evicted: Counter,
    /// Accepts held back by `maxConnections`.
    pub at_max: Counter,
    /// Connections refused by `maxConnectionsPerClient`.
    pub per_client: Counter,
}

impl ConnCounters {
    /// The counters of `listener` of `service`.
    pub fn new(metrics: &ProxyMetrics, service: &str, listener: &str) -> Self {
        let get = |family: &prometheus_client::metrics::family::Family<ConnectionLabels, Counter>, reason| {
            family
                .get_or_create(&ConnectionLabels {
                    service: service.to_string(),
                    listener: listener.to_string(),
                    reason,
                })
                .clone()
        };
        Self {
            open: metrics
                .connections
                .get_or_create(&ListenerLabels {
                    service: service.to_string(),
                    listener: listener.to_string(),
                })
                .clone(),
            header_timeout: get(&metrics.closed, "requestHeader"),
            idle_timeout: get(&metrics.closed, "idle"),
            write_timeout: get(&metrics.closed, "responseWrite"),
            evicted: get(&metrics.closed, "maxConnections"),
            at_max: get(&metrics.limited, "maxConnections"),
            per_client: get(&metrics.limited, "maxConnectionsPerClient"),
        }
    }

    fn count(&self, reason: Reason) {
        match reason {
            Reason::RequestHeader => self.header_timeout.inc(),
            Reason::Idle => self.idle_timeout.inc(),
        };
    }
}

/// The timeouts and limits a connection lives by, read from the service's
/// config when it is accepted.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    /// `timeouts.requestHeader`.
    pub request_header: Duration,
    /// `timeouts.idle` for this listener.
    pub idle: Duration,
    /// `limits.maxUriBytes`.
    pub max_uri: usize,
    /// `timeouts.responseWrite`.
    pub response_write: Duration,
}

/// The client socket as hyper sees it: bytes sniffed for the protocol are
/// replayed first, and reads return an error (or end of stream) once the
/// connection's deadline has passed.
pub struct ClientIo {
    inner: ClientStream,
    prefix: [u8; 24],
    prefix_at: usize,
    prefix_len: usize,
    state: Arc<ConnState>,
    clock: Clock,
    counters: Arc<ConnCounters>,
    h2: bool,
    sleep: Pin<Box<Sleep>>,
    // The HTTP/1 head being read: when its first byte came, for which request
    // count, and how long its request line is so far (None once it ended).
    head: Option<(Instant, u64)>,
    line: Option<usize>,
    preface_seen: usize,
    last_activity: Instant,
    expired: Option<Instant>,
    // Armed when a write finds the client's socket full; a write that
    // still cannot go through when it fires ends the connection.
    write_stall: Option<Pin<Box<Sleep>>>,
    stalled: bool,
}

impl ClientIo {
    /// Wraps an accepted socket.
    pub fn new(inner: ClientStream, state: Arc<ConnState>, clock: Clock, counters: Arc<ConnCounters>) -> Self {
        let now = Instant::now();
        Self {
            inner,
            prefix: [0; 24],
            prefix_at: 0,
            prefix_len: 0,
            sleep: Box::pin(tokio::time::sleep_until(now + clock.request_header)),
            state,
            clock,
            counters,
            h2: false,
            head: None,
            line: None,
            preface_seen: 0,
            last_activity: now,
            expired: None,
            write_stall: None,
            stalled: false,
        }
    }

    /// The plain TCP socket under this connection, for splice(2), with
    /// `timeouts.responseWrite`: `None` over TLS, or while sniffed bytes
    /// wait to be replayed.
    pub fn plain_socket(&self) -> Option<(&TcpStream, Duration)> {
        match &self.inner {
            ClientStream::Plain(s) if self.prefix_at == self.prefix_len => Some((s, self.clock.response_write)),
            _ => None,
        }
    }

    /// Counts a write to this client that stalled for `timeouts.responseWrite`
    /// outside [`AsyncWrite`] (a splice).
    pub fn count_write_timeout(&self) {
        self.counters.write_timeout.inc();
    }

    /// A write's outcome, bounded by `timeouts.responseWrite`: the time a
    /// client may leave the socket full (nginx `send_timeout`). The only
    /// memory a stalled reader holds is then what the kernel and hyper's
    /// bounded buffers already took, and only for that long.
    fn bounded_write(&mut self, cx: &mut Context<'_>, polled: Poll<io::Result<usize>>) -> Poll<io::Result<usize>> {
        if !polled.is_pending() {
            self.stalled = false;
            return polled;
        }
        let deadline = Instant::now() + self.clock.response_write;
        let stall = self
            .write_stall
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if !self.stalled {
            self.stalled = true;
            stall.as_mut().reset(deadline);
        }
        if stall.as_mut().poll(cx).is_ready() {
            self.counters.write_timeout.inc();
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client read nothing for timeouts.responseWrite",
            )));
        }
        Poll::Pending
    }

    /// Reads the first bytes to tell HTTP/2 prior knowledge from HTTP/1 (within
    /// `requestHeader`, like any head); they are replayed to hyper. `None` when
    /// the client closed or timed out first.
    pub async fn sniff(&mut self) -> Option<bool> {
        // While sniffing, any bytes are a prefix of the h2 preface: a timeout
        // here is a clean close, not a 408.
        self.h2 = true;
        let mut buf = [0u8; 24];
        let mut len = 0;
        while len < buf.len() {
            let n = std::future::poll_fn(|cx| {
                let mut rb = ReadBuf::new(&mut buf[len..]);
                ready!(self.poll_deadline_read(cx, &mut rb))?;
                Poll::Ready(Ok::<_, io::Error>(rb.filled().len()))
            })
            .await
            .ok()?;
            if n == 0 {
                // Closed or timed out with nothing, or with part of the h2
                // preface: nothing to answer.
                return None;
            }
            len += n;
            if buf[..len] != H2_PREFACE[..len] {
                break;
            }
        }
        self.h2 = len == 24 && buf == *H2_PREFACE;
        self.prefix = buf;
        self.prefix_len = len;
        if !self.h2 {
            // The sniffed bytes are the start of an HTTP/1 head.
            self.head = Some((Instant::now(), self.state.requests.load(Relaxed)));
            self.line = Some(0);
            if let Err(e) = self.scan_line(&buf[..len]) {
                self.reject(e);
                return None;
            }
        } else {
            self.preface_seen = 24;
        }
        Some(self.h2)
    }

    /// The deadline now due, if any.
    fn due(&self) -> Option<(Instant, Reason)> {
        let s = &self.state;
        if s.tunnel.load(Relaxed) {
            return Some((self.last_activity + self.clock.idle, Reason::Idle));
        }
        if s.in_flight.load(Relaxed) > 0 {
            return None;
        }
        if let Some((started, for_request)) = self.head
            && for_request == s.requests.load(Relaxed)
        {
            return Some((started + self.clock.request_header, Reason::RequestHeader));
        }
        match s.finished_request() {
            Some(at) => Some((at + self.clock.idle, Reason::Idle)),
            None if self.h2 && self.preface_seen >= 24 => Some((s.born + self.clock.idle, Reason::Idle)),
            None => Some((s.born + self.clock.request_header, Reason::RequestHeader)),
        }
    }

    /// Reads from the socket, or ends the connection when its deadline passed.
    fn poll_deadline_read(&mut self, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if let Some(hard) = self.expired
            && Instant::now() >= hard
        {
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let new = &buf.filled()[before..];
                if !new.is_empty()
                    && let Err(e) = self.on_bytes(new)
                {
                    return Poll::Ready(Err(e));
                }
                return Poll::Ready(Ok(()));
            }
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => {}
        }
        // Once expired (an h2 connection sent its GOAWAY), only the hard close is left.
        let due = match self.expired {
            Some(hard) => Some((hard, Reason::Idle)),
            None => self.due(),
        };
        let Some((at, reason)) = due else {
            if self.h2 {
                self.state.reader.register(cx.waker());
            }
            return Poll::Pending;
        };
        if self.sleep.deadline() > at {
            self.sleep.as_mut().reset(at);
        }
        loop {
            ready!(self.sleep.as_mut().poll(cx));
            if Instant::now() >= at {
                break;
            }
            self.sleep.as_mut().reset(at);
        }
        self.expire(cx, reason)
    }

    fn expire(&mut self, cx: &mut Context<'_>, reason: Reason) -> Poll<io::Result<()>> {
        if self.expired.is_some() {
            return Poll::Ready(Ok(()));
        }
        self.counters.count(reason);
        if self.state.tunnel.load(Relaxed) {
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "tunnel idle timeout")));
        }
        if self.h2 && self.preface_seen >= 24 {
            // A GOAWAY, sent by the connection's task; the socket is closed
            // for good a little later should the client not let go.
            let hard = Instant::now() + Duration::from_secs(1);
            self.expired = Some(hard);
            self.state.ask_close();
            self.sleep.as_mut().reset(hard);
            let _ = self.sleep.as_mut().poll(cx);
            return Poll::Pending;
        }
        self.expired = Some(Instant::now());
        let head_begun = self
            .head
            .is_some_and(|(_, for_request)| for_request == self.state.requests.load(Relaxed));
        if reason == Reason::RequestHeader && head_begun && !self.h2 {
            self.reject(Reject::Timeout);
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "request header timeout")));
        }
        // Nothing was asked: end of stream, which hyper takes as a clean close.
        Poll::Ready(Ok(()))
    }

    fn on_bytes(&mut self, data: &[u8]) -> io::Result<()> {
        let s = &self.state;
        if s.tunnel.load(Relaxed) {
            self.last_activity = Instant::now();
            return Ok(());
        }
        if self.h2 {
            self.preface_seen = self.preface_seen.saturating_add(data.len());
            return Ok(());
        }
        if s.in_flight.load(Relaxed) == 0 {
            let requests = s.requests.load(Relaxed);
            if self.head.is_none_or(|(_, r)| r != requests) {
                self.head = Some((Instant::now(), requests));
                self.line = Some(0);
            }
        }
        self.scan_line(data).map_err(|why| {
            self.reject(why);
            io::Error::new(io::ErrorKind::InvalidData, "request target too long")
        })
    }

    /// Follows the request line to its end; one longer than `maxUriBytes` plus
    /// room for the method and version is refused before hyper buffers it (a
    /// shorter one is checked exactly by the handler).
    fn scan_line(&mut self, data: &[u8]) -> Result<(), Reject> {
        let Some(len) = self.line else {
            return Ok(());
        };
        let (len, ended) = match data.iter().position(|&b| b == b'\n') {
            Some(i) => (len + i, true),
            None => (len + data.len(), false),
        };
        self.line = (!ended).then_some(len);
        if len > self.clock.max_uri + 64 {
            return Err(Reject::UriTooLong);
        }
        Ok(())
    }

    /// Best-effort answer written straight to the socket before it closes:
    /// hyper never saw a complete head, so it cannot answer.
    fn reject(&mut self, why: Reject) {
        let text: &[u8] = match why {
            Reject::Timeout => {
                b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain\r\ncontent-length: 54\r\nconnection: close\r\n\r\n408 Request Timeout: request headers took too long\r\n\r\n"
            }
            Reject::UriTooLong => {
                b"HTTP/1.1 414 URI Too Long\r\ncontent-type: text/plain\r\ncontent-length: 46\r\nconnection: close\r\n\r\n414 URI Too Long: spec.limits.maxUriBytes\r\n\r\n"
            }
        };
        self.inner.try_write(text);
    }
}

#[derive(Clone, Copy, Debug)]
enum Reject {
    Timeout,
    UriTooLong,
}

impl AsyncRead for ClientIo {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.prefix_at < this.prefix_len {
            let n = buf.remaining().min(this.prefix_len - this.prefix_at);
            buf.put_slice(&this.prefix[this.prefix_at..this.prefix_at + n]);
            this.prefix_at += n;
            return Poll::Ready(Ok(()));
        }
        this.poll_deadline_read(cx, buf)
    }
}

impl AsyncWrite for ClientIo {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if self.state.tunnel.load(Relaxed) {
            self.last_activity = Instant::now();
        }
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.bounded_write(cx, polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if self.state.tunnel.load(Relaxed) {
            self.last_activity = Instant::now();
        }
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.bounded_write(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A client's byte stream: plain, or TLS terminated here (the clock above
/// then sees the decrypted bytes, so its rules are the same for both).
pub enum ClientStream {
    /// Plain TCP.
    Plain(TcpStream),
    /// TLS over TCP, the handshake done.
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl ClientStream {
    /// Writes what fits without waiting, for a last word before closing.
    fn try_write(&mut self, buf: &[u8]) {
        match self {
            ClientStream::Plain(s) => {
                let _ = s.try_write(buf);
            }
            ClientStream::Tls(s) => {
                // rustls takes the bytes into its own buffer; one flush
                // attempt sends what the socket takes now.
                let mut cx = Context::from_waker(std::task::Waker::noop());
                let _ = Pin::new(&mut **s).poll_write(&mut cx, buf);
                let _ = Pin::new(&mut **s).poll_flush(&mut cx);
            }
        }
    }
}

impl AsyncRead for ClientStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            ClientStream::Tls(s) => Pin::new(&mut **s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ClientStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            ClientStream::Tls(s) => Pin::new(&mut **s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            ClientStream::Tls(s) => Pin::new(&mut **s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            ClientStream::Plain(s) => s.is_write_vectored(),
            ClientStream::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_flush(cx),
            ClientStream::Tls(s) => Pin::new(&mut **s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            ClientStream::Tls(s) => Pin::new(&mut **s).poll_shutdown(cx),
        }
    }
}

/// A listener's open connections, for its limits: the total, per client IP,
/// and which are idle (the first to go when the total is reached).
#[derive(Debug, Default)]
pub struct ConnTable {
    inner: Mutex<TableInner>,
    freed: Notify,
}

#[derive(Debug, Default)]
struct TableInner {
    next: u64,
    conns: HashMap<u64, Arc<ConnState>>,
    per_ip: HashMap<IpAddr, usize>,
}

/// A client already has its share of connections (`maxConnectionsPerClient`);
/// the total is kept by waiting for room before accepting.
#[derive(Debug, PartialEq, Eq)]
pub struct ClientFull;

impl ConnTable {
    /// Open connections.
    pub fn len(&self) -> usize {
        self.lock().conns.len()
    }

    /// Whether no connection is open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, TableInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a connection unless a limit says no.
    pub fn admit(self: &Arc<Self>, state: &Arc<ConnState>, per_client: usize) -> Result<Registration, ClientFull> {
        let mut t = self.lock();
        let ip = state.peer.ip();
        let mine = t.per_ip.get(&ip).copied().unwrap_or(0);
        if per_client > 0 && mine >= per_client {
            return Err(ClientFull);
        }
        t.per_ip.insert(ip, mine + 1);
        t.next += 1;
        let id = t.next;
        t.conns.insert(id, state.clone());
        Ok(Registration {
            table: self.clone(),
            id,
            ip,
        })
    }

    /// Asks the connection idle the longest to close; false if none is idle.
    pub fn evict_oldest_idle(&self) -> bool {
        let t = self.lock();
        let oldest = t
            .conns
            .values()
            .filter(|c| c.is_idle() && !c.closing.load(Relaxed))
            .min_by_key(|c| c.idle_since());
        match oldest {
            Some(c) => c.ask_close(),
            None => false,
        }
    }

    /// Asks every connection to close (shutdown).
    pub fn close_all(&self) {
        for c in self.lock().conns.values() {
            c.ask_close();
        }
    }

    /// Resolves when a connection leaves the table.
    pub async fn freed(&self) {
        self.freed.notified().await
    }
}

/// A connection's place in its table, given back on drop.
#[derive(Debug)]
pub struct Registration {
    table: Arc<ConnTable>,
    id: u64,
    ip: IpAddr,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut t = self.table.lock();
        t.conns.remove(&self.id);
        if let Some(n) = t.per_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                t.per_ip.remove(&self.ip);
            }
        }
        drop(t);
        self.table.freed.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    const CLOCK: Clock = Clock {
        request_header: Duration::from_secs(10),
        idle: Duration::from_secs(60),
        max_uri: 8192,
        response_write: Duration::from_secs(60),
    };

    /// A proxy-side `ClientIo` and the client's end of the same connection.
    async fn pair() -> (ClientIo, TcpStream, Arc<ConnState>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (server, peer) = listener.accept().await.unwrap();
        let state = Arc::new(ConnState::new(peer));
        let counters = Arc::new(ConnCounters::new(
            &crate::metrics::Metrics::new().proxy,
            "default/web",
            "http",
        ));
        (
            ClientIo::new(ClientStream::Plain(server), state.clone(), CLOCK, counters),
            client,
            state,
        )
    }

    const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";

    /// Sends one whole request and reads it through `io`, as hyper would.
    async fn one_request(io: &mut ClientIo, client: &mut TcpStream) {
        client.write_all(REQUEST).await.unwrap();
        assert_eq!(io.sniff().await, Some(false));
        let mut buf = [0u8; 64];
        let mut got = 0;
        while got < REQUEST.len() {
            got += io.read(&mut buf).await.unwrap();
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_connection_ends_at_request_header() {
        let (mut io, _client, _) = pair().await;
        let started = Instant::now();
        assert_eq!(io.sniff().await, None);
        assert_eq!(started.elapsed(), CLOCK.request_header);
    }

    #[tokio::test(start_paused = true)]
    async fn half_a_head_gets_408_at_request_header_from_its_first_byte() {
        let (mut io, mut client, _) = pair().await;
        tokio::time::sleep(Duration::from_secs(3)).await;
        client.write_all(b"GET / HTTP/1.1\r\nHo").await.unwrap();
        assert_eq!(io.sniff().await, Some(false));
        let started = Instant::now();
        let mut buf = [0u8; 64];
        let mut replayed = 0;
        let err = loop {
            match io.read(&mut buf).await {
                Ok(n) if n > 0 => replayed += n,
                Ok(_) => panic!("a clean close; expected a 408"),
                Err(e) => break e,
            }
        };
        assert_eq!(replayed, 18, "the sniffed bytes are handed on");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        // From the first byte (3 s in), not from connecting.
        assert_eq!(started.elapsed(), CLOCK.request_header);
        drop(io);
        let mut answer = String::new();
        client.read_to_string(&mut answer).await.unwrap_or_default();
        assert!(answer.starts_with("HTTP/1.1 408 "), "{answer}");
    }

    #[tokio::test(start_paused = true)]
    async fn between_requests_the_idle_timeout_applies_and_a_download_is_not_idle() {
        let (mut io, mut client, state) = pair().await;
        one_request(&mut io, &mut client).await;
        let mut buf = [0u8; 64];
        // A request in flight for two minutes (a long download): no deadline.
        let flight = state.begin();
        let waited = tokio::time::timeout(Duration::from_secs(120), io.read(&mut buf)).await;
        assert!(waited.is_err(), "closed while a request was in flight");
        drop(flight);
        let started = Instant::now();
        assert_eq!(io.read(&mut buf).await.unwrap(), 0, "idle ends in a clean close");
        assert_eq!(started.elapsed(), CLOCK.idle);
    }

    #[tokio::test(start_paused = true)]
    async fn a_tunnel_stays_open_while_bytes_move() {
        let (mut io, mut client, state) = pair().await;
        one_request(&mut io, &mut client).await;
        let mut buf = [0u8; 64];
        state.set_tunnel();
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_secs(50)).await;
            client.write_all(b"frame").await.unwrap();
            assert_eq!(io.read(&mut buf).await.unwrap(), 5);
        }
        let started = Instant::now();
        let err = io.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), CLOCK.idle);
    }

    #[tokio::test]
    async fn the_table_evicts_the_longest_idle_and_counts_per_client() {
        let table = Arc::new(ConnTable::default());
        let peer: SocketAddr = "10.0.0.1:1000".parse().unwrap();
        let busy = Arc::new(ConnState::new(peer));
        let old = Arc::new(ConnState::new(peer));
        let young = Arc::new(ConnState::new("10.0.0.2:1000".parse().unwrap()));
        let _b = table.admit(&busy, 2).unwrap();
        let _o = table.admit(&old, 2).unwrap();
        assert_eq!(table.admit(&Arc::new(ConnState::new(peer)), 2).unwrap_err(), ClientFull);
        let _y = table.admit(&young, 2).unwrap();
        let _flight = busy.begin();
        assert!(table.evict_oldest_idle());
        assert!(old.closing.load(Relaxed), "the oldest idle one goes first");
        assert!(!busy.closing.load(Relaxed), "never one with a request in flight");
        assert!(table.evict_oldest_idle());
        assert!(young.closing.load(Relaxed));
        assert!(!table.evict_oldest_idle(), "nothing idle is left");
        drop(_o);
        assert_eq!(table.len(), 2);
    }
}
