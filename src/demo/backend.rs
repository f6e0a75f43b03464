//! The demo's backends on real loopback sockets: servers that answer, answer
//! slowly, hang, reset, or die and come back. `balanced demo` runs them, and
//! the tests use them as misbehaving upstreams.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// How an HTTP backend answers.
#[derive(Clone, Debug)]
pub enum Behavior {
    /// Every request gets this status and the backend's name as body.
    Status(u16),
    /// Like `Status(200)` after a delay.
    Slow(Duration),
}

/// A server on loopback that can be killed (listener and open connections
/// closed, as if the process died) and revived on the same address.
pub struct Backend {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Name it answers with.
    pub name: String,
    behavior: Behavior,
    kind: Kind,
    accepted: Arc<AtomicU64>,
    kill: CancellationToken,
    frozen: Arc<AtomicBool>,
}

#[derive(Clone, Copy)]
enum Kind {
    Http,
    Hang,
    Drop,
    TcpEcho,
}

impl Backend {
    /// An HTTP/1.1 + h2c backend on a free loopback port. Answers carry
    /// `x-backend: NAME` and `x-version` (the HTTP version the request came in).
    pub async fn http(name: &str, behavior: Behavior) -> Backend {
        Self::start(name, behavior, Kind::Http, "127.0.0.1:0".parse().expect("literal")).await
    }

    /// An HTTP backend on a chosen address (one a proxy already points at).
    pub async fn http_at(name: &str, behavior: Behavior, addr: SocketAddr) -> Backend {
        Self::start(name, behavior, Kind::Http, addr).await
    }

    /// Stops answering, as a SIGSTOPped process does: connections are still
    /// accepted, but requests get no answer until [`Backend::thaw`].
    pub fn freeze(&self) {
        self.frozen.store(true, Ordering::Relaxed);
    }

    /// Answers again, held requests included.
    pub fn thaw(&self) {
        self.frozen.store(false, Ordering::Relaxed);
    }

    /// A backend that accepts connections and never says anything.
    pub async fn hang() -> Backend {
        Self::start(
            "hang",
            Behavior::Status(200),
            Kind::Hang,
            "127.0.0.1:0".parse().expect("literal"),
        )
        .await
    }

    /// A backend that reads the start of a request, then resets the connection
    /// without answering (a crash mid-request).
    pub async fn drop_after_request() -> Backend {
        Self::start(
            "drop",
            Behavior::Status(200),
            Kind::Drop,
            "127.0.0.1:0".parse().expect("literal"),
        )
        .await
    }

    /// A raw TCP server that echoes every byte back.
    pub async fn tcp_echo(name: &str) -> Backend {
        Self::start(
            name,
            Behavior::Status(200),
            Kind::TcpEcho,
            "127.0.0.1:0".parse().expect("literal"),
        )
        .await
    }

    /// TCP connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }

    /// Closes the listener and every open connection.
    pub fn kill(&self) {
        self.kill.cancel();
    }

    /// Listens again on the same address with the same behaviour.
    pub async fn revive(&mut self) -> std::io::Result<()> {
        self.kill.cancel();
        let (_, kill, accepted) = spawn(
            &self.name,
            self.behavior.clone(),
            self.kind,
            self.addr,
            self.frozen.clone(),
        )
        .await?;
        self.kill = kill;
        self.accepted = accepted;
        Ok(())
    }

    /// An HTTP backend on `addr` (`balanced backend`), or why it cannot listen there.
    pub async fn try_http_at(name: &str, behavior: Behavior, addr: SocketAddr) -> std::io::Result<Backend> {
        Self::try_start(name, behavior, Kind::Http, addr).await
    }

    /// # Panics
    /// If `addr` cannot be bound within a second (a free loopback port always can).
    async fn start(name: &str, behavior: Behavior, kind: Kind, addr: SocketAddr) -> Backend {
        match Self::try_start(name, behavior, kind, addr).await {
            Ok(backend) => backend,
            Err(e) => panic!("backend {name}: cannot listen on {addr}: {e}"),
        }
    }

    async fn try_start(name: &str, behavior: Behavior, kind: Kind, addr: SocketAddr) -> std::io::Result<Backend> {
        let frozen = Arc::new(AtomicBool::new(false));
        let (addr, kill, accepted) = spawn(name, behavior.clone(), kind, addr, frozen.clone()).await?;
        Ok(Backend {
            addr,
            name: name.to_string(),
            behavior,
            kind,
            accepted,
            kill,
            frozen,
        })
    }
}

