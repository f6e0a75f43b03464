//! The `BalancedService` custom resource as users write it.
//!
//! These types are the wire contract (CRD schema, YAML files). They stay loose
//! where a typed field would turn a user mistake into an unhelpful serde error
//! (durations and status classes are strings, ports are `i32` like Kubernetes'
//! own): `api::validate` turns them into the typed [`crate::api::Config`].
//! Rules the CRD schema can carry (ranges, enums, patterns, CEL) are declared
//! here too, so `kubectl apply` rejects bad objects before the controller sees them.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Pattern every duration string must match (a subset of Go's `time.ParseDuration`,
/// so CEL's `duration()` can compare them in the CRD schema).
pub const DURATION_PATTERN: &str = "^(0|[0-9]+(ms|s|m|h))$";

/// Desired state of a BalancedService: where its endpoints come from, how they are
/// checked, and how the proxy in front of them balances and retries.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "balanced.dev",
    version = "v1alpha1",
    kind = "BalancedService",
    plural = "balancedservices",
    shortname = "bsvc",
    namespaced,
    status = "BalancedServiceStatus",
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.ready","description":"Endpoints serving / endpoints known"}"#,
    printcolumn = r#"{"name":"Algorithm","type":"string","jsonPath":".spec.algorithm"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "has(self.service) || (has(self.endpoints) && size(self.endpoints) > 0)",
     "message": "spec needs service or endpoints"},
    {"rule": "has(self.hash) == (has(self.algorithm) && self.algorithm == 'ConsistentHash')",
     "message": "spec.hash is required with algorithm ConsistentHash and only then"},
]))]
pub struct BalancedServiceSpec {
    /// Name of a Service in the same namespace whose EndpointSlices supply endpoints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub service: Option<String>,

    /// Static endpoints, used alongside the Service's (the only source in standalone).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 1000))]
    pub endpoints: Vec<StaticEndpoint>,

    /// Named endpoint groups besides the default one (the top-level
    /// `service` and `endpoints`, named `default`), for `routes` to send to.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 63))]
    pub backends: Vec<BackendSpec>,

    /// Routing rules for HTTP requests, first match wins; a request no route
    /// matches goes to `default` (Gateway API `HTTPRoute` rules).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 1000))]
    pub routes: Vec<RouteSpec>,

    /// Ports the proxy listens on.
    #[schemars(length(min = 1, max = 32))]
    #[schemars(extend(
        "x-kubernetes-list-type" = "map",
        "x-kubernetes-list-map-keys" = ["name"],
        "x-kubernetes-validations" = [
            {"rule": "self.all(l, self.filter(m, m.port == l.port).size() == 1)",
             "message": "listener ports must be unique"}
        ]
    ))]
    pub listeners: Vec<Listener>,

    /// How the proxy picks an endpoint for a request or connection.
    #[serde(default)]
    pub algorithm: Algorithm,

    /// What ConsistentHash hashes on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash: Option<HashSpec>,

    /// Active health checks made by the controller (or standalone) for every endpoint.
    #[serde(default)]
    pub health_check: HealthCheckSpec,

    /// Ejection of endpoints on the proxy's own failures (nginx max_fails / fail_timeout).
    #[serde(default)]
    pub passive_health: PassiveHealthSpec,

    /// When and how often a failed request is retried on another endpoint.
    #[serde(default)]
    pub retry: RetrySpec,

    /// Client-side and upstream timeouts, for every listener of the service.
    #[serde(default)]
    pub timeouts: TimeoutsSpec,

    /// Connection and request-size limits, for every listener of the service.
    #[serde(default)]
    pub limits: LimitsSpec,

    /// A request rate limit for the service's HTTP listeners (nginx `limit_req`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimitSpec>,

    /// An endpoint that turns healthy takes a share that ramps up over a
    /// window instead of all it can get at once (Envoy `slow_start_config`,
    /// HAProxy `slowstart`, nginx `slow_start`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slow_start: Option<SlowStartSpec>,

    /// TLS to the endpoints, for every group without its own (Gateway API
    /// `BackendTLSPolicy`, nginx `proxy_ssl_*`, HAProxy `server ... ssl`).
    #[serde(default, rename = "backendTLS", skip_serializing_if = "Option::is_none")]
    pub backend_tls: Option<BackendTlsSpec>,

    /// The proxy Deployment made for this BalancedService.
    #[serde(default)]
    pub proxy: ProxySpec,

    /// Maintain an EndpointSlice of the healthy endpoints for a `<name>-healthy` Service.
    #[serde(default)]
    pub publish_endpoint_slice: bool,

    /// Debugging aids that reveal endpoint addresses to clients; off by default.
    #[serde(default)]
    pub debug: DebugSpec,
}

/// Slow start, in Envoy's words: over `window` after an endpoint turns
/// healthy its weight is scaled by `max(minWeightPercent/100,
/// (elapsed/window)^(1/aggression))`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SlowStartSpec {
    /// How long the ramp lasts.
    #[schemars(pattern(r"^(0|[0-9]+(ms|s|m|h))$"))]
    pub window: String,
    /// The ramp's curve: 1.0 is linear, larger values give more traffic early.
    #[serde(default = "default_aggression")]
    #[schemars(range(min = 0.0, max = 10.0))]
    pub aggression: f64,
    /// The share of its weight an endpoint starts with, in percent.
    #[serde(default = "default_min_weight_percent")]
    #[schemars(range(min = 1, max = 100))]
    pub min_weight_percent: i32,
}

