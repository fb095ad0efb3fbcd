//! `weir demo`: the Flagger tutorial's experiments replayed in local mode, through a real Envoy
//! with the Weir filter, time-compressed, then two with Weir's comparative judge. Exits non-zero
//! when an experiment does not end as it should.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use weir_proto::v1::Version;

use crate::local::{describe_line, LocalMode, LocalOptions};
use crate::spec::{Phase, Timestamp};

/// The tutorial's Canary, with the analysis block exactly as the tutorial writes it.
pub const TUTORIAL_CANARY: &str = r#"apiVersion: weir.dev/v1alpha1
kind: Canary
metadata:
  name: mhs
  namespace: application
spec:
  targetRef:
    apiVersion: apps/v1
    kind: Deployment
    name: mhs
  progressDeadlineSeconds: 60
  service:
    port: 80
    targetPort: 8080
  analysis:
    interval: 1m
    maxWeight: 50
    stepWeight: 10
    threshold: 5
    metrics:
    - name: request-success-rate
      thresholdRange: {min: 99}
      interval: 30s
    - name: request-duration
      thresholdRange: {max: 500}
      interval: 30s
"#;

/// The tutorial's Canary after the tutorial: the fixed success-rate check replaced by Weir's
/// comparative judge (the P99 check stays).
pub fn judged_canary() -> String {
    TUTORIAL_CANARY.replace(
        "    - name: request-success-rate\n      thresholdRange: {min: 99}\n      interval: 30s\n",
        "",
    ) + "    judge: {confidence: 0.99}\n"
}

/// The local stand-in for the tutorial's Deployment at `version`.
pub fn mirror_workload(version: &str) -> String {
    mirror_workload_with(version, &[])
}

/// The same with more `mirror` flags (`--error-rate 0.5`: the version fails on its own).
pub fn mirror_workload_with(version: &str, flags: &[&str]) -> String {
    let extra: String = flags.iter().map(|f| format!(", \"{f}\"")).collect();
    format!("command: mirror\nargs: [\"--listen\", \"{{address}}\", \"--version\", \"{version}\"{extra}]\nreadinessPath: /healthz\n")
}

/// Demo settings.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Where to keep state (a fresh folder is made inside).
    pub state_root: PathBuf,
    /// The Envoy binary.
    pub envoy: PathBuf,
    /// The Weir filter.
    pub wasm: PathBuf,
    /// Time compression (30: an interval of 1m lasts 2s).
    pub time_scale: u32,
    /// Requests per second the demo sends.
    pub rate: u32,
}

/// The shared load generator state.
struct Load {
    errors: AtomicBool,
    /// Send only every n-th request of the schedule (1: the full rate).
    every: AtomicU64,
    sent: AtomicU64,
    failed: AtomicU64,
    stop: AtomicBool,
}

