//! The P99 accuracy benchmark behind `cargo xtask bench p99`: how far Weir's P99 and Prometheus's
//! `histogram_quantile` over Istio's default buckets are from the exact P99 of the same samples.
//!
//! Latencies are drawn from known distributions with a seeded random source. For each:
//! - **exact**: the nearest-rank P99 of the sorted samples;
//! - **Weir**: the samples are recorded by several simulated Envoys into
//!   [`weir_proto::LatencyHistogram`] (the code the filter records with), sent as weir.v1 reports
//!   (one delta per Envoy per "second", on the wire form) into the controller's real
//!   [`Ingest`], and read back as the canary's window P99, exactly as the streamed metric source
//!   reads it. The Envoys' wire histograms are also merged with `merge_wire` and compared with
//!   one histogram that saw every sample, to show merging loses nothing;
//! - **Prometheus**: the same samples counted into Istio's `istio_request_duration_milliseconds`
//!   buckets, and the P99 taken by [`bucket_quantile`], a line-by-line port of Prometheus's
//!   `histogram_quantile`; unless `--no-prometheus`, the bucket counts are also served to a real
//!   Prometheus server, which is asked `histogram_quantile(0.99, …)`, and its answers are shown
//!   next to the port's (they must agree).
//!
//! A sweep of lognormal cases whose P99 walks through Istio's 250–500 ms and 500–1000 ms buckets
//! then shows when each estimate turns a `request-duration` check's verdict around.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use weir_controller::ingest::{Ingest, IngestConfig};
use weir_proto::latency::slot_of;
use weir_proto::v1::{CanaryRoute, Report, Reporter, Version, VersionStats};
use weir_proto::LatencyHistogram;

use crate::bench_support::{nearest_rank, Machine, Prometheus, Rng, Z99};
use crate::workdir::WorkDir;

/// Istio's default buckets for `istio_request_duration_milliseconds` (ms), without `+Inf`.
pub const ISTIO_BUCKETS_MS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];

/// Target from the issue: Weir's P99 within this relative error of the exact one.
pub const WEIR_TARGET: f64 = 0.01;

/// The quantile compared.
pub const Q: f64 = 0.99;

/// `request-duration` thresholds (ms) the sweep checks verdicts against: Flagger's documented
/// `max 500` and some that are not Istio bucket bounds.
pub const THRESHOLDS_MS: [f64; 4] = [300.0, 400.0, 450.0, 500.0];

/// A latency distribution, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Shape {
    /// Lognormal with this median and log-space standard deviation.
    Lognormal {
        /// Median, ms.
        median_ms: f64,
        /// σ of the logarithm.
        sigma: f64,
    },
    /// Two lognormal modes: most requests fast, `slow_share` of them slow.
    Bimodal {
        /// Median of the fast mode, ms.
        fast_median_ms: f64,
        /// σ of the fast mode.
        fast_sigma: f64,
        /// Share of requests in the slow mode (0..1).
        slow_share: f64,
        /// Median of the slow mode, ms.
        slow_median_ms: f64,
        /// σ of the slow mode.
        slow_sigma: f64,
    },
}

impl Shape {
    /// A lognormal with σ `sigma` whose theoretical P99 is `p99_ms`.
    pub fn lognormal_with_p99(p99_ms: f64, sigma: f64) -> Self {
        Shape::Lognormal {
            median_ms: p99_ms / (sigma * Z99).exp(),
            sigma,
        }
    }

    /// One draw, in whole microseconds (what the filter records), at least 1.
    pub fn draw_micros(&self, rng: &mut Rng) -> u64 {
        let ms = match *self {
            Shape::Lognormal { median_ms, sigma } => rng.lognormal(median_ms, sigma),
            Shape::Bimodal {
                fast_median_ms,
                fast_sigma,
                slow_share,
                slow_median_ms,
                slow_sigma,
            } => {
                if rng.uniform() < slow_share {
                    rng.lognormal(slow_median_ms, slow_sigma)
                } else {
                    rng.lognormal(fast_median_ms, fast_sigma)
                }
            }
        };
        ((ms * 1000.0).round() as u64).max(1)
    }

    /// A short description for the tables.
    pub fn describe(&self) -> String {
        match *self {
            Shape::Lognormal { median_ms, sigma } => {
                format!("lognormal, median {median_ms:.1} ms, σ {sigma}")
            }
            Shape::Bimodal {
                fast_median_ms,
                fast_sigma,
                slow_share,
                slow_median_ms,
                slow_sigma,
            } => format!(
                "{:.0}% lognormal(median {fast_median_ms} ms, σ {fast_sigma}) + {:.0}% lognormal(median {slow_median_ms} ms, σ {slow_sigma})",
                (1.0 - slow_share) * 100.0,
                slow_share * 100.0
            ),
        }
    }
}

