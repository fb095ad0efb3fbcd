//! What the ingest did with every report, counted for a metrics endpoint and for `weir status`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use tonic::{Code, Status};

/// Why a report (or a whole stream) was refused.
///
/// Some reasons end the stream ([`RejectReason::ends_stream`]); the others are per-report problems
/// that are acknowledged and dropped, because ending the stream would make the reporter resend the
/// same report forever.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RejectReason {
    /// The report names no `reporter.node_id`, so it cannot be accounted for. Ends the stream.
    MissingReporter,
    /// A report on an open stream came from another node id or epoch than the stream's first one.
    /// Ends the stream.
    IdentityChanged,
    /// The epoch was replaced by a newer one for the same node id (the Envoy restarted). Ends the
    /// stream with `FAILED_PRECONDITION`.
    StaleEpoch,
    /// The sequence skips reports that were never applied. Ends the stream with `ABORTED` so the
    /// reporter reconnects and resends everything unacknowledged, in order.
    SequenceGap,
    /// The message exceeded the server's decoding limit. Ends the stream with `OUT_OF_RANGE`.
    Oversized,
    /// A hello (sequence 0) carried stats; they are not counted.
    HelloWithStats,
    /// More stats entries than the configured per-report limit.
    TooManyEntries,
    /// A stats entry's canary key is not `namespace/name`.
    BadCanaryKey,
    /// A stats entry's version is `VERSION_UNSPECIFIED` or not a known value.
    UnspecifiedVersion,
    /// A stats entry has more failures than requests.
    FailuresExceedRequests,
    /// A latency histogram that the weir.v1 layout refuses.
    BadHistogram,
    /// A latency histogram whose sample count differs from the entry's request count.
    HistogramCountMismatch,
    /// A stats entry for a canary that is not in the current directive.
    UnknownCanary,
    /// The stream has no verified client identity (no certificate, or not a workload's). Ends
    /// the stream with `UNAUTHENTICATED`.
    Unauthenticated,
    /// The report claims a namespace other than the certificate's. Ends the stream with
    /// `PERMISSION_DENIED`.
    ClaimMismatch,
    /// Entries for canaries the reporter may not speak for; they were dropped.
    NotAllowed,
    /// More requests than one Envoy can serve in the time since its previous report.
    Implausible,
    /// A node id beyond the length limit. Ends the stream.
    BadNodeId,
    /// A new Envoy while the ledger is full. Ends the stream with `RESOURCE_EXHAUSTED`.
    TooManyReporters,
    /// A stream that sent no report within the hello timeout. Ends the stream.
    SilentStream,
    /// A message refused on the wire, before decoding: more stats entries than weir.v1 allows,
    /// or bytes that are not a Report. Ends the stream with `INVALID_ARGUMENT`.
    Malformed,
    /// The server's budget for reports in transit (all streams together) was spent. Ends the
    /// stream with `RESOURCE_EXHAUSTED`; the reporter resends later.
    BufferFull,
    /// A relay node id from an identity that is not a controller replica's. Ends the stream with
    /// `PERMISSION_DENIED`.
    NotAReplica,
}

impl RejectReason {
    /// Every reason, in a stable order (for metrics).
    pub const ALL: [RejectReason; 23] = [
        RejectReason::MissingReporter,
        RejectReason::IdentityChanged,
        RejectReason::StaleEpoch,
        RejectReason::SequenceGap,
        RejectReason::Oversized,
        RejectReason::HelloWithStats,
        RejectReason::TooManyEntries,
        RejectReason::BadCanaryKey,
        RejectReason::UnspecifiedVersion,
        RejectReason::FailuresExceedRequests,
        RejectReason::BadHistogram,
        RejectReason::HistogramCountMismatch,
        RejectReason::UnknownCanary,
        RejectReason::Unauthenticated,
        RejectReason::ClaimMismatch,
        RejectReason::NotAllowed,
        RejectReason::Implausible,
        RejectReason::BadNodeId,
        RejectReason::TooManyReporters,
        RejectReason::SilentStream,
        RejectReason::Malformed,
        RejectReason::BufferFull,
        RejectReason::NotAReplica,
    ];

