//! `spec.autoscalerRef`: the primary's copy of the target's HorizontalPodAutoscaler or KEDA
//! ScaledObject, as Flagger's scaler reconcilers make it. Pure builders over JSON; the API
//! calls are in [`super::KubernetesPlatform`].
//!
//! - The copy is `<autoscaler>-primary`, owned by the Canary, aimed at `<target>-primary`, with
//!   the original's spec (`primaryScalerReplicas` replacing its replica bounds) and labels; a
//!   ScaledObject's annotations too, and each trigger's `query` aimed at the primary.
//! - The target's own autoscaler keeps aiming at the target. While Weir holds the target at
//!   zero replicas it must not scale it back up: Kubernetes' HPA controller never scales a
//!   workload whose replicas are 0 (it reports `ScalingActive=False`, reason
//!   `ScalingDisabled`), so Flagger and Weir leave an HPA alone; KEDA would, so both pause a
//!   ScaledObject with [`KEDA_PAUSED_REPLICAS`] `"0"` before scaling the target to zero and
//!   remove it before scaling the target up (a new revision, or given back on deletion).

use serde_json::{json, Map, Value};

use crate::spec::{AutoscalerKind, AutoscalerPlan, CanaryPlan};

use super::deployments::PRIMARY_SUFFIX;

/// KEDA's annotation that holds a ScaledObject's workload at a fixed replica count.
pub const KEDA_PAUSED_REPLICAS: &str = "autoscaling.keda.sh/paused-replicas";

/// Flagger marks its own bookkeeping keys with this; they are never copied.
const TOOLKIT_MARKER: &str = "toolkit.fluxcd.io";

/// `(apiVersion, plural)` of the autoscaler kind Weir reads and writes.
pub fn api(kind: AutoscalerKind) -> (&'static str, &'static str, &'static str) {
    match kind {
        AutoscalerKind::HorizontalPodAutoscaler => (
            "autoscaling/v2",
            "HorizontalPodAutoscaler",
            "horizontalpodautoscalers",
        ),
        AutoscalerKind::ScaledObject => ("keda.sh/v1alpha1", "ScaledObject", "scaledobjects"),
    }
}

/// Name of the primary's copy: `<autoscaler>-primary`.
pub fn primary_name(autoscaler: &AutoscalerPlan) -> String {
    format!("{}{PRIMARY_SUFFIX}", autoscaler.name)
}

