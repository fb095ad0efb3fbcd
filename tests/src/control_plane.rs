//! The test control plane: a real weir.v1 gRPC server, in process, that the tests drive.
//!
//! It pushes the directive the test sets to every stream (and to each new stream as it opens),
//! keeps every report it receives, applies each `(node_id, epoch, sequence)` at most once as the
//! protocol requires (the highest applied sequence per `(node_id, epoch)`; anything at or below it
//! is a duplicate, counted and acknowledged again), and totals what it applied per
//! `(canary, version)`.
//!
//! [`ControlPlane::stop`] is abrupt, as when a controller dies: the listener closes and every
//! connection is dropped. [`ControlPlane::start`] listens again on the same port, which is the one
//! the Envoy's `weir_controller` cluster points at.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures::Stream;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::{AbortHandle, JoinHandle, JoinSet};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};
use weir_proto::codec::Outgoing;
use weir_proto::v1::controller_message::Kind;
use weir_proto::v1::telemetry_server::{Telemetry, TelemetryServer};
use weir_proto::v1::{Ack, ControllerMessage, Directive, Report, Version};
use weir_proto::LatencyHistogram;

type Outbound = mpsc::UnboundedSender<Result<Outgoing, Status>>;

/// What was applied for one `(canary, version)`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Totals {
    /// Requests.
    pub requests: u64,
    /// Failed requests.
    pub failures: u64,
    /// Latency of the same requests (merged).
    pub latency: LatencyHistogram,
}

/// Everything the control plane has seen, at one moment.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Every report received, in order, hellos and duplicates included.
    pub reports: Vec<Report>,
    /// The reports applied (each `(node_id, epoch, sequence)` once, hellos excluded).
    pub applied: Vec<Report>,
    /// Reports received again after they were applied.
    pub duplicates: u64,
    /// Protocol anomalies: a sequence that skipped ahead, a histogram that did not decode.
    pub anomalies: Vec<String>,
    /// Applied totals per `(canary, version)`.
    pub totals: BTreeMap<(String, Version), Totals>,
    /// Streams opened since the start.
    pub streams_opened: u64,
    /// Streams open now.
    pub streams_open: usize,
    /// The directive being pushed.
    pub directive: Option<Directive>,
}

impl Snapshot {
    /// Totals for one `(canary, version)` (zero when nothing was applied).
    pub fn total(&self, canary: &str, version: Version) -> Totals {
        self.totals
            .get(&(canary.to_owned(), version))
            .cloned()
            .unwrap_or_default()
    }

    /// Requests applied for `canary`, both versions.
    pub fn requests(&self, canary: &str) -> u64 {
        self.totals
            .iter()
            .filter(|((c, _), _)| c == canary)
            .map(|(_, t)| t.requests)
            .sum()
    }

    /// Requests applied over every canary and version.
    pub fn all_requests(&self) -> u64 {
        self.totals.values().map(|t| t.requests).sum()
    }

    /// Hellos received (sequence 0), one per stream the reporter opened and got through.
    pub fn hellos(&self) -> usize {
        self.reports.iter().filter(|r| r.sequence == 0).count()
    }

    /// The distinct reporters seen, as `(node_id, epoch)`: one per reporter VM life.
    pub fn reporters(&self) -> BTreeSet<(String, u64)> {
        self.reports
            .iter()
            .map(|r| {
                let node = r.reporter.as_ref().map(|x| x.node_id.clone());
                (node.unwrap_or_default(), r.epoch)
            })
            .collect()
    }

    /// The highest `applied_generation` of any report, hellos included.
    pub fn max_applied_generation(&self) -> u64 {
        self.reports
            .iter()
            .map(|r| r.applied_generation)
            .max()
            .unwrap_or(0)
    }

    /// Merged latency of both versions of `canary`.
    pub fn latency(&self, canary: &str) -> LatencyHistogram {
        let mut merged = LatencyHistogram::new();
        for ((c, _), totals) in &self.totals {
            if c == canary {
                merged.merge(&totals.latency);
            }
        }
        merged
    }

    /// A one-line summary for failure messages.
    pub fn summary(&self) -> String {
        let totals: Vec<String> = self
            .totals
            .iter()
            .map(|((c, v), t)| {
                format!(
                    "{c}/{}: {} requests, {} failures",
                    v.as_str_name(),
                    t.requests,
                    t.failures
                )
            })
            .collect();
        format!(
            "{} reports ({} applied, {} duplicates, {} hellos) from {} reporter(s), {} streams \
             opened, {} open, max applied generation {}, totals [{}], anomalies {:?}",
            self.reports.len(),
            self.applied.len(),
            self.duplicates,
            self.hellos(),
            self.reporters().len(),
            self.streams_opened,
            self.streams_open,
            self.max_applied_generation(),
            totals.join("; "),
            self.anomalies
        )
    }
}

