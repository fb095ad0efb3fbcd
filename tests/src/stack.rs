//! One Envoy wired as the data-plane tests need it: two mirrors (v1 primary, v2 canary), the
//! test control plane, and optionally the Weir filter.

use std::time::Duration;

use anyhow::Context;
use serde_json::json;
use weir_controller::platform::local::envoy::{
    EnvoyBootstrap, EnvoyProcess, FilterInstall, WasmFilter,
};
use weir_proto::v1::{
    canary_route, header_rule, CanaryRoute, Directive, HeaderMatch, HeaderRule, MatchGroup, Sticky,
    Weighted,
};

use crate::binaries;
use crate::control_plane::ControlPlane;
use crate::load::LoadSpec;
use crate::upstream::Upstream;
use crate::workdir::WorkDir;

/// The service's host: what clients send as the authority and what directives cover.
pub const HOST: &str = "mhs.application";
/// The canary's key in directives and reports.
pub const CANARY: &str = "application/mhs";
/// The routing value that selects the canary: a secret, as the controller makes it (the routes
/// match only it; the directive tells the filter to set it).
pub const ROUTE_SECRET: &str = "canary-5d1f0c3a9e7b42c8a61f0e2d9b3c7a14";
/// The primary mirror's version.
pub const PRIMARY_VERSION: &str = "v1";
/// The canary mirror's version.
pub const CANARY_VERSION: &str = "v2";

/// The filter configuration the tests use unless they say otherwise: the documented one with
/// a 500 ms report interval, so final reports arrive quickly.
pub fn filter_config() -> serde_json::Value {
    json!({
        "reportInterval": "500ms",
        "directiveGracePeriod": "10s",
        "routingHeader": "x-weir-route",
        "failure": {"statusCodes": ["5xx"], "grpcStatuses": []},
    })
}

/// How to build a [`Stack`].
#[derive(Debug, Clone)]
pub struct StackOptions {
    /// Envoy worker threads.
    pub concurrency: u32,
    /// Extra flags for the primary mirror (v1).
    pub primary_args: Vec<String>,
    /// Extra flags for the canary mirror (v2).
    pub canary_args: Vec<String>,
    /// The filter's configuration as raw text (None: no filter at all). Raw, so tests can
    /// hand it something invalid.
    pub filter_config: Option<String>,
    /// Wait for the reporter's hello before returning (off for a configuration the filter
    /// refuses, which starts no reporter).
    pub wait_for_reporter: bool,
    /// Install the filter a second time in the same chain, as a WasmPlugin for the namespace
    /// beside the mesh-wide one (`application.weir` after `istio-system.weir`).
    pub second_install: bool,
    /// Where the filter reports instead of the test control plane (a controller process, a
    /// relay); then nothing waits for the reporter's hello.
    pub controller: Option<std::net::SocketAddr>,
}

impl Default for StackOptions {
    fn default() -> Self {
        Self {
            concurrency: 2,
            primary_args: Vec::new(),
            canary_args: Vec::new(),
            filter_config: Some(filter_config().to_string()),
            wait_for_reporter: true,
            second_install: false,
            controller: None,
        }
    }
}

impl StackOptions {
    /// Without the filter: Envoy with its routes alone.
    pub fn without_filter() -> Self {
        Self {
            filter_config: None,
            wait_for_reporter: false,
            ..Self::default()
        }
    }
}

/// The running pieces. Dropped in field order: Envoy first, then the upstreams and the control
/// plane, then the work directory.
#[derive(Debug)]
pub struct Stack {
    /// The Envoy under test.
    pub envoy: EnvoyProcess,
    /// What it was started with (its filter is discovered from a file, as Istio delivers a
    /// WasmPlugin: [`Stack::update_filter`] rewrites it).
    pub bootstrap: EnvoyBootstrap,
    /// Mirror v1, behind the `primary` cluster.
    pub primary: Upstream,
    /// Mirror v2, behind the `canary` cluster.
    pub canary: Upstream,
    /// The control plane the filter reports to.
    pub control: ControlPlane,
    /// Bootstraps and logs.
    pub dir: WorkDir,
}

impl Stack {
    /// Starts everything and waits until Envoy is ready (and, with the filter, until its
    /// reporter has said hello).
    pub async fn start(test: &str, options: StackOptions) -> anyhow::Result<Self> {
        let dir = WorkDir::new(test)?;
        let primary = Upstream::start(PRIMARY_VERSION, &str_args(&options.primary_args))?;
        let canary = Upstream::start(CANARY_VERSION, &str_args(&options.canary_args))?;
        let control = ControlPlane::new().await?;

        let mut bootstrap = EnvoyBootstrap::new(primary.addr(), canary.addr());
        bootstrap.node_id = format!("{test}-envoy");
        bootstrap.namespace = "application".to_owned();
        bootstrap.workload = "mhs".to_owned();
        bootstrap.host = HOST.to_owned();
        bootstrap.controller = Some(options.controller.unwrap_or_else(|| control.addr()));
        bootstrap.canary_value = ROUTE_SECRET.to_owned();
        let wait_for_reporter = options.filter_config.is_some()
            && options.wait_for_reporter
            && options.controller.is_none();
        if let Some(config_json) = options.filter_config {
            if options.second_install {
                let mut second = WasmFilter::wasm_plugin(
                    binaries::wasm(),
                    config_json.clone(),
                    dir.path().join("weir-filter-namespace.ecds.json"),
                );
                if let FilterInstall::WasmPlugin { name, .. } = &mut second.install {
                    *name = "application.weir".to_owned();
                }
                bootstrap.extra_filters.push(second);
            }
            bootstrap.wasm = Some(WasmFilter::wasm_plugin(
                binaries::wasm(),
                config_json,
                dir.path().join("weir-filter.ecds.json"),
            ));
        }
        let (binary, work, concurrency, started) = (
            binaries::envoy(),
            dir.path().to_owned(),
            options.concurrency,
            bootstrap.clone(),
        );
        let envoy = tokio::task::spawn_blocking(move || {
            EnvoyProcess::start(&binary, &started, &work, concurrency)
        })
        .await?
        .context("Envoy did not start")?;
        let stack = Stack {
            envoy,
            bootstrap,
            primary,
            canary,
            control,
            dir,
        };
        if wait_for_reporter {
            stack
                .control
                .wait_for("the reporter's hello", Duration::from_secs(10), |s| {
                    s.hellos() > 0
                })
                .await
                .with_context(|| format!("Envoy log:\n{}", stack.envoy.log_tail(40)))?;
        }
        Ok(stack)
    }

