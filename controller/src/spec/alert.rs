//! Alerts: Flagger's `AlertProvider` resource and `spec.analysis.alerts`, checked.
//!
//! ```yaml
//! apiVersion: weir.dev/v1alpha1          # or flagger.app/v1beta1, pasted from Flagger
//! kind: AlertProvider
//! metadata: {name: on-call, namespace: application}
//! spec:
//!   type: slack                          # slack, msteams, discord, or generic (JSON webhook)
//!   channel: on-call                     # default `general` (slack, discord)
//!   username: weir                       # default `flagger`, as Flagger (slack, discord)
//!   address: https://hooks.slack.com/... # or secretRef: a Secret with `address` (and `token`)
//! ```
//!
//! A Canary names providers in `spec.analysis.alerts: [{name, severity, providerRef}]`; each
//! alert is sent to a provider whose severity it reaches (Flagger's rule: `info` gets every
//! alert, `warn` gets warnings and errors, `error` only errors).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::resource::{ObjectMeta, Unknown};
use super::template::LocalObjectReference;
use super::validate::{API_VERSION, FLAGGER_API_VERSION};

/// How serious an alert is (Flagger's `AlertSeverity`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum AlertSeverity {
    /// Progress: a new revision, a promotion.
    Info,
    /// Something waits for a person: an approval, a manual rollback.
    Warn,
    /// The rollout failed: threshold reached, deadline exceeded, promotion failed.
    Error,
}

impl AlertSeverity {
    /// Every severity with its spelling.
    pub const ALL: [(AlertSeverity, &'static str); 3] = [
        (AlertSeverity::Info, "info"),
        (AlertSeverity::Warn, "warn"),
        (AlertSeverity::Error, "error"),
    ];

    /// The spec's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            AlertSeverity::Info => "info",
            AlertSeverity::Warn => "warn",
            AlertSeverity::Error => "error",
        }
    }

    /// Parses the spec's spelling; empty is `info`, Flagger's default.
    pub fn parse(text: &str) -> Option<AlertSeverity> {
        if text.is_empty() {
            return Some(AlertSeverity::Info);
        }
        Self::ALL.iter().find(|(_, s)| *s == text).map(|(k, _)| *k)
    }

    /// Whether an alert configured with this severity receives an alert of `sent` (Flagger:
    /// info gets all, warn gets warn and error, error gets error).
    pub fn receives(self, sent: AlertSeverity) -> bool {
        sent >= self
    }
}

/// An entry of `spec.analysis.alerts`, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlertPlan {
    /// The alert's name.
    pub name: String,
    /// The least severity it is sent.
    pub severity: AlertSeverity,
    /// The provider's namespace (the Canary's unless the reference names another).
    pub provider_namespace: String,
    /// The provider's name.
    pub provider_name: String,
}

impl AlertPlan {
    /// `namespace/name` of its provider, how messages name it.
    pub fn provider_id(&self) -> String {
        format!("{}/{}", self.provider_namespace, self.provider_name)
    }
}

/// An AlertProvider resource as written.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AlertProvider {
    /// `weir.dev/v1alpha1` (or `flagger.app/v1beta1`).
    #[serde(default)]
    pub api_version: String,
    /// Always `AlertProvider`.
    #[serde(default)]
    pub kind: String,
    /// Name and namespace.
    #[serde(default)]
    pub metadata: ObjectMeta,
    /// Where and how alerts are sent.
    #[serde(default)]
    pub spec: AlertProviderSpec,
    /// Top-level keys Flagger does not know.
    #[serde(flatten)]
    pub unknown: Unknown,
}

/// The provider types Weir sends to (also the CRD schema's enum).
pub const ALERT_PROVIDER_TYPES: [&str; 4] = ["slack", "msteams", "discord", "generic"];

/// `spec` of an AlertProvider (Flagger's field names).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("required" = ["type"]))]
pub struct AlertProviderSpec {
    /// `slack`, `msteams`, `discord` (Slack-compatible endpoint), or `generic` (Weir: a JSON
    /// POST of the alert's fields).
    #[serde(default, rename = "type", skip_serializing_if = "String::is_empty")]
    #[schemars(extend("enum" = ALERT_PROVIDER_TYPES))]
    pub kind: String,
    /// The channel (slack, discord; default `general`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel: Option<String>,
    /// The bot's name (slack, discord; default `flagger`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// The webhook URL (http or https); or set `secretRef`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// An HTTP(S) proxy the alerts go through (`http://proxy:3128`), as in Flagger.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy: Option<String>,
    /// A Secret in the provider's namespace with `address` (the URL, which holds the webhook's
    /// secret for Slack and Teams) and optionally `token` (a bearer token, Slack's apps).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<LocalObjectReference>,
    /// Keys Flagger does not know.
    #[serde(flatten)]
    pub unknown: Unknown,
}

