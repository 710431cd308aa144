//! Requests, replies and errors of the backend RPC: every type that crosses the
//! wire, and the protocol version they make up.
//!
//! # Changing a wire type means bumping [`ALPN`]
//!
//! The payload of a call is the bincode encoding of these types ([`crate::codec`]),
//! and bincode is positional: an enum variant is its index, a struct is its fields
//! in declaration order, with no names and no tags. Adding, removing or reordering a
//! variant or a field, or changing a field's type, silently changes what every
//! deployed backend sends or expects. Any such change must therefore bump [`ALPN`]
//! (`quicpush-rpc/N` to `N+1`), so that old and new peers refuse each other at the
//! handshake instead of misreading each other. The golden tests at the end of this
//! file pin the bytes of every `Request`, `Reply` and `RpcError` variant for the
//! current version: a wire change fails them, and they only pass again once the
//! golden table is regenerated under a new version with the ALPN bumped to match.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// ALPN of backend RPC connections, the version of the wire format in this module.
pub const ALPN: &[u8] = b"quicpush-rpc/4";

/// The result of pushing one message to one channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum PushOutcome {
    /// Queued for the client's writer.
    Delivered,
    /// No channel with that key (or it is closing).
    Offline,
    /// The client's queue is full; this message was not queued.
    QueueFull,
    /// The client's accepts list does not hold the op.
    Filtered,
    /// Not queued to a live connection, but kept in history: a client that resumes
    /// gets it (the key is offline with live history, or its resume-capable
    /// connection is closing or was closed to catch up).
    Stored,
    /// Not on this node: handed over Redis to the node that owns the key, and
    /// PUBLISH reported a subscriber. Not a delivery: that node pushes it as it
    /// would a local call, and its outcome is not reported back.
    Forwarded,
    /// Not on this node, and Redis did not answer: not delivered here, and not
    /// known to be forwarded. Redis unreachable means it was not; a command that
    /// timed out after Redis ran it may still have been (a retry can then arrive
    /// twice).
    Unavailable,
}

/// How many channels a push reached, by outcome.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tally {
    pub delivered: u64,
    pub queue_full: u64,
    pub filtered: u64,
    /// Connections that did not take it live but get it when they resume.
    pub stored: u64,
    /// History streams the push was appended to (one per user id, one for a room).
    pub appended: u64,
    /// Other nodes of the tier the push was handed to over Redis (a PUBLISH with
    /// a subscriber; not a delivery).
    pub forwarded_nodes: u64,
    /// Remote parts of the push that were not forwarded because Redis could not
    /// be reached (keys, or 1 for a whole user or room lookup).
    pub unavailable: u64,
}

/// Connections online, in total and per transport, and the paced broadcasts
/// running.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Online {
    pub total: u64,
    pub tcp: u64,
    pub quic: u64,
    /// goim frames over TLS over TCP.
    pub tls: u64,
    /// WebSocket, plain.
    pub ws: u64,
    /// WebSocket over TLS.
    pub wss: u64,
    /// Paced broadcasts running on this node, oldest first.
    pub paced: Vec<PacedProgress>,
}

/// How far one running paced broadcast has got.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PacedProgress {
    pub op: u32,
    /// Messages per second, node-wide.
    pub speed: u32,
    /// Channels it was queued to so far.
    pub delivered: u64,
    /// Channels still to visit, estimated from the online count when it was
    /// accepted (clients that come and go meanwhile make it approximate).
    pub remaining: u64,
    /// Milliseconds since it was accepted.
    pub elapsed_ms: u64,
}

/// One message of an `MPushMsgs` call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushItem {
    pub key: String,
    pub op: u32,
    pub body: Bytes,
}

