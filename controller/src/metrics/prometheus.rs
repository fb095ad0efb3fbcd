//! The Prometheus source: Flagger's built-in Istio queries, MetricTemplates and inline queries,
//! run against the Prometheus HTTP API (`GET /api/v1/query`).
//!
//! Where a query runs:
//! - a template with `provider.address`: there, with the credentials of its `secretRef`;
//! - anything else (built-in checks, inline queries, templates without an address): the Canary's
//!   `spec.metricsServer`, else the controller's global address (`--prometheus-address`, with
//!   its credentials).
//!
//! What an answer means: one value is the measurement; an empty result or NaN is "no values"
//! (the engine's Inconclusive, "probably … is not receiving traffic"); an unreachable server, a
//! timeout, an HTTP error, a rejected query or an answer with several series is the Error
//! verdict, which halts the analysis without counting a failed check.
//!
//! Queries go through the controller's shared HTTP client ([`crate::http`]): `http://` and
//! `https://` (verified against the system's CAs and `--ca-file`; a MetricTemplate's
//! `provider.insecureSkipVerify` skips the verification for its queries).

use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, Instant};

use base64::Engine as _;
use hyper::header::{HeaderValue, ACCEPT, AUTHORIZATION};
use hyper::Uri;

use crate::http::{CallError, HttpClient};

use super::template::{builtin_query, model, Templates, ISTIO_REQUEST_COUNT};
use super::MetricSource;
use crate::analysis::Measurement;
use crate::spec::{format_go_duration, CanaryPlan, MetricCheck, MetricKind, QueryTemplate};

/// The source's name in events and decisions.
pub const NAME: &str = crate::analysis::PROMETHEUS_SOURCE;

/// How long one query may take (Flagger's Prometheus provider uses 5s too).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// A Prometheus server's base URL, checked: `http(s)://host:port` with an optional path prefix
/// (`http://gateway/prometheus`).
#[derive(Clone, PartialEq, Eq)]
pub struct PrometheusAddress {
    scheme: &'static str,
    authority: String,
    base_path: String,
}

/// Why an address cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("Prometheus address `{address}` {problem}")]
pub struct AddressError {
    /// The address as given.
    pub address: String,
    /// What is wrong and how to write it.
    pub problem: String,
}

impl PrometheusAddress {
    /// Parses `http(s)://host:port[/prefix]`.
    pub fn try_new(text: &str) -> Result<Self, AddressError> {
        let err = |problem: &str| AddressError {
            address: text.to_owned(),
            problem: problem.to_owned(),
        };
        let trimmed = text.trim();
        let uri: Uri = trimmed
            .parse()
            .map_err(|_| err("is not a URL; write it like http://prometheus.istio-system:9090"))?;
        let scheme = match uri.scheme_str() {
            Some("http") => "http",
            Some("https") => "https",
            _ => {
                return Err(err(
                    "must start with http:// or https://, e.g. http://prometheus:9090",
                ))
            }
        };
        let authority = uri
            .authority()
            .ok_or_else(|| err("has no host; write it like http://prometheus:9090"))?
            .to_string();
        if uri.query().is_some() {
            return Err(err("must not have a query string"));
        }
        Ok(Self {
            scheme,
            authority,
            base_path: uri.path().trim_end_matches('/').to_owned(),
        })
    }

    /// The instant-query URL for `promql`.
    fn query_uri(&self, promql: &str) -> Result<Uri, String> {
        format!(
            "{}://{}{}/api/v1/query?query={}",
            self.scheme,
            self.authority,
            self.base_path,
            percent_encode(promql)
        )
        .parse()
        .map_err(|e| format!("cannot build the query URL: {e}"))
    }
}

impl fmt::Display for PrometheusAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}{}", self.scheme, self.authority, self.base_path)
    }
}

impl fmt::Debug for PrometheusAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PrometheusAddress({self})")
    }
}

/// Credentials for a Prometheus behind authentication. Kubernetes fills them from a Secret's
/// data ([`Credentials::from_secret_data`]); local mode from a Secret manifest or a file.
#[derive(Clone, PartialEq, Eq)]
pub enum Credentials {
    /// HTTP basic auth (the Secret's `username` and `password`, as in Flagger).
    Basic {
        /// The user.
        username: String,
        /// The password.
        password: String,
    },
    /// A bearer token (the Secret's `token`).
    Bearer {
        /// The token.
        token: String,
    },
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print a secret, not even in a debug log.
        match self {
            Credentials::Basic { username, .. } => {
                write!(
                    f,
                    "Basic {{ username: {username:?}, password: <redacted> }}"
                )
            }
            Credentials::Bearer { .. } => f.write_str("Bearer { token: <redacted> }"),
        }
    }
}

