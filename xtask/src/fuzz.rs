//! `cargo xtask fuzz [--seconds N] [report|canary]...`: each fuzz target for a bounded time, the
//! way a benchmark runs: by hand, never in CI (`cargo xtask test` does not fuzz).
//!
//! cargo-fuzz (installed with `cargo install` when missing) builds the targets of `fuzz/` with
//! libFuzzer. It passes `-Z` flags to rustc, which only a nightly compiler takes: with a nightly
//! toolchain installed it is used (with AddressSanitizer, cargo-fuzz's default); without one the
//! stable compiler is told to accept them (`RUSTC_BOOTSTRAP=1`) and the targets are built
//! without a sanitizer (`--sanitizer none`: safe Rust needs none to find panics, overflows and
//! broken assertions). If cargo-fuzz cannot build at all, the same checks run in
//! `weir-fuzz-loop`, a plain loop over mutated seeds and generated reports.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

use crate::Workspace;

const TARGETS: [&str; 2] = ["report", "canary"];

/// What one target's run did.
struct Run {
    /// Whether the fuzzer ran (false: it could not be built).
    started: bool,
    target: String,
    how: String,
    executions: Option<u64>,
    seconds: u64,
    ok: bool,
}

fn seeds(ws: &Workspace, target: &str) -> PathBuf {
    match target {
        // The Canaries the spec's own tests parse: one source for both.
        "canary" => ws.root.join("controller/src/spec/testdata"),
        _ => ws.root.join("fuzz/seeds").join(target),
    }
}

fn has_nightly() -> bool {
    Command::new("rustup")
        .args(["toolchain", "list"])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .any(|l| l.starts_with("nightly"))
        })
        .unwrap_or(false)
}

fn ensure_cargo_fuzz(ws: &Workspace) -> Result<()> {
    let installed = ws
        .cargo(["fuzz", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !installed {
        println!("xtask fuzz: installing cargo-fuzz (cargo install cargo-fuzz --locked)");
        let status = ws
            .cargo(["install", "cargo-fuzz", "--locked"])
            .status()
            .context("cannot run cargo install")?;
        if !status.success() {
            bail!("`cargo install cargo-fuzz --locked` failed");
        }
    }
    Ok(())
}

/// Runs `cmd`, echoing its stderr; returns whether it succeeded, libFuzzer's final "Done N runs"
/// count, and whether libFuzzer started at all (a build that failed never does).
fn run_counting(mut cmd: Command) -> Result<(bool, Option<u64>, bool)> {
    let mut child = cmd
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot start the fuzzer")?;
    let (mut executions, mut started) = (None, false);
    if let Some(stderr) = child.stderr.take() {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("{line}");
            started |= line.starts_with("INFO: Seed:");
            // libFuzzer: "Done 123456 runs in 120 second(s)".
            if let Some(rest) = line.strip_prefix("Done ") {
                executions = rest.split_whitespace().next().and_then(|n| n.parse().ok());
            }
        }
    }
    let status = child.wait()?;
    Ok((status.success(), executions, started))
}

fn cargo_fuzz(ws: &Workspace, target: &str, seconds: u64, nightly: bool) -> Result<Run> {
    let fuzz = ws.root.join("fuzz");
    let corpus = fuzz.join("corpus").join(target);
    std::fs::create_dir_all(&corpus)?;
    let mut cmd = Command::new("cargo");
    if nightly {
        cmd.arg("+nightly");
    } else {
        cmd.env("RUSTC_BOOTSTRAP", "1");
    }
    cmd.args(["fuzz", "run", "--features", "libfuzzer"]);
    if !nightly {
        cmd.args(["--sanitizer", "none"]);
    }
    cmd.arg(target)
        .arg(&corpus)
        .arg(seeds(ws, target))
        .arg("--")
        .arg(format!("-max_total_time={seconds}"))
        .arg("-print_final_stats=1")
        .current_dir(&fuzz);
    let (ok, executions, started) = run_counting(cmd)?;
    Ok(Run {
        started,
        target: target.to_owned(),
        how: if nightly {
            "cargo +nightly fuzz run (AddressSanitizer)".to_owned()
        } else {
            "RUSTC_BOOTSTRAP=1 cargo fuzz run --sanitizer none".to_owned()
        },
        executions,
        seconds,
        ok,
    })
}

fn plain_loop(ws: &Workspace, target: &str, seconds: u64) -> Result<Run> {
    let fuzz = ws.root.join("fuzz");
    let mut cmd = Command::new("cargo");
    cmd.args(["run", "--release", "--bin", "weir-fuzz-loop", "--"])
        .arg(target)
        .args(["--seconds", &seconds.to_string()])
        .arg("--seeds")
        .arg(seeds(ws, target))
        .current_dir(&fuzz);
    let output = cmd.output().context("cannot run weir-fuzz-loop")?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    eprint!("{}", String::from_utf8_lossy(&output.stderr));
    print!("{stdout}");
    let executions = stdout
        .split_whitespace()
        .zip(stdout.split_whitespace().skip(1))
        .find(|(_, word)| *word == "executions")
        .and_then(|(n, _)| n.parse().ok());
    Ok(Run {
        started: true,
        target: target.to_owned(),
        how: "weir-fuzz-loop (cargo-fuzz could not build)".to_owned(),
        executions,
        seconds,
        ok: output.status.success(),
    })
}

/// `cargo xtask fuzz`.
pub fn run(ws: &Workspace, args: &[String]) -> Result<()> {
    let mut seconds = 120;
    let mut targets = Vec::new();
    let mut rest = args.iter();
    while let Some(arg) = rest.next() {
        match arg.as_str() {
            "--seconds" => {
                seconds = rest
                    .next()
                    .and_then(|n| n.parse().ok())
                    .context("--seconds takes a number of seconds")?;
            }
            t if TARGETS.contains(&t) => targets.push(t.to_owned()),
            other => bail!(
                "`cargo xtask fuzz` takes [--seconds N] and targets among {TARGETS:?}, not `{other}`"
            ),
        }
    }
    if targets.is_empty() {
        targets = TARGETS.iter().map(|t| (*t).to_owned()).collect();
    }
    ensure_cargo_fuzz(ws)?;
    let nightly = has_nightly();
    if !nightly {
        println!(
            "xtask fuzz: no nightly toolchain; cargo-fuzz's -Z flags go to the stable compiler with RUSTC_BOOTSTRAP=1, without a sanitizer"
        );
    }
    let mut runs = Vec::new();
    for target in &targets {
        let run = match cargo_fuzz(ws, target, seconds, nightly) {
            Ok(run) if run.started => run,
            Ok(_) | Err(_) => {
                println!(
                    "xtask fuzz: cargo fuzz did not run {target}; running weir-fuzz-loop instead"
                );
                plain_loop(ws, target, seconds)?
            }
        };
        runs.push(run);
    }
    println!("\nfuzz runs ({}):", date());
    for run in &runs {
        println!(
            "  {}: {} for {} s, {} executions, {}",
            run.target,
            run.how,
            run.seconds,
            run.executions
                .map_or_else(|| "?".to_owned(), |n| n.to_string()),
            if run.ok {
                "no failure".to_owned()
            } else {
                format!(
                    "FAILED: inputs in {}",
                    Path::new("fuzz/artifacts").join(&run.target).display()
                )
            }
        );
    }
    if runs.iter().all(|r| r.ok) {
        Ok(())
    } else {
        bail!("a fuzz target failed; see its input above and fix what it found, with a regression test")
    }
}

fn date() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}
