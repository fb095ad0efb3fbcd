//! Telemetry ingest: the weir.v1 `Exchange` server that every Envoy's filter streams reports to,
//! the exact accounting of those reports, the per-canary windows they merge into, and the
//! directives pushed back.
//!
//! - [`transport`]: TLS with a verified client certificate (or plaintext on loopback), and the
//!   bounds of every connection.
//! - [`identity`]: who a connection's peer is (its SPIFFE id), and who may report for a canary.
//! - [`accounting`]: each `(identity, node_id, epoch, sequence)` applied at most once, in order.
//! - [`validate`]: a report is checked completely before any of it is applied.
//! - [`windows`]: time-bucketed, per-canary, per-version requests, failures and HDR latency.
//! - [`directives`]: the current directive, its fan-out, and generation confirmation.
//! - [`server`]: the tonic service and [`Ingest::serve`].
//! - [`relay`]: a replica that is not the leader serves its Envoys and forwards their merged
//!   reports to the leader as one reporter, and the leader's directives down (docs/scale.md).
//!
//! # What happens to a report
//! | report | answer | stream |
//! |---|---|---|
//! | next sequence, valid | applied, acked | stays open |
//! | sequence at or below the highest applied | acked again, not counted | stays open |
//! | hello (sequence 0) | acked with the highest applied sequence of its epoch | stays open |
//! | next sequence, invalid (bad key, version, counts, histogram, unknown canary, too many entries) | **acked and dropped**, counted by reason, logged | stays open |
//! | sequence beyond the next one (a gap) | `ABORTED`, counted | ends; the reporter reconnects and resends in order |
//! | epoch replaced by a newer one for the node id | `FAILED_PRECONDITION`, counted | ends |
//! | no `reporter.node_id`, or another node/epoch than the stream's first report | `INVALID_ARGUMENT`, counted | ends |
//! | a node id longer than the limit, or a `reporter.namespace` other than the certificate's | `INVALID_ARGUMENT` / `PERMISSION_DENIED`, counted | ends |
//! | a new Envoy when the ledger is full (in all, or for this identity) | `RESOURCE_EXHAUSTED`, counted | ends |
//! | entries for canaries the peer may not speak for | those entries dropped, the rest applied; counted, and one Warning event per identity on the Canary | stays open |
//! | more requests than one Envoy can serve since its previous report | **acked and dropped**, counted | stays open |
//! | larger than the decoding limit, or more stats entries than weir.v1 allows | `OUT_OF_RANGE` / `INVALID_ARGUMENT`, counted | ends |
//! | a connection without a verified client certificate (TLS) | `UNAUTHENTICATED`, counted | ends |
//! | a relay node id (`relay~…`) from an identity other than a controller replica's own | `PERMISSION_DENIED`, counted | ends |
//! | (on a relay) a hello while the relay has no contact with the leader; or the contact is lost | `UNAVAILABLE` | ends; the reporter goes to another replica |
//!
//! Invalid reports are acknowledged and dropped rather than refused with a status because ending
//! the stream makes the reporter reconnect and resend the same report: a permanently bad report
//! would loop forever and block every report behind it. Dropping consumes its sequence number, so
//! the next report is not a gap. Problems that no resend can fix on this stream, or that a
//! reconnect does fix (a gap), end the stream.

mod accounting;
mod budget;
mod counters;
mod directives;
pub mod identity;
mod outbound;
mod relay;
mod server;
pub mod transport;
mod validate;
mod windows;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use weir_proto::v1::{Ack, CanaryRoute, Directive, Report, Version};

pub use counters::{CountersSnapshot, IngestCounters, RejectReason, Rejection};
pub use directives::{Confirmation, PublishError};
pub use relay::{RelayConfig, RelayTls, RELAY_NODE_PREFIX};
pub use server::{Served, TelemetryService};
pub use windows::{Totals, VersionWindow};

