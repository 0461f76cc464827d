//! A migration's course as one state machine with no I/O: its phase, the
//! hosts taking part (the target, the forwarders, the released), a retarget
//! being opened or installed, a lost target waiting for its replacement,
//! requests to leave, fences, and the fallback hosts left.
//!
//! Events go in ([`Route::handle`], [`Route::opened`]); commands come out,
//! which the engine's event loop carries out (opening sessions, releasing
//! and fencing hosts, answering operators), as quinn-proto's connection
//! does. Whatever order events arrive in, it keeps these invariants (tested
//! over random sequences in `tests`):
//! - one target at a time, never a released host, never a forwarder;
//! - nothing is pointed at, or sends to, a released host; names are never reused;
//! - no retarget opens or installs once the VM is paused;
//! - every operator's request is answered exactly once.

use super::fallback::{Fallback, Why};
use super::phase::Phase;
use super::schedule::SOURCE;
use crate::ledger::{HostId, MAX_HOSTS};
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

mod messages;
#[cfg(test)]
mod tests;

pub(super) use messages::{Command, Event, Install, Installed};

/// Names the operator's request a [`Command::Reply`] answers.
pub(super) type ReplyId = u64;

/// Who asked for a retarget.
#[derive(Clone, Debug, PartialEq)]
pub(super) enum Origin {
    /// An operator (`dcmigrate retarget`), waiting for the outcome.
    Operator(ReplyId),
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

    fn cause(&self) -> super::Cause {
        match self {
            Origin::Operator(_) => super::Cause::Operator,
            Origin::Auto(why) => why.cause(),
        }
    }
}

/// A retarget whose new destination is being opened.
#[derive(Debug)]
struct Opening {
    to: String,
    forward: bool,
    origin: Origin,
}

/// An install between [`Route::opened`] and [`Event::Pointed`].
#[derive(Debug)]
struct Installing {
    old: HostId,
    asked: Vec<HostId>,
    origin: Origin,
}

/// The migration's course (see the module's doc).
#[derive(Debug)]
pub(super) struct Route {
    phase: Phase,
    /// Names by id; id 0 is the source. Only grows.
    names: Vec<String>,
    target: HostId,
    /// Newest first.
    forwarders: Vec<HostId>,
    released: BTreeSet<HostId>,
    opening: Option<Opening>,
    installing: Option<Installing>,
    /// The target was lost: nothing is sent until a replacement is
    /// installed. The lost host and why.
    dead: Option<(HostId, String)>,
    /// Targets whose request to leave was handled, and their reasons.
    left: BTreeMap<HostId, String>,
    /// The target asked to leave while a retarget was opening: acted on
    /// once that one is installed or failed.
    leave_pending: bool,
    fallbacks: Fallback,
    /// Forwarders being fenced, and the target that fences them.
    fencing: BTreeMap<HostId, HostId>,
    fenced: BTreeSet<HostId>,
    ended: bool,
}

impl Route {
    /// A migration from `source` to `target` (set up), with these fallbacks.
    pub(super) fn new(source: String, target: String, fallbacks: Fallback) -> Self {
        Self {
            phase: Phase::Precopy,
            names: vec![source, target],
            target: 1,
            forwarders: vec![],
            released: BTreeSet::new(),
            opening: None,
            installing: None,
            dead: None,
            left: BTreeMap::new(),
            leave_pending: false,
            fallbacks,
            fencing: BTreeMap::new(),
            fenced: BTreeSet::new(),
            ended: false,
        }
    }

    /// The phase.
    pub(super) fn phase(&self) -> Phase {
        self.phase
    }

    /// The current target.
    pub(super) fn target(&self) -> HostId {
        self.target
    }

    /// A host's name.
    pub(super) fn name(&self, h: HostId) -> &str {
        &self.names[h as usize]
    }

    /// Every host that took part, by id.
    pub(super) fn names(&self) -> &[String] {
        &self.names
    }

    /// The hosts forwarding to the target, newest first.
    pub(super) fn forwarders(&self) -> &[HostId] {
        &self.forwarders
    }

    /// The target was lost and nothing is sent until it is replaced.
    pub(super) fn target_dead(&self) -> bool {
        self.dead.is_some()
    }

    /// The target's request to leave was handled.
    pub(super) fn leave_handled(&self) -> bool {
        self.left.contains_key(&self.target)
    }

    /// A retarget is being opened.
    pub(super) fn opening(&self) -> bool {
        self.opening.is_some()
    }

