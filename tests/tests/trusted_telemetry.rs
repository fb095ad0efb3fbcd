//! Trusted telemetry end to end: local mode over TLS, the real Envoy presenting a workload
//! certificate with a SPIFFE id (`spiffe://cluster.local/ns/application/sa/default`, made per test
//! with rcgen), the controller verifying it; and reporters of the tests' own, over the network
//! with nothing but the .proto, trying what an attacker in the mesh would.

use std::future::Future;
use std::time::Duration;

use weir_controller::ingest::RejectReason;
use weir_controller::spec::Phase;
use weir_e2e::certs::TestCa;
use weir_e2e::local::{CanaryFile, LocalRun};
use weir_e2e::reporter::{channel, successes, Dial, TestReporter};
use weir_e2e::WorkDir;
use weir_proto::v1::{controller_message::Kind, Histogram, Version};

const ROLLOUT: Duration = Duration::from_secs(60);
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

/// Local mode over TLS, initialized, with traffic.
async fn tls_run(test: &str, certs: &WorkDir) -> anyhow::Result<(LocalRun, TestCa)> {
    let ca = TestCa::new(certs.path())?;
    let tls = ca.local_tls("application")?;
    let mut run = LocalRun::start_with(test, &CanaryFile::default(), "1.0.0", |options| {
        options.telemetry_tls = Some(tls);
    })
    .await?;
    run.step_until("the primary is initialized", INIT, is(Phase::Initialized))
        .await?;
    run.start_traffic(200);
    Ok((run, ca))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_successes_from_another_namespace_are_refused_and_a_failing_canary_is_still_rolled_back(
) {
    let certs = WorkDir::new("tls_forger_certs").unwrap();
    bounded(Duration::from_secs(120), async {
        let (mut run, ca) = tls_run("tls_forger", &certs).await?;
        let addr = run.mode().telemetry_addr();

        // A client without a certificate is refused, with a status that says why.
        let anonymous = channel(
            addr,
            &Dial::Tls {
                root: ca.root.clone(),
                identity: None,
            },
        )
        .await?;
        let refused = match TestReporter::open(anonymous).await {
            Err(status) => status,
            Ok(mut reporter) => {
                reporter
                    .send(successes(
                        "anon",
                        "",
                        1,
                        0,
                        "application/mhs",
                        Version::Canary,
                        0,
                    ))
                    .await?;
                reporter
                    .next()
                    .await
                    .expect_err("a stream without a certificate is refused")
            }
        };
        assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
        assert!(
            refused.message().contains("no client certificate"),
            "{refused:?}"
        );

        // A workload of another namespace forges canary successes all through the analysis.
        let intruder = ca.workload("intruder", "default")?;
        let forger = TestReporter::open(
            channel(
                addr,
                &Dial::Tls {
                    root: ca.root.clone(),
                    identity: Some(intruder),
                },
            )
            .await?,
        )
        .await
        .map_err(|s| anyhow::anyhow!("the forger's stream: {s}"))?;
        let node = "sidecar~10.0.0.99~forger.intruder~intruder.svc.cluster.local";
        forger
            .send(successes(
                node,
                "intruder",
                7,
                0,
                "application/mhs",
                Version::Canary,
                0,
            ))
            .await?;
        let forging = tokio::spawn(async move {
            for sequence in 1..=600u64 {
                let report = successes(
                    node,
                    "intruder",
                    7,
                    sequence,
                    "application/mhs",
                    Version::Canary,
                    500,
                );
                if forger.send(report).await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });

        run.set_version("2.0.0", &["--error-rate", "0.5"])?;
        run.step_until(
            "the failing version is rolled back",
            ROLLOUT,
            is(Phase::Failed),
        )
        .await?;
        forging.abort();
        let context = run.describe();
        let counters = run.mode().ingest().counters().snapshot();
        assert!(
            counters.rejected(RejectReason::NotAllowed) > 0,
            "the forged reports are counted as refused: {counters:?}"
        );
        assert!(
            counters.rejected(RejectReason::Unauthenticated) >= 1,
            "{counters:?}"
        );
        let warnings = run.messages_with("spiffe://cluster.local/ns/intruder/sa/default");
        assert_eq!(
            warnings.len(),
            1,
            "one Warning event names the refused identity: {context}"
        );
        assert!(warnings[0].contains("Refused reports"), "{}", warnings[0]);
        assert_eq!(
            run.messages_with("Rolling back mhs.application failed checks threshold reached")
                .len(),
            1,
            "{context}"
        );
        run.shutdown().await;
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_identity_claiming_the_envoys_node_id_locks_nobody_out_and_absurd_counts_are_refused(
) {
    let certs = WorkDir::new("tls_lockout_certs").unwrap();
    bounded(Duration::from_secs(120), async {
        let (mut run, ca) = tls_run("tls_lockout", &certs).await?;
        let addr = run.mode().telemetry_addr();
        let counted = |run: &LocalRun| run.mode().ingest().counters().snapshot().requests_applied;
        // The real Envoy reports before the attack.
        run.step_for(Duration::from_secs(2)).await;
        let before = counted(&run);
        assert!(before > 0, "the Envoy reports over TLS");

        // Another namespace's workload sends a hello as the real Envoy ("weir-local", local
        // mode's node id) with a fresh epoch: once, the Envoy was locked out by this.
        let intruder = ca.workload("intruder", "default")?;
        let mut lockout = TestReporter::open(
            channel(
                addr,
                &Dial::Tls {
                    root: ca.root.clone(),
                    identity: Some(intruder),
                },
            )
            .await?,
        )
        .await
        .map_err(|s| anyhow::anyhow!("{s}"))?;
        lockout
            .send(successes(
                "weir-local",
                "",
                0xdead,
                0,
                "application/mhs",
                Version::Primary,
                0,
            ))
            .await?;
        lockout.next().await.map_err(|s| anyhow::anyhow!("{s}"))?;

        // A workload of the canary's own namespace (so it may report) claims 2^64-1 requests
        // with a histogram that matches.
        let peer = ca.workload("application", "batch")?;
        let mut absurd = TestReporter::open(
            channel(
                addr,
                &Dial::Tls {
                    root: ca.root.clone(),
                    identity: Some(peer),
                },
            )
            .await?,
        )
        .await
        .map_err(|s| anyhow::anyhow!("{s}"))?;
        let node = "sidecar~10.0.0.7~batch-1.application~application.svc.cluster.local";
        absurd
            .send(successes(
                node,
                "application",
                1,
                0,
                "application/mhs",
                Version::Primary,
                0,
            ))
            .await?;
        let mut huge = successes(
            node,
            "application",
            1,
            1,
            "application/mhs",
            Version::Primary,
            1,
        );
        huge.stats[0].requests = u64::MAX;
        huge.stats[0].latency = Some(Histogram {
            counts: vec![i64::MAX, i64::MAX, 1],
        });
        absurd.send(huge).await?;
        let acked = loop {
            match absurd
                .next()
                .await
                .map_err(|s| anyhow::anyhow!("{s}"))?
                .kind
            {
                Some(Kind::Ack(ack)) if ack.sequence == 1 => break ack,
                _ => {}
            }
        };
        assert_eq!(acked.sequence, 1, "acknowledged, so it is not sent again");

        // The real Envoy keeps reporting, and every request it served is counted, nothing more.
        run.step_for(Duration::from_secs(3)).await;
        assert!(
            counted(&run) > before,
            "the Envoy still reports after the attack"
        );
        let (sent, counted_now) = run.stop_traffic_and_count().await?;
        assert_eq!(
            counted_now,
            sent,
            "the Envoy's numbers stay exact\n{}",
            run.describe()
        );
        let counters = run.mode().ingest().counters().snapshot();
        assert_eq!(
            counters.rejected(RejectReason::StaleEpoch),
            0,
            "{counters:?}"
        );
        assert_eq!(
            counters.rejected(RejectReason::Implausible),
            1,
            "{counters:?}"
        );
        run.shutdown().await;
        Ok(())
    })
    .await;
}
