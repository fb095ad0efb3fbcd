//! `cargo xtask bench judge [args]`: false rollbacks, missed regressions and time to detection,
//! Flagger's fixed-threshold rule and Weir's comparative judge on the same simulated samples.
//! The logic is in `weir_e2e::bench_judge`, shared with the suite's smoke test; `--help` lists
//! the arguments.

use std::process::ExitCode;

use weir_e2e::bench_judge::{self, Options, Outcome, USAGE};
use weir_e2e::bench_support;

fn main() -> ExitCode {
    let options = match bench_support::parse_args("bench-judge", USAGE, Options::parse) {
        Ok(options) => options,
        Err(code) => return code,
    };
    bench_support::finish("bench-judge", bench_judge::run(&options), Outcome::render)
}
