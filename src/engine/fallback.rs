//! What automatic retargets (`--fallback`) are made of: the hosts a
//! migration may move to, in order, why it moves on its own (its target
//! lost or refusing, asking the source to leave, or falling behind: its
//! rate, while the source has a backlog for it, below a threshold for a
//! while), and the first destination's refusal. When it moves is the
//! route's decision (`route`).

use super::report::Decision;
use super::EngineError;
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// How often the target's rate is sampled.
const SAMPLE: Duration = Duration::from_secs(1);
/// Samples before the target can be judged slow.
const WARM_UP: u32 = 3;
/// Without a threshold, slow is below this share of the best rate seen.
const SLOW_SHARE: f64 = 0.25;

/// Why the engine moves a migration on its own.
#[derive(Clone, Debug, PartialEq)]
pub(super) enum Why {
    /// The target failed, vanished or refused.
    Lost(String),
    /// The target asked the source to leave (drained, or out of room).
    Leave(String),
    /// The target fell behind.
    Slow(String),
}

impl Why {
    pub(super) fn describe(&self) -> String {
        match self {
            Why::Lost(w) => format!("target lost: {w}"),
            Why::Leave(w) => format!("asked to leave: {w}"),
            Why::Slow(w) => format!("falling behind: {w}"),
        }
    }

    /// Its kind, as reports give it.
    pub(super) fn cause(&self) -> super::Cause {
        match self {
            Why::Lost(_) => super::Cause::Lost,
            Why::Leave(_) => super::Cause::Leave,
            Why::Slow(_) => super::Cause::Slow,
        }
    }

    /// Whether the old target can still forward what it holds.
    pub(super) fn forward(&self) -> bool {
        !matches!(self, Why::Lost(_))
    }
}

/// The fallback hosts not tried yet, in order.
#[derive(Debug, Default)]
pub(super) struct Fallback {
    hosts: VecDeque<(String, SocketAddr)>,
}

impl Fallback {
    /// The fallback hosts in order.
    pub(super) fn new(hosts: Vec<(String, SocketAddr)>) -> Self {
        Self { hosts: hosts.into() }
    }

    /// The next fallback host that does not take part yet.
    pub(super) fn next(&mut self, taking_part: &[String]) -> Option<(String, SocketAddr)> {
        while let Some(h) = self.hosts.pop_front() {
            if !taking_part.contains(&h.0) {
                return Some(h);
            }
        }
        None
    }

    /// Whether any fallback host is left.
    pub(super) fn any_left(&self) -> bool {
        !self.hosts.is_empty()
    }
}

/// Samples the target's rate once a second while the source has a backlog
/// for it (so that a target that is simply done is never judged slow).
pub(super) struct SlowWatch {
    /// Bytes/s below which the target is slow (else a share of the best).
    min_rate: Option<f64>,
    /// How long it must stay slow; zero: never judged.
    slow_for: Duration,
    last: Instant,
    bytes: u64,
    backlogged: bool,
    avg: Option<f64>,
    best: f64,
    samples: u32,
    slow_since: Option<Instant>,
}

impl SlowWatch {
    /// Slow is below `min_rate_mbps` (else a share of the best rate) for
    /// `slow_for_s` seconds; zero: never judged.
    pub(super) fn new(min_rate_mbps: Option<f64>, slow_for_s: u64) -> Self {
        Self::with(min_rate_mbps.map(|r| r * 1e6), Duration::from_secs(slow_for_s))
    }

    fn with(min_rate: Option<f64>, slow_for: Duration) -> Self {
        Self {
            min_rate,
            slow_for,
            last: Instant::now(),
            bytes: 0,
            backlogged: false,
            avg: None,
            best: 0.0,
            samples: 0,
            slow_since: None,
        }
    }

    /// Whether slowness is judged at all.
    pub(super) fn enabled(&self) -> bool {
        !self.slow_for.is_zero()
    }

    /// When the next sample is due.
    pub(super) fn due(&self) -> tokio::time::Instant {
        tokio::time::Instant::from_std(self.last + SAMPLE)
    }

    /// The target applied `bytes`.
    pub(super) fn applied(&mut self, bytes: u64) {
        self.bytes += bytes;
    }

