//! `spec.service`'s route options in the Envoy local mode runs (issue 18): a Canary's timeout,
//! retries, header operations, rewrite and match, compiled by the controller and rendered into a
//! real Envoy's routes, on the primary and the canary route alike. The upstreams are echo servers
//! in the test that record what reached them.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use weir_controller::platform::local::envoy::{EnvoyBootstrap, EnvoyProcess};

/// One request as an upstream saw it.
#[derive(Debug, Clone)]
struct Seen {
    path: String,
    headers: Vec<(String, String)>,
}

impl Seen {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// An HTTP/1.1 server on 127.0.0.1 that records every request and answers by its path: a path
/// containing `fail` gets 503, `slow` is answered after 3 s, anything else 200. Its answers
/// carry `x-upstream: <name>`.
struct Echo {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Echo {
    async fn start(name: &'static str) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = seen.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let record = record.clone();
                tokio::spawn(async move {
                    let mut buffer = Vec::new();
                    let mut chunk = [0u8; 4096];
                    loop {
                        let Ok(Ok(n)) =
                            tokio::time::timeout(Duration::from_secs(10), stream.read(&mut chunk))
                                .await
                        else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        buffer.extend_from_slice(&chunk[..n]);
                        // GETs without bodies: a request ends at its blank line.
                        while let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
                            let head = String::from_utf8_lossy(&buffer[..end]).into_owned();
                            buffer.drain(..end + 4);
                            let mut lines = head.split("\r\n");
                            let path = lines
                                .next()
                                .and_then(|l| l.split(' ').nth(1))
                                .unwrap_or_default()
                                .to_owned();
                            let headers = lines
                                .filter_map(|l| l.split_once(':'))
                                .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
                                .collect();
                            record.lock().unwrap().push(Seen {
                                path: path.clone(),
                                headers,
                            });
                            let status = if path.contains("fail") {
                                "503 Service Unavailable"
                            } else {
                                "200 OK"
                            };
                            if path.contains("slow") {
                                tokio::time::sleep(Duration::from_secs(3)).await;
                            }
                            let answer = format!(
                                "HTTP/1.1 {status}\r\nx-upstream: {name}\r\ncontent-length: {}\r\n\r\n{name}",
                                name.len()
                            );
                            if stream.write_all(answer.as_bytes()).await.is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        });
        Ok(Self { addr, seen, task })
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    fn seen_path(&self, path: &str) -> Vec<Seen> {
        self.seen().into_iter().filter(|s| s.path == path).collect()
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The answer to one GET through Envoy.
struct Answer {
    status: u16,
    headers: http::HeaderMap,
    took: Duration,
}

async fn get(envoy: SocketAddr, path: &str, headers: &[(&str, &str)]) -> anyhow::Result<Answer> {
    let mut request = http::Request::builder()
        .uri(format!("http://{envoy}{path}"))
        .header("host", "podinfo.test");
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    let request = request.body(Empty::<Bytes>::new())?;
    let started = Instant::now();
    let response = tokio::time::timeout(
        Duration::from_secs(10),
        weir_e2e::http::client(1).request(request),
    )
    .await
    .context("Envoy answered within 10s")??;
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let _ = response.into_body().collect().await?;
    Ok(Answer {
        status,
        headers,
        took: started.elapsed(),
    })
}

const CANARY: &str = "apiVersion: weir.dev/v1alpha1
kind: Canary
metadata: {name: podinfo, namespace: test}
spec:
  targetRef: {apiVersion: apps/v1, kind: Deployment, name: podinfo}
  service:
    port: 9898
    match:
    - uri: {prefix: /app/}
    rewrite:
      uri: /rewritten/
      authority: podinfo.internal
    timeout: 700ms
    retries:
      attempts: 2
      retryOn: 5xx
    headers:
      request:
        set: {x-route-option: set-by-the-route}
        remove: [x-secret]
      response:
        add: {x-response-option: added-by-the-route}
  analysis:
    interval: 1m
    stepWeight: 10
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canarys_route_options_take_effect_in_local_modes_envoy_on_both_routes() {
    tokio::time::timeout(Duration::from_secs(90), route_options())
        .await
        .expect("the test finishes within 90s")
        .unwrap_or_else(|e| panic!("{e:#}"));
}

async fn route_options() -> anyhow::Result<()> {
    let plan = weir_controller::spec::load_yaml(CANARY)?.plan;
    plan.service
        .routes
        .check_for_envoy()
        .map_err(anyhow::Error::msg)?;
    let primary = Echo::start("primary").await?;
    let canary = Echo::start("canary").await?;
    let dir = weir_e2e::WorkDir::new("route_options")?;
    let mut bootstrap = EnvoyBootstrap::new(primary.addr, canary.addr);
    bootstrap.routes = plan.service.routes.clone();
    let binary = weir_e2e::binaries::envoy();
    let work = dir.path().to_owned();
    let envoy =
        tokio::task::spawn_blocking(move || EnvoyProcess::start(&binary, &bootstrap, &work, 1))
            .await?
            .context("Envoy did not start")?;
    let addr = envoy.listener_addr();
    let to_canary = [("x-weir-route", "canary")];

    for (route, upstream, headers) in [
        ("primary", &primary, &[][..]),
        ("canary", &canary, &to_canary[..]),
    ] {
        // A header is set and one removed on the request, one added to the response; the path
        // and authority are rewritten.
        let mut with_secret = headers.to_vec();
        with_secret.push(("x-secret", "do-not-forward"));
        let ok = get(addr, "/app/hello", &with_secret).await?;
        assert_eq!(ok.status, 200, "{route}");
        assert_eq!(
            ok.headers.get("x-upstream").and_then(|v| v.to_str().ok()),
            Some(route)
        );
        assert_eq!(
            ok.headers
                .get("x-response-option")
                .and_then(|v| v.to_str().ok()),
            Some("added-by-the-route"),
            "{route}"
        );
        let seen = upstream.seen_path("/rewritten/hello");
        assert_eq!(seen.len(), 1, "{route}: {:?}", upstream.seen());
        assert_eq!(seen[0].header("x-route-option"), Some("set-by-the-route"));
        assert_eq!(seen[0].header("x-secret"), None, "{route}");
        assert_eq!(seen[0].header("host"), Some("podinfo.internal"), "{route}");

        // retries: attempts 2 on 5xx: the upstream sees the request three times.
        let failed = get(addr, "/app/fail", headers).await?;
        assert_eq!(failed.status, 503, "{route}");
        assert_eq!(
            upstream.seen_path("/rewritten/fail").len(),
            3,
            "{route}: one attempt and two retries"
        );

        // timeout 700ms: an upstream that takes 3s is answered 504 after the timeout.
        let slow = get(addr, "/app/slow", headers).await?;
        assert_eq!(slow.status, 504, "{route}");
        assert!(
            slow.took >= Duration::from_millis(650) && slow.took < Duration::from_millis(2500),
            "{route}: answered after {:?}",
            slow.took
        );

        // match: only /app/ is routed.
        let outside = get(addr, "/elsewhere", headers).await?;
        assert_eq!(outside.status, 404, "{route}");
        assert!(upstream.seen_path("/elsewhere").is_empty(), "{route}");
    }
    drop(envoy);
    Ok(())
}
