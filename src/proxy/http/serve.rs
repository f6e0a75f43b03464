//! An HTTP listener's connections: each admitted connection on its own clock
//! (`client::conn`), its protocol sniffed (HTTP/1.1 or h2c with prior
//! knowledge), served by hyper with our limits, and closed gracefully when
//! asked (GOAWAY on h2, close-after-response on HTTP/1).

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::HttpProxy;
use crate::api::config::ListenerProtocol;
use crate::proxy::client::Downstream;
use crate::proxy::client::conn::{ClientIo, ClientStream, Clock, ConnState};
use crate::proxy::listen::{Gatekeeper, Serving};
use crate::proxy::tasks::Tasks;
use crate::proxy::tls::{Session, Terminator};

/// The most an h2 stream queues for a client beyond its flow-control window.
const H2_SEND_BUFFER: usize = 32 * 1024;

/// Serves HTTP/1.1 and h2c on `listener` (or, with `tls`, HTTPS with ALPN
/// `h2` and `http/1.1`) until `stop`, then drains.
pub async fn serve_http(
    listener: TcpListener,
    proxy: Arc<HttpProxy>,
    tls: Option<Arc<Terminator>>,
    serving: Serving,
    tasks: Tasks,
    stop: CancellationToken,
) {
    let service = proxy.service().clone();
    let mut gate = Gatekeeper::new(listener, &service, proxy.listener(), false);
    while let Some(conn) = gate.next(&service, &stop).await {
        let config = service.current().config.clone();
        let clock = Clock {
            request_header: config.timeouts.request_header,
            idle: config.timeouts.idle_for(ListenerProtocol::Http),
            max_uri: config.limits.max_uri_bytes,
            response_write: config.timeouts.response_write,
        };
        let limits = (
            config.limits.max_request_headers_bytes,
            config.limits.max_request_headers,
        );
        let (proxy, state, held, conn_tasks) = (proxy.clone(), conn.state, conn.held, tasks.clone());
        let (stream, tls, counters) = (conn.stream, tls.clone(), gate.counters().clone());
        tasks.spawn(async move {
            let _held = held;
            // The handshake is the start of the request head: it gets the
            // head's time (HAProxy counts it in `timeout http-request` too).
            let (stream, session) = match tls {
                None => (ClientStream::Plain(stream), None),
                // Boxed, as the hyper half below: a plain connection's task
                // does not carry a handshake's state.
                Some(t) => {
                    match tokio::time::timeout(clock.request_header, Box::pin(t.acceptor().accept(stream))).await {
                        Ok(Ok(s)) => {
                            let session = crate::proxy::tls::session(s.get_ref().1);
                            (ClientStream::Tls(Box::new(s)), Some(session))
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(peer = %state.peer, error = %e, "TLS handshake failed");
                            t.handshake_failed(&e);
                            return;
                        }
                        Err(_) => {
                            t.handshake_timed_out();
                            return;
                        }
                    }
                }
            };
            let io = ClientIo::new(stream, state.clone(), clock, counters);
            serve_connection(io, proxy, state, clock, limits, conn_tasks, session).await;
        });
    }
    gate.drain(&tasks, serving.grace).await;
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
    tls: Option<Session>,
) {
    // A connection that has not sent its first bytes is idle: evictable.
    let sniffed = tokio::select! {
        s = io.sniff() => s,
        _ = state.close_asked() => None,
    };
    let Some(h2) = sniffed else {
        return;
    };
    let client = Arc::new(Downstream::new(state.peer, state.clone(), tasks).with_tls(tls));
    let mut prefix = bytes::Bytes::new();
    if !h2 && super::fast::enabled() {
        match super::fast::serve(&mut io, &proxy, &client, max_headers).await {
            super::fast::Served::Closed => return,
            super::fast::Served::Hyper(read) => prefix = read,
        }
    }
    let io = Rewind { prefix, io };
    // Boxed: the connection's task is as large as its largest state, and
    // the connections the fast path serves (most) then never carry hyper's.
    Box::pin(serve_with_hyper(
        io,
        h2,
        proxy,
        client,
        state,
        clock,
        (max_headers, max_fields),
    ))
    .await;
}

