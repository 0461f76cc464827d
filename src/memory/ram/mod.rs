//! Guest RAM mapped shared from its backing files.
//!
//! The bytes are shared with the guest and, on a destination, with remote
//! writers: they change under us the way device DMA changes memory. So, as
//! in rust-vmm's `vm-memory`, no reference into them is ever handed out:
//! every access is bounds-checked and copies (into a caller's buffer, from
//! the caller's bytes, or through the file with `pwrite`); hashing copies
//! small blocks first. Raw pointers leave only for RDMA registration.

use super::backing::{self, Fs};
use super::digest::{self, Digest};
use super::layout::{Blocks, Layout};
use super::{MemoryError, PAGE_SIZE};
use crate::bitmap::Bitmap;
use memmap2::MmapRaw;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;

/// Bytes hashed per copy when checksumming a chunk (fits in L2).
const HASH_BLOCK: usize = 64 << 10;

struct Mapped {
    map: MmapRaw,
    len: u64,
    file: File,
    path: PathBuf,
    /// The file system's pages (hugetlbfs has no `write`, and a read
    /// through the mapping would allocate a huge page where `read` gives
    /// zeros).
    fs: Fs,
}

/// A guest's RAM: one shared mapping per region of its [`Layout`].
pub struct GuestRam {
    layout: Layout,
    maps: Vec<Mapped>,
}

// SAFETY: the mappings are plain shared memory; all access goes through raw
// pointers with bounds checks, and concurrent modification is expected.
unsafe impl Send for GuestRam {}
// SAFETY: as above: no method hands out references into the mappings.
unsafe impl Sync for GuestRam {}

/// Above this much mapped RAM, unmapping is left to a thread of its own.
const UNMAP_ASIDE: u64 = 64 << 20;

impl Drop for GuestRam {
    /// Unmapping a large mapping tears down one page-table entry per
    /// resident page (~80 ms per GiB here). The last owner is often an async
    /// task, such as the destination's session right after it answered
    /// `Resume`: its worker would hold that answer back (and the guest's
    /// downtime with it) while the kernel works, so a large RAM is unmapped
    /// by a short-lived thread instead.
    fn drop(&mut self) {
        let maps = std::mem::take(&mut self.maps);
        if maps.iter().map(|m| m.len).sum::<u64>() > UNMAP_ASIDE {
            let spawned = std::thread::Builder::new().name("unmap".into()).spawn(move || drop(maps));
            // No thread to be had: unmap here, late rather than never.
            if let Err(e) = spawned {
                tracing::debug!("unmapping in place: {e}");
            }
        }
    }
}

impl GuestRam {
    /// Maps existing RAM files (one per region, in layout order).
    pub fn open(layout: Layout, paths: &[PathBuf]) -> Result<Self, MemoryError> {
        Self::map(layout, paths, false)
    }

    /// Creates zero-filled RAM files and maps them (a destination's fresh RAM).
    pub fn create(layout: Layout, paths: &[PathBuf]) -> Result<Self, MemoryError> {
        Self::map(layout, paths, true)
    }

