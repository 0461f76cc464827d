//! Stock QEMU guests (TCG) migrated by the agents: RAM in shared backends,
//! device state through QEMU's own migration with x-ignore-shared.

mod common;

use common::*;
use dcmigrate::engine::{MigrateOptions, Outcome};
use dcmigrate::testbed::qemu::{heartbeats, qemu_available, qmp_listening, Backend, QemuSpec, QEMU};
use dcmigrate::testbed::{wait_for, Testbed};

fn qemu_or_skip(test: &str) -> bool {
    let q = if qemu_available() { Ok(()) } else { Err(format!("{QEMU} is not installed")) };
    can_run(test, q, false, "tests/run installs qemu-system-x86")
}

/// The major version of the QEMU under test.
fn qemu_major() -> u32 {
    let out = std::process::Command::new(dcmigrate::testbed::qemu::qemu_binary()).arg("--version").output().unwrap();
    let s = String::from_utf8_lossy(&out.stdout).into_owned();
    s.split("version ").nth(1).and_then(|v| v.split('.').next()).and_then(|m| m.trim().parse().ok()).unwrap_or(0)
}

fn suspended() -> MigrateOptions {
    // Paused at the destination: its RAM can be compared with the source's
    // as of the switchover, then `resume` starts it.
    MigrateOptions { suspend: true, ..Default::default() }
}

#[test]
#[cfg_attr(not(feature = "test-hooks"), ignore = "needs the test-only switches: cargo test --features test-hooks")]
fn booted_guest_moves_with_a_retarget_and_its_heartbeat_continues() {
    const T: &str = "booted_guest_moves_with_a_retarget_and_its_heartbeat_continues";
    if !qemu_or_skip(T) {
        return;
    }
    let Some((tb, g)) = booted_guest(T) else { return };

    // Slow enough that the retarget lands while B is receiving.
    let opts = MigrateOptions { max_bandwidth_mbps: Some(30.0), ..suspended() };
    let report = migrate_booted_with_a_retarget(&tb, opts);
    let forwarded = report.bytes_by_sender.get("B").copied().unwrap_or(0);
    assert!(forwarded > 8 * MIB, "B forwarded only {forwarded} bytes: {report:#?}");
    println!("{}", serde_json::to_string_pretty(&report).unwrap());

    // C's RAM is A's as of the switchover, byte for byte (A's file outlives A's QEMU).
    let c_dir = tb.host("C").data_dir.join("vm1.qemu");
    assert_same_bytes(&g.dir.join("ram0.ram"), &c_dir.join("ram0.ram"));
    // One QEMU, on C; B's incoming one is gone with its files.
    assert!(Testbed::qemu_pids(&tb.host("A").data_dir).is_empty(), "QEMU left on A");
    assert!(Testbed::qemu_pids(&tb.host("B").data_dir).is_empty(), "QEMU left on B");
    assert_eq!(Testbed::qemu_pids(&c_dir).len(), 1, "one QEMU on C");
    assert!(!tb.host("B").data_dir.join("vm1.qemu").exists(), "B kept the VM's files");
    assert!(tb.vm_on("A", "vm1").is_none() && tb.vm_on("B", "vm1").is_none());

    tb.client("C").resume("vm1").expect("resume on C");
    let a_beats = heartbeats(&serial(&g.serial()));
    let last_a = *a_beats.last().expect("beats on A");
    let c_serial = tb.vm_on("C", "vm1").and_then(|v| v.console).expect("C's console log");
    let moved = wait_for(60, || (heartbeats(&serial(&c_serial)).len() >= 3).then_some(()));
    assert!(moved.is_some(), "no heartbeat on C: {}", serial(&c_serial));
    let all = heartbeats(&(serial(&g.serial()) + &serial(&c_serial)));
    let first = all.iter().position(|&n| n == last_a).expect("A's last beat");
    assert!(all.len() > first + 2, "heartbeats after the move: {all:?}");
    for w in all[first..].windows(2) {
        assert_eq!(w[1], w[0] + 1, "the heartbeat jumped across the migration: {:?}", &all[first..]);
    }
    assert_eq!(phase(&tb, "C", "vm1").as_deref(), Some("running"));
}

