use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3 as cluster;
use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::config::endpoint::v3 as endpoint;
use envoy_types::pb::envoy::config::listener::v3 as listener;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3 as hcm;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use envoy_types::pb::google::protobuf::Any;
use prost::Message;
use serde_json::{Value, json};

use super::resources::{self, CLUSTER, ENDPOINTS, LISTENER};
use super::*;
use crate::api::config::ServiceKey;
use crate::health::Health;

fn sample() -> Vec<Service> {
    let spec: crate::api::spec::BalancedServiceSpec = serde_saphyr::from_str(
        "endpoints:\n- {address: 10.0.0.1, port: 50051}\n- {address: 10.0.0.2, port: 50051, weight: 3}\n- {address: 10.0.0.3, port: 50051}\nlisteners:\n- {name: grpc, port: 8080}\n- {name: raw, port: 9000, protocol: TCP}\nalgorithm: RoundRobin\n",
    )
    .unwrap();
    let config = Arc::new(crate::api::validate::validate(ServiceKey::new("default", "web"), &spec).unwrap());
    let ep = |last: u8, health, weight, draining| Endpoint {
        addr: SocketAddr::from(([10, 0, 0, last], 50051)),
        ports: Vec::new(),
        zone: None,
        health,
        not_ready: false,
        draining,
        weight,
        ramping: false,
    };
    vec![Service {
        config,
        endpoints: vec![
            ep(1, Health::Healthy, 100, false),
            // weight 3 at 50%
            ep(2, Health::Healthy, 150, false),
            ep(3, Health::Unhealthy, 100, false),
            Endpoint {
                zone: Some("zone-b".into()),
                ..ep(4, Health::Healthy, 100, true)
            },
        ],
    }]
}

