//! The controller and the Kubernetes-mode proxy against a test API server over
//! real HTTP, with real backends on loopback.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use balanced::controller::desired::RenderOptions;
use balanced::controller::leader::LeaseConfig;
use balanced::controller::leading::{ControllerOptions, serve};
use balanced::demo::backend::{Backend, Behavior, http_get};
use balanced::testing::{eventually, free_port};
use serde_json::{Value, json};
use support::apiserver::ApiServer;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

const NS: &str = "shop";

fn bsvc(name: &str, spec: Value) -> Value {
    json!({"apiVersion": "balanced.dev/v1alpha1", "kind": "BalancedService",
           "metadata": {"name": name, "namespace": NS}, "spec": spec})
}

/// A 2 s Lease renewed every 500 ms, held as `id`.
fn lease(id: &str) -> LeaseConfig {
    LeaseConfig {
        namespace: "balanced".into(),
        name: "balanced-controller".into(),
        identity: id.into(),
        duration: Duration::from_secs(2),
        renew: Duration::from_millis(500),
    }
}

fn web_spec(rise: i64) -> Value {
    json!({
        "service": "web",
        "listeners": [{"name": "http", "port": free_port(), "protocol": "HTTP", "targetPort": "http"}],
        "healthCheck": {"protocol": "HTTP", "interval": "200ms", "timeout": "100ms", "rise": rise, "fall": 2,
                        "downInterval": "200ms", "http": {"path": "/healthz"}},
        "publishEndpointSlice": true
    })
}

/// One EndpointSlice per backend (loopback backends differ by port, and a
/// slice has one port list), replacing the previous set.
fn slices_for(server: &ApiServer, backends: &[SocketAddr]) {
    for old in server.list("endpointslices", NS) {
        let name = old["metadata"]["name"].as_str().unwrap().to_string();
        if name.starts_with("web-") && !name.contains("-healthy") {
            server.delete("endpointslices", NS, &name);
        }
    }
    for (i, a) in backends.iter().enumerate() {
        let endpoint = json!({"addresses": [a.ip().to_string()], "conditions": {"ready": true},
                              "targetRef": {"kind": "Pod", "name": format!("web-pod-{i}")}});
        server.put_service_slice(NS, &format!("web-{i}"), "web", a.port(), vec![endpoint]);
    }
}

struct Running {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    admin: std::net::SocketAddr,
    xds: std::net::SocketAddr,
}

impl Running {
    /// Stops the controller and waits for it.
    async fn shut(self) {
        self.stop.cancel();
        stopped(self.task).await;
    }
}

async fn stopped(task: tokio::task::JoinHandle<()>) {
    tokio::time::timeout(Duration::from_secs(15), task)
        .await
        .expect("the controller did not stop within 15 s of shutdown")
        .unwrap();
}

async fn controller(server: &ApiServer, lease: Option<LeaseConfig>) -> Running {
    let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin_addr = admin.local_addr().unwrap();
    let xds = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let xds_addr = xds.local_addr().unwrap();
    let stop = CancellationToken::new();
    let opts = ControllerOptions {
        render: RenderOptions {
            image: "balanced:test".into(),
            ..RenderOptions::default()
        },
        lease,
        max_endpoints_per_slice: 100,
    };
    let task = tokio::spawn(serve(server.client(), opts, admin, Some(xds), stop.clone()));
    Running {
        stop,
        task,
        admin: admin_addr,
        xds: xds_addr,
    }
}

/// `balanced proxy` for shop/web against the test API server, ready.
struct KubeProxy {
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), balanced::shell::Error>>,
}

impl KubeProxy {
    async fn start(server: &ApiServer) -> Self {
        let admin_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin = admin_listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let opts = balanced::source::kube::ProxyOptions {
            key: balanced::api::config::ServiceKey::new(NS, "web"),
            bind: [127, 0, 0, 1].into(),
            serving: balanced::proxy::Serving::default(),
            drain_delay: Duration::ZERO,
        };
        let task = tokio::spawn(balanced::source::kube::run_proxy(
            server.client(),
            opts,
            admin_listener,
            shutdown.clone(),
        ));
        eventually(Duration::from_secs(10), "the proxy's /readyz", || async move {
            (http_get(admin, "/readyz").await.ok()?.0 == 200).then_some(())
        })
        .await;
        Self { shutdown, task }
    }

    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(5), self.task)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }
}

fn status(server: &ApiServer, name: &str) -> Value {
    server
        .get("balancedservices", NS, name)
        .map(|o| o["status"].clone())
        .unwrap_or(Value::Null)
}

