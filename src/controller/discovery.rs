//! Endpoints of a Service from its EndpointSlices (`discovery.k8s.io/v1`).

use std::net::{IpAddr, SocketAddr};

use k8s_openapi::api::discovery::v1::EndpointSlice;

use crate::api::config::{AppProtocol, ListenerConfig, ListenerProtocol, TargetPort};
use crate::api::spec::ListenerStatus;

/// Label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// One endpoint as Kubernetes describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Discovered {
    /// IP and the port of the first listener's target.
    pub addr: SocketAddr,
    /// `pod/NAME` when the slice names a Pod.
    pub target_ref: Option<String>,
    /// Topology zone.
    pub zone: Option<String>,
    /// `conditions.ready` (missing means ready).
    pub ready: bool,
    /// `conditions.terminating` (missing means not terminating).
    pub terminating: bool,
    /// With several listeners, the port each listener reaches (by name).
    pub ports: Vec<(String, u16)>,
    /// With `spec.backends`, the groups it is in (`default`, backend names).
    pub backends: Vec<String>,
}

/// Every endpoint of `slices`, with the port the first listener targets:
/// a numeric `targetPort`, the slice port named by `targetPort`, the slice port
/// named like the listener, or the slice's only port; with several listeners,
/// each listener's port resolved the same way. FQDN slices are skipped;
/// IPv4 and IPv6 slices (dual stack) both count. An address listed twice
/// (slices overlap while they are rewritten) is kept once.
pub fn endpoints_from_slices(slices: &[EndpointSlice], listeners: &[ListenerConfig]) -> Vec<Discovered> {
    let mut out: Vec<Discovered> = Vec::new();
    // A set, not a scan of `out`: a Service of 10,000 endpoints is 50 million
    // comparisons the other way, on every reconcile.
    let mut seen: std::collections::HashSet<SocketAddr> = std::collections::HashSet::new();
    let Some(first) = listeners.first() else {
        return out;
    };
    for slice in slices {
        if slice.address_type != "IPv4" && slice.address_type != "IPv6" {
            continue;
        }
        let ports = slice.ports.as_deref().unwrap_or_default();
        let Some(port) = listener_port(ports, first) else {
            continue;
        };
        let per_listener: Vec<(String, u16)> = if listeners.len() > 1 {
            listeners
                .iter()
                .filter_map(|l| Some((l.name.clone(), listener_port(ports, l)?)))
                .collect()
        } else {
            Vec::new()
        };
        for ep in slice.endpoints.as_deref().unwrap_or_default() {
            let conditions = ep.conditions.clone().unwrap_or_default();
            let target_ref = ep
                .target_ref
                .as_ref()
                .and_then(|r| Some(format!("{}/{}", r.kind.as_deref()?.to_lowercase(), r.name.as_deref()?)));
            for address in &ep.addresses {
                let Ok(ip) = address.parse::<IpAddr>() else {
                    continue;
                };
                let addr = SocketAddr::new(ip, port);
                if !seen.insert(addr) {
                    continue;
                }
                out.push(Discovered {
                    addr,
                    target_ref: target_ref.clone(),
                    zone: ep.zone.clone(),
                    ready: conditions.ready.unwrap_or(true),
                    terminating: conditions.terminating.unwrap_or(false),
                    ports: per_listener.clone(),
                    backends: Vec::new(),
                });
            }
        }
    }
    out.sort_by_key(|d| d.addr);
    out
}

/// The port `listener` reaches on the endpoints of a slice with `ports`.
fn listener_port(ports: &[k8s_openapi::api::discovery::v1::EndpointPort], listener: &ListenerConfig) -> Option<u16> {
    let port = match &listener.target_port {
        Some(TargetPort::Number(n)) => Some(i32::from(*n)),
        _ => slice_port(ports, listener).and_then(|p| p.port),
    };
    port.and_then(|p| u16::try_from(p).ok()).filter(|p| *p > 0)
}

