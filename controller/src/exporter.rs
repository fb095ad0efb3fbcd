//! The controller's own metrics, in the Prometheus text format (`GET /metrics`), written by the
//! prometheus-client crate from the controller's state at each scrape ([`Collector`]).
//!
//! Flagger's `flagger_*` series under Weir's prefix, same labels and meanings:
//!
//! | series | type | labels | value |
//! |---|---|---|---|
//! | `weir_info` | gauge | `version`, `mesh_provider` | 1 |
//! | `weir_canary_total` | gauge | `namespace` | Canaries in the namespace |
//! | `weir_canary_status` | gauge | `name`, `namespace` | 0 running, 1 successful (or idle), 2 failed |
//! | `weir_canary_weight` | gauge | `workload`, `namespace` | percent of traffic: `<target>-primary` and `<target>` |
//! | `weir_canary_duration_seconds` | histogram | `name`, `namespace` | seconds each analysis step took |
//! | `weir_canary_metric_analysis` | gauge | `name`, `namespace`, `metric` | the last value of each metric check |
//! | `weir_canary_successes_total` | counter | `name`, `namespace`, `deployment_strategy`, `analysis_status` | promotions |
//! | `weir_canary_failures_total` | counter | `name`, `namespace`, `deployment_strategy`, `analysis_status` | rollbacks |
//!
//!
//! Beyond Flagger's, from what the filters stream (the dashboard in `manifests/dashboards/` reads
//! these):
//!
//! | series | type | labels | value |
//! |---|---|---|---|
//! | `weir_canary_phase` | gauge | `name`, `namespace`, `phase` | 1 for the current phase, 0 for the others |
//! | `weir_canary_failed_checks` | gauge | `name`, `namespace` | failed checks of this analysis (rolled back at the threshold) |
//! | `weir_canary_requests_total` | counter | `name`, `namespace`, `version` | requests the filters counted, `version` `primary` or `canary` |
//! | `weir_canary_request_failures_total` | counter | `name`, `namespace`, `version` | of those, the failed ones |
//! | `weir_canary_request_duration_seconds` | gauge | `name`, `namespace`, `version`, `quantile` | latency quantiles 0.5, 0.9, 0.99 over the first metric's window, from the exact merged histograms (what `weir status` shows) |
//!
//! As in Flagger, `name` is the target workload's name, `deployment_strategy` is `canary`,
//! `ab-testing` or `blue-green`, and `analysis_status` is `completed` (or `skipped` when
//! `skipAnalysis` promoted without analysis).

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    prometheus_text, DescriptorEncoder, EncodeGaugeValue, EncodeMetric,
};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::exemplar::Exemplar;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::filter_module::FilterModule;
use crate::spec::{CanaryPlan, CanaryStatus, Phase, Strategy, Timestamp};

/// Prometheus' default histogram buckets (client_golang's `DefBuckets`), as Flagger uses.
const DURATION_BUCKETS: [f64; 11] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

#[derive(Debug, Default, Clone)]
struct Histogram {
    buckets: [u64; DURATION_BUCKETS.len()],
    count: u64,
    sum: f64,
}

#[derive(Debug, Default)]
struct CanaryState {
    target: String,
    namespace: String,
    strategy: &'static str,
    phase: Option<Phase>,
    weight: u8,
    analysis: BTreeMap<String, f64>,
    last_step: Option<Timestamp>,
    failed_checks: u32,
    /// The window the live latency quantiles cover: the first metric's (the analysis interval
    /// without metrics), as `weir status` shows them.
    window: Duration,
}

/// The latency quantiles `weir_canary_request_duration_seconds` shows.
const QUANTILES: [f64; 3] = [0.5, 0.9, 0.99];

#[derive(Debug, Default)]
struct State {
    /// By `namespace/name` of the Canary.
    canaries: BTreeMap<String, CanaryState>,
    /// By (target, namespace).
    durations: BTreeMap<(String, String), Histogram>,
    /// By (target, namespace, strategy, analysis status).
    successes: BTreeMap<(String, String, &'static str, &'static str), u64>,
    failures: BTreeMap<(String, String, &'static str, &'static str), u64>,
}

