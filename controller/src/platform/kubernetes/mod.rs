//! Kubernetes and Istio: where Kubernetes is touched.
//!
//! The same pure engine and [`Runner`](crate::runner::Runner) as local mode, with these seams:
//!
//! - [`crd`]: the `Canary` resource (`weir.dev/v1alpha1`) and its CRD, generated from
//!   [`crate::spec`] by `weir crdgen`;
//! - [`KubernetesPlatform`] (this file): the [`Platform`] over Deployments, Services and Istio,
//!   built from [`deployments`], [`configs`], [`services`] and [`istio`] (pure object builders);
//! - [`journal`]: status (server-side apply) and Events;
//! - [`reconciler`]: the kube-runtime controller: one [`Runner`](crate::runner::Runner) per
//!   Canary, the finalizer, requeues;
//! - [`leader`]: leader election on a `coordination.k8s.io` Lease;
//! - [`templates`]: MetricTemplates from the cluster for the Prometheus source;
//! - [`alerts`]: AlertProviders (and their Secrets) from the cluster for the alerts;
//! - [`filter_install`]: the WasmPlugin (or EnvoyFilter) that puts the filter into opted-in
//!   Pods and gateways, pointing at the module the controller serves;
//! - [`health`]: `/healthz`, `/readyz`, `/metrics` and the filter module;
//! - [`run`]: `weir kubernetes`: client, telemetry ingest, leader election, health endpoints and
//!   the controller, wired together.
//!
//! What a Canary `mhs` targeting Deployment `mhs` makes (Flagger's names):
//!
//! | object | owner | what |
//! |---|---|---|
//! | Deployment `mhs-primary` | Canary | the target's template, selector values suffixed `-primary` |
//! | ConfigMaps, Secrets `<name>-primary` | Canary | copies of what the target's pods use, for the primary |
//! | Service `mhs` | none | the apex: selects the primary pods (the target's after a revert) |
//! | Services `mhs-primary`, `mhs-canary` | Canary | primary pods, target pods |
//! | DestinationRules `mhs-primary`, `mhs-canary` | Canary | one per routed Service |
//! | VirtualService `mhs` | Canary | routing header `canary` → `mhs-canary`, the rest → `mhs-primary` |
//! | HPA or ScaledObject `<autoscaler>-primary` | Canary | with `autoscalerRef`: the target's autoscaler, aimed at the primary ([`autoscalers`]) |
//!
//! The apex Service has no owner: clients address it, so deleting the Canary must not delete it.
//!
//! The primary carries the target revision it was built from (annotation
//! [`REVISION_ANNOTATION`]). A Canary deleted without `revertOnDeletion` leaves its primary
//! serving; applied again, it keeps that primary as it is and analyses a target that differs
//! as a new revision, instead of copying it to the primary unanalysed at initialization.

pub mod alerts;
pub mod autoscalers;
pub mod configs;
pub mod crd;
pub mod deployments;
pub mod filter_install;
pub mod health;
pub mod istio;
pub mod journal;
pub mod leader;
pub mod reconciler;
pub mod run;
pub mod services;
pub mod templates;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, PodTemplateSpec, Secret, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{ApiResource, DeleteParams, DynamicObject, GroupVersionKind, Patch, PatchParams};
use kube::{Api, Client};
use serde::Serialize;
use serde_json::{json, Value};

use crate::analysis::{Event, Route, Severity};
use crate::ingest::Ingest;
use crate::spec::CanaryPlan;

use super::{CanaryRef, Platform, PlatformError, Readiness};
use configs::{ConfigKind, ConfigRef};
use istio::RoutingMode;
use journal::Outbox;

