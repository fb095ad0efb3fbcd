//! Local mode: workloads are processes on 127.0.0.1 behind a real Envoy.

pub mod envoy;
