//! The unprivileged user a destination's incoming QEMUs run as
//! (`--qemu-user`): looked up once when the agent starts, handed each VM's
//! directory and RAM files, and switched to (groups, gid, uid) before QEMU
//! is executed, so a QEMU a peer's launch spec starts holds no root rights.

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

    /// Opens the data dir to the user: search permission only (0711), and
    /// every directory above it must let the user through.
    pub fn open_data_dir(&self, dir: &Path) -> Result<(), UserError> {
        use std::os::unix::fs::PermissionsExt;
        let give = |source| UserError::Give { path: dir.to_owned(), user: self.name.clone(), source };
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711)).map_err(give)?;
        for d in dir.ancestors().skip(1) {
            let Ok(m) = std::fs::metadata(d) else { continue };
            let mode = m.mode();
            let ok = mode & 0o001 != 0
                || (m.uid() == self.uid && mode & 0o100 != 0)
                || (self.groups.contains(&m.gid()) && mode & 0o010 != 0);
            if !ok {
                return Err(UserError::Unreachable { path: d.to_owned(), user: self.name.clone() });
            }
        }
        Ok(())
    }

    /// Makes `path` (a VM's directory or one of its RAM files) the user's.
    pub fn give(&self, path: &Path) -> Result<(), UserError> {
        std::os::unix::fs::lchown(path, Some(self.uid), Some(self.gid)).map_err(|source| UserError::Give {
            path: path.to_owned(),
            user: self.name.clone(),
            source,
        })
    }

    /// Has `cmd` take the user's supplementary groups before it runs (the
    /// rest of [`apply`](Self::apply): for `systemd-run`, which switches
    /// gid and uid itself once it made the scope).
    pub fn apply_groups(&self, cmd: &mut std::process::Command) {
        use std::os::unix::process::CommandExt;
        let groups = self.groups.clone();
        // SAFETY: between fork and exec the closure only makes one
        // async-signal-safe call, on memory allocated before the fork.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setgroups(groups.len(), groups.as_ptr()) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }

    /// Has `cmd` switch to the user (groups, gid, then uid) before it runs.
    pub fn apply(&self, cmd: &mut std::process::Command) {
        use std::os::unix::process::CommandExt;
        let (uid, gid, groups) = (self.uid, self.gid, self.groups.clone());
        // SAFETY: between fork and exec the closure only makes the three
        // async-signal-safe calls, on memory allocated before the fork.
        unsafe {
            cmd.pre_exec(move || {
                let os = std::io::Error::last_os_error;
                if libc::setgroups(groups.len(), groups.as_ptr()) != 0 || libc::setgid(gid) != 0 {
                    return Err(os());
                }
                if libc::setuid(uid) != 0 {
                    return Err(os());
                }
                Ok(())
            });
        }
    }
}
