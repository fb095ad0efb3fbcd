//! What the mirror answers: the request handler and its counters.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};

use crate::flags::{parse_duration, Flags};
use crate::istio::{Identity, IstioMetrics};

/// Request header naming the status to answer with.
pub const CODE_HEADER: &str = "x-mirror-code";
/// Request header naming the delay before answering, overriding `--latency`.
pub const DELAY_HEADER: &str = "x-mirror-delay";
/// Response header carrying `--version`.
pub const VERSION_HEADER: &str = "x-mirror-version";

/// Decides which requests fail for an error rate, deterministically and evenly: request n fails
/// when floor(n × rate) grows, so after n requests exactly floor(n × rate) have failed.
#[derive(Debug)]
pub struct ErrorSpread {
    /// The rate in parts per million, so the arithmetic is exact.
    ppm: u64,
    seen: AtomicU64,
}

impl ErrorSpread {
    /// A spread for a rate in 0.0..=1.0.
    pub fn new(rate: f64) -> Self {
        Self {
            ppm: (rate.clamp(0.0, 1.0) * 1e6).round() as u64,
            seen: AtomicU64::new(0),
        }
    }

    /// Whether the next request fails.
    pub fn next_fails(&self) -> bool {
        let n = self.seen.fetch_add(1, Ordering::Relaxed) + 1;
        (n * self.ppm) / 1_000_000 > ((n - 1) * self.ppm) / 1_000_000
    }
}

/// The app's state: its flags and what it has served.
#[derive(Debug)]
pub struct App {
    version: String,
    latency: Duration,
    errors: ErrorSpread,
    requests: AtomicU64,
    failures: AtomicU64,
    istio: Option<IstioMetrics>,
}

impl App {
    /// The app for these flags, listening on `port`.
    pub fn new(flags: &Flags, port: u16) -> Self {
        Self {
            istio: flags.istio_metrics.then(|| {
                IstioMetrics::new(Identity {
                    workload: flags.istio_workload_on(port),
                    namespace: flags.istio_namespace.clone(),
                    version: flags.version.clone(),
                })
            }),
            version: flags.version.clone(),
            latency: flags.latency,
            errors: ErrorSpread::new(flags.error_rate),
            requests: AtomicU64::new(0),
            failures: AtomicU64::new(0),
        }
    }

    /// Answers one request. Never fails: a malformed mirror header is answered with 400.
    pub async fn handle(
        self: Arc<Self>,
        request: Request<Incoming>,
    ) -> Result<Response<Full<Bytes>>, Infallible> {
        match request.uri().path() {
            "/healthz" => return Ok(self.respond(StatusCode::OK, "ok\n".into())),
            "/mirror/stats" => {
                let stats = serde_json::json!({
                    "requests": self.requests.load(Ordering::Relaxed),
                    "errors": self.failures.load(Ordering::Relaxed),
                });
                return Ok(self.respond(StatusCode::OK, format!("{stats}\n")));
            }
            "/stats/prometheus" => {
                if let Some(istio) = &self.istio {
                    return Ok(self.respond(StatusCode::OK, istio.render()));
                }
            }
            _ => {}
        }
        let started = Instant::now();
        let answer = self.answer_for(&request);
        // Drain the body so the connection stays reusable; its content does not matter.
        let _ = request.into_body().collect().await;
        let (status, body) = match answer {
            Ok((status, delay)) => {
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                let body = serde_json::json!({"version": self.version, "status": status.as_u16()});
                (status, format!("{body}\n"))
            }
            Err(why) => (StatusCode::BAD_REQUEST, format!("{why}\n")),
        };
        // Counted when answered, so a caller that saw every response sees every count.
        self.requests.fetch_add(1, Ordering::Relaxed);
        if status.is_server_error() {
            self.failures.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(istio) = &self.istio {
            istio.record(status.as_u16(), started.elapsed());
        }
        Ok(self.respond(status, body))
    }

    fn answer_for(&self, request: &Request<Incoming>) -> Result<(StatusCode, Duration), String> {
        let header = |name: &str| {
            request
                .headers()
                .get(name)
                .map(|v| v.to_str().map_err(|_| format!("{name} is not text")))
                .transpose()
        };
        let status = match header(CODE_HEADER)? {
            Some(code) => code
                .trim()
                .parse::<u16>()
                .ok()
                .and_then(|c| StatusCode::from_u16(c).ok())
                .ok_or_else(|| {
                    format!("{CODE_HEADER} {code:?} is not an HTTP status such as 500")
                })?,
            None if self.errors.next_fails() => StatusCode::INTERNAL_SERVER_ERROR,
            None => StatusCode::OK,
        };
        let delay = match header(DELAY_HEADER)? {
            Some(text) => parse_duration(text).map_err(|e| format!("{DELAY_HEADER}: {e}"))?,
            None => self.latency,
        };
        Ok((status, delay))
    }

    fn respond(&self, status: StatusCode, body: String) -> Response<Full<Bytes>> {
        let mut response = Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = status;
        if let Ok(version) = self.version.parse() {
            response.headers_mut().insert(VERSION_HEADER, version);
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_spread_fails_exactly_the_rate_and_evenly() {
        let spread = ErrorSpread::new(0.3);
        let outcomes: Vec<bool> = (0..1000).map(|_| spread.next_fails()).collect();
        assert_eq!(outcomes.iter().filter(|&&f| f).count(), 300);
        // Every window of 10 holds exactly 3 failures: no bursts.
        for window in outcomes.chunks(10) {
            assert_eq!(window.iter().filter(|&&f| f).count(), 3);
        }
        let never = ErrorSpread::new(0.0);
        assert!((0..100).all(|_| !never.next_fails()));
        let always = ErrorSpread::new(1.0);
        assert!((0..100).all(|_| always.next_fails()));
    }
}
