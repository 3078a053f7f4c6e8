//! The cluster runtime of one node: it ties the QUIC [`Mesh`], Raft
//! ([`crate::consensus`]), liveness and adverts ([`crate::membership`]) and
//! request forwarding ([`crate::forward`]) together, and is what the Python
//! `Cluster` class drives.
//!
//! Formation works like k3s: the first node makes the CA, its certificate and
//! a join token and initialises Raft with itself as the only voter. A joiner
//! proves the token to any member on a connection without a client certificate
//! (the only thing such a connection may do), receives a certificate signed by
//! a voter and the CA certificate (never the CA key: only voters hold it, see
//! `ca.rs`), and is added to Raft: as a learner first, then as a voter once it
//! has caught up, while there are fewer than `max_voters` voters.
//! From then on every connection is mTLS. A restarted node finds its
//! certificate and Raft state in its data dir and rejoins by itself.

mod ca;
mod join;
mod members;
mod peers;
mod rpc;
mod serve;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use openraft::ServerState;
use serde::Serialize;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::blobs::{BlobError, Blobs, TransferStatus};
use crate::consensus::network::{Network, Rpc, RpcError};
use crate::consensus::store::FileStore;
use crate::consensus::MAX_VOTERS;
use crate::consensus::{raft_config, raft_id, Command, NodeMeta, RaftNode};
use crate::forward::{self, ForwardError, ForwardStream, Inbound};
use crate::membership::{Membership, NodeView};
use crate::transport::mesh::PeerEvent;
use crate::transport::tls::{ClusterCa, JoinToken, TlsError, TlsMaterial};
use crate::transport::{self, Kind, Mesh, TransportError};
use crate::tunnel::Tunnels;

pub use join::{JoinParseError, JoinRequest, JoinResponse, MAX_JOIN_REQUEST};

/// How a node is started; one explicit conversion from the Python side.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    pub node_id: String,
    pub data_dir: PathBuf,
    pub host: String,
    pub port: u16,
    pub join: Vec<String>,
    pub token: Option<String>,
    pub api_address: String,
    /// A peer silent this long is marked down (quinn's idle timeout).
    pub failure_timeout: Duration,
    /// Learners are promoted while the voters are fewer (1..=[`MAX_VOTERS`]);
    /// the leader's setting counts. Only voters hold the CA key.
    pub max_voters: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("{0}")]
    Config(String),
    #[error("join refused: {0}")]
    JoinRefused(String),
    #[error("could not join: {0}")]
    Join(String),
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("raft: {0}")]
    Raft(String),
}

/// Counters for metrics and tests.
#[derive(Debug, Default)]
pub struct Counters {
    pub joins_accepted: AtomicU64,
    /// Joins this node (without the CA key) had a voter sign; also accepted.
    pub joins_forwarded: AtomicU64,
    /// Join attempts with a wrong token.
    pub joins_refused: AtomicU64,
    /// Connections without a client certificate that asked for more than a join.
    pub unauthenticated_refused: AtomicU64,
    pub forwards_in: AtomicU64,
    pub forwards_out: AtomicU64,
    /// Connections closed for the other reasons of [`Refusal`], by reason.
    refusals: [AtomicU64; Refusal::ALL.len()],
}

/// Why a peer's connection was closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No client certificate, and it asked for more than one join.
    NoCertificate,
    /// A Hello (or the dialled peer's certificate) naming another node.
    Hello,
    /// An advert for another node.
    Advert,
    /// A Raft message speaking for another node.
    Raft,
    /// The certificate is on the deny list (a removed node).
    Denied,
    /// Too many connections without a certificate from one address.
    UnauthenticatedLimit,
    /// A join request over [`MAX_JOIN_REQUEST`] bytes.
    UnauthenticatedOversize,
}

impl Refusal {
    pub const ALL: [Refusal; 7] = [
        Refusal::NoCertificate,
        Refusal::Hello,
        Refusal::Advert,
        Refusal::Raft,
        Refusal::Denied,
        Refusal::UnauthenticatedLimit,
        Refusal::UnauthenticatedOversize,
    ];

    /// The label Prometheus shows.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::NoCertificate => "no_certificate",
            Refusal::Hello => "impersonation_hello",
            Refusal::Advert => "impersonation_advert",
            Refusal::Raft => "impersonation_raft",
            Refusal::Denied => "denied_certificate",
            Refusal::UnauthenticatedLimit => "unauthenticated_limit",
            Refusal::UnauthenticatedOversize => "join_too_large",
        }
    }
}

