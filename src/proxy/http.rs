//! The HTTP listener's request path: framing checks, forwarding headers, the
//! retry loop over endpoints, upgrades (WebSocket) as tunnels, and the proxy's
//! own error answers.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

use super::body::{ProxyBody, RequestBody, Tracked, full};
use super::retry::{Attempted, Failure, NoRetry, decide};
use super::service::{ActiveGuard, ServiceRuntime};
use crate::api::config::{Algorithm, Config, HashKey, ListenerConfig};
use crate::balance::{Tried, now_ms, picker};
use crate::health::probe::io_text;
use crate::metrics::{DownstreamLabels, ServiceLabels};

/// Response header naming the endpoint that answered (behind `spec.debug.endpointHeader`).
pub const ENDPOINT_HEADER: &str = "x-balanced-endpoint";

/// Serves one HTTP listener of one service.
pub struct HttpProxy {
    service: Arc<ServiceRuntime>,
    listener: String,
    // Resolved once: label lookups cost more than the rest of the metrics work.
    downstream: [prometheus_client::metrics::counter::Counter; 5],
    duration: prometheus_client::metrics::histogram::Histogram,
}

impl HttpProxy {
    /// The proxy for listener `listener` (by name) of `service`.
    pub fn new(service: Arc<ServiceRuntime>, listener: &str) -> Self {
        let metrics = service.metrics();
        let downstream = ["1xx", "2xx", "3xx", "4xx", "5xx"].map(|code| {
            metrics
                .downstream
                .get_or_create(&DownstreamLabels {
                    service: service.label().to_string(),
                    listener: listener.to_string(),
                    code,
                })
                .clone()
        });
        let duration = metrics
            .duration
            .get_or_create(&ServiceLabels {
                service: service.label().to_string(),
            })
            .clone();
        Self {
            service,
            listener: listener.to_string(),
            downstream,
            duration,
        }
    }

    /// Answers one client request.
    pub async fn handle(&self, req: Request<Incoming>, peer: SocketAddr) -> Response<ProxyBody> {
        let config = self.service.config();
        let Some(listener) = config.listeners.iter().find(|l| l.name == self.listener) else {
            return plain(StatusCode::SERVICE_UNAVAILABLE, "listener removed\n");
        };
        let response = self.forward(req, peer, &config, listener).await;
        self.downstream[usize::from(response.status().as_u16() / 100).clamp(1, 5) - 1].inc();
        response
    }

