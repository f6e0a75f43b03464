//! One probe is one async function: connect, maybe speak, decide, within a timeout.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use super::tls::TlsClients;
use crate::api::config::{Expect, HttpProbe, MAX_EXPECT_READ, ProbeKind, TcpPayload, TlsProbe};
use crate::api::duration::format_duration;
use crate::net::{io_text, is_local_exhaustion};
use crate::tls::upstream::{Alpn, Connector, MaybeTls};

/// Why a probe failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeError {
    /// Timeouts are counted apart from other failures.
    pub timed_out: bool,
    /// The prober itself could not open a socket (out of descriptors): says
    /// nothing about the endpoint, so its state is left alone.
    pub local: bool,
    /// What an operator reads in status: `connect: connection refused`.
    pub message: String,
}

impl fmt::Display for ProbeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl ProbeError {
    pub(crate) fn failed(message: impl Into<String>) -> Self {
        Self {
            timed_out: false,
            local: false,
            message: message.into(),
        }
    }
}

/// The step a probe was at, so a timeout says where the endpoint stalled.
#[derive(Clone, Copy)]
enum Phase {
    Connect,
    Handshake,
    Response,
}

/// Runs one probe of `kind` against `addr`, bounded by `timeout`.
pub async fn probe(kind: &ProbeKind, addr: SocketAddr, timeout: Duration, tls: &TlsClients) -> Result<(), ProbeError> {
    probe_with(kind, addr, timeout, tls, None, None).await.map(drop)
}

/// What a passing probe brings back: the agent header's value, when the
/// HTTP check names one and the answer carries it.
pub type AgentLine = Option<String>;

/// What an HTTP check keeps between probes of one endpoint: its request,
/// built once, a buffer for the answer's head (on the heap, so a task that
/// probes over TCP does not carry it), and with `keepAliveRequests` the
/// connection the next check reuses.
#[derive(Debug)]
pub struct HttpScratch {
    request: Vec<u8>,
    buf: Box<[u8]>,
    kept: Option<MaybeTls>,
    /// Checks already sent on `kept`.
    used: u32,
}

impl HttpScratch {
    /// The request `http` sends to `addr`, and an empty buffer.
    pub fn new(http: &HttpProbe, addr: SocketAddr) -> Self {
        let host = match &http.host {
            Some(h) => h.clone(),
            None => addr.to_string(),
        };
        let connection = if http.keep_alive_requests > 1 {
            "keep-alive"
        } else {
            "close"
        };
        let request = format!(
            "{} {} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: balanced-health-check\r\nAccept: */*\r\nConnection: {connection}\r\n\r\n",
            http.method, http.path
        );
        // With an agent header or a kept connection the whole head is read,
        // not just the status line.
        let size = if http.agent_header.is_some() || http.keep_alive_requests > 1 {
            HEAD_MAX
        } else {
            STATUS_LINE_MAX
        };
        Self {
            request: request.into_bytes(),
            buf: vec![0; size].into_boxed_slice(),
            kept: None,
            used: 0,
        }
    }
}

/// The longest status line read.
const STATUS_LINE_MAX: usize = 1024;
/// The longest response head read when looking for an agent header.
const HEAD_MAX: usize = 8192;
/// The most body a kept-alive check reads past to reuse its connection; a
/// longer answer closes it instead.
const DRAIN_MAX: usize = 64 * 1024;

/// [`probe`], reusing `scratch` for an endpoint probed again and again, and
/// speaking TLS through `backend` when the endpoint's group does (HTTP, gRPC
/// and payload checks; a bare TCP check stays a SYN).
pub async fn probe_with(
    kind: &ProbeKind,
    addr: SocketAddr,
    timeout: Duration,
    tls: &TlsClients,
    backend: Option<&Connector>,
    request: Option<&mut HttpScratch>,
) -> Result<AgentLine, ProbeError> {
    let mut phase = Phase::Connect;
    // An answer that came but is still undecided near the end (a regex that
    // never matched) fails as what it is, not as "no response".
    let undecided_at = tokio::time::Instant::now() + timeout * 9 / 10;
    let run = run(kind, addr, tls, backend, request, &mut phase, undecided_at);
    match tokio::time::timeout(timeout, run).await {
        Ok(result) => result,
        Err(_) => Err(ProbeError {
            timed_out: true,
            local: false,
            message: format!(
                "timeout: {} after {}",
                match phase {
                    Phase::Connect => "no connection",
                    Phase::Handshake => "no TLS handshake",
                    Phase::Response => "no response",
                },
                format_duration(timeout)
            ),
        }),
    }
}

