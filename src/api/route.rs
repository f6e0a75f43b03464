//! Routes as validation compiles them, and matching a request against them:
//! first match wins, in spec order; within a match every condition holds.
//!
//! Regexes are compiled once (the `regex` crate: linear time, no
//! backtracking), and matching reads the request where it lies: it allocates
//! only to percent-decode a query value that needs it.

use std::fmt;

use http::{HeaderMap, HeaderName, Method};

/// A compiled regular expression, compared by its pattern.
#[derive(Clone)]
pub struct Pattern(regex::Regex);

impl Pattern {
    /// Compiles `pattern` anchored at both ends (it must match the whole value).
    pub fn whole(pattern: &str) -> Result<Self, regex::Error> {
        regex::Regex::new(&format!("^(?:{pattern})$")).map(Pattern)
    }

    fn is_match(&self, text: &str) -> bool {
        self.0.is_match(text)
    }
}

impl fmt::Debug for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "/{}/", self.0.as_str())
    }
}

impl PartialEq for Pattern {
    fn eq(&self, other: &Self) -> bool {
        self.0.as_str() == other.0.as_str()
    }
}

impl Eq for Pattern {}

/// How a path is matched.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PathMatch {
    /// The whole path.
    Exact(String),
    /// Whole leading segments; stored without a trailing `/` (except `/`).
    Prefix(String),
    /// The whole path.
    Regex(Pattern),
}

impl PathMatch {
    /// Whether `path` matches.
    pub fn matches(&self, path: &str) -> bool {
        match self {
            PathMatch::Exact(p) => path == p,
            PathMatch::Prefix(p) if p == "/" => true,
            PathMatch::Prefix(p) => path
                .strip_prefix(p.as_str())
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('/')),
            PathMatch::Regex(r) => r.is_match(path),
        }
    }
}

/// How a named value is matched.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ValueMatch {
    /// Equal.
    Exact(String),
    /// The whole value.
    Regex(Pattern),
}

impl ValueMatch {
    /// Whether `value` matches.
    pub fn matches(&self, value: &str) -> bool {
        match self {
            ValueMatch::Exact(v) => value == v,
            ValueMatch::Regex(r) => r.is_match(value),
        }
    }
}

/// A host condition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostMatch {
    /// This host (lower case).
    Exact(String),
    /// One or more labels in front of this suffix (stored as `.example.com`).
    Wildcard(String),
}

impl HostMatch {
    /// Whether `host` (port already removed) matches, ignoring case.
    pub fn matches(&self, host: &str) -> bool {
        match self {
            HostMatch::Exact(h) => host.eq_ignore_ascii_case(h),
            HostMatch::Wildcard(suffix) => {
                host.len() > suffix.len()
                    && host
                        .get(host.len() - suffix.len()..)
                        .is_some_and(|tail| tail.eq_ignore_ascii_case(suffix))
            }
        }
    }
}

/// One match: every condition must hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RouteMatch {
    /// The path.
    pub path: Option<PathMatch>,
    /// The method.
    pub method: Option<Method>,
    /// Headers.
    pub headers: Vec<(HeaderName, ValueMatch)>,
    /// Query parameters.
    pub query: Vec<(String, ValueMatch)>,
    /// Cookies.
    pub cookies: Vec<(String, ValueMatch)>,
    /// Top-level body parameters (form or JSON).
    pub body: Vec<(String, ValueMatch)>,
    /// Hosts; any may match.
    pub hosts: Vec<HostMatch>,
}

/// What matching looks at in a request.
#[derive(Clone, Copy, Debug)]
pub struct RequestView<'a> {
    /// The method.
    pub method: &'a Method,
    /// The path, without the query.
    pub path: &'a str,
    /// The query, without `?`.
    pub query: Option<&'a str>,
    /// The host (from the URI's authority or `Host`), without a port.
    pub host: Option<&'a str>,
    /// The headers.
    pub headers: &'a HeaderMap,
    /// The body, when it was read whole (parsed at most once, on demand).
    pub body: Option<&'a BodyView<'a>>,
}

/// A buffered request body as body-parameter conditions see it.
pub struct BodyView<'a> {
    bytes: &'a [u8],
    form: bool,
    json: std::cell::OnceCell<Option<serde_json::Map<String, serde_json::Value>>>,
}

