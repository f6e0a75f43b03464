//! TLS to endpoints (`spec.backendTLS`, `backends[].tls`): one [`Connector`]
//! per distinct setting, shared by the proxy's connection pools and the
//! health checks, so a check proves what a request will meet. Its files (CA
//! bundle, client certificate) are looked at again at most once a second
//! when a connection is made: a changed file is used for new connections, a
//! broken one is refused with its reason and the last good one stays.
//! Sessions are resumed across connections to the same name (nginx
//! `proxy_ssl_session_reuse`), which is most of the cost of a new pooled
//! connection.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{Resumption, WebPkiServerVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use super::files::{FileStamp, read_roots, stamp_of};
use crate::api::config::BackendTls;
use crate::net::io_text;

/// How often the files are looked at again, at most.
const RECHECK: Duration = Duration::from_secs(1);

/// The application protocol asked for in the handshake (ALPN).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Alpn {
    /// `http/1.1`.
    Http1,
    /// `h2`.
    H2,
    /// None: a TCP payload check, an upgraded tunnel.
    None,
}

/// Connects with one `BackendTls` setting.
#[derive(Debug)]
pub struct Connector {
    settings: Arc<BackendTls>,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    /// The configurations of the last files that loaded.
    good: Option<Configs>,
    stamps: Vec<FileStamp>,
    checked: Instant,
    /// Why the files as they are now do not load.
    error: Option<String>,
}

#[derive(Clone, Debug)]
struct Configs {
    http1: Arc<ClientConfig>,
    h2: Arc<ClientConfig>,
    bare: Arc<ClientConfig>,
}

impl Connector {
    /// Reads the files of `settings`; one that does not load is kept as the
    /// error every connection fails with until it is fixed.
    pub fn new(settings: Arc<BackendTls>) -> Self {
        let stamps = stamps(&settings);
        let (good, error) = match build(&settings) {
            Ok(c) => (Some(c), None),
            Err(e) => {
                tracing::error!(error = %e, "backend TLS settings do not load");
                (None, Some(e))
            }
        };
        Self {
            settings,
            state: Mutex::new(State {
                good,
                stamps,
                checked: Instant::now(),
                error,
            }),
        }
    }

    /// The settings it was made from.
    pub fn settings(&self) -> &Arc<BackendTls> {
        &self.settings
    }

    /// TLS over `tcp` to the endpoint at `addr`, offering `alpn`.
    pub async fn connect(&self, tcp: TcpStream, addr: SocketAddr, alpn: Alpn) -> Result<TlsStream<TcpStream>, String> {
        let config = self.config(alpn)?;
        let name = match &self.settings.hostname {
            Some(h) => ServerName::try_from(h.clone()).map_err(|e| format!("tls: hostname {h:?}: {e}"))?,
            None => ServerName::IpAddress(addr.ip().into()),
        };
        tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await
            .map_err(|e| handshake_error(&e))
    }

    /// The settings, the files' error and the insecure warning, for `/status`.
    pub fn status(&self) -> serde_json::Value {
        let s = &self.settings;
        let mut v = serde_json::json!({});
        if let Some(h) = &s.hostname {
            v["hostname"] = h.clone().into();
        }
        if let Some(ca) = &s.ca_file {
            v["caFile"] = ca.display().to_string().into();
        }
        if let Some(c) = &s.client {
            v["clientCertFile"] = c.cert.display().to_string().into();
        }
        if s.insecure_skip_verify {
            v["warning"] = INSECURE_WARNING.into();
        }
        if let Some(e) = &self.state.lock().expect("tls state lock").error {
            v["error"] = e.clone().into();
        }
        v
    }

    fn config(&self, alpn: Alpn) -> Result<Arc<ClientConfig>, String> {
        let mut state = self.state.lock().expect("tls state lock");
        if state.checked.elapsed() >= RECHECK {
            state.checked = Instant::now();
            let now = stamps(&self.settings);
            if now != state.stamps {
                state.stamps = now;
                match build(&self.settings) {
                    Ok(c) => {
                        tracing::info!(hostname = ?self.settings.hostname, "backend TLS files reloaded");
                        state.good = Some(c);
                        state.error = None;
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "backend TLS files not reloaded; the last good ones stay");
                        state.error = Some(e);
                    }
                }
            }
        }
        match (&state.good, &state.error) {
            (Some(c), _) => Ok(match alpn {
                Alpn::Http1 => c.http1.clone(),
                Alpn::H2 => c.h2.clone(),
                Alpn::None => c.bare.clone(),
            }),
            (None, Some(e)) => Err(format!("tls: {e}")),
            (None, None) => Err("tls: not configured".into()),
        }
    }
}

/// What status says while `insecureSkipVerify` is set.
pub const INSECURE_WARNING: &str =
    "insecureSkipVerify: the endpoints' certificates are not verified, anyone on the path can pose as them";

