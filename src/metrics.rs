//! Prometheus metrics, named like the tools operators already read
//! (`balanced_` prefix, base units, `_total` counters).

use std::sync::{Arc, OnceLock};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Content type of [`Metrics::encode`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// `service` and `endpoint` labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabels {
    /// `namespace/name`.
    pub service: String,
    /// `address:port`.
    pub endpoint: String,
}

/// Labels of `balanced_probes_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProbeLabels {
    /// `namespace/name`.
    pub service: String,
    /// `address:port`.
    pub endpoint: String,
    /// `success`, `failure` or `timeout`.
    pub result: &'static str,
}

/// `service` label only.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabels {
    /// `namespace/name`.
    pub service: String,
}

/// Labels of `balanced_route_requests_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteCodeLabels {
    /// `namespace/name`.
    pub service: String,
    /// The route's name.
    pub route: String,
    /// Status class answered to the client.
    pub code: &'static str,
}

/// `service` and `route` (empty for the service's own `rateLimit`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    /// `namespace/name`.
    pub service: String,
    /// The route's name.
    pub route: String,
}

/// Labels of `balanced_endpoint_transitions_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TransitionLabels {
    /// `namespace/name`.
    pub service: String,
    /// The new state.
    pub to: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Upper bounds of [`AtomicHistogram`] (seconds): 0.5 ms doubling to ~8 s, then +Inf.
const LATENCY_BOUNDS: [f64; 16] = [
    0.0005,
    0.001,
    0.002,
    0.004,
    0.008,
    0.016,
    0.032,
    0.064,
    0.128,
    0.256,
    0.512,
    1.024,
    2.048,
    4.096,
    8.192,
    f64::INFINITY,
];

/// A latency histogram of plain atomics: observing takes no lock, so every
/// worker thread of the request path can record without meeting the others
/// (prometheus-client's `Histogram` takes a mutex per observation). Buckets are
/// summed up at scrape time.
#[derive(Clone, Debug, Default)]
pub struct AtomicHistogram(std::sync::Arc<HistogramCells>);

#[derive(Debug, Default)]
struct HistogramCells {
    buckets: [std::sync::atomic::AtomicU64; LATENCY_BOUNDS.len()],
    count: std::sync::atomic::AtomicU64,
    sum_nanos: std::sync::atomic::AtomicU64,
}

