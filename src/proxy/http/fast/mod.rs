//! The HTTP/1.1 fast path: for the common request (keep-alive HTTP/1.1, no
//! body or a `Content-Length` one that fits the replay buffer, no upgrade,
//! an HTTP/1.1 endpoint, no hedging), one loop per client connection reads
//! the head with httparse into reused buffers, runs the same phases as the
//! hyper path (admission, checks, route, forwarding headers, the attempt
//! loop), writes the request on a pooled connection of its own and relays
//! the answer, all in the connection's task, as pingora's HTTP/1 session
//! does. A request the fast path does not take hands the connection, with
//! the bytes already read, to hyper for the rest of its life, so whatever
//! hyper refused or handled before it still refuses and handles the same.
//!
//! `BALANCED_HTTP1=hyper` turns the fast path off (every HTTP/1.1 request on
//! hyper); `balanced_http1_requests_total{path}` says which path served what.

pub mod forward;
pub mod head;

use std::sync::OnceLock;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderName, HeaderValue};
use http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use self::forward::{Reply, Upload, Wire};
use self::head::{Chunked, Parsed, parse_request, write_date, write_headers, write_request};
use super::headers::upstream_protocol;
use super::{Answer, HttpProxy, Logged, ROUTE_HEADER, answer, check, route, shape_head};
use crate::proxy::access::{self, Flags};
use crate::proxy::client::Downstream;
use crate::proxy::client::conn::ClientIo;
use crate::proxy::service::Current;
use crate::proxy::upstream::pool::Protocol;

/// Whether the fast path is on: unless `BALANCED_HTTP1=hyper` (the switch
/// back, should the fast path ever misbehave where hyper does not).
pub fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("BALANCED_HTTP1").map_or(true, |v| v != "hyper"))
}

/// How the fast path left a connection.
pub enum Served {
    /// Closed (or the client left).
    Closed,
    /// A request it does not take: hyper goes on from these bytes.
    Hyper(Bytes),
}

/// Serves `io` until it closes or a request needs hyper. `max_head`:
/// `limits.maxRequestHeadersBytes` (a longer head goes to hyper, which
/// answers 431).
pub async fn serve(io: &mut ClientIo, proxy: &HttpProxy, client: &Downstream, max_head: usize) -> Served {
    let state = &client.conn;
    let mut buf = BytesMut::with_capacity(4096);
    let mut out = Vec::with_capacity(1024);
    loop {
        let current = proxy.service.current();
        let config = &current.config;
        let parsed = loop {
            if !buf.is_empty() {
                match parse_request(&buf, config.retry.max_body_bytes) {
                    Parsed::Partial if buf.len() < max_head => {}
                    Parsed::Partial | Parsed::Hyper => return Served::Hyper(buf.freeze()),
                    fast @ Parsed::Fast { .. } => break fast,
                }
            } else if state.is_closing() {
                return Served::Closed;
            }
            buf.reserve(4096);
            let read = if buf.is_empty() {
                // Between requests the connection may be asked to close
                // (shutdown, eviction): it is idle, so it just closes.
                tokio::select! {
                    r = io.read_buf(&mut buf) => r,
                    _ = state.close_asked() => return Served::Closed,
                }
            } else {
                io.read_buf(&mut buf).await
            };
            if !matches!(read, Ok(n) if n > 0) {
                return Served::Closed;
            }
        };
        let Parsed::Fast {
            req,
            len,
            body,
            chunked,
        } = parsed
        else {
            return Served::Closed;
        };
        if !takes(&current, proxy, &req, chunked) {
            return Served::Hyper(buf.freeze());
        }
        buf.advance(len);
        let flight = state.begin();
        let timeout = config.timeouts.request_body;
        let read = if chunked {
            read_chunked(io, &mut buf, config.retry.max_body_bytes, timeout).await
        } else {
            read_body(io, &mut buf, body, timeout).await.map(Body::Whole)
        };
        let body = match read {
            Ok(b) => b,
            Err(failed) => {
                let answer = match failed {
                    BodyError::TimedOut => {
                        proxy.meters.body_timeouts.inc();
                        answer::request_timeout(timeout)
                    }
                    BodyError::Closed => {
                        answer::bad_request("cannot read request body: the client closed the connection")
                    }
                    BodyError::Malformed(why) => answer::bad_request(&format!("cannot read request body: {why}")),
                };
                let _ = write_local(answer, false, true, io, &mut out).await;
                drop(flight);
                return Served::Closed;
            }
        };
        drop(current);
        proxy.paths[0].inc();
        let logged = proxy.access_log.as_ref().map(|_| Logged::of(&req));
        let close = wants_close(&req) || state.is_closing();
        let streaming = matches!(body, Body::Streaming(..));
        let (answer, pass) = match proxy.admit(&req, client).await {
            Ok((current, pass)) => {
                let client_side = (&mut *io, &mut buf);
                (proxy.fast(req, body, client, &current, close, client_side).await, pass)
            }
            Err(refused) => (Fast::from(refused), None),
        };
        // A streamed body not read to its end leaves the connection
        // mid-request: it cannot carry another.
        let close = close || (streaming && !answer.upload_done);
        let status = answer.status();
        proxy.downstream[usize::from(status / 100).clamp(1, 5) - 1].inc();
        let head_request = answer.head_request;
        let (bytes_out, ok) = match answer.reply {
            Reply::Local(resp) => write_local(resp, head_request, close, io, &mut out).await,
            Reply::Upstream(up) => {
                if buf.is_empty() && up.is_long() {
                    // Not held for as long as a slow client takes to read it.
                    buf = BytesMut::new();
                }
                let relayed = forward::relay(*up, io).await;
                (relayed.bytes, relayed.client_ok)
            }
        };
        drop(pass);
        drop(flight);
        if let (Some(logged), Some(log)) = (logged, &proxy.access_log) {
            let mut upstream = answer.upstream;
            if !ok {
                upstream.flags.set(Flags::DOWNSTREAM_CLOSED);
            }
            let started = logged.started;
            let mut entry = logged.entry(proxy, client, status, upstream);
            entry.bytes_out = bytes_out;
            entry.duration = started.elapsed();
            log.send(entry);
        }
        if !ok || close {
            let _ = io.shutdown().await;
            return Served::Closed;
        }
    }
}

