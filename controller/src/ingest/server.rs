//! The tonic side: one task per `Exchange` stream, selecting on inbound reports, the hello
//! timeout and shutdown, its answers going out through the stream's [`Downstream`] (which also
//! sends the directives and the keep-alive); and [`Ingest::serve`].

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tonic::{Code, Request, Response, Status, Streaming};
use weir_proto::v1::telemetry_server::{Telemetry, TelemetryServer};
use weir_proto::v1::Report;

use super::budget::{self, Budget, Budgeted};
use super::counters::{RejectReason, Rejection};
use super::identity::PeerIdentity;
use super::outbound::{Downstream, Replies, Reply};
use super::transport::{self, Limits, PeerInfo};
use super::{Ingest, IngestError};

/// Messages buffered towards one Envoy. Small on purpose: a reporter that stops reading stalls
/// only its own stream (back-pressure), never the controller.
const OUTBOUND_BUFFER: usize = 16;

/// HTTP/2 flow-control windows the server grants: how much a client may send that no stream
/// has read yet, per connection and per stream. These bound what a connection makes the
/// HTTP/2 layer buffer while its stream task waits (a client that does not read its acks); a
/// real report (a few KiB) fits in one stream window, and a larger one just takes a few window
/// updates. hyper's defaults are 1 MiB each.
pub(crate) const CONNECTION_WINDOW_BYTES: u32 = 256 * 1024;
/// See [`CONNECTION_WINDOW_BYTES`].
pub(crate) const STREAM_WINDOW_BYTES: u32 = 64 * 1024;

/// The server pings every connection this often, and closes one that does not answer within
/// [`PING_TIMEOUT`]: a client that stops reading its socket stops answering, so what the
/// server buffers towards it is released within these two.
pub(crate) const PING_EVERY: Duration = Duration::from_secs(30);
/// See [`PING_EVERY`].
pub(crate) const PING_TIMEOUT: Duration = Duration::from_secs(10);

/// How often [`Ingest::serve`] expires old buckets and idle Envoys.
const SWEEP_EVERY: Duration = Duration::from_secs(10);

/// The weir.v1 `Telemetry` service over an [`Ingest`].
#[derive(Debug, Clone)]
pub struct TelemetryService {
    ingest: Ingest,
    /// Flips to true when the server shuts down, so open streams end and let it finish.
    stop: Option<watch::Receiver<bool>>,
}

impl Ingest {
    /// The tonic service, with the decoding limit from the configuration. Its streams end only
    /// when their Envoy goes away; [`Ingest::serve`] also ends them on shutdown.
    pub fn service(&self) -> TelemetryServer<TelemetryService> {
        self.service_with_stop(None)
    }

    fn service_with_stop(
        &self,
        stop: Option<watch::Receiver<bool>>,
    ) -> TelemetryServer<TelemetryService> {
        TelemetryServer::new(TelemetryService {
            ingest: self.clone(),
            stop,
        })
        .max_decoding_message_size(self.config().max_message_bytes)
    }

