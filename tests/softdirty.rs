//! The soft-dirty tracker, end to end. It needs a kernel with
//! CONFIG_MEM_SOFT_DIRTY; where the kernel lacks it these tests skip with the
//! reason, and `tests/run` runs them again inside a VM booting Debian's
//! kernel (`tests/vm/run`), where skipping is a failure.

mod common;

use common::*;
use dcmigrate::dirty::softdirty;
use dcmigrate::dirty::TrackerKind;
use dcmigrate::engine::{MigrateOptions, Outcome};

fn soft_dirty_or_skip(test: &str) -> bool {
    can_run(test, softdirty::self_test().map_err(|e| e.to_string()), true, "tests/vm/run runs this on Debian's kernel")
}

/// Soft-dirty alone (no verification pass to repair a miss) must leave the
/// destination byte-identical, with the guest writing throughout.
#[test]
fn soft_dirty_without_verification_is_exact() {
    const T: &str = "soft_dirty_without_verification_is_exact";
    if !soft_dirty_or_skip(T) {
        return;
    }
    let mut tb = testbed(&["hostA", "hostB"]);
    tb.start_guest("hostA", "sd", 128 * MIB, &workload(20.0), true, &[]).unwrap();
    let opts = MigrateOptions {
        suspend: true,
        verify: dcmigrate::engine::options::VerifyMode::Off,
        tracker: Some(TrackerKind::SoftDirty),
        streams: 2,
        ..Default::default()
    };
    let report = migrate(&tb, "hostA", "sd", "hostB", opts);
    assert_eq!(report.result, Outcome::Completed, "{report:#?}\n{}", tb.logs());
    assert_eq!(report.tracker, Some(TrackerKind::SoftDirty));
    assert!(report.rounds.iter().skip(1).any(|r| r.pages > 0), "later rounds resent dirtied pages: {report:#?}");
    assert_same_bytes(&ram_file(&tb, "hostA", "sd"), &ram_file(&tb, "hostB", "sd"));
    std::fs::remove_file(ram_file(&tb, "hostA", "sd")).unwrap();
}

/// Offered by default where it works: after the guest's own log, before hash.
#[test]
fn soft_dirty_is_offered_where_the_kernel_has_it() {
    const T: &str = "soft_dirty_is_offered_where_the_kernel_has_it";
    if !soft_dirty_or_skip(T) {
        return;
    }
    let mut tb = testbed(&["hostA", "hostB"]);
    // No cooperative log: the guest is told not to keep one.
    tb.start_guest("hostA", "sd2", 32 * MIB, &workload(5.0), false, &["--no-dirty-log"]).unwrap();
    let report = migrate(&tb, "hostA", "sd2", "hostB", MigrateOptions::default());
    assert_eq!(report.result, Outcome::Completed, "{report:#?}\n{}", tb.logs());
    assert_eq!(report.tracker, Some(TrackerKind::SoftDirty), "{report:#?}");
}
