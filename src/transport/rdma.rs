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
//! sender ==WRITE_WITH_IMM(0), empty==> receiver          (the probe)
//! receiver -> sender:  reply Applied{0}      (RDMA traffic gets through)
//! sender ==RDMA WRITE (page runs), WRITE_WITH_IMM(seq)==> receiver's RAM
//! receiver -> sender:  reply Applied{seq}    (on the WRITE_WITH_IMM's receive completion)
//! ```
//! A destination fences a sender by moving its queue pairs to the error
//! state before the fence is confirmed; the TCP connection closing tells the
//! sender, which errors its own queue pairs and fails what was in flight.
//!
//! A queue pair that fails is replaced within its stream:
//! ```text
//! sender:               write completion in error  | receiver -> sender: Rejected{QueuePairFailed}
//! sender:               queue pair -> ERROR, shutdown(write) on the pairing connection
//! receiver:             sees the close: queue pair -> ERROR, closes    (the fence)
//! sender:               sees the close; pairs anew (hello, endpoints, probe)
//! sender ==the batches that were in flight, then new ones==> receiver's RAM
//! ```

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
    use crate::protocol::data::{Hello, HelloStatus, RejectCode, Reply, StreamMode, REPLY_LEN};
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
    /// Work requests a send queue is sized for at most: the worst batch of
    /// the largest chunk accepted (64 MiB, every other page: 8193) fits.
    const MAX_SEND_DEPTH: usize = 16384;

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
        if crate::hooks::rdma_unreachable().is_some() {
            tracing::warn!("test hook: nothing written to this queue pair arrives");
            let _ = qp.set_error();
        }
        let (mut rd, mut wr) = tokio::io::split(s);
        let acks = async {
            let mut received = 0u64;
            loop {
                for c in qp.completions().await.map_err(rdma_err)? {
                    let io = |source| TransportError::Io { what: "acknowledging a batch", source };
                    match c.result {
                        Ok(CompletionKind::Received { imm }) => {
                            wr.write_all(&Reply::Applied { batch: imm as u64 }.encode()).await.map_err(io)?;
                            wr.flush().await.map_err(io)?;
                            qp.post_recvs(0, 1).map_err(rdma_err)?;
                            received += 1;
                            if crate::hooks::rdma_target_qp_error_after() == Some(received)
                                && first_time(&TARGET_HOOK_FIRED)
                            {
                                tracing::warn!(received, "test hook: moving the queue pair to the error state");
                                let _ = qp.set_error();
                            }
                        }
                        Ok(CompletionKind::Sent) => {}
                        Err(e) => {
                            // Fenced before the sender hears of it, so it may
                            // pair a new queue pair at once.
                            let _ = qp.set_error();
                            let rejected = Reply::Rejected { code: RejectCode::QueuePairFailed };
                            let _ = wr.write_all(&rejected.encode()).await;
                            let _ = wr.flush().await;
                            return Err(TransportError::QueuePair(format!("receive failed: {e}")));
                        }
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
        let pairing = Arc::new(Pairing { rdma: rdma.clone(), spec, remote: remote.to_vec(), depth, endpoint_version });
        for _ in 0..streams {
            let (qp, s, attrs) = pairing.pair().await?;
            q.rdma.get_or_insert_with(|| RdmaPath {
                device: rdma.device.name().to_owned(),
                port: rdma.device.port(),
                gid_index: rdma.device.gid_index(),
                path_mtu: attrs.path_mtu.bytes(),
            });
            let stream = Stream { local: local.clone(), pairing: pairing.clone(), feed: q.feed.clone(), window };
            tokio::spawn(stream.run(qp, s));
        }
        Ok(q)
    }

    /// How long a new queue pair's probe write may take to be acknowledged.
    const PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
    /// Re-pairs one stream may make within [`RE_PAIR_PERIOD`]; one more
    /// failure means the destination is lost.
    const RE_PAIRS_PER_PERIOD: usize = 3;
    const RE_PAIR_PERIOD: std::time::Duration = std::time::Duration::from_secs(60);

    /// What pairing a queue pair with the destination takes (again, after a
    /// failure).
    struct Pairing {
        rdma: Arc<Rdma>,
        spec: StreamSpec,
        remote: Vec<RdmaRegion>,
        depth: u32,
        endpoint_version: u8,
    }

    impl Pairing {
        /// Hello, the endpoint exchange, and a probe write: a connected queue
        /// pair whose writes are known to arrive.
        async fn pair(&self) -> Result<(QueuePair, DataStream, QpAttrs), TransportError> {
            let (rdma, spec) = (&self.rdma, &self.spec);
            let device = &rdma.device;
            let hello = Hello::new(spec.token, spec.sender, StreamMode::Rdma);
            let mut s = handshake::open(spec.addr, hello, spec.tls.as_ref()).await?;
            let qp = QueuePair::new(device, self.depth, 1, false, rdma.qp.pkey_index).map_err(rdma_err)?;
            // The port is asked once: what is used is what is told. Its MTU
            // goes only to a destination that reads it.
            let port = device.port_info().map_err(rdma_err)?;
            write_endpoint(&mut s, qp.endpoint((self.endpoint_version >= 1).then_some(port.active_mtu))).await?;
            let remote = read_endpoint(&mut s).await?;
            let attrs = attrs(&port, &remote, &rdma.qp)?;
            qp.connect(&remote, &attrs).map_err(rdma_err)?;
            self.probe(&qp, &mut s).await.map_err(|e| TransportError::Probe(Box::new(e)))?;
            Ok((qp, s, attrs))
        }

        /// Connecting a queue pair sends nothing: an empty WRITE_WITH_IMM
        /// acknowledged by the destination proves the path carries RDMA (a
        /// fabric that drops RoCE traffic fails here, and `auto` uses TCP).
        async fn probe(&self, qp: &QueuePair, s: &mut DataStream) -> Result<(), TransportError> {
            let target = (self.remote[0].addr, self.remote[0].rkey);
            // Sequence 0: batches count from 1.
            qp.post_batch(0, &[], 0, target).map_err(|e| TransportError::QueuePair(crate::error_chain(&e)))?;
            let local = async {
                loop {
                    if let Some(c) = qp.completions().await.map_err(rdma_err)?.into_iter().next() {
                        return c.result.map(drop).map_err(|e| TransportError::QueuePair(format!("probe write: {e}")));
                    }
                }
            };
            let reply = async {
                let mut r = [0u8; REPLY_LEN];
                s.read_exact(&mut r)
                    .await
                    .map_err(|source| TransportError::Io { what: "reading the probe's acknowledgement", source })?;
                match Reply::decode(&r)? {
                    Reply::Applied { batch: 0 } => Ok(()),
                    Reply::Applied { batch } => Err(TransportError::UnexpectedAck(batch)),
                    Reply::Rejected { code } => Err(TransportError::Rejected(code)),
                }
            };
            match tokio::time::timeout(PROBE_TIMEOUT, async { tokio::try_join!(local, reply) }).await {
                Ok(r) => r.map(drop),
                Err(_) => {
                    Err(TransportError::Timeout { what: "the probe write's acknowledgement (RDMA traffic dropped?)" })
                }
            }
        }
    }

    // Field order is drop order: the registrations go before the mapping
    // they point into (which `pairing.spec` holds).
    struct Stream {
        local: Arc<Vec<Region>>,
        pairing: Arc<Pairing>,
        feed: Feed,
        window: usize,
    }

    /// Whether a stream that failed with `e` may re-pair: only a failed queue
    /// pair, not a destination that rejected, vanished or went silent.
    fn re_pairable(e: &TransportError) -> bool {
        matches!(e, TransportError::QueuePair(_) | TransportError::Rejected(RejectCode::QueuePairFailed))
    }

    impl Stream {
        fn ram(&self) -> &GuestRam {
            &self.pairing.spec.ram
        }

        /// The writes of one batch: one per run (a run is contiguous in both
        /// RAMs, chunks never span regions).
        fn writes(&self, b: &Batch) -> Result<Vec<Write>, TransportError> {
            b.runs
                .iter()
                .map(|r| {
                    let (region, offset) = self.ram().layout().locate(r.first_page);
                    let len = (r.pages * PAGE_SIZE) as u64;
                    let (l, rem) = (&self.local[region as usize], self.pairing.remote[region as usize]);
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

        /// Sends batches over `qp` until something fails. A failed queue
        /// pair is replaced (re-paired, after the destination confirmed the
        /// old one can write no more) and what it had in flight is sent
        /// again; anything else, or too many re-pairs, ends the stream and
        /// fails its batches.
        async fn run(self, mut qp: QueuePair, mut s: DataStream) {
            // Batches to send again before any new one (a failed pair's).
            let mut again: Vec<Batch> = Vec::new();
            let mut failures: std::collections::VecDeque<std::time::Instant> = Default::default();
            loop {
                let inflight = InFlight::new(self.window);
                let (mut rd, mut wr) = tokio::io::split(s);
                let result = tokio::select! {
                    r = self.feed.read_acks(&inflight, &mut rd) => r,
                    r = local_completions(&qp) => r,
                    r = self.post(&qp, &inflight, &mut again) => r,
                    e = inflight.watchdog(self.pairing.spec.stall_timeout) => Err(e),
                    _ = self.feed.cancel.cancelled() => Err(TransportError::Closed),
                };
                // Nothing more leaves this queue pair.
                let _ = qp.set_error();
                let mut left = inflight.drain();
                left.append(&mut again);
                let e = match result {
                    Err(e) if re_pairable(&e) && !self.feed.cancel.is_cancelled() => e,
                    r => return self.feed.end_stream_with(left, r),
                };
                let now = std::time::Instant::now();
                failures.retain(|t| now.duration_since(*t) < RE_PAIR_PERIOD);
                if failures.len() >= RE_PAIRS_PER_PERIOD {
                    let why = format!(
                        "{} (queue pairs failed {} times within {RE_PAIR_PERIOD:?})",
                        crate::error_chain(&e),
                        failures.len() + 1
                    );
                    return self.feed.end_stream_with(left, Err(TransportError::QueuePair(why)));
                }
                failures.push_back(now);
                tracing::warn!(batches = left.len(), "RDMA queue pair failed, re-pairing: {}", crate::error_chain(&e));
                let fenced = fence(rd, wr.shutdown().await.map(|()| wr)).await;
                let paired = match fenced {
                    Ok(()) => self.pairing.pair().await,
                    Err(f) => Err(f),
                };
                match paired {
                    Ok((q, s2, _)) => {
                        self.feed.re_pairs.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        tracing::info!(batches = left.len(), "RDMA stream re-paired; sending again what was in flight");
                        (qp, s, again) = (q, s2, left);
                    }
                    Err(p) => {
                        let why = format!("{}; re-pairing failed: {}", crate::error_chain(&e), crate::error_chain(&p));
                        return self.feed.end_stream_with(left, Err(TransportError::QueuePair(why)));
                    }
                }
            }
        }

        /// The NIC reads the memory, not us: show the tracker what it will read.
        fn observe(&self, batch: &Batch, copy: &mut Vec<u8>) -> Result<(), TransportError> {
            if let Some(o) = &self.pairing.spec.observer {
                for p in batch.pages() {
                    copy.clear();
                    self.ram().read_pages(p, 1, copy)?;
                    o.observe(p, copy);
                }
            }
            Ok(())
        }

        /// Posts `again` first, then what the queue holds.
        async fn post(
            &self,
            qp: &QueuePair,
            inflight: &InFlight,
            again: &mut Vec<Batch>,
        ) -> Result<(), TransportError> {
            let mut seq: u32 = 0;
            let mut copy = Vec::new();
            again.reverse();
            loop {
                inflight.reserve().await;
                let batch = match again.pop() {
                    Some(b) => b,
                    None => match self.feed.backlog.recv().await {
                        Ok(b) => b,
                        // Queue closed: wait for the last acknowledgements.
                        Err(_) => return std::future::pending().await,
                    },
                };
                seq = seq.wrapping_add(1);
                // Whatever fails from here, the batch is in flight, so the
                // stream's end fails it (or sends it again): no batch is lost.
                let writes = self.writes(&batch).and_then(|w| self.observe(&batch, &mut copy).map(|()| w));
                inflight.push(seq as u64, batch);
                let writes = writes?;
                let bytes: u64 = writes.iter().map(|w| w.len as u64).sum();
                let target = (self.pairing.remote[0].addr, self.pairing.remote[0].rkey);
                qp.post_batch(seq as u64, &writes, seq, target)
                    .map_err(|e| TransportError::QueuePair(crate::error_chain(&e)))?;
                self.feed.sent(bytes);
                if crate::hooks::rdma_qp_error_after() == Some(seq as u64) && first_time(&SENDER_HOOK_FIRED) {
                    tracing::warn!(seq, "test hook: moving the queue pair to the error state");
                    let _ = qp.set_error();
                }
            }
        }
    }

    static SENDER_HOOK_FIRED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    static TARGET_HOOK_FIRED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

    /// True the first time it is called on `flag` in this process.
    fn first_time(flag: &std::sync::atomic::AtomicBool) -> bool {
        !flag.swap(true, std::sync::atomic::Ordering::Relaxed)
    }

    /// Fails on the first write that completed in error.
    async fn local_completions(qp: &QueuePair) -> Result<(), TransportError> {
        loop {
            for c in qp.completions().await.map_err(rdma_err)? {
                c.result.map_err(|e| TransportError::QueuePair(format!("RDMA write failed: {e}")))?;
            }
        }
    }

    /// After our queue pair failed (and was moved to the error state): the
    /// destination moves its own to the error state when we leave, then
    /// closes; its close is the proof that no write of the old pair can land
    /// after the new pair's. Acknowledgements still on the way are dropped:
    /// their batches are sent again, which rewrites the same pages.
    async fn fence(
        mut rd: tokio::io::ReadHalf<DataStream>,
        wr: std::io::Result<tokio::io::WriteHalf<DataStream>>,
    ) -> Result<(), TransportError> {
        let closed = async {
            let _wr = wr?;
            let mut buf = [0u8; 512];
            loop {
                match rd.read(&mut buf).await {
                    Ok(0) => return Ok(()),
                    Ok(_) => {}
                    // A TLS peer that closes without close_notify, or a socket closed with data unread.
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset
                        ) =>
                    {
                        return Ok(())
                    }
                    Err(e) => return Err(e),
                }
            }
        };
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, closed).await {
            Ok(r) => r.map_err(|source| TransportError::Io {
                what: "waiting for the destination to fence a failed queue pair",
                source,
            }),
            Err(_) => Err(TransportError::Timeout { what: "the destination's fence of a failed queue pair" }),
        }
    }
}

#[cfg(all(test, feature = "rdma"))]
mod sizing_tests {
    use super::imp::send_sizing;
    use dcmigrate_rdma::DeviceCaps;

    #[test]
    fn send_queues_hold_the_worst_batch_within_the_device_limits() {
        // rxe's limits; 2 MiB chunks: 257 requests per batch, four batches.
        let rxe = DeviceCaps { max_qp_wr: 16384, max_cqe: 32767 };
        assert_eq!(send_sizing(2 << 20, rxe), Ok((4, 4 * 257)));
        // The largest chunk, every other page: one batch at a time.
        assert_eq!(send_sizing(64 << 20, rxe), Ok((1, 8193)));
        // A device with smaller queues refuses it, with the numbers.
        let small = DeviceCaps { max_qp_wr: 4096, max_cqe: 65536 };
        let e = send_sizing(64 << 20, small).unwrap_err();
        assert!(e.contains("8193 work requests") && e.contains("4096 per queue"), "{e}");
    }
}
