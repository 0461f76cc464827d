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
use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How long a fence may wait for a sender's streams to stop (longer than a
/// pairing may take: a stream still pairing stops at the cut anyway).
const FENCE_TIMEOUT: Duration = Duration::from_secs(15);

/// The session's source: the only sender left once the session is sealed.
pub(crate) const SOURCE: u8 = 0;

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
    /// The session's source: streams that claim to be sender 0 must come
    /// from it, whatever else the token allows.
    source: Option<String>,
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

/// The streams of one sending host: a token to cut them, and the stream
/// tasks, tracked (each holds a token of `live` until it returns), so a
/// fence can wait for the last one to end.
#[derive(Clone)]
struct SenderStreams {
    cut: CancellationToken,
    live: TaskTracker,
}

impl SenderStreams {
    /// Cuts every stream and refuses new ones (for good).
    fn cut(&self) {
        self.cut.cancel();
        self.live.close();
    }

    /// Once every stream task ended, or `deadline` passed (false).
    async fn ended_by(&self, deadline: tokio::time::Instant) -> bool {
        tokio::time::timeout_at(deadline, self.live.wait()).await.is_ok()
    }
}

impl Receiving {
    fn sender(&self, id: u8) -> SenderStreams {
        self.senders
            .lock()
            .unwrap()
            .entry(id)
            .or_insert_with(|| SenderStreams { cut: CancellationToken::new(), live: TaskTracker::new() })
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
        s.cut();
        match s.ended_by(tokio::time::Instant::now() + FENCE_TIMEOUT).await {
            true => Ok(()),
            false => Err(TransportError::FenceTimeout(sender)),
        }
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
    /// bound to `source` (its host name) and sender 0. A protocol-3 source
    /// (`shared`) hands its token to its forwarders: then any accepted peer
    /// may use it, but only `source` as sender 0.
    pub fn add(&self, token: Token, ram: Arc<GuestRam>, source: Option<&str>, shared: bool) -> Arc<Receiving> {
        let r = Arc::new(Receiving {
            ram,
            cancel: CancellationToken::new(),
            rdma: OnceLock::new(),
            senders: Mutex::new(HashMap::new()),
            sealed: Default::default(),
        });
        let binding = Binding {
            session: r.clone(),
            sender: (!shared).then_some(SOURCE),
            host: source.filter(|_| !shared).map(str::to_owned),
            source: source.map(str::to_owned),
        };
        self.tokens.lock().unwrap().insert(token, binding);
        r
    }

    /// A token for sender `sender` of `session`, good only on streams from
    /// `host` (a forwarder the source points here).
    pub fn add_sender(&self, session: &Arc<Receiving>, sender: u8, host: &str) -> Result<Token, TransportError> {
        // A migration has at most MAX_HOSTS hosts: no more senders.
        if sender == SOURCE || sender as usize >= crate::ledger::MAX_HOSTS || session.sender(sender).cut.is_cancelled()
        {
            return Err(TransportError::Refused(HelloStatus::Fenced));
        }
        if session.sealed.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(TransportError::Refused(HelloStatus::Sealed));
        }
        let token = Token::random();
        let mut tokens = self.tokens.lock().unwrap();
        // One token per sender: a new one replaces the old.
        tokens.retain(|_, b| !(Arc::ptr_eq(&b.session, session) && b.sender == Some(sender)));
        tokens.insert(
            token,
            Binding { session: session.clone(), sender: Some(sender), host: Some(host.to_owned()), source: None },
        );
        Ok(token)
    }

    /// Revokes the tokens of `session`'s senders that `which` picks.
    fn revoke(&self, session: &Arc<Receiving>, which: impl Fn(Option<u8>) -> bool) {
        self.tokens.lock().unwrap().retain(|_, b| !(Arc::ptr_eq(&b.session, session) && which(b.sender)));
    }

    /// Fences `sender`: its token revoked, its streams cut, and no answer
    /// until none of its frames can still be written.
    pub async fn fence(&self, session: &Arc<Receiving>, sender: u8) -> Result<(), TransportError> {
        if sender == SOURCE {
            // The source's streams end with the session, not by a fence.
            return Err(TransportError::Refused(HelloStatus::Fenced));
        }
        self.revoke(session, |s| s == Some(sender));
        let r = session.cut(sender).await;
        // Its queue pairs are in the error state: its keys go too, before
        // the fence is confirmed.
        if let Some(t) = session.rdma.get().cloned() {
            let _ = tokio::task::spawn_blocking(move || t.revoke(sender)).await;
        }
        r
    }

