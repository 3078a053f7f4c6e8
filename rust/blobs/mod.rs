//! Model blobs and manifests between nodes, over the peer pair's existing
//! mTLS connection: one bidirectional stream per transfer.
//!
//! The caller sends a `FetchBlob` frame (`{"digest": "sha256:<hex>",
//! "offset": n}` or `{"manifest": "<registry>/<namespace>/<name>/<tag>"}`);
//! the holder answers `BlobInfo` (`{"size": total}`), then `BlobData` frames
//! of raw bytes from the offset, then `End`, or an `Error` frame at any point.
//!
//! A blob is written to `<store>/tmp/p2p-sha256-<hex>.partial` as it arrives.
//! A broken stream leaves the partial in place, and the next fetch resumes
//! from its length. The sha256 of the whole file, computed by a [`Follower`]
//! thread that reads it in order behind the writers, must equal the digest
//! before it is fsynced and renamed into
//! `blobs/sha256-<hex>`, so nothing unverified is ever visible; a mismatch
//! deletes the partial and is a [`BlobError::DigestMismatch`]. A full disk
//! (ENOSPC, or EDQUOT: a quota) or another local I/O error deletes it too,
//! freeing the space, and ends the fetch at once (another peer would not
//! help): [`BlobError::NoSpace`] names the data dir. A fetch in ranges from
//! several peers writes `.ranges` instead, never resumed.
//!
//! File I/O is std's, on the runtime's threads: writes of [`DATA_FRAME`]
//! bytes into the page cache, which take microseconds.

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::forward::ErrorBody;
use crate::transport::{write_frame, FrameReader, Kind, TransportError};

mod fetch;
mod follow;
mod pacer;
mod serve;

use follow::{Followed, Follower};
pub use pacer::Pacer;

/// Bytes per `BlobData` frame: large enough that framing costs nothing,
/// small enough that the bandwidth cap stays smooth.
pub const DATA_FRAME: usize = 256 * 1024;
/// A manifest larger than this is not a manifest.
pub const MAX_MANIFEST: u64 = 1 << 20;
/// A blob at least this large is fetched in ranges from every holder at
/// once; a smaller one is not worth the extra streams.
pub const MULTI_SOURCE_MIN: u64 = 16 << 20;
/// How long the first answer (BlobInfo or Error) may take.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BlobError {
    #[error("invalid digest '{0}': expected sha256:<64 lowercase hex>")]
    BadDigest(String),
    #[error("invalid manifest path '{0}'")]
    BadPath(String),
    #[error("digest mismatch: expected sha256:{expected}, the peer sent sha256:{actual}")]
    DigestMismatch { expected: String, actual: String },
    /// The peer could not be reached or the stream broke; resumable.
    #[error("peer unavailable: {0}")]
    Unavailable(String),
    /// The peer answered with an error (it does not hold the blob…).
    #[error("{message}")]
    Remote { status: u16, message: String },
    #[error("this node has no model store configured for transfers")]
    NoStore,
    #[error("i/o: {0}")]
    Io(String),
    /// The store's file system is full (ENOSPC) or over a quota (EDQUOT).
    /// The message names the data dir once the fetch knows it.
    #[error("{0}")]
    NoSpace(String),
    #[error("sha256:{0} is already being fetched")]
    Busy(String),
}

impl From<std::io::Error> for BlobError {
    fn from(e: std::io::Error) -> Self {
        if is_no_space(&e) {
            BlobError::NoSpace(format!("no space left on the data dir ({e})"))
        } else {
            BlobError::Io(e.to_string())
        }
    }
}

/// ENOSPC, or EDQUOT (a quota): nothing more fits in the store.
fn is_no_space(e: &std::io::Error) -> bool {
    const ENOSPC: i32 = 28;
    #[cfg(target_os = "linux")]
    const EDQUOT: i32 = 122;
    #[cfg(not(target_os = "linux"))]
    const EDQUOT: i32 = 69;
    matches!(e.raw_os_error(), Some(ENOSPC | EDQUOT))
}

