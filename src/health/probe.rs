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
    probe_with(kind, addr, timeout, tls, None).await.map(drop)
}

/// What a passing probe brings back: the agent header's value, when the
/// HTTP check names one and the answer carries it.
pub type AgentLine = Option<String>;

/// What an HTTP check keeps between probes of one endpoint: its request,
/// built once, and a buffer for the status line (on the heap, so a task that
/// probes over TCP does not carry it).
#[derive(Debug)]
pub struct HttpScratch {
    request: Vec<u8>,
    buf: Box<[u8]>,
}

impl HttpScratch {
    /// The request `http` sends to `addr`, and an empty buffer.
    pub fn new(http: &HttpProbe, addr: SocketAddr) -> Self {
        let host = match &http.host {
            Some(h) => h.clone(),
            None => addr.to_string(),
        };
        let request = format!(
            "{} {} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: balanced-health-check\r\nAccept: */*\r\nConnection: close\r\n\r\n",
            http.method, http.path
        );
        // With an agent header the whole head is read, not just the status line.
        let size = if http.agent_header.is_some() {
            HEAD_MAX
        } else {
            STATUS_LINE_MAX
        };
        Self {
            request: request.into_bytes(),
            buf: vec![0; size].into_boxed_slice(),
        }
    }
}

/// The longest status line read.
const STATUS_LINE_MAX: usize = 1024;
/// The longest response head read when looking for an agent header.
const HEAD_MAX: usize = 8192;

/// [`probe`], reusing `scratch` for an endpoint probed again and again.
pub async fn probe_with(
    kind: &ProbeKind,
    addr: SocketAddr,
    timeout: Duration,
    tls: &TlsClients,
    request: Option<&mut HttpScratch>,
) -> Result<AgentLine, ProbeError> {
    let mut phase = Phase::Connect;
    // An answer that came but is still undecided near the end (a regex that
    // never matched) fails as what it is, not as "no response".
    let undecided_at = tokio::time::Instant::now() + timeout * 9 / 10;
    match tokio::time::timeout(timeout, run(kind, addr, tls, request, &mut phase, undecided_at)).await {
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
    request: Option<&mut HttpScratch>,
    phase: &mut Phase,
    undecided_at: tokio::time::Instant,
) -> Result<AgentLine, ProbeError> {
    let stream = connect(addr, matches!(kind, ProbeKind::Tcp))
        .await
        .map_err(|e| ProbeError {
            local: is_local_exhaustion(&e),
            ..ProbeError::failed(format!("connect: {}", io_text(&e)))
        })?;
    match kind {
        ProbeKind::Tcp => Ok(None),
        ProbeKind::TcpPayload(payload) => {
            *phase = Phase::Response;
            tcp_payload_probe(stream, payload, undecided_at).await.map(|()| None)
        }
        ProbeKind::Http(http) => {
            *phase = Phase::Response;
            http_probe(stream, addr, http, request).await
        }
        ProbeKind::Tls(settings) => {
            *phase = Phase::Handshake;
            // Boxed: a TLS handshake's state is kilobytes, and every
            // endpoint's task would carry that much even for TCP checks.
            Box::pin(tls_probe(stream, addr, settings, tls)).await.map(|()| None)
        }
    }
}

/// Sends the check's bytes and reads until the answer is decided: a prefix
/// as soon as that many bytes came (or one differs), a regex as soon as it
/// matches; at most [`MAX_EXPECT_READ`] bytes are read, and the end of the
/// stream, an answer still undecided at `undecided_at`, or the probe's
/// timeout fails it.
async fn tcp_payload_probe(
    mut stream: TcpStream,
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
    mut stream: TcpStream,
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

/// Reads just the status line: the check module and HAProxy decide on it alone.
async fn read_status(stream: &mut TcpStream, buf: &mut [u8]) -> Result<u16, ProbeError> {
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
    stream: &mut TcpStream,
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
    let mut lines = buf[..end]
        .split(|b| *b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l));
    let status = parse_status_line(lines.next().unwrap_or_default())?;
    let value = lines
        .filter_map(|l| {
            let colon = l.iter().position(|b| *b == b':')?;
            l[..colon]
                .eq_ignore_ascii_case(name.as_str().as_bytes())
                .then(|| String::from_utf8_lossy(&l[colon + 1..]).trim().to_string())
        })
        .next();
    Ok((status, value))
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

/// Whether `e` is this process or host running out of something (descriptors,
/// socket buffers, memory, local ports) rather than the peer failing.
pub fn is_local_exhaustion(e: &io::Error) -> bool {
    use nix::errno::Errno;
    e.raw_os_error().is_some_and(|code| {
        matches!(
            Errno::from_raw(code),
            Errno::EMFILE | Errno::ENFILE | Errno::ENOBUFS | Errno::ENOMEM | Errno::EADDRNOTAVAIL
        )
    })
}

/// io::Error text without the `(os error 111)` noise, for status and error bodies.
pub fn io_text(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => "connection refused".into(),
        io::ErrorKind::ConnectionReset => "connection reset".into(),
        io::ErrorKind::TimedOut => "timed out".into(),
        io::ErrorKind::UnexpectedEof => "connection closed".into(),
        _ => {
            let text = e.to_string();
            match text.find(" (os error") {
                Some(i) => text[..i].to_lowercase(),
                None => text,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
