//! [`TcpProxy`]: a loopback TCP proxy a test can switch between passing bytes and
//! black-holing them — accepting and holding them, forwarding nothing, and delivering
//! everything it held when switched back, as TCP retransmission does after a real
//! partition heals.

use std::net::SocketAddr;

use anyhow::{Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyMode {
    /// Bytes flow both ways.
    Pass,
    /// Bytes are read and held, nothing is forwarded; switching back to `Pass`
    /// delivers what was held, in order.
    BlackHole,
}

/// Stops accepting and closes its connections when dropped.
pub struct TcpProxy {
    addr: SocketAddr,
    mode: watch::Sender<ProxyMode>,
    accept: JoinHandle<()>,
}

impl TcpProxy {
    /// A proxy on a free loopback port to `target`, passing bytes.
    pub async fn start(target: SocketAddr) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding the proxy")?;
        let addr = listener.local_addr()?;
        let (mode, rx) = watch::channel(ProxyMode::Pass);
        let accept = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((client, _)) = listener.accept().await {
                let rx = rx.clone();
                connections.spawn(async move {
                    let Ok(server) = TcpStream::connect(target).await else {
                        return;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    tokio::join!(pump(cr, sw, rx.clone()), pump(sr, cw, rx));
                });
            }
        });
        Ok(Self { addr, mode, accept })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn set(&self, mode: ProxyMode) {
        let _ = self.mode.send(mode);
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        // Dropping the accept task drops its JoinSet, which aborts every connection.
        self.accept.abort();
    }
}

/// Copies `from` to `to`, holding bytes while black-holed.
async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    mut mode: watch::Receiver<ProxyMode>,
) {
    let mut held: Vec<u8> = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        tokio::select! {
            read = from.read(&mut buf) => {
                let n = match read {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                held.extend_from_slice(&buf[..n]);
            }
            changed = mode.changed() => {
                if changed.is_err() {
                    break;
                }
            }
        }
        if *mode.borrow() == ProxyMode::Pass && !held.is_empty() {
            if to.write_all(&held).await.is_err() {
                break;
            }
            held.clear();
        }
    }
    let _ = to.shutdown().await;
}
