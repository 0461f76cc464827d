//! Helpers shared by the integration tests.
#![allow(dead_code)]

use dcmigrate::engine::{MigrateOptions, Report};
use dcmigrate::testbed::qemu::{guest_image, heartbeats, Backend, QemuGuest, QemuSpec};
use dcmigrate::testbed::{wait_for, Testbed};
use dcmigrate::vm::synthetic::{Pattern, Workload};
use dcmigrate::vm::VmState;
use std::path::{Path, PathBuf};

pub const MIB: u64 = 1 << 20;

pub fn exe() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_dcmigrate"))
}

pub fn testbed(hosts: &[&str]) -> Testbed {
    Testbed::start(exe(), hosts).expect("test bed")
}

pub fn workload(mbps: f64) -> Workload {
    Workload { dirty_rate_mbps: mbps, hot_fraction: 1.0, pattern: Pattern::Random, seed: 42 }
}

pub fn migrate(tb: &Testbed, from: &str, vm: &str, to: &str, options: MigrateOptions) -> Report {
    start_migration(tb, from, vm, to, options);
    wait_report(tb, from, vm)
}

pub fn ram_file(tb: &Testbed, host: &str, vm: &str) -> PathBuf {
    tb.host(host).data_dir.join(format!("{vm}-ram0.ram"))
}

/// Whether `host` has an incoming session for `vm`.
pub fn incoming_on(tb: &Testbed, host: &str, vm: &str) -> bool {
    tb.client(host).info().map(|i| i.incoming.iter().any(|v| v == vm)).unwrap_or(false)
}

/// Files a VM left in a host's data dir.
pub fn vm_files(tb: &Testbed, host: &str, vm: &str) -> Vec<String> {
    std::fs::read_dir(&tb.host(host).data_dir)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(vm))
                .collect()
        })
        .unwrap_or_default()
}

pub fn state(tb: &Testbed, host: &str, vm: &str) -> Option<VmState> {
    tb.vm_on(host, vm).map(|v| v.state)
}

/// The VM's phase on `host` (`running`, `paused`), if it is there.
pub fn phase(tb: &Testbed, host: &str, vm: &str) -> Option<String> {
    state(tb, host, vm)?.phase
}

/// The guest runs on `host`: it is there, running, and its write counter moves.
pub fn assert_running_on(tb: &Testbed, host: &str, vm: &str) {
    let s0 = state(tb, host, vm).unwrap_or_else(|| panic!("{vm} not on {host}"));
    assert_eq!(s0.phase.as_deref(), Some("running"), "{vm} on {host}: {s0:?}");
    let w0 = s0.writes.unwrap();
    let moved = wait_for(10, || (state(tb, host, vm)?.writes? > w0).then_some(()));
    assert!(moved.is_some(), "{vm} on {host} does not make progress");
}

/// Alive and not a zombie.
pub fn pid_alive(pid: i64) -> bool {
    u32::try_from(pid).is_ok_and(dcmigrate::vm::qemu::alive)
}

/// Byte-for-byte comparison, reporting the first differing page.
pub fn assert_same_bytes(a: &Path, b: &Path) {
    let x = std::fs::read(a).unwrap();
    let y = std::fs::read(b).unwrap();
    assert_eq!(x.len(), y.len(), "sizes differ");
    let differs = |i: usize| x[i..i + 4096] != y[i..i + 4096];
    if let Some(i) = (0..x.len()).step_by(4096).find(|&i| differs(i)) {
        let pages = (0..x.len()).step_by(4096).filter(|&i| differs(i)).count();
        panic!("RAM differs: first at page {}, {pages} pages in all", i / 4096);
    }
}

/// Waits until `frac` of the VM's RAM is current at the destination (or the
/// migration ended), then retargets to `to`. Returns false if it ended first.
pub fn retarget_when(tb: &Testbed, from: &str, vm: &str, to: &str, frac: f64, forward: bool) -> bool {
    let reached = wait_for(120, || {
        let m = tb.client(from).status(Some(vm)).ok()?.pop()?;
        if m.done {
            return Some(false);
        }
        let (at, ram) = (m.progress.at_destination_bytes as f64, m.progress.ram_bytes as f64);
        (ram > 0.0 && at >= frac * ram).then_some(true)
    });
    if reached != Some(true) {
        return false;
    }
    tb.client(from).retarget(vm, to, forward).expect("retarget accepted");
    true
}

/// `opts` with the switchover held until [`release`] (test builds): the
/// migration is then certain not to end before the test acted on it.
pub fn held(opts: MigrateOptions) -> MigrateOptions {
    #[cfg(feature = "test-hooks")]
    return MigrateOptions { hold_switchover: true, ..opts };
    #[cfg(not(feature = "test-hooks"))]
    opts
}

/// Lets a migration started with [`held`] options switch over.
pub fn release(tb: &Testbed, from: &str, vm: &str) {
    #[cfg(feature = "test-hooks")]
    tb.client(from).release(vm).expect("release");
    #[cfg(not(feature = "test-hooks"))]
    let _ = (tb, from, vm);
}

