//! The reporter: merges the workers' hand-overs, owns the one gRPC stream to the controller, and
//! turns what comes back into shared state for the workers. It runs in whichever of the filter's
//! root contexts owns the Envoy's stream ([`crate::ownership`]).
//!
//! Exactness: reports are deltas with a sequence number; each one is kept until the controller
//! acknowledges it and is sent again, in order, on every new stream. The controller applies a
//! (reporter, epoch, sequence) at most once. Nothing is sealed while the stream is down: samples
//! accumulate in one pending delta instead, so a long outage costs one report, not thousands.
//!
//! The whole state (epoch, next sequence, pending delta, unacknowledged reports) can be taken as a
//! [`Reporter::snapshot`] and restored in another VM, so a new owner continues the same epoch and
//! sequence: nothing is lost and the controller's ledger discards what is sent twice.

use std::collections::{BTreeMap, HashMap, VecDeque};

use prost::Message;
use weir_proto::v1::{self, controller_message::Kind};
use weir_proto::LatencyHistogram;

use crate::routing::Rng;

/// Sealed reports kept unacknowledged at most; past this, new samples wait in the pending delta.
pub const MAX_IN_FLIGHT: usize = 64;
/// The range of the first reconnect delay after a stream closes or fails to open: a random
/// time in `[0, FIRST_RETRY_RANGE_NS)`, so the Envoys of a controller that went away do not all
/// come back in the same instant (a reconnect storm).
pub const FIRST_RETRY_RANGE_NS: u64 = 1_000_000_000;
/// The largest range: each failed attempt doubles it up to this (the filter's default grace
/// period, so a controller that is back is found again within about that time).
pub const MAX_RETRY_RANGE_NS: u64 = 10_000_000_000;

/// The reconnect delays: each uniform in a range ("full jitter") that starts at
/// [`FIRST_RETRY_RANGE_NS`] and doubles with every failed attempt up to [`MAX_RETRY_RANGE_NS`].
/// Spreading every attempt over the whole range is what bounds a reconnect storm: N Envoys that
/// lose the controller together come back at about N per range, not N at once, and spread out
/// again if that attempt fails too.
#[derive(Debug, Clone)]
pub struct Backoff {
    range_ns: u64,
    rng: Rng,
}

impl Backoff {
    /// Delays drawn from `seed` (the reporter's epoch: random per VM start, so Envoys differ).
    pub fn new(seed: u64) -> Self {
        Self {
            range_ns: FIRST_RETRY_RANGE_NS,
            // Not the epoch itself, which is on the wire; it only has to differ between Envoys.
            rng: Rng::new(seed ^ 0x6a09_e667_f3bc_c908),
        }
    }

    /// The delay before the next attempt, ns; widens the range for the one after.
    pub fn next_delay_ns(&mut self) -> u64 {
        let range = self.range_ns.max(1);
        self.range_ns = range.saturating_mul(2).min(MAX_RETRY_RANGE_NS);
        ((u128::from(self.rng.next_u64()) * u128::from(range)) >> 64) as u64
    }

    /// The controller answered: the next outage starts at the first range again.
    pub fn reset(&mut self) {
        self.range_ns = FIRST_RETRY_RANGE_NS;
    }
}

/// What the host glue must do on the reporter's behalf.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Open the gRPC stream, then call [`Reporter::on_stream_opened`] (or `on_stream_failed`).
    OpenStream,
    /// Send this encoded `Report` on the open stream.
    Send(Vec<u8>),
    /// Publish this encoded `Directive` to the workers.
    ShareDirective(Vec<u8>),
    /// Publish the time (ns) of the controller's latest message to the workers.
    ShareContact(u64),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stream {
    Down { retry_at_ns: u64 },
    Opening,
    Up { token: u32 },
}

#[derive(Debug, Default)]
struct Pending {
    requests: u64,
    failures: u64,
    latency: LatencyHistogram,
}

/// The reporter's state.
#[derive(Debug)]
pub struct Reporter {
    identity: v1::Reporter,
    epoch: u64,
    next_sequence: u64,
    report_interval_ns: u64,
    pending: BTreeMap<(String, i32), Pending>,
    in_flight: VecDeque<v1::Report>,
    stream: Stream,
    backoff: Backoff,
    generation: u64,
    /// Worker id → (generation it applied, when we last heard from it).
    workers: HashMap<u64, (u64, u64)>,
    /// Hand-overs that did not decode (counted, logged by the glue).
    pub rejected_batches: u64,
    /// Something a snapshot holds has changed since the last [`Reporter::snapshot`].
    changed: bool,
}