/// The distributions of the main table.
pub fn distributions() -> Vec<(&'static str, Shape)> {
    vec![
        // A typical service: P99 around 160 ms, inside Istio's 100–250 ms bucket.
        (
            "lognormal",
            Shape::Lognormal {
                median_ms: 40.0,
                sigma: 0.6,
            },
        ),
        // A fast service with a 2% slow path (cache misses, a slow dependency): P99 falls in the
        // slow mode, inside the 500–1000 ms bucket.
        (
            "bimodal-2pct-slow",
            Shape::Bimodal {
                fast_median_ms: 15.0,
                fast_sigma: 0.35,
                slow_share: 0.02,
                slow_median_ms: 700.0,
                slow_sigma: 0.25,
            },
        ),
        // P99 near 380 ms, inside the 250–500 ms bucket around Flagger's `max 500` threshold.
        ("p99-in-250-500", Shape::lognormal_with_p99(380.0, 0.5)),
        // A fast service: P99 about 4 ms, in the 1–5 ms bucket.
        (
            "fast",
            Shape::Lognormal {
                median_ms: 1.5,
                sigma: 0.4,
            },
        ),
    ]
}

/// The sweep: lognormal cases (σ 0.5) whose theoretical P99 steps through `from..=to` ms.
pub fn sweep(from_ms: u32, to_ms: u32, step_ms: u32) -> Vec<(String, Shape)> {
    (from_ms..=to_ms)
        .step_by(step_ms.max(1) as usize)
        .map(|p99| {
            (
                format!("sweep-{p99}"),
                Shape::lognormal_with_p99(f64::from(p99), 0.5),
            )
        })
        .collect()
}

/// Prometheus's `histogram_quantile` for one classic histogram, ported from `bucketQuantile` in
/// Prometheus's promql/quantile.go (v2.42, the version Debian ships): buckets are sorted by
/// upper bound, the last must be `+Inf`; `rank = q × total`; the first bucket whose cumulative
/// count reaches the rank is found; in the `+Inf` bucket the answer is the second-highest upper
/// bound; otherwise it interpolates linearly between the bucket's bounds (the lowest bucket's
/// lower bound is 0 when its upper bound is positive). `cumulative` holds (le, count) pairs as
/// Prometheus stores them (counts cumulative).
pub fn bucket_quantile(q: f64, cumulative: &[(f64, f64)]) -> f64 {
    if q.is_nan() {
        return f64::NAN;
    }
    if q < 0.0 {
        return f64::NEG_INFINITY;
    }
    if q > 1.0 {
        return f64::INFINITY;
    }
    let mut buckets = cumulative.to_vec();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    if buckets.last().is_none_or(|b| b.0 != f64::INFINITY) {
        return f64::NAN;
    }
    // coalesceBuckets: equal bounds are summed.
    buckets.dedup_by(|later, earlier| {
        if later.0 == earlier.0 {
            earlier.1 += later.1;
            true
        } else {
            false
        }
    });
    // ensureMonotonic: a count below its predecessor's (a scrape caught mid-update) is raised.
    let mut max = f64::NEG_INFINITY;
    for bucket in &mut buckets {
        if bucket.1 > max {
            max = bucket.1;
        } else {
            bucket.1 = max;
        }
    }
    if buckets.len() < 2 {
        return f64::NAN;
    }
    let observations = buckets[buckets.len() - 1].1;
    if observations == 0.0 {
        return f64::NAN;
    }
    let mut rank = q * observations;
    // sort.Search over all but the +Inf bucket: the first index whose count reaches the rank.
    let b = buckets[..buckets.len() - 1].partition_point(|bucket| bucket.1 < rank);
    if b == buckets.len() - 1 {
        return buckets[buckets.len() - 2].0;
    }
    if b == 0 && buckets[0].0 <= 0.0 {
        return buckets[0].0;
    }
    let bucket_end = buckets[b].0;
    let mut count = buckets[b].1;
    let mut bucket_start = 0.0;
    if b > 0 {
        bucket_start = buckets[b - 1].0;
        count -= buckets[b - 1].1;
        rank -= buckets[b - 1].1;
    }
    bucket_start + (bucket_end - bucket_start) * (rank / count)
}

/// Cumulative Istio bucket counts (with `+Inf`) of samples in µs, as Envoy would export them.
pub fn istio_buckets(sorted_micros: &[u64]) -> Vec<(f64, f64)> {
    let mut out: Vec<(f64, f64)> = ISTIO_BUCKETS_MS
        .iter()
        .map(|&le| {
            // Bounds are whole µs (0.5 ms = 500 µs), so the comparison is exact.
            let bound = (le * 1000.0).round() as u64;
            (le, sorted_micros.partition_point(|&v| v <= bound) as f64)
        })
        .collect();
    out.push((f64::INFINITY, sorted_micros.len() as f64));
    out
}

/// The Istio bucket (lower, upper] that holds `ms`.
pub fn istio_bucket_of(ms: f64) -> (f64, f64) {
    let mut lower = 0.0;
    for &le in &ISTIO_BUCKETS_MS {
        if ms <= le {
            return (lower, le);
        }
        lower = le;
    }
    (lower, f64::INFINITY)
}

