//! The fast path's forward phase: the same attempt loop as the hyper path
//! (`proxy::attempt`, so retry rules, budget and passive health are one),
//! each attempt writing the request's bytes on a pooled connection of our
//! own and reading the response head in this task: no dispatch channel, no
//! oneshot, no connection task to wake.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BytesMut};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

use super::head::{Added, Chunked, Framing, Response, parse_response};
use crate::balance::ActiveGuard;
use crate::net::io_text;
use crate::proxy::access::{self, Flags};
use crate::proxy::attempt::RequestFacts;
use crate::proxy::client::conn::ClientIo;
use crate::proxy::http::answer;
use crate::proxy::http::body::ProxyBody;
use crate::proxy::http::relay::Meters;
use crate::proxy::http::route::Routed;
use crate::proxy::retry::Failure;
use crate::proxy::service::{Current, ServiceRuntime};
use crate::proxy::tcp::splice::{self, Cut};
use crate::proxy::upstream::pool::{Pool, RawConn};
use crate::tls::upstream::MaybeTls;

/// Bytes read from an endpoint per read, and the most a response holds
/// between the endpoint and a client that reads slowly.
const READ_SIZE: usize = 16 * 1024;

/// An endpoint's answer, its head already written for the client and its
/// body still on the connection.
pub struct Upstreamed {
    /// The status.
    pub status: u16,
    /// The client's head (with what the route phase adds still to come).
    pub head: Vec<u8>,
    /// How the body ends.
    pub framing: Framing,
    /// Whether the connection goes back to the pool after the body.
    pub reusable: bool,
    /// The connection, its buffer starting at the body.
    pub conn: RawConn,
    /// Its pool.
    pub pool: Arc<Pool>,
    /// Holds the endpoint's active count until the body ends.
    pub guard: ActiveGuard,
}

impl Upstreamed {
    /// A body long enough to be spliced.
    pub fn is_long(&self) -> bool {
        matches!(self.framing, Framing::Length(n) if n >= SPLICE_MIN)
    }
}

/// What the forward phase answers.
pub enum Reply {
    /// The proxy's own answer.
    Local(http::Response<ProxyBody>),
    /// An endpoint's.
    Upstream(Box<Upstreamed>),
}

/// A chunked request body larger than the replay buffer, streamed from
/// the client to the one endpoint it goes to, one read at a time: however
/// small its chunks, a read of them costs one scan and one write (the
/// chunks go on as they came, their framing checked on the way).
pub struct Upload<'a> {
    /// The client.
    pub client: &'a mut ClientIo,
    /// The client's read buffer, starting with body bytes not sent yet.
    pub buf: &'a mut BytesMut,
    /// Where the body is in its framing.
    pub chunked: Chunked,
    /// `timeouts.requestBody`, between reads.
    pub timeout: Duration,
    /// Body bytes sent so far (beyond the first write).
    pub sent: u64,
    /// Why the client's side of the upload failed, if it did.
    pub failed: Option<UploadFailed>,
}

/// How a streamed upload failed on the client's side: its failure, not the endpoint's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UploadFailed {
    /// No bytes for `timeouts.requestBody`.
    TimedOut,
    /// The client closed, or its chunks were malformed.
    Broke,
}

impl Upload<'_> {
    /// Sends the rest of the body to `to`, each write within `timeout`.
    async fn pump(&mut self, to: &mut MaybeTls, timeout: Duration) -> Result<(), Failure> {
        loop {
            if !self.buf.is_empty() {
                let n = match self.chunked.scan(self.buf) {
                    Ok(n) => n,
                    Err(why) => {
                        tracing::debug!(why, "malformed chunked request body");
                        self.failed = Some(UploadFailed::Broke);
                        return Err(Failure::Error(format!("request body: {why}")));
                    }
                };
                match tokio::time::timeout(timeout, to.write_all(&self.buf[..n])).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => return Err(Failure::Error(io_text(&e))),
                    Err(_) => return Err(Failure::Timeout),
                }
                self.buf.advance(n);
                self.sent += n as u64;
            }
            if self.chunked.done() {
                return Ok(());
            }
            self.buf.reserve(READ_SIZE);
            match tokio::time::timeout(self.timeout, self.client.read_buf(self.buf)).await {
                Ok(Ok(n)) if n > 0 => {}
                Ok(_) => {
                    self.failed = Some(UploadFailed::Broke);
                    return Err(Failure::Error("the request body broke off".into()));
                }
                Err(_) => {
                    self.failed = Some(UploadFailed::TimedOut);
                    return Err(Failure::Error("the request body timed out".into()));
                }
            }
        }
    }
}

