//! The parts of a command line that name host resources or other parts:
//! character devices, serial ports, disks, devices and globals; and the
//! last checks once the whole line was read.

use super::{bad, check_schema, flat, Builder, DescribeError, Described, SpecError};
use crate::vm::qemu::allow;
use crate::vm::qemu::description::{Chardev, ChardevKind, Disk, Format, Global, Props};
use serde_json::Value;

fn unsupported(opt: &str, why: impl Into<String>) -> SpecError {
    SpecError::Unsupported { opt: opt.into(), why: why.into() }
}

fn is_on(v: &str) -> bool {
    ["on", "true", "yes"].contains(&v)
}

impl Builder<'_> {
    pub(super) fn chardev(&mut self, v: &str) -> Result<(), SpecError> {
        let (_, mut p) = flat("chardev", v, Some("backend"))?;
        let backend = p.remove("backend").unwrap_or_default();
        let Some((_, schema)) = allow::CHARDEVS.iter().find(|(k, _)| *k == backend) else {
            return Err(SpecError::Kind { opt: "chardev".into(), kind: backend });
        };
        let id = p.get("id").cloned().ok_or_else(|| SpecError::Missing("chardev id".into()))?;
        if let Some(log) = p.remove("logfile") {
            self.note(format!("-chardev {id}: logfile={log} (a host's copy of the output)"));
            p.remove("logappend");
        }
        let path = p.remove("path");
        let kind = match backend.as_str() {
            "null" => ChardevKind::Null,
            "ringbuf" => ChardevKind::Ringbuf { size: p.get("size").and_then(|s| allow::parse_qemu_size(s)) },
            "stdio" => ChardevKind::Stdio,
            "file" if path.is_some() => ChardevKind::Log,
            "socket" if path.is_some() && p.get("server").is_some_and(|s| is_on(s)) => ChardevKind::Socket,
            "socket" => return Err(unsupported("chardev", format!("{id}: only a unix socket QEMU listens on"))),
            _ => return Err(SpecError::Missing(format!("chardev {id} path"))),
        };
        check_schema("chardev", schema, &p)?;
        self.desc.chardevs.push(Chardev { id, kind });
        Ok(())
    }

    /// A chardev id not used yet, from `base`.
    fn fresh_id(&self, base: &str) -> String {
        let taken = |id: &str| self.desc.chardevs.iter().any(|c| c.id == id);
        (0..).map(|n| format!("{base}{n}")).find(|id| !taken(id)).expect("an unused id")
    }

    pub(super) fn serial(&mut self, v: &str) -> Result<(), SpecError> {
        let port = match v.split_once(':') {
            None if ["none", "null"].contains(&v) => v.to_owned(),
            None if v == "stdio" => {
                let id = self.fresh_id("serial-stdio");
                self.desc.chardevs.push(Chardev { id: id.clone(), kind: ChardevKind::Stdio });
                id
            }
            Some(("file", _)) => {
                let id = self.fresh_id("serial");
                self.desc.chardevs.push(Chardev { id: id.clone(), kind: ChardevKind::Log });
                id
            }
            Some(("chardev", id)) if allow::is_id(id) => id.to_owned(),
            _ => return Err(bad("serial", "value", v, "none, null, stdio, file:PATH or chardev:ID")),
        };
        self.desc.serials.push(port);
        Ok(())
    }

    pub(super) fn drive(&mut self, v: &str) -> Result<(), SpecError> {
        let (_, mut p) = flat("drive", v, None)?;
        let file = p.remove("file").ok_or_else(|| SpecError::Missing("drive file".into()))?;
        let image = self.storage_name("drive", &file)?;
        let format = format_of("drive", p.remove("format").as_deref())?;
        let read_only = ["readonly", "read-only"].iter().filter_map(|k| p.remove(*k)).any(|x| is_on(&x));
        let mut props = Props::new();
        match p.remove("cache").as_deref() {
            None | Some("writeback") => {}
            Some("none") => drop(props.insert("cache.direct".into(), "on".into())),
            Some("unsafe") => drop(props.insert("cache.no-flush".into(), "on".into())),
            Some(other) => return Err(unsupported("drive", format!("cache={other}: use none, writeback or unsafe"))),
        }
        for k in ["aio", "discard", "detect-zeroes"] {
            if let Some(x) = p.remove(k) {
                props.insert(k.into(), x);
            }
        }
        p.remove("media");
        let interface = p.remove("if");
        let mut device = Props::new();
        for k in ["werror", "rerror", "serial"] {
            if let Some(x) = p.remove(k) {
                device.insert(k.into(), x);
            }
        }
        let id = match (interface.as_deref(), p.remove("id")) {
            (Some("none"), Some(id)) if device.is_empty() => id,
            (Some("none"), _) if !device.is_empty() => {
                return Err(unsupported("drive", "werror, rerror and serial belong on the -device"))
            }
            (Some("virtio"), id) => {
                let id = id.unwrap_or_else(|| format!("virtio{}", self.drive_devices.len()));
                device.insert("driver".into(), "virtio-blk-pci".into());
                device.insert("drive".into(), id.clone());
                self.drive_devices.push(device);
                id
            }
            (Some("none"), None) => return Err(SpecError::Missing("drive id".into())),
            (other, _) => {
                let why = format!("if={}: use if=none with a -device, or if=virtio", other.unwrap_or("(default)"));
                return Err(unsupported("drive", why));
            }
        };
        if let Some(k) = p.keys().next() {
            return Err(SpecError::Key { opt: "drive".into(), key: k.clone() });
        }
        check_schema("drive", &allow::DISK_PROPS, &props)?;
        self.desc.disks.push(Disk { id, image, format, read_only, props });
        Ok(())
    }

    pub(super) fn blockdev(&mut self, v: &str) -> Result<(), SpecError> {
        let (m, mut p) = flat("blockdev", v, None)?;
        if m.contains_key("backing") {
            return Err(unsupported("blockdev", "explicit backing nodes: destinations follow the image's own chain"));
        }
        let driver = p.remove("driver").unwrap_or_default();
        let node = p.remove("node-name").ok_or_else(|| SpecError::Missing("blockdev node-name".into()))?;
        if driver == "file" {
            let (image, props) = self.file_node(&mut p)?;
            self.files.push((node, image, props));
            return Ok(());
        }
        let format = format_of("blockdev", Some(&driver))?;
        let read_only = p.remove("read-only").is_some_and(|x| is_on(&x));
        p.remove("auto-read-only");
        let (image, mut props) = match m.get("file") {
            Some(Value::String(f)) => {
                p.remove("file");
                let i = self.files.iter().position(|(n, _, _)| n == f);
                let (_, image, props) = self
                    .files
                    .remove(i.ok_or_else(|| unsupported("blockdev", format!("no file node {f:?} before it")))?);
                (image, props)
            }
            Some(Value::Object(_)) => {
                let mut inner: Props =
                    p.iter().filter_map(|(k, v)| k.strip_prefix("file.").map(|k| (k.to_owned(), v.clone()))).collect();
                p.retain(|k, _| !k.starts_with("file."));
                if inner.remove("driver").as_deref() != Some("file") {
                    return Err(unsupported("blockdev", "a format node over a local file (file.driver=file)"));
                }
                self.file_node(&mut inner)?
            }
            _ => return Err(SpecError::Missing("blockdev file".into())),
        };
        for k in ["discard", "detect-zeroes", "cache.direct", "cache.no-flush"] {
            if let Some(x) = p.remove(k) {
                props.insert(k.into(), x);
            }
        }
        if let Some(k) = p.keys().next() {
            return Err(SpecError::Key { opt: "blockdev".into(), key: k.clone() });
        }
        check_schema("blockdev", &allow::DISK_PROPS, &props)?;
        self.desc.disks.push(Disk { id: node, image, format, read_only, props });
        Ok(())
    }

    /// A `driver=file` node's image and the options a disk keeps; locking
    /// and sharing stay QEMU's defaults (a disk is never opened unlocked).
    fn file_node(&mut self, p: &mut Props) -> Result<(String, Props), SpecError> {
        let filename = p.remove("filename").ok_or_else(|| SpecError::Missing("blockdev filename".into()))?;
        let image = self.storage_name("blockdev", &filename)?;
        match (p.remove("locking").as_deref(), p.remove("force-share").as_deref()) {
            (Some("off" | "false" | "no"), _) => return Err(unsupported("blockdev", "locking=off")),
            (_, Some(x)) if is_on(x) => return Err(unsupported("blockdev", "force-share=on")),
            _ => {}
        }
        p.remove("read-only");
        p.remove("auto-read-only");
        let mut props = Props::new();
        for k in ["aio", "discard", "detect-zeroes", "cache.direct", "cache.no-flush"] {
            if let Some(x) = p.remove(k) {
                props.insert(k.into(), x);
            }
        }
        if let Some(k) = p.keys().next() {
            return Err(SpecError::Key { opt: "blockdev".into(), key: k.clone() });
        }
        Ok((image, props))
    }

    pub(super) fn device(&mut self, v: &str) -> Result<(), SpecError> {
        let (_, p) = flat("device", v, Some("driver"))?;
        let driver = p.get("driver").cloned().unwrap_or_default();
        if !allow::DEVICES.contains(&driver.as_str()) {
            return Err(SpecError::Kind { opt: "device".into(), kind: driver });
        }
        for (k, x) in p.iter().filter(|(k, _)| *k != "driver") {
            allow::check_device_prop(k, x).map_err(|rule| bad("device", k, x, rule))?;
        }
        self.desc.devices.push(p);
        Ok(())
    }

    pub(super) fn global(&mut self, v: &str) -> Result<(), SpecError> {
        let (_, p) = flat("global", v, None)?;
        let parse = || SpecError::Parse { opt: "global".into(), value: v.into() };
        let g = match (p.get("driver"), p.get("property"), p.get("value")) {
            (Some(d), Some(pr), Some(x)) if p.len() == 3 => {
                Global { driver: d.clone(), property: pr.clone(), value: x.clone() }
            }
            // The short form `driver.prop=value` parses as one dotted key.
            _ => match p.iter().next() {
                Some((k, x)) if p.len() == 1 => {
                    let (d, pr) = k.split_once('.').ok_or_else(parse)?;
                    Global { driver: d.into(), property: pr.into(), value: x.clone() }
                }
                _ => return Err(parse()),
            },
        };
        if !allow::DEVICES.contains(&g.driver.as_str()) && !allow::GLOBAL_DRIVERS.contains(&g.driver.as_str()) {
            return Err(SpecError::Kind { opt: "global".into(), kind: g.driver });
        }
        allow::check_device_prop(&g.property, &g.value).map_err(|rule| bad("global", &g.property, &g.value, rule))?;
        self.desc.globals.push(g);
        Ok(())
    }

    /// What the whole line must satisfy: every RAM region on it, `-m` their
    /// sum, and the result passing a destination's own check.
    pub(super) fn finish(mut self) -> Result<Described, DescribeError> {
        self.desc.devices.append(&mut self.drive_devices);
        for (node, image, props) in std::mem::take(&mut self.files) {
            self.desc.disks.push(Disk { id: node, image, format: Format::Raw, read_only: false, props });
        }
        for r in &self.desc.ram {
            if !self.backends.contains(&r.id) {
                self.errs.push(unsupported("object", format!("RAM region {} is not on the command line", r.id)));
            }
        }
        let total: u64 = self.desc.ram.iter().map(|r| r.size).sum();
        if let Some(m) = self.mem.filter(|m| *m != total) {
            self.errs.push(unsupported("m", format!("{m} bytes, but the RAM regions hold {total}")));
        }
        if self.errs.is_empty() {
            if let Err(e) = self.desc.check() {
                self.errs.push(unsupported("description", e.to_string()));
            }
        }
        if !self.errs.is_empty() {
            return Err(DescribeError(self.errs));
        }
        Ok(Described { description: self.desc, notes: self.notes })
    }
}

fn format_of(opt: &str, f: Option<&str>) -> Result<Format, SpecError> {
    match f {
        Some("raw") => Ok(Format::Raw),
        Some("qcow2") => Ok(Format::Qcow2),
        Some(other) => Err(SpecError::Kind { opt: opt.into(), kind: other.into() }),
        None => Err(unsupported(opt, "no format= (a destination never guesses an image's format)")),
    }
}
