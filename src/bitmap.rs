//! A fixed-size bitmap of pages, the currency between dirty trackers and the page ledger.

use std::sync::atomic::{AtomicU64, Ordering};

/// One bit per page; plain (not shared between threads).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bitmap {
    words: Vec<u64>,
    len: usize,
}

impl Bitmap {
    /// `len` bits, all clear.
    pub fn new(len: usize) -> Self {
        Self { words: vec![0; len.div_ceil(64)], len }
    }

    /// `len` bits, all set.
    pub fn full(len: usize) -> Self {
        let mut b = Self::new(len);
        for i in 0..len {
            b.set(i);
        }
        b
    }

    /// The number of bits (pages), set or not.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it has no bits at all (not whether none is set: see [`Self::count`]).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Sets bit `i`; panics if `i` is out of range.
    pub fn set(&mut self, i: usize) {
        assert!(i < self.len, "bit {i} out of {}", self.len);
        self.words[i / 64] |= 1 << (i % 64);
    }

    /// Clears bit `i`.
    pub fn clear(&mut self, i: usize) {
        self.words[i / 64] &= !(1 << (i % 64));
    }

    /// Whether bit `i` is set; false past the end.
    pub fn get(&self, i: usize) -> bool {
        i < self.len && self.words[i / 64] & (1 << (i % 64)) != 0
    }

    /// How many bits are set.
    pub fn count(&self) -> usize {
        self.words.iter().map(|w| w.count_ones() as usize).sum()
    }

    /// ORs in a word at word index `w` (bits past `len` are dropped).
    pub fn or_word(&mut self, w: usize, bits: u64) {
        let valid = if (w + 1) * 64 <= self.len {
            u64::MAX
        } else {
            let n = self.len.saturating_sub(w * 64);
            if n == 0 {
                0
            } else {
                (1u64 << n) - 1
            }
        };
        self.words[w] |= bits & valid;
    }

    /// The indexes of the set bits, in ascending order.
    pub fn iter_ones(&self) -> impl Iterator<Item = usize> + '_ {
        self.words.iter().enumerate().flat_map(|(wi, &w)| {
            let mut w = w;
            std::iter::from_fn(move || {
                if w == 0 {
                    return None;
                }
                let b = w.trailing_zeros() as usize;
                w &= w - 1;
                Some(wi * 64 + b)
            })
        })
    }
}

/// A bitmap that several threads set bits in while one thread drains it.
pub(crate) struct AtomicBitmap {
    words: Vec<AtomicU64>,
    len: usize,
}

impl AtomicBitmap {
    /// `len` bits, all clear.
    pub(crate) fn new(len: usize) -> Self {
        Self { words: (0..len.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(), len }
    }

    /// Sets bit `i`; ignores an `i` out of range.
    pub(crate) fn set(&self, i: usize) {
        if i < self.len {
            self.words[i / 64].fetch_or(1 << (i % 64), Ordering::Release);
        }
    }

    /// Moves every set bit into a plain bitmap and clears them here.
    pub(crate) fn drain(&self) -> Bitmap {
        let mut out = Bitmap::new(self.len);
        for (wi, w) in self.words.iter().enumerate() {
            let bits = w.swap(0, Ordering::AcqRel);
            if bits != 0 {
                out.or_word(wi, bits);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_get_iter_count() {
        let mut b = Bitmap::new(130);
        for i in [0, 63, 64, 129] {
            b.set(i);
        }
        assert_eq!(b.iter_ones().collect::<Vec<_>>(), vec![0, 63, 64, 129]);
        assert_eq!(b.count(), 4);
        assert!(!b.get(130));
        let mut c = Bitmap::new(130);
        c.or_word(2, u64::MAX);
        assert_eq!(c.count(), 2, "bits past len are dropped");
    }

    #[test]
    fn atomic_drain_clears() {
        let a = AtomicBitmap::new(100);
        a.set(5);
        a.set(99);
        a.set(1000);
        let d = a.drain();
        assert_eq!(d.iter_ones().collect::<Vec<_>>(), vec![5, 99]);
        assert_eq!(a.drain().count(), 0);
    }
}
