//! A property of resume, checked on the registry and history without sockets: for
//! any interleaving of pushes (by key, user, room and broadcast), partial reads,
//! connection losses (unread frames lost with them), overflow closes and resumes,
//! every client receives exactly the pushes of its sources, each once, in
//! per-source order, or is told "not recovered" for that source.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use quicpush::channel::{Channel, OutReceiver, Transport};
use quicpush::client::ResumeState;
use quicpush::config::HistoryConfig;
use quicpush::history::History;
use quicpush::protocol::{self, op, Frame, PushMeta, Source};
use quicpush::registry::{OpFilter, Registry};
use quicpush::resume::ResumeReply;

const CLIENTS: usize = 3;
const ROOM: &str = "room://1";

#[derive(Debug, Clone)]
enum Step {
    /// Client i connects (resuming from its state) if it is not connected.
    Connect(usize),
    /// Client i's connection is lost; whatever it has not read is lost with it.
    Lose(usize),
    /// Client i reads up to n frames.
    Read(usize, usize),
    PushKey(usize),
    /// To user id i % 2 (clients 0 and 2 share user 0).
    PushUser(usize),
    PushRoom,
    Broadcast,
}

fn step() -> impl Strategy<Value = Step> {
    let c = 0..CLIENTS;
    prop_oneof![
        2 => c.clone().prop_map(Step::Connect),
        1 => c.clone().prop_map(Step::Lose),
        3 => (c.clone(), 1..6usize).prop_map(|(i, n)| Step::Read(i, n)),
        3 => c.clone().prop_map(Step::PushKey),
        2 => (0..2usize).prop_map(Step::PushUser),
        2 => Just(Step::PushRoom),
        1 => Just(Step::Broadcast),
    ]
}

struct Client {
    key: String,
    mid: i64,
    state: ResumeState,
    conn: Option<(Arc<Channel>, OutReceiver, BytesMut)>,
    /// Per source: the push numbers received, in order.
    got: HashMap<Source, Vec<u64>>,
    /// Per source: the push number the client's position stood at when it was told
    /// "not recovered" (it resyncs from its backend from there).
    skipped: HashMap<Source, u64>,
}

/// Pushes sent per source stream, by stream name, in offset order: the push numbers.
type Sent = HashMap<String, Vec<u64>>;

fn stream_name(c: &Client, s: Source) -> String {
    match s {
        Source::Key => format!("K:{}", c.key),
        Source::User => format!("M:{}", c.mid),
        Source::Room => "R".into(),
        Source::All => "A".into(),
    }
}

fn history(size: usize) -> Arc<History> {
    let cfg = HistoryConfig {
        size,
        room: true,
        all: true,
        ..HistoryConfig::default()
    };
    History::from_config(&cfg).unwrap()
}

fn frame(n: u64) -> Bytes {
    Frame::new(1000, 0, n.to_string()).to_bytes()
}

fn read(c: &mut Client, max: usize) {
    let Some((chan, mut rx, mut buf)) = c.conn.take() else {
        return;
    };
    let mut left = max;
    while left > 0 {
        if buf.is_empty() && rx.take(&mut buf).frames == 0 {
            break;
        }
        let Some((f, meta)) = protocol::decode_server(&mut buf, 1 << 20).unwrap() else {
            panic!("the queue holds whole frames only");
        };
        left -= 1;
        if f.op == op::AUTH_REPLY {
            let reply: ResumeReply = serde_json::from_slice(&f.body).unwrap();
            for s in Source::ALL {
                if reply.source(s).and_then(|st| st.recovered) == Some(false) {
                    c.skipped.insert(s, 0);
                }
            }
            c.state.apply(&reply);
            continue;
        }
        let meta: PushMeta = meta.expect("pushes carry the extension");
        c.state.observe(&meta);
        let n: u64 = std::str::from_utf8(&f.body).unwrap().parse().unwrap();
        c.got.entry(meta.source).or_default().push(n);
    }
    // A connection the server closed (overflow) ends once its queue is read.
    if !(buf.is_empty() && chan.is_closed()) {
        c.conn = Some((chan, rx, buf));
    }
}

