//! Queries for the Prometheus source: Flagger's built-in Istio queries, the template model a
//! check fills in, and the store of MetricTemplates (with their credentials) the source reads.
//!
//! In Kubernetes the store is filled from MetricTemplate resources and their Secrets; in local
//! mode from YAML manifests beside the Canary ([`Templates::load_dir`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use base64::Engine as _;

use super::prometheus::Credentials;
use crate::spec::{
    CanaryPlan, MetricCheck, MetricKind, MetricTemplate, QueryTemplate, TemplateModel, TemplatePlan,
};

/// Flagger's `request-success-rate` for Istio: the percentage of requests the canary workload
/// answered with anything but a 5xx, as its sidecar (`reporter="destination"`) saw them.
pub const ISTIO_REQUEST_SUCCESS_RATE: &str = r#"
sum(
  rate(
    istio_requests_total{
      reporter="destination",
      destination_workload_namespace="{{ namespace }}",
      destination_workload=~"{{ target }}",
      response_code!~"5.*"
    }[{{ interval }}]
  )
)
/
sum(
  rate(
    istio_requests_total{
      reporter="destination",
      destination_workload_namespace="{{ namespace }}",
      destination_workload=~"{{ target }}"
    }[{{ interval }}]
  )
)
* 100"#;

/// Flagger's `request-duration` for Istio: the canary workload's P99 in milliseconds.
pub const ISTIO_REQUEST_DURATION: &str = r#"
histogram_quantile(
  0.99,
  sum(
    rate(
      istio_request_duration_milliseconds_bucket{
        reporter="destination",
        destination_workload_namespace="{{ namespace }}",
        destination_workload=~"{{ target }}"
      }[{{ interval }}]
    )
  ) by (le)
)"#;

/// Weir's addition for the built-in checks: how many requests the value is based on, so
/// `minSampleCount` applies and decisions name their sample count as with streamed data.
pub const ISTIO_REQUEST_COUNT: &str = r#"
sum(
  increase(
    istio_requests_total{
      reporter="destination",
      destination_workload_namespace="{{ namespace }}",
      destination_workload=~"{{ target }}"
    }[{{ interval }}]
  )
)"#;

/// The built-in query for a check (`None` for templates and inline queries).
pub fn builtin_query(kind: &MetricKind) -> Option<&'static str> {
    match kind {
        MetricKind::SuccessRate => Some(ISTIO_REQUEST_SUCCESS_RATE),
        MetricKind::Duration => Some(ISTIO_REQUEST_DURATION),
        MetricKind::Template { .. } | MetricKind::Query(_) => None,
    }
}

/// A window as a Prometheus duration: `1m`, `30s`, `1500ms` (one unit, which every Prometheus
/// version parses; Flagger passes the metric's `interval` as written, like `1m`).
pub fn prometheus_duration(d: Duration) -> String {
    let ms = d.as_millis().max(1);
    if ms.is_multiple_of(3_600_000) {
        format!("{}h", ms / 3_600_000)
    } else if ms.is_multiple_of(60_000) {
        format!("{}m", ms / 60_000)
    } else if ms.is_multiple_of(1_000) {
        format!("{}s", ms / 1_000)
    } else {
        format!("{ms}ms")
    }
}

/// The values a check's query is rendered with (Flagger's `MetricTemplateModel`).
pub fn model(canary: &CanaryPlan, check: &MetricCheck) -> TemplateModel {
    TemplateModel {
        name: canary.name.clone(),
        namespace: canary.namespace.clone(),
        target: canary.target.name.clone(),
        service: canary.service.name.clone(),
        ingress: String::new(),
        interval: prometheus_duration(check.window),
        variables: check.template_variables.clone(),
    }
}

/// A template with the credentials its `secretRef` names, resolved when it was stored.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredTemplate {
    /// The checked template.
    pub plan: TemplatePlan,
    /// Credentials from its Secret, if it names one.
    pub credentials: Option<Credentials>,
}

/// The MetricTemplates known to the controller, by `namespace/name`. Cheap to clone; clones
/// share the same templates, so a watcher can update them while sources read.
#[derive(Debug, Clone, Default)]
pub struct Templates {
    inner: Arc<RwLock<BTreeMap<String, Arc<StoredTemplate>>>>,
}

