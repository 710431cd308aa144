//! The final check: what each client was owed, from the backends' ledger, against
//! what it received.

use std::collections::HashSet;
use std::time::Instant;

use bytes::BytesMut;
use quicpush::channel::PushOutcome;
use quicpush::protocol::{Frame, PushMeta, Source};
use quicpush::registry::Tally;
use quicpush::resume::ResumeReply;

use crate::backend::{Sent, Target};
use crate::body::{body, msg_id, Kind, NO_TARGET};
use crate::conn::Conn;
use crate::fleet::Stay;
use crate::seen::{Got, Seen};
use crate::{key_of, mid_of, OP};

/// Every message sent, by id.
pub(crate) struct Ledger {
    pub(crate) sent: Vec<Vec<Sent>>,
}

impl Ledger {
    fn get(&self, id: u64) -> Option<&Sent> {
        let backend = (id & 0xff) as usize;
        let seq = (id >> 8) as usize;
        self.sent.get(backend)?.get(seq.checked_sub(1)?)
    }

    /// Whether `client` may have received message `id`. `Some(reason)` if not.
    fn refuse(&self, client: u32, id: u64) -> Option<String> {
        let Some(s) = self.get(id) else {
            return Some(format!("message {id:#x} was never sent"));
        };
        if s.failed {
            return None;
        }
        let ok = match &s.target {
            Target::Key { client: c, outcome } => {
                *c == client && *outcome == PushOutcome::Delivered
            }
            Target::Keys(list) => list
                .iter()
                .any(|&(c, o)| c == client && o == PushOutcome::Delivered),
            Target::User { mids, tally } => mids.contains(&mid_of(client)) && tally.delivered > 0,
            Target::Room { tally, .. } => tally.delivered > 0,
            Target::Broadcast => true,
        };
        (!ok).then(|| format!("client {client} got {:?} (seq {})", s.target, id >> 8))
    }
}

/// What a stable client must have received: every message that was certainly
/// queued for it.
pub(crate) fn expected_for(ledger: &Ledger, client: u32, stays: &[Stay]) -> Vec<u64> {
    let mid = mid_of(client);
    let mut want = Vec::new();
    for (b, sent) in ledger.sent.iter().enumerate() {
        for (i, s) in sent.iter().enumerate() {
            if s.failed {
                continue;
            }
            let yes = match &s.target {
                Target::Key { client: c, outcome } => {
                    *c == client && *outcome == PushOutcome::Delivered
                }
                Target::Keys(list) => list
                    .iter()
                    .any(|&(c, o)| c == client && o == PushOutcome::Delivered),
                Target::User { mids, tally } => {
                    tally.queue_full == 0 && tally.filtered == 0 && mids.contains(&mid)
                }
                Target::Room { room, tally } => {
                    tally.queue_full == 0
                        && tally.filtered == 0
                        && stays.iter().any(|st| {
                            st.room == Some(*room) && st.from <= s.sent_at && s.replied_at <= st.to
                        })
                }
                Target::Broadcast => true,
            };
            if yes {
                want.push(msg_id(b as u8, i as u32 + 1));
            }
        }
    }
    want
}

/// What a resuming client in `room` for the whole round must have received, no
/// more and no less: every push to its key reported `Delivered` or `Stored`, every
/// user push to its user id, every push to its room, and every broadcast. A push
/// to its key reported anything else is lost (a description in the second list):
/// its key's stream is live all round, so every push to it is kept.
pub(crate) fn expected_resuming(
    ledger: &Ledger,
    client: u32,
    room: u32,
) -> (Vec<u64>, Vec<String>) {
    let mid = mid_of(client);
    let mut want = Vec::new();
    let mut lost = Vec::new();
    let kept = |o: PushOutcome| matches!(o, PushOutcome::Delivered | PushOutcome::Stored);
    for (b, sent) in ledger.sent.iter().enumerate() {
        for (i, s) in sent.iter().enumerate() {
            if s.failed {
                continue;
            }
            let id = msg_id(b as u8, i as u32 + 1);
            let outcome = match &s.target {
                Target::Key { client: c, outcome } => (*c == client).then_some(*outcome),
                Target::Keys(list) => list.iter().find(|(c, _)| *c == client).map(|x| x.1),
                Target::User { mids, .. } => mids.contains(&mid).then_some(PushOutcome::Stored),
                Target::Room { room: r, .. } => (*r == room).then_some(PushOutcome::Stored),
                Target::Broadcast => Some(PushOutcome::Stored),
            };
            match outcome {
                Some(o) if kept(o) => want.push(id),
                Some(o) => lost.push(format!(
                    "push {id:#x} to resuming client {client}'s key: {o:?}"
                )),
                None => {}
            }
        }
    }
    (want, lost)
}

