//! The migration engine, run by the source's agent as coordinator: rounds
//! of dirty pages until the estimated downtime fits, then the switchover
//! (pause, final round, verification, device state, resume elsewhere).
//!
//! The destination can change while it runs (retarget). Every host that
//! holds current pages can then send: the source sends what only it has, and
//! old destinations forward what they hold, chunk by chunk from a shared
//! pool that the source also drains from the other end, so both finish
//! together. Every decision about which page may go where is asked of the
//! [`Ledger`]; the engine only schedules chunks onto senders and feeds
//! completions back.

mod link;
pub mod report;

pub use report::{MigrationHandle, Outcome, Report, RetargetRequest};

use crate::bitmap::Bitmap;
use crate::dirty::{DirtyTracker, SendObserver, TrackerKind};
use crate::ledger::{HostId, Ledger, MAX_HOSTS};
use crate::memory::{GuestRam, Layout, DEFAULT_CHUNK_SIZE, PAGE_SIZE};
use crate::protocol::Message;
use crate::tls::TlsConfig;
use crate::transport::{Batch, Completion, Run};
use crate::vm::{SourceVm, VmError};
use base64::Engine as _;
use link::{Link, OpenArgs};
use report::{Downtime, RetargetReport, RoundReport, SenderTransport};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use thiserror::Error;
use tokio::sync::mpsc;

const SOURCE: HostId = 0;
/// Batches in flight per stream (kept below the sender's queue bound).
const PER_STREAM: usize = 6;
/// How long into a round the source may take pool chunks from forwarders.
/// Only the source can send pages the guest dirties, so it must not spend a
/// long round on work a forwarder can do while dirty pages pile up: it
/// steals for a bounded time, then syncs and sends what is newly dirty.
const STEAL_WINDOW: Duration = Duration::from_millis(250);
/// A forwarder's claims in flight per stream: small, because claimed chunks
/// cannot be taken back, so they bound how long the others wait at the end.
const FORWARD_PER_STREAM: usize = 2;

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum BudgetAction {
    /// Switch over anyway (downtime exceeds the limit).
    #[default]
    Force,
    /// Give up: the VM keeps running on the source.
    Abort,
}

pub use crate::transport::TransportKind;

#[derive(Serialize, Deserialize, Clone, Debug)]
#[serde(default)]
pub struct MigrateOptions {
    pub downtime_ms: u64,
    pub streams: usize,
    pub transport: TransportKind,
    pub max_rounds: u32,
    pub max_time_s: u64,
    pub on_budget: BudgetAction,
    pub verify: bool,
    /// Leave the VM paused on the destination (resume it with `dcmigrate resume`).
    pub suspend: bool,
    /// Force a tracker instead of the VM's best one.
    pub tracker: Option<TrackerKind>,
    pub chunk_size: u64,
    /// Cap on the source's sending rate in MB/s (like QEMU's max-bandwidth).
    pub max_bandwidth_mbps: Option<f64>,
    /// Test builds only: do not start the switchover before the API's
    /// `release` (retargets are still served meanwhile), so that a test can
    /// act on a migration that is certain not to have ended.
    #[cfg(feature = "test-hooks")]
    pub hold_switchover: bool,
}

impl Default for MigrateOptions {
    fn default() -> Self {
        Self {
            downtime_ms: 300,
            streams: 4,
            transport: TransportKind::Auto,
            max_rounds: 30,
            max_time_s: 600,
            on_budget: BudgetAction::Force,
            verify: true,
            suspend: false,
            tracker: None,
            chunk_size: DEFAULT_CHUNK_SIZE,
            max_bandwidth_mbps: None,
            #[cfg(feature = "test-hooks")]
            hold_switchover: false,
        }
    }
}

/// What the engine needs of its agent.
pub struct Context {
    pub me: String,
    pub tls: TlsConfig,
    /// Test-only: disables the ledger's one-writer rule (DCMIGRATE_TEST_UNORDERED).
    pub unordered: bool,
    /// This host's RDMA device, if it has a usable one (else why not).
    pub rdma: Result<Arc<crate::transport::rdma::Rdma>, String>,
}

