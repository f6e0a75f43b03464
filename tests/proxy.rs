//! The data plane end to end: real backends, the real proxy (standalone), real
//! HTTP/1.1, h2c, WebSocket and TCP clients.

mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use balanced::demo::backend::{Backend, Behavior, http_get};
use balanced::testing::{eventually, free_port, refusing_addr};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::standalone::proxy;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// Sends one request; returns status, the answering backend (x-backend) and body.
async fn send(client: &HttpClient, method: &str, addr: SocketAddr, body: &str) -> (u16, String, String) {
    let req = http::Request::builder()
        .method(method)
        .uri(format!("http://{addr}/work"))
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    let resp = client.request(req).await.expect("the proxy answers");
    let status = resp.status().as_u16();
    let backend = resp
        .headers()
        .get("x-backend")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, backend, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_backend_costs_clients_nothing() {
    let a = Backend::http("a", Behavior::Status(200)).await;
    let b = Backend::http("b", Behavior::Status(200)).await;
    let c = Backend::http("c", Behavior::Status(200)).await;
    let p = proxy(
        &[a.addr, b.addr, c.addr],
        "HTTP",
        "  retry: {on: [Error, Timeout], tries: 3}",
        3,
    )
    .await;

    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for _ in 0..8 {
        let (stop, listen, client) = (stop.clone(), p.listen, client());
        workers.push(tokio::spawn(async move {
            let mut seen: HashMap<u16, usize> = HashMap::new();
            while !stop.load(Ordering::Relaxed) {
                let (status, _, _) = send(&client, "GET", listen, "").await;
                *seen.entry(status).or_default() += 1;
            }
            seen
        }));
    }
    // The scenario's timeline: traffic before the kill, then long enough
    // after it for probes (fall 2) to take b out.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    b.kill();
    tokio::time::sleep(Duration::from_millis(2000)).await;
    stop.store(true, Ordering::Relaxed);
    let mut total: HashMap<u16, usize> = HashMap::new();
    for w in workers {
        for (status, n) in w.await.unwrap() {
            *total.entry(status).or_default() += n;
        }
    }
    let all: usize = total.values().sum();
    // Not a speed check: enough requests that some met the kill.
    assert!(all >= 100, "only {all} requests: {total:?}");
    assert_eq!(total.get(&200), Some(&all), "clients saw errors: {total:?}");
    let (_, status) = http_get(p.admin, "/status").await.unwrap();
    assert!(status.contains("\"Unhealthy\""), "{status}");
}

#[tokio::test]
async fn a_502_is_retried_only_when_http502_is_in_retry_on() {
    let bad = Backend::http("bad", Behavior::Status(502)).await;
    let good = Backend::http("good", Behavior::Status(200)).await;
    let retrying = proxy(
        &[bad.addr, good.addr],
        "HTTP",
        "  algorithm: RoundRobin\n  retry: {on: [Error, Http502]}",
        2,
    )
    .await;
    let not = proxy(
        &[bad.addr, good.addr],
        "HTTP",
        "  algorithm: RoundRobin\n  retry: {on: [Error]}",
        2,
    )
    .await;
    let c = client();
    let mut statuses = Vec::new();
    for _ in 0..4 {
        let (s, backend, _) = send(&c, "GET", retrying.listen, "").await;
        assert_eq!((s, backend.as_str()), (200, "good"));
        statuses.push(send(&c, "GET", not.listen, "").await.0);
    }
    assert!(
        statuses.contains(&502),
        "without Http502 the 502 reaches the client: {statuses:?}"
    );
    assert!(statuses.contains(&200));
}

#[tokio::test]
async fn post_is_not_retried_after_send_unless_non_idempotent() {
    let dropper = Backend::drop_after_request().await;
    let good = Backend::http("good", Behavior::Status(200)).await;
    let extra = "  algorithm: RoundRobin\n  passiveHealth: {maxFails: 0}\n  retry: {on: [Error]}";
    let p = proxy(&[dropper.addr, good.addr], "HTTP", extra, 2).await;
    let c = client();
    let mut posts = Vec::new();
    let mut gets = Vec::new();
    for _ in 0..4 {
        posts.push(send(&c, "POST", p.listen, "order=1").await.0);
        gets.push(send(&c, "GET", p.listen, "").await.0);
    }
    assert!(
        posts.contains(&502),
        "a POST that reached the dropping backend must not be resent: {posts:?}"
    );
    assert!(gets.iter().all(|s| *s == 200), "GETs are retried: {gets:?}");

    let with = extra.replace("on: [Error]", "on: [Error, NonIdempotent]");
    let p = proxy(&[dropper.addr, good.addr], "HTTP", &with, 2).await;
    for _ in 0..4 {
        assert_eq!(send(&c, "POST", p.listen, "order=1").await.0, 200);
    }
}

#[tokio::test]
async fn a_hanging_backend_gives_504_or_a_retry_on_timeout() {
    let hang = Backend::hang().await;
    let good = Backend::http("good", Behavior::Status(200)).await;
    let base = "  algorithm: RoundRobin\n  passiveHealth: {maxFails: 0}\n  timeouts: {connect: 1s, response: 300ms}";
    let p = proxy(
        &[hang.addr, good.addr],
        "HTTP",
        &format!("{base}\n  retry: {{on: [Error]}}"),
        2,
    )
    .await;
    let c = client();
    let mut seen = Vec::new();
    for _ in 0..2 {
        let started = std::time::Instant::now();
        let (status, _, body) = send(&c, "GET", p.listen, "").await;
        if status == 504 {
            assert!(started.elapsed() >= Duration::from_millis(300));
            assert!(body.starts_with("504 Gateway Timeout: upstream timed out"), "{body}");
            assert!(
                !body.contains("127.0.0.1"),
                "internal addresses leak without debug: {body}"
            );
        }
        seen.push(status);
    }
    assert!(seen.contains(&504), "{seen:?}");

    let p = proxy(
        &[hang.addr, good.addr],
        "HTTP",
        &format!("{base}\n  retry: {{on: [Error, Timeout]}}"),
        2,
    )
    .await;
    for _ in 0..2 {
        assert_eq!(send(&c, "GET", p.listen, "").await.0, 200);
    }
}

async fn slow_share(algorithm: &str) -> f64 {
    let slow = Backend::http("slow", Behavior::Slow(Duration::from_millis(100))).await;
    let f1 = Backend::http("fast1", Behavior::Slow(Duration::from_millis(5))).await;
    let f2 = Backend::http("fast2", Behavior::Slow(Duration::from_millis(5))).await;
    let p = proxy(
        &[slow.addr, f1.addr, f2.addr],
        "HTTP",
        &format!("  algorithm: {algorithm}"),
        3,
    )
    .await;
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for _ in 0..6 {
        let (stop, listen, client) = (stop.clone(), p.listen, client());
        workers.push(tokio::spawn(async move {
            let mut counts: HashMap<String, usize> = HashMap::new();
            while !stop.load(Ordering::Relaxed) {
                let (_, backend, _) = send(&client, "GET", listen, "").await;
                *counts.entry(backend).or_default() += 1;
            }
            counts
        }));
    }
    // The measuring window: how the algorithm shares 1.5 s of traffic.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::Relaxed);
    let mut counts: HashMap<String, usize> = HashMap::new();
    for w in workers {
        for (k, v) in w.await.unwrap() {
            *counts.entry(k).or_default() += v;
        }
    }
    let total: usize = counts.values().sum();
    counts.get("slow").copied().unwrap_or(0) as f64 / total as f64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_connections_sends_the_slow_backend_fewer_requests_than_round_robin() {
    let rr = slow_share("RoundRobin").await;
    let lc = slow_share("LeastConnections").await;
    assert!(
        lc * 2.0 < rr,
        "slow backend share: least connections {lc:.3}, round robin {rr:.3}"
    );
}

#[tokio::test]
async fn websocket_upgrade_is_tunnelled() {
    let ws = Backend::http("ws", Behavior::Status(200)).await;
    let p = proxy(&[ws.addr], "HTTP", "", 1).await;
    let mut s = TcpStream::connect(p.listen).await.unwrap();
    s.write_all(
        b"GET /chat HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    .await
    .unwrap();
    let head = support::read_head(&mut s).await;
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: websocket"), "{head}");
    for msg in [&b"hello"[..], b"over the tunnel"] {
        s.write_all(msg).await.unwrap();
        let mut back = vec![0u8; msg.len()];
        tokio::time::timeout(Duration::from_secs(2), s.read_exact(&mut back))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(back, msg);
    }
}

#[tokio::test]
async fn tcp_mode_echoes_and_fails_over_on_connect_refusal() {
    let echo = Backend::tcp_echo("echo").await;
    let refused = refusing_addr().await;
    // Probes of both endpoints go to the echo port, so the refusing endpoint
    // looks healthy and only the connect itself fails.
    let extra = format!(
        "  algorithm: RoundRobin\n  passiveHealth: {{maxFails: 0}}\n  retry: {{tries: 2}}\n  healthCheck: {{interval: 200ms, timeout: 100ms, rise: 1, port: {}}}",
        echo.addr.port()
    );
    let p = proxy(&[refused, echo.addr], "TCP", &extra, 2).await;
    for i in 0..4 {
        let mut s = TcpStream::connect(p.listen).await.unwrap();
        let msg = format!("ping {i}");
        s.write_all(msg.as_bytes()).await.unwrap();
        s.shutdown().await.unwrap();
        let mut back = String::new();
        tokio::time::timeout(Duration::from_secs(2), s.read_to_string(&mut back))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(back, msg, "half-close: the echo arrives after our FIN");
    }
}

#[tokio::test]
async fn endpoint_header_and_error_detail_are_opt_in() {
    let a = Backend::http("a", Behavior::Status(200)).await;
    let down = refusing_addr().await;
    let p = proxy(&[a.addr], "HTTP", "  debug: {endpointHeader: true}", 1).await;
    let resp = client()
        .request(
            http::Request::get(format!("http://{}/", p.listen))
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.headers()["x-balanced-endpoint"], a.addr.to_string());

    let p = proxy(&[down], "HTTP", "  debug: {errorDetail: true}\n  retry: {tries: 1}", 0).await;
    let (status, _, body) = send(&client(), "GET", p.listen, "").await;
    assert_eq!(status, 502);
    assert!(
        body.contains(&down.to_string()) && body.contains("connection refused"),
        "{body}"
    );
}

#[tokio::test]
async fn status_and_metrics_show_ejections_and_retries() {
    let dropper = Backend::drop_after_request().await;
    let good = Backend::http("good", Behavior::Status(200)).await;
    let extra = "  algorithm: RoundRobin\n  passiveHealth: {maxFails: 1, failTimeout: 30s}";
    let p = proxy(&[dropper.addr, good.addr], "HTTP", extra, 2).await;
    for _ in 0..3 {
        assert_eq!(send(&client(), "GET", p.listen, "").await.0, 200);
    }
    let (_, status) = http_get(p.admin, "/status").await.unwrap();
    let v: serde_json::Value = serde_json::from_str(&status).unwrap();
    let eps = v["services"][0]["endpoints"].as_array().unwrap();
    let d = eps.iter().find(|e| e["port"] == dropper.addr.port()).unwrap();
    assert_eq!(d["ejected"], true, "{status}");
    assert_eq!(d["state"], "Healthy", "ejection is separate from probe health");
    let (_, metrics) = http_get(p.admin, "/metrics").await.unwrap();
    assert!(metrics.contains("balanced_endpoint_ejections_total{"), "{metrics}");
    assert!(
        metrics.contains("balanced_upstream_retries_total{service=\"default/web\",reason=\"Error\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("code=\"error\"} 1"), "{metrics}");
}

// ---- data plane v2: protocols, start-up order, hangs, one attempt loop ----

/// An echo server that speaks only HTTP/1.1 (`h2: false`) or only HTTP/2 with
/// prior knowledge (`h2: true`). The h2 one answers 400 to a request that
/// carries `Host` beside `:authority`, as nginx does ("client sent duplicate
/// host header"). Answers `VERSION host=HOST authority=AUTHORITY body=BODY`.
async fn echo_server(h2: bool) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|req: http::Request<hyper::body::Incoming>| async move {
                    let version = req.version();
                    let host = req.headers().get("host").map(|h| h.to_str().unwrap().to_string());
                    let authority = req.uri().authority().map(|a| a.to_string());
                    let body = req.into_body().collect().await.unwrap().to_bytes();
                    let (status, text) = if version == http::Version::HTTP_2 && host.is_some() {
                        (400, "client sent duplicate host header".to_string())
                    } else {
                        (
                            200,
                            format!(
                                "{version:?} host={} authority={} body={}",
                                host.unwrap_or_default(),
                                authority.unwrap_or_default(),
                                String::from_utf8_lossy(&body)
                            ),
                        )
                    };
                    Ok::<_, std::convert::Infallible>(
                        http::Response::builder()
                            .status(status)
                            .body(Full::new(Bytes::from(text)))
                            .unwrap(),
                    )
                });
                let io = TokioIo::new(stream);
                if h2 {
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(io, service)
                        .await;
                } else {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, service)
                        .await;
                }
            });
        }
    });
    addr
}

