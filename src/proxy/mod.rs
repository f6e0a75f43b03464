//! The data plane: HTTP and TCP listeners balancing over a service's endpoints,
//! the retry loop, and the admin server.

pub mod access;
pub mod admin;
pub mod answer;
pub mod attempt;
pub mod body;
pub mod conn;
pub mod dataplane;
pub mod gate;
pub mod headers;
pub mod http;
pub mod listener;
pub mod ratelimit;
pub mod retry;
pub mod service;
#[cfg(target_os = "linux")]
pub mod splice;
pub mod tasks;
pub mod upstream;

pub use dataplane::Dataplane;
pub use listener::Serving;
