//! Certificates and keys read from PEM files: a chain with its key (checked
//! to belong together and not expired), a CA bundle, and the files' stamps
//! so a watcher can tell when they changed.

use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;

use crate::api::config::CertificateFiles;
use crate::net::io_text;

/// A file's modification time and size when last read.
pub type FileStamp = (Option<SystemTime>, u64);

/// The stamp of `path` now (`(None, 0)` when it cannot be read).
pub fn stamp_of(path: &Path) -> FileStamp {
    match std::fs::metadata(path) {
        Ok(m) => (m.modified().ok(), m.len()),
        Err(_) => (None, 0),
    }
}

/// The stamps of a certificate's two files.
pub fn stamp(files: &CertificateFiles) -> [FileStamp; 2] {
    [stamp_of(&files.cert), stamp_of(&files.key)]
}

/// Reads a chain and its key, checks they belong together, and returns the
/// signing key and the leaf's expiry (Unix seconds).
pub fn read(files: &CertificateFiles) -> Result<(Arc<CertifiedKey>, i64), String> {
    let cert_pem = std::fs::read(&files.cert).map_err(|e| format!("{}: {}", files.cert.display(), io_text(&e)))?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: not a PEM certificate chain: {e}", files.cert.display()))?;
    let Some(leaf) = chain.first() else {
        return Err(format!("{}: no certificate in it", files.cert.display()));
    };
    let expiry =
        not_after(leaf).ok_or_else(|| format!("{}: the certificate cannot be parsed", files.cert.display()))?;
    let key_pem = std::fs::read(&files.key).map_err(|e| format!("{}: {}", files.key.display(), io_text(&e)))?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|e| format!("{}: not a PEM private key: {e}", files.key.display()))?;
    let provider = rustls::crypto::ring::default_provider();
    let certified = CertifiedKey::from_der(chain, key, &provider).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => format!(
            "{} does not hold the key of {}",
            files.key.display(),
            files.cert.display()
        ),
        other => format!("{}: {other}", files.key.display()),
    })?;
    let now = jiff::Timestamp::now().as_second();
    if expiry < now {
        return Err(format!(
            "{}: expired at {}",
            files.cert.display(),
            jiff::Timestamp::from_second(expiry)
                .map(|t| t.to_string())
                .unwrap_or_default()
        ));
    }
    Ok((Arc::new(certified), expiry))
}

/// Reads a PEM bundle of CA certificates; fails naming the file when it
/// holds none that parse.
pub fn read_roots(path: &Path) -> Result<RootCertStore, String> {
    let pem = std::fs::read(path).map_err(|e| format!("{}: {}", path.display(), io_text(&e)))?;
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| format!("{}: not a PEM certificate bundle: {e}", path.display()))?;
        roots
            .add(cert)
            .map_err(|e| format!("{}: a CA certificate is unusable: {e}", path.display()))?;
    }
    if roots.is_empty() {
        return Err(format!("{}: no certificate in it", path.display()));
    }
    Ok(roots)
}

/// The leaf's `notAfter` as Unix seconds, read from its DER (RFC 5280 4.1:
/// Certificate → TBSCertificate → [version] serial signature issuer validity).
pub fn not_after(cert: &CertificateDer<'_>) -> Option<i64> {
    let (_, cert_body, _) = der(cert.as_ref())?;
    let (_, mut tbs, _) = der(cert_body)?;
    let mut skip = |explicit_version: bool| -> Option<()> {
        let (tag, _, rest) = der(tbs)?;
        if explicit_version && tag != 0xa0 {
            return Some(());
        }
        tbs = rest;
        Some(())
    };
    skip(true)?; // [0] version, when present
    skip(false)?; // serialNumber
    skip(false)?; // signature
    skip(false)?; // issuer
    let (_, validity, _) = der(tbs)?;
    let (_, _, rest) = der(validity)?; // notBefore
    let (tag, time, _) = der(rest)?;
    let text = std::str::from_utf8(time).ok()?;
    let text = match tag {
        0x17 => {
            // UTCTime YYMMDDHHMMSSZ: years 50-99 are 19xx (RFC 5280 4.1.2.5.1).
            let yy: u32 = text.get(..2)?.parse().ok()?;
            format!("{}{text}", if yy >= 50 { "19" } else { "20" })
        }
        0x18 => text.to_string(),
        _ => return None,
    };
    let t = jiff::civil::DateTime::strptime("%Y%m%d%H%M%SZ", &text).ok()?;
    Some(t.to_zoned(jiff::tz::TimeZone::UTC).ok()?.timestamp().as_second())
}

/// One DER element: its tag, its contents, and what follows it.
fn der(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (first as usize, rest)
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n].iter().fold(0usize, |acc, b| (acc << 8) | *b as usize);
        (len, &rest[n..])
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn certificate(names: &[&str], not_after: (i32, i8, i8)) -> (String, String) {
        let mut params =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
        params.not_after = rcgen::date_time_ymd(not_after.0, not_after.1 as u8, not_after.2 as u8);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    #[test]
    fn the_expiry_is_read_from_the_certificate() {
        let (pem, _) = certificate(&["a.example"], (2031, 5, 17));
        let der = CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
        let want = jiff::civil::date(2031, 5, 17)
            .to_zoned(jiff::tz::TimeZone::UTC)
            .unwrap()
            .timestamp()
            .as_second();
        assert_eq!(not_after(&der), Some(want));
        assert_eq!(not_after(&CertificateDer::from(vec![0x30, 0x03, 1, 2])), None);
    }

    #[test]
    fn bad_files_are_named_with_what_is_wrong() {
        let dir = std::env::temp_dir().join(format!("balanced-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (pem, key) = certificate(&["a.example"], (2031, 1, 1));
        let (_, other_key) = certificate(&["b.example"], (2031, 1, 1));
        let (old, old_key) = certificate(&["a.example"], (2001, 1, 1));
        let write = |name: &str, text: &str| {
            let p = dir.join(name);
            std::fs::write(&p, text).unwrap();
            p
        };
        let files = |cert, key| CertificateFiles {
            cert,
            key,
            secret: None,
        };
        let good = files(write("a.pem", &pem), write("a.key", &key));
        assert!(read(&good).is_ok());
        let err = read(&files(write("a2.pem", &pem), write("b.key", &other_key))).unwrap_err();
        assert!(err.contains("b.key does not hold the key of"), "{err}");
        let err = read(&files(write("junk.pem", "hello"), good.key.clone())).unwrap_err();
        assert!(err.contains("junk.pem: no certificate in it"), "{err}");
        let err = read(&files(dir.join("missing.pem"), good.key.clone())).unwrap_err();
        assert!(err.contains("missing.pem: no such file or directory"), "{err}");
        let err = read(&files(write("old.pem", &old), write("old.key", &old_key))).unwrap_err();
        assert!(err.contains("old.pem: expired at 2001-01-01"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
