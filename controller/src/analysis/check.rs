//! Metric verdicts (Argo Rollouts' vocabulary) and the pure function that makes them.
//!
//! The executor only measures: for each [`MetricCheck`] the engine asks for, it reports a
//! [`Measurement`] (a value with its sample count, or the source's error). [`evaluate`] turns it
//! into a [`CheckResult`]: the verdict plus every number it used, which goes into event messages
//! and the status' decision history.

use crate::spec::{format_go_duration, serde_go, MetricCheck, MetricKind};
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// The outcome of one metric check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Verdict {
    /// The value is within the threshold range.
    Pass,
    /// The value is outside the threshold range: counts as a failed check.
    Fail,
    /// Too little data to judge (no value, or fewer requests than `minSampleCount`): halts
    /// without counting, unless `inconclusiveCountsAsFailure`.
    Inconclusive,
    /// The source could not be asked (query error, unreachable): halts without counting.
    Error,
}

/// What the executor measured for one metric over its window, ending at the step's `now`.
#[derive(Debug, Clone, PartialEq)]
pub struct Measurement {
    /// The metric's name in the plan.
    pub metric: String,
    /// Where the numbers came from, like `streamed` or `prometheus`.
    pub source: String,
    /// The window actually used.
    pub window: Duration,
    /// The value, or why the source could not give one.
    pub outcome: Result<Sample, String>,
}

/// A measured value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    /// The metric's value (success rate in percent, P99 in milliseconds, or the query's
    /// result); `None` when the window holds no data.
    pub value: Option<f64>,
    /// Requests behind the value, when the source knows it (the streamed source always does).
    pub sample_count: Option<u64>,
}

impl Measurement {
    /// A value computed from `sample_count` requests.
    pub fn value(
        metric: &str,
        source: &str,
        window: Duration,
        value: f64,
        sample_count: Option<u64>,
    ) -> Self {
        Measurement {
            metric: metric.to_string(),
            source: source.to_string(),
            window,
            outcome: Ok(Sample {
                value: Some(value),
                sample_count,
            }),
        }
    }

    /// No data in the window (`sample_count` requests, possibly 0).
    pub fn no_data(
        metric: &str,
        source: &str,
        window: Duration,
        sample_count: Option<u64>,
    ) -> Self {
        Measurement {
            metric: metric.to_string(),
            source: source.to_string(),
            window,
            outcome: Ok(Sample {
                value: None,
                sample_count,
            }),
        }
    }

    /// The source failed with `cause`.
    pub fn error(metric: &str, source: &str, window: Duration, cause: impl Into<String>) -> Self {
        Measurement {
            metric: metric.to_string(),
            source: source.to_string(),
            window,
            outcome: Err(cause.into()),
        }
    }
}

/// How a metric's value reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Unit {
    /// A percentage (`request-success-rate`).
    Percent,
    /// Milliseconds, shown as a Go duration (`request-duration`).
    Milliseconds,
    /// A plain number (custom metrics).
    #[default]
    Number,
}

/// A verdict with every number it was based on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CheckResult {
    /// The metric's name in the plan.
    pub metric: String,
    /// The verdict.
    pub verdict: Verdict,
    /// The measured value, when there was one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<f64>,
    /// The accepted minimum.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<f64>,
    /// The accepted maximum.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<f64>,
    /// How the value reads.
    #[serde(default)]
    pub unit: Unit,
    /// The window the value covers.
    #[serde(with = "serde_go")]
    pub window: Duration,
    /// Requests behind the value, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sample_count: Option<u64>,
    /// The minimum sample count that applied.
    #[serde(default)]
    pub min_sample_count: u64,
    /// Where the numbers came from.
    pub source: String,
    /// Why the verdict is Inconclusive or Error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Judges one metric. `measurement` is `None` when the executor did not report this metric,
