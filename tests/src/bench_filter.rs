//! The data-plane cost benchmark behind `cargo xtask bench filter`: what the Weir filter costs
//! Envoy per request, against Envoy with no Wasm filter and Envoy with an empty Wasm filter.
//!
//! One Envoy per variant (each `--concurrency 1`), all routing to the same two mirror upstreams on
//! 127.0.0.1. The Weir Envoys load the real filter, connected to the in-process test control plane,
//! which has sent a directive covering the request host at 50% weight, so every request takes the
//! full path: split, header set, record, hand-over, report. wrk loads one Envoy at a time; the
//! variants alternate round-robin (each round starting one variant later, so no variant always
//! runs first). For every run we read the Envoy's CPU time (utime + stime from `/proc/<pid>/stat`)
//! before and after, and wrk's request count, throughput and p99. Envoy CPU time per request is the
//! headline: it does not depend on how the two cores are shared between wrk, Envoy and the mirrors.
//!
//! The control plane also keeps every report, so we know how many bytes each version's stats take
//! in a report under this load.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use prost::Message;
use serde_json::json;
use tokio::process::Command;
use weir_controller::platform::local::envoy::{
    EnvoyBootstrap, EnvoyProcess, WasmFilter, PRIMARY_VALUE, ROUTING_HEADER,
};
use weir_proto::v1::Directive;

use crate::binaries;
use crate::control_plane::{ControlPlane, Snapshot};
use crate::stack::{self, HOST, PRIMARY_VERSION};
use crate::upstream::Upstream;
use crate::workdir::WorkDir;

/// Target (the stock-Istio issue): Weir filter CPU per covered request at most this many times
/// no filter's.
pub const CPU_RATIO_TARGET: f64 = 1.45;
/// Target (the same issue): a request no canary covers at most this many times the empty Wasm
/// filter's CPU.
pub const UNCOVERED_RATIO_TARGET: f64 = 1.05;
/// Target from the issue: at most this many bytes per version per report.
pub const BYTES_PER_VERSION_TARGET: usize = 1024;
/// The canary weight of the directive the Weir Envoys apply unless told otherwise: 50%, so every
/// request is split and half reach the second upstream.
pub const DEFAULT_WEIGHT_PERCENT: u32 = 50;
/// The Weir filter's report interval in the benchmark: the filter's documented default.
pub const REPORT_INTERVAL: &str = "1s";
/// The host [`Variant::WeirUncovered`] asks for: Envoy routes it (its virtual host matches every
/// domain) but no canary of the directive covers it.
pub const UNCOVERED_HOST: &str = "other.application";
/// wrk's connections (all on one wrk thread).
pub const CONNECTIONS: u32 = 16;

/// One Envoy configuration under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Variant {
    /// Envoy with the router alone: the baseline every ratio divides by.
    NoFilter,
    /// Envoy with the router alone, the client alternating the routing header between primary
    /// and canary: the same 50/50 spread over two upstreams as the Weir filter's split, without a
    /// filter. Shows what the split itself costs Envoy, apart from the filter.
    NoFilterSplit,
    /// Envoy with `weir_empty_filter.wasm`, a filter that does nothing: what any Wasm filter costs.
    EmptyWasm,
    /// Envoy with the Weir filter as shipped (Envoy stats on).
    Weir,
    /// The Weir filter with `"envoyStats": false`: shows what publishing Envoy stats costs.
    WeirNoStats,
    /// The Weir filter, loaded with requests for a host no canary covers: its cost when it only
    /// reads the authority and strips the routing header (no split, no record).
    WeirUncovered,
    /// Another build of the filter (`--candidate PATH`, numbered from 1 in the order given), run
    /// exactly like [`Variant::Weir`]: to weigh a change to the filter against the current build
    /// in the same alternating rounds.
    Candidate(u8),
}

impl Variant {
    /// Every variant, in table order.
    pub const ALL: [Variant; 6] = [
        Variant::NoFilter,
        Variant::NoFilterSplit,
        Variant::EmptyWasm,
        Variant::WeirUncovered,
        Variant::WeirNoStats,
        Variant::Weir,
    ];
    /// The variants run unless others are asked for.
    pub const DEFAULT: [Variant; 3] = [Variant::NoFilter, Variant::EmptyWasm, Variant::Weir];

    /// The name used on the command line and in the tables.
    pub fn name(self) -> String {
        match self {
            Variant::NoFilter => "no-filter".to_owned(),
            Variant::NoFilterSplit => "no-filter-split".to_owned(),
            Variant::EmptyWasm => "empty-wasm".to_owned(),
            Variant::Weir => "weir".to_owned(),
            Variant::WeirNoStats => "weir-nostats".to_owned(),
            Variant::WeirUncovered => "weir-uncovered".to_owned(),
            Variant::Candidate(n) => format!("candidate-{n}"),
        }
    }

    /// The variant with this name.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.name() == name)
    }

    fn is_weir(self) -> bool {
        matches!(
            self,
            Variant::Weir | Variant::WeirNoStats | Variant::WeirUncovered | Variant::Candidate(_)
        )
    }

    /// Whether its requests are split and recorded, so its reports carry stats.
    fn records(self) -> bool {
        self.is_weir() && self != Variant::WeirUncovered
    }

    /// The `Host` wrk sends: the covered service's, except for [`Variant::WeirUncovered`].
    pub fn host(self) -> &'static str {
        match self {
            Variant::WeirUncovered => UNCOVERED_HOST,
            _ => HOST,
        }
    }
}

/// What to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// Rounds; each runs every variant once.
    pub rounds: u32,
    /// Length of each measured run.
    pub seconds: u32,
    /// Unmeasured load per variant before the first round (connections, VM and caches warm).
    pub warmup_seconds: u32,
    /// The variants, no-filter first (always present: it is the baseline).
    pub variants: Vec<Variant>,
    /// The canary weight of the directive, in percent.
    pub weight_percent: u32,
    /// Other builds of the filter to compare, each run as a [`Variant::Candidate`].
    pub candidates: Vec<PathBuf>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            rounds: 5,
            seconds: 3,
            warmup_seconds: 1,
            variants: Variant::DEFAULT.to_vec(),
            weight_percent: DEFAULT_WEIGHT_PERCENT,
            candidates: Vec::new(),
        }
    }
}

const VARIANT_NAMES: &str =
    "no-filter, no-filter-split, empty-wasm, weir, weir-nostats, weir-uncovered or all";

