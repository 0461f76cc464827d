//! The source's link to one other agent of a migration (a destination, or
//! an old destination turned forwarder): the session's control connection,
//! split into a writer task and a reader task so that requests, replies and
//! asynchronous `Forwarded` reports can interleave, plus the source's own
//! data sender to that host.

use crate::control::{self, Channel, Heartbeat, Inbox, PeerError};
use crate::dirty::SendObserver;
use crate::ledger::HostId;
use crate::memory::GuestRam;
use crate::protocol::{
    DataPlane, Features, Ids, Message, MessageKind, ProtocolError, RdmaRegion, Refusal, Token, TransportKind,
};
use crate::tls::SharedTls;
use crate::transport::rdma::{LocalRam, Rdma};
use crate::transport::secure::ClientTls;
use crate::transport::{Batch, Completion, OpenError, PageSender, Recoveries, SenderSpec, StreamSpec};
use crate::vm::VmRecord;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use thiserror::Error;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// How long a peer may take to answer a control request.
pub(crate) const CONTROL_TIMEOUT: Duration = Duration::from_secs(120);
/// Longest reason a peer's `Leave` may put in a report.
const MAX_REASON: usize = 256;
/// How long an aborted peer may take to confirm it discarded its session.
const ABORT_TIMEOUT: Duration = Duration::from_secs(10);

