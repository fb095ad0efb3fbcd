//! Local mode's processes live and die with their controller, and a state folder has one
//! controller at a time.
//!
//! **Dying with the controller.** Every process local mode starts (Envoy, each app version, and
//! whatever those start) runs in one process group whose leader is a watchdog: `/bin/sh`
//! blocked reading a pipe whose only writer is the controller. However the controller ends
//! (Ctrl-C, SIGTERM, a panic, SIGKILL, the OOM killer), the kernel closes its end of the pipe,
//! the watchdog's read returns, and it kills the whole group. An orderly shutdown stops the
//! processes itself first; the watchdog is what covers the endings that run no code.
//!
//! Why not `prctl(PR_SET_PDEATHSIG)`: it has to be set in the child between fork and exec
//! (`CommandExt::pre_exec`, which is `unsafe`, and the workspace forbids unsafe code; no
//! well-kept crate wraps it safely), and it fires when the *thread* that spawned the child
//! ends, not the process: Envoy is started from tokio's blocking pool, whose threads end after
//! ten idle seconds, which would kill a healthy Envoy. A pipe closes only when the process does.
//!
//! **One controller per state folder.** A controller holds an exclusive lock on
//! `<state>/controller.lock` for its life (the kernel drops it when the process ends, however it
//! ends), and keeps its pid and each child's pid, with its start time (so a reused pid is not
//! mistaken for it), in `<state>/processes.json`. [`ProcessGuard::claim`] refuses a folder that
//! is locked, or whose recorded children still run, naming them and saying how to stop them:
//! two Envoys on one port, or an app crash-looping on a port an orphan holds, are what a second
//! controller would get.

use std::io::Write as _;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// The record's file name in the state folder.
pub const RECORD_FILE: &str = "processes.json";
/// The file a running controller holds locked.
pub const LOCK_FILE: &str = "controller.lock";

/// The watchdog's script: wait for end-of-file on stdin (the controller's pipe), then empty the
/// process group it leads (`kill 0`: every process in the caller's group). SIGTERM first, ten
/// times over a second (the watchdog ignores it), then SIGKILL, itself included: a child the
/// controller was forking when it died joins the group a moment after the controller is gone,
/// and a single kill could come before it (the group outlives its killed members while they
/// are zombies, so that late child joins it without error).
const WATCHDOG_SCRIPT: &str = "trap '' TERM INT HUP; read -r line; \
    for i in 1 2 3 4 5 6 7 8 9 10; do kill -TERM 0; sleep 0.1; done; kill -KILL 0";

/// A process the record names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RecordedProcess {
    /// What it is to local mode: `controller`, `watchdog`, `envoy`, `mhs primary slot 0`, ...
    pub role: String,
    /// Its pid.
    pub pid: u32,
    /// When it started, in clock ticks since boot (`/proc/<pid>/stat`, field 22): a pid reused
    /// by another process has another start time.
    pub start_time: u64,
    /// Its command line, for people reading an error.
    #[serde(default)]
    pub command: String,
}

impl RecordedProcess {
    /// The process with this pid as it runs now, if it runs.
    pub fn running(role: &str, pid: u32) -> Option<Self> {
        Some(Self {
            role: role.to_owned(),
            pid,
            start_time: start_time(pid)?,
            command: command_line(pid),
        })
    }

    /// Whether this very process still runs (not merely a process with its pid).
    pub fn is_running(&self) -> bool {
        start_time(self.pid) == Some(self.start_time)
    }

    fn describe(&self) -> String {
        format!("{} (pid {})", self.role, self.pid)
    }
}

/// `<state>/processes.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Record {
    controller: RecordedProcess,
    /// The process group the children run in (the watchdog's pid).
    group: u32,
    children: Vec<RecordedProcess>,
}

/// Why a state folder cannot be taken.
#[derive(Debug, thiserror::Error)]
pub enum GuardError {
    /// Another controller runs on this state folder.
    #[error(
        "the state folder {state} is in use by a running controller: pid {pid} (`{command}`){runs}. \
         Stop it first (Ctrl-C in its terminal, or `kill {pid}`), or give this one another --state",
        state = .state.display(), pid = .controller.pid, command = .controller.command,
        runs = runs(.children)
    )]
    InUse {
        /// The state folder.
        state: PathBuf,
        /// The controller that runs.
        controller: RecordedProcess,
        /// What it runs.
        children: Vec<RecordedProcess>,
    },
    /// The folder is locked by a controller whose record is not written yet (it is starting).
    #[error(
        "the state folder {state} is in use by another controller that is starting (it holds {lock}); \
         stop it first, or give this one another --state",
        state = .state.display(), lock = .state.join(LOCK_FILE).display()
    )]
    Locked {
        /// The state folder.
        state: PathBuf,
    },
    /// A controller that is gone left processes running.
    #[error(
        "the state folder {state} has processes left by a controller that is gone (pid {pid}): {list}. \
         They hold the ports this folder's routes use: stop them with `kill {pids}` and start again",
        state = .state.display(), pid = .controller_pid,
        list = .children.iter().map(RecordedProcess::describe).collect::<Vec<_>>().join(", "),
        pids = .children.iter().map(|c| c.pid.to_string()).collect::<Vec<_>>().join(" ")
    )]
    LeftOver {
        /// The state folder.
        state: PathBuf,
        /// The controller that left them.
        controller_pid: u32,
        /// What still runs.
        children: Vec<RecordedProcess>,
    },
    /// The watchdog or the record could not be set up.
    #[error("{0}")]
    Setup(String),
}

