//! The migration engine, run by the source's agent as coordinator: rounds
//! of dirty pages until the estimated downtime fits, then the switchover
//! (pause, final round, verification, device state, resume elsewhere).
//!
//! Every decision about which page goes where is asked of the [`Ledger`];
//! the engine only schedules chunks onto senders and feeds completions back.

pub mod report;

pub use report::{MigrationHandle, Outcome, Report};

use crate::agent::peer::{self, ClientStream};
use crate::bitmap::Bitmap;
use crate::dirty::{DirtyTracker, TrackerKind};
use crate::ledger::{HostId, Ledger};
use crate::memory::{GuestRam, Layout, DEFAULT_CHUNK_SIZE, PAGE_SIZE};
use crate::protocol::{read_message, write_message, Message, ProtocolError};
use crate::tls::TlsConfig;
use crate::transport::tcp::TcpSender;
use crate::transport::{Batch, Completion, PageSender, Run};
use crate::vm::{SourceVm, VmError};
use base64::Engine as _;
use report::{Downtime, RoundReport};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use thiserror::Error;
use tokio::sync::mpsc;

const SOURCE: HostId = 0;
const DEST: HostId = 1;
/// Batches in flight per stream (kept below the sender's queue bound).
const PER_STREAM: usize = 6;
const CONTROL_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum BudgetAction {
    /// Switch over anyway (downtime exceeds the limit).
    #[default]
    Force,
    /// Give up: the VM keeps running on the source.
    Abort,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum TransportKind {
    #[default]
    Tcp,
}

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
}

impl Default for MigrateOptions {
    fn default() -> Self {
        Self {
            downtime_ms: 300,
            streams: 4,
            transport: TransportKind::Tcp,
            max_rounds: 30,
            max_time_s: 600,
            on_budget: BudgetAction::Force,
            verify: true,
            suspend: false,
            tracker: None,
            chunk_size: DEFAULT_CHUNK_SIZE,
            max_bandwidth_mbps: None,
        }
    }
}

/// What the engine needs of its agent.
pub struct Context {
    pub me: String,
    pub tls: TlsConfig,
}

#[derive(Debug, Error)]
enum EngineError {
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

/// The destination as the source sees it: control stream plus page sender.
struct Dest {
    host: String,
    ctrl: ClientStream,
    sender: TcpSender,
    completions: mpsc::UnboundedReceiver<Completion>,
}

impl Dest {
    async fn request(&mut self, m: Message) -> Result<Message, EngineError> {
        let lost = |e: ProtocolError| e.to_string();
        let fut = async {
            write_message(&mut self.ctrl, &m).await.map_err(lost)?;
            read_message(&mut self.ctrl).await.map_err(lost)
        };
        let r = tokio::time::timeout(CONTROL_TIMEOUT, fut).await.unwrap_or_else(|_| Err("no answer".into()));
        r.map_err(|why| EngineError::DestinationLost { host: self.host.clone(), why })
    }
}

struct Migration {
    ctx: Context,
    vm: Arc<dyn SourceVm>,
    opts: MigrateOptions,
    handle: Arc<MigrationHandle>,
    to: String,
    addr: SocketAddr,
    start: Instant,
    report: Report,
    ram: Option<Arc<GuestRam>>,
    ledger: Ledger,
    tracker: Option<Box<dyn DirtyTracker>>,
    dest: Option<Dest>,
    next_batch: u64,
    /// Bytes applied and time spent sending, for the throughput estimate.
    sent_bytes: u64,
    send_time: Duration,
    last_sync: Instant,
    round_start: Instant,
    paused: bool,
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
    let mut m = Migration {
        ctx,
        vm,
        opts,
        handle,
        to,
        addr,
        start: Instant::now(),
        report,
        ram: None,
        ledger: Ledger::new(0, SOURCE),
        tracker: None,
        dest: None,
        next_batch: 1,
        sent_bytes: 0,
        send_time: Duration::ZERO,
        last_sync: Instant::now(),
        round_start: Instant::now(),
        paused: false,
        resume_sent: false,
    };
    let result = m.execute().await;
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

