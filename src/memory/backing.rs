//! What holds guest RAM: the page size of a RAM file's file system (a
//! hugetlbfs mount's huge pages, or base pages on tmpfs), the huge-page
//! mounts an operator gives a destination, and how many huge pages they
//! can still take.
//!
//! A hugetlbfs mount without `size=` reports no free space: its pages come
//! from the kernel's pool of that size, whose free pages less those already
//! reserved (a shared mapping reserves its whole length when it is made)
//! are what a new RAM can have.

use super::PAGE_SIZE;
use std::path::{Path, PathBuf};
use thiserror::Error;

/// `statfs(2)`'s magic for hugetlbfs.
const HUGETLBFS_MAGIC: i64 = 0x9584_58f6;

/// The file system of a RAM file or directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fs {
    /// Bytes per page: the huge page size on hugetlbfs, else [`PAGE_SIZE`].
    pub page_size: u64,
    /// Whether it is hugetlbfs.
    pub hugetlb: bool,
    /// Its size limit (hugetlbfs `size=`), if it has one.
    limit: Option<(u64, u64)>,
}

impl Fs {
    /// Base pages (tmpfs and every other file system).
    pub const BASE: Fs = Fs { page_size: PAGE_SIZE as u64, hugetlb: false, limit: None };
}

/// Reads the file system of an open file.
pub fn of_file(f: &std::fs::File) -> std::io::Result<Fs> {
    use std::os::fd::AsRawFd;
    let mut st = std::mem::MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: a valid descriptor and a buffer fstatfs fills.
    if unsafe { libc::fstatfs(f.as_raw_fd(), st.as_mut_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fstatfs returned 0, so it filled `st`.
    Ok(from_statfs(unsafe { &st.assume_init() }))
}

/// Reads the file system `path` is on.
pub fn of_path(path: &Path) -> std::io::Result<Fs> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())?;
    let mut st = std::mem::MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: a NUL-terminated path and a buffer statfs fills.
    if unsafe { libc::statfs(c.as_ptr(), st.as_mut_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: statfs returned 0, so it filled `st`.
    Ok(from_statfs(unsafe { &st.assume_init() }))
}

// The field types of `statfs` differ between architectures.
#[allow(clippy::unnecessary_cast, clippy::useless_conversion)]
fn from_statfs(st: &libc::statfs) -> Fs {
    if i64::from(st.f_type) != HUGETLBFS_MAGIC {
        return Fs::BASE;
    }
    let page_size = st.f_bsize as u64;
    // Without `size=` hugetlbfs reports no blocks at all (some kernels: -1).
    let blocks = st.f_blocks as u64;
    let limit = (blocks > 0 && blocks != u64::MAX)
        .then(|| ((st.f_bavail as u64).saturating_mul(page_size), blocks.saturating_mul(page_size)));
    Fs { page_size, hugetlb: true, limit }
}

/// A huge-page mount a destination puts incoming RAM on (`--hugepages`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HugeMount {
    /// Its directory.
    pub dir: PathBuf,
    /// Its page size.
    pub page_size: u64,
}

/// Why a directory cannot hold huge-page RAM.
#[derive(Debug, Error)]
pub enum HugeMountError {
    /// Its file system could not be read.
    #[error("{0}")]
    Statfs(PathBuf, #[source] std::io::Error),
    /// It is not hugetlbfs.
    #[error("{0} is not a hugetlbfs mount (mount -t hugetlbfs -o pagesize=2M none DIR)")]
    NotHugetlbfs(PathBuf),
    /// Two mounts of the same page size: which one a region goes to would
    /// be a guess.
    #[error("{0} and {1} both have {2}-byte pages: give one mount per page size")]
    SamePageSize(PathBuf, PathBuf, u64),
}

impl HugeMount {
    /// Checks that `dir` is a hugetlbfs mount and reads its page size.
    pub fn probe(dir: &Path) -> Result<Self, HugeMountError> {
        let fs = of_path(dir).map_err(|e| HugeMountError::Statfs(dir.to_owned(), e))?;
        if !fs.hugetlb {
            return Err(HugeMountError::NotHugetlbfs(dir.to_owned()));
        }
        Ok(HugeMount { dir: dir.to_owned(), page_size: fs.page_size })
    }

    /// The same mount, at its directory `name`.
    pub fn within(self, name: &str) -> Self {
        HugeMount { dir: self.dir.join(name), ..self }
    }

    /// Probes every mount; one per page size.
    pub fn probe_all(dirs: &[PathBuf]) -> Result<Vec<Self>, HugeMountError> {
        let mut all: Vec<HugeMount> = Vec::new();
        for d in dirs {
            let m = Self::probe(d)?;
            if let Some(o) = all.iter().find(|o| o.page_size == m.page_size) {
                return Err(HugeMountError::SamePageSize(o.dir.clone(), m.dir, m.page_size));
            }
            all.push(m);
        }
        Ok(all)
    }

    /// Bytes of huge pages a new RAM file here can still reserve: the
    /// pool's free pages less those reserved, bounded by the mount's own
    /// limit when it has one.
    pub fn room(&self) -> std::io::Result<u64> {
        let pool = pool_room(self.page_size)?;
        let fs = of_path(&self.dir)?;
        Ok(match fs.limit {
            Some((free, _)) => pool.min(free),
            None => pool,
        })
    }
}

/// Bytes the kernel's pool of `page_size` pages can still give: free pages
/// less reserved ones.
pub fn pool_room(page_size: u64) -> std::io::Result<u64> {
    let dir = PathBuf::from(format!("/sys/kernel/mm/hugepages/hugepages-{}kB", page_size >> 10));
    let read = |name: &str| -> std::io::Result<u64> {
        let s = std::fs::read_to_string(dir.join(name))?;
        s.trim().parse().map_err(|_| std::io::Error::other(format!("{}: not a number", dir.join(name).display())))
    };
    Ok(read("free_hugepages")?.saturating_sub(read("resv_hugepages")?).saturating_mul(page_size))
}

/// A page size for people: `4 KiB`, `2 MiB`, `1 GiB`.
pub fn show(page_size: u64) -> String {
    match page_size {
        s if s >= 1 << 30 && s % (1 << 30) == 0 => format!("{} GiB", s >> 30),
        s if s >= 1 << 20 && s % (1 << 20) == 0 => format!("{} MiB", s >> 20),
        s => format!("{} KiB", s >> 10),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plain_directory_has_base_pages_and_is_no_huge_mount() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(of_path(d.path()).unwrap(), Fs::BASE);
        let f = std::fs::File::create(d.path().join("f")).unwrap();
        assert_eq!(of_file(&f).unwrap().page_size, PAGE_SIZE as u64);
        let e = HugeMount::probe(d.path()).unwrap_err();
        assert!(matches!(e, HugeMountError::NotHugetlbfs(_)), "{e}");
        assert!(HugeMount::probe(&d.path().join("absent")).is_err());
    }

    #[test]
    fn page_sizes_read_as_people_write_them() {
        assert_eq!(show(4096), "4 KiB");
        assert_eq!(show(2 << 20), "2 MiB");
        assert_eq!(show(1 << 30), "1 GiB");
    }
}
