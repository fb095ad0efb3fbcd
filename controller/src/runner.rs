//! The executor: runs one canary's loop. It observes the world (platform, metric source,
//! webhooks), asks the pure engine for the next step, performs the step's effects, then persists
//! the status. Every decision is the engine's; everything here is I/O.

use std::time::{Duration, Instant, SystemTime};

use crate::analysis::{
    self, Effect, Event, Observations, Outcome, Readiness, Route, Scale, Severity,
};
use crate::metrics::MetricSource;
use crate::notify::Notifier;
use crate::platform::{CanaryRef, Platform, PlatformError};
use crate::spec::{CanaryPlan, CanaryStatus, HookKind, Timestamp};
use crate::traffic::{self, Directives};
use crate::webhook;

/// Where a canary's status and events are kept, and where its operator's requests come from.
pub trait Journal: Send {
    /// The persisted status, if any (a restart resumes from it).
    fn load(&self) -> Result<Option<CanaryStatus>, String>;
    /// Persists the status after a step's effects were performed.
    fn save(&mut self, status: &CanaryStatus) -> Result<(), String>;
    /// Records an event.
    fn event(&mut self, event: &Event);
    /// The current retry token (a new one retries a Failed canary).
    fn retry_token(&self) -> Option<String>;
    /// The current operator request (promote, abort, pause, resume), if any; each new token is
    /// handled once.
    fn request(&self) -> Option<analysis::OperatorRequest> {
        None
    }
    /// Whether the canary is being deleted.
    fn deleting(&self) -> bool;
}

/// A step could not be completed; the status was not saved, so the next tick tries again.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// A platform operation failed.
    #[error(transparent)]
    Platform(#[from] PlatformError),
    /// The directive could not be published.
    #[error("publishing the route for {canary} failed: {reason}")]
    Route {
        /// The canary.
        canary: String,
        /// Why.
        reason: String,
    },
    /// The status could not be persisted.
    #[error("saving the status of {canary} failed: {reason}")]
    Save {
        /// The canary.
        canary: String,
        /// Why.
        reason: String,
    },
}

/// How long the filters get to reconnect after the controller (re)started before a check is
/// measured. The ingest starts empty, and the filters reconnect on their own backoff; an overdue
/// step run at once would judge an empty window (an Inconclusive halt, a failure with
/// `inconclusiveCountsAsFailure`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReconnectGrace {
    /// After the first report for the canary, wait this much more: the other filters lost the
    /// same stream at the same time and reconnect within about one report interval of it.
    pub settle: Duration,
    /// Measure at the latest this long after the controller started, reports or not.
    pub max: Duration,
}

impl Default for ReconnectGrace {
    /// One report interval (the filter's default, 1s) after the first report, at most that plus
    /// the filter's longest reconnect backoff (10s) after the start.
    fn default() -> Self {
        Self {
            settle: Duration::from_secs(1),
            max: Duration::from_secs(11),
        }
    }
}

/// Drives one canary.
pub struct Runner<P, M, J> {
    plan: CanaryPlan,
    canary: CanaryRef,
    platform: P,
    metrics: M,
    directives: Directives,
    journal: J,
    status: CanaryStatus,
    /// The directive generation published last, when it was published, and whether its
    /// confirmation has been dealt with.
    pending: Option<(u64, Instant)>,
    /// How long to wait for the filters to confirm a new weight before measuring anyway.
    confirm_wait: Duration,
    /// How long the filters get to reconnect after the controller started.
    grace: ReconnectGrace,
    /// Whether the wait for the filters was announced (once per runner).
    grace_announced: bool,
    /// The comparative judge's evidence so far, absorbed from the ingest bucket by bucket.
    judge: Option<JudgeTracker>,
    /// When the last full step succeeded, and what the journal asked for then.
    last_step: Option<(Instant, Asked)>,
    /// Where alerts and events for the event hooks go (none: not sent).
    notifier: Option<Notifier>,
}

/// What the judge has absorbed of one analysis attempt.
#[derive(Debug, Clone)]
pub struct JudgeTracker {
    /// Evidence since this time (the attempt's start).
    since: Timestamp,
    /// The judge's settings it was built for.
    plan: crate::spec::JudgePlan,
    /// The newest bucket read, and what of it was absorbed: it may still have been filling.
    newest: Option<(u64, analysis::judge::BucketPair)>,
    evidence: analysis::Evidence,
}

