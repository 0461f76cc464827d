//! What the engine needs from a VM, as a small ladder of traits:
//! [`SourceVm`] (a running VM we migrate away from) and [`IncomingVm`] (a VM
//! prepared paused on a destination). Backends: the synthetic guest
//! ([`synthetic`]) and stock QEMU ([`qemu`], controlled over [`qmp`]).

pub mod qemu;
pub mod qmp;
pub mod synthetic;

use crate::dirty::{DirtyTracker, TrackerKind};
use crate::memory::{GuestRam, RegionSpec};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum VmError {
    #[error("VM control {path}: {msg}")]
    Control { path: String, msg: String },
    #[error("VM refused {cmd}: {msg}")]
    Refused { cmd: String, msg: String },
    #[error("launching the incoming VM: {0}")]
    Launch(String),
    #[error(transparent)]
    Dirty(#[from] crate::dirty::DirtyError),
}

/// One RAM backing file of a VM.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct RamFile {
    pub id: String,
    pub path: PathBuf,
    pub size: u64,
}

/// How a destination starts the incoming side of a VM.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum LaunchSpec {
    Synthetic {
        workload: synthetic::Workload,
    },
    /// A QEMU command line (without -qmp/-incoming/-S/-daemonize/-pidfile,
    /// which the agent adds); `{dir}` stands for the VM's directory on the
    /// host that runs it.
    Qemu {
        binary: String,
        args: Vec<String>,
    },
}

/// What an agent knows of a VM on its host (registered through the API).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct VmRecord {
    pub name: String,
    pub ram: Vec<RamFile>,
    /// The VM's control socket (the synthetic guest's; QEMU's QMP).
    pub control: PathBuf,
    /// Shared dirty log, for guests that keep one.
    #[serde(default)]
    pub dirty_log: Option<PathBuf>,
    pub launch: LaunchSpec,
    /// A directory the agent created for this VM (RAM included), removed
    /// when the VM leaves this host.
    #[serde(default)]
    pub owned_dir: Option<PathBuf>,
}

impl VmRecord {
    pub fn regions(&self) -> Vec<RegionSpec> {
        self.ram.iter().map(|r| RegionSpec { id: r.id.clone(), size: r.size }).collect()
    }
}

/// A running VM on the source host.
pub trait SourceVm: Send + Sync {
    fn record(&self) -> &VmRecord;
    /// Trackers this VM supports, best first.
    fn trackers(&self) -> Vec<TrackerKind>;
    /// Starts (and self-tests) a dirty tracker over this VM's RAM.
    fn start_tracker(&self, kind: TrackerKind, ram: &GuestRam) -> Result<Box<dyn DirtyTracker>, VmError>;
    /// Stops the guest from running; returns once it no longer writes memory.
    fn pause(&self) -> Result<(), VmError>;
    fn resume(&self) -> Result<(), VmError>;
    /// The paused VM's device state.
    fn device_state(&self) -> Result<Vec<u8>, VmError>;
    /// The VM runs elsewhere now: stop it here for good.
    fn stop(&self) -> Result<(), VmError>;
    /// A short state description for `status` (running, paused…).
    fn status(&self) -> Result<serde_json::Value, VmError>;
}

/// The paused VM on a destination, waiting for RAM and device state.
pub trait IncomingVm: Send + Sync {
    fn load_device_state(&self, state: &[u8]) -> Result<(), VmError>;
    /// Runs the VM (`start`), or keeps it paused but committed (`!start`).
    fn commit(&self, start: bool) -> Result<VmRecord, VmError>;
    /// Kills the incoming VM and removes what it left (migration aborted).
    fn discard(&self);
}