#[derive(Debug, Error)]
pub enum EngineError {
    #[error("cancelled")]
    Cancelled,
    #[error("{0}")]
    Setup(String),
    #[error("destination {host} lost: {why}")]
    DestinationLost { host: String, why: String },
    #[error("budget exhausted: {0}")]
    GaveUp(String),
    #[error("VM: {0}")]
    Vm(#[from] VmError),
    #[error("verification failed: {0}")]
    Verify(String),
}

/// A retarget whose new destination is being prepared.
struct Opening {
    to: String,
    forward: bool,
    reply: tokio::sync::oneshot::Sender<Result<(), String>>,
}

type Opened = Result<Arc<Link>, EngineError>;

struct Migration {
    ctx: Context,
    vm: Arc<dyn SourceVm>,
    opts: MigrateOptions,
    handle: Arc<MigrationHandle>,
    start: Instant,
    report: Report,
    ram: Option<Arc<GuestRam>>,
    ledger: Ledger,
    tracker: Option<Box<dyn DirtyTracker>>,
    /// Pages that were holes when tracking began and were not reported
    /// written since: zero at the source, so never sent.
    zero_pages: Option<Bitmap>,
    observer: Option<Arc<dyn SendObserver>>,
    /// Host names by id; id 0 is the source.
    hosts: Vec<String>,
    links: HashMap<HostId, Arc<Link>>,
    target: HostId,
    /// Old destinations forwarding to the target, newest first.
    forwarders: Vec<HostId>,
    /// Chunks a forwarder can send (front: the forwarder; back: the source steals).
    pools: HashMap<HostId, VecDeque<usize>>,
    /// Chunks with pages only the source holds, this round.
    queue: VecDeque<usize>,
    /// Batches in flight by sending host.
    outstanding: HashMap<HostId, usize>,
    completions_tx: mpsc::UnboundedSender<Completion>,
    completions: mpsc::UnboundedReceiver<Completion>,
    retargets: mpsc::UnboundedReceiver<RetargetRequest>,
    opened_tx: mpsc::UnboundedSender<Opened>,
    opened: mpsc::UnboundedReceiver<Opened>,
    opening: Option<Opening>,
    /// Failed forwards whose pages stay locked until the target fenced
    /// their sender (its late frames could otherwise land on newer pages).
    fencing: HashMap<HostId, (HostId, Vec<Batch>)>,
    fenced: std::collections::HashSet<HostId>,
    fenced_tx: mpsc::UnboundedSender<(HostId, Result<(), EngineError>)>,
    fenced_rx: mpsc::UnboundedReceiver<(HostId, Result<(), EngineError>)>,
    next_batch: u64,
    /// Bytes applied at the target and time spent, for the throughput estimate.
    applied_bytes: u64,
    busy_time: Duration,
    last_sync: Instant,
    last_sync_cost: Duration,
    /// Measured time of one verification pass, counted into the downtime estimate.
    verify_cost: Option<Duration>,
    round_start: Instant,
    round: RoundReport,
    /// Bytes the source submitted this round, for `max_bandwidth_mbps`.
    paced_bytes: u64,
    pace_until: Option<tokio::time::Instant>,
    paused: bool,
    /// Past the point where the destination can change.
    switching: bool,
    resume_sent: bool,
}

/// Migrates `vm` to `to` (at `addr`); never panics, always returns a report.
pub async fn run(
    ctx: Context,
    vm: Arc<dyn SourceVm>,
    to: String,
    addr: SocketAddr,
    opts: MigrateOptions,
    handle: Arc<MigrationHandle>,
) -> Report {
    let rec = vm.record().clone();
    let report = Report {
        vm: rec.name.clone(),
        source: ctx.me.clone(),
        destination: to.clone(),
        ram_bytes: rec.ram.iter().map(|r| r.size).sum(),
        transport: "tcp".into(),
        streams: opts.streams,
        ..Default::default()
    };
    let (completions_tx, completions) = mpsc::unbounded_channel();
    let (opened_tx, opened) = mpsc::unbounded_channel();
    let (fenced_tx, fenced_rx) = mpsc::unbounded_channel();
    let retargets = handle.take_retargets();
    let mut m = Migration {
        hosts: vec![ctx.me.clone()],
        ctx,
        vm,
        opts,
        handle,
        start: Instant::now(),
        report,
        ram: None,
        ledger: Ledger::new(0, SOURCE),
        tracker: None,
        zero_pages: None,
        observer: None,
        links: HashMap::new(),
        target: SOURCE,
        forwarders: vec![],
        pools: HashMap::new(),
        queue: VecDeque::new(),
        outstanding: HashMap::new(),
        completions_tx,
        completions,
        retargets,
        opened_tx,
        opened,
        opening: None,
        fencing: HashMap::new(),
        fenced: Default::default(),
        fenced_tx,
        fenced_rx,
        next_batch: 1,
        applied_bytes: 0,
        busy_time: Duration::ZERO,
        last_sync: Instant::now(),
        last_sync_cost: Duration::ZERO,
        verify_cost: None,
        round_start: Instant::now(),
        round: RoundReport::default(),
        paced_bytes: 0,
        pace_until: None,
        paused: false,
        switching: false,
        resume_sent: false,
    };
    let result = m.execute(to, addr).await;
    m.finish(result).await
}

impl Migration {
    fn phase(&self, phase: &str) {
        tracing::info!(vm = %self.report.vm, "phase: {phase}");
        self.handle.set_progress(|p| p.phase = phase.into());
    }

    fn check_cancel(&self) -> Result<(), EngineError> {
        if self.handle.cancel.is_cancelled() && !self.resume_sent {
            return Err(EngineError::Cancelled);
        }
        Ok(())
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(Arc<dyn SourceVm>) -> Result<T, VmError> + Send + 'static,
    ) -> Result<T, EngineError> {
        let vm = self.vm.clone();
        Ok(tokio::task::spawn_blocking(move || f(vm)).await.map_err(|e| EngineError::Setup(e.to_string()))??)
    }

    fn ram(&self) -> Arc<GuestRam> {
        self.ram.clone().expect("RAM is mapped after setup")
    }

    fn target_link(&self) -> Arc<Link> {
        self.links[&self.target].clone()
    }

    async fn execute(&mut self, to: String, addr: SocketAddr) -> Result<(), EngineError> {
        self.setup(to, addr).await?;
        let switchover = self.precopy().await?;
        self.report.switchover = Some(switchover.into());
        self.switchover().await
    }

    /// Opens a session on `host` as host id `id` (runs as its own task, so
    /// that a slow or unreachable host does not stall the migration).
    fn open_link(
        &self,
        host: String,
        id: HostId,
        addr: SocketAddr,
    ) -> impl std::future::Future<Output = Result<Arc<Link>, EngineError>> + Send + 'static {
        let tls = self.ctx.tls.clone();
        let me = self.ctx.me.clone();
        let rec = self.vm.record().clone();
        let (chunk_size, streams) = (self.opts.chunk_size, self.opts.streams);
        let ram = self.ram();
        let observer = self.observer.clone();
        let completions = self.completions_tx.clone();
        let (transport, rdma) = (self.opts.transport, self.ctx.rdma.clone());
        async move {
            Link::open(OpenArgs {
                tls: &tls,
                me: &me,
                host: &host,
                id,
                addr,
                vm: &rec,
                chunk_size,
                streams,
                ram,
                observer,
                completions,
                transport,
                rdma,
            })
            .await
        }
    }

