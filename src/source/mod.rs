//! Where configuration comes from: a file (standalone) or the cluster.

pub mod file;
pub mod kube;
