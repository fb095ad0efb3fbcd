//! `cargo xtask bench detect [args]`: how soon a failing canary is halted and rolled back, from
//! the filters' streamed reports and from Prometheus. The logic is in `weir_e2e::bench_detect`,
//! shared with the suite's smoke test; `--help` lists the arguments.

use std::process::ExitCode;

use weir_e2e::bench_detect::{self, Options, USAGE};

// Two workers: the controller's runner and ingest, the load generator and the Prometheus
// client share this process.
#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let options = match Options::parse(&args) {
        Ok(Some(options)) => options,
        Ok(None) => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(problem) => {
            eprintln!("bench-detect: {problem}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match bench_detect::run(&options).await {
        // A missed target is a result, not a failure: it is printed, and the exit status is 0.
        Ok(outcome) => {
            println!("{}", outcome.render());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("bench-detect: {e:#}");
            ExitCode::FAILURE
        }
    }
}
