//! The MetricTemplate resource: Flagger's `v1beta1` shape (a provider and a query with template
//! variables), referenced by `spec.analysis.metrics[].templateRef`.
//!
//! ```yaml
//! apiVersion: weir.dev/v1alpha1          # or flagger.app/v1beta1, pasted from Flagger
//! kind: MetricTemplate
//! metadata: {name: not-found-percentage, namespace: application}
//! spec:
//!   provider:
//!     type: prometheus                   # the only provider Weir has; anything else is an error
//!     address: http://prometheus:9090    # optional: else the Canary's metricsServer, else the
//!                                        # controller's --prometheus-address
//!     secretRef: {name: prom-auth}       # optional: `username` + `password`, or `token`
//!   query: |
//!     100 - sum(rate(http_requests_total{namespace="{{ namespace }}",app="{{ target }}",
//!       status!="{{ variables.code }}"}[{{ interval }}])) / ...
//! ```
//!
//! The query is a Go template as Flagger writes them, restricted to Flagger's model: `{{ name }}`
//! (the Canary), `{{ namespace }}`, `{{ target }}` (targetRef.name), `{{ service }}`,
//! `{{ ingress }}`, `{{ interval }}` (the metric's window as a Prometheus duration) and
//! `{{ variables.X }}` (the metric's `templateVariables`). Anything else inside `{{ }}` is refused
//! when the template is loaded, and so is a variable a Canary does not define, instead of
//! Flagger's `<no value>` reaching Prometheus.

use super::resource::{ObjectMeta, Unknown};
use super::validate::{API_VERSION, FLAGGER_API_VERSION};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// The provider type Weir implements.
pub const PROMETHEUS_PROVIDER: &str = "prometheus";

/// A MetricTemplate resource as written.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MetricTemplate {
    /// `weir.dev/v1alpha1` (or `flagger.app/v1beta1`).
    #[serde(default)]
    pub api_version: String,
    /// Always `MetricTemplate`.
    #[serde(default)]
    pub kind: String,
    /// Name and namespace.
    #[serde(default)]
    pub metadata: ObjectMeta,
    /// Provider and query.
    #[serde(default)]
    pub spec: MetricTemplateSpec,
    /// Top-level keys Flagger does not know.
    #[serde(flatten)]
    pub unknown: Unknown,
}

/// `spec` of a MetricTemplate. The `#[schemars]` attributes put what validation requires into
/// the CRD schema.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("required" = ["provider", "query"]))]
pub struct MetricTemplateSpec {
    /// Where the query runs.
    #[serde(default, skip_serializing_if = "MetricTemplateProvider::is_unset")]
    pub provider: MetricTemplateProvider,
    /// The query, a Go-style template.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    #[schemars(length(min = 1))]
    pub query: String,
    /// Keys Flagger does not know.
    #[serde(flatten)]
    pub unknown: Unknown,
}

/// `spec.provider` of a MetricTemplate.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("required" = ["type"]))]
pub struct MetricTemplateProvider {
    /// Provider type; Weir implements `prometheus`.
    #[serde(default, rename = "type", skip_serializing_if = "String::is_empty")]
    #[schemars(extend("enum" = [PROMETHEUS_PROVIDER]))]
    pub kind: String,
    /// The provider's HTTP address, like `http://prometheus.istio-system:9090`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// A Secret (in the template's namespace) with `username` and `password`, or `token`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<LocalObjectReference>,
    /// Skip TLS verification of an `https://` address (for a self-signed Prometheus; prefer
    /// trusting its CA with the controller's `--ca-file`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub insecure_skip_verify: bool,
    /// Keys Flagger does not know.
    #[serde(flatten)]
    pub unknown: Unknown,
}

impl MetricTemplateProvider {
    /// Nothing set (also why the CRD schema has no `default` for it: an empty provider would
    /// break its own `required`).
    fn is_unset(&self) -> bool {
        *self == Self::default()
    }
}

/// A reference to an object in the same namespace (Kubernetes `LocalObjectReference`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("required" = ["name"]))]
pub struct LocalObjectReference {
    /// The object's name.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    #[schemars(length(min = 1))]
    pub name: String,
}

/// A checked MetricTemplate.
#[derive(Debug, Clone, PartialEq)]
pub struct TemplatePlan {
    /// The template's name.
    pub name: String,
    /// The template's namespace.
    pub namespace: String,
    /// Where the query runs.
    pub provider: ProviderPlan,
    /// The parsed query.
    pub query: QueryTemplate,
}

