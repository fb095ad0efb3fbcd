//! The controller's HTTP port: `/healthz` (liveness), `/readyz` (readiness), `/metrics`
//! (Prometheus text) and the filter module (`/filter/<sha256>.wasm`, see
//! [`crate::filter_module`]). A few lines of HTTP/1.1 over a TCP listener: four fixed paths do
//! not need a web framework.
//!
//! - `/healthz`: the process answers. The accept loop survives accept errors (out of file
//!   descriptors, say): it waits a little and accepts again, so liveness recovers with them.
//! - `/readyz`: the API server answered this replica's last probe ([`watch_api`]); without it
//!   the replica can neither act nor take over, so it is not ready (503, with the reason). A
//!   standby replica that reaches the API server is ready: it is a candidate.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::filter_module::FilterModule;

type Render = Box<dyn Fn() -> String + Send + Sync>;

/// How often [`watch_api`] asks the API server whether it answers.
pub const API_PROBE_EVERY: Duration = Duration::from_secs(5);
/// How long one probe may take before the API server counts as unreachable.
pub const API_PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// What the endpoints report.
#[derive(Default)]
pub struct Health {
    leader: AtomicBool,
    /// The last probe of the API server: `None` before the first one.
    api: Mutex<Option<Result<(), String>>>,
    metrics: Mutex<Option<Render>>,
    live: Mutex<Option<LiveRender>>,
    module: Option<Arc<FilterModule>>,
}

/// Renders `/live/<namespace>/<name>`: the canary's live numbers as JSON, `None` if unknown.
type LiveRender = Box<dyn Fn(&str, &str) -> Option<String> + Send + Sync>;

impl Health {
    /// Endpoints that also serve `module` (every replica does, so the module is there whichever
    /// one the Service picks).
    pub fn with_module(module: Arc<FilterModule>) -> Self {
        Self {
            module: Some(module),
            ..Self::default()
        }
    }

    /// Records whether this replica leads.
    pub fn set_leader(&self, leader: bool) {
        self.leader.store(leader, Ordering::Relaxed);
    }

    /// Records the outcome of a probe of the API server.
    pub fn set_api(&self, reached: Result<(), String>) {
        *self.api.lock().unwrap_or_else(|p| p.into_inner()) = Some(reached);
    }

    /// Whether this replica is ready, and if not why.
    pub fn ready(&self) -> Result<(), String> {
        match &*self.api.lock().unwrap_or_else(|p| p.into_inner()) {
            Some(Ok(())) => Ok(()),
            Some(Err(why)) => Err(format!("the Kubernetes API server is unreachable: {why}")),
            None => Err("the Kubernetes API server was not reached yet".to_owned()),
        }
    }

    /// Sets what `/metrics` adds after `weir_leader`.
    pub fn set_metrics(&self, render: impl Fn() -> String + Send + Sync + 'static) {
        *self.metrics.lock().unwrap_or_else(|p| p.into_inner()) = Some(Box::new(render));
    }

    /// Sets what `/live/<namespace>/<name>` answers (`weir status` and `weir watch` read it
    /// through the API server's service proxy).
    pub fn set_live(&self, render: impl Fn(&str, &str) -> Option<String> + Send + Sync + 'static) {
        *self.live.lock().unwrap_or_else(|p| p.into_inner()) = Some(Box::new(render));
    }

    /// The `/live/<namespace>/<name>` body, if the canary is known here.
    pub fn live(&self, namespace: &str, name: &str) -> Option<String> {
        self.live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .and_then(|render| render(namespace, name))
    }

    /// The `/metrics` body.
    pub fn render(&self) -> String {
        let leader = i64::from(self.leader.load(Ordering::Relaxed));
        let mut body = crate::exporter::render_text(crate::exporter::CollectWith(
            move |encoder: &mut prometheus_client::encoding::DescriptorEncoder<'_>| {
                crate::exporter::gauges(
                    encoder,
                    "weir_leader",
                    "Whether this replica leads (1) or stands by (0).",
                    [(Vec::new(), leader)],
                )
            },
        ));
        if let Some(render) = self
            .metrics
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            body.push_str(&render());
        }
        body
    }
}

/// Binds `addr` and serves the endpoints until the task is dropped; returns the bound address.
pub async fn serve(
    addr: SocketAddr,
    health: Arc<Health>,
) -> io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let incoming = futures::stream::unfold(listener, |listener| async move {
        let accepted = listener.accept().await.map(|(stream, _)| stream);
        Some((accepted, listener))
    });
    let task = tokio::spawn(accept_loop(Box::pin(incoming), health));
    Ok((local, task))
}

