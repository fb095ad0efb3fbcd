//! The analysis engine: a pure state machine that makes every verdict and decision.
//!
//! No I/O, no clock, no randomness: [`step`]`(plan, status, observations, now)` returns either the
//! next status with the effects to perform, or the inputs it needs first (metric measurements,
//! webhook results). Phases, order of checks and event texts are Flagger's (`advanceCanary`,
//! `checkCanaryStatus`, `runAnalysis`); verdicts are Argo Rollouts' (Pass, Fail, Inconclusive,
//! Error).
//!
//! # How to drive the engine
//!
//! ```ignore
//! let now = Timestamp::from_system_time(SystemTime::now());
//! let mut obs = Observations { primary, canary, retry, deleting, ..Observations::new(revision) };
//! let step = loop {
//!     match analysis::step(&plan, &status, &obs, now) {
//!         Outcome::Done(step) => break step,
//!         Outcome::Need(need) => {                       // same `now`, same `status`
//!             if !need.metrics.is_empty() { obs.measurements = Some(measure(&need.metrics, now).await); }
//!             for call in need.webhooks { obs.webhooks.insert(call.webhook.name.clone(), call_hook(&call).await); }
//!         }
//!     }
//! };
//! for effect in &step.effects { perform(effect).await?; }   // then, and only then:
//! save(&step.status)?;  sleep_until(analysis::next_step_at(&plan, &step.status)).await;
//! ```
//!
//! - **Timing.** Call `step` whenever you like: it acts at most once per analysis interval
//!   ([`next_step_at`]), except for a deletion or a new retry token, which it handles at once.
//!   A restart therefore never runs an extra analysis step early.
//! - **Inputs on demand.** A step that reaches a webhook gate or the metric checks without their
//!   results returns [`Outcome::Need`]; evaluate exactly what it lists (each metric over its
//!   `window` ending at `now`, each webhook with the given phase) and call again. It never asks
//!   twice for what the observations already hold, so the loop ends (at most three rounds).
//!   Measure only; the verdict is made here ([`evaluate`]).
//! - **Effects, then status.** Perform the effects in order, then persist the status. If the
//!   process dies in between, the old status yields the same effects again; they are all
//!   idempotent ("make it so"), and a promotion names the revision it promotes.
//! - **Routing on start.** Effects carry route *changes*; after a restart build each canary's
//!   directive from [`desired_route`]`(plan, status)`.
//! - **Retry.** Pass the current retry token in `Observations::retry` on every call: the
//!   `weir.dev/retry` annotation ([`Canary::retry_token`](crate::spec::Canary::retry_token)) or a
//!   CLI nonce. A Failed canary is retried once per new token; a token seen in another phase is
//!   recorded and ignored (with an event).
//! - **Deletion.** Set `Observations::deleting`; the canary goes Terminating at once, and
//!   Terminated in the same step without `revertOnDeletion`; with it, on the first later call
//!   that sees the restored target ready (not only once per interval). Drop it once Terminated.
//!
//! # Differences from Flagger, on purpose
//!
//! - The weight never exceeds `maxWeight` (Flagger can overshoot it by up to one step).
//! - The rollback happens on the step whose failure reaches the threshold, not one interval later.
//! - Every metric is evaluated at every step (Flagger stops at the first failing one) and each
//!   failing metric gets its own message; one step adds at most one failed check.
//! - All webhooks of a kind are called in one round, not one by one until the first failure.
//! - Inconclusive and Error verdicts halt without counting a failure (Flagger counts "no values
//!   found" as failed); `inconclusiveCountsAsFailure` restores counting for Inconclusive.
//! - `failedChecks` keeps its value in Failed (Flagger resets it), and the status weight is the
//!   weight being routed (Flagger's status shows 0 while WaitingPromotion/Promoting).
//! - `analysis.interval` below 10s is allowed (Flagger raises it to 10s), for fast tests.
//! - Event messages of decisions that used metrics end with the numbers, in parentheses.
//! - A Canary whose primary already runs when it is first seen (deleted without
//!   `revertOnDeletion` and applied again) keeps that primary, and a target that differs is
//!   analysed as a new revision (`Observations::primary_revision`); Flagger copies the target
//!   to the primary at initialization, unanalysed.

mod check;
mod effect;
mod engine;
mod observe;

pub use check::{evaluate, CheckResult, Measurement, Sample, Unit, Verdict};
pub use effect::{Effect, Event, Need, Outcome, Route, Scale, Severity, Step, WebhookCall};
pub use engine::{desired_route, next_step_at, step};
pub use observe::{Observations, Readiness, WebhookResult};

#[cfg(test)]
mod tests;
