//! The `qemu` tracker on a QEMU built with qemu-patches/ (tests/run builds
//! it with `qemu-patches/build` and runs this binary with `DCMIGRATE_QEMU`
//! naming it): a booted guest moved A→B, retargeted to C, trusting QEMU's
//! dirty log alone (verification off); the pages a vhost-user disk writes
//! into the guest found in QEMU's log (and, in the test VM, missed by
//! soft-dirty); and the patch's commands refusing what would break the log.

mod common;

use common::*;
use dcmigrate::dirty::softdirty::{self, SoftDirtyTracker};
use dcmigrate::dirty::{DirtyTracker, TrackerKind};
use dcmigrate::engine::options::VerifyMode;
use dcmigrate::engine::MigrateOptions;
use dcmigrate::memory::{GuestRam, Layout, RegionSpec, DEFAULT_CHUNK_SIZE};
use dcmigrate::testbed::qemu::{guest_image, heartbeats, qemu_binary, qmp_listening, Backend, QemuSpec};
use dcmigrate::testbed::{wait_for, Testbed};
use dcmigrate::vm::qemu::dirty_log::QemuLogTracker;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Whether the QEMU under test is a patched one; skips (with the reason) if not.
fn patched_or_skip(test: &str) -> bool {
    let bin = qemu_binary();
    let path = if bin.contains('/') {
        Some(std::path::PathBuf::from(&bin))
    } else {
        std::env::var_os("PATH").and_then(|p| std::env::split_paths(&p).map(|d| d.join(&bin)).find(|f| f.is_file()))
    };
    let has =
        path.and_then(|p| std::fs::read(p).ok()).is_some_and(|b| b.windows(17).any(|w| w == b"x-dirty-log-start"));
    let available = if has { Ok(()) } else { Err(format!("{bin} has no x-dirty-log commands")) };
    can_run(test, available, false, "tests/run builds it with qemu-patches/build and sets DCMIGRATE_QEMU")
}

#[test]
#[cfg_attr(not(feature = "test-hooks"), ignore = "needs the test-only switches: cargo test --features test-hooks")]
fn booted_guest_moves_with_a_retarget_trusting_qemus_dirty_log_alone() {
    const T: &str = "booted_guest_moves_with_a_retarget_trusting_qemus_dirty_log_alone";
    if !patched_or_skip(T) {
        return;
    }
    let Some((tb, g)) = booted_guest(T) else { return };

    // Nothing but QEMU's log decides what is resent: no comparison at the
    // switchover, so a page the log missed would stay stale on C. No tracker
    // asked for: a QEMU that offers its log gets the `qemu` tracker first.
    let opts =
        MigrateOptions { max_bandwidth_mbps: Some(30.0), suspend: true, verify: VerifyMode::Off, ..Default::default() };
    let report = migrate_booted_with_a_retarget(&tb, opts);
    assert_eq!(report.tracker, Some(TrackerKind::Qemu), "{report:#?}");
    assert!(!report.verified, "verification ran: {report:#?}");
    // The guest kept writing: QEMU's log reported pages after the first round.
    let dirtied: u64 = report.rounds.iter().skip(1).map(|r| r.dirty_pages).sum();
    assert!(dirtied > 0, "no dirty page after round 1: {report:#?}");
    assert!(report.bytes_by_sender.get("B").copied().unwrap_or(0) > 8 * MIB, "B forwarded little: {report:#?}");
    for r in &report.rounds {
        println!("round {}: {} dirty pages, sync {:.1} ms", r.round, r.dirty_pages, r.sync_ms);
    }

    let c_dir = tb.host("C").data_dir.join("vm1.qemu");
    assert_same_bytes(&g.dir.join("ram0.ram"), &c_dir.join("ram0.ram"));
    assert!(Testbed::qemu_pids(&tb.host("A").data_dir).is_empty(), "QEMU left on A");
    assert!(Testbed::qemu_pids(&tb.host("B").data_dir).is_empty(), "QEMU left on B");
    assert_eq!(Testbed::qemu_pids(&c_dir).len(), 1, "one QEMU on C");

    tb.client("C").resume("vm1").expect("resume on C");
    let c_serial = tb.vm_on("C", "vm1").and_then(|v| v.console).expect("C's console log");
    let moved = wait_for(60, || (heartbeats(&serial(&c_serial)).len() >= 3).then_some(()));
    assert!(moved.is_some(), "no heartbeat on C: {}", serial(&c_serial));
}