use accounting::{Accounting, Admission, AdmitError, LedgerLimits};
use counters::lock;
use directives::Publisher;
use identity::{PeerIdentity, ReporterPolicy, ReporterRule, SpiffeId};
use transport::Transport;
use windows::Windows;

/// Tuning of the ingest. [`Default`] suits a production controller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IngestConfig {
    /// Width of one window bucket (by controller receipt time). Default 1 s.
    pub bucket_width: Duration,
    /// How far back windows can reach; must cover the longest metric interval. Default 15 min.
    pub retention: Duration,
    /// How long reports for a canary that left the directive are still accepted: reports sealed
    /// under the previous generation are in flight when it changes. Default 60 s.
    pub retired_canary_grace: Duration,
    /// Largest report message accepted. Default 1 MiB: a report of the most entries weir.v1
    /// allows, each with a realistic histogram (about 700 bytes), fits.
    pub max_message_bytes: usize,
    /// Bytes of reports in transit (received but not yet decoded), across every stream together:
    /// each stream holds the size of the largest message it has sent until it ends (see
    /// `ingest::budget`). A stream that would go past it is ended with `RESOURCE_EXHAUSTED`.
    /// Default 64 MiB: every connection's 4 KiB reports many times over, or 64 reports at the
    /// message limit.
    pub max_buffered_bytes: usize,
    /// Most stats entries (canary, version pairs) in one report. Default (and at most) 1024,
    /// checked on the encoded bytes before anything is decoded (weir_proto::codec).
    pub max_entries_per_report: usize,
    /// How reporters connect: TLS with verified client certificates, or plaintext on loopback.
    /// Default: plaintext on loopback.
    pub transport: Transport,
    /// Connections open at once. Default 1024: with the other defaults, what the controller's
    /// Deployment (2 GiB) holds in the worst case (docs/security.md, "Worst-case memory"); an
    /// Envoy holds one.
    pub max_connections: usize,
    /// Concurrent streams on one connection (an Envoy opens one; two while its stream changes
    /// owner). Default 4.
    pub max_streams_per_connection: u32,
    /// Time allowed for a TLS handshake. Default 10 s.
    pub handshake_timeout: Duration,
    /// A connection that sends nothing for this long is closed (a reporter sends a report every
    /// report interval, 60 s at most). Default 150 s.
    pub idle_timeout: Duration,
    /// A stream whose first report (the hello) does not come within this time is ended.
    /// Default 30 s.
    pub hello_timeout: Duration,
    /// Longest node id accepted. Default 512 bytes (Istio's are under 200).
    pub max_node_id_bytes: usize,
    /// Envoys tracked in the ledger, in all. Default 20,000 (Envoys come and go: one not heard
    /// from for [`IngestConfig::forget_reporter_after`] is forgotten).
    pub max_reporters: usize,
    /// Envoys tracked for one identity (one service account). Default 5,000.
    pub max_reporters_per_identity: usize,
    /// Requests one Envoy can serve per second, at most: a report claiming more than this rate
    /// since the Envoy's previous report is implausible and dropped. Default 1,000,000 (ten
    /// worker threads at 100,000 requests per second each, several times what Envoy serves).
    pub max_requests_per_second: u64,
    /// Who may report for which canary.
    pub reporter_policy: ReporterPolicy,
    /// When a stream has sent nothing for this long, the current directive is sent again, so an
    /// idle Envoy does not take the silence for a lost controller (the filter's grace period
    /// defaults to 10 s). Default 3 s.
    pub keepalive: Duration,
    /// Sequence state of an Envoy not heard from for this long is forgotten. Default 1 h.
    pub forget_reporter_after: Duration,
    /// The generation of the initial (empty) directive; publishes count up from it. Default: the
    /// Unix time in milliseconds, so generations keep increasing across controller restarts (the
    /// filters still hold generations from the previous controller life). A relay starts at 0:
    /// every directive it passes down is the leader's.
    pub initial_generation: u64,
    /// Serve as a relay towards the leader instead of keeping windows (a replica that is not
    /// the leader). Default None: this ingest is the one that accounts.
    pub relay: Option<RelayConfig>,
}

