//! Active health checking: probe kinds, the rise/fall state machine, and the
//! scheduler that runs one probe loop per endpoint.

pub mod agent;
mod grpc;
pub mod probe;
pub mod prober;
pub mod report;
pub mod state;
pub mod tls;

pub use probe::{ProbeError, probe};
pub use prober::{PassHook, Prober, Target, Transition};
pub use state::{Health, HealthState};
pub use tls::TlsClients;
