//! The `Canary` custom resource (`weir.dev/v1alpha1`) and its CRD, generated from the Rust types
//! in [`crate::spec`]: one source of truth for the schema, printed by `weir crdgen` into
//! `manifests/crds/` (a test fails when the checked-in copy is stale).
//!
//! The resource's `spec` is [`spec::CanarySpec`] itself (Flagger's field names), wrapped only so
//! kube's derive can hang the resource's identity on it; `status` is [`spec::CanaryStatus`].

use std::borrow::Cow;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceDefinition, JSONSchemaProps,
};
use kube::{CustomResource, CustomResourceExt};
use schemars::transform::{AddNullable, Transform};
use schemars::{JsonSchema, Schema};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::spec::{self, AlertProviderSpec, CanarySpec, CanaryStatus, MetricTemplateSpec};

/// The `spec` of a [`CanaryResource`]: the Canary spec of [`crate::spec`], unchanged on the wire.
#[derive(CustomResource, Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[kube(
    group = "weir.dev",
    version = "v1alpha1",
    kind = "Canary",
    root = "CanaryResource",
    namespaced,
    status = "CanaryStatus",
    shortname = "canary",
    schema = "disabled",
    printcolumn = r#"{"name":"Status","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Weight","type":"integer","jsonPath":".status.canaryWeight"}"#,
    printcolumn = r#"{"name":"FailedChecks","type":"integer","jsonPath":".status.failedChecks"}"#,
    printcolumn = r#"{"name":"LastTransitionTime","type":"string","jsonPath":".status.lastTransitionTime"}"#,
    printcolumn = r#"{"name":"Halted","type":"string","description":"Why the rollout does not advance (the Halted condition)","jsonPath":".status.conditions[?(@.type==\"Halted\")].message"}"#
)]
#[serde(transparent)]
pub struct CanaryResourceSpec(pub CanarySpec);

impl std::ops::Deref for CanaryResourceSpec {
    type Target = CanarySpec;
    fn deref(&self) -> &CanarySpec {
        &self.0
    }
}

impl CanaryResource {
    /// The resource as [`crate::spec`] reads it (for [`spec::Canary::compile`]): the metadata
    /// Weir uses, the spec, the status.
    pub fn to_spec_canary(&self) -> spec::Canary {
        spec::Canary {
            api_version: spec::API_VERSION.to_owned(),
            kind: "Canary".to_owned(),
            metadata: spec_meta(&self.metadata),
            spec: self.spec.0.clone(),
            status: self.status.clone(),
            unknown: Default::default(),
        }
    }
}

impl CanaryResource {
    /// The operator request in the [`spec::REQUEST_ANNOTATION`] annotation, if any, with who
    /// asked: the field manager that last wrote the annotation (`weir-cli:alice` for `weir
    /// pause` run by alice, `kubectl-annotate` for a hand-written one). A value that is not a
    /// request is logged and ignored.
    pub fn operator_request(&self) -> Option<crate::analysis::OperatorRequest> {
        let value = self
            .metadata
            .annotations
            .as_ref()?
            .get(spec::REQUEST_ANNOTATION)?;
        let by = self
            .metadata
            .managed_fields
            .iter()
            .flatten()
            .filter(|entry| {
                entry.fields_v1.as_ref().is_some_and(|fields| {
                    fields.0["f:metadata"]["f:annotations"]
                        .get(format!("f:{}", spec::REQUEST_ANNOTATION))
                        .is_some()
                })
            })
            .max_by_key(|entry| entry.time.as_ref().map(|t| t.0))
            .and_then(|entry| entry.manager.clone())
            .unwrap_or_else(|| "an unknown field manager".to_owned());
        match crate::analysis::OperatorRequest::parse_annotation(value, &by) {
            Ok(request) => Some(request),
            Err(why) => {
                tracing::warn!(canary = ?self.metadata.name, "{}: {why}", spec::REQUEST_ANNOTATION);
                None
            }
        }
    }
}

