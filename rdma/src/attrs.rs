//! Queue-pair attributes, computed in one place from the two ports and the
//! operator's options. No verbs here: the rules are unit-tested against
//! made-up ports (InfiniBand at 4096, RoCE at 1024 and 4096, mismatched
//! ends).

use crate::RdmaError;
use serde::Serialize;

/// A path MTU the verbs know (the InfiniBand MTUs; RoCE uses the largest
/// of them that fits the Ethernet MTU).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum PathMtu {
    /// 256 bytes.
    M256 = 1,
    /// 512 bytes.
    M512 = 2,
    /// 1024 bytes (what peers that do not say use).
    M1024 = 3,
    /// 2048 bytes.
    M2048 = 4,
    /// 4096 bytes.
    M4096 = 5,
}

impl PathMtu {
    /// The verbs' code (`IBV_MTU_*`), as exchanged in endpoints.
    pub fn code(self) -> u8 {
        self as u8
    }

    /// From the verbs' code; None for anything else.
    pub fn from_code(code: u8) -> Option<Self> {
        Some(match code {
            1 => PathMtu::M256,
            2 => PathMtu::M512,
            3 => PathMtu::M1024,
            4 => PathMtu::M2048,
            5 => PathMtu::M4096,
            _ => return None,
        })
    }

    /// Bytes.
    pub fn bytes(self) -> u32 {
        128 << self.code()
    }
}

/// A port's link layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Link {
    /// InfiniBand: addressed by LID, GRH only across subnets.
    InfiniBand,
    /// RoCE: addressed by GID, always with a GRH (where the traffic class goes).
    Ethernet,
}

/// What the attributes depend on about this end's port.
#[derive(Clone, Copy, Debug)]
pub struct PortInfo {
    /// Its link layer.
    pub link: Link,
    /// Its active MTU (RoCE: from the netdev's MTU).
    pub active_mtu: PathMtu,
}

/// The operator's settings for queue pairs (agent options).
#[derive(Clone, Copy, Debug, Default)]
pub struct QpOptions {
    /// Traffic class in the GRH (RoCE: DSCP << 2 | ECN), so that RDMA
    /// traffic lands in the fabric's lossless class.
    pub traffic_class: u8,
    /// InfiniBand service level (0–15).
    pub service_level: u8,
    /// Index into the port's P_Key table.
    pub pkey_index: u16,
}

/// Largest InfiniBand service level.
pub const MAX_SERVICE_LEVEL: u8 = 15;

/// The attributes of one reliable-connected queue pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct QpAttrs {
    /// The smaller of the two ports' active MTUs.
    pub path_mtu: PathMtu,
    /// Local ACK timeout, 4.096 µs × 2^timeout (14: 67 ms).
    pub timeout: u8,
    /// Retransmissions before a send fails.
    pub retry_cnt: u8,
    /// Retries on receiver-not-ready (7 would be forever).
    pub rnr_retry: u8,
    /// RNR NAK timer code the responder sends (12: 0.64 ms).
    pub min_rnr_timer: u8,
    /// Traffic class (GRH).
    pub traffic_class: u8,
    /// Service level.
    pub service_level: u8,
    /// P_Key index.
    pub pkey_index: u16,
    /// GRH hop limit.
    pub hop_limit: u8,
    /// Whether packets carry a GRH (always on RoCE; on InfiniBand when the
    /// peer gave a GID).
    pub global: bool,
}

