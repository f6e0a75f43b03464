//! `balanced demo`: a newcomer's first run. Three local backends (one slow),
//! the real standalone proxy in front of them, steady client traffic, one
//! backend killed and revived, and what the clients saw.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub mod backend;

use crate::standalone::{self, Options};
use backend::{Backend, Behavior, http_get};

/// When things happen, from the start of traffic.
#[derive(Clone, Copy, Debug)]
pub struct Timeline {
    /// When backend b is killed.
    pub kill_at: Duration,
    /// When it comes back.
    pub revive_at: Duration,
    /// When traffic stops.
    pub end_at: Duration,
}

impl Default for Timeline {
    /// Slow enough to read as it prints.
    fn default() -> Self {
        Self {
            kill_at: Duration::from_secs(6),
            revive_at: Duration::from_secs(14),
            end_at: Duration::from_secs(22),
        }
    }
}

impl Timeline {
    /// The same story in a quarter of the time (the test suite runs this
    /// one): still four probe intervals between each step.
    pub fn quick() -> Self {
        Self {
            kill_at: Duration::from_millis(1500),
            revive_at: Duration::from_millis(3500),
            end_at: Duration::from_millis(5500),
        }
    }
}

/// Why the demo could not run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A socket or the config file could not be set up.
    #[error("demo set-up failed: {0}")]
    Setup(#[from] std::io::Error),
    /// The backends never passed their probes.
    #[error("backends did not turn healthy within 10 s (see the log file {})", .log.display())]
    NeverHealthy {
        /// Where the proxy's log lines went.
        log: std::path::PathBuf,
    },
}

/// Where `balanced demo` writes its log lines, so they do not interrupt the
/// timeline it prints.
pub fn log_path() -> std::path::PathBuf {
    std::env::temp_dir().join(format!("balanced-demo-{}.log", std::process::id()))
}

const WORKERS: usize = 8;
const PAUSE: Duration = Duration::from_millis(20);

/// What the demo measured.
#[derive(Debug, Default)]
pub struct Summary {
    /// Requests answered, per backend name.
    pub per_backend: HashMap<String, u64>,
    /// Answers that were not 2xx, or no answer at all.
    pub errors: u64,
    /// From the kill to the first sign the proxy noticed (ejection or probe).
    pub detect: Option<Duration>,
    /// From the revival to the probes calling it healthy again.
    pub recover: Option<Duration>,
}

#[derive(Default)]
struct Tally {
    per_backend: HashMap<String, u64>,
    errors: u64,
}

/// Runs the demo, printing a timeline to stdout; returns the summary.
pub async fn run() -> Result<Summary, Error> {
    run_with(Timeline::default()).await
}

