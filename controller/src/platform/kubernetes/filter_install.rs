//! The filter in the mesh: the WasmPlugin (or, with `--filter-install envoyfilter`, the
//! EnvoyFilter) that the leading controller applies, pointing at the module it serves.
//!
//! One meaning, two renderings: [`FilterInstallation`] holds what both need (the module's URL and
//! sha256, the filter's configuration, how a workload opts in), and [`FilterInstallation::object`]
//! renders it as either kind. What opts in:
//!
//! - a Pod labelled `weir.dev/filter=enabled` (workloads and ingress gateways alike): one object
//!   named `weir` in Istio's root namespace, with that label as its workload selector, which Istio
//!   applies to matching Pods in every namespace;
//! - every Pod of a Namespace labelled `weir.dev/filter=enabled`: one object named `weir` in that
//!   namespace, without a selector.
//!
//! A Pod that both select gets the filter twice in its chain; the filter itself makes sure that
//! only one instance acts (see the filter's `instances` module). Objects Weir made carry
//! `app.kubernetes.io/managed-by: weir`; those no longer wanted (the label was removed, or the
//! install kind changed) are deleted.
//!
//! What Istio's agent does while it cannot fetch the module (the controller is down, the URL is
//! stale): with `failStrategy: FAIL_OPEN` it hands Envoy an allow-all RBAC filter in the plugin's
//! place (istio pkg/wasm/convert.go), so requests flow without Weir: they take the
//! VirtualService's default route (the primary) unless the canary's weights moved into the
//! VirtualService (the fallback), and nothing is measured. The next push of the WasmPlugin retries
//! the fetch. A module once fetched is cached by the agent under its sha256.

use std::collections::BTreeSet;
use std::time::Duration;

use k8s_openapi::api::core::v1::Namespace;
use kube::api::{
    ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams,
};
use kube::{Api, Client};
use serde_json::{json, Value};

use crate::filter_module::{remote_plugin_config, FilterModule, InstallKind};

use super::FIELD_MANAGER;

/// The label that opts a Pod, or every Pod of a Namespace, in.
pub const OPT_IN_LABEL: &str = "weir.dev/filter";
/// Its value.
pub const OPT_IN_VALUE: &str = "enabled";
/// The name of every object Weir applies.
pub const OBJECT_NAME: &str = "weir";
/// The WasmPlugin's `pluginName`, which Istio makes the filter's root id.
pub const PLUGIN_NAME: &str = "weir";
const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
/// What `weir render-filter` writes for the module's sha256 when it is given no module.
pub const DIGEST_PLACEHOLDER: &str = "SHA256-OF-weir_filter.wasm";
/// How often the installation is checked even without a namespace change.
const RESYNC: Duration = Duration::from_secs(60);

/// What the installed filter needs to know, compiled once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilterInstallation {
    /// Which kind of object carries the filter.
    pub kind: InstallKind,
    /// Istio's root namespace (`istio-system`): an object there applies mesh-wide.
    pub root_namespace: String,
    /// Where Istio's agent (or Envoy) fetches the module.
    pub module_url: String,
    /// The module's sha256.
    pub sha256: String,
    /// Istio's outbound cluster of the controller's HTTP port, which Envoy fetches the module
    /// over (EnvoyFilter only: a WasmPlugin's module is fetched by the agent).
    pub module_cluster: String,
    /// The filter's configuration (its camelCase JSON schema).
    pub filter_config: Value,
}

/// Settings of [`FilterInstallation::new`].
#[derive(Debug, Clone)]
pub struct InstallSettings {
    /// Which kind of object carries the filter.
    pub kind: InstallKind,
    /// Istio's root namespace.
    pub root_namespace: String,
    /// The controller's namespace and Service name (the filters' way to the controller).
    pub controller_namespace: String,
    /// The controller Service's gRPC port.
    pub grpc_port: u16,
    /// The controller Service's HTTP port (the module).
    pub http_port: u16,
    /// The filter's routing header (the VirtualServices match it).
    pub routing_header: String,
}

impl FilterInstallation {
    /// The installation of `module` for a controller whose Service is `weir` in
    /// `settings.controller_namespace`.
    pub fn new(module: &FilterModule, settings: &InstallSettings) -> Self {
        Self::for_digest(module.sha256(), settings)
    }

