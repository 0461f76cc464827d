//! Retargeting: opening the new destination (on a task of its own, so a
//! slow host does not stall the migration), installing it (a dirty sync,
//! then every old destination that holds pages is pointed at it as a
//! forwarder), fencing a forwarder whose forward failed (its pages stay
//! locked until the target confirms none of its frames can still land), and
//! releasing old destinations once they hold nothing the target lacks.

use super::fallback::Why;
use super::handle::RetargetRequest;
use super::link::{Link, LinkError};
use super::report::{RetargetReport, SenderTransport};
use super::setup::{link_spec, open_error};
use super::{EngineError, Migration};
use crate::ledger::{HostId, MAX_HOSTS};
use crate::memory::PAGE_SIZE;
use crate::protocol::{Message, MessageKind};
use crate::transport::Batch;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use tokio::sync::mpsc;

/// Who asked for a retarget.
pub(super) enum Origin {
    /// An operator (`dcmigrate retarget`), waiting for the outcome.
    Operator(tokio::sync::oneshot::Sender<Result<(), String>>),
    /// The engine on its own (`--fallback`).
    Auto(Why),
}

impl Origin {
    fn reason(&self) -> String {
        match self {
            Origin::Operator(_) => "operator".into(),
            Origin::Auto(why) => why.describe(),
        }
    }
}

/// A retarget whose new destination is being prepared.
pub(super) struct Opening {
    to: String,
    forward: bool,
    origin: Origin,
}

/// The outcome of opening a new destination.
pub(super) type Opened = Result<Arc<Link>, EngineError>;
/// The outcome of fencing a forwarder at the target.
pub(super) type Fenced = (HostId, Result<(), LinkError>);

/// A destination's RAM as a sender may write it over RDMA, if it may.
type RdmaKeys = Option<Vec<crate::protocol::RdmaRegion>>;

/// Retargets under way, and forwarders being fenced.
pub(super) struct Retargeting {
    /// Requests from the API.
    pub requests: mpsc::UnboundedReceiver<RetargetRequest>,
    opening: Option<Opening>,
    opened_tx: mpsc::UnboundedSender<Opened>,
    /// New destinations that finished opening.
    pub opened: mpsc::UnboundedReceiver<Opened>,
    /// Failed forwards whose pages stay locked until the target fenced
    /// their sender (its late frames could otherwise land on newer pages).
    fencing: HashMap<HostId, (HostId, Vec<Batch>)>,
    fenced: HashSet<HostId>,
    fenced_tx: mpsc::UnboundedSender<Fenced>,
    /// Fences that finished.
    pub fenced_rx: mpsc::UnboundedReceiver<Fenced>,
}

impl Retargeting {
    pub(super) fn new(requests: mpsc::UnboundedReceiver<RetargetRequest>) -> Self {
        let (opened_tx, opened) = mpsc::unbounded_channel();
        let (fenced_tx, fenced_rx) = mpsc::unbounded_channel();
        Self {
            requests,
            opening: None,
            opened_tx,
            opened,
            fencing: HashMap::new(),
            fenced: HashSet::new(),
            fenced_tx,
            fenced_rx,
        }
    }

    /// Refuses a retarget still being prepared.
    pub(super) fn end(&mut self, why: &str) {
        if let Some(Opening { origin: Origin::Operator(reply), .. }) = self.opening.take() {
            let _ = reply.send(Err(why.into()));
        }
    }

    /// A new destination still being opened as the migration ends: its
    /// session is aborted once open (on a task: ending does not wait).
    pub(super) fn discard_opening(&mut self) {
        if self.opening.is_none() {
            return;
        }
        let mut opened = std::mem::replace(&mut self.opened, mpsc::unbounded_channel().1);
        tokio::spawn(async move {
            if let Some(Ok(link)) = opened.recv().await {
                link.abort("the migration ended").await;
            }
        });
    }

