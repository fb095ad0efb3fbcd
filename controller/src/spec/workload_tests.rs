//! Validation of the fields about Kubernetes objects: the target's kind, its autoscaler, the
//! generated Services and DestinationRules, delegation, and other providers' fields.

use super::tests::{compile, errors, warnings};
use super::*;

/// A minimal valid Canary with `spec_extra` (YAML at the indentation of `spec`'s keys) added
/// and `service_extra` added under `spec.service`.
fn canary(target_kind: &str, spec_extra: &str, service_extra: &str) -> String {
    let indent =
        |text: &str, by: &str| -> String { text.lines().map(|l| format!("{by}{l}\n")).collect() };
    format!(
        "apiVersion: weir.dev/v1alpha1
kind: Canary
metadata:
  name: mhs
  namespace: application
spec:
  targetRef:
    apiVersion: apps/v1
    kind: {target_kind}
    name: mhs
  service:
    port: 80
{}  analysis:
    interval: 1m
    stepWeight: 10
{}",
        indent(service_extra, "    "),
        indent(spec_extra, "  "),
    )
}

#[test]
fn a_daemonset_or_service_target_is_refused_with_the_reason() {
    let daemonset = errors(&canary("DaemonSet", "", ""));
    assert_eq!(daemonset.len(), 1, "{daemonset:?}");
    assert!(
        daemonset[0].starts_with(
            "spec.targetRef.kind: not supported yet: Weir rolls out Deployments only. A DaemonSet"
        ),
        "{daemonset:?}"
    );
    let service = errors(&canary("Service", "", ""));
    assert!(
        service[0].starts_with("spec.targetRef.kind: not supported yet: Weir rolls out Deployments only: it builds the primary from the target's pod template"),
        "{service:?}"
    );
    assert_eq!(
        errors(&canary("StatefulSet", "", "")),
        ["spec.targetRef.kind: `StatefulSet` is not supported, expected Deployment"]
    );
    assert_eq!(
        TARGET_KINDS,
        ["Deployment"],
        "the CRD schema refuses them too"
    );
}

#[test]
fn a_tcp_service_is_refused_because_the_filter_sees_http_only() {
    let e = errors(&canary("Deployment", "", "appProtocol: TCP"));
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(
        e[0].starts_with(
            "spec.service.appProtocol: not supported yet: Weir splits and measures HTTP requests"
        ),
        "{e:?}"
    );
    let plan = compile(&canary("Deployment", "", "appProtocol: http"))
        .unwrap()
        .plan;
    assert_eq!(plan.service.app_protocol.as_deref(), Some("http"));
}

#[test]
fn other_providers_fields_are_accepted_with_a_warning_that_they_have_no_effect_with_istio() {
    let yaml = canary(
        "Deployment",
        "ingressRef: {apiVersion: networking.k8s.io/v1, kind: Ingress, name: mhs}
routeRef: {apiVersion: apisix.apache.org/v2, kind: ApisixRoute, name: mhs}
upstreamRef: {apiVersion: gloo.solo.io/v1, kind: Upstream, name: mhs}",
        "gatewayRefs: [{name: public, namespace: gateways}]
backendTimeout: 10s
meshName: global
backends: [backend.default]
mirror: [{backendRef: {name: shadow}}]",
    );
    assert_eq!(
        warnings(&yaml),
        [
            "spec.ingressRef: has no effect with Istio (it is for NGINX ingress), ignored",
            "spec.routeRef: has no effect with Istio (it is for APISIX), ignored",
            "spec.upstreamRef: has no effect with Istio (it is for Gloo), ignored",
            "spec.service.backendTimeout: has no effect with Istio (it is for Gateway API), ignored",
            "spec.service.meshName: has no effect with Istio (it is for App Mesh), ignored",
            "spec.service.backends: has no effect with Istio (it is for App Mesh), ignored",
            "spec.service.mirror: has no effect with Istio (it is for Gateway API), ignored",
            "spec.service.gatewayRefs: has no effect with Istio (it is for Gateway API), ignored",
        ]
    );
}

