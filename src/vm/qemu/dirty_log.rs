//! The `qemu` dirty tracker: QEMU's own dirty log, from a QEMU built with
//! qemu-patches/ (`x-dirty-log-start`, `-sync`, `-stop`). Everything that
//! writes guest RAM through QEMU's knowledge lands in that log: KVM's dirty
//! bitmaps or rings, TCG, emulated DMA, vhost backends writing through their
//! own mappings (which soft-dirty of QEMU's process cannot see).
//!
//! The bitmap lives in a memfd the agent creates and hands QEMU over the QMP
//! socket (no path, so no file in a shared directory, whatever user QEMU
//! runs as). A sync asks QEMU to move its dirty bits into the memfd (QEMU
//! ORs them in, atomically per word) and takes them out with an atomic swap
//! per word, so no write is lost between the two. The guest is never
//! stopped by the agent: the only pause is QEMU's own log sync.

use super::QMP_TIMEOUT;
use crate::bitmap::Bitmap;
use crate::dirty::{DirtyError, DirtyTracker, TrackerKind};
use crate::memory::{GuestRam, PAGE_SIZE};
use crate::vm::qmp::Qmp;
use crate::vm::VmError;
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// The commands a patched QEMU offers (`query-commands`).
pub const COMMANDS: [&str; 3] = ["x-dirty-log-start", "x-dirty-log-sync", "x-dirty-log-stop"];

/// Whether the QEMU behind `q` offers the dirty-log commands.
pub fn offered(q: &mut Qmp) -> Result<bool, VmError> {
    let names: Vec<String> = q.execute(&qapi::qmp::query_commands {})?.into_iter().map(|c| c.name).collect();
    Ok(COMMANDS.iter().all(|c| names.iter().any(|n| n == c)))
}

fn err(msg: impl Into<String>) -> DirtyError {
    DirtyError::Log { path: "qemu".into(), msg: msg.into() }
}

fn from_vm(e: VmError) -> DirtyError {
    err(crate::error_chain(&e))
}

/// `x-dirty-log-start`.
#[derive(Serialize)]
struct Start {
    file: String,
    blocks: Vec<String>,
}

/// Where QEMU put one RAM block's bitmap in the file.
#[derive(Deserialize, Debug)]
struct BlockInfo {
    id: String,
    size: u64,
    #[serde(rename = "page-size")]
    page_size: u64,
    offset: u64,
}

impl qapi::Command for Start {
    type Ok = Vec<BlockInfo>;
    const NAME: &'static str = "x-dirty-log-start";
    const ALLOW_OOB: bool = false;
}

/// `x-dirty-log-sync`.
#[derive(Serialize)]
struct Sync {}

/// What a sync moved.
#[derive(Deserialize, Debug)]
struct SyncInfo {
    #[serde(rename = "dirty-pages")]
    dirty_pages: u64,
    #[serde(rename = "total-pages")]
    total_pages: u64,
}

impl qapi::Command for Sync {
    type Ok = SyncInfo;
    const NAME: &'static str = "x-dirty-log-sync";
    const ALLOW_OOB: bool = false;
}

/// `x-dirty-log-stop`.
#[derive(Serialize)]
struct Stop {}

impl qapi::Command for Stop {
    type Ok = qapi::Empty;
    const NAME: &'static str = "x-dirty-log-stop";
    const ALLOW_OOB: bool = false;
}

/// One region's bitmap in the shared file.
struct Block {
    /// First page of the region in the RAM layout.
    first_page: usize,
    pages: usize,
    /// Index of the region's first word in the mapping.
    word: usize,
}

/// Tracks a QEMU's RAM through its exported dirty log.
pub struct QemuLogTracker {
    control: PathBuf,
    /// The socket's identity when the VM was added.
    ident: Option<crate::vm::ident::FileIdent>,
    map: memmap2::MmapRaw,
    blocks: Vec<Block>,
    /// The file stays open for as long as it is mapped.
    _file: File,
    last_sync: Option<Duration>,
}