/// which is an Error (the engine never guesses).
pub fn evaluate(
    check: &MetricCheck,
    measurement: Option<&Measurement>,
    min_sample_count: u64,
) -> CheckResult {
    let unit = match check.kind {
        MetricKind::SuccessRate => Unit::Percent,
        MetricKind::Duration => Unit::Milliseconds,
        _ => Unit::Number,
    };
    // Flagger reads a P99 into a Go duration of whole milliseconds (`int64(value)`), and its
    // bounds too (`time.Duration(*tr.Max)`): a 500.4 ms P99 passes `max: 500`. Weir judges and
    // shows durations the same way.
    let whole_ms = |v: f64| match check.kind {
        MetricKind::Duration => v.trunc(),
        _ => v,
    };
    let mut result = CheckResult {
        metric: check.name.clone(),
        verdict: Verdict::Error,
        value: None,
        min: check.range.min().map(whole_ms),
        max: check.range.max().map(whole_ms),
        unit,
        window: check.window,
        sample_count: None,
        min_sample_count,
        source: String::new(),
        reason: None,
    };
    let Some(m) = measurement else {
        result.source = "none".into();
        result.reason = Some("no measurement was reported for this metric".into());
        return result;
    };
    result.source = m.source.clone();
    result.window = m.window;
    let sample = match &m.outcome {
        Err(cause) => {
            result.reason = Some(cause.clone());
            return result;
        }
        Ok(s) => s,
    };
    result.sample_count = sample.sample_count;
    // Prometheus answers 0/0 with NaN: that is "no data", as in Flagger.
    let value = sample.value.filter(|v| v.is_finite());
    if let Some(n) = sample.sample_count {
        if n < min_sample_count {
            result.verdict = Verdict::Inconclusive;
            result.value = value;
            result.reason = Some(format!(
                "{n} requests in {} < minSampleCount {min_sample_count}",
                format_go_duration(result.window)
            ));
            return result;
        }
    }
    let Some(v) = value else {
        result.verdict = Verdict::Inconclusive;
        result.reason = Some(format!(
            "no data in {} from {}",
            format_go_duration(result.window),
            result.source
        ));
        return result;
    };
    let v = whole_ms(v);
    result.value = Some(v);
    let below = result.min.is_some_and(|min| v < min);
    let above = result.max.is_some_and(|max| v > max);
    result.verdict = if below || above {
        Verdict::Fail
    } else {
        Verdict::Pass
    };
    result
}

impl CheckResult {
    /// The value in its unit: `99.87%`, `1.2s`, `0.53`.
    fn show(&self, v: f64) -> String {
        match self.unit {
            Unit::Percent => format!("{v:.2}%"),
            Unit::Milliseconds => format_go_duration(ms(v)),
            Unit::Number => format!("{v:.2}"),
        }
    }

    /// A bound in its unit, written as Flagger writes thresholds (`99%`, `500ms`, `1.5`).
    fn show_bound(&self, b: f64) -> String {
        match self.unit {
            Unit::Percent => format!("{b}%"),
            Unit::Milliseconds => format_go_duration(ms(b)),
            Unit::Number => format!("{b}"),
        }
    }

    /// Some requests, but fewer than `minSampleCount` (none at all reads as "no values").
    fn too_few_samples(&self) -> bool {
        self.value.is_some() && self.sample_count.is_some_and(|n| n < self.min_sample_count)
    }

    /// `1523 requests in 30s from streamed`, or `in 30s from prometheus` without a count.
    pub fn basis(&self) -> String {
        let window = format_go_duration(self.window);
        match self.sample_count {
            Some(n) => format!("{n} requests in {window} from {}", self.source),
            None => format!("in {window} from {}", self.source),
        }
    }

    /// One line with the numbers: `request-success-rate 99.87% (min 99%; 1523 requests in 30s
    /// from streamed)`.
    pub fn summary(&self) -> String {
        let value = self.value.map_or("no value".to_string(), |v| self.show(v));
        let bounds = match (self.min, self.max) {
            (Some(lo), Some(hi)) => {
                format!("range {}..{}", self.show_bound(lo), self.show_bound(hi))
            }
            (Some(lo), None) => format!("min {}", self.show_bound(lo)),
            (None, Some(hi)) => format!("max {}", self.show_bound(hi)),
            (None, None) => "no bounds".to_string(),
        };
        format!("{} {value} ({bounds}; {})", self.metric, self.basis())
    }

