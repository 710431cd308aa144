//! goim v2 client frames: a 16-byte big-endian header, then the body.
//!
//! | field     | type | note                           |
//! |-----------|------|--------------------------------|
//! | packLen   | u32  | header + body                  |
//! | headerLen | u16  | always 16                      |
//! | ver       | u16  | goim clients send 1            |
//! | op        | u32  | see [`op`]                     |
//! | seq       | u32  | chosen by the client; replies echo it |
//!
//! This module does no I/O: [`decode`] takes frames off a buffer that a transport
//! filled, [`Frame::encode`] appends a frame to a buffer a writer will flush.
//!
//! # The resume extension
//!
//! On a connection that negotiated resume (see [`crate::resume`]), every pushed
//! frame the server sends has headerLen 32: the 16-byte goim header, then a 16-byte
//! extension saying where the push came from. goim's clients take the body at
//! headerLen, so they would skip it; clients that did not negotiate resume never
//! see it.
//!
//! | field    | type | note                                          |
//! |----------|------|-----------------------------------------------|
//! | source   | u8   | 1 key, 2 user, 3 room, 4 broadcast ([`Source`]) |
//! | reserved | 3 B  | zero                                          |
//! | epoch    | u32  | the source stream's epoch; 0 = not in history |
//! | offset   | u64  | the push's offset in that stream; 0 = not in history |
//!
//! ChangeRoomReply on such a connection carries the same extension with the new
//! room's epoch and top offset. Frames a client sends always have headerLen 16.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Length of every frame header.
pub const HEADER_LEN: usize = 16;
/// Protocol version this server writes.
pub const VERSION: u16 = 1;
/// goim v2's body limit and this server's default.
pub const DEFAULT_MAX_BODY: usize = 4096;
/// The largest body limit a configuration may choose.
pub const MAX_BODY_LIMIT: usize = 1 << 20;

/// Operation codes of goim v2. Ops from 1000 up are chosen by backends.
pub mod op {
    pub const HANDSHAKE: u32 = 0;
    pub const HANDSHAKE_REPLY: u32 = 1;
    pub const HEARTBEAT: u32 = 2;
    pub const HEARTBEAT_REPLY: u32 = 3;
    pub const SEND_MSG: u32 = 4;
    pub const SEND_MSG_REPLY: u32 = 5;
    pub const DISCONNECT_REPLY: u32 = 6;
    pub const AUTH: u32 = 7;
    pub const AUTH_REPLY: u32 = 8;
    pub const RAW: u32 = 9;
    pub const PROTO_READY: u32 = 10;
    pub const PROTO_FINISH: u32 = 11;
    pub const CHANGE_ROOM: u32 = 12;
    pub const CHANGE_ROOM_REPLY: u32 = 13;
    pub const SUB: u32 = 14;
    pub const SUB_REPLY: u32 = 15;
    pub const UNSUB: u32 = 16;
    pub const UNSUB_REPLY: u32 = 17;
    /// The first op a backend may choose for its own messages (a convention, not a rule).
    pub const BUSINESS_MIN: u32 = 1000;

    /// Whether a server-sent op is the server's reply to the client (AuthReply,
    /// HeartbeatReply, ...), as opposed to a push a backend sent.
    pub const fn is_reply(op: u32) -> bool {
        matches!(
            op,
            HANDSHAKE_REPLY
                | HEARTBEAT_REPLY
                | SEND_MSG_REPLY
                | DISCONNECT_REPLY
                | AUTH_REPLY
                | CHANGE_ROOM_REPLY
                | SUB_REPLY
                | UNSUB_REPLY
        )
    }
}

/// A decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub ver: u16,
    pub op: u32,
    pub seq: u32,
    pub body: Bytes,
}