/// Runs the demo on `timeline`.
pub async fn run_with(timeline: Timeline) -> Result<Summary, Error> {
    let a = Backend::http("a", Behavior::Slow(Duration::from_millis(1))).await;
    let mut b = Backend::http("b", Behavior::Slow(Duration::from_millis(1))).await;
    let c = Backend::http("c-slow", Behavior::Slow(Duration::from_millis(40))).await;
    let names: HashMap<u16, &str> = [(a.addr.port(), "a"), (b.addr.port(), "b"), (c.addr.port(), "c-slow")].into();

    let port = free_port()?;
    let yaml = format!(
        "apiVersion: balanced.dev/v1alpha1
kind: BalancedService
metadata: {{name: demo}}
spec:
  endpoints:
    - {{address: 127.0.0.1, port: {}}}
    - {{address: 127.0.0.1, port: {}}}
    - {{address: 127.0.0.1, port: {}}}
  listeners: [{{name: http, port: {port}, protocol: HTTP}}]
  algorithm: LeastConnections
  healthCheck: {{protocol: HTTP, interval: 500ms, timeout: 250ms, rise: 2, fall: 2, downInterval: 500ms,
                http: {{path: /healthz}}}}
  passiveHealth: {{maxFails: 1, failTimeout: 5s}}
  retry: {{on: [Error, Timeout], tries: 3}}
  timeouts: {{connect: 500ms, response: 5s}}
",
        a.addr.port(),
        b.addr.port(),
        c.addr.port()
    );
    let file = std::env::temp_dir().join(format!("balanced-demo-{}.yaml", std::process::id()));
    std::fs::write(&file, &yaml)?;

    println!("balanced demo: three backends behind one proxy, least connections, retries on error");
    println!(
        "  backends   a {}   b {}   c-slow {} (40 ms per request)",
        a.addr, b.addr, c.addr
    );
    println!("  proxy      http://127.0.0.1:{port}  ({WORKERS} clients, steady traffic)");
    println!("  config     {}", file.display());
    println!("  log        {}", log_path().display());
    println!();

    let admin_listener = TcpListener::bind("127.0.0.1:0").await?;
    let admin = admin_listener.local_addr()?;
    let shutdown = CancellationToken::new();
    let mut opts = Options::new(&file);
    opts.bind = [127, 0, 0, 1].into();
    opts.serving.grace = Duration::from_secs(2);
    let proxy = tokio::spawn(standalone::run(opts, admin_listener, shutdown.clone()));

    let started = Instant::now();
    let stamp = move || format!("[{:5.1}s]", started.elapsed().as_secs_f64());
    let mut watcher = StatusWatcher::new(admin, names);
    // Wait for every endpoint to pass `rise` probes before sending traffic.
    while watcher.healthy().await < 3 {
        if started.elapsed() > Duration::from_secs(10) {
            shutdown.cancel();
            return Err(Error::NeverHealthy { log: log_path() });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!("{} all three endpoints healthy; starting traffic", stamp());
    let started = Instant::now();
    let stamp = move || format!("[{:5.1}s]", started.elapsed().as_secs_f64());

    let tally = Arc::new(Mutex::new(Tally::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let target: SocketAddr = ([127, 0, 0, 1], port).into();
    let workers: Vec<_> = (0..WORKERS)
        .map(|_| tokio::spawn(client_loop(target, tally.clone(), stop.clone())))
        .collect();

    let mut summary = Summary::default();
    let (mut killed_at, mut revived_at) = (None, None);
    let mut last_report = Duration::ZERO;
    while started.elapsed() < timeline.end_at {
        let now = started.elapsed();
        if killed_at.is_none() && now >= timeline.kill_at {
            b.kill();
            killed_at = Some(Instant::now());
            println!("{} killed backend b (listener and open connections closed)", stamp());
        }
        if revived_at.is_none() && now >= timeline.revive_at {
            b.revive().await?;
            revived_at = Some(Instant::now());
            println!("{} revived backend b on the same port", stamp());
        }
        for event in watcher.changes().await {
            println!("{} {event}", stamp());
            if let (Some(k), None) = (killed_at, summary.detect)
                && (event.contains("Unhealthy") || event.contains("ejected"))
                && event.starts_with("b ")
            {
                summary.detect = Some(k.elapsed());
            }
            if let (Some(r), None) = (revived_at, summary.recover)
                && event.starts_with("b ")
                && event.ends_with("-> Healthy")
            {
                summary.recover = Some(r.elapsed());
            }
        }
        if now - last_report >= Duration::from_secs(2) {
            last_report = now;
            let t = tally.lock().expect("tally lock");
            let total: u64 = t.per_backend.values().sum();
            println!("{} {total} requests answered, {} client errors", stamp(), t.errors);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        let _ = w.await;
    }
    shutdown.cancel();
    let _ = proxy.await;
    let _ = std::fs::remove_file(&file);

    let t = tally.lock().expect("tally lock");
    summary.per_backend = t.per_backend.clone();
    summary.errors = t.errors;
    print_summary(&summary);
    Ok(summary)
}

async fn client_loop(target: SocketAddr, tally: Arc<Mutex<Tally>>, stop: Arc<AtomicBool>) {
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let uri: http::Uri = format!("http://{target}/").parse().expect("valid uri");
    while !stop.load(Ordering::Relaxed) {
        let result = client.get(uri.clone()).await;
        let answer = match result {
            Ok(resp) if resp.status().is_success() => {
                let backend = resp
                    .headers()
                    .get("x-backend")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("?")
                    .to_string();
                let _ = resp.into_body().collect().await;
                Some(backend)
            }
            _ => None,
        };
        {
            let mut t = tally.lock().expect("tally lock");
            match answer {
                Some(backend) => *t.per_backend.entry(backend).or_default() += 1,
                None => t.errors += 1,
            }
        }
        tokio::time::sleep(PAUSE).await;
    }
}

/// Polls `/status` and reports what changed, in words.
struct StatusWatcher {
    admin: SocketAddr,
    names: HashMap<u16, &'static str>,
    last: HashMap<u16, (String, bool)>,
}

impl StatusWatcher {
    fn new(admin: SocketAddr, names: HashMap<u16, &'static str>) -> Self {
        Self {
            admin,
            names,
            last: HashMap::new(),
        }
    }

    async fn endpoints(&self) -> Vec<serde_json::Value> {
        let Ok((_, body)) = http_get(self.admin, "/status").await else {
            return Vec::new();
        };
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        v["services"][0]["endpoints"].as_array().cloned().unwrap_or_default()
    }

    async fn healthy(&mut self) -> usize {
        self.endpoints()
            .await
            .iter()
            .filter(|e| e["state"] == "Healthy")
            .count()
    }

    async fn changes(&mut self) -> Vec<String> {
        let mut out = Vec::new();
        for e in self.endpoints().await {
            let port = e["port"].as_u64().unwrap_or(0) as u16;
            let name = self.names.get(&port).copied().unwrap_or("?");
            let state = e["state"].as_str().unwrap_or("?").to_string();
            let ejected = e["ejected"].as_bool().unwrap_or(false);
            let (old_state, old_ejected) = self.last.get(&port).cloned().unwrap_or(("Healthy".into(), false));
            if ejected && !old_ejected {
                out.push(format!(
                    "{name} ejected by the proxy after a failed request (passive health)"
                ));
            }
            if !ejected && old_ejected {
                out.push(format!("{name} ejection over"));
            }
            if state != old_state {
                let why = match e["lastError"].as_str() {
                    Some(err) if state != "Healthy" => format!(" ({err})"),
                    _ => String::new(),
                };
                out.push(format!("{name} probes: {old_state} -> {state}{why}"));
            }
            self.last.insert(port, (state, ejected));
        }
        out
    }
}

fn print_summary(s: &Summary) {
    let total: u64 = s.per_backend.values().sum();
    println!();
    println!("{:<10} {:>9} {:>7}", "BACKEND", "REQUESTS", "SHARE");
    let mut rows: Vec<_> = s.per_backend.iter().collect();
    rows.sort();
    for (name, n) in rows {
        println!("{name:<10} {n:>9} {:>6.1}%", 100.0 * *n as f64 / total.max(1) as f64);
    }
    println!("{:<10} {total:>9}", "total");
    println!();
    println!("client-visible errors      {} (expected: 0)", s.errors);
    let ms = |d: Option<Duration>| d.map_or("not seen".to_string(), |d| format!("{} ms", d.as_millis()));
    println!("failure noticed after      {}", ms(s.detect));
    println!("recovery confirmed after   {}", ms(s.recover));
    println!();
    println!("Least connections gave the slow backend the smallest share; retries hid the");
    println!("killed backend from clients while probes and passive ejection took it out.");
}

/// A loopback port free right now, for the proxy's listener.
fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}
