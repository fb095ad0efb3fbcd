//! Parsing and validation of whole Canaries.

use super::*;
use std::time::Duration;

const FLAGGER_MHS: &str = include_str!("testdata/flagger-istio-mhs.yaml");
const WEIR_AB: &str = include_str!("testdata/weir-ab-testing.yaml");

fn w(p: i64) -> Weight {
    Weight::try_new(p).unwrap()
}

/// A minimal valid Canary with `analysis` replaced by the given YAML block (indented 2 spaces).
fn with_analysis(analysis: &str) -> String {
    let indented: String = analysis.lines().map(|l| format!("  {l}\n")).collect();
    format!(
        "apiVersion: weir.dev/v1alpha1
kind: Canary
metadata:
  name: mhs
  namespace: application
spec:
  targetRef:
    apiVersion: apps/v1
    kind: Deployment
    name: mhs
  service:
    port: 80
{indented}"
    )
}

pub(super) fn compile(yaml: &str) -> Result<Compiled, ValidationErrors> {
    from_yaml(yaml).expect("parses").compile()
}

pub(super) fn errors(yaml: &str) -> Vec<String> {
    match compile(yaml) {
        Ok(c) => panic!("expected errors, got a plan: {:?}", c.plan),
        Err(e) => e.errors.iter().map(ToString::to_string).collect(),
    }
}

pub(super) fn warnings(yaml: &str) -> Vec<String> {
    compile(yaml)
        .unwrap_or_else(|e| panic!("{e}"))
        .warnings
        .iter()
        .map(ToString::to_string)
        .collect()
}

#[test]
fn the_flagger_analysis_block_from_the_docs_runs_unchanged() {
    let yaml = with_analysis(
        "analysis:
  interval: 1m
  maxWeight: 50
  stepWeight: 10
  threshold: 5
  metrics:
  - name: request-success-rate
    thresholdRange: {min: 99}
    interval: 30s
  - name: request-duration
    thresholdRange: {max: 500}
    interval: 30s",
    );
    let compiled = compile(&yaml).unwrap_or_else(|e| panic!("{e}"));
    assert!(compiled.warnings.is_empty(), "{:?}", compiled.warnings);
    let a = &compiled.plan.analysis;
    assert_eq!(a.interval, Duration::from_secs(60));
    assert_eq!(a.threshold.get(), 5);
    let Strategy::Canary { steps } = &a.strategy else {
        panic!("expected a progressive canary, got {:?}", a.strategy)
    };
    assert_eq!(steps.weights(), &[w(10), w(20), w(30), w(40), w(50)]);
    assert_eq!(a.metrics.len(), 2);
    assert_eq!(a.metrics[0].kind, MetricKind::SuccessRate);
    assert_eq!(a.metrics[0].range.min(), Some(99.0));
    assert_eq!(a.metrics[0].window, Duration::from_secs(30));
    assert_eq!(a.metrics[1].kind, MetricKind::Duration);
    assert_eq!(a.metrics[1].range.max(), Some(500.0));
}