/// The request as every attempt sends it.
pub struct Wire<'a> {
    /// Head and body, ready to write.
    pub bytes: &'a [u8],
    /// The method, for the retry rules.
    pub method: &'a http::Method,
    /// A HEAD request: its answer has no body.
    pub head_request: bool,
    /// With `debug.endpointHeader`.
    pub endpoint_header: bool,
    /// The route named on the answer (with `debug.endpointHeader`).
    pub route: Option<&'a str>,
    /// The client's connection closes after the answer.
    pub close: bool,
    /// The consistent-hash key, when the algorithm hashes.
    pub key: Option<u64>,
    /// The rest of a body too large to buffer, sent after `bytes`.
    pub upload: Option<Upload<'a>>,
}

/// Runs the attempts of `wire` through `listener`'s pools.
pub async fn forward(
    service: &ServiceRuntime,
    meters: &Meters,
    current: &Current,
    listener: usize,
    wire: &mut Wire<'_>,
    routed: &Routed<'_>,
    mut up: access::Upstream,
) -> (Reply, access::Upstream) {
    let config = &current.config;
    let mut attempts = routed.attempts(service, current, wire.key);
    let method = wire.method.clone();
    let facts = RequestFacts {
        method: Some(&method),
        replayable: wire.upload.is_none(),
        // gRPC takes HTTP/2, which the fast path does not serve.
        grpc: false,
    };
    let mut sent = false;
    let attempt_timeout = routed.retry.attempt_timeout(routed.response_timeout);
    let mut fallback: Option<Box<Upstreamed>> = None;
    while let Some(i) = attempts.next_endpoint() {
        let member = &current.snap.members[i];
        let pool = current.pool(listener, i);
        let guard = ActiveGuard::new(member.endpoint.clone());
        if sent && wire.upload.is_some() {
            // A streamed body went once; it cannot go again.
            break;
        }
        let conn = match pool.checkout_raw().await {
            Ok(c) => c,
            Err(failure) => {
                if attempts.unreached(i, failure, facts) {
                    continue;
                }
                break;
            }
        };
        let started = Instant::now();
        up.endpoint = Some(member.spec.addr);
        let resend = attempts.may_retry_after_send(facts);
        sent = true;
        let outcome = exchange(pool, conn, wire, member.spec.addr, attempt_timeout, resend).await;
        meters.duration.observe(started.elapsed());
        up.attempts = attempts.tries() as u32;
        match outcome {
            Ok((status, head, framing, reusable, conn)) => {
                let answer = Box::new(Upstreamed {
                    status,
                    head,
                    framing,
                    reusable,
                    conn,
                    pool: pool.clone(),
                    guard,
                });
                if !attempts.answered(i, status, None, facts) {
                    if fallback.is_some() || attempts.tries() > 1 && status >= 500 {
                        up.flags.set(Flags::RETRIES_EXHAUSTED);
                    }
                    return (Reply::Upstream(answer), up);
                }
                fallback = Some(answer);
            }
            Err(failure) => {
                drop(guard);
                // The client's upload broke off: its failure, not the endpoint's.
                match wire.upload.as_ref().and_then(|u| u.failed) {
                    Some(UploadFailed::TimedOut) => {
                        meters.body_timeouts.inc();
                        let timeout = config.timeouts.request_body;
                        return (Reply::Local(answer::request_timeout(timeout)), up);
                    }
                    Some(UploadFailed::Broke) => {
                        up.flags.set(Flags::DOWNSTREAM_CLOSED);
                        return (Reply::Local(answer::bad_request("the request body broke off")), up);
                    }
                    None => {}
                }
                if !attempts.failed(i, failure, facts) {
                    break;
                }
            }
        }
    }
    if let Some(answer) = fallback {
        up.flags.set(Flags::RETRIES_EXHAUSTED);
        return (Reply::Upstream(answer), up);
    }
    let end = attempts.exhausted();
    up.attempts = end.tries as u32;
    up.flags.set(end.flags(&current.snap));
    (Reply::Local(answer::exhausted(&end, config.error_detail)), up)
}

type Exchanged = (u16, Vec<u8>, Framing, bool, RawConn);

