//! The host glue, compiled for wasm32 only: the one place that calls proxy-wasm. Callbacks ask the
//! host-agnostic modules for a decision and turn it into host calls; every host call goes through
//! the `Result`-returning `hostcalls` functions, and every error is logged and absorbed, so a host
//! surprise never takes traffic down.

mod http;
mod props;
mod root;

/// The proxy-wasm entry point.
mod entry {
    // `main!` expands to the module's `#[no_mangle]` initialiser: the one unsafe-flagged item.
    #![allow(unsafe_code)]
    proxy_wasm::main! {{
        proxy_wasm::set_log_level(proxy_wasm::types::LogLevel::Info);
        proxy_wasm::set_root_context(|context_id| Box::new(super::root::Root::new(context_id)));
    }}
}
