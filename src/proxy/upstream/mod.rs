//! The endpoint's side of a request: the connections kept per endpoint
//! ([`pool`]), the request body as it goes up ([`body`]) and the answer's as
//! it comes back ([`answer`]), HTTP/2 spoken on the request's own task
//! ([`http2`]), and one exchange on a connection: send,
//! wait for the response head, and sort what went wrong into a [`Failure`]
//! the retry rules understand.

pub mod answer;
pub mod body;
pub mod http2;
pub mod pool;

pub use self::answer::EndpointBody;

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};

use self::body::{UpBody, UploadState};
use self::pool::{Conn, Pool, Release};
use crate::net::io_text;
use crate::proxy::retry::Failure;

/// One attempt's exchange with an endpoint: sends `request` on `conn` and
/// waits for the response head, `timeout` counted from the end of the upload
/// (nginx `proxy_read_timeout`; a slow upload is bounded by
/// `timeouts.requestBody` between reads instead).
///
/// An idle keep-alive connection the endpoint closed just as we used it is
/// not the endpoint failing: the request goes once more, on a fresh
/// connection, as hyper handed it back unsent or else as `copy` makes it.
pub async fn exchange(
    pool: &Arc<Pool>,
    conn: Conn,
    request: Request<UpBody>,
    copy: impl FnOnce() -> Option<Request<UpBody>>,
    upload: Option<&UploadState>,
    timeout: Duration,
) -> Result<(Response<EndpointBody>, Release), Failure> {
    let reused = matches!(conn, Conn::H1 { reused: true, .. });
    // Pinned here and lent: an async fn's argument is stored again as its
    // local, and every request in flight would carry the send twice.
    let first = std::pin::pin!(send(pool, conn, request));
    let outcome = after_upload(upload, timeout, first).await;
    let (failure, unsent) = match outcome {
        Err((f @ (Failure::Error(_) | Failure::Connect(_) | Failure::Refused(_)), unsent)) if reused => (f, unsent),
        other => return other.map_err(|(failure, _)| failure),
    };
    let Some(resend) = unsent.or_else(copy) else {
        return Err(failure);
    };
    // Boxed, as rare: an exchange's future (held by every request in
    // flight) is not twice the size for this second send.
    let sender = Box::pin(pool.fresh_h1()).await?;
    let conn = Conn::H1 { sender, reused: false };
    let again = Box::pin(send(pool, conn, resend));
    after_upload(upload, timeout, again)
        .await
        .map_err(|(failure, _)| failure)
}

/// Runs `send` with `timeout` counted from the end of the upload.
async fn after_upload<T, F>(
    upload: Option<&UploadState>,
    timeout: Duration,
    mut send: Pin<F>,
) -> Result<T, (Failure, Option<Request<UpBody>>)>
where
    F: std::ops::DerefMut<Target: Future<Output = Result<T, (Failure, Option<Request<UpBody>>)>>>,
{
    if let Some(upload) = upload {
        tokio::select! {
            r = send.as_mut() => return r,
            _ = upload.ended() => {}
        }
    }
    tokio::time::timeout(timeout, send)
        .await
        .unwrap_or(Err((Failure::Timeout, None)))
}

/// What one send gives: the answer with what its body must give back, or
/// the failure with the request when it never left.
type Sent = Result<(Response<EndpointBody>, Release), (Failure, Option<Request<UpBody>>)>;

/// Sends `req` on `conn`; the response comes with what its body must give
/// back. A failed request comes back too when hyper never sent it.
//
// An `async move` block: an `async fn` would keep `conn` and `req` twice in
// every request in flight (see `HttpProxy::handle`).
#[allow(clippy::manual_async_fn)]
fn send<'a>(pool: &'a Arc<Pool>, conn: Conn, req: Request<UpBody>) -> impl Future<Output = Sent> + 'a {
    async move {
        match conn {
            Conn::H1 { mut sender, .. } => match sender.try_send_request(req).await {
                Ok(resp) => Ok((resp.map(EndpointBody::H1), Release::H1(pool.clone(), sender))),
                Err(mut e) => match e.take_message() {
                    // Nothing went out: as good as a connect failure.
                    Some(unsent) => Err((Failure::Connect(classify(e.error()).1), Some(unsent))),
                    None => Err((classify(e.error()).0, None)),
                },
            },
            Conn::H2 { sender, slot } => match http2::send(sender, req).await {
                Ok(resp) => Ok((resp.map(EndpointBody::H2), Release::H2(slot))),
                Err(failure) => Err((failure, None)),
            },
        }
    }
}

/// Sorts a hyper client error into a failure (bad response header, or an
/// error after sending), with its text.
pub fn classify(e: &hyper::Error) -> (Failure, String) {
    let text = root_text(e);
    let failure = if let Some(why) = never_processed(e) {
        Failure::Refused(why.into())
    } else if e.is_parse() || e.is_parse_status() {
        Failure::InvalidHeader(e.to_string())
    } else if e.is_incomplete_message() {
        Failure::Error("connection closed before a response".into())
    } else if has_timed_out(e) {
        Failure::Timeout
    } else {
        Failure::Error(text.clone())
    };
    (failure, text)
}

/// Why the endpoint certainly did not process the request, if it did not:
/// h2's `REFUSED_STREAM` ("refused prior to any application processing"),
/// a stream above the last stream id of the endpoint's GOAWAY (RFC 9113
/// 6.8: "not processed"; h2 fails exactly those with a remote GOAWAY error),
/// or hyper giving the request back unsent because its connection closed.
fn never_processed(e: &hyper::Error) -> Option<&'static str> {
    if e.is_canceled() {
        return Some("the connection closed before the request was sent");
    }
    let h2 = source_of::<h2::Error>(e)?;
    if h2.reason() == Some(h2::Reason::REFUSED_STREAM) {
        return Some("the endpoint refused the stream (REFUSED_STREAM)");
    }
    if h2.is_go_away() && h2.is_remote() {
        return Some("the endpoint's GOAWAY came before the stream");
    }
    None
}

fn source_of<'a, T: std::error::Error + 'static>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a T> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(t) = err.downcast_ref::<T>() {
            return Some(t);
        }
        cur = err.source();
    }
    None
}

fn has_timed_out(e: &(dyn std::error::Error + 'static)) -> bool {
    source_of::<io::Error>(e).is_some_and(|io| io.kind() == io::ErrorKind::TimedOut)
}

fn root_text(e: &(dyn std::error::Error + 'static)) -> String {
    if let Some(io) = source_of::<io::Error>(e) {
        return io_text(io);
    }
    let mut cur: &(dyn std::error::Error + 'static) = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}