/// A control request to a peer failed.
#[derive(Debug, Error)]
pub enum LinkError {
    /// The control connection could not be made.
    #[error("connecting")]
    Connect(#[source] PeerError),
    /// The peer refused the session.
    #[error(transparent)]
    Refused(Refusal),
    /// No data plane could be opened.
    #[error("data plane")]
    DataPlane(#[source] OpenError),
    /// The control connection ended.
    #[error("control connection closed")]
    Closed,
    /// The control connection ended, for this reason.
    #[error("{0}")]
    Lost(String),
    /// Reading or writing it failed.
    #[error("control connection")]
    Protocol(#[source] ProtocolError),
    /// No reply in time (a peer without request ids: the link is given up,
    /// as a late reply would answer the next request).
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The peer answered with an error.
    #[error(transparent)]
    Peer(Refusal),
    /// The peer's protocol cannot carry this VM (a description to a
    /// protocol-3 agent).
    #[error("{host} speaks protocol {version}, which cannot take a QEMU VM described by type: upgrade it")]
    TooOld {
        /// The peer.
        host: String,
        /// Its version.
        version: u32,
    },
    /// The VM has RAM on huge pages, which the peer cannot be told of.
    #[error("{host} speaks protocol {version}, which cannot be told that RAM is on huge pages: upgrade it")]
    NoPageSizes {
        /// The peer.
        host: String,
        /// Its version.
        version: u32,
    },
    /// A reply of the wrong kind.
    #[error("{request}: unexpected reply {got}")]
    Unexpected {
        /// What was asked.
        request: &'static str,
        /// What came back.
        got: &'static str,
    },
}

/// How to open a link (owned: it is opened on a task of its own).
pub(crate) struct LinkSpec {
    /// This agent's TLS identity.
    pub tls: SharedTls,
    /// Encrypt the TCP data streams.
    pub data_encryption: bool,
    /// This host's name.
    pub me: String,
    /// The peer.
    pub host: String,
    /// The peer's host id in the migration.
    pub id: HostId,
    /// Its control address.
    pub addr: SocketAddr,
    /// The VM.
    pub vm: VmRecord,
    /// The layout's chunk size.
    pub chunk_size: u64,
    /// Data streams.
    pub streams: usize,
    /// The source's RAM.
    pub ram: Arc<GuestRam>,
    /// Sees every page the source reads.
    pub observer: Option<Arc<dyn SendObserver>>,
    /// Where completions go.
    pub completions: mpsc::UnboundedSender<Completion>,
    /// Which data plane may be used.
    pub transport: TransportKind,
    /// This host's RDMA device, or why there is none.
    pub rdma: Result<Arc<Rdma>, String>,
    /// A peer silent this long (heartbeats, acknowledgements) is lost.
    pub peer_timeout: Duration,
    /// Bytes of the VM's RAM that are holes (told to the destination).
    pub holes: u64,
    /// The migration's id (told to the destination).
    pub migration: crate::protocol::MigrationId,
}

/// The source's connection to one peer.
pub(crate) struct Link {
    /// The peer's name.
    pub host: String,
    /// Its host id in the migration.
    pub id: HostId,
    /// The session's data endpoint on this host.
    pub data_addr: SocketAddr,
    /// The session's token.
    pub token: Token,
    /// What the negotiated protocol version lets both ends do.
    pub features: Features,
    /// The migration's id, in the messages that act on the session.
    pub migration: crate::protocol::MigrationId,
    out: crate::control::Outbox,
    /// Replies of a peer without request ids, in order (one request at a time).
    replies: tokio::sync::Mutex<mpsc::UnboundedReceiver<control::Reply>>,
    /// Requests waiting for their reply, by id (protocol 6).
    pending: Arc<control::Requests>,
    /// Batches this host forwards, until it reports them; `None` once the
    /// connection is gone (so no batch can be added after the last report).
    forwarding: Arc<Mutex<Option<HashMap<u64, Batch>>>>,
    forwarded_bytes: Arc<AtomicU64>,
    forwarded_zero: Arc<AtomicU64>,
    zero_before_close: AtomicU64,
    /// Set when the control connection is gone.
    pub closed: CancellationToken,
    /// Why it is gone.
    why: Arc<Mutex<Option<String>>>,
    /// Set when the host asked the source to move its session elsewhere
    /// (`Leave`: it is drained, or out of room), with its reason.
    pub leave: CancellationToken,
    leave_why: Arc<Mutex<Option<String>>>,
    /// The source's own data sender to this host (None once released).
    sender: Mutex<Option<Box<dyn PageSender>>>,
    /// The source's data plane to this host.
    pub transport: DataPlane,
    /// This host's RAM registered for RDMA writes, if it offered RDMA.
    pub rdma_offer: Option<Vec<RdmaRegion>>,
    /// The queue-pair endpoint version this host reads.
    pub rdma_endpoint: u8,
    /// The source's RDMA path to this host, if its data plane is RDMA.
    pub rdma_path: Option<crate::protocol::RdmaPath>,
    /// Why the source's data plane to this host is not RDMA, if allowed.
    pub why_not_rdma: Option<String>,
    sent_before_close: AtomicU64,
    recoveries_before_close: Mutex<Recoveries>,
}

/// Pinning this host's RAM for RDMA takes time that grows with its size:
/// started while the destination prepares its own RAM, when the destination
/// will offer RDMA (`--transport rdma`, or it did the last time; a sender's
/// registration allocates the holes of its RAM file, which is wasted where
/// the data plane turns out to be TCP).
fn register_early(a: &LinkSpec) -> Option<tokio::task::JoinHandle<Result<Arc<LocalRam>, String>>> {
    let r = a.rdma.as_ref().ok()?;
    let expected = match a.transport {
        TransportKind::Tcp => false,
        TransportKind::Rdma => true,
        TransportKind::Auto => r.offered_last_time(&a.host),
    };
    let (r, ram) = (r.clone(), a.ram.clone());
    expected.then(|| tokio::task::spawn_blocking(move || r.register_sender(&ram)))
}

/// The source's data streams to the session at `addr`.
fn source_streams(a: &LinkSpec, (addr, token): (SocketAddr, Token), f: Features) -> StreamSpec {
    StreamSpec {
        addr,
        token,
        sender: 0,
        streams: a.streams,
        ram: a.ram.clone(),
        observer: a.observer.clone(),
        completions: a.completions.clone(),
        stall_timeout: a.peer_timeout,
        tls: a.data_encryption.then(|| ClientTls { config: a.tls.current().client.clone(), host: a.host.clone() }),
        zero_frames: f.zero_frames(),
    }
}

/// Asks the destination for a session: its data port, token and RDMA offer.
async fn open_session(
    ch: &mut Channel,
    a: &LinkSpec,
    f: Features,
) -> Result<(u16, Token, (Option<Vec<RdmaRegion>>, u8)), LinkError> {
    let version = f.version();
    let launch =
        a.vm.launch_for(f.descriptions()).ok_or_else(|| LinkError::TooOld { host: a.host.clone(), version })?;
    let page_sizes: Vec<u64> = (0..a.ram.layout().regions().len() as u32)
        .map(|r| a.ram.page_size(r).unwrap_or(crate::memory::PAGE_SIZE as u64))
        .collect();
    let huge = page_sizes.iter().any(|&p| p > crate::memory::PAGE_SIZE as u64);
    if huge && !f.page_sizes() {
        return Err(LinkError::NoPageSizes { host: a.host.clone(), version });
    }
    let open = Message::OpenSession {
        vm: a.vm.name.clone(),
        regions: a.vm.regions(),
        chunk_size: a.chunk_size,
        launch,
        rdma_slices: true,
        holes: a.holes,
        migration: Some(a.migration),
        page_sizes: if huge { page_sizes } else { vec![] },
        transport: Some(a.transport),
    };
    ch.out.send(open).map_err(|_| LinkError::Closed)?;
    // Preparing RAM (and pinning it for RDMA) takes time that grows with
    // its size; heartbeats prove the host alive meanwhile.
    let ram_gib = a.ram.layout().total_bytes() >> 30;
    let open_timeout = CONTROL_TIMEOUT + Duration::from_secs(2 * ram_gib);
    match next_reply(&mut ch.inbox, open_timeout).await? {
        Message::SessionOpened { data_port, token, rdma, rdma_endpoint } => {
            Ok((data_port, token, (rdma, rdma_endpoint)))
        }
        Message::Error { message, code } => Err(LinkError::Refused(Refusal { message, code })),
        other => Err(LinkError::Unexpected { request: "open_session", got: other.name() }),
    }
}

impl Link {
    /// Connects, opens a session for the VM and the source's data streams.
    pub(crate) async fn open(a: LinkSpec) -> Result<Arc<Link>, LinkError> {
        let conn = control::connect(&a.tls.current(), &a.me, &a.host, a.addr).await.map_err(LinkError::Connect)?;
        let features = conn.features();
        let heartbeat = features.heartbeats().then(|| Heartbeat::pinging(a.peer_timeout));
        let mut ch = Channel::new(conn.stream, heartbeat);
        let registering = register_early(&a);
        let (port, token, (rdma_offer, rdma_endpoint)) = open_session(&mut ch, &a, features).await?;
        let data_addr = SocketAddr::new(a.addr.ip(), port);
        // A TCP-only session is offered no RDMA: that says nothing of the host.
        if let (Ok(r), false) = (&a.rdma, a.transport == TransportKind::Tcp) {
            r.note_offer(&a.host, rdma_offer.is_some());
        }
        // Held until the data plane is open, which then finds it
        // registered; if it failed, RDMA is out, for that reason.
        let (_registered, rdma) = match registering {
            Some(r) if rdma_offer.is_some() => match r.await {
                Ok(Ok(l)) => (Some(l), a.rdma.clone()),
                Ok(Err(e)) => (None, Err(format!("registering local RAM: {e}"))),
                Err(e) => (None, Err(format!("registering local RAM: {e}"))),
            },
            _ => (None, a.rdma.clone()),
        };
        let spec = SenderSpec {
            host: &a.host,
            transport: a.transport,
            rdma: &rdma,
            offer: rdma_offer.as_deref(),
            rdma_endpoint,
            streams: source_streams(&a, (data_addr, token), features),
        };
        let sender = match crate::transport::open_sender(spec).await {
            Ok(s) => s,
            Err(e) => {
                // Wait for the answer: the host has cleaned up once it replies,
                // so a retry right away finds no leftover session.
                let _ = ch.out.send(Message::Abort { reason: crate::error_chain(&e), migration: Some(a.migration) });
                let _ = next_reply(&mut ch.inbox, ABORT_TIMEOUT).await;
                ch.closed.cancel();
                return Err(LinkError::DataPlane(e));
            }
        };
        let (replies_tx, replies) = mpsc::unbounded_channel();
        let link = Arc::new(Link {
            host: a.host,
            id: a.id,
            data_addr,
            token,
            features,
            migration: a.migration,
            out: ch.out,
            replies: tokio::sync::Mutex::new(replies),
            pending: Arc::default(),
            forwarding: Arc::new(Mutex::new(Some(HashMap::new()))),
            forwarded_bytes: Arc::new(AtomicU64::new(0)),
            forwarded_zero: Arc::new(AtomicU64::new(0)),
            zero_before_close: AtomicU64::new(0),
            closed: ch.closed,
            why: Arc::new(Mutex::new(None)),
            leave: CancellationToken::new(),
            leave_why: Arc::new(Mutex::new(None)),
            transport: sender.kind(),
            rdma_path: sender.rdma_path(),
            why_not_rdma: sender.why_not_rdma(),
            sender: Mutex::new(Some(sender)),
            rdma_offer,
            rdma_endpoint,
            sent_before_close: AtomicU64::new(0),
            recoveries_before_close: Mutex::default(),
        });
        link.spawn_dispatch(ch.inbox, replies_tx, a.completions);
        Ok(link)
    }

    /// Sorts what the peer sends: `Forwarded` reports complete batches,
    /// `Leave` asks the source to go, the rest are replies (to the request
    /// they name, or in order from a peer without request ids). When the
    /// connection ends, every forwarded batch still out fails, and every
    /// request still waiting gets no reply.
    fn spawn_dispatch(
        &self,
        mut inbox: Inbox,
        replies: mpsc::UnboundedSender<control::Reply>,
        completions: mpsc::UnboundedSender<Completion>,
    ) {
        let (closed, forwarding, bytes) = (self.closed.clone(), self.forwarding.clone(), self.forwarded_bytes.clone());
        let zero = self.forwarded_zero.clone();
        let why_slot = self.why.clone();
        let (leave, leave_why) = (self.leave.clone(), self.leave_why.clone());
        let (pending, ids, host) = (self.pending.clone(), self.features.request_ids(), self.host.clone());
        tokio::spawn(async move {
            let why = loop {
                let m = tokio::select! {
                    // What arrived before the connection closed is read first.
                    biased;
                    m = inbox.recv_tagged() => m,
                    _ = closed.cancelled() => break "control connection closed".to_string(),
                };
                let m = match m {
                    Some(Ok(r)) if ids && r.ids.re.is_some() => {
                        let reply = match r.msg {
                            Message::Error { message, code } => Err(Refusal { message, code }),
                            m => Ok(m),
                        };
                        // One whose request was given up answers nothing else.
                        if !pending.answer(r.ids.re.unwrap_or_default(), reply) {
                            tracing::debug!("a reply to no waiting request, dropped");
                        }
                        continue;
                    }
                    Some(Ok(r)) => Some(Ok(r.msg)),
                    Some(Err(e)) => Some(Err(e)),
                    None => None,
                };
                match m {
                    Some(Ok(Message::Forwarded { batch, applied, error, bytes: b, zero_pages })) => {
                        bytes.fetch_max(b, Ordering::Relaxed);
                        zero.fetch_max(zero_pages, Ordering::Relaxed);
                        let Some(batch) = forwarding.lock().unwrap().as_mut().and_then(|m| m.remove(&batch)) else {
                            continue;
                        };
                        let c = match applied {
                            true => Completion::Applied(batch),
                            false => Completion::Failed(batch, error.unwrap_or_else(|| "forward failed".into())),
                        };
                        let _ = completions.send(c);
                    }
                    Some(Ok(Message::Leave { mut reason })) => {
                        // From the network, into logs and reports: bounded.
                        let mut n = MAX_REASON.min(reason.len());
                        while !reason.is_char_boundary(n) {
                            n -= 1;
                        }
                        reason.truncate(n);
                        leave_why.lock().unwrap().get_or_insert(reason);
                        leave.cancel();
                    }
                    // With request ids, an answer that names no request
                    // answers nothing (nobody reads replies in order then).
                    Some(Ok(m)) if ids => tracing::debug!(host = %host, "{} naming no request, dropped", m.name()),
                    Some(Ok(Message::Error { message, code })) => {
                        let _ = replies.send(Err(Refusal { message, code }));
                    }
                    Some(Ok(m)) => {
                        let _ = replies.send(Ok(m));
                    }
                    Some(Err(e)) => break crate::error_chain(&e),
                    None => break "control connection closed".to_string(),
                }
            };
            why_slot.lock().unwrap().get_or_insert(why.clone());
            closed.cancel();
            pending.clear();
            let left = forwarding.lock().unwrap().take().unwrap_or_default();
            for (_, b) in left {
                let _ = completions.send(Completion::Failed(b, why.clone()));
            }
        });
    }

    /// Why the host asked the source to leave (once it has).
    pub(crate) fn leave_reason(&self) -> String {
        self.leave_why.lock().unwrap().clone().unwrap_or_else(|| "asked to leave".into())
    }

    /// Why the control connection ended (once it has).
    pub(crate) fn lost_why(&self) -> LinkError {
        match self.why.lock().unwrap().clone() {
            Some(w) => LinkError::Lost(w),
            None => LinkError::Closed,
        }
    }

    /// Sends a request and waits for its reply (an `Error` reply is an error).
    pub(crate) async fn request(&self, m: Message) -> Result<Message, LinkError> {
        self.request_within(m, CONTROL_TIMEOUT).await
    }

    /// [`request`](Self::request) for work that takes longer than an ordinary
    /// call (checksums of a large RAM): the reply may take `timeout`.
    pub(crate) async fn request_within(&self, m: Message, timeout: Duration) -> Result<Message, LinkError> {
        if self.features.request_ids() {
            return self.request_by_id(m, timeout).await;
        }
        let mut replies = self.replies.lock().await;
        self.out.send(m).map_err(|_| LinkError::Closed)?;
        let reply = tokio::select! {
            biased;
            r = tokio::time::timeout(timeout, replies.recv()) => match r {
                Ok(r) => r,
                Err(_) => {
                    // A late reply would answer the next request: give up the link.
                    self.closed.cancel();
                    return Err(LinkError::Timeout(timeout));
                }
            },
            // A reply may have arrived just before the connection closed.
            _ = self.closed.cancelled() => replies.try_recv().ok(),
        };
        match reply {
            Some(Ok(m)) => Ok(m),
            Some(Err(message)) => Err(LinkError::Peer(message)),
            None => Err(LinkError::Closed),
        }
    }

    /// A request whose reply names it: requests may overlap, and one given
    /// up (timed out) leaves the link usable, its late reply dropped.
    async fn request_by_id(&self, m: Message, timeout: Duration) -> Result<Message, LinkError> {
        let mut waiting = self.pending.begin();
        if self.closed.is_cancelled() || self.out.send_tagged(m, Ids::request(waiting.id)).is_err() {
            return Err(LinkError::Closed);
        }
        // Not cut short when the connection closes: the dispatcher answers
        // what arrived before (a `Resumed` just before the peer hung up),
        // then drops every request still waiting, whose wait then ends.
        let reply = match tokio::time::timeout(timeout, &mut waiting.reply).await {
            Ok(r) => r.ok(),
            Err(_) => return Err(LinkError::Timeout(timeout)),
        };
        match reply {
            Some(Ok(m)) => Ok(m),
            Some(Err(message)) => Err(LinkError::Peer(message)),
            None => Err(LinkError::Closed),
        }
    }

    /// A request whose only acceptable reply is of kind `expected`.
    pub(crate) async fn call(&self, m: Message, expected: MessageKind) -> Result<Message, LinkError> {
        let request = m.name();
        let reply = self.request(m).await?;
        if reply.kind() != expected {
            return Err(LinkError::Unexpected { request, got: reply.name() });
        }
        Ok(reply)
    }

    /// Sends a message that has no reply of its own.
    pub(crate) fn send(&self, m: Message) -> Result<(), LinkError> {
        self.out.send(m).map_err(|_| LinkError::Closed)
    }

    /// Tells the host to discard its session, and waits (briefly) until it did.
    pub(crate) async fn abort(&self, reason: &str) {
        self.close_sender();
        let abort = Message::Abort { reason: reason.into(), migration: Some(self.migration) };
        let _ = tokio::time::timeout(ABORT_TIMEOUT, self.request(abort)).await;
        self.closed.cancel();
    }

    /// Queues a batch on the source's own data streams to this host.
    pub(crate) fn submit(&self, b: Batch) -> Result<(), Batch> {
        match self.sender.lock().unwrap().as_ref() {
            Some(s) => s.submit(b),
            None => Err(b),
        }
    }

    /// Asks this host to forward a batch from its RAM to `to` (see `ForwardTo`).
    pub(crate) fn forward(&self, b: Batch, to: &str) -> Result<(), Batch> {
        // Under the lock: the reader fails every batch in the map when the
        // connection ends, and none can be added after that.
        let mut map = self.forwarding.lock().unwrap();
        let Some(m) = map.as_mut() else { return Err(b) };
        let runs: Vec<(usize, usize)> = b.runs.iter().map(|r| (r.first_page, r.pages)).collect();
        let id = b.id;
        if self.out.send(Message::Forward { batch: id, to: to.to_owned(), runs }).is_err() {
            return Err(b);
        }
        m.insert(id, b);
        Ok(())
    }

    /// Payload bytes the source sent to this host.
    pub(crate) fn bytes_sent(&self) -> u64 {
        let live = self.sender.lock().unwrap().as_ref().map_or(0, |s| s.bytes_sent());
        live + self.sent_before_close.load(Ordering::Relaxed)
    }

    /// How the source's RDMA streams to this host recovered so far.
    pub(crate) fn recoveries(&self) -> Recoveries {
        let live = self.sender.lock().unwrap().as_ref().map(|s| s.recoveries()).unwrap_or_default();
        live + *self.recoveries_before_close.lock().unwrap()
    }

    /// Payload bytes this host reported having forwarded.
    pub(crate) fn forwarded_bytes(&self) -> u64 {
        self.forwarded_bytes.load(Ordering::Relaxed)
    }

    /// Pages sent as zero frames: by the source to this host, and by this
    /// host as a forwarder.
    pub(crate) fn zero_pages(&self) -> u64 {
        let live = self.sender.lock().unwrap().as_ref().map_or(0, |s| s.zero_pages_sent());
        live + self.zero_before_close.load(Ordering::Relaxed) + self.forwarded_zero.load(Ordering::Relaxed)
    }

    /// Stops the source's data streams to this host (in-flight batches fail).
    pub(crate) fn close_sender(&self) {
        if let Some(s) = self.sender.lock().unwrap().take() {
            self.sent_before_close.fetch_add(s.bytes_sent(), Ordering::Relaxed);
            self.zero_before_close.fetch_add(s.zero_pages_sent(), Ordering::Relaxed);
            let mut before = self.recoveries_before_close.lock().unwrap();
            *before = *before + s.recoveries();
            s.close();
        }
    }
}

/// The next message on a fresh connection, within `timeout` (an `Error` too).
async fn next_reply(inbox: &mut Inbox, timeout: Duration) -> Result<Message, LinkError> {
    match tokio::time::timeout(timeout, inbox.recv_tagged()).await {
        Err(_) => Err(LinkError::Timeout(timeout)),
        Ok(None) => Err(LinkError::Closed),
        Ok(Some(Ok(r))) => Ok(r.msg),
        Ok(Some(Err(e))) => Err(LinkError::Protocol(e)),
    }
}