/// Why a byte stream is not a valid frame sequence.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The header's headerLen field is not 16.
    #[error("header length {0} is not {HEADER_LEN}")]
    HeaderLen(u16),
    /// packLen is smaller than the header itself.
    #[error("packet length {0} is shorter than the {HEADER_LEN}-byte header")]
    PackLenTooShort(u32),
    /// The body is larger than the configured limit.
    #[error("body of {body} bytes exceeds the limit of {max} bytes")]
    BodyTooLarge { body: usize, max: usize },
    /// A server-sent resume extension names no known source.
    #[error("resume extension names an unknown source")]
    BadExtension,
    /// A Raw frame's body does not split into whole frames.
    #[error("raw frame body holds a truncated frame")]
    TruncatedRaw,
}

impl Frame {
    /// A frame with this server's version.
    pub fn new(op: u32, seq: u32, body: impl Into<Bytes>) -> Self {
        Frame {
            ver: VERSION,
            op,
            seq,
            body: body.into(),
        }
    }

    /// The frame's full encoded length.
    pub fn encoded_len(&self) -> usize {
        HEADER_LEN + self.body.len()
    }

    /// Appends the encoded frame to `dst`.
    pub fn encode(&self, dst: &mut BytesMut) {
        dst.reserve(self.encoded_len());
        put_header(dst, self.body.len(), self.ver, self.op, self.seq);
        dst.put_slice(&self.body);
    }

    /// The encoded frame as shared bytes: encode once, send to many.
    pub fn to_bytes(&self) -> Bytes {
        let mut b = BytesMut::with_capacity(self.encoded_len());
        self.encode(&mut b);
        b.freeze()
    }
}

/// Writes a header for a body of `body_len` bytes.
pub fn put_header(dst: &mut BytesMut, body_len: usize, ver: u16, op: u32, seq: u32) {
    dst.put_u32((HEADER_LEN + body_len) as u32);
    dst.put_u16(HEADER_LEN as u16);
    dst.put_u16(ver);
    dst.put_u32(op);
    dst.put_u32(seq);
}

/// Length of the resume extension that follows the header on negotiated connections.
pub const EXT_LEN: usize = 16;
/// headerLen of a server-sent frame that carries the resume extension.
pub const EXT_HEADER_LEN: usize = HEADER_LEN + EXT_LEN;

/// Where a push came from: the stream a resuming client keeps a position in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Source {
    /// Pushed to the connection's key (PushMsg, MPushMsg, MPushMsgs).
    Key = 1,
    /// Pushed to the connection's user id (PushUser).
    User = 2,
    /// Pushed to the connection's room (BroadcastRoom).
    Room = 3,
    /// Pushed to every connection (Broadcast).
    All = 4,
}

impl Source {
    /// Every source, in wire order.
    pub const ALL: [Source; 4] = [Source::Key, Source::User, Source::Room, Source::All];

    /// The source for a wire value.
    pub fn from_u8(v: u8) -> Option<Source> {
        match v {
            1 => Some(Source::Key),
            2 => Some(Source::User),
            3 => Some(Source::Room),
            4 => Some(Source::All),
            _ => None,
        }
    }

    /// Index 0..4, for per-source arrays.
    pub fn index(self) -> usize {
        self as usize - 1
    }

    /// The name used in the resume JSON (`key`, `user`, `room`, `all`).
    pub fn name(self) -> &'static str {
        match self {
            Source::Key => "key",
            Source::User => "user",
            Source::Room => "room",
            Source::All => "all",
        }
    }
}

/// What the resume extension of one pushed frame says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PushMeta {
    pub source: Source,
    /// The stream's epoch; 0 when the push is not kept in history.
    pub epoch: u32,
    /// The push's offset in its stream; 0 when it is not kept in history.
    pub offset: u64,
}

impl PushMeta {
    /// A push from `source` that no history keeps.
    pub fn untracked(source: Source) -> Self {
        PushMeta {
            source,
            epoch: 0,
            offset: 0,
        }
    }

    /// Whether the push is in a history stream (a resuming client can get it again).
    pub fn is_tracked(&self) -> bool {
        self.offset != 0
    }
}

