//! The comparative judge: is the canary worse than the primary, from both versions' exact counts
//! over the same time, with error bounds that hold however often it looks?
//!
//! The math is written out in `docs/judge.md`. In short, for each comparison (failures, and for
//! latency the share of requests slower than a threshold):
//!
//! - The evidence comes in one-second buckets (the ingest's windows). In a bucket the canary
//!   served `n_c` requests of which `k_c` "events" (failed, or slow), the primary `n_p` and `k_p`.
//! - Given the bucket's totals, the canary's share `k_c` of the `F = k_c + k_p` events follows
//!   Fisher's noncentral hypergeometric law whose only parameter is the odds ratio
//!   `θ = odds(p_c) / odds(p_p)`. The nuisance (the primary's own rate) is gone, which is what
//!   makes the comparison sharp with few canary requests.
//! - Fail, "the canary fails more often than the primary", is `θ > 1`. The product over buckets
//!   of the likelihood ratio `P_θ1(k_c) / P_1(k_c)` is a test supermartingale whenever `θ <= 1`
//!   (the family has a monotone likelihood ratio in `k_c`); a mixture over a fixed grid of
//!   alternatives `θ1 > 1`, weighted towards the regressions a rollout can catch
//!   ([`Mixture`]), is one too. The factors multiply across the whole attempt, steps included. By Ville's inequality it ever reaches `1/α`
//!   with probability at most `α`: a canary no worse than the primary is rolled back with
//!   probability at most `α`, however long and however often the judge looks
//!   ([`Verdict::Fail`]).
//! - Pass, "not worse beyond the tolerance τ" (`errorRatio`), is `θ < τ`: the mirror test, with
//!   null `θ >= τ` and alternatives `θ1 < τ`, at the same confidence. Between 1 and τ either
//!   verdict may come (or neither): that is the indifference zone of Wald's SPRT, which this
//!   is, made anytime-valid for composite alternatives by the mixture.
//!
//! Pure: no I/O, no clock. The executor feeds what each bucket served since its last look into
//! [`Evidence::absorb`] and hands the evidence to the engine, which asks [`decide`] for the
//! verdict.

use crate::spec::{format_go_duration, JudgePlan};
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// The latency thresholds, in microseconds: 1 ms to 8.192 s, doubling. A canary request counts
/// as slow at threshold `t` when it took longer than `latencyRatio × t`, a primary request when
/// it took longer than `t`. Fixed in advance (not taken from the data), so that each threshold's
/// test keeps its guarantee; [`decide`] averages their e-values.
pub const LATENCY_THRESHOLDS_US: [u64; 14] = [
    1_000, 2_000, 4_000, 8_000, 16_000, 32_000, 64_000, 128_000, 256_000, 512_000, 1_024_000,
    2_048_000, 4_096_000, 8_192_000,
];

/// Which alternatives a test's Fail mixture weighs (docs/judge.md, "Choosing the mixture").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mixture {
    /// For failures: odds ratios 1.3 to 120 around 6, most of the weight on 3.6 to 10. A +5
    /// point regression is odds ratio 3.7 beside a primary failing 2%, 11.6 beside 0.5%, 54
    /// beside 0.1%; within a rollout's few minutes the likelihood ratio at an odds ratio below
    /// the truth crosses the bar most often (docs/judge.md); a 50%-error canary is 50 to 1000
    /// and is caught in about ten requests whatever its weight here.
    Errors,
    /// For latency at one threshold: odds ratios 1.1 to 164 around 3. A canary uniformly 1.5
    /// times slower, judged with `latencyRatio` 1.2, is odds ratio 2 to 3 where most requests
    /// are; twice as slow, about 5.
    Latency,
}

impl Mixture {
    /// The odds ratio the weight is centred on, the range of `k` in `centre · e^(k/2)`, and the
    /// standard deviation of the weights' normal law on `ln θ`.
    pub fn grid(self) -> (f64, std::ops::RangeInclusive<i32>, f64) {
        match self {
            Mixture::Errors => (6.0, -3..=6, 0.5),
            Mixture::Latency => (3.0, -2..=8, 1.0),
        }
    }

