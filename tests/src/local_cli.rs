//! `weir local` as a user runs it: the real binary (`WEIR_BIN`) in its own process, with its
//! output in a file, signalled with real signals, and its processes (Envoy, the app versions,
//! whatever else it starts) seen through `/proc`, independently of what Weir records about them.
//!
//! Dropping a [`WeirLocal`] kills its process group and every descendant it was seen with, so a
//! failing test leaves nothing running.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::binaries;
use crate::local::{mirror_workload, weir_binary, CanaryFile, TARGET};
use crate::workdir::WorkDir;

/// A process seen in `/proc`: its pid and start time (so a reused pid is not taken for it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeenProcess {
    /// The pid.
    pub pid: u32,
    /// The parent's pid when it was seen.
    pub ppid: u32,
    /// Start time in clock ticks since boot (`/proc/<pid>/stat`, field 22).
    pub start_time: u64,
    /// The command name (`/proc/<pid>/comm`, e.g. `envoy`, `mirror`, `sh`).
    pub name: String,
}

impl SeenProcess {
    /// The process with this pid, if it runs (a zombie does not: it is dead, only not reaped).
    pub fn read(pid: u32) -> Option<Self> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let (head, rest) = stat.rsplit_once(')')?;
        let name = head.split_once('(')?.1.to_owned();
        let fields: Vec<&str> = rest.split_whitespace().collect();
        if matches!(fields.first(), Some(&("Z" | "X" | "x"))) {
            return None;
        }
        Some(Self {
            pid,
            ppid: fields.get(1)?.parse().ok()?,
            start_time: fields.get(19)?.parse().ok()?,
            name,
        })
    }

    /// Whether this very process still runs.
    pub fn is_running(&self) -> bool {
        Self::read(self.pid).is_some_and(|now| now.start_time == self.start_time)
    }

    /// Sends `signal` (`TERM`, `KILL`, ...) to it, if it still runs.
    pub fn signal(&self, signal: &str) {
        if self.is_running() {
            send_signal(self.pid, signal);
        }
    }
}

/// Every running process whose parent, grandparent, ... is `root`.
pub fn descendants(root: u32) -> Vec<SeenProcess> {
    let all: Vec<SeenProcess> = std::fs::read_dir("/proc")
        .map(|entries| {
            entries
                .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
                .filter_map(SeenProcess::read)
                .collect()
        })
        .unwrap_or_default();
    let mut found: Vec<SeenProcess> = Vec::new();
    let mut parents = vec![root];
    while let Some(parent) = parents.pop() {
        for process in all.iter().filter(|p| p.ppid == parent) {
            if !found.iter().any(|f| f.pid == process.pid) {
                parents.push(process.pid);
                found.push(process.clone());
            }
        }
    }
    found
}

/// `kill -s <signal> <pid>`.
pub fn send_signal(pid: u32, signal: &str) {
    let _ = Command::new("kill")
        .args(["-s", signal, &pid.to_string()])
        .stderr(Stdio::null())
        .status();
}