    /// Registers `session`'s RAM for forwarder `sender`'s RDMA writes (keys
    /// of its own; blocks while it pins it), if the session offers RDMA.
    pub fn rdma_for(session: &Arc<Receiving>, sender: u8) -> Option<Result<Vec<RdmaRegion>, String>> {
        Some(session.rdma.get()?.add_sender(sender))
    }

    /// Seals the session for the pause's verification: only the source's
    /// streams go on (its resends use them); every other sender's token is
    /// revoked and its streams cut before this returns, and no new stream
    /// is taken, so what is verified is what resumes.
    pub async fn seal(&self, session: &Arc<Receiving>) -> Result<(), TransportError> {
        session.sealed.store(true, std::sync::atomic::Ordering::SeqCst);
        // Forwarders' own tokens go; a protocol-3 session's shared token
        // stays for its source (new streams are refused anyway).
        self.revoke(session, |s| s.is_some_and(|s| s != SOURCE));
        let others: Vec<SenderStreams> = {
            let senders = session.senders.lock().unwrap();
            senders.iter().filter(|(s, _)| **s != SOURCE).map(|(_, st)| st.clone()).collect()
        };
        // Every one cut and every forwarder's RDMA keys deregistered first
        // (a write with them fails from then on), then the streams waited
        // for, under one deadline.
        others.iter().for_each(SenderStreams::cut);
        if let Some(t) = session.rdma.get().cloned() {
            let _ = tokio::task::spawn_blocking(move || t.revoke_all()).await;
        }
        let deadline = tokio::time::Instant::now() + FENCE_TIMEOUT;
        for s in &others {
            if !s.ended_by(deadline).await {
                return Err(TransportError::SealTimeout);
            }
        }
        Ok(())
    }

    /// Forgets a session (every token of it) and cuts its streams.
    pub fn remove(&self, session: &Arc<Receiving>) {
        self.tokens.lock().unwrap().retain(|_, x| !Arc::ptr_eq(&x.session, session));
        session.cancel.cancel();
    }

