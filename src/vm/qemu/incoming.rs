//! The incoming QEMU on a destination: built from the peer's description
//! and this host's policy ([`super::command`]), launched paused with
//! `-incoming defer` on the RAM files the agent fills, fed the device state
//! at switchover through a socket handed over QMP (`getfd`: no path), then
//! committed (it runs here) or discarded.
//!
//! Its runtime directory (monitor socket, logs, pid file) is the agent's
//! (0700, under the state dir) and its RAM directory is the agent's too
//! (0711, RAM files the VM's user's): QEMU owns no directory, so the agent
//! never creates a file where QEMU could have put a symlink.

use super::command::{self, Resources};
use super::confine::{RuntimeDir, Storage};
use super::description::{ChardevKind, Description};
use super::network::Networks;
use super::spawn::{self, Spawn, PID_FILE};
use super::user::Identity;
use super::{kill, vm_err, wait_exit, DEVICE_STATE_TIMEOUT, QMP_TIMEOUT};
use crate::vm::cgroup::{Limits, VmCgroup, MAX_PIDS, MEMORY_OVERHEAD};
use crate::vm::qmp::Qmp;
use crate::vm::scope::Scope;
use crate::vm::{IncomingVm, LaunchSpec, RamFile, VmError, VmRecord};
use qapi::qmp;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Marks a runtime directory whose QEMU is still incoming: an agent that
/// restarts kills such leftovers (see [`clean_leftovers`]).
const INCOMING_MARK: &str = "incoming";

/// What this host brings to a VM it runs for a peer.
pub struct Host<'a> {
    /// The agent's name.
    pub agent: &'a str,
    /// Its storage directories.
    pub storage: &'a Storage,
    /// Its networks.
    pub networks: &'a Networks,
    /// The VM's user, if not the agent's.
    pub identity: Option<&'a Identity>,
    /// A systemd scope for the VM, if VMs get one.
    pub scope: Option<&'a Scope>,
}

/// The program a destination runs for `arch`: `DCMIGRATE_QEMU` where it is
/// that architecture's QEMU (the test bed's QEMU 10), else
/// `qemu-system-ARCH` from `PATH`. Never a peer's choice.
pub fn qemu_binary(arch: &str) -> String {
    let name = format!("qemu-system-{arch}");
    match std::env::var("DCMIGRATE_QEMU") {
        Ok(p) if Path::new(&p).file_name().is_some_and(|n| n == name.as_str()) => p,
        _ => name,
    }
}

