//! The proxy's own answers: 400 for bad framing, 502/503/504 when no endpoint
//! gave a usable answer, with a one-line reason (and, behind
//! `debug.errorDetail`, every endpoint tried and its error).

use std::fmt::Write;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Response, StatusCode};

use super::attempt::Exhausted;
use super::body::{ProxyBody, full};
use super::retry::{Failure, NoRetry};

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

/// The answer when attempts ran out: 503 when no endpoint could be picked, 504
/// when the last failure was a timeout, else 502. `detail` lists every failure.
pub fn exhausted(end: &Exhausted, detail: bool) -> Response<ProxyBody> {
    let tries = end.tries;
    let (status, mut text) = match &end.last {
        None => (StatusCode::SERVICE_UNAVAILABLE, "no endpoint available".to_string()),
        Some((_, Failure::Timeout)) => (
            StatusCode::GATEWAY_TIMEOUT,
            format!("upstream timed out ({tries} {})", tries_word(tries)),
        ),
        Some((_, f)) => (
            StatusCode::BAD_GATEWAY,
            format!(
                "no endpoint answered ({tries} {}; last: {})",
                tries_word(tries),
                failure_text(f)
            ),
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
            let _ = writeln!(body, "  {addr}: {}", failure_text(e));
        }
    }
    plain(status, body)
}

fn tries_word(n: usize) -> &'static str {
    if n == 1 { "try" } else { "tries" }
}

/// A failure as one line of text.
pub fn failure_text(f: &Failure) -> String {
    match f {
        Failure::Connect(e) => format!("connect: {e}"),
        Failure::Timeout => "timeout".into(),
        Failure::Error(e) => e.clone(),
        Failure::InvalidHeader(e) => format!("invalid response header: {e}"),
        Failure::Status(s) => format!("status {s}"),
    }
}
