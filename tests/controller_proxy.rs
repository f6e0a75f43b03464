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
use support::pki::{Pki, rotate_under_load, s_client};
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

    let (admin, shutdown, task) = start_proxy(&server, "web").await;
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

/// `balanced proxy` for BalancedService `name`, once `/readyz` passes.
async fn start_proxy(
    server: &ApiServer,
    name: &str,
) -> (
    SocketAddr,
    CancellationToken,
    tokio::task::JoinHandle<Result<(), balanced::shell::Error>>,
) {
    let admin_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = admin_listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let opts = ProxyOptions {
        key: ServiceKey::new(NS, name),
        bind: [127, 0, 0, 1].into(),
        serving: Serving::default(),
        drain_delay: Duration::ZERO,
    };
    let task = tokio::spawn(run_proxy(server.client(), opts, admin_listener, shutdown.clone()));
    eventually(Duration::from_secs(10), "/readyz", || async move {
        (http_get(admin, "/readyz").await.ok()?.0 == 200).then_some(())
    })
    .await;
    (admin, shutdown, task)
}

/// A `kubernetes.io/tls` Secret of a new leaf for `site.example` named `common_name`.
fn tls_secret(pki: &Pki, name: &str, common_name: &str) -> serde_json::Value {
    use k8s_openapi::ByteString;
    let (cert, key) = pki.leaf(name, &["site.example"], common_name);
    let secret = k8s_openapi::api::core::v1::Secret {
        metadata: kube::api::ObjectMeta {
            name: Some(name.into()),
            namespace: Some(NS.into()),
            ..Default::default()
        },
        type_: Some("kubernetes.io/tls".into()),
        data: Some(
            [
                ("tls.crt".to_string(), ByteString(std::fs::read(cert).unwrap())),
                ("tls.key".to_string(), ByteString(std::fs::read(key).unwrap())),
            ]
            .into(),
        ),
        ..Default::default()
    };
    let mut v = serde_json::to_value(secret).unwrap();
    v["apiVersion"] = "v1".into();
    v["kind"] = "Secret".into();
    v
}

/// In the cluster a listener's certificate is a Secret, read by a watch on
/// its name: the proxy waits for it, a replaced one serves new connections
/// after one watch event (and the file check's second) with no request
/// failing, and a spec naming a Secret that does not exist is held, said in
/// status, while the last good one serves on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_listener_serves_its_secret_and_follows_a_replaced_one() {
    let server = ApiServer::start().await;
    let pki = Pki::new("cluster-secret");
    let backend = Backend::http("backend", Behavior::Status(200)).await;
    let port = free_port();
    server.put("secrets", NS, tls_secret(&pki, "site-tls", "first"));
    let spec = |secret: &str| {
        json!({"apiVersion": "balanced.dev/v1alpha1", "kind": "BalancedService",
               "metadata": {"name": "secure", "namespace": NS},
               "spec": {"endpoints": [{"address": "127.0.0.1", "port": backend.addr.port()}],
                        "listeners": [{"name": "https", "port": port, "tls": {"secretName": secret}}]}})
    };
    server.put("balancedservices", NS, spec("site-tls"));
    healthy_slices(&server, &[(backend.addr, true)]);
    let (admin, shutdown, task) = start_proxy(&server, "secure").await;
    assert!(s_client(port, "site.example", "h2").await.contains("CN = first"));
    // The test API server grants Secrets by name only, as the proxy's Role does.
    assert!(
        server
            .api_calls()
            .iter()
            .any(|(_, r, v)| r == "secrets" && v == "watch")
    );

    // New connections, 50 a second, across the replacement: none fails.
    rotate_under_load(&pki.ca(), "site.example", port, "second", || {
        server.put("secrets", NS, tls_secret(&pki, "site-tls", "second"));
    })
    .await;

    // A spec naming a Secret that is not there waits, and says why.
    server.put("balancedservices", NS, spec("missing-tls"));
    eventually(Duration::from_secs(3), "the held spec in status", || async {
        let doc = status_of(admin).await;
        let rejected = doc["lastRejected"].as_str()?;
        rejected
            .ends_with(": waiting for Secret missing-tls: not found")
            .then_some(())
    })
    .await;
    assert!(s_client(port, "site.example", "h2").await.contains("CN = second"));
    server.put("secrets", NS, tls_secret(&pki, "missing-tls", "third"));
    eventually(Duration::from_secs(3), "the held spec to apply", || async {
        s_client(port, "site.example", "h2")
            .await
            .contains("CN = third")
            .then_some(())
    })
    .await;
    shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
}

async fn status_of(admin: SocketAddr) -> serde_json::Value {
    let (_, body) = http_get(admin, "/status").await.unwrap();
    serde_json::from_str(&body).unwrap()
}
