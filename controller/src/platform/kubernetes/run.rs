//! `weir kubernetes`: the controller in a cluster, or outside one (a developer's laptop, the
//! tests) with a kubeconfig.
//!
//! Order of things: connect (kubeconfig or in-cluster); serve `/healthz`, `/readyz`,
//! `/metrics`, and probe the API server for `/readyz`; stand as a candidate until this replica
//! holds the Lease (see [`super::leader`]); then label its Pod as the leader, serve the filters'
//! gRPC stream, and run one controller per watched namespace (or one for all). The Lease is
//! renewed in the background; if it cannot be renewed within its duration, the replica stops
//! at once with an error (Kubernetes restarts it as a candidate), so two replicas never act
//! together.
//!
//! Without a Pod (`--pod-name` unset, or naming a Pod that does not exist, as outside the
//! cluster) nothing is labelled, with a warning in the second case: the controller Service then
//! does not select this process, and filters must reach it some other way.
//!
//! On SIGTERM or Ctrl-C it says so, gives the reconciles under way `shutdown_grace`, then
//! removes its label and releases the Lease, each step bounded and logged when it fails. Once
//! the Lease may be held, every way out (a stop, a failure to start serving, a lost Lease)
//! releases it, so the next leader need not wait for it to expire.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use tokio::sync::watch;

use crate::filter_module::FilterModule;
use crate::ingest::{Ingest, IngestConfig};
use crate::metrics::template::Templates;
use crate::metrics::MetricSource;
use crate::traffic::Directives;

use super::filter_install::{self, FilterInstallation};
use super::health::{self, Health, API_PROBE_EVERY, API_PROBE_TIMEOUT};
use super::leader::{self, LeaseLock};
use super::reconciler::{self, Context};
use super::templates;
use super::Settings;

/// Everything `weir kubernetes` needs.
#[derive(Debug, Clone)]
pub struct KubernetesOptions {
    /// A kubeconfig file; `None`: `KUBECONFIG`, `~/.kube/config`, then the in-cluster config.
    pub kubeconfig: Option<PathBuf>,
    /// Namespaces to watch; empty: all.
    pub namespaces: Vec<String>,
    /// Where the filters' gRPC stream is served.
    pub grpc_address: SocketAddr,
    /// Where `/healthz`, `/readyz` and `/metrics` are served.
    pub http_address: SocketAddr,
    /// Routing and fallback settings.
    pub settings: Settings,
    /// Compete for a Lease before acting (off: this replica always acts; run only one).
    pub leader_election: bool,
    /// Namespace of the Lease (the controller's own).
    pub lease_namespace: String,
    /// Name of the Lease.
    pub lease_name: String,
    /// How long a Lease holds without renewal.
    pub lease_duration: Duration,
    /// This Pod's name: the candidate identity and the Pod that gets the leader label. `None`
    /// (outside the cluster): nothing is labelled.
    pub pod_name: Option<String>,
    /// The filter module to serve, and how the leader installs it in the mesh.
    pub filter: Option<(Arc<FilterModule>, FilterInstallation)>,
    /// How long the reconciles under way may take to finish after a stop is requested.
    pub shutdown_grace: Duration,
    /// How the filters connect (TLS with their workload certificates in a cluster), and who may
    /// report for which canary.
    pub telemetry: Telemetry,
}

/// The filters' side of the controller: transport and reporter policy.
#[derive(Debug, Clone, Default)]
pub struct Telemetry {
    /// TLS (the Istio agent's certificate files) or plaintext on loopback.
    pub transport: crate::ingest::transport::Transport,
    /// Who may report for which canary.
    pub policy: crate::ingest::identity::ReporterPolicy,
    /// While not the leader, serve this replica's Envoys as a relay of the leader's ingest at
    /// this `host:port` (the `weir-leader` Service; docs/scale.md, section 3). None: a standby
    /// serves no filters.
    pub relay_to: Option<String>,
}

/// Why `weir kubernetes` stopped.
#[derive(Debug, thiserror::Error)]
pub enum KubernetesError {
    /// No usable cluster configuration.
    #[error("cannot configure the Kubernetes client: {0}; pass --kubeconfig, set KUBECONFIG, or run in a Pod with a ServiceAccount")]
    Config(String),
    /// An API call outside a reconcile failed.
    #[error("{action}: {source}")]
    Kube {
        /// What was attempted.
        action: String,
        /// The API error.
        source: kube::Error,
    },
    /// A server could not start.
    #[error("{0}")]
    Serve(String),
    /// The Lease was lost: this replica must stop acting.
    #[error("lost the leader Lease {0}; stopping so that only the new leader acts")]
    LostLeadership(String),
}

