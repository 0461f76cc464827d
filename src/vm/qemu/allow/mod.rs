//! The allow-list a destination applies to a peer's QEMU launch spec: which
//! options, which properties of each and which values, and where files may
//! be. A launch spec comes from another host, so anything not listed here is
//! refused by name: a peer cannot make this host's QEMU read or write host
//! files, listen on the network, open a monitor or run helpers. The lists
//! themselves are in [`list`].

mod list;

use list::{Opt, Schema, BLOCKDEVS, BOOLS, CACHE, CACHE_MODES, DEVICES, GLOBAL_DRIVERS, MAX_TEXT, OPTIONS, V};
use serde_json::{Map, Value};
use std::path::{Component, Path, PathBuf};
use thiserror::Error;

/// Why a destination refused a launch spec.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum SpecError {
    /// An option not on the allow-list.
    #[error("the launch spec option -{0} is not allowed on this host")]
    Option(String),
    /// A word that is not an option where an option was expected.
    #[error("unexpected launch spec argument {0:?}")]
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
    /// A file outside the VM's directory and the operator's storage prefixes.
    #[error("-{opt}: {path:?} is outside the VM's directory and this host's storage prefixes (--storage)")]
    Path {
        /// The option.
        opt: String,
        /// The path.
        path: String,
    },
}

/// Where a launch spec may name files on this host.
#[derive(Clone, Debug)]
pub struct Confine<'a> {
    /// The VM's own directory here (`{dir}`).
    pub dir: &'a Path,
    /// Prefixes the operator allowed (shared storage for disks, kernels).
    pub storage: &'a [PathBuf],
}

/// Checks a launch spec (the agent's own options already taken out, `{dir}`
/// already replaced) against the allow-list.
pub fn check_args(args: &[String], confine: &Confine) -> Result<(), SpecError> {
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let Some(name) = a.strip_prefix("--").or_else(|| a.strip_prefix('-')) else {
            return Err(SpecError::Stray(a.clone()));
        };
        let Some((_, opt)) = OPTIONS.iter().find(|(n, _)| *n == name) else {
            return Err(SpecError::Option(name.to_owned()));
        };
        if matches!(opt, Opt::Flag) {
            continue;
        }
        let value = it.next().ok_or_else(|| SpecError::Missing(name.to_owned()))?;
        Check { opt: name, confine }.option(opt, value)?;
    }
    Ok(())
}

/// One option's checks, with what errors need to name.
struct Check<'a> {
    opt: &'a str,
    confine: &'a Confine<'a>,
}