    /// Starts over (a new target).
    pub(super) fn reset(&mut self) {
        *self = Self::with(self.min_rate, self.slow_for);
    }

    /// Takes a sample at `now`; `backlogged`: the source has work queued for
    /// the target (and nothing else holds it back). Returns why the target
    /// is behind once it has been for `slow_for`.
    pub(super) fn sample(&mut self, now: Instant, backlogged: bool) -> Option<String> {
        let dt = now.saturating_duration_since(self.last).as_secs_f64().max(1e-3);
        let rate = std::mem::take(&mut self.bytes) as f64 / dt;
        self.last = now;
        // A window counts only if the source had a backlog at both ends.
        let counts = backlogged && std::mem::replace(&mut self.backlogged, backlogged);
        if !counts {
            self.slow_since = None;
            return None;
        }
        let avg = self.avg.map_or(rate, |a| (a + rate) / 2.0);
        self.avg = Some(avg);
        self.samples += 1;
        self.best = self.best.max(avg);
        let threshold = self.min_rate.unwrap_or(self.best * SLOW_SHARE);
        if self.samples < WARM_UP || avg >= threshold {
            self.slow_since = None;
            return None;
        }
        let since = *self.slow_since.get_or_insert(now);
        (now.duration_since(since) >= self.slow_for).then(|| {
            format!("{:.1} MB/s for {} s, below {:.1} MB/s", avg / 1e6, self.slow_for.as_secs(), threshold / 1e6)
        })
    }
}

/// Opening the first destination failed: the next fallback host, if any, is
/// tried (the decision recorded); else the error stands.
pub(super) fn first_refused(
    fb: &mut Fallback,
    report: &mut super::Report,
    (to, err): (&str, EngineError),
    started: Instant,
    me: &str,
) -> Result<(String, SocketAddr), EngineError> {
    let Some((next, addr)) = fb.next(&[me.to_owned(), to.to_owned()]) else { return Err(err) };
    let reason = format!("target refused: {}", crate::error_chain(&err));
    tracing::warn!(vm = %report.vm, target = %to, "{reason}: trying {next}");
    report.decisions.push(Decision {
        at_ms: started.elapsed().as_secs_f64() * 1e3,
        target: to.to_owned(),
        reason,
        action: format!("retarget to {next}"),
        cause: super::Cause::Refused,
    });
    report.destination = next.clone();
    Ok((next, addr))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(w: &mut SlowWatch, start: Instant, secs: std::ops::Range<u64>, rate: u64, backlog: bool) -> Option<String> {
        let mut out = None;
        for s in secs {
            w.applied(rate);
            out = out.or(w.sample(start + Duration::from_secs(s), backlog));
        }
        out
    }

    #[test]
    fn slow_only_after_lasting_below_a_share_of_the_best() {
        let t0 = Instant::now();
        let mut w = SlowWatch::with(None, Duration::from_secs(5));
        w.last = t0;
        assert!(run(&mut w, t0, 1..11, 100_000_000, true).is_none(), "fast");
        // Slow but without a backlog (the source had nothing to send): never.
        assert!(run(&mut w, t0, 11..30, 1_000_000, false).is_none());
        // Slow with a backlog: judged once it lasted 5 s (the average needs
        // a few samples to fall below a quarter first).
        let why = run(&mut w, t0, 30..45, 1_000_000, true).expect("judged slow");
        assert!(why.contains("below 25.0 MB/s"), "{why}");
    }

    #[test]
    fn an_absolute_threshold_and_off() {
        let t0 = Instant::now();
        let mut w = SlowWatch::with(Some(5e6), Duration::from_secs(3));
        w.last = t0;
        assert!(run(&mut w, t0, 1..4, 6_000_000, true).is_none());
        assert!(run(&mut w, t0, 4..12, 1_000_000, true).is_some());
        let off = SlowWatch::with(None, Duration::ZERO);
        assert!(!off.enabled());
    }

    #[test]
    fn fallback_hosts_skip_those_taking_part() {
        let a: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let mut fb = Fallback::new(vec![("b".into(), a), ("c".into(), a)]);
        assert_eq!(fb.next(&["a".into(), "b".into()]).map(|h| h.0), Some("c".into()));
        assert!(!fb.any_left());
    }
}
