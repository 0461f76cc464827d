//! RDMA data plane (built with the `rdma` feature; the `rdma/` crate does
//! the verbs). Guest RAM is registered on every host involved: a
//! destination's for remote writes, a sender's (source or forwarder) for
//! local reads. Region addresses and keys travel only in control messages
//! (mTLS). Each stream is a queue pair paired through a data-plane TCP
//! connection, which authenticates with the session token like a TCP stream
//! and then carries only the destination's acknowledgements:
//!
//! ```text
//! sender -> receiver:  hello(token, sender, mode = RDMA)
//! receiver -> sender:  status (HELLO_OK, or HELLO_NO_RDMA)
//! sender -> receiver:  endpoint [32] (qpn, psn, lid, gid)
//! receiver -> sender:  endpoint [32]        (both queue pairs now connected)
//! sender ==RDMA WRITE (page runs), WRITE_WITH_IMM(seq)==> receiver's RAM
//! receiver -> sender:  reply Applied{seq}    (on the WRITE_WITH_IMM's receive completion)
//! ```
//! A destination fences a sender by moving its queue pairs to the error
//! state before the fence is confirmed; the TCP connection closing tells the
//! sender, which errors its own queue pairs and fails what was in flight.

use super::tcp::Receiving;
use super::{Completion, SendQueue, TransportError};
use crate::dirty::SendObserver;
use crate::memory::GuestRam;
use crate::protocol::data::*;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// A destination's registered RAM region, as handed to its senders.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct RdmaRegion {
    pub addr: u64,
    pub len: u64,
    pub rkey: u32,
}

#[cfg(feature = "rdma")]
pub use imp::*;
#[cfg(not(feature = "rdma"))]
pub use off::*;

/// What a build without the `rdma` feature offers: nothing, with a reason.
#[cfg(not(feature = "rdma"))]
mod off {
    use super::*;

    const WHY: &str = "this dcmigrate was built without the `rdma` feature";

    pub enum Rdma {}
    pub enum Target {}

    pub fn open(_device: Option<&str>) -> Result<Arc<Rdma>, String> {
        Err(WHY.into())
    }

    impl Rdma {
        pub fn name(&self) -> String {
            match *self {}
        }
        pub fn register_target(&self, _ram: &Arc<GuestRam>) -> Result<Arc<Target>, String> {
            match *self {}
        }
    }

    impl Target {
        pub fn offer(&self) -> Vec<RdmaRegion> {
            match *self {}
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub async fn connect(
        rdma: &Arc<Rdma>,
        _addr: SocketAddr,
        _token: Token,
        _sender: u8,
        _streams: usize,
        _ram: Arc<GuestRam>,
        _remote: &[RdmaRegion],
        _observer: Option<Arc<dyn SendObserver>>,
        _completions: mpsc::UnboundedSender<Completion>,
    ) -> Result<SendQueue, TransportError> {
        match **rdma {}
    }

    pub async fn serve_stream(
        _sess: &Receiving,
        mut s: TcpStream,
        _cut: CancellationToken,
    ) -> Result<(), TransportError> {
        use tokio::io::AsyncWriteExt;
        s.write_all(&[HELLO_NO_RDMA]).await.ok();
        Err(TransportError::Refused(WHY.into()))
    }
}

#[cfg(feature = "rdma")]
mod imp {
    use super::*;
    use crate::memory::PAGE_SIZE;
    use crate::transport::{Batch, Feed};
    use dcmigrate_rdma::{CompletionKind, Device, Endpoint, QueuePair, Region, Write, ENDPOINT_LEN};
    use std::collections::VecDeque;
    use std::sync::Mutex;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::sync::Semaphore;

    /// Batches a queue pair may have posted but not yet seen applied.
    const WINDOW: usize = 4;
    /// Batches a stream may queue before posting (callers' windows are smaller).
    const QUEUE_PER_STREAM: usize = 16;
    /// Receives kept posted at a destination (each consumes one WRITE_WITH_IMM).
    const RECV_DEPTH: u32 = 64;
    /// Send queue: a batch is at most one write per page plus the immediate.
    const SEND_DEPTH: u32 = (WINDOW as u32) * (crate::memory::DEFAULT_CHUNK_SIZE as u32 / PAGE_SIZE as u32 + 1) * 2;

