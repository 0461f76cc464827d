//! The unit a data plane moves: a batch of page runs of one chunk, and what
//! became of it.

use crate::ledger::HostId;

/// A run of consecutive global pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Run {
    /// The first global page.
    pub first_page: usize,
    /// Pages in the run.
    pub pages: usize,
}

/// Pages of one chunk going from one host to another, with the ledger epochs
/// recorded before their bytes were read (one per page, in run order).
#[derive(Clone, Debug)]
pub struct Batch {
    /// Unique within the migration.
    pub id: u64,
    /// The chunk the runs lie in.
    pub chunk: usize,
    /// The sending host.
    pub from: HostId,
    /// The receiving host.
    pub to: HostId,
    /// The pages, in order.
    pub runs: Vec<Run>,
    /// The ledger's epoch of each page when the transfer began.
    pub epochs: Vec<crate::ledger::Epoch>,
}

impl Batch {
    /// Every page of the batch, in run order.
    pub fn pages(&self) -> impl Iterator<Item = usize> + '_ {
        self.runs.iter().flat_map(|r| r.first_page..r.first_page + r.pages)
    }

    /// How many pages the batch has.
    pub fn page_count(&self) -> usize {
        self.runs.iter().map(|r| r.pages).sum()
    }
}

/// What became of a submitted batch.
#[derive(Debug)]
pub enum Completion {
    /// The receiver confirmed the bytes are in its memory.
    Applied(Batch),
    /// The batch may or may not have landed (torn); it must be sent again.
    Failed(Batch, String),
}
