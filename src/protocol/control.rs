//! The control messages agents exchange (see the sequence diagrams in
//! [`super`]). JSON-tagged by `type`; the tags and fields of protocol
//! version 1 are kept, so a version-1 peer still understands every message
//! it knew.

use super::types::{DataPlane, MigrationId, RdmaPath, RdmaRegion, Token, TransportKind};
use crate::memory::RegionSpec;
use crate::vm::LaunchSpec;
use serde::{Deserialize, Serialize};

/// What a destination knows of a VM a source asks about.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum RemoteOutcome {
    /// The VM is committed here (it runs, or waits, here).
    Committed,
    /// An incoming session for it is still open: ask again.
    Pending,
    /// Nothing of it is here: the switchover did not commit.
    NotHere,
}

/// What kind of failure a peer's `Error` reports (protocol 6): what the
/// source acts on and reports, without reading the text. A code this agent
/// does not know reads as [`ErrorCode::Failed`].
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, strum::EnumString, strum::IntoStaticStr)]
#[serde(rename_all = "snake_case", from = "String")]
#[strum(serialize_all = "snake_case")]
pub enum ErrorCode {
    /// The request is not valid (a name, the layout, the VM's description).
    Invalid,
    /// The host is drained: it takes no new incoming migrations.
    Drained,
    /// The host has no room for it (space, huge pages, its RAM limits).
    NoRoom,
    /// The host runs as many incoming migrations as it takes at once.
    TooMany,
    /// The VM, its migration or one of its disks is already here.
    Conflict,
    /// The host lacks what the VM needs (huge-page mounts, devices, users).
    Unsupported,
    /// The message does not belong at this point of the session.
    OutOfOrder,
    /// The message names another migration.
    Foreign,
    /// The host named may not send data here.
    NotAllowed,
    /// The host failed doing it.
    Failed,
}

impl From<String> for ErrorCode {
    fn from(s: String) -> Self {
        s.parse().unwrap_or(ErrorCode::Failed)
    }
}

/// A peer's `Error` answer: why, and its kind (from peers of protocol 6).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Refusal {
    /// Why, in the peer's words.
    pub message: String,
    /// Its kind, if the peer gave one.
    pub code: Option<ErrorCode>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// What a host advertises to peers choosing a destination.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
pub struct Capacity {
    /// Bytes its data dir can still take beside the sessions it holds.
    pub free_bytes: u64,
    /// Largest RAM of one incoming migration it takes, if limited.
    #[serde(default)]
    pub max_session_bytes: Option<u64>,
    /// Incoming sessions open now.
    pub incoming: u32,
    /// Most incoming sessions at once, if limited.
    #[serde(default)]
    pub max_incoming: Option<u32>,
    /// It takes no new incoming migrations.
    pub drained: bool,
    /// Version 5: bytes of huge pages it can still take, per page size
    /// (one entry per `--hugepages` mount).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub huge_free: std::collections::BTreeMap<u64, u64>,
}

