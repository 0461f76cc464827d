//! Stock QEMU as a VM backend. The guest's RAM lives in shared memory
//! backends (`memory-backend-file,share=on` or `memory-backend-memfd,share=on`)
//! that the agent maps and copies itself; at switchover QEMU's own migration
//! moves only the device state, with `x-ignore-shared` on both sides, through
//! a unix socket the agent reads on the source and writes on the destination
//! (so the bytes travel over the agents' authenticated channel, and QEMU never
//! needs a network path to the other host).
//!
//! ```text
//!  source agent                  QEMU (source)        agent (dest)          QEMU (dest, -incoming defer -S)
//!  attach: query-memdev ──────────▶ ids, sizes, paths
//!                                                       launch with the RAM ──▶ maps pre-created files
//!  RAM rounds (agent ──▶ agent, written into the mapped files)
//!  stop ──────────────────────────▶ paused
//!  final round, verification
//!  x-ignore-shared, migrate unix: ▶ device state ──▶ bytes ──▶ migrate-incoming, feed ──▶ paused
//!                                                       cont ──────────────────▶ running
//!  quit ──────────────────────────▶ exits
//! ```

use super::qmp::Qmp;
use super::{LaunchSpec, RamFile, SourceVm, VmError, VmRecord};
use crate::dirty::hash::HashTracker;
use crate::dirty::softdirty::{self, SoftDirtyTracker};
use crate::dirty::{DirtyTracker, TrackerKind};
use crate::memory::{GuestRam, RegionSpec, PAGE_SIZE};
use qapi::qmp;
use serde_json::{json, Map, Value};
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

const QMP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long QEMU may take to send or load the device state.
const DEVICE_STATE_TIMEOUT: Duration = Duration::from_secs(120);
/// Options the agent owns on a destination: taken out of a launch spec.
const CONTROL_OPTS_WITH_ARG: [&str; 4] = ["qmp", "qmp-pretty", "pidfile", "incoming"];
const CONTROL_FLAGS: [&str; 2] = ["daemonize", "S"];
const MEMORY_BACKENDS: [&str; 3] = ["memory-backend-file", "memory-backend-memfd", "memory-backend-ram"];

fn vm_err(msg: impl Into<String>) -> VmError {
    VmError::Launch(msg.into())
}

/// The memory options QEMU needs for dcmigrate, for error messages.
pub const HOW_TO_SHARE: &str = "start QEMU with its RAM in a shared backend, for example \
    `-object memory-backend-file,id=ram0,size=4G,mem-path=/dev/shm/vm-ram0,share=on -machine memory-backend=ram0` \
    (or memory-backend-memfd,share=on; -numa node,memdev=ID for several)";

/// A QEMU command line without the options the agent adds itself.
pub fn strip_control(args: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let name = a.trim_start_matches('-');
        if a.starts_with('-') && CONTROL_OPTS_WITH_ARG.contains(&name) {
            it.next();
        } else if !(a.starts_with('-') && CONTROL_FLAGS.contains(&name)) {
            out.push(a.clone());
        }
    }
    out
}

/// Options a destination refuses in a launch spec: they would let the peer
/// that sent it run code or take over the destination (plugins, config
/// files, inherited fds, privileges), or switch off the sandbox.
const REFUSED_OPTS: [&str; 6] = ["plugin", "readconfig", "add-fd", "sandbox", "runas", "chroot"];

