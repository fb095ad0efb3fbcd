//! The operator's command line, the same verbs in both modes: `weir status`, `weir watch`,
//! `weir promote`, `abort`, `pause`, `resume` and `retry`.
//!
//! Every verb is a request the running controller picks up and the engine decides on
//! ([`analysis::request_fit`] says whether it makes sense, for the CLI and the engine alike):
//! locally through the state folder's `request` file ([`local`]), in a cluster as the
//! `weir.dev/request` annotation on the Canary ([`kubernetes`]). The CLI refuses a request that
//! makes no sense before sending it, says "nothing to do" for one that changes nothing, and
//! otherwise waits until the controller has handled it and prints what it did.
//!
//! [`render`] draws the same [`CanaryView`] for both modes.

pub mod kubernetes;
pub mod local;
pub mod render;

use std::time::Duration;

use crate::analysis::{self, OperatorRequest, RequestFit, Verb};
use crate::live::LiveSnapshot;
use crate::local::RecordedEvent;
use crate::spec::{CanaryStatus, Decision, Timestamp};

/// Everything the CLI shows of one canary.
#[derive(Debug, Clone, PartialEq)]
pub struct CanaryView {
    /// The Canary's namespace.
    pub namespace: String,
    /// The Canary's name.
    pub name: String,
    /// Its status (the engine's, as persisted).
    pub status: CanaryStatus,
    /// Its most recent events, oldest first.
    pub events: Vec<RecordedEvent>,
    /// The controller's live numbers, when it could be asked.
    pub live: Option<LiveSnapshot>,
    /// When the next step is due, when known.
    pub next_step_at: Option<Timestamp>,
}

impl CanaryView {
    /// The last decision the engine recorded.
    pub fn last_decision(&self) -> Option<&Decision> {
        self.status.decisions.last()
    }
}

/// Why a verb did nothing, or could not be asked.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The request makes no sense for the canary as it is: nothing was sent.
    #[error("{verb} {canary}: {why}; nothing was requested")]
    NotNow {
        /// The verb.
        verb: Verb,
        /// `namespace/name`.
        canary: String,
        /// Why, and what to do instead.
        why: String,
    },
    /// An earlier request has not been picked up yet; sending another would replace it.
    #[error("{canary}: the {verb} request by {by} (token {token}) has not been picked up by the controller yet; wait for it (weir watch {name}), then ask again")]
    Pending {
        /// `namespace/name`.
        canary: String,
        /// The canary's name.
        name: String,
        /// The earlier request's verb.
        verb: Verb,
        /// Who sent it.
        by: String,
        /// Its token.
        token: String,
    },
    /// The controller did not handle the request within the wait; it stays in place.
    #[error("{canary}: {verb} requested (token {token}), but the controller has not handled it within {waited}; it stays requested and is handled when the controller next steps (is the controller running?)")]
    NotHandled {
        /// The verb.
        verb: Verb,
        /// `namespace/name`.
        canary: String,
        /// The request's token.
        token: String,
        /// How long the CLI waited.
        waited: String,
    },
    /// The engine ignored the request when it handled it (the canary moved on meanwhile).
    #[error("{0}")]
    Ignored(String),
    /// Reading or writing failed; what, and how to fix it.
    #[error("{0}")]
    Io(String),
}

/// The outcome of a verb that was asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Asked {
    /// The canary was already where the verb would take it; nothing was sent.
    NothingToDo(String),
    /// The controller handled it: the events it recorded for it.
    Done(Vec<String>),
}

/// Who runs the CLI: `$USER`, else `$LOGNAME`, else `unknown user`.
pub fn current_user() -> String {
    ["USER", "LOGNAME"]
        .iter()
        .find_map(|v| std::env::var(v).ok().filter(|u| !u.is_empty()))
        .unwrap_or_else(|| "unknown user".to_owned())
}

/// A new request token: the time in nanoseconds (unique per request from one machine, and
/// readable in an annotation).
pub fn new_token() -> String {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
        .to_string()
}

/// What the CLI does before sending: the engine's own judgement of the request, and whether an
/// earlier request still waits.
pub fn check_before_sending(
    canary: &str,
    name: &str,
    status: &CanaryStatus,
    verb: Verb,
    pending: Option<&OperatorRequest>,
) -> Result<Option<String>, CliError> {
    if let Some(earlier) = pending.filter(|r| status.last_request.as_ref() != Some(&r.token)) {
        return Err(CliError::Pending {
            canary: canary.to_owned(),
            name: name.to_owned(),
            verb: earlier.verb,
            by: earlier.by.clone(),
            token: earlier.token.clone(),
        });
    }
    match analysis::request_fit(status, verb) {
        RequestFit::Acts => Ok(None),
        RequestFit::Already(why) => Ok(Some(why)),
        RequestFit::Refused(why) => Err(CliError::NotNow {
            verb,
            canary: canary.to_owned(),
            why,
        }),
    }
}

/// The events of the decision that handled `token`, once the status says it was: `Ok(None)`
/// while not yet, an error when the engine ignored it. `after` is the time of the newest
/// decision before the request was sent (both are the controller's clock).
pub fn handled(
    status: &CanaryStatus,
    token: &str,
    after: Option<Timestamp>,
) -> Result<Option<Vec<String>>, CliError> {
    if status.last_request.as_deref() != Some(token) {
        return Ok(None);
    }
    let is_request = |e: &analysis::Event| {
        e.message.contains(" requested by ") || e.message.contains(" request by ")
    };
    let Some(decision) = status
        .decisions
        .iter()
        .filter(|d| after.is_none_or(|t| d.time > t))
        .find(|d| d.events.iter().any(is_request))
    else {
        return Ok(Some(Vec::new()));
    };
    if let Some(refused) = decision
        .events
        .iter()
        .find(|e| is_request(e) && e.reason == "RequestRefused")
    {
        return Err(CliError::Ignored(refused.message.clone()));
    }
    Ok(Some(
        decision.events.iter().map(|e| e.message.clone()).collect(),
    ))
}

/// How long the verbs wait for the controller by default.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(30);
