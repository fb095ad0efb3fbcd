//! Webhooks with Flagger's semantics.

use super::*;

const PRE_ROLLOUT: &str = "  webhooks:
  - name: acceptance-test
    type: pre-rollout
    url: http://loadtester.test/";

const ROLLOUT: &str = "  webhooks:
  - name: load-test
    url: http://loadtester.test/";

#[test]
fn a_passing_pre_rollout_hook_lets_traffic_in() {
    let mut sim = Sim::new(mhs_plus(PRE_ROLLOUT)).progressing();
    sim.hook("acceptance-test", WebhookResult::Passed);
    let step = sim.tick();
    assert_eq!(
        messages(&step),
        vec![
            "Starting canary analysis for mhs.application",
            "Pre-rollout check acceptance-test passed",
            "Advance mhs.application canary weight 10",
        ]
    );
    assert_eq!(
        sim.rounds,
        vec![Round {
            metrics: vec![],
            webhooks: vec![("acceptance-test".into(), Phase::Progressing)]
        }]
    );
}

#[test]
fn a_failing_pre_rollout_hook_counts_a_failed_check_and_keeps_traffic_out() {
    let mut sim = Sim::new(mhs_plus(PRE_ROLLOUT)).progressing();
    sim.hook("acceptance-test", failed());
    let step = sim.tick();
    assert_eq!(
        messages(&step),
        vec![
            "Starting canary analysis for mhs.application",
            "Halt mhs.application advancement pre-rollout check acceptance-test failed 500 Internal Server Error",
        ]
    );
    assert_eq!(actions(&step), vec![]);
    let s = &sim.status;
    assert_eq!((s.canary_weight, s.failed_checks), (Weight::ZERO, 1));
}

#[test]
fn pre_rollout_hooks_run_again_until_they_pass_then_never_again() {
    let mut sim = Sim::new(mhs_plus(PRE_ROLLOUT)).progressing();
    sim.hook("acceptance-test", failed());
    sim.tick();
    sim.hook("acceptance-test", WebhookResult::Passed);
    sim.tick();
    sim.tick();
    let hook_rounds = sim.rounds.iter().filter(|r| !r.webhooks.is_empty()).count();
    assert_eq!(hook_rounds, 2);
    assert_eq!(sim.status.canary_weight, w(20));
}

#[test]
fn a_failing_rollout_hook_counts_a_failed_check() {
    let mut sim = Sim::new(mhs_plus(ROLLOUT)).progressing();
    sim.tick();
    sim.rounds.clear();
    sim.hook(
        "load-test",
        WebhookResult::Failed("context deadline exceeded".into()),
    );
    let step = sim.tick();
    assert_eq!(
        messages(&step),
        vec!["Halt mhs.application advancement external check load-test failed context deadline exceeded"]
    );
    let s = &sim.status;
    assert_eq!((s.canary_weight, s.failed_checks), (w(10), 1));
}

#[test]
fn rollout_hooks_and_metrics_are_asked_for_in_one_round() {
    let mut sim = Sim::new(mhs_plus(ROLLOUT)).progressing();
    sim.hook("load-test", WebhookResult::Passed);
    sim.tick();
    sim.tick();
    assert_eq!(
        sim.rounds,
        vec![Round {
            metrics: vec![REQUEST_SUCCESS_RATE.into(), REQUEST_DURATION.into()],
            webhooks: vec![("load-test".into(), Phase::Progressing)],
        }]
    );
    assert_eq!(sim.status.canary_weight, w(20));
}

