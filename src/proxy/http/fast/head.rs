//! The fast path's heads and bodies on the wire: a client's request head
//! read with httparse into the same `http::Request` hyper builds (and only
//! when nothing in it needs hyper), the request written for the endpoint,
//! the endpoint's response head written on for the client with its
//! hop-by-hop headers out, and a chunked body followed to its end so it can
//! be relayed as it came, in whole reads.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Uri, Version};

/// Header fields the fast path parses in one head; a head with more goes to
/// hyper, which holds it to `limits.maxRequestHeaders`.
const FIELDS: usize = 64;

/// The largest response head read from an endpoint: what the hyper path's
/// upstream buffer holds too.
pub const MAX_RESPONSE_HEAD: usize = 8 * 1024;

/// A client's request head, as the fast path reads it.
// Returned once per request and taken apart at once: boxing the large
// variant would add an allocation per request to save a move.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Parsed {
    /// A complete head of `len` bytes, for a body of `body` bytes
    /// (`Content-Length`, 0 without one).
    Fast {
        /// Method, target, version and headers.
        req: Request<()>,
        /// Bytes of the head.
        len: usize,
        /// Bytes of the body that follows (0 when chunked).
        body: u64,
        /// The body is chunked (`Transfer-Encoding: chunked`, alone).
        chunked: bool,
    },
    /// The head is not complete yet.
    Partial,
    /// Not for the fast path: hyper reads the connection from here on, from
    /// these same bytes, and answers what it refuses as it always did.
    Hyper,
}

/// Reads the request head at the start of `buf`. The fast path takes the
/// common case only: HTTP/1.1, one `Content-Length` of plain digits up to
/// `max_body` or one `Transfer-Encoding: chunked` (not both), no `Upgrade`,
/// no `Expect`, not CONNECT, at most [`FIELDS`] fields. Everything else, and everything httparse
/// refuses, is [`Parsed::Hyper`].
pub fn parse_request(buf: &[u8], max_body: u64) -> Parsed {
    let mut fields = [httparse::EMPTY_HEADER; FIELDS];
    let mut head = httparse::Request::new(&mut fields);
    let len = match head.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(_) => return Parsed::Hyper,
    };
    if head.version != Some(1) {
        return Parsed::Hyper;
    }
    let (Some(method), Some(target)) = (head.method, head.path) else {
        return Parsed::Hyper;
    };
    let Ok(method) = Method::from_bytes(method.as_bytes()) else {
        return Parsed::Hyper;
    };
    if method == Method::CONNECT {
        return Parsed::Hyper;
    }
    let Ok(uri) = Uri::try_from(target) else {
        return Parsed::Hyper;
    };
    let mut headers = HeaderMap::with_capacity(head.headers.len());
    let mut body: Option<u64> = None;
    let mut chunked = false;
    for field in head.headers.iter() {
        let Ok(name) = HeaderName::from_bytes(field.name.as_bytes()) else {
            return Parsed::Hyper;
        };
        if name == header::UPGRADE || name == header::EXPECT {
            return Parsed::Hyper;
        }
        if name == header::TRANSFER_ENCODING {
            if chunked || !field.value.eq_ignore_ascii_case(b"chunked") {
                return Parsed::Hyper;
            }
            chunked = true;
        }
        if name == header::CONTENT_LENGTH {
            match digits(field.value) {
                Some(n) if body.is_none_or(|b| b == n) => body = Some(n),
                _ => return Parsed::Hyper,
            }
        }
        let Ok(value) = HeaderValue::from_bytes(field.value) else {
            return Parsed::Hyper;
        };
        headers.append(name, value);
    }
    if chunked && body.is_some() {
        return Parsed::Hyper;
    }
    let body = body.unwrap_or(0);
    if body > max_body {
        return Parsed::Hyper;
    }
    let mut req = Request::new(());
    *req.method_mut() = method;
    *req.uri_mut() = uri;
    *req.version_mut() = Version::HTTP_11;
    *req.headers_mut() = headers;
    Parsed::Fast {
        req,
        len,
        body,
        chunked,
    }
}