#[test]
fn a_flagger_tutorial_canary_loads_with_warnings_for_what_weir_does_not_do_yet() {
    let compiled = load_yaml(FLAGGER_MHS).unwrap_or_else(|e| panic!("{e}"));
    let plan = &compiled.plan;
    assert_eq!(plan.id(), "mhs.application");
    assert_eq!(plan.key(), "application/mhs");
    assert_eq!(plan.primary_id(), "mhs-primary.application");
    assert_eq!(
        plan.target,
        Target {
            api_version: "apps/v1".into(),
            kind: "Deployment".into(),
            name: "mhs".into()
        }
    );
    assert_eq!(plan.service.port, 80);
    assert_eq!(plan.service.target_port, PortRef::Number(8080));
    assert_eq!(plan.service.port_name, "http");
    assert_eq!(plan.service.hosts, vec!["mhs.example.com"]);
    assert_eq!(plan.service.gateways, vec!["istio-system/public-gateway"]);
    assert_eq!(plan.progress_deadline, Duration::from_secs(60));
    let hooks: Vec<_> = plan
        .analysis
        .webhooks
        .iter()
        .map(|h| (h.name.as_str(), h.kind, h.timeout))
        .collect();
    assert_eq!(
        hooks,
        vec![
            (
                "acceptance-test",
                HookKind::PreRollout,
                Duration::from_secs(30)
            ),
            ("load-test", HookKind::Rollout, Duration::from_secs(5)),
        ]
    );
    assert_eq!(
        plan.analysis.webhooks[1].metadata["cmd"],
        "hey -z 1m -q 10 -c 2 http://mhs-canary.application/"
    );
    assert_eq!(
        plan.service.routes.retries,
        Some(Retries {
            attempts: 3,
            per_try_timeout: Some(WrittenDuration {
                text: "1s".into(),
                value: Duration::from_secs(1)
            }),
            retry_on: Some("gateway-error,connect-failure,refused-stream".into()),
        })
    );
    let warnings: Vec<String> = compiled.warnings.iter().map(ToString::to_string).collect();
    assert_eq!(
        warnings,
        vec![
            "apiVersion: flagger.app/v1beta1 accepted for copy-paste from Flagger; change it to weir.dev/v1alpha1",
        ]
    );
}

#[test]
fn an_ab_test_compiles_to_header_rules_and_weirs_own_settings() {
    let plan = load_yaml(WEIR_AB).unwrap_or_else(|e| panic!("{e}")).plan;
    let Strategy::AbTesting {
        iterations,
        matches,
    } = &plan.analysis.strategy
    else {
        panic!("expected A/B testing, got {:?}", plan.analysis.strategy)
    };
    assert_eq!(iterations.get(), 10);
    assert_eq!(
        matches,
        &vec![
            MatchGroup {
                headers: vec![HeaderRule {
                    name: "x-canary".into(),
                    value: StringMatcher::Exact("insider".into())
                }]
            },
            MatchGroup {
                headers: vec![HeaderRule {
                    name: "cookie".into(),
                    value: StringMatcher::Regex("^(.*?;)?(canary=always)(;.*)?$".into())
                }]
            },
        ]
    );
    assert_eq!(plan.analysis.min_sample_count, 50);
    assert!(plan.analysis.inconclusive_counts_as_failure);
    assert_eq!(plan.analysis.hooks(HookKind::ConfirmPromotion).count(), 1);
}

#[test]
fn flaggers_defaults_fill_what_is_left_out() {
    let yaml = with_analysis(
        "analysis:
  stepWeight: 20
  metrics:
  - name: request-success-rate
    thresholdRange: {min: 99}
  webhooks:
  - name: load
    url: http://load.test/",
    );
    let plan = compile(&yaml).unwrap_or_else(|e| panic!("{e}")).plan;
    let a = &plan.analysis;
    assert_eq!(a.interval, DEFAULT_INTERVAL);
    assert_eq!(a.threshold.get(), 1);
    let Strategy::Canary { steps } = &a.strategy else {
        panic!()
    };
    assert_eq!(steps.max(), Weight::FULL);
    assert_eq!(steps.weights().len(), 5);
    assert_eq!(a.step_weight_promotion, None);
    assert_eq!(a.metrics[0].window, Duration::from_secs(60));
    assert_eq!(a.webhooks[0].kind, HookKind::Rollout);
    assert_eq!(a.webhooks[0].timeout, Duration::from_secs(10));
    assert_eq!(a.min_sample_count, 20);
    assert!(!a.inconclusive_counts_as_failure);
    assert_eq!(a.inconclusive_limit.map(|n| n.get()), Some(10));
    assert_eq!(a.primary_ready_threshold, Weight::FULL);
    assert_eq!(plan.progress_deadline, Duration::from_secs(600));
    assert_eq!(plan.service.target_port, PortRef::Number(80));
    assert_eq!(plan.service.hosts, vec!["mhs"]);
}

