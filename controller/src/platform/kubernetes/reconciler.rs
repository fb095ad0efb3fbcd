//! The reconciler: kube-runtime's controller over Canaries (and the Deployments they target),
//! driving one [`Runner`] per Canary.
//!
//! A reconcile: put the finalizer on; compile the spec (an invalid one is reported once per
//! generation as a Warning event, and as a `Valid=False` status condition until it is fixed);
//! find the Canary's runner, or build one resuming from the status (a spec change rebuilds it
//! from the last status written); refresh what the journal reads (retry annotation,
//! deletion); on a new runner, publish the route the status calls for; one runner step; check
//! the routing mode; bring the primary's autoscaler copy up to date; write events and status;
//! after a deletion has been reverted, drop the finalizer. Every path returns an explicit
//! requeue: the engine's next step time (see [`Context::requeue_after`]), sooner while the
//! routing mode is unsettled or a deletion waits for the restored target.
//!
//! Runners live in memory between reconciles because the runner's status is ahead of the
//! reflector's copy of the Canary until the watch delivers Weir's own status write; a runner
//! built from a stale copy would repeat a step.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::json;

use crate::analysis::{self, Event, Severity};
use crate::metrics::MetricSource;
use crate::platform::PlatformError;
use crate::runner::{RunError, Runner};
use crate::spec::{CanaryPlan, CanaryStatus, Phase, Timestamp};
use crate::traffic::Directives;

use super::crd::CanaryResource;
use super::journal::{self, FlushError, KubernetesJournal, Outbox, View};
use super::{KubernetesPlatform, Settings, FINALIZER};

/// Requeue of a Canary with nothing scheduled (deleted, or its spec invalid).
const IDLE_REQUEUE: Duration = Duration::from_secs(300);
/// Requeue after a failed reconcile.
const ERROR_REQUEUE: Duration = Duration::from_secs(10);
/// Requeue while the routing mode may change, or a deletion waits for the restored target.
const UNSETTLED_REQUEUE: Duration = Duration::from_secs(5);
/// Shortest requeue, so a step due "now" does not spin.
const MIN_REQUEUE: Duration = Duration::from_millis(200);

