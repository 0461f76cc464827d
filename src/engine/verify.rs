//! End-to-end verification: checksums (xxh3) of the source's and the
//! destination's RAM must agree before the VM may run there; a block that
//! differs is resent, never ignored.
//!
//! The unit is a block (64 KiB by default; larger for RAM above 64 GiB, so
//! that there are at most 2^20): a guest's scattered writes then taint
//! little. `live` (the default) keeps the whole-RAM comparison out of the
//! pause. Once the rounds converge, every block the target holds whole is
//! compared while the guest runs, between two dirty syncs: a block that
//! differs although the tracker reported none of its pages is a **tracker
//! miss** (resent, counted, logged), and from then on the pause compares
//! every block, since the tracker is known to miss writes. Otherwise the
//! pause compares only the blocks sent or reported dirty since the pass.
//! `full` compares every block in the pause; `off` trusts the tracker.
//! DESIGN.md explains the choice and its limit.

use super::link::LinkError;
use super::options::VerifyMode;
use super::report::{VerifyPass, VerifyReport, VerifyWhen};
use super::schedule::SOURCE;
use super::{EngineError, Migration};
use crate::bitmap::Bitmap;
use crate::ledger::HostId;
use crate::memory::{Blocks, Layout};
use crate::protocol::Message;
use std::time::{Duration, Instant};

/// Blocks hashed to measure what comparing one costs.
const SAMPLE_BLOCKS: usize = 1024;
/// Blocks compared per request (a few hundred KiB of checksums each way).
const COMPARE_BATCH: usize = 1 << 15;
/// Resends the pause tries before it gives up.
const PAUSE_TRIES: usize = 3;
/// Pages per block, at least (16 KiB): a page written taints this much.
const BLOCK_PAGES: usize = 4;
/// Live passes after the first, at most, to shrink what the pause compares.
const MORE_LIVE_PASSES: usize = 3;
/// Most blocks a RAM is cut into (the checksum messages stay a few MiB).
const MAX_BLOCKS: usize = 1 << 20;

/// What verification knows: which blocks the target is proven to hold.
pub(super) struct Verifier {
    mode: VerifyMode,
    blocks: Blocks,
    /// Blocks not proven equal at the target since they last changed.
    unverified: Bitmap,
    /// The target the live pass compared, if it ran.
    live_target: Option<HostId>,
    /// Why the pause must compare every block, if it must.
    full_pause: Option<String>,
    /// Time to compare one block (both ends hash in parallel).
    per_block: Option<Duration>,
    /// Live passes so far for the current target.
    live_passes: usize,
    /// What the report says.
    pub report: VerifyReport,
}

impl Verifier {
    pub(super) fn new(mode: VerifyMode, layout: &Layout) -> Self {
        let chunk_pages = layout.chunks().iter().map(|c| c.pages).max().unwrap_or(1);
        let bp = BLOCK_PAGES.max(layout.total_pages().div_ceil(MAX_BLOCKS).next_power_of_two()).min(chunk_pages);
        let blocks = Blocks::new(layout, bp);
        let mut unverified = Bitmap::new(blocks.len());
        (0..blocks.len()).for_each(|b| unverified.set(b));
        let full_pause = (mode == VerifyMode::Full).then(|| "--verify full".to_owned());
        let report = VerifyReport { mode, block_bytes: bp as u64 * 4096, ..Default::default() };
        Self { mode, blocks, unverified, live_target: None, full_pause, per_block: None, live_passes: 0, report }
    }

    /// Page `p` changed at the target (or may have): its block must be compared again.
    pub(super) fn touch(&mut self, layout: &Layout, p: usize) {
        self.unverified.set(self.blocks.of_page(layout, p));
    }

    /// The target changed: nothing is proven about the new one.
    pub(super) fn new_target(&mut self) {
        (0..self.unverified.len()).for_each(|b| self.unverified.set(b));
        self.live_target = None;
        self.live_passes = 0;
    }

    /// Whether a live pass should run now that the rounds converged: the
    /// first one always; more (a few) while what the pause would compare of
    /// the blocks the target holds would take over a quarter of `limit`
    /// (the guest keeps writing between the pass and the pause).
    pub(super) fn live_pass_due(&self, target: HostId, stale: &Bitmap, limit: Duration) -> bool {
        if self.first_live_pass_due(target) {
            return true;
        }
        let pending = (0..self.unverified.len()).filter(|&b| self.unverified.get(b) && !stale.get(b)).count();
        self.another_live_pass_allowed(target) && self.per_block.unwrap_or_default() * pending as u32 > limit / 4
    }

    /// Live passes can prove anything: the mode is `live` and no tracker
    /// miss made the pause compare every block anyway.
    fn live_passes_help(&self) -> bool {
        self.mode == VerifyMode::Live && self.full_pause.is_none()
    }

    /// Whether one more live pass may run against `target`, which a pass
    /// already compared (the pause's backlog is what the guest wrote since).
    pub(super) fn another_live_pass_allowed(&self, target: HostId) -> bool {
        self.live_passes_help() && self.live_target == Some(target) && self.live_passes <= MORE_LIVE_PASSES
    }

