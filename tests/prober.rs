//! The prober against real loopback servers that answer, refuse, hang and die.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use balanced::api::config::{HealthCheck, HttpProbe, ProbeKind, ServiceKey, StatusMatch, TlsProbe};
use balanced::demo::backend::{Backend, Behavior};
use balanced::health::{Health, Prober, Target, TlsClients, probe};
use balanced::metrics::Metrics;
use balanced::testing::{eventually, refusing_addr};
use tokio_util::sync::CancellationToken;

fn http_kind(expect: &[(bool, u16)]) -> ProbeKind {
    ProbeKind::Http(HttpProbe {
        method: http::Method::GET,
        path: "/healthz".into(),
        host: None,
        expect: StatusMatch::from_rules(expect),
        agent_header: None,
    })
}

fn check(probe: ProbeKind, interval_ms: u64, rise: u32, fall: u32) -> HealthCheck {
    HealthCheck {
        probe,
        interval: Duration::from_millis(interval_ms),
        timeout: Duration::from_millis(interval_ms / 2),
        rise,
        fall,
        down_interval: Duration::from_millis(interval_ms),
        port: None,
        agent: None,
    }
}

const SECOND: Duration = Duration::from_secs(1);
const DEFAULT_EXPECT: &[(bool, u16)] = &[(true, 2), (true, 3)];

#[tokio::test]
async fn tcp_probe_passes_on_a_listener_and_names_a_refusal() {
    let tls = TlsClients::default();
    let up = Backend::http("up", Behavior::Status(200)).await;
    assert_eq!(probe(&ProbeKind::Tcp, up.addr, SECOND, &tls).await, Ok(()));

    let err = probe(&ProbeKind::Tcp, refusing_addr().await, SECOND, &tls)
        .await
        .unwrap_err();
    assert_eq!(err.message, "connect: connection refused");
    assert!(!err.timed_out);
}

#[tokio::test]
async fn http_probe_times_out_on_a_backend_that_never_answers() {
    let hang = Backend::hang().await;
    let timeout = Duration::from_millis(300);
    let started = Instant::now();
    let err = probe(&http_kind(DEFAULT_EXPECT), hang.addr, timeout, &TlsClients::default())
        .await
        .unwrap_err();
    let took = started.elapsed();
    assert!(err.timed_out, "{err:?}");
    assert_eq!(err.message, "timeout: no response after 300ms");
    // The timeout plus scheduling slack, never the OS's own multi-minute limits.
    assert!(
        took >= timeout && took < timeout + Duration::from_millis(500),
        "took {took:?}"
    );
}

#[tokio::test]
async fn http_probe_judges_the_status() {
    let tls = TlsClients::default();
    let ok = Backend::http("ok", Behavior::Status(200)).await;
    let err500 = Backend::http("err", Behavior::Status(500)).await;
    let moved = Backend::http("moved", Behavior::Status(301)).await;

    assert_eq!(probe(&http_kind(DEFAULT_EXPECT), ok.addr, SECOND, &tls).await, Ok(()));
    assert_eq!(
        probe(&http_kind(DEFAULT_EXPECT), moved.addr, SECOND, &tls).await,
        Ok(())
    );
    let e = probe(&http_kind(DEFAULT_EXPECT), err500.addr, SECOND, &tls)
        .await
        .unwrap_err();
    assert_eq!(e.message, "http: status 500, expected 2xx, 3xx");
    let e = probe(&http_kind(&[(true, 2)]), moved.addr, SECOND, &tls)
        .await
        .unwrap_err();
    assert_eq!(e.message, "http: status 301, expected 2xx");
    let e = probe(&http_kind(&[(false, 500)]), err500.addr, SECOND, &tls).await;
    assert_eq!(e, Ok(()), "an exact code can make 500 the expected answer");
}

#[tokio::test]
async fn tls_probe_completes_a_handshake_and_verifies_only_when_asked() {
    let (addr, _stop) = support::tls_backend().await;
    let tls = TlsClients::default();
    let lenient = ProbeKind::Tls(TlsProbe {
        server_name: Some("localhost".into()),
        verify: false,
    });
    assert_eq!(probe(&lenient, addr, SECOND, &tls).await, Ok(()));

    let strict = ProbeKind::Tls(TlsProbe {
        server_name: Some("localhost".into()),
        verify: true,
    });
    let err = probe(&strict, addr, SECOND, &tls).await.unwrap_err();
    assert!(
        err.message.starts_with("tls: "),
        "a self-signed certificate must fail verification: {err:?}"
    );

    // A plain HTTP server is not a TLS endpoint.
    let plain = Backend::http("plain", Behavior::Status(200)).await;
    let err = probe(&lenient, plain.addr, SECOND, &tls).await.unwrap_err();
    assert!(err.message.starts_with("tls: handshake: "), "{err:?}");
}

