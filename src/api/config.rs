//! The typed configuration of one BalancedService, produced only by `api::validate`.
//!
//! Everything downstream (prober, pickers, listeners, controller) reads these
//! types and never re-parses the spec's strings.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

pub use super::policy::{BudgetPolicy, RateLimit, RateLimitKey, RetryPolicy};
pub use super::spec::{HashSource, ListenerProtocol, PassiveCondition, RetryCondition};

/// `namespace/name` of a BalancedService.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
}

impl ServiceKey {
    /// Builds a key from its parts.
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A validated BalancedService.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// Which object this is.
    pub key: ServiceKey,
    /// Service whose EndpointSlices supply endpoints.
    pub service: Option<String>,
    /// Static endpoints.
    pub endpoints: Vec<EndpointConfig>,
    /// Listeners, in spec order.
    pub listeners: Vec<ListenerConfig>,
    /// Balancing algorithm.
    pub algorithm: Algorithm,
    /// Active health checks.
    pub health: HealthCheck,
    /// Passive ejection.
    pub passive: PassiveHealth,
    /// Retry policy.
    pub retry: RetryPolicy,
    /// Client-side and upstream timeouts.
    pub timeouts: Timeouts,
    /// Client connection and request-size limits.
    pub limits: Limits,
    /// The service's request rate limit.
    pub rate_limit: Option<RateLimit>,
    /// The ramp of an endpoint that turns healthy.
    pub slow_start: Option<SlowStart>,
    /// Named endpoint groups; group 0 is `default` (`service` and
    /// `endpoints` above), group `i` is `backends[i - 1]`.
    pub backends: Vec<Backend>,
    /// TLS to the endpoints of each group.
    pub backend_tls: GroupTls,
    /// HTTP routing rules, first match wins.
    pub routes: Vec<super::route::Route>,
    /// Proxy replicas.
    pub replicas: u32,
    /// Publish a `<name>-healthy` Service for the healthy EndpointSlices.
    pub publish_endpoint_slice: bool,
    /// Percent of endpoints that must be healthy; below it all serve (0: none).
    pub panic_threshold: u32,
    /// Add `x-balanced-endpoint` to responses.
    pub endpoint_header: bool,
    /// Name endpoints and errors in the proxy's error bodies.
    pub error_detail: bool,
}

/// Slow start: an endpoint's weight ramps over `window` after it turns healthy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlowStart {
    /// How long the ramp lasts.
    pub window: Duration,
    /// The curve's exponent is `1000 / aggression_milli` (1000: linear).
    pub aggression_milli: u32,
    /// The share of its weight an endpoint starts with, 1..=100.
    pub min_weight_percent: u32,
}

impl SlowStart {
    /// The share of its weight an endpoint that turned healthy `elapsed` ago
    /// takes, in (0, 1]; 1 once the window is over.
    pub fn factor(&self, elapsed: Duration) -> f64 {
        if elapsed >= self.window {
            return 1.0;
        }
        let progress = elapsed.as_secs_f64() / self.window.as_secs_f64();
        let curve = progress.powf(1000.0 / f64::from(self.aggression_milli.max(1)));
        curve.max(f64::from(self.min_weight_percent) / 100.0).min(1.0)
    }
}

/// An endpoint and how it takes part in balancing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointConfig {
    /// Address and (default) port.
    pub addr: SocketAddr,
    /// 1..=1000.
    pub weight: u32,
    /// Used only while no primary is available.
    pub backup: bool,
    /// 0 is unlimited.
    pub max_connections: u32,
}

/// A named endpoint group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backend {
    /// Its name.
    pub name: String,
    /// A Service whose EndpointSlices supply endpoints.
    pub service: Option<String>,
    /// Static endpoints.
    pub endpoints: Vec<EndpointConfig>,
}

/// TLS to endpoints, validated (the files are read when it is first used).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct BackendTls {
    /// SNI and the name verified; `None` verifies the endpoint's IP address.
    pub hostname: Option<String>,
    /// CAs to trust; `None` is the system's roots.
    pub ca_file: Option<std::path::PathBuf>,
    /// The Secret `ca_file` is written from (its `ca.crt`), in the cluster.
    pub ca_secret: Option<String>,
    /// Names accepted instead of `hostname`.
    pub subject_alt_names: Vec<String>,
    /// The client certificate for mutual TLS.
    pub client: Option<CertificateFiles>,
    /// No verification at all.
    pub insecure_skip_verify: bool,
}

/// The TLS each endpoint group speaks to its endpoints, indexed by group;
/// empty when no group speaks TLS.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GroupTls(pub Vec<Option<Arc<BackendTls>>>);

