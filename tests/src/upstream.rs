//! An upstream workload: a `mirror` process on 127.0.0.1, killed when dropped.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};

use crate::binaries;

/// What a mirror has served (its `/mirror/stats`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MirrorStats {
    /// Requests answered (not counting stats and health checks).
    pub requests: u64,
    /// Of those, answered with a 5xx.
    pub errors: u64,
}

/// A running mirror.
#[derive(Debug)]
pub struct Upstream {
    child: Child,
    addr: SocketAddr,
    version: String,
}

impl Upstream {
    /// Starts `mirror --version <version> <args>` on a free port and waits for it to listen.
    /// `args` are further mirror flags, e.g. `["--error-rate", "0.5"]` or `["--latency", "80ms"]`.
    pub fn start(version: &str, args: &[&str]) -> anyhow::Result<Self> {
        let binary = binaries::mirror();
        let mut child = Command::new(&binary)
            .args(["--listen", "127.0.0.1:0", "--version", version])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot run {}", binary.display()))?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| anyhow!("mirror has no stdout"))?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let _ = tx.send(lines.next());
            // Keep reading so the pipe stays open for as long as the mirror runs.
            lines.for_each(drop);
        });
        let mut upstream = Upstream {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            version: version.to_owned(),
        };
        let line = match rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Some(Ok(line))) => line,
            other => {
                let status = upstream.child.try_wait().ok().flatten();
                bail!("mirror {version} did not report its address ({other:?}, exit {status:?})");
            }
        };
        upstream.addr = line
            .strip_prefix("listening on ")
            .and_then(|a| a.trim().parse().ok())
            .ok_or_else(|| anyhow!("mirror's first line is {line:?}, not `listening on <addr>`"))?;
        Ok(upstream)
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The version it answers with (`x-mirror-version`).
    pub fn version(&self) -> &str {
        &self.version
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Asks it to stop (SIGTERM, through `kill(1)`: this crate has no unsafe code for
    /// `kill(2)`) and waits, at most `timeout`, for it to exit.
    pub fn terminate(&mut self, timeout: Duration) -> anyhow::Result<std::process::ExitStatus> {
        let sent = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .context("cannot run kill(1)")?;
        if !sent.success() {
            bail!("kill -TERM {} failed: {sent}", self.child.id());
        }
        let started = std::time::Instant::now();
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if started.elapsed() > timeout {
                bail!(
                    "mirror {} still runs {timeout:?} after SIGTERM",
                    self.version
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// What it has served so far.
    pub async fn stats(&self) -> anyhow::Result<MirrorStats> {
        let (status, body) = crate::http::get(self.addr, "/mirror/stats").await?;
        if status != 200 {
            bail!("mirror stats answered {status}: {body}");
        }
        let json: serde_json::Value = serde_json::from_str(&body)?;
        let field = |name: &str| {
            json[name]
                .as_u64()
                .ok_or_else(|| anyhow!("mirror stats lack {name}: {body}"))
        };
        Ok(MirrorStats {
            requests: field("requests")?,
            errors: field("errors")?,
        })
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
