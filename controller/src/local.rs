//! Local mode: the whole loop on one machine. The controller's ingest on 127.0.0.1, a real Envoy
//! with the Weir filter in front of the app's processes, the local platform, and the runner.
//! State (status, events, ports, the promoted template) lives in a state folder, so a stopped
//! controller resumes where it was.

use std::fs::OpenOptions;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use crate::analysis::{self, Event, Severity};
use crate::exporter::{self, Recorder};
use crate::filter_module::{FilterModule, InstallKind};
use crate::ingest::transport::{TlsFiles, Transport};
use crate::ingest::{Ingest, IngestConfig};
use crate::metrics::prometheus::{
    Credentials, PrometheusAddress, PrometheusConfig, PrometheusSource, DEFAULT_TIMEOUT,
};
use crate::metrics::select::{SelectingSource, SourcePolicy};
use crate::metrics::template::Templates;
use crate::notify::files::DirProviders;
use crate::notify::Notifier;
use crate::platform::local::envoy::{
    ControllerTls, EnvoyBootstrap, EnvoyProcess, FilterInstall, WasmFilter,
};
use crate::platform::local::guard::{GuardError, ProcessGuard};
use crate::platform::local::{LocalPlatform, LocalPorts};
use crate::runner::{Journal, RunError, Runner};
use crate::spec::{self, CanaryPlan, CanaryStatus, Phase, Timestamp};
use crate::traffic::{self, Directives};

/// Everything local mode needs to start.
#[derive(Debug, Clone)]
pub struct LocalOptions {
    /// The Canary file (Flagger's format, `apiVersion: weir.dev/v1alpha1`).
    pub canary: PathBuf,
    /// The folder of workload files (`<target>.yaml`).
    pub workloads: PathBuf,
    /// The state folder.
    pub state: PathBuf,
    /// Port of Envoy's listener on 127.0.0.1 (0: any free port).
    pub listen_port: u16,
    /// The Envoy binary.
    pub envoy: PathBuf,
    /// The Weir filter (.wasm).
    pub wasm: PathBuf,
    /// How often filters report.
    pub report_interval: Duration,
    /// Divide every duration of the analysis by this (the demo's time compression); 1 = real time.
    pub time_scale: u32,
    /// Print each event as it happens.
    pub echo_events: bool,
    /// How the filter gets into Envoy: as Istio delivers a WasmPlugin (discovered through ECDS),
    /// or as the EnvoyFilter alternative installs it (Envoy fetches the module from this
    /// controller's HTTP port, pinned by its sha256).
    pub filter_install: InstallKind,
    /// Envoy's worker threads.
    pub envoy_concurrency: u32,
    /// Serve the filters' stream over TLS, with Envoy presenting a workload certificate (as in a
    /// mesh); None: plaintext on loopback.
    pub telemetry_tls: Option<LocalTls>,
    /// Port of the filters' stream on 127.0.0.1 (0: any free port).
    pub telemetry_port: u16,
    /// Where Envoy's filter reports instead of this controller: a relay of it (another replica's
    /// ingest, `weir ingest-server --relay-to`), as a standby replica serves filters in a
    /// cluster. None: to this controller.
    pub filters_report_to: Option<SocketAddr>,
}

/// TLS between local mode's Envoy and its controller, as in a mesh: the controller verifies
/// Envoy's workload certificate (a SPIFFE id) against the CA, and Envoy the controller's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalTls {
    /// The controller's certificate, key and the CA both certificates chain to.
    pub controller: TlsFiles,
    /// Envoy's certificate (with its `spiffe://` URI SAN).
    pub envoy_cert: PathBuf,
    /// Envoy's private key.
    pub envoy_key: PathBuf,
}

/// Where local mode's checks get their numbers, and where it publishes its own metrics. The
/// default: streamed data, no Prometheus, no metrics endpoint.
#[derive(Debug, Clone, Default)]
pub struct LocalMetricsOptions {
    /// Which source the built-in checks use (`auto`: streamed while filters report).
    pub source: SourcePolicy,
    /// The global Prometheus address, for Canaries without `spec.metricsServer`.
    pub prometheus: Option<String>,
    /// Credentials for the global Prometheus: a Secret manifest or a YAML map with `username`
    /// and `password`, or `token`.
    pub prometheus_credentials: Option<PathBuf>,
    /// How long one Prometheus query may take (default 5s).
    pub prometheus_timeout: Option<Duration>,
    /// Where to serve the controller's own metrics (`/metrics`); `None`: not served.
    pub listen_metrics: Option<SocketAddr>,
}

/// Why local mode could not start.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    /// The Canary file can't be read or parsed.
    #[error("{path}: {reason}")]
    Canary {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Something needed to run could not be set up.
    #[error("{0}")]
    Setup(String),
    /// The state folder is another controller's, or its processes still run.
    #[error(transparent)]
    State(#[from] GuardError),
}

/// The signals that stop local mode: SIGINT (Ctrl-C), SIGTERM (`kill`, `timeout`, systemd) and
/// SIGHUP (the terminal closed). Listened to for the life of the process: a signal that
/// arrives while a step runs is kept until the next wait, where a fresh `ctrl_c()` per wait
/// would miss it.
pub struct StopSignals {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
    hangup: tokio::signal::unix::Signal,
}

impl StopSignals {
    /// Starts listening (from now on these signals no longer end the process by themselves).
    pub fn listen() -> std::io::Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Self {
            interrupt: signal(SignalKind::interrupt())?,
            terminate: signal(SignalKind::terminate())?,
            hangup: signal(SignalKind::hangup())?,
        })
    }

    /// The next stop signal (at once if one came since the last call), by name.
    pub async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.interrupt.recv() => "SIGINT",
            _ = self.terminate.recv() => "SIGTERM",
            _ = self.hangup.recv() => "SIGHUP",
        }
    }
}

