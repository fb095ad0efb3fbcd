//! Local mode as the controller tests drive it: the real [`LocalMode`] (ingest and runner in the
//! test process, a real Envoy with the Weir filter, `mirror` processes as the app's versions) in
//! its own state folder, stepped by the test, plus a paced keep-alive [`Traffic`] through its
//! Envoy.
//!
//! The Canary is `application/mhs` (the tutorial's), written with short intervals so a whole
//! rollout takes seconds ([`CanaryFile`]); the workload file names the mirror binary by its
//! absolute path ([`mirror_workload`]).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{anyhow, bail, Context};
use http_body_util::{BodyExt, Empty};
use tokio::task::JoinHandle;
use weir_controller::local::{LocalMode, LocalOptions, RecordedEvent};
use weir_controller::spec::{CanaryStatus, Timestamp};

use crate::binaries;
use crate::http::{client, HttpClient};
use crate::workdir::WorkDir;

/// The target workload (and Canary) name.
pub const TARGET: &str = "mhs";
/// How often the filters report in these tests.
pub const REPORT_INTERVAL: Duration = Duration::from_millis(250);

/// The Canary file the tests write: the tutorial's shape with test-sized numbers.
#[derive(Debug, Clone)]
pub struct CanaryFile {
    /// `analysis.interval`, Go-style (`1s`).
    pub interval: String,
    /// `analysis.threshold`.
    pub threshold: u32,
    /// `analysis.stepWeight`.
    pub step_weight: u32,
    /// `analysis.maxWeight`.
    pub max_weight: u32,
    /// `analysis.minSampleCount` (Weir's own field).
    pub min_sample_count: u32,
    /// The metrics' `interval` (their window), Go-style.
    pub window: String,
    /// `request-success-rate` with `thresholdRange.min` (percent), if any.
    pub success_rate_min: Option<u32>,
    /// `request-duration` with `thresholdRange.max` (milliseconds), if any.
    pub duration_max_ms: Option<u32>,
    /// More of `spec.analysis`, as YAML lines indented by four spaces (`    webhooks:\n...`).
    pub analysis_extra: String,
    /// More of `spec.service`, as YAML lines indented by four spaces (`    timeout: 1s\n`).
    pub service_extra: String,
}

impl Default for CanaryFile {
    /// Interval 1s, threshold 3, steps of 10 up to 50, windows of 2s, at least 10 requests per
    /// window, success rate ≥ 99% and P99 ≤ 500ms: a healthy rollout takes about ten seconds.
    fn default() -> Self {
        Self {
            interval: "1s".to_owned(),
            threshold: 3,
            step_weight: 10,
            max_weight: 50,
            min_sample_count: 10,
            window: "2s".to_owned(),
            success_rate_min: Some(99),
            duration_max_ms: Some(500),
            analysis_extra: String::new(),
            service_extra: String::new(),
        }
    }
}

impl CanaryFile {
    /// The Canary as YAML (`apiVersion: weir.dev/v1alpha1`).
    pub fn to_yaml(&self) -> String {
        let mut metrics = String::new();
        if let Some(min) = self.success_rate_min {
            metrics.push_str(&format!(
                "    - name: request-success-rate\n      thresholdRange: {{min: {min}}}\n      interval: {}\n",
                self.window
            ));
        }
        if let Some(max) = self.duration_max_ms {
            metrics.push_str(&format!(
                "    - name: request-duration\n      thresholdRange: {{max: {max}}}\n      interval: {}\n",
                self.window
            ));
        }
        format!(
            "apiVersion: weir.dev/v1alpha1
kind: Canary
metadata:
  name: {TARGET}
  namespace: application
spec:
  targetRef:
    apiVersion: apps/v1
    kind: Deployment
    name: {TARGET}
  service:
    port: 80
    targetPort: 8080
{service_extra}  analysis:
    interval: {interval}
    threshold: {threshold}
    maxWeight: {max_weight}
    stepWeight: {step_weight}
    minSampleCount: {min_samples}
    metrics:
{metrics}{extra}",
            interval = self.interval,
            threshold = self.threshold,
            max_weight = self.max_weight,
            step_weight = self.step_weight,
            min_samples = self.min_sample_count,
            extra = self.analysis_extra,
            service_extra = self.service_extra,
        )
    }
}