impl AtomicHistogram {
    /// Records one duration.
    pub fn observe(&self, d: std::time::Duration) {
        use std::sync::atomic::Ordering::Relaxed;
        let secs = d.as_secs_f64();
        let i = LATENCY_BOUNDS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(LATENCY_BOUNDS.len() - 1);
        self.0.buckets[i].fetch_add(1, Relaxed);
        self.0.count.fetch_add(1, Relaxed);
        self.0.sum_nanos.fetch_add(d.as_nanos() as u64, Relaxed);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.0.count.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl prometheus_client::metrics::TypedMetric for AtomicHistogram {
    const TYPE: prometheus_client::metrics::MetricType = prometheus_client::metrics::MetricType::Histogram;
}

impl prometheus_client::encoding::EncodeMetric for AtomicHistogram {
    fn encode(&self, mut encoder: prometheus_client::encoding::MetricEncoder) -> Result<(), std::fmt::Error> {
        use std::sync::atomic::Ordering::Relaxed;
        let buckets: Vec<(f64, u64)> = LATENCY_BOUNDS
            .iter()
            .zip(&self.0.buckets)
            .map(|(b, n)| (*b, n.load(Relaxed)))
            .collect();
        let count = buckets.iter().map(|(_, n)| n).sum();
        let sum = self.0.sum_nanos.load(Relaxed) as f64 / 1e9;
        encoder.encode_histogram::<prometheus_client::encoding::NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> prometheus_client::metrics::MetricType {
        prometheus_client::metrics::MetricType::Histogram
    }
}

fn latency_histogram() -> Histogram {
    // 0.5 ms .. ~8 s: loopback probes to slow cross-zone ones.
    Histogram::new(exponential_buckets(0.0005, 2.0, 15))
}

/// Probe and health metrics.
#[derive(Clone)]
pub struct ProbeMetrics {
    /// Probes by result.
    pub probes: Family<ProbeLabels, Counter>,
    /// Probe latency per service.
    pub duration: HistogramFamily<ServiceLabels>,
    /// 1 when an endpoint is healthy, 0 otherwise.
    pub healthy: Family<EndpointLabels, Gauge>,
    /// Health transitions by new state.
    pub transitions: Family<TransitionLabels, Counter>,
    /// How late each probe started against its schedule.
    pub lag: Histogram,
    /// Probes that started more than a tenth of their interval late.
    pub late: Counter,
    /// The weight an endpoint's agent reports, in percent (series appear at the first report).
    pub weight_percent: Family<EndpointLabels, Gauge>,
    /// 1 while an endpoint's agent says drain or maint (or 0%).
    pub draining: Family<EndpointLabels, Gauge>,
    /// Agent answers that were not agent words, or agents that did not answer.
    pub agent_errors: Family<ServiceLabels, Counter>,
}

impl ProbeMetrics {
    fn register(registry: &mut Registry) -> Self {
        let m = Self {
            probes: Family::default(),
            duration: Family::new_with_constructor(latency_histogram),
            healthy: Family::default(),
            transitions: Family::default(),
            // 0.5 ms .. ~8 s, like probe durations.
            lag: latency_histogram(),
            late: Counter::default(),
            weight_percent: Family::default(),
            draining: Family::default(),
            agent_errors: Family::default(),
        };
        registry.register(
            "balanced_endpoint_weight_percent",
            "The weight an endpoint's agent reports, in percent of its configured weight",
            m.weight_percent.clone(),
        );
        registry.register(
            "balanced_endpoint_draining",
            "1 while an endpoint's agent says drain or maint: no new requests or connections",
            m.draining.clone(),
        );
        registry.register(
            "balanced_agent_errors",
            "Agent checks that got no answer or an answer that is not agent words",
            m.agent_errors.clone(),
        );
        registry.register("balanced_probes", "Active health probes by result", m.probes.clone());
        registry.register(
            "balanced_probe_schedule_lag_seconds",
            "How late an active health probe started against its schedule",
            m.lag.clone(),
        );
        registry.register(
            "balanced_probes_late",
            "Probes that started more than a tenth of their interval late: the prober is not keeping up",
            m.late.clone(),
        );
        registry.register(
            "balanced_probe_duration_seconds",
            "Time an active health probe took",
            m.duration.clone(),
        );
        registry.register(
            "balanced_endpoint_healthy",
            "1 when active health checks find the endpoint healthy",
            m.healthy.clone(),
        );
        registry.register(
            "balanced_endpoint_transitions",
            "Endpoint health transitions by new state",
            m.transitions.clone(),
        );
        m
    }

    /// Drops every series of an endpoint that is no longer probed.
    pub fn forget_endpoint(&self, service: &str, endpoint: &str) {
        for result in ["success", "failure", "timeout"] {
            self.probes.remove(&ProbeLabels {
                service: service.to_string(),
                endpoint: endpoint.to_string(),
                result,
            });
        }
        let labels = EndpointLabels {
            service: service.to_string(),
            endpoint: endpoint.to_string(),
        };
        self.healthy.remove(&labels);
        self.weight_percent.remove(&labels);
        self.draining.remove(&labels);
    }
}

/// Response classes and failure kinds an upstream attempt ends in.
pub const OUTCOMES: [&str; 7] = ["1xx", "2xx", "3xx", "4xx", "5xx", "error", "timeout"];

/// Labels of `balanced_upstream_requests_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamLabels {
    /// `namespace/name`.
    pub service: String,
    /// `address:port`.
    pub endpoint: String,
    /// Status class (`2xx`) or `error` / `timeout`.
    pub code: &'static str,
}

/// Labels of `balanced_upstream_retries_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RetryLabels {
    /// `namespace/name`.
    pub service: String,
    /// The retry condition (`Error`, `Timeout`, `Http502`, ...).
    pub reason: &'static str,
}

/// Labels of `balanced_downstream_requests_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DownstreamLabels {
    /// `namespace/name`.
    pub service: String,
    /// Listener name.
    pub listener: String,
    /// Status class answered to the client.
    pub code: &'static str,
}

/// Labels of `balanced_http1_requests_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PathLabels {
    /// `namespace/name`.
    pub service: String,
    /// Listener name.
    pub listener: String,
    /// `fast` (the proxy's own HTTP/1.1 path) or `hyper`.
    pub path: &'static str,
}

/// Labels of per-listener gauges.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabels {
    /// `namespace/name`.
    pub service: String,
    /// Listener name.
    pub listener: String,
}

