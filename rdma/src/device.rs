//! Opening a device and registering memory.

use crate::{chain, RdmaError};
use serde::{Deserialize, Serialize};
use sideway::ibverbs::address::{Gid, GidType};
use sideway::ibverbs::device::{DeviceInfo, DeviceList};
use sideway::ibverbs::device_context::{DeviceContext, LinkLayer, PortState};
use sideway::ibverbs::memory_region::MemoryRegion;
use sideway::ibverbs::protection_domain::ProtectionDomain;
use sideway::ibverbs::AccessFlags;
use std::sync::Arc;

/// An RDMA device with an active port, opened once per process.
pub struct Device {
    pub(crate) ctx: Arc<DeviceContext>,
    pub(crate) pd: Arc<ProtectionDomain>,
    pub(crate) port: u8,
    pub(crate) gid_index: u8,
    pub(crate) gid: Gid,
    pub(crate) lid: u16,
    name: String,
}

impl Device {
    /// Opens `name`, or the first device with an active port.
    pub fn open(name: Option<&str>) -> Result<Arc<Device>, RdmaError> {
        let un = |m: String| RdmaError::Unavailable(m);
        let list = DeviceList::new()
            .map_err(|e| un(format!("cannot list devices (no rdma-core, or no RDMA in the kernel): {}", chain(&e))))?;
        let mut why = Vec::new();
        for dev in list.iter() {
            let dname = dev.name();
            if name.is_some_and(|n| n != dname) {
                continue;
            }
            match Self::open_one(&dev, &dname) {
                Ok(d) => return Ok(Arc::new(d)),
                Err(e) => why.push(format!("{dname}: {e}")),
            }
        }
        Err(un(match (name, why.is_empty()) {
            (Some(n), true) => format!("no device named {n}"),
            (None, true) => "no RDMA device".into(),
            _ => why.join("; "),
        }))
    }

    fn open_one(dev: &sideway::ibverbs::device::Device<'_>, name: &str) -> Result<Device, String> {
        let ctx = dev.open().map_err(|e| chain(&e))?;
        let ports = ctx.query_device().map_err(|e| chain(&e))?.phys_port_cnt();
        for port in 1..=ports {
            let Ok(attr) = ctx.query_port(port) else { continue };
            if attr.port_state() != PortState::Active {
                continue;
            }
            let gid_index = if attr.link_layer() == LinkLayer::Ethernet {
                // RoCE: a RoCEv2 GID of the port, preferring one derived from an
                // IPv4 address, then a global IPv6 one; link-local last (its
                // address may still be tentative, and routes need it resolved).
                let table = ctx.query_gid_table().map_err(|e| chain(&e))?;
                let rank = |g: &[u8; 16]| match g {
                    [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, ..] => 0,
                    [0xfe, 0x80, ..] => 2,
                    _ => 1,
                };
                let best = table
                    .iter()
                    .filter(|e| e.port_num() == port as u32 && e.gid_type() == GidType::RoceV2 && !e.gid().is_zero())
                    .min_by_key(|e| rank(&e.gid().raw));
                let Some(e) = best else { continue };
                e.gid_index() as u8
            } else {
                0
            };
            let gid = ctx.query_gid(port, gid_index as u32).map_err(|e| chain(&e))?;
            let pd = ctx.alloc_pd().map_err(|e| chain(&e))?;
            return Ok(Device { ctx, pd, port, gid_index, gid, lid: attr.lid(), name: name.to_owned() });
        }
        Err("no active port with a usable GID".into())
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The same device with a protection domain of its own: memory and queue
    /// pairs of one session cannot reach another's, whatever rkey is tried.
    pub fn session(&self) -> Result<Arc<Device>, RdmaError> {
        let pd = self.ctx.alloc_pd().map_err(|e| RdmaError::Verbs { op: "ibv_alloc_pd", msg: chain(&e) })?;
        Ok(Arc::new(Device {
            ctx: self.ctx.clone(),
            pd,
            port: self.port,
            gid_index: self.gid_index,
            gid: self.gid,
            lid: self.lid,
            name: self.name.clone(),
        }))
    }

    /// Registers `len` bytes at `addr` for local reads and writes, and for
    /// remote writes if `remote_write`.
    ///
    /// # Safety
    /// The memory must stay mapped until the [`Region`] and every work
    /// request that uses it are gone.
    pub unsafe fn register(&self, addr: *mut u8, len: usize, remote_write: bool) -> Result<Region, RdmaError> {
        let mut access = AccessFlags::LocalWrite;
        if remote_write {
            access |= AccessFlags::RemoteWrite;
        }
        // SAFETY: forwarded to the caller's contract.
        let mr = unsafe { self.pd.reg_mr(addr as usize, len, access) }
            .map_err(|e| RdmaError::Verbs { op: "ibv_reg_mr", msg: chain(&e) })?;
        Ok(Region { mr })
    }
}

/// Registered memory.
pub struct Region {
    mr: Arc<MemoryRegion>,
}

impl Region {
    pub fn addr(&self) -> u64 {
        self.mr.get_ptr() as u64
    }
    pub fn len(&self) -> u64 {
        self.mr.region_len() as u64
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn lkey(&self) -> u32 {
        self.mr.lkey()
    }
    pub fn rkey(&self) -> u32 {
        self.mr.rkey()
    }
    /// What a remote writer needs (hand it out only over an authenticated channel).
    pub fn remote(&self) -> RemoteRegion {
        RemoteRegion { addr: self.addr(), len: self.len(), rkey: self.rkey() }
    }
}

/// A peer's registered memory, as it told us.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct RemoteRegion {
    pub addr: u64,
    pub len: u64,
    pub rkey: u32,
}
