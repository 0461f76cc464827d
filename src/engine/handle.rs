//! The handle the agent's API holds on a running migration: live progress,
//! the report once it ends, cancellation, and the retarget channel.

use super::report::Report;
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU64, Ordering};
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

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// Shared between the engine task and the agent's API.
pub struct MigrationHandle {
    /// The migration's id.
    pub id: String,
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
    /// Test builds: set by the API's `release` (see `MigrateOptions::hold_switchover`).
    #[cfg(feature = "test-hooks")]
    pub released: watch::Sender<bool>,
}

/// What is told of a migration's phase changes: (VM, destination, phase).
pub type PhaseHook = Box<dyn Fn(&str, &str, super::phase::Phase) + Send + Sync>;

impl MigrationHandle {
    /// A handle for migrating `vm` to `to`.
    pub fn new(vm: &str, to: &str) -> Arc<Self> {
        let (retarget_tx, rx) = mpsc::unbounded_channel();
        Arc::new(Self {
            retarget_tx,
            retarget_rx: Mutex::new(Some(rx)),
            id: format!("m{}-{}", NEXT_ID.fetch_add(1, Ordering::Relaxed), std::process::id()),
            vm: vm.to_owned(),
            to: to.to_owned(),
            cancel: CancellationToken::new(),
            progress: Mutex::new(Progress { phase: "starting".into(), target: to.to_owned(), ..Default::default() }),
            report: Mutex::new(None),
            done: watch::channel(false).0,
            on_phase: Mutex::new(None),
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
        self.retarget_tx
            .send(RetargetRequest { to, addr, forward, reply })
            .map_err(|_| "the migration has ended".to_string())?;
        rx.await.map_err(|_| "the migration has ended".to_string())?
    }

    /// Sets what is told of phase changes.
    pub fn on_phase(&self, hook: PhaseHook) {
        *self.on_phase.lock().unwrap() = Some(hook);
    }

    /// The engine reached `phase`, with `destination` the current one.
    pub fn phase_changed(&self, destination: &str, phase: super::phase::Phase) {
        if let Some(h) = self.on_phase.lock().unwrap().as_ref() {
            h(&self.vm, destination, phase);
        }
    }

    /// Updates the live progress.
    pub fn set_progress(&self, f: impl FnOnce(&mut Progress)) {
        f(&mut self.progress.lock().unwrap());
    }

    /// The migration ended with `report`.
    pub fn finish(&self, report: Report) {
        self.progress.lock().unwrap().phase = "done".into();
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
