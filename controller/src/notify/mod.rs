//! Alerts and event hooks, delivered in the background: the runner hands each alert (an
//! [`Alert`] effect) and each event to the [`Notifier`], which queues it (bounded, never waiting)
//! and returns; each receiver (an AlertProvider, an event hook's URL) has its own lane that sends
//! its messages in order through the shared HTTP client, retrying a failed send a bounded number
//! of times and logging what could not be delivered. An analysis step is never slowed down by a
//! receiver, and a receiver that is down delays only its own messages.
//!
//! - alerts go to the AlertProviders of `spec.analysis.alerts` whose severity they reach, in the
//!   provider's shape: [`slack`] (also Discord's Slack-compatible endpoint), [`msteams`],
//!   [`generic`];
//! - every event goes to the `type: event` webhooks with Flagger's payload
//!   ([`crate::webhook::event_payload`]).
//!
//! Where providers come from is a seam ([`ProviderSource`]): files beside the Canary in local
//! mode ([`files::DirProviders`]), the AlertProvider resources and their Secrets in Kubernetes.

pub mod files;
pub mod generic;
pub mod msteams;
pub mod slack;

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::mpsc;

use crate::analysis::{Alert, Event};
use crate::http::HttpClient;
use crate::spec::{
    AlertPlan, AlertProviderType, AlertSeverity, CanaryPlan, HookKind, Phase, ResolvedProvider,
    Strategy, Webhook,
};

/// How many deliveries may wait to be sorted into their receivers' lanes; beyond, new ones are
/// dropped (and counted, and logged).
pub const QUEUE: usize = 256;
/// How many deliveries may wait for one receiver (one AlertProvider, one event hook URL); beyond,
/// that receiver's new ones are dropped. Each receiver has its own lane, delivered in order, so
/// one that is slow or never answers delays only its own messages.
pub const LANE_QUEUE: usize = 64;
/// Attempts per alert (Flagger tries once; a chat service's brief hiccup should not lose one).
pub const ALERT_ATTEMPTS: u32 = 3;
/// How long one alert POST may take (Flagger's 5s).
pub const ALERT_TIMEOUT: Duration = Duration::from_secs(5);
/// The pause before the second attempt; doubled before each further one.
pub const FIRST_BACKOFF: Duration = Duration::from_millis(500);

/// A boxed future, so that [`ProviderSource`] can be a trait object.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Where AlertProviders are looked up, at send time (an edited provider or Secret is used from
/// the next alert on).
pub trait ProviderSource: Send + Sync + 'static {
    /// The provider `namespace/name`, ready to send to, or why it cannot be used.
    fn resolve<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
    ) -> BoxFuture<'a, Result<ResolvedProvider, String>>;
}

/// One line of an alert's details (Flagger's `notifier.Field`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field {
    /// The name.
    pub name: String,
    /// The value.
    pub value: String,
}

/// What every provider shape is made from (Flagger's `Post` arguments).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// The Canary's name.
    pub name: String,
    /// The Canary's namespace.
    pub namespace: String,
    /// The text.
    pub text: String,
    /// Details.
    pub fields: Vec<Field>,
    /// How serious.
    pub severity: AlertSeverity,
}

/// The JSON body a provider of `kind` receives for `message`.
pub fn body(provider: &ResolvedProvider, message: &Message) -> serde_json::Value {
    match provider.kind {
        AlertProviderType::Slack | AlertProviderType::Discord => slack::payload(provider, message),
        AlertProviderType::MsTeams => msteams::payload(message),
        AlertProviderType::Generic => generic::payload(message),
    }
}

/// Flagger's alert details: the target, the failed checks threshold, the progress deadline and
/// how traffic is routed.
pub fn details(plan: &CanaryPlan) -> Vec<Field> {
    let field = |name: &str, value: String| Field {
        name: name.to_owned(),
        value,
    };
    let mut fields = vec![
        field(
            "Target",
            format!(
                "{}/{}.{}",
                plan.target.kind, plan.target.name, plan.namespace
            ),
        ),
        field(
            "Failed checks threshold",
            plan.analysis.threshold.to_string(),
        ),
        field(
            "Progress deadline",
            format!("{}s", plan.progress_deadline.as_secs()),
        ),
    ];
    let routing = match &plan.analysis.strategy {
        Strategy::AbTesting { .. } => Some("A/B Testing".to_owned()),
        Strategy::BlueGreen { .. } => Some("Blue/Green".to_owned()),
        Strategy::Canary { steps } => {
            let weights: Vec<String> = steps
                .weights()
                .iter()
                .map(|w| w.percent().to_string())
                .collect();
            Some(format!(
                "Weight steps: {} max: {}",
                weights.join(","),
                steps.max().percent()
            ))
        }
    };
    if let Some(routing) = routing {
        fields.push(field("Traffic routing", routing));
    }
    fields
}

enum Job {
    Alert {
        canary: String,
        alert: AlertPlan,
        message: Message,
    },
    Event {
        canary: String,
        hook: Webhook,
        body: serde_json::Value,
    },
}

impl Job {
    fn canary(&self) -> &str {
        match self {
            Job::Alert { canary, .. } | Job::Event { canary, .. } => canary,
        }
    }

    /// What it is, for log lines.
    fn what(&self) -> String {
        match self {
            Job::Alert { alert, .. } => format!("alert {}", alert.name),
            Job::Event { hook, .. } => format!("event hook {}", hook.name),
        }
    }

    /// Who receives it: its lane.
    fn receiver(&self) -> String {
        match self {
            Job::Alert { alert, .. } => format!("AlertProvider {}", alert.provider_id()),
            Job::Event { hook, .. } => hook.url.clone(),
        }
    }
}

