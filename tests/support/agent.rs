//! A HAProxy-style agent: answers every connection with one line, then closes.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub struct Agent {
    pub addr: SocketAddr,
    line: Arc<Mutex<String>>,
    stop: CancellationToken,
}

impl Agent {
    /// An agent on `ip:port` (0 picks one) answering `line`.
    pub async fn start(ip: IpAddr, port: u16, line: &str) -> Agent {
        let listener = TcpListener::bind(SocketAddr::new(ip, port)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let line = Arc::new(Mutex::new(line.to_string()));
        let stop = CancellationToken::new();
        let (l, s) = (line.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let mut conn = tokio::select! {
                    _ = s.cancelled() => return,
                    c = listener.accept() => match c { Ok((c, _)) => c, Err(_) => continue },
                };
                let answer = format!("{}\n", l.lock().unwrap());
                let _ = conn.write_all(answer.as_bytes()).await;
            }
        });
        Agent { addr, line, stop }
    }

    /// What it answers from now on.
    pub fn say(&self, line: &str) {
        *self.line.lock().unwrap() = line.to_string();
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// An HTTP server whose every answer is 200 with `name: value` set by
/// [`HeaderServer::say`] (the HTTP check's agent header).
pub struct HeaderServer {
    pub addr: SocketAddr,
    value: Arc<Mutex<String>>,
    stop: CancellationToken,
}

impl HeaderServer {
    pub async fn start(name: &str, value: &str) -> HeaderServer {
        use tokio::io::AsyncReadExt;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let value = Arc::new(Mutex::new(value.to_string()));
        let stop = CancellationToken::new();
        let (v, s, name) = (value.clone(), stop.clone(), name.to_string());
        tokio::spawn(async move {
            loop {
                let mut conn = tokio::select! {
                    _ = s.cancelled() => return,
                    c = listener.accept() => match c { Ok((c, _)) => c, Err(_) => continue },
                };
                let answer = format!(
                    "HTTP/1.1 200 OK\r\nServer: test\r\n{name}: {}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                    v.lock().unwrap()
                );
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    let _ = conn.read(&mut buf).await;
                    let _ = conn.write_all(answer.as_bytes()).await;
                });
            }
        });
        HeaderServer { addr, value, stop }
    }

    pub fn say(&self, value: &str) {
        *self.value.lock().unwrap() = value.to_string();
    }
}

impl Drop for HeaderServer {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
