//! The judge benchmark behind `cargo xtask bench judge`: how often each rule rolls back a healthy
//! canary, how often it lets a regression through, and how soon it catches one, Flagger's
//! fixed-threshold rule and Weir's comparative judge side by side.
//!
//! Each rollout is simulated through the real pieces, without Envoy: the controller's ingest
//! (reports of both versions every second, merged into its window buckets), the streamed metric
//! source, the judge's evidence tracker of the runner, and the pure analysis engine, stepped
//! every simulated second as the runner would be. Time is simulated (the engine and the ingest
//! take it as an argument), so a rollout of minutes takes milliseconds.
//!
//! The canary gets a fixed number of requests per minute whatever its weight (the grid's rate);
//! the primary gets the rest of the service's traffic at that weight (nine times the canary's at
//! 10%, as much at 50%). Failures are Bernoulli, latencies lognormal (median 20 ms, sigma 0.5).
//! Both rules see the same samples: the canary's requests of second `s` of a rollout come from a
//! random stream seeded by (seed, run, s), the primary's from another, whichever rule runs.
//!
//! - **flagger**: the tutorial's Canary: success rate >= 99% and P99 <= 500 ms over 30 s,
//!   threshold 5, interval 1m, stepWeight 10 to maxWeight 50; `minSampleCount: 0`, so any window
//!   with a request is judged, as Flagger does.
//! - **judge**: the same Canary with `judge: {confidence: 0.99, latencyRatio: 1.2}` (errorRatio
//!   1.5 by default) in place of the success-rate check; the P99 check stays.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use weir_controller::analysis::{self, Effect, Observations, Route};
use weir_controller::ingest::{Ingest, IngestConfig};
use weir_controller::metrics::streamed::StreamedSource;
use weir_controller::metrics::MetricSource;
use weir_controller::runner::JudgeTracker;
use weir_controller::spec::{CanaryPlan, CanaryStatus, Phase, Timestamp, Weight};
use weir_proto::v1::{Report, Reporter, Version, VersionStats};
use weir_proto::LatencyHistogram;

use crate::bench_support::Rng;

/// The Flagger rule's Canary: the tutorial's, judging any window with a request.
pub const FLAGGER_CANARY: &str = "apiVersion: weir.dev/v1alpha1
kind: Canary
metadata: {name: mhs, namespace: application}
spec:
  targetRef: {apiVersion: apps/v1, kind: Deployment, name: mhs}
  service: {port: 80, targetPort: 8080}
  analysis:
    interval: 1m
    maxWeight: 50
    stepWeight: 10
    threshold: 5
    minSampleCount: 0
    metrics:
    - name: request-success-rate
      thresholdRange: {min: 99}
      interval: 30s
    - name: request-duration
      thresholdRange: {max: 500}
      interval: 30s
";

/// The judge rule's Canary.
pub const JUDGE_CANARY: &str = "apiVersion: weir.dev/v1alpha1
kind: Canary
metadata: {name: mhs, namespace: application}
spec:
  targetRef: {apiVersion: apps/v1, kind: Deployment, name: mhs}
  service: {port: 80, targetPort: 8080}
  analysis:
    interval: 1m
    maxWeight: 50
    stepWeight: 10
    threshold: 5
    minSampleCount: 0
    metrics:
    - name: request-duration
      thresholdRange: {max: 500}
      interval: 30s
    judge: {confidence: 0.99, latencyRatio: 1.2}
";

/// Targets from the issue.
pub const FALSE_ROLLBACK_TARGET: f64 = 0.01;
/// Median canary requests before a 50%-error canary is rolled back.
pub const HALF_ERRORS_REQUESTS_TARGET: f64 = 20.0;
/// Share of +5-point regressions caught before promotion at 60 canary requests per minute.
pub const PLUS_FIVE_CAUGHT_TARGET: f64 = 0.95;

/// Median latency of a healthy version, in milliseconds.
const MEDIAN_MS: f64 = 20.0;
/// Spread of the lognormal latency.
const SIGMA: f64 = 0.5;
/// A rollout that has not ended after this long is counted as undecided.
const GIVE_UP: Duration = Duration::from_secs(3 * 3600);

/// What the canary does.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Scenario {
    /// Fails as often as the primary, as fast.
    Healthy,
    /// `points` percentage points more failures than the primary.
    MoreErrors(f64),
    /// Half its requests fail.
    HalfErrors,
    /// Every request takes `factor` times as long.
    Slower(f64),
}

