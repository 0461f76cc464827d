//! A compromised peer cannot take a destination over: whatever VM
//! description (or, as protocol-3 agents send, command line) a source
//! sends, the destination's QEMU reads and writes only what the agent
//! opened for it, listens on nothing, runs as a uid of its own, and a
//! description it cannot honour fails the migration cleanly with the VM
//! left on the source. Each case is sent by registering a crafted record
//! with the source agent (as its root may), so the destination sees
//! exactly what a hostile source would send.

mod common;

use common::*;
use dcmigrate::engine::{MigrateOptions, Outcome};
use dcmigrate::testbed::qemu::{qemu_available, qemu_binary, qmp_listening, QEMU};
use dcmigrate::testbed::Testbed;
use dcmigrate::vm::qemu::Description;
use dcmigrate::vm::{LaunchSpec, RamFile, VmRecord};
use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

fn qemu_or_skip(test: &str) -> bool {
    let q = if qemu_available() { Ok(()) } else { Err(format!("{QEMU} is not installed")) };
    can_run(test, q, false, "tests/run installs qemu-system-x86")
}

const RAM: u64 = 64 * MIB;

/// A paused QEMU on `host` with one shared RAM file: what a source migrates.
struct SourceQemu {
    qmp: PathBuf,
    ram: PathBuf,
    child: std::process::Child,
}

impl Drop for SourceQemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn base_args(ram: &Path) -> Vec<String> {
    ["-accel", "tcg", "-nodefaults", "-display", "none", "-m", "64M", "-object"]
        .iter()
        .map(|s| s.to_string())
        .chain([format!("memory-backend-file,id=ram0,size=64M,mem-path={},share=on", ram.display())])
        .chain(["-machine".to_string(), "memory-backend=ram0".to_string()])
        .collect()
}

fn source_qemu(tb: &Testbed, name: &str) -> SourceQemu {
    let dir = tb.host("A").data_dir.join(format!("{name}.src"));
    std::fs::create_dir_all(&dir).unwrap();
    let (qmp, ram) = (dir.join("qmp.sock"), dir.join("ram0"));
    std::fs::File::create(&ram).unwrap().set_len(RAM).unwrap();
    let child = std::process::Command::new(qemu_binary())
        .args(base_args(&ram))
        .arg("-S")
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp.display()))
        .spawn()
        .unwrap();
    qmp_listening(&qmp, 30).expect("QMP socket");
    SourceQemu { qmp, ram, child }
}

/// Registers `launch` for a new source QEMU as VM `name` on A.
fn register(tb: &Testbed, name: &str, launch: LaunchSpec) -> SourceQemu {
    let q = source_qemu(tb, name);
    let rec = VmRecord {
        name: name.into(),
        ram: vec![RamFile::new("ram0", q.ram.clone(), RAM)],
        control: q.qmp.clone(),
        launch,
        ..Default::default()
    };
    tb.client("A").register(rec).expect("register");
    q
}

/// A command line as a protocol-3 source would send it.
fn legacy(ram: &Path, extra: &[String]) -> LaunchSpec {
    LaunchSpec::Qemu { binary: qemu_binary(), args: base_args(ram).into_iter().chain(extra.iter().cloned()).collect() }
}

/// The test's files on B: its storage (another VM's disk among them) and
/// a directory outside storage that nothing may touch.
struct Files {
    storage: PathBuf,
    outside: PathBuf,
    other_disk: PathBuf,
}

