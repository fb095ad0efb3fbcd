//! The state machine: Flagger's `advanceCanary` / `checkCanaryStatus` / `runAnalysis`, as a pure
//! function. The order of checks and the event texts follow Flagger's scheduler; deviations are
//! listed in the module documentation of [`analysis`](super).

use super::check::{evaluate, CheckResult, Verdict};
use super::effect::{
    Alert, Effect, Event, Need, Outcome, Route, Scale, Severity, Step, WebhookCall,
};
use super::judge::{self, JudgeResult};
use super::observe::{Observations, OperatorRequest, Readiness, Verb, WebhookResult};
use crate::spec::{
    format_go_duration, AlertSeverity, CanaryPlan, CanaryStatus, Condition, Decision, HookKind,
    MetricCheck, Pause, PauseCause, Phase, Strategy, Timestamp, Webhook, Weight,
};
use std::time::Duration;

/// Decides one step. See the [module documentation](super) for how to drive it.
pub fn step(
    plan: &CanaryPlan,
    status: &CanaryStatus,
    obs: &Observations,
    now: Timestamp,
) -> Outcome {
    let mut run = Run {
        plan,
        old: status,
        obs,
        now,
        s: status.clone(),
        effects: Vec::new(),
        checks: Vec::new(),
        ticked: false,
        record_decision: true,
        judge: None,
    };
    match run.go() {
        Err(need) => Outcome::Need(need),
        Ok(()) => Outcome::Done(run.finish()),
    }
}

/// When the next step is due: one analysis interval after the last one (at once for a Canary
/// never stepped). Calling [`step`] earlier is harmless: it then only handles a new deletion or
/// a new retry token.
pub fn next_step_at(plan: &CanaryPlan, status: &CanaryStatus) -> Timestamp {
    status.last_step_time.map_or(Timestamp::EPOCH, |t| {
        t.saturating_add(plan.analysis.interval)
    })
}

/// Since when the comparative judge weighs evidence in this status: the attempt's start, while
/// a Canary with `analysis.judge` is being analysed; `None` when the judge has nothing to say.
pub fn judge_since(plan: &CanaryPlan, status: &CanaryStatus, now: Timestamp) -> Option<Timestamp> {
    plan.analysis.judge?;
    let analysing = matches!(
        status.phase,
        Some(Phase::Progressing | Phase::WaitingPromotion)
    );
    if !analysing || plan.skip_analysis {
        return None;
    }
    Some(
        status
            .analysis_started
            .or(status.routed_since)
            .unwrap_or(now),
    )
}

/// How traffic should be split for a canary in this status; `None` while Weir does not route it
/// (before the primary is ready, and after a deletion with `revertOnDeletion`).
///
/// Steps emit [`Effect::Route`] whenever this changes; on start, the executor builds every
/// canary's directive from it.
pub fn desired_route(plan: &CanaryPlan, status: &CanaryStatus) -> Option<Route> {
    match status.phase? {
        Phase::Initializing => None,
        Phase::Initialized | Phase::Waiting | Phase::Finalising | Phase::Succeeded => {
            Some(Route::Primary)
        }
        // A rollback leaves the weight at 0; a failed promotion at 100 (all on the canary).
        Phase::Failed => Some(Route::weighted(status.canary_weight)),
        Phase::Progressing | Phase::WaitingPromotion | Phase::Promoting => {
            Some(match plan.analysis.strategy {
                Strategy::AbTesting { .. } if status.iterations > 0 => Route::Matches,
                Strategy::AbTesting { .. } => Route::Primary,
                Strategy::Canary { .. } | Strategy::BlueGreen { .. } => {
                    Route::weighted(status.canary_weight)
                }
            })
        }
        Phase::Terminated if plan.revert_on_deletion => None,
        Phase::Terminating | Phase::Terminated => {
            status.last_promoted_spec.as_ref().map(|_| Route::Primary)
        }
    }
}

/// Whether the canary workload runs in this status: during an analysis and a promotion, and
/// after a failed promotion (it then serves all traffic). After a restart, a platform that has
/// to start processes again starts the canary when this says so.
pub fn canary_runs(status: &CanaryStatus) -> bool {
    match status.phase {
        Some(
            Phase::Progressing | Phase::WaitingPromotion | Phase::Promoting | Phase::Finalising,
        ) => true,
        Some(Phase::Failed) => status.canary_weight > Weight::ZERO,
        _ => false,
    }
}

/// What an operator request would do to a canary in this status. The engine acts on it only
/// when it says [`RequestFit::Acts`]; the CLI asks the same question before it sends a
/// request, so both say the same thing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestFit {
    /// The request changes the rollout.
    Acts,
    /// The canary is already where the request would take it: nothing to do (a request sent
    /// twice does what it did once).
    Already(String),
    /// The request makes no sense in this phase; why, and what to do instead.
    Refused(String),
}

/// Whether `verb` makes sense for a canary in `status`.
pub fn request_fit(status: &CanaryStatus, verb: Verb) -> RequestFit {
    let analysing = matches!(
        status.phase,
        Some(Phase::Progressing | Phase::WaitingPromotion)
    );
    let state = match status.phase {
        None => "not initialized yet".to_owned(),
        Some(p @ (Phase::Progressing | Phase::WaitingPromotion | Phase::Promoting)) => {
            format!("{p} at canary weight {}", status.canary_weight)
        }
        Some(p) => p.to_string(),
    };
    let promoting = matches!(status.phase, Some(Phase::Promoting | Phase::Finalising));
    let hint = match status.phase {
        Some(Phase::Failed) => "; weir retry analyses the failed version again",
        Some(Phase::Waiting) => {
            "; it waits for its confirm-rollout gate, which starts the analysis once it opens"
        }
        _ => "",
    };
    match verb {
        _ if analysing => match (verb, status.is_paused()) {
            (Verb::Pause, true) => RequestFit::Already(format!("it is already paused ({state})")),
            (Verb::Resume, false) => RequestFit::Already(format!("it is not paused ({state})")),
            _ => RequestFit::Acts,
        },
        Verb::Promote if promoting || status.phase == Some(Phase::Succeeded) => {
            RequestFit::Already(format!("it is already promoted or being promoted ({state})"))
        }
        Verb::Abort if status.phase == Some(Phase::Failed) => {
            RequestFit::Already("it is already rolled back (Failed)".to_owned())
        }
        Verb::Abort if promoting => RequestFit::Refused(format!(
            "its promotion is under way ({state}): the primary already runs the new revision, so there is nothing to roll back to; set the target back to the old version to roll back"
        )),
        Verb::Promote | Verb::Abort | Verb::Pause | Verb::Resume => {
            let what = match verb {
                Verb::Promote => "promoted",
                Verb::Abort => "aborted",
                Verb::Pause => "paused",
                Verb::Resume => "resumed",
            };
            RequestFit::Refused(format!(
                "only a canary under analysis (Progressing or WaitingPromotion) can be {what}, this one is {state}{hint}"
            ))
        }
    }
}