fn run(steps: Vec<Step>, size: usize, queue: usize, no_gaps: bool) -> Result<(), TestCaseError> {
    let registry = Registry::with_history(4, 100, Some(history(size)));
    let mut clients: Vec<Client> = (0..CLIENTS)
        .map(|i| Client {
            key: format!("k{i}"),
            mid: (i % 2) as i64 + 1,
            state: ResumeState::default(),
            conn: None,
            got: HashMap::new(),
            skipped: HashMap::new(),
        })
        .collect();
    let mut sent: Sent = HashMap::new();
    let mut n = 0u64;
    let mut next = |stream: String, sent: &mut Sent| {
        n += 1;
        sent.entry(stream).or_default().push(n);
        n
    };
    let connect = |c: &mut Client, registry: &Registry| {
        let (chan, rx) = Channel::with_resume(
            registry.next_id(),
            c.key.as_str().into(),
            Some(c.mid),
            Transport::Tcp,
            queue,
            Duration::MAX,
            true,
        );
        let positions = c.state.request().positions;
        registry
            .register_with(
                chan.clone(),
                Some(ROOM.into()),
                OpFilter::default(),
                Some(&positions),
                None,
                |r| {
                    let body = serde_json::to_vec(&r.unwrap()).unwrap();
                    Some(Frame::new(op::AUTH_REPLY, 1, body).to_bytes())
                },
            )
            .unwrap();
        c.conn = Some((chan, rx, BytesMut::new()));
    };
    for s in steps {
        match s {
            Step::Connect(i) => {
                if clients[i].conn.is_none() {
                    connect(&mut clients[i], &registry);
                }
            }
            Step::Lose(i) => {
                if let Some((chan, _, _)) = clients[i].conn.take() {
                    registry.unregister(&chan);
                }
            }
            Step::Read(i, k) => read(&mut clients[i], k),
            Step::PushKey(i) => {
                let name = format!("K:k{i}");
                let v = next(name, &mut sent);
                let o = registry.push_key(&format!("k{i}"), 1000, &frame(v));
                if o == quicpush::channel::PushOutcome::Offline {
                    // no stream yet: never connected; nothing kept, nothing owed
                    sent.get_mut(&format!("K:k{i}")).unwrap().pop();
                }
            }
            Step::PushUser(m) => {
                let mid = m as i64 + 1;
                let name = format!("M:{mid}");
                let v = next(name.clone(), &mut sent);
                let t = registry.push_users(&[mid], 1000, &frame(v));
                if t.appended == 0 {
                    sent.get_mut(&name).unwrap().pop();
                }
            }
            Step::PushRoom => {
                let v = next("R".into(), &mut sent);
                let t = registry.push_room(ROOM, 1000, &frame(v));
                if t.appended == 0 {
                    sent.get_mut("R").unwrap().pop();
                }
            }
            Step::Broadcast => {
                let v = next("A".into(), &mut sent);
                let f = frame(v);
                let meta = registry.append_broadcast(&f);
                for b in 0..registry.bucket_count() {
                    registry.push_bucket(b, 1000, &f, meta);
                }
            }
        }
        // a connection closed by the server is unregistered by its session
        for c in clients.iter_mut() {
            if let Some((chan, _, _)) = &c.conn {
                if chan.is_closed() {
                    registry.unregister(chan);
                }
            }
        }
    }
    // Every client comes back one last time and reads everything.
    for c in clients.iter_mut() {
        if let Some((chan, _, _)) = c.conn.take() {
            registry.unregister(&chan);
        }
        connect(c, &registry);
        read(c, usize::MAX);
    }
    for c in &clients {
        if no_gaps {
            prop_assert!(
                c.skipped.is_empty(),
                "{}: not recovered with a large history",
                c.key
            );
        }
        for s in Source::ALL {
            let all = sent.get(&stream_name(c, s)).cloned().unwrap_or_default();
            let got = c.got.get(&s).cloned().unwrap_or_default();
            // each once, in order
            let mut sorted = got.clone();
            sorted.sort_unstable();
            sorted.dedup();
            prop_assert_eq!(
                &sorted,
                &got,
                "{} {:?}: duplicated or out of order",
                c.key,
                s
            );
            // nothing missing after the first one received, except across an
            // honest not-recovered answer
            if let Some(&first) = got.first() {
                let from = all.iter().position(|&x| x == first).unwrap();
                let want: Vec<u64> = all[from..].to_vec();
                if !c.skipped.contains_key(&s) {
                    prop_assert_eq!(&got, &want, "{} {:?}: missing pushes", c.key, s);
                } else {
                    prop_assert!(got.iter().all(|x| want.contains(x)));
                }
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn every_push_once_in_order_or_not_recovered(steps in proptest::collection::vec(step(), 1..120)) {
        run(steps, 1000, 1024, true)?;
    }

    #[test]
    fn small_history_and_queues_stay_honest(steps in proptest::collection::vec(step(), 1..120)) {
        run(steps, 4, 3, false)?;
    }
}
