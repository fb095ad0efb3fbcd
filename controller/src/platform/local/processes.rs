//! Supervised app processes: start one version of a workload on a port, probe it, stop it.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

use super::guard::ProcessGuard;
use super::workload::Workload;

/// A running version of a workload, killed when dropped.
#[derive(Debug)]
pub struct AppProcess {
    child: Child,
    /// Where it listens (127.0.0.1).
    pub port: u16,
    /// The revision of the definition it runs.
    pub revision: String,
    readiness_path: String,
    /// What it runs and where it logs, to start it again after an exit.
    workload: Workload,
    log: PathBuf,
    restarts: u32,
    /// The guard whose process group it runs in, and its role there.
    guard: Option<(Arc<ProcessGuard>, String)>,
}

impl AppProcess {
    /// Starts `workload` listening on `port`, its output appended to `log`.
    pub fn start(workload: &Workload, port: u16, log: &Path) -> Result<Self, String> {
        Self::launch(workload, port, log, None)
    }

    /// [`AppProcess::start`] in `guard`'s process group, recorded there as `role`: it dies with
    /// the controller however the controller ends (see [`ProcessGuard`]).
    pub fn start_guarded(
        workload: &Workload,
        port: u16,
        log: &Path,
        guard: &Arc<ProcessGuard>,
        role: &str,
    ) -> Result<Self, String> {
        Self::launch(workload, port, log, Some((guard.clone(), role.to_owned())))
    }

    fn launch(
        workload: &Workload,
        port: u16,
        log: &Path,
        guard: Option<(Arc<ProcessGuard>, String)>,
    ) -> Result<Self, String> {
        if let Some(dir) = log.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        }
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(|e| format!("cannot open log {}: {e}", log.display()))?;
        let err = out.try_clone().map_err(|e| e.to_string())?;
        let program = workload.program();
        let mut command = Command::new(&program);
        if let Some((guard, _)) = &guard {
            command.process_group(i32::try_from(guard.group()).unwrap_or(0));
        }
        let child = command
            .args(workload.args_for(port))
            .envs(&workload.env)
            .env("PORT", port.to_string())
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| {
                format!(
                    "cannot start `{}` ({e}); is `command` a program on PATH or next to the weir binary?",
                    program.display()
                )
            })?;
        if let (Some((guard, role)), Some(pid)) = (&guard, child.id()) {
            guard.register(role, pid);
        }
        Ok(Self {
            child,
            port,
            revision: workload.revision(),
            readiness_path: workload.readiness_path.clone(),
            workload: workload.clone(),
            log: log.to_owned(),
            restarts: 0,
            guard,
        })
    }

    /// The operating system's process id (None once it has been reaped).
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Like a kubelet restarting a crashed container: a process that exited is started again
    /// (same definition, port and log). Returns why it was restarted, or None if it still runs.
    pub fn restart_if_exited(&mut self) -> Option<String> {
        let status = self.child.try_wait().ok().flatten()?;
        let restarts = self.restarts + 1;
        match Self::launch(&self.workload, self.port, &self.log, self.guard.clone()) {
            Ok(fresh) => {
                *self = fresh;
                self.restarts = restarts;
                Some(format!(
                    "process exited ({status}); restarted ({restarts} restarts, see {})",
                    self.log.display()
                ))
            }
            Err(e) => Some(format!(
                "process exited ({status}) and could not be restarted: {e}"
            )),
        }
    }

    /// Ok when the process runs and its readiness path answers 200; otherwise why not.
    pub async fn ready(&mut self) -> Result<(), String> {
        if let Ok(Some(status)) = self.child.try_wait() {
            return Err(format!("process exited ({status})"));
        }
        probe(self.port, &self.readiness_path).await
    }

    /// Waits until ready, at most `timeout`.
    pub async fn wait_ready(&mut self, timeout: Duration) -> Result<(), String> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let outcome = self.ready().await;
            if outcome.is_ok() || tokio::time::Instant::now() >= deadline {
                return outcome.map_err(|e| format!("not ready after {timeout:?}: {e}"));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops the process (SIGKILL) and reaps it.
    pub async fn stop(mut self) {
        let _ = self.child.start_kill();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await;
    }
}

/// One HTTP/1.1 GET with a short timeout; Ok on a 200.
pub async fn probe(port: u16, path: &str) -> Result<(), String> {
    let attempt = async {
        let mut stream = TcpStream::connect(("127.0.0.1", port))
            .await
            .map_err(|e| format!("127.0.0.1:{port} refuses connections ({e})"))?;
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut head = [0u8; 12];
        stream
            .read_exact(&mut head)
            .await
            .map_err(|e| e.to_string())?;
        match &head[9..12] {
            b"200" => Ok(()),
            status => Err(format!(
                "GET {path} answered {}",
                String::from_utf8_lossy(status)
            )),
        }
    };
    tokio::time::timeout(Duration::from_millis(500), attempt)
        .await
        .unwrap_or_else(|_| Err(format!("GET {path} timed out")))
}

/// A free TCP port on 127.0.0.1 (the OS picks; released before use, as every local tool does).
pub fn free_port() -> Result<u16, String> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("no free port on 127.0.0.1: {e}"))
}

#[cfg(test)]
mod restart_tests {
    use super::*;

    #[tokio::test]
    async fn an_exited_process_is_started_again_and_says_why() {
        let dir = std::env::temp_dir().join(format!("weir-restart-{}", std::process::id()));
        let workload =
            Workload::parse("crash", "command: /bin/sh\nargs: [\"-c\", \"exit 3\"]").unwrap();
        let mut process = AppProcess::start(&workload, 1, &dir.join("crash.log")).unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        let why = loop {
            if let Some(why) = process.restart_if_exited() {
                break why;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the process never exited"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert!(
            why.contains("exited") && why.contains("restarted (1 restarts"),
            "{why}"
        );
        assert!(process.ready().await.is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