impl Default for IngestConfig {
    fn default() -> Self {
        let millis = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|since| u64::try_from(since.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(1);
        Self {
            bucket_width: Duration::from_secs(1),
            retention: Duration::from_secs(15 * 60),
            retired_canary_grace: Duration::from_secs(60),
            max_message_bytes: 1024 * 1024,
            max_buffered_bytes: 64 * 1024 * 1024,
            max_entries_per_report: weir_proto::codec::MAX_STATS_PER_REPORT,
            transport: Transport::PlaintextLoopback,
            max_connections: 1_024,
            max_streams_per_connection: 4,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(150),
            hello_timeout: Duration::from_secs(30),
            max_node_id_bytes: 512,
            max_reporters: 20_000,
            max_reporters_per_identity: 5_000,
            max_requests_per_second: 1_000_000,
            reporter_policy: ReporterPolicy::default(),
            keepalive: Duration::from_secs(3),
            forget_reporter_after: Duration::from_secs(3600),
            initial_generation: millis,
            relay: None,
        }
    }
}

/// Why an ingest could not be built or served.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// A configuration value that cannot work.
    #[error("invalid ingest configuration: {0}")]
    Config(String),
    /// The listen address could not be bound.
    #[error(
        "cannot listen for telemetry on {addr}: {source} (is another process using the port?)"
    )]
    Bind {
        /// The address asked for.
        addr: std::net::SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The gRPC server stopped with an error.
    #[error("telemetry server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
    /// The server task panicked or was cancelled.
    #[error("telemetry server task ended abnormally: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// What became of one report that did not end the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A hello (sequence 0): registered, nothing counted.
    Hello,
    /// Applied to the windows.
    Applied,
    /// Already applied before: not counted again.
    Duplicate,
    /// Acknowledged but not applied, for this reason.
    Dropped(Rejection),
}

/// The answer to one report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ingested {
    /// The reporting Envoy's node id.
    pub node_id: Arc<str>,
    /// The acknowledgement to send back.
    pub ack: Ack,
    /// What was done with the report.
    pub outcome: Outcome,
}

struct Inner {
    config: IngestConfig,
    accounting: Accounting,
    windows: Windows,
    publisher: Publisher,
    counters: IngestCounters,
    /// Per canary, who may report for it besides its namespace (`spec.analysis.reporters`).
    reporters: RwLock<HashMap<String, Vec<ReporterRule>>>,
    /// Per canary, identities whose reports for it were refused.
    refusals: Mutex<HashMap<String, Refusals>>,
    /// In relay mode: the pending delta and the contact with the leader.
    relay: Option<Arc<relay::Relay>>,
    /// The controller's own identity (from its serving certificate): the only one whose relay
    /// streams are accepted. Unset on plaintext loopback, where the machine's own processes are
    /// trusted as such.
    replica_identity: std::sync::OnceLock<SpiffeId>,
}

/// Identities refused for one canary: how often, and whether that was announced yet.
#[derive(Debug, Default)]
struct Refusals {
    by_identity: BTreeMap<String, (u64, bool)>,
}

/// Identities kept per canary in [`Refusals`]; more are counted but not named.
const MAX_REFUSED_IDENTITIES: usize = 16;

/// One identity refused for a canary, for an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefusedReporter {
    /// The identity (a SPIFFE id).
    pub identity: String,
    /// Stats entries refused so far.
    pub entries: u64,
}

/// The ingest: accounting, windows and directives behind one cheap-to-clone handle.
#[derive(Clone)]
pub struct Ingest {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Ingest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ingest")
            .field("config", &self.inner.config)
            .field("generation", &self.inner.publisher.generation())
            .finish_non_exhaustive()
    }
}

