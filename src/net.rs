//! Socket errors as operators read them: what ran out locally, and the
//! text of an error without the OS's noise.

use std::io;

/// Whether `e` is this process or host running out of something (descriptors,
/// socket buffers, memory, local ports) rather than the peer failing.
pub fn is_local_exhaustion(e: &io::Error) -> bool {
    use nix::errno::Errno;
    e.raw_os_error().is_some_and(|code| {
        matches!(
            Errno::from_raw(code),
            Errno::EMFILE | Errno::ENFILE | Errno::ENOBUFS | Errno::ENOMEM | Errno::EADDRNOTAVAIL
        )
    })
}

/// io::Error text without the `(os error 111)` noise, for status and error bodies.
pub fn io_text(e: &io::Error) -> String {
    if let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        return tls_text(tls);
    }
    match e.kind() {
        io::ErrorKind::ConnectionRefused => "connection refused".into(),
        io::ErrorKind::ConnectionReset => "connection reset".into(),
        io::ErrorKind::TimedOut => "timed out".into(),
        io::ErrorKind::UnexpectedEof => "connection closed".into(),
        _ => {
            let text = e.to_string();
            match text.find(" (os error") {
                Some(i) => text[..i].to_lowercase(),
                None => text,
            }
        }
    }
}

/// A TLS error with a peer, in an operator's words: which certificate check
/// failed and on what, or what the peer's alert means.
pub fn tls_text(e: &rustls::Error) -> String {
    use rustls::{AlertDescription, CertificateError};
    let why = match e {
        rustls::Error::InvalidCertificate(c) => match c {
            CertificateError::Expired => "the endpoint's certificate has expired".to_string(),
            CertificateError::ExpiredContext { not_after, .. } => format!(
                "the endpoint's certificate expired at {}",
                jiff::Timestamp::from_second(not_after.as_secs() as i64)
                    .map(|t| t.to_string())
                    .unwrap_or_default()
            ),
            CertificateError::NotValidForName => {
                "the endpoint's certificate is not valid for the name asked for".into()
            }
            CertificateError::NotValidForNameContext { expected, presented } => format!(
                "the endpoint's certificate is not valid for {}; it names {}",
                name_text(expected),
                if presented.is_empty() {
                    "nothing".to_string()
                } else {
                    presented
                        .iter()
                        .map(|p| presented_text(p))
                        .collect::<Vec<_>>()
                        .join(", ")
                }
            ),
            CertificateError::UnknownIssuer => "the endpoint's certificate is not signed by a trusted CA".into(),
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                "the endpoint's certificate is not valid yet".into()
            }
            other => format!("the endpoint's certificate is invalid: {other:?}"),
        },
        rustls::Error::AlertReceived(AlertDescription::CertificateRequired) => {
            "the endpoint requires a client certificate (backendTLS.clientCertificate)".into()
        }
        rustls::Error::AlertReceived(
            alert @ (AlertDescription::BadCertificate
            | AlertDescription::UnknownCA
            | AlertDescription::CertificateExpired
            | AlertDescription::CertificateUnknown),
        ) => format!("the endpoint refused our client certificate ({alert:?})"),
        other => other.to_string(),
    };
    format!("tls: {why}")
}

fn name_text(name: &rustls::pki_types::ServerName<'_>) -> String {
    use rustls::pki_types::ServerName;
    match name {
        ServerName::DnsName(d) => format!("{:?}", d.as_ref()),
        ServerName::IpAddress(ip) => format!("{:?}", std::net::IpAddr::from(*ip).to_string()),
        _ => "the name asked for".into(),
    }
}

/// `DnsName("a.example")`, as rustls lists a certificate's names, as `a.example`.
fn presented_text(p: &str) -> String {
    p.split_once("(\"")
        .and_then(|(_, rest)| rest.strip_suffix("\")"))
        .unwrap_or(p)
        .to_string()
}
