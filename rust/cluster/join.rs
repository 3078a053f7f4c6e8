//! The join exchange: the only thing a connection without a client
//! certificate may do.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::{resolve, valid_node_id, ClusterError};
use crate::consensus::{Command, NodeMeta};
use crate::forward::{self, ErrorBody};
use crate::transport::tls::{self, ClusterCa, JoinToken, NodeCert, TlsMaterial, SERVER_NAME};
use crate::transport::{self, Kind};

#[derive(Serialize, Deserialize)]
pub struct JoinRequest {
    pub secret: String,
    pub node_id: String,
    /// Where the joiner listens; an unspecified IP is replaced by the address
    /// the join came from.
    pub p2p_address: String,
    pub api_address: String,
}

/// The largest join request a member reads: an honest one (a 32-hex secret,
/// an id of at most 128 bytes, two addresses) is a few hundred bytes.
pub const MAX_JOIN_REQUEST: usize = 4096;

/// Why a join request is refused before its token is even checked.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum JoinParseError {
    #[error("join request of {0} bytes exceeds {MAX_JOIN_REQUEST}")]
    TooLarge(usize),
    #[error("malformed join request")]
    Malformed,
    #[error("invalid node id")]
    NodeId,
    #[error("invalid address")]
    Address,
}

impl JoinRequest {
    /// Parse what an unauthenticated peer sent: bounded in size, every field
    /// checked, so nothing unbounded reaches the log or the CA.
    pub fn parse(payload: &[u8]) -> Result<Self, JoinParseError> {
        if payload.len() > MAX_JOIN_REQUEST {
            return Err(JoinParseError::TooLarge(payload.len()));
        }
        let req: JoinRequest =
            serde_json::from_slice(payload).map_err(|_| JoinParseError::Malformed)?;
        if !valid_node_id(&req.node_id) {
            return Err(JoinParseError::NodeId);
        }
        let addr_ok = |a: &str| a.len() <= 512 && a.chars().all(|c| c.is_ascii_graphic());
        if req.p2p_address.parse::<SocketAddr>().is_err() || !addr_ok(&req.api_address) {
            return Err(JoinParseError::Address);
        }
        Ok(req)
    }
}

/// What a joiner receives: the CA certificate and its own certificate and
/// key, never the CA key (only voters hold it, see `ca.rs`).
#[derive(Serialize, Deserialize)]
pub struct JoinResponse {
    pub ca_cert_pem: String,
    pub node_cert_pem: String,
    pub node_key_pem: String,
    pub secret: String,
    pub members: Vec<NodeMeta>,
}

impl JoinResponse {
    pub fn material(&self) -> Result<TlsMaterial, ClusterError> {
        Ok(TlsMaterial {
            ca: ClusterCa::from_pem(&self.ca_cert_pem, None)?,
            node: NodeCert {
                cert_pem: self.node_cert_pem.clone(),
                key_pem: self.node_key_pem.clone(),
            },
            secret: self.secret.clone(),
        })
    }
}

/// How long a joiner keeps trying seeds that do not answer: members may still
/// be starting.
const JOIN_PATIENCE: Duration = Duration::from_secs(30);