/// Command-line help for the benchmark binary.
pub const USAGE: &str = "\
usage: cargo xtask bench filter [--rounds N] [--seconds S] [--warmup S] [--weight P]
                                [--variant NAME]... [--candidate PATH]... [--smoke]

  --rounds N       rounds, each running every variant once, alternating (default 5)
  --seconds S      length of each measured wrk run (default 3)
  --warmup S       unmeasured load per variant before the first round (default 1)
  --weight P       the directive's canary weight in percent, 0 to 100 (default 50)
  --candidate PATH another build of the filter (.wasm), run like `weir` as candidate-1, -2, ...
                   (repeatable): weighs a change to the filter in the same alternating rounds
  --variant NAME   run this variant (repeatable); no-filter always runs as the baseline.
                   Names: no-filter, no-filter-split, empty-wasm, weir, weir-nostats,
                   weir-uncovered, or `all`.
                   Default: no-filter, empty-wasm, weir
  --smoke          1 round of 1 s, no warm-up (what the test suite runs)
";

impl Options {
    /// A quick run for the test suite: 1 round × 1 s, no warm-up, the default variants.
    pub fn smoke() -> Self {
        Self {
            rounds: 1,
            seconds: 1,
            warmup_seconds: 0,
            variants: Variant::DEFAULT.to_vec(),
            weight_percent: DEFAULT_WEIGHT_PERCENT,
            candidates: Vec::new(),
        }
    }

    /// Parses the benchmark's arguments. `Ok(None)` means help was asked for; the error is a
    /// message for the user.
    pub fn parse(args: &[String]) -> Result<Option<Self>, String> {
        let mut options = Options::default();
        let mut chosen: Vec<Variant> = Vec::new();
        let mut args = args.iter();
        while let Some(arg) = args.next() {
            let mut number = |flag: &str| -> Result<u32, String> {
                let value = args
                    .next()
                    .ok_or_else(|| format!("{flag} needs a number"))?;
                value
                    .parse()
                    .map_err(|_| format!("{flag} takes a whole number, got `{value}`"))
            };
            match arg.as_str() {
                "-h" | "--help" => return Ok(None),
                "--smoke" => {
                    let smoke = Options::smoke();
                    options.rounds = smoke.rounds;
                    options.seconds = smoke.seconds;
                    options.warmup_seconds = smoke.warmup_seconds;
                }
                "--rounds" => options.rounds = number("--rounds")?,
                "--seconds" => options.seconds = number("--seconds")?,
                "--warmup" => options.warmup_seconds = number("--warmup")?,
                "--weight" => options.weight_percent = number("--weight")?,
                "--candidate" => {
                    let path = args.next().ok_or("--candidate needs the path of a .wasm")?;
                    let path = PathBuf::from(path);
                    if !path.is_file() {
                        return Err(format!(
                            "--candidate {}: no such file; build the filter copy with \
                             `--target wasm32-wasip1 --profile wasm` and pass its .wasm",
                            path.display()
                        ));
                    }
                    options.candidates.push(path);
                }
                "--variant" => {
                    let name = args
                        .next()
                        .ok_or_else(|| format!("--variant needs a name: {VARIANT_NAMES}"))?;
                    if name == "all" {
                        chosen.extend(Variant::ALL);
                    } else {
                        chosen.push(Variant::parse(name).ok_or_else(|| {
                            format!("unknown variant `{name}`: use {VARIANT_NAMES}")
                        })?);
                    }
                }
                other => return Err(format!("unknown argument `{other}`")),
            }
        }
        if options.rounds == 0 || options.seconds == 0 {
            return Err("--rounds and --seconds must be at least 1".to_owned());
        }
        if options.weight_percent > 100 {
            return Err(format!(
                "--weight is a percentage, 0 to 100, got {}",
                options.weight_percent
            ));
        }
        if !chosen.is_empty() {
            chosen.push(Variant::NoFilter);
            options.variants = Variant::ALL
                .into_iter()
                .filter(|v| chosen.contains(v))
                .collect();
        }
        if options.candidates.len() > usize::from(u8::MAX) {
            return Err("at most 255 --candidate builds".to_owned());
        }
        for n in 1..=options.candidates.len() {
            // Bounded by the check above.
            options.variants.push(Variant::Candidate(n as u8));
        }
        Ok(Some(options))
    }

    /// What a variant runs, in a sentence for the report.
    pub fn describe(&self, variant: Variant) -> String {
        let weir = format!(
            "the Weir filter (`weir_filter.wasm`, from WEIR_WASM or the wasm build), connected to \
             the in-process test control plane, whose directive covers `{HOST}` at {}% canary \
             weight; reportInterval {REPORT_INTERVAL}",
            self.weight_percent
        );
        match variant {
            Variant::NoFilter => "Envoy with the router alone (the baseline)".to_owned(),
            Variant::NoFilterSplit => format!(
                "no filter; wrk (a Lua script) alternates `{ROUTING_HEADER}: {PRIMARY_VALUE}` \
                 and the canary's value: the same spread over two upstreams as a 50% split"
            ),
            Variant::EmptyWasm => {
                "`weir_empty_filter.wasm` (bench/empty-filter), a proxy-wasm filter that does \
                 nothing"
                    .to_owned()
            }
            Variant::Weir => format!("{weir}; Envoy stats on (the default)"),
            Variant::WeirNoStats => format!("{weir}; `\"envoyStats\": false`"),
            Variant::WeirUncovered => format!(
                "{weir}; but wrk sends `Host: {UNCOVERED_HOST}`, which no canary covers (the \
                 filter only reads the authority and strips the routing header)"
            ),
            Variant::Candidate(n) => format!(
                "`{}`, run like `weir`",
                self.candidates
                    .get(usize::from(n).wrapping_sub(1))
                    .map_or("?".into(), |p| p.display().to_string())
            ),
        }
    }

    /// The arguments that reproduce these options.
    pub fn to_args(&self) -> String {
        let mut args = format!("--rounds {} --seconds {}", self.rounds, self.seconds);
        if self.weight_percent != DEFAULT_WEIGHT_PERCENT {
            let _ = write!(args, " --weight {}", self.weight_percent);
        }
        if self.warmup_seconds != Options::default().warmup_seconds {
            let _ = write!(args, " --warmup {}", self.warmup_seconds);
        }
        let fixed: Vec<Variant> = self
            .variants
            .iter()
            .copied()
            .filter(|v| !matches!(v, Variant::Candidate(_)))
            .collect();
        if fixed != Variant::DEFAULT {
            for variant in &fixed {
                let _ = write!(args, " --variant {}", variant.name());
            }
        }
        for path in &self.candidates {
            let _ = write!(args, " --candidate {}", path.display());
        }
        args
    }
}

