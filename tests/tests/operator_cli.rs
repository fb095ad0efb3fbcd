//! The operator's verbs on a running local-mode rollout (issue 12): the real `weir` binary
//! sends each request through the state folder while the controller (in this process, with a
//! real Envoy, the real filter and real app processes) runs the rollout; `weir watch` draws it
//! in a real terminal (tmux). Intervals of 1s keep every test within seconds.

use std::future::Future;
use std::time::Duration;

use weir_controller::spec::{CanaryStatus, PauseCause, Phase, Weight};
use weir_e2e::local::{CanaryFile, LocalRun};
use weir_e2e::operator::{finished, run_weir, spawn_weir, Terminal};

const OLD: &str = "1.0.0";
const NEW: &str = "2.0.0";
const INIT: Duration = Duration::from_secs(40);
const ROLLOUT: Duration = Duration::from_secs(30);
/// A verb waits this long at most for the controller (the test steps it meanwhile).
const VERB: Duration = Duration::from_secs(20);

async fn bounded<T>(limit: Duration, body: impl Future<Output = anyhow::Result<T>>) -> T {
    match tokio::time::timeout(limit, body).await {
        Ok(Ok(value)) => value,
        Ok(Err(e)) => panic!("{e:#}"),
        Err(_) => panic!("the test did not finish within {limit:?}"),
    }
}

/// A rollout of NEW under way at 10%, with traffic.
async fn progressing(test: &str, canary: &CanaryFile) -> anyhow::Result<LocalRun> {
    let mut run = LocalRun::start(test, canary, OLD).await?;
    run.step_until("the primary is initialized", INIT, |s| {
        s.phase == Some(Phase::Initialized)
    })
    .await?;
    run.start_traffic(100);
    run.set_version(NEW, &[])?;
    run.step_until("the canary is at 10%", ROLLOUT, |s| {
        s.canary_weight >= Weight::try_new(10).unwrap_or(Weight::ZERO)
    })
    .await?;
    Ok(run)
}

fn state_arg(run: &LocalRun) -> String {
    run.state().display().to_string()
}

