//! Microsoft Teams' MessageCard shape (Flagger's `MSTeamsPayload`): blue, red for errors, the
//! message as the activity title and the details as facts.

use serde_json::json;

use super::Message;
use crate::spec::AlertSeverity;

/// The body for `message`.
pub fn payload(message: &Message) -> serde_json::Value {
    let id = format!("{}.{}", message.name, message.namespace);
    let facts: Vec<serde_json::Value> = message
        .fields
        .iter()
        .map(|f| json!({"name": f.name, "value": f.value}))
        .collect();
    json!({
        "@type": "MessageCard",
        "@context": "http://schema.org/extensions",
        "themeColor": if message.severity == AlertSeverity::Error { "FF0000" } else { "0076D7" },
        "summary": id,
        "sections": [{
            "activityTitle": message.text,
            "activitySubtitle": id,
            "facts": facts,
        }],
    })
}
