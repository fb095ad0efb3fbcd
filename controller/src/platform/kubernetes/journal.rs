//! The Kubernetes journal: the Canary's status subresource and Kubernetes Events.
//!
//! [`Journal`] is synchronous (the runner calls it between effects), so the journal only
//! collects: `save` keeps the status to write and `event` queues the event in an [`Outbox`].
//! The reconciler then writes both with [`flush`]: events first (one `events.k8s.io/v1` Event
//! each, reason `Synced` and Flagger's message, the engine's reason as the action, so
//! `kubectl describe canary/<name>` reads like Flagger's), then the status with server-side
//! apply. A status that could not be written stays in the outbox and is written before the next
//! step: the effects it follows were performed, so it is the truth.
//!
//! An event that repeats (the same note, type and action about the same Canary, within
//! [`SERIES_WINDOW`] of its last occurrence: a halt at every interval, say) does not create a
//! new Event: it joins the first one's series, as client-go's event recorder does
//! (`series.count`, `series.lastObservedTime`; `kubectl describe` shows "x150 over 30m").
//!
//! The status written is the engine's plus what Kubernetes readers want from it
//! ([`for_api`]): a `Halted` condition that names why the rollout does not advance, shown by
//! `kubectl get canary`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::{Event as K8sEvent, EventSeries};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};

use crate::analysis::{Event, Severity};
use crate::runner::Journal;
use crate::spec::{CanaryStatus, Condition, Phase};

use super::crd::CanaryResource;
use super::FIELD_MANAGER;

/// How long after its last occurrence an event can still join its series. Longer than
/// client-go's 6 minutes, so a halt repeated at a 10-minute analysis interval aggregates too;
/// shorter than the API server's default event TTL (1 hour), so the Event usually still exists
/// (if not, a new one starts the series again).
pub const SERIES_WINDOW: Duration = Duration::from_secs(30 * 60);

/// What makes two events the same occurrence, repeated.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct SeriesKey {
    namespace: String,
    canary_uid: String,
    kind: &'static str,
    action: String,
    note: String,
}

#[derive(Debug, Clone)]
struct SeriesEntry {
    event: String,
    count: i32,
    last: Instant,
}

/// The events written recently, so a repeated one joins its series. Shared by every Canary of
/// a controller; entries older than [`SERIES_WINDOW`] are dropped as new ones are added.
#[derive(Debug, Clone, Default)]
pub struct EventSeriesCache(Arc<Mutex<HashMap<SeriesKey, SeriesEntry>>>);

impl EventSeriesCache {
    fn lock(&self) -> MutexGuard<'_, HashMap<SeriesKey, SeriesEntry>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The series `key` continues at `now` (its Event's name and the new count), if any.
    fn continues(&self, key: &SeriesKey, now: Instant) -> Option<(String, i32)> {
        let mut map = self.lock();
        let entry = map.get_mut(key)?;
        if now.saturating_duration_since(entry.last) > SERIES_WINDOW {
            map.remove(key);
            return None;
        }
        entry.count = entry.count.saturating_add(1);
        entry.last = now;
        Some((entry.event.clone(), entry.count))
    }

    fn start(&self, key: SeriesKey, event: String, now: Instant) {
        let mut map = self.lock();
        map.retain(|_, e| now.saturating_duration_since(e.last) <= SERIES_WINDOW);
        map.insert(
            key,
            SeriesEntry {
                event,
                count: 1,
                last: now,
            },
        );
    }

    /// Series being tracked (for tests and metrics).
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no series is tracked.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }
}

/// The status condition that names why the rollout does not advance: present while the last
/// decision of a rollout under way halted it (the engine's `Halt` and `Waiting` warnings).
pub const HALTED_CONDITION: &str = "Halted";