/// `Ok` when the step is decided (possibly doing nothing), `Err` when it needs inputs first.
type Flow = Result<(), Need>;

/// One evaluation of a step: reads `old` and `obs`, writes `s` and `effects`.
struct Run<'a> {
    plan: &'a CanaryPlan,
    old: &'a CanaryStatus,
    obs: &'a Observations,
    now: Timestamp,
    s: CanaryStatus,
    effects: Vec<Effect>,
    checks: Vec<CheckResult>,
    /// The step ran on its interval (as opposed to handling only a deletion or a retry token).
    ticked: bool,
    /// Whether the step's events go into the decision history.
    record_decision: bool,
    /// The comparative judge's verdict at this call, when the Canary asks for the judge.
    judge: Option<JudgeResult>,
}

impl<'a> Run<'a> {
    fn id(&self) -> String {
        self.plan.id()
    }

    fn target_id(&self) -> String {
        self.plan.target_id()
    }

    fn event(&mut self, severity: Severity, reason: &str, message: String) {
        self.effects.push(Effect::Event(Event {
            severity,
            reason: reason.to_string(),
            message,
        }));
    }

    fn info(&mut self, reason: &str, message: String) {
        self.event(Severity::Normal, reason, message);
    }

    /// An alert for the Canary's alert providers, where Flagger sends one and in its words;
    /// `details` adds the target, threshold, deadline and routing fields.
    fn alert(&mut self, severity: AlertSeverity, message: &str, details: bool) {
        self.effects.push(Effect::Alert(Alert {
            severity,
            message: message.to_owned(),
            details,
        }));
    }

    fn warn(&mut self, reason: &str, message: String) {
        self.event(Severity::Warning, reason, message);
    }

    /// Routes traffic, unless it is already routed this way (by the old status, or earlier in
    /// this step).
    fn route_to(&mut self, route: Route) {
        let current = self
            .effects
            .iter()
            .rev()
            .find_map(|e| match e {
                Effect::Route(r) => Some(Some(*r)),
                _ => None,
            })
            .unwrap_or_else(|| desired_route(self.plan, self.old));
        if current != Some(route) {
            self.effects.push(Effect::Route(route));
            self.s.routed_since = Some(self.now);
        }
    }

    /// How far back a check with `window` may look: never before the current step began, so
    /// a new weight, a retry or a new revision is judged only on what it served. Cut to 100 ms
    /// (whole milliseconds below a second), never longer than what the step served.
    fn measurable(&self, window: Duration) -> Duration {
        let Some(since) = self.old.routed_since else {
            return window;
        };
        let served = self.now.since(since);
        let unit = if served >= Duration::from_secs(1) {
            Duration::from_millis(100)
        } else {
            Duration::from_millis(1)
        };
        let whole = Duration::from_nanos(
            u64::try_from((served.as_nanos() / unit.as_nanos()) * unit.as_nanos())
                .unwrap_or(u64::MAX),
        );
        window.min(whole.max(Duration::from_millis(1)))
    }

    fn due(&self) -> bool {
        self.now >= next_step_at(self.plan, self.old)
    }

    /// The results of every hook of `kind`, in spec order; asks for the missing ones.
    fn hooks(
        &self,
        kind: HookKind,
        phase: Phase,
    ) -> Result<Vec<(&'a Webhook, &'a WebhookResult)>, Need> {
        let (plan, obs): (&'a CanaryPlan, &'a Observations) = (self.plan, self.obs);
        let hooks: Vec<&'a Webhook> = plan.analysis.hooks(kind).collect();
        let missing: Vec<WebhookCall> = hooks
            .iter()
            .filter(|h| !obs.webhooks.contains_key(&h.name))
            .map(|h| WebhookCall {
                webhook: (*h).clone(),
                phase,
            })
            .collect();
        if !missing.is_empty() {
            return Err(Need {
                webhooks: missing,
                ..Need::default()
            });
        }
        Ok(hooks
            .into_iter()
            .filter_map(|h| obs.webhooks.get(&h.name).map(|r| (h, r)))
            .collect())
    }

    fn go(&mut self) -> Flow {
        let phase = self.old.phase;
        if self.obs.deleting && !matches!(phase, Some(Phase::Terminating | Phase::Terminated)) {
            self.ticked = true;
            return self.begin_termination();
        }
        match phase {
            Some(Phase::Terminated) => return Ok(()),
            // Nothing here waits for the interval: only, with revertOnDeletion, for the target.
            Some(Phase::Terminating) => return self.finish_termination(),
            _ => {}
        }
        if let Some(flow) = self.take_operator_request() {
            return flow;
        }
        if self.plan.suspend {
            // Flagger says so at every run; nothing else changes, and no decision is recorded
            // (the history keeps the rollout's real decisions).
            if self.due() {
                self.ticked = true;
                self.record_decision = false;
                self.info(
                    "Suspended",
                    "skipping canary run as object is suspended".to_string(),
                );
            }
            return Ok(());
        }
        let retrying = self.take_retry_request();
        if !retrying {
            // The judge looks at every call, not only on the interval: a canary it finds worse
            // is rolled back at once.
            if self.judge()? {
                return Ok(());
            }
        }
        if !retrying && !self.due() {
            return Ok(());
        }
        self.ticked = true;
        match phase {
            None => self.initialize(),
            Some(Phase::Initializing) => self.finish_initialization(),
            Some(Phase::Initialized | Phase::Succeeded | Phase::Failed | Phase::Waiting) => {
                self.detect_new_revision(retrying)
            }
            Some(
                Phase::Progressing | Phase::WaitingPromotion | Phase::Promoting | Phase::Finalising,
            ) => self.advance(),
            Some(Phase::Terminating | Phase::Terminated) => Ok(()),
        }
    }