#[test]
fn an_out_of_range_step_weight_names_the_field_and_the_rule() {
    let yaml = with_analysis("analysis:\n  stepWeight: 150");
    assert_eq!(
        errors(&yaml),
        vec!["spec.analysis.stepWeight: must be between 1 and 100, got 150"]
    );
}

#[test]
fn inconclusive_limit_zero_turns_the_limit_off_and_a_negative_one_is_refused() {
    let plan = compile(&with_analysis(
        "analysis:\n  inconclusiveLimit: 0\n  stepWeight: 10",
    ))
    .unwrap_or_else(|e| panic!("{e}"))
    .plan;
    assert_eq!(plan.analysis.inconclusive_limit, None);
    assert_eq!(
        errors(&with_analysis(
            "analysis:\n  inconclusiveLimit: -2\n  stepWeight: 10"
        )),
        vec!["spec.analysis.inconclusiveLimit: must be between 0 and 4294967295, got -2"]
    );
}

#[test]
fn a_zero_step_weight_or_max_weight_is_out_of_range_not_missing() {
    let yaml = with_analysis("analysis:\n  stepWeight: 0\n  maxWeight: 0");
    assert_eq!(
        errors(&yaml),
        vec![
            "spec.analysis.stepWeight: must be between 1 and 100, got 0",
            "spec.analysis.maxWeight: must be between 1 and 100, got 0"
        ]
    );
    // stepWeightPromotion 0 is Flagger's "all at once", as when it is not set.
    let yaml = with_analysis("analysis:\n  stepWeight: 10\n  stepWeightPromotion: 0");
    let plan = compile(&yaml).unwrap_or_else(|e| panic!("{e}")).plan;
    assert_eq!(plan.analysis.step_weight_promotion, None);
}

#[test]
fn every_problem_is_reported_at_once() {
    let yaml = "apiVersion: weir.dev/v1
kind: Canary
metadata:
  name: mhs
spec:
  provider: nginx
  targetRef:
    kind: Deployment
  service:
    port: 70000
  analysis:
    interval: 1 minute
    stepWeight: 150
    threshold: -2
    metrics:
    - name: error-rate
      thresholdRange: {max: 1}
    webhooks:
    - name: gate
      type: pre-promotion
      url: http://gate/
";
    let e = compile(yaml).unwrap_err();
    let paths: Vec<&str> = e.errors.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(
        paths,
        vec![
            "apiVersion",
            "spec.provider",
            "spec.targetRef.name",
            "spec.service.port",
            "spec.analysis.interval",
            "spec.analysis.threshold",
            "spec.analysis.stepWeight",
            "spec.analysis.metrics[0].name",
            "spec.analysis.webhooks[0].type",
        ]
    );
    let text = e.to_string();
    assert!(
        text.starts_with("Canary mhs.default is invalid (9 problems):\n  - apiVersion: `weir.dev/v1` is not supported"),
        "{text}"
    );
    assert!(
        text.contains("\n  - spec.service.port: must be between 1 and 65535, got 70000\n"),
        "{text}"
    );
}

#[test]
fn an_unknown_metric_without_a_template_names_the_two_built_ins() {
    let yaml = with_analysis(
        "analysis:
  stepWeight: 10
  metrics:
  - name: error-rate
    thresholdRange: {max: 1}",
    );
    let e = errors(&yaml);
    assert_eq!(e.len(), 1);
    assert!(e[0].starts_with("spec.analysis.metrics[0].name: unknown metric `error-rate`"));
    assert!(e[0].contains("`request-success-rate` (percent"), "{}", e[0]);
    assert!(
        e[0].contains("`request-duration` (P99 latency in milliseconds"),
        "{}",
        e[0]
    );
    assert!(e[0].contains("templateRef or query"), "{}", e[0]);
}