    /// This host's RDMA device.
    pub struct Rdma {
        device: Arc<Device>,
    }

    /// Opens the named device, or the first with an active port.
    pub fn open(device: Option<&str>) -> Result<Arc<Rdma>, String> {
        Device::open(device).map(|device| Arc::new(Rdma { device })).map_err(|e| e.to_string())
    }

    impl Rdma {
        pub fn name(&self) -> String {
            self.device.name().to_owned()
        }

        /// Registers a destination's RAM for remote writes.
        pub fn register_target(&self, ram: &Arc<GuestRam>) -> Result<Arc<Target>, String> {
            // A protection domain per session: another session's queue pairs cannot write here.
            let device = self.device.session().map_err(|e| e.to_string())?;
            Ok(Arc::new(Target { regions: register(&device, ram, true)?, device, ram: ram.clone() }))
        }
    }

    fn register(device: &Device, ram: &GuestRam, remote_write: bool) -> Result<Vec<Region>, String> {
        (0..ram.layout().regions().len() as u32)
            .map(|r| {
                let bytes = ram.region_bytes(r);
                // SAFETY: the mapping lives as long as `ram`, which every
                // holder of these regions also holds.
                unsafe { device.register(bytes.as_ptr().cast_mut(), bytes.len(), remote_write) }
                    .map_err(|e| e.to_string())
            })
            .collect()
    }

    /// A destination's registered RAM.
    pub struct Target {
        device: Arc<Device>,
        // Before `ram`: the registrations go first.
        regions: Vec<Region>,
        #[allow(dead_code)]
        ram: Arc<GuestRam>,
    }

    impl Target {
        pub fn offer(&self) -> Vec<RdmaRegion> {
            self.regions.iter().map(|r| RdmaRegion { addr: r.addr(), len: r.len(), rkey: r.rkey() }).collect()
        }
    }

    fn stream_err(e: impl std::fmt::Display) -> TransportError {
        TransportError::Stream(e.to_string())
    }

    /// A destination's side of one RDMA stream (after the hello was checked).
    pub async fn serve_stream(
        sess: &Receiving,
        mut s: TcpStream,
        cut: CancellationToken,
    ) -> Result<(), TransportError> {
        let Some(t) = sess.rdma.get().cloned() else {
            s.write_all(&[HELLO_NO_RDMA]).await.ok();
            return Err(TransportError::Refused("no RDMA for this session".into()));
        };
        let qp = QueuePair::new(&t.device, 1, RECV_DEPTH, true).map_err(stream_err)?;
        s.write_all(&[HELLO_OK]).await.map_err(stream_err)?;
        let mut ep = [0u8; ENDPOINT_LEN];
        tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut ep))
            .await
            .map_err(|_| stream_err("no queue pair endpoint within 10 s"))?
            .map_err(stream_err)?;
        let remote = Endpoint::decode(&ep).map_err(stream_err)?;
        qp.connect(&remote).map_err(stream_err)?;
        qp.post_recvs(0, RECV_DEPTH).map_err(stream_err)?;
        s.write_all(&qp.endpoint().encode()).await.map_err(stream_err)?;
        let (mut rd, mut wr) = s.split();
        let acks = async {
            loop {
                for c in qp.completions().await.map_err(stream_err)? {
                    match c.result {
                        Ok(CompletionKind::Received { imm }) => {
                            wr.write_all(&Reply::Applied { batch: imm as u64 }.encode()).await.map_err(stream_err)?;
                            qp.post_recvs(0, 1).map_err(stream_err)?;
                        }
                        Ok(CompletionKind::Sent) => {}
                        Err(e) => return Err(stream_err(format!("receive failed: {e}"))),
                    }
                }
            }
        };
        // The sender sends nothing more on TCP: reading only notices it leave.
        let gone = async {
            let mut b = [0u8; 1];
            let _ = rd.read(&mut b).await;
            Ok::<(), TransportError>(())
        };
        let r = tokio::select! {
            r = acks => r,
            r = gone => r,
            _ = sess.cancel.cancelled() => Ok(()),
            _ = cut.cancelled() => Ok(()),
        };
        // Before the fence (or session end) is confirmed: nothing more lands.
        if let Err(e) = qp.set_error() {
            tracing::warn!("fencing a queue pair: {e}");
        }
        r
    }

