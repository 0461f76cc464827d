//! 2 MiB huge pages for test beds and benchmarks (as root): pages added to
//! the kernel's pool and hugetlbfs mounts of them, all given back when the
//! [`HugePool`] is dropped (drop it after whatever maps them).

use super::{wait_for, TestbedError};
use std::path::PathBuf;

const POOL: &str = "/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages";

/// Pages this pool added and the mounts it made.
pub struct HugePool {
    before: u64,
    dir: tempfile::TempDir,
    mounts: Vec<PathBuf>,
}

fn read_pool() -> Option<u64> {
    std::fs::read_to_string(POOL).ok()?.trim().parse().ok()
}

impl HugePool {
    /// `pages` more 2 MiB pages in the kernel's pool, or why not.
    pub fn new(pages: u64) -> Result<Self, TestbedError> {
        let before = read_pool().ok_or_else(|| TestbedError("this kernel has no 2 MiB huge pages".into()))?;
        std::fs::write(POOL, (before + pages).to_string()).map_err(|e| TestbedError(format!("{POOL}: {e}")))?;
        let dir = tempfile::tempdir().map_err(|e| TestbedError(e.to_string()))?;
        let pool = HugePool { before, dir, mounts: vec![] };
        let got = read_pool().unwrap_or(before);
        if got < before + pages {
            return Err(TestbedError(format!("the kernel gave {} of {pages} huge pages", got.saturating_sub(before))));
        }
        Ok(pool)
    }

    /// A new hugetlbfs mount of 2 MiB pages at `name`, limited to `size`
    /// (`128M`) if given.
    pub fn mount(&mut self, name: &str, size: Option<&str>) -> Result<PathBuf, TestbedError> {
        let d = self.dir.path().join(name);
        std::fs::create_dir(&d).map_err(|e| TestbedError(e.to_string()))?;
        let opts = size.map_or("pagesize=2M".to_owned(), |s| format!("pagesize=2M,size={s}"));
        let ok = std::process::Command::new("mount")
            .args(["-t", "hugetlbfs", "-o", &opts, "none"])
            .arg(&d)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            return Err(TestbedError(format!("mount -t hugetlbfs -o {opts} none {} failed", d.display())));
        }
        self.mounts.push(d.clone());
        Ok(d)
    }
}

impl Drop for HugePool {
    fn drop(&mut self) {
        for m in self.mounts.iter().rev() {
            let umount = |lazy: bool| {
                let mut c = std::process::Command::new("umount");
                if lazy {
                    c.arg("-l");
                }
                c.arg(m).stderr(std::process::Stdio::null()).status().is_ok_and(|s| s.success())
            };
            // A process that just exited may still be unmapping its RAM.
            if wait_for(10, || umount(false).then_some(())).is_none() {
                umount(true);
            }
        }
        let _ = std::fs::write(POOL, self.before.to_string());
    }
}
