//! `weir`: the Weir controller's command line.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use weir_controller::analysis::Verb;
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
    /// Prometheus for Canaries without spec.metricsServer, e.g. http://127.0.0.1:9090.
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

/// The HTTP client of webhooks, alerts and Prometheus queries.
#[derive(clap::Args, Clone)]
struct HttpArgs {
    /// CA certificates (PEM) to trust besides the system's, for https webhooks, alert providers
    /// and Prometheus servers signed by a private CA.
    #[arg(long, env = "WEIR_CA_FILE")]
    ca_file: Option<PathBuf>,
}

impl HttpArgs {
    /// Builds the process's shared HTTP client; a bad CA file stops the start with the reason.
    fn install(&self) -> anyhow::Result<()> {
        use weir_controller::http;
        let client = http::HttpClient::try_new(&http::HttpOptions {
            ca_file: self.ca_file.clone(),
        })?;
        if http::install(client).is_err() {
            anyhow::bail!("the HTTP client was built twice");
        }
        Ok(())
    }
}

/// `weir kubernetes`: the cluster controller's flags.
#[derive(clap::Args, Clone)]
struct KubernetesArgs {
    /// A kubeconfig file (default: KUBECONFIG, ~/.kube/config, then the in-cluster config).
    #[arg(long, env = "WEIR_KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// Namespaces whose Canaries to act on, comma-separated or repeated (default: all).
    #[arg(long = "namespace", env = "WEIR_NAMESPACES", value_delimiter = ',')]
    namespaces: Vec<String>,
    /// Where the filters' gRPC stream (weir.v1 Telemetry) is served.
    #[arg(long, env = "WEIR_GRPC_ADDRESS", default_value = "0.0.0.0:9090")]
    grpc_address: std::net::SocketAddr,
    /// Where /healthz, /readyz and /metrics are served.
    #[arg(long, env = "WEIR_HTTP_ADDRESS", default_value = "0.0.0.0:8080")]
    http_address: std::net::SocketAddr,
    /// The header the filters set and the VirtualServices match (the filter's routingHeader).
    #[arg(long, env = "WEIR_ROUTING_HEADER", default_value = "x-weir-route")]
    routing_header: String,
    /// How long a routed canary may go without any filter report before its VirtualService
    /// carries the weights itself (Flagger-style routing).
    #[arg(long, env = "WEIR_FALLBACK_AFTER", default_value = "60s", value_parser = parse_duration)]
    fallback_after: Duration,
    /// Compete for a Lease so that only one replica acts (disable only with a single replica).
    #[arg(long, env = "WEIR_LEADER_ELECTION", default_value_t = true, action = clap::ArgAction::Set)]
    leader_election: bool,
    /// Namespace of the Lease (the controller's own namespace).
    #[arg(long, env = "POD_NAMESPACE", default_value = "weir-system")]
    lease_namespace: String,
    /// Name of the Lease.
    #[arg(long, env = "WEIR_LEASE_NAME", default_value = "weir-controller")]
    lease_name: String,
    /// How long the Lease holds without renewal.
    #[arg(long, env = "WEIR_LEASE_DURATION", default_value = "15s", value_parser = parse_duration)]
    lease_duration: Duration,
    /// This Pod's name (the downward API's metadata.name): the leader labels its own Pod, so
    /// that the controller Service, and through it the filters, reach the leader. Leave it
    /// unset outside the cluster (a laptop, tests): then, as when no such Pod exists, nothing is
    /// labelled and the filters must reach this process another way.
    #[arg(long, env = "POD_NAME")]
    pod_name: Option<String>,
    /// How long the reconciles under way may take to finish on SIGTERM (keep it below the Pod's
    /// terminationGracePeriodSeconds); clean-up (label, Lease) takes at most a few seconds more.
    #[arg(long, env = "WEIR_SHUTDOWN_GRACE", default_value = "10s", value_parser = parse_duration)]
    shutdown_grace: Duration,
    /// Which source the built-in checks use: auto (streamed while filters report, else
    /// Prometheus), streamed, or prometheus.
    #[arg(long, env = "WEIR_METRIC_SOURCE", default_value = "auto")]
    metric_source: weir_controller::metrics::select::SourcePolicy,
    /// Prometheus for Canaries without spec.metricsServer, e.g. http://prometheus.istio-system:9090.
    #[arg(long, env = "WEIR_PROMETHEUS_ADDRESS")]
    prometheus_address: Option<String>,
    /// The filter module this controller serves at /filter/<sha256>.wasm on its HTTP port
    /// (default: the one the image carries, /usr/local/lib/weir/weir_filter.wasm, else this
    /// checkout's build; without either, the filter is neither served nor installed).
    #[arg(long, env = "WEIR_FILTER_MODULE")]
    filter_module: Option<PathBuf>,
    /// How the leader puts the filter into opted-in Pods (label weir.dev/filter=enabled on a Pod
    /// or a Namespace): wasmplugin (an Istio WasmPlugin), envoyfilter (an EnvoyFilter, for older
    /// Istio releases), or none (you install it; the module is still served).
    #[arg(long, env = "WEIR_FILTER_INSTALL", default_value = "wasmplugin")]
    filter_install: weir_controller::filter_module::InstallKind,
    /// Istio's root namespace, where the mesh-wide WasmPlugin or EnvoyFilter goes.
    #[arg(long, env = "WEIR_ISTIO_NAMESPACE", default_value = "istio-system")]
    istio_namespace: String,
    #[command(flatten)]
    telemetry: TelemetryArgs,
    #[command(flatten)]
    http: HttpArgs,
}

