//! Guests on huge pages (issue: huge-page guests end to end): RAM on a
//! hugetlbfs mount at the source lands on a mount of the same page size at
//! every destination, byte for byte, or the session is refused with the
//! numbers. Needs root (it reserves 2 MiB pages and mounts hugetlbfs, and
//! gives both back).

mod common;
use common::*;
use dcmigrate::dirty::TrackerKind;
use dcmigrate::engine::options::VerifyMode;
use dcmigrate::engine::report::TransportUsed;
use dcmigrate::engine::{FailureKind, MigrateOptions, Outcome, Reason, Report};
use dcmigrate::memory::backing;
use dcmigrate::protocol::{ErrorCode, TransportKind};
use dcmigrate::testbed::huge::HugePool;
use dcmigrate::testbed::qemu::{guest_image, heartbeats, qemu_available, Backend, QemuSpec, QEMU};
use dcmigrate::testbed::{wait_for, Testbed};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

const HUGE: u64 = 2 << 20;
/// The tests of this binary share the kernel's pool: one at a time.
static POOL_LOCK: Mutex<()> = Mutex::new(());

/// A pool of 2 MiB pages for one test, given back when dropped (after the
/// test bed: declare it first).
struct Huge {
    pool: HugePool,
    _one_at_a_time: MutexGuard<'static, ()>,
}

/// `pages` more 2 MiB pages in the pool, or None (skipped, with why).
fn huge_or_skip(test: &str, pages: u64) -> Option<Huge> {
    let lock = POOL_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    // SAFETY: plain syscall.
    if unsafe { libc::geteuid() } != 0 {
        skip(test, "needs root: it reserves huge pages and mounts hugetlbfs");
        return None;
    }
    match HugePool::new(pages) {
        Ok(pool) => Some(Huge { pool, _one_at_a_time: lock }),
        Err(e) => {
            skip(test, &e.to_string());
            None
        }
    }
}

impl Huge {
    /// A new hugetlbfs mount of 2 MiB pages, limited to `size` if given.
    fn mount(&mut self, name: &str, size: Option<&str>) -> PathBuf {
        self.pool.mount(name, size).expect("a hugetlbfs mount")
    }
}

/// Three agents named `names`, each with `mounts[i]` as its huge-page
/// mount (if any).
fn testbed_named(names: [&str; 3], mounts: [Option<&Path>; 3]) -> Testbed {
    let mut tb = testbed(&names);
    for (h, m) in names.into_iter().zip(mounts) {
        if let Some(m) = m {
            tb.add_hugepages(h, m);
            tb.restart_agent(h, &[]).unwrap();
        }
    }
    tb
}

fn testbed_with(mounts: [Option<&Path>; 3]) -> Testbed {
    testbed_named(["hostA", "hostB", "hostC"], mounts)
}

/// The agent's RAM file for `vm` on `host`'s mount `mount`.
fn huge_ram(mount: &Path, host: &str, vm: &str) -> PathBuf {
    mount.join(format!("dcmigrate-{host}")).join(format!("{vm}-ram0.ram"))
}

