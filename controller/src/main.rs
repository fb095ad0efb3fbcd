//! `weir`: the Weir controller's command line.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use weir_controller::{demo, local};

#[derive(Parser)]
#[command(
    name = "weir",
    version,
    about = "Progressive delivery with the data plane doing the splitting and the measuring"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Clone)]
struct Binaries {
    /// The Envoy binary (default: .tools/envoy/bin/envoy of this checkout, else `envoy` on PATH).
    #[arg(long, env = "WEIR_ENVOY")]
    envoy: Option<PathBuf>,
    /// The Weir filter (default: target/wasm32-wasip1/wasm/weir_filter.wasm of this checkout).
    #[arg(long, env = "WEIR_WASM")]
    wasm: Option<PathBuf>,
}

/// Where checks get their numbers, and where the controller publishes its own metrics.
#[derive(clap::Args, Clone)]
struct MetricsArgs {
    /// Which source the built-in checks (request-success-rate, request-duration) use: auto
    /// (streamed while filters report for the canary, else Prometheus), streamed, or prometheus.
    /// MetricTemplates and inline queries always run on Prometheus.
    #[arg(long, default_value = "auto")]
    metric_source: weir_controller::metrics::select::SourcePolicy,
    /// Prometheus for Canaries without spec.metricsServer, e.g. http://127.0.0.1:9090 (http only).
    #[arg(long, env = "WEIR_PROMETHEUS_ADDRESS")]
    prometheus_address: Option<String>,
    /// Credentials for --prometheus-address: a Secret manifest or a YAML map with `username` and
    /// `password`, or `token`.
    #[arg(long, env = "WEIR_PROMETHEUS_CREDENTIALS")]
    prometheus_credentials: Option<PathBuf>,
    /// How long one Prometheus query may take.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    prometheus_timeout: Duration,
    /// Serve the controller's own metrics (Prometheus text format) at http://<address>/metrics.
    #[arg(long)]
    metrics_address: Option<std::net::SocketAddr>,
}

impl MetricsArgs {
    fn options(&self) -> local::LocalMetricsOptions {
        local::LocalMetricsOptions {
            source: self.metric_source,
            prometheus: self.prometheus_address.clone(),
            prometheus_credentials: self.prometheus_credentials.clone(),
            prometheus_timeout: Some(self.prometheus_timeout),
            listen_metrics: self.metrics_address,
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Replay the Flagger tutorial's three experiments locally (time-compressed).
    Demo {
        #[command(flatten)]
        binaries: Binaries,
        /// Folder for the demo's state.
        #[arg(long, default_value = ".weir")]
        state: PathBuf,
        /// Time compression: 30 makes an interval of 1m last 2s.
        #[arg(long, default_value_t = 30)]
        time_scale: u32,
        /// Requests per second of the demo's own load.
        #[arg(long, default_value_t = 600)]
        rate: u32,
    },
    /// Run one Canary in local mode: its workload as local processes behind a real Envoy.
    Local {
        #[command(flatten)]
        binaries: Binaries,
        /// The Canary file (Flagger's format; apiVersion weir.dev/v1alpha1).
        #[arg(long)]
        canary: PathBuf,
        /// Folder with one workload file per target, `<target>.yaml`.
        #[arg(long)]
        workloads: PathBuf,
        /// State folder (status, events, logs); a restart resumes from it.
        #[arg(long, default_value = ".weir/local")]
        state: PathBuf,
        /// Envoy's listener port on 127.0.0.1.
        #[arg(long, default_value_t = 10000)]
        port: u16,
        /// How often the filters report, e.g. 1s or 250ms.
        #[arg(long, default_value = "1s", value_parser = parse_duration)]
        report_interval: Duration,
        /// Divide the analysis' durations by this.
        #[arg(long, default_value_t = 1)]
        time_scale: u32,
        #[command(flatten)]
        metrics: MetricsArgs,
    },
    /// Retry the failed version of a local-mode canary without changing it.
    Retry {
        /// The local mode's state folder.
        #[arg(long, default_value = ".weir/local")]
        state: PathBuf,
    },
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    weir_controller::spec::parse_go_duration(text).map_err(|e| e.to_string())
}

/// The checkout this binary was built in (target/<profile>/weir → the root), if it is one.
fn checkout_root() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let root = exe.parent()?.parent()?.parent()?.to_owned();
    root.join("Cargo.toml").is_file().then_some(root)
}

impl Binaries {
    fn envoy(&self) -> PathBuf {
        self.envoy.clone().unwrap_or_else(|| {
            checkout_root()
                .map(|r| r.join(".tools/envoy/bin/envoy"))
                .filter(|p| p.is_file())
                .unwrap_or_else(|| PathBuf::from("envoy"))
        })
    }

    fn wasm(&self) -> anyhow::Result<PathBuf> {
        if let Some(wasm) = &self.wasm {
            return Ok(wasm.clone());
        }
        checkout_root()
            .map(|r| r.join("target/wasm32-wasip1/wasm/weir_filter.wasm"))
            .filter(|p| p.is_file())
            .context("the Weir filter was not found: build it with `cargo xtask wasm`, or pass --wasm / WEIR_WASM")
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    match Cli::parse().command {
        Command::Demo {
            binaries,
            state,
            time_scale,
            rate,
        } => {
            let ok = demo::run(demo::DemoOptions {
                state_root: state,
                envoy: binaries.envoy(),
                wasm: binaries.wasm()?,
                time_scale,
                rate,
            })
            .await?;
            if !ok {
                std::process::exit(1);
            }
        }
        Command::Local {
            binaries,
            canary,
            workloads,
            state,
            port,
            report_interval,
            time_scale,
            metrics,
        } => {
            let options = local::LocalOptions {
                canary,
                workloads,
                state,
                listen_port: port,
                envoy: binaries.envoy(),
                wasm: binaries.wasm()?,
                report_interval,
                time_scale,
                echo_events: true,
            };
            let mut mode = local::LocalMode::start_with(&options, &metrics.options()).await?;
            for warning in mode.warnings() {
                eprintln!("warning: {warning}");
            }
            if let Some(addr) = mode.metrics_addr() {
                println!("weir local: metrics at http://{addr}/metrics");
            }
            println!(
                "weir local: send traffic to http://{} with Host: {}",
                mode.listener(),
                mode.host()
            );
            loop {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => break,
                    () = tokio::time::sleep(mode.until_next_step()) => mode.tick().await,
                }
            }
            mode.shutdown().await;
        }
        Command::Retry { state } => {
            let token = local::request_retry(&state).map_err(anyhow::Error::msg)?;
            println!("retry requested (token {token}); the running controller retries the failed version at its next step");
        }
    }
    Ok(())
}
