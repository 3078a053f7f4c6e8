//! ggml RPC tunnels to and from peers (`crate::tunnel`), on the mesh's
//! connections.

use super::Cluster;
use crate::tunnel::{self, TunnelError};

impl Cluster {
    /// Bridge tunnels peers open to this node's RPC server on 127.0.0.1:`port`
    /// (None: refuse them, as when `engine.rpc_server` is off).
    pub fn set_rpc_port(&self, port: Option<u16>) {
        self.tunnels.set_serve_port(port);
    }

    /// Open a loopback listener whose connections reach `peer`'s RPC server
    /// through the pair's mTLS QUIC connection; its port.
    pub fn open_rpc_tunnel(&self, peer: &str) -> Result<u16, TunnelError> {
        if peer == self.cfg.node_id {
            return Err(TunnelError::Protocol(
                peer.into(),
                "a node does not tunnel to itself (use its RPC port)".into(),
            ));
        }
        if self.mesh.connection(peer).is_none() {
            return Err(TunnelError::NoPeer(peer.into()));
        }
        let mesh = self.mesh.clone();
        let id = peer.to_string();
        self.tunnels.open(peer, move || mesh.connection(&id))
    }

    /// Close the tunnel listening on `port`; false when there is none.
    pub fn close_rpc_tunnel(&self, port: u16) -> bool {
        self.tunnels.close(port)
    }

    /// Tunnels opened and served, with their byte counts.
    pub fn rpc_tunnels(&self) -> tunnel::Status {
        self.tunnels.status()
    }
}