impl Ingest {
    /// Builds an ingest, refusing a configuration that cannot work.
    pub fn try_new(config: IngestConfig) -> Result<Self, IngestError> {
        let problem = if config.bucket_width.is_zero() {
            Some("bucket_width must be greater than zero")
        } else if config.retention < config.bucket_width {
            Some("retention must be at least one bucket_width")
        } else if config.keepalive.is_zero() {
            Some("keepalive must be greater than zero")
        } else if config.max_entries_per_report == 0 {
            Some("max_entries_per_report must be at least 1")
        } else if config.max_message_bytes < 1024 {
            Some("max_message_bytes must be at least 1024")
        } else if config.max_buffered_bytes < config.max_message_bytes + 5 {
            Some("max_buffered_bytes must hold at least one message at max_message_bytes")
        } else if config.max_entries_per_report > weir_proto::codec::MAX_STATS_PER_REPORT {
            Some("max_entries_per_report must be at most weir.v1's 1024")
        } else if config.max_connections == 0 || config.max_streams_per_connection == 0 {
            Some("max_connections and max_streams_per_connection must be at least 1")
        } else if config.max_reporters == 0 || config.max_reporters_per_identity == 0 {
            Some("max_reporters and max_reporters_per_identity must be at least 1")
        } else {
            None
        };
        if let Some(problem) = problem {
            return Err(IngestError::Config(problem.to_string()));
        }
        let windows = Windows::new(
            Instant::now(),
            config.bucket_width,
            config.retention,
            config.retired_canary_grace,
        );
        let relay = config
            .relay
            .clone()
            .map(|relay| Arc::new(relay::Relay::new(relay)));
        let initial_generation = if relay.is_some() {
            0
        } else {
            config.initial_generation
        };
        Ok(Self {
            inner: Arc::new(Inner {
                accounting: Accounting::default(),
                windows,
                publisher: Publisher::new(initial_generation),
                counters: IngestCounters::default(),
                reporters: RwLock::default(),
                refusals: Mutex::default(),
                relay,
                replica_identity: std::sync::OnceLock::new(),
                config,
            }),
        })
    }

    /// The configuration in use.
    pub fn config(&self) -> &IngestConfig {
        &self.inner.config
    }

    /// [`Ingest::ingest_from`] the machine itself ([`PeerIdentity::Loopback`]): for reports that
    /// did not come over the network (tests, benchmarks, in-process reporters).
    pub fn ingest(&self, report: &Report, now: Instant) -> Result<Ingested, Rejection> {
        self.ingest_from(report, &PeerIdentity::Loopback, now)
    }

    /// Accounts for one report from `peer` (the stream's verified identity) received at `now`:
    /// the synchronous core of an `Exchange` stream.
    ///
    /// `Ok` carries the ack to send (also for duplicates and dropped reports); `Err` means the
    /// stream must end with [`Rejection::status`]. Every refusal is counted.
    pub fn ingest_from(
        &self,
        report: &Report,
        peer: &PeerIdentity,
        now: Instant,
    ) -> Result<Ingested, Rejection> {
        let inner = &*self.inner;
        let result = self.ingest_uncounted(report, peer, now);
        match &result {
            Err(rejection) => inner.counters.reject(rejection),
            Ok(Ingested {
                outcome: Outcome::Dropped(rejection),
                node_id,
                ..
            }) => {
                if inner.counters.should_log(rejection.reason, now) {
                    tracing::warn!(
                        node_id = &**node_id,
                        epoch = report.epoch,
                        sequence = report.sequence,
                        reason = %rejection.reason,
                        "dropped a report: {} (warnings for this reason are rate-limited)",
                        rejection.message
                    );
                }
                inner.counters.reject(rejection);
            }
            Ok(_) => {}
        }
        result
    }