/// The provider types, checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AlertProviderType {
    /// Slack's incoming webhooks (attachments with a colour).
    Slack,
    /// Microsoft Teams' MessageCard connector.
    MsTeams,
    /// Discord's Slack-compatible endpoint (`<webhook>/slack`).
    Discord,
    /// Weir's generic JSON webhook.
    Generic,
}

/// A checked AlertProvider; its address may still be in a Secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlertProviderPlan {
    /// Name.
    pub name: String,
    /// Namespace.
    pub namespace: String,
    /// Type.
    pub kind: AlertProviderType,
    /// Channel (Flagger's default `general`).
    pub channel: String,
    /// User name (Flagger's default `flagger`).
    pub username: String,
    /// The address written in the spec.
    pub address: Option<String>,
    /// The Secret holding the address (wins over `address`, as in Flagger).
    pub secret_ref: Option<String>,
    /// The proxy alerts go through, if any.
    pub proxy: Option<String>,
}

/// A provider ready to send to.
#[derive(Clone, PartialEq, Eq)]
pub struct ResolvedProvider {
    /// `namespace/name`.
    pub id: String,
    /// Type.
    pub kind: AlertProviderType,
    /// The URL to POST to.
    pub url: String,
    /// A bearer token (slack).
    pub token: Option<String>,
    /// Channel.
    pub channel: String,
    /// User name.
    pub username: String,
    /// The proxy to send through, if any.
    pub proxy: Option<String>,
}

impl std::fmt::Debug for ResolvedProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL of a Slack or Teams webhook is its secret: never print it.
        f.debug_struct("ResolvedProvider")
            .field("id", &self.id)
            .field("kind", &self.kind)
            .field("channel", &self.channel)
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

/// Why an AlertProvider cannot be used; names it and every problem.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("AlertProvider {provider} is invalid: {}", problems.join("; "))]
pub struct AlertProviderError {
    /// `namespace/name`.
    pub provider: String,
    /// Each problem, as `path: what is wrong`.
    pub problems: Vec<String>,
}

impl AlertProvider {
    /// Checks the provider; a missing namespace becomes `default_namespace`. Returns the plan and
    /// warnings (unknown keys).
    pub fn compile(
        &self,
        default_namespace: &str,
    ) -> Result<(AlertProviderPlan, Vec<String>), AlertProviderError> {
        let namespace = self
            .metadata
            .namespace
            .clone()
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| default_namespace.to_owned());
        let name = self.metadata.name.clone();
        let mut problems = Vec::new();
        let mut warnings = Vec::new();
        if self.api_version != API_VERSION && self.api_version != FLAGGER_API_VERSION {
            problems.push(format!(
                "apiVersion: `{}` is not supported, expected {API_VERSION} (or {FLAGGER_API_VERSION})",
                self.api_version
            ));
        }
        if name.is_empty() {
            problems.push("metadata.name: is required".to_owned());
        }
        for key in self.unknown.keys() {
            warnings.push(format!("{key}: unknown field, ignored"));
        }
        let spec = &self.spec;
        for key in spec.unknown.keys() {
            warnings.push(format!("spec.{key}: unknown field, ignored"));
        }
        let kind = match spec.kind.as_str() {
            "slack" => Some(AlertProviderType::Slack),
            "msteams" => Some(AlertProviderType::MsTeams),
            "discord" => Some(AlertProviderType::Discord),
            "generic" => Some(AlertProviderType::Generic),
            other => {
                problems.push(format!(
                    "spec.type: `{other}` is not supported, expected one of {}",
                    ALERT_PROVIDER_TYPES.join(", ")
                ));
                None
            }
        };
        let proxy = spec.proxy.clone().filter(|p| !p.trim().is_empty());
        if let Some(url) = &proxy {
            if let Err(e) = crate::http::check_proxy(url) {
                problems.push(format!("spec.proxy: {e}"));
            }
        }
        let address = spec.address.clone().filter(|a| !a.trim().is_empty());
        if let Some(url) = &address {
            if let Err(e) = check_url(url) {
                problems.push(format!("spec.address: {e}"));
            }
        }
        let secret_ref = match &spec.secret_ref {
            Some(r) if r.name.is_empty() => {
                problems.push("spec.secretRef.name: is required".to_owned());
                None
            }
            Some(r) => Some(r.name.clone()),
            None => None,
        };
        if address.is_none() && secret_ref.is_none() {
            problems.push(
                "spec.address: is required: the webhook URL, or a secretRef to a Secret with an `address` key"
                    .to_owned(),
            );
        }
        let text = |v: &Option<String>, default: &str| {
            v.clone()
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| default.to_owned())
        };
        match kind {
            Some(kind) if problems.is_empty() => Ok((
                AlertProviderPlan {
                    name,
                    namespace,
                    kind,
                    channel: text(&spec.channel, "general"),
                    username: text(&spec.username, "flagger"),
                    address,
                    secret_ref,
                    proxy,
                },
                warnings,
            )),
            _ => Err(AlertProviderError {
                provider: format!("{namespace}/{name}"),
                problems,
            }),
        }
    }
}

