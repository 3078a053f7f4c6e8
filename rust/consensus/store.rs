//! Raft storage in one file: vote, log, committed id, state machine and last
//! snapshot together, written to `data_dir/raft/state.json` by temp file,
//! fsync and rename on every change (retried until it succeeds, see
//! `FileStore::persist`). A crash leaves the previous state or the
//! new one, never a mix, so log and state are always consistent. The state is
//! small (members and metadata, log compacted by snapshots), so rewriting it
//! whole is cheap.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::io::Cursor;
use std::ops::RangeBounds;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use openraft::storage::{LogState, RaftLogReader, RaftSnapshotBuilder, RaftStorage, Snapshot};
use openraft::{
    AnyError, Entry, EntryPayload, LogId, OptionalSend, SnapshotMeta, StorageError, StorageIOError,
    StoredMembership, Vote,
};
use serde::{Deserialize, Serialize};

use super::types::{Command, NodeMeta, TypeConfig};

type NodeId = u64;
type SError = StorageError<NodeId>;

/// The replicated state.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StateMachine {
    pub last_applied: Option<LogId<NodeId>>,
    pub last_membership: StoredMembership<NodeId, NodeMeta>,
    /// Metadata updates by name, on top of what the membership holds.
    pub nodes: BTreeMap<String, NodeMeta>,
    /// Deleted models: name -> when (unix ms), the latest delete kept.
    #[serde(default)]
    pub tombstones: BTreeMap<String, u64>,
    /// The model catalogue: key -> JSON text. Python owns the schema
    /// (`cluster/placement.py`); Raft orders the writes (`Command::Catalog`).
    #[serde(default)]
    pub catalog: BTreeMap<String, String>,
    /// Certificates of removed nodes: fingerprint -> node. Checked on every
    /// accept, so a removed node's old certificate never gets back in.
    #[serde(default)]
    pub denied: BTreeMap<String, String>,
    /// The certificate each node was issued at its join: node -> fingerprint.
    #[serde(default)]
    pub certs: BTreeMap<String, String>,
    /// The join secret once rotated (None: the one the cluster was made with).
    #[serde(default)]
    pub join_secret: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<NodeId, NodeMeta>,
    data: Vec<u8>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Persisted {
    vote: Option<Vote<NodeId>>,
    committed: Option<LogId<NodeId>>,
    last_purged: Option<LogId<NodeId>>,
    log: BTreeMap<u64, Entry<TypeConfig>>,
    sm: StateMachine,
    snapshot: Option<StoredSnapshot>,
    snapshot_seq: u64,
}

struct Inner {
    path: PathBuf,
    p: Persisted,
}

impl Inner {
    /// The state as it is now, to be written outside the lock.
    fn encode(&self) -> Result<(PathBuf, Vec<u8>), std::io::Error> {
        Ok((self.path.clone(), serde_json::to_vec(&self.p)?))
    }
}

/// Write `bytes` to `path` atomically (temp file, fsync, rename). Blocking:
/// called on tokio's blocking pool, never on a runtime worker.
fn write_state(path: &Path, bytes: &[u8]) -> Result<(), std::io::Error> {
    crate::transport::tls::write_private(path, bytes)
        .map_err(|e| std::io::Error::other(e.to_string()))
}

/// The Raft store; cheap to clone, all clones share one state.
#[derive(Clone)]
pub struct FileStore {
    inner: Arc<Mutex<Inner>>,
    failing: Arc<AtomicBool>,
    /// One write at a time, each of the state as it was when the write began,
    /// so the file only moves forward; readers never wait behind an fsync.
    writer: Arc<tokio::sync::Mutex<()>>,
}

fn io<E: std::fmt::Display>(e: E) -> SError {
    StorageIOError::write(AnyError::error(e.to_string())).into()
}

