//! The runtime every serving command shares: a [`Source`] says what to serve,
//! and [`run`] owns the data plane, the admin server, draining and shutdown.
//!
//! `balanced standalone` (a file and our own prober) and `balanced proxy` (one
//! BalancedService watched in the cluster) are sources (`crate::source`);
//! tests use `StaticSource`. Whatever the source, shutdown is the same: `/readyz`
//! fails for `drain_delay`, listeners stop accepting, and every connection,
//! tunnel and TCP copy gets `grace` to finish before it is closed.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::admin::{self, AdminView};
use crate::metrics::Metrics;
use crate::proxy::dataplane::ListenError;
use crate::proxy::{Dataplane, Serving};
use crate::source::{Change, Source, SourceView};

/// How the runtime serves.
#[derive(Clone)]
pub struct Options {
    /// Address the listeners bind.
    pub bind: IpAddr,
    /// Grace period and access log.
    pub serving: Serving,
    /// On shutdown, how long `/readyz` fails before listeners stop accepting.
    pub drain_delay: Duration,
    /// The process's metrics (the source may have registered its own in them).
    pub metrics: Arc<Metrics>,
}

impl Options {
    /// Defaults: every address, 30 s grace, no drain delay, fresh metrics.
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self {
            bind: IpAddr::from([0, 0, 0, 0]),
            serving: Serving::default(),
            drain_delay: Duration::ZERO,
            metrics,
        }
    }
}

/// Why the runtime stopped before serving.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The first configuration's listeners could not be bound.
    #[error("cannot start listeners:\n  {}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n  "))]
    Listen(Vec<ListenError>),
}

/// Serves what `source` says until `shutdown` is cancelled (or the source
/// ends), with the admin server on `admin_listener`; then drains.
///
/// A listener that cannot be bound in the first configuration is fatal
/// (nothing would serve it); in a later one it is logged and the running
/// listener, if any, keeps serving.
pub async fn run<S: Source>(
    mut source: S,
    opts: Options,
    admin_listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    // Everything runs on `stop`, cancelled after the drain delay, so `/readyz`
    // can fail while listeners still serve.
    let stop = CancellationToken::new();
    let dataplane = Arc::new(Dataplane::new(
        opts.metrics.proxy.clone(),
        opts.bind,
        opts.serving.clone(),
        stop.clone(),
    ));
    source.attach(&dataplane);
    let admin_state = Arc::new(AdminState {
        source: source.view(),
        dataplane: dataplane.clone(),
        metrics: opts.metrics.clone(),
        draining: AtomicBool::new(false),
    });
    let admin_task = tokio::spawn(admin::serve(admin_listener, admin_state.clone(), stop.clone()));

    let mut first = true;
    let mut failed = None;
    loop {
        let change = tokio::select! {
            _ = shutdown.cancelled() => break,
            change = source.next() => change,
        };
        match change {
            None => break,
            Some(Change::Services(configs)) => {
                let errors = dataplane.apply(&configs);
                if first && !errors.is_empty() {
                    failed = Some(Error::Listen(errors));
                    break;
                }
                first = false;
                for e in errors {
                    tracing::error!(error = %e, "listener not changed");
                }
            }
            Some(Change::Endpoints(config, members)) => dataplane.set_endpoints(config, members),
        }
    }
    if failed.is_none() {
        admin_state.draining.store(true, Ordering::Relaxed);
        if !opts.drain_delay.is_zero() {
            tracing::info!(delay = ?opts.drain_delay, "draining: /readyz fails, listeners still serve");
            tokio::time::sleep(opts.drain_delay).await;
        }
    }
    stop.cancel();
    dataplane.stopped().await;
    source.stop().await;
    let _ = admin_task.await;
    failed.map_or(Ok(()), Err)
}

struct AdminState {
    source: Arc<dyn SourceView>,
    dataplane: Arc<Dataplane>,
    metrics: Arc<Metrics>,
    draining: AtomicBool,
}

impl AdminView for AdminState {
    fn status(&self) -> String {
        serde_json::to_string_pretty(&self.source.status(&self.dataplane)).unwrap_or_default()
    }

    fn ready(&self) -> bool {
        self.source.ready() && !self.draining.load(Ordering::Relaxed)
    }

    fn metrics(&self) -> String {
        self.metrics.encode()
    }

    fn pick(
        &self,
        key: &crate::api::config::ServiceKey,
        hash: Option<&str>,
    ) -> Result<std::net::SocketAddr, (http::StatusCode, String)> {
        use crate::balance::{now_ms, picker};
        let runtime = self
            .dataplane
            .service(key)
            .ok_or_else(|| (http::StatusCode::NOT_FOUND, format!("no BalancedService {key}\n")))?;
        let current = runtime.current();
        let snap = &current.snap;
        let hash = match (&current.config.algorithm, hash) {
            (crate::api::config::Algorithm::ConsistentHash(_), Some(k)) => Some(picker::hash_key(k.as_bytes())),
            _ => None,
        };
        let now = now_ms();
        match runtime
            .balancer
            .assign(snap, current.config.health.reports_load(), hash, now)
        {
            Some(i) => Ok(snap.members[i].spec.addr),
            None => Err((
                http::StatusCode::SERVICE_UNAVAILABLE,
                format!("no healthy endpoint in {key} (0/{} serving)\n", snap.members.len()),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::StaticSource;

    #[tokio::test(start_paused = true)]
    async fn shutdown_waits_for_the_drain_delay_then_stops() {
        let mut opts = Options::new(Arc::new(Metrics::new()));
        opts.drain_delay = Duration::from_secs(5);
        opts.bind = [127, 0, 0, 1].into();
        let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let shutdown = CancellationToken::new();
        let mut running = tokio::spawn(run(StaticSource::new(Vec::new()), opts, admin, shutdown.clone()));
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(!running.is_finished(), "serves until shutdown");

        shutdown.cancel();
        let asked = tokio::time::Instant::now();
        assert!(
            tokio::time::timeout(Duration::from_millis(4990), &mut running)
                .await
                .is_err(),
            "stopped before the drain delay was over"
        );
        running.await.unwrap().unwrap();
        assert!(asked.elapsed() >= Duration::from_secs(5));
        assert!(asked.elapsed() < Duration::from_secs(6), "{:?}", asked.elapsed());
    }
}
