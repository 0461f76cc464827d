//! Carrying out what the route decides (`route`): opening a new
//! destination on a task of its own (so a slow host does not stall the
//! migration), installing it (a dirty sync, then every old destination
//! that holds pages is pointed at it as a forwarder), fencing a forwarder
//! whose forward failed (its pages stay locked until the target confirms
//! none of its frames can still land), releasing old destinations,
//! answering operators and recording decisions.

use super::fallback::Why;
use super::handle::RetargetRequest;
use super::link::{Link, LinkError};
use super::report::{Decision, RetargetReport, SenderTransport};
use super::route::{Command, Event, Install, Installed, ReplyId};
use super::setup::{link_spec, open_error};
use super::watch::EventKind;
use super::{EngineError, Migration};
use crate::ledger::HostId;
use crate::memory::PAGE_SIZE;
use crate::protocol::{Message, MessageKind};
use crate::transport::Batch;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};

/// The outcome of opening a new destination.
pub(super) type Opened = Result<Arc<Link>, EngineError>;
/// The outcome of fencing a forwarder at the target.
pub(super) type Fenced = (HostId, Result<(), LinkError>);

/// A destination's RAM as a sender may write it over RDMA, if it may.
type RdmaKeys = Option<Vec<crate::protocol::RdmaRegion>>;

/// The channels and books the route's commands need: operators waiting for
/// answers, sessions being opened, fences under way, batches held for them.
pub(super) struct Retargeting {
    /// Requests from the API.
    pub requests: mpsc::UnboundedReceiver<RetargetRequest>,
    opened_tx: mpsc::UnboundedSender<Opened>,
    /// New destinations that finished opening.
    pub opened: mpsc::UnboundedReceiver<Opened>,
    fenced_tx: mpsc::UnboundedSender<Fenced>,
    /// Fences that finished.
    pub fenced: mpsc::UnboundedReceiver<Fenced>,
    replies: HashMap<ReplyId, oneshot::Sender<Result<(), String>>>,
    next_reply: ReplyId,
    /// Failed forwards whose pages stay locked until the target fenced
    /// their sender (its late frames could otherwise land on newer pages).
    held: HashMap<HostId, Vec<Batch>>,
}

impl Retargeting {
    pub(super) fn new(requests: mpsc::UnboundedReceiver<RetargetRequest>) -> Self {
        let (opened_tx, opened) = mpsc::unbounded_channel();
        let (fenced_tx, fenced) = mpsc::unbounded_channel();
        Self {
            requests,
            opened_tx,
            opened,
            fenced_tx,
            fenced,
            replies: HashMap::new(),
            next_reply: 0,
            held: HashMap::new(),
        }
    }

    /// A new destination still being opened as the migration ends: its
    /// session is aborted once open (on a task: ending does not wait).
    fn discard_opening(&mut self) {
        let (tx, rx) = mpsc::unbounded_channel();
        self.opened_tx = tx;
        let mut opened = std::mem::replace(&mut self.opened, rx);
        tokio::spawn(async move {
            if let Some(Ok(link)) = opened.recv().await {
                link.abort("the migration ended").await;
            }
        });
    }
}

impl Migration {
    /// Feeds an event to the route and carries out what it decides.
    pub(super) fn route_event(&mut self, e: Event) -> Result<(), EngineError> {
        let cmds = self.route.handle(e);
        self.obey(cmds)
    }

    /// An operator's request: answered by the route (at once if refused).
    pub(super) fn retarget_asked(&mut self, r: RetargetRequest) -> Result<(), EngineError> {
        let reply = self.rt.next_reply;
        self.rt.next_reply += 1;
        self.rt.replies.insert(reply, r.reply);
        self.route_event(Event::RetargetAsked { reply, to: r.to, addr: r.addr, forward: r.forward })
    }

    /// Sorts the chunks the target lacks onto the senders, and releases the
    /// forwarders left with nothing to send.
    pub(super) fn plan(&mut self) -> Result<(), EngineError> {
        self.obey(vec![Command::Replan])
    }

    /// Carries out the route's commands, in order (and those they lead
    /// to, after them); a `Fail` ends the migration.
    pub(super) fn obey(&mut self, cmds: Vec<Command>) -> Result<(), EngineError> {
        let mut queue = VecDeque::from(cmds);
        while let Some(c) = queue.pop_front() {
            match c {
                Command::Reply { reply, result } => {
                    if let Some(tx) = self.rt.replies.remove(&reply) {
                        let _ = tx.send(result);
                    }
                }
                Command::Open { host, to, addr } => self.open_target(host, to, addr),
                // Carried out where the opened session is at hand (`opened`).
                Command::Discard { .. } | Command::Hold { .. } => {}
                Command::DropOpening => self.rt.discard_opening(),
                Command::Installed(i) => self.installed(i),
                Command::Release { host, why, fence_at } => self.release(host, &why, fence_at),
                Command::Fence { host, at } => self.fence(host, at),
                Command::Unlock { host } => {
                    for b in self.rt.held.remove(&host).unwrap_or_default() {
                        self.abandon(&b);
                    }
                }
                Command::Replan => {
                    let (target, forwarders) = (self.route.target(), self.route.forwarders());
                    let mut next = vec![];
                    for host in self.sched.plan(&self.ledger, self.ram.layout(), target, forwarders) {
                        next.extend(self.route.handle(Event::ForwarderIdle { host }));
                    }
                    // Before what came after the replan, as if done at once.
                    next.into_iter().rev().for_each(|c| queue.push_front(c));
                }
                Command::Decide { target, why, action } => self.decide(target, &why, action),
                Command::Announce { to, why, error } => {
                    let (forward, reason) = (why.forward(), why.describe());
                    self.job.handle.emit(EventKind::Retarget { to, forward, reason, error });
                }
                Command::ForwarderLost { host } => {
                    self.report.forwarders_lost.push(self.route.name(host).to_owned());
                }
                Command::Fail { host, why } => {
                    debug_assert!(queue.is_empty(), "commands after a failure: {queue:?}");
                    return Err(self.lost(host, LinkError::Lost(why)));
                }
            }
        }
        Ok(())
    }

