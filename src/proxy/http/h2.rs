//! HTTP/2 from clients (h2c, and h2 by ALPN) on the `h2` crate directly.
//! hyper's server wrapped every stream in its own state machine, its own
//! body type and a boxed future handed to an executor, and stripped and
//! dated each answer again; here a connection's task accepts streams and
//! runs them beside the connection, each a [`HttpProxy::handle`] call and a
//! copy of the answer into the stream, as the upstream side
//! (`upstream::http2`) already speaks h2 without hyper.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use h2::server::SendResponse;
use h2::{Reason, RecvStream, SendStream};
use http::header::{self, HeaderValue};
use http::{Request, Response};
use hyper::body::Body;
use tokio::time::{Instant, Sleep};

use super::HttpProxy;
use super::body::ClientBody;
use crate::proxy::client::Downstream;
use crate::proxy::client::conn::{ClientIo, InFlight};
use crate::proxy::upstream::body::{H2Body, IncomingBody};
use crate::proxy::upstream::http2::{Room, poll_send_body, strip_connection_headers};

/// The most an h2 stream queues for a client beyond its flow-control window:
/// a client that opens a window and never reads would otherwise hold this
/// much per stream (hyper's default, 400 KiB; A/B: 400 KiB made 256 KiB
/// answers ~8% cheaper and small ones ~8% dearer).
const SEND_BUFFER: usize = 32 * 1024;

/// Streams one connection may have open at once.
const MAX_STREAMS: u32 = 100;

/// Windows (1 MiB per stream and per connection) and frames (16 KiB) as
/// hyper's server had them: A/B'd with `bench/ab.sh`, nothing beat the noise
/// on small answers; 4/16 MiB windows made 256 KiB uploads ~9% cheaper but
/// let one client park 16 MiB per connection in our buffers.
const WINDOW: u32 = 1024 * 1024;

/// A PING goes to the client this often; a connection whose client has not
/// answered the last one within [`PING_TIMEOUT`] is closed (a peer that
/// vanished without a FIN would otherwise hold its streams forever).
const PING_EVERY: Duration = Duration::from_secs(30);

/// How long a PING may go unanswered.
const PING_TIMEOUT: Duration = Duration::from_secs(20);

/// Streams whose reset the client caused (protocol errors) before the
/// connection is closed: hyper's default, against "rapid reset" floods.
const MAX_ERROR_RESETS: usize = 1024;

/// Serves one client connection as HTTP/2 until it ends; once `close`
/// resolves, sends GOAWAY and finishes the streams already open.
pub async fn serve(
    io: ClientIo,
    proxy: Arc<HttpProxy>,
    client: Arc<Downstream>,
    close: impl Future<Output = ()>,
    max_header_bytes: usize,
) -> Result<(), h2::Error> {
    tokio::pin!(close);
    let handshake = h2::server::Builder::new()
        .initial_window_size(WINDOW)
        .initial_connection_window_size(WINDOW)
        .max_frame_size(16 * 1024)
        .max_concurrent_streams(MAX_STREAMS)
        .max_header_list_size(u32::try_from(max_header_bytes).unwrap_or(u32::MAX))
        .max_send_buffer_size(SEND_BUFFER)
        .max_local_error_reset_streams(Some(MAX_ERROR_RESETS))
        .handshake::<_, Bytes>(io);
    // Closing before the preface is done needs no GOAWAY: nothing was asked.
    let mut conn = tokio::select! {
        c = handshake => c?,
        _ = close.as_mut() => return Ok(()),
    };
    let mut keepalive = KeepAlive::new(conn.ping_pong());
    let mut closing = false;
    let mut running = FuturesUnordered::new();
    std::future::poll_fn(|cx| {
        if !closing && close.as_mut().poll(cx).is_ready() {
            closing = true;
            conn.graceful_shutdown();
        }
        if keepalive.poll(cx).is_ready() {
            tracing::debug!(peer = %client.peer, "h2 client did not answer a PING: closing");
            conn.abrupt_shutdown(Reason::NO_ERROR);
        }
        loop {
            // Accepting also drives the connection: reads frames and writes
            // what the streams queued.
            let mut started = false;
            loop {
                match conn.poll_accept(cx) {
                    Poll::Ready(Some(Ok((req, respond)))) => {
                        let flight = client.conn.begin();
                        // Boxed before it is queued: the stream's future is
                        // kilobytes, and the queue's node would otherwise take
                        // it by two more copies (profile: 3.8% of the CPU in
                        // memmove; boxed, one).
                        let req = request_of(req);
                        let fut = Box::pin(stream(proxy.clone(), client.clone(), req, respond, flight));
                        running.push(fut);
                        started = true;
                    }
                    Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(e)),
                    // The connection has ended; its streams end with it.
                    Poll::Ready(None) => return Poll::Ready(Ok(())),
                    Poll::Pending => break,
                }
            }
            while let Poll::Ready(Some(())) = running.poll_next_unpin(cx) {}
            // New streams may have answered at once (a local answer, a
            // refusal): the connection sends what they queued before this
            // task sleeps.
            if !started {
                return Poll::Pending;
            }
        }
    })
    .await
}