    /// During an analysis with `analysis.judge`: asks for the evidence, and rolls back when the
    /// judge says Fail (`Ok(true)`). Any other verdict is kept for the step's checks.
    fn judge(&mut self) -> Result<bool, Need> {
        let (Some(plan), Some(since)) = (
            self.plan.analysis.judge,
            judge_since(self.plan, self.old, self.now),
        ) else {
            return Ok(false);
        };
        let Some(evidence) = &self.obs.judge else {
            return Err(Need {
                judge: Some(since),
                ..Need::default()
            });
        };
        let result = judge::decide(&plan, evidence);
        if result.verdict() == judge::Verdict::Fail {
            self.ticked = true;
            self.warn(
                "Rollback",
                format!("Rolling back {}: {}", self.id(), result.finding()),
            );
            self.judge = Some(result);
            self.rollback()?;
            return Ok(true);
        }
        self.judge = Some(result);
        Ok(false)
    }

    /// Consumes a new operator request: `Some` when it decided the step, `None` when the step
    /// goes on as if there was none (no new request, or one ignored with an event).
    fn take_operator_request(&mut self) -> Option<Flow> {
        let request: &'a OperatorRequest = self.obs.request.as_ref()?;
        if self.old.last_request.as_ref() == Some(&request.token) {
            return None;
        }
        self.s.last_request = Some(request.token.clone());
        let (verb, by, id) = (request.verb, request.by.as_str(), self.id());
        let fit = if self.plan.suspend {
            RequestFit::Refused(
                "the Canary is suspended (spec.suspend: true), so nothing acts on it; set suspend to false first".to_owned(),
            )
        } else {
            request_fit(self.old, verb)
        };
        match fit {
            RequestFit::Already(why) => {
                self.info(
                    "Request",
                    format!("{verb} of {id} requested by {by}: {why}, nothing to do"),
                );
                return None;
            }
            RequestFit::Refused(why) => {
                self.warn(
                    "RequestRefused",
                    format!("Ignoring {verb} request by {by} for {id}: {why}"),
                );
                return None;
            }
            RequestFit::Acts => {}
        }
        let weight = self.old.canary_weight;
        Some(match verb {
            Verb::Promote => {
                self.ticked = true;
                self.info(
                    "Promote",
                    format!("Promotion of {id} requested by {by}: skipping the rest of the analysis at canary weight {weight}"),
                );
                self.promote_now()
            }
            Verb::Abort => {
                self.ticked = true;
                self.warn(
                    "Rollback",
                    format!("Rolling back {id}: abort requested by {by} at canary weight {weight}"),
                );
                self.rollback()
            }
            // Neither moves the analysis' clock: a step due now still runs at once.
            Verb::Pause => {
                self.s.paused = Some(Pause {
                    since: self.now,
                    cause: PauseCause::Requested,
                    by: by.to_owned(),
                });
                self.info(
                    "Paused",
                    format!("Paused {id} at canary weight {weight} as requested by {by}: the weight holds and the checks go on; weir resume continues, weir promote or weir abort decides"),
                );
                Ok(())
            }
            Verb::Resume => {
                self.s.paused = None;
                self.s.consecutive_inconclusive = 0;
                self.info(
                    "Resumed",
                    format!("Resumed {id} at canary weight {weight} as requested by {by}"),
                );
                Ok(())
            }
        })
    }

    /// A paused analysis at a step that would move on: say so, with the numbers, and hold.
    fn hold(&mut self) -> Flow {
        let Some(pause) = &self.old.paused else {
            return Ok(());
        };
        let why = match pause.cause {
            PauseCause::Requested => format!("by {}", pause.by),
            PauseCause::InconclusiveLimit => "by inconclusiveLimit".to_owned(),
        };
        let message = self.with_numbers(format!(
            "{} is paused at canary weight {} ({why}): holding; weir resume continues, weir promote or weir abort decides",
            self.id(),
            self.s.canary_weight
        ));
        self.info("Paused", message);
        Ok(())
    }

    /// Consumes a new retry token; true when it retries a Failed canary.
    fn take_retry_request(&mut self) -> bool {
        let Some(token) = &self.obs.retry else {
            return false;
        };
        if self.old.retry.last_token.as_ref() == Some(token) {
            return false;
        }
        self.s.retry.last_token = Some(token.clone());
        if self.old.phase == Some(Phase::Failed) {
            return true;
        }
        let state = self.old.phase.map_or("not initialized yet", Phase::as_str);
        self.info(
            "RetryIgnored",
            format!(
                "Ignoring retry request {token} for {}: only a Failed canary can be retried, this one is {state}",
                self.id()
            ),
        );
        false
    }

    /// Flagger's readiness error for the primary (`IsPrimaryReady`).
    fn primary_not_ready(&self, reason: &str) -> String {
        format!("{} not ready: {reason}", self.plan.primary_id())
    }

    /// Flagger's readiness error for the canary (`IsCanaryReady`).
    fn canary_not_ready(&self, reason: &str) -> String {
        format!(
            "canary {} {} not ready: {reason}",
            self.plan.target.kind.to_ascii_lowercase(),
            self.target_id()
        )
    }

    /// Whether a workload seen not ready since `since` is past the progress deadline: strictly
    /// after it, as Flagger (`from.Add(deadline).Before(now)`).
    fn past_deadline(&self, since: Timestamp) -> bool {
        self.now.since(since) > self.plan.progress_deadline
    }

    /// A readiness error that ends the rollout: Flagger records the error itself; Weir adds how
    /// long the workload was not ready.
    fn deadline_exceeded(&mut self, message: String, since: Timestamp) {
        self.warn(
            "Halt",
            format!(
                "{message} (not ready for {}, progress deadline {})",
                format_go_duration(self.now.since(since)),
                format_go_duration(self.plan.progress_deadline)
            ),
        );
    }

    /// Flagger's alert when a rollback follows an exceeded deadline (a failed promotion has its
    /// own).
    fn deadline_alert(&mut self, message: &str) {
        self.alert(
            AlertSeverity::Error,
            &format!("Progress deadline exceeded {message}"),
            false,
        );
    }

