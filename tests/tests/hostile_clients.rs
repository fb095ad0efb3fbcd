//! Hostile clients against the real controller ingest (`weir ingest-server`, the production
//! ingest in its own process, on 127.0.0.1): one test per limit of issue 10's item 5. Each
//! attacks with what the limit is there for, then checks two things: the controller's memory
//! (VmHWM / VmRSS of its process) stays under the bound docs/security.md derives for that
//! attack, and a reporter that plays by the rules is still served (its report acked, its
//! numbers exact) during or right after the attack.
//!
//! The bounds are growth over the controller's resident memory before the attack, from the
//! terms of docs/security.md ("Worst-case memory"): M the message limit (1 MiB), B the budget
//! for reports in transit, W_c the HTTP/2 connection window (256 KiB), S the streams per
//! connection (4), and a per-connection cost of at most C = 1 MiB (TLS, HTTP/2 state,
//! HPACK tables, send buffers; measured far below). Slack for the allocator is added where said.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use prost::Message as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use weir_e2e::hostile::{
    frames, grpc_frame, grpc_prefixed, h2_connection, h2_exchange, legitimate_report,
    IngestProcess, Memory,
};
use weir_e2e::reporter::{channel, successes, Dial, TestReporter};
use weir_proto::v1::{Histogram, Report, Reporter, VersionStats};

const MIB: u64 = 1024;
/// The per-connection cost C of the bounds, KiB.
const PER_CONNECTION_KIB: u64 = MIB;
/// What an idle connection holds (its state, TLS included), KiB: docs/security.md.
const IDLE_CONNECTION_KIB: u64 = 64;
/// Room for the allocator and the runtime's own growth during a test, KiB.
const SLACK_KIB: u64 = 16 * MIB;

// gRPC status codes.
const INVALID_ARGUMENT: i32 = 3;
const RESOURCE_EXHAUSTED: i32 = 8;
const OUT_OF_RANGE: i32 = 11;

async fn bounded<T>(limit: Duration, body: impl Future<Output = anyhow::Result<T>>) -> T {
    match tokio::time::timeout(limit, body).await {
        Ok(Ok(value)) => value,
        Ok(Err(e)) => panic!("{e:#}"),
        Err(_) => panic!("the test did not finish within {limit:?}"),
    }
}

/// Asserts `after` grew at most `bound_kib` over `before` (peak or resident), and says so.
fn assert_memory(test: &str, before: Memory, after: Memory, bound_kib: u64, peak: bool) {
    let (was, is) = if peak {
        (before.rss_kib, after.peak_kib)
    } else {
        (before.rss_kib, after.rss_kib)
    };
    let growth = is.saturating_sub(was);
    eprintln!(
        "{test}: controller RSS before {:.1} MiB; after: VmRSS {:.1} MiB, VmHWM {:.1} MiB; {} growth {:.1} MiB, bound {:.1} MiB",
        before.rss_mib(),
        after.rss_mib(),
        after.peak_mib(),
        if peak { "peak" } else { "resident" },
        growth as f64 / 1024.0,
        bound_kib as f64 / 1024.0
    );
    assert!(
        growth <= bound_kib,
        "{test}: the controller grew by {:.1} MiB ({}), more than the {:.1} MiB docs/security.md allows for this attack",
        growth as f64 / 1024.0,
        if peak { "VmHWM" } else { "VmRSS" },
        bound_kib as f64 / 1024.0
    );
}

