//! The receiving side: one data listener per agent, sessions found by their
//! tokens. A [`Receiving`] session owns what its streams write into (the RAM,
//! its RDMA registration) and can fence one sender: cut its streams, refuse
//! new ones, and confirm only once none of its frames can still land.
//!
//! Each sender of a session has a token of its own, bound to its sender id
//! and to the host name its TLS certificate must carry: a token seen by
//! anyone else is worth nothing, and fencing or releasing a sender revokes
//! it. (A session a protocol-3 source opened has one token for every
//! sender, as that source hands it to forwarders: a bearer token, bound to
//! nothing but the accepted peers.)

use super::handshake;
use super::rdma::Target;
use super::secure::{self, Accepted, ServerTls};
use super::{rdma, tcp, Stop, TransportError};
use crate::memory::GuestRam;
use crate::protocol::data::{HelloStatus, StreamMode, DATA_VERSION};
use crate::protocol::{RdmaRegion, Token};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// How long a fence may wait for a sender's streams to stop.
const FENCE_TIMEOUT: Duration = Duration::from_secs(10);

/// The session's source: the only sender left once the session is sealed.
pub const SOURCE: u8 = 0;

/// What a token lets its holder do: send for one session, as one sender
/// from one host (or, for a protocol-3 source's session, as any).
#[derive(Clone)]
struct Binding {
    session: Arc<Receiving>,
    /// The sender id the hello must give (`None`: any).
    sender: Option<u8>,
    /// The host name the stream's certificate must carry (`None`: any
    /// accepted peer; plain streams carry none to check).
    host: Option<String>,
}

/// A destination's view of one session: where its frames go.
pub struct Receiving {
    ram: Arc<GuestRam>,
    cancel: CancellationToken,
    /// The RAM registered for RDMA writes, when this session offers RDMA.
    rdma: OnceLock<Arc<Target>>,
    senders: Mutex<HashMap<u8, SenderStreams>>,
    /// Set once the pause's verification began: new streams are refused.
    sealed: std::sync::atomic::AtomicBool,
}

/// The streams of one sending host: a token to cut them, and a liveness
/// count (every stream task holds clones of `live` until it returns).
#[derive(Clone)]
struct SenderStreams {
    cut: CancellationToken,
    live: Arc<()>,
}

impl Receiving {
    fn sender(&self, id: u8) -> SenderStreams {
        self.senders
            .lock()
            .unwrap()
            .entry(id)
            .or_insert_with(|| SenderStreams { cut: CancellationToken::new(), live: Arc::new(()) })
            .clone()
    }

    /// The RAM streams write into.
    pub fn ram(&self) -> &Arc<GuestRam> {
        &self.ram
    }

    /// Offers RDMA: `target` is this session's RAM, registered.
    pub fn set_rdma(&self, target: Arc<Target>) {
        let _ = self.rdma.set(target);
    }

    /// What senders need for RDMA writes, if this session offers RDMA.
    pub fn rdma_offer(&self) -> Option<Vec<RdmaRegion>> {
        self.rdma.get().map(|t| t.offer())
    }

