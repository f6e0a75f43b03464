//! Streams an h2 endpoint never processed (REFUSED_STREAM, or above its
//! GOAWAY's last stream id) are resent to another endpoint, POST included,
//! without spending the retry budget: the case of a gRPC server stopped
//! under load.

mod support;

use std::net::SocketAddr;

use balanced::demo::backend::http_get;
use bytes::Bytes;
use h2::Reason;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::standalone::proxy;
use tokio::net::{TcpListener, TcpStream};

/// An h2c endpoint that runs `serve` on every connection it takes.
async fn h2_connections<F, Fut>(serve: F) -> SocketAddr
where
    F: Fn(H2Conn) -> Fut + Copy + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            tokio::spawn(async move {
                if let Ok(conn) = h2::server::handshake(s).await {
                    serve(conn).await;
                }
            });
        }
    });
    addr
}

type H2Conn = h2::server::Connection<TcpStream, Bytes>;

/// An h2c endpoint that hands every stream of every connection to `answer`.
async fn h2_endpoint(answer: fn(http::Request<h2::RecvStream>, h2::server::SendResponse<Bytes>)) -> SocketAddr {
    h2_connections(move |mut conn: H2Conn| async move {
        while let Some(Ok((req, respond))) = conn.accept().await {
            answer(req, respond);
        }
    })
    .await
}

/// An h2c endpoint that takes connections and refuses every stream.
async fn refusing_endpoint() -> SocketAddr {
    h2_endpoint(|_, mut respond| respond.send_reset(Reason::REFUSED_STREAM)).await
}

/// An h2c endpoint that answers every connection with GOAWAY (last stream
/// id 0) before it reads a stream: whatever was sent was not processed.
async fn going_away_endpoint() -> SocketAddr {
    h2_connections(|mut conn: H2Conn| async move {
        conn.abrupt_shutdown(Reason::NO_ERROR);
        while let Some(Ok(_)) = conn.accept().await {}
        // A server that drains: the socket stays open a moment after
        // the GOAWAY, so the client reads it before any reset.
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    })
    .await
}

