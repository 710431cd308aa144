//! Message bodies: what each pushed body carries (kind, backend, sequence number,
//! target), built and parsed.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::BACKENDS;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Kind {
    /// PushMsg: one key.
    Key = 1,
    /// MPushMsg: one body to many keys.
    Keys = 2,
    /// One message of an MPushMsgs call, to one key.
    Item = 3,
    /// PushUser.
    User = 4,
    /// BroadcastRoom.
    Room = 5,
    /// Broadcast.
    Broadcast = 6,
    /// The broadcast that ends the run.
    End = 7,
}

impl Kind {
    fn from_u8(v: u8) -> Option<Kind> {
        Some(match v {
            1 => Kind::Key,
            2 => Kind::Keys,
            3 => Kind::Item,
            4 => Kind::User,
            5 => Kind::Room,
            6 => Kind::Broadcast,
            7 => Kind::End,
            _ => return None,
        })
    }
}

/// `target` of messages sent to several keys or user ids, or to everyone.
pub(crate) const NO_TARGET: u32 = u32::MAX;
pub(crate) const BODY_HEAD: usize = 10;

/// Padding, so that bodies of different sizes pass through the queues.
fn pad_len(backend: u8, seq: u32) -> usize {
    (seq as usize)
        .wrapping_mul(37)
        .wrapping_add(backend as usize * 11)
        % 240
}

/// `kind u8 | backend u8 | seq u32 | target u32 | padding`.
pub(crate) fn body(kind: Kind, backend: u8, seq: u32, target: u32) -> Bytes {
    let pad = pad_len(backend, seq);
    let mut b = BytesMut::with_capacity(BODY_HEAD + pad);
    b.put_u8(kind as u8);
    b.put_u8(backend);
    b.put_u32(seq);
    b.put_u32(target);
    b.put_bytes(b'.', pad);
    b.freeze()
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Msg {
    pub(crate) kind: Kind,
    pub(crate) backend: u8,
    pub(crate) seq: u32,
    pub(crate) target: u32,
}

pub(crate) fn parse(mut b: &[u8]) -> Option<Msg> {
    if b.len() < BODY_HEAD {
        return None;
    }
    let full = b;
    let kind = Kind::from_u8(b.get_u8())?;
    let backend = b.get_u8();
    let seq = b.get_u32();
    let target = b.get_u32();
    if backend as usize >= BACKENDS && kind != Kind::End {
        return None;
    }
    let pad = pad_len(backend, seq);
    if full.len() != BODY_HEAD + pad || b.iter().any(|&c| c != b'.') {
        return None;
    }
    Some(Msg {
        kind,
        backend,
        seq,
        target,
    })
}

/// A message's identity: its backend and that backend's sequence number.
pub(crate) fn msg_id(backend: u8, seq: u32) -> u64 {
    (u64::from(seq) << 8) | u64::from(backend)
}
