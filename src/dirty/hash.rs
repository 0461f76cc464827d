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
use crate::memory::{digest, GuestRam, PAGE_SIZE};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

struct State {
    baseline: Vec<AtomicU64>,
    pending: AtomicBitmap,
}

/// Tracks any RAM by comparing per-page hashes with those of the previous
/// sync (and with what senders read).
pub struct HashTracker {
    state: Arc<State>,
}

impl HashTracker {
    /// Self-tests, then takes every page's hash as the baseline: a scan of
    /// all of `ram` (holes count as zeros without being read).
    pub fn start(ram: &GuestRam) -> Result<Self, DirtyError> {
        self_test()?;
        let data = data_pages(ram);
        Ok(Self::baseline(ram.layout().total_pages(), ram_hasher(ram, &data)))
    }

    fn baseline(pages: usize, hash: impl HashRange) -> Self {
        let baseline: Vec<AtomicU64> = (0..pages).map(|_| AtomicU64::new(0)).collect();
        on_all_cores(pages, |range| hash(range, &mut |p, h| baseline[p].store(h, Ordering::Relaxed)));
        Self { state: Arc::new(State { baseline, pending: AtomicBitmap::new(pages) }) }
    }

    /// Hashes every page (on all cores); the pages whose hash changed, and
    /// those senders saw change, are dirty.
    fn sync_with(&mut self, pages: usize, hash: impl HashRange) -> Bitmap {
        let mut dirty = self.state.pending.drain();
        let baseline = &self.state.baseline;
        let parts = on_all_cores(pages, |range| {
            let first_word = range.start / 64;
            let mut words = vec![0u64; range.len().div_ceil(64)];
            hash(range, &mut |p, h| {
                if baseline[p].swap(h, Ordering::Relaxed) != h {
                    words[p / 64 - first_word] |= 1 << (p % 64);
                }
            });
            (first_word, words)
        });
        for (first_word, words) in parts {
            for (i, w) in words.into_iter().enumerate().filter(|(_, w)| *w != 0) {
                dirty.or_word(first_word + i, w);
            }
        }
        dirty
    }
}

/// Runs `f` over `0..pages` cut into one range per core (each a whole
/// number of 64-page words); returns the results in order.
fn on_all_cores<T: Send>(pages: usize, f: impl Fn(std::ops::Range<usize>) -> T + Sync) -> Vec<T> {
    let words = pages.div_ceil(64);
    let threads = std::thread::available_parallelism().map_or(1, |t| t.get()).clamp(1, words.max(1));
    let per = words.div_ceil(threads) * 64;
    let f = &f;
    std::thread::scope(|s| {
        let handles: Vec<_> =
            (0..pages).step_by(per.max(64)).map(|a| s.spawn(move || f(a..(a + per).min(pages)))).collect();
        handles.into_iter().map(|h| h.join().expect("hashing thread")).collect()
    })
}

fn data_pages(ram: &GuestRam) -> Bitmap {
    ram.data_pages().unwrap_or_else(|e| {
        tracing::warn!("cannot tell holes from data ({e}): hashing every page");
        Bitmap::full(ram.layout().total_pages())
    })
}

/// Hashes a range of pages, giving each page's hash to the callback.
trait HashRange: Fn(std::ops::Range<usize>, &mut dyn FnMut(usize, u64)) + Sync {}
impl<F: Fn(std::ops::Range<usize>, &mut dyn FnMut(usize, u64)) + Sync> HashRange for F {}

/// Hashes pages of `ram` (holes in `data` as zeros, unread).
fn ram_hasher<'a>(ram: &'a GuestRam, data: &'a Bitmap) -> impl HashRange + 'a {
    move |range, each| {
        if let Err(e) = ram.hash_each_page(range.clone(), |p| data.get(p), &mut *each) {
            // Cannot happen for pages of the RAM's own layout; if it did,
            // reporting every page dirty is the safe answer.
            tracing::warn!("hashing pages: {e}");
            range.for_each(|p| each(p, 0));
        }
    }
}

/// Proves on scratch memory that a changed page, and only it, is reported,
/// and that the sent-copy check catches a change after the sync.
fn self_test() -> Result<(), DirtyError> {
    let fail = |msg: &str| DirtyError::SelfTest { tracker: "hash", msg: msg.into() };
    let mut mem = vec![7u8; 4 * PAGE_SIZE];
    let page = |m: &[u8], p: usize| digest::of(&m[p * PAGE_SIZE..(p + 1) * PAGE_SIZE]);
    let pages = |m: &[u8]| {
        let m = m.to_vec();
        move |r: std::ops::Range<usize>, each: &mut dyn FnMut(usize, u64)| r.for_each(|p| each(p, page(&m, p)))
    };
    let mut t = HashTracker::baseline(4, pages(&mem));
    mem[2 * PAGE_SIZE + 100] ^= 1;
    let d = t.sync_with(4, pages(&mem));
    if d.iter_ones().collect::<Vec<_>>() != vec![2] {
        return Err(fail("a one-byte change was not reported exactly"));
    }
    t.state.observe(1, &[0u8; PAGE_SIZE]);
    if !t.sync_with(4, pages(&mem)).get(1) {
        return Err(fail("a sent copy that differs from the baseline was not reported"));
    }
    Ok(())
}

impl SendObserver for State {
    fn observe(&self, page: usize, bytes: &[u8]) {
        if let Some(b) = self.baseline.get(page) {
            if b.load(Ordering::Relaxed) != digest::of(bytes) {
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
        Ok(self.sync_with(ram.layout().total_pages(), ram_hasher(ram, &data)))
    }

    fn observer(&self) -> Option<Arc<dyn SendObserver>> {
        Some(self.state.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn self_test_passes() {
        self_test().unwrap();
    }

    #[test]
    fn parallel_sync_reports_exactly_the_changed_pages() {
        // Enough pages for several threads and a partial last word.
        let pages = 64 * 37 + 5;
        let mut content: Vec<u64> = (0..pages as u64).collect();
        let hashes = |c: &[u64]| {
            let c = c.to_vec();
            move |r: std::ops::Range<usize>, each: &mut dyn FnMut(usize, u64)| r.for_each(|p| each(p, c[p]))
        };
        let mut t = HashTracker::baseline(pages, hashes(&content));
        for p in [0, 63, 64, 1000, pages - 1] {
            content[p] += 1;
        }
        let d = t.sync_with(pages, hashes(&content));
        assert_eq!(d.iter_ones().collect::<Vec<_>>(), vec![0, 63, 64, 1000, pages - 1]);
        assert_eq!(t.sync_with(pages, hashes(&content)).count(), 0, "nothing changed since");
    }
}
