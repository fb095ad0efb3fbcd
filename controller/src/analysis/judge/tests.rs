//! The judge's arithmetic against closed forms and long seeded simulations.

use super::*;

/// A small seeded generator (SplitMix64), so the simulations are reproducible.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn uniform(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn binomial(&mut self, n: u64, p: f64) -> u64 {
        (0..n).filter(|_| self.uniform() < p).count() as u64
    }

    /// Poisson by Knuth's product of uniforms (small means only).
    fn poisson(&mut self, mean: f64) -> u64 {
        let limit = (-mean).exp();
        let (mut k, mut product) = (0, self.uniform());
        while product > limit {
            k += 1;
            product *= self.uniform();
        }
        k
    }

    /// A standard normal draw (Box-Muller).
    fn normal(&mut self) -> f64 {
        let u = self.uniform().max(f64::MIN_POSITIVE);
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * self.uniform()).cos()
    }
}

fn plan(confidence: f64, error_ratio: f64) -> JudgePlan {
    JudgePlan {
        confidence,
        error_ratio,
        latency_ratio: None,
        require_pass: false,
    }
}

fn close(a: f64, b: f64, tolerance: f64) -> bool {
    (a - b).abs() <= tolerance * b.abs().max(1e-300)
}

#[test]
fn ln_factorial_matches_the_exact_sum_on_both_sides_of_the_stirling_switch() {
    for n in [0u64, 1, 2, 10, 63, 64, 65, 100, 1000, 123_456] {
        let exact: f64 = (2..=n).map(|i| (i as f64).ln()).sum();
        assert!(
            close(ln_factorial(n), exact, 1e-12),
            "ln {n}! = {} vs {exact}",
            ln_factorial(n)
        );
    }
}

#[test]
fn the_noncentral_hypergeometric_law_matches_its_closed_form() {
    // n_c = 3, n_p = 5, 4 events: P(k) ∝ C(3,k) C(5,4-k) θ^k for k = 0..=3.
    for theta in [0.25f64, 1.0, 2.5, 40.0] {
        let weights: Vec<f64> = (0..=3u32)
            .map(|k| {
                let c3 = [1.0, 3.0, 3.0, 1.0][k as usize];
                let c5 = [1.0, 5.0, 10.0, 10.0, 5.0][4 - k as usize];
                c3 * c5 * theta.powi(k as i32)
            })
            .collect();
        let z: f64 = weights.iter().sum();
        let law = NoncentralHypergeometric::new(3, 5, 4);
        for k in 0..=3u64 {
            let expected = weights[k as usize] / z;
            let got = law.log_pmf(k, theta.ln()).exp();
            assert!(
                close(got, expected, 1e-12),
                "θ={theta} k={k}: {got} vs {expected}"
            );
        }
        assert_eq!(law.log_pmf(4, theta.ln()), f64::NEG_INFINITY, "k > n_c");
    }
    // At θ = 1 it is the central hypergeometric: P(k=2) = C(3,2) C(5,2) / C(8,4) = 30/70.
    let law = NoncentralHypergeometric::new(3, 5, 4);
    assert!(close(law.log_pmf(2, 0.0).exp(), 30.0 / 70.0, 1e-12));
    // With more events than primary requests the lowest share is forced: 6 events, n_p = 5.
    let law = NoncentralHypergeometric::new(3, 5, 6);
    assert_eq!(law.log_pmf(0, 0.0), f64::NEG_INFINITY);
    assert!(close(law.log_pmf(1, 0.0).exp(), 3.0 / 28.0, 1e-12)); // C(3,1)C(5,5)/C(8,6)
}

