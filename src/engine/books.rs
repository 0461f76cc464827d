//! The migration's books kept with its tracker: a dirty sync (what the
//! guest wrote, told to the ledger and verification), and a batch's pages
//! given back to the ledger without making them fresh.

use super::{EngineError, Migration};
use crate::memory::PAGE_SIZE;
use crate::transport::Batch;
use std::time::Instant;

impl Migration {
    /// Ends a batch's pages in the ledger without making them fresh.
    pub(super) fn abandon(&mut self, b: &Batch) {
        for (p, e) in b.pages().zip(&b.epochs) {
            self.ledger.finish(p, b.from, b.to, *e, false);
        }
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
