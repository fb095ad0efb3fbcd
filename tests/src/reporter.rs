//! A reporter of the tests' own: a weir.v1 client over gRPC (plaintext or mTLS with a given
//! certificate), which sends whatever reports a test hands it. For playing a hostile or a second
//! reporter against the real controller.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use tonic::{Status, Streaming};
use weir_proto::v1::telemetry_client::TelemetryClient;
use weir_proto::v1::{ControllerMessage, Report};
use weir_proto::LatencyHistogram;

use crate::certs::{Pem, CONTROLLER_HOST};

/// How the reporter reaches the controller.
#[derive(Debug, Clone)]
pub enum Dial {
    /// Plaintext.
    Plain,
    /// TLS, verifying the controller against `root`, presenting `identity` (or no certificate).
    Tls {
        /// The mesh's root (PEM file).
        root: std::path::PathBuf,
        /// The certificate to present.
        identity: Option<Pem>,
    },
}

/// One open `Exchange` stream.
pub struct TestReporter {
    tx: mpsc::Sender<Report>,
    inbound: Streaming<ControllerMessage>,
}

/// Opens a channel to `addr`.
pub async fn channel(addr: SocketAddr, dial: &Dial) -> anyhow::Result<Channel> {
    let endpoint = match dial {
        Dial::Plain => Channel::from_shared(format!("http://{addr}"))?,
        Dial::Tls { root, identity } => {
            let mut tls = ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(std::fs::read(root)?))
                .domain_name(CONTROLLER_HOST);
            if let Some(pem) = identity {
                tls = tls.identity(Identity::from_pem(
                    std::fs::read(&pem.cert)?,
                    std::fs::read(&pem.key)?,
                ));
            }
            Channel::from_shared(format!("https://{addr}"))?.tls_config(tls)?
        }
    };
    endpoint
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .with_context(|| format!("cannot connect to the controller at {addr}"))
}

impl TestReporter {
    /// Opens a stream on `channel`; the controller's refusal comes back as the error.
    pub async fn open(channel: Channel) -> Result<Self, Status> {
        let (tx, rx) = mpsc::channel(16);
        let mut client = TelemetryClient::new(channel);
        let inbound = client.exchange(ReceiverStream::new(rx)).await?.into_inner();
        Ok(Self { tx, inbound })
    }

    /// Sends one report.
    pub async fn send(&self, report: Report) -> anyhow::Result<()> {
        self.tx
            .send(report)
            .await
            .map_err(|_| anyhow::anyhow!("the stream is closed"))
    }

    /// The next message from the controller (within 5 s), or the status that ended the stream.
    pub async fn next(&mut self) -> Result<ControllerMessage, Status> {
        match tokio::time::timeout(Duration::from_secs(5), self.inbound.message()).await {
            Ok(Ok(Some(message))) => Ok(message),
            Ok(Ok(None)) => Err(Status::cancelled("the stream ended without a status")),
            Ok(Err(status)) => Err(status),
            Err(_) => Err(Status::deadline_exceeded(
                "no message from the controller within 5s",
            )),
        }
    }
}

/// A report of `requests` successes (none failed, 1 ms each) for `canary`'s `version`.
pub fn successes(
    node_id: &str,
    namespace: &str,
    epoch: u64,
    sequence: u64,
    canary: &str,
    version: weir_proto::v1::Version,
    requests: u64,
) -> Report {
    let mut latency = LatencyHistogram::new();
    for _ in 0..requests.min(100_000) {
        latency.record(1_000);
    }
    let stats = if requests == 0 {
        Vec::new()
    } else {
        vec![weir_proto::v1::VersionStats {
            canary: canary.to_owned(),
            version: version as i32,
            requests,
            failures: 0,
            latency: Some(latency.encode()),
        }]
    };
    Report {
        reporter: Some(weir_proto::v1::Reporter {
            node_id: node_id.to_owned(),
            namespace: namespace.to_owned(),
            workload: "forger".to_owned(),
        }),
        epoch,
        sequence,
        applied_generation: u64::MAX,
        stats,
    }
}
