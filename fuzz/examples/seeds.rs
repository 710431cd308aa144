//! Writes the seed corpora under `fuzz/corpus/<target>/seed-*`: real frames, tokens,
//! RPC messages, configuration files and session scripts. Each session script is
//! played once here, and the ones meant to authenticate are checked to do so.
//!
//! Run from the repository root: `cargo run --manifest-path fuzz/Cargo.toml --example seeds`.

use std::path::{Path, PathBuf};

use bytes::{Bytes, BytesMut};
use quicpush::auth::{self, Claims};
use quicpush::codec;
use quicpush::protocol::{self, op, Frame};
use quicpush::rpc::proto::{PushItem, Request};
use quicpush_fuzz::{auth_body, run_script, Action, FrameStep, Script, Setup, Step, SECRET};

fn corpus(target: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target);
    std::fs::create_dir_all(&dir).unwrap();
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        if p.file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("seed-")
        {
            std::fs::remove_file(p).unwrap();
        }
    }
    dir
}

fn write(dir: &Path, name: &str, bytes: &[u8]) {
    std::fs::write(dir.join(format!("seed-{name}")), bytes).unwrap();
}

fn frames(fs: &[Frame]) -> Vec<u8> {
    let mut b = BytesMut::new();
    for f in fs {
        f.encode(&mut b);
    }
    b.to_vec()
}

fn frame_decoder() {
    let dir = corpus("frame_decoder");
    // prefix: max_body (u16 BE) and the chunk size of the second pass
    let with = |max: u16, chunk: u8, body: &[u8]| {
        let mut v = max.to_be_bytes().to_vec();
        v.push(chunk);
        v.extend_from_slice(body);
        v
    };
    let auth = Frame::new(op::AUTH, 1, auth_body(false, 1, 1));
    let hb = Frame::new(op::HEARTBEAT, 2, Bytes::new());
    let msg = Frame::new(op::SEND_MSG, 3, &b"hello"[..]);
    let raw = Frame::new(op::RAW, 4, protocol::join_raw(&[hb.clone(), msg.clone()]));
    write(
        &dir,
        "auth",
        &with(4096, 7, &frames(std::slice::from_ref(&auth))),
    );
    write(
        &dir,
        "three",
        &with(4096, 5, &frames(&[auth, hb.clone(), msg.clone()])),
    );
    write(&dir, "raw", &with(4096, 16, &frames(&[raw])));
    let whole = frames(std::slice::from_ref(&msg));
    write(&dir, "truncated", &with(4096, 3, &whole[..whole.len() - 2]));
    write(&dir, "oversize", &with(4, 1, &whole));
    let mut bad = frames(&[hb]);
    bad[5] = 17;
    write(&dir, "bad-header-len", &with(4096, 8, &bad));
}

fn rpc_request() {
    let dir = corpus("rpc_request");
    let body = Bytes::from_static(b"{\"m\":1}");
    let requests = [
        ("ping", Request::Ping),
        (
            "push-msg",
            Request::PushMsg {
                key: "k1".into(),
                op: 1000,
                body: body.clone(),
            },
        ),
        (
            "mpush-msg",
            Request::MPushMsg {
                keys: vec!["k1".into(), "k2".into()],
                op: 1000,
                body: body.clone(),
            },
        ),
        (
            "mpush-msgs",
            Request::MPushMsgs {
                msgs: vec![
                    PushItem {
                        key: "k1".into(),
                        op: 1000,
                        body: body.clone(),
                    },
                    PushItem {
                        key: "k2".into(),
                        op: 1001,
                        body: Bytes::new(),
                    },
                ],
            },
        ),
        (
            "push-user",
            Request::PushUser {
                mids: vec![1, -2, 300000],
                op: 1000,
                body: body.clone(),
            },
        ),
        (
            "broadcast",
            Request::Broadcast {
                op: 1000,
                body: body.clone(),
                speed: 500,
            },
        ),
        (
            "broadcast-room",
            Request::BroadcastRoom {
                room: "live://1000".into(),
                op: 1000,
                body,
            },
        ),
        ("rooms", Request::Rooms),
        ("online", Request::Online),
        ("kick", Request::Kick { key: "k1".into() }),
    ];
    for (name, req) in requests {
        let mut b = BytesMut::new();
        codec::write_message(&mut b, 42, &req).unwrap();
        write(&dir, name, &b);
    }
}

