//! Live migration between agents on loopback (issue: core migration).

mod common;
use common::*;
use dcmigrate::agent::api::Request;
use dcmigrate::engine::{BudgetAction, MigrateOptions};
use dcmigrate::testbed::wait_for;
use dcmigrate::vm::synthetic::Workload;

/// A converging guest: the destination's RAM equals the source's at
/// switchover, byte for byte; the guest continues there with its device
/// state; the source guest is gone. Its writes stay inside 4 MiB and the
/// downtime limit is generous, so it converges however slow the machine.
#[test]
fn converging_migration_moves_ram_and_state() {
    let mut tb = testbed(&["hostA", "hostB"]);
    let w = Workload { hot_fraction: 1.0 / 64.0, ..workload(40.0) };
    tb.start_guest("hostA", "vm1", 256 * MIB, &w, true, &[]).unwrap();
    let before = state(&tb, "hostA", "vm1").unwrap();
    let src_pid = before["pid"].as_i64().unwrap();
    let opts = MigrateOptions { suspend: true, downtime_ms: 10_000, ..Default::default() };
    let report = migrate(&tb, "hostA", "vm1", "hostB", opts);
    assert_eq!(report["result"], "completed", "{report:#}");
    assert_eq!(report["switchover"], "converged");
    assert_eq!(report["tracker"], "cooperative");
    assert_eq!(report["verified"], true);
    assert_eq!(report["verify_mismatched_chunks"], 0, "the engine alone must get every page right");
    assert!(report["rounds"].as_array().unwrap().len() >= 2);
    assert!(report["downtime_ms"].as_f64().unwrap() > 0.0);
    // Every eighth page of the synthetic guest is a hole: skipped, not sent.
    let skipped = report["zero_pages_skipped"].as_u64().unwrap();
    assert!(skipped >= 256 * MIB / 4096 / 8 - 2048, "holes skipped: {skipped}");
    assert!(report["bytes_by_sender"]["hostA"].as_u64().unwrap() + skipped * 4096 >= 256 * MIB);

    // Source: the guest process is gone, its agent no longer has it.
    assert!(wait_for(10, || (!pid_alive(src_pid)).then_some(())).is_some(), "source guest still alive");
    assert!(tb.vm_on("hostA", "vm1").is_none());
    // Destination: paused (--suspend), so both RAM files are frozen now.
    assert_same_bytes(&ram_file(&tb, "hostA", "vm1"), &ram_file(&tb, "hostB", "vm1"));
    let dst = state(&tb, "hostB", "vm1").expect("VM on destination");
    assert_eq!(dst["phase"], "paused");
    let writes_at_switchover = dst["writes"].as_u64().unwrap();
    assert!(writes_at_switchover >= before["writes"].as_u64().unwrap(), "device state travelled");
    assert!(dst["heartbeat"].as_u64().unwrap() >= before["heartbeat"].as_u64().unwrap());

    tb.call("hostB", &Request::Resume { vm: "vm1".into() }).unwrap();
    assert_running_on(&tb, "hostB", "vm1");
    assert!(state(&tb, "hostB", "vm1").unwrap()["writes"].as_u64().unwrap() > writes_at_switchover);
    std::fs::remove_file(ram_file(&tb, "hostA", "vm1")).unwrap();
}

/// Same with the hash tracker and no verification: the ledger alone must be right.
#[test]
fn hash_tracker_without_verification_is_exact() {
    let mut tb = testbed(&["hostA", "hostB"]);
    tb.start_guest("hostA", "vm2", 128 * MIB, &workload(60.0), true, &[]).unwrap();
    let opts = MigrateOptions {
        suspend: true,
        verify: false,
        tracker: Some(dcmigrate::dirty::TrackerKind::Hash),
        streams: 2,
        ..Default::default()
    };
    let report = migrate(&tb, "hostA", "vm2", "hostB", opts);
    assert_eq!(report["result"], "completed", "{report:#}");
    assert_eq!(report["tracker"], "hash");
    assert_eq!(report["verified"], false);
    assert_same_bytes(&ram_file(&tb, "hostA", "vm2"), &ram_file(&tb, "hostB", "vm2"));
    std::fs::remove_file(ram_file(&tb, "hostA", "vm2")).unwrap();
}

/// A dirty rate that cannot converge: the budget ends it as configured.
#[test]
fn non_converging_budget_gives_up_or_forces() {
    let mut tb = testbed(&["hostA", "hostB"]);
    tb.start_guest("hostA", "hot", 128 * MIB, &workload(400.0), false, &[]).unwrap();
    let strict = MigrateOptions { downtime_ms: 1, max_rounds: 3, on_budget: BudgetAction::Abort, ..Default::default() };
    let report = migrate(&tb, "hostA", "hot", "hostB", strict.clone());
    assert_eq!(report["result"], "gave_up", "{report:#}\n{}", tb.logs());
    assert_eq!(report["rounds"].as_array().unwrap().len(), 3);
    assert!(report["error"].as_str().unwrap().contains("3 rounds"));
    assert_eq!(report["vm_runs_on"], "hostA");
    assert_running_on(&tb, "hostA", "hot");
    assert!(
        wait_for(10, || vm_files(&tb, "hostB", "hot").is_empty().then_some(())).is_some(),
        "destination left {:?}",
        vm_files(&tb, "hostB", "hot")
    );
    assert!(tb.vm_on("hostB", "hot").is_none());

    let force = MigrateOptions { on_budget: BudgetAction::Force, ..strict };
    let report = migrate(&tb, "hostA", "hot", "hostB", force);
    assert_eq!(report["result"], "completed", "{report}\n{}", tb.logs());
    assert_eq!(report["switchover"], "forced");
    assert_running_on(&tb, "hostB", "hot");
    assert!(tb.vm_on("hostA", "hot").is_none());
}