    /// First sighting: create the primary from the target, or keep the primary that already
    /// runs (then `lastPromotedSpec` is set from the start, which marks the adoption).
    fn initialize(&mut self) -> Flow {
        let target = self.obs.revision.clone();
        self.s.phase = Some(Phase::Initializing);
        self.info(
            "Initializing",
            format!(
                "New {} detected, starting initialization of {}",
                self.plan.target.kind,
                self.id()
            ),
        );
        let Some(running) = self.obs.primary_revision.clone() else {
            self.s.last_applied_spec = Some(target.clone());
            self.effects
                .push(Effect::InitializePrimary { revision: target });
            return Ok(());
        };
        self.s.last_applied_spec = Some(running.clone());
        self.s.last_promoted_spec = Some(running.clone());
        if running != target {
            self.info(
                "Initializing",
                format!(
                    "{} already runs revision {running}: keeping it as the primary; {} at revision {target} is analysed as a new revision",
                    self.plan.primary_id(),
                    self.target_id()
                ),
            );
        }
        // Applied only while the target still has this revision (the executor checks), so an
        // unanalysed template never reaches the primary.
        self.effects
            .push(Effect::InitializePrimary { revision: running });
        Ok(())
    }

    /// Once the primary is ready: route to it and scale the target to zero.
    fn finish_initialization(&mut self) -> Flow {
        let revision = self.obs.revision.clone();
        let adopted = self.old.last_promoted_spec.is_some();
        if !adopted && self.old.last_applied_spec.as_ref() != Some(&revision) {
            self.s.last_applied_spec = Some(revision.clone());
            self.effects.push(Effect::InitializePrimary { revision });
            self.info(
                "Initializing",
                format!(
                    "New revision of {} detected while initializing, updating {}",
                    self.target_id(),
                    self.plan.primary_id()
                ),
            );
            return Ok(());
        }
        let obs: &'a Observations = self.obs;
        if !self.plan.skip_analysis {
            if let Readiness::NotReady(reason) = &obs.primary {
                // No deadline here (Flagger rolls back): the target still serves all traffic,
                // and a rollback would scale it to zero while the primary cannot serve.
                self.warn("Halt", self.primary_not_ready(reason));
                return Ok(());
            }
        }
        self.route_to(Route::Primary);
        self.effects.push(Effect::ScaleCanary(Scale::Down));
        self.s.phase = Some(Phase::Initialized);
        self.s.canary_weight = Weight::ZERO;
        self.s.last_promoted_spec = self.s.last_applied_spec.clone();
        self.info("Initialized", format!("Initialization done! {}", self.id()));
        self.alert(
            AlertSeverity::Info,
            &format!(
                "New {} detected, initialization completed.",
                self.plan.target.kind
            ),
            true,
        );
        Ok(())
    }

    /// Initialized, Succeeded, Failed or Waiting: start an analysis on a new revision, a retry,
    /// or an approval.
    fn detect_new_revision(&mut self, retrying: bool) -> Flow {
        let phase = self.old.phase.unwrap_or(Phase::Initialized);
        let revision = self.obs.revision.clone();
        let new_revision = self.old.last_applied_spec.as_ref() != Some(&revision);
        if !(new_revision || retrying || phase == Phase::Waiting) {
            return Ok(());
        }
        // Flagger: "do not trigger a canary deployment on manual rollback". Not after a failed
        // promotion, whose primary does not run the promoted revision.
        let manual_rollback = new_revision
            && phase != Phase::Waiting
            && self.old.last_promoted_spec.as_ref() == Some(&revision)
            && self.old.canary_weight == Weight::ZERO;
        if manual_rollback {
            self.s.last_applied_spec = Some(revision.clone());
            self.info(
                "Skipped",
                format!(
                    "{} is back at revision {revision}, which {} runs: nothing to analyse",
                    self.target_id(),
                    self.plan.primary_id()
                ),
            );
            return Ok(());
        }
        // As Flagger, nothing starts while the primary is unready; a new revision stays new and
        // a retry request pending. No deadline here: nothing has been shifted to roll back.
        if !self.plan.skip_analysis {
            if let Readiness::NotReady(reason) = &self.obs.primary {
                self.s.retry.last_token = self.old.retry.last_token.clone();
                if self.due() {
                    self.warn("Halt", self.primary_not_ready(reason));
                } else {
                    // A pending retry asks at every call; say it once per interval.
                    self.ticked = false;
                }
                return Ok(());
            }
        }
        if new_revision {
            self.s.last_applied_spec = Some(revision.clone());
            self.s.retry.count = 0;
        }
        for (hook, result) in self.hooks(HookKind::ConfirmRollout, phase)? {
            match result {
                WebhookResult::Failed(_) => {
                    if phase != Phase::Waiting {
                        self.s.phase = Some(Phase::Waiting);
                        self.warn(
                            "Waiting",
                            format!(
                                "Halt {} advancement waiting for approval {}",
                                self.id(),
                                hook.name
                            ),
                        );
                        if !hook.mute_alert {
                            self.alert(
                                AlertSeverity::Warn,
                                "Canary is waiting for approval.",
                                false,
                            );
                        }
                    }
                    return Ok(());
                }
                WebhookResult::Passed => self.info(
                    "Approved",
                    format!("Confirm-rollout check {} passed", hook.name),
                ),
            }
        }
        if retrying && !new_revision {
            self.s.retry.count += 1;
            let token = self.obs.retry.clone().unwrap_or_default();
            self.info(
                "Retry",
                format!(
                    "Retrying {} analysis as requested (retry {token}, attempt {} of revision {revision})",
                    self.id(),
                    self.s.retry.count + 1
                ),
            );
        } else {
            self.info(
                "NewRevision",
                format!("New revision detected! Scaling up {}", self.target_id()),
            );
        }
        self.alert(
            AlertSeverity::Info,
            "New revision detected, progressing canary analysis.",
            true,
        );
        self.effects.push(Effect::ScaleCanary(Scale::Up));
        self.restart_analysis();
        Ok(())
    }

    /// A fresh analysis: Progressing at weight 0, counters cleared, readiness clock started.
    fn restart_analysis(&mut self) {
        // Usually routed so already; not after a failed promotion, which left all on the canary.
        self.route_to(Route::Primary);
        self.s.phase = Some(Phase::Progressing);
        self.s.canary_weight = Weight::ZERO;
        self.s.failed_checks = 0;
        self.s.iterations = 0;
        self.s.inconclusive_checks = 0;
        self.s.consecutive_inconclusive = 0;
        self.s.paused = None;
        self.s.not_ready_since = Some(self.now);
        self.s.primary_not_ready_since = None;
        // Nothing the canary served before counts for this analysis.
        self.s.routed_since = Some(self.now);
        self.s.analysis_started = Some(self.now);
    }

