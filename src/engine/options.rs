//! What an operator can ask of a migration, with the one set of defaults
//! that the CLI, the API and the engine all use.

use crate::dirty::TrackerKind;
use crate::memory::DEFAULT_CHUNK_SIZE;
use crate::protocol::TransportKind;
use serde::{Deserialize, Serialize};

/// Default largest acceptable downtime, in milliseconds.
pub const DEFAULT_DOWNTIME_MS: u64 = 300;
/// Default number of parallel data streams per sender.
pub const DEFAULT_STREAMS: usize = 4;
/// Default round budget.
pub const DEFAULT_MAX_ROUNDS: u32 = 30;
/// Default time budget, in seconds.
pub const DEFAULT_MAX_TIME_S: u64 = 600;
/// Default time a target must fall behind before a fallback takes over.
pub const DEFAULT_SLOW_FOR_S: u64 = 10;
/// Most fallback hosts one migration names: every host of the migration
/// has a bit in the ledger (the source and the first destination too).
pub const MAX_FALLBACKS: usize = crate::ledger::MAX_HOSTS - 2;
/// Streams a migration may ask for.
pub const STREAMS: std::ops::RangeInclusive<usize> = 1..=64;

/// What to do when the budget runs out before convergence.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum BudgetAction {
    /// Switch over anyway (downtime exceeds the limit).
    #[default]
    Force,
    /// Give up: the VM keeps running on the source.
    Abort,
}

/// How the destination's RAM is checked against the source's before the
/// VM may run there (per-chunk xxh3 on both ends; a chunk that differs is
/// resent).
#[derive(Serialize, Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum VerifyMode {
    /// Every chunk compared once while the guest runs (a chunk that differs
    /// although the tracker did not report it is a tracker miss: resent, and
    /// the pause then compares every chunk); the pause compares only the
    /// chunks that changed or were sent since.
    #[default]
    Live,
    /// Every chunk compared in the pause (downtime grows with RAM size).
    Full,
    /// No comparison: the tracker alone is trusted.
    Off,
}

impl<'de> Deserialize<'de> for VerifyMode {
    /// `"live"`, `"full"`, `"off"`, or (as API clients of earlier releases
    /// send) `true` for the default and `false` for off.
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Either {
            Bool(bool),
            Name(String),
        }
        match Either::deserialize(d)? {
            Either::Bool(true) => Ok(VerifyMode::Live),
            Either::Bool(false) => Ok(VerifyMode::Off),
            Either::Name(n) => match n.as_str() {
                "live" => Ok(VerifyMode::Live),
                "full" => Ok(VerifyMode::Full),
                "off" => Ok(VerifyMode::Off),
                other => Err(serde::de::Error::custom(format!("verify: {other:?} is not live, full or off"))),
            },
        }
    }
}

/// A migration's options (the API's `migrate` request carries them).
#[derive(Serialize, Deserialize, Clone, Debug)]
#[serde(default)]
pub struct MigrateOptions {
    /// Largest acceptable downtime; rounds continue until the estimate fits.
    pub downtime_ms: u64,
    /// Parallel data streams per sender.
    pub streams: usize,
    /// Which data plane may be used.
    pub transport: TransportKind,
    /// Round budget before `on_budget` applies.
    pub max_rounds: u32,
    /// Time budget before `on_budget` applies.
    pub max_time_s: u64,
    /// What to do when the budget runs out.
    pub on_budget: BudgetAction,
    /// How both ends' RAM is compared before the destination resumes.
    pub verify: VerifyMode,
    /// Leave the VM paused on the destination (resume it with `dcmigrate resume`).
    pub suspend: bool,
    /// Force a tracker instead of the VM's best one.
    pub tracker: Option<TrackerKind>,
    /// Chunk size (the unit of scheduling and checksums).
    pub chunk_size: u64,
    /// Cap on the source's sending rate in MB/s (like QEMU's max-bandwidth).
    pub max_bandwidth_mbps: Option<f64>,
    /// The pause's deadline before `Resume`: past it the VM resumes on the
    /// source and the destination discards everything. Default: the larger
    /// of the downtime limit and the estimate, plus 5 s.
    pub switchover_timeout_ms: Option<u64>,
    /// Hosts to retarget to, in order, when the destination is lost or
    /// refuses before the switchover, is drained, or falls behind.
    pub fallback: Vec<String>,
    /// Falling behind: the target's rate (MB/s, while the source has a
    /// backlog) below this; default: a quarter of the best seen so far.
    pub slow_rate_mbps: Option<f64>,
    /// Falling behind must last this long (seconds) before the migration
    /// moves to a fallback host; 0: never judged.
    pub slow_for_s: u64,
    /// Test builds only: do not start the switchover before the API's
    /// `release` (retargets are still served meanwhile), so that a test can
    /// act on a migration that is certain not to have ended.
    #[cfg(feature = "test-hooks")]
    pub hold_switchover: bool,
}