/// One attempt: the request written on `conn` and the response head read
/// within `timeout`. A reused idle connection the endpoint closed just as we
/// used it is not the endpoint failing: the request goes once more on a
/// fresh connection when nothing was written, or when `resend` (the rules
/// would retry it once sent anyway), as the hyper path does.
async fn exchange(
    pool: &Arc<Pool>,
    conn: RawConn,
    wire: &mut Wire<'_>,
    endpoint: SocketAddr,
    timeout: Duration,
    resend: bool,
) -> Result<Exchanged, Failure> {
    let reused = conn.reused;
    match send(conn, wire, endpoint, timeout).await {
        Ok(answer) => return Ok(answer),
        Err((failure @ Failure::Error(_), unsent)) if reused && (unsent || resend) => {
            tracing::debug!(%endpoint, %failure, "a reused connection failed; once more on a new one");
        }
        Err((failure, _)) => return Err(failure),
    }
    let conn = pool.fresh_raw().await?;
    send(conn, wire, endpoint, timeout)
        .await
        .map_err(|(failure, _)| failure)
}

/// Writes the request (and streams the rest of its body), then reads the
/// final response head, each within `timeout` (the head's counted from the
/// end of the upload, nginx `proxy_read_timeout`). A failure says whether
/// the request certainly never left (its first write failed).
async fn send(
    mut conn: RawConn,
    wire: &mut Wire<'_>,
    endpoint: SocketAddr,
    timeout: Duration,
) -> Result<Exchanged, (Failure, bool)> {
    match tokio::time::timeout(timeout, conn.io.write_all(wire.bytes)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err((Failure::Error(io_text(&e)), true)),
        Err(_) => return Err((Failure::Timeout, false)),
    }
    if let Some(upload) = wire.upload.as_mut() {
        upload.pump(&mut conn.io, timeout).await.map_err(|f| (f, false))?;
    }
    match tokio::time::timeout(timeout, read_head(conn, wire, endpoint)).await {
        Ok(r) => r,
        Err(_) => Err((Failure::Timeout, false)),
    }
}

/// Reads the final response head and writes the client's version of it.
async fn read_head(mut conn: RawConn, wire: &Wire<'_>, endpoint: SocketAddr) -> Result<Exchanged, (Failure, bool)> {
    let endpoint_text = if wire.endpoint_header {
        endpoint.to_string()
    } else {
        String::new()
    };
    let added = Added {
        endpoint: wire.endpoint_header.then_some(endpoint_text.as_str()),
        route: wire.route,
        close: wire.close,
    };
    let mut head = Vec::with_capacity(512);
    conn.buf.clear();
    loop {
        if !conn.buf.is_empty() {
            head.clear();
            match parse_response(&conn.buf, wire.head_request, &added, &mut head) {
                Ok(Response::Final {
                    status,
                    len,
                    framing,
                    reusable,
                }) => {
                    let _ = conn.buf.split_to(len);
                    return Ok((status, head, framing, reusable, conn));
                }
                Ok(Response::Interim(len)) => {
                    let _ = conn.buf.split_to(len);
                    continue;
                }
                Ok(Response::Partial) => {}
                Err(why) => return Err((Failure::InvalidHeader(why), false)),
            }
        }
        conn.buf.reserve(READ_SIZE);
        match conn.io.read_buf(&mut conn.buf).await {
            Ok(0) => return Err((Failure::Error("connection closed before a response".into()), false)),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => return Err((Failure::Timeout, false)),
            Err(e) => return Err((Failure::Error(io_text(&e)), false)),
        }
    }
}

/// How relaying an answer's body ended.
#[derive(Debug, Default)]
pub struct Relayed {
    /// Body bytes written to the client.
    pub bytes: u64,
    /// The client took every byte (its connection can carry on).
    pub client_ok: bool,
}