/// Waits (at most `limit`) until none of `processes` runs; the ones still running otherwise.
pub fn wait_gone(processes: &[SeenProcess], limit: Duration) -> Vec<SeenProcess> {
    let deadline = Instant::now() + limit;
    loop {
        let running: Vec<SeenProcess> = processes
            .iter()
            .filter(|p| p.is_running())
            .cloned()
            .collect();
        if running.is_empty() || Instant::now() >= deadline {
            return running;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The files of one local setup: a Canary, a workloads folder and a state folder.
pub struct LocalFiles {
    dir: WorkDir,
}

impl LocalFiles {
    /// The tests' Canary ([`CanaryFile`]) and a workload running `mirror` as `version`.
    pub fn new(test: &str, canary: &CanaryFile, version: &str) -> anyhow::Result<Self> {
        Self::with_workload(test, canary, &mirror_workload(version, &[]))
    }

    /// The tests' Canary and the workload file `workload`.
    pub fn with_workload(test: &str, canary: &CanaryFile, workload: &str) -> anyhow::Result<Self> {
        let dir = WorkDir::new(test)?;
        std::fs::create_dir_all(dir.path().join("workloads"))?;
        std::fs::write(dir.path().join("canary.yaml"), canary.to_yaml())?;
        let files = Self { dir };
        files.set_workload(workload)?;
        Ok(files)
    }

    /// Rewrites the workload file.
    pub fn set_workload(&self, text: &str) -> anyhow::Result<()> {
        let path = self.workloads().join(format!("{TARGET}.yaml"));
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))
    }

    /// The folder everything is in.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The Canary file.
    pub fn canary(&self) -> PathBuf {
        self.dir.path().join("canary.yaml")
    }

    /// The workloads folder.
    pub fn workloads(&self) -> PathBuf {
        self.dir.path().join("workloads")
    }

    /// The default state folder.
    pub fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// The phase in `<state>/status.json`, if there is one.
    pub fn phase(&self, state: &Path) -> Option<String> {
        let text = std::fs::read_to_string(state.join("status.json")).ok()?;
        let status: serde_json::Value = serde_json::from_str(&text).ok()?;
        status["phase"].as_str().map(str::to_owned)
    }
}

/// One `weir local` process.
pub struct WeirLocal {
    child: Child,
    output: PathBuf,
    /// Every descendant seen so far: killed on drop, whatever the test did.
    seen: Vec<SeenProcess>,
    status: Option<ExitStatus>,
}

impl WeirLocal {
    /// Starts `weir local` on `files` with `state` and Envoy's listener on `port` (0: any free
    /// port), filters reporting every 250ms; `name` names its output file.
    pub fn start(files: &LocalFiles, state: &Path, port: u16, name: &str) -> anyhow::Result<Self> {
        Self::start_with_env(files, state, port, name, &[])
    }

    /// [`WeirLocal::start`] with these environment variables set (`WEIR_CA_FILE`, ...).
    pub fn start_with_env(
        files: &LocalFiles,
        state: &Path,
        port: u16,
        name: &str,
        env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        let output = files.dir().join(format!("{name}.out"));
        let out = std::fs::File::create(&output)
            .with_context(|| format!("cannot create {}", output.display()))?;
        let err = out.try_clone()?;
        let weir = weir_binary();
        let child = Command::new(&weir)
            .arg("local")
            .arg("--canary")
            .arg(files.canary())
            .arg("--workloads")
            .arg(files.workloads())
            .arg("--state")
            .arg(state)
            .args(["--port", &port.to_string(), "--report-interval", "250ms"])
            .arg("--envoy")
            .arg(binaries::envoy())
            .arg("--wasm")
            .arg(binaries::wasm())
            // Errors as a user reads them, without a backtrace.
            .env("RUST_BACKTRACE", "0")
            .env_remove("RUST_LIB_BACKTRACE")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            // Its own group, so that cleaning up after a failed test reaches what it started
            // in its group; signals in the tests go to the weir process alone, as `kill` does.
            .process_group(0)
            .spawn()
            .with_context(|| format!("cannot run {}", weir.display()))?;
        Ok(Self {
            child,
            output,
            seen: Vec::new(),
            status: None,
        })
    }

    /// The weir process's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything it printed so far.
    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.output).unwrap_or_default()
    }

    /// Whether it has exited (and how); reaps it.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }

    /// Waits (at most `limit`) until it prints `needle`; an error, with its output, if it
    /// exits first or the time runs out.
    pub fn wait_for_output(&mut self, needle: &str, limit: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            self.remember_descendants();
            if self.output().contains(needle) {
                return Ok(());
            }
            if let Some(status) = self.exited() {
                bail!(
                    "`weir local` exited ({status}) before printing {needle:?}; it printed:\n{}",
                    self.output()
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "`weir local` did not print {needle:?} within {limit:?}; it printed:\n{}",
                    self.output()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits (at most `limit`) until `ready` holds, checking every 50ms; an error, with its
    /// output, if it exits first or the time runs out.
    pub fn wait_until(
        &mut self,
        what: &str,
        limit: Duration,
        ready: impl Fn(&Self) -> bool,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            self.remember_descendants();
            if ready(self) {
                return Ok(());
            }
            if let Some(status) = self.exited() {
                bail!(
                    "`weir local` exited ({status}) before {what}; it printed:\n{}",
                    self.output()
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "not {what} within {limit:?}; `weir local` printed:\n{}",
                    self.output()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits (at most `limit`) for it to exit.
    pub fn wait_exit(&mut self, limit: Duration) -> anyhow::Result<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.exited() {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                bail!(
                    "`weir local` (pid {}) did not exit within {limit:?}; it printed:\n{}",
                    self.pid(),
                    self.output()
                );
            }
            self.remember_descendants();
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Its running descendants now (and remembers them for the clean-up).
    pub fn descendants(&mut self) -> Vec<SeenProcess> {
        let now = descendants(self.pid());
        for process in &now {
            if !self.seen.contains(process) {
                self.seen.push(process.clone());
            }
        }
        now
    }

    fn remember_descendants(&mut self) {
        if self.status.is_none() {
            self.descendants();
        }
    }

    /// Sends `signal` (`INT`, `TERM`, `KILL`, ...) to the weir process alone.
    pub fn signal(&mut self, signal: &str) {
        self.remember_descendants();
        if self.exited().is_none() {
            send_signal(self.pid(), signal);
        }
    }
}

impl Drop for WeirLocal {
    fn drop(&mut self) {
        if self.exited().is_none() {
            // What it started since the last look (a primary started after the test's last
            // wait), while they are still its descendants.
            self.descendants();
            send_signal(self.pid(), "KILL");
            let _ = Command::new("kill")
                .args(["-s", "KILL", "--", &format!("-{}", self.pid())])
                .stderr(Stdio::null())
                .status();
        }
        let _ = self.child.wait();
        // Its watchdog empties its group within about a second (a child being forked as weir
        // died joins that group a moment later, unseen here): let it, then kill what is left.
        let watchdogs: Vec<SeenProcess> = self
            .seen
            .iter()
            .filter(|p| p.name == "sh")
            .cloned()
            .collect();
        wait_gone(&watchdogs, Duration::from_secs(3));
        for process in &self.seen {
            process.signal("KILL");
        }
    }
}