#[test]
fn two_numa_nodes_on_memfd_backends_move() {
    const T: &str = "two_numa_nodes_on_memfd_backends_move";
    if !qemu_or_skip(T) {
        return;
    }
    let mut tb = testbed(&["A", "B"]);
    let spec = QemuSpec {
        ram: vec![("n0".into(), 64 * MIB, Backend::Memfd), ("n1".into(), 96 * MIB, Backend::Memfd)],
        image: None,
        huge: None,
    };
    if qemu_major() >= 8 {
        // Newer QEMU sends memfd RAM in its own stream even with
        // x-ignore-shared: such a VM must be refused, with the fix.
        let e = tb.start_qemu("A", "vm2", &spec).err().expect("memfd refused on QEMU >= 8");
        assert!(e.0.contains("memory-backend-file"), "{}", e.0);
        return;
    }
    let _g = tb.start_qemu("A", "vm2", &spec).expect("QEMU on A");
    // Hold A's memfds open: they would vanish with A's QEMU, and the test
    // compares them with B's RAM afterwards. Fill them with a pattern first.
    let pid = Testbed::qemu_pids(&tb.host("A").data_dir)[0];
    let mut memfds = std::collections::BTreeMap::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().flatten() {
        if std::fs::read_link(e.path()).is_ok_and(|t| t.to_string_lossy().starts_with("/memfd:")) {
            let f = std::fs::OpenOptions::new().read(true).write(true).open(e.path()).unwrap();
            let len = f.metadata().unwrap().len();
            memfds.insert(len, f);
        }
    }
    assert_eq!(memfds.len(), 2, "two memfd backends");
    for (len, f) in &memfds {
        use std::os::unix::fs::FileExt;
        let pattern: Vec<u8> = (0..MIB as usize).map(|i| (i * 7 + *len as usize) as u8).collect();
        for off in (0..*len).step_by(4 * MIB as usize) {
            f.write_all_at(&pattern, off).unwrap();
        }
    }
    let report = {
        start_migration(&tb, "A", "vm2", "B", suspended());
        wait_report(&tb, "A", "vm2")
    };
    assert_eq!(report.result, Outcome::Completed, "{report:#?}\n{}", tb.logs());
    let b_dir = tb.host("B").data_dir.join("vm2.qemu");
    for (id, size) in [("n0", 64 * MIB), ("n1", 96 * MIB)] {
        let src = &memfds[&size];
        let a = std::fs::read(format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(src))).unwrap();
        let b = std::fs::read(b_dir.join(format!("{id}.ram"))).unwrap();
        assert_eq!(a.len(), b.len());
        assert!(a == b, "node {id}: RAM differs");
    }
    assert!(Testbed::qemu_pids(&tb.host("A").data_dir).is_empty(), "QEMU left on A");
    // Soft-dirty (where the kernel has it) reads B's QEMU's page tables: its
    // RAM files must be found in QEMU's mappings.
    let files = vec![b_dir.join("n0.ram"), b_dir.join("n1.ram")];
    let regions =
        [("n0", 64 * MIB), ("n1", 96 * MIB)].map(|(id, size)| dcmigrate::memory::RegionSpec { id: id.into(), size });
    let pid = Testbed::qemu_pids(&b_dir)[0];
    let at = dcmigrate::dirty::softdirty::locate(pid, &files, &regions).expect("RAM mapped in QEMU");
    assert_eq!(at.len(), 2);
    tb.client("B").resume("vm2").expect("resume");
    assert_eq!(phase(&tb, "B", "vm2").as_deref(), Some("running"));
}

#[test]
fn private_ram_is_refused_with_the_options_to_use() {
    const T: &str = "private_ram_is_refused_with_the_options_to_use";
    if !qemu_or_skip(T) {
        return;
    }
    let tb = testbed(&["A"]);
    let dir = tb.host("A").data_dir.join("plain");
    std::fs::create_dir_all(&dir).unwrap();
    for (i, ram) in [
        vec!["-m", "64M"],
        vec!["-m", "64M", "-object", "memory-backend-ram,id=r,size=64M", "-machine", "memory-backend=r"],
    ]
    .iter()
    .enumerate()
    {
        let qmp = dir.join(format!("qmp{i}.sock"));
        let mut q = std::process::Command::new(dcmigrate::testbed::qemu::qemu_binary())
            .args(["-accel", "tcg", "-nodefaults", "-display", "none", "-S"])
            .args(ram)
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp.display()))
            .spawn()
            .unwrap();
        qmp_listening(&qmp, 30).expect("QMP socket");
        let e = tb.client("A").attach_qemu(&format!("p{i}"), qmp, None).unwrap_err().to_string();
        let _ = q.kill();
        let _ = q.wait();
        assert!(e.contains("share=on") && e.contains("memory-backend-file"), "{ram:?}: {e}");
        assert!(tb.vm_on("A", &format!("p{i}")).is_none());
    }
}

