//! What a local user can do to a host (issue "Trust boundaries", local
//! part): the API socket is the agent's user's (and a configured group's)
//! alone, checked again by the caller's uid; directories another user owns
//! or can write to are refused; guests' RAM files are 0600; names never
//! become paths outside their directory; a client cannot hand the agent a
//! directory to remove or a file through a symlink.

mod common;

use common::*;
use dcmigrate::agent::api::Client;
use dcmigrate::engine::{MigrateOptions, Outcome};
use dcmigrate::vm::{LaunchSpec, RamFile, VmRecord};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

const NOBODY: u32 = 65534;

fn root_or_skip(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        skip(test, "needs root (runs commands as another user, chowns files)");
    }
    root
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().mode() & 0o7777
}

/// `dcmigrate vms` against `api`, run as uid/gid `NOBODY` (from a copy of
/// the program that user can surely reach): its exit status and output.
fn vms_as_nobody(api: &Path) -> (bool, String) {
    let dir = tempfile::tempdir_in("/dev/shm").unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let copy = dir.path().join("dcmigrate");
    std::fs::copy(exe(), &copy).unwrap();
    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = Command::new(&copy)
        .args(["vms", "--api"])
        .arg(api)
        .uid(NOBODY)
        .gid(NOBODY)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

/// Starts an agent that must refuse to start; its error output.
fn refused_agent(certs: &Path, api: &Path, data: &Path, state: &Path) -> String {
    let out = Command::new(exe())
        .args(["agent", "--name", "hostA", "--listen", "127.0.0.1:0", "--certs"])
        .arg(certs)
        .arg("--api")
        .arg(api)
        .arg("--data-dir")
        .arg(data)
        .arg("--state-dir")
        .arg(state)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success(), "the agent started");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Lets other users reach (not list or write) the test bed's directories.
fn open_path_to(p: &Path) {
    for d in p.ancestors().skip(1).take_while(|d| d.starts_with("/dev/shm") && *d != Path::new("/dev/shm")) {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o711)).unwrap();
    }
}

#[test]
fn the_api_is_for_root_the_agents_user_and_its_group() {
    const T: &str = "the_api_is_for_root_the_agents_user_and_its_group";
    if !root_or_skip(T) {
        return;
    }
    let mut tb = testbed(&["hostA"]);
    let api = tb.host("hostA").api.clone();
    open_path_to(&api);
    assert_eq!(mode(&api), 0o600, "the socket is created private");
    let (ok, out) = vms_as_nobody(&api);
    assert!(!ok && out.contains("os error 13"), "the socket's mode let another user in: {out}");
    // Even if the socket's mode is opened by mistake, the caller's uid is checked.
    std::fs::set_permissions(&api, std::fs::Permissions::from_mode(0o666)).unwrap();
    let (ok, out) = vms_as_nobody(&api);
    assert!(!ok && out.contains("may not use this agent's API"), "uid not checked: {out}");
    // With --api-group, that group's members may use it (the test can fail).
    tb.restart_agent("hostA", &[("DCMIGRATE_API_GROUP", "65534")]).unwrap();
    assert_eq!(mode(&api), 0o660);
    assert_eq!(std::fs::metadata(&api).unwrap().gid(), NOBODY);
    let (ok, out) = vms_as_nobody(&api);
    assert!(ok, "a member of --api-group was refused: {out}");
}

#[test]
fn the_api_socket_path_is_not_taken_over() {
    let tb = testbed(&["hostA"]);
    let dir = tempfile::tempdir().unwrap();
    let run = |api: &Path| refused_agent(&tb.certs_dir(), api, &dir.path().join("data"), &dir.path().join("state"));
    // A live agent's socket is not stolen.
    let e = run(&tb.host("hostA").api);
    assert!(e.contains("served by a running process"), "{e}");
    assert!(Client::new(&tb.host("hostA").api).info().is_ok(), "the running agent lost its API");
    // Nor is any other file at that path replaced.
    let f = dir.path().join("precious");
    std::fs::write(&f, "keep me").unwrap();
    let e = run(&f);
    assert!(e.contains("not a socket"), "{e}");
    assert_eq!(std::fs::read_to_string(&f).unwrap(), "keep me");
}