    /// Progressing, WaitingPromotion, Promoting, Finalising: Flagger's advanceCanary from the
    /// readiness checks on.
    fn advance(&mut self) -> Flow {
        let phase = self.old.phase.unwrap_or(Phase::Progressing);
        let analysing = matches!(phase, Phase::Progressing | Phase::WaitingPromotion);
        let revision = self.obs.revision.clone();
        let obs: &'a Observations = self.obs;

        if !self.plan.skip_analysis {
            match &obs.primary {
                Readiness::NotReady(reason) => {
                    let message = self.primary_not_ready(reason);
                    let since = self.old.primary_not_ready_since.unwrap_or(self.now);
                    self.s.primary_not_ready_since = Some(since);
                    if !self.past_deadline(since) {
                        self.warn("Halt", message);
                        return Ok(());
                    }
                    self.deadline_exceeded(message.clone(), since);
                    return match phase {
                        // The canary is the only healthy copy of the new revision: keep serving
                        // from it rather than roll back onto the unhealthy primary.
                        Phase::Promoting | Phase::Finalising => self.fail_promotion(&message),
                        _ => {
                            self.deadline_alert(&message);
                            self.rollback()
                        }
                    };
                }
                Readiness::Ready => self.s.primary_not_ready_since = None,
            }
        }

        if analysing && self.old.last_applied_spec.as_ref() != Some(&revision) {
            self.info(
                "NewRevision",
                format!(
                    "New revision detected! Restarting analysis for {}",
                    self.target_id()
                ),
            );
            self.s.last_applied_spec = Some(revision);
            self.s.retry.count = 0;
            self.route_to(Route::Primary);
            self.restart_analysis();
            return Ok(());
        }

        // Promoting and Finalising do not wait for the canary (Flagger does): the primary runs
        // the promoted template and is ready, so moving traffic off the canary is the cure for
        // an unready canary, not a reason to halt.
        if analysing {
            match &obs.canary {
                Readiness::NotReady(reason) => {
                    let message = self.canary_not_ready(reason);
                    let since = self.old.not_ready_since.unwrap_or(self.now);
                    self.s.not_ready_since = Some(since);
                    if self.past_deadline(since) {
                        self.deadline_alert(&message);
                        self.deadline_exceeded(message, since);
                        return self.rollback();
                    }
                    self.warn("Halt", message);
                    return Ok(());
                }
                Readiness::Ready => self.s.not_ready_since = None,
            }
        }

        if self.plan.skip_analysis && analysing {
            return self.promote_without_analysis();
        }

        if analysing {
            for (hook, result) in self.hooks(HookKind::Rollback, phase)? {
                match result {
                    WebhookResult::Passed => {
                        self.warn("Rollback", format!("Rollback check {} passed", hook.name));
                        self.warn(
                            "Rollback",
                            format!("Rolling back {} manual webhook invoked", self.id()),
                        );
                        self.alert(
                            AlertSeverity::Warn,
                            "Rolling back manual webhook invoked",
                            false,
                        );
                        return self.rollback();
                    }
                    WebhookResult::Failed(_) => self.info(
                        "Synced",
                        format!("Rollback hook {} not signaling a rollback", hook.name),
                    ),
                }
            }
        }

        match phase {
            Phase::Promoting => return self.shift_traffic_to_primary(),
            Phase::Finalising => return self.finalise(),
            _ => {}
        }

        if self.s.failed_checks >= self.plan.analysis.threshold.get() {
            return self.rollback();
        }

        let paused = self.old.is_paused();
        let starting = self.old.canary_weight == Weight::ZERO && self.old.iterations == 0;
        if paused && starting {
            // Paused before the first step: nothing started, so nothing to measure yet.
            return self.hold();
        }
        if starting {
            self.info(
                "Start",
                format!("Starting canary analysis for {}", self.target_id()),
            );
            for (hook, result) in self.hooks(HookKind::PreRollout, Phase::Progressing)? {
                match result {
                    WebhookResult::Failed(reason) => {
                        self.warn(
                            "Halt",
                            format!(
                                "Halt {} advancement pre-rollout check {} failed {reason}",
                                self.id(),
                                hook.name
                            ),
                        );
                        return self.count_failure();
                    }
                    WebhookResult::Passed => {
                        self.info("Synced", format!("Pre-rollout check {} passed", hook.name))
                    }
                }
            }
        } else if !self.run_checks(phase)? {
            return Ok(());
        }

        if paused {
            return self.hold();
        }
        self.run_strategy(phase)
    }

    /// Rollout webhooks and metric checks; `Ok(true)` when everything passed. Hook and metric
    /// results are asked for together so that one round trip serves both.
    fn run_checks(&mut self, phase: Phase) -> Result<bool, Need> {
        let hook_results = self.hooks(HookKind::Rollout, phase);
        let metrics_missing =
            !self.plan.analysis.metrics.is_empty() && self.obs.measurements.is_none();
        if hook_results.is_err() || metrics_missing {
            let mut need = hook_results.err().unwrap_or_default();
            if metrics_missing {
                need.metrics = self
                    .plan
                    .analysis
                    .metrics
                    .iter()
                    .map(|m| MetricCheck {
                        window: self.measurable(m.window),
                        ..m.clone()
                    })
                    .collect();
            }
            return Err(need);
        }
        for (hook, result) in hook_results.unwrap_or_default() {
            if let WebhookResult::Failed(reason) = result {
                self.warn(
                    "Halt",
                    format!(
                        "Halt {} advancement external check {} failed {reason}",
                        self.id(),
                        hook.name
                    ),
                );
                self.count_failure()?;
                return Ok(false);
            }
        }

        let obs: &'a Observations = self.obs;
        let measurements = obs.measurements.as_deref().unwrap_or_default();
        let min_samples = self.plan.analysis.min_sample_count;
        self.checks = self
            .plan
            .analysis
            .metrics
            .iter()
            .map(|m| {
                evaluate(
                    m,
                    measurements.iter().find(|x| x.metric == m.name),
                    min_samples,
                )
            })
            .collect();
        let (id, target_id) = (self.id(), self.target_id());
        let halts: Vec<String> = self
            .checks
            .iter()
            .zip(&self.plan.analysis.metrics)
            .filter_map(|(c, m)| c.halt_message(&m.kind, &id, &target_id))
            .collect();
        for message in halts {
            self.warn("Halt", message);
        }
        let any = |v: Verdict| self.checks.iter().any(|c| c.verdict == v);
        if any(Verdict::Fail) || !any(Verdict::Inconclusive) {
            // Any other outcome ends a run of Inconclusive steps.
            self.s.consecutive_inconclusive = 0;
        }
        if any(Verdict::Fail) {
            self.count_failure()?;
            return Ok(false);
        }
        if any(Verdict::Error) {
            return Ok(false);
        }
        if let (Some(result), Some(plan)) = (&self.judge, &self.plan.analysis.judge) {
            if plan.require_pass && result.verdict() != judge::Verdict::Pass {
                let message = format!(
                    "Halt {} advancement: the judge has not passed the canary yet ({})",
                    self.id(),
                    result.summary(plan)
                );
                self.warn("Halt", message);
                self.s.inconclusive_checks += 1;
                return Ok(false);
            }
        }
        if any(Verdict::Inconclusive) {
            self.s.inconclusive_checks += 1;
            // Too little data while the step is younger than the metric's window is the window
            // still filling, not a verdict: counted only once a full window came up short.
            let filling = self
                .checks
                .iter()
                .zip(&self.plan.analysis.metrics)
                .filter(|(c, _)| c.verdict == Verdict::Inconclusive)
                .all(|(c, m)| c.window < m.window);
            if self.plan.analysis.inconclusive_counts_as_failure && !filling {
                self.count_failure()?;
            }
            if !filling {
                self.s.consecutive_inconclusive += 1;
                self.pause_at_inconclusive_limit();
            }
            return Ok(false);
        }
        Ok(true)
    }