/// A QEMU whose migration setup would break the switchover (here multifd,
/// which needs several channels) is refused at `vm add`, with the fix.
#[test]
fn migration_capabilities_that_break_the_switchover_are_refused() {
    const T: &str = "migration_capabilities_that_break_the_switchover_are_refused";
    if !qemu_or_skip(T) {
        return;
    }
    let tb = testbed(&["A"]);
    let dir = tb.host("A").data_dir.join("caps");
    std::fs::create_dir_all(&dir).unwrap();
    let qmp = dir.join("qmp.sock");
    let ram = dir.join("ram0");
    std::fs::File::create(&ram).unwrap().set_len(64 * MIB).unwrap();
    let _qemu = KillOnDrop(
        std::process::Command::new(dcmigrate::testbed::qemu::qemu_binary())
            .args(["-accel", "tcg", "-nodefaults", "-display", "none", "-S", "-m", "64M"])
            .arg("-object")
            .arg(format!("memory-backend-file,id=ram0,size=64M,mem-path={},share=on", ram.display()))
            .args(["-machine", "memory-backend=ram0"])
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp.display()))
            .spawn()
            .unwrap(),
    );
    qmp_listening(&qmp, 30).expect("QMP socket");
    {
        let mut c = dcmigrate::vm::qmp::Qmp::connect(&qmp, std::time::Duration::from_secs(10)).unwrap();
        c.execute(&qapi::qmp::migrate_set_capabilities {
            capabilities: vec![qapi::qmp::MigrationCapabilityStatus {
                capability: qapi::qmp::MigrationCapability::multifd,
                state: true,
            }],
        })
        .unwrap();
    }
    let e = tb.client("A").attach_qemu("caps", qmp.clone(), None).unwrap_err().to_string();
    assert!(e.contains("multifd") && e.contains("migrate-set-capabilities"), "{e}");
    assert!(tb.vm_on("A", "caps").is_none());
    // The same QEMU with multifd off is accepted (so the check can pass).
    {
        let mut c = dcmigrate::vm::qmp::Qmp::connect(&qmp, std::time::Duration::from_secs(10)).unwrap();
        c.execute(&qapi::qmp::migrate_set_capabilities {
            capabilities: vec![qapi::qmp::MigrationCapabilityStatus {
                capability: qapi::qmp::MigrationCapability::multifd,
                state: false,
            }],
        })
        .unwrap();
    }
    tb.client("A").attach_qemu("caps", qmp, None).expect("accepted without multifd");
}

