//! The agent's local API: JSON lines over a unix socket, used by the CLI,
//! the tests and orchestrators. Every request is an object with a `cmd`;
//! every reply an object with `ok` (and `error` when false) and the fields
//! of the request's reply type below. [`Client`] makes typed calls. See
//! README "Agent API".

use crate::engine::{MigrateOptions, MigrationStatus};
use crate::vm::{LaunchSpec, RamFile, VmRecord, VmState};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use thiserror::Error;

/// Longest request or reply line (a VM record with many regions fits easily).
pub const MAX_LINE: usize = 1 << 20;

/// A request to the agent.
#[derive(Serialize, Deserialize, Debug, Clone)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    /// This agent's name, addresses and peers ([`InfoReply`]).
    Info,
    /// A VM on this host puts itself under the agent's management.
    Register {
        /// The VM.
        vm: Box<VmRecord>,
    },
    /// Puts a running QEMU under the agent's management, found by its QMP
    /// socket ([`AttachReply`]).
    AttachQemu {
        /// The VM's name.
        name: String,
        /// Its QMP socket.
        qmp: PathBuf,
        /// Its command line, if not its own (from /proc): what its
        /// description for destinations is read from.
        #[serde(default)]
        launch: Option<LaunchSpec>,
        /// Operator network names for its netdev ids (a tap on no bridge
        /// needs one).
        #[serde(default)]
        networks: std::collections::BTreeMap<String, String>,
    },
    /// VMs on this host and their state ([`ListReply`]).
    List,
    /// Starts migrating a VM of this host; returns at once ([`MigrateReply`]).
    Migrate {
        /// The VM.
        vm: String,
        /// The destination host.
        to: String,
        /// The migration's options.
        #[serde(default)]
        options: MigrateOptions,
    },
    /// Changes the destination of the VM's running migration ([`RetargetReply`]).
    Retarget {
        /// The VM.
        vm: String,
        /// The new destination.
        to: String,
        /// The old destination sends what it holds (default) or is dropped.
        #[serde(default = "yes")]
        forward: bool,
    },
    /// Progress of the VM's migration, or of all of them ([`StatusReply`]).
    Status {
        /// The VM, or every migration.
        #[serde(default)]
        vm: Option<String>,
    },
    /// Blocks until the VM's migration finished ([`MigrationStatus`]).
    Wait {
        /// The VM.
        vm: String,
    },
    /// Changes a running migration ([`SteerReply`]): its rate cap (MB/s, 0
    /// lifts it) and downtime limit (ms), and/or has it switch over at the
    /// next round's end.
    Steer {
        /// The VM.
        vm: String,
        /// What to change.
        #[serde(flatten)]
        steering: crate::engine::Steering,
    },
    /// Streams events as JSON lines (after an `ok` line): of the VM's
    /// migrations until one ends, or of all migrations until the client
    /// leaves. See [`crate::engine::watch::Event`].
    Watch {
        /// The VM, or every migration.
        #[serde(default)]
        vm: Option<String>,
    },
    /// Cancels the VM's migration: it keeps running here ([`MigrationStatus`]).
    Cancel {
        /// The VM.
        vm: String,
    },
    /// Starts a VM left paused by `migrate --suspend`.
    Resume {
        /// The VM.
        vm: String,
    },
    /// Settles a VM whose migration's outcome is unknown: it runs on
    /// `runs_on` (a host name: stopped and forgotten here) or `here` (resumed).
    Resolve {
        /// The VM.
        vm: String,
        /// Where the operator found it running.
        runs_on: String,
    },
    /// Drains this host ([`DrainReply`]): no new incoming migrations, and
    /// sources of the running ones are asked to move them elsewhere.
    Drain,
    /// Ends the drain ([`DrainReply`]).
    Undrain,
    /// Starts migrating every VM of this host to `to` ([`EvacuationStatus`]).
    Evacuate {
        /// Candidate destinations.
        to: Vec<String>,
        /// Most migrations out at once.
        #[serde(default = "two")]
        max_parallel: usize,
        /// Options of every migration (`fallback` is set per VM).
        #[serde(default)]
        options: MigrateOptions,
    },
    /// An evacuation's progress, or its report once it ended
    /// ([`EvacuationStatus`]; default: the latest).
    Evacuation {
        /// Its id.
        #[serde(default)]
        id: Option<String>,
        /// Cancel it: nothing more starts, running migrations are cancelled
        /// (their VMs stay here).
        #[serde(default)]
        cancel: bool,
    },
    /// Stops the agent (migrations are cancelled first).
    Shutdown,
    /// Test builds only: lets a migration started with `hold_switchover` switch over.
    #[cfg(feature = "test-hooks")]
    Release {
        /// The VM.
        vm: String,
    },
}

