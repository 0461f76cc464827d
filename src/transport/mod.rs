//! The data plane: moves page runs from a sender's RAM into a destination's
//! RAM and reports when the destination has *applied* them (not merely when
//! they left the sender). One trait, [`PageSender`]; implementations: TCP
//! ([`tcp`]); RDMA lives in the `rdma/` crate.

pub mod tcp;

use crate::ledger::HostId;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum TransportError {
    #[error("connecting to {addr}: {source}")]
    Connect { addr: String, source: std::io::Error },
    #[error("data stream refused: {0}")]
    Refused(String),
    #[error("data stream: {0}")]
    Stream(String),
}

/// A run of consecutive global pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Run {
    pub first_page: usize,
    pub pages: usize,
}

/// Pages of one chunk going from one host to another, with the ledger epochs
/// recorded before their bytes were read (one per page, in run order).
#[derive(Clone, Debug)]
pub struct Batch {
    pub id: u64,
    pub chunk: usize,
    pub from: HostId,
    pub to: HostId,
    pub runs: Vec<Run>,
    pub epochs: Vec<u32>,
}

impl Batch {
    pub fn pages(&self) -> impl Iterator<Item = usize> + '_ {
        self.runs.iter().flat_map(|r| r.first_page..r.first_page + r.pages)
    }
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

/// One sender's connection to one destination.
pub trait PageSender: Send + Sync {
    /// Queues a batch; its [`Completion`] arrives on the channel the sender
    /// was created with. Returns the batch back if the sender is closed.
    fn submit(&self, batch: Batch) -> Result<(), Batch>;
    /// Bytes written so far (payload only).
    fn bytes_sent(&self) -> u64;
    /// Stops sending; batches not yet started are reported as failed.
    fn close(&self);
    fn kind(&self) -> &'static str;
}
