//! The destination role: one control connection from a source agent opens a
//! session, which owns the new RAM files, the data-plane registration and the
//! paused incoming VM until switchover commits it (or anything else discards
//! it: abort, error, or the connection closing). After a retarget the same
//! session may forward what it holds (`forward`).

mod forward;
mod open;
mod stage;

use stage::Stage;

use super::Agent;
use crate::control::{Channel, Connected, Heartbeat, ServerStream};
use crate::memory::{Blocks, GuestRam};
use crate::protocol::{ErrorCode, Features, Ids, Message, MigrationId, ProtocolError, Received, Token};
use crate::transport::{Completion, Receiving};
use crate::vm::IncomingVm;
use base64::Engine as _;
use std::sync::Arc;
use tokio::sync::mpsc;

/// How often a session checks that its incoming VM still runs.
const VM_CHECK: std::time::Duration = std::time::Duration::from_millis(250);

/// One incoming migration on this host.
pub(crate) struct Session {
    vm: String,
    token: Token,
    ram: Arc<GuestRam>,
    incoming: Arc<dyn IncomingVm>,
    receiving: Arc<Receiving>,
    /// Its phase, and what the phase holds.
    stage: Stage,
    /// The uid this session's VM runs as, held until the session ends.
    uid: Option<u32>,
    /// The migration it belongs to (protocol 4).
    migration: Option<MigrationId>,
    /// The source that opened it.
    peer: String,
}

/// What a message asks of the session loop.
enum Step {
    /// Send this reply and go on.
    Reply(Message),
    /// Nothing to answer; go on.
    Quiet,
    /// The session is over (committed or aborted): this is the last answer.
    Last(Message),
}

/// Serves one source's control connection until its session ends.
pub(crate) async fn serve(agent: Arc<Agent>, conn: Connected<ServerStream>) {
    let peer = conn.host.clone();
    tracing::info!(%peer, version = conn.version, "control session accepted");
    let features = conn.features();
    let heartbeat = features.heartbeats().then(|| Heartbeat::answering(agent.cfg.peer_timeout));
    let Channel { out, mut inbox, closed } = Channel::serving(conn.stream, heartbeat, conn.version);
    let (fwd_tx, mut forwarded) = mpsc::unbounded_channel::<Completion>();
    let mut session: Option<Session> = None;
    let mut watch = tokio::time::interval(VM_CHECK);
    let mut drain = agent.drain_watch();
    let mut leave = Leave { can: features.leave(), asked: false, ticks: 0 };
    let outcome = async {
        loop {
            let msg = tokio::select! {
                Ok(()) = drain.changed() => {
                    if *drain.borrow_and_update() {
                        leave.ask(&out, &session, || format!("{} is drained", agent.cfg.name))?;
                    }
                    continue;
                }
                m = inbox.recv_tagged() => m.unwrap_or(Err(ProtocolError::Closed))?,
                Some(c) = forwarded.recv() => {
                    send(&out, forwarded_report(&session, c))?;
                    continue;
                }
                _ = watch.tick() => {
                    // The incoming VM died: the migration cannot complete here.
                    if session.as_ref().is_some_and(|s| !s.incoming.alive()) {
                        return Err(ProtocolError::Peer("the incoming VM exited".into()));
                    }
                    if let Some(why) = leave.room_due().then(|| short_of_room(&agent, &session)).flatten() {
                        leave.ask(&out, &session, || why)?;
                    }
                    continue;
                }
            };
            let Received { msg, ids } = msg;
            if let Message::Error { message, .. } = msg {
                return Err(ProtocolError::Peer(message));
            }
            // The answer names the request (protocol 6; older sources send no ids).
            let reply = |m| out.send_tagged(m, Ids::reply_to(ids)).map_err(|_| ProtocolError::Closed);
            let src = Source { name: &peer, features };
            match step(&agent, msg, &mut session, &src, &fwd_tx).await? {
                Step::Reply(m) => reply(m)?,
                Step::Quiet => {}
                Step::Last(m) => return reply(m),
            }
        }
    }
    .await;
    match &outcome {
        // A peer that asked a question without a session (its room, an
        // outcome) and left.
        Err(ProtocolError::Closed) if session.is_none() => tracing::debug!(%peer, "control connection closed"),
        Err(e) => tracing::warn!(%peer, "control session: {}", crate::error_chain(e)),
        Ok(()) => {}
    }
    if let Some(sess) = session {
        // Anything but a committed switchover leaves nothing behind.
        let why = outcome.map_or_else(|e| crate::error_chain(&e), |()| "session ended".into());
        discard(&agent, sess, &peer, &why).await;
    }
    // What was queued goes out (the last answer), then the connection closes.
    drop(out);
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), closed.cancelled()).await;
    closed.cancel();
}

