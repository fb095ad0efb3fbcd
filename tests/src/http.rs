//! A small HTTP/1.1 client for the harness (stats, probes); the load generator uses the same one.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// The client type: plain HTTP/1.1 over TCP with keep-alive.
pub type HttpClient = Client<HttpConnector, Empty<Bytes>>;

/// A client with `TCP_NODELAY` (latency tests measure the servers, not Nagle) and room for
/// `connections` idle connections.
pub fn client(connections: usize) -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(Duration::from_secs(2)));
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(connections)
        .build(connector)
}

/// GETs `path` from `addr` and returns the status and body.
pub async fn get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let uri: http::Uri = format!("http://{addr}{path}").parse()?;
    let response = tokio::time::timeout(Duration::from_secs(5), client(1).get(uri)).await??;
    let status = response.status().as_u16();
    let body = response.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}
