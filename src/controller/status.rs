//! Status assembly: what the controller writes, as a pure function of what it saw.

use crate::api::spec::{BalancedServiceStatus, Condition, EndpointStatus};
use crate::health::report::rfc3339;
use crate::health::{Health, HealthState};

/// One endpoint: Kubernetes' view and the probes' view.
#[derive(Clone, Debug, PartialEq)]
pub struct EndpointView {
    /// Address and port.
    pub addr: std::net::SocketAddr,
    /// `pod/NAME`.
    pub target_ref: Option<String>,
    /// Topology zone.
    pub zone: Option<String>,
    /// Kubernetes says ready (static endpoints: always).
    pub ready: bool,
    /// Kubernetes says terminating.
    pub terminating: bool,
    /// With several listeners, each one's port (by listener name).
    pub ports: Vec<(String, u16)>,
    /// With `spec.backends`, the groups it is in.
    pub backends: Vec<String>,
    /// What the probes found.
    pub health: HealthState,
}

impl EndpointView {
    /// Whether the proxy may send it traffic.
    pub fn serves(&self) -> bool {
        self.health.health == Health::Healthy && self.ready && !self.terminating
    }

    /// Serves and its agent does not say drain.
    pub fn takes_new_traffic(&self) -> bool {
        self.serves() && !self.health.agent.draining()
    }
}

/// Everything status is computed from.
#[derive(Clone, Debug, Default)]
pub struct Observed<'a> {
    /// `metadata.generation`.
    pub generation: Option<i64>,
    /// The endpoints, sorted.
    pub endpoints: &'a [EndpointView],
    /// Listener facts found in the Service (its ports' `appProtocol`).
    pub listeners: &'a [crate::api::spec::ListenerStatus],
    /// Validation errors of the current spec.
    pub invalid: Option<&'a [String]>,
    /// Proxy Deployment availability and why, when known.
    pub proxy: Option<(bool, String)>,
    /// With `spec.backends`, every group name (`default` first), for
    /// `status.backends`; empty otherwise.
    pub groups: Vec<String>,
    /// `spec.healthCheck.panicThreshold`.
    pub panic_threshold: u32,
    /// With TLS to endpoints, the groups that skip verification (`None`
    /// without TLS to endpoints: no condition about it).
    pub unverified_tls: Option<Vec<String>>,
}

/// The most not-serving endpoints status lists; the rest are counted.
pub const MAX_LISTED: usize = 100;

/// Builds the status; conditions keep their `lastTransitionTime` from
/// `previous` while their status does not change.
pub fn assemble(seen: &Observed<'_>, previous: Option<&BalancedServiceStatus>, now: &str) -> BalancedServiceStatus {
    let total = seen.endpoints.len();
    let serving = seen.endpoints.iter().filter(|e| e.serves()).count();
    let ready = match seen.invalid {
        Some(errors) => ("False", "InvalidSpec", errors.join("; ")),
        None if crate::balance::in_panic(seen.panic_threshold, serving, total) => (
            "True",
            "Panic",
            format!(
                "{serving}/{total} endpoints healthy, below the panic threshold of {}%: every endpoint serves",
                seen.panic_threshold
            ),
        ),
        None if total == 0 => ("False", "NoEndpoints", "no endpoints found".to_string()),
        None if serving == 0 => ("False", "NoHealthyEndpoints", format!("0/{total} endpoints healthy")),
        None => (
            "True",
            "EndpointsHealthy",
            format!("{serving}/{total} endpoints healthy"),
        ),
    };
    let degraded = if total > 0 && serving < total {
        (
            "True",
            "EndpointsUnhealthy",
            format!("{} of {total} endpoints not serving", total - serving),
        )
    } else {
        ("False", "AllEndpointsHealthy", String::new())
    };
    let proxy = match &seen.proxy {
        Some((true, msg)) => ("True", "DeploymentAvailable", msg.clone()),
        Some((false, msg)) => ("False", "DeploymentUnavailable", msg.clone()),
        None => (
            "Unknown",
            "DeploymentPending",
            "proxy Deployment not observed yet".to_string(),
        ),
    };
    let tls = seen.unverified_tls.as_ref().map(|groups| match groups.as_slice() {
        [] => ("True", "CertificatesVerified", String::new()),
        groups => (
            "False",
            "InsecureSkipVerify",
            format!(
                "group {}: {}",
                groups.join(", "),
                crate::tls::upstream::INSECURE_WARNING
            ),
        ),
    });
    let conditions = [("Ready", ready), ("Degraded", degraded), ("ProxyAvailable", proxy)]
        .into_iter()
        .chain(tls.map(|t| ("BackendTLSVerified", t)))
        .map(|(type_, (status, reason, message))| {
            let kept = previous
                .and_then(|p| p.conditions.iter().find(|c| c.type_ == type_))
                .filter(|c| c.status == status)
                .and_then(|c| c.last_transition_time.clone());
            Condition {
                type_: type_.to_string(),
                status: status.to_string(),
                reason: reason.to_string(),
                message,
                last_transition_time: Some(kept.unwrap_or_else(|| now.to_string())),
                observed_generation: seen.generation,
            }
        })
        .collect();
    let backends = seen
        .groups
        .iter()
        .map(|name| {
            let members = seen.endpoints.iter().filter(|e| e.backends.iter().any(|b| b == name));
            let (ready, total) = members.fold((0usize, 0usize), |(r, t), e| (r + usize::from(e.serves()), t + 1));
            crate::api::spec::BackendStatus {
                name: name.to_string(),
                ready: format!("{ready}/{total}"),
                ready_endpoints: ready as i32,
                total_endpoints: total as i32,
            }
        })
        .collect();
    // Endpoints are sorted by address, so the listed ones are too.
    let listed: Vec<&EndpointView> = seen.endpoints.iter().filter(|e| !e.takes_new_traffic()).collect();
    let omitted = listed.len().saturating_sub(MAX_LISTED);
    BalancedServiceStatus {
        observed_generation: seen.generation,
        ready: Some(format!("{serving}/{total}")),
        ready_endpoints: serving as i32,
        total_endpoints: total as i32,
        conditions,
        endpoints: listed.into_iter().take(MAX_LISTED).map(endpoint_status).collect(),
        endpoints_omitted: omitted as i32,
        listeners: seen.listeners.to_vec(),
        backends,
    }
}

