//! The filter's installation (the WasmPlugin the leader applies, and the module every replica
//! serves) against a scripted API server: kube's real client over a `tower_test` mock that
//! answers the calls one pass makes and records them (method, path, query, body).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, Response};
use kube::client::Body;
use kube::Client;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use weir_controller::filter_module::{FilterModule, InstallKind};
use weir_controller::platform::kubernetes::filter_install::{
    reconcile, FilterInstallation, InstallSettings,
};
use weir_controller::platform::kubernetes::health::{self, Health};

#[derive(Debug, Clone)]
struct Call {
    method: String,
    path: String,
    query: String,
    body: Value,
}

/// A metadata list, as the API server answers `list_metadata`.
fn metadata_list(items: &[(&str, &str)]) -> Value {
    json!({
        "apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadataList", "metadata": {},
        "items": items.iter().map(|(namespace, name)| json!({
            "apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata",
            "metadata": {"name": name, "namespace": namespace},
        })).collect::<Vec<_>>(),
    })
}

/// The API server: namespaces labelled for Weir, and the objects Weir made earlier.
struct Cluster {
    opted_in: Vec<&'static str>,
    plugins: Vec<(&'static str, &'static str)>,
    filters: Vec<(&'static str, &'static str)>,
}

impl Cluster {
    fn answer(&self, call: &Call) -> Value {
        match (call.method.as_str(), call.path.as_str()) {
            ("GET", "/api/v1/namespaces") => {
                let names: Vec<(&str, &str)> = self.opted_in.iter().map(|n| ("", *n)).collect();
                metadata_list(&names)
            }
            ("GET", "/apis/extensions.istio.io/v1alpha1/wasmplugins") => {
                metadata_list(&self.plugins)
            }
            ("GET", "/apis/networking.istio.io/v1alpha3/envoyfilters") => {
                metadata_list(&self.filters)
            }
            ("PATCH", _) => call.body.clone(),
            ("DELETE", _) => json!({"kind": "Status", "apiVersion": "v1", "status": "Success"}),
            other => panic!("unexpected call {other:?}"),
        }
    }

    fn start(self) -> (Client, Arc<Mutex<Vec<Call>>>, tokio::task::JoinHandle<()>) {
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let calls = Arc::new(Mutex::new(Vec::new()));
        let log = calls.clone();
        let server = tokio::spawn(async move {
            while let Some((request, respond)) = handle.next_request().await {
                let (parts, body) = request.into_parts();
                let bytes = body.collect_bytes().await.unwrap_or_default();
                let call = Call {
                    method: parts.method.to_string(),
                    path: parts.uri.path().to_owned(),
                    query: parts.uri.query().unwrap_or_default().to_owned(),
                    body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
                };
                let answer = self.answer(&call);
                log.lock().unwrap().push(call);
                respond.send_response(
                    Response::builder()
                        .status(200)
                        .header("content-type", "application/json")
                        .body(Body::from(serde_json::to_vec(&answer).unwrap()))
                        .unwrap(),
                );
            }
        });
        (Client::new(service, "default"), calls, server)
    }
}

fn module() -> FilterModule {
    FilterModule::from_bytes(&b"\0asm\x01\0\0\0weir"[..])
}

