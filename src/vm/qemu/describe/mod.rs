//! Reading a QEMU command line into a [`Description`]: on the source at
//! `vm add` (the QEMU's own command line), and on a destination for a peer
//! of protocol 3 or older, which still sends a command line. Files become
//! names beneath this host's storage, networks operator network names,
//! serial files logs; what only matters to the host QEMU runs on (its
//! monitors, port forwards, debug log) is left out and said so in the
//! notes; anything else that cannot be expressed is refused, every such
//! option listed at once.

use super::allow::{self, Opt, Schema, V};
use super::description::{valid_storage_name, RamRegion};
use super::description::{Description, Firmware, Net, Props};
use crate::memory::RegionSpec;
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use thiserror::Error;

/// One part of a command line a description cannot carry.
#[derive(Debug, Error, PartialEq, Eq, Clone)]
pub enum SpecError {
    /// An option not on the allow-list.
    #[error("-{0} is not allowed")]
    Option(String),
    /// A word that is not an option where an option was expected.
    #[error("unexpected argument {0:?}")]
    Stray(String),
    /// An option without its value.
    #[error("-{0} needs a value")]
    Missing(String),
    /// A value that does not parse (JSON, QEMU's key=value syntax).
    #[error("-{opt}: cannot parse {value:?}")]
    Parse {
        /// The option.
        opt: String,
        /// Its value.
        value: String,
    },
    /// A kind of object, device, backend or driver not on the allow-list.
    #[error("-{opt}: {kind:?} is not allowed")]
    Kind {
        /// The option.
        opt: String,
        /// The kind named.
        kind: String,
    },
    /// A property not allowed for this option or kind.
    #[error("-{opt}: property {key:?} is not allowed")]
    Key {
        /// The option.
        opt: String,
        /// The property.
        key: String,
    },
    /// A value outside what the property allows.
    #[error("-{opt}: {key}={value:?} is not allowed ({rule})")]
    Value {
        /// The option.
        opt: String,
        /// The property.
        key: String,
        /// The value given.
        value: String,
        /// What is allowed.
        rule: &'static str,
    },
    /// A file that is not beneath a storage directory of this host.
    #[error(
        "-{opt}: {path:?} is not beneath this host's storage (--storage): destinations find files by their name there"
    )]
    Storage {
        /// The option.
        opt: String,
        /// The path.
        path: String,
    },
    /// Something the description has no way to say.
    #[error("-{opt}: {why}")]
    Unsupported {
        /// The option.
        opt: String,
        /// What is not supported, and what to use instead.
        why: String,
    },
}

/// A command line that cannot be described, with every reason.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("the VM cannot be described for other hosts: {}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
pub struct DescribeError(pub Vec<SpecError>);

/// What the source knows besides the command line.
pub struct Source<'a> {
    /// The QEMU program (its name gives the architecture).
    pub binary: &'a str,
    /// Its arguments, the agent's own options and monitors taken out.
    pub args: &'a [String],
    /// The RAM regions QEMU reported (ids and sizes).
    pub ram: &'a [RegionSpec],
    /// This host's storage directories.
    pub storage: &'a [PathBuf],
    /// Network names for netdev ids (`vm add --network ID=NAME`).
    pub networks: &'a BTreeMap<String, String>,
}

/// A description and what was left out of it.
#[derive(Debug, Clone, PartialEq)]
pub struct Described {
    /// The VM as destinations will run it.
    pub description: Description,
    /// Host-local parts of the command line that do not travel.
    pub notes: Vec<String>,
}

