//! `spec.service`'s route options (`timeout`, `retries`, `headers`, `rewrite`, `corsPolicy`,
//! `match`), compiled once into [`RouteOptions`] so that the two places that write routes (the
//! Istio VirtualService in `platform/kubernetes/istio.rs`, local mode's Envoy routes in
//! `platform/local/envoy.rs`) render the same meaning and neither can forget a field.
//!
//! The shapes are Istio's (`HTTPRetry`, `Headers`, `HTTPRewrite`, `CorsPolicy`,
//! `HTTPMatchRequest`), which Flagger copies into every route of the VirtualService it writes.
//! Keys Istio knows but Flagger's types do not are warned about and left out, as Flagger's
//! decoding drops them; a value of the wrong shape is an error naming the field.

use super::duration::parse_go_duration;
use super::plan::{HeaderRule, StringMatcher};
use super::resource::{CanaryService, Unknown};
use serde::Deserialize;
use serde_json::Value;
use std::collections::BTreeMap;
use std::time::Duration;

/// A duration as written (Flagger copies the text into the VirtualService) and its value (for
/// Envoy, which local mode configures itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrittenDuration {
    /// The text of the spec, like `30s` or `1m30s`.
    pub text: String,
    /// Its value.
    pub value: Duration,
}

/// The route options of `spec.service`, applied to the primary and the canary route alike.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RouteOptions {
    /// `timeout`: how long a request may take, all retries included.
    pub timeout: Option<WrittenDuration>,
    /// `retries`.
    pub retries: Option<Retries>,
    /// `headers`: request and response header operations.
    pub headers: Option<HeaderOperations>,
    /// `rewrite`.
    pub rewrite: Option<Rewrite>,
    /// `corsPolicy`.
    pub cors: Option<CorsPolicy>,
    /// `match`: the routes serve only requests matching one of these (none: every request).
    pub matches: Vec<RouteMatch>,
}

impl RouteOptions {
    /// True when no option is set: the routes are Weir's plain ones.
    pub fn is_empty(&self) -> bool {
        self == &RouteOptions::default()
    }
}

/// Istio's `HTTPRetry`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retries {
    /// Retries after the first attempt (Istio's `attempts`); 0 disables retrying.
    pub attempts: u32,
    /// Timeout of each attempt.
    pub per_try_timeout: Option<WrittenDuration>,
    /// Envoy's retry conditions, comma-separated (`5xx,connect-failure`); status codes such as
    /// `503` are allowed, as Istio allows them.
    pub retry_on: Option<String>,
}

/// Istio's `Headers`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HeaderOperations {
    /// On the request, before it is forwarded.
    pub request: HeaderOps,
    /// On the response, before it is returned.
    pub response: HeaderOps,
}

/// Istio's `HeaderOperations`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HeaderOps {
    /// Headers to set, replacing any value.
    pub set: BTreeMap<String, String>,
    /// Headers to append.
    pub add: BTreeMap<String, String>,
    /// Headers to remove.
    pub remove: Vec<String>,
}

impl HeaderOps {
    /// True when no operation is set.
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.add.is_empty() && self.remove.is_empty()
    }
}

/// Istio's `HTTPRewrite`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Rewrite {
    /// Replaces the matched path prefix (the whole path without a `match`).
    pub uri: Option<String>,
    /// Replaces the authority (Host) header.
    pub authority: Option<String>,
}

/// Istio's `CorsPolicy`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CorsPolicy {
    /// Allowed origins.
    pub allow_origins: Vec<StringMatcher>,
    /// Allowed methods.
    pub allow_methods: Vec<String>,
    /// Allowed request headers.
    pub allow_headers: Vec<String>,
    /// Response headers the browser may read.
    pub expose_headers: Vec<String>,
    /// How long a preflight answer may be cached.
    pub max_age: Option<WrittenDuration>,
    /// Whether credentials are allowed.
    pub allow_credentials: Option<bool>,
}

