//! The synthetic guest as a VM backend: a client of the guest's control
//! socket (JSON lines), and the launcher of incoming guests on destinations.

use super::{IncomingVm, LaunchSpec, RamFile, SourceVm, VmError, VmRecord, VmState};
use crate::dirty::cooperative::CooperativeTracker;
use crate::dirty::hash::HashTracker;
use crate::dirty::{DirtyError, DirtyTracker, TrackerKind};
use crate::memory::GuestRam;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Which pages the synthetic guest writes next.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Default)]
#[serde(rename_all = "snake_case")]
pub enum Pattern {
    /// Pages picked at random in the hot part of RAM.
    #[default]
    Random,
    /// Pages in order through the hot part of RAM, wrapping around.
    Sequential,
    /// Every other page in order through the hot part of RAM, wrapping
    /// around: the most page runs a chunk's dirty pages can form.
    Alternate,
}

/// How the synthetic guest dirties its memory.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Workload {
    /// Megabytes (10^6) of pages dirtied per second.
    pub dirty_rate_mbps: f64,
    /// Fraction of RAM (from the start) that receives the writes.
    pub hot_fraction: f64,
    /// Which pages receive the writes.
    pub pattern: Pattern,
    /// Seed of the initial RAM content and of the random page choice.
    pub seed: u64,
}

impl Default for Workload {
    fn default() -> Self {
        Self { dirty_rate_mbps: 0.0, hot_fraction: 1.0, pattern: Pattern::Random, seed: 1 }
    }
}

/// One request/response on the guest's control socket.
pub fn guest_call(socket: &Path, req: Value) -> Result<Value, VmError> {
    guest_call_as(socket, None, req)
}

/// [`guest_call`] on the socket at `socket` if it is the file `want` names.
pub fn guest_call_as(socket: &Path, want: Option<super::ident::FileIdent>, req: Value) -> Result<Value, VmError> {
    let err = |msg: String| VmError::Control { path: socket.display().to_string(), msg };
    let mut s = super::ident::connect(socket, want).map_err(|e| err(e.to_string()))?;
    s.set_read_timeout(Some(Duration::from_secs(60))).ok();
    let mut line = serde_json::to_vec(&req).expect("json");
    line.push(b'\n');
    s.write_all(&line).map_err(|e| err(e.to_string()))?;
    let mut resp = String::new();
    BufReader::new(&s).read_line(&mut resp).map_err(|e| err(e.to_string()))?;
    let v: Value = serde_json::from_str(&resp).map_err(|e| err(format!("bad reply {resp:?}: {e}")))?;
    if v["ok"] != json!(true) {
        return Err(VmError::Refused {
            cmd: req["cmd"].as_str().unwrap_or("?").to_owned(),
            msg: v["error"].as_str().unwrap_or("no reason given").to_owned(),
        });
    }
    Ok(v)
}

/// A running synthetic guest on the source host.
pub struct SyntheticVm {
    rec: VmRecord,
}

impl SyntheticVm {
    /// The guest the agent knows from `rec`.
    pub fn new(rec: VmRecord) -> Self {
        Self { rec }
    }

    fn call(&self, req: Value) -> Result<Value, VmError> {
        guest_call_as(&self.rec.control, self.rec.ident(&self.rec.control), req)
    }
}

impl SourceVm for SyntheticVm {
    fn record(&self) -> &VmRecord {
        &self.rec
    }

    fn trackers(&self) -> Vec<TrackerKind> {
        let mut t = vec![];
        if self.rec.dirty_log.is_some() {
            t.push(TrackerKind::Cooperative);
        }
        if !self.rec.on_huge_pages() && crate::dirty::softdirty::self_test().is_ok() {
            t.push(TrackerKind::SoftDirty);
        }
        t.push(TrackerKind::Hash);
        t
    }

    fn start_tracker(&self, kind: TrackerKind, ram: &GuestRam) -> Result<Box<dyn DirtyTracker>, VmError> {
        Ok(match kind {
            TrackerKind::Cooperative => {
                let log = self.rec.dirty_log.as_ref().ok_or(DirtyError::Unavailable("cooperative"))?;
                let probe = |page: usize| {
                    self.call(json!({"cmd": "touch", "page": page})).map(|_| ()).map_err(|e| e.to_string())
                };
                // The log as it was handed over, through the checked descriptor.
                let f = super::ident::open(log, self.rec.ident(log), true)
                    .map_err(|e| VmError::Control { path: log.display().to_string(), msg: e.to_string() })?;
                Box::new(CooperativeTracker::start(&super::ident::fd_path(&f), ram.layout().total_pages(), &probe)?)
            }
            TrackerKind::Hash => Box::new(HashTracker::start(ram)?),
            TrackerKind::SoftDirty => {
                let pid =
                    super::qmp::socket_peer_pid(&self.rec.control, self.rec.ident(&self.rec.control)).map_err(|e| {
                        VmError::Control { path: self.rec.control.display().to_string(), msg: e.to_string() }
                    })?;
                let files: Vec<PathBuf> = self.rec.ram.iter().map(|r| r.path.clone()).collect();
                Box::new(crate::dirty::softdirty::SoftDirtyTracker::start(pid, &files, ram)?)
            }
            TrackerKind::Qemu => return Err(DirtyError::Unavailable("qemu").into()),
        })
    }