/// A 64 MiB guest on 2 MiB pages at hostA goes to hostB, is retargeted to
/// hostC mid-way (hostB forwarding what it holds), and lands on hostC's
/// hugetlbfs mount, which has no `size=` (the pool's free pages are what
/// counts): byte-exact, on huge pages there, running only there, with no
/// file left on hostB's mount. Soft-dirty was never used (it cannot see
/// writes to huge pages). Returns the report, or None if skipped.
fn moves_through_a_retarget(test: &str, transport: TransportKind) -> Option<Report> {
    // Source, hostB's session, hostC's, and slack.
    let mut huge = huge_or_skip(test, 3 * 32 + 16)?;
    let (ma, mb, mc) = (huge.mount("a", None), huge.mount("b", Some("128M")), huge.mount("c", None));
    let mut tb = testbed_with([Some(&ma), Some(&mb), Some(&mc)]);
    let src = ma.join("hp-ram0.ram");
    let ram_file = src.to_str().unwrap().to_owned();
    tb.start_guest("hostA", "hp", 64 * MIB, &workload(8.0), true, &["--ram-file", &ram_file]).unwrap();
    let at_source = tb.vm_on("hostA", "hp").expect("registered");
    assert_eq!(at_source.ram[0].page_size, HUGE, "the agent read the page size: {:?}", at_source.ram);

    // Slow enough that the retarget comes mid-way; held (test builds) so
    // that it surely does.
    let opts = MigrateOptions { suspend: true, max_bandwidth_mbps: Some(16.0), transport, ..Default::default() };
    start_migration(&tb, "hostA", "hp", "hostB", held(opts));
    assert!(retarget_when(&tb, "hostA", "hp", "hostC", 0.3, true), "the migration ended before the retarget");
    release(&tb, "hostA", "hp");
    let report = wait_report(&tb, "hostA", "hp");
    assert_eq!(report.result, Outcome::Completed, "{report:#?}\n{}", tb.logs());
    assert_eq!(report.retargets.len(), 1, "{report:#?}");
    assert_eq!(report.ram.iter().map(|r| r.page_size).collect::<Vec<_>>(), vec![HUGE]);
    assert_ne!(report.tracker, Some(TrackerKind::SoftDirty));

    let dst = huge_ram(&mc, "hostC", "hp");
    let fs = backing::of_path(&dst).unwrap();
    assert!(fs.hugetlb && fs.page_size == HUGE, "hostC's RAM is on {fs:?}");
    // Both paused (the source quit, the destination --suspend): frozen.
    assert_same_bytes(&src, &dst);
    let at_c = tb.vm_on("hostC", "hp").expect("on hostC");
    assert_eq!(at_c.ram[0].page_size, HUGE);
    assert_eq!(at_c.ram[0].path, dst);
    assert!(wait_for(10, || tb.vm_on("hostA", "hp").is_none().then_some(())).is_some(), "still on hostA");
    assert!(tb.vm_on("hostB", "hp").is_none(), "also on hostB");
    let left = wait_for(15, || (!huge_ram(&mb, "hostB", "hp").exists()).then_some(()));
    assert!(left.is_some(), "hostB kept its RAM file on its huge-page mount");
    tb.client("hostC").resume("hp").unwrap();
    assert_running_on(&tb, "hostC", "hp");
    std::fs::remove_file(&src).unwrap();
    Some(report)
}

/// [`moves_through_a_retarget`] over TCP.
#[test]
fn a_guest_on_huge_pages_lands_on_huge_pages_through_a_retarget() {
    const T: &str = "a_guest_on_huge_pages_lands_on_huge_pages_through_a_retarget";
    if let Some(r) = moves_through_a_retarget(T, TransportKind::Tcp) {
        assert_eq!(r.transport, TransportUsed::Tcp, "{r:#?}");
    }
}

/// [`moves_through_a_retarget`] over RDMA (SoftRoCE, in the test VM):
/// huge pages registered on every host, the source and the forwarder
/// writing into the new destination's.
#[cfg(feature = "rdma")]
#[test]
fn a_guest_on_huge_pages_moves_over_rdma_through_a_retarget() {
    const T: &str = "a_guest_on_huge_pages_moves_over_rdma_through_a_retarget";
    let rdma = dcmigrate::transport::rdma::open(&Default::default()).map(|_| ());
    if !can_run(T, rdma, true, "tests/softroce/run runs it on SoftRoCE") {
        return;
    }
    if let Some(r) = moves_through_a_retarget(T, TransportKind::Rdma) {
        assert_eq!(r.transport, TransportUsed::Rdma, "{r:#?}");
    }
}