/// Everything a reporter must hand to its successor, in the form kept in Envoy's shared data.
#[derive(Clone, PartialEq, Message)]
struct Snapshot {
    #[prost(fixed64, tag = "1")]
    epoch: u64,
    #[prost(uint64, tag = "2")]
    next_sequence: u64,
    #[prost(uint64, tag = "3")]
    generation: u64,
    #[prost(message, repeated, tag = "4")]
    pending: Vec<v1::VersionStats>,
    #[prost(message, repeated, tag = "5")]
    in_flight: Vec<v1::Report>,
    #[prost(message, repeated, tag = "6")]
    workers: Vec<WorkerSeen>,
}

/// One worker's last hand-over, for [`Reporter::applied_generation`].
#[derive(Clone, PartialEq, Message)]
struct WorkerSeen {
    #[prost(fixed64, tag = "1")]
    id: u64,
    #[prost(uint64, tag = "2")]
    generation: u64,
    #[prost(uint64, tag = "3")]
    seen_ns: u64,
}

impl Reporter {
    /// A reporter for one Envoy; `epoch` must be random per VM start.
    pub fn new(identity: v1::Reporter, epoch: u64, report_interval_ns: u64) -> Self {
        Self {
            identity,
            epoch,
            next_sequence: 1,
            report_interval_ns,
            pending: BTreeMap::new(),
            in_flight: VecDeque::new(),
            stream: Stream::Down { retry_at_ns: 0 },
            backoff: Backoff::new(epoch),
            generation: 0,
            workers: HashMap::new(),
            rejected_batches: 0,
            changed: true,
        }
    }

    /// A reporter that continues a predecessor's [`Reporter::snapshot`]: same epoch, next
    /// sequence, pending delta and unacknowledged reports. Its stream starts closed.
    pub fn restore(
        identity: v1::Reporter,
        snapshot: &[u8],
        report_interval_ns: u64,
    ) -> Result<Self, String> {
        let bad = |what: String| format!("weir: the reporter state in shared data {what}");
        let snapshot =
            Snapshot::decode(snapshot).map_err(|e| bad(format!("does not decode ({e})")))?;
        let mut reporter = Self::new(identity, snapshot.epoch, report_interval_ns);
        reporter.next_sequence = snapshot.next_sequence.max(1);
        reporter.generation = snapshot.generation;
        for stat in snapshot.pending {
            let latency = match &stat.latency {
                Some(h) => LatencyHistogram::decode(h)
                    .map_err(|e| bad(format!("has a bad histogram ({e})")))?,
                None => LatencyHistogram::new(),
            };
            reporter.pending.insert(
                (stat.canary, stat.version),
                Pending {
                    requests: stat.requests,
                    failures: stat.failures,
                    latency,
                },
            );
        }
        reporter.in_flight = snapshot.in_flight.into();
        reporter.workers = snapshot
            .workers
            .into_iter()
            .map(|w| (w.id, (w.generation, w.seen_ns)))
            .collect();
        Ok(reporter)
    }

    /// The state a successor needs, encoded; clears [`Reporter::changed`].
    pub fn snapshot(&mut self) -> Vec<u8> {
        self.changed = false;
        Snapshot {
            epoch: self.epoch,
            next_sequence: self.next_sequence,
            generation: self.generation,
            pending: self
                .pending
                .iter()
                .map(|((canary, version), p)| v1::VersionStats {
                    canary: canary.clone(),
                    version: *version,
                    requests: p.requests,
                    failures: p.failures,
                    latency: Some(p.latency.encode()),
                })
                .collect(),
            in_flight: self.in_flight.iter().cloned().collect(),
            workers: self
                .workers
                .iter()
                .map(|(&id, &(generation, seen_ns))| WorkerSeen {
                    id,
                    generation,
                    seen_ns,
                })
                .collect(),
        }
        .encode_to_vec()
    }