    fn ingest_uncounted(
        &self,
        report: &Report,
        peer: &PeerIdentity,
        now: Instant,
    ) -> Result<Ingested, Rejection> {
        let inner = &*self.inner;
        let Some(node_id) = report
            .reporter
            .as_ref()
            .map(|r| r.node_id.as_str())
            .filter(|id| !id.is_empty())
        else {
            return Err(Rejection::new(
                RejectReason::MissingReporter,
                "report has no reporter.node_id; every report must name its Envoy (the node id) \
                 so the controller can account for it exactly",
            ));
        };
        if node_id.len() > inner.config.max_node_id_bytes {
            return Err(Rejection::new(
                RejectReason::BadNodeId,
                format!(
                    "reporter.node_id is {} bytes long; the controller accepts at most {} (Envoy's node id, as Istio sets it, is far shorter)",
                    node_id.len(),
                    inner.config.max_node_id_bytes
                ),
            ));
        }
        let claimed = report
            .reporter
            .as_ref()
            .map_or("", |r| r.namespace.as_str());
        if let Some(namespace) = peer.namespace() {
            if !claimed.is_empty() && claimed != namespace {
                return Err(Rejection::new(
                    RejectReason::ClaimMismatch,
                    format!(
                        "the report claims namespace {claimed:?}, but this stream's certificate is {peer}: a reporter speaks only for its own namespace"
                    ),
                ));
            }
        }
        let relayed = node_id.starts_with(RELAY_NODE_PREFIX);
        if relayed && !self.is_replica(peer) {
            return Err(Rejection::new(
                RejectReason::NotAReplica,
                format!(
                    "node id {node_id:?} claims to be a controller relay, but this stream's certificate is {peer}, not a controller replica's ({}); node ids starting with {RELAY_NODE_PREFIX:?} are reserved for the controller's own replicas",
                    self.inner
                        .replica_identity
                        .get()
                        .map_or_else(|| "none known: this controller serves no TLS".to_owned(), ToString::to_string)
                ),
            ));
        }
        // Checked before the ledger moves, so nothing is recorded for a report that is refused;
        // wasted work only for duplicates, which are rare.
        let checked = if report.sequence == 0 {
            if report.stats.is_empty() {
                Ok(validate::Validated {
                    entries: Vec::new(),
                    not_allowed: Vec::new(),
                })
            } else {
                Err(Rejection::new(
                    RejectReason::HelloWithStats,
                    format!(
                        "hello (sequence 0) from {node_id} carries {} stats entries; a hello is \
                         never counted, so samples must go in reports numbered from 1",
                        report.stats.len()
                    ),
                ))
            }
        } else {
            let reporters = inner.reporters.read().unwrap_or_else(|p| p.into_inner());
            let policy = &inner.config.reporter_policy;
            validate::validate(
                report,
                &inner.windows,
                inner.config.max_entries_per_report,
                inner.publisher.generation(),
                |canary| {
                    // A relay forwards only what its own ingest allowed its Envoys.
                    relayed || {
                        let rules = reporters.get(canary).map_or(&[][..], Vec::as_slice);
                        policy.allows(peer, canary, rules)
                    }
                },
                now,
            )
        };
        let limits = LedgerLimits {
            max_nodes: inner.config.max_reporters,
            max_nodes_per_identity: inner.config.max_reporters_per_identity,
        };
        let admitted = inner
            .accounting
            .admit(peer, node_id, report.epoch, report.sequence, now, limits)
            .map_err(|error| match error {
                // The current epoch is not said: only the reporter that owns it needs it.
                AdmitError::Stale => Rejection::new(
                    RejectReason::StaleEpoch,
                    format!(
                        "epoch {:#x} of reporter {node_id} is stale: the same node id has since \
                         reported from a newer epoch (the Envoy restarted), so reports from the \
                         old process are no longer counted; if two live Envoys share this node \
                         id, give each a unique one",
                        report.epoch
                    ),
                ),
                AdmitError::Full {
                    limit,
                    per_identity,
                } => Rejection::new(
                    RejectReason::TooManyReporters,
                    if per_identity {
                        format!(
                            "the controller already tracks {limit} Envoys for {peer}, its limit per identity; node {node_id} is refused (Envoys not heard from for an hour are forgotten)"
                        )
                    } else {
                        format!(
                            "the controller already tracks {limit} Envoys, its limit; node {node_id} is refused (raise the limit or add controller replicas)"
                        )
                    },
                ),
                AdmitError::Gap { last, sequence } => Rejection::new(
                    RejectReason::SequenceGap,
                    format!(
                        "report {sequence} of reporter {node_id} epoch {:#x} skips {}..={}: the \
                         controller has applied up to {last}; reconnect and resend every \
                         unacknowledged report in order",
                        report.epoch,
                        last.saturating_add(1),
                        sequence.saturating_sub(1)
                    ),
                ),
            })?;
        let node = admitted.node;
        let (ack, outcome) = match admitted.admission {
            Admission::Hello { ack } => {
                inner.counters.hello();
                let outcome = match checked {
                    Ok(_) => Outcome::Hello,
                    Err(rejection) => Outcome::Dropped(rejection),
                };
                (ack, outcome)
            }
            Admission::Duplicate { ack } => {
                inner.counters.duplicate();
                (ack, Outcome::Duplicate)
            }
            Admission::Apply { ack } => match checked {
                Ok(validated) => {
                    self.record_refusals(peer, &validated.not_allowed);
                    let requests = validated
                        .entries
                        .iter()
                        .fold(0u64, |sum, e| sum.saturating_add(e.stats.requests));
                    // What one Envoy can have served since its previous report (or since this
                    // controller started), at the most.
                    let since = now.saturating_duration_since(
                        admitted
                            .previous_applied
                            .unwrap_or_else(|| inner.windows.origin()),
                    );
                    let span = since.clamp(Duration::from_secs(1), inner.config.retention);
                    // A relay speaks for up to as many Envoys as a replica holds connections.
                    let envoys = if relayed {
                        u128::try_from(inner.config.max_connections).unwrap_or(u128::MAX)
                    } else {
                        1
                    };
                    let allowed = u64::try_from(
                        u128::from(inner.config.max_requests_per_second)
                            .saturating_mul(envoys)
                            .saturating_mul(span.as_millis())
                            / 1000,
                    )
                    .unwrap_or(u64::MAX);
                    if requests > allowed {
                        let rejection = Rejection::new(
                            RejectReason::Implausible,
                            format!(
                                "report {} of reporter {node_id} claims {requests} requests in {:.1}s, more than one Envoy can serve ({} per second at most); dropped",
                                report.sequence,
                                span.as_secs_f64(),
                                inner.config.max_requests_per_second
                            ),
                        );
                        (ack, Outcome::Dropped(rejection))
                    } else {
                        match &inner.relay {
                            Some(relay) => relay.merge(
                                &node,
                                report.applied_generation,
                                validated.entries.iter().map(|e| e.stats),
                                now,
                            ),
                            None => inner.windows.apply(&validated.entries, &node, now),
                        }
                        inner.counters.applied(requests);
                        if validated.not_allowed.is_empty() {
                            (ack, Outcome::Applied)
                        } else {
                            (
                                ack,
                                Outcome::Dropped(Self::not_allowed(peer, &validated.not_allowed)),
                            )
                        }
                    }
                }
                Err(rejection) => (ack, Outcome::Dropped(rejection)),
            },
        };
        Ok(Ingested {
            node_id: node,
            ack: Ack {
                epoch: report.epoch,
                sequence: ack,
            },
            outcome,
        })
    }

