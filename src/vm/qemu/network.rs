//! The operator's networks on this host (`--network NAME=user|bridge:BR`):
//! what a description's network name becomes. A peer names a network, never
//! an interface, port forward or helper: user networking is always
//! `restrict=on` (the guest reaches neither the host nor beyond), and a
//! bridged NIC gets a tap the agent creates on the operator's bridge and
//! hands to QEMU as a descriptor.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use thiserror::Error;

/// What a network name is on this host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Backend {
    /// QEMU's user networking, restricted.
    User,
    /// A tap on this bridge.
    Bridge(String),
}

/// The networks of this host, by name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Networks(BTreeMap<String, Backend>);

impl Default for Networks {
    /// `user` (restricted user networking) only.
    fn default() -> Self {
        Self(BTreeMap::from([("user".to_owned(), Backend::User)]))
    }
}

/// Why a network is unusable here.
#[derive(Debug, Error)]
pub enum NetworkError {
    /// `--network` in the wrong form.
    #[error("--network {0:?}: use NAME=user or NAME=bridge:BRIDGE")]
    Syntax(String),
    /// The description names a network this host does not have.
    #[error("network {name:?} is not on this host (it has: {have})")]
    Unknown {
        /// The name.
        name: String,
        /// The names this host has.
        have: String,
    },
    /// Creating or attaching a tap failed.
    #[error("a tap on bridge {bridge}: {what}")]
    Tap {
        /// The bridge.
        bridge: String,
        /// The step.
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

fn is_name(s: &str) -> bool {
    !s.is_empty() && s.len() < libc::IFNAMSIZ && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

impl Networks {
    /// Adds `NAME=user` or `NAME=bridge:BR` (a later one replaces an earlier).
    pub fn add(&mut self, spec: &str) -> Result<(), NetworkError> {
        let bad = || NetworkError::Syntax(spec.to_owned());
        let (name, what) = spec.split_once('=').ok_or_else(bad)?;
        let backend = match what.split_once(':') {
            None if what == "user" => Backend::User,
            Some(("bridge", br)) if is_name(br) => Backend::Bridge(br.to_owned()),
            _ => return Err(bad()),
        };
        if !super::allow::is_id(name) {
            return Err(bad());
        }
        self.0.insert(name.to_owned(), backend);
        Ok(())
    }

    /// What `name` is here.
    pub fn get(&self, name: &str) -> Result<&Backend, NetworkError> {
        self.0.get(name).ok_or_else(|| NetworkError::Unknown {
            name: name.to_owned(),
            have: self.0.keys().cloned().collect::<Vec<_>>().join(", "),
        })
    }

    /// Every network, for `info`.
    pub fn describe(&self) -> BTreeMap<String, String> {
        self.0
            .iter()
            .map(|(k, b)| {
                let v = match b {
                    Backend::User => "user (restrict=on)".to_owned(),
                    Backend::Bridge(br) => format!("bridge:{br}"),
                };
                (k.clone(), v)
            })
            .collect()
    }
}

/// `SIOCBRADDIF`: add an interface to a bridge (not in the libc crate).
const SIOCBRADDIF: libc::c_ulong = 0x89a2;

fn ifreq(name: &str) -> libc::ifreq {
    // SAFETY: ifreq is plain data; all zeroes is a valid value.
    let mut r: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in r.ifr_name.iter_mut().zip(name.bytes().take(libc::IFNAMSIZ - 1)) {
        *d = s as libc::c_char;
    }
    r
}

/// A tap on `bridge`, up, for one VM: the descriptor QEMU gets and the
/// interface's name (it goes away when QEMU, its last holder, exits).
pub fn tap_on(bridge: &str) -> Result<(OwnedFd, String), NetworkError> {
    let err = |what| move |source| NetworkError::Tap { bridge: bridge.to_owned(), what, source };
    let tun =
        std::fs::OpenOptions::new().read(true).write(true).open("/dev/net/tun").map_err(err("opening /dev/net/tun"))?;
    let mut req = ifreq("dcm%d");
    req.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
    // SAFETY: TUNSETIFF reads and writes the ifreq it is given.
    if unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF, &mut req) } != 0 {
        return Err(err("TUNSETIFF")(std::io::Error::last_os_error()));
    }
    let name: String = req.ifr_name.iter().take_while(|c| **c != 0).map(|c| *c as u8 as char).collect();
    // SAFETY: a plain socket for interface ioctls; closed by OwnedFd.
    let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if sock < 0 {
        return Err(err("a control socket")(std::io::Error::last_os_error()));
    }
    // SAFETY: `sock` is a new descriptor we own.
    let sock = unsafe { OwnedFd::from_raw_fd(sock) };
    let mut idx = ifreq(&name);
    // SAFETY: SIOCGIFINDEX fills the ifreq's index for the name in it.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFINDEX, &mut idx) } != 0 {
        return Err(err("reading the tap's index")(std::io::Error::last_os_error()));
    }
    let cbridge =
        CString::new(bridge).map_err(|_| err("the bridge's name")(std::io::ErrorKind::InvalidInput.into()))?;
    let mut add = ifreq(cbridge.to_str().unwrap_or_default());
    // SAFETY: the index was just written by SIOCGIFINDEX into this union member.
    add.ifr_ifru.ifru_ifindex = unsafe { idx.ifr_ifru.ifru_ifindex };
    // SAFETY: SIOCBRADDIF reads the bridge's name and the port's index.
    if unsafe { libc::ioctl(sock.as_raw_fd(), SIOCBRADDIF, &mut add) } != 0 {
        return Err(err("adding it to the bridge")(std::io::Error::last_os_error()));
    }
    let mut up = ifreq(&name);
    up.ifr_ifru.ifru_flags = libc::IFF_UP as libc::c_short;
    // SAFETY: SIOCSIFFLAGS reads the name and the flags.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &mut up) } != 0 {
        return Err(err("setting it up")(std::io::Error::last_os_error()));
    }
    Ok((tun.into(), name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_backends() {
        let mut n = Networks::default();
        n.add("lan=bridge:br0").unwrap();
        assert_eq!(n.get("lan").unwrap(), &Backend::Bridge("br0".into()));
        assert_eq!(n.get("user").unwrap(), &Backend::User);
        let e = n.get("prod").unwrap_err().to_string();
        assert!(e.contains("lan, user"), "{e}");
        for bad in ["lan", "lan=tap:x", "lan=bridge:", "lan=bridge:a b", "=user", "lan=bridge:averyveryverylongname"] {
            assert!(n.add(bad).is_err(), "{bad}");
        }
    }
}