impl Credentials {
    /// From a Secret's keys: `username` and `password` (basic auth), or `token` (bearer).
    pub fn from_secret_data(data: &BTreeMap<String, Vec<u8>>) -> Result<Self, String> {
        let text = |key: &str| -> Result<Option<String>, String> {
            data.get(key)
                .map(|v| {
                    String::from_utf8(v.clone())
                        .map(|s| s.trim_end_matches(['\n', '\r']).to_owned())
                        .map_err(|_| format!("`{key}` is not UTF-8 text"))
                })
                .transpose()
        };
        match (text("username")?, text("password")?, text("token")?) {
            (_, _, Some(token)) if !token.is_empty() => Ok(Credentials::Bearer { token }),
            (Some(username), Some(password), _) => Ok(Credentials::Basic { username, password }),
            (Some(_), None, _) => Err("has `username` but no `password`".to_owned()),
            (None, Some(_), _) => Err("has `password` but no `username`".to_owned()),
            _ => Err(
                "holds no credentials: set `username` and `password` (basic auth) or `token` (bearer)"
                    .to_owned(),
            ),
        }
    }

    /// From a file: a Secret manifest (`data`/`stringData`) or a plain YAML map with the same
    /// keys (`username` + `password`, or `token`).
    pub fn from_file(path: &std::path::Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let value: serde_yaml::Value = serde_yaml::from_str(&text)
            .map_err(|e| format!("{} is not YAML: {e}", path.display()))?;
        let mut data = BTreeMap::new();
        let is_secret = value.get("kind").and_then(serde_yaml::Value::as_str) == Some("Secret");
        if is_secret {
            if let Some(map) = value.get("data").and_then(serde_yaml::Value::as_mapping) {
                for (k, v) in map {
                    if let (Some(k), Some(v)) = (k.as_str(), v.as_str()) {
                        let bytes = base64::engine::general_purpose::STANDARD
                            .decode(v.trim())
                            .map_err(|e| {
                                format!("{}: data.{k} is not base64 ({e})", path.display())
                            })?;
                        data.insert(k.to_owned(), bytes);
                    }
                }
            }
        }
        let plain = if is_secret {
            value.get("stringData")
        } else {
            Some(&value)
        };
        if let Some(map) = plain.and_then(serde_yaml::Value::as_mapping) {
            for (k, v) in map {
                if let (Some(k), Some(v)) = (k.as_str(), v.as_str()) {
                    data.insert(k.to_owned(), v.as_bytes().to_vec());
                }
            }
        }
        Self::from_secret_data(&data).map_err(|e| format!("{} {e}", path.display()))
    }

    fn header(&self) -> Result<HeaderValue, String> {
        let value = match self {
            Credentials::Basic { username, password } => format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{username}:{password}"))
            ),
            Credentials::Bearer { token } => format!("Bearer {token}"),
        };
        let mut header = HeaderValue::from_str(&value)
            .map_err(|_| "the credentials contain characters not allowed in a header".to_owned())?;
        header.set_sensitive(true);
        Ok(header)
    }
}

/// Where and how to query one Prometheus.
#[derive(Debug, Clone, PartialEq)]
pub struct PrometheusConfig {
    /// The server.
    pub address: PrometheusAddress,
    /// Authentication, if the server needs it.
    pub credentials: Option<Credentials>,
    /// How long one query may take.
    pub timeout: Duration,
    /// Skip TLS verification (a MetricTemplate's `provider.insecureSkipVerify`).
    pub insecure_skip_verify: bool,
}

impl PrometheusConfig {
    /// A server without authentication, verified, with the default timeout.
    pub fn new(address: PrometheusAddress) -> Self {
        Self {
            address,
            credentials: None,
            timeout: DEFAULT_TIMEOUT,
            insecure_skip_verify: false,
        }
    }
}

