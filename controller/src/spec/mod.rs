//! The Canary resource: Flagger's `v1beta1` field names, Weir's defaults and validation, and the
//! persisted status.
//!
//! A Flagger `canary.yaml` works after changing only `apiVersion` to `weir.dev/v1alpha1`; the
//! Flagger `apiVersion` (`flagger.app/v1beta1`) is accepted too, with a warning, so a Canary can be
//! pasted unchanged.
//!
//! ```text
//! text ──parse──► Canary (raw, everything optional) ──compile──► CanaryPlan + warnings
//!                                                         └────► ValidationErrors (all of them)
//! ```
//!
//! - Parsing ([`from_yaml`], [`from_json`]) fails only on malformed YAML or a wrong type.
//! - [`Canary::compile`] applies Flagger's defaults (interval 60s, threshold 1, maxWeight 100,
//!   metric interval 1m, progressDeadlineSeconds 600, promotion in one step, webhook timeout
//!   10s) and checks every field; the result holds only valid values ([`Weight`], durations,
//!   [`Steps`]). All problems are reported at once, each as `path: rule`, e.g.
//!   `spec.analysis.stepWeight: must be between 1 and 100, got 150`.
//! - Warnings, logged once by the caller, list what is accepted without effect: Flagger fields
//!   not supported yet (alerts, ...), other providers' fields
//!   (no effect with Istio), deprecated fields, settings that do not apply, and **unknown keys**: Weir does not reject keys outside
//!   Flagger's schema (a newer Flagger may have them) but warns about each one with its path.
//!   Conditions that would change *who* gets the canary if ignored (A/B `match` on query
//!   parameters, say) are errors instead.
//!
//! Weir's own analysis settings live under `spec.analysis`:
//! - `minSampleCount` (default 20): a metric window with fewer requests gives an Inconclusive
//!   verdict instead of Pass or Fail.
//! - `inconclusiveCountsAsFailure` (default false): count Inconclusive steps as failed checks;
//!   by default they only halt the rollout.
//! - `judge` (absent by default): compare the canary with the primary continuously and roll
//!   back as soon as it is worse with the stated confidence (`crate::analysis::judge`,
//!   `docs/judge.md`): `{confidence: 0.99, errorRatio: 1.5, latencyRatio: 1.2, requirePass:
//!   false}`.
//! - `inconclusiveLimit` (default 10, 0 for none): after that many Inconclusive steps in a row
//!   the canary pauses and asks for a decision (`weir promote` / `weir abort`).
//!
//! The status ([`CanaryStatus`]) keeps Flagger's field names and adds Weir's bookkeeping; it
//! round-trips through JSON, with times as RFC 3339 strings ([`Timestamp`]).

mod alert;
mod duration;
mod plan;
mod resource;
mod routes;
mod status;
mod template;
mod time;
mod validate;
mod weight;

pub use alert::{
    AlertPlan, AlertProvider, AlertProviderError, AlertProviderPlan, AlertProviderSpec,
    AlertProviderType, AlertSeverity, ResolvedProvider, ALERT_PROVIDER_TYPES,
};
pub use duration::{format_go_duration, parse_go_duration, serde_go, DurationError};
pub use plan::{
    AnalysisPlan, AutoscalerKind, AutoscalerPlan, CanaryPlan, HeaderRule, HookKind, JudgePlan,
    MatchGroup, MetricCheck, MetricKind, ObjectMetadata, ObjectMetadataKeys, PortRef, Range,
    ServicePlan, SessionAffinityPlan, Steps, Strategy, StringMatcher, Target, Webhook,
    DEFAULT_INCONCLUSIVE_LIMIT, DEFAULT_JUDGE_CONFIDENCE, DEFAULT_JUDGE_ERROR_RATIO,
    DEFAULT_MIN_SAMPLE_COUNT, REQUEST_DURATION, REQUEST_SUCCESS_RATE,
};
pub use resource::{
    AutoscalerReference, Canary, CanaryAlert, CanaryAnalysis, CanaryJudge, CanaryMetric,
    CanaryService, CanarySpec, CanaryWebhook, CustomMetadata, IntOrString, MatchCondition,
    ObjectMeta, ObjectReference, ScalerReplicas, SessionAffinity, StringMatch, ThresholdRange,
    Unknown, UnmanagedMetadata, REQUEST_ANNOTATION, RETRY_ANNOTATION,
};
pub use routes::{
    CorsPolicy, HeaderOperations, HeaderOps, Retries, Rewrite, RouteMatch, RouteOptions,
    WrittenDuration,
};
pub use status::{
    CanaryStatus, Condition, Decision, Pause, PauseCause, Phase, RetryState, DECISION_HISTORY_LEN,
};
pub use template::{
    LocalObjectReference, MetricTemplate, MetricTemplateProvider, MetricTemplateSpec, ProviderKind,
    ProviderPlan, QueryTemplate, TemplateError, TemplateModel, TemplatePlan, PROMETHEUS_PROVIDER,
};
pub use time::{Timestamp, TimestampError};
pub use validate::{
    Compiled, FieldError, Rule, ValidationErrors, Warning, WarningKind, API_VERSION,
    AUTOSCALER_KINDS, DEFAULT_INTERVAL, DEFAULT_METRIC_INTERVAL, DEFAULT_PROGRESS_DEADLINE,
    DEFAULT_WEBHOOK_TIMEOUT, FLAGGER_API_VERSION, PROVIDERS, TARGET_KINDS,
};
pub use weight::{Weight, WeightError};

/// Why a Canary could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// Not YAML, or a field of the wrong type (the message names line and column).
    #[error("cannot parse the Canary: {0}")]
    Yaml(#[from] serde_yaml::Error),
    /// Not JSON, or a field of the wrong type.
    #[error("cannot parse the Canary: {0}")]
    Json(#[from] serde_json::Error),
    /// Parsed, but some fields break the rules.
    #[error(transparent)]
    Invalid(#[from] ValidationErrors),
}

/// Parses a Canary from YAML (one document) without validating it.
pub fn from_yaml(text: &str) -> Result<Canary, SpecError> {
    Ok(serde_yaml::from_str(text)?)
}

/// Parses a Canary from JSON without validating it.
pub fn from_json(text: &str) -> Result<Canary, SpecError> {
    Ok(serde_json::from_str(text)?)
}

/// Parses and validates a Canary from YAML: the plan and the warnings to log once.
pub fn load_yaml(text: &str) -> Result<Compiled, SpecError> {
    Ok(from_yaml(text)?.compile()?)
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod workload_tests;

/// The canary's routing-header value before a platform makes it secret (tests, Flagger's own
/// header routing).
pub const DEFAULT_CANARY_ROUTE_VALUE: &str = "canary";
