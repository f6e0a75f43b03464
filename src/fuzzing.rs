//! What the fuzz targets (`fuzz/`) run, one function per parser that takes
//! input from the network or a file: a BalancedService file (load and
//! validate), a request against routes, an agent's answer, a healthy
//! EndpointSlice as the API server hands it to a proxy, an endpoint's answer
//! to an HTTP check, a TLS ClientHello on a passthrough listener. `tests/fuzz_corpus.rs`
//! replays the committed corpus through the same functions on every
//! `cargo test`, so a finding stays fixed without a fuzzer in CI.
//!
//! Each function must return for any input; a panic is a finding.

use std::sync::OnceLock;

use crate::api::config::Config;

/// A BalancedService file: parse, validate, and render the owned objects of
/// whatever validates.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(configs) = crate::api::load_configs(text) {
        for cfg in configs {
            // Every validated config has what the data plane indexes by.
            assert!(!cfg.listeners.is_empty(), "a valid config without listeners");
            assert!(cfg.health.timeout < cfg.health.interval || cfg.health.interval.is_zero());
        }
    }
    let _ = crate::controller::desired::render(text, &crate::controller::desired::RenderOptions::default());
}

/// Routes of every kind (prefixes, exact paths, regexes, headers, query
/// values, cookies, wildcard hostnames), matched against a request built
/// from the input: method, path and query, host, then header lines.
pub fn routes(data: &[u8]) {
    static ROUTES: OnceLock<Config> = OnceLock::new();
    let cfg = ROUTES.get_or_init(|| {
        crate::api::load_configs(ROUTES_YAML)
            .expect("the fuzz routes are valid")
            .remove(0)
    });
    let text = String::from_utf8_lossy(data);
    let mut lines = text.split('\n');
    let method = http::Method::from_bytes(lines.next().unwrap_or("GET").as_bytes()).unwrap_or(http::Method::GET);
    let target = lines.next().unwrap_or("/");
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (target, None),
    };
    let host = lines.next().filter(|h| !h.is_empty());
    let mut headers = http::HeaderMap::new();
    for line in lines {
        if let Some((name, value)) = line.split_once(':')
            && let (Ok(n), Ok(v)) = (
                http::HeaderName::from_bytes(name.trim().as_bytes()),
                http::HeaderValue::from_str(value.trim()),
            )
        {
            headers.append(n, v);
        }
    }
    let view = crate::api::route::RequestView {
        method: &method,
        path,
        query,
        host,
        headers: &headers,
        body: None,
    };
    if let Some(i) = crate::api::route::first_match(&cfg.routes, &view) {
        assert!(i < cfg.routes.len());
    }
}

const ROUTES_YAML: &str = r#"
apiVersion: balanced.dev/v1alpha1
kind: BalancedService
metadata: {name: fuzz}
spec:
  endpoints: [{address: 127.0.0.1, port: 80}]
  listeners: [{name: http, port: 8080}]
  backends: [{name: api, endpoints: [{address: 127.0.0.2, port: 80}]}]
  routes:
    - {name: exact, matches: [{path: {type: Exact, value: /exact}}], backendRefs: [{name: api}]}
    - {name: prefix, matches: [{path: {type: PathPrefix, value: /api}, method: POST}], backendRefs: [{name: api}]}
    - {name: regex, matches: [{path: {type: RegularExpression, value: '/r/[0-9]+/(a|b)*'}}], backendRefs: [{name: api}]}
    - {name: header, matches: [{headers: [{name: x-env, value: canary}, {name: x-v, type: RegularExpression, value: 'v[0-9]{1,3}'}]}], backendRefs: [{name: api}]}
    - {name: query, matches: [{queryParams: [{name: beta, value: '1'}]}], backendRefs: [{name: api}]}
    - {name: cookie, matches: [{cookies: [{name: session, type: RegularExpression, value: 'a.*z'}]}], backendRefs: [{name: api}]}
    - {name: host, matches: [{hostnames: ['*.example.com', shop.example]}], backendRefs: [{name: api}]}
"#;

/// An agent's answer, applied to a state in turn.
pub fn agent(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let mut state = crate::health::agent::AgentState::default();
    for line in text.split('\n') {
        if let Ok(words) = crate::health::agent::parse(line) {
            state.apply(&words);
        }
        assert!(state.weight_percent <= crate::health::agent::MAX_PERCENT);
        let _ = state.scale(1000);
    }
}

