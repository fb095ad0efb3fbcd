//! The Envoy that fronts local workloads: one source of truth for its bootstrap (used by local
//! mode, the end-to-end tests and the benchmarks) and a guard for the process.
//!
//! The bootstrap routes on one header: a request whose routing header holds the canary value goes
//! to the `canary` cluster, every other request to `primary`. Without the Weir filter a client
//! could choose its version that way; with it, the filter strips what the client sent and sets the
//! header itself, and Envoy re-selects the route.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::filter_module::remote_plugin_config;
use crate::spec::{RouteOptions, StringMatcher};

/// The header the filter sets and the routes match, unless configured otherwise.
pub const ROUTING_HEADER: &str = "x-weir-route";
/// Routing-header value that selects the canary.
pub const CANARY_VALUE: &str = "canary";
/// Routing-header value for the primary (any value but the canary's routes there).
pub const PRIMARY_VALUE: &str = "primary";
/// The controller Service's host name, as in a cluster.
pub const CONTROLLER_HOST: &str = "weir.weir-system.svc.cluster.local";
/// Name of the cluster that reaches the controller's gRPC port: the name Istio gives the outbound
/// cluster of the controller's Service (`outbound|<port>||<host>`), which is the filter's default
/// `controllerCluster`, so the filter runs here with the configuration it has in a mesh.
pub const CONTROLLER_CLUSTER: &str = "outbound|9090||weir.weir-system.svc.cluster.local";
/// Name of the cluster that reaches the controller's HTTP port (the module, for the EnvoyFilter
/// install): Istio's outbound cluster of the same Service's http port.
pub const CONTROLLER_HTTP_CLUSTER: &str = "outbound|8080||weir.weir-system.svc.cluster.local";
/// Name of the cluster for the primary workload.
pub const PRIMARY_CLUSTER: &str = "primary";
/// Name of the cluster for the canary workload.
pub const CANARY_CLUSTER: &str = "canary";
/// The name Istio gives the filter it derives from the controller's WasmPlugin
/// (`<namespace>.<name>`).
pub const PLUGIN_RESOURCE_NAME: &str = "istio-system.weir";
/// The WasmPlugin's `pluginName`, which Istio makes the filter's root id.
pub const PLUGIN_NAME: &str = "weir";
/// The key under which Istio puts the WasmPlugin's resource version into the VM's environment
/// (so that a new version starts new VMs).
pub const RESOURCE_VERSION_ENV: &str = "ISTIO_META_WASM_PLUGIN_RESOURCE_VERSION";
/// The only Wasm runtime in the Envoy builds we use.
pub const WASM_RUNTIME: &str = "envoy.wasm.runtime.v8";
/// The Wasm filter's config type.
pub const WASM_FILTER_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm";
/// The RBAC filter's type: Istio's agent replaces a WasmPlugin whose module it cannot fetch by an
/// allow-all (FAIL_OPEN) or deny-all RBAC filter, so the discovered filter may be either.
pub const RBAC_FILTER_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC";
/// How long [`EnvoyProcess::start`] waits for Envoy to be ready.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// The Weir filter to load, and how the mesh would install it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WasmFilter {
    /// The filter's JSON configuration (the filter's camelCase schema, e.g.
    /// `{"reportInterval":"1s",...}`).
    pub config_json: String,
    /// How it gets into Envoy.
    pub install: FilterInstall,
}

/// The two ways a mesh installs the filter; neither has a bootstrap extension or a `vm_id`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FilterInstall {
    /// As Istio delivers a `WasmPlugin`: the listener names a filter that Envoy discovers through
    /// ECDS (here from `discovery`, a file Envoy watches; in a mesh, from istiod), with `root_id` =
    /// the plugin name, no `vm_id`, the resource version in the VM's environment, and the module
    /// as a local file (Istio's agent downloads it and hands Envoy the file).
    WasmPlugin {
        /// The filter's name, `<namespace>.<name>` of the WasmPlugin.
        name: String,
        /// The `.wasm` file.
        module: PathBuf,
        /// The ECDS file (written by [`EnvoyBootstrap::write_filter_discovery`]).
        discovery: PathBuf,
        /// The WasmPlugin's resource version; a new one replaces every filter VM.
        resource_version: String,
    },
    /// As `manifests/alternatives/` installs it with an EnvoyFilter: the Wasm filter inline in the
    /// listener, its module fetched by Envoy itself from the controller (`http_uri` over the
    /// controller's HTTP cluster, checked against `sha256`).
    EnvoyFilter {
        /// Where the controller serves the module.
        server: SocketAddr,
        /// The module's path on that server (`/filter/<sha256>.wasm`).
        path: String,
        /// The module's sha256, hex.
        sha256: String,
    },
}

impl WasmFilter {
    /// The filter as a WasmPlugin installs it, discovered from `discovery`.
    pub fn wasm_plugin(module: PathBuf, config_json: String, discovery: PathBuf) -> Self {
        Self {
            config_json,
            install: FilterInstall::WasmPlugin {
                name: PLUGIN_RESOURCE_NAME.to_owned(),
                module,
                discovery,
                resource_version: "1".to_owned(),
            },
        }
    }
}

/// The controller cluster's TLS: the certificate Envoy presents (its workload identity) and the CA
/// it verifies the controller's certificate with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControllerTls {
    /// Envoy's certificate chain (PEM), with a `spiffe://` URI SAN.
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
    /// The CA the controller's certificate chains to (PEM).
    pub ca: PathBuf,
}

