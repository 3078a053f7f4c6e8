//! ggml RPC tunnelled through the cluster's mutual-TLS QUIC links (issue 16).
//!
//! llama.cpp's RPC server authenticates nobody and trusts every message, so
//! each node binds it on 127.0.0.1 only. A peer reaches it through one
//! bidirectional QUIC stream per TCP connection on the pair's existing mTLS
//! connection:
//!
//! ```text
//! llama.cpp (main node) --TCP 127.0.0.1:L--> Tunnels::open listener
//!     == QUIC stream: RpcTunnel frame, then raw bytes ==> serving node's
//!     Tunnels::serve --TCP 127.0.0.1:P--> ggml RPC server
//! ```
//!
//! The opener sends one `RpcTunnel` frame (JSON `{}`, reserved), the server
//! answers one `RpcTunnel` frame (`{}`: bridged) or an `Error` frame
//! (`{"status","message"}`: no RPC server here, or it cannot be reached).
//! Only after the answer does the opener send raw bytes, so nothing but that
//! one header frame ever sits in the serving side's frame decoder. The stream
//! is then a byte pipe until either side closes; a broken side resets the
//! other (a TCP client sees its connection end, never a silent hang).
//!
//! A QUIC connection exists only between certified members (`cluster::serve`
//! refuses anything else before a stream is read), so the RPC port is exposed
//! to the cluster's certificate holders and to no one else.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use crate::transport::frame::{Decoder, HEADER_LEN};
use crate::transport::{write_frame, Kind};

/// Bound on the tunnel handshake (one frame each way) and on reaching the
/// local RPC server.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The answer frame is `{}` or a short error: anything longer is a protocol
/// error, refused before it is read.
const MAX_ANSWER: usize = 4096;
/// One read per copy step; ggml RPC messages are small except tensor data,
/// which this size moves in few syscalls without holding much per stream.
const COPY_CHUNK: usize = 256 * 1024;
/// Stream error code when one side of a bridge breaks.
const BROKEN: quinn::VarInt = quinn::VarInt::from_u32(0x20);

#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("no connection to node '{0}'")]
    NoPeer(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("node '{peer}' refused the RPC tunnel ({status}): {message}")]
    Refused {
        peer: String,
        status: u16,
        message: String,
    },
    #[error("RPC tunnel to '{0}': {1}")]
    Protocol(String, String),
}

#[derive(Serialize, Deserialize)]
struct ErrorBody {
    status: u16,
    message: String,
}

/// Byte counts of one tunnel (all its TCP connections), live.
#[derive(Debug, Default)]
struct Stats {
    /// From the local TCP side into the tunnel (to the serving node).
    sent: AtomicU64,
    /// From the tunnel to the local TCP side.
    received: AtomicU64,
    connections: AtomicU64,
    active: AtomicU64,
    failures: AtomicU64,
}

struct Open {
    peer: String,
    stats: Arc<Stats>,
    task: JoinHandle<()>,
}

/// One tunnel as `status()` reports it.
#[derive(Debug, Clone, Serialize)]
pub struct TunnelStatus {
    pub port: u16,
    pub peer: String,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub connections: u64,
    pub active: u64,
    pub failures: u64,
}

/// The serving side's figures.
#[derive(Debug, Clone, Serialize)]
pub struct ServedStatus {
    /// The local RPC port streams are bridged to (None: refused, RPC off).
    pub rpc_port: Option<u16>,
    pub streams: u64,
    pub active: u64,
    pub refused: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub open: Vec<TunnelStatus>,
    pub served: ServedStatus,
}

/// This node's RPC tunnels: the ones it opened to peers (one loopback
/// listener each) and the streams peers opened to its RPC server.
#[derive(Default)]
pub struct Tunnels {
    /// The loopback port of this node's RPC server while it serves; 0: off,
    /// every tunnel stream is refused.
    serve_port: AtomicU16,
    open: Mutex<BTreeMap<u16, Open>>,
    served: Arc<Stats>,
    refused: AtomicU64,
}

