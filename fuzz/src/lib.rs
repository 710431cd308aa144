//! Shared code of the fuzz targets: the session target's input format (a script of
//! client steps), the encoder the seed generator writes it with, and the harness
//! that plays a script against real sessions over in-memory connections.
//!
//! # Script format
//!
//! The first byte sets things up; every later step is a tag byte, `kind = tag & 15`
//! and `session = (tag >> 4) % sessions`, followed by the kind's operands. Input that
//! ends in the middle of a step reads as zeros, so every byte string is a script.
//!
//! | kind | step                 | operands                                  |
//! |------|----------------------|-------------------------------------------|
//! | 0    | Auth (valid token)   | who, room, seq                            |
//! | 1    | Heartbeat            | seq                                       |
//! | 2    | ChangeRoom           | seq, len, body                            |
//! | 3    | Sub                  | seq, len, body                            |
//! | 4    | Unsub                | seq, len, body                            |
//! | 5    | SendMsg              | seq, len, body                            |
//! | 6    | Raw                  | seq, n: the next n frame steps, nested    |
//! | 7    | any frame            | op (u32 BE), ver (u16 BE), seq, len, body |
//! | 8    | garbage bytes        | len, bytes                                |
//! | 9    | sleep `d * 50 ms`    | d                                         |
//! | 10   | client half-closes   |                                           |
//! | 11   | backend kicks a key  | who                                       |
//! | 12   | backend pushes       | who, room, how                            |
//! | 13   | server shuts down    |                                           |
//! | 14   | yield to the server  |                                           |
//! | 15   | client stops reading |                                           |

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use quicpush::auth::{self, Authenticator, Claims};
use quicpush::channel::{CloseReason, Transport};
use quicpush::protocol::{self, op, Frame};
use quicpush::registry::Registry;
use quicpush::session::{
    self, SessionContext, SessionEnd, SessionError, SessionLimits, WriteError,
};
use quicpush::shutdown::Shutdown;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream, ReadHalf, WriteHalf};

/// The HS256 secret of the JWT-mode sessions and the token target.
pub const SECRET: &[u8] = b"fuzz-secret-fuzz-secret-fuzz-sec";
/// Body limit of fuzzed sessions: room for a JWT, below the 255 bytes a script's
/// body can have, so that oversize frames are easy to reach.
pub const MAX_BODY: usize = 224;
/// Keys the scripts choose from (`who % 4`); the empty key gets a generated one.
pub const KEYS: [&str; 4] = ["", "a", "b", "c"];
/// Rooms the scripts choose from (`room % 3`); the empty room is no room.
pub const ROOMS: [&str; 3] = ["", "live://1", "live://2"];
/// How deep Raw frames nest inside Raw frames.
const MAX_RAW_DEPTH: usize = 4;
/// Bytes each way of an in-memory connection: small, so writers feel backpressure.
const PIPE_BYTES: usize = 1024;
/// No session may outlive this much (virtual) time after its script ended.
const HANG: Duration = Duration::from_secs(3600);

/// The first byte of a script.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Setup {
    /// 1..=3 concurrent sessions.
    pub sessions: usize,
    /// JWT tokens (else goim's open JSON).
    pub jwt: bool,
    /// Clients never read their replies.
    pub slow_clients: bool,
    /// A one-frame queue (else 8 frames).
    pub tiny_queue: bool,
    /// 5 frames per second (else 100000).
    pub low_rate: bool,
}

impl Setup {
    pub fn from_byte(b: u8) -> Setup {
        Setup {
            sessions: 1 + usize::from(b & 3) % 3,
            jwt: b & 4 != 0,
            slow_clients: b & 8 != 0,
            tiny_queue: b & 16 != 0,
            low_rate: b & 32 != 0,
        }
    }

    pub fn to_byte(self) -> u8 {
        (self.sessions.clamp(1, 3) as u8 - 1)
            | u8::from(self.jwt) << 2
            | u8::from(self.slow_clients) << 3
            | u8::from(self.tiny_queue) << 4
            | u8::from(self.low_rate) << 5
    }
}

