//! A TCP forwarder on 127.0.0.1 that a test can break: it holds back what the far side sends
//! (acknowledgements that never arrive) and cuts every connection, as a network fault between
//! two processes would, without stopping either of them.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// The forwarder; every task ends when it is dropped.
pub struct TcpProxy {
    /// Where clients connect.
    pub addr: SocketAddr,
    hold_back: Arc<AtomicBool>,
    cut: watch::Sender<u64>,
    connections: Arc<AtomicU64>,
    accept: JoinHandle<()>,
}

impl TcpProxy {
    /// Forwards every connection to `target`.
    pub async fn start(target: SocketAddr) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let hold_back = Arc::new(AtomicBool::new(false));
        let (cut, cuts) = watch::channel(0u64);
        let connections = Arc::new(AtomicU64::new(0));
        let accept = {
            let hold_back = hold_back.clone();
            let connections = connections.clone();
            tokio::spawn(async move {
                while let Ok((client, _)) = listener.accept().await {
                    let Ok(server) = TcpStream::connect(target).await else {
                        continue;
                    };
                    connections.fetch_add(1, Ordering::Relaxed);
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    tokio::spawn(forward(client, server, hold_back.clone(), cuts.clone()));
                }
            })
        };
        Ok(Self {
            addr,
            hold_back,
            cut,
            connections,
            accept,
        })
    }

    /// While true, what the target sends is read and thrown away: the client hears nothing.
    pub fn hold_back(&self, hold: bool) {
        self.hold_back.store(hold, Ordering::Relaxed);
    }

    /// Closes every connection open now (new ones are forwarded again).
    pub fn cut(&self) {
        self.cut.send_modify(|n| *n += 1);
        self.hold_back(false);
    }

    /// Connections forwarded so far.
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::Relaxed)
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut.send_modify(|n| *n += 1);
    }
}

async fn forward(
    client: TcpStream,
    server: TcpStream,
    hold_back: Arc<AtomicBool>,
    mut cuts: watch::Receiver<u64>,
) {
    cuts.borrow_and_update();
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let up = async {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match client_read.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if server_write.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            }
        }
    };
    let down = async {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match server_read.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if hold_back.load(Ordering::Relaxed) {
                        continue;
                    }
                    if client_write.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            }
        }
    };
    // Whichever ends first ends both: dropping the halves closes the sockets.
    tokio::select! {
        () = up => {}
        () = down => {}
        _ = cuts.changed() => {}
    }
}
