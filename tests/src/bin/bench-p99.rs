//! `cargo xtask bench p99 [args]`: how far Weir's P99 and Prometheus's `histogram_quantile` over
//! Istio's buckets are from the exact P99. The logic is in `weir_e2e::bench_p99`, shared with the
//! suite's smoke test; `--help` lists the arguments.

use std::process::ExitCode;

use weir_e2e::bench_p99::{self, Options, Outcome, USAGE};
use weir_e2e::bench_support;

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let options = match bench_support::parse_args("bench-p99", USAGE, Options::parse) {
        Ok(options) => options,
        Err(code) => return code,
    };
    bench_support::finish("bench-p99", bench_p99::run(&options).await, Outcome::render)
}
