//! Calling Flagger-style webhooks: an HTTP POST of the canary's name, namespace, phase and the
//! hook's metadata; any 2xx answer passes.

use std::time::Duration;

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::analysis::{WebhookCall, WebhookResult};
use crate::spec::CanaryPlan;

/// Calls one webhook, with its retries, and says how it went.
pub async fn call(plan: &CanaryPlan, call: &WebhookCall) -> WebhookResult {
    let hook = &call.webhook;
    // Flagger's CanaryWebhookPayload.
    let payload = json!({
        "name": plan.name,
        "namespace": plan.namespace,
        "phase": format!("{:?}", call.phase),
        "metadata": hook.metadata,
    })
    .to_string();
    let mut last = String::new();
    for _ in 0..=hook.retries {
        match post(&hook.url, &payload, hook.timeout).await {
            Ok(status) if (200..300).contains(&status) => return WebhookResult::Passed,
            Ok(status) => last = format!("{} answered {status}", hook.url),
            Err(e) => last = format!("{}: {e}", hook.url),
        }
    }
    WebhookResult::Failed(last)
}

/// POSTs `body` as JSON and returns the status code.
async fn post(url: &str, body: &str, timeout: Duration) -> Result<u16, String> {
    let rest = url.strip_prefix("http://").ok_or_else(|| {
        "only http:// webhooks are supported yet (https is not); call it through a plain-HTTP service".to_owned()
    })?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let address = if authority.contains(':') {
        authority.to_owned()
    } else {
        format!("{authority}:80")
    };
    let exchange = async {
        let mut stream = TcpStream::connect(&address)
            .await
            .map_err(|e| format!("cannot connect to {address} ({e})"))?;
        let request = format!(
            "POST {path} HTTP/1.1\r\nHost: {authority}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut head = [0u8; 12];
        stream
            .read_exact(&mut head)
            .await
            .map_err(|e| format!("no HTTP answer ({e})"))?;
        std::str::from_utf8(&head[9..12])
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("not an HTTP answer: {:?}", String::from_utf8_lossy(&head)))
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {timeout:?}")))
}
