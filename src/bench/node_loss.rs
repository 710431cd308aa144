//! `quicpush bench --scenario node-loss --nodes N`: a tier of N nodes with key
//! history in its Redis (`history.store = "redis"`), every client a resuming
//! client on the last node (with the others to move to), a steady, paced
//! PushMsg load through node 0, and `kill -9` of the last node half-way.
//!
//! Every push is checked at its client: each one the backend was told was
//! accepted (`Forwarded` or `Stored`) must arrive once and in order, whichever
//! node delivers it. Reported: the outcomes, lost / duplicated / reordered, the
//! time from the kill to each client's resume (p50, p99, max), and the push
//! latency (from the time it was due, so a stall counts).

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use futures_util::stream::FuturesUnordered;
use futures_util::StreamExt;
use hdrhistogram::Histogram;
use parking_lot::Mutex;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::{percentiles, tier, BenchError, BenchOptions, LatencyUs, Measurement, Report, Target};
use crate::client::{Backoff, Dial, Event, ResumingClient};
use crate::protocol::Source;
use crate::rpc::proto::PushOutcome;
use crate::rpc::Client;
use crate::tls::BackendIdentity;

/// How long without progress, after the load, before what is missing counts as lost.
const QUIET: Duration = Duration::from_secs(5);

/// What the node-loss scenario adds to the report.
#[derive(Debug, Clone, Default, Serialize)]
pub struct NodeLossReport {
    pub nodes: usize,
    /// Pushes per second the backend was paced at.
    pub rate: u64,
    /// Pushes the backend sent.
    pub pushes: u64,
    pub forwarded: u64,
    pub stored: u64,
    pub unavailable: u64,
    /// Any other outcome, or a failed call.
    pub other: u64,
    /// Accepted pushes (Forwarded + Stored) that never reached their client.
    pub lost: u64,
    pub duplicated: u64,
    /// Pushes that reached their client after a later one of the same key.
    pub reordered: u64,
    /// Clients that resumed on another node after the kill.
    pub resumed: usize,
    /// Of those resumes, how many said their key was not recovered.
    pub not_recovered: u64,
    /// Milliseconds from the kill to each client's resume.
    pub resume_ms_p50: Option<f64>,
    pub resume_ms_p99: Option<f64>,
    pub resume_ms_max: Option<f64>,
    /// Push latency over the whole run, from the time each was due.
    pub latency_us: Option<LatencyUs>,
}

/// A push's body: index in its key's sequence, and when it was due (ns since the
/// run's start).
fn body(index: u64, due_ns: u64) -> Bytes {
    let mut b = BytesMut::with_capacity(16);
    b.put_u64(index);
    b.put_u64(due_ns);
    b.freeze()
}

fn parse(body: &[u8]) -> Option<(u64, u64)> {
    let i = u64::from_be_bytes(body.get(..8)?.try_into().ok()?);
    let t = u64::from_be_bytes(body.get(8..16)?.try_into().ok()?);
    Some((i, t))
}

/// One client's view.
struct Seen {
    got: HashSet<u64>,
    duplicated: u64,
    reordered: u64,
    max: Option<u64>,
    latency: Histogram<u64>,
    resumed_at: Option<Instant>,
    not_recovered: u64,
}

