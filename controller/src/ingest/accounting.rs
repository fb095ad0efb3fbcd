//! Exact accounting: each `(identity, node_id, epoch, sequence)` is applied at most once, and in
//! order.
//!
//! Reports are deltas that the reporter keeps until acknowledged and resends, in order, after a
//! reconnect. So the only state needed per Envoy is its current epoch and the highest sequence
//! applied in it: anything at or below is a duplicate, the next one is applied, anything beyond is
//! a protocol error (the reporter skipped a report it should still hold).
//!
//! Envoys are keyed by their verified identity as well as their node id, so a reporter can only
//! move the epoch of (take over) a node id of its own identity: another workload that claims a
//! real Envoy's node id gets a ledger entry of its own and changes nothing for that Envoy. The
//! ledger is bounded, in all and per identity, and node ids are bounded in length.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::counters::lock;
use super::identity::PeerIdentity;

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
    /// The node id has moved on to a newer epoch (which is not said: only its own reporter needs
    /// to know it).
    Stale,
    /// `sequence` skips past `last + 1`.
    Gap { last: u64, sequence: u64 },
    /// The ledger holds its maximum of Envoys, in all or for this identity.
    Full { limit: usize, per_identity: bool },
}

/// Bounds of the ledger.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LedgerLimits {
    /// Envoys tracked in all.
    pub(crate) max_nodes: usize,
    /// Envoys tracked for one identity.
    pub(crate) max_nodes_per_identity: usize,
}

#[derive(Debug)]
struct NodeState {
    /// `<identity>#<node id>`: the key, interned.
    node_id: Arc<str>,
    identity: PeerIdentity,
    epoch: u64,
    /// None until the first report of this epoch: after a controller restart (or a forgotten node)
    /// the reporter may resume at any sequence.
    last_applied: Option<u64>,
    retired: VecDeque<u64>,
    last_seen: Instant,
    /// When the last report of this Envoy was applied (None: none yet in this controller life).
    last_applied_at: Option<Instant>,
}

#[derive(Debug, Default)]
struct Ledger {
    nodes: HashMap<Arc<str>, NodeState>,
    per_identity: HashMap<PeerIdentity, usize>,
}

/// The per-Envoy sequence ledger.
#[derive(Debug, Default)]
pub(crate) struct Accounting {
    ledger: Mutex<Ledger>,
}

/// What [`Accounting::admit`] tells the caller besides the admission.
#[derive(Debug, Clone)]
pub(crate) struct Admitted {
    /// The interned `<identity>#<node id>` key, for per-reporter state.
    pub(crate) node: Arc<str>,
    pub(crate) admission: Admission,
    /// When this Envoy's previous report was applied (None: the first in this controller life).
    pub(crate) previous_applied: Option<Instant>,
}