    /// Registers `ram` for local reads and opens `streams` queue pairs to the
    /// destination at `addr`, whose registered RAM is `remote`.
    #[allow(clippy::too_many_arguments)]
    pub async fn connect(
        rdma: &Arc<Rdma>,
        addr: SocketAddr,
        token: Token,
        sender: u8,
        streams: usize,
        ram: Arc<GuestRam>,
        remote: &[RdmaRegion],
        observer: Option<Arc<dyn SendObserver>>,
        completions: mpsc::UnboundedSender<Completion>,
    ) -> Result<SendQueue, TransportError> {
        let regions = ram.layout().regions();
        if remote.len() != regions.len() || remote.iter().zip(regions).any(|(r, l)| r.len != l.size) {
            return Err(TransportError::Refused("the destination's registered RAM does not match the layout".into()));
        }
        let local = {
            let (d, r) = (rdma.device.clone(), ram.clone());
            tokio::task::spawn_blocking(move || register(&d, &r, false))
                .await
                .map_err(stream_err)?
                .map_err(|e| TransportError::Refused(format!("registering local RAM: {e}")))?
        };
        let local = Arc::new(local);
        // Room for what callers keep outstanding (more than the posting window).
        let q = SendQueue::new("rdma", streams.max(1) * QUEUE_PER_STREAM, completions);
        for _ in 0..streams.max(1) {
            let s = super::super::tcp::dial(addr).await?;
            let (qp, s) = pair(&rdma.device, s, &token, sender).await?;
            let stream = Stream {
                ram: ram.clone(),
                local: local.clone(),
                remote: remote.to_vec(),
                observer: observer.clone(),
                feed: q.feed.clone(),
                inflight: Mutex::new(VecDeque::new()),
                window: Semaphore::new(WINDOW),
                qp,
            };
            tokio::spawn(stream.run(s));
        }
        Ok(q)
    }

