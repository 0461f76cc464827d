//! The agent-to-agent control protocol: versioned messages ([`Message`])
//! over a mutually authenticated TLS stream, framed as a big-endian u32
//! length and JSON, with raw bytes after the JSON for the few messages that
//! carry bulk data (device state). It carries session setup, checksums,
//! device state and switchover; never pages (those go over the data plane,
//! see [`data`]). DESIGN.md explains the protocol's invariant and failure
//! handling; the diagrams here are the message order.
//!
//! Versions: an agent speaks [`MIN_VERSION`]..=[`VERSION`]. The client's
//! `Hello` gives its range (oldest in `version`, which is all a version-1
//! agent reads, newest in `max_version`), the server answers with the
//! highest version both speak, and each side then uses only what that
//! version has: a rolling upgrade can still migrate and retarget between old
//! and new agents.
//!
//! ```text
//!  source agent (S)                               destination agent (D)
//!   | --- Hello{version, max_version, host} -----------> |  cert checked against CA,
//!   | <-- Welcome{version, host} ----------------------- |  host name against cert
//!   | --- OpenSession{vm, regions, launch} ------------> |  create + map RAM files,
//!   | <-- SessionOpened{data_port, token, rdma?} ------- |  launch incoming VM paused
//!   |     (rdma: its RAM registered for RDMA writes: addresses and keys)
//!   | === data streams: hello(token), pages, batch ends ===> (acks <===)
//!   |        ... rounds of dirty pages ...               |
//!   |  [pause VM, final round]                           |
//!   | --- ChecksumRequest{blocks?} ----------------------> |
//!   | <-- Checksums{per chunk} ------------------------- |  (mismatching chunks resent)
//!   | --- DeviceStateChunk{len} + bytes (repeated) ----> |  (v1: one DeviceState{base64})
//!   | --- DeviceStateEnd{total} -----------------------> |  loaded into incoming VM
//!   | <-- Ok ------------------------------------------- |
//!   | --- Resume{start} -------------------------------> |  VM runs on D now
//!   | <-- Resumed -------------------------------------- |
//!   |  [stop VM on S]                                    |
//!   | --- Abort{reason} (any time before Resume) ------> |  discard RAM and VM
//! ```
//! A control connection that closes before `Resume` aborts the session on D.
//!
//! Retarget from O to N: S opens a session on N as above, then turns O into
//! a forwarder of what it holds. S stays the coordinator: it decides, chunk
//! by chunk, which pages O sends (the ledger's one-writer rule applies to
//! them as to S's own), and O reports each batch once N acknowledged it.
//! ```text
//!  S                                   O (old destination)             N
//!   | --- ForwardTo{N's data addr, token,  --> | === data streams (token) ===> |
//!   |      N's RDMA regions?}                  |   (TCP frames, or RDMA writes) |
//!   | <-- ForwardReady{transport} ------------ |                              |
//!   | --- Forward{batch, page runs} ---------> | === pages, batch end =======> |
//!   | <-- Forwarded{batch, applied, bytes} --- | <== applied ================= |
//!   |        ... while S sends what only S has to N directly ...            |
//!   | --- Abort{"no longer needed"} ---------> |  O discards its RAM and VM    |
//! ```
//! If a forward fails, S first has N fence O's streams (`Fence`), and only
//! then lets anyone else write those pages.
//!
//! Version 6: a request carries an `id`, and its reply (`Error` included)
//! the same number in `re`, at the end of the message's JSON object; a
//! reply whose request was given up (timed out) answers nothing else.
//! Messages nobody asked for (`Leave`, `Forwarded`, `Ping`) carry neither.
//! ```text
//!  S                                        D
//!   | --- {"type":"fence","sender":2,"id":7} ---> |
//!   | --- {"type":"checksum_request",...,"id":8} -> |
//!   | <-- {"type":"ok","re":7} ------------------- |
//!   | <-- {"type":"checksums",...,"re":8} -------- |
//! ```
//!
//! Version 3: a destination that is drained or out of room asks its
//! sources to go elsewhere; a source with fallback hosts retargets (with forwarding), one
//! without goes on. Any peer may ask another's room before choosing it.
//! ```text
//!  S                                   D (drained)              N (fallback)
//!   | <-- Leave{reason} ------------------ |                        |
//!   |  [retarget to N, D forwards what it holds, as above]          |
//!   | --- CapacityQuery --------------------------------------------> |
//!   | <-- Capacity{free, incoming, limits, drained} ---------------- |
//! ```

pub mod control;
pub mod data;
mod features;
pub mod types;

