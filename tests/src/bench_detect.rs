//! The detection benchmark behind `cargo xtask bench detect`: how long after a canary starts
//! failing does the controller halt its analysis, and roll it back, when the numbers come from
//! the filters' streamed reports and when they come from Prometheus.
//!
//! Each run is the real local mode (a real Envoy with the Weir filter, `mirror` processes as the
//! app's versions, the controller's ingest, engine and runner in this process) on an A/B canary:
//! requests with `x-canary: insider` go to the canary, about 20 per second of them, plus some
//! traffic for the primary. Once the analysis has passed a few checks, and after a random extra
//! delay (so the fault lands at a random phase of the report, analysis and scrape cycles), every
//! second canary request asks the app for a 500 (`X-Mirror-Code`): the canary now answers 50%
//! 5xx. We timestamp the first 5xx response the load generator receives, then step the
//! controller until it rolls back, and read the times of the first `Halt … success rate` event
//! and the `Rolling back` event from its journal.
//!
//! - **streamed**: the built-in checks pinned to the filters' reports (`--metric-source
//!   streamed`); the filter reports every `report_interval`;
//! - **prometheus**: the checks pinned to Prometheus (Flagger's Istio queries), a real Prometheus
//!   scraping the app's Istio series (`mirror --istio-metrics`, as a sidecar would publish them)
//!   every `scrape_interval`.
//!
//! Both use the same analysis: interval 1s (the shortest either allows), threshold 5,
//! request-success-rate ≥ 99% over the same window (30s: two scrapes at 15s, the least Flagger's
//! `rate()` queries can work with).

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use tokio::task::JoinHandle;
use weir_controller::local::{LocalMetricsOptions, LocalMode, LocalOptions, RecordedEvent};
use weir_controller::metrics::select::SourcePolicy;
use weir_controller::platform::local::LocalPorts;
use weir_controller::spec::{Phase, Timestamp};

use crate::bench_support::{Machine, Prometheus, Rng};
use crate::binaries;
use crate::http::client;
use crate::workdir::{free_port, WorkDir};

/// Target from the issue: first Halt within this long of the fault on the streamed path.
pub const STREAMED_HALT_TARGET: Duration = Duration::from_secs(2);
/// The header that sends a request to the canary.
pub const MATCH_HEADER: &str = "x-canary";
/// Its value.
pub const MATCH_VALUE: &str = "insider";

/// Where a run's numbers come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricPath {
    /// The filters' reports.
    Streamed,
    /// Prometheus scraping the app's Istio series.
    Prometheus,
}

impl MetricPath {
    /// The name in tables and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            MetricPath::Streamed => "streamed",
            MetricPath::Prometheus => "prometheus",
        }
    }
}

/// What to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// Runs per path.
    pub runs: u32,
    /// The paths, in the order they alternate.
    pub paths: Vec<MetricPath>,
    /// Requests per second that reach the canary.
    pub canary_rate: u32,
    /// Requests per second for the primary (no match header).
    pub primary_rate: u32,
    /// The filter's report interval (streamed path).
    pub report_interval: Duration,
    /// Prometheus's scrape interval (Prometheus path).
    pub scrape_interval: Duration,
    /// The success-rate check's window (`metrics[].interval`), both paths.
    pub window: Duration,
    /// `analysis.threshold`.
    pub threshold: u32,
    /// Passing checks to wait for before the fault.
    pub baseline_checks: u32,
    /// Random seed for the fault's phase.
    pub seed: u64,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            runs: 5,
            paths: vec![MetricPath::Streamed, MetricPath::Prometheus],
            canary_rate: 20,
            primary_rate: 20,
            report_interval: Duration::from_secs(1),
            scrape_interval: Duration::from_secs(15),
            window: Duration::from_secs(30),
            threshold: 5,
            baseline_checks: 3,
            seed: 1,
        }
    }
}

/// Command-line help.
pub const USAGE: &str = "\
usage: cargo xtask bench detect [--runs N] [--path streamed|prometheus]... [--report-interval D]
                                [--scrape-interval D] [--window D] [--threshold N] [--seed S] [--smoke]

  --runs N             runs per path (default 5)
  --path NAME          run only this path (repeatable); default both, alternating
  --report-interval D  the filter's report interval, streamed path (default 1s)
  --scrape-interval D  Prometheus's scrape interval (default 15s)
  --window D           the success-rate check's window, both paths (default 30s)
  --threshold N        analysis.threshold: failed checks before rollback (default 5)
  --seed S             random seed for the fault's phase (default 1)
  --smoke              1 run per path, 1s scrapes and a 4s window (what the test suite runs)
