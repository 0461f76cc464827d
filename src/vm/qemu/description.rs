//! The typed description of a QEMU VM: what travels to a destination
//! instead of a command line. It says what the VM *is* (machine, CPUs, RAM
//! regions, disks by storage-relative name, NICs by operator network name,
//! serial ports, boot files, devices), never how a host runs it: no path,
//! no host port, no interface name, no file a QEMU would open. The
//! destination builds QEMU's command line itself from this and its own
//! policy ([`super::command`]), opening every file it names beneath its
//! own `--storage` and passing descriptors.
//!
//! A description comes from a peer, so [`Description::check`] re-validates
//! every value against the allow-lists in [`super::allow`] and bounds every
//! list, whatever the source's agent already checked ([`super::describe`]).
//! Unknown fields are refused: a newer source's feature is never dropped
//! silently.

use super::allow::{self, Schema, V};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashSet};
use thiserror::Error;

/// A group of QEMU properties (`key=value`), each key allow-listed for its
/// option and each value checked by that key's rule.
pub type Props = BTreeMap<String, String>;

/// Architectures a destination may run (`qemu-system-ARCH`).
pub const ARCHES: &[&str] = &["x86_64", "i386", "aarch64", "arm", "ppc64", "s390x", "riscv64"];

/// Most entries of any one list in a description.
const MAX_ITEMS: usize = 256;
/// Most RAM regions, disks, networks or chardevs.
const MAX_RESOURCES: usize = 64;
/// Ids the destination uses for what it adds itself (file nodes, its QMP).
pub const RESERVED_PREFIX: &str = "dcm-";

/// A QEMU VM as it travels between agents.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct Description {
    /// The target architecture: the destination runs `qemu-system-ARCH`.
    pub arch: String,
    /// `-machine` properties, without `memory-backend` (the destination
    /// ties RAM to the regions below).
    pub machine: Props,
    /// `-accel` properties, if given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accel: Option<Props>,
    /// `-cpu`: a model, `+flag`/`-flag` and `key=value` words.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<String>,
    /// `-smp` properties.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub smp: Option<Props>,
    /// RAM regions, in layout order: `-m` is their sum.
    pub ram: Vec<RamRegion>,
    /// `-numa` entries (`memdev` names a RAM region).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub numa: Vec<Props>,
    /// Kernel, initrd, firmware and command line.
    #[serde(default)]
    pub boot: Boot,
    /// Disk images, by name beneath the destination's storage.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<Disk>,
    /// Network backends, by operator network name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nets: Vec<Net>,
    /// Character devices.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub chardevs: Vec<Chardev>,
    /// `-serial` ports in order: `none`, `null`, or a chardev id.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub serials: Vec<String>,
    /// `-device` entries in order (`driver` and its properties).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub devices: Vec<Props>,
    /// `-global` settings.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub globals: Vec<Global>,
    /// `-object` entries other than RAM (iothreads, RNG backends).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub objects: Vec<Props>,
    /// Other options with no host resource in them, in order (`rtc`,
    /// `smbios`, `name`, `no-reboot`, ...): name, and value if it takes one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<(String, Option<String>)>,
}

/// One RAM region (a QEMU memory backend).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(deny_unknown_fields)]
pub struct RamRegion {
    /// The backend's id (QEMU matches RAM blocks by it).
    pub id: String,
    /// Bytes.
    pub size: u64,
    /// Backend properties a destination keeps (`merge`, `dump`, `policy`,
    /// `host-nodes`, ...); never a path.
    #[serde(default, skip_serializing_if = "Props::is_empty")]
    pub props: Props,
    /// The source preallocated it (`prealloc=on`): so does a destination.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub prealloc: bool,
}

/// What boots: files by storage-relative name.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(deny_unknown_fields)]
pub struct Boot {
    /// `-kernel`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<String>,
    /// `-initrd` (one file: never a list).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<String>,
    /// `-dtb`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dtb: Option<String>,
    /// `-append`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub append: Option<String>,
    /// `-bios`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bios: Option<Firmware>,
}

/// A firmware image.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Firmware {
    /// A file QEMU ships (a bare name it finds in its data directory).
    Builtin(String),
    /// A file beneath the destination's storage.
    Storage(String),
}

/// Image formats a destination opens.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    /// A raw image.
    Raw,
    /// qcow2; its backing chain and data file are found from its header,
    /// beneath storage.
    Qcow2,
}