/// A workload file running the mirror binary (absolute path) as `version`, with further mirror
/// flags (`["--error-rate", "0.5"]`, `["--latency", "600ms"]`).
pub fn mirror_workload(version: &str, flags: &[&str]) -> String {
    let quote = |s: &str| serde_json::Value::from(s).to_string();
    let mut args = vec![quote("--listen"), quote("{address}"), quote("--version")];
    args.push(quote(version));
    args.extend(flags.iter().map(|f| quote(f)));
    format!(
        "command: {}\nargs: [{}]\nreadinessPath: /healthz\n",
        quote(&binaries::mirror().to_string_lossy()),
        args.join(", ")
    )
}

/// One local mode under test, in its own state folder. Dropping it kills Envoy and the app
/// processes (each is killed when its handle drops); [`LocalRun::shutdown`] does it in order.
pub struct LocalRun {
    mode: Option<LocalMode>,
    options: LocalOptions,
    traffic: Option<Traffic>,
    started: Instant,
    // Declared last: the folder outlives the processes writing into it.
    dir: WorkDir,
}

impl LocalRun {
    /// Writes the Canary and a workload running `version`, then starts local mode (not yet
    /// stepped, no traffic).
    pub async fn start(test: &str, canary: &CanaryFile, version: &str) -> anyhow::Result<Self> {
        Self::start_with(test, canary, version, |_| {}).await
    }

    /// [`LocalRun::start`] with the options adjusted by `configure` (the filter's install,
    /// Envoy's concurrency).
    pub async fn start_with(
        test: &str,
        canary: &CanaryFile,
        version: &str,
        configure: impl FnOnce(&mut LocalOptions),
    ) -> anyhow::Result<Self> {
        let dir = WorkDir::new(test)?;
        let workloads = dir.path().join("workloads");
        std::fs::create_dir_all(&workloads)?;
        let canary_path = dir.path().join("canary.yaml");
        std::fs::write(&canary_path, canary.to_yaml())?;
        std::fs::write(
            workloads.join(format!("{TARGET}.yaml")),
            mirror_workload(version, &[]),
        )?;
        let mut options = LocalOptions {
            canary: canary_path,
            workloads,
            state: dir.path().join("state"),
            listen_port: 0,
            envoy: binaries::envoy(),
            wasm: binaries::wasm(),
            report_interval: REPORT_INTERVAL,
            time_scale: 1,
            echo_events: true,
            filter_install: weir_controller::filter_module::InstallKind::default(),
            envoy_concurrency: 2,
            telemetry_tls: None,
            telemetry_port: 0,
            filters_report_to: None,
        };
        configure(&mut options);
        let mode = LocalMode::start(&options)
            .await
            .context("local mode did not start")?;
        Ok(Self {
            mode: Some(mode),
            options,
            traffic: None,
            started: Instant::now(),
            dir,
        })
    }

    /// The running local mode.
    pub fn mode(&self) -> &LocalMode {
        // Only `restart` takes it out, and it always puts one back or fails the test.
        self.mode
            .as_ref()
            .unwrap_or_else(|| panic!("local mode is not running"))
    }

    fn mode_mut(&mut self) -> &mut LocalMode {
        self.mode
            .as_mut()
            .unwrap_or_else(|| panic!("local mode is not running"))
    }

    /// The state folder.
    pub fn state(&self) -> &Path {
        &self.options.state
    }

    /// The test's scratch folder.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The current status.
    pub fn status(&self) -> CanaryStatus {
        self.mode().status().clone()
    }

    /// Rewrites the workload file: local mode's `kubectl set image`.
    pub fn set_version(&self, version: &str, flags: &[&str]) -> anyhow::Result<()> {
        let path = self.options.workloads.join(format!("{TARGET}.yaml"));
        std::fs::write(&path, mirror_workload(version, flags))
            .with_context(|| format!("cannot write {}", path.display()))
    }

    /// Starts [`Traffic`] at `rate` requests per second through this local mode's Envoy.
    pub fn start_traffic(&mut self, rate: u32) {
        let mode = self.mode();
        self.traffic = Some(Traffic::start(mode.listener(), &mode.host(), rate, 16));
    }

    /// The traffic, if started.
    pub fn traffic(&self) -> Option<&Traffic> {
        self.traffic.as_ref()
    }

