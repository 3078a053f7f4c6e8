//! The fetching side: one peer or ranges from several, resumed, verified as it arrives.

use super::*;

impl Blobs {
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