async fn run(
    kind: &ProbeKind,
    addr: SocketAddr,
    tls: &TlsClients,
    backend: Option<&Connector>,
    mut request: Option<&mut HttpScratch>,
    phase: &mut Phase,
    undecided_at: tokio::time::Instant,
) -> Result<AgentLine, ProbeError> {
    if let (ProbeKind::Http(http), Some(scratch)) = (kind, request.as_deref_mut())
        && http.keep_alive_requests > 1
    {
        return http_kept_alive(addr, http, backend, scratch, phase).await;
    }
    let tcp = connect(addr, matches!(kind, ProbeKind::Tcp))
        .await
        .map_err(connect_error)?;
    let stream = match kind {
        ProbeKind::Tcp => return Ok(None),
        ProbeKind::Tls(settings) => {
            *phase = Phase::Handshake;
            // Boxed: a TLS handshake's state is kilobytes, and every
            // endpoint's task would carry that much even for TCP checks.
            return Box::pin(tls_probe(tcp, addr, settings, tls)).await.map(|()| None);
        }
        ProbeKind::Grpc(_) => handshake(backend, tcp, addr, Alpn::H2, phase).await?,
        ProbeKind::Http(_) => handshake(backend, tcp, addr, Alpn::Http1, phase).await?,
        ProbeKind::TcpPayload(_) => handshake(backend, tcp, addr, Alpn::None, phase).await?,
    };
    match kind {
        ProbeKind::Tcp | ProbeKind::Tls(_) => Ok(None),
        ProbeKind::TcpPayload(payload) => {
            *phase = Phase::Response;
            tcp_payload_probe(stream, payload, undecided_at).await.map(|()| None)
        }
        ProbeKind::Http(http) => {
            *phase = Phase::Response;
            http_probe(stream, addr, http, request).await
        }
        ProbeKind::Grpc(grpc) => {
            *phase = Phase::Response;
            // Boxed for the same reason: an h2 connection's state.
            Box::pin(super::grpc::grpc_probe(stream, addr, grpc))
                .await
                .map(|()| None)
                .map_err(ProbeError::failed)
        }
    }
}

/// The endpoint's TLS, when its group speaks TLS (boxed: a handshake's state
/// is kilobytes that a plain check's task should not carry).
async fn handshake(
    backend: Option<&Connector>,
    tcp: TcpStream,
    addr: SocketAddr,
    alpn: Alpn,
    phase: &mut Phase,
) -> Result<MaybeTls, ProbeError> {
    let Some(backend) = backend else {
        return Ok(MaybeTls::Plain(tcp));
    };
    *phase = Phase::Handshake;
    let stream = Box::pin(backend.connect(tcp, addr, alpn))
        .await
        .map_err(ProbeError::failed)?;
    Ok(MaybeTls::Tls(Box::new(stream)))
}

fn connect_error(e: io::Error) -> ProbeError {
    ProbeError {
        local: is_local_exhaustion(&e),
        ..ProbeError::failed(format!("connect: {}", io_text(&e)))
    }
}

/// An HTTP check over the connection the last one left open, if any: one
/// that the endpoint closed meanwhile (its keep-alive timeout) is no verdict
/// on the endpoint, so the check is sent again once on a new connection.
async fn http_kept_alive(
    addr: SocketAddr,
    http: &HttpProbe,
    backend: Option<&Connector>,
    scratch: &mut HttpScratch,
    phase: &mut Phase,
) -> Result<AgentLine, ProbeError> {
    if let Some(stream) = scratch.kept.take() {
        *phase = Phase::Response;
        match exchange_kept_alive(stream, http, scratch).await {
            Err(Exchange::Broken(_)) => {}
            Err(Exchange::Failed(e)) => return Err(e),
            Ok(line) => return Ok(line),
        }
    }
    *phase = Phase::Connect;
    let tcp = connect(addr, false).await.map_err(connect_error)?;
    let stream = handshake(backend, tcp, addr, Alpn::Http1, phase).await?;
    scratch.used = 0;
    *phase = Phase::Response;
    exchange_kept_alive(stream, http, scratch).await.map_err(|e| match e {
        Exchange::Broken(e) | Exchange::Failed(e) => e,
    })
}

/// How a check on a kept-alive connection went wrong.
enum Exchange {
    /// Nothing of an answer came: the connection was already closed.
    Broken(ProbeError),
    /// The endpoint answered, wrongly or not at all in time.
    Failed(ProbeError),
}

