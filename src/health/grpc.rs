//! The gRPC health check: `grpc.health.v1.Health/Check` over h2c, the call
//! Kubernetes' `grpc:` probes, Envoy and grpc-health-probe make. The two
//! messages are one field each, so they are encoded here by hand rather than
//! through generated code.

use std::net::SocketAddr;

use bytes::{BufMut, Bytes, BytesMut};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::{TokioExecutor, TokioIo};

use crate::api::config::GrpcProbe;
use crate::tls::upstream::MaybeTls;

/// The most of an answer read: a health response is a few bytes.
const MAX_ANSWER: usize = 16 * 1024;

/// Asks the endpoint's health service about `check.service` over `stream`;
/// passes on `SERVING` alone, else says why (`grpc: ...`).
pub(super) async fn grpc_probe(stream: MaybeTls, addr: SocketAddr, check: &GrpcProbe) -> Result<(), String> {
    let failed = |what: String| format!("grpc: {what}");
    let scheme = match stream {
        MaybeTls::Plain(_) => "http",
        MaybeTls::Tls(_) => "https",
    };
    let (mut sender, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .handshake::<_, Full<Bytes>>(TokioIo::new(stream))
        .await
        .map_err(|e| failed(format!("h2 handshake: {e}")))?;
    // The connection is driven beside the call and dropped with the probe.
    let driver = tokio::spawn(connection);
    let _abort = AbortOnDrop(driver);

    let authority = match &check.authority {
        Some(a) => a.clone(),
        None => addr.to_string(),
    };
    let request = http::Request::post(format!("{scheme}://{authority}/grpc.health.v1.Health/Check"))
        .version(http::Version::HTTP_2)
        .header(http::header::CONTENT_TYPE, "application/grpc")
        .header(http::header::TE, "trailers")
        .header(http::header::USER_AGENT, "balanced-health-check")
        .body(Full::new(request_message(&check.service)))
        .map_err(|e| failed(format!("request: {e}")))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| failed(format!("call: {e}")))?;
    let (head, body) = response.into_parts();
    if head.status != http::StatusCode::OK {
        return Err(failed(format!("http status {}", head.status.as_u16())));
    }
    // A trailers-only answer (an error) carries grpc-status in the headers.
    if let Some(status) = head.headers.get("grpc-status") {
        check_status(status, head.headers.get("grpc-message"))?;
    }
    let collected = Limited::new(body, MAX_ANSWER)
        .collect()
        .await
        .map_err(|e| failed(format!("reading the answer: {e}")))?;
    let trailers = collected.trailers().cloned();
    let message = collected.to_bytes();
    match trailers.as_ref().and_then(|t| t.get("grpc-status")) {
        Some(status) => check_status(status, trailers.as_ref().and_then(|t| t.get("grpc-message")))?,
        None if head.headers.get("grpc-status").is_none() => {
            return Err(failed("the answer ended without a grpc-status".into()));
        }
        None => {}
    }
    let status = serving_status(&message).map_err(|e| failed(e.into()))?;
    if status == SERVING {
        return Ok(());
    }
    let about = if check.service.is_empty() {
        "the server".to_string()
    } else {
        format!("service {:?}", check.service)
    };
    Err(failed(format!("{about} is {}", serving_status_name(status))))
}

