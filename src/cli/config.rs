//! `dcmigrate agent --config FILE`: the agent's options as a TOML file, and
//! their merge with the command line. Every key is named as its flag (with
//! `_` for `-`); a flag given on the command line or by its environment
//! variable wins over the file, and the file wins over the flag's default.
//! `[peers]` is a table whose entries the `--peer` flags add to or replace.

use super::agent::AgentArgs;
use serde::Deserialize;
use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use thiserror::Error;

/// A configuration file larger than this is refused (it is a few lines).
const MAX_FILE: u64 = 1 << 20;

/// The configuration file could not be used.
#[derive(Debug, Error)]
pub(crate) enum ConfigError {
    /// Reading it failed.
    #[error("reading {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Larger than [`MAX_FILE`].
    #[error("{0}: larger than {MAX_FILE} bytes: not an agent configuration")]
    TooLarge(PathBuf),
    /// Not TOML, an unknown key, or a value of the wrong kind.
    #[error("{path}: {msg}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// toml's message: the key, its line and what is wrong with it.
        msg: String,
    },
    /// A required option is in neither the file nor the command line.
    #[error("no {key}: give --{flag} or `{key} = ...` in the configuration file")]
    Missing {
        /// The file's key.
        key: &'static str,
        /// The flag.
        flag: &'static str,
    },
}

/// A size like `64G` (see [`super::parse_size`]), or a number of bytes.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(try_from = "SizeRepr")]
pub(crate) struct Size(pub u64);

#[derive(Deserialize)]
#[serde(untagged)]
enum SizeRepr {
    Bytes(u64),
    Text(String),
}

impl TryFrom<SizeRepr> for Size {
    type Error = String;
    fn try_from(r: SizeRepr) -> Result<Self, String> {
        match r {
            SizeRepr::Bytes(0) => Err("size must be positive: 0".into()),
            SizeRepr::Bytes(n) => Ok(Size(n)),
            SizeRepr::Text(s) => super::parse_size(&s).map(Size),
        }
    }
}

/// A host name as certificates carry it (letters, digits, `-`, `.`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(try_from = "String")]
pub(crate) struct Host(pub String);

impl TryFrom<String> for Host {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        let ok =
            !s.is_empty() && s.len() <= 253 && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.');
        if ok {
            Ok(Host(s))
        } else {
            Err(format!("{s:?} is not a host name (letters, digits, '-' and '.')"))
        }
    }
}

/// A `--storage` prefix: an absolute path without `..`.
#[derive(Debug, Clone, Deserialize)]
#[serde(try_from = "PathBuf")]
pub(crate) struct StoragePath(pub PathBuf);

impl TryFrom<PathBuf> for StoragePath {
    type Error = String;
    fn try_from(p: PathBuf) -> Result<Self, String> {
        super::agent::parse_storage(&p.to_string_lossy()).map(StoragePath)
    }
}

/// `on` or `off` (`--data-encryption`).
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum OnOff {
    /// Enabled.
    On,
    /// Disabled.
    Off,
}

/// An InfiniBand service level, 0–15.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(try_from = "u8")]
pub(crate) struct ServiceLevel(pub u8);

impl TryFrom<u8> for ServiceLevel {
    type Error = String;
    fn try_from(v: u8) -> Result<Self, String> {
        (v <= 15).then_some(ServiceLevel(v)).ok_or_else(|| format!("{v} is not a service level (0-15)"))
    }
}

/// Register threads, 1–1024.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(try_from = "u16")]
pub(crate) struct Threads(pub u16);

impl TryFrom<u16> for Threads {
    type Error = String;
    fn try_from(v: u16) -> Result<Self, String> {
        (1..=1024).contains(&v).then_some(Threads(v)).ok_or_else(|| format!("{v} threads: 1 to 1024"))
    }
}

/// Seconds, finite and positive.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(try_from = "f64")]
pub(crate) struct Secs(pub f64);

impl TryFrom<f64> for Secs {
    type Error = String;
    fn try_from(v: f64) -> Result<Self, String> {
        (v.is_finite() && v > 0.0).then_some(Secs(v)).ok_or_else(|| format!("{v} is not a positive number of seconds"))
    }
}