/// User and room pushes whose tally shows them not appended to the streams of the
/// resuming clients they address (live all round): descriptions.
pub(crate) fn not_appended(
    ledger: &Ledger,
    mids: &HashSet<i64>,
    rooms: &HashSet<u32>,
) -> Vec<String> {
    let mut bad = Vec::new();
    for s in ledger.sent.iter().flatten().filter(|s| !s.failed) {
        match &s.target {
            Target::User { mids: to, tally } => {
                let live = to.iter().filter(|m| mids.contains(m)).count() as u64;
                if tally.appended < live || tally.appended > to.len() as u64 {
                    bad.push(format!(
                        "PushUser to {to:?} ({live} of resuming clients): {tally:?}"
                    ));
                }
            }
            Target::Room { room, tally } if rooms.contains(room) && tally.appended != 1 => {
                bad.push(format!("BroadcastRoom to room {room}: {tally:?}"));
            }
            _ => {}
        }
    }
    bad
}

/// What a client must have received.
pub(crate) enum Expect {
    /// Nothing in particular (a churning client).
    Nothing,
    /// At least these (a stable client); the rest is checked by the ledger's rules.
    AtLeast(Vec<u64>),
    /// Exactly these, besides pushes of failed calls (a resuming client).
    Exactly(Vec<u64>),
}

#[derive(Debug, Default)]
pub(crate) struct Verdict {
    /// Deliveries a stable client had to receive and did, exactly once.
    pub(crate) confirmed: u64,
    /// Deliveries a resuming client had to receive and did, exactly once.
    pub(crate) confirmed_resuming: u64,
    /// Received messages checked against the ledger.
    pub(crate) checked: u64,
    pub(crate) missing: u64,
    pub(crate) duplicated: u64,
    pub(crate) not_meant: u64,
    /// Pushes to a resuming client's key reported neither `Delivered` nor `Stored`.
    pub(crate) lost: u64,
    /// User and room pushes to resuming clients not appended to their streams.
    pub(crate) not_appended: u64,
    pub(crate) examples: Vec<String>,
}

impl Verdict {
    pub(crate) fn note(&mut self, what: String) {
        if self.examples.len() < 20 {
            self.examples.push(what);
        }
    }

    /// Checks one client's messages against the ledger: no duplicate, nothing not
    /// meant for it, and (stable and resuming clients) nothing missing.
    pub(crate) fn client(&mut self, ledger: &Ledger, seen: &Seen, expected: Expect) {
        let mut got = seen.ids.clone();
        got.sort_unstable();
        for w in got.windows(2) {
            if w[0] == w[1] {
                self.duplicated += 1;
                self.note(format!("client {}: message {:#x} twice", seen.me, w[0]));
            }
        }
        got.dedup();
        let (want, exact) = match expected {
            Expect::Nothing => (Vec::new(), false),
            Expect::AtLeast(w) => (w, false),
            Expect::Exactly(w) => (w, true),
        };
        let mut want = want;
        want.sort_unstable();
        for &id in &got {
            self.checked += 1;
            let why = if exact {
                let failed = ledger.get(id).is_some_and(|s| s.failed);
                (want.binary_search(&id).is_err() && !failed).then(|| {
                    let what = ledger.get(id).map(|s| format!("{:?}", s.target));
                    format!(
                        "resuming client {} got {id:#x}, not meant for it: {what:?}",
                        seen.me
                    )
                })
            } else {
                ledger.refuse(seen.me, id)
            };
            if let Some(why) = why {
                self.not_meant += 1;
                self.note(why);
            }
        }
        let class = if exact { "resuming" } else { "stable" };
        for id in want {
            if got.binary_search(&id).is_ok() {
                if exact {
                    self.confirmed_resuming += 1;
                } else {
                    self.confirmed += 1;
                }
            } else {
                self.missing += 1;
                let what = ledger.get(id).map(|s| format!("{:?}", s.target));
                self.note(format!(
                    "{class} client {} never got message {id:#x}: {what:?}",
                    seen.me
                ));
            }
        }
    }
}