impl Format {
    /// QEMU's driver name.
    pub fn driver(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
        }
    }
}

/// A disk image a device uses (as `drive=ID`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Disk {
    /// The node name devices refer to.
    pub id: String,
    /// The image, relative to a storage directory.
    pub image: String,
    /// Its format.
    pub format: Format,
    /// Opened read-only.
    #[serde(default)]
    pub read_only: bool,
    /// Block options kept (`cache.direct`, `cache.no-flush`, `discard`,
    /// `detect-zeroes`, `aio`).
    #[serde(default, skip_serializing_if = "Props::is_empty")]
    pub props: Props,
}

/// A network backend (`netdev=ID` in a NIC device).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Net {
    /// The netdev id.
    pub id: String,
    /// The operator's network name; each host maps it (`--network`).
    pub network: String,
    /// Made by `-nic` (QEMU creates the NIC with the board, before any
    /// `-device`): its `model` and `mac`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nic: Option<Props>,
}

/// A character device.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Chardev {
    /// Its id.
    pub id: String,
    /// What it is.
    pub kind: ChardevKind,
}

/// What a character device is on the host that runs the VM.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ChardevKind {
    /// Discards output.
    Null,
    /// Keeps the last bytes in memory.
    Ringbuf {
        /// Its size (QEMU's default without).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        size: Option<u64>,
    },
    /// Output to a log file the agent creates in the VM's runtime directory.
    Log,
    /// A socket the agent listens on in the VM's runtime directory (a guest agent).
    Socket,
    /// QEMU's standard output (the VM's `qemu.log`).
    Stdio,
}

/// One `-global driver.property=value`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Global {
    /// The driver.
    pub driver: String,
    /// The property.
    pub property: String,
    /// Its value.
    pub value: String,
}

/// Why a destination refused a description.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum DescriptionError {
    /// A value outside what its field allows.
    #[error("{field}: {value:?} is not allowed ({rule})")]
    Value {
        /// Where in the description.
        field: String,
        /// The value (cut to 80 characters).
        value: String,
        /// What is allowed.
        rule: &'static str,
    },
    /// A property not allowed for that option or kind.
    #[error("{field}: property {key:?} is not allowed")]
    Key {
        /// Where in the description.
        field: String,
        /// The property.
        key: String,
    },
    /// A list longer than a destination takes.
    #[error("{field}: {len} entries, at most {max}")]
    TooMany {
        /// Which list.
        field: &'static str,
        /// Its length.
        len: usize,
        /// The bound.
        max: usize,
    },
    /// An id used twice, or a reference to one that does not exist.
    #[error("{0}")]
    Reference(String),
}

fn value_err(field: impl Into<String>, value: &str, rule: &'static str) -> DescriptionError {
    DescriptionError::Value { field: field.into(), value: value.chars().take(80).collect(), rule }
}

/// Checks one value by its rule; files are never a rule here (a
/// description names no path).
pub(super) fn check_value(field: &str, rule: &V, v: &str) -> Result<(), DescriptionError> {
    if allow::value_ok(rule, v) {
        Ok(())
    } else {
        Err(value_err(field, v, allow::rule_text(rule)))
    }
}

/// Checks a group of properties against `schema`; `skip` keys are checked by the caller.
fn check_props(field: &str, schema: &Schema, props: &Props, skip: &[&str]) -> Result<(), DescriptionError> {
    for (k, v) in props {
        if skip.contains(&k.as_str()) {
            continue;
        }
        let Some((_, rule)) = schema.keys.iter().find(|(n, _)| n == k) else {
            return Err(DescriptionError::Key { field: field.into(), key: k.clone() });
        };
        if matches!(rule, V::File) {
            return Err(DescriptionError::Key { field: field.into(), key: k.clone() });
        }
        check_value(&format!("{field} {k}"), rule, v)?;
    }
    Ok(())
}

/// A name beneath a storage directory: relative, plain components, no
/// `..`, no comma (never split by QEMU), printable.
pub fn valid_storage_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 1024
        && !s.starts_with('/')
        && s.split('/').all(|c| !c.is_empty() && c != "." && c != "..")
        && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.+/@~".contains(c))
}

fn check_storage(field: &str, s: &str) -> Result<(), DescriptionError> {
    if valid_storage_name(s) {
        Ok(())
    } else {
        Err(value_err(field, s, "a name beneath storage: relative, no '..', letters, digits and - _ . + / @ ~"))
    }
}

