//! The request body as it goes to an endpoint: empty, buffered (sent again on
//! a retry), or streamed from the client as it arrives, with the client's
//! body timeout between reads and the upload's end shared with the attempt
//! loop (so `timeouts.response` starts there). Also the bodies as they
//! arrive: a client's (hyper's HTTP/1.1 or an h2 stream) and an h2 stream's
//! from either side.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use h2::RecvStream;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio::sync::Notify;
use tokio::time::{Instant, Sleep};

/// Boxed error of any body the proxy forwards.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A client's request body as it arrives.
#[derive(Debug)]
pub enum IncomingBody {
    /// Read by hyper's HTTP/1.1 server.
    Http1(Incoming),
    /// An h2 stream's DATA frames (`proxy::http::h2`), its window given back as
    /// they are read.
    H2(H2Body),
}

impl Body for IncomingBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            IncomingBody::Http1(b) => Pin::new(b).poll_frame(cx).map_err(|e| Box::new(e) as BoxError),
            IncomingBody::H2(b) => Pin::new(b).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            IncomingBody::Http1(b) => b.is_end_stream(),
            IncomingBody::H2(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            IncomingBody::Http1(b) => b.size_hint(),
            IncomingBody::H2(b) => b.size_hint(),
        }
    }
}

/// An HTTP/2 stream's incoming body (an endpoint's answer, or a client's
/// request on our h2 server): its data, then its trailers, giving the window
/// back as it is read.
#[derive(Debug)]
pub struct H2Body {
    recv: RecvStream,
    // What the declared length says is still to come.
    remaining: Option<u64>,
    data_done: bool,
}

impl H2Body {
    /// The body of a stream whose head declared `content_length`.
    pub fn new(recv: RecvStream, content_length: Option<u64>) -> Self {
        let remaining = if recv.is_end_stream() { Some(0) } else { content_length };
        Self {
            recv,
            remaining,
            data_done: false,
        }
    }
}

impl Body for H2Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if !self.data_done {
            match ready!(self.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    let _ = self.recv.flow_control().release_capacity(data.len());
                    if let Some(n) = self.remaining.as_mut() {
                        *n = n.saturating_sub(data.len() as u64);
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(e)) => return Poll::Ready(Some(Err(Box::new(e)))),
                None => self.data_done = true,
            }
        }
        match ready!(self.recv.poll_trailers(cx)) {
            Ok(Some(trailers)) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
            Ok(None) => Poll::Ready(None),
            Err(e) => Poll::Ready(Some(Err(Box::new(e)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.recv.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        match self.remaining {
            _ if self.recv.is_end_stream() => SizeHint::with_exact(0),
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
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
        body: Pin<&mut IncomingBody>,
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
                Poll::Ready(Some(Err(e)))
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

/// A request body sent upstream: no box, so each attempt costs no allocation
/// for the body itself.
#[derive(Debug)]
pub enum UpBody {
    /// No body.
    Empty,
    /// A buffered body (replayable).
    Full(Option<Bytes>),
    /// Bytes already read, then the rest of the client's body.
    Stream {
        /// What was read before the buffer limit was passed.
        head: Option<Bytes>,
        /// The rest, as it arrives.
        rest: IncomingBody,
        /// The client's side of the upload: its body timeout and its end.
        upload: Upload,
    },
}

impl Body for UpBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match &mut *self {
            UpBody::Empty => Poll::Ready(None),
            UpBody::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            UpBody::Stream { head, rest, upload } => {
                if let Some(b) = head.take() {
                    upload.count(b.len());
                    return Poll::Ready(Some(Ok(Frame::data(b))));
                }
                upload.poll_next(Pin::new(rest), cx)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpBody::Empty => true,
            UpBody::Full(b) => b.is_none(),
            UpBody::Stream { head, rest, .. } => head.is_none() && rest.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpBody::Empty => SizeHint::with_exact(0),
            UpBody::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            UpBody::Stream { head, rest, .. } => {
                let extra = head.as_ref().map_or(0, |b| b.len() as u64);
                let inner = rest.size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(inner.lower() + extra);
                if let Some(upper) = inner.upper() {
                    hint.set_upper(upper + extra);
                }
                hint
            }
        }
    }
}
