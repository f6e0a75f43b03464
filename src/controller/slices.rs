//! The healthy EndpointSlices, as Kubernetes' own EndpointSlice controller
//! writes them: at most `max` endpoints a slice, membership stable (an
//! endpoint stays in the slice that holds it, so a transition rewrites one
//! slice), and what the proxies need besides `ready` in annotations.
//!
//! The controller writes them ([`assign`], [`render`]); the proxies read them
//! back ([`members`]), and a new leader seeds probe states from them
//! ([`read`]). Everything here is pure.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};

use super::discovery::SERVICE_NAME_LABEL;
use crate::api::config::{Config, ServiceKey};
use crate::balance::{MemberSpec, Observed};

/// Kubernetes' default and ours (`--max-endpoints-per-slice`).
pub const DEFAULT_MAX_PER_SLICE: usize = 100;
/// The API server refuses a slice with more.
pub const MAX_PER_SLICE: usize = 1000;

/// `endpointslice.kubernetes.io/managed-by` on every slice we write.
pub const MANAGED_BY: &str = "balanced.dev";
const MANAGED_BY_LABEL: &str = "endpointslice.kubernetes.io/managed-by";
/// The groups (`default`, backend names) every endpoint of the slice is in;
/// empty when the service has no `spec.backends`.
pub const BACKENDS_ANNOTATION: &str = "balanced.dev/backends";
/// `IP=PERCENT,...` for the endpoints whose agent reports a weight other than 100%.
pub const WEIGHTS_ANNOTATION: &str = "balanced.dev/weight-percent";
/// `IP,...`: endpoints whose agent says drain (ready false, serving true).
pub const DRAINING_ANNOTATION: &str = "balanced.dev/draining";

pub use super::desired::healthy_name;

/// The label selector of one BalancedService's healthy slices.
pub fn selector(service: &str) -> String {
    format!(
        "{SERVICE_NAME_LABEL}={},{MANAGED_BY_LABEL}={MANAGED_BY}",
        healthy_name(service)
    )
}

/// One endpoint as its healthy slice carries it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceEndpoint {
    /// IP and the first listener's port.
    pub addr: SocketAddr,
    /// With several listeners, each one's port (as in discovery); empty: `addr`'s port.
    pub ports: Vec<(String, u16)>,
    /// With `spec.backends`, the groups it is in.
    pub groups: Vec<String>,
    /// `pod/NAME`.
    pub target_ref: Option<String>,
    /// Topology zone.
    pub zone: Option<String>,
    /// Probes say healthy (the slice's `serving`).
    pub healthy: bool,
    /// May take new traffic: healthy, Kubernetes-ready, not terminating, not
    /// draining; or the service is in panic (the slice's `ready`).
    pub ready: bool,
    /// Kubernetes says terminating.
    pub terminating: bool,
    /// Its agent says drain.
    pub draining: bool,
    /// Its agent's weight, in percent.
    pub weight_percent: u32,
}

/// What endpoints of one slice share: the address family, the ports and the groups.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Shape {
    v6: bool,
    ports: Vec<(Option<String>, u16)>,
    groups: Vec<String>,
}

fn shape(e: &SliceEndpoint) -> Shape {
    // The first port is always the endpoint's own: unnamed when every
    // listener uses it, else each listener's port by name, the first first.
    let ports = if e.ports.is_empty() {
        vec![(None, e.addr.port())]
    } else {
        let mut ports: Vec<(Option<String>, u16)> = e.ports.iter().map(|(n, p)| (Some(n.clone()), *p)).collect();
        if let Some(i) = ports.iter().position(|(_, p)| *p == e.addr.port()) {
            ports[..=i].rotate_right(1);
        }
        ports
    };
    Shape {
        v6: e.addr.is_ipv6(),
        ports,
        groups: e.groups.clone(),
    }
}

/// Which endpoints each slice holds, by slice name.
pub type Assignment = BTreeMap<String, Vec<SocketAddr>>;

