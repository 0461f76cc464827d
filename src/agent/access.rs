//! What a local user can do to the agent: who may open its API socket (its
//! mode, and every caller's uid checked with `SO_PEERCRED`), which
//! directories it trusts (its own, not writable by others), and what a
//! client's `Register` may hand it (files the caller owns, never a
//! directory for the agent to remove). README "Security".

use crate::vm::ident::FileIdent;
use crate::vm::VmRecord;
use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use thiserror::Error;
use tokio::net::UnixListener;

/// The agent cannot set up its API socket or directories safely.
#[derive(Debug, Error)]
pub enum AccessError {
    /// A filesystem call failed.
    #[error("{what} {path}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// On which path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Something already answers on the API socket's path.
    #[error("{0} is served by a running process (another agent?)")]
    InUse(PathBuf),
    /// The API socket's path holds something other than a stale socket.
    #[error("{0} exists and is not a socket: refusing to replace it")]
    NotASocket(PathBuf),
    /// A directory the agent would trust is not its own.
    #[error("{path}: {why}")]
    Untrusted {
        /// The directory.
        path: PathBuf,
        /// What is wrong with it.
        why: String,
    },
    /// `--api-group` names no group.
    #[error("no group named {0:?}")]
    NoGroup(String),
}

/// A `Register` that hands the agent something it must not take.
#[derive(Debug, Error)]
pub enum RecordError {
    /// The caller asked the agent to remove a directory or a cgroup later,
    /// or named a uid the agent gives.
    #[error("a client cannot give the agent a directory or cgroup to remove, or a uid (owned_dir, runtime_dir, cgroup, uid)")]
    OwnedDir,
    /// A path is relative, a symlink, the wrong kind of file, or another user's.
    #[error("{path}: {why}")]
    Path {
        /// The path.
        path: PathBuf,
        /// Why it is refused.
        why: String,
    },
    /// The VM's name cannot name files.
    #[error("VM name {0:?}: use letters, digits, '-', '_' and '.' (not first)")]
    Name(String),
}

/// Who may use the API: the agent's own user, root, and members of `group`.
#[derive(Clone, Copy, Debug, Default)]
pub struct ApiAccess {
    /// Members of this group may use the API too (the socket is 0660 then).
    pub group: Option<u32>,
}

impl ApiAccess {
    /// Resolves `--api-group` (a name or a numeric gid).
    pub fn with_group(group: Option<&str>) -> Result<Self, AccessError> {
        let Some(g) = group else { return Ok(Self::default()) };
        if let Ok(gid) = g.parse::<u32>() {
            return Ok(Self { group: Some(gid) });
        }
        let c = std::ffi::CString::new(g).map_err(|_| AccessError::NoGroup(g.into()))?;
        // SAFETY: getgrnam reads a NUL-terminated name; the result is read at
        // once, before any other call could reuse its static buffer.
        let gr = unsafe { libc::getgrnam(c.as_ptr()) };
        if gr.is_null() {
            return Err(AccessError::NoGroup(g.into()));
        }
        // SAFETY: non-null, points to a valid group entry.
        Ok(Self { group: Some(unsafe { (*gr).gr_gid }) })
    }

    /// Whether the process at the other end of an API connection may use
    /// it: its uid, gid and supplementary groups as the socket recorded them
    /// at connect (`SO_PEERCRED`, `SO_PEERGROUPS`), never read later by pid.
    pub fn allows(&self, uid: u32, gid: u32, groups: &[u32]) -> bool {
        if privileged(uid) {
            return true;
        }
        let Some(group) = self.group else { return false };
        gid == group || groups.contains(&group)
    }

