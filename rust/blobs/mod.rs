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
/// The bandwidth cap lets this much through at once after an idle spell.
const BURST: Duration = Duration::from_millis(50);

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

/// A token bucket shared by every transfer of a node, in and out: the
/// `models.replication_bandwidth_mbps` cap. 0 means unlimited.
#[derive(Debug)]
pub struct Pacer {
    bytes_per_sec: AtomicU64,
    next_free: Mutex<Instant>,
}

impl Default for Pacer {
    fn default() -> Self {
        Self {
            bytes_per_sec: AtomicU64::new(0),
            next_free: Mutex::new(Instant::now()),
        }
    }
}

impl Pacer {
    pub fn set_rate(&self, bytes_per_sec: u64) {
        self.bytes_per_sec.store(bytes_per_sec, Ordering::Relaxed);
    }

    /// Wait until `n` more bytes fit under the cap.
    pub async fn take(&self, n: usize) {
        let rate = self.bytes_per_sec.load(Ordering::Relaxed);
        if rate == 0 {
            return;
        }
        let cost = Duration::from_secs_f64(n as f64 / rate as f64);
        let wake = {
            let mut next = self.next_free.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            let start = (*next).max(now.checked_sub(BURST).unwrap_or(now));
            *next = start + cost;
            *next
        };
        let now = Instant::now();
        if wake > now + BURST {
            tokio::time::sleep(wake - now - BURST).await;
        }
    }
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

    // --- the holder's side

    /// Answer one `FetchBlob` stream whose first frame has been read.
    pub async fn serve(&self, peer: &str, request: &[u8], mut send: quinn::SendStream) {
        if let Err(e) = self.serve_inner(peer, request, &mut send).await {
            let (status, message) = match &e {
                BlobError::Remote { status, message } => (*status, message.clone()),
                BlobError::BadDigest(_) | BlobError::BadPath(_) => (400, e.to_string()),
                BlobError::NoStore => (503, e.to_string()),
                BlobError::Unavailable(_) => return,
                other => (500, other.to_string()),
            };
            let body = serde_json::to_vec(&ErrorBody { status, message }).unwrap_or_default();
            let _ = write_frame(&mut send, Kind::Error, &body).await;
        }
        let _ = send.finish();
        let _ = send.stopped().await;
    }

