//! Agent-to-agent control connections: mutual TLS, then the protocol
//! handshake, which checks that a peer's claimed host name is one its
//! CA-signed certificate was issued for and agrees on a protocol version.
//! Both ends then run the connection as a [`Channel`]: a writer task and a
//! reader task, with heartbeats (protocol 2) so that a peer that died, froze
//! or went silent is declared lost within a bound, and a peer busy with long
//! work still answers.

mod requests;

pub use requests::{Reply, Requests};

use crate::protocol::{
    self, read_message_within, write_message, write_tagged, Ids, Message, ProtocolError, Received, MIN_VERSION,
};
use crate::tls::{cert_host_names, TlsConfig};
use rustls::pki_types::ServerName;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncWrite, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// The client end of a control connection.
pub type ClientStream = tokio_rustls::client::TlsStream<TcpStream>;
/// The server end of a control connection.
pub type ServerStream = tokio_rustls::server::TlsStream<TcpStream>;

/// How long connecting plus TLS plus the protocol handshake may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Messages read ahead of their consumer (then the reader waits: TCP pushes back).
const INBOX: usize = 64;
/// Replies waiting to be sent on a serving connection, at most: a peer that
/// stops reading while it keeps asking (or pinging) loses its connection
/// instead of growing this host's memory. (What a source queues is its own
/// doing: its connections are not bounded.)
pub const OUTBOX: usize = 4096;

/// Control sessions can be idle for long (a forwarder, a destination during
/// long rounds); keepalive makes a vanished peer end them within ~25 s, so
/// a destination discards a session whose source is gone.
pub fn keepalive(tcp: &TcpStream) {
    let ka = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(10))
        .with_interval(Duration::from_secs(5))
        .with_retries(3);
    if let Err(e) = socket2::SockRef::from(tcp).set_tcp_keepalive(&ka) {
        tracing::warn!("TCP keepalive: {e}");
    }
}