impl GroupTls {
    /// The TLS of an endpoint in `groups` (a bit per group): its first group's.
    pub fn for_groups(&self, groups: u64) -> Option<&Arc<BackendTls>> {
        self.0.get(groups.trailing_zeros() as usize)?.as_ref()
    }

    /// Whether any group speaks TLS.
    pub fn any(&self) -> bool {
        self.0.iter().any(Option::is_some)
    }
}

impl Config {
    /// Every Secret the spec names: listener certificates and endpoint TLS.
    pub fn secret_names(&self) -> std::collections::BTreeSet<String> {
        let mut names = self.endpoint_secret_names();
        for l in &self.listeners {
            for c in l.tls.iter().flat_map(|t| &t.certificates) {
                names.extend(c.secret.clone());
            }
        }
        names
    }

    /// The Secrets TLS to endpoints reads (what health checks need too).
    pub fn endpoint_secret_names(&self) -> std::collections::BTreeSet<String> {
        let mut names = std::collections::BTreeSet::new();
        for t in self.backend_tls.0.iter().flatten() {
            names.extend(t.ca_secret.clone());
            names.extend(t.client.as_ref().and_then(|c| c.secret.clone()));
        }
        names
    }

    /// The config with every Secret named replaced by the files it is
    /// written to (`dir_of(name)`), as a cluster source serves it.
    pub fn with_secret_files(mut self, dir_of: impl Fn(&str) -> std::path::PathBuf) -> Self {
        for l in &mut self.listeners {
            for c in l.tls.iter_mut().flat_map(|t| &mut t.certificates) {
                c.resolve(&dir_of);
            }
        }
        self.backend_tls = self.backend_tls.with_secret_files(&dir_of);
        self
    }
}

impl GroupTls {
    /// [`Config::with_secret_files`] for endpoint TLS alone (the controller's checks).
    pub fn with_secret_files(&self, dir_of: &impl Fn(&str) -> std::path::PathBuf) -> Self {
        GroupTls(
            self.0
                .iter()
                .map(|t| {
                    t.as_ref().map(|t| {
                        let mut t = (**t).clone();
                        if let Some(name) = &t.ca_secret {
                            t.ca_file = Some(dir_of(name).join("ca.crt"));
                        }
                        if let Some(c) = &mut t.client {
                            c.resolve(dir_of);
                        }
                        Arc::new(t)
                    })
                })
                .collect(),
        )
    }
}

/// The most groups a service has (`default` and 63 backends): group sets
/// are bit masks.
pub const MAX_GROUPS: usize = 64;

impl Config {
    /// The name of group `i`.
    pub fn group_name(&self, i: usize) -> &str {
        match i {
            0 => "default",
            i => self.backends.get(i - 1).map_or("default", |b| b.name.as_str()),
        }
    }

    /// The index of the group named `name`.
    pub fn group_index(&self, name: &str) -> Option<usize> {
        if name == "default" {
            return Some(0);
        }
        self.backends.iter().position(|b| b.name == name).map(|i| i + 1)
    }

    /// Every static endpoint of every group, with the groups it is in (a bit
    /// per group), each address once.
    pub fn static_members(&self) -> Vec<(EndpointConfig, u64)> {
        let mut out: Vec<(EndpointConfig, u64)> = Vec::new();
        let groups = std::iter::once(&self.endpoints).chain(self.backends.iter().map(|b| &b.endpoints));
        for (g, endpoints) in groups.enumerate() {
            for e in endpoints {
                match out.iter_mut().find(|(o, _)| o.addr == e.addr) {
                    Some((_, mask)) => *mask |= 1 << g,
                    None => out.push((e.clone(), 1 << g)),
                }
            }
        }
        out
    }
}

/// One listener.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListenerConfig {
    /// Unique name.
    pub name: String,
    /// Port the proxy listens on.
    pub port: u16,
    /// HTTP or TCP.
    pub protocol: ListenerProtocol,
    /// Port on the endpoints; `None` is the endpoint's own port.
    pub target_port: Option<TargetPort>,
    /// The endpoints' protocol; `None` is HTTP/1.1 with gRPC over h2c.
    pub app_protocol: Option<AppProtocol>,
    /// Keep the client's `X-Forwarded-Proto`.
    pub trust_forwarded_headers: bool,
    /// TLS terminated on this listener.
    pub tls: Option<ListenerTls>,
}

