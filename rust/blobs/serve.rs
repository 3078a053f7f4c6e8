//! The holder's side: answer a peer's `FetchBlob` stream.

use super::*;

impl Blobs {
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
}
