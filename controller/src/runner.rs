//! The executor: runs one canary's loop. It observes the world (platform, metric source,
//! webhooks), asks the pure engine for the next step, performs the step's effects, then persists
//! the status. Every decision is the engine's; everything here is I/O.

use std::time::{Duration, Instant, SystemTime};

use crate::analysis::{
    self, Effect, Event, Observations, Outcome, Readiness, Route, Scale, Severity,
};
use crate::metrics::MetricSource;
use crate::platform::{CanaryRef, Platform, PlatformError};
use crate::spec::{CanaryPlan, CanaryStatus, Timestamp};
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
        })
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

    /// When the engine next wants to act (it may also act earlier on a retry or a deletion).
    pub fn next_step_at(&self) -> Timestamp {
        analysis::next_step_at(&self.plan, &self.status)
    }

    fn publish(&mut self, route: Option<Route>) -> Result<(), RunError> {
        let entry = route.map(|r| traffic::canary_route(&self.plan, r));
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

    /// One step: observe, decide, act, persist.
    pub async fn tick(&mut self) -> Result<(), RunError> {
        let now = Timestamp::from_system_time(SystemTime::now());
        let revision = self.platform.target_revision(&self.canary).await?;
        let readiness = self.platform.readiness(&self.canary).await;
        let mut obs = Observations {
            primary: as_readiness(readiness.primary),
            canary: as_readiness(readiness.canary),
            retry: self.journal.retry_token(),
            deleting: self.journal.deleting(),
            ..Observations::new(revision)
        };
        let step = loop {
            match analysis::step(&self.plan, &self.status, &obs, now) {
                Outcome::Done(step) => break step,
                Outcome::Need(need) => {
                    if !need.metrics.is_empty() {
                        self.await_confirmation("analysing anyway").await;
                        let at = Instant::now();
                        let mut measurements = Vec::with_capacity(need.metrics.len());
                        for check in &need.metrics {
                            measurements.push(self.metrics.measure(&self.plan, check, at).await);
                        }
                        obs.measurements = Some(measurements);
                    }
                    for call in &need.webhooks {
                        let result = webhook::call(&self.plan, call).await;
                        obs.webhooks.insert(call.webhook.name.clone(), result);
                    }
                }
            }
        };
        for effect in &step.effects {
            self.perform(effect).await?;
        }
        self.status = step.status;
        self.journal
            .save(&self.status)
            .map_err(|reason| RunError::Save {
                canary: self.plan.id(),
                reason,
            })
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
                self.journal.event(&Event {
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

    async fn perform(&mut self, effect: &Effect) -> Result<(), RunError> {
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
                let outcome = webhook::call(&self.plan, call).await;
                let (severity, message) = match outcome {
                    analysis::WebhookResult::Passed => (
                        Severity::Normal,
                        format!(
                            "{} hook {} passed for {}",
                            hook_kind(call),
                            call.webhook.name,
                            self.plan.id()
                        ),
                    ),
                    analysis::WebhookResult::Failed(why) => (
                        Severity::Warning,
                        format!(
                            "{} hook {} failed for {}: {why}",
                            hook_kind(call),
                            call.webhook.name,
                            self.plan.id()
                        ),
                    ),
                };
                self.journal.event(&Event {
                    severity,
                    reason: "Synced".to_owned(),
                    message,
                });
            }
            Effect::Event(event) => self.journal.event(event),
        }
        Ok(())
    }
}

fn hook_kind(call: &analysis::WebhookCall) -> String {
    format!("{:?}", call.webhook.kind)
}

fn as_readiness(result: Result<(), String>) -> Readiness {
    match result {
        Ok(()) => Readiness::Ready,
        Err(why) => Readiness::NotReady(why),
    }
}
