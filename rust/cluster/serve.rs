//! Accepting connections and serving the streams peers open on them: every
//! message family a peer may send is dispatched here.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;

use super::{now_ms, Cluster, Refusal, CONTROL_TIMEOUT, MAX_JOIN_REQUEST};
use crate::consensus::network::{self, ServeError};
use crate::consensus::{raft_id, Command, NodeMeta};
use crate::forward;
use crate::transport::frame::decode_all;
use crate::transport::mesh::Hello;
use crate::transport::{self, codes, write_frame, FrameReader, Kind, TransportError};

impl Cluster {
    // --- background tasks

    pub(super) async fn accept_loop(self: Arc<Self>) {
        while let Some(incoming) = self.mesh.endpoint().accept().await {
            let me = self.clone();
            tokio::spawn(async move {
                match incoming.await {
                    Ok(conn) => me.serve_connection(conn, None).await,
                    Err(e) => tracing::debug!("incoming connection failed: {e}"),
                }
            });
        }
    }

    /// Learn the IP peers reach us at from `conn`, which must come from an
    /// authenticated peer (a certificate, or a join that proved the token).
    pub(super) fn learn_ip(&self, conn: &quinn::Connection) {
        if let Some(ip) = conn.local_ip().filter(|ip| !ip.is_unspecified()) {
            self.learned_ip
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get_or_insert(ip);
        }
    }

    /// Close `conn` for `reason`, counted.
    fn refuse(&self, conn: &quinn::Connection, reason: Refusal, why: &str) {
        self.counters.refused(reason);
        tracing::warn!(
            "closing connection from {}: {why} ({})",
            conn.remote_address(),
            reason.as_str()
        );
        let code = match reason {
            Refusal::Denied => codes::DENIED,
            Refusal::UnauthenticatedLimit | Refusal::UnauthenticatedOversize => codes::BUSY,
            _ => codes::IMPERSONATION,
        };
        conn.close(code, why.as_bytes());
    }

    /// Serve the streams a peer opens on `conn` (`dialed`: the node we dialled).
    pub(super) async fn serve_connection(
        self: Arc<Self>,
        conn: quinn::Connection,
        dialed: Option<String>,
    ) {
        let Some(cert) = transport::peer_cert(&conn) else {
            return self.serve_unauthenticated(conn).await;
        };
        if self.store.is_denied(&cert.fingerprint) {
            let why = format!("node '{}' was removed from the cluster", cert.node_id);
            return self.refuse(&conn, Refusal::Denied, &why);
        }
        if dialed.as_ref().is_some_and(|d| *d != cert.node_id) {
            return self.refuse(&conn, Refusal::Hello, "certificate names another node");
        }
        // only an authenticated peer teaches us the address we advertise
        self.learn_ip(&conn);
        self.seen_certs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(cert.node_id.clone(), cert.fingerprint.clone());
        let peer = Arc::new(cert.node_id);
        loop {
            tokio::select! {
                bi = conn.accept_bi() => match bi {
                    Ok((send, recv)) => {
                        let me = self.clone();
                        let (conn, peer) = (conn.clone(), peer.clone());
                        tokio::spawn(async move { me.serve_bi(conn, peer, send, recv).await });
                    }
                    Err(_) => return,
                },
                uni = conn.accept_uni() => match uni {
                    Ok(recv) => {
                        let me = self.clone();
                        let (conn, peer) = (conn.clone(), peer.clone());
                        tokio::spawn(async move { me.serve_uni(conn, peer, recv).await });
                    }
                    Err(_) => return,
                },
            }
        }
    }

