//! Whole rollouts through the real controller (local mode) with the filter installed the two
//! ways a mesh installs it, neither with a bootstrap extension: as Istio delivers a WasmPlugin
//! (ECDS, no `vm_id`, `root_id` = plugin name, `--concurrency 4`, the controller reached through
//! Istio's outbound cluster name), and as the EnvoyFilter alternative installs it (inline, the
//! module fetched by Envoy from the controller's HTTP port, pinned by its sha256). Every request
//! the traffic sends is counted by the controller exactly once.

use std::future::Future;
use std::time::Duration;

use http_body_util::{BodyExt, Empty};
use weir_controller::filter_module::{FilterModule, InstallKind};
use weir_controller::spec::Phase;
use weir_e2e::binaries;
use weir_e2e::local::{CanaryFile, LocalRun};

const RATE: u32 = 200;
const ROLLOUT: Duration = Duration::from_secs(40);
const INIT: Duration = Duration::from_secs(20);

async fn bounded<T>(limit: Duration, body: impl Future<Output = anyhow::Result<T>>) -> T {
    match tokio::time::timeout(limit, body).await {
        Ok(Ok(value)) => value,
        Ok(Err(e)) => panic!("{e:#}"),
        Err(_) => panic!("the test did not finish within {limit:?}"),
    }
}

fn is(phase: Phase) -> impl Fn(&weir_controller::spec::CanaryStatus) -> bool {
    move |s| s.phase == Some(phase)
}

/// Runs one rollout of `flags` (mirror flags of the new version) to `outcome` with the filter
/// installed `install`ed on four Envoy workers; asserts every request sent was counted once.
async fn rollout(test: &str, install: InstallKind, flags: &[&str], outcome: Phase) -> LocalRun {
    bounded(Duration::from_secs(120), async {
        let canary = CanaryFile::default();
        let mut run = LocalRun::start_with(test, &canary, "1.0.0", |options| {
            options.filter_install = install;
            options.envoy_concurrency = 4;
        })
        .await?;
        run.step_until("the primary is initialized", INIT, is(Phase::Initialized))
            .await?;
        run.start_traffic(RATE);
        run.set_version("2.0.0", flags)?;
        run.step_until(
            &format!("the rollout ends {outcome:?}"),
            ROLLOUT,
            is(outcome),
        )
        .await?;
        let (sent, counted) = run.stop_traffic_and_count().await?;
        assert!(sent > 500, "the traffic ran: {sent} requests");
        assert_eq!(
            counted,
            sent,
            "the controller counted every request exactly once\n{}",
            run.describe()
        );
        let counters = run.mode().ingest().counters().snapshot();
        assert_eq!(counters.rejected_total(), 0, "{counters:?}");
        assert_eq!(
            counters.streams_opened, 1,
            "one stream per Envoy: {counters:?}"
        );
        Ok(run)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_version_is_promoted_through_an_envoy_set_up_as_istio_sets_up_a_wasm_plugin() {
    let run = rollout(
        "wasmplugin_promoted",
        InstallKind::WasmPlugin,
        &[],
        Phase::Succeeded,
    )
    .await;
    let bootstrap = std::fs::read_to_string(run.mode().envoy().config_path()).unwrap();
    assert!(!bootstrap.contains("bootstrap_extensions"), "{bootstrap}");
    assert!(bootstrap.contains("outbound|9090||weir.weir-system.svc.cluster.local"));
    run.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_version_is_rolled_back_through_an_envoy_set_up_as_istio_sets_up_a_wasm_plugin() {
    let run = rollout(
        "wasmplugin_rolled_back",
        InstallKind::WasmPlugin,
        &["--error-rate", "0.5"],
        Phase::Failed,
    )
    .await;
    assert_eq!(
        run.messages_with("Rolling back mhs.application failed checks threshold reached")
            .len(),
        1,
        "{}",
        run.describe()
    );
    run.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_envoy_filter_install_envoy_loads_the_module_the_controller_serves_and_promotes() {
    let run = rollout(
        "envoyfilter_promoted",
        InstallKind::EnvoyFilter,
        &[],
        Phase::Succeeded,
    )
    .await;
    bounded(Duration::from_secs(30), async {
        let bootstrap = std::fs::read_to_string(run.mode().envoy().config_path())?;
        assert!(!bootstrap.contains("bootstrap_extensions"), "{bootstrap}");
        let local = FilterModule::load(&binaries::wasm())?;
        let module = run
            .mode()
            .filter_module_url()
            .expect("the controller serves the module")
            .to_owned();
        assert!(
            bootstrap.contains(local.sha256()),
            "Envoy pins the module's sha256"
        );
        assert!(bootstrap.contains(&local.url_path()), "{bootstrap}");
        // The bytes the controller serves are the module's, at the path Envoy fetched.
        let http = weir_e2e::http::client(1);
        let response = http
            .request(http::Request::get(&module).body(Empty::<bytes::Bytes>::new())?)
            .await?;
        assert_eq!(response.status(), 200);
        let served = response.into_body().collect().await?.to_bytes();
        assert_eq!(FilterModule::from_bytes(served).sha256(), local.sha256());
        Ok(())
    })
    .await;
    run.shutdown().await;
}