    /// Opens a session on a new destination, on a task of its own.
    fn open_target(&mut self, id: HostId, to: String, addr: SocketAddr) {
        let mut spec = link_spec(&self.job, (&to, id, addr), &self.ram, &self.observer, &self.completions_tx);
        spec.holes = super::setup::hole_bytes(&self.zero_pages);
        let (tx, name) = (self.rt.opened_tx.clone(), to.clone());
        tracing::info!(%to, "retarget: preparing the new destination");
        tokio::spawn(async move {
            // Nobody waits for it any more (the migration ended): discarded.
            if let Err(mpsc::error::SendError(Ok(link))) =
                tx.send(Link::open(spec).await.map_err(|e| open_error(&name, e)))
            {
                link.abort("the migration ended").await;
            }
        });
    }

    /// A new destination opened (or failed to): the route decides whether
    /// it is installed.
    pub(super) async fn opened(&mut self, opened: Opened) -> Result<(), EngineError> {
        let (r, link) = match opened {
            Ok(link) => {
                if self.route.opening() {
                    crate::hooks::gate(&self.job.ctx.me, "retarget-install").await;
                    // An install's dirty sync, while the books still name
                    // the old target: pages the guest wrote since the last
                    // one are not current there, however the ledger saw
                    // them, so the work split starts from the truth.
                    if let Err(e) = self.dirty_sync().await {
                        tracing::warn!("dirty sync at the retarget failed: {}", crate::error_chain(&e));
                    }
                }
                (Ok(()), Some(link))
            }
            Err(e) => (Err(crate::error_chain(&e)), None),
        };
        let (cmds, install) = self.route.opened(r);
        match (install, link) {
            (Some(i), Some(link)) => self.install(i, link, cmds).await,
            (_, link) => {
                let discard =
                    cmds.iter().find_map(|c| if let Command::Discard { why } = c { Some(*why) } else { None });
                if let (Some(why), Some(link)) = (discard, link) {
                    link.abort(why).await;
                }
                self.obey(cmds)
            }
        }
    }

    /// Installs the new target (after the dirty sync): the hosts that may
    /// forward are pointed at it. Done here, not earlier: from now on every
    /// batch names the new target, and a forwarder refuses batches for any
    /// other.
    async fn install(&mut self, i: Install, link: Arc<Link>, cmds: Vec<Command>) -> Result<(), EngineError> {
        let at_old = self.ledger.fresh_count(i.old) as u64 * PAGE_SIZE as u64;
        self.note_transport(&link);
        self.links.insert(i.new, link.clone());
        self.verifier.new_target();
        self.job.handle.phase_changed(&link.host, self.route.phase());
        // The source stops feeding the old destination.
        self.links[&i.old].close_sender();
        self.slow.reset();
        // The lost old target, or every old one with --no-forward, released.
        self.obey(cmds)?;
        let mut ready = vec![];
        for h in i.point {
            if self.forward_to(h, &link).await {
                ready.push(h);
            }
        }
        self.route_event(Event::Pointed { ready, at_old })
    }

    /// Records an installed retarget (the route plans for it next).
    fn installed(&mut self, i: Installed) {
        let Installed { old, new, forwarding, at_old, reason, cause } = i;
        let (from, to) = (self.route.name(old).to_owned(), self.route.name(new).to_owned());
        tracing::info!(%from, %to, forwarding, at_old, "retargeted");
        self.report.retargets.push(RetargetReport {
            at_ms: self.start.elapsed().as_secs_f64() * 1e3,
            from,
            to: to.clone(),
            forwarding,
            at_old_destination_bytes: at_old,
            sent_before: self.sender_bytes(),
            bytes_after: BTreeMap::new(),
            reason,
            cause,
        });
        self.report.destination = to.clone();
        self.skip_holes();
        self.job.handle.set_progress(|p| {
            p.target = to;
            p.retargets += 1;
        });
        self.update_progress();
    }

