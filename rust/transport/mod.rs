//! QUIC between nodes: one quinn endpoint per node on the P2P port, mutual TLS
//! against the cluster CA ([`tls`]), a versioned length-prefixed framing
//! ([`frame`]), and the [`Mesh`] that keeps one connection per peer pair.
//!
//! Every exchange is a QUIC stream: a bidirectional stream per request (Raft
//! RPC, forwarded request, join), a unidirectional stream per advert. Streams
//! are cheap, so one slow request never blocks another on the same connection.

pub mod frame;
pub mod mesh;
pub mod tls;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

pub use frame::{Decoder, Frame, FrameError, Kind};
pub use mesh::Mesh;

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("connect: {0}")]
    Connect(#[from] quinn::ConnectError),
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("read: {0}")]
    Read(#[from] quinn::ReadError),
    #[error("write: {0}")]
    Write(#[from] quinn::WriteError),
    #[error("stream closed")]
    ClosedStream(#[from] quinn::ClosedStream),
    #[error("frame: {0}")]
    Frame(#[from] FrameError),
    #[error("tls: {0}")]
    Tls(#[from] tls::TlsError),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("timed out")]
    Timeout,
    #[error("no connection to peer '{0}'")]
    NoPeer(String),
    #[error("protocol: {0}")]
    Protocol(String),
}

/// Application error codes on connection and stream close.
pub mod codes {
    use quinn::VarInt;
    /// The peer presented no client certificate and asked for more than a join.
    pub const UNAUTHENTICATED: VarInt = VarInt::from_u32(0x10);
    /// Wrong join token.
    pub const BAD_TOKEN: VarInt = VarInt::from_u32(0x11);
    /// A second connection for a pair that already has one.
    pub const DUPLICATE: VarInt = VarInt::from_u32(0x12);
    /// The node is shutting down.
    pub const SHUTDOWN: VarInt = VarInt::from_u32(0x13);
    /// The caller dropped a forwarded request.
    pub const CANCELLED: VarInt = VarInt::from_u32(0x14);
    pub const PROTOCOL: VarInt = VarInt::from_u32(0x15);
    /// The peer claimed a node id other than the one its certificate names.
    pub const IMPERSONATION: VarInt = VarInt::from_u32(0x16);
    /// The peer's certificate is on the cluster's deny list (a removed node).
    pub const DENIED: VarInt = VarInt::from_u32(0x17);
    /// Too many connections without a certificate from one address.
    pub const BUSY: VarInt = VarInt::from_u32(0x18);
}

/// Transport parameters shared by both sides of every connection.
///
/// `failure_timeout` is how long a silent peer is kept: keep-alives go out four
/// times within it, so one or two lost packets never drop a healthy peer, and
/// a peer killed with -9 is seen gone after it. This is quinn's own idle
/// timeout doing the failure detection, not a protocol of ours.
pub fn transport_config(failure_timeout: Duration) -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(failure_timeout / 4));
    t.max_idle_timeout(quinn::IdleTimeout::try_from(failure_timeout).ok());
    // 256 concurrent forwarded streams per peer plus Raft and adverts.
    t.max_concurrent_bidi_streams(quinn::VarInt::from_u32(1024));
    t.max_concurrent_uni_streams(quinn::VarInt::from_u32(256));
    // Flow-control windows sized for blob transfers (rust/blobs): quinn's
    // defaults (1.25 MB per stream) cap a loopback copy well below the disk's
    // speed; these are limits on bytes in flight, not allocations.
    t.stream_receive_window(quinn::VarInt::from_u32(8 << 20));
    t.receive_window(quinn::VarInt::from_u32(16 << 20));
    t.send_window(16 << 20);
    // MTU discovery searches up to what the path carries (quinn's default
    // stops at 1452): loopback and jumbo-frame LANs then move a blob in far
    // fewer, larger packets; on a 1500-byte path the probes are lost and
    // quinn stays at what works.
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(MAX_UDP_PAYLOAD);
    t.mtu_discovery_config(Some(mtu));
    Arc::new(t)
}

/// How often [`answers`] looks for a packet from the peer: a loopback or LAN
/// round trip plus the peer's ACK delay (25 ms) is a few of these.
const PROBE_POLL: Duration = Duration::from_millis(5);

/// Whether the peer on `conn` shows a sign of life within `within`: one
/// datagram goes out (ack-eliciting, so the peer's QUIC stack must answer
/// within its ACK delay, whatever its application is doing) and any packet
/// from the peer counts. A killed or frozen process answers nothing; a busy
/// one still runs its QUIC threads. When the peer takes no datagrams there is
/// no verdict (true): the idle timeout decides, as before.
pub async fn answers(conn: &quinn::Connection, within: Duration) -> bool {
    let before = conn.stats().udp_rx.datagrams;
    match conn.send_datagram(Bytes::from_static(&[0])) {
        Ok(()) => {}
        Err(quinn::SendDatagramError::ConnectionLost(_)) => return false,
        Err(_) => return true,
    }
    let mut deadline = tokio::time::Instant::now() + within;
    loop {
        let slept = tokio::time::Instant::now();
        tokio::time::sleep(PROBE_POLL).await;
        // A wake-up far later than asked means this node was starved (a busy
        // CPU): packets may wait unread in the socket meanwhile, and that time
        // is not the peer's silence, so the window moves on by as much.
        deadline += slept.elapsed().saturating_sub(PROBE_POLL * 4);
        if conn.stats().udp_rx.datagrams > before {
            return true;
        }
        if conn.close_reason().is_some() {
            return false;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
    }
}

/// The largest UDP payload a node accepts and searches for (see
/// `transport_config`).
pub const MAX_UDP_PAYLOAD: u16 = 65_527;

/// A node's quinn endpoint on `socket` (from [`udp_socket`]), serving with
/// `server` when given. It accepts datagrams up to `MAX_UDP_PAYLOAD` (quinn's
/// default refuses more than an Ethernet frame, so peers could never use a
/// larger path MTU).
pub fn endpoint(
    socket: std::net::UdpSocket,
    server: Option<quinn::ServerConfig>,
) -> std::io::Result<quinn::Endpoint> {
    let mut c = quinn::EndpointConfig::default();
    c.max_udp_payload_size(MAX_UDP_PAYLOAD)
        .expect("MAX_UDP_PAYLOAD is within 1200..=65527");
    quinn::Endpoint::new(c, server, socket, Arc::new(quinn::TokioRuntime))
}

pub fn server_config(
    material: &tls::TlsMaterial,
    failure_timeout: Duration,
) -> Result<quinn::ServerConfig, TransportError> {
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(material.server_config()?)
        .map_err(|e| TransportError::Protocol(e.to_string()))?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    cfg.transport_config(transport_config(failure_timeout));
    Ok(cfg)
}

pub fn client_config(
    crypto: rustls::ClientConfig,
    failure_timeout: Duration,
) -> Result<quinn::ClientConfig, TransportError> {
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(crypto)
        .map_err(|e| TransportError::Protocol(e.to_string()))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
    cfg.transport_config(transport_config(failure_timeout));
    Ok(cfg)
}

/// Socket buffer size asked for each way: a blob copy keeps megabytes in
/// flight, and the kernel's default (about 200 KiB) overflows, dropping
/// datagrams that QUIC's congestion control takes for congestion. The kernel
/// caps the request at net.core.rmem_max / wmem_max.
pub const UDP_BUFFER: usize = 8 << 20;

/// A UDP socket bound to `bind` with the larger buffers (as far as the kernel
/// allows; what it gave is logged at debug level).
pub fn udp_socket(bind: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(bind),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    if bind.is_ipv6() {
        // as std's bind: an IPv6 socket takes IPv4 too where the system allows
        let _ = socket.set_only_v6(false);
    }
    for (what, res) in [
        ("receive", socket.set_recv_buffer_size(UDP_BUFFER)),
        ("send", socket.set_send_buffer_size(UDP_BUFFER)),
    ] {
        if let Err(e) = res {
            tracing::debug!("udp {what} buffer of {UDP_BUFFER} bytes refused: {e}");
        }
    }
    tracing::debug!(
        "udp buffers: receive {:?}, send {:?} bytes (raise net.core.rmem_max / wmem_max for more)",
        socket.recv_buffer_size().ok(),
        socket.send_buffer_size().ok()
    );
    socket.bind(&bind.into())?;
    Ok(socket.into())
}

/// A quinn endpoint serving the node's certificate on `bind`.
pub fn bind(
    bind: SocketAddr,
    material: &tls::TlsMaterial,
    failure_timeout: Duration,
) -> Result<quinn::Endpoint, TransportError> {
    Ok(endpoint(
        udp_socket(bind)?,
        Some(server_config(material, failure_timeout)?),
    )?)
}

/// Whether the peer proved a client certificate (chained to the CA: rustls
/// has already verified any certificate it reports).
pub fn peer_has_cert(conn: &quinn::Connection) -> bool {
    conn.peer_identity()
        .and_then(|id| {
            id.downcast::<Vec<rustls_pki_types::CertificateDer<'static>>>()
                .ok()
        })
        .is_some_and(|certs| !certs.is_empty())
}

/// Who the peer of a connection proved to be: the node id its certificate
/// names and the certificate's fingerprint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerCert {
    pub node_id: String,
    pub fingerprint: String,
}

/// The identity `conn`'s peer proved, if it presented a certificate (rustls
/// has already verified it against the CA) that names a node.
pub fn peer_cert(conn: &quinn::Connection) -> Option<PeerCert> {
    let certs = conn
        .peer_identity()?
        .downcast::<Vec<rustls_pki_types::CertificateDer<'static>>>()
        .ok()?;
    let leaf = certs.first()?;
    Some(PeerCert {
        node_id: tls::cert_node_id(leaf)?,
        fingerprint: tls::cert_fingerprint(leaf),
    })
}

/// Frames read from one stream, as they arrive.
pub struct FrameReader {
    recv: quinn::RecvStream,
    dec: Decoder,
}

/// Read granularity: large enough that a burst of small chunks is one read.
const READ_CHUNK: usize = 64 * 1024;

impl FrameReader {
    pub fn new(recv: quinn::RecvStream) -> Self {
        Self {
            recv,
            dec: Decoder::new(),
        }
    }

    /// The next frame, or None at a clean end of stream.
    pub async fn next(&mut self) -> Result<Option<Frame>, TransportError> {
        loop {
            if let Some(f) = self.dec.next_frame()? {
                return Ok(Some(f));
            }
            match self.recv.read_chunk(READ_CHUNK, true).await? {
                Some(chunk) => self.dec.push(&chunk.bytes),
                None if self.dec.buffered() == 0 => return Ok(None),
                None => {
                    return Err(TransportError::Protocol(
                        "stream ended inside a frame".into(),
                    ))
                }
            }
        }
    }

    /// A frame already buffered, without waiting.
    pub fn buffered(&mut self) -> Result<Option<Frame>, TransportError> {
        Ok(self.dec.next_frame()?)
    }

    /// The stream and the bytes already read past the frames returned.
    pub fn into_parts(mut self) -> (quinn::RecvStream, bytes::BytesMut) {
        let rest = self.dec.take_buffered();
        (self.recv, rest)
    }

    pub fn stop(&mut self, code: quinn::VarInt) {
        let _ = self.recv.stop(code);
    }
}

pub async fn write_frame(
    send: &mut quinn::SendStream,
    kind: Kind,
    payload: &[u8],
) -> Result<(), TransportError> {
    // Checked here, in release builds too: the receiver would end the stream
    // on it, and the sender would read that as a lost peer and retry.
    if payload.len() > frame::MAX_PAYLOAD {
        return Err(FrameError::TooLarge(payload.len()).into());
    }
    let mut buf = bytes::BytesMut::with_capacity(frame::HEADER_LEN + payload.len());
    frame::encode_into(kind, payload, &mut buf);
    // handed over whole: quinn keeps the chunk instead of copying it again
    send.write_chunk(buf.freeze()).await?;
    Ok(())
}

/// One request, one response, on a new stream of `conn`.
pub async fn call(
    conn: &quinn::Connection,
    kind: Kind,
    payload: &[u8],
    timeout: Duration,
) -> Result<Frame, TransportError> {
    let fut = async {
        let (mut send, recv) = conn.open_bi().await?;
        write_frame(&mut send, kind, payload).await?;
        send.finish()?;
        let mut reader = FrameReader::new(recv);
        reader.next().await?.ok_or_else(|| {
            TransportError::Protocol("peer closed the stream without answering".into())
        })
    };
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| TransportError::Timeout)?
}

/// Send one frame on a new unidirectional stream.
pub async fn push(
    conn: &quinn::Connection,
    kind: Kind,
    payload: Bytes,
) -> Result<(), TransportError> {
    let mut send = conn.open_uni().await?;
    write_frame(&mut send, kind, &payload).await?;
    send.finish()?;
    Ok(())
}