";

fn parse_duration(flag: &str, text: &str) -> Result<Duration, String> {
    weir_controller::spec::parse_go_duration(text)
        .map_err(|e| format!("{flag}: {e}"))
        .and_then(|d| {
            if d.is_zero() {
                Err(format!("{flag} must be longer than zero"))
            } else {
                Ok(d)
            }
        })
}

fn go(d: Duration) -> String {
    weir_controller::spec::format_go_duration(d)
}

impl Options {
    /// A quick run for the test suite: one run of each path, Prometheus scraping every second.
    pub fn smoke() -> Self {
        Self {
            runs: 1,
            scrape_interval: Duration::from_secs(1),
            window: Duration::from_secs(4),
            baseline_checks: 2,
            ..Self::default()
        }
    }

    /// Parses the arguments; `Ok(None)` means help was asked for.
    pub fn parse(args: &[String]) -> Result<Option<Self>, String> {
        let mut options = Options::default();
        let mut paths = Vec::new();
        let mut args = args.iter();
        while let Some(arg) = args.next() {
            let mut value = |flag: &str| -> Result<String, String> {
                args.next()
                    .cloned()
                    .ok_or_else(|| format!("{flag} needs a value"))
            };
            let number = |flag: &str, text: &str| -> Result<u32, String> {
                text.parse()
                    .map_err(|_| format!("{flag} takes a whole number, got `{text}`"))
            };
            match arg.as_str() {
                "-h" | "--help" => return Ok(None),
                "--smoke" => {
                    let keep = options.paths.clone();
                    options = Options::smoke();
                    options.paths = keep;
                }
                "--runs" => options.runs = number("--runs", &value("--runs")?)?,
                "--threshold" => options.threshold = number("--threshold", &value("--threshold")?)?,
                "--seed" => options.seed = u64::from(number("--seed", &value("--seed")?)?),
                "--report-interval" => {
                    options.report_interval =
                        parse_duration("--report-interval", &value("--report-interval")?)?
                }
                "--scrape-interval" => {
                    options.scrape_interval =
                        parse_duration("--scrape-interval", &value("--scrape-interval")?)?
                }
                "--window" => options.window = parse_duration("--window", &value("--window")?)?,
                "--path" => {
                    let name = value("--path")?;
                    paths.push(match name.as_str() {
                        "streamed" => MetricPath::Streamed,
                        "prometheus" => MetricPath::Prometheus,
                        other => {
                            return Err(format!(
                                "unknown path `{other}`: use streamed or prometheus"
                            ))
                        }
                    });
                }
                other => return Err(format!("unknown argument `{other}`")),
            }
        }
        if !paths.is_empty() {
            paths.dedup();
            options.paths = paths;
        }
        if options.runs == 0 || options.threshold == 0 {
            return Err("--runs and --threshold must be at least 1".to_owned());
        }
        Ok(Some(options))
    }

    /// The arguments that reproduce these options.
    pub fn to_args(&self) -> String {
        let mut args = if self.runs == 1
            && self.scrape_interval == Options::smoke().scrape_interval
            && self.window == Options::smoke().window
        {
            "--smoke".to_owned()
        } else {
            format!(
                "--runs {} --report-interval {} --scrape-interval {} --window {} --threshold {} --seed {}",
                self.runs,
                go(self.report_interval),
                go(self.scrape_interval),
                go(self.window),
                self.threshold,
                self.seed
            )
        };
        if self.paths.len() == 1 {
            let _ = write!(args, " --path {}", self.paths[0].name());
        }
        args
    }

    fn canary_yaml(&self) -> String {
        format!(
            r#"apiVersion: weir.dev/v1alpha1
kind: Canary
metadata:
  name: mhs
  namespace: application
spec:
  targetRef:
    apiVersion: apps/v1
    kind: Deployment
    name: mhs
  progressDeadlineSeconds: 300
  service:
    port: 80
    targetPort: 8080
  analysis:
    interval: 1s
    threshold: {threshold}
    iterations: 100000
    match:
    - headers:
        {MATCH_HEADER}:
          exact: {MATCH_VALUE}
    metrics:
    - name: request-success-rate
      thresholdRange: {{min: 99}}
      interval: {window}
"#,
            threshold = self.threshold,
            window = go(self.window),
        )
    }
}

