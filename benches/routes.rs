//! The cost of routing one request: matching against 100 routes (the request
//! matching the last one, and matching none), with path prefixes, headers,
//! a query parameter and a regex among them.
//!
//!   cargo bench --bench routes [-- ITERATIONS]

use std::hint::black_box;
use std::time::Instant;

use balanced::api::route::{RequestView, first_match};
use http::{HeaderMap, Method};

fn main() {
    let iterations: u32 = std::env::args().skip(1).find_map(|a| a.parse().ok()).unwrap_or(200_000);
    // 100 routes; route i matches /svc-i (prefix), a header, a query value or
    // a regex, by i % 4. The request below matches only the last one.
    let mut routes = String::new();
    for i in 0..100 {
        let m = match i % 4 {
            0 => format!("{{path: {{type: PathPrefix, value: /svc-{i}}}}}"),
            1 => format!("{{headers: [{{name: x-tenant, value: t{i}}}]}}"),
            2 => format!("{{queryParams: [{{name: v, value: '{i}'}}], path: {{value: /q}}}}"),
            _ => format!("{{path: {{type: RegularExpression, value: '/r{i}/[0-9]+'}}}}"),
        };
        routes.push_str(&format!(
            "    - {{name: r{i}, matches: [{m}], backendRefs: [{{name: default}}]}}\n"
        ));
    }
    let yaml = format!(
        "apiVersion: balanced.dev/v1alpha1\nkind: BalancedService\nmetadata: {{name: b}}\nspec:\n  endpoints: [{{address: 127.0.0.1, port: 80}}]\n  listeners: [{{name: http, port: 8080}}]\n  routes:\n{routes}"
    );
    let cfg = balanced::api::load_configs(&yaml).expect("valid routes").remove(0);
    let mut headers = HeaderMap::new();
    headers.insert("x-tenant", "nobody".parse().unwrap());
    headers.insert("user-agent", "bench".parse().unwrap());
    let cases = [
        ("the 100th route matches", "/r99/12345", Some(99)),
        ("no route matches", "/elsewhere/x?v=7", None),
        ("the 1st route matches", "/svc-0/items", Some(0)),
    ];
    println!("{:<26} {:>12}", "request", "ns/request");
    for (what, target, expected) in cases {
        let uri: http::Uri = target.parse().unwrap();
        let view = RequestView {
            method: &Method::GET,
            path: uri.path(),
            query: uri.query(),
            host: Some("shop.example.com"),
            headers: &headers,
            body: None,
        };
        assert_eq!(first_match(&cfg.routes, &view), expected, "{what}");
        let started = Instant::now();
        for _ in 0..iterations {
            black_box(first_match(black_box(&cfg.routes), black_box(&view)));
        }
        let ns = started.elapsed().as_nanos() as f64 / f64::from(iterations);
        println!("{what:<26} {ns:>12.0}");
    }
}
