//! What a destination can take in. An incoming session's RAM must fit in the
//! data dir's free space, less what other incoming sessions reserved and
//! have not filled yet (their files are sparse until the pages arrive), and
//! under the operator's limits per session and in total. Checked before
//! anything is allocated: a tmpfs that fills up kills the VMs already
//! running from it (SIGBUS on their next new page).
//!
//! RAM on huge pages must fit in the pool of its page size (and under its
//! mount's limit). The kernel reserves a shared hugetlbfs mapping's pages
//! when it is made, so only sessions admitted but not yet mapped are
//! counted beside what the pool says; once mapped, no page can run out.

use crate::memory::backing::{self, HugeMount};
use std::path::{Path, PathBuf};
use thiserror::Error;

/// The operator's limits on incoming RAM and sessions.
#[derive(Clone, Copy, Debug, Default)]
pub struct Limits {
    /// Largest RAM of one incoming session.
    pub per_session: Option<u64>,
    /// Largest RAM of all incoming sessions at once.
    pub total: Option<u64>,
    /// Most incoming sessions at once.
    pub sessions: Option<u32>,
    /// Most incoming sessions from one source at once.
    pub per_peer: Option<u32>,
}

/// Incoming sessions a host takes at once unless `--max-incoming` says.
pub(crate) const DEFAULT_MAX_INCOMING: u32 = 32;
/// Incoming sessions one source may hold at once unless
/// `--max-incoming-per-peer` says.
pub(crate) const DEFAULT_MAX_PER_PEER: u32 = 16;

/// Room an incoming session holds in the data dir.
#[derive(Clone, Debug)]
pub struct Reservation {
    /// Its RAM's size.
    pub bytes: u64,
    /// Its RAM files (allocated as pages arrive).
    pub files: Vec<RamShare>,
    /// Bytes the source will not send unless the guest writes them (holes
    /// there): not to come before the switchover (as the source said).
    pub holes: u64,
    /// The migration it belongs to (protocol 4).
    pub migration: Option<crate::protocol::MigrationId>,
    /// The source that opened it.
    pub peer: String,
    /// The disk images its VM will write.
    pub disks: Vec<crate::vm::ident::FileIdent>,
}

/// One RAM file of a session: where, how big, on which pages.
#[derive(Clone, Debug)]
pub struct RamShare {
    /// The file.
    pub path: PathBuf,
    /// Its size.
    pub bytes: u64,
    /// Its pages (a huge page size: on a hugetlbfs mount).
    pub page_size: u64,
}

impl RamShare {
    fn huge(&self) -> bool {
        self.page_size > crate::memory::PAGE_SIZE as u64
    }
}

impl Reservation {
    /// What its files on the data dir will still take from its free space.
    fn unfilled(&self) -> u64 {
        self.base_bytes().saturating_sub(self.allocated())
    }

    /// What can still arrive before the switchover on the data dir: the
    /// unfilled RAM less the source's holes (huge pages are reserved).
    fn to_come(&self) -> u64 {
        self.base_bytes().saturating_sub(self.holes).saturating_sub(self.allocated())
    }

    fn base_bytes(&self) -> u64 {
        self.files.iter().filter(|f| !f.huge()).map(|f| f.bytes).sum()
    }

    fn allocated(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        let base = self.files.iter().filter(|f| !f.huge());
        base.filter_map(|f| std::fs::metadata(&f.path).ok()).map(|m| m.blocks().saturating_mul(512)).sum()
    }

    /// Its bytes on `page_size` pages not reserved by the kernel yet
    /// (files not yet created, hence not yet mapped).
    fn unreserved(&self, page_size: u64) -> u64 {
        let f = self.files.iter().filter(|f| f.page_size == page_size && !f.path.exists());
        f.map(|f| f.bytes).sum()
    }

    /// Its bytes on each huge page size.
    fn huge(&self) -> std::collections::BTreeMap<u64, u64> {
        let mut m = std::collections::BTreeMap::new();
        self.files.iter().filter(|f| f.huge()).for_each(|f| *m.entry(f.page_size).or_default() += f.bytes);
        m
    }
}

