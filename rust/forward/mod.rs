//! Request forwarding: one QUIC stream per request over the peer pair's
//! connection.
//!
//! The caller writes a `Forward` frame (the node's request, opaque bytes) and
//! finishes its side; the serving node answers with `Chunk` frames as its
//! engine produces them, then `End`, or an `Error` frame carrying the HTTP
//! status and message the local path would have used. Nothing is buffered
//! whole: chunks are relayed as they arrive, in batches of whatever is ready.
//!
//! Cancellation: a caller that drops its [`ForwardStream`] stops the stream
//! (STOP_SENDING); the serving side sees `stopped()` resolve, marks the
//! [`Reply`] cancelled, and the handler stops its work.
//!
//! A silent peer: the caller does not wait for the connection's idle timeout
//! (the failure timeout) to learn that the serving node died. After
//! [`Watch::quiet`] without a frame it probes the connection
//! ([`transport::answers`]); a peer that answers nothing within
//! [`Watch::probe`] ends this stream as unavailable, so the entry node
//! migrates it at once. The peer is not marked down for that (a stream's
//! verdict, not the cluster's): the idle timeout still decides membership.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};

use crate::transport::{self, codes, frame, write_frame, FrameReader, Kind, TransportError};

/// Why a forwarded request failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ForwardError {
    /// The peer could not be reached or the stream broke: retryable while no
    /// chunk was sent on.
    #[error("peer unavailable: {0}")]
    Unavailable(String),
    /// The peer answered with an error (model not found, overloaded…).
    #[error("{message}")]
    Remote { status: u16, message: String },
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    pub status: u16,
    pub message: String,
}

/// How a caller watches a silent serving node (see the module notes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Watch {
    /// Silence on the stream before the connection is probed.
    pub quiet: Duration,
    /// How long the probed peer has to show a sign of life.
    pub probe: Duration,
}

impl Watch {
    /// From the failure timeout (the idle timeout, with keep-alives at a
    /// quarter of it). quiet: an eighth (250 ms at the default 2 s) is
    /// several token gaps of any engine, and a probe costs one datagram, so
    /// probing a slow but healthy stream is cheap. probe: half (1 s): a
    /// peer's QUIC threads answer within its 25 ms ACK delay, so only a
    /// process killed or frozen, or a peer starved of CPU for a whole second,
    /// stays silent that long (time the prober itself was starved does not
    /// count). A wrong verdict costs a migration (one of
    /// scheduler.migration_limit), not the answer. Detection then takes at
    /// most 1.25 s instead of the 2 s idle timeout.
    pub fn for_failure_timeout(failure_timeout: Duration) -> Self {
        Self {
            quiet: failure_timeout / 8,
            probe: failure_timeout / 2,
        }
    }
}

/// The caller's side of one forwarded request.
pub struct ForwardStream {
    recv: FrameReader,
    done: bool,
    conn: quinn::Connection,
    watch: Watch,
}

fn unavailable(e: impl std::fmt::Display) -> ForwardError {
    ForwardError::Unavailable(e.to_string())
}

/// Send `request` on a new stream of `conn`, watched as `watch` says.
pub async fn open(
    conn: &quinn::Connection,
    request: &[u8],
    watch: Watch,
) -> Result<ForwardStream, ForwardError> {
    if request.len() > frame::MAX_PAYLOAD {
        return Err(ForwardError::Remote {
            status: 413,
            message: format!(
                "request of {} bytes is too large to forward between nodes (limit {} bytes)",
                request.len(),
                frame::MAX_PAYLOAD
            ),
        });
    }
    let (mut send, recv) = conn.open_bi().await.map_err(unavailable)?;
    write_frame(&mut send, Kind::Forward, request)
        .await
        .map_err(unavailable)?;
    send.finish().map_err(unavailable)?;
    Ok(ForwardStream {
        recv: FrameReader::new(recv),
        done: false,
        conn: conn.clone(),
        watch,
    })
}

/// What came first while a silent stream's peer was probed.
enum Probed {
    Frame(Result<Option<transport::Frame>, TransportError>),
    Alive,
    Silent,
}