/// Sends the check on `stream`, reads the whole answer, and keeps the
/// connection in `scratch` when the answer's framing allows another check
/// on it and fewer than `keepAliveRequests` were sent.
async fn exchange_kept_alive(
    mut stream: MaybeTls,
    http: &HttpProbe,
    scratch: &mut HttpScratch,
) -> Result<AgentLine, Exchange> {
    if let Err(e) = stream.write_all(&scratch.request).await {
        return Err(Exchange::Broken(ProbeError::failed(format!(
            "http: send: {}",
            io_text(&e)
        ))));
    }
    let mut len = 0;
    let end = loop {
        let n = match stream.read(&mut scratch.buf[len..]).await {
            Ok(n) => n,
            Err(e) => {
                let e = ProbeError::failed(format!("http: read: {}", io_text(&e)));
                return Err(if len == 0 {
                    Exchange::Broken(e)
                } else {
                    Exchange::Failed(e)
                });
            }
        };
        if n == 0 {
            let e = ProbeError::failed("http: connection closed before the end of the headers");
            return Err(if len == 0 {
                Exchange::Broken(e)
            } else {
                Exchange::Failed(e)
            });
        }
        len += n;
        if let Some(end) = scratch.buf[..len].windows(4).position(|w| w == b"\r\n\r\n") {
            break end;
        }
        if len == scratch.buf.len() {
            return Err(Exchange::Failed(ProbeError::failed(format!(
                "http: response headers longer than {HEAD_MAX} bytes"
            ))));
        }
    };
    let head = parse_head(
        &scratch.buf[..end],
        http.agent_header.as_ref(),
        http.method == http::Method::HEAD,
    )
    .map_err(Exchange::Failed)?;
    let verdict = if http.expect.matches(head.status) {
        Ok(head.agent)
    } else {
        Err(Exchange::Failed(ProbeError::failed(format!(
            "http: status {}, expected {}",
            head.status, http.expect
        ))))
    };
    let already = scratch.buf[end + 4..len].to_vec();
    scratch.used += 1;
    if !head.close && scratch.used < http.keep_alive_requests && drain(&mut stream, head.body, already).await {
        scratch.kept = Some(stream);
    }
    verdict
}

/// A response head, as far as a check needs it.
struct Head {
    status: u16,
    agent: AgentLine,
    body: Framing,
    /// The endpoint will close the connection after this answer.
    close: bool,
}

/// How the body after a head ends.
#[derive(Debug, PartialEq, Eq)]
enum Framing {
    None,
    Length(u64),
    Chunked,
    /// Only by the connection closing: nothing can follow on it.
    Close,
}

fn parse_head(head: &[u8], agent: Option<&http::HeaderName>, head_request: bool) -> Result<Head, ProbeError> {
    let mut lines = head.split(|b| *b == b'\n').map(|l| l.strip_suffix(b"\r").unwrap_or(l));
    let status_line = lines.next().unwrap_or_default();
    let status = parse_status_line(status_line)?;
    let mut parsed = Head {
        status,
        agent: None,
        body: Framing::Close,
        close: status_line.starts_with(b"HTTP/1.0"),
    };
    let (mut length, mut chunked) = (None, false);
    for line in lines {
        let Some(colon) = line.iter().position(|b| *b == b':') else {
            continue;
        };
        let (name, value) = (&line[..colon], line[colon + 1..].trim_ascii());
        if agent.is_some_and(|a| name.eq_ignore_ascii_case(a.as_str().as_bytes())) && parsed.agent.is_none() {
            parsed.agent = Some(String::from_utf8_lossy(value).into_owned());
        } else if name.eq_ignore_ascii_case(b"content-length") {
            length = std::str::from_utf8(value).ok().and_then(|v| v.parse::<u64>().ok());
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            chunked = value.to_ascii_lowercase().ends_with(b"chunked");
        } else if name.eq_ignore_ascii_case(b"connection") {
            let value = value.to_ascii_lowercase();
            if value.split(|b| *b == b',').any(|t| t.trim_ascii() == b"close") {
                parsed.close = true;
            }
        }
    }
    parsed.body = if head_request || status < 200 || status == 204 || status == 304 {
        Framing::None
    } else if chunked {
        Framing::Chunked
    } else {
        match length {
            Some(n) => Framing::Length(n),
            None => Framing::Close,
        }
    };
    if parsed.body == Framing::Close {
        parsed.close = true;
    }
    Ok(parsed)
}

