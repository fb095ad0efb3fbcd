//! Step lists, stepped promotion, A/B testing, blue/green, skipAnalysis, suspend.

use super::*;

const AB: &str = "
  interval: 1m
  threshold: 2
  iterations: 3
  match:
  - headers:
      x-canary: {exact: insider}
  metrics:
  - name: request-success-rate
    thresholdRange: {min: 99}
    interval: 1m";

const BLUE_GREEN: &str = "
  interval: 1m
  threshold: 2
  iterations: 2
  metrics:
  - name: request-success-rate
    thresholdRange: {min: 99}
    interval: 1m";

/// Ticks until the phase is `until` (at most 20 times), returning every step.
fn run_until(sim: &mut Sim, until: Phase) -> Vec<Step> {
    let mut steps = vec![];
    for _ in 0..20 {
        steps.push(sim.tick());
        if sim.status.phase == Some(until) {
            return steps;
        }
    }
    panic!("never reached {until}: {:?}", sim.status)
}

#[test]
fn step_weights_are_followed_in_order() {
    let plan = plan_with(
        "",
        &MHS_ANALYSIS
            .replace("stepWeight: 10", "stepWeights: [1, 5, 25]")
            .replace("  maxWeight: 50\n", ""),
    );
    let mut sim = Sim::new(plan).progressing();
    let mut weights = vec![];
    for _ in 0..3 {
        sim.tick();
        weights.push(sim.status.canary_weight.percent());
    }
    assert_eq!(weights, vec![1, 5, 25]);
    sim.tick();
    assert_eq!(sim.status.phase, Some(Phase::Promoting));
}

#[test]
fn the_weight_stops_at_max_weight_even_when_the_step_overshoots_it() {
    let plan = plan_with(
        "",
        &MHS_ANALYSIS.replace("stepWeight: 10", "stepWeight: 20"),
    );
    let mut sim = Sim::new(plan).progressing();
    let weights: Vec<u8> = (0..3)
        .map(|_| {
            sim.tick();
            sim.status.canary_weight.percent()
        })
        .collect();
    assert_eq!(weights, vec![20, 40, 50]);
}

#[test]
fn step_weight_promotion_moves_traffic_back_in_steps() {
    let plan = mhs_plus("  stepWeightPromotion: 20");
    let mut sim = Sim::new(plan).at_weight(50);
    sim.tick();
    assert_eq!(sim.status.phase, Some(Phase::Promoting));
    let mut story = vec![];
    for _ in 0..3 {
        let step = sim.tick();
        story.push((messages(&step), actions(&step), sim.status.phase));
    }
    assert_eq!(
        story,
        vec![
            (
                vec!["Advance mhs.application primary weight 70".to_string()],
                vec![Effect::Route(Route::Weighted(w(30)))],
                Some(Phase::Promoting)
            ),
            (
                vec!["Advance mhs.application primary weight 90".to_string()],
                vec![Effect::Route(Route::Weighted(w(10)))],
                Some(Phase::Promoting)
            ),
            (
                vec!["Advance mhs.application primary weight 100".to_string()],
                vec![Effect::Route(Route::Primary)],
                Some(Phase::Finalising)
            ),
        ]
    );
}

#[test]
fn ab_testing_sends_matching_requests_for_n_iterations_then_promotes() {
    let mut sim = Sim::new(plan_with("", AB)).progressing();
    let step = sim.tick();
    assert_eq!(
        messages(&step),
        vec![
            "Starting canary analysis for mhs.application",
            "Advance mhs.application canary iteration 1/3"
        ]
    );
    assert_eq!(actions(&step), vec![Effect::Route(Route::Matches)]);
    assert_eq!(sim.status.canary_weight, Weight::ZERO);

    let step = sim.tick();
    assert!(messages(&step)[0]
        .starts_with("Advance mhs.application canary iteration 2/3 (request-success-rate"));
    assert_eq!(
        actions(&step),
        vec![],
        "the match route is already in place"
    );
    sim.tick();
    assert_eq!(sim.status.iterations, 3);

    let step = sim.tick();
    assert_eq!(
        actions(&step),
        vec![Effect::PromotePrimary {
            revision: "r2".into()
        }]
    );
    let step = sim.tick();
    assert_eq!(messages(&step), vec!["Routing all traffic to primary"]);
    assert_eq!(actions(&step), vec![Effect::Route(Route::Primary)]);
    run_until(&mut sim, Phase::Succeeded);
}

