//! A real Prometheus server for the fallback tests: Debian's `prometheus` on 127.0.0.1, a short
//! scrape interval, its data in the test's folder, killed when dropped. It can be stopped and
//! started again on the same port and data folder (an outage).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};

use crate::workdir::free_port;

/// The Prometheus binary: `WEIR_PROMETHEUS`, else `prometheus` on PATH, else
/// `/usr/bin/prometheus`. Missing, the test fails and says how to install it (never skips).
pub fn binary() -> PathBuf {
    if let Some(path) = std::env::var_os("WEIR_PROMETHEUS") {
        let path = PathBuf::from(path);
        assert!(
            path.is_file(),
            "WEIR_PROMETHEUS={} does not name a file; point it at the prometheus binary or unset it",
            path.display()
        );
        return path;
    }
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join("prometheus"))
                .find(|p| p.is_file())
        })
        .or_else(|| Some(PathBuf::from("/usr/bin/prometheus")).filter(|p| p.is_file()))
        .unwrap_or_else(|| {
            panic!(
                "no Prometheus found: these tests need a real Prometheus server. Install Debian's \
                 package (`apt-get install prometheus`), or run `cargo xtask test`, which installs \
                 it, or set WEIR_PROMETHEUS to the binary"
            )
        })
}

/// One scrape job.
#[derive(Debug, Clone)]
pub struct ScrapeJob {
    /// The job's name (the `job` label).
    pub name: String,
    /// The path scraped on every target.
    pub path: String,
    /// The targets.
    pub targets: Vec<SocketAddr>,
}

impl ScrapeJob {
    /// A job scraping `path` on `targets`.
    pub fn new(name: &str, path: &str, targets: &[SocketAddr]) -> Self {
        Self {
            name: name.to_owned(),
            path: path.to_owned(),
            targets: targets.to_vec(),
        }
    }
}

/// A running (or stopped) Prometheus.
#[derive(Debug)]
pub struct Prometheus {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
    /// Served over HTTPS with this certificate (Prometheus' `--web.config.file`).
    tls: Option<crate::certs::Pem>,
}

impl Prometheus {
    /// Writes `prometheus.yml` into `dir` (scraping `jobs` every `scrape_interval`) and starts
    /// Prometheus on `port` (0: a free one), its data in `dir/data`; returns once it is ready.
    pub fn start(
        dir: &Path,
        port: u16,
        jobs: &[ScrapeJob],
        scrape_interval: Duration,
    ) -> anyhow::Result<Self> {
        Self::start_with(dir, port, jobs, scrape_interval, None)
    }

    /// [`Prometheus::start`] serving HTTPS only, with `cert` (its own TLS, as a Prometheus
    /// behind no proxy configures it).
    pub fn start_tls(
        dir: &Path,
        jobs: &[ScrapeJob],
        scrape_interval: Duration,
        cert: &crate::certs::Pem,
    ) -> anyhow::Result<Self> {
        Self::start_with(dir, 0, jobs, scrape_interval, Some(cert.clone()))
    }