impl JudgeTracker {
    /// Brings `tracker` up to date with the ingest's buckets for `plan`'s canary since `since`
    /// (starting over when the attempt or the judge's settings changed), and returns the
    /// evidence. Each look absorbs what arrived since the one before, the current bucket's
    /// reports so far included, so a report is weighed at the first look after it arrived.
    /// `now` and `now_instant` are the same moment on the two clocks.
    pub fn update(
        tracker: &mut Option<JudgeTracker>,
        ingest: &crate::ingest::Ingest,
        plan: &CanaryPlan,
        since: Timestamp,
        now: Timestamp,
        now_instant: Instant,
    ) -> analysis::Evidence {
        let Some(judge) = plan.analysis.judge else {
            return analysis::Evidence::new(
                &crate::spec::JudgePlan {
                    confidence: crate::spec::DEFAULT_JUDGE_CONFIDENCE,
                    error_ratio: crate::spec::DEFAULT_JUDGE_ERROR_RATIO,
                    latency_ratio: None,
                    require_pass: false,
                },
                ingest.config().bucket_width,
            );
        };
        let fresh = tracker
            .as_ref()
            .is_none_or(|t| t.since != since || t.plan != judge);
        if fresh {
            *tracker = Some(JudgeTracker {
                since,
                plan: judge,
                newest: None,
                evidence: analysis::Evidence::new(&judge, ingest.config().bucket_width),
            });
        }
        let Some(t) = tracker.as_mut() else {
            return analysis::Evidence::new(&judge, ingest.config().bucket_width);
        };
        let since_instant = now_instant
            .checked_sub(now.since(since))
            .unwrap_or(ingest.started_at());
        if let Some(buckets) = ingest.judge_buckets(
            &plan.key(),
            since_instant,
            t.newest.as_ref().map(|(index, _)| *index),
            now_instant,
            judge.latency_ratio,
        ) {
            for (index, bucket) in buckets {
                let gained = match &t.newest {
                    Some((newest, seen)) if *newest == index => bucket.since(seen),
                    _ => bucket.clone(),
                };
                t.evidence.absorb(index, &gained);
                t.newest = Some((index, bucket));
            }
        }
        t.evidence.clone()
    }
}

/// How often the judge looks per window bucket while it judges: a report is weighed within a
/// quarter bucket of its arrival (250 ms with one-second buckets). The looks between the
/// engine's steps read only the ingest ([`Runner::only_the_judge_looks`]).
pub const JUDGE_LOOKS_PER_BUCKET: u32 = 4;

/// How long after a look's boundary the judge looks: long enough that the clock has surely
/// moved past it, short enough not to delay a rollback.
pub const JUDGE_LOOK_DELAY: Duration = Duration::from_millis(20);

/// How long from `now` until the judge's next look: the next quarter of a window bucket (of
/// `bucket_width`, counted from the ingest's `origin`, see [`JUDGE_LOOKS_PER_BUCKET`]), plus
/// [`JUDGE_LOOK_DELAY`].
pub fn until_judge_look(origin: Instant, bucket_width: Duration, now: Instant) -> Duration {
    let width = (bucket_width / JUDGE_LOOKS_PER_BUCKET).as_nanos().max(1);
    let into = now.saturating_duration_since(origin).as_nanos() % width;
    let left = u64::try_from(width - into).unwrap_or(u64::MAX);
    Duration::from_nanos(left) + JUDGE_LOOK_DELAY
}

/// What the journal asked for at the runner's last full step: a change of any of it needs a
/// step now.
#[derive(Debug, Clone, PartialEq)]
struct Asked {
    retry: Option<String>,
    request: Option<analysis::OperatorRequest>,
    deleting: bool,
}

impl<P: Platform, M: MetricSource, J: Journal> Runner<P, M, J> {
    /// A runner resuming from the journal's status (or starting fresh).
    pub fn new(
        plan: CanaryPlan,
        platform: P,
        metrics: M,
        directives: Directives,
        journal: J,
    ) -> Result<Self, String> {
        let status = journal.load()?.unwrap_or_default();
        let canary = CanaryRef {
            namespace: plan.namespace.clone(),
            name: plan.name.clone(),
            target: plan.target.name.clone(),
        };
        directives
            .ingest()
            .set_reporters(&plan.key(), plan.analysis.reporters.clone());
        Ok(Self {
            plan,
            canary,
            platform,
            metrics,
            directives,
            journal,
            status,
            pending: None,
            confirm_wait: Duration::from_secs(3),
            grace: ReconnectGrace::default(),
            grace_announced: false,
            judge: None,
            last_step: None,
            notifier: None,
        })
    }

    /// Sends the engine's alerts and every event (to the `type: event` hooks) through
    /// `notifier`.
    pub fn with_notifier(mut self, notifier: Notifier) -> Self {
        self.notifier = Some(notifier);
        self
    }