/// One recorded event, as `kubectl describe canary` lists them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordedEvent {
    /// When.
    pub time: Timestamp,
    /// The event.
    #[serde(flatten)]
    pub event: Event,
}

/// The events of a run, shared with whoever displays them.
pub type EventLog = Arc<Mutex<Vec<RecordedEvent>>>;

/// The local journal: `status.json`, `events.jsonl`, and `retry` (write a new token to retry a
/// failed version: `weir retry`).
pub struct LocalJournal {
    state: PathBuf,
    events: EventLog,
    echo: bool,
}

impl LocalJournal {
    /// A journal in `state`, loading earlier events.
    pub fn new(state: &Path, echo: bool) -> Self {
        let earlier = std::fs::read_to_string(state.join("events.jsonl"))
            .map(|text| {
                text.lines()
                    .filter_map(|l| serde_json::from_str(l).ok())
                    .collect()
            })
            .unwrap_or_default();
        Self {
            state: state.to_owned(),
            events: Arc::new(Mutex::new(earlier)),
            echo,
        }
    }

    /// The shared event log.
    pub fn events(&self) -> EventLog {
        self.events.clone()
    }
}

impl Journal for LocalJournal {
    fn load(&self) -> Result<Option<CanaryStatus>, String> {
        let path = self.state.join("status.json");
        match std::fs::read_to_string(&path) {
            Ok(text) => serde_json::from_str(&text).map(Some).map_err(|e| {
                format!(
                    "{} is not a valid status ({e}); delete the state folder to start over",
                    path.display()
                )
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("cannot read {}: {e}", path.display())),
        }
    }

    fn save(&mut self, status: &CanaryStatus) -> Result<(), String> {
        // Write then rename: a crash never leaves half a status behind.
        let path = self.state.join("status.json");
        let tmp = self.state.join("status.json.tmp");
        let text = serde_json::to_string_pretty(status).map_err(|e| e.to_string())?;
        std::fs::write(&tmp, text)
            .and_then(|()| std::fs::rename(&tmp, &path))
            .map_err(|e| format!("cannot write {}: {e}", path.display()))
    }

    fn event(&mut self, event: &Event) {
        let recorded = RecordedEvent {
            time: Timestamp::from_system_time(SystemTime::now()),
            event: event.clone(),
        };
        if self.echo {
            println!("{}", describe_line(&recorded, None));
        }
        if let Ok(line) = serde_json::to_string(&recorded) {
            let _ = OpenOptions::new()
                .create(true)
                .append(true)
                .open(self.state.join("events.jsonl"))
                .and_then(|mut f| writeln!(f, "{line}"));
        }
        self.events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(recorded);
    }

    fn retry_token(&self) -> Option<String> {
        std::fs::read_to_string(self.state.join("retry"))
            .ok()
            .map(|t| t.trim().to_owned())
            .filter(|t| !t.is_empty())
    }

    fn request(&self) -> Option<analysis::OperatorRequest> {
        read_request(&self.state).ok().flatten()
    }

    fn deleting(&self) -> bool {
        self.state.join("delete").exists()
    }
}

/// The file `weir promote`, `abort`, `pause` and `resume` write their request into.
pub const REQUEST_FILE: &str = "request";

/// The request in the state folder's [`REQUEST_FILE`]: `{"verb": "pause", "token": "...",
/// "by": "alice"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct RequestFile {
    verb: String,
    token: String,
    by: String,
}