    fn not_allowed(peer: &PeerIdentity, canaries: &[&str]) -> Rejection {
        Rejection::new(
            RejectReason::NotAllowed,
            format!(
                "{peer} may not report for canary {}: by default only workloads of the canary's namespace and the ingress gateways may; allow others in the Canary's spec.analysis.reporters; those entries were dropped",
                canaries.join(", ")
            ),
        )
    }

    fn record_refusals(&self, peer: &PeerIdentity, canaries: &[&str]) {
        if canaries.is_empty() {
            return;
        }
        let identity = peer.to_string();
        let mut refusals = lock(&self.inner.refusals);
        for &canary in canaries {
            // Keys come from the directive (validated before authorisation): a bounded set.
            let log = refusals.entry(canary.to_owned()).or_default();
            let known = log.by_identity.len();
            match log.by_identity.get_mut(&identity) {
                Some((n, _)) => *n = n.saturating_add(1),
                None if known < MAX_REFUSED_IDENTITIES => {
                    log.by_identity.insert(identity.clone(), (1, false));
                }
                None => {}
            }
        }
    }

    /// Identities whose reports for `canary` were refused and that were not returned before:
    /// each is returned once, for one Warning event on the Canary.
    pub fn new_refusals(&self, canary: &str) -> Vec<RefusedReporter> {
        let mut refusals = lock(&self.inner.refusals);
        let Some(log) = refusals.get_mut(canary) else {
            return Vec::new();
        };
        log.by_identity
            .iter_mut()
            .filter(|(_, (_, announced))| !*announced)
            .map(|(identity, (entries, announced))| {
                *announced = true;
                RefusedReporter {
                    identity: identity.clone(),
                    entries: *entries,
                }
            })
            .collect()
    }