/// Shortest and longest pause after a failed accept (doubling in between, as Go's HTTP server
/// does): the error is usually a full file table, which frees up when connections close.
const ACCEPT_BACKOFF: (Duration, Duration) = (Duration::from_millis(5), Duration::from_secs(1));

/// Answers every connection `incoming` yields, until it ends. A failed accept is logged and
/// followed by a short pause, never the end of the loop.
pub async fn accept_loop<S>(
    mut incoming: impl Stream<Item = io::Result<S>> + Unpin,
    health: Arc<Health>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut backoff = ACCEPT_BACKOFF.0;
    while let Some(accepted) = incoming.next().await {
        match accepted {
            Ok(stream) => {
                backoff = ACCEPT_BACKOFF.0;
                let health = health.clone();
                tokio::spawn(async move {
                    let _ =
                        tokio::time::timeout(Duration::from_secs(5), answer(stream, &health)).await;
                });
            }
            Err(error) => {
                tracing::warn!(%error, retry_in = ?backoff, "the health port cannot accept a connection");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(ACCEPT_BACKOFF.1);
            }
        }
    }
}

async fn answer<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    health: &Health,
) -> io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 512];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 8192 {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&head);
    let path = line.split_whitespace().nth(1).unwrap_or("/");
    let text = "text/plain; version=0.0.4";
    let (status, content_type, body) = match path {
        // The process answers: alive.
        "/healthz" => ("200 OK", text, Bytes::from_static(b"ok\n")),
        "/readyz" => match health.ready() {
            Ok(()) => ("200 OK", text, Bytes::from_static(b"ok\n")),
            Err(why) => (
                "503 Service Unavailable",
                text,
                Bytes::from(format!("{why}\n")),
            ),
        },
        "/metrics" => ("200 OK", text, Bytes::from(health.render())),
        live if live.starts_with("/live/") => {
            let mut parts = live["/live/".len()..].splitn(2, '/');
            let (namespace, name) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            match health.live(namespace, name) {
                Some(json) => ("200 OK", "application/json", Bytes::from(json)),
                None => (
                    "404 Not Found",
                    text,
                    Bytes::from(format!(
                        "no canary {namespace}/{name} runs on this controller (ask the leader)\n"
                    )),
                ),
            }
        }
        other => match health.module.as_ref().and_then(|m| m.serve(other)) {
            Some(module) => ("200 OK", "application/wasm", module),
            None => (
                "404 Not Found",
                text,
                Bytes::from_static(b"try /healthz, /readyz, /metrics or the filter module\n"),
            ),
        },
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(&body).await?;
    stream.shutdown().await
}

/// One probe: does the API server answer (any HTTP answer counts; an error status still means
/// it is there)?
pub async fn probe_api(client: &kube::Client, timeout: Duration) -> Result<(), String> {
    match tokio::time::timeout(timeout, client.apiserver_version()).await {
        Ok(Ok(_)) | Ok(Err(kube::Error::Api(_))) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {timeout:?}")),
    }
}

