//! Test fixtures: bounded polling and loopback addresses. Built for the unit
//! tests and, through the `test-util` feature, for the integration tests and
//! benches; never part of the release binary.

use std::net::SocketAddr;
use std::time::Duration;

/// A loopback port free right now (for listeners that must name a port).
///
/// Taken below the kernel's ephemeral range (32768 and up here), where no
/// outgoing connection or `bind(0)` is handed a port: a port merely freed in
/// that range was sometimes taken by another test's probe connection before
/// the listener bound it. Never the same port twice in one process.
pub fn free_port() -> u16 {
    use std::collections::HashSet;
    use std::sync::{Mutex, OnceLock};
    const LOW: u16 = 20_000;
    const SPAN: u16 = 12_000;
    static HANDED: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    let mut handed = HANDED.get_or_init(Mutex::default).lock().expect("ports lock");
    let start: u16 = rand::random_range(0..SPAN);
    for i in 0..SPAN {
        let port = LOW + (start + i) % SPAN;
        if !handed.contains(&port) && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            handed.insert(port);
            return port;
        }
    }
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind loopback")
}

/// A loopback address where nothing listens (connections are refused).
pub async fn refusing_addr() -> SocketAddr {
    // Bound but never listening, and kept for the life of the process: a
    // connect is refused, and no other test can be handed the port (a port
    // merely freed was, and answered 200 where a refusal was expected).
    let socket = tokio::net::TcpSocket::new_v4().expect("a socket");
    socket.bind("127.0.0.1:0".parse().unwrap()).expect("bind loopback");
    let addr = socket.local_addr().expect("bound socket has an address");
    std::mem::forget(socket);
    addr
}

/// Polls `check` every 20 ms until it returns `Some`, or panics with `what` after `limit`.
pub async fn eventually<T, F, Fut>(limit: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {limit:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
