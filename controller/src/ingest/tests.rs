//! The ingest over real gRPC: a tonic server on 127.0.0.1:0 and real `TelemetryClient`s.

use std::future::Future;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Status, Streaming};
use weir_proto::v1::controller_message::Kind;
use weir_proto::v1::telemetry_client::TelemetryClient;
use weir_proto::v1::{
    Ack, CanaryRoute, ControllerMessage, Directive, Histogram, Report, Reporter, Version,
    VersionStats,
};
use weir_proto::LatencyHistogram;

use super::*;

const GENERATION: u64 = 1_000;
const LONG_AGO: Duration = Duration::from_secs(15 * 60);

fn config() -> IngestConfig {
    IngestConfig {
        initial_generation: GENERATION,
        ..IngestConfig::default()
    }
}

/// Runs a test body under a deadline, so a hung stream fails the test instead of the suite.
async fn bounded<T>(body: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(30), body)
        .await
        .expect("test exceeded its 30 s deadline")
}

/// A served ingest that shuts down when dropped.
struct Server {
    ingest: Ingest,
    addr: std::net::SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    served: Option<Served>,
}

impl Server {
    async fn start(config: IngestConfig) -> Self {
        let ingest = Ingest::try_new(config).expect("valid config");
        ingest
            .publish(vec![route("shop/web", 500), route("shop/api", 0)])
            .expect("valid routes");
        let (stop, stopped) = oneshot::channel();
        let served = ingest
            .serve("127.0.0.1:0".parse().unwrap(), async {
                let _ = stopped.await;
            })
            .await
            .expect("bind 127.0.0.1:0");
        Self {
            ingest,
            addr: served.local_addr(),
            stop: Some(stop),
            served: Some(served),
        }
    }

    async fn connect(&self) -> Stream {
        let mut client = TelemetryClient::connect(format!("http://{}", self.addr))
            .await
            .expect("connect to the ingest");
        let (tx, rx) = mpsc::channel(64);
        let inbound = client
            .exchange(ReceiverStream::new(rx))
            .await
            .expect("open the exchange stream")
            .into_inner();
        Stream { tx, inbound }
    }

    fn window(&self, canary: &str, version: Version) -> VersionWindow {
        self.ingest
            .window(canary, version, LONG_AGO, Instant::now())
            .expect("canary is tracked")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// One Envoy's end of an `Exchange` stream.
struct Stream {
    tx: mpsc::Sender<Report>,
    inbound: Streaming<ControllerMessage>,
}

impl Stream {
    async fn send(&self, report: Report) {
        self.tx.send(report).await.expect("stream accepts reports");
    }

    async fn next(&mut self) -> Result<Option<ControllerMessage>, Status> {
        tokio::time::timeout(Duration::from_secs(10), self.inbound.message())
            .await
            .expect("the controller answers within 10 s")
    }

    async fn directive(&mut self) -> Directive {
        match self.next().await {
            Ok(Some(ControllerMessage {
                kind: Some(Kind::Directive(directive)),
            })) => directive,
            other => panic!("expected a directive, got {other:?}"),
        }
    }

    async fn ack(&mut self) -> Ack {
        match self.next().await {
            Ok(Some(ControllerMessage {
                kind: Some(Kind::Ack(ack)),
            })) => ack,
            other => panic!("expected an ack, got {other:?}"),
        }
    }

    async fn status(&mut self) -> Status {
        match self.next().await {
            Err(status) => status,
            other => panic!("expected the stream to end with a status, got {other:?}"),
        }
    }

    /// Sends a report and returns its ack.
    async fn report(&mut self, report: Report) -> Ack {
        self.send(report).await;
        self.ack().await
    }

    /// Sends the hello; returns the directive and the hello's ack.
    async fn hello(&mut self, node: &str, epoch: u64) -> (Directive, Ack) {
        self.send(report(node, epoch, 0, vec![])).await;
        let directive = self.directive().await;
        (directive, self.ack().await)
    }
}

fn route(key: &str, weight_bp: u32) -> CanaryRoute {
    CanaryRoute {
        key: key.into(),
        hosts: vec![format!("{}.example", key.replace('/', "-"))],
        canary_weight_bp: weight_bp,
        ..Default::default()
    }
}

fn report(node: &str, epoch: u64, sequence: u64, stats: Vec<VersionStats>) -> Report {
    Report {
        reporter: Some(Reporter {
            node_id: node.into(),
            namespace: "shop".into(),
            workload: "gateway".into(),
        }),
        epoch,
        sequence,
        applied_generation: GENERATION + 1,
        stats,
    }
}

/// Deterministic latencies: a spread from 200 µs to about 2 s with a tail.
fn samples(seed: u64, n: usize) -> Vec<u64> {
    let mut state = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
    (0..n)
        .map(|_| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            let r = state >> 33;
            if r % 50 == 7 {
                200_000 + r % 1_800_000
            } else {
                200 + r % 40_000
            }
        })
        .collect()
}

fn stats(canary: &str, version: Version, latencies: &[u64], failures: u64) -> VersionStats {
    let mut histogram = LatencyHistogram::new();
    latencies.iter().for_each(|&l| histogram.record(l));
    VersionStats {
        canary: canary.into(),
        version: version as i32,
        requests: latencies.len() as u64,
        failures,
        latency: Some(histogram.encode()),
    }
}

/// What the windows should hold: the same stats merged locally.
#[derive(Default)]
struct Expected {
    requests: u64,
    failures: u64,
    latency: LatencyHistogram,
}

impl Expected {
    fn add(&mut self, stats: &VersionStats) {
        self.requests += stats.requests;
        self.failures += stats.failures;
        let histogram = stats.latency.as_ref().expect("test stats carry latency");
        self.latency
            .merge_wire(histogram)
            .expect("test histograms are valid");
    }