#[test]
fn a_custom_metric_with_a_template_ref_is_accepted() {
    let yaml = with_analysis(
        "analysis:
  stepWeight: 10
  metrics:
  - name: error-rate
    templateRef: {name: error-rate, namespace: istio-system}
    templateVariables: {route: /api}
    thresholdRange: {max: 1}",
    );
    let plan = compile(&yaml).unwrap_or_else(|e| panic!("{e}")).plan;
    assert_eq!(
        plan.analysis.metrics[0].kind,
        MetricKind::Template {
            name: "error-rate".into(),
            namespace: "istio-system".into()
        }
    );
    assert_eq!(plan.analysis.metrics[0].template_variables["route"], "/api");
}

#[test]
fn unknown_keys_are_warned_about_with_their_path() {
    let yaml = with_analysis(
        "analysis:
  stepWeight: 10
  stepWieght: 20
  metrics:
  - name: request-success-rate
    thresholdRange: {min: 99, mni: 98}
    interval: 30s",
    )
    .replace("spec:\n", "colour: blue\nspec:\n");
    assert_eq!(
        warnings(&yaml),
        vec![
            "colour: unknown field (not in Flagger's Canary schema), ignored",
            "spec.analysis.stepWieght: unknown field (not in Flagger's Canary schema), ignored",
            "spec.analysis.metrics[0].thresholdRange.mni: unknown field (not in Flagger's Canary schema), ignored",
        ]
    );
}

#[test]
fn fields_weir_does_not_implement_yet_are_listed_not_ignored_silently() {
    let yaml = with_analysis(
        "analysis:
  iterations: 5
  alerts:
  - name: on-call
    providerRef: {name: slack}
  sessionAffinity: {cookieName: flagger-cookie}
  webhooks:
  - name: notify
    type: event
    url: http://events/",
    );
    assert_eq!(
        warnings(&yaml),
        vec![
            "spec.analysis.sessionAffinity: ignored, session affinity applies to progressive traffic shifting (stepWeight or stepWeights), not to iterations",
        ]
    );
}

#[test]
fn alerts_are_checked_with_flaggers_defaults() {
    let plan = crate::spec::load_yaml(&with_analysis(
        "analysis:
  stepWeight: 10
  alerts:
  - name: on-call
    severity: error
    providerRef: {name: pager, namespace: ops}
  - name: chat
    providerRef: {name: slack}",
    ))
    .unwrap()
    .plan;
    let alerts = &plan.analysis.alerts;
    assert_eq!(alerts[0].severity, crate::spec::AlertSeverity::Error);
    assert_eq!(alerts[0].provider_id(), "ops/pager");
    assert_eq!(alerts[1].severity, crate::spec::AlertSeverity::Info);
    assert_eq!(alerts[1].provider_id(), format!("{}/slack", plan.namespace));
    let bad = errors(&with_analysis(
        "analysis:
  stepWeight: 10
  alerts:
  - name: a
    severity: critical
    providerRef: {name: x}
  - name: a
    providerRef: {}",
    ));
    assert_eq!(
        bad,
        vec![
            "spec.analysis.alerts[0].severity: `critical` is not supported, expected info, warn or error",
            "spec.analysis.alerts[1].name: duplicate name `a`; names must be unique",
            "spec.analysis.alerts[1].providerRef.name: is required: the name of an AlertProvider",
        ]
    );
}

#[test]
fn mirroring_is_refused_because_the_filters_never_see_the_mirrored_answers() {
    let yaml = with_analysis("analysis:\n  iterations: 5\n  mirror: true\n  mirrorWeight: 50");
    let e = errors(&yaml);
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(
        e[0].starts_with("spec.analysis.mirror: not supported yet: Weir measures the canary in the callers' filters"),
        "{e:?}"
    );
    assert!(e[0].contains("without the mirrored traffic"), "{e:?}");
    // mirrorWeight alone mirrors nothing, as in Flagger.
    let yaml = with_analysis("analysis:\n  iterations: 5\n  mirrorWeight: 50");
    assert_eq!(
        warnings(&yaml),
        vec!["spec.analysis.mirrorWeight: ignored, mirrorWeight is the share of traffic mirrored with mirror: true"]
    );
}

