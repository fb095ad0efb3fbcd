//! Prometheus as the metric source, end to end: a real Prometheus scrapes a real Envoy with the
//! Weir filter (its `/stats/prometheus`), the `mirror` app's Istio series (`--istio-metrics`) and
//! the controller's own `/metrics`; local mode analyses with it.
//!
//! Each test bounds itself; Prometheus, Envoy and the app processes are killed at the end (and on
//! a failure, by their Drop guards).

use std::time::Duration;

use weir_controller::metrics::select::SourcePolicy;
use weir_controller::spec::Phase;
use weir_e2e::fallback::{FallbackRun, FallbackSpec, TUTORIAL_CANARY};

/// The bound on one test.
const TEST_TIMEOUT: Duration = Duration::from_secs(90);

fn tutorial(version: &str) -> FallbackSpec {
    FallbackSpec {
        canary: TUTORIAL_CANARY.to_owned(),
        files: Vec::new(),
        source: SourcePolicy::Prometheus,
        version: version.to_owned(),
    }
}

async fn bounded<F: std::future::Future<Output = anyhow::Result<()>>>(test: F) {
    match tokio::time::timeout(TEST_TIMEOUT, test).await {
        Ok(result) => result.unwrap_or_else(|e| panic!("{e:#}")),
        Err(_) => panic!("the test did not finish within {TEST_TIMEOUT:?}"),
    }
}

/// Whether `message` names a Prometheus window of the tests' analysis: 4s right after a weight
/// change (only what that weight served, one interval), up to the metrics' 8s while it holds.
fn names_a_prometheus_window(message: &str) -> bool {
    message.split(" from prometheus").any(|before| {
        before
            .rsplit(' ')
            .next()
            .and_then(|window| window.strip_suffix('s'))
            .and_then(|seconds| seconds.parse::<f64>().ok())
            .is_some_and(|seconds| (4.0..=8.0).contains(&seconds))
    })
}