/// A client from `kubeconfig`, or the inferred configuration.
pub async fn client(kubeconfig: Option<&std::path::Path>) -> Result<Client, KubernetesError> {
    let config = match kubeconfig {
        Some(path) => {
            let file = Kubeconfig::read_from(path)
                .map_err(|e| KubernetesError::Config(format!("{}: {e}", path.display())))?;
            Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
                .await
                .map_err(|e| KubernetesError::Config(format!("{}: {e}", path.display())))?
        }
        None => Config::infer()
            .await
            .map_err(|e| KubernetesError::Config(e.to_string()))?,
    };
    Client::try_from(config).map_err(|e| KubernetesError::Config(e.to_string()))
}

async fn terminated() {
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = tokio::signal::ctrl_c().await;
                    return;
                }
            };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}

/// How long each clean-up call on the way out (label, Lease, gRPC server) may take.
pub const CLEANUP_TIMEOUT: Duration = Duration::from_secs(2);

fn is_not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404)
}

async fn until_stopped(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}

/// `work`'s outcome, or `None` if a stop is requested first.
async fn unless_stopped<T>(
    stop: &watch::Receiver<bool>,
    work: impl Future<Output = T>,
) -> Option<T> {
    tokio::select! {
        () = until_stopped(stop.clone()) => None,
        done = work => Some(done),
    }
}

fn no_pod(pod: &str, namespace: &str) {
    tracing::warn!(
        %pod, %namespace,
        "Pod {pod} does not exist in {namespace}: not labelling it, so the controller Service does \
         not select this process; outside the cluster, leave --pod-name (POD_NAME) unset"
    );
}

/// Runs the controller until SIGTERM/Ctrl-C (Ok) or a lost Lease (Err). `metrics` builds the
/// metric source from the ingest the filters report to and the MetricTemplates of the cluster
/// (kept current by a watcher while this replica leads).
pub async fn run<M, F>(options: KubernetesOptions, metrics: F) -> Result<(), KubernetesError>
where
    M: MetricSource + Clone + 'static,
    F: FnOnce(Ingest, Templates) -> M,
{
    let client = client(options.kubeconfig.as_deref()).await?;
    serve(client, options, metrics, terminated()).await
}

/// [`run`] through `client`, until `stop` completes (instead of a signal).
pub async fn serve<M, F>(
    client: Client,
    options: KubernetesOptions,
    metrics: F,
    stop: impl Future<Output = ()> + Send + 'static,
) -> Result<(), KubernetesError>
where
    M: MetricSource + Clone + 'static,
    F: FnOnce(Ingest, Templates) -> M,
{
    let health = Arc::new(match &options.filter {
        Some((module, _)) => Health::with_module(module.clone()),
        None => Health::default(),
    });
    let (http_addr, http_task) = health::serve(options.http_address, health.clone())
        .await
        .map_err(|e| {
            KubernetesError::Serve(format!("cannot serve {}: {e}", options.http_address))
        })?;
    tracing::info!(%http_addr, "health and metrics endpoints listening");
    let api_probe = tokio::spawn(health::watch_api(
        client.clone(),
        health.clone(),
        API_PROBE_EVERY,
        API_PROBE_TIMEOUT,
    ));
    // One listener for the process's life, so a signal that arrives between two waits is kept.
    let (stop_tx, stop_rx) = watch::channel(false);
    let signals = tokio::spawn(async move {
        stop.await;
        tracing::info!("stop requested (SIGTERM or Ctrl-C): stopping");
        stop_tx.send_replace(true);
    });
    let outcome = replica(client, &options, &health, stop_rx, metrics).await;
    api_probe.abort();
    http_task.abort();
    signals.abort();
    outcome
}