    fn assert_matches(&self, window: &VersionWindow) {
        assert_eq!(window.requests, self.requests, "requests");
        assert_eq!(window.failures, self.failures, "failures");
        assert_eq!(window.latency, self.latency, "latency histogram");
        assert_eq!(
            window.p99_ms(),
            self.latency.quantile(0.99).map(|us| us / 1000.0)
        );
    }
}

#[tokio::test]
async fn reports_from_several_envoys_merge_exactly_into_the_windows() {
    bounded(async {
        let server = Server::start(config()).await;
        let mut canary = Expected::default();
        let mut primary = Expected::default();
        let mut streams = Vec::new();
        for envoy in 0..3u64 {
            let mut stream = server.connect().await;
            let (directive, ack) = stream.hello(&format!("envoy-{envoy}"), 10 + envoy).await;
            assert_eq!(directive.generation, GENERATION + 1);
            assert_eq!(directive.canaries.len(), 2);
            assert_eq!(
                ack,
                Ack {
                    epoch: 10 + envoy,
                    sequence: 0
                }
            );
            streams.push(stream);
        }
        for sequence in 1..=5u64 {
            for (envoy, stream) in streams.iter_mut().enumerate() {
                let seed = sequence * 10 + envoy as u64;
                let c = stats("shop/web", Version::Canary, &samples(seed, 40), seed % 4);
                let p = stats(
                    "shop/web",
                    Version::Primary,
                    &samples(seed + 500, 400),
                    seed % 7,
                );
                canary.add(&c);
                primary.add(&p);
                let epoch = 10 + envoy as u64;
                let ack = stream
                    .report(report(
                        &format!("envoy-{envoy}"),
                        epoch,
                        sequence,
                        vec![c, p],
                    ))
                    .await;
                assert_eq!(ack, Ack { epoch, sequence });
            }
        }
        let window = server.window("shop/web", Version::Canary);
        canary.assert_matches(&window);
        assert_eq!(window.reporters, 3);
        let window = server.window("shop/web", Version::Primary);
        primary.assert_matches(&window);
        assert!(window.success_rate_percent().unwrap() < 100.0);
        assert_eq!(
            server.window("shop/api", Version::Canary),
            VersionWindow::default()
        );
        assert!(server.ingest.last_report("shop/web").is_some());
        assert_eq!(server.ingest.last_report("shop/api"), None);

        let counters = server.ingest.counters().snapshot();
        assert_eq!(counters.reports_applied, 15);
        assert_eq!(
            counters.requests_applied,
            canary.requests + primary.requests
        );
        assert_eq!(counters.hellos, 3);
        assert_eq!(counters.rejected_total(), 0);
    })
    .await;
}

#[tokio::test]
async fn a_resent_report_is_acked_again_and_counted_once() {
    bounded(async {
        let server = Server::start(config()).await;
        let mut stream = server.connect().await;
        stream.hello("envoy", 7).await;
        let first = stats("shop/web", Version::Canary, &samples(1, 30), 2);
        let second = stats("shop/web", Version::Canary, &samples(2, 20), 1);
        let mut expected = Expected::default();
        expected.add(&first);
        expected.add(&second);

        assert_eq!(
            stream
                .report(report("envoy", 7, 1, vec![first.clone()]))
                .await
                .sequence,
            1
        );
        assert_eq!(
            stream
                .report(report("envoy", 7, 1, vec![first]))
                .await
                .sequence,
            1
        );
        assert_eq!(
            stream
                .report(report("envoy", 7, 2, vec![second.clone()]))
                .await
                .sequence,
            2
        );
        // A duplicate of an older report acks the highest applied, which releases it too.
        assert_eq!(
            stream
                .report(report("envoy", 7, 1, vec![second]))
                .await
                .sequence,
            2
        );

        expected.assert_matches(&server.window("shop/web", Version::Canary));
        let counters = server.ingest.counters().snapshot();
        assert_eq!((counters.reports_applied, counters.duplicates), (2, 2));
    })
    .await;
}

#[tokio::test]
async fn reports_resent_after_a_dropped_stream_count_exactly_once() {
    bounded(async {
        let server = Server::start(config()).await;
        let batches: Vec<VersionStats> = (1..=4u64)
            .map(|seq| stats("shop/web", Version::Canary, &samples(seq, 25), seq))
            .collect();
        let mut expected = Expected::default();
        batches.iter().for_each(|s| expected.add(s));

        let mut first = server.connect().await;
        first.hello("envoy", 9).await;
        first
            .report(report("envoy", 9, 1, vec![batches[0].clone()]))
            .await;
        // Reports 2 and 3 go out, then the stream breaks before their acks are read.
        first
            .send(report("envoy", 9, 2, vec![batches[1].clone()]))
            .await;
        first
            .send(report("envoy", 9, 3, vec![batches[2].clone()]))
            .await;
        drop(first);

        let mut second = server.connect().await;
        let (_, hello_ack) = second.hello("envoy", 9).await;
        assert!((1..=3).contains(&hello_ack.sequence), "{hello_ack:?}");
        // The reporter resends everything unacknowledged, in order, then carries on.
        for seq in 2..=4u64 {
            let ack = second
                .report(report(
                    "envoy",
                    9,
                    seq,
                    vec![batches[seq as usize - 1].clone()],
                ))
                .await;
            assert!(ack.sequence >= seq, "{ack:?} for {seq}");
        }
        expected.assert_matches(&server.window("shop/web", Version::Canary));
        assert_eq!(server.ingest.counters().snapshot().reports_applied, 4);
    })
    .await;
}

#[tokio::test]
async fn a_stale_epoch_is_refused_with_failed_precondition_and_the_new_epoch_counts() {
    bounded(async {
        let server = Server::start(config()).await;
        let old_stats = stats("shop/web", Version::Canary, &samples(1, 10), 0);
        let new_stats = stats("shop/web", Version::Canary, &samples(2, 15), 0);
        let mut old = server.connect().await;
        old.hello("envoy", 1).await;
        old.report(report("envoy", 1, 1, vec![old_stats.clone()]))
            .await;

        // The Envoy restarts: a new epoch for the same node id, starting again at 1.
        let mut new = server.connect().await;
        new.hello("envoy", 2).await;
        assert_eq!(
            new.report(report("envoy", 2, 1, vec![new_stats.clone()]))
                .await,
            Ack {
                epoch: 2,
                sequence: 1
            }
        );

        old.send(report("envoy", 1, 2, vec![new_stats.clone()]))
            .await;
        let status = old.status().await;
        assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
        assert!(status.message().contains("stale"), "{}", status.message());

        // A reconnect of the old process is refused at its hello.
        let mut again = server.connect().await;
        again.send(report("envoy", 1, 0, vec![])).await;
        assert_eq!(again.status().await.code(), Code::FailedPrecondition);

        let mut expected = Expected::default();
        expected.add(&old_stats);
        expected.add(&new_stats);
        expected.assert_matches(&server.window("shop/web", Version::Canary));
        assert_eq!(
            server
                .ingest
                .counters()
                .snapshot()
                .rejected(RejectReason::StaleEpoch),
            2
        );
    })
    .await;
}

fn hostile(counts: Vec<i64>, requests: u64) -> VersionStats {
    VersionStats {
        canary: "shop/web".into(),
        version: Version::Canary as i32,
        requests,
        failures: 0,
        latency: Some(Histogram { counts }),
    }
}

#[tokio::test]
async fn invalid_reports_are_acked_and_dropped_without_touching_the_windows() {
    bounded(async {
        let server = Server::start(IngestConfig {
            max_entries_per_report: 4,
            ..config()
        })
        .await;
        let mut stream = server.connect().await;
        stream.hello("envoy", 3).await;
        let good = stats("shop/web", Version::Canary, &samples(1, 10), 1);
        let mut expected = Expected::default();
        expected.add(&good);
        assert_eq!(
            stream
                .report(report("envoy", 3, 1, vec![good.clone()]))
                .await
                .sequence,
            1
        );

        let with = |change: fn(&mut VersionStats)| {
            let mut s = good.clone();
            change(&mut s);
            s
        };
        let cases: Vec<(RejectReason, Vec<VersionStats>)> = vec![
            (
                RejectReason::BadCanaryKey,
                vec![with(|s| s.canary = "web".into())],
            ),
            (
                RejectReason::UnspecifiedVersion,
                vec![with(|s| s.version = 0)],
            ),
            (
                RejectReason::UnspecifiedVersion,
                vec![with(|s| s.version = 9)],
            ),
            (
                RejectReason::FailuresExceedRequests,
                vec![with(|s| s.failures = 11)],
            ),
            (RejectReason::BadHistogram, vec![hostile(vec![0], 0)]),
            (
                RejectReason::BadHistogram,
                vec![hostile(vec![i64::MIN, i64::MIN, 1], 1)],
            ),
            (
                RejectReason::BadHistogram,
                vec![hostile(vec![i64::MAX, i64::MAX, i64::MAX], 3)],
            ),
            (
                RejectReason::HistogramCountMismatch,
                vec![with(|s| s.requests = 9)],
            ),
            (
                RejectReason::HistogramCountMismatch,
                vec![with(|s| s.latency = None)],
            ),
            // The valid first entry must not be applied when a later one is refused.
            (
                RejectReason::UnknownCanary,
                vec![good.clone(), with(|s| s.canary = "shop/gone".into())],
            ),
            (RejectReason::TooManyEntries, vec![good.clone(); 5]),
        ];
        let mut sequence = 1;
        for (reason, entries) in cases {
            sequence += 1;
            let ack = stream.report(report("envoy", 3, sequence, entries)).await;
            assert_eq!(ack, Ack { epoch: 3, sequence }, "{reason}");
            let rejection = server
                .ingest
                .counters()
                .last_rejection()
                .expect("a rejection");
            assert_eq!(rejection.reason, reason, "{rejection}");
        }
        let unknown = server.ingest.counters().snapshot();
        assert_eq!(unknown.rejected(RejectReason::BadHistogram), 3);
        assert_eq!(unknown.rejected(RejectReason::UnknownCanary), 1);
        assert_eq!(unknown.rejected_total(), 11);
        assert_eq!(unknown.reports_applied, 1);

        // A hello with stats is acked, and nothing of it counts.
        stream.send(report("envoy", 3, 0, vec![good.clone()])).await;
        assert_eq!(stream.ack().await, Ack { epoch: 3, sequence });
        let rejection = server
            .ingest
            .counters()
            .last_rejection()
            .expect("a rejection");
        assert_eq!(rejection.reason, RejectReason::HelloWithStats);

        // Dropped reports consumed their sequence numbers: the next one is not a gap.
        sequence += 1;
        assert_eq!(
            stream
                .report(report("envoy", 3, sequence, vec![good.clone()]))
                .await
                .sequence,
            sequence
        );
        expected.add(&good);
        expected.assert_matches(&server.window("shop/web", Version::Canary));
        assert_eq!(
            server.window("shop/web", Version::Primary),
            VersionWindow::default()
        );
    })
    .await;
}

#[tokio::test]
async fn the_unknown_canary_rejection_names_the_canary_and_the_generation() {
    bounded(async {
        let server = Server::start(config()).await;
        let stray = stats("shop/gone", Version::Canary, &samples(1, 3), 0);
        let ingested = server
            .ingest
            .ingest(&report("envoy", 1, 1, vec![stray]), Instant::now())
            .expect("dropped, not refused");
        let Outcome::Dropped(rejection) = ingested.outcome else {
            panic!("expected a drop, got {:?}", ingested.outcome);
        };
        assert_eq!(rejection.status().code(), Code::InvalidArgument);
        assert!(
            rejection.message.contains("\"shop/gone\""),
            "{}",
            rejection.message
        );
        assert!(
            rejection
                .message
                .contains(&format!("generation {}", GENERATION + 1)),
            "{}",
            rejection.message
        );
    })
    .await;
}

#[tokio::test]
async fn a_report_without_a_node_id_ends_the_stream_with_invalid_argument() {
    bounded(async {
        let server = Server::start(config()).await;
        let mut stream = server.connect().await;
        let mut anonymous = report("", 1, 0, vec![]);
        stream.send(anonymous.clone()).await;
        let status = stream.status().await;
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().contains("node_id"), "{}", status.message());

        anonymous.reporter = None;
        let mut stream = server.connect().await;
        stream.send(anonymous).await;
        assert_eq!(stream.status().await.code(), Code::InvalidArgument);
        let counters = server.ingest.counters().snapshot();
        assert_eq!(counters.rejected(RejectReason::MissingReporter), 2);
        assert_eq!(counters.streams_opened, 0);
    })
    .await;
}

