//! The filter benchmark (`cargo xtask bench filter`) in its `--smoke` form: one round of one second
//! per variant, so the suite notices when the benchmark itself breaks. It needs wrk: missing, the
//! test fails and says how to install it.

use std::time::Duration;

use weir_e2e::bench_filter::{self, Options, Variant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smoke_benchmark_measures_requests_and_envoy_cpu_for_every_variant() {
    let outcome = match tokio::time::timeout(
        Duration::from_secs(240),
        bench_filter::run(&Options::smoke()),
    )
    .await
    {
        Ok(Ok(outcome)) => outcome,
        Ok(Err(e)) => panic!("{e:#}"),
        Err(_) => panic!("the smoke benchmark did not finish within 240 s"),
    };
    let table = outcome.render();
    for variant in Variant::DEFAULT {
        let runs: Vec<_> = outcome.runs_of(variant).collect();
        assert_eq!(runs.len(), 1, "one run of {}:\n{table}", variant.name());
        for run in runs {
            assert!(
                run.wrk.requests > 0,
                "{} served requests:\n{table}",
                variant.name()
            );
            assert!(
                run.cpu.total > 0 && run.cpu.workers > 0,
                "{} Envoy used CPU, on its worker thread too:\n{table}",
                variant.name()
            );
            assert_eq!(
                run.wrk.non_2xx,
                0,
                "{} answered 2xx:\n{table}",
                variant.name()
            );
        }
    }
    // The Weir Envoy really splits (the directive reached it), the others send all to primary.
    for run in &outcome.runs {
        let expected = if run.variant == Variant::Weir {
            0.3..=0.7
        } else {
            0.0..=0.0
        };
        assert!(
            expected.contains(&run.canary_share),
            "{}: canary share {:.2} within {expected:?}:\n{table}",
            run.variant.name(),
            run.canary_share
        );
    }
    let bytes = outcome.report_bytes.get(&Variant::Weir);
    assert!(
        bytes.is_some_and(|b| !b.is_empty() && b.iter().all(|&n| n > 0)),
        "the Weir Envoy's reports carried per-version stats:\n{table}"
    );
    assert_eq!(outcome.verdicts().len(), 2, "{table}");
}