/// A `Content-Length` of digits only (what RFC 9110 8.6 allows, minus the
/// comma lists hyper also takes; those go to hyper).
fn digits(v: &[u8]) -> Option<u64> {
    if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(v).ok()?.parse().ok()
}

/// Writes the request line and headers of a request shaped for an HTTP/1.1
/// endpoint (origin-form target, `Host` set) to `out`.
pub fn write_request(parts: &http::request::Parts, out: &mut Vec<u8>) {
    out.extend_from_slice(parts.method.as_str().as_bytes());
    out.push(b' ');
    let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    // An absolute-form target with an empty path (`http://a?q`) is sent as
    // `/?q` (RFC 9112 3.2.1: the origin-form path is never empty).
    if !target.starts_with('/') && target != "*" {
        out.push(b'/');
    }
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    write_headers(&parts.headers, out);
    out.extend_from_slice(b"\r\n");
}

/// Writes `headers` as `name: value` lines.
pub fn write_headers(headers: &HeaderMap, out: &mut Vec<u8>) {
    for (name, value) in headers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
}

/// How a response's body is delimited (RFC 9112 6.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    /// No body: a HEAD request, or 204 or 304.
    None,
    /// `Content-Length` bytes.
    Length(u64),
    /// Chunked, relayed as it came.
    Chunked,
    /// Until the endpoint closes: chunked for the client, so its connection lives on.
    UntilClose,
}

/// A response head read from an endpoint.
#[derive(Debug)]
pub enum Response {
    /// A final response of `len` bytes of head.
    Final {
        /// The status.
        status: u16,
        /// Bytes of the head in the buffer.
        len: usize,
        /// How its body ends.
        framing: Framing,
        /// Whether the connection can take another request after it.
        reusable: bool,
    },
    /// An interim 1xx response of `len` bytes, skipped (as the hyper path's
    /// client does); the final one follows.
    Interim(usize),
    /// The head is not complete yet.
    Partial,
}

/// Headers the proxy adds to every answer it relays, in place of any the
/// endpoint sent with the same names.
#[derive(Debug, Default)]
pub struct Added<'a> {
    /// `x-balanced-endpoint`, with `debug.endpointHeader`.
    pub endpoint: Option<&'a str>,
    /// `x-balanced-route`, with `debug.endpointHeader` and a route.
    pub route: Option<&'a str>,
    /// `connection: close`: the client's connection ends after this answer.
    pub close: bool,
}