/// What was wrong with Prometheus' answer.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ResponseError {
    /// Prometheus refused the query (bad PromQL is `bad_data`).
    #[error("rejected the query ({error_type}): {error}")]
    Rejected {
        /// Prometheus' `errorType`.
        error_type: String,
        /// Prometheus' `error`.
        error: String,
    },
    /// An HTTP error status without Prometheus' JSON error body.
    #[error("answered HTTP {status}{hint}: {body}")]
    Http {
        /// The status.
        status: u16,
        /// A hint for statuses with a usual cause.
        hint: &'static str,
        /// The start of the body.
        body: String,
    },
    /// Not the API's JSON.
    #[error("sent an answer that is not the query API's JSON ({0})")]
    Malformed(String),
    /// More than one series: a check needs one number.
    #[error("returned {count} series ({first}, ...); a check needs a single value: aggregate the query, e.g. with sum(...)")]
    Ambiguous {
        /// How many series.
        count: usize,
        /// The first series' labels.
        first: String,
    },
    /// A range vector or a string.
    #[error("returned a {0}; a check needs an instant vector or a scalar")]
    Shape(String),
}

/// A query that did not give an answer Weir can use.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum QueryError {
    /// No connection (refused, DNS, reset).
    #[error("cannot reach Prometheus at {address}: {reason}")]
    Unreachable {
        /// The server.
        address: String,
        /// The transport's error chain.
        reason: String,
    },
    /// No answer in time.
    #[error("Prometheus at {address} did not answer within {}", format_go_duration(*timeout))]
    Timeout {
        /// The server.
        address: String,
        /// The timeout.
        timeout: Duration,
    },
    /// An answer, but not a usable one.
    #[error("Prometheus at {address} {error}")]
    Response {
        /// The server.
        address: String,
        /// What was wrong.
        error: ResponseError,
    },
}

/// Reads an instant-query answer: `Ok(None)` for an empty result, `Ok(Some(v))` for one value
/// (possibly NaN or ±Inf, which the caller treats as no value).
pub fn parse_response(status: u16, body: &[u8]) -> Result<Option<f64>, ResponseError> {
    let json: Result<serde_json::Value, _> = serde_json::from_slice(body);
    let snippet = || {
        let text = String::from_utf8_lossy(body);
        let text = text.trim();
        match text.char_indices().nth(200) {
            Some((i, _)) => format!("{}…", &text[..i]),
            None => text.to_owned(),
        }
    };
    let json = match json {
        Ok(json) => json,
        Err(_) if status >= 400 => {
            return Err(ResponseError::Http {
                status,
                hint: match status {
                    401 | 403 => " (check the credentials)",
                    404 => " (is the address the Prometheus server's base URL?)",
                    _ => "",
                },
                body: snippet(),
            })
        }
        Err(e) => return Err(ResponseError::Malformed(e.to_string())),
    };
    let field = |name: &str| json.get(name).and_then(serde_json::Value::as_str);
    if field("status") == Some("error") {
        return Err(ResponseError::Rejected {
            error_type: field("errorType").unwrap_or("unknown").to_owned(),
            error: field("error").unwrap_or("no error message").to_owned(),
        });
    }
    if status >= 400 || field("status") != Some("success") {
        return Err(ResponseError::Http {
            status,
            hint: "",
            body: snippet(),
        });
    }
    let data = json
        .get("data")
        .ok_or_else(|| ResponseError::Malformed("no `data`".into()))?;
    let result_type = data
        .get("resultType")
        .and_then(serde_json::Value::as_str)
        .unwrap_or("");
    let result = data
        .get("result")
        .ok_or_else(|| ResponseError::Malformed("no `data.result`".into()))?;
    let sample = |pair: &serde_json::Value| -> Result<f64, ResponseError> {
        let text = pair
            .get(1)
            .and_then(serde_json::Value::as_str)
            .ok_or_else(|| {
                ResponseError::Malformed(format!("a sample is not [time, \"value\"]: {pair}"))
            })?;
        parse_sample(text)
            .ok_or_else(|| ResponseError::Malformed(format!("`{text}` is not a number")))
    };
    match result_type {
        "scalar" => sample(result).map(Some),
        "vector" => {
            let series = result
                .as_array()
                .ok_or_else(|| ResponseError::Malformed("`data.result` is not a list".into()))?;
            match series.as_slice() {
                [] => Ok(None),
                [one] => {
                    let value = one.get("value").ok_or_else(|| {
                        ResponseError::Malformed("a series has no `value`".into())
                    })?;
                    sample(value).map(Some)
                }
                [first, ..] => Err(ResponseError::Ambiguous {
                    count: series.len(),
                    first: first
                        .get("metric")
                        .map_or_else(|| "{}".to_owned(), ToString::to_string),
                }),
            }
        }
        "matrix" => Err(ResponseError::Shape("range vector (matrix)".into())),
        other => Err(ResponseError::Shape(format!("`{other}` result"))),
    }
}

