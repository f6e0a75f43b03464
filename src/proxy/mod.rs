//! The data plane: HTTP and TCP listeners balancing over a service's
//! endpoints. Imports go one way, from the top of this list to the bottom:
//!
//! - [`dataplane`]: every service's runtime and listeners, kept in step with the configs;
//! - [`http`]: the HTTP request path in phases, and its connections;
//! - [`tcp`]: TCP listeners (one endpoint per connection, bytes spliced);
//! - [`listen`]: what both listeners' accept loops share;
//! - [`client`]: each client connection's clock, and the listener's table;
//! - [`attempt`]: the attempt loop every listener kind shares, and [`retry`],
//!   the one place the retry rules live;
//! - [`service`]: one service's config, endpoints, pools and limiters;
//! - [`upstream`]: connections to endpoints, and one exchange on them;
//! - leaves: [`ratelimit`], [`gate`], [`tasks`], [`access`], [`tls`] (listener certificates).

pub mod access;
pub mod attempt;
pub mod client;
pub mod dataplane;
pub mod gate;
pub mod http;
pub mod listen;
pub mod ratelimit;
pub mod retry;
pub mod service;
pub mod tasks;
pub mod tcp;
pub mod tls;
pub mod upstream;

pub use dataplane::Dataplane;
pub use listen::Serving;