/// The range of values (µs, inclusive) that Weir's histogram keeps in the same slot as `micros`:
/// a true P99 inside it may come out on either side of a threshold inside it.
pub fn weir_slot_around(micros: u64) -> (u64, u64) {
    let slot = slot_of(micros);
    // slot_of is monotonic: binary-search the first value of the slot and the first past it.
    let first_at_least = |target: usize, mut lo: u64, mut hi: u64| {
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if slot_of(mid) >= target {
                hi = mid;
            } else {
                lo = mid + 1;
            }
        }
        lo
    };
    let first = first_at_least(slot, 0, micros);
    let past = first_at_least(slot + 1, micros, micros.saturating_mul(2).saturating_add(2));
    (first, past - 1)
}

/// What to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// Samples per distribution.
    pub samples: usize,
    /// Simulated Envoys the samples are spread over.
    pub envoys: usize,
    /// Reports (deltas) each Envoy sends.
    pub reports: usize,
    /// The random seed.
    pub seed: u64,
    /// Ask a real Prometheus too.
    pub prometheus: bool,
    /// The sweep: from, to, step (theoretical P99, ms).
    pub sweep: (u32, u32, u32),
}

impl Default for Options {
    fn default() -> Self {
        Self {
            samples: 100_000,
            envoys: 8,
            reports: 10,
            seed: 1,
            prometheus: true,
            sweep: (260, 640, 20),
        }
    }
}

/// Command-line help.
pub const USAGE: &str = "\
usage: cargo xtask bench p99 [--samples N] [--envoys K] [--reports R] [--seed S] [--no-prometheus] [--smoke]

  --samples N       samples per distribution (default 100000)
  --envoys K        simulated Envoys the samples are spread over (default 8)
  --reports R       delta reports per Envoy (default 10)
  --seed S          random seed (default 1)
  --no-prometheus   only the port of Prometheus's histogram_quantile; no real Prometheus
  --smoke           10000 samples, a coarse sweep (what the test suite runs)
";

impl Options {
    /// A quick run for the test suite (a real Prometheus included).
    pub fn smoke() -> Self {
        Self {
            samples: 10_000,
            sweep: (260, 620, 60),
            ..Self::default()
        }
    }

    /// Parses the arguments; `Ok(None)` means help was asked for.
    pub fn parse(args: &[String]) -> Result<Option<Self>, String> {
        let mut options = Options::default();
        let mut args = args.iter();
        while let Some(arg) = args.next() {
            let mut number = |flag: &str| -> Result<u64, String> {
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
                    options.samples = smoke.samples;
                    options.sweep = smoke.sweep;
                }
                "--samples" => options.samples = number("--samples")? as usize,
                "--envoys" => options.envoys = number("--envoys")? as usize,
                "--reports" => options.reports = number("--reports")? as usize,
                "--seed" => options.seed = number("--seed")?,
                "--no-prometheus" => options.prometheus = false,
                other => return Err(format!("unknown argument `{other}`")),
            }
        }
        if options.samples < 100 || options.envoys == 0 || options.reports == 0 {
            return Err(
                "--samples must be at least 100, --envoys and --reports at least 1".to_owned(),
            );
        }
        Ok(Some(options))
    }

    /// The arguments that reproduce these options.
    pub fn to_args(&self) -> String {
        let mut args = if *self == Self::smoke() {
            "--smoke".to_owned()
        } else {
            format!(
                "--samples {} --envoys {} --reports {} --seed {}",
                self.samples, self.envoys, self.reports, self.seed
            )
        };
        if !self.prometheus {
            args.push_str(" --no-prometheus");
        }
        args
    }
}

/// One distribution's result.
#[derive(Debug, Clone, PartialEq)]
pub struct CaseResult {
    /// Its name.
    pub name: String,
    /// What it is.
    pub shape: Shape,
    /// Samples drawn.
    pub samples: usize,
    /// Exact nearest-rank P99, ms.
    pub exact_ms: f64,
    /// Weir's P99 from the ingest's merged window, ms.
    pub weir_ms: f64,
    /// Whether the merged wire histograms equal one histogram of every sample.
    pub merge_exact: bool,
    /// `histogram_quantile` over Istio's buckets (the port), ms.
    pub prometheus_ms: f64,
    /// The real Prometheus's answer, ms (None when not asked).
    pub real_prometheus_ms: Option<f64>,
    /// The cumulative Istio buckets.
    pub buckets: Vec<(f64, f64)>,
}

impl CaseResult {
    /// Weir's relative error (signed).
    pub fn weir_error(&self) -> f64 {
        (self.weir_ms - self.exact_ms) / self.exact_ms
    }

    /// Prometheus's relative error (signed).
    pub fn prometheus_error(&self) -> f64 {
        (self.prometheus_ms - self.exact_ms) / self.exact_ms
    }
}

/// Everything the benchmark produced.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// What was run.
    pub options: Options,
    /// Where.
    pub machine: Machine,
    /// The main distributions.
    pub cases: Vec<CaseResult>,
    /// The sweep through the 250–1000 ms buckets.
    pub sweep: Vec<CaseResult>,
    /// Reports the ingest applied.
    pub reports_applied: u64,
    /// Wall time of the whole run.
    pub elapsed: Duration,
}

fn key_of(name: &str) -> String {
    format!("bench/{name}")
}