    async fn setup(&mut self, to: String, addr: SocketAddr) -> Result<(), EngineError> {
        self.phase("setup");
        let rec = self.vm.record().clone();
        let layout = Layout::new(rec.regions(), self.opts.chunk_size).map_err(|e| EngineError::Setup(e.to_string()))?;
        let paths: Vec<_> = rec.ram.iter().map(|r| r.path.clone()).collect();
        let ram = Arc::new(
            GuestRam::open(layout.clone(), &paths)
                .map_err(|e| EngineError::Setup(format!("mapping the VM's RAM: {e}")))?,
        );
        self.ledger = Ledger::new(layout.total_pages(), SOURCE);
        self.ledger.set_unordered(self.ctx.unordered);
        if self.ctx.unordered {
            tracing::warn!("test switch: the one-writer rule is OFF; pages may arrive stale");
        }
        self.handle.set_progress(|p| {
            p.ram_bytes = layout.total_bytes();
            p.remaining_bytes = layout.total_bytes();
            p.target = to.clone();
        });

        // Tracker: the one asked for, else the VM's best that passes its self-test.
        let kinds = match self.opts.tracker {
            Some(k) => vec![k],
            None => self.vm.trackers(),
        };
        let mut errors = vec![];
        for kind in kinds {
            let r = ram.clone();
            match self.blocking(move |vm| vm.start_tracker(kind, &r)).await {
                Ok(t) => {
                    tracing::info!(tracker = kind.name(), "dirty tracker ready");
                    self.tracker = Some(t);
                    break;
                }
                Err(e) => {
                    tracing::warn!(tracker = kind.name(), "tracker unusable: {e}");
                    errors.push(e.to_string());
                }
            }
        }
        let tracker = self
            .tracker
            .as_mut()
            .ok_or_else(|| EngineError::Setup(format!("no dirty tracker works: {}", errors.join("; "))))?;
        self.report.tracker = Some(tracker.kind().name().into());
        self.observer = tracker.observer();
        self.ram = Some(ram.clone());
        self.check_cancel()?;

        // Everything is unsent: start tracking from here. Then find the holes,
        // before the data plane opens (registering RAM for RDMA allocates them).
        self.tracker.as_mut().expect("tracker").sync(&ram).map_err(|e| EngineError::Setup(e.to_string()))?;
        self.last_sync = Instant::now();
        let r = ram.clone();
        match tokio::task::spawn_blocking(move || r.data_pages()).await {
            Ok(Ok(data)) => {
                let mut zero = Bitmap::new(data.len());
                (0..data.len()).filter(|&p| !data.get(p)).for_each(|p| zero.set(p));
                self.zero_pages = Some(zero);
            }
            other => tracing::info!("not skipping zero pages: {other:?}"),
        }

        self.hosts.push(to.clone());
        let link = self.open_link(to, 1, addr).await?;
        self.note_transport(&link);
        self.links.insert(1, link);
        self.target = 1;
        self.skip_holes();
        Ok(())
    }

    /// A destination's RAM starts as a new zero-filled file, so pages that
    /// were holes at the source when tracking began, and have not been
    /// reported written since, need not travel to it (QEMU's zero-page
    /// skipping, without even reading them). A page written after the scan
    /// is in the tracker's next sync, which makes it stale again.
    fn skip_holes(&mut self) {
        let Some(zero) = self.zero_pages.as_ref() else { return };
        let t = self.target;
        let mut n = 0;
        for p in zero.iter_ones() {
            if self.ledger.is_fresh(p, t) {
                continue;
            }
            if let Some(e) = self.ledger.begin(p, SOURCE, t) {
                n += u64::from(self.ledger.finish(p, SOURCE, t, e, true));
            }
        }
        self.report.zero_pages_skipped += n;
    }

    fn remaining_bytes(&self) -> u64 {
        (self.ledger.pages() - self.ledger.fresh_count(self.target)) as u64 * PAGE_SIZE as u64
    }

    fn throughput(&self) -> f64 {
        let t = self.busy_time + self.round_start.elapsed();
        self.applied_bytes as f64 / t.as_secs_f64().max(1e-3)
    }

