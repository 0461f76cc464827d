//! The engine's event loop pieces: handing work to senders up to their
//! windows, waiting for whatever happens next (a completion, a retarget, a
//! fence, the pacer, a cancel), and feeding completions to the ledger.

use super::schedule::{Schedule, FORWARD_PER_STREAM, PER_STREAM, QUEUE_PER_STREAM, SOURCE};
use super::{EngineError, Migration};
use crate::ledger::HostId;
use crate::memory::PAGE_SIZE;
use crate::transport::{Batch, Completion};
use std::time::{Duration, Instant};

impl Migration {
    /// Sorts the chunks the target lacks onto the senders, and releases the
    /// forwarders left with nothing to send.
    pub(super) fn plan(&mut self) {
        let idle = self.sched.plan(&self.ledger, self.ram.layout(), self.hosts.target, &self.hosts.forwarders);
        for f in idle {
            self.release(f, "it holds nothing the new destination lacks");
        }
    }

    /// Ends a batch's pages in the ledger without making them fresh.
    pub(super) fn abandon(&mut self, b: &Batch) {
        for (p, e) in b.pages().zip(&b.epochs) {
            self.ledger.finish(p, b.from, b.to, *e, false);
        }
    }

    fn may_steal(&self) -> bool {
        Schedule::may_steal(self.phase.paused(), self.acct.round_elapsed(), self.acct.last_sync_cost)
    }

    /// Hands out work up to each sender's window.
    pub(super) fn fill(&mut self) -> Result<(), EngineError> {
        // A lost target gets nothing until a fallback host replaces it.
        if self.fb.dead.is_some() {
            return Ok(());
        }
        for f in self.hosts.forwarders.clone() {
            self.fill_forwarder(f);
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
            let what = (ci, SOURCE, self.hosts.target);
            let forwarders = &self.hosts.forwarders;
            let Some(b) = self.sched.make_batch(&mut self.ledger, self.ram.layout(), what, only_own, forwarders) else {
                continue;
            };
            let bytes = b.epochs.len() as u64 * PAGE_SIZE as u64;
            if let Err(b) = self.target_link().submit(b) {
                self.abandon(&b);
                return self.target_lost(self.hosts.target, super::link::LinkError::Closed);
            }
            self.sched.started(SOURCE, bytes);
            self.acct.pace(bytes);
        }
        Ok(())
    }

    fn fill_forwarder(&mut self, f: HostId) {
        let window = self.job.opts.streams.max(1) * FORWARD_PER_STREAM;
        while self.sched.outstanding(f) < window {
            let Some(ci) = self.sched.next_forward(f) else { break };
            let what = (ci, f, self.hosts.target);
            let forwarders = &self.hosts.forwarders;
            let Some(b) = self.sched.make_batch(&mut self.ledger, self.ram.layout(), what, false, forwarders) else {
                continue;
            };
            let b_bytes = b.page_count() as u64 * PAGE_SIZE as u64;
            if let Err(b) = self.hosts.links[&f].forward(b, &self.hosts.names[self.hosts.target as usize]) {
                self.abandon(&b);
                self.forwarder_lost(f, "control connection closed");
                break;
            }
            self.sched.started(f, b_bytes);
        }
    }

    /// Waits for the next event and handles it.
    pub(super) async fn wait_event(&mut self) -> Result<(), EngineError> {
        let pace = self.acct.paced_until();
        // The time budget binds the rounds; the switchover has its own deadline.
        let budget = (self.phase == super::phase::Phase::Precopy)
            .then(|| tokio::time::Instant::from_std(self.start) + Duration::from_secs(self.job.opts.max_time_s));
        let committing = self.phase.committing();
        let cancellable = !self.phase.resume_sent();
        let cancel = self.job.handle.cancel.clone();
        let handle = self.job.handle.clone();
        // A target whose control connection ended (it died, froze past the
        // peer timeout, or lost its incoming VM) fails the migration now, or
        // before the pause hands it to a fallback host (`fallback`).
        let target = self.target_link();
        let (dead, left) = (self.fb.dead.is_some(), self.fb.left(target.id));
        let slow = (self.fb.slow.enabled() && self.fb.any_left() && !committing).then(|| self.fb.slow.due());
        tokio::select! {
            _ = target.closed.cancelled(), if !dead => self.target_lost(target.id, target.lost_why()),
            _ = target.leave.cancelled(), if !left => {
                self.target_leaving();
                Ok(())
            }
            _ = tokio::time::sleep_until(slow.unwrap_or_else(tokio::time::Instant::now)), if slow.is_some() => {
                self.check_slow();
                Ok(())
            }
            // The migration holds a sender of this channel: it never closes.
            Some(c) = self.completions.recv() => self.on_completion(c),
            r = self.rt.requests.recv(), if !committing => {
                if let Some(r) = r {
                    self.start_retarget(r);
                }
                Ok(())
            }
            o = self.rt.opened.recv() => {
                match o {
                    Some(o) => self.install_target(o).await,
                    None => Ok(()),
                }
            }
            f = self.rt.fenced_rx.recv() => match f {
                Some(f) => self.on_fenced(f),
                None => Ok(()),
            },
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
            false => match self.fence_failed_forward(b, &why) {
                Ok(()) => return Ok(()),
                Err(b) => b,
            },
        };
        let n = b.page_count() as u64;
        let mut accepted = 0u64;
        for (p, e) in b.pages().zip(&b.epochs) {
            accepted += u64::from(self.ledger.finish(p, b.from, b.to, *e, applied));
        }
        if applied {
            if b.to == self.hosts.target {
                self.acct.applied(n, n * PAGE_SIZE as u64);
                self.fb.slow.applied(n * PAGE_SIZE as u64);
                b.pages().for_each(|p| self.verifier.touch(self.ram.layout(), p));
            }
            if accepted < n {
                tracing::debug!(batch = b.id, stale = n - accepted, "pages written meanwhile; they go again");
            }
            self.update_progress();
            return Ok(());
        }
        if b.to == self.hosts.target && b.from == SOURCE {
            return self.target_lost(b.to, super::link::LinkError::Peer(why));
        }
        // Other failures (transfers to an old destination, a re-pointed
        // forwarder's last batches) only leave their pages stale.
        Ok(())
    }

    /// Asks the tracker what changed and tells the ledger (and verification);
    /// returns the pages.
    pub(super) async fn dirty_sync(&mut self) -> Result<crate::bitmap::Bitmap, EngineError> {
        let t0 = Instant::now();
        let mut tracker = self.tracker.take().expect("the tracker is back after every sync");
        let ram = self.ram.clone();
        let (tracker, dirty) = tokio::task::spawn_blocking(move || {
            let d = tracker.sync(&ram);
            (tracker, d)
        })
        .await
        .map_err(EngineError::Task)?;
        self.acct.last_guest_stop = tracker.last_stop();
        self.tracker = Some(tracker);
        let dirty = dirty.map_err(EngineError::Sync)?;
        self.ledger.dirty_sync(&dirty);
        if let Some(z) = self.zero_pages.as_mut() {
            dirty.iter_ones().for_each(|p| z.clear(p));
        }
        let layout = self.ram.layout();
        dirty.iter_ones().for_each(|p| self.verifier.touch(layout, p));
        let n = dirty.count();
        let secs = self.acct.synced(t0.elapsed()).as_secs_f64().max(1e-3);
        self.job.handle.set_progress(|p| p.dirty_rate_mbps = n as f64 * PAGE_SIZE as f64 / secs / 1e6);
        self.update_progress();
        Ok(dirty)
    }
}
