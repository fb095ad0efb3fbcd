//! Slack's incoming-webhook shape (Flagger's `SlackPayload`): one attachment, green (`good`)
//! or red (`danger` for errors), the Canary as its author, the details as fields. Discord's
//! Slack-compatible endpoint gets the same.

use serde_json::json;

use super::Message;
use crate::spec::{AlertSeverity, ResolvedProvider};

/// The body for `message`.
pub fn payload(provider: &ResolvedProvider, message: &Message) -> serde_json::Value {
    let color = if message.severity == AlertSeverity::Error {
        "danger"
    } else {
        "good"
    };
    let fields: Vec<serde_json::Value> = message
        .fields
        .iter()
        .map(|f| json!({"title": f.name, "value": f.value, "short": false}))
        .collect();
    json!({
        "channel": provider.channel,
        "username": provider.username,
        "icon_url": "",
        "icon_emoji": ":rocket:",
        "attachments": [{
            "color": color,
            "author_name": format!("{}.{}", message.name, message.namespace),
            "text": message.text,
            "mrkdwn_in": ["text"],
            "fields": fields,
        }],
    })
}