/// The handle the runners send through; cheap to clone.
#[derive(Clone)]
pub struct Notifier {
    queue: mpsc::Sender<Job>,
    dropped: Arc<AtomicU64>,
}

impl std::fmt::Debug for Notifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Notifier")
    }
}

impl Notifier {
    /// Starts the delivery task (on the current tokio runtime), looking providers up in
    /// `providers` and sending through `http`.
    pub fn start(providers: Arc<dyn ProviderSource>, http: HttpClient) -> Self {
        let (queue, mut jobs) = mpsc::channel::<Job>(QUEUE);
        let dropped = Arc::new(AtomicU64::new(0));
        let dropped_in_lanes = dropped.clone();
        tokio::spawn(async move {
            // One lane per receiver, made when its first message comes: as many as the
            // Canaries name, each holding at most LANE_QUEUE messages.
            let mut lanes: HashMap<String, mpsc::Sender<Job>> = HashMap::new();
            while let Some(job) = jobs.recv().await {
                let lane = lanes.entry(job.receiver()).or_insert_with(|| {
                    let (lane, mut waiting) = mpsc::channel::<Job>(LANE_QUEUE);
                    let (providers, http) = (providers.clone(), http.clone());
                    tokio::spawn(async move {
                        while let Some(job) = waiting.recv().await {
                            deliver(providers.as_ref(), &http, job).await;
                        }
                    });
                    lane
                });
                if let Err(
                    mpsc::error::TrySendError::Full(job) | mpsc::error::TrySendError::Closed(job),
                ) = lane.try_send(job)
                {
                    dropped_in_lanes.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(canary = %job.canary(), "{} dropped: {LANE_QUEUE} deliveries to {} are already waiting (it is slow or down)", job.what(), job.receiver());
                }
            }
        });
        Self { queue, dropped }
    }

    /// Deliveries dropped because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    fn enqueue(&self, job: Job) {
        if let Err(mpsc::error::TrySendError::Full(job) | mpsc::error::TrySendError::Closed(job)) =
            self.queue.try_send(job)
        {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(canary = %job.canary(), "{} dropped: {QUEUE} deliveries are already waiting (a receiver is slow or down)", job.what());
        }
    }

    /// Queues `alert` for each of the Canary's alerts whose severity it reaches.
    pub fn alert(&self, plan: &CanaryPlan, alert: &Alert) {
        let fields = if alert.details {
            details(plan)
        } else {
            Vec::new()
        };
        for configured in &plan.analysis.alerts {
            if !configured.severity.receives(alert.severity) {
                continue;
            }
            self.enqueue(Job::Alert {
                canary: plan.id(),
                alert: configured.clone(),
                message: Message {
                    name: plan.name.clone(),
                    namespace: plan.namespace.clone(),
                    text: alert.message.clone(),
                    fields: fields.clone(),
                    severity: alert.severity,
                },
            });
        }
    }

    /// Queues `event` for each of the Canary's `type: event` webhooks (Flagger's payload, with
    /// the status' phase and the checksum of the revision under analysis).
    pub fn event(&self, plan: &CanaryPlan, phase: Option<Phase>, checksum: &str, event: &Event) {
        let millis = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        for hook in plan.analysis.hooks(HookKind::Event) {
            self.enqueue(Job::Event {
                canary: plan.id(),
                hook: hook.clone(),
                body: crate::webhook::event_payload(plan, phase, checksum, hook, event, millis),
            });
        }
    }
}

async fn deliver(providers: &dyn ProviderSource, http: &HttpClient, job: Job) {
    match job {
        Job::Event { canary, hook, body } => {
            if let crate::analysis::WebhookResult::Failed(why) =
                crate::webhook::post(http, &hook, &body).await
            {
                tracing::warn!(%canary, hook = %hook.name, "event hook not delivered after {} attempts: {why}", hook.retries + 1);
            }
        }
        Job::Alert {
            canary,
            alert,
            message,
        } => {
            let provider = match providers
                .resolve(&alert.provider_namespace, &alert.provider_name)
                .await
            {
                Ok(p) => p,
                Err(why) => {
                    tracing::warn!(%canary, alert = %alert.name, "alert not sent: {why}");
                    return;
                }
            };
            let body = body(&provider, &message);
            let mut backoff = FIRST_BACKOFF;
            let mut last = String::new();
            for attempt in 1..=ALERT_ATTEMPTS {
                match send(http, &provider, &body).await {
                    Ok(()) => return,
                    Err(why) => last = why,
                }
                if attempt < ALERT_ATTEMPTS {
                    tokio::time::sleep(backoff).await;
                    backoff *= 2;
                }
            }
            tracing::warn!(%canary, alert = %alert.name, provider = %provider.id, "alert not delivered after {ALERT_ATTEMPTS} attempts: {last}");
        }
    }
}

async fn send(
    http: &HttpClient,
    provider: &ResolvedProvider,
    body: &serde_json::Value,
) -> Result<(), String> {
    let client = match &provider.proxy {
        Some(proxy) => http
            .through_proxy(proxy)
            .map_err(|e| format!("AlertProvider {}: {e}", provider.id))?,
        None => http.client(false).clone(),
    };
    let mut request = client
        .post(&provider.url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(body.to_string());
    if let Some(token) = &provider.token {
        request = request.bearer_auth(token);
    }
    // The URL is the webhook's secret: name the provider, never the address.
    match http.send(request, ALERT_TIMEOUT).await {
        Ok(answer) if (200..300).contains(&answer.status) => Ok(()),
        Ok(answer) => Err(format!(
            "AlertProvider {} answered {}: {}",
            provider.id,
            answer.status,
            answer.snippet()
        )),
        Err(e) => Err(format!("AlertProvider {}: {e}", provider.id)),
    }
}