impl BlobError {
    /// A full disk, said with the data dir and the blob, and what to do.
    fn in_store(self, root: &Path, hex: &str) -> Self {
        match self {
            BlobError::NoSpace(m) => {
                let why = m
                    .strip_prefix("no space left on the data dir (")
                    .and_then(|r| r.strip_suffix(')'))
                    .unwrap_or(&m);
                BlobError::NoSpace(format!(
                    "no space left on the data dir {} for blob sha256:{}… ({why}); the partial \
                     file was removed; free some space there or move the data dir to a larger disk",
                    root.display(),
                    &hex[..hex.len().min(12)],
                ))
            }
            other => other,
        }
    }

    /// A failure of this node's disk, not of the peer: removes the partial,
    /// and no other peer would do better.
    fn is_local(&self) -> bool {
        matches!(self, BlobError::Io(_) | BlobError::NoSpace(_))
    }
}

fn unavailable(e: impl std::fmt::Display) -> BlobError {
    BlobError::Unavailable(e.to_string())
}

/// `sha256:<hex>` or `<hex>` → the 64 lowercase hex digits.
pub fn parse_digest(d: &str) -> Result<String, BlobError> {
    let hex = d.strip_prefix("sha256:").unwrap_or(d);
    if hex.len() == 64
        && hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        Ok(hex.to_owned())
    } else {
        Err(BlobError::BadDigest(d.chars().take(80).collect()))
    }
}

/// A manifest path relative to `manifests/`: exactly registry, namespace,
/// name and tag, each made of `[A-Za-z0-9._:-]` and not starting with a dot.
pub fn check_manifest_path(p: &str) -> Result<PathBuf, BlobError> {
    let parts: Vec<&str> = p.split('/').collect();
    let ok = parts.len() == 4
        && parts.iter().all(|c| {
            !c.is_empty()
                && c.len() <= 255
                && !c.starts_with('.')
                && c.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
        });
    if ok {
        Ok(parts.iter().collect())
    } else {
        Err(BlobError::BadPath(p.chars().take(300).collect()))
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct FetchRequest {
    #[serde(default)]
    digest: Option<String>,
    #[serde(default)]
    offset: u64,
    /// Bytes from `offset` (a range for a fetch from several peers); None: to the end.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    length: Option<u64>,
    #[serde(default)]
    manifest: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
struct BlobInfo {
    size: u64,
}

/// One transfer in progress, as `replication status` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct TransferView {
    pub id: u64,
    /// "in" (this node fetches) or "out" (a peer fetches from this node).
    pub direction: &'static str,
    pub peer: String,
    pub digest: String,
    /// Where this transfer started in the blob (non-zero when resumed).
    pub offset: u64,
    /// Bytes moved by this transfer (after `offset`).
    pub bytes: u64,
    pub total: u64,
    pub elapsed_s: f64,
    pub bytes_per_sec: f64,
}

#[derive(Debug)]
struct Live {
    direction: &'static str,
    peer: String,
    digest: String,
    offset: u64,
    total: Arc<AtomicU64>,
    bytes: Arc<AtomicU64>,
    started: Instant,
}

/// Totals since start, for status and metrics.
#[derive(Debug, Default, Clone, Serialize)]
pub struct TransferTotals {
    pub completed_in: u64,
    pub completed_out: u64,
    pub failed_in: u64,
    pub digest_mismatches: u64,
    /// Ranges of a multi-source fetch fetched again after their source failed.
    pub ranges_refetched: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub last_error: Option<String>,
}

/// The node's blob service: where its store is, its cap, its transfers.
#[derive(Debug, Default)]
pub struct Blobs {
    root: Mutex<Option<PathBuf>>,
    pub pacer: Arc<Pacer>,
    next_id: AtomicU64,
    live: Mutex<BTreeMap<u64, Live>>,
    totals: Mutex<TransferTotals>,
}

/// Removes a transfer from the live table when it ends, however it ends.
struct LiveGuard<'a> {
    blobs: &'a Blobs,
    id: u64,
    bytes: Arc<AtomicU64>,
    total: Arc<AtomicU64>,
}

impl Drop for LiveGuard<'_> {
    fn drop(&mut self) {
        self.blobs
            .live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
    }
}

/// The status answer: transfers in progress and totals.
#[derive(Debug, Clone, Serialize)]
pub struct TransferStatus {
    pub transfers: Vec<TransferView>,
    pub totals: TransferTotals,
    pub bandwidth_limit_bytes_per_sec: u64,
}

