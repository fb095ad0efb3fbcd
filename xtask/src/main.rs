//! `cargo xtask`: the one entry point for set-up, builds, tests, the demo and benchmarks.
//!
//! Every subcommand that needs an external tool installs it first (see [`setup`]), so a fresh
//! machine needs nothing but the Rust toolchain and the two commands in the README.

mod bench;
mod fuzz;
mod setup;
mod steps;

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{bail, Context, Result};

use setup::Tools;
use steps::Steps;

const USAGE: &str = "\
usage: cargo xtask <command> [args]

commands:
  setup          install what the other commands need (wasm32-wasip1 target, rustfmt, clippy,
                 Envoy 1.40 into .tools/, Prometheus) and print one line per tool
  wasm           build the filter: target/wasm32-wasip1/wasm/weir_filter.wasm
  test [args]    setup (with wrk), build everything, rustfmt check, clippy (native and wasm32),
                 then the whole test suite; args go to the test runner (e.g. a test-name filter)
  demo [args]    setup, build, then run `weir demo [args]`: the local demo
  bench <name>   setup (with wrk), release builds, then the benchmark binary `bench-<name>`
                 of the weir-e2e crate; `cargo xtask bench` lists them
  fuzz [--seconds N] [report|canary]...
                 each fuzz target of fuzz/ for N seconds (default 120): cargo-fuzz, installed
                 when missing (stable: RUSTC_BOOTSTRAP=1, no sanitizer); never part of `test`
  help           this text

The commands set WEIR_ENVOY, WEIR_WASM, WEIR_MIRROR, WEIR_BIN, WEIR_PROMETHEUS and WEIR_TMUX (absolute
paths) for what they run; setting WEIR_ENVOY or WEIR_PROMETHEUS yourself picks that binary.
";

/// The wasm target the filter is built for.
pub const WASM_TARGET: &str = "wasm32-wasip1";

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("\nxtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let command = args.next();
    let rest: Vec<String> = args.collect();
    let ws = Workspace::locate()?;
    match command.as_deref() {
        None | Some("help" | "-h" | "--help") => {
            print!("{USAGE}");
            Ok(())
        }
        Some("setup") => {
            no_args("setup", &rest)?;
            let mut steps = Steps::new();
            steps.run("setup", || setup::ensure(&ws, setup::Needs::default()))?;
            steps.summary();
            Ok(())
        }
        Some("wasm") => {
            no_args("wasm", &rest)?;
            let mut steps = Steps::new();
            steps.run("setup", || setup::ensure_rust(&ws))?;
            steps.run("wasm", || build_wasm(&ws))?;
            steps.summary();
            Ok(())
        }
        Some("test") => test(&ws, &rest),
        Some("demo") => demo(&ws, &rest),
        Some("bench") => bench::run(&ws, &rest),
        Some("fuzz") => fuzz::run(&ws, &rest),
        Some(other) => bail!("unknown command `{other}`\n\n{USAGE}"),
    }
}

fn no_args(command: &str, rest: &[String]) -> Result<()> {
    if let Some(first) = rest.first() {
        bail!("`cargo xtask {command}` takes no arguments, got `{first}`\n\n{USAGE}");
    }
    Ok(())
}

/// Where things are: the repository root, the cargo target directory, and the cargo to run.
pub struct Workspace {
    /// The repository root (where the workspace Cargo.toml is).
    pub root: PathBuf,
    /// The cargo target directory (CARGO_TARGET_DIR or `<root>/target`).
    pub target: PathBuf,
    cargo: OsString,
}

impl Workspace {
    fn locate() -> Result<Self> {
        // xtask is always built from this workspace, so its manifest dir pins the root
        // wherever `cargo xtask` is run from.
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .context("xtask's manifest directory has no parent")?
            .to_path_buf();
        let target = match std::env::var_os("CARGO_TARGET_DIR") {
            Some(dir) => {
                std::path::absolute(dir).context("CARGO_TARGET_DIR is not a usable path")?
            }
            None => root.join("target"),
        };
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        Ok(Self {
            root,
            target,
            cargo,
        })
    }

    /// A `cargo <args>` command run at the root.
    pub fn cargo<I, S>(&self, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let mut cmd = Command::new(&self.cargo);
        cmd.args(args).current_dir(&self.root);
        cmd
    }

    /// The built filter.
    pub fn wasm(&self) -> PathBuf {
        self.target
            .join(WASM_TARGET)
            .join("wasm")
            .join("weir_filter.wasm")
    }

    /// A binary of the host build with the given cargo profile directory (`debug`, `release`).
    pub fn bin(&self, profile_dir: &str, name: &str) -> PathBuf {
        self.target.join(profile_dir).join(name)
    }

    /// The environment every test, demo and benchmark gets: absolute paths of what it runs.
    pub fn weir_env(&self, tools: &Tools, profile_dir: &str) -> Vec<(&'static str, PathBuf)> {
        let mut env = vec![
            ("WEIR_ENVOY", tools.envoy.clone()),
            ("WEIR_WASM", self.wasm()),
            ("WEIR_MIRROR", self.bin(profile_dir, "mirror")),
            ("WEIR_BIN", self.bin(profile_dir, "weir")),
            ("WEIR_PROMETHEUS", tools.prometheus.clone()),
            ("WEIR_TMUX", tools.tmux.clone()),
        ];
        if let Some(wrk) = &tools.wrk {
            env.push(("WEIR_WRK", wrk.clone()));
        }
        env
    }
}

