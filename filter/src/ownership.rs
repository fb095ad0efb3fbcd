//! Which of the filter's root contexts owns the Envoy's one stream to the controller.
//!
//! Envoy runs one root context per worker thread plus one on the main thread, all with the same
//! `vm_id` (whatever Istio chose), and a configuration update replaces every one of them. No
//! bootstrap extension is needed: the contexts elect one owner through Envoy's shared data, which
//! lives as long as any VM with that `vm_id` does, across VM replacements.
//!
//! - `weir.owner` holds the owner's id and a heartbeat, renewed on every tick with compare-and-swap.
//!   A context takes over when the record is vacant (the owner released it) or its heartbeat is
//!   older than two report intervals (the owner's VM went away without saying so). A claim is
//!   confirmed on the claimant's next tick, so that two contexts racing to create the record
//!   settle before either opens a stream.
//! - `weir.reporter` holds the owner's [`Reporter`] snapshot, prefixed with the writer's id and a
//!   write count, written with compare-and-swap whenever the reporter changed and before any report
//!   it sealed is sent. A new owner restores it, so the epoch and the sequence numbers continue:
//!   unacknowledged reports are sent again on the new stream, and the controller's ledger drops
//!   whatever the old owner had already delivered. A context that finds its write refused has lost
//!   ownership: it puts the hand-overs it took back on the queue and closes its stream.
//!
//! The worker hand-overs reach the owner through a shared queue (registered by each new owner, so
//! notifications follow it) and are only taken off it at a report tick, right before the state is
//! written, so an owner that vanishes between ticks has nothing in hand that is not in shared data.

use weir_proto::v1;

use crate::reporter::{Command, Reporter};

/// Shared-data key of the owner record.
pub const OWNER_KEY: &str = "weir.owner";
/// Shared-data key of the reporter's state.
pub const STATE_KEY: &str = "weir.reporter";
/// Name of the queue that carries worker hand-overs to the owner.
pub const QUEUE: &str = "weir.reports";
const PREFIX: usize = 16;

/// Envoy's shared data, as the election needs it: values with a version stamp for
/// compare-and-swap. (Envoy's semantics, which the tests' fake copies: every write gets a new
/// stamp; a write with a stamp fails when the key's stamp differs; a write to a missing key always
/// succeeds.)
pub trait SharedData {
    /// The value under `key` and its stamp.
    fn get(&self, key: &str) -> Option<(Vec<u8>, u32)>;
    /// Writes `value` under `key`; with `cas`, only if the key's stamp still equals it.
    fn set(&mut self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), Refused>;
}

/// A shared-data write the host refused (a stamp mismatch, or any other status).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused;

/// The owner record: who owns the stream, and when it last said so.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct OwnerRecord {
    /// 0: vacant.
    owner: u64,
    heartbeat_ns: u64,
}

impl OwnerRecord {
    fn encode(self) -> [u8; 16] {
        let mut bytes = [0; 16];
        bytes[..8].copy_from_slice(&self.owner.to_le_bytes());
        bytes[8..].copy_from_slice(&self.heartbeat_ns.to_le_bytes());
        bytes
    }

    fn decode(bytes: &[u8]) -> Option<Self> {
        let owner = u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?);
        let heartbeat_ns = u64::from_le_bytes(bytes.get(8..16)?.try_into().ok()?);
        Some(Self {
            owner,
            heartbeat_ns,
        })
    }
}

/// What the host glue must do after a call into [`Ownership`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// This context now owns the stream: register the report queue, so notifications reach it.
    RegisterQueue,
    /// Carry out a reporter command (open the stream, send, share a directive or the contact).
    Reporter(Command),
    /// Close this gRPC stream: the context no longer owns it.
    CloseStream(u32),
    /// Put these hand-overs back on the queue, for the next owner.
    Requeue(Vec<Vec<u8>>),
    /// Worth a log line at info level.
    Info(String),
    /// Worth a log line at warning level.
    Warn(String),
}

#[derive(Debug)]
enum Role {
    Follower,
    /// Claimed the record at this tick; confirmed (or not) at the next.
    Candidate,
    Owner {
        reporter: Box<Reporter>,
        /// Stamp of the state this owner wrote last (None before its first write).
        state_cas: Option<u32>,
        writes: u64,
        next_report_ns: u64,
    },
}