    /// A connection without a client certificate: at most
    /// [`MAX_UNAUTHENTICATED_PER_SOURCE`] at once from one address, each
    /// allowed one stream carrying one join request of at most
    /// [`MAX_JOIN_REQUEST`] bytes, then closed.
    async fn serve_unauthenticated(self: Arc<Self>, conn: quinn::Connection) {
        let source = conn.remote_address().ip();
        let Some(_slot) = UnauthSlot::take(&self.unauthenticated, source) else {
            return self.refuse(
                &conn,
                Refusal::UnauthenticatedLimit,
                "too many connections without a certificate from this address",
            );
        };
        let exchange = async {
            let (send, mut recv) = conn.accept_bi().await.ok()?;
            // a frame header is 6 bytes; anything longer than one bounded
            // join request is refused unread
            match recv.read_to_end(MAX_JOIN_REQUEST + 16).await {
                Ok(bytes) => Some((send, bytes)),
                Err(quinn::ReadToEndError::TooLong) => {
                    self.refuse(
                        &conn,
                        Refusal::UnauthenticatedOversize,
                        "join request too large",
                    );
                    None
                }
                Err(_) => None,
            }
        };
        let Ok(Some((send, bytes))) = tokio::time::timeout(CONTROL_TIMEOUT, exchange).await else {
            conn.close(codes::UNAUTHENTICATED, b"one join request, in time");
            return;
        };
        let (frames, err) = decode_all(&bytes);
        let first = match (frames.as_slice(), err) {
            ([f], None) => f,
            _ => {
                self.counters.refused(Refusal::NoCertificate);
                conn.close(codes::PROTOCOL, b"one frame expected");
                return;
            }
        };
        if first.kind != Kind::JoinRequest {
            self.counters.refused(Refusal::NoCertificate);
            tracing::warn!(
                "refused {:?} from {}: no client certificate (only a join may come without one)",
                first.kind,
                conn.remote_address()
            );
            conn.close(codes::UNAUTHENTICATED, b"client certificate required");
            return;
        }
        let (kind, body) = self.handle_join(&conn, &first.payload, None).await;
        let refused = kind == Kind::Error;
        reply(send, kind, body).await;
        if refused {
            conn.close(codes::BAD_TOKEN, b"join refused");
        }
    }

    async fn serve_uni(
        self: Arc<Self>,
        conn: quinn::Connection,
        peer: Arc<String>,
        recv: quinn::RecvStream,
    ) {
        let mut reader = FrameReader::new(recv);
        let Ok(Ok(Some(f))) = tokio::time::timeout(CONTROL_TIMEOUT, reader.next()).await else {
            return;
        };
        if f.kind != Kind::Advert {
            return;
        }
        let Some(nl) = f.payload.iter().position(|&b| b == b'\n') else {
            return;
        };
        let Ok(id) = std::str::from_utf8(&f.payload[..nl]) else {
            return;
        };
        if id != peer.as_str() {
            let why = format!("advert for '{id}' from node '{peer}'");
            return self.refuse(&conn, Refusal::Advert, &why);
        }
        let advert = f.payload.slice(nl + 1..);
        self.lock_membership().advert(id, advert, now_ms());
    }