impl Tunnels {
    /// Bridge peers' tunnels to 127.0.0.1:`port` (None: refuse them).
    pub fn set_serve_port(&self, port: Option<u16>) {
        self.serve_port.store(port.unwrap_or(0), Ordering::Relaxed);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u16, Open>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Listen on 127.0.0.1 (an ephemeral port, returned) and bridge every TCP
    /// connection accepted there to a new tunnel stream to `peer`, on the
    /// connection `connect` gives at that moment (a reconnected peer is
    /// reached on its new connection). Must run inside the tokio runtime.
    pub fn open<F>(&self, peer: &str, connect: F) -> Result<u16, TunnelError>
    where
        F: Fn() -> Option<quinn::Connection> + Send + Sync + 'static,
    {
        let std_listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
        std_listener.set_nonblocking(true)?;
        let port = std_listener.local_addr()?.port();
        let listener = TcpListener::from_std(std_listener)?;
        let stats = Arc::new(Stats::default());
        let task = tokio::spawn(accept_loop(
            listener,
            peer.to_string(),
            Arc::new(connect),
            stats.clone(),
        ));
        self.lock().insert(
            port,
            Open {
                peer: peer.to_string(),
                stats,
                task,
            },
        );
        tracing::info!("RPC tunnel to node '{peer}' listening on 127.0.0.1:{port}");
        Ok(port)
    }

    /// Stop the listener on `port` and end its connections; false when no
    /// tunnel listens there.
    pub fn close(&self, port: u16) -> bool {
        match self.lock().remove(&port) {
            Some(o) => {
                o.task.abort();
                tracing::info!("RPC tunnel to node '{}' on port {port} closed", o.peer);
                true
            }
            None => false,
        }
    }

    /// Close every tunnel this node opened (the node stops).
    pub fn close_all(&self) {
        for (_, o) in std::mem::take(&mut *self.lock()) {
            o.task.abort();
        }
    }

    pub fn status(&self) -> Status {
        let open = self
            .lock()
            .iter()
            .map(|(port, o)| TunnelStatus {
                port: *port,
                peer: o.peer.clone(),
                bytes_sent: o.stats.sent.load(Ordering::Relaxed),
                bytes_received: o.stats.received.load(Ordering::Relaxed),
                connections: o.stats.connections.load(Ordering::Relaxed),
                active: o.stats.active.load(Ordering::Relaxed),
                failures: o.stats.failures.load(Ordering::Relaxed),
            })
            .collect();
        let port = self.serve_port.load(Ordering::Relaxed);
        Status {
            open,
            served: ServedStatus {
                rpc_port: (port != 0).then_some(port),
                streams: self.served.connections.load(Ordering::Relaxed),
                active: self.served.active.load(Ordering::Relaxed),
                refused: self.refused.load(Ordering::Relaxed),
                // the bridge's TCP side is the RPC server here: what the
                // tunnel brought to it is `received`, its answers `sent`
                bytes_in: self.served.received.load(Ordering::Relaxed),
                bytes_out: self.served.sent.load(Ordering::Relaxed),
            },
        }
    }

    /// Serve a tunnel stream `peer` (a certified member) opened; its
    /// `RpcTunnel` frame has been read by `reader`.
    pub async fn serve(
        &self,
        peer: &str,
        mut send: quinn::SendStream,
        recv: quinn::RecvStream,
        leftover: BytesMut,
    ) {
        let port = self.serve_port.load(Ordering::Relaxed);
        let refuse = |status: u16, message: String| {
            self.refused.fetch_add(1, Ordering::Relaxed);
            tracing::warn!("refused an RPC tunnel from node '{peer}': {message}");
            serde_json::to_vec(&ErrorBody { status, message }).unwrap_or_default()
        };
        let tcp = if port == 0 {
            Err(refuse(
                503,
                "this node does not serve ggml RPC (engine.rpc_server is off or its server is not ready)"
                    .into(),
            ))
        } else {
            let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, TcpStream::connect(addr)).await {
                Ok(Ok(s)) => Ok(s),
                Ok(Err(e)) => Err(refuse(
                    503,
                    format!("this node's RPC server on {addr} cannot be reached: {e}"),
                )),
                Err(_) => Err(refuse(
                    503,
                    format!("this node's RPC server on {addr} did not accept in time"),
                )),
            }
        };
        let tcp = match tcp {
            Ok(t) => t,
            Err(body) => {
                let _ = write_frame(&mut send, Kind::Error, &body).await;
                let _ = send.finish();
                let _ = send.stopped().await;
                return;
            }
        };
        if write_frame(&mut send, Kind::RpcTunnel, b"{}")
            .await
            .is_err()
        {
            return;
        }
        self.served.connections.fetch_add(1, Ordering::Relaxed);
        tracing::debug!("RPC tunnel from node '{peer}' bridged to 127.0.0.1:{port}");
        bridge(tcp, send, recv, leftover, &self.served).await;
    }
}

