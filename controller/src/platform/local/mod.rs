//! Local mode: workloads are processes on 127.0.0.1 behind a real Envoy with the Weir filter.
//!
//! - [`workload`]: the workload file (local mode's pod template) and its revision;
//! - [`processes`]: starting, probing and stopping app processes;
//! - [`envoy`]: the Envoy bootstrap and process;
//! - [`guard`]: the state folder's one controller, and its processes dying with it.
//!
//! The primary has two slots (two ports, both endpoints of Envoy's `primary` cluster, health
//! checked): a promotion starts the new version in the idle slot, waits until it serves, then
//! stops the old one, so no request meets a closed port. The canary has one port. Ports are kept
//! in the state folder so a restarted controller brings the same Envoy routes back.

pub mod envoy;
pub mod guard;
pub mod processes;
pub mod workload;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

use super::{CanaryRef, Platform, PlatformError, Readiness};
use guard::ProcessGuard;
use processes::{free_port, AppProcess};
use workload::Workload;

/// How long a new primary may take to serve before a promotion fails.
const PRIMARY_READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the old primary keeps serving after the new one is ready.
const HANDOVER: Duration = Duration::from_secs(1);

/// The ports local mode uses, fixed for the life of the state folder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LocalPorts {
    /// The two primary slots.
    pub primary: [u16; 2],
    /// The canary.
    pub canary: u16,
}

impl LocalPorts {
    /// Reads `<state>/ports.json`, or picks free ports and writes it.
    pub fn load_or_pick(state_dir: &Path) -> Result<Self, String> {
        let path = state_dir.join("ports.json");
        if let Ok(text) = std::fs::read_to_string(&path) {
            return serde_json::from_str(&text)
                .map_err(|e| format!("{} is corrupt ({e}); delete it", path.display()));
        }
        let ports = LocalPorts {
            primary: [free_port()?, free_port()?],
            canary: free_port()?,
        };
        std::fs::create_dir_all(state_dir)
            .map_err(|e| format!("cannot create {}: {e}", state_dir.display()))?;
        std::fs::write(
            &path,
            serde_json::to_string_pretty(&ports).unwrap_or_default(),
        )
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        Ok(ports)
    }
}

#[derive(Debug, Default)]
struct Running {
    /// The serving primary and its slot.
    primary: Option<(usize, AppProcess)>,
    canary: Option<AppProcess>,
}

/// The local-process platform.
#[derive(Debug)]
pub struct LocalPlatform {
    workloads_dir: PathBuf,
    state_dir: PathBuf,
    ports: LocalPorts,
    running: Mutex<Running>,
    guard: Option<Arc<ProcessGuard>>,
}

impl LocalPlatform {
    /// A platform reading targets from `workloads_dir` and keeping its files in `state_dir`.
    pub fn new(workloads_dir: PathBuf, state_dir: PathBuf, ports: LocalPorts) -> Self {
        Self {
            workloads_dir,
            state_dir,
            ports,
            running: Mutex::new(Running::default()),
            guard: None,
        }
    }

    /// Starts every app process in `guard`'s process group and records it there, so the
    /// processes die with the controller (see [`ProcessGuard`]).
    pub fn with_guard(mut self, guard: Arc<ProcessGuard>) -> Self {
        self.guard = Some(guard);
        self
    }

    fn start_app(
        &self,
        canary: &CanaryRef,
        workload: &Workload,
        port: u16,
        log: &Path,
        role: &str,
    ) -> Result<AppProcess, String> {
        match &self.guard {
            Some(guard) => AppProcess::start_guarded(
                workload,
                port,
                log,
                guard,
                &format!("{} {role}", canary.target),
            ),
            None => AppProcess::start(workload, port, log),
        }
    }

    /// The ports in use.
    pub fn ports(&self) -> LocalPorts {
        self.ports
    }

    fn primary_file(&self, canary: &CanaryRef) -> PathBuf {
        self.state_dir
            .join(format!("{}.primary.yaml", canary.target))
    }

    fn log_file(&self, canary: &CanaryRef, role: &str) -> PathBuf {
        self.state_dir
            .join("logs")
            .join(format!("{}-{role}.log", canary.target))
    }

    fn failed(action: &str, canary: &CanaryRef, reason: String) -> PlatformError {
        PlatformError::Operation {
            action: action.to_owned(),
            target: canary.target.clone(),
            reason,
        }
    }

