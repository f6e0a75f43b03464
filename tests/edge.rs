//! The edge as an attacker and an SRE see it: raw sockets that send nothing,
//! half a head or half a body; limits on headers, URIs and connections; Host
//! rules; idle TCP; and the access log. Every wait is bounded.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use balanced::demo::backend::{Backend, Behavior};
use balanced::testing::{eventually, refusing_addr};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::standalone::{proxy, proxy_with};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Writes `request` and reads until the proxy closes; returns what came back
/// and how long the close took. Panics after 10 s.
async fn until_closed(addr: SocketAddr, request: &[u8]) -> (String, Duration) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let started = Instant::now();
    let mut got = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), async {
        let mut buf = [0u8; 8192];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(
        read.is_ok(),
        "still open after 10 s; got {:?}",
        String::from_utf8_lossy(&got)
    );
    (String::from_utf8_lossy(&got).into_owned(), started.elapsed())
}

fn status_of(answer: &str) -> &str {
    answer.split(' ').nth(1).unwrap_or("")
}

fn within(took: Duration, low_ms: u64, high_ms: u64, what: &str) {
    assert!(
        took >= Duration::from_millis(low_ms) && took <= Duration::from_millis(high_ms),
        "{what}: closed after {took:?}, expected {low_ms}..{high_ms} ms"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_and_slow_heads_are_closed_at_request_header() {
    let a = Backend::http("a", Behavior::Status(200)).await;
    let p = proxy(&[a.addr], "HTTP", "  timeouts: {requestHeader: 400ms, idle: 1s}", 1).await;

    let (got, took) = until_closed(p.listen, b"").await;
    assert_eq!(got, "", "nothing asked, nothing answered");
    within(took, 300, 2000, "a connection that sends nothing");

    let (got, took) = until_closed(p.listen, b"PRI * HTTP/2.0\r\n").await;
    assert_eq!(got, "", "half an h2 preface gets a clean close");
    within(took, 300, 2000, "half an h2 preface");

    let (got, took) = until_closed(p.listen, b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow").await;
    assert_eq!(status_of(&got), "408", "{got}");
    within(took, 300, 2000, "half a head");

    // Keep-alive: idle (1 s) between requests, not requestHeader.
    let mut s = TcpStream::connect(p.listen).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let mut buf = [0u8; 4096];
    let n = s.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    let started = Instant::now();
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(n, 0);
    within(started.elapsed(), 800, 2500, "an idle keep-alive connection");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_cap_full_of_silent_clients_still_serves() {
    let a = Backend::http("a", Behavior::Status(200)).await;
    let p = proxy(
        &[a.addr],
        "HTTP",
        "  timeouts: {requestHeader: 2s}\n  limits: {maxConnections: 20}",
        1,
    )
    .await;
    let mut silent = Vec::new();
    for _ in 0..40 {
        silent.push(TcpStream::connect(p.listen).await.unwrap());
    }
    let started = Instant::now();
    let (got, _) = until_closed(p.listen, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
    assert_eq!(status_of(&got), "200", "{got}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "served after {:?}; requestHeader + 1 s is 3 s",
        started.elapsed()
    );
    let (_, metrics) = balanced::demo::backend::http_get(p.admin, "/metrics").await.unwrap();
    assert!(
        metrics.contains("balanced_downstream_connections_closed_total{service=\"default/web\",listener=\"main\",reason=\"maxConnections\"}"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_body_is_closed_at_request_body() {
    let a = Backend::http("a", Behavior::Status(200)).await;
    let p = proxy(&[a.addr], "HTTP", "  timeouts: {requestBody: 400ms}", 1).await;
    let (got, took) = until_closed(
        p.listen,
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n0123456789",
    )
    .await;
    assert_eq!(status_of(&got), "408", "{got}");
    within(took, 300, 2000, "a stalled body");
    let (got, took) = until_closed(
        p.listen,
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\na\r\n0123456789\r\n",
    )
    .await;
    assert_eq!(status_of(&got), "408", "{got}");
    within(took, 300, 2000, "a stalled chunked body");
    // A streamed body (past retry.maxBodyBytes) that stalls: 408 too, and the
    // endpoint is not blamed.
    let mut head = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 200000\r\n\r\n".to_vec();
    head.extend(std::iter::repeat_n(b'x', 100_000));
    let (got, _) = until_closed(p.listen, &head).await;
    assert_eq!(status_of(&got), "408", "{got}");
    let (_, status) = balanced::demo::backend::http_get(p.admin, "/status").await.unwrap();
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["services"][0]["endpoints"][0]["ejected"], false, "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_longer_than_the_response_timeout_succeeds() {
    let a = Backend::http("a", Behavior::Status(200)).await;
    let p = proxy(&[a.addr], "HTTP", "  timeouts: {response: 300ms}", 1).await;
    let mut s = TcpStream::connect(p.listen).await.unwrap();
    let total = 20 * 1024 * 1024;
    s.write_all(
        format!("POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: {total}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let chunk = vec![b'u'; 512 * 1024];
    let started = Instant::now();
    for _ in 0..40 {
        s.write_all(&chunk).await.unwrap();
        // On purpose: the client uploads at a limited rate (20 MB in ~1 s).
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut answer))
        .await
        .unwrap()
        .unwrap();
    assert!(
        started.elapsed() > Duration::from_millis(900),
        "the upload was meant to be slow"
    );
    assert_eq!(status_of(&answer), "200", "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_header_rules_follow_rfc_9112() {
    let a = Backend::http("a", Behavior::Status(200)).await;
    let p = proxy(&[a.addr], "HTTP", "", 1).await;
    let (got, _) = until_closed(
        p.listen,
        b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&got), "400", "{got}");
    assert!(got.contains("more than one Host header"), "{got}");
    let (got, _) = until_closed(p.listen, b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n").await;
    assert_eq!(status_of(&got), "400", "{got}");
    assert!(got.contains("without a Host header"), "{got}");
    let (got, _) = until_closed(p.listen, b"GET / HTTP/1.0\r\n\r\n").await;
    assert_eq!(status_of(&got), "200", "HTTP/1.0 needs no Host: {got}");
    let (got, _) = until_closed(
        p.listen,
        b"GET http://shop.example.com/ HTTP/1.1\r\nHost: other\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&got), "200", "absolute form stands for Host: {got}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_and_uri_limits_hold_on_http1_and_http2() {
    let a = Backend::http("a", Behavior::Status(200)).await;
    let p = proxy(&[a.addr], "HTTP", "", 1).await;
    let big = "a".repeat(17 * 1024);
    let (got, _) = until_closed(
        p.listen,
        format!("GET / HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await;
    assert_eq!(status_of(&got), "431", "17 KiB of headers on HTTP/1: {got}");

    let (got, _) = until_closed(
        p.listen,
        format!("GET /{} HTTP/1.1\r\nHost: x\r\n\r\n", "u".repeat(1 << 20)).as_bytes(),
    )
    .await;
    assert_eq!(status_of(&got), "414", "a 1 MB URI: {got}");
    let (got, _) = until_closed(
        p.listen,
        format!(
            "GET /{} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            "u".repeat(9000)
        )
        .as_bytes(),
    )
    .await;
    assert_eq!(status_of(&got), "414", "a 9 KB URI (limit 8 KiB): {got}");

    let stream = TcpStream::connect(p.listen).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = http::Request::get(format!("http://{}/", p.listen))
        .header("x-big", big.as_str())
        .body(Full::new(Bytes::new()))
        .unwrap();
    let status = sender.send_request(req).await.map(|r| r.status().as_u16());
    assert_eq!(status.ok(), Some(431), "17 KiB of headers on HTTP/2");
    let req = http::Request::get(format!("http://{}/{}", p.listen, "u".repeat(9000)))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status().as_u16(), 414, "a 9 KB URI on HTTP/2");
    let _ = resp.into_body().collect().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_tcp_connection_is_closed_at_its_idle_timeout() {
    let echo = Backend::tcp_echo("echo").await;
    let p = proxy(&[echo.addr], "TCP", "  timeouts: {idle: 500ms}", 1).await;
    let mut s = TcpStream::connect(p.listen).await.unwrap();
    let mut buf = [0u8; 16];
    // Traffic keeps it open past the idle timeout...
    let mut last = Instant::now();
    for _ in 0..4 {
        // On purpose: the client pauses half the idle timeout between pings.
        tokio::time::sleep(Duration::from_millis(250)).await;
        s.write_all(b"ping").await.unwrap();
        s.read_exact(&mut buf[..4]).await.unwrap();
        last = Instant::now();
    }
    // ...silence closes it.
    let started = last;
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .unwrap();
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    within(started.elapsed(), 400, 2000, "an idle TCP connection");
}

fn log_lines(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_access_log_says_what_happened() {
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let log = dir.join(format!("access-{}.log", std::process::id()));
    let _ = std::fs::remove_file(&log);
    let good = Backend::http("good", Behavior::Status(200)).await;
    let slow = Backend::http("slow", Behavior::Slow(Duration::from_secs(3))).await;
    let dead = refusing_addr().await;
    // Probes go to the good backend's port for every endpoint, so the dead
    // one stays in rotation until a request finds it out.
    let extra = format!(
        "  algorithm: RoundRobin\n  healthCheck: {{protocol: TCP, interval: 200ms, timeout: 100ms, rise: 1, fall: 2, port: {}}}\n  retry: {{on: [Error], tries: 2}}",
        good.addr.port()
    );
    let p = proxy_with(&[dead, good.addr], "HTTP", &extra, 2, Some(&log)).await;
    let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    for _ in 0..2 {
        let resp = client
            .request(
                http::Request::get(format!("http://{}/ok?x=1", p.listen))
                    .body(Full::new(Bytes::new()))
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 200);
        let _ = resp.into_body().collect().await;
    }
    let lines = eventually(Duration::from_secs(3), "two access-log lines", || async {
        let l = log_lines(&log);
        (l.len() >= 2).then_some(l)
    })
    .await;
    let retried = lines
        .iter()
        .find(|l| l["attempts"] == 2)
        .unwrap_or_else(|| panic!("no retried request in {lines:#?}"));
    assert_eq!(retried["status"], 200);
    assert_eq!(retried["flags"], "-", "a retry that succeeded exhausted nothing");
    assert_eq!(retried["upstream"], good.addr.to_string());
    assert_eq!(retried["method"], "GET");
    assert_eq!(retried["path"], "/ok?x=1");
    assert_eq!(retried["protocol"], "HTTP/1.1");
    assert!(retried["bytes_out"].as_u64().unwrap() > 0);
    let plain = lines.iter().find(|l| l["attempts"] == 1).expect("a first-try success");
    assert_eq!(plain["flags"], "-");
    assert_eq!(plain["service"], "default/web");
    assert_eq!(plain["listener"], "main");
    drop(p);

    // No endpoint passes its checks: UH (and the last-resort try's UF).
    let log2 = dir.join(format!("access-uh-{}.log", std::process::id()));
    let _ = std::fs::remove_file(&log2);
    let p = proxy_with(&[dead], "HTTP", "", 0, Some(&log2)).await;
    eventually(Duration::from_secs(3), "the dead endpoint marked down", || async {
        let (_, body) = balanced::demo::backend::http_get(p.admin, "/status").await.ok()?;
        body.contains("\"Unhealthy\"").then_some(())
    })
    .await;
    let (status, _) = balanced::demo::backend::http_get(p.listen, "/").await.unwrap();
    assert_eq!(status, 502);
    let line = eventually(Duration::from_secs(3), "the UH line", || async {
        log_lines(&log2).pop()
    })
    .await;
    assert_eq!(line["flags"], "UH,UF", "{line}");
    drop(p);

    // The endpoint does not answer in time: UT.
    let log3 = dir.join(format!("access-ut-{}.log", std::process::id()));
    let _ = std::fs::remove_file(&log3);
    let p = proxy_with(&[slow.addr], "HTTP", "  timeouts: {response: 200ms}", 1, Some(&log3)).await;
    let (status, _) = balanced::demo::backend::http_get(p.listen, "/").await.unwrap();
    assert_eq!(status, 504);
    let line = eventually(Duration::from_secs(3), "the UT line", || async {
        log_lines(&log3).pop()
    })
    .await;
    assert_eq!(line["flags"], "UT", "{line}");
    assert_eq!(line["status"], 504);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beyond_max_requests_and_its_queue_requests_get_503_at_once() {
    let slow = Backend::http("slow", Behavior::Slow(Duration::from_millis(1500))).await;
    let p = proxy(
        &[slow.addr],
        "HTTP",
        "  limits: {maxRequests: 2, maxPendingRequests: 1}\n  timeouts: {connect: 3s, response: 10s}",
        1,
    )
    .await;
    let get = move || tokio::spawn(async move { balanced::demo::backend::http_get(p.listen, "/").await });
    // Two in flight, one waiting for a slot.
    let in_flight = [get(), get()];
    eventually(Duration::from_secs(2), "two requests in flight", || async {
        let (_, status) = balanced::demo::backend::http_get(p.admin, "/status").await.ok()?;
        status.contains("\"activeConnections\": 2").then_some(())
    })
    .await;
    let queued = get();
    eventually(Duration::from_secs(2), "one request waiting for a slot", || async {
        let (_, status) = balanced::demo::backend::http_get(p.admin, "/status").await.ok()?;
        status.contains("\"requestsWaiting\": 1").then_some(())
    })
    .await;
    // One more: the queue is full, 503 at once, while the others still run.
    let (code, body) = balanced::demo::backend::http_get(p.listen, "/").await.unwrap();
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("spec.limits.maxRequests"), "{body}");
    assert!(
        in_flight.iter().all(|t| !t.is_finished()),
        "the 503 came only after the in-flight requests ended"
    );
    for t in in_flight {
        assert_eq!(t.await.unwrap().unwrap().0, 200, "in-flight requests finish");
    }
    assert_eq!(
        queued.await.unwrap().unwrap().0,
        200,
        "the queued request got the freed slot"
    );
    let (_, metrics) = balanced::demo::backend::http_get(p.admin, "/metrics").await.unwrap();
    let overflow = metrics
        .lines()
        .find(|l| l.starts_with("balanced_overflow_total{"))
        .unwrap_or_else(|| panic!("no balanced_overflow_total in\n{metrics}"));
    assert!(!overflow.ends_with(" 0"), "{overflow}");
}

type TestClient = hyper_util::client::legacy::Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

/// `method /` through `proxy`: the status, the body, and how long it took.
async fn timed(client: &TestClient, method: &'static str, proxy: SocketAddr) -> (u16, String, Duration) {
    let started = std::time::Instant::now();
    let request = http::Request::builder()
        .method(method)
        .uri(format!("http://{proxy}/"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = client.request(request).await.unwrap();
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned(), started.elapsed())
}

/// One of two endpoints frozen (accepts, never answers), `response: 2s`,
/// `perTryTimeout: 200ms`: with `hedge` a GET stuck on it is sent to the
/// other one too and answered from there, flagged `HG`, long before 2 s; a
/// POST is not hedged (it would run twice) and waits out the response
/// timeout. Without `hedge` the stuck attempt is abandoned at 200 ms and
/// retried instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_stuck_on_a_frozen_endpoint_is_hedged_after_the_per_try_timeout() {
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let log = dir.join(format!("access-hedge-{}.log", std::process::id()));
    let _ = std::fs::remove_file(&log);
    let good = Backend::http("good", Behavior::Status(200)).await;
    let frozen = Backend::http("frozen", Behavior::Status(200)).await;
    frozen.freeze();
    // Probes go to the good backend's port, and nothing ejects: the frozen
    // endpoint stays in rotation, as a hung process passing its checks would.
    let base = format!(
        "  algorithm: RoundRobin\n  passiveHealth: {{maxFails: 0}}\n  healthCheck: {{protocol: TCP, interval: 200ms, timeout: 100ms, rise: 1, port: {}}}\n  timeouts: {{connect: 1s, response: 2s}}",
        good.addr.port()
    );
    let hedged = format!("{base}\n  retry: {{perTryTimeout: 200ms, hedge: true}}");
    let p = proxy_with(&[frozen.addr, good.addr], "HTTP", &hedged, 2, Some(&log)).await;
    let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let send = |method: &'static str| timed(&client, method, p.listen);
    for _ in 0..4 {
        let (status, body, took) = send("GET").await;
        assert_eq!((status, body.as_str()), (200, "good"));
        assert!(took < Duration::from_millis(1500), "waited {took:?}, as if not hedged");
    }
    let lines = eventually(Duration::from_secs(3), "four access-log lines", || async {
        let l = log_lines(&log);
        (l.len() >= 4).then_some(l)
    })
    .await;
    let hedges: Vec<_> = lines.iter().filter(|l| l["flags"] == "HG").collect();
    assert!(!hedges.is_empty(), "no hedged request in {lines:#?}");
    for h in &hedges {
        assert_eq!(h["upstream"], good.addr.to_string(), "{h}");
        assert_eq!(h["attempts"], 2, "{h}");
        assert_eq!(h["status"], 200, "{h}");
    }
    let (_, metrics) = balanced::demo::backend::http_get(p.admin, "/metrics").await.unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("balanced_upstream_retries_total") && l.contains("reason=\"Hedge\"")),
        "hedges are counted as retries"
    );

    // A POST is not hedged: the one that lands on the frozen endpoint waits
    // out `response: 2s` (the rules retry no POST after sending).
    let mut posts = Vec::new();
    for _ in 0..2 {
        posts.push(send("POST").await);
    }
    let stuck = posts
        .iter()
        .find(|(s, _, _)| *s == 504)
        .unwrap_or_else(|| panic!("a POST on the frozen endpoint: {posts:?}"));
    assert!(stuck.2 >= Duration::from_secs(2), "{stuck:?}");
    drop(p);

    // perTryTimeout alone: the stuck attempt is given up at 200 ms and retried.
    let plain = format!("{base}\n  retry: {{perTryTimeout: 200ms}}");
    let p = proxy_with(&[frozen.addr, good.addr], "HTTP", &plain, 2, None).await;
    for _ in 0..4 {
        let (status, _, took) = timed(&client, "GET", p.listen).await;
        assert_eq!(status, 200);
        assert!(took < Duration::from_millis(1500), "waited {took:?}");
    }
    frozen.thaw();
}
