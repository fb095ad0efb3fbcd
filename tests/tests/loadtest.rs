//! `weir loadtest` (issue 12, item 5): flagger-loadtester's gates with its semantics, and hey
//! commands turned into that load, counted at a real receiver on 127.0.0.1.

use std::time::Duration;

use serde_json::json;
use weir_controller::http::{HttpClient, HttpOptions};
use weir_controller::loadtest::LoadTester;
use weir_e2e::receiver::Receiver;

async fn post(http: &HttpClient, url: &str, body: serde_json::Value) -> (u16, String) {
    let answer = http
        .post_json(url, &body, Duration::from_secs(30), false)
        .await
        .expect("the load tester answers");
    (
        answer.status,
        String::from_utf8_lossy(&answer.body).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gates_open_and_close_per_canary_as_flagger_loadtesters_do() {
    let http = HttpClient::try_new(&HttpOptions::default()).unwrap();
    let (addr, task) = LoadTester::new(http.clone())
        .serve("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let url = |path: &str| format!("http://{addr}{path}");
    let mhs = json!({"name": "mhs", "namespace": "application", "phase": "Progressing"});
    let other = json!({"name": "other", "namespace": "application"});
    assert_eq!(post(&http, &url("/gate/approve"), mhs.clone()).await.0, 200);
    assert_eq!(post(&http, &url("/gate/halt"), mhs.clone()).await.0, 403);
    for (check, open, close) in [
        ("/gate/check", "/gate/open", "/gate/close"),
        ("/rollback/check", "/rollback/open", "/rollback/close"),
    ] {
        assert_eq!(
            post(&http, &url(check), mhs.clone()).await.0,
            403,
            "{check} closed at first"
        );
        assert_eq!(post(&http, &url(open), mhs.clone()).await.0, 202);
        assert_eq!(
            post(&http, &url(check), mhs.clone()).await,
            (200, "Approved".to_owned())
        );
        assert_eq!(
            post(&http, &url(check), other.clone()).await.0,
            403,
            "per canary"
        );
        assert_eq!(post(&http, &url(close), mhs.clone()).await.0, 202);
        assert_eq!(post(&http, &url(check), mhs.clone()).await.0, 403);
    }
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hey_command_sends_the_load_it_asks_for_and_other_commands_are_refused() {
    let http = HttpClient::try_new(&HttpOptions::default()).unwrap();
    let (addr, task) = LoadTester::new(http.clone())
        .serve("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let receiver = Receiver::start().await.unwrap();
    let hook = |cmd: String| {
        json!({"name": "mhs", "namespace": "application", "phase": "Progressing",
               "metadata": {"type": "cmd", "cmd": cmd, "blocking": "true"}})
    };
    // -n: exactly that many requests, spread over the workers, with the method, header and body.
    let cmd = format!(
        "hey -n 30 -c 3 -m POST -H 'X-Load: weir' -d '{{\"a\": 1}}' {}",
        receiver.url("/counted")
    );
    let (status, text) = post(&http, &format!("http://{addr}/"), hook(cmd)).await;
    assert_eq!(status, 200, "{text}");
    let counted = receiver.at("/counted");
    assert_eq!(counted.len(), 30);
    assert!(counted.iter().all(|r| r.method == "POST"
        && r.headers["x-load"] == "weir"
        && r.json() == json!({"a": 1})));

    // -z with -q and -c: 2 workers at 10 per second for 2 seconds, about 40 requests.
    let cmd = format!("hey -z 2s -q 10 -c 2 {}", receiver.url("/paced"));
    let (status, text) = post(&http, &format!("http://{addr}/"), hook(cmd)).await;
    assert_eq!(status, 200, "{text}");
    let paced = receiver.at("/paced").len();
    assert!(
        (30..=42).contains(&paced),
        "{paced} requests for 2 x 10/s over 2s"
    );

    // Not hey: refused, saying what runs.
    let (status, text) = post(
        &http,
        &format!("http://{addr}/"),
        hook("curl -s http://x/".into()),
    )
    .await;
    assert_eq!(status, 400);
    assert!(
        text.contains("`curl` is not supported") && text.contains("hey"),
        "{text}"
    );
    let mut helm = hook("helm test app".into());
    helm["metadata"]["type"] = json!("helm");
    let (status, text) = post(&http, &format!("http://{addr}/"), helm).await;
    assert_eq!(status, 400);
    assert!(
        text.contains("metadata.type `helm` is not supported"),
        "{text}"
    );
    task.abort();
}

/// Flagger's tutorial setup end to end: the Canary's `rollout` webhook asks the load tester for
/// `hey` load through Envoy (the only traffic the canary gets), and its `confirm-promotion` hook
/// is the load tester's gate: the analysis reaches the last step, waits while the gate is
/// closed, and promotes once it is opened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_measures_the_load_testers_traffic_and_waits_at_its_gate() {
    use weir_controller::spec::Phase;
    use weir_e2e::local::{CanaryFile, LocalRun};
    let test = async {
        let http = HttpClient::try_new(&HttpOptions::default())?;
        let (tester, task) = LoadTester::new(http.clone())
            .serve("127.0.0.1:0".parse()?)
            .await?;
        // The webhook names Envoy's listener, which local mode picks at start: the Canary is
        // written with a placeholder and rewritten once Envoy listens (an edit is picked up).
        let canary = |listener: &str, host: &str| CanaryFile {
            analysis_extra: format!(
                "    webhooks:
    - name: load-test
      type: rollout
      url: http://{tester}/
      metadata:
        cmd: \"hey -z 2s -q 50 -c 2 -H 'Host: {host}' http://{listener}/\"
    - name: promotion-gate
      type: confirm-promotion
      url: http://{tester}/gate/check
"
            ),
            min_sample_count: 5,
            ..CanaryFile::default()
        };
        let mut run =
            LocalRun::start("loadtest_rollout", &canary("127.0.0.1:1", "none"), "1.0.0").await?;
        let (listener, host) = (run.mode().listener().to_string(), run.mode().host());
        let path = run.dir().join("canary.yaml");
        std::fs::write(&path, canary(&listener, &host).to_yaml())?;
        run.step_until("the primary is initialized", Duration::from_secs(60), |s| {
            s.phase == Some(Phase::Initialized)
        })
        .await?;
        run.set_version("2.0.0", &[])?;
        run.step_until(
            "the gate holds the promotion",
            Duration::from_secs(60),
            |s| s.phase == Some(Phase::WaitingPromotion),
        )
        .await?;
        // Every step measured the load tester's requests (the test sends none itself).
        let status = run.status();
        let measured: Vec<u64> = status
            .decisions
            .iter()
            .flat_map(|d| &d.checks)
            .filter(|c| c.metric == "request-success-rate")
            .filter_map(|c| c.sample_count)
            .collect();
        anyhow::ensure!(
            measured.iter().filter(|n| **n >= 5).count() >= 4,
            "requests per check: {measured:?}\n{}",
            run.describe()
        );
        // The gate is closed: the rollout waits at the last weight.
        run.step_for(Duration::from_secs(2)).await;
        anyhow::ensure!(
            run.status().phase == Some(Phase::WaitingPromotion),
            "{}",
            run.describe()
        );
        let (status, _) = post(
            &http,
            &format!("http://{tester}/gate/open"),
            json!({"name": "mhs", "namespace": "application"}),
        )
        .await;
        assert_eq!(status, 202);
        run.step_until("promoted", Duration::from_secs(30), |s| {
            s.phase == Some(Phase::Succeeded)
        })
        .await?;
        assert_eq!(run.serving_version(5).await?, "2.0.0");
        run.shutdown().await;
        task.abort();
        anyhow::Ok(())
    };
    match tokio::time::timeout(Duration::from_secs(150), test).await {
        Ok(result) => result.unwrap_or_else(|e| panic!("{e:#}")),
        Err(_) => panic!("the test did not finish within 150s"),
    }
}

/// Anyone who reaches the load tester can post to it: what a client can make it hold is bounded,
/// and each refusal says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_client_cannot_make_the_load_tester_hold_without_bound() {
    use weir_controller::loadtest::hey::MAX_CONCURRENCY;
    use weir_controller::loadtest::{MAX_BODY_BYTES, MAX_OPEN, MAX_RUNNING};
    let test = async {
        let http = HttpClient::try_new(&HttpOptions::default())?;
        let (tester, task) = LoadTester::new(http.clone())
            .serve("127.0.0.1:0".parse()?)
            .await?;
        // A body beyond the limit is refused, not read to its end.
        let huge = json!({"name": "x".repeat(MAX_BODY_BYTES), "namespace": "application"});
        let (status, text) = post(&http, &format!("http://{tester}/gate/open"), huge).await;
        assert_eq!(status, 413, "{text}");
        assert!(text.contains(&MAX_BODY_BYTES.to_string()), "{text}");
        // Gates: at most MAX_OPEN open; then refused until one closes.
        let gate = |i: usize| json!({"name": format!("c{i}"), "namespace": "application"});
        use futures::StreamExt;
        let opens: Vec<u16> = futures::stream::iter(0..MAX_OPEN)
            .map(|i| {
                let (http, url) = (http.clone(), format!("http://{tester}/gate/open"));
                async move { post(&http, &url, gate(i)).await.0 }
            })
            .buffer_unordered(32)
            .collect()
            .await;
        assert!(opens.iter().all(|s| *s == 202));
        let (status, text) =
            post(&http, &format!("http://{tester}/gate/open"), gate(MAX_OPEN)).await;
        assert_eq!(status, 429, "{text}");
        assert!(text.contains("close some"), "{text}");
        assert_eq!(
            post(&http, &format!("http://{tester}/gate/close"), gate(0))
                .await
                .0,
            202
        );
        assert_eq!(
            post(&http, &format!("http://{tester}/gate/open"), gate(MAX_OPEN))
                .await
                .0,
            202
        );
        // Loads: at most MAX_RUNNING at once (each a distinct command, each holding its time).
        let hole = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let target = hole.local_addr()?;
        let load = |i: usize| {
            json!({"name": "mhs", "namespace": "application",
                   "metadata": {"cmd": format!("hey -z 1m -c 1 -q 1 http://{target}/{i}")}})
        };
        for i in 0..MAX_RUNNING {
            let (status, text) = post(&http, &format!("http://{tester}/"), load(i)).await;
            assert_eq!(status, 202, "{text}");
        }
        let (status, text) = post(&http, &format!("http://{tester}/"), load(MAX_RUNNING)).await;
        assert_eq!(status, 429, "{text}");
        assert!(text.contains("running already"), "{text}");
        // One load cannot ask for more workers than the limit.
        let wide = json!({"name": "mhs", "namespace": "application",
            "metadata": {"cmd": format!("hey -n 1 -c {} http://{target}/", MAX_CONCURRENCY + 1)}});
        let (status, text) = post(&http, &format!("http://{tester}/"), wide).await;
        assert_eq!(status, 400, "{text}");
        assert!(text.contains("at most"), "{text}");
        task.abort();
        drop(hole);
        anyhow::Ok(())
    };
    match tokio::time::timeout(Duration::from_secs(120), test).await {
        Ok(result) => result.unwrap_or_else(|e| panic!("{e:#}")),
        Err(_) => panic!("the test did not finish within 120s"),
    }
}