#[derive(Default)]
struct State {
    seen: Snapshot,
    /// Highest applied sequence per (node_id, epoch).
    highest: HashMap<(String, u64), u64>,
    streams: Vec<Outbound>,
    readers: Vec<AbortHandle>,
    acks: bool,
}

#[derive(Clone)]
struct Shared(Arc<Mutex<State>>);

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panicking test thread may poison the lock; the data is still what was seen.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records a report; returns the Ack to send, if any.
    fn receive(&self, report: Report) -> Option<Ack> {
        let mut state = self.lock();
        let state = &mut *state;
        state.seen.reports.push(report.clone());
        if report.sequence == 0 {
            return None;
        }
        let node = report
            .reporter
            .as_ref()
            .map(|r| r.node_id.clone())
            .unwrap_or_default();
        let key = (node.clone(), report.epoch);
        let highest = state.highest.get(&key).copied();
        match highest {
            Some(h) if report.sequence <= h => state.seen.duplicates += 1,
            _ => {
                let expected = highest.map_or(1, |h| h + 1);
                if report.sequence != expected {
                    state.seen.anomalies.push(format!(
                        "{node} epoch {:x}: sequence {} applied after {:?}, expected {expected}",
                        report.epoch, report.sequence, highest
                    ));
                }
                for stat in &report.stats {
                    let version = Version::try_from(stat.version).unwrap_or(Version::Unspecified);
                    let totals = state
                        .seen
                        .totals
                        .entry((stat.canary.clone(), version))
                        .or_default();
                    totals.requests += stat.requests;
                    totals.failures += stat.failures;
                    if let Some(wire) = &stat.latency {
                        if let Err(e) = totals.latency.merge_wire(wire) {
                            state.seen.anomalies.push(format!(
                                "{node} sequence {}: histogram refused: {e}",
                                report.sequence
                            ));
                        }
                    }
                }
                state.highest.insert(key.clone(), report.sequence);
                state.seen.applied.push(report.clone());
            }
        }
        let sequence = state.highest.get(&key).copied().unwrap_or(0);
        state.acks.then_some(Ack {
            epoch: report.epoch,
            sequence,
        })
    }
}

#[derive(Clone)]
struct Service {
    shared: Shared,
}

#[tonic::async_trait]
impl Telemetry for Service {
    type ExchangeStream = Pin<Box<dyn Stream<Item = Result<Outgoing, Status>> + Send + 'static>>;

    async fn exchange(
        &self,
        request: Request<Streaming<Report>>,
    ) -> Result<Response<Self::ExchangeStream>, Status> {
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::unbounded_channel();
        {
            let mut state = self.shared.lock();
            if let Some(directive) = &state.seen.directive {
                let _ = tx.send(Ok(directive_message(directive.clone())));
            }
            state.seen.streams_opened += 1;
            state.streams.push(tx.clone());
        }
        let shared = self.shared.clone();
        let reader = tokio::spawn(async move {
            while let Some(message) = inbound.next().await {
                let Ok(report) = message else { break };
                if let Some(ack) = shared.receive(report) {
                    let ack = Outgoing::Message(ControllerMessage {
                        kind: Some(Kind::Ack(ack)),
                    });
                    if tx.send(Ok(ack)).is_err() {
                        break;
                    }
                }
            }
            let mut state = shared.lock();
            state.streams.retain(|s| !s.same_channel(&tx));
        });
        self.shared.lock().readers.push(reader.abort_handle());
        Ok(Response::new(Box::pin(UnboundedReceiverStream::new(rx))))
    }
}

fn directive_message(directive: Directive) -> Outgoing {
    Outgoing::Message(ControllerMessage {
        kind: Some(Kind::Directive(directive)),
    })
}

