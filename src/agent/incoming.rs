//! The destination role: one control connection from a source agent opens a
//! session, which owns the new RAM files, the data-plane registration and the
//! paused incoming VM until switchover commits it (or anything else discards
//! it: abort, error, or the connection closing).

use super::peer::ServerStream;
use super::Agent;
use crate::memory::{GuestRam, Layout};
use crate::protocol::data::{Token, TOKEN_LEN};
use crate::protocol::{read_message, write_message, Message, ProtocolError};
use crate::transport::rdma::RdmaRegion;
use crate::transport::tcp::Receiving;
use crate::transport::TransportKind;
use crate::transport::{Batch, Completion, PageSender, Run};
use crate::vm::synthetic::{guest_paths, SyntheticIncoming};
use crate::vm::{qemu, IncomingVm, LaunchSpec, RamFile, VmError};
use base64::Engine as _;
use rand::RngCore;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::WriteHalf;
use tokio::sync::mpsc;

struct Session {
    vm: String,
    token: Token,
    ram: Arc<GuestRam>,
    incoming: Arc<dyn IncomingVm>,
    receiving: Arc<Receiving>,
    /// Set once the source made this host a forwarder (retarget): where to
    /// and the streams.
    forward: Option<(String, Arc<dyn PageSender>)>,
}

type Inbox = mpsc::UnboundedReceiver<Result<Message, ProtocolError>>;

pub async fn serve(agent: Arc<Agent>, s: ServerStream, peer: String) {
    // A reader task, so that incoming messages and forwarding completions
    // can be waited for together without losing half-read messages.
    let (mut r, mut w) = tokio::io::split(s);
    let (tx, mut inbox) = mpsc::unbounded_channel();
    let reader = tokio::spawn(async move {
        loop {
            let m = read_message(&mut r).await;
            let end = m.is_err();
            if tx.send(m).is_err() || end {
                break;
            }
        }
    });
    let mut session: Option<Session> = None;
    let outcome = run(&agent, &mut w, &mut inbox, &peer, &mut session).await;
    reader.abort();
    if let Err(e) = &outcome {
        tracing::warn!(%peer, "control session: {e}");
    }
    if let Some(sess) = session {
        // Anything but a committed switchover leaves nothing behind.
        discard(&agent, sess, &peer, &format!("{outcome:?}")).await;
    }
}

async fn discard(agent: &Agent, sess: Session, peer: &str, why: &str) {
    agent.receiver.remove(&sess.token);
    if let Some((_, f)) = &sess.forward {
        f.close();
    }
    tracing::info!(vm = %sess.vm, %peer, "discarding incoming VM: {why}");
    let inc = sess.incoming.clone();
    let _ = tokio::task::spawn_blocking(move || inc.discard()).await;
    agent.end_incoming(&sess.vm);
}

