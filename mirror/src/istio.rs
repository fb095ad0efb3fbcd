//! `--istio-metrics`: the series an Istio sidecar publishes for the requests its workload serves
//! (`reporter="destination"`), computed from the requests this mirror really answers, so a real
//! Prometheus can run Flagger's built-in Istio queries against a local app.
//!
//! Served at `GET /stats/prometheus` (the sidecar's path) in the Prometheus text format:
//! - `istio_requests_total`: a counter per response code;
//! - `istio_request_duration_milliseconds`: a histogram per response code, with Istio's default
//!   buckets.
//!
//! Labels are those the real sidecar writes. The workload is named as Flagger's Deployments are:
//! `<target>-primary` for the primary and `<target>` for the canary; which one this process is
//! comes from `--istio-workload`, or from `--istio-workload-for-port PORT=NAME` when one
//! command line serves both roles on different ports (local mode starts both from the same
//! workload file). Requests count as the app counts them: not `/healthz`, `/mirror/stats` or
//! this endpoint.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::Duration;

/// Istio's default buckets for `istio_request_duration_milliseconds`.
pub const DURATION_BUCKETS_MS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];

/// Who this process is, in Istio's terms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// `destination_workload`: the Deployment (`mhs-primary`, `mhs`).
    pub workload: String,
    /// `destination_workload_namespace`.
    pub namespace: String,
    /// `destination_version` and `destination_canonical_revision`.
    pub version: String,
}

impl Identity {
    /// The service a request to this workload was routed through, as Flagger names them:
    /// `<target>-primary` for the primary, `<target>-canary` for the canary.
    fn service(&self) -> String {
        if self.workload.ends_with("-primary") {
            self.workload.clone()
        } else {
            format!("{}-canary", self.workload)
        }
    }

    /// The `app` label of the workload's pods (Flagger sets `<target>-primary` on the primary).
    fn app(&self) -> &str {
        &self.workload
    }
}

#[derive(Debug, Clone, Default)]
struct Series {
    requests: u64,
    buckets: [u64; DURATION_BUCKETS_MS.len()],
    sum_ms: f64,
}

/// The counters behind the endpoint.
#[derive(Debug)]
pub struct IstioMetrics {
    identity: Identity,
    by_code: Mutex<BTreeMap<u16, Series>>,
}

impl IstioMetrics {
    /// Empty counters for `identity`.
    pub fn new(identity: Identity) -> Self {
        Self {
            identity,
            by_code: Mutex::new(BTreeMap::new()),
        }
    }

    /// Counts one answered request.
    pub fn record(&self, code: u16, took: Duration) {
        let ms = took.as_secs_f64() * 1000.0;
        let mut by_code = self.by_code.lock().unwrap_or_else(|p| p.into_inner());
        let series = by_code.entry(code).or_default();
        series.requests += 1;
        series.sum_ms += ms;
        for (count, bound) in series.buckets.iter_mut().zip(DURATION_BUCKETS_MS) {
            if ms <= bound {
                *count += 1;
            }
        }
    }

