//! The route's edge cases, each as its sequence of events, and its
//! invariants over random sequences.

use super::*;
use proptest::prelude::*;

const A: HostId = 1;
const B: HostId = 2;
const C: HostId = 3;

fn addr() -> SocketAddr {
    "127.0.0.1:1".parse().unwrap()
}

/// Source `src`, target `a`, and these fallback hosts.
fn route(fallbacks: &[&str]) -> Route {
    let fb = Fallback::new(fallbacks.iter().map(|h| (h.to_string(), addr())).collect());
    Route::new("src".into(), "a".into(), fb)
}

fn ask(r: &mut Route, reply: ReplyId, to: &str, forward: bool) -> Vec<Command> {
    r.handle(Event::RetargetAsked { reply, to: to.into(), addr: addr(), forward })
}

fn lost(r: &mut Route, host: HostId) -> Vec<Command> {
    r.handle(Event::TargetLost { host, why: "gone".into() })
}

fn opens(c: &[Command]) -> Vec<&str> {
    c.iter().filter_map(|c| if let Command::Open { to, .. } = c { Some(to.as_str()) } else { None }).collect()
}

fn fails(c: &[Command]) -> bool {
    c.iter().any(|c| matches!(c, Command::Fail { .. }))
}

fn released(c: &[Command]) -> Vec<HostId> {
    c.iter().filter_map(|c| if let Command::Release { host, .. } = c { Some(*host) } else { None }).collect()
}

fn replies(c: &[Command]) -> Vec<(ReplyId, bool)> {
    c.iter()
        .filter_map(|c| if let Command::Reply { reply, result } = c { Some((*reply, result.is_ok())) } else { None })
        .collect()
}

fn actions(c: &[Command]) -> Vec<&str> {
    c.iter().filter_map(|c| if let Command::Decide { action, .. } = c { Some(action.as_str()) } else { None }).collect()
}

/// Opens and installs `to` (asked by an operator, forwarding), every
/// forwarder agreeing; returns the install's commands.
fn retarget(r: &mut Route, reply: ReplyId, to: &str) -> Vec<Command> {
    assert_eq!(opens(&ask(r, reply, to, true)), [to]);
    let (mut out, install) = r.opened(Ok(()));
    let i = install.expect("installed");
    out.extend(r.handle(Event::Pointed { ready: i.point, at_old: 0 }));
    out
}

#[test]
fn a_retarget_installs_and_the_old_target_forwards() {
    let mut r = route(&[]);
    let out = retarget(&mut r, 7, "b");
    assert_eq!(r.target(), B);
    assert_eq!(r.forwarders(), [A]);
    assert!(out.contains(&Command::Installed(Installed {
        old: A,
        new: B,
        forwarding: true,
        at_old: 0,
        reason: "operator".into(),
        cause: crate::engine::Cause::Operator,
    })));
    assert_eq!(replies(&out), [(7, true)]);
}

#[test]
fn no_forward_releases_every_old_destination() {
    let mut r = route(&[]);
    retarget(&mut r, 0, "b");
    ask(&mut r, 1, "c", false);
    let (out, install) = r.opened(Ok(()));
    assert_eq!(install.unwrap().point, Vec::<HostId>::new());
    assert_eq!(released(&out), [B, A]);
    assert!(!r.active(A) && !r.active(B) && r.active(C));
}

#[test]
fn a_host_that_cannot_forward_is_released() {
    let mut r = route(&[]);
    ask(&mut r, 0, "b", true);
    let (_, install) = r.opened(Ok(()));
    assert_eq!(install.unwrap().point, [A]);
    let out = r.handle(Event::Pointed { ready: vec![], at_old: 0 });
    assert_eq!(released(&out), [A]);
    assert!(out.iter().any(|c| matches!(c, Command::Installed(Installed { forwarding: false, .. }))));
}

#[test]
fn retargets_refused_when_they_cannot_be() {
    let mut r = route(&[]);
    assert_eq!(replies(&ask(&mut r, 0, "a", true)), [(0, false)], "already takes part");
    ask(&mut r, 1, "b", true);
    assert_eq!(replies(&ask(&mut r, 2, "c", true)), [(2, false)], "another is opening");
    let mut r = route(&[]);
    r.handle(Event::Advanced(Phase::Paused));
    let out = ask(&mut r, 3, "b", true);
    assert_eq!(out, [Command::Reply { reply: 3, result: Err("too late: the switchover has started".into()) }]);
}