#[test]
fn each_mixture_is_a_normal_law_on_the_log_odds_ratio_with_weights_summing_to_one() {
    // The weights must sum to at most 1 for the mixture to be a test martingale; the table is
    // the closed form `θ = centre·e^(k/2)`, weight `e^(-(k/2)²/(2 sd²)) / Σ_j e^(-(j/2)²/(2 sd²))`.
    for (mixture, centre, ks, sd) in [
        (Mixture::Errors, 6.0, -3..=6, 0.5),
        (Mixture::Latency, 3.0, -2..=8, 1.0),
    ] {
        assert_eq!(mixture.grid(), (centre, ks.clone(), sd));
        let weight = |k: f64| (-(k / 2.0).powi(2) / (2.0 * sd * sd)).exp();
        let alternatives = mixture.alternatives();
        let total: f64 = ks.clone().map(|k: i32| weight(f64::from(k))).sum();
        assert_eq!(alternatives.len(), ks.clone().count());
        for ((log_theta, log_weight), k) in alternatives.iter().zip(ks) {
            let k = f64::from(k);
            assert!(close(log_theta.exp(), centre * (k / 2.0).exp(), 1e-12));
            assert!(close(log_weight.exp(), weight(k) / total, 1e-12));
            assert!(*log_theta > 0.0, "every alternative is worse than the null");
        }
        let sum: f64 = alternatives.iter().map(|(_, w)| w.exp()).sum();
        assert!(close(sum, 1.0, 1e-12), "{mixture:?} weights sum to {sum}");
    }
    // Where the weight is: the errors' on odds ratios 3 to 22, the latency's on 1.8 to 8.2 (most).
    let mass = |mixture: Mixture, low: f64, high: f64| -> f64 {
        mixture
            .alternatives()
            .iter()
            .filter(|(g, _)| (low..=high).contains(&g.exp()))
            .map(|(_, w)| w.exp())
            .sum()
    };
    assert!(mass(Mixture::Errors, 2.9, 22.0) > 0.9);
    assert!(mass(Mixture::Latency, 1.8, 8.2) > 0.7);
}

#[test]
fn one_event_in_a_one_to_one_bucket_gives_the_closed_form_likelihood_ratio() {
    // One canary and one primary request, one failure, the canary's: P_θ = θ / (1 + θ).
    let tau = 1.5;
    let mut test = SequentialTest::new(1.0, tau, Mixture::Errors);
    test.absorb(1, 1, 0, 1);
    let p = |theta: f64| theta / (1.0 + theta);
    let expected_fail: f64 = Mixture::Errors
        .alternatives()
        .iter()
        .map(|(g, w)| w.exp() * p(g.exp()) / p(1.0))
        .sum();
    let expected_pass: f64 = PASS_ALTERNATIVES
        .iter()
        .map(|g| p(tau / g) / p(tau))
        .sum::<f64>()
        / PASS_ALTERNATIVES.len() as f64;
    assert!(close(test.e_fail(), expected_fail, 1e-12));
    assert!(close(test.e_pass(), expected_pass, 1e-12));
    assert_eq!(test.totals(), [1, 1, 0, 1]);
    // By hand at the centre alternative alone (θ = 8): 2 × 8/9.
    let mut centre = test.clone();
    centre.fail_alternatives = vec![(8f64.ln(), 0.0)];
    centre.log_fail = vec![0.0];
    centre.absorb(1, 1, 0, 1);
    assert!(close(centre.e_fail(), 16.0 / 9.0, 1e-12));
}

#[test]
fn two_buckets_multiply_their_likelihood_ratios_per_alternative_before_mixing() {
    // Bucket 1: 2 canary and 3 primary requests, 2 failures, both the canary's.
    // Bucket 2: 1 and 4, 1 failure, the primary's. Closed forms of Fisher's law:
    // P_θ(k=2 | 2, 3, F=2) = θ² / (3 + 6θ + θ²), P_θ(k=0 | 1, 4, F=1) = 4 / (4 + θ).
    let mut test = SequentialTest::new(1.0, 1.5, Mixture::Errors);
    test.absorb(2, 2, 0, 3);
    test.absorb(0, 1, 1, 4);
    let lr = |theta: f64| {
        let first = theta * theta / (3.0 + 6.0 * theta + theta * theta) / (1.0 / 10.0);
        let second = 4.0 / (4.0 + theta) / (4.0 / 5.0);
        first * second
    };
    let expected: f64 = Mixture::Errors
        .alternatives()
        .iter()
        .map(|(g, w)| w.exp() * lr(g.exp()))
        .sum();
    assert!(
        close(test.e_fail(), expected, 1e-12),
        "{} vs {expected}",
        test.e_fail()
    );
}