/// Ask the seeds in turn until one admits us. A refused token ends at once.
pub async fn request(
    seeds: &[String],
    token: &JoinToken,
    req: &JoinRequest,
    failure_timeout: Duration,
) -> Result<JoinResponse, ClusterError> {
    let client = transport::client_config(tls::join_client_config(token)?, failure_timeout)?;
    let endpoint = quinn::Endpoint::client("0.0.0.0:0".parse().expect("static address"))?;
    let body = serde_json::to_vec(req).map_err(|e| ClusterError::Join(e.to_string()))?;
    let deadline = Instant::now() + JOIN_PATIENCE;
    let mut last = String::from("no seed given");
    loop {
        for seed in seeds {
            let addr = match resolve(seed).await {
                Ok(a) => a,
                Err(e) => {
                    last = e.to_string();
                    continue;
                }
            };
            let attempt = async {
                let conn = endpoint
                    .connect_with(client.clone(), addr, SERVER_NAME)?
                    .await?;
                let f =
                    transport::call(&conn, Kind::JoinRequest, &body, Duration::from_secs(15)).await;
                conn.close(0u32.into(), b"joined");
                f
            };
            match attempt.await {
                Ok(f) if f.kind == Kind::JoinResponse => {
                    endpoint.close(0u32.into(), b"");
                    return serde_json::from_slice(&f.payload).map_err(|e| {
                        ClusterError::Join(format!("malformed join answer from {seed}: {e}"))
                    });
                }
                Ok(f) => {
                    let msg = serde_json::from_slice::<ErrorBody>(&f.payload)
                        .map(|b| (b.status, b.message))
                        .unwrap_or((500, "malformed error".into()));
                    if msg.0 == 403 {
                        return Err(ClusterError::JoinRefused(format!("{seed}: {}", msg.1)));
                    }
                    // the id is taken by a member that is up: retrying won't help
                    if msg.0 == 409 {
                        return Err(ClusterError::Join(format!("{seed}: {}", msg.1)));
                    }
                    last = format!("{seed}: {}", msg.1);
                }
                Err(transport::TransportError::Connection(
                    quinn::ConnectionError::TransportError(e),
                )) if e.to_string().contains("pinned") => {
                    return Err(ClusterError::JoinRefused(format!(
                        "{seed} is not a member of the cluster the token names: {e}"
                    )));
                }
                Err(e) => last = format!("{seed}: {e}"),
            }
        }
        if Instant::now() >= deadline {
            return Err(ClusterError::Join(last));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

impl super::Cluster {
    /// Answer a join request: from the joiner itself on a connection without
    /// a certificate (`via` None), or passed on by member `via` that does not
    /// hold the CA key. Signed here when this node holds the key; else passed
    /// on to a voter, unless it was passed on already.
    pub(super) async fn handle_join(
        &self,
        conn: &quinn::Connection,
        payload: &[u8],
        via: Option<&str>,
    ) -> (Kind, Vec<u8>) {
        let err = |status: u16, message: String| {
            (
                Kind::Error,
                serde_json::to_vec(&forward::ErrorBody { status, message }).unwrap_or_default(),
            )
        };
        let req = match JoinRequest::parse(payload) {
            Ok(r) => r,
            Err(e) => return err(400, e.to_string()),
        };
        if !crate::transport::tls::secrets_match(&req.secret, &self.join_secret()) {
            self.counters.joins_refused.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                "refused join of '{}' from {}: wrong token",
                req.node_id,
                conn.remote_address()
            );
            return err(403, "invalid join token".into());
        }
        // the joiner proved the token: the address it reached us at is one
        // our peers can use (only authenticated peers teach us our address)
        self.learn_ip(conn);
        let p2p_address = match req.p2p_address.parse::<SocketAddr>() {
            Ok(a) if a.ip().is_unspecified() => {
                SocketAddr::new(conn.remote_address().ip(), a.port()).to_string()
            }
            _ => req.p2p_address.clone(),
        };
        let Some(ca) = self.voter_signer() else {
            if via.is_some() {
                return err(
                    503,
                    format!(
                        "node '{}' holds no CA key yet (a voter gets it a moment after its \
                         promotion)",
                        self.cfg.node_id
                    ),
                );
            }
            let req = JoinRequest { p2p_address, ..req };
            return self.forward_join(&req).await;
        };
        // a certificate for a member that is up would let the joiner speak
        // as it; a node that lost its data dir rejoins once it is seen down
        if req.node_id == self.cfg.node_id || self.lock_membership().is_alive(&req.node_id) {
            return err(
                409,
                format!(
                    "node id '{}' belongs to a member that is up; give the new node its own id",
                    req.node_id
                ),
            );
        }
        let cert = match ca.issue(&req.node_id) {
            Ok(c) => c,
            Err(e) => return err(500, e.to_string()),
        };
        let meta = NodeMeta {
            name: req.node_id.clone(),
            p2p_address,
            api_address: req.api_address.clone(),
        };
        if let Err(e) = self.add_member(meta).await {
            return err(503, format!("cannot add the node to the cluster: {e}"));
        }
        // recorded so that removing the node denies this very certificate
        let certified = match cert.fingerprint() {
            Ok(fingerprint) => self
                .propose(Command::Certify {
                    node: req.node_id.clone(),
                    fingerprint,
                })
                .await
                .map(|_| ()),
            Err(e) => Err(e.into()),
        };
        if let Err(e) = certified {
            tracing::warn!("could not record the certificate of '{}': {e}", req.node_id);
        }
        match via {
            // counted where the joiner came in
            Some(member) => tracing::info!(
                "node '{}' joined through '{member}', signed here",
                req.node_id
            ),
            None => {
                self.counters.joins_accepted.fetch_add(1, Ordering::Relaxed);
                tracing::info!(
                    "node '{}' joined from {}",
                    req.node_id,
                    conn.remote_address()
                );
            }
        }
        let resp = JoinResponse {
            ca_cert_pem: ca.cert_pem.clone(),
            node_cert_pem: cert.cert_pem,
            node_key_pem: cert.key_pem,
            secret: self.join_secret(),
            // this node as the joiner can reach it: serve_connection has
            // learned our IP from this very connection (learn_ip above) if we
            // listen on 0.0.0.0
            members: self
                .store
                .nodes()
                .into_values()
                .map(|m| {
                    if m.name == self.cfg.node_id {
                        self.my_meta()
                    } else {
                        m
                    }
                })
                .collect(),
        };
        (
            Kind::JoinResponse,
            serde_json::to_vec(&resp).unwrap_or_default(),
        )
    }
}
