//! The ingest scale benchmark behind `cargo xtask bench ingest`: one controller process against
//! N simulated Envoys.
//!
//! The controller is the real `weir` binary in its `ingest-server` form: the production ingest
//! (accounting, validation, windows, directive fan-out) serving weir.v1 on 127.0.0.1 under a
//! directive of M canaries. The Envoys are gRPC clients in this process, one HTTP/2 connection
//! and one `Exchange` stream each, speaking the filter's protocol: a hello, then one delta report
//! per second (its phase random, as independent Envoys are) carrying both versions of every
//! canary with realistic counts and HDR latency histograms, echoing the directive generation they
//! run. For each N we measure, over a window after warm-up:
//! - controller CPU time (the sum of its threads' run time from `/proc/<pid>/task/*/schedstat`,
//!   nanosecond resolution) per 1,000 reports acknowledged, and in cores (CPU s per wall s);
//! - its peak resident memory (`VmHWM` from `/proc/<pid>/status`);
//! - directive fan-out: the bench asks the controller to publish a new weight (the instant just
//!   before the request is written is the start), each client timestamps the arrival of the new
//!   generation, and we take p50, p99 and max across streams, for several publishes;
//! - the report → ack round trip seen by the clients (whether the controller keeps up), in all
//!   and for the reports sent while a publish is being fanned out.
//!
//! `--baseline <weir>` runs every N against a second `weir` binary too (another build, e.g. the
//! one before a change), alternating, and prints the ratios: both in one run, on the same load.
//!
//! `--storm` ends each N with a reconnect storm: a second controller process starts, the first is
//! killed, and every Envoy reconnects to the second with the filter's own backoff
//! (`weir_filter::reporter::Backoff`: full jitter); we measure the time until every Envoy has the
//! second controller's directive and that controller's peak RSS against the Deployment's limit.
//!
//! `--failover` (with `--relays`) ends each N with a leader change: the leader process is
//! stopped (its streams end, then it prints what its windows counted), a new leader starts on
//! its address (the `weir-leader` Service), the relays and the old leader's Envoys reconnect to
//! it, and each Envoy re-sends what was not acknowledged, as the filter does. We measure the time
//! until every Envoy has the new leader's directive, and account for every request the Envoys
//! generated: counted by the old leader or by the new one, none lost, none twice.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use prost::Message;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::sync::{watch, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Endpoint;
use weir_filter::reporter::Backoff;
use weir_proto::v1::controller_message::Kind;
use weir_proto::v1::telemetry_client::TelemetryClient;
use weir_proto::v1::{Report, Reporter, Version, VersionStats};
use weir_proto::LatencyHistogram;

use crate::bench_support::{
    cpu_ticks, open_files_limit, quantile_of, status_kib, weir_binary, Machine, Rng,
};

/// Target from the issue: controller cores used at 10,000 Envoys.
pub const CORES_TARGET: f64 = 1.0;
/// Target from the issue: controller peak RSS, MiB.
pub const RSS_TARGET_MIB: f64 = 512.0;
/// Target from the issue: directive fan-out p99, ms.
pub const FANOUT_P99_TARGET_MS: f64 = 100.0;
/// The Envoy count the targets are stated for.
pub const TARGET_ENVOYS: usize = 10_000;
/// Target from the issue: report → ack p99 for reports sent during a publish, ms.
pub const ACK_DURING_PUBLISH_P99_TARGET_MS: f64 = 50.0;
/// The controller Deployment's memory limit (manifests/controller.yaml), MiB: what a storm must
/// stay under.
pub const MEMORY_LIMIT_MIB: f64 = 2048.0;
/// Stated bound for a storm: every Envoy served again within this time after its controller was
/// killed, s. The filter's default grace period is 10 s: an Envoy back within it never routed
/// by a stale directive's absence.
pub const STORM_TARGET_SECONDS: f64 = 10.0;

/// What to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// Envoy counts, one run each, in order.
    pub envoys: Vec<usize>,
    /// Canaries in the directive (each report carries 2 versions of each).
    pub canaries: u32,
    /// Requests per second each simulated Envoy routes (per report, both versions of all
    /// canaries together).
    pub requests_per_report: u32,
    /// Measured seconds per N.
    pub seconds: u32,
    /// Unmeasured seconds after every Envoy is connected.
    pub warmup_seconds: u32,
    /// Seconds between directive publishes in the measured window.
    pub publish_every: u32,
    /// Another `weir` binary to run every N against as well, for ratios.
    pub baseline: Option<PathBuf>,
    /// End every N with a reconnect storm onto a second controller.
    pub storm: bool,
    /// Relay processes besides the leader (docs/scale.md): the Envoys are spread over the
    /// leader and the relays, and every figure is given per process.
    pub relays: u32,
    /// End every N with a leader change (needs relays).
    pub failover: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            envoys: vec![100, 1_000, 10_000],
            canaries: 2,
            requests_per_report: 100,
            seconds: 15,
            warmup_seconds: 3,
            publish_every: 3,
            baseline: None,
            storm: false,
            relays: 0,
            failover: false,
        }
    }
}

/// Command-line help.
pub const USAGE: &str = "\
usage: cargo xtask bench ingest [--envoys N[,N...]] [--canaries M] [--rps R] [--seconds S] [--warmup S] [--storm] [--relays K [--failover]] [--baseline WEIR] [--smoke]

  --envoys N,...   simulated Envoys per run, one run each (default 100,1000,10000)
  --canaries M     canaries in the directive; reports carry 2 versions of each (default 2)
  --rps R          requests each Envoy routes per second, spread over its canaries (default 100)
  --seconds S      measured seconds per run (default 15)
  --warmup S       unmeasured seconds once every Envoy is connected (default 3)
  --publish-every S  seconds between directive publishes while measuring (default 3)
  --storm          end each run with a reconnect storm: kill the controller, every Envoy
                   reconnects to a second one with the filter's backoff
  --relays K       K relay processes besides the leader (`weir ingest-server --relay-to`); the
                   Envoys are spread evenly over all K+1, figures are given per process
  --failover       with --relays: end each run with a leader change (the leader stopped, a new
                   one on its address); time until every Envoy has the new directive, and every
                   request accounted for (counted once, by one leader)
  --baseline WEIR  also run each N against this `weir` binary (e.g. a build from before a
                   change), alternating, and print the ratios
  --smoke          50 Envoys, 3 s, with a storm (what the test suite runs)
";

impl Options {
    /// A quick run for the test suite.
    pub fn smoke() -> Self {
        Self {
            envoys: vec![50],
            seconds: 3,
            warmup_seconds: 1,
            publish_every: 1,
            storm: true,
            ..Self::default()
        }
    }

    /// Parses the arguments; `Ok(None)` means help was asked for.
    pub fn parse(args: &[String]) -> Result<Option<Self>, String> {
        let mut options = Options::default();
        let mut args = args.iter();
        while let Some(arg) = args.next() {
            let mut value = |flag: &str| -> Result<&String, String> {
                args.next().ok_or_else(|| format!("{flag} needs a value"))
            };
            let number = |flag: &str, text: &str| -> Result<u32, String> {
                text.trim()
                    .parse()
                    .map_err(|_| format!("{flag} takes a whole number, got `{text}`"))
            };
            match arg.as_str() {
                "-h" | "--help" => return Ok(None),
                "--smoke" => options = Options::smoke(),
                "--envoys" => {
                    options.envoys = value("--envoys")?
                        .split(',')
                        .map(|n| number("--envoys", n).map(|n| n as usize))
                        .collect::<Result<_, _>>()?;
                }
                "--canaries" => options.canaries = number("--canaries", value("--canaries")?)?,
                "--rps" => options.requests_per_report = number("--rps", value("--rps")?)?,
                "--seconds" => options.seconds = number("--seconds", value("--seconds")?)?,
                "--warmup" => options.warmup_seconds = number("--warmup", value("--warmup")?)?,
                "--publish-every" => {
                    options.publish_every = number("--publish-every", value("--publish-every")?)?
                }
                "--storm" => options.storm = true,
                "--relays" => options.relays = number("--relays", value("--relays")?)?,
                "--failover" => options.failover = true,
                "--baseline" => options.baseline = Some(PathBuf::from(value("--baseline")?)),
                other => return Err(format!("unknown argument `{other}`")),
            }
        }
        if options.envoys.is_empty() || options.envoys.contains(&0) {
            return Err("--envoys needs counts of at least 1".to_owned());
        }
        if options.relays > 0 && options.storm {
            return Err("--storm and --relays cannot be combined (yet): run them apart".to_owned());
        }
        if options.failover && options.relays == 0 {
            return Err(
                "--failover changes the leader of relays: give it --relays K (K >= 1)".to_owned(),
            );
        }
        if options.canaries == 0 || options.seconds == 0 || options.publish_every == 0 {
            return Err("--canaries, --seconds and --publish-every must be at least 1".to_owned());
        }
        Ok(Some(options))
    }

    /// The arguments that reproduce these options.
    pub fn to_args(&self) -> String {
        if *self == Self::smoke() {
            return "--smoke".to_owned();
        }
        let mut extra = String::new();
        if self.storm {
            extra.push_str(" --storm");
        }
        if self.relays > 0 {
            let _ = write!(extra, " --relays {}", self.relays);
        }
        if self.failover {
            extra.push_str(" --failover");
        }
        if let Some(baseline) = &self.baseline {
            let _ = write!(extra, " --baseline {}", baseline.display());
        }
        format!(
            "--envoys {} --canaries {} --rps {} --seconds {} --warmup {} --publish-every {}{extra}",
            self.envoys
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(","),
            self.canaries,
            self.requests_per_report,
            self.seconds,
            self.warmup_seconds,
            self.publish_every
        )
    }
}