#[test]
fn buckets_without_events_or_without_one_side_carry_no_evidence() {
    let mut test = SequentialTest::new(1.0, 1.5, Mixture::Errors);
    test.absorb(0, 100, 0, 900); // no failures at all
    test.absorb(5, 10, 0, 0); // no primary traffic to compare with
    test.absorb(0, 0, 3, 50); // no canary traffic
    assert_eq!((test.e_fail(), test.e_pass()), (1.0, 1.0));
    assert_eq!(test.verdict(0.01), Verdict::Continue);
}

#[test]
fn verdicts_on_known_cases() {
    // (canary failures, canary requests, primary failures, primary requests) per bucket, repeated;
    // the verdict at 99% confidence with odds ratio tolerance 1.5.
    let cases: [(&str, [u64; 4], u64, Verdict); 6] = [
        (
            "50% canary vs 0.5% primary: fails in 20 requests",
            [5, 10, 1, 200],
            2,
            Verdict::Fail,
        ),
        (
            "same rates, many failures: passes",
            [50, 100, 450, 900],
            5,
            Verdict::Pass,
        ),
        (
            "same rates, few requests: no conclusion",
            [1, 10, 9, 90],
            1,
            Verdict::Continue,
        ),
        (
            "3x the primary's failures: fails",
            [30, 1000, 90, 9000],
            3,
            Verdict::Fail,
        ),
        (
            "primary worse than canary: passes",
            [1, 100, 40, 900],
            4,
            Verdict::Pass,
        ),
        (
            "no failures anywhere: no conclusion",
            [0, 1000, 0, 9000],
            60,
            Verdict::Continue,
        ),
    ];
    for (name, [cf, cn, pf, pn], repeat, expected) in cases {
        let mut evidence = Evidence::new(&plan(0.99, 1.5), Duration::from_secs(1));
        for index in 0..repeat {
            evidence.absorb(
                index,
                &BucketPair {
                    canary: VersionCounts {
                        requests: cn,
                        failures: cf,
                        slow: vec![],
                    },
                    primary: VersionCounts {
                        requests: pn,
                        failures: pf,
                        slow: vec![],
                    },
                },
            );
        }
        let result = decide(&plan(0.99, 1.5), &evidence);
        assert_eq!(result.verdict(), expected, "{name}: {result:?}");
        assert_eq!(result.canary_requests, cn * repeat, "{name}");
        assert_eq!(
            result.span,
            format_go_duration(Duration::from_secs(repeat)),
            "{name}"
        );
    }
}

/// Runs `runs` simulated attempts of `buckets` one-second buckets at the given failure
/// probabilities, the judge looking after every bucket, and returns the share of attempts in
/// which it ever said `wanted`.
#[allow(clippy::too_many_arguments)] // a table row: each argument is one column
fn share_ever(
    wanted: Verdict,
    (p_c, n_c): (f64, u64),
    (p_p, n_p): (f64, u64),
    tolerance: f64,
    alpha: f64,
    runs: u32,
    buckets: u32,
    seed: u64,
) -> f64 {
    let mut rng = Rng(seed);
    let mut hits = 0;
    for _ in 0..runs {
        let mut test = SequentialTest::new(1.0, tolerance, Mixture::Errors);
        for _ in 0..buckets {
            let k_c = rng.binomial(n_c, p_c);
            let k_p = rng.binomial(n_p, p_p);
            test.absorb(k_c, n_c, k_p, n_p);
            if test.verdict(alpha) == wanted {
                hits += 1;
                break;
            }
        }
    }
    f64::from(hits) / f64::from(runs)
}

/// The odds ratio of failure probabilities.
fn odds(p: f64) -> f64 {
    p / (1.0 - p)
}

