//! Calling out (issue 12, items 3 and 4): webhooks, alerts and Prometheus queries through the
//! controller's one HTTP client, over HTTPS verified against a test CA made by rcgen that the
//! controller is told to trust with `--ca-file` / `WEIR_CA_FILE`. Every receiver is a real HTTP
//! server on 127.0.0.1 started by the test ([`weir_e2e::receiver`]); every wait is bounded.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use weir_controller::http::{HttpClient, HttpOptions};
use weir_controller::metrics::prometheus::{PrometheusAddress, PrometheusClient, PrometheusConfig};
use weir_controller::spec::{HookKind, Webhook};
use weir_e2e::certs::TestCa;
use weir_e2e::local::CanaryFile;
use weir_e2e::local_cli::{LocalFiles, WeirLocal};
use weir_e2e::prometheus::Prometheus;
use weir_e2e::receiver::Receiver;
use weir_e2e::WorkDir;

/// Envoy (with the .wasm) and the first primary start within this on a loaded machine.
const START: Duration = Duration::from_secs(60);

async fn bounded<T>(limit: Duration, body: impl Future<Output = anyhow::Result<T>>) -> T {
    match tokio::time::timeout(limit, body).await {
        Ok(Ok(value)) => value,
        Ok(Err(e)) => panic!("{e:#}"),
        Err(_) => panic!("the test did not finish within {limit:?}"),
    }
}

fn hook(url: &str, disable_tls: bool) -> Webhook {
    Webhook {
        name: "gate".to_owned(),
        kind: HookKind::ConfirmRollout,
        url: url.to_owned(),
        timeout: Duration::from_secs(5),
        metadata: BTreeMap::from([("cmd".to_owned(), "echo".to_owned())]),
        retries: 0,
        disable_tls,
        mute_alert: false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_webhooks_pass_only_with_the_ca_trusted_or_tls_verification_disabled() {
    bounded(Duration::from_secs(30), async {
        let dir = WorkDir::new("https_webhooks")?;
        let ca = TestCa::new(dir.path())?;
        let receiver = Receiver::start_tls(&ca.server("receiver")?).await?;
        let url = receiver.url("/gate");
        let body = serde_json::json!({"name": "mhs"});

        let trusting = HttpClient::try_new(&HttpOptions {
            ca_file: Some(ca.root.clone()),
        })?;
        let passed = weir_controller::webhook::post(&trusting, &hook(&url, false), &body).await;
        assert_eq!(passed, weir_controller::analysis::WebhookResult::Passed);

        // The system's store alone does not know the test CA: refused, saying why.
        let system_only = HttpClient::try_new(&HttpOptions::default())?;
        match weir_controller::webhook::post(&system_only, &hook(&url, false), &body).await {
            weir_controller::analysis::WebhookResult::Failed(why) => assert!(
                why.contains(&url) && why.to_lowercase().contains("certificate"),
                "{why}"
            ),
            passed => panic!("an untrusted server passed: {passed:?}"),
        }
        // disableTLS, as in Flagger, skips the verification for that hook.
        let skipped = weir_controller::webhook::post(&system_only, &hook(&url, true), &body).await;
        assert_eq!(skipped, weir_controller::analysis::WebhookResult::Passed);

        let calls = receiver.at("/gate");
        assert_eq!(calls.len(), 2, "the refused call never reached the server");
        assert_eq!(calls[0].json(), body);
        assert_eq!(calls[0].headers["content-type"], "application/json");
        Ok(())
    })
    .await;
}

#[test]
fn a_ca_file_that_is_not_pem_is_refused_naming_the_file_and_the_option() {
    let dir = WorkDir::new("bad_ca_file").unwrap();
    let path = dir.path().join("ca.pem");
    std::fs::write(&path, "not a certificate").unwrap();
    let err = HttpClient::try_new(&HttpOptions {
        ca_file: Some(path.clone()),
    })
    .unwrap_err()
    .to_string();
    assert!(
        err.contains(&path.display().to_string()) && err.contains("--ca-file"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_prometheus_is_queried_with_the_ca_trusted() {
    bounded(Duration::from_secs(60), async {
        let dir = WorkDir::new("https_prometheus")?;
        let ca = TestCa::new(dir.path())?;
        let prometheus = Prometheus::start_tls(
            &dir.path().join("prometheus"),
            &[],
            Duration::from_secs(1),
            &ca.server("prometheus")?,
        )?;
        assert!(prometheus.address().starts_with("https://"));
        let config = PrometheusConfig::new(PrometheusAddress::try_new(&prometheus.address())?);
        let client = PrometheusClient::with_http(HttpClient::try_new(&HttpOptions {
            ca_file: Some(ca.root.clone()),
        })?);
        // The TLS listener is up before the query engine: a few tries.
        let mut last = None;
        for _ in 0..50 {
            match client.query(&config, "vector(42)").await {
                Ok(value) => {
                    last = None;
                    assert_eq!(value, Some(42.0));
                    break;
                }
                Err(e) => last = Some(e),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert!(last.is_none(), "never answered: {last:?}");

        let untrusted = PrometheusClient::with_http(HttpClient::try_new(&HttpOptions::default())?);
        let err = untrusted
            .query(&config, "vector(42)")
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("cannot reach Prometheus") && err.to_lowercase().contains("certificate"),
            "{err}"
        );
        let skipping = PrometheusConfig {
            insecure_skip_verify: true,
            ..config.clone()
        };
        assert_eq!(untrusted.query(&skipping, "vector(7)").await?, Some(7.0));
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weir_local_trusts_the_ca_of_weir_ca_file_for_its_https_webhooks() {
    bounded(Duration::from_secs(120), async {
        let dir = WorkDir::new("weir_ca_file")?;
        let ca = TestCa::new(dir.path())?;
        let receiver = Receiver::start_tls(&ca.server("receiver")?).await?;
        // A rollout webhook at every step (no metric checks: the steps advance without traffic).
        let canary = CanaryFile {
            success_rate_min: None,
            duration_max_ms: None,
            analysis_extra: format!(
                "    webhooks:\n    - name: load\n      type: rollout\n      url: {}\n      metadata: {{cmd: \"hey -z 1m\"}}\n",
                receiver.url("/hook")
            ),
            ..CanaryFile::default()
        };
        let files = LocalFiles::new("weir_ca_file", &canary, "1.0.0")?;
        let state = files.state();
        let root = ca.root.display().to_string();
        let mut weir =
            WeirLocal::start_with_env(&files, &state, 0, "weir", &[("WEIR_CA_FILE", &root)])?;
        let deadline = tokio::time::Instant::now() + START;
        while files.phase(&state).as_deref() != Some("Initialized") {
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline && weir.exited().is_none(),
                "not Initialized: {}",
                weir.output()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        files.set_workload(&weir_e2e::local::mirror_workload("2.0.0", &[]))?;
        let calls = receiver.wait_for("/hook", 2, START).await?;
        let payload = calls[0].json();
        assert_eq!(payload["name"], "mhs");
        assert_eq!(payload["namespace"], "application");
        assert_eq!(payload["phase"], "Progressing");
        assert_eq!(payload["metadata"]["cmd"], "hey -z 1m");
        let checksum = payload["checksum"].as_str().unwrap_or_default();
        assert!(!checksum.is_empty(), "{payload}");
        assert_eq!(
            calls[1].json()["checksum"],
            payload["checksum"],
            "one revision, one checksum"
        );
        weir.signal("TERM");
        weir.wait_exit(Duration::from_secs(20))?;
        Ok(())
    })
    .await;
}
