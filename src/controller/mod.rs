//! The operator: desired objects (pure), endpoint discovery, status assembly,
//! and the reconcile loop that ties them to the API server.

pub mod desired;
pub mod discovery;
pub mod leader;
pub mod rbac;
pub mod run;
pub mod status;
