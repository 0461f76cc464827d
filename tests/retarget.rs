//! Retarget: change the destination mid-migration; the old destination
//! forwards what it holds while the source sends the rest.

mod common;
use common::*;
use dcmigrate::engine::{BudgetAction, FailureKind, MigrateOptions, Outcome, Reason, Report};
use dcmigrate::testbed::{wait_for, Testbed};

/// The source sends slowly, verification on, and the switchover waits for
/// the test's release: a retarget point is certain to be hit, however slow
/// the machine.
fn slow(mbps: f64) -> MigrateOptions {
    held(MigrateOptions { max_bandwidth_mbps: Some(mbps), suspend: true, ..Default::default() })
}

fn forwarded_by(report: &Report, host: &str) -> u64 {
    report.retargets.iter().map(|r| r.bytes_after.get(host).copied().unwrap_or(0)).sum()
}

/// Nothing left of the VM on a host that is no longer involved.
fn assert_gone(tb: &Testbed, host: &str, vm: &str) {
    let clean = wait_for(15, || (vm_files(tb, host, vm).is_empty() && tb.vm_on(host, vm).is_none()).then_some(()));
    assert!(clean.is_some(), "{host} still has {:?}", vm_files(tb, host, vm));
}

fn retarget_at(frac: f64) {
    let vm = format!("rt{}", (frac * 100.0) as u32);
    let mut tb = testbed(&["hostA", "hostB", "hostC"]);
    tb.start_guest("hostA", &vm, 128 * MIB, &workload(20.0), true, &[]).unwrap();
    start_migration(&tb, "hostA", &vm, "hostB", slow(60.0));
    assert!(retarget_when(&tb, "hostA", &vm, "hostC", frac, true), "migration ended before {frac}");
    release(&tb, "hostA", &vm);
    let r = wait_report(&tb, "hostA", &vm);
    assert_eq!(r.result, Outcome::Completed, "{r:#?}\n{}", tb.logs());
    assert_eq!(r.destination, "hostC");
    assert_eq!(r.vm_runs_on.as_deref(), Some("hostC"));
    assert_eq!(r.verify_mismatched_chunks, 0, "the engine alone must get every page right");
    let rt = &r.retargets[0];
    assert_eq!((rt.from.as_str(), rt.to.as_str()), ("hostB", "hostC"));
    if frac > 0.0 {
        assert!(rt.at_old_destination_bytes > 0);
        assert!(rt.forwarding);
        assert!(forwarded_by(&r, "hostB") > 0, "hostB held pages but forwarded nothing: {r:#?}");
    }
    assert_same_bytes(&ram_file(&tb, "hostA", &vm), &ram_file(&tb, "hostC", &vm));
    assert_gone(&tb, "hostB", &vm);
    assert!(tb.vm_on("hostA", &vm).is_none());
    assert_eq!(phase(&tb, "hostC", &vm).as_deref(), Some("paused"));
    std::fs::remove_file(ram_file(&tb, "hostA", &vm)).unwrap();
}

#[test]
#[cfg_attr(not(feature = "test-hooks"), ignore = "needs the test-only switches: cargo test --features test-hooks")]
fn retarget_before_anything_arrived() {
    retarget_at(0.0);
}

#[test]
#[cfg_attr(not(feature = "test-hooks"), ignore = "needs the test-only switches: cargo test --features test-hooks")]
fn retarget_at_30_percent() {
    retarget_at(0.3);
}

#[test]
#[cfg_attr(not(feature = "test-hooks"), ignore = "needs the test-only switches: cargo test --features test-hooks")]
fn retarget_at_70_percent() {
    retarget_at(0.7);
}

