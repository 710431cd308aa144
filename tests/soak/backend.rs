//! The backends: the calls they make, at a paced rate, and the log of what each
//! call was sent to and how it ended.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use quicpush::channel::PushOutcome;
use quicpush::registry::Tally;
use quicpush::rpc::proto::PushItem;
use quicpush::rpc::Client;
use rand::rngs::StdRng;
use rand::Rng;

use crate::body::{body, Kind, NO_TARGET};
use crate::ROOMS;
use crate::{key_of, room_name, BACKENDS, CALLS_PER_SEC, KEYS_PER_CALL, MIDS_PER_CALL, MIX, OP};

/// A backend call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Call {
    PushMsg,
    MPushMsg,
    MPushMsgs,
    PushUser,
    BroadcastRoom,
    Broadcast,
}

impl Call {
    /// The call for a draw in `0..1000`, by [`MIX`].
    fn pick(draw: u32) -> Call {
        let mut upto = 0;
        for (call, permille) in MIX {
            upto += permille;
            if draw < upto {
                return call;
            }
        }
        MIX[MIX.len() - 1].0
    }

    /// Calls per second of this kind, over all backends.
    pub(crate) fn rate(self) -> f64 {
        let permille = MIX.iter().find(|(c, _)| *c == self).map_or(0, |m| m.1);
        BACKENDS as f64 * CALLS_PER_SEC * f64::from(permille) / 1000.0
    }
}

/// Who a message was sent to and what the server answered.
#[derive(Debug, Clone)]
pub(crate) enum Target {
    /// PushMsg or one MPushMsgs message: the client and its outcome.
    Key {
        client: u32,
        outcome: PushOutcome,
    },
    /// MPushMsg: each client and its outcome.
    Keys(Vec<(u32, PushOutcome)>),
    User {
        mids: Vec<i64>,
        tally: Tally,
    },
    Room {
        room: u32,
        tally: Tally,
    },
    Broadcast,
}

#[derive(Debug, Clone)]
pub(crate) struct Sent {
    pub(crate) target: Target,
    pub(crate) sent_at: Instant,
    pub(crate) replied_at: Instant,
    /// The call failed: the push may or may not have happened.
    pub(crate) failed: bool,
}

#[derive(Debug, Default)]
pub(crate) struct BackendLog {
    /// Indexed by sequence number - 1.
    pub(crate) sent: Vec<Sent>,
    pub(crate) calls: HashMap<&'static str, u64>,
    pub(crate) errors: Vec<String>,
}

pub(crate) struct Backend {
    pub(crate) id: u8,
    pub(crate) rpc: Arc<Client>,
    pub(crate) clients: u32,
    pub(crate) until: Instant,
    pub(crate) max_calls: u64,
    pub(crate) rng: StdRng,
    pub(crate) log: BackendLog,
}

impl Backend {
    fn next_seq(&self) -> u32 {
        self.log.sent.len() as u32 + 1
    }

    fn record(&mut self, target: Target, sent_at: Instant, failed: bool) {
        self.log.sent.push(Sent {
            target,
            sent_at,
            replied_at: Instant::now(),
            failed,
        });
    }

    fn error(&mut self, method: &str, e: impl std::fmt::Display) {
        self.log
            .errors
            .push(format!("backend {} {method}: {e}", self.id));
    }

    /// A call's value, or (after recording the error) `on_error`; and whether it failed.
    fn settle<T, E: std::fmt::Display>(
        &mut self,
        method: &str,
        result: Result<T, E>,
        on_error: T,
    ) -> (T, bool) {
        match result {
            Ok(v) => (v, false),
            Err(e) => {
                self.error(method, e);
                (on_error, true)
            }
        }
    }

    fn random_client(&mut self) -> u32 {
        self.rng.gen_range(0..self.clients)
    }