impl ForwardStream {
    /// Wait for at least one chunk, then take every chunk already received.
    /// Returns false once the stream has ended (after the chunks in `out`).
    pub async fn next_batch(&mut self, out: &mut Vec<Bytes>) -> Result<bool, ForwardError> {
        if self.done {
            return Ok(false);
        }
        let first = self.next_watched().await?;
        let mut next = first;
        loop {
            match next {
                None => {
                    self.done = true;
                    return Err(ForwardError::Unavailable(
                        "peer closed the stream without an answer".into(),
                    ));
                }
                Some(f) => match f.kind {
                    Kind::Chunk => out.push(f.payload),
                    Kind::End => {
                        self.done = true;
                        return Ok(false);
                    }
                    Kind::Error => {
                        self.done = true;
                        return Err(match serde_json::from_slice::<ErrorBody>(&f.payload) {
                            Ok(b) => ForwardError::Remote {
                                status: b.status,
                                message: b.message,
                            },
                            Err(_) => ForwardError::Unavailable("malformed error from peer".into()),
                        });
                    }
                    other => {
                        self.done = true;
                        return Err(ForwardError::Unavailable(format!(
                            "unexpected {other:?} frame"
                        )));
                    }
                },
            }
            match self.recv.buffered().map_err(|e| self.broken(e))? {
                Some(f) => next = Some(f),
                None => return Ok(true),
            }
        }
    }

    /// The next frame; a peer silent for `watch.quiet` is probed, and one
    /// that answers nothing within `watch.probe` ends the stream. Reading is
    /// cancel-safe, so the timers lose nothing.
    async fn next_watched(&mut self) -> Result<Option<transport::Frame>, ForwardError> {
        loop {
            if let Ok(r) = tokio::time::timeout(self.watch.quiet, self.recv.next()).await {
                return r.map_err(|e| self.broken(e));
            }
            let conn = self.conn.clone();
            let probed = tokio::select! {
                biased;
                r = self.recv.next() => Probed::Frame(r),
                alive = transport::answers(&conn, self.watch.probe) => {
                    if alive { Probed::Alive } else { Probed::Silent }
                }
            };
            match probed {
                Probed::Frame(r) => return r.map_err(|e| self.broken(e)),
                Probed::Alive => continue,
                Probed::Silent => {
                    self.done = true;
                    let ms = (self.watch.quiet + self.watch.probe).as_millis();
                    return Err(ForwardError::Unavailable(format!(
                        "peer silent for {ms} ms: it answered no probe (killed or frozen)"
                    )));
                }
            }
        }
    }

    fn broken(&mut self, e: TransportError) -> ForwardError {
        self.done = true;
        ForwardError::Unavailable(e.to_string())
    }

    /// Tell the serving node to stop: the same as dropping the stream.
    pub fn cancel(&mut self) {
        if !self.done {
            self.done = true;
            self.recv.stop(codes::CANCELLED);
        }
    }

    pub fn is_done(&self) -> bool {
        self.done
    }
}

impl Drop for ForwardStream {
    fn drop(&mut self) {
        self.cancel();
    }
}

/// What the handler sends back.
#[derive(Debug)]
enum ReplyMsg {
    Chunk(Bytes),
    /// Several chunks queued at once: one message, one wake-up of the writer.
    Chunks(Vec<Bytes>),
    End,
    Error(u16, String),
}

/// A request forwarded to this node, waiting for the local handler.
pub struct Inbound {
    /// The caller's node id.
    pub from: String,
    pub request: Bytes,
    pub reply: Reply,
}

/// The serving side's handle on one forwarded request.
#[derive(Clone)]
pub struct Reply {
    tx: mpsc::UnboundedSender<ReplyMsg>,
    cancelled: watch::Receiver<bool>,
}

impl Reply {
    /// Queue a chunk; false when the caller is gone.
    pub fn chunk(&self, b: Bytes) -> bool {
        self.tx.send(ReplyMsg::Chunk(b)).is_ok() && !self.is_cancelled()
    }

    /// Queue several chunks in order; false when the caller is gone.
    pub fn chunks(&self, b: Vec<Bytes>) -> bool {
        self.tx.send(ReplyMsg::Chunks(b)).is_ok() && !self.is_cancelled()
    }

    pub fn end(&self) {
        let _ = self.tx.send(ReplyMsg::End);
    }

    pub fn error(&self, status: u16, message: String) {
        let _ = self.tx.send(ReplyMsg::Error(status, message));
    }

    pub fn is_cancelled(&self) -> bool {
        *self.cancelled.borrow()
    }

    /// Resolves when the caller cancels or goes away; never otherwise.
    pub async fn cancelled(&self) {
        let mut rx = self.cancelled.clone();
        let _ = rx.wait_for(|c| *c).await;
    }
}

/// Start serving one forwarded request whose `Forward` frame has been read:
/// spawns the writer that relays the handler's replies onto `send`.
pub fn accept(from: String, request: Bytes, send: quinn::SendStream) -> Inbound {
    let (tx, rx) = mpsc::unbounded_channel();
    let (ctx, crx) = watch::channel(false);
    tokio::spawn(relay(send, rx, ctx));
    Inbound {
        from,
        request,
        reply: Reply { tx, cancelled: crx },
    }
}

