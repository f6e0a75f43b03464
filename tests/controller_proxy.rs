//! `balanced proxy` against the test API server: it follows its
//! BalancedService's spec and its healthy EndpointSlices within a second, without dropping
//! in-flight requests, and keeps its last good snapshot through bad specs and
//! API outages.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use balanced::api::config::ServiceKey;
use balanced::demo::backend::{Backend, Behavior, http_get};
use balanced::proxy::Serving;
use balanced::source::kube::{ProxyOptions, run_proxy};
use balanced::testing::{eventually, free_port};
use serde_json::json;
use support::apiserver::ApiServer;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

const NS: &str = "shop";

/// Writes web's healthy slices as the controller would: one per endpoint
/// (loopback endpoints differ by port, and a slice has one port list).
fn healthy_slices(server: &ApiServer, endpoints: &[(SocketAddr, bool)]) {
    for (i, (addr, healthy)) in endpoints.iter().enumerate() {
        server.put(
            "endpointslices",
            NS,
            json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                   "metadata": {"name": format!("web-healthy-{i}"), "namespace": NS,
                                "labels": {"kubernetes.io/service-name": "web-healthy",
                                           "endpointslice.kubernetes.io/managed-by": "balanced.dev"}},
                   "addressType": "IPv4",
                   "ports": [{"port": addr.port(), "protocol": "TCP"}],
                   "endpoints": [{"addresses": [addr.ip().to_string()],
                                  "conditions": {"ready": healthy, "serving": healthy, "terminating": false}}]}),
        );
    }
}

async fn answered_by(listen: SocketAddr) -> (u16, String) {
    let (status, body) = http_get(listen, "/").await.expect("proxy answers");
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_follows_its_balanced_service() {
    let server = ApiServer::start().await;
    let a = Backend::http("a", Behavior::Status(200)).await;
    let b = Backend::http("b", Behavior::Slow(Duration::from_millis(700))).await;
    let port = free_port();
    server.put(
        "balancedservices",
        NS,
        json!({"apiVersion": "balanced.dev/v1alpha1", "kind": "BalancedService",
               "metadata": {"name": "web", "namespace": NS},
               "spec": {"endpoints": [{"address": "127.0.0.1", "port": a.addr.port()},
                                      {"address": "127.0.0.1", "port": b.addr.port()}],
                        "listeners": [{"name": "http", "port": port}],
                        "algorithm": "LeastConnections"}}),
    );
    healthy_slices(&server, &[(a.addr, false), (b.addr, true)]);

    let admin_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = admin_listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let opts = ProxyOptions {
        key: ServiceKey::new(NS, "web"),
        bind: [127, 0, 0, 1].into(),
        serving: Serving::default(),
        drain_delay: Duration::ZERO,
    };
    let task = tokio::spawn(run_proxy(server.client(), opts, admin_listener, shutdown.clone()));
    eventually(Duration::from_secs(10), "/readyz", || async move {
        (http_get(admin, "/readyz").await.ok()?.0 == 200).then_some(())
    })
    .await;
    let listen = SocketAddr::from(([127, 0, 0, 1], port));
    assert_eq!(
        answered_by(listen).await,
        (200, "b".into()),
        "only b is healthy in the slices"
    );

    // An in-flight request on slow b survives a spec change and a health flip.
    let in_flight = tokio::spawn(async move { answered_by(listen).await });
    let b_port = b.addr.port();
    eventually(
        Duration::from_secs(2),
        "the request to be in flight on b",
        || async move {
            let status = status_of(admin).await;
            let endpoints = status["services"][0]["endpoints"].as_array()?.clone();
            endpoints
                .iter()
                .any(|e| e["port"] == b_port && e["activeConnections"].as_u64() > Some(0))
                .then_some(())
        },
    )
    .await;
    let mut obj = server.get("balancedservices", NS, "web").unwrap();
    obj["spec"]["algorithm"] = json!("RoundRobin");
    server.put("balancedservices", NS, obj);
    healthy_slices(&server, &[(a.addr, true), (b.addr, false)]);
    let started = std::time::Instant::now();
    eventually(Duration::from_secs(1), "traffic to move to a", || async move {
        (answered_by(listen).await == (200, "a".into())).then_some(())
    })
    .await;
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_eq!(in_flight.await.unwrap(), (200, "b".into()), "in-flight request dropped");
    let status = status_of(admin).await;
    assert_eq!(status["lastApplied"]["algorithm"], "RoundRobin", "{status}");

    // A bad spec is ignored: the last snapshot keeps serving.
    let mut obj = server.get("balancedservices", NS, "web").unwrap();
    obj["spec"]["algorithm"] = json!("ConsistentHash");
    server.put("balancedservices", NS, obj);
    let rejected = eventually(Duration::from_secs(2), "the bad spec to be rejected", || async {
        status_of(admin).await["lastRejected"].as_str().map(str::to_string)
    })
    .await;
    assert!(rejected.contains("spec."), "names the field: {rejected}");
    assert_eq!(answered_by(listen).await, (200, "a".into()));
    assert_eq!(http_get(admin, "/readyz").await.unwrap().0, 200);

    // No API server: still serving.
    server.stop();
    eventually(Duration::from_secs(3), "the watch to fail", || async {
        status_of(admin).await["watchError"].as_str().map(|_| ())
    })
    .await;
    for _ in 0..5 {
        assert_eq!(answered_by(listen).await, (200, "a".into()));
    }
    shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
}

async fn status_of(admin: SocketAddr) -> serde_json::Value {
    let (_, body) = http_get(admin, "/status").await.unwrap();
    serde_json::from_str(&body).unwrap()
}
