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

/// AlertProviders beside the Canary: one per type, each at its own path of `receiver`.
fn providers(receiver: &Receiver) -> String {
    format!(
        "apiVersion: weir.dev/v1alpha1
kind: AlertProvider
metadata: {{name: chat, namespace: application}}
spec: {{type: slack, channel: alerts, username: weir, address: '{slack}'}}
---
apiVersion: flagger.app/v1beta1
kind: AlertProvider
metadata: {{name: teams}}
spec: {{type: msteams, address: '{teams}'}}
---
apiVersion: weir.dev/v1alpha1
kind: AlertProvider
metadata: {{name: discord}}
spec: {{type: discord, address: '{discord}'}}
---
apiVersion: weir.dev/v1alpha1
kind: AlertProvider
metadata: {{name: relay}}
spec: {{type: generic, secretRef: {{name: relay-url}}}}
---
apiVersion: v1
kind: Secret
metadata: {{name: relay-url, namespace: application}}
stringData: {{address: '{generic}', token: t0k}}
---
apiVersion: weir.dev/v1alpha1
kind: AlertProvider
metadata: {{name: flaky}}
spec: {{type: generic, address: '{flaky}'}}
---
apiVersion: weir.dev/v1alpha1
kind: AlertProvider
metadata: {{name: proxied}}
spec: {{type: generic, address: 'http://127.0.0.1:1/proxied', proxy: '{proxy}'}}
",
        proxy = receiver.url(""),
        slack = receiver.url("/slack"),
        teams = receiver.url("/teams"),
        discord = receiver.url("/discord"),
        generic = receiver.url("/generic"),
        flaky = receiver.url("/flaky"),
    )
}

