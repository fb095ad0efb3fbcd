//! The controller's HTTP port: `/healthz` (liveness), `/readyz` (readiness), `/metrics`
//! (Prometheus text) and the filter module (`/filter/<sha256>.wasm`, see
//! [`crate::filter_module`]). A few lines of HTTP/1.1 over a TCP listener: four fixed paths do
//! not need a web framework.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::filter_module::FilterModule;

type Render = Box<dyn Fn() -> String + Send + Sync>;

/// What the endpoints report.
#[derive(Default)]
pub struct Health {
    leader: AtomicBool,
    metrics: Mutex<Option<Render>>,
    module: Option<Arc<FilterModule>>,
}

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

    /// Sets what `/metrics` adds after `weir_leader`.
    pub fn set_metrics(&self, render: impl Fn() -> String + Send + Sync + 'static) {
        *self.metrics.lock().unwrap_or_else(|p| p.into_inner()) = Some(Box::new(render));
    }

    /// The `/metrics` body.
    pub fn render(&self) -> String {
        let mut body = format!(
            "# HELP weir_leader Whether this replica leads (1) or stands by (0).\n# TYPE weir_leader gauge\nweir_leader {}\n",
            u8::from(self.leader.load(Ordering::Relaxed))
        );
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
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let task = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let health = health.clone();
            tokio::spawn(async move {
                let _ = tokio::time::timeout(Duration::from_secs(5), answer(stream, &health)).await;
            });
        }
    });
    Ok((local, task))
}

async fn answer(mut stream: TcpStream, health: &Health) -> std::io::Result<()> {
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
        // The process answers: alive. A standby replica is ready too (it is a candidate).
        "/healthz" | "/readyz" => ("200 OK", text, Bytes::from_static(b"ok\n")),
        "/metrics" => ("200 OK", text, Bytes::from(health.render())),
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

#[cfg(test)]
mod tests {
    use super::*;

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
        health.set_metrics(|| "weir_reconciles_total 3\n".to_owned());
        let (addr, task) = serve(SocketAddr::from(([127, 0, 0, 1], 0)), health)
            .await
            .unwrap();
        let run = async {
            assert!(get(addr, "/healthz").await.starts_with("HTTP/1.1 200"));
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
}