    /// [`Runner::record`] with the status' current phase.
    fn record_now(&mut self, event: &Event) {
        self.record(event, self.status.phase);
    }

    /// Records an event and hands it to the event hooks, with the phase the status has then.
    fn record(&mut self, event: &Event, phase: Option<crate::spec::Phase>) {
        self.journal.event(event);
        if let Some(notifier) = &self.notifier {
            let revision = self.status.last_applied_spec.clone().unwrap_or_default();
            notifier.event(&self.plan, phase, &webhook::checksum(&revision), event);
        }
    }

    /// Sets how long the filters get to reconnect after the controller started.
    pub fn with_reconnect_grace(mut self, grace: ReconnectGrace) -> Self {
        self.grace = grace;
        self
    }

    /// How much longer checks wait for the filters after the controller started; `None` once
    /// they may measure.
    fn reconnect_wait(&self) -> Option<Duration> {
        let ingest = self.directives.ingest();
        let latest = ingest.started_at() + self.grace.max;
        let until = match ingest.first_report(&self.plan.key()) {
            Some(first) => (first + self.grace.settle).min(latest),
            None => latest,
        };
        until.checked_duration_since(Instant::now())
    }

    /// Sets how long a new weight may wait for the filters' confirmation.
    pub fn with_confirm_wait(mut self, wait: Duration) -> Self {
        self.confirm_wait = wait;
        self
    }

    /// The current status.
    pub fn status(&self) -> &CanaryStatus {
        &self.status
    }

    /// The plan.
    pub fn plan(&self) -> &CanaryPlan {
        &self.plan
    }

    /// From the next step on, runs an edited Canary with the metric source built for it. The
    /// caller keeps the canary's identity (namespace, name, target); the status carries over,
    /// as in Kubernetes, where each reconcile reads the Canary as it is then. The route is not
    /// republished here: see [`Runner::restore_route`].
    pub fn replace_plan(&mut self, plan: CanaryPlan, metrics: M) {
        self.directives
            .ingest()
            .set_reporters(&plan.key(), plan.analysis.reporters.clone());
        self.plan = plan;
        self.metrics = metrics;
    }

    /// The platform.
    pub fn platform(&self) -> &P {
        &self.platform
    }

    /// Which canary this runner drives.
    pub fn canary(&self) -> &CanaryRef {
        &self.canary
    }

    /// After a (re)start: publish the route the persisted status calls for, before any step.
    pub async fn restore_route(&mut self) -> Result<(), RunError> {
        let route = analysis::desired_route(&self.plan, &self.status);
        self.publish(route)?;
        self.platform.apply_route(&self.canary, route).await?;
        Ok(())
    }

    /// When the engine next wants to act (it may also act earlier on a retry or a deletion); not
    /// before the filters had their chance to reconnect, looked at again every settle time.
    pub fn next_step_at(&self) -> Timestamp {
        let mut next = analysis::next_step_at(&self.plan, &self.status);
        let judging = self.plan.analysis.judge.is_some()
            && matches!(
                self.status.phase,
                Some(crate::spec::Phase::Progressing | crate::spec::Phase::WaitingPromotion)
            );
        if judging {
            // The judge looks again within a quarter bucket.
            let ingest = self.directives.ingest();
            let wait = until_judge_look(
                ingest.started_at(),
                ingest.config().bucket_width,
                Instant::now(),
            );
            next = next.min(Timestamp::from_system_time(SystemTime::now() + wait));
        }
        match self.reconnect_wait() {
            Some(wait) => next.max(Timestamp::from_system_time(
                SystemTime::now() + wait.min(self.grace.settle),
            )),
            None => next,
        }
    }

    fn publish(&mut self, route: Option<Route>) -> Result<(), RunError> {
        let revision = self.status.last_applied_spec.as_deref().unwrap_or_default();
        let entry = route.map(|r| traffic::directive_entry(&self.plan, r, revision));
        let generation =
            self.directives
                .set(&self.plan.key(), entry)
                .map_err(|e| RunError::Route {
                    canary: self.plan.id(),
                    reason: e.to_string(),
                })?;
        self.pending = Some((generation, Instant::now()));
        Ok(())
    }

    /// What the journal asks for now.
    fn asked(&self) -> Asked {
        Asked {
            retry: self.journal.retry_token(),
            request: self.journal.request(),
            deleting: self.journal.deleting(),
        }
    }

