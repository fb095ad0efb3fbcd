//! Table tests of the engine. [`Sim`] plays the executor: it answers the engine's needs from a
//! scripted world, persists every status through JSON (as the state file does), and checks on
//! every step that route effects agree with [`desired_route`].

mod failures;
mod hooks;
mod judge;
mod lifecycle;
mod operator;
mod restart;
mod strategies;
mod windows;

use super::*;
use crate::spec::{
    self, CanaryPlan, CanaryStatus, MetricKind, Phase, Timestamp, Weight, REQUEST_DURATION,
    REQUEST_SUCCESS_RATE,
};
use std::collections::BTreeMap;
use std::time::Duration;

/// 2024-05-01T10:00:00Z.
const T0: u64 = 1_714_557_600_000;

/// The analysis block from the task, which must run unchanged.
const MHS_ANALYSIS: &str = "
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
    interval: 30s";

/// The mhs Canary with `spec_extra` added to its spec and the given analysis block (indented
/// by two spaces, under `analysis:`).
fn plan_with(spec_extra: &str, analysis: &str) -> CanaryPlan {
    let indented: String = analysis
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| format!("  {l}\n"))
        .collect();
    let spec_extra: String = spec_extra
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| format!("  {}\n", l.trim()))
        .collect();
    let yaml = format!(
        "apiVersion: weir.dev/v1alpha1
kind: Canary
metadata: {{name: mhs, namespace: application}}
spec:
  targetRef: {{apiVersion: apps/v1, kind: Deployment, name: mhs}}
  service: {{port: 80, targetPort: 8080}}
{spec_extra}  analysis:
{indented}"
    );
    match spec::load_yaml(&yaml) {
        Ok(c) => c.plan,
        Err(e) => panic!("test plan does not compile: {e}\n{yaml}"),
    }
}

/// The mhs Canary with the task's analysis block.
fn mhs() -> CanaryPlan {
    plan_with("", MHS_ANALYSIS)
}

/// The mhs analysis block plus extra lines (webhooks, ...).
fn mhs_plus(extra: &str) -> CanaryPlan {
    plan_with("", &format!("{MHS_ANALYSIS}\n{extra}"))
}