/// One root context's part in reporting.
#[derive(Debug)]
pub struct Ownership {
    me: u64,
    identity: v1::Reporter,
    report_interval_ns: u64,
    fresh_epoch: u64,
    role: Role,
}

impl Ownership {
    /// A context that does not own the stream yet. `me` must be random per context (0 is mapped
    /// to 1: it marks a vacant record); `fresh_epoch` is the epoch it uses when it finds no
    /// predecessor's state.
    pub fn new(me: u64, identity: v1::Reporter, report_interval_ns: u64, fresh_epoch: u64) -> Self {
        Self {
            me: me.max(1),
            identity,
            report_interval_ns: report_interval_ns.max(1),
            fresh_epoch,
            role: Role::Follower,
        }
    }

    /// Whether this context owns the stream.
    pub fn is_owner(&self) -> bool {
        matches!(self.role, Role::Owner { .. })
    }

    /// The owner's reporter, for the gRPC callbacks; None unless this context owns the stream.
    pub fn reporter(&mut self) -> Option<&mut Reporter> {
        match &mut self.role {
            Role::Owner { reporter, .. } => Some(reporter),
            _ => None,
        }
    }

    fn takeover_after_ns(&self) -> u64 {
        self.report_interval_ns.saturating_mul(2)
    }

    /// Called on every hand-over tick. `dequeue` takes the next worker hand-over off the queue.
    pub fn tick(
        &mut self,
        shared: &mut impl SharedData,
        now_ns: u64,
        dequeue: &mut dyn FnMut() -> Option<Vec<u8>>,
    ) -> Vec<Action> {
        let (record, cas) = match shared.get(OWNER_KEY) {
            Some((bytes, cas)) => (OwnerRecord::decode(&bytes), Some(cas)),
            None => (None, None),
        };
        let mine = record.is_some_and(|r| r.owner == self.me);
        let beat = OwnerRecord {
            owner: self.me,
            heartbeat_ns: now_ns,
        }
        .encode();
        match self.role {
            Role::Owner { .. } => {
                if !mine || shared.set(OWNER_KEY, &beat, cas).is_err() {
                    return self.step_down(shared, Vec::new(), "another context took over");
                }
                self.report(shared, now_ns, dequeue)
            }
            Role::Candidate if mine => {
                if shared.set(OWNER_KEY, &beat, cas).is_err() {
                    self.role = Role::Follower;
                    return Vec::new();
                }
                let mut actions = self.take_over(shared, now_ns);
                if self.is_owner() {
                    actions.extend(self.report(shared, now_ns, dequeue));
                }
                actions
            }
            Role::Candidate | Role::Follower => {
                self.role = Role::Follower;
                let claimable = match record {
                    // Nobody yet (or a record that is not ours to read): create a vacant one first,
                    // so that the claim below is a compare-and-swap that only one context wins.
                    None => {
                        let vacant = OwnerRecord {
                            owner: 0,
                            heartbeat_ns: 0,
                        }
                        .encode();
                        let _ = shared.set(OWNER_KEY, &vacant, None);
                        shared.get(OWNER_KEY).map(|(_, cas)| cas)
                    }
                    Some(r)
                        if r.owner == 0
                            || r.owner == self.me
                            || now_ns.saturating_sub(r.heartbeat_ns) > self.takeover_after_ns() =>
                    {
                        cas
                    }
                    Some(_) => None,
                };
                if let Some(cas) = claimable {
                    if shared.set(OWNER_KEY, &beat, Some(cas)).is_ok() {
                        self.role = Role::Candidate;
                    }
                }
                Vec::new()
            }
        }
    }

