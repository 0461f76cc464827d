//! The source side: attaching a running QEMU (finding its shared RAM
//! backends over QMP) and what a migration asks of it: trackers, pause,
//! device state through QEMU's own migration (`x-ignore-shared`), quit.

use super::dirty_log::{self, QemuLogTracker};
use super::launch::{launch_from_process, strip_control, strip_monitors};
use super::{kill, valid_id, vm_err, wait_exit, DEVICE_STATE_TIMEOUT, HOW_TO_SHARE, QMP_TIMEOUT};
use crate::dirty::hash::HashTracker;
use crate::dirty::softdirty::{self, SoftDirtyTracker};
use crate::dirty::{DirtyTracker, TrackerKind};
use crate::memory::{GuestRam, RegionSpec, PAGE_SIZE};
use crate::vm::qmp::Qmp;
use crate::vm::{LaunchSpec, RamFile, SourceVm, VmError, VmRecord, VmState};
use qapi::qmp;
use std::io::Read;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Where a source's description finds files and networks.
pub struct Describing<'a> {
    /// This host's storage directories.
    pub storage: &'a [PathBuf],
    /// Network names for netdev ids (`vm add --network ID=NAME`).
    pub networks: &'a std::collections::BTreeMap<String, String>,
}

/// Finds a running QEMU's RAM backends, checks that dcmigrate can share
/// them, and describes the VM for destinations (its command line, or
/// `launch`'s, read as [`super::describe`] does: what cannot travel is
/// refused here, not at migration time).
///
/// The monitor is reached only if it is still the socket `control` names
/// (what the caller checked).
pub fn attach(
    name: &str,
    (qmp_path, control): (&Path, Option<crate::vm::ident::FileIdent>),
    launch: Option<LaunchSpec>,
    with: &Describing,
) -> Result<VmRecord, VmError> {
    let mut q = Qmp::connect_as(qmp_path, control, QMP_TIMEOUT)?;
    let state = q.status()?;
    if matches!(state, qmp::RunState::inmigrate | qmp::RunState::postmigrate | qmp::RunState::shutdown) {
        return Err(vm_err(format!("QEMU is {state:?}: only a running or paused VM can be added")));
    }
    check_migration_setup(&mut q)?;
    let version = q.execute(&qmp::query_version {})?.qemu;
    let mut ram = ram_files(&mut q, (version.major, version.minor))?;
    ram.sort_by(|a, b| a.id.cmp(&b.id));
    let legacy = match launch {
        Some(LaunchSpec::Qemu { binary, args }) => {
            LaunchSpec::Qemu { binary, args: strip_monitors(&strip_control(&args)) }
        }
        Some(_) => return Err(vm_err("a launch spec for QEMU gives a binary and its arguments")),
        None => launch_from_process(q.pid)?,
    };
    let LaunchSpec::Qemu { binary, args } = &legacy else { unreachable!("a command line") };
    let regions: Vec<RegionSpec> = ram.iter().map(|r| RegionSpec { id: r.id.clone(), size: r.size }).collect();
    let src = super::describe::Source { binary, args, ram: &regions, storage: with.storage, networks: with.networks };
    let described = super::describe(&src).map_err(VmError::Describe)?;
    Ok(VmRecord {
        name: name.to_owned(),
        ram,
        control: qmp_path.to_owned(),
        launch: LaunchSpec::QemuVm { description: Box::new(described.description) },
        legacy: Some(legacy),
        notes: described.notes,
        ..Default::default()
    })
}

