//! What a migration tells the world: live progress while it runs, the final
//! report when it ends, and the handle the agent's API reads both from.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The VM runs (or waits, with `--suspend`) on the destination.
    Completed,
    /// Cancelled by the operator; the VM runs on the source.
    Cancelled,
    /// Round/time budget ran out with `--on-budget abort`; the VM runs on the source.
    GaveUp,
    /// Something broke; `error` says what and where the VM is.
    #[default]
    Failed,
}

/// Time from pausing the VM to it running on the destination, by phase.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct Downtime {
    pub pause_ms: f64,
    pub final_sync_ms: f64,
    pub final_send_ms: f64,
    pub verify_ms: f64,
    pub device_state_ms: f64,
    pub resume_ms: f64,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct RoundReport {
    pub round: u32,
    pub pages: u64,
    pub bytes: u64,
    pub ms: f64,
    /// Pages the dirty sync after this round found written.
    pub dirty_pages: u64,
    /// How long that sync took (the tracker's cost per round).
    #[serde(default)]
    pub sync_ms: f64,
}

/// One sending host's data plane to one destination.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct SenderTransport {
    pub from: String,
    pub to: String,
    pub transport: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct Report {
    pub result: Outcome,
    pub error: Option<String>,
    pub vm: String,
    pub source: String,
    pub destination: String,
    pub ram_bytes: u64,
    pub total_ms: f64,
    /// None if the VM was never paused.
    pub downtime_ms: Option<f64>,
    pub downtime: Downtime,
    /// "converged" or "forced" (budget ran out with `--on-budget force`).
    pub switchover: Option<String>,
    pub rounds: Vec<RoundReport>,
    /// Payload bytes each sending host put on the wire.
    pub bytes_by_sender: BTreeMap<String, u64>,
    pub tracker: Option<String>,
    /// "tcp", "rdma", or "mixed": see `senders`.
    pub transport: String,
    /// Which data plane each sending host used to each destination.
    pub senders: Vec<SenderTransport>,
    pub streams: usize,
    pub verified: bool,
    pub verify_mismatched_chunks: u32,
    pub device_state_bytes: u64,
    /// Pages never sent because they are holes (unallocated, zero) at the
    /// source, summed over destinations.
    pub zero_pages_skipped: u64,
    /// Where the VM is now (host name), as far as this agent knows.
    pub vm_runs_on: Option<String>,
    /// Every change of destination, in order.
    pub retargets: Vec<RetargetReport>,
    /// Time from the last retarget to the end.
    pub after_retarget_ms: Option<f64>,
    /// Forwarders that failed; the source sent their share.
    pub forwarders_lost: Vec<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct RetargetReport {
    /// Milliseconds after the migration started.
    pub at_ms: f64,
    pub from: String,
    pub to: String,
    /// Whether the old destination forwarded what it held.
    pub forwarding: bool,
    /// Bytes of current RAM the old destination held at the retarget.
    pub at_old_destination_bytes: u64,
    #[serde(skip)]
    pub sent_before: BTreeMap<String, u64>,
    /// Payload bytes each host sent after this retarget.
    pub bytes_after: BTreeMap<String, u64>,
}

/// A request to change the destination of a running migration.
pub struct RetargetRequest {
    pub to: String,
    pub addr: std::net::SocketAddr,
    /// false: the old destination is dropped (cancel-and-restart).
    pub forward: bool,
    pub reply: oneshot::Sender<Result<(), String>>,
}

#[derive(Serialize, Clone, Debug, Default)]
pub struct Progress {
    pub phase: String,
    pub round: u32,
    pub ram_bytes: u64,
    pub bytes_sent: u64,
    /// Bytes of RAM whose current content the destination holds.
    pub at_destination_bytes: u64,
    pub remaining_bytes: u64,
    pub rate_mbps: f64,
    pub dirty_rate_mbps: f64,
    pub eta_s: Option<f64>,
    pub elapsed_ms: f64,
    /// The current destination.
    pub target: String,
    pub retargets: u32,
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// Shared between the engine task and the agent's API.
pub struct MigrationHandle {
    pub id: String,
    pub vm: String,
    pub to: String,
    pub cancel: CancellationToken,
    pub progress: Mutex<Progress>,
    report: Mutex<Option<Report>>,
    done: watch::Sender<bool>,
    retarget_tx: mpsc::UnboundedSender<RetargetRequest>,
    retarget_rx: Mutex<Option<mpsc::UnboundedReceiver<RetargetRequest>>>,
    /// Test builds: set by the API's `release` (see `MigrateOptions::hold_switchover`).
    #[cfg(feature = "test-hooks")]
    pub released: watch::Sender<bool>,
}

impl MigrationHandle {
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

    pub fn set_progress(&self, f: impl FnOnce(&mut Progress)) {
        f(&mut self.progress.lock().unwrap());
    }

    pub fn finish(&self, report: Report) {
        self.progress.lock().unwrap().phase = "done".into();
        *self.report.lock().unwrap() = Some(report);
        self.done.send_replace(true);
    }

    pub fn is_done(&self) -> bool {
        *self.done.borrow()
    }

    pub async fn wait(&self) {
        let mut rx = self.done.subscribe();
        let _ = rx.wait_for(|d| *d).await;
    }

    pub fn snapshot(&self) -> Value {
        json!({
            "id": self.id, "vm": self.vm, "to": self.progress.lock().unwrap().target, "done": self.is_done(),
            "progress": *self.progress.lock().unwrap(),
            "report": *self.report.lock().unwrap(),
        })
    }
}
