//! Faults (the fast cells of the fault matrix; README "Faults" has the
//! table): a peer killed, frozen past the peer timeout, or shut down, at a
//! moment the test makes certain (a held switchover, a stalled destination),
//! and what every cell must show afterwards: the VM runs on exactly one
//! host; where the migration completed its RAM is byte-exact; nothing is
//! left on the other hosts; the fault was noticed within its bound; and the
//! guest's longest pause stayed within the downtime limit plus the
//! switchover deadline.

mod common;

use common::*;
use dcmigrate::engine::{FailureKind, MigrateOptions, Outcome, Reason, Report};
use dcmigrate::testbed::{wait_for, Testbed};
use std::time::{Duration, Instant};

/// The agents' peer timeout in these tests (seconds).
const PEER_TIMEOUT: u64 = 2;
/// Time for an outcome once the bound passed: reports, cleanups.
const SLACK: Duration = Duration::from_secs(5);

fn bed(hosts: &[&str], env: &[(&str, &str)]) -> Testbed {
    let pt = PEER_TIMEOUT.to_string();
    let mut e = vec![("DCMIGRATE_PEER_TIMEOUT", pt.as_str())];
    e.extend_from_slice(env);
    Testbed::start_with_env(exe(), hosts, &e).expect("test bed")
}

/// The VM is registered, and running, on `host` only.
fn runs_only_on(tb: &Testbed, host: &str, vm: &str) {
    for h in tb.hosts.iter().filter(|h| h.name != host) {
        let gone = wait_for(10, || tb.vm_on(&h.name, vm).is_none().then_some(()));
        assert!(gone.is_some(), "{vm} is also registered on {}", h.name);
    }
    assert_running_on(tb, host, vm);
}

/// Nothing of the VM on `host` (files, incoming guest), within a few seconds.
fn clean(tb: &Testbed, host: &str, vm: &str) {
    let ok = wait_for(15, || {
        (vm_files(tb, host, vm).is_empty() && tb.vm_on(host, vm).is_none() && !incoming_on(tb, host, vm)).then_some(())
    });
    assert!(ok.is_some(), "{host} kept {:?}", vm_files(tb, host, vm));
}

fn longest_pause(tb: &Testbed, host: &str, vm: &str) -> f64 {
    state(tb, host, vm).and_then(|s| s.longest_pause_ms).unwrap_or(0.0)
}

fn report_within(tb: &Testbed, vm: &str, since: Instant, bound: Duration) -> Report {
    let r = wait_report(tb, "hostA", vm);
    let took = since.elapsed();
    assert!(took <= bound + SLACK, "the outcome took {took:?}, bound {bound:?}: {r:#?}\n{}", tb.logs());
    r
}

/// The destination freezes (SIGSTOP) in round 0: it is declared lost within
/// the peer timeout, the migration fails, the VM keeps running on the
/// source; thawed, the destination discards what it had.
#[test]
#[cfg_attr(not(feature = "test-hooks"), ignore = "needs the test-only switches: cargo test --features test-hooks")]
fn destination_frozen_in_round_0() {
    let mut tb = bed(&["hostA", "hostB"], &[]);
    tb.start_guest("hostA", "f1", 64 * MIB, &workload(10.0), false, &[]).unwrap();
    start_migration(
        &tb,
        "hostA",
        "f1",
        "hostB",
        held(MigrateOptions { max_bandwidth_mbps: Some(20.0), ..Default::default() }),
    );
    assert!(wait_for(30, || (progress(&tb, "hostA", "f1")?.1 > 0).then_some(())).is_some());
    let t = Instant::now();
    assert!(tb.signal_agent("hostB", libc::SIGSTOP));
    let r = report_within(&tb, "f1", t, Duration::from_secs(PEER_TIMEOUT));
    assert_eq!(r.result, Outcome::Failed, "{r:#?}");
    assert_eq!(r.vm_runs_on.as_deref(), Some("hostA"));
    assert!(tb.signal_agent("hostB", libc::SIGCONT));
    clean(&tb, "hostB", "f1");
    runs_only_on(&tb, "hostA", "f1");
}