    /// Binds the API socket at `path` with mode 0600 (0660 and the group,
    /// with a group) from the start: it is bound in a private directory
    /// and moved into place, so no one can connect while it is more open.
    /// A stale socket at `path` is replaced; a live one or any other file
    /// is left alone and refused.
    pub fn bind(&self, path: &Path) -> Result<UnixListener, AccessError> {
        let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        std::fs::create_dir_all(parent).map_err(io("creating", parent))?;
        let m = std::fs::metadata(parent).map_err(io("checking", parent))?;
        // Others may not replace the socket: the directory is not writable
        // by them, or sticky (like /run, /tmp).
        if m.mode() & 0o022 != 0 && m.mode() & 0o1000 == 0 {
            let why = format!("writable by other users and not sticky (mode {:o})", m.mode() & 0o7777);
            return Err(AccessError::Untrusted { path: parent.to_owned(), why });
        }
        match std::fs::symlink_metadata(path) {
            Ok(m) if std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()) => {
                match std::os::unix::net::UnixStream::connect(path) {
                    // Nobody listens: left by an agent that was killed.
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                        std::fs::remove_file(path).map_err(io("removing the stale socket", path))?
                    }
                    _ => return Err(AccessError::InUse(path.to_owned())),
                }
            }
            Ok(_) => return Err(AccessError::NotASocket(path.to_owned())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io("checking", path)(e)),
        }
        let private = tempfile::Builder::new()
            .prefix(".dcmigrate-api-")
            .permissions(std::fs::Permissions::from_mode(0o700))
            .tempdir_in(parent)
            .map_err(io("creating a private directory in", parent))?;
        let tmp = private.path().join("sock");
        let listener = UnixListener::bind(&tmp).map_err(io("binding", &tmp))?;
        let mode = if self.group.is_some() { 0o660 } else { 0o600 };
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))
            .map_err(io("setting the mode of", &tmp))?;
        if let Some(gid) = self.group {
            std::os::unix::fs::lchown(&tmp, None, Some(gid)).map_err(io("setting the group of", &tmp))?;
        }
        // A second name for the socket, which fails rather than replace
        // whatever appeared at `path` meanwhile; the private one goes with
        // its directory.
        match std::fs::hard_link(&tmp, path) {
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Err(AccessError::InUse(path.to_owned())),
            r => r.map(|()| listener).map_err(io("placing the socket at", path)),
        }
    }
}

fn io(what: &'static str, p: &Path) -> impl FnOnce(std::io::Error) -> AccessError {
    let path = p.to_owned();
    move |source| AccessError::Io { what, path, source }
}

/// Root and the agent's own user: they could do anything the agent does.
pub(crate) fn privileged(uid: u32) -> bool {
    uid == 0 || uid == euid()
}

/// This process's effective uid.
pub(crate) fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() }
}

/// The supplementary groups the peer of a unix socket had when it
/// connected (`SO_PEERGROUPS`; none where the kernel cannot say).
pub(crate) fn peer_groups(fd: std::os::fd::BorrowedFd<'_>) -> Vec<u32> {
    use std::os::fd::AsRawFd;
    let mut groups = vec![0 as libc::gid_t; 64];
    loop {
        let mut len = (groups.len() * std::mem::size_of::<libc::gid_t>()) as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into `groups`.
        let rc = unsafe {
            libc::getsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let n = len as usize / std::mem::size_of::<libc::gid_t>();
        if rc == 0 {
            groups.truncate(n);
            return groups;
        }
        // ERANGE: `len` says how much room it needs (bounded: NGROUPS_MAX).
        if std::io::Error::last_os_error().raw_os_error() != Some(libc::ERANGE) || n <= groups.len() || n > 65536 {
            return vec![];
        }
        groups.resize(n, 0);
    }
}

/// Creates `dir` (mode 0700) if it is missing, and checks that it is a
/// directory (not a symlink) of this user's that nobody else can write to:
/// otherwise another local user could plant files or links where the
/// agent creates guests' RAM.
pub(crate) fn own_dir(dir: &Path) -> Result<(), AccessError> {
    let untrusted = |why: String| AccessError::Untrusted { path: dir.to_owned(), why };
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(io("creating", parent))?;
    }
    match std::os::unix::fs::DirBuilderExt::mode(&mut std::fs::DirBuilder::new(), 0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io("creating", dir)(e)),
    }
    let m = std::fs::symlink_metadata(dir).map_err(io("checking", dir))?;
    if !m.file_type().is_dir() {
        return Err(untrusted("not a directory (a symlink?): refusing to use it".into()));
    }
    if m.uid() != euid() {
        let why = format!("owned by uid {}, not by this agent's uid {}: refusing to use it", m.uid(), euid());
        return Err(untrusted(why));
    }
    if m.mode() & 0o022 != 0 {
        let why = format!("writable by other users (mode {:o}): refusing to use it", m.mode() & 0o7777);
        return Err(untrusted(why));
    }
    Ok(())
}

