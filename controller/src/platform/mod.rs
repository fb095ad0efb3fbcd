//! Where workloads run.

pub mod local;