/// Everything that varies between the Envoys Weir starts locally. Build one with
/// [`EnvoyBootstrap::new`] and adjust the public fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvoyBootstrap {
    /// Envoy's node id; the filter reports under it.
    pub node_id: String,
    /// Envoy's node cluster.
    pub node_cluster: String,
    /// Node metadata `NAMESPACE` (Istio's key), read by the filter for its reporter identity.
    pub namespace: String,
    /// Node metadata `WORKLOAD_NAME` (Istio's key), read by the filter for its reporter identity.
    pub workload: String,
    /// Port of the one listener on 127.0.0.1; 0 lets the OS choose (see
    /// [`EnvoyProcess::listener_addr`]).
    pub listener_port: u16,
    /// Port of the admin interface on 127.0.0.1; 0 lets the OS choose.
    pub admin_port: u16,
    /// Where the primary workload listens.
    pub primary: SocketAddr,
    /// A second primary endpoint (local mode's standby slot for zero-downtime promotions). When
    /// set, the primary cluster is health checked (TCP connect) and its route retries connection
    /// failures, so requests skip whichever slot is down.
    pub primary_standby: Option<SocketAddr>,
    /// Where the canary workload listens.
    pub canary: SocketAddr,
    /// Where the controller's gRPC server listens; None leaves out [`CONTROLLER_CLUSTER`].
    pub controller: Option<SocketAddr>,
    /// TLS to the controller, as Istio's mTLS does in a mesh; None: plaintext.
    pub controller_tls: Option<ControllerTls>,
    /// The Weir filter; None runs Envoy with the router alone.
    pub wasm: Option<WasmFilter>,
    /// Further installations of the filter in the same chain, after [`Self::wasm`] (a mesh that
    /// installs it twice, e.g. for a namespace and for a Pod label).
    pub extra_filters: Vec<WasmFilter>,
    /// The header the canary route matches.
    pub routing_header: String,
    /// The value of [`Self::routing_header`] that selects the canary.
    pub canary_value: String,
    /// The service's host name (names the virtual host; clients send it as the authority and
    /// directives list it). The virtual host itself matches every domain.
    pub host: String,
    /// `spec.service`'s route options, on the primary and the canary route alike (see
    /// [`RouteOptions`]: the VirtualService renders the same value in a cluster).
    pub routes: RouteOptions,
}

impl EnvoyBootstrap {
    /// A bootstrap for one service with these two upstreams, on OS-chosen ports, with no filter
    /// and no controller.
    pub fn new(primary: SocketAddr, canary: SocketAddr) -> Self {
        Self {
            node_id: "weir-local".to_owned(),
            node_cluster: "weir-local".to_owned(),
            namespace: "default".to_owned(),
            workload: "weir-local".to_owned(),
            listener_port: 0,
            admin_port: 0,
            primary,
            primary_standby: None,
            canary,
            controller: None,
            controller_tls: None,
            wasm: None,
            extra_filters: Vec::new(),
            routing_header: ROUTING_HEADER.to_owned(),
            canary_value: CANARY_VALUE.to_owned(),
            host: "mhs.application".to_owned(),
            routes: RouteOptions::default(),
        }
    }

