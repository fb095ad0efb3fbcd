//! The compiled Canary: what [`Canary::compile`](super::Canary::compile) produces after defaults
//! and validation. Every field holds a checked value (weights in 0..=100, positive durations,
//! strictly increasing steps, non-zero counts), so the analysis engine never re-validates.

use super::weight::Weight;
use std::collections::BTreeMap;
use std::num::NonZeroU32;
use std::time::Duration;

/// Name of the built-in success-rate metric: percent of requests that were not 5xx.
pub const REQUEST_SUCCESS_RATE: &str = "request-success-rate";
/// Name of the built-in latency metric: P99 request duration in milliseconds.
pub const REQUEST_DURATION: &str = "request-duration";

/// A validated Canary, ready for the analysis engine and the executor.
#[derive(Debug, Clone, PartialEq)]
pub struct CanaryPlan {
    /// The Canary's name.
    pub name: String,
    /// The Canary's namespace.
    pub namespace: String,
    /// The workload being rolled out.
    pub target: Target,
    /// Service and routing settings.
    pub service: ServicePlan,
    /// How a new revision is analysed.
    pub analysis: AnalysisPlan,
    /// How long the canary may stay not ready before the rollout is rolled back.
    pub progress_deadline: Duration,
    /// Promote new revisions without analysis.
    pub skip_analysis: bool,
    /// On deletion, give traffic back to the target workload.
    pub revert_on_deletion: bool,
    /// Do nothing while set.
    pub suspend: bool,
    /// Traffic provider; `None` or `istio`.
    pub provider: Option<String>,
    /// Prometheus URL for the fallback metric source.
    pub metrics_server: Option<String>,
    /// The target's autoscaler, copied for the primary.
    pub autoscaler: Option<AutoscalerPlan>,
    /// The routing header's value that sends a request to the canary, in the directive (which
    /// the filters set) and in the routes (which match it). Not from the spec: the platform makes
    /// it a per-canary secret (see [`crate::traffic::route_secret`]), so that a client that
    /// sends the header itself cannot reach the canary.
    pub canary_route_value: String,
}

impl CanaryPlan {
    /// `name.namespace`, how Flagger names a canary in messages.
    pub fn id(&self) -> String {
        format!("{}.{}", self.name, self.namespace)
    }

    /// `target.namespace`, how Flagger names the target workload in messages.
    pub fn target_id(&self) -> String {
        format!("{}.{}", self.target.name, self.namespace)
    }

    /// `target-primary.namespace`, the primary workload.
    pub fn primary_id(&self) -> String {
        format!("{}.{}", self.primary_name(), self.namespace)
    }

    /// Name of the primary workload: `<target>-primary`.
    pub fn primary_name(&self) -> String {
        format!("{}-primary", self.target.name)
    }

    /// The settings written that only shape Kubernetes objects (the primary's autoscaler, the
    /// generated Services and DestinationRules, delegation), by path: local mode, which makes
    /// none of those objects, says it ignores them.
    pub fn kubernetes_only_settings(&self) -> Vec<&'static str> {
        let s = &self.service;
        let metadata = |m: &ObjectMetadata| !m.labels.is_empty() || !m.annotations.is_empty();
        [
            ("spec.autoscalerRef", self.autoscaler.is_some()),
            ("spec.service.portDiscovery", s.port_discovery),
            ("spec.service.appProtocol", s.app_protocol.is_some()),
            (
                "spec.service.trafficDistribution",
                s.traffic_distribution.is_some(),
            ),
            ("spec.service.headless", s.headless),
            ("spec.service.trafficPolicy", s.traffic_policy.is_some()),
            ("spec.service.apex", metadata(&s.apex)),
            ("spec.service.primary", metadata(&s.primary)),
            ("spec.service.canary", metadata(&s.canary)),
            (
                "spec.service.unmanagedMetadata",
                !s.unmanaged.labels.is_empty() || !s.unmanaged.annotations.is_empty(),
            ),
            ("spec.service.delegation", s.delegation),
        ]
        .into_iter()
        .filter_map(|(path, set)| set.then_some(path))
        .collect()
    }

    /// The stable key used in directives and reports: `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// `spec.targetRef`, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// API version, like `apps/v1`.
    pub api_version: String,
    /// Kind, like `Deployment`.
    pub kind: String,
    /// Name of the workload.
    pub name: String,
}