fn installation(kind: InstallKind) -> FilterInstallation {
    FilterInstallation::new(
        &module(),
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

#[tokio::test]
async fn the_leader_applies_one_wasm_plugin_mesh_wide_and_one_per_opted_in_namespace_and_removes_the_rest(
) {
    let (client, calls, server) = Cluster {
        opted_in: vec!["application"],
        plugins: vec![
            ("istio-system", "weir"),
            ("application", "weir"),
            ("demo", "weir"),
        ],
        filters: vec![("istio-system", "weir")],
    }
    .start();
    let report = tokio::time::timeout(
        Duration::from_secs(10),
        reconcile(&client, &installation(InstallKind::WasmPlugin)),
    )
    .await
    .unwrap()
    .unwrap();
    server.abort();
    assert_eq!(report.applied, ["application", "istio-system"]);
    assert_eq!(
        report.deleted,
        ["WasmPlugin demo/weir", "EnvoyFilter istio-system/weir"]
    );

    let calls = calls.lock().unwrap().clone();
    let seen: Vec<(String, String)> = calls
        .iter()
        .map(|c| (c.method.clone(), c.path.clone()))
        .collect();
    let plugin =
        |ns: &str| format!("/apis/extensions.istio.io/v1alpha1/namespaces/{ns}/wasmplugins/weir");
    assert_eq!(
        seen,
        [
            ("GET".into(), "/api/v1/namespaces".into()),
            ("PATCH".into(), plugin("application")),
            ("PATCH".into(), plugin("istio-system")),
            (
                "GET".into(),
                "/apis/extensions.istio.io/v1alpha1/wasmplugins".into()
            ),
            ("DELETE".into(), plugin("demo")),
            (
                "GET".into(),
                "/apis/networking.istio.io/v1alpha3/envoyfilters".into()
            ),
            (
                "DELETE".into(),
                "/apis/networking.istio.io/v1alpha3/namespaces/istio-system/envoyfilters/weir"
                    .into()
            ),
        ]
    );
    assert!(
        calls[0]
            .query
            .contains("labelSelector=weir.dev%2Ffilter%3Denabled"),
        "{}",
        calls[0].query
    );
    assert!(
        calls[3]
            .query
            .contains("app.kubernetes.io%2Fmanaged-by%3Dweir"),
        "{}",
        calls[3].query
    );
    for patch in [&calls[1], &calls[2]] {
        assert!(
            patch.query.contains("fieldManager=weir") && patch.query.contains("force=true"),
            "server-side apply: {}",
            patch.query
        );
    }
    let mesh_wide = &calls[2].body;
    assert_eq!(mesh_wide["kind"], "WasmPlugin");
    assert_eq!(
        mesh_wide["spec"]["selector"]["matchLabels"]["weir.dev/filter"],
        "enabled"
    );
    assert_eq!(mesh_wide["spec"]["match"], json!([{"mode": "CLIENT"}]));
    assert_eq!(mesh_wide["spec"]["failStrategy"], "FAIL_OPEN");
    assert_eq!(mesh_wide["spec"]["sha256"], module().sha256());
    assert!(
        calls[1].body["spec"].get("selector").is_none(),
        "every Pod of an opted-in namespace"
    );
    // Its configuration is one the filter accepts.
    let config = serde_json::to_vec(&mesh_wide["spec"]["pluginConfig"]).unwrap();
    weir_filter::config::FilterConfig::parse(&config).unwrap();
}

async fn get(addr: SocketAddr, path: &str) -> Vec<u8> {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: weir\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = Vec::new();
    stream.read_to_end(&mut out).await.unwrap();
    out
}

#[tokio::test]
async fn every_replica_serves_the_module_whose_sha256_the_wasm_plugin_names() {
    let module = Arc::new(module());
    let plugin = installation(InstallKind::WasmPlugin)
        .object("istio-system")
        .unwrap();
    let url = plugin["spec"]["url"].as_str().unwrap().to_owned();
    let path = url
        .strip_prefix("http://weir.weir-system.svc.cluster.local:8080")
        .expect("the controller Service's HTTP port");
    let (addr, task) = health::serve(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        Arc::new(Health::with_module(module.clone())),
    )
    .await
    .unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(10), get(addr, path))
        .await
        .unwrap();
    let split = answer.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8_lossy(&answer[..split]);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("application/wasm"), "{head}");
    let served = FilterModule::from_bytes(answer[split + 4..].to_vec());
    assert_eq!(served.sha256(), plugin["spec"]["sha256"]);
    let stale = get(addr, "/filter/0000.wasm").await;
    assert!(
        stale.starts_with(b"HTTP/1.1 404"),
        "a stale URL is not the module"
    );
    task.abort();
}
