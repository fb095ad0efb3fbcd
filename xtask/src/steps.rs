//! Running commands loudly, and timing the named steps of a subcommand.

use std::borrow::BorrowMut;
use std::fmt::Write as _;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// The steps of one subcommand, with their outcomes and durations.
pub struct Steps {
    started: Instant,
    done: Vec<(String, Duration, bool)>,
}

impl Steps {
    /// An empty record, started now.
    pub fn new() -> Self {
        Self {
            started: Instant::now(),
            done: Vec::new(),
        }
    }

    /// Runs a step that later steps depend on: its failure ends the subcommand.
    pub fn run<T>(&mut self, name: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
        match self.time(name, f) {
            Ok(v) => Ok(v),
            Err(e) => {
                self.summary();
                Err(e.context(format!("step `{name}` failed")))
            }
        }
    }

    /// Runs a step whose failure is reported at the end ([`Steps::into_result`]) while the
    /// remaining steps still run.
    pub fn check(&mut self, name: &str, f: impl FnOnce() -> Result<()>) {
        if let Err(e) = self.time(name, f) {
            eprintln!("xtask: step `{name}` failed: {e:#}");
        }
    }

    fn time<T>(&mut self, name: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
        println!("\n==> {name}");
        let start = Instant::now();
        let result = f();
        let took = start.elapsed();
        let verdict = if result.is_ok() { "ok" } else { "FAILED" };
        println!("<== {name}: {verdict} in {}", human(took));
        self.done.push((name.to_owned(), took, result.is_ok()));
        result
    }

    /// Prints every step with its outcome and duration, and the total.
    pub fn summary(&self) {
        let mut out = String::from("\nsteps:\n");
        for (name, took, ok) in &self.done {
            let verdict = if *ok { "ok" } else { "FAILED" };
            let _ = writeln!(out, "  {name:<18} {verdict:<7} {:>9}", human(*took));
        }
        let _ = writeln!(
            out,
            "  {:<18} {:<7} {:>9}",
            "total",
            "",
            human(self.started.elapsed())
        );
        print!("{out}");
    }

    /// Ok if every step passed; otherwise an error naming the ones that failed.
    pub fn into_result(self) -> Result<()> {
        let failed: Vec<&str> = self
            .done
            .iter()
            .filter(|(_, _, ok)| !ok)
            .map(|(name, _, _)| name.as_str())
            .collect();
        if failed.is_empty() {
            Ok(())
        } else {
            bail!("failed steps: {}", failed.join(", "))
        }
    }
}

/// `12.3s` or `4m 05.6s`.
pub fn human(d: Duration) -> String {
    let secs = d.as_secs_f64();
    if secs < 60.0 {
        format!("{secs:.1}s")
    } else {
        let minutes = (secs / 60.0).floor();
        format!("{minutes:.0}m {:04.1}s", secs - minutes * 60.0)
    }
}

/// The command as a shell-like line, for logs and error messages.
pub fn display(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|s| s.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs a command with its output shown; a non-zero exit is an error naming the command.
/// Standard input is closed: nothing we run may wait for a person (CI has no stdin).
pub fn run_cmd(mut cmd: Command) -> Result<()> {
    let line = display(&cmd);
    println!("$ {line}");
    let status = cmd
        .stdin(Stdio::null())
        .status()
        .with_context(|| format!("could not start `{line}`"))?;
    if !status.success() {
        bail!("`{line}` failed ({status})");
    }
    Ok(())
}

/// Runs a command quietly and returns its stdout and stderr together, or None if it could
/// not be started. The exit status is ignored: some tools print their version and exit 1.
pub fn output(mut cmd: impl BorrowMut<Command>) -> Option<String> {
    let out = cmd.borrow_mut().stdin(Stdio::null()).output().ok()?;
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    Some(text)
}

/// Runs a command quietly; true if it exited 0.
pub fn succeeds(mut cmd: impl BorrowMut<Command>) -> bool {
    cmd.borrow_mut()
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_print_in_seconds_then_minutes() {
        assert_eq!(human(Duration::from_millis(12_340)), "12.3s");
        assert_eq!(human(Duration::from_millis(245_600)), "4m 05.6s");
    }
}