    /// Any fallback host is left.
    pub(super) fn fallbacks_left(&self) -> bool {
        self.fallbacks.any_left()
    }

    /// Forwarders being fenced.
    pub(super) fn fences_pending(&self) -> usize {
        self.fencing.len()
    }

    /// Whether `host` may be sent to, or send: it takes part and was not released.
    pub(super) fn active(&self, host: HostId) -> bool {
        (host as usize) < self.names.len() && !self.released.contains(&host)
    }

    /// Takes one event; returns what to do, in order.
    pub(super) fn handle(&mut self, e: Event) -> Vec<Command> {
        let mut out = vec![];
        match e {
            Event::RetargetAsked { reply, to, addr, forward } => self.asked(&mut out, reply, to, addr, forward),
            Event::Pointed { ready, at_old } => self.pointed(&mut out, ready, at_old),
            Event::TargetLost { host, why } => {
                self.target_lost(&mut out, host, why);
            }
            Event::LeaveAsked { why } => {
                if !self.left.contains_key(&self.target) {
                    self.left.insert(self.target, why);
                    self.leave_now(&mut out);
                }
            }
            Event::Slow { why } => {
                if !self.phase.paused() && self.opening.is_none() && self.dead.is_none() {
                    self.auto_retarget(&mut out, Why::Slow(why));
                }
            }
            Event::ForwardFailed { from, to, why } => self.forward_failed(&mut out, from, to, &why),
            Event::ForwarderLost { host, why } => self.forwarder_lost(&mut out, host, &why),
            Event::ForwarderIdle { host } => {
                if self.forwarders.contains(&host) {
                    self.release(&mut out, host, "it holds nothing the new destination lacks");
                }
            }
            Event::Fenced { host, result } => self.fenced(&mut out, host, result),
            Event::Advanced(p) => self.advance(&mut out, p),
            Event::Ended { completed } => self.end(&mut out, completed),
        }
        out
    }

    fn asked(&mut self, out: &mut Vec<Command>, reply: ReplyId, to: String, addr: SocketAddr, forward: bool) {
        let refused = if self.ended || self.phase.paused() {
            Some("too late: the switchover has started".to_owned())
        } else if self.opening.is_some() || self.installing.is_some() {
            Some("another retarget is being prepared".to_owned())
        } else if self.names.contains(&to) {
            Some(format!("{to} already takes part in this migration"))
        } else if self.names.len() >= MAX_HOSTS {
            Some(format!("at most {MAX_HOSTS} hosts take part in one migration"))
        } else {
            None
        };
        match refused {
            Some(why) => out.push(Command::Reply { reply, result: Err(why) }),
            None => self.open(out, to, addr, forward, Origin::Operator(reply)),
        }
    }

    fn open(&mut self, out: &mut Vec<Command>, to: String, addr: SocketAddr, forward: bool, origin: Origin) {
        out.push(Command::Open { host: self.names.len() as HostId, to: to.clone(), addr });
        self.opening = Some(Opening { to, forward, origin });
    }

    /// The new destination's session opened (or not). An install goes on
    /// in the event loop and ends with [`Event::Pointed`].
    pub(super) fn opened(&mut self, r: Result<(), String>) -> (Vec<Command>, Option<Install>) {
        let mut out = vec![];
        let Some(opening) = self.opening.take() else {
            if r.is_ok() {
                out.push(Command::Discard { why: "the retarget was given up" });
            }
            return (out, None);
        };
        if let Err(why) = r {
            self.retarget_failed(&mut out, opening, why);
            return (out, None);
        }
        // Never paused or ended here: both give the opening up (`advance`, `end`).
        let (old, new) = (self.target, self.names.len() as HostId);
        self.names.push(opening.to);
        self.target = new;
        // A leave asked of the old target is answered by this retarget.
        self.leave_pending = false;
        let lost = self.dead.take().map(|(h, _)| h);
        let mut candidates = vec![old];
        candidates.extend(std::mem::take(&mut self.forwarders));
        let mut point = vec![];
        for h in candidates {
            if lost == Some(h) {
                self.release(&mut out, h, "it was lost");
            } else if !opening.forward {
                self.release(&mut out, h, "--no-forward");
            } else {
                point.push(h);
            }
        }
        self.installing = Some(Installing { old, asked: point.clone(), origin: opening.origin });
        (out, Some(Install { old, new, point }))
    }

