//! The judge benchmark (`cargo xtask bench judge`) in its `--smoke` form, so the suite notices
//! when the benchmark, or the judge's headline behaviour, breaks. It needs no binaries: the
//! rollouts are simulated through the real ingest and engine.

use weir_e2e::bench_judge::{self, Rule, Scenario};

#[test]
fn smoke_judge_benchmark_scores_flagger_and_the_judge_on_the_same_rollouts() {
    let options = bench_judge::Options::smoke();
    let outcome = match bench_judge::run(&options) {
        Ok(outcome) => outcome,
        Err(e) => panic!("{e:#}"),
    };
    let table = outcome.render();
    assert_eq!(
        outcome.cells.len(),
        options.rates.len() * options.primary_errors.len() * options.scenarios.len() * 2,
        "{table}"
    );
    for cell in &outcome.cells {
        assert_eq!(cell.rollouts.len() as u32, options.runs, "{table}");
        if cell.scenario == Scenario::HalfErrors {
            assert_eq!(
                cell.rollback_rate(),
                1.0,
                "{:?} rolls back every 50%-error canary:\n{table}",
                cell.rule
            );
        }
        if cell.rule == Rule::Judge && cell.scenario == Scenario::Healthy {
            // The bound (1%) is for many rollouts, which the full benchmark runs; four cannot
            // show it, but a judge that rolls back healthy canaries as a rule shows here.
            assert!(cell.rollback_rate() <= 0.25, "false rollbacks:\n{table}");
        }
    }
    let median = outcome
        .judge_half_errors_median_requests()
        .expect("50%-error cells ran");
    assert!(
        median <= bench_judge::HALF_ERRORS_REQUESTS_TARGET,
        "the judge rolls a 50%-error canary back within 20 requests:\n{table}"
    );
    // Flagger's rule needs five failed checks, one per interval: minutes, hundreds of requests.
    let flagger = outcome
        .cells
        .iter()
        .find(|c| c.rule == Rule::Flagger && c.scenario == Scenario::HalfErrors)
        .and_then(|c| c.median_detection())
        .expect("Flagger's rule rolled back");
    assert!(flagger.0 > 10.0 * median, "{table}");
    assert!(table.contains("target: judge false rollback"), "{table}");
}
