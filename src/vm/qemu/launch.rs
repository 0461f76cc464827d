//! A source QEMU's command line, as [`super::describe`] reads it: the
//! process's own (or a file the operator gave), without the options the
//! agent owns on a destination and without its monitors.

use super::allow::split_keyval;
use super::vm_err;
use crate::vm::{LaunchSpec, VmError};

/// Options the agent owns on a destination: taken out of a launch spec
/// (the destination sets its own QMP socket, pidfile, incoming mode and
/// sandbox).
const CONTROL_OPTS_WITH_ARG: [&str; 5] = ["qmp", "qmp-pretty", "pidfile", "incoming", "sandbox"];
const CONTROL_FLAGS: [&str; 2] = ["daemonize", "S"];

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
pub fn strip_monitors(args: &[String]) -> Vec<String> {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn strips_control_options() {
        let a =
            s(&["-m", "1G", "-qmp", "unix:/x,server=on", "-S", "--daemonize", "-pidfile", "p", "-incoming", "defer"]);
        assert_eq!(strip_control(&a), s(&["-m", "1G"]));
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
}
