//! The mirror app over HTTP, as the other tests rely on it: status and delay on request, an
//! exact error spread, stats that count what it served, and a clean stop on SIGTERM.

use std::time::{Duration, Instant};

use weir_e2e::{LoadSpec, Upstream};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_answers_as_asked_and_counts_what_it_served() -> anyhow::Result<()> {
    let mirror = Upstream::start("v9.9.9", &["--error-rate", "0.25"])?;
    let plain = LoadSpec::new(mirror.addr(), "mirror", 100).run().await;
    assert_eq!(plain.server_errors(), 25, "exactly a quarter fail");
    assert_eq!(
        plain.count_version("v9.9.9"),
        100,
        "every answer names the version"
    );

    let coded = LoadSpec::new(mirror.addr(), "mirror", 10)
        .header("x-mirror-code", "503")
        .run()
        .await;
    assert!(coded.outcomes.iter().all(|o| o.status == 503));

    let started = Instant::now();
    let delayed = LoadSpec::new(mirror.addr(), "mirror", 1)
        .header("x-mirror-delay", "150ms")
        .run()
        .await;
    assert_eq!(delayed.outcomes[0].status, 200);
    assert!(started.elapsed() >= Duration::from_millis(150));

    let bad = LoadSpec::new(mirror.addr(), "mirror", 1)
        .header("x-mirror-delay", "soon")
        .run()
        .await;
    assert_eq!(bad.outcomes[0].status, 400, "a malformed delay is refused");

    let (health, _) = weir_e2e::http::get(mirror.addr(), "/healthz").await?;
    assert_eq!(health, 200);
    let stats = mirror.stats().await?;
    assert_eq!(
        stats.requests, 112,
        "health checks and stats are not counted"
    );
    assert_eq!(stats.errors, 35);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_latency_flag_delays_every_answer() -> anyhow::Result<()> {
    let mirror = Upstream::start("v1", &["--latency", "60ms"])?;
    let load = LoadSpec::new(mirror.addr(), "mirror", 20)
        .concurrency(4)
        .run()
        .await;
    let fastest = load
        .outcomes
        .iter()
        .map(|o| o.latency)
        .min()
        .unwrap_or_default();
    assert!(
        fastest >= Duration::from_millis(60),
        "fastest answer took {fastest:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_stops_cleanly_on_sigterm() -> anyhow::Result<()> {
    let mut mirror = Upstream::start("v1", &[])?;
    let status = mirror.terminate(Duration::from_secs(10))?;
    assert!(status.success(), "exit status {status}");
    Ok(())
}
