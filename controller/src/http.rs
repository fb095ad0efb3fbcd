//! The one HTTP client the controller calls out with: webhooks, alerts and Prometheus queries
//! all go through it (reqwest over rustls), so they share connection pools, TLS settings and
//! timeouts.
//!
//! Which servers are trusted: the system's trust store (`/etc/ssl/certs` on Debian, which the
//! image installs) plus the PEM certificates of `--ca-file` / `WEIR_CA_FILE` (a private CA, the
//! mesh's root, a test CA). A webhook's `disableTLS` and a MetricTemplate's
//! `provider.insecureSkipVerify` skip verification for that call only, as in Flagger.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

/// How long a connection may take to open (TCP and TLS), whatever the request's own timeout.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How to build the client.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HttpOptions {
    /// A PEM file of CA certificates to trust besides the system's.
    pub ca_file: Option<PathBuf>,
}

impl HttpOptions {
    /// The options the environment gives: `WEIR_CA_FILE` when set and not empty.
    pub fn from_env() -> Self {
        Self {
            ca_file: std::env::var_os("WEIR_CA_FILE")
                .filter(|v| !v.is_empty())
                .map(PathBuf::from),
        }
    }
}

/// Why the client cannot be built, or a call failed.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The CA file cannot be read or holds no certificate.
    #[error("CA file {path}: {reason}; pass a PEM file of CA certificates with --ca-file (WEIR_CA_FILE)")]
    CaFile {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The TLS backend could not start.
    #[error("cannot build the HTTP client: {0}")]
    Build(String),
}

/// A call that got no answer, in words that say where it stopped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    /// No answer within the timeout.
    #[error("no answer within {}", crate::spec::format_go_duration(*.0))]
    Timeout(Duration),
    /// No connection, a TLS failure, a broken answer.
    #[error("{0}")]
    Transport(String),
    /// The URL or a header cannot be sent.
    #[error("{0}")]
    Request(String),
    /// The answer's body is larger than Weir reads.
    #[error("the answer is larger than {} KiB, the most Weir reads of an answer", .0 / 1024)]
    TooLarge(usize),
}

/// The most of an answer's body Weir reads (webhooks, alerts, Prometheus): a server, hostile or
/// broken, cannot make the controller hold more per call. A Prometheus answer for one series is
/// a few hundred bytes.
pub const MAX_ANSWER_BYTES: usize = 4 << 20;

/// An answer: its status and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// The HTTP status.
    pub status: u16,
    /// The body.
    pub body: bytes::Bytes,
}

impl Answer {
    /// The start of the body as text, for error messages.
    pub fn snippet(&self) -> String {
        let text = String::from_utf8_lossy(&self.body);
        let text = text.trim();
        match text.char_indices().nth(200) {
            Some((i, _)) => format!("{}…", &text[..i]),
            None => text.to_owned(),
        }
    }
}

/// The shared client: one verifying, one for the calls that asked to skip verification, and one
/// per proxy an AlertProvider names (made on first use).
#[derive(Clone)]
pub struct HttpClient {
    verified: reqwest::Client,
    unverified: reqwest::Client,
    /// The extra CAs, for the proxied clients.
    roots: std::sync::Arc<Vec<reqwest::Certificate>>,
    proxied: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, reqwest::Client>>>,
}

/// How many proxies' clients are kept (each AlertProvider with a proxy names one; more distinct
/// proxies than this is a misconfiguration, refused rather than held).
pub const MAX_PROXIES: usize = 32;

/// Why `url` cannot be a proxy, if it cannot.
pub fn check_proxy(url: &str) -> Result<(), String> {
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return Err(format!(
            "`{url}` must be an http:// or https:// URL (http://proxy:3128)"
        ));
    }
    reqwest::Proxy::all(url)
        .map(|_| ())
        .map_err(|e| format!("`{url}` is not a proxy URL: {}", error_chain(&e)))
}

impl std::fmt::Debug for HttpClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HttpClient")
    }
}

impl HttpClient {
    /// A client trusting the system's store and the certificates of `options.ca_file`.
    pub fn try_new(options: &HttpOptions) -> Result<Self, HttpError> {
        let extra = match &options.ca_file {
            Some(path) => read_ca_file(path)?,
            None => Vec::new(),
        };
        let verified = trusting(base(), &extra);
        Ok(Self {
            verified: verified
                .build()
                .map_err(|e| HttpError::Build(error_chain(&e)))?,
            unverified: base()
                .danger_accept_invalid_certs(true)
                .build()
                .map_err(|e| HttpError::Build(error_chain(&e)))?,
            roots: std::sync::Arc::new(extra),
            proxied: std::sync::Arc::default(),
        })
    }

