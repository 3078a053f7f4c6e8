//! The Raft type configuration.

use std::fmt;
use std::io::Cursor;

use serde::{Deserialize, Serialize};

/// What the cluster state records about a node.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeMeta {
    /// The node's own id (a string it chose and keeps in its data dir).
    pub name: String,
    /// host:port of its QUIC endpoint.
    pub p2p_address: String,
    /// Base URL or host:port of its HTTP API.
    pub api_address: String,
}

impl fmt::Display for NodeMeta {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.name, self.p2p_address)
    }
}

/// A catalogue command's keys and values together, at most. With
/// [`super::MAX_PAYLOAD_ENTRIES`] of them in one AppendEntries and JSON's
/// escaping (at worst doubling a value), a batch stays under the frame limit.
pub const MAX_COMMAND_BYTES: usize = 2 << 20;

/// A change to the replicated state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Command {
    /// Insert or update a node's metadata (its addresses changed).
    SetNode(NodeMeta),
    /// A model deleted at `deleted_at_ms` (unix ms): every node removes its
    /// copy, and replication does not bring back a version older than this.
    Tombstone { model: String, deleted_at_ms: u64 },
    /// Compare-and-set on the model catalogue (`StateMachine::catalog`): when
    /// every `expect` key holds the given value (None: absent), apply every
    /// put (None: remove) and answer true; otherwise change nothing and answer
    /// false, so a read-modify-write from any node never loses another's update.
    Catalog {
        expect: Vec<(String, Option<String>)>,
        puts: Vec<(String, Option<String>)>,
    },
    /// The certificate (hex sha256) a member issued to `node` at its join,
    /// so removing the node can deny it.
    Certify { node: String, fingerprint: String },
    /// Put a removed node's certificate on the deny list (leader only).
    Deny { node: String, fingerprint: String },
    /// A new join secret: every member answers joins with it from then on.
    RotateSecret(String),
}

impl Command {
    /// Whether a follower may ask the leader to commit this command
    /// (`SetNode` goes through the join path only).
    pub fn proposable(&self) -> bool {
        matches!(
            self,
            Command::Tombstone { .. }
                | Command::Catalog { .. }
                | Command::Certify { .. }
                | Command::RotateSecret(_)
        )
    }

    /// Refuse what no honest node sends: huge names, keys or values.
    pub fn check(&self) -> Result<(), String> {
        match self {
            Command::Tombstone { model, .. } if model.is_empty() || model.len() > 512 => {
                Err("invalid model name".into())
            }
            Command::Catalog { expect, puts } => {
                if expect.len() + puts.len() > 4096 {
                    return Err("too many catalogue keys in one command".into());
                }
                let bytes: usize = expect
                    .iter()
                    .chain(puts)
                    .map(|(k, v)| k.len() + v.as_ref().map_or(0, String::len))
                    .sum();
                if bytes > MAX_COMMAND_BYTES {
                    return Err("catalogue command over 2 MiB".into());
                }
                if expect
                    .iter()
                    .chain(puts)
                    .any(|(k, _)| k.is_empty() || k.len() > 600)
                {
                    return Err("invalid catalogue key".into());
                }
                Ok(())
            }
            Command::Certify { node, fingerprint } | Command::Deny { node, fingerprint }
                if node.is_empty()
                    || node.len() > 128
                    || fingerprint.len() != 64
                    || !fingerprint.bytes().all(|b| b.is_ascii_hexdigit()) =>
            {
                Err("invalid certificate record".into())
            }
            Command::RotateSecret(s)
                if s.len() < 16
                    || s.len() > 128
                    || !s.bytes().all(|b| b.is_ascii_alphanumeric()) =>
            {
                Err("invalid join secret".into())
            }
            _ => Ok(()),
        }
    }
}

openraft::declare_raft_types!(
    /// Raft types of the cluster state.
    pub TypeConfig:
        D = Command,
        R = bool,
        NodeId = u64,
        Node = NodeMeta,
        SnapshotData = Cursor<Vec<u8>>,
);

/// Raft wants a u64 id; nodes name themselves with strings. The first 8 bytes
/// of the name's sha256: collisions need ~2^32 nodes.
pub fn raft_id(name: &str) -> u64 {
    let h = crate::transport::tls::sha256(name.as_bytes());
    u64::from_be_bytes([h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7]])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::frame::MAX_PAYLOAD;
    use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId, Vote};

    #[test]
    fn the_largest_append_batch_fits_in_one_frame() {
        // the worst value for JSON: every character escaped
        let value = "\"".repeat(MAX_COMMAND_BYTES - 600);
        let cmd = Command::Catalog {
            expect: vec![],
            puts: vec![("k".repeat(600), Some(value))],
        };
        cmd.check().unwrap();
        let entries: Vec<Entry<TypeConfig>> = (0..super::super::MAX_PAYLOAD_ENTRIES)
            .map(|i| Entry {
                log_id: LogId::new(CommittedLeaderId::new(1, 1), i),
                payload: EntryPayload::Normal(cmd.clone()),
            })
            .collect();
        let req = openraft::raft::AppendEntriesRequest::<TypeConfig> {
            vote: Vote::new(1, 1),
            prev_log_id: None,
            entries,
            leader_commit: None,
        };
        let bytes = serde_json::to_vec(&req).unwrap().len();
        assert!(bytes <= MAX_PAYLOAD, "{bytes} bytes");
    }
}
