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

/// The queue-pair endpoint version this build reads: 1 carries the port's
/// active MTU, so that both ends use the smaller (0 did not: 1024).
pub const ENDPOINT_VERSION: u8 = 1;

/// The operator's RDMA settings (agent options).
#[derive(Clone, Debug, Default)]
pub struct RdmaOptions {
    /// Device to use (default: the first with an active port).
    pub device: Option<String>,
    /// GID index to use on RoCE (default: the port's best RoCEv2 GID).
    pub gid_index: Option<u8>,
    /// Traffic class of the GRH (RoCE: DSCP << 2 | ECN).
    pub traffic_class: u8,
    /// InfiniBand service level (0–15).
    pub service_level: u8,
    /// P_Key index.
    pub pkey_index: u16,
}

/// What is wrong with this process's locked-memory limit for RDMA, if
/// anything: registering guest RAM pins all of it, which the kernel allows
/// beyond RLIMIT_MEMLOCK only with CAP_IPC_LOCK (root has it).
pub fn memlock_problem() -> Option<String> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes into the struct we own.
    let limit = match unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim) } {
        0 if lim.rlim_cur == libc::RLIM_INFINITY => None,
        0 => Some(lim.rlim_cur),
        _ => return None,
    };
    memlock_note(limit, has_cap_ipc_lock())
}

/// Whether CAP_IPC_LOCK is in this process's effective set.
fn has_cap_ipc_lock() -> bool {
    const CAP_IPC_LOCK: u32 = 14;
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("CapEff:").map(|v| v.trim().to_owned())))
        .and_then(|v| u64::from_str_radix(&v, 16).ok())
        .is_some_and(|caps| caps & (1 << CAP_IPC_LOCK) != 0)
}

/// The warning for a locked-memory `limit` in bytes (None: unlimited).
fn memlock_note(limit: Option<u64>, cap_ipc_lock: bool) -> Option<String> {
    let limit = limit?;
    (!cap_ipc_lock).then(|| {
        format!(
            "the locked-memory limit is {} KiB and the agent lacks CAP_IPC_LOCK: registering a guest's RAM for \
             RDMA pins all of it, so RAM larger than that cannot use RDMA (`auto` then uses TCP); raise it \
             (`ulimit -l unlimited`, systemd `LimitMEMLOCK=infinity`) or grant CAP_IPC_LOCK",
            limit >> 10
        )
    })
}

#[cfg(test)]
mod tests {
    use super::memlock_note;

    #[test]
    fn memlock_warning_only_when_it_binds() {
        assert_eq!(memlock_note(None, false), None, "unlimited");
        assert_eq!(memlock_note(Some(64 << 10), true), None, "CAP_IPC_LOCK ignores the limit");
        let w = memlock_note(Some(64 << 10), false).unwrap();
        assert!(w.contains("64 KiB") && w.contains("LimitMEMLOCK"), "{w}");
    }
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

    /// This host's RDMA device (none in this build).
    pub enum Rdma {}
    /// A destination's registered RAM (none in this build).
    pub enum Target {}

    /// Always fails: this build has no RDMA.
    pub fn open(_opts: &RdmaOptions) -> Result<Arc<Rdma>, String> {
        Err(WHY.into())
    }

