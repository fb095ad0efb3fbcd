//! How reporters connect, and what each connection may hold.
//!
//! Two transports:
//! - **TLS with a verified client certificate** (a mesh): the controller's certificate and key,
//!   and the CA bundle that client certificates must chain to (the mesh's root). In a cluster
//!   these are the files Istio's agent writes for the controller's own Pod (`OUTPUT_CERTS`, see
//!   manifests/controller.yaml), so the filters' sidecars reach the controller with Istio's mTLS
//!   and the controller reads each caller's SPIFFE id from its certificate. The files are read
//!   again when they change (Istio rotates them).
//! - **Plaintext on loopback** (local mode): only allowed on a loopback address; the peer is the
//!   machine itself ([`PeerIdentity::Loopback`]).
//!
//! Every connection is bounded: at most [`Limits::max_connections`] at once (more are closed at
//! accept), a TLS handshake must finish within [`Limits::handshake_timeout`], and a connection
//! that sends nothing for [`Limits::idle_timeout`] is closed (a reporter sends a report every
//! report interval, 60 s at most). Streams per connection and message size are limited by the
//! gRPC server (see [`super::Ingest::serve`]).

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use futures::StreamExt as _;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tonic::transport::server::Connected;

use super::identity::{PeerIdentity, SpiffeId};

/// Where the controller's TLS material is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The controller's certificate chain (PEM).
    pub cert_chain: PathBuf,
    /// Its private key (PEM, PKCS#8, PKCS#1 or SEC1).
    pub private_key: PathBuf,
    /// The CA certificates client certificates must chain to (PEM): the mesh's root.
    pub client_ca: PathBuf,
}

/// How reporters connect.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Transport {
    /// Plaintext; refused on anything but a loopback address.
    #[default]
    PlaintextLoopback,
    /// TLS; a client certificate proves the reporter's identity.
    Tls(TlsFiles),
}

/// Bounds on connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections open at once; more are closed at accept.
    pub max_connections: usize,
    /// Time allowed for a TLS handshake.
    pub handshake_timeout: Duration,
    /// A connection that sends nothing for this long is closed.
    pub idle_timeout: Duration,
}

/// Why serving could not start.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// Plaintext asked for on a non-loopback address.
    #[error("plaintext telemetry is only served on a loopback address, not {0}: give the controller its TLS files (--tls-cert, --tls-key, --tls-client-ca) so reporters authenticate")]
    PlaintextNotLoopback(SocketAddr),
    /// A TLS file could not be read or used.
    #[error("TLS: {0}")]
    Tls(String),
}

/// What the server knows about a connection's peer; tonic puts it into every request's
/// extensions.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    /// The verified identity, or why there is none.
    pub identity: Result<PeerIdentity, String>,
    /// The peer's address.
    pub remote: Option<SocketAddr>,
}