impl Counters {
    pub fn refused(&self, reason: Refusal) {
        if reason == Refusal::NoCertificate {
            self.unauthenticated_refused.fetch_add(1, Ordering::Relaxed);
        }
        self.refusals[reason as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Connections closed for `reason` since start.
    pub fn refusals(&self, reason: Refusal) -> u64 {
        self.refusals[reason as usize].load(Ordering::Relaxed)
    }
}

/// The answer of `status()`.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub node_id: String,
    pub role: &'static str,
    pub leader_id: Option<String>,
    pub term: u64,
    pub members: Vec<String>,
    pub voters: Vec<String>,
    pub learners: Vec<String>,
    /// No quorum: state changes are not accepted.
    pub degraded: bool,
    pub peers_connected: usize,
    pub p2p_address: String,
    pub joins_accepted: u64,
    pub joins_forwarded: u64,
    pub joins_refused: u64,
    /// Whether this node holds the CA key (a voter, once it has it).
    pub holds_ca_key: bool,
    pub unauthenticated_refused: u64,
    /// Peer connections closed, by reason ([`Refusal::as_str`]).
    pub peers_refused: BTreeMap<&'static str, u64>,
    pub forwards_in: u64,
    pub forwards_out: u64,
    pub peers_down_total: u64,
    /// Peer connections established since start (one per pair, reused).
    pub connections_established: u64,
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// How often the dial loop looks for members without a connection.
const DIAL_EVERY: Duration = Duration::from_millis(250);
/// How long a member with a smaller id (which should dial us) may stay
/// unconnected before we dial it ourselves.
const FALLBACK_DIAL_AFTER: Duration = Duration::from_secs(3);
/// A request waiting for the local handler beyond this many is refused (503).
const INBOUND_QUEUE: usize = 4096;
/// Bound on any control exchange (join, hello, add member).
const CONTROL_TIMEOUT: Duration = Duration::from_secs(10);

/// Raft RPCs over the mesh.
#[derive(Clone)]
struct MeshRpc(Arc<Mesh>);

impl Rpc for MeshRpc {
    async fn call(
        &self,
        peer: &str,
        kind: Kind,
        payload: Vec<u8>,
        timeout: Duration,
    ) -> Result<Bytes, RpcError> {
        let conn = self
            .0
            .connection(peer)
            .ok_or_else(|| RpcError::Unreachable(peer.to_owned()))?;
        let f = transport::call(&conn, kind, &payload, timeout)
            .await
            .map_err(|e| RpcError::Failed(e.to_string()))?;
        match f.kind {
            Kind::RaftResponse => Ok(f.payload),
            _ => Err(RpcError::Failed(
                String::from_utf8_lossy(&f.payload).into_owned(),
            )),
        }
    }
}

/// One node's cluster runtime.
pub struct Cluster {
    cfg: ClusterConfig,
    p2p_address: String,
    /// Certificates and join secret; its CA never holds the key (`ca_key`).
    material: TlsMaterial,
    /// The CA with its key while this node holds it (a voter).
    ca_key: Mutex<Option<Arc<ClusterCa>>>,
    mesh: Arc<Mesh>,
    raft: RaftNode,
    store: FileStore,
    membership: Mutex<Membership>,
    pub counters: Counters,
    inbound_tx: mpsc::Sender<Inbound>,
    inbound_rx: tokio::sync::Mutex<mpsc::Receiver<Inbound>>,
    advert: Mutex<Option<Bytes>>,
    /// Members learned from the join answer, until Raft replicates them.
    seeds: Mutex<BTreeMap<String, NodeMeta>>,
    dialing: Mutex<HashSet<String>>,
    /// The IP peers reach us at, learned from an incoming connection when we
    /// listen on an unspecified address (0.0.0.0), so our metadata names a
    /// reachable address rather than 0.0.0.0.
    learned_ip: Mutex<Option<std::net::IpAddr>>,
    /// The certificate each connected peer last proved: node -> fingerprint,
    /// so removing a node denies it even if its join predates `Certify`.
    seen_certs: Mutex<HashMap<String, String>>,
    /// Open connections without a certificate, by source address.
    unauthenticated: Mutex<HashMap<std::net::IpAddr, usize>>,
    /// The join secret last written to `data_dir/tls`.
    saved_secret: Mutex<String>,
    shutdown: watch::Sender<bool>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    /// Model blobs and manifests to and from peers.
    blobs: Blobs,
    /// ggml RPC tunnels: opened to peers, served to peers (`crate::tunnel`).
    tunnels: Tunnels,
}

fn valid_node_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 128 && id.chars().all(|c| c.is_ascii_graphic())
}

async fn resolve(addr: &str) -> Result<SocketAddr, ClusterError> {
    tokio::net::lookup_host(addr)
        .await
        .map_err(|e| ClusterError::Config(format!("cannot resolve '{addr}': {e}")))?
        .next()
        .ok_or_else(|| ClusterError::Config(format!("'{addr}' resolves to no address")))
}

impl Cluster {
    /// Bind the P2P port, create or join the cluster (or rejoin after a
    /// restart) and start Raft. Must run inside a tokio runtime.
    pub async fn start(cfg: ClusterConfig) -> Result<Arc<Cluster>, ClusterError> {
        if !valid_node_id(&cfg.node_id) {
            return Err(ClusterError::Config(format!(
                "invalid node id '{}'",
                cfg.node_id
            )));
        }
        if !(1..=MAX_VOTERS).contains(&cfg.max_voters) {
            return Err(ClusterError::Config(format!(
                "max_voters must be 1 to {MAX_VOTERS}, not {}",
                cfg.max_voters
            )));
        }
        let tls_dir = cfg.data_dir.join("tls");
        let store = FileStore::open(&cfg.data_dir.join("raft"))?;
        let bind_addr = resolve(&format_host_port(&cfg.host, cfg.port)).await?;
        // Bind first: a busy port fails before anything else, and port 0 gets
        // its real number before we tell anyone where we listen.
        let socket = transport::udp_socket(bind_addr).map_err(|e| {
            ClusterError::Config(format!("cannot bind the p2p port {bind_addr}/udp: {e}"))
        })?;
        let p2p_address = socket.local_addr()?.to_string();
        let mut seeds = BTreeMap::new();
        let mut material = if TlsMaterial::exists(&tls_dir) {
            TlsMaterial::load(&tls_dir)?
        } else if !cfg.join.is_empty() {
            let token = cfg.token.as_deref().ok_or_else(|| {
                ClusterError::Config("a token is required to join (--token)".into())
            })?;
            let token = JoinToken::parse(token)?;
            let req = JoinRequest {
                secret: token.secret.clone(),
                node_id: cfg.node_id.clone(),
                p2p_address: p2p_address.clone(),
                api_address: cfg.api_address.clone(),
            };
            let resp = join::request(&cfg.join, &token, &req, cfg.failure_timeout).await?;
            let material = resp.material()?;
            material.save(&tls_dir)?;
            for m in resp.members {
                seeds.insert(m.name.clone(), m);
            }
            material
        } else {
            let m = TlsMaterial::create(&cfg.node_id)?;
            m.save(&tls_dir)?;
            m
        };
        let bootstrap = cfg.join.is_empty() && !store.has_state();
        // kept apart, and dropped (with its file) by `ca_key_loop` unless
        // this node is a voter
        let ca_key = material.ca.take_key().map(Arc::new);

        let endpoint = transport::endpoint(
            socket,
            Some(transport::server_config(&material, cfg.failure_timeout)?),
        )?;
        let client = transport::client_config(material.client_config()?, cfg.failure_timeout)?;
        let (mesh, events) = Mesh::new(cfg.node_id.clone(), endpoint, client);
        let mesh = Arc::new(mesh);
        let (log_store, sm) = openraft::storage::Adaptor::new(store.clone());
        let raft = RaftNode::new(
            raft_id(&cfg.node_id),
            raft_config(),
            Network::new(MeshRpc(mesh.clone())),
            log_store,
            sm,
        )
        .await
        .map_err(|e| ClusterError::Raft(e.to_string()))?;
        let me = NodeMeta {
            name: cfg.node_id.clone(),
            p2p_address: p2p_address.clone(),
            api_address: cfg.api_address.clone(),
        };
        if bootstrap
            && !raft
                .is_initialized()
                .await
                .map_err(|e| ClusterError::Raft(e.to_string()))?
        {
            raft.initialize(BTreeMap::from([(raft_id(&me.name), me.clone())]))
                .await
                .map_err(|e| ClusterError::Raft(e.to_string()))?;
        }
        let (inbound_tx, inbound_rx) = mpsc::channel(INBOUND_QUEUE);
        let (shutdown, _) = watch::channel(false);
        let cluster = Arc::new(Cluster {
            cfg,
            p2p_address,
            material,
            ca_key: Mutex::new(ca_key),
            mesh,
            raft,
            store,
            membership: Mutex::new(Membership::new()),
            counters: Counters::default(),
            inbound_tx,
            inbound_rx: tokio::sync::Mutex::new(inbound_rx),
            advert: Mutex::new(None),
            seeds: Mutex::new(seeds),
            dialing: Mutex::new(HashSet::new()),
            learned_ip: Mutex::new(None),
            seen_certs: Mutex::new(HashMap::new()),
            unauthenticated: Mutex::new(HashMap::new()),
            saved_secret: Mutex::new(String::new()),
            shutdown,
            tasks: Mutex::new(Vec::new()),
            blobs: Blobs::default(),
            tunnels: Tunnels::default(),
        });
        let tasks = vec![
            tokio::spawn(cluster.clone().accept_loop()),
            tokio::spawn(cluster.clone().event_loop(events)),
            tokio::spawn(cluster.clone().dial_loop()),
            tokio::spawn(cluster.clone().metadata_loop()),
            tokio::spawn(cluster.clone().ca_key_loop()),
        ];
        cluster
            .tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(tasks);
        Ok(cluster)
    }