    /// Pushes until `until`, `CALLS_PER_SEC` calls a second, one at a time, so each
    /// call's pushes are queued before the next call starts.
    pub(crate) async fn run(mut self) -> BackendLog {
        let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / CALLS_PER_SEC));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut calls = 0u64;
        while Instant::now() < self.until && calls < self.max_calls {
            tick.tick().await;
            calls += 1;
            match Call::pick(self.rng.gen_range(0..1000)) {
                Call::PushMsg => self.push_msg().await,
                Call::MPushMsg => self.mpush_msg().await,
                Call::MPushMsgs => self.mpush_msgs().await,
                Call::PushUser => self.push_user().await,
                Call::BroadcastRoom => self.broadcast_room().await,
                Call::Broadcast => self.broadcast().await,
            }
        }
        self.log
    }

    fn count(&mut self, method: &'static str) {
        *self.log.calls.entry(method).or_default() += 1;
    }

    async fn push_msg(&mut self) {
        self.count("PushMsg");
        let client = self.random_client();
        let seq = self.next_seq();
        let b = body(Kind::Key, self.id, seq, client);
        let at = Instant::now();
        let result = self.rpc.push_msg(key_of(client), OP, b).await;
        let (outcome, failed) = self.settle("PushMsg", result, PushOutcome::Delivered);
        self.record(Target::Key { client, outcome }, at, failed);
    }

    async fn mpush_msg(&mut self) {
        self.count("MPushMsg");
        let n = self.rng.gen_range(KEYS_PER_CALL).min(self.clients as usize);
        let clients: Vec<u32> = rand::seq::index::sample(&mut self.rng, self.clients as usize, n)
            .into_iter()
            .map(|c| c as u32)
            .collect();
        let seq = self.next_seq();
        let b = body(Kind::Keys, self.id, seq, NO_TARGET);
        let keys = clients.iter().map(|&c| key_of(c)).collect();
        let at = Instant::now();
        match self.rpc.mpush_msg(keys, OP, b).await {
            Ok(m) if m.outcomes.len() == clients.len() => {
                let t = Target::Keys(clients.into_iter().zip(m.outcomes).collect());
                self.record(t, at, false);
            }
            r => {
                self.error("MPushMsg", format!("{r:?}"));
                let t = Target::Keys(
                    clients
                        .into_iter()
                        .map(|c| (c, PushOutcome::Delivered))
                        .collect(),
                );
                self.record(t, at, true);
            }
        }
    }

    async fn mpush_msgs(&mut self) {
        self.count("MPushMsgs");
        let n = self.rng.gen_range(KEYS_PER_CALL);
        let first = self.next_seq();
        let clients: Vec<u32> = (0..n).map(|_| self.random_client()).collect();
        let msgs = clients
            .iter()
            .enumerate()
            .map(|(i, &c)| PushItem {
                key: key_of(c),
                op: OP,
                body: body(Kind::Item, self.id, first + i as u32, c),
            })
            .collect();
        let at = Instant::now();
        let (outcomes, failed) = match self.rpc.mpush_msgs(msgs).await {
            Ok(m) if m.outcomes.len() == n => (m.outcomes, false),
            r => {
                self.error("MPushMsgs", format!("{r:?}"));
                (vec![PushOutcome::Delivered; n], true)
            }
        };
        for (client, outcome) in clients.into_iter().zip(outcomes) {
            self.record(Target::Key { client, outcome }, at, failed);
        }
    }

    async fn push_user(&mut self) {
        self.count("PushUser");
        let users = (self.clients as usize).div_ceil(2);
        let n = self.rng.gen_range(MIDS_PER_CALL).min(users);
        let mids: Vec<i64> = rand::seq::index::sample(&mut self.rng, users, n)
            .into_iter()
            .map(|u| 1 + u as i64)
            .collect();
        let seq = self.next_seq();
        let b = body(Kind::User, self.id, seq, NO_TARGET);
        let at = Instant::now();
        let result = self.rpc.push_user(mids.clone(), OP, b).await;
        let (tally, failed) = self.settle("PushUser", result, Tally::default());
        self.record(Target::User { mids, tally }, at, failed);
    }

    async fn broadcast_room(&mut self) {
        self.count("BroadcastRoom");
        let room = self.rng.gen_range(0..ROOMS);
        let seq = self.next_seq();
        let b = body(Kind::Room, self.id, seq, room);
        let at = Instant::now();
        let result = self.rpc.broadcast_room(room_name(room), OP, b).await;
        let (tally, failed) = self.settle("BroadcastRoom", result, Tally::default());
        self.record(Target::Room { room, tally }, at, failed);
    }

    async fn broadcast(&mut self) {
        self.count("Broadcast");
        let seq = self.next_seq();
        let b = body(Kind::Broadcast, self.id, seq, NO_TARGET);
        let at = Instant::now();
        let result = self.rpc.broadcast(OP, b, 0).await.map(|_| ());
        let ((), failed) = self.settle("Broadcast", result, ());
        self.record(Target::Broadcast, at, failed);
    }
}