impl Scenario {
    /// The name in tables.
    pub fn name(self) -> String {
        match self {
            Scenario::Healthy => "healthy".into(),
            Scenario::MoreErrors(points) => format!("+{points}pt errors"),
            Scenario::HalfErrors => "50% errors".into(),
            Scenario::Slower(factor) => format!("latency x{factor}"),
        }
    }

    fn canary_failure(self, primary: f64) -> f64 {
        match self {
            Scenario::Healthy | Scenario::Slower(_) => primary,
            Scenario::MoreErrors(points) => primary + points / 100.0,
            Scenario::HalfErrors => 0.5,
        }
    }

    fn canary_latency_factor(self) -> f64 {
        match self {
            Scenario::Slower(factor) => factor,
            _ => 1.0,
        }
    }

    /// The scenarios of the full benchmark.
    pub fn all() -> Vec<Scenario> {
        vec![
            Scenario::Healthy,
            Scenario::MoreErrors(1.0),
            Scenario::MoreErrors(5.0),
            Scenario::HalfErrors,
            Scenario::Slower(1.5),
        ]
    }
}

/// Which rule decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// Flagger's fixed thresholds.
    Flagger,
    /// Weir's comparative judge.
    Judge,
}

impl Rule {
    fn canary(self) -> &'static str {
        match self {
            Rule::Flagger => FLAGGER_CANARY,
            Rule::Judge => JUDGE_CANARY,
        }
    }
}

/// What to run.
#[derive(Debug, Clone, PartialEq)]
pub struct Options {
    /// Rollouts per cell, scenario and rule.
    pub runs: u32,
    /// Canary requests per minute.
    pub rates: Vec<u32>,
    /// The primary's failure probabilities.
    pub primary_errors: Vec<f64>,
    /// The canary's behaviours.
    pub scenarios: Vec<Scenario>,
    /// Random seed.
    pub seed: u64,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            runs: 200,
            rates: vec![5, 20, 60, 600],
            primary_errors: vec![0.001, 0.005, 0.02],
            scenarios: Scenario::all(),
            seed: 1,
        }
    }
}

/// Command-line help.
pub const USAGE: &str = "\
usage: cargo xtask bench judge [--runs N] [--rate R]... [--seed S] [--smoke]

  --runs N   rollouts per cell, scenario and rule (default 200)
  --rate R   canary requests per minute (repeatable; default 5, 20, 60, 600)
  --seed S   random seed (default 1)
  --smoke    4 rollouts of 60 and 600 requests per minute at 0.5% (what the test suite runs)
";

impl Options {
    /// A quick run for the test suite.
    pub fn smoke() -> Self {
        Self {
            runs: 4,
            rates: vec![60, 600],
            primary_errors: vec![0.005],
            ..Self::default()
        }
    }

    /// Parses the arguments; `Ok(None)` means help was asked for.
    pub fn parse(args: &[String]) -> Result<Option<Self>, String> {
        let mut options = Options::default();
        let mut rates = Vec::new();
        let mut args = args.iter();
        while let Some(arg) = args.next() {
            let mut number = |flag: &str| -> Result<u32, String> {
                let text = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
                text.parse()
                    .map_err(|_| format!("{flag} takes a whole number, got `{text}`"))
            };
            match arg.as_str() {
                "-h" | "--help" => return Ok(None),
                "--smoke" => options = Options::smoke(),
                "--runs" => options.runs = number("--runs")?.max(1),
                "--rate" => rates.push(number("--rate")?.max(1)),
                "--seed" => options.seed = u64::from(number("--seed")?),
                other => return Err(format!("unknown argument `{other}`")),
            }
        }
        if !rates.is_empty() {
            options.rates = rates;
        }
        Ok(Some(options))
    }
}

/// How one rollout ended.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rollout {
    /// Rolled back (Failed) rather than promoted.
    pub rolled_back: bool,
    /// Neither within [`GIVE_UP`].
    pub undecided: bool,
    /// Seconds from the first canary traffic to the end.
    pub seconds: f64,
    /// Canary requests served until the end.
    pub canary_requests: u64,
}

/// One cell, scenario and rule over all its rollouts.
#[derive(Debug, Clone, PartialEq)]
pub struct Cell {
    /// Canary requests per minute.
    pub rate: u32,
    /// The primary's failure probability.
    pub primary_error: f64,
    /// The canary's behaviour.
    pub scenario: Scenario,
    /// The rule.
    pub rule: Rule,
    /// Every rollout.
    pub rollouts: Vec<Rollout>,
}

