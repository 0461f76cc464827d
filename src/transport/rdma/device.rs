//! This host's RDMA device, the guest RAM registered with it, and what
//! both ends of a stream share (endpoint exchange, queue-pair attributes).

use super::{memlock_problem, RdmaOptions};
use crate::memory::GuestRam;
use crate::protocol::RdmaRegion;
use crate::transport::handshake::HANDSHAKE_TIMEOUT;
use crate::transport::secure::DataStream;
use crate::transport::TransportError;
use dcmigrate_rdma::{qp_attrs, Device, Endpoint, PortInfo, QpAttrs, QpOptions, RdmaError, Region, ENDPOINT_LEN};
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub(super) fn rdma_err(e: RdmaError) -> TransportError {
    TransportError::Rdma(crate::error_chain(&e))
}

/// This host's RDMA device.
pub struct Rdma {
    pub(super) device: Arc<Device>,
    pub(super) qp: QpOptions,
    memlock: Option<String>,
}

/// Opens the configured device, or the first with an active port.
pub fn open(o: &RdmaOptions) -> Result<Arc<Rdma>, String> {
    let qp = QpOptions { traffic_class: o.traffic_class, service_level: o.service_level, pkey_index: o.pkey_index };
    if qp.service_level > dcmigrate_rdma::MAX_SERVICE_LEVEL {
        return Err(format!("service level {} is above {}", qp.service_level, dcmigrate_rdma::MAX_SERVICE_LEVEL));
    }
    Device::open(o.device.as_deref(), o.gid_index)
        .map(|device| Arc::new(Rdma { device, qp, memlock: memlock_problem() }))
        .map_err(|e| e.to_string())
}

impl Rdma {
    /// The device's name.
    pub fn name(&self) -> String {
        self.device.name().to_owned()
    }

    /// What limits its use on this host (the locked-memory limit).
    pub fn warning(&self) -> Option<String> {
        self.memlock.clone()
    }

    /// Registers a destination's RAM for remote writes.
    pub fn register_target(&self, ram: &Arc<GuestRam>) -> Result<Arc<Target>, String> {
        // A protection domain per session: another session's queue pairs cannot write here.
        let device = self.device.session().map_err(|e| e.to_string())?;
        Ok(Arc::new(Target { regions: register(&device, ram, true)?, device, qp: self.qp, _ram: ram.clone() }))
    }
}

pub(super) fn register(device: &Device, ram: &GuestRam, remote_write: bool) -> Result<Vec<Region>, String> {
    (0..ram.layout().regions().len() as u32)
        .map(|r| {
            let (ptr, len) = ram.region_raw(r).ok_or("no such region")?;
            // SAFETY: the mapping lives as long as `ram`, which every
            // holder of these regions also holds (and drops after them).
            unsafe { device.register(ptr, len, remote_write) }.map_err(|e| e.to_string())
        })
        .collect()
}

/// A destination's registered RAM.
pub struct Target {
    pub(super) device: Arc<Device>,
    pub(super) qp: QpOptions,
    // Before `_ram`: the registrations go first.
    regions: Vec<Region>,
    _ram: Arc<GuestRam>,
}

impl Target {
    /// What senders need to write into it.
    pub fn offer(&self) -> Vec<RdmaRegion> {
        self.regions.iter().map(|r| RdmaRegion { addr: r.addr(), len: r.len(), rkey: r.rkey() }).collect()
    }
}

/// Reads the peer's endpoint from the pairing connection.
pub(super) async fn read_endpoint(s: &mut DataStream) -> Result<Endpoint, TransportError> {
    let mut ep = [0u8; ENDPOINT_LEN];
    tokio::time::timeout(HANDSHAKE_TIMEOUT, s.read_exact(&mut ep))
        .await
        .map_err(|_| TransportError::Timeout { what: "the peer's queue pair endpoint" })?
        .map_err(|source| TransportError::Io { what: "reading a queue pair endpoint", source })?;
    Endpoint::decode(&ep).map_err(rdma_err)
}

pub(super) async fn write_endpoint(s: &mut DataStream, ep: Endpoint) -> Result<(), TransportError> {
    let io = |source| TransportError::Io { what: "sending a queue pair endpoint", source };
    s.write_all(&ep.encode()).await.map_err(io)?;
    s.flush().await.map_err(io)
}

/// The attributes for a queue pair from `port` to `remote`.
pub(super) fn attrs(port: &PortInfo, remote: &Endpoint, opts: &QpOptions) -> Result<QpAttrs, TransportError> {
    qp_attrs(port, remote.mtu, remote.gid == [0; 16], opts).map_err(rdma_err)
}

/// True the first time it is called on `flag` in this process.
pub(super) fn first_time(flag: &std::sync::atomic::AtomicBool) -> bool {
    !flag.swap(true, std::sync::atomic::Ordering::Relaxed)
}