    async fn forward(
        &self,
        req: Request<Incoming>,
        peer: SocketAddr,
        config: &Config,
        listener: &ListenerConfig,
    ) -> Response<ProxyBody> {
        if let Err(why) = check_framing(req.headers()) {
            return plain(StatusCode::BAD_REQUEST, why);
        }
        let _request_slot = self.service.budget.request();
        if is_upgrade(&req) {
            return self.tunnel(req, peer, config, listener).await;
        }
        let (mut parts, body) = req.into_parts();
        let key = hash_key(config, &parts.headers, peer);
        let downstream_h2 = parts.version == Version::HTTP_2;
        if downstream_h2 && !parts.headers.contains_key(header::HOST) {
            // HTTP/1.1 upstreams need Host; an h2 client sent :authority.
            if let Some(v) = parts
                .uri
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
            {
                parts.headers.insert(header::HOST, v);
            }
        }
        strip_hop_by_hop(&mut parts.headers, true);
        add_forwarding(&mut parts.headers, peer);
        let path = origin_form(&parts.uri);
        let mut body = match RequestBody::read(body, config.retry.max_body_bytes).await {
            Ok(b) => b,
            Err(e) => return plain(StatusCode::BAD_REQUEST, format!("cannot read request body: {e}\n")),
        };

        let snap = self.service.balancer.snapshot();
        let clients = self.service.clients();
        let client = if downstream_h2 { &clients.http2 } else { &clients.http1 };
        let started = Instant::now();
        let mut tried = Tried::default();
        let mut _retry_slot = None;
        let mut errors: Vec<(SocketAddr, String)> = Vec::new();
        let mut last_failure: Option<Failure> = None;
        while let Some(i) = self.service.balancer.pick(&snap, &tried, key, now_ms()) {
            tried.add(i);
            let member = &snap.members[i];
            let Some(attempt_body) = body.take() else {
                break;
            };
            let target = ServiceRuntime::target(member, listener);
            let mut up = Request::new(attempt_body);
            *up.method_mut() = parts.method.clone();
            *up.headers_mut() = parts.headers.clone();
            *up.uri_mut() = match Uri::try_from(format!("http://{target}{path}")) {
                Ok(u) => u,
                Err(_) => return plain(StatusCode::BAD_REQUEST, "invalid request target\n"),
            };
            *up.version_mut() = if downstream_h2 {
                Version::HTTP_2
            } else {
                Version::HTTP_11
            };

            let guard = ActiveGuard::new(member.endpoint.clone());
            let attempt_started = Instant::now();
            let result = tokio::time::timeout(config.timeouts.response, client.request(up)).await;
            self.duration.observe(attempt_started.elapsed().as_secs_f64());

            let (failure, response) = match result {
                Ok(Ok(resp)) => {
                    let status = resp.status().as_u16();
                    member.endpoint.stats.record_status(status);
                    let failure = Failure::Status(status);
                    let retryable = failure.condition().is_some_and(|c| config.retry.retries_on(c));
                    if !retryable {
                        if !failure.counts_for_passive(&config.passive) {
                            member.endpoint.passive.record_success();
                        } else {
                            self.service.record_failure(config, member, &failure);
                        }
                        return respond(resp, guard, member.spec.addr, config);
                    }
                    (failure, Some((resp, guard)))
                }
                Ok(Err(e)) => {
                    let failure = classify(&e);
                    member.endpoint.stats.record_failure(failure == Failure::Timeout);
                    (failure, None)
                }
                Err(_) => {
                    member.endpoint.stats.record_failure(true);
                    (Failure::Timeout, None)
                }
            };
            self.service.record_failure(config, member, &failure);
            errors.push((member.spec.addr, failure_text(&failure)));

            let decision = decide(
                &config.retry,
                &Attempted {
                    failure: &failure,
                    method: &parts.method,
                    replayable: body.replayable(),
                    attempts: tried.len() as u32,
                    endpoints: snap.members.len() as u32,
                    elapsed: started.elapsed(),
                },
            );
            let retry = decision.and_then(|condition| match self.service.budget.try_retry() {
                Some(slot) => {
                    _retry_slot = Some(slot);
                    Ok(condition)
                }
                None => Err(NoRetry::TriesExhausted),
            });
            match retry {
                Ok(condition) => {
                    self.service.record_retry(condition_name(condition));
                    tracing::debug!(service = %self.service.key, endpoint = %member.spec.addr, reason = condition_name(condition), "retrying on another endpoint");
                    last_failure = Some(failure);
                }
                Err(_) => {
                    // A real upstream answer (say a 503) beats a proxy-made one.
                    if let Some((resp, guard)) = response {
                        return respond(resp, guard, member.spec.addr, config);
                    }
                    last_failure = Some(failure);
                    break;
                }
            }
        }
        error_response(last_failure.as_ref(), tried.len(), &errors, config.error_detail)
    }

