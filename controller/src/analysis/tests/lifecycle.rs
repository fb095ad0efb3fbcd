//! The happy path: initialization, new revisions, progressive traffic, promotion.

use super::*;

#[test]
fn first_sighting_creates_the_primary_from_the_target() {
    let mut sim = Sim::new(mhs());
    let step = sim.tick();
    assert_eq!(
        actions(&step),
        vec![Effect::InitializePrimary {
            revision: "r1".into()
        }]
    );
    assert_eq!(
        messages(&step),
        vec!["New Deployment detected, starting initialization of mhs.application"]
    );
    assert_eq!(sim.status.phase, Some(Phase::Initializing));
    assert_eq!(sim.status.last_applied_spec.as_deref(), Some("r1"));
    assert_eq!(sim.status.promoted_condition().unwrap().status, "Unknown");
}

#[test]
fn a_primary_that_already_runs_is_kept_and_a_differing_target_is_analysed_first() {
    // A Canary deleted without revertOnDeletion mid-rollout, applied again: the primary still
    // runs r1, the target has the unanalysed r2.
    let mut sim = Sim::new(mhs());
    sim.obs.revision = "r2".into();
    sim.obs.primary_revision = Some("r1".into());
    let step = sim.tick();
    assert_eq!(
        actions(&step),
        vec![Effect::InitializePrimary {
            revision: "r1".into()
        }],
        "the executor applies it only while the target is at r1"
    );
    assert_eq!(
        messages(&step),
        vec![
            "New Deployment detected, starting initialization of mhs.application",
            "mhs-primary.application already runs revision r1: keeping it as the primary; \
             mhs.application at revision r2 is analysed as a new revision"
        ]
    );
    sim.obs.primary_revision = None;
    let step = sim.tick();
    assert_eq!(
        actions(&step),
        vec![
            Effect::Route(Route::Primary),
            Effect::ScaleCanary(Scale::Down)
        ],
        "no second copy of the target while initializing"
    );
    assert_eq!(sim.status.phase, Some(Phase::Initialized));
    assert_eq!(sim.status.last_promoted_spec.as_deref(), Some("r1"));
    let step = sim.tick();
    assert_eq!(actions(&step), vec![Effect::ScaleCanary(Scale::Up)]);
    assert_eq!(sim.status.phase, Some(Phase::Progressing));
    assert_eq!(sim.status.last_applied_spec.as_deref(), Some("r2"));

    // The same revision on both: an ordinary initialization, without the extra event.
    let mut sim = Sim::new(mhs());
    sim.obs.primary_revision = Some("r1".into());
    let step = sim.tick();
    assert_eq!(messages(&step).len(), 1);
    sim.tick();
    assert_eq!(sim.status.phase, Some(Phase::Initialized));
    assert!(sim.tick().effects.is_empty());
}

#[test]
fn initialization_finishes_once_the_primary_is_ready() {
    let mut sim = Sim::new(mhs());
    sim.tick();
    let step = sim.tick();
    assert_eq!(
        actions(&step),
        vec![
            Effect::Route(Route::Primary),
            Effect::ScaleCanary(Scale::Down)
        ]
    );
    assert_eq!(
        messages(&step),
        vec!["Initialization done! mhs.application"]
    );
    assert_eq!(sim.status.phase, Some(Phase::Initialized));
    assert_eq!(sim.status.last_promoted_spec.as_deref(), Some("r1"));
    let condition = sim.status.promoted_condition().unwrap();
    assert_eq!(
        (condition.status.as_str(), condition.message.as_str()),
        ("True", "Deployment initialization completed.")
    );
}

#[test]
fn initialization_waits_while_the_primary_is_not_ready() {
    let mut sim = Sim::new(mhs());
    sim.tick();
    sim.obs.primary = Readiness::NotReady(
        "waiting for rollout to finish: 0 of 2 (readyThreshold 100%) updated replicas are available"
            .into(),
    );
    let step = sim.tick();
    assert_eq!(actions(&step), vec![]);
    assert_eq!(
        messages(&step),
        vec!["mhs-primary.application not ready: waiting for rollout to finish: 0 of 2 (readyThreshold 100%) updated replicas are available"]
    );
    assert_eq!(sim.status.phase, Some(Phase::Initializing));
}

