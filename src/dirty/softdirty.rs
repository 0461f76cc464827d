//! Soft-dirty tracking: the kernel's per-PTE "written since clear_refs" bit,
//! read from `/proc/PID/pagemap` (bit 55) of the process that maps the RAM
//! (QEMU, or the synthetic guest).
//!
//! Reading the bits and clearing them are two system calls; a write between
//! them would be lost. So each sync freezes the process's threads with
//! ptrace ([`super::freeze`]), reads, clears and lets them go: a stall of
//! about the pagemap read, 2 MiB of pagemap per GiB of RAM. An agent killed
//! meanwhile never leaves the VM stopped (the kernel detaches it), and a VM
//! an operator had stopped stays stopped.
//!
//! Limits: a kernel without `CONFIG_MEM_SOFT_DIRTY` accepts `clear_refs` and
//! reports nothing (the self-test catches it); writes that do not go through
//! the process's page tables (another process's `pwrite`, hole punching) and
//! pages the kernel unmaps (shmem swapped out) are missed. The switchover
//! verification still catches such a page and resends it.

use super::{DirtyError, DirtyTracker, TrackerKind};
use crate::bitmap::Bitmap;
use crate::memory::{GuestRam, RegionSpec, PAGE_SIZE};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::PathBuf;
use std::time::Duration;

const SOFT_DIRTY: u64 = 1 << 55;

fn err(msg: impl Into<String>) -> DirtyError {
    DirtyError::Log { path: "soft-dirty".into(), msg: msg.into() }
}

/// Where one RAM region sits in the tracked process's address space.
struct Mapping {
    first_page: usize,
    pages: usize,
    vaddr: u64,
}

/// Tracks the RAM of a process (QEMU, the synthetic guest) through the
/// kernel's soft-dirty bits in `/proc/PID/pagemap`.
pub struct SoftDirtyTracker {
    pid: u32,
    pagemap: File,
    clear_refs: File,
    maps: Vec<Mapping>,
    buf: Vec<u8>,
    /// How long the last sync kept the process frozen.
    last_stop: Option<Duration>,
}

/// How long freezing a process's threads may take.
const FREEZE_TIMEOUT: Duration = Duration::from_secs(2);

impl SoftDirtyTracker {
    /// Tracks `ram` as process `pid` maps it; `files` are the RAM's backing
    /// files in region order (found in the process's mappings by inode).
    pub fn start(pid: u32, files: &[PathBuf], ram: &GuestRam) -> Result<Self, DirtyError> {
        self_test()?;
        let proc = PathBuf::from(format!("/proc/{pid}"));
        let open = |name: &str, write: bool| {
            OpenOptions::new()
                .read(!write)
                .write(write)
                .open(proc.join(name))
                .map_err(|e| err(format!("{}/{name}: {e}", proc.display())))
        };
        let (pagemap, clear_refs) = (open("pagemap", false)?, open("clear_refs", true)?);
        let mut maps = Vec::new();
        let mut first_page = 0;
        for (vaddr, region) in locate(pid, files, ram.layout().regions())?.into_iter().zip(ram.layout().regions()) {
            let pages = (region.size / PAGE_SIZE as u64) as usize;
            maps.push(Mapping { first_page, pages, vaddr });
            first_page += pages;
        }
        let mut t = Self { pid, pagemap, clear_refs, maps, buf: Vec::new(), last_stop: None };
        t.frozen(|t| t.clear())?;
        Ok(t)
    }

    fn clear(&mut self) -> Result<(), DirtyError> {
        self.clear_refs.write_all(b"4").map_err(|e| err(format!("clear_refs of pid {}: {e}", self.pid)))
    }

    fn read_into(&mut self, dirty: &mut Bitmap) -> Result<(), DirtyError> {
        for m in &self.maps {
            self.buf.resize(m.pages * 8, 0);
            let off = m.vaddr / PAGE_SIZE as u64 * 8;
            self.pagemap.read_exact_at(&mut self.buf, off).map_err(|e| err(format!("pagemap of {}: {e}", self.pid)))?;
            for (i, e) in self.buf.chunks_exact(8).enumerate() {
                if u64::from_le_bytes(e.try_into().expect("8 bytes")) & SOFT_DIRTY != 0 {
                    dirty.set(m.first_page + i);
                }
            }
        }
        Ok(())
    }

    /// Runs `f` while every thread of the process is stopped.
    fn frozen<T>(&mut self, f: impl FnOnce(&mut Self) -> Result<T, DirtyError>) -> Result<T, DirtyError> {
        let frozen = super::freeze::Frozen::new(self.pid, FREEZE_TIMEOUT)?;
        let r = f(self);
        self.last_stop = Some(frozen.elapsed());
        drop(frozen);
        r
    }
}

