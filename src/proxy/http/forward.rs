//! The forward phase of a plain request: the attempt loop over the
//! endpoints' connection pools. Each attempt checks out a connection, sends
//! the shaped request and waits for the response head; what came back is
//! settled by the attempt loop's rules (`proxy::attempt`): passed on, or
//! tried elsewhere. A retried 5xx is passed on if no later attempt does better.

use std::net::SocketAddr;

use http::header::{HeaderName, HeaderValue};
use http::{Request, Response};
use hyper::body::Incoming;
use prometheus_client::metrics::counter::Counter;
use tokio::time::Instant;

use super::answer;
use super::body::{ProxyBody, RequestBody};
use super::headers::strip_hop_by_hop;
use super::route::Routed;
use crate::balance::ActiveGuard;
use crate::metrics::AtomicHistogram;
use crate::proxy::access::{self, Flags};
use crate::proxy::attempt::RequestFacts;
use crate::proxy::service::{Current, ServiceRuntime};
use crate::proxy::upstream::body::{UpBody, UploadEnd};
use crate::proxy::upstream::exchange;
use crate::proxy::upstream::pool::{Protocol, Release, Tracked};

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

/// A request ready for its attempts: the head shaped for the endpoints'
/// protocol, and its body read (or ready to stream).
pub struct Prepared {
    /// Method, target, headers, as they go upstream.
    pub parts: http::request::Parts,
    /// The body.
    pub body: RequestBody,
    /// HTTP/1.1 or h2c to the endpoints.
    pub protocol: Protocol,
    /// The consistent-hash key, when the algorithm hashes.
    pub key: Option<u64>,
}

/// The answer of the forward phase and what the access log says of the
/// upstream side.
pub type Forwarded = (Response<ProxyBody>, access::Upstream);

/// Runs the attempts of `request` through `listener`'s pools.
pub async fn forward(
    service: &ServiceRuntime,
    meters: &Meters,
    current: &Current,
    listener: usize,
    request: Prepared,
    routed: &Routed<'_>,
) -> Forwarded {
    let config = &current.config;
    let Prepared {
        mut parts,
        mut body,
        protocol,
        key,
    } = request;
    let upload = body.upload();
    let mut up = access::Upstream {
        bytes_in: body.buffered_len(),
        ..Default::default()
    };
    let mut attempts = routed.attempts(service, current, key);
    let replayed = RequestFacts {
        method: Some(&parts.method),
        replayable: body.replayable(),
    };
    // Hedging resends what was sent: only a buffered body, only a request
    // the rules would retry after a timeout (not a POST, unless told).
    if routed.retry.hedge && body.replayable() && attempts.may_hedge(replayed) {
        let race = super::hedge::Race {
            current,
            listener,
            parts: &parts,
            body: &body,
            protocol,
            response_timeout: routed.response_timeout,
        };
        return race.run(attempts, meters, up, routed.retry).await;
    }
    let attempt_timeout = routed.retry.attempt_timeout(routed.response_timeout);
    let mut fallback: Option<Response<ProxyBody>> = None;
    while let Some(i) = attempts.next_endpoint() {
        let member = &current.snap.members[i];
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
        let copy = || {
            keep.then(|| body.take().map(|b| upstream_request(&parts, parts.headers.clone(), b)))
                .flatten()
        };
        let started = Instant::now();
        up.endpoint = Some(member.spec.addr);
        let outcome = exchange(pool, conn, request, copy, upload.as_deref(), attempt_timeout).await;
        meters.duration.observe(started.elapsed());
        up.attempts = attempts.tries() as u32;
        if let Some(state) = &upload {
            up.bytes_in = up.bytes_in.max(state.bytes());
        }
        match outcome {
            Ok((resp, release)) => {
                let status = resp.status().as_u16();
                let answer = relayed(resp, guard, release, member.spec.addr, config.endpoint_header);
                if !attempts.answered(i, status, facts) {
                    if fallback.is_some() || attempts.tries() > 1 && status >= 500 {
                        up.flags.set(Flags::RETRIES_EXHAUSTED);
                    }
                    return (answer, up);
                }
                fallback = Some(answer);
            }
            Err(failure) => {
                drop(guard);
                // The client's upload broke off: its failure, not the endpoint's.
                match upload.as_ref().map(|u| u.end()) {
                    Some(UploadEnd::TimedOut) => {
                        meters.body_timeouts.inc();
                        return (answer::request_timeout(config.timeouts.request_body), up);
                    }
                    Some(UploadEnd::Failed) => {
                        up.flags.set(Flags::DOWNSTREAM_CLOSED);
                        return (answer::bad_request("the request body broke off"), up);
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
        return (answer, up);
    }
    let end = attempts.exhausted();
    up.attempts = end.tries as u32;
    up.flags.set(end.flags(&current.snap));
    (answer::exhausted(&end, config.error_detail), up)
}

/// One attempt's request: the shaped head of the client's request, with
/// `headers` (a copy, or the originals when no retry can follow) and `body`.
pub(super) fn upstream_request(
    parts: &http::request::Parts,
    headers: http::HeaderMap,
    body: UpBody,
) -> Request<UpBody> {
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
    resp: Response<Incoming>,
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
