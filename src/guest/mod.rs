//! The synthetic guest: a process that owns its RAM file, dirties it with a
//! configurable workload, marks a dirty log the way a hypervisor does, holds
//! a small device state, and obeys pause/resume/save/load over a control
//! socket. It behaves like a VM to the engine.

use crate::dirty::cooperative::DirtyLog;
use crate::memory::{GuestRam, Layout, RegionSpec, DEFAULT_CHUNK_SIZE, PAGE_SIZE};
use crate::vm::synthetic::{guest_paths, Pattern, Workload};
use crate::vm::{LaunchSpec, RamFile, VmRecord};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
use thiserror::Error;

/// The synthetic guest could not start.
#[derive(Debug, Error)]
pub(crate) enum GuestError {
    /// Creating, mapping or filling the RAM file failed.
    #[error(transparent)]
    Memory(#[from] crate::memory::MemoryError),
    /// The RAM size makes no valid layout.
    #[error(transparent)]
    Layout(#[from] crate::memory::LayoutError),
    /// Creating the dirty log failed.
    #[error(transparent)]
    Dirty(#[from] crate::dirty::DirtyError),
    /// A file, socket or signal setup failed: what, and the OS error.
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
    /// Options that cannot work (a bad size, a RAM file already there), or
    /// the caller's `ready` refused the guest.
    #[error("{0}")]
    Invalid(String),
}

/// How to run a synthetic guest (see [`run`]).
pub(crate) struct GuestOptions {
    /// The VM's name; its files in `dir` are named after it.
    pub name: String,
    /// Where the RAM file, dirty log and control socket go.
    pub dir: PathBuf,
    /// RAM bytes, a positive multiple of the page size (incoming: taken from
    /// the RAM file instead).
    pub size: u64,
    /// How the guest dirties its memory while it runs.
    pub workload: Workload,
    /// Keep the RAM file when the guest quits (tests compare it afterwards).
    pub keep_ram: bool,
    /// Incoming mode: map this existing RAM file, wait for device state.
    pub incoming_ram: Option<PathBuf>,
    /// The RAM file to create (else `NAME-ram0.ram` in `dir`): on a
    /// hugetlbfs mount, a guest on huge pages.
    pub ram_file: Option<PathBuf>,
    /// Quit and remove the guest's files if the parent process (the agent
    /// that launched it) dies before the guest is committed.
    pub exit_with_parent: bool,
    /// Leave every Nth page unwritten at start (a hole: zero, unallocated),
    /// as free memory in a real guest is; 0 writes every page.
    pub zero_every: usize,
    /// Only every Nth page (of those not left a hole) gets data; the others
    /// are written with zeros, allocated but zero by content (a guest that
    /// zeroed its memory). 1: every page gets data.
    pub data_every: usize,
    /// Bytes of filler in the device state (a VM with device memory).
    pub device_state_bytes: u64,
    /// Test builds only: every Nth write is not marked in the dirty log, like
    /// a tracker that misses writes (0: none).
    #[cfg(feature = "test-hooks")]
    pub miss_every: u64,
}

/// The device state that travels at switchover, with a checksum of its own.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub(crate) struct DeviceState {
    /// The VM's name.
    pub name: String,
    /// Pages written since the guest first started, on any host.
    pub writes: u64,
    /// Ticks of the guest's clock, one per 100 ms of running.
    pub heartbeat: u64,
    /// State of the random page choice, so that it continues where it was.
    pub rng: u64,
    /// The page the sequential pattern wrote last.
    pub cursor: u64,
    /// The workload, which goes on on the destination.
    pub workload: Workload,
    /// Filler that makes the device state as large as a VM's with lots of
    /// device memory (video RAM, say): `--device-state-mb`.
    #[serde(default)]
    pub filler: String,
    /// xxh3 of the other fields; a load with a wrong one is refused.
    pub checksum: u64,
}

impl DeviceState {
    fn compute_checksum(&self) -> u64 {
        let s = format!(
            "{}:{}:{}:{}:{}:{:?}:{:x}",
            self.name,
            self.writes,
            self.heartbeat,
            self.rng,
            self.cursor,
            self.workload,
            crate::memory::digest::of(self.filler.as_bytes())
        );
        crate::memory::digest::of(s.as_bytes())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
enum Phase {
    Incoming,
    Running,
    Paused,
}

struct State {
    phase: Phase,
    parked: bool,
    quit: bool,
    committed: bool,
    dev: DeviceState,
    /// Since when the guest is paused (on this host, after it ran here).
    paused_since: Option<Instant>,
    /// The longest pause so far on this host, in ms.
    longest_pause_ms: f64,
}

struct Guest {
    ram: GuestRam,
    log: DirtyLog,
    state: Mutex<State>,
    cv: Condvar,
    keep_ram: bool,
    files: Vec<PathBuf>,
    exiting: AtomicBool,
    #[cfg(feature = "test-hooks")]
    miss_every: u64,
}

fn xorshift(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

impl Guest {
    /// Writes one page the way a program would (content changes every time),
    /// then marks it: write first, mark after (see dirty::cooperative).
    fn write_page(&self, page: usize, counter: u64) {
        let (region, offset) = self.ram.layout().locate(page);
        let at = counter.wrapping_mul(16) % PAGE_SIZE as u64;
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&counter.to_le_bytes());
        b[8..].copy_from_slice(&(page as u64).to_le_bytes());
        // In bounds: `page` comes from the RAM's own layout.
        let _ = self.ram.store(region, offset + at, &b);
        #[cfg(feature = "test-hooks")]
        if self.miss_every > 0 && counter.is_multiple_of(self.miss_every) {
            return;
        }
        self.log.mark(page);
    }

    fn workload(&self) {
        let pages = self.ram.layout().total_pages();
        let mut owed = 0.0f64;
        let mut last = Instant::now();
        let mut last_beat = Instant::now();
        loop {
            let mut st = self.state.lock().unwrap();
            while st.phase != Phase::Running && !st.quit {
                st.parked = true;
                self.cv.notify_all();
                st = self.cv.wait(st).unwrap();
                last = Instant::now();
            }
            if st.quit {
                st.parked = true;
                self.cv.notify_all();
                return;
            }
            st.parked = false;
            let now = Instant::now();
            if now.duration_since(last_beat) >= Duration::from_millis(100) {
                st.dev.heartbeat += 1;
                last_beat = now;
            }
            let w = st.dev.workload.clone();
            let pps = w.dirty_rate_mbps * 1e6 / PAGE_SIZE as f64;
            owed = (owed + now.duration_since(last).as_secs_f64() * pps).min(pps.max(1.0));
            last = now;
            let hot = ((pages as f64 * w.hot_fraction.clamp(0.0, 1.0)) as usize).clamp(1, pages);
            let n = owed as u64;
            owed -= n as f64;
            for _ in 0..n {
                st.dev.writes += 1;
                let page = match w.pattern {
                    Pattern::Random => (xorshift(&mut st.dev.rng) % hot as u64) as usize,
                    Pattern::Sequential => {
                        st.dev.cursor = (st.dev.cursor + 1) % hot as u64;
                        st.dev.cursor as usize
                    }
                    Pattern::Alternate => {
                        st.dev.cursor = (st.dev.cursor + 2) % (hot as u64 & !1).max(2);
                        st.dev.cursor as usize
                    }
                };
                self.write_page(page, st.dev.writes);
            }
            drop(st);
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn pause(&self) {
        let mut st = self.state.lock().unwrap();
        if st.phase == Phase::Running {
            st.phase = Phase::Paused;
            st.paused_since = Some(Instant::now());
        }
        self.cv.notify_all();
        while !st.parked {
            st = self.cv.wait(st).unwrap();
        }
    }

    fn handle(&self, req: &Value) -> Result<Value, String> {
        let cmd = req["cmd"].as_str().unwrap_or("");
        match cmd {
            "status" => {
                let st = self.state.lock().unwrap();
                let now = st.paused_since.map_or(0.0, |t| t.elapsed().as_secs_f64() * 1e3);
                Ok(json!({"phase": st.phase, "writes": st.dev.writes, "heartbeat": st.dev.heartbeat,
                          "pid": std::process::id(), "committed": st.committed,
                          "longest_pause_ms": st.longest_pause_ms.max(now)}))
            }
            "pause" => {
                self.pause();
                Ok(json!({}))
            }
            "resume" => {
                let mut st = self.state.lock().unwrap();
                if st.phase == Phase::Incoming {
                    return Err("no device state loaded yet".into());
                }
                if let Some(t) = st.paused_since.take() {
                    st.longest_pause_ms = st.longest_pause_ms.max(t.elapsed().as_secs_f64() * 1e3);
                }
                st.phase = Phase::Running;
                self.cv.notify_all();
                Ok(json!({}))
            }
            "touch" => {
                let page = req["page"].as_u64().ok_or("touch needs a page")? as usize;
                if page >= self.ram.layout().total_pages() {
                    return Err("page out of range".into());
                }
                // Contents stay the same, but the write is real and marked.
                self.ram.touch(page).map_err(|e| e.to_string())?;
                self.log.mark(page);
                Ok(json!({}))
            }
            "save_state" => {
                let st = self.state.lock().unwrap();
                if st.phase == Phase::Running {
                    return Err("pause the guest before saving its state".into());
                }
                let mut d = st.dev.clone();
                d.checksum = d.compute_checksum();
                Ok(json!({ "state": d }))
            }
            "load_state" => {
                let d: DeviceState =
                    serde_json::from_value(req["state"].clone()).map_err(|e| format!("bad state: {e}"))?;
                if d.checksum != d.compute_checksum() {
                    return Err("device state checksum mismatch".into());
                }
                let mut st = self.state.lock().unwrap();
                if st.phase == Phase::Running {
                    return Err("guest is running".into());
                }
                st.dev = d;
                st.phase = Phase::Paused;
                Ok(json!({}))
            }
            "commit" => {
                self.state.lock().unwrap().committed = true;
                Ok(json!({}))
            }
            "quit" => {
                self.shutdown(self.keep_ram);
                Ok(json!({}))
            }
            "discard" => {
                self.shutdown(false);
                Ok(json!({}))
            }
            other => Err(format!("unknown command {other:?}")),
        }
    }

    /// Stops the workload, removes the guest's files (all but the RAM file
    /// with `keep_ram`) and exits the process once the reply went out. Files
    /// go before the reply, so a new guest of the same name can follow at once.
    fn shutdown(&self, keep_ram: bool) {
        self.pause();
        self.state.lock().unwrap().quit = true;
        self.cv.notify_all();
        if self.exiting.swap(true, Ordering::SeqCst) {
            return;
        }
        for (i, f) in self.files.iter().enumerate() {
            if i > 0 || !keep_ram {
                let _ = std::fs::remove_file(f);
            }
        }
        std::thread::spawn(|| {
            std::thread::sleep(Duration::from_millis(50));
            std::process::exit(0);
        });
    }

    fn serve(self: Arc<Self>, listener: UnixListener) {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            let g = self.clone();
            std::thread::spawn(move || g.serve_conn(conn));
        }
    }

    fn serve_conn(&self, conn: UnixStream) {
        let mut w = match conn.try_clone() {
            Ok(w) => w,
            Err(_) => return,
        };
        for line in BufReader::new(conn).lines() {
            let Ok(line) = line else { return };
            let resp = match serde_json::from_str::<Value>(&line) {
                Ok(req) => match self.handle(&req) {
                    Ok(mut v) => {
                        v["ok"] = json!(true);
                        v
                    }
                    Err(e) => json!({"ok": false, "error": e}),
                },
                Err(e) => json!({"ok": false, "error": format!("bad request: {e}")}),
            };
            let mut out = resp.to_string();
            out.push('\n');
            if w.write_all(out.as_bytes()).is_err() {
                return;
            }
        }
    }
}

/// Fills RAM with non-trivial content: pseudo-random pages, every
/// `zero_every`th page left a hole, and only every `data_every`th of the
/// others random (the rest written with zeros).
fn fill(ram: &GuestRam, opts: &GuestOptions) -> Result<(), GuestError> {
    let (seed, zero_every, data_every) = (opts.workload.seed, opts.zero_every, opts.data_every);
    let pages = ram.layout().total_pages();
    let mut buf = vec![0u8; PAGE_SIZE];
    for p in 0..pages {
        if zero_every > 0 && p % zero_every == zero_every - 1 {
            continue;
        }
        if data_every > 1 && p % data_every != 0 {
            let (region, offset) = ram.layout().locate(p);
            ram.store(region, offset, &[0u8; PAGE_SIZE])?;
            continue;
        }
        let mut x = seed ^ (p as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        for w in buf.chunks_exact_mut(8) {
            w.copy_from_slice(&xorshift(&mut x).to_le_bytes());
        }
        let (region, offset) = ram.layout().locate(p);
        ram.store(region, offset, &buf)?;
    }
    Ok(())
}

/// The guest's RAM: an existing file (incoming) or a new, filled one.
fn map_ram(opts: &GuestOptions, default_ram: PathBuf) -> Result<(GuestRam, PathBuf, u64), GuestError> {
    let io = |what: &'static str| move |e| GuestError::Io(what.into(), e);
    let (ram_path, size) = match &opts.incoming_ram {
        Some(p) => (p.clone(), std::fs::metadata(p).map_err(io("incoming RAM"))?.len()),
        None => (opts.ram_file.clone().unwrap_or(default_ram), opts.size),
    };
    if size == 0 || size % PAGE_SIZE as u64 != 0 {
        return Err(GuestError::Invalid(format!("guest size {size} must be a positive multiple of 4096")));
    }
    let layout = Layout::new(vec![RegionSpec { id: "ram0".into(), size }], DEFAULT_CHUNK_SIZE)?;
    if opts.incoming_ram.is_some() {
        let ram = GuestRam::open(layout, std::slice::from_ref(&ram_path))?;
        return Ok((ram, ram_path, size));
    }
    if ram_path.exists() {
        let why = format!("{} exists: is a guest named {} running?", ram_path.display(), opts.name);
        return Err(GuestError::Invalid(why));
    }
    let ram = GuestRam::create(layout, std::slice::from_ref(&ram_path))?;
    fill(&ram, opts)?;
    Ok((ram, ram_path, size))
}

fn initial_state(opts: &GuestOptions) -> State {
    let mut dev = DeviceState {
        name: opts.name.clone(),
        writes: 0,
        heartbeat: 0,
        rng: opts.workload.seed | 1,
        cursor: 0,
        workload: opts.workload.clone(),
        filler: filler(opts.device_state_bytes, opts.workload.seed),
        checksum: 0,
    };
    dev.checksum = dev.compute_checksum();
    let phase = if opts.incoming_ram.is_some() { Phase::Incoming } else { Phase::Running };
    let committed = opts.incoming_ram.is_none();
    State { phase, parked: false, quit: false, committed, dev, paused_since: None, longest_pause_ms: 0.0 }
}

/// `n` bytes of printable filler, different for every seed.
fn filler(n: u64, seed: u64) -> String {
    let mut x = seed | 1;
    (0..n).map(|_| (b'a' + (xorshift(&mut x) % 26) as u8) as char).collect()
}

/// Runs the guest until it is told to quit. Returns the record an agent
/// needs to manage it (printed or registered by the caller) through `ready`.
pub(crate) fn run(opts: GuestOptions, ready: impl FnOnce(&VmRecord) -> Result<(), String>) -> Result<(), GuestError> {
    if !crate::vm::valid_name(&opts.name) {
        let why = format!("guest name {:?}: use letters, digits, '-', '_' and '.' (not first)", opts.name);
        return Err(GuestError::Invalid(why));
    }
    // Absolute: the record's paths are opened by the agent, elsewhere.
    let dir = std::path::absolute(&opts.dir).map_err(|e| GuestError::Io("data dir".into(), e))?;
    let (default_ram, dirty_path, sock) = guest_paths(&dir, &opts.name);
    let io = |what: &'static str| move |e| GuestError::Io(what.into(), e);
    std::fs::create_dir_all(&opts.dir).map_err(io("data dir"))?;
    let (ram, ram_path, size) = map_ram(&opts, default_ram)?;
    let log = DirtyLog::create(&dirty_path, ram.layout().total_pages())?;
    let _ = std::fs::remove_file(&sock);
    let listener = UnixListener::bind(&sock).map_err(io("control socket"))?;
    let guest = Arc::new(Guest {
        ram,
        log,
        state: Mutex::new(initial_state(&opts)),
        cv: Condvar::new(),
        keep_ram: opts.keep_ram,
        files: vec![ram_path.clone(), dirty_path.clone(), sock.clone()],
        exiting: AtomicBool::new(false),
        #[cfg(feature = "test-hooks")]
        miss_every: opts.miss_every,
    });
    // SIGTERM/SIGINT: leave like `quit` would (an uncommitted incoming guest also drops its RAM).
    let term = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, term.clone()).map_err(io("signal handler"))?;
    }
    // SAFETY: plain syscall.
    let parent = unsafe { libc::getppid() };
    {
        let g = guest.clone();
        std::thread::spawn(move || g.workload());
    }
    {
        let g = guest.clone();
        std::thread::spawn(move || g.serve(listener));
    }
    let rec = VmRecord {
        name: opts.name.clone(),
        ram: vec![RamFile::new("ram0", ram_path, size)],
        control: sock,
        dirty_log: Some(dirty_path),
        launch: LaunchSpec::Synthetic { workload: opts.workload.clone() },
        ..Default::default()
    };
    if let Err(e) = ready(&rec) {
        guest.files.iter().for_each(|f| drop(std::fs::remove_file(f)));
        return Err(GuestError::Invalid(format!("guest {}: {e}", opts.name)));
    }
    loop {
        std::thread::sleep(Duration::from_millis(100));
        let committed = guest.state.lock().unwrap().committed;
        // SAFETY: plain syscall.
        let orphaned = opts.exit_with_parent && !committed && unsafe { libc::getppid() } != parent;
        if term.load(Ordering::SeqCst) || orphaned {
            tracing::info!(orphaned, "guest {} leaving", opts.name);
            guest.shutdown(committed && guest.keep_ram);
        }
        if guest.exiting.load(Ordering::SeqCst) {
            // the shutdown thread exits the process
            std::thread::sleep(Duration::from_secs(10));
        }
    }
}
