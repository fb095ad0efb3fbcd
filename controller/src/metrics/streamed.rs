//! The streamed source: success rate and exact P99 from the filters' merged reports.

use std::time::Instant;

use weir_proto::v1::Version;

use super::MetricSource;
use crate::analysis::Measurement;
use crate::ingest::Ingest;
use crate::spec::{CanaryPlan, MetricCheck, MetricKind};

/// Reads the ingest's windows.
#[derive(Clone)]
pub struct StreamedSource {
    ingest: Ingest,
}

impl StreamedSource {
    /// A source over `ingest`'s windows.
    pub fn new(ingest: Ingest) -> Self {
        Self { ingest }
    }
}

/// The source's name in events.
pub const NAME: &str = "streamed";

impl MetricSource for StreamedSource {
    fn name(&self) -> &'static str {
        NAME
    }

    async fn measure(&self, canary: &CanaryPlan, check: &MetricCheck, now: Instant) -> Measurement {
        let window = check.window;
        let Some(data) = self
            .ingest
            .window(&canary.key(), Version::Canary, window, now)
        else {
            return Measurement::no_data(&check.name, NAME, window, Some(0));
        };
        let requests = data.requests;
        if requests == 0 {
            return Measurement::no_data(&check.name, NAME, window, Some(0));
        }
        match &check.kind {
            MetricKind::SuccessRate => Measurement::value(
                &check.name,
                NAME,
                window,
                data.success_rate_percent().unwrap_or(0.0),
                Some(requests),
            ),
            MetricKind::Duration => match data.p99_ms() {
                Some(p99) => Measurement::value(&check.name, NAME, window, p99, Some(requests)),
                None => Measurement::no_data(&check.name, NAME, window, Some(requests)),
            },
            MetricKind::Template { name, .. } => Measurement::error(
                &check.name,
                NAME,
                window,
                format!("metric template `{name}` needs a Prometheus source; the streamed source measures only request-success-rate and request-duration"),
            ),
            MetricKind::Query(_) => Measurement::error(
                &check.name,
                NAME,
                window,
                "an inline query needs a Prometheus source; the streamed source measures only request-success-rate and request-duration",
            ),
        }
    }
}
