//! The operator. Pure parts: desired objects (`desired`), endpoint discovery
//! (`discovery`), status assembly (`status`), the healthy slices (`slices`)
//! and event summaries (`events`). The loop around them: `reconcile` (one
//! BalancedService), `status_writer` (status and slices, batched),
//! `leading` (what runs while this replica leads, and the admin APIs),
//! `leader` (the Lease).

pub mod desired;
pub mod discovery;
pub mod events;
pub mod leader;
pub mod leading;
pub mod rbac;
pub mod reconcile;
pub mod slices;
pub mod status;
pub mod status_writer;