    /// Whether the state changed since the last snapshot (so it must be written again).
    pub fn changed(&self) -> bool {
        self.changed
    }

    /// This reporter life's epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The stream token, when a stream is open.
    pub fn stream_token(&self) -> Option<u32> {
        match self.stream {
            Stream::Up { token } => Some(token),
            _ => None,
        }
    }

    /// Reports sealed but not yet acknowledged.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Merges one worker hand-over (an encoded `Report` whose epoch is the worker id).
    pub fn on_worker_batch(&mut self, bytes: &[u8], now_ns: u64) -> Result<(), String> {
        let batch = v1::Report::decode(bytes).map_err(|e| {
            self.rejected_batches += 1;
            format!("weir: a worker hand-over does not decode ({e}); dropped")
        })?;
        self.on_stats(batch.epoch, batch.applied_generation, &batch.stats, now_ns)
    }

    /// Merges the stats of one source (`source`: a worker id, or for a controller relay an
    /// Envoy's) that runs `applied_generation` into the pending delta: the whole batch or, if a
    /// histogram does not decode, nothing.
    pub fn on_stats<'s>(
        &mut self,
        source: u64,
        applied_generation: u64,
        stats: impl IntoIterator<Item = &'s v1::VersionStats>,
        now_ns: u64,
    ) -> Result<(), String> {
        // Validate every histogram before merging anything, so a bad batch never half-applies.
        let mut decoded = Vec::new();
        for stat in stats {
            let latency = match &stat.latency {
                Some(h) => LatencyHistogram::decode(h),
                None => Ok(LatencyHistogram::new()),
            }
            .map_err(|e| {
                self.rejected_batches += 1;
                format!("weir: a worker hand-over has a bad histogram ({e}); dropped")
            })?;
            decoded.push((stat, latency));
        }
        for (stat, latency) in decoded {
            let pending = self
                .pending
                .entry((stat.canary.clone(), stat.version))
                .or_default();
            pending.requests += stat.requests;
            pending.failures += stat.failures;
            pending.latency.merge(&latency);
        }
        self.workers.insert(source, (applied_generation, now_ns));
        self.changed = true;
        Ok(())
    }

    /// The generation every live worker has applied (workers silent for three intervals are
    /// gone: their VM was torn down).
    fn applied_generation(&mut self, now_ns: u64) -> u64 {
        let horizon = self.report_interval_ns.saturating_mul(3);
        self.workers
            .retain(|_, (_, seen)| now_ns.saturating_sub(*seen) <= horizon);
        self.workers
            .values()
            .map(|(generation, _)| *generation)
            .min()
            .unwrap_or(self.generation)
    }

    /// Called every report interval.
    pub fn on_tick(&mut self, now_ns: u64) -> Vec<Command> {
        match self.stream {
            Stream::Down { retry_at_ns } if now_ns >= retry_at_ns => {
                self.stream = Stream::Opening;
                vec![Command::OpenStream]
            }
            Stream::Up { .. } if self.in_flight.len() < MAX_IN_FLIGHT => {
                let report = self.seal(now_ns);
                let bytes = report.encode_to_vec();
                self.in_flight.push_back(report);
                vec![Command::Send(bytes)]
            }
            _ => Vec::new(),
        }
    }

    fn seal(&mut self, now_ns: u64) -> v1::Report {
        self.changed = true;
        let stats = std::mem::take(&mut self.pending)
            .into_iter()
            .map(|((canary, version), p)| v1::VersionStats {
                canary,
                version,
                requests: p.requests,
                failures: p.failures,
                latency: Some(p.latency.encode()),
            })
            .collect();
        let sequence = self.next_sequence;
        self.next_sequence += 1;
        v1::Report {
            reporter: Some(self.identity.clone()),
            epoch: self.epoch,
            sequence,
            applied_generation: self.applied_generation(now_ns),
            stats,
        }
    }

    /// The stream opened: say hello and send again everything not yet acknowledged.
    pub fn on_stream_opened(&mut self, token: u32, now_ns: u64) -> Vec<Command> {
        self.stream = Stream::Up { token };
        let hello = v1::Report {
            reporter: Some(self.identity.clone()),
            epoch: self.epoch,
            sequence: 0,
            applied_generation: self.applied_generation(now_ns),
            stats: Vec::new(),
        };
        std::iter::once(hello.encode_to_vec())
            .chain(self.in_flight.iter().map(Message::encode_to_vec))
            .map(Command::Send)
            .collect()
    }

    /// Opening the stream failed outright; retry after a backoff.
    pub fn on_stream_failed(&mut self, now_ns: u64) {
        self.schedule_retry(now_ns);
    }

    /// The stream closed (server gone, reset, or refused). Unacknowledged reports stay for the
    /// next stream; messages sent on this one are treated as lost.
    pub fn on_stream_closed(&mut self, token: u32, now_ns: u64) {
        if self.stream == (Stream::Up { token }) {
            self.schedule_retry(now_ns);
        }
    }

    fn schedule_retry(&mut self, now_ns: u64) {
        self.stream = Stream::Down {
            retry_at_ns: now_ns.saturating_add(self.backoff.next_delay_ns()),
        };
    }

    /// When the stream is down: the time (ns) of the next attempt to open it.
    pub fn retry_at_ns(&self) -> Option<u64> {
        match self.stream {
            Stream::Down { retry_at_ns } => Some(retry_at_ns),
            _ => None,
        }
    }

    /// A message from the controller.
    pub fn on_message(&mut self, bytes: &[u8], now_ns: u64) -> Result<Vec<Command>, String> {
        let message = v1::ControllerMessage::decode(bytes)
            .map_err(|e| format!("weir: a controller message does not decode ({e}); ignored"))?;
        // Anything well-formed from the controller proves it is alive.
        self.backoff.reset();
        let mut commands = vec![Command::ShareContact(now_ns)];
        match message.kind {
            Some(Kind::Ack(ack)) if ack.epoch == self.epoch => {
                while self
                    .in_flight
                    .front()
                    .is_some_and(|r| r.sequence <= ack.sequence)
                {
                    self.in_flight.pop_front();
                    self.changed = true;
                }
            }
            Some(Kind::Ack(_)) | None => {}
            Some(Kind::Directive(directive)) => {
                self.changed |= self.generation != directive.generation;
                self.generation = directive.generation;
                commands.push(Command::ShareDirective(directive.encode_to_vec()));
            }
        }
        Ok(commands)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: u64 = 1_000_000_000;

    fn reporter() -> Reporter {
        Reporter::new(
            v1::Reporter {
                node_id: "node-1".into(),
                ..Default::default()
            },
            77,
            SECOND,
        )
    }

    fn batch(worker: u64, generation: u64, requests: u64, failures: u64) -> Vec<u8> {
        let mut latency = LatencyHistogram::new();
        (0..requests).for_each(|i| latency.record(1_000 + i));
        v1::Report {
            epoch: worker,
            applied_generation: generation,
            stats: vec![v1::VersionStats {
                canary: "app/mhs".into(),
                version: v1::Version::Canary as i32,
                requests,
                failures,
                latency: Some(latency.encode()),
            }],
            ..Default::default()
        }
        .encode_to_vec()
    }

    fn ack(sequence: u64) -> Vec<u8> {
        v1::ControllerMessage {
            kind: Some(Kind::Ack(v1::Ack {
                epoch: 77,
                sequence,
            })),
        }
        .encode_to_vec()
    }

    fn sent(commands: &[Command]) -> Vec<v1::Report> {
        commands
            .iter()
            .filter_map(|c| match c {
                Command::Send(b) => Some(v1::Report::decode(b.as_slice()).unwrap()),
                _ => None,
            })
            .collect()
    }

    fn connect(r: &mut Reporter, token: u32, now: u64) -> Vec<v1::Report> {
        assert_eq!(r.on_tick(now), vec![Command::OpenStream]);
        sent(&r.on_stream_opened(token, now))
    }

    #[test]
    fn first_tick_opens_the_stream_and_says_hello() {
        let mut r = reporter();
        let hello = connect(&mut r, 1, 0);
        assert_eq!(hello.len(), 1);
        assert_eq!(hello[0].sequence, 0);
        assert_eq!(hello[0].reporter.as_ref().unwrap().node_id, "node-1");
    }

    #[test]
    fn worker_batches_merge_into_one_report_per_tick() {
        let mut r = reporter();
        connect(&mut r, 1, 0);
        r.on_worker_batch(&batch(1, 5, 10, 2), SECOND).unwrap();
        r.on_worker_batch(&batch(2, 5, 5, 1), SECOND).unwrap();
        let reports = sent(&r.on_tick(SECOND));
        assert_eq!(reports.len(), 1);
        let report = &reports[0];
        assert_eq!((report.sequence, report.applied_generation), (1, 5));
        assert_eq!(report.stats.len(), 1);
        assert_eq!(
            (report.stats[0].requests, report.stats[0].failures),
            (15, 3)
        );
        let latency = LatencyHistogram::decode(report.stats[0].latency.as_ref().unwrap()).unwrap();
        assert_eq!(latency.count(), 15);
    }

    #[test]
    fn unacknowledged_reports_are_sent_again_after_a_reconnect_and_acked_ones_are_not() {
        let mut r = reporter();
        connect(&mut r, 1, 0);
        for tick in 1..=3 {
            r.on_worker_batch(&batch(1, 0, tick, 0), tick * SECOND)
                .unwrap();
            r.on_tick(tick * SECOND);
        }
        r.on_message(&ack(1), 3 * SECOND).unwrap();
        assert_eq!(r.in_flight(), 2);
        r.on_stream_closed(1, 4 * SECOND);
        let retry_at = r.retry_at_ns().unwrap();
        assert!((4 * SECOND..4 * SECOND + FIRST_RETRY_RANGE_NS).contains(&retry_at));
        // Samples recorded while down wait in the pending delta.
        r.on_worker_batch(&batch(1, 0, 100, 0), 4 * SECOND).unwrap();
        if retry_at > 4 * SECOND {
            assert!(r.on_tick(4 * SECOND).is_empty(), "retry not yet due");
        }
        let resent = connect(&mut r, 2, retry_at);
        let sequences: Vec<u64> = resent.iter().map(|x| x.sequence).collect();
        assert_eq!(sequences, vec![0, 2, 3]);
        let next = sent(&r.on_tick(6 * SECOND));
        assert_eq!(next[0].sequence, 4);
        assert_eq!(next[0].stats[0].requests, 100);
    }

    #[test]
    fn a_stream_that_never_answers_is_capped_and_samples_are_kept() {
        let mut r = reporter();
        connect(&mut r, 1, 0);
        for tick in 1..=(MAX_IN_FLIGHT as u64 + 10) {
            r.on_worker_batch(&batch(1, 0, 1, 0), tick * SECOND)
                .unwrap();
            r.on_tick(tick * SECOND);
        }
        assert_eq!(r.in_flight(), MAX_IN_FLIGHT);
        r.on_message(&ack(MAX_IN_FLIGHT as u64), 100 * SECOND)
            .unwrap();
        let report = &sent(&r.on_tick(101 * SECOND))[0];
        assert_eq!(
            report.stats[0].requests, 10,
            "samples beyond the cap wait in the pending delta"
        );
    }

    #[test]
    fn directives_and_acks_are_shared_with_workers_as_contact() {
        let mut r = reporter();
        connect(&mut r, 1, 0);
        let directive = v1::ControllerMessage {
            kind: Some(Kind::Directive(v1::Directive {
                generation: 9,
                canaries: vec![],
            })),
        }
        .encode_to_vec();
        let commands = r.on_message(&directive, 5).unwrap();
        assert_eq!(commands[0], Command::ShareContact(5));
        assert!(matches!(commands[1], Command::ShareDirective(_)));
        assert!(r.on_message(&[0xff, 0x01], 6).is_err());
    }

    #[test]
    fn a_reconnect_waits_a_random_time_in_a_range_that_doubles_and_resets_on_contact() {
        let mut r = reporter();
        assert_eq!(r.on_tick(0), vec![Command::OpenStream]);
        let (mut now, mut range) = (0, FIRST_RETRY_RANGE_NS);
        for _ in 0..6 {
            r.on_stream_failed(now);
            let at = r.retry_at_ns().unwrap();
            assert!(
                (now..now + range).contains(&at),
                "{at} not in {now} + {range}"
            );
            if at > now {
                assert!(r.on_tick(at - 1).is_empty());
            }
            assert_eq!(r.on_tick(at), vec![Command::OpenStream]);
            now = at;
            range = (range * 2).min(MAX_RETRY_RANGE_NS);
        }
        assert_eq!(range, MAX_RETRY_RANGE_NS);
        // Contact with the controller starts the next outage at the first range again.
        r.on_stream_opened(1, now);
        r.on_message(&ack(0), now).unwrap();
        r.on_stream_closed(1, now);
        assert!(r.retry_at_ns().unwrap() < now + FIRST_RETRY_RANGE_NS);
    }

    #[test]
    fn envoys_that_lose_the_controller_together_come_back_spread_over_the_first_range() {
        // 10,000 reporters with random epochs (as their VMs draw them), all of whose streams
        // close in the same instant: the controller went away.
        let mut epochs = Rng::new(1);
        let mut tenths = [0usize; 10];
        for _ in 0..10_000 {
            let identity = v1::Reporter {
                node_id: "node".into(),
                ..Default::default()
            };
            let mut r = Reporter::new(identity, epochs.next_u64(), SECOND);
            connect(&mut r, 1, 0);
            r.on_stream_closed(1, 0);
            let at = r.retry_at_ns().unwrap();
            assert!(at < FIRST_RETRY_RANGE_NS);
            tenths[(at * 10 / FIRST_RETRY_RANGE_NS) as usize] += 1;
        }
        // About 1,000 per tenth of the range; a fixed delay would put all 10,000 in one.
        assert!(
            tenths.iter().all(|&n| (850..1150).contains(&n)),
            "{tenths:?}"
        );
    }

    #[test]
    fn applied_generation_is_the_oldest_live_worker_generation() {
        let mut r = reporter();
        connect(&mut r, 1, 0);
        r.on_worker_batch(&batch(1, 4, 1, 0), SECOND).unwrap();
        r.on_worker_batch(&batch(2, 3, 1, 0), SECOND).unwrap();
        assert_eq!(sent(&r.on_tick(SECOND))[0].applied_generation, 3);
        // Worker 2 goes quiet for longer than three intervals: it no longer holds the report back.
        r.on_worker_batch(&batch(1, 4, 1, 0), 5 * SECOND).unwrap();
        assert_eq!(sent(&r.on_tick(5 * SECOND))[0].applied_generation, 4);
    }

    #[test]
    fn a_restored_reporter_continues_the_epoch_sequence_and_unacknowledged_reports() {
        let mut r = reporter();
        connect(&mut r, 1, 0);
        r.on_worker_batch(&batch(1, 3, 10, 1), SECOND).unwrap();
        r.on_tick(SECOND);
        r.on_worker_batch(&batch(1, 3, 4, 0), 2 * SECOND).unwrap();
        assert!(r.changed());
        let snapshot = r.snapshot();
        assert!(!r.changed());
        let identity = v1::Reporter {
            node_id: "node-1".into(),
            ..Default::default()
        };
        let mut next = Reporter::restore(identity, &snapshot, SECOND).unwrap();
        assert_eq!((next.epoch(), next.in_flight()), (77, 1));
        let resent = connect(&mut next, 9, 3 * SECOND);
        assert_eq!(
            resent.iter().map(|x| x.sequence).collect::<Vec<_>>(),
            vec![0, 1]
        );
        let report = &sent(&next.on_tick(4 * SECOND))[0];
        assert_eq!((report.sequence, report.epoch), (2, 77));
        assert_eq!(report.stats[0].requests, 4);
        assert_eq!(report.applied_generation, 3);
        assert!(Reporter::restore(v1::Reporter::default(), &[0xff, 0xff], SECOND).is_err());
    }

    #[test]
    fn a_bad_worker_batch_is_dropped_whole_and_counted() {
        let mut r = reporter();
        connect(&mut r, 1, 0);
        let bad = v1::Report {
            stats: vec![v1::VersionStats {
                canary: "app/mhs".into(),
                version: 2,
                requests: 1,
                failures: 0,
                latency: Some(v1::Histogram { counts: vec![0] }),
            }],
            ..Default::default()
        }
        .encode_to_vec();
        assert!(r.on_worker_batch(&bad, 0).is_err());
        assert_eq!(r.rejected_batches, 1);
        assert!(sent(&r.on_tick(SECOND))[0].stats.is_empty());
    }
}