/// Field manager of every server-side apply Weir makes.
pub const FIELD_MANAGER: &str = "weir";
/// The finalizer Weir puts on each Canary, so a deletion can be reverted before it completes.
pub const FINALIZER: &str = "weir.dev/finalizer";
/// Annotation on the target: the replicas it had when Weir scaled it to zero.
pub const SCALED_FROM_ANNOTATION: &str = "weir.dev/scaled-from-replicas";
/// Annotation on the primary: the target revision it was built from, so a Canary applied
/// again after a deletion knows what the primary runs.
pub const REVISION_ANNOTATION: &str = "weir.dev/revision";
/// The revision of a primary Weir did not annotate (made by Flagger, or by an older Weir): it
/// matches no target, so the target is analysed before it replaces the primary.
pub const UNRECORDED_REVISION: &str = "unrecorded";

/// Settings shared by every Canary's platform.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The header the filters set and the VirtualService matches (the filter's `routingHeader`).
    pub routing_header: String,
    /// How long a routed canary may go without any filter report before the VirtualService
    /// carries the weights itself.
    pub fallback_after: Duration,
    /// How recent a report must be for the filters to count as reporting for a canary (the
    /// same window the metric source uses to choose between streamed data and Prometheus).
    pub report_freshness: Duration,
    /// This controller's instance (pod) name, for events.
    pub instance: String,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            routing_header: crate::platform::local::envoy::ROUTING_HEADER.to_owned(),
            fallback_after: Duration::from_secs(60),
            report_freshness: crate::metrics::select::DEFAULT_FRESHNESS,
            instance: "weir".to_owned(),
        }
    }
}

#[derive(Debug)]
struct RoutingState {
    mode: RoutingMode,
    /// Since when this process routes the canary (the fallback clock).
    since: Option<Instant>,
}

/// The Kubernetes platform for one Canary.
pub struct KubernetesPlatform {
    client: Client,
    plan: CanaryPlan,
    owner: OwnerReference,
    settings: Arc<Settings>,
    ingest: Ingest,
    outbox: Outbox,
    routing: Mutex<RoutingState>,
}

fn virtual_services() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("networking.istio.io", "v1beta1", "VirtualService"),
        "virtualservices",
    )
}

fn destination_rules() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("networking.istio.io", "v1beta1", "DestinationRule"),
        "destinationrules",
    )
}

fn autoscaler_resource(kind: crate::spec::AutoscalerKind) -> ApiResource {
    let (api_version, kind, plural) = autoscalers::api(kind);
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), plural)
}

fn is_not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404)
}

impl KubernetesPlatform {
    /// The platform for `plan`, whose Canary is `owner` (a controller owner reference to it).
    pub fn new(
        client: Client,
        plan: CanaryPlan,
        owner: OwnerReference,
        settings: Arc<Settings>,
        ingest: Ingest,
        outbox: Outbox,
    ) -> Self {
        Self {
            client,
            plan,
            owner,
            settings,
            ingest,
            outbox,
            routing: Mutex::new(RoutingState {
                mode: RoutingMode::Filters,
                since: None,
            }),
        }
    }

