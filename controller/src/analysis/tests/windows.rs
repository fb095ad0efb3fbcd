//! What a check may count: only what the current step served (issue 9 item 5).

use super::*;

/// Steps every 30s, metric windows of 2m: a window reaches back four steps unless cut.
fn long_windows() -> CanaryPlan {
    plan_with("", &long_windows_analysis())
}

/// The window each check of the last decision was measured over.
fn windows(sim: &Sim) -> Vec<Duration> {
    let decision = sim.status.decisions.last().expect("a decision");
    decision.checks.iter().map(|c| c.window).collect()
}

#[test]
fn the_long_windows_plan_is_what_the_tests_below_assume() {
    let plan = long_windows();
    assert_eq!(plan.analysis.interval, secs(30));
    let windows: Vec<Duration> = plan.analysis.metrics.iter().map(|m| m.window).collect();
    assert_eq!(windows, vec![secs(120), secs(120)]);
}

#[test]
fn a_check_right_after_a_weight_change_counts_only_the_new_weight() {
    let mut sim = Sim::new(long_windows()).at_weight(10);
    sim.tick();
    assert_eq!(sim.status.canary_weight, w(20));
    assert_eq!(
        windows(&sim),
        vec![secs(30), secs(30)],
        "not the 2m reaching back to 10%"
    );
    assert_eq!(sim.status.routed_since, Some(sim.now));
}

#[test]
fn while_the_weight_holds_the_window_grows_up_to_the_metric_interval() {
    let mut sim = Sim::new(long_windows()).at_weight(20);
    sim.fail_metric(REQUEST_SUCCESS_RATE, 90.0, 1000);
    let mut seen = vec![];
    for _ in 0..4 {
        sim.tick();
        seen.push(windows(&sim)[1]);
    }
    assert_eq!(sim.status.canary_weight, w(20), "held by the failing check");
    assert_eq!(seen, vec![secs(30), secs(60), secs(90), secs(120)]);
    sim.tick();
    assert_eq!(
        windows(&sim)[1],
        secs(120),
        "never beyond the metric's interval"
    );
}

#[test]
fn a_retried_analysis_counts_nothing_the_failed_attempt_served() {
    let mut sim = Sim::new(long_windows()).at_weight(20);
    sim.status.failed_checks = 5;
    sim.tick();
    assert_eq!(sim.status.phase, Some(Phase::Failed));
    sim.obs.retry = Some("t1".into());
    sim.now = sim.now.saturating_add(secs(5));
    sim.step();
    assert_eq!(
        sim.status.routed_since,
        Some(sim.now),
        "the retry starts the clock"
    );
    sim.tick(); // Starting canary analysis, weight 10
    assert_eq!(sim.status.canary_weight, w(10));
    sim.tick(); // the first check of the new attempt
    assert_eq!(windows(&sim), vec![secs(30), secs(30)]);
}

#[test]
fn a_new_revision_during_an_analysis_counts_nothing_the_old_one_served() {
    let mut sim = Sim::new(long_windows()).at_weight(30);
    sim.obs.revision = "r3".into();
    sim.tick();
    assert_eq!(sim.status.routed_since, Some(sim.now));
    sim.tick(); // weight 10 on r3
    sim.tick();
    assert_eq!(windows(&sim), vec![secs(30), secs(30)]);
}

#[test]
fn a_step_that_came_late_is_cut_to_whole_tenths_of_a_second() {
    let mut sim = Sim::new(long_windows()).at_weight(10);
    sim.now = next_step_at(&sim.plan, &sim.status).saturating_add(Duration::from_millis(1_234));
    sim.step();
    assert_eq!(windows(&sim), vec![Duration::from_millis(31_200); 2]);
}

#[test]
fn a_status_without_the_step_start_uses_the_whole_window() {
    // Written by Flagger or an older Weir: nothing says when the step began.
    let mut sim = Sim::new(long_windows()).at_weight(10);
    sim.status.routed_since = None;
    sim.tick();
    assert_eq!(windows(&sim), vec![secs(120), secs(120)]);
}

#[test]
fn too_little_data_while_the_window_fills_never_counts_as_a_failure() {
    let plan = plan_with(
        "",
        &format!(
            "{}\n  inconclusiveCountsAsFailure: true\n  minSampleCount: 100",
            long_windows_analysis()
        ),
    );
    let mut sim = Sim::new(plan).at_weight(10);
    sim.fail_metric(REQUEST_SUCCESS_RATE, 100.0, 40);
    for _ in 0..3 {
        sim.tick(); // windows of 30s, 60s, 90s: still filling
    }
    let s = &sim.status;
    assert_eq!((s.inconclusive_checks, s.failed_checks), (3, 0));
    sim.tick(); // a full 2m window with too few requests: now it counts
    let s = &sim.status;
    assert_eq!((s.inconclusive_checks, s.failed_checks), (4, 1));
}

/// The analysis block of [`long_windows`].
fn long_windows_analysis() -> String {
    MHS_ANALYSIS
        .replace("interval: 1m", "interval: 30s")
        .replace(
            "interval: 30s\n  - name: request-duration",
            "interval: 2m\n  - name: request-duration",
        )
        .replace(
            "thresholdRange: {max: 500}\n    interval: 30s",
            "thresholdRange: {max: 500}\n    interval: 2m",
        )
}