/// Why a session does not fit on this host.
#[derive(Debug, Error)]
pub enum CapacityError {
    /// Above the limit per session.
    #[error("{need} bytes of RAM exceed this host's limit of {limit} per incoming session (--max-session-ram)")]
    Session {
        /// The session's RAM.
        need: u64,
        /// The limit.
        limit: u64,
    },
    /// Above the limit for all sessions.
    #[error(
        "{need} bytes of RAM, with {incoming} already incoming, exceed this host's limit of {limit} (--max-incoming-ram)"
    )]
    Total {
        /// The session's RAM.
        need: u64,
        /// Other incoming sessions' RAM.
        incoming: u64,
        /// The limit.
        limit: u64,
    },
    /// Not enough huge pages.
    #[error(
        "{need} bytes of RAM on {} pages do not fit in {dir}: {room} bytes of such pages left (free less reserved, \
         under the mount's size), {pending} of them promised to other incoming sessions",
        backing::show(*page_size)
    )]
    HugePages {
        /// The session's RAM on those pages.
        need: u64,
        /// The page size.
        page_size: u64,
        /// The mount.
        dir: PathBuf,
        /// What the pool (and mount) can still give.
        room: u64,
        /// What other admitted sessions will still reserve.
        pending: u64,
    },
    /// The pool of a page size could not be read.
    #[error("reading the huge page pool of {0}")]
    Pool(PathBuf, #[source] std::io::Error),
    /// Not enough free space in the data dir.
    #[error("{need} bytes of RAM do not fit in {dir}: {free} bytes free, {reserved} of them promised to other incoming sessions")]
    Space {
        /// The session's RAM.
        need: u64,
        /// The data dir.
        dir: PathBuf,
        /// Its free space.
        free: u64,
        /// What other sessions will still fill.
        reserved: u64,
    },
    /// As many incoming sessions as the operator allows are open.
    #[error("{0} incoming migrations already run here, the most this host takes at once (--max-incoming)")]
    Sessions(u32),
    /// As many incoming sessions from this source as the operator allows are open.
    #[error("{limit} incoming migrations from {peer} already run here, the most one source may have (--max-incoming-per-peer)")]
    PerPeer {
        /// The source.
        peer: String,
        /// The limit.
        limit: u32,
    },
    /// The host is drained.
    #[error("this host is drained: it takes no new incoming migrations")]
    Drained,
    /// A disk image another VM of this host writes.
    #[error("a disk image of the VM is in use by {0} on this host")]
    DiskInUse(String),
    /// A migration id this host already has a session for, or committed.
    #[error("migration {0} already has a session here, or committed here")]
    Reused(crate::protocol::MigrationId),
    /// The data dir's free space could not be read.
    #[error("reading the free space of {0}")]
    Statvfs(PathBuf, #[source] std::io::Error),
}

impl CapacityError {
    /// Its kind, as a source is told it.
    pub fn code(&self) -> crate::protocol::ErrorCode {
        use crate::protocol::ErrorCode as C;
        match self {
            CapacityError::Drained => C::Drained,
            CapacityError::Sessions(_) | CapacityError::PerPeer { .. } => C::TooMany,
            CapacityError::Session { .. }
            | CapacityError::Total { .. }
            | CapacityError::HugePages { .. }
            | CapacityError::Space { .. } => C::NoRoom,
            CapacityError::DiskInUse(_) | CapacityError::Reused(_) => C::Conflict,
            CapacityError::Pool(..) | CapacityError::Statvfs(..) => C::Failed,
        }
    }
}

/// Whether a session holding `room` fits beside `others`.
pub(crate) fn admit<'a>(
    limits: &Limits,
    (data_dir, mounts): (&Path, &[HugeMount]),
    room: &Reservation,
    others: impl Iterator<Item = &'a Reservation> + Clone,
) -> Result<(), CapacityError> {
    let (need, peer) = (room.bytes, room.peer.as_str());
    if let Some(limit) = limits.per_session.filter(|&l| need > l) {
        return Err(CapacityError::Session { need, limit });
    }
    if let Some(limit) = limits.sessions.filter(|&l| others.clone().count() >= l as usize) {
        return Err(CapacityError::Sessions(limit));
    }
    if let Some(limit) = limits.per_peer.filter(|&l| others.clone().filter(|r| r.peer == peer).count() >= l as usize) {
        return Err(CapacityError::PerPeer { peer: peer.to_owned(), limit });
    }
    let incoming: u64 = others.clone().map(|r| r.bytes).sum();
    if let Some(limit) = limits.total.filter(|&l| need.saturating_add(incoming) > l) {
        return Err(CapacityError::Total { need, incoming, limit });
    }
    for (page_size, need) in room.huge() {
        // The session's plan put it on a mount of that size.
        let Some(m) = mounts.iter().find(|m| m.page_size == page_size) else { continue };
        let room = m.room().map_err(|e| CapacityError::Pool(m.dir.clone(), e))?;
        let pending: u64 = others.clone().map(|r| r.unreserved(page_size)).sum();
        if need.saturating_add(pending) > room {
            return Err(CapacityError::HugePages { need, page_size, dir: m.dir.clone(), room, pending });
        }
    }
    let base = room.base_bytes();
    if base == 0 {
        return Ok(());
    }
    let free = free_bytes(data_dir).map_err(|e| CapacityError::Statvfs(data_dir.to_owned(), e))?;
    let reserved: u64 = others.map(Reservation::unfilled).sum();
    if base.saturating_add(reserved) > free {
        return Err(CapacityError::Space { need: base, dir: data_dir.to_owned(), free, reserved });
    }
    Ok(())
}

