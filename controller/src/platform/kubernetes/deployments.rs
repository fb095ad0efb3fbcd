//! Deployments: the target's revision, the primary built from the target, scaling the target, and
//! readiness from a Deployment's status. Pure functions over k8s-openapi types; the API calls are
//! in [`super::KubernetesPlatform`].

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::core::v1::PodTemplateSpec;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};

use crate::spec::Weight;

use super::SCALED_FROM_ANNOTATION;

/// Suffix of the primary Deployment's name and of its pods' selector label values.
pub const PRIMARY_SUFFIX: &str = "-primary";

/// Annotations never copied to the primary: the client-side apply record (it describes the
/// target), the Deployment controller's own, and Weir's bookkeeping on the target.
fn copied_annotation(key: &str) -> bool {
    key != "kubectl.kubernetes.io/last-applied-configuration"
        && key != "deployment.kubernetes.io/revision"
        && !key.starts_with("weir.dev/")
}

/// The revision of a pod template: FNV-1a over its JSON. Stable across controller builds, since
/// it is persisted in the status (`lastAppliedSpec`), and blind to `replicas`, which Weir changes.
pub fn revision(template: &PodTemplateSpec) -> String {
    let canonical = serde_json::to_string(template).unwrap_or_default();
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in canonical.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{hash:016x}")
}

/// The target's pod selector (`spec.selector.matchLabels`); a target without one cannot be
/// told apart from its primary.
pub fn target_selector(target: &Deployment) -> Result<BTreeMap<String, String>, String> {
    let spec = &target.spec;
    if spec
        .selector
        .match_expressions
        .as_ref()
        .is_some_and(|e| !e.is_empty())
    {
        return Err(
            "spec.selector.matchExpressions is not supported; select the pods with matchLabels"
                .to_owned(),
        );
    }
    match &spec.selector.match_labels {
        Some(labels) if !labels.is_empty() => Ok(labels.clone()),
        _ => Err("spec.selector.matchLabels is empty; label the pods, e.g. app: <name>".to_owned()),
    }
}

/// The primary's pod labels: the target's selector with `-primary` appended to each value, so
/// neither Deployment (nor Service) ever selects the other's pods.
pub fn primary_selector(target_selector: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    target_selector
        .iter()
        .map(|(k, v)| (k.clone(), format!("{v}{PRIMARY_SUFFIX}")))
        .collect()
}

/// How many replicas the target wants: its own count, or, when Weir scaled it to zero, the count
/// it had then (kept in an annotation), at least one.
pub fn desired_replicas(target: &Deployment) -> i32 {
    let current = target.spec.replicas.unwrap_or(1);
    if current > 0 {
        return current;
    }
    target
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(SCALED_FROM_ANNOTATION))
        .and_then(|v| v.parse::<i32>().ok())
        .filter(|n| *n > 0)
        .unwrap_or(1)
}

/// The primary Deployment for `target` (Flagger's initialization and `Promote`): the target's
/// pod template, labels, annotations, strategy and desired replicas, with the selector labels
/// renamed, owned by the Canary.
pub fn primary_deployment(
    target: &Deployment,
    owner: OwnerReference,
) -> Result<Deployment, String> {
    let name = target.metadata.name.clone().unwrap_or_default();
    let spec = &target.spec;
    let selector = target_selector(target)?;
    let primary_labels = primary_selector(&selector);

    let mut labels = target.metadata.labels.clone().unwrap_or_default();
    labels.extend(primary_labels.clone());
    let annotations: BTreeMap<String, String> = target
        .metadata
        .annotations
        .iter()
        .flatten()
        .filter(|(k, _)| copied_annotation(k))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();

    let mut template = spec.template.clone();
    let template_meta = template.metadata.get_or_insert_with(ObjectMeta::default);
    template_meta
        .labels
        .get_or_insert_with(BTreeMap::new)
        .extend(primary_labels.clone());

    Ok(Deployment {
        metadata: ObjectMeta {
            name: Some(format!("{name}{PRIMARY_SUFFIX}")),
            namespace: target.metadata.namespace.clone(),
            labels: Some(labels),
            annotations: (!annotations.is_empty()).then_some(annotations),
            owner_references: Some(vec![owner]),
            ..ObjectMeta::default()
        },
        spec: DeploymentSpec {
            replicas: Some(desired_replicas(target)),
            selector: LabelSelector {
                match_labels: Some(primary_labels),
                match_expressions: None,
            },
            template,
            strategy: spec.strategy.clone(),
            min_ready_seconds: spec.min_ready_seconds,
            revision_history_limit: spec.revision_history_limit,
            progress_deadline_seconds: spec.progress_deadline_seconds,
            paused: None,
        },
        status: None,
    })
}

