//! `mirror`: a tiny HTTP app for demos and tests, modelled on the Mirror HTTP Server.
//!
//! Every request is answered with 200, or with the status in the `X-Mirror-Code` request header,
//! or with 500 for the `--error-rate` share; after `--latency` or the `X-Mirror-Delay` header's
//! delay. Responses carry `x-mirror-version`. `GET /mirror/stats` returns
//! `{"requests":N,"errors":M}` over every other request served (not `/healthz`), where errors are
//! 5xx answers; `GET /healthz` is 200. With `--istio-metrics`, `GET /stats/prometheus` publishes
//! the Istio sidecar's request metrics for what it served (see `istio.rs`). SIGTERM or Ctrl-C
//! stops it gracefully.

mod app;
mod flags;
mod istio;

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;

/// How long open connections get to finish after a stop signal.
const DRAIN: Duration = Duration::from_secs(5);

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let flags = flags::Flags::parse();
    let listener = TcpListener::bind(flags.listen)
        .await
        .with_context(|| format!("cannot listen on {}; pick a free port or 0", flags.listen))?;
    // A parent that passed port 0 reads the bound address from this first line.
    let bound = listener.local_addr()?;
    let mut stdout = std::io::stdout();
    writeln!(stdout, "listening on {bound}")?;
    stdout.flush()?;

    let app = Arc::new(app::App::new(&flags, bound.port()));
    let builder = auto::Builder::new(TokioExecutor::new());
    let graceful = GracefulShutdown::new();
    let stop = stop_signal();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        // Out of descriptors and the like pass; the server keeps serving.
                        eprintln!("mirror: accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                // Latency tests measure the app's delay, not Nagle's.
                let _ = stream.set_nodelay(true);
                let app = app.clone();
                let service = service_fn(move |request| app.clone().handle(request));
                let connection = builder.serve_connection(TokioIo::new(stream), service).into_owned();
                let connection = graceful.watch(connection);
                tokio::spawn(async move {
                    let _ = connection.await;
                });
            }
            signal = &mut stop => {
                signal?;
                break;
            }
        }
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(DRAIN) => eprintln!("mirror: connections still open after {DRAIN:?}; stopping anyway"),
    }
    Ok(())
}

async fn stop_signal() -> anyhow::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot install the SIGTERM handler")?;
    tokio::select! {
        _ = term.recv() => {}
        result = tokio::signal::ctrl_c() => result.context("cannot install the Ctrl-C handler")?,
    }
    Ok(())
}
