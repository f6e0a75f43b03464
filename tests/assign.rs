//! The assign API on the admin server (`GET /v1/namespaces/NS/balancedservices/NAME/pick`):
//! the endpoint the service's algorithm would choose among the healthy ones,
//! as TeamTalk's login server hands out a message server.

mod support;

use std::time::Duration;

use balanced::demo::backend::{Backend, Behavior, http_get};
use balanced::testing::eventually;
use support::standalone::proxy;

const PICK: &str = "/v1/namespaces/default/balancedservices/web/pick";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pick_answers_a_healthy_endpoint_and_503_when_none_is() {
    let a = Backend::http("a", Behavior::Status(200)).await;
    let b = Backend::http("b", Behavior::Status(200)).await;
    let p = proxy(&[a.addr, b.addr], "HTTP", "  algorithm: RoundRobin", 2).await;
    let mut seen = std::collections::HashSet::new();
    for _ in 0..4 {
        let (status, body) = http_get(p.admin, PICK).await.unwrap();
        assert_eq!(status, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["address"], "127.0.0.1");
        seen.insert(v["port"].as_u64().unwrap() as u16);
    }
    assert_eq!(seen, [a.addr.port(), b.addr.port()].into(), "round robin over both");

    a.kill();
    let b_port = format!("\"port\":{}", b.addr.port());
    eventually(Duration::from_secs(3), "only b to be handed out", || async {
        let picks = picks(p.admin, 4).await;
        picks.iter().all(|pick| pick.contains(&b_port)).then_some(())
    })
    .await;
    for _ in 0..4 {
        let (_, body) = http_get(p.admin, PICK).await.unwrap();
        assert!(body.contains(&format!("\"port\":{}", b.addr.port())), "{body}");
    }

    b.kill();
    let (status, body) = eventually(Duration::from_secs(3), "a 503 once no endpoint is healthy", || async {
        let answer = http_get(p.admin, PICK).await.ok()?;
        (answer.0 == 503).then_some(answer)
    })
    .await;
    assert!(
        body.contains("no healthy endpoint in default/web (0/2 serving)"),
        "{status} {body}"
    );
    let (status, _) = http_get(p.admin, "/v1/namespaces/default/balancedservices/nope/pick")
        .await
        .unwrap();
    assert_eq!(status, 404);
}

async fn picks(admin: std::net::SocketAddr, n: usize) -> Vec<String> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(http_get(admin, PICK).await.map(|(_, b)| b).unwrap_or_default());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consistent_hash_picks_by_key() {
    let a = Backend::http("a", Behavior::Status(200)).await;
    let b = Backend::http("b", Behavior::Status(200)).await;
    let p = proxy(
        &[a.addr, b.addr],
        "HTTP",
        "  algorithm: ConsistentHash\n  hash: {source: Header, name: x-user}",
        2,
    )
    .await;
    for user in ["alice", "bob", "carol"] {
        let first = http_get(p.admin, &format!("{PICK}?key={user}")).await.unwrap().1;
        for _ in 0..3 {
            assert_eq!(
                http_get(p.admin, &format!("{PICK}?key={user}")).await.unwrap().1,
                first,
                "{user}"
            );
        }
    }
}
