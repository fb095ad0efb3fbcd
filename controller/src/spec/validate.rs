//! Validation: a parsed [`Canary`] becomes a [`CanaryPlan`] plus warnings, or a list of every
//! problem found (not just the first), each naming the field path and the rule it breaks.

use super::alert::{AlertPlan, AlertSeverity};
use super::duration::{parse_go_duration, DurationError};
use super::plan::{
    AnalysisPlan, AutoscalerKind, AutoscalerPlan, CanaryPlan, HeaderRule, HookKind, JudgePlan,
    MatchGroup, MetricCheck, MetricKind, ObjectMetadata, ObjectMetadataKeys, PortRef, Range,
    ServicePlan, SessionAffinityPlan, Steps, Strategy, StringMatcher, Target, Webhook,
    DEFAULT_INCONCLUSIVE_LIMIT, DEFAULT_JUDGE_CONFIDENCE, DEFAULT_JUDGE_ERROR_RATIO,
    DEFAULT_MIN_SAMPLE_COUNT, REQUEST_DURATION, REQUEST_SUCCESS_RATE,
};
use super::resource::{
    AutoscalerReference, Canary, CanaryAlert, CanaryAnalysis, CanaryJudge, CanaryMetric,
    CanaryService, CanarySpec, CanaryWebhook, CustomMetadata, IntOrString, MatchCondition,
    ObjectReference, Unknown,
};
use super::weight::Weight;
use serde_json::Value;
use std::collections::BTreeSet;
use std::fmt;
use std::num::NonZeroU32;
use std::time::Duration;

/// Weir's own `apiVersion` for Canary.
pub const API_VERSION: &str = "weir.dev/v1alpha1";
/// Flagger's `apiVersion`, accepted (with a warning) so a Flagger Canary can be pasted as is.
pub const FLAGGER_API_VERSION: &str = "flagger.app/v1beta1";

/// The kinds `spec.targetRef` may name (also the CRD schema's enum). Flagger also takes
/// `DaemonSet` and `Service`; Weir refuses them with the reason (see [`Checker::target`]).
pub const TARGET_KINDS: [&str; 1] = ["Deployment"];
/// The kinds `spec.autoscalerRef` may name (also the CRD schema's enum).
pub const AUTOSCALER_KINDS: [&str; 2] = ["HorizontalPodAutoscaler", "ScaledObject"];
/// The values `spec.provider` may have (also the CRD schema's enum): Weir splits traffic in
/// its Envoy filter, on Istio.
pub const PROVIDERS: [&str; 1] = ["istio"];

/// Flagger's default analysis interval.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(60);
/// Flagger's default metric window.
pub const DEFAULT_METRIC_INTERVAL: Duration = Duration::from_secs(60);
/// Flagger's default progress deadline.
pub const DEFAULT_PROGRESS_DEADLINE: Duration = Duration::from_secs(600);
/// Flagger's default webhook timeout.
pub const DEFAULT_WEBHOOK_TIMEOUT: Duration = Duration::from_secs(10);

/// The rule a field breaks.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Rule {
    /// The field must be set.
    #[error("is required: {hint}")]
    Required {
        /// What to write.
        hint: String,
    },
    /// A number outside its range.
    #[error("must be between {min} and {max}, got {got}")]
    OutOfRange {
        /// Smallest allowed.
        min: i64,
        /// Largest allowed.
        max: i64,
        /// What was written.
        got: i64,
    },
    /// A number below its minimum.
    #[error("must be at least {min}, got {got}")]
    TooSmall {
        /// Smallest allowed.
        min: i64,
        /// What was written.
        got: i64,
    },
    /// Not a Go duration.
    #[error("`{got}` is not a duration ({reason}); write it like 30s, 1m, 1m30s or 500ms")]
    BadDuration {
        /// What was written.
        got: String,
        /// Why it does not parse.
        reason: DurationError,
    },
    /// A zero duration where time must pass.
    #[error("must be longer than zero, got `{got}`")]
    ZeroDuration {
        /// What was written.
        got: String,
    },
    /// A metric name that is neither built in nor backed by a template or query.
    #[error(
        "unknown metric `{name}`: the built-in metrics are `request-success-rate` (percent of \
         requests that were not 5xx; use thresholdRange.min) and `request-duration` (P99 latency \
         in milliseconds; use thresholdRange.max); for any other metric set templateRef or query"
    )]
    UnknownMetric {
        /// The name written.
        name: String,
    },
    /// A second entry with the same name.
    #[error("duplicate name `{name}`; names must be unique")]
    Duplicate {
        /// The repeated name.
        name: String,
    },
    /// A list of weights that does not grow.
    #[error("must be strictly increasing, got {got:?}")]
    NotIncreasing {
        /// The list written.
        got: Vec<i64>,
    },
    /// A value outside a fixed set.
    #[error("`{got}` is not supported, expected {expected}")]
    NotOneOf {
        /// What was written.
        got: String,
        /// What is accepted.
        expected: String,
    },
    /// A feature Weir cannot honour where ignoring it would change behaviour.
    #[error("not supported yet: {why}")]
    Unsupported {
        /// Why it cannot simply be ignored.
        why: String,
    },
    /// Any other rule, stated in full.
    #[error("{0}")]
    Invalid(String),
}

/// One problem in a Canary: where, and which rule.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{path}: {rule}")]
pub struct FieldError {
    /// Path of the field, like `spec.analysis.stepWeight`.
    pub path: String,
    /// The rule it breaks.
    pub rule: Rule,
}

/// Every problem found in a Canary.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidationErrors {
    /// `name.namespace` of the Canary (as far as it could be read).
    pub canary: String,
    /// The problems, in field order.
    pub errors: Vec<FieldError>,
}