fn w(p: i64) -> Weight {
    Weight::try_new(p).unwrap()
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// A passing measurement for each built-in metric, over 1000 requests.
fn healthy(check: &spec::MetricCheck) -> Measurement {
    let value = match check.kind {
        MetricKind::SuccessRate => 99.9,
        MetricKind::Duration => 120.0,
        _ => check.range.min().or(check.range.max()).unwrap_or(0.0),
    };
    Measurement::value(&check.name, "streamed", check.window, value, Some(1000))
}

/// What the simulated executor asked the world for in one round.
#[derive(Debug, Clone, PartialEq)]
struct Round {
    metrics: Vec<String>,
    webhooks: Vec<(String, Phase)>,
}

/// A simulated executor around the engine.
struct Sim {
    plan: CanaryPlan,
    status: CanaryStatus,
    now: Timestamp,
    /// Revision, readiness, retry token, deletion flag for the next step.
    obs: Observations,
    /// Measurements to answer with, by metric name; metrics not listed are measured healthy.
    metrics: BTreeMap<String, Measurement>,
    /// Metrics to leave out of the answer entirely.
    unreported: Vec<String>,
    /// Webhook answers, by name; asking for an unlisted hook fails the test.
    hooks: BTreeMap<String, WebhookResult>,
    /// Every round of inputs the engine asked for, across steps.
    rounds: Vec<Round>,
    /// What both versions served, bucket by bucket, for the comparative judge.
    served: Vec<crate::analysis::judge::BucketPair>,
    /// The times the judge's evidence was asked from.
    judged_since: Vec<Timestamp>,
}

impl Sim {
    /// A Canary never seen before, at T0, with its target at revision `r1`.
    fn new(plan: CanaryPlan) -> Sim {
        Sim {
            plan,
            status: CanaryStatus::new(),
            now: Timestamp::from_unix_millis(T0),
            obs: Observations::new("r1"),
            metrics: BTreeMap::new(),
            unreported: Vec::new(),
            hooks: BTreeMap::new(),
            rounds: Vec::new(),
            served: Vec::new(),
            judged_since: Vec::new(),
        }
    }

    /// Answers the webhook `name` with `result` from now on.
    fn with_hook(mut self, name: &str, result: WebhookResult) -> Sim {
        self.hook(name, result);
        self
    }

    /// Initialized on r1, then r2 detected: Progressing at weight 0.
    fn progressing(self) -> Sim {
        let mut sim = self;
        sim.tick();
        sim.tick();
        assert_eq!(sim.status.phase, Some(Phase::Initialized));
        sim.obs.revision = "r2".into();
        sim.tick();
        assert_eq!(sim.status.phase, Some(Phase::Progressing));
        sim
    }

    /// Progressing on r2 with the canary at `weight` (after the first steps).
    fn at_weight(self, weight: i64) -> Sim {
        let mut sim = self.progressing();
        while sim.status.canary_weight < w(weight) {
            sim.tick();
            assert_eq!(
                sim.status.phase,
                Some(Phase::Progressing),
                "{:?}",
                sim.status
            );
        }
        assert_eq!(sim.status.canary_weight, w(weight));
        sim
    }

    /// Steps at the time the engine says the next step is due.
    fn tick(&mut self) -> Step {
        self.now = self.now.max(next_step_at(&self.plan, &self.status));
        self.step()
    }

    /// Steps at the current time.
    fn step(&mut self) -> Step {
        let step = self.decide(&self.status.clone());
        self.check_routes(&step);
        // Persist as the state file does: through JSON.
        let json = serde_json::to_string(&step.status).expect("status serializes");
        let reloaded: CanaryStatus = serde_json::from_str(&json).expect("status deserializes");
        assert_eq!(reloaded, step.status, "status changes in a JSON round trip");
        self.status = reloaded;
        step
    }

    /// Runs the need loop for one step from `status` without persisting anything.
    fn decide(&mut self, status: &CanaryStatus) -> Step {
        let mut obs = self.obs.clone();
        for _ in 0..8 {
            match step(&self.plan, status, &obs, self.now) {
                Outcome::Done(step) => return step,
                Outcome::Need(need) => {
                    assert!(
                        !need.metrics.is_empty()
                            || !need.webhooks.is_empty()
                            || need.judge.is_some(),
                        "empty need"
                    );
                    if let Some(since) = need.judge {
                        assert!(obs.judge.is_none(), "judge asked for twice");
                        let plan = self
                            .plan
                            .analysis
                            .judge
                            .expect("judge asked without a plan");
                        let mut evidence = Evidence::new(&plan, secs(1));
                        (0..)
                            .zip(&self.served)
                            .for_each(|(index, b)| evidence.absorb(index, b));
                        obs.judge = Some(evidence);
                        self.judged_since.push(since);
                        if need.metrics.is_empty() && need.webhooks.is_empty() {
                            continue;
                        }
                    }
                    self.rounds.push(Round {
                        metrics: need.metrics.iter().map(|m| m.name.clone()).collect(),
                        webhooks: need
                            .webhooks
                            .iter()
                            .map(|c| (c.webhook.name.clone(), c.phase))
                            .collect(),
                    });
                    if !need.metrics.is_empty() {
                        assert!(obs.measurements.is_none(), "metrics asked for twice");
                        obs.measurements = Some(
                            need.metrics
                                .iter()
                                .filter(|m| !self.unreported.contains(&m.name))
                                .map(|m| match self.metrics.get(&m.name) {
                                    // A source measures over the window it is asked for.
                                    Some(scripted) => Measurement {
                                        window: m.window,
                                        ..scripted.clone()
                                    },
                                    None => healthy(m),
                                })
                                .collect(),
                        );
                    }
                    for call in need.webhooks {
                        let name = &call.webhook.name;
                        assert!(
                            !obs.webhooks.contains_key(name),
                            "hook {name} asked for twice"
                        );
                        let answer = self.hooks.get(name).unwrap_or_else(|| {
                            panic!("the engine called hook {name}, which the test did not expect")
                        });
                        obs.webhooks.insert(name.clone(), answer.clone());
                    }
                }
            }
        }
        panic!("the need loop did not end")
    }

    /// Route effects must agree with `desired_route`: emitted exactly when it changes.
    fn check_routes(&self, step: &Step) {
        let before = desired_route(&self.plan, &self.status);
        let after = desired_route(&self.plan, &step.status);
        let last = step.effects.iter().rev().find_map(|e| match e {
            Effect::Route(r) => Some(Some(*r)),
            Effect::RevertRouting => Some(None),
            _ => None,
        });
        if before != after {
            assert_eq!(
                last,
                Some(after),
                "desired route went {before:?} -> {after:?} but effects were {:?}",
                step.effects
            );
        } else {
            assert_eq!(
                last, None,
                "route effect without a route change: {:?}",
                step.effects
            );
        }
    }

    fn fail_metric(&mut self, name: &str, value: f64, requests: u64) {
        let window = self.window(name);
        self.metrics.insert(
            name.into(),
            Measurement::value(name, "streamed", window, value, Some(requests)),
        );
    }

    fn window(&self, name: &str) -> Duration {
        self.plan
            .analysis
            .metrics
            .iter()
            .find(|m| m.name == name)
            .map_or(secs(60), |m| m.window)
    }

    fn heal(&mut self) {
        self.metrics.clear();
        self.unreported.clear();
    }

    fn hook(&mut self, name: &str, result: WebhookResult) {
        self.hooks.insert(name.into(), result);
    }
}

/// The event messages of a step.
fn messages(step: &Step) -> Vec<String> {
    step.events().map(|e| e.message.clone()).collect()
}

/// The effects of a step on the world: neither events nor alerts.
fn actions(step: &Step) -> Vec<Effect> {
    step.effects
        .iter()
        .filter(|e| !matches!(e, Effect::Event(_) | Effect::Alert(_)))
        .cloned()
        .collect()
}

/// The alerts of a step: severity and message.
fn alerts(step: &Step) -> Vec<(crate::spec::AlertSeverity, String)> {
    step.effects
        .iter()
        .filter_map(|e| match e {
            Effect::Alert(a) => Some((a.severity, a.message.clone())),
            _ => None,
        })
        .collect()
}

fn failed() -> WebhookResult {
    WebhookResult::Failed("500 Internal Server Error".into())
}

#[test]
fn desired_route_follows_phase_strategy_and_weight() {
    let canary = mhs();
    let ab = plan_with(
        "",
        "  interval: 1m\n  iterations: 3\n  match:\n  - headers: {x-canary: {exact: insider}}",
    );
    let revert = plan_with("revertOnDeletion: true", MHS_ANALYSIS);
    let status =
        |phase: Option<Phase>, weight: i64, iterations: u32, promoted: bool| CanaryStatus {
            phase,
            canary_weight: w(weight),
            iterations,
            last_promoted_spec: promoted.then(|| "r1".to_string()),
            ..CanaryStatus::new()
        };
    let cases = [
        (&canary, status(None, 0, 0, false), None),
        (
            &canary,
            status(Some(Phase::Initializing), 0, 0, false),
            None,
        ),
        (
            &canary,
            status(Some(Phase::Initialized), 0, 0, true),
            Some(Route::Primary),
        ),
        (
            &canary,
            status(Some(Phase::Progressing), 0, 0, true),
            Some(Route::Primary),
        ),
        (
            &canary,
            status(Some(Phase::Progressing), 30, 0, true),
            Some(Route::Weighted(w(30))),
        ),
        (
            &canary,
            status(Some(Phase::WaitingPromotion), 50, 0, true),
            Some(Route::Weighted(w(50))),
        ),
        (
            &canary,
            status(Some(Phase::Promoting), 50, 0, true),
            Some(Route::Weighted(w(50))),
        ),
        (
            &canary,
            status(Some(Phase::Finalising), 0, 0, true),
            Some(Route::Primary),
        ),
        (
            &canary,
            status(Some(Phase::Failed), 0, 0, true),
            Some(Route::Primary),
        ),
        (
            &ab,
            status(Some(Phase::Progressing), 0, 0, true),
            Some(Route::Primary),
        ),
        (
            &ab,
            status(Some(Phase::Progressing), 0, 2, true),
            Some(Route::Matches),
        ),
        (
            &canary,
            status(Some(Phase::Terminating), 30, 0, true),
            Some(Route::Primary),
        ),
        (&canary, status(Some(Phase::Terminating), 0, 0, false), None),
        (
            &canary,
            status(Some(Phase::Terminated), 0, 0, true),
            Some(Route::Primary),
        ),
        (&revert, status(Some(Phase::Terminated), 0, 0, true), None),
    ];
    for (plan, status, want) in cases {
        assert_eq!(desired_route(plan, &status), want, "{:?}", status.phase);
    }
}

#[test]
fn route_weights_convert_to_basis_points_for_directives() {
    assert_eq!(Route::weighted(Weight::ZERO), Route::Primary);
    assert_eq!(Route::weighted(w(10)).canary_weight_bp(), 1000);
    assert_eq!(Route::Weighted(Weight::FULL).canary_weight_bp(), 10_000);
    assert_eq!(Route::Matches.canary_weight_bp(), 0);
}

#[test]
fn the_builtin_metric_names_are_the_ones_in_the_plan() {
    let plan = mhs();
    let names: Vec<&str> = plan
        .analysis
        .metrics
        .iter()
        .map(|m| m.name.as_str())
        .collect();
    assert_eq!(names, vec![REQUEST_SUCCESS_RATE, REQUEST_DURATION]);
}
