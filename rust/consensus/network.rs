//! Raft RPCs as request/response frames over any [`Rpc`] transport: the QUIC
//! mesh in a node, an in-memory map in tests.

use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::types::{NodeMeta, TypeConfig};
use crate::transport::Kind;

type NodeId = u64;

/// Why an RPC did not get an answer.
#[derive(Debug, thiserror::Error)]
pub enum RpcError {
    /// No connection to the peer: back off, it is down or not dialled yet.
    #[error("peer '{0}' is unreachable")]
    Unreachable(String),
    #[error("rpc failed: {0}")]
    Failed(String),
}

/// Send `payload` as a `kind` frame to the node named `peer`; return the
/// answer's payload.
pub trait Rpc: Clone + Send + Sync + 'static {
    fn call(
        &self,
        peer: &str,
        kind: Kind,
        payload: Vec<u8>,
        timeout: Duration,
    ) -> impl Future<Output = Result<Bytes, RpcError>> + Send;
}

/// openraft's network factory over an [`Rpc`].
#[derive(Clone)]
pub struct Network<R: Rpc> {
    rpc: R,
}

impl<R: Rpc> Network<R> {
    pub fn new(rpc: R) -> Self {
        Self { rpc }
    }
}

pub struct Client<R: Rpc> {
    rpc: R,
    target: NodeId,
    name: String,
}

impl<R: Rpc> RaftNetworkFactory<TypeConfig> for Network<R> {
    type Network = Client<R>;

    async fn new_client(&mut self, target: NodeId, node: &NodeMeta) -> Self::Network {
        Client {
            rpc: self.rpc.clone(),
            target,
            name: node.name.clone(),
        }
    }
}

impl<R: Rpc> Client<R> {
    async fn send<Req, Resp, E>(
        &self,
        kind: Kind,
        req: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<NodeId, NodeMeta, E>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let body = serde_json::to_vec(req).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let answer = self
            .rpc
            .call(&self.name, kind, body, option.hard_ttl())
            .await
            .map_err(|e| match e {
                RpcError::Unreachable(_) => RPCError::Unreachable(Unreachable::new(&e)),
                RpcError::Failed(_) => RPCError::Network(NetworkError::new(&e)),
            })?;
        let res: Result<Resp, E> = serde_json::from_slice(&answer)
            .map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        res.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl<R: Rpc> RaftNetwork<TypeConfig> for Client<R> {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, NodeMeta, RaftError<NodeId>>> {
        self.send(Kind::RaftAppend, &rpc, &option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, NodeMeta, RaftError<NodeId, InstallSnapshotError>>,
    > {
        self.send(Kind::RaftSnapshot, &rpc, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, NodeMeta, RaftError<NodeId>>> {
        self.send(Kind::RaftVote, &rpc, &option).await
    }
}

/// Serve one Raft RPC frame on `raft`; the answer frame's payload.
/// Why a Raft RPC from a peer was not served.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The RPC speaks for a node other than the one the connection proved.
    #[error("raft rpc for node {claimed} on the connection of node {proved}")]
    Impersonation { claimed: u64, proved: u64 },
    #[error("{0}")]
    Failed(String),
}

/// Serve a Raft RPC that arrived on the connection of node `from` (its raft
/// id, from its certificate): the vote it carries must be that node's.
pub async fn serve(
    raft: &super::RaftNode,
    kind: Kind,
    payload: &[u8],
    from: u64,
) -> Result<Vec<u8>, ServeError> {
    fn enc<T: Serialize>(v: &T) -> Result<Vec<u8>, ServeError> {
        serde_json::to_vec(v).map_err(|e| ServeError::Failed(e.to_string()))
    }
    let bad = |e: serde_json::Error| ServeError::Failed(format!("bad raft rpc: {e}"));
    let check = |vote: &openraft::Vote<u64>| match vote.leader_id().voted_for() {
        Some(claimed) if claimed != from => Err(ServeError::Impersonation {
            claimed,
            proved: from,
        }),
        _ => Ok(()),
    };
    match kind {
        Kind::RaftVote => {
            let req: openraft::raft::VoteRequest<u64> =
                serde_json::from_slice(payload).map_err(bad)?;
            check(&req.vote)?;
            enc(&raft.vote(req).await)
        }
        Kind::RaftAppend => {
            let req: openraft::raft::AppendEntriesRequest<TypeConfig> =
                serde_json::from_slice(payload).map_err(bad)?;
            check(&req.vote)?;
            enc(&raft.append_entries(req).await)
        }
        Kind::RaftSnapshot => {
            let req: openraft::raft::InstallSnapshotRequest<TypeConfig> =
                serde_json::from_slice(payload).map_err(bad)?;
            check(&req.vote)?;
            enc(&raft.install_snapshot(req).await)
        }
        other => Err(ServeError::Failed(format!("not a raft rpc: {other:?}"))),
    }
}
