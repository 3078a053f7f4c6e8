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
pub async fn serve(raft: &super::RaftNode, kind: Kind, payload: &[u8]) -> Result<Vec<u8>, String> {
    fn enc<T: Serialize>(v: &T) -> Result<Vec<u8>, String> {
        serde_json::to_vec(v).map_err(|e| e.to_string())
    }
    let bad = |e: serde_json::Error| format!("bad raft rpc: {e}");
    match kind {
        Kind::RaftVote => enc(&raft
            .vote(serde_json::from_slice(payload).map_err(bad)?)
            .await),
        Kind::RaftAppend => enc(&raft
            .append_entries(serde_json::from_slice(payload).map_err(bad)?)
            .await),
        Kind::RaftSnapshot => enc(&raft
            .install_snapshot(serde_json::from_slice(payload).map_err(bad)?)
            .await),
        other => Err(format!("not a raft rpc: {other:?}")),
    }
}
