//! What clients that never read cost the proxy in memory. A test binary of
//! its own: the process's resident memory is what is measured, and any
//! other test running beside it in the same process would be counted too
//! (beside hostile.rs's large answers it measured 35-50 MB, alone 6-9).

mod support;

use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::endless_backend;
use support::standalone::proxy;
use tokio::net::TcpStream;

/// Resident memory of this process, in KiB.
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap()
}

/// 200 clients that ask for an endless answer and never read, over HTTP/1.1,
/// HTTP/2 and a WebSocket tunnel: the proxy (in this process) grows by less
/// than 20 MB for each. One test, so no other test's memory is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_clients_that_never_read_grow_memory_by_less_than_20_mb() {
    const CLIENTS: usize = 200;
    const LIMIT_KIB: u64 = 20 * 1024;
    let backend = endless_backend().await;
    let p = proxy(&[backend], "HTTP", "", 1).await;
    // CLIENTS connections that each send `request` and never read, through
    // a small receive window.
    let stalled = |request: &[u8]| -> Vec<std::net::TcpStream> {
        (0..CLIENTS)
            .map(|_| {
                let s = std::net::TcpStream::connect(p.listen).unwrap();
                socket2::SockRef::from(&s).set_recv_buffer_size(4096).unwrap();
                std::io::Write::write_all(&mut &s, request).unwrap();
                s
            })
            .collect()
    };
    // The windows below are the scenario (clients that do not read), not waits.
    let settle = || tokio::time::sleep(Duration::from_secs(2));

    let before = rss_kib();
    let held = stalled(b"GET /big HTTP/1.1\r\nHost: a\r\n\r\n");
    settle().await;
    let h1 = rss_kib().saturating_sub(before);
    drop(held);
    settle().await;

    let before = rss_kib();
    let mut streams = Vec::new();
    for _ in 0..CLIENTS {
        let stream = TcpStream::connect(p.listen).await.unwrap();
        let (mut sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .initial_stream_window_size(4096)
            .initial_connection_window_size(4096)
            .handshake(TokioIo::new(stream))
            .await
            .unwrap();
        let task = tokio::spawn(conn);
        let req = http::Request::get("http://a/big")
            .body(Full::new(Bytes::new()))
            .unwrap();
        // The answer's head comes; its body is never read.
        let resp = sender.send_request(req).await.unwrap();
        streams.push((sender, resp, task));
    }
    settle().await;
    let h2 = rss_kib().saturating_sub(before);
    for (_, _, task) in &streams {
        task.abort();
    }
    drop(streams);
    settle().await;

    let before = rss_kib();
    let held = stalled(
        b"GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    );
    settle().await;
    let ws = rss_kib().saturating_sub(before);
    drop(held);

    eprintln!("RSS growth for {CLIENTS} non-reading clients: HTTP/1.1 {h1} KiB, HTTP/2 {h2} KiB, WebSocket {ws} KiB");
    for (what, kib) in [("HTTP/1.1", h1), ("HTTP/2", h2), ("WebSocket", ws)] {
        assert!(
            kib < LIMIT_KIB,
            "{what}: {kib} KiB for {CLIENTS} clients that never read"
        );
    }
}