    /// Binds `addr` (use port 0 for any free port), serves the telemetry service on it with the
    /// configured transport and limits until `shutdown` completes, and returns at once with the
    /// bound address. On shutdown every open stream ends with `UNAVAILABLE` so reporters
    /// reconnect to the next controller.
    pub async fn serve(
        &self,
        addr: SocketAddr,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<Served, IngestError> {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| IngestError::Bind { addr, source })?;
        let local_addr = listener
            .local_addr()
            .map_err(|source| IngestError::Bind { addr, source })?;
        let config = self.config();
        if let transport::Transport::Tls(files) = &config.transport {
            // In a Pod, Istio's agent writes the certificate shortly after the start.
            transport::wait_for_files(files, Duration::from_secs(60)).await;
        }
        let incoming = transport::incoming(
            listener,
            &config.transport,
            Limits {
                max_connections: config.max_connections,
                handshake_timeout: config.handshake_timeout,
                idle_timeout: config.idle_timeout,
            },
            self.counters().connections_refused.clone(),
        )
        .map_err(|e| IngestError::Config(e.to_string()))?;
        let (stop_tx, stop_rx) = watch::channel(false);
        let service = Budgeted::new(
            self.service_with_stop(Some(stop_rx.clone())),
            Budget::new(config.max_buffered_bytes),
        );
        let streams = config.max_streams_per_connection;

        if let transport::Transport::Tls(files) = &config.transport {
            match transport::certificate_identity(&files.cert_chain) {
                Ok(identity) => self.set_replica_identity(identity),
                Err(why) => tracing::warn!(
                    "this controller's certificate names no SPIFFE id ({why}): it accepts no relay streams from other replicas"
                ),
            }
        }
        let relay = self.relay().map(|relay| {
            tokio::spawn(super::relay::run(
                self.clone(),
                relay.clone(),
                stop_rx.clone(),
            ))
        });
        let sweeper = {
            let ingest = self.clone();
            let mut stop = stop_rx;
            tokio::spawn(async move {
                let mut every = tokio::time::interval(SWEEP_EVERY);
                loop {
                    tokio::select! {
                        _ = stop.wait_for(|stopped| *stopped) => break,
                        _ = every.tick() => ingest.sweep(Instant::now()),
                    }
                }
            })
        };
        let signal = async move {
            shutdown.await;
            stop_tx.send_replace(true);
        };
        let task = tokio::spawn(async move {
            let result = tonic::transport::Server::builder()
                .max_concurrent_streams(streams)
                .initial_connection_window_size(CONNECTION_WINDOW_BYTES)
                .initial_stream_window_size(STREAM_WINDOW_BYTES)
                .http2_keepalive_interval(Some(PING_EVERY))
                .http2_keepalive_timeout(Some(PING_TIMEOUT))
                .add_service(service)
                .serve_with_incoming_shutdown(incoming, signal)
                .await;
            sweeper.abort();
            if let Some(relay) = relay {
                relay.abort();
            }
            result
        });
        tracing::info!(%local_addr, "telemetry ingest listening");
        Ok(Served { local_addr, task })
    }
}

/// A running server from [`Ingest::serve`].
#[derive(Debug)]
pub struct Served {
    local_addr: SocketAddr,
    task: JoinHandle<Result<(), tonic::transport::Error>>,
}

impl Served {
    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Waits until the server has shut down.
    pub async fn finished(self) -> Result<(), IngestError> {
        Ok(self.task.await??)
    }

    /// Waits at most `limit` for the shut-down under way, then ends the server outright (its
    /// connections closed, its port freed).
    pub async fn finish_within(mut self, limit: Duration) -> Result<(), IngestError> {
        match tokio::time::timeout(limit, &mut self.task).await {
            Ok(result) => Ok(result??),
            Err(_) => {
                self.task.abort();
                let _ = self.task.await;
                Ok(())
            }
        }
    }
}

#[tonic::async_trait]
impl Telemetry for TelemetryService {
    type ExchangeStream = Downstream;

    async fn exchange(
        &self,
        request: Request<Streaming<Report>>,
    ) -> Result<Response<Self::ExchangeStream>, Status> {
        // The peer as the connection proved it. Without connection info the service is served
        // in-process (tests, `Ingest::service` under another server): the caller chose the
        // transport, and the peer counts as the machine's own.
        let peer = match request.extensions().get::<PeerInfo>() {
            None => PeerIdentity::Loopback,
            Some(PeerInfo {
                identity: Ok(identity),
                ..
            }) => identity.clone(),
            Some(PeerInfo {
                identity: Err(why),
                remote,
            }) => {
                let rejection = Rejection::new(
                    RejectReason::Unauthenticated,
                    format!(
                        "{why}; the controller accepts reports only from workloads whose certificate chains to the mesh's root (peer {})",
                        remote.map_or_else(|| "unknown".to_owned(), |r| r.to_string())
                    ),
                );
                self.ingest.counters().reject(&rejection);
                if self
                    .ingest
                    .counters()
                    .should_log(RejectReason::Unauthenticated, Instant::now())
                {
                    tracing::warn!("refused a telemetry stream: {rejection} (rate-limited)");
                }
                return Err(rejection.status());
            }
        };
        // A relay without the leader's directive (or out of contact with the leader) serves
        // nobody: the Envoy goes to another replica rather than run weights nobody confirms.
        let relay_serving = self.ingest.relay().map(|relay| relay.serving());
        if relay_serving
            .as_ref()
            .is_some_and(|serving| !*serving.borrow())
        {
            return Err(Status::unavailable(RELAY_OUT_OF_CONTACT));
        }
        let (tx, rx) = mpsc::channel(OUTBOUND_BUFFER);
        let downstream = Downstream::new(
            rx,
            self.ingest.publisher().subscribe(),
            self.ingest.config().keepalive,
        );
        let stream = StreamTask {
            ingest: self.ingest.clone(),
            stop: self.stop.clone(),
            tx,
            session: None,
            peer,
            relay_serving,
        };
        tokio::spawn(stream.run(request.into_inner()));
        Ok(Response::new(downstream))
    }
}