impl FileStore {
    /// Open (or create) the store in `dir`.
    pub fn open(dir: &Path) -> Result<Self, std::io::Error> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join("state.json");
        let p = match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| {
                std::io::Error::other(format!("corrupt raft state {}: {e}", path.display()))
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Persisted::default(),
            Err(e) => return Err(e),
        };
        Ok(Self {
            inner: Arc::new(Mutex::new(Inner { path, p })),
            failing: Arc::new(AtomicBool::new(false)),
            writer: Arc::new(tokio::sync::Mutex::new(())),
        })
    }

    /// Write the state to disk, waiting as long as it takes: a full or
    /// failing disk stalls this node's consensus (it must not vote or ack
    /// what it has not stored) instead of shutting Raft down for good, and it
    /// carries on once the write succeeds. `save_failing()` says so meanwhile.
    async fn persist(&self) -> Result<(), SError> {
        let mut delay = std::time::Duration::from_millis(100);
        let _writing = self.writer.lock().await;
        loop {
            // encoded under the lock (fast), written and fsynced outside it, off the runtime
            let encoded = self.lock().encode(); // the guard ends here, before any await
            let res = match encoded {
                Ok((path, bytes)) => {
                    tokio::task::spawn_blocking(move || write_state(&path, &bytes))
                        .await
                        .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())))
                }
                Err(e) => Err(e),
            };
            match res {
                Ok(()) => {
                    if self.failing.swap(false, Ordering::Relaxed) {
                        tracing::info!("the raft state is saved again");
                    }
                    return Ok(());
                }
                Err(e) => {
                    if !self.failing.swap(true, Ordering::Relaxed) {
                        tracing::error!(
                            "cannot save the raft state: {e}; this node's consensus waits until it \
                             can (free space on the data dir)"
                        );
                    }
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(std::time::Duration::from_secs(5));
                }
            }
        }
    }

    /// Whether the last write of the state failed (and is being retried).
    pub fn save_failing(&self) -> bool {
        self.failing.load(Ordering::Relaxed)
    }

    /// Change the state under the lock (released before any await).
    fn with<T>(&self, f: impl FnOnce(&mut Inner) -> T) -> T {
        f(&mut self.lock())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether this node has ever been part of a cluster.
    pub fn has_state(&self) -> bool {
        let g = self.lock();
        g.p.vote.is_some() || !g.p.log.is_empty() || g.p.sm.last_applied.is_some()
    }

    /// Deleted models and when (unix ms).
    pub fn tombstones(&self) -> BTreeMap<String, u64> {
        self.lock().p.sm.tombstones.clone()
    }

    /// The model catalogue (key -> JSON text).
    pub fn catalog(&self) -> BTreeMap<String, String> {
        self.lock().p.sm.catalog.clone()
    }

    /// Whether a certificate (hex sha256) is on the deny list.
    pub fn is_denied(&self, fingerprint: &str) -> bool {
        self.lock().p.sm.denied.contains_key(fingerprint)
    }

    /// The deny list: fingerprint -> removed node.
    pub fn denied(&self) -> BTreeMap<String, String> {
        self.lock().p.sm.denied.clone()
    }

    /// The certificate fingerprint `node` was issued at its join, if recorded.
    pub fn cert_of(&self, node: &str) -> Option<String> {
        self.lock().p.sm.certs.get(node).cloned()
    }

    /// The rotated join secret, if it has been rotated.
    pub fn join_secret(&self) -> Option<String> {
        self.lock().p.sm.join_secret.clone()
    }

    /// Every node the replicated state knows: membership nodes, updated by
    /// later `SetNode` commands.
    pub fn nodes(&self) -> BTreeMap<String, NodeMeta> {
        let g = self.lock();
        let mut out: BTreeMap<String, NodeMeta> =
            g.p.sm
                .last_membership
                .nodes()
                .map(|(_, n)| (n.name.clone(), n.clone()))
                .collect();
        for (k, v) in &g.p.sm.nodes {
            if out.contains_key(k) {
                out.insert(k.clone(), v.clone());
            }
        }
        out
    }
}

impl RaftLogReader<TypeConfig> for FileStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, SError> {
        let g = self.lock();
        Ok(g.p.log.range(range).map(|(_, e)| e.clone()).collect())
    }
}

