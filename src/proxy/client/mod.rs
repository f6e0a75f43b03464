//! The client's side of the proxy: each connection's clock and its
//! listener's table ([`conn`]), and what the request path knows of the
//! connection a request came on ([`Downstream`]).

pub mod conn;

use crate::proxy::tls::Session;
use std::net::SocketAddr;
use std::sync::Arc;

use http::header::HeaderValue;

use self::conn::ConnState;
use crate::proxy::tasks::Tasks;

/// What the proxy says about one client connection in forwarding headers,
/// formatted once per connection rather than once per request.
#[derive(Clone, Debug)]
pub struct Downstream {
    /// The client's address.
    pub peer: SocketAddr,
    /// The connection's shared state (its clock, its in-flight requests).
    pub conn: Arc<ConnState>,
    /// Where the connection's tunnels are spawned, so shutdown waits for them.
    pub tasks: Tasks,
    /// The connection's TLS, when the listener terminates it.
    pub tls: Option<Session>,
    ip: HeaderValue,
    forwarded: HeaderValue,
}

impl Downstream {
    /// The facts of a connection from `peer`.
    pub fn new(peer: SocketAddr, conn: Arc<ConnState>, tasks: Tasks) -> Self {
        let ip = peer.ip().to_string();
        let node = if peer.is_ipv6() {
            format!("\"[{ip}]\"")
        } else {
            ip.clone()
        };
        Self {
            peer,
            conn,
            tasks,
            tls: None,
            ip: HeaderValue::from_str(&ip).unwrap_or_else(|_| HeaderValue::from_static("unknown")),
            forwarded: HeaderValue::from_str(&format!("for={node};proto=http"))
                .unwrap_or_else(|_| HeaderValue::from_static("for=unknown;proto=http")),
        }
    }

    /// The same connection, over TLS when `tls` says so (`proto=https`).
    pub fn with_tls(mut self, tls: Option<Session>) -> Self {
        if tls.is_some()
            && let Ok(v) = HeaderValue::from_str(
                &self
                    .forwarded
                    .to_str()
                    .unwrap_or_default()
                    .replace(";proto=http", ";proto=https"),
            )
        {
            self.forwarded = v;
        }
        self.tls = tls;
        self
    }

    /// `https` over TLS, else `http`: what `X-Forwarded-Proto` says.
    pub fn scheme(&self) -> &'static str {
        if self.tls.is_some() { "https" } else { "http" }
    }

    /// The client's IP as `X-Forwarded-For` lists it.
    pub fn ip_header(&self) -> &HeaderValue {
        &self.ip
    }

    /// The client as a `Forwarded` element (`for=...;proto=http`).
    pub fn forwarded_header(&self) -> &HeaderValue {
        &self.forwarded
    }
}