/// A candidate, then the leader, then a replica stepping down.
async fn replica<M, F>(
    client: Client,
    options: &KubernetesOptions,
    health: &Arc<Health>,
    stop: watch::Receiver<bool>,
    metrics: F,
) -> Result<(), KubernetesError>
where
    M: MetricSource + Clone + 'static,
    F: FnOnce(Ingest, Templates) -> M,
{
    let identity = options
        .pod_name
        .clone()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "weir".to_owned());
    let lock = LeaseLock::new(
        client.clone(),
        &options.lease_namespace,
        &options.lease_name,
        &identity,
        options.lease_duration,
    );
    // The Pod to label as the leader; forgotten if it turns out not to exist.
    let mut pod = options.pod_name.clone();
    let namespace = options.lease_namespace.as_str();
    if options.leader_election {
        if let Some(name) = pod.clone() {
            // A restarted container keeps its Pod, and the Pod its labels: drop a stale one.
            match unless_stopped(
                &stop,
                leader::label_pod(client.clone(), namespace, &name, false),
            )
            .await
            {
                None => return Ok(()),
                Some(Ok(())) => {}
                Some(Err(e)) if is_not_found(&e) => {
                    no_pod(&name, namespace);
                    pod = None;
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "cannot clear the leader label of this Pod")
                }
            }
        }
        tracing::info!(lease = %options.lease_name, %identity, "waiting to lead");
        // A standby serves its Envoys as a relay of the leader until it leads itself.
        let relay = StandbyRelay::start(&client, options, &identity).await;
        let renew_every = options.lease_duration / 3;
        loop {
            match unless_stopped(&stop, lock.try_acquire_or_renew()).await {
                // A take-over may have been under way: give back whatever this replica holds.
                None => {
                    StandbyRelay::stop(relay).await;
                    step_down(&client, options, &lock, None).await;
                    return Ok(());
                }
                Some(Ok(true)) => break,
                Some(Ok(false)) => {}
                Some(Err(e)) => tracing::warn!(error = %e, "cannot read or take the Lease"),
            }
            if unless_stopped(&stop, tokio::time::sleep(renew_every))
                .await
                .is_none()
            {
                StandbyRelay::stop(relay).await;
                return Ok(());
            }
        }
        // Elected: the relay's Envoys are told to reconnect (UNAVAILABLE) and its port is
        // freed for the leader's ingest.
        StandbyRelay::stop(relay).await;
    }
    // From here on this replica may hold the Lease: every way out steps down.
    let outcome = lead(&client, options, health, &stop, &lock, &mut pod, metrics).await;
    health.set_leader(false);
    step_down(&client, options, &lock, pod.as_deref()).await;
    outcome
}

/// The relay a standby serves its Envoys with (docs/scale.md, section 3).
struct StandbyRelay {
    stop: tokio::sync::oneshot::Sender<()>,
    served: crate::ingest::Served,
    /// Reads the Canaries' `spec.analysis.reporters`, as the leader applies them.
    reporters: tokio::task::JoinHandle<()>,
}

/// How often a relay reads the Canaries' `spec.analysis.reporters`.
const RELAY_REPORTERS_EVERY: Duration = Duration::from_secs(30);

/// Who besides its own namespace may report for each Canary (`spec.analysis.reporters`, invalid
/// entries left out as the leader's validation refuses them), by `namespace/name`.
pub fn canary_reporters(
    canaries: &[super::crd::CanaryResource],
) -> Vec<(String, Vec<crate::ingest::identity::ReporterRule>)> {
    canaries
        .iter()
        .filter_map(|canary| {
            let namespace = canary.metadata.namespace.as_deref()?;
            let name = canary.metadata.name.as_deref()?;
            let analysis = canary
                .spec
                .analysis
                .as_ref()
                .or(canary.spec.canary_analysis.as_ref());
            let rules = analysis.map_or_else(Vec::new, |a| {
                a.reporters
                    .iter()
                    .filter_map(|r| crate::ingest::identity::ReporterRule::parse(r).ok())
                    .collect()
            });
            Some((format!("{namespace}/{name}"), rules))
        })
        .collect()
}

/// Keeps a relay's reporter rules in step with the Canaries, so an Envoy that a Canary's spec
/// allows is counted whichever replica it reaches.
async fn relay_reporters(client: Client, namespaces: Vec<String>, ingest: Ingest) {
    use kube::api::{Api, ListParams};
    let apis: Vec<Api<super::crd::CanaryResource>> = if namespaces.is_empty() {
        vec![Api::all(client)]
    } else {
        namespaces
            .iter()
            .map(|ns| Api::namespaced(client.clone(), ns))
            .collect()
    };
    loop {
        for api in &apis {
            match api.list(&ListParams::default()).await {
                Ok(list) => {
                    for (key, rules) in canary_reporters(&list.items) {
                        ingest.set_reporters(&key, rules);
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "relay: cannot list the Canaries for their reporters")
                }
            }
        }
        tokio::time::sleep(RELAY_REPORTERS_EVERY).await;
    }
}

