//! Dirty trackers: "which pages changed since the last sync", chosen per VM.
//!
//! Every tracker proves itself with a self-test before a migration relies on
//! it: a tracker that silently reports nothing (soft-dirty on a kernel
//! without it, say) would make a migration copy stale memory.

pub(crate) mod cooperative;
pub(crate) mod freeze;
pub mod hash;
pub mod softdirty;

use crate::bitmap::Bitmap;
use crate::memory::GuestRam;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use thiserror::Error;

/// The ways of finding a VM's dirty pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum TrackerKind {
    /// The guest marks a dirty bitmap in shared memory (like a hypervisor's dirty log).
    Cooperative,
    /// Per-page xxh3 of the content; works for any RAM, costs a scan per sync.
    Hash,
    /// The kernel's soft-dirty PTE bits of the process mapping the RAM (QEMU).
    SoftDirty,
    /// QEMU's own dirty log, exported by a QEMU built with qemu-patches/.
    Qemu,
}

impl TrackerKind {
    /// Its name in logs, reports and on the command line (`soft-dirty`).
    pub fn name(self) -> &'static str {
        match self {
            TrackerKind::Cooperative => "cooperative",
            TrackerKind::Hash => "hash",
            TrackerKind::SoftDirty => "soft-dirty",
            TrackerKind::Qemu => "qemu",
        }
    }
}

/// A dirty tracker could not start or sync.
#[derive(Debug, Error)]
pub enum DirtyError {
    /// The dirty log, or the /proc files soft-dirty reads, could not be used.
    #[error("dirty log {path}: {msg}")]
    Log {
        /// The file (`soft-dirty` for the tracked process's /proc files).
        path: String,
        /// What went wrong.
        msg: String,
    },
    /// The tracker did not report a page it was shown being written.
    #[error("{tracker} tracker failed its self-test: {msg}")]
    SelfTest {
        /// The tracker's name.
        tracker: &'static str,
        /// What the test saw.
        msg: String,
    },
    /// The VM cannot be tracked this way (e.g. cooperative for QEMU); holds
    /// the tracker's name.
    #[error("{0} tracking is not available for this VM")]
    Unavailable(&'static str),
}

/// Finds the pages of a VM's RAM written between syncs.
pub trait DirtyTracker: Send + Sync {
    /// Which kind of tracker this is.
    fn kind(&self) -> TrackerKind;

    /// Pages written since the previous sync (the first: since the tracker started).
    fn sync(&mut self, ram: &GuestRam) -> Result<Bitmap, DirtyError>;

    /// How long the last sync stopped the guest (trackers that freeze it).
    fn last_stop(&self) -> Option<std::time::Duration> {
        None
    }

    /// Trackers that compare contents want to see what senders read, so a
    /// page that changed between the sync and the read is reported again.
    fn observer(&self) -> Option<Arc<dyn SendObserver>> {
        None
    }
}

/// Told what a sender read from the source's RAM.
pub trait SendObserver: Send + Sync {
    /// `bytes` is the content of `page` (a page number in the RAM layout) as
    /// a sender read it to send it.
    fn observe(&self, page: usize, bytes: &[u8]);
}