fn yes() -> bool {
    true
}

fn two() -> usize {
    2
}

/// Reply to [`Request::Drain`] and [`Request::Undrain`].
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct DrainReply {
    /// This host.
    pub host: String,
    /// Whether it is drained now.
    pub drained: bool,
    /// Incoming migrations still running (being moved elsewhere).
    pub incoming: u32,
}

/// Reply to [`Request::Steer`]: what the migration was asked.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct SteerReply {
    /// The migration's id.
    pub migration: String,
    /// The change, as the engine will take it.
    pub steering: crate::engine::Steering,
}

/// Reply to [`Request::Info`].
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct InfoReply {
    /// The agent's host name.
    pub name: String,
    /// Its control address.
    pub control: String,
    /// Its data-plane port.
    pub data_port: u16,
    /// The peers it knows.
    pub peers: Vec<String>,
    /// Its RDMA device, or why there is none.
    pub rdma: RdmaInfo,
    /// VMs with an incoming session here (being migrated to this host).
    #[serde(default)]
    pub incoming: Vec<String>,
    /// What it advertises to peers choosing a destination (drained, room).
    #[serde(default)]
    pub capacity: crate::protocol::control::Capacity,
    /// SHA-256 of the certificate it presents now (hex; SIGHUP may change it).
    #[serde(default)]
    pub cert_fingerprint: String,
    /// When that certificate expires, seconds since the epoch.
    #[serde(default)]
    pub cert_not_after: i64,
    /// Where it serves Prometheus metrics (`--metrics`), if it does.
    #[serde(default)]
    pub metrics: Option<String>,
}

/// Whether the agent has RDMA.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(untagged)]
pub enum RdmaInfo {
    /// The device it uses.
    Device {
        /// Its name.
        device: String,
        /// What limits its use (a low locked-memory limit).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        warning: Option<String>,
    },
    /// Why there is none.
    Unavailable {
        /// The reason.
        unavailable: String,
    },
}

/// Reply to [`Request::AttachQemu`].
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct AttachReply {
    /// The RAM backends found.
    pub ram: Vec<RamFile>,
    /// How destinations will run it.
    #[serde(default)]
    pub description: Option<crate::vm::qemu::Description>,
    /// What of its command line stays on this host.
    #[serde(default)]
    pub notes: Vec<String>,
}

/// One VM in [`ListReply`].
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct VmEntry {
    /// The VM's name.
    pub name: String,
    /// Its live state.
    pub state: VmState,
    /// Where its first serial port writes, if to a log here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub console: Option<PathBuf>,
    /// The uid the agent runs it as, if it gave it one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    /// Its runtime directory here (monitor, logs), if the agent made one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime_dir: Option<PathBuf>,
    /// Its RAM regions: files, sizes and page sizes.
    #[serde(default)]
    pub ram: Vec<crate::vm::RamFile>,
}

/// Reply to [`Request::List`].
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct ListReply {
    /// The VMs.
    pub vms: Vec<VmEntry>,
}

/// Reply to [`Request::Migrate`].
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct MigrateReply {
    /// The migration's id.
    pub migration: String,
}

/// Reply to [`Request::Retarget`].
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct RetargetReply {
    /// The new destination, ready.
    pub retargeted_to: String,
}

/// Reply to [`Request::Status`].
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct StatusReply {
    /// The migrations.
    pub migrations: Vec<MigrationStatus>,
}

/// A reply without data.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Done {}