/// Debugging aids; both reveal internal addresses to clients.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DebugSpec {
    /// Add `x-balanced-endpoint: ADDRESS:PORT` to every proxied response.
    #[serde(default)]
    pub endpoint_header: bool,
    /// Name the endpoints and their errors in the proxy's own 502/503/504 bodies.
    #[serde(default)]
    pub error_detail: bool,
}

/// An endpoint named in the spec rather than discovered.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StaticEndpoint {
    /// IPv4 or IPv6 address.
    #[schemars(length(min = 1, max = 45))]
    pub address: String,
    /// Port the listeners forward to (a listener's numeric targetPort overrides it).
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
    /// Relative share of traffic, 1..=1000 (nginx `weight`).
    #[serde(default = "default_weight")]
    #[schemars(range(min = 1, max = 1000))]
    pub weight: i32,
    /// Served only while no primary endpoint is available (nginx `backup`).
    #[serde(default)]
    pub backup: bool,
    /// Cap on concurrent requests/connections; 0 is unlimited (nginx `max_conns`).
    #[serde(default)]
    #[schemars(range(min = 0))]
    pub max_connections: i32,
}

/// A named group of endpoints: a Service's, static ones, or both.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackendSpec {
    /// Unique name that routes refer to (`default` is the top-level group).
    #[schemars(length(min = 1, max = 63))]
    pub name: String,
    /// A Service in the same namespace whose EndpointSlices supply endpoints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// Static endpoints of this group.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<StaticEndpoint>,
    /// TLS to this group's endpoints, instead of `spec.backendTLS`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<BackendTlsSpec>,
}

/// How the proxy and the health checks speak TLS to endpoints, in the words
/// of the Gateway API's `BackendTLSPolicy`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BackendTlsSpec {
    /// The name sent as SNI and verified in the endpoint's certificate;
    /// unset, no SNI is sent and the certificate must name the endpoint's IP address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub hostname: Option<String>,
    /// PEM file of the CAs that sign the endpoints' certificates; unset
    /// (and no `caSecretName`), the system's roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 4096))]
    pub ca_file: Option<String>,
    /// A Secret in this namespace whose `ca.crt` holds those CAs, instead of `caFile`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub ca_secret_name: Option<String>,
    /// DNS names any one of which the endpoint's certificate may carry
    /// instead of `hostname` (which is still sent as SNI).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub subject_alt_names: Vec<String>,
    /// A certificate presented to endpoints that ask for one (mutual TLS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_certificate: Option<CertificateFilesSpec>,
    /// Accept any certificate: for testing only; status warns while it is set.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub insecure_skip_verify: bool,
}

/// One routing rule.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RouteSpec {
    /// Unique name, shown in `x-balanced-route` and metrics.
    #[schemars(length(min = 1, max = 63))]
    pub name: String,
    /// The route applies when any match holds (all of a match's conditions);
    /// none means every request.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub matches: Vec<RouteMatchSpec>,
    /// Where its requests go, split by weight (Gateway API `backendRefs`).
    #[schemars(length(min = 1))]
    pub backend_refs: Vec<BackendRefSpec>,
    /// Retry settings for this route; fields left out keep `spec.retry`'s
    /// (the budget and `maxBodyBytes` are always the service's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RouteRetrySpec>,
    /// Timeouts for this route's requests; fields left out keep `spec.timeouts`'s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeouts: Option<RouteTimeoutsSpec>,
    /// A rate limit for this route's requests, besides the service's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimitSpec>,
}

/// A route's retry settings.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RouteRetrySpec {
    /// Conditions that send a request to the next endpoint of the route's group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on: Option<Vec<RetryCondition>>,
    /// Endpoints tried at most, the first included; 0 is every endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tries: Option<i32>,
    /// Time for all attempts together; `0` is no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
}

/// A route's timeouts: the ones that belong to a request, not a connection.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RouteTimeoutsSpec {
    /// From the end of the request upload to the response head.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response: Option<String>,
}

/// A backend a route sends to, and its share.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackendRefSpec {
    /// A `backends[].name`, or `default`.
    pub name: String,
    /// Relative share; 0 drains the group (Gateway API `weight`, default 1).
    #[serde(default = "default_weight")]
    #[schemars(range(min = 0, max = 1000000))]
    pub weight: i32,
}

/// Conditions that must all hold.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RouteMatchSpec {
    /// The request path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathMatchSpec>,
    /// The method (`GET`, `POST`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// Request headers, by name (case-insensitive).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<ValueMatchSpec>,
    /// Query parameters, by name (percent-decoded values).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub query_params: Vec<ValueMatchSpec>,
    /// Cookies, by name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cookies: Vec<ValueMatchSpec>,
    /// Top-level keys of a form (`application/x-www-form-urlencoded`) or JSON
    /// (`application/json`) body that fits in `retry.maxBodyBytes`; a larger
    /// or other body does not match. JSON numbers and booleans compare as
    /// their text (`42`, `true`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub body_params: Vec<ValueMatchSpec>,
    /// The request's host: `shop.example.com`, or `*.example.com` for any one
    /// or more labels in front of `example.com`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hostnames: Vec<String>,
}

/// A path condition.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct PathMatchSpec {
    /// `Exact`, `PathPrefix` (on segment boundaries: `/api` matches `/api/x`,
    /// not `/apix`) or `RegularExpression` (the whole path).
    #[serde(rename = "type", default)]
    pub type_: PathMatchType,
    /// The path, prefix or expression.
    #[serde(default = "default_path_value")]
    pub value: String,
}

/// How a path is compared.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum PathMatchType {
    /// The whole path.
    Exact,
    /// Whole leading segments.
    #[default]
    PathPrefix,
    /// A regular expression over the whole path.
    RegularExpression,
}

