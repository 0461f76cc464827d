//! The data plane: moves page runs from a sender's RAM into a destination's
//! RAM and reports when the destination has *applied* them (not merely when
//! they left the sender). One trait, [`PageSender`]; implementations: TCP
//! ([`tcp`]) and RDMA ([`rdma`], on the `rdma/` crate, with the `rdma` feature).

pub mod rdma;
pub mod tcp;

use crate::ledger::HostId;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use thiserror::Error;

/// Which data plane a migration may use.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum TransportKind {
    /// RDMA where both ends can (logged why not otherwise), else TCP.
    #[default]
    Auto,
    Tcp,
    /// RDMA or fail with the reason.
    Rdma,
}

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

/// What a sender's streams share: the queue they pull batches from, where
/// completions go, the byte count and the token that stops them all.
#[derive(Clone)]
pub struct Feed {
    pub backlog: async_channel::Receiver<Batch>,
    pub completions: tokio::sync::mpsc::UnboundedSender<Completion>,
    pub bytes: Arc<std::sync::atomic::AtomicU64>,
    pub cancel: tokio_util::sync::CancellationToken,
}

impl Feed {
    /// A stream died, which breaks the sender: stop the other streams and
    /// fail what this one had in flight and everything queued, so no batch
    /// waits for a stream that is gone.
    pub fn fail(&self, inflight: impl IntoIterator<Item = Batch>, why: &str) {
        self.cancel.cancel();
        self.backlog.close();
        let queued: Vec<Batch> = std::iter::from_fn(|| self.backlog.try_recv().ok()).collect();
        for b in inflight.into_iter().chain(queued) {
            let _ = self.completions.send(Completion::Failed(b, why.to_owned()));
        }
    }
}

/// The sending end of a [`Feed`], owned by the sender; dropping it closes.
/// Both data planes' senders are one of these, fed by their streams' tasks.
pub struct SendQueue {
    queue: async_channel::Sender<Batch>,
    pub feed: Feed,
    kind: &'static str,
}

impl SendQueue {
    pub fn new(
        kind: &'static str,
        capacity: usize,
        completions: tokio::sync::mpsc::UnboundedSender<Completion>,
    ) -> Self {
        let (queue, backlog) = async_channel::bounded(capacity);
        let feed = Feed { backlog, completions, bytes: Default::default(), cancel: Default::default() };
        Self { queue, feed, kind }
    }
}

impl PageSender for SendQueue {
    /// The queue is bounded; callers keep their own window below it, so a
    /// full queue only happens when every stream died.
    fn submit(&self, batch: Batch) -> Result<(), Batch> {
        self.queue.try_send(batch).map_err(|e| e.into_inner())
    }

    fn bytes_sent(&self) -> u64 {
        self.feed.bytes.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Stops the streams; batches not yet started are reported as failed.
    fn close(&self) {
        self.feed.cancel.cancel();
        self.queue.close();
        while let Ok(b) = self.feed.backlog.try_recv() {
            let _ = self.feed.completions.send(Completion::Failed(b, "sender closed".into()));
        }
    }

    fn kind(&self) -> &'static str {
        self.kind
    }
}

impl Drop for SendQueue {
    fn drop(&mut self) {
        self.close();
    }
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

/// Opens the data plane to a destination: RDMA where both ends can and the
/// options allow (saying why not otherwise), else TCP.
#[allow(clippy::too_many_arguments)]
pub async fn open_sender(
    host: &str,
    transport: TransportKind,
    rdma: &Result<Arc<rdma::Rdma>, String>,
    offer: Option<&[rdma::RdmaRegion]>,
    addr: std::net::SocketAddr,
    token: crate::protocol::data::Token,
    sender: u8,
    streams: usize,
    ram: Arc<crate::memory::GuestRam>,
    observer: Option<Arc<dyn crate::dirty::SendObserver>>,
    completions: tokio::sync::mpsc::UnboundedSender<Completion>,
) -> Result<Box<dyn PageSender>, String> {
    if transport != TransportKind::Tcp {
        let why_not = match (rdma, offer) {
            (Err(e), _) => format!("not on this host: {e}"),
            (Ok(_), None) => format!("{host} offers no RDMA"),
            (Ok(r), Some(offer)) => {
                let c = rdma::connect(
                    r,
                    addr,
                    token,
                    sender,
                    streams,
                    ram.clone(),
                    offer,
                    observer.clone(),
                    completions.clone(),
                );
                match c.await {
                    Ok(s) => {
                        tracing::info!(to = host, device = %r.name(), "data plane: RDMA");
                        return Ok(Box::new(s));
                    }
                    Err(e) => format!("connecting: {e}"),
                }
            }
        };
        if transport == TransportKind::Rdma {
            return Err(format!("--transport rdma: no RDMA to {host}: {why_not}"));
        }
        tracing::info!(to = host, "data plane: TCP (no RDMA: {why_not})");
    }
    let s = tcp::connect(addr, token, sender, streams, ram, observer, completions).await.map_err(|e| e.to_string())?;
    Ok(Box::new(s))
}
