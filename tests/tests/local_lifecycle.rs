//! `weir local`'s life as a user lives it (issue 9): the real binary started, stopped with real
//! signals and started again on its state folder, its Envoy and app processes checked in
//! `/proc`. Every wait is bounded; every process started is killed at the end, whatever
//! happened (see `weir_e2e::local_cli`).

use std::time::Duration;

use weir_e2e::local::CanaryFile;
use weir_e2e::local_cli::{wait_gone, LocalFiles, SeenProcess, WeirLocal};

/// Envoy (with the .wasm) and the first primary start within this on a loaded machine.
const START: Duration = Duration::from_secs(60);
/// An orderly stop: Envoy and the app processes killed and reaped.
const STOP: Duration = Duration::from_secs(20);
const LISTENING: &str = "weir local: send traffic to http://";

/// Starts `weir local` and waits until it serves with the primary initialized; returns it with
/// its descendants (Envoy, the primary, and whatever else it started) as seen then.
fn initialized(files: &LocalFiles, name: &str) -> anyhow::Result<(WeirLocal, Vec<SeenProcess>)> {
    let state = files.state();
    let mut weir = WeirLocal::start(files, &state, 0, name)?;
    weir.wait_for_output(LISTENING, START)?;
    weir.wait_until("Initialized", START, |_| {
        files.phase(&state).as_deref() == Some("Initialized")
    })?;
    let processes = weir.descendants();
    let names: Vec<&str> = processes.iter().map(|p| p.name.as_str()).collect();
    anyhow::ensure!(
        names.contains(&"envoy") && names.contains(&"mirror"),
        "`weir local` runs Envoy and the primary: {processes:?}"
    );
    Ok((weir, processes))
}

fn check(result: anyhow::Result<()>) {
    if let Err(e) = result {
        panic!("{e:#}");
    }
}

#[test]
fn weir_local_starts_again_on_its_state_folder_after_ctrl_c() {
    check((|| {
        let files = LocalFiles::new("restart_after_ctrl_c", &CanaryFile::default(), "1.0.0")?;
        let (mut first, _) = initialized(&files, "first")?;
        first.signal("INT");
        let status = first.wait_exit(STOP)?;
        anyhow::ensure!(status.success(), "Ctrl-C is a normal stop: {status}");

        // The first run's Envoy wrote its admin address into the state folder; the second
        // Envoy must be asked at its own.
        let mut second = WeirLocal::start(&files, &files.state(), 0, "second")?;
        second.wait_for_output(LISTENING, START)?;
        second.signal("INT");
        second.wait_exit(STOP)?;
        Ok(())
    })());
}

#[test]
fn sigterm_stops_weir_local_and_every_process_it_started() {
    check((|| {
        let files = LocalFiles::new("sigterm", &CanaryFile::default(), "1.0.0")?;
        let (mut weir, processes) = initialized(&files, "weir")?;
        weir.signal("TERM");
        let status = weir.wait_exit(STOP)?;
        let running = wait_gone(&processes, Duration::from_secs(5));
        anyhow::ensure!(
            running.is_empty(),
            "still running after weir local stopped ({status}): {running:?}"
        );
        let output = weir.output();
        anyhow::ensure!(
            status.success() && output.contains("SIGTERM: stopping"),
            "SIGTERM stops weir local as Ctrl-C does ({status}):\n{output}"
        );
        Ok(())
    })());
}

#[test]
fn sigkill_of_weir_local_takes_its_envoy_and_app_processes_with_it() {
    check((|| {
        let files = LocalFiles::new("sigkill", &CanaryFile::default(), "1.0.0")?;
        let (mut weir, processes) = initialized(&files, "weir")?;
        // SIGKILL runs no code in weir: what stops its processes must be outside it.
        weir.signal("KILL");
        weir.wait_exit(STOP)?;
        let running = wait_gone(&processes, Duration::from_secs(10));
        anyhow::ensure!(
            running.is_empty(),
            "still running 10s after weir local was killed: {running:?}"
        );
        Ok(())
    })());
}

#[test]
fn a_second_weir_local_on_a_state_folder_in_use_is_refused() {
    check((|| {
        let files = LocalFiles::new("state_in_use", &CanaryFile::default(), "1.0.0")?;
        let (first, processes) = initialized(&files, "first")?;
        let mut second = WeirLocal::start(&files, &files.state(), 0, "second")?;
        let status = second.wait_exit(START)?;
        let output = second.output();
        let pid = first.pid();
        anyhow::ensure!(
            !status.success()
                && output.contains(&format!("in use by a running controller: pid {pid}"))
                && output.contains(&format!("`kill {pid}`"))
                && !output.contains(LISTENING),
            "the second controller refuses, naming the first and how to stop it ({status}):\n{output}"
        );
        let envoy = processes.iter().find(|p| p.name == "envoy");
        anyhow::ensure!(
            envoy.is_some_and(|envoy| output.contains(&format!("envoy (pid {})", envoy.pid))),
            "the refusal names the Envoy that runs: {output}"
        );
        let stopped: Vec<&SeenProcess> = processes.iter().filter(|p| !p.is_running()).collect();
        anyhow::ensure!(
            stopped.is_empty(),
            "the refused controller touched nothing of the first: {stopped:?} stopped"
        );
        Ok(())
    })());
}

