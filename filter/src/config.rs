//! The filter's static configuration: JSON in the plugin configuration, parsed with unknown fields
//! refused, then validated into [`FilterConfig`], which cannot hold a bad value.
//!
//! The same document configures both roles of the module (the per-worker filter and the singleton
//! reporter), so a mesh operator writes it once.

use std::time::Duration;

use serde::Deserialize;

use crate::duration;

/// Why a configuration was refused. The message names the field and says how to fix it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The field at fault, as written in the JSON (`reportInterval`, `failure.statusCodes[1]`).
    pub field: String,
    /// What is wrong and what to write instead.
    pub reason: String,
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "weir: invalid filter configuration: field `{}`: {}; the filter passes traffic through unchanged until the configuration is fixed",
            self.field, self.reason
        )
    }
}

fn error(field: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        field: field.into(),
        reason: reason.into(),
    }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawConfig {
    controller_cluster: Option<String>,
    controller_authority: Option<String>,
    report_interval: Option<String>,
    directive_grace_period: Option<String>,
    routing_header: Option<String>,
    failure: Option<RawFailure>,
    envoy_stats: Option<bool>,
    reporter: Option<RawReporter>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawFailure {
    status_codes: Option<Vec<serde_json::Value>>,
    grpc_statuses: Option<Vec<u32>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawReporter {
    namespace: Option<String>,
    workload: Option<String>,
}

/// A class of HTTP statuses that count as a failed request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusClass {
    /// Every status in `n00..=n99`, written `"5xx"`.
    Hundreds(u16),
    /// One status, written `"429"` or `429`.
    Exact(u16),
}

impl StatusClass {
    fn matches(self, status: u16) -> bool {
        match self {
            StatusClass::Hundreds(h) => status / 100 == h,
            StatusClass::Exact(s) => status == s,
        }
    }
}

/// What counts as a failed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailurePolicy {
    /// HTTP statuses that fail a request. Default: `5xx`.
    pub status_classes: Vec<StatusClass>,
    /// gRPC statuses (from `grpc-status`) that fail a request. Default: none.
    pub grpc_statuses: Vec<u32>,
}

impl Default for FailurePolicy {
    fn default() -> Self {
        Self {
            status_classes: vec![StatusClass::Hundreds(5)],
            grpc_statuses: Vec::new(),
        }
    }
}

impl FailurePolicy {
    /// Whether a finished request failed. `status` 0 means no response reached the client at all
    /// (a reset before headers), which is a failure whatever the policy. Local replies for
    /// upstream resets, timeouts and "no healthy upstream" come back as 503/504 and fail as 5xx.
    pub fn is_failure(&self, status: u16, grpc_status: Option<u32>) -> bool {
        status == 0
            || self.status_classes.iter().any(|c| c.matches(status))
            || grpc_status.is_some_and(|g| self.grpc_statuses.contains(&g))
    }
}

/// The validated configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilterConfig {
    /// Envoy cluster that reaches the controller's weir.v1 gRPC service. Default: the outbound
    /// cluster Istio builds for the controller's Service.
    pub controller_cluster: String,
    /// The `:authority` of the stream: the controller Service's host name, derived from an Istio
    /// outbound cluster name (whose `|` is not valid in an authority), or set explicitly.
    pub controller_authority: String,
    /// How often each worker hands its counts over, and how often the reporter sends a report.
    pub report_interval: Duration,
    /// Without word from the controller for this long, every canary routes 100% to primary.
    pub directive_grace_period: Duration,
    /// The header the filter sets (and strips from clients) to pick the version.
    pub routing_header: String,
    /// What counts as a failure.
    pub failure: FailurePolicy,
    /// Also publish per-version counters and a latency histogram as Envoy stats.
    pub envoy_stats: bool,
    /// Reporter namespace, overriding Envoy's node metadata `NAMESPACE`.
    pub reporter_namespace: Option<String>,
    /// Reporter workload, overriding Envoy's node metadata `WORKLOAD_NAME`.
    pub reporter_workload: Option<String>,
}

impl Default for FilterConfig {
    fn default() -> Self {
        Self {
            controller_cluster: DEFAULT_CONTROLLER_CLUSTER.to_string(),
            controller_authority: DEFAULT_CONTROLLER_HOST.to_string(),
            report_interval: Duration::from_secs(1),
            directive_grace_period: Duration::from_secs(10),
            routing_header: "x-weir-route".to_string(),
            failure: FailurePolicy::default(),
            envoy_stats: true,
            reporter_namespace: None,
            reporter_workload: None,
        }
    }
}

