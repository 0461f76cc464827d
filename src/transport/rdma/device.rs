//! This host's RDMA device, the guest RAM registered with it, and what
//! both ends of a stream share (endpoint exchange, queue-pair attributes).

use super::{memlock_limit, memlock_problem, pinned_now, RdmaOptions};
use crate::memory::GuestRam;
use crate::protocol::RdmaRegion;
use crate::transport::handshake::HANDSHAKE_TIMEOUT;
use crate::transport::secure::DataStream;
use crate::transport::TransportError;
use dcmigrate_rdma::{
    gid_is_ipv4, qp_attrs, Device, DeviceEvent, Endpoint, Link, PortInfo, QpAttrs, QpOptions, RdmaError, Region,
    SourceGid, ENDPOINT_LEN,
};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, Weak};
use std::time::Instant;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub(super) fn rdma_err(e: RdmaError) -> TransportError {
    TransportError::Rdma(crate::error_chain(&e))
}

/// This host's RDMA device.
pub struct Rdma {
    pub(super) device: Arc<Device>,
    pub(super) qp: QpOptions,
    memlock: Option<String>,
    register_threads: usize,
    /// Register with on-demand paging (`--rdma-odp`).
    on_demand: bool,
    /// The operator chose the GID (`--rdma-gid-index`): no other is used.
    pub(super) gid_fixed: bool,
    /// Every RAM registered on this host and still in use, so that it is
    /// registered once: by all connections of a migration, and by a
    /// destination's session and the forwarder that sends from it.
    registered: Mutex<Vec<Weak<LocalRam>>>,
    /// Peers whose last session offered RDMA.
    offering: Mutex<std::collections::HashSet<String>>,
    /// Whether the port is up, as its async events last said.
    port_up: tokio::sync::watch::Sender<bool>,
}

