//! Freezing every thread of another process for a moment, with ptrace
//! (`PTRACE_SEIZE` + `PTRACE_INTERRUPT`, as CRIU does), and letting it go.
//!
//! Unlike SIGSTOP/SIGCONT it has no job-control side effects and keeps the
//! process's own state: a process an operator had stopped stays stopped
//! after the thaw, and if the freezer dies (the agent is killed) the kernel
//! detaches it and the process runs on. All ptrace calls must come from the
//! thread that seized, so a [`Frozen`] lives within one call on one thread.

use super::DirtyError;
use std::time::{Duration, Instant};

fn err(msg: String) -> DirtyError {
    DirtyError::Log { path: "ptrace freeze".into(), msg }
}

/// Every thread of a process, stopped by ptrace until this is dropped.
pub(crate) struct Frozen {
    tids: Vec<libc::pid_t>,
    /// When the first thread was stopped.
    since: Instant,
}

fn ptrace(req: libc::c_uint, tid: libc::pid_t) -> std::io::Result<()> {
    // SAFETY: ptrace requests that take no address or data pointer.
    match unsafe { libc::ptrace(req, tid, 0usize, 0usize) } {
        -1 => Err(std::io::Error::last_os_error()),
        _ => Ok(()),
    }
}

fn tasks(pid: u32) -> Result<Vec<libc::pid_t>, DirtyError> {
    let dir = std::fs::read_dir(format!("/proc/{pid}/task")).map_err(|e| err(format!("pid {pid}: {e}")))?;
    Ok(dir.flatten().filter_map(|e| e.file_name().to_str()?.parse().ok()).collect())
}

/// Waits until `tid` reports its ptrace stop; false if it exited.
fn wait_stop(tid: libc::pid_t, end: Instant) -> Result<bool, DirtyError> {
    loop {
        let mut status = 0;
        // SAFETY: waitpid writes the status into our variable.
        let r = unsafe { libc::waitpid(tid, &mut status, libc::__WALL | libc::WNOHANG) };
        match r {
            0 if Instant::now() < end => std::thread::sleep(Duration::from_micros(100)),
            0 => return Err(err(format!("thread {tid} did not stop in time"))),
            r if r == tid && libc::WIFSTOPPED(status) => return Ok(true),
            r if r == tid => return Ok(false),
            _ => return Err(err(format!("waiting for thread {tid}: {}", std::io::Error::last_os_error()))),
        }
    }
}

impl Frozen {
    /// Stops every thread of `pid` (threads started meanwhile too), within `timeout`.
    pub(crate) fn new(pid: u32, timeout: Duration) -> Result<Self, DirtyError> {
        let end = Instant::now() + timeout;
        let mut f = Frozen { tids: vec![], since: Instant::now() };
        // Until a listing shows no thread we have not stopped: a running
        // thread may start another one while we work.
        loop {
            let new: Vec<_> = tasks(pid)?.into_iter().filter(|t| !f.tids.contains(t)).collect();
            if new.is_empty() {
                return Ok(f);
            }
            for tid in new {
                match ptrace(libc::PTRACE_SEIZE, tid) {
                    Ok(()) => f.tids.push(tid),
                    // The thread exited meanwhile.
                    Err(e) if e.raw_os_error() == Some(libc::ESRCH) => continue,
                    Err(e) => return Err(err(format!("seizing thread {tid} of {pid} (traced by someone else?): {e}"))),
                }
                match ptrace(libc::PTRACE_INTERRUPT, tid) {
                    Ok(()) => {}
                    Err(e) if e.raw_os_error() == Some(libc::ESRCH) => continue,
                    Err(e) => return Err(err(format!("stopping thread {tid} of {pid}: {e}"))),
                }
                if !wait_stop(tid, end)? {
                    f.tids.retain(|&t| t != tid);
                }
            }
        }
    }

    /// How long the process has been frozen.
    pub(crate) fn elapsed(&self) -> Duration {
        self.since.elapsed()
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        for &tid in &self.tids {
            // Detaching lets the thread go on as before (a thread the
            // operator had stopped stays stopped); one that exited is gone.
            let _ = ptrace(libc::PTRACE_DETACH, tid);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn state(pid: u32) -> char {
        let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        s.rsplit_once(')').unwrap().1.trim_start().chars().next().unwrap()
    }

    /// A busy child process is stopped while frozen and runs again after;
    /// one that was stopped (SIGSTOP) before stays stopped after.
    #[test]
    fn freezes_and_thaws_without_changing_the_process_state() {
        let mut child = Command::new("sh").args(["-c", "while :; do :; done"]).spawn().unwrap();
        let pid = child.id();
        {
            let _f = Frozen::new(pid, Duration::from_secs(5)).expect("freeze");
            assert!(matches!(state(pid), 't' | 'T'), "frozen");
        }
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(state(pid), 'R', "running again after the thaw");
        // SAFETY: signals to our own child.
        unsafe { libc::kill(pid as i32, libc::SIGSTOP) };
        std::thread::sleep(Duration::from_millis(50));
        drop(Frozen::new(pid, Duration::from_secs(5)).expect("freeze a stopped process"));
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(state(pid), 'T', "an operator's stop survives the freeze");
        let _ = child.kill();
        let _ = child.wait();
    }
}
