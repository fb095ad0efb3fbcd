//! What the benchmarks share: the command line and exit status of every `bench-<name>` binary,
//! the machine they ran on, a seeded random source, nearest-rank quantiles, `/proc` readings of a
//! process, where the `weir` and `prometheus` binaries are, and a real Prometheus server run as a
//! child process.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};

use crate::binaries::workspace_root;

/// Where and when a benchmark ran.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Machine {
    /// CPUs available to this process (what `nproc` says).
    pub nproc: usize,
    /// The CPU model from /proc/cpuinfo.
    pub cpu_model: String,
    /// `date -u` at the start.
    pub date: String,
    /// The benchmark's own command line.
    pub command: String,
    /// /proc/loadavg (1, 5, 15 minutes) at the start: other work on the machine shows.
    pub load_before: String,
}

impl Machine {
    /// Reads the machine's description now.
    pub fn probe() -> Self {
        let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|info| {
                info.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split_once(':'))
                    .map(|(_, model)| model.trim().to_owned())
            })
            .unwrap_or_else(|| "unknown".to_owned());
        let date = Command::new("date")
            .arg("-u")
            .stdin(Stdio::null())
            .output()
            .ok()
            .filter(|out| out.status.success())
            .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_owned())
            .unwrap_or_else(|| "unknown".to_owned());
        Self {
            nproc: std::thread::available_parallelism().map_or(0, |n| n.get()),
            cpu_model,
            date,
            command: std::env::args().collect::<Vec<_>>().join(" "),
            load_before: load_average(),
        }
    }

    /// The Markdown lines every benchmark prints first.
    pub fn render(&self, command: &str) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "- command: `{command}` (ran `{}`)", self.command);
        let _ = writeln!(out, "- date: {}", self.date);
        let _ = writeln!(
            out,
            "- machine: {} CPUs (nproc), {}; load average (1/5/15 min) {} before, {} after",
            self.nproc,
            self.cpu_model,
            self.load_before,
            load_average()
        );
        out
    }
}

/// The 1, 5 and 15 minute load averages.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".to_owned())
}

/// A small seeded random source (SplitMix64): the same seed gives the same samples on every
/// machine, which a benchmark that compares estimators needs more than statistical finesse.
#[derive(Debug, Clone)]
pub struct Rng {
    state: u64,
}

impl Rng {
    /// A source seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1): never exactly 0, so its logarithm is finite.
    pub fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        // The modulo bias is below 2^-40 for the n used here.
        self.next_u64() % n.max(1)
    }

    /// A standard normal variate (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        let (u1, u2) = (self.uniform(), self.uniform());
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// A lognormal variate with the given median and log-space standard deviation.
    pub fn lognormal(&mut self, median: f64, sigma: f64) -> f64 {
        median * (sigma * self.normal()).exp()
    }
}

/// The standard normal quantile at 0.99, for placing a lognormal's P99.
pub const Z99: f64 = 2.326_347_874_040_841;

/// The nearest-rank `q` quantile of sorted values: the smallest value with at least `q` of the
/// values at or below it (what Weir's histogram estimates).
pub fn nearest_rank<T: Copy>(sorted: &[T], q: f64) -> Option<T> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted.get(rank - 1).copied()
}

/// Nearest-rank quantile of unsorted f64 values (sorts a copy); 0 when empty.
pub fn quantile_of(values: &[f64], q: f64) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    nearest_rank(&sorted, q).unwrap_or(0.0)
}

/// Clock ticks per second for /proc CPU times (`getconf CLK_TCK`, 100 if that fails).
pub fn clock_ticks() -> u64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|out| String::from_utf8_lossy(&out.stdout).trim().parse().ok())
        .filter(|&t| t > 0)
        .unwrap_or(100)
}

/// CPU time (user + system) a process has used so far, in clock ticks.
pub fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("cannot read /proc/{pid}/stat (did the process exit?)"))?;
    // The command name may hold spaces and parentheses: fields start after the last ')'.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .ok_or_else(|| anyhow!("/proc/{pid}/stat has no `)`: {stat}"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat(5); `rest` starts at field 3.
    let field = |n: usize| -> anyhow::Result<u64> {
        fields
            .get(n - 3)
            .and_then(|f| f.parse().ok())
            .ok_or_else(|| anyhow!("/proc/{pid}/stat has no field {n}: {stat}"))
    };
    Ok(field(14)? + field(15)?)
}

