//! HTTPS listeners against clients we did not write: curl (HTTP/2 and
//! HTTP/1.1 by ALPN) and `openssl s_client`, with certificates from a test
//! CA made by rcgen; SNI, rotation of the files under load, and a broken
//! certificate that leaves the last good one serving.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use balanced::demo::backend::{Backend, Behavior, http_get};
use balanced::standalone::{self, Options};
use balanced::testing::{eventually, free_port};
use serde_json::Value;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// A CA and what it signs, written as PEM files under `dir`.
struct Pki {
    dir: PathBuf,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl Pki {
    fn new(name: &str) -> Self {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("tls-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "balanced test CA");
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let ca = params.self_signed(&ca_key).unwrap();
        std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
        let issuer = rcgen::Issuer::new(params, ca_key);
        Self { dir, issuer }
    }

    /// A leaf for `names`, signed by the CA, written as `file.pem` and `file.key`.
    fn leaf(&self, file: &str, names: &[&str], common_name: &str) -> (PathBuf, PathBuf) {
        let mut params =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
        params.distinguished_name.push(rcgen::DnType::CommonName, common_name);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let (c, k) = (
            self.dir.join(format!("{file}.pem")),
            self.dir.join(format!("{file}.key")),
        );
        // Written beside and renamed over, as a Secret volume or cert-manager does.
        std::fs::write(self.dir.join("tmp.pem"), cert.pem()).unwrap();
        std::fs::write(self.dir.join("tmp.key"), key.serialize_pem()).unwrap();
        std::fs::rename(self.dir.join("tmp.key"), &k).unwrap();
        std::fs::rename(self.dir.join("tmp.pem"), &c).unwrap();
        (c, k)
    }

    fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

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
    let port = free_port();
    let endpoints: Vec<String> = backends
        .iter()
        .map(|b| format!("{{address: {}, port: {}}}", b.ip(), b.port()))
        .collect();
    let yaml = format!(
        "apiVersion: balanced.dev/v1alpha1\nkind: BalancedService\nmetadata: {{name: web}}\nspec:\n  endpoints: [{}]\n  listeners: [{{name: https, port: {port}, tls: {tls}}}]\n  healthCheck: {{interval: 200ms, timeout: 100ms, rise: 1}}\n",
        endpoints.join(", ")
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
    let want = backends.len();
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

/// curl's `http_version status body` for `https://NAME:PORT/`, verified against the test CA.
async fn curl(ca: &Path, name: &str, port: u16, version: &str) -> String {
    let (ca, name, version) = (ca.to_path_buf(), name.to_string(), version.to_string());
    tokio::task::spawn_blocking(move || {
        let out = Command::new("curl")
            .args(["-sS", "--max-time", "5", &version, "--cacert"])
            .arg(&ca)
            .args([
                "--resolve",
                &format!("{name}:{port}:127.0.0.1"),
                "-w",
                " %{http_version} %{http_code}",
                &format!("https://{name}:{port}/"),
            ])
            .output()
            .expect("curl on the PATH");
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
    .await
    .unwrap()
}

/// What `openssl s_client` says of a handshake with `servername` and `alpn`.
async fn s_client(port: u16, servername: &str, alpn: &str) -> String {
    let (servername, alpn) = (servername.to_string(), alpn.to_string());
    tokio::task::spawn_blocking(move || {
        let out = Command::new("openssl")
            .args([
                "s_client",
                "-connect",
                &format!("127.0.0.1:{port}"),
                "-servername",
                &servername,
                "-alpn",
                &alpn,
            ])
            .stdin(std::process::Stdio::null())
            .output()
            .expect("openssl on the PATH");
        String::from_utf8_lossy(&out.stdout).into_owned()
    })
    .await
    .unwrap()
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
    let ca = pki.ca();
    let load = tokio::spawn(async move {
        let mut failures = Vec::new();
        for _ in 0..100 {
            let got = curl(&ca, "site.example", port, "--http1.1").await;
            if got != "backend 1.1 200" {
                failures.push(got);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        failures
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let replaced = std::time::Instant::now();
    pki.leaf("site", &["site.example"], "second");
    eventually(
        Duration::from_secs(3),
        "new connections to get the new certificate",
        || async {
            s_client(port, "site.example", "h2")
                .await
                .contains("CN = second")
                .then_some(())
        },
    )
    .await;
    let took = replaced.elapsed();
    assert!(took < Duration::from_secs(3), "{took:?}");
    assert_eq!(
        load.await.unwrap(),
        Vec::<String>::new(),
        "requests failed across the rotation"
    );

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