/// A named value's condition (header, query parameter, cookie).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct ValueMatchSpec {
    /// The header, parameter or cookie name.
    pub name: String,
    /// `Exact` (the default) or `RegularExpression` (the whole value).
    #[serde(rename = "type", default)]
    pub type_: ValueMatchType,
    /// The value or expression.
    pub value: String,
}

/// How a value is compared.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum ValueMatchType {
    /// Equal.
    #[default]
    Exact,
    /// A regular expression over the whole value.
    RegularExpression,
}

fn default_path_value() -> String {
    "/".into()
}

/// One port the proxy serves.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Listener {
    /// Unique name; also the Service port name.
    #[schemars(length(min = 1, max = 15))]
    pub name: String,
    /// Port the proxy listens on.
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
    /// HTTP (HTTP/1.1 and h2c, balanced per request) or TCP (balanced per connection).
    #[serde(default)]
    pub protocol: ListenerProtocol,
    /// Port on the endpoints, a number or a port name of the Service's EndpointSlices;
    /// defaults to the endpoint's own port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_port: Option<PortRef>,
    /// The protocol the endpoints speak on this port, in Kubernetes' `appProtocol` words:
    /// `http` (HTTP/1.1) or `kubernetes.io/h2c` (HTTP/2 prior knowledge). Unset: the
    /// Service port's `appProtocol` in the cluster, else HTTP/1.1 with gRPC requests over h2c.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub app_protocol: Option<String>,
    /// Keep a client's `X-Forwarded-Proto` instead of replacing it: only for a
    /// listener whose clients are proxies you run (a cloud load balancer in front).
    #[serde(default)]
    pub trust_forwarded_headers: bool,
    /// Terminate TLS on this listener (nginx `listen ssl`, HAProxy `bind ssl crt`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<ListenerTlsSpec>,
}

/// A listener's TLS: one certificate (`certFile` and `keyFile`, or
/// `secretName`) or several chosen by SNI (`certificates`, the first one the
/// default).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ListenerTlsSpec {
    /// PEM certificate chain, leaf first (standalone: a path on the proxy's host).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 4096))]
    pub cert_file: Option<String>,
    /// PEM private key of `certFile`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 4096))]
    pub key_file: Option<String>,
    /// A `kubernetes.io/tls` Secret in this namespace (`tls.crt`, `tls.key`),
    /// instead of files (in the cluster).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub secret_name: Option<String>,
    /// Several certificates, chosen by the name the client asks for (SNI);
    /// the first answers clients that ask for none or for another name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub certificates: Vec<CertificateFilesSpec>,
    /// The oldest TLS version accepted: `"1.2"` (default) or `"1.3"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(r"^1\.[23]$"))]
    pub min_version: Option<String>,
    /// `Terminate` (default): the proxy holds the certificate. `Passthrough`
    /// (TCP listeners): the client's TLS goes to the endpoint untouched,
    /// balanced per connection and routed by the name it asks for (SNI).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<TlsMode>,
    /// On a TCP listener, the backend group each SNI name goes to (Gateway
    /// API `TLSRoute`), first match wins; other names go to `default`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub sni_routes: Vec<SniRouteSpec>,
}

/// Who ends a listener's TLS.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum TlsMode {
    /// The proxy, with its certificates.
    #[default]
    Terminate,
    /// The endpoint: bytes pass through, only the ClientHello's SNI is read.
    Passthrough,
}

/// Connections whose SNI is one of `hostnames` go to `backend`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SniRouteSpec {
    /// Names, exact or `*.` wildcards (one or more labels).
    #[schemars(length(min = 1, max = 16))]
    pub hostnames: Vec<String>,
    /// A group: `default` or a `spec.backends[].name`.
    #[schemars(length(min = 1, max = 63))]
    pub backend: String,
}

/// One certificate and its key: PEM files, or a `kubernetes.io/tls` Secret.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CertificateFilesSpec {
    /// PEM certificate chain, leaf first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 4096))]
    pub cert_file: Option<String>,
    /// PEM private key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 4096))]
    pub key_file: Option<String>,
    /// A Secret in this namespace holding `tls.crt` and `tls.key`, instead of files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub secret_name: Option<String>,
}

/// A port given as a number or as a named port.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash)]
#[serde(untagged)]
pub enum PortRef {
    /// A port number.
    Number(i32),
    /// A port name, resolved against EndpointSlice ports.
    Name(String),
}

impl JsonSchema for PortRef {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "PortRef".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "x-kubernetes-int-or-string": true,
            "description": "Port number or port name"
        })
    }
}

/// Listener protocols.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum ListenerProtocol {
    /// HTTP/1.1 and HTTP/2 cleartext, balanced per request.
    #[default]
    #[serde(rename = "HTTP")]
    Http,
    /// Raw TCP, balanced per connection.
    #[serde(rename = "TCP")]
    Tcp,
}

/// Load-balancing algorithms.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum Algorithm {
    /// Fewest active requests per unit of weight, scanning every endpoint (nginx `least_conn`).
    #[default]
    LeastConnections,
    /// Fewest active requests of two weighted random picks (Envoy LEAST_REQUEST, HAProxy `random(2)`).
    PowerOfTwoChoices,
    /// Smooth weighted round robin (nginx default).
    RoundRobin,
    /// Weighted random.
    Random,
    /// Consistent hash of a request key (see `hash`).
    ConsistentHash,
}

/// The key ConsistentHash hashes.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "self.source == 'SourceIP' || (has(self.name) && size(self.name) > 0)",
     "message": "hash.name is required for Header and Cookie"}
]))]
pub struct HashSpec {
    /// Where the key comes from.
    pub source: HashSource,
    /// Header or cookie name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256))]
    pub name: Option<String>,
}