impl Check<'_> {
    fn option(&self, opt: &Opt, value: &str) -> Result<(), SpecError> {
        match opt {
            Opt::Flag => Ok(()),
            Opt::Keyval(schema) => self.props(schema, &self.parse(value, schema.implied)?),
            Opt::Kinds { kind_key, kinds } => self.kinds(kind_key, kinds, &self.parse(value, Some(kind_key))?),
            Opt::Value(v) => self.value("value", v, value),
            Opt::Device => self.device(&self.parse(value, Some("driver"))?),
            Opt::Global => self.global(value),
            Opt::Cpu => {
                for part in split_keyval(value) {
                    let flag = part.strip_prefix(['+', '-']).unwrap_or(&part);
                    let (k, v) = flag.split_once('=').unwrap_or((flag, flag));
                    if !is_word(k) || !is_word(v) {
                        return Err(self.bad("value", &part, "CPU models, flags and properties are words"));
                    }
                }
                Ok(())
            }
            Opt::Serial => match value.split_once(':') {
                None if ["none", "null", "stdio"].contains(&value) => Ok(()),
                Some(("file", path)) => self.value("file", &V::File, path),
                Some(("chardev", id)) => self.value("chardev", &V::Id, id),
                _ => Err(self.bad("value", value, "none, null, stdio, file:PATH or chardev:ID")),
            },
            Opt::Bios if !value.contains('/') => self.value("value", &V::Word, value),
            Opt::Bios => self.value("value", &V::File, value),
        }
    }

    fn bad(&self, key: &str, value: &str, rule: &'static str) -> SpecError {
        SpecError::Value { opt: self.opt.into(), key: key.into(), value: value.into(), rule }
    }

    /// A value as QEMU reads it: JSON when it starts with `{`, else
    /// `key=value,...` with dotted keys nested (`file.filename=x`).
    fn parse(&self, value: &str, implied: Option<&str>) -> Result<Map<String, Value>, SpecError> {
        let err = || SpecError::Parse { opt: self.opt.into(), value: value.into() };
        if value.trim_start().starts_with('{') {
            return match serde_json::from_str::<Value>(value) {
                Ok(Value::Object(m)) => Ok(m),
                _ => Err(err()),
            };
        }
        let mut m = Map::new();
        for (i, part) in split_keyval(value).into_iter().enumerate() {
            let (k, v) = match (part.split_once('='), implied) {
                (Some((k, v)), _) => (k.to_owned(), v.to_owned()),
                (None, Some(k)) if i == 0 => (k.to_owned(), part),
                // A bare key is QEMU's shorthand for key=on.
                (None, _) => (part, "on".to_owned()),
            };
            insert_dotted(&mut m, &k, Value::String(v)).ok_or_else(err)?;
        }
        Ok(m)
    }

    fn props(&self, schema: &Schema, m: &Map<String, Value>) -> Result<(), SpecError> {
        for (k, v) in m {
            let Some((_, rule)) = schema.keys.iter().find(|(n, _)| n == k) else {
                return Err(SpecError::Key { opt: self.opt.into(), key: k.clone() });
            };
            self.json_value(k, rule, v)?;
        }
        Ok(())
    }

    fn kinds(&self, kind_key: &str, kinds: &[(&str, Schema)], m: &Map<String, Value>) -> Result<(), SpecError> {
        let kind = m.get(kind_key).and_then(Value::as_str).unwrap_or_default();
        let Some((_, schema)) = kinds.iter().find(|(n, _)| *n == kind) else {
            return Err(SpecError::Kind { opt: self.opt.into(), kind: kind.into() });
        };
        let mut rest = m.clone();
        rest.remove(kind_key);
        self.props(schema, &rest)
    }

    fn json_value(&self, key: &str, rule: &V, v: &Value) -> Result<(), SpecError> {
        match (rule, v) {
            (V::Node, Value::Object(m)) => self.kinds("driver", BLOCKDEVS, m),
            (V::Node, Value::Null) => Ok(()),
            (V::Cache, Value::Object(m)) => self.props(&CACHE, m),
            (_, Value::String(s)) => self.value(key, rule, s),
            (_, Value::Number(n)) => self.value(key, rule, &n.to_string()),
            (_, Value::Bool(b)) => self.value(key, rule, if *b { "on" } else { "off" }),
            _ => Err(self.bad(key, &v.to_string(), "a single value")),
        }
    }

    fn value(&self, key: &str, rule: &V, v: &str) -> Result<(), SpecError> {
        let ok = match rule {
            V::Id | V::Node => is_id(v),
            V::Num => !v.is_empty() && v.len() <= 20 && v.bytes().all(|b| b.is_ascii_digit()),
            V::Size => parse_qemu_size(v).is_some(),
            V::Bool => BOOLS.contains(&v),
            V::Word => is_word(v),
            V::Text => v.len() <= MAX_TEXT && !v.chars().any(char::is_control),
            V::OneOf(list) => list.contains(&v),
            V::Cache => CACHE_MODES.contains(&v),
            V::File => return self.file(v),
        };
        if ok {
            Ok(())
        } else {
            Err(self.bad(key, v, rule_text(rule)))
        }
    }

    /// An absolute path without `..`, inside the VM's directory or a storage
    /// prefix, also once symlinks are resolved (when it exists).
    fn file(&self, v: &str) -> Result<(), SpecError> {
        let p = Path::new(v);
        let plain = p.is_absolute()
            && v.len() <= 4096
            && !v.chars().any(char::is_control)
            && p.components().all(|c| matches!(c, Component::RootDir | Component::Normal(_)));
        let inside = |p: &Path| {
            std::iter::once(self.confine.dir)
                .chain(self.confine.storage.iter().map(PathBuf::as_path))
                .any(|root| p.starts_with(root) || root.canonicalize().is_ok_and(|r| p.starts_with(r)))
        };
        let resolved_inside = match p.canonicalize() {
            Ok(real) => inside(&real),
            Err(_) => true,
        };
        if plain && inside(p) && resolved_inside {
            Ok(())
        } else {
            Err(SpecError::Path { opt: self.opt.into(), path: v.into() })
        }
    }

    fn device(&self, m: &Map<String, Value>) -> Result<(), SpecError> {
        let driver = m.get("driver").and_then(Value::as_str).unwrap_or_default();
        if !DEVICES.contains(&driver) {
            return Err(SpecError::Kind { opt: self.opt.into(), kind: driver.into() });
        }
        m.iter().filter(|(k, _)| *k != "driver").try_for_each(|(k, v)| self.device_prop(k, v))
    }

    /// A device property: a plain name and a single plain value; `romfile`
    /// (a host file loaded into the guest) only empty.
    fn device_prop(&self, k: &str, v: &Value) -> Result<(), SpecError> {
        if !is_prop_name(k) {
            return Err(SpecError::Key { opt: self.opt.into(), key: k.into() });
        }
        self.json_value(k, &V::Text, v)?;
        if k == "romfile" && v.as_str() != Some("") {
            return Err(self.bad(k, &v.to_string(), "only romfile= (none)"));
        }
        Ok(())
    }

    fn global(&self, value: &str) -> Result<(), SpecError> {
        let m = self.parse(value, None)?;
        let (driver, prop, v) = match (m.get("driver"), m.get("property"), m.get("value")) {
            (Some(Value::String(d)), Some(Value::String(p)), Some(v)) if m.len() == 3 => (d.clone(), p.clone(), v),
            // The short form `driver.prop=value` parses as one nested key.
            _ => match m.iter().next() {
                Some((d, Value::Object(inner))) if m.len() == 1 && inner.len() == 1 => {
                    let (p, v) = inner.iter().next().expect("one entry");
                    (d.clone(), p.clone(), v)
                }
                _ => return Err(SpecError::Parse { opt: self.opt.into(), value: value.into() }),
            },
        };
        if !DEVICES.contains(&driver.as_str()) && !GLOBAL_DRIVERS.contains(&driver.as_str()) {
            return Err(SpecError::Kind { opt: self.opt.into(), kind: driver });
        }
        self.device_prop(&prop, v)
    }
}

