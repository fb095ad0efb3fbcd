//! The Canary resource as written: Flagger's `v1beta1` field names, every field optional where
//! Flagger's is, so that parsing never fails on a missing value and validation can name it.
//!
//! Unknown keys are collected (`#[serde(flatten)]` into [`Unknown`]) rather than rejected, so a
//! Canary written for a newer Flagger still loads; validation reports each one as a warning with
//! its path. Flagger fields that Weir does not implement yet are parsed as opaque JSON and
//! reported as "not supported yet" warnings. `metadata` is the exception: Kubernetes adds many
//! keys there (`uid`, `resourceVersion`, `managedFields`, ...) and Weir ignores them silently.

use super::status::CanaryStatus;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;

/// The annotation that asks Weir to retry a Failed canary: set it to a new value (a timestamp,
/// say) for each retry; the same value never triggers twice.
pub const RETRY_ANNOTATION: &str = "weir.dev/retry";

/// The annotation that carries an operator request (`weir promote`, `abort`, `pause`,
/// `resume`): `<verb> <token>`, a new token for each request; who asked is the annotation's
/// field manager.
pub const REQUEST_ANNOTATION: &str = "weir.dev/request";

/// Keys that are not part of Flagger's Canary schema, kept so validation can warn about each one.
pub type Unknown = BTreeMap<String, Value>;

/// A Canary resource (`weir.dev/v1alpha1`, or `flagger.app/v1beta1` pasted from Flagger).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Canary {
    /// `weir.dev/v1alpha1` (or `flagger.app/v1beta1`, accepted with a warning).
    #[serde(default)]
    pub api_version: String,
    /// Always `Canary`.
    #[serde(default)]
    pub kind: String,
    /// Name, namespace, labels, annotations.
    #[serde(default)]
    pub metadata: ObjectMeta,
    /// What to roll out and how to analyse it.
    #[serde(default)]
    pub spec: CanarySpec,
    /// The persisted state of the rollout, when the resource was read back with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<CanaryStatus>,
    /// Top-level keys Flagger does not know.
    #[serde(flatten)]
    pub unknown: Unknown,
}

impl Canary {
    /// The retry token from the [`RETRY_ANNOTATION`] annotation, for `Observations::retry`.
    pub fn retry_token(&self) -> Option<&str> {
        self.metadata
            .annotations
            .get(RETRY_ANNOTATION)
            .map(String::as_str)
            .filter(|t| !t.is_empty())
    }
}

/// The part of Kubernetes `ObjectMeta` that Weir reads.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectMeta {
    /// The Canary's name (required).
    #[serde(default)]
    pub name: String,
    /// The Canary's namespace; `default` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Annotations (Weir reads its retry request from one, see the analysis module).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// Labels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// The spec's generation, set by Kubernetes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<i64>,
}

/// `spec`: Flagger's `CanarySpec`.
///
/// The `#[schemars]` attributes here and on the types below put the bounds that validation
/// (`validate.rs`) checks into the generated CRD schema, so the API server refuses what Weir
/// would refuse: ranges, enums and required fields. What a schema cannot say (a duration's
/// syntax, `analysis` unless `skipAnalysis`, min <= max, ...) stays with validation alone.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("required" = ["targetRef", "service"]))]
pub struct CanarySpec {
    /// Traffic provider; Weir routes in its Envoy filter on Istio, so only `istio` (or nothing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("enum" = super::validate::PROVIDERS))]
    pub provider: Option<String>,
    /// Prometheus URL for the fallback metric source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_server: Option<String>,
    /// The workload to roll out (required).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "target_ref_schema")]
    pub target_ref: Option<ObjectReference>,
    /// The target's HorizontalPodAutoscaler or KEDA ScaledObject: Weir gives the primary a
    /// `-primary` copy of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "autoscaler_ref_schema")]
    pub autoscaler_ref: Option<AutoscalerReference>,
    /// NGINX ingress reference (another provider's: no effect with Istio).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress_ref: Option<Value>,
    /// APISIX route reference (another provider's: no effect with Istio).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route_ref: Option<Value>,
    /// Gloo upstream reference (another provider's: no effect with Istio).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream_ref: Option<Value>,
    /// How the apex/primary/canary services and routes are generated (required).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<CanaryService>,
    /// How a new revision is analysed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub analysis: Option<CanaryAnalysis>,
    /// Flagger's deprecated name for `analysis`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary_analysis: Option<CanaryAnalysis>,
    /// How long the canary may stay not ready before the rollout is rolled back (default 600).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub progress_deadline_seconds: Option<i64>,
    /// Promote a new revision without analysing it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub skip_analysis: bool,
    /// On deletion of the Canary, give traffic back to the target workload.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub revert_on_deletion: bool,
    /// Pause every action on this Canary.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub suspend: bool,
    /// Keys Flagger does not know.
    #[serde(flatten)]
    pub unknown: Unknown,
}