/// A call to the agent failed.
#[derive(Debug, Error)]
pub enum ApiError {
    /// The socket does not answer.
    #[error("agent API {path} (is `dcmigrate agent` running?)")]
    Connect {
        /// The socket.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The connection failed.
    #[error("agent API")]
    Io(#[from] std::io::Error),
    /// A reply that is not what the request's type says.
    #[error("agent API: bad reply {reply:?}")]
    Decode {
        /// The reply line.
        reply: String,
        /// Why it does not decode.
        #[source]
        source: serde_json::Error,
    },
    /// The agent refused the request.
    #[error("{0}")]
    Agent(String),
}

/// Typed calls to an agent's API socket (one connection per call).
#[derive(Clone, Debug)]
pub struct Client {
    path: PathBuf,
}

impl Client {
    /// A client of the agent at `path`.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Sends one request and returns the reply's fields (an `ok: false`
    /// reply becomes an error).
    pub fn call_value(&self, req: &Request) -> Result<Value, ApiError> {
        let mut s = UnixStream::connect(&self.path)
            .map_err(|source| ApiError::Connect { path: self.path.display().to_string(), source })?;
        let mut line = serde_json::to_vec(req).map_err(|source| ApiError::Decode { reply: String::new(), source })?;
        line.push(b'\n');
        s.write_all(&line)?;
        let mut resp = String::new();
        BufReader::new((&s).take(MAX_LINE as u64)).read_line(&mut resp)?;
        let v: Value =
            serde_json::from_str(&resp).map_err(|source| ApiError::Decode { reply: resp.clone(), source })?;
        if v["ok"] != Value::Bool(true) {
            return Err(ApiError::Agent(v["error"].as_str().unwrap_or("request failed").to_owned()));
        }
        Ok(v)
    }

    fn call<R: DeserializeOwned>(&self, req: &Request) -> Result<R, ApiError> {
        let v = self.call_value(req)?;
        serde_json::from_value(v.clone()).map_err(|source| ApiError::Decode { reply: v.to_string(), source })
    }

    /// [`Request::Info`].
    pub fn info(&self) -> Result<InfoReply, ApiError> {
        self.call(&Request::Info)
    }

    /// [`Request::Register`].
    pub fn register(&self, vm: VmRecord) -> Result<(), ApiError> {
        self.call::<Done>(&Request::Register { vm: Box::new(vm) }).map(|_| ())
    }

    /// [`Request::AttachQemu`].
    pub fn attach_qemu(&self, name: &str, qmp: PathBuf, launch: Option<LaunchSpec>) -> Result<AttachReply, ApiError> {
        self.attach_qemu_on(name, qmp, launch, Default::default())
    }

    /// [`Request::AttachQemu`] with network names for its netdevs.
    pub fn attach_qemu_on(
        &self,
        name: &str,
        qmp: PathBuf,
        launch: Option<LaunchSpec>,
        networks: std::collections::BTreeMap<String, String>,
    ) -> Result<AttachReply, ApiError> {
        self.call(&Request::AttachQemu { name: name.into(), qmp, launch, networks })
    }

    /// [`Request::List`].
    pub fn list(&self) -> Result<Vec<VmEntry>, ApiError> {
        self.call::<ListReply>(&Request::List).map(|r| r.vms)
    }

    /// [`Request::Migrate`].
    pub fn migrate(&self, vm: &str, to: &str, options: MigrateOptions) -> Result<MigrateReply, ApiError> {
        self.call(&Request::Migrate { vm: vm.into(), to: to.into(), options })
    }

    /// [`Request::Retarget`].
    pub fn retarget(&self, vm: &str, to: &str, forward: bool) -> Result<RetargetReply, ApiError> {
        self.call(&Request::Retarget { vm: vm.into(), to: to.into(), forward })
    }

    /// [`Request::Status`].
    pub fn status(&self, vm: Option<&str>) -> Result<Vec<MigrationStatus>, ApiError> {
        self.call::<StatusReply>(&Request::Status { vm: vm.map(str::to_owned) }).map(|r| r.migrations)
    }

    /// [`Request::Wait`].
    pub fn wait(&self, vm: &str) -> Result<MigrationStatus, ApiError> {
        self.call(&Request::Wait { vm: vm.into() })
    }

    /// [`Request::Cancel`].
    pub fn cancel(&self, vm: &str) -> Result<MigrationStatus, ApiError> {
        self.call(&Request::Cancel { vm: vm.into() })
    }

    /// [`Request::Steer`].
    pub fn steer(&self, vm: &str, steering: crate::engine::Steering) -> Result<SteerReply, ApiError> {
        self.call(&Request::Steer { vm: vm.into(), steering })
    }

    /// [`Request::Watch`]: the events as they come (blocking reads).
    pub fn watch(&self, vm: Option<&str>) -> Result<Watcher, ApiError> {
        let mut s = UnixStream::connect(&self.path)
            .map_err(|source| ApiError::Connect { path: self.path.display().to_string(), source })?;
        let req = Request::Watch { vm: vm.map(str::to_owned) };
        let mut line = serde_json::to_vec(&req).map_err(|source| ApiError::Decode { reply: String::new(), source })?;
        line.push(b'\n');
        s.write_all(&line)?;
        let mut w = Watcher { lines: BufReader::new(s) };
        let first = w.line()?.unwrap_or_default();
        let v: Value =
            serde_json::from_str(&first).map_err(|source| ApiError::Decode { reply: first.clone(), source })?;
        if v["ok"] != Value::Bool(true) {
            return Err(ApiError::Agent(v["error"].as_str().unwrap_or("request failed").to_owned()));
        }
        Ok(w)
    }

    /// [`Request::Resume`].
    pub fn resume(&self, vm: &str) -> Result<(), ApiError> {
        self.call::<Done>(&Request::Resume { vm: vm.into() }).map(|_| ())
    }

    /// [`Request::Resolve`].
    pub fn resolve(&self, vm: &str, runs_on: &str) -> Result<(), ApiError> {
        self.call::<Done>(&Request::Resolve { vm: vm.into(), runs_on: runs_on.into() }).map(|_| ())
    }

    /// [`Request::Drain`] (`on`) or [`Request::Undrain`].
    pub fn drain(&self, on: bool) -> Result<DrainReply, ApiError> {
        self.call(if on { &Request::Drain } else { &Request::Undrain })
    }

    /// [`Request::Evacuate`].
    pub fn evacuate(
        &self,
        to: &[String],
        max_parallel: usize,
        options: MigrateOptions,
    ) -> Result<super::evacuate::EvacuationStatus, ApiError> {
        self.call(&Request::Evacuate { to: to.to_vec(), max_parallel, options })
    }

    /// [`Request::Evacuation`] (`cancel`: cancels it).
    pub fn evacuation(&self, id: Option<&str>, cancel: bool) -> Result<super::evacuate::EvacuationStatus, ApiError> {
        self.call(&Request::Evacuation { id: id.map(str::to_owned), cancel })
    }

    /// [`Request::Shutdown`].
    pub fn shutdown(&self) -> Result<(), ApiError> {
        self.call::<Done>(&Request::Shutdown).map(|_| ())
    }

    /// [`Request::Release`] (test builds).
    #[cfg(feature = "test-hooks")]
    pub fn release(&self, vm: &str) -> Result<(), ApiError> {
        self.call::<Done>(&Request::Release { vm: vm.into() }).map(|_| ())
    }
}

/// The event stream of [`Client::watch`].
pub struct Watcher {
    lines: BufReader<UnixStream>,
}

impl Watcher {
    /// The next line, bounded by [`MAX_LINE`]; `None` when the agent ended the stream.
    fn line(&mut self) -> Result<Option<String>, ApiError> {
        let mut l = String::new();
        let n = (&mut self.lines).take(MAX_LINE as u64).read_line(&mut l)?;
        Ok((n > 0).then_some(l))
    }

    /// The next event as the agent sent it (a JSON object: an event, or
    /// `{"event":"lagged","missed":N}`); `None` at the stream's end.
    pub fn next_value(&mut self) -> Result<Option<Value>, ApiError> {
        let Some(l) = self.line()? else { return Ok(None) };
        serde_json::from_str(&l).map(Some).map_err(|source| ApiError::Decode { reply: l, source })
    }
}
