//! What a migration tells the world when it ends: the [`Report`], for
//! people (the CLI prints it) and machines (`--json`, the API).

use super::options::VerifyMode;
use crate::dirty::TrackerKind;
use crate::protocol::{DataPlane, RdmaPath};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// How a migration ended.
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
    /// `Resume` was sent and its answer lost: the VM may run on the
    /// destination. It stays paused on the source, neither migrated again
    /// nor resumed there, until the source learns the outcome from the
    /// destination or an operator settles it (`dcmigrate resolve`).
    Unknown,
}

/// How the switchover was reached.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Switchover {
    /// The downtime estimate fitted the limit.
    Converged,
    /// The budget ran out with `--on-budget force`.
    Forced,
    /// The operator asked for it (`dcmigrate force-complete`).
    Requested,
}

/// The data planes a migration used, summed up.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum TransportUsed {
    /// No data plane was opened.
    #[default]
    None,
    /// TCP only.
    Tcp,
    /// RDMA only.
    Rdma,
    /// Some pairs one, some the other: see `senders`.
    Mixed,
}

impl TransportUsed {
    /// The summary of these pairs' data planes.
    pub fn of(planes: impl IntoIterator<Item = DataPlane>) -> Self {
        let set: std::collections::BTreeSet<DataPlane> = planes.into_iter().collect();
        match (set.contains(&DataPlane::Tcp), set.contains(&DataPlane::Rdma)) {
            (false, false) => Self::None,
            (true, false) => Self::Tcp,
            (false, true) => Self::Rdma,
            (true, true) => Self::Mixed,
        }
    }
}

/// When a verification pass ran.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum VerifyWhen {
    /// While the guest ran (`--verify live`).
    #[default]
    Live,
    /// In the pause.
    Pause,
}

/// One comparison of both ends' checksums.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct VerifyPass {
    /// When it ran.
    pub when: VerifyWhen,
    /// Blocks compared.
    pub blocks: u64,
    /// How long it took.
    pub ms: f64,
    /// Blocks that differed (in a live pass, also those the guest wrote meanwhile).
    pub mismatched: u64,
    /// Of those, blocks the tracker had not reported: resent.
    pub tracker_misses: u64,
}

/// What verification did.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct VerifyReport {
    /// The mode that ran.
    pub mode: VerifyMode,
    /// Bytes per block (the unit compared).
    pub block_bytes: u64,
    /// Every pass, in order.
    pub passes: Vec<VerifyPass>,
    /// Blocks that differed although the tracker reported none of their
    /// pages (a tracker that misses writes, or corruption): resent.
    pub tracker_misses: u64,
    /// Why the pause compared every chunk, if it did.
    pub full_pause_reason: Option<String>,
}

/// Time from pausing the VM to it running on the destination, by phase.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct Downtime {
    /// Pausing the VM.
    pub pause_ms: f64,
    /// The final dirty sync.
    pub final_sync_ms: f64,
    /// The final round.
    pub final_send_ms: f64,
    /// Verification.
    pub verify_ms: f64,
    /// Saving, sending and loading the device state.
    pub device_state_ms: f64,
    /// Resuming on the destination.
    pub resume_ms: f64,
}

/// One round of dirty pages.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct RoundReport {
    /// Its number (0: everything).
    pub round: u32,
    /// Pages applied at the target.
    pub pages: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Its duration.
    pub ms: f64,
    /// Pages the dirty sync after this round found written.
    pub dirty_pages: u64,
    /// How long that sync took (the tracker's cost per round).
    #[serde(default)]
    pub sync_ms: f64,
    /// How long that sync stopped the guest (soft-dirty freezes it).
    #[serde(default)]
    pub guest_stop_ms: Option<f64>,
    /// The downtime the pause would have taken after this round: the final
    /// send, the pause's comparisons and the final sync (what convergence
    /// is judged by).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub estimate_ms: Option<f64>,
}