/// A reference to another object (`targetRef`, `templateRef`, ...).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("required" = ["name"]))]
pub struct ObjectReference {
    /// API version of the referent, like `apps/v1`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_version: Option<String>,
    /// Kind of the referent, like `Deployment`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// Name of the referent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub name: Option<String>,
    /// Namespace of the referent (for references that may cross namespaces).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Keys Flagger does not know.
    #[serde(flatten)]
    pub unknown: Unknown,
}

/// `spec.autoscalerRef`: Flagger's `AutoscalerRefernce`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AutoscalerReference {
    /// `autoscaling/v2` (HorizontalPodAutoscaler) or `keda.sh/v1alpha1` (ScaledObject).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_version: Option<String>,
    /// `HorizontalPodAutoscaler` or `ScaledObject`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// Name of the target's autoscaler, in the Canary's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub name: Option<String>,
    /// ScaledObject only: trigger name → the query the primary's copy uses instead of the
    /// target's (by default the target's name in each query becomes `<target>-primary`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub primary_scaler_queries: BTreeMap<String, String>,
    /// Replica bounds of the primary's copy instead of the target autoscaler's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub primary_scaler_replicas: Option<ScalerReplicas>,
    /// Keys Flagger does not know.
    #[serde(flatten)]
    pub unknown: Unknown,
}

/// `spec.autoscalerRef.primaryScalerReplicas`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ScalerReplicas {
    /// Fewest replicas of the primary.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = i32::MAX))]
    pub min_replicas: Option<i64>,
    /// Most replicas of the primary.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = i32::MAX))]
    pub max_replicas: Option<i64>,
    /// Keys Flagger does not know.
    #[serde(flatten)]
    pub unknown: Unknown,
}

/// A port given as a number or as a name (Kubernetes `IntOrString`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum IntOrString {
    /// A port number.
    Int(i64),
    /// A port name.
    String(String),
}

// Kubernetes' own marker for this union, which a structural CRD schema needs instead of `anyOf`.
impl schemars::JsonSchema for IntOrString {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "IntOrString".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({"x-kubernetes-int-or-string": true})
    }
}

