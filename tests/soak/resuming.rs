//! The resuming clients: connections lost and resumed, with the positions read so
//! far.

use std::ops::AddAssign;
use std::sync::Arc;
use std::time::{Duration, Instant};

use quicpush::protocol::op;
use quicpush::rpc::Client;
use rand::rngs::StdRng;
use rand::Rng;

use crate::common::Via;
use crate::conn::{Conn, Dial, Ending, Loss};
use crate::fleet::jitter;
use crate::seen::{Got, Seen};
use crate::{key_of, END_WAIT, OP, RESUMING_AWAY, RESUMING_STAY};

/// What a resuming client did over its life.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct ResumeCounts {
    pub(crate) connects: u64,
    /// Connections after the first: each resumed.
    pub(crate) resumes: u64,
    /// Resumes whose every source was recovered.
    pub(crate) recovered: u64,
    /// Sources AuthReply answered "not recovered".
    pub(crate) not_recovered: u64,
    pub(crate) abrupt: u64,
    pub(crate) graceful: u64,
    pub(crate) replaced: u64,
    pub(crate) kicked: u64,
    /// Connections the server closed with DisconnectReply on its own (an overflow).
    pub(crate) server_closed: u64,
    /// Pushes received as a replay.
    pub(crate) replayed: u64,
    /// Pushes a replaced connection still delivered, not taken: the connection that
    /// replaced it resumed before them.
    pub(crate) discarded: u64,
    /// From the last frame read on a lost connection to the next AuthReply.
    pub(crate) outage_max: Duration,
    pub(crate) outage_total: Duration,
}

impl AddAssign<&ResumeCounts> for ResumeCounts {
    fn add_assign(&mut self, o: &ResumeCounts) {
        self.connects += o.connects;
        self.resumes += o.resumes;
        self.recovered += o.recovered;
        self.not_recovered += o.not_recovered;
        self.abrupt += o.abrupt;
        self.graceful += o.graceful;
        self.replaced += o.replaced;
        self.kicked += o.kicked;
        self.server_closed += o.server_closed;
        self.replayed += o.replayed;
        self.discarded += o.discarded;
        self.outage_max = self.outage_max.max(o.outage_max);
        self.outage_total += o.outage_total;
    }
}

pub(crate) struct ResumeReport {
    pub(crate) seen: Seen,
    /// The room it stayed in.
    pub(crate) room: u32,
    pub(crate) counts: ResumeCounts,
}

/// How reading a resuming connection ended.
#[derive(Debug, PartialEq, Eq)]
enum Read {
    /// The time to stop reading came.
    Time,
    /// The end marker arrived.
    End,
    /// The server ended the stream; whether DisconnectReply came first.
    Closed { disconnect: bool },
    /// Reading failed (noted as unexpected).
    Failed,
}

