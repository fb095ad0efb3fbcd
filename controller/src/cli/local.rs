//! The verbs in local mode: read the state folder (`status.json`, `events.jsonl`, `live.json`),
//! and send requests through its `request` file, which the `weir local` running on the folder
//! reads at its next tick (at most 250ms later, between two steps; a step under way finishes
//! first).

use std::path::Path;
use std::time::{Duration, Instant};

use super::{check_before_sending, handled, new_token, Asked, CanaryView, CliError};
use crate::analysis::{OperatorRequest, Verb};
use crate::live::{LiveSnapshot, LIVE_FILE};
use crate::platform::local::guard::running_controller;

/// How many recent events a view keeps.
const EVENTS_SHOWN: usize = 50;

/// The canary of the state folder `state`; `name`, when given, must be its name.
pub fn view(state: &Path, name: Option<&str>) -> Result<CanaryView, CliError> {
    let status = crate::local::read_status(state)
        .map_err(CliError::Io)?
        .ok_or_else(|| {
            CliError::Io(format!(
                "{} holds no canary status ({} is missing): pass the --state folder of a weir local that ran",
                state.display(),
                state.join("status.json").display()
            ))
        })?;
    let live: Option<LiveSnapshot> = std::fs::read_to_string(state.join(LIVE_FILE))
        .ok()
        .and_then(|text| serde_json::from_str(&text).ok());
    let running = running_controller(state).is_some();
    let (namespace, canary) = match &live {
        Some(live) => (live.namespace.clone(), live.name.clone()),
        None => (
            "-".to_owned(),
            state
                .file_name()
                .map_or_else(|| "canary".to_owned(), |n| n.to_string_lossy().into_owned()),
        ),
    };
    if let Some(wanted) = name.filter(|n| *n != canary) {
        return Err(CliError::Io(format!(
            "the state folder {} holds the canary {canary}, not {wanted}: pass the --state folder of {wanted}'s weir local",
            state.display()
        )));
    }
    let mut events = crate::local::read_events(state);
    let excess = events.len().saturating_sub(EVENTS_SHOWN);
    events.drain(..excess);
    Ok(CanaryView {
        namespace,
        name: canary,
        next_step_at: live.as_ref().filter(|_| running).map(|l| l.next_step_at),
        // Numbers from a controller that stopped are not live.
        live: live.filter(|_| running),
        status,
        events,
    })
}

/// Sends `verb` as `by` to the `weir local` running on `state`, and waits up to `wait` for it
/// to be handled.
pub async fn ask(
    state: &Path,
    name: Option<&str>,
    verb: Verb,
    by: &str,
    wait: Duration,
) -> Result<Asked, CliError> {
    let before = view(state, name)?;
    let canary = format!("{}/{}", before.namespace, before.name);
    let pending = crate::local::read_request(state).map_err(CliError::Io)?;
    if let Some(why) = check_before_sending(
        &canary,
        &before.name,
        &before.status,
        verb,
        pending.as_ref(),
    )? {
        return Ok(Asked::NothingToDo(why));
    }
    if running_controller(state).is_none() {
        return Err(CliError::Io(format!(
            "no weir local runs on {}: nothing was requested. Start it on that folder (weir local ... --state {}), then ask again",
            state.display(),
            state.display()
        )));
    }
    let request = OperatorRequest {
        verb,
        token: new_token(),
        by: by.to_owned(),
    };
    crate::local::write_request(state, &request).map_err(CliError::Io)?;
    let after = before.last_decision().map(|d| d.time);
    let started = Instant::now();
    loop {
        if let Some(status) = crate::local::read_status(state).map_err(CliError::Io)? {
            if let Some(events) = handled(&status, &request.token, after)? {
                return Ok(Asked::Done(events));
            }
        }
        if started.elapsed() >= wait {
            return Err(CliError::NotHandled {
                verb,
                canary,
                token: request.token,
                waited: crate::spec::format_go_duration(wait),
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