/// Draws one case's samples and pushes them through the Envoys' histograms and the ingest.
struct Drawn {
    name: String,
    shape: Shape,
    sorted: Vec<u64>,
    /// Per Envoy, per report: the delta histogram.
    deltas: Vec<Vec<LatencyHistogram>>,
    merge_exact: bool,
}

fn draw(name: &str, shape: Shape, options: &Options, rng: &mut Rng) -> Drawn {
    let mut per_envoy: Vec<Vec<u64>> = vec![Vec::new(); options.envoys];
    let mut everything = LatencyHistogram::new();
    let mut all = Vec::with_capacity(options.samples);
    for _ in 0..options.samples {
        let micros = shape.draw_micros(rng);
        per_envoy[rng.below(options.envoys as u64) as usize].push(micros);
        everything.record(micros);
        all.push(micros);
    }
    // Each Envoy's samples in arrival order, cut into consecutive deltas.
    let deltas: Vec<Vec<LatencyHistogram>> = per_envoy
        .iter()
        .map(|samples| {
            let chunk = samples.len().div_ceil(options.reports).max(1);
            samples
                .chunks(chunk)
                .map(|part| {
                    let mut h = LatencyHistogram::new();
                    part.iter().for_each(|&v| h.record(v));
                    h
                })
                .collect()
        })
        .collect();
    let mut merged = LatencyHistogram::new();
    let merge_exact = deltas.iter().flatten().all(|h| {
        // Through the wire form, as the controller receives it.
        merged.merge_wire(&h.encode()).is_ok()
    }) && merged == everything;
    all.sort_unstable();
    Drawn {
        name: name.to_owned(),
        shape,
        sorted: all,
        deltas,
        merge_exact,
    }
}

/// Sends every case's deltas to `ingest` as weir.v1 reports: report r of Envoy e carries delta r
/// of every case, as one Envoy routing several canaries would.
fn report_all(ingest: &Ingest, cases: &[Drawn], options: &Options, generation: u64, now: Instant) {
    for envoy in 0..options.envoys {
        for report in 0..options.reports {
            let stats: Vec<VersionStats> = cases
                .iter()
                .filter_map(|case| {
                    let delta = case.deltas.get(envoy)?.get(report)?;
                    (!delta.is_empty()).then(|| VersionStats {
                        canary: key_of(&case.name),
                        version: Version::Canary as i32,
                        requests: delta.count(),
                        failures: 0,
                        latency: Some(delta.encode()),
                    })
                })
                .collect();
            let report = Report {
                reporter: Some(Reporter {
                    node_id: format!("bench-envoy-{envoy}"),
                    namespace: "bench".to_owned(),
                    workload: "p99".to_owned(),
                }),
                epoch: envoy as u64 + 1,
                sequence: report as u64 + 1,
                applied_generation: generation,
                stats,
            };
            // A refused report would make Weir's column wrong: the count check below catches it.
            let _ = ingest.ingest(&report, now);
        }
    }
}

fn evaluate(ingest: &Ingest, cases: Vec<Drawn>, now: Instant) -> anyhow::Result<Vec<CaseResult>> {
    cases
        .into_iter()
        .map(|case| {
            let window = ingest
                .window(
                    &key_of(&case.name),
                    Version::Canary,
                    Duration::from_secs(60),
                    now,
                )
                .ok_or_else(|| anyhow!("the ingest does not track {}", case.name))?;
            if window.requests != case.sorted.len() as u64 {
                bail!(
                    "the ingest holds {} samples of {} but {} were reported; reports were refused \
                     (last rejection: {:?})",
                    window.requests,
                    case.name,
                    case.sorted.len(),
                    ingest.counters().last_rejection()
                );
            }
            let exact_micros = nearest_rank(&case.sorted, Q)
                .ok_or_else(|| anyhow!("{} has no samples", case.name))?;
            let buckets = istio_buckets(&case.sorted);
            Ok(CaseResult {
                samples: case.sorted.len(),
                exact_ms: exact_micros as f64 / 1000.0,
                weir_ms: window
                    .p99_ms()
                    .ok_or_else(|| anyhow!("Weir's window of {} has no P99", case.name))?,
                merge_exact: case.merge_exact,
                prometheus_ms: bucket_quantile(Q, &buckets),
                real_prometheus_ms: None,
                buckets,
                name: case.name,
                shape: case.shape,
            })
        })
        .collect()
}

/// The Prometheus text exposition of every case's buckets, as one histogram per case.
pub fn exposition(cases: &[&CaseResult]) -> String {
    let mut out = String::from(
        "# HELP weir_bench_latency_milliseconds Benchmark samples in Istio's default buckets.\n\
         # TYPE weir_bench_latency_milliseconds histogram\n",
    );
    for case in cases {
        for &(le, count) in &case.buckets {
            let le = if le.is_infinite() {
                "+Inf".to_owned()
            } else {
                le.to_string()
            };
            let _ = writeln!(
                out,
                "weir_bench_latency_milliseconds_bucket{{case=\"{}\",le=\"{le}\"}} {count}",
                case.name
            );
        }
        let sum: f64 = case.samples as f64 * case.exact_ms;
        let _ = writeln!(
            out,
            "weir_bench_latency_milliseconds_sum{{case=\"{}\"}} {sum}",
            case.name
        );
        let _ = writeln!(
            out,
            "weir_bench_latency_milliseconds_count{{case=\"{}\"}} {}",
            case.name, case.samples
        );
    }
    out
}

