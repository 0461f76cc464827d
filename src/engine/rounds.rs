//! Rounds: beginning one (planning who sends what), ending one (its
//! record), and the final one in the pause that sends everything the
//! target lacks, with every sender.

use super::{EngineError, Migration};

impl Migration {
    pub(super) fn begin_round(&mut self) -> Result<(), EngineError> {
        let n = self.report.rounds.len() as u32;
        self.acct.begin_round(n);
        if !self.route.phase().paused() {
            self.set_phase(&format!("round {n}"));
        }
        self.job.handle.set_progress(|p| p.round = n);
        self.plan()
    }

    pub(super) fn end_round(&mut self) {
        let r = self.acct.end_round();
        self.report.rounds.push(r);
    }

    /// Sends everything the target lacks, with every sender, until it has
    /// all of it (the VM is paused: nothing gets dirty meanwhile).
    pub(super) async fn drain(&mut self) -> Result<(), EngineError> {
        self.begin_round()?;
        loop {
            self.fill()?;
            let in_flight = self.sched.in_flight() + self.route.fences_pending();
            if in_flight == 0 && self.sched.queue_empty() && self.sched.pools_empty() && !self.route.target_dead() {
                if self.remaining_bytes() == 0 {
                    break;
                }
                // Pages skipped while another writer had them: plan again.
                self.plan()?;
                if self.sched.queue_empty() && self.sched.pools_empty() {
                    return Err(EngineError::Stranded(self.remaining_bytes()));
                }
                continue;
            }
            self.wait_event().await?;
        }
        self.end_round();
        Ok(())
    }
}