/// A destination runs only QEMU: `qemu-system-*` from PATH, or a path the
/// operator allowed in `DCMIGRATE_QEMU_ALLOW` (colon-separated) or
/// `DCMIGRATE_QEMU` (the test bed's QEMU), and refuses the options above and
/// network helper scripts. The launch spec comes from an authenticated peer,
/// but a peer is not trusted with arbitrary commands on this host.
pub fn check_launch(binary: &str, args: &[String]) -> Result<(), VmError> {
    let bare = binary
        .strip_prefix("qemu-system-")
        .is_some_and(|a| !a.is_empty() && a.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'));
    let allowed = std::env::var("DCMIGRATE_QEMU_ALLOW")
        .unwrap_or_default()
        .split(':')
        .chain(std::env::var("DCMIGRATE_QEMU").ok().as_deref())
        .any(|p| !p.is_empty() && p == binary);
    if !bare && !allowed {
        return Err(vm_err(format!(
            "refusing to run {binary:?}: a launch spec may name qemu-system-* (from PATH) or a binary listed in \
             DCMIGRATE_QEMU_ALLOW on this host"
        )));
    }
    for a in args {
        let name = a.trim_start_matches('-');
        if a.starts_with('-') && REFUSED_OPTS.contains(&name) {
            return Err(vm_err(format!("refusing the launch spec option {a}")));
        }
        for part in split_keyval(a) {
            if let Some((k, v)) = part.split_once('=') {
                if (k == "script" || k == "downscript" || k == "helper") && v != "no" {
                    return Err(vm_err(format!("refusing the launch spec option {part}: no helper scripts")));
                }
            }
        }
    }
    Ok(())
}

/// The launch spec of a running QEMU: its own command line, control options removed.
pub fn launch_from_process(pid: u32) -> Result<LaunchSpec, VmError> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).map_err(|e| vm_err(format!("QEMU pid {pid}: {e}")))?;
    let mut args: Vec<String> =
        raw.split(|b| *b == 0).filter(|s| !s.is_empty()).map(|s| String::from_utf8_lossy(s).into_owned()).collect();
    if args.is_empty() {
        return Err(vm_err(format!("pid {pid} has no command line")));
    }
    let binary = args.remove(0);
    Ok(LaunchSpec::Qemu { binary, args: strip_control(&args) })
}

/// QEMU's size syntax: a number with an optional k/M/G/T suffix (binary units).
fn parse_qemu_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last()? {
        (i, 'k' | 'K') => (&s[..i], 1u64 << 10),
        (i, 'm' | 'M') => (&s[..i], 1 << 20),
        (i, 'g' | 'G') => (&s[..i], 1 << 30),
        (i, 't' | 'T') => (&s[..i], 1 << 40),
        (i, 'b' | 'B') => (&s[..i], 1),
        _ => (s, 1),
    };
    num.parse::<u64>().ok()?.checked_mul(mult)
}

/// Splits QEMU's `key=value,key=value` syntax (`,,` is a literal comma).
fn split_keyval(s: &str) -> Vec<String> {
    let mut parts = vec![String::new()];
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                parts.last_mut().expect("non-empty").push(',');
            } else {
                parts.push(String::new());
            }
        } else {
            parts.last_mut().expect("non-empty").push(c);
        }
    }
    parts
}

/// One `-object` option as a JSON object (QEMU accepts both spellings).
fn object_props(arg: &str) -> Option<Map<String, Value>> {
    if arg.trim_start().starts_with('{') {
        return serde_json::from_str::<Value>(arg).ok()?.as_object().cloned();
    }
    let mut m = Map::new();
    for (i, p) in split_keyval(arg).into_iter().enumerate() {
        match p.split_once('=') {
            Some((k, v)) => {
                m.insert(k.to_owned(), Value::String(v.to_owned()));
            }
            None if i == 0 => {
                m.insert("qom-type".into(), Value::String(p));
            }
            None => {
                m.insert(p, Value::String("on".into()));
            }
        }
    }
    Some(m)
}

fn prop_str(m: &Map<String, Value>, k: &str) -> Option<String> {
    match m.get(k)? {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(if *b { "on" } else { "off" }.into()),
        _ => None,
    }
}

/// A memory backend id that can name a file.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty() && !id.starts_with('.') && id.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

