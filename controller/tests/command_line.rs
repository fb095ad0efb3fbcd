//! The `weir` binary itself: what its help says and how it logs.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

fn weir() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_weir"));
    cmd.env_remove("NO_COLOR").env_remove("RUST_LOG");
    cmd
}

/// Kills the child if the test ends first.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn the_help_says_the_pod_name_may_be_left_out_outside_the_cluster() {
    let out = weir().args(["kubernetes", "--help"]).output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    let pod = help
        .split("--pod-name")
        .nth(1)
        .expect("--pod-name is documented");
    let pod = pod.split("\n  -").next().unwrap().replace('\n', " ");
    let pod = pod.split_whitespace().collect::<Vec<_>>().join(" ");
    assert!(pod.contains("Leave it unset outside the cluster"), "{pod}");
    assert!(pod.contains("nothing is labelled"), "{pod}");
}

#[test]
fn logs_carry_no_colour_codes_when_not_written_to_a_terminal() {
    // A cluster nobody serves: the controller starts, logs, and finds the API unreachable.
    let dir = std::env::temp_dir().join(format!("weir-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        "apiVersion: v1\nkind: Config\n\
         clusters: [{name: nowhere, cluster: {server: \"https://127.0.0.1:1\"}}]\n\
         users: [{name: nobody, user: {token: \"x\"}}]\n\
         contexts: [{name: nowhere, context: {cluster: nowhere, user: nobody}}]\n\
         current-context: nowhere\n",
    )
    .unwrap();
    let child = weir()
        .args(["kubernetes", "--kubeconfig"])
        .arg(&kubeconfig)
        .args([
            "--leader-election",
            "false",
            "--http-address",
            "127.0.0.1:0",
            "--grpc-address",
            "127.0.0.1:0",
        ])
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut guard = Guard(child);
    let stdout = guard.0.stdout.take().unwrap();
    let (lines, received) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines.send(line).is_err() {
                break;
            }
        }
    });
    let mut seen = Vec::new();
    while !seen
        .iter()
        .any(|l: &String| l.contains("the Kubernetes API server is unreachable"))
    {
        match received.recv_timeout(Duration::from_secs(30)) {
            Ok(line) => seen.push(line),
            Err(e) => panic!("no such log line within 30 s ({e}); got {seen:#?}"),
        }
    }
    drop(guard);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        seen.iter()
            .any(|l| l.contains("health and metrics endpoints listening")),
        "{seen:#?}"
    );
    for line in &seen {
        assert!(!line.contains('\u{1b}'), "an escape code in {line:?}");
    }
}

#[test]
fn named_kubectl_weir_it_answers_as_a_kubectl_plugin_and_acts_on_a_cluster() {
    let dir = std::env::temp_dir().join(format!("weir-plugin-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let plugin = dir.join("kubectl-weir");
    let _ = std::fs::remove_file(&plugin);
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_weir"), &plugin).unwrap();

    let out = Command::new(&plugin)
        .args(["status", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("Usage: kubectl weir status"), "{help}");

    // As a plugin the verbs go to the cluster (here a kubeconfig that is not there), not to a
    // local state folder.
    let out = Command::new(&plugin)
        .args(["pause", "podinfo"])
        .env("KUBECONFIG", dir.join("missing-kubeconfig"))
        .env("HOME", &dir)
        .env_remove("KUBERNETES_SERVICE_HOST")
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        said.contains("cannot configure the Kubernetes client"),
        "{said}"
    );
    assert!(!said.contains(".weir/local"), "{said}");

    // As weir, the same verb acts on local mode's state folder.
    let out = weir()
        .args(["pause", "--state"])
        .arg(dir.join("no-state"))
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && said.contains("holds no canary status"),
        "{said}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
