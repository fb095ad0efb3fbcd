//! `weir loadtest`: a small service compatible with flagger-loadtester where Canary specs rely
//! on it, so a Flagger Canary's webhooks work unchanged:
//!
//! - `POST /` (the loadtester's webhook): Flagger's webhook payload with `metadata.cmd` holding a `hey` command (`metadata.type` `cmd` or absent): the load is
//!   generated natively ([`hey`]), in the background (202), once per canary and command at a time,
//!   as the loadtester's task runner does; `metadata.blocking: "true"` waits for it (200). Any
//!   other command or type is refused (400) with the reason; nothing is run through a shell.
//! - gates, keyed by the payload's `name` and `namespace`: `/gate/approve` (200), `/gate/halt`
//!   (403), `/gate/check` (200 once opened, else 403), `/gate/open` and `/gate/close` (202);
//!   `/rollback/check` (200 once opened: roll back), `/rollback/open`, `/rollback/close`.

pub mod hey;

use std::collections::BTreeSet;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;

use crate::http::HttpClient;

/// The largest request body read (Flagger's webhook payload is well under 1 KiB).
pub const MAX_BODY_BYTES: usize = 64 * 1024;
/// Open gates and rollbacks kept, each; opening more is refused (anyone who reaches the service
/// can open one: it must not grow without end).
pub const MAX_OPEN: usize = 10_000;
/// Loads running at once; more are refused until one finishes.
pub const MAX_RUNNING: usize = 64;

#[derive(Default)]
struct State {
    /// Open gates (`/gate/open`), by `name.namespace`.
    gates: BTreeSet<String>,
    /// Open rollbacks (`/rollback/open`).
    rollbacks: BTreeSet<String>,
    /// Load running, by canary and command.
    running: BTreeSet<(String, String)>,
}

/// The service.
#[derive(Clone)]
pub struct LoadTester {
    state: Arc<Mutex<State>>,
    http: HttpClient,
}

fn answer(status: StatusCode, text: &str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(text.to_owned())));
    *response.status_mut() = status;
    response
}

