//! The `p99`, `ingest` and `detect` benchmarks (`cargo xtask bench <name>`) in their `--smoke`
//! forms, so the suite notices when a benchmark itself breaks. Each needs its real binaries
//! (Prometheus, the `weir` controller, Envoy): a missing one fails the test and says how to get it.

use std::time::Duration;

use weir_e2e::bench_detect::{self, MetricPath};
use weir_e2e::{bench_ingest, bench_p99};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smoke_p99_benchmark_compares_weir_and_a_real_prometheus_against_exact_p99s() {
    let outcome = match tokio::time::timeout(
        Duration::from_secs(120),
        bench_p99::run(&bench_p99::Options::smoke()),
    )
    .await
    {
        Ok(Ok(outcome)) => outcome,
        Ok(Err(e)) => panic!("{e:#}"),
        Err(_) => panic!("the p99 smoke benchmark did not finish within 120 s"),
    };
    let table = outcome.render();
    assert_eq!(
        outcome.cases.len(),
        bench_p99::distributions().len(),
        "{table}"
    );
    assert!(!outcome.sweep.is_empty(), "{table}");
    for case in outcome.cases.iter().chain(&outcome.sweep) {
        assert_eq!(case.samples, bench_p99::Options::smoke().samples, "{table}");
        assert!(
            case.exact_ms > 0.0,
            "{}: exact P99 measured\n{table}",
            case.name
        );
        assert!(
            case.weir_error().abs() <= 1.0 / 256.0 + 1e-9,
            "{}: Weir's P99 within half an HDR slot\n{table}",
            case.name
        );
        assert!(case.merge_exact, "{}: merging is exact\n{table}", case.name);
        let real = case
            .real_prometheus_ms
            .unwrap_or_else(|| panic!("{}: the real Prometheus answered\n{table}", case.name));
        assert!(
            (real - case.prometheus_ms).abs() <= 1e-9,
            "{}: the port of histogram_quantile agrees with the real one\n{table}",
            case.name
        );
    }
    // The interpolation over Istio's buckets must show an error Weir's histogram does not have.
    let worst_prometheus = outcome
        .cases
        .iter()
        .map(|c| c.prometheus_error().abs())
        .fold(0.0, f64::max);
    assert!(worst_prometheus > 0.05, "{table}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smoke_ingest_benchmark_measures_a_controller_process_under_simulated_envoys() {
    let options = bench_ingest::Options::smoke();
    let outcome =
        match tokio::time::timeout(Duration::from_secs(120), bench_ingest::run(&options)).await {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(e)) => panic!("{e:#}"),
            Err(_) => panic!("the ingest smoke benchmark did not finish within 120 s"),
        };
    let table = outcome.render();
    assert_eq!(outcome.runs.len(), options.envoys.len(), "{table}");
    for run in &outcome.runs {
        assert_eq!(run.connected, run.envoys, "every Envoy connected:\n{table}");
        // One report per Envoy per second over the window, give or take the edges.
        let expected = run.envoys as f64 * run.measured_seconds;
        assert!(
            run.reports as f64 >= expected * 0.5,
            "reports were acknowledged at about one per Envoy per second:\n{table}"
        );
        assert!(run.cpu_seconds > 0.0, "the controller used CPU:\n{table}");
        assert!(
            run.vm_hwm_kib > 0,
            "the controller's peak RSS was read:\n{table}"
        );
        assert!(
            !run.fanouts.is_empty(),
            "a directive was published:\n{table}"
        );
        for fanout in &run.fanouts {
            assert_eq!(
                fanout.received, fanout.streams,
                "every stream received the new directive:\n{table}"
            );
            assert!(
                fanout.p99_ms > 0.0 && fanout.max_ms >= fanout.p99_ms,
                "{table}"
            );
        }
        assert!(run.report_bytes > 0, "{table}");
        // The storm: the controller killed, every Envoy served again by a second one within the
        // stated bound, on the filter's jittered backoff.
        let storm = run.storm.as_ref().expect("the smoke run ends with a storm");
        assert_eq!(storm.envoys, run.envoys, "{table}");
        assert_eq!(
            storm.served_again, storm.envoys,
            "every Envoy of the killed controller was served again:\n{table}"
        );
        assert!(
            storm.max_s < bench_ingest::STORM_TARGET_SECONDS,
            "within the stated bound:\n{table}"
        );
        assert!(
            storm.vm_hwm_kib > 0
                && (storm.vm_hwm_kib as f64) < bench_ingest::MEMORY_LIMIT_MIB * 1024.0,
            "{table}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smoke_failover_moves_relays_and_envoys_to_a_new_leader_counting_every_request_once() {
    let options = bench_ingest::Options {
        envoys: vec![60],
        seconds: 2,
        warmup_seconds: 1,
        publish_every: 1,
        relays: 2,
        failover: true,
        ..bench_ingest::Options::default()
    };
    let outcome =
        match tokio::time::timeout(Duration::from_secs(120), bench_ingest::run(&options)).await {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(e)) => panic!("{e:#}"),
            Err(_) => panic!("the failover smoke benchmark did not finish within 120 s"),
        };
    let table = outcome.render();
    let run = &outcome.runs[0];
    assert_eq!(run.connected, 60, "{table}");
    let failover = run.failover.as_ref().expect("the run ends with a failover");
    assert_eq!(
        failover.served_again, failover.envoys,
        "every Envoy had the new leader's directive:\n{table}"
    );
    assert!(failover.drained, "everything was acknowledged:\n{table}");
    assert!(
        failover.counted_by_old > 0 && failover.counted_by_new > 0,
        "both leaders counted:\n{table}"
    );
    assert_eq!(
        failover.surplus(),
        0,
        "every request counted once, by one of the leaders:\n{table}"
    );
    assert!(
        outcome
            .verdicts()
            .iter()
            .any(|l| l.starts_with("PASS  failover")),
        "{table}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smoke_detect_benchmark_times_halt_and_rollback_on_both_paths() {
    let options = bench_detect::Options::smoke();
    let outcome =
        match tokio::time::timeout(Duration::from_secs(240), bench_detect::run(&options)).await {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(e)) => panic!("{e:#}"),
            Err(_) => panic!("the detect smoke benchmark did not finish within 240 s"),
        };
    let table = outcome.render();
    for path in [MetricPath::Streamed, MetricPath::Prometheus] {
        let samples = outcome.of(path);
        assert_eq!(samples.len(), 1, "one {} run:\n{table}", path.name());
        for sample in samples {
            assert!(
                sample.halt > Duration::ZERO && sample.rollback >= sample.halt,
                "{}: a Halt, then the rollback, after the fault:\n{table}",
                path.name()
            );
            assert!(
                sample
                    .halt_message
                    .contains(&format!("from {}", path.name())),
                "{}: the Halt names its source:\n{table}",
                path.name()
            );
        }
    }
}