    /// The verifying client that sends through `proxy` (an AlertProvider's), made on first use.
    pub fn through_proxy(&self, proxy: &str) -> Result<reqwest::Client, CallError> {
        let mut clients = self.proxied.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(client) = clients.get(proxy) {
            return Ok(client.clone());
        }
        if clients.len() >= MAX_PROXIES {
            return Err(CallError::Request(format!(
                "more than {MAX_PROXIES} distinct proxies are in use; AlertProviders should share a few"
            )));
        }
        let proxy_setting = reqwest::Proxy::all(proxy)
            .map_err(|e| CallError::Request(format!("proxy {proxy}: {}", error_chain(&e))))?;
        let client = trusting(base().proxy(proxy_setting), &self.roots)
            .build()
            .map_err(|e| CallError::Request(format!("proxy {proxy}: {}", error_chain(&e))))?;
        clients.insert(proxy.to_owned(), client.clone());
        Ok(client)
    }

    /// The client for a call: verifying, unless `skip_verify`.
    pub fn client(&self, skip_verify: bool) -> &reqwest::Client {
        if skip_verify {
            &self.unverified
        } else {
            &self.verified
        }
    }

    /// Sends `request` (built from [`HttpClient::client`]) and reads the whole answer, at most
    /// [`MAX_ANSWER_BYTES`] of it, within `timeout`.
    pub async fn send(
        &self,
        request: reqwest::RequestBuilder,
        timeout: Duration,
    ) -> Result<Answer, CallError> {
        self.exchange(request, timeout, Some(MAX_ANSWER_BYTES))
            .await
    }

    /// [`HttpClient::send`] for load: the body is read to its end and dropped as it comes
    /// (whatever its size); the answer's body is empty.
    pub async fn send_discarding(
        &self,
        request: reqwest::RequestBuilder,
        timeout: Duration,
    ) -> Result<Answer, CallError> {
        self.exchange(request, timeout, None).await
    }

    /// Sends and reads the answer, keeping at most `keep` bytes of the body (`None`: none).
    async fn exchange(
        &self,
        request: reqwest::RequestBuilder,
        timeout: Duration,
        keep: Option<usize>,
    ) -> Result<Answer, CallError> {
        let exchange = async {
            let mut response = request.send().await.map_err(|e| {
                if e.is_builder() {
                    CallError::Request(error_chain(&e))
                } else {
                    CallError::Transport(error_chain(&e))
                }
            })?;
            let status = response.status().as_u16();
            let mut body = bytes::BytesMut::new();
            while let Some(chunk) = response.chunk().await.map_err(|e| {
                CallError::Transport(format!("the answer broke off: {}", error_chain(&e)))
            })? {
                if let Some(limit) = keep {
                    if body.len() + chunk.len() > limit {
                        return Err(CallError::TooLarge(limit));
                    }
                    body.extend_from_slice(&chunk);
                }
            }
            Ok(Answer {
                status,
                body: body.freeze(),
            })
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .unwrap_or(Err(CallError::Timeout(timeout)))
    }

    /// POSTs `body` as JSON.
    pub async fn post_json(
        &self,
        url: &str,
        body: &serde_json::Value,
        timeout: Duration,
        skip_verify: bool,
    ) -> Result<Answer, CallError> {
        let request = self
            .client(skip_verify)
            .post(url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body.to_string());
        self.send(request, timeout).await
    }
}

/// Every client's settings.
fn base() -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .connect_timeout(CONNECT_TIMEOUT)
        .pool_idle_timeout(Duration::from_secs(30))
        .tcp_nodelay(true)
        .user_agent(concat!("weir/", env!("CARGO_PKG_VERSION")))
        // A proxy only when asked for per call (an AlertProvider's `proxy`): Weir talks to
        // in-cluster services, which a system-wide proxy setting must not divert.
        .no_proxy()
}

