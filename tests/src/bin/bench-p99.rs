//! `cargo xtask bench p99 [args]`: how far Weir's P99 and Prometheus's `histogram_quantile` over
//! Istio's buckets are from the exact P99. The logic is in `weir_e2e::bench_p99`, shared with the
//! suite's smoke test; `--help` lists the arguments.

use std::process::ExitCode;

use weir_e2e::bench_p99::{self, Options, USAGE};

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let options = match Options::parse(&args) {
        Ok(Some(options)) => options,
        Ok(None) => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(problem) => {
            eprintln!("bench-p99: {problem}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match bench_p99::run(&options).await {
        // A missed target is a result, not a failure: it is printed, and the exit status is 0.
        Ok(outcome) => {
            println!("{}", outcome.render());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("bench-p99: {e:#}");
            ExitCode::FAILURE
        }
    }
}
