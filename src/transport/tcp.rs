//! TCP data plane: several parallel streams of page frames (see
//! [`crate::protocol::data`]) written by the receiver straight into the
//! mapped guest RAM, each frame bounds-checked first.

use super::{Batch, Completion, Feed, SendQueue, TransportError};
use crate::dirty::SendObserver;
use crate::memory::{GuestRam, PAGE_SIZE};
use crate::protocol::data::*;
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;

/// Batches a stream may have sent but not yet seen applied.
const WINDOW: usize = 8;

/// A destination's view of one session: where its frames go.
pub struct Receiving {
    pub ram: Arc<GuestRam>,
    pub cancel: CancellationToken,
    /// The RAM registered for RDMA writes, when this session offers RDMA.
    pub rdma: std::sync::OnceLock<Arc<super::rdma::Target>>,
    senders: Mutex<HashMap<u8, SenderStreams>>,
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

    /// Cuts every stream of `sender` (and refuses new ones) and returns once
    /// none of its frames can still be written: a frame is written only
    /// after it was read whole, and never across an await, so a cut stream
    /// task stops between frames.
    pub async fn fence(&self, sender: u8) -> Result<(), TransportError> {
        let s = self.sender(sender);
        s.cut.cancel();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        // Our own clone plus the registry's: anything more is a live stream.
        while Arc::strong_count(&s.live) > 2 {
            if tokio::time::Instant::now() > deadline {
                return Err(TransportError::Stream(format!("streams of sender {sender} did not stop")));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(())
    }
}

/// The receiving side: one listener per agent, sessions found by token.
#[derive(Default, Clone)]
pub struct Receiver {
    sessions: Arc<Mutex<HashMap<Token, Arc<Receiving>>>>,
}

impl Receiver {
    pub fn add(&self, token: Token, ram: Arc<GuestRam>) -> Arc<Receiving> {
        let r = Arc::new(Receiving {
            ram,
            cancel: CancellationToken::new(),
            rdma: std::sync::OnceLock::new(),
            senders: Mutex::new(HashMap::new()),
        });
        self.sessions.lock().unwrap().insert(token, r.clone());
        r
    }

    /// Forgets a session and cuts its streams.
    pub fn remove(&self, token: &Token) {
        if let Some(r) = self.sessions.lock().unwrap().remove(token) {
            r.cancel.cancel();
        }
    }

    pub async fn serve(self, listener: TcpListener) {
        loop {
            let Ok((s, peer)) = listener.accept().await else {
                continue;
            };
            let me = self.clone();
            tokio::spawn(async move {
                if let Err(e) = me.serve_stream(s).await {
                    tracing::warn!(%peer, "data stream: {e}");
                }
            });
        }
    }

    async fn serve_stream(&self, mut s: TcpStream) -> Result<(), TransportError> {
        let err = |e: std::io::Error| TransportError::Stream(e.to_string());
        s.set_nodelay(true).ok();
        let mut hello = [0u8; HELLO_LEN];
        tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut hello))
            .await
            .map_err(|_| TransportError::Stream("no hello within 10 s".into()))?
            .map_err(err)?;
        let Hello { version, sender, mode, token } =
            decode_hello(&hello).map_err(|e| TransportError::Stream(e.to_string()))?;
        if version != DATA_VERSION {
            s.write_all(&[HELLO_BAD_VERSION]).await.ok();
            return Err(TransportError::Refused(format!("data protocol version {version}")));
        }
        let Some(sess) = self.sessions.lock().unwrap().get(&token).cloned() else {
            s.write_all(&[HELLO_BAD_TOKEN]).await.ok();
            return Err(TransportError::Refused("unknown session token".into()));
        };
        let streams = sess.sender(sender);
        // Counted as live before the check: a fence that cut this sender
        // after the check still waits for this stream.
        let _alive = streams.live.clone();
        if streams.cut.is_cancelled() {
            s.write_all(&[HELLO_FENCED]).await.ok();
            return Err(TransportError::Refused(format!("sender {sender} is fenced")));
        }
        match mode {
            MODE_TCP => {}
            // Pairs a queue pair; answers the hello itself.
            MODE_RDMA => return super::rdma::serve_stream(&sess, s, streams.cut.clone()).await,
            other => {
                s.write_all(&[HELLO_BAD_VERSION]).await.ok();
                return Err(TransportError::Refused(format!("data stream mode {other}")));
            }
        }
        s.write_all(&[HELLO_OK]).await.map_err(err)?;
        tokio::select! {
            r = Self::apply_frames(&sess, &mut s) => r,
            _ = sess.cancel.cancelled() => Ok(()),
            _ = streams.cut.cancelled() => Ok(()),
        }
    }

