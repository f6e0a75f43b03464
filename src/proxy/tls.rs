//! TLS on HTTP listeners (`listeners[].tls`): certificates read from PEM
//! files, several chosen by SNI (the first the default), ALPN `h2` and
//! `http/1.1`, and files watched: a changed certificate is loaded for new
//! connections while open ones keep theirs, and one that does not load is
//! refused with its reason while the last good one goes on serving (nginx
//! needs a reload for that; HAProxy its runtime API).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use prometheus_client::metrics::gauge::Gauge;
use rustls::pki_types::ServerName;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ServerConfig, version};
use tokio_util::sync::CancellationToken;

use crate::api::config::{CertificateFiles, ListenerTls, TlsVersion};
use crate::metrics::{CertificateLabels, ProxyMetrics, TlsFailureLabels};
use crate::tls::files::{FileStamp, read, stamp};

/// How often the certificate files are looked at for changes.
const WATCH_EVERY: Duration = Duration::from_secs(1);

/// A listener's TLS: the server configuration new connections get, swapped
/// when its files change.
pub struct Terminator {
    settings: Mutex<ListenerTls>,
    config: ArcSwap<ServerConfig>,
    certificates: Mutex<Vec<Loaded>>,
    metrics: ProxyMetrics,
    service: String,
    listener: String,
}

/// What became of one certificate's files.
#[derive(Clone, Debug)]
struct Loaded {
    files: CertificateFiles,
    /// The files' modification times and sizes when last read.
    stamp: Option<Stamp>,
    /// The certificate serving now, and its expiry (Unix seconds).
    serving: Option<(Arc<CertifiedKey>, i64)>,
    /// Why the files as they are now did not load, if they did not.
    error: Option<String>,
}

type Stamp = [FileStamp; 2];

/// A connection's TLS, for the access log and `X-Forwarded-Proto`.
#[derive(Clone, Debug)]
pub struct Session {
    /// `TLSv1.2` or `TLSv1.3`.
    pub version: &'static str,
    /// The name the client asked for, if any.
    pub sni: Option<Arc<str>>,
}

impl Terminator {
    /// Reads every certificate of `settings`; fails naming the first that
    /// does not load (a listener does not start without all of them).
    pub fn load(
        settings: &ListenerTls,
        metrics: &ProxyMetrics,
        service: &str,
        listener: &str,
    ) -> Result<Arc<Self>, String> {
        let certificates = read_all(settings)?;
        let config = server_config(settings, &certificates)?;
        let terminator = Arc::new(Self {
            settings: Mutex::new(settings.clone()),
            config: ArcSwap::from_pointee(config),
            certificates: Mutex::new(certificates),
            metrics: metrics.clone(),
            service: service.to_string(),
            listener: listener.to_string(),
        });
        terminator.publish_expiry();
        Ok(terminator)
    }

    /// Takes new settings (other certificates, another minimum version) for
    /// new connections, on the socket it serves; settings that do not load
    /// are refused and the current ones stay.
    pub fn update(&self, settings: &ListenerTls) -> Result<(), String> {
        let certificates = read_all(settings)?;
        let config = server_config(settings, &certificates)?;
        *self.certificates.lock().expect("certificates lock") = certificates;
        *self.settings.lock().expect("settings lock") = settings.clone();
        self.config.store(Arc::new(config));
        self.publish_expiry();
        Ok(())
    }

    /// Whether this terminator was built from `settings`.
    pub fn serves(&self, settings: &ListenerTls) -> bool {
        *self.settings.lock().expect("settings lock") == *settings
    }