/// Labels of a listener certificate's series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CertificateLabels {
    /// `namespace/name`.
    pub service: String,
    /// Listener name.
    pub listener: String,
    /// The certificate file.
    pub certificate: String,
}

/// Labels of the failed-handshake counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TlsFailureLabels {
    /// `namespace/name`.
    pub service: String,
    /// Listener name.
    pub listener: String,
    /// `not_tls`, `incompatible`, `no_alpn`, `alert`, `timeout`, `closed`, ...
    pub reason: &'static str,
}

/// Labels of the client-connection counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnectionLabels {
    /// `namespace/name`.
    pub service: String,
    /// Listener name.
    pub listener: String,
    /// Why: the timeout or limit by its spec name (`requestHeader`, `maxConnections`, ...).
    pub reason: &'static str,
}

/// Live counters of one endpoint, handed to the balancer so the request path
/// never looks a label set up.
#[derive(Clone, Debug, Default)]
pub struct EndpointStats {
    /// Requests (HTTP) or connections (TCP) in flight: also what least connections reads.
    pub active: Gauge,
    counters: Arc<EndpointCounters>,
}

/// An endpoint's counters, each registered on its first use: most endpoints
/// see one or two outcomes and are never ejected, and nine series for each
/// of 10,000 endpoints were a fifth of the prober's memory.
#[derive(Debug, Default)]
struct EndpointCounters {
    /// Attempts by outcome, indexed like [`OUTCOMES`].
    outcomes: [OnceLock<Counter>; 7],
    ejections: OnceLock<Counter>,
    lifted: OnceLock<Counter>,
    // Where to register them; None for stats kept off the registry.
    registry: Option<Families>,
}

#[derive(Debug)]
struct Families {
    upstream: Family<UpstreamLabels, Counter>,
    ejections: Family<EndpointLabels, Counter>,
    lifted: Family<EndpointLabels, Counter>,
    labels: EndpointLabels,
}

impl EndpointCounters {
    fn outcome(&self, i: usize) -> &Counter {
        self.outcomes[i].get_or_init(|| match &self.registry {
            Some(f) => f
                .upstream
                .get_or_create(&UpstreamLabels {
                    service: f.labels.service.clone(),
                    endpoint: f.labels.endpoint.clone(),
                    code: OUTCOMES[i],
                })
                .clone(),
            None => Counter::default(),
        })
    }

    fn per_endpoint<'a>(
        &self,
        cell: &'a OnceLock<Counter>,
        family: impl Fn(&Families) -> &Family<EndpointLabels, Counter>,
    ) -> &'a Counter {
        cell.get_or_init(|| match &self.registry {
            Some(f) => family(f).get_or_create(&f.labels).clone(),
            None => Counter::default(),
        })
    }
}

impl EndpointStats {
    /// Counts an attempt that ended with `status`.
    pub fn record_status(&self, status: u16) {
        let class = usize::from(status / 100).clamp(1, 5) - 1;
        self.counters.outcome(class).inc();
    }
    /// Counts an attempt that got no response.
    pub fn record_failure(&self, timed_out: bool) {
        self.counters.outcome(if timed_out { 6 } else { 5 }).inc();
    }
    /// Attempts so far, all outcomes.
    pub fn total(&self) -> u64 {
        self.counters
            .outcomes
            .iter()
            .filter_map(|c| c.get())
            .map(|c| c.get())
            .sum()
    }
    /// Counts a passive ejection.
    pub fn record_ejection(&self) {
        let c = &self.counters;
        c.per_endpoint(&c.ejections, |f| &f.ejections).inc();
    }
    /// Counts an ejection ended early because an active probe passed.
    pub fn record_lift(&self) {
        let c = &self.counters;
        c.per_endpoint(&c.lifted, |f| &f.lifted).inc();
    }
}

