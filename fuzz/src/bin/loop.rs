//! `weir-fuzz-loop <report|canary> [--seconds N] [--seeds DIR]...`: the fuzz checks without
//! libFuzzer, for machines where `cargo fuzz` cannot build (it needs a nightly compiler, or
//! `RUSTC_BOOTSTRAP=1`, and a C++ compiler for libFuzzer). Inputs are the seeds, mutated
//! (bit flips, byte runs, splices, truncations), and for reports also whole reports generated
//! at random and encoded, so every input reaches the checks. A panicking input is saved under
//! `fuzz/artifacts/<target>/` and the loop goes on; the exit status says whether any failed.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use prost::Message;
use weir_proto::v1::{Histogram, Report, Reporter, VersionStats};

/// xorshift64*: reproducible from the printed seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    fn chance(&mut self, one_in: usize) -> bool {
        self.below(one_in) == 0
    }

    /// A number that is often at an edge (0, 1, a power of two, u64::MAX).
    fn edgy(&mut self) -> u64 {
        match self.below(6) {
            0 => 0,
            1 => u64::MAX - self.next() % 3,
            2 => 1u64 << self.below(64),
            3 => self.next() % 1000,
            _ => self.next(),
        }
    }
}

fn mutate(rng: &mut Rng, input: &mut Vec<u8>, seeds: &[Vec<u8>]) {
    for _ in 0..=rng.below(8) {
        match rng.below(7) {
            0 if !input.is_empty() => {
                let i = rng.below(input.len());
                input[i] ^= 1 << rng.below(8);
            }
            1 if !input.is_empty() => {
                let i = rng.below(input.len());
                input[i] = [0, 0x7f, 0x80, 0xff, b'\n', b':', b'-'][rng.below(7)];
            }
            2 => {
                let at = rng.below(input.len() + 1);
                let run = vec![rng.next() as u8; 1 + rng.below(16)];
                input.splice(at..at, run);
            }
            3 if !input.is_empty() => {
                let from = rng.below(input.len());
                let to = (from + 1 + rng.below(16)).min(input.len());
                input.drain(from..to);
            }
            4 if !seeds.is_empty() => {
                let other = &seeds[rng.below(seeds.len())];
                if !other.is_empty() {
                    let from = rng.below(other.len());
                    let to = (from + 1 + rng.below(64)).min(other.len());
                    let at = rng.below(input.len() + 1);
                    input.splice(at..at, other[from..to].iter().copied());
                }
            }
            5 if !input.is_empty() => input.truncate(rng.below(input.len())),
            _ => {
                // Repeat a slice of itself (duplicated fields, lines).
                if !input.is_empty() {
                    let from = rng.below(input.len());
                    let to = (from + 1 + rng.below(64)).min(input.len());
                    let copy = input[from..to].to_vec();
                    let at = rng.below(input.len() + 1);
                    input.splice(at..at, copy);
                }
            }
        }
    }
}

fn random_report(rng: &mut Rng) -> Vec<u8> {
    let canaries = ["shop/web", "shop/api", "other/x", "bad", "/", ""];
    let entries = match rng.below(4) {
        0 => 0,
        1 => 1 + rng.below(4),
        2 => 1020 + rng.below(10),
        _ => rng.below(64),
    };
    let stats = (0..entries)
        .map(|_| {
            let requests = if rng.chance(2) {
                rng.next() % 50
            } else {
                rng.edgy()
            };
            let counts: Vec<i64> = if rng.chance(3) {
                // A histogram that matches `requests` (slot 0 holds them all).
                if requests > 0 && requests <= i64::MAX as u64 {
                    vec![-(rng.below(3000) as i64), requests as i64]
                } else {
                    vec![]
                }
            } else {
                (0..rng.below(40)).map(|_| rng.edgy() as i64).collect()
            };
            VersionStats {
                canary: canaries[rng.below(canaries.len())].to_owned(),
                version: rng.below(4) as i32,
                requests,
                failures: if rng.chance(2) { 0 } else { rng.edgy() },
                latency: (!rng.chance(5)).then_some(Histogram { counts }),
            }
        })
        .collect();
    Report {
        reporter: (!rng.chance(10)).then(|| Reporter {
            node_id: "n".repeat(rng.below(600)),
            namespace: ["", "shop", "other"][rng.below(3)].to_owned(),
            workload: String::new(),
        }),
        epoch: rng.edgy(),
        sequence: rng.edgy(),
        applied_generation: rng.edgy(),
        stats,
    }
    .encode_to_vec()
}

