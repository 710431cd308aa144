//! What a client received, checked frame by frame as it arrives: push sequence,
//! order, routing, resume offsets.

use quicpush::client::ResumeState;
use quicpush::protocol::{op, Frame, PushMeta, Source};
use quicpush::resume::{Position, ResumeReply};

use crate::body::{msg_id, parse, Kind};
use crate::conn::Conn;
use crate::{key_of, room_name, BACKENDS, KEEP_EXAMPLES, OP};

/// Failures a client saw, counted by kind, with the first few described.
#[derive(Debug, Default)]
pub(crate) struct Failures {
    pub(crate) bad_seq: u64,
    pub(crate) out_of_order: u64,
    pub(crate) misrouted: u64,
    pub(crate) malformed: u64,
    /// Resuming clients: a push whose source offset does not follow the last one
    /// received from that source (or whose epoch changed), or one without the
    /// extension or outside history.
    pub(crate) offset_gap: u64,
    /// Unexpected frames, closes, connect and write failures.
    pub(crate) unexpected: u64,
    pub(crate) examples: Vec<String>,
}

impl Failures {
    pub(crate) fn note(&mut self, what: String) {
        if self.examples.len() < KEEP_EXAMPLES {
            self.examples.push(what);
        }
    }

    pub(crate) fn total(&self) -> u64 {
        self.bad_seq
            + self.out_of_order
            + self.misrouted
            + self.malformed
            + self.offset_gap
            + self.unexpected
    }
}

/// What a resuming client keeps for its whole life, and what its connections tell.
#[derive(Debug, Default)]
pub(crate) struct Track {
    /// Its key and last position per source: each connection resumes from it.
    pub(crate) state: ResumeState,
    /// Per source, the stream's top that the current connection's AuthReply named:
    /// a push at or below it is a replay.
    tops: [Option<Position>; 4],
    /// Pushes received as a replay.
    pub(crate) replayed: u64,
}

impl Track {
    /// Takes AuthReply's answer (which `auth_resume` already applied to `state`);
    /// `Err` if it names another key or lacks a source the client receives.
    pub(crate) fn connected(&mut self, me: u32, reply: &ResumeReply) -> Result<(), String> {
        if reply.key != key_of(me) {
            return Err(format!("AuthReply names key {:?}", reply.key));
        }
        for source in Source::ALL {
            let Some(st) = reply.source(source) else {
                return Err(format!(
                    "AuthReply names no {} source: {reply:?}",
                    source.name()
                ));
            };
            self.tops[source.index()] = Some(st.position());
        }
        Ok(())
    }
}

/// What a client received, over all its connections.
#[derive(Debug)]
pub(crate) struct Seen {
    pub(crate) me: u32,
    /// Message ids in the order they arrived.
    pub(crate) ids: Vec<u64>,
    /// Last sequence number per backend and class: synchronous pushes (0) and
    /// broadcasts (3), or, for a resuming client, each source (its index).
    last: [[u32; 4]; BACKENDS],
    pub(crate) failures: Failures,
    pub(crate) end: bool,
    pub(crate) heartbeat_replies: u64,
    pub(crate) room_changes: u64,
    /// A resuming client's positions.
    track: Option<Track>,
}

/// The source a message's kind is pushed from.
fn source_of(kind: Kind) -> Source {
    match kind {
        Kind::Key | Kind::Keys | Kind::Item => Source::Key,
        Kind::User => Source::User,
        Kind::Room => Source::Room,
        Kind::Broadcast | Kind::End => Source::All,
    }
}

/// What a frame meant to the client.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Got {
    Push,
    RoomChanged,
    Disconnect,
    Other,
}

impl Seen {
    pub(crate) fn new(me: u32) -> Seen {
        Seen {
            me,
            ids: Vec::new(),
            last: [[0; 4]; BACKENDS],
            failures: Failures::default(),
            end: false,
            heartbeat_replies: 0,
            room_changes: 0,
            track: None,
        }
    }

    /// A resuming client's record.
    pub(crate) fn resuming(me: u32) -> Seen {
        Seen {
            track: Some(Track::default()),
            ..Seen::new(me)
        }
    }

    pub(crate) fn track(&mut self) -> &mut Track {
        self.track.get_or_insert_with(Track::default)
    }