    /// A snake_case name, for metric labels and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::MissingReporter => "missing_reporter",
            RejectReason::IdentityChanged => "identity_changed",
            RejectReason::StaleEpoch => "stale_epoch",
            RejectReason::SequenceGap => "sequence_gap",
            RejectReason::Oversized => "oversized",
            RejectReason::HelloWithStats => "hello_with_stats",
            RejectReason::TooManyEntries => "too_many_entries",
            RejectReason::BadCanaryKey => "bad_canary_key",
            RejectReason::UnspecifiedVersion => "unspecified_version",
            RejectReason::FailuresExceedRequests => "failures_exceed_requests",
            RejectReason::BadHistogram => "bad_histogram",
            RejectReason::HistogramCountMismatch => "histogram_count_mismatch",
            RejectReason::UnknownCanary => "unknown_canary",
            RejectReason::Unauthenticated => "unauthenticated",
            RejectReason::ClaimMismatch => "claim_mismatch",
            RejectReason::NotAllowed => "not_allowed",
            RejectReason::Implausible => "implausible",
            RejectReason::BadNodeId => "bad_node_id",
            RejectReason::TooManyReporters => "too_many_reporters",
            RejectReason::SilentStream => "silent_stream",
            RejectReason::Malformed => "malformed",
            RejectReason::BufferFull => "buffer_full",
            RejectReason::NotAReplica => "not_a_replica",
        }
    }

    /// True when the controller answers this problem by ending the stream with a status; false
    /// when it acknowledges the report and drops its contents.
    pub fn ends_stream(self) -> bool {
        matches!(
            self,
            RejectReason::MissingReporter
                | RejectReason::IdentityChanged
                | RejectReason::StaleEpoch
                | RejectReason::SequenceGap
                | RejectReason::Oversized
                | RejectReason::Unauthenticated
                | RejectReason::ClaimMismatch
                | RejectReason::BadNodeId
                | RejectReason::TooManyReporters
                | RejectReason::SilentStream
                | RejectReason::Malformed
                | RejectReason::BufferFull
                | RejectReason::NotAReplica
        )
    }

    /// The gRPC code that carries this problem.
    pub fn code(self) -> Code {
        match self {
            RejectReason::StaleEpoch => Code::FailedPrecondition,
            RejectReason::SequenceGap => Code::Aborted,
            RejectReason::Oversized => Code::OutOfRange,
            RejectReason::Unauthenticated => Code::Unauthenticated,
            RejectReason::ClaimMismatch | RejectReason::NotAReplica => Code::PermissionDenied,
            RejectReason::TooManyReporters | RejectReason::BufferFull => Code::ResourceExhausted,
            RejectReason::SilentStream => Code::DeadlineExceeded,
            _ => Code::InvalidArgument,
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl std::fmt::Display for RejectReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One refused report: the reason and a message that tells the operator what to fix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// Why.
    pub reason: RejectReason,
    /// What was wrong and how to fix it.
    pub message: String,
}

impl Rejection {
    pub(crate) fn new(reason: RejectReason, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
        }
    }

    /// The gRPC status that carries this rejection.
    pub fn status(&self) -> Status {
        Status::new(self.reason.code(), self.message.clone())
    }
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.reason, self.message)
    }
}

impl std::error::Error for Rejection {}

/// Live counters; cheap to bump from every stream.
#[derive(Debug, Default)]
pub struct IngestCounters {
    reports_applied: AtomicU64,
    requests_applied: AtomicU64,
    duplicates: AtomicU64,
    hellos: AtomicU64,
    streams_opened: AtomicU64,
    stream_errors: AtomicU64,
    rejected: [AtomicU64; RejectReason::ALL.len()],
    last_rejection: Mutex<Option<Rejection>>,
    /// Per reason, when a warning was last logged (warnings are rate-limited).
    last_logged: Mutex<[Option<std::time::Instant>; RejectReason::ALL.len()]>,
    /// Connections closed before any stream: over the connection limit, or a failed TLS
    /// handshake.
    pub connections_refused: std::sync::Arc<AtomicU64>,
}

/// One warning per reason per this long, at most.
const LOG_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// A consistent-enough copy of [`IngestCounters`] (each field is read atomically on its own).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CountersSnapshot {
    /// Reports with a new sequence that were applied to the windows.
    pub reports_applied: u64,
    /// Requests (samples) those reports carried.
    pub requests_applied: u64,
    /// Reports at or below the highest applied sequence: acknowledged again, not counted.
    pub duplicates: u64,
    /// Hellos (sequence 0).
    pub hellos: u64,
    /// Exchange streams that sent at least one report.
    pub streams_opened: u64,
    /// Streams that ended with a transport or decoding error other than an oversized message.
    pub stream_errors: u64,
    /// Refusals by reason, in [`RejectReason::ALL`] order.
    pub rejected: [u64; RejectReason::ALL.len()],
}

impl CountersSnapshot {
    /// Refusals for one reason.
    pub fn rejected(&self, reason: RejectReason) -> u64 {
        self.rejected[reason.index()]
    }