impl Files {
    fn new(tb: &Testbed) -> Self {
        let root = tb.dir.path().join("files");
        let (storage, outside) = (root.join("images"), root.join("outside"));
        std::fs::create_dir_all(storage.join("vm")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        let other_disk = storage.join("other-vm.raw");
        std::fs::write(&other_disk, (0..MIB as usize).map(|i| (i * 31 % 251) as u8).collect::<Vec<u8>>()).unwrap();
        std::fs::write(outside.join("secret"), b"secret").unwrap();
        std::fs::write(storage.join("vm/disk.raw"), vec![0u8; MIB as usize]).unwrap();
        std::os::unix::fs::symlink(outside.join("secret"), storage.join("link.raw")).unwrap();
        let qcow = |backing: Option<&str>, data: Option<&str>| qcow2_header(backing, data);
        std::fs::write(
            storage.join("vm/escape.qcow2"),
            qcow(Some(&outside.join("secret").display().to_string()), None),
        )
        .unwrap();
        std::fs::write(storage.join("vm/up.qcow2"), qcow(Some("../../outside/secret"), None)).unwrap();
        std::fs::write(storage.join("vm/data.qcow2"), qcow(None, Some("../../outside/secret"))).unwrap();
        Self { storage, outside, other_disk }
    }

    fn snapshot(&self) -> Vec<(PathBuf, Vec<u8>)> {
        let mut out = vec![(self.other_disk.clone(), std::fs::read(&self.other_disk).unwrap())];
        for e in std::fs::read_dir(&self.outside).unwrap().flatten() {
            out.push((e.path(), std::fs::read(e.path()).unwrap_or_default()));
        }
        out
    }
}

/// A qcow2 (version 3) header naming a backing file or an external data file.
fn qcow2_header(backing: Option<&str>, data: Option<&str>) -> Vec<u8> {
    let mut b = vec![0u8; 104];
    b[0..4].copy_from_slice(&0x514649fbu32.to_be_bytes());
    b[4..8].copy_from_slice(&3u32.to_be_bytes());
    b[20..24].copy_from_slice(&16u32.to_be_bytes());
    b[24..32].copy_from_slice(&MIB.to_be_bytes());
    b[100..104].copy_from_slice(&104u32.to_be_bytes());
    if let Some(d) = data {
        b[72..80].copy_from_slice(&4u64.to_be_bytes());
        b.extend(0x44415441u32.to_be_bytes());
        b.extend((d.len() as u32).to_be_bytes());
        b.extend(d.as_bytes());
        b.resize(b.len().div_ceil(8) * 8, 0);
    }
    b.extend([0u8; 8]);
    if let Some(name) = backing {
        let off = b.len() as u64;
        b[8..16].copy_from_slice(&off.to_be_bytes());
        b[16..20].copy_from_slice(&(name.len() as u32).to_be_bytes());
        b.extend(name.as_bytes());
    }
    b
}

/// Inodes of TCP sockets listening on this host (this network namespace).
fn listening_inodes() -> HashSet<u64> {
    let mut out = HashSet::new();
    for f in ["/proc/net/tcp", "/proc/net/tcp6"] {
        for line in std::fs::read_to_string(f).unwrap_or_default().lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            if cols.get(3) == Some(&"0A") {
                out.extend(cols.get(9).and_then(|i| i.parse::<u64>().ok()));
            }
        }
    }
    out
}

/// What B's QEMU `pid` holds open: sockets (by inode) and files (by path).
fn open_fds(pid: u32) -> (Vec<u64>, Vec<PathBuf>) {
    let (mut socks, mut files) = (vec![], vec![]);
    for e in std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().flatten() {
        let Ok(t) = std::fs::read_link(e.path()) else { continue };
        let t = t.to_string_lossy().into_owned();
        if let Some(i) = t.strip_prefix("socket:[").and_then(|r| r.strip_suffix(']')) {
            socks.push(i.parse().unwrap());
        } else if t.starts_with('/') && !t.starts_with("/dev/") && !t.starts_with("/memfd:") {
            files.push(PathBuf::from(t));
        }
    }
    (socks, files)
}

fn uid_of(pid: u32) -> u32 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status.lines().find_map(|l| l.strip_prefix("Uid:")).unwrap().split_whitespace().next().unwrap().parse().unwrap()
}

/// What B's QEMU for `vm` may hold open: its RAM, its runtime files, its
/// storage images.
fn assert_confined(tb: &Testbed, vm: &str, files: &Files) -> u32 {
    let entry = tb.vm_on("B", vm).unwrap_or_else(|| panic!("{vm} not on B"));
    let pid = entry.state.pid.expect("B's QEMU pid");
    let runtime = entry.runtime_dir.expect("a runtime dir");
    let ram_dir = tb.host("B").data_dir.join(format!("{vm}.qemu"));
    let (socks, open) = open_fds(pid);
    let listening = listening_inodes();
    assert!(socks.iter().all(|s| !listening.contains(s)), "{vm}: B's QEMU listens on TCP");
    for f in &open {
        let ok = f.starts_with(&runtime) || f.starts_with(&ram_dir) || f.starts_with(&files.storage);
        assert!(ok, "{vm}: B's QEMU holds {} open", f.display());
    }
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
    assert!(!cmdline.contains("hostfwd") && !cmdline.contains(&files.outside.display().to_string()), "{cmdline}");
    let uid = uid_of(pid);
    assert_ne!(uid, 0, "{vm}: B's QEMU runs as root");
    assert_eq!(entry.uid, Some(uid));
    uid
}