/// The fields we set, in proto3 JSON names, decoded back from the Anys.
fn to_json(r: &Resources) -> Value {
    let listeners: Vec<Value> = r
        .select(LISTENER, None)
        .into_iter()
        .map(|(_, any)| {
            let l = decode::<listener::Listener>(&any, LISTENER);
            let api = l.api_listener.unwrap().api_listener.unwrap();
            let m = decode::<hcm::HttpConnectionManager>(
                &api,
                "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            );
            let Some(hcm::http_connection_manager::RouteSpecifier::RouteConfig(rc)) = m.route_specifier else {
                panic!("inline route config")
            };
            let vh = &rc.virtual_hosts[0];
            let action = match &vh.routes[0].action {
                Some(envoy_types::pb::envoy::config::route::v3::route::Action::Route(a)) => a,
                _ => panic!("route action"),
            };
            let cluster = match &action.cluster_specifier {
                Some(envoy_types::pb::envoy::config::route::v3::route_action::ClusterSpecifier::Cluster(c)) => c,
                _ => panic!("cluster"),
            };
            json!({
                "name": l.name,
                "apiListener": {"apiListener": {
                    "@type": api.type_url,
                    "routeConfig": {"virtualHosts": [{"domains": vh.domains, "routes": [{"route": {"cluster": cluster}}]}]},
                    "httpFilters": m.http_filters.iter().map(|f| json!({"name": f.name, "@type": match &f.config_type {
                        Some(hcm::http_filter::ConfigType::TypedConfig(a)) => a.type_url.clone(),
                        _ => String::new(),
                    }})).collect::<Vec<_>>(),
                }}
            })
        })
        .collect();
    let clusters: Vec<Value> = r
        .select(CLUSTER, None)
        .into_iter()
        .map(|(_, any)| {
            let c = decode::<cluster::Cluster>(&any, CLUSTER);
            let eds = c.eds_cluster_config.unwrap();
            json!({
                "name": c.name,
                "type": match c.cluster_discovery_type {
                    Some(cluster::cluster::ClusterDiscoveryType::Type(t)) => cluster::cluster::DiscoveryType::try_from(t).unwrap().as_str_name(),
                    _ => "",
                },
                "edsClusterConfig": {
                    "serviceName": eds.service_name,
                    "edsConfig": {"ads": matches!(eds.eds_config.unwrap().config_source_specifier, Some(core::config_source::ConfigSourceSpecifier::Ads(_)))},
                },
                "lbPolicy": cluster::cluster::LbPolicy::try_from(c.lb_policy).unwrap().as_str_name(),
                "loadBalancingPolicy": c.load_balancing_policy.unwrap().policies.iter()
                    .map(|p| p.typed_extension_config.as_ref().unwrap().name.clone()).collect::<Vec<_>>(),
                "connectTimeout": format!("{}s", c.connect_timeout.unwrap().seconds),
            })
        })
        .collect();
    let assignments: Vec<Value> = r
        .select(ENDPOINTS, None)
        .into_iter()
        .map(|(_, any)| {
            let a = decode::<endpoint::ClusterLoadAssignment>(&any, ENDPOINTS);
            json!({
                "clusterName": a.cluster_name,
                "endpoints": a.endpoints.iter().map(|l| json!({
                    "locality": {"zone": l.locality.as_ref().unwrap().zone},
                    "loadBalancingWeight": l.load_balancing_weight.as_ref().unwrap().value,
                    "lbEndpoints": l.lb_endpoints.iter().map(|e| {
                        let Some(endpoint::lb_endpoint::HostIdentifier::Endpoint(ep)) = &e.host_identifier else { panic!() };
                        let Some(core::address::Address::SocketAddress(sa)) = &ep.address.as_ref().unwrap().address else { panic!() };
                        let Some(core::socket_address::PortSpecifier::PortValue(port)) = sa.port_specifier else { panic!() };
                        json!({
                            "endpoint": {"address": {"socketAddress": {"address": sa.address, "portValue": port}}},
                            "healthStatus": core::HealthStatus::try_from(e.health_status).unwrap().as_str_name(),
                            "loadBalancingWeight": e.load_balancing_weight.as_ref().unwrap().value,
                        })
                    }).collect::<Vec<_>>(),
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    json!({"listeners": listeners, "clusters": clusters, "clusterLoadAssignments": assignments})
}

fn decode<M: Message + Default>(any: &Any, type_url: &str) -> M {
    assert_eq!(any.type_url, type_url);
    M::decode(any.value.as_slice()).unwrap()
}

#[test]
fn an_endpoint_never_checked_is_not_published_usable() {
    let mut services = sample();
    services[0].endpoints[0].health = Health::Unknown;
    let built = resources::build(&services);
    let a = built
        .select(ENDPOINTS, None)
        .iter()
        .map(|(_, any)| decode::<endpoint::ClusterLoadAssignment>(any, ENDPOINTS))
        .find(|a| a.cluster_name == "web.default:8080")
        .expect("the grpc listener's assignment");
    let first = a
        .endpoints
        .iter()
        .flat_map(|z| &z.lb_endpoints)
        .find(|e| {
            matches!(&e.host_identifier, Some(endpoint::lb_endpoint::HostIdentifier::Endpoint(ep))
                if format!("{:?}", ep.address).contains("10.0.0.1"))
        })
        .expect("10.0.0.1 is listed");
    assert_eq!(
        first.health_status,
        core::HealthStatus::Unhealthy as i32,
        "UNKNOWN would be used by gRPC and Envoy"
    );
}

#[test]
fn resources_for_a_sample_spec_match_the_golden_file() {
    let got = serde_json::to_string_pretty(&to_json(&resources::build(&sample()))).unwrap() + "\n";
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden/xds.json");
    if std::env::var_os("BALANCED_BLESS").is_some() {
        std::fs::write(path, &got).unwrap();
    }
    let want = std::fs::read_to_string(path).unwrap();
    assert_eq!(
        got, want,
        "xDS resources differ from {path} (BALANCED_BLESS=1 rewrites it)"
    );
}

#[test]
fn algorithms_map_to_the_nearest_lb_policy() {
    let mut services = sample();
    let policy = |services: &[Service]| {
        let r = resources::build(services);
        let c = decode::<cluster::Cluster>(&r.select(CLUSTER, None)[0].1, CLUSTER);
        cluster::cluster::LbPolicy::try_from(c.lb_policy).unwrap().as_str_name()
    };
    let mut with = |yaml: &str| {
        let mut spec: crate::api::spec::BalancedServiceSpec = serde_saphyr::from_str(
            "endpoints: [{address: 10.0.0.1, port: 50051}]\nlisteners: [{name: grpc, port: 8080}]\n",
        )
        .unwrap();
        let extra: crate::api::spec::BalancedServiceSpec = serde_saphyr::from_str(&format!(
            "endpoints: [{{address: 10.0.0.1, port: 50051}}]\nlisteners: [{{name: grpc, port: 8080}}]\n{yaml}"
        ))
        .unwrap();
        spec.algorithm = extra.algorithm;
        spec.hash = extra.hash;
        services[0].config =
            Arc::new(crate::api::validate::validate(ServiceKey::new("default", "web"), &spec).unwrap());
        policy(&services)
    };
    assert_eq!(with("algorithm: LeastConnections"), "LEAST_REQUEST");
    assert_eq!(with("algorithm: PowerOfTwoChoices"), "LEAST_REQUEST");
    assert_eq!(with("algorithm: Random"), "ROUND_ROBIN");
    assert_eq!(
        with("algorithm: ConsistentHash\nhash: {source: Header, name: x-user}"),
        "RING_HASH"
    );
}

async fn next(stream: &mut tonic::Streaming<DiscoveryResponse>) -> DiscoveryResponse {
    tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .expect("a response within 5 s")
        .unwrap()
        .expect("the stream is open")
}

fn request(type_url: &str, names: &[&str], version: &str, nonce: &str) -> DiscoveryRequest {
    DiscoveryRequest {
        node: Some(core::Node {
            id: "test".into(),
            ..Default::default()
        }),
        type_url: type_url.into(),
        resource_names: names.iter().map(|n| n.to_string()).collect(),
        version_info: version.into(),
        response_nonce: nonce.into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn a_stream_pushes_only_what_changed_and_unknown_names_get_nothing() {
    let services = Arc::new(std::sync::Mutex::new(sample()));
    let (changes_tx, changes) = watch::channel(0u64);
    let stop = CancellationToken::new();
    let s = services.clone();
    let snapshots = publish(move || Some(s.lock().unwrap().clone()), changes, stop.clone());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(serve(listener, snapshots.clone(), stop.clone()));

    let mut client = AggregatedDiscoveryServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let (tx, rx) = mpsc::channel(8);
    let mut responses = client
        .stream_aggregated_resources(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();

    tx.send(request(LISTENER, &["web.default:8080", "nope.default:1"], "", ""))
        .await
        .unwrap();
    let r = next(&mut responses).await;
    assert_eq!(r.resources.len(), 1, "the unknown name gets no resource, and no error");
    tx.send(request(
        LISTENER,
        &["web.default:8080", "nope.default:1"],
        &r.version_info,
        &r.nonce,
    ))
    .await
    .unwrap();
    tx.send(request(ENDPOINTS, &["web.default:8080"], "", ""))
        .await
        .unwrap();
    let eds = next(&mut responses).await;
    assert_eq!(eds.type_url, ENDPOINTS);
    tx.send(request(ENDPOINTS, &["web.default:8080"], &eds.version_info, &eds.nonce))
        .await
        .unwrap();

    // Something moved that changes no resource: no new version, no push.
    changes_tx.send_modify(|g| *g += 1);
    let quiet = tokio::time::timeout(Duration::from_millis(300), responses.message()).await;
    assert!(quiet.is_err(), "nothing pushed for an unchanged snapshot: {quiet:?}");
    assert_eq!(snapshots.borrow().version, 1, "no new version either");

    // A NACK is logged and not answered.
    let mut nack = request(ENDPOINTS, &["web.default:8080"], &eds.version_info, &eds.nonce);
    nack.error_detail = Some(envoy_types::pb::google::rpc::Status {
        code: 3,
        message: "test rejects".into(),
        ..Default::default()
    });
    tx.send(nack).await.unwrap();

    // An endpoint goes down: only the endpoints are pushed again.
    services.lock().unwrap()[0].endpoints[0].health = Health::Unhealthy;
    changes_tx.send_modify(|g| *g += 1);
    let pushed = next(&mut responses).await;
    assert_eq!(pushed.type_url, ENDPOINTS, "only the type that changed");
    assert_eq!(pushed.version_info, "2");
    let a = decode::<endpoint::ClusterLoadAssignment>(&pushed.resources[0], ENDPOINTS);
    assert_eq!(
        a.endpoints[0].lb_endpoints[0].health_status,
        core::HealthStatus::Unhealthy as i32
    );
    let quiet = tokio::time::timeout(Duration::from_millis(300), responses.message()).await;
    assert!(quiet.is_err(), "the listener did not change: {quiet:?}");
    stop.cancel();
}

#[tokio::test(start_paused = true)]
async fn ramping_weights_are_published_again_until_the_ramp_ends() {
    use std::sync::atomic::{AtomicU32, Ordering};
    // A build whose newcomer's weight grows by 10 per call and stops ramping at 100.
    let calls = Arc::new(AtomicU32::new(0));
    let c = calls.clone();
    let (_changes_tx, changes) = watch::channel(0u64);
    let stop = CancellationToken::new();
    let snapshots = publish(
        move || {
            let n = c.fetch_add(1, Ordering::SeqCst) + 1;
            let mut services = sample();
            let newcomer = &mut services[0].endpoints[0];
            newcomer.weight = (10 * n).min(100);
            newcomer.ramping = newcomer.weight < 100;
            Some(services)
        },
        changes,
        stop.clone(),
    );
    assert_eq!(snapshots.borrow().version, 1);
    tokio::time::sleep(Duration::from_millis(9_500)).await;
    assert_eq!(snapshots.borrow().version, 10, "one version a second while it ramps");
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(snapshots.borrow().version, 10, "none once it is full");
    assert_eq!(calls.load(Ordering::SeqCst), 10);
    stop.cancel();
}