/// One run's measurements.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Which path.
    pub path: MetricPath,
    /// Fault → first `Halt … success rate` event.
    pub halt: Duration,
    /// Fault → `Rolling back` event.
    pub rollback: Duration,
    /// The first Halt's message (it names the numbers).
    pub halt_message: String,
    /// How long after the analysis started the fault began.
    pub fault_after: Duration,
}

/// Everything the benchmark produced.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// What was run.
    pub options: Options,
    /// Where.
    pub machine: Machine,
    /// Every run, in order.
    pub samples: Vec<Sample>,
    /// Wall time.
    pub elapsed: Duration,
}

/// Median, min and max of some durations, in seconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Spread {
    /// Median.
    pub median: f64,
    /// Fastest.
    pub min: f64,
    /// Slowest.
    pub max: f64,
}

impl Spread {
    fn of(values: &[f64]) -> Option<Self> {
        if values.is_empty() {
            return None;
        }
        let mut sorted = values.to_vec();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        let median = if !n.is_multiple_of(2) {
            sorted[n / 2]
        } else {
            (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
        };
        Some(Self {
            median,
            min: sorted[0],
            max: sorted[n - 1],
        })
    }

    fn show(&self) -> String {
        format!("{:.2} s ({:.2} – {:.2})", self.median, self.min, self.max)
    }
}

impl Outcome {
    /// The samples of one path.
    pub fn of(&self, path: MetricPath) -> Vec<&Sample> {
        self.samples.iter().filter(|s| s.path == path).collect()
    }

    /// Median and range of (halt, rollback) for a path.
    pub fn spread(&self, path: MetricPath) -> Option<(Spread, Spread)> {
        let samples = self.of(path);
        let halts: Vec<f64> = samples.iter().map(|s| s.halt.as_secs_f64()).collect();
        let rollbacks: Vec<f64> = samples.iter().map(|s| s.rollback.as_secs_f64()).collect();
        Some((Spread::of(&halts)?, Spread::of(&rollbacks)?))
    }

    /// The verdicts against the issue's target.
    pub fn verdicts(&self) -> Vec<String> {
        let mut lines = Vec::new();
        if let Some((halt, _)) = self.spread(MetricPath::Streamed) {
            let target = STREAMED_HALT_TARGET.as_secs_f64();
            let slowest = halt.max;
            lines.push(if slowest <= target {
                format!(
                    "PASS  streamed: first Halt {:.2} s after the fault (median; slowest {slowest:.2} s) (target ≤ {target:.0} s at a 1 s analysis interval)",
                    halt.median
                )
            } else if halt.median <= target {
                format!(
                    "MISS  streamed: first Halt {:.2} s after the fault (median) but the slowest run took {slowest:.2} s (target ≤ {target:.0} s): over by {:.2} s",
                    halt.median,
                    slowest - target
                )
            } else {
                format!(
                    "MISS  streamed: first Halt {:.2} s after the fault (median; target ≤ {target:.0} s): over by {:.2} s",
                    halt.median,
                    halt.median - target
                )
            });
        }
        if let (Some((sh, sr)), Some((ph, pr))) = (
            self.spread(MetricPath::Streamed),
            self.spread(MetricPath::Prometheus),
        ) {
            lines.push(format!(
                "RATIO Prometheus / streamed, medians: first Halt {:.1}×, rollback {:.1}×",
                ph.median / sh.median.max(1e-9),
                pr.median / sr.median.max(1e-9)
            ));
        }
        lines
    }