impl Cell {
    /// Share of rollouts rolled back.
    pub fn rollback_rate(&self) -> f64 {
        self.share(|r| r.rolled_back)
    }

    /// Share of rollouts promoted (a missed regression, for a faulty canary).
    pub fn promoted_rate(&self) -> f64 {
        self.share(|r| !r.rolled_back && !r.undecided)
    }

    fn share(&self, f: impl Fn(&Rollout) -> bool) -> f64 {
        let n = self.rollouts.len().max(1) as f64;
        self.rollouts.iter().filter(|r| f(r)).count() as f64 / n
    }

    /// Median over rolled-back rollouts of canary requests and seconds to the rollback.
    pub fn median_detection(&self) -> Option<(f64, f64)> {
        let mut requests: Vec<f64> = Vec::new();
        let mut seconds: Vec<f64> = Vec::new();
        for r in self.rollouts.iter().filter(|r| r.rolled_back) {
            requests.push(r.canary_requests as f64);
            seconds.push(r.seconds);
        }
        if requests.is_empty() {
            return None;
        }
        Some((
            crate::bench_support::quantile_of(&requests, 0.5),
            crate::bench_support::quantile_of(&seconds, 0.5),
        ))
    }
}

/// Every cell.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// The options run.
    pub options: Options,
    /// Cells, in grid order, Flagger's rule before the judge's.
    pub cells: Vec<Cell>,
    /// Wall time of the whole run.
    pub elapsed: Duration,
}

/// Runs the benchmark.
pub fn run(options: &Options) -> anyhow::Result<Outcome> {
    let started = Instant::now();
    let mut cells = Vec::new();
    for &rate in &options.rates {
        for &primary_error in &options.primary_errors {
            for &scenario in &options.scenarios {
                for rule in [Rule::Flagger, Rule::Judge] {
                    let plan = weir_controller::spec::load_yaml(rule.canary())?.plan;
                    let rollouts = (0..options.runs)
                        .map(|run| {
                            let world = World {
                                rate,
                                primary_error,
                                scenario,
                                seed: options.seed ^ (u64::from(run) << 20) ^ u64::from(rate),
                            };
                            simulate(&plan, &world)
                        })
                        .collect::<anyhow::Result<Vec<_>>>()?;
                    cells.push(Cell {
                        rate,
                        primary_error,
                        scenario,
                        rule,
                        rollouts,
                    });
                }
            }
        }
    }
    Ok(Outcome {
        options: options.clone(),
        cells,
        elapsed: started.elapsed(),
    })
}

/// The simulated traffic of one rollout.
struct World {
    rate: u32,
    primary_error: f64,
    scenario: Scenario,
    seed: u64,
}

impl World {
    /// What each version served in second `second` at canary weight `weight`: (requests,
    /// failures, latencies) for the canary and the primary.
    fn serve(&self, second: u64, weight: Weight) -> [(u64, u64, LatencyHistogram); 2] {
        let per_second = f64::from(self.rate) / 60.0;
        let percent = f64::from(weight.percent().max(10));
        let canary_rate = if weight == Weight::ZERO {
            0.0
        } else {
            per_second
        };
        let primary_rate = per_second * (100.0 - percent) / percent;
        let mut canary = Rng::new(self.seed.wrapping_mul(0x9E37_79B9) ^ second.wrapping_mul(2));
        let mut primary = Rng::new(self.seed.wrapping_mul(0x9E37_79B9) ^ (second * 2 + 1));
        let draw = |rng: &mut Rng, rate: f64, failure: f64, factor: f64| {
            let n = poisson(rng, rate);
            let mut failures = 0;
            let mut latency = LatencyHistogram::new();
            for _ in 0..n {
                if rng.uniform() < failure {
                    failures += 1;
                }
                latency.record((rng.lognormal(MEDIAN_MS, SIGMA) * factor * 1000.0) as u64);
            }
            (n, failures, latency)
        };
        [
            draw(
                &mut canary,
                canary_rate,
                self.scenario.canary_failure(self.primary_error),
                self.scenario.canary_latency_factor(),
            ),
            draw(&mut primary, primary_rate, self.primary_error, 1.0),
        ]
    }
}

fn poisson(rng: &mut Rng, mean: f64) -> u64 {
    if mean <= 0.0 {
        return 0;
    }
    if mean > 30.0 {
        return (mean + mean.sqrt() * rng.normal()).round().max(0.0) as u64;
    }
    let limit = (-mean).exp();
    let mut k = 0;
    let mut p = rng.uniform();
    while p > limit {
        k += 1;
        p *= rng.uniform();
    }
    k
}