/// 1bc426a: automatic retargets never in the pause; a loss there fails.
#[test]
fn a_target_lost_in_the_pause_fails_without_a_retarget() {
    let mut r = route(&["b"]);
    r.handle(Event::Advanced(Phase::Paused));
    let out = lost(&mut r, A);
    assert!(fails(&out) && opens(&out).is_empty(), "{out:?}");
}

/// 1bc426a: the host limit binds automatic retargets too.
#[test]
fn no_automatic_retarget_past_the_host_limit() {
    let mut r = route(&["z"]);
    for (i, h) in ["b", "c", "d", "e", "f", "g"].into_iter().enumerate() {
        retarget(&mut r, i as ReplyId, h);
    }
    assert_eq!(r.names().len(), MAX_HOSTS);
    assert_eq!(replies(&ask(&mut r, 9, "y", true)), [(9, false)]);
    let t = r.target();
    let out = lost(&mut r, t);
    assert_eq!(actions(&out), [format!("none: at most {MAX_HOSTS} hosts take part in one migration")]);
    assert!(fails(&out));
}

/// 1bc426a: a lost target is replaced by a retarget already opening, which
/// releases it at the install instead of pointing it.
#[test]
fn a_lost_target_is_replaced_by_the_retarget_opening() {
    let mut r = route(&[]);
    ask(&mut r, 0, "b", true);
    let out = lost(&mut r, A);
    assert!(out.is_empty() && r.target_dead(), "{out:?}");
    let (out, install) = r.opened(Ok(()));
    assert_eq!(released(&out), [A]);
    assert_eq!(install.unwrap().point, Vec::<HostId>::new());
    assert!(!r.target_dead() && r.target() == B);
}

/// ... and if that retarget fails, the fallback hosts take over, or the
/// migration fails.
#[test]
fn a_lost_target_whose_replacement_fails() {
    let mut r = route(&["c"]);
    ask(&mut r, 0, "b", true);
    lost(&mut r, A);
    let (out, _) = r.opened(Err("refused".into()));
    assert_eq!(replies(&out), [(0, false)]);
    assert_eq!(opens(&out), ["c"]);
    let (out, _) = r.opened(Err("refused too".into()));
    assert!(fails(&out), "no fallback left: {out:?}");
}

/// 1bc426a: forwards to a lost target fail without dropping their forwarder.
#[test]
fn forwards_to_a_lost_target_only_fail() {
    let mut r = route(&["c"]);
    retarget(&mut r, 0, "b");
    lost(&mut r, B);
    let out = r.handle(Event::ForwardFailed { from: A, to: B, why: "closed".into() });
    assert!(out.is_empty(), "{out:?}");
    assert_eq!(r.forwarders(), [A]);
}

/// 1bc426a: a leave asked while a retarget opens is acted on after it.
#[test]
fn a_leave_waits_for_the_retarget_opening() {
    let mut r = route(&["c"]);
    ask(&mut r, 0, "b", true);
    assert!(r.handle(Event::LeaveAsked { why: "drained".into() }).is_empty());
    let (out, _) = r.opened(Err("refused".into()));
    assert_eq!(opens(&out), ["c"], "{out:?}");
    // Installed instead: the retarget answered the leave.
    let mut r = route(&["c"]);
    ask(&mut r, 0, "b", true);
    r.handle(Event::LeaveAsked { why: "drained".into() });
    let (out, _) = r.opened(Ok(()));
    assert!(opens(&out).is_empty() && !r.leave_pending);
}

/// A leave in the pause is answered, not acted on.
#[test]
fn a_leave_in_the_pause_is_recorded_only() {
    let mut r = route(&["c"]);
    r.handle(Event::Advanced(Phase::Paused));
    let out = r.handle(Event::LeaveAsked { why: "drained".into() });
    assert_eq!(actions(&out), ["none: the VM is paused for the switchover"]);
}