    fn map(layout: Layout, paths: &[PathBuf], create: bool) -> Result<Self, MemoryError> {
        if paths.len() != layout.regions().len() {
            return Err(MemoryError::Files { files: paths.len(), regions: layout.regions().len() });
        }
        let mut maps = Vec::new();
        for (p, r) in paths.iter().zip(layout.regions()) {
            let io = |source| MemoryError::Io { path: p.clone(), source };
            let mut o = OpenOptions::new();
            o.read(true).write(true);
            if create {
                // A new file of this process's alone: never an existing one,
                // never through a symlink someone planted, never readable by
                // others (guest RAM holds the guest's secrets).
                o.create_new(true).mode(0o600).custom_flags(libc::O_NOFOLLOW);
            }
            let f = o.open(p).map_err(io)?;
            let fs = backing::of_file(&f).map_err(io)?;
            if r.size % fs.page_size != 0 {
                return Err(MemoryError::PageSize { path: p.clone(), size: r.size, page_size: fs.page_size });
            }
            if create {
                f.set_len(r.size).map_err(io)?;
            }
            let actual = f.metadata().map_err(io)?.len();
            if actual != r.size {
                return Err(MemoryError::Size { path: p.clone(), actual, expected: r.size });
            }
            // A source's hugetlbfs file is QEMU's: mapping it must not
            // reserve pages QEMU chose not to (`reserve=off`), which the
            // pool would then lack; it is read through `read` anyway.
            let mut opts = memmap2::MmapOptions::new();
            if fs.hugetlb && !create {
                opts.no_reserve_swap();
            }
            let map = opts.map_raw(&f).map_err(io)?;
            maps.push(Mapped { map, len: r.size, file: f, path: p.clone(), fs });
        }
        Ok(Self { layout, maps })
    }

    /// The RAM's layout.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Whether `len` bytes at `offset` of `region` lie inside the RAM.
    pub fn check(&self, region: u32, offset: u64, len: u64) -> Result<(), MemoryError> {
        self.ptr(region, offset, len).map(|_| ())
    }

    fn ptr(&self, region: u32, offset: u64, len: u64) -> Result<*mut u8, MemoryError> {
        let oob = || MemoryError::OutOfBounds { region, offset, len };
        let m = self.maps.get(region as usize).ok_or_else(oob)?;
        match offset.checked_add(len) {
            // SAFETY: offset + len is inside the mapping.
            Some(end) if end <= m.len => Ok(unsafe { m.map.as_mut_ptr().add(offset as usize) }),
            _ => Err(oob()),
        }
    }

    /// The page size of a region's file system.
    pub fn page_size(&self, region: u32) -> Option<u64> {
        self.maps.get(region as usize).map(|m| m.fs.page_size)
    }

    /// Copies bytes at `offset` of `region` into `out`.
    pub fn read_at(&self, region: u32, offset: u64, out: &mut [u8]) -> Result<(), MemoryError> {
        let p = self.ptr(region, offset, out.len() as u64)?;
        let m = &self.maps[region as usize];
        if m.fs.hugetlb {
            // Through the file: a huge page nobody wrote reads as zeros
            // and stays unallocated.
            use std::os::unix::fs::FileExt;
            return m
                .file
                .read_exact_at(out, offset)
                .map_err(|source| MemoryError::Io { path: m.path.clone(), source });
        }
        // SAFETY: source in bounds of a live mapping; `out` is ours and does not overlap it.
        unsafe { std::ptr::copy_nonoverlapping(p, out.as_mut_ptr(), out.len()) };
        Ok(())
    }

    /// Appends `n` pages starting at global page `page` to `out`.
    pub fn read_pages(&self, page: usize, n: usize, out: &mut Vec<u8>) -> Result<(), MemoryError> {
        let (region, offset) = self.layout.locate(page);
        let start = out.len();
        out.resize(start + n * PAGE_SIZE, 0);
        self.read_at(region, offset, &mut out[start..]).inspect_err(|_| out.truncate(start))
    }

    /// Stores bytes through the mapping, as the guest's own CPU writes do
    /// (so they go through its page tables: soft-dirty sees them).
    pub fn store(&self, region: u32, offset: u64, data: &[u8]) -> Result<(), MemoryError> {
        let p = self.ptr(region, offset, data.len() as u64)?;
        // SAFETY: destination in bounds of a live mapping; `data` is ours.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), p, data.len()) };
        Ok(())
    }

    /// Rewrites a page's first word with its own value: the content stays
    /// the same, but the write is real (a tracker must report it).
    pub fn touch(&self, page: usize) -> Result<(), MemoryError> {
        let (region, offset) = self.layout.locate(page);
        let p = self.ptr(region, offset, 8)?.cast::<u64>();
        // SAFETY: in bounds and 8-byte aligned (pages are); volatile, so the write happens.
        unsafe { std::ptr::write_volatile(p, std::ptr::read_volatile(p)) };
        Ok(())
    }

