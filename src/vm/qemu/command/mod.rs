//! A destination's QEMU command line, built from a [`Description`] and this
//! host's own resources: RAM files the agent created, files it opened
//! beneath its storage, output files and sockets it created in the VM's
//! runtime directory, taps on the operator's bridges. Every one reaches
//! QEMU as a descriptor (an fd set for block and file backends, a
//! `/proc/self/fd/N` name for boot files, `fd=N` for sockets and taps),
//! so nothing in the command line is a path a peer chose; no value goes in
//! without the description's own check having passed.

use super::confine::{Chain, ConfineError, RuntimeDir, Storage};
use super::description::{ChardevKind, Description, Firmware, Props, RESERVED_PREFIX};
use super::network::{self, Backend, NetworkError, Networks};
use crate::vm::RamFile;
use serde_json::{json, Value};
use std::fs::File;
use std::os::fd::OwnedFd;
use std::path::Path;
use thiserror::Error;

/// QEMU's seccomp sandbox with every deny flag: no obsolete syscalls, no
/// privilege changes, no fork/exec, no scheduler or affinity changes.
pub const SANDBOX: &str = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";

/// The QMP monitor's chardev id.
const QMP_ID: &str = "dcm-qmp";

/// Why the resources a description needs cannot be had here.
#[derive(Debug, Error)]
pub enum ResourceError {
    /// A file it names.
    #[error("{what}")]
    File {
        /// Which part of the VM.
        what: String,
        /// Why.
        #[source]
        source: ConfineError,
    },
    /// A network it names.
    #[error("NIC {id}")]
    Network {
        /// The netdev id.
        id: String,
        /// Why.
        #[source]
        source: NetworkError,
    },
    /// A RAM region bound to NUMA nodes this host lacks.
    #[error("RAM region {region} is bound to host NUMA nodes (host-nodes): {why}")]
    HostNodes {
        /// The region.
        region: String,
        /// Why they are not here.
        why: String,
    },
    /// A socket for a chardev or the monitor.
    #[error("a socket for {id}")]
    Socket {
        /// The chardev.
        id: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Checks that this host has every NUMA node of `list` (QEMU's
/// `host-nodes`: `0`, `0-3`, `0:2`).
fn host_nodes(list: &str) -> Result<(), String> {
    const MAX_NODE: u32 = 1023;
    for part in list.split([':', ',']) {
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        let (Ok(a), Ok(b)) = (a.parse::<u32>(), b.parse::<u32>()) else {
            return Err(format!("{list:?} is not a list of node numbers"));
        };
        if a > b || b > MAX_NODE {
            return Err(format!("{list:?} is not a list of node numbers"));
        }
        if let Some(n) = (a..=b).find(|n| !Path::new(&format!("/sys/devices/system/node/node{n}")).exists()) {
            return Err(format!("this host has no NUMA node {n}"));
        }
    }
    Ok(())
}

/// A network backend as this host provides it.
pub enum NetBackend {
    /// Restricted user networking.
    User,
    /// A tap the agent made on a bridge, and its name.
    Tap(OwnedFd, String),
}

/// Everything a description needs from this host, opened or created.
pub struct Resources {
    /// Per disk, in order, its chain of files.
    pub disks: Vec<Chain>,
    /// Boot files as sealed copies: kernel, initrd, dtb, firmware.
    pub boot: [Option<OwnedFd>; 4],
    /// Per NIC backend, in order.
    pub nets: Vec<NetBackend>,
    /// Per chardev that writes a log or listens: its file or socket.
    pub chardevs: Vec<(String, OwnedFd)>,
    /// The monitor's listening socket (the agent connects to its path).
    pub qmp: OwnedFd,
}

/// Opens what `desc` needs beneath `storage` and checks its networks; no
/// file is created, copied or locked, and no tap made (see [`create`]).
/// Called at session open, so that a refusal comes before anything exists
/// for the VM. Returns the images it would write (the top of each
/// writable disk), so that no two VMs of a host write one.
pub fn check_resources(
    desc: &Description,
    storage: &Storage,
    networks: &Networks,
) -> Result<Vec<crate::vm::ident::FileIdent>, ResourceError> {
    let mut written = vec![];
    for d in &desc.disks {
        let chain = storage.disk(d).map_err(|source| ResourceError::File { what: format!("disk {}", d.id), source })?;
        if let (false, Some(top)) = (d.read_only, chain.nodes.first()) {
            if let Ok(m) = top.file.metadata() {
                written.push(crate::vm::ident::FileIdent::of(&m));
            }
        }
    }
    for n in &desc.nets {
        networks.get(&n.network).map_err(|source| ResourceError::Network { id: n.id.clone(), source })?;
    }
    for r in &desc.ram {
        if let Some(nodes) = r.props.get("host-nodes") {
            host_nodes(nodes).map_err(|why| ResourceError::HostNodes { region: r.id.clone(), why })?;
        }
    }
    let b = &desc.boot;
    let bios = match &b.bios {
        Some(Firmware::Storage(n)) => Some(n),
        _ => None,
    };
    let files = [("kernel", b.kernel.as_ref()), ("initrd", b.initrd.as_ref()), ("dtb", b.dtb.as_ref()), ("bios", bios)];
    for (what, name) in files {
        if let Some(n) = name {
            storage.check_boot_file(n).map_err(|source| ResourceError::File { what: what.into(), source })?;
        }
    }
    Ok(written)
}

fn boot_files(desc: &Description, storage: &Storage) -> Result<[Option<OwnedFd>; 4], ResourceError> {
    let b = &desc.boot;
    let bios = match &b.bios {
        Some(Firmware::Storage(n)) => Some(n),
        _ => None,
    };
    let mut out: [Option<OwnedFd>; 4] = Default::default();
    for (i, (what, name)) in [("kernel", &b.kernel), ("initrd", &b.initrd), ("dtb", &b.dtb)].into_iter().enumerate() {
        if let Some(n) = name {
            out[i] = Some(storage.boot_file(n).map_err(|source| ResourceError::File { what: what.into(), source })?);
        }
    }
    if let Some(n) = bios {
        out[3] = Some(storage.boot_file(n).map_err(|source| ResourceError::File { what: "bios".into(), source })?);
    }
    Ok(out)
}

/// Opens and creates everything for launching: files beneath storage,
/// logs and sockets in `runtime`, taps on bridges, the QMP socket.
pub fn create(
    desc: &Description,
    storage: &Storage,
    networks: &Networks,
    runtime: &RuntimeDir,
) -> Result<Resources, ResourceError> {
    let mut disks = vec![];
    for d in &desc.disks {
        disks.push(storage.disk(d).map_err(|source| ResourceError::File { what: format!("disk {}", d.id), source })?);
    }
    let boot = boot_files(desc, storage)?;
    let mut nets = vec![];
    for n in &desc.nets {
        let backend = networks.get(&n.network).map_err(|source| ResourceError::Network { id: n.id.clone(), source })?;
        nets.push(match backend {
            Backend::User => NetBackend::User,
            Backend::Bridge(br) => {
                let (fd, name) =
                    network::tap_on(br).map_err(|source| ResourceError::Network { id: n.id.clone(), source })?;
                NetBackend::Tap(fd, name)
            }
        });
    }
    let mut chardevs = vec![];
    for c in &desc.chardevs {
        let fd: OwnedFd = match c.kind {
            ChardevKind::Log => runtime
                .create_file(&chardev_file(&c.id, "log"), 0o640)
                .map_err(|source| ResourceError::File { what: format!("chardev {}", c.id), source })?
                .into(),
            ChardevKind::Socket => listen(runtime, &chardev_file(&c.id, "sock"), &c.id)?,
            _ => continue,
        };
        chardevs.push((c.id.clone(), fd));
    }
    let qmp = listen(runtime, "qmp.sock", QMP_ID)?;
    Ok(Resources { disks, boot, nets, chardevs, qmp })
}

/// The file of chardev `id` in a runtime directory (apart from the agent's own).
pub fn chardev_file(id: &str, ext: &str) -> String {
    format!("chardev-{id}.{ext}")
}

/// A unix socket at `name` in the runtime directory, bound (QEMU listens:
/// the peer credentials a client of it sees are then QEMU's).
fn listen(runtime: &RuntimeDir, name: &str, id: &str) -> Result<OwnedFd, ResourceError> {
    let err = |source| ResourceError::Socket { id: id.into(), source };
    let s = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM.cloexec(), None).map_err(err)?;
    s.bind(&socket2::SockAddr::unix(runtime.fd_path(name)).map_err(err)?).map_err(err)?;
    Ok(s.into())
}

/// A command line and the descriptors it names, each with the number it
/// must have in QEMU.
pub struct Command {
    /// The arguments (without the program).
    pub argv: Vec<String>,
    /// Descriptors and their numbers in the child.
    pub fds: Vec<(OwnedFd, i32)>,
}

struct Builder {
    argv: Vec<String>,
    fds: Vec<(OwnedFd, i32)>,
    sets: u32,
}

impl Builder {
    fn arg(&mut self, opt: &str, value: impl Into<String>) {
        self.argv.push(format!("-{opt}"));
        self.argv.push(value.into());
    }

    /// Passes `fd`; its number in QEMU.
    fn pass(&mut self, fd: OwnedFd) -> i32 {
        let n = 3 + self.fds.len() as i32;
        self.fds.push((fd, n));
        n
    }

    /// Passes `fd` in an fd set of its own; the name QEMU opens it by.
    fn fdset(&mut self, fd: OwnedFd, opaque: &str) -> String {
        let n = self.pass(fd);
        self.sets += 1;
        let set = self.sets;
        self.arg("add-fd", format!("fd={n},set={set},opaque={}", escape(opaque)));
        format!("/dev/fdset/{set}")
    }
}

/// A value in QEMU's key=value syntax (a comma doubled).
fn escape(v: &str) -> String {
    v.replace(',', ",,")
}

/// Properties as `first,key=value,...` with `first` (a kind) leading.
fn keyval(first: Option<(&str, &str)>, props: &Props) -> String {
    let mut parts: Vec<String> = first.map(|(k, v)| format!("{k}={}", escape(v))).into_iter().collect();
    parts.extend(
        props.iter().filter(|(k, _)| first.is_none_or(|(f, _)| f != *k)).map(|(k, v)| format!("{k}={}", escape(v))),
    );
    parts.join(",")
}

/// QEMU's command line for `desc` on this host: RAM on `ram` (the agent's
/// files), files and sockets from `res`, paused for an incoming migration
/// (`-incoming defer -S`), its monitor on the agent's socket, sandboxed.
pub fn build(desc: &Description, ram: &[RamFile], res: Resources) -> Command {
    let mut b = Builder { argv: vec![], fds: vec![], sets: 0 };
    let Resources { disks, boot, nets, chardevs, qmp } = res;
    machine(&mut b, desc, ram);
    boot_args(&mut b, desc, boot);
    for (i, (d, chain)) in desc.disks.iter().zip(disks).enumerate() {
        disk(&mut b, (i, &d.id), &d.props, d.read_only, chain);
    }
    for (n, backend) in desc.nets.iter().zip(nets) {
        let mut props = Props::new();
        props.insert("id".into(), n.id.clone());
        let kind = match backend {
            NetBackend::User => {
                props.insert("restrict".into(), "on".into());
                "user"
            }
            NetBackend::Tap(fd, _) => {
                let n = b.pass(fd);
                props.insert("fd".into(), n.to_string());
                props.insert("vhost".into(), "off".into());
                "tap"
            }
        };
        match &n.nic {
            Some(nic) => {
                props.extend(nic.clone());
                b.arg("nic", keyval(Some(("type", kind)), &props));
            }
            None => b.arg("netdev", keyval(Some(("type", kind)), &props)),
        }
    }
    let mut files: std::collections::HashMap<String, OwnedFd> = chardevs.into_iter().collect();
    for c in &desc.chardevs {
        let v = match c.kind {
            ChardevKind::Null => format!("null,id={}", c.id),
            ChardevKind::Stdio => format!("stdio,id={}", c.id),
            ChardevKind::Ringbuf { size: Some(s) } => format!("ringbuf,id={},size={s}", c.id),
            ChardevKind::Ringbuf { size: None } => format!("ringbuf,id={}", c.id),
            ChardevKind::Log => match files.remove(&c.id) {
                Some(fd) => format!("file,id={},path={}", c.id, b.fdset(fd, &c.id)),
                None => format!("null,id={}", c.id),
            },
            ChardevKind::Socket => match files.remove(&c.id) {
                Some(fd) => format!("socket,id={},fd={},server=on,wait=off", c.id, b.pass(fd)),
                None => format!("null,id={}", c.id),
            },
        };
        b.arg("chardev", v);
    }
    for s in &desc.serials {
        b.arg("serial", if ["none", "null"].contains(&s.as_str()) { s.clone() } else { format!("chardev:{s}") });
    }
    for o in &desc.objects {
        b.arg("object", keyval(o.get("qom-type").map(|k| ("qom-type", k.as_str())), o));
    }
    for d in &desc.devices {
        b.arg("device", keyval(d.get("driver").map(|k| ("driver", k.as_str())), d));
    }
    for g in &desc.globals {
        b.arg("global", format!("driver={},property={},value={}", g.driver, g.property, escape(&g.value)));
    }
    for (name, value) in &desc.options {
        // Rebuilt from the checked properties (the description was checked:
        // an option that fails here is left out).
        if let Ok(v) = super::allow::plain_option(name, value.as_deref()) {
            b.argv.push(format!("-{name}"));
            b.argv.extend(v);
        }
    }
    agent_options(&mut b, desc, qmp);
    Command { argv: b.argv, fds: b.fds }
}

fn machine(b: &mut Builder, desc: &Description, ram: &[RamFile]) {
    let mut machine = desc.machine.clone();
    let numa_ram = desc.numa.iter().any(|n| n.contains_key("memdev"));
    if let (false, [one]) = (numa_ram, ram) {
        machine.insert("memory-backend".into(), one.id.clone());
    }
    if !machine.is_empty() {
        b.arg("machine", keyval(machine.get("type").map(|t| ("type", t.as_str())), &machine));
    }
    if let Some(a) = &desc.accel {
        b.arg("accel", keyval(a.get("accel").map(|t| ("accel", t.as_str())), a));
    }
    if let Some(c) = &desc.cpu {
        b.arg("cpu", c.clone());
    }
    if let Some(s) = &desc.smp {
        b.arg("smp", keyval(None, s));
    }
    let total: u64 = ram.iter().map(|r| r.size).sum();
    b.arg("m", format!("size={total}B"));
    for r in ram {
        let region = desc.ram.iter().find(|x| x.id == r.id);
        let mut props = region.map(|x| x.props.clone()).unwrap_or_default();
        props.insert("id".into(), r.id.clone());
        props.insert("size".into(), r.size.to_string());
        props.insert("share".into(), "on".into());
        props.insert("mem-path".into(), r.path.to_string_lossy().into_owned());
        if region.is_some_and(|x| x.prealloc) {
            props.insert("prealloc".into(), "on".into());
        }
        b.arg("object", keyval(Some(("qom-type", "memory-backend-file")), &props));
    }
    for n in &desc.numa {
        b.arg("numa", keyval(n.get("type").map(|t| ("type", t.as_str())), n));
    }
}

fn boot_args(b: &mut Builder, desc: &Description, boot: [Option<OwnedFd>; 4]) {
    let [kernel, initrd, dtb, bios] = boot;
    for (opt, fd) in [("kernel", kernel), ("initrd", initrd), ("dtb", dtb), ("bios", bios)] {
        if let Some(fd) = fd {
            let n = b.pass(fd);
            b.arg(opt, format!("/proc/self/fd/{n}"));
        }
    }
    if let Some(Firmware::Builtin(name)) = &desc.boot.bios {
        b.arg("bios", name.clone());
    }
    if let Some(a) = &desc.boot.append {
        b.arg("append", a.clone());
    }
}

/// A disk's chain as `-blockdev` nodes, bottom up (a node names only nodes
/// defined before it), each file from an fd set; the top format node
/// carries the id devices use, the others short names of the agent's
/// (`dcm-` and the disk's index: node names are under 32 bytes).
fn disk(b: &mut Builder, (n, id): (usize, &str), props: &Props, read_only: bool, chain: Chain) {
    let cache = json!({
        "direct": props.get("cache.direct").is_some_and(|v| ["on", "true", "yes"].contains(&v.as_str())),
        "no-flush": props.get("cache.no-flush").is_some_and(|v| ["on", "true", "yes"].contains(&v.as_str())),
    });
    let depth = chain.nodes.len();
    let mut below: Option<String> = None;
    for (i, node) in chain.nodes.into_iter().enumerate().rev() {
        let top = i == 0;
        let ro = !top || read_only;
        let name = if top { id.to_owned() } else { format!("{RESERVED_PREFIX}{n}b{i}") };
        let file = file_node(b, &format!("{RESERVED_PREFIX}{n}f{i}"), node.file, ro, &cache, props);
        let mut fmt = json!({
            "driver": node.format.driver(), "node-name": name, "file": file, "read-only": ro, "cache": cache,
        });
        if node.format == super::description::Format::Qcow2 {
            fmt["backing"] = below.clone().map_or(Value::Null, Value::String);
        }
        if let Some(data) = node.data_file {
            fmt["data-file"] =
                Value::String(file_node(b, &format!("{RESERVED_PREFIX}{n}d{i}"), data, ro, &cache, props));
        }
        if top {
            for k in ["discard", "detect-zeroes"] {
                if let Some(v) = props.get(k) {
                    fmt[k] = Value::String(v.clone());
                }
            }
        }
        b.arg("blockdev", fmt.to_string());
        below = Some(name);
    }
    debug_assert!(depth > 0, "a chain has its top image");
}

fn file_node(b: &mut Builder, name: &str, file: File, ro: bool, cache: &Value, props: &Props) -> String {
    let path = b.fdset(file.into(), name);
    let mut f = json!({"driver": "file", "node-name": name, "filename": path, "read-only": ro, "cache": cache});
    if let Some(aio) = props.get("aio") {
        f["aio"] = Value::String(aio.clone());
    }
    b.arg("blockdev", f.to_string());
    name.to_owned()
}

/// What the agent adds: its monitor, the incoming mode, the sandbox, no display.
fn agent_options(b: &mut Builder, desc: &Description, qmp: OwnedFd) {
    let n = b.pass(qmp);
    b.arg("chardev", format!("socket,id={QMP_ID},fd={n},server=on,wait=off"));
    b.arg("mon", format!("chardev={QMP_ID},mode=control"));
    if !desc.options.iter().any(|(o, _)| o == "nographic") {
        b.arg("display", "none");
    }
    b.arg("incoming", "defer");
    b.argv.push("-S".into());
    b.arg("sandbox", SANDBOX);
}

#[cfg(test)]
mod tests;