/// The agent refuses to start on a data or state directory that another
/// user owns or can write to (a local user could plant files or symlinks
/// where guests' RAM is created).
#[test]
fn directories_others_control_are_refused() {
    const T: &str = "directories_others_control_are_refused";
    if !root_or_skip(T) {
        return;
    }
    let tb = testbed(&["hostA"]);
    let dir = tempfile::tempdir_in("/dev/shm").unwrap();
    let start = |data: &Path, state: &Path| refused_agent(&tb.certs_dir(), &dir.path().join("api.sock"), data, state);
    let theirs = dir.path().join("theirs");
    std::fs::create_dir(&theirs).unwrap();
    std::os::unix::fs::chown(&theirs, Some(NOBODY), Some(NOBODY)).unwrap();
    let e = start(&theirs, &dir.path().join("state"));
    assert!(e.contains("owned by uid 65534"), "{e}");
    let open = dir.path().join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let e = start(&dir.path().join("data"), &open);
    assert!(e.contains("writable by other users"), "{e}");
    let link = dir.path().join("link");
    std::os::unix::fs::symlink(dir.path(), &link).unwrap();
    let e = start(&link, &dir.path().join("state"));
    assert!(e.contains("not a directory"), "{e}");
    // A fresh directory is created for the agent alone: others (incoming
    // QEMUs' own uids) may only pass through to the RAM files given them.
    assert_eq!(mode(&tb.host("hostA").data_dir), 0o711);
}

/// Guest RAM holds the guest's secrets: its files are 0600 on both ends.
#[test]
fn ram_files_are_private() {
    let mut tb = testbed(&["hostA", "hostB"]);
    tb.start_guest("hostA", "priv", 16 * MIB, &workload(1.0), true, &[]).unwrap();
    assert_eq!(mode(&ram_file(&tb, "hostA", "priv")), 0o600);
    let r = migrate(&tb, "hostA", "priv", "hostB", MigrateOptions { suspend: true, ..Default::default() });
    assert_eq!(r.result, Outcome::Completed, "{r:#?}");
    assert_eq!(mode(&ram_file(&tb, "hostB", "priv")), 0o600);
}

/// Names never become paths outside their directory, and a client cannot
/// make the agent remove a directory or open a file through a symlink.
#[test]
fn names_and_registered_records_are_checked() {
    let tb = testbed(&["hostA"]);
    let dir = tempfile::tempdir().unwrap();
    let guest_dir = dir.path().join("a/b");
    let out = Command::new(exe())
        .args(["guest", "--name", "../../escaped", "--size", "1M", "--dir"])
        .arg(&guest_dir)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success(), "a guest named ../../escaped started");
    assert!(String::from_utf8_lossy(&out.stderr).contains("guest name"), "{out:?}");
    assert!(std::fs::read_dir(dir.path()).unwrap().all(|e| e.unwrap().file_name() == "a"), "a file escaped");

    let ram = dir.path().join("ram");
    std::fs::File::create(&ram).unwrap().set_len(1 << 20).unwrap();
    let link = dir.path().join("ram-link");
    std::os::unix::fs::symlink(&ram, &link).unwrap();
    let sock = dir.path().join("control.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let record = |name: &str, path: &PathBuf, owned: Option<PathBuf>| VmRecord {
        name: name.into(),
        ram: vec![RamFile::new("ram0", path.clone(), 1 << 20)],
        control: sock.clone(),
        dirty_log: None,
        launch: LaunchSpec::Synthetic { workload: workload(0.0) },
        owned_dir: owned,
        ..Default::default()
    };
    let a = Client::new(&tb.host("hostA").api);
    let e = a.register(record("r1", &ram, Some(dir.path().to_owned()))).unwrap_err().to_string();
    assert!(e.contains("owned_dir"), "{e}");
    let e = a.register(record("r2", &link, None)).unwrap_err().to_string();
    assert!(e.contains("symlinks are refused"), "{e}");
    let e = a.register(record("../r3", &ram, None)).unwrap_err().to_string();
    assert!(e.contains("VM name"), "{e}");
    assert!(dir.path().exists(), "the directory was removed");
    // The same record, well formed, is accepted (the test can fail).
    a.register(record("r4", &ram, None)).expect("a well-formed record");
    let e = a.register(record("r4", &ram, None)).unwrap_err().to_string();
    assert!(e.contains("already registered"), "{e}");
}

