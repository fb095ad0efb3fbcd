//! Per-request glue: pick the version at request headers, record the outcome at log time.

use std::cell::RefCell;
use std::rc::Rc;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::{Action, MapType};

use super::props::{self, HostRequestHeaders};
use super::root::FilterState;
use crate::worker::{RequestPlan, Ticket};

/// One request.
pub struct Http {
    /// None in pass-through mode (no valid configuration).
    state: Option<Rc<RefCell<FilterState>>>,
    ticket: Option<Ticket>,
    grpc_status: Option<u32>,
    /// The session cookie to give or clear in the response.
    set_cookie: Option<Rc<str>>,
}

impl Http {
    /// A request context sharing its worker's state.
    pub fn new(state: Option<Rc<RefCell<FilterState>>>) -> Self {
        Self {
            state,
            ticket: None,
            grpc_status: None,
            set_cookie: None,
        }
    }

    fn read_grpc_status(&mut self, map: MapType) {
        let wanted = self
            .state
            .as_ref()
            .and_then(|s| s.try_borrow().ok())
            .is_some_and(|s| !s.worker.config().failure.grpc_statuses.is_empty());
        if wanted && self.ticket.is_some() && self.grpc_status.is_none() {
            self.grpc_status = hostcalls::get_map_value(map, "grpc-status")
                .ok()
                .flatten()
                .and_then(|s| s.trim().parse().ok());
        }
    }
}

impl Context for Http {}

impl HttpContext for Http {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        // Without a configuration, or with another instance acting, or with no canary routed,
        // the request passes untouched, with no host call at all.
        let Some(state) = &self.state else {
            return Action::Continue;
        };
        let Ok(mut state) = state.try_borrow_mut() else {
            return Action::Continue;
        };
        if !state.acting || state.worker.routes_nothing() {
            return Action::Continue;
        }
        let authority = hostcalls::get_map_value(MapType::HttpRequestHeaders, ":authority")
            .ok()
            .flatten();
        match state.worker.plan(authority.as_deref(), &HostRequestHeaders) {
            RequestPlan::PassThrough => {}
            RequestPlan::Route {
                header,
                value,
                ticket,
                set_cookie,
            } => {
                // Replacing the header also drops any value the client sent: no self-steering.
                if hostcalls::set_map_value(MapType::HttpRequestHeaders, header, Some(value))
                    .is_ok()
                {
                    self.ticket = Some(ticket);
                    self.set_cookie = set_cookie;
                } else {
                    let _ = hostcalls::remove_map_value(MapType::HttpRequestHeaders, header);
                }
            }
        }
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        if let Some(cookie) = self.set_cookie.take() {
            // Added beside the app's own cookies; a failure costs the session, not the request.
            let _ = hostcalls::add_map_value(MapType::HttpResponseHeaders, "set-cookie", &cookie);
        }
        self.read_grpc_status(MapType::HttpResponseHeaders);
        Action::Continue
    }

    fn on_http_response_trailers(&mut self, _num_trailers: usize) -> Action {
        self.read_grpc_status(MapType::HttpResponseTrailers);
        Action::Continue
    }

    fn on_log(&mut self) {
        let Some(ticket) = self.ticket.take() else {
            return;
        };
        let Some(Ok(mut state)) = self.state.as_ref().map(|s| s.try_borrow_mut()) else {
            return;
        };
        let status = props::integer(vec!["response", "code"]).unwrap_or(0);
        let duration_ns = props::integer(vec!["request", "duration"]).unwrap_or(0);
        state.worker.record(
            &ticket,
            u16::try_from(status).unwrap_or(0),
            self.grpc_status,
            duration_ns,
        );
        state.after_request();
    }
}