impl LoadTester {
    /// A load tester sending its load through `http`.
    pub fn new(http: HttpClient) -> Self {
        Self {
            state: Arc::default(),
            http,
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Serves on `listen` until the task is dropped; returns the bound address.
    pub async fn serve(
        self,
        listen: SocketAddr,
    ) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
        let listener = tokio::net::TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let this = self.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request| {
                        let this = this.clone();
                        async move { Ok::<_, Infallible>(this.handle(request).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok((addr, task))
    }

    async fn handle(&self, request: Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
        let path = request.uri().path().to_owned();
        let body = match http_body_util::Limited::new(request.into_body(), MAX_BODY_BYTES)
            .collect()
            .await
        {
            Ok(body) => body.to_bytes(),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                return answer(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    &format!("the body is larger than {MAX_BODY_BYTES} bytes; Flagger's webhook payload is well under that"),
                )
            }
            Err(e) => return answer(StatusCode::BAD_REQUEST, &format!("the body broke off: {e}")),
        };
        match path.as_str() {
            "/healthz" => return answer(StatusCode::OK, "OK"),
            "/gate/approve" => return answer(StatusCode::OK, "Approved"),
            "/gate/halt" => return answer(StatusCode::FORBIDDEN, "Forbidden"),
            _ => {}
        }
        let payload: serde_json::Value = match serde_json::from_slice(&body) {
            Ok(p) => p,
            Err(e) => {
                return answer(
                    StatusCode::BAD_REQUEST,
                    &format!(
                    "the body is not Flagger's webhook payload (JSON with name and namespace): {e}"
                ),
                )
            }
        };
        let field = |name: &str| payload[name].as_str().unwrap_or("").to_owned();
        let canary = format!("{}.{}", field("name"), field("namespace"));
        if path == "/" {
            return self.run_command(canary, &payload["metadata"]).await;
        }
        self.gate(&path, canary)
    }

    /// The gate endpoints.
    fn gate(&self, path: &str, canary: String) -> Response<Full<Bytes>> {
        let mut state = self.state();
        let opened = match path {
            "/gate/open" => Some(&state.gates),
            "/rollback/open" => Some(&state.rollbacks),
            _ => None,
        };
        if opened.is_some_and(|set| set.len() >= MAX_OPEN && !set.contains(&canary)) {
            return answer(
                StatusCode::TOO_MANY_REQUESTS,
                &format!(
                    "{MAX_OPEN} {} are open already: close some (/gate/close, /rollback/close) first",
                    if path == "/gate/open" { "gates" } else { "rollbacks" }
                ),
            );
        }
        match path {
            "/gate/check" if state.gates.contains(&canary) => answer(StatusCode::OK, "Approved"),
            "/gate/check" => answer(StatusCode::FORBIDDEN, "Forbidden"),
            "/gate/open" => {
                state.gates.insert(canary);
                answer(StatusCode::ACCEPTED, "Gate opened")
            }
            "/gate/close" => {
                state.gates.remove(&canary);
                answer(StatusCode::ACCEPTED, "Gate closed")
            }
            "/rollback/check" if state.rollbacks.contains(&canary) => {
                answer(StatusCode::OK, "Approved")
            }
            "/rollback/check" => answer(StatusCode::FORBIDDEN, "Forbidden"),
            "/rollback/open" => {
                state.rollbacks.insert(canary);
                answer(StatusCode::ACCEPTED, "Rollback opened")
            }
            "/rollback/close" => {
                state.rollbacks.remove(&canary);
                answer(StatusCode::ACCEPTED, "Rollback closed")
            }
            other => answer(
                StatusCode::NOT_FOUND,
                &format!("{other} is not a load tester endpoint: POST / with metadata.cmd, or /gate/{{approve,halt,check,open,close}}, /rollback/{{check,open,close}}"),
            ),
        }
    }

    async fn run_command(
        &self,
        canary: String,
        metadata: &serde_json::Value,
    ) -> Response<Full<Bytes>> {
        let text = |key: &str| metadata[key].as_str().unwrap_or("").to_owned();
        let kind = text("type");
        if !(kind.is_empty() || kind == "cmd") {
            return answer(
                StatusCode::BAD_REQUEST,
                &format!("metadata.type `{kind}` is not supported: weir loadtest runs `cmd` tasks holding a hey command"),
            );
        }
        let cmd = text("cmd");
        let hey = match hey::Hey::parse(&cmd) {
            Ok(h) => h,
            Err(why) => return answer(StatusCode::BAD_REQUEST, &why),
        };
        let key = (canary.clone(), cmd.clone());
        {
            let mut state = self.state();
            if state.running.contains(&key) {
                // The loadtester's task runner: the same command for the same canary runs once.
                return answer(StatusCode::ACCEPTED, "already running");
            }
            if state.running.len() >= MAX_RUNNING {
                return answer(
                    StatusCode::TOO_MANY_REQUESTS,
                    &format!(
                        "{MAX_RUNNING} loads are running already: try again when one has finished"
                    ),
                );
            }
            state.running.insert(key.clone());
        }
        tracing::info!(%canary, %cmd, "load started");
        let this = self.clone();
        let run = async move {
            let counts = hey.run(&this.http).await;
            tracing::info!(canary = %key.0, cmd = %key.1, answered = counts.0, unanswered = counts.1, "load finished");
            this.state().running.remove(&key);
            counts
        };
        if text("blocking") == "true" {
            let (answered, unanswered) = run.await;
            answer(
                StatusCode::OK,
                &format!("{answered} requests answered, {unanswered} without an answer"),
            )
        } else {
            tokio::spawn(run);
            answer(StatusCode::ACCEPTED, "Accepted")
        }
    }
}