/// QEMU (the one under test) as the test bed runs `spec` in `dir`, its RAM
/// files created, a QMP socket at `dir`/qmp.sock; `edit` changes the
/// arguments first.
fn qemu_in(spec: &QemuSpec, dir: &Path, edit: impl FnOnce(&mut Vec<String>)) -> Command {
    for (id, size, _) in &spec.ram {
        std::fs::File::create(dir.join(format!("{id}.ram"))).unwrap().set_len(*size).unwrap();
    }
    let ds = dir.display().to_string();
    let mut args: Vec<String> = spec.args().iter().map(|a| a.replace("{dir}", &ds)).collect();
    edit(&mut args);
    let mut c = Command::new(qemu_binary());
    c.args(args).arg("-qmp").arg(format!("unix:{ds}/qmp.sock,server=on,wait=off")).stdin(Stdio::null());
    c
}

/// A QEMU with 64 MiB of shared RAM and a QMP client for raw commands.
struct Qemu {
    child: Child,
    qmp: BufReader<UnixStream>,
}

impl Qemu {
    fn start(dir: &Path) -> Self {
        let spec = QemuSpec { ram: vec![("ram0".into(), 64 * MIB, Backend::File)], image: None, huge: None };
        let child = qemu_in(&spec, dir, |a| a.push("-S".into())).spawn().expect("QEMU");
        let sock = dir.join("qmp.sock");
        qmp_listening(&sock, 30).expect("QMP socket");
        let s = UnixStream::connect(&sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut q = Qemu { child, qmp: BufReader::new(s) };
        q.read();
        q.ok("qmp_capabilities", json!({}));
        q
    }

    fn read(&mut self) -> Value {
        loop {
            let mut line = String::new();
            assert!(self.qmp.read_line(&mut line).unwrap() > 0, "QEMU closed QMP");
            let v: Value = serde_json::from_str(&line).unwrap();
            if v.get("event").is_none() {
                return v;
            }
        }
    }

    fn cmd(&mut self, name: &str, args: Value) -> Value {
        let line = json!({"execute": name, "arguments": args}).to_string() + "\n";
        self.qmp.get_mut().write_all(line.as_bytes()).unwrap();
        self.read()
    }

    fn ok(&mut self, name: &str, args: Value) -> Value {
        let r = self.cmd(name, args);
        r.get("return").cloned().unwrap_or_else(|| panic!("{name} failed: {r}"))
    }

    fn refused(&mut self, name: &str, args: Value, why: &str) {
        let r = self.cmd(name, args);
        let desc = r.pointer("/error/desc").and_then(Value::as_str).unwrap_or_else(|| panic!("{name} passed: {r}"));
        assert!(desc.contains(why), "{name}: {desc:?} does not say {why:?}");
    }

    fn migration_status(&mut self) -> String {
        self.ok("query-migrate", json!({}))["status"].as_str().unwrap_or_default().to_owned()
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn the_dirty_log_commands_refuse_a_second_start_and_a_migration_that_moves_the_ram() {
    const T: &str = "the_dirty_log_commands_refuse_a_second_start_and_a_migration_that_moves_the_ram";
    if !patched_or_skip(T) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut q = Qemu::start(dir.path());
    let file = dir.path().join("dirty.bitmap").display().to_string();

    // A full migration into a socket nobody reads stays active: certain,
    // whatever the machine's speed. While it runs no export may start.
    let target = dir.path().join("mig.sock");
    let listener = UnixListener::bind(&target).unwrap();
    q.ok("migrate", json!({"uri": format!("unix:{}", target.display())}));
    let (_held, _) = listener.accept().unwrap();
    assert!(wait_for(30, || (q.migration_status() == "active").then_some(())).is_some());
    q.refused("x-dirty-log-start", json!({"file": file}), "running migration moves");
    q.ok("migrate_cancel", json!({}));
    assert!(wait_for(30, || (q.migration_status() == "cancelled").then_some(())).is_some());

    let blocks = q.ok("x-dirty-log-start", json!({"file": file}));
    assert_eq!(blocks, json!([{"id": "ram0", "size": 64 * MIB, "page-size": 4096, "offset": 0}]));
    q.refused("x-dirty-log-start", json!({"file": file}), "already exported");
    // QEMU's own migration would move the exported RAM: refused.
    q.refused("migrate", json!({"uri": format!("unix:{}", target.display())}), "would be migrated");
    let synced = q.ok("x-dirty-log-sync", json!({}));
    assert_eq!(synced["total-pages"], json!(64 * MIB / 4096), "{synced}");
    q.ok("x-dirty-log-stop", json!({}));
    q.refused("x-dirty-log-stop", json!({}), "not exported");
    q.refused("x-dirty-log-sync", json!({}), "not exported");
}

/// Disk block `i` of the DMA test's image: its 4 KiB say "DCM-DMA-" and `i`.
fn disk_block(i: u64) -> Vec<u8> {
    let mut unit = b"DCM-DMA-".to_vec();
    unit.extend_from_slice(&i.to_le_bytes());
    unit.repeat(4096 / unit.len())
}

/// Kills the processes a test started, whatever happens to the test.
struct Reaper(Vec<Child>);

impl Drop for Reaper {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Reads the guest's console until a line contains `what`.
fn console_until(console: &mut BufReader<UnixStream>, what: &str, log: &mut String) {
    loop {
        let mut line = String::new();
        match console.read_line(&mut line) {
            Ok(0) => panic!("console closed before {what:?}:\n{log}"),
            Ok(_) => log.push_str(&line),
            Err(e) => panic!("console, waiting for {what:?}: {e}\n{log}"),
        }
        if line.contains(what) {
            return;
        }
    }
}

#[test]
fn pages_a_vhost_user_disk_writes_are_in_qemus_log_where_soft_dirty_misses_them() {
    const T: &str = "pages_a_vhost_user_disk_writes_are_in_qemus_log_where_soft_dirty_misses_them";
    if !patched_or_skip(T) {
        return;
    }
    let Some(image) = guest_image() else {
        skip(T, "no guest image: run tests/guest-image/build");
        return;
    };
    let daemon_ok = Command::new("qemu-storage-daemon").arg("--version").output().is_ok_and(|o| o.status.success());
    let daemon = if daemon_ok { Ok(()) } else { Err("qemu-storage-daemon is not installed".into()) };
    if !can_run(T, daemon, true, "it comes with qemu-system-common") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    const BLOCKS: u64 = 4096;
    // Zeros until the trackers run: a page that holds a disk block can only
    // have been written after their first sync.
    std::fs::File::create(d.join("disk.img")).unwrap().set_len(BLOCKS * 4096).unwrap();
    let ram_size = 256 * MIB;

    // The disk is served by another process, which writes the guest's RAM
    // through its own mapping: QEMU's page tables never see those writes.
    let mut procs = Reaper(vec![]);
    let vhost = d.join("vhost.sock");
    procs.0.push(
        Command::new("qemu-storage-daemon")
            .arg("--blockdev")
            .arg(format!("driver=file,node-name=disk,filename={},read-only=on", d.join("disk.img").display()))
            .arg("--export")
            .arg(format!("type=vhost-user-blk,id=exp,node-name=disk,addr.type=unix,addr.path={}", vhost.display()))
            .stdin(Stdio::null())
            .spawn()
            .expect("qemu-storage-daemon"),
    );
    assert!(wait_for(30, || vhost.exists().then_some(())).is_some(), "no vhost-user socket");
    let (qmp, console) = (d.join("qmp.sock"), d.join("console.sock"));
    let spec = QemuSpec { ram: vec![("ram0".into(), ram_size, Backend::File)], image: Some(image), huge: None };
    let qemu = qemu_in(&spec, d, |a| {
        for v in a.iter_mut() {
            if v.starts_with("file:") && v.ends_with("/serial.log") {
                *v = "chardev:con".into();
            } else if v.starts_with("console=ttyS0") {
                // init_on_alloc=0: page cache pages are not zeroed by a vCPU first.
                v.push_str(" init_on_alloc=0 dcm.dma");
            }
        }
        a.extend(["-chardev".into(), format!("socket,id=vhost,path={}", vhost.display())]);
        a.extend(["-device".into(), "vhost-user-blk-pci,chardev=vhost".into()]);
        a.extend(["-chardev".into(), format!("socket,id=con,path={},server=on,wait=off", console.display())]);
    })
    .spawn()
    .expect("QEMU");
    let pid = qemu.id();
    procs.0.push(qemu);
    qmp_listening(&qmp, 30).expect("QMP socket");
    qmp_listening(&console, 30).expect("console socket");
    let mut con = BufReader::new(UnixStream::connect(&console).unwrap());
    // A nested TCG guest (the test VM) boots slowly.
    con.get_ref().set_read_timeout(Some(Duration::from_secs(900))).unwrap();
    let mut log = String::new();
    console_until(&mut con, "dcm-dma-ready", &mut log);

    let layout = Layout::new(vec![RegionSpec { id: "ram0".into(), size: ram_size }], DEFAULT_CHUNK_SIZE).unwrap();
    let ram = GuestRam::open(layout, &[d.join("ram0.ram")]).unwrap();
    let mut qemu_log = QemuLogTracker::start(&qmp, &ram).expect("qemu tracker");
    let mut soft = match softdirty::self_test() {
        Ok(()) => Some(SoftDirtyTracker::start(pid, &[d.join("ram0.ram")], &ram).expect("soft-dirty tracker")),
        // The comparison is the test VM's part (tests/run runs this test
        // there too); a VM without soft-dirty fails it.
        Err(e) if std::env::var_os("DCMIGRATE_IN_VM").is_some() => panic!("{T}: soft-dirty in the test VM: {e}"),
        Err(e) => {
            eprintln!("{T}: soft-dirty not compared on this host ({e}); tests/run compares it in the test VM");
            None
        }
    };
    qemu_log.sync(&ram).unwrap();
    if let Some(s) = soft.as_mut() {
        s.sync(&ram).unwrap();
    }
    let disk: Vec<u8> = (0..BLOCKS).flat_map(disk_block).collect();
    std::fs::write(d.join("disk.img"), &disk).unwrap();
    con.get_mut().write_all(b"go\n").unwrap();
    console_until(&mut con, "dcm-dma-done", &mut log);
    let by_qemu = qemu_log.sync(&ram).unwrap();
    let by_soft = soft.as_mut().map(|s| s.sync(&ram).unwrap());

    // The pages that now hold disk blocks are what the device wrote.
    let bytes = std::fs::read(d.join("ram0.ram")).unwrap();
    let mut seen = vec![false; BLOCKS as usize];
    let mut dma_pages = vec![];
    for (p, page) in bytes.chunks_exact(4096).enumerate() {
        if page.starts_with(b"DCM-DMA-") {
            let i = u64::from_le_bytes(page[8..16].try_into().unwrap());
            if i < BLOCKS && page == disk_block(i).as_slice() {
                seen[i as usize] = true;
                dma_pages.push(p);
            }
        }
    }
    let have = seen.iter().filter(|&&s| s).count();
    assert_eq!(have, BLOCKS as usize, "the guest's page cache holds {have} of the {BLOCKS} disk blocks:\n{log}");
    let missed: Vec<usize> = dma_pages.iter().copied().filter(|&p| !by_qemu.get(p)).collect();
    assert!(missed.is_empty(), "QEMU's log missed {} of {} pages the disk wrote", missed.len(), dma_pages.len());
    println!(
        "qemu reported all {} pages the vhost-user disk wrote ({} dirty in all)",
        dma_pages.len(),
        by_qemu.count()
    );
    if let Some(s) = by_soft {
        // Soft-dirty sees a device-written page only if a vCPU also wrote it
        // in the window (dd's own buffer; a page some process wrote, freed,
        // and the page cache took): a few hundred pages at most, against the
        // disk's 4096.
        let caught = dma_pages.iter().filter(|&&p| s.get(p)).count();
        println!("soft-dirty reported {caught} of them ({} dirty in all)", s.count());
        assert!(caught * 2 < dma_pages.len(), "soft-dirty saw {caught} of {} device-written pages", dma_pages.len());
    }
}

#[test]
fn a_tracker_whose_log_another_took_over_fails_its_sync() {
    const T: &str = "a_tracker_whose_log_another_took_over_fails_its_sync";
    if !patched_or_skip(T) {
        return;
    }
    let Some(image) = guest_image() else {
        skip(T, "no guest image: run tests/guest-image/build");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let ram_file = dir.path().join("ram0.ram");
    let qmp = dir.path().join("qmp.sock");
    let spec = QemuSpec { ram: vec![("ram0".into(), 256 * MIB, Backend::File)], image: Some(image), huge: None };
    let child = qemu_in(&spec, dir.path(), |_| ()).spawn().expect("QEMU");
    let _reap = Reaper(vec![child]);
    qmp_listening(&qmp, 30).expect("QMP socket");
    let layout = Layout::new(vec![RegionSpec { id: "ram0".into(), size: 256 * MIB }], DEFAULT_CHUNK_SIZE).unwrap();
    let ram = GuestRam::open(layout, &[ram_file]).unwrap();

    let mut first = QemuLogTracker::start(&qmp, &ram).expect("first tracker");
    first.sync(&ram).expect("first tracker's sync");
    // A second agent restarts the export into its own file...
    let mut second = QemuLogTracker::start(&qmp, &ram).expect("second tracker takes over");
    second.sync(&ram).expect("second tracker's sync");
    // ...so the first one's bitmap stays empty while QEMU counts pages: the
    // booting guest (then its heartbeat loop) keeps writing RAM, so some
    // sync soon counts pages for the second's file, and the first must say
    // so rather than report nothing.
    let failed = wait_for(60, || first.sync(&ram).err());
    let e = failed.expect("the first tracker never noticed");
    assert!(e.to_string().contains("took the dirty log over"), "{e}");
}
