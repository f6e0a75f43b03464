//! Helpers for integration tests: TLS backends (rcgen), standalone files, a test API server.
#![allow(dead_code)]

pub mod agent;
pub mod apiserver;
pub mod pki;
pub mod standalone;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Reads an HTTP/1.1 response head byte by byte (what follows it, such as
/// an upgraded tunnel's bytes, stays unread); lower-cased.
pub async fn read_head(s: &mut tokio::net::TcpStream) -> String {
    use tokio::io::AsyncReadExt;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte).await.unwrap();
        head.push(byte[0]);
    }
    String::from_utf8_lossy(&head).to_lowercase()
}

/// A TLS server with a self-signed certificate for `localhost`; completes
/// handshakes and closes. Dropping the token stops it.
pub async fn tls_backend() -> (SocketAddr, CancellationToken) {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(cert.signing_key.serialize_der().into());
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.cert.der().clone()], key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let token = stop.clone();
    tokio::spawn(async move {
        loop {
            let stream = tokio::select! {
                _ = token.cancelled() => return,
                a = listener.accept() => a.unwrap().0,
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let _ = acceptor.accept(stream).await;
            });
        }
    });
    (addr, stop)
}

/// A standalone YAML document with the given endpoints and health-check lines.
pub fn standalone_yaml(name: &str, endpoints: &[SocketAddr], health: &str) -> String {
    let eps: Vec<String> = endpoints
        .iter()
        .map(|a| format!("    - {{address: {}, port: {}}}", a.ip(), a.port()))
        .collect();
    format!(
        "apiVersion: balanced.dev/v1alpha1\nkind: BalancedService\nmetadata: {{name: {name}}}\nspec:\n  endpoints:\n{}\n  listeners: [{{name: http, port: {}}}]\n  healthCheck:\n{health}\n",
        eps.join("\n"),
        balanced::testing::free_port()
    )
}

/// A backend whose every answer is endless zeros, or, to a WebSocket
/// upgrade, a tunnel that floods zeros (a download that a
/// non-reading client never finishes).
pub async fn endless_backend() -> SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let block = bytes::Bytes::from(vec![0u8; 64 * 1024]);
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let block = block.clone();
            tokio::spawn(async move {
                let mut head = [0u8; 4096];
                let n = s.read(&mut head).await.unwrap_or(0);
                if n == 0 {
                    return;
                }
                let upgrade = String::from_utf8_lossy(&head[..n])
                    .to_lowercase()
                    .contains("upgrade: websocket");
                let answer: &[u8] = if upgrade {
                    b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n"
                } else {
                    b"HTTP/1.1 200 OK\r\ncontent-length: 1000000000\r\n\r\n"
                };
                let _ = s.write_all(answer).await;
                while s.write_all(&block).await.is_ok() {}
            });
        }
    });
    addr
}
