//! The prober against real loopback servers that answer, refuse, hang and die.

mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use balanced::api::config::{GrpcProbe, HealthCheck, HttpProbe, ProbeKind, ServiceKey, StatusMatch, TlsProbe};
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
        keep_alive_requests: 1,
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
        &Default::default(),
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
    prober.update_service(
        &key,
        &hc,
        &Default::default(),
        &[Target::new(a.addr), Target::new(b.addr)],
    );
    eventually(SECOND, "both healthy", || async {
        let s = prober.states(&key);
        s.iter().all(|(_, st)| st.health == Health::Healthy).then_some(())
    })
    .await;

    prober.update_service(&key, &hc, &Default::default(), &[Target::new(a.addr)]);
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
    prober.update_service(
        &key,
        &check(ProbeKind::Tcp, 50, 3, 1),
        &Default::default(),
        &[Target::new(backend.addr)],
    );
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
        &Default::default(),
        &[Target {
            seed: Some(seed),
            ..Target::new(backend.addr)
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

fn http_keep_alive(requests: u32) -> ProbeKind {
    match http_kind(DEFAULT_EXPECT) {
        ProbeKind::Http(h) => ProbeKind::Http(HttpProbe {
            keep_alive_requests: requests,
            ..h
        }),
        _ => unreachable!(),
    }
}

/// An HTTP/1.1 server that counts the connections it accepts and answers
/// each request alternately with a sized and a chunked body, closing a
/// connection without a word after `close_after` answers (as nginx does at
/// its `keepalive_requests`).
async fn counting_server(close_after: usize) -> (SocketAddr, Arc<AtomicUsize>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut answered = 0;
                let mut chunk = [0u8; 1024];
                while answered < close_after {
                    let Ok(n) = s.read(&mut chunk).await else { return };
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        buf.drain(..end + 4);
                        let answer: &[u8] = if answered % 2 == 0 {
                            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
                        } else {
                            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"
                        };
                        if s.write_all(answer).await.is_err() {
                            return;
                        }
                        answered += 1;
                    }
                }
            });
        }
    });
    (addr, accepted)
}

