//! HTTP/2 to an endpoint on the `h2` crate directly, the request's own task
//! sending it and reading its answer. hyper's h2 client runs a dispatch task
//! per connection and spawns one more task per request, so a request crossed
//! four tasks (ours, the dispatch, the per-request one, the connection's) and
//! back through two channels; here it wakes the connection's task and is woken
//! by it, as the h2 crate allows any task to open a stream.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use h2::SendStream;
use h2::client::SendRequest;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response};
use hyper::body::Body;
use tokio::sync::oneshot;

use super::body::{BoxError, H2Body};
use crate::net::io_text;
use crate::proxy::retry::Failure;
use crate::tls::upstream::MaybeTls;

/// The most response header bytes an endpoint may send (hyper's default).
const MAX_HEADER_LIST: u32 = 16 * 1024;

/// Request body bytes queued on a stream beyond what the endpoint's window
/// takes (hyper's client default).
const MAX_SEND_BUFFER: usize = 1024 * 1024;

/// A handle on one HTTP/2 connection; cheap to clone, one per request.
#[derive(Clone, Debug)]
pub struct H2Sender {
    sender: SendRequest<Bytes>,
    closed: Arc<AtomicBool>,
}

impl H2Sender {
    /// Whether the connection has ended (it takes no new streams).
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Relaxed)
    }
}

/// Speaks HTTP/2 on `io` and runs the connection in a task of its own.
pub async fn handshake(io: MaybeTls, endpoint: std::net::SocketAddr) -> Result<H2Sender, h2::Error> {
    let (sender, conn) = h2::client::Builder::new()
        // Large windows: a loopback or in-cluster endpoint should never wait
        // for WINDOW_UPDATE on ordinary responses.
        .initial_window_size(4 * 1024 * 1024)
        .initial_connection_window_size(16 * 1024 * 1024)
        .max_concurrent_reset_streams(64)
        .max_header_list_size(MAX_HEADER_LIST)
        .max_send_buffer_size(MAX_SEND_BUFFER)
        .enable_push(false)
        .handshake::<_, Bytes>(io)
        .await?;
    let closed = Arc::new(AtomicBool::new(false));
    let ended = closed.clone();
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(%endpoint, error = %e, "upstream h2 connection ended with an error");
        }
        ended.store(true, Ordering::Relaxed);
    });
    Ok(H2Sender { sender, closed })
}

/// Sends `req` and waits for the response head. The body, when there is
/// one, goes up from a task of its own (it may outlive the head: a gRPC
/// stream sends while it receives), reset if this future is dropped first.
//
// An `async move` block: an `async fn` would keep `sender` and `req` twice
// in every request in flight (see `HttpProxy::handle`).
#[allow(clippy::manual_async_fn)]
pub fn send<B>(sender: H2Sender, req: Request<B>) -> impl Future<Output = Result<Response<H2Body>, Failure>>
where
    B: Body<Data = Bytes, Error = BoxError> + Send + Unpin + 'static,
{
    async move {
        let closed = sender.closed;
        let mut sender = match sender.sender.ready().await {
            Ok(ready) => ready,
            Err(_) => {
                // A GOAWAY came, or the connection ended: the pool stops handing it out.
                closed.store(true, Ordering::Relaxed);
                return Err(unsent());
            }
        };
        let (mut head, body) = req.into_parts();
        strip_connection_headers(&mut head.headers);
        if let Some(len) = body.size_hint().exact()
            && (len != 0 || matches!(head.method, Method::POST | Method::PUT | Method::PATCH))
            && !head.headers.contains_key(header::CONTENT_LENGTH)
        {
            head.headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
        }
        let eos = body.is_end_stream();
        let (response, stream) = sender.send_request(Request::from_parts(head, ()), eos).map_err(|e| {
            if is_user(&e) {
                Failure::Error(e.to_string())
            } else {
                unsent()
            }
        })?;
        let cancel = if eos {
            None
        } else {
            let (cancel, cancelled) = oneshot::channel();
            tokio::spawn(pump(body, stream, cancelled));
            Some(CancelOnDrop(Some(cancel)))
        };
        let resp = response.await.map_err(|e| classify(&e))?;
        if let Some(mut c) = cancel {
            c.0 = None;
        }
        let content_length = resp
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        Ok(resp.map(|recv| H2Body::new(recv, content_length)))
    }
}

