//! The checksum of pages and blocks: XXH3-64 with seed 0, the same on every
//! agent whatever its CPU (the SIMD variant is chosen at run time and gives
//! the same value), so checksums compare across hosts and releases.

use std::hash::Hasher as _;
use twox_hash::XxHash3_64;

/// XXH3-64 of `bytes`.
pub(crate) fn of(bytes: &[u8]) -> u64 {
    XxHash3_64::oneshot(bytes)
}

/// XXH3-64 of bytes given piece by piece (the same value as [`of`] their
/// concatenation).
pub(crate) struct Digest(XxHash3_64);

impl Digest {
    /// An empty digest.
    pub(crate) fn new() -> Self {
        Self(XxHash3_64::new())
    }

    /// Adds bytes.
    pub(crate) fn update(&mut self, bytes: &[u8]) {
        self.0.write(bytes);
    }

    /// The checksum of everything added.
    pub(crate) fn finish(&self) -> u64 {
        self.0.finish()
    }
}

impl Default for Digest {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_values_as_earlier_releases() {
        // XXH3_64bits("") from the reference implementation.
        assert_eq!(of(b""), 0x2D06_8005_38D3_94C2);
        let bytes: Vec<u8> = (0..200_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        for len in (0..=300).chain([1024, 4096, 16 << 10, 64 << 10, 200_000]) {
            let b = &bytes[..len];
            let want = xxhash_rust::xxh3::xxh3_64(b);
            assert_eq!(of(b), want, "{len} bytes");
            let mut d = Digest::new();
            b.chunks(4096).for_each(|c| d.update(c));
            assert_eq!(d.finish(), want, "{len} bytes in pieces");
        }
    }
}