/// Who a stream belongs to, known from its first report. Leaving the connected set on drop
/// keeps it right however the task ends.
struct Session {
    ingest: Ingest,
    /// The ledger's key: the identity and the node id.
    node: Arc<str>,
    /// The node id as the reports name it.
    node_id: String,
    epoch: u64,
    stream: u64,
}

impl Drop for Session {
    fn drop(&mut self) {
        self.ingest.publisher().disconnect(&self.node, self.stream);
        tracing::debug!(node_id = &*self.node, "reporter disconnected");
    }
}

struct StreamTask {
    ingest: Ingest,
    stop: Option<watch::Receiver<bool>>,
    tx: Replies,
    session: Option<Session>,
    peer: PeerIdentity,
    /// On a relay: whether it is in contact with the leader.
    relay_serving: Option<watch::Receiver<bool>>,
}

/// Why a relay refuses or ends a stream.
const RELAY_OUT_OF_CONTACT: &str =
    "this weir replica is a relay and has no contact with the leader; connect to another replica";

async fn out_of_contact(serving: &mut Option<watch::Receiver<bool>>) {
    match serving {
        // An error means the relay is gone, which ends its service too.
        Some(serving) => drop(serving.wait_for(|serving| !*serving).await),
        None => std::future::pending().await,
    }
}

/// Why a stream task stops.
enum End {
    /// The reporter or the transport went away; nothing more to say.
    Gone,
    /// End the stream with this status.
    Refuse(Status),
}

async fn stopped(stop: &mut Option<watch::Receiver<bool>>) {
    match stop {
        // An error means the server is gone, which is a stop too.
        Some(stop) => drop(stop.wait_for(|stopped| *stopped).await),
        None => std::future::pending().await,
    }
}

impl StreamTask {
    async fn run(mut self, mut inbound: Streaming<Report>) {
        let hello = tokio::time::sleep(self.ingest.config().hello_timeout);
        tokio::pin!(hello);
        let mut stop = self.stop.take();
        let mut relay_serving = self.relay_serving.take();

        let end = loop {
            let registered = self.session.is_some();
            let step = tokio::select! {
                biased;
                _ = stopped(&mut stop) => Err(End::Refuse(Status::unavailable(
                    "the weir controller is shutting down; reconnect to its successor",
                ))),
                () = out_of_contact(&mut relay_serving) => {
                    Err(End::Refuse(Status::unavailable(RELAY_OUT_OF_CONTACT)))
                }
                () = &mut hello, if !registered => {
                    let rejection = Rejection::new(
                        RejectReason::SilentStream,
                        format!(
                            "no report within {:?} of opening the stream; a reporter says hello (a report with sequence 0) first",
                            self.ingest.config().hello_timeout
                        ),
                    );
                    self.ingest.counters().reject(&rejection);
                    Err(End::Refuse(rejection.status()))
                }
                received = inbound.next() => match received {
                    None => Err(End::Gone),
                    Some(Err(status)) => Err(self.inbound_error(status)),
                    Some(Ok(report)) => self.on_report(report).await,
                },
            };
            if let Err(end) = step {
                break end;
            }
        };
        if let End::Refuse(status) = end {
            // The reporter may already be gone; then nobody needs the status.
            let _ = self.tx.send(Reply::End(status)).await;
        }
    }

    async fn send(&self, reply: Reply) -> Result<(), End> {
        self.tx.send(reply).await.map_err(|_| End::Gone)
    }