/// The request waiting in `state`, if any.
pub fn read_request(state: &Path) -> Result<Option<analysis::OperatorRequest>, String> {
    let path = state.join(REQUEST_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    let file: RequestFile = serde_json::from_str(&text)
        .map_err(|e| format!("{} is not a request ({e})", path.display()))?;
    let verb = analysis::Verb::parse(&file.verb)
        .ok_or_else(|| format!("{}: unknown verb `{}`", path.display(), file.verb))?;
    Ok(Some(analysis::OperatorRequest {
        verb,
        token: file.token,
        by: file.by,
    }))
}

/// Writes `request` into `state` at once (write, then rename: the controller never reads half
/// a request).
pub fn write_request(state: &Path, request: &analysis::OperatorRequest) -> Result<(), String> {
    let file = RequestFile {
        verb: request.verb.as_str().to_owned(),
        token: request.token.clone(),
        by: request.by.clone(),
    };
    let path = state.join(REQUEST_FILE);
    let tmp = state.join("request.tmp");
    let text = serde_json::to_string(&file).map_err(|e| e.to_string())?;
    std::fs::write(&tmp, text)
        .and_then(|()| std::fs::rename(&tmp, &path))
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// The events recorded in `state` (`events.jsonl`), oldest first.
pub fn read_events(state: &Path) -> Vec<RecordedEvent> {
    LocalJournal::new(state, false)
        .events()
        .lock()
        .map(|e| e.clone())
        .unwrap_or_default()
}

/// The status in `state`, if the folder has one.
pub fn read_status(state: &Path) -> Result<Option<CanaryStatus>, String> {
    LocalJournal::new(state, false).load()
}

/// One event as a row of `kubectl describe canary`'s Events table.
pub fn describe_line(e: &RecordedEvent, since: Option<Timestamp>) -> String {
    let kind = match e.event.severity {
        Severity::Normal => "Normal ",
        Severity::Warning => "Warning",
    };
    let age = since.map_or_else(
        || e.time.to_string(),
        |start| format!("{:>5.1}s", e.time.since(start).as_secs_f64()),
    );
    format!(
        "  {kind}  {:<8} {age}  weir  {}",
        e.event.reason, e.event.message
    )
}

/// Requests a retry of a failed version: writes a new token into the state folder.
pub fn request_retry(state: &Path) -> Result<String, String> {
    let token = format!(
        "{}",
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    );
    std::fs::write(state.join("retry"), &token)
        .map_err(|e| format!("cannot write {}: {e}", state.join("retry").display()))?;
    Ok(token)
}

/// A retry `weir retry` requested: the controller running on the state folder takes it at its
/// next step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryRequested {
    /// The token written into `<state>/retry`.
    pub token: String,
    /// The pid of the controller that will act on it.
    pub controller_pid: u32,
}

/// Why `weir retry` requested nothing: a retry would not happen.
#[derive(Debug, thiserror::Error)]
pub enum RetryRefused {
    /// The folder holds no status: not a state folder, or its canary was never started.
    #[error("{} holds no canary status ({} is missing): pass the --state folder of a weir local that ran", .state.display(), .state.join("status.json").display())]
    NoStatus {
        /// The state folder.
        state: PathBuf,
    },
    /// The status cannot be read.
    #[error("{0}")]
    Unreadable(String),
    /// Only a Failed canary is retried; the engine would ignore the request.
    #[error("the canary in {} is {phase}, not Failed: only a failed version can be retried, so nothing was requested", .state.display())]
    NotFailed {
        /// The state folder.
        state: PathBuf,
        /// Its phase (and weight while it runs).
        phase: String,
    },
    /// No controller runs on the folder, so nobody would act on the request now.
    #[error("no weir local runs on {}: nothing was requested. Start it on that folder (weir local ... --state {}), then run weir retry again", .state.display(), .state.display())]
    NoController {
        /// The state folder.
        state: PathBuf,
    },
    /// The request could not be written.
    #[error("{0}")]
    Write(String),
}

/// `weir retry`: requests a retry of the failed version in `state`, when one would happen: the
/// canary there is Failed and a controller runs on the folder. Otherwise says why not, and
/// writes nothing.
pub fn retry_failed(state: &Path) -> Result<RetryRequested, RetryRefused> {
    let status = LocalJournal::new(state, false)
        .load()
        .map_err(RetryRefused::Unreadable)?
        .ok_or_else(|| RetryRefused::NoStatus {
            state: state.to_owned(),
        })?;
    match status.phase {
        Some(Phase::Failed) => {}
        phase => {
            let phase = match phase {
                None => "not started yet".to_owned(),
                Some(
                    p @ (Phase::Progressing
                    | Phase::WaitingPromotion
                    | Phase::Promoting
                    | Phase::Finalising),
                ) => format!("{p} (canary weight {})", status.canary_weight),
                Some(p) => p.to_string(),
            };
            return Err(RetryRefused::NotFailed {
                state: state.to_owned(),
                phase,
            });
        }
    }
    let controller = crate::platform::local::guard::running_controller(state).ok_or_else(|| {
        RetryRefused::NoController {
            state: state.to_owned(),
        }
    })?;
    let token = request_retry(state).map_err(RetryRefused::Write)?;
    Ok(RetryRequested {
        token,
        controller_pid: controller.pid,
    })
}

/// Divides every duration of the analysis by `factor` (the demo's compressed time).
pub fn compress_time(plan: &mut CanaryPlan, factor: u32) {
    if factor <= 1 {
        return;
    }
    plan.analysis.interval /= factor;
    plan.progress_deadline /= factor;
    for check in &mut plan.analysis.metrics {
        check.window /= factor;
    }
}

/// Reads and compiles a Canary file; warnings are returned for the caller to show once.
pub fn load_plan(path: &Path) -> Result<(CanaryPlan, Vec<String>), LocalError> {
    let err = |reason: String| LocalError::Canary {
        path: path.to_owned(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    let canary = spec::from_yaml(&text).map_err(|e| err(e.to_string()))?;
    let compiled = canary.compile().map_err(|e| err(e.to_string()))?;
    let mut warnings: Vec<String> = compiled.warnings.iter().map(ToString::to_string).collect();
    warnings.extend(compiled.plan.kubernetes_only_settings().into_iter().map(|path| {
        format!("{path}: ignored in local mode, it shapes Kubernetes objects (it takes effect on Kubernetes)")
    }));
    Ok((compiled.plan, warnings))
}

/// The canary's secret routing value for this state folder: from `<state>/route-key`, a random
/// key made on the first start (so that a restarted controller, its Envoy and its routes agree).
fn route_value(state: &Path) -> Result<String, LocalError> {
    use ring::rand::SecureRandom;
    let path = state.join("route-key");
    let key = match std::fs::read_to_string(&path) {
        Ok(key) if !key.trim().is_empty() => key.trim().to_owned(),
        _ => {
            let mut bytes = [0u8; 16];
            ring::rand::SystemRandom::new()
                .fill(&mut bytes)
                .map_err(|_| LocalError::Setup("the system has no random numbers".to_owned()))?;
            let key: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
            std::fs::write(&path, &key)
                .map_err(|e| LocalError::Setup(format!("cannot write {}: {e}", path.display())))?;
            key
        }
    };
    Ok(traffic::route_secret(key.as_bytes()))
}

/// Refuses a port another program listens on, before anything is started there. Envoy binds
/// its listener with SO_REUSEPORT, so a second Envoy (an orphan, or another weir local) would
/// share the port without a word and get half the connections; this bind, without it, fails
/// on any listener already there.
fn ensure_port_free(port: u16, what: &str, fix: &str) -> Result<(), LocalError> {
    std::net::TcpListener::bind(("127.0.0.1", port))
        .map(drop)
        .map_err(|e| {
            LocalError::Setup(format!(
                "port {port} on 127.0.0.1, for {what}, is in use by another program ({e}): {fix}"
            ))
        })
}

/// What changed among the files a Canary is read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Edit {
    /// Nothing (or only their times).
    None,
    /// The Canary file.
    Canary,
    /// Another YAML file beside it (MetricTemplates and their Secrets are read from there).
    Beside,
}

/// Notices edits of the Canary file and of the YAML files beside it. Sizes and modification
/// times are compared at every step (a few `stat`s); contents are read only when those moved.
#[derive(Debug)]
struct CanaryWatch {
    canary: PathBuf,
    stamps: Vec<(PathBuf, u64, Option<SystemTime>)>,
    canary_text: Option<String>,
    beside: u64,
}

impl CanaryWatch {
    /// Watches `canary` from its contents now.
    fn new(canary: &Path) -> Self {
        let mut watch = Self {
            canary: canary.to_owned(),
            stamps: Vec::new(),
            canary_text: None,
            beside: 0,
        };
        watch.poll();
        watch
    }

    fn folder(&self) -> &Path {
        self.canary
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
    }

    fn beside_files(&self) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(self.folder())
            .map(|entries| {
                entries
                    .filter_map(|e| Some(e.ok()?.path()))
                    .filter(|p| {
                        matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml"))
                            && p.file_name() != self.canary.file_name()
                    })
                    .collect()
            })
            .unwrap_or_default();
        files.sort();
        files
    }

    /// What changed since the last call.
    fn poll(&mut self) -> Edit {
        let mut files = vec![self.canary.clone()];
        files.extend(self.beside_files());
        let stamps: Vec<(PathBuf, u64, Option<SystemTime>)> = files
            .into_iter()
            .map(|path| {
                let meta = std::fs::metadata(&path).ok();
                let len = meta.as_ref().map_or(0, std::fs::Metadata::len);
                let modified = meta.and_then(|m| m.modified().ok());
                (path, len, modified)
            })
            .collect();
        if stamps == self.stamps {
            return Edit::None;
        }
        self.stamps = stamps;
        let canary_text = std::fs::read_to_string(&self.canary).ok();
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        for (path, _, _) in self.stamps.iter().skip(1) {
            std::hash::Hash::hash(&path, &mut hasher);
            std::hash::Hash::hash(&std::fs::read(path).unwrap_or_default(), &mut hasher);
        }
        let beside = std::hash::Hasher::finish(&hasher);
        let edit = if canary_text != self.canary_text {
            Edit::Canary
        } else if beside != self.beside {
            Edit::Beside
        } else {
            Edit::None
        };
        self.canary_text = canary_text;
        self.beside = beside;
        edit
    }
}

/// A running local mode.
pub struct LocalMode {
    runner: Runner<LocalPlatform, SelectingSource, LocalJournal>,
    envoy: EnvoyProcess,
    ingest: Ingest,
    events: EventLog,
    stop_ingest: Option<oneshot::Sender<()>>,
    warnings: Vec<String>,
    recorder: Recorder,
    metrics_addr: Option<SocketAddr>,
    module_url: Option<String>,
    telemetry_addr: SocketAddr,
    stop_metrics: Option<oneshot::Sender<()>>,
    /// The failure recorded last, until a step succeeds.
    last_error: Option<String>,
    /// What the Canary is read from, to reload it when it is edited.
    options: LocalOptions,
    metrics_options: LocalMetricsOptions,
    watch: CanaryWatch,
    /// Why the last edit of the Canary could not be used, until one can.
    last_reload_problem: Option<String>,
    /// When `live.json` was last written.
    live_written: Option<std::time::Instant>,
    // Last: dropped after Envoy and the app processes, it kills whatever of theirs still runs.
    guard: Arc<ProcessGuard>,
}

/// The metric source local mode analyses with: MetricTemplates from the Canary's folder, the
/// global Prometheus, and the policy; checks that cannot run are refused before anything starts.
fn metric_source(
    options: &LocalOptions,
    metrics: &LocalMetricsOptions,
    plan: &CanaryPlan,
    ingest: &Ingest,
    warnings: &mut Vec<String>,
) -> Result<SelectingSource, LocalError> {
    let folder = options
        .canary
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let invalid = |reason: String| LocalError::Canary {
        path: options.canary.clone(),
        reason,
    };
    let (templates, template_warnings) = Templates::load_dir(folder, &plan.namespace)
        .map_err(|e| invalid(format!("MetricTemplates beside the Canary: {e}")))?;
    warnings.extend(template_warnings);
    templates
        .check_plan(plan)
        .map_err(|e| invalid(e.to_string()))?;
    let timeout = metrics.prometheus_timeout.unwrap_or(DEFAULT_TIMEOUT);
    let global = match &metrics.prometheus {
        None => None,
        Some(address) => Some(PrometheusConfig {
            address: PrometheusAddress::try_new(address)
                .map_err(|e| LocalError::Setup(e.to_string()))?,
            credentials: metrics
                .prometheus_credentials
                .as_deref()
                .map(Credentials::from_file)
                .transpose()
                .map_err(LocalError::Setup)?,
            timeout,
            insecure_skip_verify: false,
        }),
    };
    let prometheus = PrometheusSource::new(global, templates);
    let server = prometheus
        .server_for(plan)
        .map_err(|e| invalid(format!("spec.metricsServer: {e}")))?;
    if metrics.source == SourcePolicy::Prometheus && server.is_none() {
        return Err(LocalError::Setup(
            "the metric source is prometheus, but there is no Prometheus address: set spec.metricsServer on the Canary or pass --prometheus-address".to_owned(),
        ));
    }
    // A few report intervals: one late report must not flip a check to Prometheus.
    let freshness = (options.report_interval * 4).max(Duration::from_secs(1));
    Ok(SelectingSource::new(ingest.clone(), prometheus, metrics.source).with_freshness(freshness))
}

/// Alerts and event hooks for local mode: AlertProviders from YAML files beside the Canary
/// (read again at each alert); a Canary naming a provider that is not there is refused.
fn notifier(
    options: &LocalOptions,
    plan: &CanaryPlan,
    warnings: &mut Vec<String>,
) -> Result<Notifier, LocalError> {
    let folder = options
        .canary
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let providers = DirProviders::new(folder, &plan.namespace);
    warnings.extend(
        providers
            .check_plan(plan)
            .map_err(|reason| LocalError::Canary {
                path: options.canary.clone(),
                reason,
            })?,
    );
    Ok(Notifier::start(
        Arc::new(providers),
        crate::http::shared().clone(),
    ))
}

impl LocalMode {
    /// Starts ingest, the app's processes (as the state folder says), Envoy, and the runner,
    /// with streamed analysis and no metrics endpoint.
    pub async fn start(options: &LocalOptions) -> Result<Self, LocalError> {
        Self::start_with(options, &LocalMetricsOptions::default()).await
    }

    /// [`LocalMode::start`] with a choice of metric source (Prometheus, MetricTemplates beside
    /// the Canary) and, optionally, the controller's own metrics endpoint.
    pub async fn start_with(
        options: &LocalOptions,
        metrics: &LocalMetricsOptions,
    ) -> Result<Self, LocalError> {
        // Before reading it: an edit made meanwhile is then seen at the first step.
        let watch = CanaryWatch::new(&options.canary);
        let (mut plan, mut warnings) = load_plan(&options.canary)?;
        compress_time(&mut plan, options.time_scale);
        plan.service
            .routes
            .check_for_envoy()
            .map_err(|reason| LocalError::Canary {
                path: options.canary.clone(),
                reason,
            })?;
        std::fs::create_dir_all(&options.state).map_err(|e| {
            LocalError::Setup(format!("cannot create {}: {e}", options.state.display()))
        })?;
        plan.canary_route_value = route_value(&options.state)?;
        // Before anything starts: one controller per state folder, and its processes die with it.
        let guard = ProcessGuard::claim(&options.state)?;
        let ports = LocalPorts::load_or_pick(&options.state).map_err(LocalError::Setup)?;
        if options.listen_port != 0 {
            ensure_port_free(
                options.listen_port,
                "Envoy's listener",
                "choose another --port, or stop the program that listens there",
            )?;
        }
        let slots = [
            (ports.primary[0], "primary slot 0"),
            (ports.primary[1], "primary slot 1"),
            (ports.canary, "canary"),
        ];
        for (port, role) in slots {
            ensure_port_free(
                port,
                &format!(
                    "the {} {role} (from {})",
                    plan.target.name,
                    options.state.join("ports.json").display()
                ),
                "stop that program, or delete that file and new ports are picked",
            )?;
        }

        // Buckets as fine as the reports, so short (time-compressed) windows hold whole reports.
        let ingest = Ingest::try_new(IngestConfig {
            bucket_width: options.report_interval.min(Duration::from_secs(1)),
            transport: match &options.telemetry_tls {
                Some(tls) => Transport::Tls(tls.controller.clone()),
                None => Transport::PlaintextLoopback,
            },
            ..IngestConfig::default()
        })
        .map_err(|e| LocalError::Setup(e.to_string()))?;
        let source = metric_source(options, metrics, &plan, &ingest, &mut warnings)?;
        let notifier = notifier(options, &plan, &mut warnings)?;
        let recorder = Recorder::new();
        recorder.include_ingest(ingest.clone());
        let module = match options.filter_install {
            InstallKind::WasmPlugin => None,
            InstallKind::EnvoyFilter => Some(Arc::new(
                FilterModule::load(&options.wasm).map_err(|e| LocalError::Setup(e.to_string()))?,
            )),
            InstallKind::None => return Err(LocalError::Setup(
                "local mode installs the filter in its Envoy itself: use wasmplugin or envoyfilter"
                    .to_owned(),
            )),
        };
        // The controller's HTTP port: /metrics when asked for, and the module for an EnvoyFilter
        // install (then on a free port of 127.0.0.1 if no metrics address was given).
        let http_addr = metrics.listen_metrics.or_else(|| {
            module
                .as_ref()
                .map(|_| SocketAddr::from(([127, 0, 0, 1], 0)))
        });
        let (http_bound, stop_metrics) = match http_addr {
            None => (None, None),
            Some(addr) => {
                let (stop, stopped) = oneshot::channel::<()>();
                let bound = exporter::serve(addr, recorder.clone(), module.clone(), async {
                    let _ = stopped.await;
                })
                .await
                .map_err(|e| LocalError::Setup(e.to_string()))?;
                (Some(bound), Some(stop))
            }
        };
        let metrics_addr = http_bound.filter(|_| metrics.listen_metrics.is_some());
        let module_url = module
            .as_ref()
            .zip(http_bound)
            .map(|(module, addr)| format!("http://{addr}{}", module.url_path()));
        let (stop_tx, stop_rx) = oneshot::channel();
        let served = ingest
            .serve(
                SocketAddr::from(([127, 0, 0, 1], options.telemetry_port)),
                async {
                    let _ = stop_rx.await;
                },
            )
            .await
            .map_err(|e| LocalError::Setup(format!("cannot start the telemetry server: {e}")))?;

        let platform = LocalPlatform::new(options.workloads.clone(), options.state.clone(), ports)
            .with_guard(guard.clone());
        let journal = LocalJournal::new(&options.state, options.echo_events);
        let events = journal.events();
        let mut runner = Runner::new(
            plan.clone(),
            platform,
            source,
            Directives::new(ingest.clone()),
            journal,
        )
        .map_err(LocalError::Setup)?
        .with_confirm_wait(options.report_interval * 3)
        .with_notifier(notifier);

        // Bring back what the persisted status says runs, and its route, before Envoy connects.
        let canary_running = crate::analysis::canary_runs(runner.status());
        let canary_ref = runner.canary().clone();
        runner
            .platform()
            .resume(&canary_ref, canary_running)
            .await
            .map_err(|e| LocalError::Setup(e.to_string()))?;
        runner
            .restore_route()
            .await
            .map_err(|e| LocalError::Setup(e.to_string()))?;

        let config_json = serde_json::json!({
            "reportInterval": format!("{}ms", options.report_interval.as_millis()),
            "directiveGracePeriod": format!("{}ms", (options.report_interval * 10).as_millis()),
        })
        .to_string();
        let local = |port| SocketAddr::from(([127, 0, 0, 1], port));
        let mut bootstrap = EnvoyBootstrap::new(local(ports.primary[0]), local(ports.canary));
        bootstrap.primary_standby = Some(local(ports.primary[1]));
        bootstrap.routes = plan.service.routes.clone();
        bootstrap.listener_port = options.listen_port;
        bootstrap.controller = Some(options.filters_report_to.unwrap_or(served.local_addr()));
        bootstrap.canary_value = plan.canary_route_value.clone();
        bootstrap.controller_tls = options.telemetry_tls.as_ref().map(|tls| ControllerTls {
            cert: tls.envoy_cert.clone(),
            key: tls.envoy_key.clone(),
            ca: tls.controller.client_ca.clone(),
        });
        bootstrap.namespace = plan.namespace.clone();
        bootstrap.workload = plan.target.name.clone();
        bootstrap.host = traffic::hosts(&plan)
            .into_iter()
            .nth(1)
            .unwrap_or_else(|| plan.service.name.clone());
        bootstrap.wasm = Some(match (&module, http_bound) {
            (Some(module), Some(server)) => WasmFilter {
                config_json,
                install: FilterInstall::EnvoyFilter {
                    server,
                    path: module.url_path(),
                    sha256: module.sha256().to_owned(),
                },
            },
            _ => WasmFilter::wasm_plugin(
                options.wasm.clone(),
                config_json,
                options.state.join("weir-filter.ecds.json"),
            ),
        });
        let envoy_binary = options.envoy.clone();
        let work_dir = options.state.clone();
        let concurrency = options.envoy_concurrency.max(1);
        let envoy_guard = guard.clone();
        let envoy = tokio::task::spawn_blocking(move || {
            EnvoyProcess::start_in_group(
                &envoy_binary,
                &bootstrap,
                &work_dir,
                concurrency,
                Some(envoy_guard.group()),
            )
            .inspect(|envoy| envoy_guard.register("envoy", envoy.pid()))
        })
        .await
        .map_err(|e| LocalError::Setup(e.to_string()))?
        .map_err(|e| LocalError::Setup(e.to_string()))?;
        Ok(Self {
            runner,
            envoy,
            ingest,
            events,
            stop_ingest: Some(stop_tx),
            warnings,
            recorder,
            metrics_addr,
            module_url,
            telemetry_addr: served.local_addr(),
            stop_metrics,
            last_error: None,
            options: options.clone(),
            metrics_options: metrics.clone(),
            watch,
            last_reload_problem: None,
            live_written: None,
            guard,
        })
    }

    /// Fields of the Canary accepted without effect, to show once.
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// Where to send requests.
    pub fn listener(&self) -> SocketAddr {
        self.envoy.listener_addr()
    }

    /// The host name requests should carry.
    pub fn host(&self) -> String {
        let plan = self.runner.plan();
        format!("{}.{}", plan.service.name, plan.namespace)
    }

    /// The current status.
    pub fn status(&self) -> &CanaryStatus {
        self.runner.status()
    }

    /// The plan (after time compression).
    pub fn plan(&self) -> &CanaryPlan {
        self.runner.plan()
    }

    /// The events so far.
    pub fn events(&self) -> EventLog {
        self.events.clone()
    }

    /// The telemetry ingest (for live numbers).
    pub fn ingest(&self) -> &Ingest {
        &self.ingest
    }

    /// The Envoy.
    pub fn envoy(&self) -> &EnvoyProcess {
        &self.envoy
    }

    /// Where the controller's own metrics are served (`/metrics`), if they are.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// Where the filters' telemetry stream is served.
    pub fn telemetry_addr(&self) -> SocketAddr {
        self.telemetry_addr
    }

    /// Where the controller serves the filter module, for the EnvoyFilter install.
    pub fn filter_module_url(&self) -> Option<&str> {
        self.module_url.as_deref()
    }

    /// The controller's own metrics.
    pub fn recorder(&self) -> &Recorder {
        &self.recorder
    }

    /// One step of the runner; errors are recorded as Warning events and retried next time.
    /// A failure that repeats at every step (a missing or invalid workload file fails every
    /// 50ms until it is fixed) is recorded once, and again only when it changes or comes back
    /// after a step that succeeded.
    pub async fn tick(&mut self) {
        let started = std::time::Instant::now();
        self.reload_canary().await;
        match self.runner.tick().await {
            Ok(()) => self.last_error = None,
            Err(e) => self.record_error(&e),
        }
        self.recorder
            .record(self.runner.plan(), self.runner.status(), started.elapsed());
        self.write_live();
    }

    /// Writes the live numbers for `weir status` and `weir watch` into the state folder, at
    /// most twice a second (a tick comes every 50-250ms).
    fn write_live(&mut self) {
        if self
            .live_written
            .is_some_and(|at| at.elapsed() < Duration::from_millis(500))
        {
            return;
        }
        self.live_written = Some(std::time::Instant::now());
        let now = Timestamp::from_system_time(SystemTime::now());
        let snapshot = crate::live::LiveSnapshot::take(
            self.runner.plan(),
            &self.ingest,
            self.runner.next_step_at(),
            now,
        );
        let path = self.options.state.join(crate::live::LIVE_FILE);
        let tmp = self.options.state.join("live.json.tmp");
        if let Ok(text) = serde_json::to_string(&snapshot) {
            let _ = std::fs::write(&tmp, text).and_then(|()| std::fs::rename(&tmp, &path));
        }
    }

    fn record_error(&mut self, e: &RunError) {
        let message = e.to_string();
        if self.last_error.as_ref() == Some(&message) {
            return;
        }
        self.last_error = Some(message.clone());
        self.record_warning(message);
    }

    /// Like Kubernetes mode, which reads the Canary at every reconcile: an edited Canary file
    /// (or MetricTemplate beside it) is used from the next step on, once it compiles. A Canary
    /// that names another canary or target is not taken (the Envoy and the state folder are
    /// this one's); an edit that cannot be used is said once, and the last good one runs on.
    async fn reload_canary(&mut self) {
        let edit = self.watch.poll();
        if edit == Edit::None {
            return;
        }
        let path = self.options.canary.display().to_string();
        let (plan, source, warnings) = match self.compile_edit() {
            Ok(compiled) => compiled,
            Err(problem) => {
                let message = format!(
                    "{path} changed but cannot be used: {problem}; still running the Canary as it was"
                );
                if self.last_reload_problem.as_ref() != Some(&message) {
                    self.last_reload_problem = Some(message.clone());
                    self.record_warning(message);
                }
                return;
            }
        };
        self.last_reload_problem = None;
        let old = self.runner.plan().clone();
        if plan == old && edit == Edit::Canary {
            // An edit that changes nothing (a comment, say) needs no word.
            self.runner.replace_plan(plan, source);
            return;
        }
        for warning in warnings {
            if !self.warnings.contains(&warning) {
                self.record_warning(format!("{path}: {warning}"));
                self.warnings.push(warning);
            }
        }
        let status = self.runner.status().clone();
        let route_of = |plan: &CanaryPlan| {
            let revision = status.last_applied_spec.as_deref().unwrap_or_default();
            analysis::desired_route(plan, &status)
                .map(|r| traffic::directive_entry(plan, r, revision))
        };
        let republish = route_of(&plan) != route_of(&old);
        if plan.service.routes != old.service.routes {
            // Envoy's routes are written once, into its bootstrap.
            self.record_warning(format!(
                "{path}: the route options of spec.service changed; they take effect in local mode's Envoy when weir local restarts"
            ));
        }
        self.runner.replace_plan(plan, source);
        if republish {
            if let Err(e) = self.runner.restore_route().await {
                self.record_error(&e);
            }
        }
        let what = match edit {
            Edit::Beside => format!("the files beside {path} changed"),
            _ => format!("{path} changed"),
        };
        self.record(
            Severity::Normal,
            format!(
                "{what}: {} runs the Canary as it is now written from the next step on",
                self.runner.plan().id()
            ),
        );
    }

    /// The edited Canary compiled, with its metric source and its warnings.
    fn compile_edit(&self) -> Result<(CanaryPlan, SelectingSource, Vec<String>), String> {
        let (mut plan, mut warnings) = load_plan(&self.options.canary).map_err(|e| match e {
            LocalError::Canary { reason, .. } => reason,
            other => other.to_string(),
        })?;
        compress_time(&mut plan, self.options.time_scale);
        plan.service.routes.check_for_envoy()?;
        plan.canary_route_value = self.runner.plan().canary_route_value.clone();
        let old = self.runner.plan();
        if (&plan.namespace, &plan.name, &plan.target.name)
            != (&old.namespace, &old.name, &old.target.name)
        {
            return Err(format!(
                "it now names the Canary {} with target {}, and this controller runs {} with target {} (its Envoy and state folder are that one's): restart weir local to switch",
                plan.id(),
                plan.target.name,
                old.id(),
                old.target.name
            ));
        }
        let source = metric_source(
            &self.options,
            &self.metrics_options,
            &plan,
            &self.ingest,
            &mut warnings,
        )
        .map_err(|e| match e {
            LocalError::Canary { reason, .. } => reason,
            other => other.to_string(),
        })?;
        Ok((plan, source, warnings))
    }

    fn record_warning(&mut self, message: String) {
        self.record(Severity::Warning, message);
    }

    fn record(&mut self, severity: Severity, message: String) {
        let recorded = RecordedEvent {
            time: Timestamp::from_system_time(SystemTime::now()),
            event: Event {
                severity,
                reason: "Synced".to_owned(),
                message,
            },
        };
        println!("{}", describe_line(&recorded, None));
        self.events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(recorded);
    }

    /// How long until the engine next wants a step (capped, so retries and file changes are seen
    /// promptly).
    pub fn until_next_step(&self) -> Duration {
        let next = self.runner.next_step_at();
        let now = Timestamp::from_system_time(SystemTime::now());
        let wait = if next > now {
            next.since(now)
        } else {
            Duration::ZERO
        };
        wait.clamp(Duration::from_millis(50), Duration::from_millis(250))
    }

    /// The state folder's guard: what this controller runs, and the record of it.
    pub fn guard(&self) -> &ProcessGuard {
        &self.guard
    }

    /// Stops Envoy, the app processes and the telemetry server, and frees the state folder.
    pub async fn shutdown(mut self) {
        self.envoy.kill();
        self.runner.platform().shutdown().await;
        self.guard.release();
        if let Some(stop) = self.stop_ingest.take() {
            let _ = stop.send(());
        }
        if let Some(stop) = self.stop_metrics.take() {
            let _ = stop.send(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_mode_says_it_ignores_the_settings_that_shape_kubernetes_objects() {
        let dir = std::env::temp_dir().join(format!("weir-k8s-only-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let canary = dir.join("canary.yaml");
        std::fs::write(
            &canary,
            "apiVersion: weir.dev/v1alpha1
kind: Canary
metadata: {name: mhs}
spec:
  targetRef: {apiVersion: apps/v1, kind: Deployment, name: mhs}
  autoscalerRef: {kind: HorizontalPodAutoscaler, name: mhs}
  service:
    port: 80
    portDiscovery: true
    trafficPolicy: {tls: {mode: ISTIO_MUTUAL}}
    primary: {labels: {track: stable}}
  analysis: {interval: 1m, stepWeight: 10}
",
        )
        .unwrap();
        let (_, warnings) = load_plan(&canary).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        let why =
            "ignored in local mode, it shapes Kubernetes objects (it takes effect on Kubernetes)";
        assert_eq!(
            warnings,
            [
                format!("spec.autoscalerRef: {why}"),
                format!("spec.service.portDiscovery: {why}"),
                format!("spec.service.trafficPolicy: {why}"),
                format!("spec.service.primary: {why}"),
            ]
        );
    }

    #[test]
    fn an_edit_of_the_canary_file_or_of_a_file_beside_it_is_noticed_once() {
        let dir = std::env::temp_dir().join(format!("weir-watch-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let canary = dir.join("canary.yaml");
        std::fs::write(&canary, "kind: Canary\n").unwrap();
        std::fs::write(dir.join("template.yaml"), "kind: MetricTemplate\n").unwrap();
        let mut watch = CanaryWatch::new(&canary);
        assert_eq!(watch.poll(), Edit::None);

        std::fs::write(&canary, "kind: Canary # edited\n").unwrap();
        assert_eq!(watch.poll(), Edit::Canary);
        assert_eq!(watch.poll(), Edit::None, "an edit is noticed once");

        std::fs::write(dir.join("template.yaml"), "kind: MetricTemplate # edited\n").unwrap();
        assert_eq!(watch.poll(), Edit::Beside);
        std::fs::write(dir.join("secret.yml"), "kind: Secret\n").unwrap();
        assert_eq!(watch.poll(), Edit::Beside, "a new file beside it");

        // Written again with the same contents: nothing changed.
        std::fs::write(&canary, "kind: Canary # edited\n").unwrap();
        assert_eq!(watch.poll(), Edit::None);
        std::fs::write(dir.join("notes.txt"), "not YAML").unwrap();
        assert_eq!(watch.poll(), Edit::None, "only YAML files are read");
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn state_with(name: &str, phase: Option<Phase>) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("weir-retry-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        if let Some(phase) = phase {
            let status = CanaryStatus {
                phase: Some(phase),
                ..CanaryStatus::default()
            };
            std::fs::write(
                dir.join("status.json"),
                serde_json::to_string(&status).unwrap(),
            )
            .unwrap();
        }
        dir
    }

    #[test]
    fn a_retry_is_requested_only_of_a_failed_canary_with_a_controller_running() {
        let failed = state_with("failed", Some(Phase::Failed));
        let refused = retry_failed(&failed).unwrap_err().to_string();
        assert!(
            refused.contains("no weir local runs on") && refused.contains("nothing was requested"),
            "{refused}"
        );
        assert!(!failed.join("retry").exists());

        let controller = ProcessGuard::claim(&failed).unwrap();
        let requested = retry_failed(&failed).unwrap();
        assert_eq!(requested.controller_pid, std::process::id());
        assert_eq!(
            std::fs::read_to_string(failed.join("retry")).unwrap(),
            requested.token
        );
        drop(controller);
        let _ = std::fs::remove_dir_all(&failed);
    }

    #[test]
    fn a_retry_of_a_canary_that_is_not_failed_says_what_it_is_and_requests_nothing() {
        let succeeded = state_with("succeeded", Some(Phase::Succeeded));
        let guard = ProcessGuard::claim(&succeeded).unwrap();
        let refused = retry_failed(&succeeded).unwrap_err().to_string();
        assert!(
            refused.contains("is Succeeded, not Failed")
                && refused.contains("nothing was requested"),
            "{refused}"
        );
        assert!(!succeeded.join("retry").exists());
        drop(guard);
        let _ = std::fs::remove_dir_all(&succeeded);

        let empty = state_with("empty", None);
        let refused = retry_failed(&empty).unwrap_err().to_string();
        assert!(refused.contains("holds no canary status"), "{refused}");
        let _ = std::fs::remove_dir_all(&empty);
    }

    #[test]
    fn a_port_another_program_listens_on_is_refused_with_what_to_do() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = taken.local_addr().unwrap().port();
        let refused = ensure_port_free(port, "Envoy's listener", "choose another --port")
            .unwrap_err()
            .to_string();
        assert!(
            refused.contains(&format!(
                "port {port} on 127.0.0.1, for Envoy's listener, is in use"
            )) && refused.contains("choose another --port"),
            "{refused}"
        );
        drop(taken);
        assert!(ensure_port_free(port, "Envoy's listener", "").is_ok());
    }

    #[tokio::test]
    async fn a_stop_signal_that_arrives_while_nobody_waits_is_kept_for_the_next_wait() {
        let mut signals = StopSignals::listen().unwrap();
        let sent = std::process::Command::new("kill")
            .args(["-s", "HUP", &std::process::id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
        // Nobody waits while it arrives, as while a step runs.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let received = tokio::time::timeout(Duration::from_secs(10), signals.recv()).await;
        assert_eq!(received.ok(), Some("SIGHUP"));
    }
}
