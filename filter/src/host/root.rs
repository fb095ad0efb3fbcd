//! Root contexts: one per worker thread plus one on the main thread, whatever the root id and
//! `vm_id`. Each runs its worker's part (directive, fail-safe, hand-over) and takes part in the
//! election of the one context that owns the Envoy's stream to the controller
//! ([`crate::ownership`]); the owner also runs the reporter.

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
use crate::ownership::{Action, Ownership, Refused, SharedData, QUEUE};
use crate::reporter::Command;
use crate::routing::Version;
use crate::worker::Worker;

const DIRECTIVE_KEY: &str = "weir.directive";
const CONTACT_KEY: &str = "weir.contact";
const SERVICE: &str = "weir.v1.Telemetry";
const METHOD: &str = "Exchange";
/// Hand-overs a worker keeps when the queue refuses them, before it drops the oldest.
const MAX_UNQUEUED: usize = 16;

/// Envoy stat ids for one (canary, version). Counters only, added to at each hand-over: a latency
/// histogram would cost one host call per request (`record_metric` takes one sample), and
/// Prometheus users have Istio's `istio_request_duration_milliseconds` for the same requests while
/// Weir's own P99 comes from the exact histograms it streams.
#[derive(Debug, Clone, Copy)]
pub struct StatIds {
    requests: u32,
    failures: u32,
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
    /// The root context is done (its VM is being replaced) and ticks no more: requests that
    /// still finish here hand their outcome over at once.
    draining: bool,
    /// False while another instance of the filter acts in this Envoy ([`crate::instances`]):
    /// requests then pass through untouched.
    pub acting: bool,
    /// The plugin configuration's name, which orders the instances.
    plugin_name: String,
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
        let acting = crate::instances::renew(
            &mut HostShared,
            &self.plugin_name,
            props::now_ns(),
            self.worker.config().handover_interval().as_nanos() as u64,
        );
        if acting != self.acting {
            self.acting = acting;
            log(
                LogLevel::Warn,
                &if acting {
                    format!(
                        "weir: this instance ({}) now splits and measures",
                        self.plugin_name
                    )
                } else {
                    format!(
                        "weir: another instance of the Weir filter acts in this Envoy; this one ({}) passes requests through, so none is split or counted twice",
                        self.plugin_name
                    )
                },
            );
        }
        if self.refresh() && self.worker.generation() > 0 {
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

    /// Reads the directive and the time of the controller's last word from shared data; true
    /// when the fail-safe changed.
    fn refresh(&mut self) -> bool {
        self.refresh_directive();
        let contact = hostcalls::get_shared_data(CONTACT_KEY)
            .ok()
            .and_then(|(bytes, _)| bytes)
            .and_then(|b| b.get(..8).and_then(|s| <[u8; 8]>::try_from(s).ok()))
            .map(u64::from_le_bytes);
        self.worker.observe_contact(contact, props::now_ns())
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

    /// After the root context is done, hands over what a request that finished since recorded.
    pub fn after_request(&mut self) {
        if self.draining {
            self.hand_over();
        }
    }

    /// Hands this worker's counts to the owner of the stream. A batch the queue refuses is kept for
    /// the next tick rather than lost.
    fn hand_over(&mut self) {
        if self.queue.is_none() {
            self.queue = hostcalls::resolve_shared_queue(&self.vm_id, QUEUE)
                .ok()
                .flatten();
        }
        let Some(queue) = self.queue else {
            // No owner has registered the queue yet: keep recording; nothing is sealed or lost.
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
    })
}

/// Envoy's shared data through the host calls.
struct HostShared;

impl SharedData for HostShared {
    fn get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
        match hostcalls::get_shared_data(key) {
            Ok((Some(bytes), Some(cas))) => Some((bytes, cas)),
            _ => None,
        }
    }

    fn set(&mut self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), Refused> {
        hostcalls::set_shared_data(key, Some(value), cas).map_err(|_| Refused)
    }
}

/// A root context's part in reporting.
struct Reporting {
    ownership: Ownership,
    config: FilterConfig,
    /// `open_grpc_stream`'s first argument: the controller's cluster and authority.
    grpc_service: String,
    vm_id: String,
    /// The report queue, once some owner registered it.
    queue: Option<u32>,
}

impl Reporting {
    fn dequeue(queue: Option<u32>) -> impl FnMut() -> Option<Vec<u8>> {
        move || queue.and_then(|q| hostcalls::dequeue_shared_queue(q).ok().flatten())
    }