fn runs(children: &[RecordedProcess]) -> String {
    if children.is_empty() {
        String::new()
    } else {
        let list: Vec<String> = children.iter().map(RecordedProcess::describe).collect();
        format!(", which runs {}", list.join(", "))
    }
}

/// The running watchdog and the controller's end of its pipe.
#[derive(Debug)]
struct Watchdog {
    process: Child,
    lifeline: Option<std::io::PipeWriter>,
}

impl Watchdog {
    fn start() -> Result<Self, GuardError> {
        let (reader, writer) = std::io::pipe()
            .map_err(|e| GuardError::Setup(format!("cannot create the watchdog's pipe: {e}")))?;
        // Both ends are close-on-exec, so no other child holds the writer: only this process.
        let process = Command::new("/bin/sh")
            .args(["-c", WATCHDOG_SCRIPT])
            .stdin(reader)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Its own group, which it leads: the one every child joins.
            .process_group(0)
            .spawn()
            .map_err(|e| GuardError::Setup(format!("cannot start the watchdog /bin/sh: {e}")))?;
        Ok(Self {
            process,
            lifeline: Some(writer),
        })
    }

    /// Kills the group at once (this controller starts nothing more) and reaps the watchdog.
    fn stop(&mut self) {
        // Only while the watchdog runs: its pid, which names the group, is then not reused.
        if matches!(self.process.try_wait(), Ok(None)) {
            let _ = Command::new("kill")
                .args(["-s", "KILL", "--", &format!("-{}", self.process.id())])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        self.abandon();
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            if !matches!(self.process.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.process.kill();
        let _ = self.process.wait();
    }

    /// Closes the controller's end of the pipe, as the controller's death does.
    fn abandon(&mut self) {
        drop(self.lifeline.take());
    }
}

/// A claimed state folder: its record and the watchdog of its process group. Dropping it (or
/// [`ProcessGuard::release`]) kills whatever still runs in the group and removes the record.
#[derive(Debug)]
pub struct ProcessGuard {
    path: PathBuf,
    watchdog: Mutex<Watchdog>,
    record: Mutex<Record>,
    /// Held locked for the guard's life (close-on-exec, so no child keeps it).
    _lock: std::fs::File,
}

impl ProcessGuard {
    /// Takes `state_dir` for this process: refuses when the controller or any child recorded
    /// there still runs; otherwise starts the watchdog and writes a fresh record.
    pub fn claim(state_dir: &Path) -> Result<Arc<Self>, GuardError> {
        let path = state_dir.join(RECORD_FILE);
        let lock_path = state_dir.join(LOCK_FILE);
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| GuardError::Setup(format!("cannot open {}: {e}", lock_path.display())))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(
                    match read_record(&path).filter(|r| r.controller.is_running()) {
                        Some(running) => GuardError::InUse {
                            state: state_dir.to_owned(),
                            children: running
                                .children
                                .iter()
                                .filter(|c| c.is_running())
                                .cloned()
                                .collect(),
                            controller: running.controller,
                        },
                        None => GuardError::Locked {
                            state: state_dir.to_owned(),
                        },
                    },
                )
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(GuardError::Setup(format!(
                    "cannot lock {}: {e}",
                    lock_path.display()
                )))
            }
        }
        if let Some(old) = read_record(&path) {
            let children: Vec<RecordedProcess> = old
                .children
                .iter()
                .filter(|c| c.is_running())
                .cloned()
                .collect();
            if old.controller.is_running() {
                return Err(GuardError::InUse {
                    state: state_dir.to_owned(),
                    controller: old.controller,
                    children,
                });
            }
            if !children.is_empty() {
                return Err(GuardError::LeftOver {
                    state: state_dir.to_owned(),
                    controller_pid: old.controller.pid,
                    children,
                });
            }
        }
        let me = RecordedProcess::running("controller", std::process::id()).ok_or_else(|| {
            GuardError::Setup(
                "cannot read this process's start time from /proc/self/stat (local mode needs Linux's /proc)"
                    .to_owned(),
            )
        })?;
        let watchdog = Watchdog::start()?;
        let group = watchdog.process.id();
        let guard = Self {
            path,
            record: Mutex::new(Record {
                controller: me,
                group,
                children: RecordedProcess::running("watchdog", group)
                    .into_iter()
                    .collect(),
            }),
            watchdog: Mutex::new(watchdog),
            _lock: lock,
        };
        guard.save(&guard.record())?;
        Ok(Arc::new(guard))
    }

    /// The process group every child must join (`process_group`). Starts a new watchdog should
    /// the old one have been killed, so later children are still covered.
    pub fn group(&self) -> u32 {
        let mut watchdog = lock(&self.watchdog);
        if matches!(watchdog.process.try_wait(), Ok(None)) {
            return watchdog.process.id();
        }
        match Watchdog::start() {
            Ok(fresh) => {
                tracing::warn!(
                    "the watchdog of {} (pid {}) is gone; started another (pid {}): processes started before it no longer die with the controller if it is killed",
                    self.path.display(),
                    watchdog.process.id(),
                    fresh.process.id()
                );
                *watchdog = fresh;
                let pid = watchdog.process.id();
                drop(watchdog);
                let mut record = self.record();
                record.group = pid;
                record
                    .children
                    .extend(RecordedProcess::running("watchdog", pid));
                let _ = self.save(&record);
                pid
            }
            // Spawning into the old group still works while any of its processes runs.
            Err(_) => watchdog.process.id(),
        }
    }

    /// Records a child this controller started (dead entries are dropped on the way).
    pub fn register(&self, role: &str, pid: u32) {
        let mut record = self.record();
        record.children.retain(RecordedProcess::is_running);
        record.children.extend(RecordedProcess::running(role, pid));
        if let Err(e) = self.save(&record) {
            tracing::warn!("{e}");
        }
    }

    /// The children recorded and still running.
    pub fn children(&self) -> Vec<RecordedProcess> {
        self.record()
            .children
            .iter()
            .filter(|c| c.is_running())
            .cloned()
            .collect()
    }

    /// Kills what still runs in the group (the watchdog does it when its pipe closes) and
    /// removes the record. Idempotent; also done on drop.
    pub fn release(&self) {
        lock(&self.watchdog).stop();
        // Only our own record: should another controller have taken the folder since (it
        // cannot while we run, but the file may have been replaced by hand), leave its record.
        let ours = self.record().controller.clone();
        if read_record(&self.path).is_some_and(|r| r.controller == ours) {
            let _ = std::fs::remove_file(&self.path);
        }
    }

    fn record(&self) -> MutexGuard<'_, Record> {
        lock(&self.record)
    }

    fn save(&self, record: &Record) -> Result<(), GuardError> {
        let tmp = self.path.with_extension("json.tmp");
        let text = serde_json::to_string_pretty(record).unwrap_or_default();
        std::fs::File::create(&tmp)
            .and_then(|mut f| f.write_all(text.as_bytes()))
            .and_then(|()| std::fs::rename(&tmp, &self.path))
            .map_err(|e| GuardError::Setup(format!("cannot write {}: {e}", self.path.display())))
    }
}