    /// Refusals for every reason together.
    pub fn rejected_total(&self) -> u64 {
        self.rejected.iter().sum()
    }
}

impl IngestCounters {
    /// A copy of every counter.
    pub fn snapshot(&self) -> CountersSnapshot {
        let read = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let mut rejected = [0; RejectReason::ALL.len()];
        for (slot, counter) in rejected.iter_mut().zip(&self.rejected) {
            *slot = read(counter);
        }
        CountersSnapshot {
            reports_applied: read(&self.reports_applied),
            requests_applied: read(&self.requests_applied),
            duplicates: read(&self.duplicates),
            hellos: read(&self.hellos),
            streams_opened: read(&self.streams_opened),
            stream_errors: read(&self.stream_errors),
            rejected,
        }
    }

    /// Whether a warning for `reason` may be logged now (one per reason every 10 s): a hostile
    /// reporter must not be able to flood the controller's log.
    pub(crate) fn should_log(&self, reason: RejectReason, now: std::time::Instant) -> bool {
        let mut last = lock(&self.last_logged);
        let slot = &mut last[reason.index()];
        if slot.is_some_and(|at| now.saturating_duration_since(at) < LOG_EVERY) {
            return false;
        }
        *slot = Some(now);
        true
    }

    /// The counters in Prometheus' text format: reports applied and refused (by reason),
    /// requests applied, duplicates, hellos, streams, and connections refused.
    pub fn render_prometheus(&self) -> String {
        let snap = self.snapshot();
        let refused = self.connections_refused.load(Ordering::Relaxed);
        crate::exporter::render_text(crate::exporter::CollectWith(
            move |encoder: &mut prometheus_client::encoding::DescriptorEncoder<'_>| {
                encode_snapshot(encoder, &snap, refused)
            },
        ))
    }

    /// Writes the counters into `encoder` (see [`IngestCounters::render_prometheus`]).
    pub fn encode_metrics(
        &self,
        encoder: &mut prometheus_client::encoding::DescriptorEncoder<'_>,
    ) -> std::fmt::Result {
        encode_snapshot(
            encoder,
            &self.snapshot(),
            self.connections_refused.load(Ordering::Relaxed),
        )
    }

    /// The most recent refusal, so an operator can see what a misbehaving reporter sends.
    pub fn last_rejection(&self) -> Option<Rejection> {
        lock(&self.last_rejection).clone()
    }

    pub(crate) fn applied(&self, requests: u64) {
        self.reports_applied.fetch_add(1, Ordering::Relaxed);
        self.requests_applied.fetch_add(requests, Ordering::Relaxed);
    }

    pub(crate) fn duplicate(&self) {
        self.duplicates.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn hello(&self) {
        self.hellos.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn stream_opened(&self) {
        self.streams_opened.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn stream_error(&self) {
        self.stream_errors.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn reject(&self, rejection: &Rejection) {
        self.rejected[rejection.reason.index()].fetch_add(1, Ordering::Relaxed);
        *lock(&self.last_rejection) = Some(rejection.clone());
    }
}

/// Locks a mutex, ignoring poisoning: every critical section in the ingest leaves its data
/// consistent at every await-free step, so a panic elsewhere must not take the ingest down.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn encode_snapshot(
    encoder: &mut prometheus_client::encoding::DescriptorEncoder<'_>,
    snap: &CountersSnapshot,
    connections_refused: u64,
) -> std::fmt::Result {
    use crate::exporter::{counters, labels};
    for (name, help, value) in [
        (
            "weir_reports_applied",
            "Filter reports applied to the windows.",
            snap.reports_applied,
        ),
        (
            "weir_requests_applied",
            "Requests the applied reports carried.",
            snap.requests_applied,
        ),
        (
            "weir_reports_duplicate",
            "Reports received again after they were applied (not counted again).",
            snap.duplicates,
        ),
        ("weir_reporter_hellos", "Hellos (sequence 0).", snap.hellos),
        (
            "weir_telemetry_streams",
            "Telemetry streams that sent a report.",
            snap.streams_opened,
        ),
        (
            "weir_telemetry_connections_refused",
            "Connections closed before any stream: over the connection limit, or a failed or slow TLS handshake.",
            connections_refused,
        ),
    ] {
        counters(encoder, name, help, [(Vec::new(), value)])?;
    }
    counters(
        encoder,
        "weir_reports_rejected",
        "Reports (or their entries, or whole streams) refused, by reason.",
        RejectReason::ALL.into_iter().map(|reason| {
            (
                labels([("reason", reason.to_string())]),
                snap.rejected(reason),
            )
        }),
    )
}