    /// Hello, then the endpoint exchange: a connected queue pair.
    async fn pair(
        device: &Arc<Device>,
        mut s: TcpStream,
        token: &Token,
        sender: u8,
    ) -> Result<(QueuePair, TcpStream), TransportError> {
        s.set_nodelay(true).ok();
        s.write_all(&encode_hello_mode(token, sender, MODE_RDMA)).await.map_err(stream_err)?;
        let mut status = [0u8; 1];
        s.read_exact(&mut status).await.map_err(stream_err)?;
        match status[0] {
            HELLO_OK => {}
            HELLO_BAD_TOKEN => return Err(TransportError::Refused("bad session token".into())),
            HELLO_FENCED => return Err(TransportError::Refused("this sender was fenced".into())),
            HELLO_NO_RDMA => {
                return Err(TransportError::Refused("the destination offers no RDMA for this session".into()))
            }
            other => return Err(TransportError::Refused(format!("status {other}"))),
        }
        let qp = QueuePair::new(device, SEND_DEPTH, 1, false).map_err(stream_err)?;
        s.write_all(&qp.endpoint().encode()).await.map_err(stream_err)?;
        let mut ep = [0u8; ENDPOINT_LEN];
        tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut ep))
            .await
            .map_err(|_| stream_err("no endpoint from the destination within 10 s"))?
            .map_err(stream_err)?;
        qp.connect(&Endpoint::decode(&ep).map_err(stream_err)?).map_err(stream_err)?;
        Ok((qp, s))
    }

    // Field order is drop order: the queue pair and the registrations go
    // before the mapping they point into.
    struct Stream {
        qp: QueuePair,
        local: Arc<Vec<Region>>,
        ram: Arc<GuestRam>,
        remote: Vec<RdmaRegion>,
        observer: Option<Arc<dyn SendObserver>>,
        feed: Feed,
        inflight: Mutex<VecDeque<(u32, Batch)>>,
        window: Semaphore,
    }

    impl Stream {
        /// The writes of one batch: one per run (a run is contiguous in both
        /// RAMs, chunks never span regions).
        fn writes(&self, b: &Batch) -> Result<Vec<Write>, String> {
            b.runs
                .iter()
                .map(|r| {
                    let (region, offset) = self.ram.layout().locate(r.first_page);
                    let len = (r.pages * PAGE_SIZE) as u64;
                    let (l, rem) = (&self.local[region as usize], self.remote[region as usize]);
                    if offset + len > l.len() || offset + len > rem.len {
                        return Err(format!("run at page {} is outside region {region}", r.first_page));
                    }
                    Ok(Write {
                        local_addr: l.addr() + offset,
                        len: len as u32,
                        lkey: l.lkey(),
                        remote_addr: rem.addr + offset,
                        rkey: rem.rkey,
                    })
                })
                .collect()
        }

        async fn run(self, s: TcpStream) {
            let (mut rd, _wr) = s.into_split();
            let acks = async {
                let mut reply = [0u8; REPLY_LEN];
                loop {
                    rd.read_exact(&mut reply).await.map_err(|e| format!("destination closed the stream: {e}"))?;
                    match Reply::decode(&reply).map_err(|e| e.to_string())? {
                        Reply::Applied { batch } => {
                            let b = self.inflight.lock().unwrap().pop_front();
                            match b {
                                Some((seq, b)) if seq as u64 == batch => {
                                    self.window.add_permits(1);
                                    let _ = self.feed.completions.send(Completion::Applied(b));
                                }
                                other => {
                                    // Put it back: the teardown fails it, so no batch is lost.
                                    if let Some(x) = other {
                                        self.inflight.lock().unwrap().push_front(x);
                                    }
                                    return Err::<(), String>(format!("unexpected acknowledgement {batch}"));
                                }
                            }
                        }
                        Reply::Error { code } => return Err(format!("destination error {code}")),
                    }
                }
            };
            let local_completions = async {
                loop {
                    for c in self.qp.completions().await.map_err(|e| e.to_string())? {
                        if let Err(e) = c.result {
                            return Err::<(), String>(format!("RDMA write failed: {e}"));
                        }
                    }
                }
            };
            let writer = async {
                let mut seq: u32 = 0;
                loop {
                    self.window.acquire().await.map_err(|e| e.to_string())?.forget();
                    let Ok(batch) = self.feed.backlog.recv().await else {
                        // Queue closed: wait for the last acknowledgements.
                        return std::future::pending::<Result<(), String>>().await;
                    };
                    let writes = match self.writes(&batch) {
                        Ok(w) => w,
                        Err(e) => {
                            self.inflight.lock().unwrap().push_back((0, batch));
                            return Err(e);
                        }
                    };
                    if let Some(o) = &self.observer {
                        // The NIC reads the memory, not us: show the tracker what it will read.
                        for p in batch.pages() {
                            o.observe(p, self.ram.page_bytes(p));
                        }
                    }
                    seq = seq.wrapping_add(1);
                    let bytes: u64 = writes.iter().map(|w| w.len as u64).sum();
                    self.inflight.lock().unwrap().push_back((seq, batch));
                    let target = (self.remote[0].addr, self.remote[0].rkey);
                    self.qp.post_batch(seq as u64, &writes, seq, target).map_err(|e| e.to_string())?;
                    self.feed.bytes.fetch_add(bytes, std::sync::atomic::Ordering::Relaxed);
                }
            };
            let why = tokio::select! {
                r = acks => r,
                r = local_completions => r,
                r = writer => r,
                _ = self.feed.cancel.cancelled() => Err("sender closed".into()),
            }
            .err()
            .unwrap_or_else(|| "stream ended".into());
            if !self.feed.cancel.is_cancelled() {
                tracing::warn!("RDMA stream failed: {why}");
            }
            // Nothing more leaves this queue pair; fail what it had.
            let _ = self.qp.set_error();
            let inflight: Vec<Batch> = self.inflight.lock().unwrap().drain(..).map(|(_, b)| b).collect();
            self.feed.fail(inflight, &why);
        }
    }
}