/// Probes the API server every `every` (each probe bounded by `timeout`) and records the
/// outcome for `/readyz`; logs when it stops or starts answering. Runs until dropped.
pub async fn watch_api(
    client: kube::Client,
    health: Arc<Health>,
    every: Duration,
    timeout: Duration,
) {
    let mut reachable = None;
    loop {
        let reached = probe_api(&client, timeout).await;
        match (&reached, reachable) {
            (Err(error), Some(true) | None) => {
                tracing::warn!(%error, "the Kubernetes API server is unreachable: /readyz fails until it answers");
            }
            (Ok(()), Some(false)) => tracing::info!("the Kubernetes API server answers again"),
            _ => {}
        }
        reachable = Some(reached.is_ok());
        health.set_api(reached);
        tokio::time::sleep(every).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpStream;

    async fn get(addr: SocketAddr, path: &str) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn the_endpoints_answer_health_and_metrics() {
        let health = Arc::new(Health::default());
        health.set_leader(true);
        health.set_api(Ok(()));
        health.set_metrics(|| "weir_reconciles_total 3\n".to_owned());
        let (addr, task) = serve(SocketAddr::from(([127, 0, 0, 1], 0)), health)
            .await
            .unwrap();
        let run = async {
            assert!(get(addr, "/healthz").await.starts_with("HTTP/1.1 200"));
            assert!(get(addr, "/readyz").await.starts_with("HTTP/1.1 200"));
            let metrics = get(addr, "/metrics").await;
            assert!(metrics.contains("weir_leader 1"), "{metrics}");
            assert!(metrics.contains("weir_reconciles_total 3"), "{metrics}");
            assert!(get(addr, "/nope").await.starts_with("HTTP/1.1 404"));
        };
        tokio::time::timeout(Duration::from_secs(10), run)
            .await
            .unwrap();
        task.abort();
    }

    #[tokio::test]
    async fn live_numbers_are_served_per_canary_and_an_unknown_one_is_a_404() {
        let health = Arc::new(Health::default());
        health.set_live(|namespace, name| {
            (namespace == "application" && name == "mhs").then(|| "{\"name\":\"mhs\"}".to_owned())
        });
        let (addr, task) = serve(SocketAddr::from(([127, 0, 0, 1], 0)), health)
            .await
            .unwrap();
        let run = async {
            let live = get(addr, "/live/application/mhs").await;
            assert!(live.starts_with("HTTP/1.1 200"), "{live}");
            assert!(
                live.contains("application/json") && live.ends_with("{\"name\":\"mhs\"}"),
                "{live}"
            );
            let unknown = get(addr, "/live/application/other").await;
            assert!(
                unknown.starts_with("HTTP/1.1 404")
                    && unknown.contains("no canary application/other"),
                "{unknown}"
            );
        };
        tokio::time::timeout(Duration::from_secs(10), run)
            .await
            .unwrap();
        task.abort();
    }

    /// A kube client whose API server never answers, or has gone.
    fn client_of(answer: bool) -> (kube::Client, tokio::task::JoinHandle<()>) {
        let (service, mut handle) = tower_test::mock::pair::<
            http::Request<kube::client::Body>,
            http::Response<kube::client::Body>,
        >();
        let server = tokio::spawn(async move {
            if !answer {
                drop(handle);
                return;
            }
            while let Some((_, respond)) = handle.next_request().await {
                let body = serde_json::json!({"major": "1", "minor": "32", "gitVersion": "v1.32.0",
                    "gitCommit": "", "gitTreeState": "", "buildDate": "", "goVersion": "",
                    "compiler": "", "platform": ""});
                respond.send_response(
                    http::Response::builder()
                        .status(200)
                        .header("content-type", "application/json")
                        .body(kube::client::Body::from(serde_json::to_vec(&body).unwrap()))
                        .unwrap(),
                );
            }
        });
        (kube::Client::new(service, "default"), server)
    }

    #[tokio::test]
    async fn readiness_fails_while_the_api_server_is_unreachable() {
        let health = Arc::new(Health::default());
        let (addr, task) = serve(SocketAddr::from(([127, 0, 0, 1], 0)), health.clone())
            .await
            .unwrap();
        let run = async {
            let before = get(addr, "/readyz").await;
            assert!(before.starts_with("HTTP/1.1 503"), "{before}");
            assert!(before.contains("not reached yet"), "{before}");

            let (gone, _server) = client_of(false);
            let probe = tokio::spawn(watch_api(
                gone,
                health.clone(),
                Duration::from_millis(20),
                Duration::from_millis(200),
            ));
            while health.ready().is_ok() || !format!("{:?}", health.ready()).contains("unreachable")
            {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let down = get(addr, "/readyz").await;
            assert!(down.starts_with("HTTP/1.1 503"), "{down}");
            assert!(
                down.contains("the Kubernetes API server is unreachable"),
                "{down}"
            );
            assert!(
                get(addr, "/healthz").await.starts_with("HTTP/1.1 200"),
                "alive all the same"
            );
            probe.abort();

            let (answers, _server) = client_of(true);
            assert_eq!(probe_api(&answers, Duration::from_secs(5)).await, Ok(()));
            let probe = tokio::spawn(watch_api(
                answers,
                health.clone(),
                Duration::from_millis(20),
                Duration::from_secs(5),
            ));
            while health.ready().is_err() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            assert!(get(addr, "/readyz").await.starts_with("HTTP/1.1 200"));
            probe.abort();
        };
        tokio::time::timeout(Duration::from_secs(20), run)
            .await
            .unwrap();
        task.abort();
    }

    #[tokio::test]
    async fn a_failed_accept_does_not_stop_the_health_port() {
        let health = Arc::new(Health::default());
        let (client, server) = tokio::io::duplex(4096);
        // Out of file descriptors once, then a connection.
        let incoming = futures::stream::iter([Err(io::Error::from_raw_os_error(24)), Ok(server)])
            .chain(futures::stream::pending());
        let task = tokio::spawn(accept_loop(Box::pin(incoming), health));
        let run = async {
            let mut client = client;
            client
                .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                .await
                .unwrap();
            let mut out = String::new();
            client.read_to_string(&mut out).await.unwrap();
            assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        };
        tokio::time::timeout(Duration::from_secs(10), run)
            .await
            .unwrap();
        task.abort();
    }
}