impl RaftSnapshotBuilder<TypeConfig> for FileStore {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, SError> {
        let (meta, data) = self
            .with(|g| -> Result<_, serde_json::Error> {
                let data = serde_json::to_vec(&g.p.sm)?;
                g.p.snapshot_seq += 1;
                let snapshot_id = match g.p.sm.last_applied {
                    Some(l) => format!("{}-{}-{}", l.leader_id, l.index, g.p.snapshot_seq),
                    None => format!("--{}", g.p.snapshot_seq),
                };
                let meta = SnapshotMeta {
                    last_log_id: g.p.sm.last_applied,
                    last_membership: g.p.sm.last_membership.clone(),
                    snapshot_id,
                };
                g.p.snapshot = Some(StoredSnapshot {
                    meta: meta.clone(),
                    data: data.clone(),
                });
                Ok((meta, data))
            })
            .map_err(io)?;
        self.persist().await?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl RaftStorage<TypeConfig> for FileStore {
    type LogReader = Self;
    type SnapshotBuilder = Self;

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), SError> {
        self.with(|g| {
            g.p.vote = Some(*vote);
        });
        self.persist().await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, SError> {
        Ok(self.lock().p.vote)
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> Result<(), SError> {
        self.with(|g| {
            g.p.committed = committed;
        });
        self.persist().await
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, SError> {
        Ok(self.lock().p.committed)
    }

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, SError> {
        let g = self.lock();
        let last =
            g.p.log
                .values()
                .next_back()
                .map(|e| e.log_id)
                .or(g.p.last_purged);
        Ok(LogState {
            last_purged_log_id: g.p.last_purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn append_to_log<I>(&mut self, entries: I) -> Result<(), SError>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
    {
        self.with(|g| {
            for e in entries {
                g.p.log.insert(e.log_id.index, e);
            }
        });
        self.persist().await
    }

    async fn delete_conflict_logs_since(&mut self, log_id: LogId<NodeId>) -> Result<(), SError> {
        self.with(|g| {
            g.p.log.retain(|&i, _| i < log_id.index);
        });
        self.persist().await
    }

    async fn purge_logs_upto(&mut self, log_id: LogId<NodeId>) -> Result<(), SError> {
        self.with(|g| {
            g.p.log.retain(|&i, _| i > log_id.index);
            g.p.last_purged = Some(log_id);
        });
        self.persist().await
    }

    async fn last_applied_state(
        &mut self,
    ) -> Result<(Option<LogId<NodeId>>, StoredMembership<NodeId, NodeMeta>), SError> {
        let g = self.lock();
        Ok((g.p.sm.last_applied, g.p.sm.last_membership.clone()))
    }

    async fn apply_to_state_machine(
        &mut self,
        entries: &[Entry<TypeConfig>],
    ) -> Result<Vec<bool>, SError> {
        let out = self.with(|g| {
            let mut out = Vec::with_capacity(entries.len());
            for e in entries {
                g.p.sm.last_applied = Some(e.log_id);
                let mut applied = true;
                match &e.payload {
                    EntryPayload::Blank => {}
                    EntryPayload::Normal(Command::Catalog { expect, puts }) => {
                        let cat = &mut g.p.sm.catalog;
                        applied = expect.iter().all(|(k, v)| cat.get(k) == v.as_ref());
                        if applied {
                            for (k, v) in puts {
                                match v {
                                    Some(v) => cat.insert(k.clone(), v.clone()),
                                    None => cat.remove(k),
                                };
                            }
                        }
                    }
                    EntryPayload::Normal(Command::Certify { node, fingerprint }) => {
                        g.p.sm.certs.insert(node.clone(), fingerprint.clone());
                    }
                    EntryPayload::Normal(Command::Deny { node, fingerprint }) => {
                        g.p.sm.denied.insert(fingerprint.clone(), node.clone());
                        if g.p.sm.certs.get(node) == Some(fingerprint) {
                            g.p.sm.certs.remove(node);
                        }
                    }
                    EntryPayload::Normal(Command::RotateSecret(secret)) => {
                        g.p.sm.join_secret = Some(secret.clone());
                    }
                    EntryPayload::Normal(Command::SetNode(meta)) => {
                        g.p.sm.nodes.insert(meta.name.clone(), meta.clone());
                    }
                    EntryPayload::Normal(Command::Tombstone {
                        model,
                        deleted_at_ms,
                    }) => {
                        let at = g.p.sm.tombstones.entry(model.clone()).or_insert(0);
                        *at = (*at).max(*deleted_at_ms);
                    }
                    EntryPayload::Membership(m) => {
                        g.p.sm.last_membership = StoredMembership::new(Some(e.log_id), m.clone());
                    }
                }
                out.push(applied);
            }
            out
        });
        self.persist().await?;
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, SError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, NodeMeta>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), SError> {
        let data = snapshot.into_inner();
        let sm: StateMachine = serde_json::from_slice(&data).map_err(io)?;
        self.with(|g| {
            g.p.sm = sm;
            g.p.sm.last_applied = meta.last_log_id;
            g.p.sm.last_membership = meta.last_membership.clone();
            g.p.snapshot = Some(StoredSnapshot {
                meta: meta.clone(),
                data,
            });
        });
        self.persist().await
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, SError> {
        let g = self.lock();
        Ok(g.p.snapshot.as_ref().map(|s| Snapshot {
            meta: s.meta.clone(),
            snapshot: Box::new(Cursor::new(s.data.clone())),
        }))
    }
}