/// `spec.service`: Flagger's `CanaryService`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("required" = ["port"]))]
pub struct CanaryService {
    /// Name of the apex service (default: the target's name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Service port (required).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<i64>,
    /// Service port name (default `http`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port_name: Option<String>,
    /// Container port, by number or name (default: `port`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_port: Option<IntOrString>,
    /// Add the target's other container ports to the generated services (Flagger's rules:
    /// sidecars and the service's own target port left out).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub port_discovery: bool,
    /// Application protocol of the service port (`appProtocol` on the generated Services);
    /// `tcp` is refused: the filter sees HTTP only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_protocol: Option<String>,
    /// `trafficDistribution` of the generated Services (Kubernetes 1.31+, e.g. `PreferClose`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traffic_distribution: Option<String>,
    /// Generate headless Services (`clusterIP: None`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub headless: bool,
    /// Request timeout on the generated routes (Istio's `timeout`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Value>,
    /// Gateway API backend timeout (another provider's: no effect with Istio).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend_timeout: Option<Value>,
    /// App Mesh mesh name (another provider's: no effect with Istio).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mesh_name: Option<Value>,
    /// App Mesh backends (another provider's: no effect with Istio).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backends: Option<Value>,
    /// Host names this canary's traffic arrives on; Weir splits requests for these authorities.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    /// Istio gateways the generated VirtualService attaches to.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gateways: Vec<String>,
    /// Write a delegate VirtualService (no hosts, no gateways) for a root VirtualService to
    /// delegate to.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub delegation: bool,
    /// Match conditions of the generated routes (Istio's `HTTPMatchRequest` list).
    #[serde(default, rename = "match", skip_serializing_if = "Option::is_none")]
    pub matches: Option<Value>,
    /// Retry policy of the generated routes (Istio's `HTTPRetry`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<Value>,
    /// URI and authority rewrite of the generated routes (Istio's `HTTPRewrite`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rewrite: Option<Value>,
    /// Gateway API request mirroring (another provider's: no effect with Istio).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror: Option<Value>,
    /// Header operations on the generated routes (Istio's `Headers`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headers: Option<Value>,
    /// Gateway API parent references (another provider's: no effect with Istio).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway_refs: Option<Value>,
    /// CORS policy of the generated routes (Istio's `CorsPolicy`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cors_policy: Option<Value>,
    /// Istio traffic policy of the `-primary` and `-canary` DestinationRules (Istio's
    /// `TrafficPolicy`, written as given).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traffic_policy: Option<Value>,
    /// Labels and annotations of the apex Service and of the VirtualService.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub apex: Option<CustomMetadata>,
    /// Labels and annotations of the `-primary` Service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub primary: Option<CustomMetadata>,
    /// Labels and annotations of the `-canary` Service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary: Option<CustomMetadata>,
    /// Label and annotation keys of the generated Services that someone else sets: Weir
    /// keeps the value they have.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unmanaged_metadata: Option<UnmanagedMetadata>,
    /// Keys Flagger does not know.
    #[serde(flatten)]
    pub unknown: Unknown,
}

/// Labels and annotations for a generated object (Flagger's `CustomMetadata`).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CustomMetadata {
    /// Labels to set.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Annotations to set.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// Keys Flagger does not know.
    #[serde(flatten)]
    pub unknown: Unknown,
}

/// Metadata keys Weir leaves to others (Flagger's `UnmanagedMetadata`).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct UnmanagedMetadata {
    /// Label keys.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub labels: Vec<String>,
    /// Annotation keys.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub annotations: Vec<String>,
    /// Keys Flagger does not know.
    #[serde(flatten)]
    pub unknown: Unknown,
}

/// `spec.analysis`: Flagger's `CanaryAnalysis`, plus Weir's own keys (`minSampleCount`,
/// `inconclusiveCountsAsFailure`, `inconclusiveLimit`).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CanaryAnalysis {
    /// Time between two analysis steps (default `60s`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<String>,
    /// Number of iterations for A/B testing and blue/green.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = u32::MAX))]
    pub iterations: Option<i64>,
    /// Failed checks before rollback (default 1; 0 means the default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = u32::MAX))]
    pub threshold: Option<i64>,
    /// Largest canary weight during analysis, 1 to 100 (default 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100))]
    pub max_weight: Option<i64>,
    /// Weight added at each successful step, 1 to 100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100))]
    pub step_weight: Option<i64>,
    /// Explicit list of weights (each 1 to 100, increasing), instead of `stepWeight`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(inner(range(min = 1, max = 100)))]
    pub step_weights: Option<Vec<i64>>,
    /// Weight moved back to primary per step during promotion (default, or 0: all at once).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100))]
    pub step_weight_promotion: Option<i64>,
    /// Mirror traffic to the canary (refused: the filters cannot measure mirrored answers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror: Option<bool>,
    /// Share of mirrored traffic (with `mirror`, which is refused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror_weight: Option<i64>,
    /// Percent of primary pods that must be available, 1 to 100 (default 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100))]
    pub primary_ready_threshold: Option<i64>,
    /// Percent of canary pods that must be available, 1 to 100 (default 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100))]
    pub canary_ready_threshold: Option<i64>,
    /// A/B testing: requests matching any entry go to the canary.
    #[serde(default, rename = "match", skip_serializing_if = "Option::is_none")]
    pub matches: Option<Vec<MatchCondition>>,
    /// Checks run at every step.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub metrics: Vec<CanaryMetric>,
    /// Alert providers to notify, each with the least severity it is sent.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub alerts: Vec<CanaryAlert>,
    /// Gates, tests and notifications around the rollout.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub webhooks: Vec<CanaryWebhook>,
    /// Cookie-based session affinity, set and honoured by the filter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_affinity: Option<SessionAffinity>,
    /// Weir: fewest requests a metric window must hold to give a verdict (default 20); with
    /// fewer, the check is Inconclusive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub min_sample_count: Option<i64>,
    /// Weir: count an Inconclusive check as a failed check (default false: it only halts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inconclusive_counts_as_failure: Option<bool>,
    /// Weir (Argo Rollouts' idea): after this many Inconclusive analysis steps in a row the
    /// canary pauses until an operator decides (`weir promote` / `weir abort`, or `weir resume`);
    /// default 10, 0 for no limit (it then halts for as long as the data is missing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = u32::MAX))]
    pub inconclusive_limit: Option<i64>,
    /// Weir: who else may report this canary's traffic, as `namespace/serviceAccount` or
    /// `namespace/*` (callers in other namespaces). The canary's own namespace and the ingress
    /// gateways may always; reports from anyone else are refused.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reporters: Vec<String>,
    /// Weir: compare the canary with the primary continuously, and roll back as soon as it is
    /// worse with the stated confidence (absent: no comparison, as in Flagger).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub judge: Option<CanaryJudge>,
    /// Keys Flagger does not know.
    #[serde(flatten)]
    pub unknown: Unknown,
}