/// Records what the controller does, for `/metrics`. Cheap to clone; clones share the numbers.
#[derive(Debug, Clone, Default)]
pub struct Recorder {
    state: Arc<Mutex<State>>,
    ingest: Arc<Mutex<Option<crate::ingest::Ingest>>>,
}

fn strategy_name(plan: &CanaryPlan) -> &'static str {
    match plan.analysis.strategy {
        Strategy::Canary { .. } => "canary",
        Strategy::AbTesting { .. } => "ab-testing",
        Strategy::BlueGreen { .. } => "blue-green",
    }
}

impl Recorder {
    /// An empty recorder.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Also renders the telemetry ingest's counters (reports applied and refused, by reason).
    pub fn include_ingest(&self, ingest: crate::ingest::Ingest) {
        *self.ingest.lock().unwrap_or_else(|p| p.into_inner()) = Some(ingest);
    }

    /// Records a Canary's status after a step. `step_took` is how long the step ran; it is
    /// observed in the duration histogram only when the engine acted (the status' step time
    /// moved), so idle polls don't dilute it.
    pub fn record(&self, plan: &CanaryPlan, status: &CanaryStatus, step_took: Duration) {
        let mut state = self.lock();
        let target = plan.target.name.clone();
        let namespace = plan.namespace.clone();
        let strategy = strategy_name(plan);
        let entry = state.canaries.entry(plan.key()).or_default();
        let previous_phase = entry.phase;
        let acted = entry.last_step != status.last_step_time && status.last_step_time.is_some();
        entry.target = target.clone();
        entry.namespace = namespace.clone();
        entry.strategy = strategy;
        entry.phase = status.phase;
        entry.weight = status.canary_weight.percent();
        entry.last_step = status.last_step_time;
        entry.failed_checks = status.failed_checks;
        entry.window = plan
            .analysis
            .metrics
            .first()
            .map_or(plan.analysis.interval, |m| m.window);
        if let Some(checks) = status.decisions.iter().rev().find(|d| !d.checks.is_empty()) {
            for check in &checks.checks {
                if let Some(v) = check.value {
                    entry.analysis.insert(check.metric.clone(), v);
                }
            }
        }
        // A finished rollout counts once, when its phase is first seen; a restarted controller
        // starts from the persisted phase without counting it again.
        let finished = previous_phase.is_some() && previous_phase != status.phase;
        let skipped = plan.skip_analysis;
        let analysis_status = if skipped { "skipped" } else { "completed" };
        let key = (target.clone(), namespace.clone(), strategy, analysis_status);
        // Both counters exist from the canary's first record, at 0: a first promotion or
        // rollback is then an increase Prometheus sees, and a dashboard shows 0, not no data.
        state.successes.entry(key.clone()).or_insert(0);
        state.failures.entry(key.clone()).or_insert(0);
        match status.phase {
            Some(Phase::Succeeded) if finished => *state.successes.entry(key).or_default() += 1,
            Some(Phase::Failed) if finished => *state.failures.entry(key).or_default() += 1,
            _ => {}
        }
        if acted {
            let h = state.durations.entry((target, namespace)).or_default();
            let secs = step_took.as_secs_f64();
            for (i, bound) in DURATION_BUCKETS.iter().enumerate() {
                if secs <= *bound {
                    h.buckets[i] += 1;
                }
            }
            h.count += 1;
            h.sum += secs;
        }
    }

    /// Forgets a deleted Canary (its counters stay, as Prometheus counters do).
    pub fn forget(&self, plan: &CanaryPlan) {
        self.forget_key(&plan.key());
    }

    /// [`Recorder::forget`] by the Canary's `namespace/name`.
    pub fn forget_key(&self, key: &str) {
        self.lock().canaries.remove(key);
    }

    /// Everything in the Prometheus text exposition format (version 0.0.4).
    pub fn render(&self) -> String {
        render_text(self.clone())
    }
}

