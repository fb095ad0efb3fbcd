//! The Grafana dashboard (`manifests/dashboards/weir-canary.json`) against a real Prometheus:
//! local mode runs a promotion and then a rollback while Prometheus scrapes the controller's
//! `/metrics`; afterwards every panel's query, with the dashboard's variables filled in as
//! Grafana fills them, is run over the rollouts' time and must be accepted and return data, and
//! the panels that show the rollouts must show them (the weight steps to 50%, the failing canary's
//! success rate drops, one promotion and one rollback).
//!
//! Grafana itself is not run: it is not in Debian's packages nor on the registries this project
//! installs from. What Grafana adds to a query (the variables, `$__rate_interval`) is done here.

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, ensure, Context};
use serde_json::Value;
use weir_controller::metrics::select::SourcePolicy;
use weir_controller::spec::Phase;
use weir_e2e::fallback::{FallbackRun, FallbackSpec, SCRAPE_INTERVAL, TUTORIAL_CANARY};

/// The bound on the test.
const TEST_TIMEOUT: Duration = Duration::from_secs(180);

/// The values Grafana would give the dashboard's variables for the tutorial's canary. Grafana's
/// `$__rate_interval` is at least four scrape intervals.
const VARIABLES: [(&str, &str); 4] = [
    ("$__rate_interval", "4s"),
    ("${datasource}", "prometheus"),
    ("$namespace", "application"),
    ("$canary", "mhs"),
];

fn dashboard() -> anyhow::Result<Value> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../manifests/dashboards/weir-canary.json"
    );
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    serde_json::from_str(&text).with_context(|| format!("{path} is not JSON"))
}

/// `text` with the dashboard's variables replaced; an error if any other `$` variable is left.
fn fill(text: &str) -> anyhow::Result<String> {
    let mut filled = text.to_owned();
    for (name, value) in VARIABLES {
        filled = filled.replace(name, value);
    }
    ensure!(
        !filled.contains('$'),
        "`{text}` uses a variable the dashboard does not define: {filled}"
    );
    Ok(filled)
}

