//! The handle the agent's API holds on a running migration: live progress,
//! the report once it ends, cancellation, the retarget channel, and what an
//! operator changes while it runs (steering).

use super::options::Steering;
use super::report::Report;
use super::watch::{now_ms, Event, EventKind};
use serde::{Deserialize, Serialize};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

/// A request to change the destination of a running migration.
pub struct RetargetRequest {
    /// The new destination.
    pub to: String,
    /// Its control address.
    pub addr: std::net::SocketAddr,
    /// false: the old destination is dropped (cancel-and-restart).
    pub forward: bool,
    /// Where the outcome goes.
    pub reply: oneshot::Sender<Result<(), String>>,
}

/// Live progress of a migration.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct Progress {
    /// What it is doing (`round 3`, `switchover: verify`, `done`).
    pub phase: String,
    /// The round under way.
    pub round: u32,
    /// The VM's RAM.
    pub ram_bytes: u64,
    /// Payload bytes sent by every host.
    pub bytes_sent: u64,
    /// Bytes of RAM whose current content the destination holds.
    pub at_destination_bytes: u64,
    /// RAM the destination still lacks.
    pub remaining_bytes: u64,
    /// Throughput to the destination, MB/s.
    pub rate_mbps: f64,
    /// How fast the guest dirties memory, MB/s.
    pub dirty_rate_mbps: f64,
    /// Seconds left at this rate, if known.
    pub eta_s: Option<f64>,
    /// Since the start.
    pub elapsed_ms: f64,
    /// The current destination.
    pub target: String,
    /// Retargets so far.
    pub retargets: u32,
}

/// One migration as the API shows it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct MigrationStatus {
    /// The migration's id.
    pub id: String,
    /// The VM.
    pub vm: String,
    /// The current destination.
    pub to: String,
    /// Whether it ended.
    pub done: bool,
    /// Live progress.
    pub progress: Progress,
    /// The report, once it ended.
    pub report: Option<Report>,
}

/// The progress a handle last sent as an event.
#[derive(Default)]
struct Told {
    at: Option<std::time::Instant>,
    percent: f64,
}

/// Shared between the engine task and the agent's API.
pub struct MigrationHandle {
    /// The migration's id (its [`migration`](Self::migration) in hex).
    pub id: String,
    /// The migration's id on the wire and in every host's journal.
    pub migration: crate::protocol::MigrationId,
    /// The VM.
    pub vm: String,
    /// The first destination.
    pub to: String,
    /// Cancels the migration (before `Resume` was sent).
    pub cancel: CancellationToken,
    progress: Mutex<Progress>,
    report: Mutex<Option<Report>>,
    done: watch::Sender<bool>,
    retarget_tx: mpsc::UnboundedSender<RetargetRequest>,
    retarget_rx: Mutex<Option<mpsc::UnboundedReceiver<RetargetRequest>>>,
    /// Told of every phase change (the agent journals it).
    on_phase: Mutex<Option<PhaseHook>>,
    /// Operator changes not yet taken by the engine, and its wake-up.
    steering: Mutex<Steering>,
    steered: tokio::sync::Notify,
    /// The VM paused for the switchover: too late to steer.
    paused: std::sync::atomic::AtomicBool,
    /// Where events go (the agent's watchers), and the progress last told.
    events: Mutex<Option<super::watch::EventSink>>,
    told: Mutex<Told>,
    /// Test builds: set by the API's `release` (see `MigrateOptions::hold_switchover`).
    #[cfg(feature = "test-hooks")]
    pub released: watch::Sender<bool>,
}

/// What is told of a migration's phase changes: (VM, destination, phase).
pub(crate) type PhaseHook = Box<dyn Fn(&str, &str, super::phase::Phase) + Send + Sync>;

impl MigrationHandle {
    /// A handle for migrating `vm` to `to`.
    pub fn new(vm: &str, to: &str) -> Arc<Self> {
        let (retarget_tx, rx) = mpsc::unbounded_channel();
        let migration = crate::protocol::MigrationId::random();
        Arc::new(Self {
            retarget_tx,
            retarget_rx: Mutex::new(Some(rx)),
            id: migration.to_string(),
            migration,
            vm: vm.to_owned(),
            to: to.to_owned(),
            cancel: CancellationToken::new(),
            progress: Mutex::new(Progress { phase: "starting".into(), target: to.to_owned(), ..Default::default() }),
            report: Mutex::new(None),
            done: watch::channel(false).0,
            on_phase: Mutex::new(None),
            steering: Mutex::new(Steering::default()),
            steered: tokio::sync::Notify::new(),
            paused: std::sync::atomic::AtomicBool::new(false),
            events: Mutex::new(None),
            told: Mutex::new(Told::default()),
            #[cfg(feature = "test-hooks")]
            released: watch::channel(false).0,
        })
    }

    /// The engine's end of the retarget channel (taken once).
    pub fn take_retargets(&self) -> mpsc::UnboundedReceiver<RetargetRequest> {
        self.retarget_rx.lock().unwrap().take().unwrap_or_else(|| mpsc::unbounded_channel().1)
    }

    /// Asks the engine to change destination; waits for the outcome.
    pub async fn retarget(&self, to: String, addr: std::net::SocketAddr, forward: bool) -> Result<(), String> {
        let (reply, rx) = oneshot::channel();
        let r = match self.retarget_tx.send(RetargetRequest { to: to.clone(), addr, forward, reply }) {
            Ok(()) => rx.await.map_err(|_| "the migration has ended".to_string()).and_then(|r| r),
            Err(_) => Err("the migration has ended".to_string()),
        };
        self.emit(EventKind::Retarget { to, forward, reason: "operator".into(), error: r.as_ref().err().cloned() });
        r
    }

