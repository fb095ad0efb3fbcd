//! Timing, idempotency and restart safety; retries; deletion.

use super::*;

fn promotions(step: &Step) -> usize {
    step.effects
        .iter()
        .filter(|e| matches!(e, Effect::PromotePrimary { .. }))
        .count()
}

#[test]
fn the_next_step_is_due_one_interval_after_the_last() {
    let mut sim = Sim::new(mhs());
    assert_eq!(next_step_at(&sim.plan, &sim.status), Timestamp::EPOCH);
    sim.tick();
    assert_eq!(
        next_step_at(&sim.plan, &sim.status),
        Timestamp::from_unix_millis(T0).saturating_add(secs(60))
    );
}

#[test]
fn stepping_before_the_interval_changes_nothing() {
    let mut sim = Sim::new(mhs()).at_weight(20);
    let before = sim.status.clone();
    for delay in [0, 1, 30, 59] {
        let at = sim.now.saturating_add(secs(delay));
        let mut early = Sim {
            now: at,
            ..Sim::new(sim.plan.clone())
        };
        early.status = before.clone();
        early.obs = sim.obs.clone();
        let step = early.step();
        assert!(step.effects.is_empty(), "at +{delay}s: {:?}", step.effects);
        assert_eq!(step.status, before);
    }
    // A clock that went backwards is not a reason to act either.
    sim.now = Timestamp::from_unix_millis(T0);
    assert!(sim.step().effects.is_empty());
}

#[test]
fn a_restart_right_after_an_advance_does_not_advance_again() {
    let mut sim = Sim::new(mhs()).at_weight(20);
    // The controller restarts 5 seconds later and steps at once from the persisted status.
    sim.now = sim.now.saturating_add(secs(5));
    let step = sim.step();
    assert!(step.effects.is_empty());
    assert_eq!(sim.status.canary_weight, w(20));
    // At the normal time it goes on, one step.
    sim.tick();
    assert_eq!(sim.status.canary_weight, w(30));
}

#[test]
fn the_same_inputs_always_give_the_same_step() {
    let mut sim = Sim::new(mhs()).at_weight(30);
    sim.fail_metric(REQUEST_DURATION, 700.0, 300);
    sim.now = next_step_at(&sim.plan, &sim.status);
    let status = sim.status.clone();
    let first = sim.decide(&status);
    let second = sim.decide(&status);
    assert_eq!(first, second);
    assert_eq!(first.status.failed_checks, 1);
}

#[test]
fn a_crash_before_the_status_is_saved_repeats_the_same_effects_not_new_ones() {
    let mut sim = Sim::new(mhs()).at_weight(50);
    sim.now = next_step_at(&sim.plan, &sim.status);
    let saved = sim.status.clone();
    let first = sim.decide(&saved);
    assert_eq!(promotions(&first), 1);
    // The executor copied the template, then died before saving: the replay asks for the same
    // promotion of the same revision (an idempotent copy), nothing else.
    let replay = sim.decide(&saved);
    assert_eq!(replay.effects, first.effects);
}

#[test]
fn replaying_a_promoting_status_never_promotes_twice() {
    let mut sim = Sim::new(mhs()).at_weight(50);
    sim.tick();
    assert_eq!(sim.status.phase, Some(Phase::Promoting));
    let promoting = sim.status.clone();
    // Restart: step the persisted Promoting status again, early and on time, repeatedly.
    for delay in [0, 1, 60, 61, 3600] {
        let mut again = Sim::new(sim.plan.clone());
        again.status = promoting.clone();
        again.obs = sim.obs.clone();
        again.now = sim.now.saturating_add(secs(delay));
        let step = again.step();
        assert_eq!(promotions(&step), 0, "+{delay}s: {:?}", step.effects);
    }
}

#[test]
fn a_whole_rollout_with_restarts_at_every_step_promotes_exactly_once() {
    let mut sim = Sim::new(mhs());
    let mut promoted = 0;
    let mut weights = vec![];
    for i in 0..20 {
        if i == 2 {
            sim.obs.revision = "r2".into();
        }
        promoted += promotions(&sim.tick());
        // Every step is followed by a restart that steps again at once.
        sim.now = sim.now.saturating_add(Duration::from_millis(1500));
        promoted += promotions(&sim.step());
        weights.push(sim.status.canary_weight.percent());
    }
    assert_eq!(promoted, 1);
    assert_eq!(sim.status.phase, Some(Phase::Succeeded));
    let mut distinct = weights.clone();
    distinct.dedup();
    assert_eq!(
        distinct,
        vec![0, 10, 20, 30, 40, 50, 0],
        "no weight lost or skipped"
    );
}