    /// Forwards an Upgrade request (WebSocket and friends) and, on 101, joins
    /// the two upgraded connections byte for byte.
    async fn tunnel(
        &self,
        mut req: Request<Incoming>,
        peer: SocketAddr,
        config: &Config,
        listener: &ListenerConfig,
    ) -> Response<ProxyBody> {
        let client_upgrade = hyper::upgrade::on(&mut req);
        let snap = self.service.balancer.snapshot();
        let key = hash_key(config, req.headers(), peer);
        let (stream, guard, addr) = match self.service.connect(&snap, listener, key).await {
            Ok(c) => c,
            Err(e) => {
                let errors: Vec<_> = e.last.iter().map(|(a, f)| (*a, failure_text(f))).collect();
                let last = e.last.as_ref().map(|(_, f)| f);
                return error_response(last, errors.len(), &errors, config.error_detail);
            }
        };
        let (mut parts, body) = req.into_parts();
        strip_hop_by_hop(&mut parts.headers, false);
        add_forwarding(&mut parts.headers, peer);
        let path = origin_form(&parts.uri);
        parts.uri = match path.parse() {
            Ok(u) => u,
            Err(_) => return plain(StatusCode::BAD_REQUEST, "invalid request target\n"),
        };
        parts.version = Version::HTTP_11;
        let up = Request::from_parts(parts, super::body::incoming(body));
        let (mut sender, conn) = match hyper::client::conn::http1::handshake(TokioIo::new(stream)).await {
            Ok(pair) => pair,
            Err(e) => return plain(StatusCode::BAD_GATEWAY, format!("upgrade handshake failed: {e}\n")),
        };
        tokio::spawn(conn.with_upgrades());
        let mut resp = match tokio::time::timeout(config.timeouts.response, sender.send_request(up)).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                return error_response(
                    Some(&classify_hyper(&e)),
                    1,
                    &[(addr, e.to_string())],
                    config.error_detail,
                );
            }
            Err(_) => return error_response(Some(&Failure::Timeout), 1, &[], config.error_detail),
        };
        if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
            return respond(resp, guard, addr, config);
        }
        let upstream_upgrade = hyper::upgrade::on(&mut resp);
        tokio::spawn(async move {
            let _guard = guard;
            if let (Ok(client), Ok(upstream)) = tokio::join!(client_upgrade, upstream_upgrade) {
                let mut client = TokioIo::new(client);
                let mut upstream = TokioIo::new(upstream);
                let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
            }
        });
        let (parts, _) = resp.into_parts();
        Response::from_parts(parts, super::body::empty())
    }
}

fn respond(resp: Response<Incoming>, guard: ActiveGuard, endpoint: SocketAddr, config: &Config) -> Response<ProxyBody> {
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers, true);
    if config.endpoint_header
        && let Ok(v) = HeaderValue::from_str(&endpoint.to_string())
    {
        parts.headers.insert(HeaderName::from_static(ENDPOINT_HEADER), v);
    }
    let body = Tracked::new(super::body::incoming(body), guard);
    Response::from_parts(parts, body.boxed())
}

fn error_response(
    last: Option<&Failure>,
    tries: usize,
    errors: &[(SocketAddr, String)],
    detail: bool,
) -> Response<ProxyBody> {
    let (status, text) = match last {
        None => (StatusCode::SERVICE_UNAVAILABLE, "no endpoint available".to_string()),
        Some(Failure::Timeout) => (
            StatusCode::GATEWAY_TIMEOUT,
            format!("upstream timed out ({tries} {})", tries_word(tries)),
        ),
        Some(f) => (
            StatusCode::BAD_GATEWAY,
            format!(
                "no endpoint answered ({tries} {}; last: {})",
                tries_word(tries),
                failure_text(f)
            ),
        ),
    };
    let mut body = format!(
        "{} {}: {text}\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or("")
    );
    if detail {
        for (addr, e) in errors {
            body.push_str(&format!("  {addr}: {e}\n"));
        }
    }
    plain(status, body)
}

fn tries_word(n: usize) -> &'static str {
    if n == 1 { "try" } else { "tries" }
}

fn failure_text(f: &Failure) -> String {
    match f {
        Failure::Connect(e) => format!("connect: {e}"),
        Failure::Timeout => "timeout".into(),
        Failure::Error(e) => e.clone(),
        Failure::InvalidHeader(e) => format!("invalid response header: {e}"),
        Failure::Status(s) => format!("status {s}"),
    }
}