/// Starts the accept loop; returns the bound address, its kill switch and accept counter.
async fn spawn(
    name: &str,
    behavior: Behavior,
    kind: Kind,
    addr: SocketAddr,
    frozen: Arc<AtomicBool>,
) -> std::io::Result<(SocketAddr, CancellationToken, Arc<AtomicU64>)> {
    let listener = bind_retrying(addr).await?;
    let addr = listener.local_addr()?;
    let kill = CancellationToken::new();
    let accepted = Arc::new(AtomicU64::new(0));
    let (task_kill, task_accepted) = (kill.clone(), accepted.clone());
    let name = name.to_string();
    {
        let kill = task_kill;
        let accepted = task_accepted;
        tokio::spawn(async move {
            loop {
                let stream = tokio::select! {
                    _ = kill.cancelled() => return,
                    a = listener.accept() => match a { Ok((s, _)) => s, Err(_) => continue },
                };
                accepted.fetch_add(1, Ordering::Relaxed);
                let kill = kill.clone();
                let name = name.clone();
                let behavior = behavior.clone();
                let frozen = frozen.clone();
                tokio::spawn(async move {
                    match kind {
                        Kind::Hang => {
                            kill.cancelled().await;
                            drop(stream);
                        }
                        Kind::Http => {
                            tokio::select! {
                                _ = kill.cancelled() => {}
                                _ = serve_http(stream, name, behavior, frozen) => {}
                            }
                        }
                        Kind::Drop => {
                            let mut stream = stream;
                            let mut buf = [0u8; 1024];
                            let _ = tokio::io::AsyncReadExt::read(&mut stream, &mut buf).await;
                            let _ = stream.set_zero_linger();
                            drop(stream);
                        }
                        Kind::TcpEcho => {
                            let (mut r, mut w) = stream.into_split();
                            tokio::select! {
                                _ = kill.cancelled() => {}
                                _ = tokio::io::copy(&mut r, &mut w) => {}
                            }
                        }
                    }
                });
            }
        });
    }
    Ok((addr, kill, accepted))
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.kill.cancel();
    }
}

async fn serve_http(stream: TcpStream, name: String, behavior: Behavior, frozen: Arc<AtomicBool>) {
    let service = service_fn(move |mut req: Request<Incoming>| {
        let name = name.clone();
        let behavior = behavior.clone();
        let frozen = frozen.clone();
        async move {
            while frozen.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let version = format!("{:?}", req.version());
            if req.headers().contains_key(http::header::UPGRADE) {
                // WebSocket-style upgrade: switch protocols, then echo raw bytes.
                let upgrade = hyper::upgrade::on(&mut req);
                tokio::spawn(async move {
                    if let Ok(io) = upgrade.await {
                        let (mut r, mut w) = tokio::io::split(TokioIo::new(io));
                        let _ = tokio::io::copy(&mut r, &mut w).await;
                    }
                });
                let response = Response::builder()
                    .status(StatusCode::SWITCHING_PROTOCOLS)
                    .header(http::header::UPGRADE, "websocket")
                    .header(http::header::CONNECTION, "upgrade")
                    .header("x-backend", name.as_str())
                    .body(Full::new(Bytes::new()))
                    .expect("valid response parts");
                return Ok::<_, Infallible>(response);
            }
            // Drain the request body so keep-alive connections stay usable.
            let _ = http_body_util::BodyExt::collect(req.into_body()).await;
            let status = match behavior {
                Behavior::Status(code) => code,
                Behavior::Slow(delay) => {
                    tokio::time::sleep(delay).await;
                    200
                }
            };
            let response = Response::builder()
                .status(StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
                .header("x-backend", name.as_str())
                .header("x-version", version)
                .body(Full::new(Bytes::from(name)))
                .expect("valid response parts");
            Ok::<_, Infallible>(response)
        }
    });
    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
        .serve_connection_with_upgrades(TokioIo::new(stream), service)
        .await;
}

/// Binds, retrying briefly: a revived backend's port may still be held for a moment.
/// Binds `addr`, retrying for a second: a revived backend's port may still be
/// held by the connections of its previous life.
async fn bind_retrying(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let mut tries = 0;
    loop {
        match TcpListener::bind(addr).await {
            Ok(l) => return Ok(l),
            Err(e) if tries >= 50 => return Err(e),
            Err(_) => tries += 1,
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// GETs `http://addr/path` over a fresh connection; returns status and body.
pub async fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String), String> {
    let stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let req = Request::get(path)
        .header(http::header::HOST, addr.to_string())
        .body(http_body_util::Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let body = http_body_util::BodyExt::collect(resp.into_body())
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}