/// Resets the stream's upload if the request is dropped before its answer
/// (a hedge that lost, a client that left).
struct CancelOnDrop(Option<oneshot::Sender<()>>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if let Some(c) = self.0.take() {
            let _ = c.send(());
        }
    }
}

/// Copies `body` to `stream` within the endpoint's flow control window.
async fn pump<B: Body<Data = Bytes, Error = BoxError> + Unpin>(
    mut body: B,
    mut stream: SendStream<Bytes>,
    mut cancelled: oneshot::Receiver<()>,
) {
    let mut room = Room::default();
    let outcome = std::future::poll_fn(|cx| {
        if let Poll::Ready(Ok(())) = Pin::new(&mut cancelled).poll(cx) {
            return Poll::Ready(Err(h2::Reason::CANCEL));
        }
        poll_send_body(&mut body, &mut stream, &mut room, cx)
    })
    .await;
    if let Err(reason) = outcome {
        stream.send_reset(reason);
    }
}

/// Copies `body` into `stream` within the peer's flow-control window (plus
/// the connection's send buffer), then its trailers: the upload to an
/// endpoint here, an answer to a client in `proxy::http::h2`. A body that
/// breaks off is the `Err` to reset the stream with. `room` is the copy's
/// state between polls: set once a frame went out, so the next waits for
/// the window.
pub fn poll_send_body<B: Body<Data = Bytes, Error = BoxError> + Unpin>(
    body: &mut B,
    stream: &mut SendStream<Bytes>,
    room: &mut Room,
    cx: &mut Context<'_>,
) -> Poll<Result<(), h2::Reason>> {
    loop {
        // Room before the next frame (what the window takes plus the send
        // buffer), so a sender faster than the receiver waits on us instead
        // of piling up. Not before the first: most bodies are one frame, and
        // each of these calls takes the connection's lock.
        if *room == Room::WaitBeforeNext {
            stream.reserve_capacity(1);
            if stream.capacity() == 0 {
                loop {
                    match ready!(stream.poll_capacity(cx)) {
                        Some(Ok(0)) => {}
                        Some(Ok(_)) => break,
                        // The peer reset the stream or the connection ended.
                        Some(Err(_)) | None => return Poll::Ready(Ok(())),
                    }
                }
            }
            *room = Room::Free;
        }
        let frame = match Pin::new(&mut *body).poll_frame(cx) {
            Poll::Ready(frame) => frame,
            Poll::Pending => {
                // Waiting on the body: the peer's reset ends the copy here.
                if stream.poll_reset(cx).is_ready() {
                    return Poll::Ready(Ok(()));
                }
                return Poll::Pending;
            }
        };
        match frame {
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => {
                    let end = body.is_end_stream();
                    if stream.send_data(data, end).is_err() || end {
                        return Poll::Ready(Ok(()));
                    }
                    *room = Room::WaitBeforeNext;
                }
                Err(frame) => {
                    if let Ok(trailers) = frame.into_trailers() {
                        let _ = stream.send_trailers(trailers);
                        return Poll::Ready(Ok(()));
                    }
                }
            },
            Some(Err(e)) => return Poll::Ready(Err(reason_of(&*e))),
            None => {
                let _ = stream.send_data(Bytes::new(), true);
                return Poll::Ready(Ok(()));
            }
        }
    }
}

/// Where a body's copy into an h2 stream stands on flow control.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Room {
    /// The next frame may go without asking for room.
    #[default]
    Free,
    /// A frame went out: the next waits until the window has room.
    WaitBeforeNext,
}

