//! What balanced knows, as the xDS resources a proxyless gRPC client (gRFC
//! A27) or Envoy reads: per HTTP listener of every BalancedService, a
//! Listener with an API listener and its route, a Cluster of type EDS, and
//! a ClusterLoadAssignment whose endpoints carry our probes' verdicts.
//!
//! Every resource of a listener is named `NAME.NAMESPACE:PORT`, the target a
//! gRPC client dials (`xds:///web.default:8080`).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use envoy_types::pb::envoy::config::cluster::v3 as cluster;
use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::config::endpoint::v3 as endpoint;
use envoy_types::pb::envoy::config::listener::v3 as listener;
use envoy_types::pb::envoy::config::route::v3 as route;
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3 as hcm;
use envoy_types::pb::envoy::extensions::load_balancing_policies as policies;
use envoy_types::pb::google::protobuf::{Any, Duration as PbDuration, UInt32Value};
use envoy_types::util::pack_any;
use prost::Name;

use crate::api::config::{Algorithm, Config, HashKey};
use crate::api::spec::ListenerProtocol;
use crate::health::Health;

/// Listener type URL.
pub const LISTENER: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
/// Cluster type URL.
pub const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
/// ClusterLoadAssignment type URL.
pub const ENDPOINTS: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
/// RouteConfiguration type URL: routes are inline in the Listener, so a
/// client asking for one gets none.
pub const ROUTES: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";

/// The type URLs served, in the order a client needs them.
pub const TYPES: [&str; 4] = [LISTENER, ROUTES, CLUSTER, ENDPOINTS];

/// One BalancedService as xDS sees it.
#[derive(Clone, Debug)]
pub struct Service {
    /// Its validated spec.
    pub config: Arc<Config>,
    /// Its endpoints (group `default`), sorted by address.
    pub endpoints: Vec<Endpoint>,
}

/// One endpoint as xDS sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// Address and port.
    pub addr: SocketAddr,
    /// Per-listener ports (named target ports), by listener name.
    pub ports: Vec<(String, u16)>,
    /// Topology zone, when known.
    pub zone: Option<String>,
    /// What our probes say.
    pub health: Health,
    /// Kubernetes says not ready or terminating.
    pub not_ready: bool,
    /// Its agent says drain (or maint, or 0%).
    pub draining: bool,
    /// Effective weight: configured weight times reported percent (times
    /// its slow-start ramp).
    pub weight: u32,
    /// Its weight is still ramping up: published again as it grows.
    pub ramping: bool,
}

/// Every resource, by type URL and name.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Resources {
    by_type: BTreeMap<&'static str, BTreeMap<String, Any>>,
}

impl Resources {
    /// The resources of `type_url` named in `names` (every one when `names` is
    /// `None`, a wildcard subscription), sorted by name. Unknown names are
    /// left out: the client learns they do not exist.
    pub fn select(&self, type_url: &str, names: Option<&std::collections::BTreeSet<String>>) -> Vec<(String, Any)> {
        let Some(all) = self.by_type.get(type_url) else {
            return Vec::new();
        };
        match names {
            None => all.iter().map(|(n, a)| (n.clone(), a.clone())).collect(),
            Some(names) => names
                .iter()
                .filter_map(|n| all.get(n).map(|a| (n.clone(), a.clone())))
                .collect(),
        }
    }

    /// How many resources of `type_url` there are.
    pub fn count(&self, type_url: &str) -> usize {
        self.by_type.get(type_url).map_or(0, BTreeMap::len)
    }

    fn insert(&mut self, type_url: &'static str, name: String, any: Any) {
        self.by_type.entry(type_url).or_default().insert(name, any);
    }
}

/// The resource name of a listener: `NAME.NAMESPACE:PORT`.
pub fn resource_name(config: &Config, port: u16) -> String {
    format!("{}.{}:{}", config.key.name, config.key.namespace, port)
}