impl fmt::Display for ValidationErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.errors.len();
        write!(
            f,
            "Canary {} is invalid ({n} problem{}):",
            self.canary,
            if n == 1 { "" } else { "s" }
        )?;
        for e in &self.errors {
            write!(f, "\n  - {e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ValidationErrors {}

/// Something accepted but not acted on, to be logged once by the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Warning {
    /// Path of the field.
    pub path: String,
    /// What is wrong with it.
    pub kind: WarningKind,
}

/// Why a field produced a warning.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WarningKind {
    /// A Flagger field Weir parses but does not implement yet; it has no effect.
    NotSupportedYet,
    /// A key that is not in Flagger's Canary schema (a typo, or a newer Flagger); no effect.
    UnknownField,
    /// A deprecated Flagger field; it still works.
    Deprecated {
        /// What to write instead.
        instead: &'static str,
    },
    /// `flagger.app/v1beta1` was accepted; Weir's own is `weir.dev/v1alpha1`.
    FlaggerApiVersion,
    /// A Flagger field of another traffic provider (NGINX, APISIX, Gloo, Gateway API, App
    /// Mesh); Flagger ignores it with Istio too.
    OtherProvider {
        /// Which provider the field belongs to.
        provider: &'static str,
    },
    /// A field that has no effect in this combination.
    Ignored {
        /// Why.
        why: String,
    },
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let path = &self.path;
        match &self.kind {
            WarningKind::NotSupportedYet => write!(f, "{path}: not supported yet, ignored"),
            WarningKind::UnknownField => write!(
                f,
                "{path}: unknown field (not in Flagger's Canary schema), ignored"
            ),
            WarningKind::Deprecated { instead } => {
                write!(f, "{path}: deprecated, use {instead} instead")
            }
            WarningKind::FlaggerApiVersion => write!(
                f,
                "{path}: {FLAGGER_API_VERSION} accepted for copy-paste from Flagger; change it to {API_VERSION}"
            ),
            WarningKind::OtherProvider { provider } => write!(
                f,
                "{path}: has no effect with Istio (it is for {provider}), ignored"
            ),
            WarningKind::Ignored { why } => write!(f, "{path}: ignored, {why}"),
        }
    }
}

/// A valid Canary: the plan, and the warnings to log once.
#[derive(Debug, Clone, PartialEq)]
pub struct Compiled {
    /// The checked plan.
    pub plan: CanaryPlan,
    /// Fields accepted without effect (not supported yet, unknown, deprecated, ignored).
    pub warnings: Vec<Warning>,
}

impl Canary {
    /// Applies Flagger's defaults and checks every field. On success returns the plan with the
    /// warnings the caller should log once; on failure, every problem found.
    pub fn compile(&self) -> Result<Compiled, ValidationErrors> {
        let mut cx = Checker::default();
        let plan = cx.canary(self);
        let canary = format!(
            "{}.{}",
            if self.metadata.name.is_empty() {
                "<unnamed>"
            } else {
                &self.metadata.name
            },
            self.metadata.namespace.as_deref().unwrap_or("default")
        );
        if cx.errors.is_empty() {
            Ok(Compiled {
                plan,
                warnings: cx.warnings,
            })
        } else {
            Err(ValidationErrors {
                canary,
                errors: cx.errors,
            })
        }
    }
}

/// Collects problems while building a plan; builders return placeholder values after an error so
/// that validation goes on and reports everything at once.
#[derive(Default)]
struct Checker {
    errors: Vec<FieldError>,
    warnings: Vec<Warning>,
}

impl Checker {
    fn error(&mut self, path: impl Into<String>, rule: Rule) {
        self.errors.push(FieldError {
            path: path.into(),
            rule,
        });
    }

    fn warn(&mut self, path: impl Into<String>, kind: WarningKind) {
        self.warnings.push(Warning {
            path: path.into(),
            kind,
        });
    }

    fn unknown(&mut self, path: &str, unknown: &Unknown) {
        for key in unknown.keys() {
            self.warn(join(path, key), WarningKind::UnknownField);
        }
    }

    fn other_provider(&mut self, path: &str, value: &Option<Value>, provider: &'static str) {
        if value.is_some() {
            self.warn(path, WarningKind::OtherProvider { provider });
        }
    }

    fn duration(&mut self, path: &str, text: Option<&str>, default: Duration) -> Duration {
        let Some(text) = text else { return default };
        match parse_go_duration(text) {
            Ok(d) if d.is_zero() => {
                self.error(
                    path,
                    Rule::ZeroDuration {
                        got: text.to_string(),
                    },
                );
                default
            }
            Ok(d) => d,
            Err(reason) => {
                self.error(
                    path,
                    Rule::BadDuration {
                        got: text.to_string(),
                        reason,
                    },
                );
                default
            }
        }
    }

    /// A weight field where 0 (or unset) means "not set", as in Flagger.
    fn optional_weight(&mut self, path: &str, v: Option<i64>) -> Option<Weight> {
        match v {
            Some(0) => None,
            other => self.weight(path, other),
        }
    }

    /// A weight of 1 to 100, if set (0 moves no traffic: out of range, not "missing").
    fn weight(&mut self, path: &str, v: Option<i64>) -> Option<Weight> {
        match v {
            None => None,
            Some(p) => match Weight::try_new(p) {
                Ok(w) if w > Weight::ZERO => Some(w),
                _ => {
                    self.error(
                        path,
                        Rule::OutOfRange {
                            min: 1,
                            max: 100,
                            got: p,
                        },
                    );
                    None
                }
            },
        }
    }

    fn percent(&mut self, path: &str, v: Option<i64>, default: Weight) -> Weight {
        match v {
            None => default,
            Some(p) if (1..=100).contains(&p) => Weight::try_new(p).unwrap_or(default),
            Some(p) => {
                self.error(
                    path,
                    Rule::OutOfRange {
                        min: 1,
                        max: 100,
                        got: p,
                    },
                );
                default
            }
        }
    }

    fn count(&mut self, path: &str, v: Option<i64>) -> u32 {
        match v {
            None => 0,
            Some(n) => u32::try_from(n).unwrap_or_else(|_| {
                self.error(
                    path,
                    Rule::OutOfRange {
                        min: 0,
                        max: i64::from(u32::MAX),
                        got: n,
                    },
                );
                0
            }),
        }
    }