/// A backend's call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Liveness check.
    Ping,
    /// One message to one key.
    PushMsg { key: String, op: u32, body: Bytes },
    /// One message to many keys.
    MPushMsg {
        keys: Vec<String>,
        op: u32,
        body: Bytes,
    },
    /// Many messages, each to its own key.
    MPushMsgs { msgs: Vec<PushItem> },
    /// One message to every connection of these user ids.
    PushUser {
        mids: Vec<i64>,
        op: u32,
        body: Bytes,
    },
    /// One message to every client; `speed` limits messages per second node-wide
    /// (0 = no limit). Replies once the broadcast is accepted.
    Broadcast { op: u32, body: Bytes, speed: u32 },
    /// One message to every member of a room.
    BroadcastRoom { room: String, op: u32, body: Bytes },
    /// Room ids with their online counts.
    Rooms,
    /// Connections online, in total and per transport.
    Online,
    /// Disconnects the client with this key.
    Kick { key: String },
}

impl Request {
    /// The method's name, for logs.
    pub fn method(&self) -> &'static str {
        match self {
            Request::Ping => "Ping",
            Request::PushMsg { .. } => "PushMsg",
            Request::MPushMsg { .. } => "MPushMsg",
            Request::MPushMsgs { .. } => "MPushMsgs",
            Request::PushUser { .. } => "PushUser",
            Request::Broadcast { .. } => "Broadcast",
            Request::BroadcastRoom { .. } => "BroadcastRoom",
            Request::Rooms => "Rooms",
            Request::Online => "Online",
            Request::Kick { .. } => "Kick",
        }
    }
}

/// Per-key outcomes of `MPushMsg` / `MPushMsgs`, in request order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MultiOutcome {
    pub outcomes: Vec<PushOutcome>,
    /// goim's `index`: the position of the last delivered message, or -1 if none was.
    pub index: i64,
}

impl MultiOutcome {
    pub fn count(&self, o: PushOutcome) -> usize {
        self.outcomes.iter().filter(|&&x| x == o).count()
    }
}

/// A room and its online count.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomCount {
    pub room: String,
    pub online: u64,
}

/// A successful call's result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    Pong,
    /// `PushMsg`.
    Pushed(PushOutcome),
    /// `MPushMsg`, `MPushMsgs`.
    Multi(MultiOutcome),
    /// `PushUser`, `BroadcastRoom`: channels reached, by outcome.
    Tally(Tally),
    /// `Broadcast`: accepted; `online` channels were online when it was.
    BroadcastAccepted {
        online: u64,
    },
    Rooms(Vec<RoomCount>),
    Online(Online),
    /// `Kick`: whether a client with that key was online.
    Kicked(bool),
}

/// A refused call (goim's ErrPushMsgArg family and transport limits).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum RpcError {
    /// The call names no key (or an empty key).
    #[error("push arg error: empty key")]
    EmptyKeys,
    /// The call names no user id.
    #[error("push arg error: no user ids")]
    EmptyMids,
    /// The call names an empty room id.
    #[error("push arg error: empty room id")]
    EmptyRoom,
    /// A message body exceeds the client body limit.
    #[error("push arg error: body of {len} bytes exceeds the limit of {max}")]
    BodyTooLarge { len: u64, max: u64 },
    /// The call names more keys, ids or messages than allowed.
    #[error("push arg error: {len} items exceed the limit of {max}")]
    TooManyKeys { len: u64, max: u64 },
    /// The request exceeds `rpc.max_request_bytes`.
    #[error("request of {len} bytes exceeds the limit of {max}")]
    RequestTooLarge { len: u64, max: u64 },
    /// The request could not be decoded.
    #[error("malformed request: {0}")]
    Malformed(String),
    /// The server is shutting down and takes no new work.
    #[error("server shutting down")]
    ShuttingDown,
    /// Too many paced broadcasts are running; try again later.
    #[error("busy: {0}")]
    Busy(String),
    /// The server failed to encode its reply.
    #[error("internal error: {0}")]
    Internal(String),
    /// A paced broadcast at this speed would take longer than
    /// `rpc.paced_max_duration` over the channels online.
    #[error(
        "push arg error: a paced broadcast to {online} channels at {speed}/s takes {secs} s, \
         over rpc.paced_max_duration of {max_secs} s"
    )]
    PacedTooLong {
        online: u64,
        speed: u32,
        secs: u64,
        max_secs: u64,
    },
    /// The cluster (Redis) failed a call as a whole (only where no local part of
    /// it could answer).
    #[error("cluster: {reason}")]
    Cluster { reason: String },
}