#[test]
fn every_decision_keeps_its_numbers_in_the_history() {
    let mut sim = Sim::new(mhs()).at_weight(20);
    sim.fail_metric(REQUEST_SUCCESS_RATE, 97.5, 640);
    sim.tick();
    let d = sim.status.decisions.last().unwrap();
    assert_eq!(
        (d.phase, d.canary_weight, d.failed_checks),
        (Phase::Progressing, w(20), 1)
    );
    assert_eq!(d.events[0].reason, "Halt");
    let sr = &d.checks[0];
    assert_eq!(
        (
            sr.verdict,
            sr.value,
            sr.min,
            sr.max,
            sr.window,
            sr.sample_count
        ),
        (
            Verdict::Fail,
            Some(97.5),
            Some(99.0),
            None,
            secs(30),
            Some(640)
        )
    );
    assert!(sim.status.decisions.len() <= spec::DECISION_HISTORY_LEN);
}

#[test]
fn a_retry_restarts_the_analysis_of_the_same_revision_at_once() {
    let mut sim = Sim::new(mhs()).at_weight(20);
    sim.status.failed_checks = 5;
    sim.tick();
    assert_eq!(sim.status.phase, Some(Phase::Failed));
    sim.obs.retry = Some("2024-05-01T11:00:00Z".into());
    sim.now = sim.now.saturating_add(secs(1)); // not due: the retry does not wait for the interval
    let step = sim.step();
    assert_eq!(
        messages(&step),
        vec!["Retrying mhs.application analysis as requested (retry 2024-05-01T11:00:00Z, attempt 2 of revision r2)"]
    );
    assert_eq!(actions(&step), vec![Effect::ScaleCanary(Scale::Up)]);
    let s = &sim.status;
    assert_eq!(
        (
            s.phase,
            s.failed_checks,
            s.canary_weight,
            s.last_applied_spec.as_deref()
        ),
        (Some(Phase::Progressing), 0, Weight::ZERO, Some("r2"))
    );
    assert_eq!(s.retry.last_token.as_deref(), Some("2024-05-01T11:00:00Z"));
    assert_eq!(s.retry.count, 1);
}

#[test]
fn the_same_retry_token_never_retries_twice() {
    let mut sim = Sim::new(mhs()).at_weight(10);
    sim.status.failed_checks = 5;
    sim.tick();
    sim.obs.retry = Some("t1".into());
    sim.tick();
    assert_eq!(sim.status.phase, Some(Phase::Progressing));
    sim.status.failed_checks = 5;
    sim.tick();
    sim.tick();
    assert_eq!(sim.status.phase, Some(Phase::Failed));
    for _ in 0..3 {
        assert!(sim.tick().effects.is_empty());
    }
    sim.obs.retry = Some("t2".into());
    sim.tick();
    assert_eq!(sim.status.phase, Some(Phase::Progressing));
    assert_eq!(sim.status.retry.count, 2);
}

#[test]
fn a_retry_token_seen_before_a_failure_is_recorded_and_ignored() {
    let mut sim = Sim::new(mhs()).at_weight(10);
    sim.obs.retry = Some("t1".into());
    let step = sim.tick();
    assert_eq!(
        messages(&step)[0],
        "Ignoring retry request t1 for mhs.application: only a Failed canary can be retried, this one is Progressing"
    );
    assert_eq!(sim.status.canary_weight, w(20), "the analysis went on");
    sim.status.failed_checks = 5;
    sim.tick();
    assert_eq!(sim.status.phase, Some(Phase::Failed));
    assert!(
        sim.tick().effects.is_empty(),
        "the old token does not retry"
    );
}

#[test]
fn a_new_revision_resets_the_retry_count() {
    let mut sim = Sim::new(mhs()).at_weight(10);
    sim.status.failed_checks = 5;
    sim.tick();
    sim.obs.retry = Some("t1".into());
    sim.tick();
    assert_eq!(sim.status.retry.count, 1);
    sim.obs.revision = "r3".into();
    sim.tick();
    assert_eq!(sim.status.retry.count, 0);
}

#[test]
fn deleting_a_canary_moves_traffic_to_primary_and_terminates() {
    let mut sim = Sim::new(mhs()).at_weight(30);
    sim.obs.deleting = true;
    sim.now = sim.now.saturating_add(secs(1));
    // Nothing to give back without revertOnDeletion: the deletion completes in one step,
    // without waiting for the next interval.
    let step = sim.step();
    assert_eq!(
        messages(&step),
        vec![
            "Terminating canary mhs.application",
            "Terminated canary mhs.application"
        ]
    );
    assert_eq!(actions(&step), vec![Effect::Route(Route::Primary)]);
    assert_eq!(sim.status.phase, Some(Phase::Terminated));
    assert_eq!(desired_route(&sim.plan, &sim.status), Some(Route::Primary));
    sim.obs.revision = "r9".into();
    assert!(
        sim.tick().effects.is_empty(),
        "a terminated canary does nothing"
    );
}