/// The incoming QEMU on a destination.
pub struct QemuIncoming {
    name: String,
    runtime: PathBuf,
    ram_dir: PathBuf,
    huge_dirs: Vec<PathBuf>,
    pid: u32,
    qmp: PathBuf,
    ram: Vec<RamFile>,
    desc: Description,
    uid: Option<u32>,
    cgroup: Option<VmCgroup>,
    /// Ends when the QEMU process ends (it reaps it).
    reaper: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl QemuIncoming {
    /// Starts QEMU paused from `desc` on the RAM files the agent created in
    /// `ram_dirs` (the data dir's first, then those on huge-page mounts),
    /// with its runtime files in `runtime` (created here, new); returns
    /// once its monitor answers.
    pub fn launch(
        name: &str,
        desc: &Description,
        (ram, ram_dirs): (&[RamFile], &[PathBuf]),
        runtime: &Path,
        host: &Host,
    ) -> Result<Self, VmError> {
        let rt = RuntimeDir::create(runtime).map_err(|e| vm_err(crate::error_chain(&e)))?;
        let undo = |e: VmError| {
            let _ = std::fs::remove_dir_all(runtime);
            e
        };
        std::fs::write(runtime.join(INCOMING_MARK), b"").map_err(|e| undo(vm_err(e.to_string())))?;
        let res: Resources = command::create(desc, host.storage, host.networks, &rt)
            .map_err(|e| undo(vm_err(crate::error_chain(&e))))?;
        let cmd = command::build(desc, ram, res);
        let binary = qemu_binary(&desc.arch);
        let total: u64 = ram.iter().map(|r| r.size).sum();
        tracing::info!(vm = name, "launching incoming QEMU: {binary} {}", cmd.argv.join(" "));
        let s = Spawn {
            vm: name,
            agent: host.agent,
            binary: &binary,
            identity: host.identity,
            scope: host.scope,
            limits: Limits { memory: total + MEMORY_OVERHEAD, pids: MAX_PIDS },
        };
        let started = spawn::spawn(&s, cmd, &rt).map_err(undo)?;
        let pid = started.child.id();
        let mut child = started.child;
        let reaper = std::thread::spawn(move || drop(child.wait()));
        let me = Self {
            name: name.to_owned(),
            runtime: runtime.to_owned(),
            ram_dir: ram_dirs.first().cloned().unwrap_or_default(),
            huge_dirs: ram_dirs.iter().skip(1).cloned().collect(),
            pid,
            qmp: runtime.join("qmp.sock"),
            ram: ram.to_vec(),
            desc: desc.clone(),
            uid: host.identity.map(|i| i.uid),
            cgroup: started.cgroup,
            reaper: Mutex::new(Some(reaper)),
        };
        if let Err(e) = me.ready() {
            me.discard_runtime();
            return Err(e);
        }
        Ok(me)
    }

    /// Waits for the monitor and prepares the device-state migration.
    fn ready(&self) -> Result<(), VmError> {
        let end = Instant::now() + Duration::from_secs(60);
        loop {
            if self.exited() {
                return Err(vm_err(format!("QEMU exited at start: {}", self.log_tail())));
            }
            if let Ok(mut q) = Qmp::connect(&self.qmp, QMP_TIMEOUT) {
                return q.prepare_device_migration();
            }
            if Instant::now() > end {
                return Err(vm_err("QEMU's monitor did not answer within 60 s"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn exited(&self) -> bool {
        self.reaper.lock().unwrap().as_ref().is_none_or(|h| h.is_finished())
    }

    fn log_tail(&self) -> String {
        use std::io::{Read, Seek};
        // The last few KiB only: QEMU writes this file, as much as it likes.
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(self.runtime.join("qemu.log")) {
            let len = f.metadata().map(|m| m.len()).unwrap_or(0);
            let _ = f.seek(std::io::SeekFrom::Start(len.saturating_sub(8 << 10)));
            let mut b = vec![];
            let _ = f.take(8 << 10).read_to_end(&mut b);
            s = String::from_utf8_lossy(&b).into_owned();
        }
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(5)..].join(" | ")
    }

    fn qmp(&self) -> Result<Qmp, VmError> {
        Qmp::connect(&self.qmp, QMP_TIMEOUT).map_err(|e| {
            if self.exited() {
                vm_err(format!("incoming QEMU exited: {}", self.log_tail()))
            } else {
                e
            }
        })
    }

    /// The log file of the first serial port, if it writes one.
    fn console(&self) -> Option<PathBuf> {
        let first = self.desc.serials.first()?;
        let c = self.desc.chardevs.iter().find(|c| &c.id == first)?;
        (c.kind == ChardevKind::Log).then(|| self.runtime.join(command::chardev_file(&c.id, "log")))
    }

    /// Stops QEMU and removes its runtime directory and cgroup.
    fn discard_runtime(&self) {
        if let Ok(mut q) = Qmp::connect(&self.qmp, Duration::from_secs(2)) {
            let _ = q.execute(&qmp::quit {});
        }
        if !wait_exit(self.pid, Duration::from_secs(5)) {
            kill(self.pid);
            wait_exit(self.pid, Duration::from_secs(5));
        }
        if let Some(h) = self.reaper.lock().unwrap().take() {
            let _ = h.join();
        }
        if let Some(c) = &self.cgroup {
            c.remove();
        }
        let _ = std::fs::remove_dir_all(&self.runtime);
    }
}

impl IncomingVm for QemuIncoming {
    fn load_device_state(&self, state: &[u8]) -> Result<(), VmError> {
        let mut q = self.qmp()?;
        let (mut ours, theirs) = UnixStream::pair().map_err(|e| vm_err(format!("a socket pair: {e}")))?;
        q.get_fd("dcm-incoming", std::os::fd::AsFd::as_fd(&theirs))?;
        drop(theirs);
        q.execute(&qmp::migrate_incoming { uri: Some("fd:dcm-incoming".into()), channels: None, exit_on_error: None })?;
        ours.set_write_timeout(Some(DEVICE_STATE_TIMEOUT)).map_err(|e| vm_err(e.to_string()))?;
        ours.write_all(state)
            .and_then(|_| ours.shutdown(std::net::Shutdown::Write))
            .map_err(|e| vm_err(format!("feeding the device state to QEMU: {e}; {}", self.log_tail())))?;
        // Loaded when QEMU leaves `inmigrate` (-S keeps it paused); a failed load ends QEMU.
        q.wait_status("migrate-incoming", DEVICE_STATE_TIMEOUT, |s| s != qmp::RunState::inmigrate).map_err(|e| {
            if self.exited() {
                vm_err(format!("QEMU rejected the device state: {}", self.log_tail()))
            } else {
                e
            }
        })?;
        tracing::info!(vm = %self.name, bytes = state.len(), "QEMU loaded the device state");
        Ok(())
    }

    fn commit(&self, start: bool) -> Result<VmRecord, VmError> {
        if start {
            self.qmp()?.execute(&qmp::cont {})?;
        }
        let _ = std::fs::remove_file(self.runtime.join(INCOMING_MARK));
        // The reaper thread stays detached: the VM outlives this session.
        drop(self.reaper.lock().unwrap().take());
        Ok(VmRecord {
            name: self.name.clone(),
            ram: self.ram.clone(),
            control: self.qmp.clone(),
            dirty_log: None,
            launch: LaunchSpec::QemuVm { description: Box::new(self.desc.clone()) },
            owned_dir: Some(self.ram_dir.clone()),
            huge_dirs: self.huge_dirs.clone(),
            runtime_dir: Some(self.runtime.clone()),
            console: self.console(),
            uid: self.uid,
            cgroup: self.cgroup.clone(),
            ..Default::default()
        })
    }

    fn alive(&self) -> bool {
        !self.exited()
    }

    fn discard(&self) {
        self.discard_runtime();
        std::iter::once(&self.ram_dir).chain(&self.huge_dirs).for_each(|d| drop(std::fs::remove_dir_all(d)));
        tracing::info!(vm = %self.name, "incoming QEMU stopped and its files removed");
    }
}

/// Kills incoming QEMUs an earlier run of this agent left behind and removes
/// their runtime directories, RAM and cgroups: they never became the
/// running VM. `runtime_root` holds one directory per VM.
pub fn clean_leftovers(runtime_root: &Path, ram_dirs: &[&Path], agent: &str) {
    let Ok(entries) = std::fs::read_dir(runtime_root) else { return };
    for e in entries.flatten() {
        let dir = e.path();
        if !dir.join(INCOMING_MARK).exists() {
            continue;
        }
        let vm = e.file_name().to_string_lossy().into_owned();
        // Only the process the pid file recorded, not whoever has its pid now.
        if let Some(pid) = std::fs::read_to_string(dir.join(PID_FILE)).ok().and_then(|s| spawn::recorded_alive(&s)) {
            kill(pid);
            wait_exit(pid, Duration::from_secs(5));
        }
        let _ = std::fs::remove_dir_all(&dir);
        if crate::vm::valid_name(&vm) {
            ram_dirs.iter().for_each(|d| drop(std::fs::remove_dir_all(super::vm_dir(d, &vm))));
            if let Some(c) = VmCgroup::at(agent, &vm) {
                c.remove();
            }
        }
        tracing::warn!(dir = %dir.display(), "removed an incoming QEMU left by an earlier run");
    }
}
