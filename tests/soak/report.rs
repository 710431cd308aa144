//! What a round did and found: its figures, printed, and the round's assertions.

use std::collections::HashMap;

use quicpush::channel::PushOutcome;
use quicpush::registry::Tally;

use crate::check::Verdict;
use crate::fleet::ChurnCounts;
use crate::resuming::ResumeCounts;
use crate::seen::{Failures, Seen};

pub(crate) fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// What one round of load did and found.
#[derive(Default)]
pub(crate) struct RoundReport {
    pub(crate) secs: u64,
    pub(crate) stable: u64,
    pub(crate) resuming: u64,
    pub(crate) churning: u64,
    pub(crate) counts: ChurnCounts,
    pub(crate) resumes: ResumeCounts,
    pub(crate) room_changes: u64,
    pub(crate) heartbeats: u64,
    pub(crate) calls: HashMap<&'static str, u64>,
    pub(crate) key_outcomes: HashMap<PushOutcome, u64>,
    pub(crate) tallies: Tally,
    pub(crate) received: u64,
    pub(crate) verdict: Verdict,
    pub(crate) failures: Failures,
    pub(crate) unfinished: u64,
    pub(crate) backend_errors: Vec<String>,
    pub(crate) peak_rss: u64,
    pub(crate) timeline: Vec<(u64, u64)>,
    pub(crate) load_secs: f64,
    pub(crate) emptied: bool,
    /// Seconds from the last client leaving to the server reporting none.
    pub(crate) empty_after: f64,
    pub(crate) left_online: u64,
    pub(crate) left_rooms: usize,
}

impl RoundReport {
    pub(crate) fn absorb(&mut self, seen: &Seen) {
        self.received += seen.ids.len() as u64;
        self.room_changes += seen.room_changes;
        self.heartbeats += seen.heartbeat_replies;
        let f = &seen.failures;
        self.failures.bad_seq += f.bad_seq;
        self.failures.out_of_order += f.out_of_order;
        self.failures.misrouted += f.misrouted;
        self.failures.malformed += f.malformed;
        self.failures.offset_gap += f.offset_gap;
        self.failures.unexpected += f.unexpected;
        for e in &f.examples {
            self.failures.note(e.clone());
        }
    }

