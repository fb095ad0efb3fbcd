//! What the executor tells the engine about the world at one step.

use super::check::Measurement;
use std::collections::BTreeMap;

/// Everything the engine may consult at one step. Build it with [`Observations::new`]; fill
/// `measurements` and `webhooks` only when a step asks for them
/// ([`Outcome::Need`](super::Outcome::Need)).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Observations {
    /// The current revision of the target workload: a hash of its pod template (Flagger's
    /// `lastAppliedSpec` value). A change starts a new analysis.
    pub revision: String,
    /// Whether the primary workload has rolled out and is available. It must reflect the last
    /// promoted template: report NotReady while a promotion is still rolling out.
    pub primary: Readiness,
    /// Whether the target (canary) workload has rolled out and is available; while the Canary
    /// is being deleted with `revertOnDeletion`, whether the restored target is.
    pub canary: Readiness,
    /// Measurements for the metrics a step asked for; `None` until then.
    pub measurements: Option<Vec<Measurement>>,
    /// Results of the webhooks a step asked for, by webhook name. Keep earlier results when
    /// answering a later request of the same step.
    pub webhooks: BTreeMap<String, WebhookResult>,
    /// The current retry request, if any: an opaque token (e.g. the value of the
    /// `weir.dev/retry` annotation, or a CLI-generated nonce). A Failed canary is retried once per
    /// distinct token; the last token seen is stored in the status.
    pub retry: Option<String>,
    /// The current operator request, if any (`weir promote`, `abort`, `pause`, `resume`): the
    /// `weir.dev/request` annotation in Kubernetes, the state folder's `request` file locally.
    /// Each distinct token is handled once, at the first call that sees it (not only once per
    /// interval); the last token seen is stored in the status.
    pub request: Option<OperatorRequest>,
    /// The Canary is being deleted.
    pub deleting: bool,
    /// Before the first step only: the revision the primary workload already runs, if it
    /// exists (a Canary deleted without `revertOnDeletion` and applied again leaves it). The
    /// primary is then kept as it is, and a target that differs is analysed as a new revision
    /// instead of being copied to the primary unanalysed.
    pub primary_revision: Option<String>,
}

impl Observations {
    /// Observations for a target at `revision`, with both workloads ready and nothing else to
    /// report.
    pub fn new(revision: impl Into<String>) -> Self {
        Observations {
            revision: revision.into(),
            ..Observations::default()
        }
    }
}

/// Whether a workload has finished rolling out.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Readiness {
    /// Rolled out and available.
    #[default]
    Ready,
    /// Not (yet) available, and why, as Flagger's readiness check says it (the engine prefixes
    /// the workload: `canary deployment mhs.application not ready: <reason>`), e.g.
    /// `waiting for rollout to finish: 0 of 1 (readyThreshold 100%) updated replicas are
    /// available` or `process not listening on 127.0.0.1:8081`.
    NotReady(String),
}

/// The outcome of one webhook call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WebhookResult {
    /// The hook answered 2xx: approved, passed, or (for `rollback` hooks) "roll back now".
    Passed,
    /// The hook answered otherwise or could not be reached; the reason goes into the message.
    Failed(String),
}

/// What an operator can ask of a running analysis. Retry has its own token
/// ([`Observations::retry`]), as it did before these verbs existed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Verb {
    /// Skip the rest of the analysis and promote now.
    Promote,
    /// Roll back now.
    Abort,
    /// Hold the weight; keep measuring.
    Pause,
    /// Continue a paused analysis.
    Resume,
}

impl Verb {
    /// Every verb.
    pub const ALL: [Verb; 4] = [Verb::Promote, Verb::Abort, Verb::Pause, Verb::Resume];

    /// The CLI's spelling, like `promote`.
    pub fn as_str(self) -> &'static str {
        match self {
            Verb::Promote => "promote",
            Verb::Abort => "abort",
            Verb::Pause => "pause",
            Verb::Resume => "resume",
        }
    }

    /// Parses the CLI's spelling.
    pub fn parse(text: &str) -> Option<Verb> {
        Verb::ALL.into_iter().find(|v| v.as_str() == text)
    }
}

impl std::fmt::Display for Verb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One operator request: what, who asked, and a token that makes it distinct.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OperatorRequest {
    /// What is asked.
    pub verb: Verb,
    /// Unique per request (the CLI writes the time in nanoseconds); the same token is never
    /// handled twice.
    pub token: String,
    /// Who asked: the CLI's user in local mode, the annotation's field manager in Kubernetes.
    pub by: String,
}

impl OperatorRequest {
    /// The request as an annotation value: `<verb> <token>`, e.g. `promote 1765000000000000000`.
    pub fn annotation_value(&self) -> String {
        format!("{} {}", self.verb, self.token)
    }

    /// Reads an annotation value written by [`OperatorRequest::annotation_value`] (or by hand:
    /// `kubectl annotate canary/podinfo weir.dev/request="abort $(date +%s)"`).
    pub fn parse_annotation(value: &str, by: &str) -> Result<OperatorRequest, String> {
        let mut words = value.split_whitespace();
        let (Some(verb), Some(token), None) = (words.next(), words.next(), words.next()) else {
            return Err(format!(
                "`{value}` is not a request: write `<verb> <token>`, e.g. `promote 1`, with a new token each time"
            ));
        };
        let verb = Verb::parse(verb).ok_or_else(|| {
            format!(
                "`{verb}` is not a request verb: use one of {}",
                Verb::ALL.map(Verb::as_str).join(", ")
            )
        })?;
        Ok(OperatorRequest {
            verb,
            token: token.to_owned(),
            by: by.to_owned(),
        })
    }
}