/// A destination without a mount of the source's page size refuses,
/// naming the region, the page size and the mounts it has; one whose pool
/// cannot take the RAM refuses with the numbers. The guest runs on at the
/// source either way.
#[test]
fn destinations_without_room_on_huge_pages_refuse_with_the_reason() {
    const T: &str = "destinations_without_room_on_huge_pages_refuse_with_the_reason";
    // The source's 32 pages and 8 more: hostB's pool is too small.
    let Some(mut huge) = huge_or_skip(T, 32 + 8) else { return };
    let (ma, mb) = (huge.mount("a", None), huge.mount("b", None));
    let mut tb = testbed_with([Some(&ma), Some(&mb), None]);
    let src = ma.join("hq-ram0.ram");
    let ram_file = src.to_str().unwrap().to_owned();
    tb.start_guest("hostA", "hq", 64 * MIB, &workload(1.0), false, &["--ram-file", &ram_file]).unwrap();

    let r = migrate(&tb, "hostA", "hq", "hostC", MigrateOptions::default());
    assert_eq!(r.result, Outcome::Failed, "{r:#?}");
    let unsupported = Reason { code: Some(ErrorCode::Unsupported), ..Reason::at(FailureKind::Refused, "hostC") };
    assert_eq!(r.reason, Some(unsupported), "{r:#?}");
    let e = r.error.unwrap_or_default();
    for part in ["ram0", "2 MiB pages", "no hugetlbfs mount of that page size", "it has none"] {
        assert!(e.contains(part), "{part:?} not in: {e}");
    }
    assert_running_on(&tb, "hostA", "hq");

    let r = migrate(&tb, "hostA", "hq", "hostB", MigrateOptions::default());
    assert_eq!(r.result, Outcome::Failed, "{r:#?}");
    let no_room = Reason { code: Some(ErrorCode::NoRoom), ..Reason::at(FailureKind::Refused, "hostB") };
    assert_eq!(r.reason, Some(no_room), "{r:#?}");
    let e = r.error.unwrap_or_default();
    assert!(e.contains("67108864 bytes of RAM on 2 MiB pages do not fit"), "{e}");
    // "N bytes of such pages left": fewer than the RAM.
    let left: u64 = e
        .split("pages do not fit in ")
        .nth(1)
        .and_then(|s| s.split(": ").nth(1))
        .and_then(|s| s.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no room in: {e}"));
    assert!(left < 64 * MIB, "{e}");
    assert_running_on(&tb, "hostA", "hq");
    assert!(!huge_ram(&mb, "hostB", "hq").exists(), "hostB created a RAM file it refused");
}

/// A booted QEMU guest with two NUMA nodes on 2 MiB pages, one in a file
/// QEMU created on the mount and one in a file QEMU unlinked there (a
/// `mem-path` directory, as libvirt has it), both preallocated, goes to B
/// and is retargeted to C: C's RAM is on its hugetlbfs mount, the named
/// file is A's byte for byte and the whole RAM compared equal in the pause
/// (the unlinked file dies with A's QEMU), one QEMU is left, on C, and the
/// guest's heartbeat goes on there without a gap.
#[test]
#[cfg_attr(not(feature = "test-hooks"), ignore = "needs the test-only switches: cargo test --features test-hooks")]
fn a_booted_qemu_guest_on_huge_pages_moves_with_a_retarget() {
    const T: &str = "a_booted_qemu_guest_on_huge_pages_moves_with_a_retarget";
    let q = if qemu_available() { Ok(()) } else { Err(format!("{QEMU} is not installed")) };
    if !can_run(T, q, false, "tests/run installs qemu-system-x86") {
        return;
    }
    if std::env::var_os("DCMIGRATE_IN_VM").is_some() {
        skip(T, "QEMU under TCG inside the TCG test VM is too slow; the host's run covers it");
        return;
    }
    let Some(image) = guest_image() else {
        skip(T, "no guest image: run tests/guest-image/build");
        return;
    };
    const NODE: u64 = 128 * MIB;
    let Some(mut huge) = huge_or_skip(T, 3 * 2 * NODE / HUGE + 32) else { return };
    let (ma, mb, mc) = (huge.mount("a", None), huge.mount("b", Some("300M")), huge.mount("c", None));
    let mut tb = testbed_named(["A", "B", "C"], [Some(&ma), Some(&mb), Some(&mc)]);
    let spec = QemuSpec {
        ram: vec![("n0".into(), NODE, Backend::HugeFile), ("n1".into(), NODE, Backend::HugeDir)],
        image: Some(image),
        huge: Some(ma.clone()),
    };
    let g = tb.start_qemu("A", "vm1", &spec).expect("QEMU on A");
    let booted = wait_for(180, || (heartbeats(&serial(&g.serial())).len() >= 5).then_some(()));
    assert!(booted.is_some(), "guest did not boot: {}", serial(&g.serial()));
    let at_a = tb.vm_on("A", "vm1").expect("added on A");
    assert!(at_a.ram.iter().all(|r| r.page_size == HUGE), "{:?}", at_a.ram);
    assert!(at_a.ram[1].path.starts_with("/proc"), "the unlinked file, through QEMU: {:?}", at_a.ram[1]);

    let opts = MigrateOptions {
        max_bandwidth_mbps: Some(30.0),
        suspend: true,
        verify: VerifyMode::Full,
        ..Default::default()
    };
    let report = migrate_booted_with_a_retarget(&tb, opts);
    assert!(report.verified && report.verify_mismatched_chunks == 0, "{report:#?}");
    assert_eq!(report.ram.len(), at_a.ram.len(), "{:?}", report.ram);
    assert!(report.ram.iter().all(|r| r.page_size == HUGE), "{:?}", report.ram);

    let at_c = tb.vm_on("C", "vm1").expect("on C");
    for r in &at_c.ram {
        let fs = backing::of_path(&r.path).unwrap();
        assert!(fs.hugetlb && fs.page_size == HUGE && r.path.starts_with(&mc), "{r:?} on {fs:?}");
    }
    assert_same_bytes(&ma.join("vm1-n0.ram"), &at_c.ram[0].path);
    assert!(Testbed::qemu_pids(&ma).is_empty(), "QEMU left on A");
    assert!(Testbed::qemu_pids(&mb).is_empty(), "QEMU left on B");
    assert_eq!(Testbed::qemu_pids(&mc).len(), 1, "one QEMU on C");
    assert!(tb.vm_on("A", "vm1").is_none() && tb.vm_on("B", "vm1").is_none());
    assert!(!mb.join("dcmigrate-B").join("vm1.qemu").exists(), "B kept the VM's RAM on its mount");

    tb.client("C").resume("vm1").expect("resume on C");
    let last_a = *heartbeats(&serial(&g.serial())).last().expect("beats on A");
    let c_serial = at_c.console.expect("C's console log");
    let moved = wait_for(60, || (heartbeats(&serial(&c_serial)).len() >= 3).then_some(()));
    assert!(moved.is_some(), "no heartbeat on C: {}", serial(&c_serial));
    let all = heartbeats(&(serial(&g.serial()) + &serial(&c_serial)));
    let first = all.iter().position(|&n| n == last_a).expect("A's last beat");
    for w in all[first..].windows(2) {
        assert_eq!(w[1], w[0] + 1, "the heartbeat jumped across the migration: {:?}", &all[first..]);
    }
    std::fs::remove_file(ma.join("vm1-n0.ram")).unwrap();
}

/// A guest on 2 MiB pages that zeroed most of its memory (one data page in
/// every 1024, so in every other huge page): the zero pages cross as flags
/// and the destination never faults in a huge page no data reached (half
/// of them), byte-exact.
#[test]
fn huge_pages_no_data_reaches_are_never_allocated() {
    const T: &str = "huge_pages_no_data_reaches_are_never_allocated";
    let Some(mut huge) = huge_or_skip(T, 2 * 32 + 8) else { return };
    let (ma, mb) = (huge.mount("a", None), huge.mount("b", None));
    let mut tb = testbed_with([Some(&ma), Some(&mb), None]);
    let src = ma.join("hz-ram0.ram");
    let ram_file = src.to_str().unwrap().to_owned();
    let idle = workload(0.0);
    let args = ["--ram-file", &ram_file, "--zero-every", "0", "--data-every", "1024"];
    tb.start_guest("hostA", "hz", 64 * MIB, &idle, true, &args).unwrap();
    let opts = MigrateOptions { suspend: true, transport: TransportKind::Tcp, ..Default::default() };
    let r = migrate(&tb, "hostA", "hz", "hostB", opts);
    assert_eq!(r.result, Outcome::Completed, "{r:#?}");
    assert!(r.zero_pages_sent >= 64 * MIB / 4096 - 16, "{r:#?}");
    let dst = huge_ram(&mb, "hostB", "hz");
    assert_same_bytes(&src, &dst);
    use std::os::unix::fs::MetadataExt;
    let allocated = std::fs::metadata(&dst).unwrap().blocks() * 512;
    assert_eq!(allocated, 32 * MIB, "16 of the 32 huge pages got data; the others must not be allocated");
    std::fs::remove_file(&src).unwrap();
}
