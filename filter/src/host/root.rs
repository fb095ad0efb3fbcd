//! Root contexts. The same module runs in two roles, told apart by the plugin's root id:
//! `weir_reporter` (the singleton bootstrap service, one per Envoy) and anything else (the HTTP
//! filter, one root per worker thread plus one on the main thread).

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;

use prost::Message;
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{BufferType, ContextType, LogLevel, MetricType};
use weir_proto::v1;

use super::http::Http;
use super::props::{self, log};
use crate::config::FilterConfig;
use crate::reporter::{Command, Reporter};
use crate::routing::Version;
use crate::worker::Worker;

/// Root id of the singleton reporter (the `envoy.bootstrap.wasm` service).
pub const REPORTER_ROOT_ID: &str = "weir_reporter";
const QUEUE: &str = "weir.reports";
const DIRECTIVE_KEY: &str = "weir.directive";
const CONTACT_KEY: &str = "weir.contact";
const SERVICE: &str = "weir.v1.Telemetry";
const METHOD: &str = "Exchange";
/// Hand-overs a worker keeps when the queue refuses them, before it drops the oldest.
const MAX_UNQUEUED: usize = 16;

/// Envoy stat ids for one (canary, version).
#[derive(Debug, Clone, Copy)]
pub struct StatIds {
    requests: u32,
    failures: u32,
    /// Latency histogram, in milliseconds.
    pub duration: u32,
}

/// A worker's state, shared by its root context and its HTTP contexts.
pub struct FilterState {
    /// The host-agnostic worker.
    pub worker: Worker,
    vm_id: String,
    queue: Option<u32>,
    unqueued: VecDeque<Vec<u8>>,
    /// Per canary, per version (by `Version::index`): the stat ids, once defined (None inside:
    /// the host refused them). Keyed by `Rc<str>` so a request looks up by `&str`, allocation-free.
    stats: HashMap<Rc<str>, [Option<Option<StatIds>>; 2]>,
}

impl FilterState {
    /// The Envoy stat ids for a (canary, version), defined on first use. None if stats are off or
    /// the host refused them.
    pub fn stat_ids(&mut self, canary: &str, version: Version) -> Option<StatIds> {
        if !self.worker.config().envoy_stats {
            return None;
        }
        if !self.stats.contains_key(canary) {
            self.stats.insert(Rc::from(canary), [None, None]);
        }
        let slot = self.stats.get_mut(canary)?.get_mut(version.index())?;
        *slot.get_or_insert_with(|| define_stats(canary, version))
    }

    fn tick(&mut self) {
        let now = props::now_ns();
        self.refresh_directive();
        let contact = hostcalls::get_shared_data(CONTACT_KEY)
            .ok()
            .and_then(|(bytes, _)| bytes)
            .and_then(|b| b.get(..8).and_then(|s| <[u8; 8]>::try_from(s).ok()))
            .map(u64::from_le_bytes);
        if self.worker.observe_contact(contact, now) && self.worker.generation() > 0 {
            if self.worker.fail_safe() {
                log(
                    LogLevel::Warn,
                    "weir: no word from the controller within directiveGracePeriod; routing every canary 100% to primary",
                );
            } else {
                log(
                    LogLevel::Info,
                    "weir: controller back in contact; canary weights restored",
                );
            }
        }
        self.hand_over();
    }

    fn refresh_directive(&mut self) {
        let Ok((Some(bytes), cas)) = hostcalls::get_shared_data(DIRECTIVE_KEY) else {
            return;
        };
        if cas.is_some() && cas == self.worker.directive_cas() {
            return;
        }
        match self.worker.apply_directive(&bytes, cas) {
            Ok(problems) => problems.iter().for_each(|p| log(LogLevel::Warn, p)),
            Err(e) => log(LogLevel::Error, &e),
        }
    }

    /// Hands this worker's counts to the reporter. A batch the queue refuses is kept for the next
    /// tick rather than lost.
    fn hand_over(&mut self) {
        if self.queue.is_none() {
            self.queue = hostcalls::resolve_shared_queue(&self.vm_id, QUEUE)
                .ok()
                .flatten();
        }
        let Some(queue) = self.queue else {
            // The reporter is not up yet: keep recording; nothing is sealed, nothing is lost.
            return;
        };
        let batch = self.worker.seal_batch();
        self.publish_stats(&batch);
        self.unqueued.push_back(batch.encode_to_vec());
        while let Some(bytes) = self.unqueued.front() {
            if hostcalls::enqueue_shared_queue(queue, Some(bytes)).is_err() {
                self.queue = None;
                break;
            }
            self.unqueued.pop_front();
        }
        if self.unqueued.len() > MAX_UNQUEUED {
            self.unqueued.pop_front();
            log(
                LogLevel::Error,
                "weir: the reporter's queue refuses hand-overs; dropped the oldest batch",
            );
        }
    }