/// The controller's Service as Istio names it (`outbound|<port>|<subset>|<host>`).
pub const DEFAULT_CONTROLLER_CLUSTER: &str = "outbound|9090||weir.weir-system.svc.cluster.local";
const DEFAULT_CONTROLLER_HOST: &str = "weir.weir-system.svc.cluster.local";
/// The encoded `GrpcService` (cluster name and authority) must fit one-byte protobuf lengths,
/// because the SDK passes it to the host as a `&str` (see [`crate::grpc_service`]).
const MAX_CLUSTER_AND_AUTHORITY: usize = 123;

const MIN_REPORT_INTERVAL: Duration = Duration::from_millis(100);
const MIN_HANDOVER_INTERVAL: Duration = Duration::from_millis(50);
const MAX_REPORT_INTERVAL: Duration = Duration::from_secs(60);

impl FilterConfig {
    /// How often each worker hands its counts to the reporter and re-reads the directive: a
    /// quarter of the report interval (at least 50 ms), so a sample waits at most that long
    /// before the next report can carry it, and a new weight reaches every worker as quickly.
    pub fn handover_interval(&self) -> Duration {
        (self.report_interval / 4).max(MIN_HANDOVER_INTERVAL)
    }

    /// Parses and validates the plugin configuration. Empty input means all defaults.
    pub fn parse(bytes: &[u8]) -> Result<Self, ConfigError> {
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(Self::default());
        }
        let raw: RawConfig = serde_json::from_slice(bytes).map_err(|e| {
            let text = e.to_string();
            // serde names the unknown field in its message; surface it as the field at fault.
            let field = text
                .split('`')
                .nth(1)
                .filter(|_| text.starts_with("unknown field"))
                .unwrap_or("(document)")
                .to_string();
            error(
                field,
                format!("{text}; the configuration is a JSON object with the fields documented in filter/README.md"),
            )
        })?;
        let mut config = Self::default();
        if let Some(cluster) = raw.controller_cluster {
            if cluster.trim().is_empty() {
                return Err(error(
                    "controllerCluster",
                    "must name an Envoy cluster, got an empty string",
                ));
            }
            config.controller_authority = authority_of_cluster(&cluster).unwrap_or_default();
            config.controller_cluster = cluster;
        }
        if let Some(authority) = raw.controller_authority {
            config.controller_authority = authority;
        }
        if !is_valid_authority(&config.controller_authority) {
            let reason = if config.controller_authority.is_empty() {
                format!(
                    "`{}` is not a valid HTTP/2 authority (only an Istio outbound cluster name \
                     `outbound|<port>|<subset>|<host>` yields one); set controllerAuthority to the \
                     controller Service's host name",
                    config.controller_cluster
                )
            } else {
                format!(
                    "`{}` is not a valid authority; use the controller Service's host name, such \
                     as weir.weir-system.svc.cluster.local",
                    config.controller_authority
                )
            };
            return Err(error("controllerAuthority", reason));
        }
        if config.controller_cluster.len() + config.controller_authority.len()
            > MAX_CLUSTER_AND_AUTHORITY
        {
            return Err(error(
                "controllerCluster",
                format!(
                    "controllerCluster and controllerAuthority together must be at most \
                     {MAX_CLUSTER_AND_AUTHORITY} bytes, got {}; use a shorter cluster or host name",
                    config.controller_cluster.len() + config.controller_authority.len()
                ),
            ));
        }
        if let Some(text) = raw.report_interval {
            let interval = duration::parse(&text).map_err(|r| error("reportInterval", r))?;
            if !(MIN_REPORT_INTERVAL..=MAX_REPORT_INTERVAL).contains(&interval) {
                return Err(error(
                    "reportInterval",
                    format!("must be between 100ms and 60s, got `{text}`"),
                ));
            }
            config.report_interval = interval;
        }
        if let Some(text) = raw.directive_grace_period {
            config.directive_grace_period =
                duration::parse(&text).map_err(|r| error("directiveGracePeriod", r))?;
        }
        if config.directive_grace_period < config.report_interval * 2 {
            return Err(error(
                "directiveGracePeriod",
                format!(
                    "must be at least twice reportInterval ({:?}), got {:?}; otherwise a single late report would send all traffic to primary",
                    config.report_interval, config.directive_grace_period
                ),
            ));
        }
        if let Some(header) = raw.routing_header {
            let valid = !header.is_empty()
                && header.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_'
                });
            if !valid {
                return Err(error(
                    "routingHeader",
                    format!(
                        "must be a lower-case header name (a-z, 0-9, '-', '_'), got `{header}`"
                    ),
                ));
            }
            config.routing_header = header;
        }
        if let Some(failure) = raw.failure {
            if let Some(codes) = failure.status_codes {
                config.failure.status_classes = codes
                    .iter()
                    .enumerate()
                    .map(|(i, v)| {
                        parse_status_class(v)
                            .map_err(|r| error(format!("failure.statusCodes[{i}]"), r))
                    })
                    .collect::<Result<_, _>>()?;
            }
            if let Some(grpc) = failure.grpc_statuses {
                if let Some((i, bad)) = grpc.iter().enumerate().find(|(_, &g)| g > 16) {
                    return Err(error(
                        format!("failure.grpcStatuses[{i}]"),
                        format!("gRPC status codes are 0..=16, got {bad}"),
                    ));
                }
                config.failure.grpc_statuses = grpc;
            }
        }
        if let Some(stats) = raw.envoy_stats {
            config.envoy_stats = stats;
        }
        if let Some(reporter) = raw.reporter {
            config.reporter_namespace = reporter.namespace;
            config.reporter_workload = reporter.workload;
        }
        Ok(config)
    }
}