/// QEMU's RAM backends as files the agent can map: each shared, its file
/// (or memfd, or a file QEMU unlinked) found, its page size read.
fn ram_files(q: &mut Qmp, (major, minor): (i64, i64)) -> Result<Vec<RamFile>, VmError> {
    let memdevs = q.execute(&qmp::query_memdev {})?;
    if memdevs.is_empty() {
        return Err(vm_err(format!("QEMU has no memory backend objects: {HOW_TO_SHARE}")));
    }
    let mut ram = Vec::new();
    for m in memdevs {
        let id = m.id.clone().ok_or_else(|| vm_err(format!("a memory backend without id: {HOW_TO_SHARE}")))?;
        if !valid_id(&id) {
            return Err(vm_err(format!("memory backend id {id:?}: use letters, digits, '-', '_' or '.'")));
        }
        let ty = q.qom_get_string(&format!("/objects/{id}"), "type")?;
        if !m.share || ty == "memory-backend-ram" {
            return Err(vm_err(format!(
                "memory backend {id} ({ty}) is not shared with other processes: {HOW_TO_SHARE}"
            )));
        }
        if m.size % PAGE_SIZE as u64 != 0 || m.size == 0 {
            return Err(vm_err(format!("memory backend {id}: size {} is not a multiple of 4 KiB", m.size)));
        }
        let path = match ty.as_str() {
            "memory-backend-file" => {
                let p = PathBuf::from(q.qom_get_string(&format!("/objects/{id}"), "mem-path")?);
                match p.is_dir() {
                    // QEMU made a file there and unlinked it (what libvirt
                    // does for huge pages): reached through QEMU's own fd.
                    true => find_unlinked(q.pid, &p, m.size, &id)?,
                    false if p.is_file() => p,
                    false => {
                        return Err(vm_err(format!("memory backend {id}: mem-path {} is not a file", p.display())))
                    }
                }
            }
            // QEMU 10.0 was found to send memfd RAM in its migration stream
            // despite x-ignore-shared (7.2 skips it); refused from 8.0 on.
            "memory-backend-memfd" if major >= 8 => {
                return Err(vm_err(format!(
                    "memory backend {id} is memfd, which QEMU {}.{} migrates itself despite x-ignore-shared: \
                     use memory-backend-file,share=on with mem-path on /dev/shm or hugetlbfs",
                    major, minor
                )))
            }
            "memory-backend-memfd" => find_memfd(q.pid, m.size, &id)?,
            other => return Err(vm_err(format!("memory backend {id} is a {other}: {HOW_TO_SHARE}"))),
        };
        let page_size =
            crate::memory::backing::of_path(&path).map_err(|e| vm_err(format!("{}: {e}", path.display())))?.page_size;
        ram.push(RamFile { id, path, size: m.size, page_size });
    }
    Ok(ram)
}

/// QEMU's own migration carries the device state at the switchover, over a
/// unix socket the agent only reads: capabilities that need more (a return
/// path, several channels, postcopy, a pause QEMU waits in) would break it,
/// and a migration blocker would fail it only after the pause.
const REFUSED_CAPABILITIES: [&str; 10] = [
    "postcopy-ram",
    "postcopy-preempt",
    "multifd",
    "return-path",
    "pause-before-switchover",
    "switchover-ack",
    "x-colo",
    "background-snapshot",
    "mapped-ram",
    "zero-copy-send",
];

/// Refuses a QEMU whose migration setup would break the switchover.
fn check_migration_setup(q: &mut Qmp) -> Result<(), VmError> {
    let on = q.enabled_capabilities()?;
    if let Some(c) = on.iter().find(|c| REFUSED_CAPABILITIES.contains(&c.as_str())) {
        return Err(vm_err(format!(
            "QEMU has the migration capability {c} on, which dcmigrate's switchover (device state over one \
             read-only stream) cannot use: turn it off (migrate-set-capabilities) and add the VM again"
        )));
    }
    let blocked = q.query_migrate()?.blocked_reasons.unwrap_or_default();
    if !blocked.is_empty() {
        return Err(vm_err(format!("QEMU cannot migrate this VM: {}", blocked.join("; "))));
    }
    Ok(())
}

/// A memfd backend is reachable through QEMU's open file descriptor. QEMU
/// names all of them alike, so they are told apart by size.
fn find_memfd(pid: u32, size: u64, id: &str) -> Result<PathBuf, VmError> {
    let dir = PathBuf::from(format!("/proc/{pid}/fd"));
    let entries = std::fs::read_dir(&dir).map_err(|e| vm_err(format!("{}: {e}", dir.display())))?;
    let found: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| std::fs::read_link(p).is_ok_and(|t| t.to_string_lossy().starts_with("/memfd:")))
        .filter(|p| std::fs::metadata(p).is_ok_and(|m| m.len() == size))
        .collect();
    match found.as_slice() {
        [one] => Ok(one.clone()),
        [] => Err(vm_err(format!("memory backend {id}: no memfd of {size} bytes among QEMU's open files"))),
        _ => Err(vm_err(format!(
            "memory backend {id}: {} memfds of {size} bytes, cannot tell which is which; use memory-backend-file",
            found.len()
        ))),
    }
}

/// The file QEMU created in `dir` for backend `id` and unlinked
/// (`qemu_back_mem.ID.XXXXXX`), as QEMU's open descriptor of it.
fn find_unlinked(pid: u32, dir: &Path, size: u64, id: &str) -> Result<PathBuf, VmError> {
    let fds = PathBuf::from(format!("/proc/{pid}/fd"));
    let entries = std::fs::read_dir(&fds).map_err(|e| vm_err(format!("{}: {e}", fds.display())))?;
    let prefix = dir.join(format!("qemu_back_mem.{id}."));
    let found: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            std::fs::read_link(p).is_ok_and(|t| {
                let t = t.to_string_lossy();
                t.starts_with(&*prefix.to_string_lossy()) && t.ends_with(" (deleted)")
            })
        })
        .filter(|p| std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.len() == size))
        .collect();
    match found.as_slice() {
        [one] => Ok(one.clone()),
        [] => Err(vm_err(format!(
            "memory backend {id}: mem-path {} is a directory, and QEMU holds no unlinked file of {size} bytes \
             there (qemu_back_mem.{id}.*)",
            dir.display()
        ))),
        _ => Err(vm_err(format!(
            "memory backend {id}: QEMU holds {} unlinked files of {size} bytes in {}, cannot tell which is its",
            found.len(),
            dir.display()
        ))),
    }
}

