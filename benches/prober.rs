//! Prober cost at scale: 10,000, 25,000 and 50,000 endpoints probed every
//! second, with TCP checks and with HTTP checks.
//!
//! Runs the real `balanced standalone` binary as a child process pinned to
//! core 0 against 100 loopback listeners served from this process on core 1
//! (0.0.0.0:PORT, reached as many addresses of 127.0.0.0/8, so every endpoint
//! is distinct), and reads the child's CPU time and resident memory from /proc
//! and its probe counts and schedule lag from /metrics.
//!
//! `cargo bench --bench prober [-- SECONDS [SIZES] [KINDS]]`, e.g.
//! `cargo bench --bench prober -- 15 10000,50000 TCP`. Defaults: 15 s per run,
//! 10000,25000,50000, TCP,HTTP. `PROBER_INTERVAL=3s` probes less often.

#[path = "common/proc.rs"]
mod proc;

use std::io::Write;
use std::time::{Duration, Instant};

const PORTS: usize = 100;
const PER_SERVICE: usize = 100;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let seconds: u64 = args.first().and_then(|a| a.parse().ok()).unwrap_or(15);
    let sizes: Vec<usize> = args
        .get(1)
        .map(|a| a.split(',').filter_map(|n| n.parse().ok()).collect())
        .unwrap_or_else(|| vec![10_000, 25_000, 50_000]);
    let kinds: Vec<String> = args
        .get(2)
        .map(|a| a.split(',').map(str::to_uppercase).collect())
        .unwrap_or_else(|| vec!["TCP".into(), "HTTP".into()]);
    // The backends (this process) on core 1, the prober on core 0.
    proc::pin_to_core_1();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let ports = rt.block_on(start_backends());

    println!(
        "prober benchmark: checks every 1 s (rise 2, fall 3), prober pinned to core 0, {seconds} s measured per run"
    );
    println!(
        "{:>9} {:>5} {:>9} {:>9} {:>11} {:>12} {:>14}",
        "endpoints", "check", "healthy", "probes/s", "CPU (core)", "RSS peak", "lag p99"
    );
    for &n in &sizes {
        for kind in &kinds {
            let r = run(&rt, &ports, n, kind, seconds);
            println!(
                "{:>9} {:>5} {:>9} {:>9.0} {:>10.1}% {:>8.1} MiB {:>11}",
                n,
                kind,
                r.healthy,
                r.probes_per_second,
                r.cpu * 100.0,
                r.rss_mib,
                r.lag_p99
            );
        }
    }
}

fn interval() -> String {
    std::env::var("PROBER_INTERVAL").unwrap_or_else(|_| "1s".into())
}

struct Run {
    healthy: usize,
    probes_per_second: f64,
    cpu: f64,
    rss_mib: f64,
    lag_p99: String,
}

