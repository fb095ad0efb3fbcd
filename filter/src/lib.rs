//! The Weir proxy-wasm filter.
//!
//! Host-agnostic logic, unit-tested natively:
//! - [`config`]: the static configuration, parsed and validated;
//! - [`routing`]: where a request is split (the directive compiled into a routing table, and the
//!   weighted / sticky / header-match decision);
//! - [`worker`]: one worker's state: routing, fail-safe, and per-version recording;
//! - [`ownership`]: which root context owns the Envoy's one gRPC stream (elected through shared
//!   data, with the reporter's state kept there for its successor);
//! - [`reporter`]: the owner's part: merges workers' counts and speaks weir.v1 on the stream;
//! - [`grpc_service`]: the controller's cluster and authority as Envoy's `GrpcService`;
//! - [`instances`]: one acting filter per Envoy, however many times it is installed.
//!
//! The `host` module, compiled for wasm32 only, is the thin glue that makes the host calls.

pub mod config;
pub mod duration;
pub mod grpc_service;
pub mod instances;
pub mod ownership;
pub mod reporter;
pub mod routing;
pub mod worker;

#[cfg(target_arch = "wasm32")]
mod host;
