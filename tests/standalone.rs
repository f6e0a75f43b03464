//! `balanced standalone` end to end: a file, real backends, the admin server.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use balanced::demo::backend::{Backend, Behavior, http_get};
use balanced::standalone::{self, Options};
use balanced::testing::{eventually, refusing_addr};
use serde_json::Value;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

const FAST: &str = "    interval: 200ms\n    timeout: 100ms\n    rise: 2\n    fall: 2\n    downInterval: 200ms";

struct Running {
    admin: SocketAddr,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), standalone::Error>>,
}

async fn start(file: &Path) -> Running {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let mut opts = Options::new(file);
    opts.poll = Duration::from_millis(50);
    opts.bind = [127, 0, 0, 1].into();
    let task = tokio::spawn(standalone::run(opts, listener, shutdown.clone()));
    Running { admin, shutdown, task }
}

async fn status(admin: SocketAddr) -> Value {
    let (code, body) = http_get(admin, "/status").await.unwrap();
    assert_eq!(code, 200);
    serde_json::from_str(&body).unwrap()
}

async fn state_of(admin: SocketAddr, port: u16) -> Option<String> {
    let s = status(admin).await;
    s["services"][0]["endpoints"]
        .as_array()?
        .iter()
        .find(|e| e["port"] == port)
        .map(|e| e["state"].as_str().unwrap().to_string())
}

async fn wait_state(admin: SocketAddr, port: u16, want: &str, within: Duration) {
    eventually(within, &format!("{port} to be {want}"), || async move {
        (state_of(admin, port).await.as_deref() == Some(want)).then_some(())
    })
    .await;
}

fn temp_file(name: &str, text: &str) -> tempdir::File {
    tempdir::File::new(name, text)
}