#[test]
fn every_escape_a_peer_sends_is_refused_or_confined() {
    const T: &str = "every_escape_a_peer_sends_is_refused_or_confined";
    if !qemu_or_skip(T) {
        return;
    }
    let mut tb = testbed(&["A", "B"]);
    let files = Files::new(&tb);
    tb.add_storage("B", &files.storage);
    tb.restart_agent("B", &[]).unwrap();
    let before = files.snapshot();
    let (st, out) = (files.storage.display().to_string(), files.outside.display().to_string());
    let other = files.other_disk.display().to_string();
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<String>>();
    // Refused: the migration fails, the VM stays on A, B keeps nothing.
    let refused: Vec<(Vec<String>, &str)> = vec![
        (
            s(&["-netdev", "tap,id=t0,ifname=lo,script=no,downscript=no", "-device", "virtio-net-pci,netdev=t0"]),
            "bridge",
        ),
        (
            s(&[
                "-drive",
                &format!("file={st}/vm/disk.raw,format=raw,if=none,id=d"),
                "-blockdev",
                &format!("driver=file,node-name=f,filename={other},locking=off"),
            ]),
            "locking=off",
        ),
        (s(&["-blockdev", &format!("driver=file,node-name=f,filename={other},force-share=on")]), "force-share"),
        (
            s(&["-blockdev", &format!("driver=qcow2,node-name=q,file.driver=file,file.filename={st}/vm/escape.qcow2")]),
            "secret",
        ),
        (
            s(&["-blockdev", &format!("driver=qcow2,node-name=q,file.driver=file,file.filename={st}/vm/up.qcow2")]),
            "secret",
        ),
        (
            s(&["-blockdev", &format!("driver=qcow2,node-name=q,file.driver=file,file.filename={st}/vm/data.qcow2")]),
            "secret",
        ),
        (s(&["-drive", &format!("file={st}/link.raw,format=raw,if=none,id=d")]), "link.raw"),
        (s(&["-drive", &format!("file={out}/secret,format=raw,if=none,id=d")]), "storage"),
        (s(&["-initrd", &format!("{st}/vm/disk.raw,{out}/secret")]), "initrd"),
        (s(&["-kernel", &format!("{st}/vm/missing")]), "missing"),
        (s(&["-m", "4G"]), "RAM regions hold"),
        (s(&["-fsdev", "local,path=/,security_model=none,id=f"]), "-fsdev"),
    ];
    let mut guests = vec![];
    for (i, (extra, named)) in refused.iter().enumerate() {
        let vm = format!("ref{i}");
        let q = source_qemu(&tb, &vm);
        let mut args = base_args(&q.ram);
        match extra.as_slice() {
            // The case's own -m replaces the base's.
            [m, size] if m == "-m" => args.iter_mut().filter(|a| *a == "64M").for_each(|a| *a = size.clone()),
            _ => args.extend(extra.iter().cloned()),
        }
        let rec = VmRecord {
            name: vm.clone(),
            ram: vec![RamFile::new("ram0", q.ram.clone(), RAM)],
            control: q.qmp.clone(),
            launch: LaunchSpec::Qemu { binary: qemu_binary(), args },
            ..Default::default()
        };
        tb.client("A").register(rec).expect("register");
        let report = migrate(&tb, "A", &vm, "B", MigrateOptions::default());
        assert_eq!(report.result, Outcome::Failed, "{extra:?}: {report:#?}");
        let err = report.error.clone().unwrap_or_default();
        assert!(err.contains(named), "{extra:?}: {err}");
        assert!(tb.vm_on("A", &vm).is_some(), "{extra:?}: the VM left the source");
        assert!(tb.vm_on("B", &vm).is_none() && !incoming_on(&tb, "B", &vm), "{extra:?}: B kept a session");
        assert!(!tb.host("B").data_dir.join(format!("{vm}.qemu")).exists(), "{extra:?}: B kept RAM");
        assert!(!tb.host("B").state_dir().join("vms").join(&vm).exists(), "{extra:?}: B kept a runtime dir");
        guests.push(q);
    }
    // Confined: the VM moves, but its QEMU gets only what B's agent gave it.
    let confined: Vec<Vec<String>> = vec![
        s(&["-netdev", "user,id=n0,hostfwd=tcp:127.0.0.1:47999-:22", "-device", "virtio-net-pci,netdev=n0"]),
        s(&["-serial", &format!("file:{other}"), "-D", &other]),
        s(&["-chardev", &format!("file,id=c0,path={other},logfile={out}/log"), "-serial", "chardev:c0"]),
        s(&[
            "-drive",
            &format!("file={st}/vm/disk.raw,format=raw,if=none,id=d0"),
            "-device",
            "virtio-blk-pci,drive=d0",
        ]),
    ];
    let mut uids = vec![];
    for (i, extra) in confined.iter().enumerate() {
        let vm = format!("con{i}");
        let q = source_qemu(&tb, &vm);
        let rec = VmRecord {
            name: vm.clone(),
            ram: vec![RamFile::new("ram0", q.ram.clone(), RAM)],
            control: q.qmp.clone(),
            launch: legacy(&q.ram, extra),
            ..Default::default()
        };
        tb.client("A").register(rec).expect("register");
        let report = migrate(&tb, "A", &vm, "B", MigrateOptions { suspend: true, ..Default::default() });
        assert_eq!(report.result, Outcome::Completed, "{extra:?}: {report:#?}\n{}", tb.logs());
        uids.push(assert_confined(&tb, &vm, &files));
        if i == 0 {
            // User networking reaches neither the host nor beyond.
            let pid = tb.vm_on("B", &vm).and_then(|v| v.state.pid).unwrap();
            let cmdline = String::from_utf8_lossy(&std::fs::read(format!("/proc/{pid}/cmdline")).unwrap()).into_owned();
            assert!(cmdline.contains("type=user,id=n0,restrict=on"), "{cmdline}");
        }
        guests.push(q);
    }
    let distinct: HashSet<u32> = uids.iter().copied().collect();
    assert_eq!(distinct.len(), uids.len(), "VMs on B share uids: {uids:?}");
    assert!(std::net::TcpStream::connect("127.0.0.1:47999").is_err(), "a host port forward was opened");
    assert_eq!(files.snapshot(), before, "a file outside the VMs' own changed");
    assert_eq!(std::fs::read_dir(&files.outside).unwrap().count(), 1, "a file appeared outside storage");
}

