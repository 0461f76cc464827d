//! Scenario 6b: the trackers on a real QEMU guest, in the same run: `qemu`
//! (QEMU's own dirty log, a QEMU built with qemu-patches/), `hash`, and
//! `soft-dirty` where the kernel has it (bench/trackers-in-vm runs this in
//! the test VM). A booted guest (tests/guest-image, TCG) whose RAM file was
//! filled with data first keeps rewriting 32 MiB of its page cache while
//! each tracker syncs five times 200 ms apart;
//! what counts is each sync's time per GiB of guest RAM and how long the
//! guest was stopped for it.

use crate::trackers::time_syncs;
use anyhow::{bail, Context, Result};
use dcmigrate::dirty::hash::HashTracker;
use dcmigrate::dirty::softdirty::{self, SoftDirtyTracker};
use dcmigrate::dirty::DirtyTracker;
use dcmigrate::memory::{GuestRam, Layout, RegionSpec, DEFAULT_CHUNK_SIZE};
use dcmigrate::testbed::qemu::{qmp_listening, Backend, QemuSpec};
use dcmigrate::vm::qemu::dirty_log::QemuLogTracker;
use serde_json::{json, Value};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Guest(Child);

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Writes every page of a new RAM file: a guest that has run for a while
/// has data in most of its RAM, and `hash` reads only data, not holes.
fn fill(path: &Path, size: u64) -> Result<()> {
    use std::io::Write;
    let mut f = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path)?);
    let mut page = vec![0x5au8; 4096];
    for p in 0..size / 4096 {
        page[..8].copy_from_slice(&p.to_le_bytes());
        f.write_all(&page)?;
    }
    f.flush()?;
    Ok(())
}

/// Boots the test guest with `mib` MiB of RAM in `dir`/ram0.ram (filled); returns
/// once it printed its third heartbeat.
fn boot(qemu: &Path, image: &Path, dir: &Path, mib: u64) -> Result<Guest> {
    let ram = dir.join("ram0.ram");
    fill(&ram, mib << 20)?;
    let (qmp, serial) = (dir.join("qmp.sock"), dir.join("serial.log"));
    let _ = std::fs::remove_file(&serial);
    // The test bed's command line for its guests, in `dir`.
    let spec =
        QemuSpec { ram: vec![("ram0".into(), mib << 20, Backend::File)], image: Some(image.to_owned()), huge: None };
    let ds = dir.display().to_string();
    let child = Command::new(qemu)
        .args(spec.args().iter().map(|a| a.replace("{dir}", &ds)))
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", qemu.display()))?;
    let g = Guest(child);
    qmp_listening(&qmp, 30).context("QMP socket")?;
    // A nested TCG guest (the test VM) boots in a minute or two.
    let end = Instant::now() + Duration::from_secs(900);
    while std::fs::read_to_string(&serial).unwrap_or_default().matches("heartbeat").count() < 3 {
        if Instant::now() > end {
            bail!("the guest did not boot: {}", serial.display());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(g)
}

/// One tracker's medians as JSON: sync ms, guest stop ms (if it stops it), pages.
fn measure(t: &mut dyn DirtyTracker, ram: &GuestRam) -> Result<Value> {
    let (ms, stop, pages) = time_syncs(t, ram)?;
    Ok(json!({"sync_ms": ms, "stop_ms": stop, "pages": pages}))
}

/// Sizes in MiB; `qemu` is a QEMU built with qemu-patches/.
pub fn qemu_trackers(mib: &[u64], qemu: &Path, image: &Path, dir: &Path) -> Result<Value> {
    let soft = softdirty::self_test();
    if let Err(e) = &soft {
        eprintln!("soft-dirty: not on this kernel ({e})");
    }
    let mut rows = vec![];
    for &m in mib {
        let tmp = tempfile::tempdir_in(dir)?;
        let g = boot(qemu, image, tmp.path(), m)?;
        let layout = Layout::new(vec![RegionSpec { id: "ram0".into(), size: m << 20 }], DEFAULT_CHUNK_SIZE)?;
        let ram = GuestRam::open(layout, &[tmp.path().join("ram0.ram")])?;
        let mut row = json!({"guest_mib": m});
        let mut q = QemuLogTracker::start(&tmp.path().join("qmp.sock"), &ram)?;
        row["qemu"] = measure(&mut q, &ram)?;
        row["qemu"]["qemu_sync_ms"] = json!(q.last_sync().map(|d| d.as_secs_f64() * 1e3));
        drop(q);
        row["hash"] = measure(&mut HashTracker::start(&ram)?, &ram)?;
        if soft.is_ok() {
            let files = [tmp.path().join("ram0.ram")];
            row["softdirty"] = measure(&mut SoftDirtyTracker::start(g.0.id(), &files, &ram)?, &ram)?;
        }
        eprintln!("{m} MiB: {row}");
        rows.push(row);
        drop(g);
    }
    Ok(json!({"rows": rows, "softdirty": soft.is_ok(), "qemu": qemu.display().to_string()}))
}
