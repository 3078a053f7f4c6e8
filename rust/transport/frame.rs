//! The wire format of every message between nodes.
//!
//! A frame is `[version: u8][kind: u8][len: u32 big-endian][payload: len bytes]`.
//! The version lets a later release change the format and refuse to talk
//! rather than misread; the kind says how to read the payload; the length is
//! bounded by [`MAX_PAYLOAD`] so a hostile peer cannot make us allocate more.
//! [`Decoder`] takes bytes as they arrive and never panics on any input (it is
//! fuzzed: `fuzz/fuzz_targets/decode.rs`).

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// The only format this build speaks.
pub const VERSION: u8 = 1;
/// Header bytes before the payload.
pub const HEADER_LEN: usize = 6;
/// The most the decoder allocates ahead of bytes that have arrived.
const RESERVE_AHEAD: usize = 1 << 20;
/// 16 MiB: far above any request, chunk or Raft batch we send, far below
/// what would hurt a node if a peer lied about the length.
pub const MAX_PAYLOAD: usize = 16 << 20;

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// Joiner → member, on a connection without a client certificate.
    JoinRequest = 1,
    JoinResponse = 2,
    /// First frame on every mTLS connection, both ways: who am I.
    Hello = 3,
    RaftVote = 4,
    RaftAppend = 5,
    RaftSnapshot = 6,
    RaftResponse = 7,
    /// A node's load and models, pushed to every peer about once a second.
    Advert = 8,
    /// Ask the leader to add a node to the Raft membership.
    AddMember = 9,
    AddMemberResponse = 10,
    /// A forwarded request; the stream then carries Chunk… then End or Error.
    Forward = 11,
    Chunk = 12,
    End = 13,
    Error = 14,
    /// Ask a peer for a blob from an offset, or a manifest (`crate::blobs`).
    FetchBlob = 15,
    /// `{"size": total}`, then BlobData… then End or Error.
    BlobInfo = 16,
    /// Raw bytes of a blob or manifest.
    BlobData = 17,
    /// Ask the leader to commit a `consensus::Command` (a tombstone or a
    /// catalogue change), as JSON.
    Propose = 18,
    /// `Ok(answer)`/`Err` of a Propose, as JSON.
    ProposeResponse = 19,
    /// Ask the leader to remove a node that is down from the membership
    /// (its name as a JSON string).
    RemoveMember = 20,
    /// `Ok`/`Err` of a RemoveMember, as JSON.
    RemoveMemberResponse = 21,
    /// A voter asks a voter for the cluster CA key (empty payload).
    CaKey = 22,
    /// `Ok(key pem)`/`Err` of a CaKey, as JSON.
    CaKeyResponse = 23,
    /// Open an RPC tunnel (`crate::tunnel`): the opener sends `{}`, the
    /// server answers RpcTunnel `{}` (bridged) or Error; then the stream
    /// carries raw ggml RPC bytes both ways.
    RpcTunnel = 24,
}

impl Kind {
    /// The kind for a byte, or None for one this version does not know.
    pub fn from_u8(b: u8) -> Option<Kind> {
        use Kind::*;
        Some(match b {
            1 => JoinRequest,
            2 => JoinResponse,
            3 => Hello,
            4 => RaftVote,
            5 => RaftAppend,
            6 => RaftSnapshot,
            7 => RaftResponse,
            8 => Advert,
            9 => AddMember,
            10 => AddMemberResponse,
            11 => Forward,
            12 => Chunk,
            13 => End,
            14 => Error,
            15 => FetchBlob,
            16 => BlobInfo,
            17 => BlobData,
            18 => Propose,
            19 => ProposeResponse,
            20 => RemoveMember,
            21 => RemoveMemberResponse,
            22 => CaKey,
            23 => CaKeyResponse,
            24 => RpcTunnel,
            _ => return None,
        })
    }
}

/// One decoded message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub kind: Kind,
    pub payload: Bytes,
}

impl Frame {
    pub fn new(kind: Kind, payload: impl Into<Bytes>) -> Self {
        Self {
            kind,
            payload: payload.into(),
        }
    }

    /// Append this frame's bytes to `out`.
    pub fn encode_into(&self, out: &mut BytesMut) {
        encode_into(self.kind, &self.payload, out)
    }

    pub fn encode(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(HEADER_LEN + self.payload.len());
        self.encode_into(&mut out);
        out.freeze()
    }
}

/// Append a frame built from parts to `out`, without copying into a [`Frame`] first.
pub fn encode_into(kind: Kind, payload: &[u8], out: &mut BytesMut) {
    debug_assert!(payload.len() <= MAX_PAYLOAD);
    out.reserve(HEADER_LEN + payload.len());
    out.put_u8(VERSION);
    out.put_u8(kind as u8);
    out.put_u32(payload.len() as u32);
    out.put_slice(payload);
}