    async fn execute(&mut self) -> Result<(), EngineError> {
        self.setup().await?;
        let switchover = self.precopy().await?;
        self.report.switchover = Some(switchover.into());
        self.switchover().await
    }

    async fn setup(&mut self) -> Result<(), EngineError> {
        self.phase("setup");
        let rec = self.vm.record().clone();
        let layout = Layout::new(rec.regions(), self.opts.chunk_size).map_err(|e| EngineError::Setup(e.to_string()))?;
        let paths: Vec<_> = rec.ram.iter().map(|r| r.path.clone()).collect();
        let ram = Arc::new(
            GuestRam::open(layout.clone(), &paths)
                .map_err(|e| EngineError::Setup(format!("mapping the VM's RAM: {e}")))?,
        );
        self.ledger = Ledger::new(layout.total_pages(), SOURCE);
        self.handle.set_progress(|p| {
            p.ram_bytes = layout.total_bytes();
            p.remaining_bytes = layout.total_bytes();
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
        let observer = tracker.observer();
        self.check_cancel()?;

        // Destination session.
        let host = self.to.clone();
        let lost = |why: String| EngineError::DestinationLost { host: host.clone(), why };
        let ctrl = peer::connect(&self.ctx.tls, &self.ctx.me, &self.to, self.addr)
            .await
            .map_err(|e| EngineError::Setup(e.to_string()))?;
        let mut ctrl = ctrl;
        let open = Message::OpenSession {
            vm: rec.name.clone(),
            regions: rec.regions(),
            chunk_size: self.opts.chunk_size,
            launch: rec.launch.clone(),
        };
        write_message(&mut ctrl, &open).await.map_err(|e| lost(e.to_string()))?;
        let (port, token) = match read_message(&mut ctrl).await {
            Ok(Message::SessionOpened { data_port, token }) => (data_port, token),
            Ok(other) => return Err(lost(format!("unexpected {}", other.name()))),
            Err(ProtocolError::Peer(m)) => {
                return Err(EngineError::Setup(format!("{} refused the migration: {m}", self.to)))
            }
            Err(e) => return Err(lost(e.to_string())),
        };
        let token: [u8; 32] =
            hex::decode(&token).ok().and_then(|t| t.try_into().ok()).ok_or_else(|| lost("bad session token".into()))?;
        let (tx, completions) = mpsc::unbounded_channel();
        let data_addr = SocketAddr::new(self.addr.ip(), port);
        let sender = TcpSender::connect(data_addr, token, self.opts.streams, ram.clone(), observer, tx)
            .await
            .map_err(|e| lost(e.to_string()));
        let sender = match sender {
            Ok(s) => s,
            Err(e) => {
                let _ = write_message(&mut ctrl, &Message::Abort { reason: e.to_string() }).await;
                return Err(e);
            }
        };
        self.dest = Some(Dest { host: self.to.clone(), ctrl, sender, completions });
        // Everything is unsent: start tracking from here.
        self.tracker.as_mut().expect("tracker").sync(&ram).map_err(|e| EngineError::Setup(e.to_string()))?;
        self.last_sync = Instant::now();
        self.ram = Some(ram);
        self.skip_holes().await;
        Ok(())
    }

    /// The destination's RAM starts as a new zero-filled file, so pages that
    /// are holes at the source need not travel (QEMU's zero-page skipping,
    /// without even reading them). A page written after the scan is in the
    /// tracker's next sync, which makes it stale again.
    async fn skip_holes(&mut self) {
        let ram = self.ram.clone().expect("ram");
        let data = match tokio::task::spawn_blocking(move || ram.data_pages()).await {
            Ok(Ok(d)) => d,
            other => {
                tracing::info!("not skipping zero pages: {other:?}");
                return;
            }
        };
        let mut n = 0;
        for p in (0..self.ledger.pages()).filter(|&p| !data.get(p)) {
            if let Some(e) = self.ledger.begin(p, SOURCE, DEST) {
                n += u64::from(self.ledger.finish(p, SOURCE, DEST, e, true));
            }
        }
        self.report.zero_pages_skipped = n;
    }

    fn remaining_bytes(&self) -> u64 {
        (self.ledger.pages() - self.ledger.fresh_count(DEST)) as u64 * PAGE_SIZE as u64
    }

    fn throughput(&self) -> f64 {
        if self.send_time.is_zero() {
            return 0.0;
        }
        self.sent_bytes as f64 / self.send_time.as_secs_f64()
    }

    /// Rounds of dirty pages; returns how the switchover was reached.
    async fn precopy(&mut self) -> Result<&'static str, EngineError> {
        let limit = Duration::from_millis(self.opts.downtime_ms);
        let budget = Duration::from_secs(self.opts.max_time_s);
        for round in 0.. {
            self.phase(&format!("round {round}"));
            self.handle.set_progress(|p| p.round = round);
            let mut r = self.send_round().await?;
            r.round = round;
            let dirty = self.dirty_sync().await?;
            r.dirty_pages = dirty as u64;
            tracing::info!(round, pages = r.pages, ms = r.ms, dirty, "round done");
            self.report.rounds.push(r);
            let estimate = Duration::from_secs_f64(self.remaining_bytes() as f64 / self.throughput().max(1.0));
            if estimate <= limit {
                return Ok("converged");
            }
            let out_of_budget = round + 1 >= self.opts.max_rounds || self.start.elapsed() >= budget;
            if out_of_budget {
                let why = format!(
                    "after {} rounds and {:.1} s, {} MB still dirty (estimated downtime {} ms > {} ms)",
                    round + 1,
                    self.start.elapsed().as_secs_f64(),
                    self.remaining_bytes() / 1_000_000,
                    estimate.as_millis(),
                    limit.as_millis()
                );
                return match self.opts.on_budget {
                    BudgetAction::Force => {
                        tracing::warn!("forcing switchover: {why}");
                        Ok("forced")
                    }
                    BudgetAction::Abort => Err(EngineError::GaveUp(why)),
                };
            }
        }
        unreachable!()
    }

    /// Asks the tracker what changed and tells the ledger; returns the count.
    async fn dirty_sync(&mut self) -> Result<usize, EngineError> {
        let mut tracker = self.tracker.take().expect("tracker");
        let ram = self.ram.clone().expect("ram");
        let (tracker, dirty) = tokio::task::spawn_blocking(move || {
            let d = tracker.sync(&ram);
            (tracker, d)
        })
        .await
        .map_err(|e| EngineError::Setup(e.to_string()))?;
        self.tracker = Some(tracker);
        let dirty: Bitmap = dirty.map_err(|e| EngineError::Setup(e.to_string()))?;
        self.ledger.dirty_sync(&dirty);
        let n = dirty.count();
        let secs = self.last_sync.elapsed().as_secs_f64().max(1e-3);
        self.last_sync = Instant::now();
        let remaining = self.remaining_bytes();
        let rate = self.throughput();
        self.handle.set_progress(|p| {
            p.dirty_rate_mbps = n as f64 * PAGE_SIZE as f64 / secs / 1e6;
            p.remaining_bytes = remaining;
            p.at_destination_bytes = p.ram_bytes - remaining;
            p.eta_s = (rate > 0.0).then(|| remaining as f64 / rate);
        });
        Ok(n)
    }

    /// Sends every page the destination lacks; waits until all are applied.
    async fn send_round(&mut self) -> Result<RoundReport, EngineError> {
        let t0 = Instant::now();
        self.round_start = t0;
        let window = self.opts.streams.max(1) * PER_STREAM;
        let ram = self.ram.clone().expect("ram");
        let layout = ram.layout().clone();
        let mut outstanding = 0usize;
        let mut report = RoundReport::default();
        let cap = self.opts.max_bandwidth_mbps.filter(|r| *r > 0.0).map(|r| r * 1e6);
        let mut submitted = 0u64;
        for (ci, chunk) in layout.chunks().iter().enumerate() {
            let mut runs: Vec<Run> = vec![];
            let mut epochs = vec![];
            for p in chunk.first_page..chunk.first_page + chunk.pages {
                if self.ledger.is_fresh(p, DEST) {
                    continue;
                }
                let Some(e) = self.ledger.begin(p, SOURCE, DEST) else {
                    continue;
                };
                epochs.push(e);
                match runs.last_mut() {
                    Some(r) if r.first_page + r.pages == p => r.pages += 1,
                    _ => runs.push(Run { first_page: p, pages: 1 }),
                }
            }
            if runs.is_empty() {
                continue;
            }
            while outstanding >= window {
                self.next_completion(&mut report).await?;
                outstanding -= 1;
            }
            let bytes = epochs.len() as u64 * PAGE_SIZE as u64;
            if let Some(rate) = cap {
                // Pace submissions: never ahead of rate × elapsed.
                let due = Duration::from_secs_f64(submitted as f64 / rate);
                if let Some(wait) = due.checked_sub(t0.elapsed()) {
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = self.handle.cancel.cancelled(), if !self.resume_sent => {
                            let b = Batch { id: 0, chunk: ci, from: SOURCE, to: DEST, runs, epochs };
                            self.abandon(&b);
                            return Err(EngineError::Cancelled);
                        }
                    }
                }
                submitted += bytes;
            }
            let batch = Batch { id: self.next_batch, chunk: ci, from: SOURCE, to: DEST, runs, epochs };
            self.next_batch += 1;
            let dest = self.dest.as_ref().expect("dest");
            if let Err(b) = dest.sender.submit(batch) {
                let host = dest.host.clone();
                self.abandon(&b);
                return Err(EngineError::DestinationLost { host, why: "data streams closed".into() });
            }
            outstanding += 1;
        }
        while outstanding > 0 {
            self.next_completion(&mut report).await?;
            outstanding -= 1;
        }
        let dt = t0.elapsed();
        report.ms = dt.as_secs_f64() * 1e3;
        if report.bytes > 0 {
            self.sent_bytes += report.bytes;
            self.send_time += dt;
        }
        Ok(report)
    }

