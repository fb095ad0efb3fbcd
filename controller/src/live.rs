//! The live numbers `weir status` and `weir watch` show: per version, the requests, success
//! rate and P99 of the streamed windows right now, and when the next analysis step is due.
//!
//! The windows live in the controller's memory (the ingest); the CLI is another process. Local
//! mode writes a [`LiveSnapshot`] into the state folder (`live.json`) as it steps; in Kubernetes
//! the controller serves the same JSON at `/live/<namespace>/<name>` on its HTTP port, which
//! the CLI reads through the API server's service proxy.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use weir_proto::v1::Version;

use crate::ingest::Ingest;
use crate::spec::{serde_go, CanaryPlan, Timestamp};

/// The file local mode keeps its snapshot in.
pub const LIVE_FILE: &str = "live.json";

/// One version's numbers over the snapshot's window.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VersionLive {
    /// Requests served.
    pub requests: u64,
    /// Percent that did not fail; `None` without requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub success_rate: Option<f64>,
    /// 99th percentile latency in milliseconds; `None` without requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p99_ms: Option<f64>,
}

/// What a controller knows of one canary right now, beyond its status.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LiveSnapshot {
    /// The Canary's namespace.
    pub namespace: String,
    /// The Canary's name.
    pub name: String,
    /// The target workload's name.
    pub target: String,
    /// When the numbers were taken.
    pub at: Timestamp,
    /// The window they cover: the first metric's interval (the analysis interval without
    /// metrics).
    #[serde(with = "serde_go")]
    pub window: Duration,
    /// The primary's numbers.
    pub primary: VersionLive,
    /// The canary's numbers.
    pub canary: VersionLive,
    /// When the engine next steps.
    pub next_step_at: Timestamp,
    /// The largest canary weight of the analysis (100 for A/B testing and blue/green).
    pub max_weight: u8,
}

impl LiveSnapshot {
    /// The snapshot of `plan`'s canary from `ingest` at `now`.
    pub fn take(
        plan: &CanaryPlan,
        ingest: &Ingest,
        next_step_at: Timestamp,
        now: Timestamp,
    ) -> Self {
        let window = plan
            .analysis
            .metrics
            .first()
            .map_or(plan.analysis.interval, |m| m.window);
        let key = plan.key();
        let version = |v: Version| {
            ingest
                .window(&key, v, window, Instant::now())
                .map(|w| VersionLive {
                    requests: w.requests,
                    success_rate: w.success_rate_percent(),
                    p99_ms: w.p99_ms(),
                })
                .unwrap_or_default()
        };
        let max_weight = match &plan.analysis.strategy {
            crate::spec::Strategy::Canary { steps } => steps.max().percent(),
            _ => 100,
        };
        LiveSnapshot {
            namespace: plan.namespace.clone(),
            name: plan.name.clone(),
            target: plan.target.name.clone(),
            at: now,
            window,
            primary: version(Version::Primary),
            canary: version(Version::Canary),
            next_step_at,
            max_weight,
        }
    }
}