    /// The halt message for a non-passing check, `None` for Pass: Flagger's text
    /// (`runBuiltinMetricChecks`, `runMetricChecks`) for a failed value, no values and a failed
    /// query, Weir's own for too few samples and for a check nothing measured, each followed by
    /// the numbers in parentheses (window, sample count, source). `kind` is the check's kind,
    /// which picks Flagger's wording.
    pub fn halt_message(
        &self,
        kind: &MetricKind,
        canary_id: &str,
        target_id: &str,
    ) -> Option<String> {
        let reason = self.reason.as_deref().unwrap_or("unknown");
        let name = &self.metric;
        let basis = self.basis();
        match self.verdict {
            Verdict::Pass => None,
            Verdict::Fail => {
                let v = self.value.unwrap_or(f64::NAN);
                let (op, bound) = match (self.min, self.max) {
                    (Some(lo), _) if v < lo => ("<", lo),
                    (_, Some(hi)) => (">", hi),
                    (Some(lo), None) => ("<", lo),
                    (None, None) => (">", f64::NAN),
                };
                let what = match self.unit {
                    Unit::Percent => "success rate".to_string(),
                    Unit::Milliseconds => "request duration".to_string(),
                    Unit::Number => name.clone(),
                };
                Some(format!(
                    "Halt {canary_id} advancement {what} {} {op} {} ({basis})",
                    self.show(v),
                    self.show_bound(bound),
                ))
            }
            // Weir's own: Flagger has no minimum sample count.
            Verdict::Inconclusive if self.too_few_samples() => Some(format!(
                "Halt {canary_id} advancement: {name} inconclusive, {reason} (from {})",
                self.source
            )),
            // Flagger's wording for an empty answer, whichever source gave it.
            Verdict::Inconclusive => Some(match kind {
                MetricKind::SuccessRate => format!(
                    "Halt advancement no values found for {MESH_PROVIDER} metric {name} probably {target_id} is not receiving traffic: running query failed: no values found ({basis})"
                ),
                MetricKind::Duration => format!(
                    "Halt advancement no values found for {MESH_PROVIDER} metric {name} probably {target_id} is not receiving traffic ({basis})"
                ),
                MetricKind::Query(_) => {
                    format!("Halt advancement no values found for metric: {name} ({basis})")
                }
                MetricKind::Template { .. } => format!(
                    "Halt advancement no values found for custom metric: {name}: no values found ({basis})"
                ),
            }),
            // Flagger's wording when Prometheus was asked; the cause is Weir's (it names the
            // server and the query).
            Verdict::Error if self.source == PROMETHEUS_SOURCE => Some(match kind {
                MetricKind::SuccessRate | MetricKind::Duration => {
                    format!("Prometheus query failed: {reason}")
                }
                MetricKind::Query(_) => format!("Prometheus query failed for {name}: {reason}"),
                MetricKind::Template { .. } => {
                    format!("Metric query failed for {name}: {reason}")
                }
            }),
            Verdict::Error => Some(format!(
                "Halt {canary_id} advancement: {name} could not be checked, {} error: {reason}",
                self.source
            )),
        }
    }
}

/// The mesh provider Flagger names in "no values found" messages: Weir's only one.
const MESH_PROVIDER: &str = "istio";

/// The Prometheus source's name in measurements (its `NAME`): checks it answered get Flagger's
/// query-failure wording.
pub const PROMETHEUS_SOURCE: &str = "prometheus";