/// Data-plane metrics.
#[derive(Clone)]
pub struct ProxyMetrics {
    /// Upstream attempts by endpoint and outcome.
    pub upstream: Family<UpstreamLabels, Counter>,
    /// Upstream attempt latency (to response header) per service.
    pub duration: Family<ServiceLabels, AtomicHistogram>,
    /// In-flight requests per endpoint.
    pub active: Family<EndpointLabels, Gauge>,
    /// Retries by reason.
    pub retries: Family<RetryLabels, Counter>,
    /// Retries that `retry.on` allowed but the retry budget refused.
    pub retries_refused: Family<ServiceLabels, Counter>,
    /// Requests refused by overload protection (`spec.limits.maxRequests`).
    pub overflow: Family<ServiceLabels, Counter>,
    /// Requests answered 429 by a rate limit.
    pub rate_limited: Family<RouteLabels, Counter>,
    /// Requests a route took, by status class.
    pub routes: Family<RouteCodeLabels, Counter>,
    /// Passive ejections per endpoint.
    pub ejections: Family<EndpointLabels, Counter>,
    /// Passive ejections lifted by a passing probe, per endpoint.
    pub lifted: Family<EndpointLabels, Counter>,
    /// Answers to clients by listener and class.
    pub downstream: Family<DownstreamLabels, Counter>,
    /// HTTP/1.1 requests by the path that served them.
    pub http1_path: Family<PathLabels, Counter>,
    /// Client connections open per listener.
    pub connections: Family<ListenerLabels, Gauge>,
    /// Client connections the proxy closed on a timeout or evicted, by reason.
    pub closed: Family<ConnectionLabels, Counter>,
    /// Times a connection limit held a client back, by limit.
    pub limited: Family<ConnectionLabels, Counter>,
    /// Access-log lines dropped because the writer fell behind.
    pub access_log_dropped: Counter,
    /// When each listener certificate expires (Unix seconds).
    pub tls_expiry: Family<CertificateLabels, Gauge>,
    /// TLS handshakes that failed, by reason.
    pub tls_handshake_failures: Family<TlsFailureLabels, Counter>,
    /// Changed certificate files that did not load (the last good one kept serving).
    pub tls_reload_failures: Family<CertificateLabels, Counter>,
}

impl ProxyMetrics {
    fn register(registry: &mut Registry) -> Self {
        let m = Self {
            upstream: Family::default(),
            duration: Family::default(),
            active: Family::default(),
            retries: Family::default(),
            retries_refused: Family::default(),
            overflow: Family::default(),
            rate_limited: Family::default(),
            routes: Family::default(),
            ejections: Family::default(),
            lifted: Family::default(),
            downstream: Family::default(),
            http1_path: Family::default(),
            connections: Family::default(),
            closed: Family::default(),
            limited: Family::default(),
            access_log_dropped: Counter::default(),
            tls_expiry: Family::default(),
            tls_handshake_failures: Family::default(),
            tls_reload_failures: Family::default(),
        };
        registry.register(
            "balanced_tls_certificate_expiry_seconds",
            "When a listener's certificate expires, as Unix time",
            m.tls_expiry.clone(),
        );
        registry.register(
            "balanced_tls_handshake_failures",
            "Client TLS handshakes that failed, by reason",
            m.tls_handshake_failures.clone(),
        );
        registry.register(
            "balanced_tls_certificate_reload_failures",
            "Changed certificate files that did not load; the last good certificate kept serving",
            m.tls_reload_failures.clone(),
        );
        registry.register(
            "balanced_upstream_requests",
            "Upstream attempts by endpoint and outcome (status class, error, timeout)",
            m.upstream.clone(),
        );
        registry.register(
            "balanced_upstream_request_duration_seconds",
            "Time from sending an upstream request to its response header",
            m.duration.clone(),
        );
        registry.register(
            "balanced_upstream_active_requests",
            "Requests or connections in flight per endpoint",
            m.active.clone(),
        );
        registry.register("balanced_upstream_retries", "Retries by reason", m.retries.clone());
        registry.register(
            "balanced_upstream_retry_budget_exhausted",
            "Retries refused because the retry budget (spec.retry.budget) was spent",
            m.retries_refused.clone(),
        );
        registry.register(
            "balanced_route_requests",
            "Requests each route took, by the status class answered",
            m.routes.clone(),
        );
        registry.register(
            "balanced_ratelimited",
            "Requests answered 429 by a rate limit (route is empty for spec.rateLimit)",
            m.rate_limited.clone(),
        );
        registry.register(
            "balanced_overflow",
            "Requests answered 503 by overload protection (spec.limits.maxRequests and maxPendingRequests)",
            m.overflow.clone(),
        );
        registry.register(
            "balanced_endpoint_ejections",
            "Passive ejections (maxFails within failTimeout)",
            m.ejections.clone(),
        );
        registry.register(
            "balanced_endpoint_ejections_lifted",
            "Passive ejections ended early because an active health check passed",
            m.lifted.clone(),
        );
        registry.register(
            "balanced_downstream_requests",
            "Responses to clients by listener and status class",
            m.downstream.clone(),
        );
        registry.register(
            "balanced_http1_requests",
            "HTTP/1.1 requests by the path that served them: fast (the proxy's own parser and upstream connections) or hyper (upgrades, chunked or large bodies, h2c endpoints, hedging)",
            m.http1_path.clone(),
        );
        registry.register(
            "balanced_downstream_connections",
            "Client connections open per listener",
            m.connections.clone(),
        );
        registry.register(
            "balanced_downstream_connections_closed",
            "Client connections closed by the proxy: a timeout (requestHeader, requestBody, idle) or evicted to make room (maxConnections)",
            m.closed.clone(),
        );
        registry.register(
            "balanced_downstream_connection_limited",
            "Connections held back or refused by a limit (maxConnections, maxConnectionsPerClient)",
            m.limited.clone(),
        );
        registry.register(
            "balanced_access_log_dropped",
            "Access-log lines dropped because the writer could not keep up",
            m.access_log_dropped.clone(),
        );
        m
    }

