//! Only voters hold the CA key (`data_dir/tls/ca.key`), so a learner that is
//! compromised cannot mint identities.
//!
//! - A joiner receives the CA certificate and its own certificate, never the
//!   key. A member without the key passes a join on to a voter over their
//!   mutually authenticated connection, rather than redirecting the joiner:
//!   the joiner may not reach the voter's address at all (it knows only the
//!   seed it was given), "join through any member" stays true, and the
//!   joiner still pins the CA with its token on the one connection it makes.
//!   A voter never passes a join on again (no loops); one that lacks the key
//!   answers 503, and the joiner retries.
//! - A node that becomes a voter (promotion, or a removed voter's heir) asks
//!   a voter for the key over mTLS; a voter gives it only to a node its own
//!   membership lists as a voter, and the key is checked against the CA
//!   certificate before it is kept.
//! - A node that is not a voter (a learner, a removed node, or a learner from
//!   a release where every member held the key) deletes the key, from memory
//!   and from disk, and says so in its log.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::join::JoinRequest;
use super::{call_for, Cluster, ClusterError, CONTROL_TIMEOUT};
use crate::consensus::raft_id;
use crate::forward::ErrorBody;
use crate::transport::tls::{ClusterCa, TlsMaterial};
use crate::transport::{self, Kind};

/// How often a node checks whether it should hold the key: a new voter gets
/// it within this long of its promotion being applied.
const CA_KEY_EVERY: Duration = Duration::from_millis(500);
/// A voter that cannot get the key for this long says so at warn level.
const CA_KEY_WARN_AFTER: Duration = Duration::from_secs(10);