    /// The report (Markdown).
    pub fn render(&self) -> String {
        let o = &self.options;
        let mut out = String::new();
        let _ = writeln!(out, "## detect\n");
        out.push_str(
            &self
                .machine
                .render(&format!("cargo xtask bench detect {}", o.to_args())),
        );
        let _ = writeln!(
            out,
            "- method: local mode (real Envoy with the Weir filter, mirror processes, the \
             controller's runner in the bench process), an A/B canary (`{MATCH_HEADER}: \
             {MATCH_VALUE}` → canary) with {} requests/s reaching the canary and {} requests/s \
             for the primary. Analysis: interval 1s, threshold {}, request-success-rate ≥ 99% \
             over {}. After {} passing checks and a random extra delay, every second canary \
             request asks for a 500: the canary answers 50% 5xx. Times run from the first 5xx \
             the load generator receives to the first `Halt … success rate` event and to the \
             `Rolling back` event. streamed: the filters report every {}; prometheus: Flagger's \
             Istio queries on a real Prometheus scraping the app's Istio series every {}. {} \
             run(s) per path, alternating; wall time {:.0} s.\n",
            o.canary_rate,
            o.primary_rate,
            o.threshold,
            go(o.window),
            o.baseline_checks,
            go(o.report_interval),
            go(o.scrape_interval),
            o.runs,
            self.elapsed.as_secs_f64()
        );
        let _ = writeln!(
            out,
            "| path | runs | fault → first Halt, median (min – max) | fault → rollback, median (min – max) |"
        );
        let _ = writeln!(out, "|---|---|---|---|");
        for &path in &o.paths {
            if let Some((halt, rollback)) = self.spread(path) {
                let _ = writeln!(
                    out,
                    "| {} | {} | {} | {} |",
                    path.name(),
                    self.of(path).len(),
                    halt.show(),
                    rollback.show()
                );
            }
        }
        let _ = writeln!(
            out,
            "\nEvery run (fault → Halt, fault → rollback; the first Halt's message):\n"
        );
        for s in &self.samples {
            let _ = writeln!(
                out,
                "- {}: {:.2} s, {:.2} s; `{}`",
                s.path.name(),
                s.halt.as_secs_f64(),
                s.rollback.as_secs_f64(),
                s.halt_message
            );
        }
        let _ = writeln!(out);
        for line in self.verdicts() {
            let _ = writeln!(out, "{line}");
        }
        out
    }
}

/// The workload file: the mirror as `version`, publishing Istio's destination series as the
/// primary (`mhs-primary`, on either primary port) or the canary (`mhs`).
fn mirror_workload(ports: &LocalPorts, version: &str) -> String {
    let quote = |s: &str| serde_json::Value::from(s).to_string();
    let mut args: Vec<String> = [
        "--listen",
        "{address}",
        "--version",
        version,
        "--istio-metrics",
        "--istio-namespace",
        "application",
        "--istio-workload",
        "mhs",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    for port in ports.primary {
        args.push("--istio-workload-for-port".into());
        args.push(format!("{port}=mhs-primary"));
    }
    let args: Vec<String> = args.iter().map(|a| quote(a)).collect();
    format!(
        "command: {}\nargs: [{}]\nreadinessPath: /healthz\n",
        quote(&binaries::mirror().to_string_lossy()),
        args.join(", ")
    )
}

fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// Paced traffic through Envoy: one stream for the canary (with the match header), one for the
/// primary. Each request is its own task, so a slow answer never delays the next.
struct Load {
    fault: Arc<AtomicBool>,
    /// Wall clock (ns since the epoch) of the first 5xx received while the fault is on; 0: none.
    first_bad: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Load {
    fn start(target: SocketAddr, host: &str, canary_rate: u32, primary_rate: u32) -> Self {
        let fault = Arc::new(AtomicBool::new(false));
        let first_bad = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        for (rate, to_canary) in [(canary_rate, true), (primary_rate, false)] {
            if rate == 0 {
                continue;
            }
            let (fault, first_bad, stop) = (fault.clone(), first_bad.clone(), stop.clone());
            let host = host.to_owned();
            tasks.push(tokio::spawn(async move {
                let http = client(64);
                let Ok(uri) = format!("http://{target}/").parse::<http::Uri>() else {
                    return;
                };
                let mut ticker = tokio::time::interval(Duration::from_secs(1) / rate);
                ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    ticker.tick().await;
                    n += 1;
                    let mut request = http::Request::get(uri.clone()).header("host", &host);
                    if to_canary {
                        request = request.header(MATCH_HEADER, MATCH_VALUE);
                    }
                    let faulty = to_canary && fault.load(Ordering::Relaxed) && n.is_multiple_of(2);
                    if faulty {
                        request = request.header("x-mirror-code", "500");
                    }
                    let Ok(request) = request.body(Empty::<Bytes>::new()) else {
                        continue;
                    };
                    let (http, first_bad) = (http.clone(), first_bad.clone());
                    tokio::spawn(async move {
                        let answer =
                            tokio::time::timeout(Duration::from_secs(5), http.request(request))
                                .await;
                        if let Ok(Ok(response)) = answer {
                            let status = response.status();
                            let _ = response.into_body().collect().await;
                            if faulty && status.is_server_error() {
                                let now = unix_nanos(SystemTime::now());
                                let _ = first_bad.compare_exchange(
                                    0,
                                    now,
                                    Ordering::AcqRel,
                                    Ordering::Acquire,
                                );
                            }
                        }
                    });
                }
            }));
        }
        Self {
            fault,
            first_bad,
            stop,
            tasks,
        }
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// One run's running pieces. Dropped in field order: load, local mode (Envoy and the app),
/// Prometheus, then the folder.
struct Stage {
    load: Option<Load>,
    mode: Option<LocalMode>,
    prometheus: Option<Prometheus>,
    workloads: PathBuf,
    ports: LocalPorts,
    dir: WorkDir,
}

impl Stage {
    async fn start(path: MetricPath, options: &Options) -> anyhow::Result<Self> {
        let dir = WorkDir::new(&format!("bench-detect-{}", path.name()))?;
        // The Canary alone in its folder: local mode reads every file beside it as a template.
        let canary_dir = dir.path().join("canary");
        std::fs::create_dir_all(&canary_dir)?;
        let canary = canary_dir.join("canary.yaml");
        std::fs::write(&canary, options.canary_yaml())?;
        let workloads = dir.path().join("workloads");
        std::fs::create_dir_all(&workloads)?;
        let state = dir.path().join("state");
        let ports = LocalPorts::load_or_pick(&state).map_err(anyhow::Error::msg)?;
        std::fs::write(workloads.join("mhs.yaml"), mirror_workload(&ports, "1.0.0"))?;
        let prometheus_port = free_port()?;
        let local_options = LocalOptions {
            canary,
            workloads: workloads.clone(),
            state,
            listen_port: 0,
            envoy: binaries::envoy(),
            wasm: binaries::wasm(),
            report_interval: options.report_interval,
            time_scale: 1,
            echo_events: false,
            filter_install: weir_controller::filter_module::InstallKind::default(),
            envoy_concurrency: 2,
            telemetry_tls: None,
            telemetry_port: 0,
            filters_report_to: None,
        };
        let metrics = match path {
            MetricPath::Streamed => LocalMetricsOptions {
                source: SourcePolicy::Streamed,
                ..LocalMetricsOptions::default()
            },
            MetricPath::Prometheus => LocalMetricsOptions {
                source: SourcePolicy::Prometheus,
                prometheus: Some(format!("http://127.0.0.1:{prometheus_port}")),
                prometheus_timeout: Some(Duration::from_secs(2)),
                ..LocalMetricsOptions::default()
            },
        };
        let mode = LocalMode::start_with(&local_options, &metrics)
            .await
            .context("local mode did not start")?;
        let prometheus = match path {
            MetricPath::Streamed => None,
            MetricPath::Prometheus => {
                let targets = [ports.primary[0], ports.primary[1], ports.canary]
                    .iter()
                    .map(|p| format!("'127.0.0.1:{p}'"))
                    .collect::<Vec<_>>()
                    .join(", ");
                let config = format!(
                    "global:\n  scrape_interval: {scrape}\n  evaluation_interval: {scrape}\n\
                     scrape_configs:\n  - job_name: app\n    metrics_path: /stats/prometheus\n    \
                     static_configs:\n      - targets: [{targets}]\n",
                    scrape = go(options.scrape_interval)
                );
                Some(
                    Prometheus::start_on(&config, &dir.path().join("prometheus"), prometheus_port)
                        .await?,
                )
            }
        };
        Ok(Self {
            load: None,
            mode: Some(mode),
            prometheus,
            workloads,
            ports,
            dir,
        })
    }

    fn mode(&mut self) -> anyhow::Result<&mut LocalMode> {
        self.mode
            .as_mut()
            .ok_or_else(|| anyhow!("local mode was shut down"))
    }

    fn events(&self) -> Vec<RecordedEvent> {
        self.mode.as_ref().map_or_else(Vec::new, |m| {
            m.events().lock().unwrap_or_else(|p| p.into_inner()).clone()
        })
    }

    fn describe(&self) -> String {
        let events: Vec<String> = self
            .events()
            .iter()
            .map(|e| format!("  {} {}: {}", e.time, e.event.reason, e.event.message))
            .collect();
        let status = self
            .mode
            .as_ref()
            .map(|m| serde_json::to_string(m.status()).unwrap_or_default())
            .unwrap_or_default();
        format!(
            "status: {status}\nevents:\n{}\nfolder: {}",
            events.join("\n"),
            self.dir.path().display()
        )
    }

    /// Steps the controller until `done` or `timeout`.
    async fn step_until(
        &mut self,
        what: &str,
        timeout: Duration,
        done: impl Fn(&Self) -> bool,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            self.mode()?.tick().await;
            if done(self) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "timed out after {timeout:?} waiting until {what}\n{}",
                    self.describe()
                );
            }
            let wait = self.mode()?.until_next_step();
            tokio::time::sleep(wait).await;
        }
    }

    async fn shutdown(mut self) {
        self.load.take();
        if let Some(mode) = self.mode.take() {
            mode.shutdown().await;
        }
        self.prometheus.take();
    }

    fn path_of(&self) -> &Path {
        self.dir.path()
    }
}

/// One run of one path.
async fn run_once(path: MetricPath, options: &Options, rng: &mut Rng) -> anyhow::Result<Sample> {
    let mut stage = Stage::start(path, options).await?;
    let result = async {
        stage
            .step_until("the canary is initialized", Duration::from_secs(60), |s| {
                s.mode
                    .as_ref()
                    .is_some_and(|m| m.status().phase == Some(Phase::Initialized))
            })
            .await?;
        let (listener, host) = {
            let mode = stage.mode()?;
            (mode.listener(), mode.host())
        };
        stage.load = Some(Load::start(
            listener,
            &host,
            options.canary_rate,
            options.primary_rate,
        ));
        std::fs::write(
            stage.workloads.join("mhs.yaml"),
            mirror_workload(&stage.ports, "2.0.0"),
        )?;
        let baseline = options.baseline_checks;
        // Prometheus needs two scrapes of canary traffic before any check can pass.
        let patience = Duration::from_secs(60) + options.scrape_interval * 4 + options.window;
        stage
            .step_until(
                &format!("{baseline} passing checks of the new revision"),
                patience,
                |s| {
                    s.mode.as_ref().is_some_and(|m| {
                        m.status().phase == Some(Phase::Progressing)
                            && m.status().iterations > baseline
                    })
                },
            )
            .await?;
        let analysis_started = Instant::now();
        // A random phase against the report, analysis and scrape cycles.
        let cycle = match path {
            MetricPath::Streamed => options.report_interval.max(Duration::from_secs(1)),
            MetricPath::Prometheus => options.scrape_interval,
        };
        let extra = cycle.mul_f64(rng.uniform());
        let until = Instant::now() + extra;
        stage
            .step_until(
                "the fault's random start",
                extra + Duration::from_secs(5),
                |_| Instant::now() >= until,
            )
            .await?;
        let fault_after = analysis_started.elapsed();
        let (fault, first_bad) = match &stage.load {
            Some(load) => (load.fault.clone(), load.first_bad.clone()),
            None => bail!("no load running"),
        };
        fault.store(true, Ordering::Relaxed);
        let timeout = Duration::from_secs(30)
            + options.scrape_interval * 3
            + options.window
            + Duration::from_secs(u64::from(options.threshold) * 2);
        stage
            .step_until("the canary is rolled back", timeout, |s| {
                s.mode
                    .as_ref()
                    .is_some_and(|m| m.status().phase == Some(Phase::Failed))
            })
            .await?;
        fault.store(false, Ordering::Relaxed);
        let first_bad = first_bad.load(Ordering::Acquire);
        if first_bad == 0 {
            bail!(
                "no 5xx reached the load generator, yet the canary was rolled back\n{}",
                stage.describe()
            );
        }
        let fault_at = Timestamp::from_unix_millis(first_bad / 1_000_000);
        let events = stage.events();
        let halt = events
            .iter()
            .find(|e| {
                e.time >= fault_at
                    && e.event.reason == "Halt"
                    && e.event.message.contains("advancement success rate")
            })
            .ok_or_else(|| {
                anyhow!(
                    "rolled back without a `Halt … success rate` event after the fault\n{}",
                    stage.describe()
                )
            })?;
        let rollback = events
            .iter()
            .find(|e| e.time >= fault_at && e.event.reason == "Rollback")
            .ok_or_else(|| {
                anyhow!(
                    "no `Rolling back` event after the fault\n{}",
                    stage.describe()
                )
            })?;
        // Both sides are wall clock; the events' are whole milliseconds.
        let millis = |t: Timestamp| {
            Duration::from_nanos((t.unix_millis() * 1_000_000).saturating_sub(first_bad))
        };
        Ok(Sample {
            path,
            halt: millis(halt.time),
            rollback: millis(rollback.time),
            halt_message: halt.event.message.clone(),
            fault_after,
        })
    }
    .await;
    let kept = stage.path_of().to_owned();
    stage.shutdown().await;
    result.with_context(|| format!("a {} run (files in {})", path.name(), kept.display()))
}

/// Runs the benchmark: `runs` runs of each path, alternating.
pub async fn run(options: &Options) -> anyhow::Result<Outcome> {
    let started = Instant::now();
    let machine = Machine::probe();
    let mut rng = Rng::new(options.seed);
    let mut samples = Vec::new();
    for round in 0..options.runs {
        for &path in &options.paths {
            eprintln!(
                "bench-detect: run {} of {} ({}) …",
                round + 1,
                options.runs,
                path.name()
            );
            let sample = run_once(path, options, &mut rng).await?;
            eprintln!(
                "bench-detect: {}: Halt after {:.2} s, rollback after {:.2} s",
                path.name(),
                sample.halt.as_secs_f64(),
                sample.rollback.as_secs_f64()
            );
            samples.push(sample);
        }
    }
    Ok(Outcome {
        options: options.clone(),
        machine,
        samples,
        elapsed: started.elapsed(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_choose_runs_paths_and_intervals() {
        let args = |s: &str| s.split_whitespace().map(str::to_owned).collect::<Vec<_>>();
        assert_eq!(Options::parse(&[]), Ok(Some(Options::default())));
        let o = Options::parse(&args("--runs 3 --path streamed --report-interval 250ms"))
            .unwrap()
            .unwrap();
        assert_eq!(o.runs, 3);
        assert_eq!(o.paths, [MetricPath::Streamed]);
        assert_eq!(o.report_interval, Duration::from_millis(250));
        let smoke = Options::parse(&args("--path prometheus --smoke"))
            .unwrap()
            .unwrap();
        assert_eq!(smoke.runs, 1);
        assert_eq!(smoke.paths, [MetricPath::Prometheus]);
        assert_eq!(smoke.to_args(), "--smoke --path prometheus");
        assert!(Options::parse(&args("--path carrier-pigeon")).is_err());
        assert!(Options::parse(&args("--window 0s")).is_err());
        assert!(Options::parse(&args("--runs 0")).is_err());
        assert_eq!(Options::parse(&args("--help")), Ok(None));
    }

    #[test]
    fn the_canary_is_an_ab_test_on_the_match_header_with_one_second_steps() {
        let yaml = Options::default().canary_yaml();
        let canary = weir_controller::spec::from_yaml(&yaml).unwrap();
        let compiled = canary.compile().unwrap();
        let plan = compiled.plan;
        assert_eq!(plan.analysis.interval, Duration::from_secs(1));
        assert_eq!(plan.analysis.threshold.get(), 5);
        assert_eq!(plan.analysis.metrics.len(), 1);
        assert_eq!(plan.analysis.metrics[0].window, Duration::from_secs(30));
        assert!(matches!(
            plan.analysis.strategy,
            weir_controller::spec::Strategy::AbTesting { .. }
        ));
    }

    #[test]
    fn spreads_give_the_median_and_the_range() {
        let s = Spread::of(&[3.0, 1.0, 2.0, 10.0]).unwrap();
        assert_eq!((s.median, s.min, s.max), (2.5, 1.0, 10.0));
        assert!(Spread::of(&[]).is_none());
    }
}
