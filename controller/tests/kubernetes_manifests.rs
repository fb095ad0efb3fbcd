//! The install manifests: generated CRDs up to date, the kustomize base rendering, references that
//! hold between its objects, RBAC that covers what the controller does, a filter configuration
//! the filter accepts, and the example Canary valid against the generated CRD schema.
//!
//! `kubectl kustomize` renders the base when kubectl is installed; without it the YAML documents
//! the kustomizations list are read directly (and the test says so). The same checks run on
//! both.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use weir_controller::filter_module::DEFAULT_PATH;
use weir_controller::platform::kubernetes::crd::{self, CanaryResource};
use weir_controller::platform::kubernetes::filter_install::{OPT_IN_LABEL, OPT_IN_VALUE};
use weir_controller::platform::kubernetes::leader::LEADER_LABEL;
use weir_controller::platform::local::envoy::ROUTING_HEADER;

fn manifests() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace root")
        .join("manifests")
}

fn documents(text: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(text)
        .map(|doc| {
            let value = serde_yaml::Value::deserialize(doc).expect("valid YAML");
            serde_json::to_value(value).expect("YAML that is JSON")
        })
        .filter(|v| !v.is_null())
        .collect()
}

use serde::Deserialize;

/// The documents a kustomization lists, read directly, with its `images` applied.
fn from_files(dir: &Path) -> Vec<Value> {
    let kustomization =
        std::fs::read_to_string(dir.join("kustomization.yaml")).expect("a kustomization.yaml");
    let k = documents(&kustomization).remove(0);
    let mut docs = Vec::new();
    for resource in k["resources"].as_array().expect("resources") {
        let file = dir.join(resource.as_str().expect("a path"));
        let text = std::fs::read_to_string(&file)
            .unwrap_or_else(|e| panic!("{} is listed but unreadable: {e}", file.display()));
        docs.extend(documents(&text));
    }
    for image in k["images"].as_array().into_iter().flatten() {
        let name = image["name"].as_str().unwrap();
        let tag = image["newTag"].as_str().unwrap();
        for doc in &mut docs {
            for c in doc["spec"]["template"]["spec"]["containers"]
                .as_array_mut()
                .into_iter()
                .flatten()
            {
                if c["image"] == name {
                    c["image"] = json!(format!("{name}:{tag}"));
                }
            }
        }
    }
    docs
}

/// Kills the child if the test ends first.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// kubectl: `WEIR_KUBECTL` (a path, or `none` to check the files without rendering), else
/// /usr/bin/kubectl, else PATH.
fn kubectl() -> Option<PathBuf> {
    match std::env::var("WEIR_KUBECTL").ok().as_deref() {
        Some("none") => return None,
        Some(path) if !path.is_empty() => return Some(PathBuf::from(path)),
        _ => {}
    }
    let candidates = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    std::iter::once(PathBuf::from("/usr/bin"))
        .chain(candidates)
        .map(|d| d.join("kubectl"))
        .find(|p| p.is_file())
}

/// `kubectl kustomize <dir>`, bounded to 60 s; `None` without kubectl.
fn rendered(dir: &Path) -> Option<Vec<Value>> {
    let kubectl = kubectl()?;
    // Tests run in parallel: one output file per call.
    static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let out_path = std::env::temp_dir().join(format!(
        "weir-kustomize-{}-{}.yaml",
        std::process::id(),
        CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    let out = std::fs::File::create(&out_path).unwrap();
    let child = Command::new(&kubectl)
        .arg("kustomize")
        .arg(dir)
        .stdout(out)
        .stderr(Stdio::piped())
        .spawn()
        .expect("kubectl runs");
    let mut guard = Guard(child);
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = guard.0.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "kubectl kustomize ran over 60 s");
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    if let Some(mut e) = guard.0.stderr.take() {
        use std::io::Read;
        let _ = e.read_to_string(&mut stderr);
    }
    assert!(
        status.success(),
        "kubectl kustomize {} failed: {stderr}",
        dir.display()
    );
    let text = std::fs::read_to_string(&out_path).unwrap();
    let _ = std::fs::remove_file(&out_path);
    Some(documents(&text))
}

/// The rendered documents when kubectl is there (checked against the files), else the files.
fn install(dir: &Path) -> Vec<Value> {
    let files = from_files(dir);
    match rendered(dir) {
        Some(docs) => {
            let ids = |d: &[Value]| -> BTreeSet<String> {
                d.iter()
                    .map(|o| {
                        format!(
                            "{}/{}/{}",
                            o["kind"], o["metadata"]["namespace"], o["metadata"]["name"]
                        )
                    })
                    .collect()
            };
            assert_eq!(
                ids(&docs),
                ids(&files),
                "kustomize renders exactly the listed files"
            );
            docs
        }
        None => {
            eprintln!(
                "kubectl not found (or WEIR_KUBECTL=none): checked the YAML documents {} lists, without rendering",
                dir.join("kustomization.yaml").display()
            );
            files
        }
    }
}

fn one<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    let found: Vec<&Value> = docs
        .iter()
        .filter(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .collect();
    assert_eq!(found.len(), 1, "exactly one {kind} {name}");
    found[0]
}

#[test]
fn the_checked_in_crds_are_the_ones_the_spec_types_generate() {
    let dir = manifests().join("crds");
    let kustomization = std::fs::read_to_string(manifests().join("kustomization.yaml")).unwrap();
    for (name, generated) in crd::crd_files() {
        let path = dir.join(name.as_ref());
        let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            checked_in == generated,
            "{} is stale or missing; regenerate it with `cargo run -p weir-controller --bin weir -- crdgen --out manifests/crds`",
            path.display()
        );
        assert!(
            kustomization.contains(&format!("crds/{name}")),
            "manifests/kustomization.yaml does not install crds/{name}"
        );
    }
}

