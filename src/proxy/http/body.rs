//! Bodies on the client's side: the request body read for replay (up to a
//! limit) or passed on as a stream, and the answer's body, which holds the
//! request's marks (in flight on its connection, its overload slot) and
//! writes its access-log line when its last byte has gone.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Body, Frame, SizeHint};
use tokio::time::Instant;

use crate::proxy::access::{AccessLog, Entry, Flags};
use crate::proxy::client::conn::InFlight;
use crate::proxy::gate::Pass;
use crate::proxy::upstream::body::{BoxError, IncomingBody, UpBody, Upload, UploadState};

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

/// Why a request body could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The client paused longer than `timeouts.requestBody`.
    #[error("no body bytes for spec.timeouts.requestBody ({0:?})")]
    Timeout(Duration),
    /// The body broke off.
    #[error("{0}")]
    Body(BoxError),
}

/// A request body as the retry loop holds it.
pub enum RequestBody {
    /// Fully read: can be sent to as many endpoints as needed.
    Replayable(Bytes),
    /// Larger than the buffer: can be sent once.
    Streaming(Option<UpBody>),
}

impl RequestBody {
    /// Reads up to `limit` bytes, each read within `timeout`; a larger body is
    /// passed on as a stream that starts with what was already read.
    pub async fn read(mut body: IncomingBody, limit: u64, timeout: Duration) -> Result<RequestBody, ReadError> {
        if body.is_end_stream() {
            return Ok(RequestBody::Replayable(Bytes::new()));
        }
        if body.size_hint().lower() > limit {
            return Ok(RequestBody::Streaming(Some(UpBody::Stream {
                head: None,
                rest: body,
                upload: Upload::new(timeout),
            })));
        }
        let mut buf = BytesMut::new();
        loop {
            let frame = match tokio::time::timeout(timeout, body.frame()).await {
                Ok(Some(frame)) => frame.map_err(ReadError::Body)?,
                Ok(None) => break,
                Err(_) => return Err(ReadError::Timeout(timeout)),
            };
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
                            upload: Upload::new(timeout),
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
            RequestBody::Replayable(_) => self.replay(),
            RequestBody::Streaming(body) => body.take(),
        }
    }

    /// A copy of a buffered body for one more attempt; `None` for a streamed one.
    pub fn replay(&self) -> Option<UpBody> {
        match self {
            RequestBody::Replayable(bytes) if bytes.is_empty() => Some(UpBody::Empty),
            RequestBody::Replayable(bytes) => Some(UpBody::Full(Some(bytes.clone()))),
            RequestBody::Streaming(_) => None,
        }
    }

    /// Whether another attempt could send the body again.
    pub fn replayable(&self) -> bool {
        matches!(self, RequestBody::Replayable(_))
    }

    /// The streamed upload's state, to start `timeouts.response` at its end.
    pub fn upload(&self) -> Option<Arc<UploadState>> {
        match self {
            RequestBody::Streaming(Some(UpBody::Stream { upload, .. })) => Some(upload.state()),
            _ => None,
        }
    }

    /// The whole body, when it fit in the buffer.
    pub fn buffered(&self) -> Option<&Bytes> {
        match self {
            RequestBody::Replayable(b) => Some(b),
            RequestBody::Streaming(_) => None,
        }
    }

    /// Bytes read into the buffer.
    pub fn buffered_len(&self) -> u64 {
        match self {
            RequestBody::Replayable(b) => b.len() as u64,
            RequestBody::Streaming(_) => 0,
        }
    }
}

/// The answer's body as the client gets it: it keeps its request counted on
/// the connection (so a long download is not idle) and, with an access log,
/// counts its bytes and writes the line when it ends.
pub struct ClientBody {
    inner: ProxyBody,
    _flight: InFlight,
    // The request's slot under spec.limits.maxRequests, held to the last byte.
    _pass: Option<Pass>,
    log: Option<Box<(AccessLog, Instant, Entry)>>,
    ended: bool,
}

impl ClientBody {
    /// Wraps `inner` for the client; `pass` is held until it ends.
    pub fn new(
        inner: ProxyBody,
        flight: InFlight,
        pass: Option<Pass>,
        log: Option<Box<(AccessLog, Instant, Entry)>>,
    ) -> Self {
        Self {
            inner,
            _flight: flight,
            _pass: pass,
            log,
            ended: false,
        }
    }
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => self.ended = true,
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(data), Some(log)) = (frame.data_ref(), self.log.as_mut()) {
                    log.2.bytes_out += data.len() as u64;
                }
            }
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

impl Drop for ClientBody {
    fn drop(&mut self) {
        if let Some(log) = self.log.take() {
            let (log, started, mut entry) = *log;
            if !self.ended && !self.inner.is_end_stream() {
                entry.upstream.flags.set(Flags::DOWNSTREAM_CLOSED);
            }
            entry.duration = started.elapsed();
            log.send(entry);
        }
    }
}
