//! The filter module this controller ships with, served over its HTTP port.
//!
//! Istio's agent (for the WasmPlugin) or Envoy itself (for the EnvoyFilter alternative) fetches
//! the module from the controller, pinned by the sha256 the controller writes next to the URL, so
//! upgrading the controller upgrades the filter, and no ConfigMap or volume carries the module.
//! The path holds the digest (`/filter/<sha256>.wasm`): a cached module is never mistaken for a
//! newer one, and a stale URL answers 404 instead of the wrong bytes.

use std::path::{Path, PathBuf};

use bytes::Bytes;

/// The default location of the module in the controller's image (manifests/image/Dockerfile).
pub const DEFAULT_PATH: &str = "/usr/local/lib/weir/weir_filter.wasm";

/// Why the module could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ModuleError {
    /// The file could not be read.
    #[error("cannot read the filter module {path}: {source}; build it with `cargo xtask wasm` or pass --filter-module")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not a WebAssembly module.
    #[error("{path} is not a WebAssembly module (it does not start with \\0asm); pass the weir_filter.wasm that `cargo xtask wasm` builds")]
    NotWasm {
        /// The file.
        path: PathBuf,
    },
}

/// The module's bytes and digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilterModule {
    bytes: Bytes,
    sha256: String,
}

impl FilterModule {
    /// Reads and checks the module at `path`.
    pub fn load(path: &Path) -> Result<Self, ModuleError> {
        let bytes = std::fs::read(path).map_err(|source| ModuleError::Read {
            path: path.to_owned(),
            source,
        })?;
        if !bytes.starts_with(b"\0asm") {
            return Err(ModuleError::NotWasm {
                path: path.to_owned(),
            });
        }
        Ok(Self::from_bytes(bytes))
    }

    /// A module from its bytes (not checked).
    pub fn from_bytes(bytes: impl Into<Bytes>) -> Self {
        let bytes = bytes.into();
        let digest = ring::digest::digest(&ring::digest::SHA256, &bytes);
        let sha256 = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        Self { bytes, sha256 }
    }

    /// The sha256 of the module, lower-case hex (what WasmPlugin's `sha256` and Envoy's
    /// `RemoteDataSource.sha256` take).
    pub fn sha256(&self) -> &str {
        &self.sha256
    }

    /// The module's bytes.
    pub fn bytes(&self) -> &Bytes {
        &self.bytes
    }

    /// The path the module is served at: `/filter/<sha256>.wasm`.
    pub fn url_path(&self) -> String {
        format!("/filter/{}.wasm", self.sha256)
    }

    /// The module, if `path` is where it is served.
    pub fn serve(&self, path: &str) -> Option<Bytes> {
        (path == self.url_path()).then(|| self.bytes.clone())
    }
}

/// The Wasm filter's `PluginConfig` for an install that has Envoy fetch the module itself
/// (the EnvoyFilter alternative, in a cluster and in local mode alike): no `vm_id` (shared data is
/// then keyed by the empty string, as under a WasmPlugin), root id `weir`, fail open, the module
/// fetched over `cluster` from `url` and checked against `sha256`, the filter's configuration
/// as a `StringValue` of its JSON.
pub fn remote_plugin_config(
    name: &str,
    url: &str,
    cluster: &str,
    sha256: &str,
    config_json: &str,
) -> serde_json::Value {
    serde_json::json!({
        "name": name,
        "root_id": "weir",
        "failure_policy": "FAIL_OPEN",
        "vm_config": {
            "runtime": "envoy.wasm.runtime.v8",
            "code": {"remote": {
                "http_uri": {"uri": url, "cluster": cluster, "timeout": "30s"},
                "sha256": sha256,
                "retry_policy": {"num_retries": 5},
            }},
        },
        "configuration": {
            "@type": "type.googleapis.com/google.protobuf.StringValue",
            "value": config_json,
        },
    })
}

/// How the filter gets into the mesh's Envoys.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum InstallKind {
    /// An Istio WasmPlugin (the supported extension API): Istio's agent fetches the module.
    #[default]
    #[value(name = "wasmplugin")]
    WasmPlugin,
    /// An EnvoyFilter with HTTP_FILTER patches (older Istio releases, or meshes that add their
    /// extensions that way): Envoy fetches the module itself.
    #[value(name = "envoyfilter")]
    EnvoyFilter,
    /// Nothing: the operator installs the filter (Kubernetes only).
    #[value(name = "none")]
    None,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_module_is_served_only_at_the_path_holding_its_digest() {
        let module = FilterModule::from_bytes(&b"\0asm\x01\0\0\0"[..]);
        // sha256 of those eight bytes, computed independently (sha256sum).
        assert_eq!(
            module.sha256(),
            "93a44bbb96c751218e4c00d479e4c14358122a389acca16205b1e4d0dc5f9476"
        );
        assert_eq!(
            module.url_path(),
            format!("/filter/{}.wasm", module.sha256())
        );
        assert_eq!(
            module.serve(&module.url_path()).as_deref(),
            Some(&b"\0asm\x01\0\0\0"[..])
        );
        assert_eq!(module.serve("/filter/other.wasm"), None);
    }

    #[test]
    fn a_file_that_is_not_wasm_is_refused_with_the_fix() {
        let dir = std::env::temp_dir().join(format!("weir-module-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("x.wasm");
        std::fs::write(&path, b"<html>").unwrap();
        let err = FilterModule::load(&path).unwrap_err().to_string();
        assert!(err.contains("not a WebAssembly module"), "{err}");
        let err = FilterModule::load(&dir.join("missing.wasm"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("cargo xtask wasm"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
