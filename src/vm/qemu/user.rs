//! The unprivileged users a destination's incoming QEMUs run as: a uid of
//! its own per VM from a range no account uses (`--qemu-uids`, the default
//! for a root agent), or one shared user (`--qemu-user`). Each VM's RAM
//! files are handed to its user; nothing else on the file system is its
//! own (everything else reaches QEMU as a descriptor), and the switch
//! (groups, gid, uid) happens before QEMU is executed, so a QEMU a peer's
//! description starts holds no root rights.

use std::ffi::CString;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use thiserror::Error;

/// A user QEMU runs as.
#[derive(Clone, Debug)]
pub struct QemuUser {
    /// Its name.
    pub name: String,
    /// Its uid.
    pub uid: u32,
    /// Its primary gid.
    pub gid: u32,
    /// Every group it is in (for /dev/kvm, say).
    groups: Vec<libc::gid_t>,
}

/// Why QEMU cannot run as the configured user.
#[derive(Debug, Error)]
pub enum UserError {
    /// No such user.
    #[error("no user {0:?} on this host (--qemu-user)")]
    Unknown(String),
    /// Only root can start processes as another user.
    #[error("--qemu-user needs the agent to run as root")]
    NotRoot,
    /// The data dir is out of the user's reach.
    #[error("{path} is not reachable by {user}: every directory above the data dir needs search permission for it")]
    Unreachable {
        /// The directory without search permission.
        path: PathBuf,
        /// The user.
        user: String,
    },
    /// Handing a file over failed.
    #[error("handing {path} to {user}")]
    Give {
        /// The file.
        path: PathBuf,
        /// The user.
        user: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

impl QemuUser {
    /// Looks `name` up (and its groups); the agent must be root to use it.
    pub fn lookup(name: &str) -> Result<Self, UserError> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err(UserError::NotRoot);
        }
        let unknown = || UserError::Unknown(name.to_owned());
        let cname = CString::new(name).map_err(|_| unknown())?;
        // SAFETY: a zeroed passwd is a valid out-parameter for getpwnam_r.
        let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
        let mut buf = vec![0 as libc::c_char; 16 << 10];
        let mut found: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: every pointer is valid for the call and `buf.len()` is its size.
        let rc = unsafe { libc::getpwnam_r(cname.as_ptr(), &mut pwd, buf.as_mut_ptr(), buf.len(), &mut found) };
        if rc != 0 || found.is_null() {
            return Err(unknown());
        }
        let (uid, gid) = (pwd.pw_uid, pwd.pw_gid);
        let mut groups = vec![0 as libc::gid_t; 64];
        loop {
            let mut n = groups.len() as libc::c_int;
            // SAFETY: `groups` holds `n` entries; getgrouplist writes at most that many.
            let rc = unsafe { libc::getgrouplist(cname.as_ptr(), gid, groups.as_mut_ptr(), &mut n) };
            if rc >= 0 {
                groups.truncate(n.max(0) as usize);
                break;
            }
            if groups.len() >= 1 << 16 {
                return Err(unknown());
            }
            groups.resize((n.max(0) as usize).max(groups.len() * 2), 0);
        }
        Ok(Self { name: name.to_owned(), uid, gid, groups })
    }
}

/// Opens `dir` (the data dir, where RAM files are) to `id`: search
/// permission only (0711), and every directory above it must let it through.
pub fn open_dir_to(dir: &Path, id: &Identity) -> Result<(), UserError> {
    use std::os::unix::fs::PermissionsExt;
    let who = || format!("uid {}", id.uid);
    let give = |source| UserError::Give { path: dir.to_owned(), user: who(), source };
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711)).map_err(give)?;
    for d in dir.ancestors().skip(1) {
        let Ok(m) = std::fs::metadata(d) else { continue };
        let mode = m.mode();
        let ok = mode & 0o001 != 0
            || (m.uid() == id.uid && mode & 0o100 != 0)
            || ((m.gid() == id.gid || id.groups.contains(&m.gid())) && mode & 0o010 != 0);
        if !ok {
            return Err(UserError::Unreachable { path: d.to_owned(), user: who() });
        }
    }
    Ok(())
}

/// Makes `path` (a RAM file, in a directory only the agent writes) `id`'s.
pub fn give(path: &Path, id: &Identity) -> Result<(), UserError> {
    std::os::unix::fs::lchown(path, Some(id.uid), Some(id.gid)).map_err(|source| UserError::Give {
        path: path.to_owned(),
        user: format!("uid {}", id.uid),
        source,
    })
}

