//! A replica that serves filters without being the leader: a **relay** (docs/scale.md, section 3).
//!
//! A relay runs the same ingest for its own Envoys (transport, identity, limits, validation, the
//! exactly-once ledger), but what a report carries goes into one pending delta instead of
//! windows: the filter's own reporter state ([`weir_filter::reporter::Reporter`], host-agnostic),
//! which seals it every report interval into a sequenced report, keeps each one until the leader
//! acknowledges it and sends it again, in order, on every new stream. Towards the leader the
//! relay is one reporter of weir.v1 (`node_id = relay~<name>`, an epoch random per process life),
//! so the leader's ledger applies each relay report exactly once; Envoy → relay is exact by the
//! relay's own ledger.
//!
//! Directives go the other way unchanged: each one the leader sends is republished to the
//! relay's Envoys with the same generation. A relay serves Envoys only while it is in contact
//! with the leader: before its first directive it refuses their hellos, and when the leader has
//! been silent for [`RelayConfig::contact_grace`] it ends their streams with `UNAVAILABLE`, so
//! they go to another replica or, failing that, fall back to 100 % primary after their grace
//! period, exactly as with no controller. A relay never keeps stale weights alive.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hash, Hasher};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prost::Message;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};
use tonic::Streaming;
use weir_filter::reporter::{Command, Reporter};
use weir_proto::v1::telemetry_client::TelemetryClient;
use weir_proto::v1::{ControllerMessage, Directive, Report, VersionStats};

use super::counters::lock;
use super::Ingest;

/// Node ids starting with this are relays: the leader accepts them only from a controller
/// replica's own identity.
pub const RELAY_NODE_PREFIX: &str = "relay~";

/// How long one attempt to reach the leader may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How a relay reaches the leader.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayConfig {
    /// The leader's ingest, `host:port` (in a cluster the `weir-leader` Service).
    pub leader: String,
    /// This replica's name (the Pod's); the relay reports as `relay~<name>`.
    pub name: String,
    /// TLS towards the leader; None for plaintext (loopback only, like the ingest's own).
    pub tls: Option<RelayTls>,
    /// How often the merged delta is sealed and sent to the leader. Default 1 s, the filter's.
    pub report_interval: Duration,
    /// How long the relay keeps serving its Envoys after the leader's last message. Default
    /// 5 s: below the filter's grace period (10 s), so an Envoy moved off a relay that lost the
    /// leader finds another replica before it falls back.
    pub contact_grace: Duration,
}

impl RelayConfig {
    /// A relay of `name` towards `leader` with the default intervals, plaintext.
    pub fn new(leader: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            leader: leader.into(),
            name: name.into(),
            tls: None,
            report_interval: Duration::from_secs(1),
            contact_grace: Duration::from_secs(5),
        }
    }

    /// The relay's node id towards the leader.
    pub fn node_id(&self) -> String {
        format!("{RELAY_NODE_PREFIX}{}", self.name)
    }
}

/// The relay's TLS towards the leader: the replica's own certificate (the one it serves its
/// Envoys with: it proves to the leader that this stream comes from a controller replica) and
/// the CA the leader's certificate must chain to. The leader must present the same SPIFFE id as
/// this replica's own certificate — replicas of one Deployment share a service account — and
/// no DNS name is checked: Istio's workload certificates carry only the SPIFFE id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayTls {
    /// This replica's certificate chain (PEM).
    pub cert_chain: PathBuf,
    /// Its private key (PEM).
    pub private_key: PathBuf,
    /// The mesh's root (PEM).
    pub ca: PathBuf,
}

/// The relay's state shared with the ingest's stream tasks: the pending delta and the contact
/// with the leader.
#[derive(Debug)]
pub(crate) struct Relay {
    config: RelayConfig,
    reporter: Mutex<Reporter>,
    /// The origin of the reporter's clock.
    origin: Instant,
    /// True while the relay has the leader's directive and heard from it within the grace.
    serving: watch::Sender<bool>,
}

