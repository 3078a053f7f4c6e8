//! Membership changes through the leader: add (joins, address changes),
//! remove, and promotion of caught-up learners to voters.

use std::collections::BTreeSet;
use std::time::Duration;

use openraft::{ChangeMembers, ServerState};

use super::{call_for, Cluster, ClusterError};
use crate::consensus::{raft_id, Command, NodeMeta, RaftNode};
use crate::transport::Kind;

impl Cluster {
    /// Add or update a node in the Raft membership, through the leader.
    pub(super) async fn add_member(&self, meta: NodeMeta) -> Result<(), ClusterError> {
        match self.leader_connection(true)? {
            None => self.leader_add(meta).await,
            Some(conn) => {
                let body = serde_json::to_vec(&meta).unwrap_or_default();
                call_for(&conn, Kind::AddMember, &body).await
            }
        }
    }

    /// Remove node `name` from the cluster, through the leader. Only a node
    /// that is down: it leaves the Raft membership, so it no longer counts
    /// toward a quorum, and a voter's place goes to a caught-up learner when
    /// there is one. Needs a quorum of the current voters, as every change.
    pub async fn remove_member(&self, name: &str) -> Result<(), ClusterError> {
        if name == self.cfg.node_id {
            return Err(ClusterError::Config(
                "a node cannot remove itself; stop it, then remove it from another node".into(),
            ));
        }
        match self.leader_connection(true)? {
            None => self.leader_remove(name).await,
            Some(conn) => {
                let body = serde_json::to_vec(name).unwrap_or_default();
                call_for(&conn, Kind::RemoveMember, &body).await
            }
        }
    }

    async fn leader_remove(&self, name: &str) -> Result<(), ClusterError> {
        let nid = raft_id(name);
        let m = self.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership();
        if membership.get_node(&nid).is_none() {
            return Err(ClusterError::Config(format!(
                "node '{name}' is not a member; see GET /api/distributed/nodes"
            )));
        }
        if name == self.cfg.node_id {
            return Err(ClusterError::Config(
                "the leader cannot remove itself; stop it, then remove it from another node".into(),
            ));
        }
        // The asking node saw it down; this one sees it too within a failure
        // timeout, so wait that long before saying it is up.
        let deadline =
            tokio::time::Instant::now() + self.cfg.failure_timeout + Duration::from_secs(1);
        while self.lock_membership().is_alive(name) {
            if tokio::time::Instant::now() >= deadline {
                return Err(ClusterError::Config(format!(
                    "node '{name}' is up; stop it first (systemctl stop ollama-distributed on it)"
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let voters: BTreeSet<u64> = membership.voter_ids().collect();
        let change = if voters.contains(&nid) {
            let mut next: BTreeSet<u64> = voters.iter().copied().filter(|v| *v != nid).collect();
            // a caught-up, alive learner takes the voter's place
            let index = m.membership_config.log_id().map_or(0, |l| l.index);
            let heir = membership.learner_ids().find(|l| {
                let alive = membership
                    .get_node(l)
                    .is_some_and(|n| self.lock_membership().is_alive(&n.name));
                let caught_up = m
                    .replication
                    .as_ref()
                    .and_then(|r| r.get(l).cloned().flatten())
                    .is_some_and(|matched| matched.index >= index);
                alive && caught_up
            });
            next.extend(heir);
            ChangeMembers::ReplaceAllVoters(next)
        } else {
            ChangeMembers::RemoveNodes(BTreeSet::from([nid]))
        };
        // inside the caller's CONTROL_TIMEOUT, with the wait above
        tokio::time::timeout(
            Duration::from_secs(5),
            self.raft.change_membership(change, false),
        )
        .await
        .map_err(|_| ClusterError::Raft("no quorum to change the membership".into()))?
        .map_err(|e| ClusterError::Raft(e.to_string()))?;
        self.seeds
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
        self.lock_membership().forget(name);
        tracing::info!("node '{name}' removed from the cluster");
        self.deny(name).await
    }

    /// Put every certificate `name` is known to hold on the deny list and
    /// rotate the join secret: a removed node gets back in neither with its
    /// certificate nor with the token it joined with.
    async fn deny(&self, name: &str) -> Result<(), ClusterError> {
        let seen = self
            .seen_certs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
        let fingerprints: BTreeSet<String> =
            self.store.cert_of(name).into_iter().chain(seen).collect();
        if fingerprints.is_empty() {
            tracing::warn!("no certificate recorded for '{name}': only the join secret rotates");
        }
        for fingerprint in fingerprints {
            let cmd = Command::Deny {
                node: name.to_owned(),
                fingerprint,
            };
            self.raft
                .client_write(cmd)
                .await
                .map_err(|e| ClusterError::Raft(e.to_string()))?;
        }
        let secret = crate::transport::tls::new_secret();
        self.raft
            .client_write(Command::RotateSecret(secret))
            .await
            .map_err(|e| ClusterError::Raft(e.to_string()))?;
        Ok(())
    }

    pub(super) async fn leader_add(&self, meta: NodeMeta) -> Result<(), ClusterError> {
        let nid = raft_id(&meta.name);
        let m = self.raft.metrics().borrow().clone();
        let existing = m.membership_config.membership().get_node(&nid).cloned();
        match existing {
            Some(old) if old == meta => {}
            Some(_) => {
                self.raft
                    .client_write(Command::SetNode(meta))
                    .await
                    .map_err(|e| ClusterError::Raft(e.to_string()))?;
            }
            None => {
                self.raft
                    .add_learner(nid, meta, false)
                    .await
                    .map_err(|e| ClusterError::Raft(e.to_string()))?;
            }
        }
        let raft = self.raft.clone();
        tokio::spawn(promote(raft, nid, self.cfg.max_voters));
        Ok(())
    }
}

/// Make a learner a voter once it has caught up, while voters are fewer than
/// `max_voters`. Gives up after a minute or when this node loses leadership.
/// The new voter then fetches the CA key itself (`ca.rs`).
async fn promote(raft: RaftNode, nid: u64, max_voters: usize) {
    for _ in 0..240 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let m = raft.metrics().borrow().clone();
        if m.state != ServerState::Leader {
            return;
        }
        let membership = m.membership_config.membership();
        let voters: BTreeSet<u64> = membership.voter_ids().collect();
        if voters.contains(&nid) || voters.len() >= max_voters {
            return;
        }
        let caught_up = m
            .replication
            .as_ref()
            .and_then(|r| r.get(&nid).cloned().flatten())
            .is_some_and(|matched| {
                m.membership_config
                    .log_id()
                    .is_some_and(|l| matched.index >= l.index)
            });
        if !caught_up {
            continue;
        }
        match raft
            .change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([nid])), true)
            .await
        {
            Ok(_) => return,
            Err(e) => tracing::debug!("promote {nid}: {e}"),
        }
    }
}