    /// Cuts every stream of `sender` (and refuses new ones) and returns once
    /// none of its frames can still be written: a frame is written only
    /// after it was read whole, and never across an await, so a cut stream
    /// task stops between frames.
    async fn cut(&self, sender: u8) -> Result<(), TransportError> {
        let s = self.sender(sender);
        s.cut.cancel();
        let deadline = tokio::time::Instant::now() + FENCE_TIMEOUT;
        // Our own clone plus the registry's: anything more is a live stream.
        while Arc::strong_count(&s.live) > 2 {
            if tokio::time::Instant::now() > deadline {
                return Err(TransportError::FenceTimeout(sender));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(())
    }
}

/// Every session of this agent, by token, and its encryption policy
/// (none: plain streams only, as in unit tests).
#[derive(Default, Clone)]
pub struct Receiver {
    tokens: Arc<Mutex<HashMap<Token, Binding>>>,
    tls: Option<ServerTls>,
}

impl Receiver {
    /// A receiver taking TLS streams from the hosts `tls` allows (and plain
    /// ones unless it requires TLS).
    pub fn new(tls: ServerTls) -> Self {
        Self { tokens: Default::default(), tls: Some(tls) }
    }

    /// Registers a session writing into `ram`; `token` is its source's,
    /// bound to `source` (its host name), or to nothing for a protocol-3
    /// source (which hands it to its forwarders).
    pub fn add(&self, token: Token, ram: Arc<GuestRam>, source: Option<&str>) -> Arc<Receiving> {
        let r = Arc::new(Receiving {
            ram,
            cancel: CancellationToken::new(),
            rdma: OnceLock::new(),
            senders: Mutex::new(HashMap::new()),
            sealed: Default::default(),
        });
        let binding = Binding { session: r.clone(), sender: source.map(|_| SOURCE), host: source.map(str::to_owned) };
        self.tokens.lock().unwrap().insert(token, binding);
        r
    }

    /// A token for sender `sender` of `session`, good only on streams from
    /// `host` (a forwarder the source points here).
    pub fn add_sender(&self, session: &Arc<Receiving>, sender: u8, host: &str) -> Result<Token, TransportError> {
        if sender == SOURCE || session.sender(sender).cut.is_cancelled() {
            return Err(TransportError::Refused(HelloStatus::Fenced));
        }
        if session.sealed.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(TransportError::Refused(HelloStatus::Sealed));
        }
        let token = Token::random();
        let mut tokens = self.tokens.lock().unwrap();
        // One token per sender: a new one replaces the old.
        tokens.retain(|_, b| !(Arc::ptr_eq(&b.session, session) && b.sender == Some(sender)));
        tokens.insert(token, Binding { session: session.clone(), sender: Some(sender), host: Some(host.to_owned()) });
        Ok(token)
    }

    /// Revokes the tokens of `session`'s senders that `which` picks.
    fn revoke(&self, session: &Arc<Receiving>, which: impl Fn(Option<u8>) -> bool) {
        self.tokens.lock().unwrap().retain(|_, b| !(Arc::ptr_eq(&b.session, session) && which(b.sender)));
    }

    /// Fences `sender`: its token revoked, its streams cut, and no answer
    /// until none of its frames can still be written.
    pub async fn fence(&self, session: &Arc<Receiving>, sender: u8) -> Result<(), TransportError> {
        self.revoke(session, |s| s == Some(sender));
        session.cut(sender).await
    }

    /// Seals the session for the pause's verification: only the source's
    /// streams go on (its resends use them); every other sender's token is
    /// revoked and its streams cut before this returns, and no new stream
    /// is taken, so what is verified is what resumes.
    pub async fn seal(&self, session: &Arc<Receiving>) -> Result<(), TransportError> {
        session.sealed.store(true, std::sync::atomic::Ordering::SeqCst);
        self.revoke(session, |s| s != Some(SOURCE));
        let others: Vec<u8> = session.senders.lock().unwrap().keys().copied().filter(|s| *s != SOURCE).collect();
        for s in others {
            session.cut(s).await?;
        }
        Ok(())
    }

    /// Forgets a session (every token of it) and cuts its streams.
    pub fn remove(&self, token: &Token) {
        let mut tokens = self.tokens.lock().unwrap();
        if let Some(b) = tokens.get(token).cloned() {
            tokens.retain(|_, x| !Arc::ptr_eq(&x.session, &b.session));
            b.session.cancel.cancel();
        }
    }

    /// Accepts data streams forever.
    pub async fn serve(self, listener: TcpListener) {
        let listener = Listener::new(listener, "data listener");
        loop {
            let (s, peer, slot) = listener.accept().await;
            let me = self.clone();
            tokio::spawn(async move {
                if let Err(e) = me.serve_stream(s).await {
                    tracing::warn!(%peer, "data stream: {}", crate::error_chain(&e));
                }
                drop(slot);
            });
        }
    }

    async fn serve_stream(&self, tcp: TcpStream) -> Result<(), TransportError> {
        tcp.set_nodelay(true).ok();
        let local = tcp.local_addr().ok().map(|a| a.ip());
        let Accepted { stream: mut s, peer } = secure::server(tcp, self.tls.as_ref()).await?;
        let hello = handshake::read_hello(&mut s).await?;
        let refuse = |status| TransportError::Refused(status);
        if hello.version != DATA_VERSION {
            handshake::answer(&mut s, HelloStatus::BadVersion).await.ok();
            return Err(TransportError::Version(hello.version));
        }
        if peer.is_none() && self.tls.as_ref().is_some_and(|t| t.required) {
            handshake::answer(&mut s, HelloStatus::EncryptionRequired).await.ok();
            return Err(refuse(HelloStatus::EncryptionRequired));
        }
        let Some(b) = self.tokens.lock().unwrap().get(&hello.token).cloned() else {
            handshake::answer(&mut s, HelloStatus::BadToken).await.ok();
            return Err(refuse(HelloStatus::BadToken));
        };
        // A token is its sender's: another host, or another sender id, is refused.
        let wrong_host = matches!((&b.host, &peer), (Some(h), Some(p)) if h != p);
        if wrong_host || b.sender.is_some_and(|s| s != hello.sender) {
            handshake::answer(&mut s, HelloStatus::WrongSender).await.ok();
            return Err(refuse(HelloStatus::WrongSender));
        }
        let sess = b.session;
        let streams = sess.sender(hello.sender);
        // Counted as live before the check: a fence that cut this sender
        // after the check still waits for this stream.
        let _alive = streams.live.clone();
        if streams.cut.is_cancelled() {
            handshake::answer(&mut s, HelloStatus::Fenced).await.ok();
            return Err(refuse(HelloStatus::Fenced));
        }
        if sess.sealed.load(std::sync::atomic::Ordering::SeqCst) {
            handshake::answer(&mut s, HelloStatus::Sealed).await.ok();
            return Err(refuse(HelloStatus::Sealed));
        }
        let stop = Stop { session: sess.cancel.clone(), sender: streams.cut.clone() };
        match StreamMode::try_from(hello.mode) {
            Ok(StreamMode::Tcp) => {
                handshake::answer(&mut s, HelloStatus::Ok).await?;
                tokio::select! {
                    r = tcp::serve(&sess.ram, &mut s) => r,
                    _ = stop.wait() => Ok(()),
                }
            }
            // Pairs a queue pair; answers the hello itself.
            Ok(StreamMode::Rdma) => match sess.rdma.get() {
                Some(t) => rdma::serve(t, s, stop, local).await,
                None => {
                    handshake::answer(&mut s, HelloStatus::NoRdma).await.ok();
                    Err(refuse(HelloStatus::NoRdma))
                }
            },
            Err(_) => {
                handshake::answer(&mut s, HelloStatus::BadVersion).await.ok();
                Err(TransportError::Mode(hello.mode))
            }
        }
    }
}

/// Connections one listener serves at once, at most; fewer when the
/// process's file descriptor limit is low (see [`connection_cap`]). More are
/// closed at once, so a flood can neither exhaust file descriptors nor
/// starve the event loop (handshakes have deadlines, so slots come back).
pub const MAX_CONNECTIONS: usize = 512;

/// File descriptors kept for everything but the two listeners' connections
/// (RAM files, QMP and API sockets, the journal).
const RESERVED_FDS: u64 = 64;

/// How many connections one listener may serve now: a quarter of the file
/// descriptors left after [`RESERVED_FDS`] (read each time: an operator may
/// change the limit of a running agent), at least 8, at most
/// [`MAX_CONNECTIONS`].
pub fn connection_cap() -> usize {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit fills the struct it is given.
    let soft = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 { lim.rlim_cur } else { 1024 };
    (soft.saturating_sub(RESERVED_FDS) / 4).clamp(8, MAX_CONNECTIONS as u64) as usize
}

/// A listener with a bounded number of live connections.
pub struct Listener {
    inner: TcpListener,
    what: &'static str,
    live: Arc<std::sync::atomic::AtomicUsize>,
}

/// A connection's place in its [`Listener`], held while it is served.
pub struct Slot(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Listener {
    /// Serves at most [`connection_cap`] connections of `inner` at once.
    pub fn new(inner: TcpListener, what: &'static str) -> Self {
        Self { inner, what, live: Default::default() }
    }

    /// The next connection, with its slot. Accept errors (no file
    /// descriptors left, say) are logged and back off instead of spinning;
    /// connections beyond the cap are closed unread.
    pub async fn accept(&self) -> (TcpStream, std::net::SocketAddr, Slot) {
        use std::sync::atomic::Ordering;
        let mut refused = 0u64;
        loop {
            match self.inner.accept().await {
                Ok((s, addr)) => {
                    let cap = connection_cap();
                    if self.live.fetch_add(1, Ordering::SeqCst) < cap {
                        return (s, addr, Slot(self.live.clone()));
                    }
                    self.live.fetch_sub(1, Ordering::SeqCst);
                    drop(s);
                    refused += 1;
                    if refused.is_power_of_two() {
                        tracing::warn!(%addr, refused, "{}: {cap} connections open, closing new ones", self.what);
                    }
                }
                Err(e) => {
                    tracing::warn!("{}: {e}", self.what);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}