/// Copies a frame encoded with a 16-byte header into `dst` with headerLen 32 and the
/// resume extension, replacing its seq.
pub fn put_with_ext(dst: &mut BytesMut, encoded: &[u8], seq: u32, meta: PushMeta) {
    if encoded.len() < HEADER_LEN {
        dst.put_slice(encoded);
        return;
    }
    let body = &encoded[HEADER_LEN..];
    dst.reserve(EXT_HEADER_LEN + body.len());
    dst.put_u32((EXT_HEADER_LEN + body.len()) as u32);
    dst.put_u16(EXT_HEADER_LEN as u16);
    dst.put_slice(&encoded[6..SEQ_OFFSET]);
    dst.put_u32(seq);
    dst.put_u8(meta.source as u8);
    dst.put_slice(&[0, 0, 0]);
    dst.put_u32(meta.epoch);
    dst.put_u64(meta.offset);
    dst.put_slice(body);
}

/// Takes one server-sent frame off the front of `src`: headerLen 16, or 32 with the
/// resume extension, whose fields are returned beside the frame. For clients.
pub fn decode_server(
    src: &mut BytesMut,
    max_body: usize,
) -> Result<Option<(Frame, Option<PushMeta>)>, FrameError> {
    if src.len() < HEADER_LEN {
        return Ok(None);
    }
    let header_len = u16::from_be_bytes([src[4], src[5]]) as usize;
    if header_len == HEADER_LEN {
        return Ok(decode(src, max_body)?.map(|f| (f, None)));
    }
    if header_len != EXT_HEADER_LEN {
        return Err(FrameError::HeaderLen(header_len as u16));
    }
    let mut h = &src[..HEADER_LEN];
    let pack_len = h.get_u32() as usize;
    let _ = h.get_u16();
    let ver = h.get_u16();
    let op = h.get_u32();
    let seq = h.get_u32();
    if pack_len < EXT_HEADER_LEN {
        return Err(FrameError::PackLenTooShort(pack_len as u32));
    }
    let body_len = pack_len - EXT_HEADER_LEN;
    if body_len > max_body {
        return Err(FrameError::BodyTooLarge {
            body: body_len,
            max: max_body,
        });
    }
    if src.len() < pack_len {
        src.reserve(pack_len - src.len());
        return Ok(None);
    }
    src.advance(HEADER_LEN);
    let mut ext = src.split_to(EXT_LEN);
    let source = Source::from_u8(ext.get_u8()).ok_or(FrameError::BadExtension)?;
    ext.advance(3);
    let epoch = ext.get_u32();
    let offset = ext.get_u64();
    let body = src.split_to(body_len).freeze();
    let meta = PushMeta {
        source,
        epoch,
        offset,
    };
    Ok(Some((Frame { ver, op, seq, body }, Some(meta))))
}

/// Byte offset of the seq field inside an encoded header.
pub const SEQ_OFFSET: usize = 12;

/// Copies an encoded frame into `dst`, replacing its seq. Used by writers to stamp
/// a per-connection push sequence on a frame that was encoded once for many clients.
pub fn put_with_seq(dst: &mut BytesMut, encoded: &[u8], seq: u32) {
    if encoded.len() < HEADER_LEN {
        dst.put_slice(encoded);
        return;
    }
    dst.put_slice(&encoded[..SEQ_OFFSET]);
    dst.put_u32(seq);
    dst.put_slice(&encoded[HEADER_LEN..]);
}

/// Takes one frame off the front of `src`.
///
/// Returns `Ok(None)` when `src` does not yet hold a whole frame. The header is
/// checked as soon as it is complete, so an oversize frame is refused before its
/// body is buffered.
pub fn decode(src: &mut BytesMut, max_body: usize) -> Result<Option<Frame>, FrameError> {
    let Some((pack_len, ver, op, seq)) = peek_header(src, max_body)? else {
        return Ok(None);
    };
    if src.len() < pack_len {
        src.reserve(pack_len - src.len());
        return Ok(None);
    }
    src.advance(HEADER_LEN);
    let body = src.split_to(pack_len - HEADER_LEN).freeze();
    Ok(Some(Frame { ver, op, seq, body }))
}