impl<'a> BodyView<'a> {
    /// The body of a request with `headers`; `None` for a type that has no
    /// parameters (only forms and JSON do).
    pub fn new(bytes: &'a [u8], headers: &HeaderMap) -> Option<Self> {
        let kind = headers.get(http::header::CONTENT_TYPE)?.to_str().ok()?;
        let essence = kind.split(';').next().unwrap_or("").trim();
        let form = essence.eq_ignore_ascii_case("application/x-www-form-urlencoded");
        let json = essence.eq_ignore_ascii_case("application/json");
        (form || json).then(|| BodyView {
            bytes,
            form,
            json: std::cell::OnceCell::new(),
        })
    }

    fn holds(&self, name: &str, m: &ValueMatch) -> bool {
        if self.form {
            let text = std::str::from_utf8(self.bytes).ok();
            return query_values(text, name).any(|v| m.matches(&v));
        }
        let object = self.json.get_or_init(|| {
            serde_json::from_slice::<serde_json::Value>(self.bytes)
                .ok()
                .and_then(|v| match v {
                    serde_json::Value::Object(o) => Some(o),
                    _ => None,
                })
        });
        match object.as_ref().and_then(|o| o.get(name)) {
            Some(serde_json::Value::String(s)) => m.matches(s),
            Some(v @ (serde_json::Value::Number(_) | serde_json::Value::Bool(_))) => m.matches(&v.to_string()),
            _ => false,
        }
    }
}

impl fmt::Debug for BodyView<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BodyView")
            .field("len", &self.bytes.len())
            .field("form", &self.form)
            .finish()
    }
}

impl RouteMatch {
    /// Whether every condition holds for `req`.
    pub fn matches(&self, req: &RequestView<'_>) -> bool {
        if let Some(m) = &self.method
            && m != req.method
        {
            return false;
        }
        if let Some(p) = &self.path
            && !p.matches(req.path)
        {
            return false;
        }
        if !self.hosts.is_empty() && !req.host.is_some_and(|h| self.hosts.iter().any(|m| m.matches(h))) {
            return false;
        }
        let headers_hold = self.headers.iter().all(|(name, m)| {
            req.headers
                .get_all(name)
                .iter()
                .any(|v| v.to_str().is_ok_and(|v| m.matches(v)))
        });
        headers_hold
            && self
                .query
                .iter()
                .all(|(name, m)| query_values(req.query, name).any(|v| m.matches(&v)))
            && self
                .cookies
                .iter()
                .all(|(name, m)| cookie(req.headers, name).is_some_and(|v| m.matches(v)))
            && (self.body.is_empty()
                || req
                    .body
                    .is_some_and(|b| self.body.iter().all(|(name, m)| b.holds(name, m))))
    }
}

/// A cookie's value from the request's `Cookie` headers.
pub fn cookie<'a>(headers: &'a http::HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// The decoded values of parameter `name` in `query`.
fn query_values<'a>(query: Option<&'a str>, name: &'a str) -> impl Iterator<Item = std::borrow::Cow<'a, str>> + 'a {
    query.unwrap_or("").split('&').filter_map(move |pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (decode(k) == name).then(|| decode(v))
    })
}

/// Percent- and `+`-decoding of one query component; borrowed when there is
/// nothing to decode, which is the common case.
fn decode(s: &str) -> std::borrow::Cow<'_, str> {
    if !s.contains(['%', '+']) {
        return std::borrow::Cow::Borrowed(s);
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h << 4 | l);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    std::borrow::Cow::Owned(String::from_utf8_lossy(&out).into_owned())
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// A backend a route sends to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendRef {
    /// Index into the config's groups (0 is `default`).
    pub group: usize,
    /// Relative share.
    pub weight: u32,
}

/// One compiled route.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    /// Its name.
    pub name: String,
    /// Any of these; empty means every request.
    pub matches: Vec<RouteMatch>,
    /// Where its requests go.
    pub refs: Vec<BackendRef>,
    /// Retry policy (the service's, with the route's fields over it).
    pub retry: super::policy::RetryPolicy,
    /// `timeouts.response` for its requests.
    pub response_timeout: std::time::Duration,
    /// The route's own rate limit.
    pub rate_limit: Option<super::policy::RateLimit>,
}

impl Route {
    /// Whether the route takes `req`.
    pub fn matches(&self, req: &RequestView<'_>) -> bool {
        self.matches.is_empty() || self.matches.iter().any(|m| m.matches(req))
    }

