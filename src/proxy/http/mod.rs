//! The HTTP listener's request path, in phases (the way pingora's `ProxyHttp`
//! reads), each a function with a plain input and output:
//!
//! 1. [`HttpProxy::admit`]: the service's rate limit, then a slot under
//!    `limits.maxRequests`;
//! 2. [`check`]: framing, `Host`, the header count and the URI length;
//! 3. [`prepare`]: hop-by-hop headers out, forwarding headers in, the head
//!    shaped for the endpoints' protocol, the body read (buffered for replay
//!    up to `retry.maxBodyBytes`);
//! 4. [`route::route`]: the route, its backend group, its rate limit, retry
//!    policy and response timeout;
//! 5. [`forward::forward`], the attempt loop over the endpoints' pools, or
//!    for an upgrade [`tunnel::tunnel`];
//! 6. [`HttpProxy::finish`]: counters, and the access-log line built from
//!    what the phases returned, written when the answer's last byte is gone.
//!
//! [`serve`] accepts the connections and hands each request to
//! [`HttpProxy::handle`].

pub mod answer;
pub mod body;
pub mod fast;
pub mod forward;
pub mod h2;
pub mod headers;
pub mod hedge;
pub mod relay;
pub mod route;
pub mod serve;
pub mod tunnel;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::header::{HeaderName, HeaderValue};
use http::{Request, Response, StatusCode};
use prometheus_client::metrics::counter::Counter;
use tokio::time::Instant;

use self::answer::plain;
use self::body::{ClientBody, ProxyBody, ReadError, RequestBody};
use self::forward::Prepared;
use self::headers::{
    add_forwarding, check_framing, check_host, is_upgrade, shape_for, strip_hop_by_hop, upstream_protocol,
};
use self::relay::Meters;
use self::route::hash_key;
use super::access::{self, AccessLog, Entry, Flags};
use super::client::Downstream;
use super::client::conn::InFlight;
use super::gate::Pass;
use super::service::{Current, ServiceRuntime};
use super::upstream::body::IncomingBody;
use crate::api::config::{Config, Limits};
use crate::metrics::{ConnectionLabels, DownstreamLabels, PathLabels, ServiceLabels};

/// With `debug.endpointHeader`, names the route that took the request.
pub const ROUTE_HEADER: &str = "x-balanced-route";

/// Serves one HTTP listener of one service.
pub struct HttpProxy {
    service: Arc<ServiceRuntime>,
    listener: String,
    access_log: Option<AccessLog>,
    names: (Arc<str>, Arc<str>),
    meters: Meters,
    // Resolved once: label lookups cost more than the rest of the metrics work.
    downstream: [Counter; 5],
    // HTTP/1.1 requests served by the fast path, and by hyper.
    paths: [Counter; 2],
}

/// What the phases after admission return: the answer, the route that took
/// the request, and what the access log says of the upstream side.
struct Answer {
    response: Response<ProxyBody>,
    route: Option<usize>,
    upstream: access::Upstream,
}

impl Answer {
    /// One of the proxy's own answers; nothing went upstream.
    fn local(response: Response<ProxyBody>) -> Self {
        Self::flagged(response, Flags::default())
    }

