//! The incoming QEMU on a destination: launched paused with `-incoming
//! defer` on the RAM files the agent fills, fed the device state at
//! switchover, then committed (it runs here) or discarded.

use super::allow::Confine;
use super::launch::{check_binary, destination_args};
use super::user::QemuUser;
use super::{kill, ram_path, vm_err, wait_exit, DEVICE_STATE_TIMEOUT, QMP_TIMEOUT};
use crate::memory::RegionSpec;
use crate::vm::qmp::Qmp;
use crate::vm::scope::Scope;
use crate::vm::{IncomingVm, LaunchSpec, RamFile, VmError, VmRecord};
use qapi::qmp;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The incoming QEMU on a destination: launched paused with `-incoming defer`
/// on RAM files the agent fills.
pub struct QemuIncoming {
    name: String,
    dir: PathBuf,
    pid: u32,
    qmp: PathBuf,
    ram: Vec<RamFile>,
    launch: LaunchSpec,
    /// Ends when the QEMU process ends (it reaps it).
    reaper: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// Marks a VM directory whose QEMU is still incoming: an agent that restarts
/// kills such leftovers (see [`clean_leftovers`]).
const INCOMING_MARK: &str = "incoming";

impl QemuIncoming {
    /// Starts QEMU paused (`-incoming defer -S`) from the launch spec, on the
    /// RAM files the agent created in `dir`; returns once its QMP answers.
    /// Files the spec names must be in `dir` or under `storage`; QEMU runs
    /// as `user` when one is given, in a systemd scope of its own when
    /// `scope` is given.
    pub fn launch(
        name: &str,
        (dir, storage, user, scope): (&Path, &[PathBuf], Option<&QemuUser>, Option<&Scope>),
        ram: &[RamFile],
        launch: &LaunchSpec,
    ) -> Result<Self, VmError> {
        let LaunchSpec::Qemu { binary, args } = launch else {
            return Err(vm_err("not a QEMU launch spec"));
        };
        check_binary(binary)?;
        let qmp_path = dir.join("qmp.sock");
        for p in [&qmp_path, &dir.join("incoming.sock")] {
            // sockaddr_un holds 107 bytes of path: fail now, not at switchover.
            if p.as_os_str().len() > 107 {
                return Err(vm_err(format!(
                    "socket path {} is too long: use a shorter data dir or VM name",
                    p.display()
                )));
            }
        }
        let regions: Vec<RegionSpec> = ram.iter().map(|r| RegionSpec { id: r.id.clone(), size: r.size }).collect();
        let confine = Confine { dir, storage };
        let mut argv = destination_args(args, &confine, &regions, |id| ram_path(dir, id), &qmp_path)?;
        let pidfile = dir.join("qemu.pid");
        argv.extend(["-pidfile".to_owned(), pidfile.display().to_string()]);
        std::fs::write(dir.join(INCOMING_MARK), b"").map_err(|e| vm_err(e.to_string()))?;
        let log = std::fs::File::create(dir.join("qemu.log")).map_err(|e| vm_err(e.to_string()))?;
        let log2 = log.try_clone().map_err(|e| vm_err(e.to_string()))?;
        tracing::info!(vm = name, "launching incoming QEMU: {binary} {}", argv.join(" "));
        use std::os::unix::process::CommandExt;
        let mut cmd = super::super::scope::command(binary.as_ref(), name, scope, user.map(|u| (u.uid, u.gid)));
        cmd.args(&argv)
            .stdin(std::process::Stdio::null())
            .stdout(log)
            .stderr(log2)
            // Its own process group: a Ctrl-C aimed at the agent must not kill the VM.
            .process_group(0);
        match (user, scope) {
            // systemd-run must ask systemd for the scope as root: it
            // switches uid and gid itself, the groups are set before.
            (Some(u), Some(_)) => u.apply_groups(&mut cmd),
            (Some(u), None) => u.apply(&mut cmd),
            (None, _) => {}
        }
        let mut child = cmd.spawn().map_err(|e| vm_err(format!("starting {binary}: {e}")))?;
        let pid = child.id();
        let reaper = std::thread::spawn(move || drop(child.wait()));
        let me = Self {
            name: name.to_owned(),
            dir: dir.to_owned(),
            pid,
            qmp: qmp_path,
            ram: ram.to_vec(),
            launch: launch.clone(),
            reaper: Mutex::new(Some(reaper)),
        };
        let ready = (|| {
            let end = Instant::now() + Duration::from_secs(60);
            loop {
                if me.exited() {
                    return Err(vm_err(format!("QEMU exited at start: {}", me.log_tail())));
                }
                if me.qmp.exists() {
                    if let Ok(mut q) = Qmp::connect(&me.qmp, QMP_TIMEOUT) {
                        q.prepare_device_migration()?;
                        return Ok(());
                    }
                }
                if Instant::now() > end {
                    return Err(vm_err("QEMU's QMP socket did not come up within 60 s"));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })();
        if let Err(e) = ready {
            kill(me.pid);
            return Err(e);
        }
        Ok(me)
    }

    fn exited(&self) -> bool {
        self.reaper.lock().unwrap().as_ref().is_none_or(|h| h.is_finished())
    }

    fn log_tail(&self) -> String {
        let s = std::fs::read_to_string(self.dir.join("qemu.log")).unwrap_or_default();
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
}

impl IncomingVm for QemuIncoming {
    fn load_device_state(&self, state: &[u8]) -> Result<(), VmError> {
        let mut q = self.qmp()?;
        let sock = self.dir.join("incoming.sock");
        q.execute(&qmp::migrate_incoming {
            uri: Some(format!("unix:{}", sock.display())),
            channels: None,
            exit_on_error: None,
        })?;
        let mut conn = UnixStream::connect(&sock).map_err(|e| vm_err(format!("{}: {e}", sock.display())))?;
        conn.set_write_timeout(Some(DEVICE_STATE_TIMEOUT)).map_err(|e| vm_err(e.to_string()))?;
        conn.write_all(state)
            .and_then(|_| conn.shutdown(std::net::Shutdown::Write))
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
        let _ = std::fs::remove_file(self.dir.join(INCOMING_MARK));
        // The reaper thread stays detached: the VM outlives this session.
        drop(self.reaper.lock().unwrap().take());
        Ok(VmRecord {
            name: self.name.clone(),
            ram: self.ram.clone(),
            control: self.qmp.clone(),
            dirty_log: None,
            launch: self.launch.clone(),
            owned_dir: Some(self.dir.clone()),
        })
    }

    fn alive(&self) -> bool {
        !self.exited()
    }

    fn discard(&self) {
        if let Ok(mut q) = Qmp::connect(&self.qmp, Duration::from_secs(2)) {
            let _ = q.execute(&qmp::quit {});
        }
        if !wait_exit(self.pid, Duration::from_secs(5)) {
            kill(self.pid);
            wait_exit(self.pid, Duration::from_secs(5));
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        tracing::info!(vm = %self.name, "incoming QEMU stopped and its files removed");
    }
}

/// Kills incoming QEMUs an earlier run of this agent left behind and removes
/// their directories (RAM included): they never became the running VM.
pub fn clean_leftovers(data_dir: &Path) {
    let Ok(entries) = std::fs::read_dir(data_dir) else { return };
    for e in entries.flatten() {
        let dir = e.path();
        if !dir.join(INCOMING_MARK).exists() || !dir.to_string_lossy().ends_with(".qemu") {
            continue;
        }
        if let Some(pid) = std::fs::read_to_string(dir.join("qemu.pid")).ok().and_then(|s| s.trim().parse::<u32>().ok())
        {
            // Only if that pid is still the QEMU of this directory (pids are reused).
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmd).contains(&*dir.join("qmp.sock").to_string_lossy()) {
                kill(pid);
                wait_exit(pid, Duration::from_secs(5));
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
        tracing::warn!(dir = %dir.display(), "removed an incoming QEMU left by an earlier run");
    }
}
