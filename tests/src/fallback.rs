//! Local mode analysing with Prometheus, as the fallback tests drive it: the real [`LocalMode`]
//! (a real Envoy with the Weir filter, `mirror` processes publishing Istio's series with
//! `--istio-metrics`), a real [`Prometheus`] scraping Envoy's `/stats/prometheus`, the mirrors and
//! the controller's own `/metrics`, and steady traffic through Envoy.
//!
//! The Canary is `application/mhs`. Files beside it (MetricTemplates, Secrets) are written into
//! the same folder, where local mode looks for them.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use tokio::task::JoinHandle;
use weir_controller::local::{LocalMetricsOptions, LocalMode, LocalOptions, RecordedEvent};
use weir_controller::metrics::select::SourcePolicy;
use weir_controller::platform::local::LocalPorts;
use weir_controller::spec::{CanaryStatus, Phase};

use crate::binaries;
use crate::http::client;
use crate::prometheus::{Prometheus, ScrapeJob};
use crate::workdir::{free_port, WorkDir};

/// How often Prometheus scrapes in these tests.
pub const SCRAPE_INTERVAL: Duration = Duration::from_secs(1);

/// The Flagger tutorial's Canary with the analysis timed for a 1s scrape: interval 4s (the
/// tutorial's 1m) and metric windows of 8s (its 30s), long enough for `rate()` to see several
/// scrapes, also when a check right after a weight change cuts its window to the step's 4s.
/// Everything else is the tutorial's.
pub const TUTORIAL_CANARY: &str = r#"apiVersion: weir.dev/v1alpha1
kind: Canary
metadata:
  name: mhs
  namespace: application
spec:
  targetRef:
    apiVersion: apps/v1
    kind: Deployment
    name: mhs
  progressDeadlineSeconds: 60
  service:
    port: 80
    targetPort: 8080
  analysis:
    interval: 4s
    maxWeight: 50
    stepWeight: 10
    threshold: 5
    metrics:
    - name: request-success-rate
      thresholdRange: {min: 99}
      interval: 8s
    - name: request-duration
      thresholdRange: {max: 500}
      interval: 8s
"#;

/// What to start.
#[derive(Debug, Clone)]
pub struct FallbackSpec {
    /// The Canary (YAML).
    pub canary: String,
    /// Further files beside the Canary: (file name, content).
    pub files: Vec<(String, String)>,
    /// Which source the built-in checks use.
    pub source: SourcePolicy,
    /// The first version.
    pub version: String,
}

/// Local mode + Prometheus + traffic, torn down in order on [`FallbackRun::shutdown`] (and
/// killed on drop).
pub struct FallbackRun {
    mode: Option<LocalMode>,
    prometheus: Prometheus,
    load: Option<Load>,
    workloads: PathBuf,
    ports: LocalPorts,
    started: Instant,
    // Last: the folder outlives the processes writing into it.
    dir: WorkDir,
}

impl FallbackRun {
    /// Writes the files, starts local mode with Prometheus as its global server and its own
    /// metrics endpoint, then Prometheus scraping Envoy, the app's three ports and the
    /// controller.
    pub async fn start(test: &str, spec: &FallbackSpec) -> anyhow::Result<Self> {
        let dir = WorkDir::new(test)?;
        let canary = dir.path().join("canary.yaml");
        std::fs::write(&canary, &spec.canary)?;
        for (name, text) in &spec.files {
            std::fs::write(dir.path().join(name), text)?;
        }
        let workloads = dir.path().join("workloads");
        std::fs::create_dir_all(&workloads)?;
        let state = dir.path().join("state");
        // The ports local mode will use, picked now so each mirror can name its Istio workload
        // by the port it listens on.
        let ports = LocalPorts::load_or_pick(&state).map_err(anyhow::Error::msg)?;
        std::fs::write(
            workloads.join("mhs.yaml"),
            mirror_workload(&ports, &spec.version, &[]),
        )?;
        let prometheus_port = free_port()?;
        let options = LocalOptions {
            canary,
            workloads: workloads.clone(),
            state,
            listen_port: 0,
            envoy: binaries::envoy(),
            wasm: binaries::wasm(),
            report_interval: Duration::from_millis(250),
            time_scale: 1,
            echo_events: true,
            filter_install: weir_controller::filter_module::InstallKind::default(),
            envoy_concurrency: 2,
            telemetry_tls: None,
            telemetry_port: 0,
            filters_report_to: None,
        };
        let metrics = LocalMetricsOptions {
            source: spec.source,
            prometheus: Some(format!("http://127.0.0.1:{prometheus_port}")),
            prometheus_credentials: None,
            prometheus_timeout: Some(Duration::from_secs(2)),
            listen_metrics: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
        };
        let mode = LocalMode::start_with(&options, &metrics)
            .await
            .context("local mode did not start")?;
        let local = |port| SocketAddr::from(([127, 0, 0, 1], port));
        let jobs = [
            ScrapeJob::new("envoy", "/stats/prometheus", &[mode.envoy().admin_addr()]),
            ScrapeJob::new(
                "app",
                "/stats/prometheus",
                &[
                    local(ports.primary[0]),
                    local(ports.primary[1]),
                    local(ports.canary),
                ],
            ),
            ScrapeJob::new(
                "weir",
                "/metrics",
                &[mode.metrics_addr().context("no metrics endpoint")?],
            ),
        ];
        let prometheus = tokio::task::block_in_place(|| {
            Prometheus::start(
                &dir.path().join("prometheus"),
                prometheus_port,
                &jobs,
                SCRAPE_INTERVAL,
            )
        })?;
        Ok(Self {
            mode: Some(mode),
            prometheus,
            load: None,
            workloads,
            ports,
            started: Instant::now(),
            dir,
        })
    }

