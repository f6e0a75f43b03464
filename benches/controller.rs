//! The controller at a cluster's size: one Service of 1,000 / 10,000
//! endpoints (EndpointSlices of 100, TCP checks every 1 s, rise 1, fall 2)
//! against the test API server, which refuses what Kubernetes refuses.
//!
//! The real `balanced controller` runs as a child process pinned to core 0;
//! this process (the API server and one listening socket per endpoint, each
//! on its own loopback address) runs on core 1. Printed per size: time to
//! all Ready, time from one endpoint's failure (its socket closed: connect
//! gets a reset) to its slice and to status, the largest object written,
//! API writes per second at steady state and during a failure of 10% of the
//! endpoints, events sent, the controller's CPU and peak RSS, and the CPU of
//! `balanced standalone` probing the same endpoints.
//!
//! `cargo bench --bench controller [-- SIZES [SECONDS]]`, e.g.
//! `cargo bench --bench controller -- 300,2000,10000 10`.

#[path = "../tests/support/apiserver.rs"]
mod apiserver;
#[path = "common/proc.rs"]
mod proc;

use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::process::Child;
use std::time::{Duration, Instant};

use apiserver::ApiServer;
use serde_json::{Value, json};

const NS: &str = "bench";
const PER_SLICE: usize = 100;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let sizes: Vec<usize> = args
        .first()
        .map(|a| a.split(',').filter_map(|n| n.parse().ok()).collect())
        .unwrap_or_else(|| vec![1_000, 10_000]);
    let seconds: u64 = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(10);
    proc::pin_to_core_1();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    println!(
        "controller benchmark: one Service, slices of {PER_SLICE}, TCP checks every 1 s (rise 1, fall 2), controller pinned to core 0, {seconds} s windows"
    );
    for n in sizes {
        let r = rt.block_on(run(n, seconds));
        println!("\n{n} endpoints");
        println!(
            "  all Ready in status and slices      {:>8.1} s",
            r.all_ready.as_secs_f64()
        );
        println!(
            "  one failure: in its slice / status  {:>8.2} s / {:.2} s  (target: fall x interval + 1 s = 3 s)",
            r.one_slice.as_secs_f64(),
            r.one_status.as_secs_f64()
        );
        println!(
            "  10% fail: all seen in status        {:>8.2} s",
            r.mass_status.as_secs_f64()
        );
        println!(
            "  largest object                      {:>8.1} KiB ({})",
            r.largest as f64 / 1024.0,
            r.largest_name
        );
        println!("  largest slice                       {:>8} endpoints", r.largest_slice);
        println!(
            "  API writes/s: steady / 10% failure  {:>8.2} / {:.2}  (and writes that changed nothing: {} / {})",
            r.steady_writes, r.mass_writes, r.steady_noop, r.mass_noop
        );
        println!("  events for the 10% failure          {:>8}", r.mass_events);
        println!(
            "  CPU of one core: controller / standalone prober  {:.1}% / {:.1}%  ({:.2}x)",
            r.cpu * 100.0,
            r.standalone_cpu * 100.0,
            r.cpu / r.standalone_cpu.max(1e-9)
        );
        println!("  controller peak RSS                 {:>8.1} MiB", r.rss_mib);
    }
}

struct Report {
    all_ready: Duration,
    one_slice: Duration,
    one_status: Duration,
    mass_status: Duration,
    largest: usize,
    largest_name: String,
    largest_slice: usize,
    steady_writes: f64,
    steady_noop: u64,
    mass_writes: f64,
    mass_noop: u64,
    mass_events: usize,
    cpu: f64,
    standalone_cpu: f64,
    rss_mib: f64,
}

fn address(i: usize) -> String {
    format!("127.{}.{}.{}", 20 + i / 62_500, (i / 250) % 250, 1 + i % 250)
}

