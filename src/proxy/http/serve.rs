//! An HTTP listener's connections: each admitted connection on its own clock
//! (`client::conn`), its protocol sniffed (HTTP/1.1 or h2c with prior
//! knowledge), served with our limits (HTTP/1.1 by the fast path, then
//! hyper; h2 by [`super::h2`]), and closed gracefully when asked (GOAWAY on
//! h2, close-after-response on HTTP/1).

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
use crate::proxy::upstream::body::IncomingBody;

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
    if h2 {
        // Boxed, as the hyper half below: most connections are HTTP/1.1.
        let served = Box::pin(super::h2::serve(io, proxy, client, state.close_asked(), max_headers)).await;
        if let Err(e) = served {
            tracing::debug!(peer = %state.peer, error = %e, "client h2 connection ended with an error");
        }
        return;
    }
    let mut prefix = bytes::Bytes::new();
    if super::fast::enabled() {
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
        proxy,
        client,
        state,
        clock,
        (max_headers, max_fields),
    ))
    .await;
}

/// The rest of an HTTP/1.1 connection on hyper, from the request the fast
/// path did not take.
async fn serve_with_hyper(
    io: Rewind,
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
        async move { Ok::<_, Infallible>(proxy.handle(req.map(IncomingBody::Http1), &client, flight).await) }
    });
    let io = TokioIo::new(io);
    let peer = state.peer;
    let close = state.close_asked();
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
    let result = until_closed(conn, close, |c| c.graceful_shutdown()).await;
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