#[test]
fn a_description_that_escapes_is_refused_by_the_destination() {
    const T: &str = "a_description_that_escapes_is_refused_by_the_destination";
    if !qemu_or_skip(T) {
        return;
    }
    let mut tb = testbed(&["A", "B"]);
    let files = Files::new(&tb);
    tb.add_storage("B", &files.storage);
    tb.restart_agent("B", &[]).unwrap();
    let ram = [dcmigrate::memory::RegionSpec { id: "ram0".into(), size: RAM }];
    let args = base_args(Path::new("/x"));
    let networks = BTreeMap::new();
    let src = dcmigrate::vm::qemu::describe::Source {
        binary: &qemu_binary(),
        args: &args,
        ram: &ram,
        storage: &[],
        networks: &networks,
    };
    let good = dcmigrate::vm::qemu::describe(&src).unwrap().description;
    let mut cases: Vec<(Description, &str)> = vec![];
    let mut d = good.clone();
    d.boot.kernel = Some("../outside/secret".into());
    cases.push((d, "kernel"));
    let mut d = good.clone();
    d.boot.initrd = Some(format!("{}", files.outside.join("secret").display()));
    cases.push((d, "initrd"));
    let mut d = good.clone();
    d.options.push(("D".into(), Some(files.other_disk.display().to_string())));
    cases.push((d, "-D"));
    let mut d = good.clone();
    d.ram[0].size = 4 << 30;
    cases.push((d, "RAM regions"));
    let mut d = good.clone();
    d.devices.push(BTreeMap::from([("driver".into(), "vfio-pci".into())]));
    cases.push((d, "vfio-pci"));
    for (i, (d, named)) in cases.into_iter().enumerate() {
        let vm = format!("desc{i}");
        let _q = register(&tb, &vm, LaunchSpec::QemuVm { description: Box::new(d) });
        let report = migrate(&tb, "A", &vm, "B", MigrateOptions::default());
        assert_eq!(report.result, Outcome::Failed, "{named}: {report:#?}");
        let err = report.error.clone().unwrap_or_default();
        assert!(err.contains(named), "{named}: {err}");
        assert!(tb.vm_on("A", &vm).is_some() && tb.vm_on("B", &vm).is_none());
        assert!(!tb.host("B").data_dir.join(format!("{vm}.qemu")).exists());
    }
    // The same description, unchanged, moves: the refusals can fail.
    let _q = register(&tb, "clean", LaunchSpec::QemuVm { description: Box::new(good) });
    let report = migrate(&tb, "A", "clean", "B", MigrateOptions { suspend: true, ..Default::default() });
    assert_eq!(report.result, Outcome::Completed, "{report:#?}");
    assert_confined(&tb, "clean", &files);
}