/// Runs the session until commit or abort (Ok) or a failure (Err). Whatever
/// is left in `session` afterwards is discarded by the caller.
async fn run(
    agent: &Agent,
    w: &mut WriteHalf<ServerStream>,
    inbox: &mut Inbox,
    peer: &str,
    session: &mut Option<Session>,
) -> Result<(), ProtocolError> {
    let (fwd_tx, mut forwarded) = mpsc::unbounded_channel::<Completion>();
    loop {
        let msg = tokio::select! {
            m = inbox.recv() => m.unwrap_or(Err(ProtocolError::Closed))?,
            Some(c) = forwarded.recv() => {
                let bytes = session.as_ref().and_then(|s| s.forward.as_ref()).map_or(0, |(_, f)| f.bytes_sent());
                let m = match c {
                    Completion::Applied(b) => Message::Forwarded { batch: b.id, applied: true, error: None, bytes },
                    Completion::Failed(b, e) => Message::Forwarded { batch: b.id, applied: false, error: Some(e), bytes },
                };
                write_message(w, &m).await?;
                continue;
            }
        };
        let reply = match (msg, session.as_mut()) {
            (Message::OpenSession { vm, regions, chunk_size, launch }, None) => {
                match open(agent, &vm, regions, chunk_size, &launch).await {
                    Ok(sess) => {
                        tracing::info!(%vm, %peer, "incoming session opened");
                        let m = Message::SessionOpened {
                            data_port: agent.data_port(),
                            token: hex::encode(sess.token),
                            rdma: sess.receiving.rdma.get().map(|t| t.offer()),
                        };
                        *session = Some(sess);
                        m
                    }
                    Err(e) => Message::Error { message: e },
                }
            }
            (Message::ForwardTo { host, data_addr, token, streams, sender, rdma, transport }, Some(sess)) => {
                let to = Target { host: &host, addr: data_addr, token: &token, sender, streams, rdma, transport };
                match forward_to(agent, sess, to, fwd_tx.clone()).await {
                    Ok(kind) => {
                        tracing::info!(vm = %sess.vm, to = %host, transport = kind, "forwarding to the new destination");
                        Message::ForwardReady { transport: kind.into() }
                    }
                    Err(e) => Message::Error { message: e },
                }
            }
            (Message::Forward { batch, to, runs }, Some(sess)) => {
                if let Err(e) = forward(sess, batch, &to, runs, fwd_tx.clone()) {
                    let m = Message::Forwarded { batch, applied: false, error: Some(e), bytes: 0 };
                    write_message(w, &m).await?;
                }
                continue;
            }
            (Message::Fence { sender }, Some(sess)) => match sess.receiving.fence(sender).await {
                Ok(()) => {
                    tracing::info!(vm = %sess.vm, sender, "fenced a sender's data streams");
                    Message::Ok
                }
                Err(e) => Message::Error { message: e.to_string() },
            },
            (Message::ChecksumRequest, Some(sess)) => {
                let ram = sess.ram.clone();
                if let Some(chunk) = crate::hooks::corrupt_chunk() {
                    corrupt_once(&ram, chunk);
                }
                let sums = tokio::task::spawn_blocking(move || ram.checksums())
                    .await
                    .map_err(|e| ProtocolError::Unexpected(e.to_string()))?;
                Message::Checksums { sums }
            }
            (Message::DeviceState { state }, Some(sess)) => {
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(state)
                    .map_err(|e| ProtocolError::Decode(e.to_string()))?;
                let inc = sess.incoming.clone();
                match tokio::task::spawn_blocking(move || inc.load_device_state(&bytes)).await {
                    Ok(Ok(())) => Message::Ok,
                    Ok(Err(e)) => Message::Error { message: e.to_string() },
                    Err(e) => Message::Error { message: e.to_string() },
                }
            }
            (Message::Resume { start }, Some(_)) => {
                let sess = session.take().expect("checked");
                agent.receiver.remove(&sess.token);
                let inc = sess.incoming.clone();
                match tokio::task::spawn_blocking(move || inc.commit(start)).await {
                    Ok(Ok(rec)) => {
                        tracing::info!(vm = %rec.name, start, "switchover: VM now lives here");
                        agent.add_vm(rec);
                        agent.end_incoming(&sess.vm);
                        write_message(w, &Message::Resumed).await?;
                        return Ok(());
                    }
                    Ok(Err(e)) => {
                        *session = Some(sess);
                        Message::Error { message: e.to_string() }
                    }
                    Err(e) => {
                        *session = Some(sess);
                        Message::Error { message: e.to_string() }
                    }
                }
            }
            (Message::Abort { reason }, _) => {
                // Clean up before answering: the source then knows nothing is left here.
                if let Some(sess) = session.take() {
                    discard(agent, sess, peer, &format!("aborted by source: {reason}")).await;
                }
                write_message(w, &Message::Ok).await?;
                return Ok(());
            }
            (other, _) => Message::Error { message: format!("unexpected {} at this point", other.name()) },
        };
        write_message(w, &reply).await?;
    }
}

/// Where a forwarder sends: the new destination's data endpoint.
struct Target<'a> {
    host: &'a str,
    addr: SocketAddr,
    token: &'a str,
    sender: u8,
    streams: usize,
    rdma: Option<Vec<RdmaRegion>>,
    transport: TransportKind,
}

/// Opens (or re-points) this host's data streams to a new destination;
/// returns the data plane used ("rdma" writes straight from this host's
/// registered RAM into the new destination's).
async fn forward_to(
    agent: &Agent,
    sess: &mut Session,
    t: Target<'_>,
    completions: mpsc::UnboundedSender<Completion>,
) -> Result<&'static str, String> {
    let token: Token = hex::decode(t.token).ok().and_then(|t| t.try_into().ok()).ok_or("bad token")?;
    if let Some((_, old)) = sess.forward.take() {
        old.close();
    }
    let s = crate::transport::open_sender(
        t.host,
        t.transport,
        &agent.rdma,
        t.rdma.as_deref(),
        t.addr,
        token,
        t.sender,
        t.streams.clamp(1, 64),
        sess.ram.clone(),
        None,
        completions,
    )
    .await
    .map_err(|e| format!("forwarding to {}: {e}", t.host))?;
    let kind = s.kind();
    sess.forward = Some((t.host.to_owned(), Arc::from(s)));
    Ok(kind)
}

/// Queues page runs from this host's RAM to the forward destination. The
/// runs come from the network: each must lie inside one chunk.
fn forward(
    sess: &Session,
    batch: u64,
    to: &str,
    runs: Vec<(usize, usize)>,
    completions: mpsc::UnboundedSender<Completion>,
) -> Result<(), String> {
    let (host, sender) = sess.forward.clone().ok_or("not forwarding")?;
    if host != to {
        return Err(format!("forwarding to {host}, not {to}"));
    }
    let layout = sess.ram.layout();
    let mut checked = vec![];
    for (first, pages) in runs {
        let last =
            first.checked_add(pages).filter(|&e| pages > 0 && e <= layout.total_pages()).ok_or("run out of range")?;
        if layout.locate(first).0 != layout.locate(last - 1).0 {
            return Err("run crosses a region boundary".into());
        }
        // A batch is one chunk: its runs fit in one (and a data plane's
        // length fields never overflow).
        if layout.chunk_of(first) != layout.chunk_of(last - 1) {
            return Err("run crosses a chunk boundary".into());
        }
        checked.push(Run { first_page: first, pages });
    }
    let b = Batch { id: batch, chunk: 0, from: 0, to: 0, runs: checked, epochs: vec![] };
    // Test hook: a slow forwarder (its pages land late), to exercise ordering.
    match crate::hooks::forward_delay_ms() {
        Some(ms) => {
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                if let Err(b) = sender.submit(b) {
                    let _ = completions.send(Completion::Failed(b, "forward streams closed".into()));
                }
            });
            Ok(())
        }
        None => sender.submit(b).map_err(|_| "forward streams closed".to_string()),
    }
}

