//! A proxy-wasm HTTP filter that does nothing: a root context that creates HTTP contexts, and HTTP
//! contexts that let every callback continue. Loaded into Envoy it measures what any Wasm filter
//! costs per request (the VM calls into the module for each callback), the floor the Weir filter
//! is compared with in `cargo xtask bench filter`.

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::ContextType;

/// The root context: one per VM; it only hands out HTTP contexts.
struct EmptyRoot;

impl Context for EmptyRoot {}

impl RootContext for EmptyRoot {
    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(EmptyHttp))
    }
}

/// One request; every callback keeps the SDK's default (continue, no host call).
struct EmptyHttp;

impl Context for EmptyHttp {}

impl HttpContext for EmptyHttp {}

/// The proxy-wasm entry point.
mod entry {
    // `main!` expands to the module's `#[no_mangle]` initialiser: the one unsafe-flagged item.
    #![allow(unsafe_code)]
    proxy_wasm::main! {{
        proxy_wasm::set_root_context(|_context_id| Box::new(super::EmptyRoot));
    }}
}
