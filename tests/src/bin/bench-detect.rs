//! `cargo xtask bench detect [args]`: how soon a failing canary is halted and rolled back, from
//! the filters' streamed reports and from Prometheus. The logic is in `weir_e2e::bench_detect`,
//! shared with the suite's smoke test; `--help` lists the arguments.

use std::process::ExitCode;

use weir_e2e::bench_detect::{self, Options, Outcome, USAGE};
use weir_e2e::bench_support;

// Two workers: the controller's runner and ingest, the load generator and the Prometheus
// client share this process.
#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> ExitCode {
    let options = match bench_support::parse_args("bench-detect", USAGE, Options::parse) {
        Ok(options) => options,
        Err(code) => return code,
    };
    bench_support::finish(
        "bench-detect",
        bench_detect::run(&options).await,
        Outcome::render,
    )
}