/// Who incoming QEMUs run as on this host.
#[derive(Clone, Debug)]
pub enum RunAs {
    /// The agent's own user (an agent not running as root).
    Agent,
    /// One shared user (`--qemu-user`).
    User(QemuUser),
    /// A uid of its own per VM, from a range no account uses (`--qemu-uids`).
    Uids(UidRange),
}

/// A range of uids (and gids of the same numbers) for VMs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UidRange {
    /// The first uid.
    pub first: u32,
    /// The last uid.
    pub last: u32,
}

/// The range a root agent takes without `--qemu-uids` or `--qemu-user`:
/// far above any account, container or systemd range.
pub const DEFAULT_UIDS: UidRange = UidRange { first: 0xf000_0000, last: 0xf000_ffff };

impl std::str::FromStr for UidRange {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?}: give FIRST-LAST, two uids above 0 and below 4294967294");
        let (a, b) = s.split_once('-').ok_or_else(bad)?;
        let (first, last) = (a.trim().parse::<u32>().map_err(|_| bad())?, b.trim().parse::<u32>().map_err(|_| bad())?);
        if first == 0 || first > last || last >= u32::MAX - 1 {
            return Err(bad());
        }
        Ok(Self { first, last })
    }
}

/// One VM's user, gid and groups.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// Its uid.
    pub uid: u32,
    /// Its gid.
    pub gid: u32,
    /// Its supplementary groups.
    pub groups: Vec<libc::gid_t>,
}

impl QemuUser {
    /// The shared user as an identity.
    pub fn identity(&self) -> Identity {
        Identity { uid: self.uid, gid: self.gid, groups: self.groups.clone() }
    }
}

/// The gid of group `name`, if there is one.
fn group_gid(name: &str) -> Option<libc::gid_t> {
    let c = CString::new(name).ok()?;
    // SAFETY: a zeroed group is a valid out-parameter for getgrnam_r.
    let mut grp: libc::group = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 16 << 10];
    let mut found: *mut libc::group = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call and `buf.len()` is its size.
    let rc = unsafe { libc::getgrnam_r(c.as_ptr(), &mut grp, buf.as_mut_ptr(), buf.len(), &mut found) };
    (rc == 0 && !found.is_null()).then_some(grp.gr_gid)
}

/// Uids some process on this host runs as (from /proc).
pub fn running_uids() -> std::collections::HashSet<u32> {
    let mut out = std::collections::HashSet::new();
    let Ok(entries) = std::fs::read_dir("/proc") else { return out };
    for e in entries.flatten() {
        if !e.file_name().to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        if let Ok(m) = std::fs::metadata(e.path()) {
            out.insert(m.uid());
        }
    }
    out
}

impl UidRange {
    /// The lowest uid of the range that is neither `taken` nor any
    /// process's, as a VM's identity: gid of the same number, and the
    /// `kvm` group where there is one (for /dev/kvm).
    pub fn pick(&self, taken: &std::collections::HashSet<u32>) -> Option<Identity> {
        let running = running_uids();
        let uid = (self.first..=self.last).find(|u| !taken.contains(u) && !running.contains(u))?;
        Some(Identity { uid, gid: uid, groups: group_gid("kvm").into_iter().collect() })
    }
}

/// Has `cmd` switch to `id` (groups, gid, then uid) before it runs; with
/// `groups_only`, only the groups (for `systemd-run`, which switches gid
/// and uid itself once it made the scope).
pub fn apply(id: &Identity, cmd: &mut std::process::Command, groups_only: bool) {
    use std::os::unix::process::CommandExt;
    let (uid, gid, groups) = (id.uid, id.gid, id.groups.clone());
    // SAFETY: between fork and exec the closure only makes async-signal-safe
    // calls, on memory allocated before the fork.
    unsafe {
        cmd.pre_exec(move || {
            let os = std::io::Error::last_os_error;
            if libc::setgroups(groups.len(), groups.as_ptr()) != 0 {
                return Err(os());
            }
            if groups_only {
                return Ok(());
            }
            if libc::setgid(gid) != 0 || libc::setuid(uid) != 0 {
                return Err(os());
            }
            Ok(())
        });
    }
}