async fn run(n: usize, seconds: u64) -> Report {
    let port = free_port();
    // One listening socket per endpoint: closing one refuses (resets) its
    // connects, as a killed pod does, and no other endpoint is touched.
    let mut listeners: Vec<Option<TcpListener>> = (0..n)
        .map(|i| Some(TcpListener::bind(format!("{}:{port}", address(i))).expect("bind a loopback address")))
        .collect();

    let standalone_cpu = standalone_cpu(n, port, seconds);

    let server = ApiServer::start().await;
    for (s, chunk) in (0..n).collect::<Vec<_>>().chunks(PER_SLICE).enumerate() {
        let endpoints = chunk
            .iter()
            .map(|i| json!({"addresses": [address(*i)], "conditions": {"ready": true}}))
            .collect();
        server.put_service_slice(NS, &format!("web-{s}"), "web", port, endpoints);
    }
    server.put(
        "balancedservices",
        NS,
        json!({"apiVersion": "balanced.dev/v1alpha1", "kind": "BalancedService",
               "metadata": {"name": "web", "namespace": NS},
               "spec": {"service": "web",
                        "listeners": [{"name": "http", "port": 8080, "protocol": "TCP", "targetPort": "http"}],
                        "healthCheck": {"protocol": "TCP", "interval": "1s", "timeout": "500ms", "rise": 1, "fall": 2}}}),
    );
    let mut child = start_controller(&server);
    let pid = child.id();
    let started = Instant::now();

    let slices_ready = |server: &ApiServer| -> usize {
        healthy_slices(server)
            .iter()
            .flat_map(|s| s["endpoints"].as_array().cloned().unwrap_or_default())
            .filter(|e| e["conditions"]["ready"] == true)
            .count()
    };
    let want = format!("{n}/{n}");
    wait(Duration::from_secs(120), || {
        status(&server)["ready"] == want.as_str() && slices_ready(&server) == n
    })
    .await;
    let all_ready = started.elapsed();

    // Steady state: nothing changes, so nothing should be written.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (w0, noop0) = server.write_counts();
    let (cpu0, t0) = (proc::cpu_seconds(pid), Instant::now());
    let mut peak = proc::memory_kib(pid, "VmHWM");
    while t0.elapsed() < Duration::from_secs(seconds) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        peak = peak.max(proc::memory_kib(pid, "VmHWM"));
    }
    let wall = t0.elapsed().as_secs_f64();
    let cpu = (proc::cpu_seconds(pid) - cpu0) / wall;
    let (w1, noop1) = server.write_counts();

    // One endpoint fails.
    listeners[0] = None;
    let failed = Instant::now();
    let victim = address(0);
    let (mut one_slice, mut one_status) = (None, None);
    wait(Duration::from_secs(30), || {
        if one_status.is_none()
            && status(&server)["endpoints"]
                .as_array()
                .is_some_and(|l| l.iter().any(|e| e["address"] == victim.as_str()))
        {
            one_status = Some(failed.elapsed());
        }
        if one_slice.is_none() && slice_ready_of(&server, &victim) == Some(false) {
            one_slice = Some(failed.elapsed());
        }
        one_status.is_some() && one_slice.is_some()
    })
    .await;

    // 10% fail at once.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let tenth = n / 10;
    let events = |server: &ApiServer| server.requests_matching("/events");
    let (w2, noop2) = server.write_counts();
    let e0 = events(&server);
    for l in listeners.iter_mut().skip(1).take(tenth) {
        *l = None;
    }
    let mass = Instant::now();
    let want = format!("{}/{n}", n - tenth - 1);
    wait(Duration::from_secs(60), || status(&server)["ready"] == want.as_str()).await;
    let mass_status = mass.elapsed();
    let window = Duration::from_secs(5).max(mass_status + Duration::from_secs(1));
    tokio::time::sleep(window.saturating_sub(mass.elapsed())).await;
    let (w3, noop3) = server.write_counts();
    let mass_events = events(&server) - e0;

    let mut largest = (0, String::new());
    let mut largest_slice = 0;
    let mut objects = vec![(
        "BalancedService".to_string(),
        server.get("balancedservices", NS, "web").unwrap(),
    )];
    for s in healthy_slices(&server) {
        largest_slice = largest_slice.max(s["endpoints"].as_array().map_or(0, Vec::len));
        objects.push((
            format!("EndpointSlice {}", s["metadata"]["name"].as_str().unwrap_or("")),
            s,
        ));
    }
    for (name, o) in objects {
        let bytes = serde_json::to_vec(&o).unwrap().len();
        if bytes > largest.0 {
            largest = (bytes, name);
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    server.stop();
    Report {
        all_ready,
        one_slice: one_slice.unwrap_or_default(),
        one_status: one_status.unwrap_or_default(),
        mass_status,
        largest: largest.0,
        largest_name: largest.1,
        largest_slice,
        steady_writes: (w1 - w0) as f64 / wall,
        steady_noop: noop1 - noop0,
        mass_writes: (w3 - w2) as f64 / window.as_secs_f64(),
        mass_noop: noop3 - noop2,
        mass_events,
        cpu,
        standalone_cpu,
        rss_mib: peak as f64 / 1024.0,
    }
}

/// CPU of one core that `balanced standalone` takes to probe the same endpoints.
fn standalone_cpu(n: usize, port: u16, seconds: u64) -> f64 {
    let mut yaml = format!(
        "apiVersion: balanced.dev/v1alpha1\nkind: BalancedService\nmetadata: {{name: web}}\nspec:\n  listeners: [{{name: http, port: {}, protocol: TCP}}]\n  healthCheck: {{protocol: TCP, interval: 1s, timeout: 500ms, rise: 1, fall: 2}}\n  endpoints:\n",
        free_port()
    );
    for i in 0..n {
        yaml.push_str(&format!("    - {{address: {}, port: {port}}}\n", address(i)));
    }
    let path = std::env::temp_dir().join("balanced-controller-bench-standalone.yaml");
    std::fs::File::create(&path)
        .unwrap()
        .write_all(yaml.as_bytes())
        .unwrap();
    let admin = format!("127.0.0.1:{}", free_port());
    let mut child = proc::balanced_on_core_0(
        &[
            "standalone",
            "--bind",
            "127.0.0.1",
            "--admin",
            &admin,
            "-f",
            path.to_str().unwrap(),
        ],
        &[],
    );
    std::thread::sleep(Duration::from_secs(5));
    let (cpu0, t0) = (proc::cpu_seconds(child.id()), Instant::now());
    std::thread::sleep(Duration::from_secs(seconds));
    let cpu = (proc::cpu_seconds(child.id()) - cpu0) / t0.elapsed().as_secs_f64();
    let _ = child.kill();
    let _ = child.wait();
    cpu
}

fn start_controller(server: &ApiServer) -> Child {
    let kubeconfig = std::env::temp_dir().join("balanced-controller-bench.kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters: [{{name: t, cluster: {{server: \"http://{}\"}}}}]\nusers: [{{name: t, user: {{}}}}]\ncontexts: [{{name: t, context: {{cluster: t, user: t, namespace: {NS}}}}}]\ncurrent-context: t\n",
            server.addr
        ),
    )
    .unwrap();
    let admin = format!("127.0.0.1:{}", free_port());
    proc::balanced_on_core_0(
        &["controller", "--leader-elect", "false", "--admin", &admin],
        &[("KUBECONFIG", kubeconfig.to_str().unwrap())],
    )
}

fn status(server: &ApiServer) -> Value {
    server
        .get("balancedservices", NS, "web")
        .map(|o| o["status"].clone())
        .unwrap_or(Value::Null)
}

fn healthy_slices(server: &ApiServer) -> Vec<Value> {
    server.list_selected("endpointslices", NS, &balanced::controller::slices::selector("web"))
}

fn slice_ready_of(server: &ApiServer, ip: &str) -> Option<bool> {
    healthy_slices(server)
        .iter()
        .flat_map(|s| s["endpoints"].as_array().cloned().unwrap_or_default())
        .find(|e| e["addresses"][0] == ip)
        .and_then(|e| e["conditions"]["ready"].as_bool())
}

async fn wait(limit: Duration, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < limit, "not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn free_port() -> u16 {
    let l = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).unwrap();
    l.local_addr().unwrap().port()
}