    fn pointed(&mut self, out: &mut Vec<Command>, ready: Vec<HostId>, at_old: u64) {
        let Some(i) = self.installing.take() else { return };
        for h in i.asked {
            if ready.contains(&h) && self.active(h) {
                self.forwarders.push(h);
            } else {
                self.release(out, h, "it cannot forward");
            }
        }
        let forwarding = self.forwarders.contains(&i.old);
        let (reason, cause) = (i.origin.reason(), i.origin.cause());
        out.push(Command::Installed(Installed { old: i.old, new: self.target, forwarding, at_old, reason, cause }));
        out.push(Command::Replan);
        if let Origin::Operator(reply) = i.origin {
            out.push(Command::Reply { reply, result: Ok(()) });
        }
    }

    /// A retarget that could not be installed: an operator is told, an
    /// automatic one tries the next fallback host; then a leave that
    /// waited for it is looked at.
    fn retarget_failed(&mut self, out: &mut Vec<Command>, opening: Opening, why: String) {
        let failed = self.not_installed(out, opening, why);
        if self.leave_pending && !failed && self.opening.is_none() {
            self.leave_now(out);
        }
    }

    /// Returns whether the migration fails.
    fn not_installed(&mut self, out: &mut Vec<Command>, opening: Opening, why: String) -> bool {
        match opening.origin {
            Origin::Operator(reply) => {
                out.push(Command::Reply { reply, result: Err(why) });
                // The target was lost meanwhile: the fallback hosts take over.
                let Some((host, lost)) = self.dead.clone() else { return false };
                if !self.phase.paused() && self.auto_retarget(out, Why::Lost(lost.clone())) {
                    return false;
                }
                self.fail(out, host, lost);
                true
            }
            Origin::Auto(auto) if !self.phase.paused() => self.auto_failed(out, auto, &opening.to, why),
            Origin::Auto(_) => false,
        }
    }

    fn fail(&mut self, out: &mut Vec<Command>, host: HostId, why: String) {
        self.dead = None;
        out.push(Command::Fail { host, why });
    }

    /// Returns whether the migration fails.
    fn target_lost(&mut self, out: &mut Vec<Command>, host: HostId, why: String) -> bool {
        if self.dead.is_some() || host != self.target || self.ended {
            return false;
        }
        // In the pause, moving elsewhere would resend the RAM with the guest
        // stopped: the migration fails and the VM resumes here instead.
        if self.phase.paused() || (!self.fallbacks.any_left() && self.opening.is_none()) {
            self.fail(out, host, why);
            return true;
        }
        self.dead = Some((host, why.clone()));
        // A retarget under way replaces the lost target when it is ready.
        if self.opening.is_none() && !self.auto_retarget(out, Why::Lost(why.clone())) {
            self.fail(out, host, why);
            return true;
        }
        false
    }

    /// Acts on the target's request to leave, unless a retarget is being
    /// prepared (then once it is done) or the VM is paused.
    fn leave_now(&mut self, out: &mut Vec<Command>) {
        self.leave_pending = false;
        // Only the target that asked (a retarget may have replaced it since).
        let Some(why) = self.left.get(&self.target).cloned() else { return };
        if self.phase.paused() {
            let target = self.names[self.target as usize].clone();
            let action = "none: the VM is paused for the switchover".into();
            out.push(Command::Decide { target, why: Why::Leave(why), action });
        } else if self.opening.is_some() {
            self.leave_pending = true;
        } else {
            self.auto_retarget(out, Why::Leave(why));
        }
    }

    /// Starts a retarget to the next fallback host; false if none is left.
    fn auto_retarget(&mut self, out: &mut Vec<Command>, why: Why) -> bool {
        let target = self.names[self.target as usize].clone();
        if self.names.len() >= MAX_HOSTS {
            let action = format!("none: at most {MAX_HOSTS} hosts take part in one migration");
            out.push(Command::Decide { target, why, action });
            return false;
        }
        let Some((to, addr)) = self.fallbacks.next(&self.names) else {
            let action = format!("none: no fallback host left; staying with {target}");
            out.push(Command::Decide { target, why, action });
            return false;
        };
        out.push(Command::Decide { target, why: why.clone(), action: format!("retarget to {to}") });
        out.push(Command::Announce { to: to.clone(), why: why.clone(), error: None });
        // A lost target cannot forward; a leaving or slow one forwards what it holds.
        self.open(out, to, addr, true, Origin::Auto(why));
        true
    }

