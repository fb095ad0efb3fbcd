//! The Kubernetes reconciler against a scripted API server.
//!
//! No Kubernetes API server can run on these machines, so kube's real client talks to a
//! `tower_test` mock service (kube-rs/controller-rs's pattern). The handle answers like a small
//! API server (objects kept by path, lists of a collection, JSON merge patches, server-side
//! apply approximated as a merge, `resourceVersion` conflicts, 404s; a watch never sends an
//! event), marks a Deployment's rollout finished as soon as it is written (unless the test holds
//! it back), can leave requests under a path unanswered (an API server that stopped
//! answering), and records every request: the tests assert method, path, query and body, in
//! order.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::{Request, Response};
use kube::client::Body;
use kube::Client;
use serde_json::{json, Value};
use weir_controller::ingest::{Ingest, IngestConfig};
use weir_controller::metrics::streamed::StreamedSource;
use weir_controller::platform::kubernetes::crd::CanaryResource;
use weir_controller::platform::kubernetes::leader::LeaseLock;
use weir_controller::platform::kubernetes::reconciler::{reconcile, Context};
use weir_controller::platform::kubernetes::Settings;
use weir_controller::traffic::Directives;
use weir_proto::v1::{Report, Reporter, Version, VersionStats};
use weir_proto::LatencyHistogram;

const NS: &str = "application";
const DEPLOYMENTS: &str = "/apis/apps/v1/namespaces/application/deployments";
const SERVICES: &str = "/api/v1/namespaces/application/services";
const CANARY: &str = "/apis/weir.dev/v1alpha1/namespaces/application/canaries/mhs";
const VS: &str = "/apis/networking.istio.io/v1beta1/namespaces/application/virtualservices/mhs";
const DRS: &str = "/apis/networking.istio.io/v1beta1/namespaces/application/destinationrules";
const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/application/events";

/// One request as the API server saw it.
#[derive(Debug, Clone)]
struct Call {
    method: String,
    path: String,
    query: String,
    content_type: String,
    body: Value,
}

impl Call {
    fn is(&self, method: &str, path: &str) -> bool {
        self.method == method && self.path == path
    }
}

#[derive(Default)]
struct Fake {
    objects: BTreeMap<String, Value>,
    log: Vec<Call>,
    version: u64,
    /// Deployments whose rollout the test holds back (their status is left alone).
    stuck: BTreeSet<String>,
    /// Requests under these paths are never answered.
    stalled: Vec<String>,
}

/// The collections the fake can list (the last segment of a list's path).
const COLLECTIONS: &[&str] = &[
    "canaries",
    "metrictemplates",
    "deployments",
    "leases",
    "pods",
    "services",
    "configmaps",
    "secrets",
    "events",
    "virtualservices",
    "destinationrules",
    "horizontalpodautoscalers",
    "scaledobjects",
];

fn status(code: u16, reason: &str, message: &str) -> (u16, Value) {
    (
        code,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": message, "reason": reason, "code": code}),
    )
}

/// RFC 7386 JSON merge patch.
fn merge(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(fields) => {
            if !target.is_object() {
                *target = json!({});
            }
            let object = target.as_object_mut().expect("an object");
            for (k, v) in fields {
                if v.is_null() {
                    object.remove(k);
                } else {
                    merge(object.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        other => *target = other.clone(),
    }
}

impl Fake {
    fn bump(&mut self, object: &mut Value, old: Option<&Value>) {
        self.version += 1;
        object["metadata"]["resourceVersion"] = json!(self.version.to_string());
        let generation = old
            .and_then(|o| o["metadata"]["generation"].as_i64())
            .unwrap_or(0);
        let spec_changed = old.is_none_or(|o| o.get("spec") != object.get("spec"));
        object["metadata"]["generation"] = json!(generation + i64::from(spec_changed));
    }

    /// `managedFields` as the API server keeps them for the annotations a merge patch sets:
    /// one entry per field manager (the `fieldManager` query parameter), the latest last.
    fn record_manager(&mut self, object: &mut Value, patch: &Value, query: &str) {
        let Some(manager) = query
            .split('&')
            .find_map(|q| q.strip_prefix("fieldManager="))
        else {
            return;
        };
        let manager = manager.replace("%3A", ":");
        let Some(annotations) = patch["metadata"]["annotations"].as_object() else {
            return;
        };
        let fields: serde_json::Map<String, Value> = annotations
            .keys()
            .map(|k| (format!("f:{k}"), json!({})))
            .collect();
        let time = format!(
            "2026-01-01T{:02}:{:02}:{:02}Z",
            self.version / 3600 % 24,
            self.version / 60 % 60,
            self.version % 60
        );
        let mut entries: Vec<Value> = object["metadata"]["managedFields"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        entries.retain(|e| e["manager"] != json!(manager));
        entries.push(
            json!({"manager": manager, "operation": "Update", "apiVersion": "weir.dev/v1alpha1",
            "time": time, "fieldsType": "FieldsV1",
            "fieldsV1": {"f:metadata": {"f:annotations": fields}}}),
        );
        object["metadata"]["managedFields"] = json!(entries);
    }

    /// The Deployment controller, instantly: a written Deployment has finished its rollout.
    fn settle(&mut self, path: &str) {
        let name = path.rsplit('/').next().unwrap_or_default().to_owned();
        if !path.starts_with(DEPLOYMENTS) || self.stuck.contains(&name) {
            return;
        }
        if let Some(d) = self.objects.get_mut(path) {
            let replicas = d["spec"]["replicas"].as_i64().unwrap_or(1);
            d["status"] = json!({
                "observedGeneration": d["metadata"]["generation"],
                "replicas": replicas, "updatedReplicas": replicas,
                "availableReplicas": replicas, "readyReplicas": replicas,
            });
        }
    }

    /// The answer to `call`; `None`: it is never answered (a watch, or a stalled path).
    fn answer(&mut self, call: Call) -> Option<(u16, Value)> {
        let stalled = self
            .stalled
            .iter()
            .any(|p| call.path.starts_with(p.as_str()));
        let watch = call
            .query
            .split('&')
            .any(|q| q == "watch=true" || q == "watch=1");
        if stalled || (call.method == "GET" && watch) {
            self.log.push(call);
            return None;
        }
        let collection = call.path.rsplit('/').next().unwrap_or_default();
        if call.method == "GET" && COLLECTIONS.contains(&collection) {
            self.log.push(call.clone());
            let prefix = format!("{}/", call.path);
            let items: Vec<Value> = self
                .objects
                .iter()
                .filter(|(k, _)| {
                    k.strip_prefix(&prefix)
                        .is_some_and(|rest| !rest.contains('/'))
                })
                .map(|(_, o)| o.clone())
                .collect();
            return Some((
                200,
                json!({"apiVersion": "v1", "kind": "List",
                       "metadata": {"resourceVersion": self.version.to_string()}, "items": items}),
            ));
        }
        Some(self.handle(call))
    }

    fn handle(&mut self, call: Call) -> (u16, Value) {
        self.log.push(call.clone());
        let (key, subresource) = match call.path.strip_suffix("/status") {
            Some(base) if call.path.starts_with("/apis/weir.dev") => (base.to_owned(), true),
            _ => (call.path.clone(), false),
        };
        match call.method.as_str() {
            "GET" => match self.objects.get(&key) {
                Some(o) => (200, o.clone()),
                None => status(404, "NotFound", &format!("{key} not found")),
            },
            "POST" => {
                let name = call.body["metadata"]["name"].as_str().unwrap_or_default();
                let key = format!("{key}/{name}");
                if self.objects.contains_key(&key) {
                    return status(409, "AlreadyExists", &format!("{key} already exists"));
                }
                let mut object = call.body.clone();
                self.bump(&mut object, None);
                self.objects.insert(key.clone(), object.clone());
                self.settle(&key);
                (201, self.objects[&key].clone())
            }
            "PUT" => {
                let Some(old) = self.objects.get(&key).cloned() else {
                    return status(404, "NotFound", &format!("{key} not found"));
                };
                if call.body["metadata"]["resourceVersion"] != old["metadata"]["resourceVersion"] {
                    return status(409, "Conflict", "the object has been modified");
                }
                let mut object = call.body.clone();
                self.bump(&mut object, Some(&old));
                self.objects.insert(key.clone(), object.clone());
                (200, object)
            }
            "PATCH" => {
                let old = self.objects.get(&key).cloned();
                let apply = call.content_type.contains("apply-patch");
                let mut object = match (&old, apply) {
                    (Some(o), _) => o.clone(),
                    (None, true) => json!({}),
                    (None, false) => return status(404, "NotFound", &format!("{key} not found")),
                };
                if let (Some(o), Some(rv)) =
                    (&old, call.body["metadata"]["resourceVersion"].as_str())
                {
                    if o["metadata"]["resourceVersion"].as_str() != Some(rv) {
                        return status(409, "Conflict", "the object has been modified");
                    }
                }
                if subresource {
                    object["status"] = call.body["status"].clone();
                } else {
                    let mut patch = call.body.clone();
                    if let Some(meta) = patch.get_mut("metadata").and_then(Value::as_object_mut) {
                        meta.remove("resourceVersion");
                    }
                    merge(&mut object, &patch);
                    self.record_manager(&mut object, &patch, &call.query);
                }
                self.bump(&mut object, old.as_ref());
                self.objects.insert(key.clone(), object);
                self.settle(&key);
                (200, self.objects[&key].clone())
            }
            "DELETE" => match self.objects.remove(&key) {
                Some(o) => (200, o),
                None => status(404, "NotFound", &format!("{key} not found")),
            },
            _ => status(405, "MethodNotAllowed", "unexpected method"),
        }
    }
}

/// A scripted API server behind a real kube client.
struct Cluster {
    fake: Arc<Mutex<Fake>>,
    client: Client,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.server.abort();
    }
}

fn path_of(object: &Value) -> String {
    let ns = object["metadata"]["namespace"].as_str().unwrap_or(NS);
    let name = object["metadata"]["name"].as_str().expect("a name");
    let kind = object["kind"].as_str().expect("a kind");
    let collection = match kind {
        "Deployment" => format!("/apis/apps/v1/namespaces/{ns}/deployments"),
        "Canary" => format!("/apis/weir.dev/v1alpha1/namespaces/{ns}/canaries"),
        "AlertProvider" => format!("/apis/weir.dev/v1alpha1/namespaces/{ns}/alertproviders"),
        "Lease" => format!("/apis/coordination.k8s.io/v1/namespaces/{ns}/leases"),
        "Pod" => format!("/api/v1/namespaces/{ns}/pods"),
        "Secret" => format!("/api/v1/namespaces/{ns}/secrets"),
        "ConfigMap" => format!("/api/v1/namespaces/{ns}/configmaps"),
        "HorizontalPodAutoscaler" => {
            format!("/apis/autoscaling/v2/namespaces/{ns}/horizontalpodautoscalers")
        }
        "ScaledObject" => format!("/apis/keda.sh/v1alpha1/namespaces/{ns}/scaledobjects"),
        other => panic!("the fake does not store {other}"),
    };
    format!("{collection}/{name}")
}

impl Cluster {
    fn start() -> Self {
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let fake = Arc::new(Mutex::new(Fake::default()));
        let state = fake.clone();
        let server = tokio::spawn(async move {
            // Requests that are never answered: their responders stay alive, so the client waits.
            let mut unanswered = Vec::new();
            while let Some((request, respond)) = handle.next_request().await {
                let (parts, body) = request.into_parts();
                let bytes = body.collect_bytes().await.unwrap_or_default();
                let call = Call {
                    method: parts.method.to_string(),
                    path: parts.uri.path().to_owned(),
                    query: parts.uri.query().unwrap_or_default().to_owned(),
                    content_type: parts
                        .headers
                        .get(http::header::CONTENT_TYPE)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_owned(),
                    body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
                };
                let Some((code, body)) = state.lock().unwrap().answer(call) else {
                    unanswered.push(respond);
                    continue;
                };
                let response = Response::builder()
                    .status(code)
                    .header("content-type", "application/json")
                    .body(Body::from(serde_json::to_vec(&body).unwrap()))
                    .unwrap();
                respond.send_response(response);
            }
        });
        Self {
            fake,
            client: Client::new(service, "default"),
            server,
        }
    }

    fn put(&self, mut object: Value) {
        let mut fake = self.fake.lock().unwrap();
        let path = path_of(&object);
        let old = fake.objects.get(&path).cloned();
        fake.bump(&mut object, old.as_ref());
        fake.objects.insert(path.clone(), object);
        fake.settle(&path);
    }

    fn get(&self, path: &str) -> Option<Value> {
        self.fake.lock().unwrap().objects.get(path).cloned()
    }

    fn edit(&self, path: &str, change: impl FnOnce(&mut Value)) {
        let mut fake = self.fake.lock().unwrap();
        let old = fake
            .objects
            .get(path)
            .cloned()
            .unwrap_or_else(|| panic!("{path} exists"));
        let mut object = old.clone();
        change(&mut object);
        fake.bump(&mut object, Some(&old));
        fake.objects.insert(path.to_owned(), object);
        fake.settle(path);
    }

    fn hold_rollout(&self, deployment: &str, held: bool) {
        let mut fake = self.fake.lock().unwrap();
        if held {
            fake.stuck.insert(deployment.to_owned());
        } else {
            fake.stuck.remove(deployment);
            fake.settle(&format!("{DEPLOYMENTS}/{deployment}"));
        }
    }

    fn log(&self) -> Vec<Call> {
        self.fake.lock().unwrap().log.clone()
    }

    /// Leaves every request under `path` unanswered from now on.
    fn stall(&self, path: &str) {
        self.fake.lock().unwrap().stalled.push(path.to_owned());
    }

    fn canary(&self) -> Arc<CanaryResource> {
        Arc::new(serde_json::from_value(self.get(CANARY).expect("the canary exists")).unwrap())
    }

    fn phase(&self) -> Option<String> {
        self.get(CANARY)?["status"]["phase"]
            .as_str()
            .map(str::to_owned)
    }
}

fn target(image: &str) -> Value {
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "mhs", "namespace": NS, "labels": {"app": "mhs"},
                     "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{}"}},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": "mhs"}},
            "template": {
                "metadata": {"labels": {"app": "mhs"}},
                "spec": {"containers": [{"name": "mhs", "image": image,
                                         "ports": [{"containerPort": 8080}]}]}
            }
        }
    })
}

fn canary(revert_on_deletion: bool, analysis: Value) -> Value {
    json!({
        "apiVersion": "weir.dev/v1alpha1", "kind": "Canary",
        "metadata": {"name": "mhs", "namespace": NS, "uid": "0b1c6a52-mhs"},
        "spec": {
            "provider": "istio",
            "targetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "mhs"},
            "progressDeadlineSeconds": 60,
            "revertOnDeletion": revert_on_deletion,
            "service": {"port": 80, "targetPort": 8080,
                        "gateways": ["istio-system/public-gateway"], "hosts": ["mhs.example.com"]},
            "analysis": analysis,
        }
    })
}

