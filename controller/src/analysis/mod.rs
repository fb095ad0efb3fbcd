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
//! - **Operator requests.** Pass the current request in `Observations::request` on every call
//!   (`weir.dev/request` annotation, or the state folder's `request` file). Each new token is
//!   handled at once, whatever the interval: promote and abort decide the step, pause and
//!   resume only set or clear [`CanaryStatus::paused`](crate::spec::CanaryStatus::paused) and
//!   let a due step run. A request that makes no sense in the phase ([`request_fit`]) is
//!   recorded and ignored with an event, as is one that changes nothing.
//! - **Deletion.** Set `Observations::deleting`; the canary goes Terminating at once, and
//!   Terminated in the same step without `revertOnDeletion`; with it, on the first later call
//!   that sees the restored target ready (not only once per interval). Drop it once Terminated.
//!
//! # Differences from Flagger, on purpose
//!
//! Compared with Flagger v1.44's scheduler (`pkg/controller/scheduler*.go`, `pkg/canary`). Where
//! this list says nothing, Weir does what Flagger does, in Flagger's words.
//!
//! Traffic and timing:
//! - The weight never exceeds `maxWeight` (Flagger can overshoot it by up to one step).
//! - The rollback happens on the step whose failure reaches the threshold, not one interval later.
//! - `analysis.interval` below 10s is allowed (Flagger raises it to 10s), for fast tests.
//! - Promoting and Finalising do not wait for the canary to be ready (Flagger halts, and rolls
//!   back after the progress deadline): the primary already runs the promoted template and is
//!   ready, so moving traffic off an unready canary is the cure, and a rollback would mark Failed
//!   a revision the primary runs.
//!
//! Checks:
//! - Every metric is evaluated at every step (Flagger stops at the first failing one) and each
//!   failing metric gets its own message; one step adds at most one failed check.
//! - All webhooks of a kind are called in one round, not one by one until the first failure.
//! - Inconclusive and Error verdicts halt without counting a failure (Flagger counts "no values
//!   found" and a failed query as failed); `inconclusiveCountsAsFailure` restores counting for
//!   Inconclusive.
//! - `minSampleCount` is Weir's own (Flagger has none): fewer requests in the window is
//!   Inconclusive, in Weir's words (`Halt mhs.application advancement: request-success-rate
//!   inconclusive, 3 requests in 30s < minSampleCount 20 (from streamed)`).
//! - Flagger's "no values found" text is used whichever source answered; from the streamed
//!   source it keeps Flagger's `: running query failed: no values found` although no query ran.
//! - A failed query reads as Flagger's (`Prometheus query failed: <cause>`, `Metric query failed
//!   for <metric>: <cause>`); the cause is Weir's own wording (it names the server and the
//!   query). A check no source measured (an executor fault) reads `... could not be checked`.
//! - A check counts only what the current step served: its window is the metric's interval
//!   cut to the time since the canary's route last changed, or since the analysis started or
//!   was retried (Flagger always looks back a whole metric interval, into the previous step or
//!   the failed attempt). The cut range also goes into the PromQL: a range shorter than two
//!   scrape intervals may answer no values, an Inconclusive halt after which the window grows.
//!   Streamed data is bucketed by receipt time: a window may also hold up to one bucket plus
//!   one report interval of requests served just before the step began (at the previous weight
//!   of the same attempt; after a retry or a new revision the weight was 0 then).
//! - Too little data while that window is still shorter than the metric's interval is not
//!   counted as a failure, even with `inconclusiveCountsAsFailure`.
//! - After the controller (re)starts, a step that needs measurements waits for the filters to
//!   report again (one report interval after the first report for the canary, at most 11s;
//!   `runner::ReconnectGrace`): the telemetry ingest starts empty, where Flagger's Prometheus
//!   kept its data.
//! - Metric providers are not probed at initialization (Flagger's "all the metrics providers are
//!   available!"): each check asks its source at every step, and a broken one is an Error.
//!
//! The comparative judge (`analysis.judge`, Weir's own; Flagger has nothing like it):
//! - It compares the canary with the primary over the same time from the same reporters
//!   ([`judge`], `docs/judge.md`), where Flagger judges the canary alone against fixed bounds.
//!   A Canary without it behaves as Flagger's.
//! - It is evaluated at every call, not once per interval (the runner looks every quarter of a
//!   window bucket, weighing each report at the first look after it arrived; between steps
//!   such a look reads only the ingest), and a Fail rolls back at once, without counting
//!   failed checks against the threshold: `Rolling back mhs.application: canary failure rate
//!   48.1% vs primary 0.4% (sequential test, 99% confidence, 23 canary requests in 1.2s)`.
//! - It weighs everything both versions served since the analysis started or was retried
//!   (`status.analysisStarted`), across weight changes, where the metric checks count only the
//!   current step: its error bounds hold over the whole attempt, and more data decides sooner.
//! - Its verdict is added to the numbers of the step's events and kept in the decision
//!   history (`decisions[].judge`); between intervals only a Fail is recorded.
//! - With `requirePass`, a step advances only on its Pass; otherwise it is a halt like an
//!   Inconclusive check (counted in `inconclusiveChecks`, never as a failed check).
//!
//! Readiness and the progress deadline:
//! - The deadline is timed by the engine (the canary from its scale-up or from the first step
//!   that saw it unready, the primary from the promotion or from the first step that saw it
//!   unready; kept in the status), not read from the Deployment's Available condition, so local
//!   processes get the same rule. A primary scaled to zero is unready like any other (Flagger
//!   rolls back at once).
//! - A deadline that ends the rollout records Flagger's readiness error (as Flagger >= 1.36.1)
//!   followed by `(not ready for 3m0s, progress deadline 2m30s)`.
//! - An unready primary during initialization halts with no deadline (Flagger rolls back, which
//!   scales the target to zero while the primary cannot serve). A new revision or a retry waits
//!   while the primary is unready, also with no deadline (Flagger rolls back: nothing has been
//!   shifted yet, so that would only mark the canary Failed).
//!
//! Revisions and operator requests:
//! - A target reverted to the promoted revision during an analysis restarts the analysis on it
//!   (Flagger does not notice, goes on analysing and promotes whatever the target runs). After an
//!   analysis, such a revert starts nothing, as in Flagger, and Weir says so in an event.
//! - A retry of a Failed canary without changing it (`weir.dev/retry`, `weir retry`) is Weir's
//!   own.
//! - Operator verbs are Weir's own (Argo Rollouts' `promote`, `abort`, `pause`, `resume`):
//!   Flagger has none; it offers `spec.suspend` and gates (confirm-promotion, rollback hooks,
//!   the load tester's `/gate/*`). `weir promote` skips the rest of the analysis and the
//!   confirm-promotion gate (the operator is the gate) and promotes from the current weight;
//!   `weir abort` rolls back at once; both are refused during Promoting and Finalising.
//!   `weir pause` differs from `spec.suspend`, which Weir keeps as Flagger's (nothing runs):
//!   a paused analysis holds its weight but goes on measuring at every interval, so failed
//!   checks still count and still roll back at the threshold, and the readiness deadline
//!   still applies. Requests to a suspended Canary are ignored with an event.
//! - `inconclusiveLimit` (Argo Rollouts', counted in steps in a row; default 10, 0 for none):
//!   after that many Inconclusive steps in a row the canary pauses with a `Paused` condition
//!   (`needs a decision: weir promote / weir abort`) instead of halting for ever; with Flagger
//!   the same canary would count "no values found" as failures and roll back. Steps whose
//!   window was still filling do not count.
//! - A Canary whose primary already runs when it is first seen (deleted without
//!   `revertOnDeletion` and applied again) keeps that primary, and a target that differs is
//!   analysed as a new revision (`Observations::primary_revision`); Flagger copies the target
//!   to the primary at initialization, unanalysed.
//!
//! Autoscalers (`autoscalerRef`, `platform/kubernetes/autoscalers.rs`):
//! - The primary's copy follows an edit of the original on the next reconcile (within an
//!   analysis interval); Flagger updates it only while promoting.
//! - A target scaled up from zero gets the replicas it had when Weir scaled it down (Flagger:
//!   the autoscaler's `minReplicas`, at least 1); its autoscaler takes over from there in both.
//! - A ScaledObject's whole spec is copied (Flagger copies the fields its vendored KEDA types
//!   know, dropping newer ones such as `initialCooldownPeriod` or `scalingModifiers`).
//! - Deleted without `revertOnDeletion`, the copy stays with the primary it scales, which Weir
//!   keeps serving (see Revisions above); Flagger's garbage collection deletes both.
//!
//! Status and events:
//! - `failedChecks` keeps its value in Failed (Flagger resets it), and the status weight is the
//!   weight being routed (Flagger's status shows 0 while WaitingPromotion/Promoting).
//! - While WaitingPromotion, A/B testing and blue/green keep their iteration count (Flagger sets
//!   it back by one, so it announces the last iteration again every other step).
//! - Event messages of decisions that used metrics end with the numbers, in parentheses.
//! - Event reasons name the decision (`Advance`, `Halt`, `Rollback`, `Promote`, ...); Flagger
//!   writes `Synced` for every event. Severities are Flagger's.
//! - Events Flagger does not have: the operator requests' (`Promotion of ... requested by
//!   ...`, `Rolling back ...: abort requested by ...`, `Paused ...`, `Resumed ...`, `Ignoring
//!   <verb> request by ...`, and `... needs a decision: weir promote / weir abort`),
//!   `New Deployment detected, starting initialization of ...`,
//!   `New revision of ... detected while initializing, updating ...`, the retry events
//!   (`Retrying ...`, `Ignoring retry request ...`), the manual-rollback note, and `: traffic is
//!   back on <target>` after `Terminated canary ...` with `revertOnDeletion`.
//! - Suspended steps (`skipping canary run as object is suspended`, as Flagger) are not kept in
//!   the status' decision history, which is Weir's own.
//! - Alerts are raised at Flagger's points with its texts and severities, but also after a retry
//!   (`New revision detected, progressing canary analysis.`), and a failed promotion past the
//!   deadline sends only `Promotion failed, ...` (Flagger's path does too) while a rollback past
//!   the deadline sends `Progress deadline exceeded ...`. Without `spec.analysis.alerts` nothing
//!   is sent (Flagger falls back to its global `-slack-url` notifier; Weir has none). The alert's
//!   traffic-routing field always lists the weights (`Weight steps: 10,20,30 max: 30`), where
//!   Flagger writes `Weight step: 10 max: 30` for a `stepWeight`.
//! - Alert and event-hook deliveries leave the step: they are queued and sent in the background
//!   (an alert with up to 3 attempts), where Flagger sends them inline during the step; each
//!   receiver has its own lane (64 waiting, then dropped and logged), so a receiver that is down
//!   delays only its own messages.
//! - Webhook, alert and Prometheus answers are read up to 4 MiB; a larger one fails the call
//!   (Flagger reads any size).
//! - Webhooks: any 2xx passes (Flagger: a status above 202 fails); `retries` repeat at once
//!   (Flagger's retryablehttp waits between tries and does not retry a 4xx).
//! - Spec fields Weir parses but does not implement (for instance autoscaler fields it cannot honour) are named in a warning when the
//!   Canary is loaded, rather than listed here.
//!
//! Session affinity and mirroring:
//! - `sessionAffinity` is done by the filters: requests a cookie keeps on the canary are counted
//!   under the canary, as any other, so the analysis sees exactly the traffic the canary served.
//!   The cookie values are derived from the canary's secret routing value and the revision under
//!   analysis (Flagger keeps random ones in the status), so a controller restart keeps every
//!   session and each new revision starts with new cookies. The primary cookie gets a new value
//!   at each step and lives one analysis interval, as in Flagger.
//! - It applies to progressive traffic shifting only (a warning says so for iterations), as
//!   Flagger, which sets the cookies only while the canary has a weight.
//! - `analysis.mirror` is refused when the Canary is loaded: a mirrored request's answer never
//!   reaches the caller's filter, so the analysis would promote on numbers without the mirrored
//!   traffic. (Measuring it would need the filter on the canary's inbound side or the
//!   Prometheus fallback forced for that canary; neither is built.)

mod check;
mod effect;
mod engine;
pub mod judge;
mod observe;

pub use check::{evaluate, CheckResult, Measurement, Sample, Unit, Verdict, PROMETHEUS_SOURCE};
pub use effect::{Alert, Effect, Event, Need, Outcome, Route, Scale, Severity, Step, WebhookCall};
pub use engine::{
    canary_runs, desired_route, judge_since, next_step_at, request_fit, step, RequestFit,
    PAUSED_CONDITION,
};
pub use judge::{Evidence, JudgeResult};
pub use observe::{Observations, OperatorRequest, Readiness, Verb, WebhookResult};

#[cfg(test)]
mod tests;