/// Writes the answer's head and body to `client`, reading the body from the
/// endpoint only as fast as the client takes it (one read of at most
/// [`READ_SIZE`] in hand, or a large body spliced), then gives the
/// connection back when the body ended cleanly.
pub async fn relay(answer: Upstreamed, client: &mut ClientIo) -> Relayed {
    let Upstreamed {
        mut head,
        framing,
        reusable,
        mut conn,
        pool,
        guard,
        ..
    } = answer;
    let mut relayed = Relayed::default();
    let mut chunked = super::head::Chunked::default();
    let mut left = match framing {
        Framing::Length(n) => n,
        _ => 0,
    };
    // The first body bytes ride with the head: one write for a small answer.
    let mut out = std::mem::take(&mut head);
    let mut ended = framing == Framing::None || framing == Framing::Length(0);
    let mut upstream_ok = true;
    let mut at_eof = false;
    loop {
        if !ended && !conn.buf.is_empty() {
            match framing {
                Framing::Length(_) => {
                    let n = (left as usize).min(conn.buf.len());
                    if pass_on(&mut out, &mut conn.buf, n, client).await.is_err() {
                        return relayed;
                    }
                    left -= n as u64;
                    relayed.bytes += n as u64;
                    ended = left == 0;
                }
                Framing::Chunked => match chunked.scan(&conn.buf) {
                    Ok(n) => {
                        if pass_on(&mut out, &mut conn.buf, n, client).await.is_err() {
                            return relayed;
                        }
                        relayed.bytes += n as u64;
                        ended = chunked.done();
                    }
                    Err(why) => {
                        tracing::debug!(endpoint = %pool.target(), why, "bad chunked body from the endpoint");
                        upstream_ok = false;
                    }
                },
                Framing::UntilClose => {
                    let n = conn.buf.len();
                    out.extend_from_slice(format!("{n:x}\r\n").as_bytes());
                    out.extend_from_slice(&conn.buf);
                    out.extend_from_slice(b"\r\n");
                    conn.buf.clear();
                    relayed.bytes += n as u64;
                }
                Framing::None => {}
            }
        }
        if at_eof && framing == Framing::UntilClose {
            out.extend_from_slice(b"0\r\n\r\n");
            ended = true;
        }
        if !out.is_empty() {
            if client.write_all(&out).await.is_err() {
                return relayed;
            }
            out = Vec::new();
        }
        if ended || !upstream_ok {
            break;
        }
        if left >= SPLICE_MIN
            && conn.buf.is_empty()
            && let (MaybeTls::Plain(from), Some((to, stall))) = (&conn.io, client.plain_socket())
        {
            // Not held while the client reads slowly: the pipe holds the body.
            conn.buf = BytesMut::new();
            if let Ok((n, cut)) = splice::forward_exact(from, to, left, stall).await {
                relayed.bytes += n;
                match cut {
                    Ok(()) => ended = true,
                    Err(Cut::From(e)) => {
                        tracing::debug!(endpoint = %pool.target(), error = %e, "the answer's body broke off");
                        upstream_ok = false;
                    }
                    Err(Cut::Stalled) => {
                        client.count_write_timeout();
                        return relayed;
                    }
                    Err(Cut::To(_)) => return relayed,
                }
                break;
            }
        }
        let mut buf = std::mem::take(&mut conn.buf);
        buf.reserve(READ_SIZE);
        let read = conn.io.read_buf(&mut buf).await;
        conn.buf = buf;
        match read {
            Ok(0) if framing == Framing::UntilClose => at_eof = true,
            Ok(0) | Err(_) => {
                upstream_ok = false;
                break;
            }
            Ok(_) => {}
        }
    }
    drop(guard);
    // A body cut short cannot be told to the client in HTTP/1.1 but by
    // closing its connection.
    relayed.client_ok = ended && upstream_ok;
    if relayed.client_ok && reusable {
        pool.release_raw(conn);
    }
    relayed
}

/// A `Content-Length` body with at least this much still to come is spliced
/// (endpoint socket -> pipe -> client socket) when neither side is TLS: one
/// pipe's setup is worth it, and a client that reads slowly holds kernel
/// pipe pages instead of our read buffer.
const SPLICE_MIN: u64 = 64 * 1024;

/// Body bytes up to this many ride in the head's write; more are written
/// from the read buffer itself (no copy, and no second buffer that size
/// held while a client reads slowly).
const COALESCE: usize = 4 * 1024;

/// Passes on the first `n` bytes of `buf`: appended to `out` (the head not
/// written yet) when few, else written after it straight from `buf`.
async fn pass_on<W: tokio::io::AsyncWrite + Unpin>(
    out: &mut Vec<u8>,
    buf: &mut BytesMut,
    n: usize,
    client: &mut W,
) -> std::io::Result<()> {
    if !out.is_empty() && n <= COALESCE {
        out.extend_from_slice(&buf[..n]);
    } else {
        if !out.is_empty() {
            client.write_all(out).await?;
            *out = Vec::new();
        }
        client.write_all(&buf[..n]).await?;
    }
    buf.advance(n);
    Ok(())
}
