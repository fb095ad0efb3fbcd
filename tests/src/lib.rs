//! The end-to-end harness: real Envoy, the real `.wasm`, real upstream processes and an
//! in-process weir.v1 control plane that the tests drive.
//!
//! - [`binaries`]: where Envoy, the filter and the mirror are (environment, then the workspace);
//! - [`workdir`]: a scratch directory per test and free ports on 127.0.0.1;
//! - [`upstream`]: a `mirror` process;
//! - [`control_plane`]: the test control plane (directives down, reports up, exact accounting);
//! - [`load`]: a bounded load generator that records every response;
//! - [`local`]: the controller's local mode with its own state folder and steady traffic;
//! - [`local_cli`]: `weir local` as a user runs it (the binary, real signals, its processes);
//! - [`operator`]: the operator's CLI (`weir status`, `promote`, ...) and `weir watch` in tmux;
//! - [`stack`]: all of the above wired around one Envoy, as the data-plane tests use it;
//! - [`prometheus`]: a real Prometheus server (scrapes, queries, outages);
//! - [`fallback`]: local mode analysing with Prometheus, scraped from Envoy and the app;
//! - [`receiver`]: an HTTP(S) endpoint that records what webhooks, alerts and load send it;
//! - [`hostile`]: the ingest in its own process, its memory, and clients that break the rules.

pub mod bench_detect;
pub mod bench_filter;
pub mod bench_ingest;
pub mod bench_judge;
pub mod bench_p99;
pub mod bench_support;
pub mod binaries;
pub mod certs;
pub mod control_plane;
pub mod fallback;
pub mod hostile;
pub mod http;
pub mod load;
pub mod local;
pub mod local_cli;
pub mod operator;
pub mod prometheus;
pub mod receiver;
pub mod reporter;
pub mod stack;
pub mod tcp_proxy;
pub mod upstream;
pub mod workdir;

pub use control_plane::{ControlPlane, Snapshot, Totals};
pub use load::{LoadReport, LoadSpec, Outcome};
pub use stack::{Stack, StackOptions};
pub use upstream::Upstream;
pub use workdir::{free_port, WorkDir};
