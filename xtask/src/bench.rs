//! `cargo xtask bench <name> [args]`: benchmarks by convention.
//!
//! A benchmark is a binary named `bench-<name>` in the weir-e2e crate, found by cargo's own
//! rule: `tests/src/bin/bench-<name>.rs` or `tests/src/bin/bench-<name>/main.rs`. Adding that
//! file is all it takes; xtask lists them from the tree. It is run as
//! `cargo run --release -p weir-e2e --bin bench-<name> -- [args]` after a release build of
//! `mirror` and `weir`, with WEIR_ENVOY, WEIR_WASM, WEIR_MIRROR, WEIR_BIN (release builds),
//! WEIR_PROMETHEUS and WEIR_WRK set to absolute paths.

use std::fs;
use std::path::Path;

use anyhow::{bail, Result};

use crate::setup::{self, Needs};
use crate::steps::{run_cmd, Steps};
use crate::{build_bins, build_wasm, Workspace};

/// Runs the benchmark named by the first argument, passing it the rest.
pub fn run(ws: &Workspace, args: &[String]) -> Result<()> {
    let available = available(&ws.root.join("tests").join("src").join("bin"));
    let listing = if available.is_empty() {
        "none yet".to_owned()
    } else {
        available.join(", ")
    };
    let Some((name, bench_args)) = args.split_first() else {
        bail!(
            "usage: cargo xtask bench <name> [args]; available: {listing}.\n\
             A benchmark is a binary `bench-<name>` of the weir-e2e crate \
             (tests/src/bin/bench-<name>.rs)"
        );
    };
    if !available.contains(name) {
        bail!(
            "unknown benchmark `{name}`, available: {listing}.\n\
             A benchmark is a binary `bench-<name>` of the weir-e2e crate \
             (tests/src/bin/bench-<name>.rs)"
        );
    }

    let mut steps = Steps::new();
    let tools = steps.run("setup", || setup::ensure(ws, Needs { wrk: true }))?;
    steps.run("wasm", || build_wasm(ws))?;
    // Release builds: a benchmark must not measure a debug upstream or controller.
    steps.run("build", || build_bins(ws, true))?;
    let bin = format!("bench-{name}");
    steps.check(&bin.clone(), || {
        let mut cmd = ws.cargo(["run", "--release", "-p", "weir-e2e", "--bin", &bin, "--"]);
        cmd.args(bench_args).envs(ws.weir_env(&tools, "release"));
        run_cmd(cmd)
    });
    steps.summary();
    steps.into_result()
}

/// The benchmark names found under `bin_dir`, sorted.
fn available(bin_dir: &Path) -> Vec<String> {
    let Ok(entries) = fs::read_dir(bin_dir) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let file_name = entry.file_name().into_string().ok()?;
            let path = entry.path();
            let stem = if path.is_dir() {
                path.join("main.rs")
                    .is_file()
                    .then_some(file_name.as_str())?
            } else {
                file_name.strip_suffix(".rs")?
            };
            stem.strip_prefix("bench-").map(str::to_owned)
        })
        .collect();
    names.sort();
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn benchmarks_are_found_as_files_and_as_folders_named_bench_dash() {
        let dir = std::env::temp_dir().join(format!("xtask-bench-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("bench-routing")).unwrap();
        fs::write(dir.join("bench-routing").join("main.rs"), "").unwrap();
        fs::create_dir_all(dir.join("bench-empty")).unwrap();
        fs::write(dir.join("bench-filter.rs"), "").unwrap();
        fs::write(dir.join("helper.rs"), "").unwrap();
        fs::write(dir.join("bench-notes.txt"), "").unwrap();
        let found = available(&dir);
        let _ = fs::remove_dir_all(&dir);
        assert_eq!(found, ["filter", "routing"]);
    }
}