/// One sending host's data plane to one destination.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct SenderTransport {
    /// The sender.
    pub from: String,
    /// The destination.
    pub to: String,
    /// The data plane.
    pub transport: DataPlane,
    /// The RDMA path, when the data plane is RDMA.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rdma: Option<RdmaPath>,
    /// RDMA streams re-paired after their queue pair failed (the source's
    /// own pairs; a forwarder logs its own).
    #[serde(default)]
    pub re_pairs: u64,
    /// RDMA streams that could not re-pair and went on over TCP
    /// (`--transport auto`; the source's own streams).
    #[serde(default)]
    pub tcp_fallbacks: u64,
    /// Why the pair does not use RDMA although the migration allowed it
    /// (`--transport auto`), as the source saw it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub why_not_rdma: Option<String>,
}

/// One change of destination.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct RetargetReport {
    /// Milliseconds after the migration started.
    pub at_ms: f64,
    /// The old destination.
    pub from: String,
    /// The new destination.
    pub to: String,
    /// Whether the old destination forwarded what it held.
    pub forwarding: bool,
    /// Bytes of current RAM the old destination held at the retarget.
    pub at_old_destination_bytes: u64,
    /// What each host had sent before it (to compute `bytes_after`).
    #[serde(skip)]
    pub sent_before: BTreeMap<String, u64>,
    /// Payload bytes each host sent after this retarget.
    pub bytes_after: BTreeMap<String, u64>,
    /// Why: `operator` (`dcmigrate retarget`), or the automatic decision's
    /// reason (see [`Report::decisions`]).
    #[serde(default = "operator")]
    pub reason: String,
    /// Why, by kind.
    #[serde(default)]
    pub cause: Cause,
}

fn operator() -> String {
    "operator".into()
}

/// A decision the engine took on its own (`--fallback`): why, and what it did.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct Decision {
    /// Milliseconds after the migration started.
    pub at_ms: f64,
    /// The destination it was about.
    pub target: String,
    /// Why (`target lost: …`, `target refused: …`, `asked to leave: …`, `falling behind: …`).
    pub reason: String,
    /// Why, by kind.
    #[serde(default)]
    pub cause: Cause,
    /// What it did (`retarget to hostC`, or why it could not).
    pub action: String,
}

/// One RAM region of the VM.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct RegionReport {
    /// The region (QEMU's memory backend id).
    pub id: String,
    /// Its size.
    pub bytes: u64,
    /// Bytes per page of its backing: 4096 on tmpfs, the huge page size on
    /// hugetlbfs.
    pub page_size: u64,
}

/// What kind of failure ended a migration (`Report::reason`): what tools
/// and tests match, where `error` says it in words.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, strum::IntoStaticStr)]
#[serde(rename_all = "snake_case")]
#[strum(serialize_all = "snake_case")]
pub enum FailureKind {
    /// The operator cancelled it.
    Cancelled,
    /// The VM's RAM layout cannot be migrated.
    Layout,
    /// The VM's RAM could not be mapped.
    Ram,
    /// No dirty tracker works.
    NoTracker,
    /// A dirty sync failed.
    Sync,
    /// The destination refused the session.
    Refused,
    /// No data plane to the destination opened.
    NoDataPlane,
    /// The destination was lost (and nothing replaced it).
    DestinationLost,
    /// The budget ran out with `--on-budget abort`.
    GaveUp,
    /// The pause outlasted the switchover deadline.
    SwitchoverTimeout,
    /// The VM failed a request.
    Vm,
    /// Checksums still differed after resending.
    Verify,
    /// Pages no host could send any more.
    Stranded,
    /// The agent failed internally (a task panicked).
    Internal,
}

/// Why a migration did not complete: its kind, and the host it concerns.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Reason {
    /// What kind of failure.
    pub kind: FailureKind,
    /// The host it concerns (a destination that refused or was lost).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// The kind of the host's own error, when it answered with one
    /// (`drained`, `no_room`, `unsupported`: protocol 6 peers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<crate::protocol::ErrorCode>,
}

impl Reason {
    /// A failure of `kind` that concerns no host in particular.
    pub fn of(kind: FailureKind) -> Self {
        Self { kind, host: None, code: None }
    }