/// A QEMU the test started, killed however the test ends.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `vm add` reads the QEMU's command line into a description for other
/// hosts: what cannot travel is refused there, every such option named at
/// once, and the VM is not added; what only matters on the source host
/// (a port forward, a debug log) is left out and said so. A clean line
/// migrates (so the refusals can fail). What a destination does with a
/// hostile description is tests/confinement.rs.
#[test]
fn vm_add_refuses_what_a_description_cannot_carry() {
    const T: &str = "vm_add_refuses_what_a_description_cannot_carry";
    if !qemu_or_skip(T) {
        return;
    }
    let tb = testbed(&["A", "B"]);
    let dir = tb.host("A").data_dir.join("attacks");
    std::fs::create_dir_all(&dir).unwrap();
    let qmp = dir.join("qmp.sock");
    let ram = dir.join("ram0");
    std::fs::File::create(&ram).unwrap().set_len(64 * MIB).unwrap();
    let base: Vec<String> = ["-accel", "tcg", "-nodefaults", "-display", "none", "-m", "64M", "-object"]
        .iter()
        .map(|s| s.to_string())
        .chain([format!("memory-backend-file,id=ram0,size=64M,mem-path={},share=on", ram.display())])
        .chain(["-machine".to_string(), "memory-backend=ram0".to_string()])
        .collect();
    let _qemu = KillOnDrop(
        std::process::Command::new(dcmigrate::testbed::qemu::qemu_binary())
            .args(&base)
            .arg("-S")
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp.display()))
            .spawn()
            .unwrap(),
    );
    qmp_listening(&qmp, 30).expect("QMP socket");
    let binary = dcmigrate::testbed::qemu::qemu_binary();
    let spec = |extra: &[&str]| dcmigrate::vm::LaunchSpec::Qemu {
        binary: binary.clone(),
        args: base.iter().cloned().chain(extra.iter().map(|s| s.to_string())).collect(),
    };
    let bad = spec(&[
        "-drive",
        "file=/etc/shadow,format=raw,if=none,id=d",
        "-fsdev",
        "local,path=/,security_model=none,id=f",
        "-chardev",
        "socket,id=c,host=0.0.0.0,port=4445,server=on,wait=off",
        "-plugin",
        "file=/tmp/x.so",
    ]);
    let e = tb.client("A").attach_qemu("bad", qmp.clone(), Some(bad)).unwrap_err().to_string();
    for named in ["-drive", "-fsdev", "-chardev", "-plugin"] {
        assert!(e.contains(named), "{named} not named: {e}");
    }
    assert!(tb.vm_on("A", "bad").is_none());
    let local = spec(&[
        "-serial",
        "file:/tmp/x.log",
        "-D",
        "/tmp/dcmigrate-qemu.log",
        "-netdev",
        "user,id=n0,hostfwd=tcp::2222-:22",
    ]);
    let r = tb.client("A").attach_qemu("clean", qmp, Some(local)).expect("attach");
    for note in ["-D", "hostfwd"] {
        assert!(r.notes.iter().any(|n| n.contains(note)), "{note} not noted: {:?}", r.notes);
    }
    let d = r.description.expect("a description");
    assert_eq!(d.nets[0].network, "user");
    let report = migrate(&tb, "A", "clean", "B", suspended());
    assert_eq!(report.result, Outcome::Completed, "{report:#?}");
    assert!(tb.vm_on("B", "clean").is_some());
}

/// With `--qemu-user`, a destination's incoming QEMU runs as that user, not
/// as the agent's root; it owns only its VM's directory and RAM files, and
/// the migration completes with the RAM byte for byte.
#[test]
fn incoming_qemu_runs_as_the_configured_user() {
    const T: &str = "incoming_qemu_runs_as_the_configured_user";
    if !qemu_or_skip(T) {
        return;
    }
    let nobody = match dcmigrate::vm::qemu::QemuUser::lookup("nobody") {
        Ok(u) => u,
        Err(e) => {
            skip(T, &format!("cannot run QEMU as nobody here: {e}"));
            return;
        }
    };
    let mut tb = testbed(&["A", "B"]);
    // The test bed's directories are private: let the user through to B's data dir.
    use std::os::unix::fs::PermissionsExt;
    let b_data = tb.host("B").data_dir.clone();
    for d in b_data.ancestors().skip(1).take_while(|d| d.starts_with(tb.dir.path())) {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o711)).unwrap();
    }
    tb.restart_agent("B", &[("DCMIGRATE_QEMU_USER", "nobody")]).unwrap();
    let spec = QemuSpec { ram: vec![("ram0".into(), 64 * MIB, Backend::File)], image: None, huge: None };
    let _g = tb.start_qemu("A", "vm3", &spec).expect("QEMU on A");
    let a_ram = tb.host("A").data_dir.join("vm3.src").join("ram0.ram");
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&a_ram).expect("A's RAM file");
        let pattern: Vec<u8> = (0..MIB as usize).map(|i| (i * 13) as u8).collect();
        for off in (0..64 * MIB).step_by(8 * MIB as usize) {
            f.write_all_at(&pattern, off).unwrap();
        }
    }
    let report = migrate(&tb, "A", "vm3", "B", suspended());
    assert_eq!(report.result, Outcome::Completed, "{report:#?}\n{}", tb.logs());
    let b_dir = b_data.join("vm3.qemu");
    let pid = Testbed::qemu_pids(&b_dir)[0];
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let uid: u32 = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(uid, nobody.uid, "B's QEMU runs as uid {uid}");
    use std::os::unix::fs::MetadataExt;
    assert_eq!(std::fs::metadata(b_dir.join("ram0.ram")).unwrap().uid(), nobody.uid);
    assert_eq!(std::fs::metadata(&b_data).unwrap().mode() & 0o777, 0o711);
    // A's QEMU is gone; its RAM file holds the RAM as of the switchover.
    assert!(
        std::fs::read(b_dir.join("ram0.ram")).unwrap() == std::fs::read(&a_ram).unwrap(),
        "B's RAM differs from A's"
    );
}
