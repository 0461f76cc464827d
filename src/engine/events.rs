//! The engine's event loop pieces: handing work to senders up to their
//! windows, waiting for whatever happens next (a completion, a retarget, a
//! fence, the pacer, a cancel), and feeding completions to the ledger.

use super::route::Event;
use super::schedule::{Schedule, FORWARD_PER_STREAM, PER_STREAM, QUEUE_PER_STREAM, SOURCE};
use super::{EngineError, Migration};
use crate::ledger::HostId;
use crate::memory::PAGE_SIZE;
use crate::transport::Completion;
use std::time::{Duration, Instant};

impl Migration {
    fn may_steal(&self) -> bool {
        Schedule::may_steal(self.route.phase().paused(), self.acct.round_elapsed(), self.acct.last_sync_cost)
    }

    /// Hands out work up to each sender's window.
    pub(super) fn fill(&mut self) -> Result<(), EngineError> {
        // A lost target gets nothing until a fallback host replaces it.
        if self.route.target_dead() {
            return Ok(());
        }
        for f in self.route.forwarders().to_vec() {
            self.fill_forwarder(f)?;
        }
        let streams = self.job.opts.streams.max(1);
        let bytes_window = (streams * PER_STREAM) as u64 * self.ram.layout().chunk_size();
        while self.sched.outstanding(SOURCE) < streams * QUEUE_PER_STREAM
            && self.sched.outstanding_bytes(SOURCE) < bytes_window
            && self.acct.paced_until().is_none()
        {
            let (ci, only_own) = match self.sched.next_own() {
                Some(ci) => (ci, true),
                None => match self.may_steal().then(|| self.sched.steal()).flatten() {
                    Some(ci) => (ci, false),
                    None => break,
                },
            };
            let what = (ci, SOURCE, self.route.target());
            let forwarders = self.route.forwarders();
            let Some(b) = self.sched.make_batch(&mut self.ledger, self.ram.layout(), what, only_own, forwarders) else {
                continue;
            };
            let bytes = b.epochs.len() as u64 * PAGE_SIZE as u64;
            if let Err(b) = self.target_link().submit(b) {
                self.abandon(&b);
                let why = super::link::LinkError::Closed.to_string();
                return self.route_event(Event::TargetLost { host: self.route.target(), why });
            }
            self.sched.started(SOURCE, bytes);
            self.acct.pace(bytes);
        }
        Ok(())
    }

    fn fill_forwarder(&mut self, f: HostId) -> Result<(), EngineError> {
        let window = self.job.opts.streams.max(1) * FORWARD_PER_STREAM;
        while self.sched.outstanding(f) < window {
            let Some(ci) = self.sched.next_forward(f) else { break };
            let what = (ci, f, self.route.target());
            let forwarders = self.route.forwarders();
            let Some(b) = self.sched.make_batch(&mut self.ledger, self.ram.layout(), what, false, forwarders) else {
                continue;
            };
            let b_bytes = b.page_count() as u64 * PAGE_SIZE as u64;
            if let Err(b) = self.links[&f].forward(b, self.route.name(self.route.target())) {
                self.abandon(&b);
                return self.route_event(Event::ForwarderLost { host: f, why: "control connection closed".into() });
            }
            self.sched.started(f, b_bytes);
        }
        Ok(())
    }