fn ms(v: f64) -> Duration {
    if v.is_finite() && v > 0.0 {
        Duration::from_nanos((v * 1e6).round().min(u64::MAX as f64) as u64)
    } else {
        Duration::ZERO
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{Range, REQUEST_DURATION, REQUEST_SUCCESS_RATE};
    use std::collections::BTreeMap;

    const W: Duration = Duration::from_secs(30);

    fn success_rate(min: f64) -> MetricCheck {
        MetricCheck {
            name: REQUEST_SUCCESS_RATE.into(),
            kind: MetricKind::SuccessRate,
            range: Range::try_new(Some(min), None).unwrap(),
            window: W,
            template_variables: BTreeMap::new(),
        }
    }

    fn duration(max: f64) -> MetricCheck {
        MetricCheck {
            name: REQUEST_DURATION.into(),
            kind: MetricKind::Duration,
            range: Range::try_new(None, Some(max)).unwrap(),
            window: W,
            template_variables: BTreeMap::new(),
        }
    }

    fn custom(min: f64, max: f64) -> MetricCheck {
        MetricCheck {
            name: "error-budget".into(),
            kind: MetricKind::Query("q".into()),
            range: Range::try_new(Some(min), Some(max)).unwrap(),
            window: W,
            template_variables: BTreeMap::new(),
        }
    }

    fn measure(c: &MetricCheck, v: f64, n: u64) -> Measurement {
        Measurement::value(&c.name, "streamed", W, v, Some(n))
    }

    #[test]
    fn verdicts_follow_the_threshold_range_and_sample_count() {
        let sr = success_rate(99.0);
        let cases: Vec<(Measurement, Verdict)> = vec![
            (measure(&sr, 99.5, 100), Verdict::Pass),
            (measure(&sr, 99.0, 100), Verdict::Pass),
            (measure(&sr, 98.9, 100), Verdict::Fail),
            (measure(&sr, 50.0, 19), Verdict::Inconclusive),
            (measure(&sr, 100.0, 20), Verdict::Pass),
            (
                Measurement::no_data(&sr.name, "streamed", W, Some(0)),
                Verdict::Inconclusive,
            ),
            (
                Measurement::value(&sr.name, "prometheus", W, f64::NAN, None),
                Verdict::Inconclusive,
            ),
            (
                Measurement::value(&sr.name, "prometheus", W, 99.9, None),
                Verdict::Pass,
            ),
            (
                Measurement::error(&sr.name, "prometheus", W, "connection refused"),
                Verdict::Error,
            ),
        ];
        for (m, want) in cases {
            assert_eq!(evaluate(&sr, Some(&m), 20).verdict, want, "{m:?}");
        }
        assert_eq!(evaluate(&sr, None, 20).verdict, Verdict::Error);
        let c = custom(1.0, 2.0);
        assert_eq!(
            evaluate(&c, Some(&measure(&c, 0.5, 50)), 20).verdict,
            Verdict::Fail
        );
        assert_eq!(
            evaluate(&c, Some(&measure(&c, 2.5, 50)), 20).verdict,
            Verdict::Fail
        );
        assert_eq!(
            evaluate(&c, Some(&measure(&c, 1.5, 50)), 20).verdict,
            Verdict::Pass
        );
    }

    const ID: &str = "mhs.application";

    fn halt(c: &MetricCheck, m: &Measurement) -> String {
        evaluate(c, Some(m), 20)
            .halt_message(&c.kind, ID, ID)
            .unwrap_or_else(|| panic!("{m:?} passes"))
    }

    #[test]
    fn a_failing_success_rate_reads_like_flagger_plus_the_numbers() {
        let sr = success_rate(99.0);
        assert_eq!(
            halt(&sr, &measure(&sr, 57.142857, 1400)),
            "Halt mhs.application advancement success rate 57.14% < 99% (1400 requests in 30s from streamed)"
        );
    }

    #[test]
    fn a_slow_canary_reads_like_flagger_with_go_durations() {
        let d = duration(500.0);
        assert_eq!(
            halt(&d, &measure(&d, 1200.0, 800)),
            "Halt mhs.application advancement request duration 1.2s > 500ms (800 requests in 30s from streamed)"
        );
    }

    #[test]
    fn a_p99_is_truncated_to_whole_milliseconds_before_it_is_judged_as_flagger_does() {
        let d = duration(500.0);
        let cases = [
            (500.4, Verdict::Pass, 500.0),
            (500.99, Verdict::Pass, 500.0),
            (501.0, Verdict::Fail, 501.0),
            (0.7, Verdict::Pass, 0.0),
        ];
        for (p99, verdict, shown) in cases {
            let r = evaluate(&d, Some(&measure(&d, p99, 800)), 20);
            assert_eq!((r.verdict, r.value), (verdict, Some(shown)), "P99 {p99} ms");
        }
        // The bound is whole milliseconds too, as Flagger's `time.Duration(max)`.
        let r = evaluate(&duration(500.9), Some(&measure(&d, 500.95, 800)), 20);
        assert_eq!((r.verdict, r.max), (Verdict::Pass, Some(500.0)));
        // Only durations: a success rate keeps its fraction.
        let sr = success_rate(99.5);
        let r = evaluate(&sr, Some(&measure(&sr, 99.4, 800)), 20);
        assert_eq!((r.verdict, r.value), (Verdict::Fail, Some(99.4)));
    }

    #[test]
    fn a_custom_metric_reads_like_flagger() {
        let c = custom(1.0, 2.0);
        assert_eq!(
            halt(
                &c,
                &Measurement::value(&c.name, "prometheus", W, 2.345, None)
            ),
            "Halt mhs.application advancement error-budget 2.35 > 2 (in 30s from prometheus)"
        );
    }

    #[test]
    fn too_little_data_says_how_little() {
        let sr = success_rate(99.0);
        assert_eq!(
            halt(&sr, &measure(&sr, 100.0, 3)),
            "Halt mhs.application advancement: request-success-rate inconclusive, 3 requests in 30s < minSampleCount 20 (from streamed)"
        );
    }

    #[test]
    fn no_values_read_as_flaggers_message_for_each_kind_of_metric() {
        let template = MetricCheck {
            kind: MetricKind::Template {
                name: "error-rate".into(),
                namespace: "application".into(),
            },
            name: "error-rate".into(),
            ..custom(0.0, 1.0)
        };
        let cases = [
            (
                success_rate(99.0),
                "Halt advancement no values found for istio metric request-success-rate probably mhs.application is not receiving traffic: running query failed: no values found (in 30s from prometheus)",
            ),
            (
                duration(500.0),
                "Halt advancement no values found for istio metric request-duration probably mhs.application is not receiving traffic (in 30s from prometheus)",
            ),
            (
                custom(1.0, 2.0),
                "Halt advancement no values found for metric: error-budget (in 30s from prometheus)",
            ),
            (
                template,
                "Halt advancement no values found for custom metric: error-rate: no values found (in 30s from prometheus)",
            ),
        ];
        for (check, want) in cases {
            let m = Measurement::no_data(&check.name, "prometheus", W, None);
            assert_eq!(halt(&check, &m), want);
        }
        // A streamed window without requests says so in the numbers.
        let sr = success_rate(99.0);
        let m = Measurement::no_data(&sr.name, "streamed", W, Some(0));
        assert!(halt(&sr, &m).ends_with(
            "is not receiving traffic: running query failed: no values found (0 requests in 30s from streamed)"
        ));
    }

    #[test]
    fn a_failed_query_reads_as_flaggers_message_with_weirs_cause() {
        let cause = "Get http://prom:9090: connection refused";
        let template = MetricCheck {
            kind: MetricKind::Template {
                name: "error-rate".into(),
                namespace: "application".into(),
            },
            name: "error-rate".into(),
            ..custom(0.0, 1.0)
        };
        let cases = [
            (
                success_rate(99.0),
                format!("Prometheus query failed: {cause}"),
            ),
            (duration(500.0), format!("Prometheus query failed: {cause}")),
            (
                custom(1.0, 2.0),
                format!("Prometheus query failed for error-budget: {cause}"),
            ),
            (
                template,
                format!("Metric query failed for error-rate: {cause}"),
            ),
        ];
        for (check, want) in cases {
            let m = Measurement::error(&check.name, "prometheus", W, cause);
            assert_eq!(halt(&check, &m), want);
        }
        // A check nothing measured is Weir's own case.
        let sr = success_rate(99.0);
        assert_eq!(
            evaluate(&sr, None, 20).halt_message(&sr.kind, ID, ID).unwrap(),
            "Halt mhs.application advancement: request-success-rate could not be checked, none error: no measurement was reported for this metric"
        );
    }

    #[test]
    fn a_passing_check_summarises_its_numbers() {
        let d = duration(500.0);
        let r = evaluate(&d, Some(&measure(&d, 230.5, 1523)), 20);
        assert_eq!(r.halt_message(&d.kind, "a.b", "a.b"), None);
        assert_eq!(
            r.summary(),
            "request-duration 230ms (max 500ms; 1523 requests in 30s from streamed)"
        );
    }

    #[test]
    fn a_check_result_round_trips_through_json() {
        let sr = success_rate(99.0);
        let r = evaluate(&sr, Some(&measure(&sr, 99.5, 100)), 20);
        let json = serde_json::to_string(&r).unwrap();
        assert!(json.contains("\"window\":\"30s\""), "{json}");
        assert_eq!(serde_json::from_str::<CheckResult>(&json).unwrap(), r);
    }
}