fn rule_text(rule: &V) -> &'static str {
    match rule {
        V::Id | V::Node => "an id: a letter, then letters, digits, '-', '_', '.'",
        V::Num => "a number",
        V::Size => "a size",
        V::Bool => "on or off",
        V::Word => "letters, digits and _ . : + - @",
        V::Text => "printable text",
        V::OneOf(_) => "not one of the allowed values",
        V::Cache => "a cache mode",
        V::File => "a confined path",
    }
}

/// QEMU's size syntax: a number with an optional k/M/G/T suffix (binary units).
pub(super) fn parse_qemu_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last()? {
        (i, 'k' | 'K') => (&s[..i], 1u64 << 10),
        (i, 'm' | 'M') => (&s[..i], 1 << 20),
        (i, 'g' | 'G') => (&s[..i], 1 << 30),
        (i, 't' | 'T') => (&s[..i], 1 << 40),
        (i, 'b' | 'B') => (&s[..i], 1),
        _ => (s, 1),
    };
    num.parse::<u64>().ok()?.checked_mul(mult)
}

/// Splits QEMU's `key=value,key=value` syntax (`,,` is a literal comma).
pub(super) fn split_keyval(s: &str) -> Vec<String> {
    let mut parts = vec![String::new()];
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                parts.last_mut().expect("non-empty").push(',');
            } else {
                parts.push(String::new());
            }
        } else {
            parts.last_mut().expect("non-empty").push(c);
        }
    }
    parts
}

/// Deepest dotted key accepted (`file.cache.direct` is 3): a peer's
/// `a.a.a…` cannot nest the map, or the checks, thousands of levels deep.
const MAX_KEY_DEPTH: usize = 8;

/// Nests `a.b.c=v` as QEMU's keyval does; `None` when a key is both a
/// value and an object, is given twice, or is nested too deep.
fn insert_dotted(m: &mut Map<String, Value>, key: &str, v: Value) -> Option<()> {
    let parts: Vec<&str> = key.split('.').collect();
    if parts.len() > MAX_KEY_DEPTH {
        return None;
    }
    let (last, path) = parts.split_last()?;
    let mut m = m;
    for head in path {
        m = m.entry(head.to_string()).or_insert_with(|| Value::Object(Map::new())).as_object_mut()?;
    }
    m.insert(last.to_string(), v).is_none().then_some(())
}