/// Where process `pid` maps each RAM file (shared, whole), in region order.
pub fn locate(pid: u32, files: &[PathBuf], regions: &[RegionSpec]) -> Result<Vec<u64>, DirtyError> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).map_err(|e| err(format!("pid {pid}: {e}")))?;
    files
        .iter()
        .zip(regions)
        .map(|(f, region)| {
            let ino = std::fs::metadata(f).map_err(|e| err(format!("{}: {e}", f.display())))?.ino();
            find_mapping(&maps, ino, region.size).ok_or_else(|| {
                err(format!("pid {pid} does not map all of {} (region {}) shared", f.display(), region.id))
            })
        })
        .collect()
}

/// Start address of a shared mapping of the whole file with inode `ino`.
fn find_mapping(maps: &str, ino: u64, size: u64) -> Option<u64> {
    maps.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let (range, perms, offset, _dev, inode) = (f.next()?, f.next()?, f.next()?, f.next()?, f.next()?);
        let (a, b) = range.split_once('-')?;
        let (a, b) = (u64::from_str_radix(a, 16).ok()?, u64::from_str_radix(b, 16).ok()?);
        let whole = u64::from_str_radix(offset, 16).ok()? == 0 && b - a >= size;
        (inode.parse::<u64>().ok()? == ino && perms.ends_with('s') && whole).then_some(a)
    })
}

impl DirtyTracker for SoftDirtyTracker {
    fn kind(&self) -> TrackerKind {
        TrackerKind::SoftDirty
    }

    fn last_stop(&self) -> Option<Duration> {
        self.last_stop
    }

    fn sync(&mut self, ram: &GuestRam) -> Result<Bitmap, DirtyError> {
        let mut dirty = Bitmap::new(ram.layout().total_pages());
        self.frozen(|t| {
            t.read_into(&mut dirty)?;
            t.clear()
        })?;
        Ok(dirty)
    }
}

/// Whether this kernel reports soft-dirty bits: proven on a scratch shared
/// mapping of our own, since a kernel without them fails silently.
pub fn self_test() -> Result<(), DirtyError> {
    static RESULT: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    RESULT.get_or_init(probe).clone().map_err(|msg| DirtyError::SelfTest { tracker: "soft-dirty", msg })
}

fn probe() -> Result<(), String> {
    let f = tempfile::tempfile().map_err(|e| e.to_string())?;
    f.set_len(2 * PAGE_SIZE as u64).map_err(|e| e.to_string())?;
    // SAFETY: a private scratch file nobody else maps.
    let mut map = unsafe { memmap2::MmapMut::map_mut(&f) }.map_err(|e| e.to_string())?;
    let pagemap = File::open("/proc/self/pagemap").map_err(|e| format!("/proc/self/pagemap: {e}"))?;
    let bit = |map: &memmap2::MmapMut, page: usize| -> Result<bool, String> {
        let mut e = [0u8; 8];
        let addr = map.as_ptr() as u64 + (page * PAGE_SIZE) as u64;
        pagemap.read_exact_at(&mut e, addr / PAGE_SIZE as u64 * 8).map_err(|e| format!("pagemap: {e}"))?;
        Ok(u64::from_le_bytes(e) & SOFT_DIRTY != 0)
    };
    map[0] = 1;
    map[PAGE_SIZE] = 1;
    std::fs::write("/proc/self/clear_refs", b"4").map_err(|e| format!("/proc/self/clear_refs: {e}"))?;
    if bit(&map, 0)? || bit(&map, 1)? {
        return Err("clear_refs did not clear the soft-dirty bits".into());
    }
    map[PAGE_SIZE] = 2;
    if !bit(&map, 1)? {
        return Err("a written page was not reported: this kernel lacks CONFIG_MEM_SOFT_DIRTY".into());
    }
    if bit(&map, 0)? {
        return Err("an untouched page was reported dirty".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn finds_whole_shared_mapping_by_inode() {
        let maps = "7f0000000000-7f0000200000 rw-p 00000000 00:1a 42 /dev/shm/a\n\
                    7f1000000000-7f1000200000 rw-s 00001000 00:1a 42 /dev/shm/a\n\
                    7f2000000000-7f2000200000 rw-s 00000000 00:1a 42 /dev/shm/a\n";
        assert_eq!(super::find_mapping(maps, 42, 0x200000), Some(0x7f2000000000));
        assert_eq!(super::find_mapping(maps, 42, 0x400000), None);
        assert_eq!(super::find_mapping(maps, 43, 0x200000), None);
    }
}
