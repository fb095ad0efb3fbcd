//! The Weir proxy-wasm filter.
//!
//! Host-agnostic logic, unit-tested natively:
//! - [`config`]: the static configuration, parsed and validated;
//! - [`routing`]: where a request is split (the directive compiled into a routing table, and the
//!   weighted / sticky / header-match decision);
//! - [`worker`]: one worker's state: routing, fail-safe, and per-version recording;
//! - [`reporter`]: the singleton that merges workers' counts and owns the gRPC stream.
//!
//! The `host` module, compiled for wasm32 only, is the thin glue that makes the host calls.

pub mod config;
pub mod duration;
pub mod reporter;
pub mod routing;
pub mod worker;

#[cfg(target_arch = "wasm32")]
mod host;