/// One frame a client sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameStep {
    /// An Auth frame with a valid token for `KEYS[who % 4]`; `who >= 128` makes the
    /// token invalid (bad signature, or not JSON in open mode).
    Auth {
        who: u8,
        room: u8,
        seq: u8,
    },
    Heartbeat {
        seq: u8,
    },
    ChangeRoom {
        seq: u8,
        body: Vec<u8>,
    },
    Sub {
        seq: u8,
        body: Vec<u8>,
    },
    Unsub {
        seq: u8,
        body: Vec<u8>,
    },
    SendMsg {
        seq: u8,
        body: Vec<u8>,
    },
    Raw {
        seq: u8,
        frames: Vec<FrameStep>,
    },
    Any {
        op: u32,
        ver: u16,
        seq: u8,
        body: Vec<u8>,
    },
}

/// One step of a script.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Frame(FrameStep),
    Garbage(Vec<u8>),
    Sleep(u8),
    HalfClose,
    Kick { who: u8 },
    Push { who: u8, room: u8, how: u8 },
    Shutdown,
    Yield,
    StopReading,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub session: u8,
    pub action: Action,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Script {
    pub setup: Setup,
    pub steps: Vec<Step>,
}

struct Reader<'a> {
    data: &'a [u8],
}

impl Reader<'_> {
    fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    fn u8(&mut self) -> u8 {
        match self.data.split_first() {
            Some((&b, rest)) => {
                self.data = rest;
                b
            }
            None => 0,
        }
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let n = n.min(self.data.len());
        let (head, rest) = self.data.split_at(n);
        self.data = rest;
        head.to_vec()
    }

    fn body(&mut self) -> Vec<u8> {
        let n = self.u8();
        self.bytes(n.into())
    }

    fn u16(&mut self) -> u16 {
        u16::from_be_bytes([self.u8(), self.u8()])
    }

    fn u32(&mut self) -> u32 {
        u32::from_be_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }
}

fn is_frame_kind(kind: u8) -> bool {
    kind <= 7
}

/// The frame of a frame kind, its tag already read.
fn read_frame(kind: u8, r: &mut Reader<'_>, depth: usize) -> FrameStep {
    match kind {
        0 => FrameStep::Auth {
            who: r.u8(),
            room: r.u8(),
            seq: r.u8(),
        },
        1 => FrameStep::Heartbeat { seq: r.u8() },
        2 => FrameStep::ChangeRoom {
            seq: r.u8(),
            body: r.body(),
        },
        3 => FrameStep::Sub {
            seq: r.u8(),
            body: r.body(),
        },
        4 => FrameStep::Unsub {
            seq: r.u8(),
            body: r.body(),
        },
        5 => FrameStep::SendMsg {
            seq: r.u8(),
            body: r.body(),
        },
        6 => {
            let seq = r.u8();
            let n = r.u8();
            let mut frames = Vec::new();
            // Inner frames are tag + operands too; the tag's session bits are ignored.
            for _ in 0..n {
                if r.is_empty() {
                    break;
                }
                let kind = r.u8() & 15;
                if !is_frame_kind(kind) || (kind == 6 && depth >= MAX_RAW_DEPTH) {
                    break;
                }
                frames.push(read_frame(kind, r, depth + 1));
            }
            FrameStep::Raw { seq, frames }
        }
        _ => FrameStep::Any {
            op: r.u32(),
            ver: r.u16(),
            seq: r.u8(),
            body: r.body(),
        },
    }
}

impl Script {
    /// Reads a script; every byte string is one.
    pub fn parse(data: &[u8]) -> Script {
        let mut r = Reader { data };
        let setup = Setup::from_byte(r.u8());
        let mut steps = Vec::new();
        while !r.is_empty() {
            let tag = r.u8();
            let kind = tag & 15;
            let session = (tag >> 4) % setup.sessions as u8;
            let action = match kind {
                0..=7 => Action::Frame(read_frame(kind, &mut r, 0)),
                8 => Action::Garbage(r.body()),
                9 => Action::Sleep(r.u8()),
                10 => Action::HalfClose,
                11 => Action::Kick { who: r.u8() },
                12 => Action::Push {
                    who: r.u8(),
                    room: r.u8(),
                    how: r.u8(),
                },
                13 => Action::Shutdown,
                14 => Action::Yield,
                _ => Action::StopReading,
            };
            steps.push(Step { session, action });
        }
        Script { setup, steps }
    }

