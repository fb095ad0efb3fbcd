//! What the hostile-client tests need: the real controller ingest in its own process
//! (`weir ingest-server`, the production ingest with the limits a test tightens), its memory as
//! the kernel sees it, and clients that break the rules on purpose: raw HTTP/2 streams that send
//! any bytes and read nothing, and hand-written HTTP/2 frames that ignore the server's settings.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use bytes::Bytes;
use prost::Message;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::net::TcpStream;
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use weir_proto::v1::{controller_message::Kind, Report, Version};

use crate::local::weir_binary;
use crate::reporter::{channel, successes, Dial, TestReporter};

/// The canary `weir ingest-server` routes (its first synthetic one).
pub const CANARY: &str = "bench/c0";

/// `weir ingest-server` in its own process, killed when dropped.
pub struct IngestProcess {
    child: Child,
    stdin: ChildStdin,
    stdout: Lines<BufReader<ChildStdout>>,
    /// Where it listens (127.0.0.1).
    pub addr: SocketAddr,
    /// Its pid, for /proc.
    pub pid: u32,
}

/// A process's memory, from `/proc/<pid>/status`, in KiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Memory {
    /// Resident now (VmRSS).
    pub rss_kib: u64,
    /// The most it was ever resident (VmHWM).
    pub peak_kib: u64,
}

impl Memory {
    /// Resident now, MiB.
    pub fn rss_mib(&self) -> f64 {
        self.rss_kib as f64 / 1024.0
    }

    /// The peak, MiB.
    pub fn peak_mib(&self) -> f64 {
        self.peak_kib as f64 / 1024.0
    }
}

impl IngestProcess {
    /// Starts `weir ingest-server` on 127.0.0.1 with `args` (its limit flags) and waits for its
    /// address.
    pub async fn start(args: &[&str]) -> anyhow::Result<Self> {
        Self::start_on("127.0.0.1:0", args).await
    }