    /// The acceptor for the next connection.
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.config.load_full())
    }

    /// Looks at the files every second until `stop`, reloading what changed.
    pub async fn watch(self: Arc<Self>, stop: CancellationToken) {
        let mut tick = tokio::time::interval(WATCH_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => self.reload_changed(),
            }
        }
    }

    /// Reloads the certificates whose files changed since they were read;
    /// one that no longer loads keeps serving its last good version.
    pub fn reload_changed(&self) {
        let mut certificates = self.certificates.lock().expect("certificates lock");
        let mut changed = false;
        for (i, c) in certificates.iter_mut().enumerate() {
            let now = stamp(&c.files);
            if c.stamp == Some(now) {
                continue;
            }
            c.stamp = Some(now);
            match read(&c.files) {
                Ok(loaded) => {
                    tracing::info!(service = %self.service, listener = %self.listener, cert = %c.files.shown(), "certificate reloaded");
                    c.serving = Some(loaded);
                    c.error = None;
                    changed = true;
                }
                Err(e) => {
                    tracing::error!(service = %self.service, listener = %self.listener, cert = %c.files.shown(), error = %e, "certificate not reloaded; the last good one keeps serving");
                    c.error = Some(format!("tls.certificates[{i}]: {e}"));
                    self.metrics
                        .tls_reload_failures
                        .get_or_create(&self.certificate_labels(&c.files))
                        .inc();
                }
            }
        }
        if changed {
            let settings = self.settings.lock().expect("settings lock").clone();
            match server_config(&settings, &certificates) {
                Ok(config) => self.config.store(Arc::new(config)),
                Err(e) => {
                    tracing::error!(service = %self.service, listener = %self.listener, error = %e, "TLS configuration not rebuilt")
                }
            }
            drop(certificates);
            self.publish_expiry();
        }
    }

    /// Each certificate's files, expiry and load error, for `/status`.
    pub fn status(&self) -> serde_json::Value {
        let certificates = self.certificates.lock().expect("certificates lock");
        serde_json::Value::Array(
            certificates
                .iter()
                .map(|c| {
                    let mut v = match &c.files.secret {
                        Some(name) => serde_json::json!({ "secretName": name }),
                        None => serde_json::json!({
                            "certFile": c.files.cert.display().to_string(),
                            "keyFile": c.files.key.display().to_string(),
                        }),
                    };
                    if let Some((_, expiry)) = &c.serving
                        && let Ok(t) = jiff::Timestamp::from_second(*expiry)
                    {
                        v["notAfter"] = t.to_string().into();
                    }
                    if let Some(e) = &c.error {
                        v["error"] = e.clone().into();
                    }
                    v
                })
                .collect(),
        )
    }

    /// Counts a failed handshake by why it failed.
    pub fn handshake_failed(&self, error: &std::io::Error) {
        self.metrics
            .tls_handshake_failures
            .get_or_create(&TlsFailureLabels {
                service: self.service.clone(),
                listener: self.listener.clone(),
                reason: failure_reason(error),
            })
            .inc();
    }

    /// Counts a handshake the client did not finish within `timeouts.requestHeader`.
    pub fn handshake_timed_out(&self) {
        self.metrics
            .tls_handshake_failures
            .get_or_create(&TlsFailureLabels {
                service: self.service.clone(),
                listener: self.listener.clone(),
                reason: "timeout",
            })
            .inc();
    }

    fn certificate_labels(&self, files: &CertificateFiles) -> CertificateLabels {
        CertificateLabels {
            service: self.service.clone(),
            listener: self.listener.clone(),
            certificate: files.shown(),
        }
    }

    fn publish_expiry(&self) {
        let certificates = self.certificates.lock().expect("certificates lock");
        for c in certificates.iter() {
            if let Some((_, expiry)) = &c.serving {
                let gauge: Gauge = self
                    .metrics
                    .tls_expiry
                    .get_or_create(&self.certificate_labels(&c.files))
                    .clone();
                gauge.set(*expiry);
            }
        }
    }
}

/// Reads every certificate of `settings`; fails naming the first that does not load.
fn read_all(settings: &ListenerTls) -> Result<Vec<Loaded>, String> {
    settings
        .certificates
        .iter()
        .enumerate()
        .map(|(i, files)| {
            let stamp = stamp(files);
            let (key, expiry) = read(files).map_err(|e| format!("tls.certificates[{i}]: {e}"))?;
            Ok(Loaded {
                files: files.clone(),
                stamp: Some(stamp),
                serving: Some((key, expiry)),
                error: None,
            })
        })
        .collect()
}

/// The session facts of an accepted connection.
pub fn session(conn: &rustls::ServerConnection) -> Session {
    Session {
        version: match conn.protocol_version() {
            Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3",
            _ => "TLSv1.2",
        },
        sni: conn.server_name().map(Arc::from),
    }
}

/// A label for why a handshake failed, from what rustls said.
fn failure_reason(error: &std::io::Error) -> &'static str {
    let Some(tls) = error.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()) else {
        return match error.kind() {
            std::io::ErrorKind::UnexpectedEof => "closed",
            std::io::ErrorKind::ConnectionReset => "reset",
            _ => "io",
        };
    };
    match tls {
        rustls::Error::InvalidMessage(_) => "not_tls",
        rustls::Error::PeerIncompatible(_) => "incompatible",
        rustls::Error::NoApplicationProtocol => "no_alpn",
        rustls::Error::AlertReceived(_) => "alert",
        rustls::Error::PeerMisbehaved(_) => "misbehaved",
        _ => "other",
    }
}

fn server_config(settings: &ListenerTls, certificates: &[Loaded]) -> Result<ServerConfig, String> {
    let versions: &[&'static rustls::SupportedProtocolVersion] = match settings.min_version {
        TlsVersion::V1_2 => &[&version::TLS13, &version::TLS12],
        TlsVersion::V1_3 => &[&version::TLS13],
    };
    let keys: Vec<Arc<CertifiedKey>> = certificates
        .iter()
        .filter_map(|c| c.serving.as_ref().map(|(k, _)| k.clone()))
        .collect();
    let mut config = ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(versions)
        .map_err(|e| format!("tls: {e}"))?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(BySni { keys }));
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    // Resumption without server state: tickets, as nginx and HAProxy do.
    if let Ok(ticketer) = rustls::crypto::ring::Ticketer::new() {
        config.ticketer = ticketer;
    }
    Ok(config)
}

/// Picks the first certificate valid for the name the client asked for
/// (wildcards included), else the first one.
#[derive(Debug)]
struct BySni {
    keys: Vec<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for BySni {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        if self.keys.len() > 1
            && let Some(name) = hello.server_name()
            && let Ok(name) = ServerName::try_from(name)
        {
            let fits = |k: &&Arc<CertifiedKey>| {
                k.end_entity_cert().ok().is_some_and(|der| {
                    webpki::EndEntityCert::try_from(der)
                        .is_ok_and(|ee| ee.verify_is_valid_for_subject_name(&name).is_ok())
                })
            };
            if let Some(k) = self.keys.iter().find(fits) {
                return Some(k.clone());
            }
        }
        self.keys.first().cloned()
    }
}
