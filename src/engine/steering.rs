//! What an operator changes while a migration runs (`dcmigrate set`,
//! `force-complete`), applied by the engine: a new rate cap at once, a new
//! downtime limit and a forced switchover at the next round's end.

use super::Migration;

impl Migration {
    /// Takes what the operator asked since the last look.
    pub(super) fn apply_steering(&mut self) {
        let s = self.job.handle.take_steering();
        if s.is_empty() {
            return;
        }
        let vm = &self.report.vm;
        if let Some(mbps) = s.max_bandwidth_mbps {
            let cap = (mbps > 0.0).then_some(mbps);
            tracing::info!(%vm, "operator: rate cap {}", cap.map_or("lifted".into(), |c| format!("{c} MB/s")));
            self.job.opts.max_bandwidth_mbps = cap;
            self.acct.set_cap(cap);
            self.report.steering.push(format!("max_bandwidth_mbps={mbps} at {:.1} s", self.elapsed_s()));
        }
        if let Some(ms) = s.downtime_ms {
            tracing::info!(%vm, "operator: downtime limit {ms} ms");
            self.job.opts.downtime_ms = ms;
            self.report.steering.push(format!("downtime_ms={ms} at {:.1} s", self.elapsed_s()));
        }
        if s.force_complete && !self.force_complete {
            tracing::info!(%vm, "operator: force-complete at the next round's end");
            self.force_complete = true;
            self.report.steering.push(format!("force_complete at {:.1} s", self.elapsed_s()));
        }
    }

    /// A change that arrived after the last look, as the switchover began
    /// (the API refuses them once the VM is paused): in the report, not lost
    /// silently.
    pub(super) fn steering_too_late(&mut self) {
        let s = self.job.handle.take_steering();
        if !s.is_empty() {
            tracing::warn!(vm = %self.report.vm, "operator's change arrived as the switchover began: not applied");
            self.report.steering.push(format!("not applied (the switchover had begun): {s:?}"));
        }
    }

    fn elapsed_s(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }
}