    /// The bytes [`Script::parse`] reads back as this script (bodies are cut to 255
    /// bytes): for writing seed files.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = vec![self.setup.to_byte()];
        for step in &self.steps {
            let s = step.session << 4;
            match &step.action {
                Action::Frame(f) => write_frame(&mut out, s, f),
                Action::Garbage(b) => {
                    out.push(s | 8);
                    put_body(&mut out, b);
                }
                Action::Sleep(d) => out.extend([s | 9, *d]),
                Action::HalfClose => out.push(s | 10),
                Action::Kick { who } => out.extend([s | 11, *who]),
                Action::Push { who, room, how } => out.extend([s | 12, *who, *room, *how]),
                Action::Shutdown => out.push(s | 13),
                Action::Yield => out.push(s | 14),
                Action::StopReading => out.push(s | 15),
            }
        }
        out
    }
}

fn put_body(out: &mut Vec<u8>, body: &[u8]) {
    let body = &body[..body.len().min(255)];
    out.push(body.len() as u8);
    out.extend_from_slice(body);
}

fn write_frame(out: &mut Vec<u8>, s: u8, f: &FrameStep) {
    match f {
        FrameStep::Auth { who, room, seq } => out.extend([s, *who, *room, *seq]),
        FrameStep::Heartbeat { seq } => out.extend([s | 1, *seq]),
        FrameStep::ChangeRoom { seq, body } => {
            out.extend([s | 2, *seq]);
            put_body(out, body);
        }
        FrameStep::Sub { seq, body } => {
            out.extend([s | 3, *seq]);
            put_body(out, body);
        }
        FrameStep::Unsub { seq, body } => {
            out.extend([s | 4, *seq]);
            put_body(out, body);
        }
        FrameStep::SendMsg { seq, body } => {
            out.extend([s | 5, *seq]);
            put_body(out, body);
        }
        FrameStep::Raw { seq, frames } => {
            out.extend([s | 6, *seq, frames.len().min(255) as u8]);
            for f in frames.iter().take(255) {
                write_frame(out, 0, f);
            }
        }
        FrameStep::Any { op, ver, seq, body } => {
            out.push(s | 7);
            out.extend(op.to_be_bytes());
            out.extend(ver.to_be_bytes());
            out.push(*seq);
            put_body(out, body);
        }
    }
}

/// The Auth body for `who` and `room` in this mode.
pub fn auth_body(jwt: bool, who: u8, room: u8) -> Vec<u8> {
    let key = KEYS[usize::from(who & 3)];
    let room = ROOMS[usize::from(room) % ROOMS.len()];
    // a user id for some, an accepts list for others
    let mid = (who & 4 != 0).then_some(i64::from(who & 3) + 1);
    let accepts: Vec<u32> = if who & 8 != 0 {
        vec![1000, 1001]
    } else {
        Vec::new()
    };
    let invalid = who & 128 != 0;
    if jwt {
        let claims = Claims {
            key: Some(key.to_owned()),
            mid,
            room_id: Some(room.to_owned()),
            platform: None,
            accepts,
            exp: auth::now_secs() + 3600,
        };
        let secret: &[u8] = if invalid {
            b"some-other-secret-some-other-sec"
        } else {
            SECRET
        };
        auth::issue(secret, &claims).unwrap().into_bytes()
    } else if invalid {
        br#"{"key":"a","#.to_vec()
    } else {
        let accepts: Vec<String> = accepts.iter().map(u32::to_string).collect();
        format!(
            r#"{{"mid":{},"key":"{key}","room_id":"{room}","platform":"fuzz","accepts":[{}]}}"#,
            mid.unwrap_or(0),
            accepts.join(",")
        )
        .into_bytes()
    }
}

fn encode_frame(jwt: bool, f: &FrameStep, dst: &mut BytesMut) {
    let plain = |op: u32, seq: &u8, body: &[u8], dst: &mut BytesMut| {
        Frame::new(op, u32::from(*seq), Bytes::copy_from_slice(body)).encode(dst)
    };
    match f {
        FrameStep::Auth { who, room, seq } => {
            plain(op::AUTH, seq, &auth_body(jwt, *who, *room), dst)
        }
        FrameStep::Heartbeat { seq } => plain(op::HEARTBEAT, seq, &[], dst),
        FrameStep::ChangeRoom { seq, body } => plain(op::CHANGE_ROOM, seq, body, dst),
        FrameStep::Sub { seq, body } => plain(op::SUB, seq, body, dst),
        FrameStep::Unsub { seq, body } => plain(op::UNSUB, seq, body, dst),
        FrameStep::SendMsg { seq, body } => plain(op::SEND_MSG, seq, body, dst),
        FrameStep::Raw { seq, frames } => {
            let mut inner = BytesMut::new();
            for f in frames {
                encode_frame(jwt, f, &mut inner);
            }
            plain(op::RAW, seq, &inner, dst)
        }
        FrameStep::Any { op, ver, seq, body } => Frame {
            ver: *ver,
            op: *op,
            seq: u32::from(*seq),
            body: Bytes::copy_from_slice(body),
        }
        .encode(dst),
    }
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap()
    })
}