#[tokio::test]
async fn a_report_from_another_reporter_on_an_open_stream_ends_it() {
    bounded(async {
        let server = Server::start(config()).await;
        let mut stream = server.connect().await;
        stream.hello("envoy-a", 1).await;
        stream.send(report("envoy-b", 1, 1, vec![])).await;
        assert_eq!(stream.status().await.code(), Code::InvalidArgument);
        let counters = server.ingest.counters().snapshot();
        assert_eq!(counters.rejected(RejectReason::IdentityChanged), 1);
        assert_eq!(
            server.ingest.known_reporters(),
            1,
            "envoy-b was never admitted"
        );
    })
    .await;
}

#[tokio::test]
async fn a_gap_ends_the_stream_with_aborted_and_an_in_order_resend_recovers() {
    bounded(async {
        let server = Server::start(config()).await;
        let batches: Vec<VersionStats> = (1..=3u64)
            .map(|seq| stats("shop/web", Version::Canary, &samples(seq, 10), 0))
            .collect();
        let mut stream = server.connect().await;
        stream.hello("envoy", 5).await;
        stream
            .report(report("envoy", 5, 1, vec![batches[0].clone()]))
            .await;
        stream
            .send(report("envoy", 5, 3, vec![batches[2].clone()]))
            .await;
        let status = stream.status().await;
        assert_eq!(status.code(), Code::Aborted);
        assert!(
            status.message().contains("skips 2..=2"),
            "{}",
            status.message()
        );

        let mut stream = server.connect().await;
        let (_, ack) = stream.hello("envoy", 5).await;
        assert_eq!(ack.sequence, 1);
        for seq in 2..=3u64 {
            let ack = stream
                .report(report(
                    "envoy",
                    5,
                    seq,
                    vec![batches[seq as usize - 1].clone()],
                ))
                .await;
            assert_eq!(ack.sequence, seq);
        }
        let mut expected = Expected::default();
        batches.iter().for_each(|s| expected.add(s));
        expected.assert_matches(&server.window("shop/web", Version::Canary));
        assert_eq!(
            server
                .ingest
                .counters()
                .snapshot()
                .rejected(RejectReason::SequenceGap),
            1
        );
    })
    .await;
}