    /// Pauses for an operator's decision once `inconclusiveLimit` steps in a row were
    /// Inconclusive (Argo Rollouts' `inconclusiveLimit`): more of the same would only hold the
    /// weight forever.
    fn pause_at_inconclusive_limit(&mut self) {
        let Some(limit) = self.plan.analysis.inconclusive_limit else {
            return;
        };
        let still_analysing = matches!(
            self.s.phase,
            Some(Phase::Progressing | Phase::WaitingPromotion)
        );
        if !still_analysing
            || self.s.paused.is_some()
            || self.s.consecutive_inconclusive < limit.get()
        {
            return;
        }
        self.s.paused = Some(Pause {
            since: self.now,
            cause: PauseCause::InconclusiveLimit,
            by: "inconclusiveLimit".to_owned(),
        });
        let message = format!(
            "{} needs a decision: weir promote / weir abort ({} inconclusive analysis steps in a row reached inconclusiveLimit {}; paused at canary weight {}, the checks go on)",
            self.id(),
            self.s.consecutive_inconclusive,
            limit,
            self.s.canary_weight
        );
        self.warn("Paused", message);
    }

    /// A failed check; rolls back at once when it reaches the threshold.
    fn count_failure(&mut self) -> Flow {
        self.s.failed_checks += 1;
        if self.s.failed_checks >= self.plan.analysis.threshold.get() {
            return self.rollback();
        }
        Ok(())
    }

    fn rollback(&mut self) -> Flow {
        if self.s.failed_checks >= self.plan.analysis.threshold.get() {
            self.warn(
                "Rollback",
                format!(
                    "Rolling back {} failed checks threshold reached {}",
                    self.id(),
                    self.s.failed_checks
                ),
            );
            let message = format!("Failed checks threshold reached {}", self.s.failed_checks);
            self.alert(AlertSeverity::Error, &message, false);
        }
        self.route_to(Route::Primary);
        self.warn(
            "Failed",
            format!("Canary failed! Scaling down {}", self.id()),
        );
        self.effects.push(Effect::ScaleCanary(Scale::Down));
        self.s.phase = Some(Phase::Failed);
        self.s.canary_weight = Weight::ZERO;
        self.s.iterations = 0;
        self.s.paused = None;
        self.s.not_ready_since = None;
        self.s.primary_not_ready_since = None;
        self.post_rollout(Phase::Failed);
        Ok(())
    }

    /// The primary stayed unready past the deadline while promoting (Flagger v1.44's
    /// `handleFailedPromotion`): all traffic to the canary, the only ready copy of the new
    /// revision, and Failed at that weight; the canary keeps running.
    fn fail_promotion(&mut self, readiness: &str) -> Flow {
        self.warn(
            "Failed",
            format!(
                "Promotion of {} failed, primary not ready: {readiness}",
                self.target_id()
            ),
        );
        self.alert(
            AlertSeverity::Error,
            &format!("Promotion failed, primary not ready: {readiness}"),
            false,
        );
        self.route_to(Route::Weighted(Weight::FULL));
        self.s.phase = Some(Phase::Failed);
        self.s.canary_weight = Weight::FULL;
        self.s.iterations = 0;
        self.s.not_ready_since = None;
        self.s.primary_not_ready_since = None;
        self.post_rollout(Phase::Failed);
        Ok(())
    }

    fn post_rollout(&mut self, phase: Phase) {
        for hook in self.plan.analysis.hooks(HookKind::PostRollout) {
            self.effects.push(Effect::CallWebhook(WebhookCall {
                webhook: hook.clone(),
                phase,
            }));
        }
    }

    fn copying_message(&self) -> String {
        format!(
            "Copying {} template spec to {}",
            self.target_id(),
            self.plan.primary_id()
        )
    }

    fn promote_without_analysis(&mut self) -> Flow {
        self.route_to(Route::Primary);
        self.info("Promote", self.copying_message());
        self.effects.push(Effect::PromotePrimary {
            revision: self.s.last_applied_spec.clone().unwrap_or_default(),
        });
        self.effects.push(Effect::ScaleCanary(Scale::Down));
        self.s.phase = Some(Phase::Succeeded);
        self.s.canary_weight = Weight::ZERO;
        self.s.iterations = 0;
        self.s.inconclusive_checks = 0;
        self.s.last_promoted_spec = self.s.last_applied_spec.clone();
        self.post_rollout(Phase::Succeeded);
        self.info(
            "Succeeded",
            format!(
                "Promotion completed! Canary analysis was skipped for {}",
                self.target_id()
            ),
        );
        self.alert(
            AlertSeverity::Info,
            "Canary analysis was skipped, promotion finished.",
            false,
        );
        Ok(())
    }