#[test]
fn processes_left_running_on_a_state_folder_are_named_and_refused() {
    check((|| {
        let files = LocalFiles::new("left_over", &CanaryFile::default(), "1.0.0")?;
        let (mut first, processes) = initialized(&files, "first")?;
        // Leftovers as an older weir, or a kill of everything but Envoy and the app, would
        // leave them: the watchdog (if there is one) killed first, then weir itself.
        for watchdog in processes.iter().filter(|p| p.name == "sh") {
            watchdog.signal("KILL");
        }
        first.signal("KILL");
        first.wait_exit(STOP)?;
        let left: Vec<&SeenProcess> = processes
            .iter()
            .filter(|p| p.name != "sh" && p.is_running())
            .collect();
        anyhow::ensure!(!left.is_empty(), "nothing was left running: {processes:?}");

        let mut second = WeirLocal::start(&files, &files.state(), 0, "second")?;
        let status = second.wait_exit(START)?;
        let output = second.output();
        anyhow::ensure!(
            !status.success()
                && output.contains(&format!(
                    "processes left by a controller that is gone (pid {})",
                    first.pid()
                ))
                && !output.contains(LISTENING),
            "the second controller refuses the leftovers ({status}):\n{output}"
        );
        for process in &left {
            anyhow::ensure!(
                output.contains(&format!("(pid {})", process.pid)),
                "the refusal names {process:?}: {output}"
            );
        }
        Ok(())
    })());
}

#[test]
fn sigint_during_a_long_step_stops_weir_local_without_waiting_for_the_step() {
    check((|| {
        // A primary that never listens: the initializing step waits 30s for it to be ready.
        let files = LocalFiles::with_workload(
            "sigint_mid_step",
            &CanaryFile::default(),
            "command: /bin/sleep\nargs: [\"600\"]\n",
        )?;
        let mut weir = WeirLocal::start(&files, &files.state(), 0, "weir")?;
        weir.wait_for_output(LISTENING, START)?;
        weir.wait_until("the primary is started", START, |w| {
            descendants_named(w.pid(), "sleep")
        })?;
        let primary: Vec<SeenProcess> = weir
            .descendants()
            .into_iter()
            .filter(|p| p.name == "sleep")
            .collect();
        weir.signal("INT");
        // Well inside the step's 30s: the signal is acted on during the step, not after it.
        let status = weir.wait_exit(Duration::from_secs(15))?;
        let output = weir.output();
        anyhow::ensure!(
            status.success()
                && output.contains("SIGINT: stopping")
                && !output.contains("not ready after 30s"),
            "SIGINT ends the step where it is ({status}):\n{output}"
        );
        let running = wait_gone(&primary, Duration::from_secs(5));
        anyhow::ensure!(running.is_empty(), "the primary still runs: {running:?}");
        Ok(())
    })());
}

fn descendants_named(pid: u32, name: &str) -> bool {
    weir_e2e::local_cli::descendants(pid)
        .iter()
        .any(|p| p.name == name)
}

#[test]
fn weir_local_refuses_a_port_another_envoy_listens_on() {
    check((|| {
        let files = LocalFiles::new("port_in_use", &CanaryFile::default(), "1.0.0")?;
        let port = weir_e2e::free_port()?;
        let mut first = WeirLocal::start(&files, &files.state(), port, "first")?;
        first.wait_for_output(LISTENING, START)?;
        // Another state folder, the same port: Envoys bind with SO_REUSEPORT, so the second
        // would share the port with the first (each getting some of the connections).
        let mut second =
            WeirLocal::start(&files, &files.dir().join("other-state"), port, "second")?;
        let status = second.wait_exit(START)?;
        let output = second.output();
        anyhow::ensure!(
            !status.success()
                && output.contains(&format!(
                    "port {port} on 127.0.0.1, for Envoy's listener, is in use"
                ))
                && output.contains("choose another --port")
                && !output.contains(LISTENING),
            "the second weir local refuses the port ({status}):\n{output}"
        );
        Ok(())
    })());
}

#[test]
fn weir_local_refuses_a_port_any_program_listens_on() {
    check((|| {
        let files = LocalFiles::new("port_taken", &CanaryFile::default(), "1.0.0")?;
        let taken = std::net::TcpListener::bind("127.0.0.1:0")?;
        let port = taken.local_addr()?.port();
        let mut weir = WeirLocal::start(&files, &files.state(), port, "weir")?;
        let status = weir.wait_exit(START)?;
        let output = weir.output();
        anyhow::ensure!(
            !status.success()
                && output.contains(&format!(
                    "port {port} on 127.0.0.1, for Envoy's listener, is in use"
                ))
                && output.contains("choose another --port"),
            "weir local refuses the port before starting anything ({status}):\n{output}"
        );
        anyhow::ensure!(
            !files.state().join("envoy-0.log").exists(),
            "no Envoy was started: {output}"
        );
        Ok(())
    })());
}

