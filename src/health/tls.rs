//! TLS client settings for TLS probes: one that verifies against the system
//! roots, one that only completes the handshake (the default, like the check
//! module's `ssl_hello`: a backend's self-signed certificate is not a failure).

use std::sync::{Arc, OnceLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};

/// The two client configurations, built once and shared by every probe.
#[derive(Clone, Default)]
pub struct TlsClients {
    insecure: Arc<OnceLock<Arc<ClientConfig>>>,
    verified: Arc<OnceLock<Result<Arc<ClientConfig>, String>>>,
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl TlsClients {
    /// Config for a probe; `verify` asks for chain and name verification.
    pub fn config(&self, verify: bool) -> Result<Arc<ClientConfig>, String> {
        if verify {
            self.verified.get_or_init(build_verified).clone()
        } else {
            Ok(self.insecure.get_or_init(build_insecure).clone())
        }
    }
}

fn build_insecure() -> Arc<ClientConfig> {
    let provider = provider();
    let verifier = Arc::new(HandshakeOnly(provider.signature_verification_algorithms));
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Arc::new(config)
}

fn build_verified() -> Result<Arc<ClientConfig>, String> {
    let mut roots = rustls::RootCertStore::empty();
    let found = rustls_native_certs::load_native_certs();
    for cert in found.certs {
        // One unreadable system certificate should not disable verification.
        let _ = roots.add(cert);
    }
    if roots.is_empty() {
        return Err("no system root certificates found for tls.verify".to_string());
    }
    let config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Accepts any certificate but still checks the handshake signatures, so the
/// probe proves a working TLS stack rather than a trusted identity.
#[derive(Debug)]
struct HandshakeOnly(WebPkiSupportedAlgorithms);

impl ServerCertVerifier for HandshakeOnly {
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
