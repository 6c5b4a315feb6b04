//! [`TcpProxy`]: a loopback TCP proxy between a node and a service that a test switches
//! at run time between passing bytes and the faults of a real network: black-holing
//! them (accepting and holding them, forwarding nothing, and delivering everything it
//! held when switched back, as TCP retransmission does after a partition heals),
//! delaying them (with jitter), holding one direction only, or resetting every
//! connection.

use std::net::SocketAddr;
use std::time::Duration;

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
    /// Every chunk waits `ms` milliseconds ± up to `jitter_ms` before it is forwarded
    /// (in order, per direction).
    Delay { ms: u64, jitter_ms: u64 },
    /// Bytes from the node to the service are held (as `BlackHole`); the other way
    /// they flow.
    HoldToService,
    /// Bytes from the service to the node are held; the other way they flow.
    HoldToNode,
    /// Every open connection is reset, and new ones are reset as soon as accepted.
    Reset,
}

impl ProxyMode {
    /// Whether bytes going this way are held: `to_service` is the node-to-service way.
    fn holds(self, to_service: bool) -> bool {
        match self {
            ProxyMode::BlackHole => true,
            ProxyMode::HoldToService => to_service,
            ProxyMode::HoldToNode => !to_service,
            ProxyMode::Pass | ProxyMode::Delay { .. } | ProxyMode::Reset => false,
        }
    }
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
                    if *rx.borrow() == ProxyMode::Reset {
                        reset(client);
                        return;
                    }
                    let Ok(server) = TcpStream::connect(target).await else {
                        return;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    let (a, b) =
                        tokio::join!(pump(cr, sw, rx.clone(), true), pump(sr, cw, rx, false));
                    // A reset: both halves come back; reunite them and reset both ends.
                    if let (Some((cr, sw)), Some((sr, cw))) = (a, b) {
                        if let (Ok(client), Ok(server)) = (cr.reunite(cw), sr.reunite(sw)) {
                            reset(client);
                            reset(server);
                        }
                    }
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

/// Closes a connection with a reset (no orderly FIN).
fn reset(stream: TcpStream) {
    #[allow(deprecated)] // set_linger: a zero linger is exactly what a reset is.
    let _ = stream.set_linger(Some(Duration::ZERO));
    drop(stream);
}

/// A pseudo-random jitter in `0..=bound` (no RNG dependency; spread is all it needs).
fn jitter(bound: u64) -> u64 {
    use std::hash::{BuildHasher, Hasher};
    if bound == 0 {
        return 0;
    }
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(bound);
    h.finish() % (bound + 1)
}

/// Copies `from` to `to` in the direction `to_service`, holding bytes while the mode
/// holds this direction and delaying them in `Delay`. Returns the halves when the mode
/// turned to `Reset` (the caller resets the connection), `None` when a side closed.
async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    mut mode: watch::Receiver<ProxyMode>,
    to_service: bool,
) -> Option<(OwnedReadHalf, OwnedWriteHalf)> {
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
        let now = *mode.borrow();
        if now == ProxyMode::Reset {
            return Some((from, to));
        }
        if now.holds(to_service) || held.is_empty() {
            continue;
        }
        if let ProxyMode::Delay { ms, jitter_ms } = now {
            let wait = ms
                .saturating_sub(jitter_ms)
                .saturating_add(jitter(jitter_ms.saturating_mul(2)));
            tokio::time::sleep(Duration::from_millis(wait)).await;
        }
        if to.write_all(&held).await.is_err() {
            break;
        }
        held.clear();
    }
    let _ = to.shutdown().await;
    None
}
