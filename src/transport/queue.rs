//! The sending side's shared parts: the [`PageSender`] trait the engine
//! submits batches to, and [`SendQueue`], the one implementation both data
//! planes use (their stream tasks pull batches from its [`Feed`]).

use super::batch::{Batch, Completion};
use super::inflight::InFlight;
use super::TransportError;
use crate::dirty::SendObserver;
use crate::memory::GuestRam;
use crate::protocol::data::{Reply, REPLY_LEN};
use crate::protocol::{DataPlane, Token};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::mpsc::UnboundedSender;
use tokio_util::sync::CancellationToken;

/// Batches one stream of a sender may hold, queued or in flight: the bound
/// of the engine's window per stream (which also bounds bytes, so that
/// only small batches reach it).
pub const QUEUE_PER_STREAM: usize = 32;

/// One sender's connection to one destination.
pub trait PageSender: Send + Sync {
    /// Queues a batch; its [`Completion`] arrives on the channel the sender
    /// was created with. Returns the batch back if the sender is closed.
    fn submit(&self, batch: Batch) -> Result<(), Batch>;
    /// Bytes written so far (payload only).
    fn bytes_sent(&self) -> u64;
    /// Pages sent as zero frames so far (no payload).
    fn zero_pages_sent(&self) -> u64 {
        0
    }
    /// Stops sending; batches not yet started are reported as failed.
    fn close(&self);
    /// The data plane it uses.
    fn kind(&self) -> DataPlane;
    /// The RDMA path its queue pairs took, if it uses RDMA.
    fn rdma_path(&self) -> Option<crate::protocol::RdmaPath> {
        None
    }
    /// How its RDMA streams recovered from failed queue pairs, so far.
    fn recoveries(&self) -> Recoveries {
        Recoveries::default()
    }
    /// Why it does not use RDMA, when RDMA was allowed.
    fn why_not_rdma(&self) -> Option<String> {
        None
    }
}

/// How a sender's RDMA streams recovered from failed queue pairs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Recoveries {
    /// Queue pairs replaced by new ones.
    pub re_pairs: u64,
    /// Streams that went on over TCP, unable to re-pair.
    pub tcp_fallbacks: u64,
}

impl std::ops::Add for Recoveries {
    type Output = Recoveries;
    fn add(self, o: Recoveries) -> Recoveries {
        Recoveries { re_pairs: self.re_pairs + o.re_pairs, tcp_fallbacks: self.tcp_fallbacks + o.tcp_fallbacks }
    }
}

/// What a sender's streams need: where to, as whom, and from which RAM.
#[derive(Clone)]
pub struct StreamSpec {
    /// The destination's data endpoint.
    pub addr: SocketAddr,
    /// The destination session's token.
    pub token: Token,
    /// This sender's host id within the migration.
    pub sender: u8,
    /// Streams to open (at least one).
    pub streams: usize,
    /// The RAM pages are read from.
    pub ram: Arc<GuestRam>,
    /// Sees every page read (trackers that compare contents).
    pub observer: Option<Arc<dyn SendObserver>>,
    /// Where completions go.
    pub completions: UnboundedSender<Completion>,
    /// A batch in flight this long without its acknowledgement breaks the
    /// stream (the receiver froze, or the path went silent).
    pub stall_timeout: std::time::Duration,
    /// Encrypt the streams (TLS to the destination), or not.
    pub tls: Option<super::secure::ClientTls>,
    /// The receiver takes zero frames (its agent speaks protocol 5): pages
    /// found all zero while reading go as a flag, without their bytes.
    pub zero_frames: bool,
}

/// What a sender's streams share: the queue they pull batches from, where
/// completions go, the byte count and the token that stops them all.
#[derive(Clone)]
pub struct Feed {
    /// Batches waiting for a stream.
    pub backlog: async_channel::Receiver<Batch>,
    /// Where completions go.
    pub completions: UnboundedSender<Completion>,
    /// Payload bytes written by all streams.
    pub bytes: Arc<AtomicU64>,
    /// Stops every stream.
    pub cancel: CancellationToken,
    /// Streams re-paired after their queue pair failed (RDMA).
    pub re_pairs: Arc<AtomicU64>,
    /// RDMA streams that went on over TCP.
    pub tcp_fallbacks: Arc<AtomicU64>,
    /// Pages sent as zero frames (found all zero while reading).
    pub zero_pages: Arc<AtomicU64>,
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

