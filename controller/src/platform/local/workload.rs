//! A local workload: the stand-in for a Deployment's pod template in local mode. One YAML file per
//! target in the workloads folder, `<target>.yaml`; editing it is local mode's `kubectl set image`.
//!
//! ```yaml
//! command: mirror                 # a path, or a name found next to `weir` or on PATH
//! args: ["--listen", "{address}", "--version", "1.1.2"]
//! env: {MODE: fast}               # optional
//! readinessPath: /healthz         # optional; default /healthz
//! ```
//! `{address}` and `{port}` in args are replaced by where the process must listen (127.0.0.1 and
//! a port the platform picks); the environment also gets `PORT`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::super::PlatformError;

/// How to run one version of a local app.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Workload {
    /// The program.
    pub command: String,
    /// Its arguments; `{address}` and `{port}` are substituted.
    #[serde(default)]
    pub args: Vec<String>,
    /// Extra environment.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// HTTP path that answers 200 when the app is ready.
    #[serde(default = "default_readiness_path")]
    pub readiness_path: String,
}

fn default_readiness_path() -> String {
    "/healthz".to_owned()
}

impl Workload {
    /// Reads `<dir>/<target>.yaml`.
    pub fn load(dir: &Path, target: &str) -> Result<Self, PlatformError> {
        let path = dir.join(format!("{target}.yaml"));
        let text = std::fs::read_to_string(&path).map_err(|e| PlatformError::TargetNotFound {
            target: target.to_owned(),
            hint: format!(
                "cannot read {} ({e}); local mode runs the workload described in <workloads>/{target}.yaml",
                path.display()
            ),
        })?;
        Self::parse(target, &text).map_err(|e| match e {
            PlatformError::InvalidTarget { target, reason } => PlatformError::InvalidTarget {
                target,
                reason: format!("{}: {reason}", path.display()),
            },
            other => other,
        })
    }

    /// Parses a workload definition.
    pub fn parse(target: &str, text: &str) -> Result<Self, PlatformError> {
        let workload: Workload =
            serde_yaml::from_str(text).map_err(|e| PlatformError::InvalidTarget {
                target: target.to_owned(),
                reason: format!("{e}; expected fields command, args, env, readinessPath"),
            })?;
        if workload.command.trim().is_empty() {
            return Err(PlatformError::InvalidTarget {
                target: target.to_owned(),
                reason: "`command` is empty".to_owned(),
            });
        }
        if !workload.readiness_path.starts_with('/') {
            return Err(PlatformError::InvalidTarget {
                target: target.to_owned(),
                reason: format!(
                    "`readinessPath` must start with '/', got `{}`",
                    workload.readiness_path
                ),
            });
        }
        Ok(workload)
    }

    /// A stable hash of the definition: a new revision is a changed definition. Stable across
    /// controller builds (FNV-1a over the canonical JSON), since it is persisted in the status.
    pub fn revision(&self) -> String {
        let canonical = serde_json::to_string(self).unwrap_or_default();
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for byte in canonical.bytes() {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
        format!("{hash:016x}")
    }

    /// The arguments with `{address}` and `{port}` filled in.
    pub fn args_for(&self, port: u16) -> Vec<String> {
        self.args
            .iter()
            .map(|a| {
                a.replace("{address}", &format!("127.0.0.1:{port}"))
                    .replace("{port}", &port.to_string())
            })
            .collect()
    }

    /// The program to start: a path as given, else a file of that name next to the running
    /// binary (where cargo puts `weir` and `mirror` side by side), else the name for PATH lookup.
    pub fn program(&self) -> PathBuf {
        let command = Path::new(&self.command);
        if command.components().count() > 1 {
            return command.to_owned();
        }
        if let Some(sibling) = std::env::current_exe()
            .ok()
            .and_then(|exe| exe.parent().map(|dir| dir.join(&self.command)))
            .filter(|p| p.is_file())
        {
            return sibling;
        }
        command.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_workload_file_parses_with_defaults() {
        let w = Workload::parse(
            "mhs",
            "command: mirror\nargs: [\"--listen\", \"{address}\"]\n",
        )
        .unwrap();
        assert_eq!(w.readiness_path, "/healthz");
        assert_eq!(w.args_for(8081), vec!["--listen", "127.0.0.1:8081"]);
    }

    #[test]
    fn the_revision_changes_with_the_definition_only() {
        let a =
            Workload::parse("mhs", "command: mirror\nargs: [\"--version\", \"1.1.1\"]").unwrap();
        let b =
            Workload::parse("mhs", "command: mirror\nargs: [\"--version\", \"1.1.2\"]").unwrap();
        assert_eq!(a.revision(), a.clone().revision());
        assert_ne!(a.revision(), b.revision());
    }

    #[test]
    fn bad_workload_files_say_what_is_wrong() {
        let unknown = Workload::parse("mhs", "command: mirror\nimage: x")
            .unwrap_err()
            .to_string();
        assert!(unknown.contains("unknown field `image`"), "{unknown}");
        assert!(Workload::parse("mhs", "command: ''")
            .unwrap_err()
            .to_string()
            .contains("command"));
        assert!(Workload::parse("mhs", "command: x\nreadinessPath: healthz")
            .unwrap_err()
            .to_string()
            .contains("readinessPath"));
        let missing = Workload::load(Path::new("/nonexistent"), "mhs")
            .unwrap_err()
            .to_string();
        assert!(missing.contains("mhs.yaml"), "{missing}");
    }

    #[test]
    fn an_invalid_workload_file_is_named_in_its_error() {
        let dir = std::env::temp_dir().join(format!("weir-workload-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("mhs.yaml"), "command: mirror\nimage: x\n").unwrap();
        let invalid = Workload::load(&dir, "mhs").unwrap_err().to_string();
        assert!(
            invalid.contains(&format!(
                "{}: unknown field `image`",
                dir.join("mhs.yaml").display()
            )),
            "{invalid}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
