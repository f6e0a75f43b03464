//! Prometheus metrics, named like the tools operators already read
//! (`balanced_` prefix, base units, `_total` counters).

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

/// Labels of `balanced_endpoint_transitions_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TransitionLabels {
    /// `namespace/name`.
    pub service: String,
    /// The new state.
    pub to: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

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
}

impl ProbeMetrics {
    fn register(registry: &mut Registry) -> Self {
        let m = Self {
            probes: Family::default(),
            duration: Family::new_with_constructor(latency_histogram),
            healthy: Family::default(),
            transitions: Family::default(),
        };
        registry.register(
            "balanced_probes",
            "Active health probes by result",
            m.probes.clone(),
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
        self.healthy.remove(&EndpointLabels {
            service: service.to_string(),
            endpoint: endpoint.to_string(),
        });
    }
}

/// Every metric of the process and the registry that exposes them.
pub struct Metrics {
    registry: Registry,
    /// Prober metrics.
    pub probe: ProbeMetrics,
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
        Self { registry, probe }
    }

    /// The exposition text served on `/metrics`.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}