/// Reads the endpoint's response head at the start of `buf` and, for a final
/// one, writes the client's head to `out`: status line, the endpoint's
/// headers less hop-by-hop ones (RFC 9110 7.6.1) and those `Connection`
/// names, the framing the client is sent, `date` when the endpoint sent
/// none, and `added`. `head_request`: the request was HEAD, so no body.
pub fn parse_response(
    buf: &[u8],
    head_request: bool,
    added: &Added<'_>,
    out: &mut Vec<u8>,
) -> Result<Response, String> {
    let mut fields = [httparse::EMPTY_HEADER; FIELDS * 2];
    let mut resp = httparse::Response::new(&mut fields);
    let len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() >= MAX_RESPONSE_HEAD => {
            return Err(format!("response head larger than {MAX_RESPONSE_HEAD} bytes"));
        }
        Ok(httparse::Status::Partial) => return Ok(Response::Partial),
        Err(e) => return Err(format!("invalid response head: {e}")),
    };
    let status = resp.code.unwrap_or(0);
    if (100..200).contains(&status) {
        if status == 101 {
            return Err("101 Switching Protocols to a request that asked for no upgrade".into());
        }
        return Ok(Response::Interim(len));
    }
    let mut length: Option<u64> = None;
    let mut te: Option<&[u8]> = None;
    let mut reusable = resp.version == Some(1);
    let mut date = false;
    for f in resp.headers.iter() {
        let n = f.name.as_bytes();
        if n.eq_ignore_ascii_case(b"content-length") {
            match digits(f.value) {
                Some(v) if length.is_none_or(|l| l == v) => length = Some(v),
                _ => return Err("invalid or conflicting Content-Length".into()),
            }
        } else if n.eq_ignore_ascii_case(b"transfer-encoding") {
            // Several fields are one list: the last coding is what counts.
            te = Some(f.value);
        } else if n.eq_ignore_ascii_case(b"connection") {
            if has_token(f.value, b"close") {
                reusable = false;
            }
        } else if n.eq_ignore_ascii_case(b"date") {
            date = true;
        }
    }
    let framing = if head_request || status == 204 || status == 304 {
        Framing::None
    } else if let Some(te) = te {
        // Transfer-Encoding overrides Content-Length (RFC 9112 6.3, 3), and
        // such a connection is not reused (the same, 3: "ought to be closed").
        if length.is_some() {
            reusable = false;
        }
        match te.rsplit(|&b| b == b',').next().map(trim) {
            Some(last) if last.eq_ignore_ascii_case(b"chunked") => Framing::Chunked,
            _ => Framing::UntilClose,
        }
    } else if let Some(n) = length {
        Framing::Length(n)
    } else {
        Framing::UntilClose
    };
    if framing == Framing::UntilClose {
        reusable = false;
    }
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(itoa3(status).as_slice());
    out.push(b' ');
    out.extend_from_slice(resp.reason.unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    // Headers `Connection` names; `keep-alive` and `close` (the common
    // case) name none, and need no list.
    let connection: Vec<&[u8]> = resp
        .headers
        .iter()
        .filter(|f| f.name.eq_ignore_ascii_case("connection"))
        .flat_map(|f| f.value.split(|&b| b == b','))
        .map(trim)
        .filter(|t| !t.is_empty() && !t.eq_ignore_ascii_case(b"keep-alive") && !t.eq_ignore_ascii_case(b"close"))
        .collect();
    let mut length_written = false;
    for f in resp.headers.iter() {
        let n = f.name.as_bytes();
        if n.eq_ignore_ascii_case(b"content-length") {
            // Once, and only where it frames the body (or tells a HEAD's size).
            if length_written || matches!(framing, Framing::Chunked | Framing::UntilClose) {
                continue;
            }
            length_written = true;
        }
        if is_hop_by_hop(n)
            || connection.iter().any(|c| c.eq_ignore_ascii_case(n))
            || (added.endpoint.is_some() && n.eq_ignore_ascii_case(ENDPOINT_HEADER))
            || (added.route.is_some() && n.eq_ignore_ascii_case(ROUTE_HEADER))
        {
            continue;
        }
        for b in n {
            out.push(b.to_ascii_lowercase());
        }
        out.extend_from_slice(b": ");
        out.extend_from_slice(f.value);
        out.extend_from_slice(b"\r\n");
    }
    if matches!(framing, Framing::Chunked | Framing::UntilClose) {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    if !date {
        write_date(out);
    }
    write_added(added, out);
    out.extend_from_slice(b"\r\n");
    Ok(Response::Final {
        status,
        len,
        framing,
        reusable,
    })
}

/// The proxy's own headers on a relayed answer.
pub fn write_added(added: &Added<'_>, out: &mut Vec<u8>) {
    if let Some(e) = added.endpoint {
        out.extend_from_slice(ENDPOINT_HEADER);
        out.extend_from_slice(b": ");
        out.extend_from_slice(e.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if let Some(r) = added.route {
        out.extend_from_slice(ROUTE_HEADER);
        out.extend_from_slice(b": ");
        out.extend_from_slice(r.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if added.close {
        out.extend_from_slice(b"connection: close\r\n");
    }
}

const ENDPOINT_HEADER: &[u8] = b"x-balanced-endpoint";
const ROUTE_HEADER: &[u8] = b"x-balanced-route";

/// Hop-by-hop fields (RFC 9110 7.6.1) and the framing the proxy writes itself.
fn is_hop_by_hop(n: &[u8]) -> bool {
    const HOP: [&[u8]; 9] = [
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authenticate",
        b"proxy-authorization",
    ];
    HOP.iter().any(|h| h.eq_ignore_ascii_case(n))
}

fn has_token(v: &[u8], token: &[u8]) -> bool {
    v.split(|&b| b == b',').any(|t| trim(t).eq_ignore_ascii_case(token))
}

fn trim(v: &[u8]) -> &[u8] {
    let start = v.iter().position(|b| !b.is_ascii_whitespace()).unwrap_or(v.len());
    let end = v
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .map_or(start, |e| e + 1);
    &v[start..end]
}

fn itoa3(status: u16) -> [u8; 3] {
    let s = status.min(999);
    [
        b'0' + (s / 100) as u8,
        b'0' + (s / 10 % 10) as u8,
        b'0' + (s % 10) as u8,
    ]
}

/// Writes `date: <now>` (RFC 9110 6.6.1: an origin with a clock sends one;
/// hyper adds it too).
pub fn write_date(out: &mut Vec<u8>) {
    out.extend_from_slice(b"date: ");
    out.extend_from_slice(crate::proxy::http::headers::date().as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// Follows a chunked body (RFC 9112 7.1) through the bytes relayed, to know
/// where it ends; the bytes themselves go on unchanged. Strict where a
/// client could read them differently: CRLF after every line and chunk,
/// hex sizes without overflow.
#[derive(Debug, Default)]
pub struct Chunked {
    state: State,
    left: u64,
    digits: u8,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum State {
    #[default]
    Size,
    Extension,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    TrailerStart,
    Trailer,
    TrailerLf,
    EndLf,
    Done,
}

impl Chunked {
    /// Scans `data`, the next bytes of the body: how many of them belong to
    /// it (all, or up to its last byte), or why they are not a chunked body.
    pub fn scan(&mut self, data: &[u8]) -> Result<usize, &'static str> {
        let mut i = 0;
        while i < data.len() && self.state != State::Done {
            let b = data[i];
            match self.state {
                State::Size => match b {
                    b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                        let v = (b as char).to_digit(16).unwrap_or(0) as u64;
                        self.digits += 1;
                        if self.digits > 15 {
                            return Err("chunk size too large");
                        }
                        self.left = self.left * 16 + v;
                    }
                    b';' | b' ' | b'\t' if self.digits > 0 => self.state = State::Extension,
                    b'\r' if self.digits > 0 => self.state = State::SizeLf,
                    _ => return Err("invalid chunk size"),
                },
                State::Extension => match b {
                    b'\r' => self.state = State::SizeLf,
                    b'\n' => return Err("bare LF in a chunk line"),
                    _ => {}
                },
                State::SizeLf => {
                    if b != b'\n' {
                        return Err("chunk size line not ended by CRLF");
                    }
                    self.digits = 0;
                    self.state = if self.left == 0 {
                        State::TrailerStart
                    } else {
                        State::Data
                    };
                }
                State::Data => {
                    let take = (self.left as usize).min(data.len() - i);
                    self.left -= take as u64;
                    i += take;
                    if self.left == 0 {
                        self.state = State::DataCr;
                    }
                    continue;
                }
                State::DataCr => {
                    if b != b'\r' {
                        return Err("chunk data not ended by CRLF");
                    }
                    self.state = State::DataLf;
                }
                State::DataLf => {
                    if b != b'\n' {
                        return Err("chunk data not ended by CRLF");
                    }
                    self.state = State::Size;
                }
                State::TrailerStart => match b {
                    b'\r' => self.state = State::EndLf,
                    b'\n' => return Err("bare LF after the last chunk"),
                    _ => self.state = State::Trailer,
                },
                State::Trailer => match b {
                    b'\r' => self.state = State::TrailerLf,
                    b'\n' => return Err("bare LF in a trailer"),
                    _ => {}
                },
                State::TrailerLf => {
                    if b != b'\n' {
                        return Err("trailer not ended by CRLF");
                    }
                    self.state = State::TrailerStart;
                }
                State::EndLf => {
                    if b != b'\n' {
                        return Err("chunked body not ended by CRLF");
                    }
                    self.state = State::Done;
                }
                State::Done => {}
            }
            i += 1;
        }
        Ok(i)
    }

    /// Whether the last chunk and the trailers were seen.
    pub fn done(&self) -> bool {
        self.state == State::Done
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fast(input: &str) -> (Request<()>, usize, u64) {
        match parse_request(input.as_bytes(), 1 << 20) {
            Parsed::Fast { req, len, body, .. } => (req, len, body),
            other => panic!("{input:?}: {other:?}"),
        }
    }

    fn hyper(input: &str) {
        assert!(
            matches!(parse_request(input.as_bytes(), 1 << 20), Parsed::Hyper),
            "{input:?} should go to hyper"
        );
    }

    #[test]
    fn a_plain_request_is_read_whole() {
        let input = "GET /a?b=1 HTTP/1.1\r\nHost: x\r\nX-A: 1\r\nx-a: 2\r\n\r\nrest";
        let (req, len, body) = fast(input);
        assert_eq!(len, input.len() - 4);
        assert_eq!(body, 0);
        assert_eq!(req.method(), Method::GET);
        assert_eq!(req.uri(), "/a?b=1");
        assert_eq!(req.headers().get_all("x-a").iter().count(), 2);
        let (_, _, body) = fast("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 12\r\nContent-Length: 12\r\n\r\n");
        assert_eq!(body, 12);
        assert!(matches!(
            parse_request(b"GET / HTTP/1.1\r\nHost: x\r\n", 0),
            Parsed::Partial
        ));
    }

    #[test]
    fn what_the_fast_path_does_not_take_goes_to_hyper() {
        hyper("GET / HTTP/1.0\r\n\r\n");
        hyper("POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n");
        hyper("POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n");
        hyper("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n");
        hyper("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n");
        hyper("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: +1\r\n\r\n");
        hyper("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1, 1\r\n\r\n");
        hyper("GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n");
        hyper("POST / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n");
        hyper("CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n");
        hyper("GET / HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n");
        hyper("GET / HTTP/1.1\r\nHost: x\0\r\n\r\n");
        hyper("GET /\x7f HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(matches!(
            parse_request(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\n\r\n", 10),
            Parsed::Hyper
        ));
        let many: String = (0..FIELDS + 1).map(|i| format!("x-{i}: v\r\n")).collect();
        hyper(&format!("GET / HTTP/1.1\r\nHost: x\r\n{many}\r\n"));
    }

    #[test]
    fn an_empty_path_is_sent_as_a_slash() {
        for (target, sent) in [
            ("http://a.example?q=1", "GET /?q=1 HTTP/1.1\r\n"),
            ("/p?q", "GET /p?q HTTP/1.1\r\n"),
        ] {
            let (req, _, _) = fast(&format!("GET {target} HTTP/1.1\r\nHost: a.example\r\n\r\n"));
            let (mut parts, ()) = req.into_parts();
            crate::proxy::http::headers::shape_for(&mut parts, crate::proxy::upstream::pool::Protocol::Http1);
            let mut out = Vec::new();
            write_request(&parts, &mut out);
            assert!(
                String::from_utf8_lossy(&out).starts_with(sent),
                "{:?}",
                String::from_utf8_lossy(&out)
            );
        }
    }

    fn response(input: &str, head: bool) -> (Result<Response, String>, String) {
        let mut out = Vec::new();
        let added = Added {
            endpoint: Some("10.0.0.1:80"),
            ..Default::default()
        };
        let r = parse_response(input.as_bytes(), head, &added, &mut out);
        (r, String::from_utf8(out).unwrap())
    }

    #[test]
    fn response_heads_lose_hop_by_hop_headers_and_say_their_framing() {
        let input = "HTTP/1.1 200 OK\r\nDate: d\r\nConnection: x-a, keep-alive\r\nX-A: 1\r\nKeep-Alive: 5\r\nContent-Length: 2\r\nX-Balanced-Endpoint: spoof\r\n\r\nok";
        let (r, out) = response(input, false);
        let len = input.len() - 2;
        assert!(
            matches!(r, Ok(Response::Final { status: 200, len: l, framing: Framing::Length(2), reusable: true }) if l == len),
            "{r:?}"
        );
        assert_eq!(
            out,
            "HTTP/1.1 200 OK\r\ndate: d\r\ncontent-length: 2\r\nx-balanced-endpoint: 10.0.0.1:80\r\n\r\n"
        );
        let (r, out) = response(
            "HTTP/1.1 200 OK\r\nDate: d\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            false,
        );
        assert!(matches!(
            r,
            Ok(Response::Final {
                framing: Framing::Chunked,
                reusable: true,
                ..
            })
        ));
        assert!(out.contains("transfer-encoding: chunked\r\n"), "{out}");
        let (r, _) = response("HTTP/1.1 200 OK\r\nDate: d\r\n\r\n", false);
        assert!(matches!(
            r,
            Ok(Response::Final {
                framing: Framing::UntilClose,
                reusable: false,
                ..
            })
        ));
        let (r, _) = response(
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\n",
            true,
        );
        assert!(matches!(
            r,
            Ok(Response::Final {
                framing: Framing::None,
                reusable: false,
                ..
            })
        ));
        let (r, out) = response("HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n", false);
        assert!(matches!(
            r,
            Ok(Response::Final {
                framing: Framing::None,
                ..
            })
        ));
        assert!(out.contains("content-length: 5\r\n") && out.contains("date: "), "{out}");
        let (r, _) = response("HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n", false);
        assert!(matches!(r, Ok(Response::Interim(25))));
        assert!(
            response(
                "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
                false
            )
            .0
            .is_err()
        );
        assert!(
            response("HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n", false)
                .0
                .is_err()
        );
        assert!(matches!(
            response("HTTP/1.1 200 OK\r\n", false).0,
            Ok(Response::Partial)
        ));
        assert!(response("nonsense\r\n\r\n", false).0.is_err());
    }

    fn scan_all(body: &[u8], step: usize) -> Result<(usize, bool), &'static str> {
        let mut c = Chunked::default();
        let mut used = 0;
        for piece in body.chunks(step) {
            let n = c.scan(piece)?;
            used += n;
            if n < piece.len() {
                break;
            }
        }
        Ok((used, c.done()))
    }

    #[test]
    fn chunked_bodies_are_followed_to_their_end_in_any_split() {
        let body = b"5;ext=1\r\nhello\r\nA\r\n0123456789\r\n0\r\nx-trailer: 1\r\n\r\nNEXT";
        for step in 1..body.len() {
            assert_eq!(scan_all(body, step), Ok((body.len() - 4, true)), "step {step}");
        }
        assert_eq!(scan_all(b"0\r\n\r\n", 100), Ok((5, true)));
        assert_eq!(scan_all(b"5\r\nhel", 100), Ok((6, false)));
        for bad in [
            &b"5\nhello\r\n0\r\n\r\n"[..],
            b"5\r\nhelloX\r\n",
            b"x\r\n",
            b"\r\n",
            b"0\r\n\n",
            b"1000000000000000\r\n",
            b"5\r\nhello\r\n0\r\nx: 1\n\r\n",
        ] {
            assert!(scan_all(bad, 100).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
    }

    /// What hyper's server makes of `input` (with the settings serve.rs
    /// gives it): method, target, headers and body length, or `None` when
    /// it refuses it.
    async fn hyper_reads(input: &[u8]) -> Option<(Method, Uri, HeaderMap, usize)> {
        use http_body_util::BodyExt;
        use tokio::io::AsyncWriteExt;
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let (tx, rx) = tokio::sync::oneshot::channel();
        let tx = std::sync::Mutex::new(Some(tx));
        let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
            let tx = tx.lock().unwrap().take();
            async move {
                let (parts, body) = req.into_parts();
                let len = body.collect().await.map(|b| b.to_bytes().len());
                if let (Some(tx), Ok(len)) = (tx, len) {
                    let _ = tx.send((parts.method, parts.uri, parts.headers, len));
                }
                Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Empty::<bytes::Bytes>::new()))
            }
        });
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(hyper_util::rt::TokioTimer::new())
            // The input is written whole and the write side shut: the
            // request must still be answered.
            .half_close(true)
            .max_buf_size(16 * 1024)
            .max_headers(100)
            .serve_connection(hyper_util::rt::TokioIo::new(server), service);
        tokio::spawn(conn);
        client.write_all(input).await.ok()?;
        client.shutdown().await.ok()?;
        tokio::time::timeout(std::time::Duration::from_secs(2), rx)
            .await
            .ok()?
            .ok()
    }

    /// A small deterministic generator: no dependency for a test's noise.
    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self, n: usize) -> usize {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((self.0 >> 33) % n as u64) as usize
        }
    }

    #[tokio::test]
    async fn what_the_fast_path_takes_hyper_takes_the_same_way() {
        let bases: &[&[u8]] = &[
            b"GET /a?b=1 HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n\r\n",
            b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc",
            b"GET http://other.example/p HTTP/1.1\r\nHost: x\r\n\r\n",
            b"PUT /p HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nX-A: 1\r\nx-a: 2\r\n\r\n",
            b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET / HTTP/1.1\nHost: x\n\n",
            b"POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n",
        ];
        let noise: &[&[u8]] = &[
            b"\0",
            b"\n",
            b"\r",
            b"\r\n",
            b" ",
            b"\t",
            b":",
            b"\x7f",
            b"\x80",
            b"\xff",
            b"0",
            b"-",
            b",",
            b"\"",
            b"\r\nContent-Length: 2",
            b"\r\nTransfer-Encoding: chunked",
            b"\r\nContent-Length: 1",
            b"\r\n folded",
            b"\r\nHost: y",
            b"HTTP/1.0",
            b"/",
            b"?",
            b"#",
            b"%",
            b"@",
        ];
        let mut rng = Lcg(0x5eed);
        let mut inputs: Vec<Vec<u8>> = bases.iter().map(|b| b.to_vec()).collect();
        for _ in 0..600 {
            let mut input = bases[rng.next(bases.len())].to_vec();
            for _ in 0..1 + rng.next(2) {
                let at = rng.next(input.len());
                let piece = noise[rng.next(noise.len())];
                if rng.next(3) == 0 {
                    input.remove(at);
                } else {
                    input.splice(at..at, piece.iter().copied());
                }
            }
            inputs.push(input);
        }
        let (mut fast_taken, mut agreed) = (0, 0);
        for input in &inputs {
            let Parsed::Fast {
                req,
                len,
                body,
                chunked,
            } = parse_request(input, 1 << 20)
            else {
                continue;
            };
            fast_taken += 1;
            // The body as the head announced it, whatever followed in the input.
            let mut whole = input[..len].to_vec();
            whole.extend(std::iter::repeat_n(b'x', body as usize));
            let body = if chunked {
                whole.extend_from_slice(b"3\r\nabc\r\n0\r\n\r\n");
                3
            } else {
                body
            };
            let Some((method, uri, headers, body_len)) = hyper_reads(&whole).await else {
                panic!(
                    "the fast path took what hyper refuses: {:?}",
                    String::from_utf8_lossy(input)
                );
            };
            let shown = String::from_utf8_lossy(input);
            assert_eq!(req.method(), method, "{shown:?}");
            assert_eq!(req.uri(), &uri, "{shown:?}");
            assert_eq!(req.headers(), &headers, "{shown:?}");
            assert_eq!(body as usize, body_len, "{shown:?}");
            agreed += 1;
        }
        assert_eq!(fast_taken, agreed);
        assert!(fast_taken > 100, "the noise left too few heads whole: {fast_taken}");
    }
}
