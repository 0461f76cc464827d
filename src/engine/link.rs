//! The source's link to one other agent of a migration (a destination, or
//! an old destination turned forwarder): the session's control connection,
//! split into a writer task and a reader task so that requests, replies and
//! asynchronous `Forwarded` reports can interleave, plus the source's own
//! data sender to that host.

use super::EngineError;
use crate::agent::peer::{self, ClientStream};
use crate::ledger::HostId;
use crate::memory::GuestRam;
use crate::protocol::data::Token;
use crate::protocol::{read_message, write_message, Message, ProtocolError};
use crate::tls::TlsConfig;
use crate::transport::rdma::{Rdma, RdmaRegion};
use crate::transport::{Batch, Completion, PageSender, Run, TransportKind};
use crate::vm::VmRecord;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

const CONTROL_TIMEOUT: Duration = Duration::from_secs(120);

pub struct Link {
    pub host: String,
    pub id: HostId,
    /// The session's data endpoint on this host.
    pub data_addr: SocketAddr,
    pub token: Token,
    out: mpsc::UnboundedSender<Message>,
    replies: tokio::sync::Mutex<mpsc::UnboundedReceiver<Message>>,
    /// Batches this host forwards, until it reports them; `None` once the
    /// connection is gone (so no batch can be added after the last report).
    forwarding: Arc<Mutex<Option<HashMap<u64, Batch>>>>,
    /// Bytes this host reported having forwarded.
    pub forwarded_bytes: Arc<AtomicU64>,
    /// Set when the control connection is gone.
    pub closed: CancellationToken,
    /// The source's own data sender to this host (None once released).
    sender: Mutex<Option<Box<dyn PageSender>>>,
    /// "rdma" or "tcp": the source's data plane to this host.
    pub transport: &'static str,
    /// This host's RAM registered for RDMA writes, if it offered RDMA.
    pub rdma_offer: Option<Vec<RdmaRegion>>,
    sent_before_close: AtomicU64,
}

pub struct OpenArgs<'a> {
    pub tls: &'a TlsConfig,
    pub me: &'a str,
    pub host: &'a str,
    pub id: HostId,
    pub addr: SocketAddr,
    pub vm: &'a VmRecord,
    pub chunk_size: u64,
    pub streams: usize,
    pub ram: Arc<GuestRam>,
    pub observer: Option<Arc<dyn crate::dirty::SendObserver>>,
    pub completions: mpsc::UnboundedSender<Completion>,
    pub transport: TransportKind,
    pub rdma: Result<Arc<Rdma>, String>,
}

impl Link {
    /// Connects, opens a session for the VM and the source's data streams.
    pub async fn open(a: OpenArgs<'_>) -> Result<Arc<Link>, EngineError> {
        let host = a.host.to_owned();
        let setup = |e: String| EngineError::Setup(e);
        let mut ctrl: ClientStream =
            peer::connect(a.tls, a.me, a.host, a.addr).await.map_err(|e| setup(e.to_string()))?;
        let open = Message::OpenSession {
            vm: a.vm.name.clone(),
            regions: a.vm.regions(),
            chunk_size: a.chunk_size,
            launch: a.vm.launch.clone(),
        };
        let lost = |why: String| EngineError::DestinationLost { host: host.clone(), why };
        write_message(&mut ctrl, &open).await.map_err(|e| lost(e.to_string()))?;
        let reply = tokio::time::timeout(CONTROL_TIMEOUT, read_message(&mut ctrl))
            .await
            .map_err(|_| lost("no answer to open session".into()))?;
        let (port, token, rdma_offer) = match reply {
            Ok(Message::SessionOpened { data_port, token, rdma }) => (data_port, token, rdma),
            Ok(other) => return Err(lost(format!("unexpected {}", other.name()))),
            Err(ProtocolError::Peer(m)) => return Err(setup(format!("{host} refused the migration: {m}"))),
            Err(e) => return Err(lost(e.to_string())),
        };
        let token: Token =
            hex::decode(&token).ok().and_then(|t| t.try_into().ok()).ok_or_else(|| lost("bad session token".into()))?;
        let data_addr = SocketAddr::new(a.addr.ip(), port);
        let sender = crate::transport::open_sender(
            &host,
            a.transport,
            &a.rdma,
            rdma_offer.as_deref(),
            data_addr,
            token,
            0,
            a.streams,
            a.ram,
            a.observer,
            a.completions.clone(),
        )
        .await;
        let sender = match sender {
            Ok(s) => s,
            Err(e) => {
                // Wait for the answer: the host has cleaned up once it replies,
                // so a retry right away finds no leftover session.
                let _ = write_message(&mut ctrl, &Message::Abort { reason: e.clone() }).await;
                let _ = tokio::time::timeout(Duration::from_secs(10), read_message(&mut ctrl)).await;
                return Err(if a.transport == TransportKind::Rdma { setup(e) } else { lost(e) });
            }
        };
        let transport = sender.kind();
        let (out, out_rx) = mpsc::unbounded_channel();
        let (replies_tx, replies) = mpsc::unbounded_channel();
        let link = Arc::new(Link {
            host: host.clone(),
            id: a.id,
            data_addr,
            token,
            out,
            replies: tokio::sync::Mutex::new(replies),
            forwarding: Arc::new(Mutex::new(Some(HashMap::new()))),
            forwarded_bytes: Arc::new(AtomicU64::new(0)),
            closed: CancellationToken::new(),
            sender: Mutex::new(Some(sender)),
            transport,
            rdma_offer,
            sent_before_close: AtomicU64::new(0),
        });
        link.spawn_io(ctrl, out_rx, replies_tx, a.completions);
        Ok(link)
    }

