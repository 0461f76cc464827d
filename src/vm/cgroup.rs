//! A VM's own cgroup on this host: the memory and process limits an
//! incoming QEMU runs under, in cgroup v2 where the unified hierarchy has
//! the controllers, else in the v1 `memory` and `pids` hierarchies (this
//! project's machines mount v2 with `hugetlb` alone). One directory per
//! hierarchy, `dcmigrate/AGENT/VM`; the process joins it between fork and
//! exec, through descriptors opened before, so it never runs outside.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use thiserror::Error;

/// What a VM's cgroup limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Bytes of memory (`memory.max`, or v1 `memory.limit_in_bytes`).
    pub memory: u64,
    /// Processes and threads (`pids.max`).
    pub pids: u64,
}

/// Memory a QEMU needs beyond its guest's RAM (TCG's translation cache
/// alone may grow to 1 GiB).
pub(crate) const MEMORY_OVERHEAD: u64 = 1 << 30;
/// Threads a QEMU may have (vCPUs, I/O threads, its worker pool).
pub(crate) const MAX_PIDS: u64 = 1024;

/// The cgroup could not be made.
#[derive(Debug, Error)]
pub enum CgroupError {
    /// No hierarchy here has the memory and pids controllers.
    #[error("no cgroup hierarchy with the memory and pids controllers is mounted (v2 at /sys/fs/cgroup or /sys/fs/cgroup/unified, or v1)")]
    Unavailable,
    /// A cgroup of the name still has processes in it.
    #[error("{0} still has processes in it")]
    Busy(PathBuf),
    /// A file system call failed.
    #[error("{what} {path}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// Where.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// One VM's cgroup: its directory in each hierarchy it uses.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VmCgroup {
    /// The directories (one for v2; `memory` and `pids` for v1).
    pub dirs: Vec<PathBuf>,
}

const ROOT: &str = "/sys/fs/cgroup";

/// The unified hierarchy, if it has the memory and pids controllers.
fn v2_root() -> Option<PathBuf> {
    [PathBuf::from(ROOT), Path::new(ROOT).join("unified")].into_iter().find(|r| {
        std::fs::read_to_string(r.join("cgroup.controllers"))
            .is_ok_and(|c| c.split_whitespace().any(|x| x == "memory") && c.split_whitespace().any(|x| x == "pids"))
    })
}

fn v1_roots() -> Option<[PathBuf; 2]> {
    let (m, p) = (Path::new(ROOT).join("memory"), Path::new(ROOT).join("pids"));
    (m.join("memory.limit_in_bytes").exists() && p.join("pids.max").exists()).then_some([m, p])
}

fn write(path: &Path, what: &'static str, value: &str) -> Result<(), CgroupError> {
    std::fs::write(path, value).map_err(|source| CgroupError::Io { what, path: path.to_owned(), source })
}

/// Whether `s` can name a cgroup directory.
fn valid(s: &str) -> bool {
    crate::vm::valid_name(s)
}

impl VmCgroup {
    /// Where `dcmigrate/AGENT/VM` is (or would be), without making it.
    pub fn at(agent: &str, vm: &str) -> Option<Self> {
        if !valid(agent) || !valid(vm) {
            return None;
        }
        if let Some(root) = v2_root() {
            return Some(Self { dirs: vec![root.join("dcmigrate").join(agent).join(vm)] });
        }
        let [m, p] = v1_roots()?;
        Some(Self { dirs: vec![m.join("dcmigrate").join(agent).join(vm), p.join("dcmigrate").join(agent).join(vm)] })
    }

    /// Makes `dcmigrate/AGENT/VM` with `limits` (a leftover of the same name,
    /// empty, is replaced).
    pub fn create(agent: &str, vm: &str, limits: Limits) -> Result<Self, CgroupError> {
        let me = Self::at(agent, vm).ok_or(CgroupError::Unavailable)?;
        for d in &me.dirs {
            // d is ROOT/dcmigrate/AGENT/VM.
            let agent_dir = d.parent().expect("an agent level");
            let top = agent_dir.parent().expect("a dcmigrate level");
            let root = top.parent().expect("a hierarchy");
            mkdir(top)?;
            mkdir(agent_dir)?;
            if me.dirs.len() == 1 {
                // v2: each level hands the controllers down to the next.
                for l in [root, top, agent_dir] {
                    let _ = write(&l.join("cgroup.subtree_control"), "enabling controllers in", "+memory +pids");
                }
            }
            Self::fresh(d)?;
        }
        if let [d] = me.dirs.as_slice() {
            write(&d.join("memory.max"), "setting memory.max in", &limits.memory.to_string())?;
            write(&d.join("pids.max"), "setting pids.max in", &limits.pids.to_string())?;
        } else {
            write(
                &me.dirs[0].join("memory.limit_in_bytes"),
                "setting memory.limit_in_bytes in",
                &limits.memory.to_string(),
            )?;
            write(&me.dirs[1].join("pids.max"), "setting pids.max in", &limits.pids.to_string())?;
        }
        Ok(me)
    }

    /// A new, empty cgroup at `dir` (one left empty by an earlier VM of
    /// the name is replaced; one with processes in it is refused).
    fn fresh(dir: &Path) -> Result<(), CgroupError> {
        // A cgroup that cannot be removed holds processes or children.
        match std::fs::remove_dir(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(_) => return Err(CgroupError::Busy(dir.to_owned())),
        }
        mkdir(dir)
    }

    /// Each hierarchy's `cgroup.procs`, open for writing: [`join`] moves
    /// the calling process in with them.
    pub fn procs(&self) -> Result<Vec<OwnedFd>, CgroupError> {
        self.dirs
            .iter()
            .map(|d| {
                let p = d.join("cgroup.procs");
                std::fs::OpenOptions::new().write(true).open(&p).map(OwnedFd::from).map_err(|source| CgroupError::Io {
                    what: "opening",
                    path: p,
                    source,
                })
            })
            .collect()
    }

    /// The processes in it now.
    pub fn pids(&self) -> Vec<u32> {
        let Some(d) = self.dirs.first() else { return vec![] };
        std::fs::read_to_string(d.join("cgroup.procs"))
            .map(|s| s.lines().filter_map(|l| l.trim().parse().ok()).collect())
            .unwrap_or_default()
    }

    /// Removes the directories (once no process is left in them).
    pub fn remove(&self) {
        for d in &self.dirs {
            if let Err(e) = std::fs::remove_dir(d) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(cgroup = %d.display(), "cgroup not removed: {e}");
                }
            }
        }
    }
}

fn mkdir(d: &Path) -> Result<(), CgroupError> {
    match std::fs::create_dir(d) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(source) => Err(CgroupError::Io { what: "creating", path: d.to_owned(), source }),
    }
}

/// Moves the calling process into the cgroups whose `cgroup.procs` `fds`
/// are (writing `0` means "me"). Async-signal-safe: for `pre_exec`.
pub(crate) fn join(fds: &[std::os::fd::RawFd]) -> std::io::Result<()> {
    for fd in fds {
        // SAFETY: write(2) on a descriptor the parent opened, from a static buffer.
        if unsafe { libc::write(*fd, b"0".as_ptr().cast(), 1) } != 1 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The raw numbers of `fds`, for [`join`] in a child.
pub(crate) fn raw(fds: &[OwnedFd]) -> Vec<std::os::fd::RawFd> {
    fds.iter().map(|f| f.as_raw_fd()).collect()
}
