//! The resume negotiation: what a client asks for in Auth and what AuthReply says.
//!
//! Resume is opt-in per connection. A client asks for it with a `resume` object in
//! its Auth body: beside goim's fields in open mode, or beside the JWT in jwt mode
//! (`{"token": "<jwt>", "resume": {...}}`; a bare JWT body stays as it was):
//!
//! ```json
//! "resume": {
//!   "key": "k1",
//!   "positions": {
//!     "key":  {"epoch": 3735928559, "offset": 41},
//!     "user": {"epoch": 12, "offset": 7},
//!     "room": {"epoch": 99, "offset": 1000},
//!     "all":  {"epoch": 5, "offset": 3}
//!   }
//! }
//! ```
//!
//! `"resume": {}` asks for resume with no position (a first connection). `key`, if
//! present, must be the key the token authenticates: a position is only honoured
//! for the same key. Positions come from the client only; the token issuer never
//! chooses them.
//!
//! AuthReply on such a connection has a JSON body (goim's is empty):
//!
//! ```json
//! {"key": "k1", "sources": {
//!   "key":  {"epoch": 3735928559, "offset": 45, "recovered": true},
//!   "user": {"epoch": 12, "offset": 7, "recovered": true},
//!   "room": {"epoch": 77, "offset": 0, "recovered": false}
//! }}
//! ```
//!
//! One entry per source the connection receives that has history on. `offset` is
//! the stream's top: every push after it arrives live. `recovered` is there when the
//! client sent a position for that source: `true` means every push it missed was
//! replayed, in order, before any live one; `false` (another epoch, or history no
//! longer holds the gap) means nothing was replayed for it and the client must
//! resync that source from its backend. `key` is the connection's key, which the
//! server generates when the Auth body names none: a client resumes with it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub use crate::history::{Position, SourceState};
use crate::protocol::Source;

/// A client's resume request, from its Auth body.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResumeRequest {
    /// The key the positions belong to; must match the authenticated key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// The client's last position per source (`key`, `user`, `room`, `all`).
    #[serde(default, skip_serializing_if = "Positions::is_empty")]
    pub positions: Positions,
}

/// Positions by source name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Positions {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<Position>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<Position>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub room: Option<Position>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub all: Option<Position>,
}

impl Positions {
    pub fn is_empty(&self) -> bool {
        self.key.is_none() && self.user.is_none() && self.room.is_none() && self.all.is_none()
    }

    pub fn get(&self, s: Source) -> Option<Position> {
        match s {
            Source::Key => self.key,
            Source::User => self.user,
            Source::Room => self.room,
            Source::All => self.all,
        }
    }

    pub fn set(&mut self, s: Source, p: Option<Position>) {
        match s {
            Source::Key => self.key = p,
            Source::User => self.user = p,
            Source::Room => self.room = p,
            Source::All => self.all = p,
        }
    }
}

/// The JSON body of AuthReply on a resume-capable connection.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResumeReply {
    /// The connection's key.
    pub key: String,
    /// Per source name (`key`, `user`, `room`, `all`).
    pub sources: BTreeMap<String, SourceState>,
}

impl ResumeReply {
    /// The state of one source, if the connection receives it with history.
    pub fn source(&self, s: Source) -> Option<&SourceState> {
        self.sources.get(s.name())
    }
}