    /// Delivers a new filter configuration and resource version, as istiod does when the
    /// WasmPlugin changes: Envoy replaces every filter VM while traffic flows.
    pub fn update_filter(&mut self, config_json: String, version: &str) -> anyhow::Result<()> {
        let wasm = self
            .bootstrap
            .wasm
            .as_mut()
            .context("this stack runs no filter")?;
        wasm.config_json = config_json;
        if let FilterInstall::WasmPlugin {
            resource_version, ..
        } = &mut wasm.install
        {
            *resource_version = version.to_owned();
        }
        self.bootstrap
            .write_filter_discovery()
            .context("cannot write the filter's discovery file")
    }

    /// Envoy's counter of Wasm VMs created so far (one per worker and one on the main thread
    /// for each filter configuration).
    pub fn vms_created(&self) -> anyhow::Result<u64> {
        let body = self
            .envoy
            .admin_get("/stats?filter=^wasm\\.envoy\\.wasm\\.runtime\\.v8\\.created$")?;
        body.lines()
            .find_map(|line| line.split(": ").nth(1)?.trim().parse().ok())
            .with_context(|| format!("no VM counter in Envoy's stats: {body}"))
    }

    /// A load of `requests` GETs to the Envoy listener for [`HOST`].
    pub fn load(&self, requests: usize) -> LoadSpec {
        LoadSpec::new(self.envoy.listener_addr(), HOST, requests)
    }

    /// Pushes a directive for [`CANARY`] and waits until every worker applied it.
    pub async fn apply(&self, route: CanaryRoute) -> anyhow::Result<u64> {
        let generation = self.control.set_directive(Directive {
            generation: 0,
            canaries: vec![route],
        });
        self.control
            .wait_for_generation(generation, Duration::from_secs(10))
            .await
            .with_context(|| format!("Envoy log:\n{}", self.envoy.log_tail(40)))?;
        Ok(generation)
    }

    /// Waits until the applied totals for [`CANARY`] reach `requests`, then two more report
    /// intervals so that a count beyond it (a double count) would show too.
    pub async fn settle(&self, requests: u64) -> anyhow::Result<crate::Snapshot> {
        self.control
            .wait_for(
                &format!("{requests} requests reported for {CANARY}"),
                Duration::from_secs(15),
                |s| s.requests(CANARY) >= requests,
            )
            .await?;
        tokio::time::sleep(Duration::from_millis(1200)).await;
        Ok(self.control.snapshot())
    }
}

fn str_args(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

/// A weighted route for [`CANARY`] covering [`HOST`].
pub fn weighted(weight_bp: u32) -> CanaryRoute {
    route(weight_bp, canary_route::Mode::Weighted(Weighted {}))
}

/// A sticky route keyed on a request header.
pub fn sticky_header(weight_bp: u32, header: &str) -> CanaryRoute {
    route(
        weight_bp,
        canary_route::Mode::Sticky(Sticky {
            key: Some(weir_proto::v1::sticky::Key::Header(header.to_owned())),
        }),
    )
}

/// An A/B route: requests matching any group go to the canary.
pub fn header_match(groups: Vec<Vec<HeaderRule>>) -> CanaryRoute {
    route(
        0,
        canary_route::Mode::HeaderMatch(HeaderMatch {
            any_of: groups
                .into_iter()
                .map(|all_of| MatchGroup { all_of })
                .collect(),
        }),
    )
}

/// A header rule matching a value exactly.
pub fn exact(name: &str, value: &str) -> HeaderRule {
    HeaderRule {
        name: name.to_owned(),
        value: Some(header_rule::Value::Exact(value.to_owned())),
    }
}

/// A header rule matching a regular expression.
pub fn regex(name: &str, pattern: &str) -> HeaderRule {
    HeaderRule {
        name: name.to_owned(),
        value: Some(header_rule::Value::Regex(pattern.to_owned())),
    }
}

fn route(weight_bp: u32, mode: canary_route::Mode) -> CanaryRoute {
    CanaryRoute {
        key: CANARY.to_owned(),
        hosts: vec![HOST.to_owned()],
        canary_weight_bp: weight_bp,
        mode: Some(mode),
        canary_value: ROUTE_SECRET.to_owned(),
        ..CanaryRoute::default()
    }
}
