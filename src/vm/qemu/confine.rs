//! The files a destination opens for a VM it runs for a peer. Everything a
//! description names is opened by the agent: images, kernels and firmware
//! beneath the operator's storage directories (`openat2` with
//! `RESOLVE_BENEATH`: no `..`, absolute path or symlink leaves them), a
//! qcow2 image's backing chain and data file likewise, from its header;
//! output files are created new in the VM's own runtime directory through
//! its descriptor (`O_EXCL | O_NOFOLLOW`). QEMU only gets descriptors.

use super::description::{Disk, Format};
use super::qcow2;
use rustix::fs::{Mode, OFlags, ResolveFlags};
use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use thiserror::Error;

/// Deepest backing chain a destination follows.
pub const MAX_CHAIN: usize = 16;
/// Largest kernel, initrd, device tree or firmware a destination copies.
pub const MAX_BOOT_FILE: u64 = 256 << 20;

/// Why a file a description names cannot be opened here.
#[derive(Debug, Error)]
pub enum ConfineError {
    /// No storage directory has it (or it would leave the directory).
    #[error("{name:?} is not beneath this host's storage ({roots})")]
    NotFound {
        /// The name.
        name: String,
        /// The storage directories tried.
        roots: String,
    },
    /// It exists but cannot be opened as asked.
    #[error("opening {name:?} beneath {root}")]
    Open {
        /// The name.
        name: String,
        /// The storage directory.
        root: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A boot file larger than [`MAX_BOOT_FILE`].
    #[error("{name:?} is {size} bytes, more than a boot file may be ({MAX_BOOT_FILE})")]
    TooLarge {
        /// The name.
        name: String,
        /// Its size.
        size: u64,
    },
    /// A qcow2 header that cannot be used.
    #[error("image {name:?}")]
    Qcow2 {
        /// The image.
        name: String,
        /// Why.
        #[source]
        source: qcow2::Qcow2Error,
    },
    /// A file an image refers to that a destination does not open.
    #[error("image {image:?} refers to {refers:?}: {why}")]
    Reference {
        /// The image.
        image: String,
        /// What it names.
        refers: String,
        /// Why it is refused.
        why: &'static str,
    },
    /// A descriptor-level call failed (memfd, runtime directory).
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ConfineError {
    let what = what.into();
    move |source| ConfineError::Io { what, source }
}

/// The operator's storage directories.
#[derive(Clone, Debug, Default)]
pub struct Storage {
    roots: Vec<PathBuf>,
}

/// Where a file was found: its root and its name there.
#[derive(Clone, Debug)]
struct Found {
    root: usize,
    name: String,
}

impl Storage {
    /// The directories `--storage` names, in order.
    pub fn new(roots: &[PathBuf]) -> Self {
        Self { roots: roots.to_vec() }
    }

    fn roots_text(&self) -> String {
        if self.roots.is_empty() {
            return "none configured".into();
        }
        self.roots.iter().map(|r| r.display().to_string()).collect::<Vec<_>>().join(", ")
    }

    /// Opens `name` beneath the first storage directory that has it.
    fn open(&self, name: &str, write: bool, direct: bool) -> Result<(File, Found), ConfineError> {
        if !super::description::valid_storage_name(name) {
            return Err(ConfineError::NotFound { name: name.into(), roots: self.roots_text() });
        }
        for (i, root) in self.roots.iter().enumerate() {
            match self.open_in(i, name, write, direct) {
                Ok(f) => return Ok((f, Found { root: i, name: name.into() })),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(source) => return Err(ConfineError::Open { name: name.into(), root: root.clone(), source }),
            }
        }
        Err(ConfineError::NotFound { name: name.into(), roots: self.roots_text() })
    }

    fn open_in(&self, root: usize, name: &str, write: bool, direct: bool) -> std::io::Result<File> {
        let dir =
            rustix::fs::open(&self.roots[root], OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())?;
        let mut flags = OFlags::CLOEXEC | OFlags::NOCTTY;
        flags |= if write { OFlags::RDWR } else { OFlags::RDONLY };
        if direct {
            flags |= OFlags::DIRECT;
        }
        let resolve = ResolveFlags::BENEATH | ResolveFlags::NO_MAGICLINKS;
        let fd = rustix::fs::openat2(&dir, name, flags, Mode::empty(), resolve)?;
        let f = File::from(fd);
        if !f.metadata()?.is_file() {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a regular file"));
        }
        Ok(f)
    }

    /// A boot file (kernel, initrd, firmware) as a sealed memfd copy: QEMU
    /// reads it by `/proc/self/fd/N` whatever its user, and nothing can
    /// change it under QEMU.
    pub fn boot_file(&self, name: &str) -> Result<OwnedFd, ConfineError> {
        let mut f = self.check_boot_file(name)?;
        let flags = rustix::fs::MemfdFlags::ALLOW_SEALING | rustix::fs::MemfdFlags::CLOEXEC;
        let fd = rustix::fs::memfd_create(name.rsplit('/').next().unwrap_or("boot"), flags)
            .map_err(|e| ConfineError::Io { what: format!("a memfd for {name:?}"), source: e.into() })?;
        let mut copy = File::from(fd);
        std::io::copy(&mut f, &mut copy).map_err(io(format!("copying {name:?}")))?;
        use rustix::fs::SealFlags;
        rustix::fs::fcntl_add_seals(&copy, SealFlags::WRITE | SealFlags::GROW | SealFlags::SHRINK | SealFlags::SEAL)
            .map_err(|e| ConfineError::Io { what: format!("sealing the copy of {name:?}"), source: e.into() })?;
        Ok(copy.into())
    }

    /// A boot file, open, if it exists beneath storage and is not too large.
    pub fn check_boot_file(&self, name: &str) -> Result<File, ConfineError> {
        let (f, _) = self.open(name, false, false)?;
        let size = f.metadata().map_err(io(format!("reading {name:?}")))?.len();
        if size > MAX_BOOT_FILE {
            return Err(ConfineError::TooLarge { name: name.into(), size });
        }
        Ok(f)
    }

    /// A disk and every file its format needs, top first.
    pub fn disk(&self, d: &Disk) -> Result<Chain, ConfineError> {
        let direct = d.props.get("cache.direct").is_some_and(|v| ["on", "true", "yes"].contains(&v.as_str()));
        let (file, found) = self.open(&d.image, !d.read_only, direct)?;
        let mut chain = Chain { nodes: vec![] };
        self.node(&mut chain, file, found, d.format, !d.read_only, direct)?;
        Ok(chain)
    }

    fn node(
        &self,
        chain: &mut Chain,
        file: File,
        at: Found,
        format: Format,
        write: bool,
        direct: bool,
    ) -> Result<(), ConfineError> {
        if chain.nodes.len() >= MAX_CHAIN {
            return Err(ConfineError::Reference {
                image: at.name,
                refers: "a backing file".into(),
                why: "the chain is too deep",
            });
        }
        if format == Format::Raw {
            chain.nodes.push(Node { file, format, data_file: None, name: at.name });
            return Ok(());
        }
        let header = qcow2::read(&file).map_err(|source| ConfineError::Qcow2 { name: at.name.clone(), source })?;
        let data_file = match &header.data_file {
            Some(d) => Some(self.referred(&at, d, write, direct)?.0),
            None => None,
        };
        chain.nodes.push(Node { file, format, data_file, name: at.name.clone() });
        let Some(backing) = &header.backing else { return Ok(()) };
        let (bfile, bfound) = self.referred(&at, backing, false, direct)?;
        let bformat = match header.backing_format.as_deref() {
            Some("raw") => Format::Raw,
            Some("qcow2") => Format::Qcow2,
            Some(_) => {
                return Err(ConfineError::Reference {
                    image: at.name,
                    refers: backing.clone(),
                    why: "a format other than raw or qcow2",
                })
            }
            None => {
                let mut first = [0u8; 8];
                use std::os::unix::fs::FileExt;
                let n = bfile.read_at(&mut first, 0).unwrap_or(0);
                if qcow2::is_qcow2(&first[..n]) {
                    Format::Qcow2
                } else {
                    Format::Raw
                }
            }
        };
        self.node(chain, bfile, bfound, bformat, false, direct)
    }

    /// A file an image names, as QEMU would resolve it (relative to the
    /// image's directory), opened beneath the same storage directory.
    fn referred(&self, image: &Found, name: &str, write: bool, direct: bool) -> Result<(File, Found), ConfineError> {
        let refuse = |why| ConfineError::Reference { image: image.name.clone(), refers: name.into(), why };
        let before_slash = name.split('/').next().unwrap_or_default();
        if before_slash.contains(':') {
            return Err(refuse("a protocol (nbd:, json:, ...) instead of a file"));
        }
        let root = &self.roots[image.root];
        let rel = if Path::new(name).is_absolute() {
            let stripped = [Some(root.clone()), root.canonicalize().ok()]
                .into_iter()
                .flatten()
                .find_map(|r| Path::new(name).strip_prefix(&r).ok().map(Path::to_path_buf));
            stripped.ok_or_else(|| refuse("an absolute path outside the image's storage directory"))?
        } else {
            Path::new(&image.name).parent().unwrap_or(Path::new("")).join(name)
        };
        let rel = rel.to_str().ok_or_else(|| refuse("a name that is not UTF-8"))?.to_owned();
        // `..` is allowed as long as it stays beneath: the kernel checks.
        match self.open_in(image.root, &rel, write, direct) {
            Ok(f) => Ok((f, Found { root: image.root, name: rel })),
            Err(source) => Err(ConfineError::Open { name: rel, root: root.clone(), source }),
        }
    }
}

/// A disk's files, top image first; each node's backing is the next.
pub struct Chain {
    /// The images.
    pub nodes: Vec<Node>,
}

/// One image of a chain.
pub struct Node {
    /// The image, opened read-write only at the top of a writable disk.
    pub file: File,
    /// Its format.
    pub format: Format,
    /// Its external data file, if it has one.
    pub data_file: Option<File>,
    /// Its name beneath storage (for logs and errors).
    pub name: String,
}

/// A VM's runtime directory (logs, sockets): the agent's, never QEMU's.
pub struct RuntimeDir {
    /// Its path.
    pub path: PathBuf,
    dir: OwnedFd,
}

impl RuntimeDir {
    /// Creates `path` new (0700, the agent's), refusing one that exists.
    pub fn create(path: &Path) -> Result<Self, ConfineError> {
        std::os::unix::fs::DirBuilderExt::mode(&mut std::fs::DirBuilder::new(), 0o700)
            .create(path)
            .map_err(io(format!("creating {}", path.display())))?;
        Self::open(path)
    }

    /// Opens an existing one (the agent's own, checked by the caller).
    pub fn open(path: &Path) -> Result<Self, ConfineError> {
        let dir = rustix::fs::open(
            path,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| ConfineError::Io { what: format!("opening {}", path.display()), source: e.into() })?;
        Ok(Self { path: path.to_owned(), dir })
    }

    /// Creates the file `name` in it, new, never through a symlink.
    pub fn create_file(&self, name: &str, mode: u32) -> Result<File, ConfineError> {
        let flags = OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let fd = rustix::fs::openat(&self.dir, name, flags, Mode::from_raw_mode(mode)).map_err(|e| {
            ConfineError::Io { what: format!("creating {name} in {}", self.path.display()), source: e.into() }
        })?;
        Ok(File::from(fd))
    }

    /// A path naming `name` in this directory through its descriptor (for
    /// calls that take a path, like binding a socket): short, and immune to
    /// the directory being moved.
    pub fn fd_path(&self, name: &str) -> PathBuf {
        use std::os::fd::AsRawFd;
        PathBuf::from(format!("/proc/self/fd/{}/{name}", self.dir.as_fd().as_raw_fd()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(image: &str, format: Format) -> Disk {
        Disk { id: "d0".into(), image: image.into(), format, read_only: false, props: Default::default() }
    }

    #[test]
    fn opens_only_beneath_storage() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("images");
        std::fs::create_dir(&root).unwrap();
        std::fs::write(root.join("a.raw"), b"x").unwrap();
        std::fs::write(t.path().join("secret"), b"s").unwrap();
        std::os::unix::fs::symlink(t.path().join("secret"), root.join("link")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", root.join("abs")).unwrap();
        let s = Storage::new(std::slice::from_ref(&root));
        assert!(s.disk(&disk("a.raw", Format::Raw)).is_ok());
        for bad in ["link", "abs", "../secret", "nope"] {
            assert!(s.disk(&disk(bad, Format::Raw)).is_err(), "{bad} opened");
        }
    }

    #[test]
    fn follows_a_qcow2_chain_beneath_storage_only() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("images");
        std::fs::create_dir_all(root.join("vm")).unwrap();
        std::fs::write(root.join("base.raw"), b"base").unwrap();
        std::fs::write(root.join("vm/top.qcow2"), qcow2::tests::header(Some("../base.raw"), Some("raw"), None))
            .unwrap();
        std::fs::write(root.join("vm/evil.qcow2"), qcow2::tests::header(Some("/etc/shadow"), None, None)).unwrap();
        std::fs::write(root.join("vm/up.qcow2"), qcow2::tests::header(Some("../../x"), None, None)).unwrap();
        std::fs::write(root.join("vm/nbd.qcow2"), qcow2::tests::header(Some("nbd:localhost:1"), None, None)).unwrap();
        std::fs::write(root.join("vm/data.qcow2"), qcow2::tests::header(None, None, Some("/etc/passwd"))).unwrap();
        let s = Storage::new(std::slice::from_ref(&root));
        let chain = s.disk(&disk("vm/top.qcow2", Format::Qcow2)).unwrap();
        assert_eq!(chain.nodes.len(), 2);
        assert_eq!(chain.nodes[1].name, "vm/../base.raw");
        for bad in ["vm/evil.qcow2", "vm/up.qcow2", "vm/nbd.qcow2", "vm/data.qcow2"] {
            assert!(s.disk(&disk(bad, Format::Qcow2)).is_err(), "{bad} opened");
        }
        // A loop ends at the depth bound.
        std::fs::write(root.join("loop.qcow2"), qcow2::tests::header(Some("loop.qcow2"), Some("qcow2"), None)).unwrap();
        assert!(s.disk(&disk("loop.qcow2", Format::Qcow2)).is_err());
    }

    #[test]
    fn output_files_are_new_and_never_followed() {
        let t = tempfile::tempdir().unwrap();
        let rt = RuntimeDir::create(&t.path().join("vm")).unwrap();
        rt.create_file("serial.log", 0o600).unwrap();
        assert!(rt.create_file("serial.log", 0o600).is_err(), "an existing file");
        std::os::unix::fs::symlink(t.path().join("target"), rt.path.join("link")).unwrap();
        assert!(rt.create_file("link", 0o600).is_err(), "a symlink");
        assert!(!t.path().join("target").exists());
    }
}
