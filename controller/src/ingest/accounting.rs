//! Exact accounting: each `(node_id, epoch, sequence)` is applied at most once, and in order.
//!
//! Reports are deltas that the reporter keeps until acknowledged and resends, in order, after a
//! reconnect. So the only state needed per Envoy is its current epoch and the highest sequence
//! applied in it: anything at or below is a duplicate, the next one is applied, anything beyond is
//! a protocol error (the reporter skipped a report it should still hold).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::counters::lock;

/// How many replaced epochs are remembered per node id. Enough for Envoy's hot restart (two
/// processes, same node id) and a few quick crash loops; older epochs are simply unknown again.
const RETIRED_EPOCHS: usize = 16;

/// What to do with a report that passed the sequence check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admission {
    /// Sequence 0: nothing to count. `ack` is the highest sequence applied in this epoch (0: none),
    /// so a reconnecting reporter can drop what was applied before its acks were lost.
    Hello { ack: u64 },
    /// A new report, now recorded as applied: the caller must apply (or deliberately drop) it.
    Apply { ack: u64 },
    /// Already applied; acknowledge `ack` (the highest applied) and count nothing.
    Duplicate { ack: u64 },
}

/// Why a report cannot be admitted on this stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AdmitError {
    /// The node id has moved on to `current`.
    Stale { current: u64 },
    /// `sequence` skips past `last + 1`.
    Gap { last: u64, sequence: u64 },
}

#[derive(Debug)]
struct NodeState {
    node_id: Arc<str>,
    epoch: u64,
    /// None until the first report of this epoch: after a controller restart (or a forgotten node)
    /// the reporter may resume at any sequence.
    last_applied: Option<u64>,
    retired: VecDeque<u64>,
    last_seen: Instant,
}

/// The per-Envoy sequence ledger.
#[derive(Debug, Default)]
pub(crate) struct Accounting {
    nodes: Mutex<HashMap<Arc<str>, NodeState>>,
}

impl Accounting {
    /// Checks `(node_id, epoch, sequence)` and, when it is new, records it as applied. Returns the
    /// interned node id so callers can key per-reporter state without allocating.
    pub(crate) fn admit(
        &self,
        node_id: &str,
        epoch: u64,
        sequence: u64,
        now: Instant,
    ) -> Result<(Arc<str>, Admission), AdmitError> {
        let mut nodes = lock(&self.nodes);
        let state = match nodes.get_mut(node_id) {
            Some(state) => state,
            None => {
                let node_id: Arc<str> = Arc::from(node_id);
                nodes.entry(node_id.clone()).or_insert(NodeState {
                    node_id,
                    epoch,
                    last_applied: None,
                    retired: VecDeque::new(),
                    last_seen: now,
                })
            }
        };
        if state.epoch != epoch {
            if state.retired.contains(&epoch) {
                return Err(AdmitError::Stale {
                    current: state.epoch,
                });
            }
            // A new epoch: the Envoy restarted. Its predecessor's reports are stale from now on.
            if state.retired.len() == RETIRED_EPOCHS {
                state.retired.pop_front();
            }
            state.retired.push_back(state.epoch);
            state.epoch = epoch;
            state.last_applied = None;
        }
        state.last_seen = now;
        let admission = match (sequence, state.last_applied) {
            (0, last) => Admission::Hello {
                ack: last.unwrap_or(0),
            },
            (_, None) => {
                state.last_applied = Some(sequence);
                Admission::Apply { ack: sequence }
            }
            (_, Some(last)) if sequence <= last => Admission::Duplicate { ack: last },
            (_, Some(last)) if last.checked_add(1) == Some(sequence) => {
                state.last_applied = Some(sequence);
                Admission::Apply { ack: sequence }
            }
            (_, Some(last)) => return Err(AdmitError::Gap { last, sequence }),
        };
        Ok((state.node_id.clone(), admission))
    }

    /// Forgets Envoys not heard from since `now - after`. Safe because a reporter drops a report
    /// as soon as it is acknowledged, and it reconnects within seconds, not hours; a forgotten node
    /// that comes back starts a fresh ledger at whatever sequence it sends.
    pub(crate) fn forget_idle(&self, now: Instant, after: Duration) {
        lock(&self.nodes).retain(|_, state| now.saturating_duration_since(state.last_seen) < after);
    }

