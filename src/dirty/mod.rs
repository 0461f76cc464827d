//! Dirty trackers: "which pages changed since the last sync", chosen per VM.
//!
//! Every tracker proves itself with a self-test before a migration relies on
//! it: a tracker that silently reports nothing (soft-dirty on a kernel
//! without it, say) would make a migration copy stale memory.

pub mod cooperative;
pub mod hash;
pub mod softdirty;

use crate::bitmap::Bitmap;
use crate::memory::GuestRam;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use thiserror::Error;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum TrackerKind {
    /// The guest marks a dirty bitmap in shared memory (like a hypervisor's dirty log).
    Cooperative,
    /// Per-page xxh3 of the content; works for any RAM, costs a scan per sync.
    Hash,
    /// The kernel's soft-dirty PTE bits of the process mapping the RAM (QEMU).
    SoftDirty,
}

impl TrackerKind {
    pub fn name(self) -> &'static str {
        match self {
            TrackerKind::Cooperative => "cooperative",
            TrackerKind::Hash => "hash",
            TrackerKind::SoftDirty => "soft-dirty",
        }
    }
}

#[derive(Debug, Error)]
pub enum DirtyError {
    #[error("dirty log {path}: {msg}")]
    Log { path: String, msg: String },
    #[error("{tracker} tracker failed its self-test: {msg}")]
    SelfTest { tracker: &'static str, msg: String },
    #[error("{0} tracking is not available for this VM")]
    Unavailable(&'static str),
}

pub trait DirtyTracker: Send + Sync {
    fn kind(&self) -> TrackerKind;

    /// Pages written since the previous sync (the first: since the tracker started).
    fn sync(&mut self, ram: &GuestRam) -> Result<Bitmap, DirtyError>;

    /// Trackers that compare contents want to see what senders read, so a
    /// page that changed between the sync and the read is reported again.
    fn observer(&self) -> Option<Arc<dyn SendObserver>> {
        None
    }
}

/// Told what a sender read from the source's RAM.
pub trait SendObserver: Send + Sync {
    fn observe(&self, page: usize, bytes: &[u8]);
}
