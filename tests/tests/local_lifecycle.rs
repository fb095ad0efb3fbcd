//! `weir local`'s life as a user lives it (issue 9): the real binary started, stopped with real
//! signals and started again on its state folder, its Envoy and app processes checked in
//! `/proc`. Every wait is bounded; every process started is killed at the end, whatever
//! happened (see `weir_e2e::local_cli`).

use std::time::Duration;

use weir_e2e::local::CanaryFile;
use weir_e2e::local_cli::{LocalFiles, SeenProcess, WeirLocal};

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
