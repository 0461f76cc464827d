//! What the protocol version two agents negotiated lets them do, asked for
//! by name: one value derived at the handshake, instead of version numbers
//! compared wherever a feature is used.

/// The features of a negotiated protocol version.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Features {
    version: u32,
}

impl Features {
    /// The features of `version`.
    pub fn of(version: u32) -> Self {
        Self { version }
    }

    /// The negotiated version (for logs and refusals).
    pub fn version(self) -> u32 {
        self.version
    }

    /// Protocol 2: device state in raw chunks, checksums of blocks,
    /// heartbeats (`Ping`) and outcome queries.
    pub fn chunked_device_state(self) -> bool {
        self.version >= 2
    }

    /// Protocol 2: heartbeats, so a silent peer is lost within a bound.
    pub fn heartbeats(self) -> bool {
        self.version >= 2
    }

    /// Protocol 3: a destination may ask its source to leave (`Leave`), and
    /// a peer may ask another's room (`CapacityQuery`).
    pub fn leave(self) -> bool {
        self.version >= 3
    }

    /// Protocol 4: a QEMU VM as a typed description, the migration named in
    /// its session messages, a data-plane token of its own per forwarder.
    pub fn descriptions(self) -> bool {
        self.version >= 4
    }

    /// Protocol 5: each RAM region's page size at session open.
    pub fn page_sizes(self) -> bool {
        self.version >= 5
    }

    /// Protocol 5: data-plane receivers take zero frames.
    pub fn zero_frames(self) -> bool {
        self.version >= 5
    }

    /// Protocol 6: requests carry ids and replies name the request they
    /// answer, so a late reply cannot answer another request.
    pub fn request_ids(self) -> bool {
        self.version >= 6
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_version_has_what_it_introduced() {
        let v1 = Features::of(1);
        assert!(!v1.heartbeats() && !v1.chunked_device_state() && !v1.request_ids());
        assert!(Features::of(3).leave() && !Features::of(3).descriptions());
        assert!(Features::of(5).zero_frames() && Features::of(5).page_sizes() && !Features::of(5).request_ids());
        assert!(Features::of(super::super::VERSION).request_ids());
    }
}