/// Validates the header at the front of `src`, if complete.
fn peek_header(src: &[u8], max_body: usize) -> Result<Option<(usize, u16, u32, u32)>, FrameError> {
    if src.len() < HEADER_LEN {
        return Ok(None);
    }
    let mut h = &src[..HEADER_LEN];
    let pack_len = h.get_u32();
    let header_len = h.get_u16();
    let ver = h.get_u16();
    let op = h.get_u32();
    let seq = h.get_u32();
    if header_len as usize != HEADER_LEN {
        return Err(FrameError::HeaderLen(header_len));
    }
    if (pack_len as usize) < HEADER_LEN {
        return Err(FrameError::PackLenTooShort(pack_len));
    }
    let body = pack_len as usize - HEADER_LEN;
    if body > max_body {
        return Err(FrameError::BodyTooLarge {
            body,
            max: max_body,
        });
    }
    Ok(Some((pack_len as usize, ver, op, seq)))
}

/// Splits a Raw (op 9) body into its frames.
pub fn split_raw(body: &Bytes, max_body: usize) -> Result<Vec<Frame>, FrameError> {
    let mut buf = BytesMut::from(&body[..]);
    let mut frames = Vec::new();
    while !buf.is_empty() {
        match decode(&mut buf, max_body)? {
            Some(f) => frames.push(f),
            None => return Err(FrameError::TruncatedRaw),
        }
    }
    Ok(frames)
}

