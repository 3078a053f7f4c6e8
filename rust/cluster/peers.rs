//! What a running node does with its peers: the node list with adverts,
//! forwarding a request, blobs and manifests, proposals to the leader and the
//! catalogue, and the queue of requests peers forwarded here.

use super::*;

impl Cluster {
    /// Every node the cluster state knows, with liveness and latest advert.
    pub fn nodes(&self) -> Vec<NodeView> {
        let mut known = self.store.nodes();
        for (k, v) in self.seeds.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            known.entry(k.clone()).or_insert_with(|| v.clone());
        }
        known
            .entry(self.cfg.node_id.clone())
            .or_insert_with(|| self.my_meta());
        let metrics = self.raft.metrics().borrow().clone();
        let voters: BTreeSet<u64> = metrics.membership_config.membership().voter_ids().collect();
        let now = now_ms();
        let ms = self.lock_membership();
        let parse = |b: &Option<Bytes>| b.as_ref().and_then(|b| serde_json::from_slice(b).ok());
        known
            .into_values()
            .map(|n| {
                let local = n.name == self.cfg.node_id;
                let peer = ms.get(&n.name);
                let (alive, last_seen, advert, advert_at) = if local {
                    let adv = self
                        .advert
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .clone();
                    (true, now, parse(&adv), adv.map(|_| now as f64 / 1000.0))
                } else {
                    match peer {
                        Some(p) => (
                            p.connected,
                            p.last_seen_ms,
                            parse(&p.advert),
                            p.advert.as_ref().map(|_| p.advert_at_ms as f64 / 1000.0),
                        ),
                        None => (false, 0, None, None),
                    }
                };
                NodeView {
                    voter: voters.contains(&raft_id(&n.name)),
                    id: n.name,
                    api_address: n.api_address,
                    p2p_address: n.p2p_address,
                    alive,
                    last_seen: last_seen as f64 / 1000.0,
                    advert,
                    advert_at,
                    local,
                }
            })
            .collect()
    }

    /// Keep `advert` (JSON) as this node's latest and push it to every peer.
    pub fn publish_advert(self: &Arc<Self>, advert: Bytes) {
        *self.advert.lock().unwrap_or_else(|p| p.into_inner()) = Some(advert.clone());
        for peer in self.mesh.connected() {
            self.send_advert(&peer, advert.clone());
        }
    }

    pub(super) fn send_advert(&self, peer: &str, advert: Bytes) {
        let Some(conn) = self.mesh.connection(peer) else {
            return;
        };
        let mut payload = Vec::with_capacity(self.cfg.node_id.len() + 1 + advert.len());
        payload.extend_from_slice(self.cfg.node_id.as_bytes());
        payload.push(b'\n');
        payload.extend_from_slice(&advert);
        tokio::spawn(async move {
            let _ = transport::push(&conn, Kind::Advert, payload.into()).await;
        });
    }

    /// Send `request` to `peer` and return the stream of its answer.
    pub async fn forward(&self, peer: &str, request: &[u8]) -> Result<ForwardStream, ForwardError> {
        let conn = self
            .mesh
            .connection(peer)
            .ok_or_else(|| ForwardError::Unavailable(format!("no connection to node '{peer}'")))?;
        self.counters.forwards_out.fetch_add(1, Ordering::Relaxed);
        let watch = forward::Watch::for_failure_timeout(self.cfg.failure_timeout);
        forward::open(&conn, request, watch).await
    }

    /// Serve and store model blobs under `models_dir` (the store's root),
    /// moving at most `bytes_per_sec` in and out (0: no cap).
    pub fn configure_blobs(&self, models_dir: PathBuf, bytes_per_sec: u64) {
        self.blobs.configure(models_dir, bytes_per_sec);
    }

    /// Fetch blob `digest` from `peer` into the store (resuming a partial).
    pub async fn fetch_blob(&self, peer: &str, digest: &str) -> Result<PathBuf, BlobError> {
        let conn = self
            .mesh
            .connection(peer)
            .ok_or_else(|| BlobError::Unavailable(format!("no connection to node '{peer}'")))?;
        self.blobs.fetch_blob(&conn, peer, digest).await
    }

    /// Fetch blob `digest` from every connected one of `peers` at once (in
    /// ranges, when it is large), else from one after another.
    pub async fn fetch_blob_from(
        &self,
        peers: &[String],
        digest: &str,
    ) -> Result<PathBuf, BlobError> {
        let sources: Vec<(String, quinn::Connection)> = peers
            .iter()
            .filter_map(|p| self.mesh.connection(p).map(|c| (p.clone(), c)))
            .collect();
        if sources.is_empty() {
            return Err(BlobError::Unavailable(format!(
                "no connection to any of {peers:?}"
            )));
        }
        self.blobs.fetch_blob_multi(&sources, digest).await
    }

    /// The bytes of manifest `path` on `peer`, checked against `digest`.
    pub async fn fetch_manifest(
        &self,
        peer: &str,
        path: &str,
        digest: Option<&str>,
    ) -> Result<Vec<u8>, BlobError> {
        let conn = self
            .mesh
            .connection(peer)
            .ok_or_else(|| BlobError::Unavailable(format!("no connection to node '{peer}'")))?;
        self.blobs.fetch_manifest(&conn, path, digest).await
    }

    /// Commit a tombstone for `model` in the Raft state, through the leader.
    pub async fn put_tombstone(&self, model: &str, deleted_at_ms: u64) -> Result<(), ClusterError> {
        self.propose(Command::Tombstone {
            model: model.to_owned(),
            deleted_at_ms,
        })
        .await
        .map(|_| ())
    }

    /// Commit `cmd` (a tombstone or a catalogue change) through the leader;
    /// the state machine's answer (false: a catalogue compare-and-set lost).
    pub async fn propose(&self, cmd: Command) -> Result<bool, ClusterError> {
        cmd.check().map_err(ClusterError::Config)?;
        match self.leader_connection(false)? {
            None => self
                .raft
                .client_write(cmd)
                .await
                .map(|r| r.data)
                .map_err(|e| ClusterError::Raft(e.to_string())),
            Some(conn) => {
                let body = serde_json::to_vec(&cmd).unwrap_or_default();
                call_for(&conn, Kind::Propose, &body).await
            }
        }
    }

    /// The model catalogue as this node's state machine has applied it.
    pub fn catalog(&self) -> BTreeMap<String, String> {
        self.store.catalog()
    }

    /// None when this node leads; else a connection to the leader (or, with
    /// `via_any_peer`, to any connected peer, which passes the call on).
    pub(super) fn leader_connection(
        &self,
        via_any_peer: bool,
    ) -> Result<Option<quinn::Connection>, ClusterError> {
        let m = self.raft.metrics().borrow().clone();
        let Some(l) = m.current_leader else {
            return Err(ClusterError::Raft(
                "no leader: the cluster has no quorum".into(),
            ));
        };
        if l == raft_id(&self.cfg.node_id) {
            return Ok(None);
        }
        let leader = m
            .membership_config
            .membership()
            .get_node(&l)
            .map(|n| n.name.clone())
            .ok_or_else(|| ClusterError::Raft("leader has no metadata".into()))?;
        self.mesh
            .connection(&leader)
            .or_else(|| {
                via_any_peer
                    .then(|| {
                        self.mesh
                            .connected()
                            .first()
                            .and_then(|p| self.mesh.connection(p))
                    })
                    .flatten()
            })
            .map(Some)
            .ok_or_else(|| ClusterError::Raft(format!("no connection to the leader '{leader}'")))
    }

    /// Deleted models in the Raft state: name -> unix ms.
    pub fn tombstones(&self) -> BTreeMap<String, u64> {
        self.store.tombstones()
    }

    /// Blob transfers in progress and totals.
    pub fn transfer_status(&self) -> TransferStatus {
        self.blobs.status()
    }

    /// The next request forwarded to this node; None once stopped.
    pub async fn next_inbound(&self) -> Option<Inbound> {
        let mut stop = self.shutdown.subscribe();
        if *stop.borrow() {
            return None;
        }
        let mut rx = self.inbound_rx.lock().await;
        tokio::select! {
            i = rx.recv() => i,
            _ = stop.wait_for(|s| *s) => None,
        }
    }

    /// A forwarded request already waiting, without waiting for one.
    pub fn try_next_inbound(&self) -> Option<Inbound> {
        self.inbound_rx.try_lock().ok()?.try_recv().ok()
    }
}