    /// The installation of the module whose sha256 is `sha256` (served at
    /// `/filter/<sha256>.wasm`, see [`FilterModule::url_path`]).
    pub fn for_digest(sha256: &str, settings: &InstallSettings) -> Self {
        let host = format!("weir.{}.svc.cluster.local", settings.controller_namespace);
        Self {
            kind: settings.kind,
            root_namespace: settings.root_namespace.clone(),
            module_url: format!("http://{host}:{}/filter/{sha256}.wasm", settings.http_port),
            sha256: sha256.to_owned(),
            module_cluster: format!("outbound|{}||{host}", settings.http_port),
            filter_config: json!({
                // Istio's own outbound cluster for the controller's Service: no cluster patch,
                // and Istio's mTLS carries the calling workload's certificate.
                "controllerCluster": format!("outbound|{}||{host}", settings.grpc_port),
                "controllerAuthority": host,
                "reportInterval": "1s",
                "directiveGracePeriod": "10s",
                "routingHeader": settings.routing_header,
                "failure": {"statusCodes": ["5xx"]},
                "envoyStats": true,
            }),
        }
    }

    fn labels(&self) -> Value {
        json!({"app.kubernetes.io/name": "weir", MANAGED_BY: "weir"})
    }

    /// The object for `namespace`: with the Pod selector in the root namespace, without one in
    /// an opted-in namespace. None for [`InstallKind::None`].
    pub fn object(&self, namespace: &str) -> Option<Value> {
        let selected = namespace == self.root_namespace;
        match self.kind {
            InstallKind::WasmPlugin => Some(self.wasm_plugin(namespace, selected)),
            InstallKind::EnvoyFilter => Some(self.envoy_filter(namespace, selected)),
            InstallKind::None => None,
        }
    }

    /// The WasmPlugin (extensions.istio.io/v1alpha1). Fields used, with the oldest Istio release
    /// that has them: `selector`, `url`, `sha256`, `pluginName`, `pluginConfig` (1.12), `match`
    /// (1.16), `failStrategy` (1.19).
    fn wasm_plugin(&self, namespace: &str, selected: bool) -> Value {
        let mut spec = json!({
            "url": self.module_url,
            "sha256": self.sha256,
            "pluginName": PLUGIN_NAME,
            // Outbound traffic of sidecars, and gateways (whose listeners count as CLIENT).
            "match": [{"mode": "CLIENT"}],
            // Should the module not load, requests skip the filter instead of failing.
            "failStrategy": "FAIL_OPEN",
            "pluginConfig": self.filter_config,
        });
        if selected {
            spec["selector"] = json!({"matchLabels": {OPT_IN_LABEL: OPT_IN_VALUE}});
        }
        json!({
            "apiVersion": "extensions.istio.io/v1alpha1",
            "kind": "WasmPlugin",
            "metadata": {"name": OBJECT_NAME, "namespace": namespace, "labels": self.labels()},
            "spec": spec,
        })
    }

    /// The EnvoyFilter (networking.istio.io/v1alpha3): only HTTP_FILTER patches (sidecar
    /// outbound and gateway), Envoy fetching the module itself over Istio's outbound cluster
    /// (`vm_config.code.remote.http_uri` with `sha256`). No `vm_id`, no bootstrap extension.
    fn envoy_filter(&self, namespace: &str, selected: bool) -> Value {
        let filter = json!({
            "name": "weir",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
                "config": remote_plugin_config(
                    &format!("{namespace}.weir-envoyfilter"),
                    &self.module_url,
                    &self.module_cluster,
                    &self.sha256,
                    &self.filter_config.to_string(),
                ),
            },
        });
        let patch = |context: &str| {
            json!({
                "applyTo": "HTTP_FILTER",
                "match": {
                    "context": context,
                    "listener": {"filterChain": {"filter": {
                        "name": "envoy.filters.network.http_connection_manager",
                        "subFilter": {"name": "envoy.filters.http.router"},
                    }}},
                },
                "patch": {"operation": "INSERT_BEFORE", "value": filter},
            })
        };
        let mut spec = json!({"configPatches": [patch("SIDECAR_OUTBOUND"), patch("GATEWAY")]});
        if selected {
            spec["workloadSelector"] = json!({"labels": {OPT_IN_LABEL: OPT_IN_VALUE}});
        }
        json!({
            "apiVersion": "networking.istio.io/v1alpha3",
            "kind": "EnvoyFilter",
            "metadata": {"name": OBJECT_NAME, "namespace": namespace, "labels": self.labels()},
            "spec": spec,
        })
    }
}

fn wasm_plugins() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("extensions.istio.io", "v1alpha1", "WasmPlugin"),
        "wasmplugins",
    )
}

fn envoy_filters() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("networking.istio.io", "v1alpha3", "EnvoyFilter"),
        "envoyfilters",
    )
}

/// Why the installation could not be brought up to date.
#[derive(Debug, thiserror::Error)]
#[error("installing the filter: {action}: {source}")]
pub struct InstallError {
    action: String,
    source: kube::Error,
}