/// One control message. [`MessageKind`] names its variant without the data.
#[derive(Serialize, Deserialize, Debug, Clone, strum::IntoStaticStr, strum::EnumDiscriminants)]
#[serde(tag = "type", rename_all = "snake_case")]
#[strum(serialize_all = "snake_case")]
#[strum_discriminants(name(MessageKind), derive(strum::IntoStaticStr), strum(serialize_all = "snake_case"))]
pub enum Message {
    /// Client's first message: who it is and which versions it speaks.
    /// A version-1 agent sends only `version` and refuses any other answer
    /// than that version; newer agents send their oldest version there (so
    /// an old server accepts them) and their newest in `max_version`.
    Hello {
        /// The oldest protocol version the client speaks.
        version: u32,
        /// The client's host name (checked against its certificate).
        host: String,
        /// The newest version it speaks (absent from version-1 peers).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        max_version: Option<u32>,
    },
    /// Server's answer to `Hello`: the version both will speak.
    Welcome {
        /// The negotiated protocol version.
        version: u32,
        /// The server's host name.
        host: String,
    },
    /// Source to destination: prepare RAM and an incoming VM.
    OpenSession {
        /// The VM's name.
        vm: String,
        /// Its RAM regions.
        regions: Vec<RegionSpec>,
        /// Chunk size of the migration's layout.
        chunk_size: u64,
        /// How to start the incoming VM.
        launch: LaunchSpec,
        /// The source takes RAM registered for RDMA in several slices per
        /// region (whose offsets are multiples of the chunk size), which
        /// the destination can then pin in parallel.
        #[serde(default)]
        rdma_slices: bool,
        /// Bytes of RAM that are holes at the source (zero, not written
        /// since tracking began): never sent unless written, so never
        /// allocated here before the switchover (older sources: 0).
        #[serde(default, skip_serializing_if = "is_zero")]
        holes: u64,
        /// Version 4: the migration this belongs to.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        migration: Option<MigrationId>,
        /// Version 5: each region's page size at the source, in region
        /// order (absent: base pages everywhere). A region on huge pages
        /// lands on huge pages of the same size, or the session is refused.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        page_sizes: Vec<u64>,
        /// Version 5: the data planes the migration may use. `tcp`: the
        /// destination does not register (pin, allocate) its RAM for RDMA.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        transport: Option<TransportKind>,
    },
    /// Destination: the session is ready.
    SessionOpened {
        /// Its data-plane port (same address as the control channel).
        data_port: u16,
        /// What data streams of this session must present.
        token: Token,
        /// The destination's RAM registered for RDMA writes, if it offers RDMA.
        #[serde(default)]
        rdma: Option<Vec<RdmaRegion>>,
        /// The queue-pair endpoint version it reads (0: only the first,
        /// without the port's MTU).
        #[serde(default)]
        rdma_endpoint: u8,
    },
    /// Source: per-chunk checksums of the destination's RAM, please.
    ChecksumRequest {
        /// Version 2: only these blocks (in this order): each chunk cut into
        /// blocks of `block_pages` pages (`memory::Blocks`). Absent: every
        /// chunk, whole.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        blocks: Option<Vec<u32>>,
        /// Version 2: pages per block.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        block_pages: Option<u32>,
        /// The VM is paused and its final round sent: the destination takes
        /// no new data streams from now on (older peers ignore the field).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        pause: bool,
    },
    /// Destination: xxh3 of the blocks asked for, in that order (of every
    /// chunk, in layout order, when no list was given).
    Checksums {
        /// One per chunk.
        sums: Vec<u64>,
    },
    /// Version 1: the whole device state, base64, in one message.
    DeviceState {
        /// base64 of the device state.
        state: String,
    },
    /// Version 2: a piece of the device state; `len` raw bytes follow the message.
    DeviceStateChunk {
        /// Bytes that follow (at most [`super::MAX_BULK`]).
        len: u32,
        /// The bytes (carried after the JSON, not in it).
        #[serde(skip)]
        bytes: Vec<u8>,
    },
    /// Version 2: the device state is complete; load it (answered `Ok`).
    DeviceStateEnd {
        /// Total bytes sent in chunks.
        total: u64,
    },
    /// Source: the switchover is committed; run the VM.
    Resume {
        /// false: leave the VM paused on the destination (`--suspend`).
        start: bool,
        /// Version 4: the migration this belongs to.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        migration: Option<MigrationId>,
    },
    /// Destination: the VM is committed here.
    Resumed,
    /// Source: discard the session (any time before `Resume`).
    Abort {
        /// Why, for the destination's log.
        reason: String,
        /// Version 4: the migration this belongs to.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        migration: Option<MigrationId>,
    },
    /// S to an old destination: open data streams to the new one, as
    /// sender `sender` (its host id in the migration).
    ForwardTo {
        /// The new destination's name.
        host: String,
        /// Its data endpoint.
        data_addr: std::net::SocketAddr,
        /// Its session token.
        token: Token,
        /// Streams to open.
        streams: usize,
        /// This forwarder's host id in the migration.
        sender: u8,
        /// The new destination's registered RAM, if it offers RDMA.
        #[serde(default)]
        rdma: Option<Vec<RdmaRegion>>,
        /// The endpoint version the new destination reads (see `SessionOpened`).
        #[serde(default)]
        rdma_endpoint: u8,
        /// Which data plane the migration may use.
        #[serde(default)]
        transport: TransportKind,
        /// Version 4: the migration this belongs to.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        migration: Option<MigrationId>,
        /// Version 5: the new destination takes zero frames.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        zero_frames: bool,
    },
    /// A forwarder's answer to `ForwardTo`: its streams are open.
    ForwardReady {
        /// The data plane it uses.
        transport: DataPlane,
        /// Its RDMA path, when it uses RDMA.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        rdma: Option<RdmaPath>,
    },
    /// S to a forwarder: send these page runs (global page, count) to `to`.
    /// Answered by `Forwarded` once `to` applied them; refused if the
    /// forwarder is not (or no longer) forwarding to `to`.
    Forward {
        /// Batch id (echoed in `Forwarded`).
        batch: u64,
        /// The destination the source believes this host forwards to.
        to: String,
        /// (first global page, pages) runs, each inside one chunk.
        runs: Vec<(usize, usize)>,
    },
    /// S to the destination: cut every data stream of `sender` and answer
    /// `Ok` once none of its frames can still be written. After a sender
    /// failed, its last frames could otherwise land on top of newer pages.
    Fence {
        /// The sender's host id.
        sender: u8,
    },
    /// A forwarder: what became of a `Forward`.
    Forwarded {
        /// The batch id.
        batch: u64,
        /// Whether the new destination applied it.
        applied: bool,
        /// Why not, if not.
        #[serde(default)]
        error: Option<String>,
        /// Payload bytes this forwarder has sent so far.
        bytes: u64,
        /// Version 5: pages it has sent as zero frames so far.
        #[serde(default, skip_serializing_if = "is_zero")]
        zero_pages: u64,
    },
    /// Version 2: "I am alive" (sent every fraction of the peer timeout);
    /// answered by `Pong`. A peer heard from by neither within the timeout
    /// is lost, whether it died, froze, or its link went silent.
    Ping,
    /// Version 2: the answer to `Ping`.
    Pong,
    /// Version 2: a source that lost a migration's answer after `Resume`
    /// asks the destination whether it committed the VM.
    OutcomeQuery {
        /// The VM.
        vm: String,
        /// Version 4: the migration asked about; answered for it alone
        /// (without: for whatever migration of that VM, as before).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        migration: Option<MigrationId>,
    },
    /// Version 2: the destination's answer to `OutcomeQuery`.
    OutcomeAnswer {
        /// The VM.
        vm: String,
        /// What the destination knows.
        outcome: RemoteOutcome,
    },
    /// Version 3, destination to source, unasked: this host is drained or
    /// out of room; move the session elsewhere (it forwards what it holds).
    Leave {
        /// Why, for the source's log and report.
        reason: String,
    },
    /// Version 3: how much more this host can receive ([`Capacity`]), asked
    /// without a session (by a host choosing where to evacuate to).
    CapacityQuery,
    /// Version 3: the answer to `CapacityQuery`.
    Capacity(Capacity),
    /// Version 4, source to its target: a data-plane token for forwarder
    /// `sender`, good only on streams from `host` (answered `SenderAdded`).
    AddSender {
        /// The forwarder's host id in the migration.
        sender: u8,
        /// Its host name, as its certificate says.
        host: String,
        /// The migration may use RDMA: register the RAM for its writes too.
        #[serde(default)]
        rdma: bool,
    },
    /// Version 4: the forwarder's token (and RDMA keys of its own).
    SenderAdded {
        /// The token, for the forwarder's `ForwardTo`.
        token: Token,
        /// The destination's RAM registered for this forwarder alone, if
        /// it offers RDMA (deregistered when the forwarder is fenced,
        /// released, or the pause's verification begins).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        rdma: Option<Vec<RdmaRegion>>,
    },
    /// Success without data.
    Ok,
    /// The request failed; the message says why.
    Error {
        /// Why.
        message: String,
        /// Version 6: its kind.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        code: Option<ErrorCode>,
    },
}

