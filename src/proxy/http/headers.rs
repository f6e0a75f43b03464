//! Header work on the request path: framing and `Host` checks, hop-by-hop
//! stripping, forwarding headers, the endpoint's protocol, and shaping a
//! request for it (origin-form and `Host` for HTTP/1.1, `:authority` and no
//! `Host` for h2).

use http::header::{self, Entry, HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Uri, Version};

use crate::api::config::AppProtocol;
use crate::proxy::client::Downstream;
use crate::proxy::upstream::pool::Protocol;

// Names built at compile time: a `&str` key is parsed and checked on every
// call (`parse_hdr` and `find` were 1% of an h2c request's CPU).
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

/// Rejects framing that proxies and backends could read differently (request
/// smuggling): Content-Length with Transfer-Encoding, repeated or non-chunked
/// Transfer-Encoding, disagreeing Content-Lengths.
pub fn check_framing(headers: &HeaderMap) -> Result<(), &'static str> {
    let mut te = headers.get_all(header::TRANSFER_ENCODING).iter();
    let mut cl = headers.get_all(header::CONTENT_LENGTH).iter();
    let (first_te, first_cl) = (te.next(), cl.next());
    if first_te.is_some() && first_cl.is_some() {
        return Err("Content-Length with Transfer-Encoding");
    }
    if let Some(v) = first_te {
        if te.next().is_some() {
            return Err("repeated Transfer-Encoding");
        }
        if !v.as_bytes().eq_ignore_ascii_case(b"chunked") {
            return Err("unsupported Transfer-Encoding");
        }
    }
    if let Some(first) = first_cl
        && cl.any(|v| v != first)
    {
        return Err("conflicting Content-Length");
    }
    Ok(())
}

/// RFC 9112 3.2: exactly one `Host` (none at all is allowed only for HTTP/1.0
/// and for an absolute-form target, whose authority then stands for it, and
/// replaces `Host` upstream: [`shape_for`]). RFC 9113 8.3.1: an h2 request
/// whose `Host` differs from its `:authority` is malformed (nginx answers 400
/// too).
pub fn check_host<B>(req: &Request<B>) -> Result<(), &'static str> {
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let first = hosts.next();
    if hosts.next().is_some() {
        return Err("more than one Host header");
    }
    if req.version() == Version::HTTP_2
        && let (Some(host), Some(authority)) = (first, req.uri().authority())
        && !host.as_bytes().eq_ignore_ascii_case(authority.as_str().as_bytes())
    {
        return Err("Host disagrees with :authority");
    }
    if first.is_none() && req.version() == Version::HTTP_11 && req.uri().authority().is_none() {
        return Err("HTTP/1.1 request without a Host header");
    }
    Ok(())
}

/// Whether a request asks to switch protocols (WebSocket and friends). An
/// upgrade to h2c is not one: the proxy already speaks h2c to whoever asks
/// with prior knowledge, so the offer is dropped and the request forwarded.
pub fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.version() == Version::HTTP_11
        && req
            .headers()
            .get_all(header::UPGRADE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| !t.trim().eq_ignore_ascii_case("h2c"))
        && connection_has(req.headers(), "upgrade")
}

fn connection_has(headers: &HeaderMap, token: &str) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Whether the request is gRPC (`content-type: application/grpc*`), which
/// needs HTTP/2 end to end.
pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// The protocol to speak to the endpoints: the listener's `appProtocol`, else
/// HTTP/1.1 for everything but gRPC, which needs HTTP/2.
pub fn upstream_protocol(app: Option<AppProtocol>, headers: &HeaderMap) -> Protocol {
    match app {
        Some(AppProtocol::Http1) => Protocol::Http1,
        Some(AppProtocol::H2c) => Protocol::H2c,
        None if is_grpc(headers) => Protocol::H2c,
        None => Protocol::Http1,
    }
}