#[test]
fn deleting_with_revert_restores_the_target_before_giving_traffic_back() {
    let plan = plan_with("revertOnDeletion: true", MHS_ANALYSIS);
    let mut sim = Sim::new(plan);
    sim.tick();
    sim.tick();
    sim.obs.deleting = true;
    let step = sim.step();
    assert_eq!(actions(&step), vec![Effect::ScaleCanary(Scale::Up)]);
    sim.obs.canary = Readiness::NotReady("0 of 3 updated replicas are available".into());
    sim.now = sim.now.saturating_add(secs(1));
    let step = sim.step();
    assert!(step.effects.is_empty(), "waits for the target");
    assert_eq!(sim.status.phase, Some(Phase::Terminating));
    // Once the target is ready the deletion completes at the next call, well within the
    // analysis interval.
    sim.obs.canary = Readiness::Ready;
    sim.now = sim.now.saturating_add(secs(1));
    let step = sim.step();
    assert_eq!(actions(&step), vec![Effect::RevertRouting]);
    assert_eq!(
        messages(&step),
        vec!["Terminated canary mhs.application: traffic is back on mhs.application"]
    );
    assert_eq!(sim.status.phase, Some(Phase::Terminated));
    assert_eq!(desired_route(&sim.plan, &sim.status), None);
}

#[test]
fn deleting_a_canary_that_never_initialized_touches_no_routes() {
    let mut sim = Sim::new(mhs());
    sim.tick();
    sim.obs.deleting = true;
    let step = sim.step();
    assert_eq!(actions(&step), vec![]);
    sim.tick();
    assert_eq!(sim.status.phase, Some(Phase::Terminated));
}

#[test]
fn a_status_written_by_flagger_is_picked_up_where_it_stopped() {
    let json = r#"{"phase":"Progressing","failedChecks":1,"canaryWeight":30,"iterations":0,
        "lastAppliedSpec":"r2","lastPromotedSpec":"r1","lastTransitionTime":"2024-05-01T09:59:00Z"}"#;
    let mut sim = Sim::new(mhs());
    sim.status = serde_json::from_str(json).unwrap();
    sim.obs.revision = "r2".into();
    let step = sim.tick();
    assert_eq!(actions(&step), vec![Effect::Route(Route::Weighted(w(40)))]);
    assert_eq!(sim.status.failed_checks, 1);
}

#[test]
fn reverting_the_target_to_the_promoted_revision_after_a_failure_starts_no_analysis() {
    let mut sim = Sim::new(mhs()).at_weight(20);
    sim.status.failed_checks = 5;
    sim.tick();
    assert_eq!(sim.status.phase, Some(Phase::Failed));
    // The user rolls the target back to what the primary runs.
    sim.obs.revision = "r1".into();
    let step = sim.tick();
    assert_eq!(
        messages(&step),
        vec!["mhs.application is back at revision r1, which mhs-primary.application runs: nothing to analyse"]
    );
    assert_eq!(actions(&step), vec![], "the canary is not scaled up");
    let s = &sim.status;
    assert_eq!(
        (
            s.phase,
            s.last_applied_spec.as_deref(),
            s.last_promoted_spec.as_deref()
        ),
        (Some(Phase::Failed), Some("r1"), Some("r1"))
    );
    assert!(sim.tick().effects.is_empty(), "and stays quiet");
    // A real new revision is analysed as usual.
    sim.obs.revision = "r3".into();
    sim.tick();
    assert_eq!(sim.status.phase, Some(Phase::Progressing));
}

#[test]
fn a_new_revision_waits_while_the_primary_is_not_ready() {
    let mut sim = Sim::new(mhs());
    sim.tick();
    sim.tick();
    sim.obs.primary = Readiness::NotReady(
        "waiting for rollout to finish: 1 old replicas are pending termination".into(),
    );
    sim.obs.revision = "r2".into();
    let step = sim.tick();
    assert_eq!(
        messages(&step),
        vec!["mhs-primary.application not ready: waiting for rollout to finish: 1 old replicas are pending termination"]
    );
    assert_eq!(actions(&step), vec![], "the canary is not scaled up");
    assert_eq!(sim.status.phase, Some(Phase::Initialized));
    assert_eq!(sim.status.last_applied_spec.as_deref(), Some("r1"));
    sim.obs.primary = Readiness::Ready;
    let step = sim.tick();
    assert_eq!(actions(&step), vec![Effect::ScaleCanary(Scale::Up)]);
    assert_eq!(sim.status.phase, Some(Phase::Progressing));
}

#[test]
fn a_retry_waits_while_the_primary_is_not_ready_and_runs_once_it_is() {
    let mut sim = Sim::new(mhs()).at_weight(20);
    sim.status.failed_checks = 5;
    sim.tick();
    sim.obs.primary = Readiness::NotReady("process not listening on 127.0.0.1:8081".into());
    sim.obs.retry = Some("t1".into());
    let step = sim.tick();
    assert_eq!(
        messages(&step),
        vec!["mhs-primary.application not ready: process not listening on 127.0.0.1:8081"]
    );
    assert_eq!(sim.status.phase, Some(Phase::Failed));
    assert_eq!(
        sim.status.retry.last_token, None,
        "the request stays pending"
    );
    // Asked again before the interval: said once per interval only.
    sim.now = sim.now.saturating_add(secs(1));
    assert!(sim.step().effects.is_empty());
    sim.obs.primary = Readiness::Ready;
    sim.now = sim.now.saturating_add(secs(1));
    let step = sim.step();
    assert!(messages(&step)[0].starts_with("Retrying mhs.application analysis as requested"));
    assert_eq!(sim.status.phase, Some(Phase::Progressing));
}