    /// After a controller restart: brings back the primary as last promoted, and the canary when
    /// the persisted status says it was running. Does nothing for what already runs.
    pub async fn resume(&self, canary: &CanaryRef, canary_up: bool) -> Result<(), PlatformError> {
        let primary_file = self.primary_file(canary);
        if primary_file.is_file() && self.running.lock().await.primary.is_none() {
            let text = std::fs::read_to_string(&primary_file)
                .map_err(|e| Self::failed("reading the promoted primary", canary, e.to_string()))?;
            let workload = Workload::parse(&canary.target, &text)?;
            self.start_primary(canary, &workload).await?;
        }
        if canary_up {
            self.scale_canary(canary, true).await?;
        }
        Ok(())
    }

    async fn start_primary(
        &self,
        canary: &CanaryRef,
        workload: &Workload,
    ) -> Result<(), PlatformError> {
        let mut running = self.running.lock().await;
        let slot = match &running.primary {
            Some((slot, _)) => 1 - slot,
            None => 0,
        };
        let port = self.ports.primary[slot];
        let log = self.log_file(canary, &format!("primary-{slot}"));
        let mut process = self
            .start_app(
                canary,
                workload,
                port,
                &log,
                &format!("primary slot {slot}"),
            )
            .map_err(|e| Self::failed("starting the primary", canary, e))?;
        process
            .wait_ready(PRIMARY_READY_TIMEOUT)
            .await
            .map_err(|e| {
                Self::failed(
                    "starting the primary",
                    canary,
                    format!("{e} (see {})", log.display()),
                )
            })?;
        if let Some((_, old)) = running.primary.replace((slot, process)) {
            // Envoy sends to the new slot only once its health check (every 250ms) has found
            // it serving; until then every attempt of a request meets the old slot, so stopping
            // the old slot earlier fails requests. Several intervals, for a busy machine.
            tokio::time::sleep(HANDOVER).await;
            old.stop().await;
        }
        Ok(())
    }

    /// Stops every process.
    pub async fn shutdown(&self) {
        let mut running = self.running.lock().await;
        if let Some((_, p)) = running.primary.take() {
            p.stop().await;
        }
        if let Some(p) = running.canary.take() {
            p.stop().await;
        }
    }
}

impl Platform for LocalPlatform {
    async fn target_revision(&self, canary: &CanaryRef) -> Result<String, PlatformError> {
        Ok(Workload::load(&self.workloads_dir, &canary.target)?.revision())
    }

    async fn promote_to_primary(&self, canary: &CanaryRef) -> Result<(), PlatformError> {
        let workload = Workload::load(&self.workloads_dir, &canary.target)?;
        let text = serde_yaml::to_string(&workload).unwrap_or_default();
        std::fs::create_dir_all(&self.state_dir)
            .and_then(|()| std::fs::write(self.primary_file(canary), text))
            .map_err(|e| Self::failed("saving the promoted template", canary, e.to_string()))?;
        self.start_primary(canary, &workload).await
    }

    async fn scale_canary(&self, canary: &CanaryRef, up: bool) -> Result<(), PlatformError> {
        let mut running = self.running.lock().await;
        if !up {
            if let Some(process) = running.canary.take() {
                process.stop().await;
            }
            return Ok(());
        }
        let workload = Workload::load(&self.workloads_dir, &canary.target)?;
        if running
            .canary
            .as_ref()
            .is_some_and(|p| p.revision == workload.revision())
        {
            return Ok(());
        }
        if let Some(old) = running.canary.take() {
            old.stop().await;
        }
        let log = self.log_file(canary, "canary");
        let process = self
            .start_app(canary, &workload, self.ports.canary, &log, "canary")
            .map_err(|e| Self::failed("starting the canary", canary, e))?;
        running.canary = Some(process);
        Ok(())
    }

    async fn readiness(&self, _canary: &CanaryRef) -> Readiness {
        let mut running = self.running.lock().await;
        let primary = match running.primary.as_mut() {
            Some((_, p)) => match p.restart_if_exited() {
                Some(why) => Err(why),
                None => p.ready().await,
            },
            None => Err("no primary yet".to_owned()),
        };
        let canary = match running.canary.as_mut() {
            Some(p) => match p.restart_if_exited() {
                Some(why) => Err(why),
                None => p.ready().await,
            },
            None => Err("canary scaled to zero".to_owned()),
        };
        Readiness { primary, canary }
    }
}
