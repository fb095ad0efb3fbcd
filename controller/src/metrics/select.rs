//! Which source measures a check. Decided per check at every analysis step, and named in the
//! check's result (`… from streamed`, `… from prometheus`):
//!
//! - MetricTemplates and inline queries are PromQL: always Prometheus.
//! - `request-success-rate` and `request-duration` come from the filters' reports (streamed)
//!   when filters report for the canary (a report within the freshness window), and from
//!   Flagger's Istio queries on Prometheus when they don't and a Prometheus address is
//!   configured. Without either, streamed answers "no values" (Inconclusive).
//! - A [`SourcePolicy`] can pin the built-in checks to one source (`--metric-source`).

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, Instant};

use super::prometheus::PrometheusSource;
use super::streamed::StreamedSource;
use super::MetricSource;
use crate::analysis::Measurement;
use crate::ingest::Ingest;
use crate::spec::{CanaryPlan, MetricCheck, MetricKind};

/// How recent a filter report must be for the canary to count as covered by filters, unless
/// set otherwise ([`SelectingSource::with_freshness`]).
pub const DEFAULT_FRESHNESS: Duration = Duration::from_secs(10);

/// Which source the built-in checks use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SourcePolicy {
    /// Streamed when filters report for the canary, else Prometheus when configured.
    #[default]
    Auto,
    /// Always the filters' reports (Prometheus only for templates and queries).
    Streamed,
    /// Always Prometheus (streaming disabled for analysis).
    Prometheus,
}

impl SourcePolicy {
    /// The policy's name on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            SourcePolicy::Auto => "auto",
            SourcePolicy::Streamed => "streamed",
            SourcePolicy::Prometheus => "prometheus",
        }
    }
}

impl fmt::Display for SourcePolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SourcePolicy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(SourcePolicy::Auto),
            "streamed" => Ok(SourcePolicy::Streamed),
            "prometheus" => Ok(SourcePolicy::Prometheus),
            other => Err(format!(
                "unknown metric source `{other}`; use auto, streamed or prometheus"
            )),
        }
    }
}

/// The source chosen for one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Choice {
    /// The filters' merged reports.
    Streamed,
    /// A PromQL query.
    Prometheus,
}

/// Chooses the source for a check of `kind`: `filters_report` says whether filters reported
/// for the canary recently, `prometheus_configured` whether built-in checks have a Prometheus
/// address.
pub fn choose(
    kind: &MetricKind,
    policy: SourcePolicy,
    filters_report: bool,
    prometheus_configured: bool,
) -> Choice {
    match (kind, policy) {
        (MetricKind::Template { .. } | MetricKind::Query(_), _) => Choice::Prometheus,
        (_, SourcePolicy::Streamed) => Choice::Streamed,
        (_, SourcePolicy::Prometheus) => Choice::Prometheus,
        (_, SourcePolicy::Auto) if filters_report || !prometheus_configured => Choice::Streamed,
        (_, SourcePolicy::Auto) => Choice::Prometheus,
    }
}

/// A source that picks, per check, between the streamed and the Prometheus source.
#[derive(Clone)]
pub struct SelectingSource {
    streamed: StreamedSource,
    prometheus: PrometheusSource,
    ingest: Ingest,
    policy: SourcePolicy,
    freshness: Duration,
}

impl SelectingSource {
    /// Chooses between `ingest`'s streamed data and `prometheus` under `policy`.
    pub fn new(ingest: Ingest, prometheus: PrometheusSource, policy: SourcePolicy) -> Self {
        Self {
            streamed: StreamedSource::new(ingest.clone()),
            prometheus,
            ingest,
            policy,
            freshness: DEFAULT_FRESHNESS,
        }
    }

    /// Sets how recent a report must be for filters to count as reporting (a few report
    /// intervals: one late report must not switch sources).
    pub fn with_freshness(mut self, freshness: Duration) -> Self {
        self.freshness = freshness;
        self
    }

    /// The policy in force.
    pub fn policy(&self) -> SourcePolicy {
        self.policy
    }

    /// The source `check` would use now.
    pub fn choice(&self, canary: &CanaryPlan, check: &MetricCheck, now: Instant) -> Choice {
        let filters_report = self
            .ingest
            .last_report(&canary.key())
            .is_some_and(|last| now.saturating_duration_since(last) <= self.freshness);
        choose(
            &check.kind,
            self.policy,
            filters_report,
            self.prometheus.serves(canary),
        )
    }
}

/// The name of a selecting source; each measurement names the source that made it.
pub const NAME: &str = "selected";

