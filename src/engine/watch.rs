//! What `dcmigrate watch` streams: a migration's events (start, phases,
//! rounds, progress that never runs backwards, retargets and operator
//! changes, the end), sent through the migration's handle to every watcher
//! of the agent as JSON lines.

use super::options::Steering;
use super::report::Outcome;
use serde::{Deserialize, Serialize};

/// One thing that happened to a migration.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Event {
    /// The VM.
    pub vm: String,
    /// The migration's id.
    pub migration: String,
    /// When, in ms since the Unix epoch.
    pub ts_ms: u64,
    /// What.
    #[serde(flatten)]
    pub kind: EventKind,
}

/// The kinds of events, tagged `event` in JSON.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum EventKind {
    /// The agent accepted the migration.
    Started {
        /// The first destination.
        to: String,
    },
    /// The engine moved to a new phase (`setup`, `precopy`, `paused`,
    /// `committing`, `resume_sent`).
    Phase {
        /// The phase.
        phase: String,
        /// The destination then.
        destination: String,
    },
    /// A round of dirty pages ended.
    Round {
        /// Its number (0: the first pass over RAM).
        round: u32,
        /// Pages sent.
        pages: u64,
        /// Bytes sent.
        bytes: u64,
        /// Its duration.
        ms: f64,
        /// Pages the tracker found dirty after it.
        dirty_pages: u64,
    },
    /// Progress, at most once a second.
    Progress {
        /// Share of RAM the destination has had at least once, %: never
        /// decreases (the guest re-dirtying pages shows in `remaining_bytes`).
        percent: f64,
        /// RAM the destination still lacks now.
        remaining_bytes: u64,
        /// Payload bytes sent so far by every host.
        bytes_sent: u64,
        /// Throughput to the destination, MB/s.
        rate_mbps: f64,
        /// The round under way.
        round: u32,
    },
    /// A retarget was asked, and what came of it.
    Retarget {
        /// The new destination.
        to: String,
        /// Whether the old destination forwards what it holds.
        forward: bool,
        /// Why (`operator`: `dcmigrate retarget`).
        reason: String,
        /// Why it was refused, if it was.
        error: Option<String>,
    },
    /// The engine decided on its own (`--fallback`), as in the report's
    /// `decisions`: why, and what it did (a retarget it starts follows).
    Decision {
        /// The destination it was about.
        target: String,
        /// Why.
        reason: String,
        /// What it did.
        action: String,
    },
    /// An operator changed the migration (`set`, `force-complete`).
    Steered {
        /// The change.
        steering: Steering,
    },
    /// The migration ended.
    Ended {
        /// How.
        result: Outcome,
        /// The last destination.
        destination: String,
        /// The pause, if there was one.
        downtime_ms: Option<f64>,
        /// What went wrong, if it did.
        error: Option<String>,
    },
}

impl EventKind {
    /// The JSON tag (`round`, `ended`…), for filters and logs.
    pub fn name(&self) -> &'static str {
        match self {
            EventKind::Started { .. } => "started",
            EventKind::Phase { .. } => "phase",
            EventKind::Round { .. } => "round",
            EventKind::Progress { .. } => "progress",
            EventKind::Retarget { .. } => "retarget",
            EventKind::Decision { .. } => "decision",
            EventKind::Steered { .. } => "steered",
            EventKind::Ended { .. } => "ended",
        }
    }
}

/// Where a handle sends its events: every watcher subscribes to it.
pub(crate) type EventSink = tokio::sync::broadcast::Sender<Event>;

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// A phase's name in events.
pub(crate) fn phase_name(p: super::phase::Phase) -> &'static str {
    use super::phase::Phase::*;
    match p {
        Setup => "setup",
        Precopy => "precopy",
        Paused => "paused",
        Committing => "committing",
        ResumeSent => "resume_sent",
    }
}