fn run(rt: &tokio::runtime::Runtime, ports: &[u16], endpoints: usize, kind: &str, seconds: u64) -> Run {
    let interval = interval();
    let check = match kind {
        "HTTP" => {
            format!("{{protocol: HTTP, interval: {interval}, timeout: 500ms, rise: 2, fall: 3, http: {{path: /}}}}")
        }
        _ => format!("{{protocol: TCP, interval: {interval}, timeout: 500ms, rise: 2, fall: 3}}"),
    };
    // Endpoint i of service s: 127.<1 + s / 250>.<s % 250>.<i + 1>.
    let mut yaml = String::new();
    for s in 0..endpoints.div_ceil(PER_SERVICE) {
        yaml.push_str(&format!(
            "---\napiVersion: balanced.dev/v1alpha1\nkind: BalancedService\nmetadata: {{name: svc{s}}}\nspec:\n  listeners: [{{name: http, port: {}}}]\n  healthCheck: {check}\n  endpoints:\n",
            20000 + s
        ));
        for i in 0..PER_SERVICE.min(endpoints - s * PER_SERVICE) {
            yaml.push_str(&format!(
                "    - {{address: 127.{}.{}.{}, port: {}}}\n",
                1 + s / 250,
                s % 250,
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

    let mut child = proc::balanced_on_core_0(
        &[
            "standalone",
            "--bind",
            "127.0.0.1",
            "--admin",
            "127.0.0.1:19901",
            "-f",
            path.to_str().unwrap(),
        ],
        &[],
    );
    let pid = child.id();

    // Start-up and the first rise: probes land over the first interval, two to rise.
    let every = balanced::api::duration::parse_duration(&interval).unwrap_or(Duration::from_secs(1));
    std::thread::sleep(Duration::from_secs(5) + 2 * every);
    let (cpu0, t0) = (proc::cpu_seconds(pid), Instant::now());
    let metrics0 = rt.block_on(admin_get("/metrics"));
    let mut peak_rss = 0;
    while t0.elapsed() < Duration::from_secs(seconds) {
        std::thread::sleep(Duration::from_millis(500));
        peak_rss = peak_rss.max(proc::memory_kib(pid, "VmRSS"));
    }
    let (cpu1, wall) = (proc::cpu_seconds(pid), t0.elapsed().as_secs_f64());
    let metrics1 = rt.block_on(admin_get("/metrics"));
    let healthy = rt.block_on(count_healthy());
    let _ = child.kill();
    let _ = child.wait();

    Run {
        healthy,
        probes_per_second: (probe_count(&metrics1) - probe_count(&metrics0)) / wall,
        cpu: (cpu1 - cpu0) / wall,
        rss_mib: peak_rss as f64 / 1024.0,
        lag_p99: lag_p99(&metrics0, &metrics1),
    }
}

/// The 99th percentile of `balanced_probe_schedule_lag_seconds` between two
/// scrapes, as the upper bound of its bucket.
fn lag_p99(before: &str, after: &str) -> String {
    let buckets = |text: &str| -> Vec<(String, f64)> {
        text.lines()
            .filter(|l| l.starts_with("balanced_probe_schedule_lag_seconds_bucket{"))
            .filter_map(|l| {
                let le = l.split("le=\"").nth(1)?.split('"').next()?.to_string();
                Some((le, l.rsplit(' ').next()?.parse().ok()?))
            })
            .collect()
    };
    let (b0, b1) = (buckets(before), buckets(after));
    let deltas: Vec<(String, f64)> = b1
        .iter()
        .map(|(le, n)| {
            (
                le.clone(),
                n - b0.iter().find(|(l, _)| l == le).map_or(0.0, |(_, m)| *m),
            )
        })
        .collect();
    let Some(total) = deltas.last().map(|(_, n)| *n) else {
        return "-".into();
    };
    deltas
        .iter()
        .find(|(_, n)| *n >= 0.99 * total)
        .map_or("-".into(), |(le, _)| match le.parse::<f64>() {
            Ok(s) => format!("<= {:.1} ms", s * 1000.0),
            Err(_) => format!(
                "> {:.1} ms",
                deltas[deltas.len().saturating_sub(2)].0.parse::<f64>().unwrap_or(0.0) * 1000.0
            ),
        })
}

async fn start_backends() -> Vec<u16> {
    let mut ports = Vec::new();
    for _ in 0..PORTS {
        let listener = tokio::net::TcpListener::bind("0.0.0.0:0").await.unwrap();
        ports.push(listener.local_addr().unwrap().port());
        tokio::spawn(async move {
            loop {
                if let Ok((mut s, _)) = listener.accept().await {
                    // Enough HTTP for a check; a bare TCP check never gets here.
                    tokio::spawn(async move {
                        use tokio::io::{AsyncReadExt, AsyncWriteExt};
                        let mut buf = [0u8; 1024];
                        if s.read(&mut buf).await.unwrap_or(0) > 0 {
                            let _ = s
                                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                                .await;
                        }
                    });
                }
            }
        });
    }
    ports
}

async fn admin_get(path: &str) -> String {
    match balanced::demo::backend::http_get("127.0.0.1:19901".parse().unwrap(), path).await {
        Ok((_, body)) => body,
        // A saturated prober may not answer: the row says so rather than ending the run.
        Err(e) => {
            eprintln!("  admin {path}: {e}");
            String::new()
        }
    }
}

async fn count_healthy() -> usize {
    admin_get("/status").await.matches("\"state\": \"Healthy\"").count()
}

fn probe_count(metrics: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("balanced_probes_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
