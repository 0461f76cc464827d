//! The `qemu` tracker on a QEMU built with qemu-patches/ (tests/run builds
//! it with `qemu-patches/build` and runs this binary with `DCMIGRATE_QEMU`
//! naming it): a booted guest moved A→B, retargeted to C, trusting QEMU's
//! dirty log alone (verification off); and the patch's commands refusing
//! what would break the log.

mod common;

use common::*;
use dcmigrate::dirty::TrackerKind;
use dcmigrate::engine::options::VerifyMode;
use dcmigrate::engine::{MigrateOptions, Outcome};
use dcmigrate::testbed::qemu::{guest_image, heartbeats, qemu_binary, qmp_listening, Backend, QemuSpec};
use dcmigrate::testbed::{wait_for, Testbed};
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

fn serial(path: &Path) -> String {
    String::from_utf8_lossy(&std::fs::read(path).unwrap_or_default()).into_owned()
}

#[test]
fn booted_guest_moves_with_a_retarget_trusting_qemus_dirty_log_alone() {
    const T: &str = "booted_guest_moves_with_a_retarget_trusting_qemus_dirty_log_alone";
    if !patched_or_skip(T) || !hooks_or_skip(T) {
        return;
    }
    let Some(image) = guest_image() else {
        skip(T, "no guest image: run tests/guest-image/build");
        return;
    };
    let mut tb = testbed(&["A", "B", "C"]);
    let spec = QemuSpec { ram: vec![("ram0".into(), 512 * MIB, Backend::File)], image: Some(image) };
    let g = tb.start_qemu("A", "vm1", &spec).expect("QEMU on A");
    let booted = wait_for(120, || (heartbeats(&serial(&g.serial())).len() >= 5).then_some(()));
    assert!(booted.is_some(), "guest did not boot: {}", serial(&g.serial()));

    // Nothing but QEMU's log decides what is resent: no comparison at the
    // switchover, so a page the log missed would stay stale on C. No tracker
    // asked for: a QEMU that offers its log gets the `qemu` tracker first.
    let opts =
        MigrateOptions { max_bandwidth_mbps: Some(30.0), suspend: true, verify: VerifyMode::Off, ..Default::default() };
    start_migration(&tb, "A", "vm1", "B", held(opts));
    let mid = wait_for(120, || {
        let m = tb.client("A").status(Some("vm1")).ok()?.pop()?;
        (m.done || m.progress.bytes_sent >= 48 * MIB).then_some(m.done)
    });
    assert_eq!(mid, Some(false), "migration ended before the retarget point");
    tb.client("A").retarget("vm1", "C", true).expect("retarget");
    release(&tb, "A", "vm1");
    let report = wait_report(&tb, "A", "vm1");
    assert_eq!(report.result, Outcome::Completed, "{report:#?}\n{}", tb.logs());
    assert_eq!(report.destination, "C", "{report:#?}");
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
    let c_serial = c_dir.join("serial.log");
    let moved = wait_for(60, || (heartbeats(&serial(&c_serial)).len() >= 3).then_some(()));
    assert!(moved.is_some(), "no heartbeat on C: {}", serial(&c_serial));
}

/// A QEMU with 64 MiB of shared RAM and a QMP client for raw commands.
struct Qemu {
    child: Child,
    qmp: BufReader<UnixStream>,
}

impl Qemu {
    fn start(dir: &Path) -> Self {
        let ram = dir.join("ram0.ram");
        std::fs::File::create(&ram).unwrap().set_len(64 * MIB).unwrap();
        let sock = dir.join("qmp.sock");
        let child = Command::new(qemu_binary())
            .args(["-accel", "tcg", "-nodefaults", "-no-user-config", "-display", "none", "-S", "-m", "64M"])
            .arg("-object")
            .arg(format!("memory-backend-file,id=ram0,size=64M,mem-path={},share=on", ram.display()))
            .args(["-machine", "memory-backend=ram0", "-qmp"])
            .arg(format!("unix:{},server=on,wait=off", sock.display()))
            .stdin(Stdio::null())
            .spawn()
            .expect("QEMU");
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
