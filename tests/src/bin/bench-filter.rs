//! `cargo xtask bench filter [args]`: what the Weir filter costs Envoy per request, against Envoy
//! with no filter and with an empty Wasm filter. The logic is in `weir_e2e::bench_filter`, shared
//! with the suite's smoke test; `--help` lists the arguments.

use std::process::ExitCode;

use weir_e2e::bench_filter::{self, Options, USAGE};

// One thread: the in-process control plane is light, and every core left free goes to Envoy, wrk
// and the mirrors.
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
            eprintln!("bench-filter: {problem}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    eprintln!(
        "bench-filter: {} round(s) × {} variant(s) × {} s, after {} s of warm-up per variant",
        options.rounds,
        options.variants.len(),
        options.seconds,
        options.warmup_seconds
    );
    match bench_filter::run(&options).await {
        // A missed target is a result, not a failure: it is printed, and the exit status is 0.
        Ok(outcome) => {
            println!("{}", outcome.render());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("bench-filter: {e:#}");
            ExitCode::FAILURE
        }
    }
}