/// Reads `src`'s command line into a description.
pub fn describe(src: &Source) -> Result<Described, DescribeError> {
    let arch = Path::new(src.binary)
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("qemu-system-"))
        .unwrap_or_default();
    let mut b =
        Builder { src: Some(src), desc: Description::default(), notes: vec![], errs: vec![], ..Default::default() };
    b.desc.arch = arch.to_owned();
    if !super::description::ARCHES.contains(&arch) {
        b.errs.push(SpecError::Unsupported {
            opt: "binary".into(),
            why: format!("{:?} is not qemu-system-ARCH", src.binary),
        });
    }
    b.desc.ram = src
        .ram
        .iter()
        .map(|r| RamRegion { id: r.id.clone(), size: r.size, props: Props::new(), prealloc: false })
        .collect();
    let mut it = src.args.iter();
    while let Some(a) = it.next() {
        let Some(name) = a.strip_prefix("--").or_else(|| a.strip_prefix('-')) else {
            b.errs.push(SpecError::Stray(a.clone()));
            continue;
        };
        let known = allow::OPTIONS.iter().find(|(n, _)| *n == name).map(|(_, o)| !matches!(o, Opt::Flag));
        // An option not on the list is refused; its value (the next word,
        // unless that is an option) goes with it, not as a stray word.
        let takes_value = known.unwrap_or_else(|| {
            HOST_LOCAL_WITH_VALUE.contains(&name) || it.clone().next().is_some_and(|v| !v.starts_with('-'))
        });
        let value = if takes_value {
            match it.next() {
                Some(v) => Some(v.as_str()),
                None => {
                    b.errs.push(SpecError::Missing(name.to_owned()));
                    break;
                }
            }
        } else {
            None
        };
        if let Err(e) = b.option(name, value) {
            b.errs.push(e);
        }
    }
    b.finish()
}

/// Options that only matter on the host QEMU runs on: left out, noted.
const HOST_LOCAL_WITH_VALUE: &[&str] = &["D", "d", "display", "vnc"];

#[derive(Default)]
struct Builder<'a> {
    src: Option<&'a Source<'a>>,
    desc: Description,
    notes: Vec<String>,
    errs: Vec<SpecError>,
    /// `-blockdev driver=file` nodes not yet under a format node: name, image, props.
    files: Vec<(String, String, Props)>,
    /// Devices `-drive if=virtio` makes: QEMU creates them after every `-device`.
    drive_devices: Vec<Props>,
    /// The memory size `-m` gave.
    mem: Option<u64>,
    /// RAM regions a `-object` described.
    backends: Vec<String>,
}

impl<'a> std::ops::Deref for Builder<'a> {
    type Target = Source<'a>;
    fn deref(&self) -> &Source<'a> {
        self.src.expect("a source")
    }
}

fn bad(opt: &str, key: &str, value: &str, rule: &'static str) -> SpecError {
    SpecError::Value { opt: opt.into(), key: key.into(), value: value.chars().take(120).collect(), rule }
}

