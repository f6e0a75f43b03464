//! A test CA (rcgen) and what it signs, written as PEM files, and the
//! TLS clients we did not write (curl, `openssl s_client`) that check them.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use tokio::net::TcpListener;

/// A CA and what it signs, written as PEM files under `dir`.
pub struct Pki {
    /// Where the files are.
    pub dir: PathBuf,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl Pki {
    /// A new CA, its certificate in `ca.pem` under a fresh directory.
    pub fn new(name: &str) -> Self {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("tls-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "balanced test CA");
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let ca = params.self_signed(&ca_key).unwrap();
        std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
        let issuer = rcgen::Issuer::new(params, ca_key);
        Self { dir, issuer }
    }

    /// A leaf for `names`, signed by the CA, written as `file.pem` and `file.key`.
    pub fn leaf(&self, file: &str, names: &[&str], common_name: &str) -> (PathBuf, PathBuf) {
        self.leaf_until(file, names, common_name, 4000)
    }

    /// [`Pki::leaf`], valid until January 1st of `year`.
    pub fn leaf_until(&self, file: &str, names: &[&str], common_name: &str, year: i32) -> (PathBuf, PathBuf) {
        let mut params =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
        params.distinguished_name.push(rcgen::DnType::CommonName, common_name);
        params.not_before = rcgen::date_time_ymd(2000, 1, 1);
        params.not_after = rcgen::date_time_ymd(year, 1, 1);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let (c, k) = (
            self.dir.join(format!("{file}.pem")),
            self.dir.join(format!("{file}.key")),
        );
        // Written beside and renamed over, as a Secret volume or cert-manager does.
        std::fs::write(self.dir.join("tmp.pem"), cert.pem()).unwrap();
        std::fs::write(self.dir.join("tmp.key"), key.serialize_pem()).unwrap();
        std::fs::rename(self.dir.join("tmp.key"), &k).unwrap();
        std::fs::rename(self.dir.join("tmp.pem"), &c).unwrap();
        (c, k)
    }

    /// The CA certificate's file.
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// curl's `http_version status body` for `https://NAME:PORT/`, verified against the test CA.
pub async fn curl(ca: &Path, name: &str, port: u16, version: &str) -> String {
    let (ca, name, version) = (ca.to_path_buf(), name.to_string(), version.to_string());
    tokio::task::spawn_blocking(move || {
        let out = Command::new("curl")
            .args(["-sS", "--max-time", "5", &version, "--cacert"])
            .arg(&ca)
            .args([
                "--resolve",
                &format!("{name}:{port}:127.0.0.1"),
                "-w",
                " %{http_version} %{http_code}",
                &format!("https://{name}:{port}/"),
            ])
            .output()
            .expect("curl on the PATH");
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
    .await
    .unwrap()
}

/// What `openssl s_client` says of a handshake with `servername` and `alpn`.
pub async fn s_client(port: u16, servername: &str, alpn: &str) -> String {
    let (servername, alpn) = (servername.to_string(), alpn.to_string());
    tokio::task::spawn_blocking(move || {
        let out = Command::new("openssl")
            .args([
                "s_client",
                "-connect",
                &format!("127.0.0.1:{port}"),
                "-servername",
                &servername,
                "-alpn",
                &alpn,
            ])
            .stdin(std::process::Stdio::null())
            .output()
            .expect("openssl on the PATH");
        String::from_utf8_lossy(&out.stdout).into_owned()
    })
    .await
    .unwrap()
}

/// Replaces a listener's certificate (`replace`) while curl opens 50 new
/// HTTPS connections a second to `name:port` (expecting `backend 1.1
/// 200`): none may fail, and new connections must present the certificate
/// of `common_name` within 3 s.
pub async fn rotate_under_load(ca: &Path, name: &str, port: u16, common_name: &str, replace: impl FnOnce()) {
    let (ca, host) = (ca.to_path_buf(), name.to_string());
    let (going, started) = tokio::sync::oneshot::channel();
    let load = tokio::spawn(async move {
        let mut failures = Vec::new();
        let mut going = Some(going);
        // The load's rate against real processes (curl): 50 connections a second.
        let mut pace = tokio::time::interval(std::time::Duration::from_millis(20));
        pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        for i in 0..100 {
            pace.tick().await;
            let got = curl(&ca, &host, port, "--http1.1").await;
            if got != "backend 1.1 200" {
                failures.push(got);
            }
            if i == 20 {
                let _ = going.take().map(|g| g.send(()));
            }
        }
        failures
    });
    // The replacement lands mid-load, once 20 connections went through.
    started.await.expect("the load runs");
    let replaced = std::time::Instant::now();
    replace();
    let want = format!("CN = {common_name}");
    balanced::testing::eventually(
        std::time::Duration::from_secs(3),
        "new connections to get the new certificate",
        || async { s_client(port, name, "h2").await.contains(&want).then_some(()) },
    )
    .await;
    let took = replaced.elapsed();
    assert!(took < std::time::Duration::from_secs(3), "{took:?}");
    assert_eq!(
        load.await.unwrap(),
        Vec::<String>::new(),
        "requests failed across the rotation"
    );
}

/// An HTTPS endpoint we control: answers every request with its name (and
/// whether the client presented a certificate), speaks h2 and http/1.1 by
/// ALPN, closes each HTTP/1.1 connection after one answer so every request
/// is a new handshake, may require a client certificate signed by
/// `client_ca`, and counts handshakes and resumed ones.
pub struct HttpsBackend {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Handshakes completed.
    pub handshakes: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    /// Of those, the resumed ones.
    pub resumed: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for HttpsBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub async fn https_backend(name: &'static str, cert: &Path, key: &Path, client_ca: Option<&Path>) -> HttpsBackend {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};

    let chain = CertificateDer::pem_file_iter(cert)
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(key).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap();
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_file_iter(ca).unwrap() {
                roots.add(c.unwrap()).unwrap();
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .unwrap();
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_single_cert(chain, key).unwrap();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (handshakes, resumed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (h, r) = (handshakes.clone(), resumed.clone());
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else { return };
            let (acceptor, h, r) = (acceptor.clone(), h.clone(), r.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else { return };
                h.fetch_add(1, Ordering::Relaxed);
                let conn = tls.get_ref().1;
                if conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed) {
                    r.fetch_add(1, Ordering::Relaxed);
                }
                let client_cert = conn.peer_certificates().is_some_and(|c| !c.is_empty());
                let service = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| async move {
                    let mut resp = http::Response::builder();
                    if req.version() == http::Version::HTTP_11 {
                        resp = resp.header("connection", "close");
                    }
                    let body = format!("{name} client-cert={client_cert} {:?}", req.version());
                    Ok::<_, std::convert::Infallible>(
                        resp.body(http_body_util::Full::new(bytes::Bytes::from(body))).unwrap(),
                    )
                });
                let _ = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    HttpsBackend {
        addr,
        handshakes,
        resumed,
        task,
    }
}