fn endless() -> MigrateOptions {
    // 128 MiB at 20 MB/s: round 0 alone takes over six seconds, and the
    // switchover waits for a release that these tests never give.
    held(MigrateOptions { max_bandwidth_mbps: Some(20.0), streams: 1, ..Default::default() })
}

fn wait_until_sending(tb: &dcmigrate::testbed::Testbed, vm: &str) {
    let ok = wait_for(30, || {
        let v = tb.call("hostA", &Request::Status { vm: Some(vm.into()) }).ok()?;
        (v["migrations"][0]["progress"]["at_destination_bytes"].as_u64()? > 0).then_some(())
    });
    assert!(ok.is_some(), "migration never started sending");
}

/// Cancel mid-way: the guest runs on the source; nothing is left on the destination.
#[test]
fn cancel_leaves_vm_on_source_and_nothing_on_destination() {
    if !hooks_or_skip("cancel_leaves_vm_on_source_and_nothing_on_destination") {
        return;
    }
    let mut tb = testbed(&["hostA", "hostB"]);
    tb.start_guest("hostA", "vmc", 128 * MIB, &workload(300.0), false, &[]).unwrap();
    tb.call("hostA", &Request::Migrate { vm: "vmc".into(), to: "hostB".into(), options: endless() }).unwrap();
    wait_until_sending(&tb, "vmc");
    assert!(tb.vm_on("hostB", "vmc").is_none(), "the incoming guest must not be registered before switchover");
    let v = tb.call("hostA", &Request::Cancel { vm: "vmc".into() }).unwrap();
    assert_eq!(v["report"]["result"], "cancelled", "{v:#}");
    assert_running_on(&tb, "hostA", "vmc");
    assert!(
        wait_for(10, || vm_files(&tb, "hostB", "vmc").is_empty().then_some(())).is_some(),
        "destination left {:?}",
        vm_files(&tb, "hostB", "vmc")
    );
    assert!(tb.vm_on("hostB", "vmc").is_none());
    // And it can still migrate afterwards.
    let report = migrate(&tb, "hostA", "vmc", "hostB", MigrateOptions { max_rounds: 5, ..Default::default() });
    assert_eq!(report["result"], "completed", "{report:#}");
}

/// The destination agent dies mid-way: the migration fails cleanly, the
/// guest keeps running on the source, the orphaned incoming guest removes itself.
#[test]
fn destination_crash_keeps_vm_on_source() {
    if !hooks_or_skip("destination_crash_keeps_vm_on_source") {
        return;
    }
    let mut tb = testbed(&["hostA", "hostB"]);
    tb.start_guest("hostA", "vmk", 128 * MIB, &workload(300.0), false, &[]).unwrap();
    tb.call("hostA", &Request::Migrate { vm: "vmk".into(), to: "hostB".into(), options: endless() }).unwrap();
    wait_until_sending(&tb, "vmk");
    assert!(!vm_files(&tb, "hostB", "vmk").is_empty(), "destination prepared RAM");
    tb.kill_agent("hostB");
    let report = tb.call("hostA", &Request::Wait { vm: "vmk".into() }).unwrap()["report"].clone();
    assert_eq!(report["result"], "failed", "{report:#}");
    assert!(report["error"].as_str().unwrap().contains("hostB"), "{report:#}");
    assert_eq!(report["vm_runs_on"], "hostA");
    assert_running_on(&tb, "hostA", "vmk");
    assert!(
        wait_for(15, || vm_files(&tb, "hostB", "vmk").is_empty().then_some(())).is_some(),
        "destination left {:?}",
        vm_files(&tb, "hostB", "vmk")
    );
}

/// A chunk corrupted at the destination before verification is found and resent.
#[test]
fn verification_resends_mismatching_chunks() {
    if !hooks_or_skip("verification_resends_mismatching_chunks") {
        return;
    }
    let mut tb = dcmigrate::testbed::Testbed::start_with_env(
        exe(),
        &["hostA", "hostB"],
        &[("DCMIGRATE_TEST_CORRUPT_CHUNK", "5")],
    )
    .unwrap();
    tb.start_guest("hostA", "vmv", 64 * MIB, &workload(10.0), true, &[]).unwrap();
    let report = migrate(&tb, "hostA", "vmv", "hostB", MigrateOptions { suspend: true, ..Default::default() });
    assert_eq!(report["result"], "completed", "{report:#}");
    assert_eq!(report["verify_mismatched_chunks"], 1);
    assert_same_bytes(&ram_file(&tb, "hostA", "vmv"), &ram_file(&tb, "hostB", "vmv"));
    std::fs::remove_file(ram_file(&tb, "hostA", "vmv")).unwrap();
}

/// Clear errors for impossible requests.
#[test]
fn refuses_unknown_hosts_and_vms() {
    let mut tb = testbed(&["hostA", "hostB"]);
    tb.start_guest("hostA", "vme", 16 * MIB, &workload(0.0), false, &[]).unwrap();
    let e = tb
        .call("hostA", &Request::Migrate { vm: "vme".into(), to: "nowhere".into(), options: Default::default() })
        .unwrap_err();
    assert!(e.to_string().contains("unknown host"), "{e}");
    let e = tb
        .call("hostA", &Request::Migrate { vm: "nope".into(), to: "hostB".into(), options: Default::default() })
        .unwrap_err();
    assert!(e.to_string().contains("no VM named"), "{e}");
    let e = tb
        .call("hostA", &Request::Migrate { vm: "vme".into(), to: "hostA".into(), options: Default::default() })
        .unwrap_err();
    assert!(e.to_string().contains("already runs"), "{e}");
}