    /// Who may report for `canary` besides its own namespace and the policy's identities
    /// (`spec.analysis.reporters`).
    pub fn set_reporters(&self, canary: &str, rules: Vec<ReporterRule>) {
        let mut reporters = self
            .inner
            .reporters
            .write()
            .unwrap_or_else(|p| p.into_inner());
        if rules.is_empty() {
            reporters.remove(canary);
        } else {
            reporters.insert(canary.to_owned(), rules);
        }
    }

    /// One version of one canary over the last `window` before `now` (rounded up to whole
    /// buckets, the current partial bucket included, capped at the retention). None if the
    /// canary is not tracked (never published, or retired and expired).
    pub fn window(
        &self,
        canary: &str,
        version: Version,
        window: Duration,
        now: Instant,
    ) -> Option<VersionWindow> {
        self.inner.windows.window(canary, version, window, now)
    }

    /// Everything one version of `canary` served since it was first tracked (the `/metrics`
    /// counters; a retired canary's expire with it). None if the canary is not tracked.
    pub fn totals(&self, canary: &str, version: Version) -> Option<Totals> {
        self.inner.windows.totals(canary, version)
    }

    /// Both versions' buckets of `canary` as they are at `now` (the current one included, still
    /// filling), from the one `since` falls in and from bucket `from` on, each with its index,
    /// for the comparative judge (see [`crate::analysis::judge`]). None if the canary is not
    /// tracked.
    pub fn judge_buckets(
        &self,
        canary: &str,
        since: Instant,
        from: Option<u64>,
        now: Instant,
        latency_ratio: Option<f64>,
    ) -> Option<Vec<(u64, crate::analysis::judge::BucketPair)>> {
        self.inner
            .windows
            .judge_buckets(canary, since, from, now, latency_ratio)
    }

    /// When the newest report that counted requests for the canary arrived; None if none did.
    /// Tells the caller whether any Envoy covers the canary at all (otherwise fall back to
    /// Prometheus, or to weights in the VirtualService). A report without stats for the canary,
    /// or with an entry of zero requests, does not count.
    pub fn last_report(&self, canary: &str) -> Option<Instant> {
        self.inner.windows.last_report(canary)
    }

    /// When the first report that included the canary arrived since this ingest started; None
    /// if none did. After a controller restart, the first sign that the filters reconnected.
    pub fn first_report(&self, canary: &str) -> Option<Instant> {
        self.inner.windows.first_report(canary)
    }

