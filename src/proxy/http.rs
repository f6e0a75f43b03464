//! The HTTP listener's request path: check the framing, shape the request for
//! the endpoint's protocol, run the attempt loop over the per-endpoint
//! connection pools, and pass the answer back. Upgrades (WebSocket) become
//! tunnels through the same attempt loop.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::header::{HeaderName, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::time::Instant;

use super::access::{self, AccessLog, Entry, Flags};
use super::answer::{self, plain};
use super::attempt::{Attempts, Exhausted, RequestFacts};
use super::body::{ClientBody, ProxyBody, ReadError, Release, RequestBody, Tracked, Upload, UploadEnd, UploadState};
use super::conn::InFlight;
use super::headers::{Downstream, add_forwarding, check_framing, is_grpc, is_upgrade, shape_for, strip_hop_by_hop};
use super::retry::Failure;
use super::service::{ActiveGuard, Current, ServiceRuntime};
use super::upstream::{Conn, Pool, Protocol, UpBody};
use crate::api::config::{Algorithm, AppProtocol, Config, HashKey};
use crate::balance::{Snapshot, picker};
use crate::health::probe::io_text;
use crate::metrics::{AtomicHistogram, ConnectionLabels, DownstreamLabels, ServiceLabels};

/// Response header naming the endpoint that answered (behind `spec.debug.endpointHeader`).
pub const ENDPOINT_HEADER: &str = "x-balanced-endpoint";

/// With `debug.endpointHeader`, names the route that took the request.
pub const ROUTE_HEADER: &str = "x-balanced-route";

/// Serves one HTTP listener of one service.
pub struct HttpProxy {
    service: Arc<ServiceRuntime>,
    listener: String,
    access_log: Option<AccessLog>,
    names: (Arc<str>, Arc<str>),
    body_timeouts: prometheus_client::metrics::counter::Counter,
    // Resolved once: label lookups cost more than the rest of the metrics work.
    downstream: [prometheus_client::metrics::counter::Counter; 5],
    duration: AtomicHistogram,
}

impl HttpProxy {
    /// The proxy for listener `listener` (by name) of `service`, writing an
    /// access log when one is given.
    pub fn new(service: Arc<ServiceRuntime>, listener: &str, access_log: Option<AccessLog>) -> Self {
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
        let names = (Arc::from(service.label()), Arc::from(listener));
        let body_timeouts = metrics
            .closed
            .get_or_create(&ConnectionLabels {
                service: service.label().to_string(),
                listener: listener.to_string(),
                reason: "requestBody",
            })
            .clone();
        Self {
            service,
            listener: listener.to_string(),
            access_log,
            names,
            body_timeouts,
            downstream,
            duration,
        }
    }

    /// The service this listener belongs to.
    pub fn service(&self) -> &Arc<ServiceRuntime> {
        &self.service
    }

    /// The listener's name.
    pub fn listener(&self) -> &str {
        &self.listener
    }

    /// Answers one client request; `flight` marks it on its connection until
    /// the answer's last byte is gone.
    pub async fn handle(&self, req: Request<Incoming>, client: &Downstream, flight: InFlight) -> Response<ClientBody> {
        let logged = self.access_log.as_ref().map(|_| {
            (
                SystemTime::now(),
                Instant::now(),
                req.method().clone(),
                req.uri().clone(),
                req.headers().get(http::header::HOST).cloned(),
                req.version(),
            )
        });
        let mut up = access::Upstream::default();
        if let Some(limiter) = self.service.limiter()
            && let Some(key) = limiter.key_of(req.headers(), client.peer.ip())
            && let Err(limited) = limiter.acquire(&key).await
        {
            self.service.count_rate_limited();
            up.flags.set(access::Flags::RATE_LIMITED);
            let answer = answer::rate_limited(limited, limiter.policy());
            return self.finish(answer, client, flight, None, logged, up);
        }
        let current = self.service.current();
        // Overload protection counts requests, not upgraded tunnels (those
        // are connections, under spec.limits.maxConnections).
        let limits = &current.config.limits;
        let admitted = if limits.max_requests == 0 || is_upgrade(&req) {
            Ok(None)
        } else {
            self.service
                .gate
                .admit(
                    limits.max_requests,
                    limits.max_pending_requests,
                    current.config.timeouts.connect,
                )
                .await
        };
        let (response, pass) = match (admitted, current.listener(&self.listener)) {
            (Err(why), _) => {
                self.service.count_overflow();
                up.flags.set(access::Flags::UPSTREAM_OVERFLOW);
                let answer = answer::overflow(why, limits.max_requests, limits.max_pending_requests);
                (answer, None)
            }
            (Ok(pass), Some(listener)) => (self.forward(req, client, &current, listener, &mut up).await, pass),
            (Ok(pass), None) => (plain(StatusCode::SERVICE_UNAVAILABLE, "listener removed\n"), pass),
        };
        self.finish(response, client, flight, pass, logged, up)
    }