impl StandbyRelay {
    /// Starts the relay when `relay_to` is set; a relay that cannot start is logged, and the
    /// replica waits to lead without it.
    async fn start(client: &Client, options: &KubernetesOptions, name: &str) -> Option<Self> {
        use crate::ingest::transport::Transport;
        use crate::ingest::{RelayConfig, RelayTls};
        let leader = options.telemetry.relay_to.clone()?;
        let mut relay = RelayConfig::new(leader, name);
        if let Transport::Tls(files) = &options.telemetry.transport {
            relay.tls = Some(RelayTls {
                cert_chain: files.cert_chain.clone(),
                private_key: files.private_key.clone(),
                ca: files.client_ca.clone(),
            });
        }
        let ingest = match Ingest::try_new(IngestConfig {
            transport: options.telemetry.transport.clone(),
            reporter_policy: options.telemetry.policy.clone(),
            relay: Some(relay),
            ..IngestConfig::default()
        }) {
            Ok(ingest) => ingest,
            Err(e) => {
                tracing::error!("cannot relay for the leader: {e}");
                return None;
            }
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        match ingest
            .serve(options.grpc_address, async {
                let _ = stopped.await;
            })
            .await
        {
            Ok(served) => {
                tracing::info!(addr = %served.local_addr(), leader = ?options.telemetry.relay_to, "serving the filters as a relay of the leader");
                let reporters = tokio::spawn(relay_reporters(
                    client.clone(),
                    options.namespaces.clone(),
                    ingest,
                ));
                Some(Self {
                    stop,
                    served,
                    reporters,
                })
            }
            Err(e) => {
                tracing::error!(
                    "cannot serve the filters as a relay on {}: {e}",
                    options.grpc_address
                );
                None
            }
        }
    }

    /// Ends every relayed stream and frees the port, within [`CLEANUP_TIMEOUT`].
    async fn stop(relay: Option<Self>) {
        let Some(relay) = relay else { return };
        relay.reporters.abort();
        let _ = relay.stop.send(());
        if let Err(e) = relay.served.finish_within(CLEANUP_TIMEOUT).await {
            tracing::warn!("the relay did not stop cleanly: {e}");
        }
    }
}

/// Removes this Pod's leader label and releases the Lease, each bounded by
/// [`CLEANUP_TIMEOUT`].
async fn step_down(
    client: &Client,
    options: &KubernetesOptions,
    lock: &LeaseLock,
    pod: Option<&str>,
) {
    if let Some(pod) = pod {
        let namespace = &options.lease_namespace;
        match tokio::time::timeout(
            CLEANUP_TIMEOUT,
            leader::label_pod(client.clone(), namespace, pod, false),
        )
        .await
        {
            Ok(Ok(())) => {}
            Ok(Err(e)) if is_not_found(&e) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, %pod, "cannot remove the leader label"),
            Err(_) => {
                tracing::warn!(%pod, timeout = ?CLEANUP_TIMEOUT, "the leader label could not be removed in time; the API server does not answer")
            }
        }
    }
    if options.leader_election {
        match tokio::time::timeout(CLEANUP_TIMEOUT, lock.release()).await {
            Ok(Ok(())) => tracing::info!(lease = %options.lease_name, "released the Lease"),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot release the Lease; the next leader waits for it to expire")
            }
            Err(_) => {
                tracing::warn!(timeout = ?CLEANUP_TIMEOUT, "the Lease could not be released in time (the API server does not answer); the next leader waits for it to expire")
            }
        }
    }
}

