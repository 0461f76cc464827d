//! The forwarder role of an old destination: after a retarget the source
//! points it at the new destination (`ForwardTo`), then hands it batches of
//! page runs (`Forward`) to send from its own RAM there; each is reported
//! (`Forwarded`) once the new destination applied it.

use super::super::Agent;
use super::Session;
use crate::protocol::{DataPlane, Message, RdmaRegion, Token, TransportKind};
use crate::transport::{Batch, Completion, OpenError, Run, SenderSpec, StreamSpec};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use thiserror::Error;
use tokio::sync::mpsc;

/// Where a forwarder sends: the new destination's data endpoint.
pub(super) struct Target {
    pub host: String,
    pub addr: SocketAddr,
    pub token: Token,
    pub sender: u8,
    pub streams: usize,
    pub rdma: Option<Vec<RdmaRegion>>,
    pub rdma_endpoint: u8,
    pub transport: TransportKind,
    pub zero_frames: bool,
}

impl Target {
    /// The target a `ForwardTo` names (None for any other message).
    pub(super) fn of(m: &Message) -> Option<Self> {
        match m {
            Message::ForwardTo {
                host,
                data_addr,
                token,
                streams,
                sender,
                rdma,
                rdma_endpoint,
                transport,
                zero_frames,
                ..
            } => Some(Target {
                host: host.clone(),
                addr: *data_addr,
                token: *token,
                sender: *sender,
                streams: *streams,
                rdma: rdma.clone(),
                rdma_endpoint: *rdma_endpoint,
                transport: *transport,
                zero_frames: *zero_frames,
            }),
            _ => None,
        }
    }
}

/// The answer to a `Forward` refused before anything was sent.
pub(super) fn refused(batch: u64, e: &ForwardError) -> Message {
    Message::Forwarded { batch, applied: false, error: Some(crate::error_chain(e)), bytes: 0, zero_pages: 0 }
}

/// Why a forward was refused.
#[derive(Debug, Error)]
pub(super) enum ForwardError {
    /// No data plane to the new destination.
    #[error("forwarding to {host}")]
    Open {
        /// The new destination.
        host: String,
        /// Why.
        #[source]
        source: OpenError,
    },
    /// The source named a host this one does not forward to.
    #[error("{0} is not a peer of this host (--peer): not forwarding there")]
    NotAPeer(String),
    /// `Forward` before `ForwardTo`.
    #[error("not forwarding")]
    NotForwarding,
    /// `Forward` for another destination than the one set up.
    #[error("forwarding to {current}, not {asked}")]
    OtherTarget {
        /// Where this host forwards.
        current: String,
        /// Where the source thinks it does.
        asked: String,
    },
    /// A run outside the RAM, or crossing a region or chunk.
    #[error("bad page run: {0}")]
    Run(&'static str),
    /// The streams to the new destination are gone.
    #[error("forward streams closed")]
    Closed,
}

/// Opens (or re-points) this host's data streams to a new destination;
/// returns the data plane used and its RDMA path (RDMA writes straight from this host's
/// registered RAM into the new destination's).
pub(super) async fn forward_to(
    agent: &Agent,
    sess: &mut Session,
    t: Target,
    completions: mpsc::UnboundedSender<Completion>,
) -> Result<(DataPlane, Option<crate::protocol::RdmaPath>), ForwardError> {
    // Guest RAM goes only to this host's own peers, at the address this host
    // knows them by: the source chooses the port, never where to.
    let peer_ip = agent.cfg.peers.get(&t.host).ok_or_else(|| ForwardError::NotAPeer(t.host.clone()))?.ip();
    let addr = SocketAddr::new(peer_ip, t.addr.port());
    if let Some((_, old)) = sess.stage.forwarding() {
        old.close();
    }
    // Not forwarding until the new streams are open.
    sess.stage = super::Stage::Receiving;
    let spec = SenderSpec {
        host: &t.host,
        transport: t.transport,
        rdma: &agent.rdma,
        offer: t.rdma.as_deref(),
        rdma_endpoint: t.rdma_endpoint,
        streams: StreamSpec {
            addr,
            token: t.token,
            sender: t.sender,
            streams: t.streams.clamp(1, 64),
            ram: sess.ram.clone(),
            observer: None,
            completions,
            stall_timeout: agent.cfg.peer_timeout,
            tls: agent.cfg.data_encryption.then(|| crate::transport::secure::ClientTls {
                config: agent.cfg.tls.current().client.clone(),
                host: t.host.clone(),
            }),
            zero_frames: t.zero_frames,
        },
    };
    let s = crate::transport::open_sender(spec)
        .await
        .map_err(|source| ForwardError::Open { host: t.host.clone(), source })?;
    let (kind, path) = (s.kind(), s.rdma_path());
    sess.stage = super::Stage::Forwarding { to: t.host, sender: Arc::from(s) };
    Ok((kind, path))
}

impl ForwardError {
    /// Its kind, as the source is told it.
    pub(super) fn code(&self) -> crate::protocol::ErrorCode {
        use crate::protocol::ErrorCode as C;
        match self {
            ForwardError::NotAPeer(_) => C::NotAllowed,
            ForwardError::NotForwarding | ForwardError::OtherTarget { .. } => C::OutOfOrder,
            ForwardError::Run(_) => C::Invalid,
            _ => C::Failed,
        }
    }
}

/// Checks page runs that came from the network: each must lie inside one
/// chunk (so inside one region, and a data plane's lengths cannot overflow).
fn check_runs(sess: &Session, runs: Vec<(usize, usize)>) -> Result<Vec<Run>, ForwardError> {
    let layout = sess.ram.layout();
    runs.into_iter()
        .map(|(first, pages)| {
            let last = first
                .checked_add(pages)
                .filter(|&e| pages > 0 && e <= layout.total_pages())
                .ok_or(ForwardError::Run("out of range"))?;
            if layout.locate(first).0 != layout.locate(last - 1).0 {
                return Err(ForwardError::Run("crosses a region boundary"));
            }
            if layout.chunk_of(first) != layout.chunk_of(last - 1) {
                return Err(ForwardError::Run("crosses a chunk boundary"));
            }
            Ok(Run { first_page: first, pages })
        })
        .collect()
}

/// Queues page runs from this host's RAM to the forward destination.
pub(super) fn forward(
    sess: &Session,
    batch: u64,
    to: &str,
    runs: Vec<(usize, usize)>,
    completions: mpsc::UnboundedSender<Completion>,
) -> Result<(), ForwardError> {
    let (host, sender) = sess.stage.forwarding().ok_or(ForwardError::NotForwarding)?;
    if host != to {
        return Err(ForwardError::OtherTarget { current: host.into(), asked: to.into() });
    }
    let sender = sender.clone();
    let b = Batch { id: batch, chunk: 0, from: 0, to: 0, runs: check_runs(sess, runs)?, epochs: vec![] };
    // Test hook: a slow forwarder (its pages land late), to exercise ordering.
    match crate::hooks::forward_delay_ms() {
        Some(ms) => {
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                if let Err(b) = sender.submit(b) {
                    let _ = completions.send(Completion::Failed(b, "forward streams closed".into()));
                }
            });
            Ok(())
        }
        None => sender.submit(b).map_err(|_| ForwardError::Closed),
    }
}