    /// [`IngestProcess::start`] on `listen` (an address another one used: a successor).
    pub async fn start_on(listen: &str, args: &[&str]) -> anyhow::Result<Self> {
        let binary = weir_binary();
        let mut child = Command::new(&binary)
            .args(["ingest-server", "--listen", listen])
            .args(args)
            .env("RUST_LOG", "error")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot run {}", binary.display()))?;
        let pid = child
            .id()
            .ok_or_else(|| anyhow!("the controller exited at once"))?;
        let stdin = child.stdin.take().ok_or_else(|| anyhow!("no stdin pipe"))?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| anyhow!("no stdout pipe"))?;
        let mut stdout = BufReader::new(stdout).lines();
        let first = tokio::time::timeout(Duration::from_secs(20), stdout.next_line())
            .await
            .context("`weir ingest-server` printed no address within 20 s")??
            .ok_or_else(|| {
                anyhow!(
                    "`{} ingest-server {}` exited without printing its address (a `weir` built \
                     before these flags? rebuild it with `cargo build -p weir-controller`)",
                    binary.display(),
                    args.join(" ")
                )
            })?;
        let addr = first
            .trim()
            .parse()
            .with_context(|| format!("`weir ingest-server` printed {first:?}, not an address"))?;
        Ok(Self {
            child,
            stdin,
            stdout,
            addr,
            pid,
        })
    }

    /// Its memory now.
    pub fn memory(&self) -> anyhow::Result<Memory> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid))
            .with_context(|| format!("the controller (pid {}) is gone", self.pid))?;
        let field = |name: &str| -> anyhow::Result<u64> {
            status
                .lines()
                .find_map(|line| line.strip_prefix(name))
                .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
                .ok_or_else(|| anyhow!("no {name} in /proc/{}/status", self.pid))
        };
        Ok(Memory {
            rss_kib: field("VmRSS:")?,
            peak_kib: field("VmHWM:")?,
        })
    }

    /// The ingest's counters: metric name (with labels) → value.
    pub async fn counters(&mut self) -> anyhow::Result<HashMap<String, u64>> {
        read_counters(&mut self.stdin, &mut self.stdout).await
    }

    /// One line of its stdin protocol, and the line it answers.
    async fn ask(&mut self, line: &str) -> anyhow::Result<String> {
        self.stdin.write_all(format!("{line}\n").as_bytes()).await?;
        self.stdin.flush().await?;
        tokio::time::timeout(Duration::from_secs(10), self.stdout.next_line())
            .await
            .with_context(|| format!("the controller did not answer `{line}` within 10 s"))??
            .ok_or_else(|| anyhow!("the controller exited instead of answering `{line}`"))
    }

    /// Publishes every canary at `weight_bp`; returns the new generation.
    pub async fn publish(&mut self, weight_bp: u32) -> anyhow::Result<u64> {
        let answer = self.ask(&format!("publish {weight_bp}")).await?;
        answer
            .strip_prefix("generation ")
            .and_then(|g| g.trim().parse().ok())
            .ok_or_else(|| anyhow!("`publish` answered {answer:?}"))
    }

    /// The requests and failures of `canary`'s windows (primary, canary), its whole retention.
    pub async fn window(&mut self, canary: &str) -> anyhow::Result<[(u64, u64); 2]> {
        read_window(&mut self.stdin, &mut self.stdout, canary).await
    }

    /// One counter (0 when absent).
    pub async fn counter(&mut self, name: &str) -> anyhow::Result<u64> {
        Ok(self.counters().await?.get(name).copied().unwrap_or(0))
    }

    /// Kills it at once (SIGKILL), as a crash or a lost node would.
    pub async fn kill(mut self) -> anyhow::Result<()> {
        self.child.kill().await?;
        Ok(())
    }

    /// Reports refused for `reason` (the `weir_reports_rejected_total` label).
    pub async fn rejected(&mut self, reason: &str) -> anyhow::Result<u64> {
        let counters = self.counters().await?;
        Ok(counters
            .get(&format!(
                "weir_reports_rejected_total{{reason=\"{reason}\"}}"
            ))
            .copied()
            .unwrap_or(0))
    }

    /// Whether the process still runs.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Stops it (closing stdin ends it; killed if that takes long).
    pub async fn stop(mut self) {
        drop(self.stdin);
        if tokio::time::timeout(Duration::from_secs(5), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}

/// A reporter that plays by the rules: opens a stream, says hello, sends one report of
/// `requests` canary successes and waits for its ack. Err says how it was not served.
pub async fn legitimate_report(
    addr: SocketAddr,
    node_id: &str,
    epoch: u64,
    sequence: u64,
    requests: u64,
) -> anyhow::Result<()> {
    let mut reporter = TestReporter::open(channel(addr, &Dial::Plain).await?)
        .await
        .map_err(|s| anyhow!("the stream was refused: {s}"))?;
    reporter
        .send(successes(node_id, "", epoch, 0, CANARY, Version::Canary, 0))
        .await?;
    reporter
        .send(successes(
            node_id,
            "",
            epoch,
            sequence,
            CANARY,
            Version::Canary,
            requests,
        ))
        .await?;
    loop {
        let message = reporter
            .next()
            .await
            .map_err(|s| anyhow!("no ack for report {sequence}: {s}"))?;
        if let Some(Kind::Ack(ack)) = message.kind {
            if ack.sequence >= sequence {
                return Ok(());
            }
        }
    }
}

/// `message` as a gRPC length-prefixed frame.
pub fn grpc_frame(message: &Report) -> Bytes {
    let body = message.encode_to_vec();
    grpc_prefixed(&body)
}

/// `body` behind a gRPC length prefix (uncompressed).
pub fn grpc_prefixed(body: &[u8]) -> Bytes {
    let mut framed = Vec::with_capacity(body.len() + 5);
    framed.push(0);
    framed.extend_from_slice(&u32::try_from(body.len()).unwrap_or(u32::MAX).to_be_bytes());
    framed.extend_from_slice(body);
    Bytes::from(framed)
}

/// An HTTP/2 connection of the h2 crate's client, granting the server `window` bytes per
/// stream (0: the server can send no data at all, like a client that never reads).
pub async fn h2_connection(
    addr: SocketAddr,
    window: u32,
) -> anyhow::Result<h2::client::SendRequest<Bytes>> {
    let tcp = TcpStream::connect(addr).await?;
    let (send, connection) = h2::client::Builder::new()
        .initial_window_size(window)
        .handshake::<_, Bytes>(tcp)
        .await?;
    // The connection task answers the server's pings and settings; it ends with the connection.
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(send)
}

/// Opens an `Exchange` stream on `connection`; the caller sends whatever bytes it likes.
pub async fn h2_exchange(
    connection: &mut h2::client::SendRequest<Bytes>,
) -> anyhow::Result<(h2::SendStream<Bytes>, h2::client::ResponseFuture)> {
    let ready = connection.clone().ready().await?;
    *connection = ready;
    let request = http::Request::post("http://127.0.0.1/weir.v1.Telemetry/Exchange")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())?;
    let (response, stream) = connection.send_request(request, false)?;
    Ok((stream, response))
}