    /// An automatic retarget failed: the next fallback host is tried; with
    /// none left, a lost target fails the migration, a drained or slow one
    /// stays the target. Returns whether the migration fails.
    fn auto_failed(&mut self, out: &mut Vec<Command>, why: Why, to: &str, error: String) -> bool {
        let target = self.names[self.target as usize].clone();
        let action = format!("retarget to {to} failed: {error}");
        out.push(Command::Decide { target, why: why.clone(), action });
        out.push(Command::Announce { to: to.into(), why: why.clone(), error: Some(error) });
        if self.auto_retarget(out, why) {
            return false;
        }
        match self.dead.take() {
            Some((host, why)) => {
                self.fail(out, host, why);
                true
            }
            None => false,
        }
    }

    fn release(&mut self, out: &mut Vec<Command>, host: HostId, why: &str) {
        self.forwarders.retain(|&x| x != host);
        self.released.insert(host);
        let fence_at = (host != self.target).then_some(self.target);
        out.push(Command::Release { host, why: why.into(), fence_at });
    }

    fn forwarder_lost(&mut self, out: &mut Vec<Command>, host: HostId, why: &str) {
        if !self.forwarders.contains(&host) {
            return;
        }
        tracing::warn!(host = %self.names[host as usize], "forwarder lost ({why}); the source sends its pages");
        out.push(Command::ForwarderLost { host });
        self.release(out, host, "it failed");
        out.push(Command::Replan);
    }

    /// A forward to the target failed: its frames may still be in flight.
    /// Its pages stay locked, the forwarder is dropped, and the target
    /// fences it before anyone may rewrite those pages. Any other failed
    /// batch is an ordinary failure (its pages only stay stale).
    fn forward_failed(&mut self, out: &mut Vec<Command>, from: HostId, to: HostId, why: &str) {
        // Forwards to a lost target only fail: it is released at the next
        // install and never written to again, so the forwarder goes on.
        let dead = self.dead.as_ref().is_some_and(|(h, _)| *h == to);
        if from == SOURCE || to != self.target || self.fenced.contains(&from) || dead {
            return;
        }
        out.push(Command::Hold { host: from });
        if self.fencing.contains_key(&from) {
            return;
        }
        self.fencing.insert(from, to);
        self.forwarder_lost(out, from, why);
        out.push(Command::Fence { host: from, at: to });
    }

    /// The target confirmed (or failed) a fence: the forwarder's pages unlock.
    fn fenced(&mut self, out: &mut Vec<Command>, host: HostId, result: Result<(), String>) {
        let Some(at) = self.fencing.remove(&host) else { return };
        // A fence that failed at the target loses it (a fallback host may
        // replace it, and then nothing writes there any more); one that
        // failed at a host that is no longer the target does not matter.
        if let Err(why) = result {
            if at == self.target && self.dead.is_none() && self.target_lost(out, at, why) {
                return;
            }
        }
        self.fenced.insert(host);
        out.push(Command::Unlock { host });
        out.push(Command::Replan);
    }

    fn advance(&mut self, out: &mut Vec<Command>, to: Phase) {
        self.phase.advance(to);
        // No retarget once the VM is paused: one being opened is given up
        // (its session is aborted when it opens), and a leave waiting for it
        // is answered (none: the VM is paused).
        if self.phase.paused() {
            if let Some(o) = self.opening.take() {
                if let Origin::Operator(reply) = o.origin {
                    let result = Err("too late: the switchover has started".into());
                    out.push(Command::Reply { reply, result });
                }
            }
            if self.leave_pending {
                self.leave_now(out);
            }
            // A lost target whose replacement was still opening (a budget
            // forcing the switchover): nothing can replace it any more.
            if let Some((host, why)) = self.dead.take() {
                self.fail(out, host, why);
            }
        }
    }

    fn end(&mut self, out: &mut Vec<Command>, completed: bool) {
        if self.ended {
            return;
        }
        self.ended = true;
        self.dead = None;
        self.leave_pending = false;
        if let Some(Opening { origin: Origin::Operator(reply), .. }) = self.opening.take() {
            out.push(Command::Reply { reply, result: Err("the migration ended".into()) });
        }
        // Always: a session given up at the pause may still be opening.
        out.push(Command::DropOpening);
        if completed {
            for f in self.forwarders.clone() {
                self.release(out, f, "the migration completed");
            }
        }
    }
}