fn condition(status: &Value, type_: &str) -> (String, String) {
    status["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == type_))
        .map(|c| {
            (
                c["status"].as_str().unwrap().to_string(),
                c["reason"].as_str().unwrap().to_string(),
            )
        })
        .unwrap_or_default()
}

fn endpoint_state(status: &Value, port: u16) -> Option<(bool, String)> {
    status["endpoints"]
        .as_array()?
        .iter()
        .find(|e| e["port"] == port)
        .map(|e| {
            (
                e["healthy"].as_bool().unwrap_or(false),
                e["state"].as_str().unwrap_or("").to_string(),
            )
        })
}

/// Every endpoint of web's healthy slices, with its slice's first port.
fn healthy_endpoints(server: &ApiServer) -> Vec<(u16, Value)> {
    server
        .list_selected("endpointslices", NS, &balanced::controller::slices::selector("web"))
        .iter()
        .flat_map(|s| {
            let port = s["ports"][0]["port"].as_u64().unwrap_or(0) as u16;
            s["endpoints"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .map(move |e| (port, e))
        })
        .collect()
}

/// The healthy slice's `ready` for the endpoint on `port`.
fn slice_ready(server: &ApiServer, port: u16) -> Option<bool> {
    healthy_endpoints(server)
        .into_iter()
        .find(|(p, _)| *p == port)
        .and_then(|(_, e)| e["conditions"]["ready"].as_bool())
}

async fn wait_status(server: &ApiServer, within: Duration, what: &str, check: impl Fn(&Value) -> bool) {
    eventually(within, what, || {
        let s = status(server, "web");
        let ok = check(&s);
        async move { ok.then_some(()) }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_follows_backends_slices_and_deletion() {
    let server = ApiServer::start().await;
    let a = Backend::http("a", Behavior::Status(200)).await;
    let mut b = Backend::http("b", Behavior::Status(200)).await;
    slices_for(&server, &[a.addr, b.addr]);
    server.put("balancedservices", NS, bsvc("web", web_spec(2)));
    let c = controller(&server, None).await;

    wait_status(&server, Duration::from_secs(5), "both endpoints healthy", |s| {
        s["ready"] == "2/2" && condition(s, "Ready") == ("True".into(), "EndpointsHealthy".into())
    })
    .await;
    let s = status(&server, "web");
    assert_eq!(s["observedGeneration"], 1);
    assert!(s.get("endpoints").is_none(), "every endpoint serves: none listed: {s}");
    // The full per-endpoint table is the leader's admin /status.
    let (_, table) = http_get(c.admin, "/status").await.unwrap();
    let table: Value = serde_json::from_str(&table).unwrap();
    let rows = table["services"][0]["endpoints"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(rows.len(), 2, "{table}");
    assert!(
        rows.iter()
            .all(|r| r["state"] == "Healthy" && r["consecutiveSuccesses"].as_u64() >= Some(2)),
        "{table}"
    );
    let (_, a_slice) = eventually(Duration::from_secs(2), "a in a healthy slice", || {
        let found = healthy_endpoints(&server)
            .into_iter()
            .find(|(p, _)| *p == a.addr.port());
        async move { found }
    })
    .await;
    assert_eq!(a_slice["targetRef"]["name"], "web-pod-0");
    for (plural, name) in [
        ("deployments", "web-proxy"),
        ("services", "web-proxy"),
        ("serviceaccounts", "web-proxy"),
        ("roles", "web-proxy"),
        ("rolebindings", "web-proxy"),
        ("services", "web-healthy"),
        ("endpointslices", "web-healthy-0"),
    ] {
        // The healthy slice is written just after the status, in the same flush.
        let obj = eventually(Duration::from_secs(2), &format!("{plural}/{name}"), || {
            let obj = server.get(plural, NS, name);
            async move { obj }
        })
        .await;
        assert_eq!(
            obj["metadata"]["ownerReferences"][0]["kind"], "BalancedService",
            "{plural}/{name}"
        );
    }
    let deployment = server.get("deployments", NS, "web-proxy").unwrap();
    assert_eq!(
        deployment["spec"]["template"]["spec"]["containers"][0]["image"],
        "balanced:test"
    );

    // Kill b: unhealthy within fall x interval + 1 s.
    b.kill();
    let killed = std::time::Instant::now();
    wait_status(&server, Duration::from_millis(400 + 1000), "b unhealthy", |s| {
        endpoint_state(s, b.addr.port()) == Some((false, "Unhealthy".into()))
    })
    .await;
    assert!(killed.elapsed() < Duration::from_millis(1400));
    let s = status(&server, "web");
    assert_eq!(condition(&s, "Degraded").0, "True");
    eventually(Duration::from_secs(2), "healthy slice to mark b not ready", || {
        let b_ready = slice_ready(&server, b.addr.port());
        let a_ready = slice_ready(&server, a.addr.port());
        async move { (b_ready == Some(false) && a_ready == Some(true)).then_some(()) }
    })
    .await;
    let (_, b_status) = healthy_endpoints(&server)
        .into_iter()
        .find(|(p, _)| *p == b.addr.port())
        .unwrap();
    assert_eq!(b_status["conditions"]["serving"], false);
    assert!(
        server.requests_matching("POST /apis/events.k8s.io/v1/namespaces/shop/events") > 0,
        "no Events"
    );

    b.revive().await.unwrap();
    wait_status(&server, Duration::from_secs(2), "b healthy again", |s| {
        s["ready"] == "2/2"
    })
    .await;

    // Scale the Service: a third endpoint appears, then one goes away.
    let c3 = Backend::http("c", Behavior::Status(200)).await;
    slices_for(&server, &[a.addr, b.addr, c3.addr]);
    wait_status(&server, Duration::from_secs(3), "three endpoints", |s| {
        s["ready"] == "3/3"
    })
    .await;
    slices_for(&server, &[a.addr, c3.addr]);
    wait_status(&server, Duration::from_secs(3), "two endpoints", |s| {
        s["totalEndpoints"] == 2
    })
    .await;

    // Every request the controller made is one the chart's RBAC grants.
    for (group, resource, verb) in server.api_calls() {
        assert!(
            balanced::controller::rbac::allowed(&group, &resource, &verb),
            "the controller called {verb} {group}/{resource}, which the chart does not grant"
        );
    }

    // Delete the BalancedService: owned objects go with it.
    server.delete("balancedservices", NS, "web");
    eventually(Duration::from_secs(2), "owned objects to go", || {
        let gone = server.get("deployments", NS, "web-proxy").is_none() && healthy_endpoints(&server).is_empty();
        async move { gone.then_some(()) }
    })
    .await;
    // Probes (every 200 ms) stop: wait for the first quiet second, then
    // check the next one stays quiet. Each sleep is a measuring window.
    eventually(Duration::from_secs(5), "probes to stop after deletion", || async {
        let before = a.accepted();
        tokio::time::sleep(Duration::from_millis(600)).await;
        (a.accepted() == before).then_some(())
    })
    .await;
    let accepted = a.accepted();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(a.accepted(), accepted, "probes continue after deletion");
    c.shut().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_spec_reports_invalid_spec_and_keeps_probing() {
    let server = ApiServer::start().await;
    let a = Backend::http("a", Behavior::Status(200)).await;
    slices_for(&server, &[a.addr]);
    server.put("balancedservices", NS, bsvc("web", web_spec(2)));
    let c = controller(&server, None).await;
    wait_status(&server, Duration::from_secs(5), "healthy", |s| s["ready"] == "1/1").await;

    let mut broken = server.get("balancedservices", NS, "web").unwrap();
    broken["spec"]["healthCheck"]["rise"] = json!(0);
    server.put("balancedservices", NS, broken);
    wait_status(&server, Duration::from_secs(3), "InvalidSpec", |s| {
        condition(s, "Ready") == ("False".into(), "InvalidSpec".into())
    })
    .await;
    let s = status(&server, "web");
    let msg = s["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Ready")
        .unwrap()["message"]
        .clone();
    assert_eq!(msg, "spec.healthCheck.rise: must be >= 1, got 0");
    assert_eq!(s["observedGeneration"], 2);
    // The last good config keeps probing: the endpoint stays known and healthy.
    assert_eq!(s["ready"], "1/1", "{s}");
    assert_eq!(slice_ready(&server, a.addr.port()), Some(true));
    c.shut().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_controller_survives_an_api_server_outage_and_410_gone() {
    let server = ApiServer::start().await;
    let a = Backend::http("a", Behavior::Status(200)).await;
    let b = Backend::http("b", Behavior::Status(200)).await;
    slices_for(&server, &[a.addr]);
    server.put("balancedservices", NS, bsvc("web", web_spec(1)));
    let c = controller(&server, None).await;
    wait_status(&server, Duration::from_secs(5), "healthy", |s| s["ready"] == "1/1").await;

    // Watches expire: clients must re-list, and still see new slices.
    server.expire_watches();
    slices_for(&server, &[a.addr, b.addr]);
    // The watchers re-list after 410 following their backoff (jittered,
    // growing, shared by the owned-object watches): ~5 s here.
    wait_status(&server, Duration::from_secs(30), "b after 410", |s| s["ready"] == "2/2").await;

    // Two seconds without an API server (several watch retries and status
    // writes fail), then it comes back. The outage is the scenario, so this
    // sleep is its length, not a wait for a signal.
    server.stop();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!c.task.is_finished(), "the controller died with the API server");
    server.restart().await;
    b.kill();
    wait_status(&server, Duration::from_secs(15), "b unhealthy after the outage", |s| {
        s["ready"] == "1/2"
    })
    .await;
    c.shut().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_controller_inherits_endpoint_state() {
    let server = ApiServer::start().await;
    let a = Backend::http("a", Behavior::Status(200)).await;
    let b = Backend::http("b", Behavior::Status(200)).await;
    slices_for(&server, &[a.addr, b.addr]);
    // rise 5 at 200ms: a fresh Unknown would take a second to serve.
    server.put("balancedservices", NS, bsvc("web", web_spec(5)));
    let first = controller(&server, None).await;
    wait_status(&server, Duration::from_secs(5), "healthy", |s| s["ready"] == "2/2").await;
    b.kill();
    wait_status(&server, Duration::from_secs(3), "b unhealthy", |s| {
        endpoint_state(s, b.addr.port()) == Some((false, "Unhealthy".into()))
    })
    .await;
    eventually(Duration::from_secs(2), "the healthy slices", || {
        let ready = (slice_ready(&server, a.addr.port()), slice_ready(&server, b.addr.port()));
        async move { (ready == (Some(true), Some(false))).then_some(()) }
    })
    .await;
    first.shut().await;

    let (writes, _) = server.write_counts();
    let second = controller(&server, None).await;
    // A second of samples: nothing flaps while the new controller starts
    // (a measuring window, not a wait): a stays serving, b stays Unhealthy
    // rather than Unknown.
    for _ in 0..20 {
        let s = status(&server, "web");
        assert_eq!(s["ready"], "1/2", "flapped: {s}");
        assert_eq!(
            endpoint_state(&s, b.addr.port()),
            Some((false, "Unhealthy".into())),
            "{s}"
        );
        assert_eq!(slice_ready(&server, a.addr.port()), Some(true), "the slice flapped");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Nothing changed, so the new leader wrote nothing: its owned objects
    // apply unchanged, and status and the slices are as it found them.
    assert_eq!(
        server.write_counts().0,
        writes,
        "the new leader rewrote objects that did not change"
    );
    second.shut().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_takes_over_within_the_lease_duration() {
    let server = ApiServer::start().await;
    let one = controller(&server, Some(lease("one"))).await;
    eventually(Duration::from_secs(3), "one to lead", || {
        let holder = server
            .get("leases", "balanced", "balanced-controller")
            .map(|l| l["spec"]["holderIdentity"].clone());
        async move { (holder == Some(json!("one"))).then_some(()) }
    })
    .await;
    let two = controller(&server, Some(lease("two"))).await;
    // Two renew periods with both running: a window in which two must not lead.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let holder = server.get("leases", "balanced", "balanced-controller").unwrap()["spec"]["holderIdentity"].clone();
    assert_eq!(holder, "one", "two replicas must not both lead");

    // The leader crashes (no release): the standby leads within the lease duration.
    one.task.abort();
    let crashed = std::time::Instant::now();
    eventually(Duration::from_secs(4), "two to take over", || {
        let holder = server
            .get("leases", "balanced", "balanced-controller")
            .map(|l| l["spec"]["holderIdentity"].clone());
        async move { (holder == Some(json!("two"))).then_some(()) }
    })
    .await;
    assert!(crashed.elapsed() < Duration::from_secs(2) + Duration::from_millis(1500));
    // The new leader does the work.
    let a = Backend::http("a", Behavior::Status(200)).await;
    slices_for(&server, &[a.addr]);
    server.put("balancedservices", NS, bsvc("web", web_spec(1)));
    wait_status(&server, Duration::from_secs(5), "the new leader to write status", |s| {
        s["ready"] == "1/1"
    })
    .await;
    two.shut().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_ports_app_protocol_reaches_status_for_the_proxies() {
    let server = ApiServer::start().await;
    let a = Backend::http("a", Behavior::Status(200)).await;
    server.put(
        "endpointslices",
        NS,
        json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
               "metadata": {"name": "web-h2c", "namespace": NS,
                            "labels": {"kubernetes.io/service-name": "web"}},
               "addressType": "IPv4",
               "ports": [{"name": "http", "port": a.addr.port(), "protocol": "TCP",
                          "appProtocol": "kubernetes.io/h2c"}],
               "endpoints": [{"addresses": ["127.0.0.1"], "conditions": {"ready": true}}]}),
    );
    let mut spec = web_spec(1);
    spec["listeners"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "plain", "port": free_port(), "targetPort": "http", "appProtocol": "http"}));
    server.put("balancedservices", NS, bsvc("web", spec));
    let c = controller(&server, None).await;
    wait_status(
        &server,
        Duration::from_secs(5),
        "status.listeners from the slice port",
        |s| s["listeners"] == json!([{"name": "http", "appProtocol": "kubernetes.io/h2c"}]),
    )
    .await;
    // The proxy side: a listener the spec leaves open follows status; one the
    // spec sets keeps its own.
    let bsvc: balanced::api::BalancedService =
        serde_json::from_value(server.get("balancedservices", NS, "web").unwrap()).unwrap();
    let cfg = balanced::api::validate(balanced::api::config::ServiceKey::new(NS, "web"), &bsvc.spec).unwrap();
    let cfg = balanced::source::kube::with_status_protocols(cfg, &bsvc);
    let protocols: Vec<_> = cfg.listeners.iter().map(|l| l.app_protocol).collect();
    use balanced::api::config::AppProtocol;
    assert_eq!(protocols, vec![Some(AppProtocol::H2c), Some(AppProtocol::Http1)]);
    c.shut().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_listener_reaches_the_port_its_named_target_port_names() {
    // One pod (one IP) with two container ports, and a BalancedService with
    // one listener per port name: each listener's traffic goes to its own port.
    let server = ApiServer::start().await;
    let web = Backend::http("web-port", Behavior::Status(200)).await;
    let metrics = Backend::http("metrics-port", Behavior::Status(200)).await;
    server.put(
        "endpointslices",
        NS,
        json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
               "metadata": {"name": "web-two-ports", "namespace": NS,
                            "labels": {"kubernetes.io/service-name": "web"}},
               "addressType": "IPv4",
               "ports": [{"name": "metrics", "port": metrics.addr.port(), "protocol": "TCP"},
                         {"name": "http", "port": web.addr.port(), "protocol": "TCP"}],
               "endpoints": [{"addresses": ["127.0.0.1"], "conditions": {"ready": true},
                              "targetRef": {"kind": "Pod", "name": "web-pod-0"}}]}),
    );
    let (http_port, metrics_port) = (free_port(), free_port());
    let mut spec = web_spec(1);
    spec["listeners"] = json!([
        {"name": "http", "port": http_port, "targetPort": "http"},
        {"name": "metrics", "port": metrics_port, "targetPort": "metrics"},
    ]);
    server.put("balancedservices", NS, bsvc("web", spec));
    let c = controller(&server, None).await;
    wait_status(&server, Duration::from_secs(5), "the endpoint healthy", |s| {
        s["ready"] == "1/1"
    })
    .await;
    let slice = eventually(Duration::from_secs(2), "the healthy slice", || {
        let found = server
            .list_selected("endpointslices", NS, &balanced::controller::slices::selector("web"))
            .into_iter()
            .next();
        async move { found }
    })
    .await;
    assert_eq!(
        slice["ports"],
        json!([{"name": "http", "port": web.addr.port(), "protocol": "TCP"},
               {"name": "metrics", "port": metrics.addr.port(), "protocol": "TCP"}]),
        "probed on the first listener's port, each listener's own port carried: {slice}"
    );

    let proxy = KubeProxy::start(&server).await;
    for (listener, backend) in [(http_port, "web-port"), (metrics_port, "metrics-port")] {
        for _ in 0..3 {
            let (code, body) = http_get(([127, 0, 0, 1], listener).into(), "/").await.unwrap();
            assert_eq!((code, body.as_str()), (200, backend), "listener on {listener}");
        }
    }
    proxy.stop().await;
    c.shut().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_services_slices_feed_a_backend_that_a_route_reaches() {
    let server = ApiServer::start().await;
    let main = Backend::http("main", Behavior::Status(200)).await;
    let beta = Backend::http("beta", Behavior::Status(200)).await;
    let slice = |name: &str, service: &str, addr: SocketAddr| {
        json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
               "metadata": {"name": name, "namespace": NS, "labels": {"kubernetes.io/service-name": service}},
               "addressType": "IPv4",
               "ports": [{"name": "http", "port": addr.port(), "protocol": "TCP"}],
               "endpoints": [{"addresses": [addr.ip().to_string()], "conditions": {"ready": true}}]})
    };
    server.put("endpointslices", NS, slice("web-main", "web", main.addr));
    let listen = free_port();
    let mut spec = web_spec(1);
    spec["listeners"] = json!([{"name": "http", "port": listen, "targetPort": "http"}]);
    spec["backends"] = json!([{"name": "beta", "service": "web-beta"}]);
    spec["routes"] = json!([{"name": "beta", "matches": [{"headers": [{"name": "x-beta", "value": "yes"}]}],
                              "backendRefs": [{"name": "beta"}]}]);
    server.put("balancedservices", NS, bsvc("web", spec));
    let c = controller(&server, None).await;
    wait_status(&server, Duration::from_secs(5), "the default group", |s| {
        s["ready"] == "1/1"
    })
    .await;
    // The second Service's slice appears after the controller started: its
    // watch must map it to this BalancedService.
    server.put("endpointslices", NS, slice("web-beta-1", "web-beta", beta.addr));
    wait_status(&server, Duration::from_secs(5), "both groups healthy", |s| {
        s["backends"]
            == json!([
                {"name": "default", "ready": "1/1", "readyEndpoints": 1, "totalEndpoints": 1},
                {"name": "beta", "ready": "1/1", "readyEndpoints": 1, "totalEndpoints": 1},
            ])
    })
    .await;
    let s = status(&server, "web");
    assert_eq!(s["ready"], "2/2", "status.ready stays the total: {s}");

    let proxy = KubeProxy::start(&server).await;
    let target = SocketAddr::from(([127, 0, 0, 1], listen));
    for _ in 0..3 {
        assert_eq!(
            http_get(target, "/").await.unwrap(),
            (200, "main".to_string()),
            "no route: default"
        );
        let mut s = tokio::net::TcpStream::connect(target).await.unwrap();
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nX-Beta: yes\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).await.unwrap();
        assert!(
            answer.starts_with("HTTP/1.1 200") && answer.ends_with("beta"),
            "{answer}"
        );
    }
    proxy.stop().await;
    c.shut().await;
}

/// Opens an ADS stream to `xds` and asks for `name`'s endpoints.
async fn eds_stream(
    xds: SocketAddr,
    name: &str,
) -> Result<
    (
        tokio::sync::mpsc::Sender<envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest>,
        tonic::Streaming<envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse>,
    ),
    tonic::Status,
> {
    ads_stream(xds, balanced::xds::resources::ENDPOINTS, name).await
}

/// Opens an ADS stream to `xds`, asks for `name` of `type_url`, and reads the first answer.
async fn ads_stream(
    xds: SocketAddr,
    type_url: &str,
    name: &str,
) -> Result<
    (
        tokio::sync::mpsc::Sender<envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest>,
        tonic::Streaming<envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse>,
    ),
    tonic::Status,
> {
    use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
    use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
    let mut client = AggregatedDiscoveryServiceClient::connect(format!("http://{xds}"))
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(DiscoveryRequest {
        type_url: type_url.into(),
        resource_names: vec![name.into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let mut stream = client
        .stream_aggregated_resources(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    // A standby answers the first read with UNAVAILABLE.
    let first = stream.message().await?;
    assert!(first.is_some(), "a first response");
    Ok((tx, stream))
}

/// The endpoints and health statuses of a ClusterLoadAssignment response.
fn eds_health(r: &envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse) -> Vec<(u32, i32)> {
    use envoy_types::pb::envoy::config::core::v3::{address, socket_address};
    use envoy_types::pb::envoy::config::endpoint::v3::{ClusterLoadAssignment, lb_endpoint};
    use prost::Message;
    let a = ClusterLoadAssignment::decode(r.resources[0].value.as_slice()).unwrap();
    a.endpoints
        .iter()
        .flat_map(|l| &l.lb_endpoints)
        .map(|e| {
            let Some(lb_endpoint::HostIdentifier::Endpoint(ep)) = &e.host_identifier else {
                panic!()
            };
            let Some(address::Address::SocketAddress(sa)) = &ep.address.as_ref().unwrap().address else {
                panic!()
            };
            let Some(socket_address::PortSpecifier::PortValue(port)) = sa.port_specifier else {
                panic!()
            };
            (port, e.health_status)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_answers_picks_and_xds_and_a_standby_sends_clients_away() {
    use envoy_types::pb::envoy::config::core::v3::HealthStatus;
    let server = ApiServer::start().await;
    let a = Backend::http("a", Behavior::Status(200)).await;
    let mut b = Backend::http("b", Behavior::Status(200)).await;
    slices_for(&server, &[a.addr, b.addr]);
    let spec = web_spec(1);
    let port = spec["listeners"][0]["port"].as_u64().unwrap();
    server.put("balancedservices", NS, bsvc("web", spec));
    let one = controller(&server, Some(lease("one"))).await;
    wait_status(&server, Duration::from_secs(5), "both healthy", |s| s["ready"] == "2/2").await;
    let two = controller(&server, Some(lease("two"))).await;
    let pick = format!("/v1/namespaces/{NS}/balancedservices/web/pick");

    // The leader assigns; round robin is not the default, least connections
    // with no connections spreads by its rotating tie-break.
    let mut seen = std::collections::HashSet::new();
    for _ in 0..4 {
        let (status, body) = http_get(one.admin, &pick).await.unwrap();
        assert_eq!(status, 200, "{body}");
        seen.insert(serde_json::from_str::<Value>(&body).unwrap()["port"].as_u64().unwrap());
    }
    assert_eq!(seen.len(), 2, "both endpoints handed out: {seen:?}");
    let (status, body) = http_get(two.admin, &pick).await.unwrap();
    assert_eq!(
        (status, body.trim()),
        (503, "this controller is standing by: ask the leader")
    );

    // xDS: the standby turns the stream away, the leader serves EDS.
    let name = format!("web.{NS}:{port}");
    let refused = eds_stream(two.xds, &name).await.expect_err("the standby refuses");
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused}");
    let (_tx, mut stream) = eds_stream(one.xds, &name).await.unwrap();

    // b dies: its health status turns UNHEALTHY in a pushed version, and
    // only a is assigned.
    b.kill();
    let pushed = tokio::time::timeout(Duration::from_secs(3), async {
        loop {
            let r = stream.message().await.unwrap().unwrap();
            let health = eds_health(&r);
            if health.contains(&(u32::from(b.addr.port()), HealthStatus::Unhealthy as i32)) {
                return health;
            }
        }
    })
    .await
    .expect("an EDS push with b UNHEALTHY within fall x interval + 1 s");
    assert!(
        pushed.contains(&(u32::from(a.addr.port()), HealthStatus::Healthy as i32)),
        "{pushed:?}"
    );
    for _ in 0..3 {
        let (_, body) = http_get(one.admin, &pick).await.unwrap();
        assert!(body.contains(&format!("\"port\":{}", a.addr.port())), "{body}");
    }
    b.revive().await.unwrap();
    one.stop.cancel();
    two.stop.cancel();
    stopped(one.task).await;
    stopped(two.task).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_reports_reach_status_and_the_healthy_slice() {
    let server = ApiServer::start().await;
    let a = Backend::http("a", Behavior::Status(200)).await;
    let agent = support::agent::Agent::start(a.addr.ip(), 0, "up 50%").await;
    slices_for(&server, &[a.addr]);
    let mut spec = web_spec(1);
    spec["healthCheck"]["agent"] = json!({"port": agent.addr.port(), "interval": "100ms", "timeout": "50ms"});
    server.put("balancedservices", NS, bsvc("web", spec));
    let c = controller(&server, None).await;
    let annotation = |k: &str| {
        server
            .list_selected("endpointslices", NS, &balanced::controller::slices::selector("web"))
            .first()
            .and_then(|s| s["metadata"]["annotations"][k].as_str().map(str::to_string))
    };
    eventually(Duration::from_secs(5), "weight 50% on the healthy slice", || {
        let w = annotation("balanced.dev/weight-percent");
        let ready = slice_ready(&server, a.addr.port());
        async move { (w.as_deref() == Some("127.0.0.1=50") && ready == Some(true)).then_some(()) }
    })
    .await;
    assert!(
        status(&server, "web").get("endpoints").is_none(),
        "a serving endpoint is not listed"
    );

    // An agent report is not a health transition, yet status and the slice follow it.
    agent.say("drain");
    wait_status(&server, Duration::from_secs(3), "draining", |s| {
        s["endpoints"][0]["draining"] == true && s["endpoints"][0]["state"] == "Healthy"
    })
    .await;
    eventually(
        Duration::from_secs(2),
        "the healthy slice to mark a serving, not ready",
        || {
            let conditions = healthy_endpoints(&server).first().map(|(_, e)| e["conditions"].clone());
            let draining = annotation("balanced.dev/draining");
            async move {
                (conditions? == json!({"ready": false, "serving": true, "terminating": false})
                    && draining.as_deref() == Some("127.0.0.1"))
                .then_some(())
            }
        },
    )
    .await;
    let (status_code, body) = http_get(c.admin, &format!("/v1/namespaces/{NS}/balancedservices/web/pick"))
        .await
        .unwrap();
    assert_eq!(status_code, 503, "a draining endpoint is never assigned: {body}");
    c.shut().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spec_change_alone_reaches_xds_clients() {
    use envoy_types::pb::envoy::config::cluster::v3::{Cluster, cluster::LbPolicy};
    use prost::Message;
    let server = ApiServer::start().await;
    let a = Backend::http("a", Behavior::Status(200)).await;
    slices_for(&server, &[a.addr]);
    let mut spec = web_spec(1);
    let port = spec["listeners"][0]["port"].as_u64().unwrap();
    server.put("balancedservices", NS, bsvc("web", spec.clone()));
    let c = controller(&server, None).await;
    wait_status(&server, Duration::from_secs(5), "healthy", |s| s["ready"] == "1/1").await;
    let name = format!("web.{NS}:{port}");
    let (_tx, mut stream) = eventually(Duration::from_secs(3), "a CDS stream", || async {
        ads_stream(c.xds, balanced::xds::resources::CLUSTER, &name).await.ok()
    })
    .await;

    // Only the algorithm changes: no endpoint, no probe moves.
    spec["algorithm"] = json!("RoundRobin");
    server.put("balancedservices", NS, bsvc("web", spec));
    let policy = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let r = stream.message().await.unwrap().unwrap();
            let cluster = Cluster::decode(r.resources[0].value.as_slice()).unwrap();
            if cluster.lb_policy == LbPolicy::RoundRobin as i32 {
                return cluster.lb_policy;
            }
        }
    })
    .await
    .expect("a CDS push with ROUND_ROBIN after the spec changed");
    assert_eq!(policy, LbPolicy::RoundRobin as i32);
    c.shut().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_follows_the_healthy_slices_not_status_and_keeps_serving_without_a_controller() {
    let server = ApiServer::start().await;
    let a = Backend::http("a", Behavior::Status(200)).await;
    let b = Backend::http("b", Behavior::Status(200)).await;
    slices_for(&server, &[a.addr, b.addr]);
    let mut spec = web_spec(1);
    // No passive ejection and no retry: a request the proxy sends to a dead
    // b fails, so only the slice can keep clients away from it.
    spec["passiveHealth"] = json!({"maxFails": 0});
    spec["retry"] = json!({"tries": 1});
    let listen = SocketAddr::from(([127, 0, 0, 1], spec["listeners"][0]["port"].as_u64().unwrap() as u16));
    server.put("balancedservices", NS, bsvc("web", spec));
    let c = controller(&server, None).await;
    eventually(Duration::from_secs(5), "both endpoints ready in the slices", || {
        let ready = (slice_ready(&server, a.addr.port()), slice_ready(&server, b.addr.port()));
        async move { (ready == (Some(true), Some(true))).then_some(()) }
    })
    .await;
    // From here on the controller cannot write status: what the proxy learns
    // can only come from the slices.
    server.refuse_status_writes();
    let proxy = KubeProxy::start(&server).await;
    let mut seen = std::collections::HashSet::new();
    for _ in 0..8 {
        seen.insert(http_get(listen, "/").await.unwrap().1);
    }
    assert_eq!(seen.len(), 2, "both serve: {seen:?}");

    // b is killed: fall (2) x interval (200 ms) + 1 s later the proxy sends
    // nothing there.
    b.kill();
    let killed = std::time::Instant::now();
    eventually(
        Duration::from_millis(400 + 1000),
        "the slice to mark b not ready",
        || {
            let ready = slice_ready(&server, b.addr.port());
            async move { (ready == Some(false)).then_some(()) }
        },
    )
    .await;
    eventually(
        Duration::from_millis(400 + 1000),
        "the proxy to stop sending to b",
        || async {
            let mut answers = Vec::new();
            for _ in 0..6 {
                answers.push(http_get(listen, "/").await.ok()?);
            }
            answers.iter().all(|r| *r == (200, "a".to_string())).then_some(())
        },
    )
    .await;
    assert!(killed.elapsed() < Duration::from_millis(400 + 1000 + 500));
    assert!(
        server.requests_matching("/balancedservices/web/status") > 0,
        "the controller tried to write status (and was refused)"
    );

    // The controller stops: the slices stay, the proxy keeps serving them.
    c.shut().await;
    for _ in 0..5 {
        assert_eq!(http_get(listen, "/").await.unwrap(), (200, "a".to_string()));
    }
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_simultaneous_failures_make_at_most_26_events() {
    // 500 endpoints on 500 loopback addresses, one listening socket: closing
    // it fails them all in the same probe round.
    let server = ApiServer::start().await;
    let listener = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let addresses: Vec<String> = (0..500)
        .map(|i| format!("127.0.{}.{}", 10 + i / 250, 1 + i % 250))
        .collect();
    for (n, chunk) in addresses.chunks(100).enumerate() {
        let endpoints = chunk
            .iter()
            .map(|a| json!({"addresses": [a], "conditions": {"ready": true}}))
            .collect();
        server.put_service_slice(NS, &format!("web-{n}"), "web", port, endpoints);
    }
    let spec = json!({
        "service": "web",
        "listeners": [{"name": "http", "port": free_port(), "protocol": "TCP", "targetPort": "http"}],
        "healthCheck": {"protocol": "TCP", "interval": "300ms", "timeout": "200ms", "rise": 1, "fall": 1}
    });
    server.put("balancedservices", NS, bsvc("web", spec));
    let c = controller(&server, None).await;
    wait_status(&server, Duration::from_secs(10), "500 endpoints healthy", |s| {
        s["ready"] == "500/500"
    })
    .await;
    let events = |server: &ApiServer| server.requests_matching("/apis/events.k8s.io/v1/namespaces/shop/events");
    // The healthy slices: 5 of 100, none larger.
    eventually(Duration::from_secs(3), "five healthy slices of 100", || {
        let slices = server.list_selected("endpointslices", NS, &balanced::controller::slices::selector("web"));
        let sizes: Vec<usize> = slices
            .iter()
            .map(|s| s["endpoints"].as_array().unwrap().len())
            .collect();
        async move { (sizes == vec![100; 5]).then_some(()) }
    })
    .await;
    // Count from after the start-up's summary event has been recorded.
    let sent_event = |reason: &'static str| {
        let server = server.clone();
        move || {
            let found = server.list("events", NS).iter().any(|e| e["reason"] == reason);
            async move { found.then_some(()) }
        }
    };
    eventually(
        Duration::from_secs(5),
        "the start-up's EndpointHealthy event",
        sent_event("EndpointHealthy"),
    )
    .await;
    let before = events(&server);
    let (writes_before, _) = server.write_counts();

    drop(listener);
    wait_status(&server, Duration::from_secs(5), "all down", |s| s["ready"] == "0/500").await;
    eventually(
        Duration::from_secs(5),
        "an EndpointUnhealthy event",
        sent_event("EndpointUnhealthy"),
    )
    .await;
    let sent = events(&server) - before;
    assert!((1..=26).contains(&sent), "{sent} event requests for 500 transitions");
    // Status and slices: a handful of writes, not 500.
    let writes = server.write_counts().0 - writes_before;
    assert!(
        writes <= 5 * 4 + 4 + sent as u64,
        "{writes} writes for one mass failure"
    );
    let s = status(&server, "web");
    assert_eq!(s["endpoints"].as_array().unwrap().len(), 100);
    assert_eq!(s["endpointsOmitted"], 400);
    let bytes = serde_json::to_vec(&server.get("balancedservices", NS, "web").unwrap())
        .unwrap()
        .len();
    assert!(bytes < 64 * 1024, "{bytes} bytes");
    c.shut().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_test_api_server_refuses_what_kubernetes_refuses() {
    use k8s_openapi::api::discovery::v1::EndpointSlice;
    use kube::api::{Api, Patch, PatchParams};
    let server = ApiServer::start().await;
    let api: Api<EndpointSlice> = Api::namespaced(server.client(), NS);
    let slice = |n: usize| -> EndpointSlice {
        serde_json::from_value(json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "big", "namespace": NS},
            "addressType": "IPv4",
            "endpoints": (0..n).map(|i| json!({"addresses": [format!("10.0.{}.{}", i / 250, i % 250)]})).collect::<Vec<_>>()}))
        .unwrap()
    };
    let params = PatchParams::apply("test").force();
    let err = api
        .patch("big", &params, &Patch::Apply(&slice(1001)))
        .await
        .unwrap_err();
    assert!(matches!(&err, kube::Error::Api(e) if e.code == 422), "{err}");
    let first = api.patch("big", &params, &Patch::Apply(&slice(1000))).await.unwrap();
    let again = api.patch("big", &params, &Patch::Apply(&slice(1000))).await.unwrap();
    assert_eq!(
        first.metadata.resource_version, again.metadata.resource_version,
        "a write that changes nothing has no new resourceVersion"
    );
    assert_eq!(server.write_counts(), (1, 1));
    // An object over 1.5 MiB.
    let huge = json!({"metadata": {"annotations": {"x": "y".repeat(1600 * 1024)}}});
    let err = api
        .patch("big", &PatchParams::default(), &Patch::Merge(&huge))
        .await
        .unwrap_err();
    assert!(matches!(&err, kube::Error::Api(e) if e.code == 413), "{err}");
}

/// The controller's checks speak the endpoints' TLS, with the CA read from
/// the Secret `backendTLS.caSecretName` names (watched by name): a verified
/// endpoint is healthy, one whose certificate does not hold the name asked
/// for fails with the reason in status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checks_over_tls_trust_the_ca_of_a_secret() {
    use support::pki::{Pki, https_backend};
    let server = ApiServer::start().await;
    let pki = Pki::new("controller-ca");
    let (cert, key) = pki.leaf("api", &["api.internal"], "api.internal");
    let backend = https_backend("secure", &cert, &key, None).await;
    let ca = std::fs::read(pki.ca()).unwrap();
    let secret = k8s_openapi::api::core::v1::Secret {
        metadata: kube::api::ObjectMeta {
            name: Some("web-ca-checks".into()),
            namespace: Some(NS.into()),
            ..Default::default()
        },
        data: Some([("ca.crt".to_string(), k8s_openapi::ByteString(ca))].into()),
        ..Default::default()
    };
    let mut secret = serde_json::to_value(secret).unwrap();
    secret["apiVersion"] = "v1".into();
    secret["kind"] = "Secret".into();
    server.put("secrets", NS, secret);
    slices_for(&server, &[backend.addr]);
    let mut spec = web_spec(1);
    spec["healthCheck"]["timeout"] = json!("150ms");
    spec["backendTLS"] = json!({"hostname": "api.internal", "caSecretName": "web-ca-checks"});
    server.put("balancedservices", NS, bsvc("web", spec.clone()));
    let c = controller(&server, None).await;
    wait_status(&server, Duration::from_secs(5), "healthy over TLS", |s| {
        s["ready"] == "1/1"
    })
    .await;
    let s = status(&server, "web");
    assert_eq!(
        condition(&s, "BackendTLSVerified"),
        ("True".into(), "CertificatesVerified".into())
    );
    assert!(backend.handshakes.load(std::sync::atomic::Ordering::Relaxed) >= 1);

    spec["backendTLS"]["hostname"] = json!("other.internal");
    server.put("balancedservices", NS, bsvc("web", spec));
    wait_status(&server, Duration::from_secs(5), "the misnamed endpoint down", |s| {
        s["endpoints"].as_array().is_some_and(|eps| {
            eps.iter().any(|e| {
                e["lastError"]
                    .as_str()
                    .is_some_and(|m| m.contains("not valid for \"other.internal\"; it names api.internal"))
            })
        })
    })
    .await;
    c.shut().await;
}