    /// The alternatives as `(ln θ1 / θ0, ln weight)`: odds ratios `centre · e^(k/2)` times the
    /// null's, weighted as a normal law on `ln θ` of standard deviation `sd` (weights
    /// `∝ e^(-(k/2)²/(2 sd²))`), normalised to sum to 1. Fixed in advance, never taken from the
    /// data.
    pub fn alternatives(self) -> Vec<(f64, f64)> {
        let (centre, ks, sd) = self.grid();
        let raw: Vec<(f64, f64)> = ks
            .map(|k| {
                let step = f64::from(k) / 2.0;
                (centre.ln() + step, -step * step / (2.0 * sd * sd))
            })
            .collect();
        let log_total = log_sum_exp(raw.iter().map(|(_, w)| *w));
        raw.into_iter().map(|(g, w)| (g, w - log_total)).collect()
    }
}

/// Pass's alternatives, as fractions of the tolerance: from barely inside it to far inside it,
/// equally weighted.
const PASS_ALTERNATIVES: [f64; 8] = [1.25, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0, 100.0];

/// With latency compared, the weight of failures in the combined e-value against "the canary is
/// no worse"; the rest goes to latency, spread evenly over the thresholds. Failures get most:
/// they are what a rollout must catch at low traffic, and latency evidence, from every request
/// rather than from the few failed ones, comes faster.
pub const ERROR_WEIGHT_WITH_LATENCY: f64 = 0.9;

/// What one version served in one bucket.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VersionCounts {
    /// Requests.
    pub requests: u64,
    /// Of those, failed.
    pub failures: u64,
    /// Of those, slow, per entry of [`LATENCY_THRESHOLDS_US`]: for the canary, slower than
    /// `latencyRatio ×` the threshold; for the primary, slower than the threshold. Empty when
    /// the judge does not compare latency.
    pub slow: Vec<u64>,
}

impl VersionCounts {
    /// What `self` holds beyond `earlier`, an earlier reading of the same bucket (counts only
    /// grow while a bucket fills).
    fn since(&self, earlier: &VersionCounts) -> VersionCounts {
        VersionCounts {
            requests: self.requests.saturating_sub(earlier.requests),
            failures: self.failures.saturating_sub(earlier.failures),
            slow: self
                .slow
                .iter()
                .enumerate()
                .map(|(i, n)| n.saturating_sub(earlier.slow.get(i).copied().unwrap_or(0)))
                .collect(),
        }
    }
}

/// Both versions over one bucket of the ingest's windows, or over what arrived in it between
/// two looks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BucketPair {
    /// The primary.
    pub primary: VersionCounts,
    /// The canary.
    pub canary: VersionCounts,
}

impl BucketPair {
    /// What arrived in the bucket since `earlier`, a reading of it at an earlier look.
    pub fn since(&self, earlier: &BucketPair) -> BucketPair {
        BucketPair {
            primary: self.primary.since(&earlier.primary),
            canary: self.canary.since(&earlier.canary),
        }
    }
}

/// The judge's outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Verdict {
    /// The canary fails more often than the primary, or is slower than it beyond
    /// `latencyRatio`, with the stated confidence.
    Fail,
    /// The canary is not worse than the primary beyond the error tolerance, with the stated
    /// confidence, and no latency comparison failed.
    Pass,
    /// Not enough evidence either way yet.
    Continue,
}

impl Verdict {
    /// `fail`, `pass`, `continue`.
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Fail => "fail",
            Verdict::Pass => "pass",
            Verdict::Continue => "continue",
        }
    }
}

/// One sequential comparison of event shares (failures, or slow requests at one threshold).
#[derive(Debug, Clone, PartialEq)]
pub struct SequentialTest {
    /// The odds ratio above which the canary is worse (Fail's null is "at most this").
    fail_above: f64,
    /// The odds ratio below which the canary passes (Pass's null is "at least this").
    pass_below: f64,
    /// Fail's alternatives: (ln of the odds ratio over `fail_above`, ln weight).
    fail_alternatives: Vec<(f64, f64)>,
    /// ln of the product of likelihood ratios, per Fail alternative.
    log_fail: Vec<f64>,
    /// The same per Pass alternative (`pass_below / PASS_ALTERNATIVES`).
    log_pass: [f64; PASS_ALTERNATIVES.len()],
    /// Events and requests seen, per version: (canary events, canary requests, primary events,
    /// primary requests).
    totals: [u64; 4],
}

