//! Spec in, typed [`Config`] or every error out.
//!
//! Each error names the field path and the bad value
//! (`spec.healthCheck.rise: must be >= 1, got 0`), and validation keeps going
//! after the first error so a user fixes a file in one pass.

use std::collections::HashSet;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use super::config::*;
use super::duration::{format_duration, parse_duration};
use super::route::HostMatch;
use super::spec::{self, BalancedServiceSpec, PortRef};

/// One problem with a spec: where and what.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    /// Field path, e.g. `spec.listeners[1].port`.
    pub path: String,
    /// What is wrong, with the value.
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Every problem found in one spec.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct ValidationErrors(pub Vec<FieldError>);

impl fmt::Display for ValidationErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// Collects errors while the typed config is built.
#[derive(Default)]
struct Errors(Vec<FieldError>);

impl Errors {
    fn add(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(FieldError {
            path: path.into(),
            message: message.into(),
        });
    }

    fn port(&mut self, path: &str, value: i32) -> u16 {
        match u16::try_from(value) {
            Ok(p) if p >= 1 => p,
            _ => {
                self.add(path, format!("must be 1..=65535, got {value}"));
                1
            }
        }
    }

    fn at_least(&mut self, path: &str, value: i32, min: i32) -> u32 {
        if value < min {
            self.add(path, format!("must be >= {min}, got {value}"));
        }
        value.max(0) as u32
    }

    fn in_range(&mut self, path: &str, value: i32, min: i32, max: i32) -> u32 {
        if value < min {
            self.add(path, format!("must be >= {min}, got {value}"));
        } else if value > max {
            self.add(path, format!("must be <= {max}, got {value}"));
        }
        value.clamp(min, max) as u32
    }

    fn duration(&mut self, path: &str, text: &str) -> Duration {
        parse_duration(text).unwrap_or_else(|e| {
            self.add(path, e.to_string());
            Duration::ZERO
        })
    }

    fn positive_duration(&mut self, path: &str, text: &str) -> Duration {
        match parse_duration(text) {
            Ok(Duration::ZERO) => {
                self.add(path, format!("must be more than 0, got {text:?}"));
                Duration::ZERO
            }
            Ok(d) => d,
            Err(e) => {
                self.add(path, e.to_string());
                Duration::ZERO
            }
        }
    }
}

/// Turns a spec into a [`Config`], or into the list of everything wrong with it.
pub fn validate(key: ServiceKey, spec: &BalancedServiceSpec) -> Result<Config, ValidationErrors> {
    let mut errs = Errors::default();

    let service = spec.service.clone();
    if let Some(name) = &service
        && !is_dns_label(name)
    {
        errs.add(
            "spec.service",
            format!("must be a Service name (lower-case letters, digits, '-'), got {name:?}"),
        );
    }

    let endpoints = endpoints(&mut errs, &spec.endpoints);
    let listeners = listeners(&mut errs, &spec.listeners);
    let algorithm = algorithm(&mut errs, spec, &listeners);
    let health = health_check(&mut errs, &spec.health_check);
    let passive = passive(&mut errs, &spec.passive_health);
    let timeouts = timeouts(&mut errs, &spec.timeouts);
    let retry = retry(&mut errs, &spec.retry, &timeouts);
    let limits = limits(&mut errs, &spec.limits);
    let rate_limit = spec
        .rate_limit
        .as_ref()
        .map(|r| rate_limit(&mut errs, "spec.rateLimit", r));
    let backends = backends(&mut errs, &spec.backends);
    let backend_tls = group_tls(&mut errs, spec);
    let mut listeners = listeners;
    sni_groups(&mut errs, &mut listeners, &backends);
    let routes = routes(&mut errs, &spec.routes, &backends, &retry, &timeouts);
    if !routes.is_empty() && !listeners.iter().any(|l| l.protocol == ListenerProtocol::Http) {
        errs.add(
            "spec.routes",
            "route HTTP requests, but every listener is TCP (TCP connections go to default)",
        );
    }
    if rate_limit.is_some() && !listeners.iter().any(|l| l.protocol == ListenerProtocol::Http) {
        errs.add(
            "spec.rateLimit",
            "limits HTTP requests, but every listener is TCP (use spec.limits.maxConnectionsPerClient)",
        );
    }
    let replicas = errs.at_least("spec.proxy.replicas", spec.proxy.replicas, 0);
    let panic_threshold = spec.health_check.panic_threshold;
    if !(0..=100).contains(&panic_threshold) {
        errs.add(
            "spec.healthCheck.panicThreshold",
            format!("must be 0..=100 (percent), got {panic_threshold}"),
        );
    }
    let panic_threshold = panic_threshold.clamp(0, 100) as u32;
    let slow_start = spec.slow_start.as_ref().map(|s| slow_start(&mut errs, s));

    if service.is_none() && spec.endpoints.is_empty() {
        errs.add(
            "spec",
            "needs spec.service (a Service's endpoints) or spec.endpoints (static endpoints)",
        );
    }

    if !errs.0.is_empty() {
        return Err(ValidationErrors(errs.0));
    }
    Ok(Config {
        key,
        service,
        endpoints,
        listeners,
        algorithm,
        health,
        passive,
        retry,
        timeouts,
        limits,
        rate_limit,
        slow_start,
        backends,
        backend_tls,
        routes,
        replicas,
        publish_endpoint_slice: spec.publish_endpoint_slice,
        panic_threshold,
        endpoint_header: spec.debug.endpoint_header,
        error_detail: spec.debug.error_detail,
    })
}

fn slow_start(errs: &mut Errors, s: &spec::SlowStartSpec) -> SlowStart {
    let window = errs.positive_duration("spec.slowStart.window", &s.window);
    // Past an hour a ramp is a deployment strategy, not a warm-up.
    if window > Duration::from_secs(3600) {
        errs.add(
            "spec.slowStart.window",
            format!("must be at most 1h, got {:?}", s.window),
        );
    }
    if !(s.aggression > 0.0 && s.aggression <= 10.0) {
        errs.add(
            "spec.slowStart.aggression",
            format!("must be more than 0 and at most 10, got {}", s.aggression),
        );
    }
    let min_weight_percent = errs.in_range("spec.slowStart.minWeightPercent", s.min_weight_percent, 1, 100);
    SlowStart {
        window,
        aggression_milli: (s.aggression.clamp(0.001, 10.0) * 1000.0).round() as u32,
        min_weight_percent,
    }
}

fn rate_limit(errs: &mut Errors, path: &str, spec: &spec::RateLimitSpec) -> RateLimit {
    if spec.requests < 1 {
        errs.add(
            format!("{path}.requests"),
            format!("must be >= 1, got {}", spec.requests),
        );
    }
    if !(0..=1_000_000).contains(&spec.burst) {
        errs.add(
            format!("{path}.burst"),
            format!("must be 0..=1000000, got {}", spec.burst),
        );
    }
    let per = errs.positive_duration(&format!("{path}.per"), &spec.per);
    let name = spec.key.name.as_deref();
    let name_path = format!("{path}.key.name");
    let key = match (spec.key.source, name) {
        (spec::RateLimitKeySource::None, None) => RateLimitKey::None,
        (spec::RateLimitKeySource::SourceIp, None) => RateLimitKey::SourceIp,
        (source @ (spec::RateLimitKeySource::None | spec::RateLimitKeySource::SourceIp), Some(n)) => {
            errs.add(
                &name_path,
                format!("is only for Header and Cookie keys, got {n:?} with source {source:?}"),
            );
            RateLimitKey::None
        }
        (spec::RateLimitKeySource::Header, n) => match http::HeaderName::from_bytes(n.unwrap_or("").as_bytes()) {
            Ok(h) => RateLimitKey::Header(h),
            Err(_) => {
                errs.add(&name_path, format!("must be a header name, got {:?}", n.unwrap_or("")));
                RateLimitKey::None
            }
        },
        (spec::RateLimitKeySource::Cookie, n) => {
            let n = n.unwrap_or("");
            if n.is_empty() || !n.bytes().all(is_cookie_name_byte) {
                errs.add(&name_path, format!("must be a cookie name, got {n:?}"));
            }
            RateLimitKey::Cookie(n.to_string())
        }
    };
    RateLimit {
        requests: spec.requests.max(1) as u32,
        per,
        burst: spec.burst.clamp(0, 1_000_000) as u32,
        delay: spec.delay,
        key,
    }
}

fn timeouts(errs: &mut Errors, spec: &spec::TimeoutsSpec) -> Timeouts {
    Timeouts {
        connect: errs.positive_duration("spec.timeouts.connect", &spec.connect),
        response: errs.positive_duration("spec.timeouts.response", &spec.response),
        request_header: errs.positive_duration("spec.timeouts.requestHeader", &spec.request_header),
        request_body: errs.positive_duration("spec.timeouts.requestBody", &spec.request_body),
        idle: spec
            .idle
            .as_ref()
            .map(|idle| errs.positive_duration("spec.timeouts.idle", idle)),
        response_write: errs.positive_duration("spec.timeouts.responseWrite", &spec.response_write),
    }
}

fn limits(errs: &mut Errors, spec: &spec::LimitsSpec) -> Limits {
    let within = |errs: &mut Errors, path: &str, value: i32, min: i32, max: i32| {
        if !(min..=max).contains(&value) {
            errs.add(path, format!("must be {min}..={max}, got {value}"));
        }
        value.clamp(min, max) as usize
    };
    let limits = Limits {
        max_connections: within(errs, "spec.limits.maxConnections", spec.max_connections, 1, 1_000_000),
        max_connections_per_client: within(
            errs,
            "spec.limits.maxConnectionsPerClient",
            spec.max_connections_per_client,
            0,
            1_000_000,
        ),
        max_request_headers_bytes: within(
            errs,
            "spec.limits.maxRequestHeadersBytes",
            spec.max_request_headers_bytes,
            1024,
            1 << 20,
        ),
        max_uri_bytes: within(errs, "spec.limits.maxUriBytes", spec.max_uri_bytes, 256, 1 << 20),
        max_request_headers: within(
            errs,
            "spec.limits.maxRequestHeaders",
            spec.max_request_headers,
            1,
            10_000,
        ),
        max_requests: within(errs, "spec.limits.maxRequests", spec.max_requests, 0, 1_000_000),
        max_pending_requests: within(
            errs,
            "spec.limits.maxPendingRequests",
            spec.max_pending_requests,
            0,
            1_000_000,
        ),
    };
    if spec.max_pending_requests > 0 && spec.max_requests == 0 {
        errs.add(
            "spec.limits.maxPendingRequests",
            format!(
                "needs spec.limits.maxRequests (requests wait for one of those), got {} with maxRequests 0",
                spec.max_pending_requests
            ),
        );
    }
    if spec.max_uri_bytes > spec.max_request_headers_bytes {
        errs.add(
            "spec.limits.maxUriBytes",
            format!(
                "must be <= spec.limits.maxRequestHeadersBytes ({}), got {}",
                spec.max_request_headers_bytes, spec.max_uri_bytes
            ),
        );
    }
    limits
}