/// The status as the API server gets it: the engine's, with the [`HALTED_CONDITION`] set
/// from the last decision (or removed). Idempotent.
pub fn for_api(status: &CanaryStatus) -> CanaryStatus {
    let mut status = status.clone();
    let previous = status
        .conditions
        .iter()
        .find(|c| c.kind == HALTED_CONDITION)
        .cloned();
    status.conditions.retain(|c| c.kind != HALTED_CONDITION);
    let under_way = matches!(
        status.phase,
        Some(
            Phase::Initializing
                | Phase::Waiting
                | Phase::Progressing
                | Phase::WaitingPromotion
                | Phase::Promoting
                | Phase::Finalising
        )
    );
    let halt = status
        .decisions
        .last()
        .filter(|_| under_way)
        .and_then(|decision| {
            decision
                .events
                .iter()
                .rev()
                .find(|e| {
                    e.severity == Severity::Warning
                        && matches!(e.reason.as_str(), "Halt" | "Waiting")
                })
                .map(|e| (decision.time, e.clone()))
        });
    if let Some((time, event)) = halt {
        let since = previous
            .filter(|c| c.message == event.message)
            .and_then(|c| c.last_transition_time)
            .unwrap_or(time);
        status.conditions.push(Condition {
            kind: HALTED_CONDITION.to_owned(),
            status: "True".to_owned(),
            last_update_time: Some(time),
            last_transition_time: Some(since),
            reason: event.reason,
            message: event.message,
        });
    }
    status
}

/// The status condition that says the Canary's spec is invalid (`status: "False"`), with
/// the problems as its message; absent while the spec is valid.
pub const VALID_CONDITION: &str = "Valid";

/// `status` with the [`VALID_CONDITION`] for `problems` set (`Some`) or removed (`None`).
pub fn with_validity(
    mut status: CanaryStatus,
    problems: Option<&str>,
    now: crate::spec::Timestamp,
) -> CanaryStatus {
    let previous = status
        .conditions
        .iter()
        .find(|c| c.kind == VALID_CONDITION)
        .cloned();
    status.conditions.retain(|c| c.kind != VALID_CONDITION);
    if let Some(problems) = problems {
        if let Some(same) = previous.filter(|c| c.message == problems) {
            status.conditions.push(same);
        } else {
            status.conditions.push(crate::spec::Condition {
                kind: VALID_CONDITION.to_owned(),
                status: "False".to_owned(),
                last_update_time: Some(now),
                last_transition_time: Some(now),
                reason: "InvalidSpec".to_owned(),
                message: problems.to_owned(),
            });
        }
    }
    status
}

/// Kubernetes' limit on an event's note.
const MAX_NOTE_BYTES: usize = 1024;
/// The reason of every event, as Flagger records them.
pub const EVENT_REASON: &str = "Synced";
/// `reportingController` of Weir's events (the FROM column of `kubectl describe`).
pub const REPORTING_CONTROLLER: &str = "weir";

#[derive(Debug, Default)]
struct Pending {
    events: Vec<Event>,
    status: Option<CanaryStatus>,
    /// The status the API server has (as last written or read): an equal one is not written
    /// again, so a step that changed nothing costs no write.
    written: Option<CanaryStatus>,
}

/// What a step produced that still has to reach the API server. Shared by the journal, the
/// platform (routing-mode events) and the reconciler.
#[derive(Debug, Clone, Default)]
pub struct Outbox(Arc<Mutex<Pending>>);

impl Outbox {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues an event.
    pub fn event(&self, event: Event) {
        self.lock().events.push(event);
    }

    /// Records that the API server already has `status` (read with the Canary).
    pub fn assume_written(&self, status: Option<CanaryStatus>) {
        self.lock().written = status;
    }

    /// Whether a status is waiting to be written.
    pub fn has_status(&self) -> bool {
        self.lock().status.is_some()
    }

    /// Queues `status` to be written even if the API server seems to have it already (it has
    /// something the runner does not know of, such as an invalid-spec condition to clear).
    pub fn queue_status(&self, status: CanaryStatus) {
        self.lock().status = Some(status);
    }

    /// The queued events (oldest first), for tests and logs.
    pub fn queued_events(&self) -> Vec<Event> {
        self.lock().events.clone()
    }
}