/// A listener's TLS settings, validated (the files are read when it starts).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListenerTls {
    /// Certificates by SNI, the first the default; at least one unless passed through.
    pub certificates: Vec<CertificateFiles>,
    /// The oldest version accepted.
    pub min_version: TlsVersion,
    /// The endpoints end the TLS, not the proxy (TCP listeners).
    pub passthrough: bool,
    /// Groups by SNI name (TCP listeners), first match wins.
    pub sni_routes: Vec<SniRoute>,
}

impl ListenerTls {
    /// The group a connection asking for `sni` goes to: its route's, else `default`.
    pub fn group_for(&self, sni: Option<&str>) -> usize {
        sni.and_then(|name| self.sni_routes.iter().find(|r| r.hosts.iter().any(|h| h.matches(name))))
            .map_or(0, |r| r.group)
    }
}

/// SNI names and the group they go to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SniRoute {
    /// Names, exact or wildcard.
    pub hosts: Vec<super::route::HostMatch>,
    /// The group's name, as written.
    pub backend: String,
    /// The group's index (0 is `default`).
    pub group: usize,
}

/// A certificate chain and its key, as PEM files.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct CertificateFiles {
    /// The chain, leaf first.
    pub cert: std::path::PathBuf,
    /// The private key.
    pub key: std::path::PathBuf,
    /// The Secret the files are written from, in the cluster; until the
    /// source resolves it, `cert` and `key` are the Secret's keys.
    pub secret: Option<String>,
}

impl CertificateFiles {
    /// The files of a `kubernetes.io/tls` Secret, to be resolved by the source.
    pub fn secret(name: &str) -> Self {
        Self {
            cert: "tls.crt".into(),
            key: "tls.key".into(),
            secret: Some(name.to_string()),
        }
    }

    fn resolve(&mut self, dir_of: &impl Fn(&str) -> std::path::PathBuf) {
        if let Some(name) = &self.secret {
            let dir = dir_of(name);
            self.cert = dir.join("tls.crt");
            self.key = dir.join("tls.key");
        }
    }

    /// What status shows of it: the Secret's name, else the certificate file.
    pub fn shown(&self) -> String {
        match &self.secret {
            Some(name) => format!("secret/{name}"),
            None => self.cert.display().to_string(),
        }
    }
}

/// TLS protocol versions a listener may require at least.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsVersion {
    /// TLS 1.2 and 1.3.
    V1_2,
    /// TLS 1.3 only.
    V1_3,
}

impl ListenerConfig {
    /// Where an endpoint at `addr` is reached through this listener: the
    /// numeric target port, the port the controller resolved for this
    /// listener in `ports` (a named target port), or the endpoint's own port.
    pub fn target_of(&self, addr: std::net::SocketAddr, ports: &[(String, u16)]) -> std::net::SocketAddr {
        match self.target_port {
            Some(TargetPort::Number(port)) => std::net::SocketAddr::new(addr.ip(), port),
            _ => match ports.iter().find(|(name, _)| *name == self.name) {
                Some((_, port)) => std::net::SocketAddr::new(addr.ip(), *port),
                None => addr,
            },
        }
    }
}

/// What the endpoints speak on a listener's port (Kubernetes `appProtocol`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AppProtocol {
    /// `http`: HTTP/1.1.
    Http1,
    /// `kubernetes.io/h2c`: HTTP/2 with prior knowledge.
    H2c,
}

impl AppProtocol {
    /// Parses the Kubernetes words (`http`, `kubernetes.io/h2c`, and the common
    /// `h2c`, `grpc`); `None` for anything else.
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "http" | "HTTP" | "http1" => Some(AppProtocol::Http1),
            "kubernetes.io/h2c" | "h2c" | "grpc" | "http2" => Some(AppProtocol::H2c),
            _ => None,
        }
    }

    /// The Kubernetes word for it.
    pub fn name(self) -> &'static str {
        match self {
            AppProtocol::Http1 => "http",
            AppProtocol::H2c => "kubernetes.io/h2c",
        }
    }
}

/// A listener's port on the endpoints.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum TargetPort {
    /// A port number.
    Number(u16),
    /// A named port of the Service's EndpointSlices.
    Name(String),
}

/// Balancing algorithm with its parameters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Algorithm {
    /// Full scan for the fewest active requests per weight.
    LeastConnections,
    /// Best of two weighted random picks by active requests.
    PowerOfTwoChoices,
    /// Smooth weighted round robin.
    RoundRobin,
    /// Weighted random.
    Random,
    /// Consistent hash of a request key.
    ConsistentHash(HashKey),
}

