//! Operating a fleet: evacuating a host through the agent's queue, draining
//! a destination while migrations head there, and automatic retargets to
//! fallback hosts (a destination that dies, refuses, or falls behind).

mod common;

use common::*;
use dcmigrate::agent::evacuate::Stage;
use dcmigrate::engine::{Cause, FailureKind, MigrateOptions, Outcome, Reason, Report};
use dcmigrate::protocol::ErrorCode;
use dcmigrate::testbed::net::Net;
use dcmigrate::testbed::{wait_for, Testbed};
use std::collections::HashSet;

fn target(tb: &Testbed, from: &str, vm: &str) -> Option<String> {
    tb.client(from).status(Some(vm)).ok()?.pop().map(|m| m.progress.target)
}

/// Waits until `frac` of the VM's RAM is current at its destination.
fn wait_fraction(tb: &Testbed, from: &str, vm: &str, frac: f64) {
    let reached = wait_for(120, || {
        let m = tb.client(from).status(Some(vm)).ok()?.pop()?;
        let (at, ram) = (m.progress.at_destination_bytes as f64, m.progress.ram_bytes as f64);
        (ram > 0.0 && at >= frac * ram && !m.done).then_some(())
    });
    assert!(reached.is_some(), "{vm} never had {frac} of its RAM at the destination\n{}", tb.logs());
}

fn report(tb: &Testbed, from: &str, vm: &str) -> Report {
    tb.client(from).status(Some(vm)).unwrap().pop().and_then(|m| m.report).expect("a report")
}

/// The VM runs on `host` alone, paused (`--suspend`), with the source's RAM.
fn landed(tb: &Testbed, vm: &str, host: &str, others: &[&str]) {
    assert!(tb.vm_on("hostA", vm).is_none(), "{vm} still on hostA");
    for o in others {
        assert!(tb.vm_on(o, vm).is_none(), "{vm} also on {o}");
    }
    assert_eq!(state(tb, host, vm).and_then(|s| s.phase).as_deref(), Some("paused"), "{vm} on {host}");
    assert_same_bytes(&ram_file(tb, "hostA", vm), &ram_file(tb, host, vm));
}