    /// The running local mode.
    pub fn mode(&self) -> &LocalMode {
        self.mode
            .as_ref()
            .unwrap_or_else(|| panic!("local mode was shut down"))
    }

    fn mode_mut(&mut self) -> &mut LocalMode {
        self.mode
            .as_mut()
            .unwrap_or_else(|| panic!("local mode was shut down"))
    }

    /// The Prometheus server.
    pub fn prometheus(&mut self) -> &mut Prometheus {
        &mut self.prometheus
    }

    /// The test's folder.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The current status.
    pub fn status(&self) -> CanaryStatus {
        self.mode().status().clone()
    }

    /// Rewrites the workload: local mode's `kubectl set image`. `flags` go to the mirror
    /// (`["--error-rate", "0.5"]`).
    pub fn set_version(&self, version: &str, flags: &[&str]) -> anyhow::Result<()> {
        std::fs::write(
            self.workloads.join("mhs.yaml"),
            mirror_workload(&self.ports, version, flags),
        )?;
        Ok(())
    }

    /// Starts steady traffic through Envoy at about `rate` requests per second.
    pub fn start_load(&mut self, rate: u32) {
        self.load = Some(Load::start(
            self.mode().listener(),
            &self.mode().host(),
            rate,
        ));
    }

    /// Makes every second request ask the app for a 500 (`X-Mirror-Code`), or stops that.
    pub fn set_errors(&self, on: bool) {
        if let Some(load) = &self.load {
            load.errors.store(on, Ordering::Relaxed);
        }
    }

