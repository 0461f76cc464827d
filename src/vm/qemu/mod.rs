//! Stock QEMU as a VM backend. The guest's RAM lives in shared memory
//! backends (`memory-backend-file,share=on` or `memory-backend-memfd,share=on`)
//! that the agent maps and copies itself; at switchover QEMU's own migration
//! moves only the device state, with `x-ignore-shared` on both sides, through
//! a unix socket the agent reads on the source and writes on the destination
//! (so the bytes travel over the agents' authenticated channel, and QEMU never
//! needs a network path to the other host).
//!
//! ```text
//!  source agent                  QEMU (source)        agent (dest)          QEMU (dest, -incoming defer -S)
//!  attach: query-memdev ──────────▶ ids, sizes, paths
//!                                                       launch with the RAM ──▶ maps pre-created files
//!  RAM rounds (agent ──▶ agent, written into the mapped files)
//!  stop ──────────────────────────▶ paused
//!  final round, verification
//!  x-ignore-shared, migrate unix: ▶ device state ──▶ bytes ──▶ migrate-incoming, feed ──▶ paused
//!                                                       cont ──────────────────▶ running
//!  quit ──────────────────────────▶ exits
//! ```
//!
//! A VM travels as a typed [`Description`], never as a command line:
//!
//! - source: [`source`] attaches a running QEMU; [`launch`] reads its
//!   command line and [`describe`] turns it into a description, with
//!   [`allow`] saying what may be in one;
//! - destination: [`description`] checks a peer's description again,
//!   [`confine`] opens the files it names beneath storage ([`qcow2`]: an
//!   image's chain), [`network`] maps its networks, [`command`] builds the
//!   command line, [`user`] and [`spawn`] run QEMU as its own user in its
//!   own cgroup, and [`incoming`] is the paused QEMU until it commits;
//! - [`dirty_log`]: the `qemu` tracker (a patched QEMU's own dirty log).

pub mod allow;
pub mod command;
pub mod confine;
pub mod describe;
pub mod description;
pub mod dirty_log;
pub mod incoming;
pub mod launch;
pub mod network;
pub mod qcow2;
pub mod source;
pub mod spawn;
pub mod user;

pub use describe::{describe, DescribeError, SpecError};
pub use description::{Description, DescriptionError};
pub use incoming::{clean_leftovers, QemuIncoming};
pub use launch::{launch_from_process, strip_control};
pub use source::{attach, QemuVm};
pub use user::{QemuUser, RunAs, UserError};

use super::VmError;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How long one QMP command may take.
const QMP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long QEMU may take to send or load the device state.
const DEVICE_STATE_TIMEOUT: Duration = Duration::from_secs(120);

fn vm_err(msg: impl Into<String>) -> VmError {
    VmError::Launch(msg.into())
}

/// The memory options QEMU needs for dcmigrate, for error messages.
pub const HOW_TO_SHARE: &str = "start QEMU with its RAM in a shared backend, for example \
    `-object memory-backend-file,id=ram0,size=4G,mem-path=/dev/shm/vm-ram0,share=on -machine memory-backend=ram0` \
    (or memory-backend-memfd,share=on; -numa node,memdev=ID for several)";

/// A memory backend id that can name a file.
pub fn valid_id(id: &str) -> bool {
    super::valid_name(id)
}

/// The per-VM directory on a destination (`{dir}` in launch specs).
pub fn vm_dir(data_dir: &Path, vm: &str) -> PathBuf {
    data_dir.join(format!("{vm}.qemu"))
}

/// The RAM file of memory backend `id` in a VM's directory.
pub fn ram_path(dir: &Path, id: &str) -> PathBuf {
    dir.join(format!("{id}.ram"))
}

/// The process exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| s.rsplit_once(')').is_some_and(|(_, r)| !r.trim_start().starts_with('Z')))
}

/// Waits for a process to end (or become a zombie), up to `timeout`.
fn wait_exit(pid: u32, timeout: Duration) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if !alive(pid) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

fn kill(pid: u32) {
    // SAFETY: a signal to a pid we launched or were given.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
}