/// One directive publish and how it reached the streams.
#[derive(Debug, Clone, PartialEq)]
pub struct FanOut {
    /// The generation published.
    pub generation: u64,
    /// Streams that received it within the wait.
    pub received: usize,
    /// Streams that were connected.
    pub streams: usize,
    /// Publish request → receipt, ms: p50, p99, max across the streams that received it.
    pub p50_ms: f64,
    /// p99 across streams, ms.
    pub p99_ms: f64,
    /// The slowest stream, ms.
    pub max_ms: f64,
    /// Controller CPU spent on the publish above its report-only rate just before, ms: what
    /// sending one directive to every stream costs it.
    pub controller_cpu_ms: f64,
    /// The same for this process, the simulated Envoys receiving it, ms: on a machine they
    /// share with the controller, the fan-out waits for both.
    pub envoys_cpu_ms: f64,
}

impl FanOut {
    /// Controller CPU per stream for this publish, µs.
    pub fn controller_us_per_stream(&self) -> f64 {
        self.controller_cpu_ms * 1000.0 / self.streams.max(1) as f64
    }
}

/// A reconnect storm: every Envoy of a killed controller moving to another.
#[derive(Debug, Clone, PartialEq)]
pub struct Storm {
    /// Envoys connected to the first controller when it was killed.
    pub envoys: usize,
    /// Envoys that had the second controller's directive within the wait.
    pub served_again: usize,
    /// Kill → the second controller's directive received, per Envoy, s: p50, p99, max.
    pub p50_s: f64,
    /// p99 across the Envoys, s.
    pub p99_s: f64,
    /// The last Envoy, s.
    pub max_s: f64,
    /// Connection attempts that failed during the storm (each retried after a backoff).
    pub failed_attempts: u64,
    /// The second controller's peak resident set over the storm (and its life), KiB.
    pub vm_hwm_kib: u64,
    /// The second controller's CPU seconds from the kill until every Envoy was back.
    pub cpu_seconds: f64,
}

/// A leader change under load: the leader stopped, a new one on its address.
#[derive(Debug, Clone, PartialEq)]
pub struct Failover {
    /// Envoys connected when the leader was stopped.
    pub envoys: usize,
    /// Envoys that had the new leader's directive within the wait.
    pub served_again: usize,
    /// Stop → the new leader's directive received, per Envoy, s: p50, p99, max.
    pub p50_s: f64,
    /// p99 across the Envoys, s.
    pub p99_s: f64,
    /// The last Envoy, s.
    pub max_s: f64,
    /// Requests in every report the Envoys generated over the whole run (re-sends not counted
    /// again).
    pub generated: u64,
    /// Requests the old leader's windows held when it stopped.
    pub counted_by_old: u64,
    /// Requests the new leader's windows held once every Envoy and relay had its acks.
    pub counted_by_new: u64,
    /// Reports re-sent by Envoys on their new stream (unacknowledged when theirs ended).
    pub resent_reports: u64,
    /// Whether everything was acknowledged within the wait at the end.
    pub drained: bool,
    /// The new leader's peak resident set, KiB.
    pub vm_hwm_kib: u64,
}

impl Failover {
    /// Requests counted by the two leaders together minus those generated: negative when some
    /// were lost, positive when some were counted twice.
    pub fn surplus(&self) -> i128 {
        i128::from(self.counted_by_old) + i128::from(self.counted_by_new)
            - i128::from(self.generated)
    }
}

/// One N's measurements.
#[derive(Debug, Clone, PartialEq)]
pub struct Run {
    /// Which `weir` binary: "current", or "baseline" for `--baseline`.
    pub label: &'static str,
    /// Simulated Envoys asked for.
    pub envoys: usize,
    /// Envoys whose stream was open and had its first directive.
    pub connected: usize,
    /// Why some did not connect (the first error seen), if any did not.
    pub connect_error: Option<String>,
    /// Seconds it took to connect them all.
    pub connect_seconds: f64,
    /// Length of the measured window, s.
    pub measured_seconds: f64,
    /// Reports acknowledged in the window.
    pub reports: u64,
    /// Streams that ended with an error during the run.
    pub stream_errors: u64,
    /// Controller CPU seconds in the window (all threads).
    pub cpu_seconds: f64,
    /// Controller CPU seconds in the window from /proc/<pid>/stat (clock ticks), a cross-check.
    pub cpu_seconds_ticks: f64,
    /// Controller peak resident set, KiB.
    pub vm_hwm_kib: u64,
    /// Controller resident set at the end of the window, KiB.
    pub vm_rss_kib: u64,
    /// This process's (the simulated Envoys') CPU seconds in the window.
    pub bench_cpu_seconds: f64,
    /// Every publish in the window.
    pub fanouts: Vec<FanOut>,
    /// Report → ack round trip, ms: p50 and p99.
    pub ack_rtt_ms: (f64, f64),
    /// The same for reports sent while a publish was being fanned out, ms: p50 and p99.
    pub ack_rtt_publishing_ms: (f64, f64),
    /// Mean encoded report size, bytes.
    pub report_bytes: usize,
    /// The reconnect storm at the end (`--storm`).
    pub storm: Option<Storm>,
    /// The leader change at the end (`--failover`).
    pub failover: Option<Failover>,
    /// With `--relays`: every process's own figures, the leader first.
    pub processes: Vec<ProcessFigures>,
}

/// One controller process's figures in a run with relays.
#[derive(Debug, Clone, PartialEq)]
pub struct ProcessFigures {
    /// "leader" or "relay N".
    pub role: String,
    /// Envoys connected to it directly.
    pub envoys: usize,
    /// Its CPU seconds in the measured window.
    pub cpu_seconds: f64,
    /// Its peak resident set, KiB.
    pub vm_hwm_kib: u64,
    /// Reporters the leader's ledger holds (Envoys and relays); for a relay, its own Envoys.
    pub reporters_known: u64,
}

impl Run {
    /// Controller CPU seconds per 1,000 reports.
    pub fn cpu_per_1000_reports(&self) -> f64 {
        self.cpu_seconds * 1000.0 / self.reports.max(1) as f64
    }

    /// Controller cores in use (CPU seconds per wall second).
    pub fn cores(&self) -> f64 {
        self.cpu_seconds / self.measured_seconds.max(1e-9)
    }

    /// Reports acknowledged per second.
    pub fn reports_per_second(&self) -> f64 {
        self.reports as f64 / self.measured_seconds.max(1e-9)
    }

    /// The worst fan-out p99 over the publishes, ms (None without a complete publish).
    pub fn worst_fanout_p99_ms(&self) -> Option<f64> {
        self.fanouts.iter().map(|f| f.p99_ms).max_by(f64::total_cmp)
    }

    /// The median over the publishes of their fan-out p99, ms.
    pub fn median_fanout_p99_ms(&self) -> f64 {
        let p99s: Vec<f64> = self.fanouts.iter().map(|f| f.p99_ms).collect();
        quantile_of(&p99s, 0.5)
    }

    /// The median over the publishes of the controller's CPU per stream, µs.
    pub fn median_us_per_stream(&self) -> f64 {
        let per_stream: Vec<f64> = self
            .fanouts
            .iter()
            .map(FanOut::controller_us_per_stream)
            .collect();
        quantile_of(&per_stream, 0.5)
    }
}

/// Everything the benchmark produced.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// What was run.
    pub options: Options,
    /// Where.
    pub machine: Machine,
    /// One per N.
    pub runs: Vec<Run>,
}

/// The controller process (`weir ingest-server`), killed when dropped.
struct Controller {
    child: Child,
    stdin: ChildStdin,
    stdout: Lines<BufReader<ChildStdout>>,
    addr: SocketAddr,
    pid: u32,
}

impl Controller {
    /// Starts `binary`'s ingest server for `envoys` Envoys: its connection and ledger limits
    /// are raised to fit them when the binary takes them (the defaults suit one replica of the
    /// Deployment; a bench at 10,000 is a deployment sized for them), else left as they are.
    async fn start(binary: &Path, canaries: u32, envoys: usize) -> anyhow::Result<Self> {
        Self::start_with(binary, canaries, envoys, &[]).await
    }

    /// [`Controller::start`] with more arguments (a relay's, or `--listen`).
    async fn start_with(
        binary: &Path,
        canaries: u32,
        envoys: usize,
        extra: &[String],
    ) -> anyhow::Result<Self> {
        let mut args = vec!["ingest-server".to_owned()];
        if !extra.iter().any(|a| a == "--listen") {
            args.extend(["--listen".to_owned(), "127.0.0.1:0".to_owned()]);
        }
        args.extend(["--canaries".to_owned(), canaries.to_string()]);
        if takes_limits(binary).await {
            let room = (envoys + 64).to_string();
            args.extend(["--max-connections".to_owned(), room.clone()]);
            args.extend(["--max-reporters".to_owned(), room]);
        }
        args.extend(extra.iter().cloned());
        let mut child = Command::new(binary)
            .args(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot run {}", binary.display()))?;
        let pid = child
            .id()
            .ok_or_else(|| anyhow!("the controller exited at once"))?;
        let stdin = child.stdin.take().ok_or_else(|| anyhow!("no stdin pipe"))?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| anyhow!("no stdout pipe"))?;
        let mut stdout = BufReader::new(stdout).lines();
        let first = tokio::time::timeout(Duration::from_secs(20), stdout.next_line())
            .await
            .context("`weir ingest-server` printed no address within 20 s")??
            .ok_or_else(|| {
                anyhow!(
                    "`{} ingest-server` exited without printing its address (a `weir` built \
                     before the ingest-server command? rebuild it)",
                    binary.display()
                )
            })?;
        let addr = first.trim().parse().with_context(|| {
            format!("`weir ingest-server`'s first line is {first:?}, not an address")
        })?;
        Ok(Self {
            child,
            stdin,
            stdout,
            addr,
            pid,
        })
    }