/// One rollout: Progressing at weight 0 until promotion, rollback, or [`GIVE_UP`].
fn simulate(plan: &CanaryPlan, world: &World) -> anyhow::Result<Rollout> {
    let ingest = Ingest::try_new(IngestConfig::default())?;
    ingest.publish(vec![weir_controller::traffic::canary_route(
        plan,
        Route::Primary,
    )])?;
    let origin = ingest.started_at() + Duration::from_millis(10);
    let t0 = Timestamp::from_unix_millis(1_714_557_600_000);
    let source = StreamedSource::new(ingest.clone());
    let mut status = CanaryStatus {
        phase: Some(Phase::Progressing),
        last_applied_spec: Some("r2".into()),
        last_promoted_spec: Some("r1".into()),
        routed_since: Some(t0),
        analysis_started: Some(t0),
        ..CanaryStatus::new()
    };
    let mut tracker = None;
    let mut canary_requests = 0u64;
    let mut first_traffic: Option<u64> = None;
    let give_up = GIVE_UP.as_secs();
    for second in 1..=give_up {
        // What was served during the second that just ended, reported at its end.
        let served = world.serve(second, status.canary_weight);
        if status.canary_weight > Weight::ZERO && first_traffic.is_none() {
            first_traffic = Some(second - 1);
        }
        canary_requests += served[0].0;
        let now_instant = origin + Duration::from_secs(second);
        let now = t0.saturating_add(Duration::from_secs(second));
        let stats = [Version::Canary, Version::Primary]
            .iter()
            .zip(&served)
            .filter(|(_, (n, _, _))| *n > 0)
            .map(|(version, (n, failures, latency))| VersionStats {
                canary: plan.key(),
                version: *version as i32,
                requests: *n,
                failures: *failures,
                latency: Some(latency.encode()),
            })
            .collect();
        let report = Report {
            reporter: Some(Reporter {
                node_id: "envoy-1".into(),
                namespace: "application".into(),
                workload: "gateway".into(),
            }),
            epoch: 1,
            sequence: second,
            applied_generation: ingest.directive().generation,
            stats,
        };
        ingest
            .ingest(&report, now_instant)
            .map_err(|e| anyhow::anyhow!("the ingest refused a simulated report: {e:?}"))?;

        let mut obs = Observations::new("r2");
        let step = loop {
            match analysis::step(plan, &status, &obs, now) {
                analysis::Outcome::Done(step) => break step,
                analysis::Outcome::Need(need) => {
                    if let Some(since) = need.judge {
                        obs.judge = Some(JudgeTracker::update(
                            &mut tracker,
                            &ingest,
                            plan,
                            since,
                            now,
                            now_instant,
                        ));
                    }
                    if !need.metrics.is_empty() {
                        let mut measured = Vec::new();
                        for check in &need.metrics {
                            measured.push(futures::executor::block_on(source.measure(
                                plan,
                                check,
                                now_instant,
                            )));
                        }
                        obs.measurements = Some(measured);
                    }
                    if !need.webhooks.is_empty() {
                        anyhow::bail!("the simulated Canary has no webhooks");
                    }
                }
            }
        };
        let moved = step
            .effects
            .iter()
            .any(|e| matches!(e, Effect::Route(_) | Effect::RevertRouting));
        status = step.status;
        if moved {
            if let Some(route) = analysis::desired_route(plan, &status) {
                ingest.publish(vec![weir_controller::traffic::canary_route(plan, route)])?;
            }
        }
        let ended = match status.phase {
            Some(Phase::Failed) => Some(true),
            Some(Phase::Promoting | Phase::Finalising | Phase::Succeeded) => Some(false),
            _ => None,
        };
        if let Some(rolled_back) = ended {
            let start = first_traffic.unwrap_or(second);
            return Ok(Rollout {
                rolled_back,
                undecided: false,
                seconds: (second - start) as f64,
                canary_requests,
            });
        }
    }
    Ok(Rollout {
        rolled_back: false,
        undecided: true,
        seconds: give_up as f64,
        canary_requests,
    })
}

fn pct(x: f64) -> String {
    format!("{:.1}%", x * 100.0)
}