impl Relay {
    pub(crate) fn new(config: RelayConfig) -> Self {
        let identity = weir_proto::v1::Reporter {
            node_id: config.node_id(),
            ..Default::default()
        };
        let interval = u64::try_from(config.report_interval.as_nanos()).unwrap_or(u64::MAX);
        Self {
            reporter: Mutex::new(Reporter::new(identity, random_epoch(), interval)),
            config,
            origin: Instant::now(),
            serving: watch::channel(false).0,
        }
    }

    fn now_ns(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.origin).as_nanos()).unwrap_or(u64::MAX)
    }

    /// Merges an applied report's entries from the Envoy `node` (the ledger's key) into the
    /// pending delta. They were validated by the ingest, so nothing of them is refused here.
    pub(crate) fn merge<'a>(
        &self,
        node: &str,
        applied_generation: u64,
        stats: impl IntoIterator<Item = &'a VersionStats>,
        now: Instant,
    ) {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        node.hash(&mut hasher);
        let merged = lock(&self.reporter).on_stats(
            hasher.finish(),
            applied_generation,
            stats,
            self.now_ns(now),
        );
        if let Err(why) = merged {
            // Cannot happen for validated entries; said loudly if it ever does.
            tracing::error!("relay: a validated report did not merge: {why}");
        }
    }

    /// Whether the relay serves Envoys now, and its changes.
    pub(crate) fn serving(&self) -> watch::Receiver<bool> {
        self.serving.subscribe()
    }

    /// Reports sealed and not yet acknowledged by the leader.
    pub(crate) fn in_flight(&self) -> usize {
        lock(&self.reporter).in_flight()
    }

    fn endpoint(&self) -> Result<Leader, String> {
        let uri = format!("http://{}", self.config.leader);
        let endpoint = Channel::from_shared(uri.clone())
            .map_err(|e| format!("the leader address {uri:?} is not a URI: {e}"))?
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true);
        let tls = match &self.config.tls {
            None => None,
            Some(files) => Some(same_identity::connector(files)?),
        };
        Ok(Leader { endpoint, tls })
    }
}

/// How to reach the leader: the endpoint, and with TLS the connector that does the handshake.
struct Leader {
    endpoint: Endpoint,
    tls: Option<tokio_rustls::TlsConnector>,
}

impl Leader {
    async fn connect(&self) -> Result<Channel, tonic::transport::Error> {
        let Some(tls) = self.tls.clone() else {
            return self.endpoint.connect().await;
        };
        let connector = tower::service_fn(move |uri: http::Uri| {
            let tls = tls.clone();
            async move {
                let host = uri.host().unwrap_or_default().to_owned();
                let port = uri.port_u16().unwrap_or(443);
                let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
                tcp.set_nodelay(true)?;
                // The name is not checked (the verifier checks the SPIFFE id); rustls needs one.
                let name = rustls::pki_types::ServerName::try_from(host)
                    .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
                let stream = tls.connect(name, tcp).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        });
        self.endpoint.connect_with_connector(connector).await
    }
}

/// The relay's TLS client: its own certificate, and a verifier that accepts the leader only if
/// its certificate chains to the mesh's root and names this replica's own SPIFFE id.
mod same_identity {
    use std::sync::Arc;

    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    use rustls::crypto::WebPkiSupportedAlgorithms;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
    use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};

    use super::RelayTls;
    use crate::ingest::identity::SpiffeId;

    #[derive(Debug)]
    struct SameIdentity {
        roots: Arc<RootCertStore>,
        expected: SpiffeId,
        algorithms: WebPkiSupportedAlgorithms,
    }

    impl ServerCertVerifier for SameIdentity {
        fn verify_server_cert(
            &self,
            end_entity: &CertificateDer<'_>,
            intermediates: &[CertificateDer<'_>],
            _server_name: &ServerName<'_>,
            _ocsp_response: &[u8],
            now: UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            let parsed = rustls::server::ParsedCertificate::try_from(end_entity)?;
            rustls::client::verify_server_cert_signed_by_trust_anchor(
                &parsed,
                &self.roots,
                intermediates,
                now,
                self.algorithms.all,
            )?;
            let id = SpiffeId::from_certificate(end_entity.as_ref()).map_err(|why| {
                rustls::Error::General(format!("the leader's certificate: {why}"))
            })?;
            if id != self.expected {
                return Err(rustls::Error::General(format!(
                    "the leader's certificate is {id}, not a replica of this controller ({})",
                    self.expected
                )));
            }
            Ok(ServerCertVerified::assertion())
        }

        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.algorithms.supported_schemes()
        }
    }