/// Istio's `HTTPMatchRequest`: all set conditions must hold.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RouteMatch {
    /// The match's name (Istio uses it in access logs).
    pub name: Option<String>,
    /// The path.
    pub uri: Option<StringMatcher>,
    /// The scheme.
    pub scheme: Option<StringMatcher>,
    /// The method.
    pub method: Option<StringMatcher>,
    /// The authority.
    pub authority: Option<StringMatcher>,
    /// Request headers (names lower case).
    pub headers: Vec<HeaderRule>,
    /// Query parameters.
    pub query_params: Vec<(String, StringMatcher)>,
    /// Match the path ignoring case.
    pub ignore_uri_case: bool,
    /// Conditions only Istio can evaluate (`port`, `sourceLabels`, `gateways`,
    /// `sourceNamespace`, `withoutHeaders`, `statPrefix`): written into the VirtualService as
    /// given; local mode's Envoy refuses a Canary that has them.
    pub istio_only: BTreeMap<String, Value>,
}

/// What the route options of a Canary compile to, with the problems found.
pub(super) struct Compiled {
    pub options: RouteOptions,
    /// `(path, message)` of each value that is wrong.
    pub errors: Vec<(String, String)>,
    /// Paths of keys Flagger's types do not have.
    pub unknown: Vec<String>,
}