    /// Whether no live pass ran against `target` yet, though one could:
    /// before a forced switchover, one pass keeps the pause from comparing
    /// every block.
    pub(super) fn first_live_pass_due(&self, target: HostId) -> bool {
        self.live_passes_help() && self.live_target != Some(target)
    }

    /// The blocks the pause compares now: every block, or those not proven
    /// since they last changed (every block if the live pass never ran).
    fn pause_blocks(&self) -> Vec<usize> {
        match (self.mode, &self.full_pause) {
            (VerifyMode::Off, _) => vec![],
            (_, Some(_)) => (0..self.unverified.len()).collect(),
            _ => self.unverified.iter_ones().collect(),
        }
    }

    /// What the pause's comparison would cost if the VM paused now, with
    /// `stale` the blocks the final round would send: for the downtime
    /// estimate, which counts what the pause will really do.
    pub(super) fn pause_cost(&self, target: HostId, stale: &Bitmap) -> Duration {
        let n = match (self.mode, &self.full_pause) {
            (VerifyMode::Off, _) => 0,
            (_, Some(_)) => self.unverified.len(),
            // Before the live pass, assume it will prove what the target holds.
            _ if self.live_target != Some(target) => stale.count(),
            _ => (0..self.unverified.len()).filter(|&b| self.unverified.get(b) || stale.get(b)).count(),
        };
        self.per_block.unwrap_or_default() * n as u32
    }

    /// Whether the pause compares anything.
    pub(super) fn on(&self) -> bool {
        self.mode != VerifyMode::Off
    }
}

impl Migration {
    /// Blocks with a page the target lacks.
    pub(super) fn stale_blocks(&self) -> Bitmap {
        let (layout, t) = (self.ram.layout(), self.route.target());
        let mut out = Bitmap::new(self.verifier.blocks.len());
        for p in (0..layout.total_pages()).filter(|&p| !self.ledger.is_fresh(p, t)) {
            out.set(self.verifier.blocks.of_page(layout, p));
        }
        out
    }

    /// Times the hashing of a sample of blocks, once (verification's cost
    /// per block goes into the downtime estimate).
    pub(super) async fn measure_verification(&mut self) -> Result<(), EngineError> {
        if !self.verifier.on() || self.verifier.per_block.is_some() {
            return Ok(());
        }
        let n = self.verifier.blocks.len();
        let sample: Vec<usize> = (0..n).step_by(n.div_ceil(SAMPLE_BLOCKS).max(1)).collect();
        let k = sample.len().max(1) as u32;
        let (ram, blocks) = (self.ram.clone(), self.verifier.blocks.clone());
        let t = Instant::now();
        tokio::task::spawn_blocking(move || ram.block_checksums(&blocks, &sample)).await.map_err(EngineError::Task)?;
        self.verifier.per_block = Some(t.elapsed() / k);
        Ok(())
    }

    /// The target's checksums of `list`'s blocks. A version-1 peer knows only
    /// whole chunks: it is asked for every chunk, and a block then stands
    /// for its whole chunk (blocks of a chunk's size).
    async fn remote_checksums(&self, list: &[usize]) -> Result<Vec<u64>, EngineError> {
        let target = self.target_link();
        let lost = |e| self.lost(target.id, e);
        let v2 = target.features.chunked_device_state();
        let bp = self.verifier.blocks.block_pages();
        let pause = self.route.phase().paused();
        let m = match v2 {
            true => Message::ChecksumRequest {
                blocks: Some(list.iter().map(|&b| b as u32).collect()),
                block_pages: Some(bp as u32),
                pause,
            },
            false => Message::ChecksumRequest { blocks: None, block_pages: None, pause },
        };
        let bytes = list.len() as u64 * bp as u64 * 4096;
        let sums = match target.request_within(m, hashing_time(bytes)).await.map_err(lost)? {
            Message::Checksums { sums } => sums,
            other => return Err(lost(LinkError::Unexpected { request: "checksum_request", got: other.name() })),
        };
        let want = if v2 { list.len() } else { self.ram.layout().chunks().len() };
        if sums.len() != want {
            return Err(EngineError::Verify(format!("destination sent {} checksums, {want} asked for", sums.len())));
        }
        Ok(sums)
    }

    /// Compares `list`'s blocks on both ends, a batch at a time (what it
    /// holds stays small whatever the RAM's size); returns those that differ.
    async fn compare(&self, list: Vec<usize>) -> Result<Vec<usize>, EngineError> {
        let mut differ = vec![];
        // A version-1 peer hashes every chunk per request: one request.
        let v1 = !self.target_link().features.chunked_device_state();
        let per = if v1 { list.len().max(1) } else { COMPARE_BATCH };
        for batch in list.chunks(per) {
            differ.extend(self.compare_batch(batch.to_vec()).await?);
        }
        Ok(differ)
    }