fn token() {
    let dir = corpus("token");
    // expires in 2100, so the seed stays a valid token
    let claims = Claims {
        key: Some("k1".into()),
        mid: Some(42),
        room_id: Some("live://1000".into()),
        platform: Some("web".into()),
        accepts: vec![1000, 1001],
        exp: 4_102_444_800,
    };
    write(
        &dir,
        "jwt",
        auth::issue(SECRET, &claims).unwrap().as_bytes(),
    );
    let expired = Claims {
        exp: 1_000_000_000,
        ..claims.clone()
    };
    write(
        &dir,
        "jwt-expired",
        auth::issue(SECRET, &expired).unwrap().as_bytes(),
    );
    write(
        &dir,
        "jwt-other-secret",
        auth::issue(b"another-secret-another-secret-xx", &claims)
            .unwrap()
            .as_bytes(),
    );
    write(
        &dir,
        "jwt-alg-none",
        b"eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJrZXkiOiJrIiwiZXhwIjo5OTk5OTk5OTk5fQ.",
    );
    write(
        &dir,
        "open",
        br#"{"mid":123,"key":"","room_id":"live://1000","platform":"web","accepts":[1000,1001,1002]}"#,
    );
    write(&dir, "open-minimal", br#" {"key":"k"} "#);
    // claims alone: the target also signs its input and verifies that
    write(
        &dir,
        "claims",
        br#"{"key":"k1","mid":42,"room_id":"live://1","accepts":[1000,1001],"exp":4102444800}"#,
    );
}

fn config() {
    let dir = corpus("config");
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    write(
        &dir,
        "quicpush.toml",
        &std::fs::read(root.join("config/quicpush.toml")).unwrap(),
    );
    write(&dir, "empty", b"");
    write(
        &dir,
        "overrides",
        b"[client]\nmax_body = 65536\nheartbeat_timeout = \"30s\"\ntcp_bind = [\"[::1]:3101\"]\n[auth]\nmode = \"open\"\n[quic]\nkeep_alive_interval = \"1m 30s\"\n",
    );
    write(&dir, "invalid", b"[registry]\nbuckets = 12\n");
}

fn frame(f: FrameStep) -> Action {
    Action::Frame(f)
}

fn on(session: u8, action: Action) -> Step {
    Step { session, action }
}

fn session() {
    let dir = corpus("session");
    let one = Setup {
        sessions: 1,
        ..Setup::default()
    };
    let auth = |who, room| frame(FrameStep::Auth { who, room, seq: 1 });
    let body = |s: &str| s.as_bytes().to_vec();
    // (name, script, which sessions must get an AuthReply)
    let scripts: Vec<(&str, Script, Vec<usize>)> = vec![
        (
            "open-every-op",
            Script {
                setup: one,
                steps: vec![
                    on(0, auth(1, 1)),
                    on(0, frame(FrameStep::Heartbeat { seq: 2 })),
                    on(
                        0,
                        frame(FrameStep::ChangeRoom {
                            seq: 3,
                            body: body("live://2"),
                        }),
                    ),
                    on(
                        0,
                        frame(FrameStep::Sub {
                            seq: 4,
                            body: body("1000,1001"),
                        }),
                    ),
                    on(
                        0,
                        frame(FrameStep::Unsub {
                            seq: 5,
                            body: body("1001"),
                        }),
                    ),
                    on(
                        0,
                        frame(FrameStep::SendMsg {
                            seq: 6,
                            body: body("hi"),
                        }),
                    ),
                    on(
                        0,
                        frame(FrameStep::Raw {
                            seq: 7,
                            frames: vec![
                                FrameStep::Heartbeat { seq: 8 },
                                FrameStep::SendMsg {
                                    seq: 9,
                                    body: body("x"),
                                },
                            ],
                        }),
                    ),
                    on(
                        0,
                        frame(FrameStep::Any {
                            op: 1000,
                            ver: 1,
                            seq: 10,
                            body: body("?"),
                        }),
                    ),
                ],
            },
            vec![0],
        ),
        (
            "jwt-push",
            Script {
                setup: Setup { jwt: true, ..one },
                steps: vec![
                    on(0, auth(1 | 4, 1)),
                    on(0, Action::Yield),
                    on(
                        0,
                        Action::Push {
                            who: 1,
                            room: 1,
                            how: 0,
                        },
                    ),
                    on(
                        0,
                        Action::Push {
                            who: 1,
                            room: 1,
                            how: 4,
                        },
                    ),
                    on(
                        0,
                        Action::Push {
                            who: 1,
                            room: 1,
                            how: 8,
                        },
                    ),
                    on(
                        0,
                        Action::Push {
                            who: 1,
                            room: 1,
                            how: 12,
                        },
                    ),
                    on(0, frame(FrameStep::Heartbeat { seq: 2 })),
                ],
            },
            vec![0],
        ),
        (
            "replaced",
            Script {
                setup: Setup { sessions: 2, ..one },
                steps: vec![
                    on(0, auth(2, 1)),
                    on(0, Action::Yield),
                    on(1, auth(2, 2)),
                    on(1, Action::Yield),
                    on(0, frame(FrameStep::Heartbeat { seq: 2 })),
                    on(1, frame(FrameStep::Heartbeat { seq: 2 })),
                ],
            },
            vec![0, 1],
        ),
        (
            "kick-and-shutdown",
            Script {
                setup: Setup { sessions: 3, ..one },
                steps: vec![
                    on(0, auth(1, 1)),
                    on(1, auth(2, 1)),
                    on(2, auth(3, 2)),
                    on(0, Action::Yield),
                    on(0, Action::Kick { who: 1 }),
                    on(0, Action::Yield),
                    on(1, Action::Shutdown),
                ],
            },
            vec![0, 1, 2],
        ),
        (
            "slow-client",
            Script {
                setup: Setup {
                    slow_clients: true,
                    tiny_queue: true,
                    ..one
                },
                steps: vec![
                    on(0, auth(1, 0)),
                    on(0, frame(FrameStep::Heartbeat { seq: 2 })),
                    on(0, frame(FrameStep::Heartbeat { seq: 3 })),
                    on(
                        0,
                        Action::Push {
                            who: 1,
                            room: 0,
                            how: 0,
                        },
                    ),
                    on(0, Action::Sleep(40)),
                ],
            },
            vec![],
        ),
        (
            "rate-limited",
            Script {
                setup: Setup {
                    low_rate: true,
                    ..one
                },
                steps: std::iter::once(on(0, auth(1, 0)))
                    .chain((0..12).map(|i| on(0, frame(FrameStep::Heartbeat { seq: i }))))
                    .collect(),
            },
            vec![0],
        ),
        (
            "timeouts",
            Script {
                setup: Setup { sessions: 2, ..one },
                steps: vec![
                    on(0, auth(1, 0)),
                    on(1, Action::Sleep(120)),
                    on(0, Action::Sleep(250)),
                ],
            },
            vec![0],
        ),
        (
            "bad-input",
            Script {
                setup: Setup { sessions: 3, ..one },
                steps: vec![
                    on(
                        0,
                        Action::Garbage(vec![0, 0, 0, 16, 0, 17, 0, 1, 0, 0, 0, 2, 0, 0, 0, 1]),
                    ),
                    on(1, auth(1 | 128, 0)),
                    on(2, auth(2, 0)),
                    on(
                        2,
                        frame(FrameStep::ChangeRoom {
                            seq: 2,
                            body: vec![0xff],
                        }),
                    ),
                ],
            },
            vec![2],
        ),
        (
            "half-close-and-stop-reading",
            Script {
                setup: Setup { sessions: 2, ..one },
                steps: vec![
                    on(0, auth(1, 1)),
                    on(1, auth(2, 1)),
                    on(0, Action::HalfClose),
                    on(1, Action::StopReading),
                    on(1, frame(FrameStep::Heartbeat { seq: 2 })),
                ],
            },
            vec![0],
        ),
    ];
    for (name, script, authed) in scripts {
        let bytes = script.to_bytes();
        assert_eq!(Script::parse(&bytes), script, "{name} reads back");
        let outcomes = run_script(&script);
        for (i, o) in outcomes.iter().enumerate() {
            let ops: Option<Vec<u32>> =
                o.replies.as_ref().map(|r| r.iter().map(|f| f.op).collect());
            println!("session/{name}[{i}]: {:?}, reply ops {ops:?}", o.result);
        }
        for i in authed {
            let replies = outcomes[i].replies.as_ref().expect("a reading client");
            assert_eq!(
                replies.first().map(|f| f.op),
                Some(op::AUTH_REPLY),
                "{name}: session {i} authenticates: {:?}",
                outcomes[i]
            );
        }
        write(&dir, name, &bytes);
    }
}

fn main() {
    frame_decoder();
    rpc_request();
    token();
    config();
    session();
    println!("seeds written under {}/corpus", env!("CARGO_MANIFEST_DIR"));
}