/// A memfd for the bitmap, close-on-exec, sealable.
fn memfd() -> Result<File, DirtyError> {
    // SAFETY: a NUL-terminated name and valid flags; the result is checked.
    let fd =
        unsafe { libc::memfd_create(c"dcmigrate-dirty-log".as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(err(format!("memfd_create: {}", std::io::Error::last_os_error())));
    }
    // SAFETY: fd is a new descriptor nobody else owns.
    Ok(File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
}

/// Once QEMU sized the bitmap, nobody may shrink it under QEMU's and the
/// agent's mappings (a SIGBUS) or grow it.
fn seal(file: &File) -> Result<(), DirtyError> {
    use std::os::fd::AsRawFd;
    // SAFETY: fcntl on an open descriptor with valid seal flags.
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_SHRINK | libc::F_SEAL_GROW) };
    match rc {
        0 => Ok(()),
        _ => Err(err(format!("sealing the bitmap: {}", std::io::Error::last_os_error()))),
    }
}

impl QemuLogTracker {
    /// Starts QEMU's dirty log for the RAM regions of `ram` (QEMU memory
    /// backends, by id) through the QMP socket `control`.
    pub fn start(control: &Path, ram: &GuestRam) -> Result<Self, DirtyError> {
        Self::start_as(control, None, ram)
    }

    /// [`start`](Self::start) on the socket `control` if it is the file `ident` names.
    pub fn start_as(
        control: &Path,
        ident: Option<crate::vm::ident::FileIdent>,
        ram: &GuestRam,
    ) -> Result<Self, DirtyError> {
        let mut q = Qmp::connect_as(control, ident, QMP_TIMEOUT).map_err(from_vm)?;
        if !offered(&mut q).map_err(from_vm)? {
            return Err(err("QEMU has no x-dirty-log commands (build it with qemu-patches/build)"));
        }
        let file = memfd()?;
        let fdset = q.add_fd(file.as_fd()).map_err(from_vm)?;
        let regions = ram.layout().regions();
        let start =
            Start { file: format!("/dev/fdset/{fdset}"), blocks: regions.iter().map(|r| r.id.clone()).collect() };
        let started = match q.execute(&start) {
            Err(VmError::Refused { msg, .. }) if msg.contains("already exported") => {
                // An agent that died mid-migration left it running: only one
                // agent drives a VM, so this one takes it over. (Were the
                // other still alive, its syncs would find its file empty
                // while QEMU counts bits, and fail: see `take_all`.)
                tracing::warn!("QEMU's dirty log was still exported (an earlier agent?): restarting it");
                q.execute(&Stop {}).and_then(|_| q.execute(&start))
            }
            other => other,
        };
        // QEMU holds its own duplicate now; the fdset's copy can go.
        let _ = q.execute(&qapi::qmp::remove_fd { fdset_id: fdset as i64, fd: None });
        let infos = started.map_err(from_vm)?;
        let mapped = (|| {
            let len = file.metadata().map_err(|e| err(format!("bitmap memfd: {e}")))?.len();
            seal(&file)?;
            let blocks = layout_blocks(ram, &infos, len)?;
            let map = memmap2::MmapOptions::new()
                .len(len as usize)
                .map_raw(&file)
                .map_err(|e| err(format!("mapping the bitmap: {e}")))?;
            Ok((blocks, map))
        })();
        let (blocks, map) = match mapped {
            Ok(m) => m,
            Err(e) => {
                let _ = q.execute(&Stop {});
                return Err(e);
            }
        };
        // The socket serves one client at a time: free it for the syncs.
        drop(q);
        // From here on, dropping the tracker stops the export.
        let mut t = Self { control: control.to_owned(), ident, map, blocks, _file: file, last_sync: None };
        t.self_test(ram)?;
        Ok(t)
    }

    /// A sync right after the start must answer for exactly the RAM's
    /// pages: a QEMU that logs other blocks, or none, fails here, before a
    /// migration relies on it.
    fn self_test(&mut self, ram: &GuestRam) -> Result<(), DirtyError> {
        let info = self.qemu_sync()?;
        if info.total_pages != ram.layout().total_pages() as u64 || info.dirty_pages > info.total_pages {
            return Err(DirtyError::SelfTest {
                tracker: "qemu",
                msg: format!(
                    "QEMU's sync counted {} dirty of {} pages; the RAM has {} pages",
                    info.dirty_pages,
                    info.total_pages,
                    ram.layout().total_pages()
                ),
            });
        }
        // Whatever was moved belongs to the first round, which reads all of RAM.
        let mut scratch = Bitmap::new(ram.layout().total_pages());
        self.take_all(&info, &mut scratch)
    }