/// The attributes for a queue pair from this end's port to a peer whose
/// port's active MTU is `remote_mtu` and whose GID is zero or not. None: a
/// peer that does not say, which uses 1024 whatever its port; both ends of
/// a connection must agree, so this end does too.
pub fn qp_attrs(
    local: &PortInfo,
    remote_mtu: Option<PathMtu>,
    remote_gid_zero: bool,
    opts: &QpOptions,
) -> Result<QpAttrs, RdmaError> {
    if opts.service_level > MAX_SERVICE_LEVEL {
        return Err(RdmaError::Config(format!("service level {} is above {MAX_SERVICE_LEVEL}", opts.service_level)));
    }
    let global = match local.link {
        Link::Ethernet if remote_gid_zero => {
            return Err(RdmaError::Config("a RoCE peer without a GID".into()));
        }
        Link::Ethernet => true,
        Link::InfiniBand => !remote_gid_zero,
    };
    Ok(QpAttrs {
        path_mtu: remote_mtu.map_or(PathMtu::M1024, |r| local.active_mtu.min(r)),
        timeout: 14,
        retry_cnt: 7,
        rnr_retry: 6,
        min_rnr_timer: 12,
        traffic_class: opts.traffic_class,
        service_level: opts.service_level,
        pkey_index: opts.pkey_index,
        hop_limit: 64,
        global,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn port(link: Link, mtu: PathMtu) -> PortInfo {
        PortInfo { link, active_mtu: mtu }
    }

    #[test]
    fn path_mtu_is_the_smaller_of_the_two_ports() {
        let o = QpOptions::default();
        let ib = port(Link::InfiniBand, PathMtu::M4096);
        assert_eq!(qp_attrs(&ib, Some(PathMtu::M4096), true, &o).unwrap().path_mtu, PathMtu::M4096);
        let roce9000 = port(Link::Ethernet, PathMtu::M4096);
        let roce1500 = port(Link::Ethernet, PathMtu::M1024);
        assert_eq!(qp_attrs(&roce9000, Some(PathMtu::M4096), false, &o).unwrap().path_mtu, PathMtu::M4096);
        assert_eq!(qp_attrs(&roce9000, Some(PathMtu::M1024), false, &o).unwrap().path_mtu, PathMtu::M1024);
        assert_eq!(qp_attrs(&roce1500, Some(PathMtu::M4096), false, &o).unwrap().path_mtu, PathMtu::M1024);
        // A peer that does not say uses 1024: so must we, whatever our port
        // (both ends of a connection must agree).
        assert_eq!(qp_attrs(&roce9000, None, false, &o).unwrap().path_mtu, PathMtu::M1024);
        assert_eq!(qp_attrs(&port(Link::Ethernet, PathMtu::M512), None, false, &o).unwrap().path_mtu, PathMtu::M1024);
        let small = port(Link::Ethernet, PathMtu::M512);
        assert_eq!(qp_attrs(&small, Some(PathMtu::M4096), false, &o).unwrap().path_mtu, PathMtu::M512);
    }

    #[test]
    fn routing_and_options() {
        let o = QpOptions { traffic_class: 106, service_level: 3, pkey_index: 2 };
        let ib = port(Link::InfiniBand, PathMtu::M4096);
        let a = qp_attrs(&ib, Some(PathMtu::M4096), true, &o).unwrap();
        assert!(!a.global, "InfiniBand within a subnet: LID only");
        assert_eq!((a.traffic_class, a.service_level, a.pkey_index), (106, 3, 2));
        assert!(qp_attrs(&ib, Some(PathMtu::M4096), false, &o).unwrap().global);
        let roce = port(Link::Ethernet, PathMtu::M1024);
        assert!(qp_attrs(&roce, None, false, &o).unwrap().global, "RoCE always has a GRH");
        assert!(qp_attrs(&roce, None, true, &o).is_err(), "RoCE cannot route without a GID");
        let bad = QpOptions { service_level: 16, ..o };
        assert!(qp_attrs(&ib, None, true, &bad).is_err());
    }

    #[test]
    fn mtu_codes_round_trip() {
        for c in 0..=255u8 {
            if let Some(m) = PathMtu::from_code(c) {
                assert_eq!(m.code(), c);
                assert_eq!(m.bytes(), [256, 512, 1024, 2048, 4096][c as usize - 1]);
            }
        }
        assert_eq!(PathMtu::from_code(0), None);
        assert_eq!(PathMtu::from_code(6), None);
    }
}