/// What wrk said about one run.
#[derive(Debug, Clone, PartialEq)]
pub struct WrkResult {
    /// Requests completed.
    pub requests: u64,
    /// Requests per second.
    pub requests_per_sec: f64,
    /// 99th percentile latency, µs.
    pub p99_us: f64,
    /// Responses that were not 2xx or 3xx.
    pub non_2xx: u64,
    /// Connect, read, write and timeout errors, summed.
    pub socket_errors: u64,
}

/// Parses wrk's output (run with `--latency`).
pub fn parse_wrk(text: &str) -> Result<WrkResult, String> {
    let mut requests = None;
    let mut requests_per_sec = None;
    let mut p99_us = None;
    let mut non_2xx = 0;
    let mut socket_errors = 0;
    for line in text.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("99%") {
            p99_us = parse_wrk_time(rest.trim());
        } else if let Some(rest) = line.strip_prefix("Requests/sec:") {
            requests_per_sec = rest.trim().parse().ok();
        } else if let Some(rest) = line.strip_prefix("Non-2xx or 3xx responses:") {
            non_2xx = rest.trim().parse().unwrap_or(0);
        } else if let Some(rest) = line.strip_prefix("Socket errors:") {
            socket_errors = rest
                .split(',')
                .filter_map(|part| part.split_whitespace().last()?.parse::<u64>().ok())
                .sum();
        } else if line.contains(" requests in ") {
            requests = line.split_whitespace().next().and_then(|n| n.parse().ok());
        }
    }
    let missing = |what: &str| format!("wrk's output has no {what}:\n{text}");
    Ok(WrkResult {
        requests: requests.ok_or_else(|| missing("`N requests in` line"))?,
        requests_per_sec: requests_per_sec.ok_or_else(|| missing("`Requests/sec:` line"))?,
        p99_us: p99_us.ok_or_else(|| missing("`99%` latency (was --latency given?)"))?,
        non_2xx,
        socket_errors,
    })
}

/// A wrk duration (`805.00us`, `1.22ms`, `2.00s`, `1.50m`) in µs.
fn parse_wrk_time(text: &str) -> Option<f64> {
    let split = text.find(|c: char| c.is_ascii_alphabetic())?;
    let (number, unit) = text.split_at(split);
    let value: f64 = number.trim().parse().ok()?;
    let scale = match unit.trim() {
        "us" => 1.0,
        "ms" => 1e3,
        "s" => 1e6,
        "m" => 60e6,
        "h" => 3600e6,
        _ => return None,
    };
    Some(value * scale)
}

/// One measured run of one variant.
#[derive(Debug, Clone, PartialEq)]
pub struct Run {
    /// The variant.
    pub variant: Variant,
    /// The round (0-based).
    pub round: u32,
    /// What wrk measured.
    pub wrk: WrkResult,
    /// Envoy's CPU time during the run, in clock ticks.
    pub cpu: CpuTicks,
    /// The share of the run's upstream requests the canary mirror served (from the mirrors' own
    /// counts): proof that the split happened, or did not.
    pub canary_share: f64,
}

impl Run {
    /// Envoy CPU µs per request (all threads).
    pub fn cpu_us_per_request(&self, ticks_per_sec: u64) -> f64 {
        self.per_request(self.cpu.total, ticks_per_sec)
    }

    /// CPU µs per request of Envoy's worker thread alone (where requests and the filter run; the
    /// rest is the main thread, with the reporter singleton and its gRPC stream).
    pub fn worker_us_per_request(&self, ticks_per_sec: u64) -> f64 {
        self.per_request(self.cpu.workers, ticks_per_sec)
    }

    fn per_request(&self, ticks: u64, ticks_per_sec: u64) -> f64 {
        ticks as f64 * 1e6 / ticks_per_sec as f64 / self.wrk.requests.max(1) as f64
    }
}

/// Where and when the benchmark ran.
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
    /// Clock ticks per second for /proc CPU times.
    pub ticks_per_sec: u64,
    /// True when `getconf CLK_TCK` failed and 100 was assumed.
    pub ticks_assumed: bool,
    /// `envoy --version`, shortened.
    pub envoy_version: String,
    /// /proc/loadavg (1, 5, 15 minutes) before the benchmark: other work on the machine shows.
    pub load_before: String,
    /// /proc/loadavg after the benchmark.
    pub load_after: String,
}

impl Machine {
    async fn probe(envoy: &Path) -> Self {
        let ticks = output("getconf", &["CLK_TCK"])
            .await
            .and_then(|t| t.trim().parse::<u64>().ok())
            .filter(|&t| t > 0);
        let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|info| {
                info.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split_once(':'))
                    .map(|(_, model)| model.trim().to_owned())
            })
            .unwrap_or_else(|| "unknown".to_owned());
        let envoy_version = output(&envoy.display().to_string(), &["--version"])
            .await
            .and_then(|v| {
                // `envoy  version: <sha>/1.40.0/Clean/RELEASE/BoringSSL`: keep the release.
                let build = v.split("version:").nth(1)?.trim().to_owned();
                Some(build.split('/').nth(1).map_or(build.clone(), str::to_owned))
            })
            .unwrap_or_else(|| "unknown".to_owned());
        Machine {
            nproc: std::thread::available_parallelism().map_or(0, |n| n.get()),
            cpu_model,
            date: output("date", &["-u"])
                .await
                .map(|d| d.trim().to_owned())
                .unwrap_or_else(|| "unknown".to_owned()),
            command: std::env::args().collect::<Vec<_>>().join(" "),
            ticks_per_sec: ticks.unwrap_or(100),
            ticks_assumed: ticks.is_none(),
            envoy_version,
            load_before: load_average(),
            load_after: String::new(),
        }
    }
}

/// The 1, 5 and 15 minute load averages.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".to_owned())
}

async fn output(program: &str, args: &[&str]) -> Option<String> {
    let out = tokio::time::timeout(
        Duration::from_secs(10),
        Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .ok()?
    .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The medians of one variant's runs.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    /// The variant.
    pub variant: Variant,
    /// Runs measured.
    pub runs: usize,
    /// Median Envoy CPU µs per request.
    pub cpu_us_per_request: f64,
    /// Median over rounds of this variant's CPU per request ÷ no-filter's in the same round
    /// (None without a no-filter run): steadier than the ratio of medians when the machine's
    /// load drifts.
    pub paired_cpu_ratio: Option<f64>,
    /// Median CPU µs per request of Envoy's worker thread.
    pub worker_us_per_request: f64,
    /// Median share of requests the canary served.
    pub canary_share: f64,
    /// Median requests per second.
    pub requests_per_sec: f64,
    /// Median p99 latency, µs.
    pub p99_us: f64,
    /// Encoded sizes of every `VersionStats` in this variant's reports (Weir variants only).
    pub report_bytes: Vec<usize>,
}

/// Everything one benchmark produced.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// What was run.
    pub options: Options,
    /// Where.
    pub machine: Machine,
    /// Every measured run, in the order they ran.
    pub runs: Vec<Run>,
    /// Encoded size of each `VersionStats` the control plane applied, per Weir variant.
    pub report_bytes: BTreeMap<Variant, Vec<usize>>,
}