    /// The bootstrap as Envoy's JSON (Envoy reads it from a `.json` file).
    pub fn to_json(&self) -> Value {
        let mut http_filters = Vec::new();
        let mut clusters: Vec<Value> = Vec::new();
        for wasm in self.filters() {
            match &wasm.install {
                FilterInstall::WasmPlugin {
                    name, discovery, ..
                } => {
                    http_filters.push(json!({
                        "name": name,
                        "config_discovery": {
                            "config_source": {
                                "path_config_source": {"path": discovery.display().to_string()},
                                "resource_api_version": "V3",
                            },
                            "type_urls": [WASM_FILTER_TYPE, RBAC_FILTER_TYPE],
                        }
                    }));
                }
                FilterInstall::EnvoyFilter { server, .. } => {
                    http_filters.push(json!({
                        "name": "weir",
                        "typed_config": wasm.filter_config(),
                    }));
                    if !clusters
                        .iter()
                        .any(|c: &Value| c["name"] == CONTROLLER_HTTP_CLUSTER)
                    {
                        clusters.push(static_cluster(CONTROLLER_HTTP_CLUSTER, *server));
                    }
                }
            }
        }
        if self.routes.cors.is_some() {
            // First in the chain, as in Istio: a preflight request is answered here.
            http_filters.insert(0, json!({
                "name": CORS_FILTER,
                "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.cors.v3.Cors"},
            }));
        }
        http_filters.push(json!({
            "name": "envoy.filters.http.router",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}
        }));

        let mut primary = static_cluster(PRIMARY_CLUSTER, self.primary);
        let mut primary_route = json!({"cluster": PRIMARY_CLUSTER});
        if let Some(standby) = self.primary_standby {
            if let Some(endpoints) =
                primary["load_assignment"]["endpoints"][0]["lb_endpoints"].as_array_mut()
            {
                endpoints.push(json!({"endpoint": {"address": socket_address(standby)}}));
            }
            primary["health_checks"] = json!([{
                "timeout": "0.5s",
                "interval": "0.25s",
                // Envoy checks idle clusters only every 60s by default; a slot must come back at once.
                "no_traffic_interval": "0.25s",
                "unhealthy_threshold": 1,
                "healthy_threshold": 1,
                // A connect check: a slot whose process is gone is out within one interval.
                "tcp_health_check": {},
            }]);
            primary["common_lb_config"] = json!({
                "healthy_panic_threshold": {"value": 0},
                // Envoy hands health changes to its workers in batches, by default after up to
                // 1s: a new slot would stay out and a stopped one in for that long, and requests
                // whose every attempt meets the stopped slot fail. Apply each change at once.
                "update_merge_window": "0s",
            });
            // When a slot stops, every request in flight to it is retried at once; Envoy allows
            // only 3 retries in flight per cluster by default and fails the rest.
            primary["circuit_breakers"] = json!({"thresholds": [{"max_retries": 1024}]});
            primary_route["retry_policy"] = json!({
                "retry_on": "connect-failure,reset",
                "num_retries": 2,
                "retry_host_predicate": [{"name": "envoy.retry_host_predicates.previous_hosts", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"}}],
            });
        }
        let mut canary_route = json!({"cluster": CANARY_CLUSTER});
        self.routes.apply_to_action(&mut canary_route);
        self.routes.apply_to_action(&mut primary_route);
        let mut routes = Vec::new();
        for m in self.routes.envoy_matches() {
            let mut with_header = m.clone();
            let headers = with_header["headers"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            with_header["headers"] = json!(std::iter::once(json!({
                "name": self.routing_header,
                "string_match": {"exact": self.canary_value},
            }))
            .chain(headers)
            .collect::<Vec<_>>());
            routes.push(
                self.routes
                    .route(CANARY_CLUSTER, with_header, canary_route.clone()),
            );
        }
        for m in self.routes.envoy_matches() {
            routes.push(self.routes.route(PRIMARY_CLUSTER, m, primary_route.clone()));
        }
        clusters.insert(0, static_cluster(CANARY_CLUSTER, self.canary));
        clusters.insert(0, primary);
        if let Some(controller) = self.controller {
            let mut cluster = static_cluster(CONTROLLER_CLUSTER, controller);
            // The Exchange stream is gRPC, which needs HTTP/2 to the upstream (Istio's outbound
            // cluster of a port with appProtocol grpc is HTTP/2 too).
            cluster["typed_extension_protocol_options"] = json!({
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                    "explicit_http_config": {"http2_protocol_options": {}}
                }
            });
            if let Some(tls) = &self.controller_tls {
                let file = |p: &PathBuf| json!({"filename": p.display().to_string()});
                cluster["transport_socket"] = json!({
                    "name": "envoy.transport_sockets.tls",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                        "sni": CONTROLLER_HOST,
                        "common_tls_context": {
                            "tls_certificates": [{
                                "certificate_chain": file(&tls.cert),
                                "private_key": file(&tls.key),
                            }],
                            "validation_context": {
                                "trusted_ca": file(&tls.ca),
                                "match_typed_subject_alt_names": [{
                                    "san_type": "DNS",
                                    "matcher": {"exact": CONTROLLER_HOST},
                                }],
                            },
                        },
                    },
                });
            }
            clusters.push(cluster);
        }

        json!({
            // The filter's stats carry the canary and version in their names
            // (`weir_requests_total.canary.<ns>/<name>.version.<v>`); these rules make them tags.
            "stats_config": {"stats_tags": [
                {"tag_name": "version", "regex": "^(?:wasmcustom\\.)?weir_[a-z_]+\\.canary\\..+(\\.version\\.(primary|canary))$"},
                {"tag_name": "canary", "regex": "^(?:wasmcustom\\.)?weir_[a-z_]+(\\.canary\\.(.+?))(?:\\.version\\.(?:primary|canary))?$"},
            ]},
            "node": {
                "id": self.node_id,
                "cluster": self.node_cluster,
                "metadata": {"NAMESPACE": self.namespace, "WORKLOAD_NAME": self.workload},
            },
            "admin": {"address": socket_address(local(self.admin_port))},
            "static_resources": {
                "listeners": [{
                    "name": "weir_ingress",
                    "address": socket_address(local(self.listener_port)),
                    "filter_chains": [{"filters": [{
                        "name": "envoy.filters.network.http_connection_manager",
                        "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                            "stat_prefix": "weir_ingress",
                            "codec_type": "AUTO",
                            "route_config": {
                                "name": "weir_local",
                                "virtual_hosts": [{
                                    "name": self.host,
                                    // One service here; a mesh has one virtual host per service.
                                    "domains": ["*"],
                                    "routes": routes,
                                }],
                            },
                            "http_filters": http_filters,
                        }
                    }]}],
                }],
                "clusters": clusters,
            },
        })
    }

    /// The bootstrap as JSON text (valid YAML too).
    pub fn to_yaml(&self) -> String {
        // A Value of strings and maps always serializes.
        serde_json::to_string_pretty(&self.to_json()).unwrap_or_default()
    }

    fn filters(&self) -> impl Iterator<Item = &WasmFilter> {
        self.wasm.iter().chain(&self.extra_filters)
    }

    /// For each WasmPlugin install, writes the filter's ECDS resource (a `DiscoveryResponse`
    /// holding the filter under its name) to its discovery file, replacing the file at once
    /// (write, then rename: Envoy watches for the move). Writing it again with another
    /// configuration or resource version is how a test updates the filter while traffic flows.
    pub fn write_filter_discovery(&self) -> std::io::Result<()> {
        for wasm in self.filters() {
            if let FilterInstall::WasmPlugin {
                name,
                discovery,
                resource_version,
                ..
            } = &wasm.install
            {
                write_discovery(
                    discovery,
                    name,
                    resource_version,
                    json!({"@type": WASM_FILTER_TYPE, "config": wasm.plugin_config()}),
                )?;
            }
        }
        Ok(())
    }
}

/// Writes an ECDS `DiscoveryResponse` holding one filter config named `name`. `typed_config` is
/// the Wasm filter, or what Istio's agent puts in its place when the module cannot be fetched
/// (see [`allow_all_filter`]).
pub fn write_discovery(
    path: &Path,
    name: &str,
    version: &str,
    typed_config: Value,
) -> std::io::Result<()> {
    let response = json!({
        "version_info": version,
        "resources": [{
            "@type": "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig",
            "name": name,
            "typed_config": typed_config,
        }],
    });
    let tmp = path.with_extension("tmp");
    std::fs::write(
        &tmp,
        serde_json::to_string_pretty(&response).unwrap_or_default(),
    )?;
    std::fs::rename(&tmp, path)
}

/// The filter Istio's agent installs instead of a FAIL_OPEN WasmPlugin whose module it cannot
/// fetch: an RBAC filter with no rules, which allows everything (pkg/wasm/convert.go in Istio).
pub fn allow_all_filter() -> Value {
    json!({"@type": RBAC_FILTER_TYPE})
}

impl WasmFilter {
    /// The Wasm filter's typed config as this install has it (inline in the listener, or the
    /// discovered resource's).
    fn filter_config(&self) -> Value {
        json!({"@type": WASM_FILTER_TYPE, "config": self.plugin_config()})
    }