fn is_id(s: &str) -> bool {
    s.len() <= 128
        && s.starts_with(|c: char| c.is_ascii_alphabetic())
        && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

fn is_word(s: &str) -> bool {
    !s.is_empty() && s.len() <= 256 && s.chars().all(|c| c.is_ascii_alphanumeric() || "_.:+-@".contains(c))
}

fn is_prop_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(args: &[&str]) -> Result<(), SpecError> {
        let storage = [PathBuf::from("/srv/images")];
        let confine = Confine { dir: Path::new("/data/vm.qemu"), storage: &storage };
        check_args(&args.iter().map(|s| s.to_string()).collect::<Vec<_>>(), &confine)
    }

    #[test]
    fn typical_command_lines_pass() {
        run(&[
            "-accel",
            "tcg",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-serial",
            "file:/data/vm.qemu/serial.log",
            "-m",
            "64M",
            "-object",
            "memory-backend-file,id=ram0,size=64M,mem-path=/src/x,share=on",
            "-machine",
            "memory-backend=ram0",
            "-numa",
            "node,memdev=ram0",
            "-kernel",
            "/srv/images/vmlinuz",
            "-append",
            "console=ttyS0 quiet",
            "-cpu",
            "host,+x2apic,-vmx,migratable=on",
            "-smp",
            "4,sockets=1",
            "-drive",
            "file=/srv/images/disk.qcow2,format=qcow2,if=none,id=d0,cache=none",
            "-device",
            "virtio-blk-pci,drive=d0,bootindex=1",
            "-blockdev",
            r#"{"driver":"qcow2","node-name":"n1","file":{"driver":"file","filename":"/srv/images/b.qcow2"}}"#,
            "-blockdev",
            "driver=raw,node-name=n2,file.driver=file,file.filename=/data/vm.qemu/scratch",
            "-netdev",
            "user,id=n0",
            "-device",
            r#"{"driver":"virtio-net-pci","netdev":"n0","mac":"52:54:00:12:34:56"}"#,
            "-chardev",
            "socket,id=c0,path=/data/vm.qemu/agent.sock,server=on,wait=off",
            "-global",
            "kvm-pit.lost_tick_policy=delay",
            "-bios",
            "bios-256k.bin",
        ])
        .unwrap();
    }

    #[test]
    fn every_attack_is_refused_by_name() {
        let cases: &[(&[&str], &str)] = &[
            (&["-serial", "file:/etc/cron.d/x"], "outside"),
            (&["-D", "/var/log/x"], "outside"),
            (&["-drive", "file=/etc/shadow,format=raw"], "outside"),
            (&["-drive", "file=/srv/images/../../etc/shadow"], "outside"),
            (&["-drive", "file=json:{\"driver\":\"nbd\"}"], "outside"),
            (&["-drive", "file.driver=nbd,file.host=x"], "file"),
            (&["-blockdev", &format!("driver=raw,{}=x", vec!["a"; 2000].join("."))], "cannot parse"),
            (&["-fsdev", "local,path=/,security_model=none,id=f"], "-fsdev"),
            (&["-monitor", "tcp:0.0.0.0:4444,server=on,wait=off"], "-monitor"),
            (&["-netdev", r#"{"type":"tap","id":"n","script":"/tmp/x"}"#], "script"),
            (&["-netdev", "bridge,id=n,br=br0"], "\"bridge\""),
            (&["-netdev", "user,id=n,smb=/"], "smb"),
            (&["-chardev", "socket,id=c,host=0.0.0.0,port=4444,server=on"], "host"),
            (&["-object", "rng-random,id=r,filename=/etc/shadow"], "filename"),
            (&["-device", "virtio-net-pci,romfile=/etc/shadow"], "romfile"),
            (&["-device", "vfio-pci,host=01:00.0"], "vfio-pci"),
            (&["-fw_cfg", "name=opt/x,file=/etc/shadow"], "file"),
            (&["-plugin", "file=/tmp/x.so"], "-plugin"),
            (&["-readconfig", "/etc/x"], "-readconfig"),
            (&["-add-fd", "fd=3,set=1"], "-add-fd"),
            (&["-vnc", "0.0.0.0:0"], "vnc"),
            (&["-kernel", "relative/vmlinuz"], "outside"),
            (&["-bios", "/etc/shadow"], "outside"),
            (&["-cpu", "host,x=a;b"], "cpu"),
            (&["-m", "1G,maxmem=x"], "maxmem"),
            (&["stray"], "stray"),
            (&["-m"], "needs a value"),
        ];
        for (args, want) in cases {
            let e = run(args).expect_err(&format!("{args:?} passed"));
            assert!(e.to_string().contains(want), "{args:?}: {e}");
        }
    }
}