/// The slice port a listener targets: the one its `targetPort` names (or
/// numbers), else the one named like the listener, else the slice's only port.
fn slice_port<'a>(
    ports: &'a [k8s_openapi::api::discovery::v1::EndpointPort],
    listener: &ListenerConfig,
) -> Option<&'a k8s_openapi::api::discovery::v1::EndpointPort> {
    let named = |name: &str| ports.iter().find(|p| p.name.as_deref() == Some(name));
    match &listener.target_port {
        Some(TargetPort::Number(n)) => ports.iter().find(|p| p.port == Some(i32::from(*n))),
        Some(TargetPort::Name(name)) => named(name),
        None => named(&listener.name).or(match ports {
            [only] => Some(only),
            _ => None,
        }),
    }
}

/// The protocol each HTTP listener's endpoints speak, for listeners whose spec
/// does not say: the `appProtocol` of the Service port it targets (EndpointSlice
/// ports carry it), or `kubernetes.io/h2c` for a port named `grpc*` or `h2c*`.
pub fn app_protocols(slices: &[EndpointSlice], listeners: &[ListenerConfig]) -> Vec<ListenerStatus> {
    listeners
        .iter()
        .filter(|l| l.protocol == ListenerProtocol::Http && l.app_protocol.is_none())
        .filter_map(|l| {
            let found = slices.iter().find_map(|slice| {
                let port = slice_port(slice.ports.as_deref().unwrap_or_default(), l)?;
                let by_protocol = port.app_protocol.as_deref().and_then(AppProtocol::parse);
                let by_name = port
                    .name
                    .as_deref()
                    .filter(|n| n.starts_with("grpc") || n.starts_with("h2c"))
                    .map(|_| AppProtocol::H2c);
                by_protocol.or(by_name)
            })?;
            Some(ListenerStatus {
                name: l.name.clone(),
                app_protocol: found.name().to_string(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::config::ListenerProtocol;

    fn slices(yaml: &str) -> Vec<EndpointSlice> {
        serde_saphyr::from_str(yaml).unwrap()
    }

    fn listener(target: Option<TargetPort>) -> Vec<ListenerConfig> {
        vec![ListenerConfig {
            name: "http".into(),
            port: 80,
            protocol: ListenerProtocol::Http,
            target_port: target,
            app_protocol: None,
            trust_forwarded_headers: false,
            tls: None,
        }]
    }

    const SLICES: &str = r#"
- apiVersion: discovery.k8s.io/v1
  kind: EndpointSlice
  metadata: {name: web-abc, labels: {kubernetes.io/service-name: web}}
  addressType: IPv4
  ports: [{name: http, port: 8080}, {name: metrics, port: 9090}]
  endpoints:
    - addresses: [10.0.0.1]
      targetRef: {kind: Pod, name: web-1}
      zone: zone-a
    - addresses: [10.0.0.2]
      conditions: {ready: false}
    - addresses: [10.0.0.3]
      conditions: {ready: false, serving: true, terminating: true}
- apiVersion: discovery.k8s.io/v1
  kind: EndpointSlice
  metadata: {name: web-v6, labels: {kubernetes.io/service-name: web}}
  addressType: IPv6
  ports: [{name: http, port: 8080}]
  endpoints:
    - addresses: ["fd00::1"]
- apiVersion: discovery.k8s.io/v1
  kind: EndpointSlice
  metadata: {name: web-fqdn}
  addressType: FQDN
  ports: [{name: http, port: 8080}]
  endpoints: [{addresses: [example.com]}]
"#;

    #[test]
    fn named_ports_conditions_and_dual_stack() {
        let eps = endpoints_from_slices(&slices(SLICES), &listener(Some(TargetPort::Name("http".into()))));
        let addrs: Vec<String> = eps.iter().map(|e| e.addr.to_string()).collect();
        assert_eq!(
            addrs,
            ["10.0.0.1:8080", "10.0.0.2:8080", "10.0.0.3:8080", "[fd00::1]:8080"]
        );
        assert_eq!(eps[0].target_ref.as_deref(), Some("pod/web-1"));
        assert_eq!(eps[0].zone.as_deref(), Some("zone-a"));
        assert!(eps[0].ready && !eps[0].terminating, "missing conditions mean ready");
        assert!(!eps[1].ready);
        assert!(eps[2].terminating);
    }

    #[test]
    fn numeric_and_defaulted_target_ports() {
        let eps = endpoints_from_slices(&slices(SLICES), &listener(Some(TargetPort::Number(9090))));
        assert!(eps.iter().all(|e| e.addr.port() == 9090));
        // No targetPort: the slice port named like the listener.
        let eps = endpoints_from_slices(&slices(SLICES), &listener(None));
        assert!(eps.iter().all(|e| e.addr.port() == 8080));
        // A name no slice has: no endpoints rather than a guess.
        assert!(endpoints_from_slices(&slices(SLICES), &listener(Some(TargetPort::Name("grpc".into())))).is_empty());
    }

    #[test]
    fn every_listener_gets_the_port_its_target_names() {
        let slices = slices(
            r#"
- apiVersion: discovery.k8s.io/v1
  kind: EndpointSlice
  metadata: {name: web-abc, labels: {kubernetes.io/service-name: web}}
  addressType: IPv4
  ports: [{name: metrics, port: 9100}, {name: http, port: 8080}]
  endpoints: [{addresses: [10.0.0.1]}]
"#,
        );
        let mut listeners = listener(Some(TargetPort::Name("http".into())));
        let eps = endpoints_from_slices(&slices, &listeners);
        assert_eq!(eps[0].ports, vec![], "one listener: the address says it all");
        listeners.push(ListenerConfig {
            name: "metrics".into(),
            port: 81,
            protocol: ListenerProtocol::Http,
            target_port: Some(TargetPort::Name("metrics".into())),
            app_protocol: None,
            trust_forwarded_headers: false,
            tls: None,
        });
        let eps = endpoints_from_slices(&slices, &listeners);
        assert_eq!(
            eps[0].addr,
            "10.0.0.1:8080".parse().unwrap(),
            "identity: the first listener's port"
        );
        assert_eq!(
            eps[0].ports,
            vec![("http".to_string(), 8080), ("metrics".to_string(), 9100)]
        );
    }

    #[test]
    fn listeners_learn_the_protocol_of_the_service_port() {
        let slices = slices(
            r#"
- apiVersion: discovery.k8s.io/v1
  kind: EndpointSlice
  metadata: {name: web-abc, labels: {kubernetes.io/service-name: web}}
  addressType: IPv4
  ports: [{name: http, port: 8080, appProtocol: kubernetes.io/h2c}, {name: grpc-api, port: 9000}, {name: web, port: 80, appProtocol: http}]
  endpoints: []
"#,
        );
        let mut listeners = listener(None);
        listeners.push(ListenerConfig {
            name: "api".into(),
            port: 81,
            protocol: ListenerProtocol::Http,
            target_port: Some(TargetPort::Name("grpc-api".into())),
            app_protocol: None,
            trust_forwarded_headers: false,
            tls: None,
        });
        listeners.push(ListenerConfig {
            name: "plain".into(),
            port: 82,
            protocol: ListenerProtocol::Http,
            target_port: Some(TargetPort::Number(80)),
            app_protocol: None,
            trust_forwarded_headers: false,
            tls: None,
        });
        listeners.push(ListenerConfig {
            name: "set".into(),
            port: 83,
            protocol: ListenerProtocol::Http,
            target_port: Some(TargetPort::Number(8080)),
            app_protocol: Some(AppProtocol::Http1),
            trust_forwarded_headers: false,
            tls: None,
        });
        let found = app_protocols(&slices, &listeners);
        let pairs: Vec<(&str, &str)> = found
            .iter()
            .map(|l| (l.name.as_str(), l.app_protocol.as_str()))
            .collect();
        assert_eq!(
            pairs,
            vec![
                ("http", "kubernetes.io/h2c"),
                ("api", "kubernetes.io/h2c"),
                ("plain", "http")
            ],
            "the spec's own appProtocol wins, so `set` is not listed"
        );
    }
}
