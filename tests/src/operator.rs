//! The operator's CLI as a user runs it: `weir status`, `weir promote`, ... (the real binary,
//! `WEIR_BIN`) against a state folder, and `weir watch` in a real terminal (tmux, a private
//! server per test, killed on drop).

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::local::weir_binary;

/// What a `weir` command printed (stdout then stderr) and whether it succeeded.
#[derive(Debug, Clone)]
pub struct Printed {
    /// Its exit code (`None`: killed by a signal).
    pub code: Option<i32>,
    /// stdout, then stderr.
    pub text: String,
}

impl Printed {
    fn of(output: Output) -> Self {
        let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&output.stderr));
        Self {
            code: output.status.code(),
            text,
        }
    }
}

/// Starts `weir <args>` with `USER=<user>` (not waited for: the verbs wait for the controller,
/// which the test steps meanwhile).
pub fn spawn_weir(args: &[&str], user: &str) -> anyhow::Result<tokio::process::Child> {
    tokio::process::Command::new(weir_binary())
        .args(args)
        .env("USER", user)
        .env("RUST_BACKTRACE", "0")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("cannot run the weir binary")
}

/// Waits (at most `limit`) for a spawned `weir` and returns what it printed.
pub async fn finished(child: tokio::process::Child, limit: Duration) -> anyhow::Result<Printed> {
    match tokio::time::timeout(limit, child.wait_with_output()).await {
        Ok(output) => Ok(Printed::of(output?)),
        Err(_) => bail!("the weir command did not finish within {limit:?}"),
    }
}

/// Runs `weir <args>` to the end (for commands that do not wait for the controller).
pub fn run_weir(args: &[&str]) -> anyhow::Result<Printed> {
    let output = Command::new(weir_binary())
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .stdin(Stdio::null())
        .output()
        .context("cannot run the weir binary")?;
    Ok(Printed::of(output))
}

/// tmux: `WEIR_TMUX`, else on PATH. Missing, the test fails and says how to get it.
pub fn tmux_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("WEIR_TMUX") {
        return PathBuf::from(path);
    }
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("tmux"))
            .find(|p| p.is_file())
    });
    found.unwrap_or_else(|| {
        panic!(
            "tmux is not installed, and the `weir watch` test draws in a real terminal with it: run `cargo xtask setup` (it installs the Debian package tmux), or install tmux, or set WEIR_TMUX"
        )
    })
}

/// A command running in a detached tmux window of `width` x `height`, on a tmux server of its
/// own (killed on drop with everything in it).
pub struct Terminal {
    tmux: PathBuf,
    socket: String,
}

impl Terminal {
    /// Starts `command` (argv) in `dir`.
    pub fn start(
        name: &str,
        dir: &Path,
        command: &[String],
        width: u16,
        height: u16,
    ) -> anyhow::Result<Self> {
        let tmux = tmux_binary();
        let socket = format!("weir-test-{name}-{}", std::process::id());
        let status = Command::new(&tmux)
            .args(["-L", &socket, "-f", "/dev/null", "new-session", "-d"])
            .args(["-x", &width.to_string(), "-y", &height.to_string()])
            .arg("-c")
            .arg(dir)
            .args(command)
            .env_remove("TMUX")
            .status()
            .with_context(|| format!("cannot run {}", tmux.display()))?;
        anyhow::ensure!(status.success(), "tmux new-session failed: {status}");
        Ok(Self { tmux, socket })
    }

    /// What the window shows now (`capture-pane -p`).
    pub fn screen(&self) -> String {
        Command::new(&self.tmux)
            .args(["-L", &self.socket, "capture-pane", "-p"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    }

    /// Types `keys` (tmux key names, like `C-c`).
    pub fn send_keys(&self, keys: &str) {
        let _ = Command::new(&self.tmux)
            .args(["-L", &self.socket, "send-keys", keys])
            .status();
    }

    /// Waits (at most `limit`) until the screen satisfies `ready`; the last screen otherwise.
    pub async fn wait_for(
        &self,
        what: &str,
        limit: Duration,
        ready: impl Fn(&str) -> bool,
    ) -> anyhow::Result<String> {
        let deadline = Instant::now() + limit;
        loop {
            let screen = self.screen();
            if ready(&screen) {
                return Ok(screen);
            }
            if Instant::now() >= deadline {
                bail!("the terminal did not show {what} within {limit:?}; it shows:\n{screen}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Terminal {
    fn drop(&mut self) {
        let _ = Command::new(&self.tmux)
            .args(["-L", &self.socket, "kill-server"])
            .stderr(Stdio::null())
            .status();
    }
}