impl Outcome {
    /// The runs of one variant.
    pub fn runs_of(&self, variant: Variant) -> impl Iterator<Item = &Run> {
        self.runs.iter().filter(move |r| r.variant == variant)
    }

    /// Medians per variant, in the options' order.
    pub fn summaries(&self) -> Vec<Summary> {
        let ticks = self.machine.ticks_per_sec;
        self.options
            .variants
            .iter()
            .map(|&variant| {
                let runs: Vec<&Run> = self.runs_of(variant).collect();
                let median_of = |f: &dyn Fn(&Run) -> f64| median(runs.iter().map(|r| f(r)));
                let paired: Vec<f64> = runs
                    .iter()
                    .filter_map(|r| {
                        let base = self
                            .runs_of(Variant::NoFilter)
                            .find(|b| b.round == r.round)?;
                        Some(r.cpu_us_per_request(ticks) / base.cpu_us_per_request(ticks))
                    })
                    .collect();
                Summary {
                    variant,
                    runs: runs.len(),
                    cpu_us_per_request: median_of(&|r| r.cpu_us_per_request(ticks)),
                    paired_cpu_ratio: (!paired.is_empty()).then(|| median(paired.into_iter())),
                    worker_us_per_request: median_of(&|r| r.worker_us_per_request(ticks)),
                    canary_share: median_of(&|r| r.canary_share),
                    requests_per_sec: median_of(&|r| r.wrk.requests_per_sec),
                    p99_us: median_of(&|r| r.wrk.p99_us),
                    report_bytes: self.report_bytes.get(&variant).cloned().unwrap_or_default(),
                }
            })
            .collect()
    }

    /// The verdicts against the issue's targets, one line each.
    pub fn verdicts(&self) -> Vec<String> {
        let summaries = self.summaries();
        let find = |v: Variant| summaries.iter().find(|s| s.variant == v);
        let mut lines = Vec::new();
        if let (Some(base), Some(weir)) = (find(Variant::NoFilter), find(Variant::Weir)) {
            let ratio = weir.cpu_us_per_request / base.cpu_us_per_request;
            let mut context = weir
                .paired_cpu_ratio
                .map(|p| format!("; paired by round: {p:.2}×"))
                .unwrap_or_default();
            if let Some(e) = find(Variant::EmptyWasm) {
                let _ = write!(
                    context,
                    "; an empty Wasm filter alone: {:.2}×",
                    e.cpu_us_per_request / base.cpu_us_per_request
                );
            }
            let empty = context;
            lines.push(if ratio <= CPU_RATIO_TARGET {
                format!(
                    "PASS  Weir filter CPU/request {ratio:.2}× no filter (target ≤ {CPU_RATIO_TARGET:.2}×){empty}"
                )
            } else {
                format!(
                    "MISS  Weir filter CPU/request {ratio:.2}× no filter (target ≤ {CPU_RATIO_TARGET:.2}×): over by {:.2}× ({:.1} µs/request more than the target allows){empty}",
                    ratio - CPU_RATIO_TARGET,
                    weir.cpu_us_per_request - CPU_RATIO_TARGET * base.cpu_us_per_request
                )
            });
        }
        if let (Some(empty), Some(uncovered)) =
            (find(Variant::EmptyWasm), find(Variant::WeirUncovered))
        {
            let ratio = uncovered.cpu_us_per_request / empty.cpu_us_per_request;
            lines.push(if ratio <= UNCOVERED_RATIO_TARGET {
                format!(
                    "PASS  uncovered requests {ratio:.2}× the empty Wasm filter (target ≤ {UNCOVERED_RATIO_TARGET:.2}×)"
                )
            } else {
                format!(
                    "MISS  uncovered requests {ratio:.2}× the empty Wasm filter (target ≤ {UNCOVERED_RATIO_TARGET:.2}×): over by {:.2}× ({:.1} µs/request)",
                    ratio - UNCOVERED_RATIO_TARGET,
                    uncovered.cpu_us_per_request - UNCOVERED_RATIO_TARGET * empty.cpu_us_per_request
                )
            });
        }
        if let Some(weir) = find(Variant::Weir) {
            match weir.report_bytes.iter().max() {
                None => lines.push(
                    "MISS  no Weir report carried stats: bytes per version per report unknown"
                        .to_owned(),
                ),
                Some(&max) if max <= BYTES_PER_VERSION_TARGET => lines.push(format!(
                    "PASS  bytes per version per report: max {max} B, median {:.0} B (target ≤ {BYTES_PER_VERSION_TARGET} B)",
                    median(weir.report_bytes.iter().map(|&b| b as f64))
                )),
                Some(&max) => lines.push(format!(
                    "MISS  bytes per version per report: max {max} B (target ≤ {BYTES_PER_VERSION_TARGET} B): over by {} B",
                    max - BYTES_PER_VERSION_TARGET
                )),
            }
        }
        lines
    }