    fn abandon(&mut self, b: &Batch) {
        for (p, e) in b.pages().zip(&b.epochs) {
            self.ledger.finish(p, b.from, b.to, *e, false);
        }
    }

    async fn next_completion(&mut self, report: &mut RoundReport) -> Result<(), EngineError> {
        let dest = self.dest.as_mut().expect("dest");
        let c = tokio::select! {
            c = dest.completions.recv() => c,
            _ = self.handle.cancel.cancelled(), if !self.resume_sent => return Err(EngineError::Cancelled),
        };
        let host = dest.host.clone();
        let sent = dest.sender.bytes_sent();
        match c {
            Some(Completion::Applied(b)) => {
                let n = b.page_count() as u64;
                for (p, e) in b.pages().zip(&b.epochs) {
                    self.ledger.finish(p, b.from, b.to, *e, true);
                }
                report.pages += n;
                report.bytes += n * PAGE_SIZE as u64;
                let fresh = self.ledger.fresh_count(DEST) as u64 * PAGE_SIZE as u64;
                let elapsed = self.start.elapsed();
                let busy = self.send_time + self.round_start.elapsed();
                let rate = (self.sent_bytes + report.bytes) as f64 / busy.as_secs_f64().max(1e-3);
                self.handle.set_progress(|p| {
                    p.bytes_sent = sent;
                    p.at_destination_bytes = fresh;
                    p.remaining_bytes = p.ram_bytes.saturating_sub(fresh);
                    p.elapsed_ms = elapsed.as_secs_f64() * 1e3;
                    p.rate_mbps = rate / 1e6;
                    p.eta_s = (rate > 0.0).then(|| p.remaining_bytes as f64 / rate);
                });
                Ok(())
            }
            Some(Completion::Failed(b, why)) => {
                self.abandon(&b);
                Err(EngineError::DestinationLost { host, why })
            }
            None => Err(EngineError::DestinationLost { host, why: "data plane closed".into() }),
        }
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
        let mut last = self.send_round().await?;
        last.round = self.report.rounds.len() as u32;
        self.report.rounds.push(last);
        d.final_send_ms = ms(t);
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
        let dest = self.dest.as_mut().expect("dest");
        let msg = Message::DeviceState { state: base64::engine::general_purpose::STANDARD.encode(&state) };
        match dest.request(msg).await? {
            Message::Ok => {}
            other => {
                return Err(EngineError::DestinationLost {
                    host: dest.host.clone(),
                    why: format!("device state: unexpected {}", other.name()),
                })
            }
        }
        d.device_state_ms = ms(t);
        self.check_cancel()?;

        self.phase("switchover: resume on destination");
        let t = Instant::now();
        self.resume_sent = true;
        let start = !self.opts.suspend;
        let dest = self.dest.as_mut().expect("dest");
        match dest.request(Message::Resume { start }).await? {
            Message::Resumed => {}
            other => {
                return Err(EngineError::DestinationLost {
                    host: dest.host.clone(),
                    why: format!("resume: unexpected {}", other.name()),
                })
            }
        }
        d.resume_ms = ms(t);
        self.report.downtime_ms = Some(ms(t_pause));
        self.report.downtime = d;
        self.report.vm_runs_on = Some(self.to.clone());
        if let Err(e) = self.blocking(|vm| vm.stop()).await {
            tracing::warn!("the VM runs on {} but stopping it here failed: {e}", self.to);
        }
        Ok(())
    }

