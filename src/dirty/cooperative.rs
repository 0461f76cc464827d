//! Cooperative tracking: the guest marks a bitmap in a shared file after every
//! write, the way a hypervisor's dirty log works.
//!
//! Ordering: the guest writes the page, *then* sets the bit (release); the
//! tracker swaps words to zero (acquire) and only then reads pages. A write
//! the tracker misses in one sync is therefore always seen by the next.

use super::{DirtyError, DirtyTracker, TrackerKind};
use crate::bitmap::Bitmap;
use crate::memory::GuestRam;
use memmap2::MmapRaw;
use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

const MAGIC: &[u8; 8] = b"DCMDIRTY";
const HEADER: usize = 64;

/// The shared bitmap file, used by both the guest (marks) and the tracker (drains).
pub(crate) struct DirtyLog {
    map: MmapRaw,
    pages: usize,
}

// SAFETY: only accessed through atomics.
unsafe impl Send for DirtyLog {}
unsafe impl Sync for DirtyLog {}

impl DirtyLog {
    fn err(path: &Path, msg: impl ToString) -> DirtyError {
        DirtyError::Log { path: path.display().to_string(), msg: msg.to_string() }
    }

    fn file_len(pages: usize) -> u64 {
        (HEADER + pages.div_ceil(64) * 8) as u64
    }

    /// Creates (or truncates) the log for `pages` pages, all clean: the
    /// guest's side.
    pub(crate) fn create(path: &Path, pages: usize) -> Result<Self, DirtyError> {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            // The guest's alone, and never written through a planted symlink.
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
            .map_err(|e| Self::err(path, e))?;
        f.set_len(Self::file_len(pages)).map_err(|e| Self::err(path, e))?;
        let map = MmapRaw::map_raw(&f).map_err(|e| Self::err(path, e))?;
        // SAFETY: the file is at least HEADER bytes.
        unsafe {
            std::ptr::copy_nonoverlapping(MAGIC.as_ptr(), map.as_mut_ptr(), 8);
            std::ptr::copy_nonoverlapping((pages as u64).to_le_bytes().as_ptr(), map.as_mut_ptr().add(8), 8);
        }
        Ok(Self { map, pages })
    }

    /// Opens an existing log and checks that it was made for `pages` pages:
    /// the tracker's side.
    pub(crate) fn open(path: &Path, pages: usize) -> Result<Self, DirtyError> {
        let f = OpenOptions::new().read(true).write(true).open(path).map_err(|e| Self::err(path, e))?;
        let len = f.metadata().map_err(|e| Self::err(path, e))?.len();
        if len != Self::file_len(pages) {
            return Err(Self::err(path, format!("size {len} does not fit {pages} pages")));
        }
        let map = MmapRaw::map_raw(&f).map_err(|e| Self::err(path, e))?;
        // SAFETY: len >= HEADER checked above.
        let header = unsafe { std::slice::from_raw_parts(map.as_ptr(), 16) };
        if &header[..8] != MAGIC || u64::from_le_bytes(header[8..16].try_into().unwrap()) != pages as u64 {
            return Err(Self::err(path, "not a dirty log for this RAM layout"));
        }
        Ok(Self { map, pages })
    }

    fn words(&self) -> &[AtomicU64] {
        // SAFETY: the file holds pages/64 words after the header, 8-aligned
        // (mappings are page aligned); AtomicU64 has u64's layout.
        unsafe {
            std::slice::from_raw_parts(self.map.as_ptr().add(HEADER) as *const AtomicU64, self.pages.div_ceil(64))
        }
    }

    /// Marks a page written. Call after the write.
    pub(crate) fn mark(&self, page: usize) {
        if page < self.pages {
            self.words()[page / 64].fetch_or(1 << (page % 64), Ordering::Release);
        }
    }

    /// The pages marked since the previous drain; clears their marks.
    pub(crate) fn drain(&self) -> Bitmap {
        let mut out = Bitmap::new(self.pages);
        for (i, w) in self.words().iter().enumerate() {
            if w.load(Ordering::Relaxed) != 0 {
                out.or_word(i, w.swap(0, Ordering::AcqRel));
            }
        }
        out
    }
}

/// Tracks a guest that marks its own writes in a [`DirtyLog`].
pub(crate) struct CooperativeTracker {
    log: DirtyLog,
}

impl CooperativeTracker {
    /// Opens the guest's dirty log and proves it live: `probe(page)` asks the
    /// guest to rewrite a page in place, which must show up in the next sync.
    pub(crate) fn start(
        path: &Path,
        pages: usize,
        probe: &dyn Fn(usize) -> Result<(), String>,
    ) -> Result<Self, DirtyError> {
        let log = DirtyLog::open(path, pages)?;
        let fail = |msg: String| DirtyError::SelfTest { tracker: "cooperative", msg };
        let page = pages / 2;
        log.drain();
        probe(page).map_err(|e| fail(format!("guest did not touch page {page}: {e}")))?;
        if !log.drain().get(page) {
            return Err(fail(format!("page {page} was written but not marked")));
        }
        Ok(Self { log })
    }
}

impl DirtyTracker for CooperativeTracker {
    fn kind(&self) -> TrackerKind {
        TrackerKind::Cooperative
    }

    fn sync(&mut self, _ram: &GuestRam) -> Result<Bitmap, DirtyError> {
        Ok(self.log.drain())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_survive_between_processes_views() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d");
        let guest = DirtyLog::create(&p, 100).unwrap();
        let t = CooperativeTracker::start(&p, 100, &|pg| {
            guest.mark(pg);
            Ok(())
        })
        .unwrap();
        guest.mark(3);
        guest.mark(99);
        assert_eq!(t.log.drain().iter_ones().collect::<Vec<_>>(), vec![3, 99]);
        assert!(DirtyLog::open(&p, 101).is_err(), "wrong layout is refused");
        assert!(
            CooperativeTracker::start(&p, 100, &|_| Ok(())).is_err(),
            "a guest that does not mark fails the self-test"
        );
    }
}