    /// Becomes the owner: restores the predecessor's reporter (or starts a new epoch) and writes
    /// the state at once, so a predecessor still writing finds its next write refused.
    fn take_over(&mut self, shared: &mut impl SharedData, now_ns: u64) -> Vec<Action> {
        let mut actions = vec![Action::RegisterQueue];
        let (reporter, state_cas) = match shared.get(STATE_KEY) {
            Some((bytes, cas)) => {
                let restored = bytes.get(PREFIX..).map(|snapshot| {
                    Reporter::restore(self.identity.clone(), snapshot, self.report_interval_ns)
                });
                match restored {
                    Some(Ok(reporter)) => {
                        actions.push(Action::Info(format!(
                            "weir: this context now owns the stream to the controller; continuing epoch {:016x} with {} unacknowledged report(s)",
                            reporter.epoch(),
                            reporter.in_flight()
                        )));
                        (reporter, Some(cas))
                    }
                    other => {
                        let why = match other {
                            Some(Err(e)) => e,
                            _ => "weir: the reporter state in shared data is truncated".to_string(),
                        };
                        actions.push(Action::Warn(format!("{why}; starting a new epoch")));
                        (self.fresh_reporter(), Some(cas))
                    }
                }
            }
            None => {
                actions.push(Action::Info(format!(
                    "weir: this context owns the stream to the controller (epoch {:016x})",
                    self.fresh_epoch
                )));
                (self.fresh_reporter(), None)
            }
        };
        self.role = Role::Owner {
            reporter: Box::new(reporter),
            state_cas,
            writes: 0,
            next_report_ns: now_ns,
        };
        if self.persist(shared).is_err() {
            actions.extend(self.step_down(
                shared,
                Vec::new(),
                "the previous owner wrote its state during the takeover",
            ));
        }
        actions
    }

    fn fresh_reporter(&self) -> Reporter {
        Reporter::new(
            self.identity.clone(),
            self.fresh_epoch,
            self.report_interval_ns,
        )
    }

    /// The owner's work on a tick: at a report tick, take the hand-overs, let the reporter seal and
    /// send, writing the state before anything it sealed leaves; otherwise write the state only if
    /// an acknowledgement or directive changed it.
    fn report(
        &mut self,
        shared: &mut impl SharedData,
        now_ns: u64,
        dequeue: &mut dyn FnMut() -> Option<Vec<u8>>,
    ) -> Vec<Action> {
        let interval = self.report_interval_ns;
        let Role::Owner {
            reporter,
            next_report_ns,
            ..
        } = &mut self.role
        else {
            return Vec::new();
        };
        let mut actions = Vec::new();
        let mut taken = Vec::new();
        let mut commands = Vec::new();
        if now_ns >= *next_report_ns {
            *next_report_ns = now_ns.saturating_add(interval);
            while let Some(batch) = dequeue() {
                if let Err(e) = reporter.on_worker_batch(&batch, now_ns) {
                    actions.push(Action::Warn(e));
                }
                taken.push(batch);
            }
            commands = reporter.on_tick(now_ns);
        }
        if reporter.changed() && self.persist(shared).is_err() {
            actions.extend(self.step_down(shared, taken, "its state was overwritten"));
            return actions;
        }
        actions.extend(commands.into_iter().map(Action::Reporter));
        actions
    }

    /// Writes the reporter's state, prefixed with (me, write count), and learns its new stamp.
    fn persist(&mut self, shared: &mut impl SharedData) -> Result<(), Refused> {
        let me = self.me;
        let Role::Owner {
            reporter,
            state_cas,
            writes,
            ..
        } = &mut self.role
        else {
            return Err(Refused);
        };
        let write = *writes + 1;
        let mut value = Vec::with_capacity(256);
        value.extend_from_slice(&me.to_le_bytes());
        value.extend_from_slice(&write.to_le_bytes());
        value.extend_from_slice(&reporter.snapshot());
        shared.set(STATE_KEY, &value, *state_cas)?;
        // Envoy's set does not return the new stamp; read it back, and make sure the value read
        // is the one written (anyone writing in between has taken over).
        match shared.get(STATE_KEY) {
            Some((bytes, cas)) if bytes.get(..PREFIX) == value.get(..PREFIX) => {
                *state_cas = Some(cas);
                *writes = write;
                Ok(())
            }
            _ => Err(Refused),
        }
    }

    /// Gives up ownership: the taken hand-overs go back on the queue, the stream is closed, and a
    /// record that still names this context is vacated.
    fn step_down(
        &mut self,
        shared: &mut impl SharedData,
        taken: Vec<Vec<u8>>,
        why: &str,
    ) -> Vec<Action> {
        let mut actions = Vec::new();
        if let Role::Owner { reporter, .. } = &self.role {
            if let Some(token) = reporter.stream_token() {
                actions.push(Action::CloseStream(token));
            }
            actions.push(Action::Info(format!(
                "weir: this context no longer owns the stream to the controller ({why})"
            )));
        }
        if !taken.is_empty() {
            actions.push(Action::Requeue(taken));
        }
        self.role = Role::Follower;
        self.vacate(shared);
        actions
    }

