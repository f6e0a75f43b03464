//! Shutdown through the shared runtime (`shell::run`): an open WebSocket
//! tunnel keeps working through the grace period, and is closed when it ends.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use balanced::balance::MemberSpec;
use balanced::demo::backend::{Backend, Behavior};
use balanced::metrics::Metrics;
use balanced::shell;
use balanced::source::StaticSource;
use balanced::testing::{eventually, free_port};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

async fn echo(s: &mut TcpStream, msg: &[u8]) -> Result<(), String> {
    s.write_all(msg).await.map_err(|e| e.to_string())?;
    let mut back = vec![0u8; msg.len()];
    tokio::time::timeout(Duration::from_secs(2), s.read_exact(&mut back))
        .await
        .map_err(|_| "no echo within 2 s".to_string())?
        .map_err(|e| e.to_string())?;
    if back == msg {
        Ok(())
    } else {
        Err(format!("echo was {back:?}"))
    }
}

#[tokio::test]
async fn shutdown_waits_for_an_open_websocket_up_to_the_grace_then_closes_it() {
    let ws = Backend::http("ws", Behavior::Status(200)).await;
    let port = free_port();
    let yaml = format!(
        "apiVersion: balanced.dev/v1alpha1\nkind: BalancedService\nmetadata: {{name: ws}}\nspec:\n  \
         endpoints: [{{address: 127.0.0.1, port: {}}}]\n  listeners: [{{name: http, port: {port}}}]\n",
        ws.addr.port()
    );
    let config = Arc::new(balanced::api::load_configs(&yaml).unwrap().remove(0));
    let members = vec![MemberSpec {
        draining: false,
        addr: ws.addr,
        weight: 1,
        backup: false,
        max_connections: 0,
        healthy: true,
        ports: Vec::new(),
        groups: 1,
    }];
    let grace = Duration::from_millis(1500);
    let mut opts = shell::Options::new(Arc::new(Metrics::new()));
    opts.bind = [127, 0, 0, 1].into();
    opts.serving.grace = grace;
    let shutdown = CancellationToken::new();
    let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut running = tokio::spawn(shell::run(
        StaticSource::new(vec![(config, members)]),
        opts,
        admin,
        shutdown.clone(),
    ));

    let listen = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = eventually(Duration::from_secs(5), "the listener to accept", || async {
        TcpStream::connect(listen).await.ok()
    })
    .await;
    s.write_all(b"GET /chat HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
        .await
        .unwrap();
    let head = support::read_head(&mut s).await;
    assert!(head.starts_with("http/1.1 101"), "{head}");
    echo(&mut s, b"before shutdown").await.unwrap();

    let asked = Instant::now();
    shutdown.cancel();
    // The listener stops accepting at once...
    eventually(Duration::from_secs(2), "the listener to close", || async {
        TcpStream::connect(listen).await.is_err().then_some(())
    })
    .await;
    // ...while the tunnel keeps carrying bytes, and the runtime waits for it.
    echo(&mut s, b"during the grace period").await.unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(300), &mut running)
            .await
            .is_err(),
        "the runtime returned while a tunnel was open and the grace not over"
    );
    echo(&mut s, b"still open").await.unwrap();

    let result = tokio::time::timeout(Duration::from_secs(10), &mut running)
        .await
        .expect("the runtime returns once the grace is over")
        .unwrap();
    assert!(result.is_ok(), "{result:?}");
    assert!(
        asked.elapsed() >= grace,
        "returned after {:?}, before the grace",
        asked.elapsed()
    );
    let mut buf = [0u8; 16];
    let closed = tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf)).await;
    assert!(
        matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
        "the tunnel was not closed after the grace: {closed:?}"
    );
}