#[test]
fn the_kubernetes_object_fields_compile_without_warnings() {
    let yaml = canary(
        "Deployment",
        "autoscalerRef:
  apiVersion: autoscaling/v2
  kind: HorizontalPodAutoscaler
  name: mhs
  primaryScalerReplicas: {minReplicas: 2, maxReplicas: 5}",
        "portDiscovery: true
headless: true
trafficDistribution: PreferClose
delegation: true
trafficPolicy:
  tls: {mode: ISTIO_MUTUAL}
apex:
  labels: {tier: frontend}
  annotations: {a: apex}
primary:
  labels: {track: stable}
canary:
  annotations: {b: canary}
unmanagedMetadata:
  labels: [owner]
  annotations: [cloud.google.com/neg-status]",
    );
    let compiled = compile(&yaml).unwrap_or_else(|e| panic!("{e}"));
    assert!(compiled.warnings.is_empty(), "{:?}", compiled.warnings);
    let plan = compiled.plan;
    assert_eq!(
        plan.autoscaler,
        Some(AutoscalerPlan {
            kind: AutoscalerKind::HorizontalPodAutoscaler,
            name: "mhs".into(),
            primary_min_replicas: Some(2),
            primary_max_replicas: Some(5),
            primary_queries: Default::default(),
        })
    );
    let s = &plan.service;
    assert!(s.port_discovery && s.delegation && s.headless);
    assert_eq!(s.traffic_distribution.as_deref(), Some("PreferClose"));
    assert_eq!(
        s.traffic_policy,
        Some(serde_json::json!({"tls": {"mode": "ISTIO_MUTUAL"}}))
    );
    assert_eq!(s.apex.labels["tier"], "frontend");
    assert_eq!(s.apex.annotations["a"], "apex");
    assert_eq!(s.primary.labels["track"], "stable");
    assert_eq!(s.canary.annotations["b"], "canary");
    assert_eq!(s.unmanaged.labels, ["owner"]);
    assert_eq!(s.unmanaged.annotations, ["cloud.google.com/neg-status"]);
}

#[test]
fn an_autoscaler_reference_names_a_known_kind_and_sensible_replicas() {
    let e = errors(&canary(
        "Deployment",
        "autoscalerRef:
  kind: VerticalPodAutoscaler
  primaryScalerReplicas: {minReplicas: 6, maxReplicas: 3}",
        "",
    ));
    assert_eq!(
        e,
        [
            "spec.autoscalerRef.kind: `VerticalPodAutoscaler` is not supported, expected HorizontalPodAutoscaler or ScaledObject",
            "spec.autoscalerRef.name: is required: the name of the target's autoscaler",
            "spec.autoscalerRef.primaryScalerReplicas: minReplicas (6) must not be above maxReplicas (3)",
        ]
    );
    assert_eq!(
        errors(&canary(
            "Deployment",
            "autoscalerRef: {kind: ScaledObject, name: mhs, primaryScalerReplicas: {maxReplicas: 0}}",
            "",
        )),
        ["spec.autoscalerRef.primaryScalerReplicas.maxReplicas: must be between 1 and 2147483647, got 0"]
    );
    assert_eq!(
        warnings(&canary(
            "Deployment",
            "autoscalerRef:
  kind: HorizontalPodAutoscaler
  name: mhs
  primaryScalerQueries: {cpu: 'sum(rate(x[1m]))'}",
            "",
        )),
        ["spec.autoscalerRef.primaryScalerQueries: ignored, it applies to a ScaledObject's triggers, not to a HorizontalPodAutoscaler"]
    );
}

#[test]
fn a_delegate_virtual_service_has_no_gateways() {
    let e = errors(&canary(
        "Deployment",
        "",
        "delegation: true\ngateways: [istio-system/public-gateway]",
    ));
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(
        e[0].starts_with("spec.service.gateways: a delegate VirtualService (spec.service.delegation: true) has no gateways"),
        "{e:?}"
    );
    // The hosts stay: they tell the filters which authorities are the canary's.
    let plan = compile(&canary(
        "Deployment",
        "",
        "delegation: true\nhosts: [mhs.example.com]",
    ))
    .unwrap()
    .plan;
    assert_eq!(plan.service.hosts, ["mhs.example.com"]);
}