    pub(super) fn connector(files: &RelayTls) -> Result<tokio_rustls::TlsConnector, String> {
        use rustls::pki_types::pem::PemObject;
        let expected = crate::ingest::transport::certificate_identity(&files.cert_chain)
            .map_err(|why| format!("this replica's own certificate: {why}"))?;
        let read = |path: &std::path::Path| {
            std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
        };
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(&read(&files.cert_chain)?)
                .collect::<Result<_, _>>()
                .map_err(|e| {
                    format!(
                        "no certificate chain in {}: {e}",
                        files.cert_chain.display()
                    )
                })?;
        let key = PrivateKeyDer::from_pem_slice(&read(&files.private_key)?)
            .map_err(|e| format!("no private key in {}: {e}", files.private_key.display()))?;
        let mut roots = RootCertStore::empty();
        for ca in CertificateDer::pem_slice_iter(&read(&files.ca)?) {
            let ca = ca.map_err(|e| format!("no CA certificate in {}: {e}", files.ca.display()))?;
            roots.add(ca).map_err(|e| {
                format!(
                    "a CA certificate in {} cannot be used: {e}",
                    files.ca.display()
                )
            })?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = SameIdentity {
            roots: Arc::new(roots),
            expected,
            algorithms: provider.signature_verification_algorithms,
        };
        let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_client_auth_cert(chain, key)
            .map_err(|e| format!("the key does not fit {}: {e}", files.cert_chain.display()))?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
    }
}

/// An epoch of its own per relay process life.
fn random_epoch() -> u64 {
    let mut hasher = RandomState::new().build_hasher();
    std::process::id().hash(&mut hasher);
    std::time::SystemTime::now().hash(&mut hasher);
    hasher.finish().max(1)
}

/// The open stream to the leader.
struct Upstream {
    token: u32,
    tx: mpsc::Sender<Report>,
    inbound: Streaming<ControllerMessage>,
}

async fn next_message(
    upstream: &mut Option<Upstream>,
) -> Option<Result<ControllerMessage, tonic::Status>> {
    match upstream {
        Some(up) => up.inbound.message().await.transpose(),
        None => std::future::pending().await,
    }
}

/// The relay's stream to the leader, until `stop` turns true.
pub(crate) async fn run(ingest: Ingest, relay: Arc<Relay>, mut stop: watch::Receiver<bool>) {
    let endpoint = match relay.endpoint() {
        Ok(endpoint) => endpoint,
        Err(why) => {
            tracing::error!("relay: cannot reach the leader: {why}; this replica serves no Envoys");
            return;
        }
    };
    let mut seal = tokio::time::interval(relay.config.report_interval);
    seal.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut watchdog = tokio::time::interval(Duration::from_millis(200));
    let mut upstream: Option<Upstream> = None;
    let mut last_contact: Option<Instant> = None;
    let mut tokens = 0u32;
    loop {
        let retry_at = lock(&relay.reporter)
            .retry_at_ns()
            .map(|at| tokio::time::Instant::from_std(relay.origin + Duration::from_nanos(at)));
        let commands = tokio::select! {
            biased;
            _ = stop.wait_for(|stopped| *stopped) => break,
            message = next_message(&mut upstream) => {
                let now = Instant::now();
                match message {
                    Some(Ok(message)) => {
                        last_contact = Some(now);
                        lock(&relay.reporter)
                            .on_message(&message.encode_to_vec(), relay.now_ns(now))
                            .unwrap_or_default()
                    }
                    end => {
                        if let Some(Err(status)) = end {
                            tracing::info!(%status, "relay: the stream to the leader ended");
                        }
                        if let Some(up) = upstream.take() {
                            lock(&relay.reporter).on_stream_closed(up.token, relay.now_ns(now));
                        }
                        Vec::new()
                    }
                }
            }
            _ = seal.tick() => lock(&relay.reporter).on_tick(relay.now_ns(Instant::now())),
            () = sleep_until(retry_at), if upstream.is_none() => {
                lock(&relay.reporter).on_tick(relay.now_ns(Instant::now()))
            }
            _ = watchdog.tick() => {
                let lost = last_contact.is_none_or(|at| at.elapsed() > relay.config.contact_grace);
                if lost && *relay.serving.borrow() {
                    tracing::warn!(
                        grace = ?relay.config.contact_grace,
                        "relay: no word from the leader within the grace; ending the Envoys' streams so they go elsewhere"
                    );
                    relay.serving.send_replace(false);
                }
                Vec::new()
            }
        };
        for command in commands {
            match command {
                Command::OpenStream => {
                    tokens = tokens.wrapping_add(1);
                    let opened = tokio::select! {
                        _ = stop.wait_for(|stopped| *stopped) => break,
                        opened = open(&endpoint, &relay, tokens) => opened,
                    };
                    match opened {
                        Ok(up) => {
                            tracing::info!(leader = %relay.config.leader, "relay: connected to the leader");
                            upstream = Some(up);
                        }
                        Err(why) => {
                            tracing::info!(leader = %relay.config.leader, "relay: cannot reach the leader: {why}");
                            lock(&relay.reporter).on_stream_failed(relay.now_ns(Instant::now()));
                        }
                    }
                }
                Command::Send(bytes) => send(&mut upstream, &relay, &bytes),
                Command::ShareDirective(bytes) => match Directive::decode(bytes.as_slice()) {
                    Ok(directive) => {
                        if let Err(why) = ingest.republish(directive) {
                            tracing::warn!("relay: the leader's directive is refused: {why}");
                        } else if !*relay.serving.borrow() {
                            tracing::info!("relay: serving Envoys under the leader's directive");
                            relay.serving.send_replace(true);
                        }
                    }
                    Err(e) => tracing::warn!("relay: a directive does not decode: {e}"),
                },
                Command::ShareContact(_) => {}
            }
        }
    }
    relay.serving.send_replace(false);
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Hands one encoded report to the open stream; without one, or if it does not fit, it stays
/// unacknowledged and goes again on the next stream (a gap the leader answers with `ABORTED`
/// makes that happen at once).
fn send(upstream: &mut Option<Upstream>, relay: &Relay, bytes: &[u8]) {
    let Some(up) = upstream else {
        return;
    };
    let Ok(report) = Report::decode(bytes) else {
        return;
    };
    if up.tx.try_send(report).is_err() {
        tracing::info!("relay: the stream to the leader does not take reports; reconnecting");
        if let Some(up) = upstream.take() {
            lock(&relay.reporter).on_stream_closed(up.token, relay.now_ns(Instant::now()));
        }
    }
}

/// Opens the stream: hello first, then everything unacknowledged, in order.
async fn open(endpoint: &Leader, relay: &Relay, token: u32) -> Result<Upstream, String> {
    let channel = tokio::time::timeout(CONNECT_TIMEOUT, endpoint.connect())
        .await
        .map_err(|_| format!("no connection within {CONNECT_TIMEOUT:?}"))?
        .map_err(|e| format!("{e} ({:?})", std::error::Error::source(&e)))?;
    let commands = lock(&relay.reporter).on_stream_opened(token, relay.now_ns(Instant::now()));
    let (tx, rx) = mpsc::channel(commands.len() + weir_filter::reporter::MAX_IN_FLIGHT + 8);
    for command in commands {
        if let Command::Send(bytes) = command {
            if let Ok(report) = Report::decode(bytes.as_slice()) {
                // The channel holds all of them: sized for it above.
                let _ = tx.try_send(report);
            }
        }
    }
    let mut client = TelemetryClient::new(channel);
    let answer = tokio::time::timeout(CONNECT_TIMEOUT, client.exchange(ReceiverStream::new(rx)))
        .await
        .map_err(|_| format!("the leader did not answer within {CONNECT_TIMEOUT:?}"))?
        .map_err(|status| format!("the leader refused the stream: {status}"))?;
    Ok(Upstream {
        token,
        tx,
        inbound: answer.into_inner(),
    })
}
