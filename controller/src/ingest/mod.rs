//! Telemetry ingest: the weir.v1 `Exchange` server that every Envoy's filter streams reports to,
//! the exact accounting of those reports, the per-canary windows they merge into, and the
//! directives pushed back.
//!
//! - [`accounting`]: each `(node_id, epoch, sequence)` applied at most once, in order.
//! - [`validate`]: a report is checked completely before any of it is applied.
//! - [`windows`]: time-bucketed, per-canary, per-version requests, failures and HDR latency.
//! - [`directives`]: the current directive, its fan-out, and generation confirmation.
//! - [`server`]: the tonic service and [`Ingest::serve`].
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
//! | larger than the decoding limit | `OUT_OF_RANGE`, counted | ends |
//!
//! Invalid reports are acknowledged and dropped rather than refused with a status because ending
//! the stream makes the reporter reconnect and resend the same report: a permanently bad report
//! would loop forever and block every report behind it. Dropping consumes its sequence number, so
//! the next report is not a gap. Problems that no resend can fix on this stream, or that a
//! reconnect does fix (a gap), end the stream.

mod accounting;
mod counters;
mod directives;
mod server;
mod validate;
mod windows;

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use weir_proto::v1::{Ack, CanaryRoute, Directive, Report, Version};

pub use counters::{CountersSnapshot, IngestCounters, RejectReason, Rejection};
pub use directives::{Confirmation, PublishError};
pub use server::{Served, TelemetryService};
pub use windows::VersionWindow;

use accounting::{Accounting, Admission, AdmitError};
use directives::Publisher;
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
    /// Largest report message accepted. Default 4 MiB.
    pub max_message_bytes: usize,
    /// Most stats entries (canary, version pairs) in one report. Default 1024.
    pub max_entries_per_report: usize,
    /// When a stream has sent nothing for this long, the current directive is sent again, so an
    /// idle Envoy does not take the silence for a lost controller (the filter's grace period
    /// defaults to 10 s). Default 3 s.
    pub keepalive: Duration,
    /// Sequence state of an Envoy not heard from for this long is forgotten. Default 1 h.
    pub forget_reporter_after: Duration,
    /// The generation of the initial (empty) directive; publishes count up from it. Default: the
    /// Unix time in milliseconds, so generations keep increasing across controller restarts (the
    /// filters still hold generations from the previous controller life).
    pub initial_generation: u64,
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
            max_message_bytes: 4 * 1024 * 1024,
            max_entries_per_report: 1024,
            keepalive: Duration::from_secs(3),
            forget_reporter_after: Duration::from_secs(3600),
            initial_generation: millis,
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
        Ok(Self {
            inner: Arc::new(Inner {
                accounting: Accounting::default(),
                windows,
                publisher: Publisher::new(config.initial_generation),
                counters: IngestCounters::default(),
                config,
            }),
        })
    }

    /// The configuration in use.
    pub fn config(&self) -> &IngestConfig {
        &self.inner.config
    }

    /// Accounts for one report received at `now`: the synchronous core of an `Exchange` stream.
    ///
    /// `Ok` carries the ack to send (also for duplicates and dropped reports); `Err` means the
    /// stream must end with [`Rejection::status`]. Every refusal is counted.
    pub fn ingest(&self, report: &Report, now: Instant) -> Result<Ingested, Rejection> {
        let inner = &*self.inner;
        let result = self.ingest_uncounted(report, now);
        match &result {
            Err(rejection) => inner.counters.reject(rejection),
            Ok(Ingested {
                outcome: Outcome::Dropped(rejection),
                node_id,
                ..
            }) => {
                tracing::warn!(
                    node_id = &**node_id,
                    epoch = report.epoch,
                    sequence = report.sequence,
                    reason = %rejection.reason,
                    "dropped a report: {}",
                    rejection.message
                );
                inner.counters.reject(rejection);
            }
            Ok(_) => {}
        }
        result
    }

    fn ingest_uncounted(&self, report: &Report, now: Instant) -> Result<Ingested, Rejection> {
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
        // Checked before the ledger moves, so nothing is recorded for a report that is refused;
        // wasted work only for duplicates, which are rare.
        let checked = if report.sequence == 0 {
            if report.stats.is_empty() {
                Ok(Vec::new())
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
            validate::validate(
                report,
                &inner.windows,
                inner.config.max_entries_per_report,
                inner.publisher.generation(),
                now,
            )
        };
        let (node, admission) = inner
            .accounting
            .admit(node_id, report.epoch, report.sequence, now)
            .map_err(|error| match error {
                AdmitError::Stale { current } => Rejection::new(
                    RejectReason::StaleEpoch,
                    format!(
                        "epoch {:#x} of reporter {node_id} is stale: the same node id has since \
                         reported from epoch {current:#x} (the Envoy restarted), so reports from \
                         the old process are no longer counted; if two live Envoys share this \
                         node id, give each a unique one",
                        report.epoch
                    ),
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
        let (ack, outcome) = match admission {
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
                Ok(entries) => {
                    inner.windows.apply(&entries, &node, now);
                    let requests = entries
                        .iter()
                        .fold(0u64, |sum, e| sum.saturating_add(e.stats.requests));
                    inner.counters.applied(requests);
                    (ack, Outcome::Applied)
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
    /// retired (see [`IngestConfig::retired_canary_grace`]).
    pub fn publish(&self, canaries: Vec<CanaryRoute>) -> Result<u64, PublishError> {
        Publisher::check(&canaries)?;
        let windows = &self.inner.windows;
        Ok(self.inner.publisher.publish(canaries, |routes| {
            windows.set_current(routes.iter().map(|r| r.key.as_str()), Instant::now());
        }))
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