pub use control::{ErrorCode, Message, MessageKind, Refusal, RemoteOutcome};
pub use features::Features;
pub use types::{DataPlane, MigrationId, RdmaPath, RdmaRegion, Token, TransportKind, TOKEN_LEN};

use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The newest protocol version this agent speaks.
pub const VERSION: u32 = 6;
/// The oldest protocol version this agent still speaks.
pub const MIN_VERSION: u32 = 1;
/// The first version that sends device state in raw chunks, checksums of
/// blocks, heartbeats (`Ping`) and outcome queries.
pub const CHUNKED_DEVICE_STATE: u32 = 2;
/// The first version with heartbeats and outcome queries.
pub const HEARTBEATS: u32 = 2;
/// The first version where a destination may ask its source to leave
/// (`Leave`: it is draining) and a peer may ask another's room
/// (`CapacityQuery`).
pub const LEAVE: u32 = 3;
/// The first version that carries a QEMU VM as a typed description
/// instead of a command line, names the migration in its session messages
/// and outcome questions, and gives each forwarder a data-plane token of
/// its own (`AddSender`).
pub const DESCRIPTIONS: u32 = 4;
/// The first version that tells each RAM region's page size at session
/// open (a destination of an older one would put huge pages on base ones).
pub const PAGE_SIZES: u32 = 5;
/// The first version whose data-plane receivers take zero frames (pages
/// all zero, sent without their bytes).
pub const ZERO_FRAMES: u32 = 5;
/// The first version whose requests carry ids that their replies name
/// ([`Ids`]).
pub const REQUEST_IDS: u32 = 6;
/// Control messages are small; anything bigger is refused before allocation
/// (a version-1 peer sends the whole device state, base64, in one message).
pub const MAX_MESSAGE: usize = 64 << 20;
/// Largest message of a kind without a cap of its own.
pub const SMALL_MESSAGE: usize = 64 << 10;
/// Largest first message of a connection (`Hello`, `Welcome`), read before
/// the peer was admitted.
pub const MAX_HELLO: usize = 4 << 10;

/// Which end of a control connection reads, and so what it may be sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reader {
    /// The end serving a source's session (a destination, a forwarder),
    /// speaking `version`.
    Serving(u32),
    /// The source's end.
    Client,
    /// Either (a test, a tool).
    Any,
}

/// The largest message of kind `tag` (its JSON `type`) that `reader` takes:
/// a few kinds carry lists or bulk that may be large, each in one
/// direction only; every other is small. Checked from the message's first
/// bytes, before the rest is read or room made for it.
pub fn cap_of(tag: &str, reader: Reader) -> usize {
    use Reader::{Any, Client, Serving};
    match (tag, reader) {
        // Version 1 only: the whole device state, base64, in one message.
        ("device_state", Serving(1) | Any) => MAX_MESSAGE,
        // Up to 2^20 blocks, as numbers.
        ("checksum_request", Serving(_) | Any) => 16 << 20,
        ("checksums", Client | Any) => 32 << 20,
        // A VM's description, its RAM regions; RDMA regions in slices.
        ("open_session" | "forward_to", Serving(_) | Any) => 1 << 20,
        ("session_opened" | "forward_ready" | "sender_added", Client | Any) => 1 << 20,
        // Page runs of one chunk.
        ("forward", Serving(_) | Any) => 4 << 20,
        _ => SMALL_MESSAGE,
    }
}

/// The `type` a message's JSON starts with (`{"type":"x"...`), as this
/// agent and every release before it write them; `None` for anything else,
/// which then gets the smallest cap.
fn tag_of(prefix: &[u8]) -> Option<&str> {
    let rest = prefix.strip_prefix(b"{\"type\":\"")?;
    let end = rest.iter().position(|&b| b == b'"')?;
    std::str::from_utf8(&rest[..end]).ok()
}
/// Largest raw payload after one message.
pub const MAX_BULK: u32 = 4 << 20;

/// The newest version this agent speaks (lower in a test build that plays
/// an older release).
pub fn max_version() -> u32 {
    crate::hooks::max_protocol().map_or(VERSION, |v| v.clamp(MIN_VERSION, VERSION))
}

/// The version two agents speak: the highest in both ranges, if any.
pub fn negotiate(peer_min: u32, peer_max: u32) -> Option<u32> {
    let v = peer_max.min(max_version());
    (v >= peer_min.max(MIN_VERSION)).then_some(v)
}