fn endpoints(errs: &mut Errors, specs: &[spec::StaticEndpoint]) -> Vec<EndpointConfig> {
    endpoints_at(errs, "spec.endpoints", specs)
}

fn endpoints_at(errs: &mut Errors, at: &str, specs: &[spec::StaticEndpoint]) -> Vec<EndpointConfig> {
    let mut seen = HashSet::new();
    let mut out = Vec::with_capacity(specs.len());
    for (i, ep) in specs.iter().enumerate() {
        let path = format!("{at}[{i}]");
        let ip: Option<IpAddr> = ep.address.parse().ok();
        if ip.is_none() {
            errs.add(
                format!("{path}.address"),
                format!("must be an IPv4 or IPv6 address, got {:?}", ep.address),
            );
        }
        let port = errs.port(&format!("{path}.port"), ep.port);
        if !(1..=1000).contains(&ep.weight) {
            errs.add(format!("{path}.weight"), format!("must be 1..=1000, got {}", ep.weight));
        }
        let max_connections = errs.at_least(&format!("{path}.maxConnections"), ep.max_connections, 0);
        if let Some(ip) = ip {
            let addr = SocketAddr::new(ip, port);
            if !seen.insert(addr) {
                errs.add(path, format!("{addr} is listed twice"));
            }
            out.push(EndpointConfig {
                addr,
                weight: ep.weight.clamp(1, 1000) as u32,
                backup: ep.backup,
                max_connections,
            });
        }
    }
    if !out.is_empty() && out.iter().all(|e| e.backup) {
        errs.add(
            at,
            "every endpoint is a backup; at least one must be a primary (backup: false)",
        );
    }
    out
}

fn backends(errs: &mut Errors, specs: &[spec::BackendSpec]) -> Vec<Backend> {
    if specs.len() >= MAX_GROUPS {
        errs.add(
            "spec.backends",
            format!("at most {} backends, got {}", MAX_GROUPS - 1, specs.len()),
        );
    }
    let mut names = HashSet::new();
    let mut out = Vec::with_capacity(specs.len());
    for (i, b) in specs.iter().enumerate() {
        let path = format!("spec.backends[{i}]");
        if b.name == "default" {
            errs.add(
                format!("{path}.name"),
                "\"default\" is the top-level service and endpoints; choose another name",
            );
        } else {
            unique_label(errs, &path, &b.name, &mut names);
        }
        if let Some(svc) = &b.service
            && !is_dns_label(svc)
        {
            errs.add(
                format!("{path}.service"),
                format!("must be a Service name (lower-case letters, digits, '-'), got {svc:?}"),
            );
        }
        if b.service.is_none() && b.endpoints.is_empty() {
            errs.add(path.clone(), "needs service or endpoints");
        }
        out.push(Backend {
            name: b.name.clone(),
            service: b.service.clone(),
            endpoints: endpoints_at(errs, &format!("{path}.endpoints"), &b.endpoints),
        });
    }
    out
}

fn routes(
    errs: &mut Errors,
    specs: &[spec::RouteSpec],
    backends: &[Backend],
    base_retry: &RetryPolicy,
    base_timeouts: &Timeouts,
) -> Vec<super::route::Route> {
    use super::route::{BackendRef, PathMatch, Pattern, Route, RouteMatch, ValueMatch};
    let mut names = HashSet::new();
    let mut out = Vec::with_capacity(specs.len());
    let regex = |errs: &mut Errors, path: String, pattern: &str| match Pattern::whole(pattern) {
        Ok(p) => Some(p),
        Err(e) => {
            // The regex crate's message spans lines; one line names the field.
            let first = e
                .to_string()
                .lines()
                .find(|l| l.starts_with("error:"))
                .unwrap_or("")
                .to_string();
            errs.add(
                path,
                format!("invalid regex {pattern:?}: {}", first.trim_start_matches("error: ")),
            );
            None
        }
    };
    let value = |errs: &mut Errors, path: String, v: &spec::ValueMatchSpec| match v.type_ {
        spec::ValueMatchType::Exact => Some(ValueMatch::Exact(v.value.clone())),
        spec::ValueMatchType::RegularExpression => regex(errs, path, &v.value).map(ValueMatch::Regex),
    };
    for (i, r) in specs.iter().enumerate() {
        let path = format!("spec.routes[{i}]");
        unique_label(errs, &path, &r.name, &mut names);
        let mut matches = Vec::with_capacity(r.matches.len());
        for (j, m) in r.matches.iter().enumerate() {
            let at = format!("{path}.matches[{j}]");
            let mut out_m = RouteMatch::default();
            if let Some(p) = &m.path {
                let vpath = format!("{at}.path.value");
                out_m.path = match p.type_ {
                    spec::PathMatchType::Exact | spec::PathMatchType::PathPrefix if !p.value.starts_with('/') => {
                        errs.add(vpath, format!("must start with '/', got {:?}", p.value));
                        None
                    }
                    spec::PathMatchType::Exact => Some(PathMatch::Exact(p.value.clone())),
                    spec::PathMatchType::PathPrefix => {
                        let trimmed = p.value.trim_end_matches('/');
                        Some(PathMatch::Prefix(if trimmed.is_empty() {
                            "/".into()
                        } else {
                            trimmed.into()
                        }))
                    }
                    spec::PathMatchType::RegularExpression => regex(errs, vpath, &p.value).map(PathMatch::Regex),
                };
            }
            if let Some(method) = &m.method {
                match http::Method::from_bytes(method.as_bytes()) {
                    Ok(parsed) if method.bytes().all(|b| b.is_ascii_uppercase()) => out_m.method = Some(parsed),
                    _ => errs.add(
                        format!("{at}.method"),
                        format!("must be an upper-case HTTP method such as GET or POST, got {method:?}"),
                    ),
                }
            }
            for (k, h) in m.headers.iter().enumerate() {
                let hpath = format!("{at}.headers[{k}]");
                match http::HeaderName::from_bytes(h.name.as_bytes()) {
                    Ok(name) => {
                        if let Some(v) = value(errs, format!("{hpath}.value"), h) {
                            out_m.headers.push((name, v));
                        }
                    }
                    Err(_) => errs.add(
                        format!("{hpath}.name"),
                        format!("must be a header name, got {:?}", h.name),
                    ),
                }
            }
            for (k, q) in m.query_params.iter().enumerate() {
                let qpath = format!("{at}.queryParams[{k}]");
                if q.name.is_empty() {
                    errs.add(format!("{qpath}.name"), "must not be empty");
                }
                if let Some(v) = value(errs, format!("{qpath}.value"), q) {
                    out_m.query.push((q.name.clone(), v));
                }
            }
            for (k, c) in m.cookies.iter().enumerate() {
                let cpath = format!("{at}.cookies[{k}]");
                if c.name.is_empty() || !c.name.bytes().all(is_cookie_name_byte) {
                    errs.add(
                        format!("{cpath}.name"),
                        format!("must be a cookie name, got {:?}", c.name),
                    );
                }
                if let Some(v) = value(errs, format!("{cpath}.value"), c) {
                    out_m.cookies.push((c.name.clone(), v));
                }
            }
            for (k, b) in m.body_params.iter().enumerate() {
                let bpath = format!("{at}.bodyParams[{k}]");
                if b.name.is_empty() {
                    errs.add(format!("{bpath}.name"), "must not be empty");
                }
                if let Some(v) = value(errs, format!("{bpath}.value"), b) {
                    out_m.body.push((b.name.clone(), v));
                }
            }
            for (k, h) in m.hostnames.iter().enumerate() {
                out_m.hosts.extend(host_match(errs, &format!("{at}.hostnames[{k}]"), h));
            }
            matches.push(out_m);
        }
        if r.backend_refs.is_empty() {
            errs.add(format!("{path}.backendRefs"), "must name at least one backend");
        }
        let mut refs = Vec::with_capacity(r.backend_refs.len());
        for (k, b) in r.backend_refs.iter().enumerate() {
            let bpath = format!("{path}.backendRefs[{k}]");
            let group = if b.name == "default" {
                Some(0)
            } else {
                backends.iter().position(|g| g.name == b.name).map(|g| g + 1)
            };
            if group.is_none() {
                let known: Vec<&str> = std::iter::once("default")
                    .chain(backends.iter().map(|g| g.name.as_str()))
                    .collect();
                errs.add(
                    format!("{bpath}.name"),
                    format!("no backend named {:?} (known: {})", b.name, known.join(", ")),
                );
            }
            if !(0..=1_000_000).contains(&b.weight) {
                errs.add(
                    format!("{bpath}.weight"),
                    format!("must be 0..=1000000, got {}", b.weight),
                );
            }
            if let Some(group) = group {
                refs.push(BackendRef {
                    group,
                    weight: b.weight.clamp(0, 1_000_000) as u32,
                });
            }
        }
        if !r.backend_refs.is_empty() && r.backend_refs.iter().all(|b| b.weight == 0) {
            errs.add(
                format!("{path}.backendRefs"),
                "every weight is 0; at least one backend must take traffic",
            );
        }
        let mut retry = base_retry.clone();
        if let Some(rr) = &r.retry {
            if let Some(on) = &rr.on {
                retry.on = on.clone();
                retry.on.dedup();
            }
            if let Some(tries) = rr.tries {
                retry.tries = errs.at_least(&format!("{path}.retry.tries"), tries, 0);
            }
            if let Some(timeout) = &rr.timeout {
                let t = errs.duration(&format!("{path}.retry.timeout"), timeout);
                retry.timeout = (!t.is_zero()).then_some(t);
            }
        }
        let response_timeout = r
            .timeouts
            .as_ref()
            .and_then(|t| t.response.as_ref())
            .map_or(base_timeouts.response, |t| {
                errs.positive_duration(&format!("{path}.timeouts.response"), t)
            });
        let rate_limit = r
            .rate_limit
            .as_ref()
            .map(|rl| rate_limit(errs, &format!("{path}.rateLimit"), rl));
        out.push(Route {
            name: r.name.clone(),
            matches,
            refs,
            retry,
            response_timeout,
            rate_limit,
        });
    }
    out
}