/// The destination's QEMU command line: `{dir}` replaced by the VM's
/// directory there, every RAM backend turned into a shared file backend on
/// `ram_path(id)` (same id and size: QEMU matches RAM blocks by id), no
/// preallocation (it would race with the agent's writes), and the agent's
/// QMP socket, `-incoming defer` and `-S` added.
pub fn destination_args(
    args: &[String],
    dir: &Path,
    regions: &[RegionSpec],
    ram_path: impl Fn(&str) -> PathBuf,
    qmp: &Path,
) -> Result<Vec<String>, VmError> {
    let dir_s = dir.to_string_lossy();
    let args: Vec<String> = strip_control(args).iter().map(|a| a.replace("{dir}", &dir_s)).collect();
    let mut out = Vec::with_capacity(args.len() + 6);
    let mut seen = Vec::new();
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        if a.trim_start_matches('-') != "object" || !a.starts_with('-') {
            out.push(a);
            continue;
        }
        let val = it.next().ok_or_else(|| vm_err("-object without a value in the launch spec"))?;
        let Some(mut props) = object_props(&val) else {
            return Err(vm_err(format!("cannot parse -object {val}")));
        };
        let ty = prop_str(&props, "qom-type").unwrap_or_default();
        if !MEMORY_BACKENDS.contains(&ty.as_str()) {
            out.extend(["-object".to_owned(), val]);
            continue;
        }
        let id = prop_str(&props, "id").ok_or_else(|| vm_err(format!("memory backend without id: {val}")))?;
        let region = regions.iter().find(|r| r.id == id).ok_or_else(|| {
            vm_err(format!("launch spec has memory backend {id:?}, which the source's RAM does not have"))
        })?;
        let size = prop_str(&props, "size").and_then(|s| parse_qemu_size(&s));
        if size != Some(region.size) {
            return Err(vm_err(format!(
                "memory backend {id}: size {size:?} in the launch spec, {} at the source",
                region.size
            )));
        }
        for k in ["prealloc", "hugetlb", "hugetlbsize", "seal", "mem-path", "share", "qom-type", "id", "size"] {
            props.remove(k);
        }
        let mut kv = format!("memory-backend-file,id={id},size={},share=on", region.size);
        let path = ram_path(&id);
        kv.push_str(&format!(",mem-path={}", path.to_string_lossy().replace(',', ",,")));
        for (k, v) in &props {
            // Keys cannot smuggle options back in (`a=b,prealloc` as one key).
            if k.is_empty() || !k.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
                return Err(vm_err(format!("memory backend {id}: invalid property name {k:?}")));
            }
            let v = prop_str(&props, k).ok_or_else(|| vm_err(format!("memory backend {id}: unsupported {k}={v}")))?;
            kv.push_str(&format!(",{k}={}", v.replace(',', ",,")));
        }
        out.extend(["-object".to_owned(), kv]);
        seen.push(id);
    }
    if let Some(r) = regions.iter().find(|r| !seen.contains(&r.id)) {
        return Err(vm_err(format!("the launch spec has no memory backend {:?} for the source's RAM", r.id)));
    }
    out.extend([
        "-qmp".to_owned(),
        format!("unix:{},server=on,wait=off", qmp.display()),
        "-incoming".into(),
        "defer".into(),
        "-S".into(),
    ]);
    Ok(out)
}

/// Finds a running QEMU's RAM backends and checks that dcmigrate can share them.
pub fn attach(name: &str, qmp_path: &Path, launch: Option<LaunchSpec>) -> Result<VmRecord, VmError> {
    let mut q = Qmp::connect(qmp_path, QMP_TIMEOUT)?;
    let state = q.status()?;
    if matches!(state, qmp::RunState::inmigrate | qmp::RunState::postmigrate | qmp::RunState::shutdown) {
        return Err(vm_err(format!("QEMU is {state:?}: only a running or paused VM can be added")));
    }
    let version = q.execute(&qmp::query_version {})?.qemu;
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
                if !p.is_file() {
                    return Err(vm_err(format!(
                        "memory backend {id}: mem-path {} is not a file (a directory makes QEMU use a hidden file); \
                         give mem-path a file name",
                        p.display()
                    )));
                }
                p
            }
            // QEMU 10.0 was found to send memfd RAM in its migration stream
            // despite x-ignore-shared (7.2 skips it); refused from 8.0 on.
            "memory-backend-memfd" if version.major >= 8 => {
                return Err(vm_err(format!(
                    "memory backend {id} is memfd, which QEMU {}.{} migrates itself despite x-ignore-shared: \
                     use memory-backend-file,share=on with mem-path on /dev/shm or hugetlbfs",
                    version.major, version.minor
                )))
            }
            "memory-backend-memfd" => find_memfd(q.pid, m.size, &id)?,
            other => return Err(vm_err(format!("memory backend {id} is a {other}: {HOW_TO_SHARE}"))),
        };
        ram.push(RamFile { id, path, size: m.size });
    }
    ram.sort_by(|a, b| a.id.cmp(&b.id));
    let launch = match launch {
        Some(l) => l,
        None => launch_from_process(q.pid)?,
    };
    Ok(VmRecord { name: name.to_owned(), ram, control: qmp_path.to_owned(), dirty_log: None, launch, owned_dir: None })
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

fn qemu_pid(rec: &VmRecord) -> Result<u32, VmError> {
    Ok(Qmp::connect(&rec.control, QMP_TIMEOUT)?.pid)
}

/// The process exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| s.rsplit_once(')').is_some_and(|(_, r)| !r.trim_start().starts_with('Z')))
}

/// Waits for a process to end (or become a zombie), up to `timeout`.
fn wait_exit(pid: u32, timeout: Duration) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if !alive(pid) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