fn texts(calls: &[weir_e2e::receiver::Received], pointer: &str) -> Vec<String> {
    calls
        .iter()
        .map(|c| {
            c.json()
                .pointer(pointer)
                .and_then(|v| v.as_str())
                .unwrap_or("")
                .to_owned()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_reach_each_provider_in_its_shape_filtered_by_severity_and_event_hooks_get_every_event(
) {
    use weir_controller::spec::Phase;
    use weir_e2e::local::LocalRun;
    bounded(Duration::from_secs(120), async {
        let receiver = Receiver::start().await?;
        receiver.answer("/gate", &[500; 100]);
        // The first two sends of the one error alert fail: the third attempt delivers it.
        receiver.answer("/flaky", &[503, 503]);
        // No metric checks: the failing rollout webhook is the failed check, and with
        // threshold 1 the first step rolls back.
        let canary = CanaryFile {
            threshold: 1,
            success_rate_min: None,
            duration_max_ms: None,
            analysis_extra: format!(
                "    webhooks:
    - name: gate
      type: rollout
      url: {gate}
    - name: events
      type: event
      url: {events}
      metadata: {{team: payments, eventType: not-overridden}}
    alerts:
    - name: chat
      providerRef: {{name: chat, namespace: application}}
    - name: teams
      severity: error
      providerRef: {{name: teams}}
    - name: discord
      severity: warn
      providerRef: {{name: discord}}
    - name: relay
      severity: info
      providerRef: {{name: relay}}
    - name: flaky
      severity: error
      providerRef: {{name: flaky}}
    - name: proxied
      severity: error
      providerRef: {{name: proxied}}
",
                gate = receiver.url("/gate"),
                events = receiver.url("/events"),
            ),
            ..CanaryFile::default()
        };
        let files = providers(&receiver);
        let mut run = LocalRun::start_with("alerts", &canary, "1.0.0", |options| {
            let dir = options.canary.parent().map(std::path::Path::to_path_buf);
            if let Some(dir) = dir {
                let _ = std::fs::write(dir.join("alert-providers.yaml"), &files);
            }
        })
        .await?;
        run.step_until("the primary is initialized", START, |s| {
            s.phase == Some(Phase::Initialized)
        })
        .await?;
        run.set_version("2.0.0", &[])?;
        run.step_until("the canary failed", START, |s| s.phase == Some(Phase::Failed))
            .await?;
        let limit = Duration::from_secs(20);

        // info: everything (initialized, new revision, threshold reached), in Slack's shape.
        let slack = receiver.wait_for("/slack", 3, limit).await?;
        assert_eq!(
            texts(&slack, "/attachments/0/text"),
            [
                "New Deployment detected, initialization completed.",
                "New revision detected, progressing canary analysis.",
                "Failed checks threshold reached 1",
            ]
        );
        assert_eq!(
            texts(&slack, "/attachments/0/color"),
            ["good", "good", "danger"]
        );
        let first = slack[0].json();
        assert_eq!(first["channel"], "alerts");
        assert_eq!(first["username"], "weir");
        assert_eq!(first["icon_emoji"], ":rocket:");
        assert_eq!(first["attachments"][0]["author_name"], "mhs.application");
        assert_eq!(
            first["attachments"][0]["fields"][0],
            serde_json::json!({"title": "Target", "value": "Deployment/mhs.application", "short": false})
        );
        assert_eq!(slack[2].json()["attachments"][0]["fields"], serde_json::json!([]));

        // error only, in Teams' MessageCard shape.
        let teams = receiver.wait_for("/teams", 1, limit).await?;
        let card = teams[0].json();
        assert_eq!(card["@type"], "MessageCard");
        assert_eq!(card["themeColor"], "FF0000");
        assert_eq!(
            card["sections"][0]["activityTitle"],
            "Failed checks threshold reached 1"
        );
        assert_eq!(card["sections"][0]["activitySubtitle"], "mhs.application");

        // warn gets warnings and errors: here the one error, at Discord's Slack endpoint,
        // with Flagger's defaults for channel and user.
        let discord = receiver.wait_for("/discord/slack", 1, limit).await?;
        assert_eq!(discord[0].json()["channel"], "general");
        assert_eq!(discord[0].json()["username"], "flagger");

        // The generic provider's address and token come from the Secret beside the Canary.
        let generic = receiver.wait_for("/generic", 3, limit).await?;
        assert_eq!(generic[2].json()["severity"], "error");
        assert_eq!(generic[2].json()["message"], "Failed checks threshold reached 1");
        assert_eq!(generic[0].headers["authorization"], "Bearer t0k");

        // Through the provider's proxy: nothing listens at the address itself (port 1), the
        // proxy (the receiver) gets the request for it.
        let proxied = receiver.wait_for("/proxied", 1, limit).await?;
        assert_eq!(proxied[0].headers["host"], "127.0.0.1:1");
        assert_eq!(proxied[0].json()["message"], "Failed checks threshold reached 1");

        // Retried: two failures, then delivered; nothing more.
        let flaky = receiver.wait_for("/flaky", 3, limit).await?;
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(receiver.at("/flaky").len(), 3, "{flaky:?}");
        assert_eq!(receiver.at("/teams").len(), 1);
        assert_eq!(receiver.at("/discord/slack").len(), 1);

        // Every event reached the event hook, in order, with Flagger's payload.
        let recorded: Vec<String> = run.events().into_iter().map(|e| e.event.message).collect();
        let events = receiver.wait_for("/events", recorded.len(), limit).await?;
        assert_eq!(texts(&events, "/metadata/eventMessage"), recorded);
        let failed = events
            .iter()
            .map(|e| e.json())
            .find(|e| {
                e["metadata"]["eventMessage"]
                    .as_str()
                    .is_some_and(|m| m.starts_with("Canary failed!"))
            })
            .ok_or_else(|| anyhow::anyhow!("no Canary failed event"))?;
        assert_eq!(failed["name"], "mhs");
        assert_eq!(failed["phase"], "Failed");
        assert_eq!(failed["metadata"]["eventType"], "Warning");
        assert_eq!(failed["metadata"]["team"], "payments");
        assert!(failed["metadata"]["timestamp"]
            .as_str()
            .is_some_and(|t| t.parse::<u64>().is_ok()));
        assert!(!failed["checksum"].as_str().unwrap_or("").is_empty());
        run.shutdown().await;
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_naming_a_missing_alert_provider_is_refused_at_start() {
    let canary = CanaryFile {
        analysis_extra: "    alerts:\n    - name: chat\n      providerRef: {name: nowhere}\n"
            .to_owned(),
        ..CanaryFile::default()
    };
    let err = match weir_e2e::local::LocalRun::start("missing_provider", &canary, "1.0.0").await {
        Ok(_) => panic!("started with a missing AlertProvider"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        err.contains("spec.analysis.alerts[0] (chat): AlertProvider application/nowhere not found"),
        "{err}"
    );
}

/// A TCP server that accepts connections and never answers, counting them.
async fn black_hole() -> anyhow::Result<(
    std::net::SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
)> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let accepted = std::sync::Arc::new(AtomicUsize::new(0));
    let counter = accepted.clone();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::Relaxed);
            held.push(stream);
        }
    });
    Ok((addr, accepted))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_that_never_answers_delays_neither_the_analysis_nor_an_https_provider() {
    use std::sync::atomic::Ordering;
    use weir_controller::spec::Phase;
    use weir_e2e::local::LocalRun;
    bounded(Duration::from_secs(120), async {
        let dir = WorkDir::new("dead_receiver")?;
        let ca = TestCa::new(dir.path())?;
        // The controller's one client, trusting the test CA (as --ca-file makes it).
        let trusting = HttpClient::try_new(&HttpOptions {
            ca_file: Some(ca.root.clone()),
        })?;
        if weir_controller::http::install(trusting).is_err() {
            anyhow::bail!("an HTTP client was already in use");
        }
        let chat = Receiver::start_tls(&ca.server("receiver")?).await?;
        let (dead, accepted) = black_hole().await?;
        let files = format!(
            "apiVersion: weir.dev/v1alpha1
kind: AlertProvider
metadata: {{name: dead}}
spec: {{type: generic, address: 'http://{dead}/alerts'}}
---
apiVersion: weir.dev/v1alpha1
kind: AlertProvider
metadata: {{name: chat}}
spec: {{type: slack, address: '{chat}'}}
",
            chat = chat.url("/slack"),
        );
        // No metric checks: the steps advance without traffic, one a second.
        let canary = CanaryFile {
            success_rate_min: None,
            duration_max_ms: None,
            analysis_extra: "    alerts:
    - name: dead
      providerRef: {name: dead}
    - name: chat
      providerRef: {name: chat}
"
            .to_owned(),
            ..CanaryFile::default()
        };
        let mut run = LocalRun::start_with("dead_receiver", &canary, "1.0.0", |options| {
            if let Some(dir) = options.canary.parent() {
                let _ = std::fs::write(dir.join("alert-providers.yaml"), &files);
            }
        })
        .await?;
        run.step_until("the primary is initialized", START, |s| {
            s.phase == Some(Phase::Initialized)
        })
        .await?;
        run.set_version("2.0.0", &[])?;
        let started = std::time::Instant::now();
        run.step_until("the canary is promoted", START, |s| {
            s.phase == Some(Phase::Succeeded)
        })
        .await?;
        // Each alert to the dead provider takes 3 attempts of 5 s: had the analysis waited for
        // them, initialization's and the new revision's alone would have held it for 33 s.
        let took = started.elapsed();
        anyhow::ensure!(
            took < Duration::from_secs(25),
            "the rollout took {took:?}\n{}",
            run.describe()
        );
        // The HTTPS provider has every info alert (initialized, new revision, promoted) while
        // the dead one still holds its first: delivered in its own lane, through TLS verified
        // against the test CA.
        let alerts = chat.wait_for("/slack", 3, Duration::from_secs(5)).await?;
        let texts = texts(&alerts, "/attachments/0/text");
        assert_eq!(
            texts[..2],
            [
                "New Deployment detected, initialization completed.",
                "New revision detected, progressing canary analysis.",
            ],
            "{texts:?}"
        );
        assert!(
            texts[2..].iter().any(|t| t.contains("promotion")),
            "{texts:?}"
        );
        assert!(
            accepted.load(Ordering::Relaxed) >= 1,
            "the dead provider was never tried"
        );
        run.shutdown().await;
        Ok(())
    })
    .await;
}
