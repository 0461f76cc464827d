//! What the engine needs from a VM, as a small ladder of traits:
//! [`SourceVm`] (a running VM we migrate away from) and [`IncomingVm`] (a VM
//! prepared paused on a destination). Backends: the synthetic guest
//! ([`synthetic`]) and stock QEMU ([`qemu`], controlled over [`qmp`]);
//! incoming ones in a systemd scope of their own ([`scope`]).

pub(crate) mod cgroup;
pub(crate) mod ident;
pub mod qemu;
pub mod qmp;
pub(crate) mod scope;
pub mod synthetic;

use crate::dirty::{DirtyTracker, TrackerKind};
use crate::memory::{GuestRam, RegionSpec};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use thiserror::Error;

/// Controlling a VM failed.
#[derive(Debug, Error)]
pub enum VmError {
    /// Talking to the VM's control socket failed (connect, I/O, bad reply).
    #[error("VM control {path}: {msg}")]
    Control {
        /// The control socket (QMP, or the synthetic guest's).
        path: String,
        /// What went wrong.
        msg: String,
    },
    /// The VM answered but refused or failed a command.
    #[error("VM refused {cmd}: {msg}")]
    Refused {
        /// The command (a QMP command name, or the step that needed it).
        cmd: String,
        /// The VM's reason.
        msg: String,
    },
    /// Launching the incoming VM failed, or the QEMU backend refused to take
    /// a VM on (attach checks, launch spec checks, loading the device state).
    #[error("launching the incoming VM: {0}")]
    Launch(String),
    /// The VM's command line cannot be described for other hosts.
    #[error("describing the VM")]
    Describe(#[source] crate::vm::qemu::DescribeError),
    /// A destination refused a peer's description of a VM.
    #[error("the VM's description")]
    Description(#[source] crate::vm::qemu::DescriptionError),
    /// Starting or self-testing a dirty tracker failed.
    #[error(transparent)]
    Dirty(#[from] crate::dirty::DirtyError),
}

/// One RAM backing file of a VM.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct RamFile {
    /// The region's name (QEMU's memory backend id; `ram0` for the synthetic guest).
    pub id: String,
    /// The file that holds the region's bytes, shared with the VM.
    pub path: PathBuf,
    /// Bytes, a multiple of the page size.
    pub size: u64,
    /// Bytes per page of its file system (a huge page size on hugetlbfs),
    /// as read when the file was opened.
    #[serde(default = "base_page")]
    pub page_size: u64,
}

fn base_page() -> u64 {
    crate::memory::PAGE_SIZE as u64
}

impl RamFile {
    /// A region's file on base pages (what its page size is, is read when
    /// it is mapped).
    pub fn new(id: impl Into<String>, path: impl Into<PathBuf>, size: u64) -> Self {
        RamFile { id: id.into(), path: path.into(), size, page_size: base_page() }
    }
}

/// How a destination starts the incoming side of a VM.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum LaunchSpec {
    /// The synthetic guest, started as `dcmigrate guest --incoming`.
    Synthetic {
        /// How the guest keeps dirtying memory once it runs there.
        workload: synthetic::Workload,
    },
    /// A QEMU command line, as agents of protocol 3 and older send it (the
    /// source QEMU's own, monitors and the agent's options taken out). A
    /// destination never runs it: it reads it into a description first, as
    /// a source does (see [`qemu::describe`]).
    Qemu {
        /// The source's QEMU program (its name gives the architecture).
        binary: String,
        /// Its arguments.
        args: Vec<String>,
    },
    /// A QEMU VM's typed description (protocol 4): what the VM is, from
    /// which a destination builds QEMU's command line itself.
    QemuVm {
        /// The description.
        description: Box<qemu::Description>,
    },
}

/// What an agent knows of a VM on its host (registered through the API).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct VmRecord {
    /// The VM's name, unique on its host.
    pub name: String,
    /// Its RAM backing files, in layout order.
    pub ram: Vec<RamFile>,
    /// The VM's control socket (the synthetic guest's; QEMU's QMP).
    pub control: PathBuf,
    /// Shared dirty log, for guests that keep one.
    #[serde(default)]
    pub dirty_log: Option<PathBuf>,
    /// How a destination starts this VM's incoming side.
    pub launch: LaunchSpec,
    /// A directory the agent created for this VM (RAM included), removed
    /// when the VM leaves this host.
    #[serde(default)]
    pub owned_dir: Option<PathBuf>,
    /// Directories on huge-page mounts the agent created for this VM's
    /// RAM, removed with `owned_dir`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub huge_dirs: Vec<PathBuf>,
    /// The command line protocol-3 destinations get (a QEMU attached here;
    /// a VM that arrived as a description cannot go to them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub legacy: Option<LaunchSpec>,
    /// The agent's runtime directory for this VM (monitor, logs), removed
    /// when the VM leaves this host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime_dir: Option<PathBuf>,
    /// Where its first serial port writes, if to a log.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub console: Option<PathBuf>,
    /// The uid it runs as, when the agent gave it one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    /// Its own cgroup, when the agent made one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<cgroup::VmCgroup>,
    /// Host-local parts of its command line that destinations do not get.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
    /// The files a client handed over (RAM, control socket, dirty log), as
    /// they were then: every later open must find the same file.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub idents: std::collections::BTreeMap<PathBuf, ident::FileIdent>,
    /// The disk images it writes (a VM this agent started), which no other
    /// VM of this host may.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<ident::FileIdent>,
}