/// Local mode over TLS, as in a mesh: the controller's certificate, key and CA, and Envoy's
/// workload certificate (all five, or none for plaintext on loopback).
#[derive(clap::Args, Clone)]
struct LocalTlsArgs {
    /// The controller's certificate chain (PEM).
    #[arg(long = "tls-cert", requires_all = ["local_key", "local_ca", "envoy_cert", "envoy_key"])]
    local_cert: Option<PathBuf>,
    /// The controller's private key (PEM).
    #[arg(long = "tls-key", requires = "local_cert")]
    local_key: Option<PathBuf>,
    /// The CA both certificates chain to (PEM).
    #[arg(long = "tls-client-ca", requires = "local_cert")]
    local_ca: Option<PathBuf>,
    /// Envoy's certificate (PEM, with a spiffe://<trust-domain>/ns/<ns>/sa/<sa> URI SAN).
    #[arg(long = "envoy-tls-cert", requires = "local_cert")]
    envoy_cert: Option<PathBuf>,
    /// Envoy's private key (PEM).
    #[arg(long = "envoy-tls-key", requires = "local_cert")]
    envoy_key: Option<PathBuf>,
}

impl LocalTlsArgs {
    fn local_tls(&self) -> Option<local::LocalTls> {
        Some(local::LocalTls {
            controller: weir_controller::ingest::transport::TlsFiles {
                cert_chain: self.local_cert.clone()?,
                private_key: self.local_key.clone()?,
                client_ca: self.local_ca.clone()?,
            },
            envoy_cert: self.envoy_cert.clone()?,
            envoy_key: self.envoy_key.clone()?,
        })
    }
}

/// How the filters authenticate to the controller, and who may report.
#[derive(clap::Args, Clone)]
struct TelemetryArgs {
    /// The controller's certificate chain (PEM) for the filters' stream: in a cluster, the one
    /// Istio's agent writes for the controller's Pod (OUTPUT_CERTS). Without the three TLS files
    /// the stream is served in plaintext, which is allowed only on a loopback address.
    #[arg(long, env = "WEIR_TLS_CERT", requires_all = ["tls_key", "tls_client_ca"])]
    tls_cert: Option<PathBuf>,
    /// The controller's private key (PEM).
    #[arg(long, env = "WEIR_TLS_KEY", requires_all = ["tls_cert", "tls_client_ca"])]
    tls_key: Option<PathBuf>,
    /// The CA certificates the filters' workload certificates must chain to: the mesh's root.
    #[arg(long, env = "WEIR_TLS_CLIENT_CA", requires_all = ["tls_cert", "tls_key"])]
    tls_client_ca: Option<PathBuf>,
    /// The mesh's trust domain: workload identities of another are refused.
    #[arg(long, env = "WEIR_TRUST_DOMAIN", default_value = "cluster.local")]
    trust_domain: String,
    /// Identities that may report for every canary, as namespace/service-account or
    /// namespace/* (comma-separated): the ingress gateways'. A canary hears its own namespace
    /// and what its spec.analysis.reporters adds.
    #[arg(
        long,
        env = "WEIR_TRUSTED_REPORTERS",
        value_delimiter = ',',
        default_value = "istio-system/istio-ingressgateway-service-account"
    )]
    trusted_reporters: Vec<String>,
    /// While this replica is not the leader, serve its filters as a relay of the leader's
    /// ingest at this host:port (the `weir-leader` Service): their reports are merged and
    /// forwarded, the leader's directives passed down (docs/scale.md). Unset: a standby serves
    /// no filters.
    #[arg(long, env = "WEIR_RELAY_TO")]
    relay_to: Option<String>,
}