    fn vacate(&self, shared: &mut impl SharedData) {
        if let Some((bytes, cas)) = shared.get(OWNER_KEY) {
            if OwnerRecord::decode(&bytes).is_some_and(|r| r.owner == self.me) {
                let vacant = OwnerRecord {
                    owner: 0,
                    heartbeat_ns: 0,
                };
                let _ = shared.set(OWNER_KEY, &vacant.encode(), Some(cas));
            }
        }
    }

    /// The context is going away (its VM shuts down, e.g. for a new filter configuration): take
    /// the last hand-overs, write the state, and vacate the record so that a successor takes over
    /// on its next tick instead of waiting for the heartbeat to age.
    pub fn release(
        &mut self,
        shared: &mut impl SharedData,
        now_ns: u64,
        dequeue: &mut dyn FnMut() -> Option<Vec<u8>>,
    ) -> Vec<Action> {
        let Role::Owner { reporter, .. } = &mut self.role else {
            self.role = Role::Follower;
            return Vec::new();
        };
        let mut actions = Vec::new();
        let mut taken = Vec::new();
        while let Some(batch) = dequeue() {
            if let Err(e) = reporter.on_worker_batch(&batch, now_ns) {
                actions.push(Action::Warn(e));
            }
            taken.push(batch);
        }
        if self.persist(shared).is_ok() {
            taken.clear();
        }
        actions.extend(self.step_down(shared, taken, "its VM is shutting down"));
        actions
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{HashMap, VecDeque};

    use prost::Message;
    use weir_proto::v1::controller_message::Kind;
    use weir_proto::LatencyHistogram;

    use super::*;

    const SECOND: u64 = 1_000_000_000;
    const TICK: u64 = SECOND / 4;

    /// Envoy's shared data and one queue, with proxy-wasm-cpp-host's semantics.
    #[derive(Default)]
    struct Host {
        data: HashMap<String, (Vec<u8>, u32)>,
        next_cas: u32,
        queue: VecDeque<Vec<u8>>,
    }

    impl SharedData for Host {
        fn get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
            self.data.get(key).cloned()
        }
        fn set(&mut self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), Refused> {
            if let (Some((_, stamp)), Some(cas)) = (self.data.get(key), cas) {
                if *stamp != cas {
                    return Err(Refused);
                }
            }
            self.next_cas += 1;
            self.data
                .insert(key.to_string(), (value.to_vec(), self.next_cas));
            Ok(())
        }
    }

    /// A root context with its stream, as the host glue runs it.
    struct Context {
        ownership: Ownership,
        stream: Option<u32>,
        sent: Vec<v1::Report>,
    }

    impl Context {
        fn new(me: u64, epoch: u64) -> Self {
            let identity = v1::Reporter {
                node_id: "node-1".into(),
                ..Default::default()
            };
            Self {
                ownership: Ownership::new(me, identity, SECOND, epoch),
                stream: None,
                sent: Vec::new(),
            }
        }

        fn tick(&mut self, host: &mut Host, now: u64) {
            let mut queue = std::mem::take(&mut host.queue);
            let actions = self.ownership.tick(host, now, &mut || queue.pop_front());
            host.queue.extend(queue);
            self.perform(host, actions, now);
        }

        fn release(&mut self, host: &mut Host, now: u64) {
            let mut queue = std::mem::take(&mut host.queue);
            let actions = self.ownership.release(host, now, &mut || queue.pop_front());
            host.queue.extend(queue);
            self.perform(host, actions, now);
        }

        fn perform(&mut self, host: &mut Host, actions: Vec<Action>, now: u64) {
            let mut pending: VecDeque<Action> = actions.into();
            while let Some(action) = pending.pop_front() {
                match action {
                    Action::Reporter(Command::OpenStream) => {
                        let token = 7;
                        self.stream = Some(token);
                        let commands = self
                            .ownership
                            .reporter()
                            .unwrap()
                            .on_stream_opened(token, now);
                        pending.extend(commands.into_iter().map(Action::Reporter));
                    }
                    Action::Reporter(Command::Send(bytes)) => {
                        self.sent
                            .push(v1::Report::decode(bytes.as_slice()).unwrap());
                    }
                    Action::Reporter(_) | Action::RegisterQueue => {}
                    Action::CloseStream(token) => {
                        assert_eq!(self.stream, Some(token));
                        self.stream = None;
                    }
                    Action::Requeue(batches) => host.queue.extend(batches),
                    Action::Info(_) | Action::Warn(_) => {}
                }
            }
        }

