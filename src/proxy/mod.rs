//! The data plane: client-facing listeners and the admin server.

pub mod admin;
