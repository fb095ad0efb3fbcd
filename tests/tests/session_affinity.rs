//! Flagger's `analysis.sessionAffinity`, done by the filter in a real Envoy (issue 18): a
//! request split to the canary gets the session cookie, later requests with it stay on the
//! canary as the weight grows (and are reported under the canary), and once the rollout is over
//! the cookie is cleared. The directives are the controller's own, for a compiled Canary.

use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use weir_controller::analysis::Route;
use weir_controller::spec::Weight;
use weir_controller::traffic::directive_entry;
use weir_e2e::stack::{CANARY, CANARY_VERSION, HOST, PRIMARY_VERSION, ROUTE_SECRET};
use weir_e2e::{Stack, StackOptions};
use weir_proto::v1::Version;

const CANARY_YAML: &str = "apiVersion: weir.dev/v1alpha1
kind: Canary
metadata: {name: mhs, namespace: application}
spec:
  targetRef: {apiVersion: apps/v1, kind: Deployment, name: mhs}
  service: {port: 80}
  analysis:
    interval: 1m
    stepWeight: 10
    maxWeight: 50
    sessionAffinity: {cookieName: flagger-cookie, maxAge: 600}
";

/// The version that answered and the `Set-Cookie` of the answer.
async fn get(stack: &Stack, cookie: Option<&str>) -> anyhow::Result<(String, Option<String>)> {
    let mut request = http::Request::builder()
        .uri(format!("http://{}/", stack.envoy.listener_addr()))
        .header("host", HOST);
    if let Some(cookie) = cookie {
        request = request.header("cookie", format!("theme=dark; {cookie}"));
    }
    let response = tokio::time::timeout(
        Duration::from_secs(5),
        weir_e2e::http::client(1).request(request.body(Empty::<Bytes>::new())?),
    )
    .await
    .context("Envoy answered within 5s")??;
    anyhow::ensure!(response.status() == 200, "answered {}", response.status());
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let version = header("x-mirror-version").unwrap_or_default();
    let set_cookie = header("set-cookie");
    let _ = response.into_body().collect().await?;
    Ok((version, set_cookie))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_cookie_keeps_a_client_on_the_canary_as_the_weight_grows_and_is_cleared_after_promotion(
) {
    tokio::time::timeout(Duration::from_secs(90), session())
        .await
        .expect("the test finishes within 90s")
        .unwrap_or_else(|e| panic!("{e:#}"));
}

async fn session() -> anyhow::Result<()> {
    let mut plan = weir_controller::spec::load_yaml(CANARY_YAML)?.plan;
    plan.canary_route_value = ROUTE_SECRET.to_owned();
    let revision = "rev-1";
    let at = |percent: i64| {
        directive_entry(
            &plan,
            Route::weighted(Weight::try_new(percent).expect("a weight")),
            revision,
        )
    };
    let stack = Stack::start("session_affinity", StackOptions::default()).await?;

    // 10%: a client without the cookie is split; the canary's answers give the cookie, the
    // primary's give none (no primaryCookieName).
    stack.apply(at(10)).await?;
    let (mut sent, mut to_canary) = (0u64, 0u64);
    let mut cookie = None;
    for _ in 0..300 {
        let (version, set_cookie) = get(&stack, None).await?;
        sent += 1;
        if version == CANARY_VERSION {
            to_canary += 1;
            let given = set_cookie.context("the canary's answer sets the session cookie")?;
            cookie.get_or_insert(given);
        } else {
            assert_eq!(version, PRIMARY_VERSION);
            assert_eq!(set_cookie, None, "the primary's answer sets no cookie");
        }
    }
    let given = cookie.context("300 requests at 10% reached the canary at least once")?;
    let (pair, max_age) = given
        .split_once("; ")
        .context("Set-Cookie is `name=value; Max-Age=...`")?;
    assert_eq!(max_age, "Max-Age=600");
    assert!(pair.starts_with("flagger-cookie="), "{given}");
    assert!(
        (10..80).contains(&to_canary),
        "about 10% of 300 went to the canary: {to_canary}"
    );

    // The weight grows; the client with the cookie stays on the canary, and is not given the
    // cookie again.
    for percent in [20, 30, 50] {
        stack.apply(at(percent)).await?;
        for _ in 0..40 {
            let (version, set_cookie) = get(&stack, Some(pair)).await?;
            sent += 1;
            to_canary += 1;
            assert_eq!(version, CANARY_VERSION, "at {percent}% with {pair}");
            assert_eq!(set_cookie, None);
        }
    }
    // A forged value is split like any request: at 50% both versions answer.
    let mut forged_versions = std::collections::BTreeSet::new();
    for _ in 0..60 {
        let (version, _) = get(&stack, Some("flagger-cookie=guessed")).await?;
        sent += 1;
        if version == CANARY_VERSION {
            to_canary += 1;
        }
        forged_versions.insert(version);
    }
    assert_eq!(forged_versions.len(), 2, "{forged_versions:?}");

    // Every request the cookie kept on the canary was reported under the canary.
    let snapshot = stack.settle(sent).await?;
    assert_eq!(snapshot.requests(CANARY), sent, "{}", snapshot.summary());
    assert_eq!(
        snapshot.total(CANARY, Version::Canary).requests,
        to_canary,
        "{}",
        snapshot.summary()
    );

    // Promoted: the route is back on the primary, the cookie no longer honoured but cleared.
    stack
        .apply(directive_entry(&plan, Route::Primary, revision))
        .await?;
    let (version, set_cookie) = get(&stack, Some(pair)).await?;
    assert_eq!(version, PRIMARY_VERSION);
    assert_eq!(set_cookie, Some(format!("{pair}; Max-Age=-1")));
    let (_, set_cookie) = get(&stack, None).await?;
    assert_eq!(set_cookie, None, "a client without the cookie gets none");
    Ok(())
}