        fn ack_all(&mut self, now: u64) {
            let Some(last) = self
                .sent
                .iter()
                .map(|r| (r.epoch, r.sequence))
                .max_by_key(|x| x.1)
            else {
                return;
            };
            let ack = v1::ControllerMessage {
                kind: Some(Kind::Ack(v1::Ack {
                    epoch: last.0,
                    sequence: last.1,
                })),
            }
            .encode_to_vec();
            self.ownership
                .reporter()
                .unwrap()
                .on_message(&ack, now)
                .unwrap();
        }
    }

    fn hand_over(host: &mut Host, worker: u64, requests: u64) {
        let mut latency = LatencyHistogram::new();
        (0..requests).for_each(|_| latency.record(1_000));
        host.queue.push_back(
            v1::Report {
                epoch: worker,
                stats: vec![v1::VersionStats {
                    canary: "app/mhs".into(),
                    version: v1::Version::Canary as i32,
                    requests,
                    failures: 0,
                    latency: Some(latency.encode()),
                }],
                ..Default::default()
            }
            .encode_to_vec(),
        );
    }

    /// What a controller's ledger would count: each (epoch, sequence) once.
    fn counted(contexts: &[&Context]) -> u64 {
        let mut seen = std::collections::HashSet::new();
        contexts
            .iter()
            .flat_map(|c| c.sent.iter())
            .filter(|r| r.sequence > 0 && seen.insert((r.epoch, r.sequence)))
            .flat_map(|r| r.stats.iter())
            .map(|s| s.requests)
            .sum()
    }

    fn owners(contexts: &[&Context]) -> usize {
        contexts.iter().filter(|c| c.ownership.is_owner()).count()
    }

    #[test]
    fn of_five_contexts_starting_together_exactly_one_owns_the_stream() {
        let mut host = Host::default();
        let mut contexts: Vec<Context> = (1..=5).map(|i| Context::new(i * 11, i)).collect();
        for tick in 0..4 {
            for c in &mut contexts {
                c.tick(&mut host, tick * TICK);
            }
        }
        let all: Vec<&Context> = contexts.iter().collect();
        assert_eq!(owners(&all), 1);
        assert_eq!(contexts.iter().filter(|c| c.stream.is_some()).count(), 1);
        let owner = contexts.iter().find(|c| c.ownership.is_owner()).unwrap();
        assert_eq!(owner.sent[0].sequence, 0, "the owner said hello");
    }

    #[test]
    fn a_race_to_create_the_record_settles_before_anyone_opens_a_stream() {
        let mut host = Host::default();
        let mut a = Context::new(1, 100);
        let mut b = Context::new(2, 200);
        // Both read "no record"; a creates the vacant record and claims it; then b, which read
        // before a wrote, overwrites it with its own vacant record and claims that.
        a.tick(&mut host, 0);
        host.data.remove(OWNER_KEY);
        b.tick(&mut host, 0);
        assert!(!a.ownership.is_owner() && !b.ownership.is_owner());
        a.tick(&mut host, TICK);
        b.tick(&mut host, TICK);
        assert!(!a.ownership.is_owner(), "a's claim was overwritten");
        assert!(b.ownership.is_owner());
        assert!(a.stream.is_none());
    }

    #[test]
    fn a_released_stream_is_taken_over_at_the_next_tick_with_the_same_epoch_and_no_loss() {
        let mut host = Host::default();
        let mut old = Context::new(1, 0xaaaa);
        let mut new = Context::new(2, 0xbbbb);
        old.tick(&mut host, 0);
        old.tick(&mut host, TICK);
        new.tick(&mut host, TICK);
        assert!(old.ownership.is_owner() && !new.ownership.is_owner());
        let mut sent = 0;
        let mut now = TICK;
        for round in 0..8 {
            now += TICK;
            hand_over(&mut host, 9, 10 + round);
            sent += 10 + round;
            old.tick(&mut host, now);
            new.tick(&mut host, now);
        }
        old.ack_all(now);
        // Acknowledged or not, samples handed over after the last report tick are in the queue.
        hand_over(&mut host, 9, 5);
        sent += 5;
        old.release(&mut host, now);
        assert!(!old.ownership.is_owner() && old.stream.is_none());
        now += TICK;
        new.tick(&mut host, now);
        new.tick(&mut host, now + TICK);
        assert!(new.ownership.is_owner());
        for _ in 0..8 {
            now += TICK;
            new.tick(&mut host, now);
        }
        let epochs: std::collections::HashSet<u64> =
            old.sent.iter().chain(&new.sent).map(|r| r.epoch).collect();
        assert_eq!(epochs.into_iter().collect::<Vec<_>>(), vec![0xaaaa]);
        assert_eq!(counted(&[&old, &new]), sent);
    }

