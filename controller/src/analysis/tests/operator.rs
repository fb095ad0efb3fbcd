//! Operator requests (promote, abort, pause, resume) and `inconclusiveLimit`.

use super::*;
use crate::spec::PauseCause;

fn request(verb: Verb, token: &str) -> OperatorRequest {
    OperatorRequest {
        verb,
        token: token.into(),
        by: "alice".into(),
    }
}

impl Sim {
    /// Sends `verb` with a new token and steps at once (between two intervals).
    fn ask(&mut self, verb: Verb, token: &str) -> Step {
        self.obs.request = Some(request(verb, token));
        self.now = self.now.saturating_add(secs(1));
        self.step()
    }
}

#[test]
fn promote_skips_the_rest_of_the_analysis_at_once_and_names_who_asked() {
    let mut sim = Sim::new(mhs()).at_weight(20);
    let measured = sim.rounds.len();
    let step = sim.ask(Verb::Promote, "t1");
    assert_eq!(
        messages(&step),
        vec![
            "Promotion of mhs.application requested by alice: skipping the rest of the analysis at canary weight 20",
            "Copying mhs.application template spec to mhs-primary.application",
        ]
    );
    assert_eq!(
        actions(&step),
        vec![Effect::PromotePrimary {
            revision: "r2".into()
        }]
    );
    assert_eq!(sim.status.phase, Some(Phase::Promoting));
    assert_eq!(sim.status.last_request.as_deref(), Some("t1"));
    // Then the usual promotion: traffic back to the primary, then Succeeded.
    sim.tick();
    assert_eq!(sim.status.phase, Some(Phase::Finalising));
    sim.tick();
    assert_eq!(sim.status.phase, Some(Phase::Succeeded));
    assert_eq!(
        sim.rounds.len(),
        measured,
        "nothing measured after the request"
    );
}

#[test]
fn promote_opens_a_closed_confirm_promotion_gate() {
    let plan =
        mhs_plus("  webhooks:\n  - name: gate\n    type: confirm-promotion\n    url: http://gate/");
    let mut sim = Sim::new(plan).with_hook("gate", failed()).at_weight(50);
    sim.tick();
    assert_eq!(sim.status.phase, Some(Phase::WaitingPromotion));
    let step = sim.ask(Verb::Promote, "t1");
    assert_eq!(
        sim.status.phase,
        Some(Phase::Promoting),
        "{:?}",
        messages(&step)
    );
}

