//! RDMA data plane (built with the `rdma` feature; the `rdma/` crate does
//! the verbs). Guest RAM is registered on every host involved: a
//! destination's for remote writes, a sender's (source or forwarder) for
//! local reads. Region addresses and keys travel only in control messages
//! (mTLS). Each stream is a queue pair paired through a data-plane TCP
//! connection, which authenticates with the session token like a TCP stream
//! and then carries only the destination's acknowledgements:
//!
//! ```text
//! sender -> receiver:  hello(token, sender, mode = Rdma)
//! receiver -> sender:  status (Ok, or NoRdma)
//! sender -> receiver:  endpoint [32] (qpn, psn, lid, gid)
//! receiver -> sender:  endpoint [32]        (both queue pairs now connected)
//! sender ==WRITE_WITH_IMM(0), empty==> receiver          (the probe)
//! receiver -> sender:  reply Applied{0}      (RDMA traffic gets through)
//! sender ==RDMA WRITE (page runs), WRITE_WITH_IMM(seq)==> receiver's RAM
//! receiver -> sender:  reply Applied{seq}    (on the WRITE_WITH_IMM's receive completion)
//! ```
//! A destination fences a sender by moving its queue pairs to the error
//! state before the fence is confirmed; the TCP connection closing tells the
//! sender, which errors its own queue pairs and fails what was in flight.
//!
//! A queue pair that fails is replaced within its stream:
//! ```text
//! sender:               write completion in error  | receiver -> sender: Rejected{QueuePairFailed}
//! sender:               queue pair -> ERROR, shutdown(write) on the pairing connection
//! receiver:             sees the close: queue pair -> ERROR, closes    (the fence)
//! sender:               sees the close; pairs anew (hello, endpoints, probe)
//! sender ==the batches that were in flight, then new ones==> receiver's RAM
//! ```

/// The queue-pair endpoint version this build reads: 1 carries the port's
/// active MTU, so that both ends use the smaller (0 did not: 1024).
pub const ENDPOINT_VERSION: u8 = 1;

/// The operator's RDMA settings (agent options).
#[derive(Clone, Debug, Default)]
pub struct RdmaOptions {
    /// Device to use (default: the first with an active port).
    pub device: Option<String>,
    /// GID index to use on RoCE (default: the port's best RoCEv2 GID).
    pub gid_index: Option<u8>,
    /// Traffic class of the GRH (RoCE: DSCP << 2 | ECN).
    pub traffic_class: u8,
    /// InfiniBand service level (0–15).
    pub service_level: u8,
    /// P_Key index.
    pub pkey_index: u16,
    /// Threads that fault RAM in before registration (default: one per
    /// core; 1: none, pinning faults it in).
    pub register_threads: Option<usize>,
    /// Register RAM with on-demand paging instead of pinning it.
    pub on_demand: bool,
}

/// What is wrong with this process's locked-memory limit for RDMA, if
/// anything: registering guest RAM pins all of it, which the kernel allows
/// beyond RLIMIT_MEMLOCK only with CAP_IPC_LOCK (root has it).
pub fn memlock_problem() -> Option<String> {
    memlock_note(memlock_limit(), false)
}

/// The locked-memory limit that binds this process, in bytes: None if it
/// is unlimited or the process has CAP_IPC_LOCK.
pub(crate) fn memlock_limit() -> Option<u64> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes into the struct we own.
    let limit = match unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim) } {
        0 if lim.rlim_cur == libc::RLIM_INFINITY => None,
        0 => Some(lim.rlim_cur),
        _ => None,
    };
    limit.filter(|_| !has_cap_ipc_lock())
}

/// Memory this process has pinned (VmPin), in bytes.
pub fn pinned_now() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib =
        status.lines().find_map(|l| l.strip_prefix("VmPin:")).and_then(|v| v.split_whitespace().next()?.parse().ok());
    kib.unwrap_or(0u64) << 10
}

/// Whether CAP_IPC_LOCK is in this process's effective set.
fn has_cap_ipc_lock() -> bool {
    const CAP_IPC_LOCK: u32 = 14;
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("CapEff:").map(|v| v.trim().to_owned())))
        .and_then(|v| u64::from_str_radix(&v, 16).ok())
        .is_some_and(|caps| caps & (1 << CAP_IPC_LOCK) != 0)
}

/// The warning for a locked-memory `limit` in bytes (None: unlimited).
fn memlock_note(limit: Option<u64>, cap_ipc_lock: bool) -> Option<String> {
    let limit = limit?;
    (!cap_ipc_lock).then(|| {
        format!(
            "the locked-memory limit is {} KiB and the agent lacks CAP_IPC_LOCK: registering a guest's RAM for \
             RDMA pins all of it, so RAM larger than that cannot use RDMA (`auto` then uses TCP); raise it \
             (`ulimit -l unlimited`, systemd `LimitMEMLOCK=infinity`) or grant CAP_IPC_LOCK",
            limit >> 10
        )
    })
}

#[cfg(test)]
mod tests {
    use super::memlock_note;

    #[test]
    fn memlock_warning_only_when_it_binds() {
        assert_eq!(memlock_note(None, false), None, "unlimited");
        assert_eq!(memlock_note(Some(64 << 10), true), None, "CAP_IPC_LOCK ignores the limit");
        let w = memlock_note(Some(64 << 10), false).unwrap();
        assert!(w.contains("64 KiB") && w.contains("LimitMEMLOCK"), "{w}");
    }
}

#[cfg(feature = "rdma")]
mod device;
#[cfg(feature = "rdma")]
mod receive;
#[cfg(feature = "rdma")]
mod send;
#[cfg(feature = "rdma")]
pub use {
    device::{open, LocalRam, Rdma, Target},
    receive::serve,
    send::connect,
};
#[cfg(not(feature = "rdma"))]
mod off;
#[cfg(not(feature = "rdma"))]
pub use off::{connect, open, serve, LocalRam, Rdma, Target};