/// `spec.analysis.judge`: Weir's comparative judge (see `docs/judge.md`).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CanaryJudge {
    /// Probability that a verdict is right, above 0.5 and below 1 (default 0.99): a healthy
    /// canary is rolled back with probability at most 1 - confidence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.5, max = 0.999999))]
    pub confidence: Option<f64>,
    /// The tolerance for Pass (at least 1, default 1.5): the judge passes a canary whose odds
    /// of failure are shown to be below this many times the primary's. It fails one shown to
    /// fail more often than the primary at all; in between it goes on looking.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1.0))]
    pub error_ratio: Option<f64>,
    /// How many times slower the canary may be (at least 1): with 1.2, the canary is slower
    /// when its share of requests slower than 1.2 t exceeds the primary's share slower than t.
    /// Absent: latency is not compared.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1.0))]
    pub latency_ratio: Option<f64>,
    /// Advance a step only once the judge says Pass (default false: the judge only rolls back).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub require_pass: Option<bool>,
    /// Keys Weir does not know.
    #[serde(flatten)]
    pub unknown: Unknown,
}

/// One entry of `spec.analysis.match` (Istio's `HTTPMatchRequest`, of which Weir reads headers).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MatchCondition {
    /// Header name → how its value must match. `cookie` matches the whole Cookie header.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, StringMatch>,
    /// Query parameter matches (not supported yet: an error, since ignoring it would reroute).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query_params: Option<Value>,
    /// Source workload labels (not supported yet: an error, since ignoring it would reroute).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_labels: Option<Value>,
    /// Other Istio match fields (uri, method, ...): errors, for the same reason.
    #[serde(flatten)]
    pub unknown: Unknown,
}

/// How a string must match: exactly one of the keys.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StringMatch {
    /// The whole value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exact: Option<String>,
    /// A prefix of the value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// A suffix of the value (not supported by the filter yet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suffix: Option<String>,
    /// An RE2 regular expression over the value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regex: Option<String>,
    /// Keys Flagger does not know.
    #[serde(flatten)]
    pub unknown: Unknown,
}

/// One entry of `spec.analysis.metrics`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("required" = ["name"]))]
pub struct CanaryMetric {
    /// `request-success-rate`, `request-duration`, or a name of your choice with
    /// `templateRef`/`query`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    #[schemars(length(min = 1))]
    pub name: String,
    /// Window the metric is computed over (default `1m`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<String>,
    /// Deprecated single threshold (min for success rate, max otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threshold: Option<f64>,
    /// Accepted range of the metric.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threshold_range: Option<ThresholdRange>,
    /// Deprecated inline PromQL query.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query: Option<String>,
    /// A MetricTemplate to evaluate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template_ref: Option<ObjectReference>,
    /// Extra variables for the template's query.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub template_variables: BTreeMap<String, String>,
    /// Keys Flagger does not know.
    #[serde(flatten)]
    pub unknown: Unknown,
}