enum Io {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

/// One accepted connection: its peer, the idle timer, and its slot among the open connections.
pub struct Conn {
    io: Io,
    info: PeerInfo,
    idle: Duration,
    deadline: Pin<Box<Sleep>>,
    _slot: OwnedSemaphorePermit,
}

impl Connected for Conn {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.info.clone()
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        let polled = match &mut this.io {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        };
        match polled {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    let next = Instant::now() + this.idle;
                    this.deadline.as_mut().reset(next);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => match this.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the reporter sent nothing within the idle timeout",
                ))),
                Poll::Pending => Poll::Pending,
            },
            other => other,
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.io {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.io {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.io {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// The TLS configuration, rebuilt when one of its files changes.
struct TlsState {
    files: TlsFiles,
    stamps: Vec<Option<SystemTime>>,
    acceptor: TlsAcceptor,
}

fn stamps(files: &TlsFiles) -> Vec<Option<SystemTime>> {
    [&files.cert_chain, &files.private_key, &files.client_ca]
        .iter()
        .map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
        .collect()
}

fn read(path: &Path) -> Result<Vec<u8>, TransportError> {
    std::fs::read(path)
        .map_err(|e| TransportError::Tls(format!("cannot read {}: {e}", path.display())))
}

/// The SPIFFE id of the first certificate in the PEM chain at `path`: the controller's own
/// identity, which the leader trusts for relay streams.
pub fn certificate_identity(path: &Path) -> Result<crate::ingest::identity::SpiffeId, String> {
    let pem = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let first = CertificateDer::pem_slice_iter(&pem)
        .next()
        .ok_or_else(|| format!("no certificate in {}", path.display()))?
        .map_err(|e| format!("no certificate in {}: {e}", path.display()))?;
    crate::ingest::identity::SpiffeId::from_certificate(&first)
}

/// A rustls server configuration from `files`: the controller's certificate, and client
/// certificates verified against the CA bundle. A client without a certificate is let through
/// the handshake so that the stream can be refused with a status that says why.
pub fn server_config(files: &TlsFiles) -> Result<ServerConfig, TransportError> {
    let tls = |what: &str, path: &Path, e: &dyn std::fmt::Display| {
        TransportError::Tls(format!("{what} {}: {e}", path.display()))
    };
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(&read(&files.cert_chain)?)
            .collect::<Result<_, _>>()
            .map_err(|e| tls("no certificate chain in", &files.cert_chain, &e))?;
    if chain.is_empty() {
        return Err(tls(
            "no certificate in",
            &files.cert_chain,
            &"expected PEM CERTIFICATE blocks",
        ));
    }
    let key = PrivateKeyDer::from_pem_slice(&read(&files.private_key)?)
        .map_err(|e| tls("no private key in", &files.private_key, &e))?;
    let mut roots = RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(&read(&files.client_ca)?) {
        let ca = ca.map_err(|e| tls("no CA certificate in", &files.client_ca, &e))?;
        roots.add(ca).map_err(|e| {
            tls(
                "a CA certificate that cannot be used in",
                &files.client_ca,
                &e,
            )
        })?;
    }
    if roots.is_empty() {
        return Err(tls(
            "no CA certificate in",
            &files.client_ca,
            &"expected the mesh's root certificate",
        ));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .allow_unauthenticated()
        .build()
        .map_err(|e| tls("cannot verify clients with", &files.client_ca, &e))?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TransportError::Tls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| {
            tls(
                "the key does not fit the certificate in",
                &files.cert_chain,
                &e,
            )
        })?;
    // gRPC clients ask for h2 (Istio's mTLS offers "istio" and "h2"); a client that offers no
    // ALPN at all (Envoy's cluster with prior knowledge of HTTP/2) is served too.
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

impl TlsState {
    fn load(files: TlsFiles) -> Result<Self, TransportError> {
        let acceptor = TlsAcceptor::from(Arc::new(server_config(&files)?));
        Ok(Self {
            stamps: stamps(&files),
            files,
            acceptor,
        })
    }

    /// The acceptor for a new connection, rebuilt first if a file changed (kept as it was, with a
    /// warning, if the new files do not load).
    fn acceptor(&mut self) -> TlsAcceptor {
        let now = stamps(&self.files);
        if now != self.stamps {
            self.stamps = now;
            match server_config(&self.files) {
                Ok(config) => {
                    self.acceptor = TlsAcceptor::from(Arc::new(config));
                    tracing::info!("telemetry TLS files changed; using the new ones");
                }
                Err(e) => tracing::warn!("{e}; keeping the previous TLS configuration"),
            }
        }
        self.acceptor.clone()
    }
}

/// Waits (at most `limit`) until the three TLS files exist; the caller then loads them and says
/// what is wrong if they are still missing.
pub async fn wait_for_files(files: &TlsFiles, limit: Duration) {
    let all = || {
        [&files.cert_chain, &files.private_key, &files.client_ca]
            .iter()
            .all(|p| p.is_file())
    };
    let deadline = Instant::now() + limit;
    let mut said = false;
    while !all() && Instant::now() < deadline {
        if !said {
            said = true;
            tracing::info!(cert = %files.cert_chain.display(), "waiting for the telemetry TLS files");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The verified identity of a TLS peer.
fn tls_identity(stream: &TlsStream<TcpStream>) -> Result<PeerIdentity, String> {
    let (_, session) = stream.get_ref();
    let leaf = session.peer_certificates().and_then(|c| c.first()).ok_or(
        "the connection has no client certificate; reporters must present their workload certificate (Istio's mTLS)",
    )?;
    SpiffeId::from_certificate(leaf.as_ref()).map(PeerIdentity::Spiffe)
}

/// Accepts connections on `listener` for the gRPC server: a stream of bounded, identified
/// connections. Connections beyond the limit, failed handshakes and handshakes over time are
/// closed and counted (`refused`); they never reach the server.
pub fn incoming(
    listener: TcpListener,
    transport: &Transport,
    limits: Limits,
    refused: Arc<std::sync::atomic::AtomicU64>,
) -> Result<impl futures::Stream<Item = Result<Conn, io::Error>>, TransportError> {
    use std::sync::atomic::Ordering;

    let local = listener
        .local_addr()
        .map_err(|e| TransportError::Tls(e.to_string()))?;
    let tls = match transport {
        Transport::PlaintextLoopback if !local.ip().is_loopback() => {
            return Err(TransportError::PlaintextNotLoopback(local));
        }
        Transport::PlaintextLoopback => None,
        Transport::Tls(files) => Some(Arc::new(Mutex::new(TlsState::load(files.clone())?))),
    };
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let (tx, rx) = mpsc::channel::<Conn>(64);
    tokio::spawn(async move {
        let mut backoff = Duration::from_millis(5);
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                // The server is gone: stop listening, so the port is free again.
                () = tx.closed() => return,
            };
            let (stream, remote) = match accepted {
                Ok(accepted) => {
                    backoff = Duration::from_millis(5);
                    accepted
                }
                Err(e) => {
                    // Out of file descriptors, say: wait, and accept again.
                    tracing::warn!(error = %e, "cannot accept a telemetry connection");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                refused.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%remote, max = limits.max_connections, "closing a telemetry connection: the controller holds its maximum of connections");
                continue;
            };
            let _ = stream.set_nodelay(true);
            let (tx, tls, refused) = (tx.clone(), tls.clone(), refused.clone());
            tokio::spawn(async move {
                let (io, identity) = match tls {
                    None => (Io::Plain(stream), Ok(PeerIdentity::Loopback)),
                    Some(state) => {
                        let acceptor = state.lock().unwrap_or_else(|p| p.into_inner()).acceptor();
                        match tokio::time::timeout(
                            limits.handshake_timeout,
                            acceptor.accept(stream),
                        )
                        .await
                        {
                            Ok(Ok(tls)) => {
                                let identity = tls_identity(&tls);
                                (Io::Tls(Box::new(tls)), identity)
                            }
                            Ok(Err(e)) => {
                                refused.fetch_add(1, Ordering::Relaxed);
                                tracing::debug!(%remote, error = %e, "telemetry TLS handshake failed");
                                return;
                            }
                            Err(_) => {
                                refused.fetch_add(1, Ordering::Relaxed);
                                tracing::debug!(%remote, "telemetry TLS handshake timed out");
                                return;
                            }
                        }
                    }
                };
                let conn = Conn {
                    io,
                    info: PeerInfo {
                        identity,
                        remote: Some(remote),
                    },
                    idle: limits.idle_timeout,
                    deadline: Box::pin(tokio::time::sleep(limits.idle_timeout)),
                    _slot: slot,
                };
                let _ = tx.send(conn).await;
            });
        }
    });
    Ok(tokio_stream::wrappers::ReceiverStream::new(rx).map(Ok))
}