/// Declares the file's keys, each with its type in the file, the
/// `AgentArgs` field it sets and how its value becomes the flag's: a new
/// key is one line here. A key is the clap id of its flag (the field's name).
macro_rules! agent_file {
    ($($key:ident: $ty:ty => $($field:ident).+ = $to_flag:expr,)*) => {
        /// The agent's configuration file: every key optional.
        #[derive(Debug, Default, Deserialize)]
        #[serde(deny_unknown_fields)]
        pub(crate) struct AgentFile {
            /// `[peers]`: NAME = "ADDR", added to by `--peer`.
            #[serde(default)]
            pub peers: BTreeMap<Host, SocketAddr>,
            $(
                #[doc = concat!("`", stringify!($key), "`: as its flag.")]
                pub $key: Option<$ty>,
            )*
        }

        impl AgentFile {
            /// Sets each flag that `given` (command line or environment)
            /// does not name to the file's value, where the file has one.
            fn fill(self, a: &mut AgentArgs, given: &HashSet<String>) {
                $(
                    if let (Some(v), false) = (self.$key, given.contains(stringify!($key))) {
                        a.$($field).+ = ($to_flag)(v);
                    }
                )*
                // The file's peers first: a --peer of the same name replaces it.
                let flags = std::mem::take(&mut a.peers);
                a.peers = self.peers.into_iter().map(|(h, addr)| (h.0, addr)).chain(flags).collect();
            }
        }
    };
}

agent_file! {
    name: Host => name = |v: Host| Some(v.0),
    listen: SocketAddr => listen = |v| v,
    data_listen: SocketAddr => data_listen = Some,
    certs: PathBuf => certs = Some,
    accept_from: Vec<Host> => accept_from = |v: Vec<Host>| v.into_iter().map(|h| h.0).collect(),
    storage: Vec<StoragePath> => storage = |v: Vec<StoragePath>| v.into_iter().map(|p| p.0).collect(),
    data_dir: PathBuf => data_dir = Some,
    hugepages: Vec<PathBuf> => hugepages = |v| v,
    max_session_ram: Size => max_session_ram = |v: Size| Some(v.0),
    max_incoming_ram: Size => max_incoming_ram = |v: Size| Some(v.0),
    data_encryption: OnOff => data_encryption = |v| match v { OnOff::On => "on".to_owned(), OnOff::Off => "off".to_owned() },
    qemu_user: String => qemu_user = Some,
    qemu_uids: String => qemu_uids = Some,
    networks: Vec<String> => networks = |v| v,
    synthetic_guests: bool => synthetic_guests = |v| v,
    qemu_scope: crate::vm::scope::ScopeMode => qemu_scope = |v| v,
    state_dir: PathBuf => state_dir = Some,
    rdma_device: String => rdma_device = Some,
    rdma_gid_index: u8 => rdma_gid_index = Some,
    rdma_traffic_class: u8 => rdma_traffic_class = |v| v,
    rdma_sl: ServiceLevel => rdma_sl = |v: ServiceLevel| v.0,
    rdma_pkey_index: u16 => rdma_pkey_index = |v| v,
    rdma_register_threads: Threads => rdma_register_threads = |v: Threads| Some(v.0),
    rdma_odp: bool => rdma_odp = |v| v,
    no_rdma: bool => no_rdma = |v| v,
    peer_timeout: Secs => peer_timeout = |v: Secs| v.0,
    api: PathBuf => api.api = |v| v,
    api_group: String => api_group = Some,
    metrics: SocketAddr => metrics = Some,
    max_incoming: u32 => max_incoming = Some,
    max_incoming_per_peer: u32 => max_incoming_per_peer = Some,
    max_outgoing: u32 => max_outgoing = Some,
    drained: bool => drained = |v| v,
}

impl AgentFile {
    /// Reads and checks `path`: TOML, only known keys, valid values.
    pub(crate) fn load(path: &Path) -> Result<Self, ConfigError> {
        use std::io::Read;
        let read = |source| ConfigError::Read { path: path.to_owned(), source };
        let mut text = String::new();
        std::fs::File::open(path).map_err(read)?.take(MAX_FILE + 1).read_to_string(&mut text).map_err(read)?;
        if text.len() as u64 > MAX_FILE {
            return Err(ConfigError::TooLarge(path.to_owned()));
        }
        Self::parse(&text).map_err(|msg| ConfigError::Parse { path: path.to_owned(), msg })
    }