fn failed(action: impl Into<String>) -> impl FnOnce(kube::Error) -> InstallError {
    let action = action.into();
    move |source| InstallError { action, source }
}

/// What one pass changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InstallReport {
    /// Namespaces whose object was applied.
    pub applied: Vec<String>,
    /// `<kind> <namespace>/<name>` of objects deleted.
    pub deleted: Vec<String>,
}

/// One pass: applies the object in the root namespace and in every opted-in namespace, and
/// deletes the objects Weir made that are no longer wanted (of either kind).
pub async fn reconcile(
    client: &Client,
    installation: &FilterInstallation,
) -> Result<InstallReport, InstallError> {
    let mut report = InstallReport::default();
    let selector = format!("{OPT_IN_LABEL}={OPT_IN_VALUE}");
    let opted_in = Api::<Namespace>::all(client.clone())
        .list_metadata(&ListParams::default().labels(&selector))
        .await
        .map_err(failed(
            "listing the namespaces labelled weir.dev/filter=enabled",
        ))?;
    let mut wanted: BTreeSet<String> = opted_in
        .items
        .into_iter()
        .filter_map(|ns| ns.metadata.name)
        .collect();
    wanted.insert(installation.root_namespace.clone());
    if installation.kind != InstallKind::None {
        let resource = match installation.kind {
            InstallKind::EnvoyFilter => envoy_filters(),
            _ => wasm_plugins(),
        };
        for namespace in &wanted {
            let Some(object) = installation.object(namespace) else {
                continue;
            };
            let object: DynamicObject = serde_json::from_value(object)
                .map_err(|e| failed("rendering the object")(kube::Error::SerdeError(e)))?;
            Api::<DynamicObject>::namespaced_with(client.clone(), namespace, &resource)
                .patch(
                    OBJECT_NAME,
                    &PatchParams::apply(FIELD_MANAGER).force(),
                    &Patch::Apply(&object),
                )
                .await
                .map_err(failed(format!(
                    "applying {} {namespace}/{OBJECT_NAME}",
                    resource.kind
                )))?;
            report.applied.push(namespace.clone());
        }
    }
    // With `none` the operator manages the objects (perhaps rendered by `weir render-filter`,
    // labels included): leave them alone.
    let cleanup = if installation.kind == InstallKind::None {
        Vec::new()
    } else {
        vec![wasm_plugins(), envoy_filters()]
    };
    for resource in cleanup {
        let ours = match installation.kind {
            InstallKind::WasmPlugin => resource.kind == "WasmPlugin",
            InstallKind::EnvoyFilter => resource.kind == "EnvoyFilter",
            InstallKind::None => false,
        };
        let api = Api::<DynamicObject>::all_with(client.clone(), &resource);
        let managed = api
            .list_metadata(&ListParams::default().labels(&format!("{MANAGED_BY}=weir")))
            .await
            .map_err(failed(format!("listing the {} Weir made", resource.plural)))?;
        for object in managed.items {
            let (Some(namespace), Some(name)) = (object.metadata.namespace, object.metadata.name)
            else {
                continue;
            };
            if ours && name == OBJECT_NAME && wanted.contains(&namespace) {
                continue;
            }
            Api::<DynamicObject>::namespaced_with(client.clone(), &namespace, &resource)
                .delete(&name, &DeleteParams::default())
                .await
                .map_err(failed(format!(
                    "deleting {} {namespace}/{name}",
                    resource.kind
                )))?;
            report
                .deleted
                .push(format!("{} {namespace}/{name}", resource.kind));
        }
    }
    Ok(report)
}

/// Keeps the installation current while this replica leads: a pass at once, then on every
/// change to an opted-in namespace (a watch) and at least every minute. Errors are logged and
/// retried at the next pass.
pub async fn run(client: Client, installation: FilterInstallation) {
    use futures::StreamExt;
    use kube::core::PartialObjectMeta;
    use kube::runtime::{watcher, WatchStreamExt};

    let namespaces = Api::<PartialObjectMeta<Namespace>>::all(client.clone());
    let config = watcher::Config::default().labels(&format!("{OPT_IN_LABEL}={OPT_IN_VALUE}"));
    let mut changes = watcher(namespaces, config).default_backoff().boxed();
    loop {
        match reconcile(&client, &installation).await {
            Ok(report) => tracing::info!(
                applied = ?report.applied,
                deleted = ?report.deleted,
                url = %installation.module_url,
                "filter installation up to date"
            ),
            Err(e) => tracing::warn!("{e}; retrying"),
        }
        let wait = tokio::time::sleep(RESYNC);
        tokio::pin!(wait);
        loop {
            tokio::select! {
                () = &mut wait => break,
                event = changes.next() => match event {
                    Some(Ok(watcher::Event::Apply(_) | watcher::Event::Delete(_) | watcher::Event::InitDone)) => break,
                    Some(Ok(_)) => {}
                    Some(Err(e)) => tracing::debug!(error = %e, "namespace watch"),
                    // The stream never ends with a backoff; should it, the resync still runs.
                    None => wait.as_mut().await,
                }
            }
        }
    }
}