impl Drop for ProcessGuard {
    fn drop(&mut self) {
        self.release();
    }
}

/// The controller recorded in `state_dir`, if it still runs (`weir retry` asks).
pub fn running_controller(state_dir: &Path) -> Option<RecordedProcess> {
    read_record(&state_dir.join(RECORD_FILE))
        .map(|r| r.controller)
        .filter(RecordedProcess::is_running)
}

fn read_record(path: &Path) -> Option<Record> {
    // A record that cannot be read names nothing that can be checked; it is replaced.
    serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// The start time of a live process (zombies and dead ones have none).
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // `pid (comm) state ppid ...`: comm may hold spaces and parentheses, so split after the
    // last ')'. Then field 3 (state) is the first and field 22 (starttime) the 20th.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    if matches!(fields.first(), Some(&("Z" | "X" | "x"))) {
        return None;
    }
    fields.get(19)?.parse().ok()
}

fn command_line(pid: u32) -> String {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let text: Vec<String> = raw
        .split(|b| *b == 0)
        .filter(|part| !part.is_empty())
        .map(|part| String::from_utf8_lossy(part).into_owned())
        .collect();
    let mut line = text.join(" ");
    if line.len() > 200 {
        let mut cut = 200;
        while !line.is_char_boundary(cut) {
            cut -= 1;
        }
        line.truncate(cut);
        line.push_str(" ...");
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("weir-guard-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn wait_gone(process: &RecordedProcess) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if !process.is_running() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    #[test]
    fn a_folder_with_a_running_controller_is_refused_with_its_pid_and_how_to_stop_it() {
        let dir = state("in-use");
        let first = ProcessGuard::claim(&dir).unwrap();
        let refused = ProcessGuard::claim(&dir).unwrap_err().to_string();
        let me = std::process::id();
        assert!(
            refused.contains(&format!("in use by a running controller: pid {me}"))
                && refused.contains(&format!("kill {me}"))
                && refused.contains("watchdog (pid"),
            "{refused}"
        );
        // Released, the folder can be taken again.
        first.release();
        drop(first);
        let again = ProcessGuard::claim(&dir).unwrap();
        drop(again);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_folder_locked_by_a_controller_is_refused_even_before_its_record_is_written() {
        let dir = state("locked");
        let first = ProcessGuard::claim(&dir).unwrap();
        // As if the first were between taking the lock and writing its record.
        std::fs::remove_file(dir.join(RECORD_FILE)).unwrap();
        let refused = ProcessGuard::claim(&dir).unwrap_err().to_string();
        assert!(
            refused.contains("in use by another controller that is starting")
                && refused.contains(LOCK_FILE),
            "{refused}"
        );
        drop(first);
        drop(ProcessGuard::claim(&dir).unwrap());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn children_still_running_from_a_gone_controller_are_named_and_refused() {
        let dir = state("left-over");
        let mut orphan = Command::new("sleep").arg("60").spawn().unwrap();
        let record = Record {
            // A controller that is gone: a pid with another start time.
            controller: RecordedProcess {
                role: "controller".to_owned(),
                pid: std::process::id(),
                start_time: 1,
                command: "weir local".to_owned(),
            },
            group: orphan.id(),
            children: vec![RecordedProcess::running("envoy", orphan.id()).unwrap()],
        };
        std::fs::write(
            dir.join(RECORD_FILE),
            serde_json::to_string(&record).unwrap(),
        )
        .unwrap();
        let refused = ProcessGuard::claim(&dir).unwrap_err().to_string();
        let pid = orphan.id();
        assert!(
            refused.contains(&format!("envoy (pid {pid})"))
                && refused.contains(&format!("`kill {pid}`")),
            "{refused}"
        );
        orphan.kill().unwrap();
        orphan.wait().unwrap();
        // Once it is gone the folder is free.
        drop(ProcessGuard::claim(&dir).unwrap());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn children_in_the_group_are_killed_when_the_guard_goes() {
        let dir = state("group");
        let guard = ProcessGuard::claim(&dir).unwrap();
        let child = Command::new("sleep")
            .arg("60")
            .process_group(i32::try_from(guard.group()).unwrap())
            .spawn()
            .unwrap();
        guard.register("app", child.id());
        let recorded = RecordedProcess::running("app", child.id()).unwrap();
        assert!(guard.children().contains(&recorded));
        let text = std::fs::read_to_string(dir.join(RECORD_FILE)).unwrap();
        assert!(text.contains(&format!("\"pid\": {}", child.id())), "{text}");
        drop(guard);
        // Reaped here, so that the check below sees it gone rather than a zombie of ours.
        let mut child = child;
        let status = child.wait().unwrap();
        assert!(!status.success(), "killed, not exited: {status}");
        assert!(wait_gone(&recorded));
        assert!(!dir.join(RECORD_FILE).exists());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_child_that_joins_the_group_just_after_the_controller_died_is_killed_too() {
        let mut watchdog = Watchdog::start().unwrap();
        let group = i32::try_from(watchdog.process.id()).unwrap();
        let spawn = || {
            Command::new("sleep")
                .arg("60")
                .process_group(group)
                .spawn()
                .unwrap()
        };
        // Killed but not reaped, a member keeps the group alive (as an Envoy whose controller is
        // gone stays a zombie until init reaps it).
        let mut first = spawn();
        // The controller dies ...
        watchdog.abandon();
        std::thread::sleep(Duration::from_millis(200));
        // ... while a child it was forking joins the group.
        let mut late = spawn();
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(status) = late.try_wait().unwrap() {
                break Some(status);
            }
            if Instant::now() >= deadline {
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let _ = late.kill();
        let _ = first.kill();
        let _ = late.wait();
        let _ = first.wait();
        watchdog.stop();
        let status = status.expect("the late child still runs 10s after the controller died");
        assert!(!status.success(), "killed: {status}");
    }

    #[test]
    fn a_reused_pid_is_not_taken_for_the_recorded_process() {
        let me = RecordedProcess::running("controller", std::process::id()).unwrap();
        assert!(me.is_running());
        let other = RecordedProcess {
            start_time: me.start_time + 1,
            ..me
        };
        assert!(!other.is_running());
    }
}
