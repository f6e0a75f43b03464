//! balanced: active health checks, least-connections balancing and retries for a
//! Service, as a Kubernetes operator with a per-service proxy, or standalone.
#![forbid(unsafe_code)]

pub mod api;