pub fn start_migration(tb: &Testbed, from: &str, vm: &str, to: &str, options: MigrateOptions) {
    tb.client(from).migrate(vm, to, options).expect("migrate accepted");
}

pub fn wait_report(tb: &Testbed, from: &str, vm: &str) -> Report {
    tb.client(from).wait(vm).expect("wait").report.expect("a finished migration has a report")
}

/// How far the VM's migration on `from` is: (round, bytes at the destination).
pub fn progress(tb: &Testbed, from: &str, vm: &str) -> Option<(u32, u64, bool)> {
    let m = tb.client(from).status(Some(vm)).ok()?.pop()?;
    Some((m.progress.round, m.progress.at_destination_bytes, m.done))
}

/// Pages that differ between two RAM files.
pub fn differing_pages(a: &Path, b: &Path) -> usize {
    let x = std::fs::read(a).unwrap();
    let y = std::fs::read(b).unwrap();
    assert_eq!(x.len(), y.len());
    (0..x.len()).step_by(4096).filter(|&i| x[i..i + 4096] != y[i..i + 4096]).count()
}

/// Skips a test with a printed reason; `tests/run` counts these as skipped
/// (through `DCMIGRATE_SKIP_LOG`), not as passed.
pub fn skip(test: &str, reason: &str) {
    eprintln!("SKIP {test}: {reason}");
    if let Some(p) = std::env::var_os("DCMIGRATE_SKIP_LOG") {
        use std::io::Write;
        // One write per line: tests running in parallel append to the same file.
        if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(p) {
            let _ = f.write_all(format!("{test}: {reason}\n").as_bytes());
        }
    }
}

/// Whether `test` can run here: `available` is Err with the reason if not.
/// It then skips (printing the reason and `hint`), except inside the test VM
/// (`DCMIGRATE_IN_VM`) when `required_in_vm`: there a missing capability is a
/// failure, not a skip.
pub fn can_run(test: &str, available: Result<(), String>, required_in_vm: bool, hint: &str) -> bool {
    match available {
        Ok(()) => true,
        Err(e) if required_in_vm && std::env::var_os("DCMIGRATE_IN_VM").is_some() => {
            panic!("{test}: must run in the test VM, but: {e}")
        }
        Err(e) => {
            skip(test, &format!("{e}; {hint}"));
            false
        }
    }
}

/// A serial console log as text (empty before QEMU wrote it).
pub fn serial(path: &Path) -> String {
    String::from_utf8_lossy(&std::fs::read(path).unwrap_or_default()).into_owned()
}

/// Hosts A, B and C, and the test guest (tests/guest-image) booted on A
/// with 512 MiB in a file backend, added to A's agent as `vm1`, once it
/// printed five heartbeats; `None` (skipped, saying why) without a guest image.
pub fn booted_guest(test: &str) -> Option<(Testbed, QemuGuest)> {
    let Some(image) = guest_image() else {
        skip(test, "no guest image: run tests/guest-image/build");
        return None;
    };
    let mut tb = testbed(&["A", "B", "C"]);
    let spec = QemuSpec { ram: vec![("ram0".into(), 512 * MIB, Backend::File)], image: Some(image), huge: None };
    let g = tb.start_qemu("A", "vm1", &spec).expect("QEMU on A");
    let booted = wait_for(120, || (heartbeats(&serial(&g.serial())).len() >= 5).then_some(()));
    assert!(booted.is_some(), "guest did not boot: {}", serial(&g.serial()));
    Some((tb, g))
}

/// Migrates the [`booted_guest`] from A towards B with `opts` (held before
/// the switchover), retargets to C once 48 MiB were sent (a third of the
/// guest's data: the rest are holes), and returns the completed report.
pub fn migrate_booted_with_a_retarget(tb: &Testbed, opts: MigrateOptions) -> Report {
    start_migration(tb, "A", "vm1", "B", held(opts));
    let mid = wait_for(120, || {
        let m = tb.client("A").status(Some("vm1")).ok()?.pop()?;
        (m.done || m.progress.bytes_sent >= 48 * MIB).then_some(m.done)
    });
    assert_eq!(mid, Some(false), "migration ended before the retarget point");
    tb.client("A").retarget("vm1", "C", true).expect("retarget");
    release(tb, "A", "vm1");
    let report = wait_report(tb, "A", "vm1");
    assert_eq!(report.result, dcmigrate::engine::Outcome::Completed, "{report:#?}\n{}", tb.logs());
    assert_eq!(report.destination, "C", "{report:#?}");
    report
}

/// A migration that never converges on its own: capped at 40 MB/s, each
/// round of a guest's 1 MiB hot set takes ~25 ms, long enough for the guest
/// (30 MB/s) to dirty most of it again, so the estimate stays near 25 ms
/// against a 1 ms limit; budgets far away. It ends by force-complete.
pub fn never_converging() -> MigrateOptions {
    MigrateOptions {
        max_bandwidth_mbps: Some(40.0),
        downtime_ms: 1,
        max_rounds: 100_000,
        max_time_s: 600,
        on_budget: dcmigrate::engine::BudgetAction::Abort,
        ..Default::default()
    }
}
