//! The forward phase of an Upgrade request (WebSocket and friends): routed
//! like any request (its route's rate limit and retry policy apply), a
//! connection opened through the attempt loop, the request sent once, and on
//! 101 the two upgraded connections joined byte for byte.

use http::{Request, Response, StatusCode};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;

use super::answer::{self, plain};
use super::body::{self, ProxyBody};
use super::headers::{add_forwarding, shape_for, strip_hop_by_hop};
use super::relay::relayed;
use super::route::Routed;
use crate::proxy::access;
use crate::proxy::attempt::{self, Connected};
use crate::proxy::client::Downstream;
use crate::proxy::service::{Current, ServiceRuntime};
use crate::proxy::upstream::body::{IncomingBody, UpBody, Upload};
use crate::proxy::upstream::pool::{Protocol, Release};
use crate::proxy::upstream::{EndpointBody, classify};
use crate::tls::upstream::Alpn;

/// Forwards an upgrade through `listener`; once the request is sent it is
/// not replayed.
pub async fn tunnel(
    service: &ServiceRuntime,
    mut req: Request<IncomingBody>,
    client: &Downstream,
    current: &Current,
    listener: usize,
    routed: &Routed<'_>,
    key: Option<u64>,
) -> (Response<ProxyBody>, access::Upstream) {
    let config = &current.config;
    let mut up = access::Upstream::default();
    let attempts = routed.attempts(service, current, key);
    let Connected {
        stream,
        guard,
        endpoint,
        tries,
    } = match attempt::connect(attempts, current, listener, |pool| async move {
        pool.connect(Alpn::Http1).await
    })
    .await
    {
        Ok(connected) => connected,
        Err(end) => {
            up.attempts = end.tries as u32;
            up.flags.set(end.flags(&current.snap));
            return (answer::exhausted(&end, config.error_detail), up);
        }
    };
    up.attempts = tries as u32;
    up.endpoint = Some(endpoint);
    let client_upgrade = hyper::upgrade::on(&mut req);
    let (mut parts, body) = req.into_parts();
    strip_hop_by_hop(&mut parts.headers, false);
    add_forwarding(
        &mut parts.headers,
        client,
        config.listeners[listener].trust_forwarded_headers,
    );
    shape_for(&mut parts, Protocol::Http1);
    let request = Request::from_parts(
        parts,
        UpBody::Stream {
            head: None,
            rest: body,
            upload: Upload::new(config.timeouts.request_body),
        },
    );
    let (mut sender, conn) = match http1::handshake(TokioIo::new(stream)).await {
        Ok(pair) => pair,
        Err(e) => {
            return (
                plain(StatusCode::BAD_GATEWAY, format!("upgrade handshake failed: {e}\n")),
                up,
            );
        }
    };
    client.tasks.spawn(async move {
        let _ = conn.with_upgrades().await;
    });
    let mut resp = match tokio::time::timeout(routed.response_timeout, sender.send_request(request)).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            let text = format!("502 Bad Gateway: upgrade failed: {}\n", classify(&e).1);
            return (plain(StatusCode::BAD_GATEWAY, text), up);
        }
        Err(_) => {
            return (
                plain(StatusCode::GATEWAY_TIMEOUT, "504 Gateway Timeout: upgrade timed out\n"),
                up,
            );
        }
    };
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        return (
            relayed(
                resp.map(EndpointBody::H1),
                guard,
                Release::None,
                endpoint,
                config.endpoint_header,
            ),
            up,
        );
    }
    let upstream_upgrade = hyper::upgrade::on(&mut resp);
    // From here the client connection carries bytes, not requests: its
    // clock becomes the tunnel's idle timeout.
    client.conn.set_tunnel();
    client.tasks.spawn(async move {
        let _guard = guard;
        if let (Ok(client), Ok(upstream)) = tokio::join!(client_upgrade, upstream_upgrade) {
            let mut client = TokioIo::new(client);
            let mut upstream = TokioIo::new(upstream);
            let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
        }
    });
    let (parts, _) = resp.into_parts();
    (Response::from_parts(parts, body::empty()), up)
}
