//! TCP data plane: several parallel streams of page frames (see
//! [`crate::protocol::data`]), written by the receiver into the mapped guest
//! RAM, each frame bounds-checked before its payload is read.

use super::batch::Batch;
use super::handshake;
use super::inflight::InFlight;
use super::queue::{Feed, SendQueue, StreamSpec, QUEUE_PER_STREAM};
use super::seal;
use super::secure::{DataStream, DataWriter, Sealed};
use super::TransportError;
use crate::memory::{GuestRam, PAGE_SIZE};
use crate::protocol::data::{Frame, Hello, RejectCode, Reply, StreamMode, HEADER_LEN};
use crate::protocol::DataPlane;
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Batches a stream may have sent but not yet seen applied (the engine
/// bounds their bytes).
const WINDOW: usize = QUEUE_PER_STREAM;
/// Largest frame this sender writes (the wire allows `MAX_PAYLOAD`): the
/// copy buffer per stream, on both ends, is this big.
const PIECE: usize = 1 << 20;

/// The receiving side of one accepted stream (after the hello): applies
/// frames until the sender closes it (Ok) or sends something wrong (Err,
/// after telling it).
pub async fn serve(ram: &GuestRam, s: &mut DataStream) -> Result<(), TransportError> {
    match s {
        DataStream::Stream(s) => receive(ram, s).await,
        DataStream::Sealed(s) => receive_sealed(ram, s).await,
    }
}

/// [`serve`] on sealed records: each holds whole frames (a sender writes a
/// page frame as a record of its own), opened in the buffer the pages are
/// written from. A frame cut by a record's end is refused.
async fn receive_sealed(ram: &GuestRam, s: &mut Sealed) -> Result<(), TransportError> {
    let mut buf = Vec::new();
    loop {
        let record =
            s.rd.read_record(&mut buf)
                .await
                .map_err(|source| TransportError::Io { what: "reading a record", source })?;
        let Some(mut rest) = record else { return Ok(()) };
        while !rest.is_empty() {
            let frame = match rest.get(..HEADER_LEN).map(|h| Frame::decode(h.try_into().expect("header length"))) {
                Some(Ok(f)) => f,
                Some(Err(e)) => {
                    reply(&mut s.wr, Reply::Rejected { code: RejectCode::BadFrame }).await.ok();
                    return Err(e.into());
                }
                None => {
                    reply(&mut s.wr, Reply::Rejected { code: RejectCode::BadFrame }).await.ok();
                    return Err(TransportError::FrameCut);
                }
            };
            rest = &rest[HEADER_LEN..];
            match frame {
                Frame::Pages { region, offset, len } => {
                    if let Err(e) = ram.check(region, offset, len as u64) {
                        reply(&mut s.wr, Reply::Rejected { code: RejectCode::OutOfBounds }).await.ok();
                        return Err(e.into());
                    }
                    let Some(pages) = rest.get(..len as usize) else {
                        reply(&mut s.wr, Reply::Rejected { code: RejectCode::BadFrame }).await.ok();
                        return Err(TransportError::FrameCut);
                    };
                    ram.write_at(region, offset, pages)?;
                    rest = &rest[len as usize..];
                }
                Frame::Zero { region, offset, len } => {
                    if let Err(e) = ram.check(region, offset, len as u64) {
                        reply(&mut s.wr, Reply::Rejected { code: RejectCode::OutOfBounds }).await.ok();
                        return Err(e.into());
                    }
                    ram.zero_pages(region, offset, len as u64)?;
                }
                Frame::BatchEnd { batch } => {
                    reply(&mut s.wr, Reply::Applied { batch })
                        .await
                        .map_err(|source| TransportError::Io { what: "acknowledging a batch", source })?;
                }
            }
        }
    }
}

/// The receiving side of a plain or TLS stream: see [`serve`].
pub async fn receive(ram: &GuestRam, s: &mut (impl AsyncRead + AsyncWrite + Unpin)) -> Result<(), TransportError> {
    let io = |what| move |source| TransportError::Io { what, source };
    let mut header = [0u8; HEADER_LEN];
    let mut buf = Vec::new();
    loop {
        match s.read_exact(&mut header).await {
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            r => r.map_err(io("reading a frame"))?,
        };
        let frame = match Frame::decode(&header) {
            Ok(f) => f,
            Err(e) => {
                reply(s, Reply::Rejected { code: RejectCode::BadFrame }).await.ok();
                return Err(e.into());
            }
        };
        match frame {
            Frame::Pages { region, offset, len } => {
                if let Err(e) = ram.check(region, offset, len as u64) {
                    reply(s, Reply::Rejected { code: RejectCode::OutOfBounds }).await.ok();
                    return Err(e.into());
                }
                // Into a buffer, then pwrite: see GuestRam::write_at.
                buf.resize(len as usize, 0);
                s.read_exact(&mut buf).await.map_err(io("reading pages"))?;
                ram.write_at(region, offset, &buf)?;
            }
            Frame::Zero { region, offset, len } => {
                if let Err(e) = ram.check(region, offset, len as u64) {
                    reply(s, Reply::Rejected { code: RejectCode::OutOfBounds }).await.ok();
                    return Err(e.into());
                }
                ram.zero_pages(region, offset, len as u64)?;
            }
            Frame::BatchEnd { batch } => {
                reply(s, Reply::Applied { batch }).await.map_err(io("acknowledging a batch"))?;
            }
        }
    }
}

/// Sends a reply now (a TLS stream may otherwise hold it in its buffer).
async fn reply(s: &mut (impl AsyncWrite + Unpin), r: Reply) -> std::io::Result<()> {
    s.write_all(&r.encode()).await?;
    s.flush().await
}

/// The sending side: opens `spec.streams` authenticated data streams (one
/// queue they all pull batches from). Pages are read from `spec.ram`; the
/// observer, if any, sees every page read.
pub async fn connect(spec: StreamSpec) -> Result<SendQueue, TransportError> {
    let streams = spec.streams.max(1);
    let q = SendQueue::new(DataPlane::Tcp, streams * WINDOW, spec.completions.clone());
    for _ in 0..streams {
        let s = open(&spec).await?;
        tokio::spawn(Stream::new(&spec, q.feed.clone(), vec![]).run(s));
    }
    Ok(q)
}

async fn open(spec: &StreamSpec) -> Result<DataStream, TransportError> {
    let hello = Hello::new(spec.token, spec.sender, StreamMode::Tcp);
    handshake::open(spec.addr, hello, spec.tls.as_ref()).await
}

/// One TCP stream taking over from a stream of another data plane (an RDMA
/// stream whose queue pairs cannot be replaced) on the same queue: it
/// sends `again` (what the other had in flight) first; if it cannot open,
/// they fail with the reason.
#[cfg(feature = "rdma")]
pub(super) async fn take_over(spec: &StreamSpec, feed: Feed, again: Vec<Batch>) {
    match open(spec).await {
        Ok(s) => Stream::new(spec, feed, again).run(s).await,
        Err(e) => feed.end_stream_with(again, Err(e)),
    }
}

struct Stream {
    ram: Arc<GuestRam>,
    zero_frames: bool,
    observer: Option<Arc<dyn crate::dirty::SendObserver>>,
    feed: Feed,
    inflight: InFlight,
    stall: std::time::Duration,
    /// Batches to send before any from the queue (last first).
    again: Mutex<Vec<Batch>>,
}

impl Stream {
    fn new(spec: &StreamSpec, feed: Feed, mut again: Vec<Batch>) -> Self {
        again.reverse();
        Stream {
            ram: spec.ram.clone(),
            zero_frames: spec.zero_frames,
            observer: spec.observer.clone(),
            feed,
            inflight: InFlight::new(WINDOW),
            stall: spec.stall_timeout,
            again: Mutex::new(again),
        }
    }

    async fn run(self, s: DataStream) {
        let (rd, wr) = s.split();
        let result = tokio::select! {
            r = self.feed.read_acks(&self.inflight, rd) => r,
            r = self.write(wr) => r,
            e = self.inflight.watchdog(self.stall) => Err(e),
            _ = self.feed.cancel.cancelled() => Err(TransportError::Closed),
        };
        let mut left = self.inflight.drain();
        left.extend(self.again.lock().unwrap().drain(..).rev());
        self.feed.end_stream_with(left, result);
    }

    /// Batches from the queue, as frames, within the window. Returns when
    /// the queue closes; the acknowledgements still come in meanwhile.
    async fn write(&self, mut wr: DataWriter) -> Result<(), TransportError> {
        let io = |source| TransportError::Io { what: "writing pages", source };
        // A frame is built after room for a sealed record's prefix, and
        // leaves room for its tag: sealing happens in place.
        let at = seal::PREFIX + HEADER_LEN;
        let mut buf = Vec::with_capacity(at + PIECE + seal::TAG);
        let mut spare = Vec::new();
        let max_pages = PIECE / PAGE_SIZE;
        loop {
            self.inflight.reserve().await;
            let again = self.again.lock().unwrap().pop();
            let batch = match again {
                Some(b) => b,
                None => match self.feed.backlog.recv().await {
                    Ok(b) => b,
                    // Queue closed: wait for the last acknowledgements.
                    Err(_) => return std::future::pending().await,
                },
            };
            let id = batch.id;
            let pieces: Vec<(usize, usize)> = batch
                .runs
                .iter()
                .flat_map(|r| {
                    (0..r.pages).step_by(max_pages).map(move |i| (r.first_page + i, max_pages.min(r.pages - i)))
                })
                .collect();
            self.inflight.push(id, batch);
            for (first, pages) in pieces {
                buf.clear();
                buf.resize(at, 0);
                self.ram.read_pages(first, pages, &mut buf)?;
                if let Some(o) = &self.observer {
                    for (i, page) in buf[at..].chunks_exact(PAGE_SIZE).enumerate() {
                        o.observe(first + i, page);
                    }
                }
                let (region, offset) = self.ram.layout().locate(first);
                if self.zero_frames {
                    self.write_sparse(&mut wr, (&mut buf, &mut spare), (region, offset)).await?;
                } else {
                    let len = buf.len() - at;
                    buf[seal::PREFIX..at].copy_from_slice(&Frame::Pages { region, offset, len: len as u32 }.encode());
                    wr.write_frame(&mut buf).await.map_err(io)?;
                    self.feed.sent(len as u64);
                }
            }
            wr.write_all(&Frame::BatchEnd { batch: id }.encode()).await.map_err(io)?;
            // The batch's last bytes leave now, not with the next batch.
            wr.flush().await.map_err(io)?;
        }
    }

    /// Writes the pages read into `buf` (after room for a header) at
    /// `offset` of `region`: runs of all-zero pages as zero frames, the
    /// others as page frames (copied into `spare` with room for their
    /// header when the piece is mixed).
    async fn write_sparse(
        &self,
        wr: &mut DataWriter,
        (buf, spare): (&mut Vec<u8>, &mut Vec<u8>),
        (region, offset): (u32, u64),
    ) -> Result<(), TransportError> {
        let io = |source| TransportError::Io { what: "writing pages", source };
        let at = seal::PREFIX + HEADER_LEN;
        // OR-folding vectorizes; the pages were just copied, so in cache.
        let zero: Vec<bool> =
            buf[at..].chunks_exact(PAGE_SIZE).map(|p| p.iter().fold(0u8, |a, &b| a | b) == 0).collect();
        if !zero.contains(&true) {
            let len = buf.len() - at;
            buf[seal::PREFIX..at].copy_from_slice(&Frame::Pages { region, offset, len: len as u32 }.encode());
            wr.write_frame(buf).await.map_err(io)?;
            self.feed.sent(len as u64);
            return Ok(());
        }
        let mut i = 0;
        while i < zero.len() {
            let start = i;
            while i < zero.len() && zero[i] == zero[start] {
                i += 1;
            }
            let (off, len) = (offset + (start * PAGE_SIZE) as u64, ((i - start) * PAGE_SIZE) as u32);
            if zero[start] {
                wr.write_all(&Frame::Zero { region, offset: off, len }.encode()).await.map_err(io)?;
                self.feed.zero_pages.fetch_add((i - start) as u64, std::sync::atomic::Ordering::Relaxed);
                continue;
            }
            spare.clear();
            spare.resize(at, 0);
            spare.extend_from_slice(&buf[at + start * PAGE_SIZE..at + i * PAGE_SIZE]);
            spare[seal::PREFIX..at].copy_from_slice(&Frame::Pages { region, offset: off, len }.encode());
            wr.write_frame(spare).await.map_err(io)?;
            self.feed.sent(len as u64);
        }
        Ok(())
    }
}