fn qemu_pid(rec: &VmRecord) -> Result<u32, VmError> {
    let q = Qmp::connect_as(&rec.control, rec.ident(&rec.control), QMP_TIMEOUT)?;
    Ok(pid_of(rec, &q))
}

/// QEMU's pid: for a QEMU this agent started, the one it recorded (pid and
/// start time, so never a reused pid); else the monitor socket's peer.
fn pid_of(rec: &VmRecord, q: &Qmp) -> u32 {
    rec.runtime_dir
        .as_ref()
        .and_then(|d| std::fs::read_to_string(d.join(super::spawn::PID_FILE)).ok())
        .and_then(|s| super::spawn::recorded_alive(&s))
        .unwrap_or(q.pid)
}

/// A running QEMU on the source host.
pub struct QemuVm {
    rec: VmRecord,
    /// What the device-state transfer changed (`x-ignore-shared`, the
    /// bandwidth cap): put back if the VM resumes here after a failure.
    saved: std::sync::Mutex<Option<(bool, Option<u64>)>>,
}

impl QemuVm {
    /// A QEMU the agent knows from `rec` (see [`attach`]).
    pub fn new(rec: VmRecord) -> Self {
        Self { rec, saved: std::sync::Mutex::new(None) }
    }

    fn qmp(&self) -> Result<Qmp, VmError> {
        Qmp::connect_as(&self.rec.control, self.rec.ident(&self.rec.control), QMP_TIMEOUT)
    }
}

impl SourceVm for QemuVm {
    fn record(&self) -> &VmRecord {
        &self.rec
    }

    fn trackers(&self) -> Vec<TrackerKind> {
        let mut kinds = vec![];
        match self.qmp().and_then(|mut q| dirty_log::offered(&mut q)) {
            Ok(true) => kinds.push(TrackerKind::Qemu),
            Ok(false) => tracing::debug!("qemu tracker not offered: QEMU has no x-dirty-log commands"),
            Err(e) => tracing::info!("qemu tracker not offered: {}", crate::error_chain(&e)),
        }
        match softdirty::self_test() {
            _ if self.rec.on_huge_pages() => tracing::info!("soft-dirty not offered: it does not track huge pages"),
            Ok(()) => kinds.push(TrackerKind::SoftDirty),
            Err(e) => tracing::info!("soft-dirty not offered: {e}"),
        }
        kinds.push(TrackerKind::Hash);
        kinds
    }

    fn start_tracker(&self, kind: TrackerKind, ram: &GuestRam) -> Result<Box<dyn DirtyTracker>, VmError> {
        Ok(match kind {
            TrackerKind::SoftDirty => {
                let files: Vec<PathBuf> = self.rec.ram.iter().map(|r| r.path.clone()).collect();
                Box::new(SoftDirtyTracker::start(qemu_pid(&self.rec)?, &files, ram)?)
            }
            TrackerKind::Hash => Box::new(HashTracker::start(ram)?),
            TrackerKind::Qemu => {
                Box::new(QemuLogTracker::start_as(&self.rec.control, self.rec.ident(&self.rec.control), ram)?)
            }
            TrackerKind::Cooperative => return Err(crate::dirty::DirtyError::Unavailable("cooperative").into()),
        })
    }

    fn pause(&self) -> Result<(), VmError> {
        let mut q = self.qmp()?;
        q.execute(&qmp::stop {})?;
        q.wait_status("stop", QMP_TIMEOUT, |s| s != qmp::RunState::running)?;
        Ok(())
    }

    fn resume(&self) -> Result<(), VmError> {
        let mut q = self.qmp()?;
        // The source gets back the migration setup it had; best effort, as
        // running the guest again matters more.
        if let Some((ignore_shared, bandwidth)) = self.saved.lock().unwrap().take() {
            let restored =
                q.set_ignore_shared(ignore_shared).and_then(|()| bandwidth.map_or(Ok(()), |b| q.set_bandwidth(b)));
            if let Err(e) = restored {
                tracing::warn!(vm = %self.rec.name, "could not restore QEMU's migration settings: {e}");
            }
        }
        // `cont` also brings back a source whose device state was already sent (postmigrate).
        q.execute(&qmp::cont {})?;
        Ok(())
    }