/// What a call returns on the wire.
pub type Response = Result<Reply, RpcError>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec;

    /// Every type that is part of a request or a reply is defined in this module,
    /// so a change to one is a change to this file.
    #[test]
    fn every_wire_type_is_defined_in_proto() {
        fn at<T>() -> &'static str {
            std::any::type_name::<T>()
        }
        for name in [
            at::<Request>(),
            at::<PushItem>(),
            at::<Reply>(),
            at::<MultiOutcome>(),
            at::<RoomCount>(),
            at::<RpcError>(),
            at::<PushOutcome>(),
            at::<Tally>(),
            at::<Online>(),
        ] {
            assert!(
                name.starts_with("quicpush::rpc::proto::"),
                "{name} is on the wire but defined outside rpc::proto"
            );
        }
    }

    /// The version the golden table below is the encoding of. A test fails unless
    /// it is [`ALPN`].
    const GOLDEN_ALPN: &[u8] = b"quicpush-rpc/4";

    /// Every wire version there has been, with the fingerprint of its golden
    /// table. Bumping the version appends a line; an old line never changes.
    const VERSIONS: &[(&[u8], u64)] = &[
        (b"quicpush-rpc/1", 0x5754dcb3b6fb3f78),
        // Online lists paced broadcasts; RpcError::PacedTooLong
        (b"quicpush-rpc/2", 0x9bf900913ab95e37),
        // Online counts TLS, WebSocket and WebSocket-over-TLS connections
        (b"quicpush-rpc/3", 0xbd813f0143938a8c),
        // Several nodes: PushOutcome::Forwarded / Unavailable, Tally counts them,
        // RpcError::Cluster
        (b"quicpush-rpc/4", 0xaafca1c09f061dbd),
    ];

    fn b(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    /// One fixed value of every request variant, with its payload bytes in hex.
    fn golden_requests() -> Vec<(Request, &'static str)> {
        vec![
            (Request::Ping, "00"),
            (
                Request::PushMsg {
                    key: "k1".into(),
                    op: 1000,
                    body: b("hi"),
                },
                "01026b31fbe803026869",
            ),
            (
                Request::MPushMsg {
                    keys: vec!["a".into(), "bc".into()],
                    op: 1001,
                    body: b("xyz"),
                },
                "02020161026263fbe9030378797a",
            ),
            (
                Request::MPushMsgs {
                    msgs: vec![
                        PushItem {
                            key: "a".into(),
                            op: 7,
                            body: b("1"),
                        },
                        PushItem {
                            key: "b".into(),
                            op: 70_000,
                            body: b(""),
                        },
                    ],
                },
                "030201610701310162fc7011010000",
            ),
            (
                Request::PushUser {
                    mids: vec![1, -2, 300],
                    op: 1000,
                    body: b("u"),
                },
                "04030203fb5802fbe8030175",
            ),
            (
                Request::Broadcast {
                    op: 1000,
                    body: b("all"),
                    speed: 500,
                },
                "05fbe80303616c6cfbf401",
            ),
            (
                Request::BroadcastRoom {
                    room: "live://1".into(),
                    op: 1000,
                    body: b("r"),
                },
                "06086c6976653a2f2f31fbe8030172",
            ),
            (Request::Rooms, "07"),
            (Request::Online, "08"),
            (Request::Kick { key: "k1".into() }, "09026b31"),
        ]
    }

    /// One fixed value of every reply and every error variant, as the response
    /// (`Result<Reply, RpcError>`) that carries it, with its payload bytes in hex.
    fn golden_responses() -> Vec<(Response, &'static str)> {
        vec![
            (Ok(Reply::Pong), "0000"),
            (Ok(Reply::Pushed(PushOutcome::Stored)), "000104"),
            (
                Ok(Reply::Multi(MultiOutcome {
                    outcomes: vec![
                        PushOutcome::Delivered,
                        PushOutcome::Offline,
                        PushOutcome::QueueFull,
                        PushOutcome::Filtered,
                        PushOutcome::Stored,
                        PushOutcome::Forwarded,
                        PushOutcome::Unavailable,
                    ],
                    index: 0,
                })),
                "0002070001020304050600",
            ),
            (
                Ok(Reply::Tally(Tally {
                    delivered: 1,
                    queue_full: 2,
                    filtered: 3,
                    stored: 4,
                    appended: 300,
                    forwarded_nodes: 5,
                    unavailable: 6,
                })),
                "000301020304fb2c010506",
            ),
            (Ok(Reply::BroadcastAccepted { online: 12 }), "00040c"),
            (
                Ok(Reply::Rooms(vec![
                    RoomCount {
                        room: "a".into(),
                        online: 1,
                    },
                    RoomCount {
                        room: "b".into(),
                        online: 2,
                    },
                ])),
                "000502016101016202",
            ),
            (
                Ok(Reply::Online(Online {
                    total: 3,
                    tcp: 1,
                    quic: 2,
                    tls: 4,
                    ws: 5,
                    wss: 6,
                    paced: vec![PacedProgress {
                        op: 1000,
                        speed: 50,
                        delivered: 7,
                        remaining: 300,
                        elapsed_ms: 1500,
                    }],
                })),
                "000603010204050601fbe8033207fb2c01fbdc05",
            ),
            (Ok(Reply::Kicked(true)), "000701"),
            (Err(RpcError::EmptyKeys), "0100"),
            (Err(RpcError::EmptyMids), "0101"),
            (Err(RpcError::EmptyRoom), "0102"),
            (
                Err(RpcError::BodyTooLarge {
                    len: 5000,
                    max: 4096,
                }),
                "0103fb8813fb0010",
            ),
            (Err(RpcError::TooManyKeys { len: 11, max: 10 }), "01040b0a"),
            (
                Err(RpcError::RequestTooLarge {
                    len: 1 << 32,
                    max: 4 << 20,
                }),
                "0105fd0000000001000000fc00004000",
            ),
            (Err(RpcError::Malformed("m".into())), "0106016d"),
            (Err(RpcError::ShuttingDown), "0107"),
            (Err(RpcError::Busy("b".into())), "01080162"),
            (Err(RpcError::Internal("i".into())), "01090169"),
            (
                Err(RpcError::PacedTooLong {
                    online: 3000,
                    speed: 1,
                    secs: 3000,
                    max_secs: 600,
                }),
                "010afbb80b01fbb80bfb5802",
            ),
            (Err(RpcError::Cluster { reason: "r".into() }), "010b0172"),
        ]
    }

    /// Which variant a request is; no wildcard, so a new variant does not compile
    /// until it is listed here and given a golden value.
    fn request_variant(r: &Request) -> usize {
        match r {
            Request::Ping => 0,
            Request::PushMsg { .. } => 1,
            Request::MPushMsg { .. } => 2,
            Request::MPushMsgs { .. } => 3,
            Request::PushUser { .. } => 4,
            Request::Broadcast { .. } => 5,
            Request::BroadcastRoom { .. } => 6,
            Request::Rooms => 7,
            Request::Online => 8,
            Request::Kick { .. } => 9,
        }
    }
    const REQUEST_VARIANTS: usize = 10;

    /// Which reply or error variant a response is, as for [`request_variant`].
    fn response_variant(r: &Response) -> usize {
        match r {
            Ok(Reply::Pong) => 0,
            Ok(Reply::Pushed(_)) => 1,
            Ok(Reply::Multi(_)) => 2,
            Ok(Reply::Tally(_)) => 3,
            Ok(Reply::BroadcastAccepted { .. }) => 4,
            Ok(Reply::Rooms(_)) => 5,
            Ok(Reply::Online(_)) => 6,
            Ok(Reply::Kicked(_)) => 7,
            Err(RpcError::EmptyKeys) => 8,
            Err(RpcError::EmptyMids) => 9,
            Err(RpcError::EmptyRoom) => 10,
            Err(RpcError::BodyTooLarge { .. }) => 11,
            Err(RpcError::TooManyKeys { .. }) => 12,
            Err(RpcError::RequestTooLarge { .. }) => 13,
            Err(RpcError::Malformed(_)) => 14,
            Err(RpcError::ShuttingDown) => 15,
            Err(RpcError::Busy(_)) => 16,
            Err(RpcError::Internal(_)) => 17,
            Err(RpcError::PacedTooLong { .. }) => 18,
            Err(RpcError::Cluster { .. }) => 19,
        }
    }
    const RESPONSE_VARIANTS: usize = 20;

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The payload the project's codec puts on the wire for `value`.
    fn payload<T: Serialize>(value: &T) -> Vec<u8> {
        let mut buf = bytes::BytesMut::new();
        codec::write_message(&mut buf, 0, value).expect("encodes");
        buf[codec::PREFIX_LEN..].to_vec()
    }

    /// Checks every golden value encodes to its bytes and decodes back.
    fn check<T>(table: &[(T, &str)])
    where
        T: Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
    {
        let mut wrong = Vec::new();
        for (value, want) in table {
            let got = hex(&payload(value));
            if got != *want {
                wrong.push(format!("{value:?}\n  golden {want:?}\n  now    {got:?}"));
                continue;
            }
            let back: T = codec::decode_payload(&payload(value)).expect("decodes");
            assert_eq!(&back, value);
        }
        assert!(
            wrong.is_empty(),
            "the wire encoding changed: bump ALPN and regenerate the golden table\n{}",
            wrong.join("\n")
        );
    }

    #[test]
    fn every_request_variant_has_its_golden_bytes() {
        let table = golden_requests();
        let mut seen: Vec<usize> = table.iter().map(|(r, _)| request_variant(r)).collect();
        seen.sort_unstable();
        assert_eq!(seen, (0..REQUEST_VARIANTS).collect::<Vec<_>>());
        check(&table);
    }

    #[test]
    fn every_reply_and_error_variant_has_its_golden_bytes() {
        let table = golden_responses();
        let mut seen: Vec<usize> = table.iter().map(|(r, _)| response_variant(r)).collect();
        seen.sort_unstable();
        assert_eq!(seen, (0..RESPONSE_VARIANTS).collect::<Vec<_>>());
        check(&table);
    }

    /// FNV-1a over every golden byte string, in table order.
    fn fingerprint() -> u64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let hexes = golden_requests()
            .into_iter()
            .map(|(_, h)| h)
            .chain(golden_responses().into_iter().map(|(_, h)| h));
        for s in hexes {
            for byte in s.bytes().chain(std::iter::once(b'|')) {
                h ^= u64::from(byte);
                h = h.wrapping_mul(0x0100_0000_01b3);
            }
        }
        h
    }

    /// The golden table belongs to one wire version: it is the version the server
    /// speaks, and a table whose bytes changed must come with a new version.
    #[test]
    fn golden_table_is_the_current_alpn_version() {
        assert_eq!(
            GOLDEN_ALPN, ALPN,
            "the golden table is for another version than the ALPN"
        );
        assert_eq!(crate::tls::RPC_ALPN, ALPN);
        let (last, print) = VERSIONS.last().expect("at least one version");
        assert_eq!(*last, ALPN, "VERSIONS must end with the current ALPN");
        for (i, (v, f)) in VERSIONS.iter().enumerate() {
            for (w, g) in &VERSIONS[i + 1..] {
                assert_ne!(v, w, "a version listed twice");
                assert_ne!(f, g, "two versions with the same bytes");
            }
        }
        assert_eq!(
            *print,
            fingerprint(),
            "the golden bytes changed under the same version: bump ALPN and append \
             the new version with this fingerprint to VERSIONS ({:#x})",
            fingerprint()
        );
    }
}