/// The authority for a stream over `cluster`: the host of an Istio outbound cluster name, or the
/// name itself when it is a valid authority (a cluster of one's own, such as `weir_controller`).
fn authority_of_cluster(cluster: &str) -> Option<String> {
    let mut parts = cluster.split('|');
    match (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) {
        (Some("outbound" | "inbound"), Some(_port), Some(_subset), Some(host), None)
            if !host.is_empty() =>
        {
            Some(host.to_string())
        }
        _ => Some(cluster.to_string()).filter(|c| is_valid_authority(c)),
    }
}

/// RFC 3986's `host[:port]` characters (reg-name: unreserved and sub-delims), which is what an
/// HTTP/2 server accepts in `:authority`.
fn is_valid_authority(authority: &str) -> bool {
    !authority.is_empty()
        && authority.bytes().all(|b| {
            b.is_ascii_alphanumeric()
                || matches!(
                    b,
                    b'-' | b'.'
                        | b'_'
                        | b'~'
                        | b'!'
                        | b'$'
                        | b'&'
                        | b'\''
                        | b'('
                        | b')'
                        | b'*'
                        | b'+'
                        | b','
                        | b';'
                        | b'='
                        | b':'
                        | b'['
                        | b']'
                )
        })
}

fn parse_status_class(value: &serde_json::Value) -> Result<StatusClass, String> {
    let text = match value {
        serde_json::Value::Number(n) => n.to_string(),
        serde_json::Value::String(s) => s.trim().to_ascii_lowercase(),
        other => {
            return Err(format!(
                "expected \"5xx\", \"4xx\" or a status like 429, got {other}"
            ))
        }
    };
    if let Some(hundreds) = text.strip_suffix("xx") {
        return match hundreds.parse::<u16>() {
            Ok(h @ 1..=5) => Ok(StatusClass::Hundreds(h)),
            _ => Err(format!("`{text}` is not a status class; use 1xx..5xx")),
        };
    }
    match text.parse::<u16>() {
        Ok(code @ 100..=599) => Ok(StatusClass::Exact(code)),
        _ => Err(format!(
            "`{text}` is not an HTTP status; use a number 100..=599 or a class like \"5xx\""
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<FilterConfig, ConfigError> {
        FilterConfig::parse(json.as_bytes())
    }

    #[test]
    fn empty_configuration_means_defaults() {
        assert_eq!(parse(""), Ok(FilterConfig::default()));
        assert_eq!(parse("{}"), Ok(FilterConfig::default()));
    }

    #[test]
    fn full_configuration_parses() {
        let config = parse(
            r#"{"controllerCluster":"ctl","reportInterval":"500ms","directiveGracePeriod":"5s",
                "routingHeader":"x-route","failure":{"statusCodes":["5xx",429,"404"],"grpcStatuses":[14]},
                "envoyStats":false,"reporter":{"namespace":"ns","workload":"wl"}}"#,
        )
        .unwrap();
        assert_eq!(config.controller_cluster, "ctl");
        assert_eq!(config.controller_authority, "ctl");
        assert_eq!(config.report_interval, Duration::from_millis(500));
        assert_eq!(config.directive_grace_period, Duration::from_secs(5));
        assert_eq!(config.routing_header, "x-route");
        assert_eq!(
            config.failure.status_classes,
            vec![
                StatusClass::Hundreds(5),
                StatusClass::Exact(429),
                StatusClass::Exact(404)
            ]
        );
        assert!(!config.envoy_stats);
        assert_eq!(config.reporter_workload.as_deref(), Some("wl"));
    }

    #[test]
    fn workers_hand_over_four_times_per_report_but_not_more_often_than_every_50ms() {
        assert_eq!(
            FilterConfig::default().handover_interval(),
            Duration::from_millis(250)
        );
        let fast = parse(r#"{"reportInterval":"100ms","directiveGracePeriod":"1s"}"#).unwrap();
        assert_eq!(fast.handover_interval(), Duration::from_millis(50));
    }

    #[test]
    fn the_default_controller_is_istios_outbound_cluster_with_the_service_host_as_authority() {
        let config = FilterConfig::default();
        assert_eq!(
            config.controller_cluster,
            "outbound|9090||weir.weir-system.svc.cluster.local"
        );
        assert_eq!(
            config.controller_authority,
            "weir.weir-system.svc.cluster.local"
        );
        let other =
            parse(r#"{"controllerCluster":"outbound|7000|v1|ctl.ops.svc.cluster.local"}"#).unwrap();
        assert_eq!(other.controller_authority, "ctl.ops.svc.cluster.local");
        let explicit =
            parse(r#"{"controllerCluster":"outbound|7000||x","controllerAuthority":"y:7000"}"#)
                .unwrap();
        assert_eq!(explicit.controller_authority, "y:7000");
    }

    #[test]
    fn unknown_field_is_named() {
        let err = parse(r#"{"reportIntervall":"1s"}"#).unwrap_err();
        assert_eq!(err.field, "reportIntervall");
        assert!(err.to_string().contains("unknown field"), "{err}");
    }

    #[test]
    fn bad_values_name_their_field_and_the_fix() {
        let cases = [
            (r#"{"reportInterval":"1x"}"#, "reportInterval"),
            (r#"{"reportInterval":"10ms"}"#, "reportInterval"),
            (r#"{"directiveGracePeriod":"1s"}"#, "directiveGracePeriod"),
            (r#"{"routingHeader":"X Route"}"#, "routingHeader"),
            (
                r#"{"failure":{"statusCodes":["5xx","9xx"]}}"#,
                "failure.statusCodes[1]",
            ),
            (
                r#"{"failure":{"statusCodes":[700]}}"#,
                "failure.statusCodes[0]",
            ),
            (
                r#"{"failure":{"grpcStatuses":[17]}}"#,
                "failure.grpcStatuses[0]",
            ),
            (r#"{"controllerCluster":" "}"#, "controllerCluster"),
            (r#"{"controllerCluster":"a|b"}"#, "controllerAuthority"),
            (
                r#"{"controllerCluster":"outbound|9090||weir","controllerAuthority":"a b"}"#,
                "controllerAuthority",
            ),
        ];
        for (json, field) in cases {
            let err = parse(json).unwrap_err();
            assert_eq!(err.field, field, "{json}: {err}");
        }
        let long = format!(r#"{{"controllerCluster":"{}"}}"#, "c".repeat(70));
        let err = parse(&long).unwrap_err();
        assert_eq!(err.field, "controllerCluster", "{err}");
        assert!(parse("not json").is_err());
    }

    #[test]
    fn default_failure_policy_fails_5xx_and_missing_responses_only() {
        let policy = FailurePolicy::default();
        assert!(policy.is_failure(500, None));
        assert!(policy.is_failure(503, None));
        assert!(policy.is_failure(0, None));
        assert!(!policy.is_failure(200, None));
        assert!(!policy.is_failure(429, None));
        assert!(!policy.is_failure(200, Some(14)));
    }

    #[test]
    fn failure_policy_can_add_429_and_grpc_statuses() {
        let config =
            parse(r#"{"failure":{"statusCodes":["5xx","429"],"grpcStatuses":[14]}}"#).unwrap();
        assert!(config.failure.is_failure(429, None));
        assert!(config.failure.is_failure(200, Some(14)));
        assert!(!config.failure.is_failure(200, Some(0)));
    }
}
