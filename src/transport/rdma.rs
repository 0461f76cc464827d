//! RDMA data plane (built with the `rdma` feature; the `rdma/` crate does
//! the verbs). Guest RAM is registered on every host involved: a
//! destination's for remote writes, a sender's (source or forwarder) for
//! local reads. Region addresses and keys travel only in control messages
//! (mTLS). Each stream is a queue pair paired through a data-plane TCP
//! connection, which authenticates with the session token like a TCP stream
//! and then carries only the destination's acknowledgements:
//!
//! ```text
//! sender -> receiver:  hello(token, sender, mode = Rdma)
//! receiver -> sender:  status (Ok, or NoRdma)
//! sender -> receiver:  endpoint [32] (qpn, psn, lid, gid)
//! receiver -> sender:  endpoint [32]        (both queue pairs now connected)
//! sender ==RDMA WRITE (page runs), WRITE_WITH_IMM(seq)==> receiver's RAM
//! receiver -> sender:  reply Applied{seq}    (on the WRITE_WITH_IMM's receive completion)
//! ```
//! A destination fences a sender by moving its queue pairs to the error
//! state before the fence is confirmed; the TCP connection closing tells the
//! sender, which errors its own queue pairs and fails what was in flight.

use super::queue::{SendQueue, StreamSpec};
use super::secure::DataStream;
use super::{Stop, TransportError};
use crate::memory::GuestRam;
use crate::protocol::RdmaRegion;
use std::sync::Arc;

#[cfg(feature = "rdma")]
pub use imp::*;
#[cfg(not(feature = "rdma"))]
pub use off::*;

/// What a build without the `rdma` feature offers: nothing, with a reason.
#[cfg(not(feature = "rdma"))]
mod off {
    use super::*;

    const WHY: &str = "this dcmigrate was built without the `rdma` feature";

    /// This host's RDMA device (none in this build).
    pub enum Rdma {}
    /// A destination's registered RAM (none in this build).
    pub enum Target {}

    /// Always fails: this build has no RDMA.
    pub fn open(_device: Option<&str>) -> Result<Arc<Rdma>, String> {
        Err(WHY.into())
    }

    impl Rdma {
        /// The device's name.
        pub fn name(&self) -> String {
            match *self {}
        }
        /// Registers a destination's RAM for remote writes.
        pub fn register_target(&self, _ram: &Arc<GuestRam>) -> Result<Arc<Target>, String> {
            match *self {}
        }
    }

    impl Target {
        /// What senders need to write into it.
        pub fn offer(&self) -> Vec<RdmaRegion> {
            match *self {}
        }
    }

    /// Opens the sender's queue pairs.
    pub async fn connect(
        rdma: &Arc<Rdma>,
        _spec: StreamSpec,
        _remote: &[RdmaRegion],
    ) -> Result<SendQueue, TransportError> {
        match **rdma {}
    }

    /// Serves one RDMA stream at a destination.
    pub async fn serve(target: &Target, _s: DataStream, _stop: Stop) -> Result<(), TransportError> {
        match *target {}
    }
}

#[cfg(feature = "rdma")]
mod imp {
    use super::*;
    use crate::memory::PAGE_SIZE;
    use crate::protocol::data::{Hello, HelloStatus, Reply, StreamMode};
    use crate::protocol::DataPlane;
    use crate::transport::batch::Batch;
    use crate::transport::handshake::{self, HANDSHAKE_TIMEOUT};
    use crate::transport::inflight::InFlight;
    use crate::transport::queue::Feed;
    use dcmigrate_rdma::{CompletionKind, Device, Endpoint, QueuePair, RdmaError, Region, Write, ENDPOINT_LEN};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Batches a queue pair may have posted but not yet seen applied.
    const WINDOW: usize = 4;
    /// Batches a stream may queue before posting (callers' windows are smaller).
    const QUEUE_PER_STREAM: usize = 16;
    /// Receives kept posted at a destination (each consumes one WRITE_WITH_IMM).
    const RECV_DEPTH: u32 = 64;
    /// Work requests a send queue is sized for at most.
    const MAX_SEND_DEPTH: usize = 8192;

    /// Work requests of one batch at worst (runs alternate with gaps: one
    /// write per two pages), plus its WRITE_WITH_IMM; and how many batches
    /// fit a send queue of at most [`MAX_SEND_DEPTH`].
    fn send_sizing(chunk_size: u64) -> (usize, u32) {
        let per_batch = (chunk_size as usize / PAGE_SIZE).div_ceil(2) + 1;
        let window = (MAX_SEND_DEPTH / per_batch).clamp(1, WINDOW);
        (window, (window * per_batch) as u32)
    }

    fn rdma_err(e: RdmaError) -> TransportError {
        TransportError::Rdma(crate::error_chain(&e))
    }

    /// This host's RDMA device.
    pub struct Rdma {
        device: Arc<Device>,
    }

    /// Opens the named device, or the first with an active port.
    pub fn open(device: Option<&str>) -> Result<Arc<Rdma>, String> {
        Device::open(device).map(|device| Arc::new(Rdma { device })).map_err(|e| e.to_string())
    }