#[tokio::test]
async fn a_keep_alive_http_check_reuses_its_connection_and_shrugs_off_a_closed_one() {
    use balanced::health::probe::{HttpScratch, probe_with};
    let tls = TlsClients::default();
    let run = |kind: ProbeKind, addr: SocketAddr| {
        let tls = tls.clone();
        async move {
            let ProbeKind::Http(http) = &kind else { unreachable!() };
            let mut scratch = HttpScratch::new(http, addr);
            for i in 0..12 {
                let result = probe_with(&kind, addr, SECOND, &tls, None, Some(&mut scratch)).await;
                assert_eq!(result, Ok(None), "check {i}");
            }
        }
    };

    // Ten checks a connection: twelve checks take two.
    let (addr, accepted) = counting_server(usize::MAX).await;
    run(http_keep_alive(10), addr).await;
    assert_eq!(accepted.load(Ordering::SeqCst), 2);

    // One check a connection, as before keepAliveRequests.
    let (addr, accepted) = counting_server(usize::MAX).await;
    run(http_keep_alive(1), addr).await;
    assert_eq!(accepted.load(Ordering::SeqCst), 12);

    // The endpoint closes every connection after four answers: the fifth
    // check finds it closed, is sent again on a new one, and passes.
    let (addr, accepted) = counting_server(4).await;
    run(http_keep_alive(100), addr).await;
    assert_eq!(accepted.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn a_keep_alive_check_that_fails_still_fails_and_its_connection_is_kept() {
    use balanced::health::probe::{HttpScratch, probe_with};
    let tls = TlsClients::default();
    let (addr, accepted) = counting_server(usize::MAX).await;
    let kind = match http_keep_alive(5) {
        ProbeKind::Http(h) => ProbeKind::Http(HttpProbe {
            expect: StatusMatch::from_rules(&[(false, 204)]),
            ..h
        }),
        _ => unreachable!(),
    };
    let ProbeKind::Http(http) = &kind else { unreachable!() };
    let mut scratch = HttpScratch::new(http, addr);
    for _ in 0..5 {
        let err = probe_with(&kind, addr, SECOND, &tls, None, Some(&mut scratch))
            .await
            .unwrap_err();
        assert_eq!(err.message, "http: status 200, expected 204");
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
}

/// Real nginx (Debian's): ten keep-alive checks open one connection, counted
/// by nginx's own `stub_status`; ten plain checks open ten. Needs nginx on the
/// PATH; `.ci/run` installs it and runs the ignored tests of this file.
#[tokio::test]
#[ignore = "needs nginx (apt-get install nginx); .ci/run runs it"]
async fn keep_alive_checks_open_one_nginx_connection_for_ten_checks() {
    use balanced::health::probe::{HttpScratch, probe_with};
    let dir = std::env::temp_dir().join(format!("balanced-nginx-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let port = balanced::testing::free_port();
    std::fs::write(
        dir.join("nginx.conf"),
        format!(
            "daemon off; master_process off; worker_processes 1; pid {d}/nginx.pid; error_log {d}/error.log;
events {{ worker_connections 64; }}
http {{ access_log off; client_body_temp_path {d}; proxy_temp_path {d}; fastcgi_temp_path {d};
  uwsgi_temp_path {d}; scgi_temp_path {d};
  server {{ listen 127.0.0.1:{port}; keepalive_requests 1000;
    location = /healthz {{ return 200 ok; }}
    location = /nginx_status {{ stub_status; }} }} }}
",
            d = dir.display()
        ),
    )
    .unwrap();
    struct Nginx(std::process::Child);
    impl Drop for Nginx {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _nginx = Nginx(
        std::process::Command::new("nginx")
            .args(["-p", dir.to_str().unwrap(), "-c", "nginx.conf", "-e", "stderr"])
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("nginx on the PATH (apt-get install nginx)"),
    );
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    // stub_status: "Active connections: N \nserver accepts handled requests\n A H R \n".
    let accepts = || async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        s.write_all(b"GET /nginx_status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .ok()?;
        let mut text = String::new();
        s.read_to_string(&mut text).await.ok()?;
        let line = text.lines().skip_while(|l| !l.starts_with("server accepts")).nth(1)?;
        line.split_whitespace().next()?.parse::<u64>().ok()
    };
    eventually(Duration::from_secs(5), "nginx to answer", accepts).await;
    let tls = TlsClients::default();
    for (requests, connections) in [(10, 1), (1, 10)] {
        let before = accepts().await.unwrap();
        let kind = http_keep_alive(requests);
        let ProbeKind::Http(http) = &kind else { unreachable!() };
        let mut scratch = HttpScratch::new(http, addr);
        for _ in 0..10 {
            assert_eq!(
                probe_with(&kind, addr, SECOND, &tls, None, Some(&mut scratch)).await,
                Ok(None)
            );
        }
        drop(scratch);
        // The status request itself is one connection more.
        let opened = accepts().await.unwrap() - before - 1;
        assert_eq!(opened, connections, "keepAliveRequests {requests}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

fn grpc_kind(service: &str) -> ProbeKind {
    ProbeKind::Grpc(GrpcProbe {
        service: service.into(),
        authority: None,
    })
}

/// A gRPC health server written on hyper's h2 server, holding one status per
/// service name; a name it does not hold gets `NOT_FOUND`, as grpc-go's does.
async fn grpc_health_server(statuses: Arc<std::sync::Mutex<HashMap<String, u8>>>) -> SocketAddr {
    use bytes::Bytes;
    use http_body_util::{BodyExt, StreamBody};
    use hyper::body::Frame;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let statuses = statuses.clone();
            let service = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                let statuses = statuses.clone();
                async move {
                    assert_eq!(req.uri().path(), "/grpc.health.v1.Health/Check");
                    let body = req.into_body().collect().await.unwrap().to_bytes();
                    // [flag, len x4, 0x0a, name len, name...]: names here are short.
                    let name = String::from_utf8(body.get(7..).unwrap_or_default().to_vec()).unwrap();
                    let found = statuses.lock().unwrap().get(&name).copied();
                    let mut trailers = http::HeaderMap::new();
                    let frames: Vec<Result<Frame<Bytes>, std::convert::Infallible>> = match found {
                        Some(status) => {
                            trailers.insert("grpc-status", "0".parse().unwrap());
                            vec![
                                Ok(Frame::data(Bytes::from(vec![0, 0, 0, 0, 2, 0x08, status]))),
                                Ok(Frame::trailers(trailers)),
                            ]
                        }
                        None => {
                            trailers.insert("grpc-status", "5".parse().unwrap());
                            trailers.insert("grpc-message", "unknown service".parse().unwrap());
                            vec![Ok(Frame::trailers(trailers))]
                        }
                    };
                    let response = http::Response::builder()
                        .header("content-type", "application/grpc")
                        .body(StreamBody::new(futures::stream::iter(frames)))
                        .unwrap();
                    Ok::<_, std::convert::Infallible>(response)
                }
            });
            tokio::spawn(
                hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .serve_connection(hyper_util::rt::TokioIo::new(s), service),
            );
        }
    });
    addr
}

#[tokio::test]
async fn a_grpc_check_passes_on_serving_and_names_any_other_answer() {
    let tls = TlsClients::default();
    let statuses = Arc::new(std::sync::Mutex::new(HashMap::from([
        (String::new(), 1u8),
        ("db".to_string(), 2u8),
    ])));
    let addr = grpc_health_server(statuses.clone()).await;
    assert_eq!(probe(&grpc_kind(""), addr, SECOND, &tls).await, Ok(()));
    let err = probe(&grpc_kind("db"), addr, SECOND, &tls).await.unwrap_err();
    assert_eq!(err.message, "grpc: service \"db\" is NOT_SERVING");
    let err = probe(&grpc_kind("cache"), addr, SECOND, &tls).await.unwrap_err();
    assert_eq!(err.message, "grpc: status NOT_FOUND: unknown service");
    statuses.lock().unwrap().insert("db".into(), 1);
    assert_eq!(probe(&grpc_kind("db"), addr, SECOND, &tls).await, Ok(()));

    // An HTTP/1.1 server is not a gRPC endpoint.
    let http1 = Backend::http("b", Behavior::Status(200)).await;
    let err = probe(&grpc_kind(""), http1.addr, SECOND, &tls).await.unwrap_err();
    assert!(err.message.starts_with("grpc: "), "{err:?}");
}

/// grpcio's health service (tests/health/grpc_health_server.py), over TLS
/// when given a certificate and key; its statuses set through its stdin.
struct GrpcioHealth {
    child: std::process::Child,
    out: std::io::BufReader<std::process::ChildStdout>,
    stdin: std::process::ChildStdin,
    addr: SocketAddr,
}

impl GrpcioHealth {
    fn start(args: &[&std::path::Path]) -> Self {
        use std::io::BufRead;
        let mut child = std::process::Command::new("python3")
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/health/grpc_health_server.py"
            ))
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("python3 on the PATH");
        let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
        let stdin = child.stdin.take().unwrap();
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        let port: u16 = line
            .trim()
            .parse()
            .expect("the server's port (is grpcio-health-checking installed?)");
        Self {
            child,
            out,
            stdin,
            addr: ([127, 0, 0, 1], port).into(),
        }
    }

    /// Sets `service`'s status (`SERVING`, `NOT_SERVING`).
    fn set(&mut self, service: &str, status: &str) {
        use std::io::{BufRead, Write};
        writeln!(self.stdin, "{service} {status}").unwrap();
        let mut ok = String::new();
        self.out.read_line(&mut ok).unwrap();
        assert_eq!(ok.trim(), "ok");
    }
}

impl Drop for GrpcioHealth {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// grpcio's own health service (grpcio-health-checking), switched between
/// `SERVING` and `NOT_SERVING`, turns the endpoint Unhealthy and back through
/// fall and rise. Needs python3 with grpcio-health-checking; `.ci/run`
/// installs it and runs the ignored tests of this file.
#[tokio::test]
#[ignore = "needs python3 -m pip install grpcio-health-checking; .ci/run runs it"]
async fn a_grpcio_health_server_turns_the_endpoint_unhealthy_and_back() {
    let mut server = GrpcioHealth::start(&[]);
    let addr = server.addr;
    let mut set = |status: &str| server.set("orders", status);
    set("SERVING");

    let prober = Prober::new(Metrics::new().probe, CancellationToken::new());
    let mut transitions = prober.subscribe();
    let key = ServiceKey::new("default", "orders");
    prober.update_service(
        &key,
        &check(grpc_kind("orders"), 100, 2, 2),
        &Default::default(),
        &[Target::new(addr)],
    );
    let t = tokio::time::timeout(SECOND, transitions.recv()).await.unwrap().unwrap();
    assert_eq!((t.from, t.to), (Health::Unknown, Health::Healthy));

    set("NOT_SERVING");
    let t = tokio::time::timeout(SECOND, transitions.recv()).await.unwrap().unwrap();
    assert_eq!((t.from, t.to), (Health::Healthy, Health::Unhealthy));
    assert_eq!(t.error.as_deref(), Some("grpc: service \"orders\" is NOT_SERVING"));

    set("SERVING");
    let t = tokio::time::timeout(SECOND, transitions.recv()).await.unwrap().unwrap();
    assert_eq!((t.from, t.to), (Health::Unhealthy, Health::Healthy));

    // grpcio sends no grpc-message with it.
    let err = probe(&grpc_kind("payments"), addr, SECOND, &TlsClients::default())
        .await
        .unwrap_err();
    assert_eq!(err.message, "grpc: status NOT_FOUND");
}

/// A gRPC check over TLS, against grpcio's health service behind
/// `ssl_server_credentials`: the endpoint's TLS (`backendTLS`) carries the
/// check, verified against the test CA, and its answer decides. Needs python3
/// with grpcio-health-checking; `.ci/run` runs the ignored tests of this file.
#[tokio::test]
#[ignore = "needs python3 -m pip install grpcio-health-checking; .ci/run runs it"]
async fn a_grpc_check_speaks_the_endpoints_tls() {
    use balanced::api::config::BackendTls;
    use balanced::health::probe::probe_with;
    use balanced::tls::upstream::Connector;
    let pki = support::pki::Pki::new("grpc-check");
    let (cert, key) = pki.leaf("grpc", &["grpc.internal"], "grpc.internal");
    let mut server = GrpcioHealth::start(&[cert.as_path(), key.as_path()]);
    let addr = server.addr;
    let mut set = |status: &str| server.set("orders", status);
    set("SERVING");
    let tls = TlsClients::default();
    let connector = |hostname: &str| {
        Connector::new(Arc::new(BackendTls {
            hostname: Some(hostname.into()),
            ca_file: Some(pki.ca()),
            ca_secret: None,
            subject_alt_names: Vec::new(),
            client: None,
            insecure_skip_verify: false,
        }))
    };
    let good = connector("grpc.internal");
    let kind = grpc_kind("orders");
    assert_eq!(probe_with(&kind, addr, SECOND, &tls, Some(&good), None).await, Ok(None));
    set("NOT_SERVING");
    let err = probe_with(&kind, addr, SECOND, &tls, Some(&good), None)
        .await
        .unwrap_err();
    assert_eq!(err.message, "grpc: service \"orders\" is NOT_SERVING");
    set("SERVING");
    let misnamed = connector("other.internal");
    let err = probe_with(&kind, addr, SECOND, &tls, Some(&misnamed), None)
        .await
        .unwrap_err();
    assert!(err.message.contains("not valid for \"other.internal\""), "{err:?}");
    // Plain h2 to a TLS port is no answer.
    assert!(probe(&kind, addr, SECOND, &tls).await.is_err());
}