/// A retarget during the later rounds of a guest that keeps dirtying memory.
/// Its writes stay in the first quarter of RAM, so the rest (42 MiB of data)
/// is at the old destination once round 0 is over, however slow the machine.
#[test]
#[cfg_attr(not(feature = "test-hooks"), ignore = "needs the test-only switches: cargo test --features test-hooks")]
fn retarget_during_last_rounds() {
    let mut tb = testbed(&["hostA", "hostB", "hostC"]);
    let w = dcmigrate::vm::synthetic::Workload { hot_fraction: 0.25, ..workload(80.0) };
    tb.start_guest("hostA", "late", 64 * MIB, &w, true, &[]).unwrap();
    let opts = MigrateOptions {
        downtime_ms: 1,
        max_rounds: 12,
        on_budget: BudgetAction::Force,
        max_bandwidth_mbps: Some(150.0),
        suspend: true,
        ..Default::default()
    };
    start_migration(&tb, "hostA", "late", "hostB", held(opts));
    let in_round_2 = wait_for(60, || (progress(&tb, "hostA", "late")?.0 >= 2).then_some(()));
    assert!(in_round_2.is_some(), "never reached round 2");
    tb.client("hostA").retarget("late", "hostC", true).unwrap();
    release(&tb, "hostA", "late");
    let r = wait_report(&tb, "hostA", "late");
    assert_eq!(r.result, Outcome::Completed, "{r:#?}");
    assert!(r.retargets[0].at_old_destination_bytes > 32 * MIB, "{r:#?}");
    assert_same_bytes(&ram_file(&tb, "hostA", "late"), &ram_file(&tb, "hostC", "late"));
    assert_gone(&tb, "hostB", "late");
    std::fs::remove_file(ram_file(&tb, "hostA", "late")).unwrap();
}

/// B, then C, then D: every holder of current pages may send to the newest.
#[test]
#[cfg_attr(not(feature = "test-hooks"), ignore = "needs the test-only switches: cargo test --features test-hooks")]
fn two_retargets_in_a_row() {
    let mut tb = testbed(&["hostA", "hostB", "hostC", "hostD"]);
    tb.start_guest("hostA", "hop", 128 * MIB, &workload(20.0), true, &[]).unwrap();
    start_migration(&tb, "hostA", "hop", "hostB", slow(50.0));
    assert!(retarget_when(&tb, "hostA", "hop", "hostC", 0.3, true));
    assert!(retarget_when(&tb, "hostA", "hop", "hostD", 0.6, true));
    release(&tb, "hostA", "hop");
    let r = wait_report(&tb, "hostA", "hop");
    assert_eq!(r.result, Outcome::Completed, "{r:#?}\n{}", tb.logs());
    assert_eq!(r.vm_runs_on.as_deref(), Some("hostD"));
    assert_eq!(r.retargets.len(), 2);
    assert_eq!(r.verify_mismatched_chunks, 0);
    assert_same_bytes(&ram_file(&tb, "hostA", "hop"), &ram_file(&tb, "hostD", "hop"));
    for h in ["hostB", "hostC"] {
        assert_gone(&tb, h, "hop");
    }
    std::fs::remove_file(ram_file(&tb, "hostA", "hop")).unwrap();
}

/// The forwarder dies mid-forward: the source takes over its share.
#[test]
#[cfg_attr(not(feature = "test-hooks"), ignore = "needs the test-only switches: cargo test --features test-hooks")]
fn forwarder_crash_source_takes_over() {
    let env = [("DCMIGRATE_TEST_FORWARD_DELAY_MS", "400")];
    let mut tb = Testbed::start_with_env(exe(), &["hostA", "hostB", "hostC"], &env).unwrap();
    tb.start_guest("hostA", "fc", 128 * MIB, &workload(20.0), true, &[]).unwrap();
    start_migration(&tb, "hostA", "fc", "hostB", slow(60.0));
    assert!(retarget_when(&tb, "hostA", "fc", "hostC", 0.6, true));
    std::thread::sleep(std::time::Duration::from_millis(100));
    tb.kill_agent("hostB");
    release(&tb, "hostA", "fc");
    let r = wait_report(&tb, "hostA", "fc");
    assert_eq!(r.result, Outcome::Completed, "{r:#?}\n{}", tb.logs());
    assert_eq!(r.forwarders_lost, vec!["hostB".to_string()], "{r:#?}");
    assert_same_bytes(&ram_file(&tb, "hostA", "fc"), &ram_file(&tb, "hostC", "fc"));
    assert!(wait_for(15, || vm_files(&tb, "hostB", "fc").is_empty().then_some(())).is_some());
    std::fs::remove_file(ram_file(&tb, "hostA", "fc")).unwrap();
}