#[test]
fn the_canary_crd_has_flaggers_names_columns_and_a_status_subresource() {
    let crd = documents(&crd::to_yaml(&crd::canary_crd())).remove(0);
    assert_eq!(crd["spec"]["group"], "weir.dev");
    assert_eq!(crd["spec"]["scope"], "Namespaced");
    assert_eq!(crd["spec"]["names"]["shortNames"], json!(["canary"]));
    let version = &crd["spec"]["versions"][0];
    assert_eq!(version["name"], "v1alpha1");
    assert_eq!(version["subresources"]["status"], json!({}));
    let columns: Vec<&str> = version["additionalPrinterColumns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        columns,
        [
            "Status",
            "Weight",
            "FailedChecks",
            "LastTransitionTime",
            "Halted"
        ]
    );
    let halted = &version["additionalPrinterColumns"][4];
    assert_eq!(
        halted["jsonPath"],
        r#".status.conditions[?(@.type=="Halted")].message"#
    );
}

/// What the controller does through the API, as (group, resource, verb).
const CONTROLLER_NEEDS: &[(&str, &str, &str)] = &[
    ("weir.dev", "canaries", "get"),
    ("weir.dev", "canaries", "list"),
    ("weir.dev", "canaries", "watch"),
    ("weir.dev", "canaries", "patch"),
    ("weir.dev", "canaries/status", "patch"),
    ("weir.dev", "metrictemplates", "list"),
    ("weir.dev", "metrictemplates", "watch"),
    // Alerts (platform/kubernetes/alerts.rs): the provider and its Secret, read when sent.
    ("weir.dev", "alertproviders", "get"),
    ("apps", "deployments", "get"),
    ("apps", "deployments", "list"),
    ("apps", "deployments", "watch"),
    ("apps", "deployments", "create"),
    ("apps", "deployments", "patch"),
    ("", "services", "create"),
    ("", "services", "patch"),
    ("networking.istio.io", "virtualservices", "create"),
    ("networking.istio.io", "virtualservices", "patch"),
    ("networking.istio.io", "virtualservices", "delete"),
    ("networking.istio.io", "destinationrules", "create"),
    ("networking.istio.io", "destinationrules", "patch"),
    ("events.k8s.io", "events", "create"),
    ("events.k8s.io", "events", "patch"),
    ("", "configmaps", "get"),
    ("", "configmaps", "create"),
    ("", "configmaps", "patch"),
    ("", "secrets", "get"),
    ("", "secrets", "create"),
    ("", "secrets", "patch"),
    // spec.autoscalerRef (platform/kubernetes/autoscalers.rs): the original read, the
    // primary's copy applied and released; a ScaledObject paused by merge patch.
    ("autoscaling", "horizontalpodautoscalers", "get"),
    ("autoscaling", "horizontalpodautoscalers", "create"),
    ("autoscaling", "horizontalpodautoscalers", "patch"),
    ("keda.sh", "scaledobjects", "get"),
    ("keda.sh", "scaledobjects", "create"),
    ("keda.sh", "scaledobjects", "patch"),
    // The filter's installation (platform/kubernetes/filter_install.rs).
    ("", "namespaces", "list"),
    ("", "namespaces", "watch"),
    ("extensions.istio.io", "wasmplugins", "create"),
    ("extensions.istio.io", "wasmplugins", "patch"),
    ("extensions.istio.io", "wasmplugins", "list"),
    ("extensions.istio.io", "wasmplugins", "delete"),
    ("networking.istio.io", "envoyfilters", "create"),
    ("networking.istio.io", "envoyfilters", "patch"),
    ("networking.istio.io", "envoyfilters", "list"),
    ("networking.istio.io", "envoyfilters", "delete"),
];
const LEADER_NEEDS: &[(&str, &str, &str)] = &[
    ("coordination.k8s.io", "leases", "get"),
    ("coordination.k8s.io", "leases", "create"),
    ("coordination.k8s.io", "leases", "update"),
    ("", "pods", "patch"),
];