/// A `kB` line of /proc/<pid>/status (`VmHWM`, `VmRSS`), in KiB.
pub fn status_kib(pid: u32, key: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("cannot read /proc/{pid}/status (did the process exit?)"))?;
    status
        .lines()
        .find_map(|line| {
            let value = line.strip_prefix(key)?.strip_prefix(':')?;
            value.split_whitespace().next()?.parse().ok()
        })
        .ok_or_else(|| anyhow!("/proc/{pid}/status has no {key} line"))
}

/// The soft limit on open files of this process (from /proc/self/limits).
pub fn open_files_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

fn from_env(var: &str) -> anyhow::Result<Option<PathBuf>> {
    let Some(value) = std::env::var_os(var) else {
        return Ok(None);
    };
    let path = PathBuf::from(value);
    if !path.is_file() {
        bail!(
            "{var}={} does not name a file; point it at the binary or unset it",
            path.display()
        );
    }
    Ok(Some(path))
}

fn on_path(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// The controller binary: `WEIR_BIN`, else the newer of the workspace's release and debug builds.
pub fn weir_binary() -> anyhow::Result<PathBuf> {
    if let Some(path) = from_env("WEIR_BIN")? {
        return Ok(path);
    }
    let target = workspace_root().join("target");
    ["release", "debug"]
        .iter()
        .map(|profile| target.join(profile).join("weir"))
        .filter_map(|p| Some((std::fs::metadata(&p).ok()?.modified().ok()?, p)))
        .max()
        .map(|(_, p)| p)
        .ok_or_else(|| {
            anyhow!(
                "no `weir` binary found: set WEIR_BIN, or build it with `cargo build -p \
                 weir-controller` (`cargo xtask bench` and `cargo xtask test` do both)"
            )
        })
}

/// Prometheus: `WEIR_PROMETHEUS`, else `prometheus` on PATH.
pub fn prometheus_binary() -> anyhow::Result<PathBuf> {
    if let Some(path) = from_env("WEIR_PROMETHEUS")? {
        return Ok(path);
    }
    on_path("prometheus").ok_or_else(|| {
        anyhow!(
            "no Prometheus found: set WEIR_PROMETHEUS, or install Debian's `prometheus` package \
             (`cargo xtask setup` does)"
        )
    })
}

/// A real Prometheus server on 127.0.0.1, killed when dropped.
#[derive(Debug)]
pub struct Prometheus {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
}

impl Prometheus {
    /// Starts Prometheus with `config` (prometheus.yml text) and its data in `dir`, and waits
    /// until it answers `/-/ready`.
    pub async fn start(config: &str, dir: &Path) -> anyhow::Result<Self> {
        Self::start_on(config, dir, crate::workdir::free_port()?).await
    }

    /// [`Prometheus::start`] on a chosen port (for a client configured before it starts).
    pub async fn start_on(config: &str, dir: &Path, port: u16) -> anyhow::Result<Self> {
        let binary = prometheus_binary()?;
        std::fs::create_dir_all(dir)?;
        let config_path = dir.join("prometheus.yml");
        std::fs::write(&config_path, config)?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let log = dir.join("prometheus.log");
        let log_file = std::fs::File::create(&log)?;
        let child = Command::new(&binary)
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .spawn()
            .with_context(|| format!("cannot run {}", binary.display()))?;
        let mut prometheus = Self { child, addr, log };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok((200, _)) = crate::http::get(addr, "/-/ready").await {
                return Ok(prometheus);
            }
            if let Ok(Some(status)) = prometheus.child.try_wait() {
                bail!(
                    "Prometheus exited ({status}) before it was ready:\n{}",
                    prometheus.log_tail(20)
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "Prometheus was not ready within 30 s:\n{}",
                    prometheus.log_tail(20)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Where its HTTP API listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The last `lines` lines of its log.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Evaluates the instant query `expr` now: one (labels, value) per series of the vector.
    pub async fn query(&self, expr: &str) -> anyhow::Result<Vec<(serde_json::Value, f64)>> {
        let path = format!("/api/v1/query?query={}", percent_encode(expr));
        let (status, body) = crate::http::get(self.addr, &path).await?;
        if status != 200 {
            bail!("Prometheus answered {status} to `{expr}`: {body}");
        }
        let json: serde_json::Value = serde_json::from_str(&body)
            .with_context(|| format!("Prometheus answered `{expr}` with non-JSON: {body}"))?;
        let results = json["data"]["result"]
            .as_array()
            .ok_or_else(|| anyhow!("Prometheus answered `{expr}` without data.result: {body}"))?;
        results
            .iter()
            .map(|r| {
                // Values come as strings so that NaN and ±Inf survive JSON.
                let value = r["value"][1]
                    .as_str()
                    .and_then(|v| match v {
                        "NaN" => Some(f64::NAN),
                        "+Inf" => Some(f64::INFINITY),
                        "-Inf" => Some(f64::NEG_INFINITY),
                        v => v.parse().ok(),
                    })
                    .ok_or_else(|| anyhow!("a result of `{expr}` has no value: {r}"))?;
                Ok((r["metric"].clone(), value))
            })
            .collect()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Percent-encodes everything but unreserved characters (RFC 3986), for a query parameter.
pub fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len() * 3);
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-_.~".contains(&byte) {
            out.push(char::from(byte));
        } else {
            let _ = write!(out, "%{byte:02X}");
        }
    }
    out
}

/// The command line every `bench-<name>` binary shares: `Ok(options)`, or the exit code after
/// printing the usage (`--help`: 0) or the problem with it (2).
pub fn parse_args<O>(
    name: &str,
    usage: &str,
    parse: fn(&[String]) -> Result<Option<O>, String>,
) -> Result<O, std::process::ExitCode> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match parse(&args) {
        Ok(Some(options)) => Ok(options),
        Ok(None) => {
            print!("{usage}");
            Err(std::process::ExitCode::SUCCESS)
        }
        Err(problem) => {
            eprintln!("{name}: {problem}\n\n{usage}");
            Err(std::process::ExitCode::from(2))
        }
    }
}

/// Prints a benchmark's outcome. A missed target is a result, not a failure: it is printed and
/// the exit status is 0; only a benchmark that could not run exits 1.
pub fn finish<R>(
    name: &str,
    outcome: anyhow::Result<R>,
    render: fn(&R) -> String,
) -> std::process::ExitCode {
    match outcome {
        Ok(outcome) => {
            println!("{}", render(&outcome));
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{name}: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_draws_and_uniforms_stay_inside_zero_one() {
        let (mut a, mut b) = (Rng::new(7), Rng::new(7));
        for _ in 0..1_000 {
            let (x, y) = (a.uniform(), b.uniform());
            assert_eq!(x, y);
            assert!(x > 0.0 && x < 1.0);
        }
    }

    #[test]
    fn lognormal_draws_have_the_asked_median_and_p99() {
        let mut rng = Rng::new(42);
        let mut draws: Vec<f64> = (0..200_000).map(|_| rng.lognormal(100.0, 0.5)).collect();
        draws.sort_by(f64::total_cmp);
        let median = nearest_rank(&draws, 0.5).unwrap();
        let p99 = nearest_rank(&draws, 0.99).unwrap();
        assert!((median - 100.0).abs() < 1.0, "median {median}");
        let expected = 100.0 * (0.5 * Z99).exp();
        assert!(
            (p99 - expected).abs() / expected < 0.02,
            "p99 {p99} vs {expected}"
        );
    }

    #[test]
    fn nearest_rank_takes_the_smallest_value_covering_the_quantile() {
        let values: Vec<u32> = (1..=100).collect();
        assert_eq!(nearest_rank(&values, 0.99), Some(99));
        assert_eq!(nearest_rank(&values, 0.995), Some(100));
        assert_eq!(nearest_rank(&values, 0.0), Some(1));
        assert_eq!(nearest_rank::<u32>(&[], 0.5), None);
    }

    #[test]
    fn this_process_shows_cpu_time_and_a_peak_rss() {
        let started = Instant::now();
        let mut x = 0u64;
        while started.elapsed() < Duration::from_millis(30) {
            x = x.wrapping_mul(31).wrapping_add(7);
        }
        std::hint::black_box(x);
        let pid = std::process::id();
        assert!(cpu_ticks(pid).unwrap() > 0);
        assert!(status_kib(pid, "VmHWM").unwrap() > 0);
        assert!(status_kib(pid, "NoSuchKey").is_err());
    }

    #[test]
    fn queries_are_percent_encoded() {
        assert_eq!(
            percent_encode("histogram_quantile(0.99, x{le=\"+Inf\"})"),
            "histogram_quantile%280.99%2C%20x%7Ble%3D%22%2BInf%22%7D%29"
        );
    }
}