#[tokio::test]
async fn an_oversized_report_ends_the_stream_with_out_of_range() {
    bounded(async {
        let server = Server::start(IngestConfig {
            max_message_bytes: 16 * 1024,
            ..config()
        })
        .await;
        let mut stream = server.connect().await;
        stream.hello("envoy", 1).await;
        // 20 000 varints of 1-2 bytes: well over 16 KiB.
        let huge = hostile([-1i64, 1].repeat(10_000), 10_000);
        stream.send(report("envoy", 1, 1, vec![huge])).await;
        let status = stream.status().await;
        assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
        assert!(status.message().contains("16384"), "{}", status.message());
        assert_eq!(
            server
                .ingest
                .counters()
                .snapshot()
                .rejected(RejectReason::Oversized),
            1
        );
        assert_eq!(
            server.window("shop/web", Version::Canary),
            VersionWindow::default()
        );

        // The server is unharmed; the reporter's next stream works.
        let mut stream = server.connect().await;
        stream.hello("envoy", 1).await;
        let small = stats("shop/web", Version::Canary, &samples(1, 5), 0);
        assert_eq!(
            stream
                .report(report("envoy", 1, 1, vec![small]))
                .await
                .sequence,
            1
        );
        assert_eq!(server.window("shop/web", Version::Canary).requests, 5);
    })
    .await;
}

