//! The metric-source seam: where the numbers behind a check come from.
//!
//! A source only measures; the verdict is the engine's (`crate::analysis`). Sources:
//! - [`streamed`]: the filters' reports merged by the ingest (the default; exact, no query path);
//! - [`prometheus`]: Flagger's built-in Istio queries and user PromQL (MetricTemplates, inline
//!   queries), as a fallback and for custom checks; [`template`] holds the queries and templates;
//! - [`select`]: which of the two measures each check.

pub mod prometheus;
pub mod select;
pub mod streamed;
pub mod template;

use std::future::Future;
use std::time::Instant;

use crate::analysis::Measurement;
use crate::spec::{CanaryPlan, MetricCheck};

/// Measures metric checks for a canary.
pub trait MetricSource: Send + Sync {
    /// The source's name as shown in events and decisions (`streamed`, `prometheus`).
    fn name(&self) -> &'static str;

    /// Measures `check` for the canary version of `canary` over the check's window ending `now`.
    /// Failures are data, not errors: they come back as a Measurement whose outcome is `Err`.
    fn measure(
        &self,
        canary: &CanaryPlan,
        check: &MetricCheck,
        now: Instant,
    ) -> impl Future<Output = Measurement> + Send;
}