/// Checks what a client registers: a usable name, no directory for the
/// agent to remove, and files that are what they claim (no symlinks) and
/// belong to the caller (root and the agent's user may name anyone's).
/// Returns each file's identity, which every later open must find again.
pub(crate) fn check_record(vm: &VmRecord, caller_uid: u32) -> Result<BTreeMap<PathBuf, FileIdent>, RecordError> {
    if !crate::vm::valid_name(&vm.name) {
        return Err(RecordError::Name(vm.name.clone()));
    }
    if vm.owned_dir.is_some()
        || !vm.huge_dirs.is_empty()
        || vm.runtime_dir.is_some()
        || vm.cgroup.is_some()
        || vm.uid.is_some()
        || !vm.disks.is_empty()
    {
        return Err(RecordError::OwnedDir);
    }
    let mut idents = BTreeMap::new();
    let files = vm.ram.iter().map(|r| &r.path).chain(vm.dirty_log.iter());
    for path in files {
        idents.insert(path.clone(), check_path(path, false, caller_uid)?);
    }
    idents.insert(vm.control.clone(), check_socket(&vm.control, caller_uid)?);
    Ok(idents)
}

/// Checks that `path` is a socket the caller owns (root may name anyone's);
/// its identity.
pub(crate) fn check_socket(path: &Path, caller_uid: u32) -> Result<FileIdent, RecordError> {
    check_path(path, true, caller_uid)
}

/// The process whose descriptor `path` is, if it is `/proc/PID/fd/N`
/// (never `self`).
fn held_open(path: &Path) -> Option<u32> {
    let parts: Vec<_> = path.components().map(|c| c.as_os_str().to_string_lossy().into_owned()).collect();
    let number = |s: &str| !s.is_empty() && s.len() <= 10 && s.bytes().all(|b| b.is_ascii_digit());
    match parts.as_slice() {
        [root, proc_, pid, fd, n] if root == "/" && proc_ == "proc" && number(pid) && fd == "fd" && number(n) => {
            pid.parse().ok()
        }
        _ => None,
    }
}

