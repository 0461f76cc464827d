//! Scheduling: which chunks each sender works on. The source has a queue of
//! chunks with pages only it holds; every forwarder has a pool of chunks it
//! can send, taken from the front by the forwarder and stolen from the back
//! by the source, so that both finish together. Batches are begun in the
//! [`Ledger`], which refuses any page that may not move now.

use crate::ledger::{HostId, Ledger};
use crate::memory::Layout;
use crate::transport::{Batch, Run};
use std::collections::{HashMap, VecDeque};
use std::time::Duration;

/// The source's own id in every migration.
pub(crate) const SOURCE: HostId = 0;
/// The source's bytes in flight per stream, in chunks: full chunks keep
/// this many in flight on each stream; batches of a few dirty pages (the
/// last rounds) keep more, up to [`QUEUE_PER_STREAM`] (the sender's queue
/// bound), so that a round trip carries more than a few pages.
pub(crate) const PER_STREAM: usize = 6;
pub(crate) use crate::transport::QUEUE_PER_STREAM;
/// A forwarder's claims in flight per stream: small, because claimed chunks
/// cannot be taken back, so they bound how long the others wait at the end.
pub(crate) const FORWARD_PER_STREAM: usize = 2;
/// How long into a round the source may take pool chunks from forwarders.
/// Only the source can send pages the guest dirties, so it must not spend a
/// long round on work a forwarder can do while dirty pages pile up: it
/// steals for a bounded time, then syncs and sends what is newly dirty.
const STEAL_WINDOW: Duration = Duration::from_millis(250);

/// Work waiting for senders, and work in flight.
#[derive(Default)]
pub(crate) struct Schedule {
    /// Chunks with pages only the source holds, this round.
    queue: VecDeque<usize>,
    /// Chunks a forwarder can send (front: the forwarder; back: the source steals).
    pools: HashMap<HostId, VecDeque<usize>>,
    /// Batches in flight by sending host, and their payload bytes.
    outstanding: HashMap<HostId, (usize, u64)>,
    next_batch: u64,
}

impl Schedule {
    /// Sorts the chunks with pages `target` lacks: into the pool of the
    /// first forwarder (newest first) holding some of them, and into the
    /// source's queue if some are held by no forwarder. Returns the
    /// forwarders with nothing left to do.
    pub(crate) fn plan(
        &mut self,
        ledger: &Ledger,
        layout: &Layout,
        target: HostId,
        forwarders: &[HostId],
    ) -> Vec<HostId> {
        self.queue.clear();
        self.pools.clear();
        for (ci, c) in layout.chunks().iter().enumerate() {
            if ledger.all_settled(c.first_page..c.first_page + c.pages, target) {
                continue;
            }
            let (mut own, mut pool) = (false, None);
            for p in c.first_page..c.first_page + c.pages {
                if ledger.is_fresh(p, target) || ledger.is_busy(p, target) {
                    continue;
                }
                match forwarders.iter().find(|&&f| ledger.is_fresh(p, f)) {
                    Some(&f) => pool = pool.or(Some(f)),
                    None => own = true,
                }
            }
            if own {
                self.queue.push_back(ci);
            }
            if let Some(f) = pool {
                self.pools.entry(f).or_default().push_back(ci);
            }
        }
        forwarders.iter().copied().filter(|&f| !self.has_work(f) && self.outstanding(f) == 0).collect()
    }

    /// Pages of chunk `ci` that `from` sends to `to` now, begun in the
    /// ledger (busy pages are skipped: one writer per page at a time). With
    /// `only_own`, the source leaves out pages a forwarder holds.
    pub(crate) fn make_batch(
        &mut self,
        ledger: &mut Ledger,
        layout: &Layout,
        (ci, from, to): (usize, HostId, HostId),
        only_own: bool,
        forwarders: &[HostId],
    ) -> Option<Batch> {
        let c = layout.chunks()[ci];
        let (mut runs, mut epochs): (Vec<Run>, Vec<crate::ledger::Epoch>) = (vec![], vec![]);
        for p in c.first_page..c.first_page + c.pages {
            if ledger.is_fresh(p, to) {
                continue;
            }
            if from == SOURCE && only_own && forwarders.iter().any(|&f| ledger.is_fresh(p, f)) {
                continue;
            }
            let Some(e) = ledger.begin(p, from, to) else { continue };
            epochs.push(e);
            match runs.last_mut() {
                Some(r) if r.first_page + r.pages == p => r.pages += 1,
                _ => runs.push(Run { first_page: p, pages: 1 }),
            }
        }
        if runs.is_empty() {
            return None;
        }
        self.next_batch += 1;
        Some(Batch { id: self.next_batch, chunk: ci, from, to, runs, epochs })
    }

