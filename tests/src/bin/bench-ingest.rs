//! `cargo xtask bench ingest [args]`: one controller process against N simulated Envoys: CPU per
//! report, peak memory, directive fan-out. The logic is in `weir_e2e::bench_ingest`, shared with
//! the suite's smoke test; `--help` lists the arguments.

use std::process::ExitCode;

use weir_e2e::bench_ingest::{self, Options, Outcome, USAGE};
use weir_e2e::bench_support;

// Both cores' worth of workers: thousands of simulated Envoys need them, and the controller they
// load is another process, measured on its own.
#[tokio::main]
async fn main() -> ExitCode {
    let options = match bench_support::parse_args("bench-ingest", USAGE, Options::parse) {
        Ok(options) => options,
        Err(code) => return code,
    };
    bench_support::finish(
        "bench-ingest",
        bench_ingest::run(&options).await,
        Outcome::render,
    )
}
