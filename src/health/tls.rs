//! TLS client settings for TLS probes: one that verifies against the system
//! roots, one that only completes the handshake (the default, like the check
//! module's `ssl_hello`: a backend's self-signed certificate is not a failure).

use std::sync::{Arc, OnceLock};

use rustls::ClientConfig;

use crate::tls::{AnyCertificate, provider};

/// The two client configurations, built once and shared by every probe.
#[derive(Clone, Default)]
pub struct TlsClients {
    insecure: Arc<OnceLock<Arc<ClientConfig>>>,
    verified: Arc<OnceLock<Result<Arc<ClientConfig>, String>>>,
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
    let verifier = Arc::new(AnyCertificate(provider.signature_verification_algorithms));
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Arc::new(config)
}

fn build_verified() -> Result<Arc<ClientConfig>, String> {
    let roots = crate::tls::system_roots().map_err(|e| format!("{e} for tls.verify"))?;
    let config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}
