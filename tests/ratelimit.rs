//! `spec.rateLimit` through the real proxy: the excess over the rate is
//! refused with 429 and its headers, a delayed burst is smoothed rather than
//! refused, and one client's limit does not touch another's.

mod support;

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use balanced::demo::backend::{Backend, Behavior};
use support::standalone::proxy;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpSocket;

/// One GET from `from` over a fresh connection; the status and the head.
async fn get_from(from: IpAddr, proxy: SocketAddr) -> (u16, String) {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(from, 0)).unwrap();
    let mut s = socket.connect(proxy).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut answer))
        .await
        .expect("an answer within 10 s")
        .unwrap();
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = text.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    let head = text.split("\r\n\r\n").next().unwrap_or("").to_lowercase();
    (status, head)
}

const CLIENT: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 1));

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twice_the_rate_gets_429_for_the_excess() {
    let backend = Backend::http("b", Behavior::Status(200)).await;
    let p = proxy(
        &[backend.addr],
        "HTTP",
        // A small burst absorbs the clients' jitter: with none, a request
        // landing a hair early is refused and the next slot is lost too.
        "  rateLimit: {requests: 20, per: 1s, burst: 5, delay: false}",
        1,
    )
    .await;
    // 40 requests a second for 3 s: twice the limit. The scenario's pacing
    // is the point, so each send waits for its slot on the clock.
    let started = Instant::now();
    let mut sends = Vec::new();
    for i in 0..120u32 {
        tokio::time::sleep_until((started + Duration::from_millis(25) * i).into()).await;
        let listen = p.listen;
        sends.push(tokio::spawn(async move { get_from(CLIENT, listen).await }));
    }
    let mut ok = 0;
    let mut limited = Vec::new();
    for s in sends {
        let (status, head) = s.await.unwrap();
        match status {
            200 => ok += 1,
            429 => limited.push(head),
            other => panic!("unexpected {other}: {head}"),
        }
    }
    // 3 s at 20/s passes 60, plus the first and the burst of 5: 66; the
    // other 54 are refused.
    let refused = limited.len();
    assert!(
        (49..=59).contains(&refused),
        "{refused} refused and {ok} passed of 120 at twice the rate; expected 54 ± 10%"
    );
    let head = &limited[0];
    for needle in [
        "retry-after: 1",
        "ratelimit-policy: \"default\";q=20;w=1",
        "ratelimit: \"default\";r=0;t=1",
    ] {
        assert!(head.contains(needle), "missing {needle:?} in\n{head}");
    }
    let (_, metrics) = balanced::demo::backend::http_get(p.admin, "/metrics").await.unwrap();
    let line = metrics
        .lines()
        .find(|l| l.starts_with("balanced_ratelimited_total{"))
        .unwrap_or_else(|| panic!("no balanced_ratelimited_total in\n{metrics}"));
    assert!(line.ends_with(&format!(" {refused}")), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delayed_burst_is_smoothed_instead_of_refused() {
    let backend = Backend::http("b", Behavior::Status(200)).await;
    let p = proxy(
        &[backend.addr],
        "HTTP",
        "  rateLimit: {requests: 20, per: 1s, burst: 10, delay: true}",
        1,
    )
    .await;
    // Eleven at once: one at the rate plus a burst of ten, released 50 ms
    // apart after the first two.
    let started = Instant::now();
    let sends: Vec<_> = (0..11)
        .map(|_| {
            let listen = p.listen;
            tokio::spawn(async move {
                let (status, _) = get_from(CLIENT, listen).await;
                (status, started.elapsed())
            })
        })
        .collect();
    let mut done = Vec::new();
    for s in sends {
        done.push(s.await.unwrap());
    }
    assert!(done.iter().all(|(status, _)| *status == 200), "{done:?}");
    let last = done.iter().map(|(_, t)| *t).max().unwrap();
    assert!(
        last >= Duration::from_millis(400),
        "the burst went through in {last:?}, not paced at 20/s"
    );
    // A twelfth, while the ten are still owed: beyond rate + burst.
    let (status, _) = get_from(CLIENT, p.listen).await;
    assert!(status == 200 || status == 429, "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_client_over_its_limit_does_not_limit_another() {
    let backend = Backend::http("b", Behavior::Status(200)).await;
    let p = proxy(
        &[backend.addr],
        "HTTP",
        "  rateLimit: {requests: 1, per: 1m, burst: 2, delay: false, key: {source: SourceIP}}",
        1,
    )
    .await;
    let noisy = IpAddr::from([127, 0, 0, 2]);
    let quiet = IpAddr::from([127, 0, 0, 3]);
    let mut statuses = Vec::new();
    for _ in 0..5 {
        statuses.push(get_from(noisy, p.listen).await.0);
    }
    assert_eq!(statuses, vec![200, 200, 200, 429, 429], "the noisy client: 1 + burst 2");
    assert_eq!(
        get_from(quiet, p.listen).await.0,
        200,
        "another client has its own bucket"
    );
}
