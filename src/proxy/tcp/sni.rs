//! The name a TLS client asks for (SNI, RFC 6066 3), read from its
//! ClientHello without ending its TLS: what a passthrough listener routes
//! by (HAProxy `req.ssl_sni`, nginx `ssl_preread`). The ClientHello may
//! span several records; nothing past it is read.

/// What the bytes read so far say.
#[derive(Debug, PartialEq, Eq)]
pub enum Hello {
    /// More bytes are needed.
    Incomplete,
    /// A whole ClientHello, with the host name it asks for, if any (lower case).
    Complete(Option<String>),
    /// Not a TLS ClientHello, or a malformed one.
    NotTls,
}

/// The most read before giving up: a ClientHello with post-quantum key
/// shares is about 2 KiB; one record holds 16 KiB.
pub const MAX_HELLO: usize = 16 * 1024 + 5;

const HANDSHAKE: u8 = 0x16;
const CLIENT_HELLO: u8 = 0x01;
const SERVER_NAME: u16 = 0;
const HOST_NAME: u8 = 0;

/// Reads the ClientHello at the start of `buf`.
pub fn parse(buf: &[u8]) -> Hello {
    let mut handshake = Vec::new();
    let mut at = 0;
    loop {
        let Some(header) = buf.get(at..at + 5) else {
            return incomplete(buf);
        };
        if header[0] != HANDSHAKE || header[1] != 3 {
            return Hello::NotTls;
        }
        let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        if len == 0 || len > 16 * 1024 {
            return Hello::NotTls;
        }
        let Some(payload) = buf.get(at + 5..at + 5 + len) else {
            return incomplete(buf);
        };
        handshake.extend_from_slice(payload);
        at += 5 + len;
        if handshake[0] != CLIENT_HELLO {
            return Hello::NotTls;
        }
        if handshake.len() >= 4 {
            let need =
                4 + (usize::from(handshake[1]) << 16 | usize::from(handshake[2]) << 8 | usize::from(handshake[3]));
            if handshake.len() >= need {
                return match server_name(&handshake[4..need]) {
                    Some(name) => Hello::Complete(name),
                    None => Hello::NotTls,
                };
            }
        }
    }
}

fn incomplete(buf: &[u8]) -> Hello {
    if buf.len() >= MAX_HELLO {
        Hello::NotTls
    } else {
        Hello::Incomplete
    }
}

/// The host name in a ClientHello's body; `None` when it is malformed.
fn server_name(body: &[u8]) -> Option<Option<String>> {
    let mut r = Reader(body);
    r.take(2)?; // legacy_version
    r.take(32)?; // random
    let n = r.u8()?;
    r.take(usize::from(n))?; // legacy_session_id
    let n = r.u16()?;
    r.take(usize::from(n))?; // cipher_suites
    let n = r.u8()?;
    r.take(usize::from(n))?; // legacy_compression_methods
    if r.0.is_empty() {
        return Some(None); // no extensions at all
    }
    let n = r.u16()?;
    let mut extensions = Reader(r.take(usize::from(n))?);
    while !extensions.0.is_empty() {
        let kind = extensions.u16()?;
        let n = extensions.u16()?;
        let data = extensions.take(usize::from(n))?;
        if kind != SERVER_NAME {
            continue;
        }
        let mut list = Reader(data);
        let n = list.u16()?;
        let mut names = Reader(list.take(usize::from(n))?);
        while !names.0.is_empty() {
            let kind = names.u8()?;
            let n = names.u16()?;
            let name = names.take(usize::from(n))?;
            if kind == HOST_NAME {
                let name = std::str::from_utf8(name).ok()?;
                if name.is_empty() || !name.bytes().all(|b| b.is_ascii_graphic()) {
                    return None;
                }
                return Some(Some(name.to_ascii_lowercase()));
            }
        }
        return Some(None);
    }
    Some(None)
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }

    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    /// The first flight of a real client (rustls) asking for `name`.
    fn client_hello(name: &str) -> Vec<u8> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        let server_name = rustls::pki_types::ServerName::try_from(name.to_string()).unwrap();
        let mut conn = rustls::ClientConnection::new(Arc::new(config), server_name).unwrap();
        let mut out = Vec::new();
        conn.write_tls(&mut out).unwrap();
        out
    }

    #[test]
    fn the_name_is_read_from_a_real_client_hello_whole_or_in_pieces() {
        let hello = client_hello("Shop.Example.com");
        assert_eq!(parse(&hello), Hello::Complete(Some("shop.example.com".into())));
        for cut in [0, 1, 4, 5, 40, hello.len() - 1] {
            assert_eq!(parse(&hello[..cut]), Hello::Incomplete, "cut at {cut}");
        }
        // The same handshake split over two records.
        let body = &hello[5..];
        let (a, b) = body.split_at(100);
        let mut split = Vec::new();
        for part in [a, b] {
            split.extend_from_slice(&[0x16, 3, 1]);
            split.extend_from_slice(&(part.len() as u16).to_be_bytes());
            split.extend_from_slice(part);
        }
        assert_eq!(parse(&split), Hello::Complete(Some("shop.example.com".into())));
    }

    #[test]
    fn a_hello_without_a_name_and_what_is_not_tls_are_told_apart() {
        // An IP address is never sent as SNI.
        assert_eq!(parse(&client_hello("10.0.0.1")), Hello::Complete(None));
        assert_eq!(parse(b"GET / HTTP/1.1\r\n\r\n"), Hello::NotTls);
        assert_eq!(parse(&[0x16, 3, 1, 0, 0]), Hello::NotTls);
        // A body that claims a longer session id than it holds.
        let mut short = vec![0x16, 3, 1, 0, 39, CLIENT_HELLO, 0, 0, 35, 3, 3];
        short.extend_from_slice(&[0; 32]);
        short.push(0xff);
        assert_eq!(parse(&short), Hello::NotTls);
        // A ClientHello that claims more than a record holds is given up on.
        let mut huge = vec![0x16, 3, 1, 0x40, 0x00, CLIENT_HELLO, 0xff, 0xff, 0xff];
        huge.resize(MAX_HELLO, 0);
        assert_eq!(parse(&huge[..MAX_HELLO - 1]), Hello::Incomplete);
        assert_eq!(parse(&huge), Hello::NotTls);
    }
}