/// Asking the source to move a session elsewhere (protocol 3): once, and
/// only while this host is its target (a forwarder is on its way out).
struct Leave {
    can: bool,
    asked: bool,
    ticks: u32,
}

/// The data dir's room is looked at every this many VM checks (2 s).
const ROOM_EVERY: u32 = 8;

impl Leave {
    fn ask(
        &mut self,
        out: &crate::control::Outbox,
        session: &Option<Session>,
        reason: impl FnOnce() -> String,
    ) -> Result<(), ProtocolError> {
        let Some(sess) = session.as_ref().filter(|s| s.stage.forwarding().is_none()) else { return Ok(()) };
        if !self.can || self.asked {
            return Ok(());
        }
        self.asked = true;
        let reason = reason();
        tracing::warn!(vm = %sess.vm, "{reason}: asking the source to move the migration elsewhere");
        send(out, Message::Leave { reason })
    }

    /// Whether the data dir's room is due for a look.
    fn room_due(&mut self) -> bool {
        self.ticks += 1;
        self.can && !self.asked && self.ticks.is_multiple_of(ROOM_EVERY)
    }
}

/// Why the session cannot complete here any more, if the data dir no longer
/// has room for what its RAM files still need (something else filled it).
fn short_of_room(agent: &Agent, session: &Option<Session>) -> Option<String> {
    agent.short_of_room(&session.as_ref()?.vm)
}

fn send(out: &crate::control::Outbox, m: Message) -> Result<(), ProtocolError> {
    out.send(m).map_err(|_| ProtocolError::Closed)
}

fn forwarded_report(session: &Option<Session>, c: Completion) -> Message {
    let sender = session.as_ref().and_then(|s| s.stage.forwarding()).map(|(_, f)| f);
    let (bytes, zero_pages) = sender.map_or((0, 0), |f| (f.bytes_sent(), f.zero_pages_sent()));
    match c {
        Completion::Applied(b) => Message::Forwarded { batch: b.id, applied: true, error: None, bytes, zero_pages },
        Completion::Failed(b, e) => {
            Message::Forwarded { batch: b.id, applied: false, error: Some(e), bytes, zero_pages }
        }
    }
}

async fn discard(agent: &Agent, sess: Session, peer: &str, why: &str) {
    agent.receiver.remove(&sess.receiving);
    if let Some((_, f)) = sess.stage.forwarding() {
        f.close();
    }
    tracing::info!(vm = %sess.vm, %peer, "discarding incoming VM: {why}");
    let inc = sess.incoming.clone();
    let _ = tokio::task::spawn_blocking(move || inc.discard()).await;
    agent.journal_incoming(&sess.vm, None);
    agent.end_incoming(&sess.vm);
    agent.release_uid(sess.uid);
}

/// An `Error` answer: the host failed doing what was asked.
fn error(e: impl std::error::Error + 'static) -> Message {
    Message::error(ErrorCode::Failed, crate::error_chain(&e))
}

/// The source at the other end of a control connection.
struct Source<'a> {
    /// Its verified host name.
    name: &'a str,
    /// What the protocol version it speaks lets it do.
    features: Features,
}

impl Session {
    /// Why `msg` does not belong to this session, if it names another migration.
    fn foreign(&self, msg: &Message) -> Option<String> {
        let named = match msg {
            Message::Resume { migration, .. }
            | Message::Abort { migration, .. }
            | Message::ForwardTo { migration, .. } => *migration,
            _ => None,
        };
        match (named, self.migration) {
            (Some(m), Some(mine)) if m != mine => {
                Some(format!("{} names migration {m}, but this session is migration {mine}", msg.name()))
            }
            _ => None,
        }
    }
}