impl Accounting {
    /// Checks `(identity, node_id, epoch, sequence)` and, when it is new, records it as applied.
    pub(crate) fn admit(
        &self,
        identity: &PeerIdentity,
        node_id: &str,
        epoch: u64,
        sequence: u64,
        now: Instant,
        limits: LedgerLimits,
    ) -> Result<Admitted, AdmitError> {
        let key = format!("{identity}#{node_id}");
        let mut ledger = lock(&self.ledger);
        let ledger = &mut *ledger;
        if !ledger.nodes.contains_key(key.as_str()) {
            let of_identity = ledger.per_identity.get(identity).copied().unwrap_or(0);
            if of_identity >= limits.max_nodes_per_identity {
                return Err(AdmitError::Full {
                    limit: limits.max_nodes_per_identity,
                    per_identity: true,
                });
            }
            if ledger.nodes.len() >= limits.max_nodes {
                return Err(AdmitError::Full {
                    limit: limits.max_nodes,
                    per_identity: false,
                });
            }
            let node_id: Arc<str> = Arc::from(key.as_str());
            ledger.nodes.insert(
                node_id.clone(),
                NodeState {
                    node_id,
                    identity: identity.clone(),
                    epoch,
                    last_applied: None,
                    retired: VecDeque::new(),
                    last_seen: now,
                    last_applied_at: None,
                },
            );
            *ledger.per_identity.entry(identity.clone()).or_default() += 1;
        }
        let Some(state) = ledger.nodes.get_mut(key.as_str()) else {
            return Err(AdmitError::Stale);
        };
        if state.epoch != epoch {
            if state.retired.contains(&epoch) {
                return Err(AdmitError::Stale);
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
        let previous_applied = state.last_applied_at;
        let admission = match (sequence, state.last_applied) {
            (0, last) => Admission::Hello {
                ack: last.unwrap_or(0),
            },
            (_, None) => {
                state.last_applied = Some(sequence);
                state.last_applied_at = Some(now);
                Admission::Apply { ack: sequence }
            }
            (_, Some(last)) if sequence <= last => Admission::Duplicate { ack: last },
            (_, Some(last)) if last.checked_add(1) == Some(sequence) => {
                state.last_applied = Some(sequence);
                state.last_applied_at = Some(now);
                Admission::Apply { ack: sequence }
            }
            (_, Some(last)) => return Err(AdmitError::Gap { last, sequence }),
        };
        Ok(Admitted {
            node: state.node_id.clone(),
            admission,
            previous_applied,
        })
    }

    /// Forgets Envoys not heard from since `now - after`. Safe because a reporter drops a report
    /// as soon as it is acknowledged, and it reconnects within seconds, not hours; a forgotten node
    /// that comes back starts a fresh ledger at whatever sequence it sends.
    pub(crate) fn forget_idle(&self, now: Instant, after: Duration) {
        let mut ledger = lock(&self.ledger);
        let ledger = &mut *ledger;
        let per_identity = &mut ledger.per_identity;
        ledger.nodes.retain(|_, state| {
            let keep = now.saturating_duration_since(state.last_seen) < after;
            if !keep {
                if let Some(n) = per_identity.get_mut(&state.identity) {
                    *n = n.saturating_sub(1);
                }
            }
            keep
        });
        per_identity.retain(|_, n| *n > 0);
    }

    /// Number of Envoys in the ledger.
    pub(crate) fn len(&self) -> usize {
        lock(&self.ledger).nodes.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROOMY: LedgerLimits = LedgerLimits {
        max_nodes: 100,
        max_nodes_per_identity: 100,
    };

    fn admit(
        ledger: &Accounting,
        node: &str,
        epoch: u64,
        sequence: u64,
    ) -> Result<Admission, AdmitError> {
        ledger
            .admit(
                &PeerIdentity::Loopback,
                node,
                epoch,
                sequence,
                Instant::now(),
                ROOMY,
            )
            .map(|a| a.admission)
    }

    fn workload(ns: &str) -> PeerIdentity {
        PeerIdentity::Spiffe(super::super::identity::SpiffeId {
            trust_domain: "cluster.local".into(),
            namespace: ns.into(),
            service_account: "default".into(),
        })
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
        assert_eq!(admit(&ledger, "a", 1, 6), Err(AdmitError::Stale));
        assert_eq!(admit(&ledger, "a", 1, 0), Err(AdmitError::Stale));
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
        let id = PeerIdentity::Loopback;
        ledger.admit(&id, "a", 1, 1, t0, ROOMY).unwrap();
        ledger
            .admit(&id, "b", 1, 1, t0 + Duration::from_secs(50), ROOMY)
            .unwrap();
        ledger.forget_idle(t0 + Duration::from_secs(60), Duration::from_secs(30));
        assert_eq!(ledger.len(), 1);
    }

    #[test]
    fn another_identity_claiming_a_node_id_cannot_take_its_epoch_over() {
        let ledger = Accounting::default();
        let now = Instant::now();
        let real = workload("application");
        let intruder = workload("intruder");
        let admit = |id: &PeerIdentity, epoch, seq| {
            ledger
                .admit(
                    id,
                    "sidecar~10.0.0.1~mhs-1.application",
                    epoch,
                    seq,
                    now,
                    ROOMY,
                )
                .map(|a| a.admission)
        };
        assert_eq!(admit(&real, 7, 1), Ok(Admission::Apply { ack: 1 }));
        // The intruder's hello with a fresh epoch is its own ledger entry...
        assert_eq!(admit(&intruder, 99, 0), Ok(Admission::Hello { ack: 0 }));
        // ...and the real Envoy goes on, not stale.
        assert_eq!(admit(&real, 7, 2), Ok(Admission::Apply { ack: 2 }));
        assert_eq!(ledger.len(), 2);
    }

    #[test]
    fn the_ledger_is_bounded_in_all_and_per_identity() {
        let ledger = Accounting::default();
        let now = Instant::now();
        let limits = LedgerLimits {
            max_nodes: 3,
            max_nodes_per_identity: 2,
        };
        let a = workload("a");
        let b = workload("b");
        assert!(ledger.admit(&a, "n1", 1, 0, now, limits).is_ok());
        assert!(ledger.admit(&a, "n2", 1, 0, now, limits).is_ok());
        assert_eq!(
            ledger
                .admit(&a, "n3", 1, 0, now, limits)
                .map(|x| x.admission),
            Err(AdmitError::Full {
                limit: 2,
                per_identity: true
            })
        );
        assert!(ledger.admit(&b, "n1", 1, 0, now, limits).is_ok());
        assert_eq!(
            ledger
                .admit(&b, "n2", 1, 0, now, limits)
                .map(|x| x.admission),
            Err(AdmitError::Full {
                limit: 3,
                per_identity: false
            })
        );
        // Known nodes still report when the ledger is full.
        assert!(ledger.admit(&a, "n1", 1, 1, now, limits).is_ok());
        ledger.forget_idle(now + Duration::from_secs(10), Duration::from_secs(1));
        assert_eq!(ledger.len(), 0);
        assert!(ledger.admit(&a, "n3", 1, 0, now, limits).is_ok());
    }
}
