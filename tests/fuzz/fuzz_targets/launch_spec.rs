//! `launch_spec`: a peer's QEMU launch spec as a destination checks and
//! rewrites it: `vm::qemu::launch::check_binary`, the allow-list
//! `vm::qemu::allow::check_args` (what `check_spec` runs) and
//! `vm::qemu::destination_args`.
//!
//! The input is split on NUL bytes into arguments (lossy UTF-8: a spec
//! travels as JSON strings); the first is the binary. The first byte's low
//! bit picks whether the source's RAM is one region `ram0` of 64 MiB or
//! nothing. Checks: nothing panics; `check_args` and `destination_args`
//! agree on what they refuse; and whatever `destination_args` returns,
//! once the agent's own options are taken out again, passes the allow-list
//! itself (the rewrite of memory backends cannot smuggle anything in).
//!
//! The checks run on a thread with a 2 MiB stack, what the agent's tokio
//! threads have (a peer's spec is checked on one), so that unbounded
//! recursion shows as a crash here as it would there
//! (regressions/launch_spec/deep-dotted-key).
//!
//! The VM's directory is a temp dir holding a symlink `escape` to `/` (so
//! the symlink check runs); `/srv/images` is the storage prefix.
#![no_main]

use dcmigrate::memory::RegionSpec;
use dcmigrate::vm::qemu::allow::{check_args, Confine};
use dcmigrate::vm::qemu::launch::check_binary;
use dcmigrate::vm::qemu::{destination_args, ram_path, strip_control};
use libfuzzer_sys::fuzz_target;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Mutex, OnceLock};

fn vm_dir() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = tempfile::tempdir().expect("temp dir");
        std::os::unix::fs::symlink("/", d.path().join("escape")).expect("symlink");
        std::fs::write(d.path().join("disk.qcow2"), b"").expect("file");
        d
    })
    .path()
}

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
    let mut words = rest.split(|&b| b == 0).map(|w| String::from_utf8_lossy(w).into_owned());
    let binary = words.next().unwrap_or_default();
    let args: Vec<String> = words.collect();
    let dir = vm_dir();
    let storage = [PathBuf::from("/srv/images")];
    let confine = Confine { dir, storage: &storage };
    let regions = if mode & 1 == 0 { vec![RegionSpec { id: "ram0".into(), size: 64 << 20 }] } else { vec![] };

    let _ = check_binary(&binary);
    let resolved: Vec<String> =
        strip_control(&args).iter().map(|a| a.replace("{dir}", &dir.to_string_lossy())).collect();
    let allowed = check_args(&resolved, &confine);
    let qmp = dir.join("qmp.sock");
    if let Ok(out) = destination_args(&args, &confine, &regions, |id| ram_path(dir, id), &qmp) {
        assert!(allowed.is_ok(), "destination_args took what check_args refused: {allowed:?}");
        if let Err(e) = check_args(&strip_control(&out), &confine) {
            panic!("the rewritten command line breaks the allow-list: {e}\nin: {args:?}\nout: {out:?}");
        }
    }
}
