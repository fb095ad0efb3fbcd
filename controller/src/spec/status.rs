//! The persisted state of a rollout: Flagger's `CanaryStatus` field names, plus Weir's own
//! bookkeeping (decision history, inconclusive count, retry and timing records).
//!
//! The same JSON goes to the local state file and, later, to the Canary's status subresource.
//! Times are RFC 3339 strings in UTC (see [`Timestamp`]). Unknown keys are ignored when reading,
//! so a status written by Flagger loads.

use super::time::Timestamp;
use super::weight::Weight;
use crate::analysis::{CheckResult, Event};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;

/// How many decisions [`CanaryStatus::decisions`] keeps (the oldest are dropped first).
pub const DECISION_HISTORY_LEN: usize = 20;

/// Where a canary is in its life, with Flagger's names and meanings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Phase {
    /// The Canary was just seen: the primary is being created from the target.
    Initializing,
    /// The primary serves all traffic and the target is scaled to zero; waiting for a new revision.
    Initialized,
    /// A new revision is waiting for a `confirm-rollout` webhook to approve it.
    Waiting,
    /// A new revision is being analysed while traffic shifts to it.
    Progressing,
    /// Analysis is done; waiting for a `confirm-promotion` webhook to approve promotion.
    WaitingPromotion,
    /// The target's template has been copied to the primary; traffic is moving back to primary.
    Promoting,
    /// All traffic is on the (updated) primary; the canary is about to be scaled down.
    Finalising,
    /// The last revision was promoted; the canary is scaled to zero.
    Succeeded,
    /// The last revision failed analysis and was rolled back; the canary is scaled to zero.
    Failed,
    /// The Canary is being deleted and its changes are being reverted.
    Terminating,
    /// The Canary's deletion is finished; nothing is left to do.
    Terminated,
}

impl Phase {
    /// Every phase, in Flagger's order.
    pub const ALL: [Phase; 11] = [
        Phase::Initializing,
        Phase::Initialized,
        Phase::Waiting,
        Phase::Progressing,
        Phase::WaitingPromotion,
        Phase::Promoting,
        Phase::Finalising,
        Phase::Succeeded,
        Phase::Failed,
        Phase::Terminating,
        Phase::Terminated,
    ];

    /// Flagger's spelling, like `WaitingPromotion`.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Initializing => "Initializing",
            Phase::Initialized => "Initialized",
            Phase::Waiting => "Waiting",
            Phase::Progressing => "Progressing",
            Phase::WaitingPromotion => "WaitingPromotion",
            Phase::Promoting => "Promoting",
            Phase::Finalising => "Finalising",
            Phase::Succeeded => "Succeeded",
            Phase::Failed => "Failed",
            Phase::Terminating => "Terminating",
            Phase::Terminated => "Terminated",
        }
    }

    /// Parses Flagger's spelling.
    pub fn parse(s: &str) -> Option<Phase> {
        Phase::ALL.into_iter().find(|p| p.as_str() == s)
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for Phase {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Phase {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Phase::parse(&s).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "unknown phase `{s}`, expected one of {}",
                Phase::ALL.map(Phase::as_str).join(", ")
            ))
        })
    }
}

impl schemars::JsonSchema for Phase {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Phase".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "enum": Phase::ALL.map(Phase::as_str),
        })
    }
}

/// The CRD schema of a decision's events and check results: objects kept whole. The analysis
/// module owns their shape; the API server must not prune a field it adds later.
fn records_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "array",
        "items": {"type": "object", "x-kubernetes-preserve-unknown-fields": true},
    })
}

/// Flagger writes `phase: ""` before the first step; read it as no phase.
fn phase_or_empty<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Phase>, D::Error> {
    match Option::<String>::deserialize(d)? {
        None => Ok(None),
        Some(s) if s.is_empty() => Ok(None),
        Some(s) => Phase::parse(&s).map(Some).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "unknown phase `{s}`, expected one of {}",
                Phase::ALL.map(Phase::as_str).join(", ")
            ))
        }),
    }
}

