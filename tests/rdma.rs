//! Migrations over the RDMA data plane. They need an RDMA device: outside
//! `tests/softroce/run` (SoftRoCE in a VM) they skip with the reason; in that
//! VM a missing device is a failure.

mod common;

use common::*;
use dcmigrate::engine::{MigrateOptions, Outcome, Report, TransportUsed};
use dcmigrate::protocol::{DataPlane, TransportKind};
use dcmigrate::testbed::Testbed;

fn rdma_or_skip(test: &str) -> bool {
    let rdma = dcmigrate::transport::rdma::open(None).map(|_| ());
    can_run(test, rdma, true, "tests/softroce/run runs it on SoftRoCE")
}

fn transports(report: &Report) -> Vec<(String, String, DataPlane)> {
    report.senders.iter().map(|s| (s.from.clone(), s.to.clone(), s.transport)).collect()
}

/// Source and forwarder both write over RDMA into the new destination's
/// registered RAM; the result is byte-identical at switchover.
#[test]
fn retarget_over_rdma_is_byte_exact() {
    const T: &str = "retarget_over_rdma_is_byte_exact";
    if !rdma_or_skip(T) || !hooks_or_skip(T) {
        return;
    }
    let mut tb = testbed(&["A", "B", "C"]);
    tb.start_guest("A", "r1", 96 * MIB, &workload(10.0), true, &[]).unwrap();
    let opts = MigrateOptions {
        transport: TransportKind::Rdma,
        suspend: true,
        streams: 2,
        max_bandwidth_mbps: Some(40.0),
        ..Default::default()
    };
    start_migration(&tb, "A", "r1", "B", held(opts));
    assert!(retarget_when(&tb, "A", "r1", "C", 0.4, true), "migration ended before the retarget");
    release(&tb, "A", "r1");
    let report = wait_report(&tb, "A", "r1");
    assert_eq!(report.result, Outcome::Completed, "{report:#?}\n{}", tb.logs());
    assert_eq!(report.transport, TransportUsed::Rdma, "{report:#?}");
    let t = transports(&report);
    for pair in [("A", "B"), ("A", "C"), ("B", "C")] {
        assert!(
            t.iter().any(|(f, to, k)| (f.as_str(), to.as_str()) == pair && *k == DataPlane::Rdma),
            "{pair:?} over RDMA: {t:?}"
        );
    }
    assert!(report.bytes_by_sender.get("B").copied().unwrap_or(0) > 0, "B forwarded: {report:#?}");
    assert_same_bytes(&ram_file(&tb, "A", "r1"), &ram_file(&tb, "C", "r1"));
    tb.client("C").resume("r1").unwrap();
    assert_running_on(&tb, "C", "r1");
    std::fs::remove_file(ram_file(&tb, "A", "r1")).unwrap();
}

/// `auto` (the default) picks RDMA when both ends have it.
#[test]
fn auto_picks_rdma_when_both_ends_can() {
    const T: &str = "auto_picks_rdma_when_both_ends_can";
    if !rdma_or_skip(T) {
        return;
    }
    let mut tb = testbed(&["A", "B"]);
    tb.start_guest("A", "r2", 32 * MIB, &workload(5.0), false, &[]).unwrap();
    let report = migrate(&tb, "A", "r2", "B", MigrateOptions::default());
    assert_eq!(report.result, Outcome::Completed, "{report:#?}\n{}", tb.logs());
    assert_eq!(report.transport, TransportUsed::Rdma, "{report:#?}");
    assert_running_on(&tb, "B", "r2");
}

/// Where RDMA is impossible, `--transport rdma` fails with the reason and
/// the VM keeps running on the source; `auto` falls back to TCP.
#[test]
fn rdma_required_but_impossible_fails_clearly() {
    let mut tb = Testbed::start_with_env(exe(), &["A", "B"], &[("DCMIGRATE_NO_RDMA", "true")]).unwrap();
    tb.start_guest("A", "r3", 16 * MIB, &workload(5.0), false, &[]).unwrap();
    let opts = MigrateOptions { transport: TransportKind::Rdma, ..Default::default() };
    let report = migrate(&tb, "A", "r3", "B", opts);
    assert_eq!(report.result, Outcome::Failed, "{report:#?}");
    let e = report.error.as_deref().unwrap();
    assert!(e.contains("--transport rdma") && e.contains("disabled"), "{e}");
    assert_eq!(report.vm_runs_on.as_deref(), Some("A"));
    assert_running_on(&tb, "A", "r3");
    let report = migrate(&tb, "A", "r3", "B", MigrateOptions::default());
    assert_eq!(report.result, Outcome::Completed, "{report:#?}");
    assert_eq!(report.transport, TransportUsed::Tcp);
}