/// Builds a Raw (op 9) frame's body from whole frames.
pub fn join_raw<'a>(frames: impl IntoIterator<Item = &'a Frame>) -> Bytes {
    let mut b = BytesMut::new();
    for f in frames {
        f.encode(&mut b);
    }
    b.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc(f: &Frame) -> BytesMut {
        let mut b = BytesMut::new();
        f.encode(&mut b);
        b
    }

    #[test]
    fn round_trip() {
        let f = Frame::new(op::AUTH, 7, &b"hello"[..]);
        let mut b = enc(&f);
        assert_eq!(b.len(), 21);
        assert_eq!(&b[..4], &21u32.to_be_bytes());
        assert_eq!(&b[4..6], &16u16.to_be_bytes());
        assert_eq!(decode(&mut b, 4096).unwrap(), Some(f));
        assert!(b.is_empty());
    }

    #[test]
    fn goim_header_layout_is_big_endian() {
        let f = Frame::new(op::HEARTBEAT, 0x01020304, Bytes::new());
        let b = enc(&f);
        assert_eq!(
            &b[..],
            &[0, 0, 0, 16, 0, 16, 0, 1, 0, 0, 0, 2, 1, 2, 3, 4][..]
        );
    }

    #[test]
    fn partial_input_waits() {
        let f = Frame::new(1000, 1, vec![7u8; 100]);
        let full = enc(&f);
        for cut in 0..full.len() {
            let mut b = BytesMut::from(&full[..cut]);
            assert_eq!(decode(&mut b, 4096).unwrap(), None, "cut at {cut}");
            assert_eq!(b.len(), cut, "nothing consumed on a partial frame");
        }
    }

    #[test]
    fn two_frames_back_to_back() {
        let a = Frame::new(op::HEARTBEAT, 1, Bytes::new());
        let c = Frame::new(op::SEND_MSG, 2, &b"x"[..]);
        let mut b = enc(&a);
        c.encode(&mut b);
        assert_eq!(decode(&mut b, 10).unwrap(), Some(a));
        assert_eq!(decode(&mut b, 10).unwrap(), Some(c));
        assert_eq!(decode(&mut b, 10).unwrap(), None);
    }

    #[test]
    fn rejects_bad_header_len() {
        let mut b = enc(&Frame::new(op::AUTH, 1, Bytes::new()));
        b[5] = 17;
        assert_eq!(decode(&mut b, 4096), Err(FrameError::HeaderLen(17)));
    }

    #[test]
    fn rejects_short_pack_len() {
        let mut b = enc(&Frame::new(op::AUTH, 1, Bytes::new()));
        b[3] = 15;
        assert_eq!(decode(&mut b, 4096), Err(FrameError::PackLenTooShort(15)));
    }

    #[test]
    fn rejects_oversize_body_from_header_alone() {
        let f = Frame::new(op::SEND_MSG, 1, vec![0u8; 4097]);
        let b = enc(&f);
        let mut header_only = BytesMut::from(&b[..HEADER_LEN]);
        assert_eq!(
            decode(&mut header_only, 4096),
            Err(FrameError::BodyTooLarge {
                body: 4097,
                max: 4096
            })
        );
        let mut huge = BytesMut::from(&[0xff, 0xff, 0xff, 0xff, 0, 16, 0, 1][..]);
        huge.extend_from_slice(&[0; 8]);
        assert!(matches!(
            decode(&mut huge, 4096),
            Err(FrameError::BodyTooLarge { .. })
        ));
    }

    #[test]
    fn body_at_limit_is_accepted() {
        let f = Frame::new(op::SEND_MSG, 1, vec![1u8; 4096]);
        let mut b = enc(&f);
        assert_eq!(decode(&mut b, 4096).unwrap(), Some(f));
    }

    #[test]
    fn stamps_seq() {
        let f = Frame::new(1000, 0, &b"abc"[..]);
        let mut out = BytesMut::new();
        put_with_seq(&mut out, &f.to_bytes(), 42);
        let got = decode(&mut out, 4096).unwrap().unwrap();
        assert_eq!(got.seq, 42);
        assert_eq!(got.op, 1000);
        assert_eq!(&got.body[..], b"abc");
    }

    #[test]
    fn extension_round_trips_and_keeps_the_body_at_header_len() {
        let f = Frame::new(1000, 0, &b"hello"[..]);
        let meta = PushMeta {
            source: Source::Room,
            epoch: 0xdead_beef,
            offset: 1 << 40,
        };
        let mut out = BytesMut::new();
        put_with_ext(&mut out, &f.to_bytes(), 9, meta);
        assert_eq!(out.len(), EXT_HEADER_LEN + 5);
        // a goim client reads the body from headerLen
        let header_len = u16::from_be_bytes([out[4], out[5]]) as usize;
        assert_eq!(&out[header_len..], b"hello");
        let mut plain = BytesMut::new();
        put_with_seq(&mut plain, &f.to_bytes(), 10);
        out.extend_from_slice(&plain);
        let (got, m) = decode_server(&mut out, 4096).unwrap().unwrap();
        assert_eq!(
            (got.op, got.seq, &got.body[..], m),
            (1000, 9, &b"hello"[..], Some(meta))
        );
        let (got, m) = decode_server(&mut out, 4096).unwrap().unwrap();
        assert_eq!((got.seq, m), (10, None));
        assert!(out.is_empty());
    }

    #[test]
    fn extension_waits_for_a_whole_frame_and_rejects_bad_sources() {
        let f = Frame::new(1000, 0, &b"abc"[..]);
        let meta = PushMeta::untracked(Source::Key);
        let mut full = BytesMut::new();
        put_with_ext(&mut full, &f.to_bytes(), 1, meta);
        for cut in 0..full.len() {
            let mut b = BytesMut::from(&full[..cut]);
            assert_eq!(decode_server(&mut b, 4096).unwrap(), None, "cut at {cut}");
        }
        full[16] = 9;
        assert_eq!(
            decode_server(&mut full, 4096),
            Err(FrameError::BadExtension)
        );
        // client-sent frames never carry the extension
        let mut b = BytesMut::new();
        put_with_ext(&mut b, &f.to_bytes(), 1, meta);
        assert_eq!(decode(&mut b, 4096), Err(FrameError::HeaderLen(32)));
    }

    #[test]
    fn raw_splits_into_frames() {
        let frames = vec![
            Frame::new(1000, 1, &b"a"[..]),
            Frame::new(1001, 2, &b"bb"[..]),
        ];
        let body = join_raw(&frames);
        assert_eq!(split_raw(&body, 4096).unwrap(), frames);
        let cut = body.slice(..body.len() - 1);
        assert_eq!(split_raw(&cut, 4096), Err(FrameError::TruncatedRaw));
    }
}