    /// Parses a file's text; the error is toml's, naming the key and line.
    pub(crate) fn parse(text: &str) -> Result<Self, String> {
        toml::from_str(text).map_err(|e| e.to_string().trim_end().to_owned())
    }
}

/// The options of `m` that the command line or the environment gave.
pub(crate) fn given(m: &clap::ArgMatches) -> HashSet<String> {
    use clap::parser::ValueSource;
    m.ids()
        .filter(|id| matches!(m.value_source(id.as_str()), Some(ValueSource::CommandLine | ValueSource::EnvVariable)))
        .map(|id| id.as_str().to_owned())
        .collect()
}

/// Merges `file` (if any) under the flags `given` on the command line or by
/// environment, and checks what is required is there.
pub(crate) fn merge(a: &mut AgentArgs, file: Option<&Path>, given: &HashSet<String>) -> Result<(), ConfigError> {
    if let Some(path) = file {
        AgentFile::load(path)?.fill(a, given);
    }
    if a.name.is_none() {
        return Err(ConfigError::Missing { key: "name", flag: "name" });
    }
    if a.certs.is_none() {
        return Err(ConfigError::Missing { key: "certs", flag: "certs" });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{try_parse_from, Cmd};
    use std::io::Write;

    fn args(flags: &[&str]) -> AgentArgs {
        let argv = ["dcmigrate", "agent"].iter().chain(flags);
        match try_parse_from(argv).unwrap().cmd {
            Cmd::Agent(a) => *a,
            _ => unreachable!("an agent command line"),
        }
    }

    fn file(text: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(text.as_bytes()).unwrap();
        f
    }

    fn merged(text: &str, flags: &[&str]) -> Result<AgentArgs, ConfigError> {
        let f = file(text);
        let mut a = args(flags);
        let given = std::mem::take(&mut a.given);
        merge(&mut a, Some(f.path()), &given).map(|_| a)
    }

    #[test]
    fn the_shipped_example_parses_whole() {
        let f = AgentFile::parse(include_str!("../../dist/agent.toml")).unwrap();
        assert_eq!(f.name.unwrap().0, "hostA");
        assert_eq!(f.max_session_ram.unwrap().0, 64 << 30);
        assert_eq!(f.peers.len(), 2);
        assert_eq!(f.metrics.unwrap().to_string(), "127.0.0.1:9471");
    }

    #[test]
    fn the_file_fills_what_the_flags_leave() {
        let a = merged(
            "name = \"hostA\"\ncerts = \"/etc/c\"\nlisten = \"10.0.0.1:4710\"\nmax_session_ram = \"64G\"\n\
             max_incoming_ram = 1048576\ndata_encryption = \"off\"\nrdma_sl = 3\nno_rdma = true\npeer_timeout = 2.5\n\
             api = \"/run/x.sock\"\naccept_from = [\"hostB\"]\nstorage = [\"/srv/img\"]\nqemu_scope = \"off\"\n",
            &[],
        )
        .unwrap();
        assert_eq!(a.name.as_deref(), Some("hostA"));
        assert_eq!(a.certs.as_deref(), Some(Path::new("/etc/c")));
        assert_eq!(a.listen.to_string(), "10.0.0.1:4710");
        assert_eq!(a.max_session_ram, Some(64 << 30));
        assert_eq!(a.max_incoming_ram, Some(1 << 20));
        assert_eq!(a.data_encryption, "off");
        assert_eq!(a.rdma_sl, 3);
        assert!(a.no_rdma);
        assert_eq!(a.peer_timeout, 2.5);
        assert_eq!(a.api.api, Path::new("/run/x.sock"));
        assert_eq!(a.accept_from, ["hostB"]);
        assert_eq!(a.storage, [PathBuf::from("/srv/img")]);
        assert_eq!(a.qemu_scope, crate::vm::scope::ScopeMode::Off);
    }

    #[test]
    fn flags_win_over_the_file_and_defaults_do_not() {
        let text = "name = \"hostA\"\ncerts = \"/etc/c\"\nlisten = \"10.0.0.1:4710\"\npeer_timeout = 3\n\
                    max_session_ram = \"64G\"\n";
        let a = merged(text, &["--name", "hostZ", "--listen", "127.0.0.1:5000", "--max-session-ram", "1G"]).unwrap();
        assert_eq!(a.name.as_deref(), Some("hostZ"));
        assert_eq!(a.listen.to_string(), "127.0.0.1:5000");
        assert_eq!(a.max_session_ram, Some(1 << 30));
        // Not on the command line: the file's, not the flag's default (10).
        assert_eq!(a.peer_timeout, 3.0);
        assert_eq!(a.certs.as_deref(), Some(Path::new("/etc/c")));
    }

    #[test]
    fn peer_flags_add_to_and_replace_the_files_peers() {
        let text = "name = \"a\"\ncerts = \"/c\"\n[peers]\nhostB = \"10.0.0.2:4710\"\nhostC = \"10.0.0.3:4710\"\n";
        let a = merged(text, &["--peer", "hostC=10.0.0.9:4710", "--peer", "hostD=10.0.0.4:4710"]).unwrap();
        // Collected into a map later: the last of a name wins.
        let map: std::collections::HashMap<_, _> = a.peers.iter().cloned().collect();
        assert_eq!(map.len(), 3);
        assert_eq!(map["hostB"].to_string(), "10.0.0.2:4710");
        assert_eq!(map["hostC"].to_string(), "10.0.0.9:4710");
        assert_eq!(map["hostD"].to_string(), "10.0.0.4:4710");
    }

    #[test]
    fn unknown_keys_and_bad_values_are_refused_by_name() {
        let cases = [
            ("name = \"a\"\nlisten_addr = \"1.2.3.4:5\"\n", "listen_addr"),
            ("max_session_ram = \"64Q\"\n", "max_session_ram"),
            ("max_session_ram = 0\n", "max_session_ram"),
            ("listen = \"10.0.0.1\"\n", "listen"),
            ("[peers]\nhostB = \"nowhere\"\n", "hostB"),
            ("[peers]\n\"bad host\" = \"10.0.0.2:1\"\n", "bad host"),
            ("rdma_sl = 16\n", "rdma_sl"),
            ("peer_timeout = -1\n", "peer_timeout"),
            ("data_encryption = \"maybe\"\n", "data_encryption"),
            ("storage = [\"relative/dir\"]\n", "storage"),
            ("qemu_scope = \"sometimes\"\n", "qemu_scope"),
            ("name = [1, 2]\n", "name"),
            ("this is not toml", "line 1"),
        ];
        for (text, key) in cases {
            let e = merged(text, &["--name", "a", "--certs", "/c"]).err().unwrap_or_else(|| panic!("accepted: {text}"));
            let msg = crate::error_chain(&e);
            assert!(matches!(e, ConfigError::Parse { .. }), "{text}: {msg}");
            assert!(msg.contains(key), "{text}: the message should name {key}: {msg}");
            assert!(msg.contains(".tmp"), "{text}: the message should name the file: {msg}");
        }
    }

    #[test]
    fn name_and_certs_are_required_from_one_or_the_other() {
        let e = merged("certs = \"/c\"\n", &[]).err().unwrap();
        assert!(matches!(e, ConfigError::Missing { key: "name", .. }), "{e}");
        let e = merged("name = \"a\"\n", &[]).err().unwrap();
        assert!(matches!(e, ConfigError::Missing { key: "certs", .. }), "{e}");
        let mut a = args(&["--name", "a", "--certs", "/c"]);
        let given = std::mem::take(&mut a.given);
        merge(&mut a, None, &given).unwrap();
        let mut a = args(&[]);
        assert!(merge(&mut a, None, &HashSet::new()).is_err());
    }

    #[test]
    fn a_missing_or_huge_file_is_refused() {
        let e = AgentFile::load(Path::new("/nonexistent/agent.toml")).unwrap_err();
        assert!(crate::error_chain(&e).contains("/nonexistent/agent.toml"));
        let big = file(&"# padding\n".repeat((MAX_FILE as usize / 10) + 1));
        assert!(matches!(AgentFile::load(big.path()), Err(ConfigError::TooLarge(_))));
    }
}
