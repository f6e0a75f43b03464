//! TLS shared by both sides of the proxy: certificates read from files
//! ([`files`]), the client side that speaks TLS to endpoints for requests
//! and health checks alike ([`upstream`]), and a verifier that accepts any
//! certificate for the checks and settings that ask for no verification.

pub mod files;
pub mod upstream;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

/// The crypto every TLS configuration here is built with.
pub fn provider() -> std::sync::Arc<CryptoProvider> {
    std::sync::Arc::new(rustls::crypto::ring::default_provider())
}

/// The system's root certificates (Debian's `ca-certificates`), read once.
pub fn system_roots() -> Result<rustls::RootCertStore, String> {
    static ROOTS: std::sync::OnceLock<Result<rustls::RootCertStore, String>> = std::sync::OnceLock::new();
    ROOTS
        .get_or_init(|| {
            let mut roots = rustls::RootCertStore::empty();
            for cert in rustls_native_certs::load_native_certs().certs {
                // One unreadable system certificate should not disable verification.
                let _ = roots.add(cert);
            }
            if roots.is_empty() {
                return Err("no system root certificates found".to_string());
            }
            Ok(roots)
        })
        .clone()
}

/// Accepts any certificate but still checks the handshake signatures, so a
/// connection proves a working TLS stack rather than a trusted identity.
#[derive(Debug)]
pub struct AnyCertificate(pub WebPkiSupportedAlgorithms);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_schemes()
    }
}