/// Handles one message from the source.
async fn step(
    agent: &Agent,
    msg: Message,
    session: &mut Option<Session>,
    src: &Source<'_>,
    fwd_tx: &mpsc::UnboundedSender<Completion>,
) -> Result<Step, ProtocolError> {
    if let Some(why) = session.as_ref().and_then(|s| s.foreign(&msg)) {
        return Ok(Step::Reply(Message::error(ErrorCode::Foreign, why)));
    }
    // Out of order for the session's phase: refused by name, before any
    // backend sees it.
    if let Some(Err(e)) = session.as_ref().map(|s| s.stage.admit(&msg)) {
        tracing::warn!(peer = %src.name, "{e}");
        // A chunk has no answer of its own (one would answer the next
        // request of a source that pairs replies by order): its end,
        // refused in turn, carries the refusal.
        if matches!(msg, Message::DeviceStateChunk { .. }) {
            return Ok(Step::Quiet);
        }
        return Ok(Step::Reply(Message::error(ErrorCode::OutOfOrder, e.to_string())));
    }
    let reply = match (msg, session.as_mut()) {
        (
            Message::OpenSession {
                vm,
                regions,
                chunk_size,
                launch,
                rdma_slices,
                holes,
                migration,
                page_sizes,
                transport,
            },
            None,
        ) => {
            // A TCP-only migration gets no RDMA registration (it would pin
            // and allocate the whole RAM for nothing).
            let rdma_slices = (transport != Some(crate::protocol::TransportKind::Tcp)).then_some(rdma_slices);
            let open = open::Open {
                vm: &vm,
                regions,
                page_sizes,
                chunk_size,
                holes,
                launch: &launch,
                rdma_slices,
                migration,
                peer: src.name,
            };
            open_session(agent, session, src, open).await
        }
        (Message::Resume { start, .. }, Some(_)) => return resume(agent, session, start).await,
        (Message::Abort { reason, .. }, _) => {
            // Clean up before answering: the source then knows nothing is left here.
            if let Some(sess) = session.take() {
                discard(agent, sess, src.name, &format!("aborted by source: {reason}")).await;
            }
            return Ok(Step::Last(Message::Ok));
        }
        (Message::CapacityQuery, None) => Message::Capacity(agent.capacity()),
        (Message::OutcomeQuery { vm, migration }, _) => {
            let outcome = agent.outcome_of(&vm, migration, src.name);
            Message::OutcomeAnswer { vm, outcome }
        }
        (msg, Some(sess)) => return on_session(agent, sess, msg, src, fwd_tx).await,
        // A chunk has no answer of its own, even refused.
        (Message::DeviceStateChunk { .. }, None) => return Ok(Step::Quiet),
        (other, None) => Message::error(ErrorCode::OutOfOrder, format!("unexpected {} at this point", other.name())),
    };
    Ok(Step::Reply(reply))
}

/// A message about the open session.
async fn on_session(
    agent: &Agent,
    sess: &mut Session,
    msg: Message,
    src: &Source<'_>,
    fwd_tx: &mpsc::UnboundedSender<Completion>,
) -> Result<Step, ProtocolError> {
    if let Some(t) = forward::Target::of(&msg) {
        return Ok(Step::Reply(forward_to(agent, sess, t, fwd_tx).await));
    }
    let reply = match msg {
        Message::Forward { batch, to, runs } => match forward::forward(sess, batch, &to, runs, fwd_tx.clone()) {
            Ok(()) => return Ok(Step::Quiet),
            Err(e) => forward::refused(batch, &e),
        },
        Message::Fence { sender } => match agent.receiver.fence(&sess.receiving, sender).await {
            Ok(()) => {
                tracing::info!(vm = %sess.vm, sender, "fenced a sender: token revoked, streams cut");
                Message::Ok
            }
            Err(e) => error(e),
        },
        Message::AddSender { sender, host, rdma } if src.features.descriptions() && agent.cfg.sends_data(&host) => {
            add_sender(agent, sess, (sender, &host), rdma).await
        }
        Message::AddSender { host, .. } => {
            let why = format!("{host} is not a host that may send data here (--peer, --accept-from)");
            Message::error(ErrorCode::NotAllowed, why)
        }
        Message::ChecksumRequest { blocks, block_pages, pause } => {
            // What is verified now must stay as verified: only the source's
            // streams go on, and nothing new comes in.
            if pause {
                if let Err(e) = agent.receiver.seal(&sess.receiving).await {
                    return Ok(Step::Reply(error(e)));
                }
                sess.stage = Stage::Sealed;
            }
            checksums(sess, blocks, block_pages).await
        }
        Message::DeviceState { state } => {
            let state = base64::engine::general_purpose::STANDARD.decode(state);
            device_state(agent, sess, state.map_err(|e| crate::error_chain(&e))).await
        }
        Message::DeviceStateChunk { bytes, .. } => {
            sess.stage.chunk(&bytes);
            return Ok(Step::Quiet);
        }
        Message::DeviceStateEnd { total } => {
            let state = sess.stage.end_device_state(total);
            device_state(agent, sess, state).await
        }
        other => Message::error(ErrorCode::OutOfOrder, format!("unexpected {} at this point", other.name())),
    };
    Ok(Step::Reply(reply))
}

