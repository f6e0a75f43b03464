//! Prober cost at scale: 10,000 endpoints probed over TCP every second.
//!
//! Runs the real `balanced standalone` binary as a child process against 100
//! loopback listeners (0.0.0.0:PORT, reached as 100 addresses of 127.0.0.0/8
//! each, so 10,000 distinct endpoints) and reads the child's CPU time and
//! resident memory from /proc. Usage: `cargo bench --bench prober [-- SECONDS]`.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const PORTS: usize = 100;
const ADDRS: usize = 100;
const SERVICES: usize = 100;

fn main() {
    let seconds: u64 = std::env::args().skip(1).find_map(|a| a.parse().ok()).unwrap_or(30);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let ports = rt.block_on(start_backends());

    // 100 services x 100 endpoints; endpoint i of service s is 127.0.<s>.<i+1>:<port i%100>.
    let mut yaml = String::new();
    for s in 0..SERVICES {
        yaml.push_str(&format!(
            "---\napiVersion: balanced.dev/v1alpha1\nkind: BalancedService\nmetadata: {{name: svc{s}}}\nspec:\n  listeners: [{{name: http, port: {}}}]\n  healthCheck: {{protocol: TCP, interval: 1s, timeout: 500ms, rise: 2, fall: 3}}\n  endpoints:\n",
            20000 + s
        ));
        for i in 0..ADDRS {
            yaml.push_str(&format!(
                "    - {{address: 127.0.{}.{}, port: {}}}\n",
                s + 1,
                i + 1,
                ports[(s + i) % PORTS]
            ));
        }
    }
    let path = std::env::temp_dir().join("balanced-prober-bench.yaml");
    std::fs::File::create(&path)
        .unwrap()
        .write_all(yaml.as_bytes())
        .unwrap();

    let mut child = Command::new(env!("CARGO_BIN_EXE_balanced"))
        .args(["standalone", "--admin", "127.0.0.1:19901", "-f"])
        .arg(&path)
        .env("BALANCED_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .expect("start balanced");
    let pid = child.id();

    std::thread::sleep(Duration::from_secs(5));
    let healthy_before = rt.block_on(count_healthy());
    let (cpu0, t0) = (cpu_seconds(pid), Instant::now());
    let probes0 = rt.block_on(probe_count());
    let mut peak_rss = 0;
    while t0.elapsed() < Duration::from_secs(seconds) {
        std::thread::sleep(Duration::from_millis(500));
        peak_rss = peak_rss.max(rss_kib(pid));
    }
    let (cpu1, wall) = (cpu_seconds(pid), t0.elapsed().as_secs_f64());
    let probes1 = rt.block_on(probe_count());
    let healthy_after = rt.block_on(count_healthy());
    let _ = child.kill();
    let _ = child.wait();

    let endpoints = SERVICES * ADDRS;
    println!("prober benchmark: {endpoints} endpoints, TCP checks, interval 1s, {seconds}s measured");
    println!("  healthy endpoints      {healthy_before} after warm-up, {healthy_after} at the end");
    println!("  probes per second      {:.0}", (probes1 - probes0) / wall);
    println!(
        "  CPU                    {:.1}% of one core",
        100.0 * (cpu1 - cpu0) / wall
    );
    println!("  resident memory (peak) {:.1} MiB", peak_rss as f64 / 1024.0);
}

async fn start_backends() -> Vec<u16> {
    let mut ports = Vec::new();
    for _ in 0..PORTS {
        let listener = tokio::net::TcpListener::bind("0.0.0.0:0").await.unwrap();
        ports.push(listener.local_addr().unwrap().port());
        tokio::spawn(async move {
            loop {
                if let Ok((s, _)) = listener.accept().await {
                    drop(s);
                }
            }
        });
    }
    ports
}

async fn admin_get(path: &str) -> String {
    match balanced::backend::http_get("127.0.0.1:19901".parse().unwrap(), path).await {
        Ok((_, body)) => body,
        Err(e) => panic!("admin {path}: {e}"),
    }
}

async fn count_healthy() -> usize {
    admin_get("/status").await.matches("\"state\": \"Healthy\"").count()
}

async fn probe_count() -> f64 {
    admin_get("/metrics")
        .await
        .lines()
        .filter(|l| l.starts_with("balanced_probes_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name: utime and stime are 14th and 15th overall.
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    ticks / clock_ticks()
}

fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok()?.trim().parse().ok())
        .unwrap_or(100.0)
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}