/// Checks the options, then runs the scenario.
pub async fn run(opts: &BenchOptions) -> Result<Report, BenchError> {
    let Target::Spawn { exe } = &opts.target else {
        return Err(BenchError::Options(
            "node-loss starts and kills its own nodes: it takes no --server-pid".into(),
        ));
    };
    if opts.nodes < 2 {
        return Err(BenchError::Options(
            "node-loss needs --nodes 2 or more (one of them is killed)".into(),
        ));
    }
    if opts.rate == 0 {
        return Err(BenchError::Options("--rate must be at least 1".into()));
    }
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let tmp =
        tempfile::tempdir().map_err(|e| BenchError::Io(format!("temporary directory: {e}")))?;
    let dir = tmp.path();
    let mut t = tier::Tier::start(opts, exe, dir, opts.nodes, false)?;
    let secret = crate::auth::load_secret(&dir.join(crate::certs::TOKEN_SECRET))
        .map_err(|e| BenchError::Spawn(e.to_string()))?;
    let backend = Client::connect(
        t.nodes[0].control,
        "localhost",
        &BackendIdentity::from_dir(dir),
    )
    .await
    .map_err(|e| BenchError::Rpc(e.to_string()))?;
    let backend = Arc::new(backend);
    let victim = opts.nodes - 1;
    // The victim first, then the others, nearest first.
    let dials = || -> Vec<Dial> {
        (0..opts.nodes)
            .rev()
            .map(|i| Dial::Tcp(t.nodes[i].client_tcp))
            .collect()
    };

    let empty = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)
        .map_err(|e| BenchError::Options(format!("latency histogram: {e}")))?;
    let epoch = Instant::now();
    let killed_at: Arc<Mutex<Option<Instant>>> = Arc::default();
    let received = Arc::new(AtomicU64::new(0));
    let stop = CancellationToken::new();
    let bar = super::progress_bar(
        opts.progress,
        opts.clients as u64,
        "connecting resuming clients",
    );
    let mut readers = Vec::with_capacity(opts.clients);
    for k in 0..opts.clients {
        let claims = crate::auth::claims_for(&key_name(k), Duration::from_secs(24 * 3600));
        let token = crate::auth::issue(&secret, &claims)
            .map_err(|e| BenchError::Spawn(format!("token: {e}")))?;
        let (c, _) = ResumingClient::connect_any(dials(), token, Backoff::default())
            .await
            .ok_or_else(|| BenchError::Options("no node to dial".into()))?;
        readers.push(tokio::spawn(read(
            c,
            empty.clone(),
            epoch,
            killed_at.clone(),
            received.clone(),
            stop.clone(),
        )));
        bar.inc(1);
    }
    bar.finish_and_clear();

    // The paced load: one PushMsg per tick, keys round-robin.
    let total = (opts.rate as f64 * opts.duration.as_secs_f64()).round() as u64;
    let kill_after = total / 2;
    let mut accepted: Vec<Vec<u64>> = vec![Vec::new(); opts.clients];
    let mut next_index = vec![0u64; opts.clients];
    let mut r = NodeLossReport {
        nodes: opts.nodes,
        rate: opts.rate,
        ..NodeLossReport::default()
    };
    let mut inflight = FuturesUnordered::new();
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / opts.rate as f64));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let bar = super::progress_bar(opts.progress, total, "pushing; the last node dies half-way");
    let mut record = |r: &mut NodeLossReport, (k, index, o): (usize, u64, Option<PushOutcome>)| {
        match o {
            Some(PushOutcome::Forwarded) => r.forwarded += 1,
            Some(PushOutcome::Stored) => r.stored += 1,
            Some(PushOutcome::Unavailable) => r.unavailable += 1,
            _ => r.other += 1,
        }
        if matches!(o, Some(PushOutcome::Forwarded | PushOutcome::Stored)) {
            accepted[k].push(index);
        }
    };
    let t_load = Instant::now();
    for i in 0..total {
        if i == kill_after {
            t.nodes[victim].kill();
            *killed_at.lock() = Some(Instant::now());
        }
        let due = loop {
            tokio::select! {
                at = ticker.tick() => break at.into_std(),
                Some(done) = inflight.next(), if !inflight.is_empty() => record(&mut r, done),
            }
        };
        while inflight.len() >= opts.in_flight.max(1) {
            if let Some(done) = inflight.next().await {
                record(&mut r, done);
            }
        }
        let k = (i % opts.clients as u64) as usize;
        let index = next_index[k];
        next_index[k] += 1;
        let b = backend.clone();
        let payload = body(index, due.duration_since(epoch).as_nanos() as u64);
        inflight.push(async move {
            let o = b.push_msg(key_name(k), super::BENCH_OP, payload).await.ok();
            (k, index, o)
        });
        bar.inc(1);
    }
    while let Some(done) = inflight.next().await {
        record(&mut r, done);
    }
    let load_secs = t_load.elapsed().as_secs_f64();
    bar.finish_and_clear();
    r.pushes = total;

    // Until every accepted push arrived, or nothing did for QUIET.
    let want: u64 = accepted.iter().map(|a| a.len() as u64).sum();
    let mut last = received.load(Ordering::Relaxed);
    let mut last_at = Instant::now();
    while received.load(Ordering::Relaxed) < want {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let now = received.load(Ordering::Relaxed);
        if now != last {
            (last, last_at) = (now, Instant::now());
        } else if last_at.elapsed() >= QUIET {
            break;
        }
    }
    stop.cancel();
    let killed = (*killed_at.lock()).ok_or_else(|| BenchError::Options("no kill".into()))?;
    let mut latency = empty;
    let mut resumes = Vec::new();
    let mut deliveries = 0u64;
    for (k, h) in readers.into_iter().enumerate() {
        let seen = h
            .await
            .map_err(|e| BenchError::Io(format!("client task: {e}")))?;
        r.duplicated += seen.duplicated;
        r.reordered += seen.reordered;
        r.not_recovered += seen.not_recovered;
        r.lost += accepted[k].iter().filter(|i| !seen.got.contains(i)).count() as u64;
        deliveries += seen.got.len() as u64;
        let _ = latency.add(&seen.latency);
        if let Some(at) = seen.resumed_at {
            resumes.push(at.duration_since(killed).as_secs_f64() * 1e3);
        }
    }
    if let Ok(b) = Arc::try_unwrap(backend) {
        b.close().await;
    }
    t.stop();
    resumes.sort_by(f64::total_cmp);
    r.resumed = resumes.len();
    let pick = |q: f64| -> Option<f64> {
        let n = resumes.len();
        (n > 0).then(|| resumes[((n as f64 * q).ceil() as usize).clamp(1, n) - 1])
    };
    r.resume_ms_p50 = pick(0.5);
    r.resume_ms_p99 = pick(0.99);
    r.resume_ms_max = pick(1.0);
    r.latency_us = (!latency.is_empty()).then(|| percentiles(&latency));
    let m = Measurement {
        deliveries,
        expected: want,
        seconds: load_secs,
        deliveries_per_sec: deliveries as f64 / load_secs.max(1e-9),
        lost: r.lost,
        duplicated: r.duplicated,
        reordered: r.reordered,
        latency_us: r.latency_us,
        ..Measurement::default()
    };
    let mut report = Report::of(opts, m);
    report.messages = total;
    report.batch = 1;
    report.node_loss = Some(r);
    Ok(report)
}

