//! One QUIC connection per peer pair, reused for every stream between them.
//!
//! The node with the smaller id dials (the cluster's dial loop decides who to
//! dial); both sides then exchange a Hello naming themselves and register the
//! connection under the peer's id. A newer connection for the same peer (it
//! restarted, or redialled after a timeout) replaces the older one. When the
//! registered connection closes — including by quinn's idle timeout when the
//! peer went silent — the peer is reported down.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::{call, codes, tls, Kind, TransportError};

/// A change in which peers are connected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerEvent {
    Up(String),
    /// The connection closed; `graceful` when the peer said it was shutting down.
    Down {
        peer: String,
        graceful: bool,
    },
}

#[derive(Serialize, Deserialize)]
pub struct Hello {
    pub id: String,
}

pub struct Mesh {
    local: String,
    endpoint: quinn::Endpoint,
    client: quinn::ClientConfig,
    conns: Mutex<HashMap<String, quinn::Connection>>,
    events: mpsc::UnboundedSender<PeerEvent>,
    /// Connections registered since start: stays flat while peers stay up,
    /// however many requests cross (each is a stream, not a connection).
    established: std::sync::atomic::AtomicU64,
}

impl Mesh {
    pub fn new(
        local: String,
        endpoint: quinn::Endpoint,
        client: quinn::ClientConfig,
    ) -> (Self, mpsc::UnboundedReceiver<PeerEvent>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (
            Self {
                local,
                endpoint,
                client,
                conns: Mutex::new(HashMap::new()),
                events: tx,
                established: std::sync::atomic::AtomicU64::new(0),
            },
            rx,
        )
    }

    pub fn local(&self) -> &str {
        &self.local
    }

    pub fn endpoint(&self) -> &quinn::Endpoint {
        &self.endpoint
    }

    /// The live connection to `peer`, if any.
    pub fn connection(&self, peer: &str) -> Option<quinn::Connection> {
        let conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        conns
            .get(peer)
            .filter(|c| c.close_reason().is_none())
            .cloned()
    }

    pub fn established(&self) -> u64 {
        self.established.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn connected(&self) -> Vec<String> {
        let conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        conns
            .iter()
            .filter(|(_, c)| c.close_reason().is_none())
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// Dial `peer` at `addr`, exchange Hellos and register the connection.
    pub async fn dial(
        self: &std::sync::Arc<Self>,
        peer: &str,
        addr: SocketAddr,
        timeout: Duration,
    ) -> Result<quinn::Connection, TransportError> {
        let fut = async {
            let conn = self
                .endpoint
                .connect_with(self.client.clone(), addr, tls::SERVER_NAME)?
                .await?;
            // the certificate, not the Hello, says who answered
            let proved = super::peer_cert(&conn).map(|c| c.node_id);
            if proved.as_deref() != Some(peer) {
                conn.close(codes::IMPERSONATION, b"unexpected node certificate");
                return Err(TransportError::Protocol(format!(
                    "{addr} proves node {proved:?}, not '{peer}'"
                )));
            }
            let hello = serde_json::to_vec(&Hello {
                id: self.local.clone(),
            })
            .unwrap_or_default();
            let answer = call(&conn, Kind::Hello, &hello, timeout).await?;
            let theirs: Hello = serde_json::from_slice(&answer.payload)
                .map_err(|e| TransportError::Protocol(format!("bad hello: {e}")))?;
            if theirs.id != peer {
                conn.close(codes::PROTOCOL, b"unexpected node id");
                return Err(TransportError::Protocol(format!(
                    "{addr} is node '{}', not '{peer}'",
                    theirs.id
                )));
            }
            self.register(peer.to_owned(), conn.clone());
            Ok(conn)
        };
        tokio::time::timeout(timeout, fut)
            .await
            .map_err(|_| TransportError::Timeout)?
    }

    /// Make `conn` the connection to `peer`, replacing an older one.
    pub fn register(self: &std::sync::Arc<Self>, peer: String, conn: quinn::Connection) {
        let old = {
            let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
            conns.insert(peer.clone(), conn.clone())
        };
        if let Some(old) = old {
            if old.stable_id() != conn.stable_id() {
                old.close(codes::DUPLICATE, b"replaced by a newer connection");
            }
        }
        self.established
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let _ = self.events.send(PeerEvent::Up(peer.clone()));
        let me = std::sync::Arc::downgrade(self);
        tokio::spawn(async move {
            let why = conn.closed().await;
            let graceful = matches!(&why, quinn::ConnectionError::ApplicationClosed(c) if c.error_code == codes::SHUTDOWN);
            let Some(me) = me.upgrade() else { return };
            let removed = {
                let mut conns = me.conns.lock().unwrap_or_else(|p| p.into_inner());
                match conns.get(&peer) {
                    Some(c) if c.stable_id() == conn.stable_id() => conns.remove(&peer).is_some(),
                    _ => false,
                }
            };
            if removed {
                let _ = me.events.send(PeerEvent::Down { peer, graceful });
            }
        });
    }

    /// Close every connection and the endpoint.
    pub fn close(&self) {
        let conns: Vec<quinn::Connection> = {
            let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
            conns.drain().map(|(_, c)| c).collect()
        };
        for c in conns {
            c.close(codes::SHUTDOWN, b"shutting down");
        }
        self.endpoint.close(codes::SHUTDOWN, b"shutting down");
    }
}