/// Reads past the body of an answer (`already` is what came with its head),
/// so the connection can carry another check; false when it cannot: a body
/// longer than [`DRAIN_MAX`], malformed chunks, or the connection closed.
async fn drain(stream: &mut MaybeTls, body: Framing, mut already: Vec<u8>) -> bool {
    match body {
        Framing::None => already.is_empty(),
        Framing::Close => false,
        Framing::Length(n) => {
            if n > DRAIN_MAX as u64 || already.len() as u64 > n {
                return false;
            }
            let mut left = n as usize - already.len();
            let mut chunk = [0u8; 4096];
            while left > 0 {
                match stream.read(&mut chunk[..left.min(4096)]).await {
                    Ok(0) | Err(_) => return false,
                    Ok(k) => left -= k,
                }
            }
            true
        }
        Framing::Chunked => {
            let mut chunk = [0u8; 4096];
            loop {
                match chunked_end(&already) {
                    Ok(Some(end)) => return end == already.len(),
                    Ok(None) if already.len() < DRAIN_MAX => {}
                    _ => return false,
                }
                match stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => return false,
                    Ok(k) => already.extend_from_slice(&chunk[..k]),
                }
            }
        }
    }
}

/// Where a chunked body that starts at `buf[0]` ends, if all of it is in `buf`.
fn chunked_end(buf: &[u8]) -> Result<Option<usize>, ()> {
    let mut at = 0;
    loop {
        let Some(eol) = buf[at..].windows(2).position(|w| w == b"\r\n") else {
            return Ok(None);
        };
        let line = &buf[at..at + eol];
        let digits = line.split(|b| *b == b';').next().unwrap_or_default().trim_ascii();
        let size = std::str::from_utf8(digits)
            .ok()
            .and_then(|d| usize::from_str_radix(d, 16).ok())
            .ok_or(())?;
        at += eol + 2;
        if size == 0 {
            // Trailer fields, then an empty line.
            loop {
                let Some(eol) = buf[at..].windows(2).position(|w| w == b"\r\n") else {
                    return Ok(None);
                };
                at += eol + 2;
                if eol == 0 {
                    return Ok(Some(at));
                }
            }
        }
        if size > DRAIN_MAX {
            return Err(());
        }
        if buf.len() < at + size + 2 {
            return Ok(None);
        }
        if &buf[at + size..at + size + 2] != b"\r\n" {
            return Err(());
        }
        at += size + 2;
    }
}

/// Sends the check's bytes and reads until the answer is decided: a prefix
/// as soon as that many bytes came (or one differs), a regex as soon as it
/// matches; at most [`MAX_EXPECT_READ`] bytes are read, and the end of the
/// stream, an answer still undecided at `undecided_at`, or the probe's
/// timeout fails it.
async fn tcp_payload_probe(
    mut stream: MaybeTls,
    payload: &TcpPayload,
    undecided_at: tokio::time::Instant,
) -> Result<(), ProbeError> {
    if !payload.send.is_empty() {
        stream
            .write_all(&payload.send)
            .await
            .map_err(|e| ProbeError::failed(format!("send: {}", io_text(&e))))?;
    }
    let mut got = Vec::with_capacity(256);
    let mut chunk = [0u8; 512];
    loop {
        match &payload.expect {
            Expect::Prefix(want) => {
                let n = got.len().min(want.len());
                if got[..n] != want[..n] {
                    return Err(unexpected(&got, &format!("starting {}", shown(want))));
                }
                if n == want.len() {
                    return Ok(());
                }
            }
            Expect::Regex(re) => {
                if re.is_match(&got) {
                    return Ok(());
                }
                if got.len() >= MAX_EXPECT_READ {
                    return Err(unexpected(&got, &format!("matching /{}/", re.source())));
                }
            }
        }
        let room = chunk.len().min(MAX_EXPECT_READ.saturating_sub(got.len())).max(1);
        let want = || match &payload.expect {
            Expect::Prefix(want) => format!("starting {}", shown(want)),
            Expect::Regex(re) => format!("matching /{}/", re.source()),
        };
        let read = stream.read(&mut chunk[..room]);
        let n = if got.is_empty() {
            read.await
        } else {
            match tokio::time::timeout_at(undecided_at, read).await {
                Ok(r) => r,
                Err(_) => return Err(unexpected(&got, &want())),
            }
        }
        .map_err(|e| ProbeError::failed(format!("read: {}", io_text(&e))))?;
        if n == 0 {
            return Err(unexpected(&got, &format!("{} before the connection closed", want())));
        }
        got.extend_from_slice(&chunk[..n]);
    }
}

