//! The verbs against a cluster: read the Canary (its status holds the decisions and their
//! events), the live numbers from the controller through the API server's service proxy, and
//! send requests as the `weir.dev/request` annotation (`weir retry`: `weir.dev/retry`),
//! written with the field manager `weir-cli:<user>` so the controller can say who asked. The
//! patch carries the Canary's resourceVersion: a request sent meanwhile by someone else is
//! never overwritten unseen (the API server answers 409 and the CLI says so).

use std::time::{Duration, Instant};

use kube::api::{ListParams, Patch, PatchParams};
use kube::{Api, Client};

use super::{check_before_sending, handled, new_token, Asked, CanaryView, CliError};
use crate::analysis::{self, OperatorRequest, Verb};
use crate::live::LiveSnapshot;
use crate::local::RecordedEvent;
use crate::platform::kubernetes::crd::CanaryResource;
use crate::spec::{Phase, REQUEST_ANNOTATION, RETRY_ANNOTATION};

/// Where the leading controller's HTTP port is, for the live numbers (the install's
/// `weir-leader` Service: only the leader holds them; the `weir` Service selects every replica).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControllerService {
    /// Its namespace.
    pub namespace: String,
    /// The Service's name.
    pub name: String,
    /// The port's name.
    pub port: String,
}

impl Default for ControllerService {
    fn default() -> Self {
        Self {
            namespace: "weir-system".to_owned(),
            name: "weir-leader".to_owned(),
            port: "http-metrics".to_owned(),
        }
    }
}

/// The field manager the CLI writes requests with: who asked, as the controller reads it.
pub fn field_manager(user: &str) -> String {
    // Kubernetes allows 128 printable characters.
    let user: String = user.chars().filter(|c| !c.is_control()).take(100).collect();
    format!("weir-cli:{user}")
}

fn api_error(what: &str, e: kube::Error) -> CliError {
    let hint = match &e {
        kube::Error::Api(s) if s.code == 404 => ": no such Canary (check the name and -n)",
        kube::Error::Api(s) if s.code == 403 => {
            ": not allowed (the CLI needs get/list/patch on canaries.weir.dev)"
        }
        _ => "",
    };
    CliError::Io(format!("{what}: {e}{hint}"))
}

fn view_of(canary: CanaryResource, live: Option<LiveSnapshot>) -> CanaryView {
    let namespace = canary.metadata.namespace.clone().unwrap_or_default();
    let name = canary.metadata.name.clone().unwrap_or_default();
    let status = canary.status.clone().unwrap_or_default();
    let next_step_at = canary
        .to_spec_canary()
        .compile()
        .ok()
        .map(|c| analysis::next_step_at(&c.plan, &status));
    // The decision history holds every event the engine made, with its time.
    let events = status
        .decisions
        .iter()
        .flat_map(|d| {
            d.events.iter().map(|e| RecordedEvent {
                time: d.time,
                event: e.clone(),
            })
        })
        .collect();
    CanaryView {
        namespace,
        name,
        status,
        events,
        live,
        next_step_at,
    }
}

/// The live numbers the controller serves for a canary; `None` when it cannot be reached.
async fn live(
    client: &Client,
    service: &ControllerService,
    namespace: &str,
    name: &str,
) -> Option<LiveSnapshot> {
    let path = format!(
        "/api/v1/namespaces/{}/services/{}:{}/proxy/live/{namespace}/{name}",
        service.namespace, service.name, service.port
    );
    let request = http::Request::get(path).body(Vec::new()).ok()?;
    let text = tokio::time::timeout(Duration::from_secs(3), client.request_text(request))
        .await
        .ok()?
        .ok()?;
    serde_json::from_str(&text).ok()
}

/// One Canary.
pub async fn view(
    client: &Client,
    service: &ControllerService,
    namespace: &str,
    name: &str,
) -> Result<CanaryView, CliError> {
    let api: Api<CanaryResource> = Api::namespaced(client.clone(), namespace);
    let canary = api
        .get(name)
        .await
        .map_err(|e| api_error(&format!("reading canary {namespace}/{name}"), e))?;
    let live = live(client, service, namespace, name).await;
    Ok(view_of(canary, live))
}