#[test]
fn at_each_boundary_the_judge_looking_after_every_bucket_errs_at_most_alpha() {
    // Fail's boundary: the canary fails exactly as often as the primary (not worse), so a Fail
    // is an error. Pass's boundary: its odds are exactly 1.5 times the primary's (worse beyond
    // the tolerance), so a Pass is an error. Ville's inequality bounds each by alpha under
    // continuous monitoring; a correct test stays well below it (Ville is conservative), so
    // the check has margin.
    let tau = 1.5;
    let p_p = 0.1;
    let alpha = 0.05;
    let fail = share_ever(Verdict::Fail, (p_p, 5), (p_p, 20), tau, alpha, 1000, 200, 7);
    assert!(fail <= alpha, "Fail at its boundary in {fail} of attempts");
    let target = tau * odds(p_p);
    let p_c = target / (1.0 + target);
    let pass = share_ever(Verdict::Pass, (p_c, 5), (p_p, 20), tau, alpha, 1000, 200, 8);
    assert!(pass <= alpha, "Pass at its boundary in {pass} of attempts");
    // And the boundary is sharp: just past it on the other side, each verdict does come.
    let worse = 3.0 * odds(p_p);
    let failed = share_ever(
        Verdict::Fail,
        (worse / (1.0 + worse), 5),
        (p_p, 20),
        tau,
        alpha,
        200,
        200,
        9,
    );
    assert!(
        failed >= 0.9,
        "3x the odds failed in only {failed} of attempts"
    );
}

#[test]
fn a_healthy_canary_is_rarely_failed_and_eventually_passed_while_a_broken_one_fails_fast() {
    let alpha = 0.01;
    // Equal rates: Fail at most alpha however long it looks.
    let false_fail = share_ever(
        Verdict::Fail,
        (0.02, 2),
        (0.02, 18),
        1.5,
        alpha,
        1000,
        600,
        11,
    );
    assert!(
        false_fail <= alpha,
        "healthy canary failed in {false_fail} of attempts"
    );
    // Just inside the tolerance side (odds ratio 1): with enough failures it passes.
    let passed = share_ever(
        Verdict::Pass,
        (0.3, 10),
        (0.3, 90),
        1.5,
        alpha,
        200,
        300,
        12,
    );
    assert!(
        passed >= 0.95,
        "healthy canary passed in only {passed} of attempts"
    );
    // Just beyond: 3x the odds.
    let target = 3.0 * odds(0.05);
    let caught = share_ever(
        Verdict::Fail,
        (target / (1.0 + target), 10),
        (0.05, 90),
        1.5,
        alpha,
        200,
        300,
        13,
    );
    assert!(
        caught >= 0.95,
        "3x regression caught in only {caught} of attempts"
    );
}

#[test]
fn latency_shares_are_compared_at_fixed_thresholds_and_name_the_threshold_that_failed() {
    let judge = JudgePlan {
        latency_ratio: Some(1.2),
        ..plan(0.99, 1.5)
    };
    let mut evidence = Evidence::new(&judge, Duration::from_secs(1));
    // Every threshold but the fifth (16 ms) sees the same shares on both sides; there the
    // canary has 60% slow requests against the primary's 10%.
    let thresholds = LATENCY_THRESHOLDS_US.len();
    for index in 0..10 {
        let mut slow_c = vec![5u64; thresholds];
        let mut slow_p = vec![45u64; thresholds];
        slow_c[4] = 6;
        slow_p[4] = 9;
        evidence.absorb(
            index,
            &BucketPair {
                canary: VersionCounts {
                    requests: 10,
                    failures: 0,
                    slow: slow_c,
                },
                primary: VersionCounts {
                    requests: 90,
                    failures: 0,
                    slow: slow_p,
                },
            },
        );
    }
    let result = decide(&judge, &evidence);
    assert_eq!(result.verdict(), Verdict::Fail, "{result:?}");
    assert_eq!(result.by, "latency");
    let finding = result.latency.clone().unwrap();
    assert_eq!(finding.threshold_ms, 16.0);
    assert!(close(finding.canary_threshold_ms, 19.2, 1e-12));
    assert!(close(finding.canary_share, 0.6, 1e-12));
    assert!(close(finding.primary_share, 0.1, 1e-12));
    assert_eq!(
        result.finding(),
        "60.0% of canary requests slower than 19.2ms vs 10.0% of primary requests slower than 16ms (sequential test, 99% confidence, 100 canary requests in 10s)"
    );
    // Without latency the same buckets say nothing.
    let mut errors_only = Evidence::new(&plan(0.99, 1.5), Duration::from_secs(1));
    errors_only.absorb(0, &BucketPair::default());
    assert_eq!(
        decide(&plan(0.99, 1.5), &errors_only).verdict(),
        Verdict::Continue
    );
}