/// The seeds in `dirs`; a folder that cannot be read is an error (a mistyped --seeds would
/// otherwise fuzz from nothing without saying so).
fn read_seeds(dirs: &[PathBuf]) -> Result<Vec<Vec<u8>>, String> {
    let mut seeds = Vec::new();
    for dir in dirs {
        let entries = std::fs::read_dir(dir).map_err(|e| {
            format!(
                "cannot read the seeds in {}: {e}; pass an existing folder with --seeds",
                dir.display()
            )
        })?;
        for entry in entries.flatten() {
            if let Ok(bytes) = std::fs::read(entry.path()) {
                seeds.push(bytes);
            }
        }
    }
    Ok(seeds)
}

fn save(target: &str, input: &[u8]) -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("artifacts")
        .join(target);
    let _ = std::fs::create_dir_all(&dir);
    let hash = input.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
    });
    let path = dir.join(format!("crash-{hash:016x}"));
    let _ = std::fs::write(&path, input);
    path
}

fn main() -> std::process::ExitCode {
    let mut args = std::env::args().skip(1);
    let target = args.next().unwrap_or_default();
    let check: fn(&[u8]) = match target.as_str() {
        "report" => weir_fuzz::report,
        "canary" => weir_fuzz::canary,
        _ => {
            eprintln!("usage: weir-fuzz-loop <report|canary> [--seconds N] [--seeds DIR]...");
            return std::process::ExitCode::from(2);
        }
    };
    let (mut seconds, mut dirs) = (60u64, Vec::new());
    while let Some(flag) = args.next() {
        match (flag.as_str(), args.next()) {
            ("--seconds", Some(n)) => seconds = n.parse().unwrap_or(60),
            ("--seeds", Some(dir)) => dirs.push(PathBuf::from(dir)),
            _ => {
                eprintln!("weir-fuzz-loop: unknown argument {flag:?}");
                return std::process::ExitCode::from(2);
            }
        }
    }
    let seeds = match read_seeds(&dirs) {
        Ok(seeds) => seeds,
        Err(why) => {
            eprintln!("weir-fuzz-loop: {why}");
            return std::process::ExitCode::from(2);
        }
    };
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64)
        | 1;
    let mut rng = Rng(seed);
    // The checks' panics are findings: reported once each, not as a backtrace per input.
    std::panic::set_hook(Box::new(|_| {}));
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let (mut executions, mut failures) = (0u64, Vec::<(String, PathBuf)>::new());
    while Instant::now() < deadline {
        for _ in 0..64 {
            let mut input = if target == "report" && (seeds.is_empty() || rng.chance(2)) {
                random_report(&mut rng)
            } else if seeds.is_empty() {
                Vec::new()
            } else {
                seeds[rng.below(seeds.len())].clone()
            };
            if !rng.chance(4) {
                mutate(&mut rng, &mut input, &seeds);
            }
            executions += 1;
            if let Err(panic) = std::panic::catch_unwind(|| check(&input)) {
                let message = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                    .unwrap_or_default();
                let first_line = message.lines().next().unwrap_or("").to_owned();
                if !failures.iter().any(|(m, _)| *m == first_line) {
                    let path = save(&target, &input);
                    eprintln!(
                        "weir-fuzz-loop {target}: FAILED: {message}\n  input saved as {}",
                        path.display()
                    );
                    failures.push((first_line, path));
                }
            }
        }
    }
    println!(
        "weir-fuzz-loop {target}: {executions} executions in {seconds} s (rng seed {seed:#x}), {} distinct failures",
        failures.len()
    );
    if failures.is_empty() {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    }
}