    impl Rdma {
        /// The device's name.
        pub fn name(&self) -> String {
            self.device.name().to_owned()
        }

        /// Registers a destination's RAM for remote writes.
        pub fn register_target(&self, ram: &Arc<GuestRam>) -> Result<Arc<Target>, String> {
            // A protection domain per session: another session's queue pairs cannot write here.
            let device = self.device.session().map_err(|e| e.to_string())?;
            Ok(Arc::new(Target { regions: register(&device, ram, true)?, device, _ram: ram.clone() }))
        }
    }

    fn register(device: &Device, ram: &GuestRam, remote_write: bool) -> Result<Vec<Region>, String> {
        (0..ram.layout().regions().len() as u32)
            .map(|r| {
                let (ptr, len) = ram.region_raw(r).ok_or("no such region")?;
                // SAFETY: the mapping lives as long as `ram`, which every
                // holder of these regions also holds (and drops after them).
                unsafe { device.register(ptr, len, remote_write) }.map_err(|e| e.to_string())
            })
            .collect()
    }

    /// A destination's registered RAM.
    pub struct Target {
        device: Arc<Device>,
        // Before `_ram`: the registrations go first.
        regions: Vec<Region>,
        _ram: Arc<GuestRam>,
    }

    impl Target {
        /// What senders need to write into it.
        pub fn offer(&self) -> Vec<RdmaRegion> {
            self.regions.iter().map(|r| RdmaRegion { addr: r.addr(), len: r.len(), rkey: r.rkey() }).collect()
        }
    }

    /// Reads the peer's endpoint from the pairing connection.
    async fn read_endpoint(s: &mut DataStream) -> Result<Endpoint, TransportError> {
        let mut ep = [0u8; ENDPOINT_LEN];
        tokio::time::timeout(HANDSHAKE_TIMEOUT, s.read_exact(&mut ep))
            .await
            .map_err(|_| TransportError::Timeout { what: "the peer's queue pair endpoint" })?
            .map_err(|source| TransportError::Io { what: "reading a queue pair endpoint", source })?;
        Endpoint::decode(&ep).map_err(rdma_err)
    }

    async fn write_endpoint(s: &mut DataStream, qp: &QueuePair) -> Result<(), TransportError> {
        let io = |source| TransportError::Io { what: "sending a queue pair endpoint", source };
        s.write_all(&qp.endpoint().encode()).await.map_err(io)?;
        s.flush().await.map_err(io)
    }

