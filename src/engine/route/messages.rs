//! What goes into the route (events, as the event loop saw them) and what
//! comes out (commands for the event loop to carry out).

use super::ReplyId;
use crate::engine::fallback::Why;
use crate::engine::phase::Phase;
use crate::ledger::HostId;
use std::net::SocketAddr;

/// What happened, as the event loop saw it.
#[derive(Clone, Debug)]
pub(in crate::engine) enum Event {
    /// An operator asked to move the migration to `to`.
    RetargetAsked {
        /// Where the answer goes.
        reply: ReplyId,
        /// The new destination.
        to: String,
        /// Its control address.
        addr: SocketAddr,
        /// Whether old destinations forward what they hold.
        forward: bool,
    },
    /// The forwarders asked at an install are pointed: those that agreed,
    /// in the order asked; `at_old` bytes were current at the old target.
    Pointed {
        /// The hosts that forward from now on.
        ready: Vec<HostId>,
        /// Bytes current at the old target at the install (for the report).
        at_old: u64,
    },
    /// The target failed, vanished, or a batch to it failed.
    TargetLost {
        /// The host (ignored unless it is the target).
        host: HostId,
        /// What failed.
        why: String,
    },
    /// The target asked the source to leave (drained, or out of room).
    LeaveAsked {
        /// Its reason.
        why: String,
    },
    /// The target fell behind.
    Slow {
        /// By how much.
        why: String,
    },
    /// A forwarder's batch `from` → `to` failed.
    ForwardFailed {
        /// The forwarder.
        from: HostId,
        /// The host it was sent to.
        to: HostId,
        /// What failed.
        why: String,
    },
    /// A forwarder cannot be handed work any more.
    ForwarderLost {
        /// The forwarder.
        host: HostId,
        /// Why.
        why: String,
    },
    /// A forwarder holds nothing the target lacks.
    ForwarderIdle {
        /// The forwarder.
        host: HostId,
    },
    /// The target confirmed (or failed) a fence of `host`.
    Fenced {
        /// The fenced forwarder.
        host: HostId,
        /// The target's answer.
        result: Result<(), String>,
    },
    /// The migration moved to a later phase.
    Advanced(Phase),
    /// The migration ended (completed, or not).
    Ended {
        /// Whether it completed.
        completed: bool,
    },
}

/// What the event loop must do.
#[derive(Clone, Debug, PartialEq)]
pub(in crate::engine) enum Command {
    /// Answer an operator's retarget.
    Reply {
        /// The request.
        reply: ReplyId,
        /// Its outcome.
        result: Result<(), String>,
    },
    /// Open a session on `to`, as host `host` (on a task of its own); the
    /// outcome comes back through [`Route::opened`].
    Open {
        /// Its id in the migration.
        host: HostId,
        /// Its name.
        to: String,
        /// Its control address.
        addr: SocketAddr,
    },
    /// A session that opened is not wanted: abort it.
    Discard {
        /// Why (the host is told).
        why: &'static str,
    },
    /// Any session still opening will never be installed: abort it once open.
    DropOpening,
    /// The new target is installed: record it (report, progress), skip the
    /// holes, plan the work again.
    Installed(Installed),
    /// Discard `host`'s session and count on none of its pages any more;
    /// the target at `fence_at` revokes what it gave it.
    Release {
        /// The host.
        host: HostId,
        /// Why (the host is told).
        why: String,
        /// The target to fence it at, if it is not the target itself.
        fence_at: Option<HostId>,
    },
    /// Ask target `at` to fence forwarder `host`, and report back with
    /// [`Event::Fenced`].
    Fence {
        /// The forwarder.
        host: HostId,
        /// The target.
        at: HostId,
    },
    /// Keep the failed batch's pages locked until its sender `host` is fenced.
    Hold {
        /// The forwarder.
        host: HostId,
    },
    /// The fence of `host` is confirmed: its held batches unlock.
    Unlock {
        /// The forwarder.
        host: HostId,
    },
    /// Plan the work again (the senders changed).
    Replan,
    /// Record and announce a decision about `target`.
    Decide {
        /// The target it concerns.
        target: String,
        /// Why.
        why: Why,
        /// What was done.
        action: String,
    },
    /// Announce an automatic retarget to `to` (and its failure).
    Announce {
        /// The new destination.
        to: String,
        /// Why.
        why: Why,
        /// Why it failed, if it did.
        error: Option<String>,
    },
    /// Record that a forwarder was lost.
    ForwarderLost {
        /// The forwarder.
        host: HostId,
    },
    /// The migration fails: the target `host` is lost and nothing replaces it.
    Fail {
        /// The lost target.
        host: HostId,
        /// What failed.
        why: String,
    },
}

/// An installed retarget, as the report records it.
#[derive(Clone, Debug, PartialEq)]
pub(in crate::engine) struct Installed {
    /// The old target.
    pub old: HostId,
    /// The new one.
    pub new: HostId,
    /// Whether the old target forwards.
    pub forwarding: bool,
    /// Bytes current at the old target.
    pub at_old: u64,
    /// Why it was retargeted.
    pub reason: String,
    /// Why, by kind.
    pub cause: crate::engine::Cause,
}

/// What an install asks of the event loop: a dirty sync (done before the
/// target changes in its books), then pointing each of `point` at the new
/// target, in order; the outcome comes back as [`Event::Pointed`].
#[derive(Clone, Debug, PartialEq)]
pub(in crate::engine) struct Install {
    /// The old target.
    pub old: HostId,
    /// The new one.
    pub new: HostId,
    /// The hosts asked to forward.
    pub point: Vec<HostId>,
}