#[test]
fn confirm_rollout_holds_a_new_revision_in_waiting_until_approved() {
    let mut sim = Sim::new(mhs_plus(
        "  webhooks:\n  - name: gate\n    type: confirm-rollout\n    url: http://gate/",
    ));
    sim.tick();
    sim.tick();
    sim.obs.revision = "r2".into();
    sim.hook("gate", failed());
    let step = sim.tick();
    assert_eq!(
        messages(&step),
        vec!["Halt mhs.application advancement waiting for approval gate"]
    );
    assert_eq!(actions(&step), vec![], "the canary is not scaled up");
    assert_eq!(sim.status.phase, Some(Phase::Waiting));
    assert_eq!(sim.status.last_applied_spec.as_deref(), Some("r2"));

    let step = sim.tick();
    assert!(step.effects.is_empty(), "no repeated message while waiting");

    sim.hook("gate", WebhookResult::Passed);
    let step = sim.tick();
    assert_eq!(
        messages(&step),
        vec![
            "Confirm-rollout check gate passed",
            "New revision detected! Scaling up mhs.application"
        ]
    );
    assert_eq!(actions(&step), vec![Effect::ScaleCanary(Scale::Up)]);
    assert_eq!(sim.status.phase, Some(Phase::Progressing));
}

#[test]
fn confirm_traffic_increase_holds_the_weight_until_approved() {
    let mut sim = Sim::new(mhs_plus(
        "  webhooks:\n  - name: more\n    type: confirm-traffic-increase\n    url: http://gate/",
    ))
    .progressing();
    sim.hook("more", WebhookResult::Passed);
    sim.tick();
    sim.hook("more", failed());
    let step = sim.tick();
    assert_eq!(
        messages(&step),
        vec!["Halt mhs.application advancement waiting for traffic increase approval more"]
    );
    assert_eq!(actions(&step), vec![]);
    let s = &sim.status;
    assert_eq!(
        (s.canary_weight, s.failed_checks, s.phase),
        (w(10), 0, Some(Phase::Progressing))
    );
    sim.hook("more", WebhookResult::Passed);
    let step = sim.tick();
    assert_eq!(
        messages(&step)[0],
        "Confirm-traffic-increase check more passed"
    );
    assert_eq!(sim.status.canary_weight, w(20));
}

#[test]
fn confirm_traffic_increase_also_holds_the_promotion_at_max_weight() {
    let mut sim = Sim::new(mhs_plus(
        "  webhooks:\n  - name: more\n    type: confirm-traffic-increase\n    url: http://gate/",
    ))
    .with_hook("more", WebhookResult::Passed)
    .at_weight(50);
    sim.hook("more", failed());
    let step = sim.tick();
    assert_eq!(
        messages(&step),
        vec!["Halt mhs.application advancement waiting for traffic increase approval more"]
    );
    assert_eq!(
        actions(&step),
        vec![],
        "no promotion while the gate is closed"
    );
    assert_eq!(
        (sim.status.phase, sim.status.canary_weight),
        (Some(Phase::Progressing), w(50))
    );
    sim.hook("more", WebhookResult::Passed);
    let step = sim.tick();
    assert_eq!(
        messages(&step)[0],
        "Confirm-traffic-increase check more passed"
    );
    assert_eq!(sim.status.phase, Some(Phase::Promoting));
}

#[test]
fn a_canary_waiting_for_promotion_is_not_asked_for_traffic_increase_again() {
    let hooks = "  webhooks:
  - name: more
    type: confirm-traffic-increase
    url: http://gate/
  - name: approve
    type: confirm-promotion
    url: http://gate/";
    let mut sim = Sim::new(mhs_plus(hooks))
        .with_hook("more", WebhookResult::Passed)
        .with_hook("approve", failed())
        .at_weight(50);
    sim.tick();
    assert_eq!(sim.status.phase, Some(Phase::WaitingPromotion));
    sim.rounds.clear();
    sim.tick();
    let asked: Vec<String> = sim
        .rounds
        .iter()
        .flat_map(|r| r.webhooks.iter().map(|(name, _)| name.clone()))
        .collect();
    assert_eq!(
        asked,
        vec!["approve"],
        "as Flagger: the gate is Progressing-only"
    );
}

