//! Requests, replies and errors of the backend RPC.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

pub use crate::channel::PushOutcome;
pub use crate::registry::{Online, Tally};

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
}

/// What a call returns on the wire.
pub type Response = Result<Reply, RpcError>;