#[test]
fn abort_rolls_back_at_once_and_says_who_asked() {
    let mut sim = Sim::new(mhs()).at_weight(30);
    let step = sim.ask(Verb::Abort, "t1");
    assert_eq!(
        messages(&step),
        vec![
            "Rolling back mhs.application: abort requested by alice at canary weight 30",
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
    assert_eq!(step.events().next().unwrap().severity, Severity::Warning);
    let s = &sim.status;
    assert_eq!((s.phase, s.canary_weight), (Some(Phase::Failed), w(0)));
}

#[test]
fn a_paused_analysis_holds_its_weight_but_keeps_measuring() {
    let mut sim = Sim::new(mhs()).at_weight(20);
    let step = sim.ask(Verb::Pause, "t1");
    assert_eq!(
        messages(&step),
        vec!["Paused mhs.application at canary weight 20 as requested by alice: the weight holds and the checks go on; weir resume continues, weir promote or weir abort decides"]
    );
    assert_eq!(actions(&step), vec![]);
    let pause = sim.status.paused.clone().unwrap();
    assert_eq!(
        (pause.cause, pause.by.as_str()),
        (PauseCause::Requested, "alice")
    );
    let condition = sim
        .status
        .conditions
        .iter()
        .find(|c| c.kind == PAUSED_CONDITION)
        .unwrap();
    assert_eq!(condition.reason, "Requested");

    let measured = sim.rounds.len();
    for _ in 0..3 {
        let step = sim.tick();
        assert_eq!(actions(&step), vec![], "no route change while paused");
        assert!(messages(&step)[0].starts_with(
            "mhs.application is paused at canary weight 20 (by alice): holding; weir resume continues, weir promote or weir abort decides ("
        ), "{:?}", messages(&step));
    }
    assert_eq!(sim.status.canary_weight, w(20));
    assert_eq!(
        sim.rounds.len(),
        measured + 3,
        "one measurement per interval"
    );
    assert_eq!(sim.status.decisions.last().unwrap().checks.len(), 2);

    let step = sim.ask(Verb::Resume, "t2");
    assert_eq!(
        messages(&step),
        vec!["Resumed mhs.application at canary weight 20 as requested by alice"]
    );
    assert!(!sim.status.is_paused());
    assert!(sim
        .status
        .conditions
        .iter()
        .all(|c| c.kind != PAUSED_CONDITION));
    sim.tick();
    assert_eq!(sim.status.canary_weight, w(30));
}

#[test]
fn a_paused_analysis_still_rolls_back_when_its_checks_fail() {
    let mut sim = Sim::new(mhs()).at_weight(20);
    sim.ask(Verb::Pause, "t1");
    sim.fail_metric(REQUEST_SUCCESS_RATE, 50.0, 1000);
    for _ in 0..5 {
        sim.tick();
    }
    assert_eq!(sim.status.phase, Some(Phase::Failed));
    assert!(!sim.status.is_paused());
}

#[test]
fn pause_and_resume_do_not_move_the_analysis_clock() {
    let mut sim = Sim::new(mhs()).at_weight(20);
    let due = next_step_at(&sim.plan, &sim.status);
    sim.ask(Verb::Pause, "t1");
    assert_eq!(next_step_at(&sim.plan, &sim.status), due);
    sim.ask(Verb::Resume, "t2");
    assert_eq!(next_step_at(&sim.plan, &sim.status), due);
}

#[test]
fn the_same_request_is_handled_once() {
    let mut sim = Sim::new(mhs()).at_weight(20);
    sim.ask(Verb::Pause, "t1");
    sim.ask(Verb::Resume, "t2");
    // The resume request stays in place (the annotation, the file): it is not handled again,
    // and a pause sent with the old token is not either.
    let again = sim.ask(Verb::Resume, "t2");
    assert!(messages(&again).is_empty(), "{:?}", messages(&again));
    let stale = sim.ask(Verb::Pause, "t2");
    assert!(messages(&stale).is_empty());
    assert!(!sim.status.is_paused());
}

#[test]
fn requests_that_change_nothing_say_so_and_change_nothing() {
    let mut sim = Sim::new(mhs()).at_weight(20);
    let step = sim.ask(Verb::Resume, "t1");
    assert_eq!(
        messages(&step),
        vec!["resume of mhs.application requested by alice: it is not paused (Progressing at canary weight 20), nothing to do"]
    );
    assert_eq!(step.events().next().unwrap().severity, Severity::Normal);
    sim.ask(Verb::Pause, "t2");
    let before = sim.status.clone();
    let step = sim.ask(Verb::Pause, "t3");
    assert_eq!(
        messages(&step),
        vec!["pause of mhs.application requested by alice: it is already paused (Progressing at canary weight 20), nothing to do"]
    );
    assert_eq!(sim.status.paused, before.paused);
}

/// Every verb in every phase: acted on, already done, or refused (with the reason's start).
#[test]
fn each_request_acts_only_in_the_phases_where_it_makes_sense() {
    use RequestFit::{Acts, Already, Refused};
    let status = |phase: Option<Phase>, paused: bool| CanaryStatus {
        phase,
        canary_weight: w(20),
        paused: paused.then(|| crate::spec::Pause {
            since: Timestamp::from_unix_millis(T0),
            cause: PauseCause::Requested,
            by: "bob".into(),
        }),
        ..CanaryStatus::new()
    };
    let kind = |fit: RequestFit| match fit {
        Acts => "acts",
        Already(_) => "already",
        Refused(_) => "refused",
    };
    let p = |phase| Some(phase);
    let cases: &[(Option<Phase>, bool, [&str; 4])] = &[
        // phase, paused, [promote, abort, pause, resume]
        (None, false, ["refused"; 4]),
        (p(Phase::Initializing), false, ["refused"; 4]),
        (p(Phase::Initialized), false, ["refused"; 4]),
        (p(Phase::Waiting), false, ["refused"; 4]),
        (
            p(Phase::Progressing),
            false,
            ["acts", "acts", "acts", "already"],
        ),
        (
            p(Phase::Progressing),
            true,
            ["acts", "acts", "already", "acts"],
        ),
        (
            p(Phase::WaitingPromotion),
            false,
            ["acts", "acts", "acts", "already"],
        ),
        (
            p(Phase::WaitingPromotion),
            true,
            ["acts", "acts", "already", "acts"],
        ),
        (
            p(Phase::Promoting),
            false,
            ["already", "refused", "refused", "refused"],
        ),
        (
            p(Phase::Finalising),
            false,
            ["already", "refused", "refused", "refused"],
        ),
        (
            p(Phase::Succeeded),
            false,
            ["already", "refused", "refused", "refused"],
        ),
        (
            p(Phase::Failed),
            false,
            ["refused", "already", "refused", "refused"],
        ),
        (p(Phase::Terminating), false, ["refused"; 4]),
        (p(Phase::Terminated), false, ["refused"; 4]),
    ];
    for (phase, paused, want) in cases {
        let s = status(*phase, *paused);
        let got: Vec<&str> = Verb::ALL.map(|v| kind(request_fit(&s, v))).to_vec();
        assert_eq!(got, want.to_vec(), "{phase:?} paused={paused}");
    }
    let RequestFit::Refused(why) = request_fit(&status(p(Phase::Failed), false), Verb::Promote)
    else {
        panic!()
    };
    assert_eq!(
        why,
        "only a canary under analysis (Progressing or WaitingPromotion) can be promoted, this one is Failed; weir retry analyses the failed version again"
    );
    let RequestFit::Refused(why) = request_fit(&status(p(Phase::Promoting), false), Verb::Abort)
    else {
        panic!()
    };
    assert!(why.starts_with("its promotion is under way (Promoting at canary weight 20)"));
}

#[test]
fn a_refused_request_is_recorded_and_ignored() {
    let mut sim = Sim::new(mhs()).progressing();
    for _ in 0..20 {
        if sim.status.phase == Some(Phase::Succeeded) {
            break;
        }
        sim.tick();
    }
    let before = sim.status.clone();
    let step = sim.ask(Verb::Abort, "t1");
    assert_eq!(
        messages(&step),
        vec!["Ignoring abort request by alice for mhs.application: only a canary under analysis (Progressing or WaitingPromotion) can be aborted, this one is Succeeded"]
    );
    assert_eq!(step.events().next().unwrap().severity, Severity::Warning);
    assert_eq!(actions(&step), vec![]);
    assert_eq!(sim.status.phase, before.phase);
    assert_eq!(sim.status.last_request.as_deref(), Some("t1"));
}

#[test]
fn a_suspended_canary_ignores_requests() {
    let mut sim = Sim::new(mhs()).at_weight(20);
    sim.plan.suspend = true;
    let step = sim.ask(Verb::Promote, "t1");
    assert_eq!(
        messages(&step),
        vec!["Ignoring promote request by alice for mhs.application: the Canary is suspended (spec.suspend: true), so nothing acts on it; set suspend to false first"]
    );
    assert_eq!(sim.status.phase, Some(Phase::Progressing));
}

#[test]
fn a_new_revision_ends_a_pause() {
    let mut sim = Sim::new(mhs()).at_weight(20);
    sim.ask(Verb::Pause, "t1");
    sim.obs.revision = "r3".into();
    sim.tick();
    assert_eq!(sim.status.canary_weight, w(0));
    assert!(!sim.status.is_paused());
}

/// The mhs analysis with `inconclusiveLimit: 3` and a canary without enough traffic.
fn starved(limit: &str) -> Sim {
    let plan = mhs_plus(limit);
    let mut sim = Sim::new(plan).at_weight(20);
    sim.fail_metric(REQUEST_SUCCESS_RATE, 100.0, 3);
    sim
}

#[test]
fn inconclusive_limit_steps_in_a_row_pause_the_canary_for_a_decision() {
    let mut sim = starved("  inconclusiveLimit: 3");
    sim.tick();
    sim.tick();
    assert!(!sim.status.is_paused());
    let step = sim.tick();
    let said = messages(&step);
    assert_eq!(
        said.last().unwrap(),
        "mhs.application needs a decision: weir promote / weir abort (3 inconclusive analysis steps in a row reached inconclusiveLimit 3; paused at canary weight 20, the checks go on)"
    );
    assert_eq!(step.events().last().unwrap().severity, Severity::Warning);
    assert_eq!(step.events().last().unwrap().reason, "Paused");
    let s = &sim.status;
    assert_eq!(
        s.paused.as_ref().unwrap().cause,
        PauseCause::InconclusiveLimit
    );
    let condition = s
        .conditions
        .iter()
        .find(|c| c.kind == PAUSED_CONDITION)
        .unwrap();
    assert_eq!(
        (condition.reason.as_str(), condition.message.as_str()),
        (
            "InconclusiveLimit",
            "needs a decision: weir promote / weir abort (3 inconclusive analysis steps in a row)"
        )
    );
    assert_eq!((s.phase, s.failed_checks), (Some(Phase::Progressing), 0));

    // Traffic comes back: the checks pass, but the canary waits for its decision.
    sim.heal();
    let step = sim.tick();
    assert!(messages(&step)[0].contains("is paused at canary weight 20 (by inconclusiveLimit)"));
    assert_eq!(sim.status.canary_weight, w(20));
    sim.ask(Verb::Promote, "t1");
    assert_eq!(sim.status.phase, Some(Phase::Promoting));
    assert!(sim
        .status
        .conditions
        .iter()
        .all(|c| c.kind != PAUSED_CONDITION));
}

#[test]
fn any_other_outcome_ends_a_run_of_inconclusive_steps() {
    let mut sim = starved("  inconclusiveLimit: 3");
    sim.tick();
    sim.tick();
    assert_eq!(sim.status.consecutive_inconclusive, 2);
    sim.fail_metric(REQUEST_SUCCESS_RATE, 50.0, 1000);
    sim.tick();
    assert_eq!(sim.status.consecutive_inconclusive, 0);
    sim.fail_metric(REQUEST_SUCCESS_RATE, 100.0, 3);
    sim.tick();
    sim.tick();
    assert!(!sim.status.is_paused(), "two in a row after the failure");
}

#[test]
fn the_default_inconclusive_limit_is_ten_and_zero_turns_it_off() {
    let mut sim = starved("");
    for _ in 0..9 {
        sim.tick();
    }
    assert!(!sim.status.is_paused());
    sim.tick();
    assert!(sim.status.is_paused());

    let mut sim = starved("  inconclusiveLimit: 0");
    for _ in 0..30 {
        sim.tick();
    }
    assert!(!sim.status.is_paused());
    assert_eq!(sim.status.consecutive_inconclusive, 30);
}

#[test]
fn resume_after_the_inconclusive_limit_counts_again_from_zero() {
    let mut sim = starved("  inconclusiveLimit: 2");
    sim.tick();
    sim.tick();
    assert!(sim.status.is_paused());
    sim.ask(Verb::Resume, "t1");
    assert_eq!(sim.status.consecutive_inconclusive, 0);
    sim.tick();
    assert!(!sim.status.is_paused());
    sim.tick();
    assert!(sim.status.is_paused());
}

#[test]
fn request_annotations_read_verb_and_token_and_refuse_anything_else() {
    let r = OperatorRequest::parse_annotation("abort 17", "kubectl-annotate").unwrap();
    assert_eq!(
        r,
        OperatorRequest {
            verb: Verb::Abort,
            token: "17".into(),
            by: "kubectl-annotate".into()
        }
    );
    assert_eq!(r.annotation_value(), "abort 17");
    let e = OperatorRequest::parse_annotation("promote", "x").unwrap_err();
    assert!(e.contains("write `<verb> <token>`"), "{e}");
    let e = OperatorRequest::parse_annotation("skip 3", "x").unwrap_err();
    assert!(
        e.contains("use one of promote, abort, pause, resume"),
        "{e}"
    );
}
