//! Pre-copy: rounds of dirty pages while the VM runs, until the estimated
//! downtime fits the limit (converged) or the budget runs out (forced, or
//! given up).

use super::report::Switchover;
use super::schedule::SOURCE;
use super::{BudgetAction, EngineError, Migration};
use std::time::Duration;

impl Migration {
    /// Rounds of dirty pages; returns how the switchover was reached and
    /// the downtime estimate at that point.
    pub(super) async fn precopy(&mut self) -> Result<(Switchover, Duration), EngineError> {
        let budget = Duration::from_secs(self.job.opts.max_time_s);
        let mut counted = 0u32;
        let mut estimate = Duration::MAX;
        self.begin_round()?;
        loop {
            match self.send_round().await {
                // `--max-time` is a hard budget: it ends a round midway.
                Err(EngineError::TimeBudget) => {
                    let why =
                        format!("the time budget of {} s ran out in round {}", budget.as_secs(), self.acct.round.round);
                    return self.budget_spent(why).map(|s| (s, estimate));
                }
                r => r?,
            }
            self.end_round();
            self.measure_verification().await?;
            let dirty = self.dirty_sync().await?.count();
            let stale = self.stale_blocks();
            let verify;
            (estimate, verify) = self.close_round(dirty, &stale);
            // The operator may have changed the limit, or asked to finish.
            self.apply_steering();
            if self.force_complete {
                tracing::info!("switching over: the operator asked (force-complete)");
                return Ok((Switchover::Requested, estimate));
            }
            let limit = Duration::from_millis(self.job.opts.downtime_ms);
            // Forwarders' work is done while the VM still runs: their rate
            // is not in the estimate, and they have nothing dirty to wait for.
            let forwarding =
                !self.sched.pools_empty() || self.route.forwarders().iter().any(|&f| self.sched.outstanding(f) > 0);
            let converged = estimate <= limit && !forwarding;
            // Only the pause's comparisons (blocks the guest wrote during or
            // since the last live pass) keep it from converging: another
            // live pass proves them while the guest runs.
            let verify_bound = !converged
                && !forwarding
                && estimate.saturating_sub(verify) <= limit
                && self.verifier.another_live_pass_allowed(self.route.target());
            // Rounds cut short while forwarders still hold work do not count
            // against the round budget (the time budget still applies).
            if !converged && self.sched.pools_empty() {
                counted += 1;
            }
            let in_time = self.start.elapsed() < budget;
            if verify_bound && in_time && counted < self.job.opts.max_rounds {
                self.live_pass_or_fall_back(&stale).await?;
                self.begin_round()?;
                continue;
            }
            if converged || counted >= self.job.opts.max_rounds || !in_time {
                // A live pass first: after convergence while the pause would
                // still compare a lot; before a forced switchover, once, so
                // the pause compares only what changed since, not every block.
                let live = if converged {
                    self.verifier.live_pass_due(self.route.target(), &stale, limit)
                } else {
                    // Not when the migration is about to give up.
                    in_time
                        && self.job.opts.on_budget == BudgetAction::Force
                        && self.verifier.first_live_pass_due(self.route.target())
                };
                if live {
                    // Then a round for what it found and what the guest wrote meanwhile.
                    self.live_pass_or_fall_back(&stale).await?;
                }
                if live || self.held().await? {
                    self.begin_round()?;
                    continue;
                }
                if converged {
                    return Ok((Switchover::Converged, estimate));
                }
                let why = self.rounds_spent(counted, estimate, limit);
                return self.budget_spent(why).map(|s| (s, estimate));
            }
            self.begin_round()?;
        }
    }

    /// A live verification pass; a target lost meanwhile is handled as in
    /// the event loop (a fallback host, if any).
    async fn live_pass_or_fall_back(&mut self, stale: &crate::bitmap::Bitmap) -> Result<(), EngineError> {
        match self.live_pass(stale).await {
            Err(e) => self.recover_lost(e),
            ok => ok,
        }
    }