fn endpoint_status(e: &EndpointView) -> EndpointStatus {
    EndpointStatus {
        address: e.addr.ip().to_string(),
        port: i32::from(e.addr.port()),
        backends: e.backends.clone(),
        target_ref: e.target_ref.clone(),
        zone: e.zone.clone(),
        state: e.health.health.as_str().to_string(),
        kubernetes: if e.terminating {
            Some("Terminating".into())
        } else if !e.ready {
            Some("NotReady".into())
        } else {
            None
        },
        last_transition_time: e.health.last_transition.map(rfc3339),
        last_error: e.health.last_error.clone(),
        draining: e.health.agent.draining(),
    }
}

/// The slice entry of one endpoint; `panic`: the service is below its panic
/// threshold, so every endpoint is ready.
pub fn slice_endpoint(e: &EndpointView, panic: bool) -> crate::controller::slices::SliceEndpoint {
    let draining = e.health.agent.draining();
    crate::controller::slices::SliceEndpoint {
        addr: e.addr,
        ports: e.ports.clone(),
        groups: e.backends.clone(),
        target_ref: e.target_ref.clone(),
        zone: e.zone.clone(),
        healthy: e.health.health == Health::Healthy,
        ready: e.takes_new_traffic() || (panic && !draining && !e.terminating),
        terminating: e.terminating,
        draining,
        weight_percent: e.health.agent.weight_percent,
    }
}