    /// Writes bytes into guest RAM through the file (pwrite), bounds-checked.
    /// Unlike a copy into the mapping, this allocates missing pages without
    /// a page fault per page (about 10 % less kernel time on fresh tmpfs
    /// memory here; the zeroing of new pages dominates either way).
    /// On hugetlbfs, which has no `write`, it is a copy into the mapping.
    pub fn write_at(&self, region: u32, offset: u64, data: &[u8]) -> Result<(), MemoryError> {
        use std::os::unix::fs::FileExt;
        self.check(region, offset, data.len() as u64)?;
        let m = &self.maps[region as usize];
        if m.fs.hugetlb {
            return self.store(region, offset, data);
        }
        m.file.write_all_at(data, offset).map_err(|source| MemoryError::Io { path: m.path.clone(), source })
    }

    /// Makes `len` bytes of whole pages at `offset` of `region` zero, writing
    /// only pages that are not zero already: a page never written (a hole,
    /// or a huge page not allocated) is read through the file, which gives
    /// zeros without allocating it, and left alone. Returns the pages that
    /// had to be written.
    pub fn zero_pages(&self, region: u32, offset: u64, len: u64) -> Result<u64, MemoryError> {
        use std::os::unix::fs::FileExt;
        static ZERO: [u8; PAGE_SIZE] = [0; PAGE_SIZE];
        thread_local! {
            // One read buffer per receiving thread, not one per frame.
            static BLOCK: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0u8; HASH_BLOCK]);
        }
        self.check(region, offset, len)?;
        let m = &self.maps[region as usize];
        BLOCK.with_borrow_mut(|block| {
            let mut written = 0;
            for at in (offset..offset + len).step_by(HASH_BLOCK) {
                let n = (offset + len - at).min(HASH_BLOCK as u64) as usize;
                let io = |source| MemoryError::Io { path: m.path.clone(), source };
                m.file.read_exact_at(&mut block[..n], at).map_err(io)?;
                for (i, page) in block[..n].chunks_exact(PAGE_SIZE).enumerate() {
                    if page != ZERO {
                        self.write_at(region, at + (i * PAGE_SIZE) as u64, &ZERO)?;
                        written += 1;
                    }
                }
            }
            Ok(written)
        })
    }

    /// The start and length of a region's mapping, for registering it with
    /// an RDMA device. Using the pointer is the caller's `unsafe` business:
    /// it is valid while this `GuestRam` lives.
    pub fn region_raw(&self, region: u32) -> Option<(*mut u8, usize)> {
        self.maps.get(region as usize).map(|m| (m.map.as_mut_ptr(), m.len as usize))
    }

    /// Faults a region's pages in on `threads` threads at once, ahead of
    /// pinning them: RDMA registration faults each page it pins on one
    /// thread, and a fresh page's allocation and zeroing dominate that.
    /// `write` maps them writable (a destination's RAM, which the NIC
    /// writes); without it they are only read in, which leaves soft-dirty
    /// bits alone (a sender's). No byte of the RAM changes.
    pub fn prefault(&self, region: u32, write: bool, threads: usize) -> Result<(), MemoryError> {
        let m = self.maps.get(region as usize).ok_or(MemoryError::OutOfBounds { region, offset: 0, len: 0 })?;
        let len = m.len;
        // Slices of whole 2 MiB, or of whole huge pages (madvise takes no
        // part of one), at least one per thread.
        let slice = len.div_ceil(threads.max(1) as u64).next_multiple_of(m.fs.page_size.max(2 << 20));
        if slice >= len {
            return self.prefault_range(region, 0, len, write);
        }
        std::thread::scope(|s| {
            let workers: Vec<_> = (0..len)
                .step_by(slice as usize)
                .map(|off| s.spawn(move || self.prefault_range(region, off, slice.min(len - off), write)))
                .collect();
            let panicked = || {
                Err(MemoryError::Io {
                    path: m.path.clone(),
                    source: std::io::Error::other("a prefault thread panicked"),
                })
            };
            workers.into_iter().try_for_each(|w| w.join().unwrap_or_else(|_| panicked()))
        })
    }

    /// [`prefault`](Self::prefault) of `len` bytes at `offset` of a region,
    /// on this thread.
    pub fn prefault_range(&self, region: u32, offset: u64, len: u64, write: bool) -> Result<(), MemoryError> {
        self.check(region, offset, len)?;
        let m = &self.maps[region as usize];
        let advice = if write { libc::MADV_POPULATE_WRITE } else { libc::MADV_POPULATE_READ };
        // SAFETY: the range lies inside this region's mapping (checked),
        // which `self` keeps mapped; populating changes no contents.
        let addr = unsafe { m.map.as_mut_ptr().add(offset as usize) };
        // madvise wants a page-aligned start: the mapping is, offsets are pages.
        match unsafe { libc::madvise(addr.cast(), len as usize, advice) } {
            0 => Ok(()),
            _ => Err(MemoryError::Io { path: m.path.clone(), source: std::io::Error::last_os_error() }),
        }
    }

    /// xxh3 of one page's current bytes (copied first).
    pub fn page_hash(&self, page: usize) -> Result<u64, MemoryError> {
        let mut buf = [0u8; PAGE_SIZE];
        let (region, offset) = self.layout.locate(page);
        self.read_at(region, offset, &mut buf)?;
        Ok(digest::of(&buf))
    }

    /// Calls `each(page, xxh3 of its bytes)` for every page of `pages`, in
    /// order. Data pages are copied a block at a time (one bounds check and
    /// one copy per block, not per page); pages for which `is_data` is
    /// false are holes, hashed as zeros without being read.
    pub fn hash_each_page(
        &self,
        pages: std::ops::Range<usize>,
        is_data: impl Fn(usize) -> bool,
        mut each: impl FnMut(usize, u64),
    ) -> Result<(), MemoryError> {
        let zero = digest::of(&[0u8; PAGE_SIZE]);
        let per_copy = HASH_BLOCK / PAGE_SIZE;
        let mut buf = vec![0u8; HASH_BLOCK];
        let mut p = pages.start;
        while p < pages.end {
            if !is_data(p) {
                each(p, zero);
                p += 1;
                continue;
            }
            // A run of data pages within one region, at most a block.
            let (region, offset) = self.layout.locate(p);
            let region_end = self.layout.region_first_page(region)
                + (self.layout.regions()[region as usize].size / PAGE_SIZE as u64) as usize;
            let mut end = p + 1;
            while end < pages.end && end < region_end && end - p < per_copy && is_data(end) {
                end += 1;
            }
            let block = &mut buf[..(end - p) * PAGE_SIZE];
            self.read_at(region, offset, block)?;
            for (i, page) in block.chunks_exact(PAGE_SIZE).enumerate() {
                each(p + i, digest::of(page));
            }
            p = end;
        }
        Ok(())
    }

    /// xxh3 of a chunk's current bytes, for end-to-end verification. Pages
    /// that are holes are hashed as zeros without being read: reading a hole
    /// through a shared mapping would allocate it.
    pub fn chunk_checksum(&self, chunk: usize) -> u64 {
        let c = self.layout.chunks()[chunk];
        let (region, offset) = self.layout.locate(c.first_page);
        let data = self.chunk_data(chunk);
        self.hash_pages(region, offset, c.pages, |i| data.as_ref().is_none_or(|d| d[i]))
    }

    /// xxh3 of `pages` pages at `offset` of `region`, as if hashed in one
    /// go; `is_data(i)` false: page i is a hole, hashed as zeros unread.
    fn hash_pages(&self, region: u32, offset: u64, pages: usize, is_data: impl Fn(usize) -> bool) -> u64 {
        static ZERO: [u8; PAGE_SIZE] = [0; PAGE_SIZE];
        thread_local! {
            // One copy buffer per hashing thread, not one per call.
            static BUF: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0u8; HASH_BLOCK]);
        }
        BUF.with_borrow_mut(|buf| self.hash_with(buf, (region, offset, pages), is_data, &ZERO))
    }

    fn hash_with(
        &self,
        buf: &mut [u8],
        (region, offset, pages): (u32, u64, usize),
        is_data: impl Fn(usize) -> bool,
        zero: &[u8; PAGE_SIZE],
    ) -> u64 {
        // Small enough for the buffer (the usual block): copied, holes
        // zeroed, hashed in one go.
        if pages * PAGE_SIZE <= buf.len() {
            let all = &mut buf[..pages * PAGE_SIZE];
            for (i, page) in all.chunks_exact_mut(PAGE_SIZE).enumerate() {
                let at = offset + (i * PAGE_SIZE) as u64;
                // A read outside the RAM cannot happen for a chunk of its
                // layout; if it did, the zeros would fail the comparison.
                if !is_data(i) || self.read_at(region, at, page).is_err() {
                    page.fill(0);
                }
            }
            return digest::of(all);
        }
        let mut h = Digest::new();
        let mut i = 0;
        // Runs of data pages are copied and hashed a block at a time.
        while i < pages {
            let data = is_data(i);
            let limit = if data { HASH_BLOCK / PAGE_SIZE } else { usize::MAX };
            let start = i;
            while i < pages && i - start < limit && is_data(i) == data {
                i += 1;
            }
            if data {
                let block = &mut buf[..(i - start) * PAGE_SIZE];
                let at = offset + (start * PAGE_SIZE) as u64;
                // A read outside the RAM cannot happen for a chunk of its
                // layout; if it did, the zeros would fail the comparison.
                if self.read_at(region, at, block).is_err() {
                    block.fill(0);
                }
                h.update(block);
            } else {
                (start..i).for_each(|_| h.update(zero));
            }
        }
        h.finish()
    }

    /// Checksums of `list`'s blocks (in that order), hashed on all cores.
    /// Holes are found once per chunk, for the blocks of that chunk that
    /// follow one another in the list. A block that does not exist hashes
    /// as 0 (callers check indices first).
    pub fn block_checksums(&self, blocks: &Blocks, list: &[usize]) -> Vec<u64> {
        let mut out = vec![0u64; list.len()];
        let threads = std::thread::available_parallelism().map_or(1, |t| t.get()).min(list.len().max(1));
        let per = list.len().div_ceil(threads).max(1);
        std::thread::scope(|s| {
            for (part, ids) in out.chunks_mut(per).zip(list.chunks(per)) {
                s.spawn(move || {
                    let mut data: Option<(usize, Option<Vec<bool>>)> = None;
                    for (sum, &b) in part.iter_mut().zip(ids) {
                        let Some(blk) = blocks.get(&self.layout, b) else { continue };
                        let c = self.layout.chunks()[blk.chunk];
                        if data.as_ref().is_none_or(|(chunk, _)| *chunk != blk.chunk) {
                            data = Some((blk.chunk, self.chunk_data(blk.chunk)));
                        }
                        let d = data.as_ref().and_then(|(_, d)| d.as_ref());
                        let skip = blk.first_page - c.first_page;
                        let (region, offset) = self.layout.locate(blk.first_page);
                        *sum = self.hash_pages(region, offset, blk.pages, |i| d.is_none_or(|d| d[skip + i]));
                    }
                });
            }
        });
        out
    }

    /// Which pages of chunk `c` hold data (None: unknown, hash them all).
    fn chunk_data(&self, c: usize) -> Option<Vec<bool>> {
        let ch = self.layout.chunks()[c];
        let (region, offset) = self.layout.locate(ch.first_page);
        let m = self.maps.get(region as usize)?;
        data_in(m, (offset / PAGE_SIZE as u64) as usize, ch.pages)
            .inspect_err(|e| tracing::warn!("cannot tell holes from data ({e}): hashing every page"))
            .ok()
    }

    /// Checksums of every chunk, hashed on all cores.
    pub fn checksums(&self) -> Vec<u64> {
        let all: Vec<usize> = (0..self.layout.chunks().len()).collect();
        self.checksums_of(&all)
    }

    /// Checksums of the given chunks (in that order), hashed on all cores.
    /// Only those chunks are read (holes are found per chunk), so a few
    /// chunks of a huge RAM cost what they hold, not what the RAM holds.
    pub fn checksums_of(&self, chunks: &[usize]) -> Vec<u64> {
        let mut out = vec![0u64; chunks.len()];
        let threads = std::thread::available_parallelism().map_or(1, |t| t.get()).min(chunks.len().max(1));
        let per = chunks.len().div_ceil(threads).max(1);
        std::thread::scope(|s| {
            for (part, ids) in out.chunks_mut(per).zip(chunks.chunks(per)) {
                s.spawn(move || {
                    for (sum, &c) in part.iter_mut().zip(ids) {
                        *sum = self.chunk_checksum(c);
                    }
                });
            }
        });
        out
    }

    /// Pages that hold data in the backing files; the others are holes,
    /// which read as zero and are not allocated. Resident pages (mincore)
    /// hold data; a page that is not resident is a hole only if SEEK_DATA
    /// says so (it may be swapped out).
    pub fn data_pages(&self) -> Result<Bitmap, MemoryError> {
        // A window at a time: what is held besides the bitmap stays small.
        const WINDOW: usize = 1 << 16;
        let mut out = Bitmap::new(self.layout.total_pages());
        for (r, m) in self.maps.iter().enumerate() {
            let first = self.layout.region_first_page(r as u32);
            let pages = (m.len / PAGE_SIZE as u64) as usize;
            for w in (0..pages).step_by(WINDOW) {
                let data = data_in(m, w, WINDOW.min(pages - w))
                    .map_err(|source| MemoryError::Io { path: m.path.clone(), source })?;
                data.iter().enumerate().filter(|(_, d)| **d).for_each(|(i, _)| out.set(first + w + i));
            }
        }
        Ok(out)
    }
}