#[test]
fn a_target_change_during_initialization_updates_the_primary() {
    let mut sim = Sim::new(mhs());
    sim.tick();
    sim.obs.revision = "r1b".into();
    let step = sim.tick();
    assert_eq!(
        actions(&step),
        vec![Effect::InitializePrimary {
            revision: "r1b".into()
        }]
    );
    assert_eq!(sim.status.phase, Some(Phase::Initializing));
    sim.tick();
    assert_eq!(sim.status.phase, Some(Phase::Initialized));
    assert_eq!(sim.status.last_promoted_spec.as_deref(), Some("r1b"));
}

#[test]
fn an_initialized_canary_without_a_new_revision_does_nothing() {
    let mut sim = Sim::new(mhs());
    sim.tick();
    sim.tick();
    let decisions = sim.status.decisions.len();
    let step = sim.tick();
    assert!(step.effects.is_empty(), "{:?}", step.effects);
    assert_eq!(sim.status.phase, Some(Phase::Initialized));
    assert_eq!(sim.status.decisions.len(), decisions);
    assert_eq!(sim.status.last_step_time, Some(sim.now));
}

#[test]
fn a_new_revision_scales_the_canary_up_and_starts_progressing() {
    let mut sim = Sim::new(mhs());
    sim.tick();
    sim.tick();
    sim.obs.revision = "r2".into();
    let step = sim.tick();
    assert_eq!(actions(&step), vec![Effect::ScaleCanary(Scale::Up)]);
    assert_eq!(
        messages(&step),
        vec!["New revision detected! Scaling up mhs.application"]
    );
    let s = &sim.status;
    assert_eq!(
        (
            s.phase,
            s.canary_weight,
            s.failed_checks,
            s.last_applied_spec.as_deref()
        ),
        (Some(Phase::Progressing), Weight::ZERO, 0, Some("r2"))
    );
    assert_eq!(s.last_promoted_spec.as_deref(), Some("r1"));
}

#[test]
fn the_first_analysis_step_needs_no_metrics_and_opens_the_first_step() {
    let mut sim = Sim::new(mhs()).progressing();
    let step = sim.tick();
    assert_eq!(
        messages(&step),
        vec![
            "Starting canary analysis for mhs.application",
            "Advance mhs.application canary weight 10"
        ]
    );
    assert_eq!(actions(&step), vec![Effect::Route(Route::Weighted(w(10)))]);
    assert!(sim.rounds.is_empty(), "asked for {:?}", sim.rounds);
}

#[test]
fn passing_checks_advance_by_step_weight_and_say_which_numbers_they_used() {
    let mut sim = Sim::new(mhs()).at_weight(10);
    let step = sim.tick();
    assert_eq!(actions(&step), vec![Effect::Route(Route::Weighted(w(20)))]);
    assert_eq!(
        messages(&step),
        vec!["Advance mhs.application canary weight 20 (request-success-rate 99.90% (min 99%; 1000 requests in 30s from streamed); request-duration 120ms (max 500ms; 1000 requests in 30s from streamed))"]
    );
    let decision = sim.status.decisions.last().unwrap();
    assert_eq!(decision.canary_weight, w(20));
    let sr = &decision.checks[0];
    assert_eq!(
        (
            sr.metric.as_str(),
            sr.verdict,
            sr.value,
            sr.min,
            sr.window,
            sr.sample_count,
            sr.source.as_str()
        ),
        (
            REQUEST_SUCCESS_RATE,
            Verdict::Pass,
            Some(99.9),
            Some(99.0),
            secs(30),
            Some(1000),
            "streamed"
        )
    );
    assert_eq!(
        sim.rounds.last().unwrap().metrics,
        vec![REQUEST_SUCCESS_RATE, REQUEST_DURATION]
    );
}

#[test]
fn the_weight_climbs_to_max_weight_then_the_template_is_copied() {
    let mut sim = Sim::new(mhs()).at_weight(10);
    let mut weights = vec![];
    while sim.status.phase == Some(Phase::Progressing) {
        sim.tick();
        weights.push(sim.status.canary_weight.percent());
    }
    assert_eq!(weights, vec![20, 30, 40, 50, 50]);
    let last = sim.status.decisions.last().unwrap();
    assert!(last.events[0]
        .message
        .starts_with("Copying mhs.application template spec to mhs-primary.application (request-success-rate 99.90%"));
    assert_eq!(sim.status.phase, Some(Phase::Promoting));
}

#[test]
fn reaching_max_weight_promotes_the_analysed_revision() {
    let mut sim = Sim::new(mhs()).at_weight(50);
    let step = sim.tick();
    assert_eq!(
        actions(&step),
        vec![Effect::PromotePrimary {
            revision: "r2".into()
        }]
    );
    assert_eq!(sim.status.phase, Some(Phase::Promoting));
    assert_eq!(
        sim.status.canary_weight,
        w(50),
        "traffic stays split until Promoting"
    );
}