/// Sources of a consistent-hash key.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum HashSource {
    /// The client's IP address (the only source for TCP listeners).
    #[serde(rename = "SourceIP")]
    SourceIp,
    /// A request header.
    Header,
    /// A request cookie.
    Cookie,
}

/// Active health check settings (Tengine `check`, HAProxy `check inter rise fall`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "duration(self.timeout) < duration(self.interval)",
     "message": "healthCheck.timeout must be less than healthCheck.interval"}
]))]
pub struct HealthCheckSpec {
    /// TCP (connect), HTTP (request, expected status), GRPC (the gRPC health
    /// protocol over h2c) or TLS (handshake).
    #[serde(default)]
    pub protocol: ProbeProtocol,
    /// Time between probes of an endpoint that is up or coming up.
    #[serde(default = "default_interval")]
    #[schemars(pattern(r"^(0|[0-9]+(ms|s|m|h))$"))]
    pub interval: String,
    /// Time one probe may take.
    #[serde(default = "default_probe_timeout")]
    #[schemars(pattern(r"^(0|[0-9]+(ms|s|m|h))$"))]
    pub timeout: String,
    /// Consecutive successes that make an endpoint healthy.
    #[serde(default = "default_rise")]
    #[schemars(range(min = 1, max = 100))]
    pub rise: i32,
    /// Consecutive failures that make an endpoint unhealthy.
    #[serde(default = "default_fall")]
    #[schemars(range(min = 1, max = 100))]
    pub fall: i32,
    /// Time between probes of an endpoint that is down (HAProxy `downinter`); defaults to `interval`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(r"^(0|[0-9]+(ms|s|m|h))$"))]
    pub down_interval: Option<String>,
    /// Probe this port instead of the endpoint's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<i32>,
    /// HTTP probe settings (protocol HTTP).
    #[serde(default)]
    pub http: HttpCheckSpec,
    /// TLS probe settings (protocol TLS).
    #[serde(default)]
    pub tls: TlsCheckSpec,
    /// Bytes to send and the answer to expect (protocol TCP; HAProxy
    /// `tcp-check send/expect`): Redis `PING`/`+PONG`, a banner.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<TcpCheckSpec>,
    /// The service asked about and the authority sent (protocol GRPC;
    /// `grpc.health.v1.Health/Check`, as Kubernetes' `grpc:` probes and Envoy ask).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc: Option<GrpcCheckSpec>,
    /// Load and state reported by the endpoint on its own port, in HAProxy
    /// `agent-check` words (`75%`, `drain`, `ready`, `down`, `up`, `maint`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<AgentCheckSpec>,
    /// Percent of endpoints that must be healthy; below it every endpoint is
    /// treated as serving (Envoy's panic threshold). 0: only when none is.
    #[serde(default)]
    #[schemars(range(min = 0, max = 100))]
    pub panic_threshold: i32,
}

/// An agent check (HAProxy `agent-check agent-port agent-inter`): connect to
/// the endpoint's agent port and read one line of agent words.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AgentCheckSpec {
    /// The agent's port on the endpoint's address.
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
    /// Time between two questions to the agent (HAProxy `agent-inter`, 2s).
    #[serde(default = "default_agent_interval")]
    #[schemars(pattern(r"^(0|[0-9]+(ms|s|m|h))$"))]
    pub interval: String,
    /// Time the agent has to answer.
    #[serde(default = "default_probe_timeout")]
    #[schemars(pattern(r"^(0|[0-9]+(ms|s|m|h))$"))]
    pub timeout: String,
}

/// Probe protocols.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum ProbeProtocol {
    /// The TCP connection is established.
    #[default]
    #[serde(rename = "TCP")]
    Tcp,
    /// An HTTP/1.1 request gets an expected status.
    #[serde(rename = "HTTP")]
    Http,
    /// A TLS handshake completes.
    #[serde(rename = "TLS")]
    Tls,
    /// `grpc.health.v1.Health/Check` over h2c answers `SERVING`.
    #[serde(rename = "GRPC")]
    Grpc,
}

impl ProbeProtocol {
    /// The name as written in a spec.
    pub fn name(self) -> &'static str {
        match self {
            ProbeProtocol::Tcp => "TCP",
            ProbeProtocol::Http => "HTTP",
            ProbeProtocol::Tls => "TLS",
            ProbeProtocol::Grpc => "GRPC",
        }
    }
}

/// The request an HTTP probe sends and what it expects back.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HttpCheckSpec {
    /// Request method.
    #[serde(default = "default_method")]
    #[schemars(pattern(r"^[A-Z]+$"), length(max = 16))]
    pub method: String,
    /// Request path (with query, if any).
    #[serde(default = "default_path")]
    #[schemars(pattern(r"^/"), length(max = 1024))]
    pub path: String,
    /// Host header; empty means the endpoint's address.
    #[serde(default)]
    #[schemars(length(max = 253))]
    pub host: String,
    /// Status classes (`2xx`) or exact codes (`204`) that count as healthy.
    #[serde(default = "default_expect_status")]
    #[schemars(length(min = 1, max = 16))]
    #[schemars(inner(pattern(r"^([1-5]xx|[1-5][0-9][0-9])$")))]
    pub expect_status: Vec<String>,
    /// A response header carrying agent words (`X-Load: 75%`, `drain`), read
    /// on every probe as a TCP agent's line would be.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64))]
    pub agent_header: Option<String>,
    /// Checks sent over one connection before it is closed (Tengine
    /// `check_keepalive_requests`); 1 opens a connection per check.
    #[serde(default = "default_keep_alive_requests")]
    #[schemars(range(min = 1, max = 10000))]
    pub keep_alive_requests: i32,
}

