//! Where the binaries under test are. Each is taken from an environment variable first (set by
//! `cargo xtask test`), then from its place in the workspace; a missing one fails the test with
//! a message that says how to get it.

use std::path::{Path, PathBuf};

/// The workspace root (the parent of this crate).
pub fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

fn from_env(var: &str) -> Option<PathBuf> {
    let path = PathBuf::from(std::env::var_os(var)?);
    assert!(
        path.is_file(),
        "{var}={} does not name a file; point it at the binary or unset it",
        path.display()
    );
    Some(path)
}

fn on_path(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// Envoy: `WEIR_ENVOY`, else `.tools/envoy/bin/envoy`, else `envoy` on PATH.
pub fn envoy() -> PathBuf {
    let ours = workspace_root().join(".tools/envoy/bin/envoy");
    from_env("WEIR_ENVOY")
        .or_else(|| ours.is_file().then_some(ours))
        .or_else(|| on_path("envoy"))
        .unwrap_or_else(|| {
            panic!(
                "no Envoy found: set WEIR_ENVOY, or run `cargo xtask test`, which installs \
                 Envoy 1.40 into .tools/envoy and runs the tests"
            )
        })
}

/// The filter: `WEIR_WASM`, else the workspace's `wasm` profile build.
pub fn wasm() -> PathBuf {
    let built = workspace_root().join("target/wasm32-wasip1/wasm/weir_filter.wasm");
    from_env("WEIR_WASM")
        .or_else(|| built.is_file().then_some(built))
        .unwrap_or_else(|| {
            panic!(
                "no weir_filter.wasm found: build it with `cargo build -p weir-filter --target \
                 wasm32-wasip1 --profile wasm`, or run `cargo xtask test`"
            )
        })
}

/// The mirror app: `WEIR_MIRROR`, else the workspace's debug build.
pub fn mirror() -> PathBuf {
    let built = workspace_root().join("target/debug/mirror");
    from_env("WEIR_MIRROR")
        .or_else(|| built.is_file().then_some(built))
        .unwrap_or_else(|| {
            panic!("no mirror binary found: build it with `cargo build -p mirror` or run `cargo xtask test`")
        })
}