impl Collector for Recorder {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> std::fmt::Result {
        let state = self.lock();
        let canary = |c: &CanaryState| labels([("name", &c.target), ("namespace", &c.namespace)]);
        gauges(
            &mut encoder,
            "weir_info",
            "Weir version and mesh provider information",
            [(
                labels([
                    ("version", env!("CARGO_PKG_VERSION")),
                    ("mesh_provider", "istio"),
                ]),
                1,
            )],
        )?;
        let mut per_namespace: BTreeMap<&str, i64> = BTreeMap::new();
        for c in state.canaries.values() {
            *per_namespace.entry(&c.namespace).or_default() += 1;
        }
        gauges(
            &mut encoder,
            "weir_canary_total",
            "Total number of canary object",
            per_namespace
                .into_iter()
                .map(|(namespace, n)| (labels([("namespace", namespace)]), n)),
        )?;
        gauges(
            &mut encoder,
            "weir_canary_status",
            "Last canary analysis result (0 running, 1 successful, 2 failed)",
            state.canaries.values().map(|c| {
                let value = match c.phase {
                    Some(
                        Phase::Progressing
                        | Phase::WaitingPromotion
                        | Phase::Promoting
                        | Phase::Finalising,
                    ) => 0,
                    Some(Phase::Failed) => 2,
                    _ => 1,
                };
                (canary(c), value)
            }),
        )?;
        gauges(
            &mut encoder,
            "weir_canary_phase",
            "The canary's phase: 1 for the current one, 0 for the others",
            state.canaries.values().flat_map(|c| {
                Phase::ALL.map(|phase| {
                    let mut l = canary(c);
                    l.push(("phase", phase.as_str().to_owned()));
                    (l, i64::from(c.phase == Some(phase)))
                })
            }),
        )?;
        gauges(
            &mut encoder,
            "weir_canary_failed_checks",
            "Failed checks of the current analysis (rolled back at the threshold)",
            state
                .canaries
                .values()
                .map(|c| (canary(c), i64::from(c.failed_checks))),
        )?;
        gauges(
            &mut encoder,
            "weir_canary_weight",
            "The virtual service destination weight current value",
            state.canaries.values().flat_map(|c| {
                let primary = format!("{}-primary", c.target);
                [
                    (
                        labels([("workload", &primary), ("namespace", &c.namespace)]),
                        100 - i64::from(c.weight),
                    ),
                    (
                        labels([("workload", &c.target), ("namespace", &c.namespace)]),
                        i64::from(c.weight),
                    ),
                ]
            }),
        )?;
        {
            let mut family = encoder.encode_descriptor(
                "weir_canary_duration_seconds",
                "Seconds spent performing canary analysis.",
                None,
                MetricType::Histogram,
            )?;
            for ((target, namespace), h) in &state.durations {
                // The encoder takes each bucket's own count and sums them up.
                let mut below = 0;
                let mut buckets: Vec<(f64, u64)> = DURATION_BUCKETS
                    .iter()
                    .zip(h.buckets)
                    .map(|(bound, cumulative)| {
                        let own = cumulative - below;
                        below = cumulative;
                        (*bound, own)
                    })
                    .collect();
                buckets.push((f64::INFINITY, h.count - below));
                let l = labels([("name", target), ("namespace", namespace)]);
                family.encode_family(&l)?.encode_histogram(
                    h.sum,
                    h.count,
                    &buckets,
                    None::<&HashMap<usize, Exemplar<Labels, f64>>>,
                )?;
            }
        }
        gauges(
            &mut encoder,
            "weir_canary_metric_analysis",
            "Last canary analysis result per metric",
            state.canaries.values().flat_map(|c| {
                c.analysis.iter().map(|(metric, value)| {
                    let mut l = canary(c);
                    l.push(("metric", metric.clone()));
                    (l, *value)
                })
            }),
        )?;
        for (name, help, counts) in [
            (
                "weir_canary_successes",
                "Total number of canary successes",
                &state.successes,
            ),
            (
                "weir_canary_failures",
                "Total number of canary failures",
                &state.failures,
            ),
        ] {
            counters(
                &mut encoder,
                name,
                help,
                counts
                    .iter()
                    .map(|((target, namespace, strategy, analysis), n)| {
                        (
                            labels([
                                ("name", target.as_str()),
                                ("namespace", namespace),
                                ("deployment_strategy", strategy),
                                ("analysis_status", analysis),
                            ]),
                            *n,
                        )
                    }),
            )?;
        }
        let ingest = self
            .ingest
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some(ingest) = ingest {
            encode_versions(&mut encoder, &state.canaries, &ingest)?;
            drop(state);
            ingest.counters().encode_metrics(&mut encoder)?;
        }
        Ok(())
    }
}