    /// Waits for the next event and handles it.
    pub(super) async fn wait_event(&mut self) -> Result<(), EngineError> {
        let pace = self.acct.paced_until();
        // The time budget binds the rounds; the switchover has its own deadline.
        let phase = self.route.phase();
        let budget = (phase == super::phase::Phase::Precopy)
            .then(|| tokio::time::Instant::from_std(self.start) + Duration::from_secs(self.job.opts.max_time_s));
        let committing = phase.committing();
        let cancellable = !phase.resume_sent();
        let cancel = self.job.handle.cancel.clone();
        let handle = self.job.handle.clone();
        // A target whose control connection ended (it died, froze past the
        // peer timeout, or lost its incoming VM) fails the migration now, or
        // before the pause hands it to a fallback host (`fallback`).
        let target = self.target_link();
        let (dead, left) = (self.route.target_dead(), self.route.leave_handled());
        let slow = (self.slow.enabled() && self.route.fallbacks_left() && !committing).then(|| self.slow.due());
        tokio::select! {
            _ = target.closed.cancelled(), if !dead => {
                let why = crate::error_chain(&target.lost_why());
                self.route_event(Event::TargetLost { host: target.id, why })
            }
            _ = target.leave.cancelled(), if !left => self.route_event(Event::LeaveAsked { why: target.leave_reason() }),
            _ = tokio::time::sleep_until(slow.unwrap_or_else(tokio::time::Instant::now)), if slow.is_some() => {
                self.check_slow()
            }
            // The migration holds a sender of this channel: it never closes.
            Some(c) = self.completions.recv() => self.on_completion(c),
            // Answered even in the pause (refused): an operator never waits
            // for the migration's end.
            Some(r) = self.rt.requests.recv() => self.retarget_asked(r),
            // The migration holds a sender of both: they never close.
            Some(o) = self.rt.opened.recv() => self.opened(o).await,
            Some((host, r)) = self.rt.fenced.recv() => {
                self.route_event(Event::Fenced { host, result: r.map_err(|e| crate::error_chain(&e)) })
            }
            _ = tokio::time::sleep_until(pace.unwrap_or_else(tokio::time::Instant::now)), if pace.is_some() => {
                self.acct.pace_done();
                Ok(())
            }
            _ = cancel.cancelled(), if cancellable => Err(EngineError::Cancelled),
            // An operator's change is taken by the caller's next fill.
            _ = handle.steered() => Ok(()),
            _ = tokio::time::sleep_until(budget.unwrap_or_else(tokio::time::Instant::now)), if budget.is_some() => {
                Err(EngineError::TimeBudget)
            }
        }
    }

    fn on_completion(&mut self, c: Completion) -> Result<(), EngineError> {
        let (b, applied, why) = match c {
            Completion::Applied(b) => (b, true, String::new()),
            Completion::Failed(b, why) => (b, false, why),
        };
        self.sched.ended(b.from, b.page_count() as u64 * PAGE_SIZE as u64);
        let b = match applied {
            true => b,
            false => match self.forward_failed(b, &why)? {
                None => return Ok(()),
                Some(b) => b,
            },
        };
        let n = b.page_count() as u64;
        let mut accepted = 0u64;
        for (p, e) in b.pages().zip(&b.epochs) {
            accepted += u64::from(self.ledger.finish(p, b.from, b.to, *e, applied));
        }
        if applied {
            if b.to == self.route.target() {
                self.acct.applied(n, n * PAGE_SIZE as u64);
                self.slow.applied(n * PAGE_SIZE as u64);
                b.pages().for_each(|p| self.verifier.touch(self.ram.layout(), p));
            }
            if accepted < n {
                tracing::debug!(batch = b.id, stale = n - accepted, "pages written meanwhile; they go again");
            }
            self.update_progress();
            return Ok(());
        }
        if b.to == self.route.target() && b.from == SOURCE {
            return self.route_event(Event::TargetLost { host: b.to, why });
        }
        // Other failures (transfers to an old destination, a re-pointed
        // forwarder's last batches) only leave their pages stale.
        Ok(())
    }
}

impl Migration {
    /// A sample of the target's rate; moves on if it fell behind.
    fn check_slow(&mut self) -> Result<(), EngineError> {
        let backlogged = !self.sched.queue_empty()
            && self.job.opts.max_bandwidth_mbps.is_none()
            && !self.route.target_dead()
            && !self.route.opening()
            && !self.route.phase().paused();
        match self.slow.sample(Instant::now(), backlogged) {
            Some(why) => {
                self.slow.reset();
                self.route_event(Event::Slow { why })
            }
            None => Ok(()),
        }
    }
}