#[test]
fn session_affinity_compiles_with_flaggers_default_max_age_and_checks_cookie_names() {
    let yaml = with_analysis(
        "analysis:\n  stepWeight: 10\n  sessionAffinity: {cookieName: flagger-cookie, primaryCookieName: flagger-primary}",
    );
    let c = compile(&yaml).unwrap_or_else(|e| panic!("{e}"));
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);
    assert_eq!(
        c.plan.analysis.session_affinity,
        Some(SessionAffinityPlan {
            cookie_name: "flagger-cookie".into(),
            max_age: Duration::from_secs(86_400),
            primary_cookie_name: Some("flagger-primary".into()),
        })
    );
    let yaml = with_analysis(
        "analysis:\n  stepWeight: 10\n  sessionAffinity: {cookieName: \"a;b\", primaryCookieName: \"a;b\"}",
    );
    let e = errors(&yaml);
    assert!(
        e[0].starts_with("spec.analysis.sessionAffinity.cookieName: `a;b` is not a cookie name"),
        "{e:?}"
    );
    assert_eq!(e.len(), 2, "{e:?}");
}

#[test]
fn step_weights_must_increase() {
    let yaml = with_analysis("analysis:\n  stepWeights: [1, 10, 5]");
    assert_eq!(
        errors(&yaml),
        vec!["spec.analysis.stepWeights: must be strictly increasing, got [1, 10, 5]"]
    );
    let yaml = with_analysis("analysis:\n  stepWeights: [1, 101]");
    assert_eq!(
        errors(&yaml),
        vec!["spec.analysis.stepWeights[1]: must be between 1 and 100, got 101"]
    );
}

#[test]
fn step_weights_end_at_their_last_entry_and_max_weight_is_ignored() {
    let yaml = with_analysis("analysis:\n  stepWeights: [1, 5, 25, 60]\n  maxWeight: 30");
    let c = compile(&yaml).unwrap_or_else(|e| panic!("{e}"));
    let Strategy::Canary { steps } = &c.plan.analysis.strategy else {
        panic!()
    };
    assert_eq!(steps.max(), w(60));
    assert_eq!(
        c.warnings[0].to_string(),
        "spec.analysis.maxWeight: ignored, with stepWeights the last entry is the maximum weight"
    );
}

#[test]
fn an_analysis_without_a_way_to_move_traffic_is_an_error() {
    let yaml = with_analysis("analysis:\n  interval: 1m");
    let e = errors(&yaml);
    assert_eq!(e.len(), 1);
    assert!(e[0].starts_with("spec.analysis: is required: set stepWeight or stepWeights"));
}

#[test]
fn iterations_without_match_is_blue_green() {
    let yaml = with_analysis("analysis:\n  iterations: 3\n  stepWeight: 10");
    let c = compile(&yaml).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        c.plan.analysis.strategy,
        Strategy::BlueGreen {
            iterations: std::num::NonZeroU32::new(3).unwrap()
        }
    );
    assert_eq!(
        c.warnings[0].to_string(),
        "spec.analysis.stepWeight: ignored, iterations is set, so traffic does not shift by weight"
    );
}

#[test]
fn an_ab_match_that_cannot_be_honoured_is_an_error_not_a_warning() {
    let yaml = with_analysis(
        "analysis:
  iterations: 3
  match:
  - queryParams: {beta: {exact: 'yes'}}
  - headers:
      x-user: {suffix: '@example.com'}
  - headers:
      x-canary: {exact: a, prefix: b}",
    );
    let e = errors(&yaml);
    assert_eq!(e.len(), 4, "{e:#?}");
    assert!(e[0].starts_with("spec.analysis.match[0].queryParams: not supported yet:"));
    assert!(e[1].starts_with("spec.analysis.match[0].headers: is required"));
    assert!(e[2].starts_with("spec.analysis.match[1].headers.x-user.suffix: not supported yet"));
    assert_eq!(
        e[3],
        "spec.analysis.match[2].headers.x-canary: set exactly one of exact, prefix or regex"
    );
}