fn stamps(s: &BackendTls) -> Vec<FileStamp> {
    let mut out = Vec::with_capacity(3);
    if let Some(ca) = &s.ca_file {
        out.push(stamp_of(ca));
    }
    if let Some(c) = &s.client {
        out.push(stamp_of(&c.cert));
        out.push(stamp_of(&c.key));
    }
    out
}

/// The three client configurations of `s`, sharing one session cache.
fn build(s: &BackendTls) -> Result<Configs, String> {
    let provider = super::provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let verifier: Arc<dyn ServerCertVerifier> = if s.insecure_skip_verify {
        Arc::new(super::AnyCertificate(provider.signature_verification_algorithms))
    } else {
        let roots = match &s.ca_file {
            Some(path) => read_roots(path).map_err(|e| format!("caFile: {e}"))?,
            None => super::system_roots()?,
        };
        let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .build()
            .map_err(|e| format!("caFile: {e}"))?;
        if s.subject_alt_names.is_empty() {
            webpki
        } else {
            let names = s
                .subject_alt_names
                .iter()
                .map(|n| ServerName::try_from(n.clone()).map_err(|e| format!("subjectAltNames: {n:?}: {e}")))
                .collect::<Result<Vec<_>, _>>()?;
            Arc::new(AnyOfNames { inner: webpki, names })
        }
    };
    let builder = builder.dangerous().with_custom_certificate_verifier(verifier);
    let config = match &s.client {
        None => builder.with_no_client_auth(),
        Some(files) => {
            let (chain, key) = client_pair(files)?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| format!("clientCertificate: {e}"))?
        }
    };
    let resumption = Resumption::in_memory_sessions(1024);
    let with_alpn = |alpn: &[&[u8]]| {
        let mut c = config.clone();
        c.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        c.resumption = resumption.clone();
        Arc::new(c)
    };
    Ok(Configs {
        http1: with_alpn(&[b"http/1.1"]),
        h2: with_alpn(&[b"h2"]),
        bare: with_alpn(&[]),
    })
}

fn client_pair(
    files: &crate::api::config::CertificateFiles,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), String> {
    // The listener's reader first, for its checks: the key matches, not expired.
    super::files::read(files).map_err(|e| format!("clientCertificate: {e}"))?;
    let pem = std::fs::read(&files.cert)
        .map_err(|e| format!("clientCertificate: {}: {}", files.cert.display(), io_text(&e)))?;
    let chain = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("clientCertificate: {}: {e}", files.cert.display()))?;
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .map_err(|e| format!("clientCertificate: {}: {e}", files.key.display()))?;
    Ok((chain, key))
}

/// Why a handshake with an endpoint failed, in an operator's words.
pub fn handshake_error(e: &io::Error) -> String {
    match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        Some(tls) => crate::net::tls_text(tls),
        None => format!("tls: handshake: {}", io_text(e)),
    }
}

/// Accepts a certificate valid for any one of `names` (`subjectAltNames`),
/// whatever name was sent as SNI.
#[derive(Debug)]
struct AnyOfNames {
    inner: Arc<WebPkiServerVerifier>,
    names: Vec<ServerName<'static>>,
}

impl ServerCertVerifier for AnyOfNames {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let mut last = rustls::Error::General("no subjectAltNames".into());
        for name in &self.names {
            match self
                .inner
                .verify_server_cert(end_entity, intermediates, name, ocsp_response, now)
            {
                Ok(ok) => return Ok(ok),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// One [`Connector`] per setting, shared while anything holds it.
#[derive(Debug, Default)]
pub struct Connectors(Mutex<HashMap<Arc<BackendTls>, Weak<Connector>>>);

impl Connectors {
    /// The connector of `settings`, made on first use.
    pub fn get(&self, settings: &Arc<BackendTls>) -> Arc<Connector> {
        let mut map = self.0.lock().expect("connectors lock");
        if let Some(c) = map.get(settings).and_then(Weak::upgrade) {
            return c;
        }
        map.retain(|_, w| w.strong_count() > 0);
        let c = Arc::new(Connector::new(settings.clone()));
        map.insert(settings.clone(), Arc::downgrade(&c));
        c
    }
}

/// A connection to an endpoint, in the clear or over TLS.
#[derive(Debug)]
pub enum MaybeTls {
    /// Plain TCP.
    Plain(TcpStream),
    /// TLS over TCP.
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for MaybeTls {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for MaybeTls {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Self::Plain(s) => s.is_write_vectored(),
            Self::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_flush(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// `tcp`, wrapped in TLS by `tls` when there is one.
pub async fn wrap(tls: Option<&Connector>, tcp: TcpStream, addr: SocketAddr, alpn: Alpn) -> Result<MaybeTls, String> {
    match tls {
        None => Ok(MaybeTls::Plain(tcp)),
        Some(c) => c.connect(tcp, addr, alpn).await.map(|s| MaybeTls::Tls(Box::new(s))),
    }
}