/// The destination hangs in the middle of the pause (before the device
/// state is loaded): past the switchover deadline the VM resumes on the
/// source, and the guest's pause stays within the limit plus the deadline.
#[test]
#[cfg_attr(not(feature = "test-hooks"), ignore = "needs the test-only switches: cargo test --features test-hooks")]
fn destination_hangs_in_the_pause() {
    let tb = bed(&["hostA", "hostB"], &[("DCMIGRATE_TEST_STALL_DEVICE_STATE_MS", "8000")]);
    let mut tb = tb;
    tb.start_guest("hostA", "f2", 32 * MIB, &workload(5.0), false, &[]).unwrap();
    let opts = MigrateOptions { switchover_timeout_ms: Some(2000), ..Default::default() };
    let t = Instant::now();
    start_migration(&tb, "hostA", "f2", "hostB", opts);
    let r = report_within(&tb, "f2", t, Duration::from_secs(30));
    assert_eq!(r.result, Outcome::Failed, "{r:#?}");
    assert_eq!(r.reason, Some(Reason::of(FailureKind::SwitchoverTimeout)), "{r:#?}");
    runs_only_on(&tb, "hostA", "f2");
    let pause = longest_pause(&tb, "hostA", "f2");
    assert!(pause > 0.0 && pause <= 300.0 + 2000.0 + 500.0, "the guest was paused {pause} ms");
    clean(&tb, "hostB", "f2");
}

/// The forwarder freezes while it forwards: it is dropped within the peer
/// timeout, the source sends its share, the VM completes on the new
/// destination byte for byte; thawed, the forwarder discards everything.
#[test]
#[cfg_attr(not(feature = "test-hooks"), ignore = "needs the test-only switches: cargo test --features test-hooks")]
fn forwarder_frozen_while_forwarding() {
    let mut tb = bed(&["hostA", "hostB", "hostC"], &[("DCMIGRATE_TEST_FORWARD_DELAY_MS", "300")]);
    tb.start_guest("hostA", "f3", 64 * MIB, &workload(10.0), true, &[]).unwrap();
    let opts = MigrateOptions { max_bandwidth_mbps: Some(40.0), suspend: true, ..Default::default() };
    start_migration(&tb, "hostA", "f3", "hostB", held(opts));
    assert!(retarget_when(&tb, "hostA", "f3", "hostC", 0.6, true));
    assert!(tb.signal_agent("hostB", libc::SIGSTOP));
    release(&tb, "hostA", "f3");
    let r = wait_report(&tb, "hostA", "f3");
    assert_eq!(r.result, Outcome::Completed, "{r:#?}\n{}", tb.logs());
    assert_eq!(r.forwarders_lost, vec!["hostB".to_string()], "{r:#?}");
    assert_same_bytes(&ram_file(&tb, "hostA", "f3"), &ram_file(&tb, "hostC", "f3"));
    assert!(tb.signal_agent("hostB", libc::SIGCONT));
    clean(&tb, "hostB", "f3");
    std::fs::remove_file(ram_file(&tb, "hostA", "f3")).unwrap();
}

/// The source agent is killed (SIGKILL) in round 0 and restarted: it knows
/// the VM again (still running), and the destination discarded everything.
#[test]
#[cfg_attr(not(feature = "test-hooks"), ignore = "needs the test-only switches: cargo test --features test-hooks")]
fn source_killed_in_round_0_and_restarted() {
    let mut tb = bed(&["hostA", "hostB"], &[]);
    tb.start_guest("hostA", "f4", 64 * MIB, &workload(10.0), false, &[]).unwrap();
    start_migration(
        &tb,
        "hostA",
        "f4",
        "hostB",
        held(MigrateOptions { max_bandwidth_mbps: Some(20.0), ..Default::default() }),
    );
    assert!(wait_for(30, || (progress(&tb, "hostA", "f4")?.1 > 0).then_some(())).is_some());
    tb.kill_agent("hostA");
    clean(&tb, "hostB", "f4");
    tb.restart_agent("hostA", &[]).unwrap();
    runs_only_on(&tb, "hostA", "f4");
    // And it can migrate again.
    let r = migrate(&tb, "hostA", "f4", "hostB", MigrateOptions::default());
    assert_eq!(r.result, Outcome::Completed, "{r:#?}");
    runs_only_on(&tb, "hostB", "f4");
}

/// The source agent is killed while the VM is paused (the destination hangs
/// in the pause): restarted, it reads its journal and resumes the VM, which
/// never got to the destination; the destination discards everything.
#[test]
#[cfg_attr(not(feature = "test-hooks"), ignore = "needs the test-only switches: cargo test --features test-hooks")]
fn source_killed_in_the_pause_and_restarted() {
    let mut tb = bed(&["hostA", "hostB"], &[("DCMIGRATE_TEST_STALL_DEVICE_STATE_MS", "4000")]);
    tb.start_guest("hostA", "f5", 32 * MIB, &workload(5.0), false, &[]).unwrap();
    start_migration(&tb, "hostA", "f5", "hostB", MigrateOptions::default());
    let paused = wait_for(30, || (phase(&tb, "hostA", "f5")? == "paused").then_some(()));
    assert!(paused.is_some(), "the VM never paused");
    tb.kill_agent("hostA");
    tb.restart_agent("hostA", &[]).unwrap();
    runs_only_on(&tb, "hostA", "f5");
    clean(&tb, "hostB", "f5");
}