    /// Ends a stream: whatever it had in flight fails with the reason.
    pub fn end_stream(&self, inflight: &InFlight, result: Result<(), TransportError>) {
        self.end_stream_with(inflight.drain(), result);
    }

    /// Ends a stream whose unfinished batches are `left`: they fail with the reason.
    pub fn end_stream_with(&self, left: Vec<Batch>, result: Result<(), TransportError>) {
        let why = match result {
            Ok(()) => "stream ended".to_owned(),
            Err(e) => crate::error_chain(&e),
        };
        if !self.cancel.is_cancelled() {
            tracing::warn!("data stream failed: {why}");
        }
        self.fail(left, &why);
    }

    /// Reads a stream's acknowledgements (TCP's, or RDMA's side channel),
    /// completing the batches they name, until the stream breaks or the
    /// receiver rejects a batch.
    pub async fn read_acks(&self, inflight: &InFlight, mut rd: impl AsyncRead + Unpin) -> Result<(), TransportError> {
        let mut reply = [0u8; REPLY_LEN];
        loop {
            rd.read_exact(&mut reply)
                .await
                .map_err(|source| TransportError::Io { what: "reading acknowledgements", source })?;
            match Reply::decode(&reply)? {
                Reply::Applied { batch } => {
                    let b = inflight.ack(batch)?;
                    let _ = self.completions.send(Completion::Applied(b));
                }
                Reply::Rejected { code } => return Err(TransportError::Rejected(code)),
            }
        }
    }

    /// Counts payload bytes written.
    pub fn sent(&self, bytes: u64) {
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
    }
}

/// The sending end of a [`Feed`], owned by the sender; dropping it closes.
pub struct SendQueue {
    queue: async_channel::Sender<Batch>,
    /// The streams' side.
    pub feed: Feed,
    kind: DataPlane,
    /// The RDMA path, for RDMA streams.
    pub rdma: Option<crate::protocol::RdmaPath>,
    /// Why TCP streams are not RDMA ones, when RDMA was allowed.
    pub why_not_rdma: Option<String>,
}

impl SendQueue {
    /// A queue of at most `capacity` batches for streams of `kind`.
    pub fn new(kind: DataPlane, capacity: usize, completions: UnboundedSender<Completion>) -> Self {
        let (queue, backlog) = async_channel::bounded(capacity);
        let feed = Feed {
            backlog,
            completions,
            bytes: Default::default(),
            cancel: Default::default(),
            re_pairs: Default::default(),
            tcp_fallbacks: Default::default(),
            zero_pages: Default::default(),
        };
        Self { queue, feed, kind, rdma: None, why_not_rdma: None }
    }
}

impl PageSender for SendQueue {
    /// The queue is bounded; callers keep their own window below it, so a
    /// full queue only happens when every stream died.
    fn submit(&self, batch: Batch) -> Result<(), Batch> {
        self.queue.try_send(batch).map_err(|e| e.into_inner())
    }

    fn bytes_sent(&self) -> u64 {
        self.feed.bytes.load(Ordering::Relaxed)
    }

    fn zero_pages_sent(&self) -> u64 {
        self.feed.zero_pages.load(Ordering::Relaxed)
    }

    /// Stops the streams; batches not yet started are reported as failed.
    fn close(&self) {
        self.feed.cancel.cancel();
        self.queue.close();
        while let Ok(b) = self.feed.backlog.try_recv() {
            let _ = self.feed.completions.send(Completion::Failed(b, "sender closed".into()));
        }
    }

    fn kind(&self) -> DataPlane {
        self.kind
    }
    fn rdma_path(&self) -> Option<crate::protocol::RdmaPath> {
        self.rdma.clone()
    }
    fn recoveries(&self) -> Recoveries {
        Recoveries {
            re_pairs: self.feed.re_pairs.load(Ordering::Relaxed),
            tcp_fallbacks: self.feed.tcp_fallbacks.load(Ordering::Relaxed),
        }
    }
    fn why_not_rdma(&self) -> Option<String> {
        self.why_not_rdma.clone()
    }
}

impl Drop for SendQueue {
    fn drop(&mut self) {
        self.close();
    }
}