fn health_of(prober: &Prober, key: &ServiceKey, addr: SocketAddr) -> Option<Health> {
    prober
        .states(key)
        .into_iter()
        .find(|(a, _)| *a == addr)
        .map(|(_, s)| s.health)
}

#[tokio::test]
async fn an_endpoint_that_goes_down_and_comes_back_follows_fall_and_rise() {
    let mut backend = Backend::http("b", Behavior::Status(200)).await;
    let prober = Prober::new(Metrics::new().probe, CancellationToken::new());
    let mut transitions = prober.subscribe();
    let key = ServiceKey::new("default", "web");
    prober.update_service(
        &key,
        &check(http_kind(DEFAULT_EXPECT), 100, 2, 2),
        &[Target::new(backend.addr)],
    );
    assert_eq!(health_of(&prober, &key, backend.addr), Some(Health::Unknown));

    let t = tokio::time::timeout(SECOND, transitions.recv()).await.unwrap().unwrap();
    assert_eq!(
        (t.from, t.to, t.endpoint),
        (Health::Unknown, Health::Healthy, backend.addr)
    );

    backend.kill();
    let t = tokio::time::timeout(SECOND, transitions.recv()).await.unwrap().unwrap();
    assert_eq!((t.from, t.to), (Health::Healthy, Health::Unhealthy));
    assert_eq!(t.error.as_deref(), Some("connect: connection refused"));
    let states = prober.states(&key);
    assert_eq!(states[0].1.consecutive_failures, 2, "fall is 2: exactly two failures");

    backend.revive().await.unwrap();
    let t = tokio::time::timeout(SECOND, transitions.recv()).await.unwrap().unwrap();
    assert_eq!((t.from, t.to), (Health::Unhealthy, Health::Healthy));
    assert_eq!(prober.states(&key)[0].1.last_error, None);
}

#[tokio::test]
async fn removed_endpoints_stop_being_probed_at_once_and_others_keep_state() {
    let a = Backend::http("a", Behavior::Status(200)).await;
    let b = Backend::http("b", Behavior::Status(200)).await;
    let prober = Prober::new(Metrics::new().probe, CancellationToken::new());
    let key = ServiceKey::new("default", "web");
    // HTTP checks, so each probe is an accepted connection the backends count.
    let hc = check(http_kind(DEFAULT_EXPECT), 50, 1, 1);
    prober.update_service(&key, &hc, &[Target::new(a.addr), Target::new(b.addr)]);
    eventually(SECOND, "both healthy", || async {
        let s = prober.states(&key);
        s.iter().all(|(_, st)| st.health == Health::Healthy).then_some(())
    })
    .await;

    prober.update_service(&key, &hc, &[Target::new(a.addr)]);
    // A probe whose handshake the kernel finished before the removal is still
    // accepted by the backend afterwards: allow that one, not a new interval's.
    let b_count = b.accepted();
    // A measuring window of six probe intervals.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(b.accepted() <= b_count + 1, "a removed endpoint got probed again");
    assert!(a.accepted() > 2, "the remaining endpoint keeps being probed");
    assert_eq!(
        health_of(&prober, &key, a.addr),
        Some(Health::Healthy),
        "kept its state"
    );
    assert_eq!(health_of(&prober, &key, b.addr), None);

    prober.remove_service(&key);
    let a_count = a.accepted();
    // A measuring window of four probe intervals.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(a.accepted() <= a_count + 1, "a removed service got probed again");
}

// Spread over the interval and independence from a hung endpoint are unit
// tests on the paused clock (src/health/prober.rs).

#[tokio::test]
async fn a_bare_tcp_check_never_reaches_the_application() {
    // The SYN-ACK is the check; the RST that replaces the last ACK means the
    // endpoint's process never accepts a probe (nor logs one).
    let backend = Backend::http("quiet", Behavior::Status(200)).await;
    let prober = Prober::new(Metrics::new().probe, CancellationToken::new());
    let key = ServiceKey::new("default", "web");
    prober.update_service(&key, &check(ProbeKind::Tcp, 50, 3, 1), &[Target::new(backend.addr)]);
    eventually(SECOND, "healthy after three TCP checks", || async {
        (health_of(&prober, &key, backend.addr) == Some(Health::Healthy)).then_some(())
    })
    .await;
    assert_eq!(backend.accepted(), 0, "a TCP check was accepted by the application");
}