/// 1bc426a: sessions opened too late are aborted, and their operator told.
#[test]
fn a_retarget_opening_at_the_pause_is_given_up() {
    let mut r = route(&[]);
    ask(&mut r, 4, "b", true);
    let out = r.handle(Event::Advanced(Phase::Paused));
    assert_eq!(replies(&out), [(4, false)]);
    let (out, install) = r.opened(Ok(()));
    assert!(install.is_none());
    assert!(matches!(out[..], [Command::Discard { .. }]), "{out:?}");
    assert_eq!(r.target(), A);
}

/// A failed forward to the target is held until its sender is fenced; later
/// failures of it are held without a second fence; once fenced, they are
/// ordinary failures.
#[test]
fn a_failed_forward_is_fenced_once() {
    let mut r = route(&[]);
    retarget(&mut r, 0, "b");
    let out = r.handle(Event::ForwardFailed { from: A, to: B, why: "reset".into() });
    assert!(out.contains(&Command::Hold { host: A }) && out.contains(&Command::Fence { host: A, at: B }));
    assert_eq!(released(&out), [A]);
    assert_eq!(r.handle(Event::ForwardFailed { from: A, to: B, why: "reset".into() }), [Command::Hold { host: A }]);
    assert_eq!(r.fences_pending(), 1);
    let out = r.handle(Event::Fenced { host: A, result: Ok(()) });
    assert_eq!(out, [Command::Unlock { host: A }, Command::Replan]);
    assert!(r.handle(Event::ForwardFailed { from: A, to: B, why: "late".into() }).is_empty());
}

/// A fence the target fails loses the target; one an old target fails does not matter.
#[test]
fn a_failed_fence() {
    let mut r = route(&[]);
    retarget(&mut r, 0, "b");
    r.handle(Event::ForwardFailed { from: A, to: B, why: "reset".into() });
    assert!(fails(&r.handle(Event::Fenced { host: A, result: Err("timeout".into()) })));

    let mut r = route(&[]);
    retarget(&mut r, 0, "b");
    r.handle(Event::ForwardFailed { from: A, to: B, why: "reset".into() });
    retarget(&mut r, 1, "c");
    let out = r.handle(Event::Fenced { host: A, result: Err("gone".into()) });
    assert_eq!(out, [Command::Unlock { host: A }, Command::Replan]);
}

/// A fence the target fails, with a fallback host left: the target is
/// lost and replaced, and the held pages unlock (nothing writes to the lost
/// target any more: it is released at the install).
#[test]
fn a_failed_fence_with_a_fallback_left() {
    let mut r = route(&["f"]);
    retarget(&mut r, 0, "b");
    r.handle(Event::ForwardFailed { from: A, to: B, why: "reset".into() });
    let out = r.handle(Event::Fenced { host: A, result: Err("timeout".into()) });
    assert_eq!(opens(&out), ["f"]);
    assert!(out.contains(&Command::Unlock { host: A }) && !fails(&out), "{out:?}");
    assert!(r.target_dead() && r.fences_pending() == 0);
}

/// A budget forces the switchover while a lost target's replacement is
/// still opening: nothing can replace it any more, so the migration fails
/// (rather than waiting in the pause for the switchover's deadline).
#[test]
fn a_pause_with_the_target_lost_fails() {
    let mut r = route(&["f"]);
    lost(&mut r, A);
    assert!(r.opening() && r.target_dead());
    let out = r.handle(Event::Advanced(Phase::Paused));
    assert!(fails(&out) && !r.opening() && !r.target_dead(), "{out:?}");
}

/// Automatic retargets go down the fallback list; a drained or slow target
/// with none left stays the target, a lost one fails.
#[test]
fn automatic_retargets_down_the_list() {
    let mut r = route(&["b", "c"]);
    let out = r.handle(Event::Slow { why: "1 MB/s".into() });
    assert_eq!(opens(&out), ["b"]);
    let (out, _) = r.opened(Err("refused".into()));
    assert_eq!(opens(&out), ["c"]);
    let (out, _) = r.opened(Err("refused".into()));
    assert!(!fails(&out) && r.target() == A && !r.opening());
    assert_eq!(actions(&out).last().unwrap(), &"none: no fallback host left; staying with a");

    let mut r = route(&["b"]);
    lost(&mut r, A);
    let (out, _) = r.opened(Err("refused".into()));
    assert!(fails(&out));
}