fn unexpected(got: &[u8], want: &str) -> ProbeError {
    ProbeError::failed(format!(
        "expect: got {}, want an answer {want}",
        shown(&got[..got.len().min(64)])
    ))
}

/// Bytes as a quoted, escaped string (`"+PONG\r\n"`).
fn shown(bytes: &[u8]) -> String {
    format!("\"{}\"", bytes.escape_ascii())
}

/// Opens the probe's connection. It closes with RST, not FIN: thousands of
/// probes a second must not leave TIME_WAIT sockets behind. A bare TCP check
/// also delays the handshake's last ACK, so the RST goes out in its place and
/// the endpoint's kernel drops the half-open connection before its
/// application ever accepts it: a SYN-ACK is the whole check, the endpoint's
/// process is not woken, and a packet is saved (HAProxy checks the same way;
/// measured: half the prober's softirq time).
async fn connect(addr: SocketAddr, bare: bool) -> io::Result<TcpStream> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    let sock = socket2::SockRef::from(&socket);
    sock.set_linger(Some(Duration::ZERO))?;
    if bare {
        sock.set_tcp_quickack(false)?;
    } else {
        sock.set_tcp_nodelay(true)?;
    }
    socket.connect(addr).await
}

async fn http_probe(
    mut stream: MaybeTls,
    addr: SocketAddr,
    http: &HttpProbe,
    scratch: Option<&mut HttpScratch>,
) -> Result<AgentLine, ProbeError> {
    let mut built = None;
    let scratch = match scratch {
        Some(s) => s,
        None => built.insert(HttpScratch::new(http, addr)),
    };
    stream
        .write_all(&scratch.request)
        .await
        .map_err(|e| ProbeError::failed(format!("http: send: {}", io_text(&e))))?;
    let (status, line) = match &http.agent_header {
        None => (read_status(&mut stream, &mut scratch.buf).await?, None),
        Some(name) => read_head(&mut stream, &mut scratch.buf, name).await?,
    };
    if http.expect.matches(status) {
        Ok(line)
    } else {
        Err(ProbeError::failed(format!(
            "http: status {status}, expected {}",
            http.expect
        )))
    }
}

/// What the fuzz target checks: the probe's own parsers of an endpoint's
/// answer (status line, head, chunked body end) return for any bytes, and
/// what they find is within the bytes given.
#[cfg(any(test, feature = "test-util"))]
pub fn fuzz_answer(data: &[u8]) {
    let agent = http::HeaderName::from_static("x-agent");
    let line_end = data.windows(2).position(|w| w == b"\r\n").unwrap_or(data.len());
    if let Ok(status) = parse_status_line(&data[..line_end]) {
        assert!((100..=599).contains(&status));
    }
    for head_request in [false, true] {
        if let Ok(head) = parse_head(data, Some(&agent), head_request) {
            assert!((100..=599).contains(&head.status));
        }
    }
    if let Ok(Some(end)) = chunked_end(data) {
        assert!(end <= data.len(), "chunked end {end} past {} bytes", data.len());
    }
}

/// Reads just the status line: the check module and HAProxy decide on it alone.
async fn read_status(stream: &mut MaybeTls, buf: &mut [u8]) -> Result<u16, ProbeError> {
    let mut len = 0;
    loop {
        let n = stream
            .read(&mut buf[len..])
            .await
            .map_err(|e| ProbeError::failed(format!("http: read: {}", io_text(&e))))?;
        if n == 0 {
            return Err(ProbeError::failed("http: connection closed before a status line"));
        }
        len += n;
        if let Some(end) = buf[..len].windows(2).position(|w| w == b"\r\n") {
            return parse_status_line(&buf[..end]);
        }
        if len == buf.len() {
            return Err(ProbeError::failed("http: status line longer than 1024 bytes"));
        }
    }
}

/// Reads the response head: its status and the value of header `name`.
async fn read_head(
    stream: &mut MaybeTls,
    buf: &mut [u8],
    name: &http::HeaderName,
) -> Result<(u16, AgentLine), ProbeError> {
    let mut len = 0;
    let end = loop {
        let n = stream
            .read(&mut buf[len..])
            .await
            .map_err(|e| ProbeError::failed(format!("http: read: {}", io_text(&e))))?;
        if n == 0 {
            return Err(ProbeError::failed(
                "http: connection closed before the end of the headers",
            ));
        }
        len += n;
        if let Some(end) = buf[..len].windows(4).position(|w| w == b"\r\n\r\n") {
            break end;
        }
        if len == buf.len() {
            return Err(ProbeError::failed(format!(
                "http: response headers longer than {HEAD_MAX} bytes"
            )));
        }
    };
    let head = parse_head(&buf[..end], Some(name), false)?;
    Ok((head.status, head.agent))
}