#[tokio::test]
async fn inherited_state_is_served_without_waiting_for_rise() {
    let backend = Backend::http("b", Behavior::Status(200)).await;
    let prober = Prober::new(Metrics::new().probe, CancellationToken::new());
    let key = ServiceKey::new("default", "web");
    let seed = balanced::health::HealthState::inherited(Health::Healthy, None);
    prober.update_service(
        &key,
        &check(ProbeKind::Tcp, 1000, 3, 3),
        &[Target {
            addr: backend.addr,
            seed: Some(seed),
        }],
    );
    assert_eq!(health_of(&prober, &key, backend.addr), Some(Health::Healthy));
}

fn payload(send: &[u8], expect: balanced::api::config::Expect) -> ProbeKind {
    ProbeKind::TcpPayload(balanced::api::config::TcpPayload {
        send: send.to_vec(),
        expect,
    })
}

fn regex(source: &str) -> balanced::api::config::Expect {
    balanced::api::config::Expect::Regex(balanced::api::config::AnchoredRegex::new(source).unwrap())
}

/// A server that speaks first (an SMTP-like banner) to every connection.
async fn banner(text: &'static [u8]) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                // Dribbled, to check the probe reads until it can decide.
                for b in text.chunks(3) {
                    let _ = s.write_all(b).await;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                tokio::time::sleep(Duration::from_secs(5)).await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn a_tcp_check_expects_a_banner_by_prefix_hex_or_regex_and_names_what_came() {
    use balanced::api::config::Expect;
    let tls = TlsClients::default();
    let smtp = banner(b"220 mail.example ESMTP ready\r\n").await;
    let by_text = payload(b"", Expect::Prefix(b"220 ".to_vec()));
    assert_eq!(probe(&by_text, smtp, SECOND, &tls).await, Ok(()));
    let by_hex = payload(b"", Expect::Prefix(vec![0x32, 0x32, 0x30]));
    assert_eq!(probe(&by_hex, smtp, SECOND, &tls).await, Ok(()));
    assert_eq!(
        probe(&payload(b"", regex(r"2\d\d [a-z.]+ ESMTP")), smtp, SECOND, &tls).await,
        Ok(())
    );

    let err = probe(&payload(b"", Expect::Prefix(b"+PONG".to_vec())), smtp, SECOND, &tls)
        .await
        .unwrap_err();
    assert_eq!(err.message, "expect: got \"220\", want an answer starting \"+PONG\"");
    assert!(!err.timed_out, "a wrong first byte fails at once");
    let err = probe(&payload(b"", regex("554 ")), smtp, Duration::from_millis(300), &tls)
        .await
        .unwrap_err();
    assert_eq!(
        err.message, "expect: got \"220 mail.example ESMTP ready\\r\\n\", want an answer matching /554 /",
        "a regex that never matches fails near the timeout with what came"
    );
}

/// Real Redis (Debian's `redis-server`): `PING` gets `+PONG` until the server
/// is stopped (SIGSTOP), then the check times out. Needs redis-server on the
/// PATH; `.ci/run` installs it and runs the ignored tests of this file.
#[tokio::test]
#[ignore = "needs redis-server (apt-get install redis-server); .ci/run runs it"]
async fn a_redis_ping_check_passes_and_fails_while_redis_is_stopped() {
    use balanced::api::config::Expect;
    let tls = TlsClients::default();
    let port = balanced::testing::free_port();
    struct Redis(std::process::Child);
    impl Drop for Redis {
        fn drop(&mut self) {
            let _ = std::process::Command::new("kill")
                .args(["-CONT", &self.0.id().to_string()])
                .status();
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let redis = Redis(
        std::process::Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("redis-server on the PATH (apt-get install redis-server)"),
    );
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let ping = payload(b"PING\r\n", Expect::Prefix(b"+PONG\r\n".to_vec()));
    eventually(Duration::from_secs(5), "redis to answer PING", || {
        let ping = ping.clone();
        let tls = tls.clone();
        async move { probe(&ping, addr, SECOND, &tls).await.ok() }
    })
    .await;
    let err = probe(&payload(b"PING\r\n", regex(r"\+OK")), addr, SECOND, &tls)
        .await
        .unwrap_err();
    assert_eq!(
        err.message,
        "expect: got \"+PONG\\r\\n\", want an answer matching /\\+OK/"
    );

    let pid = redis.0.id().to_string();
    let signal = |s: &str| std::process::Command::new("kill").args([s, &pid]).status().unwrap();
    signal("-STOP");
    let err = probe(&ping, addr, Duration::from_millis(300), &tls).await.unwrap_err();
    assert!(err.timed_out, "{err:?}");
    assert_eq!(err.message, "timeout: no response after 300ms");
    signal("-CONT");
    assert_eq!(probe(&ping, addr, SECOND, &tls).await, Ok(()));
}
