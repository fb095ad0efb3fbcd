//! Halts, failed checks, rollbacks, readiness and deadlines.

use super::*;

#[test]
fn a_failing_success_rate_halts_and_counts_one_failed_check() {
    let mut sim = Sim::new(mhs()).at_weight(20);
    sim.fail_metric(REQUEST_SUCCESS_RATE, 57.142857, 1400);
    let step = sim.tick();
    assert_eq!(
        messages(&step),
        vec!["Halt mhs.application advancement success rate 57.14% < 99% (1400 requests in 30s from streamed)"]
    );
    assert_eq!(actions(&step), vec![]);
    assert_eq!(step.events().next().unwrap().severity, Severity::Warning);
    let s = &sim.status;
    assert_eq!(
        (s.phase, s.canary_weight, s.failed_checks),
        (Some(Phase::Progressing), w(20), 1)
    );
    assert_eq!(s.decisions.last().unwrap().checks[0].verdict, Verdict::Fail);
}

#[test]
fn a_slow_canary_halts_with_flaggers_duration_message() {
    let mut sim = Sim::new(mhs()).at_weight(20);
    sim.fail_metric(REQUEST_DURATION, 1200.0, 800);
    let step = sim.tick();
    assert_eq!(
        messages(&step),
        vec!["Halt mhs.application advancement request duration 1.2s > 500ms (800 requests in 30s from streamed)"]
    );
    assert_eq!(sim.status.failed_checks, 1);
}

#[test]
fn two_failing_metrics_give_two_messages_but_one_failed_check() {
    let mut sim = Sim::new(mhs()).at_weight(20);
    sim.fail_metric(REQUEST_SUCCESS_RATE, 90.0, 1000);
    sim.fail_metric(REQUEST_DURATION, 900.0, 1000);
    let step = sim.tick();
    assert_eq!(messages(&step).len(), 2);
    assert_eq!(sim.status.failed_checks, 1);
}

#[test]
fn failed_checks_accumulate_across_steps_and_passing_steps_keep_the_count() {
    let mut sim = Sim::new(mhs()).at_weight(10);
    sim.fail_metric(REQUEST_SUCCESS_RATE, 90.0, 1000);
    sim.tick();
    sim.tick();
    sim.heal();
    sim.tick();
    let s = &sim.status;
    assert_eq!((s.failed_checks, s.canary_weight), (2, w(20)));
}

