//! Page accounting: which hosts hold each page's current content.
//!
//! The invariant (DESIGN.md): a page is *fresh* at host H only if H's copy
//! equals the source's content as of the latest dirty sync, or the page has
//! been written since and the tracker will report it at the next sync.
//!
//! It is kept by three rules, all enforced here so that no caller can break
//! them:
//! - a dirty sync clears freshness everywhere but the source and bumps the
//!   page's epoch;
//! - a write to H counts only if the page's epoch did not change between the
//!   moment the sender started reading and H's acknowledgement;
//! - **one writer per page and destination at a time**: a transfer of page p
//!   into H (or out of H, when H forwards) cannot start while another one is
//!   in flight, so a newer copy can never be overtaken by an older one. This
//!   matters because two senders (source and forwarder) write into the same
//!   destination concurrently and RDMA writes carry no ordering between them.

use crate::bitmap::Bitmap;

/// A page's sync counter. It only has to tell "synced since the transfer
/// began" from "not", and 2^16 syncs of one page during one transfer
/// cannot happen: two bytes per page instead of four.
pub(crate) type Epoch = u16;

/// A host's index in a migration's host table (at most [`MAX_HOSTS`]).
pub(crate) type HostId = u8;
/// Hosts one migration can involve (source included): a page's freshness
/// and busy marks are one byte of bits each.
pub(crate) const MAX_HOSTS: usize = 8;

/// Per page of a migrating VM: which hosts hold its current content, which
/// have a transfer in flight, and its epoch (bumped by every dirty sync).
pub(crate) struct Ledger {
    source: HostId,
    /// Bit h set: page fresh at host h.
    fresh: Vec<u8>,
    /// Bit h set: a transfer into (or out of) host h is in flight for the page.
    busy: Vec<u8>,
    epoch: Vec<Epoch>,
    fresh_count: [usize; MAX_HOSTS],
    /// Test-only switch that disables the one-writer rule, to prove the
    /// stress test detects what it guards against.
    unordered: bool,
}

impl Ledger {
    /// A ledger for `pages` pages, all fresh at `source` and nowhere else.
    pub(crate) fn new(pages: usize, source: HostId) -> Self {
        assert!((source as usize) < MAX_HOSTS);
        let mut fresh_count = [0; MAX_HOSTS];
        fresh_count[source as usize] = pages;
        Self {
            source,
            fresh: vec![1 << source; pages],
            busy: vec![0; pages],
            epoch: vec![0; pages],
            fresh_count,
            unordered: false,
        }
    }

    /// Disables the one-writer rule (tests only: shows what it prevents;
    /// not in an operator's build, so no caller there can break the rules).
    #[cfg(any(test, feature = "test-hooks"))]
    pub(crate) fn unordered(mut self, on: bool) -> Self {
        self.unordered = on;
        self
    }

    /// The number of pages it accounts for.
    pub(crate) fn pages(&self) -> usize {
        self.fresh.len()
    }

    /// Whether `host` holds the page's current content.
    pub(crate) fn is_fresh(&self, page: usize, host: HostId) -> bool {
        self.fresh[page] & (1 << host) != 0
    }

    /// A transfer touching `host` is in flight for the page (always false
    /// with the test switch that disables the one-writer rule).
    pub(crate) fn is_busy(&self, page: usize, host: HostId) -> bool {
        !self.unordered && self.busy[page] & (1 << host) != 0
    }

    /// Whether every page in `pages` is fresh at `host` or has a transfer
    /// touching it in flight: nothing to plan there. Eight pages at a time,
    /// since planning a round looks at every page of the RAM.
    pub(crate) fn all_settled(&self, pages: std::ops::Range<usize>, host: HostId) -> bool {
        let (fresh, busy) = (&self.fresh[pages.clone()], &self.busy[pages]);
        let busy_mask = if self.unordered { 0 } else { 1u8 << host };
        let (fw, bw) = (fresh.chunks_exact(8), busy.chunks_exact(8));
        let tail = fw.remainder().iter().zip(bw.remainder()).all(|(f, b)| (f | (b & busy_mask)) & (1 << host) != 0);
        let mask = u64::from_ne_bytes([1u8 << host; 8]);
        let busy_mask = u64::from_ne_bytes([busy_mask; 8]);
        let word = |c: &[u8]| u64::from_ne_bytes(c.try_into().expect("8 bytes"));
        tail && fw.zip(bw).all(|(f, b)| (word(f) | (word(b) & busy_mask)) & mask == mask)
    }

    /// How many pages are fresh at `host`.
    pub(crate) fn fresh_count(&self, host: HostId) -> usize {
        self.fresh_count[host as usize]
    }

