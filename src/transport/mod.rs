//! The data plane: moves page runs from a sender's RAM into a destination's
//! RAM and reports when the destination has *applied* them (not merely when
//! they left the sender).
//!
//! One neutral session layer serves both data planes: [`handshake`] (dial,
//! hello, status), [`secure`] (TLS on data streams), [`session`] (a destination's sessions by token, fences),
//! [`queue`] (the [`PageSender`] the engine submits to) and [`inflight`]
//! (the in-order acknowledgement tracker of one stream). The data planes
//! themselves: [`tcp`] and [`rdma`] (the `rdma/` crate, with the `rdma`
//! feature); [`open`] picks one.

pub(crate) mod batch;
pub mod handshake;
pub(crate) mod inflight;
pub(crate) mod open;
pub(crate) mod queue;
pub mod rdma;
pub(crate) mod seal;
pub mod secure;
pub(crate) mod session;
pub mod tcp;

pub use batch::{Batch, Completion, Run};
pub use open::{open_sender, OpenError, SenderSpec};
pub use queue::{PageSender, Recoveries, SendQueue, StreamSpec, QUEUE_PER_STREAM};
pub use session::{Receiver, Receiving};

use crate::memory::MemoryError;
use crate::protocol::data::{FrameError, HelloStatus, RejectCode};
use std::net::SocketAddr;
use thiserror::Error;
use tokio_util::sync::CancellationToken;

/// How long connecting, the TLS handshake and each hello step may take.
pub const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// A data stream failed or was refused.
#[derive(Debug, Error)]
pub enum TransportError {
    /// Connecting failed.
    #[error("connecting to {addr}")]
    Connect {
        /// Where to.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A step of the stream had no answer in time.
    #[error("no answer in time: {what}")]
    Timeout {
        /// Which step.
        what: &'static str,
    },
    /// Reading or writing the stream failed.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// The receiver refused the hello.
    #[error("data stream refused: {0:?}")]
    Refused(HelloStatus),
    /// A TLS sender whose certificate names no host this one accepts.
    #[error("data stream from {0:?}, not a peer of this host")]
    NotAPeer(Vec<String>),
    /// The receiver answered the hello with an unknown status.
    #[error("data stream refused with unknown status {0}")]
    Status(u8),
    /// A hello with another wire version.
    #[error("data protocol version {0} is not spoken here")]
    Version(u16),
    /// A hello with an unknown stream mode.
    #[error("unknown data stream mode {0}")]
    Mode(u8),
    /// A header or reply that does not decode.
    #[error("bad frame")]
    Frame(#[from] FrameError),
    /// A sealed record ended inside a frame.
    #[error("a frame cut by the end of its record")]
    FrameCut,
    /// The receiver rejected a frame.
    #[error("the receiver rejected a frame: {0:?}")]
    Rejected(RejectCode),
    /// An acknowledgement for a batch that is not the oldest in flight.
    #[error("unexpected acknowledgement of batch {0}")]
    UnexpectedAck(u64),
    /// Guest RAM refused the access (out of bounds, or the file failed).
    #[error("guest RAM")]
    Memory(#[from] MemoryError),
    /// The sender was closed.
    #[error("sender closed")]
    Closed,
    /// A fenced sender's streams did not stop in time.
    #[error("streams of sender {0} did not stop")]
    FenceTimeout(u8),
    /// The forwarders' streams did not stop when the session was sealed.
    #[error("the forwarders' streams did not stop when the session was sealed")]
    SealTimeout,
    /// The destination's registered RAM does not match the layout.
    #[error("the destination's registered RAM does not match the layout")]
    RdmaLayout,
    /// A page run outside the registered RAM (never posted).
    #[error("run at page {page} is outside region {region}")]
    RunOutside {
        /// First page of the run.
        page: usize,
        /// Its region.
        region: u32,
    },
    /// A verbs call failed (the rdma crate's error, with its causes).
    #[error("RDMA: {0}")]
    Rdma(String),
    /// A stream's queue pair failed (a write completed in error, a post was
    /// refused, or the destination's queue pair failed): the stream may
    /// re-pair.
    #[error("RDMA queue pair failed: {0}")]
    QueuePair(String),
    /// The probe write of a newly paired queue pair did not come back
    /// acknowledged: RDMA traffic does not get through.
    #[error("the probe write at pairing failed")]
    Probe(#[source] Box<TransportError>),
}

/// What ends a receiving stream: its session ends, or its sender is fenced.
pub struct Stop {
    /// The session's token.
    pub session: CancellationToken,
    /// The sender's fence.
    pub sender: CancellationToken,
}

impl Stop {
    /// Resolves once either says stop.
    pub async fn wait(&self) {
        tokio::select! {
            _ = self.session.cancelled() => {}
            _ = self.sender.cancelled() => {}
        }
    }
}