impl SequentialTest {
    /// A test that fails when the canary's odds of an event exceed `fail_above` × the primary's
    /// and passes when they are below `pass_below` × the primary's (both positive; `pass_below`
    /// at least `fail_above`, or the two verdicts could both be right). Fail mixes over
    /// `mixture`'s alternatives.
    pub fn new(fail_above: f64, pass_below: f64, mixture: Mixture) -> Self {
        let fail_above = fail_above.max(f64::MIN_POSITIVE);
        let fail_alternatives = mixture.alternatives();
        Self {
            fail_above,
            pass_below: pass_below.max(fail_above),
            log_fail: vec![0.0; fail_alternatives.len()],
            fail_alternatives,
            log_pass: [0.0; PASS_ALTERNATIVES.len()],
            totals: [0; 4],
        }
    }

    /// Adds one bucket: the canary had `k_c` events in `n_c` requests, the primary `k_p` in `n_p`.
    /// A bucket without events, or without requests on either side, carries no evidence.
    pub fn absorb(&mut self, k_c: u64, n_c: u64, k_p: u64, n_p: u64) {
        let (k_c, k_p) = (k_c.min(n_c), k_p.min(n_p));
        self.totals[0] += k_c;
        self.totals[1] += n_c;
        self.totals[2] += k_p;
        self.totals[3] += n_p;
        let events = k_c + k_p;
        if events == 0 || n_c == 0 || n_p == 0 {
            return;
        }
        let law = NoncentralHypergeometric::new(n_c, n_p, events);
        let (fail_null, pass_null) = (self.fail_above.ln(), self.pass_below.ln());
        let fail_at_null = law.log_pmf(k_c, fail_null);
        let pass_at_null = law.log_pmf(k_c, pass_null);
        for (log, (shift, _)) in self.log_fail.iter_mut().zip(&self.fail_alternatives) {
            *log += law.log_pmf(k_c, fail_null + shift) - fail_at_null;
        }
        for (log, g) in self.log_pass.iter_mut().zip(PASS_ALTERNATIVES) {
            *log += law.log_pmf(k_c, pass_null - g.ln()) - pass_at_null;
        }
    }

    /// The e-value against "not worse" (large: the canary is worse): the weighted mixture of
    /// the alternatives' likelihood ratios.
    pub fn e_fail(&self) -> f64 {
        let terms = self
            .log_fail
            .iter()
            .zip(&self.fail_alternatives)
            .map(|(log, (_, weight))| log + weight);
        finite_exp(log_sum_exp(terms))
    }

    /// The e-value against "worse beyond the tolerance" (large: the canary is not).
    pub fn e_pass(&self) -> f64 {
        let weight = -(PASS_ALTERNATIVES.len() as f64).ln();
        finite_exp(log_sum_exp(self.log_pass.iter().map(|log| log + weight)))
    }

    /// Fail when the evidence against "not worse" reaches `1/alpha`, Pass when the evidence
    /// against "worse" does, else Continue.
    pub fn verdict(&self, alpha: f64) -> Verdict {
        let bar = 1.0 / alpha;
        if self.e_fail() >= bar {
            Verdict::Fail
        } else if self.e_pass() >= bar {
            Verdict::Pass
        } else {
            Verdict::Continue
        }
    }

    /// (canary events, canary requests, primary events, primary requests).
    pub fn totals(&self) -> [u64; 4] {
        self.totals
    }
}

/// ln Σ e^x, without overflow; `-inf` for no terms.
fn log_sum_exp(terms: impl Iterator<Item = f64> + Clone) -> f64 {
    let max = terms.clone().fold(f64::NEG_INFINITY, f64::max);
    if !max.is_finite() {
        return max;
    }
    max + terms.map(|t| (t - max).exp()).sum::<f64>().ln()
}

/// e^x, where a mixture's ln of `+inf` (a likelihood ratio of an impossible null) reads as
/// `inf` and `-inf` as 0.
fn finite_exp(x: f64) -> f64 {
    if x.is_nan() {
        0.0
    } else {
        x.exp()
    }
}

/// Fisher's noncentral hypergeometric law of the canary's share of `events` events among `n_c`
/// canary and `n_p` primary requests: `P(k) ∝ C(n_c, k) C(n_p, events - k) θ^k`.
struct NoncentralHypergeometric {
    low: u64,
    /// ln C(n_c, k) + ln C(n_p, events - k) for k = low, low + 1, ...
    log_weights: Vec<f64>,
}