    fn spawn_io(
        &self,
        ctrl: ClientStream,
        mut out_rx: mpsc::UnboundedReceiver<Message>,
        replies: mpsc::UnboundedSender<Message>,
        completions: mpsc::UnboundedSender<Completion>,
    ) {
        let (mut r, mut w) = tokio::io::split(ctrl);
        let closed = self.closed.clone();
        tokio::spawn(async move {
            while let Some(m) = out_rx.recv().await {
                if write_message(&mut w, &m).await.is_err() {
                    break;
                }
            }
            closed.cancel();
        });
        let (closed, forwarding, bytes) = (self.closed.clone(), self.forwarding.clone(), self.forwarded_bytes.clone());
        tokio::spawn(async move {
            let why = loop {
                let m = tokio::select! {
                    m = read_message(&mut r) => m,
                    _ = closed.cancelled() => break "control connection closed".to_string(),
                };
                match m {
                    Ok(Message::Forwarded { batch, applied, error, bytes: b }) => {
                        bytes.fetch_max(b, Ordering::Relaxed);
                        let Some(batch) = forwarding.lock().unwrap().as_mut().and_then(|m| m.remove(&batch)) else {
                            continue;
                        };
                        let c = if applied {
                            Completion::Applied(batch)
                        } else {
                            Completion::Failed(batch, error.unwrap_or_else(|| "forward failed".into()))
                        };
                        let _ = completions.send(c);
                    }
                    Ok(m) => {
                        let _ = replies.send(m);
                    }
                    Err(ProtocolError::Peer(message)) => {
                        let _ = replies.send(Message::Error { message });
                    }
                    Err(e) => break e.to_string(),
                }
            };
            closed.cancel();
            let left = forwarding.lock().unwrap().take().unwrap_or_default();
            for (_, b) in left {
                let _ = completions.send(Completion::Failed(b, why.clone()));
            }
        });
    }

    /// Sends a request and waits for its reply (an `Error` reply is an error).
    pub async fn request(&self, m: Message) -> Result<Message, EngineError> {
        let lost = |why: String| EngineError::DestinationLost { host: self.host.clone(), why };
        let mut replies = self.replies.lock().await;
        self.out.send(m).map_err(|_| lost("control connection closed".into()))?;
        let reply = tokio::select! {
            biased;
            r = tokio::time::timeout(CONTROL_TIMEOUT, replies.recv()) => match r {
                Ok(r) => r,
                Err(_) => {
                    // A late reply would answer the next request: give up the link.
                    self.closed.cancel();
                    return Err(lost("no answer".into()));
                }
            },
            // A reply may have arrived just before the connection closed.
            _ = self.closed.cancelled() => replies.try_recv().ok(),
        };
        match reply {
            Some(Message::Error { message }) => Err(lost(message)),
            Some(m) => Ok(m),
            None => Err(lost("control connection closed".into())),
        }
    }

    /// A request whose only acceptable reply is the message named `expected`.
    pub async fn call(&self, m: Message, expected: &str) -> Result<(), EngineError> {
        let what = m.name();
        let reply = self.request(m).await?;
        if reply.name() != expected {
            return Err(EngineError::DestinationLost {
                host: self.host.clone(),
                why: format!("{what}: unexpected reply {}", reply.name()),
            });
        }
        Ok(())
    }

    /// Tells the host to discard its session, and waits (briefly) until it did.
    pub async fn abort(&self, reason: &str) {
        self.close_sender();
        let _ =
            tokio::time::timeout(Duration::from_secs(10), self.request(Message::Abort { reason: reason.into() })).await;
        self.closed.cancel();
    }

    /// Queues a batch on the source's own data streams to this host.
    pub fn submit(&self, b: Batch) -> Result<(), Batch> {
        match self.sender.lock().unwrap().as_ref() {
            Some(s) => s.submit(b),
            None => Err(b),
        }
    }

    /// Asks this host to forward a batch from its RAM to `to` (see `ForwardTo`).
    pub fn forward(&self, b: Batch, to: &str) -> Result<(), Batch> {
        // Under the lock: the reader fails every batch in the map when the
        // connection ends, and none can be added after that.
        let mut map = self.forwarding.lock().unwrap();
        let Some(m) = map.as_mut() else { return Err(b) };
        let runs: Vec<(usize, usize)> = b.runs.iter().map(|r: &Run| (r.first_page, r.pages)).collect();
        let id = b.id;
        if self.out.send(Message::Forward { batch: id, to: to.to_owned(), runs }).is_err() {
            return Err(b);
        }
        m.insert(id, b);
        Ok(())
    }

    /// Payload bytes the source sent to this host.
    pub fn bytes_sent(&self) -> u64 {
        let live = self.sender.lock().unwrap().as_ref().map_or(0, |s| s.bytes_sent());
        live + self.sent_before_close.load(Ordering::Relaxed)
    }

    /// Stops the source's data streams to this host (in-flight batches fail).
    pub fn close_sender(&self) {
        if let Some(s) = self.sender.lock().unwrap().take() {
            self.sent_before_close.fetch_add(s.bytes_sent(), Ordering::Relaxed);
            s.close();
        }
    }
}
