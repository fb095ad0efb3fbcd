//! What a step asks the executor to do.

use crate::spec::{AlertSeverity, CanaryStatus, MetricCheck, Phase, Timestamp, Webhook, Weight};
use serde::{Deserialize, Serialize};

/// The result of calling [`step`](super::step).
// A step's status is the big variant: it is returned once per step and moved straight on, never
// stored in bulk, so boxing it would only add an allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The step needs inputs it does not have yet: gather them into the observations and call
    /// `step` again with the same status and `now`.
    Need(Need),
    /// The step is decided.
    Done(Step),
}

/// Inputs a step needs before it can decide.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Need {
    /// Measure each of these over its `window`, ending now, and put the results in
    /// `Observations::measurements`. The windows are already cut to what the current step
    /// served (at most the time since the weight last changed or the analysis restarted).
    pub metrics: Vec<MetricCheck>,
    /// Call each of these and put the results in `Observations::webhooks` under the hook's name.
    pub webhooks: Vec<WebhookCall>,
    /// The comparative judge's evidence: both versions' completed window buckets since this
    /// time, absorbed into an [`Evidence`](super::Evidence), in `Observations::judge`.
    pub judge: Option<Timestamp>,
}

/// A webhook to call, with the phase to report in its payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookCall {
    /// The hook.
    pub webhook: Webhook,
    /// The phase for the payload (`phase` in Flagger's `CanaryWebhookPayload`).
    pub phase: Phase,
}

/// A decided step: the new status and the effects to perform.
///
/// Perform the effects in order, then persist the status. If the process dies in between, the
/// next step starts from the old status and asks for the same effects again, so every effect
/// must be idempotent (they are all "make it so" actions).
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    /// The status to persist.
    pub status: CanaryStatus,
    /// What to do, in order.
    pub effects: Vec<Effect>,
}

impl Step {
    /// The events among the effects, in order.
    pub fn events(&self) -> impl Iterator<Item = &Event> {
        self.effects.iter().filter_map(|e| match e {
            Effect::Event(ev) => Some(ev),
            _ => None,
        })
    }
}

/// One action for the executor.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Create the primary workload from the target's template at `revision` (first sighting),
    /// or update it if the target changed while initializing.
    InitializePrimary {
        /// The revision to copy.
        revision: String,
    },
    /// Copy the target's template at `revision` to the primary (promotion). If the target's
    /// template no longer has this revision, do nothing: the next step sees the new revision.
    PromotePrimary {
        /// The analysed revision.
        revision: String,
    },
    /// Scale the target (canary) workload up to its desired replicas, or down to zero.
    ScaleCanary(Scale),
    /// Change how traffic is split between primary and canary (push a new directive).
    Route(Route),
    /// Stop routing this canary (deletion with `revertOnDeletion`): remove it from directives and
    /// restore the target as the only backend.
    RevertRouting,
    /// Call a webhook without waiting for the engine to use its result (`post-rollout`); record
    /// its outcome as an event.
    CallWebhook(WebhookCall),
    /// Record an event (a Kubernetes Event, a log line locally).
    Event(Event),
    /// Send an alert to the Canary's alert providers whose severity it reaches (Flagger's
    /// `alert`); delivered in the background, its outcome changes nothing.
    Alert(Alert),
}

/// An alert, in Flagger's words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Alert {
    /// How serious it is.
    pub severity: AlertSeverity,
    /// The message.
    pub message: String,
    /// Whether the Canary's details go with it (target, failed checks threshold, progress
    /// deadline, traffic routing), as Flagger sends them with the new-revision alerts.
    pub details: bool,
}

/// Direction of a canary scale.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scale {
    /// To the target's desired replicas.
    Up,
    /// To zero.
    Down,
}

/// How traffic is split, as the directive for this canary should say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// All traffic to the primary.
    Primary,
    /// This share to the canary, the rest to the primary (100 = all to the canary).
    Weighted(Weight),
    /// A/B testing: requests matching the plan's `match` groups to the canary, others to primary.
    Matches,
}

impl Route {
    /// A weighted split, with 0 written as [`Route::Primary`].
    pub fn weighted(w: Weight) -> Route {
        if w == Weight::ZERO {
            Route::Primary
        } else {
            Route::Weighted(w)
        }
    }

    /// The canary's share in basis points for `CanaryRoute.canary_weight_bp` (0 for
    /// [`Route::Matches`], where the weight is unused).
    pub fn canary_weight_bp(self) -> u32 {
        match self {
            Route::Weighted(w) => w.basis_points(),
            Route::Primary | Route::Matches => 0,
        }
    }
}

/// Kubernetes event type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Severity {
    /// Progress.
    Normal,
    /// A halt, a failure or a rollback.
    Warning,
}

/// A recorded event: Flagger's message texts, with the numbers behind each decision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Event {
    /// Normal or Warning.
    #[serde(rename = "type")]
    pub severity: Severity,
    /// A short CamelCase reason, like `Advance` or `Rollback`.
    pub reason: String,
    /// The human-readable message.
    pub message: String,
}