#[test]
fn reaching_the_threshold_rolls_back_on_that_same_step() {
    let mut sim = Sim::new(mhs()).at_weight(30);
    sim.fail_metric(REQUEST_SUCCESS_RATE, 90.0, 1000);
    for _ in 0..4 {
        sim.tick();
    }
    assert_eq!(sim.status.failed_checks, 4);
    let step = sim.tick();
    assert_eq!(
        messages(&step),
        vec![
            "Halt mhs.application advancement success rate 90.00% < 99% (1000 requests in 30s from streamed)",
            "Rolling back mhs.application failed checks threshold reached 5",
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
    let s = &sim.status;
    assert_eq!(
        (s.phase, s.canary_weight, s.failed_checks),
        (Some(Phase::Failed), Weight::ZERO, 5)
    );
    let condition = s.promoted_condition().unwrap();
    assert_eq!(
        (condition.status.as_str(), condition.message.as_str()),
        (
            "False",
            "Canary analysis failed, Deployment scaled to zero."
        )
    );
}

#[test]
fn a_threshold_of_one_rolls_back_on_the_first_failure() {
    let plan = plan_with("", &MHS_ANALYSIS.replace("threshold: 5", "threshold: 0"));
    assert_eq!(plan.analysis.threshold.get(), 1, "Flagger reads 0 as 1");
    let mut sim = Sim::new(plan).at_weight(10);
    sim.fail_metric(REQUEST_DURATION, 501.0, 1000);
    sim.tick();
    assert_eq!(sim.status.phase, Some(Phase::Failed));
}

#[test]
fn a_persisted_status_already_at_the_threshold_rolls_back_on_the_next_step() {
    let mut sim = Sim::new(mhs()).at_weight(20);
    sim.status.failed_checks = 5;
    sim.rounds.clear();
    let step = sim.tick();
    assert!(sim.rounds.is_empty(), "no checks needed to roll back");
    assert_eq!(
        messages(&step)[0],
        "Rolling back mhs.application failed checks threshold reached 5"
    );
    assert_eq!(sim.status.phase, Some(Phase::Failed));
}

#[test]
fn a_failed_canary_stays_failed_until_a_new_revision() {
    let mut sim = Sim::new(mhs()).at_weight(10);
    sim.status.failed_checks = 5;
    sim.tick();
    for _ in 0..3 {
        let step = sim.tick();
        assert!(step.effects.is_empty(), "{:?}", step.effects);
    }
    assert_eq!(sim.status.phase, Some(Phase::Failed));
    sim.obs.revision = "r3".into();
    sim.tick();
    assert_eq!(sim.status.phase, Some(Phase::Progressing));
    assert_eq!(sim.status.failed_checks, 0);
}

#[test]
fn too_little_data_is_inconclusive_and_only_halts() {
    let mut sim = Sim::new(mhs()).at_weight(20);
    sim.fail_metric(REQUEST_SUCCESS_RATE, 100.0, 3);
    let step = sim.tick();
    assert_eq!(
        messages(&step),
        vec!["Halt mhs.application advancement: request-success-rate inconclusive, 3 requests in 30s < minSampleCount 20 (from streamed)"]
    );
    let s = &sim.status;
    assert_eq!(
        (s.canary_weight, s.failed_checks, s.inconclusive_checks),
        (w(20), 0, 1)
    );
    assert_eq!(
        s.decisions.last().unwrap().checks[0].verdict,
        Verdict::Inconclusive
    );
}

#[test]
fn inconclusive_steps_are_not_carried_into_a_success() {
    let mut sim = Sim::new(mhs()).at_weight(20);
    sim.fail_metric(REQUEST_SUCCESS_RATE, 100.0, 3);
    sim.tick();
    assert_eq!(sim.status.inconclusive_checks, 1);
    sim.metrics.clear();
    for _ in 0..20 {
        if sim.status.phase == Some(Phase::Succeeded) {
            break;
        }
        sim.tick();
    }
    assert_eq!(sim.status.phase, Some(Phase::Succeeded));
    assert_eq!(sim.status.inconclusive_checks, 0);
}

#[test]
fn no_data_at_all_is_inconclusive_in_flaggers_words() {
    let mut sim = Sim::new(mhs()).at_weight(20);
    let window = sim.window(REQUEST_DURATION);
    sim.metrics.insert(
        REQUEST_DURATION.into(),
        Measurement::no_data(REQUEST_DURATION, "prometheus", window, None),
    );
    let step = sim.tick();
    assert_eq!(
        messages(&step),
        vec!["Halt advancement no values found for istio metric request-duration probably mhs.application is not receiving traffic (in 30s from prometheus)"]
    );
    assert_eq!(sim.status.failed_checks, 0);
}

#[test]
fn inconclusive_counts_as_a_failure_when_the_spec_says_so() {
    let plan = mhs_plus("  inconclusiveCountsAsFailure: true\n  minSampleCount: 100");
    let mut sim = Sim::new(plan).at_weight(20);
    sim.fail_metric(REQUEST_SUCCESS_RATE, 100.0, 99);
    sim.tick();
    let s = &sim.status;
    assert_eq!((s.failed_checks, s.inconclusive_checks), (1, 1));
}

#[test]
fn a_fail_outweighs_an_inconclusive_in_the_same_step() {
    let mut sim = Sim::new(mhs()).at_weight(20);
    sim.fail_metric(REQUEST_SUCCESS_RATE, 80.0, 1000);
    sim.fail_metric(REQUEST_DURATION, 100.0, 5);
    let step = sim.tick();
    assert_eq!(messages(&step).len(), 2);
    assert_eq!(
        (sim.status.failed_checks, sim.status.inconclusive_checks),
        (1, 0)
    );
}

#[test]
fn a_broken_source_halts_without_counting_and_names_the_cause() {
    let mut sim = Sim::new(mhs()).at_weight(20);
    let window = sim.window(REQUEST_SUCCESS_RATE);
    sim.metrics.insert(
        REQUEST_SUCCESS_RATE.into(),
        Measurement::error(
            REQUEST_SUCCESS_RATE,
            "prometheus",
            window,
            "Get \"http://127.0.0.1:9090/api/v1/query\": connection refused",
        ),
    );
    let step = sim.tick();
    assert_eq!(
        messages(&step),
        vec!["Prometheus query failed: Get \"http://127.0.0.1:9090/api/v1/query\": connection refused"]
    );
    let s = &sim.status;
    assert_eq!(
        (s.canary_weight, s.failed_checks, s.inconclusive_checks),
        (w(20), 0, 0)
    );
}

#[test]
fn a_metric_the_executor_did_not_report_is_an_error_not_a_pass() {
    let mut sim = Sim::new(mhs()).at_weight(20);
    sim.unreported.push(REQUEST_DURATION.into());
    let step = sim.tick();
    assert_eq!(
        messages(&step),
        vec!["Halt mhs.application advancement: request-duration could not be checked, none error: no measurement was reported for this metric"]
    );
    assert_eq!(sim.status.canary_weight, w(20));
}

#[test]
fn a_canary_that_is_not_ready_halts_without_checks_or_failures() {
    let mut sim = Sim::new(mhs()).at_weight(20);
    sim.obs.canary = Readiness::NotReady(
        "waiting for rollout to finish: 1 of 2 (readyThreshold 100%) updated replicas are available"
            .into(),
    );
    let rounds = sim.rounds.len();
    let step = sim.tick();
    assert_eq!(
        messages(&step),
        vec!["canary deployment mhs.application not ready: waiting for rollout to finish: 1 of 2 (readyThreshold 100%) updated replicas are available"]
    );
    assert_eq!(sim.rounds.len(), rounds, "no metrics asked for");
    let s = &sim.status;
    assert_eq!((s.canary_weight, s.failed_checks), (w(20), 0));
}

const NOT_AVAILABLE: &str =
    "waiting for rollout to finish: 0 of 1 (readyThreshold 100%) updated replicas are available";

#[test]
fn a_canary_not_ready_past_the_progress_deadline_rolls_back() {
    let plan = plan_with("progressDeadlineSeconds: 150", MHS_ANALYSIS);
    let mut sim = Sim::new(plan).progressing();
    sim.obs.canary = Readiness::NotReady(NOT_AVAILABLE.into());
    sim.tick(); // 60s after the scale-up
    sim.tick(); // 120s
    assert_eq!(sim.status.phase, Some(Phase::Progressing));
    let step = sim.tick(); // 180s > 150s
    assert_eq!(
        messages(&step),
        vec![
            "canary deployment mhs.application not ready: waiting for rollout to finish: 0 of 1 (readyThreshold 100%) updated replicas are available (not ready for 3m0s, progress deadline 2m30s)",
            "Canary failed! Scaling down mhs.application",
        ]
    );
    assert_eq!(sim.status.phase, Some(Phase::Failed));
    assert_eq!(sim.status.not_ready_since, None);
}

#[test]
fn a_canary_not_ready_for_exactly_the_deadline_is_not_rolled_back_yet() {
    // Flagger rolls back only strictly after the deadline (`from.Add(deadline).Before(now)`).
    let plan = plan_with("progressDeadlineSeconds: 120", MHS_ANALYSIS);
    let mut sim = Sim::new(plan).progressing();
    sim.obs.canary = Readiness::NotReady(NOT_AVAILABLE.into());
    sim.tick(); // 60s after the scale-up
    let step = sim.tick(); // 120s: at the deadline, not past it
    assert_eq!(
        messages(&step),
        vec![format!(
            "canary deployment mhs.application not ready: {NOT_AVAILABLE}"
        )]
    );
    assert_eq!(sim.status.phase, Some(Phase::Progressing));
    sim.tick(); // 180s
    assert_eq!(sim.status.phase, Some(Phase::Failed));
}

#[test]
fn a_primary_not_ready_past_the_progress_deadline_during_analysis_rolls_back() {
    let plan = plan_with("progressDeadlineSeconds: 150", MHS_ANALYSIS);
    let mut sim = Sim::new(plan).at_weight(20);
    sim.obs.primary = Readiness::NotReady(NOT_AVAILABLE.into());
    for _ in 0..3 {
        let step = sim.tick(); // first seen, +60s, +120s
        assert_eq!(
            messages(&step),
            vec![format!(
                "mhs-primary.application not ready: {NOT_AVAILABLE}"
            )]
        );
    }
    let step = sim.tick(); // +180s > 150s
    assert_eq!(
        messages(&step),
        vec![
            format!("mhs-primary.application not ready: {NOT_AVAILABLE} (not ready for 3m0s, progress deadline 2m30s)"),
            "Canary failed! Scaling down mhs.application".to_string(),
        ]
    );
    assert_eq!(
        actions(&step),
        vec![
            Effect::Route(Route::Primary),
            Effect::ScaleCanary(Scale::Down)
        ]
    );
    let s = &sim.status;
    assert_eq!(
        (s.phase, s.canary_weight),
        (Some(Phase::Failed), Weight::ZERO)
    );
    assert_eq!(s.primary_not_ready_since, None);
}

#[test]
fn a_primary_not_ready_past_the_deadline_while_promoting_fails_the_promotion_onto_the_canary() {
    let plan = plan_with(
        "progressDeadlineSeconds: 150",
        &format!("{MHS_ANALYSIS}\n  webhooks:\n  - name: notify\n    type: post-rollout\n    url: http://notify/"),
    );
    let mut sim = Sim::new(plan).at_weight(50);
    sim.tick();
    assert_eq!(sim.status.phase, Some(Phase::Promoting));
    // The promotion started the primary's rollout: its clock runs from there.
    sim.obs.primary = Readiness::NotReady(NOT_AVAILABLE.into());
    sim.tick(); // +60s
    sim.tick(); // +120s
    assert_eq!(sim.status.phase, Some(Phase::Promoting));
    let step = sim.tick(); // +180s > 150s
    assert_eq!(
        messages(&step),
        vec![
            format!("mhs-primary.application not ready: {NOT_AVAILABLE} (not ready for 3m0s, progress deadline 2m30s)"),
            format!("Promotion of mhs.application failed, primary not ready: mhs-primary.application not ready: {NOT_AVAILABLE}"),
        ]
    );
    assert_eq!(
        actions(&step),
        vec![
            Effect::Route(Route::Weighted(Weight::FULL)),
            Effect::CallWebhook(WebhookCall {
                webhook: sim.plan.analysis.webhooks[0].clone(),
                phase: Phase::Failed
            }),
        ],
        "all traffic to the canary, which keeps running"
    );
    let s = &sim.status;
    assert_eq!(
        (s.phase, s.canary_weight),
        (Some(Phase::Failed), Weight::FULL)
    );
    assert_eq!(
        desired_route(&sim.plan, s),
        Some(Route::Weighted(Weight::FULL))
    );
    assert!(canary_runs(s));
    assert!(sim.tick().effects.is_empty(), "Failed stays put");

    // Once the primary is fixed, a retry moves traffic back to it and analyses again.
    sim.obs.primary = Readiness::Ready;
    sim.obs.retry = Some("t1".into());
    let step = sim.tick();
    assert_eq!(
        actions(&step),
        vec![
            Effect::ScaleCanary(Scale::Up),
            Effect::Route(Route::Primary)
        ]
    );
    assert_eq!(
        (sim.status.phase, sim.status.canary_weight),
        (Some(Phase::Progressing), Weight::ZERO)
    );
}

#[test]
fn a_canary_that_becomes_ready_in_time_resets_the_deadline_clock() {
    let plan = plan_with("progressDeadlineSeconds: 150", MHS_ANALYSIS);
    let mut sim = Sim::new(plan).progressing();
    sim.obs.canary = Readiness::NotReady("starting".into());
    sim.tick();
    sim.tick();
    sim.obs.canary = Readiness::Ready;
    sim.tick();
    assert_eq!(sim.status.not_ready_since, None);
    sim.obs.canary = Readiness::NotReady("a pod crashed".into());
    sim.tick();
    sim.tick();
    assert_eq!(
        sim.status.phase,
        Some(Phase::Progressing),
        "the clock restarted"
    );
}

#[test]
fn a_primary_that_is_not_ready_halts_the_analysis() {
    let mut sim = Sim::new(mhs()).at_weight(20);
    sim.obs.primary = Readiness::NotReady(
        "waiting for rollout to finish: 1 old replicas are pending termination".into(),
    );
    let step = sim.tick();
    assert_eq!(
        messages(&step),
        vec!["mhs-primary.application not ready: waiting for rollout to finish: 1 old replicas are pending termination"]
    );
    assert_eq!(sim.status.canary_weight, w(20));
}

#[test]
fn promotion_waits_for_the_primary_to_roll_out_the_new_template() {
    let mut sim = Sim::new(mhs()).at_weight(50);
    sim.tick();
    assert_eq!(sim.status.phase, Some(Phase::Promoting));
    sim.obs.primary = Readiness::NotReady("1 of 2 updated replicas are available".into());
    let step = sim.tick();
    assert_eq!(actions(&step), vec![]);
    assert_eq!(sim.status.phase, Some(Phase::Promoting));
    assert_eq!(
        sim.status.canary_weight,
        w(50),
        "the canary keeps serving meanwhile"
    );
    sim.obs.primary = Readiness::Ready;
    sim.tick();
    assert_eq!(sim.status.phase, Some(Phase::Finalising));
}

#[test]
fn an_unready_canary_does_not_hold_a_promotion_that_moves_traffic_off_it() {
    let mut sim = Sim::new(mhs()).at_weight(50);
    sim.tick();
    assert_eq!(sim.status.phase, Some(Phase::Promoting));
    sim.obs.canary = Readiness::NotReady(NOT_AVAILABLE.into());
    let step = sim.tick();
    assert_eq!(messages(&step), vec!["Routing all traffic to primary"]);
    assert_eq!(sim.status.phase, Some(Phase::Finalising));
    let step = sim.tick();
    assert_eq!(
        messages(&step),
        vec!["Promotion completed! Scaling down mhs.application"]
    );
    assert_eq!(sim.status.phase, Some(Phase::Succeeded));
}

#[test]
fn alerts_are_raised_where_flagger_raises_them_with_its_severities() {
    use crate::spec::AlertSeverity::{Error, Info, Warn};
    let mut sim = Sim::new(mhs_plus(
        "  webhooks:\n  - name: more\n    type: confirm-traffic-increase\n    url: http://gate/\n  - name: quiet\n    type: confirm-traffic-increase\n    url: http://gate/\n    muteAlert: true",
    ));
    sim.hook("more", WebhookResult::Passed);
    sim.hook("quiet", WebhookResult::Passed);
    sim.tick();
    let initialized = sim.tick();
    assert_eq!(
        alerts(&initialized),
        vec![(
            Info,
            "New Deployment detected, initialization completed.".to_owned()
        )]
    );
    sim.obs.revision = "r2".into();
    let detected = sim.tick();
    assert_eq!(
        alerts(&detected),
        vec![(
            Info,
            "New revision detected, progressing canary analysis.".to_owned()
        )]
    );
    assert!(detected
        .effects
        .iter()
        .any(|e| matches!(e, Effect::Alert(a) if a.details)));
    sim.tick();
    sim.hook("more", failed());
    assert_eq!(
        alerts(&sim.tick()),
        vec![(
            Warn,
            "Canary traffic increase is waiting for approval.".to_owned()
        )]
    );
    // A muted gate holds the weight without an alert.
    sim.hook("more", WebhookResult::Passed);
    sim.hook("quiet", failed());
    let muted = sim.tick();
    assert!(alerts(&muted).is_empty(), "{:?}", muted.effects);
    sim.hook("quiet", WebhookResult::Passed);
    sim.fail_metric(REQUEST_SUCCESS_RATE, 90.0, 1000);
    let mut last = Vec::new();
    while sim.status.phase != Some(Phase::Failed) {
        last = alerts(&sim.tick());
    }
    assert_eq!(
        last,
        vec![(Error, "Failed checks threshold reached 5".to_owned())]
    );
}