    fn publish_stats(&mut self, batch: &v1::Report) {
        for stat in &batch.stats {
            let version = if stat.version == v1::Version::Canary as i32 {
                Version::Canary
            } else {
                Version::Primary
            };
            if let Some(ids) = self.stat_ids(&stat.canary, version) {
                let _ = hostcalls::increment_metric(ids.requests, stat.requests as i64);
                let _ = hostcalls::increment_metric(ids.failures, stat.failures as i64);
            }
        }
    }
}

/// Stat names carry the canary and version; `stats_tags` in the Envoy bootstrap turn them into
/// `canary` and `version` tags (see manifests/ and the local-mode bootstrap).
fn define_stats(canary: &str, version: Version) -> Option<StatIds> {
    let name = |metric: &str| format!("{metric}.canary.{canary}.version.{}", version.name());
    Some(StatIds {
        requests: hostcalls::define_metric(MetricType::Counter, &name("weir_requests_total"))
            .ok()?,
        failures: hostcalls::define_metric(
            MetricType::Counter,
            &name("weir_request_failures_total"),
        )
        .ok()?,
        duration: hostcalls::define_metric(
            MetricType::Histogram,
            &name("weir_request_duration_milliseconds"),
        )
        .ok()?,
    })
}

struct ReporterState {
    reporter: Reporter,
    config: FilterConfig,
    queue: u32,
}

impl ReporterState {
    fn run(&mut self, commands: Vec<Command>) {
        let mut queue: VecDeque<Command> = commands.into();
        while let Some(command) = queue.pop_front() {
            match command {
                Command::OpenStream => {
                    let now = props::now_ns();
                    match hostcalls::open_grpc_stream(
                        &self.config.controller_cluster,
                        SERVICE,
                        METHOD,
                        Vec::new(),
                    ) {
                        Ok(token) => queue.extend(self.reporter.on_stream_opened(token, now)),
                        Err(status) => {
                            log(
                                LogLevel::Warn,
                                &format!(
                                    "weir: cannot open the stream to cluster `{}` ({status:?}); is controllerCluster an HTTP/2 cluster in the bootstrap? retrying",
                                    self.config.controller_cluster
                                ),
                            );
                            self.reporter.on_stream_failed(now);
                        }
                    }
                }
                Command::Send(bytes) => {
                    let Some(token) = self.reporter.stream_token() else {
                        continue;
                    };
                    if hostcalls::send_grpc_stream_message(token, Some(&bytes), false).is_err() {
                        let _ = hostcalls::close_grpc_stream(token);
                        self.reporter.on_stream_closed(token, props::now_ns());
                    }
                }
                Command::ShareDirective(bytes) => {
                    if let Err(status) =
                        hostcalls::set_shared_data(DIRECTIVE_KEY, Some(&bytes), None)
                    {
                        log(
                            LogLevel::Error,
                            &format!("weir: cannot share the directive ({status:?})"),
                        );
                    }
                }
                Command::ShareContact(now) => {
                    let _ = hostcalls::set_shared_data(CONTACT_KEY, Some(&now.to_le_bytes()), None);
                }
            }
        }
    }
}

enum Role {
    /// No valid configuration: requests pass through, only losing a client-sent routing header.
    Unconfigured,
    Filter(Rc<RefCell<FilterState>>),
    Reporter(Box<ReporterState>),
}

/// A root context in either role.
pub struct Root {
    context_id: u32,
    role: Role,
}

impl Root {
    /// A root context awaiting its configuration.
    pub fn new(context_id: u32) -> Self {
        Self {
            context_id,
            role: Role::Unconfigured,
        }
    }

    fn seed(&self) -> u64 {
        props::now_ns() ^ (u64::from(self.context_id) << 48)
    }