/// Why bytes from a peer are not a frame. Each one ends the stream.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("unsupported frame version {0} (this build speaks {VERSION})")]
    Version(u8),
    #[error("unknown frame kind {0}")]
    Kind(u8),
    #[error("frame payload of {0} bytes exceeds the {MAX_PAYLOAD} byte limit")]
    TooLarge(usize),
}

/// Incremental decoder: feed bytes with [`Decoder::push`], take frames with
/// [`Decoder::next_frame`].
#[derive(Debug, Default)]
pub struct Decoder {
    buf: BytesMut,
    failed: Option<FrameError>,
}

impl Decoder {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn push(&mut self, bytes: &[u8]) {
        if self.failed.is_none() {
            self.buf.extend_from_slice(bytes);
        }
    }

    /// Bytes received but not yet returned as frames.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Take the bytes received past the frames returned (a stream that
    /// carries raw bytes after a header frame).
    pub fn take_buffered(&mut self) -> BytesMut {
        std::mem::take(&mut self.buf)
    }

    /// The next complete frame, None when more bytes are needed, or the error
    /// that poisoned the stream (returned again on every later call).
    pub fn next_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        if self.buf.len() < HEADER_LEN {
            return Ok(None);
        }
        let version = self.buf[0];
        let kind_byte = self.buf[1];
        let len = u32::from_be_bytes([self.buf[2], self.buf[3], self.buf[4], self.buf[5]]) as usize;
        let err = if version != VERSION {
            Some(FrameError::Version(version))
        } else if len > MAX_PAYLOAD {
            Some(FrameError::TooLarge(len))
        } else {
            None
        };
        let kind = match (err, Kind::from_u8(kind_byte)) {
            (Some(e), _) => return Err(self.fail(e)),
            (None, None) => return Err(self.fail(FrameError::Kind(kind_byte))),
            (None, Some(k)) => k,
        };
        if self.buf.len() < HEADER_LEN + len {
            // room for the rest of the frame at once, so a large payload is
            // not copied again each time the buffer grows; capped, so a
            // header alone never makes us allocate much
            self.buf
                .reserve((HEADER_LEN + len - self.buf.len()).min(RESERVE_AHEAD));
            return Ok(None);
        }
        self.buf.advance(HEADER_LEN);
        let payload = self.buf.split_to(len).freeze();
        Ok(Some(Frame { kind, payload }))
    }

    fn fail(&mut self, e: FrameError) -> FrameError {
        self.buf.clear();
        self.failed = Some(e.clone());
        e
    }
}

/// Decode every complete frame in `bytes`; the fuzz target's entry point.
pub fn decode_all(bytes: &[u8]) -> (Vec<Frame>, Option<FrameError>) {
    let mut d = Decoder::new();
    d.push(bytes);
    let mut out = Vec::new();
    loop {
        match d.next_frame() {
            Ok(Some(f)) => out.push(f),
            Ok(None) => return (out, None),
            Err(e) => return (out, Some(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_split_anywhere() {
        let frames = vec![
            Frame::new(Kind::Forward, &b"{\"model\":\"m\"}"[..]),
            Frame::new(Kind::Chunk, Bytes::new()),
            Frame::new(Kind::End, &b"x"[..]),
        ];
        let mut wire = BytesMut::new();
        for f in &frames {
            f.encode_into(&mut wire);
        }
        for cut in 0..wire.len() {
            let mut d = Decoder::new();
            d.push(&wire[..cut]);
            let mut got = Vec::new();
            while let Some(f) = d.next_frame().unwrap() {
                got.push(f);
            }
            d.push(&wire[cut..]);
            while let Some(f) = d.next_frame().unwrap() {
                got.push(f);
            }
            assert_eq!(got, frames, "cut at {cut}");
            assert_eq!(d.buffered(), 0);
        }
    }

    #[test]
    fn hostile_headers_are_errors_not_panics() {
        assert_eq!(
            decode_all(&[2, 12, 0, 0, 0, 0]).1,
            Some(FrameError::Version(2))
        );
        assert_eq!(
            decode_all(&[1, 99, 0, 0, 0, 0]).1,
            Some(FrameError::Kind(99))
        );
        assert_eq!(
            decode_all(&[1, 12, 0xff, 0xff, 0xff, 0xff]).1,
            Some(FrameError::TooLarge(u32::MAX as usize))
        );
        // a truncated frame just waits for more bytes
        assert_eq!(decode_all(&[1, 12, 0, 0, 0, 9, 1, 2]), (vec![], None));
    }

    #[test]
    fn an_error_poisons_the_stream() {
        let mut d = Decoder::new();
        d.push(&[7, 1, 0, 0, 0, 0]);
        assert!(d.next_frame().is_err());
        d.push(&Frame::new(Kind::End, Bytes::new()).encode());
        assert_eq!(d.next_frame(), Err(FrameError::Version(7)));
    }
}