async fn accept_loop(
    listener: TcpListener,
    peer: String,
    connect: Arc<dyn Fn() -> Option<quinn::Connection> + Send + Sync>,
    stats: Arc<Stats>,
) {
    // aborting this task drops the listener and the bridges it spawned
    // (`children` is dropped with it, aborting each)
    let mut children = Children::default();
    loop {
        let (tcp, _) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!("RPC tunnel to '{peer}': accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (peer, connect, stats) = (peer.clone(), connect.clone(), stats.clone());
        children.push(tokio::spawn(async move {
            stats.connections.fetch_add(1, Ordering::Relaxed);
            match handshake(&peer, connect()).await {
                Ok((send, recv)) => bridge(tcp, send, recv, BytesMut::new(), &stats).await,
                Err(e) => {
                    stats.failures.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!("RPC tunnel: {e}");
                    // dropping `tcp` closes the client's connection at once
                }
            }
        }));
    }
}

/// Bridges a listener spawned, aborted when it is dropped.
#[derive(Default)]
struct Children(Vec<JoinHandle<()>>);

impl Children {
    fn push(&mut self, h: JoinHandle<()>) {
        self.0.retain(|h| !h.is_finished());
        self.0.push(h);
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        for h in &self.0 {
            h.abort();
        }
    }
}

/// Open a tunnel stream on `conn` to `peer`: the header frame, then its
/// answer, read exactly (no byte past it).
pub async fn handshake(
    peer: &str,
    conn: Option<quinn::Connection>,
) -> Result<(quinn::SendStream, quinn::RecvStream), TunnelError> {
    let conn = conn.ok_or_else(|| TunnelError::NoPeer(peer.to_string()))?;
    let proto = |m: String| TunnelError::Protocol(peer.to_string(), m);
    let exchange = async {
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| proto(e.to_string()))?;
        write_frame(&mut send, Kind::RpcTunnel, b"{}")
            .await
            .map_err(|e| proto(e.to_string()))?;
        let mut header = [0u8; HEADER_LEN];
        recv.read_exact(&mut header)
            .await
            .map_err(|e| proto(format!("no answer: {e}")))?;
        let len = u32::from_be_bytes([header[2], header[3], header[4], header[5]]) as usize;
        if len > MAX_ANSWER {
            return Err(proto(format!("answer of {len} bytes")));
        }
        let mut whole = header.to_vec();
        whole.resize(HEADER_LEN + len, 0);
        recv.read_exact(&mut whole[HEADER_LEN..])
            .await
            .map_err(|e| proto(format!("answer cut short: {e}")))?;
        let mut dec = Decoder::new();
        dec.push(&whole);
        let frame = dec
            .next_frame()
            .map_err(|e| proto(e.to_string()))?
            .ok_or_else(|| proto("incomplete answer".into()))?;
        match frame.kind {
            Kind::RpcTunnel => Ok((send, recv)),
            Kind::Error => {
                let e: ErrorBody = serde_json::from_slice(&frame.payload).unwrap_or(ErrorBody {
                    status: 502,
                    message: String::from_utf8_lossy(&frame.payload).into_owned(),
                });
                Err(TunnelError::Refused {
                    peer: peer.to_string(),
                    status: e.status,
                    message: e.message,
                })
            }
            other => Err(proto(format!("unexpected {other:?} answer"))),
        }
    };
    tokio::time::timeout(HANDSHAKE_TIMEOUT, exchange)
        .await
        .map_err(|_| proto("no answer in time".into()))?
}

/// Copy bytes both ways between `tcp` and a tunnel stream until both sides
/// finish; a failure of either side resets the other. `stats.sent` counts
/// TCP → QUIC, `stats.received` QUIC → TCP.
async fn bridge(
    tcp: TcpStream,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    leftover: BytesMut,
    stats: &Stats,
) {
    // ggml RPC is request/answer with small messages: Nagle would hold each
    // one back for an ACK
    let _ = tcp.set_nodelay(true);
    stats.active.fetch_add(1, Ordering::Relaxed);
    let (mut tr, mut tw) = tcp.into_split();
    // counted when read, before they are passed on: whoever sees them arrive
    // sees them counted
    let up = async {
        let mut buf = vec![0u8; COPY_CHUNK];
        loop {
            let n = tr
                .read(&mut buf)
                .await
                .map_err(|e| format!("tcp read: {e}"))?;
            if n == 0 {
                let _ = send.finish();
                return Ok::<(), String>(());
            }
            stats.sent.fetch_add(n as u64, Ordering::Relaxed);
            send.write_all(&buf[..n])
                .await
                .map_err(|e| format!("stream write: {e}"))?;
        }
    };
    let down = async {
        if !leftover.is_empty() {
            stats
                .received
                .fetch_add(leftover.len() as u64, Ordering::Relaxed);
            tw.write_all(&leftover)
                .await
                .map_err(|e| format!("tcp write: {e}"))?;
        }
        loop {
            match recv.read_chunk(COPY_CHUNK, true).await {
                Ok(Some(chunk)) => {
                    stats
                        .received
                        .fetch_add(chunk.bytes.len() as u64, Ordering::Relaxed);
                    tw.write_all(&chunk.bytes)
                        .await
                        .map_err(|e| format!("tcp write: {e}"))?;
                }
                Ok(None) => {
                    let _ = tw.shutdown().await;
                    return Ok::<(), String>(());
                }
                Err(e) => return Err(format!("stream read: {e}")),
            }
        }
    };
    let broken = {
        tokio::pin!(up, down);
        let (mut up_done, mut down_done) = (false, false);
        loop {
            tokio::select! {
                r = &mut up, if !up_done => match r {
                    Ok(()) => up_done = true,
                    Err(e) => break Some(e),
                },
                r = &mut down, if !down_done => match r {
                    Ok(()) => down_done = true,
                    Err(e) => break Some(e),
                },
            }
            if up_done && down_done {
                break None;
            }
        }
    };
    if let Some(why) = broken {
        tracing::debug!("RPC tunnel bridge broken: {why}");
        // the other side learns at once: a reset stream, a closed socket
        // (dropped with `tr`/`tw` here)
        let _ = send.reset(BROKEN);
        let _ = recv.stop(BROKEN);
    }
    stats.active.fetch_sub(1, Ordering::Relaxed);
}