fn check_id(field: &str, id: &str) -> Result<(), DescriptionError> {
    check_value(field, &V::Id, id)?;
    if id.starts_with(RESERVED_PREFIX) {
        return Err(value_err(field, id, "ids starting with dcm- are the destination's own"));
    }
    Ok(())
}

fn bound<T>(field: &'static str, list: &[T], max: usize) -> Result<(), DescriptionError> {
    if list.len() > max {
        return Err(DescriptionError::TooMany { field, len: list.len(), max });
    }
    Ok(())
}

impl Description {
    /// Every value against the allow-lists, every list bounded, every id
    /// unique and every reference to one that exists.
    pub fn check(&self) -> Result<(), DescriptionError> {
        if !ARCHES.contains(&self.arch.as_str()) {
            return Err(value_err("arch", &self.arch, "an architecture this host runs"));
        }
        check_props("machine", &allow::MACHINE, &self.machine, &[])?;
        if self.machine.contains_key("memory-backend") {
            return Err(DescriptionError::Key { field: "machine".into(), key: "memory-backend".into() });
        }
        if let Some(a) = &self.accel {
            check_props("accel", &allow::ACCEL, a, &[])?;
        }
        if let Some(c) = &self.cpu {
            allow::check_cpu(c).map_err(|rule| value_err("cpu", c, rule))?;
        }
        if let Some(s) = &self.smp {
            check_props("smp", &allow::SMP, s, &[])?;
        }
        self.check_ram()?;
        self.check_boot()?;
        self.check_resources()?;
        self.check_devices()?;
        self.check_options()
    }

    fn check_ram(&self) -> Result<(), DescriptionError> {
        if self.ram.is_empty() {
            return Err(DescriptionError::Reference("no RAM region".into()));
        }
        bound("ram", &self.ram, MAX_RESOURCES)?;
        bound("numa", &self.numa, MAX_ITEMS)?;
        for r in &self.ram {
            check_id("ram id", &r.id)?;
            if r.size == 0 || r.size % crate::memory::PAGE_SIZE as u64 != 0 {
                return Err(value_err(format!("ram {} size", r.id), &r.size.to_string(), "a multiple of 4 KiB"));
            }
            check_props(&format!("ram {}", r.id), &allow::RAM_PROPS, &r.props, &[])?;
        }
        let ids: Vec<&str> = self.ram.iter().map(|r| r.id.as_str()).collect();
        let mut used = vec![];
        for n in &self.numa {
            check_props("numa", &allow::NUMA, n, &[])?;
            if let Some(m) = n.get("memdev") {
                if !ids.contains(&m.as_str()) || used.contains(m) {
                    return Err(DescriptionError::Reference(format!(
                        "numa memdev {m:?}: not a RAM region, or used twice"
                    )));
                }
                used.push(m.clone());
            }
        }
        // Several regions are each a NUMA node's memory: otherwise QEMU would
        // give the guest RAM of its own beside them.
        if self.ram.len() > 1 && used.len() != self.ram.len() {
            return Err(DescriptionError::Reference(
                "several RAM regions, not each a NUMA node's (-numa node,memdev=ID)".into(),
            ));
        }
        Ok(())
    }

    fn check_boot(&self) -> Result<(), DescriptionError> {
        let b = &self.boot;
        for (field, f) in [("kernel", &b.kernel), ("initrd", &b.initrd), ("dtb", &b.dtb)] {
            if let Some(f) = f {
                check_storage(field, f)?;
            }
        }
        if let Some(a) = &b.append {
            check_value("append", &V::Text, a)?;
        }
        match &b.bios {
            Some(Firmware::Builtin(n)) if n.contains('/') => Err(value_err("bios", n, "a bare file name")),
            Some(Firmware::Builtin(n)) => check_value("bios", &V::Word, n),
            Some(Firmware::Storage(n)) => check_storage("bios", n),
            None => Ok(()),
        }
    }