fn listeners(errs: &mut Errors, specs: &[spec::Listener]) -> Vec<ListenerConfig> {
    if specs.is_empty() {
        errs.add("spec.listeners", "must name at least one listener");
    }
    let mut names = HashSet::new();
    let mut ports = HashSet::new();
    let mut out = Vec::with_capacity(specs.len());
    for (i, l) in specs.iter().enumerate() {
        let path = format!("spec.listeners[{i}]");
        if !is_port_name(&l.name) {
            errs.add(
                format!("{path}.name"),
                format!(
                    "must be 1-15 lower-case letters, digits or '-', starting and ending with a letter or digit, got {:?}",
                    l.name
                ),
            );
        } else if !names.insert(l.name.clone()) {
            errs.add(format!("{path}.name"), format!("{:?} is used twice", l.name));
        }
        let port = errs.port(&format!("{path}.port"), l.port);
        if port == l.port as u16 && !ports.insert(port) {
            errs.add(format!("{path}.port"), format!("{port} is used twice"));
        }
        let target_port = match &l.target_port {
            None => None,
            Some(PortRef::Number(n)) => Some(TargetPort::Number(errs.port(&format!("{path}.targetPort"), *n))),
            Some(PortRef::Name(name)) => match name.parse::<i32>() {
                // YAML `targetPort: "8080"` means the number, as in a Service.
                Ok(n) => Some(TargetPort::Number(errs.port(&format!("{path}.targetPort"), n))),
                Err(_) if is_port_name(name) => Some(TargetPort::Name(name.clone())),
                Err(_) => {
                    errs.add(
                        format!("{path}.targetPort"),
                        format!("must be a port number or a port name, got {name:?}"),
                    );
                    None
                }
            },
        };
        let app_protocol = match &l.app_protocol {
            None => None,
            Some(text) => match (l.protocol, AppProtocol::parse(text)) {
                (spec::ListenerProtocol::Tcp, _) => {
                    errs.add(
                        format!("{path}.appProtocol"),
                        format!("is only used with protocol HTTP, got {text:?} on a TCP listener"),
                    );
                    None
                }
                (_, Some(p)) => Some(p),
                (_, None) => {
                    errs.add(
                        format!("{path}.appProtocol"),
                        format!("must be \"http\" or \"kubernetes.io/h2c\", got {text:?}"),
                    );
                    None
                }
            },
        };
        let tls = l.tls.as_ref().map(|t| listener_tls(errs, &format!("{path}.tls"), t));
        out.push(ListenerConfig {
            name: l.name.clone(),
            port,
            protocol: l.protocol,
            target_port,
            app_protocol,
            trust_forwarded_headers: l.trust_forwarded_headers,
            tls,
        });
        if let Some(t) = &l.tls
            && l.protocol == spec::ListenerProtocol::Http
        {
            if t.mode == Some(spec::TlsMode::Passthrough) {
                errs.add(
                    format!("{path}.tls.mode"),
                    "Passthrough balances connections, not requests: it needs protocol TCP",
                );
            }
            if !t.sni_routes.is_empty() {
                errs.add(
                    format!("{path}.tls.sniRoutes"),
                    "route connections on TCP listeners; an HTTP listener routes requests with spec.routes",
                );
            }
        }
    }
    out
}

fn algorithm(errs: &mut Errors, spec: &BalancedServiceSpec, listeners: &[ListenerConfig]) -> Algorithm {
    let name = match spec.algorithm {
        spec::Algorithm::LeastConnections => {
            return no_hash(errs, spec, Algorithm::LeastConnections);
        }
        spec::Algorithm::PowerOfTwoChoices => {
            return no_hash(errs, spec, Algorithm::PowerOfTwoChoices);
        }
        spec::Algorithm::RoundRobin => return no_hash(errs, spec, Algorithm::RoundRobin),
        spec::Algorithm::Random => return no_hash(errs, spec, Algorithm::Random),
        spec::Algorithm::ConsistentHash => "ConsistentHash",
    };
    let Some(hash) = &spec.hash else {
        errs.add("spec.hash", format!("is required when algorithm is {name}"));
        return Algorithm::ConsistentHash(HashKey::SourceIp);
    };
    let key_name = hash.name.as_deref().unwrap_or("");
    let key = match hash.source {
        HashSource::SourceIp => HashKey::SourceIp,
        HashSource::Header => match http::HeaderName::from_bytes(key_name.as_bytes()) {
            Ok(h) => HashKey::Header(h),
            Err(_) => {
                errs.add("spec.hash.name", format!("must be a header name, got {key_name:?}"));
                HashKey::SourceIp
            }
        },
        HashSource::Cookie => {
            if key_name.is_empty() || !key_name.bytes().all(is_cookie_name_byte) {
                errs.add("spec.hash.name", format!("must be a cookie name, got {key_name:?}"));
            }
            HashKey::Cookie(key_name.to_string())
        }
    };
    if !matches!(key, HashKey::SourceIp)
        && let Some(i) = listeners.iter().position(|l| l.protocol == ListenerProtocol::Tcp)
    {
        errs.add(
            "spec.hash.source",
            format!(
                "{:?} needs HTTP listeners, but spec.listeners[{i}] is TCP; use SourceIP",
                hash.source
            ),
        );
    }
    Algorithm::ConsistentHash(key)
}

fn no_hash(errs: &mut Errors, spec: &BalancedServiceSpec, algorithm: Algorithm) -> Algorithm {
    if spec.hash.is_some() {
        errs.add(
            "spec.hash",
            format!(
                "is only used with algorithm ConsistentHash, got algorithm {}",
                algorithm.name()
            ),
        );
    }
    algorithm
}

/// `PATH.interval` and `PATH.timeout`: both positive, and a check must end
/// before the next one starts (`shown` names the interval in the message).
fn interval_and_timeout(
    errs: &mut Errors,
    path: &str,
    shown: &str,
    interval: &str,
    timeout: &str,
) -> (Duration, Duration) {
    let i = errs.positive_duration(&format!("{path}.interval"), interval);
    let t = errs.positive_duration(&format!("{path}.timeout"), timeout);
    if !i.is_zero() && !t.is_zero() && t >= i {
        errs.add(
            format!("{path}.timeout"),
            format!("must be less than {shown} ({}), got {timeout}", format_duration(i)),
        );
    }
    (i, t)
}

fn tcp_payload(errs: &mut Errors, tcp: &spec::TcpCheckSpec) -> TcpPayload {
    let path = "spec.healthCheck.tcp";
    let send = match &tcp.send {
        None => Vec::new(),
        Some(p) => match (&p.text, &p.hex) {
            (Some(text), None) => text.as_bytes().to_vec(),
            (None, Some(hex)) => hex_bytes(errs, &format!("{path}.send.hex"), hex),
            _ => {
                errs.add(format!("{path}.send"), "needs exactly one of text and hex".to_string());
                Vec::new()
            }
        },
    };
    let e = &tcp.expect;
    let expect = match (&e.text, &e.hex, &e.regex) {
        (Some(text), None, None) => Expect::Prefix(text.as_bytes().to_vec()),
        (None, Some(hex), None) => Expect::Prefix(hex_bytes(errs, &format!("{path}.expect.hex"), hex)),
        (None, None, Some(re)) => match AnchoredRegex::new(re) {
            Ok(re) => Expect::Regex(re),
            Err(why) => {
                let why = why.to_string().lines().last().unwrap_or("").trim().to_string();
                errs.add(
                    format!("{path}.expect.regex"),
                    format!("not a regex ({why}), got {re:?}"),
                );
                Expect::Prefix(Vec::new())
            }
        },
        _ => {
            errs.add(
                format!("{path}.expect"),
                "needs exactly one of text, hex and regex".to_string(),
            );
            Expect::Prefix(Vec::new())
        }
    };
    if let Expect::Prefix(p) = &expect
        && p.len() > MAX_EXPECT_READ
    {
        errs.add(
            format!("{path}.expect"),
            format!("must be at most {MAX_EXPECT_READ} bytes, got {}", p.len()),
        );
    }
    TcpPayload { send, expect }
}

/// `hex` as bytes (pairs of hex digits; spaces allowed between bytes).
fn hex_bytes(errs: &mut Errors, path: &str, hex: &str) -> Vec<u8> {
    let digits: String = hex.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    // Hex digits only, before slicing: a multi-byte character must not split.
    let parsed = (digits.len().is_multiple_of(2) && digits.chars().all(|c| c.is_ascii_hexdigit()))
        .then(|| {
            (0..digits.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&digits[i..i + 2], 16).ok())
                .collect::<Option<Vec<u8>>>()
        })
        .flatten();
    parsed.unwrap_or_else(|| {
        errs.add(path, format!("must be pairs of hex digits, got {hex:?}"));
        Vec::new()
    })
}

fn health_check(errs: &mut Errors, hc: &spec::HealthCheckSpec) -> HealthCheck {
    let (interval, timeout) = interval_and_timeout(errs, "spec.healthCheck", "interval", &hc.interval, &hc.timeout);
    let rise = errs.at_least("spec.healthCheck.rise", hc.rise, 1);
    let fall = errs.at_least("spec.healthCheck.fall", hc.fall, 1);
    // HAProxy's `downinter` defaults to `inter`: a down endpoint is seen coming
    // back as soon as an up one would be seen going.
    let down_interval = match &hc.down_interval {
        Some(text) => errs.positive_duration("spec.healthCheck.downInterval", text),
        None => interval,
    };
    let port = hc.port.map(|p| errs.port("spec.healthCheck.port", p));
    let probe = match hc.protocol {
        spec::ProbeProtocol::Tcp => match &hc.tcp {
            Some(tcp) => ProbeKind::TcpPayload(tcp_payload(errs, tcp)),
            None => ProbeKind::Tcp,
        },
        spec::ProbeProtocol::Http => ProbeKind::Http(http_probe(errs, &hc.http)),
        spec::ProbeProtocol::Grpc => ProbeKind::Grpc(grpc_probe(errs, hc.grpc.as_ref())),
        spec::ProbeProtocol::Tls => {
            let name = &hc.tls.server_name;
            if !name.is_empty() && rustls::pki_types::ServerName::try_from(name.as_str()).is_err() {
                errs.add(
                    "spec.healthCheck.tls.serverName",
                    format!("must be a DNS name or IP address, got {name:?}"),
                );
            }
            ProbeKind::Tls(TlsProbe {
                server_name: (!name.is_empty()).then(|| name.clone()),
                verify: hc.tls.verify,
            })
        }
    };
    let agent = hc.agent.as_ref().map(|a| {
        let port = errs.port("spec.healthCheck.agent.port", a.port);
        let (interval, timeout) = interval_and_timeout(
            errs,
            "spec.healthCheck.agent",
            "agent.interval",
            &a.interval,
            &a.timeout,
        );
        AgentCheck {
            port,
            interval,
            timeout,
        }
    });
    if hc.tcp.is_some() && hc.protocol != spec::ProbeProtocol::Tcp {
        errs.add(
            "spec.healthCheck.tcp",
            format!(
                "sends and expects bytes on a TCP check: needs protocol TCP, got {}",
                hc.protocol.name()
            ),
        );
    }
    if hc.grpc.is_some() && hc.protocol != spec::ProbeProtocol::Grpc {
        errs.add(
            "spec.healthCheck.grpc",
            format!(
                "asks the gRPC health service: needs protocol GRPC, got {}",
                hc.protocol.name()
            ),
        );
    }
    if hc.http.keep_alive_requests != 1 && hc.protocol != spec::ProbeProtocol::Http {
        errs.add(
            "spec.healthCheck.http.keepAliveRequests",
            format!(
                "reuses the HTTP probe's connection: needs protocol HTTP, got {}",
                hc.protocol.name()
            ),
        );
    }
    if hc.http.agent_header.is_some() && hc.protocol != spec::ProbeProtocol::Http {
        errs.add(
            "spec.healthCheck.http.agentHeader",
            format!(
                "is read from the HTTP probe's answer: needs protocol HTTP, got {}",
                hc.protocol.name()
            ),
        );
    }
    HealthCheck {
        probe,
        interval,
        timeout,
        rise,
        fall,
        down_interval,
        port,
        agent,
    }
}