/// An h2c (prior knowledge) client on one connection.
async fn h2_client(addr: SocketAddr) -> hyper::client::conn::http2::SendRequest<Full<Bytes>> {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    sender
}

async fn body_text(resp: http::Response<hyper::body::Incoming>) -> String {
    String::from_utf8_lossy(&resp.into_body().collect().await.unwrap().to_bytes()).into_owned()
}

/// A client's RST_STREAM while its endpoint is still working ends the
/// request at the endpoint too (its connection closes), long before
/// `timeouts.response` (60 s): nothing waits for an answer nobody will read.
#[tokio::test]
async fn an_h2_client_that_resets_its_stream_cancels_the_request_at_the_endpoint() {
    // An HTTP/1.1 endpoint that reads a request head and never answers; it
    // says when it holds one and when that connection closes.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = listener.local_addr().unwrap();
    let (events, mut seen) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let events = events.clone();
            tokio::spawn(async move {
                let (mut buf, mut head, mut held) = (vec![0; 4096], Vec::new(), false);
                while let Ok(n @ 1..) = s.read(&mut buf).await {
                    head.extend_from_slice(&buf[..n]);
                    if !held && head.windows(4).any(|w| w == b"\r\n\r\n") {
                        held = true;
                        let _ = events.send("held");
                    }
                }
                if held {
                    let _ = events.send("closed");
                }
            });
        }
    });
    let p = proxy(&[backend], "HTTP", "", 1).await;
    let (client, conn) = h2::client::handshake(TcpStream::connect(p.listen).await.unwrap())
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut client = client.ready().await.unwrap();
    let req = http::Request::get(format!("http://{}/hold", p.listen))
        .body(())
        .unwrap();
    let (_response, mut stream) = client.send_request(req, true).unwrap();
    let mut next = async || {
        tokio::time::timeout(Duration::from_secs(10), seen.recv())
            .await
            .expect("the endpoint reports within 10 s")
    };
    assert_eq!(next().await, Some("held"));
    stream.send_reset(h2::Reason::CANCEL);
    assert_eq!(
        next().await,
        Some("closed"),
        "the endpoint's request ends with the client's stream"
    );
}

