//! The stable and the churning clients, and the rooms and stays they pick.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use quicpush::protocol::op;
use rand::rngs::StdRng;
use rand::Rng;

use crate::common::Via;
use crate::conn::{Conn, Dial, Ending};
use crate::seen::{Got, Seen};
use crate::END_WAIT;
use crate::ROOMS;

/// Picks the next room: one of the rooms, or none now and then.
fn random_room(rng: &mut StdRng) -> Option<u32> {
    (rng.gen_range(0..10) > 0).then(|| rng.gen_range(0..ROOMS))
}

pub(crate) fn jitter(rng: &mut StdRng, lo: f64, hi: f64) -> Duration {
    Duration::from_secs_f64(rng.gen_range(lo..hi))
}

/// A room a stable client was in, from when the server had certainly moved it there
/// until it asked to leave.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Stay {
    pub(crate) room: Option<u32>,
    pub(crate) from: Instant,
    pub(crate) to: Instant,
}

pub(crate) struct StableReport {
    pub(crate) seen: Seen,
    pub(crate) stays: Vec<Stay>,
}

/// A stable client: reads everything until the end marker, changing rooms now and
/// then until `until`, then closes.
pub(crate) async fn run_stable(
    me: u32,
    mut conn: Conn,
    registered: Instant,
    until: Instant,
    mut rng: StdRng,
) -> StableReport {
    let mut seen = Seen::new(me);
    let mut stays = Vec::new();
    let mut since = registered;
    let give_up = tokio::time::Instant::from_std(until + END_WAIT);
    let mut next_change = Instant::now() + jitter(&mut rng, 2.0, 10.0);
    let mut next_beat = Instant::now() + jitter(&mut rng, 10.0, 30.0);
    'run: loop {
        loop {
            match conn.next_frame() {
                Ok(Some((f, meta))) => match seen.handle(&mut conn, &f, meta) {
                    Got::RoomChanged => since = Instant::now(),
                    Got::Disconnect => {
                        seen.unexpected("DisconnectReply on a stable connection".into());
                        break 'run;
                    }
                    Got::Push | Got::Other => {}
                },
                Ok(None) => break,
                Err(e) => {
                    seen.unexpected(e);
                    break 'run;
                }
            }
        }
        if seen.end {
            break;
        }
        let wake = next_change.min(next_beat);
        tokio::select! {
            r = conn.fill() => match r {
                Ok(true) => {}
                Ok(false) => {
                    seen.unexpected("server closed a stable connection".into());
                    break;
                }
                Err(e) => {
                    seen.unexpected(e);
                    break;
                }
            },
            _ = tokio::time::sleep_until(tokio::time::Instant::from_std(wake)) => {
                let now = Instant::now();
                if now >= next_beat {
                    next_beat = now + jitter(&mut rng, 20.0, 40.0);
                    if let Err(e) = conn.send(op::HEARTBEAT, Bytes::new()).await {
                        seen.unexpected(e);
                        break;
                    }
                }
                if now >= next_change {
                    next_change = now + jitter(&mut rng, 2.0, 10.0);
                    if now >= until {
                        // the load is over: stay put until the end marker
                        next_change = until + END_WAIT * 2;
                    } else if conn.pending.is_none() {
                        stays.push(Stay { room: conn.room, from: since, to: now });
                        if let Err(e) = conn.change_room(random_room(&mut rng)).await {
                            seen.unexpected(e);
                            break;
                        }
                    }
                }
            }
            _ = tokio::time::sleep_until(give_up) => {
                seen.unexpected("no end marker".into());
                break;
            }
        }
    }
    if conn.pending.is_none() {
        stays.push(Stay {
            room: conn.room,
            from: since,
            to: Instant::now(),
        });
    }
    conn.close(Ending::Graceful).await;
    StableReport { seen, stays }
}

#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct ChurnCounts {
    pub(crate) connects: u64,
    pub(crate) disconnects: u64,
    pub(crate) replaced: u64,
    pub(crate) graceful: u64,
    pub(crate) abrupt: u64,
}

pub(crate) struct ChurnReport {
    pub(crate) seen: Seen,
    pub(crate) counts: ChurnCounts,
}

