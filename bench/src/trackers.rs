//! Scenario 6: what a dirty sync costs per GiB of guest RAM, for each
//! tracker this machine can run, against the time to read the RAM once
//! (copied, as the hash tracker does) measured in the same run. Soft-dirty
//! needs a kernel with it: `bench/trackers-in-vm` runs this inside the test
//! VM (TCG, so its absolute times are slow; the ratios are what count).
//!
//! The "VM" is a child process (`dcmigrate-bench dirtier`) that maps a RAM
//! file shared, fills every page, then rewrites random pages at a set rate
//! until its stdin closes.

use crate::harness::*;
use anyhow::{bail, Context, Result};
use dcmigrate::dirty::hash::HashTracker;
use dcmigrate::dirty::softdirty::{self, SoftDirtyTracker};
use dcmigrate::dirty::DirtyTracker;
use dcmigrate::memory::{GuestRam, Layout, RegionSpec, DEFAULT_CHUNK_SIZE, PAGE_SIZE};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Syncs timed per tracker and size.
const SYNCS: usize = 5;

fn ram_of(path: &Path, size: u64) -> Result<GuestRam> {
    let layout = Layout::new(vec![RegionSpec { id: "ram0".into(), size }], DEFAULT_CHUNK_SIZE)?;
    Ok(GuestRam::open(layout, &[path.to_path_buf()])?)
}

/// The child process: fills the RAM, says `ready`, then dirties it.
pub fn dirtier(file: &Path, size: u64, rate_mbps: f64) -> Result<()> {
    let ram = ram_of(file, size)?;
    let pages = (size / PAGE_SIZE as u64) as usize;
    let mut page = vec![0u8; PAGE_SIZE];
    for p in 0..pages {
        page[..8].copy_from_slice(&(p as u64 ^ 0x9e37_79b9_7f4a_7c15).to_le_bytes());
        let (region, offset) = ram.layout().locate(p);
        ram.store(region, offset, &page)?;
    }
    println!("ready");
    // Stop when the parent closes our stdin (or dies).
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        let _ = std::io::stdin().read_to_end(&mut Vec::new());
        let _ = tx.send(());
    });
    let per_tick = ((rate_mbps * 1e6 / 100.0) as usize / PAGE_SIZE).max(usize::from(rate_mbps > 0.0));
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    while rx.recv_timeout(Duration::from_millis(10)).is_err() {
        for _ in 0..per_tick {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let p = (x % pages as u64) as usize;
            page[8..16].copy_from_slice(&x.to_le_bytes());
            let (region, offset) = ram.layout().locate(p);
            ram.store(region, offset, &page)?;
        }
    }
    Ok(())
}

/// A running dirtier, stopped on drop.
struct Dirtier {
    child: Child,
    file: PathBuf,
}

impl Drop for Dirtier {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        if self.child.wait_timeout_or_kill() {
            let _ = std::fs::remove_file(&self.file);
        }
    }
}

trait WaitOrKill {
    fn wait_timeout_or_kill(&mut self) -> bool;
}

impl WaitOrKill for Child {
    fn wait_timeout_or_kill(&mut self) -> bool {
        let end = Instant::now() + Duration::from_secs(10);
        while Instant::now() < end {
            if let Ok(Some(_)) = self.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.kill();
        self.wait().is_ok()
    }
}

fn start_dirtier(dir: &Path, gib: u64, rate_mbps: f64) -> Result<Dirtier> {
    let file = dir.join(format!("dcmigrate-bench-trackers-{gib}.ram"));
    std::fs::File::create(&file)?.set_len(gib << 30)?;
    let bench = std::env::current_exe()?;
    let mut child = Command::new(bench)
        .args(["dirtier", "--size", &(gib << 30).to_string(), "--rate-mbps", &rate_mbps.to_string(), "--file"])
        .arg(&file)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let out = child.stdout.take().context("dirtier's stdout")?;
    let d = Dirtier { child, file };
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(out).read_line(&mut line);
        let _ = tx.send(line);
    });
    // First touch of tmpfs can be slow (see the sizes scenario).
    let line =
        rx.recv_timeout(Duration::from_secs(60 + 60 * gib)).context("the dirtier did not fill its RAM in time")?;
    if line.trim() != "ready" {
        bail!("the dirtier failed before filling its RAM");
    }
    Ok(d)
}

/// Times `SYNCS` syncs of `t`; returns (median ms, median freeze ms, median pages reported).
pub fn time_syncs(t: &mut dyn DirtyTracker, ram: &GuestRam) -> Result<(f64, Option<f64>, f64)> {
    let (mut ms, mut stop, mut pages) = (vec![], vec![], vec![]);
    for _ in 0..SYNCS {
        std::thread::sleep(Duration::from_millis(200));
        let t0 = Instant::now();
        let d = t.sync(ram)?;
        ms.push(t0.elapsed().as_secs_f64() * 1e3);
        pages.push(d.count() as f64);
        if let Some(s) = t.last_stop() {
            stop.push(s.as_secs_f64() * 1e3);
        }
    }
    Ok((median(ms), (!stop.is_empty()).then(|| median(stop)), median(pages)))
}

/// A copy-only read of all RAM on all cores, as a hash sync reads it: the
/// floor under a hash sync on this machine.
fn read_floor_ms(ram: &GuestRam) -> f64 {
    let pages = ram.layout().total_pages();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let per = pages.div_ceil(threads);
    let t0 = Instant::now();
    std::thread::scope(|s| {
        for k in 0..threads {
            s.spawn(move || {
                let mut buf = Vec::with_capacity(16 * PAGE_SIZE);
                let (mut p, end) = (k * per, ((k + 1) * per).min(pages));
                while p < end {
                    let n = 16.min(end - p);
                    buf.clear();
                    let _ = ram.read_pages(p, n, &mut buf);
                    std::hint::black_box(&buf);
                    p += n;
                }
            });
        }
    });
    t0.elapsed().as_secs_f64() * 1e3
}

pub fn trackers(gib: &[u64], rate_mbps: f64, dir: &Path) -> Result<Value> {
    let soft = softdirty::self_test();
    if let Err(e) = &soft {
        eprintln!("soft-dirty: not on this kernel ({e}); hash only");
    }
    let mut rows = vec![];
    for &g in gib {
        let d = start_dirtier(dir, g, rate_mbps)?;
        let ram = ram_of(&d.file, g << 30)?;
        let floor = median((0..3).map(|_| read_floor_ms(&ram)).collect());
        let mut hash = HashTracker::start(&ram)?;
        let (h_ms, _, h_pages) = time_syncs(&mut hash, &ram)?;
        let mut row = json!({"guest_gib": g, "dirty_mbps": rate_mbps, "read_floor_ms": floor,
            "hash_sync_ms": h_ms, "hash_pages": h_pages});
        if soft.is_ok() {
            let mut sd = SoftDirtyTracker::start(d.child.id(), std::slice::from_ref(&d.file), &ram)?;
            let (s_ms, stop, s_pages) = time_syncs(&mut sd, &ram)?;
            row["softdirty_sync_ms"] = json!(s_ms);
            row["softdirty_stop_ms"] = json!(stop);
            row["softdirty_pages"] = json!(s_pages);
        }
        eprintln!("{g} GiB: {row}");
        rows.push(row);
    }
    Ok(
        json!({"rows": rows, "softdirty": soft.is_ok(), "cores": std::thread::available_parallelism().map_or(1, |n| n.get())}),
    )
}
