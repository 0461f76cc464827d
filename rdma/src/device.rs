//! Opening a device and registering memory.

use crate::{chain, Link, PathMtu, PortInfo, RdmaError};
use serde::{Deserialize, Serialize};
use sideway::ibverbs::address::{Gid, GidType};
use sideway::ibverbs::device::{DeviceInfo, DeviceList};
use sideway::ibverbs::device_context::{DeviceContext, LinkLayer, Mtu, PortState};
use sideway::ibverbs::memory_region::MemoryRegion;
use sideway::ibverbs::protection_domain::ProtectionDomain;
use sideway::ibverbs::AccessFlags;
use std::net::IpAddr;
use std::sync::Arc;

/// An RDMA device with an active port, opened once per process.
pub struct Device {
    pub(crate) ctx: Arc<DeviceContext>,
    pub(crate) pd: Arc<ProtectionDomain>,
    pub(crate) port: u8,
    pub(crate) gid_index: u8,
    pub(crate) gid: Gid,
    pub(crate) lid: u16,
    link: Link,
    name: String,
}

/// A GID of the device's port, by index: the source address of a queue
/// pair's packets (RoCE) or its global identifier (InfiniBand).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SourceGid {
    /// Its index in the port's GID table.
    pub index: u8,
    /// Its value.
    pub gid: [u8; 16],
}

/// The GID that RoCE derives from an IP address (IPv4 as `::ffff:a.b.c.d`).
pub fn gid_of_ip(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
        IpAddr::V6(a) => a.octets(),
    }
}

/// Whether a RoCE GID stands for an IPv4 address: both ends of a queue
/// pair must agree (RoCEv2 routes IPv4 or IPv6 packets, not between).
pub fn gid_is_ipv4(gid: &[u8; 16]) -> bool {
    gid[..12] == [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff]
}

/// What a device can page on demand (reliable-connected transport).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OnDemandPaging {
    /// A sender's RAM (the source of RDMA writes) need not be pinned.
    pub sender: bool,
    /// A destination's RAM (the target of RDMA writes) need not be pinned.
    pub receiver: bool,
    /// The raw capabilities: general, and reliable-connected.
    pub caps: (u64, u32),
}

/// Limits of a device that size queues.
#[derive(Clone, Copy, Debug)]
pub struct DeviceCaps {
    /// Work requests a queue pair's queue may hold.
    pub max_qp_wr: u32,
    /// Entries a completion queue may hold.
    pub max_cqe: u32,
}