/// Compiles `service`'s route options; `path` is `spec.service`.
pub(super) fn compile(service: &CanaryService, path: &str) -> Compiled {
    let mut cx = Compiled {
        options: RouteOptions::default(),
        errors: Vec::new(),
        unknown: Vec::new(),
    };
    let at = |field: &str| format!("{path}.{field}");
    cx.options.timeout = service
        .timeout
        .as_ref()
        .and_then(|v| cx.duration_value(&at("timeout"), v));
    if let Some(v) = &service.retries {
        cx.options.retries = cx.retries(&at("retries"), v);
    }
    if let Some(v) = &service.headers {
        cx.options.headers = cx.headers(&at("headers"), v);
    }
    if let Some(v) = &service.rewrite {
        cx.options.rewrite = cx.rewrite(&at("rewrite"), v);
    }
    if let Some(v) = &service.cors_policy {
        cx.options.cors = cx.cors(&at("corsPolicy"), v);
    }
    if let Some(v) = &service.matches {
        cx.options.matches = cx.matches(&at("match"), v);
    }
    cx
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawRetries {
    #[serde(default)]
    attempts: Option<i64>,
    #[serde(default)]
    per_try_timeout: Option<String>,
    #[serde(default)]
    retry_on: Option<String>,
    #[serde(flatten)]
    unknown: Unknown,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct RawHeaderOps {
    #[serde(default)]
    set: BTreeMap<String, String>,
    #[serde(default)]
    add: BTreeMap<String, String>,
    #[serde(default)]
    remove: Vec<String>,
    #[serde(flatten)]
    unknown: Unknown,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawHeaders {
    #[serde(default)]
    request: Option<RawHeaderOps>,
    #[serde(default)]
    response: Option<RawHeaderOps>,
    #[serde(flatten)]
    unknown: Unknown,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawRewrite {
    #[serde(default)]
    uri: Option<String>,
    #[serde(default)]
    authority: Option<String>,
    #[serde(flatten)]
    unknown: Unknown,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct RawStringMatch {
    #[serde(default)]
    exact: Option<String>,
    #[serde(default)]
    prefix: Option<String>,
    #[serde(default)]
    regex: Option<String>,
    #[serde(flatten)]
    unknown: Unknown,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawCors {
    /// Istio's deprecated list of exact origins.
    #[serde(default)]
    allow_origin: Vec<String>,
    #[serde(default)]
    allow_origins: Vec<RawStringMatch>,
    #[serde(default)]
    allow_methods: Vec<String>,
    #[serde(default)]
    allow_headers: Vec<String>,
    #[serde(default)]
    expose_headers: Vec<String>,
    #[serde(default)]
    max_age: Option<String>,
    #[serde(default)]
    allow_credentials: Option<bool>,
    #[serde(flatten)]
    unknown: Unknown,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawMatch {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    uri: Option<RawStringMatch>,
    #[serde(default)]
    scheme: Option<RawStringMatch>,
    #[serde(default)]
    method: Option<RawStringMatch>,
    #[serde(default)]
    authority: Option<RawStringMatch>,
    #[serde(default)]
    headers: BTreeMap<String, RawStringMatch>,
    #[serde(default)]
    query_params: BTreeMap<String, RawStringMatch>,
    #[serde(default)]
    ignore_uri_case: bool,
    #[serde(flatten)]
    other: Unknown,
}

/// `HTTPMatchRequest` keys that only Istio evaluates.
const ISTIO_ONLY_MATCH_KEYS: [&str; 6] = [
    "port",
    "sourceLabels",
    "gateways",
    "sourceNamespace",
    "withoutHeaders",
    "statPrefix",
];

impl Compiled {
    fn parse<T: serde::de::DeserializeOwned>(&mut self, path: &str, v: &Value) -> Option<T> {
        match serde_json::from_value(v.clone()) {
            Ok(t) => Some(t),
            Err(e) => {
                self.errors.push((path.to_owned(), format!("{e}")));
                None
            }
        }
    }

    fn unknown(&mut self, path: &str, unknown: &Unknown) {
        for key in unknown.keys() {
            self.unknown.push(format!("{path}.{key}"));
        }
    }

    fn duration_value(&mut self, path: &str, v: &Value) -> Option<WrittenDuration> {
        let Some(text) = v.as_str() else {
            self.errors.push((
                path.to_owned(),
                format!("must be a duration such as 30s, got {v}"),
            ));
            return None;
        };
        self.duration(path, text)
    }

    fn duration(&mut self, path: &str, text: &str) -> Option<WrittenDuration> {
        match parse_go_duration(text) {
            Ok(value) if !value.is_zero() => Some(WrittenDuration {
                text: text.to_owned(),
                value,
            }),
            Ok(_) => {
                self.errors.push((
                    path.to_owned(),
                    format!("must be longer than zero, got `{text}`"),
                ));
                None
            }
            Err(e) => {
                self.errors.push((
                    path.to_owned(),
                    format!("`{text}` is not a duration ({e}); write it like 30s, 1m or 500ms"),
                ));
                None
            }
        }
    }

    fn retries(&mut self, path: &str, v: &Value) -> Option<Retries> {
        let raw: RawRetries = self.parse(path, v)?;
        self.unknown(path, &raw.unknown);
        let attempts = match raw.attempts {
            None => {
                self.errors.push((
                    format!("{path}.attempts"),
                    "is required: the number of retries, e.g. 3 (0 disables retrying)".into(),
                ));
                return None;
            }
            Some(n) => match u32::try_from(n) {
                Ok(n) => n,
                Err(_) => {
                    self.errors.push((
                        format!("{path}.attempts"),
                        format!("must be at least 0, got {n}"),
                    ));
                    return None;
                }
            },
        };
        let per_try_timeout = match &raw.per_try_timeout {
            Some(t) => Some(self.duration(&format!("{path}.perTryTimeout"), t)?),
            None => None,
        };
        let retry_on = raw.retry_on.filter(|s| !s.trim().is_empty());
        if let Some(on) = &retry_on {
            if on.split(',').any(|c| c.trim().is_empty()) {
                self.errors.push((
                    format!("{path}.retryOn"),
                    format!("`{on}` has an empty condition; separate conditions with single commas, e.g. 5xx,connect-failure"),
                ));
                return None;
            }
        }
        Some(Retries {
            attempts,
            per_try_timeout,
            retry_on,
        })
    }

    fn header_ops(&mut self, path: &str, raw: Option<RawHeaderOps>) -> HeaderOps {
        let raw = raw.unwrap_or_default();
        self.unknown(path, &raw.unknown);
        HeaderOps {
            set: raw.set,
            add: raw.add,
            remove: raw.remove,
        }
    }

    fn headers(&mut self, path: &str, v: &Value) -> Option<HeaderOperations> {
        let raw: RawHeaders = self.parse(path, v)?;
        self.unknown(path, &raw.unknown);
        Some(HeaderOperations {
            request: self.header_ops(&format!("{path}.request"), raw.request),
            response: self.header_ops(&format!("{path}.response"), raw.response),
        })
    }

    fn rewrite(&mut self, path: &str, v: &Value) -> Option<Rewrite> {
        let raw: RawRewrite = self.parse(path, v)?;
        self.unknown(path, &raw.unknown);
        let uri = raw.uri.filter(|u| !u.is_empty());
        if let Some(uri) = &uri {
            if !uri.starts_with('/') {
                self.errors
                    .push((format!("{path}.uri"), format!("`{uri}` must start with /")));
                return None;
            }
        }
        Some(Rewrite {
            uri,
            authority: raw.authority.filter(|a| !a.is_empty()),
        })
    }

    fn string_match(&mut self, path: &str, raw: RawStringMatch) -> Option<StringMatcher> {
        self.unknown(path, &raw.unknown);
        let set: Vec<StringMatcher> = [
            raw.exact.map(StringMatcher::Exact),
            raw.prefix.map(StringMatcher::Prefix),
            raw.regex.map(StringMatcher::Regex),
        ]
        .into_iter()
        .flatten()
        .collect();
        match <[StringMatcher; 1]>::try_from(set) {
            Ok([m]) => {
                if let StringMatcher::Regex(r) = &m {
                    if let Err(e) = regex_syntax_check(r) {
                        self.errors.push((
                            format!("{path}.regex"),
                            format!("`{r}` is not a regex: {e}"),
                        ));
                        return None;
                    }
                }
                Some(m)
            }
            Err(_) => {
                self.errors.push((
                    path.to_owned(),
                    "set exactly one of exact, prefix or regex".into(),
                ));
                None
            }
        }
    }

    fn cors(&mut self, path: &str, v: &Value) -> Option<CorsPolicy> {
        let raw: RawCors = self.parse(path, v)?;
        self.unknown(path, &raw.unknown);
        let mut allow_origins: Vec<StringMatcher> = raw
            .allow_origin
            .into_iter()
            .map(StringMatcher::Exact)
            .collect();
        for (i, m) in raw.allow_origins.into_iter().enumerate() {
            allow_origins.push(self.string_match(&format!("{path}.allowOrigins[{i}]"), m)?);
        }
        let max_age = match &raw.max_age {
            Some(t) => Some(self.duration(&format!("{path}.maxAge"), t)?),
            None => None,
        };
        Some(CorsPolicy {
            allow_origins,
            allow_methods: raw.allow_methods,
            allow_headers: raw.allow_headers,
            expose_headers: raw.expose_headers,
            max_age,
            allow_credentials: raw.allow_credentials,
        })
    }

    fn matches(&mut self, path: &str, v: &Value) -> Vec<RouteMatch> {
        let Some(list) = v.as_array() else {
            self.errors.push((
                path.to_owned(),
                "must be a list of Istio HTTPMatchRequests, e.g. [{uri: {prefix: /api}}]".into(),
            ));
            return Vec::new();
        };
        let mut out = Vec::new();
        for (i, item) in list.iter().enumerate() {
            let mp = format!("{path}[{i}]");
            let Some(raw) = self.parse::<RawMatch>(&mp, item) else {
                continue;
            };
            let mut m = RouteMatch {
                name: raw.name,
                ignore_uri_case: raw.ignore_uri_case,
                ..RouteMatch::default()
            };
            for (field, value, slot) in [
                ("uri", raw.uri, &mut m.uri),
                ("scheme", raw.scheme, &mut m.scheme),
                ("method", raw.method, &mut m.method),
                ("authority", raw.authority, &mut m.authority),
            ] {
                if let Some(value) = value {
                    *slot = self.string_match(&format!("{mp}.{field}"), value);
                }
            }
            for (name, value) in raw.headers {
                if let Some(value) = self.string_match(&format!("{mp}.headers.{name}"), value) {
                    m.headers.push(HeaderRule {
                        name: name.to_ascii_lowercase(),
                        value,
                    });
                }
            }
            for (name, value) in raw.query_params {
                if let Some(value) = self.string_match(&format!("{mp}.queryParams.{name}"), value) {
                    m.query_params.push((name, value));
                }
            }
            for (key, value) in raw.other {
                if ISTIO_ONLY_MATCH_KEYS.contains(&key.as_str()) {
                    m.istio_only.insert(key, value);
                } else {
                    self.unknown.push(format!("{mp}.{key}"));
                }
            }
            out.push(m);
        }
        out
    }
}

/// Checks a regex's syntax as far as Envoy's and Istio's RE2 would, with the Rust `regex`
/// syntax (the same family; a pattern it refuses would be refused by Envoy too, in practice).
fn regex_syntax_check(pattern: &str) -> Result<(), String> {
    regex_lite::Regex::new(pattern)
        .map(|_| ())
        .map_err(|e| e.to_string())
}
