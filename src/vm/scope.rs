//! Incoming VM processes in a systemd scope of their own (`--qemu-scope`):
//! under systemd, a VM the agent starts must not live in the agent's
//! service, or restarting the service would stop it. `systemd-run --scope`
//! asks systemd for a transient scope unit holding its own PID and then
//! execs the command, so the child's PID stays the VM's: waiting for it,
//! signalling it and reading its `/proc` entry work as without the scope.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;
use thiserror::Error;

/// The slice VM scopes go in (systemd's own for VMs and containers).
pub(crate) const SLICE: &str = "machine.slice";

/// Whether incoming VMs get a scope (`--qemu-scope`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScopeMode {
    /// When the agent runs under systemd (`INVOCATION_ID` is set and
    /// systemd is the init system).
    #[default]
    Auto,
    /// Always (the agent refuses to start without `systemd-run`).
    On,
    /// Never: VMs are the agent's plain children.
    Off,
}

/// `--qemu-scope on` cannot be honoured.
#[derive(Debug, Error)]
#[error("--qemu-scope on: systemd-run was not found in PATH")]
pub struct ScopeError;

/// How incoming VM processes are started in scopes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scope {
    /// `systemd-run`'s path.
    pub systemd_run: PathBuf,
    /// The slice the scopes go in.
    pub slice: String,
}

impl ScopeMode {
    /// The scope to start VMs in, decided once when the agent starts.
    pub fn resolve(self) -> Result<Option<Scope>, ScopeError> {
        let under_systemd = std::env::var_os("INVOCATION_ID").is_some() && Path::new("/run/systemd/system").is_dir();
        let want = match self {
            ScopeMode::Off => return Ok(None),
            ScopeMode::On => true,
            ScopeMode::Auto => under_systemd,
        };
        let found = find_in_path("systemd-run");
        match (want, found) {
            (false, _) => Ok(None),
            (true, Some(systemd_run)) => Ok(Some(Scope { systemd_run, slice: SLICE.to_owned() })),
            (true, None) if self == ScopeMode::On => Err(ScopeError),
            (true, None) => {
                tracing::warn!("running under systemd but systemd-run is missing: VMs stay in the agent's service");
                Ok(None)
            }
        }
    }
}

fn find_in_path(exe: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into());
    std::env::split_paths(&path).map(|d| d.join(exe)).find(|p| p.is_file())
}

/// The transient unit's name: the VM's (a valid name is a valid unit name
/// part) and a random suffix, since a VM may come back to this host while
/// its last scope is still being collected.
pub(crate) fn unit_name(vm: &str) -> String {
    format!("dcmigrate-qemu-{vm}-{:08x}.scope", rand::random::<u32>())
}

/// A command that runs `program` for `vm`: directly, or through
/// `systemd-run --scope` (which execs it: same PID). `as_user` is the
/// (uid, gid) the VM runs as: in a scope systemd-run switches to them
/// after the scope is made (it must ask systemd as root); the caller still
/// sets the supplementary groups before the exec.
///
/// In a scope, `limits` become the scope's `MemoryMax` and `TasksMax`
/// (systemd owns the cgroup); without one the caller makes a cgroup.
pub(crate) fn command(
    program: &OsStr,
    vm: &str,
    scope: Option<&Scope>,
    as_user: Option<(u32, u32)>,
    limits: Option<crate::vm::cgroup::Limits>,
) -> Command {
    let Some(s) = scope else {
        return Command::new(program);
    };
    let mut cmd = Command::new(&s.systemd_run);
    cmd.args(["--scope", "--collect", "--quiet"])
        .arg(format!("--unit={}", unit_name(vm)))
        .arg(format!("--slice={}", s.slice))
        .arg(format!("--description=dcmigrate VM {vm}"));
    if let Some((uid, gid)) = as_user {
        cmd.arg(format!("--uid={uid}")).arg(format!("--gid={gid}"));
    }
    if let Some(l) = limits {
        cmd.arg(format!("--property=MemoryMax={}", l.memory)).arg(format!("--property=TasksMax={}", l.pids));
    }
    cmd.arg("--").arg(program);
    cmd
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(c: &Command) -> Vec<String> {
        std::iter::once(c.get_program()).chain(c.get_args()).map(|a| a.to_string_lossy().into_owned()).collect()
    }

    #[test]
    fn without_a_scope_the_program_runs_itself() {
        let c = command(OsStr::new("/usr/bin/qemu-system-x86_64"), "vm1", None, Some((64, 64)), None);
        assert_eq!(argv(&c), ["/usr/bin/qemu-system-x86_64"]);
    }

    #[test]
    fn in_a_scope_systemd_run_execs_the_program() {
        let s = Scope { systemd_run: "/usr/bin/systemd-run".into(), slice: SLICE.into() };
        let c = command(OsStr::new("/usr/bin/qemu-system-x86_64"), "vm-1.a", Some(&s), None, None);
        let a = argv(&c);
        assert_eq!(a[..4], ["/usr/bin/systemd-run", "--scope", "--collect", "--quiet"]);
        let unit = a[4].strip_prefix("--unit=dcmigrate-qemu-vm-1.a-").unwrap();
        let hex = unit.strip_suffix(".scope").unwrap();
        assert!(hex.len() == 8 && hex.chars().all(|c| c.is_ascii_hexdigit()), "{unit}");
        assert_eq!(
            a[5..],
            ["--slice=machine.slice", "--description=dcmigrate VM vm-1.a", "--", "/usr/bin/qemu-system-x86_64"]
        );
        // The caller's arguments follow the program.
        let mut c = c;
        c.arg("-S");
        assert_eq!(argv(&c).last().unwrap(), "-S");
    }

    #[test]
    fn in_a_scope_systemd_run_switches_user() {
        let s = Scope { systemd_run: "/usr/bin/systemd-run".into(), slice: "test.slice".into() };
        let limits = crate::vm::cgroup::Limits { memory: 1 << 30, pids: 64 };
        let a = argv(&command(OsStr::new("qemu"), "vm1", Some(&s), Some((1001, 1002)), Some(limits)));
        assert_eq!(
            a[5..],
            [
                "--slice=test.slice",
                "--description=dcmigrate VM vm1",
                "--uid=1001",
                "--gid=1002",
                "--property=MemoryMax=1073741824",
                "--property=TasksMax=64",
                "--",
                "qemu"
            ]
        );
    }

    #[test]
    fn off_is_off() {
        assert_eq!(ScopeMode::Off.resolve().unwrap(), None);
    }
}