fn check_path(path: &Path, socket: bool, caller_uid: u32) -> Result<FileIdent, RecordError> {
    let refuse = |why: String| RecordError::Path { path: path.to_owned(), why };
    if !path.is_absolute() {
        return Err(refuse("not an absolute path".into()));
    }
    // A file a process holds open (QEMU's unlinked RAM): the file itself is
    // judged, through the process's descriptor, if the process is the
    // caller's (the agent, as root, could open what the caller cannot).
    let m = match held_open(path) {
        Some(pid) => {
            if pid == std::process::id() {
                return Err(refuse("a descriptor of the agent itself".into()));
            }
            let owner = std::fs::metadata(format!("/proc/{pid}")).map_err(|e| refuse(e.to_string()))?.uid();
            if !privileged(caller_uid) && owner != caller_uid {
                return Err(refuse(format!("a descriptor of a process of uid {owner}, not the caller's")));
            }
            std::fs::metadata(path)
        }
        None => std::fs::symlink_metadata(path),
    }
    .map_err(|e| refuse(e.to_string()))?;
    let kind_ok =
        if socket { std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()) } else { m.file_type().is_file() };
    if !kind_ok {
        let kind = if socket { "socket" } else { "regular file" };
        return Err(refuse(format!("not a {kind} (symlinks are refused)")));
    }
    if !privileged(caller_uid) && m.uid() != caller_uid {
        return Err(refuse(format!("owned by uid {}, not by the caller (uid {caller_uid})", m.uid())));
    }
    Ok(FileIdent::of(&m))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::{LaunchSpec, RamFile};

    fn record(dir: &Path) -> VmRecord {
        let ram = dir.join("ram");
        std::fs::write(&ram, [0u8; 4096]).unwrap();
        let control = dir.join("sock");
        std::mem::forget(std::os::unix::net::UnixListener::bind(&control).unwrap());
        VmRecord {
            name: "vm".into(),
            ram: vec![RamFile::new("ram0", ram, 4096)],
            control,
            dirty_log: None,
            launch: LaunchSpec::Synthetic { workload: Default::default() },
            ..Default::default()
        }
    }

    #[test]
    fn a_caller_registers_only_its_own_files() {
        let dir = tempfile::tempdir().unwrap();
        let rec = record(dir.path());
        let owner = std::fs::metadata(&rec.ram[0].path).unwrap().uid();
        assert!(check_record(&rec, owner).is_ok());
        let other = owner.wrapping_add(4242).max(1);
        let e = check_record(&rec, other).unwrap_err().to_string();
        assert!(e.contains("not by the caller"), "{e}");
        let relative = VmRecord { control: "sock".into(), ..rec.clone() };
        assert!(check_record(&relative, owner).unwrap_err().to_string().contains("absolute"));
        let not_a_socket = VmRecord { control: rec.ram[0].path.clone(), ..rec };
        assert!(check_record(&not_a_socket, owner).unwrap_err().to_string().contains("not a socket"));
    }

    #[test]
    fn the_api_admits_root_the_agents_user_and_the_group() {
        let me = euid();
        let other = me.wrapping_add(4242).max(1);
        assert!(ApiAccess::default().allows(0, 0, &[]));
        assert!(ApiAccess::default().allows(me, 12345, &[]));
        assert!(!ApiAccess::default().allows(other, 777, &[]));
        assert!(ApiAccess { group: Some(777) }.allows(other, 777, &[]));
        assert!(!ApiAccess { group: Some(778) }.allows(other, 777, &[]));
        assert!(ApiAccess { group: Some(778) }.allows(other, 777, &[5, 778]), "a supplementary group");
        assert!(matches!(ApiAccess::with_group(Some("no-such-group-here")), Err(AccessError::NoGroup(_))));
        assert_eq!(ApiAccess::with_group(Some("4321")).unwrap().group, Some(4321));
    }

    #[test]
    fn a_file_a_process_holds_open_is_judged_by_the_file() {
        use std::os::fd::AsRawFd;
        assert_eq!(held_open(Path::new("/proc/123/fd/4")), Some(123));
        for not in ["/proc/self/fd/4", "/proc/123/fd/4/x", "/tmp/proc/1/fd/2", "/proc/1x/fd/2", "/proc/1/fd/"] {
            assert_eq!(held_open(Path::new(not)), None, "{not}");
        }
        // A process that holds a file open (as QEMU its RAM): a child of
        // this test, which is not the agent.
        let dir = tempfile::tempdir().unwrap();
        let ram = dir.path().join("ram");
        std::fs::write(&ram, b"x").unwrap();
        let mut child =
            std::process::Command::new("sleep").arg("30").stdin(std::fs::File::open(&ram).unwrap()).spawn().unwrap();
        let held = PathBuf::from(format!("/proc/{}/fd/0", child.id()));
        let ident = check_path(&held, false, euid()).expect("the file behind the descriptor");
        assert_eq!(ident, FileIdent::of(&std::fs::metadata(&ram).unwrap()));
        // Unlinked, as QEMU leaves its RAM in a mem-path directory: still it.
        std::fs::remove_file(&ram).unwrap();
        assert_eq!(check_path(&held, false, euid()).unwrap(), ident);
        // Never one of the agent's own descriptors.
        let f = std::fs::File::open(dir.path().join(".")).unwrap();
        let own = PathBuf::from(format!("/proc/{}/fd/{}", std::process::id(), f.as_raw_fd()));
        assert!(check_path(&own, false, euid()).unwrap_err().to_string().contains("the agent itself"));
        let _ = child.kill();
        let _ = child.wait();
    }
}