    /// Rounds of dirty pages; returns how the switchover was reached.
    async fn precopy(&mut self) -> Result<&'static str, EngineError> {
        let limit = Duration::from_millis(self.opts.downtime_ms);
        let budget = Duration::from_secs(self.opts.max_time_s);
        let mut counted = 0u32;
        self.begin_round();
        loop {
            self.fill()?;
            if !self.round_over() {
                self.wait_event().await?;
                continue;
            }
            self.end_round();
            if self.opts.verify && self.verify_cost.is_none() {
                // Verification is part of the downtime: time one pass of
                // hashing all RAM (the destination's runs in parallel). Done
                // before the sync, so what the guest writes meanwhile counts.
                let ram = self.ram();
                let t = Instant::now();
                let _ = tokio::task::spawn_blocking(move || ram.checksums()).await;
                self.verify_cost = Some(t.elapsed());
            }
            let dirty = self.dirty_sync().await?;
            let last = self.report.rounds.last_mut().expect("round recorded");
            last.dirty_pages = dirty as u64;
            last.sync_ms = self.last_sync_cost.as_secs_f64() * 1e3;
            let round = last.round;
            tracing::info!(round, pages = last.pages, ms = last.ms, dirty, "round done");
            // Small late rounds move slower than the first, big one (TCP
            // restarts slowly after the pause for the sync), and the final
            // round is one of them: predict with the slower of the overall
            // rate and the last round's.
            let last = self.report.rounds.last().expect("round recorded");
            let last_rate =
                if last.ms > 0.0 && last.bytes >= 1 << 20 { last.bytes as f64 / (last.ms / 1e3) } else { f64::MAX };
            let rate = self.throughput().min(last_rate).max(1.0);
            let estimate =
                Duration::from_secs_f64(self.remaining_bytes() as f64 / rate) + self.verify_cost.unwrap_or_default();
            // Forwarders' work is done while the VM still runs: their rate
            // is not in the estimate, and they have nothing dirty to wait for.
            let forwarding =
                self.pools.values().any(|p| !p.is_empty()) || self.forwarders.iter().any(|&f| self.outstanding(f) > 0);
            if estimate <= limit && !forwarding {
                if self.held().await? {
                    self.begin_round();
                    continue;
                }
                return Ok("converged");
            }
            // Rounds cut short while forwarders still hold work do not count
            // against the round budget (the time budget still applies).
            if self.pools.values().all(|p| p.is_empty()) {
                counted += 1;
            }
            if counted >= self.opts.max_rounds || self.start.elapsed() >= budget {
                let why = format!(
                    "after {} rounds and {:.1} s, {} MB still dirty (estimated downtime {} ms > {} ms)",
                    counted,
                    self.start.elapsed().as_secs_f64(),
                    self.remaining_bytes() / 1_000_000,
                    estimate.as_millis(),
                    limit.as_millis()
                );
                if self.held().await? {
                    self.begin_round();
                    continue;
                }
                return match self.opts.on_budget {
                    BudgetAction::Force => {
                        tracing::warn!("forcing switchover: {why}");
                        Ok("forced")
                    }
                    BudgetAction::Abort => Err(EngineError::GaveUp(why)),
                };
            }
            self.begin_round();
        }
    }

    /// Test builds: waits at the switchover until the test releases the
    /// migration; true if a retarget was installed meanwhile (there is then
    /// more to send first).
    #[cfg(feature = "test-hooks")]
    async fn held(&mut self) -> Result<bool, EngineError> {
        if !self.opts.hold_switchover {
            return Ok(false);
        }
        let retargets = self.report.retargets.len();
        let mut released = self.handle.released.subscribe();
        while !*released.borrow() {
            tokio::select! {
                r = self.wait_event() => r?,
                _ = released.changed() => {}
            }
            if self.report.retargets.len() != retargets {
                return Ok(true);
            }
        }
        tracing::info!("test hold released: switching over");
        Ok(false)
    }

    #[cfg(not(feature = "test-hooks"))]
    async fn held(&mut self) -> Result<bool, EngineError> {
        Ok(false)
    }

    /// A round is over when the source has nothing left to send and nothing
    /// in flight, and either it sent something or the forwarders are idle
    /// too (so it does not spin through empty rounds while they work).
    fn round_over(&self) -> bool {
        let forwarding: usize = self.forwarders.iter().map(|f| self.outstanding(*f)).sum();
        self.queue.is_empty()
            && (self.pools.values().all(|p| p.is_empty()) || !self.may_steal())
            && self.outstanding(SOURCE) == 0
            && self.pace_until.is_none()
            && self.fencing.is_empty()
            && (self.round.pages > 0 || forwarding == 0)
    }

    fn outstanding(&self, h: HostId) -> usize {
        self.outstanding.get(&h).copied().unwrap_or(0)
    }

    fn begin_round(&mut self) {
        self.round = RoundReport { round: self.report.rounds.len() as u32, ..Default::default() };
        if !self.paused {
            self.phase(&format!("round {}", self.round.round));
        }
        self.round_start = Instant::now();
        self.paced_bytes = 0;
        self.handle.set_progress(|p| p.round = self.round.round);
        self.plan();
    }

    fn end_round(&mut self) {
        let dt = self.round_start.elapsed();
        self.round.ms = dt.as_secs_f64() * 1e3;
        if self.round.bytes > 0 {
            self.busy_time += dt;
        }
        self.round_start = Instant::now();
        self.report.rounds.push(self.round.clone());
    }

    /// Sorts the chunks with pages the target lacks: into the pool of the
    /// newest forwarder holding some of them, and into the source's queue if
    /// some are held by no forwarder. Releases forwarders with nothing left.
    fn plan(&mut self) {
        self.queue.clear();
        self.pools.clear();
        let ram = self.ram();
        let t = self.target;
        for (ci, c) in ram.layout().chunks().iter().enumerate() {
            let (mut own, mut pool) = (false, None);
            for p in c.first_page..c.first_page + c.pages {
                if self.ledger.is_fresh(p, t) || self.ledger.is_busy(p, t) {
                    continue;
                }
                match self.forwarders.iter().find(|&&f| self.ledger.is_fresh(p, f)) {
                    Some(&f) => pool = pool.or(Some(f)),
                    None => own = true,
                }
            }
            if own {
                self.queue.push_back(ci);
            }
            if let Some(f) = pool {
                self.pools.entry(f).or_default().push_back(ci);
            }
        }
        for f in self.forwarders.clone() {
            if self.pools.get(&f).is_none_or(|p| p.is_empty()) && self.outstanding(f) == 0 {
                self.release(f, "it holds nothing the new destination lacks");
            }
        }
    }

    /// Pages of chunk `ci` that `from` sends to the target now, begun in the
    /// ledger (busy pages are skipped: one writer per page at a time).
    fn make_batch(&mut self, ci: usize, from: HostId, only_own: bool) -> Option<Batch> {
        let c = self.ram().layout().chunks()[ci];
        let t = self.target;
        let (mut runs, mut epochs): (Vec<Run>, Vec<u32>) = (vec![], vec![]);
        for p in c.first_page..c.first_page + c.pages {
            if self.ledger.is_fresh(p, t) {
                continue;
            }
            if from == SOURCE && only_own && self.forwarders.iter().any(|&f| self.ledger.is_fresh(p, f)) {
                continue;
            }
            let Some(e) = self.ledger.begin(p, from, t) else { continue };
            epochs.push(e);
            match runs.last_mut() {
                Some(r) if r.first_page + r.pages == p => r.pages += 1,
                _ => runs.push(Run { first_page: p, pages: 1 }),
            }
        }
        if runs.is_empty() {
            return None;
        }
        let id = self.next_batch;
        self.next_batch += 1;
        Some(Batch { id, chunk: ci, from, to: t, runs, epochs })
    }

    fn abandon(&mut self, b: &Batch) {
        for (p, e) in b.pages().zip(&b.epochs) {
            self.ledger.finish(p, b.from, b.to, *e, false);
        }
    }

    /// Hands out work up to each sender's window.
    fn fill(&mut self) -> Result<(), EngineError> {
        let window = self.opts.streams.max(1) * PER_STREAM;
        let forward_window = self.opts.streams.max(1) * FORWARD_PER_STREAM;
        for f in self.forwarders.clone() {
            while self.outstanding(f) < forward_window {
                let Some(ci) = self.pools.get_mut(&f).and_then(|p| p.pop_front()) else { break };
                let Some(b) = self.make_batch(ci, f, false) else { continue };
                if let Err(b) = self.links[&f].forward(b, &self.hosts[self.target as usize]) {
                    self.abandon(&b);
                    self.forwarder_lost(f, "control connection closed");
                    break;
                }
                *self.outstanding.entry(f).or_default() += 1;
            }
        }
        let cap = self.opts.max_bandwidth_mbps.filter(|r| *r > 0.0).map(|r| r * 1e6);
        while self.outstanding(SOURCE) < window && self.pace_until.is_none() {
            let (ci, only_own) = match self.queue.pop_front() {
                Some(ci) => (ci, true),
                None => match self.steal() {
                    Some(ci) => (ci, false),
                    None => break,
                },
            };
            let Some(b) = self.make_batch(ci, SOURCE, only_own) else { continue };
            let bytes = b.epochs.len() as u64 * PAGE_SIZE as u64;
            if let Err(b) = self.target_link().submit(b) {
                self.abandon(&b);
                return Err(EngineError::DestinationLost {
                    host: self.hosts[self.target as usize].clone(),
                    why: "data streams closed".into(),
                });
            }
            *self.outstanding.entry(SOURCE).or_default() += 1;
            if let Some(rate) = cap {
                // Never ahead of rate × elapsed.
                self.paced_bytes += bytes;
                let due = Duration::from_secs_f64(self.paced_bytes as f64 / rate);
                if let Some(wait) = due.checked_sub(self.round_start.elapsed()) {
                    self.pace_until = Some(tokio::time::Instant::now() + wait);
                }
            }
        }
        Ok(())
    }

    /// A chunk from the back of the longest forwarder pool, for the source.
    fn steal(&mut self) -> Option<usize> {
        if !self.may_steal() {
            return None;
        }
        self.pools.values_mut().filter(|p| !p.is_empty()).max_by_key(|p| p.len())?.pop_back()
    }

    /// Paused, nothing gets dirty: steal freely. Running: for a bounded part
    /// of each round (longer if syncs are slow, as with the hash tracker).
    fn may_steal(&self) -> bool {
        self.paused || self.round_start.elapsed() < STEAL_WINDOW.max(self.last_sync_cost * 4)
    }

    async fn wait_event(&mut self) -> Result<(), EngineError> {
        let pace = self.pace_until;
        tokio::select! {
            c = self.completions.recv() => match c {
                Some(c) => self.on_completion(c),
                None => Err(EngineError::Setup("completion channel closed".into())),
            },
            r = self.retargets.recv(), if !self.switching => {
                if let Some(r) = r {
                    self.start_retarget(r);
                }
                Ok(())
            }
            o = self.opened.recv() => {
                if let Some(o) = o {
                    self.install_target(o).await;
                }
                Ok(())
            }
            f = self.fenced_rx.recv() => match f {
                Some((host, r)) => {
                    let (at, batches) = self.fencing.remove(&host).unwrap_or_default();
                    // A fence that failed at a host that is no longer the
                    // target does not matter: nothing writes there any more.
                    if let Err(e) = r {
                        if at == self.target {
                            return Err(e);
                        }
                    }
                    for b in batches {
                        self.abandon(&b);
                    }
                    self.fenced.insert(host);
                    self.plan();
                    Ok(())
                }
                None => Ok(()),
            },
            _ = tokio::time::sleep_until(pace.unwrap_or_else(tokio::time::Instant::now)), if pace.is_some() => {
                self.pace_until = None;
                Ok(())
            }
            _ = self.handle.cancel.cancelled(), if !self.resume_sent => Err(EngineError::Cancelled),
        }
    }

    fn on_completion(&mut self, c: Completion) -> Result<(), EngineError> {
        let (b, applied, why) = match c {
            Completion::Applied(b) => (b, true, String::new()),
            Completion::Failed(b, why) => (b, false, why),
        };
        if let Some(n) = self.outstanding.get_mut(&b.from) {
            *n = n.saturating_sub(1);
        }
        if !applied && b.from != SOURCE && b.to == self.target && !self.fenced.contains(&b.from) {
            // A forward to the target failed: its frames may still be in
            // flight. Its pages stay locked, this forwarder is dropped, and
            // the target fences it before anyone may rewrite those pages.
            let f = b.from;
            let first = !self.fencing.contains_key(&f);
            self.fencing.entry(f).or_insert_with(|| (b.to, vec![])).1.push(b);
            if first {
                self.forwarder_lost(f, &why);
                let (target, tx) = (self.target_link(), self.fenced_tx.clone());
                tokio::spawn(async move {
                    let r = target.call(Message::Fence { sender: f }, "ok").await;
                    let _ = tx.send((f, r));
                });
            }
            return Ok(());
        }
        let n = b.page_count() as u64;
        let mut accepted = 0u64;
        for (p, e) in b.pages().zip(&b.epochs) {
            accepted += u64::from(self.ledger.finish(p, b.from, b.to, *e, applied));
        }
        if applied {
            if b.to == self.target {
                self.round.pages += n;
                self.round.bytes += n * PAGE_SIZE as u64;
                self.applied_bytes += n * PAGE_SIZE as u64;
            }
            if accepted < n {
                tracing::debug!(batch = b.id, stale = n - accepted, "pages written meanwhile; they go again");
            }
            self.update_progress();
            return Ok(());
        }
        if b.to == self.target && b.from == SOURCE {
            return Err(EngineError::DestinationLost { host: self.hosts[b.to as usize].clone(), why });
        }
        // Other failures (transfers to an old destination, a re-pointed
        // forwarder's last batches) only leave their pages stale.
        Ok(())
    }

    fn update_progress(&self) {
        let fresh = self.ledger.fresh_count(self.target) as u64 * PAGE_SIZE as u64;
        let rate = self.throughput();
        let sent = self.sender_bytes().values().sum::<u64>();
        let elapsed = self.start.elapsed().as_secs_f64() * 1e3;
        self.handle.set_progress(|p| {
            p.bytes_sent = sent;
            p.at_destination_bytes = fresh;
            p.remaining_bytes = p.ram_bytes.saturating_sub(fresh);
            p.elapsed_ms = elapsed;
            p.rate_mbps = rate / 1e6;
            p.eta_s = (rate > 0.0).then(|| p.remaining_bytes as f64 / rate);
        });
    }

    /// Payload bytes each host has sent so far.
    fn sender_bytes(&self) -> BTreeMap<String, u64> {
        let mut out = BTreeMap::new();
        let own: u64 = self.links.values().map(|l| l.bytes_sent()).sum();
        out.insert(self.hosts[0].clone(), own);
        for (id, l) in &self.links {
            let f = l.forwarded_bytes.load(std::sync::atomic::Ordering::Relaxed);
            if f > 0 {
                out.insert(self.hosts[*id as usize].clone(), f);
            }
        }
        out
    }

    fn start_retarget(&mut self, r: RetargetRequest) {
        let refuse = |r: RetargetRequest, why: String| {
            let _ = r.reply.send(Err(why));
        };
        if self.switching {
            return refuse(r, "too late: the switchover has started".into());
        }
        if self.opening.is_some() {
            return refuse(r, "another retarget is being prepared".into());
        }
        if self.hosts.contains(&r.to) {
            let why = format!("{} already takes part in this migration", r.to);
            return refuse(r, why);
        }
        if self.hosts.len() >= MAX_HOSTS {
            return refuse(r, format!("at most {} hosts take part in one migration", MAX_HOSTS));
        }
        let id = self.hosts.len() as HostId;
        let open = self.open_link(r.to.clone(), id, r.addr);
        let tx = self.opened_tx.clone();
        tracing::info!(to = %r.to, forward = r.forward, "retarget: preparing the new destination");
        tokio::spawn(async move {
            let _ = tx.send(open.await);
        });
        self.opening = Some(Opening { to: r.to, forward: r.forward, reply: r.reply });
    }

    async fn install_target(&mut self, opened: Opened) {
        let Some(opening) = self.opening.take() else { return };
        let link = match opened {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(to = %opening.to, "retarget failed, continuing to {}: {e}", self.hosts[self.target as usize]);
                let _ = opening.reply.send(Err(e.to_string()));
                return;
            }
        };
        if self.switching {
            link.abort("too late: switchover started").await;
            let _ = opening.reply.send(Err("too late: the switchover has started".into()));
            return;
        }
        let old = self.target;
        // Sync first: pages the guest wrote since the last sync are not
        // current at the old destination, however the ledger saw them. The
        // new destination's work split (what the old one forwards, what only
        // the source has) then starts from the truth.
        if let Err(e) = self.dirty_sync().await {
            tracing::warn!("dirty sync at the retarget failed: {e}");
        }
        let at_old = self.ledger.fresh_count(old) as u64 * PAGE_SIZE as u64;
        self.hosts.push(opening.to.clone());
        self.note_transport(&link);
        self.links.insert(link.id, link.clone());
        self.target = link.id;
        // The source stops feeding the old destination.
        self.links[&old].close_sender();
        // Point every host that may forward at the new destination. Done
        // here, not earlier: from now on every batch names the new target,
        // and a forwarder refuses batches for any other.
        let mut candidates = vec![old];
        candidates.extend(std::mem::take(&mut self.forwarders));
        for h in candidates {
            let pointed = if opening.forward {
                let m = Message::ForwardTo {
                    host: opening.to.clone(),
                    data_addr: link.data_addr,
                    token: hex::encode(link.token),
                    streams: self.opts.streams,
                    sender: h,
                    rdma: link.rdma_offer.clone(),
                    transport: self.opts.transport,
                };
                match self.links[&h].request(m).await {
                    Ok(Message::ForwardReady { transport }) => {
                        self.report.senders.push(SenderTransport {
                            from: self.hosts[h as usize].clone(),
                            to: opening.to.clone(),
                            transport,
                        });
                        true
                    }
                    Ok(other) => {
                        tracing::warn!(host = %self.hosts[h as usize], "ForwardTo: unexpected {}", other.name());
                        false
                    }
                    Err(e) => {
                        tracing::warn!(host = %self.hosts[h as usize], "cannot forward to {}: {e}", opening.to);
                        false
                    }
                }
            } else {
                false
            };
            if pointed {
                self.forwarders.push(h);
            } else {
                self.release(h, if opening.forward { "it cannot forward" } else { "--no-forward" });
            }
        }
        let forwarding = self.forwarders.contains(&old);
        let at_ms = self.start.elapsed().as_secs_f64() * 1e3;
        tracing::info!(from = %self.hosts[old as usize], to = %opening.to, forwarding, at_old, "retargeted");
        self.report.retargets.push(RetargetReport {
            at_ms,
            from: self.hosts[old as usize].clone(),
            to: opening.to.clone(),
            forwarding,
            at_old_destination_bytes: at_old,
            sent_before: self.sender_bytes(),
            bytes_after: BTreeMap::new(),
        });
        self.report.destination = opening.to.clone();
        self.skip_holes();
        let to = opening.to.clone();
        self.handle.set_progress(|p| {
            p.target = to;
            p.retargets += 1;
        });
        self.plan();
        self.update_progress();
        let _ = opening.reply.send(Ok(()));
    }

    /// A forwarder is no longer needed (or no longer usable): its session is
    /// discarded and nothing counts on its pages any more.
    fn release(&mut self, f: HostId, why: &str) {
        self.forwarders.retain(|&x| x != f);
        self.pools.remove(&f);
        self.ledger.invalidate(0..self.ledger.pages(), f);
        if let Some(l) = self.links.get(&f).cloned() {
            tracing::info!(host = %l.host, "releasing old destination: {why}");
            let reason = format!("no longer needed: {why}");
            tokio::spawn(async move { l.abort(&reason).await });
        }
    }

    fn forwarder_lost(&mut self, f: HostId, why: &str) {
        if !self.forwarders.contains(&f) {
            return;
        }
        tracing::warn!(host = %self.hosts[f as usize], "forwarder lost ({why}); the source sends its pages");
        self.report.forwarders_lost.push(self.hosts[f as usize].clone());
        self.release(f, "it failed");
        self.plan();
    }

    /// Asks the tracker what changed and tells the ledger; returns the count.
    async fn dirty_sync(&mut self) -> Result<usize, EngineError> {
        let t0 = Instant::now();
        let mut tracker = self.tracker.take().expect("tracker");
        let ram = self.ram();
        let (tracker, dirty) = tokio::task::spawn_blocking(move || {
            let d = tracker.sync(&ram);
            (tracker, d)
        })
        .await
        .map_err(|e| EngineError::Setup(e.to_string()))?;
        self.tracker = Some(tracker);
        let dirty = dirty.map_err(|e| EngineError::Setup(e.to_string()))?;
        self.ledger.dirty_sync(&dirty);
        if let Some(z) = self.zero_pages.as_mut() {
            dirty.iter_ones().for_each(|p| z.clear(p));
        }
        let n = dirty.count();
        let secs = self.last_sync.elapsed().as_secs_f64().max(1e-3);
        self.last_sync = Instant::now();
        self.last_sync_cost = t0.elapsed();
        self.handle.set_progress(|p| p.dirty_rate_mbps = n as f64 * PAGE_SIZE as f64 / secs / 1e6);
        self.update_progress();
        Ok(n)
    }

    /// Sends everything the target lacks, with every sender, until it has
    /// all of it (the VM is paused: nothing gets dirty meanwhile).
    async fn drain(&mut self) -> Result<(), EngineError> {
        self.begin_round();
        loop {
            self.fill()?;
            let in_flight: usize = self.outstanding.values().sum::<usize>() + self.fencing.len();
            if in_flight == 0 && self.queue.is_empty() && self.pools.values().all(|p| p.is_empty()) {
                if self.remaining_bytes() == 0 {
                    break;
                }
                // Pages skipped while another writer had them: plan again.
                self.plan();
                if self.queue.is_empty() && self.pools.values().all(|p| p.is_empty()) {
                    return Err(EngineError::Setup(format!(
                        "{} bytes are stale at the destination and no host can send them",
                        self.remaining_bytes()
                    )));
                }
                continue;
            }
            self.wait_event().await?;
        }
        self.end_round();
        Ok(())
    }

    async fn switchover(&mut self) -> Result<(), EngineError> {
        self.check_cancel()?;
        let mut d = Downtime::default();
        let ms = |t: Instant| t.elapsed().as_secs_f64() * 1e3;
        let t_pause = Instant::now();
        self.phase("switchover: pause");
        self.blocking(|vm| vm.pause()).await?;
        self.paused = true;
        d.pause_ms = ms(t_pause);

        let t = Instant::now();
        self.dirty_sync().await?;
        d.final_sync_ms = ms(t);

        self.phase("switchover: final round");
        let t = Instant::now();
        self.drain().await?;
        d.final_send_ms = ms(t);
        // The destination may change until here (a retarget during the final
        // round costs downtime, but the operator asked for it); from now on
        // it is fixed.
        self.switching = true;
        if let Some(o) = self.opening.take() {
            let _ = o.reply.send(Err("too late: the switchover has started".into()));
        }
        self.check_cancel()?;

        if self.opts.verify {
            self.phase("switchover: verify");
            let t = Instant::now();
            self.verify().await?;
            d.verify_ms = ms(t);
            self.report.verified = true;
        }
        self.check_cancel()?;

        self.phase("switchover: device state");
        let t = Instant::now();
        let state = self.blocking(|vm| vm.device_state()).await?;
        self.report.device_state_bytes = state.len() as u64;
        let target = self.target_link();
        let msg = Message::DeviceState { state: base64::engine::general_purpose::STANDARD.encode(&state) };
        target.call(msg, "ok").await?;
        d.device_state_ms = ms(t);
        self.check_cancel()?;

        self.phase("switchover: resume on destination");
        let t = Instant::now();
        self.resume_sent = true;
        target.call(Message::Resume { start: !self.opts.suspend }, "resumed").await?;
        d.resume_ms = ms(t);
        self.report.downtime_ms = Some(ms(t_pause));
        self.report.downtime = d;
        self.report.vm_runs_on = Some(target.host.clone());
        if let Err(e) = self.blocking(|vm| vm.stop()).await {
            tracing::warn!("the VM runs on {} but stopping it here failed: {e}", target.host);
        }
        Ok(())
    }

    /// Compares per-chunk checksums of the paused source and the destination;
    /// resends mismatching chunks until they agree (three tries).
    async fn verify(&mut self) -> Result<(), EngineError> {
        let ram = self.ram();
        let target = self.target_link();
        for _ in 0..3 {
            let r = ram.clone();
            let local = tokio::task::spawn_blocking(move || r.checksums());
            let remote = target.request(Message::ChecksumRequest).await?;
            let local = local.await.map_err(|e| EngineError::Verify(e.to_string()))?;
            let Message::Checksums { sums } = remote else {
                return Err(EngineError::Verify(format!("unexpected {}", remote.name())));
            };
            if sums.len() != local.len() {
                return Err(EngineError::Verify(format!(
                    "destination has {} chunks, source {}",
                    sums.len(),
                    local.len()
                )));
            }
            let bad: Vec<usize> = (0..local.len()).filter(|&c| local[c] != sums[c]).collect();
            if bad.is_empty() {
                return Ok(());
            }
            tracing::warn!(chunks = ?bad, "verification found mismatching chunks; resending them");
            self.report.verify_mismatched_chunks += bad.len() as u32;
            // The bad copy may have come from a forwarder that would send the
            // same bytes again: from now on only the source sends these.
            for c in bad {
                let ch = ram.layout().chunks()[c];
                for h in 1..self.hosts.len() as HostId {
                    self.ledger.invalidate(ch.first_page..ch.first_page + ch.pages, h);
                }
            }
            self.drain().await?;
        }
        Err(EngineError::Verify("chunks still differ after three resends".into()))
    }

    /// Cleans up after success or failure and completes the report.
    /// Records which data plane the source uses to a new destination.
    fn note_transport(&mut self, link: &Link) {
        self.report.senders.push(SenderTransport {
            from: self.ctx.me.clone(),
            to: link.host.clone(),
            transport: link.transport.into(),
        });
    }

    async fn finish(mut self, result: Result<(), EngineError>) -> Report {
        if let Some(o) = self.opening.take() {
            let _ = o.reply.send(Err("the migration ended".into()));
        }
        let bytes = self.sender_bytes();
        for r in &mut self.report.retargets {
            r.bytes_after =
                bytes.iter().map(|(h, b)| (h.clone(), b - r.sent_before.get(h).copied().unwrap_or(0))).collect();
        }
        self.report.bytes_by_sender = bytes;
        let kinds: std::collections::BTreeSet<&str> =
            self.report.senders.iter().map(|s| s.transport.as_str()).collect();
        self.report.transport = match kinds.len() {
            0 => "none".into(),
            1 => kinds.first().copied().unwrap_or_default().into(),
            _ => "mixed".into(),
        };
        match result {
            Ok(()) => {
                self.report.result = Outcome::Completed;
                for f in self.forwarders.clone() {
                    self.release(f, "the migration completed");
                }
                for l in self.links.values() {
                    l.close_sender();
                }
            }
            Err(e) => {
                self.report.result = match e {
                    EngineError::Cancelled => Outcome::Cancelled,
                    EngineError::GaveUp(_) => Outcome::GaveUp,
                    _ => Outcome::Failed,
                };
                if self.resume_sent {
                    // We asked the destination to run the VM and do not know
                    // whether it did: running it here too could corrupt it.
                    self.report.error = Some(format!(
                        "{e}; the switchover outcome is unknown, so the VM stays paused on {}: check {} before resuming it",
                        self.ctx.me, self.hosts[self.target as usize]
                    ));
                    self.report.vm_runs_on = None;
                } else {
                    // Every destination, old or new, discards what it has.
                    let aborts: Vec<_> = self
                        .links
                        .values()
                        .map(|l| {
                            let (l, why) = (l.clone(), e.to_string());
                            tokio::spawn(async move { l.abort(&why).await })
                        })
                        .collect();
                    for a in aborts {
                        let _ = a.await;
                    }
                    let mut err = e.to_string();
                    if self.paused {
                        if let Err(re) = self.blocking(|vm| vm.resume()).await {
                            err = format!("{err}; resuming the VM on {} failed too: {re}", self.ctx.me);
                        }
                    }
                    self.report.error = Some(err);
                    self.report.vm_runs_on = Some(self.ctx.me.clone());
                }
                tracing::warn!(vm = %self.report.vm, result = ?self.report.result, "migration ended: {}", self.report.error.as_deref().unwrap_or(""));
            }
        }
        self.report.total_ms = self.start.elapsed().as_secs_f64() * 1e3;
        if let Some(r) = self.report.retargets.last() {
            self.report.after_retarget_ms = Some(self.report.total_ms - r.at_ms);
        }
        self.report
    }
}