/// An h2c endpoint that answers `200 fine` to requests that carry the
/// client's `x-call` header, and `400` to those that lost it on the way.
async fn header_checking_endpoint() -> SocketAddr {
    h2_endpoint(|req, mut respond| {
        let ok = req.headers().contains_key("x-call");
        let resp = http::Response::builder()
            .status(if ok { 200 } else { 400 })
            .body(())
            .unwrap();
        if let Ok(mut body) = respond.send_response(resp, false) {
            let _ = body.send_data(Bytes::from_static(if ok { b"fine" } else { b"headers lost" }), true);
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_an_endpoint_never_processed_go_elsewhere_without_spending_the_budget() {
    let refusing = refusing_endpoint().await;
    let going = going_away_endpoint().await;
    let fine = header_checking_endpoint().await;
    // A budget of one retry per 10 s: any retry it had to pay for would
    // leave most of these requests failed.
    let p = proxy(
        &[refusing, going, fine],
        "HTTP, appProtocol: kubernetes.io/h2c",
        "  algorithm: RoundRobin\n  passiveHealth: {maxFails: 0}\n  retry: {budget: {percent: 0, minRetryRate: {count: 1, interval: 10s}}}",
        3,
    )
    .await;
    let stream = TcpStream::connect(p.listen).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    for i in 0..30 {
        // gRPC calls are POSTs: resent only because nothing was processed.
        let req = http::Request::post(format!("http://{}/call", p.listen))
            .header("x-call", i.to_string())
            .body(Full::new(Bytes::from_static(b"payload")))
            .unwrap();
        let resp = sender.send_request(req).await.unwrap();
        let status = resp.status();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!((status.as_u16(), &body[..]), (200, &b"fine"[..]), "request {i}");
    }
    let (_, metrics) = http_get(p.admin, "/metrics").await.unwrap();
    let exhausted: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("balanced_upstream_retry_budget_exhausted_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(exhausted, 0.0, "the budget was asked to pay");
}

/// An h2c gRPC endpoint that answers every call `UNAVAILABLE` in a
/// trailers-only response, as a grpcio server answers the calls it had not
/// started when it stops.
async fn unavailable_endpoint() -> SocketAddr {
    h2_endpoint(|_, mut respond| {
        let resp = http::Response::builder()
            .header("content-type", "application/grpc")
            .header("grpc-status", "14")
            .header("grpc-message", "Cancelling all calls")
            .body(())
            .unwrap();
        let _ = respond.send_response(resp, true);
    })
    .await
}

/// gRPC calls to `p` on one h2c connection: (grpc-status of the head, body) each.
async fn grpc_calls(listen: SocketAddr, n: usize) -> Vec<(Option<String>, Bytes)> {
    let stream = TcpStream::connect(listen).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut out = Vec::new();
    for i in 0..n {
        let req = http::Request::post(format!("http://{listen}/pkg.Svc/Call"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .header("x-call", i.to_string())
            .body(Full::new(Bytes::from_static(b"\0\0\0\0\0")))
            .unwrap();
        let resp = sender.send_request(req).await.unwrap();
        let status = resp
            .headers()
            .get("grpc-status")
            .map(|v| v.to_str().unwrap().to_owned());
        out.push((status, resp.into_body().collect().await.unwrap().to_bytes()));
    }
    out
}

/// Ten gRPC calls through a proxy over `bad` and a good endpoint in round
/// robin, with `GrpcUnavailable` in `retry.on` or not: the proxy (for its
/// metrics) and each call's answer.
async fn grpc_calls_beside_a_good_endpoint(
    bad: SocketAddr,
    grpc_unavailable: bool,
) -> (support::standalone::Proxy, Vec<(Option<String>, Bytes)>) {
    let fine = header_checking_endpoint().await;
    let mut extra = String::from("  algorithm: RoundRobin\n  passiveHealth: {maxFails: 0}\n");
    if grpc_unavailable {
        extra.push_str("  retry: {on: [Error, Timeout, GrpcUnavailable]}\n");
    }
    let p = proxy(&[bad, fine], "HTTP, appProtocol: kubernetes.io/h2c", &extra, 2).await;
    let answers = grpc_calls(p.listen, 10).await;
    (p, answers)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_unavailable_answer_goes_elsewhere_only_when_retry_on_names_it() {
    let unavailable = unavailable_endpoint().await;
    let (with, answers) = grpc_calls_beside_a_good_endpoint(unavailable, true).await;
    for (i, (status, body)) in answers.into_iter().enumerate() {
        // A POST, retried without NonIdempotent: the condition names gRPC calls.
        assert_eq!((status, &body[..]), (None, &b"fine"[..]), "call {i}");
    }
    let (_, metrics) = http_get(with.admin, "/metrics").await.unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("balanced_upstream_retries_total") && l.contains("GrpcUnavailable")),
        "retries counted under their condition"
    );
    let (_, answers) = grpc_calls_beside_a_good_endpoint(unavailable, false).await;
    let relayed = answers.iter().filter(|(s, _)| s.as_deref() == Some("14")).count();
    assert_eq!(
        relayed, 5,
        "round robin: every other call gets the endpoint's own answer: {answers:?}"
    );
}

/// An h2c endpoint that takes each connection's first call and closes the
/// connection without answering it, as a grpcio server stopped with no grace
/// drops the calls it had taken.
async fn closing_endpoint() -> SocketAddr {
    h2_connections(|mut conn: H2Conn| async move {
        let _taken = conn.accept().await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_call_whose_connection_broke_goes_elsewhere_only_when_retry_on_names_grpc_unavailable() {
    let closing = closing_endpoint().await;
    let (_with, answers) = grpc_calls_beside_a_good_endpoint(closing, true).await;
    for (i, (status, body)) in answers.into_iter().enumerate() {
        assert_eq!((status, &body[..]), (None, &b"fine"[..]), "call {i}");
    }
    // Without it the call was sent and may have been processed: a POST
    // goes back to the client failed, as nginx and Envoy (no `reset`) do.
    let (_without, answers) = grpc_calls_beside_a_good_endpoint(closing, false).await;
    let fine_calls = answers.iter().filter(|(_, body)| &body[..] == b"fine").count();
    assert_eq!(fine_calls, 5, "round robin: every other call is lost: {answers:?}");
}