/// Reading or writing a control message failed.
#[derive(Debug, Error)]
pub enum ProtocolError {
    /// The peer closed the connection between messages.
    #[error("connection closed")]
    Closed,
    /// The stream failed.
    #[error("control connection")]
    Io(#[from] std::io::Error),
    /// A length prefix above the limit (nothing was allocated).
    #[error("message of {0} bytes exceeds the limit")]
    TooLarge(usize),
    /// The JSON does not decode as a message.
    #[error("malformed message")]
    Decode(#[source] serde_json::Error),
    /// No protocol version in common.
    #[error("peer speaks protocol versions {min}..={max}, this agent {MIN_VERSION}..={VERSION}")]
    Version {
        /// The peer's lowest version.
        min: u32,
        /// The peer's highest version.
        max: u32,
    },
    /// Nothing came from the peer (not even a heartbeat) for this long.
    #[error("peer silent for {0:?}: lost")]
    Silent(std::time::Duration),
    /// A message that makes no sense at this point.
    #[error("unexpected message {0}")]
    Unexpected(&'static str),
    /// The peer answered with an error.
    #[error("peer: {0}")]
    Peer(String),
}

/// A message's request ids (protocol 6): `id` on a request, `re` (the
/// request's id) on its reply. Written as the last fields of the JSON
/// object, where [`Ids::of`] finds them without parsing the message again;
/// older agents ignore them, and are never sent any.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Ids {
    /// This message is a request with this id.
    pub id: Option<u64>,
    /// This message answers the request with this id.
    pub re: Option<u64>,
}

impl Ids {
    /// A request's ids.
    pub fn request(id: u64) -> Self {
        Self { id: Some(id), re: None }
    }

    /// A reply's ids: those of the request it answers, if it had one.
    pub fn reply_to(request: Ids) -> Self {
        Self { id: None, re: request.id }
    }

    /// `body` (a JSON object) with these ids as its last fields.
    fn append(self, mut body: Vec<u8>) -> Vec<u8> {
        if self == Self::default() || body.last() != Some(&b'}') {
            return body;
        }
        body.pop();
        for (key, v) in [("id", self.id), ("re", self.re)] {
            if let Some(v) = v {
                body.extend_from_slice(format!(",\"{key}\":{v}").as_bytes());
            }
        }
        body.push(b'}');
        body
    }

    /// The ids [`append`](Self::append) wrote at the end of `body`: at most
    /// two `,"id":N` / `,"re":N` before the closing brace; anything else
    /// there (a field of the message itself) ends the search.
    pub fn of(body: &[u8]) -> Self {
        let mut ids = Self::default();
        let Some(mut rest) = body.strip_suffix(b"}") else { return ids };
        for _ in 0..2 {
            let digits = rest.iter().rev().take_while(|b| b.is_ascii_digit()).count();
            let (head, num) = rest.split_at(rest.len() - digits.min(20));
            let Some(n) = std::str::from_utf8(num).ok().and_then(|s| s.parse::<u64>().ok()) else { break };
            match (head.strip_suffix(b",\"re\":"), head.strip_suffix(b",\"id\":")) {
                (Some(h), _) if ids.re.is_none() && ids.id.is_none() => (ids.re, rest) = (Some(n), h),
                (_, Some(h)) if ids.id.is_none() => (ids.id, rest) = (Some(n), h),
                _ => break,
            }
        }
        ids
    }
}

/// A message as read, with its request ids; an `Error` message stays one
/// (it may answer a request by id).
#[derive(Debug)]
pub struct Received {
    /// The message.
    pub msg: Message,
    /// Its ids.
    pub ids: Ids,
}

/// Writes one message (and its raw bytes, if it carries any).
pub async fn write_message<W: AsyncWrite + Unpin>(w: &mut W, m: &Message) -> Result<(), ProtocolError> {
    write_tagged(w, m, Ids::default()).await
}

/// Writes one message with request ids (protocol 6 peers only).
pub async fn write_tagged<W: AsyncWrite + Unpin>(w: &mut W, m: &Message, ids: Ids) -> Result<(), ProtocolError> {
    let body = ids.append(serde_json::to_vec(m).map_err(ProtocolError::Decode)?);
    if body.len() > MAX_MESSAGE {
        return Err(ProtocolError::TooLarge(body.len()));
    }
    w.write_all(&(body.len() as u32).to_be_bytes()).await?;
    w.write_all(&body).await?;
    if let Message::DeviceStateChunk { len, bytes } = m {
        if bytes.len() != *len as usize || *len > MAX_BULK {
            return Err(ProtocolError::TooLarge(bytes.len()));
        }
        w.write_all(bytes).await?;
    }
    w.flush().await?;
    Ok(())
}

/// Reads one message (and its raw bytes); an `Error` message becomes
/// [`ProtocolError::Peer`]. Every length is checked before allocating:
/// against [`MAX_MESSAGE`], then against its kind's cap ([`cap_of`]).
pub async fn read_message<R: AsyncRead + Unpin>(r: &mut R) -> Result<Message, ProtocolError> {
    read_message_within(r, MAX_MESSAGE).await.map(|(m, _)| m)
}

/// Reads one message of at most `limit` bytes (a connection's first
/// message: [`MAX_HELLO`]); the message and its size on the wire.
pub async fn read_message_within<R: AsyncRead + Unpin>(
    r: &mut R,
    limit: usize,
) -> Result<(Message, usize), ProtocolError> {
    let budget = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_MESSAGE >> 10));
    let (m, permit) = read_counted(r, (limit, Reader::Any), &budget).await?;
    match m.msg {
        Message::Error { message, .. } => Err(ProtocolError::Peer(message)),
        msg => Ok((msg, (permit.num_permits() << 10))),
    }
}

