//! A bounded load generator: `concurrency` tasks share `requests` requests to one address and
//! record every response (status, latency, `x-mirror-version`).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Empty};

use crate::http::client;

/// Headers for the request with this index (0-based), added to the fixed ones.
pub type PerRequest = Arc<dyn Fn(usize) -> Vec<(String, String)> + Send + Sync>;

/// What to send.
#[derive(Clone)]
pub struct LoadSpec {
    /// Where to send (Envoy's listener).
    pub target: SocketAddr,
    /// The `Host` header.
    pub authority: String,
    /// The request path.
    pub path: String,
    /// How many requests in all.
    pub requests: usize,
    /// How many in flight at once.
    pub concurrency: usize,
    /// Headers on every request.
    pub headers: Vec<(String, String)>,
    /// Headers that depend on the request index (user ids for sticky sessions, error codes).
    pub per_request: Option<PerRequest>,
    /// Longest wait for one response.
    pub timeout: Duration,
}

impl std::fmt::Debug for LoadSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadSpec")
            .field("target", &self.target)
            .field("authority", &self.authority)
            .field("requests", &self.requests)
            .field("concurrency", &self.concurrency)
            .field("headers", &self.headers)
            .finish_non_exhaustive()
    }
}

impl LoadSpec {
    /// `requests` GETs of `/` to `target` with `Host: authority`, 8 at a time.
    pub fn new(target: SocketAddr, authority: &str, requests: usize) -> Self {
        Self {
            target,
            authority: authority.to_owned(),
            path: "/".to_owned(),
            requests,
            concurrency: 8,
            headers: Vec::new(),
            per_request: None,
            timeout: Duration::from_secs(10),
        }
    }

    /// Sets how many requests are in flight at once.
    pub fn concurrency(mut self, concurrency: usize) -> Self {
        self.concurrency = concurrency.max(1);
        self
    }

    /// Adds a header to every request.
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    /// Adds headers computed from each request's index.
    pub fn per_request(
        mut self,
        headers: impl Fn(usize) -> Vec<(String, String)> + Send + Sync + 'static,
    ) -> Self {
        self.per_request = Some(Arc::new(headers));
        self
    }

    /// Sends everything and waits for every response.
    pub async fn run(self) -> LoadReport {
        let spec = Arc::new(self);
        let next = Arc::new(AtomicUsize::new(0));
        let http = client(spec.concurrency);
        let started = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..spec.concurrency.min(spec.requests.max(1)) {
            let (spec, next, http) = (spec.clone(), next.clone(), http.clone());
            tasks.spawn(async move {
                let mut outcomes = Vec::new();
                loop {
                    let index = next.fetch_add(1, Ordering::Relaxed);
                    if index >= spec.requests {
                        return outcomes;
                    }
                    outcomes.push(send_one(&spec, &http, index).await);
                }
            });
        }
        let mut outcomes = Vec::with_capacity(spec.requests);
        while let Some(done) = tasks.join_next().await {
            // A load task only panics if the harness is broken; say so loudly.
            outcomes.extend(done.unwrap_or_else(|e| panic!("a load task failed: {e}")));
        }
        outcomes.sort_by_key(|o| o.index);
        LoadReport {
            outcomes,
            elapsed: started.elapsed(),
        }
    }
}

async fn send_one(spec: &LoadSpec, http: &crate::http::HttpClient, index: usize) -> Outcome {
    let mut builder = http::Request::get(format!("http://{}{}", spec.target, spec.path))
        .header(http::header::HOST, &spec.authority);
    for (name, value) in &spec.headers {
        builder = builder.header(name, value);
    }
    let extra = spec
        .per_request
        .as_ref()
        .map(|f| f(index))
        .unwrap_or_default();
    for (name, value) in &extra {
        builder = builder.header(name, value);
    }
    let started = Instant::now();
    let result = match builder.body(Empty::new()) {
        Ok(request) => {
            tokio::time::timeout(spec.timeout, async {
                let response = http.request(request).await.map_err(|e| e.to_string())?;
                let status = response.status().as_u16();
                let version = response
                    .headers()
                    .get("x-mirror-version")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned);
                // The latency is to the last byte, as Envoy measures it.
                response
                    .into_body()
                    .collect()
                    .await
                    .map_err(|e| e.to_string())?;
                Ok::<_, String>((status, version))
            })
            .await
            .unwrap_or_else(|_| Err(format!("no response within {:?}", spec.timeout)))
        }
        Err(e) => Err(format!("bad request: {e}")),
    };
    let latency = started.elapsed();
    match result {
        Ok((status, version)) => Outcome {
            index,
            status,
            latency,
            version,
            error: None,
        },
        Err(error) => Outcome {
            index,
            status: 0,
            latency,
            version: None,
            error: Some(error),
        },
    }
}

/// One request's result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// Its index in the load (0-based).
    pub index: usize,
    /// The HTTP status; 0 when no response came.
    pub status: u16,
    /// From sending to the last byte of the body.
    pub latency: Duration,
    /// The `x-mirror-version` response header.
    pub version: Option<String>,
    /// Why no response came.
    pub error: Option<String>,
}

/// Every response of one load.
#[derive(Debug, Clone)]
pub struct LoadReport {
    /// One per request, by index.
    pub outcomes: Vec<Outcome>,
    /// How long the load took.
    pub elapsed: Duration,
}

impl LoadReport {
    /// Requests sent.
    pub fn sent(&self) -> u64 {
        self.outcomes.len() as u64
    }

    /// Requests that got no response at all.
    pub fn transport_errors(&self) -> Vec<&Outcome> {
        self.outcomes.iter().filter(|o| o.status == 0).collect()
    }

    /// Responses with a 5xx status (not counting requests with no response).
    pub fn server_errors(&self) -> u64 {
        self.outcomes.iter().filter(|o| o.status >= 500).count() as u64
    }

    /// Responses per `x-mirror-version` ("none" when the header was missing).
    pub fn by_version(&self) -> BTreeMap<String, u64> {
        let mut counts = BTreeMap::new();
        for outcome in &self.outcomes {
            let version = outcome.version.clone().unwrap_or_else(|| "none".to_owned());
            *counts.entry(version).or_insert(0) += 1;
        }
        counts
    }

    /// Responses from `version`.
    pub fn count_version(&self, version: &str) -> u64 {
        self.outcomes
            .iter()
            .filter(|o| o.version.as_deref() == Some(version))
            .count() as u64
    }

    /// Share (0.0..=1.0) of requests answered by `version`.
    pub fn share(&self, version: &str) -> f64 {
        if self.outcomes.is_empty() {
            return 0.0;
        }
        self.count_version(version) as f64 / self.outcomes.len() as f64
    }

    /// The exact latency at quantile `q` (nearest rank), in microseconds, over the outcomes that
    /// `keep` selects; None when it selects none.
    pub fn latency_quantile(&self, q: f64, keep: impl Fn(&Outcome) -> bool) -> Option<f64> {
        let mut micros: Vec<u128> = self
            .outcomes
            .iter()
            .filter(|o| keep(o))
            .map(|o| o.latency.as_micros())
            .collect();
        if micros.is_empty() {
            return None;
        }
        micros.sort_unstable();
        let rank =
            ((q.clamp(0.0, 1.0) * micros.len() as f64).ceil() as usize).clamp(1, micros.len());
        Some(micros[rank - 1] as f64)
    }
}