    fn clear_fresh(&mut self, page: usize, host: HostId) {
        if self.fresh[page] & (1 << host) != 0 {
            self.fresh[page] &= !(1 << host);
            self.fresh_count[host as usize] -= 1;
        }
    }

    fn set_fresh(&mut self, page: usize, host: HostId) {
        if self.fresh[page] & (1 << host) == 0 {
            self.fresh[page] |= 1 << host;
            self.fresh_count[host as usize] += 1;
        }
    }

    /// A dirty sync reported these pages as written since the previous one.
    pub(crate) fn dirty_sync(&mut self, dirty: &Bitmap) {
        for p in dirty.iter_ones() {
            for h in 0..MAX_HOSTS as u8 {
                if h != self.source {
                    self.clear_fresh(p, h);
                }
            }
            self.epoch[p] = self.epoch[p].wrapping_add(1);
        }
    }

    /// Starts a transfer of `page` from `from` to `to`. Returns the epoch to
    /// hand back to [`finish`](Self::finish), or `None` when the transfer may
    /// not start now: `from` holds no current copy, or a transfer touching
    /// either end is in flight (the caller retries after it finished).
    pub(crate) fn begin(&mut self, page: usize, from: HostId, to: HostId) -> Option<Epoch> {
        debug_assert!(to != self.source && from != to);
        if !self.is_fresh(page, from) {
            return None;
        }
        let mut ends = 1u8 << to;
        if from != self.source {
            ends |= 1 << from;
        }
        if self.busy[page] & ends != 0 && !self.unordered {
            return None;
        }
        self.busy[page] |= ends;
        // The old copy at `to` is being overwritten: until this transfer is
        // acknowledged it may be torn.
        self.clear_fresh(page, to);
        Some(self.epoch[page])
    }

    /// Ends a transfer started by [`begin`](Self::begin). `applied` means the
    /// receiver confirmed the bytes are in its memory; the page becomes fresh
    /// there unless a dirty sync happened since the transfer began. Returns
    /// whether it did.
    pub(crate) fn finish(&mut self, page: usize, from: HostId, to: HostId, epoch: Epoch, applied: bool) -> bool {
        self.busy[page] &= !(1 << to);
        if from != self.source {
            self.busy[page] &= !(1 << from);
        }
        if applied && epoch == self.epoch[page] {
            self.set_fresh(page, to);
            true
        } else {
            false
        }
    }