    /// Steps the controller until `done` holds; an error after `timeout` shows the state.
    pub async fn step_until(
        &mut self,
        what: &str,
        timeout: Duration,
        done: impl Fn(&CanaryStatus, &[RecordedEvent]) -> bool,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            self.mode_mut().tick().await;
            if done(self.mode().status(), &self.events()) {
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

    /// Steps the controller until the phase is `phase`.
    pub async fn step_until_phase(
        &mut self,
        phase: Phase,
        timeout: Duration,
    ) -> anyhow::Result<()> {
        self.step_until(&format!("phase {phase}"), timeout, |s, _| {
            s.phase == Some(phase)
        })
        .await
    }

    /// Every event so far.
    pub fn events(&self) -> Vec<RecordedEvent> {
        self.mode()
            .events()
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The messages of events containing `needle`.
    pub fn messages_with(&self, needle: &str) -> Vec<String> {
        self.events()
            .into_iter()
            .map(|e| e.event.message)
            .filter(|m| m.contains(needle))
            .collect()
    }

    /// The version the primary serves (weight 0: every request goes to it).
    pub async fn primary_version(&self) -> anyhow::Result<String> {
        let http = client(1);
        let uri: http::Uri = format!("http://{}/", self.mode().listener()).parse()?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let request = http::Request::get(uri.clone())
                .header("host", self.mode().host())
                .body(Empty::<Bytes>::new())?;
            if let Ok(Ok(response)) =
                tokio::time::timeout(Duration::from_secs(2), http.request(request)).await
            {
                if response.status() == 200 {
                    if let Some(v) = response.headers().get("x-mirror-version") {
                        return Ok(v.to_str()?.to_owned());
                    }
                }
            }
            if Instant::now() >= deadline {
                bail!("no 200 through Envoy within 10s");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Status, events and load, for failure messages.
    pub fn describe(&self) -> String {
        let status = serde_json::to_string(self.mode().status()).unwrap_or_default();
        let events: Vec<String> = self
            .events()
            .iter()
            .map(|e| format!("  {} {}: {}", e.time, e.event.reason, e.event.message))
            .collect();
        let load = self.load.as_ref().map_or("no load".to_owned(), |l| {
            format!(
                "{} sent, {} not 2xx",
                l.sent.load(Ordering::Relaxed),
                l.failed.load(Ordering::Relaxed)
            )
        });
        format!(
            "after {:?}; status: {status}\nevents:\n{}\nload: {load}\nfolder: {}",
            self.started.elapsed(),
            events.join("\n"),
            self.dir.path().display()
        )
    }

    /// Stops the load, local mode and Prometheus.
    pub async fn shutdown(mut self) {
        if let Some(load) = self.load.take() {
            load.stop().await;
        }
        if let Some(mode) = self.mode.take() {
            mode.shutdown().await;
        }
        self.prometheus.stop();
    }
}

/// The workload file: the mirror as `version`, publishing Istio's series as the primary
/// (`mhs-primary`, on either primary port) or the canary (`mhs`).
pub fn mirror_workload(ports: &LocalPorts, version: &str, flags: &[&str]) -> String {
    let quote = |s: &str| serde_json::Value::from(s).to_string();
    let mut args: Vec<String> = vec![
        "--listen".into(),
        "{address}".into(),
        "--version".into(),
        version.into(),
        "--istio-metrics".into(),
        "--istio-namespace".into(),
        "application".into(),
        "--istio-workload".into(),
        "mhs".into(),
    ];
    for port in ports.primary {
        args.push("--istio-workload-for-port".into());
        args.push(format!("{port}=mhs-primary"));
    }
    args.extend(flags.iter().map(|f| (*f).to_owned()));
    let args: Vec<String> = args.iter().map(|a| quote(a)).collect();
    format!(
        "command: {}\nargs: [{}]\nreadinessPath: /healthz\n",
        quote(&binaries::mirror().to_string_lossy()),
        args.join(", ")
    )
}

/// Steady keep-alive traffic through Envoy.
struct Load {
    errors: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    tasks: Vec<JoinHandle<()>>,
}

impl Load {
    fn start(target: SocketAddr, host: &str, rate: u32) -> Self {
        const WORKERS: u32 = 4;
        let errors = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let period = Duration::from_secs(1) * WORKERS / rate.max(1);
        let tasks = (0..WORKERS)
            .map(|worker| {
                let (errors, stop, sent, failed) =
                    (errors.clone(), stop.clone(), sent.clone(), failed.clone());
                let host = host.to_owned();
                tokio::spawn(async move {
                    let http = client(1);
                    let Ok(uri) = format!("http://{target}/").parse::<http::Uri>() else {
                        return;
                    };
                    let mut ticker = tokio::time::interval(period);
                    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    let mut n = u64::from(worker);
                    while !stop.load(Ordering::Relaxed) {
                        ticker.tick().await;
                        n += 1;
                        let mut request = http::Request::get(uri.clone()).header("host", &host);
                        if errors.load(Ordering::Relaxed) && n.is_multiple_of(2) {
                            request = request.header("x-mirror-code", "500");
                        }
                        let Ok(request) = request.body(Empty::<Bytes>::new()) else {
                            continue;
                        };
                        sent.fetch_add(1, Ordering::Relaxed);
                        let ok = match tokio::time::timeout(
                            Duration::from_secs(5),
                            http.request(request),
                        )
                        .await
                        {
                            Ok(Ok(response)) => {
                                let status = response.status();
                                let _ = response.into_body().collect().await;
                                status.is_success()
                            }
                            _ => false,
                        };
                        if !ok {
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                })
            })
            .collect();
        Self {
            errors,
            stop,
            sent,
            failed,
            tasks,
        }
    }

    async fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for task in std::mem::take(&mut self.tasks) {
            let _ = tokio::time::timeout(Duration::from_secs(6), task).await;
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