/// The persisted state of one Canary's rollout.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CanaryStatus {
    /// Current phase; `None` before the Canary was first seen.
    #[serde(
        default,
        deserialize_with = "phase_or_empty",
        skip_serializing_if = "Option::is_none"
    )]
    pub phase: Option<Phase>,
    /// Failed checks in the current analysis (cumulative; reset when a new analysis starts).
    #[serde(default)]
    pub failed_checks: u32,
    /// Share of traffic the canary is meant to get right now.
    #[serde(default)]
    pub canary_weight: Weight,
    /// Iterations done (A/B testing, blue/green).
    #[serde(default)]
    pub iterations: u32,
    /// Revision (template hash) of the target that the current or last analysis is about.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_applied_spec: Option<String>,
    /// Revision last copied to the primary.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_promoted_spec: Option<String>,
    /// When phase, weight, failed checks or iterations last changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<Timestamp>,
    /// Kubernetes-style conditions; Weir keeps Flagger's single `Promoted` condition.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Weir: Inconclusive analysis steps in the current analysis.
    #[serde(default)]
    pub inconclusive_checks: u32,
    /// Weir: when the engine last acted; the next step is due one interval later.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_step_time: Option<Timestamp>,
    /// Weir: since when the canary (or, while terminating, the target) has been seen not ready;
    /// measured against the progress deadline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_ready_since: Option<Timestamp>,
    /// Weir: since when the canary's traffic has been routed as it is now (set when an analysis
    /// starts or is retried, and at every route change). Checks count only requests served
    /// since then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routed_since: Option<Timestamp>,
    /// Weir: since when the primary has been seen not ready (or since the promotion that
    /// started its rollout); measured against the progress deadline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub primary_not_ready_since: Option<Timestamp>,
    /// Weir: retry bookkeeping.
    #[serde(default, skip_serializing_if = "RetryState::is_empty")]
    pub retry: RetryState,
    /// Weir: the token of the last operator request seen (`weir promote`, `abort`, `pause`,
    /// `resume`), acted on or ignored; the same request is never handled twice.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_request: Option<String>,
    /// Weir: set while the analysis is paused (by an operator, or by `inconclusiveLimit`): the
    /// weight holds, the checks go on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused: Option<Pause>,
    /// Weir: Inconclusive analysis steps in a row (a step with any other outcome ends the run),
    /// measured against `inconclusiveLimit`.
    #[serde(default)]
    pub consecutive_inconclusive: u32,
    /// Weir: the last [`DECISION_HISTORY_LEN`] decisions, oldest first, each with its numbers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub decisions: Vec<Decision>,
}

impl CanaryStatus {
    /// The status of a Canary never seen before.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a decision, dropping the oldest beyond [`DECISION_HISTORY_LEN`].
    pub fn record(&mut self, decision: Decision) {
        self.decisions.push(decision);
        if self.decisions.len() > DECISION_HISTORY_LEN {
            let excess = self.decisions.len() - DECISION_HISTORY_LEN;
            self.decisions.drain(..excess);
        }
    }

    /// Whether the analysis is paused (see [`CanaryStatus::paused`]).
    pub fn is_paused(&self) -> bool {
        self.paused.is_some()
    }

    /// The `Promoted` condition, if set.
    pub fn promoted_condition(&self) -> Option<&Condition> {
        self.conditions.iter().find(|c| c.kind == "Promoted")
    }
}

/// Why and since when an analysis is paused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Pause {
    /// When it paused.
    pub since: Timestamp,
    /// What paused it.
    pub cause: PauseCause,
    /// Who asked (the CLI's user, or the annotation's field manager); `inconclusiveLimit` when
    /// the limit paused it.
    pub by: String,
}

/// What paused an analysis.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub enum PauseCause {
    /// An operator ran `weir pause`.
    Requested,
    /// `inconclusiveLimit` Inconclusive steps in a row: nobody can tell whether the canary is
    /// good, so an operator has to decide.
    InconclusiveLimit,
}

/// Which retry requests were already honoured, so the same request never triggers twice.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RetryState {
    /// The last retry token seen (honoured or ignored).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_token: Option<String>,
    /// How many retries were honoured for the current revision.
    #[serde(default)]
    pub count: u32,
}

