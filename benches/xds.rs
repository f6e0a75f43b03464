//! The cost of one xDS rebuild: every resource for 100 BalancedServices of
//! 100 endpoints each (10,000 endpoints), and the comparison that decides
//! whether anything is pushed.
//!
//!   cargo bench --bench xds [-- ROUNDS]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use balanced::health::Health;
use balanced::xds::resources::{self, ENDPOINTS};
use balanced::xds::{Endpoint, Service};

fn main() {
    let rounds: u32 = std::env::args().skip(1).find_map(|a| a.parse().ok()).unwrap_or(20);
    let services: Vec<Service> = (0..100u32)
        .map(|s| {
            let yaml = format!(
                "apiVersion: balanced.dev/v1alpha1\nkind: BalancedService\nmetadata: {{name: svc-{s}, namespace: bench}}\nspec:\n  service: svc-{s}\n  listeners: [{{name: grpc, port: 8080}}]\n"
            );
            let config = Arc::new(balanced::api::load_configs(&yaml).expect("valid").remove(0));
            let endpoints = (0..100u32)
                .map(|i| Endpoint {
                    addr: SocketAddr::from(([10, (s / 250) as u8 + 1, (s % 250) as u8, i as u8], 50051)),
                    ports: Vec::new(),
                    zone: Some(format!("zone-{}", i % 3)),
                    health: if i % 10 == 0 { Health::Unhealthy } else { Health::Healthy },
                    not_ready: false,
                    draining: false,
                    weight: 100,
                    ramping: false,
                })
                .collect();
            Service { config, endpoints }
        })
        .collect();

    let started = Instant::now();
    let mut built = resources::build(&services);
    for _ in 1..rounds {
        built = resources::build(&services);
    }
    let per_build = started.elapsed() / rounds;
    let again = resources::build(&services);
    let started = Instant::now();
    let mut same = true;
    for _ in 0..rounds {
        same &= std::hint::black_box(&again) == std::hint::black_box(&built);
    }
    let per_compare = started.elapsed() / rounds;
    assert!(same);
    println!(
        "100 services x 100 endpoints: {} resources each of LDS/CDS/EDS; build {:.2} ms, unchanged-snapshot comparison {:.2} ms",
        built.count(ENDPOINTS),
        per_build.as_secs_f64() * 1e3,
        per_compare.as_secs_f64() * 1e3
    );
}