fn grants(role: &Value) -> BTreeSet<(String, String, String)> {
    let mut out = BTreeSet::new();
    for rule in role["rules"].as_array().unwrap() {
        for g in rule["apiGroups"].as_array().unwrap() {
            for r in rule["resources"].as_array().unwrap() {
                for v in rule["verbs"].as_array().unwrap() {
                    let s = |x: &Value| x.as_str().unwrap().to_owned();
                    assert!(
                        s(g) != "*" && s(r) != "*" && s(v) != "*",
                        "no wildcards in {}",
                        role["metadata"]["name"]
                    );
                    out.insert((s(g), s(r), s(v)));
                }
            }
        }
    }
    out
}

fn check_rbac(docs: &[Value], deployment: &Value) {
    let sa = deployment["spec"]["template"]["spec"]["serviceAccountName"]
        .as_str()
        .expect("the controller runs as its own ServiceAccount");
    let ns = deployment["metadata"]["namespace"].as_str().unwrap();
    let account = one(docs, "ServiceAccount", sa);
    assert_eq!(account["metadata"]["namespace"], ns);
    for (binding_kind, role_kind, needs) in [
        ("ClusterRoleBinding", "ClusterRole", CONTROLLER_NEEDS),
        ("RoleBinding", "Role", LEADER_NEEDS),
    ] {
        let binding = docs
            .iter()
            .find(|d| {
                d["kind"] == binding_kind
                    && d["subjects"]
                        .as_array()
                        .is_some_and(|s| s.iter().any(|s| s["name"] == sa && s["namespace"] == ns))
            })
            .unwrap_or_else(|| panic!("a {binding_kind} for ServiceAccount {sa}"));
        assert_eq!(binding["roleRef"]["kind"], role_kind);
        let role = one(
            docs,
            role_kind,
            binding["roleRef"]["name"].as_str().unwrap(),
        );
        if role_kind == "Role" {
            assert_eq!(
                role["metadata"]["namespace"], ns,
                "leader election stays in {ns}"
            );
            assert_eq!(binding["metadata"]["namespace"], ns);
        }
        let granted = grants(role);
        for (g, r, v) in needs {
            assert!(
                granted.contains(&(g.to_string(), r.to_string(), v.to_string())),
                "{role_kind} {} lacks {v} on {g}/{r}",
                role["metadata"]["name"]
            );
        }
        let needed: BTreeSet<(String, String, String)> = needs
            .iter()
            .map(|(g, r, v)| (g.to_string(), r.to_string(), v.to_string()))
            .chain(std::iter::once((
                "weir.dev".into(),
                "metrictemplates".into(),
                "get".into(),
            )))
            .collect();
        let extra: Vec<_> = granted.difference(&needed).collect();
        assert!(
            extra.is_empty(),
            "{role_kind} grants more than needed: {extra:?}"
        );
    }
}

fn container(deployment: &Value) -> &Value {
    &deployment["spec"]["template"]["spec"]["containers"][0]
}

