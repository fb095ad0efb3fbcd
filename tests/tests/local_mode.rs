//! Local mode in this process (issue 9): the real `LocalMode` stepped by the test, a real Envoy
//! with the Weir filter and `mirror` processes, and the files a user edits while it runs (the
//! workload file, the Canary file). Each test has its own state folder, is bounded in time, and
//! stops what it started.

use std::future::Future;
use std::time::Duration;

use weir_controller::spec::{CanaryStatus, Phase};
use weir_e2e::local::{CanaryFile, LocalRun, TARGET};

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