    /// Promoting: the primary has the new template; move traffic back to it.
    fn shift_traffic_to_primary(&mut self) -> Flow {
        let step = match self.plan.analysis.strategy {
            Strategy::AbTesting { .. } => None,
            _ => self.plan.analysis.step_weight_promotion,
        };
        match step {
            Some(step) if self.s.canary_weight > Weight::ZERO => {
                let canary = self.s.canary_weight.saturating_sub(step);
                self.route_to(Route::weighted(canary));
                self.info(
                    "Promote",
                    format!(
                        "Advance {} primary weight {}",
                        self.id(),
                        canary.complement()
                    ),
                );
                self.s.canary_weight = canary;
                if canary == Weight::ZERO {
                    self.s.phase = Some(Phase::Finalising);
                }
            }
            _ => {
                self.info("Promote", "Routing all traffic to primary".to_string());
                self.route_to(Route::Primary);
                self.s.canary_weight = Weight::ZERO;
                self.s.phase = Some(Phase::Finalising);
            }
        }
        Ok(())
    }

    /// Finalising: all traffic is on the new primary; scale the canary down.
    fn finalise(&mut self) -> Flow {
        self.effects.push(Effect::ScaleCanary(Scale::Down));
        self.s.phase = Some(Phase::Succeeded);
        self.s.canary_weight = Weight::ZERO;
        self.s.iterations = 0;
        // The promoted analysis is over: its halts are no longer pending.
        self.s.inconclusive_checks = 0;
        self.s.last_promoted_spec = self.s.last_applied_spec.clone();
        self.post_rollout(Phase::Succeeded);
        self.info(
            "Succeeded",
            format!("Promotion completed! Scaling down {}", self.target_id()),
        );
        self.alert(
            AlertSeverity::Info,
            "Canary analysis completed successfully, promotion finished.",
            false,
        );
        Ok(())
    }

    /// Appends the numbers of this step's checks to a message.
    fn with_numbers(&self, message: String) -> String {
        let mut numbers: Vec<String> = self.checks.iter().map(CheckResult::summary).collect();
        if let (Some(result), Some(plan)) = (&self.judge, &self.plan.analysis.judge) {
            numbers.push(result.summary(plan));
        }
        if numbers.is_empty() {
            return message;
        }
        format!("{message} ({})", numbers.join("; "))
    }

    /// All checks passed: move traffic on, or promote.
    fn run_strategy(&mut self, phase: Phase) -> Flow {
        let id = self.id();
        let plan: &'a CanaryPlan = self.plan;
        match &plan.analysis.strategy {
            Strategy::Canary { steps } => {
                // Flagger runs this gate on every Progressing step of a progressive canary,
                // the one at maxWeight included: a closed gate holds the promotion too.
                if phase == Phase::Progressing && !self.confirm_traffic_increase()? {
                    return Ok(());
                }
                match steps.next_after(self.s.canary_weight) {
                    Some(next) => {
                        self.route_to(Route::weighted(next));
                        self.s.canary_weight = next;
                        let message =
                            self.with_numbers(format!("Advance {id} canary weight {next}"));
                        self.info("Advance", message);
                        Ok(())
                    }
                    None => self.promote(),
                }
            }
            Strategy::AbTesting { iterations, .. } => {
                let n = iterations.get();
                if self.s.iterations < n {
                    self.s.iterations += 1;
                    self.route_to(Route::Matches);
                    let message = self.with_numbers(format!(
                        "Advance {id} canary iteration {}/{n}",
                        self.s.iterations
                    ));
                    self.info("Advance", message);
                    Ok(())
                } else {
                    self.promote()
                }
            }
            Strategy::BlueGreen { iterations } => {
                let n = iterations.get();
                if self.s.iterations < n {
                    self.s.iterations += 1;
                    let message = self.with_numbers(format!(
                        "Advance {id} canary iteration {}/{n}",
                        self.s.iterations
                    ));
                    self.info("Advance", message);
                    Ok(())
                } else if self.s.iterations == n {
                    if !self.confirm_promotion()? {
                        return Ok(());
                    }
                    let message = self.with_numbers("Routing all traffic to canary".to_string());
                    self.info("Advance", message);
                    self.route_to(Route::Weighted(Weight::FULL));
                    self.s.canary_weight = Weight::FULL;
                    self.s.iterations += 1;
                    Ok(())
                } else {
                    self.promote()
                }
            }
        }
    }

    /// The confirm-traffic-increase gate; `Ok(false)` while it holds.
    fn confirm_traffic_increase(&mut self) -> Result<bool, Need> {
        for (hook, result) in self.hooks(HookKind::ConfirmTrafficIncrease, Phase::Progressing)? {
            match result {
                WebhookResult::Failed(_) => {
                    self.warn(
                        "Waiting",
                        format!(
                            "Halt {} advancement waiting for traffic increase approval {}",
                            self.id(),
                            hook.name
                        ),
                    );
                    if !hook.mute_alert {
                        self.alert(
                            AlertSeverity::Warn,
                            "Canary traffic increase is waiting for approval.",
                            false,
                        );
                    }
                    return Ok(false);
                }
                WebhookResult::Passed => self.info(
                    "Approved",
                    format!("Confirm-traffic-increase check {} passed", hook.name),
                ),
            }
        }
        Ok(true)
    }

    /// The confirm-promotion gate; `Ok(false)` while it holds (phase WaitingPromotion).
    fn confirm_promotion(&mut self) -> Result<bool, Need> {
        for (hook, result) in self.hooks(HookKind::ConfirmPromotion, Phase::Progressing)? {
            match result {
                WebhookResult::Failed(_) => {
                    if self.old.phase != Some(Phase::WaitingPromotion) {
                        self.s.phase = Some(Phase::WaitingPromotion);
                        self.warn(
                            "Waiting",
                            format!(
                                "Halt {} advancement waiting for promotion approval {}",
                                self.id(),
                                hook.name
                            ),
                        );
                        if !hook.mute_alert {
                            self.alert(
                                AlertSeverity::Warn,
                                "Canary promotion is waiting for approval.",
                                false,
                            );
                        }
                    }
                    return Ok(false);
                }
                WebhookResult::Passed => self.info(
                    "Approved",
                    format!("Confirm-promotion check {} passed", hook.name),
                ),
            }
        }
        if self.s.phase == Some(Phase::WaitingPromotion) {
            self.s.phase = Some(Phase::Progressing);
        }
        Ok(true)
    }