/// Reads a replaced connection to its end: what was queued, DisconnectReply, then
/// the end of the stream.
async fn drain_replaced(seen: &mut Seen, mut old: Conn) {
    let drain = async {
        let mut disconnect = false;
        loop {
            loop {
                match old.next_frame() {
                    Ok(Some((f, meta))) => {
                        if seen.handle(&mut old, &f, meta) == Got::Disconnect {
                            disconnect = true;
                        }
                    }
                    Ok(None) => break,
                    Err(e) => return Err(e),
                }
            }
            match old.fill().await {
                Ok(true) => {}
                Ok(false) => return Ok(disconnect),
                // a reset after the last bytes is how some replaced connections end
                Err(_) => return Ok(disconnect),
            }
        }
    };
    match tokio::time::timeout(Duration::from_secs(10), drain).await {
        Ok(Ok(true)) => {}
        Ok(Ok(false)) => {
            seen.unexpected("replaced connection ended without DisconnectReply".into())
        }
        Ok(Err(e)) => seen.unexpected(format!("replaced connection: {e}")),
        Err(_) => seen.unexpected("replaced connection still open after 10 s".into()),
    }
    old.close(Ending::Abrupt).await;
}

/// A churning client: connects, reads, changes rooms, and leaves (gracefully,
/// abruptly, or by being replaced by its own next connection) until `until`.
pub(crate) async fn run_churn(
    me: u32,
    dial: Arc<Dial>,
    until: Instant,
    mut rng: StdRng,
) -> ChurnReport {
    let mut seen = Seen::new(me);
    let mut counts = ChurnCounts::default();
    let mut live: Option<(Conn, Ending)> = None;
    tokio::time::sleep(jitter(&mut rng, 0.0, 2.0)).await;
    while Instant::now() < until {
        let via = if rng.gen_bool(0.5) {
            Via::Tcp
        } else {
            Via::Quic
        };
        let ending = if rng.gen_bool(0.5) {
            Ending::Graceful
        } else {
            Ending::Abrupt
        };
        let mut conn = match dial.connect(me, via, random_room(&mut rng), ending).await {
            Ok(c) => c,
            Err(e) => {
                seen.unexpected(format!("connect: {e}"));
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        counts.connects += 1;
        if let Some((old, _)) = live.take() {
            drain_replaced(&mut seen, old).await;
            counts.replaced += 1;
            counts.disconnects += 1;
        }
        let leave_at = (Instant::now() + jitter(&mut rng, 0.5, 10.0)).min(until);
        let mut next_change = Instant::now() + jitter(&mut rng, 0.3, 3.0);
        let mut next_beat = Instant::now() + jitter(&mut rng, 10.0, 30.0);
        let mut alive = true;
        'conn: while alive {
            loop {
                match conn.next_frame() {
                    Ok(Some((f, meta))) => {
                        if seen.handle(&mut conn, &f, meta) == Got::Disconnect {
                            seen.unexpected("DisconnectReply on a live connection".into());
                            alive = false;
                            break 'conn;
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        seen.unexpected(e);
                        alive = false;
                        break 'conn;
                    }
                }
            }
            let now = Instant::now();
            if now >= leave_at {
                break;
            }
            let wake = next_change.min(next_beat).min(leave_at);
            tokio::select! {
                r = conn.fill() => match r {
                    Ok(true) => {}
                    Ok(false) => {
                        seen.unexpected("server closed a live connection".into());
                        alive = false;
                    }
                    Err(e) => {
                        seen.unexpected(e);
                        alive = false;
                    }
                },
                _ = tokio::time::sleep_until(tokio::time::Instant::from_std(wake)) => {
                    let now = Instant::now();
                    if now >= next_beat {
                        next_beat = now + jitter(&mut rng, 20.0, 40.0);
                        if let Err(e) = conn.send(op::HEARTBEAT, Bytes::new()).await {
                            seen.unexpected(e);
                            alive = false;
                        }
                    }
                    if alive && now >= next_change {
                        next_change = now + jitter(&mut rng, 0.3, 3.0);
                        if conn.pending.is_none() {
                            if let Err(e) = conn.change_room(random_room(&mut rng)).await {
                                seen.unexpected(e);
                                alive = false;
                            }
                        }
                    }
                }
            }
        }
        // One time in ten the next connection replaces this one, as when a device
        // switches networks before the old connection is noticed as gone.
        if alive && Instant::now() < until && rng.gen_bool(0.1) {
            live = Some((conn, ending));
            continue;
        }
        conn.close(ending).await;
        counts.disconnects += 1;
        match ending {
            Ending::Graceful => counts.graceful += 1,
            Ending::Abrupt => counts.abrupt += 1,
        }
        let offline = jitter(&mut rng, 0.0, 2.0);
        tokio::time::sleep_until(tokio::time::Instant::from_std(
            (Instant::now() + offline).min(until),
        ))
        .await;
    }
    if let Some((conn, ending)) = live.take() {
        conn.close(ending).await;
        counts.disconnects += 1;
    }
    ChurnReport { seen, counts }
}