/// What happened to one session.
#[derive(Debug)]
pub struct SessionOutcome {
    pub result: Result<SessionEnd, SessionError>,
    /// The frames the client read, when it read.
    pub replies: Option<Vec<Frame>>,
}

/// The client's side of one session.
struct Client {
    write: Option<WriteHalf<DuplexStream>>,
    read: Option<ReadHalf<DuplexStream>>,
    drain: Option<tokio::task::JoinHandle<Vec<u8>>>,
    session: tokio::task::JoinHandle<Result<SessionEnd, SessionError>>,
}

/// Plays `script` against real sessions and checks what must hold afterwards: every
/// session ended, nothing is left in the registry, and what each client read is
/// whole frames beginning with AuthReply. Panics on a violation.
pub fn run_script(script: &Script) -> Vec<SessionOutcome> {
    runtime().block_on(play(script))
}

fn resume<T>(r: Result<T, tokio::task::JoinError>) -> T {
    match r {
        Ok(v) => v,
        Err(e) => match e.try_into_panic() {
            Ok(p) => std::panic::resume_unwind(p),
            Err(e) => panic!("task cancelled: {e}"),
        },
    }
}

async fn play(script: &Script) -> Vec<SessionOutcome> {
    let setup = script.setup;
    // History on for every source, so resume requests in fuzzed Auth bodies and
    // the replay paths are exercised too.
    let history = quicpush::history::History::from_config(&quicpush::config::HistoryConfig {
        room: true,
        all: true,
        ..Default::default()
    });
    let registry = Arc::new(Registry::with_history(4, usize::MAX, history));
    let shutdown = Shutdown::new();
    let ctx = Arc::new(SessionContext {
        registry: registry.clone(),
        auth: if setup.jwt {
            Authenticator::jwt(SECRET)
        } else {
            Authenticator::Open
        },
        limits: SessionLimits {
            max_body: MAX_BODY,
            handshake_timeout: Duration::from_secs(5),
            heartbeat_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(1),
            queue_size: if setup.tiny_queue { 1 } else { 8 },
            queue_bytes: if setup.tiny_queue { MAX_BODY + 32 } else { 64 * 1024 },
            slow_consumer_timeout: Duration::from_millis(500),
            max_frames_per_sec: if setup.low_rate { 5 } else { 100_000 },
            write_coalesce: Duration::ZERO,
        },
        shutdown: shutdown.clone(),
        // Counting on: every way a session ends goes through the classification.
        metrics: Arc::new(quicpush::metrics::Metrics::new()),
        shared_keys: None,
    });

    let mut clients: Vec<Client> = (0..setup.sessions)
        .map(|_| {
            let (client, server) = tokio::io::duplex(PIPE_BYTES);
            let (server_read, server_write) = tokio::io::split(server);
            let session = tokio::spawn(session::run(
                ctx.clone(),
                server_read,
                server_write,
                Transport::Tcp,
                None,
            ));
            let (mut read, write) = tokio::io::split(client);
            let (read, drain) = if setup.slow_clients {
                (Some(read), None)
            } else {
                let drain = tokio::spawn(async move {
                    let mut out = Vec::new();
                    let _ = read.read_to_end(&mut out).await;
                    out
                });
                (None, Some(drain))
            };
            Client {
                write: Some(write),
                read,
                drain,
                session,
            }
        })
        .collect();

    let mut buf = BytesMut::new();
    for step in &script.steps {
        let client = &mut clients[usize::from(step.session)];
        buf.clear();
        match &step.action {
            Action::Frame(f) => encode_frame(setup.jwt, f, &mut buf),
            Action::Garbage(b) => buf.extend_from_slice(b),
            Action::Sleep(d) => tokio::time::sleep(Duration::from_millis(50) * u32::from(*d)).await,
            Action::HalfClose => {
                if let Some(mut w) = client.write.take() {
                    let _ = w.shutdown().await;
                }
            }
            Action::Kick { who } => {
                registry.kick(KEYS[usize::from(who & 3)]);
            }
            Action::Push { who, room, how } => {
                let pushed = 1000 + u32::from(how & 3);
                let frame = Frame::new(pushed, 0, Bytes::from_static(b"push")).to_bytes();
                match how >> 2 & 3 {
                    0 => {
                        registry.push_key(KEYS[usize::from(who & 3)], pushed, &frame);
                    }
                    1 => {
                        registry.push_room(ROOMS[usize::from(*room) % ROOMS.len()], pushed, &frame);
                    }
                    2 => {
                        registry.push_users(&[i64::from(who & 3) + 1], pushed, &frame);
                    }
                    _ => {
                        let meta = registry.append_broadcast(&frame);
                        for b in 0..registry.bucket_count() {
                            registry.push_bucket(b, pushed, &frame, meta);
                        }
                    }
                }
            }
            Action::Shutdown => {
                // as the server does: signal, then close every channel
                shutdown.cancel();
                registry.close_all(CloseReason::Shutdown);
            }
            Action::Yield => {
                for _ in 0..4 {
                    tokio::task::yield_now().await;
                }
            }
            Action::StopReading => {
                client.read = None;
                if let Some(d) = client.drain.take() {
                    d.abort();
                }
            }
        }
        if !buf.is_empty() {
            if let Some(w) = client.write.as_mut() {
                match tokio::time::timeout(HANG, w.write_all(&buf)).await {
                    Ok(Ok(())) => {}
                    // the session ended and dropped its reader
                    Ok(Err(_)) => client.write = None,
                    Err(_) => panic!("the server read nothing for {HANG:?}"),
                }
            }
        }
        tokio::task::yield_now().await;
    }

    let mut outcomes = Vec::new();
    for c in &mut clients {
        if let Some(mut w) = c.write.take() {
            let _ = w.shutdown().await;
        }
    }
    for c in clients {
        let result = match tokio::time::timeout(HANG, c.session).await {
            Ok(r) => resume(r),
            Err(_) => panic!("a session outlived its client's input by {HANG:?}"),
        };
        if let Err(SessionError::Write(WriteError::Task(e))) = &result {
            panic!("the writer task failed: {e}");
        }
        drop(c.read);
        let replies = match c.drain {
            Some(d) => match tokio::time::timeout(HANG, d).await {
                Ok(Ok(bytes)) => Some(bytes),
                Ok(Err(e)) if e.is_cancelled() => None,
                Ok(Err(e)) => resume(Err(e)),
                Err(_) => panic!("a session's output did not end"),
            },
            None => None,
        };
        let replies = replies.map(|bytes| check_replies(&result, bytes));
        outcomes.push(SessionOutcome { result, replies });
    }

    let online = registry.online();
    assert_eq!(
        online.total, 0,
        "left online after every session ended: {online:?}"
    );
    assert!(
        registry.rooms().is_empty(),
        "rooms left: {:?}",
        registry.rooms()
    );
    outcomes
}