    /// Asks for a new directive; returns the instant just before asking, and its generation.
    async fn publish(&mut self, weight_bp: u32) -> anyhow::Result<(Instant, u64)> {
        let started = Instant::now();
        self.stdin
            .write_all(format!("publish {weight_bp}\n").as_bytes())
            .await?;
        self.stdin.flush().await?;
        let line = tokio::time::timeout(Duration::from_secs(10), self.stdout.next_line())
            .await
            .context("the controller did not confirm a publish within 10 s")??
            .ok_or_else(|| anyhow!("the controller exited during a publish"))?;
        let generation = line
            .strip_prefix("generation ")
            .and_then(|g| g.trim().parse().ok())
            .ok_or_else(|| anyhow!("the controller answered a publish with {line:?}"))?;
        Ok((started, generation))
    }

    /// One line of `counters`, by metric name.
    async fn counter(&mut self, name: &str) -> anyhow::Result<u64> {
        let counters = crate::hostile::read_counters(&mut self.stdin, &mut self.stdout).await?;
        Ok(counters.get(name).copied().unwrap_or(0))
    }

    /// CPU time of every live thread, ns (schedstat's first field).
    fn cpu_nanos(&self) -> anyhow::Result<u64> {
        threads_cpu_nanos(self.pid)
    }

    /// What the windows of every canary hold, from `window <canary>`.
    async fn counted(&mut self, canaries: u32) -> anyhow::Result<u64> {
        let mut total = 0;
        for i in 0..canaries {
            let [primary, canary] = crate::hostile::read_window(
                &mut self.stdin,
                &mut self.stdout,
                &format!("bench/c{i}"),
            )
            .await?;
            total += primary.0 + canary.0;
        }
        Ok(total)
    }

    /// The graceful stop of a leader: every stream ends (each after the acks of what it
    /// counted), then the process prints what its windows held, and exits.
    async fn stop_and_count(mut self) -> anyhow::Result<u64> {
        self.stdin.write_all(b"stop\n").await?;
        self.stdin.flush().await?;
        let line = tokio::time::timeout(Duration::from_secs(20), self.stdout.next_line())
            .await
            .context("the leader did not stop within 20 s")??
            .ok_or_else(|| anyhow!("the leader exited without printing what it counted"))?;
        let counted = line
            .strip_prefix("counted ")
            .and_then(|n| n.trim().parse().ok())
            .ok_or_else(|| anyhow!("the leader answered `stop` with {line:?}"))?;
        let _ = tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await;
        Ok(counted)
    }

    /// Kills the process at once (SIGKILL): its connections are reset, as when a Pod dies.
    async fn kill(mut self) {
        let _ = self.child.kill().await;
    }

    async fn stop(mut self) {
        // Closing stdin ends the server; kill it if that takes long.
        drop(self.stdin);
        if tokio::time::timeout(Duration::from_secs(5), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}

/// CPU time of every live thread of process `pid`, ns (schedstat's first field).
fn threads_cpu_nanos(pid: u32) -> anyhow::Result<u64> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
        .with_context(|| format!("cannot list /proc/{pid}/task"))?;
    let mut total = 0;
    for task in tasks {
        let path = task?.path().join("schedstat");
        // A thread may end between the listing and the read.
        if let Ok(text) = std::fs::read_to_string(&path) {
            total += text
                .split_whitespace()
                .next()
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    Ok(total)
}

/// Whether `binary`'s ingest server takes limits on its command line (builds before the
/// hostile-client work do not, and had large defaults).
async fn takes_limits(binary: &Path) -> bool {
    Command::new(binary)
        .args(["ingest-server", "--help"])
        .stdin(Stdio::null())
        .output()
        .await
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).contains("--max-connections"))
}

/// What a client task shares with the benchmark.
struct Shared {
    origin: Instant,
    connected: AtomicUsize,
    acks: AtomicU64,
    errors: AtomicU64,
    first_error: Mutex<Option<String>>,
    measuring: AtomicBool,
    rtt: Mutex<LatencyHistogram>,
    /// A publish is being fanned out: reports sent now are timed apart.
    publishing: AtomicBool,
    rtt_publishing: Mutex<LatencyHistogram>,
    report_bytes: AtomicU64,
    reports_sent: AtomicU64,
    /// Where the Envoys connect (the Service): changes to the second controller in a storm.
    target: watch::Receiver<SocketAddr>,
    /// With `--relays`: the relays; Envoy `i` connects to `relays[i % (K+1) - 1]`, or to
    /// `target` when `i % (K+1) == 0`.
    relays: Vec<SocketAddr>,
    /// A storm is under way: broken streams reconnect (with the filter's backoff) instead of
    /// counting as errors.
    storming: AtomicBool,
    failed_attempts: AtomicU64,
    /// Requests in the reports generated (not re-sent), for the failover's account.
    generated: AtomicU64,
    /// Reports sent and not yet acknowledged, over all Envoys.
    outstanding: AtomicU64,
    /// Reports re-sent on a new stream.
    resent: AtomicU64,
    /// No new reports: the Envoys only wait for the acks of what they sent.
    draining: AtomicBool,
}

impl Shared {
    fn error(&self, error: String) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        let mut first = self.first_error.lock().unwrap_or_else(|e| e.into_inner());
        first.get_or_insert(error);
    }
}

/// The newest generation a stream has received, and when (ns since `Shared::origin`).
#[derive(Default)]
struct Slot {
    generation: AtomicU64,
    received_ns: AtomicU64,
}

impl Slot {
    fn saw(&self, generation: u64, origin: Instant) {
        if generation > self.generation.load(Ordering::Acquire) {
            let at = u64::try_from(origin.elapsed().as_nanos()).unwrap_or(u64::MAX);
            self.received_ns.store(at, Ordering::Release);
            self.generation.store(generation, Ordering::Release);
        }
    }
}

/// Stats sets the Envoys' reports draw from: realistic deltas for 2 versions × M canaries.
fn stats_pool(canaries: u32, requests: u32, rng: &mut Rng) -> Vec<Vec<VersionStats>> {
    let entries = 2 * canaries.max(1);
    (0..64)
        .map(|_| {
            let mut stats = Vec::new();
            for canary in 0..canaries {
                for (version, share) in [(Version::Primary, 0.9), (Version::Canary, 0.1)] {
                    let mean = f64::from(requests) / f64::from(entries) * 2.0 * share;
                    // ±50% around the mean, at least one request.
                    let count = ((mean * (0.5 + rng.uniform())).round() as u64).max(1);
                    let mut latency = LatencyHistogram::new();
                    let mut failures = 0;
                    for _ in 0..count {
                        latency.record((rng.lognormal(20.0, 0.6) * 1000.0) as u64);
                        if rng.uniform() < 0.01 {
                            failures += 1;
                        }
                    }
                    stats.push(VersionStats {
                        canary: format!("bench/c{canary}"),
                        version: version as i32,
                        requests: count,
                        failures,
                        latency: Some(latency.encode()),
                    });
                }
            }
            stats
        })
        .collect()
}

/// A report sent and not yet acknowledged.
struct Unacked {
    sequence: u64,
    sent: Instant,
    /// Sent while a publish was being fanned out.
    publishing: bool,
    /// Which stats of the pool it carries (re-sent as they are on a new stream).
    stats: usize,
}

/// One simulated Envoy: connect, hello, then a report a second until stopped. In a storm, a
/// broken stream is reopened (to wherever `Shared::target` then points) after the filter's
/// backoff, and what the old one did not acknowledge is sent again, as the filter does.
#[allow(clippy::too_many_arguments)]
async fn envoy(
    index: usize,
    shared: Arc<Shared>,
    slots: Arc<Vec<Slot>>,
    pool: Arc<Vec<Vec<VersionStats>>>,
    phase: Duration,
    connecting: Arc<Semaphore>,
    mut stop: watch::Receiver<bool>,
) {
    let epoch = 0x5EED_0000_0000 + index as u64;
    let mut backoff = Backoff::new(epoch);
    let mut sequence = 0u64;
    let mut first = true;
    let mut unacked = VecDeque::new();
    loop {
        let result = session(
            index,
            epoch,
            &mut sequence,
            &mut unacked,
            first,
            &shared,
            &slots,
            &pool,
            phase,
            &connecting,
            &mut backoff,
            &mut stop,
        )
        .await;
        first = false;
        let Err(e) = result else { return };
        if *stop.borrow() {
            return;
        }
        if !shared.storming.load(Ordering::Relaxed) {
            shared.error(format!("{e:#}"));
            return;
        }
        shared.failed_attempts.fetch_add(1, Ordering::Relaxed);
        let delay = Duration::from_nanos(backoff.next_delay_ns());
        tokio::select! {
            _ = stop.changed() => return,
            () = tokio::time::sleep(delay) => {}
        }
    }
}

