//! The `weir.v1` wire contract (reports up, directives down, on one stream per Envoy) and the HDR
//! latency layout both ends share.
//!
//! The generated messages build for wasm32 without tonic; enable the `grpc` feature for the tonic
//! client and server.

#[cfg(feature = "grpc")]
pub mod codec;
pub mod latency;

/// Generated from `proto/weir/v1/telemetry.proto`.
#[allow(clippy::all, missing_docs)]
pub mod v1 {
    include!(concat!(env!("OUT_DIR"), "/weir.v1.rs"));
}

pub use latency::LatencyHistogram;

/// Largest number of basis points: a weight of 100%.
pub const FULL_WEIGHT_BP: u32 = 10_000;
