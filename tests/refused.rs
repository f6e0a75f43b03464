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

/// An h2c endpoint that takes connections and refuses every stream.
async fn refusing_endpoint() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(mut conn) = h2::server::handshake(s).await else {
                    return;
                };
                while let Some(Ok((_req, mut respond))) = conn.accept().await {
                    respond.send_reset(Reason::REFUSED_STREAM);
                }
            });
        }
    });
    addr
}

/// An h2c endpoint that answers every connection with GOAWAY (last stream
/// id 0) before it reads a stream: whatever was sent was not processed.
async fn going_away_endpoint() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(mut conn) = h2::server::handshake(s).await else {
                    return;
                };
                conn.abrupt_shutdown(Reason::NO_ERROR);
                while let Some(Ok(_)) = conn.accept().await {}
                // A server that drains: the socket stays open a moment after
                // the GOAWAY, so the client reads it before any reset.
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            });
        }
    });
    addr
}

/// An h2c endpoint that answers `200 fine` to requests that carry the
/// client's `x-call` header, and `400` to those that lost it on the way.
async fn header_checking_endpoint() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(mut conn) = h2::server::handshake(s).await else {
                    return;
                };
                while let Some(Ok((req, mut respond))) = conn.accept().await {
                    let ok = req.headers().contains_key("x-call");
                    let resp = http::Response::builder()
                        .status(if ok { 200 } else { 400 })
                        .body(())
                        .unwrap();
                    if let Ok(mut body) = respond.send_response(resp, false) {
                        let _ = body.send_data(Bytes::from_static(if ok { b"fine" } else { b"headers lost" }), true);
                    }
                }
            });
        }
    });
    addr
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
