//! RDMA data plane of dcmigrate, on the `sideway` verbs bindings (libibverbs
//! is loaded at run time: a host without it gets an error, not a crash).
//!
//! - [`Device`]: an opened RDMA device with an active port and a protection
//!   domain; registers memory ([`Region`]) for local reads and remote writes.
//! - [`QueuePair`]: a reliable-connected queue pair with its own completion
//!   queue and completion channel (waited on with tokio). Endpoints
//!   ([`Endpoint`]) are exchanged by the caller over its own authenticated
//!   channel; pages go as RDMA WRITEs of contiguous runs, and a zero-length
//!   WRITE_WITH_IMM closes a batch: its receive completion at the target
//!   means every earlier write on that queue pair is in the target's memory
//!   (RC ordering), so the target learns what completed without scanning.
//!
//! Completions are polled with plain `ibv_poll_cq` (the extended polling API
//! returned duplicate completions on rxe with rdma-core 44).

mod attrs;
mod device;
mod events;
mod qp;

pub use attrs::{qp_attrs, Link, PathMtu, PortInfo, QpAttrs, QpOptions, MAX_SERVICE_LEVEL};
pub use device::{gid_is_ipv4, gid_of_ip, Device, DeviceCaps, OnDemandPaging, Region, RemoteRegion, SourceGid};
pub use events::{DeviceEvent, DeviceEvents};
pub use qp::{Completion, CompletionKind, Endpoint, QueuePair, Write, ENDPOINT_LEN};

use thiserror::Error;

#[derive(Debug, Error)]
pub enum RdmaError {
    /// No usable device: libibverbs missing, no device, or no active port.
    #[error("RDMA unavailable: {0}")]
    Unavailable(String),
    #[error("{op}: {msg}")]
    Verbs { op: &'static str, msg: String },
    /// Options or ports that cannot make a queue pair.
    #[error("queue pair settings: {0}")]
    Config(String),
    #[error("invalid endpoint: {0}")]
    Endpoint(String),
    #[error("work request {wr_id} failed: {status}")]
    WorkRequest { wr_id: u64, status: String },
}

/// Formats an error with its chain of sources (sideway's outer messages are generic).
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