impl AlertProviderPlan {
    /// `namespace/name`.
    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The provider ready to send to, with the data of its Secret when it names one (`None`:
    /// the Secret was not found).
    pub fn resolve(
        &self,
        secret: Option<&BTreeMap<String, Vec<u8>>>,
    ) -> Result<ResolvedProvider, String> {
        let id = self.id();
        let (url, token) = match (&self.secret_ref, secret) {
            (Some(name), None) => {
                return Err(format!(
                    "AlertProvider {id}: Secret {}/{name} not found",
                    self.namespace
                ))
            }
            (Some(name), Some(data)) => {
                let text = |key: &str| {
                    data.get(key).map(|v| {
                        String::from_utf8_lossy(v)
                            .trim_end_matches(['\n', '\r'])
                            .to_owned()
                    })
                };
                let url = text("address").filter(|a| !a.is_empty()).ok_or_else(|| {
                    format!(
                        "AlertProvider {id}: Secret {}/{name} has no `address` key (the webhook URL)",
                        self.namespace
                    )
                })?;
                check_url(&url).map_err(|e| {
                    format!(
                        "AlertProvider {id}: the `address` in Secret {}/{name} {e}",
                        self.namespace
                    )
                })?;
                (url, text("token").filter(|t| !t.is_empty()))
            }
            (None, _) => (self.address.clone().unwrap_or_default(), None),
        };
        let url = match self.kind {
            // Flagger posts Slack's shape to Discord's Slack-compatible endpoint.
            AlertProviderType::Discord if !url.trim_end_matches('/').ends_with("/slack") => {
                format!("{}/slack", url.trim_end_matches('/'))
            }
            _ => url,
        };
        Ok(ResolvedProvider {
            id,
            kind: self.kind,
            url,
            token,
            channel: self.channel.clone(),
            username: self.username.clone(),
            proxy: self.proxy.clone(),
        })
    }
}

fn check_url(url: &str) -> Result<(), String> {
    if url.starts_with("http://") || url.starts_with("https://") {
        Ok(())
    } else {
        Err("must be an http:// or https:// URL".to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn provider(yaml: &str) -> AlertProvider {
        serde_yaml::from_str(yaml).unwrap()
    }

    #[test]
    fn severities_filter_as_flagger_does() {
        use AlertSeverity::*;
        let table = [
            (Info, [true, true, true]),
            (Warn, [false, true, true]),
            (Error, [false, false, true]),
        ];
        for (configured, expected) in table {
            let got = [Info, Warn, Error].map(|sent| configured.receives(sent));
            assert_eq!(got, expected, "{configured:?}");
        }
        assert_eq!(AlertSeverity::parse(""), Some(Info));
        assert_eq!(AlertSeverity::parse("warning"), None);
    }

    #[test]
    fn a_provider_gets_flaggers_defaults_and_its_secret_wins() {
        let (plan, warnings) = provider(
            "apiVersion: flagger.app/v1beta1\nkind: AlertProvider\nmetadata: {name: chat}\nspec: {type: discord, address: 'https://discord.example/api/webhooks/1/x', secretRef: {name: chat-url}}",
        )
        .compile("application")
        .unwrap();
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(
            (plan.channel.as_str(), plan.username.as_str()),
            ("general", "flagger")
        );
        assert!(plan
            .resolve(None)
            .unwrap_err()
            .contains("Secret application/chat-url not found"));
        let data = BTreeMap::from([(
            "address".to_owned(),
            b"https://discord.example/api/webhooks/2/y\n".to_vec(),
        )]);
        let resolved = plan.resolve(Some(&data)).unwrap();
        assert_eq!(
            resolved.url,
            "https://discord.example/api/webhooks/2/y/slack"
        );
        assert!(
            !format!("{resolved:?}").contains("webhooks"),
            "the URL is a secret"
        );
        let empty = BTreeMap::new();
        assert!(plan
            .resolve(Some(&empty))
            .unwrap_err()
            .contains("no `address` key"));
    }

    #[test]
    fn every_problem_of_a_provider_is_said_at_once() {
        let err = provider(
            "apiVersion: weir.dev/v1alpha1\nkind: AlertProvider\nmetadata: {name: x}\nspec: {type: rocket, proxy: 'proxy:3128'}",
        )
        .compile("app")
        .unwrap_err()
        .to_string();
        for needle in [
            "app/x",
            "spec.type: `rocket`",
            "spec.proxy: `proxy:3128`",
            "spec.address: is required",
        ] {
            assert!(err.contains(needle), "{needle} missing from {err}");
        }
    }
}