/// A forwarder's own token (and RDMA keys, if the session offers RDMA and
/// the migration may use it: a registration that fails leaves it TCP).
async fn add_sender(agent: &Agent, sess: &Session, (sender, host): (u8, &str), rdma: bool) -> Message {
    let token = match agent.receiver.add_sender(&sess.receiving, sender, host) {
        Ok(t) => t,
        Err(e) => return error(e),
    };
    let keys = match rdma {
        true => {
            let r = sess.receiving.clone();
            tokio::task::spawn_blocking(move || crate::transport::Receiver::rdma_for(&r, sender)).await.ok().flatten()
        }
        false => None,
    };
    let rdma = match keys {
        Some(Ok(regions)) => Some(regions),
        Some(Err(e)) => {
            tracing::warn!(vm = %sess.vm, %host, "no RDMA for this forwarder, TCP then: {e}");
            None
        }
        None => None,
    };
    Message::SenderAdded { token, rdma }
}

async fn open_session(agent: &Agent, session: &mut Option<Session>, src: &Source<'_>, o: open::Open<'_>) -> Message {
    let vm = o.vm.to_owned();
    // A protocol-4 source's token is its own; an older one hands its token
    // to its forwarders, so it binds only sender 0 to the source.
    match open::open(agent, o, !src.features.descriptions()).await {
        Ok(sess) => {
            tracing::info!(%vm, peer = %src.name, migration = ?sess.migration, "incoming session opened");
            let m = Message::SessionOpened {
                data_port: agent.data_port(),
                token: sess.token,
                rdma: sess.receiving.rdma_offer(),
                rdma_endpoint: crate::transport::rdma::ENDPOINT_VERSION,
            };
            *session = Some(sess);
            m
        }
        Err(e) => Message::error(e.code(), crate::error_chain(&e)),
    }
}

async fn forward_to(
    agent: &Agent,
    sess: &mut Session,
    t: forward::Target,
    fwd_tx: &mpsc::UnboundedSender<Completion>,
) -> Message {
    let to = t.host.clone();
    match forward::forward_to(agent, sess, t, fwd_tx.clone()).await {
        Ok((kind, rdma)) => {
            tracing::info!(vm = %sess.vm, %to, transport = kind.name(), "forwarding to the new destination");
            Message::ForwardReady { transport: kind, rdma }
        }
        Err(e) => Message::error(e.code(), crate::error_chain(&e)),
    }
}

/// Checksums of the blocks asked for (of every chunk, whole, without a
/// list). The request comes from the network: the block size and every
/// index are checked, and the list is no longer than there are blocks.
async fn checksums(sess: &Session, blocks: Option<Vec<u32>>, block_pages: Option<u32>) -> Message {
    let ram = sess.ram.clone();
    if let Some(chunk) = crate::hooks::corrupt_chunk() {
        corrupt_once(&ram, chunk);
    }
    let chunk_pages = (ram.layout().chunk_size() / crate::memory::PAGE_SIZE as u64) as u32;
    let list = match (blocks, block_pages) {
        (None, _) => None,
        (Some(list), Some(bp)) if (1..=chunk_pages).contains(&bp) => {
            let b = Blocks::new(ram.layout(), bp as usize);
            if list.len() > b.len() || list.iter().any(|&i| i as usize >= b.len()) {
                let why = format!("checksum request outside the {} blocks of this session", b.len());
                return Message::error(ErrorCode::Invalid, why);
            }
            Some((b, list.into_iter().map(|i| i as usize).collect::<Vec<_>>()))
        }
        (Some(_), bp) => return Message::error(ErrorCode::Invalid, format!("checksum request with block size {bp:?}")),
    };
    let sums = tokio::task::spawn_blocking(move || match list {
        Some((b, l)) => ram.block_checksums(&b, &l),
        None => ram.checksums(),
    });
    match sums.await {
        Ok(sums) => Message::Checksums { sums },
        Err(e) => error(e),
    }
}