#[test]
fn a_bad_duration_explains_the_go_syntax() {
    let yaml = with_analysis(
        "analysis:
  stepWeight: 10
  metrics:
  - name: request-duration
    thresholdRange: {max: 500}
    interval: 30",
    );
    assert_eq!(
        errors(&yaml),
        vec!["spec.analysis.metrics[0].interval: `30` is not a duration (missing unit after `30` (use ns, us, ms, s, m or h)); write it like 30s, 1m, 1m30s or 500ms"]
    );
}

#[test]
fn metrics_need_a_sensible_threshold_range() {
    let yaml = with_analysis(
        "analysis:
  stepWeight: 10
  metrics:
  - name: request-success-rate
  - name: request-duration
    thresholdRange: {min: 600, max: 500}
  - name: request-success-rate-2
    query: 'sum(rate(x[1m]))'
    thresholdRange: {max: 1}",
    );
    let e = errors(&yaml);
    assert_eq!(
        e,
        vec![
            "spec.analysis.metrics[0].thresholdRange: is required: e.g. {min: 99} (percent)",
            "spec.analysis.metrics[1].thresholdRange: set min and/or max as finite numbers, with min <= max",
        ]
    );
}

#[test]
fn a_deprecated_single_threshold_becomes_a_range() {
    let yaml = with_analysis(
        "analysis:
  stepWeight: 10
  metrics:
  - name: request-success-rate
    threshold: 99
  - name: request-duration
    threshold: 500",
    );
    let c = compile(&yaml).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.plan.analysis.metrics[0].range.min(), Some(99.0));
    assert_eq!(c.plan.analysis.metrics[1].range.max(), Some(500.0));
    assert_eq!(
        c.warnings[0].to_string(),
        "spec.analysis.metrics[0].threshold: deprecated, use thresholdRange instead"
    );
}

#[test]
fn webhook_names_must_be_unique_and_types_known() {
    let yaml = with_analysis(
        "analysis:
  stepWeight: 10
  webhooks:
  - name: load
    url: http://a/
  - name: load
    type: pre-rollout
    url: ftp://b/
  - name: other
    type: pre-promotion
    url: http://c/",
    );
    let e = errors(&yaml);
    assert_eq!(
        e[0],
        "spec.analysis.webhooks[1].name: duplicate name `load`; names must be unique"
    );
    assert_eq!(
        e[1],
        "spec.analysis.webhooks[1].url: `ftp://b/` must start with http:// or https://"
    );
    assert!(e[2].starts_with(
        "spec.analysis.webhooks[2].type: `pre-promotion` is not supported, expected confirm-rollout, pre-rollout, rollout,"
    ));
}

#[test]
fn skip_analysis_needs_no_analysis_block() {
    let yaml = with_analysis("skipAnalysis: true");
    let plan = compile(&yaml).unwrap_or_else(|e| panic!("{e}")).plan;
    assert!(plan.skip_analysis);
    let yaml = with_analysis("");
    assert_eq!(
        errors(&yaml),
        vec!["spec.analysis: is required: set interval, threshold and stepWeight, stepWeights or iterations (or set spec.skipAnalysis: true)"]
    );
}

#[test]
fn the_deprecated_canary_analysis_key_still_works() {
    let yaml = with_analysis("canaryAnalysis:\n  stepWeight: 25");
    let c = compile(&yaml).unwrap_or_else(|e| panic!("{e}"));
    let Strategy::Canary { steps } = &c.plan.analysis.strategy else {
        panic!()
    };
    assert_eq!(steps.weights().len(), 4);
    assert_eq!(
        c.warnings[0].to_string(),
        "spec.canaryAnalysis: deprecated, use spec.analysis instead"
    );
}