/// `spec.autoscalerRef`, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AutoscalerPlan {
    /// HorizontalPodAutoscaler or ScaledObject.
    pub kind: AutoscalerKind,
    /// Name of the target's autoscaler; the primary's is `<name>-primary`.
    pub name: String,
    /// `primaryScalerReplicas.minReplicas`: replaces the copy's minimum.
    pub primary_min_replicas: Option<i32>,
    /// `primaryScalerReplicas.maxReplicas`: replaces the copy's maximum.
    pub primary_max_replicas: Option<i32>,
    /// `primaryScalerQueries` (ScaledObject): trigger name → the primary's query.
    pub primary_queries: BTreeMap<String, String>,
}

/// The kinds of autoscaler Weir copies for the primary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AutoscalerKind {
    /// `autoscaling/v2` HorizontalPodAutoscaler.
    HorizontalPodAutoscaler,
    /// KEDA `keda.sh/v1alpha1` ScaledObject.
    ScaledObject,
}

/// Labels and annotations Weir sets on a generated object.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ObjectMetadata {
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Annotations.
    pub annotations: BTreeMap<String, String>,
}

/// A container port by number or name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PortRef {
    /// A port number.
    Number(u16),
    /// A named container port.
    Name(String),
}

/// `spec.service`, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePlan {
    /// Apex service name (defaults to the target's name).
    pub name: String,
    /// Service port.
    pub port: u16,
    /// Service port name (default `http`).
    pub port_name: String,
    /// Container port (defaults to `port`).
    pub target_port: PortRef,
    /// Authorities the canary's traffic arrives on (the directive's `hosts`).
    pub hosts: Vec<String>,
    /// Istio gateways.
    pub gateways: Vec<String>,
    /// `appProtocol` of the Services' port (never `tcp`).
    pub app_protocol: Option<String>,
    /// Add the target's other container ports to the Services.
    pub port_discovery: bool,
    /// `trafficDistribution` of the Services.
    pub traffic_distribution: Option<String>,
    /// Headless Services (`clusterIP: None`).
    pub headless: bool,
    /// Istio `TrafficPolicy` of the `-primary` and `-canary` DestinationRules, as written.
    pub traffic_policy: Option<serde_json::Value>,
    /// Metadata of the apex Service and of the VirtualService.
    pub apex: ObjectMetadata,
    /// Metadata of the `-primary` Service.
    pub primary: ObjectMetadata,
    /// Metadata of the `-canary` Service.
    pub canary: ObjectMetadata,
    /// Keys of the Services' labels and annotations that others set (`unmanagedMetadata`).
    pub unmanaged: ObjectMetadataKeys,
    /// Write a delegate VirtualService: no hosts, no gateways.
    pub delegation: bool,
    /// Route options (`timeout`, `retries`, `headers`, `rewrite`, `corsPolicy`, `match`), for
    /// the VirtualService and local mode's Envoy alike.
    pub routes: super::routes::RouteOptions,
}

/// Label and annotation keys.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ObjectMetadataKeys {
    /// Label keys.
    pub labels: Vec<String>,
    /// Annotation keys.
    pub annotations: Vec<String>,
}