impl Cluster {
    /// The CA with its key, on a node that holds it.
    pub(super) fn signer(&self) -> Option<Arc<ClusterCa>> {
        self.ca_key
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The CA with its key when this node is a voter: what signs joins (a
    /// learner that still has a key from an older release, in the moment
    /// before `ca_key_loop` deletes it, signs nothing).
    pub(super) fn voter_signer(&self) -> Option<Arc<ClusterCa>> {
        self.signer()
            .filter(|_| self.is_voter(&self.cfg.node_id) == Some(true))
    }

    /// Whether this node holds the CA key.
    pub fn holds_ca_key(&self) -> bool {
        self.signer().is_some()
    }

    /// Whether node `name` is a voter in this node's view of the membership;
    /// None while the view holds no voter (Raft not loaded or not joined yet).
    fn is_voter(&self, name: &str) -> Option<bool> {
        let m = self.raft.metrics().borrow().clone();
        let voters: BTreeSet<u64> = m.membership_config.membership().voter_ids().collect();
        (!voters.is_empty()).then(|| voters.contains(&raft_id(name)))
    }

    /// The other voters' names, the leader first.
    fn other_voters(&self) -> Vec<String> {
        let m = self.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership();
        let me = raft_id(&self.cfg.node_id);
        let mut ids: Vec<u64> = membership.voter_ids().filter(|v| *v != me).collect();
        ids.sort_by_key(|v| Some(*v) != m.current_leader);
        ids.iter()
            .filter_map(|id| membership.get_node(id).map(|n| n.name.clone()))
            .collect()
    }

    /// Keep the CA key exactly while this node is a voter.
    pub(super) async fn ca_key_loop(self: Arc<Self>) {
        let mut tick = tokio::time::interval(CA_KEY_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut lacking_since: Option<Instant> = None;
        loop {
            tick.tick().await;
            match (self.is_voter(&self.cfg.node_id), self.holds_ca_key()) {
                (Some(true), false) => match self.fetch_ca_key().await {
                    Ok(()) => lacking_since = None,
                    Err(e) => {
                        let since = *lacking_since.get_or_insert_with(Instant::now);
                        if since.elapsed() >= CA_KEY_WARN_AFTER {
                            tracing::warn!(
                                "this node is a voter but holds no cluster CA key and no voter \
                                 gave it one ({e}); joins through it go to other voters"
                            );
                            lacking_since = Some(Instant::now() + Duration::from_secs(50));
                        } else {
                            tracing::debug!("no CA key yet: {e}");
                        }
                    }
                },
                (Some(false), _) => self.drop_ca_key(),
                _ => lacking_since = None,
            }
        }
    }

    /// Forget the CA key and delete its file: this node is not a voter.
    fn drop_ca_key(&self) {
        let had = self
            .ca_key
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .is_some();
        let dir = self.cfg.data_dir.join("tls");
        match TlsMaterial::remove_ca_key(&dir) {
            Ok(true) => tracing::warn!(
                "this node is not a voter: deleted the cluster CA key {} (only voters hold it; \
                 a learner that is compromised must not be able to mint identities)",
                TlsMaterial::ca_key_path(&dir).display()
            ),
            Ok(false) if had => {
                tracing::info!("this node is no longer a voter: it forgot the cluster CA key")
            }
            Ok(false) => {}
            Err(e) => tracing::error!(
                "this node is not a voter and must not keep the cluster CA key, but cannot \
                 delete it: {e}"
            ),
        }
    }

    /// Ask the other voters, the leader first, for the CA key; keep the first
    /// that matches the CA certificate.
    async fn fetch_ca_key(&self) -> Result<(), ClusterError> {
        let mut last = String::from("no other voter is connected");
        for voter in self.other_voters() {
            let Some(conn) = self.mesh.connection(&voter) else {
                continue;
            };
            let pem: String = match call_for(&conn, Kind::CaKey, b"").await {
                Ok(p) => p,
                Err(e) => {
                    last = format!("'{voter}': {e}");
                    continue;
                }
            };
            let ca = ClusterCa::from_pem(&self.material.ca.cert_pem, Some(&pem))?;
            TlsMaterial::save_ca_key(&self.cfg.data_dir.join("tls"), &ca)?;
            *self.ca_key.lock().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(ca));
            tracing::info!(
                "this node is a voter: it now holds the cluster CA key (from '{voter}')"
            );
            return Ok(());
        }
        Err(ClusterError::Raft(last))
    }

    /// Answer a peer's request for the CA key: only to a voter, only by one.
    pub(super) fn serve_ca_key(&self, peer: &str) -> Result<String, String> {
        let me = &self.cfg.node_id;
        let key = self
            .signer()
            .and_then(|ca| ca.key_pem.clone())
            .ok_or_else(|| format!("node '{me}' holds no CA key"))?;
        if self.is_voter(peer) != Some(true) {
            tracing::warn!("refused the cluster CA key to '{peer}': not a voter");
            return Err(format!(
                "node '{peer}' is not a voter in the membership node '{me}' knows; only voters \
                 hold the CA key"
            ));
        }
        tracing::info!("gave the cluster CA key to voter '{peer}'");
        Ok(key)
    }

    /// A join that reached a node without the CA key: have a voter sign it,
    /// the leader first, and hand its answer back as it is. `req` carries the
    /// joiner's address as this node saw it.
    pub(super) async fn forward_join(&self, req: &JoinRequest) -> (Kind, Vec<u8>) {
        let body = serde_json::to_vec(req).unwrap_or_default();
        let voters = self.other_voters();
        let mut last = String::from("no voter is connected");
        for voter in &voters {
            let Some(conn) = self.mesh.connection(voter) else {
                continue;
            };
            match transport::call(&conn, Kind::JoinRequest, &body, CONTROL_TIMEOUT).await {
                Ok(f) if f.kind == Kind::JoinResponse => {
                    self.counters.joins_accepted.fetch_add(1, Ordering::Relaxed);
                    self.counters
                        .joins_forwarded
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::info!(
                        "node '{}' joined through this node, signed by voter '{voter}'",
                        req.node_id
                    );
                    return (f.kind, f.payload.to_vec());
                }
                Ok(f) => {
                    let e = serde_json::from_slice::<ErrorBody>(&f.payload).ok();
                    match e {
                        // that voter lacks the key a moment after its promotion: the next
                        Some(e) if e.status == 503 => last = format!("'{voter}': {}", e.message),
                        // a refusal (token, id in use) is the joiner's to read
                        Some(_) => return (f.kind, f.payload.to_vec()),
                        None => last = format!("'{voter}': malformed answer"),
                    }
                }
                Err(e) => last = format!("'{voter}': {e}"),
            }
        }
        let nodes = self.store.nodes();
        let at: Vec<String> = voters
            .iter()
            .map(|v| match nodes.get(v) {
                Some(m) => format!("'{v}' at {}", m.p2p_address),
                None => format!("'{v}'"),
            })
            .collect();
        let message = format!(
            "node '{}' is not a voter and holds no CA key, and no voter signed the join ({last}); \
             join through a voter: {}",
            self.cfg.node_id,
            if at.is_empty() {
                "none known".into()
            } else {
                at.join(", ")
            }
        );
        (
            Kind::Error,
            serde_json::to_vec(&ErrorBody {
                status: 503,
                message,
            })
            .unwrap_or_default(),
        )
    }
}