impl TelemetryArgs {
    fn telemetry(&self) -> anyhow::Result<weir_controller::platform::kubernetes::run::Telemetry> {
        use weir_controller::ingest::identity::{ReporterPolicy, ReporterRule};
        use weir_controller::ingest::transport::{TlsFiles, Transport};
        let transport = match (&self.tls_cert, &self.tls_key, &self.tls_client_ca) {
            (Some(cert), Some(key), Some(ca)) => Transport::Tls(TlsFiles {
                cert_chain: cert.clone(),
                private_key: key.clone(),
                client_ca: ca.clone(),
            }),
            _ => Transport::PlaintextLoopback,
        };
        let everywhere = self
            .trusted_reporters
            .iter()
            .filter(|r| !r.is_empty())
            .map(|r| {
                ReporterRule::parse(r).map_err(|e| anyhow::anyhow!("--trusted-reporters: {e}"))
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(weir_controller::platform::kubernetes::run::Telemetry {
            transport,
            policy: ReporterPolicy {
                trust_domain: self.trust_domain.clone(),
                everywhere,
            },
            relay_to: self.relay_to.clone().filter(|to| !to.is_empty()),
        })
    }
}

impl KubernetesArgs {
    async fn run(self) -> anyhow::Result<()> {
        use weir_controller::metrics::prometheus::{
            PrometheusAddress, PrometheusConfig, PrometheusSource,
        };
        use weir_controller::metrics::select::SelectingSource;
        use weir_controller::platform::kubernetes::filter_install::{
            FilterInstallation, InstallSettings,
        };
        use weir_controller::platform::kubernetes::{run, Settings};

        self.http.install()?;

        let prometheus = self
            .prometheus_address
            .as_deref()
            .map(PrometheusAddress::try_new)
            .transpose()
            .map_err(|e| anyhow::anyhow!("--prometheus-address: {e}"))?
            .map(PrometheusConfig::new);
        let policy = self.metric_source;
        let settings = InstallSettings {
            kind: self.filter_install,
            root_namespace: self.istio_namespace.clone(),
            controller_namespace: self.lease_namespace.clone(),
            grpc_port: self.grpc_address.port(),
            http_port: self.http_address.port(),
            routing_header: self.routing_header.clone(),
        };
        let filter = match filter_module(self.filter_module.as_deref())? {
            Some(module) => {
                let installation = FilterInstallation::new(&module, &settings);
                Some((std::sync::Arc::new(module), installation))
            }
            None => {
                tracing::warn!(
                    "no filter module at {} or in this checkout: the filter is neither served nor installed, so Canaries are routed by VirtualService weights (pass --filter-module or WEIR_FILTER_MODULE)",
                    weir_controller::filter_module::DEFAULT_PATH
                );
                None
            }
        };
        let options = run::KubernetesOptions {
            kubeconfig: self.kubeconfig,
            namespaces: self
                .namespaces
                .into_iter()
                .filter(|n| !n.is_empty())
                .collect(),
            grpc_address: self.grpc_address,
            http_address: self.http_address,
            settings: Settings {
                routing_header: self.routing_header,
                fallback_after: self.fallback_after,
                instance: self.pod_name.clone().unwrap_or_else(|| "weir".to_owned()),
                ..Settings::default()
            },
            leader_election: self.leader_election,
            lease_namespace: self.lease_namespace,
            lease_name: self.lease_name,
            lease_duration: self.lease_duration,
            pod_name: self.pod_name,
            filter,
            shutdown_grace: self.shutdown_grace,
            telemetry: self.telemetry.telemetry()?,
        };
        run::run(options, move |ingest, templates| {
            SelectingSource::new(ingest, PrometheusSource::new(prometheus, templates), policy)
        })
        .await?;
        Ok(())
    }
}

#[derive(Subcommand)]
enum Command {
    /// Replay the Flagger tutorial's three experiments locally (time-compressed), then two with
    /// the comparative judge.
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
        /// How the filter gets into Envoy: wasmplugin (as Istio delivers a WasmPlugin) or
        /// envoyfilter (Envoy fetches the module from the controller, as the EnvoyFilter
        /// alternative installs it).
        #[arg(long, default_value = "wasmplugin")]
        filter_install: weir_controller::filter_module::InstallKind,
        /// Envoy's worker threads.
        #[arg(long, default_value_t = 2)]
        envoy_concurrency: u32,
        #[command(flatten)]
        tls: LocalTlsArgs,
        #[command(flatten)]
        metrics: MetricsArgs,
        #[command(flatten)]
        http: HttpArgs,
    },
    /// Print the CustomResourceDefinitions (generated from the Rust types), or write them into a
    /// folder (`--out manifests/crds`).
    Crdgen {
        /// Write one file per CRD into this folder instead of printing them.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Print the object the leading controller applies to put the filter into the mesh (the
    /// mesh-wide one, in Istio's root namespace), for reading or for applying yourself with
    /// `weir kubernetes --filter-install none`.
    RenderFilter {
        /// wasmplugin or envoyfilter.
        #[arg(long, default_value = "wasmplugin")]
        install: weir_controller::filter_module::InstallKind,
        /// The module whose digest to pin (default: a placeholder to replace).
        #[arg(long)]
        module: Option<PathBuf>,
        /// The controller's namespace (its Service is `weir` there).
        #[arg(long, default_value = "weir-system")]
        controller_namespace: String,
    },
    /// Run the controller in a Kubernetes cluster (Canary resources, Deployments, Istio). Every
    /// flag can also be set through the environment variable named in its help.
    #[command(alias = "run")]
    Kubernetes(KubernetesArgs),
    /// A table of canaries like `kubectl get canary`, with each version's live success rate,
    /// P99 and requests, and the last decision.
    Status {
        /// The Canary (default: every one of the namespace, or the state folder's).
        canary: Option<String>,
        #[command(flatten)]
        place: Place,
    },
    /// A live view of one canary that redraws in place (plain lines when stdout is not a
    /// terminal): phase, weight, both versions' numbers with a short history, the last events,
    /// the next step. Ctrl-C ends it.
    Watch {
        /// The Canary (local mode: optional, the state folder has one).
        canary: Option<String>,
        #[command(flatten)]
        place: Place,
        /// How often to redraw.
        #[arg(long, default_value = "500ms", value_parser = parse_duration)]
        refresh: Duration,
    },
    /// Skip the rest of the analysis and promote the canary now.
    Promote(VerbArgs),
    /// Roll the canary back now.
    Abort(VerbArgs),
    /// Hold the canary's weight; the checks go on (failures still roll back).
    Pause(VerbArgs),
    /// Continue a paused analysis (also one paused by inconclusiveLimit).
    Resume(VerbArgs),
    /// Retry the failed version of a canary without changing it. When the canary is not
    /// Failed, or (local mode) no weir local runs on the state folder, nothing is requested and
    /// the exit status is 1.
    Retry {
        /// The Canary (local mode: optional, the state folder has one).
        canary: Option<String>,
        #[command(flatten)]
        place: Place,
    },
    /// A load tester compatible with flagger-loadtester: Canary webhooks whose metadata.cmd is
    /// a hey command get that load (generated natively, no shell), and the gates
    /// (/gate/check, /gate/open, /rollback/check, ...) answer as the loadtester's do.
    Loadtest {
        /// Where to listen.
        #[arg(long, env = "WEIR_LOADTEST_ADDRESS", default_value = "0.0.0.0:8080")]
        listen: std::net::SocketAddr,
        #[command(flatten)]
        http: HttpArgs,
    },
    /// Serve only the telemetry ingest, with a directive of synthetic canaries: the controller
    /// side of `cargo xtask bench ingest`. Prints the bound address as its first line; then each
    /// `publish <weight_bp>` line on stdin republishes every canary at that weight and prints
    /// `generation <n>`; a `counters` line prints the ingest's counters (Prometheus text, and
    /// `weir_reporters_known`) and then `end`; `window <canary>` prints
    /// `primary <requests> <failures> canary <requests> <failures>` over the whole retention.
    /// Ends when stdin closes, or on `stop`, which ends every stream first and then prints
    /// `counted <requests>`: everything the windows of every canary hold. The limits default
    /// to the production ones; the hostile-client tests tighten them. With `--relay-to` it is
    /// a relay (docs/scale.md): its Envoys' reports go to that leader, and its directives are
    /// the leader's (`publish` is refused).
    #[command(hide = true)]
    IngestServer {
        /// Where to listen (port 0: any free port).
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: std::net::SocketAddr,
        /// Canaries in the directive (`bench/c0`, `bench/c1`, ...).
        #[arg(long, default_value_t = 1)]
        canaries: u32,
        /// Connections open at once.
        #[arg(long)]
        max_connections: Option<usize>,
        /// A connection that sends nothing for this long is closed.
        #[arg(long, value_parser = parse_duration)]
        idle_timeout: Option<Duration>,
        /// Envoys tracked in the ledger.
        #[arg(long)]
        max_reporters: Option<usize>,
        /// Bytes of reports in transit, all streams together.
        #[arg(long)]
        max_buffered_bytes: Option<usize>,
        /// Envoys tracked for one identity.
        #[arg(long)]
        max_reporters_per_identity: Option<usize>,
        /// Serve TLS with this certificate chain (PEM); a relay presents it to the leader too.
        #[arg(long, requires_all = ["tls_key", "tls_client_ca"])]
        tls_cert: Option<PathBuf>,
        /// The private key of --tls-cert (PEM).
        #[arg(long, requires = "tls_cert")]
        tls_key: Option<PathBuf>,
        /// The CA client certificates (and, for a relay, the leader's) must chain to (PEM).
        #[arg(long, requires = "tls_cert")]
        tls_client_ca: Option<PathBuf>,
        /// Be a relay towards the leader's ingest at this `host:port`.
        #[arg(long)]
        relay_to: Option<String>,
        /// The relay's name (its node id is `relay~<name>`).
        #[arg(long, default_value = "relay", requires = "relay_to")]
        relay_name: String,
        /// How long a relay serves its Envoys after the leader's last message.
        #[arg(long, value_parser = parse_duration, requires = "relay_to")]
        relay_grace: Option<Duration>,
    },
}

/// Where the operator's verbs act: local mode's state folder, or a cluster.
#[derive(clap::Args, Clone)]
struct Place {
    /// Local mode: the state folder of the weir local to act on.
    #[arg(long)]
    state: Option<PathBuf>,
    /// Act on a cluster, through this kubeconfig (run as `kubectl weir`, the cluster is the
    /// default: KUBECONFIG, ~/.kube/config).
    #[arg(long, conflicts_with = "state")]
    kubeconfig: Option<PathBuf>,
    /// Act on a cluster, in this namespace (default: the kubeconfig context's).
    #[arg(short = 'n', long, conflicts_with = "state")]
    namespace: Option<String>,
}

/// Where a verb acts, decided.
enum Mode {
    Local(PathBuf),
    Cluster {
        client: kube::Client,
        namespace: String,
    },
}

/// Whether the binary runs as the kubectl plugin `kubectl-weir`.
static AS_KUBECTL_PLUGIN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

impl Place {
    async fn mode(&self) -> anyhow::Result<Mode> {
        let plugin = AS_KUBECTL_PLUGIN.load(std::sync::atomic::Ordering::Relaxed);
        if self.state.is_some()
            || !(plugin || self.kubeconfig.is_some() || self.namespace.is_some())
        {
            let state = self
                .state
                .clone()
                .unwrap_or_else(|| PathBuf::from(".weir/local"));
            return Ok(Mode::Local(state));
        }
        let client =
            weir_controller::platform::kubernetes::run::client(self.kubeconfig.as_deref()).await?;
        let namespace = self
            .namespace
            .clone()
            .unwrap_or_else(|| client.default_namespace().to_owned());
        Ok(Mode::Cluster { client, namespace })
    }
}

/// `weir promote`, `abort`, `pause`, `resume`.
#[derive(clap::Args, Clone)]
struct VerbArgs {
    /// The Canary (local mode: optional, the state folder has one).
    canary: Option<String>,
    #[command(flatten)]
    place: Place,
    /// How long to wait for the controller to act on the request (0s: do not wait).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    wait: Duration,
}

fn needs_name(canary: Option<&str>, verb: &str) -> anyhow::Result<String> {
    canary
        .map(str::to_owned)
        .ok_or_else(|| anyhow::anyhow!("weir {verb} needs the Canary's name against a cluster, e.g. weir {verb} podinfo -n test"))
}

/// Runs one operator verb and prints what happened; exit status 1 when nothing was done.
async fn operator_verb(
    verb: weir_controller::analysis::Verb,
    args: VerbArgs,
) -> anyhow::Result<()> {
    use weir_controller::cli::{self, Asked};
    let user = cli::current_user();
    let asked = match args.place.mode().await? {
        Mode::Local(state) => {
            cli::local::ask(&state, args.canary.as_deref(), verb, &user, args.wait).await
        }
        Mode::Cluster { client, namespace } => {
            let name = needs_name(args.canary.as_deref(), verb.as_str())?;
            cli::kubernetes::ask(&client, &namespace, &name, verb, &user, args.wait).await
        }
    };
    match asked {
        Ok(Asked::NothingToDo(why)) => println!("weir {verb}: {why}; nothing to do"),
        Ok(Asked::Done(events)) => {
            for event in events {
                println!("{event}");
            }
        }
        Err(e) => {
            eprintln!("weir {verb}: {e}");
            std::process::exit(1);
        }
    }
    Ok(())
}

async fn status(canary: Option<String>, place: Place) -> anyhow::Result<()> {
    use weir_controller::cli::{self, kubernetes::ControllerService, render};
    let views = match place.mode().await? {
        Mode::Local(state) => vec![cli::local::view(&state, canary.as_deref())?],
        Mode::Cluster { client, namespace } => {
            let service = ControllerService::default();
            match canary {
                Some(name) => {
                    vec![cli::kubernetes::view(&client, &service, &namespace, &name).await?]
                }
                None => cli::kubernetes::list(&client, &service, &namespace).await?,
            }
        }
    };
    if views.is_empty() {
        println!("No canaries found.");
        return Ok(());
    }
    print!("{}", render::status_table(&views));
    Ok(())
}

async fn watch(canary: Option<String>, place: Place, refresh: Duration) -> anyhow::Result<()> {
    use std::io::{IsTerminal, Write};
    use weir_controller::cli::{self, kubernetes::ControllerService, render};
    let mode = place.mode().await?;
    let name = match &mode {
        Mode::Cluster { .. } => Some(needs_name(canary.as_deref(), "watch")?),
        Mode::Local(_) => canary,
    };
    let terminal = std::io::stdout().is_terminal();
    let service = ControllerService::default();
    let mut history = render::History::default();
    let mut previous: Option<cli::CanaryView> = None;
    let mut stdout = std::io::stdout();
    loop {
        let view = match &mode {
            Mode::Local(state) => cli::local::view(state, name.as_deref()),
            Mode::Cluster { client, namespace } => {
                cli::kubernetes::view(
                    client,
                    &service,
                    namespace,
                    name.as_deref().unwrap_or_default(),
                )
                .await
            }
        };
        let now = weir_controller::spec::Timestamp::from_system_time(std::time::SystemTime::now());
        match view {
            Ok(view) => {
                history.add(&view);
                if terminal {
                    // Home, draw, clear what the previous frame left below.
                    let frame =
                        render::watch_frame(&view, &history, now, 8).replace('\n', "\x1b[K\n");
                    let clear = if previous.is_none() { "\x1b[2J" } else { "" };
                    let _ = write!(stdout, "{clear}\x1b[H{frame}\x1b[J");
                } else {
                    for line in render::watch_lines(&view, previous.as_ref(), now) {
                        let _ = writeln!(stdout, "{line}");
                    }
                }
                let _ = stdout.flush();
                previous = Some(view);
            }
            Err(e) if previous.is_none() => anyhow::bail!("weir watch: {e}"),
            Err(e) => {
                let _ = writeln!(stdout, "weir watch: {e}");
            }
        }
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(()),
            () = tokio::time::sleep(refresh) => {}
        }
    }
}

/// Prints a line, ignoring a closed stdout: after SIGHUP the terminal may be gone, and the stop
/// must go on.
fn say(line: &str) {
    use std::io::Write as _;
    let _ = writeln!(std::io::stdout(), "{line}");
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    weir_controller::spec::parse_go_duration(text).map_err(|e| e.to_string())
}

/// The module `weir kubernetes` serves: the one named (which must load), else the image's, else
/// this checkout's build, else none.
fn filter_module(
    named: Option<&std::path::Path>,
) -> anyhow::Result<Option<weir_controller::filter_module::FilterModule>> {
    use weir_controller::filter_module::{FilterModule, DEFAULT_PATH};
    if let Some(path) = named {
        return Ok(Some(FilterModule::load(path)?));
    }
    let candidates = std::iter::once(PathBuf::from(DEFAULT_PATH))
        .chain(checkout_root().map(|r| r.join("target/wasm32-wasip1/wasm/weir_filter.wasm")));
    for path in candidates {
        if path.is_file() {
            return Ok(Some(FilterModule::load(&path)?));
        }
    }
    Ok(None)
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

/// Colour in the logs only on a terminal: elsewhere (`kubectl logs`, a file, a pipe) the
/// escape codes are noise. `NO_COLOR` turns it off on a terminal too.
fn colour_logs() -> bool {
    use std::io::IsTerminal;
    std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_ansi(colour_logs())
        .init();
    match parse_command_line() {
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
            filter_install,
            envoy_concurrency,
            tls,
            metrics,
            http,
        } => {
            http.install()?;
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
                filter_install,
                envoy_concurrency,
                telemetry_tls: tls.local_tls(),
                telemetry_port: 0,
                filters_report_to: None,
            };
            // Listening from the start: a signal during the start-up (Envoy, the primary) stops
            // it too, and its processes with it.
            let mut stop = local::StopSignals::listen().context("cannot listen for signals")?;
            let metrics = metrics.options();
            let mut mode = tokio::select! {
                biased;
                signal = stop.recv() => {
                    say(&format!("weir local: {signal} while starting; stopped"));
                    // Exiting closes the guard's pipe: its watchdog kills whatever was started
                    // (an Envoy still starting in the blocking pool would hold the runtime's
                    // drop until it is ready).
                    std::process::exit(0);
                }
                started = local::LocalMode::start_with(&options, &metrics) => started?,
            };
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
            // A signal ends a step where it is, like a crash would (the engine resumes from the
            // persisted status), rather than after it: a step may wait half a minute for a
            // primary to become ready.
            let signal = loop {
                tokio::select! {
                    biased;
                    signal = stop.recv() => break signal,
                    () = async {
                        tokio::time::sleep(mode.until_next_step()).await;
                        mode.tick().await;
                    } => {}
                }
            };
            say(&format!(
                "weir local: {signal}: stopping Envoy and the app processes"
            ));
            tokio::select! {
                biased;
                again = stop.recv() => {
                    // The guard's watchdog kills whatever still runs once this process is gone.
                    say(&format!("weir local: {again} again: exiting at once"));
                    std::process::exit(1);
                }
                () = mode.shutdown() => say("weir local: stopped"),
            }
        }
        Command::Crdgen { out } => {
            use weir_controller::platform::kubernetes::crd;
            for (name, text) in crd::crd_files() {
                match &out {
                    Some(dir) => {
                        let path = dir.join(name.as_ref());
                        std::fs::write(&path, text)
                            .with_context(|| format!("cannot write {}", path.display()))?;
                        println!("wrote {}", path.display());
                    }
                    None => print!("---\n{text}"),
                }
            }
        }
        Command::Kubernetes(args) => args.run().await?,
        Command::RenderFilter {
            install,
            module,
            controller_namespace,
        } => {
            use weir_controller::platform::kubernetes::filter_install::{
                self, FilterInstallation, InstallSettings,
            };
            let settings = InstallSettings {
                kind: install,
                controller_namespace,
                ..InstallSettings::default()
            };
            let installation = match module {
                Some(path) => FilterInstallation::new(
                    &weir_controller::filter_module::FilterModule::load(&path)?,
                    &settings,
                ),
                None => {
                    FilterInstallation::for_digest(filter_install::DIGEST_PLACEHOLDER, &settings)
                }
            };
            print!("{}", filter_install::to_yaml(&installation));
        }
        Command::Status { canary, place } => status(canary, place).await?,
        Command::Watch {
            canary,
            place,
            refresh,
        } => watch(canary, place, refresh).await?,
        Command::Promote(args) => operator_verb(Verb::Promote, args).await?,
        Command::Abort(args) => operator_verb(Verb::Abort, args).await?,
        Command::Pause(args) => operator_verb(Verb::Pause, args).await?,
        Command::Resume(args) => operator_verb(Verb::Resume, args).await?,
        Command::Retry { canary, place } => match place.mode().await? {
            Mode::Local(state) => match local::retry_failed(&state) {
                Ok(requested) => println!(
                    "retry requested (token {}): the weir local running on {} (pid {}) retries the failed version at its next step",
                    requested.token,
                    state.display(),
                    requested.controller_pid
                ),
                Err(refused) => {
                    eprintln!("weir retry: {refused}");
                    std::process::exit(1);
                }
            },
            Mode::Cluster { client, namespace } => {
                let name = needs_name(canary.as_deref(), "retry")?;
                match weir_controller::cli::kubernetes::retry(
                    &client,
                    &namespace,
                    &name,
                    &weir_controller::cli::current_user(),
                )
                .await
                {
                    Ok(token) => println!(
                        "retry requested (token {token}): the controller retries the failed version of {namespace}/{name} at its next reconcile"
                    ),
                    Err(e) => {
                        eprintln!("weir retry: {e}");
                        std::process::exit(1);
                    }
                }
            }
        },
        Command::Loadtest { listen, http } => {
            http.install()?;
            let tester =
                weir_controller::loadtest::LoadTester::new(weir_controller::http::shared().clone());
            let (addr, task) = tester.serve(listen).await?;
            println!("weir loadtest: listening on http://{addr}");
            let mut stop = local::StopSignals::listen().context("cannot listen for signals")?;
            let signal = stop.recv().await;
            say(&format!("weir loadtest: {signal}: stopped"));
            task.abort();
        }
        Command::IngestServer {
            listen,
            canaries,
            max_connections,
            idle_timeout,
            max_reporters,
            max_buffered_bytes,
            max_reporters_per_identity,
            tls_cert,
            tls_key,
            tls_client_ca,
            relay_to,
            relay_name,
            relay_grace,
        } => {
            use weir_controller::ingest::transport::{TlsFiles, Transport};
            use weir_controller::ingest::{RelayConfig, RelayTls};
            let mut config = weir_controller::ingest::IngestConfig::default();
            if let Some(n) = max_connections {
                config.max_connections = n;
            }
            if let Some(idle) = idle_timeout {
                config.idle_timeout = idle;
            }
            if let Some(n) = max_reporters {
                config.max_reporters = n;
                config.max_reporters_per_identity = n;
            }
            if let Some(n) = max_buffered_bytes {
                config.max_buffered_bytes = n;
            }
            if let Some(n) = max_reporters_per_identity {
                config.max_reporters_per_identity = n;
            }
            let tls = match (tls_cert, tls_key, tls_client_ca) {
                (Some(cert_chain), Some(private_key), Some(client_ca)) => Some(TlsFiles {
                    cert_chain,
                    private_key,
                    client_ca,
                }),
                _ => None,
            };
            if let Some(leader) = relay_to {
                let mut relay = RelayConfig::new(leader, relay_name);
                relay.tls = tls.as_ref().map(|files| RelayTls {
                    cert_chain: files.cert_chain.clone(),
                    private_key: files.private_key.clone(),
                    ca: files.client_ca.clone(),
                });
                if let Some(grace) = relay_grace {
                    relay.contact_grace = grace;
                }
                config.relay = Some(relay);
            }
            if let Some(files) = tls {
                config.transport = Transport::Tls(files);
            }
            ingest_server(listen, canaries, config).await?
        }
    }
    Ok(())
}

