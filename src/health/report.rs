//! The `/status` document: what the prober sees, in names scripts rely on.

use serde::Serialize;

use super::prober::Prober;
use super::state::HealthState;
use crate::api::config::ServiceKey;

/// `{"services": [...]}`.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct StatusReport {
    /// One entry per BalancedService.
    pub services: Vec<ServiceReport>,
}

/// One BalancedService.
#[derive(Clone, Debug, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ServiceReport {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Its endpoints, sorted by address.
    pub endpoints: Vec<EndpointReport>,
}

/// One endpoint.
#[derive(Clone, Debug, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct EndpointReport {
    /// IP address.
    pub address: String,
    /// Port.
    pub port: u16,
    /// `Unknown`, `Healthy` or `Unhealthy`.
    pub state: &'static str,
    /// Most recent probe failure since it was last healthy.
    pub last_error: Option<String>,
    /// Passed probes in a row.
    pub consecutive_successes: u32,
    /// Failed probes in a row.
    pub consecutive_failures: u32,
    /// RFC 3339 time of the last state change.
    pub last_transition_time: Option<String>,
    /// Requests (HTTP) or connections (TCP) in flight through this process.
    pub active_connections: u64,
    /// Passively ejected by this process (maxFails within failTimeout).
    pub ejected: bool,
    /// The weight its agent reports, in percent of the configured one.
    pub weight_percent: u32,
    /// Its agent says `drain` or `maint` (or 0%): no new requests.
    pub draining: bool,
}

impl EndpointReport {
    /// Report line for one endpoint state.
    pub fn new(addr: std::net::SocketAddr, state: &HealthState) -> Self {
        Self {
            address: addr.ip().to_string(),
            port: addr.port(),
            state: state.health.as_str(),
            last_error: state.last_error.clone(),
            consecutive_successes: state.consecutive_successes,
            consecutive_failures: state.consecutive_failures,
            last_transition_time: state.last_transition.map(rfc3339),
            active_connections: 0,
            ejected: false,
            weight_percent: state.agent.weight_percent,
            draining: state.agent.draining(),
        }
    }
}

/// Builds the report for `services`, in the order given.
pub fn report(prober: &Prober, services: &[ServiceKey]) -> StatusReport {
    StatusReport {
        services: services
            .iter()
            .map(|key| ServiceReport {
                namespace: key.namespace.clone(),
                name: key.name.clone(),
                endpoints: prober
                    .states(key)
                    .iter()
                    .map(|(addr, state)| EndpointReport::new(*addr, state))
                    .collect(),
            })
            .collect(),
    }
}

/// RFC 3339 UTC with second precision, as Kubernetes writes times.
pub fn rfc3339(t: std::time::SystemTime) -> String {
    match jiff::Timestamp::try_from(t) {
        Ok(ts) => ts
            .round(jiff::Unit::Second)
            .unwrap_or(ts)
            .strftime("%Y-%m-%dT%H:%M:%SZ")
            .to_string(),
        Err(_) => "1970-01-01T00:00:00Z".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, SystemTime};

    #[test]
    fn times_are_rfc3339_utc() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(rfc3339(t), "2023-11-14T22:13:20Z");
    }

    #[test]
    fn endpoint_report_uses_the_documented_names() {
        let mut state = HealthState::new();
        state.record(Err("connect: connection refused"), 2, 1, SystemTime::UNIX_EPOCH);
        let json = serde_json::to_value(EndpointReport::new("127.0.0.1:8081".parse().unwrap(), &state)).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "address": "127.0.0.1", "port": 8081, "state": "Unhealthy",
                "lastError": "connect: connection refused",
                "consecutiveSuccesses": 0, "consecutiveFailures": 1,
                "lastTransitionTime": "1970-01-01T00:00:00Z",
                "activeConnections": 0, "ejected": false,
                "weightPercent": 100, "draining": false
            })
        );
    }
}