#[test]
fn api_version_and_kind_are_checked() {
    let yaml = with_analysis("analysis:\n  stepWeight: 10")
        .replace("weir.dev/v1alpha1", "argoproj.io/v1alpha1")
        .replace("kind: Canary", "kind: Rollout");
    assert_eq!(
        errors(&yaml),
        vec![
            "apiVersion: `argoproj.io/v1alpha1` is not supported, expected weir.dev/v1alpha1 (or flagger.app/v1beta1)",
            "kind: `Rollout` is not supported, expected Canary",
        ]
    );
}

#[test]
fn a_wrongly_typed_field_fails_to_parse_with_its_location() {
    let yaml = with_analysis("analysis:\n  stepWeight: ten");
    let err = from_yaml(&yaml).unwrap_err().to_string();
    assert!(err.starts_with("cannot parse the Canary:"), "{err}");
    assert!(err.contains("line"), "{err}");
}

#[test]
fn a_canary_survives_a_json_round_trip() {
    for text in [FLAGGER_MHS, WEIR_AB] {
        let canary = from_yaml(text).unwrap();
        let json = serde_json::to_string(&canary).unwrap();
        let back = from_json(&json).unwrap();
        assert_eq!(back, canary);
        assert_eq!(back.compile(), canary.compile());
    }
}

#[test]
fn the_namespace_defaults_to_default() {
    let yaml =
        with_analysis("analysis:\n  stepWeight: 10").replace("  namespace: application\n", "");
    let plan = compile(&yaml).unwrap_or_else(|e| panic!("{e}")).plan;
    assert_eq!(plan.id(), "mhs.default");
}

#[test]
fn the_retry_token_comes_from_the_weir_retry_annotation() {
    let yaml = with_analysis("analysis:\n  stepWeight: 10").replace(
        "  namespace: application\n",
        "  namespace: application\n  annotations:\n    weir.dev/retry: \"2024-05-01T11:00:00Z\"\n",
    );
    let canary = from_yaml(&yaml).unwrap();
    assert_eq!(canary.retry_token(), Some("2024-05-01T11:00:00Z"));
    assert_eq!(from_yaml(&with_analysis("")).unwrap().retry_token(), None);
}

#[test]
fn with_step_weight_and_step_weights_the_last_entry_is_the_maximum_weight_as_in_flagger() {
    let yaml =
        with_analysis("analysis:\n  stepWeight: 10\n  stepWeights: [5, 20, 35]\n  maxWeight: 50");
    let compiled = compile(&yaml).unwrap_or_else(|e| panic!("{e}"));
    let Strategy::Canary { steps } = &compiled.plan.analysis.strategy else {
        panic!("expected a progressive canary")
    };
    // stepWeight sizes the steps, the last stepWeights entry caps them (never above it).
    assert_eq!(steps.weights(), &[w(10), w(20), w(30), w(35)]);
    assert_eq!(
        warnings(&yaml),
        vec![
            "spec.analysis.stepWeights: ignored, stepWeight is set and takes precedence, except that the last entry is the maximum weight, as in Flagger",
            "spec.analysis.maxWeight: ignored, with stepWeights the last entry is the maximum weight",
        ]
    );
}

#[test]
fn a_canary_survives_a_json_round_trip_with_its_numbers_exact() {
    // Found by the Canary fuzz target: without serde_json's exact float parsing,
    // 5.033333333333334e+108 came back from a JSON round trip as ...335e+108.
    let yaml =
        with_analysis("  threshold: 2\n  iterations: 10\n  someNumber: 5.033333333333334e+108\n");
    let canary: Canary = serde_yaml::from_str(&yaml).unwrap();
    let json = serde_json::to_string(&canary).unwrap();
    let back: Canary = serde_json::from_str(&json).unwrap();
    assert_eq!(back, canary, "{json}");
}
