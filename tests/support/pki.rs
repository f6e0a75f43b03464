//! A test CA (rcgen) and what it signs, written as PEM files, and the
//! TLS clients we did not write (curl, `openssl s_client`) that check them.

use std::path::{Path, PathBuf};
use std::process::Command;

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