/// Why templates could not be loaded, or why a Canary's metrics don't fit them.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{}", problems.join("\n"))]
pub struct TemplatesError {
    /// Each problem, naming the template (and the file or metric) it is about.
    pub problems: Vec<String>,
}

impl Templates {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds or replaces a template.
    pub fn upsert(&self, plan: TemplatePlan, credentials: Option<Credentials>) {
        let key = plan.id();
        self.inner
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, Arc::new(StoredTemplate { plan, credentials }));
    }

    /// Removes a template.
    pub fn remove(&self, namespace: &str, name: &str) {
        self.inner
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&format!("{namespace}/{name}"));
    }

    /// The template `namespace/name`.
    pub fn get(&self, namespace: &str, name: &str) -> Option<Arc<StoredTemplate>> {
        self.inner
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&format!("{namespace}/{name}"))
            .cloned()
    }

    /// How many templates are stored.
    pub fn len(&self) -> usize {
        self.inner.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Whether no template is stored.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Checks that every `templateRef` of `canary` names a stored template whose query renders
    /// with the metric's `templateVariables`: a Canary that would fail at its first analysis
    /// is refused when it is loaded, naming the metric and the template.
    pub fn check_plan(&self, canary: &CanaryPlan) -> Result<(), TemplatesError> {
        let mut problems = Vec::new();
        for (i, check) in canary.analysis.metrics.iter().enumerate() {
            let path = format!("spec.analysis.metrics[{i}] ({})", check.name);
            match &check.kind {
                MetricKind::Template { name, namespace } => match self.get(namespace, name) {
                    None => problems.push(format!(
                        "{path}: MetricTemplate {namespace}/{name} not found; create it in namespace {namespace} (in local mode: a YAML manifest beside the Canary)"
                    )),
                    Some(t) => {
                        if let Err(e) = t.plan.query.render(&model(canary, check)) {
                            problems.push(format!("{path}: MetricTemplate {}: {e}", t.plan.id()));
                        }
                    }
                },
                MetricKind::Query(q) => match QueryTemplate::parse(q) {
                    Err(e) => problems.push(format!("{path}.query: {e}")),
                    Ok(q) => {
                        if let Err(e) = q.render(&model(canary, check)) {
                            problems.push(format!("{path}.query: {e}"));
                        }
                    }
                },
                MetricKind::SuccessRate | MetricKind::Duration => {}
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(TemplatesError { problems })
        }
    }

    /// Local mode: reads every `*.yaml`/`*.yml` file directly in `dir` (the Canary's folder)
    /// and stores each `MetricTemplate` document, with credentials from the `Secret` documents
    /// its `secretRef` names (same namespace). Other documents are skipped; a template that does
    /// not compile, or names a missing Secret, is an error naming the template and its file.
    /// Returns the store and warnings to show once.
    pub fn load_dir(
        dir: &Path,
        default_namespace: &str,
    ) -> Result<(Self, Vec<String>), TemplatesError> {
        let mut problems = Vec::new();
        let mut warnings = Vec::new();
        let mut templates: Vec<(PathBuf, TemplatePlan)> = Vec::new();
        let mut secrets: BTreeMap<String, BTreeMap<String, Vec<u8>>> = BTreeMap::new();
        let mut files: Vec<PathBuf> = match std::fs::read_dir(dir) {
            Ok(entries) => entries
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| {
                    p.is_file()
                        && matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml"))
                })
                .collect(),
            Err(e) => {
                return Err(TemplatesError {
                    problems: vec![format!("cannot read {}: {e}", dir.display())],
                })
            }
        };
        files.sort();
        for file in files {
            let Ok(text) = std::fs::read_to_string(&file) else {
                continue;
            };
            for document in serde_yaml::Deserializer::from_str(&text) {
                let Ok(value) = serde_yaml::Value::deserialize(document) else {
                    // Not YAML Weir reads (another tool's file); templates are found by kind.
                    break;
                };
                match value.get("kind").and_then(serde_yaml::Value::as_str) {
                    Some("MetricTemplate") => {
                        let parsed: Result<MetricTemplate, _> = serde_yaml::from_value(value);
                        match parsed {
                            Err(e) => problems.push(format!(
                                "{}: a MetricTemplate that cannot be read: {e}",
                                file.display()
                            )),
                            Ok(t) => match t.compile(default_namespace) {
                                Ok((plan, w)) => {
                                    warnings.extend(w.into_iter().map(|w| {
                                        format!(
                                            "{} (MetricTemplate {}): {w}",
                                            file.display(),
                                            plan.id()
                                        )
                                    }));
                                    templates.push((file.clone(), plan));
                                }
                                Err(e) => problems.push(format!("{}: {e}", file.display())),
                            },
                        }
                    }
                    Some("Secret") => match secret_data(&value) {
                        Ok(data) => {
                            let meta = value.get("metadata");
                            let field = |k: &str| {
                                meta.and_then(|m| m.get(k))
                                    .and_then(serde_yaml::Value::as_str)
                                    .map(str::to_owned)
                            };
                            let namespace =
                                field("namespace").unwrap_or_else(|| default_namespace.to_owned());
                            let name = field("name").unwrap_or_default();
                            secrets.insert(format!("{namespace}/{name}"), data);
                        }
                        Err(e) => problems.push(format!("{}: {e}", file.display())),
                    },
                    _ => {}
                }
            }
        }
        let store = Templates::new();
        for (file, plan) in templates {
            let credentials = match &plan.provider.secret_ref {
                None => None,
                Some(secret) => match secrets.get(&format!("{}/{secret}", plan.namespace)) {
                    None => {
                        problems.push(format!(
                            "{}: MetricTemplate {}: spec.provider.secretRef names Secret {}/{secret}, which is not among the manifests in {}",
                            file.display(),
                            plan.id(),
                            plan.namespace,
                            dir.display()
                        ));
                        continue;
                    }
                    Some(data) => match Credentials::from_secret_data(data) {
                        Ok(c) => Some(c),
                        Err(e) => {
                            problems.push(format!(
                                "{}: MetricTemplate {}: Secret {}/{secret}: {e}",
                                file.display(),
                                plan.id(),
                                plan.namespace
                            ));
                            continue;
                        }
                    },
                },
            };
            store.upsert(plan, credentials);
        }
        if problems.is_empty() {
            Ok((store, warnings))
        } else {
            Err(TemplatesError { problems })
        }
    }
}