    /// A data-plane token for forwarder `h` at `link`'s host, and the RDMA
    /// keys it writes with: its own, bound to its name (protocol 4), or the
    /// session's (older hosts).
    async fn sender_token(&self, h: HostId, link: &Link) -> Result<(crate::protocol::Token, RdmaKeys), LinkError> {
        if !link.features.descriptions() {
            return Ok((link.token, link.rdma_offer.clone()));
        }
        let rdma = link.rdma_offer.is_some() && self.job.opts.transport != crate::protocol::TransportKind::Tcp;
        let add = Message::AddSender { sender: h, host: self.route.name(h).to_owned(), rdma };
        match link.call(add, MessageKind::SenderAdded).await? {
            Message::SenderAdded { token, rdma } => Ok((token, rdma)),
            other => Err(LinkError::Unexpected { request: "add_sender", got: other.name() }),
        }
    }

    /// Asks host `h` to forward to `link`'s host; whether it can.
    async fn forward_to(&mut self, h: HostId, link: &Link) -> bool {
        let (token, rdma) = match self.sender_token(h, link).await {
            Ok(t) => t,
            Err(e) => {
                let host = self.route.name(h);
                tracing::warn!(%host, "no data-plane token for it at {}: {}", link.host, crate::error_chain(&e));
                return false;
            }
        };
        let m = Message::ForwardTo {
            host: link.host.clone(),
            data_addr: link.data_addr,
            token,
            streams: self.job.opts.streams,
            sender: h,
            rdma,
            rdma_endpoint: link.rdma_endpoint,
            transport: self.job.opts.transport,
            migration: Some(self.job.handle.migration),
            zero_frames: link.features.zero_frames(),
        };
        match self.links[&h].call(m, MessageKind::ForwardReady).await {
            Ok(Message::ForwardReady { transport, rdma }) => {
                self.report.senders.push(SenderTransport {
                    from: self.route.name(h).to_owned(),
                    to: link.host.clone(),
                    transport,
                    rdma,
                    re_pairs: 0,
                    tcp_fallbacks: 0,
                    why_not_rdma: None,
                });
                true
            }
            Ok(_) => false,
            Err(e) => {
                let host = self.route.name(h);
                tracing::warn!(%host, "cannot forward to {}: {}", link.host, crate::error_chain(&e));
                false
            }
        }
    }

    /// A host is no longer needed (or no longer usable): its session is
    /// discarded and nothing counts on its pages any more. The target at
    /// `fence_at` revokes what it gave it (its token, its streams): a
    /// released host can no longer write there.
    fn release(&mut self, f: HostId, why: &str, fence_at: Option<HostId>) {
        self.sched.drop_pool(f);
        self.ledger.invalidate(0..self.ledger.pages(), f);
        if let Some(l) = self.links.get(&f).cloned() {
            tracing::info!(host = %l.host, "releasing old destination: {why}");
            let reason = format!("no longer needed: {why}");
            tokio::spawn(async move { l.abort(&reason).await });
        }
        if let Some(target) = fence_at.and_then(|t| self.links.get(&t).cloned()) {
            tokio::spawn(async move { drop(target.call(Message::Fence { sender: f }, MessageKind::Ok).await) });
        }
    }

    /// Asks target `at` to fence forwarder `f`; the answer comes back as an event.
    fn fence(&mut self, f: HostId, at: HostId) {
        let tx = self.rt.fenced_tx.clone();
        let Some(target) = self.links.get(&at).cloned() else {
            let _ = tx.send((f, Err(LinkError::Closed)));
            return;
        };
        tokio::spawn(async move {
            let r = target.call(Message::Fence { sender: f }, MessageKind::Ok).await.map(|_| ());
            let _ = tx.send((f, r));
        });
    }

    /// A forwarder's batch failed: held for the fence the route asks for,
    /// or handed back as an ordinary failure.
    pub(super) fn forward_failed(&mut self, b: Batch, why: &str) -> Result<Option<Batch>, EngineError> {
        let cmds = self.route.handle(Event::ForwardFailed { from: b.from, to: b.to, why: why.into() });
        let held = cmds.contains(&Command::Hold { host: b.from });
        let b = match held {
            true => {
                self.rt.held.entry(b.from).or_default().push(b);
                None
            }
            false => Some(b),
        };
        self.obey(cmds)?;
        Ok(b)
    }

    /// A target lost during work outside the event loop (a live
    /// verification pass): handled as there, if it can be.
    pub(super) fn recover_lost(&mut self, e: EngineError) -> Result<(), EngineError> {
        match e {
            EngineError::DestinationLost { host, source } if host == self.target_name() => {
                let host = self.route.target();
                self.route_event(Event::TargetLost { host, why: crate::error_chain(&source) })
            }
            e => Err(e),
        }
    }

    /// Logs and records a decision about the target.
    fn decide(&mut self, target: String, why: &Why, action: String) {
        let reason = why.describe();
        tracing::warn!(vm = %self.report.vm, %target, "{reason}: {action}");
        let (t, r, a) = (target.clone(), reason.clone(), action.clone());
        self.job.handle.emit(EventKind::Decision { target: t, reason: r, action: a });
        self.report.decisions.push(Decision {
            at_ms: self.start.elapsed().as_secs_f64() * 1e3,
            target,
            reason,
            action,
            cause: why.cause(),
        });
    }
}