/// What a client read: whole frames after a clean end, AuthReply first, and
/// DisconnectReply last when the server closed the session.
fn check_replies(result: &Result<SessionEnd, SessionError>, bytes: Vec<u8>) -> Vec<Frame> {
    let mut buf = BytesMut::from(&bytes[..]);
    let mut frames = Vec::new();
    // Resume-capable sessions' pushes carry the 32-byte header.
    while let Ok(Some((f, _))) = protocol::decode_server(&mut buf, protocol::MAX_BODY_LIMIT) {
        frames.push(f);
    }
    // A slow consumer's connection is dropped mid-write, without DisconnectReply.
    let slow = matches!(
        result,
        Ok(SessionEnd::ServerClosed(CloseReason::SlowConsumer))
    );
    if let (Ok(end), false) = (result, slow) {
        assert!(
            buf.is_empty(),
            "{} bytes of a partial frame after {end:?}",
            buf.len()
        );
        if let Some(first) = frames.first() {
            assert_eq!(first.op, op::AUTH_REPLY, "first reply");
        }
        if matches!(end, SessionEnd::ServerClosed(_)) {
            if let Some(last) = frames.last() {
                assert_eq!(last.op, op::DISCONNECT_REPLY, "last reply after {end:?}");
            }
        }
    }
    frames
}