/// A healthy EndpointSlice (JSON, as a watch event carries it) read back
/// into a proxy's members.
pub fn slices(data: &[u8]) {
    static CFG: OnceLock<Config> = OnceLock::new();
    let cfg = CFG.get_or_init(|| {
        crate::api::load_configs(ROUTES_YAML)
            .expect("the fuzz config is valid")
            .remove(0)
    });
    let Ok(slice) = serde_json::from_slice::<k8s_openapi::api::discovery::v1::EndpointSlice>(data) else {
        return;
    };
    let read = crate::controller::slices::read(&[&slice]);
    let members = crate::controller::slices::members(cfg, &[&slice]);
    assert!(members.len() >= read.len());
    for m in &members {
        assert!(m.groups != 0 || !read.iter().any(|e| e.addr == m.addr && e.groups.is_empty()));
    }
}

/// An endpoint's answer to an HTTP check, read by the probe's own parsers
/// (status line, head, the end of a chunked body).
pub fn probe_answer(data: &[u8]) {
    crate::health::probe::fuzz_answer(data);
}

/// The first bytes of a connection to a passthrough listener, read for
/// the ClientHello's name, whole and cut at every length a read could end.
pub fn client_hello(data: &[u8]) {
    use crate::proxy::tcp::sni::{Hello, parse};
    let whole = parse(data);
    if let Hello::Complete(Some(name)) = &whole {
        assert!(!name.is_empty() && name.bytes().all(|b| b.is_ascii_graphic() && !b.is_ascii_uppercase()));
    }
    for cut in (0..data.len()).step_by(7) {
        // A prefix never says more than the whole does: incomplete, or the
        // same verdict once the hello ends inside it.
        match (parse(&data[..cut]), &whole) {
            (Hello::Incomplete, _) => {}
            (prefix, whole) => assert_eq!(&prefix, whole, "cut at {cut}"),
        }
    }
}

/// A client's bytes as the HTTP/1.1 fast path reads its head: a head it
/// takes is taken the same from any longer input (what follows is the
/// body or the next request), and a prefix of it is never taken; the
/// request it builds writes back out as a head that reads the same.
pub fn http1_head(data: &[u8]) {
    use crate::proxy::http::fast::head::{Parsed, parse_request, write_request};
    let Parsed::Fast {
        req,
        len,
        body,
        chunked,
    } = parse_request(data, u64::MAX)
    else {
        return;
    };
    assert!(len <= data.len());
    for cut in (0..len).step_by(5) {
        assert!(
            matches!(parse_request(&data[..cut], u64::MAX), Parsed::Partial | Parsed::Hyper),
            "a prefix of {cut} bytes read as a whole head"
        );
    }
    let (parts, ()) = req.into_parts();
    let mut again = Vec::new();
    write_request(&parts, &mut again);
    let Parsed::Fast {
        req: reread,
        body: body2,
        chunked: chunked2,
        ..
    } = parse_request(&again, u64::MAX)
    else {
        panic!(
            "the head written back does not read: {:?}",
            String::from_utf8_lossy(&again)
        );
    };
    assert_eq!(reread.method(), parts.method);
    assert_eq!(reread.headers(), &parts.headers);
    assert_eq!((body, chunked), (body2, chunked2));
}

/// An endpoint's chunked body as the fast path follows it: split anywhere,
/// the same verdict and the same end.
pub fn chunked(data: &[u8]) {
    use crate::proxy::http::fast::head::Chunked;
    let scan = |step: usize| {
        let mut c = Chunked::default();
        let mut used = 0;
        for piece in data.chunks(step.max(1)) {
            match c.scan(piece) {
                Ok(n) => {
                    used += n;
                    if n < piece.len() {
                        break;
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Ok((used, c.done()))
    };
    let whole = scan(data.len());
    for step in [1, 2, 3, 7, 64] {
        assert_eq!(scan(step).is_ok(), whole.is_ok(), "step {step}");
        if let (Ok(a), Ok(b)) = (scan(step), &whole) {
            assert_eq!(&a, b, "step {step}");
        }
    }
    if let Ok((used, true)) = whole {
        assert!(used <= data.len());
    }
}
