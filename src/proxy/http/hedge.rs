//! Hedged attempts (`retry.hedge`, Envoy's `hedge_on_per_try_timeout`): an
//! attempt that has not answered within `retry.perTryTimeout` is left
//! running and another endpoint is asked too; the first answer to pass the
//! retry rules wins and the others are dropped (cancelled mid-request, their
//! connections closed). The late attempt counts as a timeout for passive
//! health, as it would without hedging. Failures in the race are settled as
//! in the plain loop, so an endpoint that fails fast is retried at once
//! rather than at the next tick.

use std::pin::Pin;

use futures::stream::{FuturesUnordered, StreamExt};
use http::Response;
use tokio::time::Instant;

use super::answer;
use super::body::{ProxyBody, RequestBody};
use super::relay::{Forwarded, Meters, relayed, upstream_request};
use crate::api::policy::RetryPolicy;
use crate::balance::ActiveGuard;
use crate::proxy::access::{self, Flags};
use crate::proxy::attempt::{Attempts, RequestFacts};
use crate::proxy::retry::Failure;
use crate::proxy::service::Current;
use crate::proxy::upstream::pool::{Protocol, Release};
use crate::proxy::upstream::{EndpointBody, exchange};

/// What one racing attempt brings back: its endpoint, its count on that
/// endpoint, when it started, and the response head or why there is none.
type Finished = (
    usize,
    ActiveGuard,
    Instant,
    Result<(Response<EndpointBody>, Release), Failure>,
);

type Racer<'a> = Pin<Box<dyn std::future::Future<Output = Finished> + Send + 'a>>;

/// A request whose body is buffered, ready to be sent to several endpoints.
pub struct Race<'a> {
    /// The snapshot and pools the attempts use.
    pub current: &'a Current,
    /// The listener whose pools serve it.
    pub listener: usize,
    /// The shaped request head.
    pub parts: &'a http::request::Parts,
    /// The buffered body: each attempt sends a copy.
    pub body: &'a RequestBody,
    /// HTTP/1.1 or h2c to the endpoints.
    pub protocol: Protocol,
    /// Each attempt's own limit for its response head.
    pub response_timeout: std::time::Duration,
}

impl<'a> Race<'a> {
    /// Runs the race to an answer, or to the attempts' end.
    pub async fn run(
        self,
        mut attempts: Attempts<'_>,
        meters: &Meters,
        mut up: access::Upstream,
        retry: &RetryPolicy,
    ) -> Forwarded {
        let per_try = retry
            .per_try_timeout
            .expect("hedging is validated to have a per-try timeout");
        let config = &self.current.config;
        let facts = RequestFacts {
            method: Some(&self.parts.method),
            replayable: true,
            grpc: super::headers::is_grpc(&self.parts.headers),
        };
        let mut racing: FuturesUnordered<Racer<'_>> = FuturesUnordered::new();
        let mut fallback: Option<Response<ProxyBody>> = None;
        let mut may_hedge = true;
        let mut launch = true;
        let mut next_hedge = Instant::now() + per_try;
        // The attempt the next hedge tick finds late.
        let mut newest = None;
        loop {
            if launch {
                match attempts.next_endpoint() {
                    Some(i) => {
                        racing.push(self.attempt(i));
                        next_hedge = Instant::now() + per_try;
                        newest = Some(i);
                    }
                    // No endpoint left to ask: the ones racing are all there is.
                    None => may_hedge = false,
                }
            }
            launch = false;
            if racing.is_empty() {
                break;
            }
            tokio::select! {
                Some((i, guard, started, outcome)) = racing.next() => {
                    meters.duration.observe(started.elapsed());
                    up.attempts = attempts.tries() as u32;
                    let addr = self.current.snap.members[i].spec.addr;
                    match outcome {
                        Ok((resp, release)) => {
                            let status = resp.status().as_u16();
                            let grpc = crate::proxy::retry::grpc_status(resp.headers());
                            let answer = relayed(resp, guard, release, addr, config.endpoint_header);
                            if !attempts.answered(i, status, grpc, facts) {
                                up.endpoint = Some(addr);
                                if fallback.is_some() || attempts.tries() > 1 && status >= 500 {
                                    up.flags.set(Flags::RETRIES_EXHAUSTED);
                                }
                                return (answer, up);
                            }
                            fallback = Some(answer);
                            launch = true;
                        }
                        Err(failure) => {
                            drop(guard);
                            up.endpoint = Some(addr);
                            launch = attempts.failed(i, failure, facts);
                        }
                    }
                }
                _ = tokio::time::sleep_until(next_hedge), if may_hedge => {
                    next_hedge = Instant::now() + per_try;
                    if let Some(i) = newest.take() {
                        attempts.late(i);
                    }
                    may_hedge = attempts.hedge();
                    if may_hedge {
                        up.flags.set(Flags::HEDGED);
                        launch = true;
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
        up.flags.set(end.flags(&self.current.snap));
        (answer::exhausted(&end, config.error_detail), up)
    }

    /// One attempt on member `i`, owning its request (and a spare copy for
    /// the stale keep-alive resend), so that several can be in flight.
    fn attempt(&self, i: usize) -> Racer<'a> {
        let current = self.current;
        let pool = current.pool(self.listener, i);
        let guard = ActiveGuard::new(current.snap.members[i].endpoint.clone());
        let copy = |body: Option<_>| body.map(|b| upstream_request(self.parts, self.parts.headers.clone(), b));
        let request = copy(self.body.replay());
        let spare = copy(self.body.replay());
        let (protocol, timeout) = (self.protocol, self.response_timeout);
        Box::pin(async move {
            let started = Instant::now();
            let Some(request) = request else {
                return (
                    i,
                    guard,
                    started,
                    Err(Failure::Error("the request body is gone".into())),
                );
            };
            let outcome = match pool.checkout(protocol).await {
                Ok(conn) => exchange(pool, conn, request, || spare, None, timeout).await,
                Err(failure) => Err(failure),
            };
            (i, guard, started, outcome)
        })
    }
}
