//! Which file a path named when a client handed it over. A VM's RAM files,
//! control socket and dirty log are named by paths in directories their
//! owner controls; the agent (root) reopens them for every migration, so a
//! path swapped for a symlink (or another file) afterwards must not lead it
//! elsewhere. The (device, inode) seen at `vm add` or `Register` is kept,
//! and every later open checks the descriptor it got (`fstat`), then works
//! through that descriptor (`/proc/self/fd/N`) only.

use serde::{Deserialize, Serialize};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

/// A file's identity on this host.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileIdent {
    /// Its device.
    pub dev: u64,
    /// Its inode.
    pub ino: u64,
}

impl FileIdent {
    /// The identity in `m`.
    pub fn of(m: &std::fs::Metadata) -> Self {
        Self { dev: m.dev(), ino: m.ino() }
    }
}

fn changed(path: &Path) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::PermissionDenied,
        format!("{} is no longer the file that was added (replaced, or a symlink now): refusing it", path.display()),
    )
}

/// `f` if it is the file `want` names (no check without one).
fn checked(path: &Path, f: File, want: Option<FileIdent>) -> std::io::Result<File> {
    match want {
        Some(w) if FileIdent::of(&f.metadata()?) != w => Err(changed(path)),
        _ => Ok(f),
    }
}

/// Opens `path` (read-write if `write`) and checks it is the file recorded.
pub(crate) fn open(path: &Path, want: Option<FileIdent>, write: bool) -> std::io::Result<File> {
    let f = std::fs::OpenOptions::new().read(true).write(write).open(path)?;
    checked(path, f, want)
}

/// A name for the open file `f` that cannot be redirected: what code that
/// takes a path opens while `f` is held.
pub(crate) fn fd_path(f: &File) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", f.as_raw_fd()))
}

/// Connects to the socket at `path`, if it is the one recorded; through a
/// descriptor of the socket file itself, so nothing can swap it in between
/// (and paths longer than a socket address holds work too).
pub(crate) fn connect(path: &Path, want: Option<FileIdent>) -> std::io::Result<UnixStream> {
    use rustix::fs::{Mode, OFlags};
    let fd = rustix::fs::open(path, OFlags::PATH | OFlags::CLOEXEC, Mode::empty())?;
    let f = checked(path, File::from(fd), want)?;
    UnixStream::connect(fd_path(&f))
}