/// A sample's labels.
pub type Labels = Vec<(&'static str, String)>;

/// `pairs` as [`Labels`].
pub fn labels<const N: usize, V: AsRef<str>>(pairs: [(&'static str, V); N]) -> Labels {
    pairs
        .into_iter()
        .map(|(k, v)| (k, v.as_ref().to_owned()))
        .collect()
}

/// Writes a gauge family: its help, type and one sample per label set.
pub fn gauges<V: EncodeGaugeValue>(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (Labels, V)>,
) -> std::fmt::Result {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (l, value) in samples {
        ConstGauge::new(value).encode(family.encode_family(&l)?)?;
    }
    Ok(())
}

/// Writes a counter family (`name` without `_total`: the format adds it).
pub fn counters(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (Labels, u64)>,
) -> std::fmt::Result {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (l, value) in samples {
        ConstCounter::new(value).encode(family.encode_family(&l)?)?;
    }
    Ok(())
}

/// `collector`'s metrics in the Prometheus text format (version 0.0.4), as prometheus-client
/// writes it. Texts rendered this way can be served one after the other.
pub fn render_text(collector: impl Collector) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(collector));
    let mut out = String::new();
    if let Err(e) = prometheus_text::encode(&mut out, &registry) {
        // Writing into a String fails only if a collector does.
        tracing::error!(error = %e, "the metrics could not be rendered");
    }
    out
}

/// A [`Collector`] from a function, for the few series a caller writes itself.
pub struct CollectWith<F>(pub F);

impl<F> std::fmt::Debug for CollectWith<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CollectWith")
    }
}

