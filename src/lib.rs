//! balanced: active health checks, least-connections balancing and retries for a
//! Service, as a Kubernetes operator with a per-service proxy, or standalone.
#![forbid(unsafe_code)]

pub mod admin;
pub mod api;
pub mod balance;
pub mod cli;
pub mod controller;
pub mod demo;
pub mod health;
pub mod metrics;
pub mod net;
pub mod proxy;
pub mod runtime;
pub mod shell;
pub mod signal;
pub mod source;
pub mod standalone;
pub mod throttle;
pub mod tls;
pub mod xds;

#[cfg(any(test, feature = "test-util"))]
pub mod testing;

#[cfg(any(test, feature = "test-util"))]
pub mod fuzzing;
