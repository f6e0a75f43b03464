//! The access log: one JSON line per HTTP request or TCP connection, with
//! Envoy's response flags (`UH`, `UF`, `UT`, `URX`, `UO`, `DC`) so the lines
//! grep the way Envoy users expect.
//!
//! Lines leave the request path through a bounded channel and are written
//! by a thread of their own; when the channel is full the line is
//! dropped and counted (`balanced_access_log_dropped_total`), never waited for.

use std::fmt::Write as _;
use std::io::{self, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::{Method, Uri, Version};
use prometheus_client::metrics::counter::Counter;
use tokio::sync::mpsc;

/// Lines that may wait for the writer before new ones are dropped.
const QUEUE: usize = 16 * 1024;

/// Envoy response flags, as a bit set.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Flags(u8);

impl Flags {
    /// `UH`: no healthy upstream.
    pub const NO_HEALTHY_UPSTREAM: Flags = Flags(1);
    /// `UF`: the upstream connection failed.
    pub const UPSTREAM_CONNECT_FAILURE: Flags = Flags(2);
    /// `UT`: the upstream timed out.
    pub const UPSTREAM_TIMEOUT: Flags = Flags(4);
    /// `URX`: retries (or connect attempts) exhausted.
    pub const RETRIES_EXHAUSTED: Flags = Flags(8);
    /// `UO`: overflow: every endpoint at its `maxConnections`, or the
    /// service at `spec.limits.maxRequests` with its queue full.
    pub const UPSTREAM_OVERFLOW: Flags = Flags(16);
    /// `DC`: the client went away before the answer was complete.
    pub const DOWNSTREAM_CLOSED: Flags = Flags(32);
    /// `RL`: refused by a rate limit (429).
    pub const RATE_LIMITED: Flags = Flags(64);
    /// `HG`: hedged: a second attempt raced the first after `retry.perTryTimeout`.
    pub const HEDGED: Flags = Flags(128);

    const NAMES: [(Flags, &'static str); 8] = [
        (Self::NO_HEALTHY_UPSTREAM, "UH"),
        (Self::UPSTREAM_CONNECT_FAILURE, "UF"),
        (Self::UPSTREAM_TIMEOUT, "UT"),
        (Self::RETRIES_EXHAUSTED, "URX"),
        (Self::UPSTREAM_OVERFLOW, "UO"),
        (Self::DOWNSTREAM_CLOSED, "DC"),
        (Self::RATE_LIMITED, "RL"),
        (Self::HEDGED, "HG"),
    ];

    /// Adds `other`.
    pub fn set(&mut self, other: Flags) {
        self.0 |= other.0;
    }

    /// Whether `other` is set.
    pub fn has(self, other: Flags) -> bool {
        self.0 & other.0 == other.0
    }

    /// Envoy's spelling: `UF,URX`, or `-` when none.
    pub fn text(self) -> String {
        let names: Vec<&str> = Self::NAMES
            .iter()
            .filter(|(f, _)| self.has(*f))
            .map(|(_, n)| *n)
            .collect();
        if names.is_empty() { "-".into() } else { names.join(",") }
    }
}

/// What the request path learnt about one request's upstream side.
#[derive(Clone, Debug, Default)]
pub struct Upstream {
    /// The endpoint that gave the answer (or the last one tried).
    pub endpoint: Option<SocketAddr>,
    /// Endpoints tried.
    pub attempts: u32,
    /// Envoy flags so far.
    pub flags: Flags,
    /// Request body bytes read from the client (when buffered).
    pub bytes_in: u64,
}

/// One access-log line before formatting.
#[derive(Debug)]
pub struct Entry {
    /// When the request (or connection) started.
    pub start: SystemTime,
    /// The client's address.
    pub client: SocketAddr,
    /// `namespace/name`.
    pub service: Arc<str>,
    /// Listener name.
    pub listener: Arc<str>,
    /// HTTP method; `None` for a TCP connection.
    pub method: Option<Method>,
    /// Request target.
    pub uri: Option<Uri>,
    /// `Host` or `:authority`.
    pub authority: Option<http::HeaderValue>,
    /// Client protocol.
    pub version: Option<Version>,
    /// Status answered; 0 for TCP.
    pub status: u16,
    /// Bytes from the client (request body, or the TCP stream).
    pub bytes_in: u64,
    /// Bytes to the client (response body, or the TCP stream).
    pub bytes_out: u64,
    /// Start to last byte.
    pub duration: Duration,
    /// Upstream facts.
    pub upstream: Upstream,
    /// The client connection's TLS version and SNI, when it came over TLS.
    pub tls: Option<crate::proxy::tls::Session>,
}

impl Entry {
    /// The JSON line, newline included.
    pub fn to_line(&self) -> String {
        let mut out = String::with_capacity(320);
        self.write_line(&mut out);
        out
    }

    /// Appends the JSON line, newline included, to `out`.
    fn write_line(&self, out: &mut String) {
        let time = jiff::Timestamp::try_from(self.start).unwrap_or(jiff::Timestamp::UNIX_EPOCH);
        let _ = write!(out, "{{\"time\":\"{time:.3}\",\"client\":\"{}\"", self.client);
        push_str(out, "service", &self.service);
        push_str(out, "listener", &self.listener);
        let protocol = match self.version {
            None => "TCP",
            Some(Version::HTTP_10) => "HTTP/1.0",
            Some(Version::HTTP_2) => "HTTP/2",
            Some(_) => "HTTP/1.1",
        };
        push_str(out, "protocol", protocol);
        if let Some(tls) = &self.tls {
            push_str(out, "tls_version", tls.version);
            if let Some(sni) = &tls.sni {
                push_str(out, "sni", sni);
            }
        }
        if let Some(m) = &self.method {
            push_str(out, "method", m.as_str());
        }
        let authority = self
            .authority
            .as_ref()
            .and_then(|v| v.to_str().ok())
            .or_else(|| self.uri.as_ref().and_then(|u| u.authority()).map(|a| a.as_str()));
        if let Some(a) = authority {
            push_str(out, "authority", a);
        }
        if let Some(u) = &self.uri {
            push_str(out, "path", u.path_and_query().map_or("/", |p| p.as_str()));
        }
        if self.status != 0 {
            let _ = write!(out, ",\"status\":{}", self.status);
        }
        let _ = write!(
            out,
            ",\"bytes_in\":{},\"bytes_out\":{},\"duration_ms\":{:.3}",
            self.bytes_in,
            self.bytes_out,
            self.duration.as_secs_f64() * 1000.0
        );
        match self.upstream.endpoint {
            Some(e) => {
                let _ = write!(out, ",\"upstream\":\"{e}\"");
            }
            None => out.push_str(",\"upstream\":null"),
        }
        let _ = write!(out, ",\"attempts\":{}", self.upstream.attempts);
        push_str(out, "flags", &self.upstream.flags.text());
        out.push_str("}\n");
    }
}

fn push_str(out: &mut String, key: &str, value: &str) {
    out.push_str(",\"");
    out.push_str(key);
    out.push_str("\":\"");
    // A client-sent path or authority can hold anything JSON must escape.
    for c in value.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 || c == '\u{7f}' => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Where access-log lines go; cheap to clone.
#[derive(Clone, Debug)]
pub struct AccessLog {
    tx: mpsc::Sender<String>,
    writer: std::thread::Thread,
    dropped: Counter,
}

impl AccessLog {
    /// Opens `path` for appending (`-` is standard output) and starts the
    /// writer thread.
    pub fn open(path: &str) -> io::Result<Self> {
        let out: Box<dyn Write + Send> = if path == "-" {
            Box::new(io::stdout())
        } else {
            Box::new(std::fs::OpenOptions::new().create(true).append(true).open(path)?)
        };
        let (tx, rx) = mpsc::channel(QUEUE);
        let writer = std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || write_lines(rx, out))?
            .thread()
            .clone();
        Ok(Self {
            tx,
            writer,
            dropped: Counter::default(),
        })
    }

    /// Counts dropped lines in `dropped` (the registered metric).
    pub fn with_dropped(mut self, dropped: Counter) -> Self {
        self.dropped = dropped;
        self
    }

    /// Queues `entry`'s line, or drops and counts it when the writer is behind.
    pub fn send(&self, entry: Entry) {
        // Formatted here, not by the writer: an entry holds the request's URI
        // and authority, which share hyper's read buffer, and keeping them
        // queued would keep those buffers from being reused (measured: fresh
        // pages and a tenth of HTTP/1.1 throughput).
        if self.tx.try_send(entry.to_line()).is_err() {
            self.dropped.inc();
            return;
        }
        // The writer wakes on its own every FLUSH; waking it per line would
        // cost a context switch per request on a busy core (measured: a third
        // of HTTP/1.1 throughput). Only a filling queue calls it early.
        if self.tx.capacity() < QUEUE / 2 {
            self.writer.unpark();
        }
    }
}

/// How long a line may wait in the queue (nginx `access_log ... flush=`).
const FLUSH: Duration = Duration::from_millis(100);

fn write_lines(mut rx: mpsc::Receiver<String>, out: Box<dyn Write + Send>) {
    use mpsc::error::TryRecvError;
    let mut out = io::BufWriter::with_capacity(64 * 1024, out);
    loop {
        std::thread::park_timeout(FLUSH);
        let closed = loop {
            match rx.try_recv() {
                Ok(line) => {
                    if out.write_all(line.as_bytes()).is_err() {
                        return;
                    }
                }
                Err(TryRecvError::Empty) => break false,
                Err(TryRecvError::Disconnected) => break true,
            }
        };
        if out.flush().is_err() || closed {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_is_json_with_envoy_flags() {
        let mut upstream = Upstream {
            endpoint: Some("10.0.0.2:8080".parse().unwrap()),
            attempts: 3,
            ..Default::default()
        };
        upstream.flags.set(Flags::UPSTREAM_CONNECT_FAILURE);
        upstream.flags.set(Flags::RETRIES_EXHAUSTED);
        let e = Entry {
            tls: None,
            start: SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123),
            client: "192.0.2.7:5555".parse().unwrap(),
            service: "default/web".into(),
            listener: "http".into(),
            method: Some(Method::GET),
            uri: Some("/a?q=1".parse().unwrap()),
            authority: Some(http::HeaderValue::from_static("shop.example.com")),
            version: Some(Version::HTTP_11),
            status: 502,
            bytes_in: 0,
            bytes_out: 61,
            duration: Duration::from_micros(1500),
            upstream,
        };
        let line = e.to_line();
        assert!(line.ends_with('\n'));
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["time"], "2023-11-14T22:13:20.123Z");
        assert_eq!(v["path"], "/a?q=1");
        let mut out = String::new();
        push_str(&mut out, "k", "a\"b\\c\n");
        assert_eq!(out, r#","k":"a\"b\\c\n""#);
        out.clear();
        push_str(&mut out, "k", "\u{1}\u{7f}é\t");
        let escaped: serde_json::Value = serde_json::from_str(&format!("{{{}}}", &out[1..])).unwrap();
        assert_eq!(escaped["k"], "\u{1}\u{7f}é\t");
        assert_eq!(v["flags"], "UF,URX");
        assert_eq!(v["attempts"], 3);
        assert_eq!(v["status"], 502);
        assert_eq!(v["upstream"], "10.0.0.2:8080");
        assert_eq!(v["duration_ms"], 1.5);
        assert_eq!(Flags::default().text(), "-");
    }
}