/// Every check result in the decision history came from `source`.
fn all_checks_from(run: &FallbackRun, source: &str) -> anyhow::Result<usize> {
    let status = run.status();
    let checks: Vec<_> = status.decisions.iter().flat_map(|d| &d.checks).collect();
    for c in &checks {
        anyhow::ensure!(
            c.source == source,
            "check {} came from {}, not {source}\n{}",
            c.metric,
            c.source,
            run.describe()
        );
    }
    Ok(checks.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tutorial_rollout_is_promoted_on_prometheus_data_alone() {
    bounded(async {
        let mut run = FallbackRun::start("prom-rollout", &tutorial("1.1.1")).await?;
        run.start_load(100);
        run.step_until_phase(Phase::Initialized, Duration::from_secs(20))
            .await?;
        assert_eq!(run.primary_version().await?, "1.1.1");

        run.set_version("1.1.2", &[])?;
        run.step_until_phase(Phase::Succeeded, Duration::from_secs(60))
            .await?;
        assert_eq!(run.primary_version().await?, "1.1.2");
        let advances = run.messages_with("Advance mhs.application canary weight");
        assert_eq!(advances.len(), 5, "{}", run.describe());
        assert!(
            advances
                .iter()
                .skip(1)
                .all(|m| m.contains(" requests in ") && names_a_prometheus_window(m)),
            "advances should name Prometheus and the sample count: {advances:#?}"
        );
        let checks = all_checks_from(&run, "prometheus")?;
        assert!(checks >= 8, "only {checks} checks ran\n{}", run.describe());

        // The filter's own stats reach Prometheus through Envoy's /stats/prometheus, tagged.
        let weir = run
            .prometheus()
            .wait_for(
                r#"weir_requests_total{canary="application/mhs",version="canary"}"#,
                Duration::from_secs(10),
                |v| v > 0.0,
            )
            .await?;
        assert_eq!(weir.len(), 1, "{weir:?}");
        // The controller's own metrics: promoted (status 1), all traffic on the primary.
        run.prometheus()
            .wait_for(
                r#"weir_canary_status{name="mhs",namespace="application"}"#,
                Duration::from_secs(10),
                |v| v == 1.0,
            )
            .await?;
        run.prometheus()
            .wait_for(
                r#"weir_canary_weight{workload="mhs-primary",namespace="application"}"#,
                Duration::from_secs(10),
                |v| v == 100.0,
            )
            .await?;
        run.prometheus()
            .wait_for(
                r#"weir_canary_successes_total{name="mhs",namespace="application"}"#,
                Duration::from_secs(10),
                |v| v == 1.0,
            )
            .await?;
        run.shutdown().await;
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tutorial_rollback_halts_five_times_on_prometheus_success_rate_and_rolls_back() {
    bounded(async {
        let mut run = FallbackRun::start("prom-rollback", &tutorial("1.1.1")).await?;
        run.start_load(100);
        run.step_until_phase(Phase::Initialized, Duration::from_secs(20))
            .await?;

        // Half the traffic asks for a 500, as in the demo's experiment 2.
        run.set_errors(true);
        run.set_version("1.1.3", &[])?;
        run.step_until_phase(Phase::Failed, Duration::from_secs(60))
            .await?;
        run.set_errors(false);
        assert_eq!(run.primary_version().await?, "1.1.1");
        let halts = run.messages_with("Halt mhs.application advancement success rate");
        assert_eq!(halts.len(), 5, "{}", run.describe());
        assert!(
            halts
                .iter()
                .all(|m| m.contains("< 99%") && m.contains("from prometheus")),
            "{halts:#?}"
        );
        assert_eq!(
            run.messages_with("Rolling back mhs.application failed checks threshold reached 5")
                .len(),
            1,
            "{}",
            run.describe()
        );
        all_checks_from(&run, "prometheus")?;
        run.prometheus()
            .wait_for(
                r#"weir_canary_status{name="mhs",namespace="application"}"#,
                Duration::from_secs(10),
                |v| v == 2.0,
            )
            .await?;
        run.shutdown().await;
        Ok(())
    })
    .await;
}

/// A Canary gated by one MetricTemplate, `templates`' `error-percentage`.
const TEMPLATE_CANARY: &str = r#"apiVersion: weir.dev/v1alpha1
kind: Canary
metadata:
  name: mhs
  namespace: application
spec:
  targetRef:
    apiVersion: apps/v1
    kind: Deployment
    name: mhs
  service:
    port: 80
  analysis:
    interval: 4s
    threshold: 2
    maxWeight: 50
    stepWeight: 25
    metrics:
    - name: error-percentage
      templateRef:
        name: weir-error-percentage
      templateVariables:
        version: canary
      thresholdRange:
        max: 1
      interval: 8s
"#;

/// Custom PromQL over the Weir filter's own stats, as Envoy exports them (tagged with the
/// canary and the version).
const ERROR_PERCENTAGE_TEMPLATE: &str = r#"apiVersion: weir.dev/v1alpha1
kind: MetricTemplate
metadata:
  name: weir-error-percentage
  namespace: application
spec:
  provider:
    type: prometheus
  query: |
    100 * sum(rate(weir_request_failures_total{canary="{{ namespace }}/{{ name }}",version="{{ variables.version }}"}[{{ interval }}]))
      / sum(rate(weir_requests_total{canary="{{ namespace }}/{{ name }}",version="{{ variables.version }}"}[{{ interval }}]))
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_metric_template_with_custom_promql_promotes_a_healthy_version_and_rolls_back_a_failing_one(
) {
    bounded(async {
        let spec = FallbackSpec {
            canary: TEMPLATE_CANARY.to_owned(),
            files: vec![(
                "error-percentage.yaml".to_owned(),
                ERROR_PERCENTAGE_TEMPLATE.to_owned(),
            )],
            source: SourcePolicy::Auto,
            version: "2.0.0".to_owned(),
        };
        let mut run = FallbackRun::start("prom-template", &spec).await?;
        run.start_load(100);
        run.step_until_phase(Phase::Initialized, Duration::from_secs(20))
            .await?;

        run.set_version("2.0.1", &[])?;
        run.step_until_phase(Phase::Succeeded, Duration::from_secs(40))
            .await?;
        assert_eq!(run.primary_version().await?, "2.0.1");
        let passed = run.messages_with("error-percentage 0.00 (max 1; in ");
        assert!(
            !passed.is_empty() && passed.iter().all(|m| names_a_prometheus_window(m)),
            "{}",
            run.describe()
        );

        // Half of this version's answers are 500s: the template's value is about 50.
        run.set_version("2.0.2", &["--error-rate", "0.5"])?;
        run.step_until_phase(Phase::Failed, Duration::from_secs(40))
            .await?;
        assert_eq!(run.primary_version().await?, "2.0.1");
        let halts = run.messages_with("Halt mhs.application advancement error-percentage");
        assert_eq!(halts.len(), 2, "{}", run.describe());
        for halt in &halts {
            let value: f64 = halt
                .split_whitespace()
                .nth(4)
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("no value in {halt}"));
            assert!(
                (30.0..=70.0).contains(&value)
                    && halt.contains("> 1 (in ")
                    && names_a_prometheus_window(halt),
                "{halt}"
            );
        }
        run.shutdown().await;
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_down_mid_analysis_halts_with_an_error_without_rolling_back_and_analysis_resumes(
) {
    bounded(async {
        let canary = TUTORIAL_CANARY
            .replace("threshold: 5", "threshold: 2")
            .replace("stepWeight: 10", "stepWeight: 25");
        let spec = FallbackSpec {
            canary,
            ..tutorial("3.0.0")
        };
        let mut run = FallbackRun::start("prom-outage", &spec).await?;
        run.start_load(100);
        run.step_until_phase(Phase::Initialized, Duration::from_secs(20))
            .await?;
        run.set_version("3.0.1", &[])?;
        run.step_until("the canary weight is 25", Duration::from_secs(25), |s, _| {
            s.canary_weight.percent() == 25
        })
        .await?;

        let port = run.prometheus().port();
        run.prometheus().stop();
        let error = format!("Prometheus query failed: Istio query for request-success-rate: cannot reach Prometheus at http://127.0.0.1:{port}");
        run.step_until(
            "two analysis steps failed to reach Prometheus",
            Duration::from_secs(30),
            |_, events| {
                events
                    .iter()
                    .filter(|e| e.event.message.contains(&error))
                    .count()
                    >= 2
            },
        )
        .await?;
        let status = run.status();
        assert_eq!(
            (status.phase, status.canary_weight.percent(), status.failed_checks),
            (Some(Phase::Progressing), 25, 0),
            "an outage must halt, not count\n{}",
            run.describe()
        );

        tokio::task::block_in_place(|| run.prometheus().start_again())?;
        run.step_until_phase(Phase::Succeeded, Duration::from_secs(40))
            .await?;
        assert!(
            run.messages_with("Rolling back").is_empty(),
            "{}",
            run.describe()
        );
        assert!(
            run.status().decisions.iter().all(|d| d.failed_checks == 0),
            "no step may count the outage as a failed check\n{}",
            run.describe()
        );
        assert_eq!(run.primary_version().await?, "3.0.1");
        run.shutdown().await;
        Ok(())
    })
    .await;
}

const BAD_PROMQL_TEMPLATE: &str = r#"apiVersion: weir.dev/v1alpha1
kind: MetricTemplate
metadata:
  name: bad-promql
spec:
  provider:
    type: prometheus
  query: sum(rate(weir_requests_total{canary="{{ namespace }}/{{ name }}"}[{{ interval }}])
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_promql_halts_with_prometheus_error_naming_the_template() {
    bounded(async {
        let canary = TEMPLATE_CANARY
            .replace("name: weir-error-percentage", "name: bad-promql")
            .replace("stepWeight: 25", "stepWeight: 50");
        let spec = FallbackSpec {
            canary,
            files: vec![("bad.yaml".to_owned(), BAD_PROMQL_TEMPLATE.to_owned())],
            source: SourcePolicy::Auto,
            version: "4.0.0".to_owned(),
        };
        let mut run = FallbackRun::start("prom-bad-promql", &spec).await?;
        run.start_load(50);
        run.step_until_phase(Phase::Initialized, Duration::from_secs(20))
            .await?;
        run.set_version("4.0.1", &[])?;
        let needle = "Metric query failed for error-percentage: MetricTemplate application/bad-promql: Prometheus at";
        run.step_until("two halts name the template", Duration::from_secs(40), |_, events| {
            events.iter().filter(|e| e.event.message.contains(needle)).count() >= 2
        })
        .await?;
        let halt = &run.messages_with(needle)[0];
        assert!(
            halt.contains("rejected the query (bad_data)") && halt.contains("parse error"),
            "{halt}"
        );
        let status = run.status();
        assert_eq!(
            (status.phase, status.failed_checks),
            (Some(Phase::Progressing), 0),
            "a query error halts without counting\n{}",
            run.describe()
        );
        run.shutdown().await;
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn templates_that_cannot_run_are_refused_at_start_naming_the_template() {
    use weir_controller::local::{LocalMetricsOptions, LocalMode, LocalOptions};
    let cases = [
        (
            TEMPLATE_CANARY.replace("version: canary", "flavour: canary"),
            ERROR_PERCENTAGE_TEMPLATE.to_owned(),
            "MetricTemplate application/weir-error-percentage: the query uses {{ variables.version }} but the metric's templateVariables do not define `version`",
        ),
        (
            TEMPLATE_CANARY.to_owned(),
            ERROR_PERCENTAGE_TEMPLATE.replace("type: prometheus", "type: datadog"),
            "MetricTemplate application/weir-error-percentage is invalid: spec.provider.type: unknown provider `datadog`; Weir supports `prometheus`",
        ),
        (
            TEMPLATE_CANARY.to_owned(),
            ERROR_PERCENTAGE_TEMPLATE.replace("{{ interval }}", "{{ interval | quote }}"),
            "MetricTemplate application/weir-error-percentage is invalid: spec.query: `{{ interval | quote }}` is not supported",
        ),
        (
            TEMPLATE_CANARY.replace("name: weir-error-percentage", "name: missing"),
            ERROR_PERCENTAGE_TEMPLATE.to_owned(),
            "MetricTemplate application/missing not found",
        ),
    ];
    for (i, (canary, template, expected)) in cases.into_iter().enumerate() {
        let dir = weir_e2e::WorkDir::new(&format!("prom-refused-{i}")).unwrap();
        std::fs::write(dir.path().join("canary.yaml"), canary).unwrap();
        std::fs::write(dir.path().join("template.yaml"), template).unwrap();
        let options = LocalOptions {
            canary: dir.path().join("canary.yaml"),
            workloads: dir.path().join("workloads"),
            state: dir.path().join("state"),
            listen_port: 0,
            envoy: weir_e2e::binaries::envoy(),
            wasm: weir_e2e::binaries::wasm(),
            report_interval: Duration::from_millis(250),
            time_scale: 1,
            echo_events: false,
            filter_install: weir_controller::filter_module::InstallKind::default(),
            envoy_concurrency: 2,
            telemetry_tls: None,
            telemetry_port: 0,
            filters_report_to: None,
        };
        let result = tokio::time::timeout(
            Duration::from_secs(10),
            LocalMode::start_with(&options, &LocalMetricsOptions::default()),
        )
        .await
        .expect("start_with returned within 10s");
        let err = match result {
            Ok(mode) => {
                mode.shutdown().await;
                panic!("case {i}: local mode started despite: {expected}");
            }
            Err(e) => e.to_string(),
        };
        assert!(
            err.contains(expected),
            "case {i}: `{err}` lacks `{expected}`"
        );
    }
}