    /// Between the engine's steps, a look of the judge alone: brings its evidence up to date
    /// from the ingest (no platform call, no I/O) and says whether that is all there is to do
    /// now (`true`). `false`: a full [`tick`](Self::tick) is due, because the engine's next step
    /// is, or the operator asked for something, or the judge says Fail, or the last full step
    /// succeeded a bucket ago or more (a full step still comes at least once a bucket while the
    /// judge judges, as before its looks between steps). For an executor whose steps read an API
    /// server: four looks a bucket cost it no more calls than one.
    pub fn only_the_judge_looks(&mut self) -> bool {
        let Some((stepped_at, asked)) = &self.last_step else {
            return false;
        };
        let ingest = self.directives.ingest();
        if stepped_at.elapsed() >= ingest.config().bucket_width || *asked != self.asked() {
            return false;
        }
        let now = Timestamp::from_system_time(SystemTime::now());
        if analysis::next_step_at(&self.plan, &self.status) <= now {
            return false;
        }
        let (Some(judge), Some(since)) = (
            self.plan.analysis.judge,
            analysis::judge_since(&self.plan, &self.status, now),
        ) else {
            return false;
        };
        let evidence = JudgeTracker::update(
            &mut self.judge,
            ingest,
            &self.plan,
            since,
            now,
            Instant::now(),
        );
        analysis::judge::decide(&judge, &evidence).verdict() != analysis::judge::Verdict::Fail
    }

    /// One step: observe, decide, act, persist.
    pub async fn tick(&mut self) -> Result<(), RunError> {
        let asked = self.asked();
        let stepped = self.step().await;
        if stepped.is_ok() {
            self.last_step = Some((Instant::now(), asked));
        }
        stepped
    }

    async fn step(&mut self) -> Result<(), RunError> {
        self.announce_refused_reporters();
        let now = Timestamp::from_system_time(SystemTime::now());
        let revision = self.platform.target_revision(&self.canary).await?;
        let readiness = self.platform.readiness(&self.canary).await;
        let primary_revision = match self.status.phase {
            None => self.platform.primary_revision(&self.canary).await?,
            Some(_) => None,
        };
        let mut obs = Observations {
            primary: as_readiness(readiness.primary),
            canary: as_readiness(readiness.canary),
            retry: self.journal.retry_token(),
            request: self.journal.request(),
            deleting: self.journal.deleting(),
            primary_revision,
            ..Observations::new(revision)
        };
        let step = loop {
            match analysis::step(&self.plan, &self.status, &obs, now) {
                Outcome::Done(step) => break step,
                Outcome::Need(need) => {
                    if let Some(since) = need.judge {
                        obs.judge = Some(JudgeTracker::update(
                            &mut self.judge,
                            self.directives.ingest(),
                            &self.plan,
                            since,
                            now,
                            Instant::now(),
                        ));
                    }
                    if !need.metrics.is_empty() {
                        if let Some(wait) = self.reconnect_wait() {
                            // Nothing performed, nothing saved: the step runs once the filters
                            // reported (its hooks are asked again then).
                            self.announce_reconnect_wait(wait);
                            return Ok(());
                        }
                        // The engine cut each window to what the current step served; it ends
                        // here, after the wait, so it still starts within the step.
                        self.await_confirmation("analysing anyway").await;
                        let at = Instant::now();
                        let mut measurements = Vec::with_capacity(need.metrics.len());
                        for check in &need.metrics {
                            measurements.push(self.metrics.measure(&self.plan, check, at).await);
                        }
                        obs.measurements = Some(measurements);
                    }
                    let checksum = self.checksum(&obs.revision);
                    for call in &need.webhooks {
                        let result = webhook::call(&self.plan, &checksum, call).await;
                        obs.webhooks.insert(call.webhook.name.clone(), result);
                    }
                }
            }
        };
        for effect in &step.effects {
            self.perform(effect, step.status.phase).await?;
        }
        self.status = step.status;
        self.journal
            .save(&self.status)
            .map_err(|reason| RunError::Save {
                canary: self.plan.id(),
                reason,
            })
    }

    /// Flagger's payload checksum, of the revision the status says is under analysis (the
    /// target's current one before the first).
    fn checksum(&self, target_revision: &str) -> String {
        webhook::checksum(
            self.status
                .last_applied_spec
                .as_deref()
                .unwrap_or(target_revision),
        )
    }

    /// One Warning event for each identity whose reports for this canary the ingest refused
    /// since the last step (each identity once per controller life).
    fn announce_refused_reporters(&mut self) {
        for refused in self.directives.ingest().new_refusals(&self.plan.key()) {
            self.record_now(&Event {
                severity: Severity::Warning,
                reason: "Synced".to_owned(),
                message: format!(
                    "Refused reports from {} for {} ({} entries so far): only workloads of the canary's namespace and the ingress gateways may report for it; allow others in spec.analysis.reporters",
                    refused.identity,
                    self.plan.id(),
                    refused.entries
                ),
            });
        }
    }