/// `thresholdRange`: the accepted range of a metric.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ThresholdRange {
    /// Smallest accepted value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<f64>,
    /// Largest accepted value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<f64>,
    /// Keys Flagger does not know.
    #[serde(flatten)]
    pub unknown: Unknown,
}

/// One entry of `spec.analysis.alerts` (Flagger's `CanaryAlert`).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("required" = ["name", "providerRef"]))]
pub struct CanaryAlert {
    /// The alert's name.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    #[schemars(length(min = 1))]
    pub name: String,
    /// The least severity sent: `info` (everything, the default), `warn` (warnings and errors)
    /// or `error`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("enum" = ["info", "warn", "error"]))]
    pub severity: Option<String>,
    /// The AlertProvider (`namespace` defaults to the Canary's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider_ref: Option<ObjectReference>,
    /// Keys Flagger does not know.
    #[serde(flatten)]
    pub unknown: Unknown,
}

/// One entry of `spec.analysis.webhooks`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("required" = ["name", "url"]))]
pub struct CanaryWebhook {
    /// Unique name of the hook.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    #[schemars(length(min = 1))]
    pub name: String,
    /// When it runs: `confirm-rollout`, `pre-rollout`, `rollout` (default), `confirm-traffic-increase`,
    /// `confirm-promotion`, `post-rollout`, `rollback`, `event`.
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    #[schemars(extend("enum" = webhook_types()))]
    pub kind: Option<String>,
    /// Where to POST (http:// or https://).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub url: Option<String>,
    /// Request timeout (default `10s`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    /// Key-value pairs sent with the call.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
    /// Do not alert for this hook.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub mute_alert: bool,
    /// Retries of a failed call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = u32::MAX))]
    pub retries: Option<i64>,
    /// Skip TLS verification.
    #[serde(
        default,
        rename = "disableTLS",
        skip_serializing_if = "std::ops::Not::not"
    )]
    pub disable_tls: bool,
    /// Keys Flagger does not know.
    #[serde(flatten)]
    pub unknown: Unknown,
}

/// `spec.analysis.sessionAffinity`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("required" = ["cookieName"]))]
pub struct SessionAffinity {
    /// Cookie set on responses from the canary.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub cookie_name: Option<String>,
    /// Cookie set on responses from the primary.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub primary_cookie_name: Option<String>,
    /// Cookie lifetime in seconds (default 86400).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_age: Option<i64>,
    /// Other cookie attributes (domain, path, secure, ...).
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

/// The webhook types the CRD schema allows: Flagger's, and the empty string (`rollout`).
fn webhook_types() -> Vec<&'static str> {
    std::iter::once("")
        .chain(super::plan::HookKind::ALL.iter().map(|(_, name)| *name))
        .collect()
}

/// The CRD schema of `spec.autoscalerRef`: its `kind` one of
/// [`AUTOSCALER_KINDS`](super::validate::AUTOSCALER_KINDS), and its `kind` and `name` required.
fn autoscaler_ref_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
    let mut schema = <AutoscalerReference as schemars::JsonSchema>::json_schema(generator);
    schema.insert("required".into(), serde_json::json!(["kind", "name"]));
    if let Some(kind) = schema
        .get_mut("properties")
        .and_then(|p| p.get_mut("kind"))
        .and_then(Value::as_object_mut)
    {
        kind.insert(
            "enum".into(),
            serde_json::json!(super::validate::AUTOSCALER_KINDS),
        );
    }
    schema
}

/// The CRD schema of `spec.targetRef`: an [`ObjectReference`] whose `kind` is one of
/// [`TARGET_KINDS`](super::validate::TARGET_KINDS), and which must name it.
fn target_ref_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
    let mut schema = <ObjectReference as schemars::JsonSchema>::json_schema(generator);
    schema.insert("required".into(), serde_json::json!(["kind", "name"]));
    if let Some(kind) = schema
        .get_mut("properties")
        .and_then(|p| p.get_mut("kind"))
        .and_then(Value::as_object_mut)
    {
        kind.insert(
            "enum".into(),
            serde_json::json!(super::validate::TARGET_KINDS),
        );
    }
    schema
}