/// `spec.analysis`, checked, with Flagger's defaults applied.
#[derive(Debug, Clone, PartialEq)]
pub struct AnalysisPlan {
    /// Time between two analysis steps.
    pub interval: Duration,
    /// Failed checks that trigger a rollback (at least 1).
    pub threshold: NonZeroU32,
    /// Progressive canary, A/B testing or blue/green.
    pub strategy: Strategy,
    /// Weight moved back to primary per step while promoting; `None` moves it all at once.
    pub step_weight_promotion: Option<Weight>,
    /// Checks run at every analysis step.
    pub metrics: Vec<MetricCheck>,
    /// Webhooks, with unique names.
    pub webhooks: Vec<Webhook>,
    /// Alerts, with unique names.
    pub alerts: Vec<super::alert::AlertPlan>,
    /// Fewest requests a metric window must hold for a verdict; fewer is Inconclusive.
    pub min_sample_count: u64,
    /// Count Inconclusive checks as failed checks.
    pub inconclusive_counts_as_failure: bool,
    /// Inconclusive steps in a row after which the canary pauses for an operator's decision;
    /// `None`: no limit.
    pub inconclusive_limit: Option<NonZeroU32>,
    /// Percent of primary replicas that must be available (for the platform's readiness).
    pub primary_ready_threshold: Weight,
    /// Percent of canary replicas that must be available (for the platform's readiness).
    pub canary_ready_threshold: Weight,
    /// Cookie-based session affinity (the filter sets and honours the cookies; without filters,
    /// the VirtualService does, as Flagger writes it).
    pub session_affinity: Option<SessionAffinityPlan>,
    /// Who besides the canary's namespace and the trusted identities may report its traffic.
    pub reporters: Vec<crate::ingest::identity::ReporterRule>,
    /// The comparative judge (`analysis.judge`), when asked for.
    pub judge: Option<JudgePlan>,
}

/// `analysis.judge`, checked: compare the canary with the primary continuously.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct JudgePlan {
    /// Probability that a verdict is right, strictly between 0.5 and 1 (default 0.99).
    pub confidence: f64,
    /// Pass needs the canary's odds of failure shown below this many times the primary's (at
    /// least 1; default 1.5); Fail needs them shown above the primary's.
    pub error_ratio: f64,
    /// Latency factor the canary may have over the primary before it is slower, at least 1;
    /// `None`: latency is not compared.
    pub latency_ratio: Option<f64>,
    /// A step advances only once the judge says Pass.
    pub require_pass: bool,
}

/// Default `analysis.judge.confidence`.
pub const DEFAULT_JUDGE_CONFIDENCE: f64 = 0.99;
/// Default `analysis.judge.errorRatio`.
pub const DEFAULT_JUDGE_ERROR_RATIO: f64 = 1.5;

impl AnalysisPlan {
    /// The webhooks of one kind, in spec order.
    pub fn hooks(&self, kind: HookKind) -> impl Iterator<Item = &Webhook> {
        self.webhooks.iter().filter(move |w| w.kind == kind)
    }
}

/// Default `analysis.minSampleCount`: fewer requests than this in a window is Inconclusive.
pub const DEFAULT_MIN_SAMPLE_COUNT: u64 = 20;

/// Default `analysis.inconclusiveLimit`. Ten steps in a row is long enough that a lull in
/// traffic, or the windows filling after a restart, never pauses a rollout, and short enough
/// that a canary nobody sends traffic to asks for a decision within ten intervals (10 minutes
/// at Flagger's default 1m) instead of holding its weight forever.
pub const DEFAULT_INCONCLUSIVE_LIMIT: u32 = 10;

/// How traffic moves to the canary during analysis.
#[derive(Debug, Clone, PartialEq)]
pub enum Strategy {
    /// Progressive traffic shifting: the weight climbs through `steps`, then promotion.
    Canary {
        /// The weights to go through.
        steps: Steps,
    },
    /// A/B testing: requests matching `matches` go to the canary for `iterations` steps.
    AbTesting {
        /// Analysis steps before promotion.
        iterations: NonZeroU32,
        /// A request matching any group goes to the canary.
        matches: Vec<MatchGroup>,
    },
    /// Blue/green: the canary is tested for `iterations` steps without user traffic, then all
    /// traffic is switched to it for one more step, then promotion.
    BlueGreen {
        /// Analysis steps before the switch.
        iterations: NonZeroU32,
    },
}

/// The canary weights of a progressive rollout: non-empty, strictly increasing, all above 0.
/// The last one is the maximum weight, after which the canary is promoted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Steps(Vec<Weight>);

impl Steps {
    /// `step, 2*step, ...` up to `max` (the last step is `max` itself, never above it).
    pub fn linear(step: Weight, max: Weight) -> Option<Steps> {
        if step == Weight::ZERO || max == Weight::ZERO {
            return None;
        }
        let mut out = Vec::new();
        let mut w = Weight::ZERO;
        while w < max {
            w = w.saturating_add(step).min(max);
            out.push(w);
        }
        Some(Steps(out))
    }

