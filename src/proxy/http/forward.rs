//! The forward phase of a plain request: the attempt loop over the
//! endpoints' connection pools. Each attempt checks out a connection, sends
//! the shaped request and waits for the response head; what came back is
//! settled by the attempt loop's rules (`proxy::attempt`): passed on, or
//! tried elsewhere. A retried 5xx is passed on if no later attempt does better.

use http::Response;
use tokio::time::Instant;

use super::answer;
use super::body::{ProxyBody, RequestBody};
use super::relay::{Forwarded, Meters, relayed, upstream_request};
use super::route::Routed;
use crate::balance::ActiveGuard;
use crate::proxy::access::{self, Flags};
use crate::proxy::attempt::RequestFacts;
use crate::proxy::service::{Current, ServiceRuntime};
use crate::proxy::upstream::body::UploadEnd;
use crate::proxy::upstream::exchange;
use crate::proxy::upstream::pool::Protocol;

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

/// Runs the attempts of `request` through `listener`'s pools.
//
// An `async move` block, not an `async fn`, and the request used where it was
// captured: an `async fn` keeps its arguments twice, and taking the request
// apart would keep its head and body a third time, in every request in flight.
#[allow(clippy::manual_async_fn)]
pub fn forward<'a>(
    service: &'a ServiceRuntime,
    meters: &'a Meters,
    current: &'a Current,
    listener: usize,
    mut request: Prepared,
    routed: &'a Routed<'_>,
) -> impl Future<Output = Forwarded> + 'a {
    async move {
        let config = &current.config;
        let Prepared {
            parts,
            body,
            protocol,
            key,
        } = &mut request;
        let (protocol, key) = (*protocol, *key);
        let upload = body.upload();
        let mut up = access::Upstream {
            bytes_in: body.buffered_len(),
            ..Default::default()
        };
        let mut attempts = routed.attempts(service, current, key);
        let grpc = super::headers::is_grpc(&parts.headers);
        let replayed = RequestFacts {
            method: Some(&parts.method),
            replayable: body.replayable(),
            grpc,
        };
        // Hedging resends what was sent: only a buffered body, only a request
        // the rules would retry after a timeout (not a POST, unless told).
        if routed.retry.hedge && body.replayable() && attempts.may_hedge(replayed) {
            let race = super::hedge::Race {
                current,
                listener,
                parts,
                body,
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
                grpc,
            };
            let guard = ActiveGuard::new(member.endpoint.clone());
            let conn = match pool.checkout(protocol).await {
                Ok(c) => c,
                Err(failure) => {
                    if attempts.unreached(i, failure, facts) {
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
            let request = upstream_request(parts, headers, attempt_body);
            let copy = || {
                keep.then(|| body.take().map(|b| upstream_request(parts, parts.headers.clone(), b)))
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
                    let grpc = crate::proxy::retry::grpc_status(resp.headers());
                    let answer = relayed(resp, guard, release, member.spec.addr, config.endpoint_header);
                    if !attempts.answered(i, status, grpc, facts) {
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
}