impl NoncentralHypergeometric {
    fn new(n_c: u64, n_p: u64, events: u64) -> Self {
        let low = events.saturating_sub(n_p);
        let high = events.min(n_c);
        let log_weights = (low..=high)
            .map(|k| ln_choose(n_c, k) + ln_choose(n_p, events - k))
            .collect();
        Self { low, log_weights }
    }

    /// ln P(k) at odds ratio `exp(log_theta)`.
    fn log_pmf(&self, k: u64, log_theta: f64) -> f64 {
        let term = |i: usize, w: f64| w + (self.low + i as u64) as f64 * log_theta;
        let max = self
            .log_weights
            .iter()
            .enumerate()
            .map(|(i, w)| term(i, *w))
            .fold(f64::NEG_INFINITY, f64::max);
        let sum: f64 = self
            .log_weights
            .iter()
            .enumerate()
            .map(|(i, w)| (term(i, *w) - max).exp())
            .sum();
        let log_z = max + sum.ln();
        let index = usize::try_from(k.saturating_sub(self.low)).unwrap_or(usize::MAX);
        match self.log_weights.get(index) {
            Some(w) if k >= self.low => term(index, *w) - log_z,
            _ => f64::NEG_INFINITY,
        }
    }
}

/// ln C(n, k).
fn ln_choose(n: u64, k: u64) -> f64 {
    if k > n {
        return f64::NEG_INFINITY;
    }
    ln_factorial(n) - ln_factorial(k) - ln_factorial(n - k)
}

/// ln n!, exact by summation for small n, Stirling's series beyond (error below 1e-13).
fn ln_factorial(n: u64) -> f64 {
    if n < 64 {
        return (2..=n).map(|i| (i as f64).ln()).sum();
    }
    let x = n as f64;
    x * x.ln() - x + 0.5 * (2.0 * std::f64::consts::PI * x).ln() + 1.0 / (12.0 * x)
        - 1.0 / (360.0 * x.powi(3))
        + 1.0 / (1260.0 * x.powi(5))
}

/// Buckets are pooled into one observation until both versions have served at least this many
/// requests: a bucket with one canary and one primary request says little about their shares,
/// and one without primary requests says nothing. The rule looks at request counts only, never
/// at outcomes, so each pooled observation keeps the conditional law (docs/judge.md).
pub const MIN_POOLED_REQUESTS: u64 = 5;

/// Everything the judge has seen since the current attempt began: one test for failures, one
/// per latency threshold.
#[derive(Debug, Clone, PartialEq)]
pub struct Evidence {
    errors: SequentialTest,
    latency: Vec<SequentialTest>,
    /// Requests absorbed but not yet weighed (too few on a side).
    pending: BucketPair,
    /// Buckets absorbed from (whole or in part).
    buckets: u64,
    /// The bucket absorbed from last.
    last_bucket: Option<u64>,
    /// Width of one bucket.
    bucket_width: Duration,
}

impl Evidence {
    /// No evidence yet, for `plan`'s tolerances, over buckets `bucket_width` wide.
    pub fn new(plan: &JudgePlan, bucket_width: Duration) -> Self {
        Self {
            errors: SequentialTest::new(1.0, plan.error_ratio, Mixture::Errors),
            latency: match plan.latency_ratio {
                // The latency tolerance is in the thresholds: the canary's are the larger.
                Some(_) => LATENCY_THRESHOLDS_US
                    .iter()
                    .map(|_| SequentialTest::new(1.0, 1.0, Mixture::Latency))
                    .collect(),
                None => Vec::new(),
            },
            pending: BucketPair::default(),
            buckets: 0,
            last_bucket: None,
            bucket_width,
        }
    }

    /// Adds what bucket `index` served since the last look: the whole bucket, or the part of it
    /// that arrived since (the current bucket is read while it fills, and each request is
    /// absorbed once); weighs the pooled requests once both versions have served
    /// [`MIN_POOLED_REQUESTS`].
    pub fn absorb(&mut self, index: u64, bucket: &BucketPair) {
        if self.last_bucket != Some(index) {
            self.buckets += 1;
            self.last_bucket = Some(index);
        }
        let pool = |into: &mut VersionCounts, from: &VersionCounts| {
            into.requests += from.requests;
            into.failures += from.failures;
            if into.slow.len() < from.slow.len() {
                into.slow.resize(from.slow.len(), 0);
            }
            for (i, n) in from.slow.iter().enumerate() {
                into.slow[i] += n;
            }
        };
        pool(&mut self.pending.canary, &bucket.canary);
        pool(&mut self.pending.primary, &bucket.primary);
        if self.pending.canary.requests < MIN_POOLED_REQUESTS
            || self.pending.primary.requests < MIN_POOLED_REQUESTS
        {
            return;
        }
        let pooled = std::mem::take(&mut self.pending);
        let (c, p) = (&pooled.canary, &pooled.primary);
        self.errors
            .absorb(c.failures, c.requests, p.failures, p.requests);
        for (i, test) in self.latency.iter_mut().enumerate() {
            let slow_c = c.slow.get(i).copied().unwrap_or(0);
            let slow_p = p.slow.get(i).copied().unwrap_or(0);
            test.absorb(slow_c, c.requests, slow_p, p.requests);
        }
    }