    /// The `PluginConfig`, shaped as Istio shapes a WasmPlugin's (or as the EnvoyFilter
    /// alternative writes it): no `vm_id`, so shared data is keyed by the empty string; the
    /// filter fails open, so should its VM fail, requests skip it (and reach the primary, the
    /// default route) instead of failing.
    fn plugin_config(&self) -> Value {
        match &self.install {
            FilterInstall::WasmPlugin {
                name,
                module,
                resource_version,
                ..
            } => json!({
                "name": name,
                "root_id": PLUGIN_NAME,
                "vm_config": {
                    "runtime": WASM_RUNTIME,
                    "code": {"local": {"filename": module.display().to_string()}},
                    "environment_variables": {"key_values": {RESOURCE_VERSION_ENV: resource_version}},
                },
                "configuration": {
                    "@type": "type.googleapis.com/google.protobuf.StringValue",
                    "value": self.config_json,
                },
                "failure_policy": "FAIL_OPEN",
            }),
            FilterInstall::EnvoyFilter { path, sha256, .. } => remote_plugin_config(
                "istio-system.weir-envoyfilter",
                &format!("http://{CONTROLLER_HOST}:8080{path}"),
                CONTROLLER_HTTP_CLUSTER,
                sha256,
                &self.config_json,
            ),
        }
    }
}

/// The name of Envoy's CORS filter, in the chain when `corsPolicy` is set.
pub const CORS_FILTER: &str = "envoy.filters.http.cors";

/// `spec.service`'s route options as Envoy's route configuration: the renderer for local mode,
/// beside the one for the VirtualService (`platform/kubernetes/istio.rs`), doing what istiod
/// makes of the same fields.
impl RouteOptions {
    /// Refuses what only Istio can evaluate (a `match` on source labels, ports, gateways, ...),
    /// naming the field: local mode's Envoy would route differently than the cluster.
    pub fn check_for_envoy(&self) -> Result<(), String> {
        for (i, m) in self.matches.iter().enumerate() {
            if let Some(key) = m.istio_only.keys().next() {
                return Err(format!(
                    "spec.service.match[{i}].{key}: only Istio evaluates this condition, so local \
                     mode's Envoy cannot route as the cluster would; remove it to run the Canary locally"
                ));
            }
        }
        Ok(())
    }

    /// Envoy route matches: one per `match` entry, or the catch-all.
    fn envoy_matches(&self) -> Vec<Value> {
        if self.matches.is_empty() {
            return vec![json!({"prefix": "/"})];
        }
        self.matches
            .iter()
            .map(|m| {
                let mut out = match &m.uri {
                    None => json!({"prefix": "/"}),
                    Some(StringMatcher::Exact(p)) => json!({"path": p}),
                    Some(StringMatcher::Prefix(p)) => json!({"prefix": p}),
                    Some(StringMatcher::Regex(r)) => json!({"safe_regex": {"regex": r}}),
                };
                if m.ignore_uri_case {
                    out["case_sensitive"] = json!(false);
                }
                // As istiod does: method, authority and scheme are pseudo-header matches.
                let mut headers: Vec<Value> = [
                    (":method", &m.method),
                    (":authority", &m.authority),
                    (":scheme", &m.scheme),
                ]
                .into_iter()
                .filter_map(|(name, v)| {
                    v.as_ref()
                        .map(|v| json!({"name": name, "string_match": envoy_string_match(v)}))
                })
                .collect();
                headers.extend(m.headers.iter().map(
                    |h| json!({"name": h.name, "string_match": envoy_string_match(&h.value)}),
                ));
                if !headers.is_empty() {
                    out["headers"] = json!(headers);
                }
                if !m.query_params.is_empty() {
                    out["query_parameters"] = json!(m
                        .query_params
                        .iter()
                        .map(|(k, v)| json!({"name": k, "string_match": envoy_string_match(v)}))
                        .collect::<Vec<_>>());
                }
                out
            })
            .collect()
    }

    /// Timeout, retries and rewrite, on a route action.
    fn apply_to_action(&self, action: &mut Value) {
        if let Some(timeout) = &self.timeout {
            action["timeout"] = json!(envoy_duration(timeout.value));
        }
        if let Some(retries) = &self.retries {
            let mut on: Vec<String> = Vec::new();
            let mut codes: Vec<u32> = Vec::new();
            for condition in retries.retry_on.as_deref().unwrap_or_default().split(',') {
                let condition = condition.trim();
                match condition.parse::<u32>() {
                    Ok(code) => codes.push(code),
                    Err(_) if !condition.is_empty() => on.push(condition.to_owned()),
                    Err(_) => {}
                }
            }
            if retries.retry_on.is_none() {
                // Istio's default conditions when retryOn is not set.
                on.extend(
                    [
                        "connect-failure",
                        "refused-stream",
                        "unavailable",
                        "cancelled",
                    ]
                    .map(str::to_owned),
                );
                codes.push(503);
            }
            if !codes.is_empty() {
                on.push("retriable-status-codes".to_owned());
            }
            // Local mode's standby primary slot needs connection failures retried elsewhere.
            let policy = action["retry_policy"].take();
            for needed in policy["retry_on"].as_str().unwrap_or_default().split(',') {
                if !needed.is_empty() && !on.iter().any(|o| o == needed) {
                    on.push(needed.to_owned());
                }
            }
            let mut new = json!({"retry_on": on.join(","), "num_retries": retries.attempts});
            if !codes.is_empty() {
                new["retriable_status_codes"] = json!(codes);
            }
            if let Some(t) = &retries.per_try_timeout {
                new["per_try_timeout"] = json!(envoy_duration(t.value));
            }
            if let Some(predicate) = policy.get("retry_host_predicate") {
                new["retry_host_predicate"] = predicate.clone();
            }
            action["retry_policy"] = new;
        }
        if let Some(rewrite) = &self.rewrite {
            if let Some(uri) = &rewrite.uri {
                action["prefix_rewrite"] = json!(uri);
            }
            if let Some(authority) = &rewrite.authority {
                action["host_rewrite_literal"] = json!(authority);
            }
        }
    }

