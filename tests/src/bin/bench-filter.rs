//! `cargo xtask bench filter [args]`: what the Weir filter costs Envoy per request, against Envoy
//! with no filter and with an empty Wasm filter. The logic is in `weir_e2e::bench_filter`, shared
//! with the suite's smoke test; `--help` lists the arguments.

use std::process::ExitCode;

use weir_e2e::bench_filter::{self, Options, Outcome, USAGE};
use weir_e2e::bench_support;

// One thread: the in-process control plane is light, and every core left free goes to Envoy, wrk
// and the mirrors.
#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let options = match bench_support::parse_args("bench-filter", USAGE, Options::parse) {
        Ok(options) => options,
        Err(code) => return code,
    };
    eprintln!(
        "bench-filter: {} round(s) × {} variant(s) × {} s, after {} s of warm-up per variant",
        options.rounds,
        options.variants.len(),
        options.seconds,
        options.warmup_seconds
    );
    bench_support::finish(
        "bench-filter",
        bench_filter::run(&options).await,
        Outcome::render,
    )
}
