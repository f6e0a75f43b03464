//! Hostile clients and the framing rules the README promises, against real
//! sockets: a recording backend that shows exactly what was forwarded, and
//! a backend with an endless answer for clients that never read. (What 200
//! such clients cost in memory is `hostile_memory.rs`: a process of its own.)

mod support;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::endless_backend;
use support::standalone::proxy;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What a recording backend received: each request's head (lower-cased) and body.
type Received = Arc<Mutex<Vec<(String, Vec<u8>)>>>;

/// An HTTP/1.1 backend that records each request's head and de-chunked
/// body, and answers `200 ok`.
async fn recording_backend() -> (SocketAddr, Received) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let got: Received = Arc::default();
    let log = got.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let log = log.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                loop {
                    let Some(end) = find(&buf, b"\r\n\r\n") else {
                        let mut chunk = [0u8; 4096];
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                        continue;
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
                    buf.drain(..end + 4);
                    let body = if head.contains("transfer-encoding: chunked") {
                        read_chunked(&mut s, &mut buf).await
                    } else {
                        let len = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length: "))
                            .and_then(|v| v.trim().parse::<usize>().ok())
                            .unwrap_or(0);
                        while buf.len() < len {
                            let mut chunk = [0u8; 4096];
                            match s.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        }
                        buf.drain(..len).collect()
                    };
                    log.lock().unwrap().push((head, body));
                    if s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    (addr, got)
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

async fn read_chunked(s: &mut TcpStream, buf: &mut Vec<u8>) -> Vec<u8> {
    let mut body = Vec::new();
    loop {
        while find(buf, b"\r\n").is_none() {
            let mut chunk = [0u8; 4096];
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return body,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let line_end = find(buf, b"\r\n").unwrap();
        let size = usize::from_str_radix(std::str::from_utf8(&buf[..line_end]).unwrap().trim(), 16).unwrap();
        buf.drain(..line_end + 2);
        while buf.len() < size + 2 {
            let mut chunk = [0u8; 4096];
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return body,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        body.extend_from_slice(&buf[..size]);
        buf.drain(..size + 2);
        if size == 0 {
            return body;
        }
    }
}

/// Writes `request`, reads until the proxy closes (10 s at most).
async fn exchange(addr: SocketAddr, request: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut got = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut got)).await;
    assert!(
        closed.is_ok(),
        "still open after 10 s: {}",
        String::from_utf8_lossy(&got)
    );
    String::from_utf8_lossy(&got).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_length_with_transfer_encoding_is_read_chunked_forwarded_without_it_then_closed() {
    let (backend, got) = recording_backend().await;
    let p = proxy(&[backend], "HTTP", "", 1).await;
    // No `Connection: close`: the proxy must close on its own after answering.
    let answer = exchange(
        p.listen,
        b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let got = got.lock().unwrap();
    let (head, body) = &got[0];
    assert_eq!(body, b"hello", "the chunked framing won");
    // The client's Content-Length is gone; what framing there is upstream
    // describes the decoded body (a small one is buffered and sent with its length).
    assert!(
        !head.contains("content-length: 3"),
        "the client's Content-Length forwarded: {head}"
    );
    assert!(
        head.contains("content-length: 5") ^ head.contains("transfer-encoding: chunked"),
        "one framing, of the decoded body: {head}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_absolute_form_target_replaces_host_for_routing_and_upstream() {
    let (main, main_got) = recording_backend().await;
    let (shop, shop_got) = recording_backend().await;
    let extra = format!(
        "  backends: [{{name: shop, endpoints: [{{address: 127.0.0.1, port: {}}}]}}]\n  routes: [{{name: shop, matches: [{{hostnames: [other.example]}}], backendRefs: [{{name: shop}}]}}]",
        shop.port()
    );
    let p = proxy(&[main], "HTTP", &extra, 2).await;
    let answer = exchange(
        p.listen,
        b"GET http://other.example/p HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        main_got.lock().unwrap().is_empty(),
        "the route on other.example was not taken"
    );
    let got = shop_got.lock().unwrap();
    let head = &got[0].0;
    assert!(head.starts_with("get /p http/1.1"), "origin-form upstream: {head}");
    assert!(
        head.contains("host: other.example\r\n"),
        "the target's authority is Host: {head}"
    );
    assert!(!head.contains("host: a\r\n"), "{head}");
}

async fn h2_sender(addr: SocketAddr) -> hyper::client::conn::http2::SendRequest<Full<Bytes>> {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    sender
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2_host_that_disagrees_with_authority_is_a_400() {
    let (backend, got) = recording_backend().await;
    let p = proxy(&[backend], "HTTP", "", 1).await;
    let mut sender = h2_sender(p.listen).await;
    let req = |host: &str| {
        http::Request::get("http://a.example/")
            .header("host", host)
            .body(Full::new(Bytes::new()))
            .unwrap()
    };
    let status = sender.send_request(req("b.example")).await.unwrap().status();
    assert_eq!(status, 400);
    assert!(got.lock().unwrap().is_empty(), "never forwarded");
    let status = sender.send_request(req("A.example")).await.unwrap().status();
    assert_eq!(status, 200, "the same authority in another case agrees");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_header_fields_than_max_request_headers_get_431_on_http1_and_http2() {
    let (backend, _) = recording_backend().await;
    let p = proxy(&[backend], "HTTP", "  limits: {maxRequestHeaders: 20}", 1).await;
    let fields = |n: usize| (0..n).map(|i| format!("x-f{i}: v\r\n")).collect::<String>();
    // Host plus 19 more: at the limit.
    let ok = exchange(
        p.listen,
        format!("GET / HTTP/1.1\r\nHost: a\r\n{}Connection: close\r\n\r\n", fields(18)).as_bytes(),
    )
    .await;
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    let refused = exchange(
        p.listen,
        format!("GET / HTTP/1.1\r\nHost: a\r\n{}Connection: close\r\n\r\n", fields(30)).as_bytes(),
    )
    .await;
    assert!(refused.starts_with("HTTP/1.1 431"), "{refused}");

    let mut sender = h2_sender(p.listen).await;
    let mut req = http::Request::get("http://a/").body(Full::new(Bytes::new())).unwrap();
    for i in 0..30 {
        req.headers_mut().insert(
            http::HeaderName::try_from(format!("x-f{i}")).unwrap(),
            "v".parse().unwrap(),
        );
    }
    assert_eq!(sender.send_request(req).await.unwrap().status(), 431);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_is_closed_at_response_write() {
    let backend = endless_backend().await;
    let p = proxy(&[backend], "HTTP", "  timeouts: {responseWrite: 500ms}", 1).await;
    let mut s = TcpStream::connect(p.listen).await.unwrap();
    s.write_all(b"GET /big HTTP/1.1\r\nHost: a\r\n\r\n").await.unwrap();
    // The window the client does not read in: the scenario, not a wait.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut got = 0usize;
    let mut buf = vec![0u8; 64 * 1024];
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got += n,
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the connection stayed open ({got} bytes read)");
    assert!(got < 50 * 1024 * 1024, "the answer was cut short: {got} bytes");
    let (_, metrics) = balanced::demo::backend::http_get(p.admin, "/metrics").await.unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.contains("reason=\"responseWrite\"") && l.ends_with(" 1")),
        "counted: {}",
        metrics
            .lines()
            .filter(|l| l.contains("closed"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// A backend that expects exactly `chunked` after a chunked request's head
/// (the chunks as the client sent them), or `whole` after one with a
/// Content-Length, and answers `same` or `differs`.
async fn comparing_backend(chunked: Arc<Vec<u8>>, whole: Arc<Vec<u8>>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let (chunked, whole) = (chunked.clone(), whole.clone());
            tokio::spawn(async move {
                let mut expected = chunked;
                let mut buf = vec![0u8; 1 << 16];
                let mut head = Vec::new();
                let mut at = loop {
                    let n = match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    head.extend_from_slice(&buf[..n]);
                    if let Some(end) = find(&head, b"\r\n\r\n") {
                        let rest = head.split_off(end + 4);
                        if !String::from_utf8_lossy(&head)
                            .to_lowercase()
                            .contains("transfer-encoding: chunked")
                        {
                            expected = whole.clone();
                        }
                        if rest != expected[..rest.len()] {
                            break usize::MAX;
                        }
                        break rest.len();
                    }
                };
                while at < expected.len() {
                    let n = match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    if at + n > expected.len() || buf[..n] != expected[at..at + n] {
                        at = usize::MAX;
                        break;
                    }
                    at += n;
                }
                let answer: &[u8] = if at == expected.len() {
                    b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nsame"
                } else {
                    b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 7\r\n\r\ndiffers"
                };
                let _ = s.write_all(answer).await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_megabytes_in_one_byte_chunks_reach_the_endpoint_intact() {
    // hyper's path costs microseconds per chunk: with the fast path off
    // (BALANCED_HTTP1=hyper) the same check runs on 64 KiB.
    let size = if balanced::proxy::http::fast::enabled() {
        10 << 20
    } else {
        64 << 10
    };
    let whole: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
    let mut body = Vec::with_capacity(size * 6 + 5);
    for b in &whole {
        body.extend_from_slice(b"1\r\n");
        body.push(*b);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(b"0\r\n\r\n");
    let body = Arc::new(body);
    // The hyper path buffers a body that fits retry.maxBodyBytes and sends
    // it with a Content-Length; the fast path passes the chunks on.
    let backend = comparing_backend(body.clone(), Arc::new(whole)).await;
    let p = proxy(&[backend], "HTTP", "", 1).await;
    let mut s = TcpStream::connect(p.listen).await.unwrap();
    let (mut rd, mut wr) = s.split();
    let send = async {
        wr.write_all(b"POST /up HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n")
            .await
            .unwrap();
        wr.write_all(&body).await.unwrap();
    };
    let mut answer = Vec::new();
    let read = async {
        let mut buf = [0u8; 4096];
        while !answer.ends_with(b"same") && !answer.ends_with(b"differs") {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(120), async { tokio::join!(send, read) })
        .await
        .expect("the upload went through within 120 s");
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.starts_with("HTTP/1.1 200 OK") && answer.ends_with("same"),
        "{answer}"
    );
}

/// A keep-alive backend: `GET /big` is `len` bytes of a pattern with a
/// `Content-Length`, anything else `ok`; it records which of its connections
/// (numbered as accepted) served each request.
async fn sized_backend(len: usize) -> (SocketAddr, Arc<Mutex<Vec<usize>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let served: Arc<Mutex<Vec<usize>>> = Arc::default();
    let log = served.clone();
    let body = Bytes::from(pattern(len));
    tokio::spawn(async move {
        let mut accepted = 0;
        while let Ok((mut s, _)) = listener.accept().await {
            accepted += 1;
            let (body, log, id) = (body.clone(), log.clone(), accepted);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                loop {
                    while find(&buf, b"\r\n\r\n").is_none() {
                        let mut chunk = [0u8; 4096];
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let end = find(&buf, b"\r\n\r\n").unwrap();
                    let big = buf.starts_with(b"GET /big ");
                    buf.drain(..end + 4);
                    log.lock().unwrap().push(id);
                    let answer = if big { body.clone() } else { Bytes::from_static(b"ok") };
                    let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", answer.len());
                    if s.write_all(head.as_bytes()).await.is_err() || s.write_all(&answer).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, served)
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

/// Reads one answer with a `Content-Length` from `s`, a little at a time;
/// returns its body.
async fn read_answer(s: &mut TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    let mut piece = [0u8; 1024];
    let end = loop {
        if let Some(end) = find(&got, b"\r\n\r\n") {
            break end;
        }
        let n = s.read(&mut piece).await.unwrap();
        assert!(n > 0, "closed before a head: {:?}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&piece[..n]);
    };
    let head = String::from_utf8_lossy(&got[..end]).to_lowercase();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
        .expect("a content-length")
        .trim()
        .parse()
        .unwrap();
    let mut body = got.split_off(end + 4);
    while body.len() < len {
        let n = s.read(&mut piece).await.unwrap();
        assert!(n > 0, "closed after {} of {len} bytes", body.len());
        body.extend_from_slice(&piece[..n]);
    }
    assert_eq!(body.len(), len, "more than the answer arrived");
    body
}

/// A multi-megabyte answer (spliced on the fast path) read a little at a
/// time by a client with a small window arrives intact, and both connections carry on: the
/// next request on the client's connection is answered on the same endpoint
/// connection (nothing of the next answer was taken with the body).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_answer_read_slowly_arrives_intact_and_the_connections_carry_on() {
    const LEN: usize = 4 * 1024 * 1024 + 7;
    let (backend, served) = sized_backend(LEN).await;
    let p = proxy(&[backend], "HTTP", "", 1).await;
    let s = std::net::TcpStream::connect(p.listen).unwrap();
    // Small enough that the proxy's writes wait on the client; a window of a
    // few KiB would make the transfer crawl at delayed-ACK pace.
    socket2::SockRef::from(&s).set_recv_buffer_size(64 * 1024).unwrap();
    s.set_nonblocking(true).unwrap();
    let mut s = TcpStream::from_std(s).unwrap();
    for _ in 0..2 {
        s.write_all(b"GET /big HTTP/1.1\r\nHost: a\r\n\r\n").await.unwrap();
        assert!(read_answer(&mut s).await == pattern(LEN), "the body arrived changed");
        s.write_all(b"GET /small HTTP/1.1\r\nHost: a\r\n\r\n").await.unwrap();
        assert_eq!(read_answer(&mut s).await, b"ok");
    }
    let served = served.lock().unwrap().clone();
    assert_eq!(served.len(), 4, "{served:?}");
    assert!(
        served.iter().all(|&c| c == served[0]),
        "the endpoint connection was not reused after the large answers: {served:?}"
    );
}