/// Builds the filter with the size-optimised `wasm` profile and prints its size.
pub fn build_wasm(ws: &Workspace) -> Result<()> {
    steps::run_cmd(ws.cargo([
        "build",
        "-p",
        "weir-filter",
        "--target",
        WASM_TARGET,
        "--profile",
        "wasm",
    ]))?;
    let wasm = ws.wasm();
    let size = std::fs::metadata(&wasm)
        .with_context(|| format!("the build succeeded but {} is missing", wasm.display()))?
        .len();
    println!(
        "{}: {} bytes ({:.0} KiB)",
        wasm.display(),
        size,
        size as f64 / 1024.0
    );
    Ok(())
}

/// Builds the binaries the tests and the demo start (`mirror`, `weir`) with a host profile.
pub fn build_bins(ws: &Workspace, release: bool) -> Result<()> {
    let mut args = vec!["build", "-p", "mirror", "-p", "weir-controller", "--bins"];
    if release {
        args.push("--release");
    }
    steps::run_cmd(ws.cargo(args))
}

fn test(ws: &Workspace, runner_args: &[String]) -> Result<()> {
    let mut steps = Steps::new();
    // wrk too: the suite runs the filter benchmark in its smoke form (tests/tests/bench_smoke.rs).
    let tools = steps.run("setup", || setup::ensure(ws, setup::Needs { wrk: true }))?;
    // Checks that don't gate the tests are run to the end and reported together, so one CI
    // run shows a formatting slip and a failing test at once.
    steps.check("rustfmt", || {
        steps::run_cmd(ws.cargo(["fmt", "--all", "--", "--check"]))
            .context("some files are not formatted: run `cargo fmt -p <crate>` on the crates above")
    });
    steps.run("wasm", || build_wasm(ws))?;
    steps.run("build", || build_bins(ws, false))?;
    steps.check("clippy", || {
        steps::run_cmd(ws.cargo([
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]))
    });
    steps.check("clippy (wasm32)", || {
        steps::run_cmd(ws.cargo([
            "clippy",
            "-p",
            "weir-filter",
            "--target",
            WASM_TARGET,
            "--",
            "-D",
            "warnings",
        ]))
    });

    let env = ws.weir_env(&tools, "debug");
    let nextest = setup::has_nextest(ws);
    // nextest does not run doctests; run them too unless the caller asked for specific tests.
    // First, so that the runner's closing summary is the main test run's (CI reads it).
    if nextest && runner_args.is_empty() {
        steps.check("doctests", || {
            let mut cmd = ws.cargo(["test", "--workspace", "--doc"]);
            cmd.envs(env.iter().map(|(k, v)| (k, v)));
            steps::run_cmd(cmd)
        });
    }
    steps.check("tests", || {
        let mut cmd = if nextest {
            let mut cmd = ws.cargo(["nextest", "run", "--workspace", "--no-fail-fast"]);
            // Environment, not a flag, so a `--test-threads` in the caller's args still wins.
            if std::env::var_os("NEXTEST_TEST_THREADS").is_none() {
                cmd.env("NEXTEST_TEST_THREADS", TEST_THREADS);
            }
            cmd
        } else {
            let mut cmd = ws.cargo(["test", "--workspace", "--no-fail-fast"]);
            if std::env::var_os("RUST_TEST_THREADS").is_none() {
                cmd.env("RUST_TEST_THREADS", TEST_THREADS);
            }
            cmd
        };
        cmd.args(runner_args).envs(env.iter().map(|(k, v)| (k, v)));
        steps::run_cmd(cmd)
    });
    steps.summary();
    steps.into_result()
}

/// Tests in flight at once: the end-to-end tests each start Envoys and upstreams, and the
/// machines (CI included) have 2 cores.
const TEST_THREADS: &str = "2";

fn demo(ws: &Workspace, demo_args: &[String]) -> Result<()> {
    let mut steps = Steps::new();
    let tools = steps.run("setup", || setup::ensure(ws, setup::Needs::default()))?;
    steps.run("wasm", || build_wasm(ws))?;
    // A debug build: it compiles in about half the time of a release build on a fresh machine
    // and shares its artifacts with `cargo xtask test`; the demo's load is a few hundred
    // requests per second, which a debug controller and mirror serve easily. The filter, the
    // part on the request path, is always built optimised.
    steps.run("build", || build_bins(ws, false))?;
    steps.summary();

    let weir = ws.bin("debug", "weir");
    let mut cmd = Command::new(&weir);
    cmd.arg("demo")
        .args(demo_args)
        .current_dir(&ws.root)
        .envs(ws.weir_env(&tools, "debug"));
    println!("\n==> {} demo {}", weir.display(), demo_args.join(" "));
    // exec, so Ctrl-C and the exit status belong to the demo itself.
    let err = cmd.exec();
    Err(err).with_context(|| format!("could not start {}", weir.display()))
}