/// The `spec` of a [`MetricTemplateResource`]: Flagger's MetricTemplate spec (a provider and a
/// query), as [`crate::spec`] reads it.
#[derive(CustomResource, Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[kube(
    group = "weir.dev",
    version = "v1alpha1",
    kind = "MetricTemplate",
    root = "MetricTemplateResource",
    namespaced,
    schema = "disabled",
    printcolumn = r#"{"name":"Provider","type":"string","jsonPath":".spec.provider.type"}"#
)]
#[serde(transparent)]
pub struct MetricTemplateResourceSpec(pub MetricTemplateSpec);

impl MetricTemplateResource {
    /// The resource as [`crate::spec`] reads it (for [`spec::MetricTemplate::compile`]).
    pub fn to_spec_template(&self) -> spec::MetricTemplate {
        spec::MetricTemplate {
            api_version: spec::API_VERSION.to_owned(),
            kind: "MetricTemplate".to_owned(),
            metadata: spec_meta(&self.metadata),
            spec: self.spec.0.clone(),
            unknown: Default::default(),
        }
    }
}

/// The `spec` of an [`AlertProviderResource`]: Flagger's AlertProvider spec (type, channel,
/// username, address or secretRef), as [`crate::spec`] reads it.
#[derive(CustomResource, Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[kube(
    group = "weir.dev",
    version = "v1alpha1",
    kind = "AlertProvider",
    root = "AlertProviderResource",
    namespaced,
    schema = "disabled",
    printcolumn = r#"{"name":"Type","type":"string","jsonPath":".spec.type"}"#
)]
#[serde(transparent)]
pub struct AlertProviderResourceSpec(pub AlertProviderSpec);

impl AlertProviderResource {
    /// The resource as [`crate::spec`] reads it (for [`spec::AlertProvider::compile`]).
    pub fn to_spec_provider(&self) -> spec::AlertProvider {
        spec::AlertProvider {
            api_version: spec::API_VERSION.to_owned(),
            kind: "AlertProvider".to_owned(),
            metadata: spec_meta(&self.metadata),
            spec: self.spec.0.clone(),
            unknown: Default::default(),
        }
    }
}

/// Only for schema generation: an AlertProvider's `spec`.
#[derive(JsonSchema)]
#[allow(dead_code)]
struct AlertProviderSchema {
    /// Where and how alerts are sent (Flagger's `spec` field names).
    spec: AlertProviderSpec,
}

/// The CRD of [`AlertProviderResource`], with the schema generated from [`crate::spec`].
pub fn alert_provider_crd() -> CustomResourceDefinition {
    let mut crd = AlertProviderResource::crd();
    for version in &mut crd.spec.versions {
        version.schema = Some(
            k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceValidation {
                open_api_v3_schema: Some(structural_schema::<AlertProviderSchema>()),
            },
        );
    }
    crd
}

/// Only for schema generation: a MetricTemplate's `spec`.
#[derive(JsonSchema)]
#[allow(dead_code)]
struct MetricTemplateSchema {
    /// Where the query runs and the query (Flagger's `spec` field names).
    spec: MetricTemplateSpec,
}

/// The CRD of [`MetricTemplateResource`], with the schema generated from [`crate::spec`].
pub fn metric_template_crd() -> CustomResourceDefinition {
    let mut crd = MetricTemplateResource::crd();
    for version in &mut crd.spec.versions {
        version.schema = Some(
            k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceValidation {
                open_api_v3_schema: Some(structural_schema::<MetricTemplateSchema>()),
            },
        );
    }
    crd
}

/// Only for schema generation: the parts of the resource the CRD describes (the API server
/// validates `apiVersion`, `kind` and `metadata` itself).
#[derive(JsonSchema)]
#[allow(dead_code)]
struct CanarySchema {
    /// What to roll out and how to analyse it (Flagger's `spec` field names).
    spec: CanarySpec,
    /// The persisted state of the rollout, written by the controller.
    status: Option<CanaryStatus>,
}

/// The CRD of [`CanaryResource`], with the schema generated from [`crate::spec`]'s types.
pub fn canary_crd() -> CustomResourceDefinition {
    let mut crd = CanaryResource::crd();
    for version in &mut crd.spec.versions {
        version.schema = Some(
            k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceValidation {
                open_api_v3_schema: Some(structural_schema::<CanarySchema>()),
            },
        );
    }
    crd
}

