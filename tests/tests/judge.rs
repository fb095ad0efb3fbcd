//! The comparative judge end to end (issue 11): local mode in this process with a real Envoy,
//! the Weir filter and `mirror` processes, the demo's two judge experiments. Each test has its
//! own state folder, is bounded in time, and stops what it started.

use std::future::Future;
use std::time::Duration;

use weir_controller::spec::{CanaryStatus, Phase};
use weir_e2e::local::{CanaryFile, LocalRun};

const INIT: Duration = Duration::from_secs(30);

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

/// The test Canary with the judge in place of the fixed success-rate check.
fn judged(interval: &str, step_weight: u32) -> CanaryFile {
    CanaryFile {
        interval: interval.to_owned(),
        step_weight,
        success_rate_min: None,
        analysis_extra: "    judge: {confidence: 0.99}\n".to_owned(),
        ..CanaryFile::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_requested_500s_on_both_versions_do_not_roll_back_a_judged_canary_and_each_step_says_why(
) {
    bounded(Duration::from_secs(120), async {
        let mut run = LocalRun::start("judge_both_fail", &judged("1s", 10), "1.0.0").await?;
        run.step_until("the primary is initialized", INIT, is(Phase::Initialized))
            .await?;
        run.start_traffic(100);
        // Every other request asks for a 500, whichever version serves it.
        if let Some(traffic) = run.traffic() {
            traffic.set_errors(true);
        }
        run.set_version("1.0.1", &[])?;
        run.step_until(
            "the canary is promoted",
            Duration::from_secs(60),
            is(Phase::Succeeded),
        )
        .await?;
        assert!(
            run.messages_with("Rolling back").is_empty(),
            "{}",
            run.describe()
        );
        let advances = run.messages_with("Advance mhs.application canary weight");
        assert!(!advances.is_empty(), "{}", run.describe());
        for advance in &advances {
            assert!(
                advance.contains("; judge ") || advance.contains("(judge "),
                "every advance carries the judge's verdict: {advance}"
            );
        }
        // Past the first step the judge has seen both versions fail about half their requests.
        let last = advances.last().cloned().unwrap_or_default();
        assert!(last.contains("vs primary"), "{last}");
        let decision = run
            .status()
            .decisions
            .iter()
            .rev()
            .find_map(|d| d.judge.clone())
            .expect("the judge's verdicts are in the decision history");
        assert!(
            decision.canary_failures > 0 && decision.primary_failures > 0,
            "{decision:?}"
        );
        assert_ne!(decision.verdict, "fail");
        assert_eq!(run.serving_version(5).await?, "1.0.1");
        run.shutdown().await;
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_failing_on_its_own_at_low_traffic_is_rolled_back_by_the_judge_before_the_next_step(
) {
    bounded(Duration::from_secs(120), async {
        // A long interval: a rollback before the second step can only be the judge's, between
        // intervals. At weight 50 of 40 requests per second the canary gets about 20 a second.
        let mut run = LocalRun::start("judge_own_failure", &judged("20s", 50), "1.0.0").await?;
        run.step_until("the primary is initialized", INIT, is(Phase::Initialized))
            .await?;
        run.start_traffic(40);
        run.set_version("1.0.1", &["--error-rate", "0.5"])?;
        run.step_until(
            "the canary is rolled back",
            Duration::from_secs(80),
            is(Phase::Failed),
        )
        .await?;
        let events = run.events();
        let rollback = events
            .iter()
            .find(|e| {
                e.event
                    .message
                    .starts_with("Rolling back mhs.application: canary failure rate")
            })
            .unwrap_or_else(|| panic!("the judge rolled back:\n{}", run.describe()));
        assert!(
            rollback
                .event
                .message
                .contains("(sequential test, 99% confidence, "),
            "{}",
            rollback.event.message
        );
        let advance = events
            .iter()
            .find(|e| {
                e.event
                    .message
                    .starts_with("Advance mhs.application canary weight 50")
            })
            .unwrap_or_else(|| panic!("the canary got traffic:\n{}", run.describe()));
        let reaction = rollback.time.since(advance.time);
        println!(
            "rolled back {reaction:?} after the canary got traffic: {}",
            rollback.event.message
        );
        assert!(
            reaction < Duration::from_secs(20),
            "rolled back within the step ({reaction:?}), not at the next interval"
        );
        assert!(
            run.messages_with("failed checks threshold").is_empty(),
            "{}",
            run.describe()
        );
        assert_eq!(run.serving_version(5).await?, "1.0.0");
        run.shutdown().await;
        Ok(())
    })
    .await;
}