/// Whether the fast path takes this request under this config: its
/// endpoints speak HTTP/1.1, no retry policy hedges (a hedge races two
/// attempts, which the hyper path does), and a chunked body meets no route
/// that matches on bodies (the hyper path decodes it for them).
fn takes(current: &Current, proxy: &HttpProxy, req: &Request<()>, chunked: bool) -> bool {
    let config = &current.config;
    let Some(listener) = current.listener(&proxy.listener) else {
        return false;
    };
    let reads_bodies = || {
        config
            .routes
            .iter()
            .any(|r| r.matches.iter().any(|m| !m.body.is_empty()))
    };
    upstream_protocol(config.listeners[listener].app_protocol, req.headers()) == Protocol::Http1
        && !config.retry.hedge
        && !config.routes.iter().any(|r| r.retry.hedge)
        && (!chunked || !reads_bodies())
}

/// A request body as the fast path holds it.
enum Body {
    /// A `Content-Length` body, whole.
    Whole(Bytes),
    /// A chunked body, whole, its framing kept (it goes on as it came).
    Chunked(Bytes),
    /// The start of a chunked body larger than `retry.maxBodyBytes`: the
    /// rest is streamed to the one endpoint it goes to.
    Streaming(Bytes, Chunked),
}

/// Why a request body could not be read.
enum BodyError {
    TimedOut,
    Closed,
    Malformed(&'static str),
}

/// Reads a chunked body whole when it ends within `limit` bytes, else its
/// first `limit` bytes and where its framing stands; each read within `timeout`.
async fn read_chunked(
    io: &mut ClientIo,
    buf: &mut BytesMut,
    limit: u64,
    timeout: std::time::Duration,
) -> Result<Body, BodyError> {
    let mut chunked = Chunked::default();
    let mut scanned = 0;
    loop {
        scanned += chunked.scan(&buf[scanned..]).map_err(BodyError::Malformed)?;
        if chunked.done() {
            return Ok(Body::Chunked(buf.split_to(scanned).freeze()));
        }
        if scanned as u64 > limit {
            return Ok(Body::Streaming(buf.split_to(scanned).freeze(), chunked));
        }
        buf.reserve(16 * 1024);
        match tokio::time::timeout(timeout, io.read_buf(buf)).await {
            Err(_) => return Err(BodyError::TimedOut),
            Ok(Ok(n)) if n > 0 => {}
            Ok(_) => return Err(BodyError::Closed),
        }
    }
}

/// `Connection: close` from the client.
fn wants_close(req: &Request<()>) -> bool {
    req.headers().get_all(header::CONNECTION).iter().any(|v| {
        v.as_bytes()
            .split(|&b| b == b',')
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"))
    })
}

/// Reads a `len`-byte body, part of it perhaps in `buf` already, each read
/// within `timeout`.
async fn read_body(
    io: &mut ClientIo,
    buf: &mut BytesMut,
    len: u64,
    timeout: std::time::Duration,
) -> Result<Bytes, BodyError> {
    let len = len as usize;
    while buf.len() < len {
        buf.reserve(len - buf.len());
        match tokio::time::timeout(timeout, io.read_buf(buf)).await {
            Err(_) => return Err(BodyError::TimedOut),
            Ok(Ok(n)) if n > 0 => {}
            Ok(_) => return Err(BodyError::Closed),
        }
    }
    Ok(buf.split_to(len).freeze())
}

/// Writes one of the proxy's own answers (their bodies are whole in memory).
async fn write_local(
    resp: http::Response<super::body::ProxyBody>,
    head_request: bool,
    close: bool,
    io: &mut ClientIo,
    out: &mut Vec<u8>,
) -> (u64, bool) {
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.map(|c| c.to_bytes()).unwrap_or_default();
    out.clear();
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(parts.status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(parts.status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    write_headers(&parts.headers, out);
    if !parts.headers.contains_key(header::CONTENT_LENGTH) {
        out.extend_from_slice(format!("content-length: {}\r\n", body.len()).as_bytes());
    }
    if !parts.headers.contains_key(header::DATE) {
        write_date(out);
    }
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    let sent = if head_request { 0 } else { body.len() };
    out.extend_from_slice(&body[..sent]);
    let ok = io.write_all(out).await.is_ok();
    (sent as u64, ok)
}

/// The fast path's answer: what the phases decided, and whether the
/// request was HEAD.
struct Fast {
    reply: Reply,
    upstream: access::Upstream,
    head_request: bool,
    // A streamed body was read to its end.
    upload_done: bool,
}

impl Fast {
    fn status(&self) -> u16 {
        match &self.reply {
            Reply::Local(r) => r.status().as_u16(),
            Reply::Upstream(u) => u.status,
        }
    }
}

impl From<Answer> for Fast {
    fn from(a: Answer) -> Self {
        Self {
            reply: Reply::Local(a.response),
            upstream: a.upstream,
            head_request: false,
            upload_done: false,
        }
    }
}

impl HttpProxy {
    /// Phases 2 to 5 of the fast path, the hyper path's `proxy` and
    /// `request` with the body already read and the forward phase our own.
    async fn fast(
        &self,
        req: Request<()>,
        body: Body,
        client: &Downstream,
        current: &Current,
        close: bool,
        (io, buf): (&mut ClientIo, &mut BytesMut),
    ) -> Fast {
        let head_request = req.method() == Method::HEAD;
        let local = |response| Fast {
            reply: Reply::Local(response),
            upstream: access::Upstream::default(),
            head_request,
            upload_done: false,
        };
        let Some(listener) = current.listener(&self.listener) else {
            return local(answer::plain(StatusCode::SERVICE_UNAVAILABLE, "listener removed\n"));
        };
        let config = &current.config;
        if let Some(refused) = check(&req, &config.limits) {
            return local(refused);
        }
        let whole = match &body {
            Body::Whole(b) => Some(b),
            _ => None,
        };
        let routed = match route::route(current, req.method(), req.uri(), req.headers(), whole, client.peer).await {
            Ok(routed) => routed,
            Err(limited) => {
                current.count_route(limited.route, 429);
                let mut response = limited.response;
                self.name_route(config, limited.route, &mut response);
                let mut answer = local(response);
                answer.upstream.flags.set(Flags::RATE_LIMITED);
                return answer;
            }
        };
        let (mut parts, ()) = req.into_parts();
        let key = shape_head(&mut parts, client, config, listener, Protocol::Http1);
        let (first, rest) = match body {
            Body::Whole(b) => (b, None),
            Body::Chunked(b) => (b, Some(None)),
            Body::Streaming(b, chunked) => (b, Some(Some(chunked))),
        };
        if rest.is_some() {
            parts
                .headers
                .insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        }
        let mut bytes = Vec::with_capacity(256 + first.len());
        write_request(&parts, &mut bytes);
        bytes.extend_from_slice(&first);
        let upload = rest.flatten().map(|chunked| Upload {
            client: io,
            buf,
            chunked,
            timeout: config.timeouts.request_body,
            sent: 0,
            failed: None,
        });
        let route_name = routed
            .route
            .filter(|_| config.endpoint_header)
            .map(|r| config.routes[r].name.as_str());
        let mut wire = Wire {
            bytes: &bytes,
            method: &parts.method,
            head_request,
            endpoint_header: config.endpoint_header,
            route: route_name,
            close,
            key,
            upload,
        };
        let up = access::Upstream {
            bytes_in: first.len() as u64,
            ..Default::default()
        };
        let (mut reply, mut upstream) =
            forward::forward(&self.service, &self.meters, current, listener, &mut wire, &routed, up).await;
        let upload_done = wire.upload.as_ref().is_none_or(|u| u.chunked.done());
        if let Some(u) = &wire.upload {
            upstream.bytes_in += u.sent;
        }
        if let Some(r) = routed.route {
            let status = match &reply {
                Reply::Local(resp) => resp.status().as_u16(),
                Reply::Upstream(u) => u.status,
            };
            current.count_route(r, status);
            if let Reply::Local(resp) = &mut reply {
                self.name_route(config, r, resp);
            }
        }
        Fast {
            reply,
            upstream,
            head_request,
            upload_done,
        }
    }

    /// With `debug.endpointHeader`, names route `r` on one of the proxy's own answers.
    fn name_route(
        &self,
        config: &crate::api::config::Config,
        r: usize,
        resp: &mut http::Response<super::body::ProxyBody>,
    ) {
        if config.endpoint_header
            && let Ok(v) = HeaderValue::from_str(&config.routes[r].name)
        {
            resp.headers_mut().insert(HeaderName::from_static(ROUTE_HEADER), v);
        }
    }
}