/// A control connection could not be set up.
#[derive(Debug, Error)]
pub enum PeerError {
    /// A host name that cannot be a TLS server name.
    #[error("invalid host name {0:?}")]
    HostName(String),
    /// TCP connect failed.
    #[error("connecting to {host} at {addr}")]
    Connect {
        /// The peer.
        host: String,
        /// Its address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// TLS failed (certificate refused, either way).
    #[error("TLS with {host}")]
    Tls {
        /// The peer (or its address).
        host: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The protocol handshake failed.
    #[error("handshake with {host}")]
    Protocol {
        /// The peer (or its address).
        host: String,
        /// Why.
        #[source]
        source: ProtocolError,
    },
    /// The peer's certificate is not for the name it claims.
    #[error("peer claims to be {claimed:?} but its certificate is for {names:?}")]
    Identity {
        /// The name it claimed.
        claimed: String,
        /// The names in its certificate.
        names: Vec<String>,
    },
    /// A certified peer this host does not accept sessions from.
    #[error("{host} is not a peer this host accepts migrations from (--peer, --accept-from)")]
    NotAllowed {
        /// The peer's verified name.
        host: String,
    },
    /// No answer within [`HANDSHAKE_TIMEOUT`].
    #[error("{host} did not answer within {HANDSHAKE_TIMEOUT:?}")]
    Timeout {
        /// The peer.
        host: String,
    },
}

/// An established control connection and the protocol version it speaks.
pub struct Connected<S> {
    /// The TLS stream.
    pub stream: S,
    /// The negotiated protocol version.
    pub version: u32,
    /// The peer's verified host name.
    pub host: String,
}

impl<S> Connected<S> {
    /// What the negotiated version lets both ends do.
    pub fn features(&self) -> protocol::Features {
        protocol::Features::of(self.version)
    }
}

/// Connects to `host` at `addr` as `me`.
pub async fn connect(
    tls: &TlsConfig,
    me: &str,
    host: &str,
    addr: SocketAddr,
) -> Result<Connected<ClientStream>, PeerError> {
    let fut = async {
        let tcp =
            TcpStream::connect(addr).await.map_err(|source| PeerError::Connect { host: host.into(), addr, source })?;
        tcp.set_nodelay(true).ok();
        keepalive(&tcp);
        let name = ServerName::try_from(host.to_owned()).map_err(|_| PeerError::HostName(host.into()))?;
        let mut s = TlsConnector::from(tls.client.clone())
            .connect(name, tcp)
            .await
            .map_err(|source| PeerError::Tls { host: host.into(), source })?;
        let proto = |source| PeerError::Protocol { host: host.into(), source };
        let max = protocol::max_version();
        // A version-1 server accepts only `version: 1`: the range's top goes apart.
        let max_version = (max > MIN_VERSION).then_some(max);
        let hello = Message::Hello { version: MIN_VERSION, host: me.into(), max_version };
        write_message(&mut s, &hello).await.map_err(proto)?;
        match read_message_within(&mut s, protocol::MAX_HELLO).await.map_err(proto)?.0 {
            Message::Welcome { version, .. } if (MIN_VERSION..=max).contains(&version) => {
                Ok(Connected { stream: s, version, host: host.to_owned() })
            }
            Message::Welcome { version, .. } => Err(proto(ProtocolError::Version { min: version, max: version })),
            other => Err(proto(ProtocolError::Unexpected(other.name()))),
        }
    };
    tokio::time::timeout(HANDSHAKE_TIMEOUT, fut).await.map_err(|_| PeerError::Timeout { host: host.into() })?
}

/// Accepts a peer whose verified name `allowed` admits; returns the stream,
/// the version and that name.
pub async fn accept(
    tls: &TlsConfig,
    me: &str,
    allowed: impl Fn(&str) -> bool,
    tcp: TcpStream,
) -> Result<Connected<ServerStream>, PeerError> {
    keepalive(&tcp);
    let fut = async {
        let addr = tcp.peer_addr().map(|a| a.to_string()).unwrap_or_default();
        let mut s = TlsAcceptor::from(tls.server.clone())
            .accept(tcp)
            .await
            .map_err(|source| PeerError::Tls { host: addr.clone(), source })?;
        let proto = |source| PeerError::Protocol { host: addr.clone(), source };
        // Read before the peer is admitted: bounded as a hello.
        let (max, min, claimed) = match read_message_within(&mut s, protocol::MAX_HELLO).await.map_err(proto)?.0 {
            Message::Hello { version, host, max_version } => (max_version.unwrap_or(version), version, host),
            other => return Err(proto(ProtocolError::Unexpected(other.name()))),
        };
        let names = s.get_ref().1.peer_certificates().and_then(|c| c.first()).map(cert_host_names).unwrap_or_default();
        if !names.contains(&claimed) {
            return Err(PeerError::Identity { claimed, names });
        }
        if !allowed(&claimed) {
            let message = format!("{me} does not accept migrations from {claimed}");
            let _ = write_message(&mut s, &Message::error(protocol::ErrorCode::NotAllowed, message)).await;
            return Err(PeerError::NotAllowed { host: claimed });
        }
        let Some(version) = protocol::negotiate(min, max) else {
            let ours = protocol::max_version();
            let message =
                format!("protocol versions {min}..={max} not supported, this agent speaks {MIN_VERSION}..={ours}");
            let _ = write_message(&mut s, &Message::error(protocol::ErrorCode::Unsupported, message)).await;
            return Err(proto(ProtocolError::Version { min, max }));
        };
        write_message(&mut s, &Message::Welcome { version, host: me.into() }).await.map_err(proto)?;
        Ok(Connected { stream: s, version, host: claimed })
    };
    tokio::time::timeout(HANDSHAKE_TIMEOUT, fut)
        .await
        .map_err(|_| PeerError::Timeout { host: "incoming peer".into() })?
}

/// Messages read from a control connection by [`Channel`]; the last item
/// is the error that ended it. What waits in it is bounded in number
/// ([`INBOX`]) and in bytes ([`INBOX_BYTES`]): the reader stops reading
/// (TCP pushes back) until the consumer takes messages.
pub struct Inbox {
    rx: mpsc::Receiver<(Result<Received, ProtocolError>, Option<OwnedSemaphorePermit>)>,
}

impl Inbox {
    /// The next message (its bytes leave the inbox's budget); an `Error`
    /// message is [`ProtocolError::Peer`].
    pub async fn recv(&mut self) -> Option<Result<Message, ProtocolError>> {
        self.recv_tagged().await.map(|r| match r?.msg {
            Message::Error { message, .. } => Err(ProtocolError::Peer(message)),
            m => Ok(m),
        })
    }

    /// The next message with its request ids (an `Error` stays a message).
    pub async fn recv_tagged(&mut self) -> Option<Result<Received, ProtocolError>> {
        self.rx.recv().await.map(|(m, _bytes)| m)
    }
}

/// Bytes of messages read ahead of their consumer, at most: room is taken
/// for a message before its body is read (one larger than this takes all of
/// it; each kind is capped, see [`protocol::cap_of`]).
pub const INBOX_BYTES: usize = 32 << 20;

/// Heartbeats on a control connection (protocol version 2 and later).
#[derive(Clone, Copy, Debug)]
pub struct Heartbeat {
    /// Send a `Ping` this often (the source of a session does).
    pub ping_every: Option<Duration>,
    /// The peer is lost after this long without a message from it.
    pub timeout: Duration,
}

impl Heartbeat {
    /// What the side that sends pings uses: pings four times per timeout.
    pub fn pinging(timeout: Duration) -> Self {
        Self { ping_every: Some((timeout / 4).max(Duration::from_millis(50))), timeout }
    }

    /// What the answering side uses: no pings of its own, the same timeout.
    pub fn answering(timeout: Duration) -> Self {
        Self { ping_every: None, timeout }
    }
}

/// A control connection run by two tasks: a writer (messages from `out`,
/// and pings) and a reader (answers pings itself, so a peer busy with long
/// work still answers; passes everything else to `inbox`; declares the peer
/// lost when it is silent for the heartbeat's timeout).
pub struct Channel {
    /// Messages to send, in order.
    pub out: Outbox,
    /// Messages received.
    pub inbox: Inbox,
    /// Cancelled when the connection is over (either task ended).
    pub closed: tokio_util::sync::CancellationToken,
}

/// The control connection is over: a message was not queued.
#[derive(Debug, Error)]
#[error("control connection closed")]
pub struct Closed;

/// The sending side of a [`Channel`], bounded by [`OUTBOX`].
#[derive(Clone)]
pub struct Outbox {
    tx: mpsc::UnboundedSender<(Message, Ids)>,
    queued: Arc<AtomicUsize>,
    limit: usize,
    closed: tokio_util::sync::CancellationToken,
}

impl Outbox {
    /// Queues `m`; fails once the connection is over, or when the peer has
    /// let its limit of messages pile up (the connection is then closed).
    pub fn send(&self, m: Message) -> Result<(), Closed> {
        self.send_tagged(m, Ids::default())
    }

    /// Queues `m` with request ids (to a peer of protocol 6 or later).
    pub fn send_tagged(&self, m: Message, ids: Ids) -> Result<(), Closed> {
        if self.queued.fetch_add(1, Ordering::SeqCst) >= self.limit {
            self.queued.fetch_sub(1, Ordering::SeqCst);
            tracing::warn!("control connection: the peer does not read what it asked for; closing");
            self.closed.cancel();
            return Err(Closed);
        }
        self.tx.send((m, ids)).map_err(|_| {
            self.queued.fetch_sub(1, Ordering::SeqCst);
            Closed
        })
    }
}

impl Channel {
    /// Runs `stream` with heartbeats if `heartbeat` is given (the version
    /// both speak must have them): a source's end.
    pub fn new<S>(stream: S, heartbeat: Option<Heartbeat>) -> Self
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        Self::with_outbox(stream, heartbeat, (usize::MAX, protocol::Reader::Client))
    }

    /// A channel serving a peer's requests in protocol `version`: at most
    /// [`OUTBOX`] replies wait.
    pub fn serving<S>(stream: S, heartbeat: Option<Heartbeat>, version: u32) -> Self
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        Self::with_outbox(stream, heartbeat, (OUTBOX, protocol::Reader::Serving(version)))
    }