    fn failed(&self, action: &str) -> impl Fn(kube::Error) -> PlatformError + '_ {
        let action = action.to_owned();
        move |e| PlatformError::Operation {
            action: action.clone(),
            target: self.plan.target.name.clone(),
            reason: e.to_string(),
        }
    }

    fn invalid(&self, reason: String) -> PlatformError {
        PlatformError::InvalidTarget {
            target: self.plan.target.name.clone(),
            reason,
        }
    }

    fn deployments(&self) -> Api<Deployment> {
        Api::namespaced(self.client.clone(), &self.plan.namespace)
    }

    fn dynamic(&self, resource: &ApiResource) -> Api<DynamicObject> {
        Api::namespaced_with(self.client.clone(), &self.plan.namespace, resource)
    }

    fn owner_json(&self) -> serde_json::Value {
        serde_json::to_value(&self.owner).unwrap_or_default()
    }

    async fn apply<K, T>(&self, api: &Api<K>, name: &str, object: &T) -> Result<(), kube::Error>
    where
        K: Clone + serde::de::DeserializeOwned + std::fmt::Debug,
        T: Serialize + std::fmt::Debug,
    {
        api.patch(
            name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(object),
        )
        .await
        .map(|_| ())
    }

    async fn target(&self) -> Result<Deployment, PlatformError> {
        if self.plan.target.kind != "Deployment" {
            return Err(self.invalid(format!(
                "Weir on Kubernetes rolls out Deployments; spec.targetRef.kind is {}",
                self.plan.target.kind
            )));
        }
        self.deployments()
            .get_opt(&self.plan.target.name)
            .await
            .map_err(self.failed("reading the target Deployment"))?
            .ok_or_else(|| PlatformError::TargetNotFound {
                target: self.plan.target.name.clone(),
                hint: format!(
                    "no Deployment {} in namespace {}; create it, or fix spec.targetRef.name",
                    self.plan.target.name, self.plan.namespace
                ),
            })
    }

    /// Each ConfigMap and Secret `template` uses, with what the revision covers of it (`None`:
    /// it does not exist).
    async fn configs(
        &self,
        template: &PodTemplateSpec,
    ) -> Result<Vec<(ConfigRef, Option<Value>)>, PlatformError> {
        let mut out = Vec::new();
        for reference in configs::references(template) {
            let (kind, name) = &reference;
            let content = match kind {
                ConfigKind::ConfigMap => {
                    let api: Api<ConfigMap> =
                        Api::namespaced(self.client.clone(), &self.plan.namespace);
                    api.get_opt(name)
                        .await
                        .map_err(self.failed("reading a ConfigMap the target uses"))?
                        .map(|c| json!({"data": c.data, "binaryData": c.binary_data}))
                }
                ConfigKind::Secret => {
                    let api: Api<Secret> =
                        Api::namespaced(self.client.clone(), &self.plan.namespace);
                    api.get_opt(name)
                        .await
                        .map_err(self.failed("reading a Secret the target uses"))?
                        .map(|s| json!({"type": s.type_, "data": s.data}))
                }
            };
            out.push((reference, content));
        }
        Ok(out)
    }

    /// Copies one ConfigMap or Secret to `<name>-primary`, owned by the Canary.
    async fn copy_config(
        &self,
        (kind, name): &ConfigRef,
        content: &Value,
    ) -> Result<(), PlatformError> {
        let copy = format!("{name}{}", deployments::PRIMARY_SUFFIX);
        let mut object = json!({
            "apiVersion": "v1",
            "kind": match kind { ConfigKind::ConfigMap => "ConfigMap", ConfigKind::Secret => "Secret" },
            "metadata": {
                "name": copy,
                "namespace": self.plan.namespace,
                "labels": {"app.kubernetes.io/managed-by": "weir"},
                "ownerReferences": [self.owner_json()],
            },
        });
        for (key, value) in content.as_object().into_iter().flatten() {
            if !value.is_null() {
                object[key] = value.clone();
            }
        }
        match kind {
            ConfigKind::ConfigMap => {
                let api: Api<ConfigMap> =
                    Api::namespaced(self.client.clone(), &self.plan.namespace);
                self.apply(&api, &copy, &object).await
            }
            ConfigKind::Secret => {
                let api: Api<Secret> = Api::namespaced(self.client.clone(), &self.plan.namespace);
                self.apply(&api, &copy, &object).await
            }
        }
        .map_err(self.failed("copying configuration for the primary"))
    }

    /// The apex, primary and canary Services and the DestinationRules, as `route` needs them.
    async fn apply_services(&self, target: &Deployment, routed: bool) -> Result<(), PlatformError> {
        let selector = deployments::target_selector(target).map_err(|e| self.invalid(e))?;
        let primary = deployments::primary_selector(&selector);
        let api: Api<Service> = Api::namespaced(self.client.clone(), &self.plan.namespace);
        let apex_selects = if routed { &primary } else { &selector };
        let containers = target
            .spec
            .template
            .spec
            .as_ref()
            .map_or(&[][..], |p| &p.containers[..]);
        let discovered = services::discovered_ports(&self.plan, containers);
        let apex = services::service(
            &self.plan,
            services::Role::Apex,
            apex_selects.clone(),
            None,
            &discovered,
        );
        self.apply(&api, &self.plan.service.name, &apex)
            .await
            .map_err(self.failed("applying the apex Service"))?;
        if !routed {
            return Ok(());
        }
        let owner = Some(self.owner.clone());
        for (role, selector) in [
            (services::Role::Primary, primary),
            (services::Role::Canary, selector),
        ] {
            let name = role.name(&self.plan);
            let service = services::service(&self.plan, role, selector, owner.clone(), &discovered);
            self.apply(&api, &name, &service)
                .await
                .map_err(self.failed("applying a Service"))?;
            let rule = istio::destination_rule(&self.plan, &name, &self.owner_json());
            self.apply(&self.dynamic(&destination_rules()), &name, &rule)
                .await
                .map_err(self.failed("applying a DestinationRule"))?;
        }
        Ok(())
    }

    async fn apply_virtual_service(
        &self,
        route: Route,
        mode: RoutingMode,
    ) -> Result<(), PlatformError> {
        // Without filters the VirtualService sets and matches the session cookies, with the
        // values the filters would use: derived from the revision under analysis, which the
        // engine records as the target's revision.
        let session = match (mode, &self.plan.analysis.session_affinity) {
            (RoutingMode::Weights, Some(_)) => {
                let target = self.target().await?;
                let configs = self.configs(&target.spec.template).await?;
                let revision = configs::revision(&target.spec.template, &configs);
                crate::traffic::session_cookies(&self.plan, route, &revision)
            }
            _ => None,
        };
        let vs = istio::virtual_service(
            &self.plan,
            route,
            mode,
            &self.settings.routing_header,
            &self.plan.canary_route_value,
            session.as_ref(),
            &self.owner_json(),
        );
        self.apply(
            &self.dynamic(&virtual_services()),
            &self.plan.service.name,
            &vs,
        )
        .await
        .map_err(self.failed("applying the VirtualService"))
    }

    /// Whether a filter reported requests for the canary within the freshness window.
    fn filters_report(&self, now: Instant) -> bool {
        self.ingest
            .last_report(&self.plan.key())
            .is_some_and(|last| {
                now.saturating_duration_since(last) <= self.settings.report_freshness
            })
    }

    /// Filters while a filter reports for the canary (a report within the freshness window);
    /// weights once the canary has been routed for `fallback_after` without a report (none at
    /// all, or the filters went away); in between, the mode stays. Queues an event when the
    /// mode changes.
    fn decide_mode(&self) -> RoutingMode {
        let now = Instant::now();
        let mut state = self.routing.lock().unwrap_or_else(|p| p.into_inner());
        let since = *state.since.get_or_insert(now);
        // Silent since the last report, or since routing began if no report came after that.
        let quiet_since = self
            .ingest
            .last_report(&self.plan.key())
            .map_or(since, |last| last.max(since));
        let mode = if self.filters_report(now) {
            RoutingMode::Filters
        } else if now.saturating_duration_since(quiet_since) >= self.settings.fallback_after {
            RoutingMode::Weights
        } else {
            state.mode
        };
        if mode != state.mode {
            state.mode = mode;
            let vs = &self.plan.service.name;
            self.outbox.event(match mode {
                RoutingMode::Weights => Event {
                    severity: Severity::Warning,
                    reason: "RoutingFallback".to_owned(),
                    message: format!(
                        "No Weir filter reported for {} in the last {:?}; VirtualService {vs} now carries the canary weight (Flagger-style routing). Install the Weir EnvoyFilter (manifests/) for per-request splitting and streamed metrics",
                        self.plan.id(),
                        self.settings.fallback_after
                    ),
                },
                RoutingMode::Filters => Event {
                    severity: Severity::Normal,
                    reason: "RoutingFilters".to_owned(),
                    message: format!(
                        "Weir filters report for {}; VirtualService {vs} routes by the {} header again",
                        self.plan.id(),
                        self.settings.routing_header
                    ),
                },
            });
        }
        mode
    }

    /// The current routing mode.
    pub fn routing_mode(&self) -> RoutingMode {
        self.routing.lock().unwrap_or_else(|p| p.into_inner()).mode
    }

    /// Whether the routing mode may change soon: the canary is routed and no filter reports
    /// for it now, so it may fall back to weights, or a first report may bring it back (the
    /// reconciler then checks again soon).
    pub fn routing_unsettled(&self) -> bool {
        let routed = self
            .routing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .since
            .is_some();
        routed && !self.filters_report(Instant::now())
    }

    /// Called on every reconcile with the route the status calls for: rewrites the
    /// VirtualService when the routing mode changed since it was last written.
    pub async fn sync_routing(&self, route: Option<Route>) -> Result<(), PlatformError> {
        let Some(route) = route else {
            return Ok(());
        };
        let before = self.routing_mode();
        let mode = self.decide_mode();
        if mode != before {
            self.apply_virtual_service(route, mode).await?;
        }
        Ok(())
    }

    /// Traffic back to the target alone: the apex Service selects the target's pods and the
    /// VirtualService goes, so requests reach the Service as if Weir were not there.
    async fn route_to_target(&self) -> Result<(), PlatformError> {
        let target = self.target().await?;
        self.apply_services(&target, false).await?;
        match self
            .dynamic(&virtual_services())
            .delete(&self.plan.service.name, &DeleteParams::default())
            .await
        {
            Ok(_) => {}
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(self.failed("deleting the VirtualService")(e)),
        }
        self.routing.lock().unwrap_or_else(|p| p.into_inner()).since = None;
        Ok(())
    }

    /// With `autoscalerRef`: makes the primary's copy of the target's autoscaler, or brings it
    /// up to date with the original (called at each promotion and on every reconcile, so an
    /// edit of the original reaches the copy within an analysis interval).
    pub async fn sync_autoscaler(&self) -> Result<(), PlatformError> {
        let Some(autoscaler) = &self.plan.autoscaler else {
            return Ok(());
        };
        let (_, kind, _) = autoscalers::api(autoscaler.kind);
        let api = self.dynamic(&autoscaler_resource(autoscaler.kind));
        let original = api
            .get_opt(&autoscaler.name)
            .await
            .map_err(self.failed("reading the target's autoscaler"))?
            .ok_or_else(|| {
                self.invalid(format!(
                    "spec.autoscalerRef names {kind} {}, which does not exist in namespace {}; create it, or fix spec.autoscalerRef",
                    autoscaler.name, self.plan.namespace
                ))
            })?;
        let original = serde_json::to_value(&original).unwrap_or_default();
        let wanted =
            autoscalers::primary_copy(&self.plan, autoscaler, &original, &self.owner_json());
        let name = autoscalers::primary_name(autoscaler);
        let existing = api
            .get_opt(&name)
            .await
            .map_err(self.failed("reading the primary's autoscaler"))?;
        if let Some(existing) = existing {
            let existing = serde_json::to_value(&existing).unwrap_or_default();
            if autoscalers::up_to_date(&existing, &wanted) {
                return Ok(());
            }
        }
        self.apply(&api, &name, &wanted)
            .await
            .map_err(self.failed("applying the primary's autoscaler"))
    }

    /// Pauses (`true`) or resumes the target's ScaledObject; an HPA needs neither (see
    /// [`autoscalers`]).
    async fn pause_target_scaler(&self, pause: bool) -> Result<(), PlatformError> {
        let Some(autoscaler) = &self.plan.autoscaler else {
            return Ok(());
        };
        if autoscaler.kind != crate::spec::AutoscalerKind::ScaledObject {
            return Ok(());
        }
        let value = if pause { json!("0") } else { Value::Null };
        let patch =
            json!({"metadata": {"annotations": {autoscalers::KEDA_PAUSED_REPLICAS: value}}});
        self.dynamic(&autoscaler_resource(autoscaler.kind))
            .patch(
                &autoscaler.name,
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
            .map(|_| ())
            .map_err(self.failed(if pause {
                "pausing the target's ScaledObject"
            } else {
                "resuming the target's ScaledObject"
            }))
    }

    /// Before a Canary without `revertOnDeletion` goes: take the owner references off what serves
    /// traffic (the primary, its Services, the routing), so the garbage collector does not delete
    /// the only ready pods with the Canary. The objects stay; delete them when the app goes.
    pub async fn orphan(&self) -> Result<(), PlatformError> {
        let patch = Patch::Merge(json!({"metadata": {"ownerReferences": null}}));
        let params = PatchParams::default();
        let ignore_missing = |r: Result<(), kube::Error>| match r {
            Err(e) if is_not_found(&e) => Ok(()),
            other => other,
        };
        let primary = format!("{}{}", self.plan.target.name, deployments::PRIMARY_SUFFIX);
        ignore_missing(
            self.deployments()
                .patch(&primary, &params, &patch)
                .await
                .map(|_| ()),
        )
        .map_err(self.failed("releasing the primary Deployment"))?;
        // The primary's pods use the configuration copies: they stay too.
        if let Some(primary) = self
            .deployments()
            .get_opt(&primary)
            .await
            .map_err(self.failed("reading the primary Deployment"))?
        {
            for (kind, name) in configs::references(&primary.spec.template) {
                let result = match kind {
                    ConfigKind::ConfigMap => {
                        let api: Api<ConfigMap> =
                            Api::namespaced(self.client.clone(), &self.plan.namespace);
                        api.patch(&name, &params, &patch).await.map(|_| ())
                    }
                    ConfigKind::Secret => {
                        let api: Api<Secret> =
                            Api::namespaced(self.client.clone(), &self.plan.namespace);
                        api.patch(&name, &params, &patch).await.map(|_| ())
                    }
                };
                ignore_missing(result).map_err(self.failed("releasing a configuration copy"))?;
            }
        }
        let services: Api<Service> = Api::namespaced(self.client.clone(), &self.plan.namespace);
        let routed = [
            services::primary_name(&self.plan),
            services::canary_name(&self.plan),
        ];
        for name in &routed {
            ignore_missing(services.patch(name, &params, &patch).await.map(|_| ()))
                .map_err(self.failed("releasing a Service"))?;
            ignore_missing(
                self.dynamic(&destination_rules())
                    .patch(name, &params, &patch)
                    .await
                    .map(|_| ()),
            )
            .map_err(self.failed("releasing a DestinationRule"))?;
        }
        if let Some(autoscaler) = &self.plan.autoscaler {
            // The primary stays, and goes on scaling.
            ignore_missing(
                self.dynamic(&autoscaler_resource(autoscaler.kind))
                    .patch(&autoscalers::primary_name(autoscaler), &params, &patch)
                    .await
                    .map(|_| ()),
            )
            .map_err(self.failed("releasing the primary's autoscaler"))?;
        }
        ignore_missing(
            self.dynamic(&virtual_services())
                .patch(&self.plan.service.name, &params, &patch)
                .await
                .map(|_| ()),
        )
        .map_err(self.failed("releasing the VirtualService"))
    }
}