/// The resuming clients' checks fail when they should: a source offset gap, a push
/// twice, one missing, one not meant for the client, one to its key reported
/// `Offline`, a user push not appended to its stream.
#[test]
fn resuming_checks_can_fail() {
    let (me, room) = (1, 3);
    let now = Instant::now();
    let sent = |target| Sent {
        target,
        sent_at: now,
        replied_at: now,
        failed: false,
    };
    let ledger = Ledger {
        sent: vec![vec![
            sent(Target::Key {
                client: me,
                outcome: PushOutcome::Delivered,
            }),
            sent(Target::Key {
                client: me,
                outcome: PushOutcome::Offline,
            }),
            sent(Target::User {
                mids: vec![mid_of(me)],
                tally: Tally::default(),
            }),
            sent(Target::Room {
                room: 5,
                tally: Tally {
                    appended: 1,
                    ..Tally::default()
                },
            }),
            sent(Target::Broadcast),
        ]],
    };
    let mut seen = Seen::resuming(me);
    let mut reply = ResumeReply {
        key: key_of(me),
        ..ResumeReply::default()
    };
    for source in Source::ALL {
        let st = quicpush::resume::SourceState {
            epoch: 7,
            offset: 0,
            recovered: None,
        };
        reply.sources.insert(source.name().to_owned(), st);
    }
    seen.track().state.apply(&reply);
    seen.track().connected(me, &reply).unwrap();
    let mut conn = Conn {
        reader: Box::new(tokio::io::empty()),
        writer: Box::new(tokio::io::sink()),
        buf: BytesMut::new(),
        quic: None,
        push_seq: 0,
        room: Some(room),
        pending: None,
        seq: 1,
        resume: true,
    };
    let push = |seq, kind, msg, target, source, offset| {
        let f = Frame::new(OP, seq, body(kind, 0, msg, target));
        let m = PushMeta {
            source,
            epoch: 7,
            offset,
        };
        (f, Some(m))
    };
    for (f, m) in [
        push(1, Kind::Key, 1, me, Source::Key, 1),
        push(2, Kind::Key, 1, me, Source::Key, 2),
        push(3, Kind::User, 3, NO_TARGET, Source::User, 1),
        push(5, Kind::Room, 4, 5, Source::Room, 2),
    ] {
        assert_eq!(seen.handle(&mut conn, &f, m), Got::Push);
    }
    let f = &seen.failures;
    assert_eq!(
        (f.bad_seq, f.offset_gap, f.misrouted, f.out_of_order),
        (1, 1, 1, 1),
        "{f:?}"
    );
    let (want, lost) = expected_resuming(&ledger, me, room);
    assert_eq!(lost.len(), 1, "the push reported Offline");
    let mut v = Verdict::default();
    v.client(&ledger, &seen, Expect::Exactly(want));
    assert_eq!(
        (v.duplicated, v.missing, v.not_meant, v.confirmed_resuming),
        (1, 1, 1, 2),
        "{v:?}"
    );
    let bad = not_appended(
        &ledger,
        &HashSet::from([mid_of(me)]),
        &HashSet::from([room]),
    );
    assert_eq!(bad.len(), 1, "{bad:?}");
}