    /// Steps the controller (as `weir local` does) until `done` holds for the status; an error
    /// after `timeout` says what was awaited and shows the status and events.
    pub async fn step_until(
        &mut self,
        what: &str,
        timeout: Duration,
        done: impl Fn(&CanaryStatus) -> bool,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            self.mode_mut().tick().await;
            if done(self.mode().status()) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "timed out after {timeout:?} waiting until {what}\n{}",
                    self.describe()
                );
            }
            tokio::time::sleep(self.mode().until_next_step()).await;
        }
    }

    /// Steps the controller for `duration`.
    pub async fn step_for(&mut self, duration: Duration) {
        let end = Instant::now() + duration;
        while Instant::now() < end {
            self.mode_mut().tick().await;
            let pause = self
                .mode()
                .until_next_step()
                .min(end.saturating_duration_since(Instant::now()));
            tokio::time::sleep(pause).await;
        }
    }

    /// Every event recorded so far, both lives included (the journal reloads earlier ones).
    pub fn events(&self) -> Vec<RecordedEvent> {
        self.mode()
            .events()
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The messages of events that contain `needle`.
    pub fn messages_with(&self, needle: &str) -> Vec<String> {
        self.events()
            .into_iter()
            .map(|e| e.event.message)
            .filter(|m| m.contains(needle))
            .collect()
    }

    /// The events as persisted in the state folder's `events.jsonl`.
    pub fn persisted_events(&self) -> anyhow::Result<Vec<RecordedEvent>> {
        let path = self.state().join("events.jsonl");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        text.lines()
            .map(|line| {
                serde_json::from_str(line)
                    .with_context(|| format!("{} holds a bad line: {line}", path.display()))
            })
            .collect()
    }

    /// Stops local mode (as Ctrl-C does) and starts a new one on the same state folder, with the
    /// traffic following the new Envoy.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        if let Some(mode) = self.mode.take() {
            mode.shutdown().await;
        }
        let mode = LocalMode::start(&self.options)
            .await
            .context("local mode did not start again on the same state folder")?;
        if let Some(traffic) = &self.traffic {
            traffic.retarget(mode.listener());
        }
        self.mode = Some(mode);
        Ok(())
    }

    /// The version that answers a request sent with no routing help (all of it goes to the
    /// primary when the canary's weight is 0). Waits, boundedly, for a first answer, then
    /// requires `count` answers in a row from one version.
    pub async fn serving_version(&self, count: usize) -> anyhow::Result<String> {
        let (target, host) = (self.mode().listener(), self.mode().host());
        let http = client(1);
        let deadline = Instant::now() + Duration::from_secs(10);
        let first = loop {
            match one_request(&http, target, &host, false).await {
                Ok(answer) if answer.status == 200 => break answer.version,
                other if Instant::now() >= deadline => {
                    bail!("no 200 from {target} within 10s; last: {other:?}")
                }
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        };
        for i in 1..count {
            let answer = one_request(&http, target, &host, false).await?;
            if answer.status != 200 || answer.version != first {
                bail!(
                    "answer {i} of {count}: {} from `{}` ({}), after `{first}` answered first",
                    answer.status,
                    answer.version,
                    answer.body
                );
            }
        }
        Ok(first)
    }

    /// Envoy's upstream counters for the app's clusters (requests, 5xx, connect failures,
    /// retries, health-check results), for failure messages.
    pub fn envoy_counters(&self) -> String {
        let filter = "^cluster\\.(primary|canary)\\.(upstream_rq_(5xx|503|retry|retry_success|retry_overflow|completed)|upstream_cx_connect_fail|health_check\\.(failure|success))$";
        match self
            .mode()
            .envoy()
            .admin_get(&format!("/stats?filter={filter}"))
        {
            Ok(body) => body.lines().collect::<Vec<_>>().join("; "),
            Err(e) => format!("no Envoy stats: {e}"),
        }
    }

    /// The last `lines` lines of each app process's log (the state folder is removed when the
    /// test ends with an error, so failure messages carry them).
    pub fn app_logs(&self, lines: usize) -> String {
        let Ok(entries) = std::fs::read_dir(self.state().join("logs")) else {
            return "  (none)".to_owned();
        };
        let mut paths: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
        paths.sort();
        paths
            .iter()
            .map(|path| {
                let text = std::fs::read_to_string(path).unwrap_or_default();
                let all: Vec<&str> = text.lines().collect();
                let tail = all[all.len().saturating_sub(lines)..].join("\n    ");
                format!("  {}:\n    {tail}", path.display())
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Status, events (with seconds since start) and traffic, for failure messages.
    pub fn describe(&self) -> String {
        let status = serde_json::to_string(self.mode().status()).unwrap_or_default();
        let events: Vec<String> = self
            .events()
            .iter()
            .map(|e| format!("  {} {}: {}", e.time, e.event.reason, e.event.message))
            .collect();
        let traffic = self
            .traffic
            .as_ref()
            .map_or("no traffic".to_owned(), |t| format!("{:?}", t.stats()));
        format!(
            "after {:?}; status: {status}\nevents:\n{}\ntraffic: {traffic}\napp logs:\n{}\nstate folder: {}",
            self.started.elapsed(),
            events.join("\n"),
            self.app_logs(5),
            self.state().display()
        )
    }

    /// Stops the traffic and waits (boundedly) until the controller has applied a report of every
    /// request it sent; returns (sent, requests the controller counted).
    pub async fn stop_traffic_and_count(&mut self) -> anyhow::Result<(u64, u64)> {
        let traffic = self.traffic.take().context("no traffic was started")?;
        let sent = traffic.stop().await.sent;
        let counted = || self.mode().ingest().counters().snapshot().requests_applied;
        let deadline = Instant::now() + Duration::from_secs(10);
        while counted() < sent && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Two more report intervals, so that a count beyond what was sent would show too.
        tokio::time::sleep(REPORT_INTERVAL * 2).await;
        Ok((sent, counted()))
    }

    /// Stops the traffic, then local mode.
    pub async fn shutdown(mut self) {
        if let Some(traffic) = self.traffic.take() {
            traffic.stop().await;
        }
        if let Some(mode) = self.mode.take() {
            mode.shutdown().await;
        }
    }
}

/// What the traffic has seen.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrafficStats {
    /// Requests sent.
    pub sent: u64,
    /// Responses by status (0: no response).
    pub by_status: BTreeMap<u16, u64>,
    /// 200 responses by `x-mirror-version`.
    pub ok_by_version: BTreeMap<String, u64>,
    /// The first few failures (no response, or not 200), with when and why, for diagnosis.
    pub first_errors: Vec<String>,
}

impl TrafficStats {
    /// Responses that were not 200 plus requests that got none.
    pub fn not_ok(&self) -> u64 {
        self.by_status
            .iter()
            .filter(|(status, _)| **status != 200)
            .map(|(_, n)| n)
            .sum()
    }
}

struct Shared {
    target: Mutex<SocketAddr>,
    host: String,
    errors: AtomicBool,
    stop: AtomicBool,
    stats: Mutex<TrafficStats>,
}

/// Paced keep-alive requests in the background, like a steady stream of users. Optionally half
/// of them ask the mirror for a 500 (`X-Mirror-Code: 500`). Stopped (tasks aborted) on drop.
pub struct Traffic {
    shared: Arc<Shared>,
    tasks: Vec<JoinHandle<()>>,
}

impl Traffic {
    /// `rate` requests per second in all, from `workers` connections, to `target` with `Host:
    /// host`. Workers are staggered across the period so the load is even.
    pub fn start(target: SocketAddr, host: &str, rate: u32, workers: u32) -> Self {
        let shared = Arc::new(Shared {
            target: Mutex::new(target),
            host: host.to_owned(),
            errors: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            stats: Mutex::new(TrafficStats::default()),
        });
        let workers = workers.max(1);
        let period = Duration::from_secs(1) * workers / rate.max(1);
        let http = client(workers as usize);
        let tasks = (0..workers)
            .map(|worker| {
                let (shared, http) = (shared.clone(), http.clone());
                let offset = period * worker / workers;
                tokio::spawn(async move {
                    let start = tokio::time::Instant::now() + offset;
                    let mut ticker = tokio::time::interval_at(start, period);
                    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    let mut n = u64::from(worker);
                    while !shared.stop.load(Ordering::Relaxed) {
                        ticker.tick().await;
                        n += 1;
                        let error = shared.errors.load(Ordering::Relaxed) && n.is_multiple_of(2);
                        let target = *shared.target.lock().unwrap_or_else(|p| p.into_inner());
                        let result = one_request(&http, target, &shared.host, error).await;
                        let mut stats = shared.stats.lock().unwrap_or_else(|p| p.into_inner());
                        stats.sent += 1;
                        let failure = match result {
                            Ok(answer) if answer.status == 200 => {
                                *stats.by_status.entry(200).or_default() += 1;
                                *stats.ok_by_version.entry(answer.version).or_default() += 1;
                                None
                            }
                            Ok(answer) => {
                                *stats.by_status.entry(answer.status).or_default() += 1;
                                Some(format!(
                                    "{} from `{}`: {}",
                                    answer.status, answer.version, answer.body
                                ))
                            }
                            Err(e) => {
                                *stats.by_status.entry(0).or_default() += 1;
                                Some(format!("{e:#}"))
                            }
                        };
                        if let Some(failure) = failure.filter(|_| stats.first_errors.len() < 5) {
                            let now = Timestamp::from_system_time(SystemTime::now());
                            stats.first_errors.push(format!("{now} {failure}"));
                        }
                    }
                })
            })
            .collect();
        Self { shared, tasks }
    }

    /// Makes every other request ask for a 500 (`true`) or none (`false`).
    pub fn set_errors(&self, on: bool) {
        self.shared.errors.store(on, Ordering::Relaxed);
    }

    /// Sends from now on to `target` (a restarted Envoy).
    pub fn retarget(&self, target: SocketAddr) {
        *self.shared.target.lock().unwrap_or_else(|p| p.into_inner()) = target;
    }

    /// What the traffic has seen so far.
    pub fn stats(&self) -> TrafficStats {
        self.shared
            .stats
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Stops sending, waits for the requests in flight, and returns what the traffic saw.
    pub async fn stop(mut self) -> TrafficStats {
        self.shared.stop.store(true, Ordering::Relaxed);
        for task in self.tasks.drain(..) {
            let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
        }
        self.stats()
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// One answer through Envoy.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Answer {
    status: u16,
    /// The `x-mirror-version` header; empty when missing (an answer from Envoy itself).
    version: String,
    /// The body, kept only for answers other than 200 (Envoy says there why it failed).
    body: String,
}

/// One GET of `/` with `Host: host`.
async fn one_request(
    http: &HttpClient,
    target: SocketAddr,
    host: &str,
    error: bool,
) -> anyhow::Result<Answer> {
    let mut request =
        http::Request::get(format!("http://{target}/")).header(http::header::HOST, host);
    if error {
        request = request.header("x-mirror-code", "500");
    }
    let request = request.body(Empty::new())?;
    let exchange = async {
        let response = http.request(request).await?;
        let status = response.status().as_u16();
        let version = response
            .headers()
            .get("x-mirror-version")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        // Read the whole body, so the connection can carry the next request.
        let body = response.into_body().collect().await?.to_bytes();
        let body = if status == 200 {
            String::new()
        } else {
            String::from_utf8_lossy(&body).trim().to_owned()
        };
        Ok::<_, anyhow::Error>(Answer {
            status,
            version,
            body,
        })
    };
    tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .map_err(|_| anyhow!("no answer from {target} within 5s"))?
}

/// The weights named by `Advance <id> canary weight <n>` events, in order.
pub fn advance_weights(events: &[RecordedEvent]) -> Vec<u32> {
    events
        .iter()
        .filter_map(|e| {
            let rest = e.event.message.split(" canary weight ").nth(1)?;
            e.event.message.starts_with("Advance ").then_some(())?;
            rest.split_whitespace().next()?.parse().ok()
        })
        .collect()
}

/// The `weir` binary: `WEIR_BIN`, else the workspace's debug build.
pub fn weir_binary() -> PathBuf {
    let built = binaries::workspace_root().join("target/debug/weir");
    match std::env::var_os("WEIR_BIN") {
        Some(path) => {
            let path = PathBuf::from(path);
            assert!(
                path.is_file(),
                "WEIR_BIN={} does not name a file; point it at the weir binary or unset it",
                path.display()
            );
            path
        }
        None => {
            assert!(
                built.is_file(),
                "no weir binary at {}: build it with `cargo build -p weir-controller`, or set WEIR_BIN",
                built.display()
            );
            built
        }
    }
}