/// One stream: the request handled, then its answer copied to the client,
/// dropped (cancelling the upstream side) if the client resets it first.
async fn stream(
    proxy: Arc<HttpProxy>,
    client: Arc<Downstream>,
    req: Request<IncomingBody>,
    mut respond: SendResponse<Bytes>,
    flight: InFlight,
) {
    // In a block of its own, so the handling's state (most of the stream's)
    // is not kept beside the copy of the answer: every stream in flight is
    // the size of the larger of the two.
    let answer = {
        let handled = proxy.handle(req, &client, flight);
        tokio::pin!(handled);
        std::future::poll_fn(|cx| {
            if let Poll::Ready(answer) = handled.as_mut().poll(cx) {
                return Poll::Ready(Some(answer));
            }
            // Waiting on the endpoint: a client's RST_STREAM ends it here.
            match respond.poll_reset(cx) {
                Poll::Ready(_) => Poll::Ready(None),
                Poll::Pending => Poll::Pending,
            }
        })
        .await
    };
    let Some(answer) = answer else {
        return;
    };
    let (mut head, body) = answer.into_parts();
    strip_connection_headers(&mut head.headers);
    if !head.headers.contains_key(header::DATE) {
        head.headers.insert(header::DATE, super::headers::date());
    }
    if body.is_end_stream() {
        let _ = respond.send_response(Response::from_parts(head, ()), true);
        return;
    }
    // The header first: an endpoint's answer usually has it, and asking the
    // body takes the endpoint connection's lock.
    if !head.headers.contains_key(header::CONTENT_LENGTH)
        && let Some(len) = body.size_hint().exact()
    {
        head.headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    }
    let Ok(send) = respond.send_response(Response::from_parts(head, ()), false) else {
        return;
    };
    copy_answer(body, send).await;
}

/// Copies the answer's body into its stream within the client's window
/// (plus [`SEND_BUFFER`]), so a client that does not read makes us stop
/// reading the endpoint rather than buffer; trailers follow the data.
async fn copy_answer(mut body: ClientBody, mut send: SendStream<Bytes>) {
    let mut room = Room::default();
    let outcome = std::future::poll_fn(|cx| poll_send_body(&mut body, &mut send, &mut room, cx)).await;
    if let Err(reason) = outcome {
        send.send_reset(reason);
    }
}

/// The stream's request with its body as the phases take it. Built before
/// the stream's future, which would otherwise hold the head twice.
fn request_of(req: Request<RecvStream>) -> Request<IncomingBody> {
    let (parts, recv) = req.into_parts();
    let length = content_length(&parts.headers);
    Request::from_parts(parts, IncomingBody::H2(H2Body::new(recv, length)))
}