    /// Number of Envoys in the ledger.
    pub(crate) fn len(&self) -> usize {
        lock(&self.nodes).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admit(
        ledger: &Accounting,
        node: &str,
        epoch: u64,
        sequence: u64,
    ) -> Result<Admission, AdmitError> {
        ledger
            .admit(node, epoch, sequence, Instant::now())
            .map(|(_, admission)| admission)
    }

    #[test]
    fn sequences_apply_once_in_order_and_duplicates_ack_the_highest() {
        let ledger = Accounting::default();
        assert_eq!(admit(&ledger, "a", 7, 0), Ok(Admission::Hello { ack: 0 }));
        assert_eq!(admit(&ledger, "a", 7, 1), Ok(Admission::Apply { ack: 1 }));
        assert_eq!(admit(&ledger, "a", 7, 2), Ok(Admission::Apply { ack: 2 }));
        assert_eq!(
            admit(&ledger, "a", 7, 1),
            Ok(Admission::Duplicate { ack: 2 })
        );
        assert_eq!(
            admit(&ledger, "a", 7, 2),
            Ok(Admission::Duplicate { ack: 2 })
        );
        assert_eq!(admit(&ledger, "a", 7, 0), Ok(Admission::Hello { ack: 2 }));
        assert_eq!(admit(&ledger, "a", 7, 3), Ok(Admission::Apply { ack: 3 }));
    }

    #[test]
    fn a_gap_is_refused_and_leaves_the_ledger_unchanged() {
        let ledger = Accounting::default();
        assert_eq!(admit(&ledger, "a", 7, 1), Ok(Admission::Apply { ack: 1 }));
        assert_eq!(
            admit(&ledger, "a", 7, 3),
            Err(AdmitError::Gap {
                last: 1,
                sequence: 3
            })
        );
        assert_eq!(admit(&ledger, "a", 7, 2), Ok(Admission::Apply { ack: 2 }));
        assert_eq!(admit(&ledger, "a", 7, 3), Ok(Admission::Apply { ack: 3 }));
    }

    #[test]
    fn the_first_report_of_an_epoch_may_start_at_any_sequence() {
        // After a controller restart the reporter resumes with its oldest unacknowledged report.
        let ledger = Accounting::default();
        assert_eq!(admit(&ledger, "a", 7, 41), Ok(Admission::Apply { ack: 41 }));
        assert_eq!(admit(&ledger, "a", 7, 42), Ok(Admission::Apply { ack: 42 }));
    }

    #[test]
    fn a_new_epoch_replaces_the_old_one_which_becomes_stale() {
        let ledger = Accounting::default();
        assert_eq!(admit(&ledger, "a", 1, 5), Ok(Admission::Apply { ack: 5 }));
        assert_eq!(admit(&ledger, "a", 2, 0), Ok(Admission::Hello { ack: 0 }));
        assert_eq!(admit(&ledger, "a", 2, 1), Ok(Admission::Apply { ack: 1 }));
        assert_eq!(
            admit(&ledger, "a", 1, 6),
            Err(AdmitError::Stale { current: 2 })
        );
        assert_eq!(
            admit(&ledger, "a", 1, 0),
            Err(AdmitError::Stale { current: 2 })
        );
        // Other nodes are independent.
        assert_eq!(admit(&ledger, "b", 1, 1), Ok(Admission::Apply { ack: 1 }));
    }

    #[test]
    fn the_highest_sequence_has_no_successor() {
        let ledger = Accounting::default();
        assert_eq!(
            admit(&ledger, "a", 1, u64::MAX),
            Ok(Admission::Apply { ack: u64::MAX })
        );
        assert_eq!(
            admit(&ledger, "a", 1, u64::MAX),
            Ok(Admission::Duplicate { ack: u64::MAX })
        );
    }

    #[test]
    fn idle_nodes_are_forgotten() {
        let ledger = Accounting::default();
        let t0 = Instant::now();
        ledger.admit("a", 1, 1, t0).unwrap();
        ledger
            .admit("b", 1, 1, t0 + Duration::from_secs(50))
            .unwrap();
        ledger.forget_idle(t0 + Duration::from_secs(60), Duration::from_secs(30));
        assert_eq!(ledger.len(), 1);
    }
}
