//! The proxy's own answers: 400 for bad framing, 502/503/504 when no endpoint
//! gave a usable answer, with a one-line reason (and, behind
//! `debug.errorDetail`, every endpoint tried and its error).

use std::fmt::Write;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Response, StatusCode};

use super::body::{ProxyBody, full};
use crate::api::config::RateLimit;
use crate::proxy::attempt::Exhausted;
use crate::proxy::gate::Overflow;
use crate::proxy::ratelimit::{Limited, policy_header, remaining_header, retry_secs};
use crate::proxy::retry::{Failure, NoRetry};

/// A text/plain answer.
pub fn plain(status: StatusCode, body: impl Into<Bytes>) -> Response<ProxyBody> {
    let mut resp = Response::new(full(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// 400 with a reason.
pub fn bad_request(why: &str) -> Response<ProxyBody> {
    plain(StatusCode::BAD_REQUEST, format!("400 Bad Request: {why}\n"))
}

/// 408 after the client paused its body longer than `timeouts.requestBody`;
/// the connection closes after it (RFC 9110 15.5.9).
pub fn request_timeout(after: std::time::Duration) -> Response<ProxyBody> {
    let mut resp = plain(
        StatusCode::REQUEST_TIMEOUT,
        format!("408 Request Timeout: no request body bytes for {after:?} (spec.timeouts.requestBody)\n"),
    );
    resp.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    resp
}

/// 429 for a request over a rate limit, with `Retry-After` and the IETF
/// `RateLimit-Policy` / `RateLimit` headers.
pub fn rate_limited(limited: Limited, policy: &RateLimit) -> Response<ProxyBody> {
    let mut resp = plain(
        StatusCode::TOO_MANY_REQUESTS,
        format!(
            "429 Too Many Requests: over the rate limit ({} per {:?} on this proxy, burst {})\n",
            policy.requests, policy.per, policy.burst
        ),
    );
    let headers = resp.headers_mut();
    let retry = retry_secs(limited.retry_after);
    headers.insert(header::RETRY_AFTER, HeaderValue::from(retry));
    for (name, value) in [
        ("ratelimit-policy", policy_header(policy)),
        ("ratelimit", remaining_header(limited.retry_after)),
    ] {
        if let Ok(v) = HeaderValue::from_str(&value) {
            headers.insert(name, v);
        }
    }
    resp
}

/// 503 for a request refused by overload protection (`spec.limits`).
pub fn overflow(why: Overflow, max: usize, max_pending: usize) -> Response<ProxyBody> {
    let text = match why {
        Overflow::QueueFull => format!(
            "503 Service Unavailable: overloaded: {max} requests in flight (spec.limits.maxRequests) and {max_pending} waiting (spec.limits.maxPendingRequests)\n"
        ),
        Overflow::Waited(d) => format!(
            "503 Service Unavailable: overloaded: no request slot freed within {d:?} (spec.limits.maxRequests {max}; waits up to timeouts.connect)\n"
        ),
    };
    plain(StatusCode::SERVICE_UNAVAILABLE, text)
}

/// The answer when attempts ran out: 503 when no endpoint could be picked, 504
/// when the last failure was a timeout, else 502. `detail` lists every failure.
pub fn exhausted(end: &Exhausted, detail: bool) -> Response<ProxyBody> {
    let tries = end.tries;
    let (status, mut text) = match &end.last {
        None => (StatusCode::SERVICE_UNAVAILABLE, "no endpoint available".to_string()),
        Some((_, Failure::Local(e))) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the proxy cannot open a connection: {e} (a limit of the proxy's own, not the endpoint's)"),
        ),
        Some((_, Failure::Timeout)) => (
            StatusCode::GATEWAY_TIMEOUT,
            format!("upstream timed out ({tries} {})", tries_word(tries)),
        ),
        Some((_, f)) => (
            StatusCode::BAD_GATEWAY,
            format!("no endpoint answered ({tries} {}; last: {})", tries_word(tries), f),
        ),
    };
    if end.refused == Some(NoRetry::BudgetExhausted) {
        text.push_str("; retry budget exhausted (spec.retry.budget)");
    }
    let mut body = format!(
        "{} {}: {text}\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or("")
    );
    if detail {
        for (addr, e) in &end.errors {
            let _ = writeln!(body, "  {addr}: {}", e);
        }
    }
    plain(status, body)
}

fn tries_word(n: usize) -> &'static str {
    if n == 1 { "try" } else { "tries" }
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;

    use super::*;

    async fn text(resp: Response<ProxyBody>) -> (u16, String) {
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    #[tokio::test]
    async fn the_answer_names_the_last_failure_and_a_spent_budget() {
        let addr: std::net::SocketAddr = "10.0.0.7:8080".parse().unwrap();
        let end = Exhausted {
            last: Some((addr, Failure::Timeout)),
            tries: 1,
            errors: vec![(addr, Failure::Timeout)],
            refused: Some(NoRetry::BudgetExhausted),
        };
        let (status, body) = text(exhausted(&end, false)).await;
        assert_eq!(status, 504);
        assert_eq!(
            body,
            "504 Gateway Timeout: upstream timed out (1 try); retry budget exhausted (spec.retry.budget)\n"
        );
        assert!(!body.contains("10.0.0.7"), "addresses only with debug.errorDetail");
        let (_, detailed) = text(exhausted(&end, true)).await;
        assert!(detailed.ends_with("  10.0.0.7:8080: timeout\n"), "{detailed}");
        let none = Exhausted {
            last: None,
            tries: 0,
            errors: vec![],
            refused: None,
        };
        assert_eq!(text(exhausted(&none, false)).await.0, 503);
    }
}