    /// Takes the bits QEMU just moved: exactly as many as it counted, as
    /// nothing else writes the file and every sync empties it. Fewer means
    /// QEMU writes another file (the export was taken over): fail rather
    /// than report nothing.
    fn take_all(&self, info: &SyncInfo, dirty: &mut Bitmap) -> Result<(), DirtyError> {
        let n = self.take(dirty) as u64;
        if n != info.dirty_pages {
            return Err(err(format!(
                "QEMU moved {} dirty pages but the bitmap held {n}: another process took the dirty log over",
                info.dirty_pages
            )));
        }
        Ok(())
    }

    fn qemu_sync(&mut self) -> Result<SyncInfo, DirtyError> {
        let begin = std::time::Instant::now();
        let mut q = Qmp::connect_as(&self.control, self.ident, QMP_TIMEOUT).map_err(from_vm)?;
        let info = q.execute(&Sync {}).map_err(from_vm)?;
        self.last_sync = Some(begin.elapsed());
        Ok(info)
    }

    /// Moves the set bits of the shared bitmap into `dirty`, clearing them.
    fn take(&self, dirty: &mut Bitmap) -> usize {
        let words = self.words();
        let mut n = 0;
        for b in &self.blocks {
            for (w, word) in words[b.word..b.word + b.pages.div_ceil(64)].iter().enumerate() {
                if word.load(Ordering::Relaxed) == 0 {
                    continue;
                }
                let mut bits = word.swap(0, Ordering::AcqRel);
                while bits != 0 {
                    let page = w * 64 + bits.trailing_zeros() as usize;
                    bits &= bits - 1;
                    // Bits past a region's end are not QEMU's to set.
                    if page < b.pages {
                        dirty.set(b.first_page + page);
                        n += 1;
                    }
                }
            }
        }
        n
    }

    fn words(&self) -> &[AtomicU64] {
        // SAFETY: the mapping is page-aligned, `len` bytes long and lives as
        // long as self; QEMU writes it concurrently, which is why it is only
        // ever accessed through atomics.
        unsafe { std::slice::from_raw_parts(self.map.as_ptr().cast::<AtomicU64>(), self.map.len() / 8) }
    }

    /// How long QEMU's last log sync took (the command's round trip).
    pub fn last_sync(&self) -> Option<Duration> {
        self.last_sync
    }
}

/// Matches QEMU's blocks to the RAM layout's regions, checking that every
/// bitmap QEMU describes lies inside the file.
fn layout_blocks(ram: &GuestRam, infos: &[BlockInfo], len: u64) -> Result<Vec<Block>, DirtyError> {
    let mut blocks = Vec::new();
    let mut first_page = 0;
    for r in ram.layout().regions() {
        let pages = (r.size / PAGE_SIZE as u64) as usize;
        let info = infos
            .iter()
            .find(|i| i.id == r.id)
            .ok_or_else(|| err(format!("QEMU did not export RAM block {}", r.id)))?;
        if info.size != r.size || info.page_size != PAGE_SIZE as u64 {
            return Err(err(format!(
                "QEMU's block {} is {} bytes in pages of {}, the region {} bytes in pages of {PAGE_SIZE}",
                r.id, info.size, info.page_size, r.size
            )));
        }
        let bytes = pages.div_ceil(64) as u64 * 8;
        if info.offset % 8 != 0 || info.offset.checked_add(bytes).is_none_or(|end| end > len) {
            return Err(err(format!("QEMU's bitmap of {} at {} is outside the {len}-byte file", r.id, info.offset)));
        }
        blocks.push(Block { first_page, pages, word: (info.offset / 8) as usize });
        first_page += pages;
    }
    Ok(blocks)
}

impl DirtyTracker for QemuLogTracker {
    fn kind(&self) -> TrackerKind {
        TrackerKind::Qemu
    }

    fn sync(&mut self, ram: &GuestRam) -> Result<Bitmap, DirtyError> {
        let info = self.qemu_sync()?;
        let mut dirty = Bitmap::new(ram.layout().total_pages());
        self.take_all(&info, &mut dirty)?;
        Ok(dirty)
    }
}

impl Drop for QemuLogTracker {
    fn drop(&mut self) {
        // Best effort: QEMU may be gone (it quits after a switchover).
        if let Ok(mut q) = Qmp::connect_as(&self.control, self.ident, Duration::from_secs(5)) {
            if let Err(e) = q.execute(&Stop {}) {
                tracing::debug!("x-dirty-log-stop: {}", crate::error_chain(&e));
            }
        }
    }
}