/// The reset code for a body that broke off: the h2 reason behind it, when
/// an h2 stream on the other side was reset (a gRPC peer tells `CANCEL` from
/// a failure), else `INTERNAL_ERROR`.
pub fn reason_of(e: &(dyn std::error::Error + 'static)) -> h2::Reason {
    let mut next = Some(e);
    while let Some(e) = next {
        if let Some(reason) = e.downcast_ref::<h2::Error>().and_then(h2::Error::reason) {
            return reason;
        }
        next = e.source();
    }
    h2::Reason::INTERNAL_ERROR
}

/// Headers HTTP/2 forbids (RFC 9113 8.2.2), in case a route or a filter put one back.
pub fn strip_connection_headers(headers: &mut http::HeaderMap) {
    // Usually none: one pass over the names, not six hashed lookups.
    if !headers.keys().any(is_connection_specific) {
        return;
    }
    let forbidden: Vec<_> = headers
        .keys()
        .filter(|n| is_connection_specific(n) && *n != header::TE)
        .cloned()
        .collect();
    for name in forbidden {
        headers.remove(name);
    }
    if headers.get(header::TE).is_some_and(|v| v != "trailers") {
        headers.remove(header::TE);
    }
}

/// Connection-specific headers (RFC 9113 8.2.2); `te` only as `trailers`.
fn is_connection_specific(name: &header::HeaderName) -> bool {
    *name == header::CONNECTION
        || *name == header::TRANSFER_ENCODING
        || *name == header::UPGRADE
        || *name == header::TE
        || matches!(name.as_str(), "keep-alive" | "proxy-connection")
}

/// An error from the h2 crate about our own request (a header it will not
/// send), not about the endpoint or the connection.
fn is_user(e: &h2::Error) -> bool {
    e.reason().is_none() && !e.is_io() && !e.is_go_away()
}

/// A request that never left: the connection closed or is going away.
fn unsent() -> Failure {
    Failure::Refused("the connection closed before the request was sent".into())
}

/// Sorts an h2 error on a sent request into a failure the retry rules know.
pub fn classify(e: &h2::Error) -> Failure {
    if e.reason() == Some(h2::Reason::REFUSED_STREAM) {
        return Failure::Refused("the endpoint refused the stream (REFUSED_STREAM)".into());
    }
    if e.is_go_away() && e.is_remote() {
        return Failure::Refused("the endpoint's GOAWAY came before the stream".into());
    }
    match e.get_io() {
        Some(io) if io.kind() == std::io::ErrorKind::TimedOut => Failure::Timeout,
        Some(io) => Failure::Error(io_text(io)),
        None => Failure::Error(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;
    use tokio::net::{TcpListener, TcpStream};

    use super::*;
    use crate::proxy::upstream::body::{BoxError, UpBody};
    use hyper::body::Frame;

    /// An h2c endpoint that reads each request's body whole and answers its
    /// length, then a trailer; or, not `reading`, reads nothing (the upload
    /// stalls on its window). `reset` gets the reason of any stream the
    /// client reset.
    async fn endpoint(reset: tokio::sync::mpsc::UnboundedSender<h2::Reason>, reading: bool) -> std::net::SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            tcp.set_nodelay(true).unwrap();
            // A small window: a big upload has to wait for WINDOW_UPDATEs.
            let mut conn = h2::server::Builder::new()
                .initial_window_size(16 * 1024)
                .handshake::<_, Bytes>(tcp)
                .await
                .unwrap();
            while let Some(Ok((req, mut respond))) = conn.accept().await {
                let reset = reset.clone();
                tokio::spawn(async move {
                    if !reading {
                        let reason = std::future::poll_fn(|cx| respond.poll_reset(cx)).await;
                        let _ = reset.send(reason.unwrap_or(h2::Reason::NO_ERROR));
                        drop(req);
                        return;
                    }
                    let mut body = req.into_body();
                    let mut len = 0;
                    while let Some(chunk) = body.data().await {
                        match chunk {
                            Ok(chunk) => {
                                len += chunk.len();
                                let _ = body.flow_control().release_capacity(chunk.len());
                            }
                            Err(e) => {
                                let _ = reset.send(e.reason().unwrap_or(h2::Reason::NO_ERROR));
                                return;
                            }
                        }
                    }
                    let mut send = respond.send_response(Response::new(()), false).unwrap();
                    send.send_data(Bytes::from(len.to_string()), false).unwrap();
                    let mut trailers = http::HeaderMap::new();
                    trailers.insert("grpc-status", HeaderValue::from_static("0"));
                    send.send_trailers(trailers).unwrap();
                });
            }
        });
        addr
    }

    fn post<B>(body: B) -> Request<B> {
        Request::post("http://endpoint/upload").body(body).unwrap()
    }

    async fn connect(addr: std::net::SocketAddr) -> H2Sender {
        let tcp = TcpStream::connect(addr).await.unwrap();
        tcp.set_nodelay(true).unwrap();
        handshake(MaybeTls::Plain(tcp), addr).await.unwrap()
    }

    #[tokio::test]
    async fn a_body_larger_than_the_window_goes_up_whole_and_the_trailers_come_back() {
        let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
        let sender = connect(endpoint(tx, true).await).await;
        let body = UpBody::Full(Some(Bytes::from(vec![7u8; 3 * 1024 * 1024 + 5])));
        let resp = send(sender.clone(), post(body)).await.unwrap();
        assert!(
            resp.body().size_hint().exact().is_none(),
            "no Content-Length, no exact size"
        );
        let collected = resp.into_body().collect().await.unwrap();
        let trailers = collected.trailers().cloned().expect("trailers relayed");
        assert_eq!(collected.to_bytes(), (3 * 1024 * 1024 + 5).to_string());
        assert_eq!(trailers["grpc-status"], "0");
        // The connection carries on: a second request, no body.
        let resp = send(sender, post(UpBody::Empty)).await.unwrap();
        assert_eq!(resp.into_body().collect().await.unwrap().to_bytes(), "0");
    }

    #[tokio::test]
    async fn a_request_dropped_before_its_answer_resets_its_upload() {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let sender = connect(endpoint(tx, false).await).await;
        // A streamed upload, still going when the request is dropped (a
        // buffered one is all queued at once, and h2 resets that stream itself).
        let (more, chunks) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, BoxError>>(1);
        more.send(Ok(Frame::data(Bytes::from_static(b"first")))).await.unwrap();
        let body = http_body_util::StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(chunks));
        let sending = send(sender, post(body));
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(50), sending)
                .await
                .is_err(),
            "the endpoint never answers"
        );
        assert!(!more.is_closed(), "the upload was still waiting for the client");
        let reason = tokio::time::timeout(std::time::Duration::from_secs(10), rx.recv())
            .await
            .expect("the endpoint saw the stream end")
            .unwrap();
        assert_eq!(reason, h2::Reason::CANCEL);
    }

    #[test]
    fn connection_specific_headers_never_go_out_on_h2() {
        let mut h = http::HeaderMap::new();
        for name in [
            "connection",
            "transfer-encoding",
            "upgrade",
            "keep-alive",
            "proxy-connection",
        ] {
            h.insert(header::HeaderName::from_static(name), HeaderValue::from_static("x"));
        }
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_connection_headers(&mut h);
        let mut kept: Vec<_> = h.keys().map(|n| n.as_str()).collect();
        kept.sort();
        assert_eq!(kept, ["te", "x-kept"]);
        h.insert(header::TE, HeaderValue::from_static("gzip"));
        strip_connection_headers(&mut h);
        assert_eq!(h.keys().collect::<Vec<_>>(), ["x-kept"], "te only as trailers");
    }

    #[test]
    fn errors_are_sorted_for_the_retry_rules() {
        let refused = h2::Error::from(h2::Reason::REFUSED_STREAM);
        assert!(matches!(classify(&refused), Failure::Refused(_)));
        let cancelled = h2::Error::from(h2::Reason::CANCEL);
        assert!(matches!(classify(&cancelled), Failure::Error(_)));
        assert!(!is_user(&refused));
    }

    #[test]
    fn an_answer_that_broke_off_resets_with_the_endpoints_reason() {
        let endpoint: BoxError = Box::new(h2::Error::from(h2::Reason::CANCEL));
        assert_eq!(reason_of(&*endpoint), h2::Reason::CANCEL);
        let other: BoxError = "read timed out".into();
        assert_eq!(reason_of(&*other), h2::Reason::INTERNAL_ERROR);
    }
}