impl Device {
    /// Opens `name`, or the first device with an active port; on RoCE,
    /// GID `gid_index` if given, else the port's best RoCEv2 GID.
    pub fn open(name: Option<&str>, gid_index: Option<u8>) -> Result<Arc<Device>, RdmaError> {
        let un = |m: String| RdmaError::Unavailable(m);
        let list = DeviceList::new()
            .map_err(|e| un(format!("cannot list devices (no rdma-core, or no RDMA in the kernel): {}", chain(&e))))?;
        let mut why = Vec::new();
        for dev in list.iter() {
            let dname = dev.name();
            if name.is_some_and(|n| n != dname) {
                continue;
            }
            match Self::open_one(&dev, &dname, gid_index) {
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

    fn open_one(dev: &sideway::ibverbs::device::Device<'_>, name: &str, want: Option<u8>) -> Result<Device, String> {
        let ctx = dev.open().map_err(|e| chain(&e))?;
        let ports = ctx.query_device().map_err(|e| chain(&e))?.phys_port_cnt();
        for port in 1..=ports {
            let Ok(attr) = ctx.query_port(port) else { continue };
            if attr.port_state() != PortState::Active {
                continue;
            }
            let link = if attr.link_layer() == LinkLayer::Ethernet { Link::Ethernet } else { Link::InfiniBand };
            let gid_index = if let Some(i) = want {
                i
            } else if link == Link::Ethernet {
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
            if gid.is_zero() && link == Link::Ethernet {
                return Err(format!("GID {gid_index} of port {port} is empty"));
            }
            return Ok(Device { ctx, pd, port, gid_index, gid, lid: attr.lid(), link, name: name.to_owned() });
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
            link: self.link,
            name: self.name.clone(),
        }))
    }

    /// The GID chosen when it was opened (configured, or the port's best
    /// RoCEv2 GID).
    pub fn default_gid(&self) -> SourceGid {
        SourceGid { index: self.gid_index, gid: self.gid.raw }
    }

    /// The port's RoCEv2 GID for `ip`, asked now (addresses come and go):
    /// the kernel keeps one per address of the port's netdev, so there is
    /// one exactly when `ip` is on that netdev. None on InfiniBand.
    pub fn gid_for(&self, ip: IpAddr) -> Result<Option<SourceGid>, RdmaError> {
        if self.link != Link::Ethernet {
            return Ok(None);
        }
        let want = gid_of_ip(ip);
        self.find_roce_v2(|g| *g == want)
    }

    /// The port's first RoCEv2 GID of an IPv4 address, or of an IPv6 one.
    pub fn gid_of_family(&self, ipv4: bool) -> Result<Option<SourceGid>, RdmaError> {
        if self.link != Link::Ethernet {
            return Ok(None);
        }
        self.find_roce_v2(|g| gid_is_ipv4(g) == ipv4 && *g != [0; 16])
    }

    fn find_roce_v2(&self, want: impl Fn(&[u8; 16]) -> bool) -> Result<Option<SourceGid>, RdmaError> {
        let table =
            self.ctx.query_gid_table().map_err(|e| RdmaError::Verbs { op: "ibv_query_gid_table", msg: chain(&e) })?;
        Ok(table
            .iter()
            .filter(|e| e.port_num() == self.port as u32 && e.gid_type() == GidType::RoceV2)
            .filter(|e| want(&e.gid().raw))
            .find_map(|e| Some(SourceGid { index: u8::try_from(e.gid_index()).ok()?, gid: e.gid().raw })))
    }

    /// Whether its port is active now.
    pub fn port_active(&self) -> Result<bool, RdmaError> {
        let attr =
            self.ctx.query_port(self.port).map_err(|e| RdmaError::Verbs { op: "ibv_query_port", msg: chain(&e) })?;
        Ok(attr.port_state() == PortState::Active)
    }

    /// The port it uses.
    pub fn port(&self) -> u8 {
        self.port
    }

    /// The GID index it uses.
    pub fn gid_index(&self) -> u8 {
        self.gid_index
    }

    /// The port's link layer and active MTU, asked now (an operator may
    /// have changed the netdev's MTU since the device was opened).
    pub fn port_info(&self) -> Result<PortInfo, RdmaError> {
        let attr =
            self.ctx.query_port(self.port).map_err(|e| RdmaError::Verbs { op: "ibv_query_port", msg: chain(&e) })?;
        let active_mtu = match attr.active_mtu() {
            Mtu::Mtu256 => PathMtu::M256,
            Mtu::Mtu512 => PathMtu::M512,
            Mtu::Mtu1024 => PathMtu::M1024,
            Mtu::Mtu2048 => PathMtu::M2048,
            Mtu::Mtu4096 => PathMtu::M4096,
        };
        Ok(PortInfo { link: self.link, active_mtu })
    }

    /// Its queue limits.
    pub fn caps(&self) -> Result<DeviceCaps, RdmaError> {
        let a = self.ctx.query_device().map_err(|e| RdmaError::Verbs { op: "ibv_query_device", msg: chain(&e) })?;
        Ok(DeviceCaps { max_qp_wr: a.max_qp_wr().max(1) as u32, max_cqe: a.max_cqe().max(1) as u32 })
    }

    /// On-demand paging for reliable-connected queue pairs, as the device
    /// reports it: whether its memory can be the source of RDMA writes (a
    /// sender's) and their target (a destination's) without being pinned.
    pub fn on_demand_paging(&self) -> Result<OnDemandPaging, RdmaError> {
        use rdma_mummy_sys::{ibv_odp_general_caps, ibv_odp_transport_cap_bits as bits};
        let a = self.ctx.query_device().map_err(|e| RdmaError::Verbs { op: "ibv_query_device_ex", msg: chain(&e) })?;
        let odp = a.attr.odp_caps;
        let general = odp.general_caps & u64::from(ibv_odp_general_caps::IBV_ODP_SUPPORT.0) != 0;
        let rc = odp.per_transport_caps.rc_odp_caps;
        Ok(OnDemandPaging {
            sender: general && rc & bits::IBV_ODP_SUPPORT_SEND.0 != 0,
            receiver: general && rc & bits::IBV_ODP_SUPPORT_WRITE.0 != 0,
            caps: (odp.general_caps, rc),
        })
    }

    /// Registers `len` bytes at `addr`: for remote writes if
    /// `remote_write` (with the local write access the verbs require for
    /// it), else for the NIC's local reads only (a sender's); pinned, or
    /// paged on demand if `on_demand` (see [`Self::on_demand_paging`]).
    ///
    /// # Safety
    /// The memory must stay mapped until the [`Region`] and every work
    /// request that uses it are gone.
    pub unsafe fn register(
        &self,
        addr: *mut u8,
        len: usize,
        remote_write: bool,
        on_demand: bool,
    ) -> Result<Region, RdmaError> {
        let mut access =
            if remote_write { AccessFlags::LocalWrite | AccessFlags::RemoteWrite } else { AccessFlags::none() };
        if on_demand {
            access |= AccessFlags::OnDemand;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gids_of_addresses_and_their_family() {
        let v4 = gid_of_ip("10.0.2.15".parse().unwrap());
        assert_eq!(v4, [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 0, 2, 15]);
        assert!(gid_is_ipv4(&v4));
        let v6 = gid_of_ip("fd00::5".parse().unwrap());
        assert_eq!(v6[0], 0xfd);
        assert!(!gid_is_ipv4(&v6));
        // A link-local GID (from the MAC) is IPv6.
        assert!(!gid_is_ipv4(&gid_of_ip("fe80::1".parse().unwrap())));
    }
}
