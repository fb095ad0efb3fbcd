//! The Weir controller.
//!
//! - [`spec`]: the Canary resource (Flagger's v1beta1 field names), its defaults and validation.
//! - [`analysis`]: the pure state machine that makes every verdict and decision.
//! - [`ingest`]: the weir.v1 gRPC server: exact accounting of filter reports, merged windows,
//!   and the directives pushed back to every Envoy.
//! - [`metrics`]: the metric-source seam (streamed telemetry by default).
//! - [`platform`]: where workloads live (local processes; Kubernetes later).

pub mod analysis;
pub mod ingest;
pub mod metrics;
pub mod platform;
pub mod spec;