impl Message {
    /// An `Error` answer of kind `code`.
    pub fn error(code: ErrorCode, message: impl Into<String>) -> Self {
        Message::Error { message: message.into(), code: Some(code) }
    }

    /// The message's tag (`"session_opened"`), without serializing it.
    pub fn name(&self) -> &'static str {
        self.into()
    }

    /// Which variant this is.
    pub fn kind(&self) -> MessageKind {
        self.into()
    }
}

impl MessageKind {
    /// The variant's tag.
    pub fn name(self) -> &'static str {
        self.into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_match_the_wire_tags() {
        let m = Message::SessionOpened { data_port: 1, token: Token([1; 32]), rdma: None, rdma_endpoint: 0 };
        let v = serde_json::to_value(&m).unwrap();
        assert_eq!(v["type"], m.name());
        assert_eq!(
            Message::ChecksumRequest { blocks: None, block_pages: None, pause: false }.name(),
            "checksum_request"
        );
        let v1 = serde_json::from_str::<Message>(r#"{"type":"checksum_request"}"#).unwrap();
        assert!(matches!(v1, Message::ChecksumRequest { blocks: None, .. }), "a version-1 request still decodes");
        assert_eq!(Message::Ok.kind(), MessageKind::Ok);
        assert_eq!(MessageKind::ForwardReady.name(), "forward_ready");
    }

    #[test]
    fn error_codes_travel_and_unknown_ones_read_as_failed() {
        let m = Message::error(ErrorCode::NoRoom, "full");
        let j = serde_json::to_string(&m).unwrap();
        assert_eq!(j, r#"{"type":"error","message":"full","code":"no_room"}"#);
        let future = r#"{"type":"error","message":"x","code":"a_code_from_later"}"#;
        let old = r#"{"type":"error","message":"x"}"#;
        assert!(matches!(serde_json::from_str(future).unwrap(), Message::Error { code: Some(ErrorCode::Failed), .. }));
        assert!(matches!(serde_json::from_str(old).unwrap(), Message::Error { code: None, .. }));
    }

    #[test]
    fn version_1_messages_still_decode() {
        let v1 = r#"{"type":"hello","version":1,"host":"a"}"#;
        assert!(matches!(
            serde_json::from_str::<Message>(v1).unwrap(),
            Message::Hello { version: 1, max_version: None, .. }
        ));
        let ready = r#"{"type":"forward_ready","transport":"rdma"}"#;
        assert!(matches!(
            serde_json::from_str::<Message>(ready).unwrap(),
            Message::ForwardReady { transport: DataPlane::Rdma, rdma: None }
        ));
    }
}