#[test]
fn confirm_promotion_waits_at_max_weight_while_analysis_goes_on() {
    let mut sim = Sim::new(mhs_plus(
        "  webhooks:\n  - name: approve\n    type: confirm-promotion\n    url: http://gate/",
    ))
    .at_weight(50);
    sim.hook("approve", failed());
    let step = sim.tick();
    assert_eq!(
        messages(&step),
        vec!["Halt mhs.application advancement waiting for promotion approval approve"]
    );
    assert_eq!(sim.status.phase, Some(Phase::WaitingPromotion));
    assert_eq!(sim.status.canary_weight, w(50));

    // Still analysed while waiting: a failure counts.
    sim.fail_metric(REQUEST_SUCCESS_RATE, 95.0, 1000);
    let step = sim.tick();
    assert_eq!(messages(&step).len(), 1);
    assert_eq!(sim.status.failed_checks, 1);
    assert_eq!(sim.status.phase, Some(Phase::WaitingPromotion));

    sim.heal();
    sim.hook("approve", WebhookResult::Passed);
    let step = sim.tick();
    assert_eq!(messages(&step)[0], "Confirm-promotion check approve passed");
    assert!(messages(&step)[1]
        .starts_with("Copying mhs.application template spec to mhs-primary.application"));
    assert_eq!(sim.status.phase, Some(Phase::Promoting));
}

#[test]
fn a_rollback_hook_answering_ok_rolls_back() {
    let mut sim = Sim::new(mhs_plus(
        "  webhooks:\n  - name: manual\n    type: rollback\n    url: http://gate/",
    ))
    .with_hook("manual", failed())
    .at_weight(20);
    sim.hook("manual", WebhookResult::Passed);
    let step = sim.tick();
    assert_eq!(
        messages(&step),
        vec![
            "Rollback check manual passed",
            "Rolling back mhs.application manual webhook invoked",
            "Canary failed! Scaling down mhs.application",
        ]
    );
    assert_eq!(sim.status.phase, Some(Phase::Failed));
    assert_eq!(sim.rounds.last().unwrap().metrics, Vec::<String>::new());
}

#[test]
fn a_rollback_hook_not_answering_ok_lets_the_analysis_go_on() {
    let mut sim = Sim::new(mhs_plus(
        "  webhooks:\n  - name: manual\n    type: rollback\n    url: http://gate/",
    ))
    .progressing();
    sim.hook("manual", failed());
    let step = sim.tick();
    assert_eq!(
        messages(&step),
        vec![
            "Rollback hook manual not signaling a rollback",
            "Starting canary analysis for mhs.application",
            "Advance mhs.application canary weight 10",
        ]
    );
}

#[test]
fn post_rollout_hooks_are_called_after_success_and_after_failure() {
    let hooks = "  webhooks:\n  - name: notify\n    type: post-rollout\n    url: http://notify/";
    let post = |step: &Step| -> Vec<(String, Phase)> {
        step.effects
            .iter()
            .filter_map(|e| match e {
                Effect::CallWebhook(c) => Some((c.webhook.name.clone(), c.phase)),
                _ => None,
            })
            .collect()
    };

    let mut sim = Sim::new(mhs_plus(hooks)).at_weight(50);
    let mut calls = vec![];
    while sim.status.phase != Some(Phase::Succeeded) {
        calls.extend(post(&sim.tick()));
    }
    assert_eq!(calls, vec![("notify".to_string(), Phase::Succeeded)]);

    let mut sim = Sim::new(mhs_plus(hooks)).at_weight(10);
    sim.status.failed_checks = 5;
    let step = sim.tick();
    assert_eq!(post(&step), vec![("notify".to_string(), Phase::Failed)]);
    assert!(
        sim.rounds.iter().all(|r| r.webhooks.is_empty()),
        "post-rollout is not awaited"
    );
}

#[test]
fn skip_analysis_promotion_calls_the_post_rollout_hooks() {
    let plan = plan_with(
        "skipAnalysis: true",
        &format!("{MHS_ANALYSIS}\n  webhooks:\n  - name: notify\n    type: post-rollout\n    url: http://notify/"),
    );
    let mut sim = Sim::new(plan).progressing();
    let step = sim.tick();
    assert_eq!(sim.status.phase, Some(Phase::Succeeded));
    let calls: Vec<(String, Phase)> = step
        .effects
        .iter()
        .filter_map(|e| match e {
            Effect::CallWebhook(c) => Some((c.webhook.name.clone(), c.phase)),
            _ => None,
        })
        .collect();
    assert_eq!(calls, vec![("notify".to_string(), Phase::Succeeded)]);
}