    /// An explicit list; `None` unless non-empty, strictly increasing and above zero.
    pub fn explicit(weights: Vec<Weight>) -> Option<Steps> {
        let increasing = weights.windows(2).all(|w| w[0] < w[1]);
        let positive = weights.first().is_some_and(|w| *w > Weight::ZERO);
        (increasing && positive).then_some(Steps(weights))
    }

    /// A single step to 100%: the whole traffic at once.
    pub fn all_at_once() -> Steps {
        Steps(vec![Weight::FULL])
    }

    /// The weights, in order.
    pub fn weights(&self) -> &[Weight] {
        &self.0
    }

    /// The largest weight of the analysis (Flagger's `maxWeight`).
    pub fn max(&self) -> Weight {
        self.0.last().copied().unwrap_or(Weight::FULL)
    }

    /// The next weight above `current`, or `None` when `current` has reached the maximum.
    pub fn next_after(&self, current: Weight) -> Option<Weight> {
        self.0.iter().copied().find(|w| *w > current)
    }
}

/// One A/B match group: every rule must match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MatchGroup {
    /// Header rules, all of which must match.
    pub headers: Vec<HeaderRule>,
}

/// A header condition of an A/B match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderRule {
    /// Header name, lower case. `cookie` matches against the whole Cookie header.
    pub name: String,
    /// How the value must match.
    pub value: StringMatcher,
}

/// How a header value must match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StringMatcher {
    /// The whole value.
    Exact(String),
    /// A prefix.
    Prefix(String),
    /// An RE2 regular expression.
    Regex(String),
}

/// A metric check, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct MetricCheck {
    /// Name as written in the spec (unique within the Canary).
    pub name: String,
    /// What is measured.
    pub kind: MetricKind,
    /// The accepted range.
    pub range: Range,
    /// The window the metric is computed over, ending at the analysis time.
    pub window: Duration,
    /// Extra variables for a template's query.
    pub template_variables: BTreeMap<String, String>,
}

/// What a metric check measures.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetricKind {
    /// `request-success-rate`: percent (0..=100) of requests that were not 5xx.
    SuccessRate,
    /// `request-duration`: P99 latency in milliseconds.
    Duration,
    /// A Flagger MetricTemplate, evaluated by the Prometheus source.
    Template {
        /// Template name.
        name: String,
        /// Template namespace (defaults to the Canary's).
        namespace: String,
    },
    /// An inline PromQL query (Flagger's deprecated `query`).
    Query(String),
}

/// An accepted range: at least one bound, `min <= max`, both finite.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Range {
    min: Option<f64>,
    max: Option<f64>,
}

impl Range {
    /// `None` unless at least one bound is set, both are finite and `min <= max`.
    pub fn try_new(min: Option<f64>, max: Option<f64>) -> Option<Range> {
        let finite = min.is_none_or(f64::is_finite) && max.is_none_or(f64::is_finite);
        let ordered = match (min, max) {
            (Some(lo), Some(hi)) => lo <= hi,
            (None, None) => false,
            _ => true,
        };
        (finite && ordered).then_some(Range { min, max })
    }

    /// Smallest accepted value.
    pub fn min(&self) -> Option<f64> {
        self.min
    }

    /// Largest accepted value.
    pub fn max(&self) -> Option<f64> {
        self.max
    }
}

/// A webhook, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Webhook {
    /// Unique name.
    pub name: String,
    /// When it runs.
    pub kind: HookKind,
    /// Where to POST (http or https).
    pub url: String,
    /// Request timeout.
    pub timeout: Duration,
    /// Key-value pairs sent with the call.
    pub metadata: BTreeMap<String, String>,
    /// Retries of a failed call.
    pub retries: u32,
    /// Skip TLS verification.
    pub disable_tls: bool,
    /// Do not alert for this hook.
    pub mute_alert: bool,
}