/// Runs `weir retry --state <state>`; its exit status and everything it printed.
fn weir_retry(state: &std::path::Path) -> anyhow::Result<(std::process::ExitStatus, String)> {
    let output = std::process::Command::new(weir_e2e::local::weir_binary())
        .arg("retry")
        .arg("--state")
        .arg(state)
        .env("RUST_BACKTRACE", "0")
        .stdin(std::process::Stdio::null())
        .output()?;
    let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&output.stderr));
    Ok((output.status, text))
}

#[test]
fn weir_retry_says_why_nothing_will_happen_and_exits_1() {
    check((|| {
        let files = LocalFiles::new("retry_refused", &CanaryFile::default(), "1.0.0")?;
        let state = files.state();
        std::fs::create_dir_all(&state)?;

        std::fs::write(state.join("status.json"), r#"{"phase":"Succeeded"}"#)?;
        let (status, output) = weir_retry(&state)?;
        anyhow::ensure!(
            status.code() == Some(1) && output.contains("is Succeeded, not Failed"),
            "a canary that is not Failed is not retried ({status}): {output}"
        );

        std::fs::write(state.join("status.json"), r#"{"phase":"Failed"}"#)?;
        let (status, output) = weir_retry(&state)?;
        anyhow::ensure!(
            status.code() == Some(1) && output.contains("no weir local runs on"),
            "without a controller nothing retries it ({status}): {output}"
        );
        anyhow::ensure!(
            !state.join("retry").exists(),
            "no request was left behind to fire at a later start"
        );
        Ok(())
    })());
}

#[test]
fn weir_retry_of_a_failed_canary_names_the_controller_that_retries_it() {
    check((|| {
        let files = LocalFiles::new("retry_requested", &CanaryFile::default(), "2.0.0")?;
        let state = files.state();
        std::fs::create_dir_all(&state)?;
        // A canary whose analysis of this very workload failed, as a rollback leaves it: the
        // primary runs the version promoted before (a retry waits for a ready primary).
        let workload = std::fs::read_to_string(files.workloads().join("mhs.yaml"))?;
        let parse = weir_controller::platform::local::workload::Workload::parse;
        let revision = parse("mhs", &workload)?.revision();
        let promoted = weir_e2e::local::mirror_workload("1.0.0", &[]);
        let promoted_revision = parse("mhs", &promoted)?.revision();
        std::fs::write(state.join("mhs.primary.yaml"), &promoted)?;
        std::fs::write(
            state.join("status.json"),
            format!(
                r#"{{"phase":"Failed","lastAppliedSpec":"{revision}","lastPromotedSpec":"{promoted_revision}"}}"#
            ),
        )?;
        let mut weir = WeirLocal::start(&files, &state, 0, "weir")?;
        weir.wait_for_output(LISTENING, START)?;

        let (status, output) = weir_retry(&state)?;
        anyhow::ensure!(
            status.success()
                && output.contains(&format!("(pid {}) retries the failed version", weir.pid())),
            "the request names the controller that acts on it ({status}): {output}"
        );
        weir.wait_for_output("Retrying mhs.application analysis as requested", START)?;
        weir.signal("INT");
        weir.wait_exit(STOP)?;
        Ok(())
    })());
}

#[test]
fn sigterm_during_the_start_up_stops_weir_local_and_what_it_started() {
    check((|| {
        // A state folder whose promoted primary never listens: the start-up itself brings it
        // back and waits 30s for it, before Envoy starts.
        let never_ready = "command: /bin/sleep\nargs: [\"600\"]\n";
        let files =
            LocalFiles::with_workload("sigterm_start_up", &CanaryFile::default(), never_ready)?;
        let state = files.state();
        std::fs::create_dir_all(&state)?;
        std::fs::write(state.join("mhs.primary.yaml"), never_ready)?;
        std::fs::write(state.join("status.json"), r#"{"phase":"Initialized"}"#)?;
        let mut weir = WeirLocal::start(&files, &state, 0, "weir")?;
        weir.wait_until("the primary is started", START, |w| {
            descendants_named(w.pid(), "sleep")
        })?;
        let started = weir.descendants();
        weir.signal("TERM");
        let status = weir.wait_exit(Duration::from_secs(15))?;
        let running = wait_gone(&started, Duration::from_secs(10));
        anyhow::ensure!(
            running.is_empty(),
            "still running after weir local stopped ({status}): {running:?}"
        );
        let output = weir.output();
        anyhow::ensure!(
            status.success() && output.contains("SIGTERM while starting; stopped"),
            "SIGTERM stops the start-up ({status}):\n{output}"
        );
        Ok(())
    })());
}