/// The test control plane. Dropping it stops it.
pub struct ControlPlane {
    addr: SocketAddr,
    shared: Shared,
    server: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlPlane")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl ControlPlane {
    /// Starts listening on a free port of 127.0.0.1, with no directive, acknowledging reports.
    pub async fn new() -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let plane = ControlPlane {
            addr: listener.local_addr()?,
            shared: Shared(Arc::new(Mutex::new(State {
                acks: true,
                ..State::default()
            }))),
            server: Mutex::new(None),
        };
        plane.serve(listener);
        Ok(plane)
    }

    /// Where it listens (the same address across stop and start).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn serve(&self, listener: TcpListener) {
        let service = TelemetryServer::new(Service {
            shared: self.shared.clone(),
        });
        let accept = tokio::spawn(async move {
            // Owned here, so aborting this task drops (closes) every connection with it.
            let mut connections = JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((stream, _)) = accepted else { continue };
                        let _ = stream.set_nodelay(true);
                        let service = TowerToHyperService::new(service.clone());
                        connections.spawn(async move {
                            let builder = auto::Builder::new(TokioExecutor::new());
                            let _ = builder.serve_connection(TokioIo::new(stream), service).await;
                        });
                    }
                    Some(_) = connections.join_next(), if !connections.is_empty() => {}
                }
            }
        });
        *self.server.lock().unwrap_or_else(|e| e.into_inner()) = Some(accept);
    }

    /// Stops abruptly, as a killed controller would: closes the listener, drops every connection
    /// and stream. What was seen is kept.
    pub async fn stop(&self) {
        let server = self.server.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(server) = server {
            server.abort();
            let _ = server.await;
        }
        let mut state = self.shared.lock();
        for stream in state.streams.drain(..) {
            let _ = stream.send(Err(Status::unavailable("test control plane stopped")));
        }
        for reader in state.readers.drain(..) {
            reader.abort();
        }
    }

    /// Listens again on the same port (after [`Self::stop`]); a no-op while running.
    pub async fn start(&self) -> anyhow::Result<()> {
        if self.is_running() {
            return Ok(());
        }
        let started = Instant::now();
        let listener = loop {
            match TcpListener::bind(self.addr).await {
                Ok(listener) => break listener,
                Err(e) if started.elapsed() < Duration::from_secs(5) => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => {
                    return Err(e).with_context(|| format!("cannot listen on {} again", self.addr))
                }
            }
        };
        self.serve(listener);
        Ok(())
    }

    /// Whether it is listening.
    pub fn is_running(&self) -> bool {
        self.server
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    /// Sets the directive and pushes it to every open stream (new streams get it as they open).
    /// A generation of 0 is replaced by the previous generation + 1. Returns the generation.
    pub fn set_directive(&self, mut directive: Directive) -> u64 {
        let mut state = self.shared.lock();
        if directive.generation == 0 {
            let previous = state.seen.directive.as_ref().map_or(0, |d| d.generation);
            directive.generation = previous + 1;
        }
        let generation = directive.generation;
        for stream in &state.streams {
            let _ = stream.send(Ok(directive_message(directive.clone())));
        }
        state.seen.directive = Some(directive);
        generation
    }

    /// Whether reports are acknowledged. Without acks the reporter keeps its reports and sends
    /// them again on its next stream: a way to make duplicates happen on purpose.
    pub fn set_acks(&self, on: bool) {
        self.shared.lock().acks = on;
    }

    /// What it has seen so far.
    pub fn snapshot(&self) -> Snapshot {
        let state = self.shared.lock();
        let mut seen = state.seen.clone();
        seen.streams_open = state.streams.len();
        seen
    }

    /// Waits (at most `timeout`) until `done` holds for a snapshot, and returns that snapshot.
    pub async fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        done: impl Fn(&Snapshot) -> bool,
    ) -> anyhow::Result<Snapshot> {
        let started = Instant::now();
        loop {
            let snapshot = self.snapshot();
            if done(&snapshot) {
                return Ok(snapshot);
            }
            if started.elapsed() > timeout {
                bail!(
                    "timed out after {timeout:?} waiting for {what}; the control plane saw {}",
                    snapshot.summary()
                );
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Waits until a report says every worker of the Envoy applied `generation` (or later).
    pub async fn wait_for_generation(
        &self,
        generation: u64,
        timeout: Duration,
    ) -> anyhow::Result<Snapshot> {
        self.wait_for(
            &format!("a report with applied generation {generation}"),
            timeout,
            |s| {
                s.reports
                    .last()
                    .is_some_and(|r| r.applied_generation >= generation)
            },
        )
        .await
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        if let Some(server) = self.server.lock().unwrap_or_else(|e| e.into_inner()).take() {
            server.abort();
        }
        for reader in self.shared.lock().readers.drain(..) {
            reader.abort();
        }
    }
}
