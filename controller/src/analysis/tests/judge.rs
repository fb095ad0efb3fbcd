//! The comparative judge in the engine: continuous rollback, verdicts in the history, the Pass
//! requirement, and nothing changed for a Canary without it.

use super::*;
use crate::analysis::judge::{BucketPair, VersionCounts};

/// The tutorial's analysis without the fixed success-rate check, with the judge.
fn judged(judge: &str) -> CanaryPlan {
    plan_with(
        "",
        &format!(
            "
  interval: 1m
  maxWeight: 50
  stepWeight: 10
  threshold: 5
  metrics:
  - name: request-duration
    thresholdRange: {{max: 500}}
    interval: 30s
  judge: {judge}"
        ),
    )
}

fn bucket(canary: (u64, u64), primary: (u64, u64)) -> BucketPair {
    BucketPair {
        canary: VersionCounts {
            requests: canary.0,
            failures: canary.1,
            slow: vec![],
        },
        primary: VersionCounts {
            requests: primary.0,
            failures: primary.1,
            slow: vec![],
        },
    }
}

#[test]
fn a_canary_the_judge_finds_worse_is_rolled_back_between_intervals_with_the_evidence() {
    let mut sim = Sim::new(judged("{confidence: 0.99}")).at_weight(10);
    let status = sim.status.clone();
    // Half a minute into the step: not due, but the canary fails half its requests.
    sim.now = sim.now.saturating_add(secs(30));
    sim.served = vec![
        bucket((8, 4), (72, 0)),
        bucket((8, 5), (70, 1)),
        bucket((7, 4), (71, 0)),
    ];
    let step = sim.step();
    assert_eq!(
        messages(&step),
        vec![
            "Rolling back mhs.application: canary failure rate 56.5% vs primary 0.5% (sequential test, 99% confidence, 23 canary requests in 3s)",
            "Canary failed! Scaling down mhs.application",
        ]
    );
    assert_eq!(
        actions(&step),
        vec![
            Effect::Route(Route::Primary),
            Effect::ScaleCanary(Scale::Down)
        ]
    );
    assert_eq!(sim.status.phase, Some(Phase::Failed));
    assert_eq!(
        sim.status.failed_checks, status.failed_checks,
        "not a failed check"
    );
    let decision = sim.status.decisions.last().unwrap();
    let judge = decision
        .judge
        .as_ref()
        .expect("the verdict is in the history");
    assert_eq!(
        (
            judge.verdict.as_str(),
            judge.by.as_str(),
            judge.canary_failures,
            judge.primary_requests
        ),
        ("fail", "errors", 13, 213)
    );
    // The evidence covers the whole attempt: asked from the analysis' start.
    assert_eq!(sim.judged_since.last(), status.analysis_started.as_ref());
}

#[test]
fn between_intervals_a_judge_without_a_conclusion_changes_nothing_and_records_nothing() {
    let mut sim = Sim::new(judged("{}")).at_weight(20);
    let before = sim.status.clone();
    sim.now = sim.now.saturating_add(secs(10));
    sim.served = vec![bucket((10, 1), (40, 0))];
    let step = sim.step();
    assert!(step.effects.is_empty(), "{:?}", step.effects);
    assert_eq!(sim.status, before);
}

#[test]
fn both_versions_failing_alike_is_no_reason_to_roll_back_and_the_advance_says_why() {
    let mut sim = Sim::new(judged("{}")).at_weight(10);
    // Client-requested 500s: half the requests of both versions fail.
    sim.served = (0..60).map(|_| bucket((10, 5), (90, 45))).collect();
    let step = sim.tick();
    assert_eq!(
        messages(&step),
        vec!["Advance mhs.application canary weight 20 (request-duration 120ms (max 500ms; 1000 requests in 30s from streamed); judge pass: canary failure rate 50.0% vs primary 50.0%, not worse beyond 1.5x (sequential test, 99% confidence, 600 canary requests in 1m0s))"]
    );
    let judge = sim.status.decisions.last().unwrap().judge.clone().unwrap();
    assert_eq!(judge.verdict, "pass");
}

#[test]
fn with_require_pass_a_step_waits_for_the_judges_pass_without_counting_a_failure() {
    let mut sim = Sim::new(judged("{requirePass: true}")).at_weight(10);
    sim.served = vec![bucket((5, 0), (45, 0))];
    let step = sim.tick();
    assert_eq!(
        messages(&step),
        vec!["Halt mhs.application advancement: the judge has not passed the canary yet (judge continue: canary failure rate 0.0% vs primary 0.0%, no conclusion yet (sequential test, 99% confidence, 5 canary requests in 1s))"]
    );
    assert_eq!(
        (
            sim.status.canary_weight,
            sim.status.failed_checks,
            sim.status.inconclusive_checks
        ),
        (w(10), 0, 1)
    );
    sim.served = (0..60).map(|_| bucket((10, 5), (90, 45))).collect();
    sim.tick();
    assert_eq!(sim.status.canary_weight, w(20));
}

#[test]
fn a_canary_without_the_judge_never_asks_for_its_evidence() {
    let mut sim = Sim::new(mhs()).at_weight(30);
    sim.now = sim.now.saturating_add(secs(20));
    sim.step();
    sim.tick();
    assert!(sim.judged_since.is_empty());
    assert!(sim.status.decisions.iter().all(|d| d.judge.is_none()));
}

#[test]
fn the_judge_field_compiles_with_defaults_and_refuses_bad_values() {
    let plan = judged("{latencyRatio: 1.2}");
    let judge = plan.analysis.judge.unwrap();
    assert_eq!(
        (
            judge.confidence,
            judge.error_ratio,
            judge.latency_ratio,
            judge.require_pass
        ),
        (0.99, 1.5, Some(1.2), false)
    );
    let yaml = "apiVersion: weir.dev/v1alpha1\nkind: Canary\nmetadata: {name: mhs, namespace: application}\nspec:\n  targetRef: {apiVersion: apps/v1, kind: Deployment, name: mhs}\n  service: {port: 80}\n  analysis:\n    stepWeight: 10\n    judge: {confidence: 1.0, errorRatio: 0.5}\n";
    let errors = match spec::load_yaml(yaml) {
        Err(spec::SpecError::Invalid(errors)) => errors.to_string(),
        other => panic!("expected validation errors, got {other:?}"),
    };
    assert!(
        errors.contains("spec.analysis.judge.confidence: must be above 0.5 and below 1"),
        "{errors}"
    );
    assert!(
        errors.contains("spec.analysis.judge.errorRatio: must be a ratio of at least 1"),
        "{errors}"
    );
}
