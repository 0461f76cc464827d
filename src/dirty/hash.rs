//! Hash tracking: per-page xxh3 of the content; works for any RAM we can map.
//!
//! A sync hashes every page and reports those whose hash changed. Senders
//! report the bytes they actually read: if a page changed after the sync
//! (and possibly changed back before the next one: the ABA case), its sent
//! copy differs from the baseline and the page is reported again.
//! Holes in the RAM files are hashed as zeros without being read: reading a
//! hole through a shared tmpfs mapping would allocate it.

use super::{DirtyError, DirtyTracker, SendObserver, TrackerKind};
use crate::bitmap::{AtomicBitmap, Bitmap};
use crate::memory::{GuestRam, PAGE_SIZE};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use xxhash_rust::xxh3::xxh3_64;

struct State {
    baseline: Vec<AtomicU64>,
    pending: AtomicBitmap,
}

pub struct HashTracker {
    state: Arc<State>,
}

impl HashTracker {
    pub fn start(ram: &GuestRam) -> Result<Self, DirtyError> {
        self_test()?;
        let data = data_pages(ram);
        Ok(Self::baseline(ram.layout().total_pages(), |p| page_hash(ram, &data, p)))
    }

    fn baseline(pages: usize, hash: impl Fn(usize) -> u64) -> Self {
        Self {
            state: Arc::new(State {
                baseline: (0..pages).map(|p| AtomicU64::new(hash(p))).collect(),
                pending: AtomicBitmap::new(pages),
            }),
        }
    }

    fn sync_with(&mut self, pages: usize, hash: impl Fn(usize) -> u64) -> Bitmap {
        let mut dirty = self.state.pending.drain();
        for p in 0..pages {
            let h = hash(p);
            if self.state.baseline[p].swap(h, Ordering::Relaxed) != h {
                dirty.set(p);
            }
        }
        dirty
    }
}

fn data_pages(ram: &GuestRam) -> Bitmap {
    ram.data_pages().unwrap_or_else(|e| {
        tracing::warn!("cannot tell holes from data ({e}): hashing every page");
        Bitmap::full(ram.layout().total_pages())
    })
}

fn page_hash(ram: &GuestRam, data: &Bitmap, page: usize) -> u64 {
    static ZERO: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    if data.get(page) {
        xxh3_64(ram.page_bytes(page))
    } else {
        *ZERO.get_or_init(|| xxh3_64(&[0u8; PAGE_SIZE]))
    }
}

/// Proves on scratch memory that a changed page, and only it, is reported,
/// and that the sent-copy check catches a change after the sync.
fn self_test() -> Result<(), DirtyError> {
    let fail = |msg: &str| DirtyError::SelfTest { tracker: "hash", msg: msg.into() };
    let mut mem = vec![7u8; 4 * PAGE_SIZE];
    let page = |m: &[u8], p: usize| xxh3_64(&m[p * PAGE_SIZE..(p + 1) * PAGE_SIZE]);
    let mut t = HashTracker::baseline(4, |p| page(&mem, p));
    mem[2 * PAGE_SIZE + 100] ^= 1;
    let d = t.sync_with(4, |p| page(&mem, p));
    if d.iter_ones().collect::<Vec<_>>() != vec![2] {
        return Err(fail("a one-byte change was not reported exactly"));
    }
    t.state.observe(1, &[0u8; PAGE_SIZE]);
    if !t.sync_with(4, |p| page(&mem, p)).get(1) {
        return Err(fail("a sent copy that differs from the baseline was not reported"));
    }
    Ok(())
}

impl SendObserver for State {
    fn observe(&self, page: usize, bytes: &[u8]) {
        if let Some(b) = self.baseline.get(page) {
            if b.load(Ordering::Relaxed) != xxh3_64(bytes) {
                self.pending.set(page);
            }
        }
    }
}

impl DirtyTracker for HashTracker {
    fn kind(&self) -> TrackerKind {
        TrackerKind::Hash
    }

    fn sync(&mut self, ram: &GuestRam) -> Result<Bitmap, DirtyError> {
        let data = data_pages(ram);
        Ok(self.sync_with(ram.layout().total_pages(), |p| page_hash(ram, &data, p)))
    }

    fn observer(&self) -> Option<Arc<dyn SendObserver>> {
        Some(self.state.clone())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn self_test_passes() {
        super::self_test().unwrap();
    }
}