    /// The host being prepared as the new destination, if any.
    pub(super) fn opening(&self) -> Option<&str> {
        self.opening.as_ref().map(|o| o.to.as_str())
    }

    /// Forwarders being fenced.
    pub(super) fn fences_pending(&self) -> usize {
        self.fencing.len()
    }
}

impl Migration {
    pub(super) fn start_retarget(&mut self, r: RetargetRequest) {
        let why = if self.phase.committing() {
            Some("too late: the switchover has started".to_owned())
        } else if self.rt.opening.is_some() {
            Some("another retarget is being prepared".to_owned())
        } else if self.hosts.names.contains(&r.to) {
            Some(format!("{} already takes part in this migration", r.to))
        } else if self.hosts.names.len() >= MAX_HOSTS {
            Some(format!("at most {MAX_HOSTS} hosts take part in one migration"))
        } else {
            None
        };
        if let Some(why) = why {
            let _ = r.reply.send(Err(why));
            return;
        }
        self.open_target(r.to, r.addr, r.forward, Origin::Operator(r.reply));
    }

    /// Opens a session on the new destination, on a task of its own.
    pub(super) fn open_target(&mut self, to: String, addr: std::net::SocketAddr, forward: bool, origin: Origin) {
        let id = self.hosts.names.len() as HostId;
        let mut spec = link_spec(&self.job, (&to, id, addr), &self.ram, &self.observer, &self.completions_tx);
        spec.holes = super::setup::hole_bytes(&self.zero_pages);
        let (tx, name) = (self.rt.opened_tx.clone(), to.clone());
        tracing::info!(%to, forward, "retarget: preparing the new destination");
        tokio::spawn(async move {
            // Nobody waits for it any more (the migration ended): discarded.
            if let Err(mpsc::error::SendError(Ok(link))) =
                tx.send(Link::open(spec).await.map_err(|e| open_error(&name, e)))
            {
                link.abort("the migration ended").await;
            }
        });
        self.rt.opening = Some(Opening { to, forward, origin });
    }

    /// Opens an automatic retarget's new destination. Older forwarders go
    /// on forwarding; a lost target is released at the install.
    pub(super) fn open_auto(&mut self, to: String, addr: std::net::SocketAddr, why: Why) {
        self.open_target(to, addr, true, Origin::Auto(why));
    }

    /// A retarget that could not be installed: an operator is told, an
    /// automatic one tries the next fallback host.
    fn retarget_failed(&mut self, opening: Opening, why: String) -> Result<(), EngineError> {
        let r = self.retarget_not_installed(opening, why);
        if self.fb.leave_pending && r.is_ok() && self.rt.opening().is_none() {
            self.leave_now();
        }
        r
    }

    fn retarget_not_installed(&mut self, opening: Opening, why: String) -> Result<(), EngineError> {
        match opening.origin {
            Origin::Operator(reply) => {
                let _ = reply.send(Err(why.clone()));
                // The target was lost meanwhile: the fallback hosts take over.
                let Some((host, lost)) = self.fb.dead.clone() else { return Ok(()) };
                if !self.phase.committing() && self.auto_retarget(Why::Lost(lost.clone())) {
                    return Ok(());
                }
                Err(self.lost(host, LinkError::Peer(lost)))
            }
            Origin::Auto(auto) if !self.phase.committing() => self.auto_failed(auto, &opening.to, why),
            Origin::Auto(_) => Ok(()),
        }
    }