/// The source agent is told to stop (SIGTERM) during the pause: it cancels
/// the migration first (the VM runs on the source, the destination
/// discards), then exits; restarted, it knows the VM.
#[test]
#[cfg_attr(not(feature = "test-hooks"), ignore = "needs the test-only switches: cargo test --features test-hooks")]
fn source_shutdown_in_the_pause() {
    let mut tb = bed(&["hostA", "hostB"], &[("DCMIGRATE_TEST_STALL_DEVICE_STATE_MS", "4000")]);
    tb.start_guest("hostA", "f6", 32 * MIB, &workload(5.0), false, &[]).unwrap();
    start_migration(&tb, "hostA", "f6", "hostB", MigrateOptions::default());
    assert!(wait_for(30, || (phase(&tb, "hostA", "f6")? == "paused").then_some(())).is_some());
    assert!(tb.signal_agent("hostA", libc::SIGTERM));
    assert!(tb.wait_agent_exit("hostA", 20), "the agent did not stop");
    clean(&tb, "hostB", "f6");
    tb.restart_agent("hostA", &[]).unwrap();
    runs_only_on(&tb, "hostA", "f6");
}

/// The destination commits and the answer is lost: the outcome is unknown.
/// `migrate` and `resume` are refused on the source, which asks the
/// destination, learns the VM runs there, and stops its own copy: the VM
/// runs on exactly one host.
#[test]
#[cfg_attr(not(feature = "test-hooks"), ignore = "needs the test-only switches: cargo test --features test-hooks")]
fn unknown_outcome_is_refused_then_settled() {
    let mut tb = bed(&["hostA", "hostB"], &[]);
    tb.restart_agent("hostB", &[("DCMIGRATE_TEST_DROP_AFTER_COMMIT", "1")]).unwrap();
    tb.start_guest("hostA", "f7", 32 * MIB, &workload(5.0), false, &[]).unwrap();
    let r = migrate(&tb, "hostA", "f7", "hostB", MigrateOptions::default());
    assert_eq!(r.result, Outcome::Unknown, "{r:#?}");
    assert_eq!(r.vm_runs_on, None);
    // The source first asks after a peer timeout (2 s): these come well before.
    let a = tb.client("hostA");
    let e = a.migrate("f7", "hostB", MigrateOptions::default()).unwrap_err().to_string();
    assert!(e.contains("unknown outcome"), "{e}");
    let e = a.resume("f7").unwrap_err().to_string();
    assert!(e.contains("unknown outcome"), "{e}");
    assert_eq!(phase(&tb, "hostA", "f7").as_deref(), Some("paused"), "paused on the source meanwhile");
    let settled = wait_for(30, || tb.vm_on("hostA", "f7").is_none().then_some(()));
    assert!(settled.is_some(), "the source never learned the outcome:\n{}", tb.logs());
    runs_only_on(&tb, "hostB", "f7");
}

/// The source's `Resume` never reaches the destination (the connection
/// drops first: the outcome is unknown, the destination discards), and
/// another source then moves a VM of the same name there. Asked about its
/// own migration, the destination says it never committed it, and the
/// source resumes its VM: both copies go on. (Asked by the VM's name, as
/// protocol 3 does, it would have answered "committed" and the source
/// would have stopped the only copy of its VM.) The source's agent is down
/// while the other migration runs, so it cannot ask before.
#[test]
#[cfg_attr(not(feature = "test-hooks"), ignore = "needs the test-only switches: cargo test --features test-hooks")]
fn an_outcome_is_answered_for_the_migration_asked_about() {
    let mut tb = bed(&["hostA", "hostB", "hostC"], &[]);
    tb.restart_agent("hostB", &[("DCMIGRATE_TEST_DROP_BEFORE_COMMIT", "1")]).unwrap();
    tb.start_guest("hostA", "twin", 32 * MIB, &workload(5.0), false, &[]).unwrap();
    let r = migrate(&tb, "hostA", "twin", "hostB", MigrateOptions::default());
    assert_eq!(r.result, Outcome::Unknown, "{r:#?}");
    tb.kill_agent("hostA");
    clean(&tb, "hostB", "twin");
    tb.start_guest("hostC", "twin", 32 * MIB, &workload(5.0), false, &[]).unwrap();
    let r = migrate(&tb, "hostC", "twin", "hostB", MigrateOptions::default());
    assert_eq!(r.result, Outcome::Completed, "{r:#?}");
    tb.restart_agent("hostA", &[]).unwrap();
    let resumed = wait_for(30, || (phase(&tb, "hostA", "twin").as_deref() == Some("running")).then_some(()));
    assert!(resumed.is_some(), "the source's VM did not resume:\n{}", tb.logs());
    assert_running_on(&tb, "hostA", "twin");
    assert_running_on(&tb, "hostB", "twin");
    assert!(tb.vm_on("hostC", "twin").is_none());
}