/// The gRPC status that ends an h2 stream (from trailers-only headers or the trailers).
async fn grpc_status(response: h2::client::ResponseFuture) -> anyhow::Result<(i32, String)> {
    let response = tokio::time::timeout(Duration::from_secs(10), response).await??;
    let read = |headers: &http::HeaderMap| {
        let code = headers.get("grpc-status")?.to_str().ok()?.parse().ok()?;
        let message = percent_decoded(
            headers
                .get("grpc-message")
                .and_then(|m| m.to_str().ok())
                .unwrap_or(""),
        );
        Some((code, message))
    };
    if let Some(status) = read(response.headers()) {
        return Ok(status);
    }
    let mut body = response.into_body();
    while let Some(chunk) = tokio::time::timeout(Duration::from_secs(10), body.data()).await? {
        let chunk = chunk?;
        let _ = body.flow_control().release_capacity(chunk.len());
    }
    let trailers = body
        .trailers()
        .await?
        .ok_or_else(|| anyhow::anyhow!("the stream ended without trailers"))?;
    read(&trailers).ok_or_else(|| anyhow::anyhow!("no grpc-status in {trailers:?}"))
}

/// grpc-message is percent-encoded.
fn percent_decoded(text: &str) -> String {
    let mut bytes = Vec::with_capacity(text.len());
    let mut rest = text.as_bytes();
    while let Some((&first, tail)) = rest.split_first() {
        let hex = tail
            .get(..2)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (first, hex) {
            (b'%', Some(byte)) => {
                bytes.push(byte);
                rest = &tail[2..];
            }
            _ => {
                bytes.push(first);
                rest = tail;
            }
        }
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

fn reporter(node_id: &str) -> Option<Reporter> {
    Some(Reporter {
        node_id: node_id.to_owned(),
        ..Default::default()
    })
}

/// The legitimate reporter's requests, in all, must be exactly what the controller applied.
async fn assert_exact(controller: &mut IngestProcess, requests: u64) -> anyhow::Result<()> {
    let counters = controller.counters().await?;
    let applied = counters
        .get("weir_requests_applied_total")
        .copied()
        .unwrap_or(0);
    anyhow::ensure!(
        applied == requests,
        "the controller applied {applied} requests; the legitimate reporter sent {requests} and the attackers none"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_and_amplifying_reports_are_refused_before_they_cost_memory() {
    bounded(Duration::from_secs(60), async {
        let mut controller = IngestProcess::start(&[]).await?;
        legitimate_report(controller.addr, "legit", 1, 1, 100).await?;
        let before = controller.memory()?;

        // 8 connections × 4 streams. Half announce the 4 MB report (and send 256 KiB of
        // it); half send a report of 400,000 empty stats entries: 800 KB on the wire, about
        // 30 MB decoded, so it must be refused on the wire (weir.v1 allows 1024 entries).
        let amplifying = grpc_frame(&Report {
            reporter: reporter("amplifier"),
            stats: vec![VersionStats::default(); 400_000],
            ..Default::default()
        });
        let mut oversized = vec![0u8];
        oversized.extend_from_slice(&4_000_000u32.to_be_bytes());
        oversized.extend(std::iter::repeat_n(0u8, 256 * 1024));
        let oversized = Bytes::from(oversized);
        let mut attacks = Vec::new();
        for connection in 0..8 {
            let mut h2 = h2_connection(controller.addr, 1 << 20).await?;
            for stream in 0..4 {
                let (mut send, response) = h2_exchange(&mut h2).await?;
                let payload = if (connection + stream) % 2 == 0 {
                    oversized.clone()
                } else {
                    amplifying.clone()
                };
                send.send_data(payload, false)?;
                attacks.push(tokio::spawn(async move {
                    let status = grpc_status(response).await;
                    drop(send);
                    status
                }));
            }
        }
        let (mut out_of_range, mut invalid) = (0, 0);
        for attack in attacks {
            match attack.await?? {
                (OUT_OF_RANGE, _) => out_of_range += 1,
                (INVALID_ARGUMENT, message) => {
                    assert!(message.contains("at most 1024"), "{message}");
                    invalid += 1;
                }
                other => anyhow::bail!("an attacking stream ended with {other:?}"),
            }
        }
        assert_eq!((out_of_range, invalid), (16, 16));
        assert_eq!(controller.rejected("oversized").await?, 16);
        assert_eq!(controller.rejected("malformed").await?, 16);

        // Nothing was decoded: what tonic buffered (16 × 800 KB in transit, 16 × a prefix)
        // and eight connections.
        let after = controller.memory()?;
        assert_memory(
            "oversized_and_amplifying",
            before,
            after,
            16 * MIB + 8 * PER_CONNECTION_KIB + SLACK_KIB,
            true,
        );
        legitimate_report(controller.addr, "legit", 1, 2, 100).await?;
        assert_exact(&mut controller, 200).await?;
        controller.stop().await;
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_node_ids_and_hellos_with_distinct_node_ids_leave_the_ledger_bounded() {
    bounded(Duration::from_secs(60), async {
        const MAX_REPORTERS: u64 = 200;
        let mut controller =
            IngestProcess::start(&["--max-reporters", &MAX_REPORTERS.to_string()]).await?;
        // The legitimate Envoy is known before the attack; a full ledger must not evict it.
        legitimate_report(controller.addr, "legit", 1, 1, 100).await?;
        let before = controller.memory()?;
        let channel = channel(controller.addr, &Dial::Plain).await?;

        // 150 hellos with 1 MB node ids (the issue's: 145 MB that never went away).
        let huge = "n".repeat(1_000_000);
        for epoch in 0..150u64 {
            let mut stream = TestReporter::open(channel.clone())
                .await
                .map_err(|s| anyhow::anyhow!("{s}"))?;
            stream
                .send(successes(
                    &huge,
                    "",
                    epoch,
                    0,
                    "bench/c0",
                    Default::default(),
                    0,
                ))
                .await?;
            let refused = stream.next().await.expect_err("a 1 MB node id is refused");
            assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
        }
        assert_eq!(controller.rejected("bad_node_id").await?, 150);

        // 1,000 hellos with distinct 500-byte node ids, 16 at a time.
        let acked = Arc::new(AtomicU64::new(0));
        let refused = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for task in 0..16u64 {
            let (channel, acked, refused) = (channel.clone(), acked.clone(), refused.clone());
            tasks.push(tokio::spawn(async move {
                for i in 0..1_000u64 / 16 + 1 {
                    let node = format!("{task:04}-{i:04}-{}", "x".repeat(490));
                    // A stream that cannot open on a loaded machine is not a refusal: try again.
                    let mut opened = None;
                    for _ in 0..5 {
                        if let Ok(stream) = TestReporter::open(channel.clone()).await {
                            opened = Some(stream);
                            break;
                        }
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    }
                    let Some(mut stream) = opened else {
                        continue;
                    };
                    let hello = successes(&node, "", 7, 0, "bench/c0", Default::default(), 0);
                    if stream.send(hello).await.is_err() {
                        continue;
                    }
                    loop {
                        match stream.next().await {
                            Ok(message) => {
                                if let Some(weir_proto::v1::controller_message::Kind::Ack(_)) =
                                    message.kind
                                {
                                    acked.fetch_add(1, Ordering::Relaxed);
                                    break;
                                }
                            }
                            Err(status) => {
                                assert_eq!(
                                    status.code(),
                                    tonic::Code::ResourceExhausted,
                                    "{status:?}"
                                );
                                refused.fetch_add(1, Ordering::Relaxed);
                                break;
                            }
                        }
                    }
                }
            }));
        }
        for task in tasks {
            task.await?;
        }
        let (acked, refused) = (
            acked.load(Ordering::Relaxed),
            refused.load(Ordering::Relaxed),
        );
        let counters = controller.counters().await?;
        let known = counters.get("weir_reporters_known").copied().unwrap_or(0);
        eprintln!("distinct node ids: {acked} admitted, {refused} refused, {known} in the ledger");
        assert_eq!(
            acked,
            MAX_REPORTERS - 1,
            "the ledger admits up to its limit"
        );
        assert!(known <= MAX_REPORTERS, "{known} Envoys in the ledger");
        assert_eq!(controller.rejected("too_many_reporters").await?, refused);

        // Resident after the attack: no 1 MB node id kept; the ledger holds 200 short ones.
        let after = controller.memory()?;
        assert_memory(
            "node_ids",
            before,
            after,
            PER_CONNECTION_KIB + SLACK_KIB,
            false,
        );
        // The known Envoy is still served, exactly.
        legitimate_report(controller.addr, "legit", 1, 2, 100).await?;
        assert_exact(&mut controller, 200).await?;
        controller.stop().await;
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_never_read_their_acks_are_stopped_by_back_pressure() {
    bounded(Duration::from_secs(60), async {
        let mut controller = IngestProcess::start(&[]).await?;
        legitimate_report(controller.addr, "legit", 1, 1, 100).await?;
        let before = controller.memory()?;

        // 2 connections × 4 streams that grant the server no window and never read. Each sends
        // a hello, 28 empty reports, then 8 reports whose histogram has 1,000,000 one-byte
        // counts: 1 MB on the wire, 8 MiB decoded, refused as a bad histogram (acked and
        // dropped). A stream's outbound side (the directive and 30 or so acks: the 16-message
        // queue and what hyper takes) fills among those, so its task waits on the ack of an
        // amplifying report: it must not hold that report meanwhile, and reads nothing more.
        const EMPTY: u64 = 28;
        const AMPLIFYING: u64 = 8;
        let entry = Report {
            stats: vec![VersionStats {
                canary: "bench/c0".to_owned(),
                version: 2,
                requests: 1,
                latency: Some(Histogram {
                    counts: vec![1; 1_000_000],
                }),
                ..Default::default()
            }],
            ..Default::default()
        }
        .encode_to_vec();
        let mut held = Vec::new();
        let mut connections = Vec::new();
        for connection in 0..2 {
            let mut h2 = h2_connection(controller.addr, 0).await?;
            for stream in 0..4 {
                let (mut send, response) = h2_exchange(&mut h2).await?;
                let node = format!("stalled-{connection}-{stream}");
                let report = |sequence: u64| Report {
                    reporter: reporter(&node),
                    epoch: 9,
                    sequence,
                    ..Default::default()
                };
                let mut flood = Vec::new();
                for sequence in 0..=EMPTY {
                    flood.extend_from_slice(&grpc_frame(&report(sequence)));
                }
                send.send_data(Bytes::from(flood), false)?;
                for sequence in EMPTY + 1..=EMPTY + AMPLIFYING {
                    // A report's fields may come in any order: the entry goes after the rest.
                    let mut body = report(sequence).encode_to_vec();
                    body.extend_from_slice(&entry);
                    send.send_data(grpc_prefixed(&body), false)?;
                }
                held.push((send, response));
            }
            connections.push(h2);
        }
        // Until the controller stops taking reports in.
        let mut decoded = 0;
        for _ in 0..60 {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let now = controller.rejected("bad_histogram").await?;
            if now == decoded && now > 0 {
                break;
            }
            decoded = now;
        }
        let applied = controller.counters().await?["weir_reports_applied_total"];
        eprintln!(
            "never reading: {applied} empty reports applied, {decoded} of {} amplifying ones decoded before back-pressure stopped the streams",
            8 * AMPLIFYING
        );
        assert_eq!(applied, 1 + 8 * EMPTY, "the stalled streams were served at first");
        assert!(
            decoded >= 8,
            "every stalled stream waits on the ack of an amplifying report ({decoded} decoded)"
        );
        assert!(
            decoded < 8 * AMPLIFYING,
            "a stream that reads nothing is no longer read from ({decoded} decoded)"
        );

        // During the attack: the legitimate reporter is served.
        legitimate_report(controller.addr, "legit", 1, 2, 100).await?;

        // Per stalled stream: the report tonic has in part (at most M, under the budget), its
        // window and what waits towards it (acks: bytes); two connections; and the decoding
        // buffers the allocator keeps after the two runtime threads decoded (2 × 8 M). No
        // decoded report: 8 × 8 MiB if each stalled task held the one it waits to ack.
        let after = controller.memory()?;
        assert_memory(
            "never_reading",
            before,
            after,
            8 * (MIB + 64) + 2 * PER_CONNECTION_KIB + 2 * 8 * MIB + SLACK_KIB,
            false,
        );
        assert_exact(&mut controller, 200).await?;
        drop((held, connections));
        controller.stop().await;
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_that_never_complete_are_held_within_the_buffer_budget() {
    bounded(Duration::from_secs(60), async {
        let budget_mib = 16;
        let budget = (budget_mib * 1024 * 1024).to_string();
        let mut controller =
            IngestProcess::start(&["--max-buffered-bytes", &budget, "--idle-timeout", "3s"])
                .await?;
        legitimate_report(controller.addr, "legit", 1, 1, 100).await?;
        let before = controller.memory()?;

        // 16 connections × 4 streams each send 1,000,000 of a 1,000,001-byte report, and then
        // nothing: 64 MB that tonic would buffer until the report is whole.
        let mut partial = grpc_prefixed(&vec![0u8; 1_000_001]).to_vec();
        partial.truncate(partial.len() - 1);
        let partial = Bytes::from(partial);
        let mut attacks = Vec::new();
        for _ in 0..16 {
            let mut h2 = h2_connection(controller.addr, 1 << 20).await?;
            for _ in 0..4 {
                let (mut send, response) = h2_exchange(&mut h2).await?;
                send.send_data(partial.clone(), false)?;
                attacks.push((send, response));
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        let during = controller.memory()?;
        let full = controller.rejected("buffer_full").await?;
        eprintln!("buffer budget: {full} of 64 never-completing reports refused");
        assert!(
            full >= 64 - budget_mib,
            "at most the budget is held: {full} refused"
        );
        // The budget, plus 16 connections.
        assert_memory(
            "never_completing",
            before,
            during,
            budget_mib * MIB + 16 * PER_CONNECTION_KIB + SLACK_KIB,
            true,
        );

        // The attackers go silent; the idle timeout ends their connections, and the budget is
        // free for the legitimate reporter.
        let mut statuses = Vec::new();
        for (send, response) in attacks {
            statuses.push(tokio::spawn(async move {
                let status = grpc_status(response).await;
                drop(send);
                status
            }));
        }
        for status in statuses {
            // Refused (RESOURCE_EXHAUSTED) or closed by the idle timeout.
            if let Ok((code, message)) = status.await? {
                assert_eq!(code, RESOURCE_EXHAUSTED, "{message}");
            }
        }
        legitimate_report(controller.addr, "legit", 1, 2, 100).await?;
        assert_exact(&mut controller, 200).await?;
        controller.stop().await;
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_capped_and_closed_after_the_idle_timeout() {
    bounded(Duration::from_secs(60), async {
        const MAX: usize = 100;
        let mut controller = IngestProcess::start(&[
            "--max-connections",
            &MAX.to_string(),
            "--idle-timeout",
            "3s",
        ])
        .await?;
        legitimate_report(controller.addr, "legit", 1, 1, 100).await?;
        let before = controller.memory()?;

        // 1,000 TCP connections that send nothing; each task records when the server closed it.
        let started = tokio::time::Instant::now();
        let mut idle = Vec::new();
        for _ in 0..1_000 {
            let mut tcp = TcpStream::connect(controller.addr).await?;
            idle.push(tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                loop {
                    match tcp.read(&mut buf).await {
                        Ok(0) | Err(_) => return tokio::time::Instant::now(),
                        Ok(_) => {}
                    }
                }
            }));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        let open = idle.iter().filter(|task| !task.is_finished()).count();
        let during = controller.memory()?;
        eprintln!("idle connections: {open} of 1000 held open after 1 s (limit {MAX})");
        assert!(
            open <= MAX,
            "{open} idle connections held, the limit is {MAX}"
        );
        assert!(open >= MAX / 2, "the limit admits connections ({open})");
        assert_memory(
            "idle_connections",
            before,
            during,
            MAX as u64 * IDLE_CONNECTION_KIB + SLACK_KIB,
            true,
        );

        // All are closed by the idle timeout (3 s), and then the legitimate reporter is served.
        let mut last = started;
        for task in idle {
            last = last.max(tokio::time::timeout(Duration::from_secs(10), task).await??);
        }
        let held = last - started;
        assert!(
            held < Duration::from_secs(6),
            "the last idle connection was closed after {held:?}"
        );
        legitimate_report(controller.addr, "legit", 1, 2, 100).await?;
        assert_exact(&mut controller, 200).await?;
        controller.stop().await;
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_streams_on_one_connection_are_capped_at_the_stream_limit() {
    bounded(Duration::from_secs(60), async {
        let mut controller = IngestProcess::start(&[]).await?;
        legitimate_report(controller.addr, "legit", 1, 1, 100).await?;
        let before = controller.memory()?;

        // One connection opens 3,000 streams at once, ignoring the server's
        // SETTINGS_MAX_CONCURRENT_STREAMS (h2's client would queue them).
        let mut tcp = TcpStream::connect(controller.addr).await?;
        let mut out = frames::PREFACE.to_vec();
        out.extend(frames::frame(frames::SETTINGS, 0, 0, &[]));
        let headers = frames::exchange_headers();
        for i in 0..3_000u32 {
            out.extend(frames::frame(
                frames::HEADERS,
                frames::END_HEADERS,
                2 * i + 1,
                &headers,
            ));
        }
        tcp.write_all(&out).await?;

        let (mut accepted, mut refused, mut goaway) = (0, 0, false);
        let mut pending = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
        while let Ok(read) = tokio::time::timeout_at(deadline, tcp.read(&mut buf)).await {
            let n = read?;
            if n == 0 {
                break;
            }
            pending.extend_from_slice(&buf[..n]);
            for (kind, flags, stream, payload) in frames::parse(&mut pending) {
                match kind {
                    frames::HEADERS if stream != 0 => accepted += 1,
                    frames::RST_STREAM
                        if payload.get(..4) == Some(&frames::REFUSED_STREAM.to_be_bytes()) =>
                    {
                        refused += 1
                    }
                    frames::GOAWAY => goaway = true,
                    frames::SETTINGS if flags & 1 == 0 => {
                        tcp.write_all(&frames::frame(frames::SETTINGS, 1, 0, &[]))
                            .await?;
                    }
                    _ => {}
                }
            }
        }
        let during = controller.memory()?;
        eprintln!(
            "3000 streams on one connection: {accepted} answered, {refused} refused, goaway {goaway}"
        );
        assert!(accepted <= 4, "{accepted} streams served, the limit is 4");
        assert!(refused > 0 || goaway, "the excess streams are refused");
        // During the attack, a reporter on another connection is served.
        legitimate_report(controller.addr, "legit", 1, 2, 100).await?;
        assert_memory(
            "many_streams",
            before,
            during,
            PER_CONNECTION_KIB + SLACK_KIB,
            true,
        );
        drop(tcp);
        assert_exact(&mut controller, 200).await?;
        controller.stop().await;
        Ok(())
    })
    .await;
}

#[test]
fn the_amplifying_reports_are_what_they_claim() {
    // 400,000 empty entries encode to about 800 KB (under the 1 MiB message limit), and the
    // histogram of 1,000,000 counts to about 1 MB: the attacks above are not refused for size.
    let entries = Report {
        stats: vec![VersionStats::default(); 400_000],
        ..Default::default()
    };
    assert!(entries.encoded_len() < 1024 * 1024 - 5);
    let histogram = Histogram {
        counts: vec![1; 1_000_000],
    };
    assert!(histogram.encoded_len() > 1_000_000 && histogram.encoded_len() < 1024 * 1024 - 200);
}