    impl Rdma {
        /// The device's name.
        pub fn name(&self) -> String {
            match *self {}
        }
        /// What limits its use on this host.
        pub fn warning(&self) -> Option<String> {
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
        _endpoint_version: u8,
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
    use crate::protocol::RdmaPath;
    use crate::transport::batch::Batch;
    use crate::transport::handshake::{self, HANDSHAKE_TIMEOUT};
    use crate::transport::inflight::InFlight;
    use crate::transport::queue::Feed;
    use dcmigrate_rdma::{
        qp_attrs, CompletionKind, Device, DeviceCaps, Endpoint, PortInfo, QpAttrs, QpOptions, QueuePair, RdmaError,
        Region, Write, ENDPOINT_LEN,
    };
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
    /// fit a send queue of at most [`MAX_SEND_DEPTH`] and what the device
    /// allows (its queue and completion queue limits). A chunk whose worst
    /// batch does not fit is refused (`auto` then uses TCP).
    pub(crate) fn send_sizing(chunk_size: u64, caps: DeviceCaps) -> Result<(usize, u32), String> {
        let per_batch = (chunk_size as usize / PAGE_SIZE).div_ceil(2) + 1;
        // The completion queue also holds the one receive a sender posts.
        let limit = MAX_SEND_DEPTH.min(caps.max_qp_wr as usize).min(caps.max_cqe.saturating_sub(2) as usize);
        if per_batch > limit {
            return Err(format!(
                "a chunk of {} KiB needs up to {per_batch} work requests per batch; the device allows {} per queue \
                 and {} completions (use smaller chunks)",
                chunk_size >> 10,
                caps.max_qp_wr,
                caps.max_cqe
            ));
        }
        let window = (limit / per_batch).clamp(1, WINDOW);
        Ok((window, (window * per_batch) as u32))
    }

    fn rdma_err(e: RdmaError) -> TransportError {
        TransportError::Rdma(crate::error_chain(&e))
    }

    /// This host's RDMA device.
    pub struct Rdma {
        device: Arc<Device>,
        qp: QpOptions,
        memlock: Option<String>,
    }

    /// Opens the configured device, or the first with an active port.
    pub fn open(o: &RdmaOptions) -> Result<Arc<Rdma>, String> {
        let qp = QpOptions { traffic_class: o.traffic_class, service_level: o.service_level, pkey_index: o.pkey_index };
        if qp.service_level > dcmigrate_rdma::MAX_SERVICE_LEVEL {
            return Err(format!("service level {} is above {}", qp.service_level, dcmigrate_rdma::MAX_SERVICE_LEVEL));
        }
        Device::open(o.device.as_deref(), o.gid_index)
            .map(|device| Arc::new(Rdma { device, qp, memlock: memlock_problem() }))
            .map_err(|e| e.to_string())
    }

    impl Rdma {
        /// The device's name.
        pub fn name(&self) -> String {
            self.device.name().to_owned()
        }

        /// What limits its use on this host (the locked-memory limit).
        pub fn warning(&self) -> Option<String> {
            self.memlock.clone()
        }

        /// Registers a destination's RAM for remote writes.
        pub fn register_target(&self, ram: &Arc<GuestRam>) -> Result<Arc<Target>, String> {
            // A protection domain per session: another session's queue pairs cannot write here.
            let device = self.device.session().map_err(|e| e.to_string())?;
            Ok(Arc::new(Target { regions: register(&device, ram, true)?, device, qp: self.qp, _ram: ram.clone() }))
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
        qp: QpOptions,
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

    async fn write_endpoint(s: &mut DataStream, ep: Endpoint) -> Result<(), TransportError> {
        let io = |source| TransportError::Io { what: "sending a queue pair endpoint", source };
        s.write_all(&ep.encode()).await.map_err(io)?;
        s.flush().await.map_err(io)
    }

    /// The attributes for a queue pair from `port` to `remote`.
    fn attrs(port: &PortInfo, remote: &Endpoint, opts: &QpOptions) -> Result<QpAttrs, TransportError> {
        qp_attrs(port, remote.mtu, remote.gid == [0; 16], opts).map_err(rdma_err)
    }

    /// A destination's side of one RDMA stream (after the hello was checked):
    /// acknowledges each batch when its WRITE_WITH_IMM arrives, until the
    /// sender leaves or `stop` says so; then nothing more can land.
    pub async fn serve(t: &Target, mut s: DataStream, stop: Stop) -> Result<(), TransportError> {
        let qp = QueuePair::new(&t.device, 1, RECV_DEPTH, true, t.qp.pkey_index).map_err(rdma_err)?;
        handshake::answer(&mut s, HelloStatus::Ok).await?;
        let remote = read_endpoint(&mut s).await?;
        // The port is asked once: what is used is what is told.
        let port = t.device.port_info().map_err(rdma_err)?;
        let attrs = attrs(&port, &remote, &t.qp)?;
        qp.connect(&remote, &attrs).map_err(rdma_err)?;
        qp.post_recvs(0, RECV_DEPTH).map_err(rdma_err)?;
        // The version the sender spoke: an MTU only to one that sent its own.
        write_endpoint(&mut s, qp.endpoint(remote.mtu.map(|_| port.active_mtu))).await?;
        tracing::debug!(path_mtu = attrs.path_mtu.bytes(), "RDMA stream paired");
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
        endpoint_version: u8,
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
        let caps = rdma.device.caps().map_err(rdma_err)?;
        let (window, depth) = send_sizing(spec.ram.layout().chunk_size(), caps).map_err(TransportError::Rdma)?;
        // Room for what callers keep outstanding (more than the posting window).
        let mut q = SendQueue::new(DataPlane::Rdma, streams * QUEUE_PER_STREAM, spec.completions.clone());
        for _ in 0..streams {
            let (qp, s, attrs) = pair(rdma, &spec, depth, endpoint_version).await?;
            q.rdma.get_or_insert_with(|| RdmaPath {
                device: rdma.device.name().to_owned(),
                port: rdma.device.port(),
                gid_index: rdma.device.gid_index(),
                path_mtu: attrs.path_mtu.bytes(),
            });
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
        rdma: &Rdma,
        spec: &StreamSpec,
        depth: u32,
        endpoint_version: u8,
    ) -> Result<(QueuePair, DataStream, QpAttrs), TransportError> {
        let device = &rdma.device;
        let hello = Hello::new(spec.token, spec.sender, StreamMode::Rdma);
        let mut s = handshake::open(spec.addr, hello, spec.tls.as_ref()).await?;
        let qp = QueuePair::new(device, depth, 1, false, rdma.qp.pkey_index).map_err(rdma_err)?;
        // The port is asked once: what is used is what is told. Its MTU
        // goes only to a destination that reads it.
        let port = device.port_info().map_err(rdma_err)?;
        write_endpoint(&mut s, qp.endpoint((endpoint_version >= 1).then_some(port.active_mtu))).await?;
        let remote = read_endpoint(&mut s).await?;
        let attrs = attrs(&port, &remote, &rdma.qp)?;
        qp.connect(&remote, &attrs).map_err(rdma_err)?;
        Ok((qp, s, attrs))
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
