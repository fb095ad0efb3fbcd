//! The Weir controller.
//!
//! - [`spec`]: the Canary resource (Flagger's v1beta1 field names), its defaults and validation.
//! - [`analysis`]: the pure state machine that makes every verdict and decision.
//! - [`ingest`]: the weir.v1 gRPC server: exact accounting of filter reports, merged windows,
//!   and the directives pushed back to every Envoy.
//! - [`metrics`]: the metric-source seam (streamed telemetry by default, Prometheus as a fallback
//!   and for custom PromQL checks).
//! - [`exporter`]: the controller's own metrics (`/metrics`, Flagger's series under `weir_`).
//! - [`filter_module`]: the filter module the controller serves to the mesh, and its digest.
//! - [`http`]: the one HTTP(S) client of webhooks, alerts and Prometheus queries.
//! - [`platform`]: where workloads live (local processes; Kubernetes later).
//! - [`traffic`]: routes turned into the directives the filters apply.
//! - [`live`]: the live per-version numbers the CLI shows (`weir status`, `weir watch`).
//! - [`cli`]: the operator's verbs (`weir status`, `watch`, `promote`, ...) in both modes.
//! - [`runner`]: the executor: observe, ask the engine, perform its effects, persist.
//! - [`webhook`]: Flagger-style webhook calls.
//! - [`loadtest`]: `weir loadtest`, flagger-loadtester's gates and hey load, natively.
//! - [`notify`]: alerts (Slack, Teams, Discord, generic) and event hooks, delivered in the
//!   background.

pub mod analysis;
pub mod cli;
pub mod demo;
pub mod exporter;
pub mod filter_module;
pub mod http;
pub mod ingest;
pub mod live;
pub mod loadtest;
pub mod local;
pub mod metrics;
pub mod notify;
pub mod platform;
pub mod runner;
pub mod spec;
pub mod traffic;
pub mod webhook;