#[test]
fn the_rollback_finding_reads_like_the_issue_says() {
    let judge = plan(0.99, 1.5);
    let mut evidence = Evidence::new(&judge, Duration::from_millis(400));
    for (index, (cf, cn, pf, pn)) in (0..).zip([(4, 8, 0, 70), (5, 8, 1, 72), (4, 7, 0, 69)]) {
        evidence.absorb(
            index,
            &BucketPair {
                canary: VersionCounts {
                    requests: cn,
                    failures: cf,
                    slow: vec![],
                },
                primary: VersionCounts {
                    requests: pn,
                    failures: pf,
                    slow: vec![],
                },
            },
        );
    }
    let result = decide(&judge, &evidence);
    assert_eq!(result.verdict(), Verdict::Fail, "{result:?}");
    assert_eq!(
        result.finding(),
        "canary failure rate 56.5% vs primary 0.5% (sequential test, 99% confidence, 23 canary requests in 1.2s)"
    );
}

#[test]
fn buckets_are_pooled_until_both_versions_served_enough_requests() {
    let judge = plan(0.99, 1.5);
    let one = |canary: (u64, u64), primary: (u64, u64)| BucketPair {
        canary: VersionCounts {
            requests: canary.0,
            failures: canary.1,
            slow: vec![],
        },
        primary: VersionCounts {
            requests: primary.0,
            failures: primary.1,
            slow: vec![],
        },
    };
    let mut evidence = Evidence::new(&judge, Duration::from_secs(1));
    // A canary failure in a second without primary traffic is kept, not lost.
    evidence.absorb(0, &one((1, 1), (0, 0)));
    evidence.absorb(1, &one((2, 1), (3, 0)));
    assert_eq!(evidence.errors().totals(), [0, 0, 0, 0], "still pooling");
    evidence.absorb(2, &one((2, 0), (6, 0)));
    assert_eq!(
        evidence.errors().totals(),
        [2, 5, 0, 9],
        "weighed as one observation"
    );
    // The same as one bucket of those totals.
    let mut single = SequentialTest::new(1.0, 1.5, Mixture::Errors);
    single.absorb(2, 5, 0, 9);
    assert_eq!(evidence.errors().e_fail(), single.e_fail());
    assert_eq!(evidence.span(), Duration::from_secs(3));
}

/// The tutorial's schedule at 60 canary requests a minute: one second buckets, the canary at 10,
/// 20, 30, 40, 50% for a minute each (1 request a second, the primary the rest of the service's
/// traffic), then, for the long-run checks, `extra` more minutes at 50%. Each version's
/// requests fail with its own probability; with `latency`, each request is also timed
/// (lognormal, median 20 ms, sigma 0.5, the canary's times multiplied by `slower`) and the
/// slow counts per threshold filled in as the ingest does for `latencyRatio` 1.2. Returns
/// whether the judge ever said `wanted`, looking `looks` times a bucket (each look absorbing
/// what arrived since the last, as the runner does while a bucket fills).
struct Schedule {
    looks: u32,
    primary_failure: f64,
    canary_failure: f64,
    latency: Option<f64>,
    extra_minutes: u32,
    /// Failures judged by the likelihood ratio at this one odds ratio (the test that knows the
    /// effect) instead of the mixture.
    oracle: Option<f64>,
}

