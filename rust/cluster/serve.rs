//! Accepting connections and serving the streams peers open on them: every
//! message family a peer may send is dispatched here.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;

use super::{now_ms, valid_node_id, Cluster, CONTROL_TIMEOUT};
use crate::consensus::{Command, NodeMeta};
use crate::forward;
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

    /// Serve the streams a peer opens on `conn`.
    pub(super) async fn serve_connection(
        self: Arc<Self>,
        conn: quinn::Connection,
        peer: Option<String>,
    ) {
        let authed = transport::peer_has_cert(&conn);
        if let Some(ip) = conn.local_ip().filter(|ip| !ip.is_unspecified()) {
            self.learned_ip
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get_or_insert(ip);
        }
        let peer = Arc::new(Mutex::new(peer));
        loop {
            tokio::select! {
                bi = conn.accept_bi() => match bi {
                    Ok((send, recv)) => {
                        let me = self.clone();
                        let (conn, peer) = (conn.clone(), peer.clone());
                        tokio::spawn(async move { me.serve_bi(conn, peer, authed, send, recv).await });
                    }
                    Err(_) => return,
                },
                uni = conn.accept_uni(), if authed => match uni {
                    Ok(recv) => {
                        let me = self.clone();
                        tokio::spawn(async move { me.serve_uni(recv).await });
                    }
                    Err(_) => return,
                },
            }
        }
    }

    async fn serve_uni(self: Arc<Self>, recv: quinn::RecvStream) {
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
        if id == self.cfg.node_id {
            return;
        }
        let advert = f.payload.slice(nl + 1..);
        self.lock_membership().advert(id, advert, now_ms());
    }

    async fn serve_bi(
        self: Arc<Self>,
        conn: quinn::Connection,
        peer: Arc<Mutex<Option<String>>>,
        authed: bool,
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
        if !authed && first.kind != Kind::JoinRequest {
            self.counters
                .unauthenticated_refused
                .fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                "refused {:?} from {}: no client certificate (only a join may come without one)",
                first.kind,
                conn.remote_address()
            );
            conn.close(codes::UNAUTHENTICATED, b"client certificate required");
            return;
        }
        async fn reply(mut send: quinn::SendStream, kind: Kind, body: Vec<u8>) {
            let _ = write_frame(&mut send, kind, &body).await;
            let _ = send.finish();
            let _ = send.stopped().await;
        }
        match first.kind {
            Kind::Hello => {
                let Ok(h) = serde_json::from_slice::<Hello>(&first.payload) else {
                    return;
                };
                if !valid_node_id(&h.id) || h.id == self.cfg.node_id {
                    conn.close(codes::PROTOCOL, b"bad hello");
                    return;
                }
                *peer.lock().unwrap_or_else(|p| p.into_inner()) = Some(h.id.clone());
                self.mesh.register(h.id, conn.clone());
                let body = serde_json::to_vec(&Hello {
                    id: self.cfg.node_id.clone(),
                })
                .unwrap_or_default();
                reply(send, Kind::Hello, body).await;
            }
            Kind::RaftVote | Kind::RaftAppend | Kind::RaftSnapshot => {
                match crate::consensus::network::serve(&self.raft, first.kind, &first.payload).await
                {
                    Ok(body) => reply(send, Kind::RaftResponse, body).await,
                    Err(e) => reply(send, Kind::Error, e.into_bytes()).await,
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
                let from = peer
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone()
                    .unwrap_or_default();
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
                let from = peer
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone()
                    .unwrap_or_default();
                self.blobs.serve(&from, &first.payload, send).await;
            }
            Kind::JoinRequest => {
                let (kind, body) = self.handle_join(&conn, &first.payload).await;
                let refused = kind == Kind::Error;
                reply(send, kind, body).await;
                if refused && !authed {
                    conn.close(codes::BAD_TOKEN, b"join refused");
                }
            }
            other => {
                tracing::warn!("unexpected {other:?} stream from {}", conn.remote_address());
            }
        }
    }
}