/// Whether a Deployment serves: Flagger's `isDeploymentReady`, with its messages. `threshold` is
/// the share of updated replicas that must be available (`primaryReadyThreshold` /
/// `canaryReadyThreshold`).
pub fn readiness(deployment: &Deployment, threshold: Weight) -> Result<(), String> {
    let name = deployment.metadata.name.as_deref().unwrap_or_default();
    let wanted = deployment.spec.replicas.unwrap_or(1);
    if wanted == 0 {
        return Err(format!("{name} is scaled to zero"));
    }
    let Some(status) = &deployment.status else {
        return Err(format!(
            "waiting for rollout to finish: {name} has no status yet"
        ));
    };
    let generation = deployment.metadata.generation.unwrap_or(0);
    if status.observed_generation.unwrap_or(0) < generation {
        return Err(
            "waiting for rollout to finish: observed deployment generation less than desired generation"
                .to_owned(),
        );
    }
    let progress_exceeded = status.conditions.iter().flatten().any(|c| {
        c.type_.as_deref() == Some("Progressing")
            && c.reason.as_deref() == Some("ProgressDeadlineExceeded")
    });
    if progress_exceeded {
        return Err(format!(
            "deployment {name:?} exceeded its progress deadline"
        ));
    }
    let updated = status.updated_replicas.unwrap_or(0);
    let replicas = status.replicas.unwrap_or(0);
    let available = status.available_replicas.unwrap_or(0);
    if updated < wanted {
        return Err(format!(
            "waiting for rollout to finish: {updated} out of {wanted} new replicas have been updated"
        ));
    }
    if replicas > updated {
        return Err(format!(
            "waiting for rollout to finish: {} old replicas are pending termination",
            replicas - updated
        ));
    }
    let percent = i64::from(threshold.percent());
    // Rounded up, as Flagger does: a threshold above 0 needs at least one available replica.
    let needed = i32::try_from((i64::from(updated) * percent + 99) / 100).unwrap_or(updated);
    if available < needed {
        return Err(format!(
            "waiting for rollout to finish: {available} of {needed} (readyThreshold {percent}%) updated replicas are available"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::apps::v1::{DeploymentCondition, DeploymentStatus};

    fn target(json: serde_json::Value) -> Deployment {
        serde_json::from_value(json).unwrap()
    }

    fn mhs() -> Deployment {
        target(serde_json::json!({
            "metadata": {"name": "mhs", "namespace": "application",
                "labels": {"app": "mhs", "team": "x"},
                "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{}", "owner": "me",
                                "weir.dev/scaled-from-replicas": "3"}},
            "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "mhs"}},
                "template": {"metadata": {"labels": {"app": "mhs", "version": "1"}},
                    "spec": {"containers": [{"name": "app", "image": "mhs:1.1.1"}]}}}
        }))
    }

    fn owner() -> OwnerReference {
        OwnerReference {
            api_version: "weir.dev/v1alpha1".into(),
            kind: "Canary".into(),
            name: "mhs".into(),
            uid: "u1".into(),
            controller: Some(true),
            block_owner_deletion: None,
        }
    }

    #[test]
    fn the_primary_selects_its_own_pods_and_copies_the_rest() {
        let primary = primary_deployment(&mhs(), owner()).unwrap();
        assert_eq!(primary.metadata.name.as_deref(), Some("mhs-primary"));
        let spec = primary.spec;
        let want: BTreeMap<String, String> = [("app".into(), "mhs-primary".into())].into();
        assert_eq!(spec.selector.match_labels, Some(want));
        let pod_labels = spec.template.metadata.unwrap().labels.unwrap();
        assert_eq!(pod_labels["app"], "mhs-primary");
        assert_eq!(pod_labels["version"], "1");
        assert_eq!(spec.replicas, Some(2));
        let annotations = primary.metadata.annotations.unwrap();
        assert_eq!(annotations.keys().collect::<Vec<_>>(), vec!["owner"]);
        assert_eq!(primary.metadata.labels.unwrap()["team"], "x");
    }

    #[test]
    fn the_revision_follows_the_template_not_the_replicas() {
        let a = mhs();
        let mut b = mhs();
        b.spec.replicas = Some(0);
        assert_eq!(revision(&a.spec.template), revision(&b.spec.template));
        let mut c = mhs();
        c.spec.template.spec.as_mut().unwrap().containers[0].image = Some("mhs:1.1.2".into());
        assert_ne!(revision(&a.spec.template), revision(&c.spec.template));
    }

    #[test]
    fn a_target_scaled_to_zero_by_weir_comes_back_with_its_old_replicas() {
        let mut t = mhs();
        t.spec.replicas = Some(0);
        assert_eq!(desired_replicas(&t), 3);
        t.metadata.annotations = None;
        assert_eq!(desired_replicas(&t), 1);
    }

    #[test]
    fn a_target_without_match_labels_is_refused_with_a_hint() {
        let mut t = mhs();
        t.spec.selector.match_labels = None;
        let err = primary_deployment(&t, owner()).unwrap_err();
        assert!(err.contains("matchLabels"), "{err}");
    }

    fn with_status(replicas: i32, status: DeploymentStatus) -> Deployment {
        let mut d = mhs();
        d.spec.replicas = Some(replicas);
        d.metadata.generation = Some(2);
        d.status = Some(status);
        d
    }

    #[test]
    fn readiness_reads_the_deployment_status_like_flagger() {
        let full = Weight::FULL;
        let ready = DeploymentStatus {
            observed_generation: Some(2),
            replicas: Some(2),
            updated_replicas: Some(2),
            available_replicas: Some(2),
            ..Default::default()
        };
        assert_eq!(readiness(&with_status(2, ready.clone()), full), Ok(()));
        let stale = DeploymentStatus {
            observed_generation: Some(1),
            ..ready.clone()
        };
        assert!(readiness(&with_status(2, stale), full)
            .unwrap_err()
            .contains("observed deployment generation"));
        let updating = DeploymentStatus {
            updated_replicas: Some(1),
            ..ready.clone()
        };
        assert!(readiness(&with_status(2, updating), full)
            .unwrap_err()
            .contains("1 out of 2 new replicas"));
        let unavailable = DeploymentStatus {
            available_replicas: Some(1),
            ..ready.clone()
        };
        assert!(readiness(&with_status(2, unavailable.clone()), full)
            .unwrap_err()
            .contains("1 of 2 (readyThreshold 100%)"));
        assert_eq!(
            readiness(&with_status(2, unavailable), Weight::try_new(50).unwrap()),
            Ok(())
        );
        let stuck = DeploymentStatus {
            conditions: Some(vec![DeploymentCondition {
                type_: Some("Progressing".into()),
                status: Some("False".into()),
                reason: Some("ProgressDeadlineExceeded".into()),
                ..Default::default()
            }]),
            ..ready
        };
        assert!(readiness(&with_status(2, stuck), full)
            .unwrap_err()
            .contains("exceeded its progress deadline"));
        assert!(
            readiness(&with_status(0, DeploymentStatus::default()), full)
                .unwrap_err()
                .contains("scaled to zero")
        );
    }
}