/// HTTP/2 written by hand, for a client that does what h2's client never would (open more
/// streams than the server allows).
pub mod frames {
    /// The client connection preface.
    pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    /// Frame types.
    pub const DATA: u8 = 0;
    /// HEADERS.
    pub const HEADERS: u8 = 1;
    /// RST_STREAM.
    pub const RST_STREAM: u8 = 3;
    /// SETTINGS.
    pub const SETTINGS: u8 = 4;
    /// GOAWAY.
    pub const GOAWAY: u8 = 7;
    /// END_HEADERS flag.
    pub const END_HEADERS: u8 = 4;
    /// RST_STREAM's REFUSED_STREAM code.
    pub const REFUSED_STREAM: u32 = 7;

    /// One frame.
    pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = u32::try_from(payload.len())
            .unwrap_or(u32::MAX)
            .to_be_bytes();
        let mut out = vec![len[1], len[2], len[3], kind, flags];
        out.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
        out.extend_from_slice(payload);
        out
    }

    /// A HEADERS block of literal fields (HPACK "literal without indexing, new name", no
    /// Huffman coding), each name and value under 128 bytes.
    pub fn headers(fields: &[(&str, &str)]) -> Vec<u8> {
        let mut block = Vec::new();
        for (name, value) in fields {
            block.push(0);
            block.push(name.len() as u8);
            block.extend_from_slice(name.as_bytes());
            block.push(value.len() as u8);
            block.extend_from_slice(value.as_bytes());
        }
        block
    }

    /// The request headers of an `Exchange` call.
    pub fn exchange_headers() -> Vec<u8> {
        headers(&[
            (":method", "POST"),
            (":scheme", "http"),
            (":path", "/weir.v1.Telemetry/Exchange"),
            (":authority", "127.0.0.1"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ])
    }

    /// Splits `bytes` into complete frames (type, flags, stream, payload); the incomplete rest
    /// stays in `bytes`.
    pub fn parse(bytes: &mut Vec<u8>) -> Vec<(u8, u8, u32, Vec<u8>)> {
        let mut frames = Vec::new();
        loop {
            if bytes.len() < 9 {
                return frames;
            }
            let len =
                usize::from(bytes[0]) << 16 | usize::from(bytes[1]) << 8 | usize::from(bytes[2]);
            if bytes.len() < 9 + len {
                return frames;
            }
            let stream = u32::from_be_bytes([bytes[5], bytes[6], bytes[7], bytes[8]]) & 0x7fff_ffff;
            let payload = bytes[9..9 + len].to_vec();
            frames.push((bytes[3], bytes[4], stream, payload));
            bytes.drain(..9 + len);
        }
    }
}

/// Fails unless `condition` holds within `limit`, checking every 100 ms.
pub async fn eventually(
    what: &str,
    limit: Duration,
    mut condition: impl FnMut() -> bool,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + limit;
    while !condition() {
        if tokio::time::Instant::now() >= deadline {
            bail!("{what}: not within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// Asks a `weir ingest-server` on its stdin for `window <canary>` and reads the answer: the
/// requests and failures of the canary's windows (primary, canary) over its whole retention.
pub async fn read_window(
    stdin: &mut ChildStdin,
    stdout: &mut Lines<BufReader<ChildStdout>>,
    canary: &str,
) -> anyhow::Result<[(u64, u64); 2]> {
    stdin
        .write_all(format!("window {canary}\n").as_bytes())
        .await?;
    stdin.flush().await?;
    let answer = tokio::time::timeout(Duration::from_secs(10), stdout.next_line())
        .await
        .with_context(|| format!("the controller did not answer `window {canary}` within 10 s"))??
        .ok_or_else(|| anyhow!("the controller exited instead of answering `window {canary}`"))?;
    let numbers: Vec<u64> = answer
        .split_whitespace()
        .filter_map(|word| word.parse().ok())
        .collect();
    match numbers.as_slice() {
        [pr, pf, cr, cf] => Ok([(*pr, *pf), (*cr, *cf)]),
        _ => bail!("`window {canary}` answered {answer:?}"),
    }
}

/// Asks a `weir ingest-server` on `stdin` for its counters and reads them from `stdout` until
/// its `end` line: metric name (with labels) → value.
pub async fn read_counters(
    stdin: &mut ChildStdin,
    stdout: &mut Lines<BufReader<ChildStdout>>,
) -> anyhow::Result<HashMap<String, u64>> {
    stdin.write_all(b"counters\n").await?;
    stdin.flush().await?;
    let mut counters = HashMap::new();
    loop {
        let line = tokio::time::timeout(Duration::from_secs(10), stdout.next_line())
            .await
            .context("the controller did not print its counters within 10 s")??
            .ok_or_else(|| anyhow!("the controller exited while printing its counters"))?;
        if line == "end" {
            return Ok(counters);
        }
        if line.starts_with('#') {
            continue;
        }
        if let Some((name, value)) = line.rsplit_once(' ') {
            counters.insert(name.to_owned(), value.parse().unwrap_or(0));
        }
    }
}