/// Serves `body` as `/metrics` on 127.0.0.1 until the task is aborted.
async fn serve_metrics(body: String) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let body = body.clone();
            tokio::spawn(async move {
                // Read the request head; the answer does not depend on it.
                let mut head = Vec::new();
                let mut chunk = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&chunk[..n]),
                    }
                }
                let response = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\n\
                     Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(response.as_bytes()).await;
            });
        }
    });
    Ok((addr, task))
}

/// Serves the buckets to a real Prometheus, waits for a scrape, and asks it for every case's P99.
async fn ask_prometheus(cases: &[&CaseResult]) -> anyhow::Result<BTreeMap<String, f64>> {
    let dir = WorkDir::new("bench-p99")?;
    let (addr, server) = serve_metrics(exposition(cases)).await?;
    let config = format!(
        "global:\n  scrape_interval: 250ms\n  evaluation_interval: 1s\n\
         scrape_configs:\n  - job_name: bench\n    static_configs:\n      - targets: ['{addr}']\n"
    );
    let result = async {
        let prometheus = Prometheus::start(&config, dir.path()).await?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let seen = prometheus
                .query("weir_bench_latency_milliseconds_count")
                .await?;
            if seen.len() >= cases.len() {
                break;
            }
            if Instant::now() >= deadline {
                bail!(
                    "Prometheus did not scrape the benchmark's /metrics within 30 s:\n{}",
                    prometheus.log_tail(20)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let answers = prometheus
            .query(&format!(
                "histogram_quantile({Q}, weir_bench_latency_milliseconds_bucket)"
            ))
            .await?;
        let by_case: BTreeMap<String, f64> = answers
            .into_iter()
            .filter_map(|(labels, value)| Some((labels["case"].as_str()?.to_owned(), value)))
            .collect();
        Ok(by_case)
    }
    .await;
    server.abort();
    result
}

/// Runs the benchmark.
pub async fn run(options: &Options) -> anyhow::Result<Outcome> {
    let started = Instant::now();
    let machine = Machine::probe();
    let mut rng = Rng::new(options.seed);
    let shapes: Vec<(String, Shape)> = distributions()
        .into_iter()
        .map(|(n, s)| (n.to_owned(), s))
        .collect();
    let (from, to, step) = options.sweep;
    let swept = sweep(from, to, step);

    let drawn_main: Vec<Drawn> = shapes
        .iter()
        .map(|(name, shape)| draw(name, *shape, options, &mut rng))
        .collect();
    let drawn_sweep: Vec<Drawn> = swept
        .iter()
        .map(|(name, shape)| draw(name, *shape, options, &mut rng))
        .collect();

    let ingest = Ingest::try_new(IngestConfig::default())?;
    let generation = ingest
        .publish(
            drawn_main
                .iter()
                .chain(&drawn_sweep)
                .map(|case| CanaryRoute {
                    key: key_of(&case.name),
                    hosts: vec![format!("{}.bench", case.name)],
                    ..Default::default()
                })
                .collect(),
        )
        .map_err(|e| anyhow!("{e}"))?;
    let now = Instant::now();
    let all: Vec<Drawn> = drawn_main.into_iter().chain(drawn_sweep).collect();
    report_all(&ingest, &all, options, generation, now);
    let reports_applied = ingest.counters().snapshot().reports_applied;
    let mut results = evaluate(&ingest, all, now)?;

    if options.prometheus {
        let answers = ask_prometheus(&results.iter().collect::<Vec<_>>())
            .await
            .context("asking a real Prometheus")?;
        for case in &mut results {
            case.real_prometheus_ms = Some(*answers.get(&case.name).ok_or_else(|| {
                anyhow!(
                    "Prometheus returned no histogram_quantile for case {}",
                    case.name
                )
            })?);
        }
    }
    let sweep = results.split_off(shapes.len());
    Ok(Outcome {
        options: options.clone(),
        machine,
        cases: results,
        sweep,
        reports_applied,
        elapsed: started.elapsed(),
    })
}

/// How each estimate decides one threshold over the sweep.
#[derive(Debug, Clone, PartialEq)]
pub struct Flips {
    /// The `request-duration` threshold, ms.
    pub threshold_ms: f64,
    /// Sweep cases whose Prometheus verdict differs from the exact one.
    pub prometheus: Vec<String>,
    /// Sweep cases whose Weir verdict differs from the exact one.
    pub weir: Vec<String>,
}

impl Outcome {
    /// For each threshold, the sweep cases where an estimate's verdict (P99 ≤ threshold passes)
    /// differs from the exact P99's.
    pub fn flips(&self) -> Vec<Flips> {
        THRESHOLDS_MS
            .iter()
            .map(|&threshold_ms| {
                let pass = |ms: f64| ms <= threshold_ms;
                let differs = |f: &dyn Fn(&CaseResult) -> f64| {
                    self.sweep
                        .iter()
                        .filter(|c| pass(f(c)) != pass(c.exact_ms))
                        .map(|c| c.name.clone())
                        .collect()
                };
                Flips {
                    threshold_ms,
                    prometheus: differs(&|c| c.prometheus_ms),
                    weir: differs(&|c| c.weir_ms),
                }
            })
            .collect()
    }

    /// Largest difference between the real Prometheus and the port (None without Prometheus).
    pub fn real_prometheus_disagreement(&self) -> Option<f64> {
        self.cases
            .iter()
            .chain(&self.sweep)
            .map(|c| {
                c.real_prometheus_ms
                    .map(|real| (real - c.prometheus_ms).abs())
            })
            .collect::<Option<Vec<f64>>>()
            .map(|diffs| diffs.into_iter().fold(0.0, f64::max))
    }

    /// The verdicts against the target, one line each.
    pub fn verdicts(&self) -> Vec<String> {
        let mut lines = Vec::new();
        let worst = self
            .cases
            .iter()
            .chain(&self.sweep)
            .max_by(|a, b| a.weir_error().abs().total_cmp(&b.weir_error().abs()));
        if let Some(worst) = worst {
            let error = worst.weir_error().abs();
            let tag = if error <= WEIR_TARGET { "PASS" } else { "MISS" };
            lines.push(format!(
                "{tag}  Weir P99 vs exact, worst of {} distributions: {:.3}% ({}) (target ≤ {:.0}%)",
                self.cases.len() + self.sweep.len(),
                error * 100.0,
                worst.name,
                WEIR_TARGET * 100.0,
            ));
        }
        let merged = self.cases.iter().chain(&self.sweep).all(|c| c.merge_exact);
        lines.push(if merged {
            format!(
                "PASS  merging {} Envoys' wire histograms gives exactly the histogram of all samples, in every case",
                self.options.envoys
            )
        } else {
            "MISS  a merged histogram differs from the histogram of all samples".to_owned()
        });
        match self.real_prometheus_disagreement() {
            Some(d) if d <= 1e-9 => lines.push(format!(
                "PASS  the real Prometheus's histogram_quantile equals the port in every case (max difference {d:.1e} ms)"
            )),
            Some(d) => lines.push(format!(
                "MISS  the real Prometheus's histogram_quantile differs from the port by up to {d} ms"
            )),
            None => lines.push(
                "SKIP  no real Prometheus asked (--no-prometheus): Prometheus figures come from the port"
                    .to_owned(),
            ),
        }
        lines
    }

    /// The report (Markdown).
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "## p99\n");
        out.push_str(
            &self
                .machine
                .render(&format!("cargo xtask bench p99 {}", self.options.to_args())),
        );
        let o = &self.options;
        let _ = writeln!(
            out,
            "- method: {} samples per distribution (seed {}), spread at random over {} simulated \
             Envoys, each recording into weir_proto::LatencyHistogram and sending {} delta \
             reports (wire form) into the controller's Ingest; Weir's P99 is the canary window's \
             `p99_ms()`, as the streamed metric source reads it. Prometheus: the same samples \
             counted into Istio's default `istio_request_duration_milliseconds` buckets, P99 by \
             a port of Prometheus 2.42's bucketQuantile{}. Exact: nearest rank on the sorted \
             samples. Errors are signed, relative to exact.",
            o.samples,
            o.seed,
            o.envoys,
            o.reports,
            if o.prometheus {
                ", cross-checked by a real Prometheus scraping the buckets and answering `histogram_quantile(0.99, …)`"
            } else {
                " (no real Prometheus asked)"
            }
        );
        let _ = writeln!(
            out,
            "- wall time {:.1} s; the ingest applied {} reports\n",
            self.elapsed.as_secs_f64(),
            self.reports_applied
        );
        let _ = writeln!(
            out,
            "| distribution | exact P99 | Weir P99 | Weir error | Prometheus P99 | Prometheus error | \
             Istio bucket | error ratio Prometheus/Weir |"
        );
        let _ = writeln!(out, "|---|---|---|---|---|---|---|---|");
        for c in &self.cases {
            let _ = writeln!(out, "{}", row(c));
        }
        let _ = writeln!(out);
        for c in &self.cases {
            let _ = writeln!(out, "- `{}`: {}", c.name, c.shape.describe());
        }
        let _ = writeln!(
            out,
            "\n### when the error turns a `request-duration` check around\n\n\
             Lognormal cases (σ 0.5) whose theoretical P99 steps from {} to {} ms. A check \
             `thresholdRange: {{max: T}}` passes when P99 ≤ T.\n",
            o.sweep.0, o.sweep.1
        );
        let _ = writeln!(
            out,
            "| case | exact P99 | Weir P99 | Weir error | Prometheus P99 | Prometheus error | Istio bucket | error ratio |"
        );
        let _ = writeln!(out, "|---|---|---|---|---|---|---|---|");
        for c in &self.sweep {
            let _ = writeln!(out, "{}", row(c));
        }
        let _ = writeln!(
            out,
            "\n| threshold T | Prometheus verdict ≠ exact | Weir verdict ≠ exact | Weir can flip only for a true P99 in |"
        );
        let _ = writeln!(out, "|---|---|---|---|");
        for flips in self.flips() {
            let (lo, hi) = weir_slot_around((flips.threshold_ms * 1000.0) as u64);
            let list = |names: &[String]| {
                if names.is_empty() {
                    "none".to_owned()
                } else {
                    names
                        .iter()
                        .filter_map(|n| self.sweep.iter().find(|c| &c.name == n))
                        .map(|c| {
                            format!(
                                "true {:.1} → {:.1} ({})",
                                c.exact_ms,
                                c.prometheus_ms,
                                if c.exact_ms <= flips.threshold_ms {
                                    "false fail"
                                } else {
                                    "false pass"
                                }
                            )
                        })
                        .collect::<Vec<_>>()
                        .join("; ")
                }
            };
            let weir = if flips.weir.is_empty() {
                "none".to_owned()
            } else {
                flips.weir.join(", ")
            };
            let _ = writeln!(
                out,
                "| max {} | {} of {}: {} | {} | {:.3}–{:.3} ms (the HDR slot holding T) |",
                flips.threshold_ms,
                flips.prometheus.len(),
                self.sweep.len(),
                list(&flips.prometheus),
                weir,
                lo as f64 / 1000.0,
                (hi + 1) as f64 / 1000.0,
            );
        }
        let _ = writeln!(
            out,
            "\nA threshold on an Istio bucket bound (500 ms is one) cannot be flipped by \
             histogram_quantile: its estimate stays inside the bucket that holds the true P99, \
             so both sit on the same side of the bound. Any threshold between bounds can be: \
             linear interpolation assumes the bucket's samples are spread evenly, while a tail \
             thins out towards the bucket's top, so the estimate lands above the true P99.\n"
        );
        for line in self.verdicts() {
            let _ = writeln!(out, "{line}");
        }
        out
    }
}