/// Opens the configured device, or the first with an active port.
pub fn open(o: &RdmaOptions) -> Result<Arc<Rdma>, String> {
    let qp = QpOptions { traffic_class: o.traffic_class, service_level: o.service_level, pkey_index: o.pkey_index };
    if qp.service_level > dcmigrate_rdma::MAX_SERVICE_LEVEL {
        return Err(format!("service level {} is above {}", qp.service_level, dcmigrate_rdma::MAX_SERVICE_LEVEL));
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let register_threads = o.register_threads.unwrap_or(cores).max(1);
    Device::open(o.device.as_deref(), o.gid_index)
        .map(|device| {
            Arc::new(Rdma {
                device,
                qp,
                memlock: memlock_problem(),
                register_threads,
                on_demand: o.on_demand,
                gid_fixed: o.gid_index.is_some(),
                registered: Mutex::default(),
                offering: Mutex::default(),
                port_up: tokio::sync::watch::Sender::new(true),
            })
        })
        .inspect(watch_events)
        .map_err(|e| e.to_string())
}

/// Follows the device's async events for the agent's life (inside a tokio
/// runtime; elsewhere, as in a benchmark, nothing follows them): logs
/// them, and tells streams when the port goes down, so that they replace
/// their queue pairs (or go on over TCP) at once instead of after the
/// transport's retries.
fn watch_events(rdma: &Arc<Rdma>) {
    let Ok(rt) = tokio::runtime::Handle::try_current() else { return };
    let (device, weak) = (rdma.device.clone(), Arc::downgrade(rdma));
    rt.spawn(async move {
        let events = match device.events() {
            Ok(e) => e,
            Err(e) => return tracing::warn!("RDMA device events unavailable: {e}"),
        };
        loop {
            let ev = events.next().await;
            let Some(r) = weak.upgrade() else { return };
            let (name, port) = (r.device.name(), r.device.port());
            match ev {
                Ok(DeviceEvent::PortDown(p)) if p == port => {
                    tracing::warn!(device = name, port, "RDMA port down");
                    r.port_up.send_replace(false);
                }
                Ok(DeviceEvent::PortActive(p)) if p == port => {
                    tracing::info!(device = name, port, "RDMA port active");
                    r.port_up.send_replace(true);
                }
                Ok(DeviceEvent::GidChange(p)) => tracing::info!(device = name, port = p, "RDMA GID table changed"),
                Ok(DeviceEvent::DeviceFatal) => {
                    tracing::error!(device = name, "RDMA device failed");
                    r.port_up.send_replace(false);
                }
                Ok(other) => tracing::debug!(device = name, ?other, "RDMA device event"),
                Err(e) => return tracing::warn!(device = name, "reading RDMA device events: {e}"),
            }
        }
    });
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

    /// Registers a destination's RAM for remote writes (blocks while it
    /// pins all of it), in slices pinned in parallel if the source takes
    /// `slices`, else one registration per region.
    pub fn register_target(&self, ram: &Arc<GuestRam>, slices: bool) -> Result<Arc<Target>, String> {
        // A protection domain per session: another session's queue pairs cannot write here.
        let device = self.device.session().map_err(|e| e.to_string())?;
        let how = How { remote_write: true, sliced: slices, threads: self.register_threads, on_demand: self.on_demand };
        let local = LocalRam::register(device, ram, how)?;
        self.remember(&local);
        Ok(Arc::new(Target {
            local,
            qp: self.qp,
            gid_fixed: self.gid_fixed,
            registering: how,
            senders: Default::default(),
        }))
    }

    /// `ram` registered for a sender's reads: the registration this host
    /// already has for it if any (an earlier connection's, or the
    /// destination session's a forwarder sends from), else a new one (this
    /// blocks while it pins all of it).
    pub fn register_sender(&self, ram: &Arc<GuestRam>) -> Result<Arc<LocalRam>, String> {
        if let Some(l) = self.find(ram) {
            return Ok(l);
        }
        let local = LocalRam::register(
            self.device.clone(),
            ram,
            How { remote_write: false, sliced: true, threads: self.register_threads, on_demand: self.on_demand },
        )?;
        self.remember(&local);
        Ok(local)
    }

    /// Resolves when the port goes down (at once if it is down).
    pub(super) async fn port_went_down(&self) {
        let mut up = self.port_up.subscribe();
        loop {
            if !*up.borrow_and_update() {
                return;
            }
            if up.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    }

    /// Whether `host`'s last session offered RDMA.
    pub fn offered_last_time(&self, host: &str) -> bool {
        self.offering.lock().unwrap_or_else(|p| p.into_inner()).contains(host)
    }

    /// Remembers whether `host`'s session offered RDMA.
    pub fn note_offer(&self, host: &str, offered: bool) {
        let mut o = self.offering.lock().unwrap_or_else(|p| p.into_inner());
        if offered {
            o.insert(host.to_owned());
        } else {
            o.remove(host);
        }
    }

    fn find(&self, ram: &Arc<GuestRam>) -> Option<Arc<LocalRam>> {
        let known = self.registered.lock().unwrap_or_else(|p| p.into_inner());
        known.iter().filter_map(Weak::upgrade).find(|l| Arc::ptr_eq(&l.ram, ram))
    }

    fn remember(&self, l: &Arc<LocalRam>) {
        let mut known = self.registered.lock().unwrap_or_else(|p| p.into_inner());
        known.retain(|w| w.strong_count() > 0);
        known.push(Arc::downgrade(l));
    }
}

/// Guest RAM registered with the device, in slices of each RAM region
/// (offsets multiples of the chunk size, so no run of pages crosses one):
/// for local reads, and for remote writes if it is a destination's.
pub struct LocalRam {
    /// The protection domain of the registrations; queue pairs that use
    /// them are created in it.
    pub(super) device: Arc<Device>,
    // Before `ram`: the registrations go first. Per region, (offset, slice).
    pub(super) regions: Vec<Vec<(u64, Region)>>,
    pub(super) ram: Arc<GuestRam>,
}

/// The slice of `slices` (by offset, ascending) that holds `len` bytes at
/// `offset`, with the offset inside it.
pub(super) fn find_slice<T>(
    slices: &[(u64, T)],
    len_of: impl Fn(&T) -> u64,
    offset: u64,
    len: u64,
) -> Option<(&T, u64)> {
    let i = slices.partition_point(|(o, _)| *o <= offset).checked_sub(1)?;
    let (start, t) = (&slices[i].0, &slices[i].1);
    let inner = offset - start;
    (inner.checked_add(len)? <= len_of(t)).then_some((t, inner))
}

/// How a RAM is registered.
#[derive(Clone, Copy, Debug)]
struct How {
    /// Other hosts write into it (a destination's RAM), else this host
    /// reads it for its own writes (a sender's).
    remote_write: bool,
    /// In `threads` slices per region pinned at once, else whole regions
    /// after faulting them in on `threads` threads.
    sliced: bool,
    /// Threads (and slices per region).
    threads: usize,
    /// Registered unpinned, where the device pages RC writes on demand.
    on_demand: bool,
}

impl LocalRam {
    /// The registration holding `len` bytes at `offset` of `region`.
    pub(super) fn slice(&self, region: u32, offset: u64, len: u64) -> Option<(&Region, u64)> {
        find_slice(self.regions.get(region as usize)?, Region::len, offset, len)
    }

    /// Faults the RAM in and pins and registers it as `how` says.
    fn register(device: Arc<Device>, ram: &Arc<GuestRam>, how: How) -> Result<Arc<Self>, String> {
        let How { remote_write, sliced, threads, on_demand } = how;
        let total = ram.layout().total_bytes();
        check_limits(&device, total, remote_write, on_demand)?;
        let started = Instant::now();
        let chunk = ram.layout().chunk_size();
        let pieces = if sliced { threads } else { 1 };
        let mut regions = vec![];
        for r in 0..ram.layout().regions().len() as u32 {
            let (ptr, len) = ram.region_raw(r).ok_or("no such region")?;
            // An address, so that the slices' threads can share it.
            let (base, len) = (ptr as usize, len as u64);
            // Whole chunks (the source checks) of whole huge pages (as
            // faulting them in needs) per slice.
            let unit = lcm(chunk, ram.page_size(r).unwrap_or(chunk));
            let size = len.div_ceil(pieces as u64).next_multiple_of(unit).max(unit);
            if !sliced && threads > 1 && !on_demand {
                // Only time is at stake: pinning faults in what this did not.
                if let Err(e) = ram.prefault(r, remote_write, threads) {
                    tracing::debug!("faulting RAM in before registration: {}", crate::error_chain(&e));
                }
            }
            let one = |off: u64| -> Result<(u64, Region), String> {
                let n = size.min(len - off);
                if sliced && !on_demand {
                    if let Err(e) = ram.prefault_range(r, off, n, remote_write) {
                        tracing::debug!("faulting RAM in before registration: {}", crate::error_chain(&e));
                    }
                }
                // SAFETY: [ptr + off, + n) lies in the region's mapping, which
                // lives as long as `ram`, which every holder of these
                // registrations also holds (and drops after them).
                let mr =
                    unsafe { device.register((base + off as usize) as *mut u8, n as usize, remote_write, on_demand) };
                mr.map(|m| (off, m)).map_err(|e| e.to_string())
            };
            let slices: Result<Vec<_>, String> = std::thread::scope(|s| {
                let workers: Vec<_> = (0..len).step_by(size as usize).map(|off| s.spawn(move || one(off))).collect();
                workers.into_iter().map(|w| w.join().unwrap_or_else(|_| Err("registration panicked".into()))).collect()
            });
            regions.push(slices?);
        }
        tracing::info!(
            gib = total as f64 / (1u64 << 30) as f64,
            remote_write,
            on_demand,
            threads,
            slices = regions.iter().map(Vec::len).sum::<usize>(),
            ms = started.elapsed().as_millis() as u64,
            "guest RAM registered for RDMA"
        );
        Ok(Arc::new(LocalRam { device, regions, ram: ram.clone() }))
    }
}

/// Whether registering `total` bytes can work: the device pages on demand
/// (`on_demand`), or pinning them stays within the locked-memory limit.
/// Checked before faulting anything in: registration beyond the limit
/// fails, and would leave the whole RAM allocated for nothing.
fn check_limits(device: &Device, total: u64, remote_write: bool, on_demand: bool) -> Result<(), String> {
    if on_demand {
        let odp = device.on_demand_paging().map_err(|e| e.to_string())?;
        if !(if remote_write { odp.receiver } else { odp.sender }) {
            return Err(format!(
                "--rdma-odp: {} does not page RC writes' {} on demand (ODP caps {:#x}, RC {:#x})",
                device.name(),
                if remote_write { "targets" } else { "sources" },
                odp.caps.0,
                odp.caps.1
            ));
        }
    } else if let Some(limit) = memlock_limit() {
        let pinned = pinned_now();
        if total.saturating_add(pinned) > limit {
            return Err(format!(
                "pinning {} MiB would pass the locked-memory limit ({} KiB, {} KiB pinned already; raise \
                 LimitMEMLOCK or grant CAP_IPC_LOCK)",
                total >> 20,
                limit >> 10,
                pinned >> 10
            ));
        }
    }
    Ok(())
}

/// The least common multiple (chunk sizes need not be powers of two).
fn lcm(a: u64, b: u64) -> u64 {
    let (mut x, mut y) = (a, b);
    while y != 0 {
        (x, y) = (y, x % y);
    }
    if x == 0 {
        return a.max(b);
    }
    a / x * b
}

impl LocalRam {
    /// Deregisters now, in this thread, if this is the last holder (a
    /// forwarder's registration has no other): its keys are worthless once
    /// this returns. Otherwise the last holder does it.
    fn deregister_now(this: Arc<Self>) {
        if let Ok(mut l) = Arc::try_unwrap(this) {
            drop(std::mem::take(&mut l.regions));
        }
    }
}

impl Drop for LocalRam {
    /// Unpinning a large RAM takes time that grows with it, and the last
    /// holder is often an async task: a thread of its own does it (the
    /// mapping, which it keeps, goes after the registrations).
    fn drop(&mut self) {
        let (regions, ram) = (std::mem::take(&mut self.regions), self.ram.clone());
        let unpin = move || {
            drop(regions);
            drop(ram);
        };
        if let Err(e) = std::thread::Builder::new().name("unpin".into()).spawn(unpin) {
            // The closure (and with it the registrations) is dropped here.
            tracing::debug!("unpinning in place: {e}");
        }
    }
}

/// A destination's registered RAM.
pub struct Target {
    /// The source's registration (its keys go to the source alone, from
    /// protocol 4 on).
    pub(super) local: Arc<LocalRam>,
    pub(super) qp: QpOptions,
    pub(super) gid_fixed: bool,
    /// How `local` was registered (each forwarder's registration is alike).
    registering: How,
    /// Each forwarder's registration of the same RAM, in the same
    /// protection domain: keys of its own, deregistered (so worthless)
    /// when it is fenced or released.
    senders: std::sync::Mutex<std::collections::HashMap<u8, Arc<LocalRam>>>,
}

fn offer_of(l: &LocalRam) -> Vec<RdmaRegion> {
    l.regions.iter().flatten().map(|(_, r)| RdmaRegion { addr: r.addr(), len: r.len(), rkey: r.rkey() }).collect()
}

impl Target {
    /// What the source needs to write into it.
    pub fn offer(&self) -> Vec<RdmaRegion> {
        offer_of(&self.local)
    }

    /// Registers the RAM again for forwarder `sender` (blocks while it
    /// pins it): the keys it gets, and no one else.
    pub fn add_sender(&self, sender: u8) -> Result<Vec<RdmaRegion>, String> {
        let device = self.local.device.clone();
        let l = LocalRam::register(device, &self.local.ram, self.registering)?;
        let offer = offer_of(&l);
        self.senders.lock().unwrap_or_else(|p| p.into_inner()).insert(sender, l);
        Ok(offer)
    }

    /// Deregisters forwarder `sender`'s keys before it returns (blocks
    /// while it unpins): a write with them fails from now on.
    pub fn revoke(&self, sender: u8) {
        let gone = self.senders.lock().unwrap_or_else(|p| p.into_inner()).remove(&sender);
        if let Some(l) = gone {
            LocalRam::deregister_now(l);
            tracing::info!(sender, "RDMA keys of a sender deregistered");
        }
    }

    /// Deregisters every forwarder's keys (the pause's verification).
    pub fn revoke_all(&self) {
        let all: Vec<Arc<LocalRam>> =
            self.senders.lock().unwrap_or_else(|p| p.into_inner()).drain().map(|(_, l)| l).collect();
        all.into_iter().for_each(LocalRam::deregister_now);
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

/// The GID a queue pair whose pairing connection runs from `local`
/// sends from: the port's GID of that address, so that RDMA takes the
/// same interface (and VLAN, and address family) as the connection the
/// peer was reached by; else the one chosen at start, with a warning.
pub(super) fn source_gid(device: &Device, fixed: bool, local: Option<IpAddr>) -> Result<SourceGid, TransportError> {
    let default = device.default_gid();
    let usable = |ip: &IpAddr| !fixed && !ip.is_loopback() && !ip.is_unspecified();
    let Some(ip) = local.map(|ip| ip.to_canonical()).filter(usable) else {
        return Ok(default);
    };
    if let Some(g) = device.gid_for(ip).map_err(rdma_err)? {
        return Ok(g);
    }
    if device.port_info().map_err(rdma_err)?.link != Link::Ethernet {
        return Ok(default);
    }
    // The peer pairs from its own address's GID: one of this address's
    // family keeps the two ends' families alike.
    let chosen = match device.gid_of_family(ip.is_ipv4()).map_err(rdma_err)? {
        Some(g) if gid_is_ipv4(&default.gid) != ip.is_ipv4() => g,
        _ => default,
    };
    static WARNED: Mutex<Vec<IpAddr>> = Mutex::new(Vec::new());
    let mut warned = WARNED.lock().unwrap_or_else(|p| p.into_inner());
    if !warned.contains(&ip) {
        warned.push(ip);
        tracing::warn!(
            %ip,
            device = device.name(),
            gid_index = chosen.index,
            "the data-plane address is not on the RDMA device's port; using another GID of its family \
             (--rdma-device, --rdma-gid-index choose)"
        );
    }
    Ok(chosen)
}

/// The attributes for a queue pair from `port` (sending from `local`) to
/// `remote`; on RoCE both GIDs must be of one address family.
pub(super) fn attrs(
    port: &PortInfo,
    local: &SourceGid,
    remote: &Endpoint,
    opts: &QpOptions,
) -> Result<QpAttrs, TransportError> {
    let zero = remote.gid == [0; 16];
    if port.link == Link::Ethernet && !zero && gid_is_ipv4(&local.gid) != gid_is_ipv4(&remote.gid) {
        let family = |g: &[u8; 16]| if gid_is_ipv4(g) { "IPv4" } else { "IPv6" };
        return Err(TransportError::Rdma(format!(
            "address families differ: this end sends from an {} GID (index {}), the peer from an {} one",
            family(&local.gid),
            local.index,
            family(&remote.gid)
        )));
    }
    qp_attrs(port, remote.mtu, zero, opts).map_err(rdma_err)
}

/// True the first time it is called on `flag` in this process.
pub(super) fn first_time(flag: &std::sync::atomic::AtomicBool) -> bool {
    !flag.swap(true, std::sync::atomic::Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    #[test]
    fn slices_are_whole_chunks_of_whole_huge_pages() {
        assert_eq!(super::lcm(2 << 20, 2 << 20), 2 << 20);
        assert_eq!(super::lcm(2 << 20, 1 << 30), 1 << 30);
        assert_eq!(super::lcm(24 << 20, 1 << 30), 3 << 30);
        assert_eq!(super::lcm(64 << 20, 4096), 64 << 20);
    }
}