fn quick_analysis() -> Value {
    json!({"interval": "100ms", "threshold": 2, "maxWeight": 20, "stepWeight": 10})
}

struct Harness {
    cluster: Cluster,
    ctx: Arc<Context<StreamedSource>>,
    ingest: Ingest,
}

impl Harness {
    fn new(canary_object: Value, fallback_after: Duration) -> Self {
        Self::with_settings(
            canary_object,
            Settings {
                fallback_after,
                ..Settings::default()
            },
        )
    }

    fn with_settings(canary_object: Value, settings: Settings) -> Self {
        let cluster = Cluster::start();
        cluster.put(target("ghcr.io/weir/mhs:1.1.1"));
        cluster.put(canary_object);
        let ingest = Ingest::try_new(IngestConfig::default()).unwrap();
        let ctx = Context::new(
            cluster.client.clone(),
            Settings {
                instance: "weir-0".into(),
                ..settings
            },
            Directives::new(ingest.clone()),
            StreamedSource::new(ingest.clone()),
        )
        .with_confirm_wait(Duration::from_millis(10));
        Self {
            cluster,
            ctx: Arc::new(ctx),
            ingest,
        }
    }

    /// One reconcile of the Canary as the API server has it now; returns the calls it made.
    async fn reconcile(&self) -> Vec<Call> {
        let before = self.cluster.log().len();
        reconcile(self.cluster.canary(), self.ctx.clone())
            .await
            .unwrap_or_else(|e| panic!("reconcile failed: {e}"));
        self.cluster.log()[before..].to_vec()
    }

    /// Reconciles once per analysis interval until the Canary reaches `phase`.
    async fn until_phase(&self, phase: &str) -> Vec<Call> {
        self.until_phase_within(phase, 40).await
    }

    /// [`Harness::until_phase`], reconciling at most `tries` times, 110 ms apart.
    async fn until_phase_within(&self, phase: &str, tries: u32) -> Vec<Call> {
        let mut calls = Vec::new();
        for _ in 0..tries {
            if self.cluster.phase().as_deref() == Some(phase) {
                return calls;
            }
            tokio::time::sleep(Duration::from_millis(110)).await;
            calls.extend(self.reconcile().await);
        }
        panic!(
            "the canary never reached {phase}; it is {:?}",
            self.cluster.phase()
        );
    }

    /// Initialization, done: the primary serves, the target is at zero.
    async fn initialized(&self) {
        self.reconcile().await;
        self.until_phase("Initialized").await;
    }

    fn directive_weight_bp(&self) -> Option<u32> {
        self.ingest
            .directive()
            .canaries
            .iter()
            .find(|c| c.key == "application/mhs")
            .map(|c| c.canary_weight_bp)
    }
}

async fn bounded<T>(test: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(60), test)
        .await
        .expect("the test ran over its 60 s bound")
}

fn writes(calls: &[Call]) -> Vec<(String, String)> {
    calls
        .iter()
        .filter(|c| c.method != "GET")
        .map(|c| (c.method.clone(), c.path.clone()))
        .collect()
}

fn find<'a>(calls: &'a [Call], method: &str, path: &str) -> &'a Call {
    calls
        .iter()
        .find(|c| c.is(method, path))
        .unwrap_or_else(|| panic!("no {method} {path} in {:#?}", writes(calls)))
}