    /// A route: its match and action, with the header operations and the CORS policy.
    fn route(&self, name: &str, route_match: Value, action: Value) -> Value {
        let mut route = json!({"name": name, "match": route_match, "route": action});
        if let Some(headers) = &self.headers {
            for (ops, add_key, remove_key) in [
                (
                    &headers.request,
                    "request_headers_to_add",
                    "request_headers_to_remove",
                ),
                (
                    &headers.response,
                    "response_headers_to_add",
                    "response_headers_to_remove",
                ),
            ] {
                let add: Vec<Value> = ops
                    .set
                    .iter()
                    .map(|(k, v)| (k, v, "OVERWRITE_IF_EXISTS_OR_ADD"))
                    .chain(ops.add.iter().map(|(k, v)| (k, v, "APPEND_IF_EXISTS_OR_ADD")))
                    .map(|(k, v, action)| {
                        json!({"header": {"key": k, "value": v}, "append_action": action})
                    })
                    .collect();
                if !add.is_empty() {
                    route[add_key] = json!(add);
                }
                if !ops.remove.is_empty() {
                    route[remove_key] = json!(ops.remove);
                }
            }
        }
        if let Some(cors) = &self.cors {
            let mut policy = json!({
                "@type": "type.googleapis.com/envoy.extensions.filters.http.cors.v3.CorsPolicy",
                "allow_origin_string_match": cors.allow_origins.iter().map(envoy_string_match).collect::<Vec<_>>(),
            });
            for (key, list) in [
                ("allow_methods", &cors.allow_methods),
                ("allow_headers", &cors.allow_headers),
                ("expose_headers", &cors.expose_headers),
            ] {
                if !list.is_empty() {
                    policy[key] = json!(list.join(","));
                }
            }
            if let Some(max_age) = &cors.max_age {
                policy["max_age"] = json!(max_age.value.as_secs().to_string());
            }
            if let Some(credentials) = cors.allow_credentials {
                policy["allow_credentials"] = json!(credentials);
            }
            route["typed_per_filter_config"] = json!({CORS_FILTER: policy});
        }
        route
    }
}

fn envoy_string_match(m: &StringMatcher) -> Value {
    match m {
        StringMatcher::Exact(v) => json!({"exact": v}),
        StringMatcher::Prefix(v) => json!({"prefix": v}),
        StringMatcher::Regex(r) => json!({"safe_regex": {"regex": r}}),
    }
}

/// A protobuf JSON duration (`1.500s`).
fn envoy_duration(d: Duration) -> String {
    format!("{}.{:09}s", d.as_secs(), d.subsec_nanos())
}

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn socket_address(addr: SocketAddr) -> Value {
    json!({"socket_address": {"address": addr.ip().to_string(), "port_value": addr.port()}})
}

fn static_cluster(name: &str, addr: SocketAddr) -> Value {
    json!({
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": socket_address(addr)}}]}],
        },
    })
}

