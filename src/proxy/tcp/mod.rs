//! A TCP listener: one endpoint per connection, reached through the attempt
//! loop, then bytes copied both ways with half-close (spliced in the kernel
//! on Linux), closed after `timeouts.idle` with no bytes either way. With
//! `tls` it ends the client's TLS first, or with `mode: Passthrough` reads
//! only the ClientHello's name ([`sni`]); either way the name picks the
//! group (`sniRoutes`).

pub mod activity;
pub mod sni;
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
use super::tls::{Session, Terminator};
use crate::api::config::{Algorithm, ListenerProtocol};
use crate::balance::picker;

/// Serves a TCP listener until `stop`, ending TLS with `tls` when it has
/// one; open connections then get the grace period.
pub async fn serve_tcp(
    listener: TcpListener,
    service: Arc<ServiceRuntime>,
    name: String,
    tls: Option<Arc<Terminator>>,
    serving: Serving,
    tasks: Tasks,
    stop: CancellationToken,
) {
    let mut gate = Gatekeeper::new(listener, &service, &name, true);
    while let Some(conn) = gate.next(&service, &stop).await {
        let idle = service.current().config.timeouts.idle_for(ListenerProtocol::Tcp);
        let (service, name, log) = (service.clone(), name.clone(), serving.access_log.clone());
        let idle_closed = gate.counters().idle_timeout.clone();
        let tls = tls.clone();
        tasks.spawn_closable(|kill| async move {
            let (_held, peer, client) = (conn.held, conn.peer, conn.stream);
            let (start, started) = (SystemTime::now(), Instant::now());
            let mut up = access::Upstream::default();
            let activity = Activity::new();
            let front = tokio::select! {
                _ = kill.cancelled() => None,
                f = front(client, &service, &name, tls.as_deref(), peer) => f,
            };
            let session = front.as_ref().and_then(|f| f.session.clone());
            if let Some(front) = front
                && let Some(mut connected) = connect(&service, &name, peer, front.group, &mut up).await
            {
                let endpoint = connected.endpoint;
                tokio::select! {
                    _ = kill.cancelled() => {}
                    _ = activity.idle_for(idle) => {
                        idle_closed.inc();
                        tracing::debug!(service = %service.key, %peer, %endpoint, ?idle, "tcp connection idle; closed");
                    }
                    r = relay(front.stream, &front.read, &mut connected.stream, &activity) => {
                        if let Err(e) = r {
                            tracing::debug!(service = %service.key, %peer, %endpoint, error = %e, "tcp connection ended with an error");
                        }
                    }
                }
            }
            if let Some(log) = log {
                let (bytes_in, bytes_out) = activity.totals();
                log.send(Entry {
                    tls: session,
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

/// The client's side once it may be relayed: its stream (TLS ended or
/// not), the bytes already read from it (a passed-through ClientHello),
/// its TLS for the log, and the group its name routes to.
struct Front {
    stream: ClientSide,
    read: Vec<u8>,
    session: Option<Session>,
    group: usize,
}

enum ClientSide {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

/// Ends the client's TLS or reads its ClientHello, as the listener says,
/// within `timeouts.requestHeader`; `None` (logged) when the client does
/// not finish it or does not speak TLS.
async fn front(
    client: TcpStream,
    service: &ServiceRuntime,
    listener: &str,
    tls: Option<&Terminator>,
    peer: std::net::SocketAddr,
) -> Option<Front> {
    let current = service.current();
    let li = current.listener(listener)?;
    let settings = current.config.listeners[li].tls.as_ref();
    let timeout = current.config.timeouts.request_header;
    if let Some(t) = tls {
        let accepted = match tokio::time::timeout(timeout, t.acceptor().accept(client)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                tracing::debug!(service = %service.key, %peer, error = %e, "TLS handshake failed");
                t.handshake_failed(&e);
                return None;
            }
            Err(_) => {
                t.handshake_timed_out();
                return None;
            }
        };
        let session = super::tls::session(accepted.get_ref().1);
        let group = settings.map_or(0, |s| s.group_for(session.sni.as_deref()));
        return Some(Front {
            stream: ClientSide::Tls(Box::new(accepted)),
            read: Vec::new(),
            session: Some(session),
            group,
        });
    }
    let Some(settings) = settings.filter(|s| s.passthrough) else {
        return Some(Front {
            stream: ClientSide::Plain(client),
            read: Vec::new(),
            session: None,
            group: 0,
        });
    };
    match tokio::time::timeout(timeout, read_hello(&client)).await {
        Ok(Ok((read, sni))) => Some(Front {
            stream: ClientSide::Plain(client),
            read,
            group: settings.group_for(sni.as_deref()),
            session: Some(Session {
                version: "passthrough",
                sni: sni.map(Arc::from),
            }),
        }),
        Ok(Err(why)) => {
            tracing::debug!(service = %service.key, %peer, %why, "no TLS ClientHello; closed");
            None
        }
        Err(_) => {
            tracing::debug!(service = %service.key, %peer, "no TLS ClientHello in time; closed");
            None
        }
    }
}

/// Reads from `client` until its ClientHello is whole; the bytes and its name.
async fn read_hello(client: &TcpStream) -> Result<(Vec<u8>, Option<String>), String> {
    let mut buf = Vec::with_capacity(2048);
    loop {
        client.readable().await.map_err(|e| e.to_string())?;
        let mut chunk = [0u8; 4096];
        match client.try_read(&mut chunk) {
            Ok(0) => return Err("closed before a whole ClientHello".into()),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e.to_string()),
        }
        match sni::parse(&buf) {
            sni::Hello::Incomplete => {}
            sni::Hello::Complete(name) => return Ok((buf, name)),
            sni::Hello::NotTls => return Err("not a TLS ClientHello".into()),
        }
    }
}

/// Relays the client and the endpoint both ways, `read` first to the endpoint.
async fn relay(
    client: ClientSide,
    read: &[u8],
    upstream: &mut TcpStream,
    activity: &Activity,
) -> std::io::Result<(u64, u64)> {
    use tokio::io::AsyncWriteExt;
    if !read.is_empty() {
        upstream.write_all(read).await?;
    }
    match client {
        ClientSide::Plain(mut client) => copy_both_ways(&mut client, upstream, activity).await,
        ClientSide::Tls(mut client) => {
            let mut client = activity::Touching::new(client.as_mut(), activity);
            tokio::io::copy_bidirectional_with_sizes(&mut client, upstream, 16 * 1024, 16 * 1024).await
        }
    }
}

/// Connects a client to an endpoint of `group` ([`attempt::connect`]); what
/// the access log says of the upstream side goes to `up`.
async fn connect(
    service: &ServiceRuntime,
    listener: &str,
    peer: std::net::SocketAddr,
    group: usize,
    up: &mut access::Upstream,
) -> Option<Connected<TcpStream>> {
    let current = service.current();
    let li = current.listener(listener)?;
    let config = &current.config;
    let key = matches!(config.algorithm, Algorithm::ConsistentHash(_)).then(|| picker::hash_ip(peer));
    let attempts = Attempts::new(service, config, &current.snap, key).within(1 << group);
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
