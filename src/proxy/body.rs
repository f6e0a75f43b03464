//! Bodies the proxy moves: request bodies buffered for replay (up to a limit)
//! or streamed once, and response bodies that keep an endpoint counted as
//! active, and its connection checked out, until the last byte has gone to
//! the client.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1;

use super::service::ActiveGuard;
use super::upstream::{Pool, StreamSlot, UpBody};

/// Boxed error of any body the proxy forwards.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The one body type the proxy answers with.
pub type ProxyBody = BoxBody<Bytes, BoxError>;

/// A body of `bytes`.
pub fn full(bytes: impl Into<Bytes>) -> ProxyBody {
    Full::new(bytes.into()).map_err(|never| match never {}).boxed()
}

/// An empty body.
pub fn empty() -> ProxyBody {
    Empty::new().map_err(|never| match never {}).boxed()
}

/// A request body as the retry loop holds it.
pub enum RequestBody {
    /// Fully read: can be sent to as many endpoints as needed.
    Replayable(Bytes),
    /// Larger than the buffer: can be sent once.
    Streaming(Option<UpBody>),
}

impl RequestBody {
    /// Reads up to `limit` bytes; a larger body is passed on as a stream that
    /// starts with what was already read.
    pub async fn read(mut body: Incoming, limit: u64) -> Result<RequestBody, hyper::Error> {
        if body.is_end_stream() {
            return Ok(RequestBody::Replayable(Bytes::new()));
        }
        if body.size_hint().lower() > limit {
            return Ok(RequestBody::Streaming(Some(UpBody::Stream { head: None, rest: body })));
        }
        let mut buf = BytesMut::new();
        while let Some(frame) = body.frame().await {
            let frame = frame?;
            match frame.into_data() {
                Ok(data) => {
                    if buf.is_empty() && body.is_end_stream() {
                        // One frame holds it all (the common small body): no copy.
                        return Ok(RequestBody::Replayable(data));
                    }
                    buf.extend_from_slice(&data);
                    if buf.len() as u64 > limit {
                        return Ok(RequestBody::Streaming(Some(UpBody::Stream {
                            head: Some(buf.freeze()),
                            rest: body,
                        })));
                    }
                }
                // Request trailers are rare outside gRPC streaming; they end the body here.
                Err(_trailers) => break,
            }
        }
        Ok(RequestBody::Replayable(buf.freeze()))
    }

    /// The body for the next attempt; `None` when a streamed body was already sent.
    pub fn take(&mut self) -> Option<UpBody> {
        match self {
            RequestBody::Replayable(bytes) if bytes.is_empty() => Some(UpBody::Empty),
            RequestBody::Replayable(bytes) => Some(UpBody::Full(Some(bytes.clone()))),
            RequestBody::Streaming(body) => body.take(),
        }
    }

    /// Whether another attempt could send the body again.
    pub fn replayable(&self) -> bool {
        matches!(self, RequestBody::Replayable(_))
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
    inner: Incoming,
    guard: Option<ActiveGuard>,
    release: Release,
}

impl Tracked {
    /// Wraps `inner`, releasing `guard` and `release` at end of stream or drop.
    pub fn new(inner: Incoming, guard: ActiveGuard, release: Release) -> Self {
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
        polled.map(|f| f.map(|r| r.map_err(|e| Box::new(e) as BoxError)))
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
