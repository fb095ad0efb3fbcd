//! The Kubernetes journal: the Canary's status subresource and Kubernetes Events.
//!
//! [`Journal`] is synchronous (the runner calls it between effects), so the journal only
//! collects: `save` keeps the status to write and `event` queues the event in an [`Outbox`].
//! The reconciler then writes both with [`flush`]: events first (one `events.k8s.io/v1` Event
//! each, reason `Synced` and Flagger's message, the engine's reason as the action, so
//! `kubectl describe canary/<name>` reads like Flagger's), then the status with server-side
//! apply. A status that could not be written stays in the outbox and is written before the next
//! step: the effects it follows were performed, so it is the truth.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::Event as K8sEvent;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};

use crate::analysis::{Event, Severity};
use crate::runner::Journal;
use crate::spec::CanaryStatus;

use super::crd::CanaryResource;
use super::FIELD_MANAGER;

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
        let mut pending = self.outbox.lock();
        pending.status = (pending.written.as_ref() != Some(status)).then(|| status.clone());
        Ok(())
    }

    fn event(&mut self, event: &Event) {
        self.outbox.event(event.clone());
    }

    fn retry_token(&self) -> Option<String> {
        self.view().retry.clone()
    }

    fn deleting(&self) -> bool {
        self.view().deleting
    }
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

/// Writes the queued events and status of `canary`. An event that cannot be created is logged
/// and dropped (the decision history in the status keeps it); a status that cannot be written
/// stays queued and the error is returned. Returns the Canary as the API server has it after the
/// status write (its `resourceVersion` is new), if there was one.
pub async fn flush(
    client: &Client,
    canary: &CanaryResource,
    outbox: &Outbox,
    instance: &str,
) -> Result<Option<CanaryResource>, FlushError> {
    let (events, status) = {
        let mut pending = outbox.lock();
        (std::mem::take(&mut pending.events), pending.status.clone())
    };
    let namespace = canary.metadata.namespace.clone().unwrap_or_default();
    let name = canary.metadata.name.clone().unwrap_or_default();
    let regarding = object_reference(canary);
    let events_api: Api<K8sEvent> = Api::namespaced(client.clone(), &namespace);
    for event in &events {
        let object = k8s_event(event, &regarding, instance);
        if let Err(e) = events_api.create(&PostParams::default(), &object).await {
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
        type_: Some(
            match event.severity {
                Severity::Normal => "Normal",
                Severity::Warning => "Warning",
            }
            .to_owned(),
        ),
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
