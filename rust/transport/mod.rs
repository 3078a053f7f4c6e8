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
    Arc::new(t)
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

/// A quinn endpoint serving the node's certificate on `bind`.
pub fn bind(
    bind: SocketAddr,
    material: &tls::TlsMaterial,
    failure_timeout: Duration,
) -> Result<quinn::Endpoint, TransportError> {
    Ok(quinn::Endpoint::server(
        server_config(material, failure_timeout)?,
        bind,
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

    pub fn stop(&mut self, code: quinn::VarInt) {
        let _ = self.recv.stop(code);
    }
}

pub async fn write_frame(
    send: &mut quinn::SendStream,
    kind: Kind,
    payload: &[u8],
) -> Result<(), TransportError> {
    let mut buf = bytes::BytesMut::with_capacity(frame::HEADER_LEN + payload.len());
    frame::encode_into(kind, payload, &mut buf);
    send.write_all(&buf).await?;
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