/// The gRPC health check's question.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GrpcCheckSpec {
    /// The service name asked about; empty asks about the server as a whole.
    #[serde(default)]
    #[schemars(length(max = 256))]
    pub service: String,
    /// The `:authority` sent; empty sends the endpoint's address.
    #[serde(default)]
    #[schemars(length(max = 253))]
    pub authority: String,
}

/// A TCP check that speaks: what to send once connected, and what the
/// endpoint's first bytes must be.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TcpCheckSpec {
    /// Sent once connected; none for a server that speaks first (a banner).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub send: Option<PayloadSpec>,
    /// What the answer must start with (`text`, `hex`) or match from its first byte (`regex`).
    pub expect: ExpectSpec,
}

/// Bytes, as text or hex (one of the two).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PayloadSpec {
    /// The bytes as text (YAML escapes such as `"PING\r\n"` apply).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 4096))]
    pub text: Option<String>,
    /// The bytes in hex (`50494e470d0a`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 8192))]
    pub hex: Option<String>,
}

/// The expected answer: a prefix as text or hex, or a regex anchored at its start (one of the three).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExpectSpec {
    /// The answer starts with these bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 4096))]
    pub text: Option<String>,
    /// The answer starts with these bytes, in hex.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 8192))]
    pub hex: Option<String>,
    /// The answer matches this regex from its first byte (within the first 4 KiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub regex: Option<String>,
}

/// TLS probe settings.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TlsCheckSpec {
    /// SNI name to send; empty sends none.
    #[serde(default)]
    #[schemars(length(max = 253))]
    pub server_name: String,
    /// Verify the certificate chain against the system roots and `serverName`.
    #[serde(default)]
    pub verify: bool,
}

/// Passive ejection on the proxy's own failures (nginx `max_fails` / `fail_timeout`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PassiveHealthSpec {
    /// Failures within `failTimeout` that eject an endpoint; 0 disables ejection.
    #[serde(default = "default_max_fails")]
    #[schemars(range(min = 0, max = 1000))]
    pub max_fails: i32,
    /// The window failures are counted in, and how long an ejection lasts.
    #[serde(default = "default_fail_timeout")]
    #[schemars(pattern(r"^(0|[0-9]+(ms|s|m|h))$"))]
    pub fail_timeout: String,
    /// What counts as a failure: Error and Timeout by default; Http5xx codes only when named.
    #[serde(default = "default_passive_on")]
    #[schemars(length(max = 8))]
    pub on: Vec<PassiveCondition>,
}

/// Failures passive health can count.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum PassiveCondition {
    /// Connect refused, reset, or other transport error.
    Error,
    /// Connect or response timeout.
    Timeout,
    /// Upstream answered 500.
    Http500,
    /// Upstream answered 502.
    Http502,
    /// Upstream answered 503.
    Http503,
    /// Upstream answered 504.
    Http504,
}

/// Retry policy (nginx `proxy_next_upstream`, `_tries`, `_timeout`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RetrySpec {
    /// Conditions that send a request to the next endpoint.
    #[serde(default = "default_retry_on")]
    #[schemars(length(max = 16))]
    pub on: Vec<RetryCondition>,
    /// Total attempts including the first; 0 means one per endpoint.
    #[serde(default = "default_tries")]
    #[schemars(range(min = 0, max = 100))]
    pub tries: i32,
    /// Stop retrying after this long; 0 is no limit.
    #[serde(default = "default_retry_timeout")]
    #[schemars(pattern(r"^(0|[0-9]+(ms|s|m|h))$"))]
    pub timeout: String,
    /// Request bodies up to this size are buffered so they can be replayed on retry.
    #[serde(default = "default_retry_buffer")]
    #[schemars(range(min = 0, max = 16777216))]
    pub max_body_bytes: i64,
    /// Caps retries to a share of recent requests (Gateway API GEP-3388, Linkerd).
    #[serde(default)]
    pub budget: RetryBudgetSpec,
    /// How long one attempt may wait for its response head before it counts
    /// as timed out (Envoy `per_try_timeout`); unset: `timeouts.response`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(r"^(0|[0-9]+(ms|s|m|h))$"))]
    pub per_try_timeout: Option<String>,
    /// After `perTryTimeout` send the request to another endpoint as well,
    /// keep the first answer and cancel the other (Envoy
    /// `hedge_on_per_try_timeout`); only for request bodies that were buffered.
    #[serde(default)]
    pub hedge: bool,
}

/// Retries allowed: up to `percent` of the requests seen over `interval`, and never
/// fewer than `minRetryRate` (Gateway API `retryConstraint`, Linkerd's retry budget).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RetryBudgetSpec {
    /// Retries as a percentage of requests over `interval`; 0 leaves only the floor.
    #[serde(default = "default_budget_percent")]
    #[schemars(range(min = 0, max = 100))]
    pub percent: i32,
    /// The window requests and retries are counted over.
    #[serde(default = "default_budget_interval")]
    #[schemars(pattern(r"^(0|[0-9]+(ms|s|m|h))$"))]
    pub interval: String,
    /// Retries always allowed, whatever the percentage says.
    #[serde(default)]
    pub min_retry_rate: RetryRateSpec,
}