#[test]
fn the_end_answers_and_releases() {
    let mut r = route(&[]);
    retarget(&mut r, 0, "b");
    ask(&mut r, 1, "c", true);
    let out = r.handle(Event::Ended { completed: true });
    assert_eq!(replies(&out), [(1, false)]);
    assert!(out.contains(&Command::DropOpening));
    assert_eq!(released(&out), [A]);
    assert!(r.handle(Event::Ended { completed: true }).is_empty());
    // A session given up at the pause may still be opening at the end.
    let mut r = route(&[]);
    ask(&mut r, 0, "b", true);
    r.handle(Event::Advanced(Phase::Paused));
    assert_eq!(r.handle(Event::Ended { completed: true }), [Command::DropOpening]);
}

/// What the random sequences are made of: the world's side of each event.
#[derive(Clone, Debug)]
enum Act {
    Ask(u8, bool),
    Opened(bool),
    Lost,
    LostOld(u8),
    Leave,
    Slow,
    ForwardFails(u8, bool),
    ForwarderLost(u8),
    Idle(u8),
    Fenced(bool),
    Advance(u8),
}

fn act() -> impl Strategy<Value = Act> {
    // The pause ends most of the story: rarely, so that sequences are long.
    prop_oneof![
        4 => (0u8..12, any::<bool>()).prop_map(|(h, f)| Act::Ask(h, f)),
        4 => any::<bool>().prop_map(Act::Opened),
        2 => Just(Act::Lost),
        1 => (0u8..8).prop_map(Act::LostOld),
        2 => Just(Act::Leave),
        1 => Just(Act::Slow),
        4 => (0u8..8, any::<bool>()).prop_map(|(h, t)| Act::ForwardFails(h, t)),
        1 => (0u8..8).prop_map(Act::ForwarderLost),
        1 => (0u8..8).prop_map(Act::Idle),
        3 => any::<bool>().prop_map(Act::Fenced),
        1 => (0u8..3).prop_map(Act::Advance),
    ]
}

/// The event loop's side: what it was told to do, checked as it goes.
#[derive(Default)]
struct World {
    asked: BTreeSet<ReplyId>,
    answered: BTreeSet<ReplyId>,
    /// Fences asked and not answered yet.
    fences: BTreeSet<HostId>,
    /// Forwarders with batches held for their fence.
    held: BTreeSet<HostId>,
    failed: bool,
    next_reply: ReplyId,
}

impl World {
    fn obey(&mut self, r: &Route, cmds: &[Command]) {
        assert!(!self.failed, "commands after a failure: {cmds:?}");
        if let Some(i) = cmds.iter().position(|c| matches!(c, Command::Fail { .. })) {
            assert_eq!(i + 1, cmds.len(), "commands after a failure in one list: {cmds:?}");
        }
        for c in cmds {
            match c {
                Command::Fence { host, at } => {
                    assert_eq!(*at, r.target());
                    assert!(self.fences.insert(*host), "fenced twice at once: {host}");
                }
                Command::Hold { host } => {
                    self.held.insert(*host);
                }
                Command::Unlock { host } => assert!(!self.fences.contains(host), "unlocked before its fence"),
                Command::Reply { reply, .. } => {
                    assert!(self.asked.contains(reply), "a reply to nothing: {reply}");
                    assert!(self.answered.insert(*reply), "answered twice: {reply}");
                }
                Command::Open { host, .. } => {
                    assert!(!r.phase().paused(), "a retarget opened in the pause");
                    assert_eq!(*host as usize, r.names().len());
                }
                Command::Release { host, fence_at, .. } => {
                    assert_ne!(*host, r.target(), "the target released");
                    assert!(fence_at.is_none_or(|t| t == r.target()));
                }
                Command::Fail { .. } => self.failed = true,
                _ => {}
            }
        }
        for c in cmds {
            if let Command::Hold { host } = c {
                assert!(self.fences.contains(host), "held without a fence under way: {cmds:?}");
            }
            if let Command::Unlock { host } = c {
                self.held.remove(host);
            }
        }
        check(r);
        assert_eq!(self.fences.len(), r.fences_pending());
        // A lost target is being replaced, or the migration fails.
        assert!(r.dead.is_none() || r.opening() || r.installing.is_some() || self.failed, "{r:?}");
    }
}