/// Runs the demo; Ok(true) when every experiment ended as expected.
pub async fn run(options: DemoOptions) -> anyhow::Result<bool> {
    let stamp = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)?
        .as_secs();
    let root = options.state_root.join(format!("demo-{stamp}"));
    let workloads = root.join("workloads");
    std::fs::create_dir_all(&workloads)?;
    let canary_file = root.join("canary.yaml");
    std::fs::write(&canary_file, TUTORIAL_CANARY)?;
    let set_version =
        |version: &str| std::fs::write(workloads.join("mhs.yaml"), mirror_workload(version));
    set_version("1.1.1")?;

    let scale = options.time_scale.max(1);
    println!("Weir demo: the Flagger tutorial's experiments in local mode (a real Envoy with the Weir filter,");
    println!("the controller, and the `mirror` app as local processes). Time is compressed {scale}x: the");
    println!(
        "analysis interval 1m lasts {:?} and the metric interval 30s covers {:?}. State: {}",
        Duration::from_secs(60) / scale,
        Duration::from_secs(30) / scale,
        root.display()
    );
    println!("\n{TUTORIAL_CANARY}");

    let mut local = LocalMode::start(&LocalOptions {
        canary: canary_file.clone(),
        workloads: workloads.clone(),
        state: root.join("state"),
        listen_port: 0,
        envoy: options.envoy,
        wasm: options.wasm,
        report_interval: Duration::from_millis(250),
        time_scale: scale,
        echo_events: true,
        filter_install: crate::filter_module::InstallKind::default(),
        envoy_concurrency: 2,
        telemetry_tls: None,
        telemetry_port: 0,
        filters_report_to: None,
    })
    .await?;
    for warning in local.warnings() {
        println!("warning: {warning}");
    }
    println!(
        "Envoy listens on http://{} (Host: {})\n",
        local.listener(),
        local.host()
    );

    let load = Arc::new(Load {
        errors: AtomicBool::new(false),
        every: AtomicU64::new(1),
        sent: AtomicU64::new(0),
        failed: AtomicU64::new(0),
        stop: AtomicBool::new(false),
    });
    let load_task = tokio::spawn(drive_load(
        local.listener(),
        local.host(),
        options.rate,
        load.clone(),
    ));
    let started = Timestamp::from_system_time(SystemTime::now());
    let interval = local.plan().analysis.interval;
    let mut ok = true;

    println!("== Experiment 0: deploy v1.1.1, initialized without analysis");
    ok &= wait_for(&mut local, Phase::Initialized, interval * 10).await;
    ok &= expect_primary(&local, "1.1.1").await;

    println!("\n== Experiment 1: v1.1.2 under healthy traffic: advanced 10 -> 50 and promoted");
    set_version("1.1.2")?;
    ok &= wait_for(&mut local, Phase::Succeeded, interval * 20).await;
    ok &= expect_primary(&local, "1.1.2").await;

    println!("\n== Experiment 2: v1.1.3 while half the traffic carries X-Mirror-Code: 500: halted, rolled back");
    load.errors.store(true, Ordering::Relaxed);
    set_version("1.1.3")?;
    ok &= wait_for(&mut local, Phase::Failed, interval * 20).await;
    load.errors.store(false, Ordering::Relaxed);
    ok &= expect_primary(&local, "1.1.2").await;
    let halts = count_events(&local, "advancement success rate");
    if halts != 5 {
        println!("expected 5 halts on the success rate, saw {halts}");
        ok = false;
    }

    println!("\n== Experiment 3: experiment 2 again, with the comparative judge in place of the fixed success-rate check:");
    println!("   both versions fail the client-requested 500s alike, so the canary is promoted, and each step says why");
    let judged = judged_canary();
    println!("\n{judged}");
    std::fs::write(&canary_file, &judged)?;
    load.errors.store(true, Ordering::Relaxed);
    set_version("1.1.4")?;
    ok &= wait_for(&mut local, Phase::Succeeded, interval * 20).await;
    load.errors.store(false, Ordering::Relaxed);
    ok &= expect_primary(&local, "1.1.4").await;
    if count_events(&local, "judge ") == 0 {
        println!("expected the advances to carry the judge's verdict");
        ok = false;
    }

    println!("\n== Experiment 4: v1.1.5 fails half its requests on its own, at low traffic: the judge rolls it back within seconds");
    // 24 requests per second in all: the canary gets two or three a second at 10%.
    load.every.store(25, Ordering::Relaxed);
    let rollbacks_before =
        count_events(&local, "Rolling back mhs.application: canary failure rate");
    std::fs::write(
        workloads.join("mhs.yaml"),
        mirror_workload_with("1.1.5", &["--error-rate", "0.5"]),
    )?;
    ok &= wait_for(&mut local, Phase::Failed, interval * 20).await;
    load.every.store(1, Ordering::Relaxed);
    ok &= expect_primary(&local, "1.1.4").await;
    match judge_reaction(&local) {
        Some(reaction)
            if count_events(&local, "Rolling back mhs.application: canary failure rate")
                > rollbacks_before =>
        {
            println!("   rolled back {reaction:.1?} after the canary first got traffic (the analysis interval is {interval:?})");
        }
        _ => {
            println!("expected a rollback by the judge");
            ok = false;
        }
    }

    load.stop.store(true, Ordering::Relaxed);
    let _ = load_task.await;
    println!("\nkubectl describe canary/mhs -n application  (as Weir recorded it)");
    println!(
        "Status:\n  Phase:          {}",
        local
            .status()
            .phase
            .map_or("-".to_owned(), |p| p.to_string())
    );
    println!(
        "  Canary Weight:  {}\n  Failed Checks:  {}",
        local.status().canary_weight,
        local.status().failed_checks
    );
    println!("Events:\n  Type     Reason   Age     From  Message\n  ----     ------   ----    ----  -------");
    for event in local
        .events()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
    {
        println!("{}", describe_line(event, Some(started)));
    }
    println!(
        "\nload: {} requests sent, {} answered 5xx (half of experiment 2's traffic asks for a 500)",
        load.sent.load(Ordering::Relaxed),
        load.failed.load(Ordering::Relaxed)
    );
    let counters = local.ingest().counters().snapshot();
    println!(
        "telemetry: {} reports applied carrying {} requests, {} duplicates, rejected by reason {:?}",
        counters.reports_applied, counters.requests_applied, counters.duplicates, counters.rejected
    );
    if let Some(rejection) = local.ingest().counters().last_rejection() {
        println!("last rejected report: {rejection:?}");
    }
    local.shutdown().await;
    println!(
        "{}",
        if ok {
            "\nAll experiments ended as expected."
        } else {
            "\nAn experiment did NOT end as expected."
        }
    );
    Ok(ok)
}