/// A number of retries per interval.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RetryRateSpec {
    /// Retries per `interval`.
    #[serde(default = "default_min_retry_count")]
    #[schemars(range(min = 0, max = 1000000))]
    pub count: i32,
    /// The interval `count` is per.
    #[serde(default = "default_min_retry_interval")]
    #[schemars(pattern(r"^(0|[0-9]+(ms|s|m|h))$"))]
    pub interval: String,
}

/// Conditions a retry can be made on.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum RetryCondition {
    /// Connect failure, reset, or a connection closed before a response.
    Error,
    /// Connect or response timeout.
    Timeout,
    /// The upstream sent a malformed or empty response header.
    InvalidHeader,
    /// Upstream answered 500.
    Http500,
    /// Upstream answered 502.
    Http502,
    /// Upstream answered 503.
    Http503,
    /// Upstream answered 504.
    Http504,
    /// Upstream answered 403.
    Http403,
    /// Upstream answered 404.
    Http404,
    /// Upstream answered 429.
    Http429,
    /// Also retry POST, PATCH and LOCK after they were sent.
    NonIdempotent,
    /// A gRPC call answered `CANCELLED` (1) without a message (a
    /// trailers-only response). Like the other gRPC conditions it applies
    /// to gRPC's POSTs without `NonIdempotent`: listing it says the
    /// service's calls may be retried on that status (Envoy `retry_on:
    /// cancelled`, gRPC's `retryableStatusCodes`).
    GrpcCancelled,
    /// A gRPC call answered `DEADLINE_EXCEEDED` (4) without a message.
    GrpcDeadlineExceeded,
    /// A gRPC call answered `RESOURCE_EXHAUSTED` (8) without a message.
    GrpcResourceExhausted,
    /// A gRPC call answered `INTERNAL` (13) without a message.
    GrpcInternal,
    /// A gRPC call answered `UNAVAILABLE` (14) without a message (a server
    /// shutting down answers the calls it had not started so), or whose
    /// connection broke before any answer (what a gRPC client sees as
    /// `UNAVAILABLE`: a server that stops closes the calls it had taken).
    GrpcUnavailable,
}

impl RetryCondition {
    /// The name `retry.on` spells it with, for metrics and logs.
    pub fn name(self) -> &'static str {
        use RetryCondition::*;
        match self {
            Error => "Error",
            Timeout => "Timeout",
            InvalidHeader => "InvalidHeader",
            Http500 => "Http500",
            Http502 => "Http502",
            Http503 => "Http503",
            Http504 => "Http504",
            Http403 => "Http403",
            Http404 => "Http404",
            Http429 => "Http429",
            NonIdempotent => "NonIdempotent",
            GrpcCancelled => "GrpcCancelled",
            GrpcDeadlineExceeded => "GrpcDeadlineExceeded",
            GrpcResourceExhausted => "GrpcResourceExhausted",
            GrpcInternal => "GrpcInternal",
            GrpcUnavailable => "GrpcUnavailable",
        }
    }

    /// Whether this is one of the gRPC status conditions.
    pub fn is_grpc(self) -> bool {
        use RetryCondition::*;
        matches!(
            self,
            GrpcCancelled | GrpcDeadlineExceeded | GrpcResourceExhausted | GrpcInternal | GrpcUnavailable
        )
    }
}

/// Timeouts on both sides of the proxy.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TimeoutsSpec {
    /// Time to establish an upstream connection (nginx `proxy_connect_timeout`).
    #[serde(default = "default_connect_timeout")]
    #[schemars(pattern(r"^(0|[0-9]+(ms|s|m|h))$"))]
    pub connect: String,
    /// Time from the end of the request upload to the response header
    /// (nginx `proxy_read_timeout`, HAProxy `timeout server`).
    #[serde(default = "default_response_timeout")]
    #[schemars(pattern(r"^(0|[0-9]+(ms|s|m|h))$"))]
    pub response: String,
    /// Time a client has from its first byte (or from connecting) to the end of
    /// the request headers, h2 preface included (HAProxy `timeout http-request`).
    #[serde(default = "default_request_header_timeout")]
    #[schemars(pattern(r"^(0|[0-9]+(ms|s|m|h))$"))]
    pub request_header: String,
    /// Longest wait between two reads of a request body (nginx `client_body_timeout`).
    #[serde(default = "default_request_body_timeout")]
    #[schemars(pattern(r"^(0|[0-9]+(ms|s|m|h))$"))]
    pub request_body: String,
    /// Longest a connection may sit with nothing to do: between keep-alive
    /// requests on HTTP, with no bytes either way on TCP and tunnels. Unset:
    /// 60s on HTTP listeners, 1h on TCP listeners (nginx `keepalive_timeout`,
    /// HAProxy `timeout http-keep-alive` / `timeout tunnel`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(r"^(0|[0-9]+(ms|s|m|h))$"))]
    pub idle: Option<String>,
    /// Longest a client may leave an answer (or a tunnel's bytes) unread:
    /// the time between two successful writes to it (nginx `send_timeout`).
    #[serde(default = "default_response_write_timeout")]
    #[schemars(pattern(r"^(0|[0-9]+(ms|s|m|h))$"))]
    pub response_write: String,
}