/// Every Canary of a namespace.
pub async fn list(
    client: &Client,
    service: &ControllerService,
    namespace: &str,
) -> Result<Vec<CanaryView>, CliError> {
    let api: Api<CanaryResource> = Api::namespaced(client.clone(), namespace);
    let canaries = api
        .list(&ListParams::default())
        .await
        .map_err(|e| api_error(&format!("listing canaries in {namespace}"), e))?;
    let mut views = Vec::new();
    for canary in canaries {
        let name = canary.metadata.name.clone().unwrap_or_default();
        let live = live(client, service, namespace, &name).await;
        views.push(view_of(canary, live));
    }
    Ok(views)
}

/// Sets `annotation` to `value` on the Canary as it was read (its resourceVersion).
async fn annotate(
    api: &Api<CanaryResource>,
    canary: &CanaryResource,
    annotation: &str,
    value: &str,
    user: &str,
) -> Result<(), CliError> {
    let name = canary.metadata.name.clone().unwrap_or_default();
    let patch = serde_json::json!({
        "metadata": {
            "resourceVersion": canary.metadata.resource_version,
            "annotations": {annotation: value},
        }
    });
    let params = PatchParams {
        field_manager: Some(field_manager(user)),
        ..PatchParams::default()
    };
    match api.patch(&name, &params, &Patch::Merge(&patch)).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 409 => Err(CliError::Io(format!(
            "canary {name} changed while the request was sent (someone else may have sent one): nothing was requested; look at it again (weir status {name}) and ask again"
        ))),
        Err(e) => Err(api_error(&format!("annotating canary {name}"), e)),
    }
}

/// Sends `verb` as `user` and waits up to `wait` for the controller to handle it.
pub async fn ask(
    client: &Client,
    namespace: &str,
    name: &str,
    verb: Verb,
    user: &str,
    wait: Duration,
) -> Result<Asked, CliError> {
    let api: Api<CanaryResource> = Api::namespaced(client.clone(), namespace);
    let canary = api
        .get(name)
        .await
        .map_err(|e| api_error(&format!("reading canary {namespace}/{name}"), e))?;
    let status = canary.status.clone().unwrap_or_default();
    let pending = canary.operator_request();
    let id = format!("{namespace}/{name}");
    if let Some(why) = check_before_sending(&id, name, &status, verb, pending.as_ref())? {
        return Ok(Asked::NothingToDo(why));
    }
    let request = OperatorRequest {
        verb,
        token: new_token(),
        by: user.to_owned(),
    };
    annotate(
        &api,
        &canary,
        REQUEST_ANNOTATION,
        &request.annotation_value(),
        user,
    )
    .await?;
    let after = status.decisions.last().map(|d| d.time);
    let started = Instant::now();
    loop {
        let now = api
            .get(name)
            .await
            .map_err(|e| api_error(&format!("reading canary {id}"), e))?;
        if let Some(events) = handled(&now.status.unwrap_or_default(), &request.token, after)? {
            return Ok(Asked::Done(events));
        }
        if started.elapsed() >= wait {
            return Err(CliError::NotHandled {
                verb,
                canary: id,
                token: request.token,
                waited: crate::spec::format_go_duration(wait),
            });
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// `weir retry` against a cluster: a new `weir.dev/retry` token on a Failed Canary.
pub async fn retry(
    client: &Client,
    namespace: &str,
    name: &str,
    user: &str,
) -> Result<String, CliError> {
    let api: Api<CanaryResource> = Api::namespaced(client.clone(), namespace);
    let canary = api
        .get(name)
        .await
        .map_err(|e| api_error(&format!("reading canary {namespace}/{name}"), e))?;
    let phase = canary.status.as_ref().and_then(|s| s.phase);
    if phase != Some(Phase::Failed) {
        let state = phase.map_or_else(|| "not initialized yet".to_owned(), |p| p.to_string());
        return Err(CliError::Io(format!(
            "retry {namespace}/{name}: only a Failed canary can be retried, this one is {state}; nothing was requested"
        )));
    }
    let token = new_token();
    annotate(&api, &canary, RETRY_ANNOTATION, &token, user).await?;
    Ok(token)
}
