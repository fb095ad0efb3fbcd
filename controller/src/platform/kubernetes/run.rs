//! `weir kubernetes`: the controller in a cluster.
//!
//! Order of things: connect (kubeconfig or in-cluster); serve `/healthz`, `/readyz`,
//! `/metrics`; stand as a candidate until this replica holds the Lease (see [`super::leader`]);
//! then label the Pod as the leader, serve the filters' gRPC stream, and run one controller per
//! watched namespace (or one for all). The Lease is renewed in the background; if it cannot be
//! renewed within its duration, the replica stops at once with an error (Kubernetes restarts
//! it as a candidate), so two replicas never act together. On SIGTERM or Ctrl-C it finishes the
//! reconciles under way, releases the Lease and removes its label.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use tokio::sync::watch;

use crate::ingest::{Ingest, IngestConfig};
use crate::metrics::template::Templates;
use crate::metrics::MetricSource;
use crate::traffic::Directives;

use super::health::{self, Health};
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
    /// This Pod's name: the candidate identity and the Pod that gets the leader label.
    pub pod_name: Option<String>,
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

/// Runs the controller until SIGTERM/Ctrl-C (Ok) or a lost Lease (Err). `metrics` builds the
/// metric source from the ingest the filters report to and the MetricTemplates of the cluster
/// (kept current by a watcher while this replica leads).
pub async fn run<M, F>(options: KubernetesOptions, metrics: F) -> Result<(), KubernetesError>
where
    M: MetricSource + Clone + 'static,
    F: FnOnce(Ingest, Templates) -> M,
{
    let client = client(options.kubeconfig.as_deref()).await?;
    let health = Arc::new(Health::default());
    let (http_addr, http_task) = health::serve(options.http_address, health.clone())
        .await
        .map_err(|e| {
            KubernetesError::Serve(format!("cannot serve {}: {e}", options.http_address))
        })?;
    tracing::info!(%http_addr, "health and metrics endpoints listening");
    // /readyz follows whether the API server answers.
    let api_probe = tokio::spawn(health::watch_api(
        client.clone(),
        health.clone(),
        health::API_PROBE_EVERY,
        health::API_PROBE_TIMEOUT,
    ));
    // One listener for the process's life, so a signal that arrives between two waits is kept.
    let (term_tx, term_rx) = watch::channel(false);
    let signals = tokio::spawn(async move {
        terminated().await;
        term_tx.send_replace(true);
    });
    let on_term = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|t| *t).await;
    };

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
    let renew_every = options.lease_duration / 3;
    if options.leader_election {
        if let Some(pod) = &options.pod_name {
            // A restarted container keeps its Pod, and the Pod its labels: drop a stale one.
            if let Err(e) =
                leader::label_pod(client.clone(), &options.lease_namespace, pod, false).await
            {
                tracing::warn!(error = %e, "cannot clear the leader label of this Pod");
            }
        }
        tracing::info!(lease = %options.lease_name, %identity, "waiting to lead");
        loop {
            match lock.try_acquire_or_renew().await {
                Ok(true) => break,
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "cannot read or take the Lease"),
            }
            tokio::select! {
                () = on_term(term_rx.clone()) => {
                    api_probe.abort();
                    http_task.abort();
                    signals.abort();
                    return Ok(());
                }
                () = tokio::time::sleep(renew_every) => {}
            }
        }
    }
    // Also without leader election: the one replica is the one the Service must select.
    if let Some(pod) = &options.pod_name {
        leader::label_pod(client.clone(), &options.lease_namespace, pod, true)
            .await
            .map_err(|source| KubernetesError::Kube {
                action: format!(
                    "labelling Pod {pod} as the leader (the Service that filters connect to selects it)"
                ),
                source,
            })?;
    }
    health.set_leader(true);
    tracing::info!(%identity, "leading");

    let ingest = Ingest::try_new(IngestConfig::default())
        .map_err(|e| KubernetesError::Serve(e.to_string()))?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let served = ingest
        .serve(options.grpc_address, stopped(stop_rx.clone()))
        .await
        .map_err(|e| KubernetesError::Serve(e.to_string()))?;
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
            format!(
                "# TYPE weir_reconciles_total counter\nweir_reconciles_total {}\n# TYPE weir_reconcile_errors_total counter\nweir_reconcile_errors_total {}\n# TYPE weir_canaries gauge\nweir_canaries {}\n# TYPE weir_reporters gauge\nweir_reporters {}\n",
                ctx.stats.reconciles.load(Ordering::Relaxed),
                ctx.stats.failures.load(Ordering::Relaxed),
                ctx.canaries_now().unwrap_or(0),
                ingest.known_reporters(),
            )
        });
    }

    let controllers = futures::future::join_all(namespaces.into_iter().map(|ns| {
        reconciler::run_controller(client.clone(), ns, ctx.clone(), stopped(stop_rx.clone()))
    }));
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
    let outcome = tokio::select! {
        () = on_term(term_rx.clone()) => {
            stop_tx.send_replace(true);
            let _ = tokio::time::timeout(Duration::from_secs(20), &mut controllers).await;
            Ok(())
        }
        lost = renewals => {
            stop_tx.send_replace(true);
            Err(lost)
        }
        _ = &mut controllers => Err(KubernetesError::Serve("the controllers stopped unexpectedly".to_owned())),
    };
    stop_tx.send_replace(true);
    template_watchers.iter().for_each(|w| w.abort());
    health.set_leader(false);
    if let Some(pod) = &options.pod_name {
        let _ = leader::label_pod(client.clone(), &options.lease_namespace, pod, false).await;
    }
    if options.leader_election && outcome.is_ok() {
        if let Err(e) = lock.release().await {
            tracing::warn!(error = %e, "cannot release the Lease; the next leader waits for it to expire");
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), served.finished()).await;
    api_probe.abort();
    http_task.abort();
    signals.abort();
    outcome
}