    /// The proxy's own answer, with the access log's flags for it.
    fn flagged(response: Response<ProxyBody>, flags: Flags) -> Self {
        Self {
            response,
            route: None,
            upstream: access::Upstream {
                flags,
                ..Default::default()
            },
        }
    }
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
        let meters = Meters {
            duration: metrics
                .duration
                .get_or_create(&ServiceLabels {
                    service: service.label().to_string(),
                })
                .clone(),
            body_timeouts: metrics
                .closed
                .get_or_create(&ConnectionLabels {
                    service: service.label().to_string(),
                    listener: listener.to_string(),
                    reason: "requestBody",
                })
                .clone(),
        };
        let paths = ["fast", "hyper"].map(|path| {
            metrics
                .http1_path
                .get_or_create(&PathLabels {
                    service: service.label().to_string(),
                    listener: listener.to_string(),
                    path,
                })
                .clone()
        });
        let names = (Arc::from(service.label()), Arc::from(listener));
        Self {
            service,
            listener: listener.to_string(),
            access_log,
            names,
            meters,
            downstream,
            paths,
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
    //
    // `handle`, `proxy` and `request` return an `async move` block rather than
    // being `async fn`s: an `async fn` keeps each argument twice (captured, and
    // again as its local), and every request in flight holds all three nested.
    #[allow(clippy::manual_async_fn)]
    pub fn handle<'a>(
        &'a self,
        req: Request<IncomingBody>,
        client: &'a Downstream,
        flight: InFlight,
    ) -> impl Future<Output = Response<ClientBody>> + 'a {
        async move {
            if req.version() <= http::Version::HTTP_11 {
                self.paths[1].inc();
            }
            let logged = self.access_log.as_ref().map(|_| Logged::of(&req));
            // Taken apart here, so the admission's outcome is not kept beside
            // the rest of the request.
            let (current, pass) = match self.admit(&req, client).await {
                Ok(admitted) => admitted,
                Err(refused) => return self.finish(refused, client, flight, None, logged),
            };
            let answer = self.proxy(req, client, &current).await;
            self.finish(answer, client, flight, pass, logged)
        }
    }

    /// Phase 1: the service's rate limit, then a slot under
    /// `limits.maxRequests`. Upgraded tunnels are connections, not requests
    /// (`limits.maxConnections` holds them), and take no slot.
    async fn admit<B>(&self, req: &Request<B>, client: &Downstream) -> Result<(Arc<Current>, Option<Pass>), Answer> {
        if let Some(limiter) = self.service.limiter()
            && let Some(key) = limiter.key_of(req.headers(), client.peer.ip())
            && let Err(limited) = limiter.acquire(&key).await
        {
            self.service.count_rate_limited();
            let response = answer::rate_limited(limited, limiter.policy());
            return Err(Answer::flagged(response, Flags::RATE_LIMITED));
        }
        let current = self.service.current();
        let limits = &current.config.limits;
        let (max, pending, wait) = (
            limits.max_requests,
            limits.max_pending_requests,
            current.config.timeouts.connect,
        );
        if max == 0 || is_upgrade(req) {
            return Ok((current, None));
        }
        match self.service.gate.admit(max, pending, wait).await {
            Ok(pass) => Ok((current, pass)),
            Err(why) => {
                self.service.count_overflow();
                let response = answer::overflow(why, max, pending);
                Err(Answer::flagged(response, Flags::UPSTREAM_OVERFLOW))
            }
        }
    }

    /// Phases 2 to 5, then what the route adds to the answer: its counter
    /// and, with `debug.endpointHeader`, `x-balanced-route`.
    #[allow(clippy::manual_async_fn)] // an async fn would keep `req` twice (see `handle`)
    fn proxy<'a>(
        &'a self,
        req: Request<IncomingBody>,
        client: &'a Downstream,
        current: &'a Current,
    ) -> impl Future<Output = Answer> + 'a {
        async move {
            let Some(listener) = current.listener(&self.listener) else {
                return Answer::local(plain(StatusCode::SERVICE_UNAVAILABLE, "listener removed\n"));
            };
            let config = &current.config;
            if let Some(refused) = check(&req, &config.limits) {
                return Answer::local(refused);
            }
            let mut answer = if is_upgrade(&req) {
                // Boxed: a tunnel's setup is larger than a request's and rare, and
                // every request in flight would otherwise carry room for it.
                Box::pin(self.upgrade(req, client, current, listener)).await
            } else {
                self.request(req, client, current, listener).await
            };
            if let Some(r) = answer.route {
                current.count_route(r, answer.response.status().as_u16());
                if config.endpoint_header
                    && let Ok(v) = HeaderValue::from_str(&config.routes[r].name)
                {
                    answer
                        .response
                        .headers_mut()
                        .insert(HeaderName::from_static(ROUTE_HEADER), v);
                }
            }
            answer
        }
    }

    /// Phases 3 to 5 for a plain request.
    #[allow(clippy::manual_async_fn)] // an async fn would keep `req` twice (see `handle`)
    fn request<'a>(
        &'a self,
        req: Request<IncomingBody>,
        client: &'a Downstream,
        current: &'a Current,
        listener: usize,
    ) -> impl Future<Output = Answer> + 'a {
        async move {
            let config = &current.config;
            let request = match prepare(req, client, config, listener).await {
                Ok(prepared) => prepared,
                Err(ReadError::Timeout(t)) => {
                    self.meters.body_timeouts.inc();
                    return Answer::local(answer::request_timeout(t));
                }
                Err(e) => return Answer::local(answer::bad_request(&format!("cannot read request body: {e}"))),
            };
            let (parts, body) = (&request.parts, request.body.buffered());
            let routed = match route::route(current, &parts.method, &parts.uri, &parts.headers, body, client.peer).await
            {
                Ok(routed) => routed,
                Err(limited) => {
                    let mut answer = Answer::flagged(limited.response, Flags::RATE_LIMITED);
                    answer.route = Some(limited.route);
                    return answer;
                }
            };
            // Not boxed, though every future above it is copied with room for it:
            // boxing saved 0.2% of an h2c request's instructions and added 0.7 MiB
            // to the peak RSS under h2load -c32 -m10 (a second allocation per stream).
            let (response, upstream) =
                forward::forward(&self.service, &self.meters, current, listener, request, &routed).await;
            Answer {
                response,
                route: routed.route,
                upstream,
            }
        }
    }

    /// Phases 4 and 5 for an upgrade (its body is the tunnel, never read here).
    async fn upgrade(
        &self,
        req: Request<IncomingBody>,
        client: &Downstream,
        current: &Current,
        listener: usize,
    ) -> Answer {
        let key = hash_key(&current.config, req.headers(), client.peer);
        let routed = match route::route(current, req.method(), req.uri(), req.headers(), None, client.peer).await {
            Ok(routed) => routed,
            Err(limited) => {
                let mut answer = Answer::flagged(limited.response, Flags::RATE_LIMITED);
                answer.route = Some(limited.route);
                return answer;
            }
        };
        let (response, upstream) = tunnel::tunnel(&self.service, req, client, current, listener, &routed, key).await;
        Answer {
            response,
            route: routed.route,
            upstream,
        }
    }

    /// Phase 6: counts the answer and wraps its body so the access-log line,
    /// the connection's in-flight mark and the overload slot end with its
    /// last byte.
    fn finish(
        &self,
        answer: Answer,
        client: &Downstream,
        flight: InFlight,
        pass: Option<Pass>,
        logged: Option<Logged>,
    ) -> Response<ClientBody> {
        let Answer { response, upstream, .. } = answer;
        let status = response.status().as_u16();
        self.downstream[usize::from(status / 100).clamp(1, 5) - 1].inc();
        let log = match (logged, &self.access_log) {
            (Some(logged), Some(log)) => {
                let started = logged.started;
                Some(Box::new((
                    log.clone(),
                    started,
                    logged.entry(self, client, status, upstream),
                )))
            }
            _ => None,
        };
        response.map(|body| ClientBody::new(body, flight, pass, log))
    }
}

