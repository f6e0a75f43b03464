//! When bytes last moved on a TCP connection, either way: its idle timeout
//! and the byte counts of its access-log line.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// When bytes last moved on a connection, either way, for its idle timeout.
#[derive(Debug)]
pub struct Activity {
    start: Instant,
    last_ms: AtomicU64,
    // Bytes from the client, and to it.
    moved: [AtomicU64; 2],
}

impl Default for Activity {
    fn default() -> Self {
        Self::new()
    }
}

impl Activity {
    /// Activity starting now.
    pub fn new() -> Self {
        Self {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
            moved: [AtomicU64::new(0), AtomicU64::new(0)],
        }
    }

    /// `n` bytes moved from the client (`to_client` false) or to it.
    pub fn moved(&self, to_client: bool, n: usize) {
        self.moved[usize::from(to_client)].fetch_add(n as u64, Ordering::Relaxed);
        self.touch();
    }

    /// Bytes from the client and to it so far.
    pub fn totals(&self) -> (u64, u64) {
        (
            self.moved[0].load(Ordering::Relaxed),
            self.moved[1].load(Ordering::Relaxed),
        )
    }

    /// Bytes moved.
    pub fn touch(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// Resolves once nothing moved for `idle`.
    pub async fn idle_for(&self, idle: Duration) {
        loop {
            let at = self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed)) + idle;
            if Instant::now() >= at {
                return;
            }
            tokio::time::sleep_until(at).await;
        }
    }
}

/// The client's stream, telling an [`Activity`] of every byte through it.
pub struct Touching<'a, S> {
    inner: &'a mut S,
    activity: &'a Activity,
}

impl<'a, S> Touching<'a, S> {
    /// Wraps `inner`.
    pub fn new(inner: &'a mut S, activity: &'a Activity) -> Self {
        Self { inner, activity }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Touching<'_, S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut *self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.moved(false, buf.filled().len() - before);
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Touching<'_, S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut *self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = polled {
            self.activity.moved(true, n);
        }
        polled
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.inner).poll_shutdown(cx)
    }
}