/// Builds every resource for `services`.
pub fn build(services: &[Service]) -> Resources {
    let mut out = Resources::default();
    for svc in services {
        for l in svc
            .config
            .listeners
            .iter()
            .filter(|l| l.protocol == ListenerProtocol::Http)
        {
            let name = resource_name(&svc.config, l.port);
            out.insert(LISTENER, name.clone(), pack_any(api_listener(&name, &svc.config)));
            out.insert(CLUSTER, name.clone(), pack_any(eds_cluster(&name, &svc.config)));
            let endpoints: Vec<(SocketAddr, &Endpoint)> = svc
                .endpoints
                .iter()
                .map(|e| (l.target_of(e.addr, &e.ports), e))
                .collect();
            out.insert(ENDPOINTS, name.clone(), pack_any(load_assignment(&name, &endpoints)));
        }
    }
    out
}

fn api_listener(name: &str, config: &Config) -> listener::Listener {
    let hash_policy = match &config.algorithm {
        Algorithm::ConsistentHash(HashKey::Header(h)) => vec![route::route_action::HashPolicy {
            policy_specifier: Some(route::route_action::hash_policy::PolicySpecifier::Header(
                route::route_action::hash_policy::Header {
                    header_name: h.as_str().to_string(),
                    ..Default::default()
                },
            )),
            ..Default::default()
        }],
        _ => Vec::new(),
    };
    let route_config = route::RouteConfiguration {
        name: name.to_string(),
        virtual_hosts: vec![route::VirtualHost {
            name: name.to_string(),
            domains: vec!["*".into()],
            routes: vec![route::Route {
                r#match: Some(route::RouteMatch {
                    path_specifier: Some(route::route_match::PathSpecifier::Prefix(String::new())),
                    ..Default::default()
                }),
                action: Some(route::route::Action::Route(route::RouteAction {
                    cluster_specifier: Some(route::route_action::ClusterSpecifier::Cluster(name.to_string())),
                    hash_policy,
                    ..Default::default()
                })),
                ..Default::default()
            }],
            ..Default::default()
        }],
        ..Default::default()
    };
    let manager = hcm::HttpConnectionManager {
        stat_prefix: name.to_string(),
        route_specifier: Some(hcm::http_connection_manager::RouteSpecifier::RouteConfig(route_config)),
        // gRPC requires the router as the last (here only) filter.
        http_filters: vec![hcm::HttpFilter {
            name: "envoy.filters.http.router".into(),
            config_type: Some(hcm::http_filter::ConfigType::TypedConfig(pack_any(Router::default()))),
            ..Default::default()
        }],
        ..Default::default()
    };
    listener::Listener {
        name: name.to_string(),
        api_listener: Some(listener::ApiListener {
            api_listener: Some(pack_any(manager)),
        }),
        ..Default::default()
    }
}

/// `lb_policy` for the algorithm, and the same as a `load_balancing_policy`
/// list with ROUND_ROBIN after it: a client takes the first policy it
/// supports, so one without LEAST_REQUEST still connects. PowerOfTwoChoices
/// is Envoy's LEAST_REQUEST (two choices); Random has no xDS policy and gets
/// ROUND_ROBIN (both spread evenly).
fn policies_for(algorithm: &Algorithm) -> (cluster::cluster::LbPolicy, Vec<Any>) {
    use cluster::cluster::LbPolicy;
    let round_robin = pack_any(policies::round_robin::v3::RoundRobin::default());
    match algorithm {
        Algorithm::LeastConnections | Algorithm::PowerOfTwoChoices => (
            LbPolicy::LeastRequest,
            vec![
                pack_any(policies::least_request::v3::LeastRequest {
                    choice_count: Some(UInt32Value { value: 2 }),
                    ..Default::default()
                }),
                round_robin,
            ],
        ),
        Algorithm::RoundRobin | Algorithm::Random => (LbPolicy::RoundRobin, vec![round_robin]),
        Algorithm::ConsistentHash(_) => (
            LbPolicy::RingHash,
            vec![pack_any(policies::ring_hash::v3::RingHash::default()), round_robin],
        ),
    }
}