fn row(c: &CaseResult) -> String {
    let (lo, hi) = istio_bucket_of(c.exact_ms);
    let prometheus = match c.real_prometheus_ms {
        Some(real) if (real - c.prometheus_ms).abs() > 1e-9 => {
            format!("{:.1} (real Prometheus: {real:.3})", c.prometheus_ms)
        }
        _ => format!("{:.1}", c.prometheus_ms),
    };
    let ratio = c.prometheus_error().abs() / c.weir_error().abs().max(1e-12);
    let ratio = if c.weir_error() == 0.0 {
        "∞ (Weir exact)".to_owned()
    } else {
        format!("{ratio:.0}×")
    };
    format!(
        "| {} | {:.3} ms | {:.3} ms | {:+.3}% | {} ms | {:+.1}% | {}–{} ms | {} |",
        c.name,
        c.exact_ms,
        c.weir_ms,
        c.weir_error() * 100.0,
        prometheus,
        c.prometheus_error() * 100.0,
        lo,
        hi,
        ratio
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use weir_proto::latency::slot_value;

    fn cumulative(pairs: &[(f64, f64)]) -> Vec<(f64, f64)> {
        pairs.to_vec()
    }

    #[test]
    fn bucket_quantile_interpolates_linearly_inside_the_bucket() {
        // 100 observations: 50 ≤ 1, 40 in (1, 2], 10 in (2, +Inf).
        let b = cumulative(&[(1.0, 50.0), (2.0, 90.0), (f64::INFINITY, 100.0)]);
        assert_eq!(bucket_quantile(0.5, &b), 1.0);
        // rank 70: 20 of the 40 in (1, 2] → halfway.
        assert_eq!(bucket_quantile(0.7, &b), 1.5);
        // rank 25 in the first bucket: from 0 to 1.
        assert_eq!(bucket_quantile(0.25, &b), 0.5);
    }

    #[test]
    fn bucket_quantile_in_the_inf_bucket_is_the_second_highest_bound() {
        let b = cumulative(&[(1.0, 50.0), (2.0, 90.0), (f64::INFINITY, 100.0)]);
        assert_eq!(bucket_quantile(0.99, &b), 2.0);
    }

    #[test]
    fn bucket_quantile_refuses_what_prometheus_refuses() {
        assert!(bucket_quantile(0.5, &cumulative(&[(1.0, 5.0), (2.0, 9.0)])).is_nan());
        assert!(bucket_quantile(0.5, &cumulative(&[(f64::INFINITY, 9.0)])).is_nan());
        assert!(bucket_quantile(0.5, &cumulative(&[(1.0, 0.0), (f64::INFINITY, 0.0)])).is_nan());
        let b = cumulative(&[(1.0, 1.0), (f64::INFINITY, 2.0)]);
        assert_eq!(bucket_quantile(-0.1, &b), f64::NEG_INFINITY);
        assert_eq!(bucket_quantile(1.1, &b), f64::INFINITY);
    }

    #[test]
    fn bucket_quantile_sorts_coalesces_and_repairs_non_monotonic_counts() {
        // Out of order, a duplicate bound, and a count that went down.
        let b = cumulative(&[
            (f64::INFINITY, 100.0),
            (2.0, 40.0),
            (1.0, 50.0),
            (2.0, 50.0),
        ]);
        // After coalescing (2.0 → 90) the same as the first test.
        assert_eq!(bucket_quantile(0.7, &b), 1.5);
        let dip = cumulative(&[(1.0, 50.0), (2.0, 40.0), (f64::INFINITY, 100.0)]);
        // (1, 2] is raised to 50: rank 50 is reached in the first bucket.
        assert_eq!(bucket_quantile(0.5, &dip), 1.0);
    }

    #[test]
    fn bucket_quantile_with_a_non_positive_lowest_bound_returns_it() {
        let b = cumulative(&[(0.0, 10.0), (1.0, 20.0), (f64::INFINITY, 20.0)]);
        assert_eq!(bucket_quantile(0.25, &b), 0.0);
    }

    #[test]
    fn istio_buckets_count_samples_at_or_below_each_bound() {
        let micros = [400, 500, 501, 1_000, 250_000, 250_001, 9_999_999_999];
        let b = istio_buckets(&micros);
        assert_eq!(b[0], (0.5, 2.0));
        assert_eq!(b[1], (1.0, 4.0));
        assert_eq!(b[7], (250.0, 5.0));
        assert_eq!(b[8], (500.0, 6.0));
        assert_eq!(*b.last().unwrap(), (f64::INFINITY, 7.0));
    }

    #[test]
    fn the_istio_bucket_of_a_value_includes_its_upper_bound() {
        assert_eq!(istio_bucket_of(500.0), (250.0, 500.0));
        assert_eq!(istio_bucket_of(500.1), (500.0, 1000.0));
        assert_eq!(istio_bucket_of(0.1), (0.0, 0.5));
        assert_eq!(istio_bucket_of(1e9), (3_600_000.0, f64::INFINITY));
    }

    #[test]
    fn the_weir_slot_around_a_value_holds_it_and_is_about_a_128th_wide() {
        for micros in [1u64, 127, 500_000, 400_000, 123_456] {
            let (lo, hi) = weir_slot_around(micros);
            assert!(lo <= micros && micros <= hi, "{micros}: {lo}..={hi}");
            assert_eq!(slot_of(lo), slot_of(micros));
            assert_eq!(slot_of(hi), slot_of(micros));
            assert_ne!(slot_of(hi + 1), slot_of(micros));
            if lo > 0 {
                assert_ne!(slot_of(lo - 1), slot_of(micros));
            }
            assert!((hi - lo + 1) as f64 <= (micros as f64 / 128.0).max(1.0));
            let middle = slot_value(slot_of(micros));
            assert!(lo as f64 <= middle && middle <= hi as f64);
        }
    }

    #[test]
    fn a_lognormal_built_for_a_p99_has_it() {
        let shape = Shape::lognormal_with_p99(420.0, 0.5);
        let mut rng = Rng::new(3);
        let mut draws: Vec<u64> = (0..100_000).map(|_| shape.draw_micros(&mut rng)).collect();
        draws.sort_unstable();
        let p99 = nearest_rank(&draws, 0.99).unwrap() as f64 / 1000.0;
        assert!((p99 - 420.0).abs() < 10.0, "{p99}");
    }

    #[test]
    fn arguments_choose_samples_and_smoke() {
        let args = |s: &str| s.split_whitespace().map(str::to_owned).collect::<Vec<_>>();
        assert_eq!(Options::parse(&[]), Ok(Some(Options::default())));
        assert_eq!(Options::parse(&args("--smoke")), Ok(Some(Options::smoke())));
        let o = Options::parse(&args("--samples 500 --envoys 3 --no-prometheus"))
            .unwrap()
            .unwrap();
        assert_eq!((o.samples, o.envoys, o.prometheus), (500, 3, false));
        assert!(Options::parse(&args("--samples 5")).is_err());
        assert!(Options::parse(&args("--envoys x")).is_err());
        assert!(Options::parse(&args("--frobnicate")).is_err());
        assert_eq!(Options::parse(&args("-h")), Ok(None));
    }

    #[tokio::test]
    async fn without_prometheus_every_distribution_gets_three_p99s() {
        let options = Options {
            samples: 2_000,
            prometheus: false,
            sweep: (300, 500, 100),
            ..Options::default()
        };
        let outcome = run(&options).await.unwrap();
        assert_eq!(outcome.cases.len(), distributions().len());
        assert_eq!(outcome.sweep.len(), 3);
        for c in outcome.cases.iter().chain(&outcome.sweep) {
            assert_eq!(c.samples, 2_000);
            assert!(c.merge_exact, "{}", c.name);
            assert!(c.weir_error().abs() <= 1.0 / 256.0 + 1e-9, "{c:?}");
            assert!(
                c.prometheus_ms.is_finite() && c.prometheus_ms > 0.0,
                "{c:?}"
            );
        }
        let text = outcome.render();
        assert!(text.contains("| lognormal |"), "{text}");
        assert!(text.contains("SKIP  no real Prometheus"), "{text}");
    }
}