/// Reads a resuming connection until `until`, the end marker, or its end.
async fn read_until(seen: &mut Seen, conn: &mut Conn, until: Instant) -> Read {
    let mut disconnect = false;
    loop {
        loop {
            match conn.next_frame() {
                Ok(Some((f, meta))) => {
                    if seen.handle(conn, &f, meta) == Got::Disconnect {
                        disconnect = true;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    seen.unexpected(e);
                    return Read::Failed;
                }
            }
        }
        if seen.end {
            return Read::End;
        }
        if Instant::now() >= until {
            return Read::Time;
        }
        tokio::select! {
            r = conn.fill() => match r {
                Ok(true) => {}
                Ok(false) => return Read::Closed { disconnect },
                Err(e) => {
                    seen.unexpected(e);
                    return Read::Failed;
                }
            },
            _ = tokio::time::sleep_until(tokio::time::Instant::from_std(until)) => {}
        }
    }
}

/// Reads a replaced resuming connection to its end, checking its push seq and
/// that it ends with DisconnectReply, without taking its pushes: the connection
/// that replaced it resumed from what had been read before, so it delivers them.
async fn drain_discarding(seen: &mut Seen, mut old: Conn) -> u64 {
    let mut discarded = 0;
    let drain = async {
        let mut disconnect = false;
        loop {
            loop {
                match old.next_frame() {
                    Ok(Some((f, _))) => match f.op {
                        OP => {
                            seen.check_seq(&mut old, &f);
                            discarded += 1;
                        }
                        op::DISCONNECT_REPLY => disconnect = true,
                        op::HEARTBEAT_REPLY => {}
                        other => seen.unexpected(format!("op {other} on a replaced connection")),
                    },
                    Ok(None) => break,
                    Err(e) => return Err(e),
                }
            }
            match old.fill().await {
                Ok(true) => {}
                // a reset after the last bytes is how some replaced connections end
                Ok(false) | Err(_) => return Ok(disconnect),
            }
        }
    };
    let result = tokio::time::timeout(Duration::from_secs(10), drain).await;
    match result {
        Ok(Ok(true)) => {}
        Ok(Ok(false)) => {
            seen.unexpected("replaced resuming connection ended without DisconnectReply".into())
        }
        Ok(Err(e)) => seen.unexpected(format!("replaced resuming connection: {e}")),
        Err(_) => seen.unexpected("replaced resuming connection still open after 10 s".into()),
    }
    old.close(Ending::Abrupt).await;
    discarded
}

fn random_via(rng: &mut StdRng) -> Via {
    if rng.gen_bool(0.5) {
        Via::Tcp
    } else {
        Via::Quic
    }
}

/// A resuming client's first connection: no position yet.
pub(crate) async fn first_resuming(
    dial: &Dial,
    me: u32,
    room: u32,
    rng: &mut StdRng,
) -> (Conn, Loss, Seen) {
    let loss = Loss::random(rng);
    let via = random_via(rng);
    let mut seen = Seen::resuming(me);
    let (conn, reply) = dial
        .connect_resume(me, via, room, loss.ending(), &mut seen.track().state)
        .await
        .unwrap_or_else(|e| panic!("resuming client {me}: {e}"));
    if let Err(e) = seen.track().connected(me, &reply) {
        seen.unexpected(e);
    }
    (conn, loss, seen)
}

/// Connects and resumes from the client's positions, over either transport,
/// retrying until it works or `give_up`; notes the outage since `lost_at`.
#[allow(clippy::too_many_arguments)]
async fn resume_conn(
    me: u32,
    dial: &Dial,
    room: u32,
    loss: Loss,
    seen: &mut Seen,
    counts: &mut ResumeCounts,
    lost_at: Instant,
    give_up: Instant,
    rng: &mut StdRng,
) -> Option<Conn> {
    loop {
        let via = random_via(rng);
        let state = &mut seen.track().state;
        match dial
            .connect_resume(me, via, room, loss.ending(), state)
            .await
        {
            Ok((conn, reply)) => {
                let outage = lost_at.elapsed();
                counts.connects += 1;
                counts.resumes += 1;
                counts.outage_max = counts.outage_max.max(outage);
                counts.outage_total += outage;
                if let Err(e) = seen.track().connected(me, &reply) {
                    seen.unexpected(e);
                }
                return Some(conn);
            }
            Err(e) => {
                seen.unexpected(format!("resume: {e}"));
                if Instant::now() >= give_up {
                    return None;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

/// A resuming client: stays in `room` and keeps one [`ResumeState`] for its life.
/// Until `until` it reads a connection for a while, then loses it (abruptly or
/// gracefully without reading what is queued, replaced by its own next connection,
/// or kicked), and resumes on a new one over either transport; then it reads its
/// last connection until the end marker.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn run_resuming(
    me: u32,
    dial: Arc<Dial>,
    kicker: Arc<Client>,
    room: u32,
    first: (Conn, Loss),
    mut seen: Seen,
    until: Instant,
    mut rng: StdRng,
) -> ResumeReport {
    let give_up = until + END_WAIT;
    let mut counts = ResumeCounts {
        connects: 1,
        ..ResumeCounts::default()
    };
    let (mut conn, mut loss) = first;
    loop {
        let last = Instant::now() >= until;
        let leave_at = if last {
            give_up
        } else {
            (Instant::now() + jitter(&mut rng, RESUMING_STAY.0, RESUMING_STAY.1)).min(until)
        };
        let read = read_until(&mut seen, &mut conn, leave_at).await;
        let mut lost_at = Instant::now();
        match read {
            Read::End => break,
            Read::Time if last => {
                seen.unexpected("no end marker".into());
                break;
            }
            Read::Time => match loss {
                Loss::Abrupt => counts.abrupt += 1,
                Loss::Graceful => counts.graceful += 1,
                Loss::Kicked => {
                    counts.kicked += 1;
                    match kicker.kick(key_of(me)).await {
                        Ok(true) => {}
                        r => seen.unexpected(format!("kick: {r:?}")),
                    }
                    // what was queued, DisconnectReply, the end of the stream
                    let until = Instant::now() + Duration::from_secs(10);
                    match read_until(&mut seen, &mut conn, until).await {
                        Read::Closed { disconnect: true } => {}
                        Read::End => break,
                        other => seen.unexpected(format!("kicked connection: {other:?}")),
                    }
                    lost_at = Instant::now();
                }
                Loss::Replaced => {
                    counts.replaced += 1;
                    loss = Loss::random(&mut rng);
                    let next = resume_conn(
                        me,
                        &dial,
                        room,
                        loss,
                        &mut seen,
                        &mut counts,
                        lost_at,
                        give_up,
                        &mut rng,
                    )
                    .await;
                    let Some(next) = next else { break };
                    let old = std::mem::replace(&mut conn, next);
                    counts.discarded += drain_discarding(&mut seen, old).await;
                    continue;
                }
            },
            Read::Closed { disconnect } => {
                counts.server_closed += 1;
                if !disconnect {
                    seen.unexpected("resuming connection ended without DisconnectReply".into());
                }
            }
            Read::Failed => {}
        }
        conn.close(loss.ending()).await;
        tokio::time::sleep(jitter(&mut rng, RESUMING_AWAY.0, RESUMING_AWAY.1)).await;
        loss = Loss::random(&mut rng);
        let next = resume_conn(
            me,
            &dial,
            room,
            loss,
            &mut seen,
            &mut counts,
            lost_at,
            give_up,
            &mut rng,
        )
        .await;
        match next {
            Some(next) => conn = next,
            None => {
                // never reconnected: nothing left to close
                let track = seen.track();
                counts.replayed = track.replayed;
                counts.recovered = track.state.recovered;
                counts.not_recovered = track.state.not_recovered;
                return ResumeReport { seen, room, counts };
            }
        }
    }
    conn.close(Ending::Graceful).await;
    let track = seen.track();
    counts.replayed = track.replayed;
    counts.recovered = track.state.recovered;
    counts.not_recovered = track.state.not_recovered;
    ResumeReport { seen, room, counts }
}