/// A Kubernetes structural schema for `T`: kube's own transforms (as its derive applies them),
/// then free-form JSON fields (Flagger fields Weir keeps opaque) marked as such.
pub fn structural_schema<T: JsonSchema>() -> JSONSchemaProps {
    let generator = schemars::generate::SchemaSettings::openapi3()
        .with(|s| {
            s.inline_subschemas = true;
            s.meta_schema = None;
        })
        .with_transform(AddNullable::default())
        .with_transform(kube::core::schema::StructuralSchemaRewriter)
        .with_transform(kube::core::schema::OptionalEnum)
        .with_transform(kube::core::schema::OptionalIntOrString)
        .with_transform(PreserveFreeForm)
        .into_generator();
    let mut root = generator.into_root_schema_for::<T>().to_value();
    if let Some(object) = root.as_object_mut() {
        // Descriptions of the generation-only root type would only confuse `kubectl explain`.
        object.remove("title");
        object.remove("description");
    }
    // Every node is an object with known keys after the transforms above; a failure here is a
    // bug in a spec type's schema, caught by the CRD tests.
    serde_json::from_value(root)
        .unwrap_or_else(|e| panic!("the Canary schema is not a valid CRD schema: {e}"))
}

/// Turns the schema of a free-form JSON value (`true`, which a structural schema forbids) into
/// `x-kubernetes-preserve-unknown-fields`, which keeps the value as written.
#[derive(Debug, Clone, Copy)]
struct PreserveFreeForm;

fn preserve() -> Value {
    serde_json::json!({"x-kubernetes-preserve-unknown-fields": true})
}

impl Transform for PreserveFreeForm {
    fn transform(&mut self, schema: &mut Schema) {
        if schema.as_bool() == Some(true) {
            *schema = Schema::try_from(preserve()).unwrap_or_else(|_| Schema::from(true));
            return;
        }
        if let Some(object) = schema.as_object_mut() {
            // A map of free-form values: keep its keys as written.
            if object.get("additionalProperties").and_then(Value::as_bool) == Some(true) {
                object.remove("additionalProperties");
                object.insert("x-kubernetes-preserve-unknown-fields".into(), true.into());
            }
            // A free-form value that got a description (`true` became `{description: ...}`).
            const SHAPES: [&str; 9] = [
                "type",
                "properties",
                "items",
                "anyOf",
                "oneOf",
                "allOf",
                "enum",
                "x-kubernetes-int-or-string",
                "x-kubernetes-preserve-unknown-fields",
            ];
            if !SHAPES.iter().any(|k| object.contains_key(*k)) {
                object.insert("x-kubernetes-preserve-unknown-fields".into(), true.into());
            }
        }
        schemars::transform::transform_subschemas(self, schema);
    }
}

/// The CRDs Weir installs, as one multi-document YAML file each: `(file name, text)`.
pub fn crd_files() -> Vec<(Cow<'static, str>, String)> {
    vec![
        ("canary.yaml".into(), to_yaml(&canary_crd())),
        (
            "metrictemplate.yaml".into(),
            to_yaml(&metric_template_crd()),
        ),
        ("alertprovider.yaml".into(), to_yaml(&alert_provider_crd())),
    ]
}

/// A CRD as the YAML checked into `manifests/crds/`.
pub fn to_yaml(crd: &CustomResourceDefinition) -> String {
    let body = serde_yaml::to_string(crd).unwrap_or_default();
    format!("# Generated by `weir crdgen` from controller/src/spec; do not edit.\n{body}")
}

/// A resource's metadata as [`crate::spec`] reads it.
fn spec_meta(meta: &kube::api::ObjectMeta) -> spec::ObjectMeta {
    spec::ObjectMeta {
        name: meta.name.clone().unwrap_or_default(),
        namespace: meta.namespace.clone(),
        annotations: meta.annotations.clone().unwrap_or_default(),
        labels: meta.labels.clone().unwrap_or_default(),
        generation: meta.generation,
    }
}