    /// The host's copy of these pages can no longer be trusted (verification
    /// mismatch, or the host is gone).
    pub(crate) fn invalidate(&mut self, pages: std::ops::Range<usize>, host: HostId) {
        for p in pages {
            self.clear_fresh(p, host);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    const PAGES: usize = 6;
    const HOSTS: u8 = 3; // 0 = source, 1 = old destination, 2 = new destination

    #[derive(Clone, Debug)]
    enum Op {
        GuestWrite(usize),
        Sync,
        Begin { page: usize, from: u8, to: u8 },
        Read(usize),
        Deliver(usize),
        Complete(usize),
        Fail(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0..PAGES).prop_map(Op::GuestWrite),
            Just(Op::Sync),
            (0..PAGES, 0..HOSTS, 1..HOSTS).prop_map(|(page, from, to)| Op::Begin { page, from, to }),
            any::<usize>().prop_map(Op::Read),
            any::<usize>().prop_map(Op::Deliver),
            any::<usize>().prop_map(Op::Complete),
            any::<usize>().prop_map(Op::Fail),
        ]
    }

    /// One transfer as the model sees it.
    struct Flight {
        page: usize,
        from: u8,
        to: u8,
        epoch: Epoch,
        /// Version read from `from` (None until the sender read the bytes).
        read: Option<u64>,
        delivered: bool,
    }

    /// Runs the ops against the ledger and a model of every host's bytes;
    /// returns the first invariant violation.
    fn run(ops: &[Op], unordered: bool) -> Result<(), String> {
        let mut ledger = Ledger::new(PAGES, 0).unordered(unordered);
        // copies[h][p]: version of page p held by host h; host 0 is the source.
        let mut copies = vec![vec![0u64; PAGES]; HOSTS as usize];
        for c in copies.iter_mut().skip(1) {
            c.fill(u64::MAX); // destinations start with nothing useful
        }
        let mut next_version = 1u64;
        let mut pending = BTreeSet::new(); // written since the last sync
        let mut flights: Vec<Flight> = Vec::new();
        for op in ops {
            match op.clone() {
                Op::GuestWrite(p) => {
                    copies[0][p] = next_version;
                    next_version += 1;
                    pending.insert(p);
                }
                Op::Sync => {
                    let mut b = Bitmap::new(PAGES);
                    for &p in &pending {
                        b.set(p);
                    }
                    pending.clear();
                    ledger.dirty_sync(&b);
                }
                Op::Begin { page, from, to } => {
                    if from == to {
                        continue;
                    }
                    if let Some(epoch) = ledger.begin(page, from, to) {
                        flights.push(Flight { page, from, to, epoch, read: None, delivered: false });
                    }
                }
                Op::Read(i) => {
                    let n = flights.len();
                    if n > 0 {
                        let f = &mut flights[i % n];
                        if f.read.is_none() {
                            f.read = Some(copies[f.from as usize][f.page]);
                        }
                    }
                }
                Op::Deliver(i) => {
                    let n = flights.len();
                    if n > 0 {
                        let f = &mut flights[i % n];
                        if let (Some(v), false) = (f.read, f.delivered) {
                            copies[f.to as usize][f.page] = v;
                            f.delivered = true;
                        }
                    }
                }
                Op::Complete(i) | Op::Fail(i) => {
                    let n = flights.len();
                    if n == 0 {
                        continue;
                    }
                    let ok = matches!(op, Op::Complete(_));
                    if ok && !flights[i % n].delivered {
                        continue;
                    }
                    let f = flights.swap_remove(i % n);
                    if !ok && f.read.is_some() && !f.delivered {
                        // A failed transfer may leave a torn copy behind.
                        copies[f.to as usize][f.page] = u64::MAX - 1;
                    }
                    ledger.finish(f.page, f.from, f.to, f.epoch, ok);
                }
            }
            check(&ledger, &copies, &pending).map_err(|e| format!("{e} after {op:?}"))?;
        }
        Ok(())
    }

    /// The invariant: a page fresh at a destination holds the source's
    /// bytes, unless it was written since the last sync.
    fn check(ledger: &Ledger, copies: &[Vec<u64>], pending: &BTreeSet<usize>) -> Result<(), String> {
        for (p, current) in copies[0].iter().enumerate() {
            for h in 1..HOSTS {
                if ledger.is_fresh(p, h) && copies[h as usize][p] != *current && !pending.contains(&p) {
                    return Err(format!("page {p} fresh at host {h} but stale"));
                }
            }
        }
        let counted = (0..PAGES).filter(|&q| ledger.is_fresh(q, 1)).count();
        match counted == ledger.fresh_count(1) {
            true => Ok(()),
            false => Err("fresh count drifted".into()),
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        #[test]
        fn invariant_holds(ops in proptest::collection::vec(op(), 1..120)) {
            prop_assert_eq!(run(&ops, false), Ok(()));
        }
    }

    /// The model catches a broken ordering rule: two writers of one page race
    /// and the older copy lands last.
    #[test]
    fn model_catches_unordered_writers() {
        use Op::*;
        let ops = [
            Begin { page: 0, from: 0, to: 2 },
            Read(0),
            GuestWrite(0),
            Sync,
            Begin { page: 0, from: 0, to: 2 },
            Read(1),
            Deliver(1),
            Deliver(0),
            Complete(1),
        ];
        assert!(run(&ops, true).is_err());
        assert_eq!(run(&ops, false), Ok(()));
    }

    #[test]
    fn forward_needs_fresh_copy() {
        let mut l = Ledger::new(2, 0);
        assert_eq!(l.begin(0, 1, 2), None, "host 1 holds nothing yet");
        let e = l.begin(0, 0, 1).unwrap();
        assert!(l.finish(0, 0, 1, e, true));
        let e = l.begin(0, 1, 2).unwrap();
        assert_eq!(l.begin(0, 0, 1), None, "host 1 is being read");
        assert!(l.finish(0, 1, 2, e, true));
        assert_eq!(l.fresh_count(2), 1);
    }

    #[test]
    fn all_settled_agrees_with_the_pages_one_by_one() {
        let mut l = Ledger::new(29, 0);
        for p in [0, 3, 8, 9, 16, 17, 18, 19, 20, 21, 22, 23, 28] {
            let e = l.begin(p, 0, 1).unwrap();
            if p % 2 == 0 {
                assert!(l.finish(p, 0, 1, e, true)); // fresh at 1; odd pages stay busy
            }
        }
        for start in 0..29 {
            for end in start..=29 {
                let one_by_one = (start..end).all(|p| l.is_fresh(p, 1) || l.is_busy(p, 1));
                assert_eq!(l.all_settled(start..end, 1), one_by_one, "{start}..{end}");
                assert!(l.all_settled(start..end, 0));
            }
        }
    }
}