/// Leads until stopped, until the Lease is lost, or until serving fails.
async fn lead<M, F>(
    client: &Client,
    options: &KubernetesOptions,
    health: &Arc<Health>,
    stop: &watch::Receiver<bool>,
    lock: &LeaseLock,
    pod: &mut Option<String>,
    metrics: F,
) -> Result<(), KubernetesError>
where
    M: MetricSource + Clone + 'static,
    F: FnOnce(Ingest, Templates) -> M,
{
    let namespace = options.lease_namespace.as_str();
    // Also without leader election: the one replica is the one the Service must select.
    if let Some(name) = pod.clone() {
        match unless_stopped(stop, leader::label_pod(client.clone(), namespace, &name, true)).await
        {
            None => return Ok(()),
            Some(Ok(())) => {}
            Some(Err(e)) if is_not_found(&e) => {
                no_pod(&name, namespace);
                *pod = None;
            }
            Some(Err(source)) => {
                return Err(KubernetesError::Kube {
                    action: format!(
                        "labelling Pod {name} as the leader (the Service that filters connect to selects it)"
                    ),
                    source,
                })
            }
        }
    }
    health.set_leader(true);
    tracing::info!(identity = %lock.identity(), "leading");

    let ingest = Ingest::try_new(IngestConfig {
        transport: options.telemetry.transport.clone(),
        reporter_policy: options.telemetry.policy.clone(),
        ..IngestConfig::default()
    })
    .map_err(|e| KubernetesError::Serve(e.to_string()))?;
    let (done_tx, done_rx) = watch::channel(false);
    let served = ingest
        .serve(options.grpc_address, until_stopped(done_rx.clone()))
        .await
        .map_err(|e| {
            KubernetesError::Serve(format!(
                "cannot serve the filters on {}: {e}",
                options.grpc_address
            ))
        })?;
    tracing::info!(addr = %served.local_addr(), "serving the filters");

    let namespaces: Vec<Option<String>> = if options.namespaces.is_empty() {
        vec![None]
    } else {
        options.namespaces.iter().cloned().map(Some).collect()
    };
    let store = Templates::new();
    let template_watchers: Vec<_> = namespaces
        .iter()
        .map(|ns| tokio::spawn(templates::watch(client.clone(), ns.clone(), store.clone())))
        .collect();
    let ctx = Arc::new(Context::new(
        client.clone(),
        options.settings.clone(),
        Directives::new(ingest.clone()),
        metrics(ingest.clone(), store),
    ));
    {
        let ctx = ctx.clone();
        let ingest = ingest.clone();
        health.set_metrics(move || {
            let numbers = [
                ctx.stats.reconciles.load(Ordering::Relaxed),
                ctx.stats.failures.load(Ordering::Relaxed),
                ctx.canaries_now().unwrap_or(0) as u64,
                ingest.known_reporters() as u64,
            ];
            let controller = crate::exporter::render_text(crate::exporter::CollectWith(
                move |encoder: &mut prometheus_client::encoding::DescriptorEncoder<'_>| {
                    use crate::exporter::{counters, gauges};
                    let [reconciles, failures, canaries, reporters] = numbers;
                    counters(
                        encoder,
                        "weir_reconciles",
                        "Reconciles run.",
                        [(Vec::new(), reconciles)],
                    )?;
                    counters(
                        encoder,
                        "weir_reconcile_errors",
                        "Reconciles that failed.",
                        [(Vec::new(), failures)],
                    )?;
                    gauges(
                        encoder,
                        "weir_canaries",
                        "Canaries this controller sees.",
                        [(Vec::new(), canaries)],
                    )?;
                    gauges(
                        encoder,
                        "weir_reporters",
                        "Envoys in the sequence ledger (connected or recently seen).",
                        [(Vec::new(), reporters)],
                    )
                },
            ));
            controller + &ctx.exporter().render()
        });
    }

    {
        let ctx = ctx.clone();
        health.set_live(move |namespace, name| {
            serde_json::to_string(&ctx.live_snapshot(namespace, name)?).ok()
        });
    }

    let installer = options
        .filter
        .clone()
        .map(|(_, installation)| tokio::spawn(filter_install::run(client.clone(), installation)));
    let controllers = futures::future::join_all(namespaces.into_iter().map(|ns| {
        reconciler::run_controller(
            client.clone(),
            ns,
            ctx.clone(),
            until_stopped(done_rx.clone()),
        )
    }));
    let renew_every = options.lease_duration / 3;
    let renewals = async {
        if !options.leader_election {
            return std::future::pending::<KubernetesError>().await;
        }
        let mut renewed = Instant::now();
        loop {
            tokio::time::sleep(renew_every).await;
            match lock.try_acquire_or_renew().await {
                Ok(true) => renewed = Instant::now(),
                Ok(false) => return KubernetesError::LostLeadership(options.lease_name.clone()),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot renew the Lease");
                    // Stop before the Lease can have expired for the others.
                    if renewed.elapsed() + renew_every >= options.lease_duration {
                        return KubernetesError::LostLeadership(options.lease_name.clone());
                    }
                }
            }
        }
    };

    tokio::pin!(controllers);
    let grace = options.shutdown_grace;
    let outcome = tokio::select! {
        () = until_stopped(stop.clone()) => {
            done_tx.send_replace(true);
            tracing::info!(?grace, "stopping: waiting for the reconciles under way");
            if tokio::time::timeout(grace, &mut controllers).await.is_err() {
                tracing::warn!(
                    ?grace,
                    "the reconciles under way did not finish within {grace:?} (is the API server reachable?); stopping without them"
                );
            }
            Ok(())
        }
        lost = renewals => Err(lost),
        _ = &mut controllers => Err(KubernetesError::Serve("the controllers stopped unexpectedly".to_owned())),
    };
    done_tx.send_replace(true);
    template_watchers.iter().for_each(|w| w.abort());
    if let Some(installer) = &installer {
        installer.abort();
    }
    if tokio::time::timeout(CLEANUP_TIMEOUT, served.finished())
        .await
        .is_err()
    {
        tracing::warn!(timeout = ?CLEANUP_TIMEOUT, "the filters' gRPC server did not stop in time; stopping without it");
    }
    outcome
}