fn kill(pid: u32) {
    // SAFETY: a signal to a pid we launched or were given.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
}

/// A running QEMU on the source host.
pub struct QemuVm {
    rec: VmRecord,
}

impl QemuVm {
    pub fn new(rec: VmRecord) -> Self {
        Self { rec }
    }

    fn qmp(&self) -> Result<Qmp, VmError> {
        Qmp::connect(&self.rec.control, QMP_TIMEOUT)
    }
}

impl SourceVm for QemuVm {
    fn record(&self) -> &VmRecord {
        &self.rec
    }

    fn trackers(&self) -> Vec<TrackerKind> {
        match softdirty::self_test() {
            Ok(()) => vec![TrackerKind::SoftDirty, TrackerKind::Hash],
            Err(e) => {
                tracing::info!("soft-dirty not offered: {e}");
                vec![TrackerKind::Hash]
            }
        }
    }

    fn start_tracker(&self, kind: TrackerKind, ram: &GuestRam) -> Result<Box<dyn DirtyTracker>, VmError> {
        Ok(match kind {
            TrackerKind::SoftDirty => {
                let files: Vec<PathBuf> = self.rec.ram.iter().map(|r| r.path.clone()).collect();
                Box::new(SoftDirtyTracker::start(qemu_pid(&self.rec)?, &files, ram)?)
            }
            TrackerKind::Hash => Box::new(HashTracker::start(ram)?),
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
        // `cont` also brings back a source whose device state was already sent (postmigrate).
        self.qmp()?.execute(&qmp::cont {})?;
        Ok(())
    }

    fn device_state(&self) -> Result<Vec<u8>, VmError> {
        let mut q = self.qmp()?;
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
        let pid = q.pid;
        // QEMU may close the socket before answering `quit`.
        let _ = q.execute(&qmp::quit {});
        drop(q);
        if !wait_exit(pid, Duration::from_secs(20)) {
            tracing::warn!(pid, "QEMU did not quit; killing it");
            kill(pid);
        }
        if let Some(d) = &self.rec.owned_dir {
            let _ = std::fs::remove_dir_all(d);
        }
        Ok(())
    }

    fn status(&self) -> Result<Value, VmError> {
        let mut q = self.qmp()?;
        let s = q.status()?;
        let phase = match s {
            qmp::RunState::running => "running",
            qmp::RunState::paused | qmp::RunState::postmigrate | qmp::RunState::prelaunch => "paused",
            _ => "other",
        };
        Ok(json!({"phase": phase, "qemu_state": s, "pid": q.pid, "kind": "qemu"}))
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

/// The per-VM directory on a destination (`{dir}` in launch specs).
pub fn vm_dir(data_dir: &Path, vm: &str) -> PathBuf {
    data_dir.join(format!("{vm}.qemu"))
}

pub fn ram_path(dir: &Path, id: &str) -> PathBuf {
    dir.join(format!("{id}.ram"))
}

impl QemuIncoming {
    pub fn launch(name: &str, dir: &Path, ram: &[RamFile], launch: &LaunchSpec) -> Result<Self, VmError> {
        let LaunchSpec::Qemu { binary, args } = launch else {
            return Err(vm_err("not a QEMU launch spec"));
        };
        check_launch(binary, args)?;
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
        let mut argv = destination_args(args, dir, &regions, |id| ram_path(dir, id), &qmp_path)?;
        let pidfile = dir.join("qemu.pid");
        argv.extend(["-pidfile".to_owned(), pidfile.display().to_string()]);
        // QEMU's seccomp filter: no fork/exec from the incoming VM.
        argv.extend(["-sandbox".to_owned(), "on,spawn=deny".to_owned()]);
        std::fs::write(dir.join(INCOMING_MARK), b"").map_err(|e| vm_err(e.to_string()))?;
        let log = std::fs::File::create(dir.join("qemu.log")).map_err(|e| vm_err(e.to_string()))?;
        let log2 = log.try_clone().map_err(|e| vm_err(e.to_string()))?;
        tracing::info!(vm = name, "launching incoming QEMU: {binary} {}", argv.join(" "));
        use std::os::unix::process::CommandExt;
        let mut child = std::process::Command::new(binary)
            .args(&argv)
            .stdin(std::process::Stdio::null())
            .stdout(log)
            .stderr(log2)
            // Its own process group: a Ctrl-C aimed at the agent must not kill the VM.
            .process_group(0)
            .spawn()
            .map_err(|e| vm_err(format!("starting {binary}: {e}")))?;
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

impl super::IncomingVm for QemuIncoming {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn sizes_and_keyvals() {
        assert_eq!(parse_qemu_size("512M"), Some(512 << 20));
        assert_eq!(parse_qemu_size("2G"), Some(2 << 30));
        assert_eq!(parse_qemu_size("4096"), Some(4096));
        assert_eq!(parse_qemu_size("x"), None);
        assert_eq!(split_keyval("a,b=c,,d,e"), vec!["a", "b=c,d", "e"]);
    }

    #[test]
    fn strips_control_options() {
        let a =
            s(&["-m", "1G", "-qmp", "unix:/x,server=on", "-S", "--daemonize", "-pidfile", "p", "-incoming", "defer"]);
        assert_eq!(strip_control(&a), s(&["-m", "1G"]));
    }

    #[test]
    fn rewrites_memory_backends_for_the_destination() {
        let regions =
            vec![RegionSpec { id: "n0".into(), size: 64 << 20 }, RegionSpec { id: "n1".into(), size: 64 << 20 }];
        let a = s(&[
            "-object",
            "memory-backend-memfd,id=n0,size=64M,share=on,prealloc=on",
            "-object",
            r#"{"qom-type":"memory-backend-file","id":"n1","size":67108864,"mem-path":"/dev/shm/src","share":true,"merge":false}"#,
            "-serial",
            "file:{dir}/serial.log",
            "-qmp",
            "unix:/src/qmp",
            "-object",
            "iothread,id=io0",
        ]);
        let dir = Path::new("/data/vm.qemu");
        let out = destination_args(&a, dir, &regions, |id| ram_path(dir, id), &dir.join("qmp.sock")).unwrap();
        assert_eq!(out[1], "memory-backend-file,id=n0,size=67108864,share=on,mem-path=/data/vm.qemu/n0.ram");
        assert_eq!(out[3], "memory-backend-file,id=n1,size=67108864,share=on,mem-path=/data/vm.qemu/n1.ram,merge=off");
        assert_eq!(out[5], "file:/data/vm.qemu/serial.log");
        assert_eq!(&out[6..8], &s(&["-object", "iothread,id=io0"]));
        assert_eq!(
            &out[8..],
            &s(&["-qmp", "unix:/data/vm.qemu/qmp.sock,server=on,wait=off", "-incoming", "defer", "-S"])
        );
    }

    #[test]
    fn destinations_run_only_qemu_without_dangerous_options() {
        assert!(check_launch("qemu-system-x86_64", &s(&["-m", "1G", "-netdev", "tap,id=n,script=no"])).is_ok());
        assert!(check_launch("/bin/sh", &[]).is_err());
        assert!(check_launch("qemu-system-x86_64; rm", &[]).is_err());
        assert!(check_launch("qemu-system-x86_64", &s(&["-plugin", "file=/tmp/x.so"])).is_err());
        assert!(check_launch("qemu-system-x86_64", &s(&["--readconfig", "/etc/x"])).is_err());
        assert!(check_launch("qemu-system-x86_64", &s(&["-netdev", "tap,id=n,script=/tmp/x"])).is_err());
        let dir = Path::new("/d");
        let regions = vec![RegionSpec { id: "ram0".into(), size: 64 << 20 }];
        let smuggled =
            s(&["-object", r#"{"qom-type":"memory-backend-file","id":"ram0","size":67108864,"a=b,prealloc":"on"}"#]);
        assert!(destination_args(&smuggled, dir, &regions, |id| ram_path(dir, id), Path::new("/q")).is_err());
    }

    #[test]
    fn refuses_launch_specs_that_do_not_match_the_ram() {
        let regions = vec![RegionSpec { id: "ram0".into(), size: 64 << 20 }];
        let dir = Path::new("/d");
        let run = |a: &[&str]| destination_args(&s(a), dir, &regions, |id| ram_path(dir, id), Path::new("/q"));
        assert!(run(&["-m", "64M"]).unwrap_err().to_string().contains("no memory backend \"ram0\""));
        let e = run(&["-object", "memory-backend-file,id=ram0,size=32M,mem-path=/x,share=on"]).unwrap_err();
        assert!(e.to_string().contains("size"), "{e}");
        let e = run(&["-object", "memory-backend-ram,id=other,size=64M"]).unwrap_err();
        assert!(e.to_string().contains("does not have"), "{e}");
    }
}