    fn configure_reporter(&mut self, config: FilterConfig) -> bool {
        let queue = match hostcalls::register_shared_queue(QUEUE) {
            Ok(queue) => queue,
            Err(status) => {
                log(
                    LogLevel::Error,
                    &format!("weir: cannot register the report queue ({status:?})"),
                );
                return false;
            }
        };
        let identity = v1::Reporter {
            node_id: props::string(vec!["xds", "node", "id"])
                .unwrap_or_else(|| "unknown".to_string()),
            namespace: config
                .reporter_namespace
                .clone()
                .or_else(|| props::string(vec!["xds", "node", "metadata", "NAMESPACE"]))
                .unwrap_or_default(),
            workload: config
                .reporter_workload
                .clone()
                .or_else(|| props::string(vec!["xds", "node", "metadata", "WORKLOAD_NAME"]))
                .unwrap_or_default(),
        };
        // The epoch only has to differ between VM starts of the same node.
        let epoch = crate::routing::Rng::new(self.seed()).next_u64();
        let interval = config.report_interval;
        log(
            LogLevel::Info,
            &format!(
                "weir: reporter for node `{}` started (epoch {epoch:016x}); reporting every {interval:?} to cluster `{}`",
                identity.node_id, config.controller_cluster
            ),
        );
        self.role = Role::Reporter(Box::new(ReporterState {
            reporter: Reporter::new(identity, epoch, interval.as_nanos() as u64),
            config,
            queue,
        }));
        let _ = hostcalls::set_tick_period(interval);
        true
    }

    fn configure_filter(&mut self, config: FilterConfig) -> bool {
        let vm_id = props::string(vec!["plugin_vm_id"]).unwrap_or_else(|| "weir".to_string());
        let interval = config.handover_interval();
        let mut rng = crate::routing::Rng::new(self.seed());
        let worker = Worker::new(config, rng.next_u64(), rng.next_u64());
        self.role = Role::Filter(Rc::new(RefCell::new(FilterState {
            worker,
            vm_id,
            queue: None,
            unqueued: VecDeque::new(),
            stats: HashMap::new(),
        })));
        let _ = hostcalls::set_tick_period(interval);
        true
    }
}

impl Context for Root {
    fn on_grpc_stream_message(&mut self, _token_id: u32, message_size: usize) {
        let Role::Reporter(state) = &mut self.role else {
            return;
        };
        let Ok(Some(bytes)) = hostcalls::get_buffer(BufferType::GrpcReceiveBuffer, 0, message_size)
        else {
            return;
        };
        match state.reporter.on_message(&bytes, props::now_ns()) {
            Ok(commands) => state.run(commands),
            Err(e) => log(LogLevel::Warn, &e),
        }
    }

    fn on_grpc_stream_close(&mut self, token_id: u32, status_code: u32) {
        let Role::Reporter(state) = &mut self.role else {
            return;
        };
        let _ = hostcalls::close_grpc_stream(token_id);
        if state.reporter.stream_token() == Some(token_id) {
            log(
                LogLevel::Info,
                &format!(
                    "weir: stream to the controller closed (gRPC status {status_code}); {} unacknowledged report(s) will be sent again on reconnect",
                    state.reporter.in_flight()
                ),
            );
        }
        state.reporter.on_stream_closed(token_id, props::now_ns());
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, plugin_configuration_size: usize) -> bool {
        let bytes = hostcalls::get_buffer(
            BufferType::PluginConfiguration,
            0,
            plugin_configuration_size,
        )
        .ok()
        .flatten()
        .unwrap_or_default();
        let config = match FilterConfig::parse(&bytes) {
            Ok(config) => config,
            Err(e) => {
                // Measured on Envoy 1.40: returning false here makes Envoy refuse the whole listener
                // (even with fail_open), which stops traffic. So the error is logged once and the
                // plugin stays loaded in pass-through mode instead.
                log(LogLevel::Error, &e.to_string());
                self.role = Role::Unconfigured;
                return true;
            }
        };
        let root_id = props::string(vec!["plugin_root_id"]).unwrap_or_default();
        if root_id == REPORTER_ROOT_ID {
            self.configure_reporter(config)
        } else {
            self.configure_filter(config)
        }
    }

    fn on_tick(&mut self) {
        match &mut self.role {
            Role::Unconfigured => {}
            Role::Filter(state) => {
                if let Ok(mut state) = state.try_borrow_mut() {
                    state.tick();
                }
            }
            Role::Reporter(state) => {
                let commands = state.reporter.on_tick(props::now_ns());
                state.run(commands);
            }
        }
    }

    fn on_queue_ready(&mut self, queue_id: u32) {
        let Role::Reporter(state) = &mut self.role else {
            return;
        };
        if queue_id != state.queue {
            return;
        }
        let now = props::now_ns();
        while let Ok(Some(bytes)) = hostcalls::dequeue_shared_queue(queue_id) {
            if let Err(e) = state.reporter.on_worker_batch(&bytes, now) {
                log(LogLevel::Error, &e);
            }
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        // Always a context: the SDK panics (killing the VM) if a root context returns None.
        match &self.role {
            Role::Filter(state) => Some(Box::new(Http::new(Some(state.clone())))),
            Role::Unconfigured | Role::Reporter(_) => Some(Box::new(Http::new(None))),
        }
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}