/// `builder` trusting `roots` besides the system's store.
fn trusting(
    builder: reqwest::ClientBuilder,
    roots: &[reqwest::Certificate],
) -> reqwest::ClientBuilder {
    roots.iter().fold(builder, |b, certificate| {
        b.add_root_certificate(certificate.clone())
    })
}

fn read_ca_file(path: &Path) -> Result<Vec<reqwest::Certificate>, HttpError> {
    let err = |reason: String| HttpError::CaFile {
        path: path.to_owned(),
        reason,
    };
    let pem = std::fs::read(path).map_err(|e| err(format!("cannot be read ({e})")))?;
    let certificates = reqwest::Certificate::from_pem_bundle(&pem)
        .map_err(|e| err(format!("is not PEM ({e})")))?;
    if certificates.is_empty() {
        return Err(err("holds no CERTIFICATE block".to_owned()));
    }
    Ok(certificates)
}

static SHARED: OnceLock<HttpClient> = OnceLock::new();

/// Makes `client` the process's shared client. Call it once at start-up, before any call goes
/// out; `Err` gives the client back when one is already in use.
pub fn install(client: HttpClient) -> Result<(), HttpClient> {
    SHARED.set(client)
}

/// The process's shared client: the one [`install`]ed, else one built from the environment
/// (`WEIR_CA_FILE`), else one trusting the system's store only (the problem logged).
pub fn shared() -> &'static HttpClient {
    SHARED.get_or_init(|| {
        HttpClient::try_new(&HttpOptions::from_env()).unwrap_or_else(|e| {
            tracing::error!(error = %e, "falling back to an HTTP client that trusts the system's CAs only");
            // Building without extra certificates fails only if TLS cannot start at all, and
            // then no client can be had: the first call reports the broken TLS setup.
            HttpClient::try_new(&HttpOptions::default()).unwrap_or_else(|_| HttpClient {
                verified: reqwest::Client::new(),
                unverified: reqwest::Client::new(),
                roots: std::sync::Arc::default(),
                proxied: std::sync::Arc::default(),
            })
        })
    })
}

/// An error and its sources, `outer: inner: innermost` (reqwest's top-level message alone is
/// "error sending request").
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let next = s.to_string();
        if !text.contains(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A server on 127.0.0.1 answering every request with 200 and a body of `size` bytes
    /// (chunked, `None`: without end).
    async fn server(size: Option<usize>) -> std::net::SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut request = [0u8; 4096];
                    let _ = stream.read(&mut request).await;
                    let head = "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n";
                    if stream.write_all(head.as_bytes()).await.is_err() {
                        return;
                    }
                    let chunk = vec![b'x'; 64 * 1024];
                    let mut sent = 0;
                    while size.is_none_or(|size| sent < size) {
                        let frame = format!("{:x}\r\n", chunk.len());
                        if stream.write_all(frame.as_bytes()).await.is_err()
                            || stream.write_all(&chunk).await.is_err()
                            || stream.write_all(b"\r\n").await.is_err()
                        {
                            return;
                        }
                        sent += chunk.len();
                    }
                    let _ = stream.write_all(b"0\r\n\r\n").await;
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn an_answer_without_end_is_refused_at_the_limit_not_held() {
        let http = HttpClient::try_new(&HttpOptions::default()).unwrap();
        let addr = server(None).await;
        let request = http.client(false).get(format!("http://{addr}/"));
        let err = http
            .send(request, Duration::from_secs(20))
            .await
            .unwrap_err();
        assert_eq!(err, CallError::TooLarge(MAX_ANSWER_BYTES));
        assert!(err.to_string().contains("4096 KiB"), "{err}");
        // Within the limit, the whole body.
        let small = server(Some(128 * 1024)).await;
        let answer = http
            .send(
                http.client(false).get(format!("http://{small}/")),
                Duration::from_secs(20),
            )
            .await
            .unwrap();
        assert_eq!((answer.status, answer.body.len()), (200, 128 * 1024));
    }

    #[tokio::test]
    async fn load_reads_a_large_answer_to_its_end_without_keeping_it() {
        let http = HttpClient::try_new(&HttpOptions::default()).unwrap();
        let addr = server(Some(2 * MAX_ANSWER_BYTES)).await;
        let answer = http
            .send_discarding(
                http.client(false).get(format!("http://{addr}/")),
                Duration::from_secs(20),
            )
            .await
            .unwrap();
        assert_eq!(answer.status, 200);
        assert!(answer.body.is_empty());
    }
}