    /// Compares per-chunk checksums of the paused source and the destination;
    /// resends mismatching chunks until they agree (three tries).
    async fn verify(&mut self) -> Result<(), EngineError> {
        let ram = self.ram.clone().expect("ram");
        for _ in 0..3 {
            let r = ram.clone();
            let local = tokio::task::spawn_blocking(move || r.checksums());
            let dest = self.dest.as_mut().expect("dest");
            let remote = dest.request(Message::ChecksumRequest).await?;
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
            for c in bad {
                let ch = ram.layout().chunks()[c];
                self.ledger.invalidate(ch.first_page..ch.first_page + ch.pages, DEST);
            }
            let mut r = self.send_round().await?;
            r.round = self.report.rounds.len() as u32;
            self.report.rounds.push(r);
        }
        Err(EngineError::Verify("chunks still differ after three resends".into()))
    }

    /// Cleans up after success or failure and completes the report.
    async fn finish(mut self, result: Result<(), EngineError>) -> Report {
        if let Some(dest) = &self.dest {
            self.report.bytes_by_sender.insert(self.ctx.me.clone(), dest.sender.bytes_sent());
            dest.sender.close();
        }
        match result {
            Ok(()) => self.report.result = Outcome::Completed,
            Err(e) => {
                self.report.result = match e {
                    EngineError::Cancelled => Outcome::Cancelled,
                    EngineError::GaveUp(_) => Outcome::GaveUp,
                    _ => Outcome::Failed,
                };
                if self.resume_sent {
                    // We asked the destination to run the VM and do not know
                    // whether it did: running it here too could corrupt it.
                    self.report.error = Some(format!("{e}; the switchover outcome is unknown, so the VM stays paused on {}: check {} before resuming it", self.ctx.me, self.to));
                    self.report.vm_runs_on = None;
                } else {
                    if let Some(dest) = self.dest.as_mut() {
                        let abort = Message::Abort { reason: e.to_string() };
                        let _ = tokio::time::timeout(Duration::from_secs(5), dest.request(abort)).await;
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
        self.report
    }
}