impl MetricSource for SelectingSource {
    fn name(&self) -> &'static str {
        NAME
    }

    async fn measure(&self, canary: &CanaryPlan, check: &MetricCheck, now: Instant) -> Measurement {
        match self.choice(canary, check, now) {
            Choice::Streamed => self.streamed.measure(canary, check, now).await,
            Choice::Prometheus => self.prometheus.measure(canary, check, now).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::prometheus::{PrometheusAddress, PrometheusConfig};
    use crate::metrics::template::Templates;

    const SR: MetricKind = MetricKind::SuccessRate;

    #[test]
    fn the_choice_follows_kind_policy_reports_and_configuration() {
        let template = MetricKind::Template {
            name: "t".into(),
            namespace: "n".into(),
        };
        let query = MetricKind::Query("up".into());
        use Choice::{Prometheus as P, Streamed as S};
        use SourcePolicy::{Auto, Prometheus, Streamed};
        let cases: Vec<(&MetricKind, SourcePolicy, bool, bool, Choice)> = vec![
            // Built-ins under auto: reports win; without them, Prometheus if configured.
            (&SR, Auto, true, true, S),
            (&SR, Auto, true, false, S),
            (&SR, Auto, false, true, P),
            (&SR, Auto, false, false, S),
            (&MetricKind::Duration, Auto, false, true, P),
            // Pinned policies.
            (&SR, Streamed, false, true, S),
            (&SR, Prometheus, true, true, P),
            (&SR, Prometheus, true, false, P),
            // PromQL always goes to Prometheus.
            (&template, Auto, true, true, P),
            (&template, Streamed, true, false, P),
            (&query, Auto, true, true, P),
        ];
        for (kind, policy, reports, configured, want) in cases {
            assert_eq!(
                choose(kind, policy, reports, configured),
                want,
                "{kind:?} {policy} reports={reports} configured={configured}"
            );
        }
    }

    #[test]
    fn policies_parse_from_their_names() {
        for p in [
            SourcePolicy::Auto,
            SourcePolicy::Streamed,
            SourcePolicy::Prometheus,
        ] {
            assert_eq!(p.as_str().parse::<SourcePolicy>(), Ok(p));
        }
        assert!("istio"
            .parse::<SourcePolicy>()
            .unwrap_err()
            .contains("auto, streamed or prometheus"));
    }

    #[test]
    fn a_canary_without_reports_falls_back_to_a_configured_prometheus() {
        let plan = crate::spec::load_yaml(
            "apiVersion: weir.dev/v1alpha1\nkind: Canary\nmetadata: {name: mhs, namespace: app}\nspec:\n  targetRef: {apiVersion: apps/v1, kind: Deployment, name: mhs}\n  service: {port: 80}\n  analysis:\n    stepWeight: 10\n    metrics: [{name: request-success-rate, thresholdRange: {min: 99}}]\n",
        )
        .unwrap()
        .plan;
        let ingest = Ingest::try_new(crate::ingest::IngestConfig::default()).unwrap();
        let check = &plan.analysis.metrics[0];
        let none = PrometheusSource::new(None, Templates::new());
        let unconfigured = SelectingSource::new(ingest.clone(), none, SourcePolicy::Auto);
        assert_eq!(
            unconfigured.choice(&plan, check, Instant::now()),
            Choice::Streamed
        );
        let global =
            PrometheusConfig::new(PrometheusAddress::try_new("http://127.0.0.1:9090").unwrap());
        let configured = SelectingSource::new(
            ingest,
            PrometheusSource::new(Some(global), Templates::new()),
            SourcePolicy::Auto,
        );
        assert_eq!(
            configured.choice(&plan, check, Instant::now()),
            Choice::Prometheus
        );
    }

    #[test]
    fn reports_for_the_canary_keep_built_in_checks_on_streamed_data_while_fresh() {
        use weir_proto::v1::{CanaryRoute, Report, Reporter, Version, VersionStats};
        let plan = crate::spec::load_yaml(
            "apiVersion: weir.dev/v1alpha1\nkind: Canary\nmetadata: {name: mhs, namespace: app}\nspec:\n  targetRef: {apiVersion: apps/v1, kind: Deployment, name: mhs}\n  service: {port: 80}\n  analysis:\n    stepWeight: 10\n    metrics: [{name: request-success-rate, thresholdRange: {min: 99}}]\n",
        )
        .unwrap()
        .plan;
        let ingest = Ingest::try_new(crate::ingest::IngestConfig::default()).unwrap();
        let generation = ingest
            .publish(vec![CanaryRoute {
                key: plan.key(),
                hosts: vec!["mhs.app".into()],
                canary_weight_bp: 1000,
                ..Default::default()
            }])
            .unwrap();
        let global =
            PrometheusConfig::new(PrometheusAddress::try_new("http://127.0.0.1:9090").unwrap());
        let source = SelectingSource::new(
            ingest.clone(),
            PrometheusSource::new(Some(global), Templates::new()),
            SourcePolicy::Auto,
        )
        .with_freshness(Duration::from_secs(5));
        let report = |sequence: u64, stats: Vec<VersionStats>| Report {
            reporter: Some(Reporter {
                node_id: "envoy-1".into(),
                namespace: "app".into(),
                workload: "gateway".into(),
            }),
            epoch: 1,
            sequence,
            applied_generation: generation,
            stats,
        };
        let at = Instant::now();
        let mut latency = weir_proto::LatencyHistogram::new();
        (0..10).for_each(|_| latency.record(1_000));
        ingest.ingest(&report(0, vec![]), at).unwrap();
        let check = &plan.analysis.metrics[0];
        assert_eq!(source.choice(&plan, check, at), Choice::Prometheus);
        ingest
            .ingest(
                &report(
                    1,
                    vec![VersionStats {
                        canary: plan.key(),
                        version: Version::Canary as i32,
                        requests: 10,
                        failures: 0,
                        latency: Some(latency.encode()),
                    }],
                ),
                at,
            )
            .unwrap();
        assert_eq!(source.choice(&plan, check, at), Choice::Streamed);
        assert_eq!(
            source.choice(&plan, check, at + Duration::from_secs(5)),
            Choice::Streamed
        );
        assert_eq!(
            source.choice(&plan, check, at + Duration::from_secs(6)),
            Choice::Prometheus,
            "a report older than the freshness window no longer counts"
        );
    }
}