    async fn apply_frames(sess: &Receiving, s: &mut TcpStream) -> Result<(), TransportError> {
        let err = |e: std::io::Error| TransportError::Stream(e.to_string());
        let mut header = [0u8; HEADER_LEN];
        let mut buf = Vec::new();
        loop {
            match s.read_exact(&mut header).await {
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
                r => r.map_err(err)?,
            };
            let frame = match Frame::decode(&header) {
                Ok(f) => f,
                Err(e) => {
                    s.write_all(&Reply::Error { code: ERR_BAD_FRAME }.encode()).await.ok();
                    return Err(TransportError::Stream(e.to_string()));
                }
            };
            match frame {
                Frame::Pages { region, offset, len } => {
                    if let Err(e) = sess.ram.target(region, offset, len as u64) {
                        s.write_all(&Reply::Error { code: ERR_OUT_OF_BOUNDS }.encode()).await.ok();
                        return Err(TransportError::Stream(e.to_string()));
                    }
                    // Into a buffer, then pwrite: see GuestRam::write_at.
                    buf.resize(len as usize, 0);
                    s.read_exact(&mut buf).await.map_err(err)?;
                    sess.ram.write_at(region, offset, &buf).map_err(|e| TransportError::Stream(e.to_string()))?;
                }
                Frame::BatchEnd { batch } => {
                    s.write_all(&Reply::Applied { batch }.encode()).await.map_err(err)?;
                }
            }
        }
    }
}

/// A data-plane connection to `addr` (10 s to connect, no Nagle delay).
pub(super) async fn dial(addr: SocketAddr) -> Result<TcpStream, TransportError> {
    let s = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(addr))
        .await
        .map_err(|_| TransportError::Connect { addr: addr.to_string(), source: std::io::ErrorKind::TimedOut.into() })?
        .map_err(|source| TransportError::Connect { addr: addr.to_string(), source })?;
    s.set_nodelay(true).ok();
    Ok(s)
}

/// The sending side: opens `streams` authenticated data streams to `addr`
/// (one queue they all pull batches from), as sending host
/// `sender`. Pages are read from `ram`; `observer` (if any) sees every
/// page read.
#[allow(clippy::too_many_arguments)]
pub async fn connect(
    addr: SocketAddr,
    token: Token,
    sender: u8,
    streams: usize,
    ram: Arc<GuestRam>,
    observer: Option<Arc<dyn SendObserver>>,
    completions: mpsc::UnboundedSender<Completion>,
) -> Result<SendQueue, TransportError> {
    let q = SendQueue::new("tcp", streams.max(1) * WINDOW, completions);
    for _ in 0..streams.max(1) {
        let mut s = dial(addr).await?;
        let e = |e: std::io::Error| TransportError::Stream(e.to_string());
        s.write_all(&encode_hello(&token, sender)).await.map_err(e)?;
        let mut status = [0u8; 1];
        s.read_exact(&mut status).await.map_err(e)?;
        match status[0] {
            HELLO_OK => {}
            HELLO_BAD_TOKEN => return Err(TransportError::Refused("bad session token".into())),
            HELLO_FENCED => return Err(TransportError::Refused("this sender was fenced".into())),
            other => return Err(TransportError::Refused(format!("status {other}"))),
        }
        let stream = Stream {
            ram: ram.clone(),
            observer: observer.clone(),
            feed: q.feed.clone(),
            inflight: Arc::new(Mutex::new(VecDeque::new())),
            window: Arc::new(Semaphore::new(WINDOW)),
        };
        tokio::spawn(stream.run(s));
    }
    Ok(q)
}