/// What the journal reads from the Canary, refreshed by the reconciler from each new version of
/// the object.
#[derive(Debug, Clone, Default)]
pub struct View {
    /// The status the runner resumes from.
    pub status: Option<CanaryStatus>,
    /// The `weir.dev/retry` annotation.
    pub retry: Option<String>,
    /// The `weir.dev/request` annotation, with its field manager.
    pub request: Option<crate::analysis::OperatorRequest>,
    /// `metadata.deletionTimestamp` is set.
    pub deleting: bool,
}

/// The runner's journal for one Canary.
#[derive(Debug, Clone)]
pub struct KubernetesJournal {
    view: Arc<Mutex<View>>,
    outbox: Outbox,
}

impl KubernetesJournal {
    /// A journal reading `view` and writing into `outbox`.
    pub fn new(view: Arc<Mutex<View>>, outbox: Outbox) -> Self {
        Self { view, outbox }
    }

    fn view(&self) -> MutexGuard<'_, View> {
        self.view.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Journal for KubernetesJournal {
    fn load(&self) -> Result<Option<CanaryStatus>, String> {
        Ok(self.view().status.clone())
    }

    fn save(&mut self, status: &CanaryStatus) -> Result<(), String> {
        self.view().status = Some(status.clone());
        let status = for_api(status);
        let mut pending = self.outbox.lock();
        let news = pending
            .written
            .as_ref()
            .is_none_or(|written| !same_but_step_time(written, &status));
        pending.status = news.then_some(status);
        Ok(())
    }

    fn event(&mut self, event: &Event) {
        self.outbox.event(event.clone());
    }

    fn retry_token(&self) -> Option<String> {
        self.view().retry.clone()
    }

    fn request(&self) -> Option<crate::analysis::OperatorRequest> {
        self.view().request.clone()
    }

    fn deleting(&self) -> bool {
        self.view().deleting
    }
}

/// Whether two statuses differ at most in `lastStepTime`. A step that changed nothing else (an
/// idle canary checking for a new revision, a gate still closed) is not written: a write per
/// interval would be a line per interval in `kubectl get canary -w`. The runner keeps the new
/// step time in memory; after a restart the controller resumes from the older one and may run
/// that idle step once early, which acts on nothing.
fn same_but_step_time(a: &CanaryStatus, b: &CanaryStatus) -> bool {
    CanaryStatus {
        last_step_time: b.last_step_time,
        ..a.clone()
    } == *b
}

/// Why the outbox could not be written.
#[derive(Debug, thiserror::Error)]
pub enum FlushError {
    /// The status patch failed; it stays queued.
    #[error("writing the status of canary {canary}: {source}")]
    Status {
        /// `namespace/name`.
        canary: String,
        /// The API error.
        source: kube::Error,
    },
}

/// Where and as whom [`flush`] records events.
#[derive(Clone)]
pub struct Recorder {
    /// The API server.
    pub client: Client,
    /// This controller's instance (`reportingInstance`).
    pub instance: String,
    /// Recent events, for series.
    pub series: EventSeriesCache,
}

impl Recorder {
    /// Records one event about `canary`: a new Event, or the next occurrence in a series.
    async fn record(&self, canary: &CanaryResource, event: &Event) -> Result<(), kube::Error> {
        let regarding = object_reference(canary);
        let namespace = regarding.namespace.clone().unwrap_or_default();
        let api: Api<K8sEvent> = Api::namespaced(self.client.clone(), &namespace);
        let object = k8s_event(event, &regarding, &self.instance);
        let key = SeriesKey {
            namespace,
            canary_uid: regarding.uid.clone().unwrap_or_default(),
            kind: severity_name(event.severity),
            action: event.reason.clone(),
            note: object.note.clone().unwrap_or_default(),
        };
        let now = Instant::now();
        if let Some((name, count)) = self.series.continues(&key, now) {
            let patch = serde_json::json!({"series": EventSeries {
                count,
                last_observed_time: MicroTime(k8s_openapi::jiff::Timestamp::now()),
            }});
            match api
                .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => return Ok(()),
                // Expired (event TTL) or deleted: start the series again.
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => return Err(e),
            }
        }
        let created = api.create(&PostParams::default(), &object).await?;
        let name = created
            .metadata
            .name
            .or(object.metadata.name)
            .unwrap_or_default();
        self.series.start(key, name, now);
        Ok(())
    }
}