    async fn serve_inner(
        &self,
        peer: &str,
        request: &[u8],
        send: &mut quinn::SendStream,
    ) -> Result<(), BlobError> {
        let req: FetchRequest = serde_json::from_slice(request).map_err(|e| BlobError::Remote {
            status: 400,
            message: format!("malformed fetch request: {e}"),
        })?;
        let root = self.root()?;
        let (path, label, offset) = match (&req.digest, &req.manifest) {
            (Some(d), None) => {
                let hex = parse_digest(d)?;
                (
                    root.join("blobs").join(format!("sha256-{hex}")),
                    hex,
                    req.offset,
                )
            }
            (None, Some(m)) => {
                let rel = check_manifest_path(m)?;
                (root.join("manifests").join(rel), m.clone(), 0)
            }
            _ => {
                return Err(BlobError::Remote {
                    status: 400,
                    message: "a fetch names a digest or a manifest".into(),
                })
            }
        };
        let mut file = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(BlobError::Remote {
                    status: 404,
                    message: format!("'{label}' not found on this node"),
                })
            }
            Err(e) => return Err(e.into()),
        };
        let size = file.metadata()?.len();
        if req.manifest.is_some() && size > MAX_MANIFEST {
            return Err(BlobError::Remote {
                status: 500,
                message: "manifest too large".into(),
            });
        }
        if offset > size {
            return Err(BlobError::Remote {
                status: 416,
                message: format!("offset {offset} is beyond the blob's {size} bytes"),
            });
        }
        let guard = self.begin("out", peer, &label, offset)?;
        guard.total.store(size, Ordering::Relaxed);
        let info = serde_json::to_vec(&BlobInfo { size }).unwrap_or_default();
        write_frame(send, Kind::BlobInfo, &info)
            .await
            .map_err(unavailable)?;
        file.seek(SeekFrom::Start(offset))?;
        let mut buf = vec![0u8; DATA_FRAME];
        let end = match req.length {
            Some(l) => offset.saturating_add(l).min(size),
            None => size,
        };
        let mut left = end - offset;
        while left > 0 {
            let want = (left as usize).min(DATA_FRAME);
            let n = off_runtime(|| file.read(&mut buf[..want]))?;
            if n == 0 {
                return Err(BlobError::Io("the file shrank while it was sent".into()));
            }
            self.pacer.take(n).await;
            write_frame(send, Kind::BlobData, &buf[..n])
                .await
                .map_err(unavailable)?;
            left -= n as u64;
            guard.bytes.fetch_add(n as u64, Ordering::Relaxed);
            self.totals().bytes_out += n as u64;
        }
        write_frame(send, Kind::End, &[])
            .await
            .map_err(unavailable)?;
        self.totals().completed_out += 1;
        Ok(())
    }

    // --- the fetching side

    /// Fetch blob `digest` from the peer on `conn` into the store, resuming a
    /// partial left by an earlier attempt. Returns the blob's path; a blob
    /// already present is not fetched again.
    pub async fn fetch_blob(
        &self,
        conn: &quinn::Connection,
        peer: &str,
        digest: &str,
    ) -> Result<PathBuf, BlobError> {
        let hex = parse_digest(digest)?;
        let root = self.root()?;
        let dest = root.join("blobs").join(format!("sha256-{hex}"));
        if dest.is_file() {
            return Ok(dest);
        }
        let tmp_dir = root.join("tmp");
        let partial = tmp_dir.join(format!("p2p-sha256-{hex}.partial"));
        let res = async {
            std::fs::create_dir_all(&tmp_dir)?;
            std::fs::create_dir_all(root.join("blobs"))?;
            self.fetch_into(conn, peer, &hex, &partial, &dest).await
        }
        .await
        .map_err(|e| e.in_store(&root, &hex));
        match &res {
            // a local failure (a full disk…): free the space rather than keep
            // a partial to resume; a broken stream keeps it
            Err(e) if e.is_local() => {
                let _ = std::fs::remove_file(&partial);
                tracing::warn!("blob sha256:{hex} from '{peer}': {e}");
            }
            _ => {}
        }
        self.count_in(&res, &hex, &format!("'{peer}'"));
        res.map(|_| dest)
    }

    /// Count a finished incoming fetch (from `from`) in the totals.
    fn count_in<T>(&self, res: &Result<T, BlobError>, hex: &str, from: &str) {
        let mut t = self.totals();
        match res {
            Ok(_) => t.completed_in += 1,
            Err(e) => {
                t.failed_in += 1;
                if matches!(e, BlobError::DigestMismatch { .. }) {
                    t.digest_mismatches += 1;
                }
                t.last_error = Some(format!("sha256:{hex} from {from}: {e}"));
            }
        }
    }

    async fn fetch_into(
        &self,
        conn: &quinn::Connection,
        peer: &str,
        hex: &str,
        partial: &Path,
        dest: &Path,
    ) -> Result<(), BlobError> {
        // Claim the digest before touching the partial another fetch may own.
        let guard = self.begin("in", peer, hex, 0)?;
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(partial)?;
        let offset = file.metadata()?.len();
        if let Some(l) = self
            .live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(&guard.id)
        {
            l.offset = offset;
        }
        let req = serde_json::to_vec(&FetchRequest {
            digest: Some(format!("sha256:{hex}")),
            offset,
            length: None,
            manifest: None,
        })
        .unwrap_or_default();
        let mut reader = open(conn, &req).await?;
        let size = match read_info(&mut reader).await {
            Err(BlobError::Remote { status: 416, .. }) => {
                // our partial is longer than the blob: it is not this blob
                drop(file);
                let _ = std::fs::remove_file(partial);
                return Err(BlobError::Unavailable(
                    "the partial file was longer than the blob; discarded".into(),
                ));
            }
            other => other?,
        };
        guard.total.store(size, Ordering::Relaxed);
        // the bytes already there are hashed while the rest arrives
        let follower = Follower::start(partial, &[(0, size)])?;
        follower.advance(0, offset);
        let mut got = offset;
        loop {
            let f = reader.next().await.map_err(unavailable)?.ok_or_else(|| {
                BlobError::Unavailable("the peer closed the stream mid-blob".into())
            })?;
            match f.kind {
                Kind::BlobData => {
                    if got + f.payload.len() as u64 > size {
                        drop(file);
                        let _ = std::fs::remove_file(partial);
                        return Err(BlobError::Unavailable(
                            "the peer sent more bytes than it announced".into(),
                        ));
                    }
                    self.pacer.take(f.payload.len()).await;
                    off_runtime(|| file.write_all(&f.payload))?;
                    got += f.payload.len() as u64;
                    follower.advance(0, got);
                    guard
                        .bytes
                        .fetch_add(f.payload.len() as u64, Ordering::Relaxed);
                    self.totals().bytes_in += f.payload.len() as u64;
                }
                Kind::End => break,
                Kind::Error => return Err(remote_error(&f.payload)),
                other => {
                    return Err(BlobError::Unavailable(format!(
                        "unexpected {other:?} frame in a blob"
                    )))
                }
            }
        }
        if got != size {
            return Err(BlobError::Unavailable(format!(
                "the blob ended at {got} of {size} bytes"
            )));
        }
        let actual = follower.finish().await?;
        off_runtime(|| {
            verify_and_publish(&file, partial, dest, hex, actual, &format!("'{peer}'"))
        })?;
        drop(guard);
        Ok(())
    }

    /// Fetch blob `digest` from every source at once, one range each, when
    /// there are several and the blob is large; else (or with a partial to
    /// resume) from the sources one after another. Ranges land at their
    /// offsets in the partial; a range whose source fails is fetched again
    /// from another. The whole file is hashed before it becomes visible; on a
    /// mismatch each source is tried alone, so a bad copy is skipped.
    pub async fn fetch_blob_multi(
        &self,
        sources: &[(String, quinn::Connection)],
        digest: &str,
    ) -> Result<PathBuf, BlobError> {
        let hex = parse_digest(digest)?;
        let root = self.root()?;
        let dest = root.join("blobs").join(format!("sha256-{hex}"));
        if dest.is_file() {
            return Ok(dest);
        }
        let partial = root.join("tmp").join(format!("p2p-sha256-{hex}.partial"));
        let mut last = BlobError::Unavailable("no source holds the blob".into());
        if sources.len() >= 2 && !partial.exists() {
            match self.probe_size(&sources[0].1, &hex).await {
                Ok(size) if size >= MULTI_SOURCE_MIN => {
                    // its own name: a file with holes must never be resumed
                    let ranges = root.join("tmp").join(format!("p2p-sha256-{hex}.ranges"));
                    let res = async {
                        std::fs::create_dir_all(root.join("tmp"))?;
                        std::fs::create_dir_all(root.join("blobs"))?;
                        self.fetch_ranges(sources, &hex, size, &ranges, &dest).await
                    }
                    .await
                    .map_err(|e| e.in_store(&root, &hex));
                    if let Err(e) = &res {
                        let _ = std::fs::remove_file(&ranges);
                        if e.is_local() {
                            tracing::warn!("blob sha256:{hex} from several peers: {e}");
                        }
                    }
                    self.count_in(&res, &hex, "several peers");
                    match res {
                        // which source lied is unknown: each one alone, verified
                        Err(e @ BlobError::DigestMismatch { .. }) => last = e,
                        other => return other.map(|_| dest),
                    }
                }
                Ok(_) => {}
                Err(e) => last = e,
            }
        }
        for (peer, conn) in sources {
            match self.fetch_blob(conn, peer, &hex).await {
                Ok(p) => return Ok(p),
                Err(
                    e @ (BlobError::BadDigest(_)
                    | BlobError::NoStore
                    | BlobError::Busy(_)
                    | BlobError::NoSpace(_)
                    | BlobError::Io(_)),
                ) => return Err(e),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    async fn probe_size(&self, conn: &quinn::Connection, hex: &str) -> Result<u64, BlobError> {
        let req = serde_json::to_vec(&FetchRequest {
            digest: Some(format!("sha256:{hex}")),
            offset: 0,
            length: Some(0),
            manifest: None,
        })
        .unwrap_or_default();
        let mut reader = open(conn, &req).await?;
        read_info(&mut reader).await
    }

    async fn fetch_ranges(
        &self,
        sources: &[(String, quinn::Connection)],
        hex: &str,
        size: u64,
        partial: &Path,
        dest: &Path,
    ) -> Result<(), BlobError> {
        let names: Vec<&str> = sources.iter().map(|(p, _)| p.as_str()).collect();
        let guard = self.begin("in", &names.join("+"), hex, 0)?;
        guard.total.store(size, Ordering::Relaxed);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(partial)?;
        file.set_len(size)?;
        let file = Arc::new(file);
        let n = sources.len() as u64;
        // ranges aligned to whole data frames
        let step = size.div_ceil(n).div_ceil(DATA_FRAME as u64) * DATA_FRAME as u64;
        let ranges: Vec<(u64, u64)> = (0..n)
            .map(|i| ((i * step).min(size), ((i + 1) * step).min(size)))
            .filter(|(start, end)| start < end)
            .collect();
        let follower = Follower::start(partial, &ranges)?;
        let mut tasks = tokio::task::JoinSet::new();
        for (i, ((_, conn), &(start, end))) in sources.iter().zip(&ranges).enumerate() {
            tasks.spawn(fetch_range(
                conn.clone(),
                hex.to_owned(),
                (i, start, end),
                file.clone(),
                guard.bytes.clone(),
                self.pacer.clone(),
                follower.shared.clone(),
            ));
        }
        let mut failed = Vec::new();
        while let Some(r) = tasks.join_next().await {
            match r {
                Ok(Ok(())) => {}
                Ok(Err((at, e))) => failed.push((at, e)),
                Err(e) => {
                    // a range task that panicked: which range is unknown,
                    // so the whole fetch fails (the partial is not resumed)
                    drop(file);
                    let _ = std::fs::remove_file(partial);
                    return Err(unavailable(format!("a range task failed: {e}")));
                }
            }
        }
        // what a failed source left undone, from the others in turn; a
        // failure of this node's disk is not the source's, and ends it all
        if let Some(i) = failed.iter().position(|(_, e)| e.is_local()) {
            drop(file);
            let _ = std::fs::remove_file(partial);
            return Err(failed.swap_remove(i).1);
        }
        for (mut at, mut err) in failed {
            self.totals().ranges_refetched += 1;
            let mut done = false;
            for (peer, conn) in sources {
                match fetch_range(
                    conn.clone(),
                    hex.to_owned(),
                    at,
                    file.clone(),
                    guard.bytes.clone(),
                    self.pacer.clone(),
                    follower.shared.clone(),
                )
                .await
                {
                    Ok(()) => {
                        done = true;
                        break;
                    }
                    Err((_, e)) if e.is_local() => {
                        drop(file);
                        let _ = std::fs::remove_file(partial);
                        return Err(e);
                    }
                    Err((got, e)) => {
                        tracing::debug!(
                            "range {}..{} of sha256:{hex} from '{peer}': {e}",
                            got.1,
                            got.2
                        );
                        (at, err) = (got, e);
                    }
                }
            }
            if !done {
                drop(file);
                let _ = std::fs::remove_file(partial);
                return Err(err);
            }
        }
        self.totals().bytes_in += guard.bytes.load(Ordering::Relaxed);
        let actual = follower.finish().await?;
        off_runtime(|| {
            verify_and_publish(&file, partial, dest, hex, actual, &format!("{names:?}"))
        })?;
        drop(guard);
        Ok(())
    }

    /// The bytes of manifest `path` (registry/namespace/name/tag) on the peer;
    /// checked against `digest` when given. Nothing is written.
    pub async fn fetch_manifest(
        &self,
        conn: &quinn::Connection,
        path: &str,
        digest: Option<&str>,
    ) -> Result<Vec<u8>, BlobError> {
        check_manifest_path(path)?;
        let expected = digest.map(parse_digest).transpose()?;
        let req = serde_json::to_vec(&FetchRequest {
            digest: None,
            offset: 0,
            length: None,
            manifest: Some(path.to_owned()),
        })
        .unwrap_or_default();
        let mut reader = open(conn, &req).await?;
        let size = read_info(&mut reader).await?;
        if size > MAX_MANIFEST {
            return Err(BlobError::Unavailable("manifest too large".into()));
        }
        let mut out = Vec::with_capacity(size as usize);
        loop {
            let f = reader.next().await.map_err(unavailable)?.ok_or_else(|| {
                BlobError::Unavailable("the peer closed the stream mid-manifest".into())
            })?;
            match f.kind {
                Kind::BlobData if out.len() + f.payload.len() <= size as usize => {
                    out.extend_from_slice(&f.payload)
                }
                Kind::End if out.len() == size as usize => break,
                Kind::Error => return Err(remote_error(&f.payload)),
                other => {
                    return Err(BlobError::Unavailable(format!(
                        "unexpected {other:?} frame in a manifest"
                    )))
                }
            }
        }
        if let Some(hex) = expected {
            let actual = hex::encode(Sha256::digest(&out));
            if actual != hex {
                return Err(BlobError::DigestMismatch {
                    expected: hex,
                    actual,
                });
            }
        }
        Ok(out)
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

/// Check a finished partial against its digest and make it the visible blob;
/// a mismatch deletes it (the space comes back) and names where it came from.
fn verify_and_publish(
    file: &std::fs::File,
    partial: &Path,
    dest: &Path,
    hex: &str,
    actual: String,
    source: &str,
) -> Result<(), BlobError> {
    if actual != hex {
        let _ = std::fs::remove_file(partial);
        tracing::warn!("blob sha256:{hex} from {source} has sha256:{actual}; discarded");
        return Err(BlobError::DigestMismatch {
            expected: hex.to_owned(),
            actual,
        });
    }
    file.sync_all()?;
    publish(partial, dest)
}

/// Make a verified, fsynced partial the visible blob.
fn publish(partial: &Path, dest: &Path) -> Result<(), BlobError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(partial, std::fs::Permissions::from_mode(0o644));
    }
    std::fs::rename(partial, dest)?;
    if let Some(dir) = dest.parent() {
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

/// Bytes `start..end` of blob `hex` from `conn` (range `i` of the
/// follower's), written at their offsets in `file`. On failure: the range
/// from where it got to, and why.
async fn fetch_range(
    conn: quinn::Connection,
    hex: String,
    (i, start, end): (usize, u64, u64),
    file: Arc<std::fs::File>,
    bytes: Arc<AtomicU64>,
    pacer: Arc<Pacer>,
    follower: Arc<Followed>,
) -> Result<(), ((usize, u64, u64), BlobError)> {
    use std::os::unix::fs::FileExt;
    let mut pos = start;
    let res = async {
        let req = serde_json::to_vec(&FetchRequest {
            digest: Some(format!("sha256:{hex}")),
            offset: start,
            length: Some(end - start),
            manifest: None,
        })
        .unwrap_or_default();
        let mut reader = open(&conn, &req).await?;
        if read_info(&mut reader).await? < end {
            return Err(BlobError::Unavailable("the peer's blob is shorter".into()));
        }
        loop {
            let f = reader.next().await.map_err(unavailable)?.ok_or_else(|| {
                BlobError::Unavailable("the peer closed the stream mid-range".into())
            })?;
            match f.kind {
                Kind::BlobData if pos + f.payload.len() as u64 <= end => {
                    pacer.take(f.payload.len()).await;
                    off_runtime(|| file.write_all_at(&f.payload, pos))?;
                    pos += f.payload.len() as u64;
                    follower.advance(i, pos);
                    bytes.fetch_add(f.payload.len() as u64, Ordering::Relaxed);
                }
                Kind::End if pos == end => return Ok(()),
                Kind::Error => return Err(remote_error(&f.payload)),
                other => {
                    return Err(BlobError::Unavailable(format!(
                        "unexpected {other:?} frame in a range"
                    )))
                }
            }
        }
    }
    .await;
    res.map_err(|e| ((i, pos, end), e))
}

/// Hashes a partial blob in file order on a thread of its own while the
/// network tasks write it, so the sha256 overlaps the transfer instead of
/// following it (and the task that receives never waits on it). The file's
/// ranges, in order and each ending where the next begins, report how far
/// they are written; the bytes before the first unfinished range's position
/// are final and get read back (from the page cache) and hashed.
///
/// Hand-rolled because the hashing must trail writes at several offsets of
/// one file; sha2 does the hashing.
struct Follower {
    shared: Arc<Followed>,
    result: Option<tokio::sync::oneshot::Receiver<std::io::Result<String>>>,
}

struct Followed {
    /// (end, written up to) of each range.
    ranges: Vec<(u64, AtomicU64)>,
    /// The fetch is over (failed, or the result was taken): stop reading.
    stop: std::sync::atomic::AtomicBool,
    lock: Mutex<()>,
    wake: std::sync::Condvar,
}

impl Followed {
    /// Bytes from the start of the file that are written.
    fn written(&self) -> u64 {
        for (end, pos) in &self.ranges {
            let p = pos.load(Ordering::Acquire);
            if p < *end {
                return p;
            }
        }
        self.ranges.last().map_or(0, |r| r.0)
    }

    /// Range `i` is written up to `pos`.
    fn advance(&self, i: usize, pos: u64) {
        self.ranges[i].1.store(pos, Ordering::Release);
        let _held = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        self.wake.notify_one();
    }

    fn hash(&self, path: &Path) -> std::io::Result<String> {
        use std::os::unix::fs::FileExt;
        let file = std::fs::File::open(path)?;
        let total = self.ranges.last().map_or(0, |r| r.0);
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut hashed = 0u64;
        loop {
            if self.stop.load(Ordering::Relaxed) {
                return Err(std::io::Error::other("the fetch ended"));
            }
            let ready = self.written();
            if hashed < ready {
                let n = (ready - hashed).min(buf.len() as u64) as usize;
                file.read_exact_at(&mut buf[..n], hashed)?;
                hasher.update(&buf[..n]);
                hashed += n as u64;
                continue;
            }
            if hashed == total {
                return Ok(hex::encode(hasher.finalize()));
            }
            let held = self.lock.lock().unwrap_or_else(|p| p.into_inner());
            if !self.stop.load(Ordering::Relaxed) && self.written() == hashed {
                // advance() notifies under the lock, so no wake-up is missed;
                // the timeout is only a safety net
                let _ = self.wake.wait_timeout(held, Duration::from_millis(200));
            }
        }
    }
}

impl Follower {
    /// Start hashing `path`, made of `ranges` (start, end) in order from 0;
    /// each is written up to its start so far.
    fn start(path: &Path, ranges: &[(u64, u64)]) -> Result<Self, BlobError> {
        let shared = Arc::new(Followed {
            ranges: ranges
                .iter()
                .map(|&(start, end)| (end, AtomicU64::new(start)))
                .collect(),
            stop: Default::default(),
            lock: Mutex::new(()),
            wake: Default::default(),
        });
        let (tx, rx) = tokio::sync::oneshot::channel();
        let (path, followed) = (path.to_owned(), shared.clone());
        std::thread::Builder::new()
            .name("od-blob-hash".into())
            .spawn(move || {
                let _ = tx.send(followed.hash(&path));
            })?;
        Ok(Self {
            shared,
            result: Some(rx),
        })
    }

    fn advance(&self, i: usize, pos: u64) {
        self.shared.advance(i, pos)
    }

    /// The hex sha256 of the whole file, once every range is written.
    async fn finish(mut self) -> Result<String, BlobError> {
        let rx = self.result.take().expect("finish is called once");
        match rx.await {
            Ok(res) => Ok(res?),
            Err(_) => Err(BlobError::Io("the hashing thread ended early".into())),
        }
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        let _held = self.shared.lock.lock().unwrap_or_else(|p| p.into_inner());
        self.shared.wake.notify_one();
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
