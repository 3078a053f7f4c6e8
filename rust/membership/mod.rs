//! Who is up, and what each node last advertised: pure logic, fed events and
//! times, read back as views. No sockets and no clock, so tests (or a
//! simulation of many nodes) drive it directly.
//!
//! Liveness comes from the transport: a peer is up while its QUIC connection
//! is, and quinn closes a connection that heard nothing for the failure
//! timeout (keep-alives go out four times within it). So a node killed with -9
//! is marked down about one failure timeout after its last packet.
//!
//! For large clusters, [`swim`] (SWIM by the `foca` crate, plus versioned
//! adverts by broadcast and push, kept in [`adverts`]) replaces the full mesh's
//! liveness; [`sim`] runs thousands of them on a simulated network. Not wired
//! into the real cluster yet (ARCHITECTURE.md, "Scaling to a thousand nodes").

pub mod adverts;
pub mod sim;
pub mod swim;

use std::collections::HashMap;

use bytes::Bytes;
use serde::Serialize;

/// Liveness and the latest advert of one peer.
#[derive(Debug, Clone, Default)]
pub struct PeerState {
    pub connected: bool,
    /// Last time we heard from it (connect or advert), ms since the epoch.
    pub last_seen_ms: u64,
    /// When it was last marked down.
    pub down_since_ms: Option<u64>,
    /// Its latest advert (JSON), and when it arrived.
    pub advert: Option<Bytes>,
    pub advert_at_ms: u64,
}

/// What the node knows about every peer.
#[derive(Debug, Default)]
pub struct Membership {
    peers: HashMap<String, PeerState>,
    /// How many times peers went down: for metrics.
    pub downs: u64,
}

/// One node as `nodes()` reports it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct NodeView {
    pub id: String,
    pub api_address: String,
    pub p2p_address: String,
    pub alive: bool,
    /// Unix seconds.
    pub last_seen: f64,
    pub advert: Option<serde_json::Value>,
    /// Unix seconds the advert arrived; None without one.
    pub advert_at: Option<f64>,
    pub voter: bool,
    pub local: bool,
}

impl Membership {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn connected(&mut self, id: &str, now_ms: u64) {
        let p = self.peers.entry(id.to_owned()).or_default();
        p.connected = true;
        p.last_seen_ms = now_ms;
        p.down_since_ms = None;
    }

    pub fn disconnected(&mut self, id: &str, now_ms: u64) {
        let p = self.peers.entry(id.to_owned()).or_default();
        if p.connected {
            self.downs += 1;
        }
        p.connected = false;
        p.down_since_ms = Some(now_ms);
    }

    pub fn advert(&mut self, id: &str, advert: Bytes, now_ms: u64) {
        let p = self.peers.entry(id.to_owned()).or_default();
        p.advert = Some(advert);
        p.advert_at_ms = now_ms;
        p.last_seen_ms = now_ms;
    }

    pub fn get(&self, id: &str) -> Option<&PeerState> {
        self.peers.get(id)
    }

    pub fn is_alive(&self, id: &str) -> bool {
        self.peers.get(id).is_some_and(|p| p.connected)
    }

    pub fn connected_count(&self) -> usize {
        self.peers.values().filter(|p| p.connected).count()
    }

    /// Forget a peer that is no longer a member.
    pub fn forget(&mut self, id: &str) {
        self.peers.remove(id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_disconnect_and_adverts() {
        let mut m = Membership::new();
        assert!(!m.is_alive("b"));
        m.connected("b", 1_000);
        assert!(m.is_alive("b"));
        m.advert("b", Bytes::from_static(b"{}"), 2_000);
        assert_eq!(m.get("b").unwrap().last_seen_ms, 2_000);
        m.disconnected("b", 3_000);
        assert!(!m.is_alive("b"));
        assert_eq!(m.get("b").unwrap().down_since_ms, Some(3_000));
        assert_eq!(m.downs, 1);
        // a second down event for a peer already down is not counted again
        m.disconnected("b", 3_500);
        assert_eq!(m.downs, 1);
        assert_eq!(m.connected_count(), 0);
        // the advert is kept, with its time, so readers can judge staleness
        assert_eq!(m.get("b").unwrap().advert_at_ms, 2_000);
    }
}
