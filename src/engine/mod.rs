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
//! completions back. DESIGN.md gives the invariant and the failure rules.
//!
//! Parts: [`options`] (what an operator asks), [`accounting`] (bytes, rates,
//! estimate, pacing), [`schedule`] (queues, pools, stealing, batches),
//! `route` (the phase, the target, forwarders, retargets and fallbacks: a
//! state machine with no I/O, events in, commands out), `retarget`
//! (carrying out its commands: opening, install, fencing, release),
//! `events` (the event loop), `books` and `rounds`, `precopy` and
//! `switchover` (the two halves of a migration), [`link`] (the source's
//! connection to each peer), [`report`] and [`handle`] (what the world sees).
//! The files `impl Migration` is split over call each other's methods in
//! one direction only (tests/structure.rs checks it).

pub(crate) mod accounting;
mod books;
mod events;
mod fallback;
pub(crate) mod handle;
pub(crate) mod link;
pub mod options;
pub(crate) mod phase;
mod precopy;
pub mod report;
mod retarget;
mod rounds;
mod route;
pub(crate) mod schedule;
mod setup;
mod steering;
mod switchover;
mod verify;
pub(crate) mod watch;

pub use handle::{MigrationHandle, MigrationStatus, Progress, RetargetRequest};
pub use options::{BudgetAction, MigrateOptions, Steering};
pub use report::{Cause, FailureKind, Outcome, Reason, Report, Switchover, TransportUsed};

use crate::bitmap::Bitmap;
use crate::dirty::{DirtyError, DirtyTracker, SendObserver};
use crate::ledger::{HostId, Ledger};
use crate::memory::{GuestRam, LayoutError, MemoryError, PAGE_SIZE};
use crate::tls::SharedTls;
use crate::transport::Completion;
use crate::vm::{SourceVm, VmError};
use accounting::Accounting;
use link::{Link, LinkError};
use phase::Phase;
use report::SenderTransport;
use retarget::Retargeting;
use route::{Event, Route};
use schedule::{Schedule, SOURCE};
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;
use thiserror::Error;
use tokio::sync::mpsc;

/// What the engine needs of its agent.
pub struct Context {
    /// This host's name.
    pub me: String,
    /// Its TLS identity, to open sessions on peers.
    pub tls: SharedTls,
    /// Encrypt TCP data streams (TLS with that identity).
    pub data_encryption: bool,
    /// Test-only: disables the ledger's one-writer rule.
    pub unordered: bool,
    /// This host's RDMA device, if it has a usable one (else why not).
    pub rdma: Result<Arc<crate::transport::rdma::Rdma>, String>,
    /// A peer silent this long is lost.
    pub peer_timeout: std::time::Duration,
    /// The migration's fallback hosts and their control addresses, in order.
    pub fallbacks: Vec<(String, SocketAddr)>,
}