/// Why an Envoy could not be started or asked something.
#[derive(Debug, thiserror::Error)]
pub enum EnvoyError {
    /// A file in the work directory could not be written or read.
    #[error("cannot use {path}: {source}; check that the work directory exists and is writable")]
    WorkDir {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The binary could not be run.
    #[error("cannot run Envoy at {binary}: {source}; install it with `cargo xtask test` or set WEIR_ENVOY")]
    Spawn {
        /// The binary.
        binary: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Envoy stopped before it was ready (usually a bootstrap it refused; see the log).
    #[error("Envoy exited ({status}) before it was ready; last lines of {log}:\n{tail}")]
    Exited {
        /// How it ended.
        status: ExitStatus,
        /// Its log file.
        log: PathBuf,
        /// The end of its log.
        tail: String,
    },
    /// Envoy ran but was not ready in time.
    #[error("Envoy was not ready after {waited:?}; last lines of {log}:\n{tail}")]
    NotReady {
        /// How long we waited.
        waited: Duration,
        /// Its log file.
        log: PathBuf,
        /// The end of its log.
        tail: String,
    },
    /// The admin interface did not answer as expected.
    #[error("Envoy admin {path} on {addr}: {problem}")]
    Admin {
        /// The admin address.
        addr: SocketAddr,
        /// The admin path asked for.
        path: String,
        /// What went wrong.
        problem: String,
    },
}

/// A running Envoy, killed when dropped.
#[derive(Debug)]
pub struct EnvoyProcess {
    child: Child,
    log_path: PathBuf,
    config_path: PathBuf,
    admin: SocketAddr,
    listener: SocketAddr,
}

/// Numbers the files of Envoys started by this process, so several can share a work directory.
static INSTANCE: AtomicU32 = AtomicU32::new(0);

impl EnvoyProcess {
    /// Writes the bootstrap into `work_dir`, starts `envoy` with `concurrency` worker threads and
    /// its log in `work_dir`, and waits (at most [`READY_TIMEOUT`]) until the admin interface
    /// says LIVE.
    pub fn start(
        envoy_binary: &Path,
        bootstrap: &EnvoyBootstrap,
        work_dir: &Path,
        concurrency: u32,
    ) -> Result<Self, EnvoyError> {
        Self::start_in_group(envoy_binary, bootstrap, work_dir, concurrency, None)
    }

    /// [`EnvoyProcess::start`], with Envoy in the process group `group` when given (local
    /// mode's guarded group, whose processes die with the controller: see
    /// [`super::guard::ProcessGuard`]); otherwise in the caller's group.
    pub fn start_in_group(
        envoy_binary: &Path,
        bootstrap: &EnvoyBootstrap,
        work_dir: &Path,
        concurrency: u32,
        group: Option<u32>,
    ) -> Result<Self, EnvoyError> {
        let n = INSTANCE.fetch_add(1, Ordering::Relaxed);
        let file = |suffix: &str| work_dir.join(format!("envoy-{n}.{suffix}"));
        let (config_path, log_path, admin_path) = (file("json"), file("log"), file("admin"));
        let work_err = |path: &Path| {
            let path = path.to_owned();
            move |source| EnvoyError::WorkDir { path, source }
        };
        std::fs::write(&config_path, bootstrap.to_yaml()).map_err(work_err(&config_path))?;
        bootstrap
            .write_filter_discovery()
            .map_err(work_err(work_dir))?;
        // A previous run (another process numbers its Envoys from 0 too) may have left this file;
        // its address is of an Envoy that is gone, or worse, of one that still runs. Only the
        // file this Envoy writes may be read.
        match std::fs::remove_file(&admin_path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(work_err(&admin_path)(e))
            }
            _ => {}
        }
        let log = File::create(&log_path).map_err(work_err(&log_path))?;
        let log_err = log.try_clone().map_err(work_err(&log_path))?;

        let mut command = Command::new(envoy_binary);
        if let Some(group) = group {
            command.process_group(i32::try_from(group).unwrap_or(0));
        }
        let child = command
            .arg("-c")
            .arg(&config_path)
            .args(["--concurrency", &concurrency.to_string()])
            // No hot restart: parallel Envoys then share no memory region and need no base id.
            .arg("--disable-hot-restart")
            .args(["--log-level", "info"])
            .arg("--admin-address-path")
            .arg(&admin_path)
            .stdin(Stdio::null())
            // Envoy logs to stderr unbuffered; its own --log-path flushes only every few seconds.
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .map_err(|source| EnvoyError::Spawn {
                binary: envoy_binary.to_owned(),
                source,
            })?;
        let mut envoy = EnvoyProcess {
            child,
            log_path,
            config_path,
            admin: local(bootstrap.admin_port),
            listener: local(bootstrap.listener_port),
        };
        envoy.wait_ready(&admin_path, READY_TIMEOUT)?;
        Ok(envoy)
    }

    fn wait_ready(&mut self, admin_path: &Path, timeout: Duration) -> Result<(), EnvoyError> {
        let started = Instant::now();
        let admin_fixed = self.admin.port() != 0;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(EnvoyError::Exited {
                    status,
                    log: self.log_path.clone(),
                    tail: self.log_tail(30),
                });
            }
            // With an OS-chosen admin port, the address comes from the file Envoy writes; read
            // it on every round until an admin interface answers there, so an address read
            // before Envoy wrote the file (or half written) is never kept.
            if !admin_fixed {
                if let Some(addr) = std::fs::read_to_string(admin_path)
                    .ok()
                    .and_then(|text| text.trim().parse().ok())
                {
                    self.admin = addr;
                }
            }
            if self.admin.port() != 0
                && matches!(self.admin_get("/ready"), Ok(body) if body.trim() == "LIVE")
            {
                if self.listener.port() == 0 {
                    self.listener = self.bound_listener()?;
                }
                return Ok(());
            }
            if started.elapsed() > timeout {
                return Err(EnvoyError::NotReady {
                    waited: timeout,
                    log: self.log_path.clone(),
                    tail: self.log_tail(30),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The address the listener actually bound (for a bootstrap with port 0).
    fn bound_listener(&self) -> Result<SocketAddr, EnvoyError> {
        let body = self.admin_get("/listeners?format=json")?;
        let problem = |problem: String| EnvoyError::Admin {
            addr: self.admin,
            path: "/listeners".to_owned(),
            problem,
        };
        let listeners: Value =
            serde_json::from_str(&body).map_err(|e| problem(format!("not JSON: {e}")))?;
        let address = &listeners["listener_statuses"][0]["local_address"]["socket_address"];
        let ip = address["address"].as_str().and_then(|ip| ip.parse().ok());
        let port = address["port_value"]
            .as_u64()
            .and_then(|p| u16::try_from(p).ok());
        match (ip, port) {
            (Some(ip), Some(port)) => Ok(SocketAddr::new(ip, port)),
            _ => Err(problem(format!("no listener address in {body}"))),
        }
    }

    /// Where the listener accepts requests.
    pub fn listener_addr(&self) -> SocketAddr {
        self.listener
    }

    /// Where the admin interface listens.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
    }

    /// The operating system's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The bootstrap file Envoy was started with.
    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// The log file (Envoy's stdout and stderr).
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Everything Envoy has logged so far.
    pub fn log(&self) -> String {
        let mut text = String::new();
        if let Ok(mut file) = File::open(&self.log_path) {
            // Envoy may be mid-line; lossy reading keeps whatever is there.
            let mut bytes = Vec::new();
            let _ = file.read_to_end(&mut bytes);
            text = String::from_utf8_lossy(&bytes).into_owned();
        }
        text
    }

    /// The last `lines` lines of the log.
    pub fn log_tail(&self, lines: usize) -> String {
        let log = self.log();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Waits (at most `timeout`) until the log contains `needle`; true when it does.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> bool {
        let started = Instant::now();
        loop {
            if self.log().contains(needle) {
                return true;
            }
            if started.elapsed() > timeout {
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// GETs an admin path (e.g. `/stats?filter=wasm`) and returns the body of a 200 answer.
    pub fn admin_get(&self, path: &str) -> Result<String, EnvoyError> {
        let problem = |problem: String| EnvoyError::Admin {
            addr: self.admin,
            path: path.to_owned(),
            problem,
        };
        let (status, body) = http_get(self.admin, path).map_err(|e| problem(e.to_string()))?;
        if status != 200 {
            return Err(problem(format!("answered {status}: {}", body.trim())));
        }
        Ok(body)
    }

    /// Stops Envoy now (SIGKILL) and waits for it to exit.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for EnvoyProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A minimal blocking HTTP/1.1 GET (Envoy's admin refuses HTTP/1.0), enough for the admin
/// interface: `Connection: close`, body by length, chunks or end of stream.
fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let timeout = Duration::from_secs(5);
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let invalid =
        |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_owned());
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| invalid("response has no end of headers"))?;
    let head = String::from_utf8_lossy(&raw[..split]).to_ascii_lowercase();
    let mut body = raw[split + 4..].to_vec();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| invalid("response has no status"))?;
    if head.contains("transfer-encoding: chunked") {
        body = dechunk(&body).ok_or_else(|| invalid("malformed chunked body"))?;
    }
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

fn dechunk(mut raw: &[u8]) -> Option<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let line_end = raw.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&raw[..line_end]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        raw = &raw[line_end + 2..];
        if size == 0 {
            return Some(body);
        }
        body.extend_from_slice(raw.get(..size)?);
        raw = raw.get(size + 2..)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> SocketAddr {
        local(port)
    }

    fn with_everything() -> EnvoyBootstrap {
        EnvoyBootstrap {
            listener_port: 10_000,
            admin_port: 9_901,
            controller: Some(addr(7_000)),
            wasm: Some(WasmFilter::wasm_plugin(
                PathBuf::from("/x/weir_filter.wasm"),
                r#"{"reportInterval":"1s"}"#.to_owned(),
                PathBuf::from("/x/weir.ecds.json"),
            )),
            ..EnvoyBootstrap::new(addr(8_001), addr(8_002))
        }
    }

    fn cluster<'a>(bootstrap: &'a Value, name: &str) -> Option<&'a Value> {
        bootstrap["static_resources"]["clusters"]
            .as_array()?
            .iter()
            .find(|c| c["name"] == name)
    }

    fn cluster_port(bootstrap: &Value, name: &str) -> Option<u64> {
        cluster(bootstrap, name)?["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
            ["address"]["socket_address"]["port_value"]
            .as_u64()
    }

    #[test]
    fn node_carries_the_identity_the_filter_reports_under() {
        let json = with_everything().to_json();
        assert_eq!(json["node"]["id"], "weir-local");
        assert_eq!(json["node"]["metadata"]["NAMESPACE"], "default");
        assert_eq!(json["node"]["metadata"]["WORKLOAD_NAME"], "weir-local");
        assert_eq!(
            json["admin"]["address"]["socket_address"],
            json!({"address": "127.0.0.1", "port_value": 9901})
        );
    }

    #[test]
    fn canary_route_matches_the_routing_header_before_the_primary_catch_all() {
        let json = with_everything().to_json();
        let listener = &json["static_resources"]["listeners"][0];
        assert_eq!(listener["address"]["socket_address"]["port_value"], 10_000);
        let hcm = &listener["filter_chains"][0]["filters"][0]["typed_config"];
        let host = &hcm["route_config"]["virtual_hosts"][0];
        assert_eq!(host["domains"], json!(["*"]));
        assert_eq!(host["name"], "mhs.application");
        let routes = host["routes"].as_array().unwrap();
        assert_eq!(routes.len(), 2);
        assert_eq!(
            routes[0]["match"]["headers"][0],
            json!({"name": "x-weir-route", "string_match": {"exact": "canary"}})
        );
        assert_eq!(routes[0]["route"]["cluster"], "canary");
        assert_eq!(routes[1]["match"], json!({"prefix": "/"}));
        assert_eq!(routes[1]["route"]["cluster"], "primary");
    }

    #[test]
    fn upstream_and_controller_clusters_are_static_and_the_controller_speaks_http2() {
        let json = with_everything().to_json();
        assert_eq!(cluster_port(&json, "primary"), Some(8001));
        assert_eq!(cluster_port(&json, "canary"), Some(8002));
        assert_eq!(cluster_port(&json, CONTROLLER_CLUSTER), Some(7000));
        for name in ["primary", "canary", CONTROLLER_CLUSTER] {
            let c = cluster(&json, name).unwrap();
            assert_eq!(c["type"], "STATIC");
            assert_eq!(c["connect_timeout"], "1s");
        }
        let options = &cluster(&json, CONTROLLER_CLUSTER).unwrap()
            ["typed_extension_protocol_options"]
            ["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"];
        assert_eq!(
            options["explicit_http_config"]["http2_protocol_options"],
            json!({})
        );
    }

    fn http_filters(bootstrap: &Value) -> Vec<Value> {
        bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
            ["typed_config"]["http_filters"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    fn assert_plugin_config_is_istios_shape(plugin: &Value) {
        assert_eq!(plugin["root_id"], PLUGIN_NAME);
        assert!(plugin["vm_config"].get("vm_id").is_none(), "{plugin}");
        assert_eq!(plugin["vm_config"]["runtime"], "envoy.wasm.runtime.v8");
        assert_eq!(plugin["failure_policy"], "FAIL_OPEN");
        assert_eq!(
            plugin["configuration"],
            json!({
                "@type": "type.googleapis.com/google.protobuf.StringValue",
                "value": r#"{"reportInterval":"1s"}"#,
            })
        );
    }

    #[test]
    fn the_filter_is_discovered_as_istio_delivers_a_wasm_plugin_without_a_bootstrap_extension() {
        let bootstrap = with_everything();
        let json = bootstrap.to_json();
        assert!(json.get("bootstrap_extensions").is_none());
        let filters = http_filters(&json);
        assert_eq!(filters.len(), 2);
        assert_eq!(filters[0]["name"], "istio-system.weir");
        let discovery = &filters[0]["config_discovery"];
        assert_eq!(
            discovery["config_source"]["path_config_source"]["path"],
            "/x/weir.ecds.json"
        );
        assert_eq!(
            discovery["type_urls"],
            json!([WASM_FILTER_TYPE, RBAC_FILTER_TYPE])
        );
        assert_eq!(filters[1]["name"], "envoy.filters.http.router");

        let Some(FilterInstall::WasmPlugin { .. }) = bootstrap.wasm.as_ref().map(|w| &w.install)
        else {
            panic!("a WasmPlugin install");
        };
        let plugin = bootstrap.wasm.as_ref().unwrap().plugin_config();
        assert_plugin_config_is_istios_shape(&plugin);
        assert_eq!(plugin["name"], "istio-system.weir");
        assert_eq!(
            plugin["vm_config"]["code"]["local"]["filename"],
            "/x/weir_filter.wasm"
        );
        assert_eq!(
            plugin["vm_config"]["environment_variables"]["key_values"]
                ["ISTIO_META_WASM_PLUGIN_RESOURCE_VERSION"],
            "1"
        );
    }

    #[test]
    fn the_envoy_filter_install_is_inline_and_fetches_the_module_from_the_controller() {
        let mut bootstrap = with_everything();
        bootstrap.wasm = Some(WasmFilter {
            config_json: r#"{"reportInterval":"1s"}"#.to_owned(),
            install: FilterInstall::EnvoyFilter {
                server: addr(7_001),
                path: "/filter/abc.wasm".to_owned(),
                sha256: "abc".to_owned(),
            },
        });
        let json = bootstrap.to_json();
        assert!(json.get("bootstrap_extensions").is_none());
        let filters = http_filters(&json);
        let plugin = &filters[0]["typed_config"]["config"];
        assert_plugin_config_is_istios_shape(plugin);
        let remote = &plugin["vm_config"]["code"]["remote"];
        assert_eq!(
            remote["http_uri"]["uri"],
            "http://weir.weir-system.svc.cluster.local:8080/filter/abc.wasm"
        );
        assert_eq!(remote["http_uri"]["cluster"], CONTROLLER_HTTP_CLUSTER);
        assert_eq!(remote["sha256"], "abc");
        assert_eq!(cluster_port(&json, CONTROLLER_HTTP_CLUSTER), Some(7001));
    }

    #[test]
    fn without_filter_or_controller_there_is_only_the_router_and_two_clusters() {
        let json = EnvoyBootstrap::new(addr(1), addr(2)).to_json();
        let hcm = &json["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
            ["typed_config"];
        assert_eq!(hcm["http_filters"].as_array().map(Vec::len), Some(1));
        assert_eq!(
            json["static_resources"]["clusters"]
                .as_array()
                .map(Vec::len),
            Some(2)
        );
        assert!(json.get("bootstrap_extensions").is_none());
    }

    #[test]
    fn route_options_go_on_both_routes_as_istiod_would_write_them() {
        let plan =
            crate::spec::load_yaml(include_str!("../../spec/testdata/weir-route-options.yaml"))
                .unwrap()
                .plan;
        let mut bootstrap = with_everything();
        bootstrap.primary_standby = Some(addr(8_003));
        bootstrap.routes = plan.service.routes;
        let json = bootstrap.to_json();
        let hcm = &json["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
            ["typed_config"];
        assert_eq!(hcm["http_filters"][0]["name"], CORS_FILTER);
        let routes = hcm["route_config"]["virtual_hosts"][0]["routes"]
            .as_array()
            .unwrap();
        // Two service matches: two canary routes (with the routing header), then two primary.
        assert_eq!(routes.len(), 4);
        assert_eq!(routes[0]["match"]["prefix"], "/api");
        assert_eq!(routes[0]["match"]["headers"][0]["name"], "x-weir-route");
        assert_eq!(routes[1]["match"]["path"], "/healthz");
        assert_eq!(
            routes[1]["match"]["headers"][1],
            json!({"name": "x-region", "string_match": {"exact": "eu"}})
        );
        assert_eq!(
            routes[3]["match"]["headers"].as_array().map(Vec::len),
            Some(1)
        );
        for route in routes {
            let action = &route["route"];
            assert_eq!(action["timeout"], "5.000000000s");
            assert_eq!(action["prefix_rewrite"], "/v2/");
            assert_eq!(action["host_rewrite_literal"], "podinfo.internal");
            assert_eq!(action["retry_policy"]["num_retries"], 3);
            assert_eq!(action["retry_policy"]["per_try_timeout"], "1.000000000s");
            assert_eq!(
                route["request_headers_to_add"],
                json!([
                    {"header": {"key": "x-forwarded-by", "value": "weir"}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"},
                    {"header": {"key": "x-some-header", "value": "value"}, "append_action": "APPEND_IF_EXISTS_OR_ADD"},
                ])
            );
            assert_eq!(route["request_headers_to_remove"], json!(["x-debug"]));
            assert_eq!(
                route["response_headers_to_remove"],
                json!(["x-envoy-upstream-service-time"])
            );
            let cors = &route["typed_per_filter_config"][CORS_FILTER];
            assert_eq!(cors["allow_methods"], "GET,POST");
            assert_eq!(cors["max_age"], "86400");
        }
        // The primary keeps its standby slot's retry of connection failures.
        let primary = &routes[2]["route"]["retry_policy"];
        assert_eq!(
            primary["retry_on"],
            "gateway-error,connect-failure,refused-stream,reset"
        );
        assert!(primary.get("retry_host_predicate").is_some());
        assert_eq!(
            routes[0]["route"]["retry_policy"]["retry_on"],
            "gateway-error,connect-failure,refused-stream"
        );
    }

    #[test]
    fn a_match_only_istio_can_evaluate_is_refused_for_local_mode_naming_the_field() {
        let yaml = include_str!("../../spec/testdata/weir-route-options.yaml").replace(
            "    - uri: {prefix: /api}\n",
            "    - uri: {prefix: /api}\n      sourceLabels: {app: loadgen}\n",
        );
        let plan = crate::spec::load_yaml(&yaml).unwrap().plan;
        let error = plan.service.routes.check_for_envoy().unwrap_err();
        assert!(
            error.starts_with("spec.service.match[0].sourceLabels: only Istio"),
            "{error}"
        );
    }

    #[test]
    fn chunked_admin_bodies_are_reassembled() {
        let raw = b"4\r\nLIVE\r\n3;x=y\r\n ok\r\n0\r\n\r\n";
        assert_eq!(dechunk(raw).as_deref(), Some(&b"LIVE ok"[..]));
        assert_eq!(dechunk(b"9\r\nshort\r\n"), None);
    }
}