/// Steps the controller until `phase` (or the timeout), printing a progress line.
async fn wait_for(local: &mut LocalMode, phase: Phase, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    let mut last_line = Instant::now();
    let tty = std::io::stdout().is_terminal();
    loop {
        local.tick().await;
        if local.status().phase == Some(phase) {
            println!("{}", progress(local));
            return true;
        }
        if Instant::now() >= deadline {
            println!(
                "\ntimed out after {timeout:?} waiting for phase {phase}; now {}",
                progress(local)
            );
            return false;
        }
        if last_line.elapsed() >= Duration::from_secs(1) {
            last_line = Instant::now();
            if tty {
                print!("\r{}   ", progress(local));
                let _ = std::io::Write::flush(&mut std::io::stdout());
            } else {
                println!("{}", progress(local));
            }
        }
        tokio::time::sleep(local.until_next_step()).await;
    }
}

fn progress(local: &LocalMode) -> String {
    let status = local.status();
    let key = local.plan().key();
    let window = local
        .plan()
        .analysis
        .metrics
        .first()
        .map_or(Duration::from_secs(1), |m| m.window);
    let version =
        |v: Version| match local
            .ingest()
            .window(&key, v, window, std::time::Instant::now())
        {
            Some(w) if w.requests > 0 => format!(
                "{:6.2}% ok, p99 {:6.1}ms ({:>4} req)",
                w.success_rate_percent().unwrap_or(0.0),
                w.p99_ms().unwrap_or(0.0),
                w.requests
            ),
            _ => "          no traffic           ".to_owned(),
        };
    format!(
        "  {:<16} weight {:>3}%  failed checks {}  | primary {} | canary {}",
        status.phase.map_or("-".to_owned(), |p| p.to_string()),
        status.canary_weight.to_string(),
        status.failed_checks,
        version(Version::Primary),
        version(Version::Canary),
    )
}

/// How long after the last rollout's first weight increase the judge rolled it back.
fn judge_reaction(local: &LocalMode) -> Option<Duration> {
    let events = local.events();
    let events = events.lock().unwrap_or_else(|p| p.into_inner());
    let rollback = events.iter().rev().find(|e| {
        e.event
            .message
            .starts_with("Rolling back mhs.application: canary")
    })?;
    let advance = events
        .iter()
        .rev()
        .filter(|e| e.time <= rollback.time)
        .find(|e| {
            e.event
                .message
                .starts_with("Advance mhs.application canary weight 10")
        })?;
    Some(rollback.time.since(advance.time))
}