fn copied(meta: &Value, exclude: &[&str]) -> Map<String, Value> {
    meta.as_object()
        .into_iter()
        .flatten()
        .filter(|(k, _)| !k.contains(TOOLKIT_MARKER) && !exclude.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// The primary's copy of `original` (the target's autoscaler as read from the API server).
pub fn primary_copy(
    plan: &CanaryPlan,
    autoscaler: &AutoscalerPlan,
    original: &Value,
    owner: &Value,
) -> Value {
    let (api_version, kind, _) = api(autoscaler.kind);
    let target = format!("{}{PRIMARY_SUFFIX}", plan.target.name);
    let mut spec = original.get("spec").cloned().unwrap_or_else(|| json!({}));
    spec["scaleTargetRef"]["name"] = json!(target);
    let mut metadata = json!({
        "name": primary_name(autoscaler),
        "namespace": plan.namespace,
        "labels": copied(&original["metadata"]["labels"], &[]),
        "ownerReferences": [owner],
    });
    match autoscaler.kind {
        AutoscalerKind::HorizontalPodAutoscaler => {
            if let Some(min) = autoscaler.primary_min_replicas {
                spec["minReplicas"] = json!(min);
            }
            if let Some(max) = autoscaler.primary_max_replicas {
                spec["maxReplicas"] = json!(max);
            }
        }
        AutoscalerKind::ScaledObject => {
            if let Some(min) = autoscaler.primary_min_replicas {
                spec["minReplicaCount"] = json!(min);
            }
            if let Some(max) = autoscaler.primary_max_replicas {
                spec["maxReplicaCount"] = json!(max);
            }
            aim_triggers_at_primary(plan, autoscaler, &mut spec);
            // KEDA names the HPA it makes after this, if set: two ScaledObjects cannot share it.
            // Indexing makes the path, so the copy always has `horizontalPodAutoscalerConfig`
            // (Flagger's copy too), and `name` only when the original has one.
            let hpa_name = &mut spec["advanced"]["horizontalPodAutoscalerConfig"]["name"];
            if let Some(name) = hpa_name.as_str().filter(|n| !n.is_empty()) {
                *hpa_name = json!(format!("{name}{PRIMARY_SUFFIX}"));
            } else if let Some(config) =
                spec["advanced"]["horizontalPodAutoscalerConfig"].as_object_mut()
            {
                config.remove("name");
            }
            // The target's pause is Weir's doing (or its owner's), never the primary's.
            let annotations = copied(
                &original["metadata"]["annotations"],
                &[KEDA_PAUSED_REPLICAS],
            );
            if !annotations.is_empty() {
                metadata["annotations"] = Value::Object(annotations);
            }
        }
    }
    json!({
        "apiVersion": api_version,
        "kind": kind,
        "metadata": metadata,
        "spec": spec,
    })
}

/// Flagger's rewrite of a ScaledObject's triggers for the primary: with
/// `primaryScalerQueries`, the named triggers get the given query; without, every `query`
/// has the target's name (and `<target>-canary`) replaced by `<target>-primary`.
fn aim_triggers_at_primary(plan: &CanaryPlan, autoscaler: &AutoscalerPlan, spec: &mut Value) {
    let target = &plan.target.name;
    let primary = format!("{target}{PRIMARY_SUFFIX}");
    let canary = format!("{target}-canary");
    for trigger in spec["triggers"].as_array_mut().into_iter().flatten() {
        if !autoscaler.primary_queries.is_empty() {
            let name = trigger["name"].as_str().unwrap_or_default().to_owned();
            if let Some(query) = autoscaler.primary_queries.get(&name) {
                trigger["metadata"]["query"] = json!(query);
            }
            continue;
        }
        if let Some(query) = trigger["metadata"]["query"].as_str() {
            let rewritten = query.replace(&canary, target).replace(target, &primary);
            trigger["metadata"]["query"] = json!(rewritten);
        }
    }
}

/// Whether `existing` (the primary's copy as the API server has it) already holds what
/// `wanted` sets: its spec, and each label and annotation Weir writes.
pub fn up_to_date(existing: &Value, wanted: &Value) -> bool {
    let has_all = |field: &str| {
        wanted["metadata"][field]
            .as_object()
            .into_iter()
            .flatten()
            .all(|(k, v)| existing["metadata"][field].get(k) == Some(v))
    };
    existing["spec"] == wanted["spec"] && has_all("labels") && has_all("annotations")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec;

    fn plan(autoscaler: &str) -> CanaryPlan {
        let yaml = format!(
            "apiVersion: weir.dev/v1alpha1
kind: Canary
metadata: {{name: podinfo, namespace: test}}
spec:
  targetRef: {{apiVersion: apps/v1, kind: Deployment, name: podinfo}}
  autoscalerRef: {autoscaler}
  service: {{port: 80}}
  analysis: {{interval: 1m, stepWeight: 10}}
"
        );
        spec::load_yaml(&yaml).unwrap().plan
    }

    #[test]
    fn a_scaled_objects_queries_are_aimed_at_the_primary_as_flagger_does() {
        let p = plan("{kind: ScaledObject, name: podinfo-so}");
        let so = json!({"spec": {
            "scaleTargetRef": {"name": "podinfo"},
            "triggers": [{"type": "prometheus", "metadata": {"query":
                "sum(rate(http_requests_total{deployment=\"podinfo-canary\"}[1m])) + sum(rate(x{app=\"podinfo\"}[1m]))"}}],
            "advanced": {"horizontalPodAutoscalerConfig": {"name": "podinfo-hpa"}},
        }});
        let copy = primary_copy(&p, p.autoscaler.as_ref().unwrap(), &so, &json!({}));
        assert_eq!(
            copy["spec"]["triggers"][0]["metadata"]["query"],
            "sum(rate(http_requests_total{deployment=\"podinfo-primary\"}[1m])) + sum(rate(x{app=\"podinfo-primary\"}[1m]))"
        );
        assert_eq!(
            copy["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["name"],
            "podinfo-hpa-primary"
        );
        assert_eq!(copy["spec"]["scaleTargetRef"]["name"], "podinfo-primary");
    }

    #[test]
    fn named_primary_queries_replace_only_their_triggers() {
        let p =
            plan("{kind: ScaledObject, name: podinfo-so, primaryScalerQueries: {rps: 'sum(up)'}}");
        let so = json!({"spec": {"scaleTargetRef": {"name": "podinfo"}, "triggers": [
            {"type": "prometheus", "name": "rps", "metadata": {"query": "x{app=\"podinfo\"}"}},
            {"type": "prometheus", "name": "other", "metadata": {"query": "y{app=\"podinfo\"}"}},
        ]}});
        let copy = primary_copy(&p, p.autoscaler.as_ref().unwrap(), &so, &json!({}));
        assert_eq!(copy["spec"]["triggers"][0]["metadata"]["query"], "sum(up)");
        assert_eq!(
            copy["spec"]["triggers"][1]["metadata"]["query"],
            "y{app=\"podinfo\"}"
        );
    }
}