impl Schedule {
    fn ever(&self, judge: &JudgePlan, wanted: Verdict, rng: &mut Rng) -> bool {
        let mut evidence = Evidence::new(judge, Duration::from_secs(1));
        if let Some(theta) = self.oracle {
            evidence.errors.fail_alternatives = vec![(theta.ln(), 0.0)];
            evidence.errors.log_fail = vec![0.0];
        }
        let weights = [10u32, 20, 30, 40, 50]
            .into_iter()
            .chain(std::iter::repeat_n(50, self.extra_minutes as usize));
        let ratio = judge.latency_ratio.unwrap_or(1.0);
        let mut bucket = 0u64;
        for weight in weights {
            let primary_rate = f64::from(100 - weight) / f64::from(weight);
            for _ in 0..60 {
                bucket += 1;
                let mut serve = |rate: f64, failure: f64, slower: f64, canary: bool| {
                    let n = rng.poisson(rate);
                    let mut counts = VersionCounts {
                        requests: n,
                        failures: rng.binomial(n, failure),
                        slow: Vec::new(),
                    };
                    if self.latency.is_some() {
                        counts.slow = vec![0; LATENCY_THRESHOLDS_US.len()];
                        for _ in 0..n {
                            let us = 20_000.0 * (0.5 * rng.normal()).exp() * slower;
                            for (slow, t) in counts.slow.iter_mut().zip(LATENCY_THRESHOLDS_US) {
                                let t = if canary { t as f64 * ratio } else { t as f64 };
                                *slow += u64::from(us > t);
                            }
                        }
                    }
                    counts
                };
                let slower = self.latency.unwrap_or(1.0);
                let part = 1.0 / f64::from(self.looks.max(1));
                for _ in 0..self.looks.max(1) {
                    let canary = serve(part, self.canary_failure, slower, true);
                    let primary = serve(primary_rate * part, self.primary_failure, 1.0, false);
                    evidence.absorb(bucket, &BucketPair { primary, canary });
                    if decide(judge, &evidence).verdict() == wanted {
                        return true;
                    }
                }
            }
        }
        false
    }

    fn share_ever(&self, judge: &JudgePlan, wanted: Verdict, runs: u32, seed: u64) -> f64 {
        let mut rng = Rng(seed);
        let hits = (0..runs)
            .filter(|_| self.ever(judge, wanted, &mut rng))
            .count();
        hits as f64 / f64::from(runs)
    }
}

#[test]
fn under_the_null_the_judge_looking_every_second_fails_at_most_alpha_and_the_check_can_tell() {
    // The canary exactly as good as the primary, through the pooling, the weight steps and
    // the latency average, judged every second for 15 minutes: Ville's inequality bounds the
    // share of attempts ever failed by alpha. Primary and canary fail 5% (many events, so
    // much evidence moves: the martingale's swings are largest) and the canary is exactly 1.2
    // times slower (the latency nulls' boundary, latencyRatio 1.2).
    let null = Schedule {
        looks: 1,
        primary_failure: 0.05,
        canary_failure: 0.05,
        latency: Some(1.2),
        extra_minutes: 10,
        oracle: None,
    };
    let judge = JudgePlan {
        latency_ratio: Some(1.2),
        ..plan(0.9, 1.5)
    };
    let alpha = 1.0 - judge.confidence;
    let runs = 200;
    let failed = null.share_ever(&judge, Verdict::Fail, runs, 21);
    assert!(
        failed <= alpha,
        "a healthy canary failed in {failed} of attempts"
    );
    // The check can tell a bar that is too low: the same attempts judged at a quarter of
    // the bar (as if the mixture's weights summed to 4) fail more often than alpha allows.
    let lax = JudgePlan {
        confidence: 1.0 - 4.0 * alpha,
        ..judge
    };
    let lax_failed = null.share_ever(&lax, Verdict::Fail, runs, 21);
    assert!(
        lax_failed > alpha,
        "a quarter of the bar should fail more than {alpha}: {lax_failed}"
    );
}

#[test]
fn under_the_null_looking_four_times_a_bucket_while_it_fills_still_fails_at_most_alpha() {
    // The runner's looks: each absorbs what a bucket gained since the last, so one second is
    // four observations. 5% failures on both sides, 15 minutes, at 90% so that the bound is
    // resolved by 400 attempts; and the same attempts at a quarter of the bar fail too often
    // (the check can tell).
    let null = Schedule {
        looks: 4,
        primary_failure: 0.05,
        canary_failure: 0.05,
        latency: None,
        extra_minutes: 10,
        oracle: None,
    };
    let judge = plan(0.9, 1.5);
    let alpha = 1.0 - judge.confidence;
    let failed = null.share_ever(&judge, Verdict::Fail, 400, 23);
    assert!(
        failed <= alpha,
        "a healthy canary failed in {failed} of attempts"
    );
    let lax = JudgePlan {
        confidence: 1.0 - 4.0 * alpha,
        ..judge
    };
    let lax_failed = null.share_ever(&lax, Verdict::Fail, 400, 23);
    assert!(
        lax_failed > alpha,
        "a quarter of the bar should fail more than {alpha}: {lax_failed}"
    );
}