#[test]
fn promoting_routes_all_traffic_to_primary_then_finalising_scales_the_canary_down() {
    let mut sim = Sim::new(mhs()).at_weight(50);
    sim.tick();
    let step = sim.tick();
    assert_eq!(messages(&step), vec!["Routing all traffic to primary"]);
    assert_eq!(actions(&step), vec![Effect::Route(Route::Primary)]);
    assert_eq!(sim.status.phase, Some(Phase::Finalising));
    assert!(sim.rounds.iter().all(|r| r.metrics.len() == 2));

    let step = sim.tick();
    assert_eq!(actions(&step), vec![Effect::ScaleCanary(Scale::Down)]);
    assert_eq!(
        messages(&step),
        vec!["Promotion completed! Scaling down mhs.application"]
    );
    let s = &sim.status;
    assert_eq!(
        (s.phase, s.canary_weight, s.last_promoted_spec.as_deref()),
        (Some(Phase::Succeeded), Weight::ZERO, Some("r2"))
    );
    assert_eq!(s.promoted_condition().unwrap().status, "True");
}

#[test]
fn a_whole_rollout_tells_flaggers_story_in_flaggers_words() {
    let mut sim = Sim::new(mhs());
    let mut story = vec![];
    for i in 0..12 {
        if i == 2 {
            sim.obs.revision = "r2".into();
        }
        let step = sim.tick();
        // The numbers in parentheses are Weir's addition; Flagger's text is the prefix.
        story.extend(messages(&step).into_iter().map(|m| match m.find(" (") {
            Some(i) => m[..i].to_string(),
            None => m,
        }));
    }
    assert_eq!(
        story,
        vec![
            "New Deployment detected, starting initialization of mhs.application",
            "Initialization done! mhs.application",
            "New revision detected! Scaling up mhs.application",
            "Starting canary analysis for mhs.application",
            "Advance mhs.application canary weight 10",
            "Advance mhs.application canary weight 20",
            "Advance mhs.application canary weight 30",
            "Advance mhs.application canary weight 40",
            "Advance mhs.application canary weight 50",
            "Copying mhs.application template spec to mhs-primary.application",
            "Routing all traffic to primary",
            "Promotion completed! Scaling down mhs.application",
        ]
    );
    assert_eq!(sim.status.phase, Some(Phase::Succeeded));
}

#[test]
fn a_new_revision_after_a_success_starts_a_new_analysis() {
    let mut sim = Sim::new(mhs()).at_weight(50);
    while sim.status.phase != Some(Phase::Succeeded) {
        sim.tick();
    }
    sim.obs.revision = "r3".into();
    let step = sim.tick();
    assert_eq!(actions(&step), vec![Effect::ScaleCanary(Scale::Up)]);
    assert_eq!(sim.status.phase, Some(Phase::Progressing));
    assert_eq!(sim.status.last_applied_spec.as_deref(), Some("r3"));
    assert_eq!(sim.status.last_promoted_spec.as_deref(), Some("r2"));
}

#[test]
fn a_new_revision_during_analysis_restarts_it_from_zero() {
    let mut sim = Sim::new(mhs()).at_weight(30);
    sim.fail_metric(REQUEST_SUCCESS_RATE, 90.0, 500);
    sim.tick();
    assert_eq!(sim.status.failed_checks, 1);
    sim.obs.revision = "r3".into();
    let step = sim.tick();
    assert_eq!(
        messages(&step),
        vec!["New revision detected! Restarting analysis for mhs.application"]
    );
    assert_eq!(actions(&step), vec![Effect::Route(Route::Primary)]);
    let s = &sim.status;
    assert_eq!(
        (
            s.phase,
            s.canary_weight,
            s.failed_checks,
            s.last_applied_spec.as_deref()
        ),
        (Some(Phase::Progressing), Weight::ZERO, 0, Some("r3"))
    );
}

#[test]
fn status_transitions_record_their_time_and_conditions() {
    let mut sim = Sim::new(mhs()).at_weight(10);
    assert_eq!(sim.status.last_transition_time, Some(sim.now));
    let progressing = sim.status.promoted_condition().unwrap().clone();
    assert_eq!(progressing.reason, "Progressing");
    assert_eq!(
        progressing.message,
        "New revision detected, progressing canary analysis."
    );
    sim.tick();
    // Same phase: the condition is not rewritten.
    assert_eq!(sim.status.promoted_condition(), Some(&progressing));
}