/// Writes the queued events and status of `canary`. An event that cannot be created is logged
/// and dropped (the decision history in the status keeps it); a status that cannot be written
/// stays queued and the error is returned. Returns the Canary as the API server has it after the
/// status write (its `resourceVersion` is new), if there was one.
pub async fn flush(
    recorder: &Recorder,
    canary: &CanaryResource,
    outbox: &Outbox,
) -> Result<Option<CanaryResource>, FlushError> {
    let client = &recorder.client;
    let (events, status) = {
        let mut pending = outbox.lock();
        (std::mem::take(&mut pending.events), pending.status.clone())
    };
    let namespace = canary.metadata.namespace.clone().unwrap_or_default();
    let name = canary.metadata.name.clone().unwrap_or_default();
    for event in &events {
        if let Err(e) = recorder.record(canary, event).await {
            tracing::warn!(canary = %name, error = %e, message = %event.message, "cannot record event");
        }
    }
    let Some(status) = status else {
        return Ok(None);
    };
    let api: Api<CanaryResource> = Api::namespaced(client.clone(), &namespace);
    let patch = serde_json::json!({
        "apiVersion": "weir.dev/v1alpha1",
        "kind": "Canary",
        "status": status,
    });
    let written = api
        .patch_status(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await
        .map_err(|source| FlushError::Status {
            canary: format!("{namespace}/{name}"),
            source,
        })?;
    let mut pending = outbox.lock();
    // Only clear what was written: a newer status queued meanwhile stays.
    if pending.status.as_ref() == Some(&status) {
        pending.status = None;
    }
    pending.written = Some(status);
    Ok(Some(written))
}

/// The reference events carry to their Canary.
pub fn object_reference(canary: &CanaryResource) -> ObjectReference {
    ObjectReference {
        api_version: Some("weir.dev/v1alpha1".to_owned()),
        kind: Some("Canary".to_owned()),
        name: canary.metadata.name.clone(),
        namespace: canary.metadata.namespace.clone(),
        uid: canary.metadata.uid.clone(),
        ..ObjectReference::default()
    }
}

/// Event names must be unique in the namespace; a counter separates events of the same instant.
static EVENT_SEQUENCE: AtomicU64 = AtomicU64::new(0);

fn severity_name(severity: Severity) -> &'static str {
    match severity {
        Severity::Normal => "Normal",
        Severity::Warning => "Warning",
    }
}