impl Algorithm {
    /// The spec's name for this algorithm.
    pub fn name(&self) -> &'static str {
        match self {
            Algorithm::LeastConnections => "LeastConnections",
            Algorithm::PowerOfTwoChoices => "PowerOfTwoChoices",
            Algorithm::RoundRobin => "RoundRobin",
            Algorithm::Random => "Random",
            Algorithm::ConsistentHash(_) => "ConsistentHash",
        }
    }
}

/// What ConsistentHash hashes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HashKey {
    /// Client IP.
    SourceIp,
    /// A request header (lower-case name).
    Header(http::HeaderName),
    /// A cookie.
    Cookie(String),
}

/// Active health check settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    /// What one probe does.
    pub probe: ProbeKind,
    /// Between probes while up or rising.
    pub interval: Duration,
    /// One probe's limit.
    pub timeout: Duration,
    /// Successes in a row to become healthy.
    pub rise: u32,
    /// Failures in a row to become unhealthy.
    pub fall: u32,
    /// Between probes while down.
    pub down_interval: Duration,
    /// Port override.
    pub port: Option<u16>,
    /// The agent check, if any.
    pub agent: Option<AgentCheck>,
}

impl HealthCheck {
    /// Whether endpoints report their load (an agent, or an agent header).
    pub fn reports_load(&self) -> bool {
        self.agent.is_some() || matches!(&self.probe, ProbeKind::Http(h) if h.agent_header.is_some())
    }
}

/// Where and how often to ask an endpoint's agent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentCheck {
    /// The agent's port.
    pub port: u16,
    /// Between questions.
    pub interval: Duration,
    /// One question's limit.
    pub timeout: Duration,
}

/// The kinds of probe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProbeKind {
    /// TCP connect.
    Tcp,
    /// TCP connect, then bytes sent and the answer checked.
    TcpPayload(TcpPayload),
    /// HTTP/1.1 request with an expected status.
    Http(HttpProbe),
    /// TLS handshake.
    Tls(TlsProbe),
    /// `grpc.health.v1.Health/Check` over h2c.
    Grpc(GrpcProbe),
}

/// The gRPC health check's question.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GrpcProbe {
    /// The service asked about; empty is the whole server.
    pub service: String,
    /// `:authority`; `None` sends the endpoint's address.
    pub authority: Option<String>,
}

impl ProbeKind {
    /// `TCP`, `HTTP` or `TLS`.
    pub fn name(&self) -> &'static str {
        match self {
            ProbeKind::Tcp | ProbeKind::TcpPayload(_) => "TCP",
            ProbeKind::Http(_) => "HTTP",
            ProbeKind::Tls(_) => "TLS",
            ProbeKind::Grpc(_) => "GRPC",
        }
    }
}

/// What a speaking TCP check sends and expects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TcpPayload {
    /// Sent once connected (may be empty).
    pub send: Vec<u8>,
    /// What the answer must be.
    pub expect: Expect,
}

/// The most a speaking TCP check reads of an answer.
pub const MAX_EXPECT_READ: usize = 4096;

/// An answer's expectation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Expect {
    /// The answer starts with these bytes.
    Prefix(Vec<u8>),
    /// The answer matches from its first byte.
    Regex(AnchoredRegex),
}

/// A regex matched at the start of the input, compared by its source.
#[derive(Clone, Debug)]
pub struct AnchoredRegex {
    source: String,
    re: regex::bytes::Regex,
}

impl AnchoredRegex {
    /// Compiles `source`, anchored at the start of the input.
    pub fn new(source: &str) -> Result<Self, regex::Error> {
        let re = regex::bytes::RegexBuilder::new(&format!("^(?:{source})"))
            .size_limit(1 << 20)
            .build()?;
        Ok(Self {
            source: source.to_string(),
            re,
        })
    }

    /// The regex as written.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Whether `bytes` match from their first byte.
    pub fn is_match(&self, bytes: &[u8]) -> bool {
        self.re.is_match(bytes)
    }
}

impl PartialEq for AnchoredRegex {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source
    }
}

impl Eq for AnchoredRegex {}

/// The HTTP probe's request and expectation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpProbe {
    /// Request method.
    pub method: http::Method,
    /// Path and query.
    pub path: String,
    /// Host header; `None` uses the endpoint address.
    pub host: Option<String>,
    /// Statuses that count as healthy.
    pub expect: StatusMatch,
    /// A response header carrying agent words.
    pub agent_header: Option<http::HeaderName>,
    /// Checks sent over one connection (1: a connection per check).
    pub keep_alive_requests: u32,
}

/// The TLS probe's settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsProbe {
    /// SNI; also the name verified when `verify` is set.
    pub server_name: Option<String>,
    /// Verify the chain against the system roots.
    pub verify: bool,
}