    /// Registered live counters for one endpoint.
    pub fn endpoint_stats(&self, service: &str, endpoint: &str) -> EndpointStats {
        let labels = EndpointLabels {
            service: service.to_string(),
            endpoint: endpoint.to_string(),
        };
        EndpointStats {
            active: self.active.get_or_create(&labels).clone(),
            counters: Arc::new(EndpointCounters {
                registry: Some(Families {
                    upstream: self.upstream.clone(),
                    ejections: self.ejections.clone(),
                    lifted: self.lifted.clone(),
                    labels,
                }),
                ..Default::default()
            }),
        }
    }

    /// Drops the series of an endpoint that left the service.
    pub fn forget_endpoint(&self, service: &str, endpoint: &str) {
        let labels = EndpointLabels {
            service: service.to_string(),
            endpoint: endpoint.to_string(),
        };
        self.active.remove(&labels);
        self.ejections.remove(&labels);
        self.lifted.remove(&labels);
        for code in OUTCOMES {
            self.upstream.remove(&UpstreamLabels {
                service: service.to_string(),
                endpoint: endpoint.to_string(),
                code,
            });
        }
    }
}

/// `result` label: `success` or `error`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    /// `success` or `error`.
    pub result: &'static str,
}

/// Controller metrics.
#[derive(Clone, Default)]
pub struct ControllerMetrics {
    /// Reconciles by result.
    pub reconciles: Family<ResultLabels, Counter>,
    /// Status patches by result.
    pub status_writes: Family<ResultLabels, Counter>,
    /// 1 while this replica holds the leader Lease.
    pub leader: Gauge,
    /// Healthy EndpointSlice writes (apply or delete) by result.
    pub slice_writes: Family<ResultLabels, Counter>,
    /// Events not sent: the queue was full, or the API server refused them.
    pub events_dropped: Counter,
}

impl ControllerMetrics {
    fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register("balanced_reconciles", "Reconciles by result", m.reconciles.clone());
        registry.register(
            "balanced_status_writes",
            "Status patches by result",
            m.status_writes.clone(),
        );
        registry.register(
            "balanced_leader",
            "1 while this replica is the leader",
            m.leader.clone(),
        );
        registry.register(
            "balanced_endpointslice_writes",
            "Healthy EndpointSlice writes (apply or delete) by result",
            m.slice_writes.clone(),
        );
        registry.register(
            "balanced_events_dropped",
            "Events not sent: the queue was full or the API server refused them",
            m.events_dropped.clone(),
        );
        m
    }
}

/// Every metric of the process and the registry that exposes them.
pub struct Metrics {
    registry: Registry,
    /// Prober metrics.
    pub probe: ProbeMetrics,
    /// Data-plane metrics.
    pub proxy: ProxyMetrics,
    /// Controller metrics.
    pub controller: ControllerMetrics,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every family.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let probe = ProbeMetrics::register(&mut registry);
        let proxy = ProxyMetrics::register(&mut registry);
        let controller = ControllerMetrics::register(&mut registry);
        Self {
            registry,
            probe,
            proxy,
            controller,
        }
    }

    /// The exposition text served on `/metrics`.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}