    fn tick(&mut self) {
        if self.queue.is_none() {
            self.queue = hostcalls::resolve_shared_queue(&self.vm_id, QUEUE)
                .ok()
                .flatten();
        }
        let now = props::now_ns();
        let actions = self
            .ownership
            .tick(&mut HostShared, now, &mut Self::dequeue(self.queue));
        self.perform(actions);
    }

    fn release(&mut self) {
        let now = props::now_ns();
        let actions = self
            .ownership
            .release(&mut HostShared, now, &mut Self::dequeue(self.queue));
        self.perform(actions);
    }

    fn perform(&mut self, actions: Vec<Action>) {
        let mut pending: VecDeque<Action> = actions.into();
        while let Some(action) = pending.pop_front() {
            match action {
                Action::RegisterQueue => match hostcalls::register_shared_queue(QUEUE) {
                    Ok(queue) => self.queue = Some(queue),
                    Err(status) => log(
                        LogLevel::Error,
                        &format!("weir: cannot register the report queue ({status:?})"),
                    ),
                },
                Action::Reporter(command) => {
                    let more = self.run(command);
                    pending.extend(more.into_iter().map(Action::Reporter));
                }
                Action::CloseStream(token) => {
                    let _ = hostcalls::cancel_grpc_stream(token);
                }
                Action::Requeue(batches) => {
                    for batch in batches {
                        let queued = self.queue.is_some_and(|q| {
                            hostcalls::enqueue_shared_queue(q, Some(&batch)).is_ok()
                        });
                        if !queued {
                            log(
                                LogLevel::Error,
                                "weir: cannot put a hand-over back on the report queue; its samples are lost",
                            );
                        }
                    }
                }
                Action::Info(message) => log(LogLevel::Info, &message),
                Action::Warn(message) => log(LogLevel::Warn, &message),
            }
        }
    }

    /// Carries out one reporter command; returns the commands that follow from it.
    fn run(&mut self, command: Command) -> Vec<Command> {
        let now = props::now_ns();
        let Some(reporter) = self.ownership.reporter() else {
            return Vec::new();
        };
        match command {
            Command::OpenStream => {
                match hostcalls::open_grpc_stream(&self.grpc_service, SERVICE, METHOD, Vec::new()) {
                    Ok(token) => return reporter.on_stream_opened(token, now),
                    Err(status) => {
                        log(
                            LogLevel::Warn,
                            &format!(
                                "weir: cannot open the stream over cluster `{}` ({status:?}); is controllerCluster the controller's cluster (Istio: outbound|<port>||<host>)? retrying",
                                self.config.controller_cluster
                            ),
                        );
                        reporter.on_stream_failed(now);
                    }
                }
            }
            Command::Send(bytes) => {
                if let Some(token) = reporter.stream_token() {
                    if hostcalls::send_grpc_stream_message(token, Some(&bytes), false).is_err() {
                        let _ = hostcalls::cancel_grpc_stream(token);
                        reporter.on_stream_closed(token, now);
                    }
                }
            }
            Command::ShareDirective(bytes) => {
                if let Err(status) = hostcalls::set_shared_data(DIRECTIVE_KEY, Some(&bytes), None) {
                    log(
                        LogLevel::Error,
                        &format!("weir: cannot share the directive ({status:?})"),
                    );
                }
            }
            Command::ShareContact(at) => {
                let _ = hostcalls::set_shared_data(CONTACT_KEY, Some(&at.to_le_bytes()), None);
            }
        }
        Vec::new()
    }
}

/// A root context.
pub struct Root {
    context_id: u32,
    /// None until a valid configuration arrives: requests then pass through, only losing a
    /// client-sent routing header.
    filter: Option<Rc<RefCell<FilterState>>>,
    reporting: Option<Reporting>,
}

impl Root {
    /// A root context awaiting its configuration.
    pub fn new(context_id: u32) -> Self {
        Self {
            context_id,
            filter: None,
            reporting: None,
        }
    }

    fn seed(&self) -> u64 {
        props::now_ns() ^ (u64::from(self.context_id) << 48)
    }