    pub(super) async fn install_target(&mut self, opened: Opened) -> Result<(), EngineError> {
        let Some(opening) = self.rt.opening.take() else {
            if let Ok(link) = opened {
                link.abort("the retarget was given up").await;
            }
            return Ok(());
        };
        let link = match opened {
            Ok(l) => l,
            Err(e) => {
                let why = crate::error_chain(&e);
                tracing::warn!(to = %opening.to, "retarget failed, continuing to {}: {why}", self.target_name());
                return self.retarget_failed(opening, why);
            }
        };
        crate::hooks::gate(&self.job.ctx.me, "retarget-install").await;
        if self.phase.committing() {
            link.abort("too late: switchover started").await;
            return self.retarget_failed(opening, "too late: the switchover has started".into());
        }
        let old = self.hosts.target;
        // Sync first: pages the guest wrote since the last sync are not
        // current at the old destination, however the ledger saw them. The
        // new destination's work split (what the old one forwards, what only
        // the source has) then starts from the truth.
        if let Err(e) = self.dirty_sync().await {
            tracing::warn!("dirty sync at the retarget failed: {}", crate::error_chain(&e));
        }
        let at_old = self.ledger.fresh_count(old) as u64 * PAGE_SIZE as u64;
        self.hosts.names.push(opening.to.clone());
        self.note_transport(&link);
        self.hosts.links.insert(link.id, link.clone());
        self.hosts.target = link.id;
        self.verifier.new_target();
        self.job.handle.phase_changed(&opening.to, self.phase);
        // The source stops feeding the old destination.
        self.hosts.links[&old].close_sender();
        let lost = self.fb.dead.take().map(|(h, _)| h);
        self.fb.slow.reset();
        // A leave asked of the old target is answered by this retarget.
        self.fb.leave_pending = false;
        self.point_forwarders(old, &link, opening.forward, lost).await;
        let forwarding = self.hosts.forwarders.contains(&old);
        tracing::info!(from = %self.hosts.names[old as usize], to = %opening.to, forwarding, at_old, "retargeted");
        self.report.retargets.push(RetargetReport {
            at_ms: self.start.elapsed().as_secs_f64() * 1e3,
            from: self.hosts.names[old as usize].clone(),
            to: opening.to.clone(),
            forwarding,
            at_old_destination_bytes: at_old,
            sent_before: self.sender_bytes(),
            bytes_after: BTreeMap::new(),
            reason: opening.origin.reason(),
        });
        self.report.destination = opening.to.clone();
        self.skip_holes();
        let to = opening.to.clone();
        self.job.handle.set_progress(|p| {
            p.target = to;
            p.retargets += 1;
        });
        self.plan();
        self.update_progress();
        if let Origin::Operator(reply) = opening.origin {
            let _ = reply.send(Ok(()));
        }
        Ok(())
    }

    /// Points every host that may forward (the old target and the older
    /// forwarders) at the new target. Done here, not earlier: from now on
    /// every batch names the new target, and a forwarder refuses batches
    /// for any other.
    /// A `lost` host is released at once (it was the target and failed);
    /// older forwarders still forward.
    async fn point_forwarders(&mut self, old: HostId, link: &Link, forward: bool, lost: Option<HostId>) {
        let mut candidates = vec![old];
        candidates.extend(std::mem::take(&mut self.hosts.forwarders));
        for h in candidates {
            if lost == Some(h) {
                self.release(h, "it was lost");
                continue;
            }
            let pointed = forward && self.forward_to(h, link).await;
            if pointed {
                self.hosts.forwarders.push(h);
            } else {
                self.release(h, if forward { "it cannot forward" } else { "--no-forward" });
            }
        }
    }

