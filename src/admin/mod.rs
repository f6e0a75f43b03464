//! The admin HTTP server: `/status` (JSON, or a page for people: [`page`]),
//! `/metrics`, `/healthz`, `/readyz`, and the assign API.
//!
//! Kept apart from the listeners so a flood of client traffic cannot hide the
//! process's own view of itself, and bound to loopback by default.

pub mod page;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// What the admin server shows; standalone and the proxy each provide one.
pub trait AdminView: Send + Sync + 'static {
    /// The `/status` document, as JSON text.
    fn status(&self) -> String;
    /// Whether `/readyz` answers 200.
    fn ready(&self) -> bool;
    /// The `/metrics` text.
    fn metrics(&self) -> String;
    /// The assign API: the endpoint `key`'s algorithm picks among its healthy
    /// ones (`hash` is the ConsistentHash key), or the status and reason why none.
    fn pick(
        &self,
        key: &crate::api::config::ServiceKey,
        hash: Option<&str>,
    ) -> Result<std::net::SocketAddr, (StatusCode, String)> {
        let _ = (key, hash);
        Err((StatusCode::NOT_FOUND, "this server has no assign API\n".into()))
    }
}

/// Serves the admin endpoints on `listener` until `shutdown` is cancelled.
pub async fn serve(listener: TcpListener, view: Arc<dyn AdminView>, shutdown: CancellationToken) {
    loop {
        let (stream, _) = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "admin: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let view = view.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let view = view.clone();
                async move {
                    if matches!(req.uri().path(), "/status" | "/metrics") {
                        // 10,000 endpoints take ~100 ms to render: on a blocking
                        // thread, so the probes and requests on this runtime
                        // (one thread when pinned to a core) are not held up.
                        let rendered = tokio::task::spawn_blocking(move || route(&*view, req)).await;
                        return Ok::<_, Infallible>(
                            rendered.unwrap_or_else(|_| text(StatusCode::INTERNAL_SERVER_ERROR, "rendering failed\n")),
                        );
                    }
                    Ok(route(&*view, req))
                }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = shutdown.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(Duration::from_secs(5), conn).await;
                }
            }
        });
    }
}

fn route(view: &dyn AdminView, req: Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n");
    }
    match req.uri().path() {
        "/status" => {
            let accept = req.headers().get(header::ACCEPT).and_then(|a| a.to_str().ok());
            let body = view.status();
            let (content_type, body) = match page::Format::of(req.uri().query(), accept) {
                page::Format::Json => ("application/json", body),
                other => {
                    let doc: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
                    match other {
                        page::Format::Csv => ("text/csv; charset=utf-8", page::csv(&doc)),
                        _ => ("text/html; charset=utf-8", page::html(&doc, STATUS_REFRESH_SECS)),
                    }
                }
            };
            Response::builder()
                .header(header::CONTENT_TYPE, content_type)
                .header(header::VARY, "accept")
                .body(Full::new(Bytes::from(body)))
                .expect("static response parts are valid")
        }
        "/metrics" => Response::builder()
            .header(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)
            .body(Full::new(Bytes::from(view.metrics())))
            .expect("static response parts are valid"),
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" if view.ready() => text(StatusCode::OK, "ready\n"),
        "/readyz" => text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
        path => match pick_path(path) {
            Some(key) => {
                let hash = req
                    .uri()
                    .query()
                    .and_then(|q| q.split('&').find_map(|p| p.strip_prefix("key=")));
                match view.pick(&key, hash) {
                    Ok(addr) => Response::builder()
                        .header(header::CONTENT_TYPE, "application/json")
                        .body(Full::new(Bytes::from(
                            serde_json::json!({"address": addr.ip().to_string(), "port": addr.port()}).to_string(),
                        )))
                        .expect("static response parts are valid"),
                    Err((status, why)) => Response::builder()
                        .status(status)
                        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
                        .body(Full::new(Bytes::from(why)))
                        .expect("static response parts are valid"),
                }
            }
            None => text(
                StatusCode::NOT_FOUND,
                "try /status, /metrics, /healthz, /readyz or /v1/namespaces/NS/balancedservices/NAME/pick\n",
            ),
        },
    }
}

/// How often the HTML status page reloads itself.
const STATUS_REFRESH_SECS: u32 = 5;

/// `NS/NAME` from `/v1/namespaces/NS/balancedservices/NAME/pick`.
fn pick_path(path: &str) -> Option<crate::api::config::ServiceKey> {
    let rest = path.strip_prefix("/v1/namespaces/")?;
    let (ns, rest) = rest.split_once('/')?;
    let name = rest.strip_prefix("balancedservices/")?.strip_suffix("/pick")?;
    (!ns.is_empty() && !name.is_empty() && !name.contains('/')).then(|| crate::api::config::ServiceKey::new(ns, name))
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .expect("static response parts are valid")
}