fn http_probe(errs: &mut Errors, h: &spec::HttpCheckSpec) -> HttpProbe {
    let method = http::Method::from_bytes(h.method.as_bytes())
        .ok()
        .filter(|m| !h.method.is_empty() && m.as_str().bytes().all(|b| b.is_ascii_uppercase()))
        .unwrap_or_else(|| {
            errs.add(
                "spec.healthCheck.http.method",
                format!("must be an upper-case HTTP method like GET or HEAD, got {:?}", h.method),
            );
            http::Method::GET
        });
    if !h.path.starts_with('/') || h.path.bytes().any(|b| b.is_ascii_whitespace() || b.is_ascii_control()) {
        errs.add(
            "spec.healthCheck.http.path",
            format!(
                "must start with '/' and contain no spaces or control characters, got {:?}",
                h.path
            ),
        );
    }
    if h.host.bytes().any(|b| b.is_ascii_whitespace() || b.is_ascii_control()) {
        errs.add(
            "spec.healthCheck.http.host",
            format!("must contain no spaces or control characters, got {:?}", h.host),
        );
    }
    if h.expect_status.is_empty() {
        errs.add(
            "spec.healthCheck.http.expectStatus",
            "must list at least one status class (2xx) or code (204)",
        );
    }
    let mut rules = Vec::new();
    for (i, s) in h.expect_status.iter().enumerate() {
        match StatusMatch::parse_rule(s) {
            Some(rule) => rules.push(rule),
            None => errs.add(
                format!("spec.healthCheck.http.expectStatus[{i}]"),
                format!("must be a class like 2xx or a code like 204, got {s:?}"),
            ),
        }
    }
    let agent_header = h.agent_header.as_ref().and_then(|name| {
        http::HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| {
                errs.add(
                    "spec.healthCheck.http.agentHeader",
                    format!("must be an HTTP header name, got {name:?}"),
                )
            })
            .ok()
    });
    let keep_alive_requests = errs.in_range(
        "spec.healthCheck.http.keepAliveRequests",
        h.keep_alive_requests,
        1,
        10_000,
    );
    HttpProbe {
        method,
        path: h.path.clone(),
        host: (!h.host.is_empty()).then(|| h.host.clone()),
        expect: StatusMatch::from_rules(&rules),
        agent_header,
        keep_alive_requests,
    }
}

/// Points each SNI route at its group's index.
fn sni_groups(errs: &mut Errors, listeners: &mut [ListenerConfig], backends: &[Backend]) {
    for (i, l) in listeners.iter_mut().enumerate() {
        for (j, r) in l.tls.iter_mut().flat_map(|t| &mut t.sni_routes).enumerate() {
            match backends.iter().position(|b| b.name == r.backend) {
                Some(g) => r.group = g + 1,
                None if r.backend == "default" => r.group = 0,
                None => {
                    let names: Vec<&str> = std::iter::once("default")
                        .chain(backends.iter().map(|b| b.name.as_str()))
                        .collect();
                    errs.add(
                        format!("spec.listeners[{i}].tls.sniRoutes[{j}].backend"),
                        format!("no backend named {:?} (there are {})", r.backend, names.join(", ")),
                    );
                }
            }
        }
    }
}

/// Each group's TLS to its endpoints: its own `tls`, else `spec.backendTLS`.
fn group_tls(errs: &mut Errors, spec: &BalancedServiceSpec) -> GroupTls {
    let top = spec
        .backend_tls
        .as_ref()
        .map(|t| Arc::new(backend_tls(errs, "spec.backendTLS", t)));
    let mut groups = vec![top.clone()];
    for (i, b) in spec.backends.iter().enumerate() {
        groups.push(match &b.tls {
            Some(t) => Some(Arc::new(backend_tls(errs, &format!("spec.backends[{i}].tls"), t))),
            None => top.clone(),
        });
    }
    if groups.iter().all(Option::is_none) {
        return GroupTls::default();
    }
    GroupTls(groups)
}

fn backend_tls(errs: &mut Errors, path: &str, t: &spec::BackendTlsSpec) -> BackendTls {
    let dns_name = |errs: &mut Errors, field: String, name: &str| {
        let valid = matches!(
            rustls::pki_types::ServerName::try_from(name),
            Ok(rustls::pki_types::ServerName::DnsName(_))
        );
        if !valid {
            errs.add(field, format!("must be a DNS name, got {name:?}"));
        }
    };
    if let Some(h) = &t.hostname {
        dns_name(errs, format!("{path}.hostname"), h);
    }
    for (i, san) in t.subject_alt_names.iter().enumerate() {
        dns_name(errs, format!("{path}.subjectAltNames[{i}]"), san);
    }
    if t.insecure_skip_verify && (t.ca_file.is_some() || t.ca_secret_name.is_some() || !t.subject_alt_names.is_empty())
    {
        errs.add(
            format!("{path}.insecureSkipVerify"),
            "verifies nothing, so caFile, caSecretName and subjectAltNames would be ignored: set one or the other",
        );
    }
    if t.ca_file.is_some() && t.ca_secret_name.is_some() {
        errs.add(format!("{path}.caSecretName"), "takes the place of caFile: set one");
    }
    if let Some(name) = &t.ca_secret_name {
        secret_name(errs, &format!("{path}.caSecretName"), name);
    }
    BackendTls {
        hostname: t.hostname.clone(),
        ca_file: t.ca_file.as_ref().map(Into::into),
        subject_alt_names: t.subject_alt_names.clone(),
        ca_secret: t.ca_secret_name.clone(),
        client: t
            .client_certificate
            .as_ref()
            .and_then(|c| certificate(errs, &format!("{path}.clientCertificate"), c)),
        insecure_skip_verify: t.insecure_skip_verify,
    }
}

/// A host name, exact or `*.` wildcard.
fn host_match(errs: &mut Errors, path: &str, h: &str) -> Option<HostMatch> {
    let lower = h.to_ascii_lowercase();
    let (host, wildcard) = match lower.strip_prefix("*.") {
        Some(rest) => (rest.to_string(), true),
        None => (lower.clone(), false),
    };
    if host.is_empty() || !host.split('.').all(is_dns_label) {
        errs.add(
            path,
            format!("must be a host name, optionally starting with \"*.\", got {h:?}"),
        );
        return None;
    }
    Some(if wildcard {
        HostMatch::Wildcard(format!(".{host}"))
    } else {
        HostMatch::Exact(host)
    })
}

/// One certificate: its two files, or a Secret.
fn certificate(errs: &mut Errors, path: &str, c: &spec::CertificateFilesSpec) -> Option<CertificateFiles> {
    match (&c.cert_file, &c.key_file, &c.secret_name) {
        (Some(cert), Some(key), None) => Some(CertificateFiles {
            cert: cert.into(),
            key: key.into(),
            secret: None,
        }),
        (None, None, Some(name)) => {
            secret_name(errs, &format!("{path}.secretName"), name);
            Some(CertificateFiles::secret(name))
        }
        (Some(_), None, None) => {
            errs.add(format!("{path}.keyFile"), "is required with certFile");
            None
        }
        (None, Some(_), None) => {
            errs.add(format!("{path}.certFile"), "is required with keyFile");
            None
        }
        (None, None, None) => {
            errs.add(path, "needs certFile and keyFile, or secretName");
            None
        }
        (_, _, Some(_)) => {
            errs.add(
                format!("{path}.secretName"),
                "takes the place of certFile and keyFile: set one",
            );
            None
        }
    }
}

/// A Secret's name: an RFC 1123 subdomain.
fn secret_name(errs: &mut Errors, path: &str, name: &str) {
    let valid = name.len() <= 253 && name.split('.').all(is_dns_label);
    if !valid {
        errs.add(
            path,
            format!("must be a Secret name (lower-case letters, digits, '-', '.'), got {name:?}"),
        );
    }
}

fn listener_tls(errs: &mut Errors, path: &str, t: &spec::ListenerTlsSpec) -> ListenerTls {
    let mut certificates = Vec::new();
    let single = spec::CertificateFilesSpec {
        cert_file: t.cert_file.clone(),
        key_file: t.key_file.clone(),
        secret_name: t.secret_name.clone(),
    };
    let has_single = single != spec::CertificateFilesSpec::default();
    let passthrough = t.mode == Some(spec::TlsMode::Passthrough);
    if passthrough && (has_single || !t.certificates.is_empty()) {
        errs.add(
            format!("{path}.mode"),
            "Passthrough leaves TLS to the endpoints: it takes no certificate",
        );
    }
    match (has_single, t.certificates.is_empty()) {
        _ if passthrough => {}
        (true, true) => certificates.extend(certificate(errs, path, &single)),
        (false, false) => {
            for (i, c) in t.certificates.iter().enumerate() {
                certificates.extend(certificate(errs, &format!("{path}.certificates[{i}]"), c));
            }
        }
        (false, true) => errs.add(path, "needs certFile and keyFile, secretName, or certificates"),
        (true, false) => errs.add(path, "takes one certificate or certificates (for SNI), not both"),
    }
    let mut seen = HashSet::new();
    for (i, c) in certificates.iter().enumerate() {
        if !seen.insert((&c.cert, &c.secret)) {
            let field = if c.secret.is_some() { "secretName" } else { "certFile" };
            errs.add(
                format!("{path}.certificates[{i}].{field}"),
                format!("{:?} is listed twice", c.shown()),
            );
        }
    }
    let min_version = match t.min_version.as_deref() {
        None | Some("1.2") => TlsVersion::V1_2,
        Some("1.3") => TlsVersion::V1_3,
        Some(other) => {
            errs.add(
                format!("{path}.minVersion"),
                format!("must be \"1.2\" or \"1.3\", got {other:?}"),
            );
            TlsVersion::V1_2
        }
    };
    let sni_routes = t
        .sni_routes
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let at = format!("{path}.sniRoutes[{i}]");
            if r.hostnames.is_empty() {
                errs.add(format!("{at}.hostnames"), "must name at least one host");
            }
            SniRoute {
                hosts: r
                    .hostnames
                    .iter()
                    .enumerate()
                    .filter_map(|(k, h)| host_match(errs, &format!("{at}.hostnames[{k}]"), h))
                    .collect(),
                backend: r.backend.clone(),
                // Resolved once the backends are known.
                group: 0,
            }
        })
        .collect();
    ListenerTls {
        certificates,
        min_version,
        passthrough,
        sni_routes,
    }
}

