//! The launch spec: how a destination starts a VM's incoming QEMU. It is
//! the source QEMU's own command line (or a file the operator gave), with
//! the options the agent owns and its monitors taken out; a destination
//! checks it against its allow-list ([`super::allow`]), then rewrites every
//! RAM backend onto the files it created.

use super::allow::{self, parse_qemu_size, split_keyval, Confine, SpecError};
use super::vm_err;
use crate::memory::RegionSpec;
use crate::vm::{LaunchSpec, VmError};
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};

/// Options the agent owns on a destination: taken out of a launch spec
/// (the destination sets its own QMP socket, pidfile, incoming mode and
/// sandbox).
const CONTROL_OPTS_WITH_ARG: [&str; 5] = ["qmp", "qmp-pretty", "pidfile", "incoming", "sandbox"];
const CONTROL_FLAGS: [&str; 2] = ["daemonize", "S"];
const MEMORY_BACKENDS: [&str; 3] = ["memory-backend-file", "memory-backend-memfd", "memory-backend-ram"];

/// QEMU's seccomp sandbox with every deny flag: no obsolete syscalls, no
/// privilege changes, no fork/exec, no scheduler or affinity changes.
pub const SANDBOX: &str = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";

/// A QEMU command line without the options the agent adds itself.
pub fn strip_control(args: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let name = a.trim_start_matches('-');
        if a.starts_with('-') && CONTROL_OPTS_WITH_ARG.contains(&name) {
            it.next();
        } else if !(a.starts_with('-') && CONTROL_FLAGS.contains(&name)) {
            out.push(a.clone());
        }
    }
    out
}

/// A source QEMU's command line without its monitors (`-monitor`, `-mon`
/// and the chardev a `-mon` uses): they belong to the source host, and a
/// destination refuses them.
fn strip_monitors(args: &[String]) -> Vec<String> {
    let opt = |a: &str, n: &str| a.starts_with('-') && a.trim_start_matches('-') == n;
    let mut mon_chardevs = Vec::new();
    for w in args.windows(2) {
        if opt(&w[0], "mon") {
            let props = split_keyval(&w[1]);
            mon_chardevs.extend(props.iter().filter_map(|p| p.strip_prefix("chardev=")).map(str::to_owned));
        }
    }
    let mut out = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if opt(a, "monitor") || opt(a, "mon") {
            it.next();
        } else if opt(a, "chardev") {
            let Some(v) = it.next() else { break };
            let id = split_keyval(v).into_iter().find_map(|p| p.strip_prefix("id=").map(str::to_owned));
            if !id.is_some_and(|id| mon_chardevs.contains(&id)) {
                out.extend([a.clone(), v.clone()]);
            }
        } else {
            out.push(a.clone());
        }
    }
    out
}

/// A destination runs only QEMU: `qemu-system-*` from PATH, or a path the
/// operator allowed in `DCMIGRATE_QEMU_ALLOW` (colon-separated) or
/// `DCMIGRATE_QEMU` (the test bed's QEMU).
pub fn check_binary(binary: &str) -> Result<(), VmError> {
    let bare = binary
        .strip_prefix("qemu-system-")
        .is_some_and(|a| !a.is_empty() && a.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'));
    let allowed = std::env::var("DCMIGRATE_QEMU_ALLOW")
        .unwrap_or_default()
        .split(':')
        .chain(std::env::var("DCMIGRATE_QEMU").ok().as_deref())
        .any(|p| !p.is_empty() && p == binary);
    if !bare && !allowed {
        return Err(vm_err(format!(
            "refusing to run {binary:?}: a launch spec may name qemu-system-* (from PATH) or a binary listed in \
             DCMIGRATE_QEMU_ALLOW on this host"
        )));
    }
    Ok(())
}

/// The launch spec as a destination will run it: the agent's options taken
/// out, `{dir}` replaced by the VM's directory.
fn resolved(args: &[String], dir: &Path) -> Vec<String> {
    let dir_s = dir.to_string_lossy();
    strip_control(args).iter().map(|a| a.replace("{dir}", &dir_s)).collect()
}

/// Checks a peer's launch spec before anything is created for it: the
/// binary, and every option against the allow-list, with files confined to
/// `dir` (the VM's directory here) and `storage`.
pub fn check_spec(binary: &str, args: &[String], dir: &Path, storage: &[PathBuf]) -> Result<(), VmError> {
    check_binary(binary)?;
    allow::check_args(&resolved(args, dir), &Confine { dir, storage }).map_err(spec_err)
}

fn spec_err(e: SpecError) -> VmError {
    VmError::Spec(e)
}

/// The launch spec of a running QEMU: its own command line, control options removed.
pub fn launch_from_process(pid: u32) -> Result<LaunchSpec, VmError> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).map_err(|e| vm_err(format!("QEMU pid {pid}: {e}")))?;
    let mut args: Vec<String> =
        raw.split(|b| *b == 0).filter(|s| !s.is_empty()).map(|s| String::from_utf8_lossy(s).into_owned()).collect();
    if args.is_empty() {
        return Err(vm_err(format!("pid {pid} has no command line")));
    }
    let binary = args.remove(0);
    Ok(LaunchSpec::Qemu { binary, args: strip_monitors(&strip_control(&args)) })
}

