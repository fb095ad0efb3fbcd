//! Weir's generic JSON webhook (Flagger has none): the alert's parts as plain fields, for a
//! receiver of your own (a relay to another chat, a pager, a log).
//!
//! ```json
//! {"name": "mhs", "namespace": "application", "severity": "error",
//!  "message": "Failed checks threshold reached 3", "fields": [{"name": "...", "value": "..."}]}
//! ```

use serde_json::json;

use super::Message;

/// The body for `message`.
pub fn payload(message: &Message) -> serde_json::Value {
    let fields: Vec<serde_json::Value> = message
        .fields
        .iter()
        .map(|f| json!({"name": f.name, "value": f.value}))
        .collect();
    json!({
        "name": message.name,
        "namespace": message.namespace,
        "severity": message.severity.as_str(),
        "message": message.text,
        "fields": fields,
    })
}
