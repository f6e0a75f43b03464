//! The route phase: which route takes a request (first match), which of its
//! backend groups (weighted), the route's own rate limit, and the retry
//! policy and response timeout the attempts then follow; plus the request's
//! consistent-hash key.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Uri};

use super::answer;
use super::body::ProxyBody;
use crate::api::config::{Algorithm, Config, HashKey, RetryPolicy};
use crate::api::route::{BodyView, RequestView, cookie, first_match};
use crate::balance::picker;
use crate::proxy::attempt::Attempts;
use crate::proxy::service::{Current, ServiceRuntime};

/// What the route phase decided for one request.
#[derive(Clone, Copy, Debug)]
pub struct Routed<'a> {
    /// The route that took the request; `None` when none matched (or there are none).
    pub route: Option<usize>,
    /// The backend groups the attempts stay in, as a mask (`default` is 1).
    pub groups: u64,
    /// The retry policy: the route's, else the service's.
    pub retry: &'a RetryPolicy,
    /// How long to wait for the response head: the route's, else `timeouts.response`.
    pub response_timeout: Duration,
}

impl<'a> Routed<'a> {
    /// The attempts of a request so routed (the retry budget stays the service's).
    pub fn attempts(&self, service: &'a ServiceRuntime, current: &'a Current, key: Option<u64>) -> Attempts<'a> {
        Attempts::new(service, &current.config, &current.snap, key)
            .with_retry(self.retry)
            .within(self.groups)
    }
}

/// A request over its route's rate limit: the 429, and the route it came by.
pub struct RouteLimited {
    /// The answer.
    pub response: http::Response<ProxyBody>,
    /// The route.
    pub route: usize,
}

/// Routes a request by its head and, when it was buffered, its body; a
/// request over its route's rate limit gets the 429 instead.
pub async fn route<'a>(
    current: &'a Current,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: Option<&Bytes>,
    peer: SocketAddr,
) -> Result<Routed<'a>, RouteLimited> {
    let config = &current.config;
    let mut routed = Routed {
        route: None,
        groups: 1,
        retry: &config.retry,
        response_timeout: config.timeouts.response,
    };
    if config.routes.is_empty() {
        return Ok(routed);
    }
    // The views end before the rate limit's wait: a body view is not Sync.
    let matched = {
        let form = body.and_then(|b| BodyView::new(b, headers));
        let host = uri
            .host()
            .or_else(|| headers.get(http::header::HOST).and_then(|h| h.to_str().ok()))
            .map(strip_port);
        let view = RequestView {
            method,
            path: uri.path(),
            query: uri.query(),
            host,
            headers,
            body: form.as_ref(),
        };
        first_match(&config.routes, &view)
    };
    let Some(r) = matched else {
        return Ok(routed);
    };
    let route = &config.routes[r];
    let draw = rand::random_range(0..route.total_weight().max(1));
    routed.route = Some(r);
    routed.groups = 1 << route.pick_group(draw);
    routed.retry = &route.retry;
    routed.response_timeout = route.response_timeout;
    if let Some(limiter) = current.route_limiter(r)
        && let Some(key) = limiter.key_of(headers, peer.ip())
        && let Err(limited) = limiter.acquire(&key).await
    {
        current.count_route_limited(r);
        return Err(RouteLimited {
            response: answer::rate_limited(limited, limiter.policy()),
            route: r,
        });
    }
    Ok(routed)
}

/// `host` without a `:port` (and IPv6 brackets kept).
fn strip_port(host: &str) -> &str {
    match host.rfind(':') {
        Some(i) if !host[i..].contains(']') && (host.starts_with('[') || host[..i].find(':').is_none()) => &host[..i],
        _ => host,
    }
}

/// The request's consistent-hash key; a missing header or cookie falls back
/// to the client IP, so the request still sticks to something.
pub fn hash_key(config: &Config, headers: &HeaderMap, peer: SocketAddr) -> Option<u64> {
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
        None => picker::hash_ip(peer),
    })
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    #[test]
    fn cookies_are_found_by_name() {
        let mut h = HeaderMap::new();
        h.append("cookie", HeaderValue::from_static("a=1; session=abc"));
        h.append("cookie", HeaderValue::from_static("b=2"));
        assert_eq!(cookie(&h, "session"), Some("abc"));
        assert_eq!(cookie(&h, "b"), Some("2"));
        assert_eq!(cookie(&h, "c"), None);
    }

    #[test]
    fn a_port_is_stripped_from_the_host_but_not_from_an_ipv6_literal() {
        assert_eq!(strip_port("shop.example:8080"), "shop.example");
        assert_eq!(strip_port("shop.example"), "shop.example");
        assert_eq!(strip_port("[::1]:8080"), "[::1]");
        assert_eq!(strip_port("[::1]"), "[::1]");
    }
}
