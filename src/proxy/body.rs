//! Bodies the proxy moves: request bodies buffered for replay (up to a limit)
//! or streamed once, and response bodies that keep an endpoint counted as
//! active, and its connection checked out, until the last byte has gone to
//! the client.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1;
use tokio::sync::Notify;
use tokio::time::{Instant, Sleep};

use super::access::{AccessLog, Entry, Flags};
use super::conn::InFlight;
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

/// How a client's request body ended, as far as the proxy read it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UploadEnd {
    /// Still coming.
    Going,
    /// Read to the end.
    Done,
    /// The client paused longer than `timeouts.requestBody`.
    TimedOut,
    /// The client's body broke off (connection closed, bad chunking).
    Failed,
}

/// What the forward loop and a streamed body share about the upload.
#[derive(Debug)]
pub struct UploadState {
    bytes: AtomicU64,
    end: AtomicU8,
    ended: Notify,
}

impl UploadState {
    /// How the upload ended so far.
    pub fn end(&self) -> UploadEnd {
        match self.end.load(Ordering::Acquire) {
            0 => UploadEnd::Going,
            1 => UploadEnd::Done,
            2 => UploadEnd::TimedOut,
            _ => UploadEnd::Failed,
        }
    }

    /// Body bytes read from the client.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Resolves once the upload ended, one way or another.
    pub async fn ended(&self) {
        loop {
            let notified = self.ended.notified();
            if self.end() != UploadEnd::Going {
                return;
            }
            notified.await;
        }
    }

    fn finish(&self, end: UploadEnd) {
        let code = match end {
            UploadEnd::Going => return,
            UploadEnd::Done => 1,
            UploadEnd::TimedOut => 2,
            UploadEnd::Failed => 3,
        };
        if self
            .end
            .compare_exchange(0, code, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            self.ended.notify_waiters();
        }
    }
}

/// The client's side of a streamed upload: `timeouts.requestBody` between
/// reads (a timer only while a read waits, moved lazily), and the end
/// reported to [`UploadState`] so `timeouts.response` can start there.
#[derive(Debug)]
pub struct Upload {
    state: Arc<UploadState>,
    timeout: Duration,
    last_read: Instant,
    sleep: Option<Pin<Box<Sleep>>>,
}

impl Upload {
    /// A new upload whose reads may pause at most `timeout`.
    pub fn new(timeout: Duration) -> Self {
        Self {
            state: Arc::new(UploadState {
                bytes: AtomicU64::new(0),
                end: AtomicU8::new(0),
                ended: Notify::new(),
            }),
            timeout,
            last_read: Instant::now(),
            sleep: None,
        }
    }

    /// The state the forward loop watches.
    pub fn state(&self) -> Arc<UploadState> {
        self.state.clone()
    }

    /// Counts bytes already read.
    pub fn count(&self, n: usize) {
        self.state.bytes.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Polls the client's body for the next frame, within the body timeout.
    pub fn poll_next(
        &mut self,
        body: Pin<&mut Incoming>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match body.poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.count(data.len());
                }
                self.last_read = Instant::now();
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                self.state.finish(UploadEnd::Failed);
                Poll::Ready(Some(Err(Box::new(e))))
            }
            Poll::Ready(None) => {
                self.state.finish(UploadEnd::Done);
                Poll::Ready(None)
            }
            Poll::Pending => {
                let at = self.last_read + self.timeout;
                let sleep = self.sleep.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)));
                loop {
                    if sleep.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                    let at = self.last_read + self.timeout;
                    if Instant::now() >= at {
                        self.state.finish(UploadEnd::TimedOut);
                        return Poll::Ready(Some(Err(Box::new(BodyTimeout))));
                    }
                    sleep.as_mut().reset(at);
                }
            }
        }
    }
}

/// The client paused its upload longer than `timeouts.requestBody`.
#[derive(Debug, thiserror::Error)]
#[error("client sent no body bytes for spec.timeouts.requestBody")]
pub struct BodyTimeout;

/// Why a request body could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The client paused longer than `timeouts.requestBody`.
    #[error("no body bytes for spec.timeouts.requestBody ({0:?})")]
    Timeout(Duration),
    /// The body broke off.
    #[error(transparent)]
    Body(#[from] hyper::Error),
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
    pub async fn read(mut body: Incoming, limit: u64, timeout: Duration) -> Result<RequestBody, ReadError> {
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
                Ok(Some(frame)) => frame?,
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
            RequestBody::Replayable(bytes) if bytes.is_empty() => Some(UpBody::Empty),
            RequestBody::Replayable(bytes) => Some(UpBody::Full(Some(bytes.clone()))),
            RequestBody::Streaming(body) => body.take(),
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
    _pass: Option<super::gate::Pass>,
    log: Option<Box<(AccessLog, Instant, Entry)>>,
    ended: bool,
}

impl ClientBody {
    /// Wraps `inner` for the client; `pass` is held until it ends.
    pub fn new(
        inner: ProxyBody,
        flight: InFlight,
        pass: Option<super::gate::Pass>,
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