impl Platform for KubernetesPlatform {
    async fn target_revision(&self, _canary: &CanaryRef) -> Result<String, PlatformError> {
        let target = self.target().await?;
        let configs = self.configs(&target.spec.template).await?;
        Ok(configs::revision(&target.spec.template, &configs))
    }

    async fn primary_revision(&self, _canary: &CanaryRef) -> Result<Option<String>, PlatformError> {
        let name = format!("{}{}", self.plan.target.name, deployments::PRIMARY_SUFFIX);
        let primary = self
            .deployments()
            .get_opt(&name)
            .await
            .map_err(self.failed("reading the primary Deployment"))?;
        Ok(primary.map(|p| {
            p.metadata
                .annotations
                .and_then(|mut a| a.remove(REVISION_ANNOTATION))
                .unwrap_or_else(|| UNRECORDED_REVISION.to_owned())
        }))
    }

    async fn promote_to_primary(&self, _canary: &CanaryRef) -> Result<(), PlatformError> {
        let target = self.target().await?;
        let configs = self.configs(&target.spec.template).await?;
        for (reference, content) in &configs {
            if let Some(content) = content {
                self.copy_config(reference, content).await?;
            }
        }
        let mut primary = deployments::primary_deployment(&target, self.owner.clone())
            .map_err(|e| self.invalid(e))?;
        if self.plan.autoscaler.is_some() {
            // The primary's autoscaler owns its replicas once it runs (Flagger's `Promote`
            // leaves them alone too): keep what it set.
            let name = primary.metadata.name.clone().unwrap_or_default();
            if let Some(running) = self
                .deployments()
                .get_opt(&name)
                .await
                .map_err(self.failed("reading the primary Deployment"))?
            {
                primary.spec.replicas = running.spec.replicas.or(primary.spec.replicas);
            }
        }
        if !configs.is_empty() {
            primary.spec.template = configs::to_primary(&primary.spec.template);
        }
        primary
            .metadata
            .annotations
            .get_or_insert_with(Default::default)
            .insert(
                REVISION_ANNOTATION.to_owned(),
                configs::revision(&target.spec.template, &configs),
            );
        let name = primary.metadata.name.clone().unwrap_or_default();
        // Returns once applied: the engine waits for the primary's readiness on its next steps
        // instead of holding a reconcile for the length of a rollout.
        self.apply(&self.deployments(), &name, &primary)
            .await
            .map_err(self.failed("applying the primary Deployment"))?;
        self.sync_autoscaler().await
    }

