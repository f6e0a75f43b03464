//! Load and state reported by the endpoints in HAProxy's agent-check words:
//! a TCP agent on its own port, or a header of the HTTP probe's answer.

mod support;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use balanced::demo::backend::{Backend, Behavior, http_get};
use balanced::testing::eventually;
use support::agent::{Agent, HeaderServer};
use support::standalone::proxy;

const PICK: &str = "/v1/namespaces/default/balancedservices/web/pick";

/// The `/status` entry of the endpoint on `addr`.
async fn endpoint(admin: SocketAddr, addr: SocketAddr) -> Option<serde_json::Value> {
    let (_, body) = http_get(admin, "/status").await.ok()?;
    let status: serde_json::Value = serde_json::from_str(&body).ok()?;
    status["services"][0]["endpoints"]
        .as_array()?
        .iter()
        .find(|e| e["address"] == addr.ip().to_string() && e["port"] == addr.port())
        .cloned()
}

async fn wait_for(admin: SocketAddr, addr: SocketAddr, what: &str, ok: impl Fn(&serde_json::Value) -> bool) {
    eventually(Duration::from_secs(5), what, || async {
        endpoint(admin, addr).await.filter(|e| ok(e)).map(drop)
    })
    .await;
}

/// Which backend answered `n` requests through the proxy, by name.
async fn shares(listen: SocketAddr, n: usize) -> HashMap<String, usize> {
    let mut seen = HashMap::new();
    for _ in 0..n {
        let (status, body) = http_get(listen, "/").await.unwrap();
        assert_eq!(status, 200, "{body}");
        *seen.entry(body).or_insert(0) += 1;
    }
    seen
}

/// `balanced_agent_errors_total` for default/web.
async fn agent_errors(admin: SocketAddr) -> Option<u64> {
    let (_, m) = http_get(admin, "/metrics").await.ok()?;
    m.lines()
        .find(|l| l.starts_with("balanced_agent_errors_total{service=\"default/web\"}"))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .or(Some(0))
}

/// Waits until `n` more agent answers were refused or missing than `from`.
async fn more_agent_errors(admin: SocketAddr, from: u64, n: u64) {
    eventually(Duration::from_secs(5), "agent errors counted", || async move {
        (agent_errors(admin).await? >= from + n).then_some(())
    })
    .await;
}

fn ip(last: u8) -> IpAddr {
    IpAddr::from([127, 0, 0, last])
}

/// Two endpoints on their own loopback addresses, each with its agent on the
/// same port, as pods would have.
async fn two_with_agents() -> (Backend, Backend, Agent, Agent) {
    let a = Backend::http_at("a", Behavior::Status(200), SocketAddr::new(ip(2), 0)).await;
    let b = Backend::http_at("b", Behavior::Status(200), SocketAddr::new(ip(3), 0)).await;
    let agent_a = Agent::start(ip(2), 0, "up").await;
    let agent_b = Agent::start(ip(3), agent_a.addr.port(), "up").await;
    (a, b, agent_a, agent_b)
}