impl Blobs {
    /// Serve and store blobs under `root` (the model store: `blobs/`,
    /// `manifests/`, `tmp/`), at most `bytes_per_sec` (0: no cap).
    pub fn configure(&self, root: PathBuf, bytes_per_sec: u64) {
        *self.root.lock().unwrap_or_else(|p| p.into_inner()) = Some(root);
        self.pacer.set_rate(bytes_per_sec);
    }

    fn root(&self) -> Result<PathBuf, BlobError> {
        self.root
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or(BlobError::NoStore)
    }

    fn begin(
        &self,
        direction: &'static str,
        peer: &str,
        digest: &str,
        offset: u64,
    ) -> Result<LiveGuard<'_>, BlobError> {
        let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        if direction == "in"
            && live
                .values()
                .any(|l| l.direction == "in" && l.digest == digest)
        {
            return Err(BlobError::Busy(digest.to_owned()));
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let bytes = Arc::new(AtomicU64::new(0));
        let total = Arc::new(AtomicU64::new(0));
        live.insert(
            id,
            Live {
                direction,
                peer: peer.to_owned(),
                digest: digest.to_owned(),
                offset,
                total: total.clone(),
                bytes: bytes.clone(),
                started: Instant::now(),
            },
        );
        Ok(LiveGuard {
            blobs: self,
            id,
            bytes,
            total,
        })
    }

    fn totals(&self) -> std::sync::MutexGuard<'_, TransferTotals> {
        self.totals.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn status(&self) -> TransferStatus {
        let transfers = self
            .live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(id, l)| {
                let elapsed = l.started.elapsed().as_secs_f64();
                let bytes = l.bytes.load(Ordering::Relaxed);
                TransferView {
                    id: *id,
                    direction: l.direction,
                    peer: l.peer.clone(),
                    digest: format!("sha256:{}", l.digest),
                    offset: l.offset,
                    bytes,
                    total: l.total.load(Ordering::Relaxed),
                    elapsed_s: elapsed,
                    bytes_per_sec: if elapsed > 0.0 {
                        bytes as f64 / elapsed
                    } else {
                        0.0
                    },
                }
            })
            .collect();
        TransferStatus {
            transfers,
            totals: self.totals().clone(),
            bandwidth_limit_bytes_per_sec: self.pacer.bytes_per_sec.load(Ordering::Relaxed),
        }
    }
}

/// Run blocking file I/O (a write that may wait on the kernel's dirty-page
/// throttling, an fsync) without stalling a runtime worker: tokio hands this
/// worker's other tasks to another thread while it runs. A runtime with one
/// thread (some tests) runs it in place.
pub(crate) fn off_runtime<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

async fn open(conn: &quinn::Connection, request: &[u8]) -> Result<FrameReader, BlobError> {
    let (mut send, recv) = conn.open_bi().await.map_err(unavailable)?;
    write_frame(&mut send, Kind::FetchBlob, request)
        .await
        .map_err(unavailable)?;
    send.finish().map_err(unavailable)?;
    Ok(FrameReader::new(recv))
}

async fn read_info(reader: &mut FrameReader) -> Result<u64, BlobError> {
    let f = tokio::time::timeout(ANSWER_TIMEOUT, reader.next())
        .await
        .map_err(|_| BlobError::Unavailable(TransportError::Timeout.to_string()))?
        .map_err(unavailable)?
        .ok_or_else(|| {
            BlobError::Unavailable("the peer closed the stream without an answer".into())
        })?;
    match f.kind {
        Kind::BlobInfo => serde_json::from_slice::<BlobInfo>(&f.payload)
            .map(|i| i.size)
            .map_err(|_| BlobError::Unavailable("malformed blob info from the peer".into())),
        Kind::Error => Err(remote_error(&f.payload)),
        other => Err(BlobError::Unavailable(format!(
            "unexpected {other:?} frame instead of blob info"
        ))),
    }
}

fn remote_error(payload: &[u8]) -> BlobError {
    match serde_json::from_slice::<ErrorBody>(payload) {
        Ok(b) => BlobError::Remote {
            status: b.status,
            message: b.message,
        },
        Err(_) => BlobError::Unavailable("malformed error from the peer".into()),
    }
}

