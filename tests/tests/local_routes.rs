//! Issue 18 in local mode itself: the Canary file's route options reach the Envoy `weir local`
//! starts, and its session affinity keeps a client on the canary through a whole rollout, the
//! cookie cleared once it is promoted. The real `LocalMode`, a real Envoy with the filter,
//! `mirror` processes as the app's versions.

use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use weir_controller::spec::{CanaryStatus, Phase};
use weir_e2e::local::{CanaryFile, LocalRun};

async fn bounded<T>(
    limit: Duration,
    body: impl std::future::Future<Output = anyhow::Result<T>>,
) -> T {
    match tokio::time::timeout(limit, body).await {
        Ok(Ok(value)) => value,
        Ok(Err(e)) => panic!("{e:#}"),
        Err(_) => panic!("the test did not finish within {limit:?}"),
    }
}

/// An answer through local mode's Envoy: version, `Set-Cookie`, and the route option's header.
struct Answer {
    version: String,
    set_cookie: Option<String>,
    route_header: Option<String>,
}

async fn get(run: &LocalRun, cookie: Option<&str>) -> anyhow::Result<Answer> {
    let mode = run.mode();
    let mut request = http::Request::builder()
        .uri(format!("http://{}/", mode.listener()))
        .header("host", mode.host());
    if let Some(cookie) = cookie {
        request = request.header("cookie", cookie);
    }
    let response = tokio::time::timeout(
        Duration::from_secs(5),
        weir_e2e::http::client(1).request(request.body(Empty::<Bytes>::new())?),
    )
    .await
    .context("Envoy answered within 5s")??;
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let answer = Answer {
        version: header("x-mirror-version").unwrap_or_default(),
        set_cookie: header("set-cookie"),
        route_header: header("x-route-option"),
    };
    let _ = response.into_body().collect().await?;
    Ok(answer)
}

fn progressing(s: &CanaryStatus) -> bool {
    s.phase == Some(Phase::Progressing) && s.canary_weight.percent() > 0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_mode_applies_the_route_options_and_a_session_cookie_holds_through_the_rollout() {
    bounded(Duration::from_secs(120), async {
        let canary = CanaryFile {
            service_extra: "    headers:\n      response:\n        add: {x-route-option: local}\n"
                .to_owned(),
            analysis_extra: "    sessionAffinity: {cookieName: flagger-cookie, maxAge: 600}\n"
                .to_owned(),
            ..CanaryFile::default()
        };
        let mut run = LocalRun::start("local_routes", &canary, "1.0.0").await?;
        assert!(
            run.mode().warnings().is_empty(),
            "nothing ignored: {:?}",
            run.mode().warnings()
        );
        run.step_until("the primary is initialized", Duration::from_secs(30), |s| {
            s.phase == Some(Phase::Initialized)
        })
        .await?;
        let first = get(&run, None).await?;
        assert_eq!(
            first.route_header.as_deref(),
            Some("local"),
            "the route option"
        );
        assert_eq!(first.set_cookie, None, "no rollout, no cookie");

        run.start_traffic(100);
        run.set_version("2.0.0", &[])?;
        run.step_until("traffic shifts", Duration::from_secs(30), progressing)
            .await?;
        // Split until the canary answers: it gives the cookie.
        let deadline = Instant::now() + Duration::from_secs(20);
        let cookie = loop {
            let answer = get(&run, None).await?;
            if answer.version == "2.0.0" {
                let given = answer
                    .set_cookie
                    .context("the canary's answer sets the cookie")?;
                break given.split("; ").next().unwrap_or_default().to_owned();
            }
            anyhow::ensure!(Instant::now() < deadline, "no request reached the canary");
            run.step_for(Duration::from_millis(20)).await;
        };
        assert!(cookie.starts_with("flagger-cookie="), "{cookie}");

        // Through every step: the cookie keeps the client on the canary (the primary runs
        // 1.0.0 until the promotion).
        let mut weights = std::collections::BTreeSet::new();
        while run.status().phase == Some(Phase::Progressing) {
            let answer = get(&run, Some(&cookie)).await?;
            if run.status().phase == Some(Phase::Progressing) {
                assert_eq!(
                    answer.version,
                    "2.0.0",
                    "at {}%",
                    run.status().canary_weight.percent()
                );
                assert_eq!(answer.set_cookie, None);
                weights.insert(run.status().canary_weight.percent());
            }
            run.step_for(Duration::from_millis(50)).await;
        }
        assert!(weights.len() >= 3, "the weight grew: {weights:?}");
        run.step_until("the canary is promoted", Duration::from_secs(60), |s| {
            s.phase == Some(Phase::Succeeded)
        })
        .await?;
        // The filters apply the promoted route within a moment.
        let cleared = Some(format!("{cookie}; Max-Age=-1"));
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let after = get(&run, Some(&cookie)).await?;
            if after.set_cookie == cleared {
                break;
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "after the promotion the cookie is cleared, got {:?}",
                after.set_cookie
            );
            run.step_for(Duration::from_millis(50)).await;
        }
        run.shutdown().await;
        Ok(())
    })
    .await;
}