    fn configure(&mut self, config: FilterConfig) -> bool {
        let Some(grpc_service) =
            crate::grpc_service::encode(&config.controller_cluster, &config.controller_authority)
        else {
            // Unreachable for a parsed configuration (it bounds both names); pass through.
            log(
                LogLevel::Error,
                "weir: controllerCluster and controllerAuthority are too long to encode; the filter passes traffic through",
            );
            return true;
        };
        // Istio's WasmPlugin sets no vm_id: then it is empty, and shared data and queues are keyed
        // by the empty string, which is what every context of this plugin shares.
        let vm_id = props::string(vec!["plugin_vm_id"]).unwrap_or_default();
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
        let interval = config.handover_interval();
        let mut rng = crate::routing::Rng::new(self.seed());
        let ownership = Ownership::new(
            rng.next_u64(),
            identity,
            config.report_interval.as_nanos() as u64,
            // The epoch only has to differ between reporter lives of the same node.
            rng.next_u64(),
        );
        let worker = Worker::new(config.clone(), rng.next_u64(), rng.next_u64());
        let mut state = FilterState {
            worker,
            vm_id: vm_id.clone(),
            queue: None,
            unqueued: VecDeque::new(),
            stats: HashMap::new(),
            draining: false,
            acting: true,
            plugin_name: props::string(vec!["plugin_name"]).unwrap_or_default(),
        };
        // A VM that replaces another (a new filter configuration) routes its first request by
        // the directive in force, not by an empty table until its first tick; and an instance
        // installed beside another that acts stands down before its first request.
        state.refresh();
        state.acting = crate::instances::renew(
            &mut HostShared,
            &state.plugin_name,
            props::now_ns(),
            interval.as_nanos() as u64,
        );
        self.filter = Some(Rc::new(RefCell::new(state)));
        self.reporting = Some(Reporting {
            ownership,
            config,
            grpc_service,
            vm_id,
            queue: None,
        });
        let _ = hostcalls::set_tick_period(interval);
        true
    }
}

impl Context for Root {
    fn on_grpc_stream_message(&mut self, token_id: u32, message_size: usize) {
        let Some(reporting) = &mut self.reporting else {
            return;
        };
        let Some(reporter) = reporting.ownership.reporter() else {
            return;
        };
        if reporter.stream_token() != Some(token_id) {
            return;
        }
        let Ok(Some(bytes)) = hostcalls::get_buffer(BufferType::GrpcReceiveBuffer, 0, message_size)
        else {
            return;
        };
        match reporter.on_message(&bytes, props::now_ns()) {
            Ok(commands) => reporting.perform(commands.into_iter().map(Action::Reporter).collect()),
            Err(e) => log(LogLevel::Warn, &e),
        }
    }

    fn on_grpc_stream_close(&mut self, token_id: u32, status_code: u32) {
        let _ = hostcalls::close_grpc_stream(token_id);
        let Some(reporter) = self.reporting.as_mut().and_then(|r| r.ownership.reporter()) else {
            return;
        };
        if reporter.stream_token() == Some(token_id) {
            log(
                LogLevel::Info,
                &format!(
                    "weir: stream to the controller closed (gRPC status {status_code}); {} unacknowledged report(s) will be sent again on reconnect",
                    reporter.in_flight()
                ),
            );
        }
        reporter.on_stream_closed(token_id, props::now_ns());
    }

    fn on_done(&mut self) -> bool {
        // The VM is being replaced (a new filter configuration) or Envoy stops: hand this
        // worker's counts over, then (if this context owns it) the stream, at once rather than
        // after the heartbeat ages. Requests still running here hand over as they finish.
        if let Some(Ok(mut state)) = self.filter.as_ref().map(|s| s.try_borrow_mut()) {
            state.draining = true;
            state.hand_over();
        }
        if let Some(reporting) = &mut self.reporting {
            reporting.release();
        }
        true
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
                if let Some(reporting) = &mut self.reporting {
                    reporting.release();
                }
                self.filter = None;
                self.reporting = None;
                return true;
            }
        };
        if let Some(reporting) = &mut self.reporting {
            // A new configuration for a running context: start over with it.
            reporting.release();
        }
        self.configure(config)
    }

    fn on_tick(&mut self) {
        if let Some(state) = &self.filter {
            if let Ok(mut state) = state.try_borrow_mut() {
                state.tick();
            }
        }
        if let Some(reporting) = &mut self.reporting {
            reporting.tick();
        }
    }

    // Hand-overs are taken off the queue at the owner's report ticks ([`crate::ownership`]), not
    // when they arrive, so the default `on_queue_ready` (which does nothing) is what we want.

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        // Always a context: the SDK panics (killing the VM) if a root context returns None.
        Some(Box::new(Http::new(self.filter.clone())))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}