    fn with_outbox<S>(stream: S, heartbeat: Option<Heartbeat>, (limit, reader): (usize, protocol::Reader)) -> Self
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (r, w): (ReadHalf<S>, WriteHalf<S>) = tokio::io::split(stream);
        let (out_tx, out_rx) = mpsc::unbounded_channel();
        let (tx, rx) = mpsc::channel(INBOX);
        let inbox = Inbox { rx };
        let closed = tokio_util::sync::CancellationToken::new();
        let out = Outbox { tx: out_tx, queued: Arc::new(AtomicUsize::new(0)), limit, closed: closed.clone() };
        let queued = out.queued.clone();
        tokio::spawn(write_loop(w, (out_rx, queued), heartbeat.and_then(|h| h.ping_every), closed.clone()));
        tokio::spawn(read_loop((r, reader), tx, out.clone(), heartbeat.map(|h| h.timeout), closed.clone()));
        Self { out, inbox, closed }
    }
}

async fn write_loop<W: AsyncWrite>(
    mut w: WriteHalf<W>,
    (mut out, queued): (mpsc::UnboundedReceiver<(Message, Ids)>, Arc<AtomicUsize>),
    ping_every: Option<Duration>,
    closed: tokio_util::sync::CancellationToken,
) {
    let mut tick = tokio::time::interval(ping_every.unwrap_or(Duration::from_secs(3600)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let m = tokio::select! {
            m = out.recv() => match m {
                Some(m) => {
                    queued.fetch_sub(1, Ordering::SeqCst);
                    m
                }
                None => break,
            },
            _ = tick.tick(), if ping_every.is_some() => (Message::Ping, Ids::default()),
            _ = closed.cancelled() => break,
        };
        if write_tagged(&mut w, &m.0, m.1).await.is_err() {
            break;
        }
    }
    closed.cancel();
}

async fn read_loop<R: AsyncRead>(
    (mut r, reader): (ReadHalf<R>, protocol::Reader),
    tx: mpsc::Sender<(Result<Received, ProtocolError>, Option<OwnedSemaphorePermit>)>,
    out: Outbox,
    timeout: Option<Duration>,
    closed: tokio_util::sync::CancellationToken,
) {
    let silent = timeout.unwrap_or(Duration::from_secs(u32::MAX as u64));
    // The inbox's byte budget, in KiB.
    let budget = Arc::new(Semaphore::new(INBOX_BYTES >> 10));
    let full = INBOX_BYTES >> 10;
    loop {
        let read = protocol::read_counted(&mut r, (protocol::MAX_MESSAGE, reader), &budget);
        tokio::pin!(read);
        let mut since = tokio::time::Instant::now();
        let m = loop {
            tokio::select! {
                m = &mut read => break Some(m),
                _ = tokio::time::sleep_until(since + silent) => {
                    // While the consumer has the budget's worth unread the
                    // reading waits for it: that is not the peer's silence.
                    if budget.available_permits() < full {
                        since = tokio::time::Instant::now();
                        continue;
                    }
                    break Some(Err(ProtocolError::Silent(silent)));
                }
                _ = closed.cancelled() => break None,
            }
        };
        let Some(m) = m else { break };
        let (m, permit) = match m {
            Ok((m, p)) => (Ok(m), Some(p)),
            Err(e) => (Err(e), None),
        };
        match m.as_ref().map(|r| &r.msg) {
            Ok(Message::Ping) => {
                let _ = out.send(Message::Pong);
                continue;
            }
            Ok(Message::Pong) => continue,
            _ => {}
        }
        // A peer's `Error` is an answer (a message), not the end of the connection.
        let end = m.is_err();
        if tx.send((m, permit)).await.is_err() || end {
            break;
        }
    }
    closed.cancel();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A peer that answers nothing (not even pings) is lost within the
    /// heartbeat's timeout; one that answers is not.
    #[tokio::test]
    async fn a_silent_peer_is_lost_within_the_timeout() {
        let (a, _b) = tokio::io::duplex(1 << 16);
        let t = Duration::from_millis(300);
        let mut ch = Channel::new(a, Some(Heartbeat::pinging(t)));
        let got = tokio::time::timeout(Duration::from_secs(5), ch.inbox.recv()).await.expect("no verdict in 5 s");
        assert!(matches!(got, Some(Err(ProtocolError::Silent(_)))), "{got:?}");
    }

    /// The same once a peer that answered pings for a while stops.
    #[tokio::test]
    async fn a_peer_that_stops_answering_is_lost() {
        let (a, b) = tokio::io::duplex(1 << 16);
        let t = Duration::from_millis(300);
        let mut ch = Channel::new(a, Some(Heartbeat::pinging(t)));
        let peer = tokio::spawn(async move {
            let (mut r, mut w) = tokio::io::split(b);
            let end = tokio::time::Instant::now() + Duration::from_secs(1);
            while tokio::time::Instant::now() < end {
                if let Ok(Message::Ping) = protocol::read_message(&mut r).await {
                    let _ = write_message(&mut w, &Message::Pong).await;
                }
            }
            // Frozen: holds the connection, answers nothing.
            tokio::time::sleep(Duration::from_secs(10)).await;
            drop((r, w));
        });
        let got = tokio::time::timeout(Duration::from_secs(5), ch.inbox.recv()).await.expect("no verdict in 5 s");
        assert!(matches!(got, Some(Err(ProtocolError::Silent(_)))), "{got:?}");
        peer.abort();
    }

    /// A peer that goes silent right after an answer the consumer takes only
    /// later is still found silent (the wait for the consumer is not the
    /// peer's silence, but the peer's silence after it is).
    #[tokio::test]
    async fn silence_after_an_answer_not_yet_taken_is_found() {
        let (a, b) = tokio::io::duplex(1 << 16);
        let t = Duration::from_millis(300);
        let mut ch = Channel::new(a, Some(Heartbeat::pinging(t)));
        let (_r, mut w) = tokio::io::split(b);
        write_message(&mut w, &Message::Ok).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(matches!(ch.inbox.recv().await, Some(Ok(Message::Ok))));
        let got = tokio::time::timeout(Duration::from_secs(5), ch.inbox.recv()).await.expect("no verdict in 5 s");
        assert!(matches!(got, Some(Err(ProtocolError::Silent(_)))), "{got:?}");
    }

    /// Two live ends keep each other alive past the timeout, requests and
    /// answers going through.
    #[tokio::test]
    async fn live_peers_stay_connected() {
        let (a, b) = tokio::io::duplex(1 << 16);
        let t = Duration::from_millis(300);
        let mut client = Channel::new(a, Some(Heartbeat::pinging(t)));
        let mut server = Channel::serving(b, Some(Heartbeat::answering(t)), 4);
        client.out.send(Message::CapacityQuery).unwrap();
        assert!(matches!(server.inbox.recv().await, Some(Ok(Message::CapacityQuery))));
        server.out.send(Message::Ok).unwrap();
        assert!(matches!(client.inbox.recv().await, Some(Ok(Message::Ok))));
        let quiet = tokio::time::timeout(Duration::from_secs(2), client.inbox.recv()).await;
        assert!(quiet.is_err(), "the client lost a live server: {quiet:?}");
        let quiet = tokio::time::timeout(Duration::from_millis(100), server.inbox.recv()).await;
        assert!(quiet.is_err(), "the server lost a live client: {quiet:?}");
    }
}