/// One stream of an Envoy, until it breaks (Err) or the bench stops (Ok).
#[allow(clippy::too_many_arguments)]
async fn session(
    index: usize,
    epoch: u64,
    sequence: &mut u64,
    unacked: &mut VecDeque<Unacked>,
    first: bool,
    shared: &Shared,
    slots: &[Slot],
    pool: &[Vec<VersionStats>],
    phase: Duration,
    connecting: &Semaphore,
    backoff: &mut Backoff,
    stop: &mut watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let permit = connecting.acquire().await?;
    let addr = match index % (shared.relays.len() + 1) {
        0 => *shared.target.borrow(),
        relay => shared.relays[relay - 1],
    };
    let channel = Endpoint::from_shared(format!("http://{addr}"))?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(10))
        .connect()
        .await
        .map_err(|e| anyhow!("connect: {e:?}"))?;
    let mut client = TelemetryClient::new(channel);
    let (tx, rx) = tokio::sync::mpsc::channel::<Report>(8);
    let node_id = format!(
        "sidecar~10.{}.{}.{}~bench-{index}.bench~bench.svc.cluster.local",
        index >> 16,
        (index >> 8) & 255,
        index & 255
    );
    let report = |sequence: u64, generation: u64, stats: Vec<VersionStats>| Report {
        reporter: Some(Reporter {
            node_id: node_id.clone(),
            namespace: "bench".to_owned(),
            workload: format!("bench-{index}"),
        }),
        epoch,
        sequence,
        applied_generation: generation,
        stats,
    };
    let slot = &slots[index];
    tx.send(report(
        0,
        slot.generation.load(Ordering::Acquire),
        Vec::new(),
    ))
    .await?;
    let mut inbound = client
        .exchange(ReceiverStream::new(rx))
        .await
        .map_err(|s| anyhow!("exchange: {s}"))?
        .into_inner();
    match inbound.message().await {
        Ok(Some(message)) => match message.kind {
            Some(Kind::Directive(d)) => slot.saw(d.generation, shared.origin),
            other => bail!("the first message was {other:?}, not a directive"),
        },
        Ok(None) => bail!("the stream ended before the first directive"),
        Err(status) => bail!("the stream failed before the first directive: {status}"),
    }
    backoff.reset();
    if first {
        shared.connected.fetch_add(1, Ordering::Relaxed);
    }
    drop(permit);

    // What the last stream left unacknowledged goes first, under new sequence numbers.
    for report_of in unacked.iter_mut() {
        *sequence += 1;
        report_of.sequence = *sequence;
        report_of.sent = Instant::now();
        shared.resent.fetch_add(1, Ordering::Relaxed);
        let message = report(
            *sequence,
            slot.generation.load(Ordering::Acquire),
            pool[report_of.stats].clone(),
        );
        tx.send(message)
            .await
            .map_err(|_| anyhow!("the request stream closed"))?;
    }

    let start = if first {
        tokio::time::Instant::now() + phase
    } else {
        tokio::time::Instant::now()
    };
    let mut ticker = tokio::time::interval_at(start, Duration::from_secs(1));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.changed() => return Ok(()),
            message = inbound.message() => match message {
                Ok(Some(message)) => match message.kind {
                    Some(Kind::Directive(d)) => slot.saw(d.generation, shared.origin),
                    Some(Kind::Ack(ack)) => {
                        let now = Instant::now();
                        while unacked.front().is_some_and(|u| u.sequence <= ack.sequence) {
                            if let Some(done) = unacked.pop_front() {
                                shared.outstanding.fetch_sub(1, Ordering::Relaxed);
                                if shared.measuring.load(Ordering::Relaxed) {
                                    shared.acks.fetch_add(1, Ordering::Relaxed);
                                    let micros = u64::try_from(now.duration_since(done.sent).as_micros()).unwrap_or(u64::MAX);
                                    shared.rtt.lock().unwrap_or_else(|e| e.into_inner()).record(micros);
                                    if done.publishing {
                                        shared.rtt_publishing.lock().unwrap_or_else(|e| e.into_inner()).record(micros);
                                    }
                                }
                            }
                        }
                    }
                    None => {}
                },
                Ok(None) => bail!("the controller ended the stream"),
                Err(status) => bail!("the stream failed: {status}"),
            },
            _ = ticker.tick() => {
                if shared.draining.load(Ordering::Relaxed) {
                    continue;
                }
                *sequence += 1;
                let stats = (index + *sequence as usize) % pool.len();
                let message = report(*sequence, slot.generation.load(Ordering::Acquire), pool[stats].clone());
                if *sequence == 1 {
                    shared.report_bytes.fetch_add(message.encoded_len() as u64, Ordering::Relaxed);
                    shared.reports_sent.fetch_add(1, Ordering::Relaxed);
                }
                let requests: u64 = message.stats.iter().map(|e| e.requests).sum();
                shared.generated.fetch_add(requests, Ordering::Relaxed);
                shared.outstanding.fetch_add(1, Ordering::Relaxed);
                unacked.push_back(Unacked {
                    sequence: *sequence,
                    sent: Instant::now(),
                    publishing: shared.publishing.load(Ordering::Relaxed),
                    stats,
                });
                tx.send(message).await.map_err(|_| anyhow!("the request stream closed"))?;
            }
        }
    }
}