    /// Counts the answer and wraps its body so the access-log line, the
    /// connection's in-flight mark and the overload slot end with its last byte.
    fn finish(
        &self,
        response: Response<ProxyBody>,
        client: &Downstream,
        flight: InFlight,
        pass: Option<super::gate::Pass>,
        logged: Option<Logged>,
        up: access::Upstream,
    ) -> Response<ClientBody> {
        let status = response.status().as_u16();
        self.downstream[usize::from(status / 100).clamp(1, 5) - 1].inc();
        let log = match (logged, &self.access_log) {
            (Some((start, started, method, uri, authority, version)), Some(log)) => Some(Box::new((
                log.clone(),
                started,
                Entry {
                    start,
                    client: client.peer,
                    service: self.names.0.clone(),
                    listener: self.names.1.clone(),
                    method: Some(method),
                    uri: Some(uri),
                    authority,
                    version: Some(version),
                    status,
                    bytes_in: up.bytes_in,
                    bytes_out: 0,
                    duration: Duration::ZERO,
                    upstream: up,
                },
            ))),
            _ => None,
        };
        response.map(|body| ClientBody::new(body, flight, pass, log))
    }

    /// [`Self::route_and_forward`], then what the route adds: its counter and,
    /// with `debug.endpointHeader`, `x-balanced-route`.
    async fn forward(
        &self,
        req: Request<Incoming>,
        client: &Downstream,
        current: &Current,
        listener: usize,
        up: &mut access::Upstream,
    ) -> Response<ProxyBody> {
        let mut route = None;
        let mut resp = self
            .route_and_forward(req, client, current, listener, up, &mut route)
            .await;
        if let Some(r) = route {
            current.count_route(r, resp.status().as_u16());
            if current.config.endpoint_header
                && let Ok(v) = HeaderValue::from_str(&current.config.routes[r].name)
            {
                resp.headers_mut().insert(HeaderName::from_static(ROUTE_HEADER), v);
            }
        }
        resp
    }

    /// A route's own rate limit: the 429 when the request is over it.
    async fn route_limit(
        &self,
        current: &Current,
        route: usize,
        headers: &http::HeaderMap,
        client: &Downstream,
    ) -> Option<Response<ProxyBody>> {
        let limiter = current.route_limiter(route)?;
        let key = limiter.key_of(headers, client.peer.ip())?;
        let limited = limiter.acquire(&key).await.err()?;
        current.count_route_limited(route);
        Some(answer::rate_limited(limited, limiter.policy()))
    }