/// Limits on what clients may open and send.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LimitsSpec {
    /// Open client connections per listener; at the cap the oldest idle ones
    /// are closed first (HAProxy `maxconn`, nginx `worker_connections`).
    #[serde(default = "default_max_client_connections")]
    #[schemars(range(min = 1, max = 1000000))]
    pub max_connections: i32,
    /// Open connections per client IP address per listener; 0 is no limit (nginx `limit_conn`).
    #[serde(default)]
    #[schemars(range(min = 0))]
    pub max_connections_per_client: i32,
    /// Size of a request's headers, request line included, on HTTP/1 and HTTP/2
    /// alike; larger gets 431 (nginx `large_client_header_buffers`, HAProxy `tune.bufsize`).
    #[serde(default = "default_max_request_headers_bytes")]
    #[schemars(range(min = 1024, max = 1048576))]
    pub max_request_headers_bytes: i32,
    /// Header fields in a request, HTTP/1 and HTTP/2 alike; more get 431
    /// (hyper's and HAProxy's `tune.http.maxhdr` default is 101, nginx has no count).
    #[serde(default = "default_max_request_headers")]
    #[schemars(range(min = 1, max = 10000))]
    pub max_request_headers: i32,
    /// Length of the request target (path and query); longer gets 414.
    #[serde(default = "default_max_uri_bytes")]
    #[schemars(range(min = 256, max = 1048576))]
    pub max_uri_bytes: i32,
    /// HTTP requests of this service in flight at once, per proxy; 0 is no
    /// limit (Envoy's `max_requests` circuit breaker, HAProxy `maxconn` on
    /// a backend's servers).
    #[serde(default)]
    #[schemars(range(min = 0, max = 1000000))]
    pub max_requests: i32,
    /// Requests that wait for a slot when `maxRequests` are in flight, each
    /// for at most `timeouts.connect` (HAProxy's `timeout queue` default);
    /// beyond it, or past the wait, `503` at once (Envoy `max_pending_requests`).
    #[serde(default)]
    #[schemars(range(min = 0, max = 1000000))]
    pub max_pending_requests: i32,
}

/// nginx `limit_req`: a leaky bucket of `requests` per `per`. Up to `burst`
/// requests beyond the rate wait and are released at the rate (`delay: true`)
/// or pass at once (`delay: false`, nginx `nodelay`); beyond that, `429`.
/// In a cluster each proxy replica enforces `requests / proxy.replicas`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RateLimitSpec {
    /// Requests allowed per `per`.
    #[schemars(range(min = 1))]
    pub requests: i32,
    /// The period `requests` are counted over (`1s`, `1m`).
    #[serde(default = "default_rate_per")]
    #[schemars(regex(pattern = r"^(0|[0-9]+(ms|s|m|h))$"))]
    pub per: String,
    /// Requests beyond the rate that are delayed (or, with `delay: false`, let through).
    #[serde(default)]
    #[schemars(range(min = 0))]
    pub burst: i32,
    /// Release the burst at the rate (true, nginx's default) or at once (false, `nodelay`).
    #[serde(default = "default_true")]
    pub delay: bool,
    /// Whose requests share a bucket; the default is one bucket for the service.
    #[serde(default)]
    pub key: RateLimitKeySpec,
}

/// What a rate limit counts requests by.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RateLimitKeySpec {
    /// `None` (one bucket), `SourceIP`, `Header` or `Cookie`.
    #[serde(default)]
    pub source: RateLimitKeySource,
    /// The header or cookie name (for `Header` and `Cookie`). Requests without
    /// it are not limited, as nginx does with an empty key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// Where a rate-limit key comes from.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum RateLimitKeySource {
    /// One bucket for every request.
    #[default]
    None,
    /// The client's IP address.
    #[serde(rename = "SourceIP")]
    SourceIp,
    /// A request header's value.
    Header,
    /// A cookie's value.
    Cookie,
}

fn default_true() -> bool {
    true
}

fn default_rate_per() -> String {
    "1s".into()
}

/// The per-service proxy Deployment.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProxySpec {
    /// Proxy pods.
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 0, max = 100))]
    pub replicas: i32,
    /// Compute resources of the proxy container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<k8s_openapi::api::core::v1::ResourceRequirements>,
}

/// What the controller observed, written to the status subresource.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BalancedServiceStatus {
    /// The spec generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `serving/total`, for `kubectl get`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready: Option<String>,
    /// Endpoints that serve.
    #[serde(default)]
    pub ready_endpoints: i32,
    /// Endpoints known.
    #[serde(default)]
    pub total_endpoints: i32,
    /// Ready, Degraded, ProxyAvailable.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The endpoints that do not serve (probes, Kubernetes or their agent),
    /// sorted by address, at most 100; every endpoint's state is on the
    /// controller's admin `/status` and in metrics.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<EndpointStatus>,
    /// Endpoints that do not serve beyond the ones listed in `endpoints`.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub endpoints_omitted: i32,
    /// What the controller found out about each HTTP listener's endpoints (the
    /// Service port's `appProtocol`), for the proxies to follow.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub listeners: Vec<ListenerStatus>,
    /// With `spec.backends`, each group's endpoints (`default` first).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backends: Vec<BackendStatus>,
}

/// One endpoint group's health.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackendStatus {
    /// `default` or a `spec.backends[].name`.
    pub name: String,
    /// Serving endpoints over all, e.g. `2/3`.
    pub ready: String,
    /// Endpoints that serve.
    pub ready_endpoints: i32,
    /// Endpoints in the group.
    pub total_endpoints: i32,
}

/// One listener as the controller resolved it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ListenerStatus {
    /// The listener's name.
    pub name: String,
    /// The protocol its endpoints speak, from the Service port's `appProtocol`
    /// (or a port named `grpc*` / `h2c*`): `http` or `kubernetes.io/h2c`.
    pub app_protocol: String,
}