    /// A data-plane token for forwarder `h` at `link`'s host, and the RDMA
    /// keys it writes with: its own, bound to its name (protocol 4), or the
    /// session's (older hosts).
    async fn sender_token(&self, h: HostId, link: &Link) -> Result<(crate::protocol::Token, RdmaKeys), LinkError> {
        if link.version < crate::protocol::DESCRIPTIONS {
            return Ok((link.token, link.rdma_offer.clone()));
        }
        let rdma = link.rdma_offer.is_some() && self.job.opts.transport != crate::protocol::TransportKind::Tcp;
        let add = Message::AddSender { sender: h, host: self.hosts.names[h as usize].clone(), rdma };
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
                let host = &self.hosts.names[h as usize];
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
            zero_frames: link.version >= crate::protocol::ZERO_FRAMES,
        };
        match self.hosts.links[&h].call(m, MessageKind::ForwardReady).await {
            Ok(Message::ForwardReady { transport, rdma }) => {
                let from = self.hosts.names[h as usize].clone();
                self.report.senders.push(SenderTransport {
                    from,
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
                let host = &self.hosts.names[h as usize];
                tracing::warn!(%host, "cannot forward to {}: {}", link.host, crate::error_chain(&e));
                false
            }
        }
    }

    /// A forwarder is no longer needed (or no longer usable): its session is
    /// discarded and nothing counts on its pages any more.
    pub(super) fn release(&mut self, f: HostId, why: &str) {
        self.hosts.forwarders.retain(|&x| x != f);
        self.sched.drop_pool(f);
        self.ledger.invalidate(0..self.ledger.pages(), f);
        if let Some(l) = self.hosts.links.get(&f).cloned() {
            tracing::info!(host = %l.host, "releasing old destination: {why}");
            let reason = format!("no longer needed: {why}");
            tokio::spawn(async move { l.abort(&reason).await });
        }
        // The target revokes what it gave the released host (its token,
        // its streams): a released host can no longer write there.
        if f != self.hosts.target {
            if let Some(target) = self.hosts.links.get(&self.hosts.target).cloned() {
                tokio::spawn(async move { drop(target.call(Message::Fence { sender: f }, MessageKind::Ok).await) });
            }
        }
    }

    pub(super) fn forwarder_lost(&mut self, f: HostId, why: &str) {
        if !self.hosts.forwarders.contains(&f) {
            return;
        }
        tracing::warn!(host = %self.hosts.names[f as usize], "forwarder lost ({why}); the source sends its pages");
        self.report.forwarders_lost.push(self.hosts.names[f as usize].clone());
        self.release(f, "it failed");
        self.plan();
    }

    /// A forward to the target failed: its frames may still be in flight.
    /// Its pages stay locked, the forwarder is dropped, and the target
    /// fences it before anyone may rewrite those pages. Returns false if
    /// this failure needs no fence (the batch is an ordinary failure).
    pub(super) fn fence_failed_forward(&mut self, b: Batch, why: &str) -> Result<(), Batch> {
        // Forwards to a lost target only fail: it is released at the next
        // install and never written to again, so the forwarder goes on.
        let dead = self.fb.dead.as_ref().is_some_and(|(h, _)| *h == b.to);
        if b.from == super::schedule::SOURCE || b.to != self.hosts.target || self.rt.fenced.contains(&b.from) || dead {
            return Err(b);
        }
        let f = b.from;
        let first = !self.rt.fencing.contains_key(&f);
        self.rt.fencing.entry(f).or_insert_with(|| (b.to, vec![])).1.push(b);
        if first {
            self.forwarder_lost(f, why);
            let (target, tx) = (self.target_link(), self.rt.fenced_tx.clone());
            tokio::spawn(async move {
                let r = target.call(Message::Fence { sender: f }, MessageKind::Ok).await.map(|_| ());
                let _ = tx.send((f, r));
            });
        }
        Ok(())
    }

    /// The target confirmed (or failed) a fence: the forwarder's pages unlock.
    pub(super) fn on_fenced(&mut self, (host, r): Fenced) -> Result<(), EngineError> {
        let (at, batches) = self.rt.fencing.remove(&host).unwrap_or_default();
        // A fence that failed at a host that is no longer the target does
        // not matter: nothing writes there any more.
        if let Err(e) = r {
            if at == self.hosts.target && self.fb.dead.is_none() {
                return Err(self.lost(at, e));
            }
        }
        for b in batches {
            self.abandon(&b);
        }
        self.rt.fenced.insert(host);
        self.plan();
        Ok(())
    }
}