    /// The source's next own chunk.
    pub(crate) fn next_own(&mut self) -> Option<usize> {
        self.queue.pop_front()
    }

    /// Forwarder `f`'s next chunk, from the front of its pool.
    pub(crate) fn next_forward(&mut self, f: HostId) -> Option<usize> {
        self.pools.get_mut(&f).and_then(|p| p.pop_front())
    }

    /// A chunk from the back of the longest forwarder pool, for the source.
    pub(crate) fn steal(&mut self) -> Option<usize> {
        self.pools.values_mut().filter(|p| !p.is_empty()).max_by_key(|p| p.len())?.pop_back()
    }

    /// Paused, nothing gets dirty: steal freely. Running: for a bounded part
    /// of each round (longer if syncs are slow, as with the hash tracker).
    pub(crate) fn may_steal(paused: bool, round_elapsed: Duration, sync_cost: Duration) -> bool {
        paused || round_elapsed < STEAL_WINDOW.max(sync_cost * 4)
    }

    /// Batches `h` has in flight.
    pub(crate) fn outstanding(&self, h: HostId) -> usize {
        self.outstanding.get(&h).map_or(0, |o| o.0)
    }

    /// Payload bytes `h` has in flight.
    pub(crate) fn outstanding_bytes(&self, h: HostId) -> u64 {
        self.outstanding.get(&h).map_or(0, |o| o.1)
    }

    /// Batches in flight from every host.
    pub(crate) fn in_flight(&self) -> usize {
        self.outstanding.values().map(|o| o.0).sum()
    }

    /// `h` put a batch of `bytes` in flight.
    pub(crate) fn started(&mut self, h: HostId, bytes: u64) {
        let o = self.outstanding.entry(h).or_default();
        *o = (o.0 + 1, o.1 + bytes);
    }

    /// A batch of `h` of `bytes` completed, either way.
    pub(crate) fn ended(&mut self, h: HostId, bytes: u64) {
        if let Some(o) = self.outstanding.get_mut(&h) {
            *o = (o.0.saturating_sub(1), o.1.saturating_sub(bytes));
        }
    }

    /// Forwarder `f` still has chunks in its pool.
    pub(crate) fn has_work(&self, f: HostId) -> bool {
        self.pools.get(&f).is_some_and(|p| !p.is_empty())
    }

    /// No forwarder has chunks left in its pool.
    pub(crate) fn pools_empty(&self) -> bool {
        self.pools.values().all(|p| p.is_empty())
    }

    /// The source's queue is empty.
    pub(crate) fn queue_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Forgets forwarder `f`'s pool.
    pub(crate) fn drop_pool(&mut self, f: HostId) {
        self.pools.remove(&f);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{RegionSpec, PAGE_SIZE};

    #[test]
    fn forwarder_pools_and_source_queue() {
        let layout =
            Layout::new(vec![RegionSpec { id: "r".into(), size: 8 * PAGE_SIZE as u64 }], 2 * PAGE_SIZE as u64).unwrap();
        let mut ledger = Ledger::new(8, SOURCE);
        // Host 1 (old destination) holds pages 0..4; host 2 is the new target.
        for p in 0..4 {
            let e = ledger.begin(p, SOURCE, 1).unwrap();
            ledger.finish(p, SOURCE, 1, e, true);
        }
        let mut s = Schedule::default();
        assert!(s.plan(&ledger, &layout, 2, &[1]).is_empty(), "host 1 has work");
        assert_eq!((s.next_forward(1), s.steal(), s.next_forward(1)), (Some(0), Some(1), None));
        assert_eq!((s.next_own(), s.next_own(), s.next_own()), (Some(2), Some(3), None));
        let b = s.make_batch(&mut ledger, &layout, (0, 1, 2), false, &[1]).unwrap();
        assert_eq!(b.runs, vec![Run { first_page: 0, pages: 2 }]);
        assert!(s.make_batch(&mut ledger, &layout, (0, SOURCE, 2), false, &[1]).is_none(), "pages busy");
        assert!(Schedule::may_steal(false, Duration::ZERO, Duration::ZERO));
        assert!(!Schedule::may_steal(false, Duration::from_secs(1), Duration::ZERO));
    }
}