    /// The report: machine, method, the summary table, the verdicts and every run (Markdown).
    pub fn render(&self) -> String {
        let m = &self.machine;
        let o = &self.options;
        let mut out = String::new();
        let _ = writeln!(out, "## filter\n");
        let _ = writeln!(
            out,
            "- command: `cargo xtask bench filter {}` (ran `{}`)",
            o.to_args(),
            m.command
        );
        let _ = writeln!(out, "- date: {}", m.date);
        let _ = writeln!(
            out,
            "- machine: {} CPUs (nproc), {}; Envoy {}; load average (1/5/15 min) {} before, {} \
             after",
            m.nproc, m.cpu_model, m.envoy_version, m.load_before, m.load_after
        );
        let _ = writeln!(
            out,
            "- method: one Envoy per variant, each `--concurrency 1` (one worker thread), all to \
             the same two release-build mirrors on 127.0.0.1; load `wrk -t1 -c{CONNECTIONS} \
             -d{}s --latency -H 'Host: {HOST}'`, one Envoy at a time, {} round(s) × {} variant(s) \
             × {} s alternating (each round starts one variant later), after {} s of unmeasured \
             warm-up per variant",
            o.seconds,
            o.rounds,
            o.variants.len(),
            o.seconds,
            o.warmup_seconds
        );
        let _ = writeln!(out, "- variants:");
        for variant in &o.variants {
            let _ = writeln!(out, "  - `{}`: {}", variant.name(), o.describe(*variant));
        }
        let _ = writeln!(
            out,
            "- CPU: Envoy's utime + stime from /proc/<pid>/stat (all threads; the worker thread \
             alone from /proc/<pid>/task/*/stat) before and after each run, at {} ticks/s ({}); \
             medians over runs; \"paired\" is the median over rounds of the ratio to no-filter's \
             run in the same round\n",
            m.ticks_per_sec,
            if m.ticks_assumed {
                "assumed: `getconf CLK_TCK` failed"
            } else {
                "`getconf CLK_TCK`"
            }
        );

        let summaries = self.summaries();
        let base = summaries.iter().find(|s| s.variant == Variant::NoFilter);
        let ratio = |value: f64, of: fn(&Summary) -> f64| {
            base.map_or("–".to_owned(), |b| format!("{:.2}×", value / of(b)))
        };
        let _ = writeln!(
            out,
            "| variant | runs | Envoy CPU µs/request | × no-filter | paired × | worker thread µs/request | canary share | requests/s | × no-filter | p99 ms | × no-filter | bytes/version/report (median / max) |"
        );
        let _ = writeln!(
            out,
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        );
        for s in &summaries {
            let bytes = if s.report_bytes.is_empty() {
                "–".to_owned()
            } else {
                format!(
                    "{:.0} / {} (n={})",
                    median(s.report_bytes.iter().map(|&b| b as f64)),
                    s.report_bytes.iter().max().copied().unwrap_or(0),
                    s.report_bytes.len()
                )
            };
            let _ = writeln!(
                out,
                "| {} | {} | {:.1} | {} | {} | {:.1} | {:.0}% | {:.0} | {} | {:.2} | {} | {} |",
                s.variant.name(),
                s.runs,
                s.cpu_us_per_request,
                ratio(s.cpu_us_per_request, |b| b.cpu_us_per_request),
                s.paired_cpu_ratio
                    .map_or("–".to_owned(), |p| format!("{p:.2}×")),
                s.worker_us_per_request,
                s.canary_share * 100.0,
                s.requests_per_sec,
                ratio(s.requests_per_sec, |b| b.requests_per_sec),
                s.p99_us / 1e3,
                ratio(s.p99_us, |b| b.p99_us),
                bytes
            );
        }
        let _ = writeln!(out);
        for verdict in self.verdicts() {
            let _ = writeln!(out, "    {verdict}");
        }
        let _ = writeln!(out, "\nEvery run:\n");
        let _ = writeln!(
            out,
            "| round | variant | requests | requests/s | p99 ms | CPU ticks (worker) | CPU µs/request | non-2xx | socket errors |"
        );
        let _ = writeln!(out, "|---:|---|---:|---:|---:|---:|---:|---:|---:|");
        for r in &self.runs {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {:.0} | {:.2} | {} ({}) | {:.1} | {} | {} |",
                r.round + 1,
                r.variant.name(),
                r.wrk.requests,
                r.wrk.requests_per_sec,
                r.wrk.p99_us / 1e3,
                r.cpu.total,
                r.cpu.workers,
                r.cpu_us_per_request(m.ticks_per_sec),
                r.wrk.non_2xx,
                r.wrk.socket_errors
            );
        }
        out
    }
}

/// The median (mean of the middle two for an even count); 0 for none.
pub fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut values: Vec<f64> = values.collect();
    values.sort_by(f64::total_cmp);
    let n = values.len();
    match n {
        0 => 0.0,
        _ if n % 2 == 1 => values[n / 2],
        _ => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// CPU time of a process so far, in clock ticks (user + system).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuTicks {
    /// All threads, as /proc/<pid>/stat counts them.
    pub total: u64,
    /// Envoy's worker threads (named `wrk:worker_N`), from /proc/<pid>/task/*/stat.
    pub workers: u64,
}

impl CpuTicks {
    /// What was used between `earlier` and `self`.
    pub fn since(self, earlier: CpuTicks) -> CpuTicks {
        CpuTicks {
            total: self.total.saturating_sub(earlier.total),
            workers: self.workers.saturating_sub(earlier.workers),
        }
    }
}

/// An Envoy's CPU time so far.
pub fn cpu_ticks(pid: u32) -> anyhow::Result<CpuTicks> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    let (_, total) =
        parse_stat(&stat).ok_or_else(|| anyhow!("{path} has no utime and stime: {stat}"))?;
    let tasks = format!("/proc/{pid}/task");
    let mut workers = 0;
    for task in std::fs::read_dir(&tasks).with_context(|| format!("cannot list {tasks}"))? {
        // A thread may end between the listing and the read: it no longer counts.
        let Ok(stat) = std::fs::read_to_string(task?.path().join("stat")) else {
            continue;
        };
        if let Some((name, ticks)) = parse_stat(&stat) {
            if name.starts_with("wrk:worker") {
                workers += ticks;
            }
        }
    }
    Ok(CpuTicks { total, workers })
}

/// The name and utime + stime of a /proc `stat` line.
fn parse_stat(stat: &str) -> Option<(&str, u64)> {
    // The name (field 2) is in parentheses and may hold spaces or parentheses: split at the last.
    let (head, after) = stat.rsplit_once(')')?;
    let name = head.split_once('(')?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // After the name, field 3 (state) is index 0: utime (field 14) is 11, stime (15) is 12.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((name, utime + stime))
}

/// wrk: `WEIR_WRK`, else `wrk` on PATH.
pub fn wrk_binary() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("WEIR_WRK") {
        let path = PathBuf::from(path);
        if path.is_file() {
            return Ok(path);
        }
        bail!(
            "WEIR_WRK={} does not name a file; point it at wrk or unset it",
            path.display()
        );
    }
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join("wrk"))
                .find(|candidate| candidate.is_file())
        })
        .ok_or_else(|| {
            anyhow!(
                "wrk is not installed (not in WEIR_WRK, not on PATH): `cargo xtask bench filter` \
                 (or `cargo xtask test`) installs it, or run `apt-get install wrk`"
            )
        })
}