    /// When this ingest was built (the controller's start): it holds no sample from before.
    pub fn started_at(&self) -> Instant {
        self.inner.windows.origin()
    }

    /// Publishes a complete new directive to every connected Envoy; returns its generation.
    /// Reports for the new canaries are accepted from this moment; canaries left out are
    /// retired (see [`IngestConfig::retired_canary_grace`]). A relay refuses: its directives are
    /// the leader's.
    pub fn publish(&self, canaries: Vec<CanaryRoute>) -> Result<u64, PublishError> {
        if self.inner.relay.is_some() {
            return Err(PublishError::Relay);
        }
        Publisher::check(&canaries)?;
        let windows = &self.inner.windows;
        Ok(self.inner.publisher.publish(canaries, |routes| {
            windows.set_current(routes.iter().map(|r| r.key.as_str()), Instant::now());
        }))
    }

    /// A relay passes the leader's `directive` down unchanged (its generation too); true if it
    /// was new.
    pub(crate) fn republish(&self, directive: Directive) -> Result<bool, PublishError> {
        Publisher::check(&directive.canaries)?;
        let windows = &self.inner.windows;
        Ok(self.inner.publisher.republish(directive, |routes| {
            windows.set_current(routes.iter().map(|r| r.key.as_str()), Instant::now());
        }))
    }

    /// Whether `peer` is a controller replica: the controller's own identity, or the machine
    /// itself on plaintext loopback.
    fn is_replica(&self, peer: &PeerIdentity) -> bool {
        match peer {
            PeerIdentity::Loopback => true,
            PeerIdentity::Spiffe(id) => self.inner.replica_identity.get() == Some(id),
        }
    }

    /// Sets the controller's own identity, whose relay streams are trusted; [`Ingest::serve`]
    /// takes it from the serving certificate. Only the first call counts.
    pub fn set_replica_identity(&self, identity: SpiffeId) {
        let _ = self.inner.replica_identity.set(identity);
    }

    /// True for an ingest in relay mode.
    pub fn is_relay(&self) -> bool {
        self.inner.relay.is_some()
    }

    /// In relay mode: reports sealed and not yet acknowledged by the leader.
    pub fn relay_in_flight(&self) -> Option<usize> {
        self.inner.relay.as_ref().map(|relay| relay.in_flight())
    }

    pub(crate) fn relay(&self) -> Option<&Arc<relay::Relay>> {
        self.inner.relay.as_ref()
    }

    /// The directive currently in force.
    pub fn directive(&self) -> Arc<Directive> {
        self.inner.publisher.current()
    }

    /// How many connected Envoys run `generation` or a later one. The caller decides how long to
    /// wait for [`Confirmation::all`].
    pub fn generation_confirmed(&self, generation: u64) -> Confirmation {
        self.inner.publisher.confirmed(generation)
    }

    /// Counters of everything the ingest did.
    pub fn counters(&self) -> &IngestCounters {
        &self.inner.counters
    }

    /// Drops expired buckets and retired canaries, and forgets idle Envoys. [`Ingest::serve`]
    /// runs this periodically; call it yourself when serving the service another way.
    pub fn sweep(&self, now: Instant) {
        self.inner.windows.sweep(now);
        let windows = &self.inner.windows;
        lock(&self.inner.refusals).retain(|canary, _| windows.accepting(canary, now).is_some());
        self.inner
            .accounting
            .forget_idle(now, self.inner.config.forget_reporter_after);
    }

    /// Window buckets held and latency pages (1 KiB each) they use, for a memory gauge.
    pub fn footprint(&self) -> (usize, usize) {
        self.inner.windows.footprint()
    }

    /// Envoys in the sequence ledger (connected or recently seen).
    pub fn known_reporters(&self) -> usize {
        self.inner.accounting.len()
    }

    pub(crate) fn publisher(&self) -> &Publisher {
        &self.inner.publisher
    }
}

#[cfg(test)]
mod tests;