/// Polls until `condition` holds; the test's deadline bounds it.
async fn eventually(mut condition: impl FnMut() -> bool) {
    while !condition() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn publish_pushes_the_directive_to_every_stream_and_confirmation_follows_applied_generation()
{
    bounded(async {
        let server = Server::start(config()).await;
        let mut streams = Vec::new();
        for envoy in 0..3 {
            let mut stream = server.connect().await;
            stream.hello(&format!("envoy-{envoy}"), 1).await;
            streams.push(stream);
        }
        let generation = server
            .ingest
            .publish(vec![route("shop/web", 2_500)])
            .expect("valid");
        assert_eq!(generation, GENERATION + 2);
        assert_eq!(
            server.ingest.generation_confirmed(generation),
            Confirmation {
                confirmed: 0,
                connected: 3
            }
        );
        for (envoy, stream) in streams.iter_mut().enumerate() {
            let directive = stream.directive().await;
            assert_eq!(directive.generation, generation);
            assert_eq!(directive.canaries, vec![route("shop/web", 2_500)]);
            let mut confirming = report(&format!("envoy-{envoy}"), 1, 1, vec![]);
            confirming.applied_generation = generation;
            stream.report(confirming).await;
            assert_eq!(
                server.ingest.generation_confirmed(generation),
                Confirmation {
                    confirmed: envoy + 1,
                    connected: 3
                }
            );
        }
        assert!(server.ingest.generation_confirmed(generation).all());
        assert_eq!(
            server.ingest.generation_confirmed(generation + 1).confirmed,
            0
        );
        assert_eq!(
            *server.ingest.directive(),
            Directive {
                generation,
                canaries: vec![route("shop/web", 2_500)]
            }
        );

        drop(streams.pop());
        eventually(|| server.ingest.generation_confirmed(generation).connected == 2).await;
        // shop/api left the directive; reports for it are still accepted during the grace period.
        let late = stats("shop/api", Version::Primary, &samples(1, 4), 0);
        let ack = streams[0].report(report("envoy-0", 1, 2, vec![late])).await;
        assert_eq!(ack.sequence, 2);
        assert_eq!(server.window("shop/api", Version::Primary).requests, 4);
    })
    .await;
}

#[tokio::test]
async fn an_idle_stream_gets_the_directive_again_before_the_filter_grace_period() {
    bounded(async {
        let keepalive = Duration::from_millis(200);
        let server = Server::start(IngestConfig {
            keepalive,
            ..config()
        })
        .await;
        let mut stream = server.connect().await;
        let (first, _) = stream.hello("envoy", 1).await;
        let quiet_since = Instant::now();
        for _ in 0..3 {
            assert_eq!(stream.directive().await, first);
        }
        let elapsed = quiet_since.elapsed();
        assert!(
            elapsed >= keepalive * 3 - Duration::from_millis(30),
            "{elapsed:?}"
        );
        assert!(elapsed < Duration::from_secs(5), "{elapsed:?}");
    })
    .await;
}

#[tokio::test]
async fn shutdown_ends_open_streams_with_unavailable_and_the_server_stops() {
    bounded(async {
        let mut server = Server::start(config()).await;
        let mut stream = server.connect().await;
        stream.hello("envoy", 1).await;
        drop(server.stop.take());
        assert_eq!(stream.status().await.code(), Code::Unavailable);
        let served = server.served.take().expect("served");
        served.finished().await.expect("clean shutdown");
        assert!(TelemetryClient::connect(format!("http://{}", server.addr))
            .await
            .is_err());
    })
    .await;
}

#[test]
fn windows_expire_with_explicit_time_through_the_public_api() {
    let ingest = Ingest::try_new(IngestConfig {
        retention: Duration::from_secs(60),
        ..config()
    })
    .unwrap();
    ingest.publish(vec![route("shop/web", 100)]).unwrap();
    let t0 = Instant::now();
    let s = Duration::from_secs;
    for seq in 1..=30u64 {
        let report = report(
            "envoy",
            1,
            seq,
            vec![stats("shop/web", Version::Canary, &[1_000], 0)],
        );
        let ingested = ingest.ingest(&report, t0 + s(seq)).unwrap();
        assert_eq!(ingested.outcome, Outcome::Applied);
    }
    assert_eq!(
        ingest
            .window("shop/web", Version::Canary, s(10), t0 + s(30))
            .unwrap()
            .requests,
        10
    );
    assert_eq!(
        ingest
            .window("shop/web", Version::Canary, s(60), t0 + s(30))
            .unwrap()
            .requests,
        30
    );
    assert_eq!(
        ingest
            .window("shop/web", Version::Canary, s(3600), t0 + s(80))
            .unwrap()
            .requests,
        10
    );
    assert_eq!(ingest.footprint().0, 30);
    ingest.sweep(t0 + s(80));
    assert_eq!(ingest.footprint().0, 10);
    ingest.sweep(t0 + s(200));
    assert_eq!(ingest.footprint(), (0, 0));
    assert_eq!(
        ingest
            .window("shop/web", Version::Canary, s(60), t0 + s(200))
            .unwrap(),
        VersionWindow::default()
    );
}

#[test]
fn totals_count_everything_ever_applied_and_outlive_the_windows() {
    let ingest = Ingest::try_new(IngestConfig {
        retention: Duration::from_secs(60),
        ..config()
    })
    .unwrap();
    ingest.publish(vec![route("shop/web", 100)]).unwrap();
    let t0 = Instant::now();
    let s = Duration::from_secs;
    for seq in 1..=30u64 {
        let report = report(
            "envoy",
            1,
            seq,
            vec![
                stats("shop/web", Version::Canary, &[1_000, 2_000], 1),
                stats("shop/web", Version::Primary, &[1_000; 3], 0),
            ],
        );
        ingest.ingest(&report, t0 + s(seq * 4)).unwrap();
    }
    // A duplicate is not counted again.
    let again = report(
        "envoy",
        1,
        30,
        vec![stats("shop/web", Version::Canary, &[1_000, 2_000], 1)],
    );
    assert_eq!(
        ingest.ingest(&again, t0 + s(121)).unwrap().outcome,
        Outcome::Duplicate
    );
    ingest.sweep(t0 + s(200));
    assert_eq!(
        ingest.totals("shop/web", Version::Canary),
        Some(Totals {
            requests: 60,
            failures: 30
        })
    );
    assert_eq!(
        ingest.totals("shop/web", Version::Primary),
        Some(Totals {
            requests: 90,
            failures: 0
        })
    );
    assert_eq!(ingest.totals("shop/other", Version::Canary), None);
}

#[test]
fn configurations_that_cannot_work_are_refused() {
    for bad in [
        IngestConfig {
            bucket_width: Duration::ZERO,
            ..config()
        },
        IngestConfig {
            retention: Duration::from_millis(10),
            ..config()
        },
        IngestConfig {
            keepalive: Duration::ZERO,
            ..config()
        },
        IngestConfig {
            max_entries_per_report: 0,
            ..config()
        },
    ] {
        assert!(matches!(Ingest::try_new(bad), Err(IngestError::Config(_))));
    }
    assert!(IngestConfig::default().initial_generation > 1_700_000_000_000);
}

#[test]
fn reject_reasons_are_listed_in_declaration_order() {
    for (position, reason) in RejectReason::ALL.iter().enumerate() {
        assert_eq!(*reason as usize, position, "{reason}");
    }
}

#[test]
fn the_counters_render_as_prometheus_text_with_every_refusal_reason() {
    let ingest = Ingest::try_new(IngestConfig::default()).unwrap();
    let text = ingest.counters().render_prometheus();
    for reason in RejectReason::ALL {
        assert!(
            text.contains(&format!(
                "weir_reports_rejected_total{{reason=\"{reason}\"}} 0"
            )),
            "{reason}: {text}"
        );
    }
    assert!(text.contains("# TYPE weir_requests_applied_total counter"));
}

fn spiffe(namespace: &str, account: &str) -> PeerIdentity {
    PeerIdentity::Spiffe(SpiffeId {
        trust_domain: "cluster.local".into(),
        namespace: namespace.into(),
        service_account: account.into(),
    })
}

#[test]
fn a_relay_node_id_counts_only_from_the_controllers_own_identity_which_may_speak_for_any_canary() {
    let ingest = Ingest::try_new(config()).unwrap();
    ingest.publish(vec![route("shop/web", 500)]).unwrap();
    let now = Instant::now();
    let relay_report = |sequence| {
        let mut r = report(
            "relay~weir-1",
            9,
            sequence,
            if sequence == 0 {
                vec![]
            } else {
                vec![stats("shop/web", Version::Canary, &samples(3, 40), 1)]
            },
        );
        r.reporter.as_mut().unwrap().namespace = String::new();
        r
    };
    // Without a known controller identity, no certificate makes a relay.
    let workload = spiffe("shop", "gateway");
    let refused = ingest
        .ingest_from(&relay_report(0), &workload, now)
        .unwrap_err();
    assert_eq!(refused.reason, RejectReason::NotAReplica);
    assert_eq!(refused.status().code(), Code::PermissionDenied);
    assert!(
        refused.message.contains("reserved for the controller"),
        "{refused}"
    );

    let controller = spiffe("weir-system", "weir");
    ingest.set_replica_identity(SpiffeId {
        trust_domain: "cluster.local".into(),
        namespace: "weir-system".into(),
        service_account: "weir".into(),
    });
    // The canary's own namespace, as a relay: still refused, and nothing was recorded.
    assert_eq!(
        ingest
            .ingest_from(&relay_report(1), &workload, now)
            .unwrap_err()
            .reason,
        RejectReason::NotAReplica
    );
    assert_eq!(ingest.known_reporters(), 0);
    // The controller's own identity: a relay, allowed for a canary of another namespace.
    assert_eq!(
        ingest
            .ingest_from(&relay_report(0), &controller, now)
            .unwrap()
            .outcome,
        Outcome::Hello
    );
    let applied = ingest
        .ingest_from(&relay_report(1), &controller, now)
        .unwrap();
    assert_eq!(applied.outcome, Outcome::Applied);
    assert_eq!(
        ingest
            .window("shop/web", Version::Canary, LONG_AGO, now)
            .unwrap()
            .requests,
        40
    );
    // The same identity with an Envoy's node id is held to the ordinary rules.
    let mut plain = relay_report(1);
    plain.reporter.as_mut().unwrap().node_id = "weir-envoy".into();
    ingest
        .ingest_from(&relay_report(0), &controller, now)
        .unwrap();
    let mut hello = plain.clone();
    hello.sequence = 0;
    hello.stats.clear();
    ingest.ingest_from(&hello, &controller, now).unwrap();
    assert!(matches!(
        ingest
            .ingest_from(&plain, &controller, now)
            .unwrap()
            .outcome,
        Outcome::Dropped(Rejection {
            reason: RejectReason::NotAllowed,
            ..
        })
    ));
}

#[test]
fn a_relay_publishes_nothing_and_passes_the_leaders_directive_down_with_its_generation() {
    let ingest = Ingest::try_new(IngestConfig {
        relay: Some(RelayConfig::new("127.0.0.1:1", "r")),
        ..config()
    })
    .unwrap();
    assert_eq!(ingest.directive().generation, 0);
    assert_eq!(
        ingest.publish(vec![route("shop/web", 1)]),
        Err(PublishError::Relay)
    );
    let leaders = Directive {
        generation: 77,
        canaries: vec![route("shop/web", 2_000)],
    };
    assert!(ingest.republish(leaders.clone()).unwrap());
    assert!(
        !ingest.republish(leaders.clone()).unwrap(),
        "same generation"
    );
    assert_eq!(*ingest.directive(), leaders);
    // A new leader's generation may be lower: it is the one in force.
    let next = Directive {
        generation: 5,
        canaries: vec![],
    };
    assert!(ingest.republish(next.clone()).unwrap());
    assert_eq!(*ingest.directive(), next);
}