    async fn serve_bi(
        self: Arc<Self>,
        conn: quinn::Connection,
        peer: Arc<String>,
        send: quinn::SendStream,
        recv: quinn::RecvStream,
    ) {
        let mut reader = FrameReader::new(recv);
        let first = match tokio::time::timeout(CONTROL_TIMEOUT, reader.next()).await {
            Ok(Ok(Some(f))) => f,
            Ok(Err(TransportError::Frame(e))) => {
                tracing::warn!("closing connection from {}: {e}", conn.remote_address());
                conn.close(codes::PROTOCOL, b"bad frame");
                return;
            }
            _ => return,
        };
        match first.kind {
            Kind::Hello => {
                let Ok(h) = serde_json::from_slice::<Hello>(&first.payload) else {
                    return;
                };
                if h.id != *peer {
                    let why = format!("hello as '{}' from node '{peer}'", h.id);
                    return self.refuse(&conn, Refusal::Hello, &why);
                }
                if h.id == self.cfg.node_id {
                    conn.close(codes::PROTOCOL, b"bad hello");
                    return;
                }
                self.mesh.register(h.id, conn.clone());
                let body = serde_json::to_vec(&Hello {
                    id: self.cfg.node_id.clone(),
                })
                .unwrap_or_default();
                reply(send, Kind::Hello, body).await;
            }
            Kind::RaftVote | Kind::RaftAppend | Kind::RaftSnapshot => {
                let from = raft_id(&peer);
                match network::serve(&self.raft, first.kind, &first.payload, from).await {
                    Ok(body) => reply(send, Kind::RaftResponse, body).await,
                    Err(e @ ServeError::Impersonation { .. }) => {
                        self.refuse(&conn, Refusal::Raft, &e.to_string())
                    }
                    Err(e) => reply(send, Kind::Error, e.to_string().into_bytes()).await,
                }
            }
            Kind::AddMember => {
                let res: Result<(), String> =
                    match serde_json::from_slice::<NodeMeta>(&first.payload) {
                        Ok(meta) => self.add_member(meta).await.map_err(|e| e.to_string()),
                        Err(e) => Err(format!("bad node metadata: {e}")),
                    };
                reply(
                    send,
                    Kind::AddMemberResponse,
                    serde_json::to_vec(&res).unwrap_or_default(),
                )
                .await;
            }
            Kind::Forward => {
                self.counters.forwards_in.fetch_add(1, Ordering::Relaxed);
                let from = peer.to_string();
                let inbound = forward::accept(from, first.payload, send);
                if let Err(
                    mpsc::error::TrySendError::Full(i) | mpsc::error::TrySendError::Closed(i),
                ) = self.inbound_tx.try_send(inbound)
                {
                    i.reply
                        .error(503, "the node's forwarded request queue is full".into());
                }
            }
            Kind::RemoveMember => {
                let res: Result<(), String> = match serde_json::from_slice::<String>(&first.payload)
                {
                    Ok(name) => self.remove_member(&name).await.map_err(|e| e.to_string()),
                    Err(e) => Err(format!("bad node name: {e}")),
                };
                reply(
                    send,
                    Kind::RemoveMemberResponse,
                    serde_json::to_vec(&res).unwrap_or_default(),
                )
                .await;
            }
            Kind::Propose => {
                // only a leader commits; a follower's own propose goes
                // straight to the leader, so this never loops
                let res: Result<bool, String> =
                    match serde_json::from_slice::<Command>(&first.payload) {
                        Ok(cmd) if !cmd.proposable() => {
                            Err("command not accepted from a peer".into())
                        }
                        Ok(cmd) if self.status().role == "leader" => {
                            self.propose(cmd).await.map_err(|e| e.to_string())
                        }
                        Ok(_) => Err("not the leader".into()),
                        Err(e) => Err(format!("malformed command: {e}")),
                    };
                reply(
                    send,
                    Kind::ProposeResponse,
                    serde_json::to_vec(&res).unwrap_or_default(),
                )
                .await;
            }
            Kind::FetchBlob => {
                self.blobs.serve(&peer, &first.payload, send).await;
            }
            Kind::JoinRequest => {
                // a member without the CA key passing a join on
                let (kind, body) = self.handle_join(&conn, &first.payload, Some(&peer)).await;
                reply(send, kind, body).await;
            }
            Kind::RpcTunnel => {
                let (recv, leftover) = reader.into_parts();
                self.tunnels.serve(&peer, send, recv, leftover).await;
            }
            Kind::CaKey => {
                let res = self.serve_ca_key(&peer);
                reply(
                    send,
                    Kind::CaKeyResponse,
                    serde_json::to_vec(&res).unwrap_or_default(),
                )
                .await;
            }
            other => {
                tracing::warn!("unexpected {other:?} stream from {}", conn.remote_address());
            }
        }
    }
}

async fn reply(mut send: quinn::SendStream, kind: Kind, body: Vec<u8>) {
    let _ = write_frame(&mut send, kind, &body).await;
    let _ = send.finish();
    let _ = send.stopped().await;
}

/// How many connections without a certificate one address may hold at once:
/// a joiner needs one; a few more cover joiners behind one NAT.
pub const MAX_UNAUTHENTICATED_PER_SOURCE: usize = 4;

/// One of an address's unauthenticated connection slots, given back on drop.
struct UnauthSlot<'a> {
    map: &'a Mutex<HashMap<IpAddr, usize>>,
    ip: IpAddr,
}

impl<'a> UnauthSlot<'a> {
    fn take(map: &'a Mutex<HashMap<IpAddr, usize>>, ip: IpAddr) -> Option<Self> {
        let mut m = map.lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry(ip).or_insert(0);
        if *n >= MAX_UNAUTHENTICATED_PER_SOURCE {
            return None;
        }
        *n += 1;
        Some(Self { map, ip })
    }
}

impl Drop for UnauthSlot<'_> {
    fn drop(&mut self) {
        let mut m = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
    }
}