    /// The labels every series carries, for one response code.
    fn labels(&self, code: u16) -> String {
        let id = &self.identity;
        let service = id.service();
        let ns = &id.namespace;
        let pairs: [(&str, String); 24] = [
            ("reporter", "destination".into()),
            ("source_workload", "unknown".into()),
            ("source_workload_namespace", "unknown".into()),
            ("source_principal", "unknown".into()),
            ("source_app", "unknown".into()),
            ("source_version", "unknown".into()),
            ("source_canonical_service", "unknown".into()),
            ("source_canonical_revision", "latest".into()),
            ("source_cluster", "unknown".into()),
            ("destination_workload", id.workload.clone()),
            ("destination_workload_namespace", ns.clone()),
            ("destination_principal", "unknown".into()),
            ("destination_app", id.app().to_owned()),
            ("destination_version", id.version.clone()),
            (
                "destination_service",
                format!("{service}.{ns}.svc.cluster.local"),
            ),
            ("destination_service_name", service.clone()),
            ("destination_service_namespace", ns.clone()),
            ("destination_canonical_service", id.app().to_owned()),
            ("destination_canonical_revision", id.version.clone()),
            ("destination_cluster", "Kubernetes".into()),
            ("request_protocol", "http".into()),
            ("response_code", code.to_string()),
            ("response_flags", "-".into()),
            ("connection_security_policy", "none".into()),
        ];
        pairs
            .iter()
            .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The series in the Prometheus text format.
    pub fn render(&self) -> String {
        let by_code = self
            .by_code
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let mut out = String::new();
        out.push_str("# TYPE istio_requests_total counter\n");
        for (code, series) in &by_code {
            let _ = writeln!(
                out,
                "istio_requests_total{{{}}} {}",
                self.labels(*code),
                series.requests
            );
        }
        out.push_str("# TYPE istio_request_duration_milliseconds histogram\n");
        for (code, series) in &by_code {
            let labels = self.labels(*code);
            for (bound, count) in DURATION_BUCKETS_MS.iter().zip(series.buckets) {
                let _ = writeln!(
                    out,
                    "istio_request_duration_milliseconds_bucket{{{labels},le=\"{bound}\"}} {count}"
                );
            }
            let _ = writeln!(
                out,
                "istio_request_duration_milliseconds_bucket{{{labels},le=\"+Inf\"}} {}",
                series.requests
            );
            let _ = writeln!(
                out,
                "istio_request_duration_milliseconds_sum{{{labels}}} {}",
                series.sum_ms
            );
            let _ = writeln!(
                out,
                "istio_request_duration_milliseconds_count{{{labels}}} {}",
                series.requests
            );
        }
        out
    }
}

fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Parses `PORT=NAME` (for `--istio-workload-for-port`).
pub fn parse_port_workload(text: &str) -> Result<(u16, String), String> {
    let (port, name) = text
        .split_once('=')
        .ok_or_else(|| format!("`{text}` is not PORT=NAME, e.g. 8081=mhs-primary"))?;
    let port = port
        .trim()
        .parse()
        .map_err(|_| format!("`{port}` in `{text}` is not a port number"))?;
    let name = name.trim();
    if name.is_empty() {
        return Err(format!("`{text}` names no workload; write PORT=NAME"));
    }
    Ok((port, name.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metrics(workload: &str) -> IstioMetrics {
        IstioMetrics::new(Identity {
            workload: workload.into(),
            namespace: "application".into(),
            version: "1.1.2".into(),
        })
    }

    #[test]
    fn requests_are_counted_per_code_with_istios_destination_labels() {
        let m = metrics("mhs");
        m.record(200, Duration::from_millis(3));
        m.record(200, Duration::from_millis(30));
        m.record(500, Duration::from_micros(200));
        let text = m.render();
        let line = |code: u16| {
            text.lines()
                .find(|l| {
                    l.starts_with("istio_requests_total{")
                        && l.contains(&format!("response_code=\"{code}\""))
                })
                .unwrap_or_else(|| panic!("no {code} line in\n{text}"))
                .to_owned()
        };
        let ok = line(200);
        assert!(ok.ends_with("} 2"), "{ok}");
        for label in [
            "reporter=\"destination\"",
            "destination_workload=\"mhs\"",
            "destination_workload_namespace=\"application\"",
            "destination_version=\"1.1.2\"",
            "destination_service=\"mhs-canary.application.svc.cluster.local\"",
        ] {
            assert!(ok.contains(label), "{label} missing from {ok}");
        }
        assert!(line(500).ends_with("} 1"));
    }

    #[test]
    fn durations_fall_into_istios_default_buckets() {
        let m = metrics("mhs-primary");
        m.record(200, Duration::from_millis(3));
        m.record(200, Duration::from_millis(30));
        let text = m.render();
        let bucket = |le: &str| {
            text.lines()
                .find(|l| {
                    l.starts_with("istio_request_duration_milliseconds_bucket")
                        && l.contains(&format!("le=\"{le}\""))
                })
                .and_then(|l| l.rsplit(' ').next())
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or_else(|| panic!("no bucket {le} in\n{text}"))
        };
        assert_eq!(bucket("1"), 0);
        assert_eq!(bucket("5"), 1);
        assert_eq!(bucket("25"), 1);
        assert_eq!(bucket("50"), 2);
        assert_eq!(bucket("+Inf"), 2);
        assert!(text.contains("destination_service_name=\"mhs-primary\""));
        assert!(text.contains("# TYPE istio_request_duration_milliseconds histogram"));
    }

    #[test]
    fn port_workload_pairs_parse() {
        assert_eq!(
            parse_port_workload("8081=mhs-primary"),
            Ok((8081, "mhs-primary".into()))
        );
        assert!(parse_port_workload("mhs").is_err());
        assert!(parse_port_workload("x=mhs").is_err());
        assert!(parse_port_workload("8081=").is_err());
    }
}