/// One engine event as an `events.k8s.io/v1` Event about the Canary.
pub fn k8s_event(event: &Event, regarding: &ObjectReference, instance: &str) -> K8sEvent {
    let now = k8s_openapi::jiff::Timestamp::now();
    let sequence = EVENT_SEQUENCE.fetch_add(1, Ordering::Relaxed);
    let mut note = event.message.clone();
    if note.len() > MAX_NOTE_BYTES {
        let mut cut = MAX_NOTE_BYTES - 3;
        while !note.is_char_boundary(cut) {
            cut -= 1;
        }
        note.truncate(cut);
        note.push_str("...");
    }
    K8sEvent {
        metadata: ObjectMeta {
            name: Some(format!(
                "{}.{:x}{sequence:x}",
                regarding.name.as_deref().unwrap_or("canary"),
                now.as_nanosecond()
            )),
            namespace: regarding.namespace.clone(),
            ..ObjectMeta::default()
        },
        event_time: Some(MicroTime(now)),
        action: Some(event.reason.clone()),
        reason: Some(EVENT_REASON.to_owned()),
        note: Some(note),
        type_: Some(severity_name(event.severity).to_owned()),
        regarding: Some(regarding.clone()),
        reporting_controller: Some(REPORTING_CONTROLLER.to_owned()),
        reporting_instance: Some(instance.to_owned()),
        ..K8sEvent::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_journal_keeps_what_it_saves_until_flushed() {
        let view = Arc::new(Mutex::new(View {
            retry: Some("r1".into()),
            deleting: true,
            ..View::default()
        }));
        let outbox = Outbox::default();
        let mut journal = KubernetesJournal::new(view, outbox.clone());
        assert_eq!(journal.load().unwrap(), None);
        assert_eq!(journal.retry_token().as_deref(), Some("r1"));
        assert!(journal.deleting());
        let status = CanaryStatus {
            failed_checks: 2,
            ..CanaryStatus::default()
        };
        journal.save(&status).unwrap();
        assert!(outbox.has_status());
        outbox.assume_written(Some(status.clone()));
        journal.save(&status).unwrap();
        assert!(
            !outbox.has_status(),
            "an unchanged status is not written again"
        );
        journal
            .save(&CanaryStatus {
                last_step_time: Some(crate::spec::Timestamp::from_unix_millis(1)),
                ..status.clone()
            })
            .unwrap();
        assert!(
            !outbox.has_status(),
            "nor one where only the step time moved"
        );
        let status = CanaryStatus {
            failed_checks: 3,
            ..status
        };
        journal.save(&status).unwrap();
        journal.event(&Event {
            severity: Severity::Warning,
            reason: "Halt".into(),
            message: "m".into(),
        });
        assert_eq!(journal.load().unwrap(), Some(status));
        assert!(outbox.has_status());
        assert_eq!(outbox.queued_events().len(), 1);
    }

    #[test]
    fn a_repeated_event_continues_its_series_only_within_the_window() {
        let cache = EventSeriesCache::default();
        let key = SeriesKey {
            namespace: "application".into(),
            canary_uid: "u1".into(),
            kind: "Warning",
            action: "Halt".into(),
            note: "Halt advancement".into(),
        };
        let t0 = Instant::now();
        assert_eq!(cache.continues(&key, t0), None, "nothing to continue yet");
        cache.start(key.clone(), "mhs.1".into(), t0);
        let minute = Duration::from_secs(60);
        assert_eq!(
            cache.continues(&key, t0 + minute),
            Some(("mhs.1".into(), 2))
        );
        assert_eq!(
            cache.continues(&key, t0 + 2 * minute),
            Some(("mhs.1".into(), 3))
        );
        let other = SeriesKey {
            note: "Halt advancement, other numbers".into(),
            ..key.clone()
        };
        assert_eq!(cache.continues(&other, t0 + 2 * minute), None);
        // Silent for longer than the window: the next occurrence starts a new Event.
        let late = t0 + 2 * minute + SERIES_WINDOW + minute;
        assert_eq!(cache.continues(&key, late), None);
        assert!(cache.is_empty());
        cache.start(key.clone(), "mhs.2".into(), late);
        assert_eq!(cache.len(), 1);
    }

    #[test]
    fn events_read_like_flaggers_with_the_engine_reason_as_action() {
        let regarding = ObjectReference {
            name: Some("mhs".into()),
            namespace: Some("application".into()),
            ..ObjectReference::default()
        };
        let long = "x".repeat(2000);
        let e = k8s_event(
            &Event {
                severity: Severity::Warning,
                reason: "Rollback".into(),
                message: long,
            },
            &regarding,
            "weir-0",
        );
        assert_eq!(e.reason.as_deref(), Some("Synced"));
        assert_eq!(e.action.as_deref(), Some("Rollback"));
        assert_eq!(e.type_.as_deref(), Some("Warning"));
        assert_eq!(e.note.as_ref().map(String::len), Some(1024));
        assert!(e.metadata.name.unwrap().starts_with("mhs."));
    }
}