impl TemplatePlan {
    /// `namespace/name`, how messages name the template.
    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// A checked provider.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderPlan {
    /// The provider type.
    pub kind: ProviderKind,
    /// Its address, if the template names one.
    pub address: Option<String>,
    /// The name of the Secret holding its credentials, if any.
    pub secret_ref: Option<String>,
    /// Skip TLS verification of an https address.
    pub insecure_skip_verify: bool,
}

/// The provider types Weir implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProviderKind {
    /// The Prometheus HTTP API (`/api/v1/query`).
    Prometheus,
}

/// Why a MetricTemplate cannot be used; names the template and every problem.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("MetricTemplate {template} is invalid: {}", problems.join("; "))]
pub struct TemplateError {
    /// `namespace/name` of the template (as far as it could be read).
    pub template: String,
    /// Each problem, as `path: what is wrong`.
    pub problems: Vec<String>,
}

impl MetricTemplate {
    /// Checks the template; a missing namespace becomes `default_namespace` (where the template
    /// was found). Returns the plan and warnings (unknown keys, settings without effect).
    pub fn compile(
        &self,
        default_namespace: &str,
    ) -> Result<(TemplatePlan, Vec<String>), TemplateError> {
        let namespace = self
            .metadata
            .namespace
            .clone()
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| default_namespace.to_owned());
        let name = self.metadata.name.clone();
        let mut problems = Vec::new();
        let mut warnings = Vec::new();
        if self.api_version != API_VERSION && self.api_version != FLAGGER_API_VERSION {
            problems.push(format!(
                "apiVersion: must be {API_VERSION} (or {FLAGGER_API_VERSION}), got `{}`",
                self.api_version
            ));
        }
        if self.kind != "MetricTemplate" {
            problems.push(format!("kind: must be MetricTemplate, got `{}`", self.kind));
        }
        if name.is_empty() {
            problems.push("metadata.name: is required".to_owned());
        }
        let unknown = |path: &str, keys: &Unknown, warnings: &mut Vec<String>| {
            for key in keys.keys() {
                warnings.push(format!(
                    "{path}{key}: unknown field (not in Flagger's MetricTemplate schema), ignored"
                ));
            }
        };
        unknown("", &self.unknown, &mut warnings);
        unknown("spec.", &self.spec.unknown, &mut warnings);
        let provider = &self.spec.provider;
        unknown("spec.provider.", &provider.unknown, &mut warnings);
        let kind = match provider.kind.as_str() {
            PROMETHEUS_PROVIDER => Some(ProviderKind::Prometheus),
            "" => {
                problems.push(format!(
                    "spec.provider.type: is required: `{PROMETHEUS_PROVIDER}`"
                ));
                None
            }
            other => {
                problems.push(format!(
                    "spec.provider.type: unknown provider `{other}`; Weir supports `{PROMETHEUS_PROVIDER}`"
                ));
                None
            }
        };
        let address = provider.address.clone().filter(|a| !a.trim().is_empty());
        let secret_ref = match &provider.secret_ref {
            Some(r) if r.name.is_empty() => {
                problems.push("spec.provider.secretRef.name: is required".to_owned());
                None
            }
            Some(r) => Some(r.name.clone()),
            None => None,
        };
        let query = if self.spec.query.trim().is_empty() {
            problems.push("spec.query: is required: the PromQL to run".to_owned());
            None
        } else {
            match QueryTemplate::parse(&self.spec.query) {
                Ok(q) => Some(q),
                Err(e) => {
                    problems.push(format!("spec.query: {e}"));
                    None
                }
            }
        };
        match (kind, query) {
            (Some(kind), Some(query)) if problems.is_empty() => Ok((
                TemplatePlan {
                    name,
                    namespace,
                    provider: ProviderPlan {
                        kind,
                        address,
                        secret_ref,
                        insecure_skip_verify: provider.insecure_skip_verify,
                    },
                    query,
                },
                warnings,
            )),
            _ => Err(TemplateError {
                template: format!("{namespace}/{name}"),
                problems,
            }),
        }
    }
}

/// The values a query template can use (Flagger's `MetricTemplateModel`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TemplateModel {
    /// The Canary's name.
    pub name: String,
    /// The Canary's namespace.
    pub namespace: String,
    /// The target workload's name (`targetRef.name`).
    pub target: String,
    /// The apex service's name.
    pub service: String,
    /// The ingress' name (empty: Weir has no ingressRef).
    pub ingress: String,
    /// The metric's window as a Prometheus duration (`1m`, `30s`).
    pub interval: String,
    /// The metric's `templateVariables`.
    pub variables: BTreeMap<String, String>,
}

/// A value a template refers to.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Field {
    Name,
    Namespace,
    Target,
    Service,
    Ingress,
    Interval,
    Variable(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    Field(Field),
}