/// Places `endpoints` in slices of at most `max`: each keeps the slice that
/// held it in `previous` while that slice's shape (family, ports, groups)
/// still fits it; the others fill slices with room, then new ones named
/// `SERVICE-healthy-N`. Slices left empty are absent from the result.
pub fn assign(service: &str, previous: &Assignment, endpoints: &[SliceEndpoint], max: usize) -> Assignment {
    let max = max.clamp(1, MAX_PER_SLICE);
    let by_addr: HashMap<SocketAddr, &SliceEndpoint> = endpoints.iter().map(|e| (e.addr, e)).collect();
    let mut out: Assignment = BTreeMap::new();
    let mut shapes: BTreeMap<String, Shape> = BTreeMap::new();
    let mut placed: HashSet<SocketAddr> = HashSet::new();
    for (name, addrs) in previous {
        // The slice keeps the shape most of its members still have, so one
        // endpoint that changes ports or groups moves alone.
        let members: Vec<(SocketAddr, Shape)> = addrs
            .iter()
            .filter(|a| !placed.contains(*a))
            .filter_map(|a| Some((*a, shape(by_addr.get(a)?))))
            .collect();
        let mut counts: Vec<(&Shape, usize)> = Vec::new();
        for (_, s) in &members {
            match counts.iter_mut().find(|(c, _)| *c == s) {
                Some((_, n)) => *n += 1,
                None => counts.push((s, 1)),
            }
        }
        let Some(slice_shape) = counts.iter().max_by_key(|(_, n)| *n).map(|(s, _)| (*s).clone()) else {
            continue;
        };
        let mut kept = Vec::new();
        for (addr, s) in &members {
            if kept.len() < max && *s == slice_shape && placed.insert(*addr) {
                kept.push(*addr);
            }
        }
        shapes.insert(name.clone(), slice_shape);
        out.insert(name.clone(), kept);
    }
    let mut unplaced: Vec<&SliceEndpoint> = endpoints.iter().filter(|e| !placed.contains(&e.addr)).collect();
    unplaced.sort_by_key(|e| e.addr);
    // Slices with room, by shape, in name order.
    let mut room: HashMap<Shape, Vec<String>> = HashMap::new();
    for (name, s) in &shapes {
        if out[name].len() < max {
            room.entry(s.clone()).or_default().push(name.clone());
        }
    }
    let base = healthy_name(service);
    let mut next_index = 0usize;
    for e in unplaced {
        if !placed.insert(e.addr) {
            continue; // listed twice
        }
        let s = shape(e);
        let open = room.entry(s).or_default();
        let name = match open.first() {
            Some(name) => name.clone(),
            None => {
                let name = loop {
                    let candidate = format!("{base}-{next_index}");
                    next_index += 1;
                    if !out.contains_key(&candidate) {
                        break candidate;
                    }
                };
                out.insert(name.clone(), Vec::new());
                open.push(name.clone());
                name
            }
        };
        let members = out.get_mut(&name).expect("slice exists");
        members.push(e.addr);
        if members.len() >= max {
            open.retain(|n| *n != name);
        }
    }
    for members in out.values_mut() {
        members.sort();
    }
    out
}

/// The assignment the existing slices of a service show (a new leader's
/// starting point, so it rewrites nothing that did not change).
pub fn assignment_of(slices: &[&EndpointSlice]) -> Assignment {
    slices
        .iter()
        .filter_map(|s| {
            let name = s.metadata.name.clone()?;
            let first = s.ports.as_ref()?.first()?.port?;
            let port = u16::try_from(first).ok()?;
            let addrs = s
                .endpoints
                .iter()
                .flatten()
                .filter_map(|e| Some(SocketAddr::new(e.addresses.first()?.parse().ok()?, port)))
                .collect();
            Some((name, addrs))
        })
        .collect()
}

