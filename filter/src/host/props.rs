//! Host reads and writes, each absorbing errors into `None` or a log line.

use std::time::UNIX_EPOCH;

use proxy_wasm::hostcalls;
use proxy_wasm::types::{LogLevel, MapType};

use crate::routing::RequestHeaders;

/// Logs a line; a failing logger is ignored. Envoy already prefixes the plugin name and vm id.
pub fn log(level: LogLevel, message: &str) {
    let _ = hostcalls::log(level, message.strip_prefix("weir: ").unwrap_or(message));
}

/// Now, in nanoseconds since the Unix epoch (0 if the host can't say).
pub fn now_ns() -> u64 {
    hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos() as u64)
}

/// A string property such as `["node", "id"]`.
pub fn string(path: Vec<&str>) -> Option<String> {
    let bytes = hostcalls::get_property(path).ok().flatten()?;
    String::from_utf8(bytes).ok().filter(|s| !s.is_empty())
}

/// An integer property (8 bytes, little-endian), such as `["response", "code"]`.
pub fn integer(path: Vec<&str>) -> Option<u64> {
    let bytes = hostcalls::get_property(path).ok().flatten()?;
    let array: [u8; 8] = bytes.get(..8)?.try_into().ok()?;
    Some(u64::from_le_bytes(array))
}

/// The request headers of the current HTTP context.
pub struct HostRequestHeaders;

impl RequestHeaders for HostRequestHeaders {
    fn header(&self, name: &str) -> Option<String> {
        hostcalls::get_map_value(MapType::HttpRequestHeaders, name)
            .ok()
            .flatten()
    }
}