/// Why a migration did not complete.
#[derive(Debug, Error)]
pub enum EngineError {
    /// The operator cancelled it.
    #[error("cancelled")]
    Cancelled,
    /// The VM's RAM layout is not one a migration can use.
    #[error("the VM's RAM layout")]
    Layout(#[source] LayoutError),
    /// The VM's RAM could not be mapped.
    #[error("mapping the VM's RAM")]
    Ram(#[source] MemoryError),
    /// Every dirty tracker failed to start (each reason listed).
    #[error("no dirty tracker works: {0}")]
    NoTracker(String),
    /// A dirty sync failed.
    #[error("dirty sync")]
    Sync(#[source] DirtyError),
    /// The destination refused to open a session.
    #[error("{host} refused the migration")]
    Refused {
        /// The destination.
        host: String,
        /// Its reason.
        #[source]
        source: LinkError,
    },
    /// No data plane to the destination could be opened.
    #[error("no data plane to {host}")]
    NoDataPlane {
        /// The destination.
        host: String,
        /// Why.
        #[source]
        source: LinkError,
    },
    /// The destination stopped answering or failed.
    #[error("destination {host} lost")]
    DestinationLost {
        /// The destination.
        host: String,
        /// What failed.
        #[source]
        source: LinkError,
    },
    /// The budget ran out with `--on-budget abort`.
    #[error("budget exhausted: {0}")]
    GaveUp(String),
    /// The time budget ran out in the middle of a round (handled by the
    /// rounds: it becomes a forced switchover or `GaveUp`).
    #[error("the time budget ran out")]
    TimeBudget,
    /// The pause took longer than the switchover deadline before `Resume`:
    /// the VM resumed on the source.
    #[error("the switchover did not finish within {0:?}: the VM resumed on the source")]
    SwitchoverTimeout(std::time::Duration),
    /// The VM failed a request.
    #[error("the VM")]
    Vm(#[from] VmError),
    /// Checksums still differ after resending.
    #[error("verification failed: {0}")]
    Verify(String),
    /// Pages the target lacks that no host can send any more.
    #[error("{0} bytes are stale at the destination and no host can send them")]
    Stranded(u64),
    /// A blocking task panicked.
    #[error("a blocking task failed")]
    Task(#[source] tokio::task::JoinError),
}

/// What a migration is asked to do, and with what.
struct Job {
    ctx: Context,
    vm: Arc<dyn SourceVm>,
    opts: MigrateOptions,
    handle: Arc<MigrationHandle>,
    /// When the migration started.
    start: Instant,
}

/// What setup hands to the running migration.
struct Prepared {
    ram: Arc<GuestRam>,
    ledger: Ledger,
    tracker: Box<dyn DirtyTracker>,
    zero_pages: Option<Bitmap>,
    observer: Option<Arc<dyn SendObserver>>,
    link: Arc<Link>,
    completions: (mpsc::UnboundedSender<Completion>, mpsc::UnboundedReceiver<Completion>),
    /// The first destination (a fallback host if the one asked for refused).
    to: String,
    /// The fallback hosts not tried yet.
    fb: fallback::Fallback,
}

/// A running migration (after setup).
struct Migration {
    job: Job,
    start: Instant,
    report: Report,
    /// Phase, target, forwarders, retargets and fallbacks: every decision
    /// about where the migration goes.
    route: Route,
    ram: Arc<GuestRam>,
    ledger: Ledger,
    /// `None` only while a sync runs on a blocking thread.
    tracker: Option<Box<dyn DirtyTracker>>,
    /// Pages that were holes when tracking began and were not reported
    /// written since: zero at the source, so never sent.
    zero_pages: Option<Bitmap>,
    observer: Option<Arc<dyn SendObserver>>,
    /// The source's link to each host that took part, by id.
    links: HashMap<HostId, Arc<Link>>,
    acct: Accounting,
    sched: Schedule,
    verifier: verify::Verifier,
    rt: Retargeting,
    completions_tx: mpsc::UnboundedSender<Completion>,
    completions: mpsc::UnboundedReceiver<Completion>,
    /// The operator asked to switch over at the next round's end.
    force_complete: bool,
    /// Whether the target falls behind (`--fallback-slow-*`).
    slow: fallback::SlowWatch,
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
    let mut report = Report {
        vm: rec.name.clone(),
        source: ctx.me.clone(),
        destination: to.clone(),
        ram_bytes: rec.ram.iter().map(|r| r.size).sum(),
        ram: rec
            .ram
            .iter()
            .map(|r| report::RegionReport { id: r.id.clone(), bytes: r.size, page_size: r.page_size })
            .collect(),
        streams: opts.streams,
        ..Default::default()
    };
    let start = Instant::now();
    let job = Job { ctx, vm, opts, handle, start };
    match setup::prepare(&job, &mut report, &to, addr).await {
        Ok(p) => {
            let mut m = Migration::new(job, report, start, p);
            let result = m.execute().await;
            m.finish(result).await
        }
        Err(e) => {
            tracing::warn!(vm = %report.vm, "migration could not start: {}", crate::error_chain(&e));
            report.result = outcome_of(&e);
            report.reason = Some(e.reason());
            report.error = Some(crate::error_chain(&e));
            report.vm_runs_on = Some(job.ctx.me.clone());
            report.total_ms = start.elapsed().as_secs_f64() * 1e3;
            report
        }
    }
}

impl EngineError {
    /// The failure's kind, and the host it concerns (the report's `reason`).
    pub fn reason(&self) -> Reason {
        use FailureKind as K;
        let (kind, host) = match self {
            EngineError::Cancelled => (K::Cancelled, None),
            EngineError::Layout(_) => (K::Layout, None),
            EngineError::Ram(_) => (K::Ram, None),
            EngineError::NoTracker(_) => (K::NoTracker, None),
            EngineError::Sync(_) => (K::Sync, None),
            EngineError::Refused { host, .. } => (K::Refused, Some(host)),
            EngineError::NoDataPlane { host, .. } => (K::NoDataPlane, Some(host)),
            EngineError::DestinationLost { host, .. } => (K::DestinationLost, Some(host)),
            // A time budget that escaped the rounds ends as their budget does.
            EngineError::GaveUp(_) | EngineError::TimeBudget => (K::GaveUp, None),
            EngineError::SwitchoverTimeout(_) => (K::SwitchoverTimeout, None),
            EngineError::Vm(_) => (K::Vm, None),
            EngineError::Verify(_) => (K::Verify, None),
            EngineError::Stranded(_) => (K::Stranded, None),
            EngineError::Task(_) => (K::Internal, None),
        };
        // The host's own error kind, when it answered with one.
        let code = match self {
            EngineError::Refused { source: LinkError::Refused(r) | LinkError::Peer(r), .. }
            | EngineError::DestinationLost { source: LinkError::Peer(r), .. } => r.code,
            _ => None,
        };
        Reason { kind, host: host.cloned(), code }
    }
}

fn outcome_of(e: &EngineError) -> Outcome {
    match e {
        EngineError::Cancelled => Outcome::Cancelled,
        EngineError::GaveUp(_) => Outcome::GaveUp,
        _ => Outcome::Failed,
    }
}

impl Migration {
    fn new(job: Job, report: Report, start: Instant, p: Prepared) -> Self {
        let to = p.to;
        let retargets = job.handle.take_retargets();
        let mut report = report;
        report.senders.push(SenderTransport {
            from: job.ctx.me.clone(),
            to: to.clone(),
            transport: p.link.transport,
            rdma: p.link.rdma_path.clone(),
            re_pairs: 0,
            tcp_fallbacks: 0,
            why_not_rdma: p.link.why_not_rdma.clone(),
        });
        report.destination = to.clone();
        let route = Route::new(job.ctx.me.clone(), to, p.fb);
        let links = HashMap::from([(p.link.id, p.link)]);
        let slow = fallback::SlowWatch::new(job.opts.slow_rate_mbps, job.opts.slow_for_s);
        let cap = job.opts.max_bandwidth_mbps;
        let verifier = verify::Verifier::new(job.opts.verify, p.ram.layout());
        let mut m = Self {
            job,
            start,
            report,
            route,
            ram: p.ram,
            ledger: p.ledger,
            tracker: Some(p.tracker),
            zero_pages: p.zero_pages,
            observer: p.observer,
            links,
            acct: Accounting::new(cap),
            sched: Schedule::default(),
            verifier,
            rt: Retargeting::new(retargets),
            completions_tx: p.completions.0,
            completions: p.completions.1,
            force_complete: false,
            slow,
        };
        m.skip_holes();
        m.job.handle.phase_changed(m.route.name(1), m.route.phase());
        m
    }

    /// Moves the phase forward, and tells the handle (the agent journals it).
    fn advance(&mut self, to: Phase) -> Result<(), EngineError> {
        let r = self.route_event(Event::Advanced(to));
        self.job.handle.phase_changed(self.target_name(), self.route.phase());
        r
    }

    fn set_phase(&self, phase: &str) {
        tracing::info!(vm = %self.report.vm, "phase: {phase}");
        self.job.handle.set_progress(|p| p.phase = phase.into());
    }

    fn check_cancel(&self) -> Result<(), EngineError> {
        if self.job.handle.cancel.is_cancelled() && !self.route.phase().resume_sent() {
            return Err(EngineError::Cancelled);
        }
        Ok(())
    }

    /// Runs a VM call on a blocking thread.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(Arc<dyn SourceVm>) -> Result<T, VmError> + Send + 'static,
    ) -> Result<T, EngineError> {
        let vm = self.job.vm.clone();
        Ok(tokio::task::spawn_blocking(move || f(vm)).await.map_err(EngineError::Task)??)
    }

    fn target_link(&self) -> Arc<Link> {
        self.links[&self.route.target()].clone()
    }

    fn target_name(&self) -> &str {
        self.route.name(self.route.target())
    }

    fn lost(&self, host: HostId, source: LinkError) -> EngineError {
        EngineError::DestinationLost { host: self.route.name(host).to_owned(), source }
    }

    async fn execute(&mut self) -> Result<(), EngineError> {
        let (switchover, estimate) = self.precopy().await?;
        self.steering_too_late();
        self.report.switchover = Some(switchover);
        self.switchover(estimate).await
    }

    /// A destination's RAM starts as a new zero-filled file, so pages that
    /// were holes at the source when tracking began, and have not been
    /// reported written since, need not travel to it (QEMU's zero-page
    /// skipping, without even reading them). A page written after the scan
    /// is in the tracker's next sync, which makes it stale again.
    fn skip_holes(&mut self) {
        let Some(zero) = self.zero_pages.as_ref() else { return };
        let t = self.route.target();
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
        (self.ledger.pages() - self.ledger.fresh_count(self.route.target())) as u64 * PAGE_SIZE as u64
    }

    fn update_progress(&self) {
        let fresh = self.ledger.fresh_count(self.route.target()) as u64 * PAGE_SIZE as u64;
        let rate = self.acct.throughput();
        let sent = self.sender_bytes().values().sum::<u64>();
        let elapsed = self.start.elapsed().as_secs_f64() * 1e3;
        self.job.handle.set_progress(|p| {
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
        out.insert(self.route.name(SOURCE).to_owned(), own);
        for (id, l) in &self.links {
            let f = l.forwarded_bytes();
            if f > 0 {
                out.insert(self.route.name(*id).to_owned(), f);
            }
        }
        out
    }

    /// Records which data plane the source uses to a new destination.
    fn note_transport(&mut self, link: &Link) {
        self.report.senders.push(SenderTransport {
            from: self.job.ctx.me.clone(),
            to: link.host.clone(),
            transport: link.transport,
            rdma: link.rdma_path.clone(),
            re_pairs: 0,
            tcp_fallbacks: 0,
            why_not_rdma: link.why_not_rdma.clone(),
        });
    }

    /// Cleans up after success or failure and completes the report.
    async fn finish(mut self, result: Result<(), EngineError>) -> Report {
        // Releases the forwarders of a completed migration; answers and
        // discards a retarget still opening.
        let ended = self.route_event(Event::Ended { completed: result.is_ok() });
        debug_assert!(ended.is_ok(), "ending never fails: {ended:?}");
        let bytes = self.sender_bytes();
        for r in &mut self.report.retargets {
            r.bytes_after =
                bytes.iter().map(|(h, b)| (h.clone(), b - r.sent_before.get(h).copied().unwrap_or(0))).collect();
        }
        self.report.bytes_by_sender = bytes;
        self.report.zero_pages_sent = self.links.values().map(|l| l.zero_pages()).sum();
        for l in self.links.values() {
            let me = &self.job.ctx.me;
            if let Some(s) = self.report.senders.iter_mut().rev().find(|s| &s.from == me && s.to == l.host) {
                let r = l.recoveries();
                (s.re_pairs, s.tcp_fallbacks) = (r.re_pairs, r.tcp_fallbacks);
            }
        }
        self.report.verification = std::mem::take(&mut self.verifier.report);
        self.report.transport = TransportUsed::of(self.report.senders.iter().map(|s| s.transport));
        match result {
            Ok(()) => {
                self.report.result = Outcome::Completed;
                for l in self.links.values() {
                    l.close_sender();
                }
            }
            Err(e) => self.failed(e).await,
        }
        self.report.total_ms = self.start.elapsed().as_secs_f64() * 1e3;
        if let Some(r) = self.report.retargets.last() {
            self.report.after_retarget_ms = Some(self.report.total_ms - r.at_ms);
        }
        self.report
    }

    async fn failed(&mut self, e: EngineError) {
        self.report.result = outcome_of(&e);
        self.report.reason = Some(e.reason());
        let why = crate::error_chain(&e);
        if self.route.phase().resume_sent() {
            self.report.result = Outcome::Unknown;
            // We asked the destination to run the VM and do not know
            // whether it did: running it here too could corrupt it.
            self.report.error = Some(format!(
                "{why}; the switchover outcome is unknown, so the VM stays paused on {} until {} says whether it runs there (or an operator says, with `dcmigrate resolve`)",
                self.job.ctx.me,
                self.target_name()
            ));
            self.report.vm_runs_on = None;
        } else {
            // No destination got `Resume`, so none can run the VM: it
            // resumes here first (its pause ends now), then every
            // destination, old or new, discards what it has.
            let mut err = why.clone();
            if self.route.phase().paused() {
                if let Err(re) = self.blocking(|vm| vm.resume()).await {
                    err = format!(
                        "{err}; resuming the VM on {} failed too: {}",
                        self.job.ctx.me,
                        crate::error_chain(&re)
                    );
                }
            }
            let aborts: Vec<_> = self
                .links
                .values()
                .map(|l| {
                    let (l, why) = (l.clone(), why.clone());
                    tokio::spawn(async move { l.abort(&why).await })
                })
                .collect();
            for a in aborts {
                let _ = a.await;
            }
            self.report.error = Some(err);
            self.report.vm_runs_on = Some(self.job.ctx.me.clone());
        }
        tracing::warn!(vm = %self.report.vm, result = ?self.report.result, "migration ended: {}", self.report.error.as_deref().unwrap_or(""));
    }
}