    fn pause(&self) -> Result<(), VmError> {
        self.call(json!({"cmd": "pause"})).map(|_| ())
    }

    fn resume(&self) -> Result<(), VmError> {
        self.call(json!({"cmd": "resume"})).map(|_| ())
    }

    fn device_state(&self) -> Result<Vec<u8>, VmError> {
        let v = self.call(json!({"cmd": "save_state"}))?;
        Ok(serde_json::to_vec(&v["state"]).expect("json"))
    }

    fn stop(&self) -> Result<(), VmError> {
        self.call(json!({"cmd": "quit"})).map(|_| ())
    }

    fn status(&self) -> Result<VmState, VmError> {
        let v = self.call(json!({"cmd": "status"}))?;
        serde_json::from_value(v).map_err(|e| VmError::Control {
            path: self.rec.control.display().to_string(),
            msg: format!("bad status: {e}"),
        })
    }
}

/// This program's path, read once: if the binary is replaced while an agent
/// runs (an upgrade, a rebuild), `current_exe` would name the deleted file.
pub fn own_exe() -> std::io::Result<PathBuf> {
    static EXE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    if let Some(p) = EXE.get() {
        return Ok(p.clone());
    }
    let p = std::env::current_exe()?;
    Ok(EXE.get_or_init(|| p).clone())
}

/// Conventional file names of a synthetic guest in `dir`.
pub fn guest_paths(dir: &Path, name: &str) -> (PathBuf, PathBuf, PathBuf) {
    (dir.join(format!("{name}-ram0.ram")), dir.join(format!("{name}.dirty")), dir.join(format!("{name}.sock")))
}

/// An incoming synthetic guest, launched paused by a destination agent.
pub struct SyntheticIncoming {
    child: Mutex<Option<Child>>,
    rec: VmRecord,
}

impl SyntheticIncoming {
    /// Starts `dcmigrate guest --incoming` over RAM the agent already created.
    /// The guest exits (and removes its files) if the agent dies before
    /// commit; in `scope` (a systemd scope of its own) when one is given.
    pub fn launch(
        name: &str,
        (dir, scope): (&Path, Option<&super::scope::Scope>),
        ram: &[RamFile],
        launch: &LaunchSpec,
    ) -> Result<Self, VmError> {
        let [ram0] = ram else {
            return Err(VmError::Launch(format!("the synthetic guest has one RAM region, got {}", ram.len())));
        };
        let (_, dirty, sock) = guest_paths(dir, name);
        let exe = own_exe().map_err(|e| VmError::Launch(e.to_string()))?;
        let child = super::scope::command(exe.as_os_str(), name, scope, None, None)
            .args(["guest", "--incoming", "--exit-with-parent", "--name", name])
            .arg("--dir")
            .arg(dir)
            .arg("--ram-file")
            .arg(&ram0.path)
            .stdin(Stdio::null())
            .spawn()
            .map_err(|e| VmError::Launch(e.to_string()))?;
        let me = Self {
            child: Mutex::new(Some(child)),
            rec: VmRecord {
                name: name.to_owned(),
                ram: ram.to_vec(),
                control: sock.clone(),
                dirty_log: Some(dirty),
                launch: launch.clone(),
                ..Default::default()
            },
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if guest_call(&sock, json!({"cmd": "status"})).is_ok() {
                return Ok(me);
            }
            if let Some(st) = me.child.lock().unwrap().as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                return Err(VmError::Launch(format!("incoming guest exited: {st}")));
            }
            if Instant::now() > deadline {
                me.discard();
                return Err(VmError::Launch("incoming guest did not come up in 20 s".into()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn call(&self, req: Value) -> Result<Value, VmError> {
        guest_call_as(&self.rec.control, self.rec.ident(&self.rec.control), req)
    }
}

impl IncomingVm for SyntheticIncoming {
    fn load_device_state(&self, state: &[u8]) -> Result<(), VmError> {
        let state: Value = serde_json::from_slice(state).map_err(|e| VmError::Refused {
            cmd: "load_state".into(),
            msg: format!("device state is not valid: {e}"),
        })?;
        self.call(json!({"cmd": "load_state", "state": state})).map(|_| ())
    }

    fn commit(&self, start: bool) -> Result<VmRecord, VmError> {
        self.call(json!({"cmd": "commit"}))?;
        if start {
            self.call(json!({"cmd": "resume"}))?;
        }
        // The guest now lives on its own; reap it in the background when it exits.
        if let Some(mut c) = self.child.lock().unwrap().take() {
            std::thread::spawn(move || c.wait());
        }
        Ok(self.rec.clone())
    }

    fn alive(&self) -> bool {
        // Taken at commit: then it is no longer ours to watch.
        self.child.lock().unwrap().as_mut().is_none_or(|c| matches!(c.try_wait(), Ok(None)))
    }

    fn discard(&self) {
        let _ = self.call(json!({"cmd": "discard"}));
        if let Some(mut c) = self.child.lock().unwrap().take() {
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline && matches!(c.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        for r in &self.rec.ram {
            let _ = std::fs::remove_file(&r.path);
        }
        if let Some(d) = &self.rec.dirty_log {
            let _ = std::fs::remove_file(d);
        }
        let _ = std::fs::remove_file(&self.rec.control);
    }
}