/// A bridge and a tap on it in this network namespace, removed on drop.
struct Bridge(String, String);

impl Bridge {
    fn make(br: String, tap: String) -> Result<Self, String> {
        let ip = |args: &[&str]| {
            let out = std::process::Command::new("ip").args(args).output().map_err(|e| e.to_string())?;
            out.status.success().then_some(()).ok_or_else(|| String::from_utf8_lossy(&out.stderr).into_owned())
        };
        ip(&["link", "add", &br, "type", "bridge"])?;
        let me = Self(br, tap);
        ip(&["tuntap", "add", &me.1, "mode", "tap"])?;
        ip(&["link", "set", &me.1, "master", &me.0])?;
        ip(&["link", "set", &me.0, "up"])?;
        Ok(me)
    }

    /// The interfaces on the bridge.
    fn ports(&self) -> Vec<String> {
        let dir = format!("/sys/class/net/{}/brif", self.0);
        std::fs::read_dir(dir)
            .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default()
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        for dev in [&self.1, &self.0] {
            let _ = std::process::Command::new("ip").args(["link", "del", dev]).output();
        }
    }
}

/// A NIC on a tap on a bridge: `vm add` names its network after the
/// bridge, and the destination, which maps that name to a bridge of its
/// own (`--network`), gives QEMU a tap it made on that bridge (never the
/// source's interface name), held as a descriptor.
#[test]
fn a_bridged_nic_gets_a_tap_of_the_destinations_own() {
    const T: &str = "a_bridged_nic_gets_a_tap_of_the_destinations_own";
    if !qemu_or_skip(T) {
        return;
    }
    // Names of this run's own (at most 15 bytes).
    let id = std::process::id() % 100_000;
    let (br, tap) = (format!("dcmbr{id}"), format!("dcmtap{id}"));
    let bridge = match Bridge::make(br.clone(), tap.clone()) {
        Ok(b) => b,
        Err(e) => {
            skip(T, &format!("cannot make a bridge and a tap here: {e}"));
            return;
        }
    };
    let mut tb = testbed(&["A", "B"]);
    tb.add_network("B", &format!("{br}=bridge:{br}"));
    tb.restart_agent("B", &[]).unwrap();
    let dir = tb.host("A").data_dir.join("nic.src");
    std::fs::create_dir_all(&dir).unwrap();
    let (qmp, ram) = (dir.join("qmp.sock"), dir.join("ram0"));
    std::fs::File::create(&ram).unwrap().set_len(RAM).unwrap();
    let args: Vec<String> = base_args(&ram)
        .into_iter()
        .chain([
            "-netdev".into(),
            format!("tap,id=n0,ifname={tap},script=no,downscript=no"),
            "-device".into(),
            "virtio-net-pci,netdev=n0".into(),
        ])
        .collect();
    let child = std::process::Command::new(qemu_binary())
        .args(&args)
        .arg("-S")
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp.display()))
        .spawn()
        .unwrap();
    let _q = SourceQemu { qmp: qmp.clone(), ram, child };
    qmp_listening(&qmp, 30).expect("QMP socket");
    let r = tb.client("A").attach_qemu("nic", qmp, None).unwrap_or_else(|e| panic!("{e}: {}", tb.logs()));
    let d = r.description.expect("a description");
    assert_eq!(d.nets[0].network, br, "{d:?}");
    let before = bridge.ports();
    let report = migrate(&tb, "A", "nic", "B", MigrateOptions { suspend: true, ..Default::default() });
    assert_eq!(report.result, Outcome::Completed, "{report:#?}\n{}", tb.logs());
    let pid = tb.vm_on("B", "nic").and_then(|v| v.state.pid).expect("B's QEMU");
    let cmdline = String::from_utf8_lossy(&std::fs::read(format!("/proc/{pid}/cmdline")).unwrap()).replace('\0', " ");
    assert!(cmdline.contains("-netdev type=tap,fd=") && !cmdline.contains("ifname"), "{cmdline}");
    let tun = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .any(|e| std::fs::read_link(e.path()).is_ok_and(|t| t == Path::new("/dev/net/tun")));
    assert!(tun, "B's QEMU holds no tap");
    let added: Vec<String> = bridge.ports().into_iter().filter(|p| !before.contains(p)).collect();
    assert!(added.len() == 1 && added[0].starts_with("dcm"), "the bridge's new ports: {added:?}");
}