/// Why a session holding `own` can no longer complete here: what can still
/// arrive for it (the source's holes aside) exceeds the data dir's free
/// space (something besides the sessions filled it). Each session is
/// judged on its own: admission promised each its whole room.
pub(crate) fn shortfall(data_dir: &Path, own: &Reservation) -> Option<String> {
    let need = own.to_come();
    let free = free_bytes(data_dir).ok()?;
    (need > free).then(|| {
        format!("no room left in {}: {} MiB free, {} MiB still to come", data_dir.display(), free >> 20, need >> 20)
    })
}

/// What this host advertises to a peer choosing a destination: room left
/// beside the sessions it holds (and under its total limit), and its limits.
pub(crate) fn advertise<'a>(
    limits: &Limits,
    (data_dir, mounts): (&Path, &[HugeMount]),
    sessions: impl Iterator<Item = &'a Reservation> + Clone,
    drained: bool,
) -> crate::protocol::control::Capacity {
    let huge_free = mounts
        .iter()
        .map(|m| {
            let pending: u64 = sessions.clone().map(|r| r.unreserved(m.page_size)).sum();
            (m.page_size, m.room().unwrap_or(0).saturating_sub(pending))
        })
        .collect();
    let reserved: u64 = sessions.clone().map(Reservation::unfilled).sum();
    let incoming: u64 = sessions.clone().map(|r| r.bytes).sum();
    let mut free = free_bytes(data_dir).unwrap_or(0).saturating_sub(reserved);
    if let Some(total) = limits.total {
        free = free.min(total.saturating_sub(incoming));
    }
    crate::protocol::control::Capacity {
        free_bytes: free,
        max_session_bytes: limits.per_session,
        incoming: sessions.count() as u32,
        max_incoming: limits.sessions,
        drained,
        huge_free,
    }
}

/// Bytes an unprivileged writer may still allocate in `dir`'s file system.
fn free_bytes(dir: &Path) -> std::io::Result<u64> {
    space(dir).map(|(free, _)| free)
}