/// Sends `verb` as `user`, stepping the controller until `done` holds, and returns what the
/// CLI printed.
async fn ask(
    run: &mut LocalRun,
    verb: &str,
    user: &str,
    what: &str,
    done: impl Fn(&CanaryStatus) -> bool,
) -> anyhow::Result<weir_e2e::operator::Printed> {
    let state = state_arg(run);
    let child = spawn_weir(&[verb, "--state", &state, "--wait", "20s"], user)?;
    run.step_until(what, VERB, done).await?;
    // The CLI sees the handled request at its next look (every 100ms).
    run.step_for(Duration::from_millis(300)).await;
    finished(child, VERB).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_holds_the_weight_while_measuring_then_resume_and_promote_finish_the_rollout() {
    bounded(Duration::from_secs(120), async {
        let mut run = progressing("operator_pause_resume_promote", &CanaryFile::default()).await?;

        let printed = ask(&mut run, "pause", "alice", "paused", |s| s.is_paused()).await?;
        anyhow::ensure!(
            printed.code == Some(0) && printed.text.contains("as requested by alice"),
            "weir pause says what it did: {printed:?}"
        );
        let held = run.status().canary_weight;
        let decisions = run.status().decisions.len();
        run.step_for(Duration::from_secs(3)).await;
        let status = run.status();
        anyhow::ensure!(
            status.canary_weight == held && status.phase == Some(Phase::Progressing),
            "the weight holds while paused\n{}",
            run.describe()
        );
        let measured = status.decisions[decisions.min(status.decisions.len())..]
            .iter()
            .filter(|d| !d.checks.is_empty())
            .count();
        anyhow::ensure!(
            measured >= 2,
            "the checks go on while paused\n{}",
            run.describe()
        );
        anyhow::ensure!(
            !run.messages_with("is paused at canary weight").is_empty(),
            "{}",
            run.describe()
        );

        // Asked again: nothing to do, and nothing sent.
        let again = run_weir(&["pause", "--state", &state_arg(&run)])?;
        anyhow::ensure!(
            again.code == Some(0) && again.text.contains("it is already paused"),
            "a second pause changes nothing: {again:?}"
        );

        let status_table = run_weir(&["status", "--state", &state_arg(&run)])?;
        anyhow::ensure!(
            status_table.code == Some(0)
                && status_table.text.contains("Progressing (paused by alice)")
                && status_table.text.contains("CANARY SR/P99/REQ")
                && status_table.text.contains("is paused at canary weight"),
            "weir status shows the pause and the last decision: {}",
            status_table.text
        );
        let canary_row = status_table.text.lines().nth(1).unwrap_or_default();
        anyhow::ensure!(
            canary_row.contains("100.00%"),
            "weir status shows live success rates: {}",
            status_table.text
        );

        let printed = ask(&mut run, "resume", "bob", "resumed and advanced", move |s| {
            !s.is_paused() && s.canary_weight > held
        })
        .await?;
        anyhow::ensure!(
            printed.code == Some(0) && printed.text.contains("Resumed mhs.application at canary weight"),
            "{printed:?}"
        );

        let printed = ask(&mut run, "promote", "carol", "promoted", |s| {
            s.phase == Some(Phase::Succeeded)
        })
        .await?;
        anyhow::ensure!(
            printed.code == Some(0)
                && printed
                    .text
                    .contains("Promotion of mhs.application requested by carol: skipping the rest of the analysis"),
            "{printed:?}"
        );
        let max = Weight::try_new(50)?;
        anyhow::ensure!(
            run.status().decisions.iter().all(|d| d.canary_weight <= max),
            "never above maxWeight"
        );
        let serving = run.serving_version(20).await?;
        anyhow::ensure!(serving == NEW, "the primary serves {NEW} after the promotion: {serving}");

        // Now it makes no sense: refused, exit status 1, nothing sent.
        let refused = run_weir(&["abort", "--state", &state_arg(&run)])?;
        anyhow::ensure!(
            refused.code == Some(1)
                && refused.text.contains("can be aborted, this one is Succeeded")
                && refused.text.contains("nothing was requested"),
            "{refused:?}"
        );
        run.shutdown().await;
        Ok(())
    })
    .await;
}

/// A rollout webhook that answers after `delay`, and says when a call arrives.
async fn slow_hook(
    delay: Duration,
) -> anyhow::Result<(u16, tokio::sync::mpsc::UnboundedReceiver<()>)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let (calls, called) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let calls = calls.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let _ = stream.read(&mut buf).await;
                let _ = calls.send(());
                tokio::time::sleep(delay).await;
                let _ = stream
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                    .await;
            });
        }
    });
    Ok((port, called))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_sent_while_the_controller_is_mid_step_rolls_back_right_after_that_step() {
    bounded(Duration::from_secs(120), async {
        let (port, mut called) = slow_hook(Duration::from_millis(1500)).await?;
        let canary = CanaryFile {
            analysis_extra: format!(
                "    webhooks:\n    - name: slow-check\n      type: rollout\n      url: http://127.0.0.1:{port}/\n      timeout: 5s\n"
            ),
            ..CanaryFile::default()
        };
        let mut run = progressing("operator_abort_mid_step", &canary).await?;
        while called.try_recv().is_ok() {}

        // The abort is sent while a step waits on the slow hook.
        let state = state_arg(&run);
        let sender = tokio::spawn(async move {
            called.recv().await;
            let child = spawn_weir(&["abort", "--state", &state, "--wait", "20s"], "dave")?;
            finished(child, VERB).await
        });
        run.step_until("rolled back", VERB, |s| s.phase == Some(Phase::Failed))
            .await?;
        run.step_for(Duration::from_millis(300)).await;
        let printed = sender.await??;
        anyhow::ensure!(
            printed.code == Some(0)
                && printed
                    .text
                    .contains("Rolling back mhs.application: abort requested by dave"),
            "{printed:?}"
        );
        let status = run.status();
        let decisions = &status.decisions;
        let abort = decisions
            .iter()
            .rposition(|d| d.events.iter().any(|e| e.message.contains("abort requested by dave")))
            .ok_or_else(|| anyhow::anyhow!("no abort decision\n{}", run.describe()))?;
        anyhow::ensure!(
            abort > 0
                && decisions[abort - 1]
                    .events
                    .iter()
                    .any(|e| e.message.contains("Advance") || e.message.contains("Halt")),
            "the step under way when the abort came was finished and kept\n{}",
            run.describe()
        );
        anyhow::ensure!(
            status.canary_weight == Weight::ZERO,
            "{}",
            run.describe()
        );
        let serving = run.serving_version(20).await?;
        anyhow::ensure!(serving == OLD, "traffic is back on {OLD}: {serving}");
        run.shutdown().await;
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_without_traffic_pauses_at_its_inconclusive_limit_and_waits_for_a_decision() {
    bounded(Duration::from_secs(120), async {
        let canary = CanaryFile {
            analysis_extra: "    inconclusiveLimit: 3\n".to_owned(),
            ..CanaryFile::default()
        };
        let mut run = LocalRun::start("operator_inconclusive_limit", &canary, OLD).await?;
        run.step_until("the primary is initialized", INIT, |s| {
            s.phase == Some(Phase::Initialized)
        })
        .await?;
        // No traffic at all: every check is Inconclusive.
        run.set_version(NEW, &[])?;
        run.step_until("paused by the inconclusive limit", ROLLOUT, |s| {
            s.paused
                .as_ref()
                .is_some_and(|p| p.cause == PauseCause::InconclusiveLimit)
        })
        .await?;
        let status = run.status();
        anyhow::ensure!(
            status.phase == Some(Phase::Progressing) && status.failed_checks == 0,
            "{}",
            run.describe()
        );
        let condition = status
            .conditions
            .iter()
            .find(|c| c.kind == "Paused")
            .ok_or_else(|| anyhow::anyhow!("no Paused condition\n{}", run.describe()))?;
        anyhow::ensure!(
            condition
                .message
                .starts_with("needs a decision: weir promote / weir abort"),
            "{condition:?}"
        );
        let announced = run.messages_with("needs a decision: weir promote / weir abort");
        anyhow::ensure!(announced.len() == 1, "said once: {announced:?}");
        let table = run_weir(&["status", "--state", &state_arg(&run)])?;
        anyhow::ensure!(
            table
                .text
                .contains("needs a decision: weir promote / weir abort"),
            "{}",
            table.text
        );

        let printed = ask(&mut run, "abort", "erin", "rolled back", |s| {
            s.phase == Some(Phase::Failed)
        })
        .await?;
        anyhow::ensure!(printed.code == Some(0), "{printed:?}");
        run.shutdown().await;
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weir_watch_redraws_phase_and_weight_in_place_in_a_terminal() {
    bounded(Duration::from_secs(120), async {
        let mut run = LocalRun::start("operator_watch", &CanaryFile::default(), OLD).await?;
        run.step_until("the primary is initialized", INIT, |s| {
            s.phase == Some(Phase::Initialized)
        })
        .await?;
        let command = vec![
            weir_e2e::local::weir_binary().display().to_string(),
            "watch".to_owned(),
            "--state".to_owned(),
            state_arg(&run),
            "--refresh".to_owned(),
            "200ms".to_owned(),
        ];
        let terminal = Terminal::start("watch", run.dir(), &command, 140, 45)?;
        terminal
            .wait_for("the Initialized phase", Duration::from_secs(10), |s| {
                s.contains("Phase:       Initialized")
            })
            .await?;

        run.start_traffic(100);
        run.set_version(NEW, &[])?;
        run.step_until("the canary at 20%", ROLLOUT, |s| {
            s.canary_weight >= Weight::try_new(20).unwrap_or(Weight::ZERO)
        })
        .await?;
        run.step_for(Duration::from_millis(400)).await;
        let weight = run.status().canary_weight;
        let screen = terminal
            .wait_for("the new phase and weight", Duration::from_secs(10), |s| {
                s.contains("Phase:       Progressing")
                    && s.contains(&format!("] {weight}% (max 50%)"))
            })
            .await?;
        anyhow::ensure!(
            screen.contains("Next step:")
                && screen.contains("primary")
                && screen.contains("canary"),
            "{screen}"
        );
        anyhow::ensure!(
            screen.matches("Phase:").count() == 1,
            "the view is redrawn in place, not appended:\n{screen}"
        );
        anyhow::ensure!(
            screen.contains("Advance mhs.application canary weight"),
            "the last events are shown:\n{screen}"
        );
        terminal.send_keys("C-c");
        run.shutdown().await;
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weir_watch_prints_plain_lines_when_not_on_a_terminal() {
    bounded(Duration::from_secs(120), async {
        let mut run = progressing("operator_watch_lines", &CanaryFile::default()).await?;
        let state = state_arg(&run);
        let mut child = spawn_weir(&["watch", "--state", &state, "--refresh", "200ms"], "frank")?;
        run.step_until("the canary at 30%", ROLLOUT, |s| {
            s.canary_weight >= Weight::try_new(30).unwrap_or(Weight::ZERO)
        })
        .await?;
        run.step_for(Duration::from_millis(500)).await;
        let _ = child.start_kill();
        let printed = finished(child, Duration::from_secs(10)).await?;
        anyhow::ensure!(
            !printed.text.contains('\x1b'),
            "no escape codes off a terminal: {:?}",
            printed.text
        );
        anyhow::ensure!(
            printed
                .text
                .contains("application/mhs Progressing weight 30%")
                && printed
                    .text
                    .contains("Advance mhs.application canary weight 30"),
            "one line per change and per event:\n{}",
            printed.text
        );
        run.shutdown().await;
        Ok(())
    })
    .await;
}