    /// Whether the switchover began (the VM is paused): steering is refused
    /// from then on, as the engine no longer takes it.
    pub fn switching_over(&self) -> bool {
        self.paused.load(Ordering::SeqCst)
    }

    /// Queues an operator's change for the engine (later values win; a
    /// force-complete stays asked).
    pub fn steer(&self, s: &Steering) {
        let mut cur = self.steering.lock().unwrap();
        if s.max_bandwidth_mbps.is_some() {
            cur.max_bandwidth_mbps = s.max_bandwidth_mbps;
        }
        if s.downtime_ms.is_some() {
            cur.downtime_ms = s.downtime_ms;
        }
        cur.force_complete |= s.force_complete;
        drop(cur);
        self.emit(EventKind::Steered { steering: s.clone() });
        // Wakes the engine even while it waits out a slow rate cap.
        self.steered.notify_one();
    }

    /// Wakes the engine out of its wait for events (a test's release).
    pub fn wake(&self) {
        self.steered.notify_one();
    }

    /// Resolves when an operator steered (at once if they did since the
    /// last wait).
    pub async fn steered(&self) {
        self.steered.notified().await;
    }

    /// The engine's side: what was asked since it last looked.
    pub fn take_steering(&self) -> Steering {
        std::mem::take(&mut *self.steering.lock().unwrap())
    }

    /// Sets what is told of phase changes.
    pub fn on_phase(&self, hook: PhaseHook) {
        *self.on_phase.lock().unwrap() = Some(hook);
    }

    /// The engine reached `phase`, with `destination` the current one.
    pub fn phase_changed(&self, destination: &str, phase: super::phase::Phase) {
        if phase.paused() {
            self.paused.store(true, Ordering::SeqCst);
        }
        if let Some(h) = self.on_phase.lock().unwrap().as_ref() {
            h(&self.vm, destination, phase);
        }
        let phase = super::watch::phase_name(phase).into();
        self.emit(EventKind::Phase { phase, destination: destination.into() });
    }

    /// Sends this migration's events to `sink` from now on.
    pub fn on_events(&self, sink: super::watch::EventSink) {
        *self.events.lock().unwrap() = Some(sink);
    }

    /// Tells the watchers (if any) of `kind`.
    pub fn emit(&self, kind: EventKind) {
        if let Some(sink) = self.events.lock().unwrap().as_ref() {
            // No watcher is not an error.
            let _ = sink.send(Event { vm: self.vm.clone(), migration: self.id.clone(), ts_ms: now_ms(), kind });
        }
    }

    /// Updates the live progress (told to watchers at most once a second).
    pub fn set_progress(&self, f: impl FnOnce(&mut Progress)) {
        let mut told = self.told.lock().unwrap();
        let due = told.at.is_none_or(|t| t.elapsed() >= std::time::Duration::from_secs(1));
        let p = {
            let mut p = self.progress.lock().unwrap();
            f(&mut p);
            // Cloned only when it is told (this runs on every completion).
            match due && p.ram_bytes > 0 {
                true => p.clone(),
                false => return,
            }
        };
        let held = p.ram_bytes.saturating_sub(p.remaining_bytes) as f64 / p.ram_bytes as f64 * 100.0;
        told.percent = told.percent.max(held);
        told.at = Some(std::time::Instant::now());
        let percent = told.percent;
        drop(told);
        self.emit(EventKind::Progress {
            percent,
            remaining_bytes: p.remaining_bytes,
            bytes_sent: p.bytes_sent,
            rate_mbps: p.rate_mbps,
            round: p.round,
        });
    }

    /// A round ended (its figures complete, dirty pages included).
    pub fn round_done(&self, r: &super::report::RoundReport) {
        self.emit(EventKind::Round {
            round: r.round,
            pages: r.pages,
            bytes: r.bytes,
            ms: r.ms,
            dirty_pages: r.dirty_pages,
        });
    }

    /// The `ended` event of a migration that ended (from its report).
    pub fn ended_event(&self) -> Option<Event> {
        let report = self.report.lock().unwrap();
        let kind = ended(report.as_ref()?);
        Some(Event { vm: self.vm.clone(), migration: self.id.clone(), ts_ms: now_ms(), kind })
    }

    /// The migration ended with `report`.
    pub fn finish(&self, report: Report) {
        self.progress.lock().unwrap().phase = "done".into();
        self.emit(ended(&report));
        *self.report.lock().unwrap() = Some(report);
        self.done.send_replace(true);
    }

    /// Whether it ended.
    pub fn is_done(&self) -> bool {
        *self.done.borrow()
    }

    /// Waits until it ended.
    pub async fn wait(&self) {
        let mut rx = self.done.subscribe();
        let _ = rx.wait_for(|d| *d).await;
    }

    /// The migration as the API shows it.
    pub fn status(&self) -> MigrationStatus {
        let progress = self.progress.lock().unwrap().clone();
        MigrationStatus {
            id: self.id.clone(),
            vm: self.vm.clone(),
            to: progress.target.clone(),
            done: self.is_done(),
            report: self.report.lock().unwrap().clone(),
            progress,
        }
    }
}

fn ended(report: &Report) -> EventKind {
    EventKind::Ended {
        result: report.result,
        destination: report.destination.clone(),
        downtime_ms: report.downtime_ms,
        error: report.error.clone(),
    }
}