/// One N against `binary`.
async fn run_one(
    options: &Options,
    label: &'static str,
    binary: &Path,
    envoys: usize,
    rng: &mut Rng,
) -> anyhow::Result<Run> {
    let mut controller = Controller::start(binary, options.canaries, envoys).await?;
    let (target_tx, target) = watch::channel(controller.addr);
    let mut relays = Vec::new();
    for r in 0..options.relays {
        let extra = [
            "--relay-to".to_owned(),
            controller.addr.to_string(),
            "--relay-name".to_owned(),
            format!("bench-{r}"),
        ];
        let mut relay = Controller::start_with(binary, options.canaries, envoys, &extra).await?;
        // A relay serves Envoys once it has the leader's directive.
        let deadline = Instant::now() + Duration::from_secs(20);
        while relay.counter("weir_directive_generation").await? == 0 {
            if Instant::now() > deadline {
                bail!("relay {r} has no directive from the leader after 20 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        relays.push(relay);
    }
    let shared = Arc::new(Shared {
        origin: Instant::now(),
        connected: AtomicUsize::new(0),
        acks: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        first_error: Mutex::new(None),
        measuring: AtomicBool::new(false),
        rtt: Mutex::new(LatencyHistogram::new()),
        publishing: AtomicBool::new(false),
        rtt_publishing: Mutex::new(LatencyHistogram::new()),
        report_bytes: AtomicU64::new(0),
        reports_sent: AtomicU64::new(0),
        target,
        relays: relays.iter().map(|r| r.addr).collect(),
        storming: AtomicBool::new(false),
        failed_attempts: AtomicU64::new(0),
        generated: AtomicU64::new(0),
        outstanding: AtomicU64::new(0),
        resent: AtomicU64::new(0),
        draining: AtomicBool::new(false),
    });
    let slots: Arc<Vec<Slot>> = Arc::new((0..envoys).map(|_| Slot::default()).collect());
    let pool = Arc::new(stats_pool(
        options.canaries,
        options.requests_per_report,
        rng,
    ));
    let (stop_tx, stop_rx) = watch::channel(false);
    // Connections are opened a few hundred at a time: a burst of thousands of SYNs overflows the
    // listen backlog, which measures the kernel, not the controller.
    let connecting = Arc::new(Semaphore::new(256));
    let connect_started = Instant::now();
    let mut tasks = Vec::with_capacity(envoys);
    for index in 0..envoys {
        let phase = Duration::from_micros(rng.below(1_000_000));
        tasks.push(tokio::spawn(envoy(
            index,
            shared.clone(),
            slots.clone(),
            pool.clone(),
            phase,
            connecting.clone(),
            stop_rx.clone(),
        )));
    }
    let connect_deadline = connect_started + Duration::from_secs(60);
    loop {
        let connected = shared.connected.load(Ordering::Relaxed);
        let failed = shared.errors.load(Ordering::Relaxed) as usize;
        if connected + failed >= envoys || Instant::now() >= connect_deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let connect_seconds = connect_started.elapsed().as_secs_f64();
    let connected = shared.connected.load(Ordering::Relaxed);
    let connect_error = (connected < envoys).then(|| {
        let first = shared
            .first_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        format!(
            "{} of {envoys} connected within 60 s; first error: {}",
            connected,
            first.unwrap_or_else(|| "none (still connecting)".to_owned())
        )
    });

    tokio::time::sleep(Duration::from_secs(u64::from(options.warmup_seconds))).await;

    // The measured window.
    let ticks_per_sec = crate::bench_support::clock_ticks() as f64;
    let errors_before = shared.errors.load(Ordering::Relaxed);
    shared.measuring.store(true, Ordering::Relaxed);
    let window_start = Instant::now();
    let cpu_before = controller.cpu_nanos()?;
    let relays_before = relays
        .iter()
        .map(Controller::cpu_nanos)
        .collect::<anyhow::Result<Vec<_>>>()?;
    let ticks_before = cpu_ticks(controller.pid)?;
    let bench_before = cpu_ticks(std::process::id())?;
    let window = Duration::from_secs(u64::from(options.seconds));
    let mut fanouts = Vec::new();
    let mut next_publish = window_start + Duration::from_secs(1);
    let mut weight_bp = 1_000;
    while next_publish + Duration::from_millis(500) < window_start + window {
        // The controller's CPU rate just before the publish is the baseline (reports alone)
        // that the publish's own cost is measured above.
        next_publish = next_publish.max(Instant::now() + Duration::from_millis(500));
        if next_publish + Duration::from_millis(500) >= window_start + window {
            break;
        }
        let baseline_from = next_publish - Duration::from_millis(500);
        tokio::time::sleep_until(baseline_from.into()).await;
        let me = std::process::id();
        let (baseline_cpu, baseline_own) = (controller.cpu_nanos()?, threads_cpu_nanos(me)?);
        tokio::time::sleep_until(next_publish.into()).await;
        let (before_cpu, before_own) = (controller.cpu_nanos()?, threads_cpu_nanos(me)?);
        let baseline_seconds = next_publish
            .saturating_duration_since(baseline_from)
            .as_secs_f64();
        let baseline_rate = before_cpu.saturating_sub(baseline_cpu) as f64 / baseline_seconds;
        let own_rate = before_own.saturating_sub(baseline_own) as f64 / baseline_seconds;
        weight_bp = if weight_bp >= 5_000 {
            1_000
        } else {
            weight_bp + 1_000
        };
        shared.publishing.store(true, Ordering::Relaxed);
        let (started, generation) = controller.publish(weight_bp).await?;
        let mut fanout = wait_fanout(&shared, &slots, started, generation).await;
        shared.publishing.store(false, Ordering::Relaxed);
        let spent = controller.cpu_nanos()?.saturating_sub(before_cpu) as f64;
        let own = threads_cpu_nanos(me)?.saturating_sub(before_own) as f64;
        let elapsed = started.elapsed().as_secs_f64();
        fanout.controller_cpu_ms = ((spent - baseline_rate * elapsed) / 1e6).max(0.0);
        fanout.envoys_cpu_ms = ((own - own_rate * elapsed) / 1e6).max(0.0);
        fanouts.push(fanout);
        next_publish += Duration::from_secs(u64::from(options.publish_every));
    }
    tokio::time::sleep_until((window_start + window).into()).await;
    let cpu_after = controller.cpu_nanos()?;
    let ticks_after = cpu_ticks(controller.pid)?;
    let bench_after = cpu_ticks(std::process::id())?;
    let measured_seconds = window_start.elapsed().as_secs_f64();
    shared.measuring.store(false, Ordering::Relaxed);
    let reports = shared.acks.load(Ordering::Relaxed);
    let vm_hwm_kib = status_kib(controller.pid, "VmHWM")?;
    let vm_rss_kib = status_kib(controller.pid, "VmRSS")?;
    let stream_errors = shared.errors.load(Ordering::Relaxed) - errors_before;
    let mut processes = Vec::new();
    if !relays.is_empty() {
        let processes_count = relays.len() + 1;
        let share = |k: usize| (0..envoys).filter(|i| i % processes_count == k).count();
        processes.push(ProcessFigures {
            role: "leader".to_owned(),
            envoys: share(0),
            cpu_seconds: cpu_after.saturating_sub(cpu_before) as f64 / 1e9,
            vm_hwm_kib,
            reporters_known: controller.counter("weir_reporters_known").await?,
        });
        for (r, (relay, before)) in relays.iter_mut().zip(relays_before).enumerate() {
            processes.push(ProcessFigures {
                role: format!("relay {r}"),
                envoys: share(r + 1),
                cpu_seconds: relay.cpu_nanos()?.saturating_sub(before) as f64 / 1e9,
                vm_hwm_kib: status_kib(relay.pid, "VmHWM")?,
                reporters_known: relay.counter("weir_reporters_known").await?,
            });
        }
    }

    let (mut storm_figures, mut failover_figures) = (None, None);
    if options.storm {
        let storm = storm(&shared, &slots, controller, binary, options, &target_tx).await;
        stop_tx.send_replace(true);
        let (storm, second) = storm?;
        for task in tasks {
            let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
        }
        second.stop().await;
        storm_figures = Some(storm);
    } else if options.failover {
        let failover = failover(&shared, &slots, controller, &mut relays, binary, options).await;
        stop_tx.send_replace(true);
        for task in tasks {
            let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
        }
        let (failover, new) = failover?;
        new.stop().await;
        for relay in relays {
            relay.stop().await;
        }
        failover_figures = Some(failover);
    } else {
        stop_tx.send_replace(true);
        for task in tasks {
            let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
        }
        controller.stop().await;
        for relay in relays {
            relay.stop().await;
        }
    }

    let quantiles = |histogram: &Mutex<LatencyHistogram>| {
        let h = histogram.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let ms = |q: f64| h.quantile(q).unwrap_or(0.0) / 1000.0;
        (ms(0.5), ms(0.99))
    };
    let sent = shared.reports_sent.load(Ordering::Relaxed).max(1);
    Ok(Run {
        label,
        envoys,
        connected,
        connect_error,
        connect_seconds,
        measured_seconds,
        reports,
        stream_errors,
        cpu_seconds: cpu_after.saturating_sub(cpu_before) as f64 / 1e9,
        cpu_seconds_ticks: ticks_after.saturating_sub(ticks_before) as f64 / ticks_per_sec,
        vm_hwm_kib,
        vm_rss_kib,
        bench_cpu_seconds: bench_after.saturating_sub(bench_before) as f64 / ticks_per_sec,
        fanouts,
        ack_rtt_ms: quantiles(&shared.rtt),
        ack_rtt_publishing_ms: quantiles(&shared.rtt_publishing),
        report_bytes: (shared.report_bytes.load(Ordering::Relaxed) / sent) as usize,
        storm: storm_figures,
        failover: failover_figures,
        processes,
    })
}

/// The storm: a second controller starts, the first is killed, the Service points at the second,
/// and every Envoy reconnects on the filter's backoff. Returns the measurements and the second
/// controller (still running).
async fn storm(
    shared: &Shared,
    slots: &[Slot],
    first: Controller,
    binary: &Path,
    options: &Options,
    target: &watch::Sender<SocketAddr>,
) -> anyhow::Result<(Storm, Controller)> {
    let mut second = Controller::start(binary, options.canaries, slots.len()).await?;
    // Its first generation (from its start time) is above every one of the first controller's.
    let (_, generation) = second.publish(1_000).await?;
    let envoys = slots
        .iter()
        .filter(|s| s.generation.load(Ordering::Acquire) > 0)
        .count();
    shared.storming.store(true, Ordering::Relaxed);
    target.send_replace(second.addr);
    let killed = Instant::now();
    let cpu_before = second.cpu_nanos()?;
    first.kill().await;
    let back = || {
        slots
            .iter()
            .filter(|s| s.generation.load(Ordering::Acquire) >= generation)
            .count()
    };
    // Past the filter's longest backoff range twice over: anyone not back by then is stuck.
    let deadline = killed + Duration::from_secs(60);
    while back() < envoys && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let cpu_seconds = second.cpu_nanos()?.saturating_sub(cpu_before) as f64 / 1e9;
    let vm_hwm_kib = status_kib(second.pid, "VmHWM")?;
    let killed_ns = killed.saturating_duration_since(shared.origin).as_nanos() as f64;
    let seconds: Vec<f64> = slots
        .iter()
        .filter(|s| s.generation.load(Ordering::Acquire) >= generation)
        .map(|s| (s.received_ns.load(Ordering::Acquire) as f64 - killed_ns) / 1e9)
        .collect();
    Ok((
        Storm {
            envoys,
            served_again: seconds.len(),
            p50_s: quantile_of(&seconds, 0.5),
            p99_s: quantile_of(&seconds, 0.99),
            max_s: seconds.iter().copied().fold(0.0, f64::max),
            failed_attempts: shared.failed_attempts.load(Ordering::Relaxed),
            vm_hwm_kib,
            cpu_seconds,
        },
        second,
    ))
}

/// The leader change: the leader stops (its streams end, it prints what it counted), a new leader
/// starts on its address, the relays and the old leader's Envoys reconnect to it (the Envoys
/// with the filter's backoff, re-sending what was not acknowledged). After two more seconds of
/// reports the Envoys stop generating, and once every report and every relay's delta is
/// acknowledged, the new leader's windows are read. Returns the figures and the new leader
/// (still running).
async fn failover(
    shared: &Shared,
    slots: &[Slot],
    leader: Controller,
    relays: &mut [Controller],
    binary: &Path,
    options: &Options,
) -> anyhow::Result<(Failover, Controller)> {
    let envoys = slots
        .iter()
        .filter(|s| s.generation.load(Ordering::Acquire) > 0)
        .count();
    let address = leader.addr;
    shared.storming.store(true, Ordering::Relaxed);
    let stopped = Instant::now();
    let counted_by_old = leader.stop_and_count().await?;
    // The new leader takes the weir-leader Service's address once the old one has let it go.
    let listen = ["--listen".to_owned(), address.to_string()];
    let mut new = None;
    let deadline = Instant::now() + Duration::from_secs(10);
    while new.is_none() {
        match Controller::start_with(binary, options.canaries, slots.len(), &listen).await {
            Ok(started) => new = Some(started),
            Err(e) if Instant::now() > deadline => {
                return Err(e.context(format!("no new leader could listen on {address}")))
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    let mut new = new.ok_or_else(|| anyhow!("no new leader"))?;
    // Its generation (from its start time) is above every one of the old leader's.
    let generation = new.counter("weir_directive_generation").await?;
    let back = || {
        slots
            .iter()
            .filter(|s| s.generation.load(Ordering::Acquire) >= generation)
            .count()
    };
    let deadline = stopped + Duration::from_secs(60);
    while back() < envoys && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let stopped_ns = stopped.saturating_duration_since(shared.origin).as_nanos() as f64;
    let seconds: Vec<f64> = slots
        .iter()
        .filter(|s| s.generation.load(Ordering::Acquire) >= generation)
        .map(|s| (s.received_ns.load(Ordering::Acquire) as f64 - stopped_ns) / 1e9)
        .collect();

    // Two more seconds of reports through the new leader, then everything acknowledged.
    tokio::time::sleep(Duration::from_secs(2)).await;
    shared.draining.store(true, Ordering::Relaxed);
    let drain_started = Instant::now();
    let mut drained = false;
    while drain_started.elapsed() < Duration::from_secs(30) {
        // A relay seals its delta every second: give the last one time to be sealed and sent.
        if drain_started.elapsed() > Duration::from_millis(2500)
            && shared.outstanding.load(Ordering::Relaxed) == 0
        {
            let mut in_flight = 0;
            for relay in relays.iter_mut() {
                in_flight += relay.counter("weir_relay_reports_in_flight").await?;
            }
            if in_flight == 0 {
                drained = true;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let counted_by_new = new.counted(options.canaries).await?;
    Ok((
        Failover {
            envoys,
            served_again: seconds.len(),
            p50_s: quantile_of(&seconds, 0.5),
            p99_s: quantile_of(&seconds, 0.99),
            max_s: seconds.iter().copied().fold(0.0, f64::max),
            generated: shared.generated.load(Ordering::Relaxed),
            counted_by_old,
            counted_by_new,
            resent_reports: shared.resent.load(Ordering::Relaxed),
            drained,
            vm_hwm_kib: status_kib(new.pid, "VmHWM")?,
        },
        new,
    ))
}

/// Waits (at most 10 s) until every connected stream has `generation`, then summarises.
async fn wait_fanout(shared: &Shared, slots: &[Slot], started: Instant, generation: u64) -> FanOut {
    let deadline = Instant::now() + Duration::from_secs(10);
    let streams = shared.connected.load(Ordering::Relaxed);
    let received = || {
        slots
            .iter()
            .filter(|s| s.generation.load(Ordering::Acquire) >= generation)
            .count()
    };
    while received() < streams && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let start_ns = started.saturating_duration_since(shared.origin).as_nanos() as f64;
    let delays: Vec<f64> = slots
        .iter()
        .filter(|s| s.generation.load(Ordering::Acquire) >= generation)
        .map(|s| (s.received_ns.load(Ordering::Acquire) as f64 - start_ns) / 1e6)
        .collect();
    FanOut {
        generation,
        received: delays.len(),
        streams,
        p50_ms: quantile_of(&delays, 0.5),
        p99_ms: quantile_of(&delays, 0.99),
        max_ms: delays.iter().copied().fold(0.0, f64::max),
        controller_cpu_ms: 0.0,
        envoys_cpu_ms: 0.0,
    }
}

/// Runs the benchmark: every N in turn, each against a fresh controller process.
pub async fn run(options: &Options) -> anyhow::Result<Outcome> {
    let machine = Machine::probe();
    let largest = options.envoys.iter().copied().max().unwrap_or(0);
    if let Some(limit) = open_files_limit() {
        // One socket per Envoy here, and a margin for everything else.
        if (limit as usize) < largest + 256 {
            bail!(
                "{largest} Envoys need {} open files in this process (one connection each), but \
                 the limit is {limit}: raise it with `ulimit -n {}` and run again",
                largest + 256,
                largest + 256
            );
        }
    }
    let current = weir_binary()?;
    let mut binaries = vec![("current", current)];
    if let Some(baseline) = &options.baseline {
        if !baseline.is_file() {
            bail!(
                "--baseline {}: no such file; give the path of another `weir` binary (e.g. a \
                 copy of target/release/weir from before a change)",
                baseline.display()
            );
        }
        // The baseline first at every N; the order alternates between Ns.
        binaries.insert(0, ("baseline", baseline.clone()));
    }
    let mut rng = Rng::new(7);
    let mut runs = Vec::new();
    for (i, &envoys) in options.envoys.iter().enumerate() {
        let mut order = binaries.clone();
        if i % 2 == 1 {
            order.reverse();
        }
        for (label, binary) in &order {
            eprintln!(
                "bench-ingest: {envoys} Envoys, {label} ({}) …",
                binary.display()
            );
            let run = run_one(options, label, binary, envoys, &mut rng)
                .await
                .with_context(|| format!("the run with {envoys} Envoys ({label})"))?;
            eprintln!(
                "bench-ingest: {envoys} Envoys, {label}: {:.3} CPU s per 1,000 reports, {:.2} cores, VmHWM {:.0} MiB, fan-out p99 {:?} ms, ack p99 during publishes {:.1} ms",
                run.cpu_per_1000_reports(),
                run.cores(),
                run.vm_hwm_kib as f64 / 1024.0,
                run.worst_fanout_p99_ms(),
                run.ack_rtt_publishing_ms.1,
            );
            runs.push(run);
        }
    }
    Ok(Outcome {
        options: options.clone(),
        machine,
        runs,
    })
}

impl Outcome {
    /// The verdicts against the targets, for the run with the most Envoys.
    pub fn verdicts(&self) -> Vec<String> {
        let Some(run) = self
            .runs
            .iter()
            .filter(|r| r.label == "current")
            .max_by_key(|r| r.envoys)
        else {
            return Vec::new();
        };
        let n = run.envoys;
        let scale = if n == TARGET_ENVOYS {
            String::new()
        } else {
            format!(" (targets are for {TARGET_ENVOYS} Envoys; this run had {n})")
        };
        let mut lines = Vec::new();
        if run.connected < n {
            lines.push(format!(
                "MISS  only {} of {n} Envoys connected: {}",
                run.connected,
                run.connect_error.as_deref().unwrap_or("")
            ));
        }
        let cores = run.cores();
        lines.push(if cores <= CORES_TARGET {
            format!("PASS  {n} Envoys at one report/s: controller uses {cores:.2} cores (target ≤ {CORES_TARGET:.0}){scale}")
        } else {
            format!("MISS  {n} Envoys at one report/s: controller uses {cores:.2} cores (target ≤ {CORES_TARGET:.0}): over by {:.2}{scale}", cores - CORES_TARGET)
        });
        let mib = run.vm_hwm_kib as f64 / 1024.0;
        lines.push(if mib < RSS_TARGET_MIB {
            format!("PASS  controller peak RSS {mib:.0} MiB (target < {RSS_TARGET_MIB:.0} MiB){scale}")
        } else {
            format!("MISS  controller peak RSS {mib:.0} MiB (target < {RSS_TARGET_MIB:.0} MiB): over by {:.0} MiB{scale}", mib - RSS_TARGET_MIB)
        });
        let incomplete = run
            .fanouts
            .iter()
            .filter(|f| f.received < f.streams)
            .count();
        match run.worst_fanout_p99_ms() {
            None => lines.push("MISS  no directive was published in the window".to_owned()),
            Some(p99) if p99 < FANOUT_P99_TARGET_MS && incomplete == 0 => lines.push(format!(
                "PASS  directive fan-out p99 {p99:.1} ms, worst of {} publishes (target < {FANOUT_P99_TARGET_MS:.0} ms){scale}",
                run.fanouts.len()
            )),
            Some(p99) => {
                let p99s: Vec<f64> = run.fanouts.iter().map(|f| f.p99_ms).collect();
                let cpu: Vec<f64> = run.fanouts.iter().map(|f| f.controller_cpu_ms).collect();
                let cpu = quantile_of(&cpu, 0.5);
                let envoys: Vec<f64> = run.fanouts.iter().map(|f| f.envoys_cpu_ms).collect();
                let envoys = quantile_of(&envoys, 0.5);
                let cores = self.machine.nproc.max(1) as f64;
                lines.push(format!(
                    "MISS  directive fan-out p99 {p99:.1} ms, worst of {} publishes (median of their p99s {:.1} ms; {incomplete} not reaching every stream within 10 s) (target < {FANOUT_P99_TARGET_MS:.0} ms): over by {:.0} ms. \
                     One publish costs the controller {cpu:.0} ms of CPU ({:.1} µs per stream), so its two runtime workers need at least {:.0} ms even with both cores to themselves; \
                     the simulated Envoys receiving it cost this process {envoys:.0} ms more, so on these {cores:.0} cores the last stream cannot have it before {:.0} ms{scale}",
                    run.fanouts.len(),
                    quantile_of(&p99s, 0.5),
                    p99 - FANOUT_P99_TARGET_MS,
                    cpu * 1000.0 / run.connected.max(1) as f64,
                    cpu / 2.0,
                    (cpu + envoys) / cores,
                ));
            }
        }
        let ack = run.ack_rtt_publishing_ms.1;
        if !run.fanouts.is_empty() {
            lines.push(if ack < ACK_DURING_PUBLISH_P99_TARGET_MS {
                format!("PASS  ack round trip p99 {ack:.1} ms for reports sent during a publish (target < {ACK_DURING_PUBLISH_P99_TARGET_MS:.0} ms){scale}")
            } else {
                format!("MISS  ack round trip p99 {ack:.1} ms for reports sent during a publish (target < {ACK_DURING_PUBLISH_P99_TARGET_MS:.0} ms): over by {:.0} ms{scale}", ack - ACK_DURING_PUBLISH_P99_TARGET_MS)
            });
        }
        if let Some(storm) = &run.storm {
            let mib = storm.vm_hwm_kib as f64 / 1024.0;
            let all = storm.served_again == storm.envoys;
            lines.push(if all && storm.max_s < STORM_TARGET_SECONDS && mib < MEMORY_LIMIT_MIB {
                format!("PASS  storm: all {} Envoys of a killed controller served again by another within {:.2} s (p50 {:.2} s; target < {STORM_TARGET_SECONDS:.0} s), its peak RSS {mib:.0} MiB (limit {MEMORY_LIMIT_MIB:.0} MiB){scale}", storm.envoys, storm.max_s, storm.p50_s)
            } else {
                format!("MISS  storm: {} of {} Envoys served again, the last after {:.2} s (target: all within {STORM_TARGET_SECONDS:.0} s); the receiving controller's peak RSS {mib:.0} MiB (limit {MEMORY_LIMIT_MIB:.0} MiB){scale}", storm.served_again, storm.envoys, storm.max_s)
            });
        }
        if let Some(f) = &run.failover {
            let all = f.served_again == f.envoys;
            let surplus = f.surplus();
            let account = format!(
                "{} requests generated, {} counted by the old leader + {} by the new = {}",
                f.generated,
                f.counted_by_old,
                f.counted_by_new,
                match surplus {
                    0 => "every one once".to_owned(),
                    n if n < 0 => format!("{} lost", -n),
                    n => format!("{n} counted twice"),
                }
            );
            lines.push(if all && f.max_s < STORM_TARGET_SECONDS && surplus == 0 && f.drained {
                format!("PASS  failover: all {} Envoys had the new leader's directive within {:.2} s of the leader's stop (p50 {:.2} s; target < {STORM_TARGET_SECONDS:.0} s); {account} ({} reports re-sent){scale}", f.envoys, f.max_s, f.p50_s, f.resent_reports)
            } else {
                format!("MISS  failover: {} of {} Envoys had the new leader's directive, the last after {:.2} s (target: all within {STORM_TARGET_SECONDS:.0} s); {account}{}{scale}", f.served_again, f.envoys, f.max_s, if f.drained { "" } else { "; not everything was acknowledged within 30 s" })
            });
        }
        lines
    }

    /// current ÷ baseline at every N run with both, as Markdown lines.
    pub fn ratios(&self) -> Vec<String> {
        let mut lines = Vec::new();
        for current in self.runs.iter().filter(|r| r.label == "current") {
            let Some(baseline) = self
                .runs
                .iter()
                .find(|r| r.label == "baseline" && r.envoys == current.envoys)
            else {
                continue;
            };
            let ratio = |c: f64, b: f64| c / b.max(1e-12);
            lines.push(format!(
                "- {} Envoys, current ÷ baseline: fan-out p99 (median of publishes) {:.1} / {:.1} ms = **{:.2}×**, controller CPU per stream per publish {:.1} / {:.1} µs = **{:.2}×**, ack p99 during publishes {:.1} / {:.1} ms = {:.2}×, CPU per 1,000 reports {:.2}×, peak RSS {:.0} / {:.0} MiB = {:.2}×",
                current.envoys,
                current.median_fanout_p99_ms(),
                baseline.median_fanout_p99_ms(),
                ratio(current.median_fanout_p99_ms(), baseline.median_fanout_p99_ms()),
                current.median_us_per_stream(),
                baseline.median_us_per_stream(),
                ratio(current.median_us_per_stream(), baseline.median_us_per_stream()),
                current.ack_rtt_publishing_ms.1,
                baseline.ack_rtt_publishing_ms.1,
                ratio(current.ack_rtt_publishing_ms.1, baseline.ack_rtt_publishing_ms.1),
                ratio(current.cpu_per_1000_reports(), baseline.cpu_per_1000_reports()),
                current.vm_hwm_kib as f64 / 1024.0,
                baseline.vm_hwm_kib as f64 / 1024.0,
                ratio(current.vm_hwm_kib as f64, baseline.vm_hwm_kib as f64),
            ));
        }
        lines
    }

    /// The report (Markdown).
    pub fn render(&self) -> String {
        let o = &self.options;
        let mut out = String::new();
        let _ = writeln!(out, "## ingest\n");
        out.push_str(
            &self
                .machine
                .render(&format!("cargo xtask bench ingest {}", o.to_args())),
        );
        let _ = writeln!(
            out,
            "- method: one `weir ingest-server` process (the production ingest, release build, \
             default IngestConfig) under a directive of {} canaries; N simulated Envoys in the \
             bench process, each its own HTTP/2 connection and `Exchange` stream (tonic client): \
             hello, then one delta report per second (random phase) with 2 versions × {} \
             canaries, {} requests per report, lognormal latencies in HDR histograms. Measured \
             for {} s after {} s of warm-up: controller CPU (sum of its threads' schedstat run \
             time; /proc/<pid>/stat ticks as a cross-check) per 1,000 reports acknowledged; \
             peak RSS (VmHWM); directive fan-out (publish request written → new generation \
             received, per stream) for a publish every {} s; report → ack round trip. Both \
             processes share the machine's {} CPUs.\n",
            o.canaries,
            o.canaries,
            o.requests_per_report,
            o.seconds,
            o.warmup_seconds,
            o.publish_every,
            self.machine.nproc
        );
        let _ = writeln!(
            out,
            "| weir | Envoys | connected (s to connect) | reports/s | controller CPU s per 1,000 reports | controller cores | peak RSS (VmHWM) | fan-out p50 / p99 / max (worst publish) | fan-out p99, median of publishes | publishes | controller CPU per fan-out (per stream) | ack RTT p50 / p99 | ack RTT during publishes p50 / p99 | bench-side CPU cores | report size |"
        );
        let _ = writeln!(
            out,
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
        );
        for run in &self.runs {
            let worst = run
                .fanouts
                .iter()
                .max_by(|a, b| a.p99_ms.total_cmp(&b.p99_ms));
            let fanout = worst.map_or("-".to_owned(), |f| {
                format!(
                    "{:.1} / {:.1} / {:.1} ms{}",
                    f.p50_ms,
                    f.p99_ms,
                    f.max_ms,
                    if f.received < f.streams {
                        format!(" ({} of {} streams)", f.received, f.streams)
                    } else {
                        String::new()
                    }
                )
            });
            let _ = writeln!(
                out,
                "| {} | {} | {} ({:.1} s) | {:.0} | {:.4} (ticks: {:.4}) | {:.3} | {:.1} MiB | {} | {:.1} ms | {} | {} | {:.1} / {:.1} ms | {:.1} / {:.1} ms | {:.2} | {} B |",
                run.label,
                run.envoys,
                run.connected,
                run.connect_seconds,
                run.reports_per_second(),
                run.cpu_per_1000_reports(),
                run.cpu_seconds_ticks * 1000.0 / run.reports.max(1) as f64,
                run.cores(),
                run.vm_hwm_kib as f64 / 1024.0,
                fanout,
                run.median_fanout_p99_ms(),
                run.fanouts.len(),
                fanout_cpu(&run.fanouts),
                run.ack_rtt_ms.0,
                run.ack_rtt_ms.1,
                run.ack_rtt_publishing_ms.0,
                run.ack_rtt_publishing_ms.1,
                run.bench_cpu_seconds / run.measured_seconds.max(1e-9),
                run.report_bytes,
            );
        }
        let storms: Vec<&Run> = self.runs.iter().filter(|r| r.storm.is_some()).collect();
        if !storms.is_empty() {
            let _ = writeln!(
                out,
                "\nReconnect storms (the controller killed; every Envoy reconnects to a second one with the filter's backoff):\n"
            );
            let _ = writeln!(out, "| weir | Envoys | served again | kill → directive p50 / p99 / max | failed attempts | receiving controller: peak RSS, CPU |");
            let _ = writeln!(out, "|---|---|---|---|---|---|");
            for run in storms {
                if let Some(s) = &run.storm {
                    let _ = writeln!(
                        out,
                        "| {} | {} | {} | {:.2} / {:.2} / {:.2} s | {} | {:.1} MiB, {:.2} CPU s |",
                        run.label,
                        s.envoys,
                        s.served_again,
                        s.p50_s,
                        s.p99_s,
                        s.max_s,
                        s.failed_attempts,
                        s.vm_hwm_kib as f64 / 1024.0,
                        s.cpu_seconds
                    );
                }
            }
        }
        let failovers: Vec<&Run> = self.runs.iter().filter(|r| r.failover.is_some()).collect();
        if !failovers.is_empty() {
            let _ = writeln!(
                out,
                "\nLeader changes (the leader stopped; a new one on its address, as the weir-leader Service; relays and the old leader's Envoys reconnect, the Envoys re-sending what was not acknowledged):\n"
            );
            let _ = writeln!(out, "| weir | Envoys | served again | stop → new directive p50 / p99 / max | requests generated | counted by the old leader | by the new leader | lost (−) / twice (+) | reports re-sent | new leader's peak RSS |");
            let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|---|");
            for run in failovers {
                if let Some(f) = &run.failover {
                    let _ = writeln!(
                        out,
                        "| {} | {} | {} | {:.2} / {:.2} / {:.2} s | {} | {} | {} | {:+} | {} | {:.1} MiB |",
                        run.label,
                        f.envoys,
                        f.served_again,
                        f.p50_s,
                        f.p99_s,
                        f.max_s,
                        f.generated,
                        f.counted_by_old,
                        f.counted_by_new,
                        f.surplus(),
                        f.resent_reports,
                        f.vm_hwm_kib as f64 / 1024.0,
                    );
                }
            }
        }
        let relayed: Vec<&Run> = self
            .runs
            .iter()
            .filter(|r| !r.processes.is_empty())
            .collect();
        if !relayed.is_empty() {
            let _ = writeln!(
                out,
                "\nPer process (the leader and its relays; the fan-out above is leader publish → every Envoy, through the relays for theirs):\n"
            );
            let _ = writeln!(out, "| weir | Envoys in all | process | its Envoys | CPU s in the window | cores | peak RSS (VmHWM) | reporters in its ledger |");
            let _ = writeln!(out, "|---|---|---|---|---|---|---|---|");
            for run in relayed {
                for p in &run.processes {
                    let _ = writeln!(
                        out,
                        "| {} | {} | {} | {} | {:.2} | {:.3} | {:.1} MiB | {} |",
                        run.label,
                        run.envoys,
                        p.role,
                        p.envoys,
                        p.cpu_seconds,
                        p.cpu_seconds / run.measured_seconds.max(1e-9),
                        p.vm_hwm_kib as f64 / 1024.0,
                        p.reporters_known
                    );
                }
            }
        }
        let ratios = self.ratios();
        if !ratios.is_empty() {
            let _ = writeln!(out, "\nSide by side (the same run, alternating):\n");
            for line in ratios {
                let _ = writeln!(out, "{line}");
            }
        }
        let current: Vec<&Run> = self.runs.iter().filter(|r| r.label == "current").collect();
        if let (Some(first), Some(last)) = (current.first(), current.last()) {
            if current.len() > 1 {
                let _ = writeln!(
                    out,
                    "\nScaling {} → {} Envoys ({:.0}×): CPU per 1,000 reports {:.2}×, peak RSS {:.2}×.",
                    first.envoys,
                    last.envoys,
                    last.envoys as f64 / first.envoys as f64,
                    last.cpu_per_1000_reports() / first.cpu_per_1000_reports().max(1e-12),
                    last.vm_hwm_kib as f64 / first.vm_hwm_kib.max(1) as f64
                );
            }
        }
        for run in &self.runs {
            if let Some(error) = &run.connect_error {
                let _ = writeln!(out, "\n{} Envoys: {error}", run.envoys);
            }
            if run.stream_errors > 0 {
                let _ = writeln!(
                    out,
                    "\n{} Envoys: {} streams failed during the window",
                    run.envoys, run.stream_errors
                );
            }
        }
        let _ = writeln!(out);
        for line in self.verdicts() {
            let _ = writeln!(out, "{line}");
        }
        out
    }
}

/// The median controller CPU of the publishes and its cost per stream.
fn fanout_cpu(fanouts: &[FanOut]) -> String {
    if fanouts.is_empty() {
        return "-".to_owned();
    }
    let ms: Vec<f64> = fanouts.iter().map(|f| f.controller_cpu_ms).collect();
    let per_stream: Vec<f64> = fanouts
        .iter()
        .map(FanOut::controller_us_per_stream)
        .collect();
    let envoys: Vec<f64> = fanouts.iter().map(|f| f.envoys_cpu_ms).collect();
    format!(
        "{:.1} ms ({:.1} µs), median; Envoys' side {:.1} ms",
        quantile_of(&ms, 0.5),
        quantile_of(&per_stream, 0.5),
        quantile_of(&envoys, 0.5)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_choose_envoy_counts_and_smoke() {
        let args = |s: &str| s.split_whitespace().map(str::to_owned).collect::<Vec<_>>();
        assert_eq!(Options::parse(&[]), Ok(Some(Options::default())));
        assert_eq!(Options::parse(&args("--smoke")), Ok(Some(Options::smoke())));
        let o = Options::parse(&args("--envoys 10,20 --canaries 3 --seconds 5"))
            .unwrap()
            .unwrap();
        assert_eq!((o.envoys, o.canaries, o.seconds), (vec![10, 20], 3, 5));
        assert!(Options::parse(&args("--envoys 0")).is_err());
        assert!(Options::parse(&args("--envoys x")).is_err());
        assert!(Options::parse(&args("--canaries 0")).is_err());
        assert!(Options::parse(&args("--what")).is_err());
        let o = Options::parse(&args("--storm --baseline /tmp/weir-before"))
            .unwrap()
            .unwrap();
        assert!(o.storm);
        assert_eq!(o.baseline, Some(PathBuf::from("/tmp/weir-before")));
        assert_eq!(Options::parse(&args(&o.to_args())), Ok(Some(o)));
        assert_eq!(Options::parse(&args("--help")), Ok(None));
        let round = Options::parse(&args(&Options::default().to_args()))
            .unwrap()
            .unwrap();
        assert_eq!(round, Options::default());
    }

    #[test]
    fn pooled_stats_pass_the_ingest_rules() {
        let pool = stats_pool(3, 100, &mut Rng::new(1));
        assert_eq!(pool.len(), 64);
        for stats in &pool {
            assert_eq!(stats.len(), 6);
            for entry in stats {
                let latency = LatencyHistogram::decode(entry.latency.as_ref().unwrap()).unwrap();
                assert_eq!(latency.count(), entry.requests);
                assert!(entry.failures <= entry.requests && entry.requests > 0);
            }
        }
    }

    fn run_of(envoys: usize, p99_ms: f64, cpu_ms: f64) -> Run {
        Run {
            label: "current",
            envoys,
            connected: envoys,
            connect_error: None,
            connect_seconds: 1.0,
            measured_seconds: 10.0,
            reports: envoys as u64 * 10,
            stream_errors: 0,
            cpu_seconds: 2.0,
            cpu_seconds_ticks: 2.0,
            vm_hwm_kib: 400 * 1024,
            vm_rss_kib: 300 * 1024,
            bench_cpu_seconds: 1.0,
            fanouts: vec![FanOut {
                generation: 2,
                received: envoys,
                streams: envoys,
                p50_ms: p99_ms / 2.0,
                p99_ms,
                max_ms: p99_ms,
                controller_cpu_ms: cpu_ms,
                envoys_cpu_ms: 20.0,
            }],
            ack_rtt_ms: (1.0, 2.0),
            ack_rtt_publishing_ms: (2.0, 60.0),
            report_bytes: 366,
            storm: None,
            failover: None,
            processes: Vec::new(),
        }
    }

    #[test]
    fn verdicts_judge_the_largest_run_and_say_what_a_missed_fanout_costs_the_controller() {
        let outcome = Outcome {
            options: Options::default(),
            machine: Machine::probe(),
            runs: vec![run_of(100, 5.0, 1.0), run_of(10_000, 300.0, 130.0)],
        };
        let lines = outcome.verdicts();
        assert!(
            lines[0].starts_with("PASS") && lines[0].contains("0.20 cores"),
            "{lines:?}"
        );
        assert!(
            lines[1].starts_with("PASS") && lines[1].contains("400 MiB"),
            "{lines:?}"
        );
        assert!(lines[2].starts_with("MISS"), "{lines:?}");
        assert!(lines[2].contains("over by 200 ms"), "{lines:?}");
        assert!(
            lines[2].contains("130 ms of CPU (13.0 µs per stream)"),
            "{lines:?}"
        );
        assert!(lines[2].contains("at least 65 ms"), "{lines:?}");
        assert!(
            lines[2].contains("the simulated Envoys receiving it cost this process 20 ms more"),
            "{lines:?}"
        );
        assert!(
            lines[3].starts_with("MISS") && lines[3].contains("p99 60.0 ms"),
            "{lines:?}"
        );
        let table = outcome.render();
        assert!(
            table.contains(
                "| current | 10000 | 10000 (1.0 s) | 10000 | 0.0200 (ticks: 0.0200) | 0.200 |"
            ),
            "{table}"
        );
    }

    #[test]
    fn a_baseline_run_is_compared_side_by_side_and_a_storm_is_judged_against_the_limits() {
        let mut baseline = run_of(10_000, 400.0, 200.0);
        baseline.label = "baseline";
        let mut current = run_of(10_000, 100.0, 50.0);
        current.storm = Some(Storm {
            envoys: 10_000,
            served_again: 10_000,
            p50_s: 0.6,
            p99_s: 1.2,
            max_s: 1.5,
            failed_attempts: 3,
            vm_hwm_kib: 300 * 1024,
            cpu_seconds: 2.0,
        });
        let outcome = Outcome {
            options: Options::default(),
            machine: Machine::probe(),
            runs: vec![baseline, current],
        };
        let ratios = outcome.ratios();
        assert_eq!(ratios.len(), 1, "{ratios:?}");
        assert!(ratios[0].contains("**0.25×**"), "{ratios:?}");
        let lines = outcome.verdicts();
        let storm = lines.iter().find(|l| l.contains("storm")).unwrap();
        assert!(
            storm.starts_with("PASS") && storm.contains("1.50 s"),
            "{lines:?}"
        );
        let mut slow = outcome.clone();
        if let Some(s) = slow.runs[1].storm.as_mut() {
            s.served_again = 9_999;
        }
        let lines = slow.verdicts();
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("MISS  storm: 9999 of 10000")),
            "{lines:?}"
        );
    }

    #[test]
    fn a_failover_passes_only_when_every_request_is_counted_once() {
        let mut run = run_of(9_000, 100.0, 50.0);
        let failover = Failover {
            envoys: 9_000,
            served_again: 9_000,
            p50_s: 0.4,
            p99_s: 1.1,
            max_s: 1.3,
            generated: 1_000_000,
            counted_by_old: 700_000,
            counted_by_new: 300_000,
            resent_reports: 12,
            drained: true,
            vm_hwm_kib: 100 * 1024,
        };
        run.failover = Some(failover.clone());
        let outcome = |run: &Run| Outcome {
            options: Options::default(),
            machine: Machine::probe(),
            runs: vec![run.clone()],
        };
        let said = |run: &Run| {
            outcome(run)
                .verdicts()
                .into_iter()
                .find(|l| l.contains("failover"))
                .unwrap()
        };
        let pass = said(&run);
        assert!(
            pass.starts_with("PASS") && pass.contains("every one once"),
            "{pass}"
        );
        for (counted_by_new, expected) in [(299_990, "10 lost"), (300_004, "4 counted twice")] {
            run.failover = Some(Failover {
                counted_by_new,
                ..failover.clone()
            });
            let miss = said(&run);
            assert!(
                miss.starts_with("MISS") && miss.contains(expected),
                "{miss}"
            );
        }
        run.failover = Some(Failover {
            drained: false,
            ..failover
        });
        assert!(said(&run).contains("not everything was acknowledged"));
        assert!(outcome(&run).render().contains("| current | 9000 | 9000 | 0.40 / 1.10 / 1.30 s | 1000000 | 700000 | 300000 | +0 | 12 | 100.0 MiB |"));
        let args = |s: &str| s.split_whitespace().map(str::to_owned).collect::<Vec<_>>();
        assert!(Options::parse(&args("--failover")).is_err(), "needs relays");
        let o = Options::parse(&args("--relays 2 --failover"))
            .unwrap()
            .unwrap();
        assert!(o.failover);
        assert_eq!(Options::parse(&args(&o.to_args())), Ok(Some(o)));
    }

    #[test]
    fn a_slot_keeps_the_first_arrival_of_each_newer_generation() {
        let origin = Instant::now();
        let slot = Slot::default();
        slot.saw(5, origin);
        let first = slot.received_ns.load(Ordering::Acquire);
        std::thread::sleep(Duration::from_millis(2));
        slot.saw(5, origin);
        assert_eq!(slot.received_ns.load(Ordering::Acquire), first);
        slot.saw(4, origin);
        assert_eq!(slot.generation.load(Ordering::Acquire), 5);
        slot.saw(6, origin);
        assert!(slot.received_ns.load(Ordering::Acquire) > first);
    }
}
