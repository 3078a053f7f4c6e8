//! Consensus on the cluster state with openraft (0.9, the stable line).
//!
//! - [`types`]: the Raft type configuration, node metadata and commands.
//! - [`store`]: the log, vote and state machine, persisted together in one file
//!   that is replaced atomically on every change.
//! - [`handover`]: a draining leader hands leadership to a caught-up voter.
//! - [`network`]: Raft RPCs over the QUIC mesh, behind the [`network::Rpc`]
//!   trait so tests can run Raft over an in-memory network.
//!
//! The replicated state is the member list (at most [`MAX_VOTERS`] voters, the
//! rest learners) with each node's metadata (name, P2P and API addresses),
//! and model tombstones (`Command::Tombstone`) so a delete reaches every node.

pub mod handover;
pub mod network;
pub mod store;
pub mod types;

use std::sync::Arc;

pub use types::{raft_id, Command, NodeMeta, TypeConfig};

/// An odd number that survives two failures; more voters only slow commits.
pub const MAX_VOTERS: usize = 5;
/// Log entries in one AppendEntries at most (see `raft_config`).
pub const MAX_PAYLOAD_ENTRIES: u64 = 3;

pub type RaftNode = openraft::Raft<TypeConfig>;

/// Raft timing. Heartbeats every 200 ms; a follower that hears nothing for
/// 0.8–1.6 s stands for election (four heartbeats lost at least, so a busy
/// machine does not trigger elections), so a lost leader is replaced within
/// about 3 s, inside the 5 s the product promises.
pub fn raft_config() -> Arc<openraft::Config> {
    let cfg = openraft::Config {
        cluster_name: "ollama-distributed".into(),
        heartbeat_interval: 200,
        election_timeout_min: 800,
        election_timeout_max: 1600,
        // The log is small (membership and metadata); snapshot often so the
        // state file stays small.
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(200),
        max_in_snapshot_log_to_keep: 50,
        // Few entries per AppendEntries, so a batch of the largest commands
        // fits in one frame (types::MAX_COMMAND_BYTES); entries are small and
        // rare, so this costs nothing in practice.
        max_payload_entries: MAX_PAYLOAD_ENTRIES,
        ..Default::default()
    };
    Arc::new(cfg.validate().expect("static raft config is valid"))
}