/// One `-object` option as a JSON object (QEMU accepts both spellings).
fn object_props(arg: &str) -> Option<Map<String, Value>> {
    if arg.trim_start().starts_with('{') {
        return serde_json::from_str::<Value>(arg).ok()?.as_object().cloned();
    }
    let mut m = Map::new();
    for (i, p) in split_keyval(arg).into_iter().enumerate() {
        match p.split_once('=') {
            Some((k, v)) => {
                m.insert(k.to_owned(), Value::String(v.to_owned()));
            }
            None if i == 0 => {
                m.insert("qom-type".into(), Value::String(p));
            }
            None => {
                m.insert(p, Value::String("on".into()));
            }
        }
    }
    Some(m)
}

fn prop_str(m: &Map<String, Value>, k: &str) -> Option<String> {
    match m.get(k)? {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(if *b { "on" } else { "off" }.into()),
        _ => None,
    }
}

/// The destination's QEMU command line: `{dir}` replaced by the VM's
/// directory there, checked against the allow-list, every RAM backend turned into a shared file backend on
/// `ram_path(id)` (same id and size: QEMU matches RAM blocks by id), no
/// preallocation (it would race with the agent's writes), and the agent's
/// QMP socket, `-incoming defer`, `-S` and the sandbox added.
pub fn destination_args(
    args: &[String],
    confine: &Confine,
    regions: &[RegionSpec],
    ram_path: impl Fn(&str) -> PathBuf,
    qmp: &Path,
) -> Result<Vec<String>, VmError> {
    let args = resolved(args, confine.dir);
    allow::check_args(&args, confine).map_err(spec_err)?;
    let mut out = Vec::with_capacity(args.len() + 6);
    let mut seen = Vec::new();
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        if a.trim_start_matches('-') != "object" || !a.starts_with('-') {
            out.push(a);
            continue;
        }
        let val = it.next().ok_or_else(|| vm_err("-object without a value in the launch spec"))?;
        let Some(mut props) = object_props(&val) else {
            return Err(vm_err(format!("cannot parse -object {val}")));
        };
        let ty = prop_str(&props, "qom-type").unwrap_or_default();
        if !MEMORY_BACKENDS.contains(&ty.as_str()) {
            out.extend(["-object".to_owned(), val]);
            continue;
        }
        let id = prop_str(&props, "id").ok_or_else(|| vm_err(format!("memory backend without id: {val}")))?;
        let region = regions.iter().find(|r| r.id == id).ok_or_else(|| {
            vm_err(format!("launch spec has memory backend {id:?}, which the source's RAM does not have"))
        })?;
        let size = prop_str(&props, "size").and_then(|s| parse_qemu_size(&s));
        if size != Some(region.size) {
            return Err(vm_err(format!(
                "memory backend {id}: size {size:?} in the launch spec, {} at the source",
                region.size
            )));
        }
        for k in ["prealloc", "hugetlb", "hugetlbsize", "seal", "mem-path", "share", "qom-type", "id", "size"] {
            props.remove(k);
        }
        let mut kv = format!("memory-backend-file,id={id},size={},share=on", region.size);
        let path = ram_path(&id);
        kv.push_str(&format!(",mem-path={}", path.to_string_lossy().replace(',', ",,")));
        for (k, v) in &props {
            // Keys cannot smuggle options back in (`a=b,prealloc` as one key).
            if k.is_empty() || !k.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
                return Err(vm_err(format!("memory backend {id}: invalid property name {k:?}")));
            }
            let v = prop_str(&props, k).ok_or_else(|| vm_err(format!("memory backend {id}: unsupported {k}={v}")))?;
            kv.push_str(&format!(",{k}={}", v.replace(',', ",,")));
        }
        out.extend(["-object".to_owned(), kv]);
        seen.push(id);
    }
    if let Some(r) = regions.iter().find(|r| !seen.contains(&r.id)) {
        return Err(vm_err(format!("the launch spec has no memory backend {:?} for the source's RAM", r.id)));
    }
    out.extend([
        "-qmp".to_owned(),
        format!("unix:{},server=on,wait=off", qmp.display()),
        "-incoming".into(),
        "defer".into(),
        "-S".into(),
        "-sandbox".into(),
        SANDBOX.into(),
    ]);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::qemu::ram_path;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn sizes_and_keyvals() {
        assert_eq!(parse_qemu_size("512M"), Some(512 << 20));
        assert_eq!(parse_qemu_size("2G"), Some(2 << 30));
        assert_eq!(parse_qemu_size("4096"), Some(4096));
        assert_eq!(parse_qemu_size("x"), None);
        assert_eq!(split_keyval("a,b=c,,d,e"), vec!["a", "b=c,d", "e"]);
    }

    #[test]
    fn strips_control_options() {
        let a =
            s(&["-m", "1G", "-qmp", "unix:/x,server=on", "-S", "--daemonize", "-pidfile", "p", "-incoming", "defer"]);
        assert_eq!(strip_control(&a), s(&["-m", "1G"]));
    }

    #[test]
    fn rewrites_memory_backends_for_the_destination() {
        let regions =
            vec![RegionSpec { id: "n0".into(), size: 64 << 20 }, RegionSpec { id: "n1".into(), size: 64 << 20 }];
        let a = s(&[
            "-object",
            "memory-backend-memfd,id=n0,size=64M,share=on,prealloc=on",
            "-object",
            r#"{"qom-type":"memory-backend-file","id":"n1","size":67108864,"mem-path":"/dev/shm/src","share":true,"merge":false}"#,
            "-serial",
            "file:{dir}/serial.log",
            "-qmp",
            "unix:/src/qmp",
            "-object",
            "iothread,id=io0",
        ]);
        let dir = Path::new("/data/vm.qemu");
        let confine = Confine { dir, storage: &[] };
        let out = destination_args(&a, &confine, &regions, |id| ram_path(dir, id), &dir.join("qmp.sock")).unwrap();
        assert_eq!(out[1], "memory-backend-file,id=n0,size=67108864,share=on,mem-path=/data/vm.qemu/n0.ram");
        assert_eq!(out[3], "memory-backend-file,id=n1,size=67108864,share=on,mem-path=/data/vm.qemu/n1.ram,merge=off");
        assert_eq!(out[5], "file:/data/vm.qemu/serial.log");
        assert_eq!(&out[6..8], &s(&["-object", "iothread,id=io0"]));
        assert_eq!(
            &out[8..],
            &s(&[
                "-qmp",
                "unix:/data/vm.qemu/qmp.sock,server=on,wait=off",
                "-incoming",
                "defer",
                "-S",
                "-sandbox",
                SANDBOX
            ])
        );
    }

    #[test]
    fn destinations_run_only_qemu_from_an_allowed_spec() {
        assert!(check_binary("qemu-system-x86_64").is_ok());
        assert!(check_binary("/bin/sh").is_err());
        assert!(check_binary("qemu-system-x86_64; rm").is_err());
        let dir = Path::new("/d");
        let e = check_spec("qemu-system-x86_64", &s(&["-plugin", "file=/tmp/x.so"]), dir, &[]).unwrap_err();
        assert!(e.to_string().contains("refused") && crate::error_chain(&e).contains("-plugin"), "{e}");
        assert!(check_spec("qemu-system-x86_64", &s(&["-serial", "file:{dir}/s.log"]), dir, &[]).is_ok());
        let regions = vec![RegionSpec { id: "ram0".into(), size: 64 << 20 }];
        let smuggled =
            s(&["-object", r#"{"qom-type":"memory-backend-file","id":"ram0","size":67108864,"a=b,prealloc":"on"}"#]);
        let confine = Confine { dir, storage: &[] };
        assert!(destination_args(&smuggled, &confine, &regions, |id| ram_path(dir, id), Path::new("/q")).is_err());
    }

    #[test]
    fn source_monitors_and_sandbox_are_not_part_of_the_spec() {
        let a = s(&[
            "-chardev",
            "socket,id=charmonitor,fd=27,server=on,wait=off",
            "-mon",
            "chardev=charmonitor,id=monitor,mode=control",
            "-monitor",
            "stdio",
            "-sandbox",
            "on,obsolete=deny",
            "-chardev",
            "null,id=c1",
            "-m",
            "1G",
        ]);
        assert_eq!(strip_monitors(&strip_control(&a)), s(&["-chardev", "null,id=c1", "-m", "1G"]));
    }

    #[test]
    fn refuses_launch_specs_that_do_not_match_the_ram() {
        let regions = vec![RegionSpec { id: "ram0".into(), size: 64 << 20 }];
        let dir = Path::new("/d");
        let confine = Confine { dir, storage: &[] };
        let run = |a: &[&str]| destination_args(&s(a), &confine, &regions, |id| ram_path(dir, id), Path::new("/q"));
        assert!(run(&["-m", "64M"]).unwrap_err().to_string().contains("no memory backend \"ram0\""));
        let e = run(&["-object", "memory-backend-file,id=ram0,size=32M,mem-path=/x,share=on"]).unwrap_err();
        assert!(e.to_string().contains("size"), "{e}");
        let e = run(&["-object", "memory-backend-ram,id=other,size=64M"]).unwrap_err();
        assert!(e.to_string().contains("does not have"), "{e}");
    }
}