/// Removes hop-by-hop headers (RFC 9110 7.6.1) and those `Connection` names.
/// Upgrades keep `Connection: upgrade` and `Upgrade`, and `TE: trailers` is
/// kept because gRPC requires it end to end.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, strip_upgrade: bool) {
    // Most heads carry none (an h2 head may not): one pass over the names
    // costs less than the dozen hashed lookups below (h2c A/B in the notes).
    if strip_upgrade && !headers.keys().any(is_hop_by_hop) {
        return;
    }
    let names_headers = headers
        .get_all(header::CONNECTION)
        .iter()
        .any(|v| !is_standard_connection_token(v.as_bytes()));
    if names_headers {
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
            .filter(|n| strip_upgrade || *n != header::UPGRADE)
            .collect();
        for name in named {
            headers.remove(name);
        }
    }
    let trailers = headers.get_all(header::TE).iter().any(|v| {
        v.to_str()
            .is_ok_and(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case("trailers")))
    });
    for name in [
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::PROXY_AUTHENTICATE,
        header::PROXY_AUTHORIZATION,
    ] {
        headers.remove(name);
    }
    headers.remove("keep-alive");
    headers.remove("proxy-connection");
    // Only meaningful with `Upgrade: h2c`, which never goes upstream.
    headers.remove("http2-settings");
    if strip_upgrade {
        headers.remove(header::CONNECTION);
        headers.remove(header::UPGRADE);
    } else {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    if trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// `keep-alive` and `close` name no header to strip: the common case needs no
/// list built.
fn is_standard_connection_token(v: &[u8]) -> bool {
    v.eq_ignore_ascii_case(b"keep-alive") || v.eq_ignore_ascii_case(b"close")
}

/// Appends the client to `X-Forwarded-For` and `Forwarded`, and sets
/// `X-Forwarded-Proto` to what the client spoke to us, keeping the client's
/// own only when the listener trusts it (`trustForwardedHeaders`: an outer
/// proxy that terminated TLS says `https`; anyone else could lie).
pub fn add_forwarding(headers: &mut HeaderMap, client: &Downstream, trust: bool) {
    // Room for the three at once: h2 sizes a request's map for the fields
    // its client sent (often one, `user-agent`), and growing it an entry at
    // a time rehashed it twice per request (h2 0.4.21: +2% instructions).
    headers.reserve(3);
    append_list(headers, X_FORWARDED_FOR, client.ip_header());
    // One lookup per header (entries): these three were ~1.7% of an h2c
    // request's instructions with a lookup to read and another to write.
    match headers.entry(X_FORWARDED_PROTO) {
        Entry::Occupied(_) if trust => {}
        Entry::Occupied(mut e) => {
            e.insert(HeaderValue::from_static(client.scheme()));
        }
        Entry::Vacant(e) => {
            e.insert(HeaderValue::from_static(client.scheme()));
        }
    }
    append_list(headers, header::FORWARDED, client.forwarded_header());
}

/// Whether `name` is a header [`strip_hop_by_hop`] takes out.
fn is_hop_by_hop(name: &HeaderName) -> bool {
    *name == header::CONNECTION
        || *name == header::TE
        || *name == header::TRAILER
        || *name == header::TRANSFER_ENCODING
        || *name == header::PROXY_AUTHENTICATE
        || *name == header::PROXY_AUTHORIZATION
        || *name == header::UPGRADE
        || matches!(name.as_str(), "keep-alive" | "proxy-connection" | "http2-settings")
}

/// Sets `name` to `value`, or appends `, value` to what an outer proxy wrote
/// (every line of it, joined: RFC 9110 5.3).
fn append_list(headers: &mut HeaderMap, name: HeaderName, value: &HeaderValue) {
    match headers.entry(name) {
        Entry::Vacant(e) => {
            e.insert(value.clone());
        }
        Entry::Occupied(mut e) => {
            let mut joined = Vec::new();
            for prior in e.iter() {
                joined.extend_from_slice(prior.as_bytes());
                joined.extend_from_slice(b", ");
            }
            joined.extend_from_slice(value.as_bytes());
            if let Ok(v) = HeaderValue::from_bytes(&joined) {
                e.insert(v);
            }
        }
    }
}

/// Shapes the request line and `Host` for the upstream protocol, whatever the
/// client spoke: HTTP/1.1 gets origin-form and a `Host` (from `:authority` when
/// the client spoke h2); h2 gets `:authority` (from `Host` when the client spoke
/// HTTP/1.1) and no `Host`, which h2 servers such as nginx reject as a
/// duplicate; an HTTP/1.0 client that named no host is sent as `localhost`.
pub fn shape_for(parts: &mut http::request::Parts, protocol: Protocol) {
    match protocol {
        Protocol::Http1 => {
            // An absolute-form target's authority replaces Host (RFC 9112
            // 3.2.2), and an h2 client's :authority becomes it.
            if let Some(v) = parts
                .uri
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
            {
                parts.headers.insert(header::HOST, v);
            }
            if parts.uri.scheme().is_some() || parts.uri.authority().is_some() {
                parts.uri = Uri::from(origin_path(&parts.uri));
            }
            parts.version = Version::HTTP_11;
        }
        Protocol::H2c => {
            parts.version = Version::HTTP_2;
            // An h2c client's target is already in the form h2 sends: kept,
            // rather than taken apart and validated again.
            if parts.uri.scheme() == Some(&Scheme::HTTP)
                && parts.uri.authority().is_some()
                && parts.uri.path_and_query().is_some_and(|p| p.as_str().starts_with('/'))
            {
                parts.headers.remove(header::HOST);
                return;
            }
            let authority = match parts.uri.authority() {
                Some(a) => Some(a.clone()),
                None => parts
                    .headers
                    .get(header::HOST)
                    .and_then(|h| Authority::try_from(h.as_bytes()).ok()),
            };
            let authority = authority.unwrap_or_else(|| Authority::from_static("localhost"));
            parts.headers.remove(header::HOST);
            let mut uri = http::uri::Parts::default();
            uri.scheme = Some(Scheme::HTTP);
            uri.authority = Some(authority);
            uri.path_and_query = Some(origin_path(&parts.uri));
            if let Ok(u) = Uri::from_parts(uri) {
                parts.uri = u;
            }
        }
    }
}

/// The target's path in origin form. Computed only where the target is
/// rebuilt: the common h2c and HTTP/1.1 cases keep the target they came with.
fn origin_path(uri: &Uri) -> PathAndQuery {
    match uri.path_and_query() {
        // `http://a?q` has an empty path: origin-form sends `/?q` (RFC 9112 3.2.1).
        Some(p) if !p.as_str().starts_with('/') && p.as_str() != "*" => {
            PathAndQuery::try_from(format!("/{}", p.as_str())).unwrap_or_else(|_| PathAndQuery::from_static("/"))
        }
        Some(p) => p.clone(),
        None => PathAndQuery::from_static("/"),
    }
}

/// The `Date` of an answer that has none (RFC 9110 6.6.1: an origin with a
/// clock sends one; hyper adds it too), rendered once a second per thread.
pub fn date() -> HeaderValue {
    use std::cell::RefCell;
    use std::time::{SystemTime, UNIX_EPOCH};
    thread_local! {
        static DATE: RefCell<(u64, HeaderValue)> = const { RefCell::new((u64::MAX, HeaderValue::from_static(""))) };
    }
    let now = SystemTime::now();
    let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    DATE.with(|d| {
        let mut d = d.borrow_mut();
        if d.0 != secs
            && let Ok(v) = HeaderValue::from_str(&httpdate::fmt_http_date(now))
        {
            *d = (secs, v);
        }
        d.1.clone()
    })
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::sync::Arc;

    use super::*;
    use crate::proxy::client::conn::ConnState;
    use crate::proxy::tasks::Tasks;

    fn downstream(addr: &str) -> Downstream {
        let peer: SocketAddr = addr.parse().unwrap();
        Downstream::new(peer, Arc::new(ConnState::new(peer)), Tasks::new())
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn ambiguous_framing_is_rejected() {
        assert!(check_framing(&headers(&[("content-length", "5"), ("transfer-encoding", "chunked")])).is_err());
        assert!(
            check_framing(&headers(&[
                ("transfer-encoding", "chunked"),
                ("transfer-encoding", "chunked")
            ]))
            .is_err()
        );
        assert!(check_framing(&headers(&[("transfer-encoding", "gzip")])).is_err());
        assert!(check_framing(&headers(&[("content-length", "5"), ("content-length", "6")])).is_err());
        assert!(check_framing(&headers(&[("content-length", "5"), ("content-length", "5")])).is_ok());
        assert!(check_framing(&headers(&[("content-length", "5")])).is_ok());
        assert!(check_framing(&headers(&[("transfer-encoding", "chunked")])).is_ok());
    }

    #[test]
    fn hop_by_hop_headers_go_but_te_trailers_stays() {
        let mut h = headers(&[
            ("connection", "keep-alive, x-private"),
            ("keep-alive", "timeout=5"),
            ("x-private", "1"),
            ("te", "trailers"),
            ("proxy-authorization", "secret"),
            ("x-kept", "yes"),
        ]);
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h.len(), 2, "{h:?}");
        assert_eq!(h["te"], "trailers");
        assert_eq!(h["x-kept"], "yes");
        let mut h = headers(&[("connection", "x-private"), ("x-private", "1")]);
        strip_hop_by_hop(&mut h, true);
        assert!(h.is_empty(), "a single named header goes too: {h:?}");
        let mut h = headers(&[("connection", "keep-alive"), ("x-kept", "1")]);
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h.len(), 1);
        // Each alone, past the check that skips heads without any.
        for name in [
            "connection",
            "te",
            "trailer",
            "transfer-encoding",
            "proxy-authenticate",
            "proxy-authorization",
            "upgrade",
            "keep-alive",
            "proxy-connection",
            "http2-settings",
        ] {
            let mut h = headers(&[(name, "gzip"), ("x-kept", "1")]);
            strip_hop_by_hop(&mut h, true);
            assert_eq!(h.keys().collect::<Vec<_>>(), ["x-kept"], "{name}");
        }
    }

    #[test]
    fn forwarding_headers_append_the_client() {
        let mut h = headers(&[("x-forwarded-for", "1.2.3.4"), ("x-forwarded-proto", "https")]);
        add_forwarding(&mut h, &downstream("10.0.0.9:5555"), false);
        assert_eq!(h["x-forwarded-for"], "1.2.3.4, 10.0.0.9");
        assert_eq!(h["x-forwarded-proto"], "http", "an untrusted client cannot claim https");
        assert_eq!(h["forwarded"], "for=10.0.0.9;proto=http");
        // Two lines from outer proxies are one list (RFC 9110 5.3): both kept.
        let mut h = headers(&[("x-forwarded-for", "1.2.3.4"), ("x-forwarded-for", "5.6.7.8")]);
        add_forwarding(&mut h, &downstream("10.0.0.9:5555"), false);
        let all: Vec<_> = h.get_all("x-forwarded-for").iter().collect();
        assert_eq!(all, ["1.2.3.4, 5.6.7.8, 10.0.0.9"]);
        let mut h = headers(&[("x-forwarded-proto", "https")]);
        add_forwarding(&mut h, &downstream("10.0.0.9:5555"), true);
        assert_eq!(
            h["x-forwarded-proto"], "https",
            "a trusted load balancer's word is kept"
        );
        let mut h = HeaderMap::new();
        add_forwarding(&mut h, &downstream("[::1]:80"), false);
        assert_eq!(h["forwarded"], "for=\"[::1]\";proto=http");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-for"], "::1");

        // Over a TLS listener the scheme is https, in both headers.
        let tls = crate::proxy::tls::Session {
            version: "TLSv1.3",
            sni: None,
        };
        let mut h = headers(&[("x-forwarded-proto", "http")]);
        add_forwarding(&mut h, &downstream("10.0.0.9:5555").with_tls(Some(tls)), false);
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["forwarded"], "for=10.0.0.9;proto=https");
    }

    #[test]
    fn an_h2c_upgrade_offer_is_dropped_not_tunnelled() {
        let req = |upgrade: &str| {
            Request::get("/")
                .header("connection", "Upgrade, HTTP2-Settings")
                .header("upgrade", upgrade)
                .header("http2-settings", "AAMAAABkAAQAAP__")
                .body(())
                .unwrap()
        };
        assert!(!is_upgrade(&req("h2c")));
        assert!(is_upgrade(&req("websocket")));
        let mut h = req("h2c").headers().clone();
        strip_hop_by_hop(&mut h, true);
        assert!(h.is_empty(), "{h:?}");
    }

    fn request(version: Version, uri: &str, host: Option<&str>) -> http::request::Parts {
        let mut b = Request::builder().version(version).uri(uri);
        if let Some(h) = host {
            b = b.header("host", h);
        }
        b.body(()).unwrap().into_parts().0
    }

    #[test]
    fn an_h2_client_reaches_an_http1_endpoint_with_host_from_its_authority() {
        let mut p = request(Version::HTTP_2, "http://shop.example:8080/a?b=1", None);
        shape_for(&mut p, Protocol::Http1);
        assert_eq!(p.uri, "/a?b=1");
        assert_eq!(p.headers["host"], "shop.example:8080");
        assert_eq!(p.version, Version::HTTP_11);
    }

    #[test]
    fn an_http1_client_reaches_an_h2_endpoint_with_its_host_as_authority_and_no_host() {
        let mut p = request(Version::HTTP_11, "/a?b=1", Some("shop.example"));
        shape_for(&mut p, Protocol::H2c);
        assert_eq!(p.uri, "http://shop.example/a?b=1");
        assert!(!p.headers.contains_key("host"), "no Host beside :authority");
        assert_eq!(p.version, Version::HTTP_2);
        let mut p = request(Version::HTTP_2, "http://grpc.example/svc/Method", None);
        shape_for(&mut p, Protocol::H2c);
        assert_eq!(
            p.uri.authority().unwrap(),
            "grpc.example",
            "the client's authority is kept"
        );
        // Kept as it came (the h2c client's common case), its Host still dropped.
        let mut p = request(Version::HTTP_2, "http://grpc.example/svc/Method", Some("grpc.example"));
        shape_for(&mut p, Protocol::H2c);
        assert_eq!(p.uri, "http://grpc.example/svc/Method");
        assert!(!p.headers.contains_key("host"), "no Host beside :authority");
        assert_eq!(p.version, Version::HTTP_2);
        // A TLS client's https target goes to an h2c endpoint as http.
        let mut p = request(Version::HTTP_2, "https://shop.example/a", None);
        shape_for(&mut p, Protocol::H2c);
        assert_eq!(p.uri, "http://shop.example/a");
    }

    #[test]
    fn grpc_is_recognised_by_content_type() {
        assert!(is_grpc(&headers(&[("content-type", "application/grpc+proto")])));
        assert!(!is_grpc(&headers(&[("content-type", "application/json")])));
    }

    #[test]
    fn the_upstream_protocol_is_the_listeners_not_the_clients() {
        let grpc = headers(&[("content-type", "application/grpc")]);
        let plain = HeaderMap::new();
        assert_eq!(upstream_protocol(None, &plain), Protocol::Http1);
        assert_eq!(upstream_protocol(None, &grpc), Protocol::H2c, "gRPC needs HTTP/2");
        assert_eq!(upstream_protocol(Some(AppProtocol::H2c), &plain), Protocol::H2c);
        assert_eq!(upstream_protocol(Some(AppProtocol::Http1), &grpc), Protocol::Http1);
    }
}
