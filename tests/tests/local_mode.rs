//! Local mode in this process (issue 9): the real `LocalMode` stepped by the test, a real Envoy
//! with the Weir filter and `mirror` processes, and the files a user edits while it runs (the
//! workload file, the Canary file). Each test has its own state folder, is bounded in time, and
//! stops what it started.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use weir_controller::spec::{CanaryStatus, Phase};
use weir_e2e::local::{advance_weights, CanaryFile, LocalRun, TARGET};

const INIT: Duration = Duration::from_secs(30);

/// Runs a test body with a deadline, so a hang fails instead of blocking the suite.
async fn bounded<T>(limit: Duration, body: impl Future<Output = anyhow::Result<T>>) -> T {
    match tokio::time::timeout(limit, body).await {
        Ok(Ok(value)) => value,
        Ok(Err(e)) => panic!("{e:#}"),
        Err(_) => panic!("the test did not finish within {limit:?}"),
    }
}

fn is(phase: Phase) -> impl Fn(&CanaryStatus) -> bool {
    move |s| s.phase == Some(phase)
}

/// The warnings local mode recorded about failed steps that contain `needle`.
fn step_warnings(run: &LocalRun, needle: &str) -> Vec<String> {
    run.events()
        .into_iter()
        .filter(|e| e.event.reason == "Synced" && e.event.message.contains(needle))
        .map(|e| e.event.message)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_or_invalid_workload_file_is_reported_once_per_change() {
    bounded(Duration::from_secs(90), async {
        let mut run = LocalRun::start("workload_warnings", &CanaryFile::default(), "1.0.0").await?;
        run.step_until("the primary is initialized", INIT, is(Phase::Initialized))
            .await?;
        let workload = run.dir().join("workloads").join(format!("{TARGET}.yaml"));

        // Steps come every 50ms while nothing is due; each one fails on the missing file.
        std::fs::remove_file(&workload)?;
        run.step_for(Duration::from_secs(2)).await;
        let missing = step_warnings(&run, &format!("{TARGET}.yaml"));
        assert_eq!(missing.len(), 1, "said once: {missing:#?}");

        std::fs::write(&workload, "command: mirror\nimage: mirror:1.0.0\n")?;
        run.step_for(Duration::from_secs(1)).await;
        let invalid = step_warnings(&run, &format!("{TARGET}.yaml: unknown field `image`"));
        assert_eq!(invalid.len(), 1, "a new problem is said once: {invalid:#?}");

        // Fixed, then missing again: said again.
        run.set_version("1.0.0", &[])?;
        run.step_for(Duration::from_millis(500)).await;
        std::fs::remove_file(&workload)?;
        run.step_for(Duration::from_secs(1)).await;
        let again = step_warnings(&run, &format!("{TARGET}.yaml"));
        assert_eq!(
            again.len(),
            3,
            "the missing file twice and the invalid one once: {again:#?}"
        );
        run.shutdown().await;
        Ok(())
    })
    .await;
}

/// A webhook endpoint on 127.0.0.1 that answers every request with 200 and counts them.
struct Webhook {
    url: String,
    calls: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Webhook {
    async fn start() -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}/gate", listener.local_addr()?);
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = calls.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                counted.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    // The request is small: one read takes its head (and body).
                    let mut request = [0u8; 4096];
                    let _ = tokio::time::timeout(Duration::from_secs(2), stream.read(&mut request))
                        .await;
                    let _ = stream
                        .write_all(
                            b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                        )
                        .await;
                });
            }
        });
        Ok(Self { url, calls, task })
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

impl Drop for Webhook {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edited_canary_file_is_used_from_the_next_step_and_a_removed_webhook_is_not_called() {
    bounded(Duration::from_secs(90), async {
        let hook = Webhook::start().await?;
        // Steps of 1% every second: the rollout outlasts the test. No metric checks, so every
        // step advances without traffic; the `rollout` webhook is called at each one.
        let canary = CanaryFile {
            step_weight: 1,
            max_weight: 100,
            success_rate_min: None,
            duration_max_ms: None,
            ..CanaryFile::default()
        };
        let with_hook = CanaryFile {
            analysis_extra: format!(
                "    webhooks:\n    - name: gate\n      type: rollout\n      url: {}\n",
                hook.url
            ),
            ..canary.clone()
        };
        let mut run = LocalRun::start("canary_reload", &with_hook, "1.0.0").await?;
        let canary_path = run.dir().join("canary.yaml");
        run.step_until("the primary is initialized", INIT, is(Phase::Initialized))
            .await?;
        run.set_version("2.0.0", &[])?;
        run.step_until("the webhook was called twice", INIT, |_| hook.calls() >= 2)
            .await?;

        // The webhook removed from the file: after the step that reads the edit, no call.
        const RELOADED: &str =
            "canary.yaml changed: mhs.application runs the Canary as it is now written";
        let before = run.messages_with(RELOADED).len();
        std::fs::write(&canary_path, canary.to_yaml())?;
        run.step_for(Duration::from_millis(300)).await;
        let calls = hook.calls();
        let advances = advance_weights(&run.events()).len();
        run.step_for(Duration::from_secs(3)).await;
        assert_eq!(
            hook.calls(),
            calls,
            "the removed webhook is not called: {}",
            run.describe()
        );
        assert!(
            advance_weights(&run.events()).len() >= advances + 2,
            "the analysis went on without it: {}",
            run.describe()
        );
        assert_eq!(
            run.messages_with(RELOADED).len(),
            before + 1,
            "the reload is said: {}",
            run.describe()
        );

        // An edit that cannot be used is said once, and the Canary as it was runs on.
        std::fs::write(
            &canary_path,
            canary.to_yaml().replace("stepWeight: 1", "stepWeight: 0"),
        )?;
        run.step_for(Duration::from_secs(2)).await;
        let invalid = run.messages_with("changed but cannot be used");
        assert_eq!(invalid.len(), 1, "{invalid:#?}");
        assert!(invalid[0].contains("stepWeight"), "{}", invalid[0]);
        assert_eq!(run.status().phase, Some(Phase::Progressing));

        // Another canary's name is not taken over by this controller.
        std::fs::write(
            &canary_path,
            canary
                .to_yaml()
                .replace("name: mhs\n  namespace", "name: other\n  namespace"),
        )?;
        run.step_for(Duration::from_millis(500)).await;
        let renamed = run.messages_with("restart weir local to switch");
        assert_eq!(renamed.len(), 1, "{}", run.describe());
        run.shutdown().await;
        Ok(())
    })
    .await;
}