fn grpc_probe(errs: &mut Errors, g: Option<&spec::GrpcCheckSpec>) -> GrpcProbe {
    let g = g.cloned().unwrap_or_default();
    // The service name travels in a protobuf string and the authority in a
    // header: both must be printable text (gRPC service names are dotted).
    if g.service.chars().any(|c| c.is_control() || c.is_whitespace()) {
        errs.add(
            "spec.healthCheck.grpc.service",
            format!(
                "must be a service name without spaces or control characters, got {:?}",
                g.service
            ),
        );
    }
    if !g.authority.is_empty() && g.authority.parse::<http::uri::Authority>().is_err() {
        errs.add(
            "spec.healthCheck.grpc.authority",
            format!("must be a host or host:port, got {:?}", g.authority),
        );
    }
    GrpcProbe {
        service: g.service,
        authority: (!g.authority.is_empty()).then_some(g.authority),
    }
}

fn passive(errs: &mut Errors, p: &spec::PassiveHealthSpec) -> PassiveHealth {
    let max_fails = errs.at_least("spec.passiveHealth.maxFails", p.max_fails, 0);
    let fail_timeout = if max_fails > 0 {
        errs.positive_duration("spec.passiveHealth.failTimeout", &p.fail_timeout)
    } else {
        errs.duration("spec.passiveHealth.failTimeout", &p.fail_timeout)
    };
    let mut on = p.on.clone();
    on.dedup();
    PassiveHealth {
        max_fails,
        fail_timeout,
        on,
    }
}

fn retry(errs: &mut Errors, r: &spec::RetrySpec, timeouts: &Timeouts) -> RetryPolicy {
    let tries = errs.at_least("spec.retry.tries", r.tries, 0);
    let timeout = errs.duration("spec.retry.timeout", &r.timeout);
    if r.max_body_bytes < 0 {
        errs.add(
            "spec.retry.maxBodyBytes",
            format!("must be >= 0, got {}", r.max_body_bytes),
        );
    }
    let mut on = r.on.clone();
    on.dedup();
    let b = &r.budget;
    let percent = errs.at_least("spec.retry.budget.percent", b.percent, 0);
    if percent > 100 {
        errs.add("spec.retry.budget.percent", format!("must be <= 100, got {percent}"));
    }
    let budget = BudgetPolicy {
        percent: percent.min(100),
        interval: errs.positive_duration("spec.retry.budget.interval", &b.interval),
        min_count: errs.at_least("spec.retry.budget.minRetryRate.count", b.min_retry_rate.count, 0),
        min_interval: errs.positive_duration("spec.retry.budget.minRetryRate.interval", &b.min_retry_rate.interval),
    };
    let per_try_timeout = r.per_try_timeout.as_ref().map(|text| {
        let t = errs.positive_duration("spec.retry.perTryTimeout", text);
        if !t.is_zero() && t >= timeouts.response {
            errs.add(
                "spec.retry.perTryTimeout",
                format!(
                    "must be less than spec.timeouts.response ({}), got {text:?}",
                    format_duration(timeouts.response)
                ),
            );
        }
        t
    });
    if r.hedge && per_try_timeout.is_none() {
        errs.add(
            "spec.retry.hedge",
            "sends a second attempt after spec.retry.perTryTimeout, which is unset",
        );
    }
    RetryPolicy {
        on,
        tries,
        timeout: (!timeout.is_zero()).then_some(timeout),
        max_body_bytes: r.max_body_bytes.max(0) as u64,
        budget,
        per_try_timeout,
        hedge: r.hedge,
    }
}

/// Checks `{path}.name`: a DNS label, not already in `names`.
fn unique_label<'a>(errs: &mut Errors, path: &str, name: &'a str, names: &mut HashSet<&'a str>) {
    if !is_dns_label(name) {
        errs.add(
            format!("{path}.name"),
            format!("must be a DNS label (lower-case letters, digits, '-'), got {name:?}"),
        );
    } else if !names.insert(name) {
        errs.add(format!("{path}.name"), format!("{name:?} is used twice"));
    }
}

/// RFC 1123 label: what a Service name may be.
fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// IANA service name: what a Service port name may be.
fn is_port_name(s: &str) -> bool {
    is_dns_label(s) && s.len() <= 15 && s.bytes().any(|b| b.is_ascii_lowercase())
}