    /// The group for a request, given a uniform draw in `0..total weight`:
    /// groups with weight 0 are never chosen.
    pub fn pick_group(&self, draw: u64) -> usize {
        let mut left = draw;
        for r in &self.refs {
            if left < u64::from(r.weight) {
                return r.group;
            }
            left -= u64::from(r.weight);
        }
        self.refs.iter().find(|r| r.weight > 0).map_or(0, |r| r.group)
    }

    /// The sum of the weights (validation keeps it above 0).
    pub fn total_weight(&self) -> u64 {
        self.refs.iter().map(|r| u64::from(r.weight)).sum()
    }
}

/// The first route that takes `req`, by index.
pub fn first_match(routes: &[Route], req: &RequestView<'_>) -> Option<usize> {
    routes.iter().position(|r| r.matches(req))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base_retry() -> crate::api::policy::RetryPolicy {
        let yaml = "apiVersion: balanced.dev/v1alpha1\nkind: BalancedService\nmetadata: {name: t}\nspec:\n  endpoints: [{address: 127.0.0.1, port: 80}]\n  listeners: [{name: http, port: 8080}]\n";
        crate::api::load_configs(yaml).unwrap().remove(0).retry
    }

    fn view<'a>(method: &'a Method, target: &'a str, headers: &'a HeaderMap) -> RequestView<'a> {
        let (path, query) = match target.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (target, None),
        };
        RequestView {
            method,
            path,
            query,
            host: Some("shop.example.com"),
            headers,
            body: None,
        }
    }

    fn holds(m: &RouteMatch, target: &str) -> bool {
        let h = HeaderMap::new();
        m.matches(&view(&Method::GET, target, &h))
    }

    #[test]
    fn path_prefix_matches_whole_segments() {
        let m = RouteMatch {
            path: Some(PathMatch::Prefix("/api".into())),
            ..Default::default()
        };
        for yes in ["/api", "/api/", "/api/x", "/api/x/y?z=1"] {
            assert!(holds(&m, yes), "{yes}");
        }
        for no in ["/apix", "/ap", "/", "/v1/api"] {
            assert!(!holds(&m, no), "{no}");
        }
        let root = RouteMatch {
            path: Some(PathMatch::Prefix("/".into())),
            ..Default::default()
        };
        assert!(holds(&root, "/anything"));
    }

    #[test]
    fn exact_and_regex_paths_match_the_whole_path() {
        let exact = RouteMatch {
            path: Some(PathMatch::Exact("/login".into())),
            ..Default::default()
        };
        assert!(holds(&exact, "/login") && !holds(&exact, "/login/x") && !holds(&exact, "/log"));
        let re = RouteMatch {
            path: Some(PathMatch::Regex(Pattern::whole(r"/users/\d+").unwrap())),
            ..Default::default()
        };
        assert!(holds(&re, "/users/42"));
        assert!(!holds(&re, "/users/42/orders"), "anchored at the end");
        assert!(!holds(&re, "/v1/users/42"), "anchored at the start");
    }

    #[test]
    fn method_headers_query_cookies_and_hosts() {
        let mut h = HeaderMap::new();
        h.insert("x-canary", "yes".parse().unwrap());
        h.insert("cookie", "session=abc; tier=gold".parse().unwrap());
        let m = RouteMatch {
            method: Some(Method::POST),
            headers: vec![(HeaderName::from_static("x-canary"), ValueMatch::Exact("yes".into()))],
            query: vec![("q".into(), ValueMatch::Exact("a b".into()))],
            cookies: vec![(
                "tier".into(),
                ValueMatch::Regex(Pattern::whole("gold|platinum").unwrap()),
            )],
            hosts: vec![HostMatch::Wildcard(".example.com".into())],
            ..Default::default()
        };
        let req = |method: &Method, target: &str, headers: &HeaderMap| m.matches(&view(method, target, headers));
        assert!(req(&Method::POST, "/x?q=a%20b", &h), "percent-decoded query value");
        assert!(req(&Method::POST, "/x?other=1&q=a+b", &h), "+ is a space in a query");
        assert!(!req(&Method::GET, "/x?q=a%20b", &h), "method");
        assert!(!req(&Method::POST, "/x?q=ab", &h), "query value");
        assert!(!req(&Method::POST, "/x", &h), "missing query param");
        let mut no_cookie = h.clone();
        no_cookie.insert("cookie", "tier=silver".parse().unwrap());
        assert!(!req(&Method::POST, "/x?q=a+b", &no_cookie), "cookie regex");
        let mut no_header = h.clone();
        no_header.remove("x-canary");
        assert!(!req(&Method::POST, "/x?q=a+b", &no_header), "header");
    }

    #[test]
    fn body_params_of_forms_and_json() {
        let m = RouteMatch {
            body: vec![
                ("action".into(), ValueMatch::Exact("buy now".into())),
                ("qty".into(), ValueMatch::Regex(Pattern::whole(r"\d+").unwrap())),
            ],
            ..Default::default()
        };
        let holds = |content_type: &str, body: &str| {
            let mut h = HeaderMap::new();
            h.insert("content-type", content_type.parse().unwrap());
            let view = BodyView::new(body.as_bytes(), &h);
            let mut req = super::tests::view(&Method::POST, "/", &h);
            req.body = view.as_ref();
            m.matches(&req)
        };
        assert!(holds("application/x-www-form-urlencoded", "qty=3&action=buy+now"));
        assert!(holds(
            "application/json; charset=utf-8",
            r#"{"action": "buy now", "qty": 3}"#
        ));
        assert!(
            !holds("application/json", r#"{"action": "buy now", "qty": "three"}"#),
            "regex on the value"
        );
        assert!(
            !holds("application/json", r#"{"order": {"action": "buy now", "qty": 3}}"#),
            "top-level keys only"
        );
        assert!(!holds("application/json", "not json"));
        assert!(
            !holds("text/plain", "qty=3&action=buy+now"),
            "only forms and JSON have parameters"
        );
        let h = HeaderMap::new();
        assert!(!m.matches(&view(&Method::POST, "/", &h)), "no buffered body: no match");
    }

    #[test]
    fn hostnames_exact_and_wildcard() {
        let exact = HostMatch::Exact("shop.example.com".into());
        assert!(exact.matches("SHOP.example.com"));
        assert!(!exact.matches("example.com"));
        let wild = HostMatch::Wildcard(".example.com".into());
        assert!(wild.matches("a.example.com") && wild.matches("a.b.example.com"));
        assert!(!wild.matches("example.com"), "at least one label in front");
        assert!(!wild.matches("badexample.com"));
    }

    #[test]
    fn first_match_wins_and_no_matches_means_every_request() {
        let route = |name: &str, prefix: Option<&str>| Route {
            name: name.into(),
            matches: prefix
                .map(|p| {
                    vec![RouteMatch {
                        path: Some(PathMatch::Prefix(p.into())),
                        ..Default::default()
                    }]
                })
                .unwrap_or_default(),
            refs: vec![BackendRef { group: 0, weight: 1 }],
            retry: base_retry(),
            response_timeout: std::time::Duration::from_secs(60),
            rate_limit: None,
        };
        let routes = vec![
            route("api", Some("/api")),
            route("all", None),
            route("never", Some("/x")),
        ];
        let h = HeaderMap::new();
        assert_eq!(first_match(&routes, &view(&Method::GET, "/api/v1", &h)), Some(0));
        assert_eq!(first_match(&routes, &view(&Method::GET, "/x", &h)), Some(1), "in order");
        assert_eq!(first_match(&routes[..1], &view(&Method::GET, "/x", &h)), None);
    }

    #[test]
    fn weighted_split_within_three_percent() {
        use rand::Rng;
        let route = Route {
            name: "canary".into(),
            matches: Vec::new(),
            refs: vec![
                BackendRef { group: 1, weight: 90 },
                BackendRef { group: 2, weight: 10 },
                BackendRef { group: 3, weight: 0 },
            ],
            retry: base_retry(),
            response_timeout: std::time::Duration::from_secs(60),
            rate_limit: None,
        };
        let mut rng = rand::rng();
        let mut counts = [0u32; 4];
        for _ in 0..10_000 {
            counts[route.pick_group(rng.random_range(0..route.total_weight()))] += 1;
        }
        assert_eq!(counts[3], 0, "weight 0 drains the group");
        let share = f64::from(counts[2]) / 10_000.0;
        assert!((0.07..=0.13).contains(&share), "canary share {share}: {counts:?}");
        assert!((8_700..=9_300).contains(&counts[1]), "{counts:?}");
    }

    #[test]
    fn decoding_handles_bad_escapes() {
        assert_eq!(decode("a%2Fb"), "a/b");
        assert_eq!(decode("100%"), "100%");
        assert_eq!(decode("%zz"), "%zz");
        assert!(matches!(decode("plain"), std::borrow::Cow::Borrowed(_)));
    }
}