    /// Analysis is complete: copy the analysed template to the primary.
    fn promote(&mut self) -> Flow {
        if !self.confirm_promotion()? {
            return Ok(());
        }
        self.promote_now()
    }

    /// Copies the analysed template to the primary, gates passed or skipped (`weir promote`).
    fn promote_now(&mut self) -> Flow {
        self.s.paused = None;
        self.s.consecutive_inconclusive = 0;
        let message = self.with_numbers(self.copying_message());
        self.info("Promote", message);
        self.effects.push(Effect::PromotePrimary {
            revision: self.s.last_applied_spec.clone().unwrap_or_default(),
        });
        self.s.phase = Some(Phase::Promoting);
        // The primary rolls out the new template from now: its deadline clock starts.
        self.s.primary_not_ready_since = Some(self.now);
        Ok(())
    }

    fn begin_termination(&mut self) -> Flow {
        self.s.phase = Some(Phase::Terminating);
        self.info("Terminating", format!("Terminating canary {}", self.id()));
        if let Some(route) = desired_route(self.plan, &self.s) {
            self.route_to(route);
        }
        if self.plan.revert_on_deletion {
            self.effects.push(Effect::ScaleCanary(Scale::Up));
            self.s.not_ready_since = Some(self.now);
            return Ok(());
        }
        // Nothing to give back: the deletion completes in this step.
        self.finish_termination()
    }

    /// Terminating: done at once without revertOnDeletion, else as soon as the restored target
    /// is ready (checked at every call, not once per interval).
    fn finish_termination(&mut self) -> Flow {
        if self.plan.revert_on_deletion {
            if let Readiness::NotReady(_) = self.obs.canary {
                return Ok(());
            }
            self.effects.push(Effect::RevertRouting);
            self.info(
                "Terminated",
                format!(
                    "Terminated canary {}: traffic is back on {}",
                    self.id(),
                    self.target_id()
                ),
            );
        } else {
            self.info("Terminated", format!("Terminated canary {}", self.id()));
        }
        self.ticked = true;
        self.s.phase = Some(Phase::Terminated);
        self.s.not_ready_since = None;
        Ok(())
    }

    fn finish(mut self) -> Step {
        let (old, now) = (self.old, self.now);
        let s = &mut self.s;
        if self.ticked {
            s.last_step_time = Some(now);
        }
        let transitioned = s.phase != old.phase
            || s.canary_weight != old.canary_weight
            || s.failed_checks != old.failed_checks
            || s.iterations != old.iterations;
        if transitioned {
            s.last_transition_time = Some(now);
        }
        if let (true, Some(phase)) = (s.phase != old.phase, s.phase) {
            set_promoted_condition(s, phase, &self.plan.target.kind, now);
        }
        if s.paused != old.paused {
            set_paused_condition(s, now);
        }
        let events: Vec<Event> = self
            .effects
            .iter()
            .filter_map(|e| match e {
                Effect::Event(ev) => Some(ev.clone()),
                _ => None,
            })
            .collect();
        if let (false, true, Some(phase)) = (events.is_empty(), self.record_decision, s.phase) {
            let decision = Decision {
                time: now,
                phase,
                canary_weight: s.canary_weight,
                failed_checks: s.failed_checks,
                iterations: s.iterations,
                events,
                checks: std::mem::take(&mut self.checks),
                judge: self.judge.take(),
            };
            s.record(decision);
        }
        Step {
            status: self.s,
            effects: self.effects,
        }
    }
}

/// The status condition that says an analysis is paused, and what it waits for.
pub const PAUSED_CONDITION: &str = "Paused";

/// Weir's `Paused` condition: present while the analysis is paused, with what to do.
fn set_paused_condition(s: &mut CanaryStatus, now: Timestamp) {
    s.conditions.retain(|c| c.kind != PAUSED_CONDITION);
    let Some(pause) = &s.paused else {
        return;
    };
    let (reason, message) = match pause.cause {
        PauseCause::InconclusiveLimit => (
            "InconclusiveLimit",
            format!(
                "needs a decision: weir promote / weir abort ({} inconclusive analysis steps in a row)",
                s.consecutive_inconclusive
            ),
        ),
        PauseCause::Requested => (
            "Requested",
            format!(
                "paused by {}: weir resume continues, weir promote or weir abort decides",
                pause.by
            ),
        ),
    };
    s.conditions.push(Condition {
        kind: PAUSED_CONDITION.into(),
        status: "True".into(),
        last_update_time: Some(now),
        last_transition_time: Some(pause.since),
        reason: reason.into(),
        message,
    });
}

/// Flagger's `Promoted` condition for a phase (`MakeStatusConditions`).
fn set_promoted_condition(s: &mut CanaryStatus, phase: Phase, kind: &str, now: Timestamp) {
    let (status, message) = match phase {
        Phase::Initializing => (
            "Unknown",
            format!("New {kind} detected, starting initialization."),
        ),
        Phase::Initialized => ("True", format!("{kind} initialization completed.")),
        Phase::Waiting | Phase::WaitingPromotion => ("Unknown", "Waiting for approval.".into()),
        Phase::Progressing => (
            "Unknown",
            "New revision detected, progressing canary analysis.".into(),
        ),
        Phase::Promoting => (
            "Unknown",
            "Canary analysis completed, starting primary rolling update.".into(),
        ),
        Phase::Finalising => (
            "Unknown",
            "Canary analysis completed, routing all traffic to primary.".into(),
        ),
        Phase::Succeeded => (
            "True",
            "Canary analysis completed successfully, promotion finished.".into(),
        ),
        Phase::Failed => (
            "False",
            format!("Canary analysis failed, {kind} scaled to zero."),
        ),
        Phase::Terminating => ("Unknown", "Canary is being deleted.".into()),
        Phase::Terminated => ("Unknown", "Canary deletion finished.".into()),
    };
    let previous = s.conditions.iter().find(|c| c.kind == "Promoted");
    let last_transition_time = match previous {
        Some(c) if c.status == status => c.last_transition_time,
        _ => Some(now),
    };
    s.conditions.retain(|c| c.kind != "Promoted");
    s.conditions.push(Condition {
        kind: "Promoted".into(),
        status: status.into(),
        last_update_time: Some(now),
        last_transition_time,
        reason: phase.as_str().into(),
        message,
    });
}