    pub(crate) fn print(&self, name: &str) {
        let calls = |m: &str| self.calls.get(m).copied().unwrap_or(0);
        let outcome = |o: PushOutcome| self.key_outcomes.get(&o).copied().unwrap_or(0);
        let c = &self.counts;
        println!("---- {name}: {} s of load ----", self.secs);
        let rs = &self.resumes;
        println!(
            "clients           {} ({} stable, {} resuming, {} churning)",
            self.stable + self.resuming + self.churning,
            self.stable,
            self.resuming,
            self.churning
        );
        println!(
            "connects          {} ({} stable + {} resuming + {} churning); stable and churning disconnects {} (graceful {}, abrupt {}, replaced by the next connection {})",
            self.stable + rs.connects + c.connects,
            self.stable,
            rs.connects,
            c.connects,
            self.stable + c.disconnects,
            self.stable + c.graceful,
            c.abrupt,
            c.replaced
        );
        let mean_outage = rs.outage_total.as_secs_f64() / rs.resumes.max(1) as f64;
        println!(
            "resuming          {} resumes ({} recovered, {} sources not recovered) after losing a connection: abrupt {}, graceful {}, replaced {}, kicked {}, closed by the server {}; {} pushes replayed, {} left on replaced connections; outage mean {:.2} s, max {:.2} s",
            rs.resumes,
            rs.recovered,
            rs.not_recovered,
            rs.abrupt,
            rs.graceful,
            rs.replaced,
            rs.kicked,
            rs.server_closed,
            rs.replayed,
            rs.discarded,
            mean_outage,
            rs.outage_max.as_secs_f64()
        );
        println!(
            "room changes      {}; heartbeat replies {}",
            self.room_changes, self.heartbeats
        );
        println!(
            "pushes (calls)    PushMsg {}, MPushMsg {}, MPushMsgs {}, PushUser {}, BroadcastRoom {}, Broadcast {} (+1 end marker)",
            calls("PushMsg"),
            calls("MPushMsg"),
            calls("MPushMsgs"),
            calls("PushUser"),
            calls("BroadcastRoom"),
            calls("Broadcast")
        );
        println!(
            "key outcomes      delivered {}, stored {}, offline {}, queue full {}, filtered {}",
            outcome(PushOutcome::Delivered),
            outcome(PushOutcome::Stored),
            outcome(PushOutcome::Offline),
            outcome(PushOutcome::QueueFull),
            outcome(PushOutcome::Filtered)
        );
        println!(
            "user+room tallies delivered {}, stored {}, queue full {}, filtered {}; appended to {} streams",
            self.tallies.delivered,
            self.tallies.stored,
            self.tallies.queue_full,
            self.tallies.filtered,
            self.tallies.appended
        );
        println!(
            "deliveries        {} received and checked against what was sent; required deliveries confirmed exactly once: {} to stable clients, {} to resuming clients",
            self.verdict.checked, self.verdict.confirmed, self.verdict.confirmed_resuming
        );
        let f = &self.failures;
        let v = &self.verdict;
        println!(
            "problems          missing {}, duplicated {}, not meant for the client {}, push seq gaps {}, out of order {}, misrouted {}, malformed {}, source offset gaps {}, not recovered {}, resuming key pushes neither delivered nor stored {}, user/room pushes not appended {}, unexpected {}, clients without end marker {}, backend errors {}",
            v.missing,
            v.duplicated,
            v.not_meant,
            f.bad_seq,
            f.out_of_order,
            f.misrouted,
            f.malformed,
            f.offset_gap,
            rs.not_recovered,
            v.lost,
            v.not_appended,
            f.unexpected,
            self.unfinished,
            self.backend_errors.len()
        );
        let timeline: Vec<String> = self
            .timeline
            .iter()
            .map(|(s, r)| format!("{s}s {:.1}", mib(*r)))
            .collect();
        println!(
            "server RSS        peak {:.1} MiB; every 10 s: {}",
            mib(self.peak_rss),
            timeline.join(", ")
        );
        println!(
            "afterwards        online {}, rooms {} ({:.1} s after the last client left); load {:.1} s",
            self.left_online, self.left_rooms, self.empty_after, self.load_secs
        );
        for e in v
            .examples
            .iter()
            .chain(&f.examples)
            .chain(&self.backend_errors)
            .take(30)
        {
            println!("  problem: {e}");
        }
    }

    pub(crate) fn check(&self, name: &str) {
        assert!(
            self.backend_errors.is_empty(),
            "{name}: backend calls failed"
        );
        assert_eq!(
            self.verdict.missing, 0,
            "{name}: stable or resuming clients missed deliveries"
        );
        assert_eq!(
            self.resumes.not_recovered, 0,
            "{name}: resumes answered \"not recovered\""
        );
        assert_eq!(
            self.resumes.recovered, self.resumes.resumes,
            "{name}: resumes that did not recover every source"
        );
        assert_eq!(
            self.verdict.lost, 0,
            "{name}: pushes to resuming clients' keys reported neither Delivered nor Stored"
        );
        assert_eq!(
            self.verdict.not_appended, 0,
            "{name}: user or room pushes to resuming clients not appended to their streams"
        );
        assert_eq!(
            self.verdict.duplicated, 0,
            "{name}: messages received twice"
        );
        assert_eq!(
            self.verdict.not_meant, 0,
            "{name}: messages received that were not meant for the client"
        );
        assert_eq!(
            self.failures.total(),
            0,
            "{name}: client-side checks failed"
        );
        assert_eq!(
            self.unfinished, 0,
            "{name}: stable or resuming clients saw no end marker"
        );
        assert!(self.verdict.confirmed > 0, "{name}: nothing was checked");
        assert!(
            self.verdict.confirmed_resuming > 0 && self.resumes.resumes > 0,
            "{name}: no resuming client was checked"
        );
        assert!(
            self.emptied,
            "{name}: after every client left, the server still reports {} online and {} rooms",
            self.left_online, self.left_rooms
        );
    }
}