    /// How much time the absorbed buckets cover.
    pub fn span(&self) -> Duration {
        self.bucket_width
            .saturating_mul(u32::try_from(self.buckets).unwrap_or(u32::MAX))
    }

    /// The failure comparison.
    pub fn errors(&self) -> &SequentialTest {
        &self.errors
    }
}

/// The judge's verdict with the numbers behind it, for events and the decision history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JudgeResult {
    /// `fail`, `pass` or `continue`.
    pub verdict: String,
    /// What decided it: `errors`, `latency`, or `none` (Continue).
    pub by: String,
    /// Canary requests judged.
    pub canary_requests: u64,
    /// Of those, failed.
    pub canary_failures: u64,
    /// Primary requests judged.
    pub primary_requests: u64,
    /// Of those, failed.
    pub primary_failures: u64,
    /// Time the evidence covers, as a Go duration.
    pub span: String,
    /// The confidence the verdict holds with.
    pub confidence: f64,
    /// The failure comparison's e-value against "not worse" (Fail at `1/(1-confidence)`; with
    /// latency compared, its share of the averaged e-value, see [`decide`]).
    pub e_fail: f64,
    /// Its e-value against "worse" (Pass at the same bar).
    pub e_pass: f64,
    /// For a latency Fail: the threshold in milliseconds, and the shares of slow requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency: Option<LatencyFinding>,
}

/// Which latency threshold failed, with its shares.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LatencyFinding {
    /// The primary's threshold, in milliseconds.
    pub threshold_ms: f64,
    /// The canary's threshold (`latencyRatio ×` the primary's), in milliseconds.
    pub canary_threshold_ms: f64,
    /// Share of canary requests slower than the canary's threshold.
    pub canary_share: f64,
    /// Share of primary requests slower than the primary's threshold.
    pub primary_share: f64,
}

impl JudgeResult {
    /// The verdict.
    pub fn verdict(&self) -> Verdict {
        match self.verdict.as_str() {
            "fail" => Verdict::Fail,
            "pass" => Verdict::Pass,
            _ => Verdict::Continue,
        }
    }

    fn rate(failures: u64, requests: u64) -> f64 {
        if requests == 0 {
            0.0
        } else {
            failures as f64 * 100.0 / requests as f64
        }
    }

    /// `sequential test, 99% confidence, 23 canary requests in 1.2s`.
    fn basis(&self) -> String {
        format!(
            "sequential test, {}% confidence, {} canary requests in {}",
            trim(self.confidence * 100.0),
            self.canary_requests,
            self.span
        )
    }

    /// What the judge found, for a rollback: `canary failure rate 48.1% vs primary 0.4%
    /// (sequential test, 99% confidence, 23 canary requests in 1.2s)`.
    pub fn finding(&self) -> String {
        match &self.latency {
            Some(l) => format!(
                "{:.1}% of canary requests slower than {} vs {:.1}% of primary requests slower than {} ({})",
                l.canary_share * 100.0,
                show_ms(l.canary_threshold_ms),
                l.primary_share * 100.0,
                show_ms(l.threshold_ms),
                self.basis()
            ),
            None => format!(
                "canary failure rate {:.1}% vs primary {:.1}% ({})",
                Self::rate(self.canary_failures, self.canary_requests),
                Self::rate(self.primary_failures, self.primary_requests),
                self.basis()
            ),
        }
    }

