//! The test control plane itself, driven by a tonic client playing the reporter: it must account
//! exactly, acknowledge, push directives, and stop and start again on the same port, or the
//! data-plane tests built on it prove nothing.

use std::time::Duration;

use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use weir_e2e::ControlPlane;
use weir_proto::v1::controller_message::Kind;
use weir_proto::v1::telemetry_client::TelemetryClient;
use weir_proto::v1::{ControllerMessage, Directive, Report, Reporter, Version, VersionStats};
use weir_proto::LatencyHistogram;

fn report(epoch: u64, sequence: u64, requests: u64) -> Report {
    let mut latency = LatencyHistogram::new();
    (0..requests).for_each(|i| latency.record(1_000 + i));
    Report {
        reporter: Some(Reporter {
            node_id: "node-a".into(),
            ..Default::default()
        }),
        epoch,
        sequence,
        applied_generation: 1,
        stats: if sequence == 0 {
            vec![]
        } else {
            vec![VersionStats {
                canary: "application/mhs".into(),
                version: Version::Canary as i32,
                requests,
                failures: 1,
                latency: Some(latency.encode()),
            }]
        },
    }
}

struct Reporting {
    tx: mpsc::UnboundedSender<Report>,
    inbound: tonic::Streaming<ControllerMessage>,
}

async fn connect(plane: &ControlPlane) -> anyhow::Result<Reporting> {
    let mut client = TelemetryClient::connect(format!("http://{}", plane.addr())).await?;
    let (tx, rx) = mpsc::unbounded_channel();
    tx.send(report(7, 0, 0))?;
    let inbound = client
        .exchange(UnboundedReceiverStream::new(rx))
        .await?
        .into_inner();
    Ok(Reporting { tx, inbound })
}

async fn next(reporting: &mut Reporting) -> anyhow::Result<Kind> {
    let message = tokio::time::timeout(Duration::from_secs(5), reporting.inbound.next())
        .await?
        .ok_or_else(|| anyhow::anyhow!("stream ended"))??;
    message.kind.ok_or_else(|| anyhow::anyhow!("empty message"))
}

#[tokio::test]
async fn reports_are_applied_once_acknowledged_and_totalled() -> anyhow::Result<()> {
    let plane = ControlPlane::new().await?;
    let generation = plane.set_directive(Directive::default());
    assert_eq!(generation, 1);
    let mut r = connect(&plane).await?;
    assert!(matches!(next(&mut r).await?, Kind::Directive(d) if d.generation == 1));

    for (sequence, requests) in [(1, 10), (2, 5), (2, 5), (1, 10), (3, 1)] {
        r.tx.send(report(7, sequence, requests))?;
        let Kind::Ack(ack) = next(&mut r).await? else {
            panic!("an ack follows every report")
        };
        assert_eq!(ack.epoch, 7);
        assert!(ack.sequence >= sequence);
    }
    let seen = plane.snapshot();
    assert_eq!(seen.duplicates, 2);
    assert_eq!(seen.applied.len(), 3);
    assert_eq!(seen.reports.len(), 6, "hello + 5");
    let canary = seen.total("application/mhs", Version::Canary);
    assert_eq!((canary.requests, canary.failures), (16, 3));
    assert_eq!(canary.latency.count(), 16);
    assert!(seen.anomalies.is_empty(), "{:?}", seen.anomalies);

    // A sequence that skips ahead is applied but flagged.
    r.tx.send(report(7, 5, 1))?;
    next(&mut r).await?;
    assert_eq!(plane.snapshot().anomalies.len(), 1);
    Ok(())
}

#[tokio::test]
async fn directives_reach_open_streams_and_new_ones() -> anyhow::Result<()> {
    let plane = ControlPlane::new().await?;
    let mut first = connect(&plane).await?;
    plane
        .wait_for("one stream", Duration::from_secs(5), |s| {
            s.streams_open == 1
        })
        .await?;
    let generation = plane.set_directive(Directive::default());
    assert!(matches!(next(&mut first).await?, Kind::Directive(d) if d.generation == generation));
    let mut second = connect(&plane).await?;
    assert!(matches!(next(&mut second).await?, Kind::Directive(d) if d.generation == generation));
    assert_eq!(plane.set_directive(Directive::default()), generation + 1);
    Ok(())
}

#[tokio::test]
async fn stop_drops_streams_and_start_listens_again_on_the_same_port() -> anyhow::Result<()> {
    let plane = ControlPlane::new().await?;
    let addr = plane.addr();
    let mut r = connect(&plane).await?;
    r.tx.send(report(9, 1, 3))?;
    next(&mut r).await?;

    plane.stop().await;
    // The stream ends (an error or the end of the stream), and nobody listens any more.
    let ended = tokio::time::timeout(Duration::from_secs(5), r.inbound.next()).await?;
    assert!(
        !matches!(ended, Some(Ok(_))),
        "no message after stop: {ended:?}"
    );
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());

    plane.start().await?;
    assert_eq!(plane.addr(), addr);
    let mut again = connect(&plane).await?;
    // Acks off: the report is applied but not acknowledged.
    plane.set_acks(false);
    again.tx.send(report(9, 2, 4))?;
    plane
        .wait_for("the second report", Duration::from_secs(5), |s| {
            s.applied.len() == 2
        })
        .await?;
    plane.set_acks(true);
    again.tx.send(report(9, 2, 4))?;
    assert!(matches!(next(&mut again).await?, Kind::Ack(a) if a.sequence == 2));
    let seen = plane.snapshot();
    assert_eq!(seen.total("application/mhs", Version::Canary).requests, 7);
    assert_eq!(seen.duplicates, 1);
    assert_eq!(seen.streams_opened, 2);
    Ok(())
}
