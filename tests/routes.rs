//! `spec.routes` and `spec.backends` through the real proxy: requests split by
//! path, header, cookie, query and host to their group; a weighted canary; a
//! dead group's retries stay inside it; a reload that changes routes keeps
//! in-flight requests.

mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use balanced::demo::backend::{Backend, Behavior};
use balanced::testing::eventually;
use support::standalone::proxy;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// GET `target` with extra header lines; the status, the body and the head.
async fn get(proxy: SocketAddr, target: &str, headers: &str) -> (u16, String, String) {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    let host = if headers.to_lowercase().contains("host:") {
        String::new()
    } else {
        "Host: x\r\n".into()
    };
    s.write_all(format!("GET {target} HTTP/1.1\r\n{host}{headers}Connection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut answer))
        .await
        .expect("an answer")
        .unwrap();
    let text = String::from_utf8_lossy(&answer).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    // Bodies are short and unchunked from the demo backends, or chunked from
    // the proxy's own answers: the backend's name is the first line either way.
    let body = body
        .lines()
        .find(|l| !l.is_empty() && !l.chars().all(|c| c.is_ascii_hexdigit()))
        .unwrap_or("");
    (status, body.to_string(), head.to_lowercase())
}

/// Waits until a killed backend refuses connections (its tasks end a moment
/// after the kill).
async fn gone(addr: SocketAddr) {
    eventually(Duration::from_secs(2), "the killed backend to refuse", || async move {
        TcpStream::connect(addr).await.is_err().then_some(())
    })
    .await;
}

fn endpoint(b: &Backend) -> String {
    format!("{{address: {}, port: {}}}", b.addr.ip(), b.addr.port())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_kind_of_match_sends_to_its_group() {
    let main = Backend::http("main", Behavior::Status(200)).await;
    let api = Backend::http("api", Behavior::Status(200)).await;
    let beta = Backend::http("beta", Behavior::Status(200)).await;
    let extra = format!(
        "  backends:\n    - {{name: api, endpoints: [{}]}}\n    - {{name: beta, endpoints: [{}]}}\n  debug: {{endpointHeader: true}}\n  routes:\n\
         \x20   - {{name: api, matches: [{{path: {{type: PathPrefix, value: /api}}}}], backendRefs: [{{name: api}}]}}\n\
         \x20   - {{name: by-header, matches: [{{headers: [{{name: x-beta, value: 'yes'}}]}}], backendRefs: [{{name: beta}}]}}\n\
         \x20   - {{name: by-cookie, matches: [{{cookies: [{{name: tier, type: RegularExpression, value: 'gold|platinum'}}]}}], backendRefs: [{{name: beta}}]}}\n\
         \x20   - {{name: by-query, matches: [{{queryParams: [{{name: v, value: '2'}}], method: GET}}], backendRefs: [{{name: beta}}]}}\n\
         \x20   - {{name: by-host, matches: [{{hostnames: ['*.beta.example.com']}}], backendRefs: [{{name: beta}}]}}",
        endpoint(&api),
        endpoint(&beta)
    );
    let p = proxy(&[main.addr], "HTTP", &extra, 3).await;
    let cases = [
        ("/api/users", "", "api", Some("api")),
        ("/api", "", "api", Some("api")),
        ("/apix", "", "main", None),
        ("/", "X-Beta: yes\r\n", "beta", Some("by-header")),
        ("/", "X-Beta: no\r\n", "main", None),
        ("/", "Cookie: session=1; tier=gold\r\n", "beta", Some("by-cookie")),
        ("/", "Cookie: tier=silver\r\n", "main", None),
        ("/x?a=1&v=2", "", "beta", Some("by-query")),
        ("/x?v=3", "", "main", None),
        ("/", "Host: eu.beta.example.com:8080\r\n", "beta", Some("by-host")),
        ("/", "Host: beta.example.com\r\n", "main", None),
    ];
    for (target, headers, want, route) in cases {
        let (status, body, head) = get(p.listen, target, headers).await;
        assert_eq!((status, body.as_str()), (200, want), "{target} {headers:?}\n{head}");
        match route {
            Some(r) => assert!(head.contains(&format!("x-balanced-route: {r}")), "{target}: {head}"),
            None => assert!(!head.contains("x-balanced-route"), "{target}: {head}"),
        }
    }
    let (_, metrics) = balanced::demo::backend::http_get(p.admin, "/metrics").await.unwrap();
    assert!(
        metrics.contains("balanced_route_requests_total{service=\"default/web\",route=\"api\",code=\"2xx\"} 2"),
        "{metrics}"
    );
    let (_, status) = balanced::demo::backend::http_get(p.admin, "/status").await.unwrap();
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    let svc = &status["services"][0];
    assert_eq!(
        svc["backends"],
        serde_json::json!([{"name": "default", "ready": "1/1"}, {"name": "api", "ready": "1/1"}, {"name": "beta", "ready": "1/1"}])
    );
    assert_eq!(svc["routes"].as_array().map(Vec::len), Some(5), "{svc}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ninety_ten_canary_splits_within_three_percent() {
    let stable = Backend::http("stable", Behavior::Status(200)).await;
    let canary = Backend::http("canary", Behavior::Status(200)).await;
    let extra = format!(
        "  backends: [{{name: canary, endpoints: [{}]}}]\n  routes:\n    - {{name: all, backendRefs: [{{name: default, weight: 90}}, {{name: canary, weight: 10}}]}}",
        endpoint(&canary)
    );
    let p = proxy(&[stable.addr], "HTTP", &extra, 2).await;
    let mut counts: HashMap<String, u32> = HashMap::new();
    for _ in 0..1000 {
        let (status, body, _) = get(p.listen, "/", "").await;
        assert_eq!(status, 200);
        *counts.entry(body).or_default() += 1;
    }
    let share = f64::from(counts.get("canary").copied().unwrap_or(0)) / 1000.0;
    assert!((0.07..=0.13).contains(&share), "canary share {share}: {counts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_stay_inside_the_routes_group() {
    let main = Backend::http("main", Behavior::Status(200)).await;
    let live = Backend::http("api-live", Behavior::Status(200)).await;
    let dead = Backend::http("api-dead", Behavior::Status(200)).await;
    let extra = format!(
        "  algorithm: RoundRobin\n  backends: [{{name: api, endpoints: [{}, {}]}}]\n  retry: {{tries: 2}}\n  routes:\n    - {{name: api, matches: [{{path: {{value: /api}}}}], backendRefs: [{{name: api}}]}}",
        endpoint(&live),
        endpoint(&dead)
    );
    let p = proxy(&[main.addr], "HTTP", &extra, 3).await;
    // Killed before probes notice: every request that meets it is retried,
    // and the retry goes to the other api endpoint, never to default.
    dead.kill();
    gone(dead.addr).await;
    for _ in 0..10 {
        let (status, body, _) = get(p.listen, "/api/x", "").await;
        assert_eq!((status, body.as_str()), (200, "api-live"));
    }
    // The whole group down: the route's answer is the group's failure, not
    // the default group's 200.
    live.kill();
    gone(live.addr).await;
    let (status, body, _) = get(p.listen, "/api/x", "").await;
    assert!(status == 502 || status == 503, "{status} {body}");
    assert_eq!(get(p.listen, "/", "").await.1, "main", "the default group still serves");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_changes_routes_keeps_in_flight_requests() {
    let main = Backend::http("main", Behavior::Slow(Duration::from_millis(1500))).await;
    let other = Backend::http("other", Behavior::Status(200)).await;
    let extra = format!(
        "  backends: [{{name: other, endpoints: [{}]}}]\n  routes:\n    - {{name: r, matches: [{{path: {{value: /other}}}}], backendRefs: [{{name: other}}]}}",
        endpoint(&other)
    );
    let p = proxy(&[main.addr], "HTTP", &extra, 2).await;
    let listen = p.listen;
    let in_flight = tokio::spawn(async move { get(listen, "/slow", "").await });
    let admin = p.admin;
    eventually(Duration::from_secs(2), "the slow request in flight", || async move {
        let (_, status) = balanced::demo::backend::http_get(admin, "/status").await.ok()?;
        status.contains("\"activeConnections\": 1").then_some(())
    })
    .await;
    // Now everything goes to `other`.
    let text = std::fs::read_to_string(p.file()).unwrap();
    std::fs::write(p.file(), text.replace("value: /other", "value: /")).unwrap();
    eventually(Duration::from_secs(5), "the new route to apply", || async {
        (get(listen, "/slow", "").await.1 == "other").then_some(())
    })
    .await;
    let (status, body, _) = in_flight.await.unwrap();
    assert_eq!(
        (status, body.as_str()),
        (200, "main"),
        "the in-flight request finished where it started"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_has_its_own_rate_limit_retries_and_response_timeout() {
    let slow = Backend::http("slow", Behavior::Slow(Duration::from_millis(600))).await;
    let extra = "  retry: {on: [Error, Timeout], tries: 1}\n  routes:\n\
                 \x20   - {name: limited, matches: [{path: {value: /limited}}], backendRefs: [{name: default}],\n\
                 \x20      rateLimit: {requests: 1, per: 1m, burst: 0, delay: false}}\n\
                 \x20   - {name: hasty, matches: [{path: {value: /hasty}}], backendRefs: [{name: default}],\n\
                 \x20      timeouts: {response: 200ms}, retry: {tries: 1}}";
    let p = proxy(&[slow.addr], "HTTP", extra, 1).await;
    assert_eq!(get(p.listen, "/limited", "").await.0, 200);
    let (status, _, head) = get(p.listen, "/limited", "").await;
    assert_eq!(status, 429, "{head}");
    assert!(head.contains("retry-after:"), "{head}");
    assert_eq!(
        get(p.listen, "/other", "").await.0,
        200,
        "the route's limit is the route's only"
    );
    let (status, _, head) = get(p.listen, "/hasty", "").await;
    assert_eq!(status, 504, "the route's 200 ms response timeout: {head}");
    assert_eq!(
        get(p.listen, "/patient", "").await.0,
        200,
        "the service's 60 s still applies elsewhere"
    );
    let (_, metrics) = balanced::demo::backend::http_get(p.admin, "/metrics").await.unwrap();
    assert!(
        metrics.contains("balanced_ratelimited_total{service=\"default/web\",route=\"limited\"} 1"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_follows_its_routes_rate_limit_and_response_timeout() {
    let ws = Backend::http("ws", Behavior::Status(200)).await;
    let stuck = Backend::hang().await;
    let extra = format!(
        "  backends: [{{name: stuck, endpoints: [{}]}}]\n  routes:\n\
         \x20   - {{name: limited, matches: [{{path: {{value: /limited}}}}], backendRefs: [{{name: default}}],\n\
         \x20      rateLimit: {{requests: 1, per: 1m, burst: 0, delay: false}}}}\n\
         \x20   - {{name: hasty, matches: [{{path: {{value: /hasty}}}}], backendRefs: [{{name: stuck}}],\n\
         \x20      timeouts: {{response: 200ms}}, retry: {{tries: 1}}}}",
        endpoint(&stuck)
    );
    let p = proxy(&[ws.addr], "HTTP", &extra, 2).await;
    assert_eq!(
        upgrade(p.listen, "/limited").await,
        101,
        "the backend takes the WebSocket"
    );
    assert_eq!(
        upgrade(p.listen, "/limited").await,
        429,
        "an upgrade is counted by its route's rate limit"
    );
    assert_eq!(
        upgrade(p.listen, "/hasty").await,
        504,
        "an upgrade waits its route's 200 ms, not 60 s"
    );
    assert_eq!(upgrade(p.listen, "/other").await, 101);
}

/// A WebSocket upgrade of `target`; the status of the answer's head (a
/// tunnel, once open, stays open: only the head is read).
async fn upgrade(proxy: SocketAddr, target: &str) -> u16 {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    s.write_all(
        format!(
            "GET {target} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut byte))
            .await
            .expect("an answer within 10 s")
            .unwrap();
        assert_eq!(n, 1, "closed before the head ended: {}", String::from_utf8_lossy(&head));
        head.push(byte[0]);
    }
    String::from_utf8_lossy(&head)
        .get(9..12)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

/// POST `body` as `content_type`; the status and the first body line.
async fn post(proxy: SocketAddr, content_type: &str, body: &str) -> (u16, String) {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    s.write_all(
        format!(
            "POST /orders HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut answer = Vec::new();
    s.read_to_end(&mut answer).await.unwrap();
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = text.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    let line = body
        .lines()
        .find(|l| !l.is_empty() && !l.chars().all(|c| c.is_ascii_hexdigit()))
        .unwrap_or("");
    (status, line.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn form_and_json_body_params_route_requests_that_fit_the_buffer() {
    let main = Backend::http("main", Behavior::Status(200)).await;
    let beta = Backend::http("beta", Behavior::Status(200)).await;
    let extra = format!(
        "  retry: {{maxBodyBytes: 1024}}\n  backends: [{{name: beta, endpoints: [{}]}}]\n  routes:\n\
         \x20   - {{name: beta, matches: [{{method: POST, bodyParams: [{{name: tier, value: beta}}]}}], backendRefs: [{{name: beta}}]}}",
        endpoint(&beta)
    );
    let p = proxy(&[main.addr], "HTTP", &extra, 2).await;
    let json = "application/json";
    let form = "application/x-www-form-urlencoded";
    assert_eq!(
        post(p.listen, json, r#"{"tier": "beta", "qty": 2}"#).await,
        (200, "beta".into())
    );
    assert_eq!(post(p.listen, form, "qty=2&tier=beta").await, (200, "beta".into()));
    assert_eq!(
        post(p.listen, json, r#"{"tier": "stable"}"#).await,
        (200, "main".into())
    );
    assert_eq!(post(p.listen, "text/plain", "tier=beta").await, (200, "main".into()));
    let large = format!("tier=beta&pad={}", "x".repeat(2000));
    assert_eq!(
        post(p.listen, form, &large).await,
        (200, "main".into()),
        "a body over retry.maxBodyBytes is not read for matching"
    );
}