/// The request's declared length; the h2 crate has already checked that the
/// DATA frames add up to it.
fn content_length(headers: &http::HeaderMap) -> Option<u64> {
    headers.get(header::CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
}

/// The connection's PINGs: one every [`PING_EVERY`], the connection given up
/// when one goes unanswered for [`PING_TIMEOUT`].
struct KeepAlive {
    ping: Option<h2::PingPong>,
    timer: Pin<Box<Sleep>>,
    waiting: bool,
}

impl KeepAlive {
    fn new(ping: Option<h2::PingPong>) -> Self {
        Self {
            ping,
            timer: Box::pin(tokio::time::sleep(PING_EVERY)),
            waiting: false,
        }
    }

    /// Ready when the client failed to answer in time.
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let Some(ping) = self.ping.as_mut() else {
            return Poll::Pending;
        };
        if self.waiting {
            match ping.poll_pong(cx) {
                Poll::Ready(Ok(_)) => {
                    self.waiting = false;
                    self.timer.as_mut().reset(Instant::now() + PING_EVERY);
                }
                // The connection is ending: its own error says why.
                Poll::Ready(Err(_)) => {
                    self.ping = None;
                    return Poll::Pending;
                }
                Poll::Pending => {}
            }
        }
        while self.timer.as_mut().poll(cx).is_ready() {
            if self.waiting {
                self.ping = None;
                return Poll::Ready(());
            }
            if ping.send_ping(h2::Ping::opaque()).is_err() {
                self.ping = None;
                return Poll::Pending;
            }
            self.waiting = true;
            self.timer.as_mut().reset(Instant::now() + PING_TIMEOUT);
            if let Poll::Ready(Ok(_)) = ping.poll_pong(cx) {
                self.waiting = false;
                self.timer.as_mut().reset(Instant::now() + PING_EVERY);
            }
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    /// An h2 server connection on one end of an in-memory pipe, its
    /// keep-alive beside it: ready once either ends, `true` when the
    /// keep-alive gave up on the client.
    async fn run_until_given_up(server: DuplexStream) -> bool {
        let mut conn = h2::server::handshake(server).await.expect("handshake");
        let mut keepalive = KeepAlive::new(conn.ping_pong());
        std::future::poll_fn(|cx| {
            if keepalive.poll(cx).is_ready() {
                return Poll::Ready(true);
            }
            match conn.poll_accept(cx) {
                Poll::Ready(_) => Poll::Ready(false),
                Poll::Pending => Poll::Pending,
            }
        })
        .await
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_never_answers_a_ping_is_given_up_after_the_timeout() {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        // A preface and SETTINGS, then silence: the PING is never answered.
        client.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await.unwrap();
        client.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await.unwrap();
        let started = Instant::now();
        assert!(run_until_given_up(server).await, "the keep-alive gave up");
        assert_eq!(started.elapsed().as_secs(), (PING_EVERY + PING_TIMEOUT).as_secs());
        // The server's frames: SETTINGS, its ACK of ours, then the PING.
        let mut written = vec![0; 1 << 16];
        let n = client.read(&mut written).await.unwrap();
        let mut types = Vec::new();
        let mut at = 0;
        while at + 9 <= n {
            let len = usize::from(written[at]) << 16 | usize::from(written[at + 1]) << 8 | usize::from(written[at + 2]);
            types.push(written[at + 3]);
            at += 9 + len;
        }
        assert_eq!(
            types.iter().filter(|t| **t == 6).count(),
            1,
            "one PING, frame types {types:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_answers_its_pings_is_kept() {
        let (client, server) = tokio::io::duplex(1 << 16);
        let (_sender, client_conn) = h2::client::handshake(client).await.unwrap();
        // The h2 client answers PINGs as long as its connection is polled.
        let client_task = tokio::spawn(client_conn);
        let served = tokio::time::timeout(Duration::from_secs(600), run_until_given_up(server)).await;
        assert!(served.is_err(), "still open after ten minutes of PINGs: {served:?}");
        client_task.abort();
    }
}
