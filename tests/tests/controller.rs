//! The controller, end to end (issue 3): the real local mode — ingest and runner in this
//! process, a real Envoy loading the real `weir_filter.wasm`, `mirror` processes as the app's
//! versions — driven through whole rollouts with short intervals (1s) and steady traffic. Each
//! test has its own state folder, is bounded in time, and kills what it started.

use std::future::Future;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use weir_controller::local::request_retry;
use weir_controller::spec::{Phase, Weight};
use weir_e2e::binaries;
use weir_e2e::local::{advance_weights, weir_binary, CanaryFile, LocalRun};
use weir_e2e::WorkDir;

/// Requests per second of the tests' traffic: about 20 a second reach the canary at 10%. A check
/// right after a weight change counts only what that weight served, one 1s interval: about 20
/// requests, above the tests' `minSampleCount` of 10 (a loaded machine may see fewer: an
/// inconclusive halt, after which the window grows to the metric's 2s).
const RATE: u32 = 200;
/// Long enough for a loaded machine; a healthy rollout takes about ten seconds.
const ROLLOUT: Duration = Duration::from_secs(40);
const INIT: Duration = Duration::from_secs(20);

const OLD: &str = "1.0.0";
const NEW: &str = "2.0.0";

/// Runs a test body with a deadline, so a hang fails instead of blocking the suite.
async fn bounded<T>(limit: Duration, body: impl Future<Output = anyhow::Result<T>>) -> T {
    match tokio::time::timeout(limit, body).await {
        Ok(Ok(value)) => value,
        Ok(Err(e)) => panic!("{e:#}"),
        Err(_) => panic!("the test did not finish within {limit:?}"),
    }
}

/// Whether a message names a streamed window of at most the tests' 2s metric interval: a
/// check right after a weight change counts only what that weight served (about one 1s
/// interval), a later one up to the whole window.
fn names_a_streamed_window(message: &str) -> bool {
    message.split(" requests in ").skip(1).any(|rest| {
        rest.split_once(" from streamed")
            .is_some_and(|(window, _)| {
                window == "2s"
                    || window == "1s"
                    || (window.starts_with("1.") && window.ends_with('s'))
            })
    })
}

/// A halt for too little data: too few requests, or none at all (Flagger's "no values found").
fn inconclusive(halt: &str) -> bool {
    halt.contains("inconclusive") || halt.contains("no values found")
}

fn is(phase: Phase) -> impl Fn(&weir_controller::spec::CanaryStatus) -> bool {
    move |s| s.phase == Some(phase)
}

