//! `cargo xtask bench ingest [args]`: one controller process against N simulated Envoys: CPU per
//! report, peak memory, directive fan-out. The logic is in `weir_e2e::bench_ingest`, shared with
//! the suite's smoke test; `--help` lists the arguments.

use std::process::ExitCode;

use weir_e2e::bench_ingest::{self, Options, USAGE};

// Both cores' worth of workers: thousands of simulated Envoys need them, and the controller they
// load is another process, measured on its own.
#[tokio::main]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let options = match Options::parse(&args) {
        Ok(Some(options)) => options,
        Ok(None) => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(problem) => {
            eprintln!("bench-ingest: {problem}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match bench_ingest::run(&options).await {
        // A missed target is a result, not a failure: it is printed, and the exit status is 0.
        Ok(outcome) => {
            println!("{}", outcome.render());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("bench-ingest: {e:#}");
            ExitCode::FAILURE
        }
    }
}