    fn start_with(
        dir: &Path,
        port: u16,
        jobs: &[ScrapeJob],
        scrape_interval: Duration,
        tls: Option<crate::certs::Pem>,
    ) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let interval = format!("{}ms", scrape_interval.as_millis());
        let mut config = format!(
            "global:\n  scrape_interval: {interval}\n  scrape_timeout: {interval}\n  evaluation_interval: {interval}\nscrape_configs:\n"
        );
        for job in jobs {
            let targets: Vec<String> = job.targets.iter().map(|t| format!("\"{t}\"")).collect();
            config.push_str(&format!(
                "- job_name: {}\n  metrics_path: {}\n  static_configs:\n  - targets: [{}]\n",
                job.name,
                job.path,
                targets.join(", ")
            ));
        }
        std::fs::write(dir.join("prometheus.yml"), config)?;
        let port = if port == 0 { free_port()? } else { port };
        if let Some(pem) = &tls {
            std::fs::write(
                dir.join("web.yml"),
                format!(
                    "tls_server_config:\n  cert_file: {}\n  key_file: {}\n",
                    pem.cert.display(),
                    pem.key.display()
                ),
            )?;
        }
        let mut prometheus = Self {
            child: None,
            port,
            dir: dir.to_owned(),
            tls,
        };
        prometheus.start_again()?;
        Ok(prometheus)
    }

    /// Starts the process again (same port, config and data); returns once it is ready.
    pub fn start_again(&mut self) -> anyhow::Result<()> {
        if self.child.is_some() {
            bail!("Prometheus on port {} is already running", self.port);
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("prometheus.log"))?;
        let binary = binary();
        let mut command = Command::new(&binary);
        if self.tls.is_some() {
            command.arg(format!(
                "--web.config.file={}",
                self.dir.join("web.yml").display()
            ));
        }
        let child = command
            .arg(format!(
                "--config.file={}",
                self.dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                self.dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{}", self.port))
            .arg("--storage.tsdb.retention.time=1h")
            .arg("--log.level=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot run {}", binary.display()))?;
        self.child = Some(child);
        self.wait_ready(Duration::from_secs(20))
    }

    fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                bail!(
                    "Prometheus exited ({status}) before it was ready; see {}",
                    self.dir.join("prometheus.log").display()
                );
            }
            if ready(self.port, self.tls.is_some()) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "Prometheus on 127.0.0.1:{} not ready after {timeout:?}; see {}",
                    self.port,
                    self.dir.join("prometheus.log").display()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Kills the process (an outage); [`Prometheus::start_again`] brings it back.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// `http://127.0.0.1:<port>` (`https://` when serving TLS).
    pub fn address(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Runs an instant query; returns `data.result` (a list for vectors).
    pub async fn query(&self, promql: &str) -> anyhow::Result<serde_json::Value> {
        self.api(
            promql,
            &format!("/api/v1/query?query={}", url_encode(promql)),
        )
        .await
    }

    /// Runs a range query from `start` to `end` (Unix seconds) every `step`; returns
    /// `data.result` (a list of series, each with its `values`).
    pub async fn query_range(
        &self,
        promql: &str,
        start: f64,
        end: f64,
        step: Duration,
    ) -> anyhow::Result<serde_json::Value> {
        let path = format!(
            "/api/v1/query_range?query={}&start={start:.3}&end={end:.3}&step={}",
            url_encode(promql),
            step.as_secs_f64()
        );
        self.api(promql, &path).await
    }

    async fn api(&self, promql: &str, path: &str) -> anyhow::Result<serde_json::Value> {
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        let (status, body) = crate::http::get(addr, path).await?;
        let json: serde_json::Value = serde_json::from_str(&body)
            .with_context(|| format!("Prometheus answered {status} with non-JSON: {body}"))?;
        if json["status"] != "success" {
            bail!("query `{promql}` failed ({status}): {body}");
        }
        Ok(json["data"]["result"].clone())
    }

    /// The series a vector query returns, as (labels, value).
    pub async fn series(&self, promql: &str) -> anyhow::Result<Vec<(serde_json::Value, f64)>> {
        let result = self.query(promql).await?;
        let list = result
            .as_array()
            .ok_or_else(|| anyhow!("`{promql}` did not return a vector: {result}"))?;
        list.iter()
            .map(|s| {
                let value = s["value"][1]
                    .as_str()
                    .and_then(|v| v.parse::<f64>().ok())
                    .ok_or_else(|| anyhow!("bad sample in {s}"))?;
                Ok((s["metric"].clone(), value))
            })
            .collect()
    }

    /// Waits (at most `timeout`) until `promql` returns at least one series with a value for
    /// which `accept` holds; returns the series.
    pub async fn wait_for(
        &self,
        promql: &str,
        timeout: Duration,
        accept: impl Fn(f64) -> bool,
    ) -> anyhow::Result<Vec<(serde_json::Value, f64)>> {
        let deadline = Instant::now() + timeout;
        loop {
            let last = self.series(promql).await;
            if let Ok(series) = &last {
                if series.iter().any(|(_, v)| accept(*v)) {
                    return Ok(series.clone());
                }
            }
            if Instant::now() >= deadline {
                bail!("`{promql}` did not return an acceptable value within {timeout:?}; last: {last:?}");
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

/// `text` encoded for a URL's query string.
fn url_encode(text: &str) -> String {
    form_urlencoded::byte_serialize(text.as_bytes()).collect()
}

/// Whether Prometheus answers `/-/ready`; over TLS, whether its TLS listener is up (it answers
/// a plain request with 400 "Client sent an HTTP request to an HTTPS server").
fn ready(port: u16, tls: bool) -> bool {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect_timeout(
        &SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_millis(200),
    ) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    if stream
        .write_all(b"GET /-/ready HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut head = [0u8; 12];
    let expected: &[u8] = if tls { b"400" } else { b"200" };
    stream.read_exact(&mut head).is_ok() && &head[9..12] == expected
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        self.stop();
    }
}