/// A parsed query template: text and `{{ field }}` actions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueryTemplate {
    source: String,
    parts: Vec<Part>,
}

/// What a template may write inside `{{ }}`, for error messages.
const FIELDS_HINT: &str = "{{ name }}, {{ namespace }}, {{ target }}, {{ service }}, {{ ingress }}, {{ interval }} or {{ variables.NAME }}";

impl QueryTemplate {
    /// Parses `text`. Actions are `{{ field }}` with optional spaces and Go's trim markers
    /// (`{{- field -}}`); anything else is an error that says what is allowed.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut parts = Vec::new();
        let mut rest = text;
        let mut text_buf = String::new();
        let mut trim_next = false;
        while let Some(open) = rest.find("{{") {
            let mut before = &rest[..open];
            if trim_next {
                before = before.trim_start();
            }
            let after_open = &rest[open + 2..];
            let close = after_open.find("}}").ok_or_else(|| {
                format!(
                    "`{{{{` at byte {} is never closed with `}}}}`",
                    text.len() - rest.len() + open
                )
            })?;
            let mut action = &after_open[..close];
            if let Some(a) = action.strip_prefix('-') {
                before = before.trim_end();
                action = a;
            }
            trim_next = false;
            if let Some(a) = action.strip_suffix('-') {
                trim_next = true;
                action = a;
            }
            text_buf.push_str(before);
            if !text_buf.is_empty() {
                parts.push(Part::Text(std::mem::take(&mut text_buf)));
            }
            parts.push(Part::Field(Self::field(action.trim())?));
            rest = &after_open[close + 2..];
        }
        text_buf.push_str(if trim_next { rest.trim_start() } else { rest });
        if !text_buf.is_empty() {
            parts.push(Part::Text(text_buf));
        }
        Ok(Self {
            source: text.to_owned(),
            parts,
        })
    }

    fn field(action: &str) -> Result<Field, String> {
        let action = action.strip_prefix('.').unwrap_or(action);
        Ok(match action {
            "name" => Field::Name,
            "namespace" => Field::Namespace,
            "target" => Field::Target,
            "service" => Field::Service,
            "ingress" => Field::Ingress,
            "interval" => Field::Interval,
            other => match other.strip_prefix("variables.") {
                Some(var)
                    if !var.is_empty()
                        && var.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                        && !var.starts_with(|c: char| c.is_ascii_digit()) =>
                {
                    Field::Variable(var.to_owned())
                }
                _ => {
                    return Err(format!(
                        "`{{{{ {other} }}}}` is not supported; a template may use {FIELDS_HINT}"
                    ))
                }
            },
        })
    }

    /// The query as written.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The `variables.X` names the query uses.
    pub fn variables(&self) -> BTreeSet<&str> {
        self.parts
            .iter()
            .filter_map(|p| match p {
                Part::Field(Field::Variable(v)) => Some(v.as_str()),
                _ => None,
            })
            .collect()
    }

    /// The query with every field filled in; an undefined variable is an error naming it.
    pub fn render(&self, model: &TemplateModel) -> Result<String, String> {
        let mut out = String::with_capacity(self.source.len());
        for part in &self.parts {
            match part {
                Part::Text(t) => out.push_str(t),
                Part::Field(f) => out.push_str(match f {
                    Field::Name => &model.name,
                    Field::Namespace => &model.namespace,
                    Field::Target => &model.target,
                    Field::Service => &model.service,
                    Field::Ingress => &model.ingress,
                    Field::Interval => &model.interval,
                    Field::Variable(v) => model.variables.get(v).ok_or_else(|| {
                        format!(
                            "the query uses {{{{ variables.{v} }}}} but the metric's templateVariables do not define `{v}`"
                        )
                    })?,
                }),
            }
        }
        Ok(out)
    }
}

