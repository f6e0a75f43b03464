//! The fast path's forward phase: the same attempt loop as the hyper path
//! (`proxy::attempt`, so retry rules, budget and passive health are one),
//! each attempt writing the request's bytes on a pooled connection of our
//! own and reading the response head in this task: no dispatch channel, no
//! oneshot, no connection task to wake.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

use super::head::{Added, Framing, Response, parse_response};
use crate::balance::ActiveGuard;
use crate::net::io_text;
use crate::proxy::access::{self, Flags};
use crate::proxy::attempt::RequestFacts;
use crate::proxy::http::answer;
use crate::proxy::http::body::ProxyBody;
use crate::proxy::http::relay::Meters;
use crate::proxy::http::route::Routed;
use crate::proxy::retry::Failure;
use crate::proxy::service::{Current, ServiceRuntime};
use crate::proxy::upstream::pool::{Pool, RawConn};

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

/// What the forward phase answers.
pub enum Reply {
    /// The proxy's own answer.
    Local(http::Response<ProxyBody>),
    /// An endpoint's.
    Upstream(Box<Upstreamed>),
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
}

/// Runs the attempts of `wire` through `listener`'s pools.
pub async fn forward(
    service: &ServiceRuntime,
    meters: &Meters,
    current: &Current,
    listener: usize,
    wire: &Wire<'_>,
    routed: &Routed<'_>,
    key: Option<u64>,
    mut up: access::Upstream,
) -> (Reply, access::Upstream) {
    let config = &current.config;
    let mut attempts = routed.attempts(service, current, key);
    let facts = RequestFacts {
        method: Some(wire.method),
        replayable: true,
    };
    let attempt_timeout = routed.retry.attempt_timeout(routed.response_timeout);
    let mut fallback: Option<Box<Upstreamed>> = None;
    while let Some(i) = attempts.next_endpoint() {
        let member = &current.snap.members[i];
        let pool = current.pool(listener, i);
        let guard = ActiveGuard::new(member.endpoint.clone());
        let conn = match pool.checkout_raw().await {
            Ok(c) => c,
            Err(failure) => {
                if attempts.failed(i, failure, facts) {
                    continue;
                }
                break;
            }
        };
        let started = Instant::now();
        up.endpoint = Some(member.spec.addr);
        let resend = attempts.may_retry_after_send(facts);
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
                if !attempts.answered(i, status, facts) {
                    if fallback.is_some() || attempts.tries() > 1 && status >= 500 {
                        up.flags.set(Flags::RETRIES_EXHAUSTED);
                    }
                    return (Reply::Upstream(answer), up);
                }
                fallback = Some(answer);
            }
            Err(failure) => {
                drop(guard);
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
    wire: &Wire<'_>,
    endpoint: SocketAddr,
    timeout: Duration,
    resend: bool,
) -> Result<Exchanged, Failure> {
    let reused = conn.reused;
    let first = tokio::time::timeout(timeout, send(conn, wire, endpoint)).await;
    match first {
        Err(_) => return Err(Failure::Timeout),
        Ok(Ok(answer)) => return Ok(answer),
        Ok(Err((failure @ Failure::Error(_), unsent))) if reused && (unsent || resend) => {
            tracing::debug!(%endpoint, %failure, "a reused connection failed; once more on a new one");
        }
        Ok(Err((failure, _))) => return Err(failure),
    }
    let started = Instant::now();
    let conn = pool.fresh_raw().await?;
    let left = timeout.saturating_sub(started.elapsed());
    match tokio::time::timeout(left, send(conn, wire, endpoint)).await {
        Err(_) => Err(Failure::Timeout),
        Ok(r) => r.map_err(|(failure, _)| failure),
    }
}

/// Writes the request and reads the final response head. A failure says
/// whether the request certainly never left (its write failed).
async fn send(mut conn: RawConn, wire: &Wire<'_>, endpoint: SocketAddr) -> Result<Exchanged, (Failure, bool)> {
    if let Err(e) = conn.io.write_all(wire.bytes).await {
        return Err((Failure::Error(io_text(&e)), true));
    }
    let endpoint_text = endpoint.to_string();
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
/// [`READ_SIZE`] in hand), then gives the connection back when the body
/// ended cleanly.
pub async fn relay<W: tokio::io::AsyncWrite + Unpin>(answer: Upstreamed, client: &mut W) -> Relayed {
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
                    out.extend_from_slice(&conn.buf[..n]);
                    let _ = conn.buf.split_to(n);
                    left -= n as u64;
                    relayed.bytes += n as u64;
                    ended = left == 0;
                }
                Framing::Chunked => match chunked.scan(&conn.buf) {
                    Ok(n) => {
                        out.extend_from_slice(&conn.buf[..n]);
                        let _ = conn.buf.split_to(n);
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
            out.clear();
        }
        if ended || !upstream_ok {
            break;
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
