//! Leadership handover by a draining leader, with what openraft 0.9 offers.
//!
//! 0.9 has no leader transfer (`Raft::trigger().transfer_leader` and the
//! TimeoutNow it sends arrive in 0.10). What it has is enough for one:
//!
//! 1. the leader stops standing for election ([`hold_candidacy`]), so once it
//!    steps down it never takes the lead back while it drains;
//! 2. it picks a voter whose log matches its own ([`successors`]);
//! 3. that voter stands for election at once ([`campaign`], asked through the
//!    cluster's control message). Its vote request carries a higher term and
//!    a log as long as the leader's, so the leader grants it (a leader's own
//!    lease runs from when it was elected, long past) and steps down. With
//!    three voters, the candidate's vote and the leader's are a majority: the
//!    successor leads within one round trip. With five, the other followers
//!    still hold the old leader's lease and refuse; the old leader has stepped
//!    down and stopped its heartbeats, so they elect one of themselves after
//!    one election timeout, as if it had stopped, but while it still serves.

use openraft::ServerState;

use super::RaftNode;

/// Voters other than this node whose replicated log reaches the leader's
/// last entry, as Raft ids; empty unless this node is the leader.
pub fn successors(raft: &RaftNode) -> Vec<u64> {
    let m = raft.metrics().borrow().clone();
    if m.state != ServerState::Leader {
        return Vec::new();
    }
    let Some(replication) = m.replication.as_ref() else {
        return Vec::new();
    };
    let last = m.last_log_index;
    m.membership_config
        .membership()
        .voter_ids()
        .filter(|id| *id != m.id)
        .filter(|id| {
            replication
                .get(id)
                .is_some_and(|matched| matched.map(|l| l.index) >= last)
        })
        .collect()
}

/// Whether this node may start an election when it hears no leader: held
/// (false) while it drains, so it does not take back what it handed over.
pub fn hold_candidacy(raft: &RaftNode, held: bool) {
    raft.runtime_config().elect(!held);
}

/// Stand for election now (a successor asked by the draining leader).
pub async fn campaign(raft: &RaftNode) -> Result<(), openraft::error::Fatal<u64>> {
    raft.trigger().elect().await
}
