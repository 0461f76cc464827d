//! Starting a destination's QEMU: as its own user, in its own cgroup (or a
//! systemd scope with the same limits), with exactly the descriptors its
//! command line names, its output in the runtime directory's `qemu.log`,
//! its process group apart from the agent's, and a pid file the agent
//! writes itself (pid and start time, so a reused pid is never mistaken
//! for it).

use super::command::Command as QemuCommand;
use super::confine::RuntimeDir;
use super::user::Identity;
use super::vm_err;
use crate::vm::cgroup::{self, Limits, VmCgroup};
use crate::vm::scope::Scope;
use crate::vm::VmError;
use command_fds::{CommandFdExt, FdMapping};
use std::io::Write;
use std::os::unix::process::CommandExt;

/// The pid file's name in a runtime directory.
pub const PID_FILE: &str = "qemu.pid";

/// How to run one QEMU.
pub struct Spawn<'a> {
    /// The VM's name.
    pub vm: &'a str,
    /// The agent's name (its cgroups are `dcmigrate/AGENT/VM`).
    pub agent: &'a str,
    /// The program.
    pub binary: &'a str,
    /// Its user, if not the agent's.
    pub identity: Option<&'a Identity>,
    /// Its systemd scope, if VMs get one.
    pub scope: Option<&'a Scope>,
    /// Its limits.
    pub limits: Limits,
}

/// A started QEMU: its process and the cgroup it runs in (none where no
/// hierarchy is writable, or systemd's scope has the limits).
pub struct Started {
    /// The child.
    pub child: std::process::Child,
    /// Its cgroup.
    pub cgroup: Option<VmCgroup>,
}

/// Starts `cmd` as `s` says.
pub fn spawn(s: &Spawn, cmd: QemuCommand, runtime: &RuntimeDir) -> Result<Started, VmError> {
    let log = runtime.create_file("qemu.log", 0o640).map_err(|e| vm_err(crate::error_chain(&e)))?;
    let log2 = log.try_clone().map_err(|e| vm_err(e.to_string()))?;
    let cgroup = match s.scope {
        Some(_) => None,
        None => match VmCgroup::create(s.agent, s.vm, s.limits) {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::warn!(vm = s.vm, "QEMU runs without a cgroup of its own: {}", crate::error_chain(&e));
                None
            }
        },
    };
    let procs = match &cgroup {
        Some(c) => c.procs().map_err(|e| vm_err(crate::error_chain(&e)))?,
        None => vec![],
    };
    let limits = s.scope.map(|_| s.limits);
    let mut c = crate::vm::scope::command(s.binary.as_ref(), s.vm, s.scope, s.identity.map(|i| (i.uid, i.gid)), limits);
    c.args(&cmd.argv).stdin(std::process::Stdio::null()).stdout(log).stderr(log2).current_dir("/");
    // Its own process group: a Ctrl-C aimed at the agent must not kill the VM.
    c.process_group(0);
    let raw = cgroup::raw(&procs);
    // SAFETY: the closure only calls `cgroup::join`, which makes write(2)
    // calls on descriptors opened before the fork.
    unsafe {
        c.pre_exec(move || cgroup::join(&raw));
    }
    let mappings = cmd.fds.into_iter().map(|(fd, n)| FdMapping { parent_fd: fd, child_fd: n }).collect();
    c.fd_mappings(mappings).map_err(|e| vm_err(format!("descriptors for QEMU: {e}")))?;
    if let Some(id) = s.identity {
        // systemd-run switches uid and gid itself after making the scope.
        super::user::apply(id, &mut c, s.scope.is_some());
    }
    let child = c.spawn().map_err(|e| {
        if let Some(cg) = &cgroup {
            cg.remove();
        }
        vm_err(format!("starting {}: {e}", s.binary))
    })?;
    drop(procs);
    let pid = child.id();
    let line = format!("{pid} {}\n", start_time(pid).unwrap_or(0));
    if let Err(e) = runtime.create_file(PID_FILE, 0o600).and_then(|mut f| {
        f.write_all(line.as_bytes())
            .map_err(|source| super::confine::ConfineError::Io { what: "the pid file".into(), source })
    }) {
        tracing::warn!(vm = s.vm, "{}", crate::error_chain(&e));
    }
    Ok(Started { child, cgroup })
}

/// A process's start time (clock ticks since boot), from `/proc/PID/stat`.
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces), the 22nd overall.
    stat.rsplit_once(')')?.1.split_whitespace().nth(19)?.parse().ok()
}

/// Whether the pid file's process still is the one it recorded.
pub fn recorded_alive(pid_file: &str) -> Option<u32> {
    let mut it = pid_file.split_whitespace();
    let pid: u32 = it.next()?.parse().ok()?;
    let start: u64 = it.next()?.parse().ok()?;
    (start != 0 && start_time(pid) == Some(start)).then_some(pid)
}
