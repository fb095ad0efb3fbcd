//! An HTTP(S) receiver on 127.0.0.1 that records every request (webhook calls, alerts, the load
//! a `hey` command sends) and answers each path with the statuses a test scripted (200 when
//! none is left). Stopped when dropped.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::task::JoinHandle;
use tokio_rustls::rustls;

use crate::certs::Pem;

/// One request as received.
#[derive(Debug, Clone)]
pub struct Received {
    /// The method.
    pub method: String,
    /// The path and query.
    pub path: String,
    /// The headers (names lower case; a repeated one keeps its last value).
    pub headers: BTreeMap<String, String>,
    /// The body.
    pub body: Bytes,
    /// When it arrived.
    pub at: Instant,
}

impl Received {
    /// The body as JSON (`Null` when it is not).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

#[derive(Default)]
struct Book {
    received: Vec<Received>,
    answers: HashMap<String, VecDeque<u16>>,
}

/// The receiver.
pub struct Receiver {
    addr: SocketAddr,
    scheme: &'static str,
    book: Arc<Mutex<Book>>,
    task: JoinHandle<()>,
}

impl Receiver {
    /// A plain-HTTP receiver.
    pub async fn start() -> anyhow::Result<Self> {
        Self::serve(None).await
    }

    /// An HTTPS receiver presenting `cert` (see [`crate::certs::TestCa::server`]).
    pub async fn start_tls(cert: &Pem) -> anyhow::Result<Self> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let chain = CertificateDer::pem_file_iter(&cert.cert)
            .context("the receiver's certificate")?
            .collect::<Result<Vec<_>, _>>()?;
        let key = PrivateKeyDer::from_pem_file(&cert.key).context("the receiver's key")?;
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
        Self::serve(Some(tokio_rustls::TlsAcceptor::from(Arc::new(config)))).await
    }

    async fn serve(tls: Option<tokio_rustls::TlsAcceptor>) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let book = Arc::new(Mutex::new(Book::default()));
        let scheme = if tls.is_some() { "https" } else { "http" };
        let shared = book.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let book = shared.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |request| record(book.clone(), request));
                    let builder =
                        hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    match tls {
                        Some(acceptor) => {
                            // A client that does not trust the CA aborts the handshake here.
                            if let Ok(stream) = acceptor.accept(stream).await {
                                let _ = builder
                                    .serve_connection(TokioIo::new(stream), service)
                                    .await;
                            }
                        }
                        None => {
                            let _ = builder
                                .serve_connection(TokioIo::new(stream), service)
                                .await;
                        }
                    }
                });
            }
        });
        Ok(Self {
            addr,
            scheme,
            book,
            task,
        })
    }

    /// The URL of `path` here (`/hook` → `http://127.0.0.1:<port>/hook`).
    pub fn url(&self, path: &str) -> String {
        format!("{}://{}{path}", self.scheme, self.addr)
    }

    /// The address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The next answers for `path`, in order; 200 once they are used up.
    pub fn answer(&self, path: &str, statuses: &[u16]) {
        let mut book = self.book.lock().unwrap_or_else(|p| p.into_inner());
        book.answers
            .entry(path.to_owned())
            .or_default()
            .extend(statuses.iter().copied());
    }

    /// Every request so far.
    pub fn received(&self) -> Vec<Received> {
        self.book
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .received
            .clone()
    }

    /// The requests to `path` (without the query) so far.
    pub fn at(&self, path: &str) -> Vec<Received> {
        self.received()
            .into_iter()
            .filter(|r| r.path.split('?').next() == Some(path))
            .collect()
    }

    /// Waits (at most `limit`) until `path` received `count` requests; they, or an error
    /// saying what arrived.
    pub async fn wait_for(
        &self,
        path: &str,
        count: usize,
        limit: Duration,
    ) -> anyhow::Result<Vec<Received>> {
        let deadline = Instant::now() + limit;
        loop {
            let seen = self.at(path);
            if seen.len() >= count {
                return Ok(seen);
            }
            if Instant::now() >= deadline {
                anyhow::bail!(
                    "{} received {} of {count} requests within {limit:?}; everything received: {:#?}",
                    self.url(path),
                    seen.len(),
                    self.received()
                        .iter()
                        .map(|r| format!("{} {} {}", r.method, r.path, String::from_utf8_lossy(&r.body)))
                        .collect::<Vec<_>>()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn record(
    book: Arc<Mutex<Book>>,
    request: hyper::Request<hyper::body::Incoming>,
) -> Result<hyper::Response<Full<Bytes>>, std::convert::Infallible> {
    let method = request.method().to_string();
    let path = request
        .uri()
        .path_and_query()
        .map_or_else(|| "/".to_owned(), ToString::to_string);
    let headers = request
        .headers()
        .iter()
        .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap_or("").to_owned()))
        .collect();
    let body = request
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let status = {
        let mut book = book.lock().unwrap_or_else(|p| p.into_inner());
        let key = path.split('?').next().unwrap_or("/").to_owned();
        let status = book
            .answers
            .get_mut(&key)
            .and_then(VecDeque::pop_front)
            .unwrap_or(200);
        book.received.push(Received {
            method,
            path,
            headers,
            body,
            at: Instant::now(),
        });
        status
    };
    let mut response = hyper::Response::new(Full::new(Bytes::from_static(b"ok")));
    *response.status_mut() = hyper::StatusCode::from_u16(status).unwrap_or_default();
    Ok(response)
}
