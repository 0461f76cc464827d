//! Accounting and pacing: bytes applied, time spent, the throughput and
//! downtime estimate that decide convergence, per-round figures, and the
//! source's rate cap.

use super::report::RoundReport;
use std::time::{Duration, Instant};

/// A migration's counters and clocks.
pub(crate) struct Accounting {
    /// Bytes applied at the target, and the time spent on rounds that sent
    /// something: the throughput estimate.
    applied_bytes: u64,
    busy_time: Duration,
    /// The round under way.
    pub round: RoundReport,
    round_start: Instant,
    last_sync: Instant,
    /// How long the last dirty sync took (the tracker's cost per round).
    pub last_sync_cost: Duration,
    /// How long the last sync stopped the guest, for trackers that freeze it.
    pub last_guest_stop: Option<Duration>,
    pacer: Pacer,
}

/// The source's rate cap (`max_bandwidth_mbps`): never ahead of rate × elapsed.
struct Pacer {
    rate: Option<f64>,
    /// Bytes submitted since `since` (the round's start, or the last change of rate).
    paced_bytes: u64,
    since: Instant,
    until: Option<tokio::time::Instant>,
}

impl Accounting {
    /// Starts the clocks; `cap_mbps` caps the source's rate.
    pub(crate) fn new(cap_mbps: Option<f64>) -> Self {
        let now = Instant::now();
        Self {
            applied_bytes: 0,
            busy_time: Duration::ZERO,
            round: RoundReport::default(),
            round_start: now,
            last_sync: now,
            last_sync_cost: Duration::ZERO,
            last_guest_stop: None,
            pacer: Pacer {
                rate: cap_mbps.filter(|r| *r > 0.0).map(|r| r * 1e6),
                paced_bytes: 0,
                since: now,
                until: None,
            },
        }
    }

    /// A new round, number `n`.
    pub(crate) fn begin_round(&mut self, n: u32) {
        self.round = RoundReport { round: n, ..Default::default() };
        self.round_start = Instant::now();
        self.pacer.paced_bytes = 0;
        self.pacer.since = self.round_start;
    }

    /// A new rate cap (MB/s; `None` or 0: none), from now on.
    pub(crate) fn set_cap(&mut self, cap_mbps: Option<f64>) {
        self.pacer.rate = cap_mbps.filter(|r| *r > 0.0).map(|r| r * 1e6);
        self.pacer.paced_bytes = 0;
        self.pacer.since = Instant::now();
        self.pacer.until = None;
    }

    /// Closes the round under way and returns its figures.
    pub(crate) fn end_round(&mut self) -> RoundReport {
        let dt = self.round_start.elapsed();
        self.round.ms = dt.as_secs_f64() * 1e3;
        if self.round.bytes > 0 {
            self.busy_time += dt;
        }
        self.round_start = Instant::now();
        self.round.clone()
    }

    /// How long the round under way has run.
    pub(crate) fn round_elapsed(&self) -> Duration {
        self.round_start.elapsed()
    }

    /// `pages` of `bytes` were applied at the current target.
    pub(crate) fn applied(&mut self, pages: u64, bytes: u64) {
        self.round.pages += pages;
        self.round.bytes += bytes;
        self.applied_bytes += bytes;
    }

    /// Bytes per second applied at the target so far.
    pub(crate) fn throughput(&self) -> f64 {
        let t = self.busy_time + self.round_start.elapsed();
        self.applied_bytes as f64 / t.as_secs_f64().max(1e-3)
    }

    /// A dirty sync took `cost`; returns the time since the previous one.
    pub(crate) fn synced(&mut self, cost: Duration) -> Duration {
        let since = self.last_sync.elapsed();
        self.last_sync = Instant::now();
        self.last_sync_cost = cost;
        since
    }

    /// The estimated time of the final round if the VM paused now with
    /// `remaining` bytes to send. Small late rounds move slower than the first, big one (TCP
    /// restarts slowly after the pause for the sync), and the final round is
    /// one of them: predict with the slower of the overall rate and the last
    /// round's.
    pub(crate) fn estimate(&self, remaining: u64, last: &RoundReport) -> Duration {
        let last_rate =
            if last.ms > 0.0 && last.bytes >= 1 << 20 { last.bytes as f64 / (last.ms / 1e3) } else { f64::MAX };
        // A cap lowered since (`dcmigrate set`) binds the final round too.
        let rate = self.throughput().min(last_rate).min(self.pacer.rate.unwrap_or(f64::MAX)).max(1.0);
        Duration::from_secs_f64(remaining as f64 / rate)
    }

    /// The source submitted `bytes`: with a cap, it waits once ahead of it.
    pub(crate) fn pace(&mut self, bytes: u64) {
        let Some(rate) = self.pacer.rate else { return };
        self.pacer.paced_bytes += bytes;
        let due = Duration::from_secs_f64(self.pacer.paced_bytes as f64 / rate);
        if let Some(wait) = due.checked_sub(self.pacer.since.elapsed()) {
            self.pacer.until = Some(tokio::time::Instant::now() + wait);
        }
    }

    /// Until when the source must wait, if it is ahead of its cap.
    pub(crate) fn paced_until(&self) -> Option<tokio::time::Instant> {
        self.pacer.until
    }

    /// The wait is over.
    pub(crate) fn pace_done(&mut self) {
        self.pacer.until = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn estimate_uses_the_slower_rate() {
        let mut a = Accounting::new(None);
        a.begin_round(0);
        a.applied(256, 1 << 30);
        let slow = RoundReport { bytes: 2 << 20, ms: 1000.0, ..Default::default() };
        let e = a.estimate(4 << 20, &slow);
        assert!((e.as_secs_f64() - 2.0).abs() < 0.01, "2 MiB/s for the last round: {e:?}");
        assert_eq!(a.estimate(0, &slow), Duration::ZERO);
    }

    #[test]
    fn pacing_holds_the_source_back() {
        let mut a = Accounting::new(Some(1.0));
        a.begin_round(0);
        assert!(a.paced_until().is_none());
        a.pace(1_000_000);
        let until = a.paced_until().expect("a second's worth at 1 MB/s");
        assert!(until > tokio::time::Instant::now() + Duration::from_millis(900));
        a.pace_done();
        assert!(Accounting::new(None).paced_until().is_none());
    }
}