/// Which of `n` pages from page `first` of a mapping hold data: resident
/// pages (mincore) do; a page that is not resident is a hole only if
/// SEEK_DATA says so (it may be swapped out).
fn data_in(m: &Mapped, first: usize, n: usize) -> std::io::Result<Vec<bool>> {
    use std::os::fd::AsRawFd;
    if (first + n) as u64 * PAGE_SIZE as u64 > m.len {
        return Err(std::io::Error::other("pages outside the mapping"));
    }
    let mut resident = vec![0u8; n];
    // SAFETY: the range is page aligned and inside the mapping; the vector has one byte per page.
    let addr = unsafe { m.map.as_mut_ptr().add(first * PAGE_SIZE) };
    if unsafe { libc::mincore(addr.cast(), n * PAGE_SIZE, resident.as_mut_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let fd = m.file.as_raw_fd();
    let mut next_data: i64 = -1; // cached SEEK_DATA answer
    let mut out = vec![false; n];
    for (i, &res) in resident.iter().enumerate() {
        let off = ((first + i) * PAGE_SIZE) as i64;
        out[i] = res & 1 != 0 || {
            if next_data < off {
                // SAFETY: plain syscall on an open fd.
                let d = unsafe { libc::lseek(fd, off, libc::SEEK_DATA) };
                next_data = if d < 0 { i64::MAX } else { d };
            }
            next_data < off + PAGE_SIZE as i64
        };
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