/// Four VMs leave hostA for hostB and hostC, two at a time; hostC is
/// drained while a migration to it runs (held before its switchover, so
/// it is certain to be running): that one moves to hostB, hostC forwarding
/// what it holds, and every later VM goes to hostB.
#[test]
#[cfg_attr(not(feature = "test-hooks"), ignore = "needs the test-only switches: cargo test --features test-hooks")]
fn evacuate_two_at_a_time_with_a_destination_drained() {
    let mut tb = testbed(&["hostA", "hostB", "hostC"]);
    let vms = ["e1", "e2", "e3", "e4"];
    for vm in vms {
        tb.start_guest("hostA", vm, 32 * MIB, &workload(2.0), true, &[]).unwrap();
    }
    // hostA's events, read on their own: how many migrations ran at once.
    let mut w = tb.client("hostA").watch(None).expect("watch");
    let events = std::thread::spawn(move || {
        let (mut out, mut ended) = (vec![], 0);
        while ended < 4 {
            let Ok(Some(e)) = w.next_value() else { break };
            ended += usize::from(e["event"] == "ended");
            out.push(e);
        }
        out
    });
    let opts = held(MigrateOptions { suspend: true, ..Default::default() });
    let to = ["hostB".to_string(), "hostC".to_string()];
    tb.client("hostA").evacuate(&to, 2, opts).expect("evacuation accepted");

    // The first two spread over both (fewest incoming first).
    let to_c = wait_for(60, || {
        let s = tb.client("hostA").evacuation(None, false).ok()?;
        let m: Vec<_> = s.vms.iter().filter(|v| v.stage == Stage::Migrating).collect();
        let c = m.iter().find(|v| v.destination.as_deref() == Some("hostC"))?;
        m.iter().any(|v| v.destination.as_deref() == Some("hostB")).then(|| c.vm.clone())
    })
    .expect("one migration to each destination");
    wait_fraction(&tb, "hostA", &to_c, 0.9);
    let d = tb.client("hostC").drain(true).expect("drain");
    assert!(d.drained && d.incoming == 1, "{d:?}");

    // Whatever heads to hostB may switch over.
    let done = wait_for(300, || {
        for vm in vms {
            if target(&tb, "hostA", vm).as_deref() == Some("hostB") {
                release(&tb, "hostA", vm);
            }
        }
        tb.client("hostA").evacuation(None, false).ok().filter(|s| s.done)
    })
    .expect("the evacuation ended");
    assert_eq!(done.vms.len(), vms.len(), "every VM in the report: {done:#?}");
    assert!(done.vms.iter().all(|v| v.stage == Stage::Completed), "{done:#?}\n{}", tb.logs());
    assert!(done.vms.iter().all(|v| v.destination.as_deref() == Some("hostB")), "{done:#?}");
    assert!(done.peak_parallel <= 2, "{done:#?}");

    let drained = report(&tb, "hostA", &to_c);
    assert_eq!(drained.retargets.len(), 1, "{drained:#?}");
    let r = &drained.retargets[0];
    assert_eq!((r.from.as_str(), r.to.as_str(), r.forwarding), ("hostC", "hostB", true), "{drained:#?}");
    assert!(r.cause == Cause::Leave && r.reason.contains("drained"), "{r:?}");
    assert!(drained.bytes_by_sender.get("hostC").copied().unwrap_or(0) > 0, "hostC forwarded: {drained:#?}");
    for vm in vms {
        landed(&tb, vm, "hostB", &["hostC"]);
    }
    assert!(tb.client("hostC").info().unwrap().incoming.is_empty());

    // Never more than two out of hostA, by its own events; the drain's
    // decision among them.
    let (mut out, mut peak) = (HashSet::new(), 0);
    let events = events.join().unwrap();
    let decided = events
        .iter()
        .any(|e| e["event"] == "decision" && e["vm"] == to_c.as_str() && e["action"] == "retarget to hostB");
    assert!(decided, "no decision event for {to_c}");
    for e in events {
        let vm = e["vm"].as_str().unwrap_or_default().to_owned();
        match e["event"].as_str() {
            Some("started") => drop(out.insert(vm)),
            Some("ended") => drop(out.remove(&vm)),
            _ => {}
        }
        peak = peak.max(out.len());
    }
    assert_eq!(peak, 2, "migrations out of hostA at once");
}

/// A drained host refuses new migrations: without a fallback the migration
/// fails with the reason, with one it starts on the fallback host.
#[test]
fn drained_destination_refuses_and_the_fallback_takes_it() {
    let mut tb = testbed(&["hostA", "hostB", "hostC"]);
    tb.start_guest("hostA", "d1", 16 * MIB, &workload(1.0), true, &[]).unwrap();
    tb.client("hostB").drain(true).unwrap();
    assert!(tb.client("hostB").info().unwrap().capacity.drained);

    let opts = MigrateOptions { suspend: true, ..Default::default() };
    let r = migrate(&tb, "hostA", "d1", "hostB", opts.clone());
    assert_eq!(r.result, Outcome::Failed, "{r:#?}");
    let drained = Reason { code: Some(ErrorCode::Drained), ..Reason::at(FailureKind::Refused, "hostB") };
    assert_eq!(r.reason, Some(drained), "{r:#?}");
    assert_running_on(&tb, "hostA", "d1");

    let r = migrate(&tb, "hostA", "d1", "hostB", MigrateOptions { fallback: vec!["hostC".into()], ..opts });
    assert_eq!(r.result, Outcome::Completed, "{r:#?}");
    assert_eq!(r.destination, "hostC");
    let d = &r.decisions[0];
    assert!(d.cause == Cause::Refused && d.reason.contains("drained"), "{d:?}");
    assert_eq!((d.target.as_str(), d.action.as_str()), ("hostB", "retarget to hostC"));
    landed(&tb, "d1", "hostC", &["hostB"]);

    // Undrained, it takes migrations again.
    assert!(!tb.client("hostB").drain(false).unwrap().drained);
    let r = migrate(&tb, "hostC", "d1", "hostB", MigrateOptions { suspend: false, ..Default::default() });
    assert_eq!(r.result, Outcome::Completed, "{r:#?}");
}

