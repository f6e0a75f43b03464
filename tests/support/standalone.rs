//! A standalone proxy in the test's runtime, over a generated file.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use balanced::demo::backend::http_get;
use balanced::standalone::{self, Options};
use balanced::testing::{eventually, free_port};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub struct Proxy {
    pub listen: SocketAddr,
    pub admin: SocketAddr,
    pub shutdown: CancellationToken,
    _file: TempFile,
}

impl Proxy {
    /// The file it serves (rewrite it to reload).
    pub fn file(&self) -> &std::path::Path {
        &self._file.0
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

struct TempFile(std::path::PathBuf);
impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Starts standalone with one listener over `endpoints`; `extra` is more spec
/// YAML (indented two spaces). Waits until every endpoint except those in
/// `not_healthy` is healthy.
pub async fn proxy(endpoints: &[SocketAddr], protocol: &str, extra: &str, wait_healthy: usize) -> Proxy {
    proxy_with(endpoints, protocol, extra, wait_healthy, None).await
}

/// [`proxy`], writing an access log to `access_log`.
pub async fn proxy_with(
    endpoints: &[SocketAddr],
    protocol: &str,
    extra: &str,
    wait_healthy: usize,
    access_log: Option<&std::path::Path>,
) -> Proxy {
    let port = free_port();
    let eps: Vec<String> = endpoints
        .iter()
        .map(|a| format!("    - {{address: {}, port: {}}}", a.ip(), a.port()))
        .collect();
    let health = if extra.contains("healthCheck") {
        ""
    } else {
        "  healthCheck: {protocol: TCP, interval: 200ms, timeout: 100ms, rise: 1, fall: 2, downInterval: 200ms}\n"
    };
    let yaml = format!(
        "apiVersion: balanced.dev/v1alpha1\nkind: BalancedService\nmetadata: {{name: web}}\nspec:\n  endpoints:\n{}\n  listeners: [{{name: main, port: {port}, protocol: {protocol}}}]\n{health}{extra}\n",
        eps.join("\n")
    );
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let path = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "proxy-{}-{}.yaml",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::write(&path, yaml).unwrap();
    let admin_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = admin_listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let mut opts = Options::new(&path);
    opts.bind = [127, 0, 0, 1].into();
    opts.serving.grace = Duration::from_secs(1);
    opts.serving.access_log =
        access_log.map(|p| balanced::proxy::access::AccessLog::open(p.to_str().unwrap()).unwrap());
    let mut task = tokio::spawn(standalone::run(opts, admin_listener, shutdown.clone()));
    let healthy = eventually(Duration::from_secs(3), "endpoints to turn healthy", || async move {
        let (_, body) = http_get(admin, "/status").await.ok()?;
        (body.matches("\"Healthy\"").count() >= wait_healthy).then_some(())
    });
    // A standalone that cannot start (its listener's port taken) says why,
    // instead of surfacing as a timeout.
    tokio::select! {
        _ = healthy => {}
        ended = &mut task => panic!("standalone stopped before its endpoints turned healthy: {ended:?}"),
    }
    Proxy {
        listen: SocketAddr::from(([127, 0, 0, 1], port)),
        admin,
        shutdown,
        _file: TempFile(path),
    }
}