fn plain(status: StatusCode, body: impl Into<Bytes>) -> Response<ProxyBody> {
    let mut resp = Response::new(full(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// The `retry.on` name of a condition, for metrics and logs.
pub fn condition_name(c: crate::api::config::RetryCondition) -> &'static str {
    use crate::api::config::RetryCondition::*;
    match c {
        Error => "Error",
        Timeout => "Timeout",
        InvalidHeader => "InvalidHeader",
        Http500 => "Http500",
        Http502 => "Http502",
        Http503 => "Http503",
        Http504 => "Http504",
        Http403 => "Http403",
        Http404 => "Http404",
        Http429 => "Http429",
        NonIdempotent => "NonIdempotent",
    }
}

/// Sorts a client error into connect failure (nothing sent), timeout, bad
/// response header, or an error after sending.
fn classify(e: &hyper_util::client::legacy::Error) -> Failure {
    if has_timed_out(e) {
        return Failure::Timeout;
    }
    if e.is_connect() {
        return Failure::Connect(root_text(e));
    }
    match source_of::<hyper::Error>(e) {
        Some(h) => classify_hyper(h),
        None => Failure::Error(root_text(e)),
    }
}

fn classify_hyper(e: &hyper::Error) -> Failure {
    if e.is_parse() || e.is_parse_status() {
        Failure::InvalidHeader(e.to_string())
    } else if e.is_incomplete_message() {
        Failure::Error("connection closed before a response".into())
    } else {
        Failure::Error(root_text(e))
    }
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

/// Rejects framing that proxies and backends could read differently (request
/// smuggling): Content-Length with Transfer-Encoding, repeated or non-chunked
/// Transfer-Encoding, disagreeing Content-Lengths.
pub fn check_framing(headers: &HeaderMap) -> Result<(), &'static str> {
    let te: Vec<&HeaderValue> = headers.get_all(header::TRANSFER_ENCODING).iter().collect();
    let cl: Vec<&HeaderValue> = headers.get_all(header::CONTENT_LENGTH).iter().collect();
    if !te.is_empty() && !cl.is_empty() {
        return Err("Content-Length with Transfer-Encoding\n");
    }
    if te.len() > 1 {
        return Err("repeated Transfer-Encoding\n");
    }
    if let Some(v) = te.first()
        && !v.as_bytes().eq_ignore_ascii_case(b"chunked")
    {
        return Err("unsupported Transfer-Encoding\n");
    }
    if cl.len() > 1 && cl.windows(2).any(|w| w[0] != w[1]) {
        return Err("conflicting Content-Length\n");
    }
    Ok(())
}

/// Path and query of a request target (`/` when absent).
fn origin_form(uri: &Uri) -> String {
    uri.path_and_query()
        .map_or_else(|| "/".to_string(), |p| p.as_str().to_string())
}

fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && connection_has(req.headers(), "upgrade")
}

fn connection_has(headers: &HeaderMap, token: &str) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Removes hop-by-hop headers (RFC 9110 7.6.1) and those `Connection` names.
/// Upgrades keep `Connection: upgrade` and `Upgrade`, and `TE: trailers` is
/// kept because gRPC requires it end to end.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, strip_upgrade: bool) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .filter(|n| strip_upgrade || *n != header::UPGRADE)
        .collect();
    for name in named {
        headers.remove(name);
    }
    let trailers = headers.get_all(header::TE).iter().any(|v| {
        v.to_str()
            .is_ok_and(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case("trailers")))
    });
    for name in [
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::PROXY_AUTHENTICATE,
        header::PROXY_AUTHORIZATION,
    ] {
        headers.remove(name);
    }
    headers.remove("keep-alive");
    headers.remove("proxy-connection");
    if strip_upgrade {
        headers.remove(header::CONNECTION);
        headers.remove(header::UPGRADE);
    } else {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    if trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// Appends the client to `X-Forwarded-For` and `Forwarded`, and sets
/// `X-Forwarded-Proto` unless an outer proxy already did.
pub fn add_forwarding(headers: &mut HeaderMap, peer: SocketAddr) {
    let ip = peer.ip().to_string();
    let xff = match headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        Some(prior) => format!("{prior}, {ip}"),
        None => ip.clone(),
    };
    if let Ok(v) = HeaderValue::from_str(&xff) {
        headers.insert("x-forwarded-for", v);
    }
    if !headers.contains_key("x-forwarded-proto") {
        headers.insert("x-forwarded-proto", HeaderValue::from_static("http"));
    }
    let node = if peer.is_ipv6() { format!("\"[{ip}]\"") } else { ip };
    let element = format!("for={node};proto=http");
    let forwarded = match headers.get(header::FORWARDED).and_then(|v| v.to_str().ok()) {
        Some(prior) => format!("{prior}, {element}"),
        None => element,
    };
    if let Ok(v) = HeaderValue::from_str(&forwarded) {
        headers.insert(header::FORWARDED, v);
    }
}