#[test]
fn a_bucket_read_while_it_fills_counts_each_request_once_and_its_second_once() {
    let judge = plan(0.99, 1.5);
    let counts = |(cf, cn): (u64, u64), (pf, pn): (u64, u64)| BucketPair {
        canary: VersionCounts {
            requests: cn,
            failures: cf,
            slow: vec![],
        },
        primary: VersionCounts {
            requests: pn,
            failures: pf,
            slow: vec![],
        },
    };
    // Bucket 0 read at three looks (5 then 9 then 12 canary requests so far), then bucket 1.
    let readings = [
        (0, counts((1, 5), (0, 50))),
        (0, counts((3, 9), (1, 90))),
        (0, counts((4, 12), (1, 120))),
        (1, counts((2, 6), (0, 60))),
    ];
    let mut evidence = Evidence::new(&judge, Duration::from_secs(1));
    let mut newest: Option<(u64, BucketPair)> = None;
    for (index, reading) in readings {
        let gained = match &newest {
            Some((i, seen)) if *i == index => reading.since(seen),
            _ => reading.clone(),
        };
        evidence.absorb(index, &gained);
        newest = Some((index, reading));
    }
    assert_eq!(evidence.errors().totals(), [6, 18, 1, 180]);
    assert_eq!(evidence.span(), Duration::from_secs(2));
    // A reading never goes below an earlier one; if it did, nothing would be taken back.
    assert_eq!(
        counts((1, 5), (0, 50)).since(&counts((3, 9), (1, 90))),
        BucketPair::default()
    );
}

#[test]
fn under_the_null_without_latency_the_full_budget_still_bounds_false_failures() {
    // Errors only, at 99%: 2000 attempts of 30 minutes each at 2% failures on both sides.
    let null = Schedule {
        looks: 1,
        primary_failure: 0.02,
        canary_failure: 0.02,
        latency: None,
        extra_minutes: 25,
        oracle: None,
    };
    let judge = plan(0.99, 1.5);
    let failed = null.share_ever(&judge, Verdict::Fail, 2000, 22);
    assert!(
        failed <= 0.01,
        "a healthy canary failed in {failed} of attempts"
    );
}

#[test]
fn a_five_point_regression_at_sixty_requests_a_minute_is_caught_within_the_schedule() {
    // The benchmark's headline cell in miniature (no ingest, no engine): +5 points beside a
    // primary failing 0.5%, the tutorial's five minutes, at 99% with latency compared too (the
    // canary as fast as the primary). The e-process that knows the true odds ratio (11.6) and
    // has the whole budget catches about 95% (docs/judge.md); the equal-weight mixture over
    // 1.25..100 with half the budget, which this replaced, caught 90.3% of these.
    let regression = Schedule {
        looks: 1,
        primary_failure: 0.005,
        canary_failure: 0.055,
        latency: Some(1.0),
        extra_minutes: 0,
        oracle: None,
    };
    let judge = JudgePlan {
        latency_ratio: Some(1.2),
        ..plan(0.99, 1.5)
    };
    let caught = regression.share_ever(&judge, Verdict::Fail, 600, 23);
    assert!(caught >= 0.92, "caught in only {caught} of rollouts");
}