#[cfg(test)]
mod transfer_tests;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_disk_is_told_apart_and_named() {
        for errno in [28, if cfg!(target_os = "linux") { 122 } else { 69 }] {
            let e = BlobError::from(std::io::Error::from_raw_os_error(errno));
            assert!(matches!(e, BlobError::NoSpace(_)), "{errno}: {e}");
            assert!(e.is_local());
            let e = e.in_store(Path::new("/data/models"), &"ab".repeat(32));
            let m = e.to_string();
            assert!(
                m.starts_with(
                    "no space left on the data dir /data/models for blob sha256:abababababab… ("
                ) && m.contains(&format!(
                    "(os error {errno})); the partial file was removed"
                )) && m.ends_with("free some space there or move the data dir to a larger disk"),
                "{m}"
            );
        }
        let e = BlobError::from(std::io::Error::from_raw_os_error(13)); // EACCES
        assert!(matches!(e, BlobError::Io(_)) && e.is_local(), "{e}");
        assert_eq!(e.clone().in_store(Path::new("/x"), "ab"), e);
        assert!(!BlobError::Unavailable("cut".into()).is_local());
        assert!(!BlobError::DigestMismatch {
            expected: "a".into(),
            actual: "b".into()
        }
        .is_local());
    }

    #[test]
    fn digests_and_paths_are_checked() {
        let hex = "a".repeat(64);
        assert_eq!(parse_digest(&format!("sha256:{hex}")).unwrap(), hex);
        assert!(parse_digest(&"A".repeat(64)).is_err());
        assert!(parse_digest("sha256:../../etc/passwd").is_err());
        assert!(parse_digest(&"a".repeat(63)).is_err());
        assert!(check_manifest_path("registry.ollama.ai/library/smollm2/135m").is_ok());
        assert!(check_manifest_path("127.0.0.1:5000/library/m/latest").is_ok());
        for bad in [
            "../library/m/latest",
            "r/../m/latest",
            "r/library/m",
            "r/library/m/latest/x",
            "/etc/passwd/x/y",
            "r//m/latest",
            "r/library/.hidden/latest",
            "r/lib rary/m/latest",
        ] {
            assert!(check_manifest_path(bad).is_err(), "{bad}");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_follower_hashes_ranges_written_out_of_order() {
        use std::os::unix::fs::FileExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blob.ranges");
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let file = std::fs::File::create(&path).unwrap();
        file.set_len(data.len() as u64).unwrap();
        let ranges = [
            (0, 1_000_000),
            (1_000_000, 2_000_000),
            (2_000_000, 3_000_000),
        ];
        let f = Follower::start(&path, &ranges).unwrap();
        // the last range first, then the middle one, then the first
        for i in [2, 1, 0] {
            let (start, end) = ranges[i];
            for at in (start..end).step_by(300_000) {
                let to = (at + 300_000).min(end);
                file.write_all_at(&data[at as usize..to as usize], at)
                    .unwrap();
                f.advance(i, to);
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        assert_eq!(
            f.finish().await.unwrap(),
            hex::encode(Sha256::digest(&data))
        );

        // one dropped before its file is written lets its thread go
        let f = Follower::start(&path, &ranges).unwrap();
        let shared = f.shared.clone();
        f.advance(0, 500_000);
        drop(f);
        let t0 = Instant::now();
        while Arc::strong_count(&shared) > 1 {
            assert!(
                t0.elapsed() < Duration::from_secs(5),
                "the hashing thread kept going"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn the_pacer_holds_the_rate() {
        let p = Pacer::default();
        p.set_rate(4 << 20);
        let t0 = Instant::now();
        for _ in 0..8 {
            p.take(256 * 1024).await;
        }
        // 2 MiB at 4 MiB/s: about 0.5 s, less the burst allowance
        let e = t0.elapsed();
        assert!(e >= Duration::from_millis(350), "{e:?}");
        p.set_rate(0);
        let t0 = Instant::now();
        p.take(1 << 30).await;
        assert!(t0.elapsed() < Duration::from_millis(50));
    }
}