/// The request's consistent-hash key; a missing header or cookie falls back
/// to the client IP, so the request still sticks to something.
fn hash_key(config: &Config, headers: &HeaderMap, peer: SocketAddr) -> Option<u64> {
    let Algorithm::ConsistentHash(key) = &config.algorithm else {
        return None;
    };
    let value: Option<Vec<u8>> = match key {
        HashKey::SourceIp => None,
        HashKey::Header(name) => headers.get(name).map(|v| v.as_bytes().to_vec()),
        HashKey::Cookie(name) => cookie(headers, name).map(|v| v.as_bytes().to_vec()),
    };
    Some(match value {
        Some(v) => picker::hash_key(&v),
        None => picker::hash_key(&super::service::ip_bytes(peer)),
    })
}

fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn ambiguous_framing_is_rejected() {
        assert!(check_framing(&headers(&[("content-length", "5"), ("transfer-encoding", "chunked")])).is_err());
        assert!(
            check_framing(&headers(&[
                ("transfer-encoding", "chunked"),
                ("transfer-encoding", "chunked")
            ]))
            .is_err()
        );
        assert!(check_framing(&headers(&[("transfer-encoding", "gzip")])).is_err());
        assert!(check_framing(&headers(&[("content-length", "5"), ("content-length", "6")])).is_err());
        assert!(check_framing(&headers(&[("content-length", "5")])).is_ok());
        assert!(check_framing(&headers(&[("transfer-encoding", "chunked")])).is_ok());
    }

    #[test]
    fn hop_by_hop_headers_go_but_te_trailers_stays() {
        let mut h = headers(&[
            ("connection", "keep-alive, x-private"),
            ("keep-alive", "timeout=5"),
            ("x-private", "1"),
            ("te", "trailers"),
            ("proxy-authorization", "secret"),
            ("x-kept", "yes"),
        ]);
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h.len(), 2, "{h:?}");
        assert_eq!(h["te"], "trailers");
        assert_eq!(h["x-kept"], "yes");
    }

    #[test]
    fn forwarding_headers_append_the_client() {
        let mut h = headers(&[("x-forwarded-for", "1.2.3.4"), ("x-forwarded-proto", "https")]);
        add_forwarding(&mut h, "10.0.0.9:5555".parse().unwrap());
        assert_eq!(h["x-forwarded-for"], "1.2.3.4, 10.0.0.9");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["forwarded"], "for=10.0.0.9;proto=http");
        let mut h = HeaderMap::new();
        add_forwarding(&mut h, "[::1]:80".parse().unwrap());
        assert_eq!(h["forwarded"], "for=\"[::1]\";proto=http");
        assert_eq!(h["x-forwarded-proto"], "http");
    }

    #[test]
    fn cookies_are_found_by_name() {
        let h = headers(&[("cookie", "a=1; session=abc"), ("cookie", "b=2")]);
        assert_eq!(cookie(&h, "session"), Some("abc"));
        assert_eq!(cookie(&h, "b"), Some("2"));
        assert_eq!(cookie(&h, "c"), None);
    }
}