#[test]
fn a_failing_ab_test_rolls_back_to_primary() {
    let mut sim = Sim::new(plan_with("", AB)).progressing();
    sim.tick();
    sim.fail_metric(REQUEST_SUCCESS_RATE, 12.5, 400);
    sim.tick();
    let step = sim.tick();
    assert_eq!(sim.status.phase, Some(Phase::Failed));
    assert_eq!(
        actions(&step),
        vec![
            Effect::Route(Route::Primary),
            Effect::ScaleCanary(Scale::Down)
        ]
    );
}

#[test]
fn blue_green_tests_without_traffic_then_switches_all_traffic_then_promotes() {
    let mut sim = Sim::new(plan_with("", BLUE_GREEN)).progressing();
    let step = sim.tick();
    assert_eq!(
        messages(&step)[1],
        "Advance mhs.application canary iteration 1/2"
    );
    assert_eq!(
        actions(&step),
        vec![],
        "no user traffic during the iterations"
    );
    let step = sim.tick();
    assert!(messages(&step)[0].starts_with("Advance mhs.application canary iteration 2/2"));
    let step = sim.tick();
    assert!(messages(&step)[0].starts_with("Routing all traffic to canary"));
    assert_eq!(
        actions(&step),
        vec![Effect::Route(Route::Weighted(Weight::FULL))]
    );
    assert_eq!(sim.status.canary_weight, Weight::FULL);
    // One more analysis step with all traffic on the canary, then promotion.
    let step = sim.tick();
    assert_eq!(
        actions(&step),
        vec![Effect::PromotePrimary {
            revision: "r2".into()
        }]
    );
    let step = sim.tick();
    assert_eq!(actions(&step), vec![Effect::Route(Route::Primary)]);
    run_until(&mut sim, Phase::Succeeded);
}

#[test]
fn skip_analysis_promotes_a_ready_canary_without_checks() {
    let plan = plan_with("skipAnalysis: true", MHS_ANALYSIS);
    let mut sim = Sim::new(plan).progressing();
    let step = sim.tick();
    assert_eq!(
        messages(&step),
        vec![
            "Copying mhs.application template spec to mhs-primary.application",
            "Promotion completed! Canary analysis was skipped for mhs.application",
        ]
    );
    assert_eq!(
        actions(&step),
        vec![
            Effect::PromotePrimary {
                revision: "r2".into()
            },
            Effect::ScaleCanary(Scale::Down)
        ]
    );
    assert!(sim.rounds.is_empty());
    assert_eq!(sim.status.phase, Some(Phase::Succeeded));
    assert_eq!(sim.status.last_promoted_spec.as_deref(), Some("r2"));
}

#[test]
fn skip_analysis_still_waits_for_the_canary_to_be_ready() {
    let plan = plan_with("skipAnalysis: true", MHS_ANALYSIS);
    let mut sim = Sim::new(plan).progressing();
    sim.obs.canary = Readiness::NotReady("0 of 1 updated replicas are available".into());
    let step = sim.tick();
    assert_eq!(actions(&step), vec![]);
    assert_eq!(sim.status.phase, Some(Phase::Progressing));
}

#[test]
fn a_suspended_canary_says_so_at_every_step_and_changes_nothing_else() {
    let mut sim = Sim::new(mhs()).at_weight(20);
    sim.plan.suspend = true;
    sim.obs.revision = "r3".into();
    sim.fail_metric(REQUEST_SUCCESS_RATE, 10.0, 1000);
    let before = sim.status.clone();
    let rounds = sim.rounds.len();
    for _ in 0..3 {
        let step = sim.tick();
        assert_eq!(
            messages(&step),
            vec!["skipping canary run as object is suspended"]
        );
        assert_eq!(actions(&step), vec![]);
        // Once per interval, not at every call.
        assert!(sim.step().effects.is_empty());
    }
    assert_eq!(sim.rounds.len(), rounds, "nothing measured or called");
    let after = CanaryStatus {
        last_step_time: before.last_step_time,
        ..sim.status.clone()
    };
    assert_eq!(
        after, before,
        "only the step time moved; no decision recorded"
    );
}

#[test]
fn without_metrics_the_webhooks_alone_decide() {
    let plan = plan_with(
        "",
        "  interval: 30s\n  stepWeight: 50\n  webhooks:\n  - name: smoke\n    url: http://smoke/",
    );
    let mut sim = Sim::new(plan)
        .with_hook("smoke", WebhookResult::Passed)
        .progressing();
    sim.tick();
    sim.tick();
    assert_eq!(sim.status.canary_weight, w(100));
    assert!(sim.rounds.iter().all(|r| r.metrics.is_empty()));
    sim.tick();
    assert_eq!(sim.status.phase, Some(Phase::Promoting));
}