    fn announce_reconnect_wait(&mut self, wait: Duration) {
        if self.grace_announced {
            return;
        }
        self.grace_announced = true;
        self.record_now(&Event {
            severity: Severity::Normal,
            reason: "Synced".to_owned(),
            message: format!(
                "Waiting up to {} for the filters to report after the controller started, before measuring {}",
                crate::spec::format_go_duration(Duration::from_millis(
                    u64::try_from(wait.as_millis()).unwrap_or(u64::MAX)
                )),
                self.plan.id()
            ),
        });
    }

    /// Waits (boundedly) until every connected filter has applied the latest directive, so a
    /// check does not judge a weight the data plane has not taken yet.
    async fn await_confirmation(&mut self, then: &str) {
        let Some((generation, published)) = self.pending else {
            return;
        };
        let ingest = self.directives.ingest().clone();
        loop {
            let confirmation = ingest.generation_confirmed(generation);
            if confirmation.all() {
                self.pending = None;
                return;
            }
            if published.elapsed() >= self.confirm_wait {
                self.pending = None;
                self.record_now(&Event {
                    severity: Severity::Warning,
                    reason: "Synced".to_owned(),
                    message: format!(
                        "Route for {} confirmed by {} of {} connected filters after {:?}; {then}",
                        self.plan.id(),
                        confirmation.confirmed,
                        confirmation.connected,
                        self.confirm_wait
                    ),
                });
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Performs one effect of a step whose new status has `phase` (the event hooks' phase).
    async fn perform(
        &mut self,
        effect: &Effect,
        phase: Option<crate::spec::Phase>,
    ) -> Result<(), RunError> {
        match effect {
            Effect::InitializePrimary { revision } | Effect::PromotePrimary { revision } => {
                // A promotion names what was analysed: never promote a newer, unanalysed template.
                if self.platform.target_revision(&self.canary).await? == *revision {
                    self.platform.promote_to_primary(&self.canary).await?;
                }
            }
            Effect::ScaleCanary(scale) => {
                if *scale == Scale::Down {
                    // A rollback routes to the primary and stops the canary in one step: stop it
                    // only once every filter has stopped sending to it, or the requests routed
                    // meanwhile meet a closed port.
                    self.await_confirmation("stopping the canary anyway").await;
                }
                self.platform
                    .scale_canary(&self.canary, *scale == Scale::Up)
                    .await?;
            }
            Effect::Route(route) => {
                self.publish(Some(*route))?;
                self.platform
                    .apply_route(&self.canary, Some(*route))
                    .await?;
            }
            Effect::RevertRouting => {
                self.publish(None)?;
                self.platform.apply_route(&self.canary, None).await?;
            }
            Effect::CallWebhook(call) => {
                let revision = self.status.last_applied_spec.clone().unwrap_or_default();
                let outcome = webhook::call(&self.plan, &self.checksum(&revision), call).await;
                let event = called_hook_event(&self.plan, call, &outcome);
                self.record(&event, phase);
            }
            Effect::Event(event) => self.record(event, phase),
            Effect::Alert(alert) => {
                if let Some(notifier) = &self.notifier {
                    notifier.alert(&self.plan, alert);
                }
            }
        }
        Ok(())
    }
}

/// The event for a hook called without waiting for it: Flagger's text for `post-rollout` (the
/// only kind the engine calls this way), a generic one otherwise.
fn called_hook_event(
    plan: &CanaryPlan,
    call: &analysis::WebhookCall,
    outcome: &analysis::WebhookResult,
) -> Event {
    let name = &call.webhook.name;
    let post_rollout = call.webhook.kind == HookKind::PostRollout;
    let (severity, message) = match outcome {
        analysis::WebhookResult::Passed if post_rollout => (
            Severity::Normal,
            format!("Post-rollout check {name} passed"),
        ),
        analysis::WebhookResult::Failed(why) if post_rollout => (
            Severity::Warning,
            format!("Post-rollout hook {name} failed {why}"),
        ),
        analysis::WebhookResult::Passed => (
            Severity::Normal,
            format!(
                "{} hook {name} passed for {}",
                call.webhook.kind.as_str(),
                plan.id()
            ),
        ),
        analysis::WebhookResult::Failed(why) => (
            Severity::Warning,
            format!(
                "{} hook {name} failed for {}: {why}",
                call.webhook.kind.as_str(),
                plan.id()
            ),
        ),
    };
    Event {
        severity,
        reason: "Synced".to_owned(),
        message,
    }
}

fn as_readiness(result: Result<(), String>) -> Readiness {
    match result {
        Ok(()) => Readiness::Ready,
        Err(why) => Readiness::NotReady(why),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::analysis::{WebhookCall, WebhookResult};
    use crate::ingest::{Ingest, IngestConfig};
    use crate::metrics::streamed::StreamedSource;
    use crate::platform::Readiness as Ready;
    use crate::spec::{Phase, Weight};
    use std::sync::{Arc, Mutex};
    use weir_proto::v1::{Report, Reporter, Version, VersionStats};

    #[test]
    fn the_judge_looks_at_every_quarter_bucket() {
        let origin = Instant::now();
        let width = Duration::from_secs(1);
        let at = |millis: u64| origin + Duration::from_millis(millis);
        // (now, wait): the rest of the quarter bucket, plus the delay that makes sure it ended.
        for (now, left) in [
            (0, 250),
            (1, 249),
            (250, 250),
            (260, 240),
            (999, 1),
            (1000, 250),
            (5300, 200),
        ] {
            assert_eq!(
                until_judge_look(origin, width, at(now)),
                Duration::from_millis(left) + JUDGE_LOOK_DELAY,
                "at {now} ms"
            );
        }
        // Looking when it says, the judge looks once in each quarter bucket.
        let quarter = |t: Instant| t.duration_since(origin).as_millis() / 250;
        let mut now = at(130);
        for _ in 0..8 {
            let next = now + until_judge_look(origin, width, now);
            assert_eq!(quarter(next), quarter(now) + 1);
            now = next;
        }
        // Clocks before the ingest's origin (a fresh ingest) wait for the first quarter.
        assert_eq!(
            until_judge_look(at(10), width, origin),
            Duration::from_millis(250) + JUDGE_LOOK_DELAY
        );
    }

    /// A report of `canary` (requests, failures) and `primary` (requests, failures).
    fn judged_report(ingest: &Ingest, sequence: u64, canary: (u64, u64), primary: (u64, u64)) {
        let stats = [(Version::Canary, canary), (Version::Primary, primary)]
            .into_iter()
            .map(|(version, (requests, failures))| {
                let mut latency = weir_proto::LatencyHistogram::new();
                (0..requests).for_each(|_| latency.record(2_000));
                VersionStats {
                    canary: "application/mhs".into(),
                    version: version as i32,
                    requests,
                    failures,
                    latency: Some(latency.encode()),
                }
            })
            .collect();
        let report = Report {
            reporter: Some(Reporter {
                node_id: "envoy-1".into(),
                namespace: "application".into(),
                workload: "gateway".into(),
            }),
            epoch: 7,
            sequence,
            applied_generation: ingest.directive().generation,
            stats,
        };
        ingest.ingest(&report, Instant::now()).unwrap();
    }

    /// A runner mid-rollout at 10% on a Canary with `judge` (its YAML), just stepped (the next
    /// step a minute away), routed since `routed_ago`, on an ingest of `bucket_width` buckets;
    /// with the ingest and the events it records.
    async fn judged_runner(judge: &str, routed_ago: Duration, bucket_width: Duration) -> Restarted {
        let plan = crate::spec::load_yaml(&format!(
            "apiVersion: weir.dev/v1alpha1\nkind: Canary\nmetadata: {{name: mhs, namespace: application}}\nspec:\n  targetRef: {{apiVersion: apps/v1, kind: Deployment, name: mhs}}\n  service: {{port: 80}}\n  analysis:\n    interval: 1m\n    stepWeight: 10\n    maxWeight: 50\n    judge: {judge}\n",
        ))
        .unwrap()
        .plan;
        let now = SystemTime::now();
        let status = CanaryStatus {
            phase: Some(Phase::Progressing),
            canary_weight: Weight::try_new(10).unwrap(),
            last_applied_spec: Some("r2".into()),
            last_promoted_spec: Some("r1".into()),
            last_step_time: Some(Timestamp::from_system_time(now)),
            routed_since: Some(Timestamp::from_system_time(now - routed_ago)),
            ..CanaryStatus::new()
        };
        let config = IngestConfig {
            bucket_width,
            ..IngestConfig::default()
        };
        let grace = ReconnectGrace {
            settle: Duration::ZERO,
            max: Duration::ZERO,
        };
        runner_on(plan, status, config, grace).await
    }

    #[tokio::test]
    async fn between_steps_only_the_judge_looks_until_it_says_fail() {
        let (mut runner, ingest, events) = judged_runner(
            "{confidence: 0.99}",
            Duration::from_secs(5),
            Duration::from_millis(400),
        )
        .await;
        assert!(!runner.only_the_judge_looks(), "a full step comes first");
        runner.tick().await.unwrap();
        assert!(runner.only_the_judge_looks(), "nothing to weigh yet");
        // A healthy canary beside the primary: nothing to act on between the steps.
        judged_report(&ingest, 1, (20, 0), (200, 1));
        assert!(runner.only_the_judge_looks());
        assert_eq!(runner.status().phase, Some(Phase::Progressing));
        // Half the canary's requests fail: the look sees it in the bucket still filling, and
        // the full step it asks for rolls back.
        judged_report(&ingest, 2, (30, 15), (300, 1));
        assert!(!runner.only_the_judge_looks(), "the judge says Fail");
        runner.tick().await.unwrap();
        assert_eq!(runner.status().phase, Some(Phase::Failed));
        let said = events.lock().unwrap();
        let rollback = said
            .iter()
            .find(|e| {
                e.message
                    .starts_with("Rolling back mhs.application: canary failure rate")
            })
            .expect("the rollback says why");
        assert!(
            rollback.message.contains("sequential test, 99% confidence"),
            "{rollback:?}"
        );
        drop(said);
        assert!(
            !runner.only_the_judge_looks(),
            "a failed canary is not judged"
        );
    }

    #[tokio::test]
    async fn a_full_step_comes_at_least_once_a_bucket_while_the_judge_looks() {
        let (mut runner, _ingest, _events) =
            judged_runner("{}", Duration::ZERO, Duration::from_millis(100)).await;
        runner.tick().await.unwrap();
        assert!(runner.only_the_judge_looks());
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert!(
            !runner.only_the_judge_looks(),
            "a bucket since the last full step"
        );
        runner.tick().await.unwrap();
        assert!(runner.only_the_judge_looks());
    }

    /// Both workloads serve; the target is at revision r2.
    struct Serving;

    impl Platform for Serving {
        async fn target_revision(&self, _: &CanaryRef) -> Result<String, PlatformError> {
            Ok("r2".into())
        }
        async fn promote_to_primary(&self, _: &CanaryRef) -> Result<(), PlatformError> {
            Ok(())
        }
        async fn scale_canary(&self, _: &CanaryRef, _: bool) -> Result<(), PlatformError> {
            Ok(())
        }
        async fn readiness(&self, _: &CanaryRef) -> Ready {
            Ready {
                primary: Ok(()),
                canary: Ok(()),
            }
        }
    }

    /// A status in memory and the events recorded.
    struct Memory {
        status: Option<CanaryStatus>,
        events: Arc<Mutex<Vec<Event>>>,
    }

    impl Journal for Memory {
        fn load(&self) -> Result<Option<CanaryStatus>, String> {
            Ok(self.status.clone())
        }
        fn save(&mut self, status: &CanaryStatus) -> Result<(), String> {
            self.status = Some(status.clone());
            Ok(())
        }
        fn event(&mut self, event: &Event) {
            self.events.lock().unwrap().push(event.clone());
        }
        fn retry_token(&self) -> Option<String> {
            None
        }
        fn deleting(&self) -> bool {
            false
        }
    }

    type Restarted = (
        Runner<Serving, StreamedSource, Memory>,
        Ingest,
        Arc<Mutex<Vec<Event>>>,
    );

    /// A controller that just restarted (a fresh ingest) on a status persisted mid-rollout at
    /// 10%, whose next step is long overdue.
    async fn restarted(grace: ReconnectGrace) -> Restarted {
        let plan = crate::spec::load_yaml(
            "apiVersion: weir.dev/v1alpha1\nkind: Canary\nmetadata: {name: mhs, namespace: application}\nspec:\n  targetRef: {apiVersion: apps/v1, kind: Deployment, name: mhs}\n  service: {port: 80}\n  analysis:\n    interval: 1m\n    stepWeight: 10\n    maxWeight: 50\n    metrics: [{name: request-success-rate, interval: 1m, thresholdRange: {min: 99}}]\n",
        )
        .unwrap()
        .plan;
        let long_ago = Timestamp::from_system_time(SystemTime::now() - Duration::from_secs(600));
        let status = CanaryStatus {
            phase: Some(Phase::Progressing),
            canary_weight: Weight::try_new(10).unwrap(),
            last_applied_spec: Some("r2".into()),
            last_promoted_spec: Some("r1".into()),
            last_step_time: Some(long_ago),
            routed_since: Some(long_ago),
            ..CanaryStatus::new()
        };
        runner_on(plan, status, IngestConfig::default(), grace).await
    }

    /// A runner of `plan` resumed from `status` on a fresh ingest of `config`, its route
    /// restored; with the ingest and the events it records.
    async fn runner_on(
        plan: CanaryPlan,
        status: CanaryStatus,
        config: IngestConfig,
        grace: ReconnectGrace,
    ) -> Restarted {
        let ingest = Ingest::try_new(config).unwrap();
        let events = Arc::new(Mutex::new(Vec::new()));
        let journal = Memory {
            status: Some(status),
            events: events.clone(),
        };
        let mut runner = Runner::new(
            plan,
            Serving,
            StreamedSource::new(ingest.clone()),
            Directives::new(ingest.clone()),
            journal,
        )
        .unwrap()
        .with_reconnect_grace(grace);
        runner.restore_route().await.unwrap();
        (runner, ingest, events)
    }

    /// A filter's report of 100 canary requests, none failed.
    fn report(ingest: &Ingest) {
        let mut latency = weir_proto::LatencyHistogram::new();
        (0..100).for_each(|_| latency.record(2_000));
        let report = Report {
            reporter: Some(Reporter {
                node_id: "envoy-1".into(),
                namespace: "application".into(),
                workload: "gateway".into(),
            }),
            epoch: 7,
            sequence: 1,
            applied_generation: ingest.directive().generation,
            stats: vec![VersionStats {
                canary: "application/mhs".into(),
                version: Version::Canary as i32,
                requests: 100,
                failures: 0,
                latency: Some(latency.encode()),
            }],
        };
        ingest.ingest(&report, Instant::now()).unwrap();
    }

    #[tokio::test]
    async fn an_overdue_step_after_a_restart_waits_for_the_filters_instead_of_judging_an_empty_window(
    ) {
        let grace = ReconnectGrace {
            settle: Duration::ZERO,
            max: Duration::from_secs(3600),
        };
        let (mut runner, ingest, events) = restarted(grace).await;
        let before = runner.status().clone();
        runner.tick().await.unwrap();
        assert_eq!(
            runner.status(),
            &before,
            "nothing decided before a filter reported"
        );
        let said: Vec<String> = events
            .lock()
            .unwrap()
            .iter()
            .map(|e| e.message.clone())
            .collect();
        assert_eq!(said.len(), 1, "{said:?}");
        assert!(
            said[0].starts_with("Waiting up to ")
                && said[0].ends_with(
                    " for the filters to report after the controller started, before measuring mhs.application"
                ),
            "{said:?}"
        );
        runner.tick().await.unwrap();
        assert_eq!(events.lock().unwrap().len(), 1, "said once");

        // The filter reconnects and reports what it served meanwhile.
        report(&ingest);
        runner.tick().await.unwrap();
        let status = runner.status();
        assert_eq!(status.canary_weight, Weight::try_new(20).unwrap());
        assert_eq!(status.inconclusive_checks, 0);
        let checks = &status.decisions.last().unwrap().checks;
        assert_eq!(checks[0].sample_count, Some(100));
    }

    #[tokio::test]
    async fn without_any_report_the_wait_for_the_filters_ends_at_its_limit() {
        let grace = ReconnectGrace {
            settle: Duration::from_secs(3600),
            max: Duration::ZERO,
        };
        let (mut runner, _ingest, _events) = restarted(grace).await;
        runner.tick().await.unwrap();
        // Measured at once: an empty window halts as Inconclusive (which the grace avoids).
        let status = runner.status();
        assert_eq!(
            (status.canary_weight, status.inconclusive_checks),
            (Weight::try_new(10).unwrap(), 1)
        );
    }

    #[test]
    fn post_rollout_hook_outcomes_are_recorded_in_flaggers_words() {
        let plan = crate::spec::load_yaml(
            "apiVersion: weir.dev/v1alpha1\nkind: Canary\nmetadata: {name: mhs, namespace: application}\nspec:\n  targetRef: {apiVersion: apps/v1, kind: Deployment, name: mhs}\n  service: {port: 80}\n  analysis:\n    stepWeight: 10\n    webhooks: [{name: notify, type: post-rollout, url: 'http://notify/'}]\n",
        )
        .unwrap()
        .plan;
        let call = WebhookCall {
            webhook: plan.analysis.webhooks[0].clone(),
            phase: Phase::Succeeded,
        };
        let passed = called_hook_event(&plan, &call, &WebhookResult::Passed);
        assert_eq!(
            (passed.severity, passed.message.as_str()),
            (Severity::Normal, "Post-rollout check notify passed")
        );
        let failed = called_hook_event(&plan, &call, &WebhookResult::Failed("503".into()));
        assert_eq!(
            (failed.severity, failed.message.as_str()),
            (Severity::Warning, "Post-rollout hook notify failed 503")
        );
    }
}
