//! Calling Flagger-style webhooks: an HTTP(S) POST of Flagger's `CanaryWebhookPayload` (the
//! canary's name, namespace, phase, checksum and the hook's metadata) through the shared
//! [`crate::http`] client; any 2xx answer passes.

use std::collections::BTreeMap;

use serde_json::json;

use crate::analysis::{Event, Severity, WebhookCall, WebhookResult};
use crate::http::HttpClient;
use crate::spec::{CanaryPlan, Phase, Webhook};

/// Flagger's payload checksum: it changes when the revision under analysis changes (Flagger
/// hashes the status' `lastAppliedSpec` and `trackedConfigs`; Weir's revision already covers the
/// ConfigMaps and Secrets the target uses). A receiver uses it to tell one rollout from the next.
/// Written as Flagger writes its hashes: FNV-1a 32 as decimal digits, each mapped to Kubernetes'
/// "safe" alphabet (no vowels, so no words).
pub fn checksum(revision: &str) -> String {
    const SAFE: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut hash: u32 = 0x811c_9dc5;
    for byte in revision.bytes() {
        hash ^= u32::from(byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    hash.to_string()
        .bytes()
        .map(|b| char::from(SAFE[usize::from(b) % SAFE.len()]))
        .collect()
}

/// Flagger's `CanaryWebhookPayload` for a gate, rollout or post-rollout hook.
pub fn payload(
    plan: &CanaryPlan,
    phase: Phase,
    checksum: &str,
    hook: &Webhook,
) -> serde_json::Value {
    json!({
        "name": plan.name,
        "namespace": plan.namespace,
        "phase": phase.as_str(),
        "checksum": checksum,
        "metadata": hook.metadata,
    })
}

/// Flagger's payload for a `type: event` hook: the event in `metadata` (`eventMessage`,
/// `eventType`, `timestamp` in Unix milliseconds), then the hook's own metadata for keys not
/// taken.
pub fn event_payload(
    plan: &CanaryPlan,
    phase: Option<Phase>,
    checksum: &str,
    hook: &Webhook,
    event: &Event,
    unix_millis: u128,
) -> serde_json::Value {
    let mut metadata: BTreeMap<String, String> = BTreeMap::from([
        ("eventMessage".to_owned(), event.message.clone()),
        (
            "eventType".to_owned(),
            match event.severity {
                Severity::Normal => "Normal",
                Severity::Warning => "Warning",
            }
            .to_owned(),
        ),
        ("timestamp".to_owned(), unix_millis.to_string()),
    ]);
    for (key, value) in &hook.metadata {
        metadata.entry(key.clone()).or_insert_with(|| value.clone());
    }
    json!({
        "name": plan.name,
        "namespace": plan.namespace,
        // Flagger sends the status' phase, empty before the first one.
        "phase": phase.map_or("", Phase::as_str),
        "checksum": checksum,
        "metadata": metadata,
    })
}

/// POSTs `body` to `hook`, with its retries and timeout, and says how it went.
pub async fn post(http: &HttpClient, hook: &Webhook, body: &serde_json::Value) -> WebhookResult {
    let mut last = String::new();
    for _ in 0..=hook.retries {
        match http
            .post_json(&hook.url, body, hook.timeout, hook.disable_tls)
            .await
        {
            Ok(answer) if (200..300).contains(&answer.status) => return WebhookResult::Passed,
            Ok(answer) => {
                let body = answer.snippet();
                last = if body.is_empty() {
                    format!("{} answered {}", hook.url, answer.status)
                } else {
                    format!("{} answered {}: {body}", hook.url, answer.status)
                }
            }
            Err(e) => last = format!("{}: {e}", hook.url),
        }
    }
    WebhookResult::Failed(last)
}

/// Calls one gate, rollout or post-rollout webhook through the shared client.
pub async fn call(plan: &CanaryPlan, checksum: &str, call: &WebhookCall) -> WebhookResult {
    let body = payload(plan, call.phase, checksum, &call.webhook);
    post(crate::http::shared(), &call.webhook, &body).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_checksum_is_stable_per_revision_and_in_the_safe_alphabet() {
        let a = checksum("7f9c2d");
        assert_eq!(a, checksum("7f9c2d"));
        assert_ne!(a, checksum("7f9c2e"));
        assert!(
            a.bytes()
                .all(|b| b"bcdfghjklmnpqrstvwxz2456789".contains(&b)),
            "{a}"
        );
        // FNV-1a 32 of "" is its offset basis, 2166136261: its digits through the alphabet.
        assert_eq!(checksum(""), "65bb57b6b5");
    }
}