    /// Sends until the round is over (or fails, or the time budget ends it).
    async fn send_round(&mut self) -> Result<(), EngineError> {
        loop {
            self.apply_steering();
            self.fill()?;
            if self.round_over() {
                return Ok(());
            }
            self.wait_event().await?;
        }
    }

    /// Why the round budget ran out.
    fn rounds_spent(&self, counted: u32, estimate: Duration, limit: Duration) -> String {
        format!(
            "after {counted} rounds and {:.1} s, {} MB still dirty (estimated downtime {} ms > {} ms)",
            self.start.elapsed().as_secs_f64(),
            self.remaining_bytes() / 1_000_000,
            estimate.as_millis(),
            limit.as_millis()
        )
    }

    /// The budget ran out: switch over anyway, or give up, as asked.
    fn budget_spent(&self, why: String) -> Result<Switchover, EngineError> {
        match self.job.opts.on_budget {
            BudgetAction::Force => {
                tracing::warn!("forcing switchover: {why}");
                Ok(Switchover::Forced)
            }
            BudgetAction::Abort => Err(EngineError::GaveUp(why)),
        }
    }

    /// Records the round just ended with the sync's findings; returns the
    /// downtime estimate, and the part of it the pause's comparisons take.
    fn close_round(&mut self, dirty: usize, stale: &crate::bitmap::Bitmap) -> (Duration, Duration) {
        let last = self.report.rounds.last_mut().expect("round recorded");
        last.dirty_pages = dirty as u64;
        last.sync_ms = self.acct.last_sync_cost.as_secs_f64() * 1e3;
        last.guest_stop_ms = self.acct.last_guest_stop.map(|d| d.as_secs_f64() * 1e3);
        tracing::info!(round = last.round, pages = last.pages, ms = last.ms, dirty, "round done");
        let last = last.clone();
        self.job.handle.round_done(&last);
        // The pause also takes a final dirty sync, as long as a round's.
        let sync = self.acct.last_sync_cost;
        let send = self.acct.estimate(self.remaining_bytes(), &last);
        let verify = self.verifier.pause_cost(self.route.target(), stale);
        tracing::debug!(?send, ?verify, ?sync, "downtime estimate");
        let estimate = send + verify + sync;
        self.report.rounds.last_mut().expect("round recorded").estimate_ms = Some(estimate.as_secs_f64() * 1e3);
        (estimate, verify)
    }

    /// A round is over when the source has nothing left to send and nothing
    /// in flight, and either it sent something or the forwarders are idle
    /// too (so it does not spin through empty rounds while they work).
    fn round_over(&self) -> bool {
        let forwarding: usize = self.route.forwarders().iter().map(|f| self.sched.outstanding(*f)).sum();
        let may_steal = super::schedule::Schedule::may_steal(
            self.route.phase().paused(),
            self.acct.round_elapsed(),
            self.acct.last_sync_cost,
        );
        self.sched.queue_empty()
            && (self.sched.pools_empty() || !may_steal)
            && self.sched.outstanding(SOURCE) == 0
            && self.acct.paced_until().is_none()
            && self.route.fences_pending() == 0
            && !self.route.target_dead()
            && (self.acct.round.pages > 0 || forwarding == 0)
    }

    /// Test builds: waits at the switchover until the test releases the
    /// migration; true if a retarget was installed meanwhile (there is then
    /// more to send first).
    #[cfg(feature = "test-hooks")]
    async fn held(&mut self) -> Result<bool, EngineError> {
        if !self.job.opts.hold_switchover {
            return Ok(false);
        }
        let retargets = self.report.retargets.len();
        // The release wakes `wait_event` (never cancelled half-way: an
        // install it runs must not be cut off).
        while !*self.job.handle.released.borrow() {
            self.wait_event().await?;
            if self.report.retargets.len() != retargets || self.route.target_dead() {
                return Ok(true);
            }
        }
        tracing::info!("test hold released: switching over");
        Ok(false)
    }

    #[cfg(not(feature = "test-hooks"))]
    async fn held(&mut self) -> Result<bool, EngineError> {
        Ok(false)
    }
}