    /// The numbers for an Advance or Halt message: `judge pass: canary failure rate 49.8% vs
    /// primary 50.1%, not worse beyond 1.5x (sequential test, ...)`.
    pub fn summary(&self, plan: &JudgePlan) -> String {
        let claim = match self.verdict() {
            Verdict::Pass => format!("not worse beyond {}x", trim(plan.error_ratio)),
            Verdict::Fail => "worse than the primary".to_owned(),
            Verdict::Continue => "no conclusion yet".to_owned(),
        };
        format!(
            "judge {}: canary failure rate {:.1}% vs primary {:.1}%, {claim} ({})",
            self.verdict,
            Self::rate(self.canary_failures, self.canary_requests),
            Self::rate(self.primary_failures, self.primary_requests),
            self.basis()
        )
    }
}

fn show_ms(ms: f64) -> String {
    format_go_duration(Duration::from_micros((ms * 1000.0).round() as u64))
}

/// An e-value as the status keeps it: finite (JSON has no infinity), capped where it stops
/// mattering, and to five significant digits, which read back as the same number.
fn shown(e: f64) -> f64 {
    if e.is_nan() {
        return 0.0;
    }
    format!("{:.4e}", e.min(1e12)).parse().unwrap_or(0.0)
}

/// A number without trailing zeros: 99, 99.9, 1.5.
fn trim(v: f64) -> String {
    let text = format!("{v:.4}");
    text.trim_end_matches('0').trim_end_matches('.').to_owned()
}

/// The judge's verdict on `evidence` under `plan`.
///
/// Fail: without latency, when the failures' e-value reaches `1/α` (`α = 1 - confidence`).
/// With latency, the e-values are averaged into one against "the canary is no worse in
/// anything": [`ERROR_WEIGHT_WITH_LATENCY`] × the failures' plus the rest × the mean over the
/// latency thresholds. An average of test supermartingales for the same data is one, so the
/// chance that the judge ever wrongly says Fail stays within `α`. The finding names the
/// comparison that weighs most in the average.
///
/// Pass: when the failures' e-value against "worse beyond the tolerance" reaches `1/α` and
/// nothing says Fail. It claims failures only, so it needs no share of Fail's budget.
pub fn decide(plan: &JudgePlan, evidence: &Evidence) -> JudgeResult {
    let alpha = (1.0 - plan.confidence).max(f64::MIN_POSITIVE);
    let bar = 1.0 / alpha;
    let [cf, cn, pf, pn] = evidence.errors.totals();
    let e_errors = evidence.errors.e_fail();
    let mut result = JudgeResult {
        verdict: Verdict::Continue.as_str().to_owned(),
        by: "none".to_owned(),
        canary_requests: cn,
        canary_failures: cf,
        primary_requests: pn,
        primary_failures: pf,
        span: format_go_duration(evidence.span()),
        confidence: plan.confidence,
        e_fail: shown(e_errors),
        e_pass: shown(evidence.errors.e_pass()),
        latency: None,
    };
    let slowest = evidence
        .latency
        .iter()
        .zip(LATENCY_THRESHOLDS_US)
        .max_by(|(a, _), (b, _)| a.e_fail().total_cmp(&b.e_fail()));
    let (from_errors, from_latency) = match slowest {
        None => (e_errors, 0.0),
        Some(_) => {
            let mean = evidence
                .latency
                .iter()
                .map(SequentialTest::e_fail)
                .sum::<f64>()
                / evidence.latency.len() as f64;
            (
                ERROR_WEIGHT_WITH_LATENCY * e_errors,
                (1.0 - ERROR_WEIGHT_WITH_LATENCY) * mean,
            )
        }
    };
    if from_errors + from_latency >= bar {
        result.verdict = Verdict::Fail.as_str().to_owned();
        match slowest {
            Some((test, threshold)) if from_latency > from_errors => {
                let ratio = plan.latency_ratio.unwrap_or(1.0);
                let [sc, n_c, sp, n_p] = test.totals();
                result.by = "latency".to_owned();
                result.latency = Some(LatencyFinding {
                    threshold_ms: threshold as f64 / 1000.0,
                    canary_threshold_ms: threshold as f64 * ratio / 1000.0,
                    canary_share: sc as f64 / n_c.max(1) as f64,
                    primary_share: sp as f64 / n_p.max(1) as f64,
                });
            }
            _ => result.by = "errors".to_owned(),
        }
        return result;
    }
    if evidence.errors.e_pass() >= bar {
        result.verdict = Verdict::Pass.as_str().to_owned();
        result.by = "errors".to_owned();
    }
    result
}

#[cfg(test)]
mod tests;