fn count_events(local: &LocalMode, needle: &str) -> usize {
    local
        .events()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .filter(|e| e.event.message.contains(needle))
        .count()
}

/// Checks which version the primary serves (a request with weight 0 reaches only primary).
async fn expect_primary(local: &LocalMode, version: &str) -> bool {
    let mut seen = String::new();
    for _ in 0..20 {
        if let Ok((_, served)) = get(local.listener(), &local.host(), false).await {
            seen = served;
            if seen == version {
                println!("   primary serves v{version}");
                return true;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!("   expected the primary to serve v{version}, it serves `{seen}`");
    false
}

async fn drive_load(target: SocketAddr, host: String, rate: u32, load: Arc<Load>) {
    const WORKERS: u32 = 8;
    let period = Duration::from_secs(1) * WORKERS / rate.max(1);
    let mut tasks = Vec::new();
    for worker in 0..WORKERS {
        let (host, load) = (host.clone(), load.clone());
        tasks.push(tokio::spawn(async move {
            let mut n: u64 = worker.into();
            let mut ticker = tokio::time::interval(period);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut connection: Option<TcpStream> = None;
            while !load.stop.load(Ordering::Relaxed) {
                ticker.tick().await;
                n += 1;
                if !n.is_multiple_of(load.every.load(Ordering::Relaxed).max(1)) {
                    continue;
                }
                let error = load.errors.load(Ordering::Relaxed) && n.is_multiple_of(2);
                load.sent.fetch_add(1, Ordering::Relaxed);
                let stream = match connection.take() {
                    Some(stream) => stream,
                    None => match TcpStream::connect(target).await {
                        Ok(stream) => stream,
                        Err(_) => {
                            load.failed.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                    },
                };
                match exchange(stream, &host, error, true).await {
                    Ok((stream, status, _)) => {
                        if status >= 500 {
                            load.failed.fetch_add(1, Ordering::Relaxed);
                        }
                        connection = Some(stream);
                    }
                    Err(_) => {
                        load.failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    for task in tasks {
        let _ = task.await;
    }
}

/// One GET through Envoy on a new connection; returns the status and the `x-mirror-version`
/// header.
async fn get(target: SocketAddr, host: &str, error: bool) -> std::io::Result<(u16, String)> {
    let stream = TcpStream::connect(target).await?;
    let (_, status, version) = exchange(stream, host, error, false).await?;
    Ok((status, version))
}

/// One request/response on `stream`, handing the connection back for reuse when `keep_alive`.
async fn exchange(
    mut stream: TcpStream,
    host: &str,
    error: bool,
    keep_alive: bool,
) -> std::io::Result<(TcpStream, u16, String)> {
    let exchange = async {
        let extra = if error { "X-Mirror-Code: 500\r\n" } else { "" };
        let connection = if keep_alive { "keep-alive" } else { "close" };
        let request =
            format!("GET / HTTP/1.1\r\nHost: {host}\r\n{extra}Connection: {connection}\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        // Read the head, then exactly Content-Length bytes: don't rely on the peer closing.
        let mut response = Vec::new();
        let mut chunk = [0u8; 4096];
        let head_end = loop {
            if let Some(i) = response.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                break response.len();
            }
            response.extend_from_slice(&chunk[..n]);
        };
        let text = String::from_utf8_lossy(&response[..head_end]).into_owned();
        let header = |wanted: &str| {
            text.lines().find_map(|l| {
                let (name, value) = l.split_once(':')?;
                name.eq_ignore_ascii_case(wanted)
                    .then(|| value.trim().to_owned())
            })
        };
        let length: usize = header("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        while response.len() < head_end + length {
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                break;
            }
            response.extend_from_slice(&chunk[..n]);
        }
        let status = text.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
        let version = header("x-mirror-version").unwrap_or_default();
        Ok((stream, status, version))
    };
    tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .unwrap_or_else(|_| Err(std::io::Error::other("timed out")))
}

/// Where the demo keeps its state by default.
pub fn default_state_root() -> PathBuf {
    Path::new(".weir").to_owned()
}
