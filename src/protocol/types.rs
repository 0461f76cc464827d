//! Values that travel in both the control protocol and the data plane: the
//! session token, a destination's RDMA regions, and which data plane a
//! migration may use or did use.

use rand::RngCore;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;

/// Bytes in a session token.
pub const TOKEN_LEN: usize = 32;

/// A destination session's secret: data streams present it in their hello.
/// On the control channel it travels as hex (as in protocol version 1).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Token(pub [u8; TOKEN_LEN]);

impl Token {
    /// A fresh random token.
    pub fn random() -> Self {
        let mut t = [0u8; TOKEN_LEN];
        rand::thread_rng().fill_bytes(&mut t);
        Self(t)
    }
}

impl fmt::Debug for Token {
    // A token is a credential: logs show that there is one, not what it is.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(..)")
    }
}

impl Serialize for Token {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(self.0))
    }
}

impl<'de> Deserialize<'de> for Token {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        let mut t = [0u8; TOKEN_LEN];
        hex::decode_to_slice(s.as_bytes(), &mut t)
            .map_err(|e| serde::de::Error::custom(format!("session token: {e}")))?;
        Ok(Self(t))
    }
}

/// One migration, from its source's start to its end, on every host it
/// touches (protocol 4): sessions, forwards and outcome questions name it,
/// so an answer about one migration never settles another of the same VM.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MigrationId(pub [u8; 16]);

impl MigrationId {
    /// A fresh random id.
    pub fn random() -> Self {
        let mut t = [0u8; 16];
        rand::thread_rng().fill_bytes(&mut t);
        Self(t)
    }
}

impl fmt::Display for MigrationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for MigrationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MigrationId({self})")
    }
}

impl Serialize for MigrationId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for MigrationId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        let mut t = [0u8; 16];
        hex::decode_to_slice(s.as_bytes(), &mut t)
            .map_err(|e| serde::de::Error::custom(format!("migration id: {e}")))?;
        Ok(Self(t))
    }
}

/// A destination's registered RAM region, as handed to its senders (over
/// mTLS only: the key grants remote writes).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct RdmaRegion {
    /// Virtual address of the region in the destination's mapping.
    pub addr: u64,
    /// Length in bytes.
    pub len: u64,
    /// Remote key for RDMA writes.
    pub rkey: u32,
}

/// The RDMA path one sender's queue pairs took to a destination.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct RdmaPath {
    /// The sender's device.
    pub device: String,
    /// Its port.
    pub port: u8,
    /// Its GID index.
    pub gid_index: u8,
    /// The queue pairs' path MTU in bytes (the smaller active MTU of the two ports).
    pub path_mtu: u32,
}

/// Which data plane a migration may use.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum TransportKind {
    /// RDMA where both ends can (logged why not otherwise), else TCP.
    #[default]
    Auto,
    /// TCP only.
    Tcp,
    /// RDMA or fail with the reason.
    Rdma,
}

/// The data plane one sender uses to one destination.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum DataPlane {
    /// Page frames over TCP streams.
    Tcp,
    /// One-sided RDMA writes into registered RAM.
    Rdma,
}

impl DataPlane {
    /// The name used in logs and reports.
    pub fn name(self) -> &'static str {
        match self {
            DataPlane::Tcp => "tcp",
            DataPlane::Rdma => "rdma",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_travels_as_hex_and_is_checked() {
        let t = Token([0xab; TOKEN_LEN]);
        let json = serde_json::to_string(&t).unwrap();
        assert_eq!(json, format!("\"{}\"", "ab".repeat(TOKEN_LEN)));
        assert_eq!(serde_json::from_str::<Token>(&json).unwrap(), t);
        assert!(serde_json::from_str::<Token>("\"abcd\"").is_err(), "too short");
        assert!(serde_json::from_str::<Token>(&format!("\"{}\"", "zz".repeat(TOKEN_LEN))).is_err());
        assert_eq!(format!("{t:?}"), "Token(..)");
    }
}
