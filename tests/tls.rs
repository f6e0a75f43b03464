//! HTTPS listeners against clients we did not write: curl (HTTP/2 and
//! HTTP/1.1 by ALPN) and `openssl s_client`, with certificates from a test
//! CA made by rcgen; SNI, rotation of the files under load, and a broken
//! certificate that leaves the last good one serving.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

mod support;

use balanced::demo::backend::{Backend, Behavior, http_get};
use balanced::standalone::{self, Options};
use balanced::testing::{eventually, free_port};
use serde_json::Value;
use support::pki::{Pki, curl, https_backend, rotate_under_load, s_client};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

struct Running {
    listen: SocketAddr,
    admin: SocketAddr,
    shutdown: CancellationToken,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn start(dir: &Path, backend: SocketAddr, tls: &str, log: Option<&Path>) -> Running {
    start_over(dir, &[backend], tls, log).await
}

async fn start_over(dir: &Path, backends: &[SocketAddr], tls: &str, log: Option<&Path>) -> Running {
    let spec = format!(
        "  listeners: [{{name: https, port: PORT, tls: {tls}}}]\n  healthCheck: {{interval: 200ms, timeout: 100ms, rise: 1}}\n"
    );
    start_spec(dir, backends, &spec, backends.len(), log).await
}

/// The proxy over `backends` with the rest of the spec in `spec` (`PORT`
/// stands for its listener's port), once `healthy` endpoints are.
async fn start_spec(dir: &Path, backends: &[SocketAddr], spec: &str, healthy: usize, log: Option<&Path>) -> Running {
    let port = free_port();
    let endpoints: Vec<String> = backends
        .iter()
        .map(|b| format!("{{address: {}, port: {}}}", b.ip(), b.port()))
        .collect();
    let yaml = format!(
        "apiVersion: balanced.dev/v1alpha1\nkind: BalancedService\nmetadata: {{name: web}}\nspec:\n  endpoints: [{}]\n{}",
        endpoints.join(", "),
        spec.replace("PORT", &port.to_string())
    );
    let file = dir.join("proxy.yaml");
    std::fs::write(&file, yaml).unwrap();
    let admin_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = admin_listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let mut opts = Options::new(&file);
    opts.bind = [127, 0, 0, 1].into();
    opts.serving.grace = Duration::from_secs(1);
    opts.serving.access_log = log.map(|p| balanced::proxy::access::AccessLog::open(p.to_str().unwrap()).unwrap());
    tokio::spawn(standalone::run(opts, admin_listener, shutdown.clone()));
    let want = healthy;
    eventually(Duration::from_secs(3), "the endpoints to turn healthy", || async move {
        let (_, body) = http_get(admin, "/status").await.ok()?;
        (body.matches("\"Healthy\"").count() >= want).then_some(())
    })
    .await;
    Running {
        listen: SocketAddr::from(([127, 0, 0, 1], port)),
        admin,
        shutdown,
    }
}

async fn status(admin: SocketAddr) -> Value {
    let (_, body) = http_get(admin, "/status").await.unwrap();
    serde_json::from_str(&body).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_speaks_h2_and_http1_by_alpn_and_picks_the_certificate_by_sni() {
    let pki = Pki::new("sni");
    let (a_cert, a_key) = pki.leaf("a", &["a.example", "*.a.example"], "a.example");
    let (b_cert, b_key) = pki.leaf("b", &["b.example"], "b.example");
    let backend = Backend::http("backend", Behavior::Status(200)).await;
    let log = pki.dir.join("access.log");
    let tls = format!(
        "{{certificates: [{{certFile: {}, keyFile: {}}}, {{certFile: {}, keyFile: {}}}]}}",
        a_cert.display(),
        a_key.display(),
        b_cert.display(),
        b_key.display()
    );
    let p = start(&pki.dir, backend.addr, &tls, Some(&log)).await;
    let port = p.listen.port();

    // curl verifies the certificate against the name: passing means SNI chose it.
    assert_eq!(curl(&pki.ca(), "a.example", port, "--http2").await, "backend 2 200");
    assert_eq!(curl(&pki.ca(), "a.example", port, "--http1.1").await, "backend 1.1 200");
    assert_eq!(curl(&pki.ca(), "b.example", port, "--http2").await, "backend 2 200");
    assert_eq!(curl(&pki.ca(), "www.a.example", port, "--http2").await, "backend 2 200");
    // A name no certificate holds gets the first one, which curl refuses.
    let other = curl(&pki.ca(), "c.example", port, "--http2").await;
    assert!(
        other.contains("no alternative certificate subject name matches"),
        "{other}"
    );

    let h2 = s_client(port, "b.example", "h2").await;
    assert!(h2.contains("ALPN protocol: h2"), "{h2}");
    assert!(h2.contains("CN = b.example"), "{h2}");
    let h1 = s_client(port, "a.example", "http/1.1").await;
    assert!(h1.contains("ALPN protocol: http/1.1"), "{h1}");
    assert!(h1.contains("CN = a.example"), "{h1}");

    // Plain HTTP on the TLS port is a failed handshake, counted by reason.
    let (addr, admin) = (p.listen, p.admin);
    assert!(http_get(addr, "/").await.is_err());
    let metrics = eventually(Duration::from_secs(2), "the failed handshake counted", || async move {
        let (_, m) = http_get(admin, "/metrics").await.ok()?;
        m.contains(
            "balanced_tls_handshake_failures_total{service=\"default/web\",listener=\"https\",reason=\"not_tls\"} 1",
        )
        .then_some(m)
    })
    .await;
    assert!(
        metrics.contains("balanced_tls_certificate_expiry_seconds{service=\"default/web\",listener=\"https\""),
        "{metrics}"
    );

    let lines = eventually(Duration::from_secs(3), "access-log lines", || async {
        let text = std::fs::read_to_string(&log).ok()?;
        let lines: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        (lines.len() >= 4).then_some(lines)
    })
    .await;
    let b = lines
        .iter()
        .find(|l| l["sni"] == "b.example")
        .expect("a line with sni b.example");
    assert_eq!(b["tls_version"], "TLSv1.3");
    assert_eq!(b["protocol"], "HTTP/2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_certificate_serves_new_connections_and_a_broken_one_is_refused() {
    let pki = Pki::new("rotate");
    let (cert, key) = pki.leaf("site", &["site.example"], "first");
    let backend = Backend::http("backend", Behavior::Status(200)).await;
    let tls = format!(
        "{{certFile: {}, keyFile: {}, minVersion: \"1.2\"}}",
        cert.display(),
        key.display()
    );
    let p = start(&pki.dir, backend.addr, &tls, None).await;
    let port = p.listen.port();
    assert!(s_client(port, "site.example", "h2").await.contains("CN = first"));

    // New connections, 50 a second, across the replacement: none fails.
    rotate_under_load(&pki.ca(), "site.example", port, "second", || {
        pki.leaf("site", &["site.example"], "second");
    })
    .await;

    // A key that is not the certificate's: refused, named in status, and the
    // second certificate keeps serving.
    let (_, other_key) = pki.leaf("other", &["other.example"], "other");
    std::fs::copy(&other_key, &key).unwrap();
    let admin = p.admin;
    let doc = eventually(Duration::from_secs(3), "the load error in status", || async move {
        let doc = status(admin).await;
        doc["services"][0]["tls"]["https"][0]["error"]
            .is_string()
            .then_some(doc)
    })
    .await;
    let error = doc["services"][0]["tls"]["https"][0]["error"].as_str().unwrap();
    assert!(error.contains("site.key does not hold the key of"), "{error}");
    assert!(s_client(port, "site.example", "h2").await.contains("CN = second"));
    assert_eq!(curl(&pki.ca(), "site.example", port, "--http2").await, "backend 2 200");
}

/// Browser → **wss** → balanced → ws → server, the seed's WebSocket set-up,
/// with the `websockets` package at both ends. Needs python3 with
/// websockets; `.ci/run` installs it and runs the ignored tests of this file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs python3 -m pip install websockets; .ci/run runs it"]
async fn a_websocket_client_speaks_through_a_wss_listener() {
    use std::io::{BufRead, BufReader};
    struct Child(std::process::Child);
    impl Drop for Child {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/tls/ws.py");
    let mut server = Child(
        Command::new("python3")
            .args([script, "serve"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("python3 on the PATH"),
    );
    let mut line = String::new();
    BufReader::new(server.0.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let port: u16 = line
        .trim()
        .parse()
        .expect("the echo server's port (is websockets installed?)");

    let pki = Pki::new("wss");
    let (cert, key) = pki.leaf("ws", &["ws.example"], "ws.example");
    let tls = format!("{{certFile: {}, keyFile: {}}}", cert.display(), key.display());
    let p = start(&pki.dir, SocketAddr::from(([127, 0, 0, 1], port)), &tls, None).await;
    let url = format!("wss://ws.example:{}/chat", p.listen.port());
    let ca = pki.ca();
    let out = tokio::task::spawn_blocking(move || {
        Command::new("python3")
            .args([script, "client", &url, ca.to_str().unwrap(), "ws.example"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        text.trim(),
        "one two three TLSv1.3",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// gRPC over TLS (`grpc.secure_channel`, ALPN h2) to plaintext grpcio servers,
/// every call balanced on its own. Needs python3 with grpcio; `.ci/run`
/// installs it and runs the ignored tests of this file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs python3 -m pip install grpcio; .ci/run runs it"]
async fn grpc_over_tls_spreads_calls_over_the_endpoints() {
    use std::io::{BufRead, BufReader, Write};
    struct Child(std::process::Child);
    impl Drop for Child {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut py = Child(
        Command::new("python3")
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/tls/grpc_tls.py"))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("python3 on the PATH"),
    );
    let mut out = BufReader::new(py.0.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let backends: Vec<SocketAddr> = line
        .split_whitespace()
        .map(|p| SocketAddr::from(([127, 0, 0, 1], p.parse::<u16>().expect("ports (is grpcio installed?)"))))
        .collect();
    assert_eq!(backends.len(), 3, "{line}");

    let pki = Pki::new("grpc");
    let (cert, key) = pki.leaf("grpc", &["grpc.example"], "grpc.example");
    let tls = format!("{{certFile: {}, keyFile: {}}}", cert.display(), key.display());
    let p = start_over(&pki.dir, &backends, &tls, None).await;
    let mut stdin = py.0.stdin.take().unwrap();
    writeln!(stdin, "{} {} grpc.example", p.listen.port(), pki.ca().display()).unwrap();
    let result = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        line
    })
    .await
    .unwrap();
    let result: Value = serde_json::from_str(&result).unwrap_or_else(|e| panic!("{e}: {result}"));
    assert_eq!(result["failed"], serde_json::json!([]), "{result}");
    let seen = result["seen"].as_object().unwrap();
    assert_eq!(seen.len(), 3, "every server answered some calls: {result}");
    assert_eq!(seen.values().map(|v| v.as_u64().unwrap()).sum::<u64>(), 30);
}

/// The endpoints' states and errors on `/status`, by port.
async fn endpoint_states(admin: SocketAddr) -> Vec<(u16, String, String)> {
    let doc = status(admin).await;
    doc["services"][0]["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["port"].as_u64().unwrap() as u16,
                e["state"].as_str().unwrap_or_default().to_string(),
                e["lastError"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_over_tls_are_verified_checked_over_https_and_resume_their_sessions() {
    let pki = Pki::new("upstream");
    let (cert, key) = pki.leaf("api", &["api.internal"], "api.internal");
    let backend = https_backend("secure", &cert, &key, None).await;
    let spec = format!(
        "  listeners: [{{name: web, port: PORT}}]\n  healthCheck: {{protocol: HTTP, interval: 300ms, timeout: 250ms, rise: 1, http: {{path: /healthz}}}}\n  backendTLS: {{hostname: api.internal, caFile: {}}}\n",
        pki.ca().display()
    );
    let p = start_spec(&pki.dir, &[backend.addr], &spec, 1, None).await;
    // The check passed over HTTPS: a handshake, then an HTTP answer.
    assert!(backend.handshakes.load(std::sync::atomic::Ordering::Relaxed) >= 1);

    for _ in 0..5 {
        let (code, body) = http_get(p.listen, "/").await.unwrap();
        assert_eq!((code, body.as_str()), (200, "secure client-cert=false HTTP/1.1"));
    }
    // Every answer closed its connection: later handshakes resume the first's session.
    let resumed = backend.resumed.load(std::sync::atomic::Ordering::Relaxed);
    assert!(resumed >= 4, "resumed {resumed} handshakes");

    let doc = status(p.admin).await;
    let tls = &doc["services"][0]["backendTLS"][0];
    assert_eq!(tls["group"], "default");
    assert_eq!(tls["hostname"], "api.internal");
    assert!(tls.get("warning").is_none() && tls.get("error").is_none(), "{tls}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_over_h2_gets_h2_by_alpn() {
    let pki = Pki::new("upstream-h2");
    let (cert, key) = pki.leaf("api", &["api.internal"], "api.internal");
    let backend = https_backend("secure", &cert, &key, None).await;
    let spec = format!(
        "  listeners: [{{name: web, port: PORT, appProtocol: kubernetes.io/h2c}}]\n  healthCheck: {{interval: 300ms, timeout: 250ms, rise: 1}}\n  backendTLS: {{hostname: api.internal, caFile: {}}}\n",
        pki.ca().display()
    );
    let p = start_spec(&pki.dir, &[backend.addr], &spec, 1, None).await;
    let (code, body) = http_get(p.listen, "/").await.unwrap();
    assert_eq!((code, body.as_str()), (200, "secure client-cert=false HTTP/2.0"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_or_misnamed_endpoint_certificate_fails_the_check_and_the_request_with_its_reason() {
    let pki = Pki::new("upstream-bad");
    let (expired, expired_key) = pki.leaf_until("old", &["api.internal"], "api.internal", 2001);
    let (other, other_key) = pki.leaf("other", &["other.internal"], "other.internal");
    let old = https_backend("old", &expired, &expired_key, None).await;
    let misnamed = https_backend("misnamed", &other, &other_key, None).await;
    let tls = format!("{{hostname: api.internal, caFile: {}}}", pki.ca().display());

    // The HTTP check speaks the same TLS: both endpoints fail it, each with why.
    let spec = format!(
        "  listeners: [{{name: web, port: PORT}}]\n  healthCheck: {{protocol: HTTP, interval: 300ms, timeout: 250ms, fall: 1}}\n  backendTLS: {tls}\n"
    );
    let p = start_spec(&pki.dir, &[old.addr, misnamed.addr], &spec, 0, None).await;
    let admin = p.admin;
    let states = eventually(
        Duration::from_secs(3),
        "both endpoints to fail their checks",
        || async move {
            let states = endpoint_states(admin).await;
            states
                .iter()
                .all(|(_, state, error)| state == "Unhealthy" && !error.is_empty())
                .then_some(states)
        },
    )
    .await;
    let error_of = |port| states.iter().find(|s| s.0 == port).unwrap().2.clone();
    let e = error_of(old.addr.port());
    assert!(
        e.contains("tls: the endpoint's certificate expired at 2001-01-01"),
        "{e}"
    );
    let e = error_of(misnamed.addr.port());
    assert!(
        e.contains("tls: the endpoint's certificate is not valid for \"api.internal\"; it names other.internal"),
        "{e}"
    );
    drop(p);

    // A bare TCP check passes them, and the request fails with the reason.
    let spec = format!(
        "  listeners: [{{name: web, port: PORT}}]\n  healthCheck: {{protocol: TCP, interval: 300ms, timeout: 250ms, rise: 1}}\n  backendTLS: {tls}\n  retry: {{tries: 1}}\n  passiveHealth: {{maxFails: 0}}\n  debug: {{errorDetail: true}}\n"
    );
    let p = start_spec(&pki.dir, &[old.addr], &spec, 1, None).await;
    let (code, body) = http_get(p.listen, "/").await.unwrap();
    assert_eq!(code, 502, "{body}");
    assert!(
        body.contains("tls: the endpoint's certificate expired at 2001-01-01"),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_to_an_endpoint_that_requires_a_client_certificate() {
    let pki = Pki::new("upstream-mtls");
    let (cert, key) = pki.leaf("api", &["api.internal"], "api.internal");
    let (client, client_key) = pki.leaf("client", &["proxy.balanced"], "proxy.balanced");
    let backend = https_backend("mtls", &cert, &key, Some(&pki.ca())).await;

    // Without a client certificate the endpoint refuses, and the check says so.
    let spec = format!(
        "  listeners: [{{name: web, port: PORT}}]\n  healthCheck: {{protocol: HTTP, interval: 300ms, timeout: 250ms, fall: 1}}\n  backendTLS: {{hostname: api.internal, caFile: {}}}\n",
        pki.ca().display()
    );
    let p = start_spec(&pki.dir, &[backend.addr], &spec, 0, None).await;
    let admin = p.admin;
    let error = eventually(Duration::from_secs(3), "the check to fail", || async move {
        let states = endpoint_states(admin).await;
        let (_, state, error) = states.first()?.clone();
        (state == "Unhealthy" && !error.is_empty()).then_some(error)
    })
    .await;
    assert!(
        error.contains("tls: the endpoint requires a client certificate (backendTLS.clientCertificate)"),
        "{error}"
    );
    drop(p);

    let spec = format!(
        "  listeners: [{{name: web, port: PORT}}]\n  healthCheck: {{protocol: HTTP, interval: 300ms, timeout: 250ms, rise: 1}}\n  backendTLS: {{hostname: api.internal, caFile: {}, clientCertificate: {{certFile: {}, keyFile: {}}}}}\n",
        pki.ca().display(),
        client.display(),
        client_key.display()
    );
    let p = start_spec(&pki.dir, &[backend.addr], &spec, 1, None).await;
    let (code, body) = http_get(p.listen, "/").await.unwrap();
    assert_eq!((code, body.as_str()), (200, "mtls client-cert=true HTTP/1.1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insecure_skip_verify_connects_to_anything_and_status_warns() {
    let pki = Pki::new("upstream-insecure");
    let (cert, key) = pki.leaf_until("old", &["whatever.internal"], "whatever", 2001);
    let backend = https_backend("anything", &cert, &key, None).await;
    let spec = "  listeners: [{name: web, port: PORT}]\n  healthCheck: {interval: 300ms, timeout: 250ms, rise: 1}\n  backendTLS: {insecureSkipVerify: true}\n";
    let p = start_spec(&pki.dir, &[backend.addr], spec, 1, None).await;
    let (code, _) = http_get(p.listen, "/").await.unwrap();
    assert_eq!(code, 200);
    let doc = status(p.admin).await;
    let warning = doc["services"][0]["backendTLS"][0]["warning"].as_str().unwrap();
    assert!(
        warning.starts_with("insecureSkipVerify: the endpoints' certificates are not verified"),
        "{warning}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_listener_ends_tls_and_relays_the_bytes() {
    let pki = Pki::new("tcp-terminate");
    let (cert, key) = pki.leaf("site", &["site.example"], "site.example");
    let backend = Backend::http("backend", Behavior::Status(200)).await;
    let spec = format!(
        "  listeners: [{{name: tls, port: PORT, protocol: TCP, tls: {{certFile: {}, keyFile: {}}}}}]\n  healthCheck: {{interval: 300ms, timeout: 250ms, rise: 1}}\n",
        cert.display(),
        key.display()
    );
    let log = pki.dir.join("access.log");
    let p = start_spec(&pki.dir, &[backend.addr], &spec, 1, Some(&log)).await;
    // curl speaks HTTP inside the TLS the proxy ends; the endpoint sees plain bytes.
    assert_eq!(
        curl(&pki.ca(), "site.example", p.listen.port(), "--http1.1").await,
        "backend 1.1 200"
    );
    let line = eventually(Duration::from_secs(3), "the access-log line", || async {
        let text = std::fs::read_to_string(&log).ok()?;
        text.lines().next().map(|l| serde_json::from_str::<Value>(l).unwrap())
    })
    .await;
    assert_eq!(line["sni"], "site.example", "{line}");
    assert_eq!(line["tls_version"], "TLSv1.3", "{line}");
}

/// TLS passed through untouched (the endpoint's own certificate reaches the
/// client, which verifies it), each connection routed by the name its
/// ClientHello asks for, as HAProxy's `req.ssl_sni` and nginx's `ssl_preread`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passthrough_routes_connections_by_sni_without_ending_their_tls() {
    let pki = Pki::new("passthrough");
    let (a_cert, a_key) = pki.leaf("a", &["a.example"], "a.example");
    let (b_cert, b_key) = pki.leaf("b", &["b.example", "other.example"], "b.example");
    let a = https_backend("a", &a_cert, &a_key, None).await;
    let b = https_backend("b", &b_cert, &b_key, None).await;
    let spec = format!(
        "  listeners: [{{name: tls, port: PORT, protocol: TCP, tls: {{mode: Passthrough, sniRoutes: [{{hostnames: [a.example], backend: a}}]}}}}]\n  backends: [{{name: a, endpoints: [{{address: 127.0.0.1, port: {}}}]}}]\n  healthCheck: {{interval: 300ms, timeout: 250ms, rise: 1}}\n",
        a.addr.port()
    );
    // `default` is b; group a is a.
    let p = start_spec(&pki.dir, &[b.addr], &spec, 2, None).await;
    let port = p.listen.port();
    let body = |out: String| out.split(" client-cert").next().unwrap_or_default().to_string();
    for _ in 0..3 {
        assert_eq!(body(curl(&pki.ca(), "a.example", port, "--http2").await), "a");
        assert_eq!(body(curl(&pki.ca(), "b.example", port, "--http2").await), "b");
        // A name no route names goes to default.
        assert_eq!(body(curl(&pki.ca(), "other.example", port, "--http1.1").await), "b");
    }
    // The handshakes were the endpoints' own.
    assert!(a.handshakes.load(std::sync::atomic::Ordering::Relaxed) >= 3);
    // Plain bytes on a passthrough listener are closed, not relayed.
    assert!(http_get(p.listen, "/").await.is_err());
}