/// Seals the session (only the source's streams go on) whatever the source
/// asked: the device state and `Resume` come only after it, so nothing a
/// forwarder sends lands once the VM's state is taken, with or without a
/// verification.
async fn sealed(agent: &Agent, sess: &Session) -> Result<(), Message> {
    agent.receiver.seal(&sess.receiving).await.map_err(error)
}

/// Seals the session and loads a whole device state into the incoming VM;
/// the session holds it from then on (else it stays sealed, and the source
/// fails the migration with the reason).
async fn device_state(agent: &Agent, sess: &mut Session, state: Result<Vec<u8>, String>) -> Message {
    if let Err(m) = sealed(agent, sess).await {
        return m;
    }
    sess.stage = Stage::Sealed;
    let reply = match state {
        Ok(state) => load_device_state(sess, state).await,
        Err(message) => Message::error(ErrorCode::Invalid, message),
    };
    if matches!(reply, Message::Ok) {
        sess.stage = Stage::Loaded;
    }
    reply
}

async fn load_device_state(sess: &Session, state: Vec<u8>) -> Message {
    if let Some(ms) = crate::hooks::stall_device_state_ms() {
        tracing::warn!(ms, "test hook: stalling before the device state");
        tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
    }
    let inc = sess.incoming.clone();
    match tokio::task::spawn_blocking(move || inc.load_device_state(&state)).await {
        Ok(Ok(())) => Message::Ok,
        Ok(Err(e)) => error(e),
        Err(e) => error(e),
    }
}

/// Commits the switchover: the VM lives here from now on.
async fn resume(agent: &Agent, session: &mut Option<Session>, start: bool) -> Result<Step, ProtocolError> {
    static DROPPED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if crate::hooks::drop_before_commit().is_some() && !DROPPED.swap(true, std::sync::atomic::Ordering::SeqCst) {
        tracing::warn!("test hook: dropping the connection instead of committing");
        return Err(ProtocolError::Closed);
    }
    let Some(sess) = session.take() else {
        return Ok(Step::Reply(Message::error(ErrorCode::OutOfOrder, "no session")));
    };
    if let Err(m) = sealed(agent, &sess).await {
        *session = Some(sess);
        return Ok(Step::Reply(m));
    }
    agent.receiver.remove(&sess.receiving);
    let inc = sess.incoming.clone();
    let committed = match tokio::task::spawn_blocking(move || inc.commit(start)).await {
        Ok(Ok(rec)) => crate::vm::VmRecord { disks: agent.incoming_disks(&sess.vm), ..rec },
        Ok(Err(e)) => {
            *session = Some(sess);
            return Ok(Step::Reply(error(e)));
        }
        Err(e) => {
            *session = Some(sess);
            return Ok(Step::Reply(error(e)));
        }
    };
    tracing::info!(vm = %committed.name, start, "switchover: VM now lives here");
    // Remembered before the registry is journaled with the VM in it.
    agent.committed(sess.migration, &sess.peer);
    agent.add_vm(committed);
    agent.journal_incoming(&sess.vm, None);
    agent.end_incoming(&sess.vm);
    // Its record holds the uid now.
    agent.release_uid(sess.uid);
    crate::hooks::gate(&agent.cfg.name, "commit").await;
    if crate::hooks::drop_after_commit().is_some() {
        tracing::warn!("test hook: dropping the connection after the commit, before answering");
        return Err(ProtocolError::Closed);
    }
    Ok(Step::Last(Message::Resumed))
}

/// Test hook ([`crate::hooks::corrupt_chunk`]): flips a byte of chunk `c`
/// before the first verification, to prove mismatches are found and resent.
fn corrupt_once(ram: &GuestRam, c: usize) {
    static DONE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    let Some(ch) = ram.layout().chunks().get(c).copied() else {
        return;
    };
    if DONE.swap(true, std::sync::atomic::Ordering::SeqCst) {
        return;
    }
    let (region, offset) = ram.layout().locate(ch.first_page);
    if ram.write_at(region, offset + 123, &[0x5a]).is_ok() {
        tracing::warn!(chunk = c, "test hook: corrupted one byte before verification");
    }
}