struct Stream {
    ram: Arc<GuestRam>,
    observer: Option<Arc<dyn SendObserver>>,
    feed: Feed,
    inflight: Arc<Mutex<VecDeque<Batch>>>,
    window: Arc<Semaphore>,
}

impl Stream {
    async fn run(self, s: TcpStream) {
        let (mut rd, mut wr) = s.into_split();
        let reader = {
            let inflight = self.inflight.clone();
            let completions = self.feed.completions.clone();
            let window = self.window.clone();
            async move {
                let mut reply = [0u8; REPLY_LEN];
                loop {
                    rd.read_exact(&mut reply).await.map_err(|e| e.to_string())?;
                    match Reply::decode(&reply).map_err(|e| e.to_string())? {
                        Reply::Applied { batch } => {
                            let b = inflight.lock().unwrap().pop_front();
                            match b {
                                Some(b) if b.id == batch => {
                                    window.add_permits(1);
                                    let _ = completions.send(Completion::Applied(b));
                                }
                                _ => return Err::<(), String>(format!("unexpected acknowledgement of batch {batch}")),
                            }
                        }
                        Reply::Error { code } => return Err(format!("receiver rejected a frame (code {code})")),
                    }
                }
            }
        };
        let writer = async {
            let mut buf = Vec::with_capacity(4 << 20);
            loop {
                let permit = self.window.acquire().await.map_err(|e| e.to_string())?;
                permit.forget();
                let Ok(batch) = self.feed.backlog.recv().await else {
                    return Ok::<(), String>(());
                };
                self.inflight.lock().unwrap().push_back(batch.clone());
                let max_pages = MAX_PAYLOAD as usize / PAGE_SIZE;
                let pieces = batch.runs.iter().flat_map(|r| {
                    (0..r.pages).step_by(max_pages).map(move |i| (r.first_page + i, max_pages.min(r.pages - i)))
                });
                for (first, pages) in pieces {
                    buf.clear();
                    self.ram.read_pages(first, pages, &mut buf).map_err(|e| e.to_string())?;
                    if let Some(o) = &self.observer {
                        for (i, page) in buf.chunks_exact(PAGE_SIZE).enumerate() {
                            o.observe(first + i, page);
                        }
                    }
                    let (region, offset) = self.ram.layout().locate(first);
                    let h = Frame::Pages { region, offset, len: buf.len() as u32 }.encode();
                    wr.write_all(&h).await.map_err(|e| e.to_string())?;
                    wr.write_all(&buf).await.map_err(|e| e.to_string())?;
                    self.feed.bytes.fetch_add(buf.len() as u64, Ordering::Relaxed);
                }
                wr.write_all(&Frame::BatchEnd { batch: batch.id }.encode()).await.map_err(|e| e.to_string())?;
            }
        };
        let result = tokio::select! {
            r = reader => r,
            r = writer => match r {
                // all batches written: wait for the last acknowledgements
                Ok(()) => Ok(()),
                Err(e) => Err(e),
            },
            _ = self.feed.cancel.cancelled() => Err("sender closed".into()),
        };
        let why = match result {
            Ok(()) => "stream ended".to_string(),
            Err(e) => e,
        };
        let inflight: Vec<Batch> = self.inflight.lock().unwrap().drain(..).collect();
        self.feed.fail(inflight, &why);
    }
}