use serde::Deserialize as _;

/// A Secret manifest's keys: `stringData` as is, `data` base64-decoded.
pub(crate) fn secret_data(secret: &serde_yaml::Value) -> Result<BTreeMap<String, Vec<u8>>, String> {
    let mut out = BTreeMap::new();
    if let Some(data) = secret.get("data").and_then(serde_yaml::Value::as_mapping) {
        for (k, v) in data {
            let (Some(k), Some(v)) = (k.as_str(), v.as_str()) else {
                continue;
            };
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(v.trim())
                .map_err(|e| format!("Secret data.{k} is not base64 ({e})"))?;
            out.insert(k.to_owned(), bytes);
        }
    }
    if let Some(data) = secret
        .get("stringData")
        .and_then(serde_yaml::Value::as_mapping)
    {
        for (k, v) in data {
            if let (Some(k), Some(v)) = (k.as_str(), v.as_str()) {
                out.insert(k.to_owned(), v.as_bytes().to_vec());
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::load_yaml;

    const CANARY: &str = r#"apiVersion: weir.dev/v1alpha1
kind: Canary
metadata: {name: mhs, namespace: application}
spec:
  targetRef: {apiVersion: apps/v1, kind: Deployment, name: mhs}
  service: {port: 80}
  analysis:
    interval: 1m
    stepWeight: 10
    metrics:
    - name: request-success-rate
      thresholdRange: {min: 99}
      interval: 30s
    - name: request-duration
      thresholdRange: {max: 500}
      interval: 1m
    - name: not-found
      templateRef: {name: not-found}
      templateVariables: {code: "404"}
      thresholdRange: {max: 5}
"#;

    fn plan() -> CanaryPlan {
        load_yaml(CANARY).unwrap().plan
    }

    #[test]
    fn the_builtin_success_rate_is_flaggers_istio_query() {
        let p = plan();
        let check = &p.analysis.metrics[0];
        let q = QueryTemplate::parse(builtin_query(&check.kind).unwrap())
            .unwrap()
            .render(&model(&p, check))
            .unwrap();
        let q: String = q.chars().filter(|c| !c.is_whitespace()).collect();
        assert_eq!(
            q,
            r#"sum(rate(istio_requests_total{reporter="destination",destination_workload_namespace="application",destination_workload=~"mhs",response_code!~"5.*"}[30s]))/sum(rate(istio_requests_total{reporter="destination",destination_workload_namespace="application",destination_workload=~"mhs"}[30s]))*100"#
        );
    }

    #[test]
    fn the_builtin_duration_is_flaggers_istio_p99() {
        let p = plan();
        let check = &p.analysis.metrics[1];
        let q = QueryTemplate::parse(builtin_query(&check.kind).unwrap())
            .unwrap()
            .render(&model(&p, check))
            .unwrap();
        let q: String = q.chars().filter(|c| !c.is_whitespace()).collect();
        assert_eq!(
            q,
            r#"histogram_quantile(0.99,sum(rate(istio_request_duration_milliseconds_bucket{reporter="destination",destination_workload_namespace="application",destination_workload=~"mhs"}[1m]))by(le))"#
        );
    }

    #[test]
    fn windows_render_as_single_unit_prometheus_durations() {
        for (d, want) in [
            (Duration::from_secs(30), "30s"),
            (Duration::from_secs(60), "1m"),
            (Duration::from_secs(90), "90s"),
            (Duration::from_secs(7200), "2h"),
            (Duration::from_millis(2500), "2500ms"),
            (Duration::ZERO, "1ms"),
        ] {
            assert_eq!(prometheus_duration(d), want);
        }
    }

    fn write(dir: &Path, file: &str, text: &str) {
        std::fs::write(dir.join(file), text).unwrap();
    }

    fn scratch(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("weir-templates-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    const TEMPLATE: &str = r#"apiVersion: flagger.app/v1beta1
kind: MetricTemplate
metadata: {name: not-found}
spec:
  provider: {type: prometheus, address: "http://127.0.0.1:9090", secretRef: {name: prom-auth}}
  query: sum(rate(x{code="{{ variables.code }}",ns="{{ namespace }}"}[{{ interval }}]))
"#;

    #[test]
    fn templates_and_their_secrets_load_from_the_canarys_folder() {
        let dir = scratch("load");
        write(&dir, "canary.yaml", CANARY);
        write(&dir, "not-found.yaml", TEMPLATE);
        write(
            &dir,
            "secrets.yml",
            "apiVersion: v1\nkind: Secret\nmetadata: {name: prom-auth}\ndata: {username: YWRtaW4=}\nstringData: {password: s3cret}\n---\nkind: ConfigMap\n",
        );
        write(&dir, "notes.yaml", "just: [an, unrelated, file]\n");
        let (store, warnings) = Templates::load_dir(&dir, "application").unwrap();
        assert!(warnings.is_empty(), "{warnings:?}");
        let t = store.get("application", "not-found").unwrap();
        assert_eq!(
            t.credentials,
            Some(Credentials::Basic {
                username: "admin".into(),
                password: "s3cret".into()
            })
        );
        store.check_plan(&plan()).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_missing_template_or_variable_is_refused_naming_the_metric_and_template() {
        let store = Templates::new();
        let err = store.check_plan(&plan()).unwrap_err().to_string();
        assert!(
            err.contains("metrics[2] (not-found)")
                && err.contains("MetricTemplate application/not-found not found"),
            "{err}"
        );
        let (t, _) = serde_yaml::from_str::<MetricTemplate>(
            &TEMPLATE.replace("variables.code", "variables.status"),
        )
        .unwrap()
        .compile("application")
        .unwrap();
        store.upsert(t, None);
        let err = store.check_plan(&plan()).unwrap_err().to_string();
        assert!(
            err.contains("MetricTemplate application/not-found")
                && err.contains("variables.status"),
            "{err}"
        );
    }

    #[test]
    fn a_bad_template_file_is_named_in_the_error() {
        let dir = scratch("bad");
        write(
            &dir,
            "dd.yaml",
            "apiVersion: weir.dev/v1alpha1\nkind: MetricTemplate\nmetadata: {name: dd}\nspec: {provider: {type: datadog}, query: x}\n",
        );
        write(&dir, "nf.yaml", TEMPLATE);
        let err = Templates::load_dir(&dir, "application")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("dd.yaml")
                && err.contains("MetricTemplate application/dd is invalid")
                && err.contains("unknown provider `datadog`"),
            "{err}"
        );
        assert!(
            err.contains("Secret application/prom-auth, which is not among the manifests"),
            "{err}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