struct AbortOnDrop(tokio::task::JoinHandle<Result<(), hyper::Error>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A length-prefixed `HealthCheckRequest { string service = 1; }`.
fn request_message(service: &str) -> Bytes {
    let mut field = BytesMut::with_capacity(service.len() + 6);
    if !service.is_empty() {
        field.put_u8(0x0a); // field 1, length-delimited
        put_varint(&mut field, service.len() as u64);
        field.put_slice(service.as_bytes());
    }
    let mut framed = BytesMut::with_capacity(field.len() + 5);
    framed.put_u8(0); // not compressed
    framed.put_u32(field.len() as u32);
    framed.put_slice(&field);
    framed.freeze()
}

fn put_varint(buf: &mut BytesMut, mut v: u64) {
    while v >= 0x80 {
        buf.put_u8((v as u8) | 0x80);
        v >>= 7;
    }
    buf.put_u8(v as u8);
}

/// `OK` passes; any other grpc-status fails with its name and message.
fn check_status(status: &http::HeaderValue, message: Option<&http::HeaderValue>) -> Result<(), String> {
    let code = status.to_str().ok().and_then(|s| s.parse::<u32>().ok());
    if code == Some(0) {
        return Ok(());
    }
    let name = match code {
        Some(c) => status_code_name(c).map_or_else(|| c.to_string(), str::to_string),
        None => format!("{:?}", status.as_bytes().escape_ascii().to_string()),
    };
    let detail = message
        .map(|m| {
            String::from_utf8_lossy(m.as_bytes())
                .chars()
                .take(128)
                .collect::<String>()
        })
        .filter(|m| !m.is_empty())
        .map(|m| format!(": {m}"))
        .unwrap_or_default();
    Err(format!("grpc: status {name}{detail}"))
}

const SERVING: u64 = 1;

/// The `status` of a length-prefixed `HealthCheckResponse { ServingStatus status = 1; }`;
/// an absent field is proto3's default, `UNKNOWN`.
fn serving_status(message: &[u8]) -> Result<u64, &'static str> {
    let (&flag, rest) = message
        .split_first()
        .ok_or("an empty answer, not a HealthCheckResponse")?;
    if flag != 0 {
        return Err("a compressed answer (none was asked for)");
    }
    let len = rest.get(..4).ok_or("a truncated message header")?;
    let len = u32::from_be_bytes(len.try_into().expect("four bytes")) as usize;
    let mut fields = rest[4..].get(..len).ok_or("a message shorter than its length")?;
    let mut status = 0;
    while !fields.is_empty() {
        let key = take_varint(&mut fields)?;
        match (key >> 3, key & 7) {
            (1, 0) => status = take_varint(&mut fields)?,
            (_, 0) => {
                take_varint(&mut fields)?;
            }
            (_, 1) => fields = fields.get(8..).ok_or("a truncated field")?,
            (_, 2) => {
                let n = take_varint(&mut fields)? as usize;
                fields = fields.get(n..).ok_or("a truncated field")?;
            }
            (_, 5) => fields = fields.get(4..).ok_or("a truncated field")?,
            _ => return Err("not a HealthCheckResponse"),
        }
    }
    Ok(status)
}

fn take_varint(buf: &mut &[u8]) -> Result<u64, &'static str> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let (&b, rest) = buf.split_first().ok_or("a truncated varint")?;
        *buf = rest;
        value |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err("a varint longer than ten bytes")
}

fn serving_status_name(status: u64) -> String {
    match status {
        0 => "UNKNOWN".into(),
        1 => "SERVING".into(),
        2 => "NOT_SERVING".into(),
        3 => "SERVICE_UNKNOWN".into(),
        other => format!("status {other}"),
    }
}

fn status_code_name(code: u32) -> Option<&'static str> {
    const NAMES: [&str; 17] = [
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    ];
    NAMES.get(code as usize).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_request_carries_the_service_name() {
        assert_eq!(&request_message("")[..], &[0, 0, 0, 0, 0]);
        assert_eq!(&request_message("db")[..], &[0, 0, 0, 0, 4, 0x0a, 2, b'd', b'b']);
    }

    #[test]
    fn answers_decode_to_their_serving_status() {
        assert_eq!(serving_status(&[0, 0, 0, 0, 2, 0x08, 1]), Ok(1));
        assert_eq!(serving_status(&[0, 0, 0, 0, 2, 0x08, 2]), Ok(2));
        // proto3 leaves a default out: an empty message is UNKNOWN.
        assert_eq!(serving_status(&[0, 0, 0, 0, 0]), Ok(0));
        // Fields it does not know are skipped.
        assert_eq!(serving_status(&[0, 0, 0, 0, 6, 0x12, 2, b'h', b'i', 0x08, 1]), Ok(1));
        assert!(serving_status(&[]).is_err());
        assert!(serving_status(&[1, 0, 0, 0, 2, 0x08, 1]).is_err());
        assert!(serving_status(&[0, 0, 0, 0, 9, 0x08]).is_err());
        assert!(serving_status(&[0, 0, 0, 0, 1, 0x08]).is_err());
    }

    #[test]
    fn statuses_are_named() {
        let v = http::HeaderValue::from_static;
        assert!(check_status(&v("0"), None).is_ok());
        assert_eq!(
            check_status(&v("12"), Some(&v("unknown service"))).unwrap_err(),
            "grpc: status UNIMPLEMENTED: unknown service"
        );
        assert_eq!(check_status(&v("99"), None).unwrap_err(), "grpc: status 99");
    }
}
