//! What every attempt shares, plain or hedged: the upstream request built
//! from the shaped head, the endpoint's answer as the client gets it, and
//! the meters the request path counts into.

use std::net::SocketAddr;

use http::header::{HeaderName, HeaderValue};
use http::{Request, Response};
use prometheus_client::metrics::counter::Counter;

use super::body::ProxyBody;
use super::headers::strip_hop_by_hop;
use crate::balance::ActiveGuard;
use crate::metrics::AtomicHistogram;
use crate::proxy::access;
use crate::proxy::upstream::EndpointBody;
use crate::proxy::upstream::body::UpBody;
use crate::proxy::upstream::pool::{Release, Tracked};

/// Response header naming the endpoint that answered (behind `spec.debug.endpointHeader`).
pub const ENDPOINT_HEADER: &str = "x-balanced-endpoint";

/// What the request path counts into, resolved once per listener: label
/// lookups cost more than the rest of the metrics work.
pub struct Meters {
    /// Time from sending a request to its response head, per attempt.
    pub duration: AtomicHistogram,
    /// Connections closed because the client's request body stalled.
    pub body_timeouts: Counter,
}

/// The answer of the forward phase and what the access log says of the
/// upstream side.
pub type Forwarded = (Response<ProxyBody>, access::Upstream);

/// One attempt's request: the shaped head of the client's request, with
/// `headers` (a copy, or the originals when no retry can follow) and `body`.
pub fn upstream_request(parts: &http::request::Parts, headers: http::HeaderMap, body: UpBody) -> Request<UpBody> {
    let mut up = Request::new(body);
    *up.method_mut() = parts.method.clone();
    *up.uri_mut() = parts.uri.clone();
    *up.version_mut() = parts.version;
    *up.headers_mut() = headers;
    up
}

/// An endpoint's answer as the client gets it: hop-by-hop headers out, with
/// `debug.endpointHeader` the endpoint named, and its body holding the
/// endpoint's active count and connection until the last byte.
pub fn relayed(
    resp: Response<EndpointBody>,
    guard: ActiveGuard,
    release: Release,
    endpoint: SocketAddr,
    endpoint_header: bool,
) -> Response<ProxyBody> {
    use http_body_util::BodyExt;
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers, true);
    if endpoint_header && let Ok(v) = HeaderValue::from_str(&endpoint.to_string()) {
        parts.headers.insert(HeaderName::from_static(ENDPOINT_HEADER), v);
    }
    Response::from_parts(parts, Tracked::new(body, guard, release).boxed())
}