    /// Compares `list`'s blocks on both ends (hashed in parallel).
    async fn compare_batch(&self, list: Vec<usize>) -> Result<Vec<usize>, EngineError> {
        let v1 = !self.target_link().features.chunked_device_state();
        let (ram, blocks, l) = (self.ram.clone(), self.verifier.blocks.clone(), list.clone());
        let local = tokio::task::spawn_blocking(move || match v1 {
            true => ram.checksums(),
            false => ram.block_checksums(&blocks, &l),
        });
        let remote = self.remote_checksums(&list).await?;
        let local = local.await.map_err(EngineError::Task)?;
        if v1 {
            // Whole chunks: a block differs if its chunk does.
            let layout = self.ram.layout();
            let chunk = |b: usize| self.verifier.blocks.get(layout, b).map_or(0, |x| x.chunk);
            return Ok(list.into_iter().filter(|&b| local[chunk(b)] != remote[chunk(b)]).collect());
        }
        Ok(list.iter().zip(local.iter().zip(&remote)).filter(|(_, (a, b))| a != b).map(|(&b, _)| b).collect())
    }

    /// A live pass: every block the target holds whole and that is not
    /// proven yet (the first time: all of them), compared while the guest
    /// runs, between the round's dirty sync and one more.
    pub(super) async fn live_pass(&mut self, stale: &Bitmap) -> Result<(), EngineError> {
        self.set_phase("verify (live)");
        let t = Instant::now();
        let unverified = &self.verifier.unverified;
        let candidates: Vec<usize> = (0..stale.len()).filter(|&b| !stale.get(b) && unverified.get(b)).collect();
        let differ = self.compare(candidates.clone()).await?;
        let written = self.dirty_sync().await?;
        let mut dirtied = Bitmap::new(stale.len());
        written.iter_ones().for_each(|p| dirtied.set(self.verifier.blocks.of_page(self.ram.layout(), p)));
        let misses: Vec<usize> = differ.iter().copied().filter(|&b| !dirtied.get(b)).collect();
        for &b in &candidates {
            if !dirtied.get(b) && misses.binary_search(&b).is_err() {
                self.verifier.unverified.clear(b);
            }
        }
        if !misses.is_empty() {
            tracing::warn!(blocks = ?misses, "live verification: the tracker missed writes in {} blocks; resending them, and the pause will compare every block", misses.len());
            self.invalidate_blocks(&misses);
            self.verifier.full_pause = Some(format!("the tracker missed writes in {} blocks", misses.len()));
        }
        self.verifier.live_target = Some(self.route.target());
        self.verifier.live_passes += 1;
        // What a comparison really costs, both ends in parallel, batched:
        // better than the first sample (one end, serial, cold) once the
        // pass was large enough to tell.
        if candidates.len() >= SAMPLE_BLOCKS {
            self.verifier.per_block = Some(t.elapsed() / candidates.len() as u32);
        }
        self.verifier.report.tracker_misses += misses.len() as u64;
        self.verifier.report.passes.push(VerifyPass {
            when: VerifyWhen::Live,
            blocks: candidates.len() as u64,
            ms: t.elapsed().as_secs_f64() * 1e3,
            mismatched: differ.len() as u64,
            tracker_misses: misses.len() as u64,
        });
        Ok(())
    }

    /// The target's copies of these blocks are wrong: only the source sends
    /// them again (a forwarder may hold the same bad bytes).
    fn invalidate_blocks(&mut self, list: &[usize]) {
        for &b in list {
            let Some(blk) = self.verifier.blocks.get(self.ram.layout(), b) else { continue };
            for h in (SOURCE + 1)..self.route.names().len() as HostId {
                self.ledger.invalidate(blk.first_page..blk.first_page + blk.pages, h);
            }
        }
    }

    /// In the pause: compares what is not proven yet, resends what differs.
    pub(super) async fn verify_in_pause(&mut self) -> Result<(), EngineError> {
        let mut list = self.verifier.pause_blocks();
        self.verifier.report.full_pause_reason = self.verifier.full_pause.clone();
        let mut first = true;
        for _ in 0..PAUSE_TRIES {
            let t = Instant::now();
            let n = list.len() as u64;
            let bad = self.compare(list).await?;
            // Paused, after the final sync and round: whatever still differs
            // was written without the tracker seeing it (or damaged on the way).
            let misses = if first { bad.len() as u64 } else { 0 };
            first = false;
            self.verifier.report.tracker_misses += misses;
            self.verifier.report.passes.push(VerifyPass {
                when: VerifyWhen::Pause,
                blocks: n,
                ms: t.elapsed().as_secs_f64() * 1e3,
                mismatched: bad.len() as u64,
                tracker_misses: misses,
            });
            if bad.is_empty() {
                return Ok(());
            }
            tracing::warn!(blocks = ?bad, "verification found mismatching blocks; resending them");
            self.report.verify_mismatched_chunks += bad.len() as u32;
            self.invalidate_blocks(&bad);
            self.drain().await?;
            list = bad;
        }
        Err(EngineError::Verify(format!("blocks still differ after {PAUSE_TRIES} resends")))
    }
}

/// A deadline for hashing `bytes` on the peer: its cores hash far faster
/// than 50 MB/s, and the base allows for a busy host.
fn hashing_time(bytes: u64) -> Duration {
    super::link::CONTROL_TIMEOUT + Duration::from_secs(bytes / 50_000_000)
}