/// `--max-time` is a hard budget: a round that would take minutes ends
/// when it runs out (here with `--on-budget abort`: the VM stays).
#[test]
#[cfg_attr(not(feature = "test-hooks"), ignore = "needs the test-only switches: cargo test --features test-hooks")]
fn max_time_ends_a_round_midway() {
    let tb = bed(&["hostA", "hostB"], &[]);
    let mut tb = tb;
    tb.start_guest("hostA", "f8", 64 * MIB, &workload(5.0), false, &[]).unwrap();
    let opts = MigrateOptions {
        max_time_s: 2,
        max_bandwidth_mbps: Some(1.0),
        on_budget: dcmigrate::engine::BudgetAction::Abort,
        ..Default::default()
    };
    let t = Instant::now();
    start_migration(&tb, "hostA", "f8", "hostB", opts);
    let r = report_within(&tb, "f8", t, Duration::from_secs(2));
    assert_eq!(r.result, Outcome::GaveUp, "{r:#?}");
    assert_eq!(r.reason, Some(Reason::of(FailureKind::GaveUp)), "{r:#?}");
    assert!(r.error.as_deref().unwrap().contains("time budget"), "{r:#?}");
    runs_only_on(&tb, "hostA", "f8");
    clean(&tb, "hostB", "f8");
}

/// The incoming guest dies during pre-copy: the migration fails at once
/// (not at the switchover), and the VM keeps running on the source.
#[test]
#[cfg_attr(not(feature = "test-hooks"), ignore = "needs the test-only switches: cargo test --features test-hooks")]
fn incoming_guest_dying_fails_at_once() {
    let mut tb = bed(&["hostA", "hostB"], &[]);
    tb.start_guest("hostA", "f9", 64 * MIB, &workload(5.0), false, &[]).unwrap();
    start_migration(
        &tb,
        "hostA",
        "f9",
        "hostB",
        held(MigrateOptions { max_bandwidth_mbps: Some(10.0), ..Default::default() }),
    );
    assert!(wait_for(30, || (progress(&tb, "hostA", "f9")?.1 > 0).then_some(())).is_some());
    // The incoming guest: the process that maps hostB's copy of the RAM.
    let ram = ram_file(&tb, "hostB", "f9");
    let pid = wait_for(10, || incoming_pid(&ram)).expect("incoming guest");
    let t = Instant::now();
    // SAFETY: a signal to a process of this test bed.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let r = report_within(&tb, "f9", t, Duration::from_secs(1));
    assert_eq!(r.result, Outcome::Failed, "{r:#?}");
    runs_only_on(&tb, "hostA", "f9");
    clean(&tb, "hostB", "f9");
}

/// The pid of the process whose command line names `ram` (an incoming guest).
fn incoming_pid(ram: &std::path::Path) -> Option<i32> {
    let needle = ram.to_string_lossy().into_owned();
    dcmigrate::testbed::pids_by_cmdline(|cmd| cmd.contains(&needle)).first().map(|&p| p as i32)
}

/// A VM whose device state is large (as with lots of video RAM) migrates:
/// the state travels in bounded chunks.
#[test]
fn large_device_state_moves_in_chunks() {
    let mut tb = testbed(&["hostA", "hostB"]);
    tb.start_guest("hostA", "big-dev", 16 * MIB, &workload(1.0), false, &["--device-state-mb", "96"]).unwrap();
    // What is tested is the chunking, not its speed: a debug build under
    // emulation hashes 96 MiB far slower than the default deadline allows.
    let opts = MigrateOptions { switchover_timeout_ms: Some(600_000), ..Default::default() };
    let r = migrate(&tb, "hostA", "big-dev", "hostB", opts);
    assert_eq!(r.result, Outcome::Completed, "{r:#?}");
    assert!(r.device_state_bytes > 96 * MIB, "{}", r.device_state_bytes);
    runs_only_on(&tb, "hostB", "big-dev");
}