/// A synthetic guest run by `NOBODY` in `dir` (theirs), registered with the
/// agent at `api` as that user; killed when dropped.
struct NobodysGuest(std::process::Child);

impl Drop for NobodysGuest {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn nobodys_guest(api: &Path, dir: &Path, name: &str) -> NobodysGuest {
    let copy = dir.join("dcmigrate");
    if !copy.exists() {
        std::fs::copy(exe(), &copy).unwrap();
        std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let child = Command::new(&copy)
        .args(["guest", "--name", name, "--size", "8M", "--dirty-rate", "1", "--dir"])
        .arg(dir)
        .arg("--agent")
        .arg(api)
        .uid(NOBODY)
        .gid(NOBODY)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    NobodysGuest(child)
}

/// A member of `--api-group` registers a guest, then swaps its RAM file,
/// or its control socket, for a symlink to something of root's. The agent
/// (root) reopens them for the migration: it finds they are not the files
/// that were added, the migration fails, the VM stays, and the symlink's
/// target is untouched. The same guest unswapped migrates (the refusals
/// can fail).
#[test]
fn files_swapped_after_vm_add_are_refused() {
    const T: &str = "files_swapped_after_vm_add_are_refused";
    if !root_or_skip(T) {
        return;
    }
    let mut tb = testbed(&["hostA", "hostB"]);
    tb.restart_agent("hostA", &[("DCMIGRATE_API_GROUP", "65534")]).unwrap();
    let api = tb.host("hostA").api.clone();
    open_path_to(&api);
    let dir = tempfile::tempdir_in("/dev/shm").unwrap();
    std::os::unix::fs::chown(dir.path(), Some(NOBODY), Some(NOBODY)).unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let secret = tempfile::tempdir().unwrap();
    let target = secret.path().join("root-only");
    std::fs::write(&target, vec![0x5a; 8 << 20]).unwrap();
    let before = std::fs::read(&target).unwrap();
    let other = secret.path().join("other.sock");
    let _other = std::os::unix::net::UnixListener::bind(&other).unwrap();
    let a = Client::new(&api);
    let registered =
        |vm: &str| dcmigrate::testbed::wait_for(30, || a.list().ok()?.iter().any(|v| v.name == vm).then_some(()));
    let mut guests = vec![];
    for (vm, swap) in [("swap-ram", "ram"), ("swap-ctl", "sock")] {
        guests.push(nobodys_guest(&api, dir.path(), vm));
        assert!(registered(vm).is_some(), "{vm} did not register: {}", tb.logs());
        let path = std::fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name().unwrap().to_string_lossy().starts_with(vm) && p.extension().is_some_and(|x| x == swap)
            })
            .unwrap_or_else(|| panic!("{vm}: no .{swap} file"));
        std::fs::rename(&path, path.with_extension("moved")).unwrap();
        let to = if swap == "ram" { &target } else { &other };
        std::os::unix::fs::symlink(to, &path).unwrap();
        let r = migrate(&tb, "hostA", vm, "hostB", MigrateOptions::default());
        assert_eq!(r.result, Outcome::Failed, "{vm}: {r:#?}");
        let err = r.error.clone().unwrap_or_default();
        assert!(err.contains("no longer the file that was added"), "{vm}: {err}");
        assert!(tb.vm_on("hostB", vm).is_none());
        assert!(std::fs::read(&target).unwrap() == before, "{vm}: the symlink's target changed");
        std::fs::remove_file(&path).unwrap();
        std::fs::rename(path.with_extension("moved"), &path).unwrap();
    }
    // Put back, the same guests move.
    for vm in ["swap-ram", "swap-ctl"] {
        let r = migrate(&tb, "hostA", vm, "hostB", MigrateOptions::default());
        assert_eq!(r.result, Outcome::Completed, "{vm}: {r:#?}");
    }
    drop(guests);
}