    /// Stop Raft, close every connection and the endpoint.
    pub async fn stop(&self) {
        let _ = self.shutdown.send(true);
        self.tunnels.close_all();
        let _ = tokio::time::timeout(Duration::from_secs(3), self.raft.shutdown()).await;
        for t in self
            .tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            t.abort();
        }
        self.mesh.close();
        let _ =
            tokio::time::timeout(Duration::from_secs(1), self.mesh.endpoint().wait_idle()).await;
        // Handles to this Cluster may outlive stop() (a Python object, a test);
        // move the endpoint off the P2P port so a restart can bind it at once.
        // quinn keeps the previous socket for late packets until the next
        // rebind, hence two.
        for _ in 0..2 {
            if let Ok(s) = std::net::UdpSocket::bind(("127.0.0.1", 0)) {
                let _ = self.mesh.endpoint().rebind(s);
            }
        }
    }

    pub fn node_id(&self) -> &str {
        &self.cfg.node_id
    }

    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.mesh.endpoint().local_addr().ok()
    }

    /// This node's metadata as peers should see it.
    fn my_meta(&self) -> NodeMeta {
        let mut p2p = self.p2p_address.clone();
        if let Ok(a) = p2p.parse::<SocketAddr>() {
            if a.ip().is_unspecified() {
                if let Some(ip) = *self.learned_ip.lock().unwrap_or_else(|p| p.into_inner()) {
                    p2p = SocketAddr::new(ip, a.port()).to_string();
                }
            }
        }
        NodeMeta {
            name: self.cfg.node_id.clone(),
            p2p_address: p2p,
            api_address: self.cfg.api_address.clone(),
        }
    }

    fn has_concrete_address(meta: &NodeMeta) -> bool {
        meta.p2p_address
            .parse::<SocketAddr>()
            .is_ok_and(|a| !a.ip().is_unspecified())
    }

    /// The join token, with the join secret as last rotated.
    pub fn join_token(&self) -> String {
        let mut t = self.material.token();
        t.secret = self.join_secret();
        t.render()
    }

    /// The secret joins must prove: the rotated one once the cluster state
    /// has one, else the one in `data_dir/tls`.
    pub fn join_secret(&self) -> String {
        self.store
            .join_secret()
            .unwrap_or_else(|| self.material.secret.clone())
    }

    /// Replace the join secret cluster-wide: the old token stops working on
    /// every member once the change is applied there. Returns the new token
    /// once this node has applied it (a follower does a heartbeat after the
    /// leader).
    pub async fn rotate_join_secret(&self) -> Result<String, ClusterError> {
        let secret = crate::transport::tls::new_secret();
        self.propose(Command::RotateSecret(secret.clone())).await?;
        for _ in 0..50 {
            if self.store.join_secret().as_deref() == Some(secret.as_str()) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.save_join_secret();
        let mut t = self.material.token();
        t.secret = secret;
        Ok(t.render())
    }

    /// The certificates removed nodes can no longer use: fingerprint -> node.
    pub fn denied(&self) -> BTreeMap<String, String> {
        self.store.denied()
    }

    /// Keep `data_dir/tls/join-secret` equal to the cluster's join secret, so
    /// `cluster token` without a running node prints one that works.
    fn save_join_secret(&self) {
        let secret = self.join_secret();
        let mut saved = self.saved_secret.lock().unwrap_or_else(|p| p.into_inner());
        if *saved == secret {
            return;
        }
        let path = self.cfg.data_dir.join("tls").join("join-secret");
        match crate::transport::tls::write_private(&path, secret.as_bytes()) {
            Ok(()) => *saved = secret,
            Err(e) => tracing::warn!("cannot save the rotated join secret: {e}"),
        }
    }

    fn lock_membership(&self) -> std::sync::MutexGuard<'_, Membership> {
        self.membership.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn status(&self) -> Status {
        let m = self.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership();
        let name_of = |id: u64| membership.get_node(&id).map(|n| n.name.clone());
        let voters: Vec<String> = membership.voter_ids().filter_map(name_of).collect();
        let learners: Vec<String> = membership.learner_ids().filter_map(name_of).collect();
        let leader_id = m.current_leader.and_then(name_of);
        let role = match m.state {
            ServerState::Leader => "leader",
            ServerState::Follower => "follower",
            ServerState::Learner => "learner",
            ServerState::Candidate => "candidate",
            ServerState::Shutdown => "shutdown",
        };
        let ft = self.cfg.failure_timeout.as_millis() as u64;
        let degraded = match (m.state, &leader_id) {
            (ServerState::Leader, _) => {
                voters.len() > 1 && m.millis_since_quorum_ack.is_none_or(|ms| ms > ft + 500)
            }
            (_, None) => true,
            (_, Some(l)) => !self.lock_membership().is_alive(l),
        } || self.store.save_failing()
            || m.state == ServerState::Shutdown;
        let mut members = voters.clone();
        members.extend(learners.iter().cloned());
        let c = &self.counters;
        Status {
            node_id: self.cfg.node_id.clone(),
            role,
            leader_id,
            term: m.current_term,
            members,
            voters,
            learners,
            degraded,
            peers_connected: self.mesh.connected().len(),
            p2p_address: self.my_meta().p2p_address,
            joins_accepted: c.joins_accepted.load(Ordering::Relaxed),
            joins_forwarded: c.joins_forwarded.load(Ordering::Relaxed),
            holds_ca_key: self.holds_ca_key(),
            joins_refused: c.joins_refused.load(Ordering::Relaxed),
            unauthenticated_refused: c.unauthenticated_refused.load(Ordering::Relaxed),
            peers_refused: Refusal::ALL
                .iter()
                .filter(|r| **r != Refusal::NoCertificate)
                .map(|r| (r.as_str(), c.refusals(*r)))
                .collect(),
            forwards_in: c.forwards_in.load(Ordering::Relaxed),
            forwards_out: c.forwards_out.load(Ordering::Relaxed),
            peers_down_total: self.lock_membership().downs,
            connections_established: self.mesh.established(),
        }
    }

    /// Voters that could lead next, by name: caught up with this leader's log
    /// and connected (see `consensus::handover`); empty on a follower.
    pub fn successors(&self) -> Vec<String> {
        let m = self.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership();
        let ms = self.lock_membership();
        crate::consensus::handover::successors(&self.raft)
            .into_iter()
            .filter_map(|id| membership.get_node(&id).map(|n| n.name.clone()))
            .filter(|name| ms.is_alive(name))
            .collect()
    }

    /// Hold (or release) this node's candidacy while it drains.
    pub fn hold_candidacy(&self, held: bool) {
        crate::consensus::handover::hold_candidacy(&self.raft, held);
    }

    /// Stand for election now: a draining leader hands over to this node.
    pub async fn campaign(&self) -> Result<(), ClusterError> {
        crate::consensus::handover::campaign(&self.raft)
            .await
            .map_err(|e| ClusterError::Raft(e.to_string()))
    }

    async fn event_loop(self: Arc<Self>, mut events: mpsc::UnboundedReceiver<PeerEvent>) {
        while let Some(e) = events.recv().await {
            match e {
                PeerEvent::Up(p) => {
                    self.lock_membership().connected(&p, now_ms());
                    tracing::info!("peer '{p}' up");
                    let adv = self
                        .advert
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .clone();
                    if let Some(adv) = adv {
                        self.send_advert(&p, adv);
                    }
                }
                PeerEvent::Down { peer: p, graceful } => {
                    if graceful {
                        tracing::info!("peer '{p}' left (shutting down)");
                    } else {
                        tracing::warn!("peer '{p}' down");
                    }
                    self.lock_membership().disconnected(&p, now_ms());
                }
            }
        }
    }

    /// Dial every member with a larger id that has no connection: one side of
    /// each pair dials, so there is one connection per pair. A member with a
    /// smaller id that stays unconnected for [`FALLBACK_DIAL_AFTER`] is dialled
    /// too: it may hold a stale address for us (we restarted on another port).
    async fn dial_loop(self: Arc<Self>) {
        let mut tick = tokio::time::interval(DIAL_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut unconnected_since: HashMap<String, std::time::Instant> = HashMap::new();
        loop {
            tick.tick().await;
            let mut known = self.store.nodes();
            {
                // A seed (from the join answer) stands in until the cluster
                // state has an address to dial: a node listening on 0.0.0.0
                // is recorded so until it learns its own IP.
                let mut seeds = self.seeds.lock().unwrap_or_else(|p| p.into_inner());
                seeds.retain(|k, _| !known.get(k).is_some_and(Self::has_concrete_address));
                for (k, v) in seeds.iter() {
                    if !known.contains_key(k) || Self::has_concrete_address(v) {
                        known.insert(k.clone(), v.clone());
                    }
                }
            }
            unconnected_since.retain(|k, _| known.contains_key(k));
            for (name, meta) in known {
                if name == self.cfg.node_id {
                    continue;
                }
                if self.mesh.connection(&name).is_some() {
                    unconnected_since.remove(&name);
                    continue;
                }
                let since = *unconnected_since
                    .entry(name.clone())
                    .or_insert_with(std::time::Instant::now);
                if name.as_str() < self.cfg.node_id.as_str()
                    && since.elapsed() < FALLBACK_DIAL_AFTER
                {
                    continue;
                }
                if !self
                    .dialing
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(name.clone())
                {
                    continue;
                }
                let me = self.clone();
                tokio::spawn(async move {
                    let res = async {
                        let addr = resolve(&meta.p2p_address).await?;
                        Ok::<_, ClusterError>(
                            me.mesh.dial(&name, addr, me.cfg.failure_timeout).await?,
                        )
                    }
                    .await;
                    me.dialing
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&name);
                    match res {
                        Ok(conn) => {
                            tokio::spawn(me.clone().serve_connection(conn, Some(name)));
                        }
                        Err(e) => tracing::debug!("dial '{name}' at {}: {e}", meta.p2p_address),
                    }
                });
            }
        }
    }

    /// Keep this node's metadata in the cluster state true: after a restart
    /// with new addresses, or once a 0.0.0.0 listener learns its real IP.
    async fn metadata_loop(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            self.save_join_secret();
            let me = self.my_meta();
            let Some(known) = self.store.nodes().get(&me.name).cloned() else {
                continue;
            };
            if known == me {
                continue;
            }
            // never replace a reachable address with 0.0.0.0
            if !Self::has_concrete_address(&me) && Self::has_concrete_address(&known) {
                let port =
                    |m: &NodeMeta| m.p2p_address.parse::<SocketAddr>().map(|a| a.port()).ok();
                if port(&known) == port(&me) && known.api_address == me.api_address {
                    continue;
                }
            }
            let _ = self.add_member(me).await;
        }
    }
}

/// Call `kind` on a peer that answers with a JSON `Result<T, String>`.
async fn call_for<T: serde::de::DeserializeOwned>(
    conn: &quinn::Connection,
    kind: Kind,
    body: &[u8],
) -> Result<T, ClusterError> {
    let f = transport::call(conn, kind, body, CONTROL_TIMEOUT).await?;
    let res: Result<T, String> =
        serde_json::from_slice(&f.payload).map_err(|e| ClusterError::Raft(e.to_string()))?;
    res.map_err(ClusterError::Raft)
}

fn format_host_port(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

#[cfg(test)]
mod tests;
