//! Issue 18: a Flagger user's Istio Canary works unchanged. The Canaries in `flagger_istio/`
//! were written from Flagger's documentation (not copied) and together use every field of
//! Flagger's Istio Canary spec; none may be accepted and ignored ("not supported yet").

use weir_controller::spec::{load_yaml, WarningKind};

const CANARIES: [(&str, &str); 4] = [
    (
        "progressive",
        include_str!("flagger_istio/progressive.yaml"),
    ),
    ("ab-testing", include_str!("flagger_istio/ab-testing.yaml")),
    ("blue-green", include_str!("flagger_istio/blue-green.yaml")),
    (
        "step-weights",
        include_str!("flagger_istio/step-weights.yaml"),
    ),
];

#[test]
fn every_field_of_flaggers_istio_canary_takes_effect_or_is_refused_none_is_ignored() {
    let mut ignored = Vec::new();
    for (name, yaml) in CANARIES {
        let compiled = load_yaml(yaml).unwrap_or_else(|e| panic!("{name}: {e}"));
        for warning in &compiled.warnings {
            match &warning.kind {
                WarningKind::NotSupportedYet | WarningKind::UnknownField => {
                    ignored.push(format!("{name}: {warning}"))
                }
                WarningKind::Ignored { why } => {
                    panic!("{name}: {warning} (a Flagger field ignored: {why})")
                }
                // Another provider's field: "has no effect with Istio", as the issue wants.
                WarningKind::Deprecated { .. }
                | WarningKind::FlaggerApiVersion
                | WarningKind::OtherProvider { .. } => {}
            }
        }
    }
    // Alerts and `type: event` webhooks (issue 12) take effect too: nothing is left ignored.
    assert!(ignored.is_empty(), "accepted and ignored: {ignored:#?}");
}

#[test]
fn the_route_options_of_every_canary_are_compiled_for_both_renderers() {
    let plan = load_yaml(CANARIES[0].1).unwrap().plan;
    let routes = &plan.service.routes;
    assert!(routes.timeout.is_some() && routes.retries.is_some());
    assert!(routes.headers.is_some() && routes.rewrite.is_some() && routes.cors.is_some());
    assert_eq!(routes.matches.len(), 1);
    assert!(plan.analysis.session_affinity.is_some());
    routes.check_for_envoy().unwrap();
}

#[test]
fn traffic_mirroring_is_refused_with_the_reason_not_ignored() {
    let yaml = include_str!("flagger_istio/blue-green.yaml").replace(
        "    iterations: 10\n",
        "    iterations: 10\n    mirror: true\n    mirrorWeight: 100\n",
    );
    let error = load_yaml(&yaml).expect_err("mirror is refused").to_string();
    assert!(
        error.contains("spec.analysis.mirror: not supported yet: Weir measures the canary in the callers' filters"),
        "{error}"
    );
}