    fn canary(&mut self, c: &Canary) -> CanaryPlan {
        match c.api_version.as_str() {
            API_VERSION => {}
            FLAGGER_API_VERSION => self.warn("apiVersion", WarningKind::FlaggerApiVersion),
            "" => self.error(
                "apiVersion",
                Rule::Required {
                    hint: format!("write apiVersion: {API_VERSION}"),
                },
            ),
            other => self.error(
                "apiVersion",
                Rule::NotOneOf {
                    got: other.to_string(),
                    expected: format!("{API_VERSION} (or {FLAGGER_API_VERSION})"),
                },
            ),
        }
        match c.kind.as_str() {
            "Canary" => {}
            "" => self.error(
                "kind",
                Rule::Required {
                    hint: "write kind: Canary".into(),
                },
            ),
            other => self.error(
                "kind",
                Rule::NotOneOf {
                    got: other.to_string(),
                    expected: "Canary".into(),
                },
            ),
        }
        self.unknown("", &c.unknown);
        if c.metadata.name.is_empty() {
            self.error(
                "metadata.name",
                Rule::Required {
                    hint: "name the Canary, usually after its target".into(),
                },
            );
        }
        let namespace = c
            .metadata
            .namespace
            .clone()
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| "default".to_string());
        self.spec(&c.spec, c.metadata.name.clone(), namespace)
    }

    fn spec(&mut self, s: &CanarySpec, name: String, namespace: String) -> CanaryPlan {
        self.unknown("spec", &s.unknown);
        match s.provider.as_deref() {
            None => {}
            Some(p) if PROVIDERS.contains(&p) => {}
            Some(other) => self.error(
                "spec.provider",
                Rule::NotOneOf {
                    got: other.to_string(),
                    expected: "`istio` or no provider (Weir splits traffic in its Envoy filter)"
                        .into(),
                },
            ),
        }
        let target = self.target(s.target_ref.as_ref());
        let autoscaler = s.autoscaler_ref.as_ref().map(|r| self.autoscaler(r));
        for (path, v, provider) in [
            ("spec.ingressRef", &s.ingress_ref, "NGINX ingress"),
            ("spec.routeRef", &s.route_ref, "APISIX"),
            ("spec.upstreamRef", &s.upstream_ref, "Gloo"),
        ] {
            self.other_provider(path, v, provider);
        }
        let service = self.service(s.service.as_ref(), &target.name);
        let progress_deadline = match s.progress_deadline_seconds {
            None => DEFAULT_PROGRESS_DEADLINE,
            Some(n) if n >= 1 => Duration::from_secs(n.unsigned_abs()),
            Some(n) => {
                self.error(
                    "spec.progressDeadlineSeconds",
                    Rule::TooSmall { min: 1, got: n },
                );
                DEFAULT_PROGRESS_DEADLINE
            }
        };
        let analysis = match (&s.analysis, &s.canary_analysis) {
            (Some(a), other) => {
                if other.is_some() {
                    self.warn(
                        "spec.canaryAnalysis",
                        WarningKind::Ignored {
                            why: "spec.analysis is set and takes precedence".into(),
                        },
                    );
                }
                self.analysis("spec.analysis", a, s.skip_analysis, &namespace)
            }
            (None, Some(a)) => {
                self.warn(
                    "spec.canaryAnalysis",
                    WarningKind::Deprecated {
                        instead: "spec.analysis",
                    },
                );
                self.analysis("spec.canaryAnalysis", a, s.skip_analysis, &namespace)
            }
            (None, None) => {
                if !s.skip_analysis {
                    self.error(
                        "spec.analysis",
                        Rule::Required {
                            hint: "set interval, threshold and stepWeight, stepWeights or \
                                   iterations (or set spec.skipAnalysis: true)"
                                .into(),
                        },
                    );
                }
                self.analysis(
                    "spec.analysis",
                    &CanaryAnalysis::default(),
                    true,
                    &namespace,
                )
            }
        };
        CanaryPlan {
            name,
            namespace,
            target,
            service,
            analysis,
            progress_deadline,
            skip_analysis: s.skip_analysis,
            revert_on_deletion: s.revert_on_deletion,
            suspend: s.suspend,
            provider: s.provider.clone(),
            metrics_server: s.metrics_server.clone().filter(|m| !m.is_empty()),
            autoscaler,
            canary_route_value: super::DEFAULT_CANARY_ROUTE_VALUE.to_owned(),
        }
    }

    fn target(&mut self, r: Option<&ObjectReference>) -> Target {
        let path = "spec.targetRef";
        let Some(r) = r else {
            self.error(
                path,
                Rule::Required {
                    hint: "name the workload to roll out, e.g. {apiVersion: apps/v1, kind: Deployment, name: mhs}".into(),
                },
            );
            return Target {
                api_version: String::new(),
                kind: String::new(),
                name: String::new(),
            };
        };
        self.unknown(path, &r.unknown);
        if r.namespace.is_some() {
            self.warn(
                "spec.targetRef.namespace",
                WarningKind::Ignored {
                    why: "the target is always in the Canary's namespace".into(),
                },
            );
        }
        let name = r.name.clone().unwrap_or_default();
        if name.is_empty() {
            self.error(
                "spec.targetRef.name",
                Rule::Required {
                    hint: "the name of the workload to roll out".into(),
                },
            );
        }
        let kind = r.kind.clone().unwrap_or_default();
        match kind.as_str() {
            "" => self.error(
                "spec.targetRef.kind",
                Rule::Required {
                    hint: "Deployment (the kind of workload Weir rolls out)".into(),
                },
            ),
            k if TARGET_KINDS.contains(&k) => {}
            "DaemonSet" => self.error(
                "spec.targetRef.kind",
                Rule::Unsupported {
                    why: "Weir rolls out Deployments only. A DaemonSet runs one pod per node and \
                          cannot be scaled to zero or split by replicas; Flagger parks it with a \
                          node selector no node has, which Weir does not do. Roll it out as a \
                          Deployment, or keep Flagger for this workload"
                        .into(),
                },
            ),
            "Service" => self.error(
                "spec.targetRef.kind",
                Rule::Unsupported {
                    why: "Weir rolls out Deployments only: it builds the primary from the \
                          target's pod template. Flagger's Service targets (traffic moved \
                          between two Services someone else deploys) have no pods for Weir to \
                          copy; name the Deployment behind the Service instead"
                        .into(),
                },
            ),
            other => self.error(
                "spec.targetRef.kind",
                Rule::NotOneOf {
                    got: other.to_string(),
                    expected: "Deployment".into(),
                },
            ),
        }
        let api_version = r
            .api_version
            .clone()
            .filter(|v| !v.is_empty())
            .unwrap_or_else(|| match kind.as_str() {
                "Service" => "v1".to_string(),
                _ => "apps/v1".to_string(),
            });
        Target {
            api_version,
            kind,
            name,
        }
    }

    fn autoscaler(&mut self, r: &AutoscalerReference) -> AutoscalerPlan {
        let path = "spec.autoscalerRef";
        self.unknown(path, &r.unknown);
        let kind = match r.kind.as_deref().unwrap_or_default() {
            "HorizontalPodAutoscaler" => AutoscalerKind::HorizontalPodAutoscaler,
            "ScaledObject" => AutoscalerKind::ScaledObject,
            "" => {
                self.error(
                    join(path, "kind"),
                    Rule::Required {
                        hint: "HorizontalPodAutoscaler (autoscaling/v2) or ScaledObject \
                               (keda.sh/v1alpha1)"
                            .into(),
                    },
                );
                AutoscalerKind::HorizontalPodAutoscaler
            }
            other => {
                self.error(
                    join(path, "kind"),
                    Rule::NotOneOf {
                        got: other.to_string(),
                        expected: AUTOSCALER_KINDS.join(" or "),
                    },
                );
                AutoscalerKind::HorizontalPodAutoscaler
            }
        };
        let name = r.name.clone().unwrap_or_default();
        if name.is_empty() {
            self.error(
                join(path, "name"),
                Rule::Required {
                    hint: "the name of the target's autoscaler".into(),
                },
            );
        }
        if kind == AutoscalerKind::HorizontalPodAutoscaler && !r.primary_scaler_queries.is_empty() {
            self.warn(
                join(path, "primaryScalerQueries"),
                WarningKind::Ignored {
                    why: "it applies to a ScaledObject's triggers, not to a \
                          HorizontalPodAutoscaler"
                        .into(),
                },
            );
        }
        let (mut min, mut max) = (None, None);
        if let Some(replicas) = &r.primary_scaler_replicas {
            let rp = join(path, "primaryScalerReplicas");
            self.unknown(&rp, &replicas.unknown);
            let mut bounded = |field: &str, v: Option<i64>, lowest: i64| {
                let n = v?;
                match i32::try_from(n) {
                    Ok(n) if i64::from(n) >= lowest => Some(n),
                    _ => {
                        self.error(
                            join(&rp, field),
                            Rule::OutOfRange {
                                min: lowest,
                                max: i64::from(i32::MAX),
                                got: n,
                            },
                        );
                        None
                    }
                }
            };
            min = bounded("minReplicas", replicas.min_replicas, 0);
            max = bounded("maxReplicas", replicas.max_replicas, 1);
            if let (Some(lo), Some(hi)) = (min, max) {
                if lo > hi {
                    self.error(
                        rp,
                        Rule::Invalid(format!(
                            "minReplicas ({lo}) must not be above maxReplicas ({hi})"
                        )),
                    );
                }
            }
        }
        AutoscalerPlan {
            kind,
            name,
            primary_min_replicas: min,
            primary_max_replicas: max,
            primary_queries: r.primary_scaler_queries.clone(),
        }
    }

    fn metadata(&mut self, path: &str, m: Option<&CustomMetadata>) -> ObjectMetadata {
        let Some(m) = m else {
            return ObjectMetadata::default();
        };
        self.unknown(path, &m.unknown);
        ObjectMetadata {
            labels: m.labels.clone(),
            annotations: m.annotations.clone(),
        }
    }

    fn port(&mut self, path: &str, n: i64) -> u16 {
        match u16::try_from(n) {
            Ok(p) if p > 0 => p,
            _ => {
                self.error(
                    path,
                    Rule::OutOfRange {
                        min: 1,
                        max: 65535,
                        got: n,
                    },
                );
                0
            }
        }
    }

    fn service(&mut self, s: Option<&CanaryService>, target_name: &str) -> ServicePlan {
        let path = "spec.service";
        let empty = CanaryService::default();
        let s = match s {
            Some(s) => s,
            None => {
                self.error(
                    path,
                    Rule::Required {
                        hint: "set at least spec.service.port".into(),
                    },
                );
                &empty
            }
        };
        self.unknown(path, &s.unknown);
        let port = match s.port {
            Some(p) => self.port("spec.service.port", p),
            None => {
                if !std::ptr::eq(s, &empty) {
                    self.error(
                        "spec.service.port",
                        Rule::Required {
                            hint: "the port of the generated service, e.g. 80".into(),
                        },
                    );
                }
                0
            }
        };
        let target_port = match &s.target_port {
            None => PortRef::Number(port),
            Some(IntOrString::Int(n)) => PortRef::Number(self.port("spec.service.targetPort", *n)),
            Some(IntOrString::String(name)) if !name.is_empty() => PortRef::Name(name.clone()),
            Some(IntOrString::String(_)) => {
                self.error(
                    "spec.service.targetPort",
                    Rule::Invalid("must be a port number or a non-empty port name".into()),
                );
                PortRef::Number(port)
            }
        };
        let app_protocol = s.app_protocol.clone().filter(|p| !p.is_empty());
        if app_protocol
            .as_deref()
            .is_some_and(|p| p.eq_ignore_ascii_case("tcp"))
        {
            self.error(
                "spec.service.appProtocol",
                Rule::Unsupported {
                    why: "Weir splits and measures HTTP requests in its Envoy filter, which \
                          never sees raw TCP; Flagger's TCP routes (VirtualService weights and \
                          Prometheus' TCP metrics) are not implemented. Remove appProtocol, or \
                          set it to http, http2 or grpc"
                        .into(),
                },
            );
        }
        let routes = super::routes::compile(s, path);
        for (field, why) in routes.errors {
            self.error(field, Rule::Invalid(why));
        }
        for field in routes.unknown {
            self.warn(field, WarningKind::UnknownField);
        }
        for (field, v, provider) in [
            ("backendTimeout", &s.backend_timeout, "Gateway API"),
            ("meshName", &s.mesh_name, "App Mesh"),
            ("backends", &s.backends, "App Mesh"),
            ("mirror", &s.mirror, "Gateway API"),
            ("gatewayRefs", &s.gateway_refs, "Gateway API"),
        ] {
            self.other_provider(&join(path, field), v, provider);
        }
        if s.delegation && !s.gateways.is_empty() {
            self.error(
                "spec.service.gateways",
                Rule::Invalid(
                    "a delegate VirtualService (spec.service.delegation: true) has no \
                     gateways: the root VirtualService that delegates to it names them; remove \
                     spec.service.gateways or set delegation to false"
                        .into(),
                ),
            );
        }
        let apex = self.metadata("spec.service.apex", s.apex.as_ref());
        let primary = self.metadata("spec.service.primary", s.primary.as_ref());
        let canary = self.metadata("spec.service.canary", s.canary.as_ref());
        let unmanaged = match &s.unmanaged_metadata {
            None => ObjectMetadataKeys::default(),
            Some(u) => {
                self.unknown("spec.service.unmanagedMetadata", &u.unknown);
                ObjectMetadataKeys {
                    labels: u.labels.clone(),
                    annotations: u.annotations.clone(),
                }
            }
        };
        let name = s
            .name
            .clone()
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| target_name.to_string());
        for (i, h) in s.hosts.iter().enumerate() {
            if h.trim().is_empty() {
                self.error(
                    format!("spec.service.hosts[{i}]"),
                    Rule::Invalid("must not be empty".into()),
                );
            }
        }
        let hosts = if s.hosts.is_empty() {
            vec![name.clone()]
        } else {
            s.hosts.clone()
        };
        ServicePlan {
            port_name: s
                .port_name
                .clone()
                .filter(|n| !n.is_empty())
                .unwrap_or_else(|| "http".to_string()),
            name,
            port,
            target_port,
            hosts,
            gateways: s.gateways.clone(),
            app_protocol,
            port_discovery: s.port_discovery,
            traffic_distribution: s.traffic_distribution.clone().filter(|t| !t.is_empty()),
            headless: s.headless,
            traffic_policy: s.traffic_policy.clone(),
            apex,
            primary,
            canary,
            unmanaged,
            delegation: s.delegation,
            routes: routes.options,
        }
    }

    fn analysis(
        &mut self,
        path: &str,
        a: &CanaryAnalysis,
        skip_analysis: bool,
        namespace: &str,
    ) -> AnalysisPlan {
        let p = |field: &str| join(path, field);
        self.unknown(path, &a.unknown);
        let interval = self.duration(&p("interval"), a.interval.as_deref(), DEFAULT_INTERVAL);
        let threshold = match a.threshold {
            None | Some(0) => NonZeroU32::MIN,
            Some(n) => match u32::try_from(n).ok().and_then(NonZeroU32::new) {
                Some(t) => t,
                None => {
                    self.error(p("threshold"), Rule::TooSmall { min: 1, got: n });
                    NonZeroU32::MIN
                }
            },
        };
        let iterations = match a.iterations {
            Some(n) if n < 0 => {
                self.error(p("iterations"), Rule::TooSmall { min: 0, got: n });
                None
            }
            other => NonZeroU32::new(self.count(&p("iterations"), other)),
        };
        let step_weight = self.weight(&p("stepWeight"), a.step_weight);
        let max_weight = self.weight(&p("maxWeight"), a.max_weight);
        let step_weights = a.step_weights.as_ref().map(|list| {
            let mut ws = Vec::new();
            for (i, v) in list.iter().enumerate() {
                match Weight::try_new(*v) {
                    Ok(w) if w > Weight::ZERO => ws.push(w),
                    _ => self.error(
                        format!("{}[{i}]", p("stepWeights")),
                        Rule::OutOfRange {
                            min: 1,
                            max: 100,
                            got: *v,
                        },
                    ),
                }
            }
            if ws.len() == list.len() && !list.windows(2).all(|w| w[0] < w[1]) {
                self.error(p("stepWeights"), Rule::NotIncreasing { got: list.clone() });
            }
            ws
        });
        let step_weight_promotion =
            self.optional_weight(&p("stepWeightPromotion"), a.step_weight_promotion);
        if a.mirror == Some(true) {
            self.error(
                p("mirror"),
                Rule::Unsupported {
                    why: MIRROR_REFUSED.into(),
                },
            );
        }
        if a.mirror_weight.is_some() && a.mirror != Some(true) {
            self.warn(
                p("mirrorWeight"),
                ignored_kind("mirrorWeight is the share of traffic mirrored with mirror: true"),
            );
        }
        let alerts = self.alerts(&p("alerts"), &a.alerts, namespace);
        let primary_ready_threshold = self.percent(
            &p("primaryReadyThreshold"),
            a.primary_ready_threshold,
            Weight::FULL,
        );
        let canary_ready_threshold = self.percent(
            &p("canaryReadyThreshold"),
            a.canary_ready_threshold,
            Weight::FULL,
        );
        let matches = a
            .matches
            .as_ref()
            .map(|m| self.matches(&p("match"), m))
            .unwrap_or_default();

        let ignored = |why: &str| WarningKind::Ignored { why: why.into() };
        let strategy = if let Some(iterations) = iterations {
            for (field, set) in [
                ("stepWeight", a.step_weight.is_some()),
                ("stepWeights", a.step_weights.is_some()),
                ("maxWeight", a.max_weight.is_some()),
            ] {
                if set {
                    self.warn(
                        p(field),
                        ignored("iterations is set, so traffic does not shift by weight"),
                    );
                }
            }
            if matches.is_empty() {
                Strategy::BlueGreen { iterations }
            } else {
                if step_weight_promotion.is_some() {
                    self.warn(
                        p("stepWeightPromotion"),
                        ignored("an A/B test is promoted in one step"),
                    );
                }
                Strategy::AbTesting {
                    iterations,
                    matches,
                }
            }
        } else {
            if !matches.is_empty() {
                self.warn(
                    p("match"),
                    ignored("match is used only with iterations (A/B testing)"),
                );
            }
            let steps = match (step_weight, step_weights) {
                (Some(step), Some(list)) => {
                    // Flagger's maxWeight() is the last stepWeights entry whenever the list is
                    // set, while stepWeight sizes the steps.
                    self.warn(
                        p("stepWeights"),
                        ignored("stepWeight is set and takes precedence, except that the last entry is the maximum weight, as in Flagger"),
                    );
                    if max_weight.is_some() {
                        self.warn(
                            p("maxWeight"),
                            ignored("with stepWeights the last entry is the maximum weight"),
                        );
                    }
                    let max = list.last().copied().or(max_weight).unwrap_or(Weight::FULL);
                    Steps::linear(step, max)
                }
                (Some(step), None) => Steps::linear(step, max_weight.unwrap_or(Weight::FULL)),
                (None, Some(list)) => {
                    if max_weight.is_some() {
                        self.warn(
                            p("maxWeight"),
                            ignored("with stepWeights the last entry is the maximum weight"),
                        );
                    }
                    Steps::explicit(list)
                }
                (None, None) => {
                    // An invalid stepWeight/stepWeights was reported already.
                    let written = a.step_weight.is_some() || a.step_weights.is_some();
                    if !skip_analysis && !written {
                        self.error(
                            path,
                            Rule::Required {
                                hint: "set stepWeight or stepWeights (progressive canary), or \
                                       iterations (A/B testing with match, or blue/green)"
                                    .into(),
                            },
                        );
                    }
                    None
                }
            };
            // `None` only after an error was recorded, or with skipAnalysis where steps are unused.
            Strategy::Canary {
                steps: steps.unwrap_or_else(Steps::all_at_once),
            }
        };

        let mut names = BTreeSet::new();
        let mut metrics = Vec::new();
        for (i, m) in a.metrics.iter().enumerate() {
            let mpath = format!("{}[{i}]", p("metrics"));
            if !m.name.is_empty() && !names.insert(m.name.clone()) {
                self.error(
                    format!("{mpath}.name"),
                    Rule::Duplicate {
                        name: m.name.clone(),
                    },
                );
            }
            if let Some(check) = self.metric(&mpath, m, namespace) {
                metrics.push(check);
            }
        }

        let mut hook_names = BTreeSet::new();
        let mut webhooks = Vec::new();
        for (i, w) in a.webhooks.iter().enumerate() {
            let wpath = format!("{}[{i}]", p("webhooks"));
            if !w.name.is_empty() && !hook_names.insert(w.name.clone()) {
                self.error(
                    format!("{wpath}.name"),
                    Rule::Duplicate {
                        name: w.name.clone(),
                    },
                );
            }
            if let Some(hook) = self.webhook(&wpath, w) {
                webhooks.push(hook);
            }
        }

        let session_affinity = a.session_affinity.as_ref().and_then(|sa| {
            let sp = p("sessionAffinity");
            for key in sa.other.keys() {
                self.warn(join(&sp, key), WarningKind::UnknownField);
            }
            let cookie_name = sa.cookie_name.clone().unwrap_or_default();
            if cookie_name.is_empty() {
                self.error(
                    join(&sp, "cookieName"),
                    Rule::Required {
                        hint: "the name of the session affinity cookie".into(),
                    },
                );
            } else if let Err(why) = cookie_name_ok(&cookie_name) {
                self.error(join(&sp, "cookieName"), Rule::Invalid(why));
            }
            let primary_cookie_name = sa.primary_cookie_name.clone().filter(|n| !n.is_empty());
            if let Some(name) = &primary_cookie_name {
                if let Err(why) = cookie_name_ok(name) {
                    self.error(join(&sp, "primaryCookieName"), Rule::Invalid(why));
                } else if *name == cookie_name {
                    self.error(
                        join(&sp, "primaryCookieName"),
                        Rule::Invalid("must differ from cookieName".into()),
                    );
                }
            }
            let max_age = match sa.max_age {
                None => Duration::from_secs(86_400),
                Some(n) if n >= 1 => Duration::from_secs(n.unsigned_abs()),
                Some(n) => {
                    self.error(join(&sp, "maxAge"), Rule::TooSmall { min: 1, got: n });
                    Duration::from_secs(86_400)
                }
            };
            if !matches!(strategy, Strategy::Canary { .. }) {
                // Flagger sets the cookies only while traffic shifts by weight: an A/B test
                // routes by its match, and blue/green moves all traffic at once.
                self.warn(
                    &sp,
                    ignored_kind("session affinity applies to progressive traffic shifting (stepWeight or stepWeights), not to iterations"),
                );
                return None;
            }
            Some(SessionAffinityPlan {
                cookie_name,
                max_age,
                primary_cookie_name,
            })
        });

        let min_sample_count = match a.min_sample_count {
            None => DEFAULT_MIN_SAMPLE_COUNT,
            Some(n) if n >= 0 => n.unsigned_abs(),
            Some(n) => {
                self.error(p("minSampleCount"), Rule::TooSmall { min: 0, got: n });
                DEFAULT_MIN_SAMPLE_COUNT
            }
        };

        let inconclusive_limit = match a.inconclusive_limit {
            None => NonZeroU32::new(DEFAULT_INCONCLUSIVE_LIMIT),
            Some(n) if (0..=i64::from(u32::MAX)).contains(&n) => {
                NonZeroU32::new(u32::try_from(n).unwrap_or(u32::MAX))
            }
            Some(n) => {
                self.error(
                    p("inconclusiveLimit"),
                    Rule::OutOfRange {
                        min: 0,
                        max: i64::from(u32::MAX),
                        got: n,
                    },
                );
                NonZeroU32::new(DEFAULT_INCONCLUSIVE_LIMIT)
            }
        };

        let mut reporters = Vec::new();
        for (i, text) in a.reporters.iter().enumerate() {
            match crate::ingest::identity::ReporterRule::parse(text) {
                Ok(rule) => reporters.push(rule),
                Err(why) => self.error(format!("{}[{i}]", p("reporters")), Rule::Invalid(why)),
            }
        }

        let judge = a.judge.as_ref().map(|j| self.judge(&p("judge"), j));

        AnalysisPlan {
            interval,
            threshold,
            strategy,
            step_weight_promotion,
            metrics,
            webhooks,
            alerts,
            min_sample_count,
            inconclusive_counts_as_failure: a.inconclusive_counts_as_failure.unwrap_or(false),
            inconclusive_limit,
            primary_ready_threshold,
            canary_ready_threshold,
            session_affinity,
            reporters,
            judge,
        }
    }

    fn judge(&mut self, path: &str, j: &CanaryJudge) -> JudgePlan {
        let p = |field: &str| join(path, field);
        self.unknown(path, &j.unknown);
        let confidence = match j.confidence {
            None => DEFAULT_JUDGE_CONFIDENCE,
            Some(c) if c > 0.5 && c < 1.0 => c,
            Some(c) => {
                self.error(
                    p("confidence"),
                    Rule::Invalid(format!(
                        "must be above 0.5 and below 1 (0.99: a healthy canary is rolled back in at most 1% of rollouts), got {c}"
                    )),
                );
                DEFAULT_JUDGE_CONFIDENCE
            }
        };
        let mut ratio = |field: &str, value: Option<f64>| match value {
            Some(r) if !(r.is_finite() && r >= 1.0) => {
                self.error(
                    p(field),
                    Rule::Invalid(format!(
                        "must be a ratio of at least 1 (1.5: the canary may be up to 1.5 times worse than the primary), got {r}"
                    )),
                );
                None
            }
            other => other,
        };
        let error_ratio = ratio("errorRatio", j.error_ratio).unwrap_or(DEFAULT_JUDGE_ERROR_RATIO);
        let latency_ratio = ratio("latencyRatio", j.latency_ratio);
        JudgePlan {
            confidence,
            error_ratio,
            latency_ratio,
            require_pass: j.require_pass.unwrap_or(false),
        }
    }

    fn matches(&mut self, path: &str, list: &[MatchCondition]) -> Vec<MatchGroup> {
        let why = |what: &str| Rule::Unsupported {
            why: format!(
                "A/B routing matches request headers (and the cookie header) only, and ignoring \
                 this {what} would send other requests to the canary than intended"
            ),
        };
        let mut groups = Vec::new();
        for (i, m) in list.iter().enumerate() {
            let mp = format!("{path}[{i}]");
            if m.query_params.is_some() {
                self.error(join(&mp, "queryParams"), why("condition"));
            }
            if m.source_labels.is_some() {
                self.error(join(&mp, "sourceLabels"), why("condition"));
            }
            for key in m.unknown.keys() {
                self.error(join(&mp, key), why("condition"));
            }
            if m.headers.is_empty() {
                self.error(
                    join(&mp, "headers"),
                    Rule::Required {
                        hint: "at least one header condition, e.g. {x-canary: {exact: insider}}"
                            .into(),
                    },
                );
            }
            let mut headers = Vec::new();
            for (name, sm) in &m.headers {
                let hp = format!("{mp}.headers.{name}");
                for key in sm.unknown.keys() {
                    self.error(join(&hp, key), why("key"));
                }
                if sm.suffix.is_some() {
                    self.error(
                        join(&hp, "suffix"),
                        Rule::Unsupported {
                            why: "the filter matches exact, prefix or regex; write the suffix as \
                                  a regex ending in $"
                                .into(),
                        },
                    );
                }
                let set: Vec<StringMatcher> = [
                    sm.exact.clone().map(StringMatcher::Exact),
                    sm.prefix.clone().map(StringMatcher::Prefix),
                    sm.regex.clone().map(StringMatcher::Regex),
                ]
                .into_iter()
                .flatten()
                .collect();
                match <[StringMatcher; 1]>::try_from(set) {
                    Ok([value]) => headers.push(HeaderRule {
                        name: name.to_ascii_lowercase(),
                        value,
                    }),
                    Err(set) if set.is_empty() && sm.suffix.is_some() => {}
                    Err(_) => self.error(
                        hp,
                        Rule::Invalid("set exactly one of exact, prefix or regex".into()),
                    ),
                }
            }
            groups.push(MatchGroup { headers });
        }
        groups
    }

    fn metric(&mut self, path: &str, m: &CanaryMetric, namespace: &str) -> Option<MetricCheck> {
        self.unknown(path, &m.unknown);
        if m.name.is_empty() {
            self.error(
                join(path, "name"),
                Rule::Required {
                    hint: format!(
                        "`{REQUEST_SUCCESS_RATE}`, `{REQUEST_DURATION}`, or a name of your choice with templateRef"
                    ),
                },
            );
            return None;
        }
        let window = self.duration(
            &join(path, "interval"),
            m.interval.as_deref(),
            DEFAULT_METRIC_INTERVAL,
        );
        let kind = match (&m.template_ref, &m.query) {
            (Some(_), Some(_)) => {
                self.error(
                    path,
                    Rule::Invalid("set templateRef or query, not both".into()),
                );
                return None;
            }
            (Some(t), None) => {
                let tp = join(path, "templateRef");
                self.unknown(&tp, &t.unknown);
                let name = t.name.clone().unwrap_or_default();
                if name.is_empty() {
                    self.error(
                        join(&tp, "name"),
                        Rule::Required {
                            hint: "the MetricTemplate's name".into(),
                        },
                    );
                }
                MetricKind::Template {
                    name,
                    namespace: t
                        .namespace
                        .clone()
                        .filter(|n| !n.is_empty())
                        .unwrap_or_else(|| namespace.to_string()),
                }
            }
            (None, Some(q)) => {
                self.warn(
                    join(path, "query"),
                    WarningKind::Deprecated {
                        instead: "templateRef",
                    },
                );
                if q.trim().is_empty() {
                    self.error(
                        join(path, "query"),
                        Rule::Invalid("must not be empty".into()),
                    );
                }
                MetricKind::Query(q.clone())
            }
            (None, None) => match m.name.as_str() {
                REQUEST_SUCCESS_RATE => MetricKind::SuccessRate,
                REQUEST_DURATION => MetricKind::Duration,
                other => {
                    self.error(
                        join(path, "name"),
                        Rule::UnknownMetric {
                            name: other.to_string(),
                        },
                    );
                    return None;
                }
            },
        };
        let rpath = join(path, "thresholdRange");
        let (min, max) = match (&m.threshold_range, m.threshold) {
            (Some(r), deprecated) => {
                self.unknown(&rpath, &r.unknown);
                if deprecated.is_some() {
                    self.warn(
                        join(path, "threshold"),
                        WarningKind::Ignored {
                            why: "thresholdRange is set and takes precedence".into(),
                        },
                    );
                }
                (r.min, r.max)
            }
            (None, Some(t)) => {
                self.warn(
                    join(path, "threshold"),
                    WarningKind::Deprecated {
                        instead: "thresholdRange",
                    },
                );
                // Flagger reads the old single threshold as a minimum for the success rate and
                // as a maximum for everything else.
                match kind {
                    MetricKind::SuccessRate => (Some(t), None),
                    _ => (None, Some(t)),
                }
            }
            (None, None) => {
                self.error(
                    rpath,
                    Rule::Required {
                        hint: match kind {
                            MetricKind::SuccessRate => "e.g. {min: 99} (percent)".into(),
                            MetricKind::Duration => "e.g. {max: 500} (milliseconds)".into(),
                            _ => "set min and/or max".into(),
                        },
                    },
                );
                return None;
            }
        };
        let Some(range) = Range::try_new(min, max) else {
            self.error(
                rpath,
                Rule::Invalid("set min and/or max as finite numbers, with min <= max".into()),
            );
            return None;
        };
        let in_bounds = |lo: f64, hi: f64| {
            [range.min(), range.max()]
                .into_iter()
                .flatten()
                .all(|v| (lo..=hi).contains(&v))
        };
        match kind {
            MetricKind::SuccessRate if !in_bounds(0.0, 100.0) => self.error(
                rpath,
                Rule::Invalid(
                    "request-success-rate is a percentage: bounds must be within 0..100".into(),
                ),
            ),
            MetricKind::Duration if !in_bounds(0.0, f64::MAX) => self.error(
                rpath,
                Rule::Invalid(
                    "request-duration is in milliseconds: bounds must not be negative".into(),
                ),
            ),
            _ => {}
        }
        Some(MetricCheck {
            name: m.name.clone(),
            kind,
            range,
            window,
            template_variables: m.template_variables.clone(),
        })
    }

    fn alerts(&mut self, path: &str, list: &[CanaryAlert], namespace: &str) -> Vec<AlertPlan> {
        let mut names = BTreeSet::new();
        let mut alerts = Vec::new();
        for (i, alert) in list.iter().enumerate() {
            let apath = format!("{path}[{i}]");
            self.unknown(&apath, &alert.unknown);
            let reference = alert.provider_ref.clone().unwrap_or_default();
            self.unknown(&join(&apath, "providerRef"), &reference.unknown);
            if alert.name.is_empty() {
                self.error(
                    join(&apath, "name"),
                    Rule::Required {
                        hint: "a unique name for the alert".into(),
                    },
                );
            } else if !names.insert(alert.name.clone()) {
                self.error(
                    join(&apath, "name"),
                    Rule::Duplicate {
                        name: alert.name.clone(),
                    },
                );
            }
            let severity = alert.severity.as_deref().unwrap_or("");
            let Some(severity) = AlertSeverity::parse(severity) else {
                self.error(
                    join(&apath, "severity"),
                    Rule::NotOneOf {
                        got: severity.to_owned(),
                        expected: "info, warn or error".to_owned(),
                    },
                );
                continue;
            };
            let provider = reference.name.clone().unwrap_or_default();
            if provider.is_empty() {
                self.error(
                    join(&apath, "providerRef.name"),
                    Rule::Required {
                        hint: "the name of an AlertProvider".into(),
                    },
                );
                continue;
            }
            alerts.push(AlertPlan {
                name: alert.name.clone(),
                severity,
                provider_namespace: reference
                    .namespace
                    .clone()
                    .filter(|n| !n.is_empty())
                    .unwrap_or_else(|| namespace.to_owned()),
                provider_name: provider,
            });
        }
        alerts
    }

    fn webhook(&mut self, path: &str, w: &CanaryWebhook) -> Option<Webhook> {
        self.unknown(path, &w.unknown);
        let name_ok = !w.name.is_empty();
        if !name_ok {
            self.error(
                join(path, "name"),
                Rule::Required {
                    hint: "a unique name for the webhook".into(),
                },
            );
        }
        let kind = match HookKind::parse(w.kind.as_deref().unwrap_or("")) {
            Some(k) => k,
            None => {
                self.error(
                    join(path, "type"),
                    Rule::NotOneOf {
                        got: w.kind.clone().unwrap_or_default(),
                        expected: HookKind::ALL.map(|(_, s)| s).join(", "),
                    },
                );
                return None;
            }
        };
        let url = w.url.clone().unwrap_or_default();
        if url.is_empty() {
            self.error(
                join(path, "url"),
                Rule::Required {
                    hint: "the http(s) URL to POST to".into(),
                },
            );
        } else if !(url.starts_with("http://") || url.starts_with("https://")) {
            self.error(
                join(path, "url"),
                Rule::Invalid(format!("`{url}` must start with http:// or https://")),
            );
        }
        let timeout = self.duration(
            &join(path, "timeout"),
            w.timeout.as_deref(),
            DEFAULT_WEBHOOK_TIMEOUT,
        );
        let retries = match w.retries {
            Some(n) if n < 0 => {
                self.error(join(path, "retries"), Rule::TooSmall { min: 0, got: n });
                0
            }
            other => self.count(&join(path, "retries"), other),
        };
        name_ok.then(|| Webhook {
            name: w.name.clone(),
            kind,
            url,
            timeout,
            metadata: w.metadata.clone(),
            retries,
            disable_tls: w.disable_tls,
            mute_alert: w.mute_alert,
        })
    }
}

/// Why `spec.analysis.mirror` is refused.
pub const MIRROR_REFUSED: &str = "Weir measures the canary in the callers' filters, and a \
    mirrored request's answer from the canary never reaches the caller (Envoy drops it), so \
    the analysis would judge the canary without the mirrored traffic; run blue/green without \
    mirror (iterations, the canary tested by webhooks), or progressive traffic shifting";

fn ignored_kind(why: &str) -> WarningKind {
    WarningKind::Ignored { why: why.into() }
}

/// A cookie name must be an RFC 6265 token: visible ASCII without separators.
fn cookie_name_ok(name: &str) -> Result<(), String> {
    let bad = name
        .chars()
        .find(|c| !c.is_ascii_graphic() || "()<>@,;:\\\"/[]?={}".contains(*c));
    match bad {
        None => Ok(()),
        Some(c) => Err(format!(
            "`{name}` is not a cookie name: {c:?} is not allowed (use letters, digits and -_.)"
        )),
    }
}

fn join(path: &str, field: &str) -> String {
    if path.is_empty() {
        field.to_string()
    } else {
        format!("{path}.{field}")
    }
}