/// The destination dies mid-way (its agent killed, its incoming VM with
/// it): the migration moves to the fallback host, the source resending
/// what the dead one held, and completes there.
#[test]
#[cfg_attr(not(feature = "test-hooks"), ignore = "needs the test-only switches: cargo test --features test-hooks")]
fn fallback_when_the_destination_dies() {
    let mut tb = testbed(&["hostA", "hostB", "hostC"]);
    tb.start_guest("hostA", "k1", 64 * MIB, &workload(4.0), true, &[]).unwrap();
    let opts = MigrateOptions { suspend: true, fallback: vec!["hostC".into()], ..Default::default() };
    start_migration(&tb, "hostA", "k1", "hostB", held(opts));
    wait_fraction(&tb, "hostA", "k1", 0.5);
    tb.kill_agent("hostB");
    let moved = wait_for(60, || (target(&tb, "hostA", "k1")? == "hostC").then_some(()));
    assert!(moved.is_some(), "no automatic retarget\n{}", tb.logs());
    release(&tb, "hostA", "k1");
    let r = wait_report(&tb, "hostA", "k1");
    assert_eq!(r.result, Outcome::Completed, "{r:#?}\n{}", tb.logs());
    assert_eq!(r.destination, "hostC");
    let t = &r.retargets[0];
    assert_eq!((t.from.as_str(), t.forwarding), ("hostB", false), "{r:#?}");
    assert_eq!(t.cause, Cause::Lost, "{t:?}");
    assert!(r.decisions.iter().any(|d| d.target == "hostB" && d.action == "retarget to hostC"), "{r:#?}");
    assert!(tb.vm_on("hostA", "k1").is_none());
    assert_same_bytes(&ram_file(&tb, "hostA", "k1"), &ram_file(&tb, "hostC", "k1"));
}

/// The destination's link is shaped down mid-way (network namespaces, as
/// root): once it stays below the threshold, the migration moves to the
/// fallback host, and the slow one forwards what it holds.
#[test]
#[cfg_attr(not(feature = "test-hooks"), ignore = "needs the test-only switches: cargo test --features test-hooks")]
fn fallback_when_the_destination_falls_behind() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return skip("fallback_when_the_destination_falls_behind", "needs root (network namespaces)");
    }
    let net = Net::create("fb", &["hostA", "hostB", "hostC"], 2_000, None).expect("network namespaces");
    let mut tb = Testbed::start_net(exe(), net).expect("test bed");
    // 32 MiB hot at 16 MB/s: the source always has a backlog for a 5 MB/s
    // target. One stream: what it has in flight then arrives within the
    // peer timeout even at 5 MB/s (else the target would count as lost).
    let w = dcmigrate::vm::synthetic::Workload { hot_fraction: 0.5, ..workload(16.0) };
    tb.start_guest("hostA", "s1", 64 * MIB, &w, true, &[]).unwrap();
    let opts = MigrateOptions {
        suspend: true,
        streams: 1,
        fallback: vec!["hostC".into()],
        slow_rate_mbps: Some(10.0),
        slow_for_s: 3,
        ..Default::default()
    };
    start_migration(&tb, "hostA", "s1", "hostB", held(opts));
    wait_fraction(&tb, "hostA", "s1", 0.5);
    tb.shape("hostB", 40).expect("shaping hostB's link");
    let moved = wait_for(120, || (target(&tb, "hostA", "s1")? == "hostC").then_some(()));
    assert!(moved.is_some(), "no automatic retarget\n{}", tb.logs());
    release(&tb, "hostA", "s1");
    let r = wait_report(&tb, "hostA", "s1");
    assert_eq!(r.result, Outcome::Completed, "{r:#?}\n{}", tb.logs());
    let t = &r.retargets[0];
    assert_eq!((t.from.as_str(), t.to.as_str(), t.forwarding), ("hostB", "hostC", true), "{r:#?}");
    assert_eq!(t.cause, Cause::Slow, "{t:?}");
    assert!(r.bytes_by_sender.get("hostB").copied().unwrap_or(0) > 0, "hostB forwarded: {r:#?}");
    assert!(tb.vm_on("hostA", "s1").is_none() && tb.vm_on("hostB", "s1").is_none());
    assert_same_bytes(&ram_file(&tb, "hostA", "s1"), &ram_file(&tb, "hostC", "s1"));
}

