//! What a destination can take in. An incoming session's RAM must fit in the
//! data dir's free space, less what other incoming sessions reserved and
//! have not filled yet (their files are sparse until the pages arrive), and
//! under the operator's limits per session and in total. Checked before
//! anything is allocated: a tmpfs that fills up kills the VMs already
//! running from it (SIGBUS on their next new page).

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
pub const DEFAULT_MAX_INCOMING: u32 = 32;
/// Incoming sessions one source may hold at once unless
/// `--max-incoming-per-peer` says.
pub const DEFAULT_MAX_PER_PEER: u32 = 16;

/// Room an incoming session holds in the data dir.
#[derive(Clone, Debug)]
pub struct Reservation {
    /// Its RAM's size.
    pub bytes: u64,
    /// Its RAM files (allocated as pages arrive).
    pub files: Vec<PathBuf>,
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

impl Reservation {
    /// What its files will still take from the free space.
    fn unfilled(&self) -> u64 {
        self.bytes.saturating_sub(self.allocated())
    }

    /// What can still arrive before the switchover: the unfilled RAM less
    /// the source's holes.
    fn to_come(&self) -> u64 {
        self.bytes.saturating_sub(self.holes).saturating_sub(self.allocated())
    }

    fn allocated(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        self.files.iter().filter_map(|f| std::fs::metadata(f).ok()).map(|m| m.blocks().saturating_mul(512)).sum()
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

/// Whether a session of `need` more bytes of incoming RAM from `peer` fits
/// beside `others`.
pub fn admit<'a>(
    limits: &Limits,
    data_dir: &Path,
    (need, peer): (u64, &str),
    others: impl Iterator<Item = &'a Reservation> + Clone,
) -> Result<(), CapacityError> {
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
    let free = free_bytes(data_dir).map_err(|e| CapacityError::Statvfs(data_dir.to_owned(), e))?;
    let reserved: u64 = others.map(Reservation::unfilled).sum();
    if need.saturating_add(reserved) > free {
        return Err(CapacityError::Space { need, dir: data_dir.to_owned(), free, reserved });
    }
    Ok(())
}

/// Why a session holding `own` can no longer complete here: what can still
/// arrive for it (the source's holes aside) exceeds the data dir's free
/// space (something besides the sessions filled it). Each session is
/// judged on its own: admission promised each its whole room.
pub fn shortfall(data_dir: &Path, own: &Reservation) -> Option<String> {
    let need = own.to_come();
    let free = free_bytes(data_dir).ok()?;
    (need > free).then(|| {
        format!("no room left in {}: {} MiB free, {} MiB still to come", data_dir.display(), free >> 20, need >> 20)
    })
}

/// What this host advertises to a peer choosing a destination: room left
/// beside the sessions it holds (and under its total limit), and its limits.
pub fn advertise<'a>(
    limits: &Limits,
    data_dir: &Path,
    sessions: impl Iterator<Item = &'a Reservation> + Clone,
    drained: bool,
) -> crate::protocol::control::Capacity {
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
    }
}

/// Bytes an unprivileged writer may still allocate in `dir`'s file system.
fn free_bytes(dir: &Path) -> std::io::Result<u64> {
    space(dir).map(|(free, _)| free)
}

/// `dir`'s file system: bytes an unprivileged writer may still allocate,
/// and its size.
pub fn space(dir: &Path) -> std::io::Result<(u64, u64)> {
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
        assert!(admit(&Limits::default(), dir.path(), (1 << 20, "p"), none.iter()).is_ok());
        let e = admit(&Limits::default(), dir.path(), (64 << 40, "p"), none.iter()).unwrap_err();
        assert!(matches!(e, CapacityError::Space { .. }), "{e}");
        let per = Limits { per_session: Some(1 << 20), ..Default::default() };
        assert!(matches!(admit(&per, dir.path(), (2 << 20, "p"), none.iter()), Err(CapacityError::Session { .. })));
        // Another session's unfilled RAM is promised to it.
        let other = [Reservation {
            bytes: free,
            files: vec![dir.path().join("absent")],
            holes: 0,
            migration: None,
            peer: "p".into(),
            disks: vec![],
        }];
        assert!(matches!(
            admit(&Limits::default(), dir.path(), (1 << 20, "p"), other.iter()),
            Err(CapacityError::Space { .. })
        ));
        let total = Limits { total: Some(free + (1 << 20)), ..Default::default() };
        assert!(matches!(admit(&total, dir.path(), (2 << 20, "p"), other.iter()), Err(CapacityError::Total { .. })));
        let one = Limits { sessions: Some(1), ..Default::default() };
        assert!(matches!(admit(&one, dir.path(), (1 << 20, "p"), other.iter()), Err(CapacityError::Sessions(1))));
        let mine = Limits { per_peer: Some(1), ..Default::default() };
        let e = admit(&mine, dir.path(), (1 << 20, "p"), other.iter()).unwrap_err();
        assert!(matches!(e, CapacityError::PerPeer { limit: 1, .. }), "{e}");
        let space = admit(&mine, dir.path(), (1 << 20, "q"), other.iter()).unwrap_err();
        assert!(matches!(space, CapacityError::Space { .. }), "another peer passes the per-peer limit: {space}");
        let ad = advertise(&total, dir.path(), other.iter(), true);
        assert_eq!((ad.incoming, ad.drained), (1, true));
        assert!(ad.free_bytes <= 1 << 20, "the total limit bounds the room: {ad:?}");
    }
}