/// `dir`'s file system: bytes an unprivileged writer may still allocate,
/// and its size.
pub(crate) fn space(dir: &Path) -> std::io::Result<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `c` is a NUL-terminated path and `st` a buffer statvfs fills.
    if unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: statvfs returned 0, so it filled `st`.
    let st = unsafe { st.assume_init() };
    // Both are u64 on Linux x86_64 and aarch64, narrower elsewhere.
    #[allow(clippy::unnecessary_cast)]
    let (avail, blocks, frsize) = (st.f_bavail as u64, st.f_blocks as u64, st.f_frsize as u64);
    Ok((avail.saturating_mul(frsize), blocks.saturating_mul(frsize)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_and_free_space() {
        let dir = tempfile::tempdir().unwrap();
        let free = free_bytes(dir.path()).unwrap();
        assert!(free > 0);
        let none: [Reservation; 0] = [];
        let at = (dir.path(), &[][..]);
        let session = |bytes: u64, peer: &str| Reservation {
            bytes,
            files: vec![RamShare { path: dir.path().join("absent"), bytes, page_size: 4096 }],
            holes: 0,
            migration: None,
            peer: peer.into(),
            disks: vec![],
        };
        assert!(admit(&Limits::default(), at, &session(1 << 20, "p"), none.iter()).is_ok());
        let e = admit(&Limits::default(), at, &session(64 << 40, "p"), none.iter()).unwrap_err();
        assert!(matches!(e, CapacityError::Space { .. }), "{e}");
        let per = Limits { per_session: Some(1 << 20), ..Default::default() };
        assert!(matches!(admit(&per, at, &session(2 << 20, "p"), none.iter()), Err(CapacityError::Session { .. })));
        // Another session's unfilled RAM is promised to it.
        let other = [session(free, "p")];
        assert!(matches!(
            admit(&Limits::default(), at, &session(1 << 20, "p"), other.iter()),
            Err(CapacityError::Space { .. })
        ));
        let total = Limits { total: Some(free + (1 << 20)), ..Default::default() };
        assert!(matches!(admit(&total, at, &session(2 << 20, "p"), other.iter()), Err(CapacityError::Total { .. })));
        let one = Limits { sessions: Some(1), ..Default::default() };
        assert!(matches!(admit(&one, at, &session(1 << 20, "p"), other.iter()), Err(CapacityError::Sessions(1))));
        let mine = Limits { per_peer: Some(1), ..Default::default() };
        let e = admit(&mine, at, &session(1 << 20, "p"), other.iter()).unwrap_err();
        assert!(matches!(e, CapacityError::PerPeer { limit: 1, .. }), "{e}");
        let space = admit(&mine, at, &session(1 << 20, "q"), other.iter()).unwrap_err();
        assert!(matches!(space, CapacityError::Space { .. }), "another peer passes the per-peer limit: {space}");
        let ad = advertise(&total, at, other.iter(), true);
        assert_eq!((ad.incoming, ad.drained), (1, true));
        assert!(ad.free_bytes <= 1 << 20, "the total limit bounds the room: {ad:?}");
    }

    #[test]
    fn huge_pages_count_apart_from_the_data_dir() {
        let dir = tempfile::tempdir().unwrap();
        let free = free_bytes(dir.path()).unwrap();
        let share = |name: &str, bytes: u64, page_size: u64| RamShare { path: dir.path().join(name), bytes, page_size };
        let huge = Reservation {
            bytes: 2 * free,
            files: vec![share("a", free, 2 << 20), share("b", free, 2 << 20)],
            holes: 0,
            migration: None,
            peer: "p".into(),
            disks: vec![],
        };
        assert_eq!(huge.base_bytes(), 0);
        assert_eq!(huge.unfilled(), 0, "huge pages take nothing from the data dir");
        assert_eq!(huge.huge().get(&(2 << 20)), Some(&(2 * free)));
        assert_eq!(huge.unreserved(2 << 20), 2 * free, "not created, so not reserved by the kernel");
        std::fs::write(dir.path().join("a"), b"").unwrap();
        assert_eq!(huge.unreserved(2 << 20), free, "a created file is mapped, its pages reserved");
        assert_eq!(huge.unreserved(1 << 30), 0);
        // No mount of that size here: the plan refuses before admission,
        // and the data dir is not asked for it.
        assert!(admit(&Limits::default(), (dir.path(), &[]), &huge, [].iter()).is_ok());
    }
}