/// The power of the most powerful test at level `alpha` (Neyman-Pearson, randomised) of "both
/// versions fail with probability `p0`" against "the canary fails with `p_c`, the primary with
/// `p_p`", from `n_c` canary and `n_p` primary requests. Any test valid for "the canary is no
/// worse" is valid at every such `p0`, so its power is at most the least of these.
fn neyman_pearson_power(n: (u64, u64), p0: f64, (p_c, p_p): (f64, f64), alpha: f64) -> f64 {
    let ln_pmf = |n: u64, k: u64, p: f64| {
        ln_choose(n, k) + k as f64 * p.ln() + (n - k) as f64 * (1.0 - p).ln()
    };
    let (n_c, n_p) = n;
    let slope_c = (p_c / (1.0 - p_c)).ln() - (p0 / (1.0 - p0)).ln();
    let slope_p = (p_p / (1.0 - p_p)).ln() - (p0 / (1.0 - p0)).ln();
    let mut cells = Vec::new();
    for k_c in 0..=n_c.min(80) {
        for k_p in 0..=n_p.min(130) {
            let null = (ln_pmf(n_c, k_c, p0) + ln_pmf(n_p, k_p, p0)).exp();
            let alternative = (ln_pmf(n_c, k_c, p_c) + ln_pmf(n_p, k_p, p_p)).exp();
            cells.push((
                slope_c * k_c as f64 + slope_p * k_p as f64,
                null,
                alternative,
            ));
        }
    }
    // Reject the outcomes with the largest likelihood ratio first, until alpha is spent.
    cells.sort_by(|a, b| b.0.total_cmp(&a.0));
    let (mut size, mut power) = (0.0, 0.0);
    for (_, null, alternative) in cells {
        if size + null > alpha {
            return power + alternative * (alpha - size) / null;
        }
        size += null;
        power += alternative;
    }
    power
}

#[test]
fn no_test_at_99_percent_catches_95_percent_of_five_point_regressions_beside_a_2_percent_primary() {
    // The tutorial's five minutes at 60 canary requests a minute: 300 canary requests, and
    // 60 × (9 + 4 + 7/3 + 3/2 + 1) = 1070 primary requests. Even knowing the effect and the
    // horizon in advance and looking only once, no test that rolls back a no-worse canary at
    // most 1% of the time catches +5 points beside 2% in 95% of rollouts; beside 0.5% the
    // information is there (over 99%), and what is lost is the price of looking continuously
    // (docs/judge.md, "How much five minutes can show").
    let least = |p_p: f64| {
        let p_c = p_p + 0.05;
        (1..40)
            .map(|i| p_p + (p_c - p_p) * f64::from(i) / 40.0)
            .map(|p0| neyman_pearson_power((300, 1070), p0, (p_c, p_p), 0.01))
            .fold(1.0, f64::min)
    };
    let at_two = least(0.02);
    assert!(at_two < 0.95 && at_two > 0.93, "{at_two}");
    let at_half = least(0.005);
    assert!(at_half > 0.99, "{at_half}");
}

#[test]
fn the_mixture_catches_about_as_many_as_the_test_that_knows_the_effect() {
    // +5 points, errors only at 99%, the tutorial's five minutes. The likelihood ratio at the
    // true odds ratio is the best bet for that one effect; the mixture does not know it and
    // comes close beside 0.5%. Beside 2%, even the test that knows it catches under 85%: the
    // evidence in five minutes is short of ln 100 too often (docs/judge.md).
    let judge = plan(0.99, 1.5);
    let odds_ratio = |p_c: f64, p_p: f64| odds(p_c) / odds(p_p);
    let schedule = |p_p: f64, oracle: Option<f64>| Schedule {
        looks: 1,
        primary_failure: p_p,
        canary_failure: p_p + 0.05,
        latency: None,
        extra_minutes: 0,
        oracle,
    };
    let knows =
        schedule(0.005, Some(odds_ratio(0.055, 0.005))).share_ever(&judge, Verdict::Fail, 600, 31);
    let mixture = schedule(0.005, None).share_ever(&judge, Verdict::Fail, 600, 31);
    assert!(
        mixture >= knows - 0.02,
        "mixture {mixture}, knowing the effect {knows}"
    );
    let knows_at_two =
        schedule(0.02, Some(odds_ratio(0.07, 0.02))).share_ever(&judge, Verdict::Fail, 600, 32);
    assert!(knows_at_two < 0.85, "{knows_at_two}");
}