    /// A destination's side of one RDMA stream (after the hello was checked):
    /// acknowledges each batch when its WRITE_WITH_IMM arrives, until the
    /// sender leaves or `stop` says so; then nothing more can land.
    pub async fn serve(t: &Target, mut s: DataStream, stop: Stop) -> Result<(), TransportError> {
        let qp = QueuePair::new(&t.device, 1, RECV_DEPTH, true).map_err(rdma_err)?;
        handshake::answer(&mut s, HelloStatus::Ok).await?;
        let remote = read_endpoint(&mut s).await?;
        qp.connect(&remote).map_err(rdma_err)?;
        qp.post_recvs(0, RECV_DEPTH).map_err(rdma_err)?;
        write_endpoint(&mut s, &qp).await?;
        let (mut rd, mut wr) = tokio::io::split(s);
        let acks = async {
            loop {
                for c in qp.completions().await.map_err(rdma_err)? {
                    match c.result {
                        Ok(CompletionKind::Received { imm }) => {
                            let io = |source| TransportError::Io { what: "acknowledging a batch", source };
                            wr.write_all(&Reply::Applied { batch: imm as u64 }.encode()).await.map_err(io)?;
                            wr.flush().await.map_err(io)?;
                            qp.post_recvs(0, 1).map_err(rdma_err)?;
                        }
                        Ok(CompletionKind::Sent) => {}
                        Err(e) => return Err(TransportError::Rdma(format!("receive failed: {e}"))),
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
            _ = stop.wait() => Ok(()),
        };
        // Before the fence (or session end) is confirmed: nothing more lands.
        if let Err(e) = qp.set_error() {
            tracing::warn!("fencing a queue pair: {e}");
        }
        r
    }

    /// Registers the sender's RAM for local reads and opens `spec.streams`
    /// queue pairs to the destination, whose registered RAM is `remote`.
    pub async fn connect(
        rdma: &Arc<Rdma>,
        spec: StreamSpec,
        remote: &[RdmaRegion],
    ) -> Result<SendQueue, TransportError> {
        let regions = spec.ram.layout().regions();
        if remote.len() != regions.len() || remote.iter().zip(regions).any(|(r, l)| r.len != l.size) {
            return Err(TransportError::RdmaLayout);
        }
        let local = {
            let (d, r) = (rdma.device.clone(), spec.ram.clone());
            tokio::task::spawn_blocking(move || register(&d, &r, false))
                .await
                .map_err(|e| TransportError::Rdma(e.to_string()))?
                .map_err(|e| TransportError::Rdma(format!("registering local RAM: {e}")))?
        };
        let local = Arc::new(local);
        let streams = spec.streams.max(1);
        let (window, depth) = send_sizing(spec.ram.layout().chunk_size());
        // Room for what callers keep outstanding (more than the posting window).
        let q = SendQueue::new(DataPlane::Rdma, streams * QUEUE_PER_STREAM, spec.completions.clone());
        for _ in 0..streams {
            let (qp, s) = pair(&rdma.device, &spec, depth).await?;
            let stream = Stream {
                qp,
                local: local.clone(),
                ram: spec.ram.clone(),
                remote: remote.to_vec(),
                observer: spec.observer.clone(),
                feed: q.feed.clone(),
                inflight: InFlight::new(window),
                stall: spec.stall_timeout,
            };
            tokio::spawn(stream.run(s));
        }
        Ok(q)
    }

    /// Hello, then the endpoint exchange: a connected queue pair.
    async fn pair(
        device: &Arc<Device>,
        spec: &StreamSpec,
        depth: u32,
    ) -> Result<(QueuePair, DataStream), TransportError> {
        let hello = Hello::new(spec.token, spec.sender, StreamMode::Rdma);
        let mut s = handshake::open(spec.addr, hello, spec.tls.as_ref()).await?;
        let qp = QueuePair::new(device, depth, 1, false).map_err(rdma_err)?;
        write_endpoint(&mut s, &qp).await?;
        qp.connect(&read_endpoint(&mut s).await?).map_err(rdma_err)?;
        Ok((qp, s))
    }

    // Field order is drop order: the queue pair and the registrations go
    // before the mapping they point into.
    struct Stream {
        qp: QueuePair,
        local: Arc<Vec<Region>>,
        ram: Arc<GuestRam>,
        remote: Vec<RdmaRegion>,
        observer: Option<Arc<dyn crate::dirty::SendObserver>>,
        feed: Feed,
        inflight: InFlight,
        stall: std::time::Duration,
    }

    impl Stream {
        /// The writes of one batch: one per run (a run is contiguous in both
        /// RAMs, chunks never span regions).
        fn writes(&self, b: &Batch) -> Result<Vec<Write>, TransportError> {
            b.runs
                .iter()
                .map(|r| {
                    let (region, offset) = self.ram.layout().locate(r.first_page);
                    let len = (r.pages * PAGE_SIZE) as u64;
                    let (l, rem) = (&self.local[region as usize], self.remote[region as usize]);
                    if offset + len > l.len() || offset + len > rem.len {
                        return Err(TransportError::RunOutside { page: r.first_page, region });
                    }
                    Ok(Write {
                        local_addr: l.addr() + offset,
                        len: len as u32,
                        lkey: l.lkey(),
                        remote_addr: rem
                            .addr
                            .checked_add(offset)
                            .ok_or(TransportError::RunOutside { page: r.first_page, region })?,
                        rkey: rem.rkey,
                    })
                })
                .collect()
        }

        async fn run(self, s: DataStream) {
            let (rd, _wr) = tokio::io::split(s);
            let result = tokio::select! {
                r = self.feed.read_acks(&self.inflight, rd) => r,
                r = self.local_completions() => r,
                r = self.post() => r,
                e = self.inflight.watchdog(self.stall) => Err(e),
                _ = self.feed.cancel.cancelled() => Err(TransportError::Closed),
            };
            // Nothing more leaves this queue pair; fail what it had.
            let _ = self.qp.set_error();
            self.feed.end_stream(&self.inflight, result);
        }

        async fn local_completions(&self) -> Result<(), TransportError> {
            loop {
                for c in self.qp.completions().await.map_err(rdma_err)? {
                    c.result.map_err(|e| TransportError::Rdma(format!("RDMA write failed: {e}")))?;
                }
            }
        }

        /// The NIC reads the memory, not us: show the tracker what it will read.
        fn observe(&self, batch: &Batch, copy: &mut Vec<u8>) -> Result<(), TransportError> {
            if let Some(o) = &self.observer {
                for p in batch.pages() {
                    copy.clear();
                    self.ram.read_pages(p, 1, copy)?;
                    o.observe(p, copy);
                }
            }
            Ok(())
        }

        async fn post(&self) -> Result<(), TransportError> {
            let mut seq: u32 = 0;
            let mut copy = Vec::new();
            loop {
                self.inflight.reserve().await;
                let Ok(batch) = self.feed.backlog.recv().await else {
                    // Queue closed: wait for the last acknowledgements.
                    return std::future::pending().await;
                };
                seq = seq.wrapping_add(1);
                // Whatever fails from here, the batch is in flight, so the
                // stream's end fails it: no batch is lost.
                let writes = self.writes(&batch).and_then(|w| self.observe(&batch, &mut copy).map(|()| w));
                self.inflight.push(seq as u64, batch);
                let writes = writes?;
                let bytes: u64 = writes.iter().map(|w| w.len as u64).sum();
                let target = (self.remote[0].addr, self.remote[0].rkey);
                self.qp.post_batch(seq as u64, &writes, seq, target).map_err(rdma_err)?;
                self.feed.sent(bytes);
            }
        }
    }
}