    /// A failure of `kind` at `host`.
    pub fn at(kind: FailureKind, host: &str) -> Self {
        Self { kind, host: Some(host.into()), code: None }
    }
}

/// Why the destination changed (`RetargetReport::cause`, `Decision::cause`).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Cause {
    /// An operator asked (`dcmigrate retarget`).
    #[default]
    Operator,
    /// The target failed, vanished, or a batch to it failed.
    Lost,
    /// The first destination refused the session.
    Refused,
    /// The target asked the source to leave (drained, or out of room).
    Leave,
    /// The target fell behind.
    Slow,
}

/// Everything a migration did, as it ended.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct Report {
    /// How it ended.
    pub result: Outcome,
    /// What went wrong, and where the VM is, if it did not complete.
    pub error: Option<String>,
    /// The failure's kind (and host), if it did not complete.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<Reason>,
    /// The VM.
    pub vm: String,
    /// The source host.
    pub source: String,
    /// The (last) destination.
    pub destination: String,
    /// The VM's RAM.
    pub ram_bytes: u64,
    /// Its regions: their size and pages (a destination puts each on pages
    /// of the same size).
    #[serde(default)]
    pub ram: Vec<RegionReport>,
    /// From start to end.
    pub total_ms: f64,
    /// None if the VM was never paused.
    pub downtime_ms: Option<f64>,
    /// The downtime by phase.
    pub downtime: Downtime,
    /// How the switchover was reached, if it was.
    pub switchover: Option<Switchover>,
    /// Every round, in order (the final, paused one included).
    pub rounds: Vec<RoundReport>,
    /// Payload bytes each sending host put on the wire.
    pub bytes_by_sender: BTreeMap<String, u64>,
    /// The dirty tracker that ran.
    pub tracker: Option<TrackerKind>,
    /// The data planes used: see `senders`.
    pub transport: TransportUsed,
    /// Which data plane each sending host used to each destination.
    pub senders: Vec<SenderTransport>,
    /// Streams per sender.
    pub streams: usize,
    /// Whether both ends' checksums were compared before the resume.
    pub verified: bool,
    /// Blocks (see `verification.block_bytes`) that differed in the pause
    /// and were resent.
    pub verify_mismatched_chunks: u32,
    /// Verification's passes, their costs and the tracker misses found.
    pub verification: VerifyReport,
    /// Bytes of device state.
    pub device_state_bytes: u64,
    /// Pages never sent because they are holes (unallocated, zero) at the
    /// source, summed over destinations.
    pub zero_pages_skipped: u64,
    /// Pages found all zero while they were read (a guest that zeroed its
    /// memory) and sent as a flag without their bytes, by every sender over
    /// TCP (RDMA writes pages as they are).
    #[serde(default)]
    pub zero_pages_sent: u64,
    /// Where the VM is now (host name), as far as this agent knows.
    pub vm_runs_on: Option<String>,
    /// Every change of destination, in order.
    pub retargets: Vec<RetargetReport>,
    /// Time from the last retarget to the end.
    pub after_retarget_ms: Option<f64>,
    /// Forwarders that failed; the source sent their share.
    pub forwarders_lost: Vec<String>,
    /// What an operator changed while it ran (`set`, `force-complete`),
    /// in order, with when.
    #[serde(default)]
    pub steering: Vec<String>,
    /// What the engine decided on its own (automatic retargets), in order.
    #[serde(default)]
    pub decisions: Vec<Decision>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closed_sets_serialize_as_before() {
        let r = Report {
            switchover: Some(Switchover::Converged),
            tracker: Some(TrackerKind::SoftDirty),
            transport: TransportUsed::of([DataPlane::Tcp, DataPlane::Rdma]),
            ..Default::default()
        };
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(
            (&v["switchover"], &v["tracker"], &v["transport"]),
            (&"converged".into(), &"soft-dirty".into(), &"mixed".into())
        );
        assert_eq!(TransportUsed::of([]), TransportUsed::None);
    }
}