impl Outcome {
    /// The cells for one (rate, primary error, scenario), Flagger's then the judge's.
    fn pair(&self, rate: u32, primary_error: f64, scenario: Scenario) -> Option<(&Cell, &Cell)> {
        let find = |rule: Rule| {
            self.cells.iter().find(|c| {
                c.rate == rate
                    && c.primary_error == primary_error
                    && c.scenario == scenario
                    && c.rule == rule
            })
        };
        Some((find(Rule::Flagger)?, find(Rule::Judge)?))
    }

    /// The worst false-rollback rate of the judge over the healthy cells.
    pub fn judge_worst_false_rollback(&self) -> f64 {
        self.cells
            .iter()
            .filter(|c| c.rule == Rule::Judge && c.scenario == Scenario::Healthy)
            .map(Cell::rollback_rate)
            .fold(0.0, f64::max)
    }

    /// The judge's median canary requests to roll back a 50%-error canary, worst cell.
    pub fn judge_half_errors_median_requests(&self) -> Option<f64> {
        self.cells
            .iter()
            .filter(|c| c.rule == Rule::Judge && c.scenario == Scenario::HalfErrors)
            .map(|c| c.median_detection().map_or(f64::INFINITY, |(r, _)| r))
            .reduce(f64::max)
    }

    /// The judge's share of +5pt regressions rolled back at 60 canary requests per minute,
    /// worst primary error rate.
    pub fn judge_plus_five_caught_at_60(&self) -> Option<f64> {
        self.cells
            .iter()
            .filter(|c| {
                c.rule == Rule::Judge && c.rate == 60 && c.scenario == Scenario::MoreErrors(5.0)
            })
            .map(Cell::rollback_rate)
            .reduce(f64::min)
    }

    /// The tables.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "judge benchmark: {} rollouts per cell and rule, seed {}, simulated through the real ingest and engine ({:.1}s wall)",
            self.options.runs,
            self.options.seed,
            self.elapsed.as_secs_f64()
        );
        let _ = writeln!(
            out,
            "flagger = success rate >= 99% and P99 <= 500ms over 30s, threshold 5; judge = P99 <= 500ms plus judge {{confidence 0.99, errorRatio 1.5, latencyRatio 1.2}}"
        );
        let _ = writeln!(
            out,
            "rolled back = share of rollouts rolled back (false rollback for healthy); promoted = share promoted (missed regression); detection = median canary requests / seconds from the first canary request to the rollback\n"
        );
        let _ = writeln!(
            out,
            "{:>7} {:>7} {:<14} | {:>8} {:>8} {:>14} | {:>8} {:>8} {:>14}",
            "req/min",
            "primary",
            "canary",
            "flagger",
            "promoted",
            "detection",
            "judge",
            "promoted",
            "detection"
        );
        let detection = |c: &Cell| match c.median_detection() {
            Some((r, s)) => format!("{r:.0} req {s:.0}s"),
            None => "-".into(),
        };
        for &rate in &self.options.rates {
            for &p in &self.options.primary_errors {
                for &scenario in &self.options.scenarios {
                    let Some((f, j)) = self.pair(rate, p, scenario) else {
                        continue;
                    };
                    let _ = writeln!(
                        out,
                        "{:>7} {:>7} {:<14} | {:>8} {:>8} {:>14} | {:>8} {:>8} {:>14}",
                        rate,
                        pct(p),
                        scenario.name(),
                        pct(f.rollback_rate()),
                        pct(f.promoted_rate()),
                        detection(f),
                        pct(j.rollback_rate()),
                        pct(j.promoted_rate()),
                        detection(j),
                    );
                }
            }
        }
        let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
        let worst = self.judge_worst_false_rollback();
        let _ = writeln!(
            out,
            "\ntarget: judge false rollback <= {} in every cell: worst {} ({})",
            pct(FALSE_ROLLBACK_TARGET),
            pct(worst),
            verdict(worst <= FALSE_ROLLBACK_TARGET)
        );
        if let Some(median) = self.judge_half_errors_median_requests() {
            let _ = writeln!(
                out,
                "target: 50%-error canary rolled back after a median <= {HALF_ERRORS_REQUESTS_TARGET} canary requests: worst cell {median:.0} ({})",
                verdict(median <= HALF_ERRORS_REQUESTS_TARGET)
            );
        }
        if let Some(caught) = self.judge_plus_five_caught_at_60() {
            let _ = writeln!(
                out,
                "target: +5pt regression caught before promotion >= {} at 60 canary req/min: worst {} ({})",
                pct(PLUS_FIVE_CAUGHT_TARGET),
                pct(caught),
                verdict(caught >= PLUS_FIVE_CAUGHT_TARGET)
            );
        }
        out
    }
}