/// The commands as an operator types them: `drain` refuses a host that is
/// not the agent at `--api`; `evacuate` follows the queue to its end and
/// exits 0 with every VM moved (its JSON report says where).
#[test]
fn evacuate_and_drain_from_the_command_line() {
    let mut tb = testbed(&["hostA", "hostB"]);
    for vm in ["c1", "c2"] {
        tb.start_guest("hostA", vm, 16 * MIB, &workload(1.0), true, &[]).unwrap();
    }
    let api = tb.host("hostA").api.clone();
    let run = |args: &[&str]| {
        let out = std::process::Command::new(exe()).args(args).arg("--api").arg(&api).output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, _, err) = run(&["drain", "hostB"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("hostB is not the agent at"), "{err}");
    assert!(!tb.client("hostB").info().unwrap().capacity.drained);

    let (code, out, err) = run(&["evacuate", "hostA", "--to", "hostB", "--max-parallel", "1", "--json"]);
    assert_eq!(code, Some(0), "{out}\n{err}\n{}", tb.logs());
    let report: dcmigrate::agent::evacuate::EvacuationStatus = serde_json::from_str(&out).expect("a JSON report");
    assert!(report.done && report.peak_parallel == 1, "{report:#?}");
    assert_eq!(report.vms.len(), 2, "both VMs in the report: {report:#?}");
    for v in &report.vms {
        assert_eq!((v.stage, v.destination.as_deref()), (Stage::Completed, Some("hostB")), "{report:#?}");
        assert!(tb.vm_on("hostA", &v.vm).is_none() && tb.vm_on("hostB", &v.vm).is_some());
    }
}

/// Cancelling an evacuation: its running migration is cancelled (held
/// before its switchover, so certainly running), the queued VM never
/// starts, and both keep running here.
#[test]
#[cfg_attr(not(feature = "test-hooks"), ignore = "needs the test-only switches: cargo test --features test-hooks")]
fn a_cancelled_evacuation_leaves_the_vms_here() {
    let mut tb = testbed(&["hostA", "hostB"]);
    for vm in ["x1", "x2"] {
        tb.start_guest("hostA", vm, 16 * MIB, &workload(1.0), true, &[]).unwrap();
    }
    let opts = held(MigrateOptions::default());
    tb.client("hostA").evacuate(&["hostB".to_string()], 1, opts).unwrap();
    let running = wait_for(60, || {
        let s = tb.client("hostA").evacuation(None, false).ok()?;
        s.vms.iter().find(|v| v.stage == Stage::Migrating).map(|v| v.vm.clone())
    })
    .expect("one migration started");
    tb.client("hostA").evacuation(None, true).expect("cancelled");
    let end = wait_for(60, || tb.client("hostA").evacuation(None, false).ok().filter(|s| s.done)).expect("it ended");
    assert_eq!(end.vms.len(), 2, "both VMs in the report: {end:#?}");
    for v in &end.vms {
        assert_eq!(v.stage, Stage::Failed, "{end:#?}");
        assert_eq!(v.attempts, u32::from(v.vm == running), "{end:#?}");
        assert_running_on(&tb, "hostA", &v.vm);
        assert!(tb.vm_on("hostB", &v.vm).is_none());
    }
    assert!(tb.client("hostB").info().unwrap().incoming.is_empty());
}

/// Unmounts a test's tmpfs, whatever happens.
struct Mounted(std::path::PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// The destination's data dir (a small tmpfs, as root) is filled by
/// something else mid-way: below what the session still needs, it asks the
/// source to leave, and the migration moves to the fallback host with the
/// destination forwarding what it holds.
#[test]
#[cfg_attr(not(feature = "test-hooks"), ignore = "needs the test-only switches: cargo test --features test-hooks")]
fn fallback_when_the_destination_runs_out_of_room() {
    const TEST: &str = "fallback_when_the_destination_runs_out_of_room";
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return skip(TEST, "needs root (a tmpfs of its own)");
    }
    let mut tb = testbed(&["hostA", "hostB", "hostC"]);
    let dir = tb.host("hostB").data_dir.clone();
    let mount = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=96m,mode=0700", "tmpfs"])
        .arg(&dir)
        .status();
    if !mount.is_ok_and(|s| s.success()) {
        return skip(TEST, "cannot mount a tmpfs here");
    }
    let _unmount = Mounted(dir.clone());
    tb.start_guest("hostA", "r1", 48 * MIB, &workload(1.0), true, &["--zero-every", "0"]).unwrap();
    // Capped at 2 MB/s: after the filling, hostB would run out of room
    // only after some 15 s, far beyond its check (every 2 s) and the move.
    let opts = MigrateOptions {
        suspend: true,
        fallback: vec!["hostC".into()],
        max_bandwidth_mbps: Some(2.0),
        ..Default::default()
    };
    start_migration(&tb, "hostA", "r1", "hostB", held(opts));
    wait_fraction(&tb, "hostA", "r1", 0.2);
    // Free space 4 MiB short of what is still to come (no holes: every page travels).
    let free = {
        let out = std::process::Command::new("df").args(["-B1", "--output=avail"]).arg(&dir).output().unwrap();
        String::from_utf8_lossy(&out.stdout).lines().nth(1).unwrap().trim().parse::<u64>().unwrap()
    };
    use std::os::unix::fs::MetadataExt;
    let allocated = std::fs::metadata(ram_file(&tb, "hostB", "r1")).unwrap().blocks() * 512;
    let to_come = 48 * MIB - allocated;
    std::fs::write(dir.join("filler"), vec![1u8; (free - (to_come - 4 * MIB)) as usize]).unwrap();
    let moved = wait_for(60, || (target(&tb, "hostA", "r1")? == "hostC").then_some(()));
    assert!(moved.is_some(), "no automatic retarget\n{}", tb.logs());
    std::fs::remove_file(dir.join("filler")).unwrap();
    release(&tb, "hostA", "r1");
    let r = wait_report(&tb, "hostA", "r1");
    assert_eq!(r.result, Outcome::Completed, "{r:#?}\n{}", tb.logs());
    let t = &r.retargets[0];
    assert_eq!((t.from.as_str(), t.to.as_str(), t.forwarding), ("hostB", "hostC", true), "{r:#?}");
    assert!(t.cause == Cause::Leave && t.reason.contains("no room left"), "{t:?}");
    assert!(!tb.agent_log("hostB").contains("No space left"), "hostB ran out of room before it left");
    assert!(tb.vm_on("hostA", "r1").is_none() && tb.vm_on("hostB", "r1").is_none());
    assert_same_bytes(&ram_file(&tb, "hostA", "r1"), &ram_file(&tb, "hostC", "r1"));
}

/// A rolling upgrade: a destination of the previous release (protocol 2)
/// cannot say its room, and is still a destination an evacuation uses.
#[test]
#[cfg_attr(not(feature = "test-hooks"), ignore = "needs the test-only switches: cargo test --features test-hooks")]
fn evacuate_to_an_older_agent() {
    let mut tb = testbed(&["hostA", "hostB"]);
    tb.restart_agent("hostB", &[("DCMIGRATE_TEST_MAX_PROTOCOL", "2")]).unwrap();
    tb.start_guest("hostA", "o1", 16 * MIB, &workload(1.0), true, &[]).unwrap();
    tb.client("hostA").evacuate(&["hostB".to_string()], 1, MigrateOptions::default()).unwrap();
    let end = wait_for(120, || tb.client("hostA").evacuation(None, false).ok().filter(|s| s.done)).expect("it ended");
    assert_eq!(end.vms[0].stage, Stage::Completed, "{end:#?}\n{}", tb.logs());
    assert_eq!(end.vms[0].destination.as_deref(), Some("hostB"));
    assert_running_on(&tb, "hostB", "o1");
}
