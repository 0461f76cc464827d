//! A command line read into a description on a source, checked and built
//! into a command line on a destination: what the destination's QEMU gets.

use super::*;
use crate::memory::RegionSpec;
use crate::vm::qemu::describe::{describe, Source, SpecError};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

struct Bed {
    _t: tempfile::TempDir,
    storage: PathBuf,
    runtime: PathBuf,
}

fn bed() -> Bed {
    let t = tempfile::tempdir().unwrap();
    let storage = t.path().join("images");
    std::fs::create_dir_all(storage.join("vm1")).unwrap();
    std::fs::write(storage.join("vmlinuz"), b"kernel").unwrap();
    std::fs::write(storage.join("vm1/disk.raw"), vec![0u8; 4096]).unwrap();
    std::fs::write(storage.join("base.raw"), vec![0u8; 4096]).unwrap();
    std::fs::write(
        storage.join("vm1/top.qcow2"),
        crate::vm::qemu::qcow2::tests::header(Some("../base.raw"), Some("raw"), None),
    )
    .unwrap();
    let runtime = t.path().join("run");
    Bed { storage, runtime, _t: t }
}

const RAM: u64 = 64 << 20;

fn typical(storage: &Path) -> Vec<String> {
    let st = storage.display();
    s(&[
        "-accel",
        "tcg",
        "-nodefaults",
        "-display",
        "none",
        "-serial",
        "file:/somewhere/serial.log",
        "-m",
        "64M",
        "-object",
        "memory-backend-file,id=ram0,size=64M,mem-path=/dev/shm/src/ram0,share=on,prealloc=on",
        "-machine",
        "pc,memory-backend=ram0",
        "-kernel",
        &format!("{st}/vmlinuz"),
        "-append",
        "console=ttyS0 quiet",
        "-drive",
        &format!("file={st}/vm1/disk.raw,format=raw,if=none,id=d0,cache=none"),
        "-device",
        "virtio-blk-pci,drive=d0,bootindex=1",
        "-blockdev",
        &format!(r#"{{"driver":"qcow2","node-name":"d1","file":{{"driver":"file","filename":"{st}/vm1/top.qcow2"}}}}"#),
        "-device",
        "virtio-blk-pci,drive=d1",
        "-netdev",
        "user,id=n0,hostfwd=tcp::2222-:22",
        "-device",
        r#"{"driver":"virtio-net-pci","netdev":"n0","mac":"52:54:00:12:34:56"}"#,
        "-chardev",
        "socket,id=ga,path=/run/ga.sock,server=on,wait=off",
        "-device",
        "virtio-serial-pci",
        "-device",
        "virtserialport,chardev=ga,name=org.qemu.guest_agent.0",
        "-rtc",
        "base=utc",
        "-D",
        "/tmp/qemu-debug.log",
    ])
}

fn described(storage: &Path, args: &[String]) -> Result<crate::vm::qemu::describe::Described, Vec<SpecError>> {
    let ram = [RegionSpec { id: "ram0".into(), size: RAM }];
    let networks = BTreeMap::new();
    let src = Source {
        binary: "/usr/bin/qemu-system-x86_64",
        args,
        ram: &ram,
        storage: &[storage.to_owned()],
        networks: &networks,
    };
    describe(&src).map_err(|e| e.0)
}

#[test]
fn a_typical_vm_is_described_and_built_with_descriptors_only() {
    let b = bed();
    let d = described(&b.storage, &typical(&b.storage)).expect("described");
    let desc = d.description;
    desc.check().unwrap();
    assert_eq!(desc.boot.kernel.as_deref(), Some("vmlinuz"));
    assert_eq!(desc.disks.iter().map(|d| d.image.as_str()).collect::<Vec<_>>(), ["vm1/disk.raw", "vm1/top.qcow2"]);
    assert!(d.notes.iter().any(|n| n.contains("hostfwd")), "{:?}", d.notes);
    assert!(d.notes.iter().any(|n| n.contains("-D")), "{:?}", d.notes);
    // The description travels as JSON and comes back the same.
    let json = serde_json::to_string(&desc).unwrap();
    assert_eq!(serde_json::from_str::<Description>(&json).unwrap(), desc);

    let storage = Storage::new(std::slice::from_ref(&b.storage));
    let networks = Networks::default();
    check_resources(&desc, &storage, &networks).unwrap();
    let rt = RuntimeDir::create(&b.runtime).unwrap();
    let res = create(&desc, &storage, &networks, &rt).unwrap();
    let ram = [RamFile::new("ram0", "/data/vm1.qemu/ram0.ram", RAM)];
    let cmd = build(&desc, &ram, res);
    let argv = cmd.argv.join(" ");
    let st = b.storage.display().to_string();
    assert!(!argv.contains(&st), "a storage path reached QEMU: {argv}");
    for never in ["/somewhere", "/run/ga.sock", "/tmp/qemu-debug.log", "hostfwd", "/dev/shm/src"] {
        assert!(!argv.contains(never), "{never} reached QEMU: {argv}");
    }
    // The source preallocated its RAM: so does the destination.
    assert!(desc.ram[0].prealloc && argv.contains("prealloc=on"), "{argv}");
    assert!(argv.contains("user,id=n0,restrict=on"), "{argv}");
    assert!(argv.contains("mem-path=/data/vm1.qemu/ram0.ram") && argv.contains("share=on"), "{argv}");
    assert!(argv.contains(&format!("-m size={RAM}B")), "{argv}");
    assert!(argv.contains("-kernel /proc/self/fd/"), "{argv}");
    assert!(argv.contains("\"filename\":\"/dev/fdset/"), "{argv}");
    // The qcow2 image's backing file is a node of its own, never opened by name.
    assert!(argv.contains("\"backing\":\"dcm-1b1\""), "{argv}");
    assert!(argv.contains("socket,id=ga,fd=") && argv.contains("server=on"), "{argv}");
    assert!(argv.contains("-chardev socket,id=dcm-qmp,fd="), "{argv}");
    assert!(argv.ends_with(&format!("-incoming defer -S -sandbox {SANDBOX}")), "{argv}");
    // Every descriptor QEMU gets has a number of its own, from 3 on.
    let nums: Vec<i32> = cmd.fds.iter().map(|(_, n)| *n).collect();
    assert_eq!(nums, (3..3 + nums.len() as i32).collect::<Vec<_>>());
    assert!(b.runtime.join("chardev-serial0.log").exists() && b.runtime.join("chardev-ga.sock").exists());
}

#[test]
fn every_escape_is_refused_by_name_at_once() {
    let b = bed();
    let st = b.storage.display().to_string();
    let cases: &[(&[&str], &str)] = &[
        (&["-drive", "file=/etc/shadow,format=raw,if=none,id=x"], "storage"),
        (&["-drive", &format!("file={st}/vm1/disk.raw,if=none,id=x")], "format"),
        (&["-blockdev", &format!("driver=file,node-name=f,filename={st}/vm1/disk.raw,locking=off")], "locking=off"),
        (&["-blockdev", &format!("driver=file,node-name=f,filename={st}/vm1/disk.raw,force-share=on")], "force-share"),
        (&["-initrd", &format!("{st}/vmlinuz,/etc/shadow")], "initrd"),
        (&["-fsdev", "local,path=/,security_model=none,id=f"], "-fsdev"),
        (&["-netdev", "tap,id=t0,ifname=vnet7,script=no"], "bridge"),
        (&["-netdev", "bridge,id=n,br=br0"], "\"bridge\""),
        (&["-chardev", "socket,id=c,host=0.0.0.0,port=4444,server=on"], "unix socket"),
        (&["-device", "virtio-net-pci,romfile=/etc/shadow"], "romfile"),
        (&["-plugin", "file=/tmp/x.so"], "-plugin"),
        (&["-m", "4G"], "RAM regions hold"),
        (&["-m", "64M,slots=2,maxmem=1G"], "hotplug"),
        (&["-fw_cfg", "name=opt/x,file=/etc/shadow"], "file"),
    ];
    for (extra, want) in cases {
        let mut args = typical(&b.storage);
        // Replace -m where the case gives its own.
        if extra[0] == "-m" {
            let i = args.iter().position(|a| a == "-m").unwrap();
            args.drain(i..i + 2);
        }
        args.extend(extra.iter().map(|x| x.to_string()));
        let errs = described(&b.storage, &args).expect_err(&format!("{extra:?} passed"));
        let text = errs.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ");
        assert!(text.contains(want), "{extra:?}: {text}");
    }
    // Every refusal of one line is listed, not just the first.
    let mut args = typical(&b.storage);
    args.extend(s(&["-plugin", "x", "-fsdev", "local,id=f"]));
    assert_eq!(described(&b.storage, &args).unwrap_err().len(), 2);
}

#[test]
fn a_description_from_a_peer_is_checked_again() {
    let b = bed();
    let good = described(&b.storage, &typical(&b.storage)).unwrap().description;
    let mut bad = vec![];
    let mut d = good.clone();
    d.disks[0].image = "../../etc/shadow".into();
    bad.push(d);
    let mut d = good.clone();
    d.boot.kernel = Some("/etc/shadow".into());
    bad.push(d);
    let mut d = good.clone();
    d.devices.push(BTreeMap::from([("driver".into(), "vfio-pci".into()), ("host".into(), "01:00.0".into())]));
    bad.push(d);
    let mut d = good.clone();
    d.options.push(("D".into(), Some("/tmp/x".into())));
    bad.push(d);
    let mut d = good.clone();
    d.machine.insert("memory-backend".into(), "ram0".into());
    bad.push(d);
    let mut d = good.clone();
    d.chardevs[0].id = "dcm-qmp".into();
    bad.push(d);
    let mut d = good.clone();
    d.devices[0].insert("drive".into(), "nope".into());
    bad.push(d);
    let mut d = good.clone();
    d.cpu = Some("host,x=a;b".into());
    bad.push(d);
    for (i, d) in bad.iter().enumerate() {
        assert!(d.check().is_err(), "case {i} passed: {d:?}");
    }
    // Unknown fields are refused, not dropped.
    let mut v = serde_json::to_value(&good).unwrap();
    v["hostfwd"] = serde_json::json!("tcp::22-:22");
    assert!(serde_json::from_value::<Description>(v).is_err());
}

#[test]
fn a_missing_file_or_network_is_refused_before_anything_is_created() {
    let b = bed();
    let mut desc = described(&b.storage, &typical(&b.storage)).unwrap().description;
    let storage = Storage::new(std::slice::from_ref(&b.storage));
    desc.nets[0].network = "prod".into();
    let e = crate::error_chain(&check_resources(&desc, &storage, &Networks::default()).unwrap_err());
    assert!(e.contains("prod") && e.contains("user"), "{e}");
    desc.nets[0].network = "user".into();
    std::fs::remove_file(b.storage.join("base.raw")).unwrap();
    let e = crate::error_chain(&check_resources(&desc, &storage, &Networks::default()).unwrap_err());
    assert!(e.contains("base.raw"), "{e}");
    assert!(!b.runtime.exists());
}

#[test]
fn ram_bound_to_host_nodes_needs_those_nodes_here() {
    assert!(super::host_nodes("0").is_ok(), "node 0 is on every Linux host");
    let e = super::host_nodes("0-1023").unwrap_err();
    assert!(e.contains("no NUMA node"), "{e}");
    for bad in ["", "x", "3-1", "0-99999"] {
        assert!(super::host_nodes(bad).unwrap_err().contains("not a list"), "{bad:?}");
    }
}