/// The probe state a new leader starts an endpoint from: what its healthy
/// slice says (health, agent weight and drain), with the last error and
/// transition time status kept for the endpoints that do not serve.
pub fn seed_from(
    slice: Option<&crate::controller::slices::SliceEndpoint>,
    status: Option<&BalancedServiceStatus>,
    addr: std::net::SocketAddr,
) -> Option<HealthState> {
    let listed = status.and_then(|s| {
        s.endpoints
            .iter()
            .find(|e| e.port == i32::from(addr.port()) && e.address.parse() == Ok(addr.ip()))
    });
    // Status lists the endpoints that do not serve, with their state
    // (Unknown too); every other endpoint's health is its slice's `serving`.
    let health = match (listed, slice) {
        (Some(l), _) => Health::parse(&l.state)?,
        (None, Some(e)) if e.healthy => Health::Healthy,
        (None, Some(_)) => Health::Unhealthy,
        (None, None) => return None,
    };
    let at = listed
        .and_then(|l| l.last_transition_time.as_deref())
        .and_then(|t| t.parse::<jiff::Timestamp>().ok())
        .map(std::time::SystemTime::from);
    let mut state = HealthState::inherited(health, at);
    state.last_error = listed.and_then(|l| l.last_error.clone());
    // What agents reported holds until they answer the new controller, so
    // the proxies' weights do not flap back to 100% for an agent interval.
    if let Some(e) = slice {
        state.agent.weight_percent = e.weight_percent.min(crate::health::agent::MAX_PERCENT);
        if e.draining && state.agent.weight_percent != 0 {
            state.agent.admin = crate::health::agent::Admin::Drain;
        }
    }
    Some(state)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(i: u8, health: Health, ready: bool, terminating: bool) -> EndpointView {
        EndpointView {
            addr: ([10, 0, 0, i], 8080).into(),
            target_ref: None,
            zone: None,
            ready,
            terminating,
            ports: Vec::new(),
            backends: Vec::new(),
            health: HealthState::inherited(health, None),
        }
    }

    fn ready_of(s: &BalancedServiceStatus) -> (&str, &str, &str) {
        let c = s.conditions.iter().find(|c| c.type_ == "Ready").unwrap();
        (c.status.as_str(), c.reason.as_str(), c.message.as_str())
    }

    /// Status of `eps` with no history, no validation errors, proxy unknown.
    fn status_of(eps: &[EndpointView]) -> BalancedServiceStatus {
        let seen = Observed {
            endpoints: eps,
            ..Default::default()
        };
        assemble(&seen, None, "t0")
    }

    #[test]
    fn skipped_endpoint_verification_is_a_condition_that_names_the_groups() {
        let eps = [view(1, Health::Healthy, true, false)];
        let tls_of = |unverified: Option<Vec<String>>| {
            let s = assemble(
                &Observed {
                    endpoints: &eps,
                    unverified_tls: unverified,
                    ..Default::default()
                },
                None,
                "t0",
            );
            s.conditions
                .iter()
                .find(|c| c.type_ == "BackendTLSVerified")
                .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
        };
        assert_eq!(tls_of(None), None, "no TLS to endpoints, no condition");
        assert_eq!(tls_of(Some(vec![])).unwrap().1, "CertificatesVerified");
        let (status, reason, message) = tls_of(Some(vec!["default".into(), "admin".into()])).unwrap();
        assert_eq!((status.as_str(), reason.as_str()), ("False", "InsecureSkipVerify"));
        assert!(
            message.starts_with("group default, admin: insecureSkipVerify:"),
            "{message}"
        );
    }

    #[test]
    fn ready_reasons() {
        let eps = [
            view(1, Health::Healthy, true, false),
            view(2, Health::Unhealthy, true, false),
        ];
        let s = status_of(&eps);
        assert_eq!(ready_of(&s), ("True", "EndpointsHealthy", "1/2 endpoints healthy"));
        assert_eq!(s.ready.as_deref(), Some("1/2"));
        let degraded = s.conditions.iter().find(|c| c.type_ == "Degraded").unwrap();
        assert_eq!(
            (degraded.status.as_str(), degraded.reason.as_str()),
            ("True", "EndpointsUnhealthy")
        );

        let down = [view(1, Health::Unhealthy, true, false)];
        assert_eq!(ready_of(&status_of(&down)).1, "NoHealthyEndpoints");
        let s = status_of(&[]);
        assert_eq!(ready_of(&s).1, "NoEndpoints");
        let errors = vec!["spec.healthCheck.rise: must be >= 1, got 0".to_string()];
        let s = assemble(
            &Observed {
                endpoints: &eps,
                invalid: Some(&errors),
                ..Default::default()
            },
            None,
            "t0",
        );
        assert_eq!(
            ready_of(&s),
            ("False", "InvalidSpec", "spec.healthCheck.rise: must be >= 1, got 0")
        );
    }

    #[test]
    fn not_ready_and_terminating_endpoints_do_not_serve_even_when_probes_pass() {
        let eps = [
            view(1, Health::Healthy, false, false),
            view(2, Health::Healthy, false, true),
        ];
        let s = status_of(&eps);
        assert_eq!(s.ready_endpoints, 0);
        assert_eq!(s.endpoints[0].kubernetes.as_deref(), Some("NotReady"));
        assert_eq!(s.endpoints[1].kubernetes.as_deref(), Some("Terminating"));
        assert_eq!(s.endpoints[0].state, "Healthy");
    }

    #[test]
    fn transition_times_are_kept_while_status_holds() {
        let eps = [view(1, Health::Healthy, true, false)];
        let first = assemble(
            &Observed {
                endpoints: &eps,
                ..Default::default()
            },
            None,
            "t0",
        );
        let again = assemble(
            &Observed {
                endpoints: &eps,
                ..Default::default()
            },
            Some(&first),
            "t1",
        );
        assert!(
            again
                .conditions
                .iter()
                .all(|c| c.last_transition_time.as_deref() == Some("t0"))
        );
        let down = [view(1, Health::Unhealthy, true, false)];
        let changed = assemble(
            &Observed {
                endpoints: &down,
                ..Default::default()
            },
            Some(&again),
            "t2",
        );
        let ready = changed.conditions.iter().find(|c| c.type_ == "Ready").unwrap();
        assert_eq!(ready.last_transition_time.as_deref(), Some("t2"));
    }

    #[test]
    fn status_lists_only_endpoints_that_do_not_serve_at_most_a_hundred() {
        let mut eps: Vec<EndpointView> = (1..=250u8)
            .map(|i| {
                view(
                    i,
                    if i % 2 == 0 { Health::Unhealthy } else { Health::Healthy },
                    true,
                    false,
                )
            })
            .collect();
        eps[0].health.agent.admin = crate::health::agent::Admin::Drain;
        let s = status_of(&eps);
        assert_eq!(s.ready.as_deref(), Some("125/250"));
        assert_eq!(s.endpoints.len(), MAX_LISTED);
        assert_eq!(s.endpoints_omitted, 126 - MAX_LISTED as i32);
        assert!(
            s.endpoints[0].draining,
            "a draining endpoint is listed: {:?}",
            s.endpoints[0]
        );
        assert!(
            s.endpoints
                .windows(2)
                .all(|w| w[0].address.parse::<std::net::IpAddr>().unwrap()
                    < w[1].address.parse::<std::net::IpAddr>().unwrap())
        );
        // Ten thousand endpoints, half down: still a small object.
        let many: Vec<EndpointView> = (0..10_000u32)
            .map(|i| {
                let mut v = view(
                    0,
                    if i % 2 == 0 { Health::Unhealthy } else { Health::Healthy },
                    true,
                    false,
                );
                v.addr = std::net::SocketAddr::from((i.to_be_bytes(), 8080));
                v.health.last_error = Some("connect: connection refused".into());
                v
            })
            .collect();
        let bytes = serde_json::to_vec(&status_of(&many)).unwrap().len();
        assert!(bytes < 64 * 1024, "{bytes} bytes");
    }

    #[test]
    fn panic_threshold_says_so_in_ready() {
        let eps = [
            view(1, Health::Healthy, true, false),
            view(2, Health::Unhealthy, true, false),
            view(3, Health::Unhealthy, true, false),
        ];
        let seen = Observed {
            endpoints: &eps,
            panic_threshold: 50,
            ..Default::default()
        };
        let s = assemble(&seen, None, "t0");
        assert_eq!(ready_of(&s).0, "True");
        assert_eq!(ready_of(&s).1, "Panic");
        assert!(slice_endpoint(&eps[1], true).ready && !slice_endpoint(&eps[1], true).healthy);
        assert!(!slice_endpoint(&eps[1], false).ready);
    }

    #[test]
    fn seeds_come_from_the_slices_and_the_listed_endpoints() {
        let mut down = view(2, Health::Unhealthy, true, false);
        down.health.last_error = Some("connect: connection refused".into());
        let eps = [view(1, Health::Healthy, true, false), down];
        let s = status_of(&eps);
        let slice: Vec<_> = eps.iter().map(|e| slice_endpoint(e, false)).collect();
        let seed = seed_from(Some(&slice[0]), Some(&s), eps[0].addr).unwrap();
        assert_eq!(seed.health, Health::Healthy);
        let seed = seed_from(Some(&slice[1]), Some(&s), eps[1].addr).unwrap();
        assert_eq!(seed.health, Health::Unhealthy);
        assert_eq!(seed.last_error.as_deref(), Some("connect: connection refused"));
        assert!(seed_from(None, Some(&s), ([10, 0, 0, 9], 8080).into()).is_none());
    }

    #[test]
    fn agent_reports_are_seeded_too() {
        let mut a = view(1, Health::Healthy, true, false);
        a.health.agent.weight_percent = 40;
        a.health.agent.admin = crate::health::agent::Admin::Drain;
        let slice = slice_endpoint(&a, false);
        let seed = seed_from(Some(&slice), None, a.addr).unwrap();
        assert_eq!((seed.agent.weight_percent, seed.agent.draining()), (40, true));
        assert_eq!(seed.health, Health::Healthy);
    }
}