    async fn route_and_forward(
        &self,
        req: Request<Incoming>,
        client: &Downstream,
        current: &Current,
        listener: usize,
        up: &mut access::Upstream,
        route: &mut Option<usize>,
    ) -> Response<ProxyBody> {
        if let Err(why) = check_framing(req.headers()) {
            return answer::bad_request(why);
        }
        if let Err(why) = check_host(&req) {
            return answer::bad_request(why);
        }
        let config = &current.config;
        // HTTP/1 heads are held to the count by hyper (431 before we see
        // them); h2 header blocks are counted here.
        if req.headers().len() > config.limits.max_request_headers {
            return plain(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "431 Request Header Fields Too Large: more header fields than spec.limits.maxRequestHeaders\n",
            );
        }
        if let Some(target) = req.uri().path_and_query()
            && target.as_str().len() > config.limits.max_uri_bytes
        {
            return plain(
                StatusCode::URI_TOO_LONG,
                "414 URI Too Long: the request target is longer than spec.limits.maxUriBytes\n",
            );
        }
        if is_upgrade(&req) {
            return self.tunnel(req, client, current, listener, up, route).await;
        }
        let trust = config.listeners[listener].trust_forwarded_headers;
        let (mut parts, body) = req.into_parts();
        let key = hash_key(config, &parts.headers, client.peer);
        let protocol = upstream_protocol(config.listeners[listener].app_protocol, &parts.headers);
        strip_hop_by_hop(&mut parts.headers, true);
        add_forwarding(&mut parts.headers, client, trust);
        shape_for(&mut parts, protocol);
        let mut body = match RequestBody::read(body, config.retry.max_body_bytes, config.timeouts.request_body).await {
            Ok(b) => b,
            Err(ReadError::Timeout(t)) => {
                self.service_body_timeout(client);
                return answer::request_timeout(t);
            }
            Err(e) => return answer::bad_request(&format!("cannot read request body: {e}")),
        };
        let upload = body.upload();
        up.bytes_in = body.buffered_len();

        let snap = &current.snap;
        let mut attempts = Attempts::new(&self.service, config, snap, key);
        let mut response_timeout = config.timeouts.response;
        if !config.routes.is_empty() {
            // After the body is read: a route may look at it.
            let form = body
                .buffered()
                .and_then(|b| crate::api::route::BodyView::new(b, &parts.headers));
            let (r, groups) = pick_route(config, &parts.method, &parts.uri, &parts.headers, form.as_ref());
            *route = r;
            if let Some(r) = r {
                let rt = &config.routes[r];
                if let Some(limited) = self.route_limit(current, r, &parts.headers, client).await {
                    up.flags.set(Flags::RATE_LIMITED);
                    return limited;
                }
                attempts = attempts.with_retry(&rt.retry);
                response_timeout = rt.response_timeout;
            }
            attempts = attempts.within(groups);
        }
        // A 5xx that was retried: passed on if no later attempt does better.
        let mut fallback: Option<Response<ProxyBody>> = None;
        while let Some(i) = attempts.next_endpoint() {
            let member = &snap.members[i];
            let pool = current.pool(listener, i);
            let facts = RequestFacts {
                method: Some(&parts.method),
                replayable: body.replayable(),
            };
            let guard = ActiveGuard::new(member.endpoint.clone());
            let conn = match pool.checkout(protocol).await {
                Ok(c) => c,
                Err(failure) => {
                    // No connection, so the body is untouched: even a streamed
                    // one can still go elsewhere.
                    let untouched = RequestFacts {
                        replayable: true,
                        ..facts
                    };
                    if attempts.failed(i, failure, untouched) {
                        continue;
                    }
                    break;
                }
            };
            let Some(attempt_body) = body.take() else {
                break;
            };
            // Headers are copied only when a retry after sending is possible.
            let keep = attempts.may_retry_after_send(facts);
            let headers = if keep {
                parts.headers.clone()
            } else {
                std::mem::take(&mut parts.headers)
            };
            let request = upstream_request(&parts, headers, attempt_body);
            let reused = matches!(conn, Conn::H1 { reused: true, .. });
            let started = Instant::now();
            up.endpoint = Some(member.spec.addr);
            let mut outcome = after_upload(upload.as_deref(), response_timeout, send(pool, conn, request)).await;
            // An idle keep-alive connection the endpoint closed just as we used
            // it is not the endpoint failing: once, on a fresh connection, with
            // the request hyper handed back unsent, or a copy when one was kept.
            if reused
                && matches!(
                    outcome,
                    Err((Failure::Error(_) | Failure::Connect(_) | Failure::Refused(_), _))
                )
            {
                let again = match &mut outcome {
                    Err((_, unsent @ Some(_))) => unsent.take(),
                    _ if keep => body.take().map(|b| upstream_request(&parts, parts.headers.clone(), b)),
                    _ => None,
                };
                if let Some(resend) = again {
                    outcome = match pool.fresh_h1().await {
                        Ok(sender) => {
                            let conn = Conn::H1 { sender, reused: false };
                            after_upload(upload.as_deref(), response_timeout, send(pool, conn, resend)).await
                        }
                        Err(f) => Err((f, None)),
                    };
                }
            }
            self.duration.observe(started.elapsed());
            let outcome = outcome.map_err(|(failure, _)| failure);
            up.attempts = attempts.tries() as u32;
            if let Some(state) = &upload {
                up.bytes_in = up.bytes_in.max(state.bytes());
            }
            match outcome {
                Ok((resp, release)) => {
                    let status = resp.status().as_u16();
                    let answer = respond(resp, guard, release, member.spec.addr, config);
                    if !attempts.answered(i, status, facts) {
                        if fallback.is_some() || attempts.tries() > 1 && status >= 500 {
                            up.flags.set(Flags::RETRIES_EXHAUSTED);
                        }
                        return answer;
                    }
                    fallback = Some(answer);
                }
                Err(failure) => {
                    drop(guard);
                    // The client's upload broke off: its failure, not the endpoint's.
                    match upload.as_ref().map(|u| u.end()) {
                        Some(UploadEnd::TimedOut) => {
                            self.service_body_timeout(client);
                            return answer::request_timeout(config.timeouts.request_body);
                        }
                        Some(UploadEnd::Failed) => {
                            up.flags.set(Flags::DOWNSTREAM_CLOSED);
                            return answer::bad_request("the request body broke off");
                        }
                        _ => {}
                    }
                    if !attempts.failed(i, failure, facts) {
                        break;
                    }
                }
            }
        }
        if let Some(answer) = fallback {
            up.flags.set(Flags::RETRIES_EXHAUSTED);
            return answer;
        }
        let end = attempts.exhausted();
        up.attempts = end.tries as u32;
        up.flags.set(exhausted_flags(&end, &current.snap));
        answer::exhausted(&end, config.error_detail)
    }