impl Default for InstallSettings {
    /// The install in manifests/: controller in weir-system on ports 9090 and 8080, Istio's root
    /// namespace istio-system, the default routing header.
    fn default() -> Self {
        Self {
            kind: InstallKind::WasmPlugin,
            root_namespace: "istio-system".to_owned(),
            controller_namespace: "weir-system".to_owned(),
            grpc_port: 9090,
            http_port: 8080,
            routing_header: crate::platform::local::envoy::ROUTING_HEADER.to_owned(),
        }
    }
}

/// The mesh-wide object as YAML, for `weir render-filter` and manifests/alternatives/.
pub fn to_yaml(installation: &FilterInstallation) -> String {
    installation
        .object(&installation.root_namespace)
        .and_then(|object| serde_yaml::to_string(&object).ok())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn installation(kind: InstallKind) -> FilterInstallation {
        FilterInstallation::new(
            &FilterModule::from_bytes(&b"\0asm\x01\0\0\0"[..]),
            &InstallSettings {
                kind,
                root_namespace: "istio-system".into(),
                controller_namespace: "weir-system".into(),
                grpc_port: 9090,
                http_port: 8080,
                routing_header: "x-weir-route".into(),
            },
        )
    }

    #[test]
    fn the_wasm_plugin_points_at_the_served_module_and_selects_the_opt_in_label() {
        let plugin = installation(InstallKind::WasmPlugin)
            .object("istio-system")
            .unwrap();
        let spec = &plugin["spec"];
        assert_eq!(
            spec["url"],
            "http://weir.weir-system.svc.cluster.local:8080/filter/93a44bbb96c751218e4c00d479e4c14358122a389acca16205b1e4d0dc5f9476.wasm"
        );
        assert_eq!(
            spec["sha256"],
            "93a44bbb96c751218e4c00d479e4c14358122a389acca16205b1e4d0dc5f9476"
        );
        assert_eq!(spec["match"], json!([{"mode": "CLIENT"}]));
        assert_eq!(spec["failStrategy"], "FAIL_OPEN");
        assert_eq!(spec["pluginName"], "weir");
        assert_eq!(
            spec["selector"],
            json!({"matchLabels": {"weir.dev/filter": "enabled"}})
        );
        assert_eq!(
            spec["pluginConfig"]["controllerCluster"],
            "outbound|9090||weir.weir-system.svc.cluster.local"
        );
        // In an opted-in namespace, every Pod: no selector.
        let namespaced = installation(InstallKind::WasmPlugin)
            .object("application")
            .unwrap();
        assert!(namespaced["spec"].get("selector").is_none());
        assert_eq!(namespaced["metadata"]["namespace"], "application");
    }

    #[test]
    fn the_envoy_filter_has_only_http_filter_patches_and_fetches_the_module_itself() {
        let filter = installation(InstallKind::EnvoyFilter)
            .object("istio-system")
            .unwrap();
        let patches = filter["spec"]["configPatches"].as_array().unwrap();
        assert_eq!(patches.len(), 2);
        for (patch, context) in patches.iter().zip(["SIDECAR_OUTBOUND", "GATEWAY"]) {
            assert_eq!(patch["applyTo"], "HTTP_FILTER");
            assert_eq!(patch["match"]["context"], context);
            let config = &patch["patch"]["value"]["typed_config"]["config"];
            assert!(config["vm_config"].get("vm_id").is_none());
            let remote = &config["vm_config"]["code"]["remote"];
            assert_eq!(
                remote["http_uri"]["cluster"],
                "outbound|8080||weir.weir-system.svc.cluster.local"
            );
            assert_eq!(
                remote["sha256"],
                "93a44bbb96c751218e4c00d479e4c14358122a389acca16205b1e4d0dc5f9476"
            );
        }
        assert_eq!(
            filter["spec"]["workloadSelector"],
            json!({"labels": {"weir.dev/filter": "enabled"}})
        );
        assert!(!filter.to_string().contains("BOOTSTRAP"));
        assert!(installation(InstallKind::None).object("x").is_none());
    }
}