/// A set of HTTP status classes and exact codes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StatusMatch {
    rules: Vec<StatusRule>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum StatusRule {
    Class(u16),
    Code(u16),
}

impl StatusMatch {
    /// Parses `2xx` or `204`; `None` for anything else.
    pub fn parse_rule(text: &str) -> Option<(bool, u16)> {
        let bytes = text.as_bytes();
        if bytes.len() != 3 || !(b'1'..=b'5').contains(&bytes[0]) {
            return None;
        }
        let first = u16::from(bytes[0] - b'0');
        if &text[1..] == "xx" {
            return Some((true, first));
        }
        let code: u16 = text.parse().ok()?;
        text.bytes().all(|b| b.is_ascii_digit()).then_some((false, code))
    }

    /// Builds a matcher from already-checked rules.
    pub fn from_rules(rules: &[(bool, u16)]) -> Self {
        Self {
            rules: rules
                .iter()
                .map(|&(class, n)| {
                    if class {
                        StatusRule::Class(n)
                    } else {
                        StatusRule::Code(n)
                    }
                })
                .collect(),
        }
    }

    /// Whether `status` is expected.
    pub fn matches(&self, status: u16) -> bool {
        self.rules.iter().any(|rule| match *rule {
            StatusRule::Class(c) => status / 100 == c,
            StatusRule::Code(code) => status == code,
        })
    }
}

impl fmt::Display for StatusMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, rule) in self.rules.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            match rule {
                StatusRule::Class(c) => write!(f, "{c}xx")?,
                StatusRule::Code(code) => write!(f, "{code}")?,
            }
        }
        Ok(())
    }
}

/// Passive ejection settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PassiveHealth {
    /// Failures within the window that eject; 0 disables.
    pub max_fails: u32,
    /// Window and ejection length.
    pub fail_timeout: Duration,
    /// What counts as a failure.
    pub on: Vec<PassiveCondition>,
}

/// Timeouts on both sides of the proxy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// Upstream connection establishment.
    pub connect: Duration,
    /// End of the request upload to the response header.
    pub response: Duration,
    /// Connecting (or a keep-alive request's first byte) to the end of the request headers.
    pub request_header: Duration,
    /// Longest wait between two reads of a request body.
    pub request_body: Duration,
    /// Idle connection; `None` is the listener protocol's default.
    pub idle: Option<Duration>,
    /// Longest a client may leave what it is sent unread.
    pub response_write: Duration,
}

impl Timeouts {
    /// Idle timeout of an HTTP listener when `idle` is unset (nginx `keepalive_timeout` is 75s).
    pub const HTTP_IDLE: Duration = Duration::from_secs(60);
    /// Idle timeout of a TCP listener when `idle` is unset.
    pub const TCP_IDLE: Duration = Duration::from_secs(3600);

    /// The idle timeout that applies to a listener speaking `protocol`.
    pub fn idle_for(&self, protocol: ListenerProtocol) -> Duration {
        self.idle.unwrap_or(match protocol {
            ListenerProtocol::Http => Self::HTTP_IDLE,
            ListenerProtocol::Tcp => Self::TCP_IDLE,
        })
    }
}

/// Client connection and request-size limits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Open client connections per listener.
    pub max_connections: usize,
    /// Open connections per client IP per listener; 0 is no limit.
    pub max_connections_per_client: usize,
    /// Request head size (request line and headers).
    pub max_request_headers_bytes: usize,
    /// Header fields in a request.
    pub max_request_headers: usize,
    /// Request target length.
    pub max_uri_bytes: usize,
    /// HTTP requests in flight per service; 0 is no limit.
    pub max_requests: usize,
    /// Requests waiting for one of `max_requests`.
    pub max_pending_requests: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_rules_parse_classes_and_codes() {
        assert_eq!(StatusMatch::parse_rule("2xx"), Some((true, 2)));
        assert_eq!(StatusMatch::parse_rule("204"), Some((false, 204)));
        for bad in ["6xx", "20x", "2XX", "99", "2000", "abc", "+20", ""] {
            assert_eq!(StatusMatch::parse_rule(bad), None, "{bad}");
        }
    }

    #[test]
    fn status_match_checks_class_and_code() {
        let m = StatusMatch::from_rules(&[(true, 2), (false, 301)]);
        assert!(m.matches(200) && m.matches(299) && m.matches(301));
        assert!(!m.matches(302) && !m.matches(500) && !m.matches(199));
        assert_eq!(m.to_string(), "2xx, 301");
    }
}
