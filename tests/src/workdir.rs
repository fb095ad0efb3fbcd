//! A scratch directory per test, and free ports.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use crate::binaries::workspace_root;

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A directory under `target/e2e/` for one test's files (bootstraps, logs). Removed when dropped,
/// unless the test is failing: then it is kept, and its path printed, for a post-mortem.
#[derive(Debug)]
pub struct WorkDir {
    path: PathBuf,
}

impl WorkDir {
    /// A fresh, empty directory named after the test.
    pub fn new(test: &str) -> std::io::Result<Self> {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = workspace_root()
            .join("target/e2e")
            .join(format!("{test}-{}-{n}", std::process::id()));
        if path.exists() {
            std::fs::remove_dir_all(&path)?;
        }
        std::fs::create_dir_all(&path)?;
        Ok(Self { path })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("kept {} for inspection", self.path.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// A port on 127.0.0.1 that was free a moment ago. Prefer binding port 0 where the program can
/// report what it bound; this is for the rest.
pub fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}