impl Default for LaunchSpec {
    /// An idle synthetic guest.
    fn default() -> Self {
        LaunchSpec::Synthetic { workload: Default::default() }
    }
}

impl VmRecord {
    /// What a destination gets to start this VM: the description if it
    /// reads descriptions (protocol 4), else the command line (none for a
    /// VM that arrived as a description).
    pub fn launch_for(&self, descriptions: bool) -> Option<LaunchSpec> {
        match &self.launch {
            LaunchSpec::QemuVm { .. } if !descriptions => self.legacy.clone(),
            other => Some(other.clone()),
        }
    }

    /// The identity `path` had when it was handed over, if it was.
    pub fn ident(&self, path: &std::path::Path) -> Option<ident::FileIdent> {
        self.idents.get(path).copied()
    }

    /// Whether some of its RAM is on huge pages, which soft-dirty does not
    /// track (the kernel keeps no soft-dirty bit for hugetlb pages).
    pub fn on_huge_pages(&self) -> bool {
        self.ram.iter().any(|r| r.page_size > crate::memory::PAGE_SIZE as u64)
    }

    /// The RAM regions to announce to a destination, one per RAM file.
    pub fn regions(&self) -> Vec<RegionSpec> {
        self.ram.iter().map(|r| RegionSpec { id: r.id.clone(), size: r.size }).collect()
    }
}

/// Whether `name` can name a VM (or a RAM region) and the files made for
/// it: letters, digits, '-', '_' and '.', not first, so never a path.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

/// A VM's live state, for `list` and `status` (the fields its kind knows).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct VmState {
    /// `running`, `paused`, `incoming` or `other`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    /// The process that runs it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// Synthetic guest: pages written so far.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub writes: Option<u64>,
    /// Synthetic guest: ticks of its clock (it travels with the device state).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heartbeat: Option<u64>,
    /// Synthetic guest: committed on this host (not an incoming copy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub committed: Option<bool>,
    /// Synthetic guest: its longest pause on this host so far, in ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub longest_pause_ms: Option<f64>,
    /// QEMU: its run state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qemu_state: Option<String>,
    /// `qemu` for QEMU guests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// Why the state could not be read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl VmState {
    /// A state that could not be read.
    pub fn error(why: String) -> Self {
        Self { error: Some(why), ..Default::default() }
    }
}

/// A running VM on the source host.
pub trait SourceVm: Send + Sync {
    /// What the agent knows of this VM.
    fn record(&self) -> &VmRecord;
    /// Trackers this VM supports, best first.
    fn trackers(&self) -> Vec<TrackerKind>;
    /// Starts (and self-tests) a dirty tracker over this VM's RAM.
    fn start_tracker(&self, kind: TrackerKind, ram: &GuestRam) -> Result<Box<dyn DirtyTracker>, VmError>;
    /// Stops the guest from running; returns once it no longer writes memory.
    fn pause(&self) -> Result<(), VmError>;
    /// Lets the paused guest run again (a failed migration, `dcmigrate resume`).
    fn resume(&self) -> Result<(), VmError>;
    /// The paused VM's device state.
    fn device_state(&self) -> Result<Vec<u8>, VmError>;
    /// The VM runs elsewhere now: stop it here for good.
    fn stop(&self) -> Result<(), VmError>;
    /// Its live state (running, paused…).
    fn status(&self) -> Result<VmState, VmError>;
}

/// The paused VM on a destination, waiting for RAM and device state.
pub trait IncomingVm: Send + Sync {
    /// Loads the device state the source saved; the VM stays paused.
    fn load_device_state(&self, state: &[u8]) -> Result<(), VmError>;
    /// Runs the VM (`start`), or keeps it paused but committed (`!start`).
    fn commit(&self, start: bool) -> Result<VmRecord, VmError>;
    /// Kills the incoming VM and removes what it left (migration aborted).
    fn discard(&self);
    /// Whether the incoming VM's process still runs (a VM that died during
    /// pre-copy fails the migration at once, not at the switchover).
    fn alive(&self) -> bool;
}
