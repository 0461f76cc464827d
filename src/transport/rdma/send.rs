//! A sender's side of RDMA streams (source or forwarder): registering
//! its RAM, pairing queue pairs (with a probe), posting batches, and
//! replacing a queue pair that fails.

use super::device::{
    attrs, find_slice, first_time, rdma_err, read_endpoint, source_gid, write_endpoint, LocalRam, Rdma,
};
use super::receive::RECV_DEPTH;
use crate::memory::{GuestRam, Layout, PAGE_SIZE};
use crate::protocol::data::{Hello, RejectCode, Reply, StreamMode, REPLY_LEN};
use crate::protocol::{DataPlane, RdmaPath, RdmaRegion};
use crate::transport::batch::Batch;
use crate::transport::handshake::{self, HANDSHAKE_TIMEOUT};
use crate::transport::inflight::InFlight;
use crate::transport::queue::{Feed, SendQueue, StreamSpec, QUEUE_PER_STREAM};
use crate::transport::secure::DataStream;
use crate::transport::TransportError;
use dcmigrate_rdma::{DeviceCaps, QpAttrs, QueuePair, Write};
use std::collections::VecDeque;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A destination's offer, per region of `layout`: its slices (in order,
/// each starting at a chunk boundary, together exactly the region), with
/// their offsets; None if it does not fit the layout. One slice per
/// region is what destinations of earlier releases offer.
fn split_offer(layout: &Layout, offer: &[RdmaRegion]) -> Option<Vec<Vec<(u64, RdmaRegion)>>> {
    let mut slices = offer.iter();
    let mut out = Vec::with_capacity(layout.regions().len());
    for region in layout.regions() {
        let mut parts = vec![];
        let mut at = 0u64;
        while at < region.size {
            let s = slices.next()?;
            if s.len == 0 || !at.is_multiple_of(layout.chunk_size()) {
                return None;
            }
            parts.push((at, *s));
            at = at.checked_add(s.len)?;
        }
        if at != region.size {
            return None;
        }
        out.push(parts);
    }
    slices.next().is_none().then_some(out)
}

/// Chunks' worth of work requests a send queue holds (at the chunk's worst).
const CHUNKS_PER_QUEUE: usize = 4;
/// Work requests a send queue is sized for at most: the worst batch of
/// the largest chunk accepted (64 MiB, every other page: 8193) fits.
const MAX_SEND_DEPTH: usize = 16384;
// Each batch in flight consumes one of the destination's posted receives.
const _: () = assert!(QUEUE_PER_STREAM <= RECV_DEPTH as usize);

/// The send queue's depth: room for [`CHUNKS_PER_QUEUE`] batches at their
/// worst (runs alternate with gaps: one write per two pages, plus the
/// WRITE_WITH_IMM), or for [`QUEUE_PER_STREAM`] of the smallest (two
/// requests), within [`MAX_SEND_DEPTH`] and what the device allows (its
/// queue and completion queue limits). Batches in flight are bounded by
/// their real requests, not a count, so sparse batches fill the queue. A
/// chunk whose worst batch does not fit is refused (`auto` then uses TCP).
pub(crate) fn send_depth(chunk_size: u64, caps: DeviceCaps) -> Result<u32, String> {
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
    let want = (CHUNKS_PER_QUEUE * per_batch).max(2 * QUEUE_PER_STREAM);
    Ok(want.min(limit) as u32)
}

/// A send queue's work requests: taken when a batch is posted, given back
/// when its signaled last request completes here (the provider frees its
/// slots then, whatever the destination has acknowledged).
struct Slots {
    free: tokio::sync::Semaphore,
    taken: std::sync::Mutex<std::collections::HashMap<u64, u32>>,
}

impl Slots {
    fn new(depth: u32) -> Self {
        Slots { free: tokio::sync::Semaphore::new(depth as usize), taken: Default::default() }
    }

    /// Waits for `n` free requests and takes them for batch `seq`.
    async fn take(&self, seq: u64, n: u32) {
        // The semaphore is never closed; a batch needs at most the depth.
        if let Ok(p) = self.free.acquire_many(n).await {
            p.forget();
            self.taken.lock().unwrap().insert(seq, n);
        }
    }

    /// Batch `seq`'s requests completed.
    fn give_back(&self, seq: u64) {
        if let Some(n) = self.taken.lock().unwrap().remove(&seq) {
            self.free.add_permits(n as usize);
        }
    }
}