/// Why a reconcile failed; the error policy requeues it.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// A call to the API server failed.
    #[error("{action} for canary {canary}: {source}")]
    Kube {
        /// What was attempted.
        action: &'static str,
        /// `namespace/name`.
        canary: String,
        /// The API error.
        source: kube::Error,
    },
    /// The runner's step failed (its status was not saved; the step is retried).
    #[error(transparent)]
    Step(#[from] RunError),
    /// The platform failed outside a step (routing mode, release on deletion).
    #[error(transparent)]
    Platform(#[from] PlatformError),
    /// Events or status could not be written.
    #[error(transparent)]
    Flush(#[from] FlushError),
    /// The Canary has no uid (not read from the API server).
    #[error("canary {0} has no metadata.uid; it must be read from the API server")]
    NoUid(String),
}

/// Counters for the metrics endpoint.
#[derive(Debug, Default)]
pub struct Stats {
    /// Reconciles run.
    pub reconciles: AtomicU64,
    /// Reconciles that failed.
    pub failures: AtomicU64,
}

struct Entry<M> {
    runner: Runner<KubernetesPlatform, M, KubernetesJournal>,
    view: Arc<Mutex<View>>,
    outbox: Outbox,
    restored: bool,
}

type Shared<M> = Arc<tokio::sync::Mutex<Entry<M>>>;

/// A runner and what identifies it, readable without waiting for a step in progress.
struct Slot<M> {
    uid: String,
    generation: Option<i64>,
    view: Arc<Mutex<View>>,
    outbox: Outbox,
    entry: Shared<M>,
}

/// What every reconcile shares.
pub struct Context<M> {
    client: Client,
    settings: Arc<Settings>,
    directives: Directives,
    metrics: M,
    confirm_wait: Duration,
    entries: Mutex<HashMap<String, Slot<M>>>,
    /// Where events go (and their series).
    recorder: journal::Recorder,
    /// `(uid, generation)` whose validation problems were already reported, per Canary key.
    announced: Mutex<HashMap<String, (String, Option<i64>)>>,
    /// Where alerts and event-hook deliveries go.
    notifier: crate::notify::Notifier,
    /// Counters.
    pub stats: Stats,
    /// Each stepped canary's plan and next step, for its live numbers (`/live/...`).
    live: Mutex<HashMap<String, (CanaryPlan, Timestamp)>>,
    /// The canary series of `/metrics` (Flagger's under Weir's prefix, and the streamed ones).
    exporter: crate::exporter::Recorder,
}

impl<M: MetricSource + Clone + 'static> Context<M> {
    /// A context for reconciles through `client`, publishing routes on `directives` and measuring
    /// with `metrics`.
    pub fn new(client: Client, settings: Settings, directives: Directives, metrics: M) -> Self {
        let recorder = journal::Recorder {
            client: client.clone(),
            instance: settings.instance.clone(),
            series: journal::EventSeriesCache::default(),
        };
        let notifier = crate::notify::Notifier::start(
            Arc::new(super::alerts::ClusterProviders::new(client.clone())),
            crate::http::shared().clone(),
        );
        let exporter = crate::exporter::Recorder::new();
        exporter.include_ingest(directives.ingest().clone());
        Self {
            exporter,
            notifier,
            client,
            recorder,
            settings: Arc::new(settings),
            directives,
            metrics,
            confirm_wait: Duration::from_secs(3),
            entries: Mutex::default(),
            announced: Mutex::default(),
            stats: Stats::default(),
            live: Mutex::default(),
        }
    }

    /// How long a new weight may wait for the filters' confirmation before a check.
    pub fn with_confirm_wait(mut self, wait: Duration) -> Self {
        self.confirm_wait = wait;
        self
    }

    /// The directives this controller publishes.
    pub fn directives(&self) -> &Directives {
        &self.directives
    }

    /// Canaries with a runner (`None` while a reconcile holds the table).
    pub fn canaries_now(&self) -> Option<usize> {
        self.entries.try_lock().ok().map(|e| e.len())
    }

    fn slots(&self) -> std::sync::MutexGuard<'_, HashMap<String, Slot<M>>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The live numbers of the canary `namespace/name`, if this controller steps it.
    pub fn live_snapshot(&self, namespace: &str, name: &str) -> Option<crate::live::LiveSnapshot> {
        let key = format!("{namespace}/{name}");
        let (plan, next) = self
            .live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
            .cloned()?;
        let now = Timestamp::from_system_time(std::time::SystemTime::now());
        Some(crate::live::LiveSnapshot::take(
            &plan,
            self.directives.ingest(),
            next,
            now,
        ))
    }

    /// The canary series of `/metrics`, with the ingest's per-version numbers.
    pub fn exporter(&self) -> &crate::exporter::Recorder {
        &self.exporter
    }

    fn forget(&self, key: &str) {
        self.exporter.forget_key(key);
        self.live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key);
        self.slots().remove(key);
        self.announced
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key);
    }

    /// The status as this controller knows it: the runner's (ahead of the reflector's copy),
    /// else the Canary's.
    fn current_status(&self, key: &str, canary: &CanaryResource) -> Option<CanaryStatus> {
        let uid = canary.uid().unwrap_or_default();
        match self.slots().get(key) {
            Some(slot) if slot.uid == uid => slot
                .view
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .status
                .clone(),
            _ => canary.status.clone(),
        }
    }

    /// Reports validation problems of this uid and generation once.
    fn first_announcement(&self, key: &str, canary: &CanaryResource) -> bool {
        let id = (canary.uid().unwrap_or_default(), canary.metadata.generation);
        let mut announced = self.announced.lock().unwrap_or_else(|p| p.into_inner());
        if announced.get(key) == Some(&id) {
            return false;
        }
        announced.insert(key.to_owned(), id);
        true
    }

    /// The runner for `canary`, built on first sight and rebuilt when its spec changed.
    async fn entry(
        &self,
        key: &str,
        canary: &CanaryResource,
        plan: CanaryPlan,
    ) -> Result<Shared<M>, ReconcileError> {
        let uid = canary
            .uid()
            .ok_or_else(|| ReconcileError::NoUid(key.to_owned()))?;
        let generation = canary.metadata.generation;
        let mut status = canary.status.clone();
        let mut outbox = Outbox::default();
        outbox.assume_written(status.clone());
        // The spec is valid now (this is only called then): the runner resumes without the
        // invalid-spec condition, and its next write removes it.
        status = status.map(|s| journal::with_validity(s, None, Timestamp::EPOCH));
        if let Some(slot) = self.slots().get(key) {
            if slot.uid == uid && slot.generation == generation {
                return Ok(slot.entry.clone());
            }
            if slot.uid == uid {
                // The runner's status is newer than the reflector's copy; keep it, and whatever
                // is still to be written.
                status = slot
                    .view
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .status
                    .clone();
                outbox = slot.outbox.clone();
            }
        }
        let owner = canary
            .controller_owner_ref(&())
            .ok_or_else(|| ReconcileError::NoUid(key.to_owned()))?;
        let view = Arc::new(Mutex::new(View {
            status,
            ..View::default()
        }));
        let platform = KubernetesPlatform::new(
            self.client.clone(),
            plan.clone(),
            owner,
            self.settings.clone(),
            self.directives.ingest().clone(),
            outbox.clone(),
        );
        let journal = KubernetesJournal::new(view.clone(), outbox.clone());
        let runner = Runner::new(
            plan,
            platform,
            self.metrics.clone(),
            self.directives.clone(),
            journal,
        )
        .map_err(|reason| {
            ReconcileError::Step(RunError::Save {
                canary: key.to_owned(),
                reason,
            })
        })?
        .with_confirm_wait(self.confirm_wait)
        .with_notifier(self.notifier.clone());
        let entry = Arc::new(tokio::sync::Mutex::new(Entry {
            runner,
            view: view.clone(),
            outbox: outbox.clone(),
            restored: false,
        }));
        self.slots().insert(
            key.to_owned(),
            Slot {
                uid,
                generation,
                view,
                outbox,
                entry: entry.clone(),
            },
        );
        Ok(entry)
    }

    /// When to look at a Canary again: at the engine's next step, capped at the analysis
    /// interval, and within [`UNSETTLED_REQUEUE`] while the routing mode may still change.
    fn requeue_after(&self, runner: &Runner<KubernetesPlatform, M, KubernetesJournal>) -> Duration {
        let now = Timestamp::from_system_time(SystemTime::now());
        let next = runner.next_step_at();
        let mut wait = if next > now {
            next.since(now)
        } else {
            Duration::ZERO
        };
        wait = wait.min(runner.plan().analysis.interval);
        // A deletion waits for the restored target, not for the interval (a change of the
        // target's Deployment also reconciles at once; this is the backstop).
        let terminating = runner.status().phase == Some(Phase::Terminating);
        if terminating || runner.platform().routing_unsettled() {
            wait = wait.min(UNSETTLED_REQUEUE);
        }
        wait.max(MIN_REQUEUE)
    }
}