/// Starts local mode on `OLD`, steps it to Initialized, then starts traffic (unless `rate` is 0).
async fn initialized(test: &str, canary: &CanaryFile, rate: u32) -> anyhow::Result<LocalRun> {
    let mut run = LocalRun::start(test, canary, OLD).await?;
    run.step_until("the primary is initialized", INIT, is(Phase::Initialized))
        .await?;
    // Not earlier: before the initialization there is no primary to answer.
    if rate > 0 {
        run.start_traffic(rate);
    }
    Ok(run)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthy_canary_is_advanced_step_by_step_and_promoted() {
    bounded(Duration::from_secs(90), async {
        let mut run = initialized("healthy_canary", &CanaryFile::default(), RATE).await?;
        assert_eq!(
            run.serving_version(10).await?,
            OLD,
            "the primary serves v{OLD} at first"
        );

        run.set_version(NEW, &[])?;
        run.step_until("the new version is promoted", ROLLOUT, is(Phase::Succeeded))
            .await?;

        let status = run.status();
        let events = run.events();
        let context = run.describe();
        assert_eq!(advance_weights(&events), [10, 20, 30, 40, 50], "{context}");
        // Every advance after the first was decided on numbers, and names them.
        for message in run.messages_with("canary weight").iter().skip(1) {
            assert!(
                message.contains("request-success-rate 100.00% (min 99%;")
                    && names_a_streamed_window(message)
                    && message.contains("(max 500ms;"),
                "an advance names the success rate, the P99 bound and the sample count: {message}"
            );
        }
        assert_eq!(
            run.messages_with("Copying mhs.application template spec to mhs-primary.application")
                .len(),
            1,
            "{context}"
        );
        assert_eq!(
            run.messages_with("Promotion completed!").len(),
            1,
            "{context}"
        );
        // Too few samples at a step may halt it (inconclusive); no check may fail.
        let failing: Vec<String> = run
            .messages_with("Halt")
            .into_iter()
            .filter(|m| !inconclusive(m))
            .collect();
        assert!(
            failing.is_empty(),
            "a healthy canary fails no check: {context}"
        );
        assert_eq!(status.failed_checks, 0, "{context}");
        assert_eq!(status.canary_weight, Weight::ZERO, "{context}");
        assert_eq!(
            status.last_promoted_spec, status.last_applied_spec,
            "{context}"
        );
        assert_eq!(
            run.serving_version(10).await?,
            NEW,
            "the primary serves v{NEW} after the promotion"
        );

        // The primary's slot switch and the weight changes dropped no request.
        let traffic = run.traffic().map(|t| t.stats()).unwrap_or_default();
        assert!(traffic.sent > 1_000, "the traffic ran: {traffic:?}");
        assert_eq!(
            traffic.not_ok(),
            0,
            "no request failed during the rollout: {traffic:?}; Envoy: {}",
            run.envoy_counters()
        );
        run.shutdown().await;
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faulty_canary_is_halted_on_success_rate_and_rolled_back() {
    bounded(Duration::from_secs(90), async {
        let canary = CanaryFile::default();
        let threshold = canary.threshold as usize;
        let mut run = initialized("faulty_canary", &canary, RATE).await?;

        // Half of the new version's answers are 500s; the primary stays healthy.
        run.set_version(NEW, &["--error-rate", "0.5"])?;
        run.step_until(
            "the faulty version is rolled back",
            ROLLOUT,
            is(Phase::Failed),
        )
        .await?;

        let status = run.status();
        let context = run.describe();
        let halts = run.messages_with("advancement success rate");
        assert_eq!(
            halts.len(),
            threshold,
            "one halt per failed check: {context}"
        );
        for halt in &halts {
            assert!(
                halt.contains("< 99% (") && names_a_streamed_window(halt),
                "a halt names the value, the bound and the sample count: {halt}"
            );
        }
        assert_eq!(
            run.messages_with(&format!(
                "Rolling back mhs.application failed checks threshold reached {threshold}"
            ))
            .len(),
            1,
            "{context}"
        );
        assert_eq!(
            run.messages_with("Canary failed! Scaling down mhs.application")
                .len(),
            1,
            "{context}"
        );
        assert_eq!(
            advance_weights(&run.events()),
            [10],
            "halted at the first step: {context}"
        );
        assert!(
            run.messages_with("Promotion completed!").is_empty(),
            "{context}"
        );
        assert_eq!(status.failed_checks as usize, threshold, "{context}");
        assert_eq!(status.canary_weight, Weight::ZERO, "{context}");
        assert_ne!(
            status.last_promoted_spec, status.last_applied_spec,
            "{context}"
        );
        assert_eq!(
            run.serving_version(10).await?,
            OLD,
            "the primary still serves v{OLD}"
        );
        run.shutdown().await;
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_without_traffic_is_inconclusive_not_failed() {
    bounded(Duration::from_secs(90), async {
        let canary = CanaryFile::default();
        let threshold = canary.threshold;
        let mut run = initialized("canary_without_traffic", &canary, 0).await?;

        run.set_version(NEW, &[])?;
        // More inconclusive steps than the threshold allows failed ones.
        let wanted = threshold + 2;
        run.step_until(
            &format!("{wanted} inconclusive analysis steps"),
            ROLLOUT,
            move |s| s.inconclusive_checks >= wanted,
        )
        .await?;

        let status = run.status();
        let context = run.describe();
        let halts: Vec<_> = run
            .events()
            .into_iter()
            .filter(|e| e.event.reason == "Halt")
            .map(|e| e.event.message)
            .collect();
        assert!(halts.len() >= wanted as usize, "{context}");
        for halt in &halts {
            assert!(
                inconclusive(halt),
                "without traffic every halt is inconclusive: {halt}"
            );
        }
        assert_eq!(status.phase, Some(Phase::Progressing), "{context}");
        assert_eq!(status.failed_checks, 0, "{context}");
        assert_eq!(status.canary_weight, Weight::try_new(10)?, "{context}");
        assert_eq!(advance_weights(&run.events()), [10], "{context}");
        assert!(run.messages_with("Rolling back").is_empty(), "{context}");
        run.shutdown().await;
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_canary_fails_the_latency_check() {
    bounded(Duration::from_secs(90), async {
        let canary = CanaryFile {
            threshold: 2,
            ..CanaryFile::default()
        };
        let mut run = initialized("slow_canary", &canary, RATE).await?;

        run.set_version(NEW, &["--latency", "600ms"])?;
        run.step_until(
            "the slow version is rolled back",
            ROLLOUT,
            is(Phase::Failed),
        )
        .await?;

        let status = run.status();
        let context = run.describe();
        let halts = run.messages_with("advancement request duration");
        assert_eq!(halts.len(), 2, "{context}");
        for halt in &halts {
            assert!(
                halt.contains(" > 500ms (") && names_a_streamed_window(halt),
                "a halt names the P99, the bound and the sample count: {halt}"
            );
        }
        assert!(
            run.messages_with("advancement success rate").is_empty(),
            "the slow canary answers every request: {context}"
        );
        assert_eq!(
            run.messages_with("Rolling back mhs.application failed checks threshold reached 2")
                .len(),
            1,
            "{context}"
        );
        assert_eq!(status.failed_checks, 2, "{context}");
        assert_eq!(
            run.serving_version(5).await?,
            OLD,
            "the primary still serves v{OLD}"
        );
        run.shutdown().await;
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_restart_mid_rollout_resumes_at_the_same_weight_without_a_second_promotion() {
    bounded(Duration::from_secs(100), async {
        let mut run = initialized("controller_restart", &CanaryFile::default(), RATE).await?;
        run.set_version(NEW, &[])?;
        let twenty = Weight::try_new(20)?;
        run.step_until("the canary has 20% or more", ROLLOUT, move |s| {
            s.phase == Some(Phase::Progressing) && s.canary_weight >= twenty
        })
        .await?;
        let before = run.status();
        let events_before = run.persisted_events()?.len();

        run.restart().await?;
        let after = run.status();
        assert_eq!(
            (after.phase, after.canary_weight),
            (before.phase, before.canary_weight),
            "the restarted controller starts from the persisted status"
        );
        assert_eq!(after, before, "the whole status survives the restart");

        run.step_until("the new version is promoted", ROLLOUT, is(Phase::Succeeded))
            .await?;
        let context = run.describe();
        let events = run.persisted_events()?;
        let second_life = &events[events_before..];
        let in_second = |needle: &str| {
            second_life
                .iter()
                .filter(|e| e.event.message.contains(needle) || e.event.reason.contains(needle))
                .count()
        };
        assert_eq!(in_second("New revision detected"), 0, "{context}");
        assert_eq!(in_second("Initializ"), 0, "{context}");
        assert_eq!(in_second("Starting canary analysis"), 0, "{context}");
        let count = |needle: &str| {
            events
                .iter()
                .filter(|e| e.event.message.contains(needle))
                .count()
        };
        assert_eq!(
            count("Initialization done!"),
            1,
            "events.jsonl keeps the first life: {context}"
        );
        assert_eq!(count("New revision detected"), 1, "{context}");
        assert_eq!(
            count("Copying mhs.application template spec"),
            1,
            "{context}"
        );
        assert_eq!(count("Promotion completed!"), 1, "{context}");
        assert_eq!(
            advance_weights(&events),
            [10, 20, 30, 40, 50],
            "no weight repeated or skipped across the restart: {context}"
        );
        let status = run.status();
        assert_eq!(status.failed_checks, 0, "{context}");
        assert_eq!(
            status.last_promoted_spec, status.last_applied_spec,
            "{context}"
        );
        assert_eq!(
            run.serving_version(10).await?,
            NEW,
            "the primary serves v{NEW}"
        );
        run.shutdown().await;
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_version_is_retried_without_changing_it() {
    bounded(Duration::from_secs(100), async {
        let canary = CanaryFile {
            threshold: 2,
            ..CanaryFile::default()
        };
        let mut run = initialized("failed_version_retry", &canary, RATE).await?;
        let traffic_errors = |run: &LocalRun, on: bool| {
            if let Some(traffic) = run.traffic() {
                traffic.set_errors(on);
            }
        };

        // Every other request asks for a 500: the new version fails its analysis.
        traffic_errors(&run, true);
        run.set_version(NEW, &[])?;
        run.step_until("the version fails", ROLLOUT, is(Phase::Failed))
            .await?;
        traffic_errors(&run, false);
        let failed = run.status();
        assert_eq!(failed.failed_checks, 2, "{}", run.describe());

        // Without a retry request a failed version stays failed.
        run.step_for(Duration::from_secs(3)).await;
        assert_eq!(
            run.status().phase,
            Some(Phase::Failed),
            "{}",
            run.describe()
        );

        let token = request_retry(run.state()).map_err(anyhow::Error::msg)?;
        run.step_until(
            "the retried version is promoted",
            ROLLOUT,
            is(Phase::Succeeded),
        )
        .await?;
        let status = run.status();
        let context = run.describe();
        let retries = run.messages_with("Retrying mhs.application analysis as requested");
        assert_eq!(retries.len(), 1, "{context}");
        assert!(
            retries[0].contains(&format!("retry {token}"))
                && retries[0].contains("attempt 2 of revision"),
            "{}",
            retries[0]
        );
        assert_eq!(
            run.messages_with("New revision detected").len(),
            1,
            "{context}"
        );
        assert_eq!(
            status.last_applied_spec, failed.last_applied_spec,
            "the same revision: {context}"
        );
        assert_eq!(
            status.last_promoted_spec, failed.last_applied_spec,
            "{context}"
        );
        assert_eq!(status.retry.count, 1, "{context}");
        assert_eq!(status.failed_checks, 0, "{context}");
        assert_eq!(
            advance_weights(&run.events()),
            [10, 10, 20, 30, 40, 50],
            "the retry starts over from the first step: {context}"
        );
        assert_eq!(
            run.messages_with("Promotion completed!").len(),
            1,
            "{context}"
        );
        assert_eq!(
            run.serving_version(10).await?,
            NEW,
            "the primary serves v{NEW}"
        );

        // The token stays in the state folder: seeing it again retries nothing.
        run.step_for(Duration::from_secs(2)).await;
        assert_eq!(run.messages_with("Retrying").len(), 1, "{}", run.describe());
        run.shutdown().await;
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_fixing_the_cause_counts_only_the_new_attempt_and_is_promoted() {
    bounded(Duration::from_secs(100), async {
        // Metric windows far longer than the whole first attempt: a window that reached back
        // past the retry would still hold the failed attempt's errors.
        let canary = CanaryFile {
            threshold: 2,
            window: "30s".to_owned(),
            ..CanaryFile::default()
        };
        let mut run = initialized("retry_after_fix", &canary, RATE).await?;
        let traffic = |run: &LocalRun, errors: bool| {
            if let Some(traffic) = run.traffic() {
                traffic.set_errors(errors);
            }
        };

        // The cause: every other request asks for a 500, so the new version fails.
        traffic(&run, true);
        run.set_version(NEW, &[])?;
        run.step_until("the version fails", ROLLOUT, is(Phase::Failed))
            .await?;
        let failed_events = run.events().len();
        // The fix, then the retry of the same version.
        traffic(&run, false);
        request_retry(run.state()).map_err(anyhow::Error::msg)?;
        run.step_until(
            "the retried version is promoted or fails again",
            ROLLOUT,
            |s| s.retry.count == 1 && matches!(s.phase, Some(Phase::Succeeded | Phase::Failed)),
        )
        .await?;

        let context = run.describe();
        assert_eq!(
            run.status().phase,
            Some(Phase::Succeeded),
            "every request after the fix succeeded, so the retry must be promoted: {context}"
        );
        let second: Vec<String> = run.events()[failed_events..]
            .iter()
            .map(|e| e.event.message.clone())
            .collect();
        assert!(
            second
                .iter()
                .all(|m| !m.contains("advancement success rate")),
            "no check of the retry saw the failed attempt's errors: {context}"
        );
        assert!(
            second
                .iter()
                .all(|m| !m.contains("requests in 30s from streamed")),
            "each check of the retry counts only its own step, never the whole 30s: {context}"
        );
        assert_eq!(
            run.serving_version(10).await?,
            NEW,
            "the primary serves v{NEW}"
        );
        run.shutdown().await;
        Ok(())
    })
    .await;
}

/// Kills a process's whole group (the demo's Envoy and app processes too) when dropped.
struct GroupGuard(Child);

impl Drop for GroupGuard {
    fn drop(&mut self) {
        let group = format!("-{}", self.0.id());
        let _ = Command::new("kill")
            .args(["-KILL", "--", &group])
            .stderr(Stdio::null())
            .status();
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn weir_demo_runs_the_tutorials_experiments_and_exits_zero() {
    const LIMIT: Duration = Duration::from_secs(150);
    let weir = weir_binary();
    let dir = WorkDir::new("weir_demo_cli").unwrap_or_else(|e| panic!("no work dir: {e}"));
    let output_path = dir.path().join("demo.out");
    let output = std::fs::File::create(&output_path)
        .unwrap_or_else(|e| panic!("cannot create {}: {e}", output_path.display()));
    let errors = output
        .try_clone()
        .unwrap_or_else(|e| panic!("cannot share {}: {e}", output_path.display()));
    // The demo's workloads run `mirror`, found next to `weir` or on PATH.
    let mirror_dir = binaries::mirror()
        .parent()
        .map(|p| p.to_path_buf())
        .unwrap_or_default();
    let path = std::env::join_paths(std::iter::once(mirror_dir).chain(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_default(),
    )))
    .unwrap_or_else(|e| panic!("cannot build PATH: {e}"));
    let child = Command::new(&weir)
        .arg("demo")
        .arg("--state")
        .arg(dir.path())
        .arg("--envoy")
        .arg(binaries::envoy())
        .arg("--wasm")
        .arg(binaries::wasm())
        .env("PATH", path)
        .stdin(Stdio::null())
        .stdout(output)
        .stderr(errors)
        .process_group(0)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", weir.display()));
    let mut guard = GroupGuard(child);
    let started = Instant::now();
    let status = loop {
        if let Some(status) = guard.0.try_wait().unwrap_or(None) {
            break Some(status);
        }
        if started.elapsed() > LIMIT {
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let printed = std::fs::read_to_string(&output_path).unwrap_or_default();
    let tail: Vec<&str> = printed.lines().rev().take(40).collect::<Vec<_>>();
    let tail = tail.into_iter().rev().collect::<Vec<_>>().join("\n");
    let Some(status) = status else {
        panic!("`weir demo` did not finish within {LIMIT:?}; its last lines:\n{tail}");
    };
    assert!(
        status.success(),
        "`weir demo` exits 0, got {status}; its last lines:\n{tail}"
    );
    assert!(
        printed.contains("All experiments ended as expected."),
        "`weir demo` says every experiment ended as expected; its last lines:\n{tail}"
    );
    // The judge's two experiments: client-requested 500s on both versions pass the judge, and
    // a canary failing on its own is rolled back on the judge's evidence.
    assert!(
        printed.contains("judge pass: canary failure rate")
            && printed.contains("Rolling back mhs.application: canary failure rate"),
        "the demo shows the judge passing experiment 2's canary and rolling back a failing one:\n{tail}"
    );
    assert!(
        printed.contains("Promotion completed!") && printed.contains("Rolling back"),
        "the demo shows a promotion and a rollback:\n{tail}"
    );
}