/// When a webhook runs, with Flagger's semantics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum HookKind {
    /// Gate before a new revision is scaled up: not-OK keeps the canary Waiting.
    ConfirmRollout,
    /// Runs once before traffic is shifted: not-OK counts as a failed check.
    PreRollout,
    /// Runs at every analysis step (Flagger's default type): not-OK counts as a failed check.
    Rollout,
    /// Gate before each weight increase: not-OK holds the weight.
    ConfirmTrafficIncrease,
    /// Gate before promotion: not-OK keeps the canary WaitingPromotion.
    ConfirmPromotion,
    /// Called after the rollout succeeded or failed; its outcome changes nothing.
    PostRollout,
    /// Polled during analysis: OK rolls the canary back.
    Rollback,
    /// Receives every event (Flagger's payload, the event in `metadata`); its outcome changes
    /// nothing.
    Event,
}

impl HookKind {
    /// Every kind with its spelling in the spec.
    pub const ALL: [(HookKind, &'static str); 8] = [
        (HookKind::ConfirmRollout, "confirm-rollout"),
        (HookKind::PreRollout, "pre-rollout"),
        (HookKind::Rollout, "rollout"),
        (HookKind::ConfirmTrafficIncrease, "confirm-traffic-increase"),
        (HookKind::ConfirmPromotion, "confirm-promotion"),
        (HookKind::PostRollout, "post-rollout"),
        (HookKind::Rollback, "rollback"),
        (HookKind::Event, "event"),
    ];

    /// The spelling in the spec, like `pre-rollout`.
    pub fn as_str(self) -> &'static str {
        HookKind::ALL
            .iter()
            .find(|(k, _)| *k == self)
            .map_or("rollout", |(_, s)| s)
    }

    /// Parses the spec's spelling; the empty string is `rollout`, as in Flagger.
    pub fn parse(s: &str) -> Option<HookKind> {
        if s.is_empty() {
            return Some(HookKind::Rollout);
        }
        HookKind::ALL
            .iter()
            .find(|(_, name)| *name == s)
            .map(|(k, _)| *k)
    }
}

/// `sessionAffinity`, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionAffinityPlan {
    /// Cookie set on responses from the canary.
    pub cookie_name: String,
    /// Cookie lifetime.
    pub max_age: Duration,
    /// Cookie set on responses from the primary, which keeps a client there for one analysis
    /// interval (Flagger's `primaryCookieName`).
    pub primary_cookie_name: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(p: i64) -> Weight {
        Weight::try_new(p).unwrap()
    }

    #[test]
    fn linear_steps_stop_exactly_at_max_weight() {
        let steps = Steps::linear(w(20), w(50)).unwrap();
        assert_eq!(steps.weights(), &[w(20), w(40), w(50)]);
        assert_eq!(steps.max(), w(50));
        let steps = Steps::linear(w(10), w(50)).unwrap();
        assert_eq!(steps.weights().len(), 5);
    }

    #[test]
    fn next_step_is_the_first_weight_above_the_current_one() {
        let steps = Steps::explicit(vec![w(1), w(5), w(25), w(50)]).unwrap();
        assert_eq!(steps.next_after(Weight::ZERO), Some(w(1)));
        assert_eq!(steps.next_after(w(5)), Some(w(25)));
        assert_eq!(steps.next_after(w(7)), Some(w(25)));
        assert_eq!(steps.next_after(w(50)), None);
    }

    #[test]
    fn explicit_steps_must_increase_and_start_above_zero() {
        assert!(Steps::explicit(vec![w(10), w(10)]).is_none());
        assert!(Steps::explicit(vec![w(20), w(10)]).is_none());
        assert!(Steps::explicit(vec![]).is_none());
        assert!(Steps::explicit(vec![w(0), w(10)]).is_none());
        assert!(Steps::linear(Weight::ZERO, w(50)).is_none());
    }

    #[test]
    fn a_range_needs_a_bound_and_order() {
        assert!(Range::try_new(None, None).is_none());
        assert!(Range::try_new(Some(2.0), Some(1.0)).is_none());
        assert!(Range::try_new(Some(f64::NAN), None).is_none());
        assert!(Range::try_new(Some(99.0), None).is_some());
    }

    #[test]
    fn hook_kinds_round_trip_through_their_spelling() {
        for (kind, name) in HookKind::ALL {
            assert_eq!(HookKind::parse(name), Some(kind));
            assert_eq!(kind.as_str(), name);
        }
        assert_eq!(HookKind::parse(""), Some(HookKind::Rollout));
        assert_eq!(HookKind::parse("pre"), None);
    }
}