    /// A resuming connection's push must carry the extension and be the next of its
    /// source: offset one past the last one received, in the same epoch (the
    /// position AuthReply left, if none came on this client's connections since).
    fn check_offset(&mut self, f: &Frame, meta: Option<PushMeta>) {
        let me = self.me;
        let Some(m) = meta else {
            self.failures.offset_gap += 1;
            self.failures.note(format!(
                "client {me}: push seq {} without the extension",
                f.seq
            ));
            return;
        };
        let track = self.track();
        let at = track.state.positions.get(m.source);
        let top = track.tops[m.source.index()];
        let follows =
            m.is_tracked() && at.is_some_and(|p| p.epoch == m.epoch && m.offset == p.offset + 1);
        if top.is_some_and(|t| t.epoch == m.epoch && m.offset <= t.offset) {
            track.replayed += 1;
        }
        track.state.observe(&m);
        if !follows {
            self.failures.offset_gap += 1;
            self.failures.note(format!(
                "client {me}: {} push at epoch {} offset {} after {at:?}",
                m.source.name(),
                m.epoch,
                m.offset
            ));
        }
    }

    pub(crate) fn unexpected(&mut self, what: String) {
        self.failures.unexpected += 1;
        self.failures.note(format!("client {}: {what}", self.me));
    }

    /// Checks a connection's push seq: 1, 2, 3, ... on each connection.
    pub(crate) fn check_seq(&mut self, conn: &mut Conn, f: &Frame) {
        if f.seq != conn.push_seq.wrapping_add(1) {
            self.failures.bad_seq += 1;
            self.failures.note(format!(
                "client {}: push seq {} after {}",
                self.me, f.seq, conn.push_seq
            ));
        }
        conn.push_seq = f.seq;
    }

    pub(crate) fn handle(&mut self, conn: &mut Conn, f: &Frame, meta: Option<PushMeta>) -> Got {
        let me = self.me;
        match f.op {
            OP => {
                self.check_seq(conn, f);
                if conn.resume {
                    self.check_offset(f, meta);
                }
                let Some(m) = parse(&f.body) else {
                    self.failures.malformed += 1;
                    self.failures
                        .note(format!("client {me}: malformed body {:?}", f.body));
                    return Got::Push;
                };
                let misrouted = match m.kind {
                    Kind::End => {
                        self.end = true;
                        return Got::Push;
                    }
                    Kind::Key | Kind::Item => m.target != me,
                    Kind::Room => {
                        Some(m.target) != conn.room && conn.pending != Some(Some(m.target))
                    }
                    Kind::Keys | Kind::User | Kind::Broadcast => false,
                } || meta.is_some_and(|x| x.source != source_of(m.kind));
                if misrouted {
                    self.failures.misrouted += 1;
                    self.failures.note(format!(
                        "client {me} in room {:?} (moving to {:?}) got {m:?}",
                        conn.room, conn.pending
                    ));
                }
                // A resume replays each source's missed pushes in turn, so a
                // resuming client keeps a backend's order within each source.
                let class = match (&self.track, m.kind) {
                    (Some(_), kind) => source_of(kind).index(),
                    (None, Kind::Broadcast) => Source::All.index(),
                    (None, _) => 0,
                };
                let last = &mut self.last[m.backend as usize][class];
                if m.seq <= *last {
                    self.failures.out_of_order += 1;
                    self.failures
                        .note(format!("client {me}: {m:?} after seq {}", *last));
                } else {
                    *last = m.seq;
                }
                self.ids.push(msg_id(m.backend, m.seq));
                Got::Push
            }
            op::CHANGE_ROOM_REPLY => match conn.pending.take() {
                Some(room) => {
                    let want = room.map(room_name).unwrap_or_default();
                    if f.body != want.as_bytes() {
                        self.unexpected(format!("ChangeRoomReply {:?} for {want:?}", f.body));
                    }
                    conn.room = room;
                    self.room_changes += 1;
                    Got::RoomChanged
                }
                None => {
                    self.unexpected("ChangeRoomReply without ChangeRoom".into());
                    Got::Other
                }
            },
            op::HEARTBEAT_REPLY => {
                self.heartbeat_replies += 1;
                Got::Other
            }
            op::DISCONNECT_REPLY => Got::Disconnect,
            other => {
                self.unexpected(format!("unexpected op {other}"));
                Got::Other
            }
        }
    }
}
