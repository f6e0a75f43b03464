//! Bodies the proxy moves: request bodies buffered for replay (up to a limit)
//! or streamed once, and response bodies that keep an endpoint counted as
//! active until the last byte has gone to the client.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, BodyStream, Empty, Full, StreamBody};
use hyper::body::{Body, Frame, Incoming, SizeHint};

use super::service::ActiveGuard;

/// Boxed error of any body the proxy forwards.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The one body type the proxy sends and answers with.
pub type ProxyBody = BoxBody<Bytes, BoxError>;

/// A body of `bytes`.
pub fn full(bytes: impl Into<Bytes>) -> ProxyBody {
    Full::new(bytes.into()).map_err(|never| match never {}).boxed()
}

/// An empty body.
pub fn empty() -> ProxyBody {
    Empty::new().map_err(|never| match never {}).boxed()
}

/// A client's body, boxed.
pub fn incoming(body: Incoming) -> ProxyBody {
    body.map_err(|e| Box::new(e) as BoxError).boxed()
}

/// A request body as the retry loop holds it.
pub enum RequestBody {
    /// Fully read: can be sent to as many endpoints as needed.
    Replayable(Bytes),
    /// Larger than the buffer: can be sent once.
    Streaming(Option<ProxyBody>),
}

impl RequestBody {
    /// Reads up to `limit` bytes; a larger body is passed on as a stream that
    /// starts with what was already read.
    pub async fn read(mut body: Incoming, limit: u64) -> Result<RequestBody, hyper::Error> {
        if body.is_end_stream() {
            return Ok(RequestBody::Replayable(Bytes::new()));
        }
        if body.size_hint().lower() > limit {
            return Ok(RequestBody::Streaming(Some(incoming(body))));
        }
        let mut buf = BytesMut::new();
        while let Some(frame) = body.frame().await {
            let frame = frame?;
            match frame.into_data() {
                Ok(data) => {
                    buf.extend_from_slice(&data);
                    if buf.len() as u64 > limit {
                        let head = futures::stream::iter([Ok::<_, BoxError>(Frame::data(buf.freeze()))]);
                        let rest = BodyStream::new(body).map(|f| f.map_err(|e| Box::new(e) as BoxError));
                        return Ok(RequestBody::Streaming(Some(BodyExt::boxed(StreamBody::new(
                            head.chain(rest),
                        )))));
                    }
                }
                // Request trailers are rare outside gRPC streaming; they end the body here.
                Err(_trailers) => break,
            }
        }
        Ok(RequestBody::Replayable(buf.freeze()))
    }

    /// The body for the next attempt; `None` when a streamed body was already sent.
    pub fn take(&mut self) -> Option<ProxyBody> {
        match self {
            RequestBody::Replayable(bytes) if bytes.is_empty() => Some(empty()),
            RequestBody::Replayable(bytes) => Some(full(bytes.clone())),
            RequestBody::Streaming(body) => body.take(),
        }
    }

    /// Whether another attempt could send the body again.
    pub fn replayable(&self) -> bool {
        matches!(self, RequestBody::Replayable(_))
    }
}

/// A response body that holds its endpoint's active count until it ends.
pub struct Tracked {
    inner: ProxyBody,
    guard: Option<ActiveGuard>,
}

impl Tracked {
    /// Wraps `inner`, releasing `guard` at end of stream or drop.
    pub fn new(inner: ProxyBody, guard: ActiveGuard) -> Self {
        Self {
            inner,
            guard: Some(guard),
        }
    }
}

impl Body for Tracked {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None) | Poll::Ready(Some(Err(_)))) {
            self.guard = None;
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
