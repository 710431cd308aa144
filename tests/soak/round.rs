//! One round of load: the server and backends every round uses, and a round from
//! connect to the final check.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use quicpush::bench::process::ProcStat;
use quicpush::rpc::Client;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::backend::{Backend, BackendLog, Target};
use crate::body::{body, Kind, NO_TARGET};
use crate::check::{expected_for, expected_resuming, not_appended, Expect, Ledger};
use crate::common::process::poll_until;
use crate::conn::{Conn, Dial, Ending};
use crate::fleet::{run_churn, run_stable};
use crate::report::RoundReport;
use crate::resuming::{first_resuming, run_resuming};
use crate::ROOMS;
use crate::{is_resuming, is_stable, mid_of, stable_via, CALLS_PER_SEC, EMPTY_WAIT, OP};

/// The server and what every round uses.
pub(crate) struct Setup {
    pub(crate) dial: Arc<Dial>,
    /// Backend 0, which also asks for the online counts and sends the end marker.
    pub(crate) control: Arc<Client>,
    /// A backend connection of its own for the resuming clients' kicks.
    pub(crate) kicker: Arc<Client>,
    pub(crate) backends: Vec<Arc<Client>>,
    pub(crate) stat: ProcStat,
    pub(crate) clients: u32,
}

/// One round: stable clients connect and register, then for `secs` the churning
/// clients come and go while the backends push; then the end marker, every
/// client leaves, and every message is checked.
pub(crate) async fn round(setup: &Setup, secs: u64, seed: u64) -> RoundReport {
    let control = &setup.control;
    let mut rng = StdRng::seed_from_u64(seed);
    let stable: Vec<(u32, Option<u32>)> = (0..setup.clients)
        .filter(|&c| is_stable(c))
        .map(|c| (c, Some(rng.gen_range(0..ROOMS))))
        .collect();
    let conns: Vec<(u32, Conn)> = futures_util::stream::iter(stable.iter().copied())
        .map(|(c, room)| {
            let dial = setup.dial.clone();
            async move {
                let conn = dial
                    .connect(c, stable_via(c), room, Ending::Graceful)
                    .await
                    .unwrap_or_else(|e| panic!("stable client {c}: {e}"));
                (c, conn)
            }
        })
        .buffer_unordered(64)
        .collect()
        .await;
    let n_stable = conns.len() as u64;
    // Each resuming client stays in one room and is connected before the load
    // starts, so every push of the round is meant for it.
    let resuming: Vec<(u32, u32)> = (0..setup.clients)
        .filter(|&c| is_resuming(c))
        .map(|c| (c, rng.gen_range(0..ROOMS)))
        .collect();
    let firsts: Vec<_> = futures_util::stream::iter(resuming.iter().copied())
        .map(|(c, room)| {
            let dial = setup.dial.clone();
            async move {
                let mut rng = StdRng::seed_from_u64(seed ^ (u64::from(c) << 20));
                let (conn, loss, seen) = first_resuming(&dial, c, room, &mut rng).await;
                (c, room, conn, loss, seen, rng)
            }
        })
        .buffer_unordered(64)
        .collect()
        .await;
    let n_resuming = firsts.len() as u64;
    // AuthReply is queued just before the channel registers: wait until all are.
    let registered = poll_until(Duration::from_secs(30), || async move {
        control.online().await.unwrap().total == n_stable + n_resuming
    })
    .await;
    assert!(
        registered,
        "the stable and resuming clients were never all online"
    );
    let registered = Instant::now();

    let start = Instant::now();
    let until = start + Duration::from_secs(secs);
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let sampling = sampling.clone();
        let stat = setup.stat.clone();
        tokio::spawn(async move {
            let mut peak = 0u64;
            let mut timeline = Vec::new();
            let mut next_mark = start + Duration::from_secs(10);
            while sampling.load(Ordering::Relaxed) {
                if let Ok(rss) = stat.rss_bytes() {
                    peak = peak.max(rss);
                    if Instant::now() >= next_mark {
                        next_mark += Duration::from_secs(10);
                        timeline.push((start.elapsed().as_secs(), rss));
                    }
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            (peak, timeline)
        })
    };

    let stable_tasks: Vec<_> = conns
        .into_iter()
        .map(|(c, conn)| {
            let rng = StdRng::seed_from_u64(seed ^ (u64::from(c) << 20));
            tokio::spawn(run_stable(c, conn, registered, until, rng))
        })
        .collect();
    let resuming_tasks: Vec<_> = firsts
        .into_iter()
        .map(|(c, room, conn, loss, seen, rng)| {
            tokio::spawn(run_resuming(
                c,
                setup.dial.clone(),
                setup.kicker.clone(),
                room,
                (conn, loss),
                seen,
                until,
                rng,
            ))
        })
        .collect();
    let churn_tasks: Vec<_> = (0..setup.clients)
        .filter(|&c| !is_stable(c) && !is_resuming(c))
        .map(|c| {
            let rng = StdRng::seed_from_u64(seed ^ (u64::from(c) << 20));
            tokio::spawn(run_churn(c, setup.dial.clone(), until, rng))
        })
        .collect();
    let backend_tasks: Vec<_> = setup
        .backends
        .iter()
        .enumerate()
        .map(|(i, rpc)| {
            let b = Backend {
                id: i as u8,
                rpc: rpc.clone(),
                clients: setup.clients,
                until,
                max_calls: (CALLS_PER_SEC * secs as f64 * 1.2) as u64 + 100,
                rng: StdRng::seed_from_u64(seed.wrapping_add(1 + i as u64)),
                log: BackendLog::default(),
            };
            tokio::spawn(b.run())
        })
        .collect();

    let mut logs = Vec::new();
    for t in backend_tasks {
        logs.push(t.await.expect("backend task"));
    }
    let mut churned = Vec::new();
    for t in churn_tasks {
        churned.push(t.await.expect("churn task"));
    }
    // Every push before this one is queued, or with the broadcast workers ahead of it.
    control
        .broadcast(OP, body(Kind::End, 0, 0, NO_TARGET), 0)
        .await
        .expect("end marker");
    let mut stables = Vec::new();
    for t in stable_tasks {
        stables.push(t.await.expect("stable task"));
    }
    let mut resumers = Vec::new();
    for t in resuming_tasks {
        resumers.push(t.await.expect("resuming task"));
    }
    let load_secs = start.elapsed().as_secs_f64();

    // Every client has left: the registry must say so (sessions end asynchronously).
    let left_at = Instant::now();
    let emptied = poll_until(EMPTY_WAIT, || async move {
        control.online().await.unwrap().total == 0 && control.rooms().await.unwrap().is_empty()
    })
    .await;
    let empty_after = left_at.elapsed().as_secs_f64();
    sampling.store(false, Ordering::Relaxed);
    let (peak_rss, timeline) = sampler.await.unwrap();

    let mut r = RoundReport {
        secs,
        stable: n_stable,
        resuming: n_resuming,
        churning: churned.len() as u64,
        load_secs,
        emptied,
        empty_after,
        left_online: control.online().await.unwrap().total,
        left_rooms: control.rooms().await.unwrap().len(),
        peak_rss,
        timeline,
        ..RoundReport::default()
    };
    let mut ledger = Ledger { sent: Vec::new() };
    for log in logs {
        for (k, v) in log.calls {
            *r.calls.entry(k).or_default() += v;
        }
        r.backend_errors.extend(log.errors);
        ledger.sent.push(log.sent);
    }
    for s in ledger.sent.iter().flatten() {
        match &s.target {
            Target::Key { outcome, .. } => *r.key_outcomes.entry(*outcome).or_default() += 1,
            Target::Keys(list) => {
                for (_, o) in list {
                    *r.key_outcomes.entry(*o).or_default() += 1;
                }
            }
            Target::User { tally, .. } | Target::Room { tally, .. } => r.tallies += *tally,
            Target::Broadcast => {}
        }
    }
    for s in &stables {
        r.absorb(&s.seen);
        if !s.seen.end {
            r.unfinished += 1;
        }
        let want = expected_for(&ledger, s.seen.me, &s.stays);
        r.verdict.client(&ledger, &s.seen, Expect::AtLeast(want));
    }
    for c in &resumers {
        r.absorb(&c.seen);
        if !c.seen.end {
            r.unfinished += 1;
        }
        let (want, lost) = expected_resuming(&ledger, c.seen.me, c.room);
        r.verdict.lost += lost.len() as u64;
        for l in lost {
            r.verdict.note(l);
        }
        r.verdict.client(&ledger, &c.seen, Expect::Exactly(want));
        r.resumes += &c.counts;
    }
    let mids: HashSet<i64> = resumers.iter().map(|c| mid_of(c.seen.me)).collect();
    let rooms: HashSet<u32> = resumers.iter().map(|c| c.room).collect();
    for bad in not_appended(&ledger, &mids, &rooms) {
        r.verdict.not_appended += 1;
        r.verdict.note(bad);
    }
    for c in &churned {
        r.absorb(&c.seen);
        r.verdict.client(&ledger, &c.seen, Expect::Nothing);
        r.counts.connects += c.counts.connects;
        r.counts.disconnects += c.counts.disconnects;
        r.counts.replaced += c.counts.replaced;
        r.counts.graceful += c.counts.graceful;
        r.counts.abrupt += c.counts.abrupt;
    }
    r
}
