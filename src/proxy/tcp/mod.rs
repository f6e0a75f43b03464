//! A TCP listener: one endpoint per connection, reached through the attempt
//! loop, then bytes copied both ways with half-close (spliced in the kernel
//! on Linux), closed after `timeouts.idle` with no bytes either way.

pub mod activity;
#[cfg(target_os = "linux")]
pub mod splice;

use std::sync::Arc;
use std::time::SystemTime;

use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use self::activity::Activity;
use super::access::{self, Entry};
use super::attempt::{self, Attempts, Connected};
use super::listen::{Gatekeeper, Serving};
use super::service::ServiceRuntime;
use super::tasks::Tasks;
use crate::api::config::{Algorithm, ListenerProtocol};
use crate::balance::picker;

/// Serves a TCP listener until `stop`; open connections then get the grace period.
pub async fn serve_tcp(
    listener: TcpListener,
    service: Arc<ServiceRuntime>,
    name: String,
    serving: Serving,
    tasks: Tasks,
    stop: CancellationToken,
) {
    let mut gate = Gatekeeper::new(listener, &service, &name, true);
    while let Some(conn) = gate.next(&service, &stop).await {
        let idle = service.current().config.timeouts.idle_for(ListenerProtocol::Tcp);
        let (service, name, log) = (service.clone(), name.clone(), serving.access_log.clone());
        let idle_closed = gate.counters().idle_timeout.clone();
        tasks.spawn_closable(|kill| async move {
            let (_held, peer, mut client) = (conn.held, conn.peer, conn.stream);
            let (start, started) = (SystemTime::now(), Instant::now());
            let mut up = access::Upstream::default();
            let activity = Activity::new();
            if let Some(mut connected) = connect(&service, &name, peer, &mut up).await {
                let endpoint = connected.endpoint;
                tokio::select! {
                    _ = kill.cancelled() => {}
                    _ = activity.idle_for(idle) => {
                        idle_closed.inc();
                        tracing::debug!(service = %service.key, %peer, %endpoint, ?idle, "tcp connection idle; closed");
                    }
                    r = copy_both_ways(&mut client, &mut connected.stream, &activity) => {
                        if let Err(e) = r {
                            tracing::debug!(service = %service.key, %peer, %endpoint, error = %e, "tcp connection ended with an error");
                        }
                    }
                }
            }
            if let Some(log) = log {
                let (bytes_in, bytes_out) = activity.totals();
                log.send(Entry {
                    tls: None,
                    start,
                    client: peer,
                    service: Arc::from(service.label()),
                    listener: Arc::from(name.as_str()),
                    method: None,
                    uri: None,
                    authority: None,
                    version: None,
                    status: 0,
                    bytes_in,
                    bytes_out,
                    duration: started.elapsed(),
                    upstream: up,
                });
            }
        });
    }
    gate.drain(&tasks, serving.grace).await;
}

/// Connects a client to an endpoint ([`attempt::connect`]); what the access
/// log says of the upstream side goes to `up`.
async fn connect(
    service: &ServiceRuntime,
    listener: &str,
    peer: std::net::SocketAddr,
    up: &mut access::Upstream,
) -> Option<Connected<TcpStream>> {
    let current = service.current();
    let li = current.listener(listener)?;
    let config = &current.config;
    let key = matches!(config.algorithm, Algorithm::ConsistentHash(_)).then(|| picker::hash_ip(peer));
    let attempts = Attempts::new(service, config, &current.snap, key);
    match attempt::connect(attempts, &current, li, |pool| async move { pool.connect_tcp().await }).await {
        Ok(connected) => {
            up.endpoint = Some(connected.endpoint);
            up.attempts = connected.tries as u32;
            Some(connected)
        }
        Err(end) => {
            up.endpoint = end.last.as_ref().map(|(addr, _)| *addr);
            up.attempts = end.tries as u32;
            up.flags.set(end.flags(&current.snap));
            let last = end.last.as_ref().map(|(addr, f)| format!("{addr}: {f}"));
            tracing::warn!(service = %service.key, %peer, tries = end.tries, last = last.as_deref().unwrap_or("no endpoint available"), refused = ?end.refused, "no endpoint accepted the connection");
            None
        }
    }
}

#[cfg(target_os = "linux")]
async fn copy_both_ways(
    client: &mut TcpStream,
    upstream: &mut TcpStream,
    activity: &Activity,
) -> std::io::Result<(u64, u64)> {
    splice::copy_bidirectional(client, upstream, activity).await
}

#[cfg(not(target_os = "linux"))]
async fn copy_both_ways(
    client: &mut TcpStream,
    upstream: &mut TcpStream,
    activity: &Activity,
) -> std::io::Result<(u64, u64)> {
    let mut client = activity::Touching::new(client, activity);
    tokio::io::copy_bidirectional_with_sizes(&mut client, upstream, 64 * 1024, 64 * 1024).await
}