impl Builder<'_> {
    fn option(&mut self, name: &str, value: Option<&str>) -> Result<(), SpecError> {
        let v = value.unwrap_or_default();
        match name {
            "D" | "d" => self.note(format!("-{name} {v} (QEMU's debug log stays on this host)")),
            "display" | "vnc" => self.note(format!("-{name} {v} (destinations run without a display)")),
            "machine" | "M" => self.machine(v)?,
            "accel" => self.desc.accel = Some(self.props(name, v, &allow::ACCEL)?),
            "cpu" => {
                allow::check_cpu(v).map_err(|rule| bad(name, "value", v, rule))?;
                self.desc.cpu = Some(v.to_owned());
            }
            "smp" => self.desc.smp = Some(self.props(name, v, &allow::SMP)?),
            "m" => self.memory(v)?,
            "numa" => {
                let p = self.props(name, v, &allow::NUMA)?;
                self.desc.numa.push(p);
            }
            "object" => self.object(v)?,
            "netdev" => self.netdev(name, v, false)?,
            "nic" => self.netdev(name, v, true)?,
            "chardev" => self.chardev(v)?,
            "serial" => self.serial(v)?,
            "drive" => self.drive(v)?,
            "blockdev" => self.blockdev(v)?,
            "device" => self.device(v)?,
            "global" => self.global(v)?,
            "kernel" => self.desc.boot.kernel = Some(self.storage_name(name, v)?),
            "initrd" if v.contains(',') => {
                return Err(SpecError::Unsupported { opt: name.into(), why: "a list of initrds (a comma)".into() })
            }
            "initrd" => self.desc.boot.initrd = Some(self.storage_name(name, v)?),
            "dtb" => self.desc.boot.dtb = Some(self.storage_name(name, v)?),
            "append" => {
                if !allow::value_ok(&V::Text, v) {
                    return Err(bad(name, "value", v, allow::rule_text(&V::Text)));
                }
                self.desc.boot.append = Some(v.to_owned());
            }
            "bios" if !v.contains('/') && allow::value_ok(&V::Word, v) => {
                self.desc.boot.bios = Some(Firmware::Builtin(v.to_owned()))
            }
            "bios" => self.desc.boot.bios = Some(Firmware::Storage(self.storage_name(name, v)?)),
            _ => self.plain(name, value)?,
        }
        Ok(())
    }

    fn note(&mut self, what: String) {
        self.notes.push(format!("not carried: {what}"));
    }

    fn plain(&mut self, name: &str, value: Option<&str>) -> Result<(), SpecError> {
        if !allow::PLAIN_OPTIONS.iter().any(|(n, _)| *n == name) {
            return Err(SpecError::Option(name.to_owned()));
        }
        let v = allow::plain_option(name, value).map_err(|rule| bad(name, "value", value.unwrap_or_default(), rule))?;
        self.desc.options.push((name.to_owned(), v));
        Ok(())
    }

    /// A value parsed and flattened, each key on `schema` and each value by its rule.
    fn props(&self, opt: &str, v: &str, schema: &Schema) -> Result<Props, SpecError> {
        let parse = || SpecError::Parse { opt: opt.into(), value: v.into() };
        let props = allow::parse_value(v, schema.implied).and_then(|m| allow::flatten(&m)).ok_or_else(parse)?;
        check_schema(opt, schema, &props)?;
        Ok(props)
    }

    /// A path on this host as a name beneath one of its storage directories.
    fn storage_name(&self, opt: &str, path: &str) -> Result<String, SpecError> {
        let p = Path::new(path);
        let refused = || SpecError::Storage { opt: opt.into(), path: path.into() };
        let real = p.canonicalize().ok();
        for root in self.storage {
            let roots = [Some(root.clone()), root.canonicalize().ok()];
            for r in roots.iter().flatten() {
                for candidate in [Some(p), real.as_deref()].into_iter().flatten() {
                    if let Ok(rel) = candidate.strip_prefix(r) {
                        let name = rel.to_string_lossy().into_owned();
                        if valid_storage_name(&name) {
                            return Ok(name);
                        }
                    }
                }
            }
        }
        Err(refused())
    }

    fn machine(&mut self, v: &str) -> Result<(), SpecError> {
        let mut p = self.props("machine", v, &allow::MACHINE)?;
        if let Some(m) = p.remove("memory-backend") {
            if !self.ram.iter().any(|r| r.id == m) {
                return Err(bad("machine", "memory-backend", &m, "a RAM region of this VM"));
            }
        }
        self.desc.machine.extend(p);
        Ok(())
    }

    fn memory(&mut self, v: &str) -> Result<(), SpecError> {
        let p = self.props("m", v, &allow::MEM)?;
        if p.contains_key("slots") || p.contains_key("maxmem") {
            let why = "memory hotplug (slots, maxmem) is not supported".into();
            return Err(SpecError::Unsupported { opt: "m".into(), why });
        }
        let size = p.get("size").map(|s| {
            // A plain number is MiB to -m.
            if s.bytes().all(|b| b.is_ascii_digit()) {
                s.parse::<u64>().ok().and_then(|n| n.checked_mul(1 << 20))
            } else {
                allow::parse_qemu_size(s)
            }
        });
        self.mem = size.flatten();
        Ok(())
    }

    fn object(&mut self, v: &str) -> Result<(), SpecError> {
        let m = allow::parse_value(v, Some("qom-type"))
            .ok_or(SpecError::Parse { opt: "object".into(), value: v.into() })?;
        let mut p = allow::flatten(&m).ok_or(SpecError::Parse { opt: "object".into(), value: v.into() })?;
        let kind = p.remove("qom-type").unwrap_or_default();
        if kind.starts_with("memory-backend") && allow::OBJECTS.iter().any(|(k, _)| *k == kind) {
            return self.ram_backend(&kind, p);
        }
        let Some(schema) = allow::plain_object(&kind) else {
            return Err(SpecError::Kind { opt: "object".into(), kind });
        };
        check_schema("object", schema, &p)?;
        p.insert("qom-type".into(), kind);
        self.desc.objects.push(p);
        Ok(())
    }

    /// A RAM backend: matched to the region QEMU reported; what only this
    /// host's file needs (path, sharing, preallocation) is the destination's.
    fn ram_backend(&mut self, kind: &str, mut p: Props) -> Result<(), SpecError> {
        check_schema("object", &allow::MEMORY_BACKEND, &p)?;
        let id = p.remove("id").unwrap_or_default();
        let Some(region) = self.desc.ram.iter_mut().find(|r| r.id == id) else {
            return Err(SpecError::Unsupported {
                opt: "object".into(),
                why: format!("{kind} {id:?} is not one of the RAM regions QEMU reported"),
            });
        };
        region.prealloc = p.get("prealloc").is_some_and(|v| ["on", "true", "yes"].contains(&v.as_str()));
        // The page size is the RAM file's, told at session open.
        for k in ["size", "share", "mem-path", "prealloc", "seal", "hugetlb", "hugetlbsize"] {
            p.remove(k);
        }
        check_schema("object", &allow::RAM_PROPS, &p)?;
        region.props = p;
        self.backends.push(id);
        Ok(())
    }

    fn netdev(&mut self, opt: &str, v: &str, nic: bool) -> Result<(), SpecError> {
        let parse = || SpecError::Parse { opt: opt.into(), value: v.into() };
        let mut p = allow::parse_value(v, Some("type")).and_then(|m| allow::flatten(&m)).ok_or_else(parse)?;
        let kind = p.remove("type").unwrap_or_default();
        let Some((_, schema)) = allow::NETDEVS.iter().find(|(k, _)| *k == kind) else {
            return Err(SpecError::Kind { opt: opt.into(), kind });
        };
        let mut nic_props = Props::new();
        if nic {
            for k in ["model", "mac"] {
                if let Some(x) = p.remove(k) {
                    nic_props.insert(k.into(), x);
                }
            }
            check_schema(opt, &allow::NIC_PROPS, &nic_props)?;
        }
        check_schema(opt, schema, &p)?;
        if kind == "none" {
            self.desc.options.push((opt.to_owned(), Some("none".into())));
            return Ok(());
        }
        let id = match p.remove("id") {
            Some(id) => id,
            None if nic => format!("nic{}", self.desc.nets.len()),
            None => return Err(SpecError::Missing(format!("{opt} id"))),
        };
        let network = match (self.networks.get(&id), kind.as_str()) {
            (Some(n), _) => n.clone(),
            (None, "user") => "user".to_owned(),
            (None, _) => match p.get("ifname").and_then(|i| bridge_of(i)) {
                Some(br) => br,
                None => {
                    let why = format!("tap {id:?} is on no bridge: name its network with `vm add --network {id}=NAME`");
                    return Err(SpecError::Unsupported { opt: opt.into(), why });
                }
            },
        };
        let local: Vec<String> = p.iter().filter(|(k, _)| *k != "ifname").map(|(k, v)| format!("{k}={v}")).collect();
        if !local.is_empty() {
            self.note(format!("-{opt} {id}: {} (each host sets up network {network} its own way)", local.join(",")));
        }
        let nic = nic.then_some(nic_props);
        self.desc.nets.push(Net { id, network, nic });
        Ok(())
    }
}