fn eds_cluster(name: &str, config: &Config) -> cluster::Cluster {
    let (lb_policy, list) = policies_for(&config.algorithm);
    let connect = config.timeouts.connect;
    cluster::Cluster {
        name: name.to_string(),
        cluster_discovery_type: Some(cluster::cluster::ClusterDiscoveryType::Type(
            cluster::cluster::DiscoveryType::Eds as i32,
        )),
        eds_cluster_config: Some(cluster::cluster::EdsClusterConfig {
            eds_config: Some(core::ConfigSource {
                config_source_specifier: Some(core::config_source::ConfigSourceSpecifier::Ads(
                    core::AggregatedConfigSource::default(),
                )),
                resource_api_version: core::ApiVersion::V3 as i32,
                ..Default::default()
            }),
            service_name: name.to_string(),
        }),
        connect_timeout: Some(PbDuration {
            seconds: connect.as_secs() as i64,
            nanos: connect.subsec_nanos() as i32,
        }),
        lb_policy: lb_policy as i32,
        load_balancing_policy: Some(cluster::LoadBalancingPolicy {
            policies: list
                .into_iter()
                .map(|any| cluster::load_balancing_policy::Policy {
                    typed_extension_config: Some(core::TypedExtensionConfig {
                        name: extension_name(&any.type_url),
                        typed_config: Some(any),
                    }),
                })
                .collect(),
        }),
        ..Default::default()
    }
}

/// `envoy.load_balancing_policies.round_robin` for a RoundRobin type URL.
fn extension_name(type_url: &str) -> String {
    let kind = if type_url == policies::least_request::v3::LeastRequest::type_url() {
        "least_request"
    } else if type_url == policies::ring_hash::v3::RingHash::type_url() {
        "ring_hash"
    } else {
        "round_robin"
    };
    format!("envoy.load_balancing_policies.{kind}")
}

/// The endpoint's health for xDS clients: gRPC and Envoy use HEALTHY and
/// UNKNOWN endpoints and skip the rest, so an endpoint never checked yet is
/// published UNHEALTHY: held back until its first check passes, as the
/// proxies and the assign API hold it (envoy/gateway#8597). Passive
/// ejections are this proxy's own and are not published.
fn health_status(e: &Endpoint) -> core::HealthStatus {
    if e.not_ready {
        return core::HealthStatus::Unhealthy;
    }
    if e.draining {
        return core::HealthStatus::Draining;
    }
    match e.health {
        Health::Healthy => core::HealthStatus::Healthy,
        Health::Unhealthy | Health::Unknown => core::HealthStatus::Unhealthy,
    }
}

fn load_assignment(name: &str, endpoints: &[(SocketAddr, &Endpoint)]) -> endpoint::ClusterLoadAssignment {
    // Weights in the smallest integers with the same ratios.
    let g = endpoints.iter().fold(0u32, |g, (_, e)| gcd(g, e.weight.max(1))).max(1);
    let mut zones: BTreeMap<Option<&str>, Vec<endpoint::LbEndpoint>> = BTreeMap::new();
    for (target, e) in endpoints {
        zones.entry(e.zone.as_deref()).or_default().push(endpoint::LbEndpoint {
            host_identifier: Some(endpoint::lb_endpoint::HostIdentifier::Endpoint(endpoint::Endpoint {
                address: Some(socket_address(*target)),
                ..Default::default()
            })),
            health_status: health_status(e) as i32,
            load_balancing_weight: Some(UInt32Value {
                value: e.weight.max(1) / g,
            }),
            ..Default::default()
        });
    }
    endpoint::ClusterLoadAssignment {
        cluster_name: name.to_string(),
        endpoints: zones
            .into_iter()
            .map(|(zone, lb_endpoints)| endpoint::LocalityLbEndpoints {
                locality: Some(core::Locality {
                    zone: zone.unwrap_or_default().to_string(),
                    ..Default::default()
                }),
                lb_endpoints,
                // gRPC ignores a locality without a weight.
                load_balancing_weight: Some(UInt32Value { value: 1 }),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

fn socket_address(addr: SocketAddr) -> core::Address {
    core::Address {
        address: Some(core::address::Address::SocketAddress(core::SocketAddress {
            address: addr.ip().to_string(),
            port_specifier: Some(core::socket_address::PortSpecifier::PortValue(u32::from(addr.port()))),
            ..Default::default()
        })),
    }
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 { a } else { gcd(b, a % b) }
}