    /// Accepts data streams forever; `peers` (configured peers' addresses)
    /// keep slots of their own.
    pub async fn serve(self, listener: TcpListener, peers: HashSet<IpAddr>) {
        let listener = Listener::new(listener, "data listener", peers);
        loop {
            let (s, peer, slot) = listener.accept().await;
            let me = self.clone();
            tokio::spawn(async move {
                if !first_byte(&s).await {
                    tracing::debug!(%peer, "data stream: nothing sent within {FIRST_BYTE:?}; closed");
                    return;
                }
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
        // A token is its sender's: another host, or another sender id, is
        // refused; and only the source may be sender 0.
        let wrong_host = matches!((&b.host, &peer), (Some(h), Some(p)) if h != p);
        let not_source = hello.sender == SOURCE && matches!((&b.source, &peer), (Some(s), Some(p)) if s != p);
        if wrong_host || not_source || b.sender.is_some_and(|s| s != hello.sender) {
            handshake::answer(&mut s, HelloStatus::WrongSender).await.ok();
            return Err(refuse(HelloStatus::WrongSender));
        }
        let sess = b.session;
        let streams = sess.sender(hello.sender);
        // Counted as live before the check: a fence that cut this sender
        // after the check still waits for this stream.
        let _alive = streams.live.token();
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
pub(crate) const MAX_CONNECTIONS: usize = 512;

/// File descriptors kept for everything but the two listeners' connections
/// (RAM files, QMP and API sockets, the journal).
const RESERVED_FDS: u64 = 64;

/// How many connections one listener may serve now: a quarter of the file
/// descriptors left after [`RESERVED_FDS`] (read each time: an operator may
/// change the limit of a running agent), at least 8, at most
/// [`MAX_CONNECTIONS`].
pub(crate) fn connection_cap() -> usize {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit fills the struct it is given.
    let soft = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 { lim.rlim_cur } else { 1024 };
    (soft.saturating_sub(RESERVED_FDS) / 4).clamp(8, MAX_CONNECTIONS as u64) as usize
}

/// Who a listener lets in, beyond its total cap ([`connection_cap`]).
#[derive(Clone, Debug, Default)]
pub(crate) struct Admission {
    /// Addresses of configured peers: they may use every slot, the last
    /// [`RESERVED`] of which nobody else gets, and have no cap of their own.
    pub reserved: HashSet<IpAddr>,
    /// Connections one other address may hold at once.
    pub per_addr: usize,
    /// A total below [`connection_cap`], if set.
    pub total: Option<usize>,
}

/// Slots of a listener only configured peers may take.
pub(crate) const RESERVED: usize = 32;
/// Connections one address that is not a configured peer may hold on the
/// control and data listeners (a migration from there has a few streams).
pub(crate) const PER_ADDR: usize = 32;
/// Connections one configured peer's address may hold (its migrations'
/// streams, forwards and questions): others behind it (local users, NAT)
/// cannot take every slot either.
pub(crate) const PER_PEER_ADDR: usize = 256;

/// The address connections are counted under: IPv4 as it is (an IPv4
/// address on an IPv6 socket included), IPv6 by its /64 (one host has a
/// whole /64 to connect from).
pub(crate) fn counted_as(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
        v4 => v4,
    }
}
/// How long a new connection may stay silent: a client that connects and
/// sends nothing gives its slot back after this.
pub(crate) const FIRST_BYTE: Duration = Duration::from_secs(2);

/// Whether the client sent something within [`FIRST_BYTE`] (nothing is consumed).
pub(crate) async fn first_byte(tcp: &TcpStream) -> bool {
    let mut b = [0u8; 1];
    matches!(tokio::time::timeout(FIRST_BYTE, tcp.peek(&mut b)).await, Ok(Ok(n)) if n > 0)
}

/// A listener with a bounded number of live connections: in all, per
/// address, and with slots kept for configured peers.
pub(crate) struct Listener {
    inner: TcpListener,
    what: &'static str,
    admission: Admission,
    live: Arc<Mutex<Live>>,
}

#[derive(Default)]
struct Live {
    total: usize,
    by_addr: HashMap<IpAddr, usize>,
}

/// A connection's place in its [`Listener`], held while it is served.
pub(crate) struct Slot(Arc<Mutex<Live>>, IpAddr);

impl Drop for Slot {
    fn drop(&mut self) {
        let mut l = self.0.lock().unwrap();
        l.total -= 1;
        if let Some(n) = l.by_addr.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                l.by_addr.remove(&self.1);
            }
        }
    }
}

impl Listener {
    /// Serves at most [`connection_cap`] connections of `inner` at once,
    /// [`PER_ADDR`] per address, [`RESERVED`] of them kept for `peers`.
    pub(crate) fn new(inner: TcpListener, what: &'static str, peers: HashSet<IpAddr>) -> Self {
        Self::with(inner, what, Admission { reserved: peers, per_addr: PER_ADDR, total: None })
    }

    /// A listener with its own admission rules.
    pub(crate) fn with(inner: TcpListener, what: &'static str, admission: Admission) -> Self {
        Self { inner, what, admission, live: Default::default() }
    }

    /// Whether a connection from `ip` may be served now; counts it if so.
    fn admit(&self, ip: IpAddr) -> bool {
        let cap = self.admission.total.unwrap_or_else(connection_cap);
        let mut l = self.live.lock().unwrap();
        let here = l.by_addr.get(&ip).copied().unwrap_or(0);
        let ok = if self.admission.reserved.contains(&ip) {
            l.total < cap && here < PER_PEER_ADDR
        } else {
            let keep = if self.admission.reserved.is_empty() { 0 } else { RESERVED.min(cap / 2) };
            let others = cap.saturating_sub(keep);
            l.total < others && here < self.admission.per_addr
        };
        if ok {
            l.total += 1;
            *l.by_addr.entry(ip).or_default() += 1;
        }
        ok
    }

    /// The next connection, with its slot. Accept errors (no file
    /// descriptors left, say) are logged and back off instead of spinning;
    /// connections beyond the caps are closed unread.
    pub(crate) async fn accept(&self) -> (TcpStream, std::net::SocketAddr, Slot) {
        let mut refused = 0u64;
        loop {
            match self.inner.accept().await {
                Ok((s, addr)) => {
                    let ip = counted_as(addr.ip());
                    if self.admit(ip) {
                        return (s, addr, Slot(self.live.clone(), ip));
                    }
                    drop(s);
                    refused += 1;
                    if refused.is_power_of_two() {
                        tracing::warn!(%addr, refused, "{}: connection caps reached, closing new ones", self.what);
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