/// The slice `name` holding `addrs` (each found in `endpoints`), as the
/// controller applies it.
pub fn render(
    key: &ServiceKey,
    name: &str,
    owner: Option<OwnerReference>,
    addrs: &[SocketAddr],
    endpoints: &HashMap<SocketAddr, &SliceEndpoint>,
) -> EndpointSlice {
    let members: Vec<&SliceEndpoint> = addrs.iter().filter_map(|a| endpoints.get(a).copied()).collect();
    let first = members.first();
    let s = first.map(|e| shape(e));
    let mut labels = super::desired::labels(&key.name);
    labels.insert(SERVICE_NAME_LABEL.into(), healthy_name(&key.name));
    labels.insert(MANAGED_BY_LABEL.into(), MANAGED_BY.into());
    let join = |items: Vec<String>| items.join(",");
    let annotations = BTreeMap::from([
        (
            BACKENDS_ANNOTATION.to_string(),
            join(s.as_ref().map(|s| s.groups.clone()).unwrap_or_default()),
        ),
        (
            WEIGHTS_ANNOTATION.to_string(),
            join(
                members
                    .iter()
                    .filter(|e| e.weight_percent != 100)
                    .map(|e| format!("{}={}", e.addr.ip(), e.weight_percent))
                    .collect(),
            ),
        ),
        (
            DRAINING_ANNOTATION.to_string(),
            join(
                members
                    .iter()
                    .filter(|e| e.draining)
                    .map(|e| e.addr.ip().to_string())
                    .collect(),
            ),
        ),
    ]);
    EndpointSlice {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            namespace: Some(key.namespace.clone()),
            labels: Some(labels),
            annotations: Some(annotations),
            owner_references: owner.map(|o| vec![o]),
            ..Default::default()
        },
        address_type: if s.as_ref().is_some_and(|s| s.v6) {
            "IPv6"
        } else {
            "IPv4"
        }
        .into(),
        endpoints: Some(
            members
                .iter()
                .map(|e| Endpoint {
                    addresses: vec![e.addr.ip().to_string()],
                    conditions: Some(EndpointConditions {
                        ready: Some(e.ready),
                        serving: Some(e.healthy),
                        terminating: Some(e.terminating),
                    }),
                    zone: e.zone.clone(),
                    target_ref: e.target_ref.as_deref().and_then(|t| target_ref(t, &key.namespace)),
                    ..Default::default()
                })
                .collect(),
        ),
        ports: Some(
            s.map(|s| s.ports)
                .unwrap_or_default()
                .into_iter()
                .map(|(name, port)| EndpointPort {
                    name,
                    port: Some(i32::from(port)),
                    protocol: Some("TCP".into()),
                    ..Default::default()
                })
                .collect(),
        ),
    }
}

fn target_ref(text: &str, namespace: &str) -> Option<ObjectReference> {
    let (kind, name) = text.split_once('/')?;
    let mut chars = kind.chars();
    let kind = chars.next()?.to_uppercase().chain(chars).collect();
    Some(ObjectReference {
        kind: Some(kind),
        name: Some(name.to_string()),
        namespace: Some(namespace.to_string()),
        ..Default::default()
    })
}

/// What of a slice the controller sets, to tell whether a write would change
/// anything (a no-op write still costs the API server a request).
pub fn content(slice: &EndpointSlice) -> serde_json::Value {
    serde_json::json!({
        "addressType": slice.address_type,
        "endpoints": slice.endpoints,
        "ports": slice.ports,
        "annotations": slice.metadata.annotations,
        "labels": slice.metadata.labels,
    })
}

/// Every endpoint the healthy slices carry (an address in two slices, as
/// while one is rewritten, counts once).
pub fn read(slices: &[&EndpointSlice]) -> Vec<SliceEndpoint> {
    let mut seen: HashSet<SocketAddr> = HashSet::new();
    let mut out = Vec::new();
    for slice in slices {
        let ports = slice.ports.as_deref().unwrap_or_default();
        let Some(port) = ports.first().and_then(|p| p.port).and_then(|p| u16::try_from(p).ok()) else {
            continue;
        };
        let named = ports.first().is_some_and(|p| p.name.is_some());
        let listener_ports: Vec<(String, u16)> = if named {
            ports
                .iter()
                .filter_map(|p| Some((p.name.clone()?, u16::try_from(p.port?).ok()?)))
                .collect()
        } else {
            Vec::new()
        };
        let annotation = |k: &str| {
            slice
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(k))
                .map(String::as_str)
                .unwrap_or("")
        };
        let groups: Vec<String> = annotation(BACKENDS_ANNOTATION)
            .split(',')
            .filter(|g| !g.is_empty())
            .map(str::to_string)
            .collect();
        let weights: HashMap<IpAddr, u32> = annotation(WEIGHTS_ANNOTATION)
            .split(',')
            .filter_map(|kv| {
                let (ip, pct) = kv.split_once('=')?;
                Some((
                    ip.parse().ok()?,
                    pct.parse::<u32>().ok()?.min(crate::health::agent::MAX_PERCENT),
                ))
            })
            .collect();
        let draining: HashSet<IpAddr> = annotation(DRAINING_ANNOTATION)
            .split(',')
            .filter_map(|ip| ip.parse().ok())
            .collect();
        for e in slice.endpoints.iter().flatten() {
            let Some(ip) = e.addresses.first().and_then(|a| a.parse::<IpAddr>().ok()) else {
                continue;
            };
            let addr = SocketAddr::new(ip, port);
            if !seen.insert(addr) {
                continue;
            }
            let c = e.conditions.clone().unwrap_or_default();
            out.push(SliceEndpoint {
                addr,
                ports: listener_ports.clone(),
                groups: groups.clone(),
                target_ref: e
                    .target_ref
                    .as_ref()
                    .and_then(|r| Some(format!("{}/{}", r.kind.as_deref()?.to_lowercase(), r.name.as_deref()?))),
                zone: e.zone.clone(),
                // `ready` missing means ready, as Kubernetes reads it; `serving` follows it.
                ready: c.ready.unwrap_or(true),
                healthy: c.serving.or(c.ready).unwrap_or(true),
                terminating: c.terminating.unwrap_or(false),
                draining: draining.contains(&ip),
                weight_percent: weights.get(&ip).copied().unwrap_or(100),
            });
        }
    }
    out.sort_by_key(|e| e.addr);
    out
}