/// A Kubernetes-style condition.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// Condition type, e.g. `Ready`.
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    /// CamelCase reason, e.g. `NoHealthyEndpoints`.
    pub reason: String,
    /// Human-readable detail.
    #[serde(default)]
    pub message: String,
    /// When status last changed (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<String>,
    /// The generation the condition was computed for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// One endpoint that does not serve, and why.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EndpointStatus {
    /// IP address.
    pub address: String,
    /// The endpoint's port (the first listener's target).
    pub port: i32,
    /// With `spec.backends`, the groups this endpoint is in (`default` and
    /// backend names); absent means `default` only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backends: Vec<String>,
    /// `pod/NAME` when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_ref: Option<String>,
    /// Topology zone when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    /// Probe state: Unknown, Healthy or Unhealthy.
    pub state: String,
    /// Kubernetes' own view, when it disagrees: `NotReady` or `Terminating`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubernetes: Option<String>,
    /// When the probe state last changed (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<String>,
    /// The last probe error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Its agent says `drain` or `maint` (or 0%): no new requests or
    /// connections; those in flight finish.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub draining: bool,
}

fn is_zero(n: &i32) -> bool {
    *n == 0
}

fn default_weight() -> i32 {
    1
}
fn default_interval() -> String {
    "3s".into()
}
fn default_agent_interval() -> String {
    "2s".into()
}
fn default_probe_timeout() -> String {
    "1s".into()
}
fn default_rise() -> i32 {
    2
}
fn default_fall() -> i32 {
    3
}
fn default_method() -> String {
    "GET".into()
}
fn default_path() -> String {
    "/healthz".into()
}
fn default_keep_alive_requests() -> i32 {
    1
}
fn default_aggression() -> f64 {
    1.0
}
fn default_min_weight_percent() -> i32 {
    10
}
fn default_expect_status() -> Vec<String> {
    vec!["2xx".into(), "3xx".into()]
}
fn default_max_fails() -> i32 {
    1
}
fn default_fail_timeout() -> String {
    "10s".into()
}
fn default_passive_on() -> Vec<PassiveCondition> {
    vec![PassiveCondition::Error, PassiveCondition::Timeout]
}
fn default_retry_on() -> Vec<RetryCondition> {
    vec![RetryCondition::Error, RetryCondition::Timeout]
}
fn default_tries() -> i32 {
    3
}
fn default_retry_timeout() -> String {
    "10s".into()
}
fn default_retry_buffer() -> i64 {
    64 * 1024
}
fn default_budget_percent() -> i32 {
    20
}
fn default_budget_interval() -> String {
    "10s".into()
}
fn default_min_retry_count() -> i32 {
    10
}
fn default_min_retry_interval() -> String {
    "1s".into()
}
fn default_connect_timeout() -> String {
    "1s".into()
}
fn default_response_timeout() -> String {
    "60s".into()
}
fn default_request_header_timeout() -> String {
    "10s".into()
}
fn default_request_body_timeout() -> String {
    "30s".into()
}
fn default_response_write_timeout() -> String {
    "60s".into()
}
fn default_max_request_headers() -> i32 {
    100
}
fn default_max_client_connections() -> i32 {
    10_000
}
fn default_max_request_headers_bytes() -> i32 {
    16 * 1024
}
fn default_max_uri_bytes() -> i32 {
    8 * 1024
}
fn default_replicas() -> i32 {
    2
}

impl Default for HealthCheckSpec {
    fn default() -> Self {
        Self {
            protocol: ProbeProtocol::default(),
            interval: default_interval(),
            timeout: default_probe_timeout(),
            rise: default_rise(),
            fall: default_fall(),
            down_interval: None,
            port: None,
            http: HttpCheckSpec::default(),
            tls: TlsCheckSpec::default(),
            tcp: None,
            grpc: None,
            agent: None,
            panic_threshold: 0,
        }
    }
}

impl Default for HttpCheckSpec {
    fn default() -> Self {
        Self {
            method: default_method(),
            path: default_path(),
            host: String::new(),
            expect_status: default_expect_status(),
            agent_header: None,
            keep_alive_requests: default_keep_alive_requests(),
        }
    }
}

impl Default for PassiveHealthSpec {
    fn default() -> Self {
        Self {
            max_fails: default_max_fails(),
            fail_timeout: default_fail_timeout(),
            on: default_passive_on(),
        }
    }
}

impl Default for RetrySpec {
    fn default() -> Self {
        Self {
            on: default_retry_on(),
            tries: default_tries(),
            timeout: default_retry_timeout(),
            max_body_bytes: default_retry_buffer(),
            budget: RetryBudgetSpec::default(),
            per_try_timeout: None,
            hedge: false,
        }
    }
}

impl Default for RetryBudgetSpec {
    fn default() -> Self {
        Self {
            percent: default_budget_percent(),
            interval: default_budget_interval(),
            min_retry_rate: RetryRateSpec::default(),
        }
    }
}

impl Default for RetryRateSpec {
    fn default() -> Self {
        Self {
            count: default_min_retry_count(),
            interval: default_min_retry_interval(),
        }
    }
}

impl Default for TimeoutsSpec {
    fn default() -> Self {
        Self {
            connect: default_connect_timeout(),
            response: default_response_timeout(),
            request_header: default_request_header_timeout(),
            request_body: default_request_body_timeout(),
            idle: None,
            response_write: default_response_write_timeout(),
        }
    }
}

impl Default for LimitsSpec {
    fn default() -> Self {
        Self {
            max_connections: default_max_client_connections(),
            max_connections_per_client: 0,
            max_request_headers_bytes: default_max_request_headers_bytes(),
            max_request_headers: default_max_request_headers(),
            max_uri_bytes: default_max_uri_bytes(),
            max_requests: 0,
            max_pending_requests: 0,
        }
    }
}

impl Default for ProxySpec {
    fn default() -> Self {
        Self {
            replicas: default_replicas(),
            resources: None,
        }
    }
}