impl fmt::Display for QueryTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model() -> TemplateModel {
        TemplateModel {
            name: "mhs".into(),
            namespace: "application".into(),
            target: "mhs".into(),
            service: "mhs".into(),
            ingress: String::new(),
            interval: "30s".into(),
            variables: BTreeMap::from([("code".to_owned(), "404".to_owned())]),
        }
    }

    fn template(yaml: &str) -> MetricTemplate {
        serde_yaml::from_str(yaml).unwrap()
    }

    #[test]
    fn every_field_of_flaggers_model_renders() {
        let q = QueryTemplate::parse(
            r#"sum(rate(x{ns="{{ namespace }}",w=~"{{target}}",c="{{ name }}",s="{{ service }}",i="{{ ingress }}",code!="{{ variables.code }}"}[{{ interval }}]))"#,
        )
        .unwrap();
        assert_eq!(
            q.render(&model()).unwrap(),
            r#"sum(rate(x{ns="application",w=~"mhs",c="mhs",s="mhs",i="",code!="404"}[30s]))"#
        );
        assert_eq!(q.variables(), BTreeSet::from(["code"]));
    }

    #[test]
    fn trim_markers_and_dotted_fields_read_as_go_templates_do() {
        let q = QueryTemplate::parse("a  {{- .namespace -}}  b {{target}}").unwrap();
        assert_eq!(q.render(&model()).unwrap(), "aapplicationb mhs");
    }

    #[test]
    fn text_without_actions_is_kept_verbatim() {
        let q = QueryTemplate::parse("vector(1)").unwrap();
        assert_eq!(q.render(&model()).unwrap(), "vector(1)");
        assert_eq!(q.source(), "vector(1)");
    }

    #[test]
    fn unsupported_actions_say_what_is_allowed() {
        for bad in [
            "{{ .Values.x }}",
            "{{ namespace | upper }}",
            "{{ variables. }}",
            "{{ args.name }}",
        ] {
            let err = QueryTemplate::parse(bad).unwrap_err();
            assert!(err.contains("{{ variables.NAME }}"), "{bad}: {err}");
        }
        let err = QueryTemplate::parse("rate(x[{{ interval ])").unwrap_err();
        assert!(err.contains("never closed"), "{err}");
    }

    #[test]
    fn an_undefined_variable_is_named() {
        let q = QueryTemplate::parse("x{a=\"{{ variables.missing }}\"}").unwrap();
        let err = q.render(&model()).unwrap_err();
        assert!(err.contains("variables.missing"), "{err}");
    }

    #[test]
    fn a_flagger_template_compiles() {
        let (plan, warnings) = template(
            r#"
apiVersion: flagger.app/v1beta1
kind: MetricTemplate
metadata: {name: not-found, namespace: istio-system}
spec:
  provider: {type: prometheus, address: "http://prom:9090", secretRef: {name: prom-auth}}
  query: sum(rate(x{ns="{{ namespace }}"}[{{ interval }}]))
"#,
        )
        .compile("application")
        .unwrap();
        assert_eq!(plan.id(), "istio-system/not-found");
        assert_eq!(plan.provider.kind, ProviderKind::Prometheus);
        assert_eq!(plan.provider.address.as_deref(), Some("http://prom:9090"));
        assert_eq!(plan.provider.secret_ref.as_deref(), Some("prom-auth"));
        assert!(warnings.is_empty(), "{warnings:?}");
    }

    #[test]
    fn a_template_without_namespace_lives_where_it_was_found() {
        let (plan, _) = template(
            "apiVersion: weir.dev/v1alpha1\nkind: MetricTemplate\nmetadata: {name: t}\nspec: {provider: {type: prometheus}, query: 'vector(1)'}",
        )
        .compile("application")
        .unwrap();
        assert_eq!(plan.id(), "application/t");
        assert_eq!(plan.provider.address, None);
    }

    #[test]
    fn an_unknown_provider_type_is_an_error_naming_the_template() {
        let err = template(
            "apiVersion: weir.dev/v1alpha1\nkind: MetricTemplate\nmetadata: {name: dd, namespace: app}\nspec: {provider: {type: datadog}, query: 'avg:x{*}'}",
        )
        .compile("app")
        .unwrap_err();
        assert_eq!(err.template, "app/dd");
        let text = err.to_string();
        assert!(
            text.contains("MetricTemplate app/dd is invalid")
                && text.contains("unknown provider `datadog`"),
            "{text}"
        );
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let err = template(
            "apiVersion: v1\nkind: Metric\nmetadata: {name: ''}\nspec: {provider: {secretRef: {}}, query: '{{ bad }}'}",
        )
        .compile("app")
        .unwrap_err();
        let text = err.to_string();
        for needle in [
            "apiVersion",
            "kind",
            "metadata.name",
            "spec.provider.type",
            "secretRef.name",
            "spec.query",
        ] {
            assert!(text.contains(needle), "{needle} missing from {text}");
        }
    }

    #[test]
    fn unknown_keys_are_warnings_and_insecure_skip_verify_is_kept() {
        let (plan, warnings) = template(
            "apiVersion: weir.dev/v1alpha1\nkind: MetricTemplate\nmetadata: {name: t}\nspec: {provider: {type: prometheus, insecureSkipVerify: true, region: x}, query: 'vector(1)', extra: 1}",
        )
        .compile("app")
        .unwrap();
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert!(warnings.iter().any(|w| w.contains("spec.provider.region")));
        assert!(plan.provider.insecure_skip_verify);
    }
}