/// Prometheus writes samples as Go formats floats: `1.5`, `NaN`, `+Inf`, `-Inf`.
fn parse_sample(text: &str) -> Option<f64> {
    match text {
        "NaN" => Some(f64::NAN),
        "+Inf" | "Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        _ => text.parse().ok(),
    }
}

/// Form-style percent-encoding of a query parameter value.
fn percent_encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len() * 3);
    for byte in value.bytes() {
        match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(byte as char)
            }
            _ => out.push_str(&format!("%{byte:02X}")),
        }
    }
    out
}

/// Collapses runs of whitespace, as Flagger does before sending (YAML block queries span lines).
fn squash_whitespace(query: &str) -> String {
    query.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The query API's client: the controller's shared HTTP client (keeps connections alive).
#[derive(Clone, Debug)]
pub struct PrometheusClient {
    http: HttpClient,
}

impl Default for PrometheusClient {
    fn default() -> Self {
        Self::new()
    }
}

impl PrometheusClient {
    /// Queries through the process's shared client.
    pub fn new() -> Self {
        Self::with_http(crate::http::shared().clone())
    }

    /// Queries through `http`.
    pub fn with_http(http: HttpClient) -> Self {
        Self { http }
    }

    /// Runs an instant query and returns its single value (`None`: empty result).
    pub async fn query(
        &self,
        config: &PrometheusConfig,
        promql: &str,
    ) -> Result<Option<f64>, QueryError> {
        let address = config.address.to_string();
        let unusable = |error: ResponseError| QueryError::Response {
            address: address.clone(),
            error,
        };
        let uri = config
            .address
            .query_uri(&squash_whitespace(promql))
            .map_err(|e| unusable(ResponseError::Malformed(e)))?;
        let mut request = self
            .http
            .client(config.insecure_skip_verify)
            .get(uri.to_string())
            .header(ACCEPT, "application/json");
        if let Some(credentials) = &config.credentials {
            let header = credentials
                .header()
                .map_err(|e| unusable(ResponseError::Malformed(e)))?;
            request = request.header(AUTHORIZATION, header);
        }
        let answer = self
            .http
            .send(request, config.timeout)
            .await
            .map_err(|e| match e {
                CallError::Timeout(timeout) => QueryError::Timeout {
                    address: address.clone(),
                    timeout,
                },
                CallError::Transport(reason) => QueryError::Unreachable {
                    address: address.clone(),
                    reason,
                },
                CallError::Request(reason) => unusable(ResponseError::Malformed(reason)),
                too_large @ CallError::TooLarge(_) => {
                    unusable(ResponseError::Malformed(too_large.to_string()))
                }
            })?;
        let (status, body) = (answer.status, answer.body);
        parse_response(status, &body).map_err(unusable)
    }
}

/// A query ready to run: where, what, and how to name it in messages.
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedQuery {
    /// The server and its credentials.
    pub config: PrometheusConfig,
    /// The rendered PromQL.
    pub promql: String,
    /// The request-count query for built-in checks (their sample count).
    pub count: Option<String>,
    /// What is being queried, for error messages: `MetricTemplate application/x`, ...
    pub what: String,
}

/// Measures checks with PromQL.
#[derive(Debug, Clone)]
pub struct PrometheusSource {
    client: PrometheusClient,
    global: Option<PrometheusConfig>,
    templates: Templates,
    timeout: Duration,
}

impl PrometheusSource {
    /// A source with an optional global server (for Canaries without `metricsServer`) and the
    /// MetricTemplates it can run.
    pub fn new(global: Option<PrometheusConfig>, templates: Templates) -> Self {
        let timeout = global.as_ref().map_or(DEFAULT_TIMEOUT, |g| g.timeout);
        Self {
            client: PrometheusClient::new(),
            global,
            templates,
            timeout,
        }
    }

    /// The templates this source runs.
    pub fn templates(&self) -> &Templates {
        &self.templates
    }

    /// The server for `canary`'s built-in checks and inline queries: its `metricsServer`, else
    /// the global one.
    pub fn server_for(
        &self,
        canary: &CanaryPlan,
    ) -> Result<Option<PrometheusConfig>, AddressError> {
        match &canary.metrics_server {
            Some(address) => {
                let address = PrometheusAddress::try_new(address)?;
                let global = self.global.as_ref().filter(|g| g.address == address);
                Ok(Some(PrometheusConfig {
                    credentials: global.and_then(|g| g.credentials.clone()),
                    timeout: self.timeout,
                    insecure_skip_verify: global.is_some_and(|g| g.insecure_skip_verify),
                    address,
                }))
            }
            None => Ok(self.global.clone()),
        }
    }

    /// Whether built-in checks of `canary` can be asked of Prometheus.
    pub fn serves(&self, canary: &CanaryPlan) -> bool {
        matches!(self.server_for(canary), Ok(Some(_)))
    }

    /// Renders the query for `check` and picks its server; `Err` says why it can't run.
    pub fn plan(&self, canary: &CanaryPlan, check: &MetricCheck) -> Result<PlannedQuery, String> {
        let model = model(canary, check);
        let default_server = |what: &str| -> Result<PrometheusConfig, String> {
            match self.server_for(canary) {
                Ok(Some(config)) => Ok(config),
                Ok(None) => Err(format!(
                    "{what}: no Prometheus address; set spec.metricsServer on the Canary or start the controller with --prometheus-address"
                )),
                Err(e) => Err(format!("{what}: spec.metricsServer: {e}")),
            }
        };
        let render = |what: &str, template: &QueryTemplate| {
            template.render(&model).map_err(|e| format!("{what}: {e}"))
        };
        match &check.kind {
            MetricKind::SuccessRate | MetricKind::Duration => {
                let what = format!("Istio query for {}", check.name);
                let builtin = builtin_query(&check.kind).unwrap_or_default();
                let parse = |q: &str| QueryTemplate::parse(q).map_err(|e| format!("{what}: {e}"));
                Ok(PlannedQuery {
                    config: default_server(&what)?,
                    promql: render(&what, &parse(builtin)?)?,
                    count: Some(render(&what, &parse(ISTIO_REQUEST_COUNT)?)?),
                    what,
                })
            }
            MetricKind::Template { name, namespace } => {
                let what = format!("MetricTemplate {namespace}/{name}");
                let stored = self.templates.get(namespace, name).ok_or_else(|| {
                    format!("{what} not found; create it in namespace {namespace}")
                })?;
                let config = match &stored.plan.provider.address {
                    Some(address) => PrometheusConfig {
                        address: PrometheusAddress::try_new(address)
                            .map_err(|e| format!("{what}: spec.provider.address: {e}"))?,
                        credentials: stored.credentials.clone(),
                        timeout: self.timeout,
                        insecure_skip_verify: stored.plan.provider.insecure_skip_verify,
                    },
                    None => default_server(&what)?,
                };
                Ok(PlannedQuery {
                    config,
                    promql: render(&what, &stored.plan.query)?,
                    count: None,
                    what,
                })
            }
            MetricKind::Query(query) => {
                let what = format!("query of metric {}", check.name);
                let template = QueryTemplate::parse(query).map_err(|e| format!("{what}: {e}"))?;
                Ok(PlannedQuery {
                    config: default_server(&what)?,
                    promql: render(&what, &template)?,
                    count: None,
                    what,
                })
            }
        }
    }
}

impl MetricSource for PrometheusSource {
    fn name(&self) -> &'static str {
        NAME
    }

    async fn measure(
        &self,
        canary: &CanaryPlan,
        check: &MetricCheck,
        _now: Instant,
    ) -> Measurement {
        let window = check.window;
        let planned = match self.plan(canary, check) {
            Ok(p) => p,
            Err(cause) => return Measurement::error(&check.name, NAME, window, cause),
        };
        let value = match self.client.query(&planned.config, &planned.promql).await {
            Err(e) => {
                return Measurement::error(
                    &check.name,
                    NAME,
                    window,
                    format!("{}: {e}", planned.what),
                )
            }
            Ok(v) => v.filter(|v| !v.is_nan()),
        };
        let Some(value) = value else {
            return Measurement::no_data(&check.name, NAME, window, None);
        };
        let sample_count = match &planned.count {
            None => None,
            Some(count) => match self.client.query(&planned.config, count).await {
                Err(e) => {
                    return Measurement::error(
                        &check.name,
                        NAME,
                        window,
                        format!("{} (request count): {e}", planned.what),
                    )
                }
                Ok(n) => n
                    .filter(|n| n.is_finite() && *n >= 0.0)
                    .map(|n| n.round() as u64),
            },
        };
        Measurement::value(&check.name, NAME, window, value, sample_count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::template::Templates;
    use crate::spec::{load_yaml, MetricTemplate};

    #[test]
    fn a_vector_with_one_series_is_its_value() {
        let body = br#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{},"value":[1700000000.5,"99.5"]}]}}"#;
        assert_eq!(parse_response(200, body), Ok(Some(99.5)));
    }

    #[test]
    fn a_scalar_is_its_value() {
        let body =
            br#"{"status":"success","data":{"resultType":"scalar","result":[1700000000.5,"1"]}}"#;
        assert_eq!(parse_response(200, body), Ok(Some(1.0)));
    }

    #[test]
    fn an_empty_vector_is_no_value() {
        let body = br#"{"status":"success","data":{"resultType":"vector","result":[]}}"#;
        assert_eq!(parse_response(200, body), Ok(None));
    }

    #[test]
    fn nan_and_infinities_are_read_as_prometheus_writes_them() {
        let body = |v: &str| {
            format!(
                r#"{{"status":"success","data":{{"resultType":"vector","result":[{{"metric":{{}},"value":[1,"{v}"]}}]}}}}"#
            )
        };
        assert!(parse_response(200, body("NaN").as_bytes())
            .unwrap()
            .unwrap()
            .is_nan());
        assert_eq!(
            parse_response(200, body("+Inf").as_bytes()),
            Ok(Some(f64::INFINITY))
        );
        assert_eq!(
            parse_response(200, body("-Inf").as_bytes()),
            Ok(Some(f64::NEG_INFINITY))
        );
        assert!(matches!(
            parse_response(200, body("many").as_bytes()),
            Err(ResponseError::Malformed(_))
        ));
    }

    #[test]
    fn bad_promql_is_a_rejection_with_prometheus_words() {
        let body = br#"{"status":"error","errorType":"bad_data","error":"1:5: parse error: unexpected end of input"}"#;
        let err = parse_response(400, body).unwrap_err();
        assert_eq!(
            err.to_string(),
            "rejected the query (bad_data): 1:5: parse error: unexpected end of input"
        );
    }

    #[test]
    fn several_series_are_refused_rather_than_one_picked() {
        let body = br#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{"pod":"a"},"value":[1,"1"]},{"metric":{"pod":"b"},"value":[1,"2"]}]}}"#;
        let err = parse_response(200, body).unwrap_err().to_string();
        assert!(err.contains("2 series") && err.contains("sum("), "{err}");
    }

    #[test]
    fn http_errors_and_other_shapes_say_what_came_back() {
        let err = parse_response(401, b"Unauthorized")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("HTTP 401") && err.contains("credentials"),
            "{err}"
        );
        let matrix = br#"{"status":"success","data":{"resultType":"matrix","result":[]}}"#;
        assert!(matches!(
            parse_response(200, matrix),
            Err(ResponseError::Shape(_))
        ));
        assert!(matches!(
            parse_response(200, b"<html>"),
            Err(ResponseError::Malformed(_))
        ));
    }

    #[test]
    fn addresses_are_http_or_https_with_an_optional_prefix() {
        let a = PrometheusAddress::try_new("http://prom.istio-system:9090/").unwrap();
        assert_eq!(a.to_string(), "http://prom.istio-system:9090");
        let uri = a.query_uri("sum(x{a=\"b\"}) * 100").unwrap();
        assert_eq!(
            uri.to_string(),
            "http://prom.istio-system:9090/api/v1/query?query=sum%28x%7Ba%3D%22b%22%7D%29%20%2A%20100"
        );
        let prefixed = PrometheusAddress::try_new("http://gw/prometheus").unwrap();
        assert!(prefixed
            .query_uri("up")
            .unwrap()
            .to_string()
            .starts_with("http://gw/prometheus/api/v1/query?"));
        let https = PrometheusAddress::try_new("https://prom:9090").unwrap();
        assert!(https
            .query_uri("up")
            .unwrap()
            .to_string()
            .starts_with("https://prom:9090/api/v1/query?"));
        let ftp = PrometheusAddress::try_new("ftp://prom:9090")
            .unwrap_err()
            .to_string();
        assert!(ftp.contains("must start with http:// or https://"), "{ftp}");
        assert!(PrometheusAddress::try_new("prom:9090").is_err());
        assert!(PrometheusAddress::try_new("http://").is_err());
    }

    #[test]
    fn credentials_come_from_secret_keys_and_never_print() {
        let data = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
                .collect::<BTreeMap<_, _>>()
        };
        let basic = Credentials::from_secret_data(&data(&[("username", "u"), ("password", "p\n")]))
            .unwrap();
        assert_eq!(
            basic,
            Credentials::Basic {
                username: "u".into(),
                password: "p".into()
            }
        );
        assert_eq!(basic.header().unwrap().to_str().unwrap(), "Basic dTpw");
        let bearer = Credentials::from_secret_data(&data(&[("token", "t0k")])).unwrap();
        assert_eq!(bearer.header().unwrap().to_str().unwrap(), "Bearer t0k");
        assert!(!format!("{bearer:?}").contains("t0k"));
        assert!(!format!("{basic:?}").contains("\"p\""));
        assert!(Credentials::from_secret_data(&data(&[("username", "u")]))
            .unwrap_err()
            .contains("no `password`"));
        assert!(Credentials::from_secret_data(&data(&[])).is_err());
    }

    const CANARY: &str = r#"apiVersion: weir.dev/v1alpha1
kind: Canary
metadata: {name: mhs, namespace: application}
spec:
  targetRef: {apiVersion: apps/v1, kind: Deployment, name: mhs}
  service: {port: 80}
  metricsServer: http://127.0.0.1:9090
  analysis:
    interval: 1m
    stepWeight: 10
    metrics:
    - name: request-success-rate
      thresholdRange: {min: 99}
      interval: 30s
    - name: errors
      templateRef: {name: errors}
      thresholdRange: {max: 1}
      interval: 1m
    - name: inline
      query: sum(rate(x{ns="{{ namespace }}"}[{{ interval }}]))
      thresholdRange: {max: 1}
"#;

    #[test]
    fn builtins_and_inline_queries_run_on_the_canarys_metrics_server() {
        let plan = load_yaml(CANARY).unwrap().plan;
        let source = PrometheusSource::new(None, Templates::new());
        let q = source.plan(&plan, &plan.analysis.metrics[0]).unwrap();
        assert_eq!(q.config.address.to_string(), "http://127.0.0.1:9090");
        assert!(q.promql.contains("destination_workload=~\"mhs\""));
        assert!(q.promql.contains("[30s]"));
        let count: String = q.count.unwrap().split_whitespace().collect();
        assert!(
            count.starts_with("sum(increase(istio_requests_total{"),
            "{count}"
        );
        let inline = source.plan(&plan, &plan.analysis.metrics[2]).unwrap();
        assert_eq!(inline.promql, "sum(rate(x{ns=\"application\"}[1m]))");
        assert_eq!(inline.count, None);
    }

    #[test]
    fn a_template_runs_on_its_own_provider_with_its_credentials() {
        let plan = load_yaml(CANARY).unwrap().plan;
        let templates = Templates::new();
        let source = PrometheusSource::new(None, templates.clone());
        let missing = source.plan(&plan, &plan.analysis.metrics[1]).unwrap_err();
        assert!(
            missing.contains("MetricTemplate application/errors not found"),
            "{missing}"
        );
        let (t, _) = serde_yaml::from_str::<MetricTemplate>(
            "apiVersion: weir.dev/v1alpha1\nkind: MetricTemplate\nmetadata: {name: errors}\nspec: {provider: {type: prometheus, address: 'http://10.0.0.1:9090'}, query: 'sum(errors{w=\"{{ target }}\"})'}",
        )
        .unwrap()
        .compile("application")
        .unwrap();
        templates.upsert(t, Some(Credentials::Bearer { token: "x".into() }));
        let q = source.plan(&plan, &plan.analysis.metrics[1]).unwrap();
        assert_eq!(q.config.address.to_string(), "http://10.0.0.1:9090");
        assert_eq!(q.promql, "sum(errors{w=\"mhs\"})");
        assert_eq!(q.what, "MetricTemplate application/errors");
        assert!(q.config.credentials.is_some());
    }

    #[test]
    fn without_any_address_the_error_says_where_to_set_one() {
        let plan = load_yaml(&CANARY.replace("  metricsServer: http://127.0.0.1:9090\n", ""))
            .unwrap()
            .plan;
        let source = PrometheusSource::new(None, Templates::new());
        assert!(!source.serves(&plan));
        let err = source.plan(&plan, &plan.analysis.metrics[0]).unwrap_err();
        assert!(
            err.contains("spec.metricsServer") && err.contains("--prometheus-address"),
            "{err}"
        );
        let global = PrometheusConfig {
            credentials: Some(Credentials::Bearer { token: "g".into() }),
            ..PrometheusConfig::new(PrometheusAddress::try_new("http://global:9090").unwrap())
        };
        let source = PrometheusSource::new(Some(global), Templates::new());
        assert!(source.serves(&plan));
        let q = source.plan(&plan, &plan.analysis.metrics[0]).unwrap();
        assert_eq!(q.config.address.to_string(), "http://global:9090");
        assert!(q.config.credentials.is_some());
    }

    /// A one-shot HTTP server: returns its address and the request head it received, after
    /// answering `answer` (or never answering, when `None`).
    async fn one_shot(
        answer: Option<&'static str>,
    ) -> (std::net::SocketAddr, tokio::sync::oneshot::Receiver<String>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
            let _ = tx.send(String::from_utf8_lossy(&head).into_owned());
            match answer {
                Some(body) => {
                    let response = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = stream.write_all(response.as_bytes()).await;
                }
                None => tokio::time::sleep(Duration::from_secs(10)).await,
            }
        });
        (addr, rx)
    }

    #[tokio::test]
    async fn a_query_carries_its_credentials_and_reads_the_answer() {
        let (addr, head) = one_shot(Some(
            r#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{},"value":[1,"42.5"]}]}}"#,
        ))
        .await;
        let config = PrometheusConfig {
            credentials: Some(Credentials::Bearer {
                token: "t0k".into(),
            }),
            ..PrometheusConfig::new(
                PrometheusAddress::try_new(&format!("http://{addr}/prom")).unwrap(),
            )
        };
        let value = PrometheusClient::new()
            .query(&config, "sum(rate(x[1m]))\n  * 100")
            .await
            .unwrap();
        assert_eq!(value, Some(42.5));
        let head = head.await.unwrap().to_lowercase();
        assert!(
            head.starts_with(
                "get /prom/api/v1/query?query=sum%28rate%28x%5b1m%5d%29%29%20%2a%20100 http/1.1"
            ),
            "{head}"
        );
        assert!(head.contains("authorization: bearer t0k"), "{head}");
    }

    #[tokio::test]
    async fn a_server_that_does_not_answer_in_time_is_a_timeout_error() {
        let (addr, _head) = one_shot(None).await;
        let config = PrometheusConfig {
            timeout: Duration::from_millis(300),
            ..PrometheusConfig::new(PrometheusAddress::try_new(&format!("http://{addr}")).unwrap())
        };
        let started = Instant::now();
        let err = PrometheusClient::new()
            .query(&config, "up")
            .await
            .unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(3));
        assert_eq!(
            err.to_string(),
            format!("Prometheus at http://{addr} did not answer within 300ms")
        );
    }

    #[tokio::test]
    async fn a_nan_answer_is_measured_as_no_value_and_judged_inconclusive_in_flaggers_words() {
        let (addr, _head) = one_shot(Some(
            r#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{},"value":[1,"NaN"]}]}}"#,
        ))
        .await;
        let plan = load_yaml(CANARY).unwrap().plan;
        let templates = Templates::new();
        let (t, _) = serde_yaml::from_str::<MetricTemplate>(&format!(
            "apiVersion: weir.dev/v1alpha1\nkind: MetricTemplate\nmetadata: {{name: errors}}\nspec: {{provider: {{type: prometheus, address: 'http://{addr}'}}, query: 'sum(x) / sum(y)'}}"
        ))
        .unwrap()
        .compile("application")
        .unwrap();
        templates.upsert(t, None);
        let check = &plan.analysis.metrics[1];
        let m = PrometheusSource::new(None, templates)
            .measure(&plan, check, Instant::now())
            .await;
        assert_eq!(
            m.outcome,
            Ok(crate::analysis::Sample {
                value: None,
                sample_count: None
            })
        );
        let verdict = crate::analysis::evaluate(check, Some(&m), 20);
        assert_eq!(verdict.verdict, crate::analysis::Verdict::Inconclusive);
        assert_eq!(
            verdict
                .halt_message(&check.kind, &plan.id(), &plan.target_id())
                .unwrap(),
            "Halt advancement no values found for custom metric: errors: no values found (in 1m0s from prometheus)"
        );
    }

    #[tokio::test]
    async fn an_unreachable_server_is_an_error_naming_it() {
        // A port nothing listens on: bind, note, release.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let config = PrometheusConfig::new(
            PrometheusAddress::try_new(&format!("http://127.0.0.1:{port}")).unwrap(),
        );
        let err = PrometheusClient::new()
            .query(&config, "vector(1)")
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&format!(
                "cannot reach Prometheus at http://127.0.0.1:{port}"
            )) && err.to_lowercase().contains("refused"),
            "{err}"
        );
    }
}