/// KiB of a budget of `whole` KiB a message of `bytes` takes (all of it, at most).
fn kib(bytes: usize, whole: usize) -> u32 {
    (bytes.div_ceil(1024) as u32).clamp(1, whole as u32)
}

/// Reads one message `reader` takes, of at most `limit` bytes, and takes
/// its size from `budget` (KiB; shared by what is read ahead and not yet
/// consumed) before making room for it: the permit goes with the message.
pub async fn read_counted<R: AsyncRead + Unpin>(
    r: &mut R,
    (limit, reader): (usize, Reader),
    budget: &std::sync::Arc<tokio::sync::Semaphore>,
) -> Result<(Received, tokio::sync::OwnedSemaphorePermit), ProtocolError> {
    let whole = budget.available_permits().max(1);
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(ProtocolError::Closed),
        r => r?,
    };
    let len = u32::from_be_bytes(len) as usize;
    if len > limit.min(MAX_MESSAGE) {
        return Err(ProtocolError::TooLarge(len));
    }
    let mut head = vec![0; len.min(64)];
    r.read_exact(&mut head).await?;
    if len > tag_of(&head).map_or(SMALL_MESSAGE, |t| cap_of(t, reader)) {
        return Err(ProtocolError::TooLarge(len));
    }
    let mut permit = budget.clone().acquire_many_owned(kib(len, whole)).await.map_err(|_| ProtocolError::Closed)?;
    let mut body = Vec::with_capacity(len);
    body.extend_from_slice(&head);
    body.resize(len, 0);
    r.read_exact(&mut body[head.len()..]).await?;
    let mut m: Message = serde_json::from_slice(&body).map_err(ProtocolError::Decode)?;
    let ids = Ids::of(&body);
    if let Message::DeviceStateChunk { len, bytes } = &mut m {
        if *len > MAX_BULK {
            return Err(ProtocolError::TooLarge(*len as usize));
        }
        let more = budget.clone().acquire_many_owned(kib(*len as usize, whole)).await;
        permit.merge(more.map_err(|_| ProtocolError::Closed)?);
        bytes.resize(*len as usize, 0);
        r.read_exact(bytes).await?;
    }
    Ok((Received { msg: m, ids }, permit))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn roundtrip_and_limits() {
        let (mut a, mut b) = tokio::io::duplex(1 << 20);
        write_message(&mut a, &Message::Resume { start: true, migration: None }).await.unwrap();
        assert!(matches!(read_message(&mut b).await.unwrap(), Message::Resume { start: true, .. }));
        a.write_all(&(u32::MAX).to_be_bytes()).await.unwrap();
        assert!(matches!(read_message(&mut b).await, Err(ProtocolError::TooLarge(_))));
        let (mut a, mut b) = tokio::io::duplex(1024);
        a.write_all(&3u32.to_be_bytes()).await.unwrap();
        a.write_all(b"{x}").await.unwrap();
        assert!(matches!(read_message(&mut b).await, Err(ProtocolError::Decode(_))));
        drop(a);
        assert!(matches!(read_message(&mut b).await, Err(ProtocolError::Closed)));
    }

    #[tokio::test]
    async fn bulk_bytes_follow_their_message() {
        let (mut a, mut b) = tokio::io::duplex(1 << 20);
        let bytes: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();
        let m = Message::DeviceStateChunk { len: bytes.len() as u32, bytes: bytes.clone() };
        let w = tokio::spawn(async move {
            write_message(&mut a, &m).await.unwrap();
            write_message(&mut a, &Message::Ok).await.unwrap();
        });
        match read_message(&mut b).await.unwrap() {
            Message::DeviceStateChunk { bytes: got, .. } => assert!(got == bytes),
            other => panic!("{other:?}"),
        }
        assert!(matches!(read_message(&mut b).await.unwrap(), Message::Ok));
        w.await.unwrap();
        // A declared length above the cap is refused before reading it.
        let (mut a, mut b) = tokio::io::duplex(1024);
        let body = format!(r#"{{"type":"device_state_chunk","len":{}}}"#, MAX_BULK + 1);
        a.write_all(&(body.len() as u32).to_be_bytes()).await.unwrap();
        a.write_all(body.as_bytes()).await.unwrap();
        assert!(matches!(read_message(&mut b).await, Err(ProtocolError::TooLarge(_))));
    }

    #[tokio::test]
    async fn each_kind_is_capped_before_it_is_read() {
        // A small kind announcing a large body is refused before the body is read.
        let (mut a, mut b) = tokio::io::duplex(1 << 20);
        let body = format!(r#"{{"type":"resume","start":true,"pad":"{}"}}"#, "x".repeat(SMALL_MESSAGE));
        a.write_all(&(body.len() as u32).to_be_bytes()).await.unwrap();
        a.write_all(&body.as_bytes()[..64]).await.unwrap();
        assert!(matches!(read_message(&mut b).await, Err(ProtocolError::TooLarge(_))));
        // A kind that may be large is read whole.
        let (mut a, mut b) = tokio::io::duplex(4 << 20);
        let sums = Message::Checksums { sums: vec![u64::MAX; 100_000] };
        let w = tokio::spawn(async move { write_message(&mut a, &sums).await.unwrap() });
        assert!(matches!(read_message(&mut b).await, Ok(Message::Checksums { .. })));
        w.await.unwrap();
        // A first message over the hello's limit is refused.
        let (mut a, mut b) = tokio::io::duplex(1 << 20);
        let hello = Message::Hello { version: 1, host: "h".repeat(MAX_HELLO), max_version: None };
        let w = tokio::spawn(async move { write_message(&mut a, &hello).await });
        assert!(matches!(read_message_within(&mut b, MAX_HELLO).await, Err(ProtocolError::TooLarge(_))));
        drop(b);
        let _ = w.await;
    }

    #[test]
    fn large_kinds_only_in_their_direction() {
        assert_eq!(cap_of("checksums", Reader::Serving(4)), SMALL_MESSAGE, "a destination is sent no checksums");
        assert_eq!(cap_of("checksums", Reader::Client), 32 << 20);
        assert_eq!(cap_of("device_state", Reader::Serving(2)), SMALL_MESSAGE, "protocol 2 sends chunks");
        assert_eq!(cap_of("device_state", Reader::Serving(1)), MAX_MESSAGE);
        assert_eq!(cap_of("sender_added", Reader::Client), 1 << 20, "RDMA keys in slices");
        assert_eq!(cap_of("open_session", Reader::Client), SMALL_MESSAGE);
    }

    #[tokio::test]
    async fn request_ids_travel_at_the_end_and_old_readers_ignore_them() {
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        let budget = std::sync::Arc::new(tokio::sync::Semaphore::new(1 << 10));
        for (m, ids) in [
            (Message::Fence { sender: 2 }, Ids::request(7)),
            (Message::Ok, Ids::reply_to(Ids::request(u64::MAX))),
            (Message::error(ErrorCode::Failed, "no \"re\":5"), Ids::reply_to(Ids::request(8))),
            (Message::Ok, Ids::default()),
            (Message::Fence { sender: 3 }, Ids::default()),
        ] {
            write_tagged(&mut a, &m, ids).await.unwrap();
            let (got, _) = read_counted(&mut b, (MAX_MESSAGE, Reader::Any), &budget).await.unwrap();
            assert_eq!((got.msg.name(), got.ids), (m.name(), ids));
        }
        // What an agent of protocol 5 or older reads (serde ignores the fields).
        write_tagged(&mut a, &Message::CapacityQuery, Ids::request(1)).await.unwrap();
        assert!(matches!(read_message(&mut b).await, Ok(Message::CapacityQuery)));
        assert_eq!(Ids::of(br#"{"type":"fence","sender":2}"#), Ids::default(), "a field of the message is no id");
        let late = Ids::of(br#"{"type":"x","re":1,"id":2}"#);
        assert_eq!(late, Ids::request(2), "a re before an id is not one this agent wrote");
    }

    #[test]
    fn versions_are_negotiated() {
        assert_eq!(negotiate(1, 1), Some(1), "a version-1 peer");
        assert_eq!(negotiate(1, 9), Some(VERSION), "a newer peer that still speaks ours");
        assert_eq!(negotiate(VERSION + 1, VERSION + 3), None, "a peer that dropped our versions");
    }
}