/// Builds `weir_empty_filter.wasm` (the `wasm` profile, like the Weir filter) and returns its path.
/// A no-op build when it is fresh.
pub async fn build_empty_filter() -> anyhow::Result<PathBuf> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let build = Command::new(&cargo)
        .args([
            "build",
            "-p",
            "weir-empty-filter",
            "--target",
            "wasm32-wasip1",
            "--profile",
            "wasm",
            "--message-format=json-render-diagnostics",
        ])
        .current_dir(binaries::workspace_root())
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(600), build)
        .await
        .context("building weir-empty-filter took over 10 minutes")?
        .with_context(|| format!("cannot run {}", cargo.to_string_lossy()))?;
    if !out.status.success() {
        bail!(
            "`cargo build -p weir-empty-filter --target wasm32-wasip1 --profile wasm` failed \
             ({}); `cargo xtask setup` installs the wasm32-wasip1 target:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // The artifact message names the file wherever the target directory is.
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|m| {
            m["reason"] == "compiler-artifact" && m["target"]["name"] == "weir_empty_filter"
        })
        .flat_map(|m| {
            m["filenames"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .filter_map(|f| f.as_str().map(PathBuf::from))
        })
        .find(|f| f.extension().is_some_and(|e| e == "wasm"))
        .ok_or_else(|| anyhow!("cargo built weir-empty-filter but named no .wasm artifact"))
}

/// The Weir filter's configuration for a variant.
fn weir_config(variant: Variant) -> String {
    let mut config = stack::filter_config();
    config["reportInterval"] = json!(REPORT_INTERVAL);
    config["envoyStats"] = json!(variant != Variant::WeirNoStats);
    config.to_string()
}

fn node_id(variant: Variant) -> String {
    format!("bench-{}", variant.name())
}

/// The running pieces. Dropped in field order: Envoys first, then upstreams, control plane and the
/// work directory; each kills its process when dropped, also on an error or a panic.
struct Bench {
    envoys: Vec<(Variant, EnvoyProcess)>,
    /// wrk's script for [`Variant::NoFilterSplit`].
    split_script: PathBuf,
    primary: Upstream,
    canary: Upstream,
    control: ControlPlane,
    dir: WorkDir,
}

impl Bench {
    async fn start(options: &Options) -> anyhow::Result<Self> {
        let dir = WorkDir::new("bench-filter")?;
        let primary = Upstream::start(PRIMARY_VERSION, &[])?;
        let canary = Upstream::start(stack::CANARY_VERSION, &[])?;
        let control = ControlPlane::new().await?;
        // Sent before any Envoy connects: each gets it with its first message.
        let generation = control.set_directive(Directive {
            generation: 0,
            canaries: vec![stack::weighted(options.weight_percent * 100)],
        });
        let empty = if options.variants.contains(&Variant::EmptyWasm) {
            Some(build_empty_filter().await?)
        } else {
            None
        };
        let split_script = dir.path().join("split.lua");
        std::fs::write(&split_script, split_script_text())
            .with_context(|| format!("cannot write {}", split_script.display()))?;
        let mut bench = Bench {
            envoys: Vec::new(),
            split_script,
            primary,
            canary,
            control,
            dir,
        };
        for &variant in &options.variants {
            // Every filter is installed as Istio installs a WasmPlugin (discovered, no vm_id).
            let discovery = bench
                .dir
                .path()
                .join(format!("{}.ecds.json", variant.name()));
            let wasm = match variant {
                Variant::NoFilter | Variant::NoFilterSplit => None,
                Variant::EmptyWasm => empty
                    .clone()
                    .map(|path| WasmFilter::wasm_plugin(path, "{}".to_owned(), discovery)),
                Variant::Weir | Variant::WeirNoStats | Variant::WeirUncovered => Some(
                    WasmFilter::wasm_plugin(binaries::wasm(), weir_config(variant), discovery),
                ),
                Variant::Candidate(n) => Some(WasmFilter::wasm_plugin(
                    options.candidates[usize::from(n) - 1].clone(),
                    weir_config(Variant::Weir),
                    discovery,
                )),
            };
            let envoy = bench
                .start_envoy(variant, wasm)
                .await
                .with_context(|| format!("the {} Envoy did not start", variant.name()))?;
            bench.envoys.push((variant, envoy));
        }
        for &(variant, ref envoy) in &bench.envoys {
            if !variant.is_weir() {
                continue;
            }
            let node = node_id(variant);
            bench
                .control
                .wait_for(
                    &format!("{node} to report directive generation {generation} applied"),
                    Duration::from_secs(20),
                    |s| from_node(s, &node).any(|r| r.applied_generation >= generation),
                )
                .await
                .with_context(|| format!("Envoy log:\n{}", envoy.log_tail(40)))?;
        }
        Ok(bench)
    }

    /// Requests served so far by (primary, canary).
    async fn served(&self) -> anyhow::Result<(u64, u64)> {
        Ok((
            self.primary.stats().await?.requests,
            self.canary.stats().await?.requests,
        ))
    }

    async fn start_envoy(
        &self,
        variant: Variant,
        wasm: Option<WasmFilter>,
    ) -> anyhow::Result<EnvoyProcess> {
        let mut bootstrap = EnvoyBootstrap::new(self.primary.addr(), self.canary.addr());
        bootstrap.node_id = node_id(variant);
        bootstrap.namespace = "application".to_owned();
        bootstrap.workload = "mhs".to_owned();
        bootstrap.host = HOST.to_owned();
        // Every variant gets the controller cluster, so bootstraps differ only in the filter.
        bootstrap.controller = Some(self.control.addr());
        bootstrap.wasm = wasm;
        // The routes match the canary's secret value, which the directive gives the filter.
        bootstrap.canary_value = stack::ROUTE_SECRET.to_owned();
        let (binary, work) = (binaries::envoy(), self.dir.path().to_owned());
        Ok(
            tokio::task::spawn_blocking(move || EnvoyProcess::start(&binary, &bootstrap, &work, 1))
                .await??,
        )
    }
}

fn from_node<'a>(
    snapshot: &'a Snapshot,
    node: &'a str,
) -> impl Iterator<Item = &'a weir_proto::v1::Report> + 'a {
    snapshot
        .reports
        .iter()
        .filter(move |r| r.reporter.as_ref().is_some_and(|id| id.node_id == node))
}

/// A wrk script alternating the routing header between the primary and canary values. The two
/// requests are formatted once, so the script adds no work per request beyond picking one.
fn split_script_text() -> String {
    let request = |value: &str| {
        format!(
            r#"wrk.format(nil, nil, {{["Host"] = "{HOST}", ["{ROUTING_HEADER}"] = "{value}"}})"#
        )
    };
    format!(
        "local requests = {{}}\nlocal n = 0\nfunction init(args)\n  requests[0] = {}\n  \
         requests[1] = {}\nend\nfunction request()\n  n = n + 1\n  return requests[n % 2]\nend\n",
        request(PRIMARY_VALUE),
        request(stack::ROUTE_SECRET)
    )
}