    async fn scale_canary(&self, _canary: &CanaryRef, up: bool) -> Result<(), PlatformError> {
        // A ScaledObject would scale the target back up: paused first, resumed first.
        self.pause_target_scaler(!up).await?;
        let target = self.target().await?;
        let current = target.spec.replicas.unwrap_or(1);
        let patch = if up {
            let wanted = deployments::desired_replicas(&target);
            let marked = target
                .metadata
                .annotations
                .as_ref()
                .is_some_and(|a| a.contains_key(SCALED_FROM_ANNOTATION));
            if current == wanted && !marked {
                return Ok(());
            }
            // The annotation only means something while Weir holds the target at zero: once
            // it runs again (a new revision, or given back on deletion), it goes.
            json!({
                "metadata": {"annotations": {SCALED_FROM_ANNOTATION: null}},
                "spec": {"replicas": wanted},
            })
        } else {
            if current == 0 {
                return Ok(());
            }
            json!({
                "metadata": {"annotations": {SCALED_FROM_ANNOTATION: current.to_string()}},
                "spec": {"replicas": 0},
            })
        };
        // A merge patch, not an apply: the target belongs to its author (kubectl, a GitOps
        // tool); Weir changes only its replicas, as Flagger does.
        self.deployments()
            .patch(
                &self.plan.target.name,
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
            .map(|_| ())
            .map_err(self.failed(if up {
                "scaling up the target"
            } else {
                "scaling the target to zero"
            }))
    }

    async fn readiness(&self, _canary: &CanaryRef) -> Readiness {
        let api = self.deployments();
        let primary_name = format!("{}{}", self.plan.target.name, deployments::PRIMARY_SUFFIX);
        let primary = match api.get_opt(&primary_name).await {
            Ok(Some(d)) => deployments::readiness(&d, self.plan.analysis.primary_ready_threshold),
            Ok(None) => Err(format!("{primary_name} is not created yet")),
            Err(e) => Err(format!("cannot read {primary_name}: {e}")),
        };
        let canary = match api.get_opt(&self.plan.target.name).await {
            Ok(Some(d)) => deployments::readiness(&d, self.plan.analysis.canary_ready_threshold),
            Ok(None) => Err(format!("{} does not exist", self.plan.target.name)),
            Err(e) => Err(format!("cannot read {}: {e}", self.plan.target.name)),
        };
        Readiness { primary, canary }
    }

    async fn apply_route(
        &self,
        _canary: &CanaryRef,
        route: Option<Route>,
    ) -> Result<(), PlatformError> {
        let Some(route) = route else {
            return self.route_to_target().await;
        };
        let target = self.target().await?;
        self.apply_services(&target, true).await?;
        let mode = self.decide_mode();
        self.apply_virtual_service(route, mode).await
    }
}