impl<F> Collector for CollectWith<F>
where
    F: Fn(&mut DescriptorEncoder<'_>) -> std::fmt::Result + Send + Sync + 'static,
{
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> std::fmt::Result {
        (self.0)(&mut encoder)
    }
}

/// The per-version series from the streamed windows: request and failure counters, and the
/// latency quantiles of the live window.
fn encode_versions(
    encoder: &mut DescriptorEncoder<'_>,
    canaries: &BTreeMap<String, CanaryState>,
    ingest: &crate::ingest::Ingest,
) -> std::fmt::Result {
    use weir_proto::v1::Version;
    const VERSIONS: [(Version, &str); 2] =
        [(Version::Primary, "primary"), (Version::Canary, "canary")];
    let of = |c: &CanaryState, version: &str| {
        labels([
            ("name", c.target.as_str()),
            ("namespace", &c.namespace),
            ("version", version),
        ])
    };
    let totals: Vec<_> = canaries
        .iter()
        .flat_map(|(key, c)| {
            VERSIONS.map(|(version, label)| (c, label, ingest.totals(key, version)))
        })
        .filter_map(|(c, label, totals)| Some((of(c, label), totals?)))
        .collect();
    counters(
        encoder,
        "weir_canary_requests",
        "Requests the filters counted, per version",
        totals.iter().map(|(l, t)| (l.clone(), t.requests)),
    )?;
    counters(
        encoder,
        "weir_canary_request_failures",
        "Failed requests the filters counted, per version",
        totals.iter().map(|(l, t)| (l.clone(), t.failures)),
    )?;
    let now = std::time::Instant::now();
    let mut quantiles = Vec::new();
    for (key, c) in canaries {
        for (version, label) in VERSIONS {
            let Some(window) = ingest.window(key, version, c.window, now) else {
                continue;
            };
            for q in QUANTILES {
                if let Some(micros) = window.latency.quantile(q) {
                    let mut l = of(c, label);
                    l.push(("quantile", q.to_string()));
                    quantiles.push((l, micros / 1e6));
                }
            }
        }
    }
    gauges(
        encoder,
        "weir_canary_request_duration_seconds",
        "Latency quantiles per version over the first metric's window, from the exact merged histograms",
        quantiles,
    )
}

pub async fn serve(
    addr: SocketAddr,
    recorder: Recorder,
    module: Option<Arc<FilterModule>>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await.map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("cannot serve metrics on {addr}: {e}; pick a free port"),
        )
    })?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        tokio::pin!(shutdown);
        loop {
            let stream = tokio::select! {
                () = &mut shutdown => return,
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                },
            };
            let (recorder, module) = (recorder.clone(), module.clone());
            tokio::spawn(async move {
                let service = service_fn(move |request: Request<Incoming>| {
                    let (recorder, module) = (recorder.clone(), module.clone());
                    async move { Ok::<_, Infallible>(respond(&recorder, module.as_deref(), &request)) }
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(bound)
}

fn respond(
    recorder: &Recorder,
    module: Option<&FilterModule>,
    request: &Request<Incoming>,
) -> Response<Full<Bytes>> {
    let path = request.uri().path();
    let (status, content_type, body) = match path {
        "/metrics" => (
            StatusCode::OK,
            prometheus_text::CONTENT_TYPE,
            Bytes::from(recorder.render()),
        ),
        "/healthz" => (StatusCode::OK, "text/plain", Bytes::from_static(b"ok\n")),
        other => match module.and_then(|m| m.serve(other)) {
            Some(bytes) => (StatusCode::OK, "application/wasm", bytes),
            None => (
                StatusCode::NOT_FOUND,
                "text/plain",
                Bytes::from(format!("{other} not found; metrics are at /metrics\n")),
            ),
        },
    };
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    if let Ok(value) = content_type.parse() {
        response
            .headers_mut()
            .insert(hyper::header::CONTENT_TYPE, value);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::analysis::{CheckResult, Unit, Verdict};
    use crate::spec::{load_yaml, Decision, Weight};

    fn plan() -> CanaryPlan {
        load_yaml(
            "apiVersion: weir.dev/v1alpha1\nkind: Canary\nmetadata: {name: mhs, namespace: application}\nspec:\n  targetRef: {apiVersion: apps/v1, kind: Deployment, name: mhs}\n  service: {port: 80}\n  analysis:\n    stepWeight: 10\n    metrics: [{name: request-success-rate, thresholdRange: {min: 99}}]\n",
        )
        .unwrap()
        .plan
    }

    fn status(phase: Phase, weight: u8, step: u64, value: Option<f64>) -> CanaryStatus {
        let mut s = CanaryStatus {
            phase: Some(phase),
            canary_weight: Weight::try_new(i64::from(weight)).unwrap(),
            last_step_time: Some(Timestamp::from_unix_millis(step)),
            ..CanaryStatus::default()
        };
        if let Some(v) = value {
            s.record(Decision {
                time: Timestamp::from_unix_millis(step),
                phase,
                canary_weight: s.canary_weight,
                failed_checks: 0,
                iterations: 0,
                events: vec![],
                checks: vec![CheckResult {
                    metric: "request-success-rate".into(),
                    verdict: Verdict::Pass,
                    value: Some(v),
                    min: Some(99.0),
                    max: None,
                    unit: Unit::Percent,
                    window: Duration::from_secs(30),
                    sample_count: Some(100),
                    min_sample_count: 20,
                    source: "prometheus".into(),
                    reason: None,
                }],
                judge: None,
            });
        }
        s
    }

    #[test]
    fn status_weight_and_metric_values_use_flaggers_series_under_weirs_prefix() {
        let r = Recorder::new();
        let p = plan();
        r.record(
            &p,
            &status(Phase::Progressing, 30, 1, Some(99.5)),
            Duration::from_millis(20),
        );
        let text = r.render();
        for line in [
            "weir_canary_total{namespace=\"application\"} 1",
            "weir_canary_status{name=\"mhs\",namespace=\"application\"} 0",
            "weir_canary_weight{workload=\"mhs-primary\",namespace=\"application\"} 70",
            "weir_canary_weight{workload=\"mhs\",namespace=\"application\"} 30",
            "weir_canary_metric_analysis{name=\"mhs\",namespace=\"application\",metric=\"request-success-rate\"} 99.5",
            "weir_canary_duration_seconds_bucket{name=\"mhs\",namespace=\"application\",le=\"0.025\"} 1",
            "weir_canary_duration_seconds_bucket{name=\"mhs\",namespace=\"application\",le=\"0.01\"} 0",
            "weir_canary_duration_seconds_count{name=\"mhs\",namespace=\"application\"} 1",
            "# TYPE weir_canary_duration_seconds histogram",
            "weir_canary_successes_total{name=\"mhs\",namespace=\"application\",deployment_strategy=\"canary\",analysis_status=\"completed\"} 0",
            "weir_canary_failures_total{name=\"mhs\",namespace=\"application\",deployment_strategy=\"canary\",analysis_status=\"completed\"} 0",
        ] {
            assert!(text.lines().any(|l| l == line), "missing `{line}` in\n{text}");
        }
    }

    #[test]
    fn idle_polls_are_not_observed_as_analysis_durations() {
        let r = Recorder::new();
        let p = plan();
        let s = status(Phase::Progressing, 10, 1, None);
        for _ in 0..5 {
            r.record(&p, &s, Duration::from_millis(1));
        }
        assert!(r.render().contains(
            "weir_canary_duration_seconds_count{name=\"mhs\",namespace=\"application\"} 1"
        ));
    }

    #[test]
    fn a_promotion_and_a_rollback_are_each_counted_once() {
        let r = Recorder::new();
        let p = plan();
        // A restarted controller sees Succeeded first: not counted again.
        r.record(&p, &status(Phase::Succeeded, 0, 1, None), Duration::ZERO);
        r.record(&p, &status(Phase::Progressing, 10, 2, None), Duration::ZERO);
        r.record(&p, &status(Phase::Succeeded, 0, 3, None), Duration::ZERO);
        r.record(&p, &status(Phase::Succeeded, 0, 3, None), Duration::ZERO);
        r.record(&p, &status(Phase::Progressing, 10, 4, None), Duration::ZERO);
        r.record(&p, &status(Phase::Failed, 0, 5, None), Duration::ZERO);
        let text = r.render();
        assert!(text.contains("weir_canary_successes_total{name=\"mhs\",namespace=\"application\",deployment_strategy=\"canary\",analysis_status=\"completed\"} 1"), "{text}");
        assert!(text.contains("weir_canary_failures_total{name=\"mhs\",namespace=\"application\",deployment_strategy=\"canary\",analysis_status=\"completed\"} 1"), "{text}");
        assert!(
            text.contains("weir_canary_status{name=\"mhs\",namespace=\"application\"} 2"),
            "{text}"
        );
    }

    #[test]
    fn phase_failed_checks_and_the_streamed_numbers_per_version_are_rendered() {
        use crate::ingest::{Ingest, IngestConfig};
        use weir_proto::v1::{CanaryRoute, Report, Reporter, Version, VersionStats};
        use weir_proto::LatencyHistogram;

        let ingest = Ingest::try_new(IngestConfig::default()).unwrap();
        ingest
            .publish(vec![CanaryRoute {
                key: "application/mhs".into(),
                hosts: vec!["mhs.application".into()],
                canary_weight_bp: 1_000,
                ..Default::default()
            }])
            .unwrap();
        let stats = |version: Version, latencies_us: &[u64], failures: u64| {
            let mut histogram = LatencyHistogram::new();
            latencies_us.iter().for_each(|&l| histogram.record(l));
            VersionStats {
                canary: "application/mhs".into(),
                version: version as i32,
                requests: latencies_us.len() as u64,
                failures,
                latency: Some(histogram.encode()),
            }
        };
        // 100 canary requests: 98 at 10 ms, 2 at 900 ms (P99: 900 ms); 4 primary at 5 ms.
        let mut canary = vec![10_000; 98];
        canary.extend([900_000, 900_000]);
        let report = Report {
            reporter: Some(Reporter {
                node_id: "envoy-1".into(),
                namespace: "application".into(),
                workload: "gateway".into(),
            }),
            epoch: 1,
            sequence: 1,
            applied_generation: 0,
            stats: vec![
                stats(Version::Canary, &canary, 3),
                stats(Version::Primary, &[5_000; 4], 0),
            ],
        };
        ingest.ingest(&report, std::time::Instant::now()).unwrap();

        let r = Recorder::new();
        r.include_ingest(ingest);
        let mut s = status(Phase::Progressing, 10, 1, None);
        s.failed_checks = 2;
        r.record(&plan(), &s, Duration::ZERO);
        let text = r.render();
        let labels =
            |version: &str| format!("name=\"mhs\",namespace=\"application\",version=\"{version}\"");
        for line in [
            "weir_canary_phase{name=\"mhs\",namespace=\"application\",phase=\"Progressing\"} 1"
                .to_owned(),
            "weir_canary_phase{name=\"mhs\",namespace=\"application\",phase=\"Succeeded\"} 0"
                .to_owned(),
            "weir_canary_failed_checks{name=\"mhs\",namespace=\"application\"} 2".to_owned(),
            format!("weir_canary_requests_total{{{}}} 100", labels("canary")),
            format!(
                "weir_canary_request_failures_total{{{}}} 3",
                labels("canary")
            ),
            format!("weir_canary_requests_total{{{}}} 4", labels("primary")),
            format!(
                "weir_canary_request_failures_total{{{}}} 0",
                labels("primary")
            ),
            "# TYPE weir_canary_requests_total counter".to_owned(),
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing `{line}` in\n{text}"
            );
        }
        let quantile = |version: &str, q: &str| -> f64 {
            let prefix = format!(
                "weir_canary_request_duration_seconds{{{},quantile=\"{q}\"}} ",
                labels(version)
            );
            text.lines()
                .find_map(|l| l.strip_prefix(&prefix))
                .unwrap_or_else(|| panic!("no `{prefix}` in\n{text}"))
                .parse()
                .unwrap()
        };
        // The HDR histograms are exact to 1%.
        for (version, q, want) in [
            ("canary", "0.99", 0.9),
            ("canary", "0.5", 0.01),
            ("primary", "0.99", 0.005),
        ] {
            let got = quantile(version, q);
            assert!(
                (got - want).abs() <= want * 0.01,
                "{version} {q}: {got} vs {want}"
            );
        }
        assert_eq!(
            text.lines()
                .filter(|l| l.starts_with("weir_canary_phase{"))
                .count(),
            Phase::ALL.len()
        );
    }

    #[tokio::test]
    async fn the_endpoint_serves_the_text_format() {
        let r = Recorder::new();
        r.record(
            &plan(),
            &status(Phase::Succeeded, 0, 1, None),
            Duration::ZERO,
        );
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let addr = serve(SocketAddr::from(([127, 0, 0, 1], 0)), r, None, async {
            let _ = stopped.await;
        })
        .await
        .unwrap();
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut text = String::new();
        tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut text))
            .await
            .unwrap()
            .unwrap();
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        assert!(text.contains("text/plain; version=0.0.4"), "{text}");
        assert!(
            text.contains("weir_canary_status{name=\"mhs\",namespace=\"application\"} 1"),
            "{text}"
        );
        let _ = stop.send(());
    }
}
