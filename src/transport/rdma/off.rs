//! What a build without the `rdma` feature offers: nothing, with a reason.

use super::RdmaOptions;
use crate::memory::GuestRam;
use crate::protocol::RdmaRegion;
use crate::transport::queue::{SendQueue, StreamSpec};
use crate::transport::secure::DataStream;
use crate::transport::{Stop, TransportError};
use std::sync::Arc;

const WHY: &str = "this dcmigrate was built without the `rdma` feature";

/// This host's RDMA device (none in this build).
pub enum Rdma {}
/// A destination's registered RAM (none in this build).
pub enum Target {}
/// RAM registered for a sender (none in this build).
pub enum LocalRam {}

/// Always fails: this build has no RDMA.
pub fn open(_opts: &RdmaOptions) -> Result<Arc<Rdma>, String> {
    Err(WHY.into())
}

impl Rdma {
    /// The device's name.
    pub fn name(&self) -> String {
        match *self {}
    }
    /// What limits its use on this host.
    pub fn warning(&self) -> Option<String> {
        match *self {}
    }
    /// Whether `host`'s last session offered RDMA.
    pub fn offered_last_time(&self, _host: &str) -> bool {
        match *self {}
    }
    /// Remembers whether `host`'s session offered RDMA.
    pub fn note_offer(&self, _host: &str, _offered: bool) {
        match *self {}
    }
    /// Registers a sender's RAM for local reads.
    pub fn register_sender(&self, _ram: &Arc<GuestRam>) -> Result<Arc<LocalRam>, String> {
        match *self {}
    }
    /// Registers a destination's RAM for remote writes.
    pub fn register_target(&self, _ram: &Arc<GuestRam>, _slices: bool) -> Result<Arc<Target>, String> {
        match *self {}
    }
}

impl Target {
    /// What senders need to write into it.
    pub fn offer(&self) -> Vec<RdmaRegion> {
        match *self {}
    }
    /// Registers the RAM again for a forwarder.
    pub fn add_sender(&self, _sender: u8) -> Result<Vec<RdmaRegion>, String> {
        match *self {}
    }
    /// Deregisters a forwarder's keys.
    pub fn revoke(&self, _sender: u8) {
        match *self {}
    }
    /// Deregisters every forwarder's keys.
    pub fn revoke_all(&self) {
        match *self {}
    }
}

/// Opens the sender's queue pairs.
pub async fn connect(
    rdma: &Arc<Rdma>,
    _spec: StreamSpec,
    _remote: &[RdmaRegion],
    _endpoint_version: u8,
    _tcp_fallback: bool,
) -> Result<SendQueue, TransportError> {
    match **rdma {}
}

/// Serves one RDMA stream at a destination.
pub async fn serve(
    target: &Target,
    _s: DataStream,
    _stop: Stop,
    _local: Option<std::net::IpAddr>,
) -> Result<(), TransportError> {
    match *target {}
}