/// The new destination dies: the migration fails cleanly, the VM runs on the
/// source, and every destination is cleaned up.
#[test]
#[cfg_attr(not(feature = "test-hooks"), ignore = "needs the test-only switches: cargo test --features test-hooks")]
fn new_destination_crash_fails_cleanly() {
    let mut tb = testbed(&["hostA", "hostB", "hostC"]);
    tb.start_guest("hostA", "nc", 128 * MIB, &workload(20.0), false, &[]).unwrap();
    start_migration(&tb, "hostA", "nc", "hostB", slow(30.0));
    assert!(retarget_when(&tb, "hostA", "nc", "hostC", 0.3, true));
    std::thread::sleep(std::time::Duration::from_millis(300));
    tb.kill_agent("hostC");
    release(&tb, "hostA", "nc");
    let r = wait_report(&tb, "hostA", "nc");
    assert_eq!(r.result, Outcome::Failed, "{r:#?}");
    assert_eq!(r.reason, Some(Reason::at(FailureKind::DestinationLost, "hostC")), "{r:#?}");
    assert_eq!(r.vm_runs_on.as_deref(), Some("hostA"));
    assert_running_on(&tb, "hostA", "nc");
    assert_gone(&tb, "hostB", "nc");
    assert!(wait_for(15, || vm_files(&tb, "hostC", "nc").is_empty().then_some(())).is_some());
    // And it can migrate again.
    let r = migrate(&tb, "hostA", "nc", "hostB", MigrateOptions::default());
    assert_eq!(r.result, Outcome::Completed, "{r:#?}");
}

/// Retarget to a host that does not answer: a clear error, and the migration
/// to the old destination goes on unharmed.
#[test]
#[cfg_attr(not(feature = "test-hooks"), ignore = "needs the test-only switches: cargo test --features test-hooks")]
fn retarget_to_unreachable_host_keeps_migration_going() {
    let mut tb = testbed(&["hostA", "hostB", "hostC"]);
    tb.kill_agent("hostC");
    tb.start_guest("hostA", "un", 64 * MIB, &workload(10.0), true, &[]).unwrap();
    start_migration(&tb, "hostA", "un", "hostB", slow(40.0));
    let e = tb.client("hostA").retarget("un", "hostC", true).unwrap_err();
    assert!(e.to_string().contains("hostC"), "{e}");
    let e = tb.client("hostA").retarget("un", "hostA", true).unwrap_err();
    assert!(e.to_string().contains("is the source"), "{e}");
    release(&tb, "hostA", "un");
    let r = wait_report(&tb, "hostA", "un");
    assert_eq!(r.result, Outcome::Completed, "{r:#?}");
    assert_eq!(r.vm_runs_on.as_deref(), Some("hostB"));
    assert!(r.retargets.is_empty());
    assert_same_bytes(&ram_file(&tb, "hostA", "un"), &ram_file(&tb, "hostB", "un"));
    std::fs::remove_file(ram_file(&tb, "hostA", "un")).unwrap();
}

/// `--no-forward`: the old destination is dropped and the source sends everything.
#[test]
#[cfg_attr(not(feature = "test-hooks"), ignore = "needs the test-only switches: cargo test --features test-hooks")]
fn no_forward_restarts_from_the_source() {
    let mut tb = testbed(&["hostA", "hostB", "hostC"]);
    tb.start_guest("hostA", "nf", 64 * MIB, &workload(10.0), true, &[]).unwrap();
    start_migration(&tb, "hostA", "nf", "hostB", slow(60.0));
    assert!(retarget_when(&tb, "hostA", "nf", "hostC", 0.5, false));
    release(&tb, "hostA", "nf");
    let r = wait_report(&tb, "hostA", "nf");
    assert_eq!(r.result, Outcome::Completed, "{r:#?}");
    assert!(!r.retargets[0].forwarding);
    assert_eq!(forwarded_by(&r, "hostB"), 0);
    assert_same_bytes(&ram_file(&tb, "hostA", "nf"), &ram_file(&tb, "hostC", "nf"));
    assert_gone(&tb, "hostB", "nf");
    std::fs::remove_file(ram_file(&tb, "hostA", "nf")).unwrap();
}