    fn device_state(&self) -> Result<Vec<u8>, VmError> {
        let mut q = self.qmp()?;
        let ignore_shared = q.enabled_capabilities()?.iter().any(|c| c == "x-ignore-shared");
        *self.saved.lock().unwrap() = Some((ignore_shared, q.bandwidth()?));
        q.prepare_device_migration()?;
        q.uncap_bandwidth()?;
        let dir = tempfile::Builder::new().prefix("dcmigrate-devstate").tempdir().map_err(|e| vm_err(e.to_string()))?;
        let sock = dir.path().join("s");
        let listener = UnixListener::bind(&sock).map_err(|e| vm_err(format!("{}: {e}", sock.display())))?;
        q.execute(&qmp::migrate {
            uri: Some(format!("unix:{}", sock.display())),
            channels: None,
            detach: None,
            resume: None,
        })?;
        // Read the stream without touching QMP meanwhile: QEMU may hold its
        // big lock while it writes, so a monitor command could wait for a
        // reader that waits for the monitor (seen with QEMU 10).
        let read = (|| -> std::io::Result<Vec<u8>> {
            listener.set_nonblocking(true)?;
            let end = Instant::now() + DEVICE_STATE_TIMEOUT;
            let mut conn = loop {
                match listener.accept() {
                    Ok((c, _)) => break c,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < end => {
                        std::thread::sleep(Duration::from_millis(2))
                    }
                    Err(e) => return Err(e),
                }
            };
            conn.set_nonblocking(false)?;
            conn.set_read_timeout(Some(DEVICE_STATE_TIMEOUT))?;
            let mut state = Vec::new();
            conn.read_to_end(&mut state)?;
            Ok(state)
        })();
        let done_by = Instant::now() + DEVICE_STATE_TIMEOUT;
        let state = match read {
            Ok(s) => s,
            Err(e) => {
                // Say why QEMU did not send, and leave the source migratable.
                let why = migration_failed(&mut q).ok().flatten().unwrap_or_else(|| e.to_string());
                let _ = q.execute(&qmp::migrate_cancel {});
                return Err(vm_err(format!("QEMU's device state: {why}")));
            }
        };
        loop {
            let info = q.query_migrate()?;
            match info.status {
                Some(qmp::MigrationStatus::completed) => break,
                Some(qmp::MigrationStatus::failed | qmp::MigrationStatus::cancelled) => {
                    return Err(VmError::Refused {
                        cmd: "migrate".into(),
                        msg: info.error_desc.unwrap_or_else(|| "device state migration failed".into()),
                    })
                }
                _ if Instant::now() > done_by => return Err(vm_err("QEMU's device state migration did not complete")),
                _ => std::thread::sleep(Duration::from_millis(2)),
            }
        }
        tracing::info!(bytes = state.len(), "QEMU device state saved");
        Ok(state)
    }

    fn stop(&self) -> Result<(), VmError> {
        let mut q = self.qmp()?;
        let pid = pid_of(&self.rec, &q);
        // QEMU may close the socket before answering `quit`.
        let _ = q.execute(&qmp::quit {});
        drop(q);
        if !wait_exit(pid, Duration::from_secs(20)) {
            tracing::warn!(pid, "QEMU did not quit; killing it");
            kill(pid);
        }
        for d in self.rec.owned_dir.iter().chain(&self.rec.huge_dirs).chain(&self.rec.runtime_dir) {
            let _ = std::fs::remove_dir_all(d);
        }
        if let Some(c) = &self.rec.cgroup {
            c.remove();
        }
        Ok(())
    }

    fn status(&self) -> Result<VmState, VmError> {
        let mut q = self.qmp()?;
        let s = q.status()?;
        let phase = match s {
            qmp::RunState::running => "running",
            qmp::RunState::paused | qmp::RunState::postmigrate | qmp::RunState::prelaunch => "paused",
            _ => "other",
        };
        let qemu_state = serde_json::to_value(s).ok().and_then(|v| v.as_str().map(str::to_owned));
        Ok(VmState {
            phase: Some(phase.into()),
            pid: Some(pid_of(&self.rec, &q)),
            qemu_state,
            kind: Some("qemu".into()),
            ..Default::default()
        })
    }
}

fn migration_failed(q: &mut Qmp) -> Result<Option<String>, VmError> {
    let info = q.query_migrate()?;
    Ok(match info.status {
        Some(qmp::MigrationStatus::failed | qmp::MigrationStatus::cancelled) => {
            Some(info.error_desc.unwrap_or_else(|| "migration failed".into()))
        }
        _ => None,
    })
}