/// One wrk run of `variant` against `target`, bounded to its duration plus 30 s; wrk is killed if dropped.
async fn wrk(
    wrk: &Path,
    variant: Variant,
    script: &Path,
    target: SocketAddr,
    seconds: u32,
) -> anyhow::Result<WrkResult> {
    let mut command = Command::new(wrk);
    command.args([
        "-t1".to_owned(),
        format!("-c{CONNECTIONS}"),
        format!("-d{seconds}s"),
        "--latency".to_owned(),
        "-H".to_owned(),
        format!("Host: {}", variant.host()),
    ]);
    if variant == Variant::NoFilterSplit {
        command.arg("-s").arg(script);
    }
    let run = command
        .arg(format!("http://{target}/"))
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let limit = Duration::from_secs(u64::from(seconds) + 30);
    let out = tokio::time::timeout(limit, run)
        .await
        .with_context(|| format!("wrk did not finish within {limit:?}"))?
        .with_context(|| format!("cannot run {}", wrk.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "wrk failed ({}): {}{}",
            out.status,
            text,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    parse_wrk(&text).map_err(|e| anyhow!(e))
}

/// Runs the benchmark. Every process it starts is killed before it returns, also on an error.
pub async fn run(options: &Options) -> anyhow::Result<Outcome> {
    let wrk_bin = wrk_binary()?;
    let mut machine = Machine::probe(&binaries::envoy()).await;
    let bench = Bench::start(options).await?;

    for (variant, envoy) in &bench.envoys {
        if options.warmup_seconds > 0 {
            let (script, addr) = (&bench.split_script, envoy.listener_addr());
            wrk(&wrk_bin, *variant, script, addr, options.warmup_seconds)
                .await
                .with_context(|| format!("warm-up of {}", variant.name()))?;
        }
    }

    let mut runs = Vec::new();
    let count = bench.envoys.len();
    for round in 0..options.rounds {
        for i in 0..count {
            let (variant, envoy) = &bench.envoys[(i + round as usize) % count];
            let served_before = bench.served().await?;
            let before = cpu_ticks(envoy.pid())?;
            let (script, addr) = (&bench.split_script, envoy.listener_addr());
            let wrk = wrk(&wrk_bin, *variant, script, addr, options.seconds)
                .await
                .with_context(|| format!("round {} of {}", round + 1, variant.name()))?;
            let cpu = cpu_ticks(envoy.pid())?.since(before);
            let served = bench.served().await?;
            let primary = served.0.saturating_sub(served_before.0);
            let canary = served.1.saturating_sub(served_before.1);
            runs.push(Run {
                variant: *variant,
                round,
                wrk,
                cpu,
                canary_share: canary as f64 / (primary + canary).max(1) as f64,
            });
        }
    }

    // Let the last run's counts reach the control plane: a hand-over tick and a report tick.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let seen = bench.control.snapshot();
    let mut report_bytes = BTreeMap::new();
    for variant in options.variants.iter().copied().filter(|v| v.records()) {
        let node = node_id(variant);
        let sizes: Vec<usize> = seen
            .applied
            .iter()
            .filter(|r| r.reporter.as_ref().is_some_and(|id| id.node_id == node))
            .flat_map(|r| r.stats.iter().map(Message::encoded_len))
            .collect();
        report_bytes.insert(variant, sizes);
    }
    drop(bench);
    machine.load_after = load_average();
    Ok(Outcome {
        options: options.clone(),
        machine,
        runs,
        report_bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const WRK_OUTPUT: &str = "\
Running 1s test @ http://127.0.0.1:18765/
  1 threads and 16 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.24ms    1.93ms  29.94ms   94.25%
    Req/Sec    16.79k     1.62k   19.47k    50.00%
  Latency Distribution
     50%  805.00us
     75%    1.22ms
     90%    2.08ms
     99%   11.19ms
  16728 requests in 1.00s, 2.04MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 7
Requests/sec:  16667.76
Transfer/sec:      2.03MB
";

    #[test]
    fn wrk_output_gives_requests_throughput_p99_and_errors() {
        let parsed = parse_wrk(WRK_OUTPUT).unwrap();
        assert_eq!(parsed.requests, 16_728);
        assert!((parsed.requests_per_sec - 16_667.76).abs() < 1e-6);
        assert!((parsed.p99_us - 11_190.0).abs() < 1e-6);
        assert_eq!(parsed.non_2xx, 7);
        assert_eq!(parsed.socket_errors, 3);
    }

    #[test]
    fn wrk_output_without_the_latency_distribution_is_refused() {
        let without: String = WRK_OUTPUT
            .lines()
            .filter(|l| !l.trim_start().starts_with("99%"))
            .map(|l| format!("{l}\n"))
            .collect();
        let error = parse_wrk(&without).unwrap_err();
        assert!(error.contains("99%"), "{error}");
    }

    #[test]
    fn wrk_times_convert_to_microseconds() {
        assert_eq!(parse_wrk_time("805.00us"), Some(805.0));
        assert_eq!(parse_wrk_time("1.50ms"), Some(1_500.0));
        assert_eq!(parse_wrk_time("2.00s"), Some(2_000_000.0));
        assert_eq!(parse_wrk_time("12"), None);
    }

    #[test]
    fn proc_stat_of_this_process_has_cpu_ticks() {
        // Burn a little CPU so the count cannot be stale-zero by luck of timing.
        let started = std::time::Instant::now();
        let mut x = 0u64;
        while started.elapsed() < Duration::from_millis(50) {
            x = x.wrapping_mul(31).wrapping_add(7);
        }
        std::hint::black_box(x);
        let ticks = cpu_ticks(std::process::id()).unwrap();
        assert!(ticks.total > 0);
        assert_eq!(
            ticks.workers, 0,
            "a test process has no Envoy worker threads"
        );
    }

    #[test]
    fn stat_lines_give_the_thread_name_even_with_spaces_and_parentheses() {
        let line = "4242 (wrk:worker_0) S 1 2 3 4 5 6 7 8 9 10 120 30 0 0 20 0 9 0 100";
        assert_eq!(parse_stat(line), Some(("wrk:worker_0", 150)));
        let odd = "7 (a (b) c) R 1 2 3 4 5 6 7 8 9 10 5 6 0 0";
        assert_eq!(parse_stat(odd), Some(("a (b) c", 11)));
        assert_eq!(parse_stat("7 (x) R 1 2"), None);
    }

    #[test]
    fn arguments_choose_rounds_seconds_and_variants_with_no_filter_always_in() {
        let args = |s: &str| s.split_whitespace().map(str::to_owned).collect::<Vec<_>>();
        assert_eq!(Options::parse(&[]), Ok(Some(Options::default())));
        let parsed = Options::parse(&args("--rounds 2 --seconds 4 --variant weir-nostats"))
            .unwrap()
            .unwrap();
        assert_eq!((parsed.rounds, parsed.seconds), (2, 4));
        assert_eq!(parsed.variants, [Variant::NoFilter, Variant::WeirNoStats]);
        assert_eq!(
            Options::parse(&args("--variant all"))
                .unwrap()
                .unwrap()
                .variants,
            Variant::ALL
        );
        assert_eq!(
            Options::parse(&args("--smoke")).unwrap().unwrap(),
            Options::smoke()
        );
        assert_eq!(Options::parse(&args("--help")), Ok(None));
        assert!(Options::parse(&args("--rounds x")).is_err());
        assert!(Options::parse(&args("--variant fast")).is_err());
        assert!(Options::parse(&args("--seconds 0")).is_err());
        assert!(Options::parse(&args("--weight 101")).is_err());
        assert!(Options::parse(&args("--candidate /no/such.wasm")).is_err());
        let this_file = concat!(env!("CARGO_MANIFEST_DIR"), "/src/bench_filter.rs");
        let with_candidate = Options::parse(&args(&format!("--candidate {this_file}")))
            .unwrap()
            .unwrap();
        assert_eq!(
            with_candidate.variants,
            [
                Variant::NoFilter,
                Variant::EmptyWasm,
                Variant::Weir,
                Variant::Candidate(1)
            ]
        );
        assert_eq!(Variant::Candidate(1).name(), "candidate-1");
        assert!(with_candidate
            .to_args()
            .ends_with(&format!("--candidate {this_file}")));
        let weighted = Options::parse(&args("--weight 0")).unwrap().unwrap();
        assert_eq!(weighted.weight_percent, 0);
        assert_eq!(weighted.to_args(), "--rounds 5 --seconds 3 --weight 0");
    }

    #[test]
    fn split_script_alternates_the_routing_header_between_primary_and_canary() {
        let script = split_script_text();
        assert!(
            script.contains(r#"["x-weir-route"] = "primary""#),
            "{script}"
        );
        assert!(
            script.contains(&format!(r#"["x-weir-route"] = "{}""#, stack::ROUTE_SECRET)),
            "the canary's requests carry its secret routing value: {script}"
        );
        assert!(
            script.contains(r#"["Host"] = "mhs.application""#),
            "{script}"
        );
        assert!(script.contains("return requests[n % 2]"), "{script}");
    }

    #[test]
    fn median_takes_the_middle_or_the_mean_of_the_middle_two() {
        assert_eq!(median([3.0, 1.0, 2.0].into_iter()), 2.0);
        assert_eq!(median([4.0, 1.0, 2.0, 3.0].into_iter()), 2.5);
        assert_eq!(median(std::iter::empty()), 0.0);
    }

    fn run(variant: Variant, requests: u64, ticks: u64) -> Run {
        Run {
            variant,
            round: 0,
            wrk: WrkResult {
                requests,
                requests_per_sec: requests as f64,
                p99_us: 1_000.0,
                non_2xx: 0,
                socket_errors: 0,
            },
            cpu: CpuTicks {
                total: ticks,
                workers: ticks / 2,
            },
            canary_share: 0.5,
        }
    }

    fn outcome(weir_ticks: u64, max_bytes: usize) -> Outcome {
        Outcome {
            options: Options::default(),
            machine: Machine {
                nproc: 2,
                cpu_model: "test".to_owned(),
                date: "now".to_owned(),
                command: "bench-filter".to_owned(),
                ticks_per_sec: 100,
                ticks_assumed: false,
                envoy_version: "test".to_owned(),
                load_before: "0.1 0.1 0.1".to_owned(),
                load_after: "0.1 0.1 0.1".to_owned(),
            },
            runs: vec![
                run(Variant::NoFilter, 10_000, 100),
                run(Variant::EmptyWasm, 10_000, 116),
                run(Variant::Weir, 10_000, weir_ticks),
            ],
            report_bytes: BTreeMap::from([(Variant::Weir, vec![300, max_bytes])]),
        }
    }

    #[test]
    fn verdicts_pass_within_the_targets_and_say_by_how_much_they_miss() {
        let good = outcome(118, 900).verdicts();
        assert!(
            good[0].starts_with("PASS") && good[0].contains("1.18×"),
            "{good:?}"
        );
        assert!(
            good[1].starts_with("PASS") && good[1].contains("max 900 B"),
            "{good:?}"
        );

        let bad = outcome(156, 1_100).verdicts();
        assert!(
            bad[0].starts_with("MISS") && bad[0].contains("over by 0.11×"),
            "{bad:?}"
        );
        assert!(
            bad[1].starts_with("MISS") && bad[1].contains("over by 76 B"),
            "{bad:?}"
        );
    }

    #[test]
    fn uncovered_requests_are_judged_against_the_empty_filter() {
        let mut o = outcome(118, 900);
        o.options.variants.push(Variant::WeirUncovered);
        o.runs.push(run(Variant::WeirUncovered, 10_000, 120));
        let verdicts = o.verdicts();
        assert!(
            verdicts[1].starts_with("PASS") && verdicts[1].contains("1.03×"),
            "{verdicts:?}"
        );
        let mut o = outcome(118, 900);
        o.options.variants.push(Variant::WeirUncovered);
        o.runs.push(run(Variant::WeirUncovered, 10_000, 128));
        let verdicts = o.verdicts();
        assert!(
            verdicts[1].starts_with("MISS") && verdicts[1].contains("over by 0.05×"),
            "{verdicts:?}"
        );
    }

    #[test]
    fn the_table_shows_cpu_per_request_and_its_ratio_to_no_filter() {
        let text = outcome(131, 900).render();
        assert!(
            text.contains("| weir | 1 | 131.0 | 1.31× | 1.31× | 65.0 | 50% |"),
            "{text}"
        );
        assert!(
            text.contains("| no-filter | 1 | 100.0 | 1.00× | 1.00× | 50.0 |"),
            "{text}"
        );
        assert!(text.contains("| 600 / 900 (n=2) |"), "{text}");
    }
}