fn kube_error(action: &'static str, canary: &str) -> impl FnOnce(kube::Error) -> ReconcileError {
    let canary = canary.to_owned();
    move |source| ReconcileError::Kube {
        action,
        canary,
        source,
    }
}

/// Adds (`true`) or removes Weir's finalizer. The patch carries the resourceVersion it was
/// computed from, so it never drops a finalizer someone else added meanwhile (409 instead).
async fn set_finalizer(
    api: &Api<CanaryResource>,
    canary: &CanaryResource,
    present: bool,
) -> Result<CanaryResource, kube::Error> {
    let mut finalizers: Vec<String> = canary
        .finalizers()
        .iter()
        .filter(|f| *f != FINALIZER)
        .cloned()
        .collect();
    if present {
        finalizers.push(FINALIZER.to_owned());
    }
    let patch = json!({
        "metadata": {"finalizers": finalizers, "resourceVersion": canary.resource_version()},
    });
    api.patch(
        &canary.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )
    .await
}

fn warning(message: String) -> Event {
    Event {
        severity: Severity::Warning,
        reason: "Synced".to_owned(),
        message,
    }
}

/// One reconcile of one Canary (see the module documentation).
pub async fn reconcile<M: MetricSource + Clone + 'static>(
    canary: Arc<CanaryResource>,
    ctx: Arc<Context<M>>,
) -> Result<Action, ReconcileError> {
    ctx.stats.reconciles.fetch_add(1, Ordering::Relaxed);
    let namespace = canary.namespace().unwrap_or_default();
    let name = canary.name_any();
    let key = format!("{namespace}/{name}");
    let api: Api<CanaryResource> = Api::namespaced(ctx.client.clone(), &namespace);
    let deleting = canary.metadata.deletion_timestamp.is_some();
    let has_finalizer = canary.finalizers().iter().any(|f| f == FINALIZER);
    if deleting && !has_finalizer {
        ctx.forget(&key);
        return Ok(Action::requeue(IDLE_REQUEUE));
    }
    let canary = if has_finalizer {
        canary
    } else {
        Arc::new(
            set_finalizer(&api, &canary, true)
                .await
                .map_err(kube_error("adding the finalizer", &key))?,
        )
    };

    let compiled = match canary.to_spec_canary().compile() {
        Ok(compiled) => compiled,
        Err(errors) => {
            if deleting {
                // Nothing can be reverted without a valid spec; let the deletion finish.
                set_finalizer(&api, &canary, false)
                    .await
                    .map_err(kube_error("removing the finalizer", &key))?;
                ctx.forget(&key);
                return Ok(Action::requeue(IDLE_REQUEUE));
            }
            // `errors` says "Canary <name> is invalid (n problems):" and lists them.
            let problems = format!(
                "{errors}\nWeir does not act on it until it is fixed; traffic stays as it is."
            );
            let outbox = Outbox::default();
            if ctx.first_announcement(&key, &canary) {
                outbox.event(warning(problems.clone()));
            }
            // The problems go into the status too, as a condition: `kubectl describe` shows it
            // after the event has expired. The rest of the status is the runner's, if any.
            let mut current =
                journal::for_api(&ctx.current_status(&key, &canary).unwrap_or_default());
            // The condition as written before: kept (with its times) while the problems stay.
            current
                .conditions
                .retain(|c| c.kind != journal::VALID_CONDITION);
            current.conditions.extend(
                canary
                    .status
                    .iter()
                    .flat_map(|s| &s.conditions)
                    .filter(|c| c.kind == journal::VALID_CONDITION)
                    .cloned(),
            );
            let now = Timestamp::from_system_time(SystemTime::now());
            let wanted = journal::with_validity(current, Some(&problems), now);
            if canary.status.as_ref() != Some(&wanted) {
                outbox.assume_written(canary.status.clone());
                outbox.queue_status(wanted);
            }
            journal::flush(&ctx.recorder, &canary, &outbox).await?;
            return Ok(Action::requeue(IDLE_REQUEUE));
        }
    };
    let mut plan = compiled.plan;
    // The routing value only the API knows: a client without the filter cannot pick the canary.
    plan.canary_route_value =
        crate::traffic::route_secret(canary.metadata.uid.as_deref().unwrap_or(&key).as_bytes());
    let announce_warnings = !compiled.warnings.is_empty() && ctx.first_announcement(&key, &canary);

    let shared = ctx.entry(&key, &canary, plan.clone()).await?;
    let mut entry = shared.lock().await;
    let was_invalid = canary.status.as_ref().is_some_and(|s| {
        s.conditions
            .iter()
            .any(|c| c.kind == journal::VALID_CONDITION)
    });
    if was_invalid {
        // Fixed: write the runner's status, which has no invalid-spec condition.
        entry
            .outbox
            .queue_status(journal::for_api(entry.runner.status()));
    }
    {
        let mut view = entry.view.lock().unwrap_or_else(|p| p.into_inner());
        view.retry = canary.to_spec_canary().retry_token().map(str::to_owned);
        view.request = canary.operator_request();
        view.deleting = deleting;
    }
    if announce_warnings {
        let list: Vec<String> = compiled.warnings.iter().map(ToString::to_string).collect();
        entry.outbox.event(warning(format!(
            "Canary {} has settings Weir accepts without effect: {}",
            plan.id(),
            list.join("; ")
        )));
    }
    // The Canary as last written: a status write changes its resourceVersion, which the
    // finalizer patch must carry.
    let mut latest = canary.clone();
    // A status an earlier reconcile could not write goes first: its effects were performed.
    if entry.outbox.has_status() {
        if let Some(written) = journal::flush(&ctx.recorder, &latest, &entry.outbox).await? {
            latest = Arc::new(written);
        }
    }

    if entry.restored && !was_invalid && !announce_warnings && entry.runner.only_the_judge_looks() {
        // A look of the judge between steps found nothing to act on: no API call.
        ctx.live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(plan.key(), (plan.clone(), entry.runner.next_step_at()));
        return Ok(Action::requeue(ctx.requeue_after(&entry.runner)));
    }
    let mut stepped: Result<(), ReconcileError> = Ok(());
    if !entry.restored {
        stepped = entry.runner.restore_route().await.map_err(Into::into);
        entry.restored = stepped.is_ok();
    }
    if stepped.is_ok() {
        let started = std::time::Instant::now();
        stepped = entry.runner.tick().await.map_err(Into::into);
        ctx.exporter
            .record(&plan, entry.runner.status(), started.elapsed());
        ctx.live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(plan.key(), (plan.clone(), entry.runner.next_step_at()));
    }
    if stepped.is_ok() {
        let route = analysis::desired_route(&plan, entry.runner.status());
        stepped = entry
            .runner
            .platform()
            .sync_routing(route)
            .await
            .map_err(Into::into);
    }
    let phase = entry.runner.status().phase;
    let initialized = !matches!(
        phase,
        None | Some(Phase::Initializing | Phase::Terminating | Phase::Terminated)
    );
    if stepped.is_ok() && initialized && !deleting {
        // An edit of the target's autoscaler reaches the primary's copy (no watch on
        // autoscalers: within an analysis interval). Last, so that a missing autoscaler
        // (reported) does not hold back the routing.
        stepped = entry
            .runner
            .platform()
            .sync_autoscaler()
            .await
            .map_err(Into::into);
    }
    let target_gone = matches!(
        &stepped,
        Err(ReconcileError::Step(RunError::Platform(
            PlatformError::TargetNotFound { .. }
        )))
    );
    if let Err(e) = &stepped {
        if !(deleting && target_gone) {
            entry.outbox.event(warning(e.to_string()));
        }
    }
    if let Some(written) = journal::flush(&ctx.recorder, &latest, &entry.outbox).await? {
        latest = Arc::new(written);
    }

    let terminated = entry.runner.status().phase == Some(Phase::Terminated);
    if deleting && (terminated || target_gone) {
        // With the target gone there is nothing to give traffic back to: the app is being
        // deleted, and the generated objects go with the Canary.
        if !plan.revert_on_deletion && !target_gone {
            entry.runner.platform().orphan().await?;
        }
        ctx.directives.set(&plan.key(), None).map_err(|e| {
            ReconcileError::Step(RunError::Route {
                canary: plan.id(),
                reason: e.to_string(),
            })
        })?;
        set_finalizer(&api, &latest, false)
            .await
            .map_err(kube_error("removing the finalizer", &key))?;
        drop(entry);
        ctx.forget(&key);
        return Ok(Action::requeue(IDLE_REQUEUE));
    }
    stepped?;
    Ok(Action::requeue(ctx.requeue_after(&entry.runner)))
}

