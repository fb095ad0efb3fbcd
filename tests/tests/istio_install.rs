//! The filter as a stock Istio installs it: no bootstrap extension, no `vm_id`, `root_id` = the
//! WasmPlugin's plugin name, the filter discovered through ECDS with the resource version in the
//! VM's environment, `--concurrency 4`, and the controller reached through a cluster named as
//! Istio names the outbound cluster of a Service (`outbound|9090||weir.weir-system.svc...`, whose
//! `|` is not valid in an HTTP/2 authority). Against the test control plane; the rollouts through
//! the real controller are in `controller.rs` and `local_install.rs`.

use std::future::Future;
use std::time::Duration;

use anyhow::Context;
use serde_json::json;
use weir_controller::platform::local::envoy::{allow_all_filter, write_discovery, FilterInstall};
use weir_e2e::stack::{
    filter_config, weighted, Stack, StackOptions, CANARY, CANARY_VERSION, PRIMARY_VERSION,
};

async fn bounded<T>(limit: Duration, body: impl Future<Output = anyhow::Result<T>>) -> T {
    match tokio::time::timeout(limit, body).await {
        Ok(Ok(value)) => value,
        Ok(Err(e)) => panic!("{e:#}"),
        Err(_) => panic!("test did not finish within {limit:?}"),
    }
}

fn four_workers() -> StackOptions {
    StackOptions {
        concurrency: 4,
        ..StackOptions::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_stream_per_envoy_opens_over_istios_outbound_cluster_and_every_worker_routes_by_it() {
    bounded(Duration::from_secs(60), async {
        let stack = Stack::start("istio_shape", four_workers()).await?;
        assert!(
            stack
                .bootstrap
                .to_json()
                .get("bootstrap_extensions")
                .is_none(),
            "no bootstrap extension"
        );
        stack.apply(weighted(10_000)).await?;
        let load = stack.load(400).concurrency(8).run().await;
        assert_eq!(
            load.count_version(CANARY_VERSION),
            400,
            "every worker applied the directive: {:?}",
            load.by_version()
        );
        let seen = stack.settle(load.sent()).await?;
        assert_eq!(seen.requests(CANARY), 400, "{}", seen.summary());
        assert_eq!(seen.streams_open, 1, "{}", seen.summary());
        assert_eq!(seen.reporters().len(), 1, "{}", seen.summary());
        assert!(seen.anomalies.is_empty(), "{}", seen.summary());
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_filter_configuration_replaces_every_vm_while_traffic_flows_and_counts_stay_exact() {
    bounded(Duration::from_secs(90), async {
        let mut stack = Stack::start("istio_update", four_workers()).await?;
        stack.apply(weighted(5_000)).await?;
        let vms_before = stack.vms_created()?;
        let traffic = tokio::spawn(stack.load(3_000).concurrency(4).run());
        tokio::time::sleep(Duration::from_millis(400)).await;
        let mut config = filter_config();
        config["directiveGracePeriod"] = json!("12s");
        stack.update_filter(config.to_string(), "2")?;
        let load = traffic.await?;
        assert!(
            load.transport_errors().is_empty() && load.server_errors() == 0,
            "no request failed across the update: {:?}",
            load.transport_errors()
        );
        let vms_after = stack.vms_created()?;
        assert!(
            vms_after >= vms_before + 5,
            "every VM (4 workers and the main thread) was replaced: {vms_before} -> {vms_after} created"
        );
        assert!(
            stack.envoy.wait_for_log("continuing epoch", Duration::from_secs(10)),
            "a new VM took the stream over; Envoy log:\n{}",
            stack.envoy.log_tail(40)
        );

        // The directive reaches every new worker: all of the next requests go to the canary.
        stack.apply(weighted(10_000)).await?;
        let after = stack.load(200).concurrency(8).run().await;
        assert_eq!(after.count_version(CANARY_VERSION), 200, "{:?}", after.by_version());

        let sent = load.sent() + after.sent();
        let seen = stack
            .settle(sent)
            .await
            .with_context(|| format!("Envoy log:\n{}", stack.envoy.log_tail(60)))?;
        assert_eq!(seen.requests(CANARY), sent, "{}", seen.summary());
        assert!(seen.anomalies.is_empty(), "{}", seen.summary());
        assert_eq!(seen.streams_open, 1, "one stream per Envoy after the update");
        assert_eq!(
            seen.reporters().len(),
            1,
            "the new owner continued the same reporter epoch: {}",
            seen.summary()
        );
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_istios_agent_cannot_fetch_the_module_traffic_flows_to_the_primary() {
    bounded(Duration::from_secs(60), async {
        let mut stack = Stack::start("istio_fail_open", four_workers()).await?;
        stack.apply(weighted(10_000)).await?;
        let Some(FilterInstall::WasmPlugin {
            name, discovery, ..
        }) = stack.bootstrap.wasm.as_ref().map(|w| w.install.clone())
        else {
            anyhow::bail!("the stack installs the filter as a WasmPlugin");
        };
        // What the agent sends Envoy for a FAIL_OPEN WasmPlugin whose module it cannot fetch.
        write_discovery(&discovery, &name, "2", allow_all_filter())?;
        stack
            .control
            .wait_for("the filter's stream to go", Duration::from_secs(15), |s| {
                s.streams_open == 0
            })
            .await?;
        let load = stack.load(200).concurrency(4).run().await;
        assert_eq!(
            load.count_version(PRIMARY_VERSION),
            200,
            "without the filter every request takes the default route: {:?}",
            load.by_version()
        );
        assert!(load.transport_errors().is_empty() && load.server_errors() == 0);

        // The module is back: the filter splits and reports again.
        stack.update_filter(filter_config().to_string(), "3")?;
        stack
            .control
            .wait_for("a new stream", Duration::from_secs(15), |s| {
                s.streams_open == 1
            })
            .await?;
        stack.apply(weighted(10_000)).await?;
        let back = stack.load(100).run().await;
        assert_eq!(
            back.count_version(CANARY_VERSION),
            100,
            "{:?}",
            back.by_version()
        );
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filter_installed_twice_in_one_chain_splits_and_counts_each_request_once() {
    bounded(Duration::from_secs(60), async {
        // The mesh-wide WasmPlugin for labelled Pods, and one for a labelled namespace.
        let options = StackOptions {
            second_install: true,
            ..four_workers()
        };
        let stack = Stack::start("istio_twice", options).await?;
        stack.apply(weighted(5_000)).await?;
        let load = stack.load(1_000).concurrency(8).run().await;
        assert!(load.transport_errors().is_empty() && load.server_errors() == 0);
        let seen = stack.settle(load.sent()).await?;
        assert_eq!(seen.requests(CANARY), 1_000, "{}", seen.summary());
        let canary = load.count_version(CANARY_VERSION);
        assert!(
            (350..=650).contains(&canary),
            "one split at 50%, not two in a row (25%): {canary} of 1000"
        );
        assert_eq!(
            seen.total(CANARY, weir_proto::v1::Version::Canary).requests,
            canary,
            "{}",
            seen.summary()
        );
        assert!(
            stack.envoy.log().contains("passes requests through"),
            "the second instance says it stands down; Envoy log:\n{}",
            stack.envoy.log_tail(40)
        );
        Ok(())
    })
    .await
}