fn events(calls: &[Call]) -> Vec<(String, String, String)> {
    calls
        .iter()
        .filter(|c| c.is("POST", EVENTS))
        .map(|c| {
            (
                c.body["type"].as_str().unwrap_or_default().to_owned(),
                c.body["action"].as_str().unwrap_or_default().to_owned(),
                c.body["note"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

/// The status written last among `calls`.
fn status_of(calls: &[Call]) -> Value {
    calls
        .iter()
        .rfind(|c| c.is("PATCH", &format!("{CANARY}/status")))
        .map(|c| c.body["status"].clone())
        .unwrap_or_else(|| panic!("no status written in {:#?}", writes(calls)))
}

fn owner_is_the_canary(object: &Value) {
    let owner = &object["metadata"]["ownerReferences"][0];
    assert_eq!(owner["kind"], "Canary", "{object}");
    assert_eq!(owner["name"], "mhs");
    assert_eq!(owner["uid"], "0b1c6a52-mhs");
    assert_eq!(owner["controller"], true);
}

#[tokio::test]
async fn a_new_canary_gets_a_finalizer_and_a_primary_built_from_the_target() {
    bounded(async {
        let h = Harness::new(canary(false, quick_analysis()), Duration::from_secs(600));
        let calls = h.reconcile().await;
        let primary = format!("{DEPLOYMENTS}/mhs-primary");
        let target = format!("{DEPLOYMENTS}/mhs");
        let status_path = format!("{CANARY}/status");
        let script: Vec<(&str, &str)> = vec![
            ("PATCH", CANARY),                                        // the finalizer
            ("GET", &target), // restore the route: none yet,
            ("PATCH", "/api/v1/namespaces/application/services/mhs"), // apex selects the target
            ("DELETE", VS),   // and no VirtualService
            ("GET", &target), // the revision
            ("GET", &primary), // readiness
            ("GET", &target),
            ("GET", &primary),   // does a primary run already? No
            ("GET", &target),    // InitializePrimary: same revision?
            ("GET", &target),    // the template to copy
            ("PATCH", &primary), // server-side apply of the primary
            ("POST", EVENTS),
            ("PATCH", &status_path),
        ];
        let seen: Vec<(&str, &str)> = calls
            .iter()
            .map(|c| (c.method.as_str(), c.path.as_str()))
            .collect();
        assert_eq!(seen, script);

        let finalizer = &calls[0];
        assert_eq!(finalizer.content_type, "application/merge-patch+json");
        assert_eq!(
            finalizer.body["metadata"]["finalizers"],
            json!(["weir.dev/finalizer"])
        );
        assert!(finalizer.body["metadata"]["resourceVersion"].is_string());

        let apex = &calls[2];
        assert_eq!(apex.content_type, "application/apply-patch+yaml");
        assert!(apex.query.contains("fieldManager=weir") && apex.query.contains("force=true"));
        assert_eq!(apex.body["spec"]["selector"], json!({"app": "mhs"}));
        assert!(apex.body["metadata"].get("ownerReferences").is_none());

        let apply = find(&calls, "PATCH", &primary);
        assert_eq!(apply.content_type, "application/apply-patch+yaml");
        assert!(apply.query.contains("fieldManager=weir") && apply.query.contains("force=true"));
        let body = &apply.body;
        assert_eq!(body["kind"], "Deployment");
        assert_eq!(body["spec"]["replicas"], 2);
        assert_eq!(
            body["spec"]["selector"]["matchLabels"],
            json!({"app": "mhs-primary"})
        );
        assert_eq!(
            body["spec"]["template"]["metadata"]["labels"]["app"],
            "mhs-primary"
        );
        assert_eq!(
            body["spec"]["template"]["spec"]["containers"][0]["image"],
            "ghcr.io/weir/mhs:1.1.1"
        );
        // Of the target's annotations, none (kubectl's record describes the target); Weir's
        // own says which target revision the primary runs.
        let annotations = body["metadata"]["annotations"].as_object().unwrap();
        assert_eq!(
            annotations.keys().collect::<Vec<_>>(),
            ["weir.dev/revision"],
            "{body}"
        );
        assert_eq!(
            status_of(&calls)["lastAppliedSpec"],
            annotations["weir.dev/revision"]
        );
        owner_is_the_canary(body);

        let (kind, action, note) = events(&calls).remove(0);
        assert_eq!((kind.as_str(), action.as_str()), ("Normal", "Initializing"));
        assert_eq!(
            note,
            "New Deployment detected, starting initialization of mhs.application"
        );
        let event = find(&calls, "POST", EVENTS);
        assert_eq!(event.body["reason"], "Synced");
        assert_eq!(event.body["reportingController"], "weir");
        assert_eq!(event.body["reportingInstance"], "weir-0");
        assert_eq!(event.body["regarding"]["uid"], "0b1c6a52-mhs");

        let status = find(&calls, "PATCH", &format!("{CANARY}/status"));
        assert_eq!(status.content_type, "application/apply-patch+yaml");
        assert!(status.query.contains("fieldManager=weir") && status.query.contains("force=true"));
        assert_eq!(status.body["apiVersion"], "weir.dev/v1alpha1");
        assert_eq!(status.body["kind"], "Canary");
        assert_eq!(status.body["status"]["phase"], "Initializing");
        assert!(status.body["status"]["lastAppliedSpec"].is_string());
        assert_eq!(h.cluster.phase().as_deref(), Some("Initializing"));
    })
    .await;
}

#[tokio::test]
async fn initialization_creates_the_services_destination_rules_and_virtual_service() {
    bounded(async {
        let h = Harness::new(canary(false, quick_analysis()), Duration::from_secs(600));
        h.reconcile().await;
        let calls = h.until_phase("Initialized").await;
        let svc = |name: &str| format!("{SERVICES}/{name}");
        let dr = |name: &str| format!("{DRS}/{name}");
        let target = format!("{DEPLOYMENTS}/mhs");
        assert_eq!(
            writes(&calls),
            [
                ("PATCH", svc("mhs")),
                ("PATCH", svc("mhs-primary")),
                ("PATCH", dr("mhs-primary")),
                ("PATCH", svc("mhs-canary")),
                ("PATCH", dr("mhs-canary")),
                ("PATCH", VS.to_owned()),
                ("PATCH", target.clone()),
                ("POST", EVENTS.to_owned()),
                ("PATCH", format!("{CANARY}/status")),
            ]
            .map(|(m, p)| (m.to_owned(), p))
            .to_vec()
        );
        let apex = find(&calls, "PATCH", &svc("mhs"));
        assert_eq!(apex.body["spec"]["selector"], json!({"app": "mhs-primary"}));
        assert_eq!(apex.body["spec"]["ports"][0]["port"], 80);
        assert_eq!(apex.body["spec"]["ports"][0]["targetPort"], 8080);
        assert_eq!(apex.body["spec"]["ports"][0]["name"], "http");
        let primary = find(&calls, "PATCH", &svc("mhs-primary"));
        assert_eq!(
            primary.body["spec"]["selector"],
            json!({"app": "mhs-primary"})
        );
        owner_is_the_canary(&primary.body);
        let canary_svc = find(&calls, "PATCH", &svc("mhs-canary"));
        assert_eq!(canary_svc.body["spec"]["selector"], json!({"app": "mhs"}));
        owner_is_the_canary(&canary_svc.body);
        let rule = find(&calls, "PATCH", &dr("mhs-canary"));
        assert_eq!(rule.body["kind"], "DestinationRule");
        assert_eq!(rule.body["spec"]["host"], "mhs-canary");
        owner_is_the_canary(&rule.body);

        let vs = &find(&calls, "PATCH", VS).body;
        assert_eq!(vs["kind"], "VirtualService");
        assert_eq!(vs["spec"]["hosts"], json!(["mhs", "mhs.example.com"]));
        assert_eq!(
            vs["spec"]["gateways"],
            json!(["istio-system/public-gateway"])
        );
        let http = &vs["spec"]["http"];
        // The canary's route matches only its secret value (from its uid), never "canary".
        assert_eq!(
            http[0]["match"][0]["headers"]["x-weir-route"]["exact"],
            weir_controller::traffic::route_secret(b"0b1c6a52-mhs")
        );
        assert!(!vs.to_string().contains("\"canary\""), "{vs}");
        assert_eq!(http[0]["route"][0]["destination"]["host"], "mhs-canary");
        assert_eq!(http[1]["route"][0]["destination"]["host"], "mhs-primary");
        assert!(
            !vs.to_string().contains("weight"),
            "the weight goes to the filters: {vs}"
        );
        owner_is_the_canary(vs);

        // The target goes to zero only after the routes point at the primary.
        let scale = find(&calls, "PATCH", &target);
        assert_eq!(scale.content_type, "application/merge-patch+json");
        assert_eq!(scale.body["spec"]["replicas"], 0);
        assert_eq!(
            scale.body["metadata"]["annotations"]["weir.dev/scaled-from-replicas"],
            "2"
        );
        assert_eq!(
            events(&calls).last().map(|e| e.2.clone()).as_deref(),
            Some("Initialization done! mhs.application")
        );
        assert_eq!(h.directive_weight_bp(), Some(0));
        assert_eq!(h.cluster.get(CANARY).unwrap()["status"]["canaryWeight"], 0);
    })
    .await;
}

#[tokio::test]
async fn a_new_revision_scales_the_canary_up_and_the_weight_reaches_the_filters() {
    bounded(async {
        let h = Harness::new(canary(false, quick_analysis()), Duration::from_secs(600));
        h.initialized().await;
        let target = format!("{DEPLOYMENTS}/mhs");
        h.cluster.edit(&target, |d| {
            d["spec"]["template"]["spec"]["containers"][0]["image"] =
                json!("ghcr.io/weir/mhs:1.1.2")
        });
        let calls = h.until_phase("Progressing").await;
        let scale = find(&calls, "PATCH", &target);
        assert_eq!(
            scale.body,
            json!({"metadata": {"annotations": {"weir.dev/scaled-from-replicas": null}},
                   "spec": {"replicas": 2}})
        );
        assert!(events(&calls)
            .iter()
            .any(|e| e.2 == "New revision detected! Scaling up mhs.application"));

        // One step later the weight is 10%: a directive for the filters, not a VirtualService weight.
        let mut vs_writes = Vec::new();
        for _ in 0..20 {
            if h.directive_weight_bp() == Some(1000) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(110)).await;
            vs_writes.extend(
                h.reconcile()
                    .await
                    .into_iter()
                    .filter(|c| c.is("PATCH", VS)),
            );
        }
        assert_eq!(h.directive_weight_bp(), Some(1000));
        assert_eq!(h.cluster.get(CANARY).unwrap()["status"]["canaryWeight"], 10);
        assert!(!vs_writes.is_empty());
        assert!(vs_writes
            .iter()
            .all(|c| !c.body.to_string().contains("weight")));
    })
    .await;
}

#[tokio::test]
async fn promotion_copies_the_analysed_template_to_the_primary_and_scales_the_canary_down() {
    bounded(async {
        let h = Harness::new(canary(false, quick_analysis()), Duration::from_secs(600));
        h.initialized().await;
        let target = format!("{DEPLOYMENTS}/mhs");
        let primary = format!("{DEPLOYMENTS}/mhs-primary");
        h.cluster.edit(&target, |d| {
            d["spec"]["template"]["spec"]["containers"][0]["image"] =
                json!("ghcr.io/weir/mhs:1.1.2");
            d["spec"]["template"]["metadata"]["annotations"] = json!({"release": "1.1.2"});
            d["metadata"]["labels"]["tier"] = json!("web");
        });
        let calls = h.until_phase("Succeeded").await;
        let promote = calls
            .iter()
            .rfind(|c| c.is("PATCH", &primary))
            .expect("the primary was updated");
        let template = &promote.body["spec"]["template"];
        assert_eq!(
            template["spec"]["containers"][0]["image"],
            "ghcr.io/weir/mhs:1.1.2"
        );
        assert_eq!(template["metadata"]["annotations"]["release"], "1.1.2");
        assert_eq!(template["metadata"]["labels"]["app"], "mhs-primary");
        assert_eq!(promote.body["metadata"]["labels"]["tier"], "web");
        assert_eq!(promote.body["spec"]["replicas"], 2);

        // After the promotion, and never before it, the canary goes back to zero.
        let promoted_at = calls.iter().position(|c| c.is("PATCH", &primary)).unwrap();
        let scaled_down_at = calls.iter().rposition(|c| c.is("PATCH", &target)).unwrap();
        assert!(scaled_down_at > promoted_at);
        assert_eq!(calls[scaled_down_at].body["spec"]["replicas"], 0);
        assert_eq!(h.cluster.get(&target).unwrap()["spec"]["replicas"], 0);
        let notes: Vec<String> = events(&calls).into_iter().map(|e| e.2).collect();
        for expected in [
            "Advance mhs.application canary weight 10",
            "Advance mhs.application canary weight 20",
            "Copying mhs.application template spec to mhs-primary.application",
            "Promotion completed! Scaling down mhs.application",
        ] {
            assert!(
                notes.iter().any(|n| n.starts_with(expected)),
                "{expected} in {notes:#?}"
            );
        }
        let status = h.cluster.get(CANARY).unwrap()["status"].clone();
        assert_eq!(status["canaryWeight"], 0);
        assert_eq!(status["lastAppliedSpec"], status["lastPromotedSpec"]);
        assert_eq!(h.directive_weight_bp(), Some(0));
    })
    .await;
}

/// A report from one Envoy: `requests` to the canary of which `failures` failed, each 2 ms.
fn canary_report(sequence: u64, requests: u64, failures: u64, generation: u64) -> Report {
    let mut histogram = LatencyHistogram::new();
    for _ in 0..requests {
        histogram.record(2_000);
    }
    let stats = |version: Version, requests, failures, histogram: &LatencyHistogram| VersionStats {
        canary: "application/mhs".into(),
        version: version as i32,
        requests,
        failures,
        latency: Some(histogram.encode()),
    };
    Report {
        reporter: Some(Reporter {
            node_id: "sidecar~10.0.0.7~client.application".into(),
            namespace: NS.into(),
            workload: "client".into(),
        }),
        epoch: 1,
        sequence,
        applied_generation: generation,
        stats: vec![
            stats(Version::Canary, requests, failures, &histogram),
            stats(Version::Primary, requests, 0, &histogram),
        ],
    }
}

#[tokio::test]
async fn failing_checks_roll_back_the_canary_to_zero_replicas() {
    bounded(async {
        let analysis = json!({"interval": "100ms", "threshold": 2, "maxWeight": 50, "stepWeight": 10,
            "metrics": [{"name": "request-success-rate", "interval": "1m", "thresholdRange": {"min": 99}}]});
        let h = Harness::new(canary(false, analysis), Duration::from_secs(600));
        h.initialized().await;
        let target = format!("{DEPLOYMENTS}/mhs");
        h.cluster.edit(&target, |d| {
            d["spec"]["template"]["spec"]["containers"][0]["image"] = json!("ghcr.io/weir/mhs:1.1.2")
        });
        h.until_phase("Progressing").await;
        let mut calls = Vec::new();
        for sequence in 1..40 {
            if h.cluster.phase().as_deref() == Some("Failed") {
                break;
            }
            // Half of the canary's requests fail.
            let generation = h.ingest.directive().generation;
            h.ingest
                .ingest(&canary_report(sequence, 100, 50, generation), Instant::now())
                .expect("the report is accepted");
            tokio::time::sleep(Duration::from_millis(110)).await;
            calls.extend(h.reconcile().await);
        }
        assert_eq!(h.cluster.phase().as_deref(), Some("Failed"));
        let scale = calls
            .iter()
            .rfind(|c| c.is("PATCH", &target))
            .expect("the target was scaled");
        assert_eq!(scale.body["spec"]["replicas"], 0);
        let warnings: Vec<String> = events(&calls)
            .into_iter()
            .filter(|e| e.0 == "Warning")
            .map(|e| e.2)
            .collect();
        assert!(
            warnings.iter().any(|n| n.starts_with("Halt mhs.application advancement success rate 50.00% < 99% (")),
            "{warnings:#?}"
        );
        assert!(
            warnings.iter().any(|n| n.starts_with("Rolling back mhs.application failed checks threshold reached 2")),
            "{warnings:#?}"
        );
        assert_eq!(h.directive_weight_bp(), Some(0));
        let status = h.cluster.get(CANARY).unwrap()["status"].clone();
        assert_eq!(status["failedChecks"], 2);
        assert_ne!(status["lastAppliedSpec"], status["lastPromotedSpec"]);
        // The decision history in the status names the numbers.
        let decisions = status["decisions"].as_array().unwrap();
        assert!(decisions
            .iter()
            .any(|d| d["checks"][0]["value"] == json!(50.0) && d["checks"][0]["verdict"] == "Fail"));
        // The primary still runs the old version.
        let primary = h.cluster.get(&format!("{DEPLOYMENTS}/mhs-primary")).unwrap();
        assert_eq!(
            primary["spec"]["template"]["spec"]["containers"][0]["image"],
            "ghcr.io/weir/mhs:1.1.1"
        );
        // The controller's /metrics (the dashboard's series) show the rollback and the
        // numbers the filters streamed.
        let metrics = h.ctx.exporter().render();
        let labels = r#"name="mhs",namespace="application""#;
        for line in [
            format!(r#"weir_canary_phase{{{labels},phase="Failed"}} 1"#),
            format!(r#"weir_canary_status{{{labels}}} 2"#),
            format!(r#"weir_canary_failed_checks{{{labels}}} 2"#),
            r#"weir_canary_weight{workload="mhs",namespace="application"} 0"#.to_owned(),
            format!(
                r#"weir_canary_failures_total{{{labels},deployment_strategy="canary",analysis_status="completed"}} 1"#
            ),
        ] {
            assert!(metrics.lines().any(|l| l == line), "no `{line}` in\n{metrics}");
        }
        let requests = metrics
            .lines()
            .find_map(|l| l.strip_prefix(&format!(r#"weir_canary_requests_total{{{labels},version="canary"}} "#)))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no canary requests in\n{metrics}"));
        let failures = metrics
            .lines()
            .find_map(|l| l.strip_prefix(&format!(r#"weir_canary_request_failures_total{{{labels},version="canary"}} "#)))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no canary failures in\n{metrics}"));
        assert!(requests >= 100 && failures * 2 == requests, "{requests} requests, {failures} failures");
    })
    .await;
}

#[tokio::test]
async fn between_steps_the_judge_looks_without_api_calls_and_rolls_back_on_its_fail() {
    bounded(async {
        // A long interval: after the step into Progressing, no engine step is due for 2 s.
        let analysis = json!({"interval": "2s", "threshold": 2, "maxWeight": 50, "stepWeight": 10,
            "judge": {"confidence": 0.99}});
        let h = Harness::new(canary(false, analysis), Duration::from_secs(600));
        h.reconcile().await;
        h.until_phase_within("Initialized", 100).await;
        let target = format!("{DEPLOYMENTS}/mhs");
        h.cluster.edit(&target, |d| {
            d["spec"]["template"]["spec"]["containers"][0]["image"] =
                json!("ghcr.io/weir/mhs:1.1.2")
        });
        h.until_phase_within("Progressing", 100).await;
        // A healthy canary beside the primary: the judge's looks between the steps read the
        // ingest alone.
        let generation = h.ingest.directive().generation;
        for sequence in 1..=3 {
            h.ingest
                .ingest(&canary_report(sequence, 20, 0, generation), Instant::now())
                .expect("the report is accepted");
            let calls = h.reconcile().await;
            assert!(
                calls.is_empty(),
                "a look of the judge alone made API calls: {:?}",
                calls
                    .iter()
                    .map(|c| (&c.method, &c.path))
                    .collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(h.cluster.phase().as_deref(), Some("Progressing"));
        // Half the canary's requests fail: the next look asks for a full step, which rolls back
        // at once, an interval early.
        h.ingest
            .ingest(&canary_report(4, 30, 15, generation), Instant::now())
            .expect("the report is accepted");
        let calls = h.reconcile().await;
        assert_eq!(h.cluster.phase().as_deref(), Some("Failed"));
        let scale = calls
            .iter()
            .rfind(|c| c.is("PATCH", &target))
            .expect("the target was scaled");
        assert_eq!(scale.body["spec"]["replicas"], 0);
        let rollback = events(&calls)
            .into_iter()
            .find(|e| {
                e.0 == "Warning"
                    && e.2
                        .starts_with("Rolling back mhs.application: canary failure rate")
            })
            .unwrap_or_else(|| panic!("no rollback event in {:#?}", events(&calls)));
        assert!(
            rollback.2.contains("(sequential test, 99% confidence, "),
            "{rollback:?}"
        );
        assert_eq!(h.directive_weight_bp(), Some(0));
    })
    .await;
}

#[tokio::test]
async fn without_filter_reports_the_virtual_service_carries_the_weights_and_an_event_says_so() {
    bounded(async {
        let h = Harness::new(canary(false, quick_analysis()), Duration::ZERO);
        h.reconcile().await;
        let init = h.until_phase("Initialized").await;
        assert!(events(&init).iter().any(|e| e.0 == "Warning"
            && e.1 == "RoutingFallback"
            && e.2.contains("No Weir filter reported for mhs.application")));
        let vs = find(&init, "PATCH", VS);
        assert_eq!(vs.body["spec"]["http"][0]["route"][0]["weight"], 100);
        assert!(!vs.body.to_string().contains("x-weir-route"));

        let target = format!("{DEPLOYMENTS}/mhs");
        h.cluster.edit(&target, |d| {
            d["spec"]["template"]["spec"]["containers"][0]["image"] =
                json!("ghcr.io/weir/mhs:1.1.2")
        });
        let mut calls = Vec::new();
        for _ in 0..30 {
            if h.cluster.get(CANARY).unwrap()["status"]["canaryWeight"] == 10 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(110)).await;
            calls.extend(h.reconcile().await);
        }
        let vs = calls
            .iter()
            .rfind(|c| c.is("PATCH", VS))
            .expect("the VirtualService was rewritten");
        let route = &vs.body["spec"]["http"][0]["route"];
        assert_eq!(route[0]["destination"]["host"], "mhs-primary");
        assert_eq!(route[0]["weight"], 90);
        assert_eq!(route[1]["destination"]["host"], "mhs-canary");
        assert_eq!(route[1]["weight"], 10);

        // A filter reports: back to header routing at once, with an event.
        let generation = h.ingest.directive().generation;
        h.ingest
            .ingest(&canary_report(1, 10, 0, generation), Instant::now())
            .unwrap();
        let calls = h.reconcile().await;
        let vs = find(&calls, "PATCH", VS);
        assert_eq!(
            vs.body["spec"]["http"][0]["match"][0]["headers"]["x-weir-route"]["exact"],
            weir_controller::traffic::route_secret(b"0b1c6a52-mhs")
        );
        assert!(events(&calls).iter().any(|e| e.1 == "RoutingFilters"));
    })
    .await;
}

/// A report from the Envoy of [`canary_report`] that carries nothing for the canary: no stats
/// at all, or entries with zero requests.
fn empty_report(sequence: u64, generation: u64, with_zero_entries: bool) -> Report {
    let mut report = canary_report(sequence, 0, 0, generation);
    if !with_zero_entries {
        report.stats.clear();
    }
    report
}

#[tokio::test]
async fn the_weighted_fallback_engages_when_the_filters_stop_reporting_mid_rollout() {
    bounded(async {
        // Checks that never have enough samples: the rollout halts at its first weight.
        let analysis = json!({"interval": "100ms", "threshold": 2, "maxWeight": 50, "stepWeight": 10,
            "minSampleCount": 1_000_000,
            "metrics": [{"name": "request-success-rate", "interval": "1m", "thresholdRange": {"min": 99}}]});
        let h = Harness::with_settings(
            canary(false, analysis),
            Settings {
                fallback_after: Duration::from_millis(600),
                report_freshness: Duration::from_millis(150),
                ..Settings::default()
            },
        );
        h.initialized().await;
        let target = format!("{DEPLOYMENTS}/mhs");
        h.cluster.edit(&target, |d| {
            d["spec"]["template"]["spec"]["containers"][0]["image"] =
                json!("ghcr.io/weir/mhs:1.1.2")
        });
        // The filters report while the rollout starts: routing by header.
        let sequence = std::cell::Cell::new(0);
        let next = || {
            sequence.set(sequence.get() + 1);
            sequence.get()
        };
        let report = |h: &Harness, requests: u64| {
            let generation = h.ingest.directive().generation;
            h.ingest
                .ingest(&canary_report(next(), requests, 0, generation), Instant::now())
                .expect("the report is accepted");
        };
        let mut calls = Vec::new();
        for _ in 0..20 {
            if h.cluster.get(CANARY).unwrap()["status"]["canaryWeight"] == 10 {
                break;
            }
            report(&h, 10);
            tokio::time::sleep(Duration::from_millis(110)).await;
            calls.extend(h.reconcile().await);
        }
        assert_eq!(h.cluster.get(CANARY).unwrap()["status"]["canaryWeight"], 10);
        assert!(events(&calls).iter().all(|e| e.1 != "RoutingFallback"));

        // Then they go away (uninstalled, or their stream is down): after fallback_after
        // without a report the VirtualService carries the weight the status claims.
        let mut calls = Vec::new();
        for _ in 0..30 {
            if events(&calls).iter().any(|e| e.1 == "RoutingFallback") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(110)).await;
            calls.extend(h.reconcile().await);
        }
        let fallback = events(&calls)
            .into_iter()
            .find(|e| e.1 == "RoutingFallback")
            .expect("the fallback engaged once the filters were silent");
        assert_eq!(fallback.0, "Warning");
        assert!(
            fallback.2.contains("No Weir filter reported for mhs.application"),
            "{fallback:?}"
        );
        let vs = calls
            .iter()
            .rfind(|c| c.is("PATCH", VS))
            .expect("the VirtualService was rewritten");
        let weight = h.cluster.get(CANARY).unwrap()["status"]["canaryWeight"].clone();
        let route = &vs.body["spec"]["http"][0]["route"];
        assert_eq!(route[1]["destination"]["host"], "mhs-canary");
        assert_eq!(route[1]["weight"], weight);
        assert!(!vs.body.to_string().contains("x-weir-route"));

        // A filter that is connected but carries nothing for this canary is not reporting for
        // it: neither an empty report nor entries with zero requests bring header routing back.
        for with_zero_entries in [false, true] {
            let generation = h.ingest.directive().generation;
            h.ingest
                .ingest(
                    &empty_report(next(), generation, with_zero_entries),
                    Instant::now(),
                )
                .expect("the report is accepted");
            let calls = h.reconcile().await;
            assert!(
                calls.iter().all(|c| !c.is("PATCH", VS)),
                "{:#?}",
                writes(&calls)
            );
            assert!(events(&calls).iter().all(|e| e.1 != "RoutingFilters"));
        }

        // Requests reported again: header routing at once.
        report(&h, 10);
        let calls = h.reconcile().await;
        let vs = find(&calls, "PATCH", VS);
        assert_eq!(
            vs.body["spec"]["http"][0]["match"][0]["headers"]["x-weir-route"]["exact"],
            weir_controller::traffic::route_secret(b"0b1c6a52-mhs")
        );
        assert!(events(&calls).iter().any(|e| e.1 == "RoutingFilters"));
    })
    .await;
}

#[tokio::test]
async fn deleting_with_revert_on_deletion_restores_the_target_before_releasing_the_canary() {
    bounded(async {
        let h = Harness::new(canary(true, quick_analysis()), Duration::from_secs(600));
        h.initialized().await;
        let target = format!("{DEPLOYMENTS}/mhs");
        assert_eq!(h.cluster.get(&target).unwrap()["spec"]["replicas"], 0);
        h.cluster.hold_rollout("mhs", true);
        h.cluster.edit(CANARY, |c| {
            c["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z")
        });
        let first = h.reconcile().await;
        assert_eq!(h.cluster.phase().as_deref(), Some("Terminating"));
        let scale = find(&first, "PATCH", &target);
        assert_eq!(
            scale.body["spec"]["replicas"], 2,
            "restored from the annotation"
        );
        assert_eq!(
            scale.body["metadata"],
            json!({"annotations": {"weir.dev/scaled-from-replicas": null}}),
            "which goes with it"
        );
        let annotations = h.cluster.get(&target).unwrap()["metadata"]["annotations"].clone();
        assert!(
            annotations.get("weir.dev/scaled-from-replicas").is_none(),
            "{annotations}"
        );

        // While the target is not ready, the apex Service keeps selecting the primary.
        tokio::time::sleep(Duration::from_millis(110)).await;
        let waiting = h.reconcile().await;
        assert!(waiting
            .iter()
            .all(|c| !c.is("PATCH", &format!("{SERVICES}/mhs"))));
        assert!(h.cluster.get(CANARY).unwrap()["metadata"]["finalizers"]
            .as_array()
            .is_some_and(|f| !f.is_empty()));

        h.cluster.hold_rollout("mhs", false);
        tokio::time::sleep(Duration::from_millis(110)).await;
        let done = h.reconcile().await;
        let apex = find(&done, "PATCH", &format!("{SERVICES}/mhs"));
        assert_eq!(apex.body["spec"]["selector"], json!({"app": "mhs"}));
        assert_eq!(
            writes(&done)
                .into_iter()
                .filter(|(m, _)| m != "POST")
                .collect::<Vec<_>>(),
            [
                ("PATCH", format!("{SERVICES}/mhs")),
                ("DELETE", VS.to_owned()),
                ("PATCH", format!("{CANARY}/status")),
                ("PATCH", CANARY.to_owned()),
            ]
            .map(|(m, p)| (m.to_owned(), p))
            .to_vec()
        );
        let release = done.last().unwrap();
        assert_eq!(release.body["metadata"]["finalizers"], json!([]));
        assert!(events(&done).iter().any(
            |e| e.2 == "Terminated canary mhs.application: traffic is back on mhs.application"
        ));
        assert_eq!(
            h.directive_weight_bp(),
            None,
            "the canary left the directive"
        );
        assert!(h.cluster.get(VS).is_none());
        // The primary is left to the garbage collector (owned by the Canary).
        owner_is_the_canary(
            &h.cluster
                .get(&format!("{DEPLOYMENTS}/mhs-primary"))
                .unwrap(),
        );
    })
    .await;
}

#[tokio::test]
async fn deleting_without_revert_on_deletion_keeps_the_primary_serving() {
    bounded(async {
        let h = Harness::new(canary(false, quick_analysis()), Duration::from_secs(600));
        h.initialized().await;
        h.cluster.edit(CANARY, |c| {
            c["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z")
        });
        let mut calls = h.reconcile().await;
        for _ in 0..5 {
            if h.cluster.get(CANARY).unwrap()["metadata"]["finalizers"] == json!([]) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(110)).await;
            calls.extend(h.reconcile().await);
        }
        assert_eq!(
            h.cluster.get(CANARY).unwrap()["metadata"]["finalizers"],
            json!([])
        );
        // Nothing is scaled or re-pointed; what serves loses its owner, so the garbage
        // collector does not delete the only ready pods along with the Canary.
        assert!(calls
            .iter()
            .all(|c| !c.is("PATCH", &format!("{DEPLOYMENTS}/mhs"))));
        assert!(calls
            .iter()
            .all(|c| !c.is("PATCH", &format!("{SERVICES}/mhs"))));
        for path in [
            format!("{DEPLOYMENTS}/mhs-primary"),
            format!("{SERVICES}/mhs-primary"),
            format!("{SERVICES}/mhs-canary"),
            format!("{DRS}/mhs-primary"),
            format!("{DRS}/mhs-canary"),
            VS.to_owned(),
        ] {
            let release = find(&calls, "PATCH", &path);
            assert_eq!(release.body, json!({"metadata": {"ownerReferences": null}}));
        }
        let primary = h
            .cluster
            .get(&format!("{DEPLOYMENTS}/mhs-primary"))
            .unwrap();
        assert!(primary["metadata"].get("ownerReferences").is_none());
        assert_eq!(h.directive_weight_bp(), None);
    })
    .await;
}

#[tokio::test]
async fn deleting_a_canary_finishes_as_soon_as_nothing_waits_not_an_interval_later() {
    bounded(async {
        for revert in [false, true] {
            let h = Harness::new(canary(revert, quick_analysis()), Duration::from_secs(600));
            h.initialized().await;
            // An hour between steps: a deletion that waited for the next step would hang.
            h.cluster.hold_rollout("mhs", true);
            h.cluster.edit(CANARY, |c| {
                c["spec"]["analysis"]["interval"] = json!("1h");
                c["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
            });
            let finalizers = || h.cluster.get(CANARY).unwrap()["metadata"]["finalizers"].clone();
            let mut calls = h.reconcile().await;
            if revert {
                // The target is scaled back up; while it is not ready, the deletion waits.
                calls.extend(h.reconcile().await);
                assert_ne!(finalizers(), json!([]), "waits for the restored target");
                h.cluster.hold_rollout("mhs", false);
                calls.extend(h.reconcile().await);
            }
            assert_eq!(finalizers(), json!([]), "revertOnDeletion: {revert}");
            let notes: Vec<String> = events(&calls).into_iter().map(|e| e.2).collect();
            assert!(
                notes
                    .iter()
                    .any(|n| n.starts_with("Terminating canary mhs.application")),
                "{notes:#?}"
            );
            assert!(
                notes
                    .iter()
                    .any(|n| n.starts_with("Terminated canary mhs.application")),
                "{notes:#?}"
            );
        }
    })
    .await;
}

#[tokio::test]
async fn a_canary_applied_again_after_a_deletion_mid_rollout_analyses_the_new_revision_first() {
    bounded(async {
        let h = Harness::new(canary(false, quick_analysis()), Duration::from_secs(600));
        h.initialized().await;
        let target = format!("{DEPLOYMENTS}/mhs");
        let primary = format!("{DEPLOYMENTS}/mhs-primary");
        let image = |path: &str| {
            h.cluster.get(path).unwrap()["spec"]["template"]["spec"]["containers"][0]["image"]
                .clone()
        };
        h.cluster.edit(&target, |d| {
            d["spec"]["template"]["spec"]["containers"][0]["image"] =
                json!("ghcr.io/weir/mhs:1.1.2")
        });
        h.until_phase("Progressing").await;

        // Deleted without revertOnDeletion mid-rollout: the primary (1.1.1) stays and serves.
        h.cluster.edit(CANARY, |c| {
            c["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z")
        });
        h.reconcile().await;
        assert_eq!(
            h.cluster.get(CANARY).unwrap()["metadata"]["finalizers"],
            json!([])
        );
        h.cluster.fake.lock().unwrap().objects.remove(CANARY);
        assert_eq!(image(&primary), "ghcr.io/weir/mhs:1.1.1");

        // Applied again: a new Canary (new uid, no status).
        let mut again = canary(false, quick_analysis());
        again["metadata"]["uid"] = json!("5e1f0c77-mhs");
        h.cluster.put(again);
        let mut calls = h.reconcile().await;
        calls.extend(h.until_phase("Initialized").await);
        assert_eq!(
            image(&primary),
            "ghcr.io/weir/mhs:1.1.1",
            "initialization keeps the primary that runs"
        );
        assert!(calls
            .iter()
            .filter(|c| c.is("PATCH", &primary))
            .all(|c| !c.body.to_string().contains("1.1.2")));
        let notes: Vec<String> = events(&calls).into_iter().map(|e| e.2).collect();
        assert!(
            notes.iter().any(
                |n| n.starts_with("mhs-primary.application already runs revision ")
                    && n.ends_with("is analysed as a new revision")
            ),
            "{notes:#?}"
        );

        // The target's 1.1.2 is a new revision: analysed, and only then promoted.
        let calls = h.until_phase("Progressing").await;
        assert!(events(&calls)
            .iter()
            .any(|e| e.2 == "New revision detected! Scaling up mhs.application"));
        assert_eq!(image(&primary), "ghcr.io/weir/mhs:1.1.1");
        h.until_phase("Succeeded").await;
        assert_eq!(image(&primary), "ghcr.io/weir/mhs:1.1.2");
        assert_eq!(image(&target), "ghcr.io/weir/mhs:1.1.2");
    })
    .await;
}

#[tokio::test]
async fn an_invalid_canary_is_reported_once_and_not_acted_on() {
    bounded(async {
        let analysis = json!({"interval": "100ms", "stepWeight": 150});
        let h = Harness::new(canary(false, analysis), Duration::from_secs(600));
        let first = h.reconcile().await;
        assert_eq!(
            writes(&first),
            [
                ("PATCH", CANARY.to_owned()),
                ("POST", EVENTS.to_owned()),
                ("PATCH", format!("{CANARY}/status"))
            ]
            .map(|(m, p)| (m.to_owned(), p))
            .to_vec()
        );
        let note = find(&first, "POST", EVENTS).body["note"]
            .as_str()
            .unwrap()
            .to_owned();
        assert!(
            note.contains("spec.analysis.stepWeight: must be between 1 and 100, got 150"),
            "{note}"
        );
        assert_eq!(note.matches("invalid").count(), 1, "{note}");
        let condition = &status_of(&first)["conditions"][0];
        assert_eq!(condition["type"], "Valid");
        assert_eq!(condition["status"], "False");
        assert_eq!(condition["reason"], "InvalidSpec");
        assert_eq!(condition["message"], note.as_str());
        let again = h.reconcile().await;
        assert!(again.is_empty(), "{:#?}", writes(&again));
        assert!(h
            .cluster
            .get(&format!("{DEPLOYMENTS}/mhs-primary"))
            .is_none());
    })
    .await;
}

#[tokio::test]
async fn an_invalid_edit_mid_rollout_shows_in_the_status_until_it_is_fixed() {
    bounded(async {
        let h = Harness::new(canary(false, quick_analysis()), Duration::from_secs(600));
        h.initialized().await;
        let target = format!("{DEPLOYMENTS}/mhs");
        h.cluster.edit(&target, |d| {
            d["spec"]["template"]["spec"]["containers"][0]["image"] =
                json!("ghcr.io/weir/mhs:1.1.2")
        });
        h.until_phase("Progressing").await;
        // stepWeight: 0 is out of range (not "missing").
        h.cluster
            .edit(CANARY, |c| c["spec"]["analysis"]["stepWeight"] = json!(0));
        let calls = h.reconcile().await;
        let note = find(&calls, "POST", EVENTS).body["note"]
            .as_str()
            .unwrap()
            .to_owned();
        assert!(
            note.starts_with("Canary mhs.application is invalid (1 problem):"),
            "{note}"
        );
        assert!(
            note.contains("spec.analysis.stepWeight: must be between 1 and 100, got 0"),
            "{note}"
        );
        assert_eq!(note.matches("invalid").count(), 1, "{note}");
        let status = h.cluster.get(CANARY).unwrap()["status"].clone();
        assert_eq!(
            status["phase"], "Progressing",
            "the rollout is where it was"
        );
        let conditions = status["conditions"].as_array().unwrap();
        let valid = conditions
            .iter()
            .find(|c| c["type"] == "Valid")
            .expect("a Valid condition");
        assert_eq!(valid["status"], "False");
        assert_eq!(valid["message"], note.as_str());
        assert!(
            conditions.iter().any(|c| c["type"] == "Promoted"),
            "the rest of the status stays: {status}"
        );
        // Nothing more while it stays invalid: no event, no write.
        tokio::time::sleep(Duration::from_millis(110)).await;
        assert!(writes(&h.reconcile().await).is_empty());

        // Fixed: the rollout goes on, and the condition goes.
        h.cluster
            .edit(CANARY, |c| c["spec"]["analysis"]["stepWeight"] = json!(10));
        let calls = h.reconcile().await;
        let status = status_of(&calls);
        assert!(
            status["conditions"]
                .as_array()
                .unwrap()
                .iter()
                .all(|c| c["type"] != "Valid"),
            "{status}"
        );
        h.until_phase("Succeeded").await;
    })
    .await;
}

#[tokio::test]
async fn a_halt_that_repeats_joins_one_event_series_and_the_status_says_why() {
    bounded(async {
        let h = Harness::new(canary(false, quick_analysis()), Duration::from_secs(600));
        h.cluster.hold_rollout("mhs-primary", true);
        let mut calls = h.reconcile().await;
        for _ in 0..4 {
            tokio::time::sleep(Duration::from_millis(110)).await;
            calls.extend(h.reconcile().await);
        }
        // The primary's readiness halts every step (the text is the engine's).
        let created: Vec<&Call> = calls
            .iter()
            .filter(|c| {
                c.is("POST", EVENTS)
                    && c.body["note"]
                        .as_str()
                        .unwrap()
                        .starts_with("mhs-primary.application not ready")
            })
            .collect();
        assert_eq!(
            created.len(),
            1,
            "one Event for the repeated halt: {:#?}",
            events(&calls)
        );
        let halt = created[0].body["note"].as_str().unwrap();
        let name = created[0].body["metadata"]["name"].as_str().unwrap();
        let series: Vec<&Call> = calls
            .iter()
            .filter(|c| c.is("PATCH", &format!("{EVENTS}/{name}")))
            .collect();
        assert_eq!(series.len(), 3, "{:#?}", writes(&calls));
        for (i, patch) in series.iter().enumerate() {
            assert_eq!(patch.content_type, "application/merge-patch+json");
            let body = patch.body.as_object().unwrap();
            assert_eq!(body.keys().collect::<Vec<_>>(), ["series"]);
            assert_eq!(patch.body["series"]["count"], i + 2);
            assert!(patch.body["series"]["lastObservedTime"].is_string());
        }
        let event = h.cluster.get(&format!("{EVENTS}/{name}")).unwrap();
        assert_eq!(event["series"]["count"], 4);
        assert_eq!(event["note"], halt);

        // kubectl get canary shows why (its Halted column reads this condition).
        let status = h.cluster.get(CANARY).unwrap()["status"].clone();
        let halted = status["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == "Halted")
            .unwrap_or_else(|| panic!("a Halted condition in {status}"))
            .clone();
        assert_eq!(halted["status"], "True");
        assert_eq!(halted["reason"], "Halt");
        assert_eq!(halted["message"], halt);

        // Once it advances, the condition goes.
        h.cluster.hold_rollout("mhs-primary", false);
        h.until_phase("Initialized").await;
        let status = h.cluster.get(CANARY).unwrap()["status"].clone();
        assert!(
            status["conditions"]
                .as_array()
                .unwrap()
                .iter()
                .all(|c| c["type"] != "Halted"),
            "{status}"
        );
    })
    .await;
}

#[tokio::test]
async fn an_idle_canary_writes_no_status_at_each_interval() {
    bounded(async {
        let h = Harness::new(canary(false, quick_analysis()), Duration::from_secs(600));
        h.initialized().await;
        let before = h.cluster.get(CANARY).unwrap()["metadata"]["resourceVersion"].clone();
        // Five intervals with nothing new: each step only moves lastStepTime.
        let mut calls = Vec::new();
        for _ in 0..5 {
            tokio::time::sleep(Duration::from_millis(110)).await;
            calls.extend(h.reconcile().await);
        }
        assert!(
            calls
                .iter()
                .all(|c| !c.is("PATCH", &format!("{CANARY}/status"))),
            "{:#?}",
            writes(&calls)
        );
        assert_eq!(
            h.cluster.get(CANARY).unwrap()["metadata"]["resourceVersion"],
            before,
            "kubectl get canary -w prints nothing"
        );
        // A real change is written, with the current step time.
        h.cluster.edit(&format!("{DEPLOYMENTS}/mhs"), |d| {
            d["spec"]["template"]["spec"]["containers"][0]["image"] =
                json!("ghcr.io/weir/mhs:1.1.2")
        });
        let calls = h.until_phase("Progressing").await;
        let status = status_of(&calls);
        assert_eq!(status["phase"], "Progressing");
        assert!(status["lastStepTime"].is_string());
    })
    .await;
}

#[tokio::test]
async fn a_status_write_that_failed_is_retried_before_the_next_step() {
    bounded(async {
        let h = Harness::new(canary(false, quick_analysis()), Duration::from_secs(600));
        // The Canary disappears from the API server between the effects and the status write.
        h.reconcile().await;
        let saved = h.cluster.get(CANARY).unwrap();
        h.cluster.fake.lock().unwrap().objects.remove(CANARY);
        tokio::time::sleep(Duration::from_millis(110)).await;
        let canary: Arc<CanaryResource> = Arc::new(serde_json::from_value(saved.clone()).unwrap());
        let failed = reconcile(canary, h.ctx.clone()).await;
        assert!(failed.is_err(), "the status write must fail");
        // It comes back (say, the API server recovered): the pending status goes first.
        h.cluster.put(saved);
        let calls = h.reconcile().await;
        let status_writes: Vec<usize> = calls
            .iter()
            .enumerate()
            .filter(|(_, c)| c.is("PATCH", &format!("{CANARY}/status")))
            .map(|(i, _)| i)
            .collect();
        assert_eq!(status_writes.first(), Some(&0), "{:#?}", writes(&calls));
        assert_eq!(calls[0].body["status"]["phase"], "Initialized");
    })
    .await;
}

#[tokio::test]
async fn leader_election_takes_a_free_or_expired_lease_and_respects_a_held_one() {
    bounded(async {
        let cluster = Cluster::start();
        let lease_path =
            "/apis/coordination.k8s.io/v1/namespaces/weir-system/leases/weir-controller";
        let lock = |who: &str| {
            LeaseLock::new(
                cluster.client.clone(),
                "weir-system",
                "weir-controller",
                who,
                Duration::from_secs(15),
            )
        };
        let a = lock("weir-a");
        let b = lock("weir-b");
        assert!(
            a.try_acquire_or_renew().await.unwrap(),
            "a free Lease is taken"
        );
        let log = cluster.log();
        assert!(log[0].is("GET", lease_path));
        assert!(log[1].is(
            "POST",
            "/apis/coordination.k8s.io/v1/namespaces/weir-system/leases"
        ));
        assert_eq!(log[1].body["spec"]["holderIdentity"], "weir-a");
        assert_eq!(log[1].body["spec"]["leaseDurationSeconds"], 15);

        assert!(
            !b.try_acquire_or_renew().await.unwrap(),
            "a held Lease is respected"
        );
        assert!(a.try_acquire_or_renew().await.unwrap(), "the holder renews");
        let renewal = cluster.log().last().unwrap().clone();
        assert!(renewal.is("PUT", lease_path));
        assert!(renewal.body["metadata"]["resourceVersion"].is_string());

        // The holder stopped renewing long ago: the Lease is taken over.
        cluster.edit(lease_path, |l| {
            l["spec"]["renewTime"] = json!("2020-01-01T00:00:00.000000Z")
        });
        assert!(
            b.try_acquire_or_renew().await.unwrap(),
            "an expired Lease is taken over"
        );
        let lease = cluster.get(lease_path).unwrap();
        assert_eq!(lease["spec"]["holderIdentity"], "weir-b");
        assert_eq!(lease["spec"]["leaseTransitions"], 1);
        assert!(
            !a.try_acquire_or_renew().await.unwrap(),
            "the old leader knows it lost"
        );

        b.release().await.unwrap();
        assert!(cluster.get(lease_path).unwrap()["spec"]
            .get("holderIdentity")
            .is_none());
        assert!(
            a.try_acquire_or_renew().await.unwrap(),
            "a released Lease is free at once"
        );
    })
    .await;
}

#[tokio::test]
async fn the_leader_labels_its_own_pod_so_the_controller_service_selects_it() {
    bounded(async {
        let cluster = Cluster::start();
        cluster.put(json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "weir-0", "namespace": "weir-system", "labels": {"app": "weir"}}}));
        weir_controller::platform::kubernetes::leader::label_pod(
            cluster.client.clone(),
            "weir-system",
            "weir-0",
            true,
        )
        .await
        .unwrap();
        let pod = "/api/v1/namespaces/weir-system/pods/weir-0";
        assert_eq!(cluster.get(pod).unwrap()["metadata"]["labels"]["weir.dev/leader"], "true");
        weir_controller::platform::kubernetes::leader::label_pod(
            cluster.client.clone(),
            "weir-system",
            "weir-0",
            false,
        )
        .await
        .unwrap();
        let labels = cluster.get(pod).unwrap()["metadata"]["labels"].clone();
        assert_eq!(labels, json!({"app": "weir"}));
        let patch = cluster.log().last().unwrap().clone();
        assert_eq!(patch.content_type, "application/merge-patch+json");
        assert_eq!(patch.body, json!({"metadata": {"labels": {"weir.dev/leader": null}}}));
    })
    .await;
}

#[tokio::test]
async fn metric_templates_from_the_cluster_reach_the_prometheus_source_with_their_credentials() {
    use weir_controller::metrics::prometheus::Credentials;
    use weir_controller::metrics::template::Templates;
    use weir_controller::platform::kubernetes::crd::MetricTemplateResource;
    use weir_controller::platform::kubernetes::templates;

    bounded(async {
        let cluster = Cluster::start();
        cluster.put(json!({"apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "prom-auth", "namespace": NS},
            "data": {"username": "d2Vpcg==", "password": "czNjcjN0"}}));
        let template: MetricTemplateResource = serde_json::from_value(json!({
            "apiVersion": "weir.dev/v1alpha1", "kind": "MetricTemplate",
            "metadata": {"name": "not-found-percentage", "namespace": NS},
            "spec": {"provider": {"type": "prometheus", "address": "http://prometheus.istio-system:9090",
                                  "secretRef": {"name": "prom-auth"}},
                     "query": "100 - sum(rate(http_requests_total{namespace=\"{{ namespace }}\"}[{{ interval }}]))"}
        }))
        .unwrap();
        let store = Templates::new();
        templates::store(&cluster.client, &store, &template).await;
        let stored = store.get(NS, "not-found-percentage").expect("the template is stored");
        assert_eq!(
            stored.credentials,
            Some(Credentials::Basic {
                username: "weir".into(),
                password: "s3cr3t".into()
            })
        );
        assert!(cluster.log()[0].is("GET", "/api/v1/namespaces/application/secrets/prom-auth"));

        // A template whose provider Weir does not have is left out (and so reported by the check).
        let mut bad = template.clone();
        bad.spec.0.provider.kind = "datadog".into();
        templates::store(&cluster.client, &store, &bad).await;
        assert!(store.get(NS, "not-found-percentage").is_none());
    })
    .await;
}

#[tokio::test]
async fn alert_providers_and_their_secrets_are_read_from_the_cluster_when_an_alert_is_sent() {
    use weir_controller::notify::ProviderSource;
    use weir_controller::platform::kubernetes::alerts::ClusterProviders;
    use weir_controller::spec::AlertProviderType;

    bounded(async {
        let cluster = Cluster::start();
        cluster.put(
            json!({"apiVersion": "weir.dev/v1alpha1", "kind": "AlertProvider",
            "metadata": {"name": "on-call", "namespace": NS},
            "spec": {"type": "slack", "channel": "on-call", "secretRef": {"name": "slack-url"}}}),
        );
        // https://hooks.example/T0/B0/x and a bearer token, base64 as the API server sends them.
        cluster.put(json!({"apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "slack-url", "namespace": NS},
            "data": {"address": "aHR0cHM6Ly9ob29rcy5leGFtcGxlL1QwL0IwL3g=", "token": "dDBr"}}));
        let providers = ClusterProviders::new(cluster.client.clone());
        let resolved = providers.resolve(NS, "on-call").await.unwrap();
        assert_eq!(resolved.kind, AlertProviderType::Slack);
        assert_eq!(resolved.url, "https://hooks.example/T0/B0/x");
        assert_eq!(resolved.token.as_deref(), Some("t0k"));
        assert_eq!(
            (resolved.channel.as_str(), resolved.username.as_str()),
            ("on-call", "flagger")
        );
        let log = cluster.log();
        assert!(log[0].is(
            "GET",
            "/apis/weir.dev/v1alpha1/namespaces/application/alertproviders/on-call"
        ));
        assert!(log[1].is("GET", "/api/v1/namespaces/application/secrets/slack-url"));

        let missing = providers.resolve(NS, "nobody").await.unwrap_err();
        assert!(
            missing.contains("AlertProvider application/nobody not found"),
            "{missing}"
        );
        cluster.put(
            json!({"apiVersion": "weir.dev/v1alpha1", "kind": "AlertProvider",
            "metadata": {"name": "lost", "namespace": NS},
            "spec": {"type": "msteams", "secretRef": {"name": "gone"}}}),
        );
        let no_secret = providers.resolve(NS, "lost").await.unwrap_err();
        assert!(
            no_secret.contains("Secret application/gone not found"),
            "{no_secret}"
        );
    })
    .await;
}

#[tokio::test]
async fn the_configuration_a_target_uses_is_part_of_its_revision_and_copied_for_the_primary() {
    bounded(async {
        let h = Harness::new(canary(false, quick_analysis()), Duration::from_secs(600));
        let configmaps = "/api/v1/namespaces/application/configmaps";
        let secrets = "/api/v1/namespaces/application/secrets";
        h.cluster
            .put(json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "mhs-config", "namespace": NS}, "data": {"MODE": "fast"}}));
        h.cluster.put(json!({"apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "mhs-token", "namespace": NS}, "type": "Opaque",
            "data": {"token": "czNjcjN0"}}));
        let target = format!("{DEPLOYMENTS}/mhs");
        h.cluster.edit(&target, |d| {
            let spec = &mut d["spec"]["template"]["spec"];
            spec["containers"][0]["envFrom"] = json!([{"configMapRef": {"name": "mhs-config"}}]);
            spec["volumes"] = json!([{"name": "token", "secret": {"secretName": "mhs-token"}}]);
        });
        h.initialized().await;

        let copy = h
            .cluster
            .get(&format!("{configmaps}/mhs-config-primary"))
            .expect("a copy for the primary");
        assert_eq!(copy["data"], json!({"MODE": "fast"}));
        owner_is_the_canary(&copy);
        let secret = h
            .cluster
            .get(&format!("{secrets}/mhs-token-primary"))
            .expect("a copy for the primary");
        assert_eq!(secret["data"], json!({"token": "czNjcjN0"}));
        assert_eq!(secret["type"], "Opaque");
        let primary = h
            .cluster
            .get(&format!("{DEPLOYMENTS}/mhs-primary"))
            .unwrap();
        let pod = &primary["spec"]["template"]["spec"];
        assert_eq!(
            pod["containers"][0]["envFrom"][0]["configMapRef"]["name"],
            "mhs-config-primary"
        );
        assert_eq!(
            pod["volumes"][0],
            json!({"name": "token", "secret": {"secretName": "mhs-token-primary"}})
        );

        // Only the ConfigMap changes: a new revision all the same.
        h.cluster.edit(&format!("{configmaps}/mhs-config"), |c| {
            c["data"]["MODE"] = json!("safe")
        });
        h.until_phase("Progressing").await;
        let calls = h.until_phase("Succeeded").await;
        let copied = calls
            .iter()
            .rfind(|c| c.is("PATCH", &format!("{configmaps}/mhs-config-primary")))
            .expect("the promotion copies the configuration again");
        assert_eq!(copied.body["data"], json!({"MODE": "safe"}));
        // The primary's copy changed only at promotion: the analysed configuration.
        assert_eq!(
            h.cluster
                .get(&format!("{configmaps}/mhs-config-primary"))
                .unwrap()["data"]["MODE"],
            "safe"
        );
    })
    .await;
}

/// A Canary whose `spec.service` also holds `service_extra`'s keys.
fn canary_with_service(service_extra: Value) -> Value {
    let mut c = canary(false, quick_analysis());
    for (k, v) in service_extra.as_object().unwrap() {
        c["spec"]["service"][k] = v.clone();
    }
    c
}

#[tokio::test]
async fn the_services_and_destination_rules_carry_what_flagger_writes_for_the_service_spec() {
    bounded(async {
        let h = Harness::new(
            canary_with_service(json!({
                "portDiscovery": true,
                "appProtocol": "http",
                "trafficPolicy": {"tls": {"mode": "ISTIO_MUTUAL"},
                                  "connectionPool": {"http": {"http1MaxPendingRequests": 1024}}},
                "apex": {"labels": {"tier": "frontend"},
                         "annotations": {"apex-note": "a", "kustomize.toolkit.fluxcd.io/reconcile": "disabled"}},
                "primary": {"labels": {"track": "stable", "owner": "weir"},
                            "annotations": {"prometheus.io/scrape": "true"}},
                "canary": {"labels": {"track": "canary"}, "annotations": {"canary-note": "c"}},
                "unmanagedMetadata": {"labels": ["owner"], "annotations": ["cloud.google.com/neg-status"]},
            })),
            Duration::from_secs(600),
        );
        // Ports: the service's target (8080, left out), a named one, an unnamed one, and the
        // sidecar's (left out).
        h.cluster.edit(&format!("{DEPLOYMENTS}/mhs"), |d| {
            let spec = &mut d["spec"]["template"]["spec"];
            spec["containers"][0]["ports"] = json!([
                {"containerPort": 8080},
                {"name": "http-metrics", "containerPort": 9797},
                {"containerPort": 9898, "protocol": "TCP"},
            ]);
            spec["containers"]
                .as_array_mut()
                .unwrap()
                .push(json!({"name": "istio-proxy", "image": "istio/proxyv2",
                             "ports": [{"name": "http-envoy-prom", "containerPort": 15090}]}));
        });
        h.reconcile().await;
        let calls = h.until_phase("Initialized").await;
        let svc = |name: &str| find(&calls, "PATCH", &format!("{SERVICES}/{name}")).body.clone();
        let expected_ports = json!([
            {"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP", "appProtocol": "http"},
            {"name": "http-metrics", "port": 9797, "targetPort": 9797, "protocol": "TCP"},
            {"name": "tcp-mhs-2", "port": 9898, "targetPort": 9898, "protocol": "TCP"},
        ]);
        for name in ["mhs", "mhs-primary", "mhs-canary"] {
            assert_eq!(svc(name)["spec"]["ports"], expected_ports, "{name}");
        }
        // Flagger's label (selector key = the Service's name), the spec's labels and
        // annotations, never an unmanaged key nor a Flux toolkit annotation.
        assert_eq!(
            svc("mhs")["metadata"]["labels"],
            json!({"app": "mhs", "tier": "frontend", "app.kubernetes.io/managed-by": "weir"})
        );
        assert_eq!(svc("mhs")["metadata"]["annotations"], json!({"apex-note": "a"}));
        assert_eq!(
            svc("mhs-primary")["metadata"]["labels"],
            json!({"app": "mhs-primary", "track": "stable", "app.kubernetes.io/managed-by": "weir"})
        );
        assert_eq!(
            svc("mhs-primary")["metadata"]["annotations"],
            json!({"prometheus.io/scrape": "true"})
        );
        assert_eq!(
            svc("mhs-canary")["metadata"]["labels"],
            json!({"app": "mhs-canary", "track": "canary", "app.kubernetes.io/managed-by": "weir"})
        );
        assert_eq!(
            svc("mhs-canary")["metadata"]["annotations"],
            json!({"canary-note": "c"})
        );

        for name in ["mhs-primary", "mhs-canary"] {
            let rule = &find(&calls, "PATCH", &format!("{DRS}/{name}")).body;
            assert_eq!(
                rule["spec"],
                json!({"host": name, "trafficPolicy": {"tls": {"mode": "ISTIO_MUTUAL"},
                        "connectionPool": {"http": {"http1MaxPendingRequests": 1024}}}})
            );
        }
        // The VirtualService carries the apex metadata, as Flagger's does.
        let vs = &find(&calls, "PATCH", VS).body;
        assert_eq!(
            vs["metadata"]["labels"],
            json!({"tier": "frontend", "app.kubernetes.io/managed-by": "weir"})
        );
        assert_eq!(vs["metadata"]["annotations"], json!({"apex-note": "a"}));
    })
    .await;
}

#[tokio::test]
async fn headless_and_traffic_distribution_reach_the_three_services() {
    bounded(async {
        let h = Harness::new(
            canary_with_service(json!({"headless": true, "trafficDistribution": "PreferClose"})),
            Duration::from_secs(600),
        );
        h.reconcile().await;
        let calls = h.until_phase("Initialized").await;
        for name in ["mhs", "mhs-primary", "mhs-canary"] {
            let spec = &find(&calls, "PATCH", &format!("{SERVICES}/{name}")).body["spec"];
            assert_eq!(spec["clusterIP"], "None", "{name}");
            assert_eq!(spec["trafficDistribution"], "PreferClose", "{name}");
        }
    })
    .await;
}

#[tokio::test]
async fn without_port_discovery_the_services_have_the_service_port_only_and_no_app_protocol() {
    bounded(async {
        let h = Harness::new(canary(false, quick_analysis()), Duration::from_secs(600));
        h.cluster.edit(&format!("{DEPLOYMENTS}/mhs"), |d| {
            d["spec"]["template"]["spec"]["containers"][0]["ports"] =
                json!([{"containerPort": 8080}, {"name": "http-metrics", "containerPort": 9797}]);
        });
        h.reconcile().await;
        let calls = h.until_phase("Initialized").await;
        let primary = &find(&calls, "PATCH", &format!("{SERVICES}/mhs-primary")).body;
        assert_eq!(
            primary["spec"]["ports"],
            json!([{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}])
        );
        assert!(primary["spec"].get("clusterIP").is_none());
        assert!(primary["spec"].get("trafficDistribution").is_none());
        let rule = &find(&calls, "PATCH", &format!("{DRS}/mhs-primary")).body;
        assert_eq!(rule["spec"], json!({"host": "mhs-primary"}));
    })
    .await;
}

#[tokio::test]
async fn a_delegate_virtual_service_has_no_hosts_or_gateways_and_the_filters_keep_the_hosts() {
    bounded(async {
        let mut c = canary(false, quick_analysis());
        c["spec"]["service"] = json!({"port": 80, "targetPort": 8080, "delegation": true,
                                      "hosts": ["mhs.example.com"]});
        let h = Harness::new(c, Duration::from_secs(600));
        h.reconcile().await;
        let calls = h.until_phase("Initialized").await;
        let vs = &find(&calls, "PATCH", VS).body;
        assert_eq!(vs["spec"]["hosts"], json!([]));
        assert_eq!(vs["spec"]["gateways"], json!([]));
        assert_eq!(
            vs["spec"]["http"][1]["route"][0]["destination"]["host"],
            "mhs-primary"
        );
        let directive = h.ingest.directive();
        let entry = directive
            .canaries
            .iter()
            .find(|c| c.key == "application/mhs")
            .expect("the canary is in the directive");
        assert!(
            entry.hosts.iter().any(|h| h == "mhs.example.com"),
            "{:?}",
            entry.hosts
        );
    })
    .await;
}

const HPAS: &str = "/apis/autoscaling/v2/namespaces/application/horizontalpodautoscalers";
const SCALED_OBJECTS: &str = "/apis/keda.sh/v1alpha1/namespaces/application/scaledobjects";

fn with_autoscaler(mut canary: Value, autoscaler_ref: Value) -> Value {
    canary["spec"]["autoscalerRef"] = autoscaler_ref;
    canary
}

#[tokio::test]
async fn an_hpa_gets_a_primary_copy_that_honours_primary_scaler_replicas_and_follows_edits() {
    bounded(async {
        let h = Harness::new(
            with_autoscaler(
                canary(false, quick_analysis()),
                json!({"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "name": "mhs",
                       "primaryScalerReplicas": {"minReplicas": 2, "maxReplicas": 6}}),
            ),
            Duration::from_secs(600),
        );
        let metrics = |utilization: i64| {
            json!([{"type": "Resource", "resource": {"name": "cpu",
                     "target": {"type": "Utilization", "averageUtilization": utilization}}}])
        };
        let behavior = json!({"scaleDown": {"stabilizationWindowSeconds": 300}});
        h.cluster.put(json!({
            "apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
            "metadata": {"name": "mhs", "namespace": NS,
                         "labels": {"app": "mhs", "kustomize.toolkit.fluxcd.io/name": "apps"},
                         "annotations": {"note": "the target's"}},
            "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "mhs"},
                     "minReplicas": 1, "maxReplicas": 4, "metrics": metrics(80), "behavior": behavior},
        }));
        h.reconcile().await;
        let calls = h.until_phase("Initialized").await;
        let all = h.cluster.log();
        let copy_path = format!("{HPAS}/mhs-primary");
        let copy = &find(&all, "PATCH", &copy_path).body;
        let owner = copy["metadata"]["ownerReferences"].clone();
        owner_is_the_canary(copy);
        // Flagger's copy: the original's spec aimed at the primary, primaryScalerReplicas
        // replacing its bounds, its labels without Flux's; no annotations.
        assert_eq!(
            copy,
            &json!({
                "apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
                "metadata": {"name": "mhs-primary", "namespace": NS, "labels": {"app": "mhs"},
                             "ownerReferences": owner},
                "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "mhs-primary"},
                         "minReplicas": 2, "maxReplicas": 6, "metrics": metrics(80), "behavior": behavior},
            })
        );
        // The target's HPA is left alone: Kubernetes does not scale a target at zero.
        assert!(all.iter().all(|c| c.method == "GET" || c.path != format!("{HPAS}/mhs")));
        assert_eq!(h.cluster.get(&format!("{DEPLOYMENTS}/mhs")).unwrap()["spec"]["replicas"], 0);
        assert!(calls.iter().any(|c| c.is("GET", &format!("{HPAS}/mhs"))));

        // Nothing changed: nothing written.
        tokio::time::sleep(Duration::from_millis(110)).await;
        let idle = h.reconcile().await;
        assert!(idle.iter().all(|c| !c.is("PATCH", &copy_path)), "{:#?}", writes(&idle));

        // The user edits the original: the copy follows, keeping primaryScalerReplicas.
        h.cluster.edit(&format!("{HPAS}/mhs"), |hpa| {
            hpa["spec"]["metrics"] = metrics(60);
            hpa["spec"]["maxReplicas"] = json!(10);
        });
        tokio::time::sleep(Duration::from_millis(110)).await;
        let edited = h.reconcile().await;
        let update = &find(&edited, "PATCH", &copy_path).body;
        assert_eq!(update["spec"]["metrics"], metrics(60));
        assert_eq!(update["spec"]["maxReplicas"], 6);

        // The primary's HPA scaled it to 5: a promotion keeps that instead of the target's count.
        h.cluster.edit(&format!("{DEPLOYMENTS}/mhs-primary"), |d| {
            d["spec"]["replicas"] = json!(5)
        });
        h.cluster.edit(&format!("{DEPLOYMENTS}/mhs"), |d| {
            d["spec"]["template"]["spec"]["containers"][0]["image"] = json!("ghcr.io/weir/mhs:1.1.2")
        });
        let rollout = h.until_phase("Succeeded").await;
        let promote = rollout
            .iter()
            .rfind(|c| c.is("PATCH", &format!("{DEPLOYMENTS}/mhs-primary")))
            .expect("the primary was updated");
        assert_eq!(
            promote.body["spec"]["template"]["spec"]["containers"][0]["image"],
            "ghcr.io/weir/mhs:1.1.2"
        );
        assert_eq!(promote.body["spec"]["replicas"], 5);

        // Deleted without revertOnDeletion: the copy stays with the primary it scales.
        h.cluster.edit(CANARY, |c| {
            c["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z")
        });
        let mut deletion = h.reconcile().await;
        for _ in 0..5 {
            if h.cluster.get(CANARY).unwrap()["metadata"]["finalizers"] == json!([]) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(110)).await;
            deletion.extend(h.reconcile().await);
        }
        let release = find(&deletion, "PATCH", &copy_path);
        assert_eq!(release.body, json!({"metadata": {"ownerReferences": null}}));
    })
    .await;
}

#[tokio::test]
async fn a_missing_autoscaler_is_reported_with_the_field_that_names_it() {
    bounded(async {
        let h = Harness::new(
            with_autoscaler(
                canary(false, quick_analysis()),
                json!({"kind": "HorizontalPodAutoscaler", "name": "mhs"}),
            ),
            Duration::from_secs(600),
        );
        for _ in 0..3 {
            let _ = reconcile(h.cluster.canary(), h.ctx.clone()).await;
            tokio::time::sleep(Duration::from_millis(110)).await;
        }
        let notes: Vec<String> = events(&h.cluster.log()).into_iter().map(|e| e.2).collect();
        assert!(
            notes.iter().any(|n| n.contains(
                "spec.autoscalerRef names HorizontalPodAutoscaler mhs, which does not exist in namespace application"
            )),
            "{notes:#?}"
        );
        assert!(h.cluster.get(&format!("{HPAS}/mhs-primary")).is_none());
    })
    .await;
}

#[tokio::test]
async fn a_scaled_object_gets_a_primary_copy_and_is_paused_while_weir_holds_the_target_at_zero() {
    bounded(async {
        let h = Harness::new(
            with_autoscaler(
                canary(true, quick_analysis()),
                json!({"apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject", "name": "mhs-so",
                       "primaryScalerReplicas": {"minReplicas": 3}}),
            ),
            Duration::from_secs(600),
        );
        let query = |app: &str| format!("sum(rate(istio_requests_total{{destination_workload=\"{app}\"}}[1m]))");
        h.cluster.put(json!({
            "apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject",
            "metadata": {"name": "mhs-so", "namespace": NS, "labels": {"app": "mhs"},
                         "annotations": {"scaledobject.keda.sh/transfer-hpa-ownership": "true"}},
            "spec": {"scaleTargetRef": {"name": "mhs"}, "pollingInterval": 15, "cooldownPeriod": 120,
                     "minReplicaCount": 1, "maxReplicaCount": 10,
                     "triggers": [{"type": "prometheus", "name": "rps",
                                   "metadata": {"serverAddress": "http://prometheus:9090",
                                                "query": query("mhs"), "threshold": "100"}}]},
        }));
        h.reconcile().await;
        h.until_phase("Initialized").await;
        let all = h.cluster.log();
        let copy_path = format!("{SCALED_OBJECTS}/mhs-so-primary");
        let copy = &find(&all, "PATCH", &copy_path).body;
        let owner = copy["metadata"]["ownerReferences"].clone();
        owner_is_the_canary(copy);
        assert_eq!(
            copy,
            &json!({
                "apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject",
                "metadata": {"name": "mhs-so-primary", "namespace": NS, "labels": {"app": "mhs"},
                             "annotations": {"scaledobject.keda.sh/transfer-hpa-ownership": "true"},
                             "ownerReferences": owner},
                "spec": {"scaleTargetRef": {"name": "mhs-primary"}, "pollingInterval": 15,
                         "cooldownPeriod": 120, "minReplicaCount": 3, "maxReplicaCount": 10,
                         "advanced": {"horizontalPodAutoscalerConfig": {}},
                         "triggers": [{"type": "prometheus", "name": "rps",
                                       "metadata": {"serverAddress": "http://prometheus:9090",
                                                    "query": query("mhs-primary"), "threshold": "100"}}]},
            })
        );
        // Paused before the target goes to zero, as Flagger does.
        let original = format!("{SCALED_OBJECTS}/mhs-so");
        let target = format!("{DEPLOYMENTS}/mhs");
        let pause = all
            .iter()
            .position(|c| c.is("PATCH", &original))
            .expect("the target's ScaledObject is paused");
        assert_eq!(all[pause].content_type, "application/merge-patch+json");
        assert_eq!(
            all[pause].body,
            json!({"metadata": {"annotations": {"autoscaling.keda.sh/paused-replicas": "0"}}})
        );
        let to_zero = all.iter().rposition(|c| c.is("PATCH", &target)).unwrap();
        assert!(pause < to_zero);
        assert_eq!(all[to_zero].body["spec"]["replicas"], 0);

        // Resumed before the target is scaled up, and on deletion (revertOnDeletion).
        h.cluster.edit(&target, |d| {
            d["spec"]["template"]["spec"]["containers"][0]["image"] = json!("ghcr.io/weir/mhs:1.1.2")
        });
        let calls = h.until_phase("Progressing").await;
        let resume = calls.iter().position(|c| c.is("PATCH", &original)).unwrap();
        let scale_up = calls.iter().position(|c| c.is("PATCH", &target)).unwrap();
        assert!(resume < scale_up);
        assert_eq!(
            calls[resume].body,
            json!({"metadata": {"annotations": {"autoscaling.keda.sh/paused-replicas": null}}})
        );
        assert_eq!(calls[scale_up].body["spec"]["replicas"], 2);
        assert!(h.cluster.get(&original).unwrap()["metadata"]["annotations"]
            .get("autoscaling.keda.sh/paused-replicas")
            .is_none());
    })
    .await;
}

// `weir kubernetes` as a whole (run::serve): leader election, the leader label, the way out.

mod runtime {
    use super::*;
    use std::io::Write;
    use std::net::SocketAddr;
    use weir_controller::platform::kubernetes::run::{self, KubernetesError, KubernetesOptions};

    const LEASE: &str =
        "/apis/coordination.k8s.io/v1/namespaces/weir-system/leases/weir-controller";
    const POD: &str = "/api/v1/namespaces/weir-system/pods/weir-0";

    fn options(leader_election: bool, pod: Option<&str>) -> KubernetesOptions {
        KubernetesOptions {
            kubeconfig: None,
            namespaces: vec![NS.to_owned()],
            grpc_address: SocketAddr::from(([127, 0, 0, 1], 0)),
            http_address: SocketAddr::from(([127, 0, 0, 1], 0)),
            settings: Settings::default(),
            leader_election,
            lease_namespace: "weir-system".to_owned(),
            lease_name: "weir-controller".to_owned(),
            lease_duration: Duration::from_secs(15),
            pod_name: pod.map(str::to_owned),
            filter: None,
            telemetry: Default::default(),
            shutdown_grace: Duration::from_millis(300),
        }
    }

    /// `weir kubernetes` against `cluster` until the returned sender fires.
    fn start(
        cluster: &Cluster,
        options: KubernetesOptions,
    ) -> (
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<Result<(), KubernetesError>>,
    ) {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let client = cluster.client.clone();
        let task = tokio::spawn(run::serve(
            client,
            options,
            |ingest, _templates| StreamedSource::new(ingest),
            async {
                let _ = stopped.await;
            },
        ));
        (stop, task)
    }

    /// Waits until the fake has seen a request `seen` accepts.
    async fn until_seen(cluster: &Cluster, what: &str, seen: impl Fn(&Call) -> bool) {
        for _ in 0..500 {
            if cluster.log().iter().any(&seen) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("never saw {what}: {:#?}", writes(&cluster.log()));
    }

    fn lists_canaries(c: &Call) -> bool {
        c.is(
            "GET",
            "/apis/weir.dev/v1alpha1/namespaces/application/canaries",
        )
    }

    fn holder(cluster: &Cluster) -> Value {
        cluster.get(LEASE).expect("the Lease exists")["spec"]["holderIdentity"].clone()
    }

    fn pod(cluster: &Cluster) {
        cluster.put(json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "weir-0", "namespace": "weir-system", "labels": {"app": "weir"}}}));
    }

    #[tokio::test]
    async fn outside_the_cluster_a_pod_that_does_not_exist_is_not_fatal_and_nothing_is_labelled() {
        bounded(async {
            let cluster = Cluster::start();
            let laptop = "/api/v1/namespaces/weir-system/pods/weir-laptop";
            let (stop, task) = start(&cluster, options(false, Some("weir-laptop")));
            // It leads: the controllers list the Canaries.
            until_seen(&cluster, "the Canary watch", lists_canaries).await;
            assert!(!task.is_finished(), "it runs on without its Pod");
            stop.send(()).unwrap();
            task.await.unwrap().expect("a clean stop");
            let labels: Vec<Call> = cluster
                .log()
                .into_iter()
                .filter(|c| c.path == laptop)
                .collect();
            assert_eq!(
                labels.len(),
                1,
                "tried once, then forgot the Pod: {labels:#?}"
            );
            assert!(labels[0].is("PATCH", laptop));
        })
        .await;
    }

    #[tokio::test]
    async fn the_lease_is_released_when_serving_the_filters_fails_after_taking_it() {
        bounded(async {
            let cluster = Cluster::start();
            let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let mut options = options(true, None);
            options.grpc_address = taken.local_addr().unwrap();
            let (_stop, task) = start(&cluster, options);
            let error = task.await.unwrap().expect_err("the gRPC port is taken");
            assert!(
                error.to_string().contains("cannot serve the filters on"),
                "{error}"
            );
            assert_eq!(holder(&cluster), Value::Null, "the Lease is free again");
            let release = cluster
                .log()
                .into_iter()
                .rfind(|c| c.is("PUT", LEASE))
                .unwrap();
            assert!(release.body["spec"].get("holderIdentity").is_none());
        })
        .await;
    }

    #[tokio::test]
    async fn a_stopped_leader_removes_its_label_and_releases_the_lease() {
        bounded(async {
            let cluster = Cluster::start();
            pod(&cluster);
            let (stop, task) = start(&cluster, options(true, Some("weir-0")));
            until_seen(&cluster, "the Canary watch", lists_canaries).await;
            assert_eq!(holder(&cluster), "weir-0");
            assert_eq!(
                cluster.get(POD).unwrap()["metadata"]["labels"]["weir.dev/leader"],
                "true"
            );
            stop.send(()).unwrap();
            task.await.unwrap().expect("a clean stop");
            assert_eq!(holder(&cluster), Value::Null);
            assert_eq!(
                cluster.get(POD).unwrap()["metadata"]["labels"],
                json!({"app": "weir"})
            );
        })
        .await;
    }

    #[tokio::test]
    async fn a_standby_serves_its_filters_as_a_relay_of_the_leader_until_it_leads_itself() {
        use tokio_stream::wrappers::ReceiverStream;
        use weir_proto::v1::controller_message::Kind;
        use weir_proto::v1::telemetry_client::TelemetryClient;
        use weir_proto::v1::CanaryRoute;
        bounded(async {
            let cluster = Cluster::start();
            // The leader's ingest, with a directive.
            let leader = Ingest::try_new(IngestConfig::default()).unwrap();
            let podinfo = "application/podinfo";
            let generation = leader
                .publish(vec![CanaryRoute {
                    key: podinfo.to_owned(),
                    hosts: vec!["podinfo".to_owned()],
                    canary_weight_bp: 1_500,
                    ..Default::default()
                }])
                .unwrap();
            let (_leader_stop, leader_stopped) = tokio::sync::oneshot::channel::<()>();
            let leader_served = leader
                .serve("127.0.0.1:0".parse().unwrap(), async {
                    let _ = leader_stopped.await;
                })
                .await
                .unwrap();
            // Another replica holds the Lease.
            let other = LeaseLock::new(
                cluster.client.clone(),
                "weir-system",
                "weir-controller",
                "weir-1",
                Duration::from_secs(15),
            );
            assert!(other.try_acquire_or_renew().await.unwrap());
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap();
            // A Canary that lets another namespace report: the relay reads it too.
            cluster.put(canary(
                false,
                json!({"interval": "1m", "reporters": ["frontend/*", "bad rule/x/y"]}),
            ));
            let mut options = options(true, None);
            options.grpc_address = port;
            options.lease_duration = Duration::from_secs(3);
            options.telemetry.relay_to = Some(leader_served.local_addr().to_string());
            let (stop, task) = start(&cluster, options);
            let report = |sequence: u64, stats: Vec<VersionStats>| Report {
                reporter: Some(Reporter {
                    node_id: "envoy-0".to_owned(),
                    ..Default::default()
                }),
                epoch: 5,
                sequence,
                applied_generation: generation,
                stats,
            };

            // An Envoy on the standby: served once the relay has the leader's directive.
            let (tx, mut inbound) = 'open: {
                for _ in 0..100 {
                    if let Ok(mut client) = TelemetryClient::connect(format!("http://{port}")).await
                    {
                        let (tx, rx) = tokio::sync::mpsc::channel(8);
                        tx.send(report(0, vec![])).await.unwrap();
                        if let Ok(answer) = client.exchange(ReceiverStream::new(rx)).await {
                            break 'open (tx, answer.into_inner());
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                panic!("the standby never served a filter stream");
            };
            let first = inbound.message().await.unwrap().unwrap();
            match first.kind {
                Some(Kind::Directive(d)) => assert_eq!(d.generation, generation, "the leader's"),
                other => panic!("the first message is {other:?}, not the leader's directive"),
            }
            let mut latency = LatencyHistogram::new();
            (0..25).for_each(|_| latency.record(2_000));
            let stats = VersionStats {
                canary: podinfo.to_owned(),
                version: Version::Canary as i32,
                requests: 25,
                failures: 0,
                latency: Some(latency.encode()),
            };
            tx.send(report(1, vec![stats])).await.unwrap();
            let window = || {
                leader
                    .window(
                        podinfo,
                        Version::Canary,
                        Duration::from_secs(900),
                        Instant::now(),
                    )
                    .map_or(0, |w| w.requests)
            };
            for _ in 0..100 {
                if window() == 25 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            assert_eq!(
                window(),
                25,
                "the report reached the leader through the relay"
            );

            // While standing by, it read the Canaries for their reporter rules.
            until_seen(&cluster, "the standby's list of Canaries", lists_canaries).await;
            assert_eq!(holder(&cluster), "weir-1", "still a standby");

            // The other replica lets go: this one leads, and tells its relayed Envoys to move.
            other.release().await.unwrap();
            let ended = loop {
                match inbound.message().await {
                    Ok(Some(_)) => {}
                    Ok(None) => panic!("the relayed stream ended without a status"),
                    Err(status) => break status,
                }
            };
            assert_eq!(ended.code(), tonic::Code::Unavailable, "{ended}");
            until_seen(&cluster, "the Canary watch", lists_canaries).await;
            stop.send(()).unwrap();
            task.await.unwrap().expect("a clean stop");
        })
        .await;
    }

    #[test]
    fn a_relay_takes_each_canarys_reporter_rules_as_the_leader_does() {
        let mut resource: CanaryResource = serde_json::from_value(canary(
            false,
            json!({"interval": "1m", "reporters": ["frontend/*", "batch/reports", "/bad"]}),
        ))
        .unwrap();
        let mut other = resource.clone();
        other.metadata.name = Some("plain".into());
        other.spec.0.analysis = None;
        let rules = run::canary_reporters(&[resource.clone(), other]);
        assert_eq!(rules.len(), 2);
        assert_eq!(rules[0].0, format!("{NS}/mhs"));
        assert_eq!(
            rules[0].1,
            vec![
                weir_controller::ingest::identity::ReporterRule::parse("frontend/*").unwrap(),
                weir_controller::ingest::identity::ReporterRule::parse("batch/reports").unwrap(),
            ],
            "the invalid rule is left out"
        );
        assert_eq!(rules[1], (format!("{NS}/plain"), vec![]));
        resource.metadata.namespace = None;
        assert!(run::canary_reporters(&[resource]).is_empty());
    }

    /// Log lines, as `weir` writes them, kept for the test.
    #[derive(Clone, Default)]
    struct Logs(Arc<Mutex<Vec<u8>>>);

    impl Write for Logs {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Logs {
        fn text(&self) -> String {
            String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
        }
    }

    #[tokio::test]
    async fn a_stop_while_the_api_server_does_not_answer_says_what_it_waits_for_and_ends_within_its_grace(
    ) {
        let logs = Logs::default();
        let writer = logs.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter("weir_controller=info")
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        // The test's runtime has one thread: every task logs here.
        let _guard = tracing::subscriber::set_default(subscriber);
        bounded(async {
            let cluster = Cluster::start();
            pod(&cluster);
            cluster.put(target("ghcr.io/weir/mhs:1.1.1"));
            cluster.put(canary(false, quick_analysis()));
            // The API server stops answering for Deployments: the reconcile hangs in a call.
            cluster.stall(&format!("{DEPLOYMENTS}/"));
            let (stop, task) = start(&cluster, options(true, Some("weir-0")));
            until_seen(&cluster, "the reconcile's read of its target", |c| {
                c.is("GET", &format!("{DEPLOYMENTS}/mhs"))
            })
            .await;
            stop.send(()).unwrap();
            task.await.unwrap().expect("a clean stop");
            let text = logs.text();
            for line in [
                "stop requested (SIGTERM or Ctrl-C): stopping",
                "stopping: waiting for the reconciles under way",
                "the reconciles under way did not finish within 300ms",
                "released the Lease",
            ] {
                assert!(text.contains(line), "{line:?} in:\n{text}");
            }
            assert_eq!(holder(&cluster), Value::Null);
            assert_eq!(
                cluster.get(POD).unwrap()["metadata"]["labels"],
                json!({"app": "weir"})
            );
        })
        .await;
    }
}

#[tokio::test]
async fn without_filters_the_virtual_service_holds_flaggers_route_options_and_session_cookie_routes(
) {
    bounded(async {
        let mut object = canary(
            false,
            json!({"interval": "100ms", "threshold": 2, "maxWeight": 20, "stepWeight": 10,
                   "sessionAffinity": {"cookieName": "flagger-cookie", "maxAge": 600}}),
        );
        let service = &mut object["spec"]["service"];
        service["timeout"] = json!("30s");
        service["retries"] =
            json!({"attempts": 3, "perTryTimeout": "1s", "retryOn": "gateway-error,connect-failure"});
        service["headers"] = json!({"request": {"add": {"x-some-header": "value"}}});
        service["rewrite"] = json!({"uri": "/"});
        service["match"] = json!([{"uri": {"prefix": "/api"}}]);
        let h = Harness::new(object.clone(), Duration::ZERO);
        h.reconcile().await;
        h.until_phase("Initialized").await;
        h.cluster.edit(&format!("{DEPLOYMENTS}/mhs"), |d| {
            d["spec"]["template"]["spec"]["containers"][0]["image"] =
                json!("ghcr.io/weir/mhs:1.1.2")
        });
        let mut calls = Vec::new();
        for _ in 0..30 {
            if h.cluster.get(CANARY).unwrap()["status"]["canaryWeight"] == 10 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(110)).await;
            calls.extend(h.reconcile().await);
        }
        let status = h.cluster.get(CANARY).unwrap()["status"].clone();
        assert_eq!(status["canaryWeight"], 10);
        let vs = calls
            .iter()
            .rfind(|c| c.is("PATCH", VS))
            .expect("the VirtualService was written at 10%");
        let http = vs.body["spec"]["http"].as_array().unwrap();

        // The cookie the filters would use for this revision.
        let mut plan = weir_controller::spec::from_json(&object.to_string())
            .unwrap()
            .compile()
            .unwrap()
            .plan;
        plan.canary_route_value = weir_controller::traffic::route_secret(b"0b1c6a52-mhs");
        let revision = status["lastAppliedSpec"].as_str().unwrap();
        let cookies = weir_controller::traffic::session_cookies(
            &plan,
            weir_controller::analysis::Route::weighted(weir_controller::spec::Weight::try_new(10).unwrap()),
            revision,
        )
        .unwrap();
        let value = &cookies.canary.value;

        let options = json!({
            "timeout": "30s",
            "retries": {"attempts": 3, "perTryTimeout": "1s", "retryOn": "gateway-error,connect-failure"},
            "headers": {"request": {"add": {"x-some-header": "value"}}},
            "rewrite": {"uri": "/"},
        });
        let with_options = |route: Value| {
            let mut route = route;
            for (k, v) in options.as_object().unwrap() {
                route[k] = v.clone();
            }
            route
        };
        let dest = |host: &str, weight: u8| {
            json!({"destination": {"host": host, "port": {"number": 80}}, "weight": weight})
        };
        let mut canary_dest = dest("mhs-canary", 10);
        canary_dest["headers"] = json!({"response": {"add": {
            "Set-Cookie": format!("flagger-cookie={value}; Max-Age=600")}}});
        assert_eq!(
            http,
            &vec![
                with_options(json!({
                    "name": "weir-session-canary",
                    "match": [{"uri": {"prefix": "/api"},
                               "headers": {"cookie": {"regex": format!(".*flagger-cookie.*{value}.*")}}}],
                    "route": [dest("mhs-primary", 0), dest("mhs-canary", 100)],
                })),
                with_options(json!({
                    "name": "weir-weighted",
                    "match": [{"uri": {"prefix": "/api"}}],
                    "route": [dest("mhs-primary", 90), canary_dest],
                })),
            ]
        );
        // The filters get the same cookie in their directive.
        let directive = h.ingest.directive();
        let affinity = directive.canaries[0].session_affinity.as_ref().unwrap();
        assert_eq!(&affinity.cookie_value, value);
        assert!(affinity.active);
    })
    .await;
}

/// Runs `ask` (a CLI verb against the scripted API) while reconciling once per 110ms, as the
/// controller would, until the verb returns.
async fn while_reconciling<T>(h: &Harness, ask: impl std::future::Future<Output = T>) -> T {
    tokio::pin!(ask);
    loop {
        tokio::select! {
            done = &mut ask => return done,
            () = tokio::time::sleep(Duration::from_millis(110)) => { h.reconcile().await; }
        }
    }
}

fn request_patches(calls: &[Call]) -> Vec<&Call> {
    calls
        .iter()
        .filter(|c| c.is("PATCH", CANARY) && !c.body["metadata"]["annotations"].is_null())
        .collect()
}

#[tokio::test]
async fn each_verb_travels_as_an_annotation_and_the_controller_says_who_asked() {
    use weir_controller::analysis::Verb;
    use weir_controller::cli::{kubernetes as cli, Asked, CliError};
    bounded(async {
        let analysis = json!({"interval": "300ms", "threshold": 2, "maxWeight": 50, "stepWeight": 10});
        let h = Harness::new(canary(false, analysis), Duration::from_secs(600));
        h.initialized().await;
        h.cluster.edit(&format!("{DEPLOYMENTS}/mhs"), |d| {
            d["spec"]["template"]["spec"]["containers"][0]["image"] = json!("ghcr.io/weir/mhs:1.1.2")
        });
        h.until_phase("Progressing").await;
        let client = h.cluster.client.clone();
        let wait = Duration::from_secs(10);

        // weir pause, as alice: the annotation with her field manager and the resourceVersion
        // read, then the controller's event naming her.
        let before = h.cluster.log().len();
        let asked = while_reconciling(&h, cli::ask(&client, NS, "mhs", Verb::Pause, "alice", wait)).await;
        let Ok(Asked::Done(said)) = asked else { panic!("{asked:?}") };
        assert!(
            said.iter().any(|m| m.starts_with("Paused mhs.application at canary weight ")
                && m.contains("as requested by weir-cli:alice")),
            "{said:?}"
        );
        let calls = h.cluster.log()[before..].to_vec();
        let patch = request_patches(&calls)[0];
        assert!(patch.query.contains("fieldManager=weir-cli%3Aalice"), "{}", patch.query);
        assert!(patch.body["metadata"]["resourceVersion"].is_string());
        let value = patch.body["metadata"]["annotations"]["weir.dev/request"].as_str().unwrap();
        assert!(value.starts_with("pause "), "{value}");
        assert!(events(&calls).iter().any(|e| e.2.contains("as requested by weir-cli:alice")));
        let status = h.cluster.get(CANARY).unwrap()["status"].clone();
        assert_eq!(status["paused"]["by"], "weir-cli:alice");
        assert_eq!(status["paused"]["cause"], "Requested");
        let paused_condition = status["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == "Paused")
            .cloned()
            .expect("a Paused condition");
        assert_eq!(paused_condition["reason"], "Requested");

        // The weight holds while paused.
        let held = status["canaryWeight"].clone();
        for _ in 0..5 {
            tokio::time::sleep(Duration::from_millis(110)).await;
            h.reconcile().await;
        }
        assert_eq!(h.cluster.get(CANARY).unwrap()["status"]["canaryWeight"], held);

        // Asked again: nothing to do, nothing written.
        let before = h.cluster.log().len();
        let again = cli::ask(&client, NS, "mhs", Verb::Pause, "alice", wait).await;
        assert!(matches!(&again, Ok(Asked::NothingToDo(why)) if why.contains("already paused")), "{again:?}");
        assert!(request_patches(&h.cluster.log()[before..]).is_empty());

        // A request written by hand (kubectl annotate): who asked is that field manager.
        {
            let mut fake = h.cluster.fake.lock().unwrap();
            let old = fake.objects[CANARY].clone();
            let mut object = old.clone();
            let patch = json!({"metadata": {"annotations": {"weir.dev/request": "resume 42"}}});
            merge(&mut object, &patch);
            fake.record_manager(&mut object, &patch, "fieldManager=kubectl-annotate");
            fake.bump(&mut object, Some(&old));
            fake.objects.insert(CANARY.to_owned(), object);
        }
        let calls = h.reconcile().await;
        assert!(
            events(&calls).iter().any(|e| e.2.starts_with("Resumed mhs.application at canary weight ")
                && e.2.ends_with("as requested by kubectl-annotate")),
            "{:#?}",
            events(&calls)
        );
        assert!(h.cluster.get(CANARY).unwrap()["status"]["paused"].is_null());

        // weir promote, as bob: promoted before maxWeight.
        let asked = while_reconciling(&h, cli::ask(&client, NS, "mhs", Verb::Promote, "bob", wait)).await;
        let Ok(Asked::Done(said)) = asked else { panic!("{asked:?}") };
        assert!(said.iter().any(|m| m.starts_with("Promotion of mhs.application requested by weir-cli:bob")), "{said:?}");
        h.until_phase("Succeeded").await;

        // Now abort, pause and retry make no sense: refused, nothing written.
        let before = h.cluster.log().len();
        let refused = cli::ask(&client, NS, "mhs", Verb::Abort, "bob", wait).await;
        assert!(
            matches!(&refused, Err(CliError::NotNow { why, .. }) if why.contains("this one is Succeeded")),
            "{refused:?}"
        );
        let retry = cli::retry(&client, NS, "mhs", "bob").await;
        assert!(matches!(&retry, Err(e) if e.to_string().contains("only a Failed canary can be retried")), "{retry:?}");
        assert!(request_patches(&h.cluster.log()[before..]).is_empty());
    })
    .await;
}

#[tokio::test]
async fn abort_rolls_back_and_a_request_that_raced_another_is_refused_with_a_conflict() {
    use weir_controller::analysis::Verb;
    use weir_controller::cli::{kubernetes as cli, Asked};
    bounded(async {
        let analysis =
            json!({"interval": "300ms", "threshold": 2, "maxWeight": 50, "stepWeight": 10});
        let h = Harness::new(canary(false, analysis), Duration::from_secs(600));
        h.initialized().await;
        h.cluster.edit(&format!("{DEPLOYMENTS}/mhs"), |d| {
            d["spec"]["template"]["spec"]["containers"][0]["image"] =
                json!("ghcr.io/weir/mhs:1.1.2")
        });
        h.until_phase("Progressing").await;
        let client = h.cluster.client.clone();
        let asked = while_reconciling(
            &h,
            cli::ask(
                &client,
                NS,
                "mhs",
                Verb::Abort,
                "carol",
                Duration::from_secs(10),
            ),
        )
        .await;
        let Ok(Asked::Done(said)) = asked else {
            panic!("{asked:?}")
        };
        assert!(
            said.iter().any(|m| m
                .starts_with("Rolling back mhs.application: abort requested by weir-cli:carol")),
            "{said:?}"
        );
        assert_eq!(h.cluster.phase().as_deref(), Some("Failed"));
        assert_eq!(
            h.cluster.get(&format!("{DEPLOYMENTS}/mhs")).unwrap()["spec"]["replicas"],
            0
        );

        // weir retry now: a new weir.dev/retry token, which the controller honours.
        let token = cli::retry(&client, NS, "mhs", "carol").await.unwrap();
        assert_eq!(
            h.cluster.get(CANARY).unwrap()["metadata"]["annotations"]["weir.dev/retry"],
            json!(token)
        );
        h.until_phase("Progressing").await;

        // A Canary changed between the CLI's read and its patch: the patch's resourceVersion no
        // longer matches, and nothing is overwritten.
        let canary: CanaryResource =
            serde_json::from_value(h.cluster.get(CANARY).unwrap()).unwrap();
        h.cluster.edit(CANARY, |c| {
            c["metadata"]["labels"] = json!({"touched": "yes"})
        });
        let api: kube::Api<CanaryResource> = kube::Api::namespaced(client.clone(), NS);
        let patch = json!({"metadata": {"resourceVersion": canary.metadata.resource_version,
            "annotations": {"weir.dev/request": "pause 7"}}});
        let conflict = api
            .patch(
                "mhs",
                &kube::api::PatchParams::default(),
                &kube::api::Patch::Merge(&patch),
            )
            .await;
        assert!(
            matches!(conflict, Err(kube::Error::Api(ref s)) if s.code == 409),
            "{conflict:?}"
        );
    })
    .await;
}

#[tokio::test]
async fn the_live_numbers_come_from_the_controller_through_the_service_proxy() {
    use weir_controller::cli::{kubernetes as cli, render};
    bounded(async {
        let analysis =
            json!({"interval": "300ms", "threshold": 2, "maxWeight": 50, "stepWeight": 10});
        let h = Harness::new(canary(false, analysis), Duration::from_secs(600));
        h.initialized().await;
        h.cluster.edit(&format!("{DEPLOYMENTS}/mhs"), |d| {
            d["spec"]["template"]["spec"]["containers"][0]["image"] =
                json!("ghcr.io/weir/mhs:1.1.2")
        });
        h.until_phase("Progressing").await;
        let generation = h.ingest.directive().generation;
        h.ingest
            .ingest(&canary_report(1, 400, 4, generation), Instant::now())
            .unwrap();

        // The controller's side: what /live/application/mhs serves.
        let live = h
            .ctx
            .live_snapshot(NS, "mhs")
            .expect("the controller steps mhs");
        assert_eq!((live.canary.requests, live.primary.requests), (400, 400));
        assert_eq!(live.canary.success_rate, Some(99.0));
        assert!(live.next_step_at > weir_controller::spec::Timestamp::EPOCH);

        // The CLI's side: it asks the API server's service proxy for the weir Service.
        let service = cli::ControllerService::default();
        let view = cli::view(&h.cluster.client, &service, NS, "mhs")
            .await
            .unwrap();
        assert_eq!(
            view.live, None,
            "no controller answers: no live numbers, and no error"
        );
        let proxy =
            "/api/v1/namespaces/weir-system/services/weir-leader:http-metrics/proxy/live/application/mhs";
        h.cluster
            .fake
            .lock()
            .unwrap()
            .objects
            .insert(proxy.to_owned(), serde_json::to_value(&live).unwrap());
        let view = cli::view(&h.cluster.client, &service, NS, "mhs")
            .await
            .unwrap();
        assert_eq!(view.live.as_ref(), Some(&live));
        let table = render::status_table(&[view]);
        let row = table.lines().nth(1).unwrap();
        assert!(
            row.starts_with("application   mhs") && row.contains("Progressing"),
            "{table}"
        );
        assert!(row.contains("99.00% ") && row.contains(" 400"), "{table}");
        assert!(h.cluster.log().iter().any(|c| c.is("GET", proxy)));
    })
    .await;
}