impl Default for MigrateOptions {
    fn default() -> Self {
        Self {
            downtime_ms: DEFAULT_DOWNTIME_MS,
            streams: DEFAULT_STREAMS,
            transport: TransportKind::Auto,
            max_rounds: DEFAULT_MAX_ROUNDS,
            max_time_s: DEFAULT_MAX_TIME_S,
            on_budget: BudgetAction::Force,
            verify: VerifyMode::Live,
            suspend: false,
            tracker: None,
            chunk_size: DEFAULT_CHUNK_SIZE,
            max_bandwidth_mbps: None,
            switchover_timeout_ms: None,
            fallback: vec![],
            slow_rate_mbps: None,
            slow_for_s: DEFAULT_SLOW_FOR_S,
            #[cfg(feature = "test-hooks")]
            hold_switchover: false,
        }
    }
}

/// What an operator changes on a running migration (`dcmigrate set`,
/// `dcmigrate force-complete`); the engine takes it at once for the rate,
/// at its next round's end for the rest.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct Steering {
    /// The source's new rate cap, MB/s; 0 lifts the cap.
    #[serde(default)]
    pub max_bandwidth_mbps: Option<f64>,
    /// The new downtime limit, ms.
    #[serde(default)]
    pub downtime_ms: Option<u64>,
    /// Switch over at the next round's end, whatever the estimate.
    #[serde(default)]
    pub force_complete: bool,
}

impl Steering {
    /// Whether it asks for anything.
    pub fn is_empty(&self) -> bool {
        self == &Steering::default()
    }
}

/// The longest downtime limit an operator may set on a running migration
/// (`dcmigrate set --downtime-ms`): ten minutes.
pub const MAX_DOWNTIME_MS: u64 = 600_000;

/// Options no migration can run with.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum OptionsError {
    /// Streams out of [`STREAMS`].
    #[error("streams must be 1 to 64, not {0}")]
    Streams(usize),
    /// A rate cap below 0.1 MB/s, or not a number.
    #[error("max_bandwidth_mbps must be at least 0.1")]
    Bandwidth,
    /// Too many fallback hosts, or one named twice.
    #[error("fallback: at most {MAX_FALLBACKS} distinct hosts")]
    Fallback,
    /// A slowness threshold that is not a positive number.
    #[error("slow_rate_mbps must be a positive number")]
    SlowRate,
}

impl MigrateOptions {
    /// Refuses options no migration can run with (they come from API clients).
    pub fn check(&self) -> Result<(), OptionsError> {
        if !STREAMS.contains(&self.streams) {
            return Err(OptionsError::Streams(self.streams));
        }
        if self.max_bandwidth_mbps.is_some_and(|b| !(b >= 0.1 && b.is_finite())) {
            return Err(OptionsError::Bandwidth);
        }
        let distinct: std::collections::HashSet<_> = self.fallback.iter().collect();
        if self.fallback.len() > MAX_FALLBACKS || distinct.len() != self.fallback.len() {
            return Err(OptionsError::Fallback);
        }
        if self.slow_rate_mbps.is_some_and(|r| !(r > 0.0 && r.is_finite())) {
            return Err(OptionsError::SlowRate);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verify_mode_accepts_names_and_the_old_booleans() {
        let m = |j: &str| serde_json::from_str::<MigrateOptions>(j).map(|o| o.verify);
        assert_eq!(m(r#"{"verify": true}"#).unwrap(), VerifyMode::Live);
        assert_eq!(m(r#"{"verify": false}"#).unwrap(), VerifyMode::Off);
        assert_eq!(m(r#"{"verify": "full"}"#).unwrap(), VerifyMode::Full);
        assert_eq!(m("{}").unwrap(), VerifyMode::Live);
        assert!(m(r#"{"verify": "sometimes"}"#).is_err());
        assert_eq!(serde_json::to_value(VerifyMode::Off).unwrap(), "off");
    }
}
