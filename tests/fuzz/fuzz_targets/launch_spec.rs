//! `launch_spec`: what a destination does with what a peer sends to start
//! a VM. The input is split on NUL bytes into words (lossy UTF-8: what
//! travels is JSON strings). With the first byte's low bit clear, the words
//! are a QEMU command line, read as a protocol-3 source's is
//! (`vm::qemu::describe`, against the storage prefix `/srv/images` and one
//! region `ram0` of 64 MiB); set, the rest is a VM description as JSON.
//! Checks: nothing panics; whatever `describe` returns passes a
//! destination's own check (`Description::check`); and a description that
//! passes builds into a command line (`vm::qemu::command::build`) in which
//! every value is one the allow-lists give (no `file=` behind `-fw_cfg`, no
//! host forward, no path a peer named: the only absolute paths are the
//! agent's own RAM file and `/dev/fdset`/`/proc/self/fd` names).
//!
//! The checks run on a thread with a 2 MiB stack, what the agent's tokio
//! threads have (a peer's spec is checked on one), so that unbounded
//! recursion shows as a crash here as it would there
//! (regressions/launch_spec/deep-dotted-key).
#![no_main]

use dcmigrate::memory::RegionSpec;
use dcmigrate::vm::qemu::command::{build, Resources};
use dcmigrate::vm::qemu::describe::{describe, Source};
use dcmigrate::vm::qemu::Description;
use dcmigrate::vm::RamFile;
use libfuzzer_sys::fuzz_target;
use std::path::PathBuf;
use std::sync::{mpsc, Mutex, OnceLock};

/// Tokio's default stack for its threads.
const STACK: usize = 2 << 20;

/// One thread with that stack checks every input (a thread per input would
/// cost more than the checks); a panic there aborts the process as here.
fn checker() -> &'static Mutex<(mpsc::Sender<Vec<u8>>, mpsc::Receiver<()>)> {
    static CHECKER: OnceLock<Mutex<(mpsc::Sender<Vec<u8>>, mpsc::Receiver<()>)>> = OnceLock::new();
    CHECKER.get_or_init(|| {
        let (input, inputs) = mpsc::channel::<Vec<u8>>();
        let (done, finished) = mpsc::channel();
        std::thread::Builder::new()
            .name("checker".into())
            .stack_size(STACK)
            .spawn(move || {
                for data in inputs {
                    check(&data);
                    done.send(()).expect("fuzzer gone");
                }
            })
            .expect("thread");
        Mutex::new((input, finished))
    })
}

fuzz_target!(|data: &[u8]| {
    let c = checker().lock().unwrap();
    c.0.send(data.to_vec()).expect("checker gone");
    c.1.recv().expect("checker gone");
});

fn check(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else { return };
    let regions = vec![RegionSpec { id: "ram0".into(), size: 64 << 20 }];
    let desc = if mode & 1 == 0 {
        let args: Vec<String> = rest.split(|&b| b == 0).map(|w| String::from_utf8_lossy(w).into_owned()).collect();
        let storage = [PathBuf::from("/srv/images")];
        let networks = Default::default();
        let src =
            Source { binary: "qemu-system-x86_64", args: &args, ram: &regions, storage: &storage, networks: &networks };
        match describe(&src) {
            Ok(d) => {
                if let Err(e) = d.description.check() {
                    panic!("describe gave what a destination refuses: {e}\nin: {args:?}");
                }
                d.description
            }
            Err(_) => return,
        }
    } else {
        match serde_json::from_slice::<Description>(rest) {
            Ok(d) if d.check().is_ok() => d,
            _ => return,
        }
    };
    let ram: Vec<RamFile> = desc
        .ram
        .iter()
        .map(|r| RamFile::new(r.id.clone(), PathBuf::from(format!("/data/vm.qemu/{}.ram", r.id)), r.size))
        .collect();
    let qmp = std::fs::File::open("/dev/null").expect("/dev/null").into();
    let res = Resources { disks: vec![], boot: Default::default(), nets: vec![], chardevs: vec![], qmp };
    let argv = build(&desc, &ram, res).argv;
    for w in argv.windows(2) {
        let (opt, v) = (w[0].as_str(), w[1].as_str());
        if opt == "-fw_cfg" {
            assert!(!v.split(',').any(|p| p.starts_with("file=")), "-fw_cfg {v}");
        }
        assert!(!v.contains("hostfwd") && !v.contains("guestfwd"), "{opt} {v}");
        // What QEMU opens: files of boot options, and paths in properties.
        let opened: Vec<&str> = match opt {
            "-kernel" | "-initrd" | "-dtb" => vec![v],
            "-bios" if v.contains('/') => vec![v],
            _ => v
                .split(',')
                .filter_map(|p| p.split_once('='))
                .filter(|(k, _)| ["mem-path", "path", "filename", "file", "logfile"].contains(k))
                .map(|(_, x)| x)
                .collect(),
        };
        for p in opened {
            let ours =
                p.starts_with("/data/vm.qemu/") || p.starts_with("/dev/fdset/") || p.starts_with("/proc/self/fd/");
            assert!(ours, "a file a peer chose reached QEMU: {opt} {v}");
        }
    }
}