fn key_name(k: usize) -> String {
    format!("node-loss-{k}")
}

/// Reads one client's pushes until `stop`, reconnecting and resuming as needed.
async fn read(
    mut c: ResumingClient,
    latency: Histogram<u64>,
    epoch: Instant,
    killed_at: Arc<Mutex<Option<Instant>>>,
    received: Arc<AtomicU64>,
    stop: CancellationToken,
) -> Seen {
    let mut s = Seen {
        got: HashSet::new(),
        duplicated: 0,
        reordered: 0,
        max: None,
        latency,
        resumed_at: None,
        not_recovered: 0,
    };
    loop {
        let ev = tokio::select! {
            ev = c.next() => ev,
            _ = stop.cancelled() => break,
        };
        match ev {
            Event::Push(f, _) => {
                let Some((index, due)) = parse(&f.body) else {
                    continue;
                };
                if !s.got.insert(index) {
                    s.duplicated += 1;
                    continue;
                }
                received.fetch_add(1, Ordering::Relaxed);
                if s.max.is_some_and(|m| index < m) {
                    s.reordered += 1;
                }
                s.max = s.max.max(Some(index));
                let now = epoch.elapsed().as_nanos() as u64;
                let _ = s.latency.record((now.saturating_sub(due) / 1000).max(1));
            }
            Event::Resumed(reply) => {
                if killed_at.lock().is_some() && s.resumed_at.is_none() {
                    s.resumed_at = Some(Instant::now());
                }
                if reply
                    .source(Source::Key)
                    .is_some_and(|st| st.recovered == Some(false))
                {
                    s.not_recovered += 1;
                }
            }
            Event::Reply(_) => {}
        }
    }
    c.close().await;
    s
}

impl NodeLossReport {
    /// The human-readable table.
    pub fn table(&self) -> String {
        let ms = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.1} ms"));
        let mut out = String::new();
        let mut row = |k: &str, v: String| out.push_str(&format!("{k:<32} {v}\n"));
        row("nodes", self.nodes.to_string());
        row("pushes/s (paced)", self.rate.to_string());
        row("pushes", self.pushes.to_string());
        row("forwarded", self.forwarded.to_string());
        row("stored", self.stored.to_string());
        row("unavailable", self.unavailable.to_string());
        row("other outcomes or errors", self.other.to_string());
        row("lost (accepted, not received)", self.lost.to_string());
        row("duplicated", self.duplicated.to_string());
        row("reordered", self.reordered.to_string());
        row("clients resumed elsewhere", self.resumed.to_string());
        row("resumes not recovered", self.not_recovered.to_string());
        row("resume after kill p50", ms(self.resume_ms_p50));
        row("resume after kill p99", ms(self.resume_ms_p99));
        row("resume after kill max", ms(self.resume_ms_max));
        if let Some(l) = self.latency_us {
            row(
                "push latency p50 / p99 / max",
                format!("{} / {} / {} µs", l.p50, l.p99, l.max),
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_body_round_trips_and_a_short_one_is_refused() {
        assert_eq!(parse(&body(7, 99)), Some((7, 99)));
        assert_eq!(parse(&body(7, 99)[..15]), None);
    }
}