async fn open(
    agent: &Agent,
    vm: &str,
    regions: Vec<crate::memory::RegionSpec>,
    chunk_size: u64,
    launch: &LaunchSpec,
) -> Result<Session, String> {
    if vm.is_empty() || !vm.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) || vm.starts_with('.') {
        return Err(format!("invalid VM name {vm:?}"));
    }
    if agent.has_vm(vm) {
        return Err(format!("a VM named {vm} already exists on {}", agent.cfg.name));
    }
    if !agent.begin_incoming(vm) {
        return Err(format!("{vm} is already being migrated to {}", agent.cfg.name));
    }
    let r = async {
        let layout = Layout::new(regions.clone(), chunk_size).map_err(|e| e.to_string())?;
        let mut dir = agent.cfg.data_dir.clone();
        let paths: Vec<_> = match launch {
            LaunchSpec::Synthetic { .. } => {
                if regions.len() != 1 {
                    return Err(format!("{} RAM regions for a synthetic guest", regions.len()));
                }
                vec![guest_paths(&dir, vm).0]
            }
            LaunchSpec::Qemu { .. } => {
                if let Some(r) = regions.iter().find(|r| !qemu::valid_id(&r.id)) {
                    return Err(format!("invalid memory backend id {:?}", r.id));
                }
                dir = qemu::vm_dir(&agent.cfg.data_dir, vm);
                if dir.exists() {
                    return Err(format!(
                        "{} exists on {}: another incoming session for {vm}?",
                        dir.display(),
                        agent.cfg.name
                    ));
                }
                std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
                regions.iter().map(|r| qemu::ram_path(&dir, &r.id)).collect()
            }
        };
        let owned_dir = matches!(launch, LaunchSpec::Qemu { .. }).then(|| dir.clone());
        let cleanup = move |paths: &[std::path::PathBuf]| {
            paths.iter().for_each(|p| drop(std::fs::remove_file(p)));
            if let Some(d) = &owned_dir {
                let _ = std::fs::remove_dir_all(d);
            }
        };
        if let Some(p) = paths.iter().find(|p| p.exists()) {
            return Err(format!("{} exists on {}: another incoming session for {vm}?", p.display(), agent.cfg.name));
        }
        let ram = match GuestRam::create(layout, &paths) {
            Ok(r) => Arc::new(r),
            Err(e) => {
                cleanup(&paths);
                return Err(e.to_string());
            }
        };
        let files: Vec<RamFile> = regions
            .iter()
            .zip(&paths)
            .map(|(r, p)| RamFile { id: r.id.clone(), path: p.clone(), size: r.size })
            .collect();
        let (name, launch2) = (vm.to_owned(), launch.clone());
        let launched = tokio::task::spawn_blocking(move || -> Result<Arc<dyn IncomingVm>, VmError> {
            Ok(match &launch2 {
                LaunchSpec::Synthetic { .. } => Arc::new(SyntheticIncoming::launch(&name, &dir, &files, &launch2)?),
                LaunchSpec::Qemu { .. } => Arc::new(qemu::QemuIncoming::launch(&name, &dir, &files, &launch2)?),
            })
        })
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r.map_err(|e| e.to_string()));
        let incoming = match launched {
            Ok(i) => i,
            Err(e) => {
                cleanup(&paths);
                return Err(e);
            }
        };
        let mut token = [0u8; TOKEN_LEN];
        rand::thread_rng().fill_bytes(&mut token);
        let receiving = agent.receiver.add(token, ram.clone());
        if let Ok(r) = &agent.rdma {
            // Registration pins (and allocates) the whole RAM: off the event loop.
            let (r, ram2) = (r.clone(), ram.clone());
            match tokio::task::spawn_blocking(move || r.register_target(&ram2)).await {
                Ok(Ok(t)) => {
                    let _ = receiving.rdma.set(t);
                }
                Ok(Err(e)) => tracing::warn!(%vm, "RDMA registration failed, offering TCP only: {e}"),
                Err(e) => tracing::warn!(%vm, "RDMA registration failed, offering TCP only: {e}"),
            }
        }
        Ok(Session { vm: vm.to_owned(), token, ram, incoming, receiving, forward: None })
    }
    .await;
    if r.is_err() {
        agent.end_incoming(vm);
    }
    r
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