fn encode(m: &ReplyMsg, buf: &mut BytesMut) -> bool {
    match m {
        ReplyMsg::Chunks(chunks) => {
            for b in chunks {
                if encode_chunk(b, buf) {
                    return true;
                }
            }
            false
        }
        ReplyMsg::Chunk(b) => encode_chunk(b, buf),
        ReplyMsg::End => {
            frame::encode_into(Kind::End, &[], buf);
            true
        }
        ReplyMsg::Error(status, message) => {
            let body = serde_json::to_vec(&ErrorBody {
                status: *status,
                message: message.clone(),
            })
            .unwrap_or_default();
            frame::encode_into(Kind::Error, &body, buf);
            true
        }
    }
}

/// One chunk's frame; true when it ends the stream (a chunk too large).
fn encode_chunk(b: &Bytes, buf: &mut BytesMut) -> bool {
    match b {
        b if b.len() > frame::MAX_PAYLOAD => {
            // the caller would refuse it: say why instead (413, not a lost peer)
            let body = serde_json::to_vec(&ErrorBody {
                status: 413,
                message: format!(
                    "a reply chunk of {} bytes is too large to cross between nodes (limit {} bytes)",
                    b.len(),
                    frame::MAX_PAYLOAD
                ),
            })
            .unwrap_or_default();
            frame::encode_into(Kind::Error, &body, buf);
            true
        }
        b => {
            frame::encode_into(Kind::Chunk, b, buf);
            false
        }
    }
}

/// Chunks written per batch at most: enough to amortise the write call, small
/// enough to keep latency flat.
const MAX_BATCH_BYTES: usize = 256 * 1024;

async fn relay(
    mut send: quinn::SendStream,
    mut rx: mpsc::UnboundedReceiver<ReplyMsg>,
    cancelled: watch::Sender<bool>,
) {
    let mut stopped = std::pin::pin!(send.stopped());
    let mut buf = BytesMut::with_capacity(16 * 1024);
    loop {
        tokio::select! {
            biased;
            _ = &mut stopped => {
                let _ = cancelled.send(true);
                return;
            }
            m = rx.recv() => {
                buf.clear();
                let mut terminal = match m {
                    Some(m) => encode(&m, &mut buf),
                    None => encode(&ReplyMsg::Error(500, "the handler ended without an answer".into()), &mut buf),
                };
                while !terminal && buf.len() < MAX_BATCH_BYTES {
                    match rx.try_recv() {
                        Ok(m) => terminal = encode(&m, &mut buf),
                        Err(_) => break,
                    }
                }
                if send.write_all(&buf).await.is_err() {
                    let _ = cancelled.send(true);
                    return;
                }
                if terminal {
                    let _ = send.finish();
                    // keep the stream until the peer has it, or stops it
                    let _ = stopped.await;
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::{Decoder, Frame};

    fn decode(buf: &BytesMut) -> Frame {
        let mut dec = Decoder::default();
        dec.push(buf);
        dec.next_frame().unwrap().unwrap()
    }

    #[test]
    fn a_chunk_the_caller_would_refuse_becomes_a_413_error() {
        let mut buf = BytesMut::new();
        let big = Bytes::from(vec![b'x'; frame::MAX_PAYLOAD + 1]);
        assert!(
            encode(&ReplyMsg::Chunk(big), &mut buf),
            "it ends the stream"
        );
        let f = decode(&buf);
        assert_eq!(f.kind, Kind::Error);
        let body: serde_json::Value = serde_json::from_slice(&f.payload).unwrap();
        assert_eq!(body["status"], 413);
        assert!(body["message"].as_str().unwrap().contains("too large"));
    }

    #[test]
    fn chunks_sent_together_become_one_frame_each_in_order() {
        let mut buf = BytesMut::new();
        let batch = vec![
            Bytes::from_static(b"{\"a\":1}"),
            Bytes::from_static(b"{\"b\":2}"),
        ];
        assert!(!encode(&ReplyMsg::Chunks(batch), &mut buf));
        let mut dec = Decoder::default();
        dec.push(&buf);
        let first = dec.next_frame().unwrap().unwrap();
        let second = dec.next_frame().unwrap().unwrap();
        assert_eq!(
            (first.kind, &first.payload[..]),
            (Kind::Chunk, &b"{\"a\":1}"[..])
        );
        assert_eq!(
            (second.kind, &second.payload[..]),
            (Kind::Chunk, &b"{\"b\":2}"[..])
        );
        assert!(dec.next_frame().unwrap().is_none());
    }

    #[test]
    fn a_chunk_at_the_limit_is_sent_as_it_is() {
        let mut buf = BytesMut::new();
        let edge = Bytes::from(vec![b'x'; frame::MAX_PAYLOAD]);
        assert!(!encode(&ReplyMsg::Chunk(edge), &mut buf));
        let f = decode(&buf);
        assert_eq!((f.kind, f.payload.len()), (Kind::Chunk, frame::MAX_PAYLOAD));
    }
}