fn agent_spec(port: u16) -> String {
    format!(
        "  algorithm: RoundRobin\n  healthCheck: {{protocol: TCP, interval: 200ms, timeout: 100ms, rise: 1, fall: 2, agent: {{port: {port}, interval: 100ms, timeout: 50ms}}}}"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_words_steer_traffic_and_garbage_changes_nothing() {
    let (a, b, agent_a, _agent_b) = two_with_agents().await;
    let p = proxy(&[a.addr, b.addr], "HTTP", &agent_spec(agent_a.addr.port()), 2).await;

    // 50%: a gets half of b's share, a third of the requests.
    agent_a.say("up 50%");
    wait_for(p.admin, a.addr, "a at 50%", |e| e["weightPercent"] == 50).await;
    let seen = shares(p.listen, 300).await;
    let a_share = seen.get("a").copied().unwrap_or(0);
    assert!(
        (80..=120).contains(&a_share),
        "a served {a_share} of 300 at 50% weight: {seen:?}"
    );

    // drain: no new requests for a, though it stays healthy.
    agent_a.say("drain");
    wait_for(p.admin, a.addr, "a draining", |e| e["draining"] == true).await;
    let e = endpoint(p.admin, a.addr).await.unwrap();
    assert_eq!(e["state"], "Healthy", "{e}");
    let seen = shares(p.listen, 50).await;
    assert_eq!(seen.get("b"), Some(&50), "every request to b while a drains: {seen:?}");

    // Garbage is logged and ignored: a keeps its last report, and the agent
    // errors are counted.
    agent_a.say("hello world 12");
    let errors = eventually(Duration::from_secs(5), "an agent error counted", || async {
        let (_, m) = http_get(p.admin, "/metrics").await.ok()?;
        m.lines()
            .find(|l| l.starts_with("balanced_agent_errors_total{"))
            .filter(|l| !l.ends_with(" 0"))
            .map(str::to_string)
    })
    .await;
    assert!(errors.contains("service=\"default/web\""), "{errors}");
    let e = endpoint(p.admin, a.addr).await.unwrap();
    assert_eq!(
        (e["draining"].clone(), e["weightPercent"].clone()),
        (true.into(), 50.into()),
        "{e}"
    );

    // ready: back in, at its last weight.
    agent_a.say("ready 100%");
    wait_for(p.admin, a.addr, "a ready", |e| {
        e["draining"] == false && e["weightPercent"] == 100
    })
    .await;
    let seen = shares(p.listen, 100).await;
    assert_eq!(seen.get("a"), Some(&50), "even split again: {seen:?}");

    // down counts as a failed check: Unhealthy after fall (2) probes.
    agent_a.say("down #maintenance window");
    wait_for(p.admin, a.addr, "a down", |e| e["state"] == "Unhealthy").await;
    let e = endpoint(p.admin, a.addr).await.unwrap();
    assert_eq!(e["lastError"], "agent: down: maintenance window", "{e}");
    let (_, m) = http_get(p.admin, "/metrics").await.unwrap();
    let draining = format!(
        "balanced_endpoint_draining{{service=\"default/web\",endpoint=\"{}\"}} 0",
        a.addr
    );
    assert!(m.contains(&draining), "{draining} in metrics");
    let weight = format!(
        "balanced_endpoint_weight_percent{{service=\"default/web\",endpoint=\"{}\"}} 100",
        a.addr
    );
    assert!(m.contains(&weight), "{weight} in metrics");
    agent_a.say("up");
    wait_for(p.admin, a.addr, "a up again", |e| e["state"] == "Healthy").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_agent_changes_nothing() {
    let (a, b, agent_a, agent_b) = two_with_agents().await;
    let p = proxy(&[a.addr, b.addr], "HTTP", &agent_spec(agent_a.addr.port()), 2).await;
    agent_b.say("drain");
    wait_for(p.admin, b.addr, "b draining", |e| e["draining"] == true).await;
    let before = agent_errors(p.admin).await.unwrap();
    drop(agent_b);
    drop(agent_a);
    // Several unanswered questions to each agent: b is still draining, both healthy.
    more_agent_errors(p.admin, before, 6).await;
    let eb = endpoint(p.admin, b.addr).await.unwrap();
    assert_eq!(
        (eb["draining"].clone(), eb["state"].clone()),
        (true.into(), "Healthy".into()),
        "{eb}"
    );
    let ea = endpoint(p.admin, a.addr).await.unwrap();
    assert_eq!(ea["state"], "Healthy", "{ea}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http_checks_agent_header_reports_the_same_words() {
    let s = HeaderServer::start("X-Agent", "75%").await;
    let extra = "  healthCheck: {protocol: HTTP, interval: 100ms, timeout: 50ms, rise: 1, fall: 1, http: {path: /health, agentHeader: x-agent}}";
    let p = proxy(&[s.addr], "HTTP", extra, 1).await;
    wait_for(p.admin, s.addr, "75% from the header", |e| e["weightPercent"] == 75).await;
    s.say("drain");
    wait_for(p.admin, s.addr, "draining from the header", |e| e["draining"] == true).await;
    let before = agent_errors(p.admin).await.unwrap();
    s.say("%%% nonsense");
    // Three answers with the nonsense header seen and refused.
    more_agent_errors(p.admin, before, 3).await;
    let e = endpoint(p.admin, s.addr).await.unwrap();
    assert_eq!(
        (e["draining"].clone(), e["state"].clone()),
        (true.into(), "Healthy".into()),
        "{e}"
    );
    s.say("down");
    wait_for(p.admin, s.addr, "down from the header", |e| e["state"] == "Unhealthy").await;
    s.say("up ready");
    wait_for(p.admin, s.addr, "back from the header", |e| {
        e["state"] == "Healthy" && e["draining"] == false
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn assignments_follow_reported_load() {
    let a = Backend::http_at("a", Behavior::Status(200), SocketAddr::new(ip(2), 0)).await;
    let b = Backend::http_at("b", Behavior::Status(200), SocketAddr::new(ip(3), 0)).await;
    let c = Backend::http_at("c", Behavior::Status(200), SocketAddr::new(ip(4), 0)).await;
    // Idle capacity, as a TeamTalk message server would report it.
    let agent_a = Agent::start(ip(2), 0, "30%").await;
    let port = agent_a.addr.port();
    let agent_b = Agent::start(ip(3), port, "80%").await;
    let agent_c = Agent::start(ip(4), port, "50%").await;
    let p = proxy(&[a.addr, b.addr, c.addr], "HTTP", &agent_spec(port), 3).await;
    let port_of = |addr: SocketAddr| format!("\"address\":\"{}\",\"port\":{}", addr.ip(), addr.port());

    wait_for(p.admin, b.addr, "b at 80%", |e| e["weightPercent"] == 80).await;
    wait_for(p.admin, c.addr, "c at 50%", |e| e["weightPercent"] == 50).await;
    for _ in 0..5 {
        let (status, body) = http_get(p.admin, PICK).await.unwrap();
        assert_eq!(status, 200, "{body}");
        assert!(
            body.contains(&port_of(b.addr)),
            "the least loaded (b, 80% idle): {body}"
        );
    }
    agent_b.say("10%");
    wait_for(p.admin, b.addr, "b at 10%", |e| e["weightPercent"] == 10).await;
    let (_, body) = http_get(p.admin, PICK).await.unwrap();
    assert!(body.contains(&port_of(c.addr)), "now c (50% idle): {body}");
    agent_c.say("drain");
    wait_for(p.admin, c.addr, "c draining", |e| e["draining"] == true).await;
    let (_, body) = http_get(p.admin, PICK).await.unwrap();
    assert!(
        body.contains(&port_of(a.addr)),
        "a draining endpoint is never assigned: {body}"
    );

    agent_a.say("down");
    agent_b.say("down");
    let (status, body) = eventually(Duration::from_secs(5), "a 503 with none serving", || async {
        let answer = http_get(p.admin, PICK).await.ok()?;
        (answer.0 == 503).then_some(answer)
    })
    .await;
    assert!(
        body.contains("no healthy endpoint in default/web (0/3 serving)"),
        "{status} {body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_lets_the_request_in_flight_finish_and_takes_no_new_one() {
    let a = Backend::http_at(
        "a",
        Behavior::Slow(Duration::from_millis(800)),
        SocketAddr::new(ip(5), 0),
    )
    .await;
    let agent = Agent::start(ip(5), 0, "up").await;
    let p = proxy(&[a.addr], "HTTP", &agent_spec(agent.addr.port()), 1).await;
    let in_flight = tokio::spawn(http_get(p.listen, "/"));
    wait_for(p.admin, a.addr, "the request in flight on a", |e| {
        e["activeConnections"] == 1
    })
    .await;
    agent.say("drain");
    wait_for(p.admin, a.addr, "a draining", |e| e["draining"] == true).await;
    let (status, body) = in_flight.await.unwrap().unwrap();
    assert_eq!(
        (status, body.as_str()),
        (200, "a"),
        "the request in flight finishes on a"
    );
    let (status, body) = http_get(p.listen, "/").await.unwrap();
    assert!(
        status == 502 || status == 503,
        "no new request for a draining endpoint: {status} {body}"
    );
}