/// The command line; as `kubectl-weir` (a kubectl plugin: `kubectl weir status`), the verbs act
/// on the cluster by default and the help says `kubectl weir`.
fn parse_command_line() -> Command {
    use clap::{CommandFactory, FromArgMatches};
    let invoked = std::env::args_os().next().map(PathBuf::from);
    let plugin = invoked
        .as_ref()
        .and_then(|p| p.file_name())
        .is_some_and(|n| n.to_string_lossy().starts_with("kubectl-weir"));
    AS_KUBECTL_PLUGIN.store(plugin, std::sync::atomic::Ordering::Relaxed);
    let mut command = Cli::command();
    if plugin {
        command = command.name("kubectl weir").bin_name("kubectl weir");
    }
    let matches = command.get_matches();
    match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli.command,
        Err(e) => e.exit(),
    }
}

/// `weir ingest-server`: the ingest alone, under a directive of `canaries` synthetic routes.
async fn ingest_server(
    listen: std::net::SocketAddr,
    canaries: u32,
    config: weir_controller::ingest::IngestConfig,
) -> anyhow::Result<()> {
    use tokio::io::AsyncBufReadExt;
    use weir_controller::ingest::Ingest;

    let routes = |weight_bp: u32| {
        (0..canaries)
            .map(|i| weir_proto::v1::CanaryRoute {
                key: format!("bench/c{i}"),
                hosts: vec![format!("c{i}.bench")],
                canary_weight_bp: weight_bp,
                ..Default::default()
            })
            .collect::<Vec<_>>()
    };
    let ingest = Ingest::try_new(config)?;
    if !ingest.is_relay() {
        ingest.publish(routes(1_000))?;
    }
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let served = ingest
        .serve(listen, async {
            let _ = stopped.await;
        })
        .await?;
    println!("{}", served.local_addr());
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    let mut count_on_stop = false;
    while let Some(line) = lines.next_line().await? {
        if line.trim() == "stop" {
            count_on_stop = true;
            break;
        }
        let weight = line
            .strip_prefix("publish ")
            .map(|w| w.trim().parse::<u32>());
        match weight {
            Some(Ok(weight_bp)) => match ingest.publish(routes(weight_bp)) {
                Ok(generation) => println!("generation {generation}"),
                Err(e) => println!("error {e}"),
            },
            _ if line.trim() == "counters" => {
                print!("{}", ingest.counters().render_prometheus());
                println!("weir_reporters_known {}", ingest.known_reporters());
                if let Some(in_flight) = ingest.relay_in_flight() {
                    println!("weir_relay_reports_in_flight {in_flight}");
                }
                println!(
                    "weir_directive_generation {}\nend",
                    ingest.directive().generation
                );
            }
            _ if line.starts_with("window ") => {
                let [primary, canary] = window_totals(&ingest, line["window ".len()..].trim());
                println!(
                    "primary {} {} canary {} {}",
                    primary.0, primary.1, canary.0, canary.1
                );
            }
            _ => {
                eprintln!("weir ingest-server: unknown command {line:?}; use `publish <weight_bp>`, `counters`, `window <canary>` or `stop`")
            }
        }
    }
    let _ = stop.send(());
    served.finish_within(Duration::from_secs(10)).await?;
    if count_on_stop {
        // Every stream has ended (each after the ack of what it counted): what this process
        // counted is final, for the failover bench's account of every request.
        let counted: u64 = (0..canaries)
            .flat_map(|i| window_totals(&ingest, &format!("bench/c{i}")))
            .map(|(requests, _)| requests)
            .sum();
        println!("counted {counted}");
    }
    Ok(())
}

/// (requests, failures) of the primary and the canary of `canary` over the ingest's whole
/// retention: `weir ingest-server`'s `window` answer and its count at `stop`.
fn window_totals(ingest: &weir_controller::ingest::Ingest, canary: &str) -> [(u64, u64); 2] {
    let now = std::time::Instant::now();
    let retention = ingest.config().retention;
    [
        weir_proto::v1::Version::Primary,
        weir_proto::v1::Version::Canary,
    ]
    .map(|version| {
        ingest
            .window(canary, version, retention, now)
            .map_or((0, 0), |w| (w.requests, w.failures))
    })
}