    fn check_resources(&self) -> Result<(), DescriptionError> {
        bound("disks", &self.disks, MAX_RESOURCES)?;
        bound("nets", &self.nets, MAX_RESOURCES)?;
        bound("chardevs", &self.chardevs, MAX_RESOURCES)?;
        bound("serials", &self.serials, 16)?;
        for d in &self.disks {
            check_id("disk id", &d.id)?;
            // QEMU's node names are shorter than 32 bytes.
            if d.id.len() > 31 {
                return Err(value_err("disk id", &d.id, "at most 31 characters (a QEMU node name)"));
            }
            check_storage(&format!("disk {}", d.id), &d.image)?;
            check_props(&format!("disk {}", d.id), &allow::DISK_PROPS, &d.props, &[])?;
        }
        for n in &self.nets {
            check_id("net id", &n.id)?;
            check_value(&format!("net {} network", n.id), &V::Id, &n.network)?;
            if let Some(p) = &n.nic {
                check_props(&format!("net {}", n.id), &allow::NIC_PROPS, p, &[])?;
            }
        }
        for c in &self.chardevs {
            check_id("chardev id", &c.id)?;
        }
        let mut seen = HashSet::new();
        let all = self.ram.iter().map(|r| &r.id).chain(self.disks.iter().map(|d| &d.id));
        for id in all.chain(self.nets.iter().map(|n| &n.id)).chain(self.chardevs.iter().map(|c| &c.id)) {
            if !seen.insert(id.as_str()) {
                return Err(DescriptionError::Reference(format!("id {id:?} is used twice")));
            }
        }
        let chardevs: Vec<&str> = self.chardevs.iter().map(|c| c.id.as_str()).collect();
        for s in &self.serials {
            if !["none", "null"].contains(&s.as_str()) && !chardevs.contains(&s.as_str()) {
                return Err(DescriptionError::Reference(format!("serial port on {s:?}, which is no chardev")));
            }
        }
        Ok(())
    }

    fn check_devices(&self) -> Result<(), DescriptionError> {
        bound("devices", &self.devices, MAX_ITEMS)?;
        bound("globals", &self.globals, MAX_ITEMS)?;
        bound("objects", &self.objects, MAX_RESOURCES)?;
        let refs: [(&str, Vec<&str>); 3] = [
            ("drive", self.disks.iter().map(|d| d.id.as_str()).collect()),
            ("netdev", self.nets.iter().map(|n| n.id.as_str()).collect()),
            ("chardev", self.chardevs.iter().map(|c| c.id.as_str()).collect()),
        ];
        for d in &self.devices {
            let driver = d.get("driver").map(String::as_str).unwrap_or_default();
            if !allow::DEVICES.contains(&driver) {
                return Err(value_err("device driver", driver, "a device this host allows"));
            }
            for (k, v) in d.iter().filter(|(k, _)| *k != "driver") {
                allow::check_device_prop(k, v).map_err(|rule| value_err(format!("device {driver} {k}"), v, rule))?;
                if let Some((_, ids)) = refs.iter().find(|(r, _)| r == k) {
                    if !ids.contains(&v.as_str()) {
                        return Err(DescriptionError::Reference(format!("device {driver}: no {k} {v:?}")));
                    }
                }
            }
        }
        for g in &self.globals {
            if !allow::DEVICES.contains(&g.driver.as_str()) && !allow::GLOBAL_DRIVERS.contains(&g.driver.as_str()) {
                return Err(value_err("global driver", &g.driver, "a driver this host allows"));
            }
            allow::check_device_prop(&g.property, &g.value)
                .map_err(|rule| value_err(format!("global {}.{}", g.driver, g.property), &g.value, rule))?;
        }
        for o in &self.objects {
            let kind = o.get("qom-type").map(String::as_str).unwrap_or_default();
            let Some(schema) = allow::plain_object(kind) else {
                return Err(value_err("object", kind, "iothread, rng-builtin or rng-random"));
            };
            check_props(&format!("object {kind}"), schema, o, &["qom-type"])?;
            check_id("object id", o.get("id").map(String::as_str).unwrap_or_default())?;
        }
        Ok(())
    }

    fn check_options(&self) -> Result<(), DescriptionError> {
        bound("options", &self.options, MAX_ITEMS)?;
        for (name, value) in &self.options {
            allow::check_plain_option(name, value.as_deref())
                .map_err(|rule| value_err(format!("option -{name}"), value.as_deref().unwrap_or_default(), rule))?;
        }
        Ok(())
    }

    /// The RAM regions as the engine's layout names them.
    pub fn regions(&self) -> Vec<crate::memory::RegionSpec> {
        self.ram.iter().map(|r| crate::memory::RegionSpec { id: r.id.clone(), size: r.size }).collect()
    }
}