impl RetryState {
    fn is_empty(&self) -> bool {
        self.last_token.is_none() && self.count == 0
    }
}

/// A Kubernetes-style status condition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// Condition type; Weir sets `Promoted`, like Flagger.
    #[serde(rename = "type")]
    pub kind: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    /// When the condition was last written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_update_time: Option<Timestamp>,
    /// When `status` last changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<Timestamp>,
    /// The phase that set it.
    pub reason: String,
    /// Flagger's human-readable explanation.
    #[serde(default)]
    pub message: String,
}

/// One decision of the engine, with the numbers it used.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Decision {
    /// When it was made.
    pub time: Timestamp,
    /// Phase after the decision.
    pub phase: Phase,
    /// Canary weight after the decision.
    pub canary_weight: Weight,
    /// Failed checks after the decision.
    pub failed_checks: u32,
    /// Iterations after the decision.
    #[serde(default)]
    pub iterations: u32,
    /// The events it emitted, in order.
    #[schemars(schema_with = "records_schema")]
    pub events: Vec<Event>,
    /// The check results it was based on (empty when no checks ran).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "records_schema")]
    pub checks: Vec<CheckResult>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_use_flaggers_spelling() {
        for p in Phase::ALL {
            let json = serde_json::to_string(&p).unwrap();
            assert_eq!(json, format!("\"{}\"", p.as_str()));
            assert_eq!(serde_json::from_str::<Phase>(&json).unwrap(), p);
        }
        assert!(serde_json::from_str::<Phase>("\"Finalizing\"").is_err());
    }

    #[test]
    fn a_flagger_status_with_an_empty_phase_reads_as_not_started() {
        let s: CanaryStatus = serde_json::from_str(
            r#"{"phase":"","failedChecks":0,"canaryWeight":0,"iterations":0,"trackedConfigs":{}}"#,
        )
        .unwrap();
        assert_eq!(s, CanaryStatus::new());
    }

    #[test]
    fn a_flagger_status_reads_with_its_field_names() {
        let s: CanaryStatus = serde_json::from_str(
            r#"{"phase":"Progressing","failedChecks":2,"canaryWeight":30,"iterations":0,
                "lastAppliedSpec":"5d8f7b","lastPromotedSpec":"7c9b6d",
                "lastTransitionTime":"2024-05-01T10:00:00Z",
                "conditions":[{"type":"Promoted","status":"Unknown","reason":"Progressing",
                  "message":"New revision detected, progressing canary analysis.",
                  "lastUpdateTime":"2024-05-01T10:00:00Z","lastTransitionTime":"2024-05-01T09:59:00Z"}]}"#,
        )
        .unwrap();
        assert_eq!(s.phase, Some(Phase::Progressing));
        assert_eq!(s.canary_weight.percent(), 30);
        assert_eq!(s.failed_checks, 2);
        assert_eq!(s.last_applied_spec.as_deref(), Some("5d8f7b"));
        assert_eq!(s.promoted_condition().unwrap().reason, "Progressing");
    }

    #[test]
    fn a_status_with_an_impossible_weight_does_not_load() {
        let err = serde_json::from_str::<CanaryStatus>(r#"{"canaryWeight":140}"#).unwrap_err();
        assert!(err.to_string().contains("between 0 and 100"), "{err}");
    }

    #[test]
    fn the_decision_history_keeps_only_the_newest_entries() {
        let mut s = CanaryStatus::new();
        for i in 0..(DECISION_HISTORY_LEN as u64 + 5) {
            s.record(Decision {
                time: Timestamp::from_unix_millis(i),
                phase: Phase::Progressing,
                canary_weight: Weight::ZERO,
                failed_checks: 0,
                iterations: 0,
                events: vec![],
                checks: vec![],
            });
        }
        assert_eq!(s.decisions.len(), DECISION_HISTORY_LEN);
        assert_eq!(s.decisions[0].time, Timestamp::from_unix_millis(5));
    }
}