/// Registers the sender's RAM for local reads (unless this host already
/// has) and opens `spec.streams`
/// queue pairs to the destination, whose registered RAM is `remote`.
pub async fn connect(
    rdma: &Arc<Rdma>,
    spec: StreamSpec,
    remote: &[RdmaRegion],
    endpoint_version: u8,
    tcp_fallback: bool,
) -> Result<SendQueue, TransportError> {
    let remote = split_offer(spec.ram.layout(), remote).ok_or(TransportError::RdmaLayout)?;
    let local = {
        let (r, ram) = (rdma.clone(), spec.ram.clone());
        tokio::task::spawn_blocking(move || r.register_sender(&ram))
            .await
            .map_err(|e| TransportError::Rdma(e.to_string()))?
            .map_err(|e| TransportError::Rdma(format!("registering local RAM: {e}")))?
    };
    let streams = spec.streams.max(1);
    let caps = rdma.device.caps().map_err(rdma_err)?;
    let depth = send_depth(spec.ram.layout().chunk_size(), caps).map_err(TransportError::Rdma)?;
    let mut q = SendQueue::new(DataPlane::Rdma, streams * QUEUE_PER_STREAM, spec.completions.clone());
    let pairing = Arc::new(Pairing { rdma: rdma.clone(), local, spec, remote, depth, endpoint_version, tcp_fallback });
    for _ in 0..streams {
        let (qp, s, attrs) = pairing.pair().await?;
        q.rdma.get_or_insert_with(|| RdmaPath {
            device: rdma.device.name().to_owned(),
            port: rdma.device.port(),
            gid_index: qp.source_gid().index,
            path_mtu: attrs.path_mtu.bytes(),
        });
        let stream = Stream { pairing: pairing.clone(), feed: q.feed.clone() };
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
    /// The sender's registered RAM (its queue pairs go in its protection domain).
    local: Arc<LocalRam>,
    spec: StreamSpec,
    /// The destination's registered RAM: per region, (offset, slice).
    remote: Vec<Vec<(u64, RdmaRegion)>>,
    depth: u32,
    endpoint_version: u8,
    /// A stream that cannot re-pair goes on over TCP (else it fails).
    tcp_fallback: bool,
}

impl Pairing {
    /// Hello, the endpoint exchange, and a probe write: a connected queue
    /// pair whose writes are known to arrive.
    async fn pair(&self) -> Result<(QueuePair, DataStream, QpAttrs), TransportError> {
        let (rdma, spec) = (&self.rdma, &self.spec);
        let device = &rdma.device;
        if !device.port_active().map_err(rdma_err)? {
            return Err(TransportError::Rdma(format!("port {} of {} is down", device.port(), device.name())));
        }
        let hello = Hello::new(spec.token, spec.sender, StreamMode::Rdma);
        let (mut s, from) = handshake::open_from(spec.addr, hello, spec.tls.as_ref()).await?;
        let gid = source_gid(device, rdma.gid_fixed, from)?;
        let qp = QueuePair::new(&self.local.device, gid, self.depth, 1, false, rdma.qp.pkey_index).map_err(rdma_err)?;
        // The port is asked once: what is used is what is told. Its MTU
        // goes only to a destination that reads it.
        let port = device.port_info().map_err(rdma_err)?;
        write_endpoint(&mut s, qp.endpoint((self.endpoint_version >= 1).then_some(port.active_mtu))).await?;
        let remote = read_endpoint(&mut s).await?;
        let attrs = attrs(&port, &gid, &remote, &rdma.qp)?;
        qp.connect(&remote, &attrs).map_err(rdma_err)?;
        self.probe(&qp, &mut s).await.map_err(|e| TransportError::Probe(Box::new(e)))?;
        Ok((qp, s, attrs))
    }

    /// Connecting a queue pair sends nothing: an empty WRITE_WITH_IMM
    /// acknowledged by the destination proves the path carries RDMA (a
    /// fabric that drops RoCE traffic fails here, and `auto` uses TCP).
    async fn probe(&self, qp: &QueuePair, s: &mut DataStream) -> Result<(), TransportError> {
        let first = &self.remote[0][0].1;
        let target = (first.addr, first.rkey);
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

/// One stream's queue pair, replaced when it fails.
struct Stream {
    pairing: Arc<Pairing>,
    feed: Feed,
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
    /// RAMs and lies in one slice of each: chunks never span regions, and
    /// slices start at chunk boundaries).
    fn writes(&self, b: &Batch) -> Result<Vec<Write>, TransportError> {
        b.runs
            .iter()
            .map(|r| {
                let (region, offset) = self.ram().layout().locate(r.first_page);
                let len = (r.pages * PAGE_SIZE) as u64;
                let outside = || TransportError::RunOutside { page: r.first_page, region };
                let (l, loff) = self.pairing.local.slice(region, offset, len).ok_or_else(outside)?;
                let remote = self.pairing.remote.get(region as usize).map(Vec::as_slice).unwrap_or_default();
                let (rem, roff) = find_slice(remote, |s| s.len, offset, len).ok_or_else(outside)?;
                Ok(Write {
                    local_addr: l.addr() + loff,
                    len: len as u32,
                    lkey: l.lkey(),
                    remote_addr: rem.addr.checked_add(roff).ok_or_else(outside)?,
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
        let mut again: VecDeque<Batch> = VecDeque::new();
        let mut failures: std::collections::VecDeque<std::time::Instant> = Default::default();
        loop {
            let inflight = InFlight::new(QUEUE_PER_STREAM);
            let slots = Slots::new(self.pairing.depth);
            let (mut rd, wr) = tokio::io::split(s);
            let result = tokio::select! {
                r = self.feed.read_acks(&inflight, &mut rd) => r,
                r = local_completions(&qp, &slots) => r,
                r = self.post(&qp, (&inflight, &slots), &mut again) => r,
                _ = self.pairing.rdma.port_went_down() => Err(TransportError::QueuePair("the port went down".into())),
                e = inflight.watchdog(self.pairing.spec.stall_timeout) => Err(e),
                _ = self.feed.cancel.cancelled() => Err(TransportError::Closed),
            };
            // Nothing more leaves this queue pair.
            let _ = qp.set_error();
            let mut left = inflight.drain();
            left.extend(again.drain(..));
            let e = match result {
                Err(e) if re_pairable(&e) && !self.feed.cancel.is_cancelled() => e,
                r => return self.feed.end_stream_with(left, r),
            };
            tracing::warn!(batches = left.len(), "RDMA queue pair failed: {}", crate::error_chain(&e));
            // First the fence: nothing of the failed pair may land after
            // what replaces it (a new pair's writes, or a TCP stream's).
            if let Err(f) = fence(rd, wr).await {
                let why = format!("{}; fencing it failed: {}", crate::error_chain(&e), crate::error_chain(&f));
                return self.feed.end_stream_with(left, Err(TransportError::QueuePair(why)));
            }
            let now = std::time::Instant::now();
            failures.retain(|t| now.duration_since(*t) < RE_PAIR_PERIOD);
            let paired = if failures.len() >= RE_PAIRS_PER_PERIOD {
                let n = failures.len() + 1;
                Err(TransportError::QueuePair(format!("queue pairs failed {n} times within {RE_PAIR_PERIOD:?}")))
            } else {
                failures.push_back(now);
                self.pairing.pair().await
            };
            match paired {
                Ok((q, s2, _)) => {
                    self.feed.re_pairs.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tracing::info!(batches = left.len(), "RDMA stream re-paired; sending again what was in flight");
                    (qp, s, again) = (q, s2, left.into());
                }
                Err(p) => {
                    let why = format!("{}; re-pairing failed: {}", crate::error_chain(&e), crate::error_chain(&p));
                    if self.pairing.tcp_fallback {
                        return self.fall_back(left, why).await;
                    }
                    return self.feed.end_stream_with(left, Err(TransportError::QueuePair(why)));
                }
            }
        }
    }

    /// Gives RDMA up for this stream (`--transport auto`): a TCP stream to
    /// the same session sends what was in flight and everything after, so
    /// a port that stays down or a path that stops carrying RoCE costs the
    /// stream its speed, not the migration its destination.
    async fn fall_back(self, left: Vec<Batch>, why: String) {
        tracing::warn!(batches = left.len(), "RDMA stream continues over TCP: {why}");
        self.feed.tcp_fallbacks.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        crate::transport::tcp::take_over(&self.pairing.spec, self.feed.clone(), left).await;
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
        (inflight, slots): (&InFlight, &Slots),
        again: &mut VecDeque<Batch>,
    ) -> Result<(), TransportError> {
        let mut seq: u32 = 0;
        let mut copy = Vec::new();
        loop {
            inflight.reserve().await;
            let batch = match again.pop_front() {
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
            slots.take(seq as u64, writes.len() as u32 + 1).await;
            let bytes: u64 = writes.iter().map(|w| w.len as u64).sum();
            let first = &self.pairing.remote[0][0].1;
            let target = (first.addr, first.rkey);
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
/// Fails on the first write that completed in error; frees the send
/// queue's requests of each batch whose last request completed.
async fn local_completions(qp: &QueuePair, slots: &Slots) -> Result<(), TransportError> {
    loop {
        for c in qp.completions().await.map_err(rdma_err)? {
            c.result.map_err(|e| TransportError::QueuePair(format!("RDMA write failed: {e}")))?;
            slots.give_back(c.wr_id);
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
    mut wr: tokio::io::WriteHalf<DataStream>,
) -> Result<(), TransportError> {
    let closed = async {
        wr.shutdown().await?;
        let mut buf = [0u8; 512];
        loop {
            match rd.read(&mut buf).await {
                Ok(0) => return Ok(()),
                Ok(_) => {}
                // A TLS peer that closes without close_notify, or a socket closed with data unread.
                Err(e)
                    if matches!(e.kind(), std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset) =>
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

#[cfg(all(test, feature = "rdma"))]
mod sizing_tests {
    use super::{find_slice, send_depth, split_offer, Slots};
    use dcmigrate_rdma::DeviceCaps;

    #[test]
    fn send_queues_hold_the_worst_batch_within_the_device_limits() {
        // rxe's limits; 2 MiB chunks: 257 requests per batch at worst, four of them.
        let rxe = DeviceCaps { max_qp_wr: 16384, max_cqe: 32767 };
        assert_eq!(send_depth(2 << 20, rxe), Ok(4 * 257));
        // The largest chunk (8193 at worst): as deep as allowed, one such batch or more sparse ones.
        assert_eq!(send_depth(64 << 20, rxe), Ok(16384));
        // One-page chunks: room for a full window of two-request batches.
        assert_eq!(send_depth(4 << 10, rxe), Ok(64));
        // A device with smaller queues refuses it, with the numbers.
        let small = DeviceCaps { max_qp_wr: 4096, max_cqe: 65536 };
        let e = send_depth(64 << 20, small).unwrap_err();
        assert!(e.contains("8193 work requests") && e.contains("4096 per queue"), "{e}");
    }

    #[test]
    fn offers_in_slices_map_runs_to_their_slice() {
        use crate::memory::{Layout, RegionSpec};
        use crate::protocol::RdmaRegion;
        let spec = |id: &str, size| RegionSpec { id: id.into(), size };
        let layout = Layout::new(vec![spec("a", 8 << 20), spec("b", 4 << 20)], 2 << 20).unwrap();
        let r = |addr, len| RdmaRegion { addr, len, rkey: 7 };
        // Destinations of earlier releases: one slice per region.
        let one = split_offer(&layout, &[r(1000, 8 << 20), r(9000, 4 << 20)]).unwrap();
        assert_eq!((one[1].len(), one[1][0].0, one[1][0].1.addr), (1, 0, 9000));
        let sliced = split_offer(&layout, &[r(0x1000_0000, 4 << 20), r(0x2000_0000, 4 << 20), r(0x3000_0000, 4 << 20)]);
        let sliced = sliced.unwrap();
        assert_eq!(sliced[0].len(), 2);
        let (s, inner) = find_slice(&sliced[0], |s| s.len, 5 << 20, 1 << 20).unwrap();
        assert_eq!((s.addr, inner), (0x2000_0000, 1 << 20));
        assert!(find_slice(&sliced[0], |s| s.len, (4 << 20) - 4096, 8192).is_none(), "across two slices");
        assert!(find_slice(&sliced[0], |s| s.len, 8 << 20, 4096).is_none(), "past the region");
        // Misfits: off a chunk boundary, short, long, one too many.
        assert!(split_offer(&layout, &[r(0, 3 << 20), r(0, 5 << 20), r(0, 4 << 20)]).is_none());
        assert!(split_offer(&layout, &[r(0, 8 << 20)]).is_none());
        assert!(split_offer(&layout, &[r(0, 8 << 20), r(0, 6 << 20)]).is_none());
        assert!(split_offer(&layout, &[r(0, 8 << 20), r(0, 4 << 20), r(0, 4096)]).is_none());
        assert!(split_offer(&layout, &[r(0, 8 << 20), r(0, 0), r(0, 4 << 20)]).is_none());
    }

    #[tokio::test]
    async fn slots_come_back_when_their_batch_completes() {
        let s = Slots::new(10);
        s.take(1, 6).await;
        s.take(2, 4).await;
        let third = s.take(3, 2);
        tokio::pin!(third);
        assert!(futures_poll_once(third.as_mut()).is_none(), "the queue is full");
        s.give_back(1);
        s.give_back(1); // a second completion of the same batch frees nothing more
        third.await;
        assert_eq!(s.free.available_permits(), 4);
    }

    /// Polls a future once.
    fn futures_poll_once<F: std::future::Future>(f: std::pin::Pin<&mut F>) -> Option<F::Output> {
        let waker = std::task::Waker::noop();
        match f.poll(&mut std::task::Context::from_waker(waker)) {
            std::task::Poll::Ready(v) => Some(v),
            std::task::Poll::Pending => None,
        }
    }
}