/// Every panel with its queries (expr, legend).
fn panels(dashboard: &Value) -> anyhow::Result<Vec<(String, Vec<String>)>> {
    let list = dashboard["panels"]
        .as_array()
        .context("the dashboard has no panels")?;
    list.iter()
        .map(|p| {
            let title = p["title"].as_str().context("a panel without a title")?;
            let exprs = p["targets"]
                .as_array()
                .with_context(|| format!("panel {title} has no targets"))?
                .iter()
                .map(|t| {
                    t["expr"]
                        .as_str()
                        .map(str::to_owned)
                        .with_context(|| format!("panel {title} has a target without expr"))
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            Ok((title.to_owned(), exprs))
        })
        .collect()
}

/// The (labels, values) of every series a range query returned; NaN samples dropped.
fn series(result: &Value) -> Vec<(Value, Vec<f64>)> {
    result
        .as_array()
        .into_iter()
        .flatten()
        .map(|s| {
            let values = s["values"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|v| v[1].as_str()?.parse::<f64>().ok())
                .filter(|v| !v.is_nan())
                .collect();
            (s["metric"].clone(), values)
        })
        .collect()
}

fn now_unix() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

#[test]
fn the_dashboard_is_well_formed_and_every_query_uses_only_its_variables() {
    let dashboard = dashboard().unwrap();
    let panels = panels(&dashboard).unwrap();
    assert!(panels.len() >= 8, "{panels:?}");
    let mut ids = BTreeSet::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        let title = &panel["title"];
        assert!(
            ids.insert(panel["id"].as_u64().unwrap()),
            "duplicate id in {title}"
        );
        assert_eq!(
            panel["datasource"]["uid"], "${datasource}",
            "panel {title} must use the dashboard's Prometheus variable"
        );
        for key in ["x", "y", "w", "h"] {
            assert!(
                panel["gridPos"][key].is_u64(),
                "panel {title}: gridPos.{key}"
            );
        }
        assert!(
            panel["gridPos"]["x"].as_u64().unwrap() + panel["gridPos"]["w"].as_u64().unwrap() <= 24
        );
    }
    for (title, exprs) in &panels {
        for expr in exprs {
            fill(expr).unwrap_or_else(|e| panic!("panel {title}: {e}"));
        }
    }
    let variables: Vec<&str> = dashboard["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect();
    assert_eq!(variables, ["datasource", "namespace", "canary"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_panel_of_the_dashboard_returns_data_from_a_real_prometheus_during_a_rollout() {
    let test = async {
        let dashboard = dashboard()?;
        let spec = FallbackSpec {
            canary: TUTORIAL_CANARY.to_owned(),
            files: Vec::new(),
            source: SourcePolicy::Streamed,
            version: "1.1.1".to_owned(),
        };
        let mut run = FallbackRun::start("dashboard", &spec).await?;
        let start = now_unix();
        run.start_load(100);
        run.step_until_phase(Phase::Initialized, Duration::from_secs(20))
            .await?;
        run.set_version("1.1.2", &[])?;
        run.step_until_phase(Phase::Succeeded, Duration::from_secs(60))
            .await?;
        // Half the new version's requests fail on their own: rolled back.
        run.set_version("1.1.3", &["--error-rate", "0.5"])?;
        run.step_until_phase(Phase::Failed, Duration::from_secs(60))
            .await?;
        // Two more scrapes, so the rollback is in Prometheus.
        tokio::time::sleep(SCRAPE_INTERVAL * 3).await;
        let end = now_unix();

        let mut by_title = std::collections::BTreeMap::new();
        for (title, exprs) in panels(&dashboard)? {
            for expr in exprs {
                let filled = fill(&expr)?;
                let result = run
                    .prometheus()
                    .query_range(&filled, start, end, SCRAPE_INTERVAL)
                    .await
                    .with_context(|| format!("panel {title}"))?;
                let found = series(&result);
                ensure!(
                    found.iter().any(|(_, values)| !values.is_empty()),
                    "panel {title}: `{filled}` returned no data over the rollouts\n{}",
                    run.describe()
                );
                by_title
                    .entry(title.clone())
                    .or_insert_with(Vec::new)
                    .extend(found);
            }
        }
        // The variables' own queries find the canary.
        for variable in dashboard["templating"]["list"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let Some(query) = variable["query"]["query"].as_str() else {
                continue;
            };
            let inner = query
                .strip_prefix("label_values(")
                .and_then(|q| q.strip_suffix(')'))
                .with_context(|| format!("variable query `{query}` is not label_values(...)"))?;
            let (selector, label) = inner
                .rsplit_once(", ")
                .with_context(|| format!("`{query}` names no label"))?;
            let found = run.prometheus().series(&fill(selector)?).await?;
            let values: BTreeSet<&str> = found
                .iter()
                .filter_map(|(labels, _)| labels[label].as_str())
                .collect();
            let wanted = if label == "namespace" {
                "application"
            } else {
                "mhs"
            };
            ensure!(values.contains(wanted), "`{query}` gave {values:?}");
        }

        let panel = |title: &str| -> anyhow::Result<&Vec<(Value, Vec<f64>)>> {
            by_title
                .get(title)
                .with_context(|| format!("no panel {title}"))
        };
        let of = |title: &str, label: &str, value: &str| -> anyhow::Result<Vec<f64>> {
            Ok(panel(title)?
                .iter()
                .filter(|(labels, _)| labels[label] == value)
                .flat_map(|(_, v)| v.iter().copied())
                .collect())
        };
        let max = |v: &[f64]| v.iter().copied().fold(f64::NAN, f64::max);
        let min = |v: &[f64]| v.iter().copied().fold(f64::NAN, f64::min);
        let weights = of("Canary weight", "workload", "mhs")?;
        ensure!(
            max(&weights) == 50.0,
            "the canary's weight went to {weights:?}"
        );
        ensure!(weights.last() == Some(&0.0), "{weights:?}");
        let phases: BTreeSet<String> = panel("Phase")?
            .iter()
            .filter_map(|(labels, _)| labels["phase"].as_str().map(str::to_owned))
            .collect();
        for phase in ["Progressing", "Succeeded", "Failed"] {
            ensure!(phases.contains(phase), "phases shown: {phases:?}");
        }
        let canary_success = of("Success rate per version", "version", "canary")?;
        let primary_success = of("Success rate per version", "version", "primary")?;
        ensure!(
            min(&canary_success) < 80.0,
            "the failing canary's success rate: {canary_success:?}"
        );
        ensure!(
            min(&primary_success) > 99.0,
            "the primary never failed: {primary_success:?}"
        );
        for version in ["primary", "canary"] {
            let p99 = of("P99 latency per version", "version", version)?;
            ensure!(
                p99.iter().all(|s| *s > 0.0 && *s < 1.0),
                "{version} latency in seconds: {p99:?}"
            );
        }
        for (title, want) in [("Promotions", 1.0), ("Rollbacks", 1.0)] {
            let values: Vec<f64> = panel(title)?.iter().flat_map(|(_, v)| v.clone()).collect();
            if values.last() != Some(&want) {
                bail!("{title} ends at {:?}, not {want}", values.last());
            }
        }
        run.shutdown().await;
        anyhow::Ok(())
    };
    match tokio::time::timeout(TEST_TIMEOUT, test).await {
        Ok(result) => result.unwrap_or_else(|e| panic!("{e:#}")),
        Err(_) => panic!("the test did not finish within {TEST_TIMEOUT:?}"),
    }
}