/// Phase 2: what the proxy refuses to forward, whatever the route: ambiguous
/// framing, a missing or doubled `Host`, more header fields than
/// `limits.maxRequestHeaders` (hyper holds HTTP/1 heads to it; h2 header
/// blocks are counted here), a target longer than `limits.maxUriBytes`.
/// The refusal, if any.
fn check<B>(req: &Request<B>, limits: &Limits) -> Option<Response<ProxyBody>> {
    if let Err(why) = check_framing(req.headers()).and_then(|()| check_host(req)) {
        return Some(answer::bad_request(why));
    }
    if req.headers().len() > limits.max_request_headers {
        return Some(plain(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "431 Request Header Fields Too Large: more header fields than spec.limits.maxRequestHeaders\n",
        ));
    }
    if let Some(target) = req.uri().path_and_query()
        && target.as_str().len() > limits.max_uri_bytes
    {
        return Some(plain(
            StatusCode::URI_TOO_LONG,
            "414 URI Too Long: the request target is longer than spec.limits.maxUriBytes\n",
        ));
    }
    None
}

/// Phase 3: the request as its attempts send it. The hash key and the
/// endpoints' protocol are read from the client's own headers, before
/// hop-by-hop headers go.
async fn prepare(
    req: Request<IncomingBody>,
    client: &Downstream,
    config: &Config,
    listener: usize,
) -> Result<Prepared, ReadError> {
    let (mut parts, body) = req.into_parts();
    let protocol = upstream_protocol(config.listeners[listener].app_protocol, &parts.headers);
    let key = shape_head(&mut parts, client, config, listener, protocol);
    let body = RequestBody::read(body, config.retry.max_body_bytes, config.timeouts.request_body).await?;
    Ok(Prepared {
        parts,
        body,
        protocol,
        key,
    })
}

/// The head as the endpoints get it, on both HTTP/1.1 paths: the hash key
/// read from the client's own headers (returned), hop-by-hop headers out,
/// forwarding headers in, the target and `Host` shaped for `protocol`.
fn shape_head(
    parts: &mut http::request::Parts,
    client: &Downstream,
    config: &Config,
    listener: usize,
    protocol: crate::proxy::upstream::pool::Protocol,
) -> Option<u64> {
    let key = hash_key(config, &parts.headers, client.peer);
    strip_hop_by_hop(&mut parts.headers, true);
    add_forwarding(
        &mut parts.headers,
        client,
        config.listeners[listener].trust_forwarded_headers,
    );
    shape_for(parts, protocol);
    key
}

/// What the access log needs of a request, taken before it is forwarded.
struct Logged {
    start: SystemTime,
    started: Instant,
    method: http::Method,
    uri: http::Uri,
    authority: Option<HeaderValue>,
    version: http::Version,
}

impl Logged {
    fn of<B>(req: &Request<B>) -> Self {
        Self {
            start: SystemTime::now(),
            started: Instant::now(),
            method: req.method().clone(),
            uri: req.uri().clone(),
            authority: req.headers().get(http::header::HOST).cloned(),
            version: req.version(),
        }
    }

    /// The access-log line of this request, answered `status` by `proxy`
    /// (its bytes out and duration filled in when the answer ends).
    fn entry(self, proxy: &HttpProxy, client: &Downstream, status: u16, upstream: access::Upstream) -> Entry {
        Entry {
            tls: client.tls.clone(),
            start: self.start,
            client: client.peer,
            service: proxy.names.0.clone(),
            listener: proxy.names.1.clone(),
            method: Some(self.method),
            uri: Some(self.uri),
            authority: self.authority,
            version: Some(self.version),
            status,
            bytes_in: upstream.bytes_in,
            bytes_out: 0,
            duration: Duration::ZERO,
            upstream,
        }
    }
}
