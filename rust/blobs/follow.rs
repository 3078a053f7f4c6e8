//! Hashing a partial blob behind the writers.

use super::*;

/// Hashes a partial blob in file order on a thread of its own while the
/// network tasks write it, so the sha256 overlaps the transfer instead of
/// following it (and the task that receives never waits on it). The file's
/// ranges, in order and each ending where the next begins, report how far
/// they are written; the bytes before the first unfinished range's position
/// are final and get read back (from the page cache) and hashed.
///
/// Hand-rolled because the hashing must trail writes at several offsets of
/// one file; sha2 does the hashing.
pub(super) struct Follower {
    pub(super) shared: Arc<Followed>,
    result: Option<tokio::sync::oneshot::Receiver<std::io::Result<String>>>,
}

pub(super) struct Followed {
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
    pub(super) fn advance(&self, i: usize, pos: u64) {
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
    pub(super) fn start(path: &Path, ranges: &[(u64, u64)]) -> Result<Self, BlobError> {
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

    pub(super) fn advance(&self, i: usize, pos: u64) {
        self.shared.advance(i, pos)
    }

    /// The hex sha256 of the whole file, once every range is written.
    pub(super) async fn finish(mut self) -> Result<String, BlobError> {
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