/// Pages keep being rewritten inside chunks the old destination is
/// forwarding (slowly: its forwards are held back 4 s, so they land after
/// the source's newer copies would). With the one-writer rule the new destination ends
/// identical to the source; returns the number of differing pages.
fn hot_pages_under_forwarding(unordered: bool) -> (usize, Report) {
    let mut env = vec![("DCMIGRATE_TEST_FORWARD_DELAY_MS", "4000")];
    if unordered {
        env.push(("DCMIGRATE_TEST_UNORDERED", "1"));
    }
    let mut tb = Testbed::start_with_env(exe(), &["hostA", "hostB", "hostC"], &env).unwrap();
    // Writes spread over all RAM, so they hit the chunks in flight at the
    // forwarder; slow enough that a page overwritten by a late forward is
    // unlikely to be written (and so resent) again before the switchover.
    let w = workload(5.0);
    tb.start_guest("hostA", "hot", 64 * MIB, &w, true, &[]).unwrap();
    let opts = MigrateOptions {
        max_bandwidth_mbps: Some(30.0),
        max_rounds: 8,
        verify: dcmigrate::engine::options::VerifyMode::Off,
        suspend: true,
        ..Default::default()
    };
    start_migration(&tb, "hostA", "hot", "hostB", held(opts));
    assert!(retarget_when(&tb, "hostA", "hot", "hostC", 0.9, true));
    release(&tb, "hostA", "hot");
    let r = wait_report(&tb, "hostA", "hot");
    assert_eq!(r.result, Outcome::Completed, "{r:#?}\n{}", tb.logs());
    assert!(forwarded_by(&r, "hostB") > 0, "hostB forwarded nothing: {r:#?}");
    let n = differing_pages(&ram_file(&tb, "hostA", "hot"), &ram_file(&tb, "hostC", "hot"));
    std::fs::remove_file(ram_file(&tb, "hostA", "hot")).unwrap();
    (n, r)
}

#[test]
#[cfg_attr(not(feature = "test-hooks"), ignore = "needs the test-only switches: cargo test --features test-hooks")]
fn hot_pages_under_forwarding_arrive_current() {
    let (stale, r) = hot_pages_under_forwarding(false);
    assert_eq!(stale, 0, "{stale} stale pages at the new destination: {r:#?}");
}

/// Proves the stress test detects what the one-writer rule prevents.
#[test]
#[cfg_attr(not(feature = "test-hooks"), ignore = "needs the test-only switches: cargo test --features test-hooks")]
fn stress_test_catches_a_broken_ordering_rule() {
    let (stale, r) = hot_pages_under_forwarding(true);
    eprintln!("with the one-writer rule off: {stale} stale pages");
    assert!(stale > 0, "with the ordering rule off, stale pages were expected: {r:#?}");
}

/// A rolling upgrade: hostB still speaks only protocol version 1, as an
/// agent of an early release would. hostA (the newest) migrates to it and
/// retargets to hostC, and hostB forwards to hostC; then the VM comes back
/// from hostC to hostB, whose device state travels the version-1 way. Every
/// pair speaks the newest version both know.
#[test]
#[cfg_attr(not(feature = "test-hooks"), ignore = "needs the test-only switches: cargo test --features test-hooks")]
fn old_and_new_agents_migrate_and_retarget_together() {
    let mut tb = testbed(&["hostA", "hostB", "hostC"]);
    tb.restart_agent("hostB", &[("DCMIGRATE_TEST_MAX_PROTOCOL", "1")]).unwrap();
    tb.start_guest("hostA", "up", 64 * MIB, &workload(10.0), true, &[]).unwrap();
    start_migration(&tb, "hostA", "up", "hostB", slow(40.0));
    assert!(retarget_when(&tb, "hostA", "up", "hostC", 0.5, true));
    release(&tb, "hostA", "up");
    let r = wait_report(&tb, "hostA", "up");
    assert_eq!(r.result, Outcome::Completed, "{r:#?}\n{}", tb.logs());
    assert!(forwarded_by(&r, "hostB") > 0, "hostB (version 1) forwarded nothing: {r:#?}");
    assert_same_bytes(&ram_file(&tb, "hostA", "up"), &ram_file(&tb, "hostC", "up"));
    let log = |h: &str| std::fs::read_to_string(&tb.host(h).log).unwrap();
    assert!(log("hostB").contains("peer=hostA version=1"), "hostB spoke version 1 with hostA");
    let newest = format!("peer=hostA version={}", dcmigrate::protocol::VERSION);
    assert!(log("hostC").contains(&newest), "hostC spoke the newest version with hostA");
    std::fs::remove_file(ram_file(&tb, "hostA", "up")).unwrap();

    // Back from a newest-version host to the version-1 one: device state in one base64 message.
    tb.client("hostC").resume("up").unwrap();
    let r = migrate(&tb, "hostC", "up", "hostB", MigrateOptions { suspend: true, ..Default::default() });
    assert_eq!(r.result, Outcome::Completed, "{r:#?}\n{}", tb.logs());
    assert!(r.device_state_bytes > 0);
    assert!(log("hostB").contains("peer=hostC version=1"), "hostB spoke version 1 with hostC");
    assert_eq!(phase(&tb, "hostB", "up").as_deref(), Some("paused"));
    tb.client("hostB").resume("up").unwrap();
    assert_running_on(&tb, "hostB", "up");
}
