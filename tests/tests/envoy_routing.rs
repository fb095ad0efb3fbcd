//! The local Envoy bootstrap, without the filter: Envoy starts from it, and its routes send a
//! request to the canary exactly when the routing header says so.

use std::time::Duration;

use weir_e2e::stack::{CANARY_VERSION, PRIMARY_VERSION};
use weir_e2e::{Stack, StackOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routing_header_selects_the_canary_and_everything_else_goes_to_primary() {
    tokio::time::timeout(Duration::from_secs(60), routes())
        .await
        .expect("the test finishes within a minute")
        .unwrap_or_else(|e| panic!("{e:#}"));
}

async fn routes() -> anyhow::Result<()> {
    let stack = Stack::start("envoy_routing", StackOptions::without_filter()).await?;

    let to_canary = stack
        .load(200)
        .header("x-weir-route", weir_e2e::stack::ROUTE_SECRET)
        .run()
        .await;
    let to_primary = stack.load(200).run().await;
    let other_value = stack
        .load(100)
        .header("x-weir-route", "primary")
        .run()
        .await;
    let other_host = stack.load(100).run().await;

    for (name, load) in [
        ("canary", &to_canary),
        ("plain", &to_primary),
        ("primary value", &other_value),
        ("plain again", &other_host),
    ] {
        assert!(
            load.transport_errors().is_empty() && load.server_errors() == 0,
            "{name}: every request succeeds, got {:?}",
            load.by_version()
        );
    }
    assert_eq!(
        to_canary.count_version(CANARY_VERSION),
        200,
        "{:?}",
        to_canary.by_version()
    );
    assert_eq!(
        to_primary.count_version(PRIMARY_VERSION),
        200,
        "{:?}",
        to_primary.by_version()
    );
    assert_eq!(other_value.count_version(PRIMARY_VERSION), 100);
    assert_eq!(other_host.count_version(PRIMARY_VERSION), 100);

    // Each upstream saw exactly the requests routed to it.
    assert_eq!(stack.canary.stats().await?.requests, 200);
    assert_eq!(stack.primary.stats().await?.requests, 400);
    assert!(stack.envoy.log().contains("starting main dispatch loop"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_that_refuses_its_bootstrap_fails_to_start_with_its_log_in_the_error() {
    let dir = weir_e2e::WorkDir::new("envoy_refuses").unwrap();
    let mut bootstrap = weir_controller::platform::local::envoy::EnvoyBootstrap::new(
        "127.0.0.1:1".parse().unwrap(),
        "127.0.0.1:2".parse().unwrap(),
    );
    // A listener port that another program holds: Envoy cannot bind it and exits.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    bootstrap.listener_port = taken.local_addr().unwrap().port();
    let binary = weir_e2e::binaries::envoy();
    let work = dir.path().to_owned();
    let error = tokio::task::spawn_blocking(move || {
        weir_controller::platform::local::envoy::EnvoyProcess::start(&binary, &bootstrap, &work, 1)
    })
    .await
    .unwrap()
    .expect_err("a listener on a taken port is refused");
    let text = error.to_string();
    assert!(text.contains("exited"), "{text}");
    assert!(
        text.contains("ddress already in use"),
        "the log tail names the problem: {text}"
    );
}