/// After a failed reconcile: log, count, and try again shortly.
pub fn error_policy<M>(
    canary: Arc<CanaryResource>,
    error: &ReconcileError,
    ctx: Arc<Context<M>>,
) -> Action {
    ctx.stats.failures.fetch_add(1, Ordering::Relaxed);
    tracing::warn!(canary = %canary.name_any(), namespace = ?canary.namespace(), %error, "reconcile failed");
    Action::requeue(ERROR_REQUEUE)
}

/// The names of the Deployments a Canary reads: its target and its primary.
fn watched_deployments(canary: &CanaryResource) -> Option<(String, String)> {
    let target = canary.spec.target_ref.as_ref()?.name.clone()?;
    let primary = format!("{target}{}", super::deployments::PRIMARY_SUFFIX);
    Some((target, primary))
}

/// Runs the controller for Canaries in `namespace` (all namespaces when `None`) until
/// `shutdown` completes. A change to a target or primary Deployment reconciles its Canaries.
pub async fn run_controller<M: MetricSource + Clone + 'static>(
    client: Client,
    namespace: Option<String>,
    ctx: Arc<Context<M>>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let (canaries, deployments): (Api<CanaryResource>, Api<Deployment>) = match &namespace {
        Some(ns) => (
            Api::namespaced(client.clone(), ns),
            Api::namespaced(client, ns),
        ),
        None => (Api::all(client.clone()), Api::all(client)),
    };
    let controller = Controller::new(canaries, watcher::Config::default().any_semantic());
    let store = controller.store();
    controller
        .watches(
            deployments,
            watcher::Config::default().any_semantic(),
            move |d: Deployment| {
                let name = d.name_any();
                let namespace = d.namespace();
                store
                    .state()
                    .into_iter()
                    .filter(|c| c.namespace() == namespace)
                    .filter(|c| watched_deployments(c).is_some_and(|(t, p)| t == name || p == name))
                    .map(|c| ObjectRef::from_obj(&*c))
                    .collect::<Vec<_>>()
            },
        )
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            match result {
                Ok((object, action)) => tracing::debug!(%object, ?action, "reconciled"),
                Err(e) => tracing::warn!(error = %e, "controller"),
            }
        })
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_canary_watches_its_target_and_primary_deployments() {
        let canary: CanaryResource = serde_json::from_value(json!({
            "apiVersion": "weir.dev/v1alpha1", "kind": "Canary",
            "metadata": {"name": "mhs", "namespace": "application"},
            "spec": {"targetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "mhs"}}
        }))
        .unwrap();
        assert_eq!(
            watched_deployments(&canary),
            Some(("mhs".to_owned(), "mhs-primary".to_owned()))
        );
    }
}