    /// Counts a connection whose request body stalled; the answer (408) closes it.
    fn service_body_timeout(&self, _client: &Downstream) {
        self.body_timeouts.inc();
    }

    /// Forwards an Upgrade request (WebSocket and friends) and, on 101, joins
    /// the two upgraded connections byte for byte. Connecting goes through the
    /// attempt loop like any request; once the request is sent it is not replayed.
    async fn tunnel(
        &self,
        mut req: Request<Incoming>,
        client: &Downstream,
        current: &Current,
        listener: usize,
        up: &mut access::Upstream,
        route: &mut Option<usize>,
    ) -> Response<ProxyBody> {
        let config = &current.config;
        let trust = config.listeners[listener].trust_forwarded_headers;
        let client_upgrade = hyper::upgrade::on(&mut req);
        let key = hash_key(config, req.headers(), client.peer);
        let snap = &current.snap;
        let mut attempts = Attempts::new(&self.service, config, snap, key);
        if !config.routes.is_empty() {
            let (r, groups) = pick_route(config, req.method(), req.uri(), req.headers(), None);
            *route = r;
            attempts = attempts.within(groups);
        }
        let mut connected = None;
        while let Some(i) = attempts.next_endpoint() {
            let guard = ActiveGuard::new(snap.members[i].endpoint.clone());
            match current.pool(listener, i).connect_tcp().await {
                Ok(stream) => {
                    attempts.succeeded(i);
                    connected = Some((stream, guard, snap.members[i].spec.addr));
                    break;
                }
                Err(failure) => {
                    if !attempts.failed(i, failure, RequestFacts::CONNECTION) {
                        break;
                    }
                }
            }
        }
        up.attempts = attempts.tries() as u32;
        let Some((stream, guard, addr)) = connected else {
            let end = attempts.exhausted();
            up.flags.set(exhausted_flags(&end, snap));
            return answer::exhausted(&end, config.error_detail);
        };
        up.endpoint = Some(addr);
        let (mut parts, body) = req.into_parts();
        strip_hop_by_hop(&mut parts.headers, false);
        add_forwarding(&mut parts.headers, client, trust);
        shape_for(&mut parts, Protocol::Http1);
        let upload = Upload::new(config.timeouts.request_body);
        let request = Request::from_parts(
            parts,
            UpBody::Stream {
                head: None,
                rest: body,
                upload,
            },
        );
        let (mut sender, conn) = match http1::handshake(TokioIo::new(stream)).await {
            Ok(pair) => pair,
            Err(e) => return plain(StatusCode::BAD_GATEWAY, format!("upgrade handshake failed: {e}\n")),
        };
        client.tasks.spawn(async move {
            let _ = conn.with_upgrades().await;
        });
        let mut resp = match tokio::time::timeout(config.timeouts.response, sender.send_request(request)).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                return plain(
                    StatusCode::BAD_GATEWAY,
                    format!("502 Bad Gateway: upgrade failed: {}\n", classify(&e).1),
                );
            }
            Err(_) => return plain(StatusCode::GATEWAY_TIMEOUT, "504 Gateway Timeout: upgrade timed out\n"),
        };
        if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
            return respond(resp, guard, Release::None, addr, config);
        }
        let upstream_upgrade = hyper::upgrade::on(&mut resp);
        // From here the client connection carries bytes, not requests: its
        // clock becomes the tunnel's idle timeout.
        client.conn.set_tunnel();
        client.tasks.spawn(async move {
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

/// The route that takes a request (first match) and the group it goes to
/// (weighted), as a group mask; `default` when no route matches.
fn pick_route(
    config: &Config,
    method: &http::Method,
    uri: &http::Uri,
    headers: &http::HeaderMap,
    body: Option<&crate::api::route::BodyView<'_>>,
) -> (Option<usize>, u64) {
    let host = uri
        .host()
        .or_else(|| headers.get(http::header::HOST).and_then(|h| h.to_str().ok()))
        .map(strip_port);
    let view = crate::api::route::RequestView {
        method,
        path: uri.path(),
        query: uri.query(),
        host,
        headers,
        body,
    };
    match crate::api::route::first_match(&config.routes, &view) {
        Some(i) => {
            let route = &config.routes[i];
            let draw = rand::random_range(0..route.total_weight().max(1));
            (Some(i), 1 << route.pick_group(draw))
        }
        None => (None, 1),
    }
}

/// `host` without a `:port` (and IPv6 brackets kept).
fn strip_port(host: &str) -> &str {
    match host.rfind(':') {
        Some(i) if !host[i..].contains(']') && (host.starts_with('[') || host[..i].find(':').is_none()) => &host[..i],
        _ => host,
    }
}

/// What the access log needs of a request, taken before it is forwarded.
type Logged = (
    SystemTime,
    Instant,
    http::Method,
    http::Uri,
    Option<HeaderValue>,
    http::Version,
);

/// Runs `send` with `timeouts.response` counted from the end of the upload
/// (nginx `proxy_read_timeout`): a slow upload is bounded by
/// `timeouts.requestBody` between reads, not by the response timeout.
async fn after_upload<T>(
    upload: Option<&UploadState>,
    response: Duration,
    send: impl Future<Output = Result<T, (Failure, Option<Request<UpBody>>)>>,
) -> Result<T, (Failure, Option<Request<UpBody>>)> {
    tokio::pin!(send);
    if let Some(upload) = upload {
        tokio::select! {
            r = &mut send => return r,
            _ = upload.ended() => {}
        }
    }
    tokio::time::timeout(response, send)
        .await
        .unwrap_or(Err((Failure::Timeout, None)))
}

/// Envoy's flags for attempts that ended without an answer: `UH` when no
/// endpoint passes its health checks (even if the unhealthy ones were tried
/// as a last resort), `UO` when the healthy ones were all at
/// `maxConnections`, then what the last attempt met.
pub(super) fn exhausted_flags(end: &Exhausted, snap: &Snapshot) -> Flags {
    let mut flags = Flags::default();
    let healthy = snap.members.iter().filter(|m| m.spec.serves()).count();
    if healthy == 0 {
        flags.set(Flags::NO_HEALTHY_UPSTREAM);
    }
    match &end.last {
        None if healthy > 0 => flags.set(Flags::UPSTREAM_OVERFLOW),
        Some((_, Failure::Connect(_))) => flags.set(Flags::UPSTREAM_CONNECT_FAILURE),
        Some((_, Failure::Timeout)) => flags.set(Flags::UPSTREAM_TIMEOUT),
        _ => {}
    }
    if end.tries > 1 {
        flags.set(Flags::RETRIES_EXHAUSTED);
    }
    flags
}

/// RFC 9112 3.2: exactly one `Host` (none at all is allowed only for HTTP/1.0
/// and for an absolute-form target, whose authority then stands for it, and
/// replaces `Host` upstream: `headers::shape_for`). RFC 9113 8.3.1: an h2
/// request whose `Host` differs from its `:authority` is malformed (nginx
/// answers 400 too).
fn check_host<B>(req: &Request<B>) -> Result<(), &'static str> {
    let mut hosts = req.headers().get_all(http::header::HOST).iter();
    let first = hosts.next();
    if hosts.next().is_some() {
        return Err("more than one Host header");
    }
    if req.version() == http::Version::HTTP_2
        && let (Some(host), Some(authority)) = (first, req.uri().authority())
        && !host.as_bytes().eq_ignore_ascii_case(authority.as_str().as_bytes())
    {
        return Err("Host disagrees with :authority");
    }
    if first.is_none() && req.version() == http::Version::HTTP_11 && req.uri().authority().is_none() {
        return Err("HTTP/1.1 request without a Host header");
    }
    Ok(())
}

/// One attempt's request: the shaped head of the client's request, with
/// `headers` (a copy, or the originals when no retry can follow) and `body`.
fn upstream_request(parts: &http::request::Parts, headers: http::HeaderMap, body: UpBody) -> Request<UpBody> {
    let mut up = Request::new(body);
    *up.method_mut() = parts.method.clone();
    *up.uri_mut() = parts.uri.clone();
    *up.version_mut() = parts.version;
    *up.headers_mut() = headers;
    up
}

/// The protocol to speak to the endpoints: the listener's `appProtocol`, else
/// HTTP/1.1 for everything but gRPC, which needs HTTP/2.
pub fn upstream_protocol(app: Option<AppProtocol>, headers: &http::HeaderMap) -> Protocol {
    match app {
        Some(AppProtocol::Http1) => Protocol::Http1,
        Some(AppProtocol::H2c) => Protocol::H2c,
        None if is_grpc(headers) => Protocol::H2c,
        None => Protocol::Http1,
    }
}

/// Sends `req` on `conn`; the response comes with what its body must give
/// back. A failed request comes back too when hyper never sent it.
async fn send(
    pool: &Arc<Pool>,
    conn: Conn,
    req: Request<UpBody>,
) -> Result<(Response<Incoming>, Release), (Failure, Option<Request<UpBody>>)> {
    match conn {
        Conn::H1 { mut sender, .. } => match sender.try_send_request(req).await {
            Ok(resp) => Ok((resp, Release::H1(pool.clone(), sender))),
            Err(mut e) => match e.take_message() {
                // Nothing went out: as good as a connect failure.
                Some(unsent) => Err((Failure::Connect(classify(e.error()).1), Some(unsent))),
                None => Err((classify(e.error()).0, None)),
            },
        },
        Conn::H2 { mut sender, slot } => match sender.send_request(req).await {
            Ok(resp) => Ok((resp, Release::H2(slot))),
            Err(e) => Err((classify(&e).0, None)),
        },
    }
}

fn respond(
    resp: Response<Incoming>,
    guard: ActiveGuard,
    release: Release,
    endpoint: SocketAddr,
    config: &Config,
) -> Response<ProxyBody> {
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers, true);
    if config.endpoint_header
        && let Ok(v) = HeaderValue::from_str(&endpoint.to_string())
    {
        parts.headers.insert(HeaderName::from_static(ENDPOINT_HEADER), v);
    }
    Response::from_parts(parts, Tracked::new(body, guard, release).boxed())
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

/// Sorts a hyper client error into a failure (bad response header, or an
/// error after sending), with its text.
fn classify(e: &hyper::Error) -> (Failure, String) {
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

/// The request's consistent-hash key; a missing header or cookie falls back
/// to the client IP, so the request still sticks to something.
fn hash_key(config: &Config, headers: &http::HeaderMap, peer: SocketAddr) -> Option<u64> {
    let Algorithm::ConsistentHash(key) = &config.algorithm else {
        return None;
    };
    let value: Option<&[u8]> = match key {
        HashKey::SourceIp => None,
        HashKey::Header(name) => headers.get(name).map(|v| v.as_bytes()),
        HashKey::Cookie(name) => cookie(headers, name).map(str::as_bytes),
    };
    Some(match value {
        Some(v) => picker::hash_key(v),
        None => picker::hash_key(&super::service::ip_bytes(peer)),
    })
}

pub(crate) use crate::api::route::cookie;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookies_are_found_by_name() {
        let mut h = http::HeaderMap::new();
        h.append("cookie", HeaderValue::from_static("a=1; session=abc"));
        h.append("cookie", HeaderValue::from_static("b=2"));
        assert_eq!(cookie(&h, "session"), Some("abc"));
        assert_eq!(cookie(&h, "b"), Some("2"));
        assert_eq!(cookie(&h, "c"), None);
    }

    #[test]
    fn the_upstream_protocol_is_the_listeners_not_the_clients() {
        let mut grpc = http::HeaderMap::new();
        grpc.insert("content-type", HeaderValue::from_static("application/grpc"));
        let plain = http::HeaderMap::new();
        assert_eq!(upstream_protocol(None, &plain), Protocol::Http1);
        assert_eq!(upstream_protocol(None, &grpc), Protocol::H2c, "gRPC needs HTTP/2");
        assert_eq!(upstream_protocol(Some(AppProtocol::H2c), &plain), Protocol::H2c);
        assert_eq!(upstream_protocol(Some(AppProtocol::Http1), &grpc), Protocol::Http1);
    }
}