/// The bridge a tap interface is enslaved to, on this host.
fn bridge_of(ifname: &str) -> Option<String> {
    if !allow::is_id(ifname) {
        return None;
    }
    let link = std::fs::read_link(format!("/sys/class/net/{ifname}/master")).ok()?;
    let name = link.file_name()?.to_str()?.to_owned();
    allow::is_id(&name).then_some(name)
}

/// Every key of `props` on `schema`, every value by its rule (files are
/// not allowed: their keys are handled before).
fn check_schema(opt: &str, schema: &Schema, props: &Props) -> Result<(), SpecError> {
    for (k, v) in props {
        let Some((_, rule)) = schema.keys.iter().find(|(n, _)| n == k) else {
            return Err(SpecError::Key { opt: opt.into(), key: k.clone() });
        };
        if !allow::value_ok(rule, v) {
            return Err(bad(opt, k, v, allow::rule_text(rule)));
        }
    }
    Ok(())
}

/// A JSON value flattened, for the block and device parsers.
fn flat(opt: &str, v: &str, implied: Option<&str>) -> Result<(Map<String, Value>, Props), SpecError> {
    let parse = || SpecError::Parse { opt: opt.into(), value: v.chars().take(120).collect() };
    let m = allow::parse_value(v, implied).ok_or_else(parse)?;
    let p = allow::flatten(&m).ok_or_else(parse)?;
    Ok((m, p))
}

mod parts;