fn env(deployment: &Value, name: &str) -> Value {
    container(deployment)["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == name)
        .cloned()
        .unwrap_or(Value::Null)
}

fn port_named(deployment: &Value, name: &str) -> i64 {
    container(deployment)["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == name)
        .and_then(|p| p["containerPort"].as_i64())
        .unwrap_or_else(|| panic!("the container has a port named {name}"))
}

#[test]
fn the_install_renders_and_its_objects_fit_together() {
    let docs = install(&manifests());
    let kinds: BTreeMap<String, usize> = docs.iter().fold(BTreeMap::new(), |mut m, d| {
        *m.entry(d["kind"].as_str().unwrap().to_owned()).or_default() += 1;
        m
    });
    for (kind, n) in [
        ("CustomResourceDefinition", 3),
        ("Namespace", 1),
        ("ServiceAccount", 1),
        ("ClusterRole", 1),
        ("ClusterRoleBinding", 1),
        ("Role", 1),
        ("RoleBinding", 1),
        ("Deployment", 1),
        ("Service", 2),
        ("NetworkPolicy", 1),
    ] {
        assert_eq!(kinds.get(kind), Some(&n), "{kind} in {kinds:?}");
    }
    let ns = one(&docs, "Namespace", "weir-system");
    assert!(
        ns["metadata"]["labels"].get("istio-injection").is_none(),
        "nothing in weir-system is injected but the controller, which asks for it"
    );

    // The controller Deployment.
    let deployment = one(&docs, "Deployment", "weir");
    assert_eq!(deployment["metadata"]["namespace"], "weir-system");
    let pod = &deployment["spec"]["template"];
    for (k, v) in deployment["spec"]["selector"]["matchLabels"]
        .as_object()
        .unwrap()
    {
        assert_eq!(
            &pod["metadata"]["labels"][k], v,
            "the Pods carry the selector"
        );
    }
    let c = container(deployment);
    assert_eq!(c["image"], "weir:0.1.0");
    assert_eq!(c["args"], json!(["kubernetes"]));
    assert_eq!(pod["spec"]["securityContext"]["runAsNonRoot"], true);
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
    assert_eq!(c["securityContext"]["capabilities"]["drop"], json!(["ALL"]));
    for probe in ["livenessProbe", "readinessProbe"] {
        let port = c[probe]["httpGet"]["port"].as_str().unwrap();
        port_named(deployment, port);
    }
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    for limit in ["requests", "limits"] {
        assert!(
            c["resources"][limit]["cpu"].is_string() && c["resources"][limit]["memory"].is_string()
        );
    }
    assert_eq!(
        env(deployment, "POD_NAME")["valueFrom"]["fieldRef"]["fieldPath"],
        "metadata.name"
    );
    assert_eq!(
        env(deployment, "POD_NAMESPACE")["valueFrom"]["fieldRef"]["fieldPath"],
        "metadata.namespace"
    );
    let grpc_address = env(deployment, "WEIR_GRPC_ADDRESS")["value"].clone();
    assert!(grpc_address
        .as_str()
        .unwrap()
        .ends_with(&format!(":{}", port_named(deployment, "grpc"))));
    let http_address = env(deployment, "WEIR_HTTP_ADDRESS")["value"].clone();
    assert!(http_address
        .as_str()
        .unwrap()
        .ends_with(&format!(":{}", port_named(deployment, "http-metrics"))));

    // The filters' Service selects every controller Pod (a standby serves its filters as a
    // relay); the relays' Service `weir-leader` only the leader, and a standby dials it.
    for (name, leader_only) in [("weir", false), ("weir-leader", true)] {
        let service = one(&docs, "Service", name);
        assert_eq!(service["metadata"]["namespace"], "weir-system");
        let selector = service["spec"]["selector"].as_object().unwrap();
        assert_eq!(
            selector.get(LEADER_LABEL).is_some(),
            leader_only,
            "{name}: the leader label in its selector {selector:?}"
        );
        if leader_only {
            assert_eq!(selector.get(LEADER_LABEL), Some(&json!("true")));
        }
        for (k, v) in selector.iter().filter(|(k, _)| *k != LEADER_LABEL) {
            assert_eq!(
                &pod["metadata"]["labels"][k], v,
                "{name} selects the controller Pods"
            );
        }
        let grpc = service["spec"]["ports"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == "grpc")
            .expect("a grpc port");
        port_named(deployment, grpc["targetPort"].as_str().unwrap());
        assert_eq!(grpc["appProtocol"], "grpc");
    }
    // The CLI reads the live numbers, which only the leader holds, through the Service and
    // port it names by default: the leader's, on the HTTP port.
    let cli = weir_controller::cli::kubernetes::ControllerService::default();
    let service = one(&docs, "Service", &cli.name);
    assert_eq!(service["metadata"]["namespace"], json!(cli.namespace));
    assert_eq!(
        service["spec"]["selector"][LEADER_LABEL], "true",
        "the CLI's Service has only the leader behind it"
    );
    let http = service["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == json!(cli.port))
        .unwrap_or_else(|| panic!("{} has no port {}", cli.name, cli.port));
    port_named(deployment, http["targetPort"].as_str().unwrap());
    let relay_to = env(deployment, "WEIR_RELAY_TO")["value"].clone();
    assert_eq!(
        relay_to,
        json!(format!(
            "weir-leader.weir-system.svc.cluster.local:{}",
            port_named(deployment, "grpc")
        )),
        "a standby relays to the leader's Service"
    );
    assert_eq!(
        pod["metadata"]["annotations"]["traffic.sidecar.istio.io/excludeOutboundPorts"],
        json!(port_named(deployment, "grpc").to_string()),
        "the relay's own mTLS goes past the sidecar"
    );

    check_rbac(&docs, deployment);

    // The filters' stream over mTLS: a sidecar for the workload certificate, the gRPC and HTTP
    // ports served by the controller itself, the certificate files on the shared volume.
    assert_eq!(pod["metadata"]["labels"]["sidecar.istio.io/inject"], "true");
    let annotations = &pod["metadata"]["annotations"];
    let excluded = annotations["traffic.sidecar.istio.io/excludeInboundPorts"]
        .as_str()
        .unwrap();
    for port in ["grpc", "http-metrics"] {
        assert!(
            excluded
                .split(',')
                .any(|p| p == port_named(deployment, port).to_string()),
            "{port} is served by the controller, not its sidecar: {excluded}"
        );
    }
    let proxy: Value =
        serde_json::from_str(annotations["proxy.istio.io/config"].as_str().unwrap()).unwrap();
    let output = proxy["proxyMetadata"]["OUTPUT_CERTS"].as_str().unwrap();
    for (var, file) in [
        ("WEIR_TLS_CERT", "cert-chain.pem"),
        ("WEIR_TLS_KEY", "key.pem"),
        ("WEIR_TLS_CLIENT_CA", "root-cert.pem"),
    ] {
        assert_eq!(env(deployment, var)["value"], format!("{output}/{file}"));
    }
    let mounts = &c["volumeMounts"];
    assert_eq!(mounts[0]["mountPath"], output);
    let policy = one(&docs, "NetworkPolicy", "weir");
    let ports: Vec<i64> = policy["spec"]["ingress"][0]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["port"].as_i64().unwrap())
        .collect();
    assert_eq!(
        ports,
        [
            port_named(deployment, "grpc"),
            port_named(deployment, "http-metrics")
        ]
    );

    // The filter is the controller's to install (a WasmPlugin it applies, with the module it
    // serves): nothing in the install patches Envoy's bootstrap or mounts a module.
    let text = serde_json::to_string(&docs).unwrap();
    assert!(!text.contains("BOOTSTRAP"), "no bootstrap patch");
    assert!(
        !text.contains("weir-filter"),
        "no ConfigMap or volume for the module"
    );
    assert_eq!(kinds.get("EnvoyFilter"), None);
    assert_eq!(kinds.get("WasmPlugin"), None);
    assert_eq!(
        env(deployment, "WEIR_FILTER_INSTALL")["value"],
        "wasmplugin"
    );
    assert_eq!(env(deployment, "WEIR_FILTER_MODULE")["value"], DEFAULT_PATH);
    assert_eq!(
        env(deployment, "WEIR_ISTIO_NAMESPACE")["value"],
        "istio-system"
    );
    assert_eq!(
        env(deployment, "WEIR_ROUTING_HEADER")["value"],
        ROUTING_HEADER,
        "the controller writes this header into the filters' configuration"
    );
    let dockerfile =
        std::fs::read_to_string(manifests().join("image/Dockerfile")).expect("the Dockerfile");
    assert!(
        dockerfile.contains(&format!("weir_filter.wasm {DEFAULT_PATH}")),
        "the image carries the module where the controller serves it from"
    );
    // The module is served on the Service's http port, which the WasmPlugin's URL names.
    let service = one(&docs, "Service", "weir");
    let grpc = service["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "grpc")
        .expect("a grpc port");
    let http = service["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "http-metrics")
        .expect("an http port");
    assert_eq!(http["port"], 8080);
    assert_eq!(grpc["port"], 9090);
}

#[test]
fn the_alternatives_are_what_the_controller_renders() {
    use weir_controller::filter_module::InstallKind;
    use weir_controller::platform::kubernetes::filter_install::{
        self, FilterInstallation, InstallSettings, DIGEST_PLACEHOLDER,
    };
    for (file, kind) in [
        ("envoyfilter.yaml", InstallKind::EnvoyFilter),
        ("wasmplugin.yaml", InstallKind::WasmPlugin),
    ] {
        let path = manifests().join("alternatives").join(file);
        let text = std::fs::read_to_string(&path).unwrap();
        let settings = InstallSettings {
            kind,
            ..InstallSettings::default()
        };
        let rendered = filter_install::to_yaml(&FilterInstallation::for_digest(
            DIGEST_PLACEHOLDER,
            &settings,
        ));
        let body: String = text
            .lines()
            .skip_while(|l| l.starts_with('#'))
            .map(|l| format!("{l}\n"))
            .collect();
        assert_eq!(
            body,
            rendered,
            "{} is stale: regenerate its YAML with `weir render-filter --install {}` below the comment",
            path.display(),
            file.trim_end_matches(".yaml")
        );
        assert!(!text.contains("applyTo: BOOTSTRAP"));
        assert!(!text.contains("applyTo: CLUSTER"));
    }
}

/// Validates `doc` against a CRD's structural schema the way the API server would reject it:
/// types, enums, bounds, string lengths, required fields, unknown fields where they are not
/// preserved.
fn validate(schema: &Value, doc: &Value, path: &str, errors: &mut Vec<String>) {
    if doc.is_null() {
        if schema["nullable"] != true {
            errors.push(format!("{path}: null is not allowed"));
        }
        return;
    }
    if schema["x-kubernetes-int-or-string"] == true {
        if !(doc.is_i64() || doc.is_u64() || doc.is_string()) {
            errors.push(format!("{path}: must be an integer or a string"));
        }
        return;
    }
    if let Some(values) = schema["enum"].as_array() {
        if !values.contains(doc) {
            errors.push(format!("{path}: {doc} is not one of {values:?}"));
        }
    }
    let preserve = schema["x-kubernetes-preserve-unknown-fields"] == true;
    match schema["type"].as_str() {
        Some("object") => {
            let Some(object) = doc.as_object() else {
                return errors.push(format!("{path}: must be an object"));
            };
            for (key, value) in object {
                let sub = format!("{path}.{key}");
                if let Some(property) = schema["properties"].get(key) {
                    validate(property, value, &sub, errors);
                } else if schema["additionalProperties"].is_object() {
                    validate(&schema["additionalProperties"], value, &sub, errors);
                } else if !preserve {
                    errors.push(format!("{sub}: unknown field"));
                }
            }
            for required in schema["required"].as_array().into_iter().flatten() {
                if !object.contains_key(required.as_str().unwrap()) {
                    errors.push(format!("{path}.{required}: required"));
                }
            }
        }
        Some("array") => match doc.as_array() {
            Some(items) => {
                for (i, item) in items.iter().enumerate() {
                    validate(&schema["items"], item, &format!("{path}[{i}]"), errors);
                }
            }
            None => errors.push(format!("{path}: must be an array")),
        },
        Some("string") if !doc.is_string() => errors.push(format!("{path}: must be a string")),
        Some("string") => {
            let length = doc.as_str().unwrap().chars().count() as u64;
            if schema["minLength"].as_u64().is_some_and(|min| length < min) {
                errors.push(format!("{path}: {doc} is too short"));
            }
        }
        Some("boolean") if !doc.is_boolean() => errors.push(format!("{path}: must be a boolean")),
        Some(kind @ ("integer" | "number")) => {
            let ok = if kind == "integer" {
                doc.is_i64() || doc.is_u64()
            } else {
                doc.is_number()
            };
            if !ok {
                return errors.push(format!("{path}: must be an {kind}"));
            }
            let v = doc.as_f64().unwrap();
            if schema["minimum"].as_f64().is_some_and(|m| v < m)
                || schema["maximum"].as_f64().is_some_and(|m| v > m)
            {
                errors.push(format!("{path}: {v} is out of bounds"));
            }
        }
        Some(_) => {}
        None if !preserve => errors.push(format!("{path}: the schema has no type")),
        None => {}
    }
}

fn canary_schema() -> Value {
    let crd = documents(&crd::to_yaml(&crd::canary_crd())).remove(0);
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone()
}

fn schema_errors(object: &Value) -> Vec<String> {
    let mut errors = Vec::new();
    let body = json!({"spec": object["spec"], "status": object.get("status").cloned().unwrap_or(Value::Null)});
    let mut body = body.as_object().unwrap().clone();
    if body["status"].is_null() {
        body.remove("status");
    }
    validate(&canary_schema(), &Value::Object(body), "", &mut errors);
    errors
}

#[test]
fn the_example_canary_is_valid_against_the_generated_schema_and_compiles() {
    let docs = install(&manifests().join("examples"));
    let canary = one(&docs, "Canary", "mhs");
    assert_eq!(canary["apiVersion"], "weir.dev/v1alpha1");
    assert_eq!(canary["metadata"]["namespace"], "application");
    let errors = schema_errors(canary);
    assert!(errors.is_empty(), "{errors:#?}");

    let resource: CanaryResource = serde_json::from_value(canary.clone()).unwrap();
    let compiled = resource.to_spec_canary().compile().expect("a valid Canary");
    assert!(compiled.warnings.is_empty(), "{:?}", compiled.warnings);
    let plan = compiled.plan;
    assert_eq!(plan.analysis.interval, Duration::from_secs(60));
    assert_eq!(plan.analysis.threshold.get(), 5);
    let weir_controller::spec::Strategy::Canary { steps } = &plan.analysis.strategy else {
        panic!("a progressive canary");
    };
    let weights: Vec<u8> = steps.weights().iter().map(|w| w.percent()).collect();
    assert_eq!(weights, [10, 20, 30, 40, 50]);
    let metrics: Vec<(&str, Duration)> = plan
        .analysis
        .metrics
        .iter()
        .map(|m| (m.name.as_str(), m.window))
        .collect();
    assert_eq!(
        metrics,
        [
            ("request-success-rate", Duration::from_secs(30)),
            ("request-duration", Duration::from_secs(30))
        ]
    );

    // The example app fits its Canary, and its namespace has the filter.
    let app = one(&docs, "Deployment", "mhs");
    assert_eq!(app["metadata"]["namespace"], "application");
    assert_eq!(canary["spec"]["targetRef"]["name"], "mhs");
    let container_ports: Vec<&Value> = container(app)["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| &p["containerPort"])
        .collect();
    assert!(container_ports.contains(&&canary["spec"]["service"]["targetPort"]));
    let namespace = one(&docs, "Namespace", "application");
    assert_eq!(
        namespace["metadata"]["labels"][OPT_IN_LABEL], OPT_IN_VALUE,
        "the app's namespace opts into the filter"
    );
    assert!(
        !serde_json::to_string(app).unwrap().contains("userVolume"),
        "no volume for the module"
    );
    assert_eq!(
        one(&docs, "Namespace", "application")["metadata"]["labels"]["istio-injection"],
        "enabled"
    );
}

#[test]
fn the_schema_check_rejects_what_the_api_server_would() {
    let text = std::fs::read_to_string(manifests().join("examples/canary.yaml")).unwrap();
    let good = documents(&text).remove(0);
    assert!(schema_errors(&good).is_empty());
    let mut wrong_type = good.clone();
    wrong_type["spec"]["analysis"]["stepWeight"] = json!("ten");
    assert_eq!(
        schema_errors(&wrong_type),
        [".spec.analysis.stepWeight: must be an integer"]
    );
    let mut bad_status = good.clone();
    bad_status["status"] = json!({"phase": "Finalizing", "canaryWeight": 140});
    let errors = schema_errors(&bad_status);
    assert!(
        errors.iter().any(|e| e.starts_with(".status.phase:")),
        "{errors:?}"
    );
    assert!(
        errors
            .iter()
            .any(|e| e == ".status.canaryWeight: 140 is out of bounds"),
        "{errors:?}"
    );
    let mut status = good;
    status["status"] = json!({"phase": "Progressing", "canaryWeight": 30, "failedChecks": 1,
        "iterations": 0, "lastTransitionTime": "2026-01-01T00:00:00Z"});
    assert!(
        schema_errors(&status).is_empty(),
        "{:?}",
        schema_errors(&status)
    );
}

/// Sets `value` at the dotted `path` (`null` removes the key), creating objects on the way.
fn set(doc: &mut Value, path: &str, value: Value) {
    let mut keys: Vec<&str> = path.split('.').collect();
    let last = keys.pop().unwrap();
    let mut node = doc;
    for key in keys {
        node = match key.parse::<usize>() {
            Ok(i) => &mut node[i],
            Err(_) => &mut node[key],
        };
    }
    if value.is_null() {
        node.as_object_mut().unwrap().remove(last);
    } else {
        node[last] = value;
    }
}

#[test]
fn the_schema_refuses_what_validation_refuses_where_a_schema_can_say_it() {
    let text = std::fs::read_to_string(manifests().join("examples/canary.yaml")).unwrap();
    let good = documents(&text).remove(0);
    let compiles = |doc: &Value| {
        let resource: CanaryResource = serde_json::from_value(doc.clone()).unwrap();
        resource.to_spec_canary().compile().is_ok()
    };
    assert!(schema_errors(&good).is_empty() && compiles(&good));
    let webhook = json!([{"name": "gate", "type": "pre-promotion", "url": "http://gate/"}]);
    // (field, value, valid): the API server (schema) and Weir (validation) must agree.
    let cases: Vec<(&str, Value, bool)> = vec![
        ("spec.analysis.stepWeight", json!(0), false),
        ("spec.analysis.stepWeight", json!(101), false),
        ("spec.analysis.stepWeight", json!(1), true),
        ("spec.analysis.maxWeight", json!(150), false),
        ("spec.analysis.maxWeight", json!(0), false),
        ("spec.analysis.stepWeights", json!([0, 10]), false),
        ("spec.analysis.stepWeightPromotion", json!(0), true),
        ("spec.analysis.stepWeightPromotion", json!(101), false),
        ("spec.analysis.threshold", json!(-1), false),
        ("spec.analysis.threshold", json!(0), true),
        ("spec.analysis.iterations", json!(-1), false),
        ("spec.analysis.primaryReadyThreshold", json!(0), false),
        ("spec.analysis.canaryReadyThreshold", json!(101), false),
        ("spec.analysis.minSampleCount", json!(-5), false),
        ("spec.progressDeadlineSeconds", json!(0), false),
        ("spec.provider", json!("linkerd"), false),
        ("spec.provider", json!("istio"), true),
        ("spec.targetRef.kind", json!("StatefulSet"), false),
        ("spec.targetRef.kind", Value::Null, false),
        ("spec.targetRef.name", json!(""), false),
        ("spec.targetRef", Value::Null, false),
        ("spec.service", Value::Null, false),
        ("spec.service.port", Value::Null, false),
        ("spec.service.port", json!(70000), false),
        ("spec.analysis.metrics.0.name", json!(""), false),
        ("spec.analysis.webhooks", webhook, false),
    ];
    for (path, value, valid) in cases {
        let mut doc = good.clone();
        set(&mut doc, path, value.clone());
        let errors = schema_errors(&doc);
        assert_eq!(
            errors.is_empty(),
            valid,
            "schema on {path} = {value}: {errors:?}"
        );
        assert_eq!(compiles(&doc), valid, "validation on {path} = {value}");
    }
    // What a schema cannot say is validation's alone: a duration's syntax, for one.
    let mut doc = good.clone();
    set(&mut doc, "spec.analysis.interval", json!("1 minute"));
    assert!(schema_errors(&doc).is_empty());
    assert!(!compiles(&doc));
}

/// Every `default` in `schema` (recursively), with the path of its node.
fn defaults<'a>(schema: &'a Value, path: &str, out: &mut Vec<(String, &'a Value, &'a Value)>) {
    if let Some(default) = schema.get("default") {
        out.push((path.to_owned(), schema, default));
    }
    for (key, sub) in schema["properties"].as_object().into_iter().flatten() {
        defaults(sub, &format!("{path}.{key}"), out);
    }
    if schema["items"].is_object() {
        defaults(&schema["items"], &format!("{path}[]"), out);
    }
}

#[test]
fn every_default_in_the_crds_is_valid_against_its_own_schema() {
    // The API server refuses a CRD whose defaults break their own bounds (an empty default
    // with minLength 1, say).
    for (name, text) in crd::crd_files() {
        let crd = documents(&text).remove(0);
        let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
        let mut found = Vec::new();
        defaults(schema, "", &mut found);
        for (path, node, default) in found {
            let mut errors = Vec::new();
            validate(node, default, &path, &mut errors);
            assert!(errors.is_empty(), "{name}: {errors:?}");
        }
    }
}

/// Bytes in a Kubernetes quantity such as `2Gi` or `512Mi`.
fn quantity_bytes(text: &str) -> u64 {
    let (number, unit) = text.split_at(
        text.find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len()),
    );
    let number: u64 = number.parse().expect("a number");
    number
        * match unit {
            "" => 1,
            "Ki" => 1 << 10,
            "Mi" => 1 << 20,
            "Gi" => 1 << 30,
            other => panic!("unexpected unit {other:?} in {text:?}"),
        }
}

#[test]
fn the_controllers_memory_limit_holds_the_worst_case_at_the_ingests_limits() {
    // docs/security.md, "The total at the configured limits": the same terms, from the code's
    // own constants, so a limit raised in the code without the Deployment fails here.
    use weir_controller::ingest::IngestConfig;
    const MIB: u64 = 1 << 20;
    let config = IngestConfig::default();
    let message = config.max_message_bytes as u64 + 5;
    let decoded = 16 * message + 2 * 1024 * 72;
    let worst = 128 * MIB // the process and the Kubernetes client's caches (allowance)
        + config.max_buffered_bytes as u64
        + 2 * decoded // T <= 2 runtime threads under the Deployment's CPU limit
        + config.max_connections as u64 * MIB
        + config.max_reporters as u64 * 1126 // 1.1 KiB per Envoy in the ledger
        + 8 * 46 * MIB; // 8 canaries
    let docs = install(&manifests());
    let deployment = one(&docs, "Deployment", "weir");
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    let limit = quantity_bytes(
        container["resources"]["limits"]["memory"]
            .as_str()
            .expect("the controller has a memory limit"),
    );
    assert!(
        limit >= worst,
        "the controller's memory limit is {} MiB, but its worst case at the ingest's limits is {} MiB (docs/security.md)",
        limit / MIB,
        worst / MIB
    );
    let docs_text = std::fs::read_to_string(manifests().join("../docs/security.md")).unwrap();
    assert!(
        docs_text.contains(&format!("**{} MiB**", worst / MIB)),
        "docs/security.md states the total, {} MiB",
        worst / MIB
    );
}

#[test]
fn the_load_tester_and_the_dashboard_install_with_kustomize() {
    let loadtester = install(&manifests().join("loadtester"));
    let deployment = one(&loadtester, "Deployment", "loadtester");
    assert_eq!(container(deployment)["image"], "weir:0.1.0");
    assert_eq!(container(deployment)["args"][0], "loadtest");
    one(&loadtester, "Service", "loadtester");

    let dir = manifests().join("dashboards");
    let kustomization =
        documents(&std::fs::read_to_string(dir.join("kustomization.yaml")).unwrap()).remove(0);
    let generator = &kustomization["configMapGenerator"][0];
    assert_eq!(generator["options"]["labels"]["grafana_dashboard"], "1");
    let files = generator["files"].as_array().expect("files");
    assert_eq!(files.len(), 1);
    let file = dir.join(files[0].as_str().unwrap());
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap())
        .unwrap_or_else(|e| panic!("{} is not JSON: {e}", file.display()));
    assert_eq!(dashboard["uid"], "weir-canary");
    if let Some(docs) = rendered(&dir) {
        let map = one(&docs, "ConfigMap", "weir-grafana-dashboard");
        assert_eq!(map["metadata"]["namespace"], "weir-system");
        assert!(map["data"]["weir-canary.json"].is_string());
    }
}