/// The invariants the module's doc promises.
fn check(r: &Route) {
    assert!(r.active(r.target()), "the target is released");
    assert!(!r.forwarders().contains(&r.target()), "the target forwards");
    let mut seen = BTreeSet::new();
    for &f in r.forwarders() {
        assert!(r.active(f) && seen.insert(f), "forwarders: {:?}", r.forwarders());
    }
    let names: BTreeSet<_> = r.names().iter().collect();
    assert_eq!(names.len(), r.names().len(), "a name reused");
    assert!(r.names().len() <= MAX_HOSTS);
    assert!(r.opening.is_none() || !r.phase().paused(), "opening in the pause");
}

fn play(acts: Vec<Act>, fallbacks: &[&str]) {
    let mut r = route(fallbacks);
    let mut w = World::default();
    let host = |r: &Route, i: u8| (i as usize % r.names().len()) as HostId;
    for a in acts {
        if w.failed {
            break;
        }
        let phase = r.phase();
        let cmds = match a {
            Act::Ask(h, forward) => {
                let reply = w.next_reply;
                w.next_reply += 1;
                w.asked.insert(reply);
                ask(&mut r, reply, &format!("h{h}"), forward)
            }
            Act::Opened(ok) => {
                let (mut cmds, install) = r.opened(if ok { Ok(()) } else { Err("refused".into()) });
                if let Some(i) = install {
                    assert!(!phase.paused(), "installed in the pause");
                    assert!(i.point.iter().all(|&h| r.active(h) && h != r.target()), "{i:?}");
                    w.obey(&r, &cmds);
                    // Every other host agrees to forward.
                    let ready = i.point.iter().copied().enumerate().filter(|(n, _)| n % 2 == 0).map(|(_, h)| h);
                    cmds = r.handle(Event::Pointed { ready: ready.collect(), at_old: 0 });
                }
                cmds
            }
            Act::Lost => {
                let t = r.target();
                lost(&mut r, t)
            }
            Act::LostOld(i) => {
                let h = host(&r, i);
                lost(&mut r, h)
            }
            Act::Leave => r.handle(Event::LeaveAsked { why: "drained".into() }),
            Act::Slow => r.handle(Event::Slow { why: "slow".into() }),
            Act::ForwardFails(i, to_target) => {
                let (from, to) = (host(&r, i), if to_target { r.target() } else { host(&r, i + 1) });
                r.handle(Event::ForwardFailed { from, to, why: "reset".into() })
            }
            Act::ForwarderLost(i) => {
                let h = host(&r, i);
                r.handle(Event::ForwarderLost { host: h, why: "closed".into() })
            }
            Act::Idle(i) => {
                let h = host(&r, i);
                r.handle(Event::ForwarderIdle { host: h })
            }
            Act::Fenced(ok) => match w.fences.pop_first() {
                Some(host) => {
                    let cmds = r.handle(Event::Fenced { host, result: if ok { Ok(()) } else { Err("no".into()) } });
                    // Its held batches unlock, or the migration fails.
                    let unlocked = cmds.contains(&Command::Unlock { host }) || fails(&cmds);
                    assert!(unlocked, "a fence answered without unlocking: {cmds:?}");
                    cmds
                }
                None => vec![],
            },
            // The event loop only moves forward.
            Act::Advance(p) => match [Phase::Paused, Phase::Committing, Phase::ResumeSent][p as usize] {
                p if p > phase => r.handle(Event::Advanced(p)),
                _ => vec![],
            },
        };
        w.obey(&r, &cmds);
    }
    let end = r.handle(Event::Ended { completed: !w.failed });
    assert!(end.contains(&Command::DropOpening), "a session still opening is never discarded: {end:?}");
    w.failed = false;
    w.obey(&r, &end);
    assert_eq!(w.asked, w.answered, "every operator's request answered exactly once");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]
    #[test]
    fn invariants_hold_over_random_events(acts in proptest::collection::vec(act(), 0..60)) {
        play(acts, &["f1", "f2", "f3"]);
    }

    #[test]
    fn invariants_hold_without_fallbacks(acts in proptest::collection::vec(act(), 0..60)) {
        play(acts, &[]);
    }
}