mod tempdir {
    //! A file under the target dir's tmp, removed on drop.
    pub struct File(pub std::path::PathBuf);
    impl File {
        pub fn new(name: &str, text: &str) -> Self {
            let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
            let path = dir.join(format!("{name}-{}.yaml", std::process::id()));
            std::fs::write(&path, text).unwrap();
            File(path)
        }
        pub fn write(&self, text: &str) {
            // Write then rename, as editors and ConfigMap updates do.
            let tmp = self.0.with_extension("tmp");
            std::fs::write(&tmp, text).unwrap();
            std::fs::rename(&tmp, &self.0).unwrap();
        }
    }
    impl Drop for File {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

#[tokio::test]
async fn status_follows_a_killed_and_revived_backend_within_a_second() {
    let mut a = Backend::http("a", Behavior::Status(200)).await;
    let b = Backend::http("b", Behavior::Status(200)).await;
    let file = temp_file("killrevive", &support::standalone_yaml("web", &[a.addr, b.addr], FAST));
    let run = start(&file.0).await;

    wait_state(run.admin, a.addr.port(), "Healthy", Duration::from_secs(2)).await;
    let s = status(run.admin).await;
    let svc = &s["services"][0];
    assert_eq!(
        (svc["namespace"].as_str(), svc["name"].as_str()),
        (Some("default"), Some("web"))
    );
    let ep = &svc["endpoints"][0];
    for field in [
        "address",
        "port",
        "state",
        "lastError",
        "consecutiveSuccesses",
        "consecutiveFailures",
        "lastTransitionTime",
    ] {
        assert!(ep.get(field).is_some(), "/status endpoint lacks {field}: {ep}");
    }

    a.kill();
    wait_state(run.admin, a.addr.port(), "Unhealthy", Duration::from_secs(1)).await;
    assert_eq!(state_of(run.admin, b.addr.port()).await.as_deref(), Some("Healthy"));
    a.revive().await.unwrap();
    wait_state(run.admin, a.addr.port(), "Healthy", Duration::from_secs(1)).await;

    let (code, metrics) = http_get(run.admin, "/metrics").await.unwrap();
    assert_eq!(code, 200);
    for name in [
        "balanced_probes_total{",
        "balanced_probe_duration_seconds_bucket{",
        "balanced_endpoint_healthy{",
    ] {
        assert!(metrics.contains(name), "missing {name} in /metrics");
    }
    assert!(metrics.contains("result=\"failure\""));
    assert_eq!(http_get(run.admin, "/healthz").await.unwrap().0, 200);
    assert_eq!(http_get(run.admin, "/readyz").await.unwrap().0, 200);

    run.shutdown.cancel();
    run.task.await.unwrap().unwrap();
}

#[tokio::test]
async fn reload_applies_a_good_file_and_keeps_the_last_good_one_on_a_bad_file() {
    let a = Backend::http("a", Behavior::Status(200)).await;
    let b = Backend::http("b", Behavior::Status(200)).await;
    let file = temp_file("reload", &support::standalone_yaml("web", &[a.addr], FAST));
    let run = start(&file.0).await;
    wait_state(run.admin, a.addr.port(), "Healthy", Duration::from_secs(2)).await;

    // Adding b keeps a's state: a never goes back to Unknown.
    file.write(&support::standalone_yaml("web", &[a.addr, b.addr], FAST));
    eventually(Duration::from_secs(2), "b to appear", || async {
        state_of(run.admin, b.addr.port()).await.map(|_| ())
    })
    .await;
    assert_eq!(state_of(run.admin, a.addr.port()).await.as_deref(), Some("Healthy"));
    wait_state(run.admin, b.addr.port(), "Healthy", Duration::from_secs(2)).await;

    // A bad file changes nothing.
    file.write(&support::standalone_yaml(
        "web",
        &[a.addr],
        &FAST.replace("rise: 2", "rise: 0"),
    ));
    let rejected = eventually(Duration::from_secs(3), "the bad file to be rejected", || async {
        let (_, body) = http_get(run.admin, "/status").await.ok()?;
        let status: serde_json::Value = serde_json::from_str(&body).ok()?;
        status["lastRejected"].as_str().map(str::to_string)
    })
    .await;
    assert!(
        rejected.contains("spec.healthCheck.rise: must be >= 1, got 0"),
        "{rejected}"
    );
    assert_eq!(state_of(run.admin, b.addr.port()).await.as_deref(), Some("Healthy"));
    assert!(!run.task.is_finished());

    // Removing b stops showing it.
    file.write(&support::standalone_yaml("web", &[a.addr], FAST));
    eventually(Duration::from_secs(2), "b to disappear", || async {
        state_of(run.admin, b.addr.port()).await.is_none().then_some(())
    })
    .await;
    run.shutdown.cancel();
    run.task.await.unwrap().unwrap();
}

#[test]
fn a_bad_file_at_start_exits_2_with_every_error() {
    let text = support::standalone_yaml(
        "web",
        &["127.0.0.1:0".parse().unwrap()],
        &FAST.replace("rise: 2", "rise: 0"),
    );
    let file = temp_file("bad", &text);
    let out = Command::new(env!("CARGO_BIN_EXE_balanced"))
        .args(["standalone", "-f"])
        .arg(&file.0)
        .args(["--admin", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("document 1 (default/web): spec.endpoints[0].port: must be 1..=65535, got 0"),
        "{stderr}"
    );
    assert!(
        stderr.contains("document 1 (default/web): spec.healthCheck.rise: must be >= 1, got 0"),
        "{stderr}"
    );
}

#[tokio::test]
async fn once_prints_a_table_and_exits_by_whether_every_service_is_served() {
    let up = Backend::http("up", Behavior::Status(200)).await;
    let down = refusing_addr().await;
    let good = temp_file("once-good", &support::standalone_yaml("web", &[up.addr, down], FAST));
    let bad = temp_file("once-bad", &support::standalone_yaml("web", &[down], FAST));
    let exe = env!("CARGO_BIN_EXE_balanced");

    let run = |path: std::path::PathBuf| {
        tokio::task::spawn_blocking(move || {
            Command::new(exe)
                .args(["standalone", "--once", "-f"])
                .arg(path)
                .output()
                .unwrap()
        })
    };
    let out = run(good.0.clone()).await.unwrap();
    let table = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(out.status.code(), Some(0), "{table}");
    assert!(table.starts_with("SERVICE"), "{table}");
    assert!(table.contains(&format!("{}  TCP    healthy", up.addr)), "{table}");
    assert!(table.contains("connect: connection refused"), "{table}");

    let out = run(bad.0.clone()).await.unwrap();
    assert_eq!(out.status.code(), Some(1));
}

/// GET `path` from the admin server as a browser asks; the head and the body.
async fn get_as_browser(admin: SocketAddr, path: &str) -> (String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(admin).await.unwrap();
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: x\r\nAccept: text/html,application/xhtml+xml,*/*;q=0.8\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    s.read_to_end(&mut answer).await.unwrap();
    let text = String::from_utf8_lossy(&answer).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    (head.to_lowercase(), body.to_string())
}

/// Splits one CSV record (RFC 4180 quoting).
fn csv_record(line: &str) -> Vec<String> {
    let (mut fields, mut cur, mut quoted, mut chars) = (Vec::new(), String::new(), false, line.chars().peekable());
    while let Some(c) = chars.next() {
        match (c, quoted) {
            ('"', true) if chars.peek() == Some(&'"') => {
                cur.push('"');
                chars.next();
            }
            ('"', _) => quoted = !quoted,
            (',', false) => fields.push(std::mem::take(&mut cur)),
            (c, _) => cur.push(c),
        }
    }
    fields.push(cur);
    fields
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_is_a_page_for_a_browser_and_csv_on_request() {
    let a = Backend::http("a", Behavior::Status(200)).await;
    let dead = refusing_addr().await;
    let file = temp_file("page", &support::standalone_yaml("web", &[a.addr, dead], FAST));
    let run = start(&file.0).await;
    wait_state(run.admin, a.addr.port(), "Healthy", Duration::from_secs(2)).await;
    wait_state(run.admin, dead.port(), "Unhealthy", Duration::from_secs(2)).await;

    let (head, page) = get_as_browser(run.admin, "/status").await;
    assert!(head.contains("content-type: text/html"), "{head}");
    assert!(page.starts_with("<!doctype html>"), "{page}");
    assert!(
        page.contains("<h2>default/web</h2>") && page.contains("1/2 serving"),
        "{page}"
    );
    assert_eq!(page.matches("<tr class=\"down\">").count(), 1, "{page}");
    assert!(page.contains(&format!("<td>{dead}</td>")), "{page}");

    let (code, text) = http_get(run.admin, "/status?format=csv").await.unwrap();
    assert_eq!(code, 200);
    let records: Vec<Vec<String>> = text.lines().filter(|l| !l.is_empty()).map(csv_record).collect();
    assert_eq!(records.len(), 3, "a header and one row per endpoint: {text}");
    assert!(records.iter().all(|r| r.len() == 10), "{records:?}");
    let down = records
        .iter()
        .find(|r| r[1] == dead.to_string())
        .expect("the dead endpoint's row");
    assert_eq!(down[2], "Unhealthy");
    assert!(!down[3].is_empty(), "its last error: {down:?}");

    let (code, json) = http_get(run.admin, "/status").await.unwrap();
    assert_eq!(code, 200);
    serde_json::from_str::<Value>(&json).expect("JSON stays the default");

    run.shutdown.cancel();
    run.task.await.unwrap().unwrap();
}

/// `spec.slowStart` reaches the proxy: an endpoint that comes back ramps up
/// (shown in `/status` and on the page) and is at full weight after the window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_that_comes_back_ramps_up_over_the_slow_start_window() {
    let a = Backend::http("a", Behavior::Status(200)).await;
    let mut b = Backend::http("b", Behavior::Status(200)).await;
    b.kill();
    let yaml =
        support::standalone_yaml("web", &[a.addr, b.addr], FAST) + "  slowStart: {window: 4s, minWeightPercent: 5}\n";
    let file = temp_file("slow", &yaml);
    let run = start(&file.0).await;
    wait_state(run.admin, b.addr.port(), "Unhealthy", Duration::from_secs(2)).await;

    b.revive().await.unwrap();
    wait_state(run.admin, b.addr.port(), "Healthy", Duration::from_secs(2)).await;
    let ramp_of = |doc: Value| {
        doc["services"][0]["endpoints"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["port"] == b.addr.port())
            .map(|e| e["slowStartPercent"].as_u64())
            .unwrap()
    };
    let ramp = ramp_of(status(run.admin).await).expect("ramping just after it turned healthy");
    assert!((5..100).contains(&ramp), "{ramp}");
    let (_, page) = get_as_browser(run.admin, "/status").await;
    assert!(page.contains("(slow start: "), "{page}");

    eventually(Duration::from_secs(6), "the ramp to end", || async {
        ramp_of(status(run.admin).await).is_none().then_some(())
    })
    .await;
    let first = status(run.admin).await;
    assert!(
        first["services"][0]["endpoints"][0].get("slowStartPercent").is_none(),
        "{first}"
    );
    run.shutdown.cancel();
    run.task.await.unwrap().unwrap();
}