#[tokio::test]
async fn an_h2_client_is_answered_by_an_http1_only_backend() {
    let backend = echo_server(false).await;
    let p = proxy(&[backend], "HTTP", "", 1).await;
    let mut h2 = h2_client(p.listen).await;
    let req = http::Request::post("http://shop.example/orders?id=7")
        .body(Full::new(Bytes::from_static(b"payload-1234")))
        .unwrap();
    let resp = h2.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.version(), http::Version::HTTP_2, "the client keeps its protocol");
    assert_eq!(
        body_text(resp).await,
        "HTTP/1.1 host=shop.example authority= body=payload-1234",
        "translated to HTTP/1.1 with Host from :authority, body intact"
    );
}

#[tokio::test]
async fn an_http1_client_is_answered_by_an_h2c_only_backend_that_checks_authority() {
    let backend = echo_server(true).await;
    let p = proxy(&[backend], "HTTP, appProtocol: kubernetes.io/h2c", "", 1).await;
    let req = http::Request::post(format!("http://{}/orders", p.listen))
        .header("host", "shop.example:8080")
        .body(Full::new(Bytes::from_static(b"payload-5678")))
        .unwrap();
    let resp = client().request(req).await.unwrap();
    let status = resp.status();
    let text = String::from_utf8_lossy(&resp.into_body().collect().await.unwrap().to_bytes()).into_owned();
    assert_eq!(status, 200, "{text}");
    assert_eq!(text, "HTTP/2.0 host= authority=shop.example:8080 body=payload-5678");
    // An h2 client's authority is kept as :authority too.
    let mut h2 = h2_client(p.listen).await;
    let resp = h2
        .send_request(
            http::Request::get("http://api.example/x")
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(body_text(resp).await, "HTTP/2.0 host= authority=api.example body=");
}

#[tokio::test]
async fn grpc_goes_over_h2c_per_request_while_plain_h2_requests_use_http1() {
    let backends = [
        Backend::http("a", Behavior::Status(200)).await,
        Backend::http("b", Behavior::Status(200)).await,
        Backend::http("c", Behavior::Status(200)).await,
    ];
    let addrs: Vec<_> = backends.iter().map(|b| b.addr).collect();
    let p = proxy(&addrs, "HTTP", "", 3).await;
    let h2 = h2_client(p.listen).await;
    let mut seen: HashMap<String, usize> = HashMap::new();
    for _ in 0..30 {
        let req = http::Request::post(format!("http://{}/pkg.Svc/Call", p.listen))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = h2.clone().send_request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.version(), http::Version::HTTP_2);
        assert_eq!(resp.headers()["x-version"], "HTTP/2.0", "gRPC needs HTTP/2 upstream");
        *seen
            .entry(resp.headers()["x-backend"].to_str().unwrap().into())
            .or_default() += 1;
    }
    assert_eq!(seen.len(), 3, "one client connection, every backend: {seen:?}");
    let resp = h2
        .clone()
        .send_request(
            http::Request::get(format!("http://{}/", p.listen))
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(
        resp.headers()["x-version"],
        "HTTP/1.1",
        "unset appProtocol means HTTP/1.1"
    );
}

/// Runs `clients` loops of GETs until `stop`; returns every status seen.
/// `done` counts answered requests, so a test can wait for traffic, not time.
fn load(
    listen: SocketAddr,
    clients: usize,
    stop: Arc<AtomicBool>,
    done: Arc<std::sync::atomic::AtomicUsize>,
) -> Vec<tokio::task::JoinHandle<HashMap<u16, usize>>> {
    (0..clients)
        .map(|_| {
            let (stop, done, c) = (stop.clone(), done.clone(), client());
            tokio::spawn(async move {
                let mut seen: HashMap<u16, usize> = HashMap::new();
                while !stop.load(Ordering::Relaxed) {
                    *seen.entry(send(&c, "GET", listen, "").await.0).or_default() += 1;
                    done.fetch_add(1, Ordering::Relaxed);
                }
                seen
            })
        })
        .collect()
}

/// Waits until `n` more requests than now have been answered.
async fn more_requests(done: &std::sync::atomic::AtomicUsize, n: usize) {
    let target = done.load(Ordering::Relaxed) + n;
    eventually(
        Duration::from_secs(10),
        &format!("{n} more answered requests"),
        || async move { (done.load(Ordering::Relaxed) >= target).then_some(()) },
    )
    .await;
}

async fn totals(workers: Vec<tokio::task::JoinHandle<HashMap<u16, usize>>>) -> HashMap<u16, usize> {
    let mut total: HashMap<u16, usize> = HashMap::new();
    for w in workers {
        for (status, n) in w.await.unwrap() {
            *total.entry(status).or_default() += n;
        }
    }
    total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_started_before_its_backends_uses_them_all_within_one_interval() {
    let addrs: Vec<SocketAddr> = (0..3)
        .map(|_| SocketAddr::from(([127, 0, 0, 1], free_port())))
        .collect();
    let extra = "  healthCheck: {protocol: TCP, interval: 500ms, timeout: 200ms, rise: 1, fall: 2}";
    let p = proxy(&addrs, "HTTP", extra, 0).await;
    // Clients arrive first: every endpoint fails to connect and is ejected.
    let c = client();
    for _ in 0..3 {
        assert_eq!(send(&c, "GET", p.listen, "").await.0, 502);
    }
    let started = std::time::Instant::now();
    let backends = [
        Backend::http_at("a", Behavior::Status(200), addrs[0]).await,
        Backend::http_at("b", Behavior::Status(200), addrs[1]).await,
        Backend::http_at("c", Behavior::Status(200), addrs[2]).await,
    ];
    let seen = std::sync::Mutex::new(std::collections::HashSet::new());
    eventually(Duration::from_millis(1500), "every backend to get traffic", || {
        let (c, seen) = (&c, &seen);
        async move {
            let (status, backend, _) = send(c, "GET", p.listen, "").await;
            let mut seen = seen.lock().unwrap();
            if status == 200 {
                seen.insert(backend);
            }
            (seen.len() == 3).then_some(())
        }
    })
    .await;
    let seen = seen.into_inner().unwrap();
    let took = started.elapsed();
    assert_eq!(seen.len(), 3, "backends serving after {took:?}: {seen:?}");
    assert!(
        took < Duration::from_millis(500 + 500),
        "all three served {took:?} after they started; the probe interval is 500ms"
    );
    // Now a kill costs nothing: the others are not stuck in a stale ejection.
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let workers = load(p.listen, 8, stop.clone(), done.clone());
    more_requests(&done, 300).await;
    backends[0].kill();
    more_requests(&done, 1500).await;
    stop.store(true, Ordering::Relaxed);
    let total = totals(workers).await;
    let all: usize = total.values().sum();
    assert_eq!(total.get(&200), Some(&all), "clients saw errors: {total:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_backend_costs_no_answers_when_timeouts_are_retried() {
    let backends = [
        Backend::http("a", Behavior::Status(200)).await,
        Backend::http("b", Behavior::Status(200)).await,
        Backend::http("c", Behavior::Status(200)).await,
    ];
    let addrs: Vec<_> = backends.iter().map(|b| b.addr).collect();
    let extra = "  healthCheck: {protocol: HTTP, interval: 200ms, timeout: 100ms, rise: 1, fall: 2, http: {path: /}}\n  timeouts: {connect: 1s, response: 300ms}\n  retry: {on: [Error, Timeout], tries: 3}";
    let p = proxy(&addrs, "HTTP", extra, 3).await;
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let workers = load(p.listen, 16, stop.clone(), done.clone());
    more_requests(&done, 300).await;
    // SIGSTOP, in effect: connections accepted, no answers. Requests stuck on it
    // time out together, and every one of them must be retried.
    backends[1].freeze();
    let admin = p.admin;
    eventually(
        Duration::from_secs(5),
        "requests on the frozen backend to time out and be retried",
        || async move {
            let (_, metrics) = http_get(admin, "/metrics").await.ok()?;
            let retried = metric_sum(&metrics, "balanced_upstream_retries_total", "reason=\"Timeout\"");
            (retried >= 3.0).then_some(())
        },
    )
    .await;
    more_requests(&done, 500).await;
    stop.store(true, Ordering::Relaxed);
    backends[1].thaw();
    let total = totals(workers).await;
    let all: usize = total.values().sum();
    assert_eq!(total.get(&200), Some(&all), "clients saw errors: {total:?}");
}

fn metric_sum(metrics: &str, name: &str, label: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(name) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn tcp_connect_failover_obeys_tries_and_the_retry_budget() {
    let refused = [refusing_addr().await, refusing_addr().await, refusing_addr().await];
    let extra = "  passiveHealth: {maxFails: 0}\n  retry: {tries: 2, budget: {percent: 0, minRetryRate: {count: 1, interval: 10s}}}";
    let p = proxy(&refused, "TCP", extra, 0).await;
    for _ in 0..2 {
        let mut s = TcpStream::connect(p.listen).await.unwrap();
        let mut buf = Vec::new();
        // No endpoint: the proxy closes the client connection.
        tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut buf))
            .await
            .expect("closed")
            .ok();
    }
    let (_, metrics) = http_get(p.admin, "/metrics").await.unwrap();
    let attempts = metric_sum(&metrics, "balanced_upstream_requests_total", "code=\"error\"");
    // First connection: 2 tries (the budget's one retry per 10 s); second: the
    // budget refuses its retry, 1 try. Never a third try (tries: 2).
    assert_eq!(attempts, 3.0, "{metrics}");
    assert_eq!(
        metric_sum(
            &metrics,
            "balanced_upstream_retry_budget_exhausted_total",
            "default/web"
        ),
        1.0,
        "{metrics}"
    );
}

#[tokio::test]
async fn a_passing_active_probe_lifts_a_passive_ejection() {
    let mut a = Backend::http("a", Behavior::Status(200)).await;
    let b = Backend::http("b", Behavior::Status(200)).await;
    // fall: 100 keeps probes calling `a` healthy through a short outage, so only
    // the passive ejection (an hour long) takes it out.
    let extra = "  algorithm: RoundRobin\n  passiveHealth: {maxFails: 1, failTimeout: 1h}\n  healthCheck: {protocol: TCP, interval: 200ms, timeout: 100ms, rise: 1, fall: 100}";
    let p = proxy(&[a.addr, b.addr], "HTTP", extra, 2).await;
    let c = client();
    a.kill();
    let a_port = a.addr.port();
    let status_of_a = |admin| async move {
        let (_, status) = http_get(admin, "/status").await.unwrap();
        let v: serde_json::Value = serde_json::from_str(&status).unwrap();
        let eps = v["services"][0]["endpoints"].as_array().unwrap().clone();
        eps.into_iter().find(|e| e["port"] == a_port).unwrap()
    };
    for _ in 0..4 {
        assert_eq!(send(&c, "GET", p.listen, "").await.0, 200, "retried on b");
    }
    assert_eq!(status_of_a(p.admin).await["ejected"], true);
    a.revive().await.unwrap();
    eventually(
        Duration::from_secs(2),
        "the next passing probe to lift the ejection",
        || async { (status_of_a(p.admin).await["ejected"] == false).then_some(()) },
    )
    .await;
    let (_, metrics) = http_get(p.admin, "/metrics").await.unwrap();
    assert_eq!(
        metric_sum(
            &metrics,
            "balanced_endpoint_ejections_lifted_total",
            &a.addr.to_string()
        ),
        1.0,
        "{metrics}"
    );
    let mut names = std::collections::HashSet::new();
    for _ in 0..4 {
        names.insert(send(&c, "GET", p.listen, "").await.1);
    }
    assert!(names.contains("a"), "a serves again: {names:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_listener_moves_megabytes_intact_both_ways() {
    let echo = Backend::tcp_echo("echo").await;
    let p = proxy(&[echo.addr], "TCP", "", 1).await;
    let payload: Vec<u8> = (0..8 * 1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    let stream = TcpStream::connect(p.listen).await.unwrap();
    let (mut r, mut w) = stream.into_split();
    let sent = payload.clone();
    let writer = tokio::spawn(async move {
        w.write_all(&sent).await.unwrap();
        w.shutdown().await.unwrap();
    });
    let mut back = Vec::with_capacity(payload.len());
    tokio::time::timeout(Duration::from_secs(20), r.read_to_end(&mut back))
        .await
        .expect("the echo finishes")
        .unwrap();
    writer.await.unwrap();
    assert_eq!(back.len(), payload.len());
    assert!(back == payload, "bytes changed on the way");
}

#[tokio::test]
async fn a_streamed_body_still_fails_over_when_the_connect_fails() {
    let good = echo_server(false).await;
    let refused = refusing_addr().await;
    // Probes of both go to the good port, so the refusing endpoint stays in
    // rotation and every other request's first connect fails.
    let extra = format!(
        "  algorithm: RoundRobin\n  passiveHealth: {{maxFails: 0}}\n  retry: {{maxBodyBytes: 16}}\n  healthCheck: {{interval: 200ms, timeout: 100ms, rise: 1, port: {}}}",
        good.port()
    );
    let p = proxy(&[refused, good], "HTTP", &extra, 2).await;
    let big = "x".repeat(4096);
    for _ in 0..4 {
        let (status, _, body) = send(&client(), "POST", p.listen, &big).await;
        assert_eq!(status, 200, "{body}");
        assert!(body.ends_with(&big), "the streamed body arrives whole");
    }
}

/// The value of one metric series in a Prometheus text page (0 when absent).
fn series(metrics: &str, prefix: &str) -> u64 {
    metrics
        .lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fast_path_serves_plain_requests_and_hands_the_rest_to_hyper() {
    let a = Backend::http("a", Behavior::Status(200)).await;
    let p = proxy(&[a.addr], "HTTP", "  debug: {endpointHeader: true}", 1).await;
    let stream = TcpStream::connect(p.listen).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    // A plain GET, a GET with more header fields than the fast path reads
    // (hyper's from there on, on the same connection), then a GET again.
    let get = || {
        http::Request::get("/work")
            .header("host", "a")
            .body(Full::new(Bytes::new()))
            .unwrap()
    };
    let mut crowded = get();
    for i in 0..70 {
        crowded.headers_mut().insert(
            http::HeaderName::from_bytes(format!("x-field-{i}").as_bytes()).unwrap(),
            http::HeaderValue::from_static("v"),
        );
    }
    for req in [get(), crowded, get()] {
        sender.ready().await.unwrap();
        let resp = sender.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["x-backend"], "a");
        assert_eq!(resp.headers()["x-balanced-endpoint"], a.addr.to_string().as_str());
        resp.into_body().collect().await.unwrap();
    }
    let (_, metrics) = http_get(p.admin, "/metrics").await.unwrap();
    let fast = series(
        &metrics,
        "balanced_http1_requests_total{service=\"default/web\",listener=\"main\",path=\"fast\"}",
    );
    let hyper = series(
        &metrics,
        "balanced_http1_requests_total{service=\"default/web\",listener=\"main\",path=\"hyper\"}",
    );
    // Each path keeps its own idle upstream connections.
    if balanced::proxy::http::fast::enabled() {
        assert_eq!((fast, hyper), (1, 2), "{metrics}");
        assert_eq!(a.accepted(), 2, "one upstream connection per path");
    } else {
        assert_eq!((fast, hyper), (0, 3), "BALANCED_HTTP1=hyper: {metrics}");
        assert_eq!(a.accepted(), 1, "one upstream connection, reused");
    }

    // Two requests in one write (pipelined), the second closing.
    let mut raw = TcpStream::connect(p.listen).await.unwrap();
    raw.write_all(b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\nHEAD /2 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(5), raw.read_to_string(&mut answer))
        .await
        .expect("the proxy closes after the second answer")
        .unwrap();
    assert_eq!(answer.matches("HTTP/1.1 200 OK\r\n").count(), 2, "{answer}");
    assert!(answer.ends_with("\r\n\r\n"), "no body after HEAD: {answer}");
    assert!(answer.contains("connection: close\r\n"), "{answer}");
}