    fn inbound_error(&self, status: Status) -> End {
        let counters = self.ingest.counters();
        // tonic's decoder reports an over-limit message as OUT_OF_RANGE; nothing else there does.
        if status.code() == Code::OutOfRange {
            let rejection = Rejection::new(
                RejectReason::Oversized,
                format!(
                    "report refused: {}; the controller accepts at most {} bytes per message \
                     (raise its max message size, or have the reporter send smaller reports)",
                    status.message(),
                    self.ingest.config().max_message_bytes
                ),
            );
            tracing::warn!(node_id = self.node_id(), "{rejection}");
            counters.reject(&rejection);
            return End::Refuse(rejection.status());
        }
        // The codec's wire checks (weir_proto::codec) and prost refuse with INVALID_ARGUMENT.
        let reason = if status.code() == Code::InvalidArgument {
            Some(RejectReason::Malformed)
        } else if budget::is_buffer_full(&status) {
            Some(RejectReason::BufferFull)
        } else {
            None
        };
        if let Some(reason) = reason {
            let rejection = Rejection::new(reason, status.message());
            counters.reject(&rejection);
            if counters.should_log(reason, Instant::now()) {
                tracing::warn!(
                    node_id = self.node_id(),
                    "ending a telemetry stream: {rejection} (warnings for this reason are rate-limited)"
                );
            }
            return End::Refuse(rejection.status());
        }
        // A reset or a broken connection: the reporter reconnects on its own.
        counters.stream_error();
        tracing::debug!(node_id = self.node_id(), %status, "telemetry stream broke");
        End::Gone
    }

    fn node_id(&self) -> &str {
        self.session.as_ref().map_or("", |s| &s.node)
    }

    /// Accounts for one report and answers it. The report is consumed by [`Self::account`],
    /// which is not async: nothing of it can live across the sends, so a reporter that stops
    /// reading its acknowledgements makes the controller hold no decoded report while it waits.
    async fn on_report(&mut self, report: Report) -> Result<(), End> {
        let answer = self.account(report)?;
        if answer.first {
            // The directive goes first, so the reporter routes by it before anything else;
            // from now on the stream's Downstream sends every new one.
            self.send(Reply::Start).await?;
        }
        // Dropped reports (already logged and counted) are acked too: that releases them.
        self.send(Reply::Ack(answer.ack)).await
    }

    /// The accounting of one report; the report is gone when this returns.
    fn account(&mut self, report: Report) -> Result<Answer, End> {
        if let Some(session) = &self.session {
            let node_id = report.reporter.as_ref().map_or("", |r| r.node_id.as_str());
            if node_id != session.node_id || report.epoch != session.epoch {
                let rejection = Rejection::new(
                    RejectReason::IdentityChanged,
                    format!(
                        "this stream was opened by reporter {} epoch {:#x}, but a report on it \
                         names reporter {node_id:?} epoch {:#x}; open one stream per reporter life",
                        session.node_id, session.epoch, report.epoch
                    ),
                );
                self.ingest.counters().reject(&rejection);
                return Err(End::Refuse(rejection.status()));
            }
        }
        let ingested = self
            .ingest
            .ingest_from(&report, &self.peer, Instant::now())
            .map_err(|rejection| {
                if self
                    .ingest
                    .counters()
                    .should_log(rejection.reason, Instant::now())
                {
                    tracing::warn!(
                        peer = %self.peer,
                        "ending a telemetry stream: {rejection} (warnings for this reason are rate-limited)"
                    );
                }
                End::Refuse(rejection.status())
            })?;
        let (epoch, applied_generation) = (report.epoch, report.applied_generation);
        let publisher = self.ingest.publisher();
        let first = match &self.session {
            Some(session) => {
                publisher.applied(&session.node, session.stream, applied_generation);
                false
            }
            None => {
                let stream = publisher.connect(ingested.node_id.clone(), applied_generation);
                self.ingest.counters().stream_opened();
                tracing::debug!(node_id = &*ingested.node_id, epoch, "reporter connected");
                self.session = Some(Session {
                    ingest: self.ingest.clone(),
                    node: ingested.node_id.clone(),
                    node_id: report.reporter.map(|r| r.node_id).unwrap_or_default(),
                    epoch,
                    stream,
                });
                true
            }
        };
        Ok(Answer {
            ack: ingested.ack,
            first,
        })
    }
}

/// What a stream sends back for one report.
struct Answer {
    ack: weir_proto::v1::Ack,
    /// The stream's first report: the directive goes out before the ack.
    first: bool,
}