/// The proxy's members from its service's healthy slices: every endpoint,
/// healthy or not (so "all down, try all" still has somewhere to go), with
/// weights and flags of matching static endpoints, then the panic threshold.
pub fn members(cfg: &Config, slices: &[&EndpointSlice]) -> Vec<MemberSpec> {
    let mut observed: Vec<Observed> = read(slices)
        .into_iter()
        .map(|e| Observed {
            addr: e.addr,
            // A draining endpoint is not ready but still healthy: it
            // finishes what it has and takes nothing new.
            healthy: e.healthy && !e.terminating && (e.ready || e.draining),
            draining: e.draining || e.weight_percent == 0,
            weight_percent: e.weight_percent,
            ports: e.ports,
            groups: group_mask(cfg, &e.groups),
        })
        .collect();
    // Before the controller's first slices, static endpoints are all there is.
    let known: HashSet<SocketAddr> = observed.iter().map(|o| o.addr).collect();
    for e in cfg.endpoints.iter().filter(|e| !known.contains(&e.addr)) {
        observed.push(Observed {
            addr: e.addr,
            healthy: false,
            draining: false,
            weight_percent: 100,
            ports: Vec::new(),
            groups: 1,
        });
    }
    crate::balance::members(cfg, observed)
}

/// The groups an endpoint belongs to: the ones named, or `default` when none.
fn group_mask(cfg: &Config, names: &[String]) -> u64 {
    if names.is_empty() {
        return 1;
    }
    names
        .iter()
        .filter_map(|n| cfg.group_index(n))
        .fold(0, |mask, g| mask | 1 << g)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(i: u16) -> SliceEndpoint {
        SliceEndpoint {
            addr: SocketAddr::from(([10, 0, (i >> 8) as u8, i as u8], 8080)),
            ports: Vec::new(),
            groups: Vec::new(),
            target_ref: None,
            zone: None,
            healthy: true,
            ready: true,
            terminating: false,
            draining: false,
            weight_percent: 100,
        }
    }

    fn sizes(a: &Assignment) -> Vec<usize> {
        a.values().map(Vec::len).collect()
    }

    #[test]
    fn slices_hold_at_most_max_and_every_endpoint_once() {
        let eps: Vec<_> = (0..250).map(ep).collect();
        let a = assign("web", &Assignment::new(), &eps, 100);
        assert_eq!(sizes(&a), vec![100, 100, 50]);
        assert_eq!(
            a.keys().cloned().collect::<Vec<_>>(),
            ["web-healthy-0", "web-healthy-1", "web-healthy-2"]
        );
        let all: HashSet<_> = a.values().flatten().collect();
        assert_eq!(all.len(), 250);
    }

    #[test]
    fn membership_is_stable_across_changes() {
        let eps: Vec<_> = (0..250).map(ep).collect();
        let first = assign("web", &Assignment::new(), &eps, 100);
        // One endpoint changes health: nothing moves.
        let mut changed = eps.clone();
        changed[120].healthy = false;
        assert_eq!(assign("web", &first, &changed, 100), first);
        // One leaves and two arrive: the leaver's slice shrinks, the new
        // ones fill the slice with room, no other slice changes.
        let mut next: Vec<_> = eps.iter().filter(|e| e.addr != eps[5].addr).cloned().collect();
        next.push(ep(300));
        next.push(ep(301));
        let second = assign("web", &first, &next, 100);
        assert_eq!(second["web-healthy-1"], first["web-healthy-1"]);
        assert!(!second["web-healthy-0"].contains(&eps[5].addr));
        // The first newcomer takes the leaver's place, the second the last slice.
        assert_eq!(second["web-healthy-0"].len(), 100);
        assert_eq!(second["web-healthy-2"].len(), 51);
        // A lowered maximum moves the overflow, still no slice above it.
        let third = assign("web", &second, &next, 60);
        assert!(third.values().all(|m| m.len() <= 60), "{:?}", sizes(&third));
        assert_eq!(third.values().map(Vec::len).sum::<usize>(), 251);
    }

    #[test]
    fn endpoints_of_other_shapes_never_share_a_slice() {
        let mut eps: Vec<_> = (0..4).map(ep).collect();
        eps[1].addr.set_port(9090);
        eps[2].groups = vec!["api".into()];
        eps[3].addr = "[fd00::3]:8080".parse().unwrap();
        let a = assign("web", &Assignment::new(), &eps, 100);
        assert_eq!(sizes(&a), vec![1, 1, 1, 1]);
        // One member of a full slice changes groups: it moves alone, to the
        // slice of its new shape; the others stay.
        let mut many: Vec<_> = (0..10).map(ep).collect();
        many.push({
            let mut api = ep(50);
            api.groups = vec!["api".into()];
            api
        });
        let a = assign("web", &Assignment::new(), &many, 100);
        many[0].groups = vec!["api".into()];
        let b = assign("web", &a, &many, 100);
        let with_api = b.values().find(|m| m.contains(&many[10].addr)).unwrap();
        assert!(with_api.contains(&many[0].addr), "same shape, same slice: {b:?}");
        let old = b.values().find(|m| m.contains(&many[1].addr)).unwrap();
        assert_eq!(old.len(), 9, "{b:?}");
    }

    #[test]
    fn a_rendered_slice_reads_back_as_written() {
        let key = ServiceKey::new("shop", "web");
        let mut eps: Vec<_> = (0..5).map(ep).collect();
        eps[1].healthy = false;
        eps[1].ready = false;
        eps[2].draining = true;
        eps[2].ready = false;
        eps[3].weight_percent = 50;
        eps[4].terminating = true;
        eps[4].ready = false;
        eps[0].target_ref = Some("pod/web-0".into());
        eps[0].zone = Some("z1".into());
        for e in &mut eps {
            e.ports = vec![("http".into(), 8080), ("admin".into(), 9000)];
            e.groups = vec!["default".into(), "api".into()];
        }
        let by_addr: HashMap<_, _> = eps.iter().map(|e| (e.addr, e)).collect();
        let addrs: Vec<_> = eps.iter().map(|e| e.addr).collect();
        let slice = render(&key, "web-healthy-0", None, &addrs, &by_addr);
        assert_eq!(read(&[&slice]), eps);
        assert_eq!(
            assignment_of(&[&slice]),
            BTreeMap::from([("web-healthy-0".to_string(), addrs)])
        );
    }

    #[test]
    fn members_from_slices_follow_health_drain_weight_and_panic() {
        let key = ServiceKey::new("shop", "web");
        let mut eps: Vec<_> = (1..=4).map(ep).collect();
        eps[1].healthy = false;
        eps[1].ready = false;
        eps[2].draining = true;
        eps[2].ready = false;
        eps[3].weight_percent = 50;
        // Probes pass but Kubernetes says not ready: not healthy.
        let mut not_ready = ep(5);
        not_ready.ready = false;
        eps.push(not_ready);
        let by_addr: HashMap<_, _> = eps.iter().map(|e| (e.addr, e)).collect();
        let addrs: Vec<_> = eps.iter().map(|e| e.addr).collect();
        let slice = render(&key, "web-healthy-0", None, &addrs, &by_addr);
        let spec: crate::api::BalancedServiceSpec = serde_json::from_value(serde_json::json!({
            "service": "web", "listeners": [{"name": "http", "port": 80}]
        }))
        .unwrap();
        let mut cfg = crate::api::validate(key, &spec).unwrap();
        let got: Vec<(bool, bool, u32)> = members(&cfg, &[&slice])
            .iter()
            .map(|m| (m.healthy, m.draining, m.weight))
            .collect();
        assert_eq!(
            got,
            [
                (true, false, 100),
                (false, false, 100),
                (true, true, 100),
                (true, false, 50),
                (false, false, 100)
            ]
        );
        // 3 of 5 healthy is below a 70% panic threshold: all serve.
        cfg.panic_threshold = 70;
        assert!(members(&cfg, &[&slice]).iter().all(|m| m.healthy));
    }
}