fn is_cookie_name_byte(b: u8) -> bool {
    b.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?={}".contains(&b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::spec::{HashSpec, Listener, PortRef, ProbeProtocol};

    fn base() -> BalancedServiceSpec {
        serde_saphyr::from_str("endpoints: [{address: 127.0.0.1, port: 8081}]\nlisteners: [{name: http, port: 8080}]\n")
            .unwrap()
    }

    fn errors_of(edit: impl FnOnce(&mut BalancedServiceSpec)) -> Vec<String> {
        let mut spec = base();
        edit(&mut spec);
        match validate(ServiceKey::new("default", "web"), &spec) {
            Ok(_) => vec![],
            Err(e) => e.0.iter().map(ToString::to_string).collect(),
        }
    }

    fn assert_error(edit: impl FnOnce(&mut BalancedServiceSpec), expected: &str) {
        let errors = errors_of(edit);
        assert!(
            errors.iter().any(|e| e == expected),
            "expected {expected:?} in {errors:#?}"
        );
    }

    #[test]
    fn backend_tls_falls_back_per_group_and_is_checked() {
        let yaml = |y: &str| -> BalancedServiceSpec {
            serde_saphyr::from_str(&format!(
                "endpoints: [{{address: 127.0.0.1, port: 8081}}]\nlisteners: [{{name: http, port: 8080}}]\n{y}"
            ))
            .unwrap()
        };
        let s = yaml(
            "backendTLS: {hostname: api.internal, caSecretName: ca}\nbackends: [{name: a, endpoints: [{address: 10.0.0.1, port: 443}]}, {name: b, endpoints: [{address: 10.0.0.2, port: 443}], tls: {insecureSkipVerify: true, clientCertificate: {secretName: client}}}]\n",
        );
        let cfg = validate(ServiceKey::new("default", "web"), &s).unwrap();
        let tls = &cfg.backend_tls;
        assert_eq!(tls.for_groups(0b001).unwrap().hostname.as_deref(), Some("api.internal"));
        assert_eq!(
            tls.for_groups(0b010),
            tls.for_groups(0b001),
            "a falls back to spec.backendTLS"
        );
        assert!(tls.for_groups(0b100).unwrap().insecure_skip_verify);
        assert_eq!(tls.for_groups(0b110), tls.for_groups(0b010), "the first group decides");
        assert_eq!(
            cfg.endpoint_secret_names().into_iter().collect::<Vec<_>>(),
            ["ca", "client"]
        );
        let resolved = tls.with_secret_files(&|n: &str| format!("/s/{n}").into());
        assert_eq!(
            resolved.for_groups(1).unwrap().ca_file.as_deref(),
            Some(std::path::Path::new("/s/ca/ca.crt"))
        );
        let plain = validate(ServiceKey::new("default", "web"), &base()).unwrap();
        assert!(!plain.backend_tls.any());

        let errors = |y: &str| errors_of(|s| *s = yaml(y));
        assert_eq!(
            errors("backendTLS: {hostname: \"not a name\"}\n"),
            ["spec.backendTLS.hostname: must be a DNS name, got \"not a name\""]
        );
        assert_eq!(
            errors("backendTLS: {insecureSkipVerify: true, caFile: /ca.pem}\n"),
            [
                "spec.backendTLS.insecureSkipVerify: verifies nothing, so caFile, caSecretName and subjectAltNames would be ignored: set one or the other"
            ]
        );
        assert_eq!(
            errors("backendTLS: {clientCertificate: {certFile: /c.pem}}\n"),
            ["spec.backendTLS.clientCertificate.keyFile: is required with certFile"]
        );
        assert_eq!(
            errors("backendTLS: {subjectAltNames: [a.example, \"*bad*\"]}\n"),
            ["spec.backendTLS.subjectAltNames[1]: must be a DNS name, got \"*bad*\""]
        );
    }

    #[test]
    fn tcp_send_and_expect_are_checked_and_named() {
        let tcp = |send: Option<spec::PayloadSpec>, expect: spec::ExpectSpec| {
            move |s: &mut BalancedServiceSpec| s.health_check.tcp = Some(spec::TcpCheckSpec { send, expect })
        };
        let text = |t: &str| spec::PayloadSpec {
            text: Some(t.into()),
            hex: None,
        };
        let ok = validate(ServiceKey::new("default", "web"), &{
            let mut s = base();
            tcp(
                Some(text("PING\r\n")),
                spec::ExpectSpec {
                    hex: Some("2b 50 4f 4e 47".into()),
                    ..Default::default()
                },
            )(&mut s);
            s
        })
        .unwrap();
        assert_eq!(
            ok.health.probe,
            ProbeKind::TcpPayload(TcpPayload {
                send: b"PING\r\n".to_vec(),
                expect: Expect::Prefix(b"+PONG".to_vec()),
            })
        );
        assert_error(
            tcp(
                Some(spec::PayloadSpec {
                    text: Some("a".into()),
                    hex: Some("61".into()),
                }),
                spec::ExpectSpec {
                    text: Some("+OK".into()),
                    ..Default::default()
                },
            ),
            "spec.healthCheck.tcp.send: needs exactly one of text and hex",
        );
        assert_error(
            tcp(
                None,
                spec::ExpectSpec {
                    hex: Some("2bé".into()),
                    ..Default::default()
                },
            ),
            "spec.healthCheck.tcp.expect.hex: must be pairs of hex digits, got \"2bé\"",
        );
        assert_error(
            tcp(None, spec::ExpectSpec::default()),
            "spec.healthCheck.tcp.expect: needs exactly one of text, hex and regex",
        );
        let errors = errors_of(tcp(
            None,
            spec::ExpectSpec {
                regex: Some("(unclosed".into()),
                ..Default::default()
            },
        ));
        assert!(
            errors
                .iter()
                .any(|e| e.starts_with("spec.healthCheck.tcp.expect.regex: not a regex (")
                    && e.ends_with("got \"(unclosed\"")),
            "{errors:#?}"
        );
        assert_error(
            |s| {
                s.health_check.protocol = spec::ProbeProtocol::Http;
                tcp(
                    None,
                    spec::ExpectSpec {
                        text: Some("x".into()),
                        ..Default::default()
                    },
                )(s);
            },
            "spec.healthCheck.tcp: sends and expects bytes on a TCP check: needs protocol TCP, got HTTP",
        );
    }

    #[test]
    fn grpc_checks_and_keep_alive_checks_are_checked_and_named() {
        let grpc = |service: &str, authority: &str| {
            let g = spec::GrpcCheckSpec {
                service: service.into(),
                authority: authority.into(),
            };
            move |s: &mut BalancedServiceSpec| {
                s.health_check.protocol = spec::ProbeProtocol::Grpc;
                s.health_check.grpc = Some(g);
            }
        };
        let spec = {
            let mut s = base();
            grpc("orders.v1.Orders", "orders.internal:8443")(&mut s);
            s
        };
        let cfg = validate(ServiceKey::new("default", "web"), &spec).unwrap();
        assert_eq!(
            cfg.health.probe,
            ProbeKind::Grpc(GrpcProbe {
                service: "orders.v1.Orders".into(),
                authority: Some("orders.internal:8443".into()),
            })
        );
        assert_error(
            grpc("orders v1", ""),
            "spec.healthCheck.grpc.service: must be a service name without spaces or control characters, got \"orders v1\"",
        );
        assert_error(
            grpc("", "a b"),
            "spec.healthCheck.grpc.authority: must be a host or host:port, got \"a b\"",
        );
        assert_error(
            |s| {
                grpc("", "")(s);
                s.health_check.protocol = spec::ProbeProtocol::Http;
            },
            "spec.healthCheck.grpc: asks the gRPC health service: needs protocol GRPC, got HTTP",
        );

        let keep_alive = |n: i32, protocol| {
            move |s: &mut BalancedServiceSpec| {
                s.health_check.protocol = protocol;
                s.health_check.http.keep_alive_requests = n;
            }
        };
        assert_error(
            keep_alive(0, spec::ProbeProtocol::Http),
            "spec.healthCheck.http.keepAliveRequests: must be >= 1, got 0",
        );
        assert_error(
            keep_alive(10_001, spec::ProbeProtocol::Http),
            "spec.healthCheck.http.keepAliveRequests: must be <= 10000, got 10001",
        );
        assert_error(
            keep_alive(10, spec::ProbeProtocol::Tcp),
            "spec.healthCheck.http.keepAliveRequests: reuses the HTTP probe's connection: needs protocol HTTP, got TCP",
        );
        let mut s = base();
        keep_alive(10, spec::ProbeProtocol::Http)(&mut s);
        let cfg = validate(ServiceKey::new("default", "web"), &s).unwrap();
        assert!(matches!(
            cfg.health.probe,
            ProbeKind::Http(HttpProbe {
                keep_alive_requests: 10,
                ..
            })
        ));
    }

    #[test]
    fn listener_tls_is_checked_and_named() {
        let tls = |t: spec::ListenerTlsSpec| move |s: &mut BalancedServiceSpec| s.listeners[0].tls = Some(t);
        let files = |c: &str, k: &str| spec::CertificateFilesSpec {
            cert_file: Some(c.into()),
            key_file: Some(k.into()),
            secret_name: None,
        };
        let secret = |n: &str| spec::CertificateFilesSpec {
            secret_name: Some(n.into()),
            ..Default::default()
        };
        let mut s = base();
        tls(spec::ListenerTlsSpec {
            certificates: vec![files("/a.pem", "/a.key"), files("/b.pem", "/b.key")],
            min_version: Some("1.3".into()),
            ..Default::default()
        })(&mut s);
        let cfg = validate(ServiceKey::new("default", "web"), &s).unwrap();
        let t = cfg.listeners[0].tls.as_ref().unwrap();
        assert_eq!(t.certificates.len(), 2);
        assert_eq!(t.min_version, TlsVersion::V1_3);
        assert_error(
            tls(spec::ListenerTlsSpec::default()),
            "spec.listeners[0].tls: needs certFile and keyFile, secretName, or certificates",
        );
        // Secrets, one or by SNI, beside files.
        let mut s = base();
        tls(spec::ListenerTlsSpec {
            certificates: vec![secret("site-a"), files("/b.pem", "/b.key")],
            ..Default::default()
        })(&mut s);
        let cfg = validate(ServiceKey::new("default", "web"), &s).unwrap();
        assert_eq!(cfg.secret_names().into_iter().collect::<Vec<_>>(), ["site-a"]);
        let resolved = cfg.with_secret_files(|name| format!("/run/s/{name}").into());
        let c = &resolved.listeners[0].tls.as_ref().unwrap().certificates[0];
        assert_eq!(c.cert, std::path::Path::new("/run/s/site-a/tls.crt"));
        assert_eq!(c.shown(), "secret/site-a");
        assert_error(
            tls(spec::ListenerTlsSpec {
                secret_name: Some("Site_A".into()),
                ..Default::default()
            }),
            "spec.listeners[0].tls.secretName: must be a Secret name (lower-case letters, digits, '-', '.'), got \"Site_A\"",
        );
        assert_error(
            tls(spec::ListenerTlsSpec {
                certificates: vec![spec::CertificateFilesSpec {
                    cert_file: Some("/a.pem".into()),
                    secret_name: Some("a".into()),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            "spec.listeners[0].tls.certificates[0].secretName: takes the place of certFile and keyFile: set one",
        );
        assert_error(
            tls(spec::ListenerTlsSpec {
                cert_file: Some("/a.pem".into()),
                ..Default::default()
            }),
            "spec.listeners[0].tls.keyFile: is required with certFile",
        );
        assert_error(
            tls(spec::ListenerTlsSpec {
                cert_file: Some("/a.pem".into()),
                key_file: Some("/a.key".into()),
                certificates: vec![files("/b.pem", "/b.key")],
                ..Default::default()
            }),
            "spec.listeners[0].tls: takes one certificate or certificates (for SNI), not both",
        );
        assert_error(
            tls(spec::ListenerTlsSpec {
                certificates: vec![files("/a.pem", "/a.key"), files("/a.pem", "/b.key")],
                ..Default::default()
            }),
            "spec.listeners[0].tls.certificates[1].certFile: \"/a.pem\" is listed twice",
        );
        assert_error(
            tls(spec::ListenerTlsSpec {
                cert_file: Some("/a.pem".into()),
                key_file: Some("/a.key".into()),
                min_version: Some("1.1".into()),
                ..Default::default()
            }),
            "spec.listeners[0].tls.minVersion: must be \"1.2\" or \"1.3\", got \"1.1\"",
        );
        // TCP listeners terminate, or pass through and route by SNI.
        let mut s = base();
        s.listeners[0].protocol = ListenerProtocol::Tcp;
        s.listeners[0].tls = Some(spec::ListenerTlsSpec {
            secret_name: Some("site".into()),
            ..Default::default()
        });
        assert!(validate(ServiceKey::new("default", "web"), &s).is_ok());
        let passthrough = |routes: Vec<spec::SniRouteSpec>| spec::ListenerTlsSpec {
            mode: Some(spec::TlsMode::Passthrough),
            sni_routes: routes,
            ..Default::default()
        };
        let route = |host: &str, backend: &str| spec::SniRouteSpec {
            hostnames: vec![host.into()],
            backend: backend.into(),
        };
        let mut s = base();
        s.listeners[0].protocol = ListenerProtocol::Tcp;
        s.listeners[0].tls = Some(passthrough(vec![
            route("*.a.example", "a"),
            route("b.example", "default"),
        ]));
        s.backends = serde_saphyr::from_str("[{name: a, endpoints: [{address: 10.0.0.1, port: 443}]}]").unwrap();
        let cfg = validate(ServiceKey::new("default", "web"), &s).unwrap();
        let t = cfg.listeners[0].tls.as_ref().unwrap();
        assert!(t.passthrough && t.certificates.is_empty());
        assert_eq!(t.group_for(Some("x.a.example")), 1);
        assert_eq!(t.group_for(Some("b.example")), 0);
        assert_eq!(t.group_for(Some("a.example")), 0, "a wildcard needs a label in front");
        assert_eq!(t.group_for(None), 0);
        assert_error(
            |s| {
                s.listeners[0].protocol = ListenerProtocol::Tcp;
                s.listeners[0].tls = Some(passthrough(vec![route("c.example", "c")]));
            },
            "spec.listeners[0].tls.sniRoutes[0].backend: no backend named \"c\" (there are default)",
        );
        assert_error(
            |s| s.listeners[0].tls = Some(passthrough(vec![])),
            "spec.listeners[0].tls.mode: Passthrough balances connections, not requests: it needs protocol TCP",
        );
        assert_error(
            |s| {
                s.listeners[0].protocol = ListenerProtocol::Tcp;
                s.listeners[0].tls = Some(spec::ListenerTlsSpec {
                    cert_file: Some("/a.pem".into()),
                    key_file: Some("/a.key".into()),
                    ..passthrough(vec![])
                });
            },
            "spec.listeners[0].tls.mode: Passthrough leaves TLS to the endpoints: it takes no certificate",
        );
    }

    #[test]
    fn slow_start_is_checked_and_named() {
        let ss = |window: &str, aggression: f64, min: i32| {
            let spec = spec::SlowStartSpec {
                window: window.into(),
                aggression,
                min_weight_percent: min,
            };
            move |s: &mut BalancedServiceSpec| s.slow_start = Some(spec)
        };
        let mut s = base();
        ss("30s", 2.0, 10)(&mut s);
        let cfg = validate(ServiceKey::new("default", "web"), &s).unwrap();
        assert_eq!(
            cfg.slow_start,
            Some(SlowStart {
                window: Duration::from_secs(30),
                aggression_milli: 2000,
                min_weight_percent: 10,
            })
        );
        assert_error(
            ss("0", 1.0, 10),
            "spec.slowStart.window: must be more than 0, got \"0\"",
        );
        assert_error(
            ss("2h", 1.0, 10),
            "spec.slowStart.window: must be at most 1h, got \"2h\"",
        );
        assert_error(
            ss("30s", 0.0, 10),
            "spec.slowStart.aggression: must be more than 0 and at most 10, got 0",
        );
        assert_error(
            ss("30s", 1.0, 0),
            "spec.slowStart.minWeightPercent: must be >= 1, got 0",
        );
    }

    #[test]
    fn slow_start_ramps_from_its_floor_to_full_weight() {
        let linear = SlowStart {
            window: Duration::from_secs(10),
            aggression_milli: 1000,
            min_weight_percent: 10,
        };
        let at = |ss: &SlowStart, secs: f64| ss.factor(Duration::from_secs_f64(secs));
        assert_eq!(at(&linear, 0.0), 0.1);
        assert_eq!(at(&linear, 0.5), 0.1);
        assert!((at(&linear, 5.0) - 0.5).abs() < 1e-9);
        assert_eq!(at(&linear, 10.0), 1.0);
        assert_eq!(at(&linear, 60.0), 1.0);
        // Aggression 2 is a square root: more traffic early.
        let eager = SlowStart {
            aggression_milli: 2000,
            ..linear
        };
        assert!((at(&eager, 2.5) - 0.5).abs() < 1e-9);
    }

    #[test]
    fn agent_checks_are_checked_and_named() {
        let agent = |port: i32, interval: &str, timeout: &str| spec::AgentCheckSpec {
            port,
            interval: interval.into(),
            timeout: timeout.into(),
        };
        let mut spec = base();
        spec.health_check.agent = Some(agent(9999, "2s", "1s"));
        let cfg = validate(ServiceKey::new("default", "web"), &spec).unwrap();
        assert_eq!(
            cfg.health.agent,
            Some(AgentCheck {
                port: 9999,
                interval: Duration::from_secs(2),
                timeout: Duration::from_secs(1)
            })
        );
        assert!(cfg.health.reports_load());
        assert_error(
            |s| s.health_check.agent = Some(agent(0, "2s", "1s")),
            "spec.healthCheck.agent.port: must be 1..=65535, got 0",
        );
        assert_error(
            |s| s.health_check.agent = Some(agent(9999, "1s", "1s")),
            "spec.healthCheck.agent.timeout: must be less than agent.interval (1s), got 1s",
        );
        assert_error(
            |s| s.health_check.http.agent_header = Some("x-load".into()),
            "spec.healthCheck.http.agentHeader: is read from the HTTP probe's answer: needs protocol HTTP, got TCP",
        );
        assert_error(
            |s| {
                s.health_check.protocol = spec::ProbeProtocol::Http;
                s.health_check.http.agent_header = Some("x load".into());
            },
            "spec.healthCheck.http.agentHeader: must be an HTTP header name, got \"x load\"",
        );
    }

    #[test]
    fn routes_and_backends_are_checked_and_named() {
        let with = |yaml: &'static str| {
            move |s: &mut BalancedServiceSpec| {
                let extra: BalancedServiceSpec = serde_saphyr::from_str(&format!(
                    "endpoints: [{{address: 127.0.0.1, port: 8081}}]\nlisteners: [{{name: http, port: 8080}}]\n{yaml}"
                ))
                .unwrap();
                s.backends = extra.backends;
                s.routes = extra.routes;
            }
        };
        assert_error(
            with(
                "routes: [{name: a, matches: [{path: {type: RegularExpression, value: '/x(['}}], backendRefs: [{name: default}]}]",
            ),
            "spec.routes[0].matches[0].path.value: invalid regex \"/x([\": unclosed character class",
        );
        assert_error(
            with("routes: [{name: a, backendRefs: [{name: canary}]}]"),
            "spec.routes[0].backendRefs[0].name: no backend named \"canary\" (known: default)",
        );
        assert_error(
            with(
                "backends: [{name: b, endpoints: [{address: 10.0.0.1, port: 80}]}]\nroutes: [{name: a, backendRefs: [{name: default, weight: 0}, {name: b, weight: 0}]}]",
            ),
            "spec.routes[0].backendRefs: every weight is 0; at least one backend must take traffic",
        );
        assert_error(
            with(
                "routes: [{name: a, matches: [{path: {type: PathPrefix, value: api}}], backendRefs: [{name: default}]}]",
            ),
            "spec.routes[0].matches[0].path.value: must start with '/', got \"api\"",
        );
        assert_error(
            with("routes: [{name: a, matches: [{method: get}], backendRefs: [{name: default}]}]"),
            "spec.routes[0].matches[0].method: must be an upper-case HTTP method such as GET or POST, got \"get\"",
        );
        assert_error(
            with(
                "routes: [{name: a, matches: [{headers: [{name: 'bad header', value: x}]}], backendRefs: [{name: default}]}]",
            ),
            "spec.routes[0].matches[0].headers[0].name: must be a header name, got \"bad header\"",
        );
        assert_error(
            with("routes: [{name: a, matches: [{hostnames: ['*.']}], backendRefs: [{name: default}]}]"),
            "spec.routes[0].matches[0].hostnames[0]: must be a host name, optionally starting with \"*.\", got \"*.\"",
        );
        assert_error(
            with("routes: [{name: a, backendRefs: [{name: default}]}, {name: a, backendRefs: [{name: default}]}]"),
            "spec.routes[1].name: \"a\" is used twice",
        );
        assert_error(
            with("backends: [{name: default, endpoints: [{address: 10.0.0.1, port: 80}]}]"),
            "spec.backends[0].name: \"default\" is the top-level service and endpoints; choose another name",
        );
        assert_error(
            with("backends: [{name: b}]"),
            "spec.backends[0]: needs service or endpoints",
        );
        assert_error(
            with("backends: [{name: b, endpoints: [{address: nowhere, port: 80}]}]"),
            "spec.backends[0].endpoints[0].address: must be an IPv4 or IPv6 address, got \"nowhere\"",
        );
        let mut spec = base();
        with(
            "backends: [{name: canary, endpoints: [{address: 127.0.0.1, port: 9000}, {address: 127.0.0.1, port: 8081}]}]\nroutes: [{name: api, matches: [{path: {value: /api/}}], backendRefs: [{name: default, weight: 90}, {name: canary, weight: 10}]}]",
        )(&mut spec);
        let cfg = validate(ServiceKey::new("default", "web"), &spec).unwrap();
        assert_eq!(cfg.group_index("canary"), Some(1));
        assert_eq!(
            cfg.routes[0].matches[0].path,
            Some(crate::api::route::PathMatch::Prefix("/api".into())),
            "a trailing slash is ignored"
        );
        let members = cfg.static_members();
        let masks: Vec<(u16, u64)> = members.iter().map(|(e, m)| (e.addr.port(), *m)).collect();
        assert_eq!(
            masks,
            vec![(8081, 0b11), (9000, 0b10)],
            "an endpoint in two groups is one member"
        );
    }

    #[test]
    fn rate_limits_are_checked_and_named() {
        use crate::api::spec::{RateLimitKeySource, RateLimitSpec};
        let rl = |edit: fn(&mut RateLimitSpec)| {
            move |s: &mut BalancedServiceSpec| {
                let mut r: RateLimitSpec = serde_saphyr::from_str("requests: 10").unwrap();
                edit(&mut r);
                s.rate_limit = Some(r);
            }
        };
        assert_error(rl(|r| r.requests = 0), "spec.rateLimit.requests: must be >= 1, got 0");
        assert_error(
            rl(|r| r.burst = -1),
            "spec.rateLimit.burst: must be 0..=1000000, got -1",
        );
        assert_error(
            rl(|r| r.per = "0".into()),
            "spec.rateLimit.per: must be more than 0, got \"0\"",
        );
        assert_error(
            rl(|r| r.per = "soon".into()),
            "spec.rateLimit.per: must be a duration like 500ms, 3s or 2m, got \"soon\"",
        );
        assert_error(
            rl(|r| r.key.source = RateLimitKeySource::Header),
            "spec.rateLimit.key.name: must be a header name, got \"\"",
        );
        assert_error(
            rl(|r| {
                r.key.source = RateLimitKeySource::Cookie;
                r.key.name = Some("a b".into());
            }),
            "spec.rateLimit.key.name: must be a cookie name, got \"a b\"",
        );
        assert_error(
            rl(|r| r.key.name = Some("x-user".into())),
            "spec.rateLimit.key.name: is only for Header and Cookie keys, got \"x-user\" with source None",
        );
        assert_error(
            |s| {
                s.listeners[0].protocol = crate::api::spec::ListenerProtocol::Tcp;
                s.rate_limit = Some(serde_saphyr::from_str("requests: 10").unwrap());
            },
            "spec.rateLimit: limits HTTP requests, but every listener is TCP (use spec.limits.maxConnectionsPerClient)",
        );
        let mut spec = base();
        spec.rate_limit = Some(serde_saphyr::from_str("{requests: 100, per: 1m, burst: 10}").unwrap());
        let cfg = validate(ServiceKey::new("default", "web"), &spec).unwrap();
        let r = cfg.rate_limit.unwrap();
        assert_eq!(
            (r.requests, r.per, r.burst, r.delay),
            (100, Duration::from_secs(60), 10, true)
        );
        assert_eq!(r.key, crate::api::config::RateLimitKey::None);
        let share = r.per_replica(3);
        assert_eq!((share.requests, share.burst), (33, 3), "each of three replicas");
        assert_eq!(r.per_replica(1000).requests, 1, "never below one request");
    }

    #[test]
    fn minimal_spec_gets_the_documented_defaults() {
        let cfg = validate(ServiceKey::new("default", "web"), &base()).unwrap();
        assert_eq!(cfg.algorithm, super::Algorithm::LeastConnections);
        assert_eq!(cfg.health.probe, ProbeKind::Tcp);
        assert_eq!(cfg.health.interval, Duration::from_secs(3));
        assert_eq!(cfg.health.timeout, Duration::from_secs(1));
        assert_eq!((cfg.health.rise, cfg.health.fall), (2, 3));
        assert_eq!(
            cfg.health.down_interval, cfg.health.interval,
            "HAProxy: downinter defaults to inter"
        );
        assert_eq!(
            (
                cfg.retry.budget.percent,
                cfg.retry.budget.interval,
                cfg.retry.budget.min_count
            ),
            (20, Duration::from_secs(10), 10)
        );
        assert_eq!(cfg.listeners[0].app_protocol, None);
        assert_eq!(cfg.passive.max_fails, 1);
        assert_eq!(cfg.passive.fail_timeout, Duration::from_secs(10));
        assert_eq!(cfg.retry.on, vec![RetryCondition::Error, RetryCondition::Timeout]);
        assert_eq!(cfg.retry.tries, 3);
        assert_eq!(cfg.retry.timeout, Some(Duration::from_secs(10)));
        assert_eq!(cfg.timeouts.connect, Duration::from_secs(1));
        assert_eq!(cfg.timeouts.response, Duration::from_secs(60));
        assert_eq!(cfg.listeners[0].protocol, ListenerProtocol::Http);
        assert_eq!(cfg.endpoints[0].weight, 1);
        assert_eq!(cfg.replicas, 2);
    }

    #[test]
    fn rise_and_fall_must_be_at_least_one() {
        assert_error(
            |s| s.health_check.rise = 0,
            "spec.healthCheck.rise: must be >= 1, got 0",
        );
        assert_error(
            |s| s.health_check.panic_threshold = 101,
            "spec.healthCheck.panicThreshold: must be 0..=100 (percent), got 101",
        );
        assert_error(
            |s| s.health_check.fall = -2,
            "spec.healthCheck.fall: must be >= 1, got -2",
        );
    }

    #[test]
    fn ports_must_be_in_range() {
        assert_error(
            |s| s.listeners[0].port = 0,
            "spec.listeners[0].port: must be 1..=65535, got 0",
        );
        assert_error(
            |s| s.endpoints[0].port = 70000,
            "spec.endpoints[0].port: must be 1..=65535, got 70000",
        );
        assert_error(
            |s| s.health_check.port = Some(65536),
            "spec.healthCheck.port: must be 1..=65535, got 65536",
        );
        assert_error(
            |s| s.listeners[0].target_port = Some(PortRef::Number(-1)),
            "spec.listeners[0].targetPort: must be 1..=65535, got -1",
        );
    }

    #[test]
    fn timeout_must_be_less_than_interval() {
        assert_error(
            |s| s.health_check.timeout = "3s".into(),
            "spec.healthCheck.timeout: must be less than interval (3s), got 3s",
        );
    }

    #[test]
    fn durations_must_parse() {
        assert_error(
            |s| s.health_check.interval = "3 seconds".into(),
            "spec.healthCheck.interval: must be a duration like 500ms, 3s or 2m, got \"3 seconds\"",
        );
        assert_error(
            |s| s.timeouts.connect = "0".into(),
            "spec.timeouts.connect: must be more than 0, got \"0\"",
        );
    }

    #[test]
    fn weights_must_be_between_1_and_1000() {
        assert_error(
            |s| s.endpoints[0].weight = 0,
            "spec.endpoints[0].weight: must be 1..=1000, got 0",
        );
        assert_error(
            |s| s.endpoints[0].weight = 1001,
            "spec.endpoints[0].weight: must be 1..=1000, got 1001",
        );
    }

    #[test]
    fn app_protocol_takes_the_kubernetes_words() {
        let set = |text: &str| {
            let text = text.to_string();
            move |s: &mut BalancedServiceSpec| s.listeners[0].app_protocol = Some(text)
        };
        let mut spec = base();
        set("kubernetes.io/h2c")(&mut spec);
        let cfg = validate(ServiceKey::new("default", "web"), &spec).unwrap();
        assert_eq!(cfg.listeners[0].app_protocol, Some(AppProtocol::H2c));
        assert_error(
            set("spdy"),
            "spec.listeners[0].appProtocol: must be \"http\" or \"kubernetes.io/h2c\", got \"spdy\"",
        );
        assert_error(
            |s| {
                s.listeners[0].protocol = ListenerProtocol::Tcp;
                s.listeners[0].app_protocol = Some("http".into());
            },
            "spec.listeners[0].appProtocol: is only used with protocol HTTP, got \"http\" on a TCP listener",
        );
    }

    #[test]
    fn per_try_timeouts_and_hedging_are_checked() {
        assert_error(
            |s| s.retry.per_try_timeout = Some("60s".into()),
            "spec.retry.perTryTimeout: must be less than spec.timeouts.response (1m), got \"60s\"",
        );
        assert_error(
            |s| s.retry.per_try_timeout = Some("0".into()),
            "spec.retry.perTryTimeout: must be more than 0, got \"0\"",
        );
        assert_error(
            |s| s.retry.hedge = true,
            "spec.retry.hedge: sends a second attempt after spec.retry.perTryTimeout, which is unset",
        );
        let mut s = base();
        s.retry.per_try_timeout = Some("200ms".into());
        s.retry.hedge = true;
        let cfg = validate(ServiceKey::new("default", "web"), &s).unwrap();
        assert_eq!(cfg.retry.per_try_timeout, Some(Duration::from_millis(200)));
        assert!(cfg.retry.hedge);
        assert_eq!(
            cfg.retry.attempt_timeout(Duration::from_secs(2)),
            Duration::from_secs(2)
        );
        s.retry.hedge = false;
        let cfg = validate(ServiceKey::new("default", "web"), &s).unwrap();
        assert_eq!(
            cfg.retry.attempt_timeout(Duration::from_secs(2)),
            Duration::from_millis(200)
        );
    }

    #[test]
    fn retry_budget_fields_are_checked() {
        assert_error(
            |s| s.retry.budget.percent = 101,
            "spec.retry.budget.percent: must be <= 100, got 101",
        );
        assert_error(
            |s| s.retry.budget.percent = -1,
            "spec.retry.budget.percent: must be >= 0, got -1",
        );
        assert_error(
            |s| s.retry.budget.interval = "0".into(),
            "spec.retry.budget.interval: must be more than 0, got \"0\"",
        );
        assert_error(
            |s| s.retry.budget.min_retry_rate.count = -5,
            "spec.retry.budget.minRetryRate.count: must be >= 0, got -5",
        );
        assert_error(
            |s| s.retry.budget.min_retry_rate.interval = "soon".into(),
            "spec.retry.budget.minRetryRate.interval: must be a duration like 500ms, 3s or 2m, got \"soon\"",
        );
    }

    #[test]
    fn edge_timeouts_and_limits_have_defaults_and_are_checked() {
        let cfg = validate(ServiceKey::new("default", "web"), &base()).unwrap();
        assert_eq!(cfg.timeouts.request_header, Duration::from_secs(10));
        assert_eq!(cfg.timeouts.request_body, Duration::from_secs(30));
        assert_eq!(cfg.timeouts.idle_for(ListenerProtocol::Http), Duration::from_secs(60));
        assert_eq!(cfg.timeouts.idle_for(ListenerProtocol::Tcp), Duration::from_secs(3600));
        assert_eq!(
            cfg.limits,
            Limits {
                max_connections: 10_000,
                max_connections_per_client: 0,
                max_request_headers_bytes: 16 * 1024,
                max_request_headers: 100,
                max_uri_bytes: 8 * 1024,
                max_requests: 0,
                max_pending_requests: 0,
            }
        );
        assert_eq!(cfg.limits.max_request_headers_bytes, 16384);
        assert_error(
            |s| s.timeouts.request_header = "0".into(),
            "spec.timeouts.requestHeader: must be more than 0, got \"0\"",
        );
        assert_error(
            |s| s.timeouts.request_body = "a while".into(),
            "spec.timeouts.requestBody: must be a duration like 500ms, 3s or 2m, got \"a while\"",
        );
        assert_error(
            |s| s.timeouts.idle = Some("0".into()),
            "spec.timeouts.idle: must be more than 0, got \"0\"",
        );
        assert_error(
            |s| s.limits.max_connections = 0,
            "spec.limits.maxConnections: must be 1..=1000000, got 0",
        );
        assert_error(
            |s| s.limits.max_connections_per_client = -1,
            "spec.limits.maxConnectionsPerClient: must be 0..=1000000, got -1",
        );
        assert_error(
            |s| s.limits.max_requests = -5,
            "spec.limits.maxRequests: must be 0..=1000000, got -5",
        );
        assert_error(
            |s| s.limits.max_pending_requests = 10,
            "spec.limits.maxPendingRequests: needs spec.limits.maxRequests (requests wait for one of those), got 10 with maxRequests 0",
        );
        assert_error(
            |s| s.limits.max_request_headers_bytes = 100,
            "spec.limits.maxRequestHeadersBytes: must be 1024..=1048576, got 100",
        );
        assert_error(
            |s| s.limits.max_uri_bytes = 20000,
            "spec.limits.maxUriBytes: must be <= spec.limits.maxRequestHeadersBytes (16384), got 20000",
        );
        let mut spec = base();
        spec.timeouts.idle = Some("5m".into());
        let cfg = validate(ServiceKey::new("default", "web"), &spec).unwrap();
        assert_eq!(cfg.timeouts.idle_for(ListenerProtocol::Tcp), Duration::from_secs(300));
    }

    #[test]
    fn down_interval_when_set_is_its_own() {
        let mut spec = base();
        spec.health_check.down_interval = Some("30s".into());
        let cfg = validate(ServiceKey::new("default", "web"), &spec).unwrap();
        assert_eq!(cfg.health.down_interval, Duration::from_secs(30));
        assert_error(
            |s| s.health_check.down_interval = Some("0".into()),
            "spec.healthCheck.downInterval: must be more than 0, got \"0\"",
        );
    }

    #[test]
    fn listeners_must_exist_and_be_unique() {
        assert_error(
            |s| s.listeners.clear(),
            "spec.listeners: must name at least one listener",
        );
        let second = |name: &str, port| Listener {
            name: name.into(),
            port,
            protocol: ListenerProtocol::Http,
            target_port: None,
            app_protocol: None,
            trust_forwarded_headers: false,
            tls: None,
        };
        assert_error(
            |s| s.listeners.push(second("admin", 8080)),
            "spec.listeners[1].port: 8080 is used twice",
        );
        assert_error(
            |s| s.listeners.push(second("http", 8081)),
            "spec.listeners[1].name: \"http\" is used twice",
        );
        assert_error(
            |s| s.listeners[0].name = "HTTP".into(),
            "spec.listeners[0].name: must be 1-15 lower-case letters, digits or '-', starting and ending with a letter or digit, got \"HTTP\"",
        );
    }

    #[test]
    fn status_rules_are_classes_or_codes() {
        assert_error(
            |s| {
                s.health_check.protocol = ProbeProtocol::Http;
                s.health_check.http.expect_status = vec!["2xx".into(), "20x".into()];
            },
            "spec.healthCheck.http.expectStatus[1]: must be a class like 2xx or a code like 204, got \"20x\"",
        );
    }

    #[test]
    fn addresses_must_be_ips() {
        assert_error(
            |s| s.endpoints[0].address = "web.local".into(),
            "spec.endpoints[0].address: must be an IPv4 or IPv6 address, got \"web.local\"",
        );
        assert!(errors_of(|s| s.endpoints[0].address = "::1".into()).is_empty());
    }

    #[test]
    fn duplicate_endpoints_are_named() {
        assert_error(
            |s| s.endpoints.push(s.endpoints[0].clone()),
            "spec.endpoints[1]: 127.0.0.1:8081 is listed twice",
        );
    }

    #[test]
    fn hash_goes_with_consistent_hash_only() {
        assert_error(
            |s| s.algorithm = spec::Algorithm::ConsistentHash,
            "spec.hash: is required when algorithm is ConsistentHash",
        );
        assert_error(
            |s| {
                s.hash = Some(HashSpec {
                    source: HashSource::SourceIp,
                    name: None,
                })
            },
            "spec.hash: is only used with algorithm ConsistentHash, got algorithm LeastConnections",
        );
        assert_error(
            |s| {
                s.algorithm = spec::Algorithm::ConsistentHash;
                s.hash = Some(HashSpec {
                    source: HashSource::Header,
                    name: Some("bad header".into()),
                });
            },
            "spec.hash.name: must be a header name, got \"bad header\"",
        );
        assert_error(
            |s| {
                s.algorithm = spec::Algorithm::ConsistentHash;
                s.listeners[0].protocol = ListenerProtocol::Tcp;
                s.hash = Some(HashSpec {
                    source: HashSource::Cookie,
                    name: Some("session".into()),
                });
            },
            "spec.hash.source: Cookie needs HTTP listeners, but spec.listeners[0] is TCP; use SourceIP",
        );
    }

    #[test]
    fn a_source_of_endpoints_is_required() {
        assert_error(
            |s| s.endpoints.clear(),
            "spec: needs spec.service (a Service's endpoints) or spec.endpoints (static endpoints)",
        );
    }

    #[test]
    fn every_error_is_reported_at_once() {
        let errors = errors_of(|s| {
            s.health_check.rise = 0;
            s.health_check.fall = 0;
            s.listeners[0].port = 0;
        });
        assert_eq!(errors.len(), 3, "{errors:#?}");
    }

    #[test]
    fn all_backups_is_an_error() {
        assert_error(
            |s| s.endpoints[0].backup = true,
            "spec.endpoints: every endpoint is a backup; at least one must be a primary (backup: false)",
        );
    }

    #[test]
    fn http_probe_fields_are_checked() {
        assert_error(
            |s| {
                s.health_check.protocol = ProbeProtocol::Http;
                s.health_check.http.path = "healthz".into();
            },
            "spec.healthCheck.http.path: must start with '/' and contain no spaces or control characters, got \"healthz\"",
        );
        assert_error(
            |s| {
                s.health_check.protocol = ProbeProtocol::Http;
                s.health_check.http.method = "get".into();
            },
            "spec.healthCheck.http.method: must be an upper-case HTTP method like GET or HEAD, got \"get\"",
        );
    }
}