    #[test]
    fn an_owner_that_vanishes_is_replaced_after_two_report_intervals_and_nothing_is_lost() {
        let mut host = Host::default();
        let mut old = Context::new(1, 0xaaaa);
        let mut new = Context::new(2, 0xbbbb);
        old.tick(&mut host, 0);
        old.tick(&mut host, TICK);
        let mut sent = 0;
        let mut now = TICK;
        for _ in 0..6 {
            now += TICK;
            hand_over(&mut host, 9, 3);
            sent += 3;
            old.tick(&mut host, now);
            new.tick(&mut host, now);
        }
        // No acknowledgement ever came; then the old owner's VM is gone without a word.
        let vanished = now;
        hand_over(&mut host, 9, 4);
        sent += 4;
        while !new.ownership.is_owner() {
            now += TICK;
            new.tick(&mut host, now);
            assert!(now - vanished <= 2 * SECOND + 2 * TICK, "no takeover");
        }
        assert!(now - vanished > 2 * SECOND, "took over a live owner");
        for _ in 0..8 {
            now += TICK;
            new.tick(&mut host, now);
        }
        assert_eq!(counted(&[&old, &new]), sent);
        assert!(new.sent.iter().all(|r| r.epoch == 0xaaaa));
    }

    #[test]
    fn a_stalled_owner_that_wakes_up_after_a_takeover_steps_down_and_returns_what_it_took() {
        let mut host = Host::default();
        let mut old = Context::new(1, 0xaaaa);
        let mut new = Context::new(2, 0xbbbb);
        old.tick(&mut host, 0);
        old.tick(&mut host, TICK);
        let mut now = TICK;
        let mut sent = 0;
        hand_over(&mut host, 9, 6);
        sent += 6;
        now += TICK;
        old.tick(&mut host, now);
        // old stalls for three seconds; new takes over.
        for _ in 0..14 {
            now += TICK;
            new.tick(&mut host, now);
        }
        assert!(new.ownership.is_owner());
        hand_over(&mut host, 9, 8);
        sent += 8;
        // old wakes up: its first act is a renewal that fails; it must not send anything.
        let before = old.sent.len();
        old.tick(&mut host, now);
        assert!(!old.ownership.is_owner());
        assert!(old.stream.is_none());
        assert_eq!(old.sent.len(), before);
        for _ in 0..6 {
            now += TICK;
            new.tick(&mut host, now);
            old.tick(&mut host, now);
        }
        assert_eq!(counted(&[&old, &new]), sent);
        assert!(!old.ownership.is_owner());
    }

    #[test]
    fn an_owner_whose_state_was_overwritten_requeues_what_it_took_and_sends_nothing() {
        let mut host = Host::default();
        let mut a = Context::new(1, 0xaaaa);
        a.tick(&mut host, 0);
        a.tick(&mut host, TICK);
        assert!(a.ownership.is_owner());
        let before = a.sent.len();
        // Someone else wrote the state (a takeover a did not see yet).
        host.set(STATE_KEY, &[0; 16], None).unwrap();
        hand_over(&mut host, 9, 3);
        a.tick(&mut host, 2 * SECOND);
        assert!(!a.ownership.is_owner());
        assert_eq!(a.sent.len(), before);
        assert_eq!(host.queue.len(), 1, "the hand-over is back on the queue");
    }

    #[test]
    fn a_corrupt_state_starts_a_new_epoch_instead_of_failing() {
        let mut host = Host::default();
        host.set(STATE_KEY, b"0123456789abcdef\xff\xff\xff", None)
            .unwrap();
        let mut a = Context::new(1, 0xcccc);
        a.tick(&mut host, 0);
        a.tick(&mut host, TICK);
        assert!(a.ownership.is_owner());
        assert_eq!(a.sent[0].epoch, 0xcccc);
    }
}