/// The rest of a connection on hyper: h2c, or HTTP/1.1 from the request the
/// fast path did not take.
async fn serve_with_hyper(
    io: Rewind,
    h2: bool,
    proxy: Arc<HttpProxy>,
    client: Arc<Downstream>,
    state: Arc<ConnState>,
    clock: Clock,
    (max_headers, max_fields): (usize, usize),
) {
    let service = service_fn(move |req| {
        let flight = client.conn.begin();
        let proxy = proxy.clone();
        let client = client.clone();
        async move { Ok::<_, Infallible>(proxy.handle(req, &client, flight).await) }
    });
    let io = TokioIo::new(io);
    let peer = state.peer;
    let close = state.close_asked();
    let result = if h2 {
        let streams = Inline::default();
        // Windows (hyper's 1 MiB per stream and per connection), frames
        // (16 KiB) and adaptive windows (off) are the defaults on purpose:
        // A/B'd with `bench/ab.sh`, none beat the noise on small answers;
        // 4/16 MiB windows made 256 KiB uploads ~9% cheaper but let one
        // client park 16 MiB per connection in our buffers.
        let conn = hyper::server::conn::http2::Builder::new(streams.clone())
            .timer(TokioTimer::new())
            .max_concurrent_streams(100)
            .max_header_list_size(max_headers as u32)
            // What one stream may queue beyond the client's flow-control
            // window (hyper: 400 KiB): a client that opens a window and never
            // reads would otherwise hold that much per stream. (A/B: 400 KiB
            // made 256 KiB answers ~8% cheaper and small ones ~8% dearer.)
            .max_send_buf_size(H2_SEND_BUFFER)
            .keep_alive_interval(Some(Duration::from_secs(30)))
            .serve_connection(io, service);
        streams.drive(conn, close, |c| c.graceful_shutdown()).await
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
        until_closed(conn, close, |c| c.graceful_shutdown()).await
    };
    if let Err(e) = result {
        tracing::debug!(%peer, error = %e, "client connection ended with an error");
    }
}

/// The client's socket with what the fast path already read of it replayed
/// first, so hyper reads the connection from the request the fast path did
/// not take.
struct Rewind {
    prefix: bytes::Bytes,
    io: ClientIo,
}

impl tokio::io::AsyncRead for Rewind {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = buf.remaining().min(self.prefix.len());
            buf.put_slice(&self.prefix.split_to(n));
            return std::task::Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Rewind {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Runs an h2 connection's streams on the connection's own task, not a task
/// each: hyper hands every stream to this executor, which queues it for
/// [`Inline::drive`] to poll beside the connection. Per request that saves
/// a spawn, a scheduler round trip and a cross-task wake-up (A/B: 0.90x the
/// CPU per h2c request); the streams of one connection share one task, as
/// they shared one socket.
#[derive(Clone, Default)]
struct Inline(Arc<InlineQueue>);

#[derive(Default)]
struct InlineQueue {
    new: std::sync::Mutex<Vec<Pin<Box<dyn Future<Output = ()> + Send>>>>,
    waker: futures::task::AtomicWaker,
}

impl<F: Future<Output = ()> + Send + 'static> hyper::rt::Executor<F> for Inline {
    fn execute(&self, fut: F) {
        self.0.new.lock().expect("stream queue lock").push(Box::pin(fut));
        self.0.waker.wake();
    }
}

impl Inline {
    /// [`until_closed`] for an h2 connection whose streams this executor
    /// holds: polls the connection, then every stream it started, until the
    /// connection ends (its streams end with it).
    async fn drive<C: Future>(
        &self,
        conn: C,
        close: impl Future<Output = ()>,
        graceful: impl FnOnce(Pin<&mut C>),
    ) -> C::Output {
        use futures::StreamExt;
        tokio::pin!(conn);
        tokio::pin!(close);
        let mut graceful = Some(graceful);
        let mut running = futures::stream::FuturesUnordered::new();
        std::future::poll_fn(|cx| {
            if graceful.is_some()
                && close.as_mut().poll(cx).is_ready()
                && let Some(g) = graceful.take()
            {
                g(conn.as_mut());
            }
            loop {
                if let std::task::Poll::Ready(out) = conn.as_mut().poll(cx) {
                    return std::task::Poll::Ready(out);
                }
                self.0.waker.register(cx.waker());
                let new = std::mem::take(&mut *self.0.new.lock().expect("stream queue lock"));
                if new.is_empty() && running.is_empty() {
                    return std::task::Poll::Pending;
                }
                let started = !new.is_empty();
                running.extend(new);
                while let std::task::Poll::Ready(Some(())) = running.poll_next_unpin(cx) {}
                // New streams may have answered already: the connection
                // sends what they queued before this task sleeps.
                if !started {
                    return std::task::Poll::Pending;
                }
            }
        })
        .await
    }
}

/// Runs a hyper connection; once `close` resolves, starts its graceful
/// shutdown (`graceful`) and waits for it to finish what it has.
async fn until_closed<C: Future>(
    conn: C,
    close: impl Future<Output = ()>,
    graceful: impl FnOnce(Pin<&mut C>),
) -> C::Output {
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => r,
        _ = close => {
            graceful(conn.as_mut());
            conn.await
        }
    }
}