fn parse_status_line(line: &[u8]) -> Result<u16, ProbeError> {
    let bad = || {
        let shown: String = String::from_utf8_lossy(line).chars().take(64).collect();
        ProbeError::failed(format!("http: malformed status line {shown:?}"))
    };
    let rest = line.strip_prefix(b"HTTP/1.").ok_or_else(bad)?;
    let code = rest.get(2..5).filter(|_| rest.get(1) == Some(&b' ')).ok_or_else(bad)?;
    if !code.iter().all(u8::is_ascii_digit) || rest.get(5).is_some_and(|b| *b != b' ') {
        return Err(bad());
    }
    let status = code.iter().fold(0u16, |acc, d| acc * 10 + u16::from(d - b'0'));
    if !(100..=599).contains(&status) {
        return Err(bad());
    }
    Ok(status)
}

async fn tls_probe(
    stream: TcpStream,
    addr: SocketAddr,
    settings: &TlsProbe,
    tls: &TlsClients,
) -> Result<(), ProbeError> {
    let config = tls
        .config(settings.verify)
        .map_err(|e| ProbeError::failed(format!("tls: {e}")))?;
    let name = match &settings.server_name {
        Some(n) => ServerName::try_from(n.clone()).map_err(|e| ProbeError::failed(format!("tls: server name: {e}")))?,
        None => ServerName::IpAddress(addr.ip().into()),
    };
    let connector = tokio_rustls::TlsConnector::from(config);
    let mut session = connector
        .connect(name, stream)
        .await
        .map_err(|e| ProbeError::failed(format!("tls: handshake: {}", io_text(&e))))?;
    let _ = session.shutdown().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunked_bodies_are_found_whole_or_not_yet() {
        assert_eq!(chunked_end(b"0\r\n\r\n"), Ok(Some(5)));
        assert_eq!(chunked_end(b"2\r\nok\r\n0\r\n\r\n"), Ok(Some(12)));
        assert_eq!(chunked_end(b"2;x=y\r\nok\r\n0\r\nA: b\r\n\r\n"), Ok(Some(22)));
        assert_eq!(chunked_end(b"2\r\nok\r\n0\r\n"), Ok(None));
        assert_eq!(chunked_end(b"2\r\no"), Ok(None));
        assert_eq!(chunked_end(b"zz\r\n"), Err(()));
        assert_eq!(chunked_end(b"2\r\nokay\r\n"), Err(()));
    }

    #[test]
    fn heads_say_how_their_body_ends_and_whether_the_connection_stays() {
        let head = |text: &[u8], head_request| parse_head(text, None, head_request).unwrap();
        let h = head(b"HTTP/1.1 200 OK\r\nContent-Length: 12", false);
        assert_eq!((h.body, h.close), (Framing::Length(12), false));
        let h = head(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked", false);
        assert_eq!((h.body, h.close), (Framing::Chunked, false));
        let h = head(b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\nConnection: Close", false);
        assert!(h.close);
        let h = head(b"HTTP/1.1 200 OK", false);
        assert_eq!((h.body, h.close), (Framing::Close, true));
        let h = head(b"HTTP/1.1 204 No Content", false);
        assert_eq!((h.body, h.close), (Framing::None, false));
        let h = head(b"HTTP/1.1 200 OK\r\nContent-Length: 12", true);
        assert_eq!(h.body, Framing::None);
        assert!(head(b"HTTP/1.0 200 OK\r\nContent-Length: 0", false).close);
    }

    #[test]
    fn status_lines_parse() {
        assert_eq!(parse_status_line(b"HTTP/1.1 200 OK"), Ok(200));
        assert_eq!(parse_status_line(b"HTTP/1.0 503 Service Unavailable"), Ok(503));
        assert_eq!(parse_status_line(b"HTTP/1.1 204"), Ok(204));
        for bad in [
            &b"HTTP/2 200"[..],
            b"HTTP/1.1 20 OK",
            b"HTTP/1.1 2000 OK",
            b"SSH-2.0-OpenSSH",
            b"HTTP/1.1 999 X",
        ] {
            assert!(parse_status_line(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
    }
}
