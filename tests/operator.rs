//! An operator's commands on a running migration, through the agent's API
//! as the CLI uses it: `set` (rate cap, downtime limit), `force-complete`,
//! and `watch` (the event stream).

mod common;

use common::*;
use dcmigrate::engine::report::Switchover;
use dcmigrate::engine::{MigrateOptions, Outcome, Steering};
use dcmigrate::testbed::wait_for;
use dcmigrate::vm::synthetic::Workload;

/// [`common::never_converging`], the VM left paused where it lands.
fn never_converging() -> MigrateOptions {
    MigrateOptions { suspend: true, ..common::never_converging() }
}

fn hot_guest(tb: &mut dcmigrate::testbed::Testbed, vm: &str) {
    // 1 MiB hot (of 64 MiB) at 30 MB/s: every round finds most of it dirty.
    let w = Workload { hot_fraction: 1.0 / 64.0, ..workload(30.0) };
    tb.start_guest("hostA", vm, 64 * MIB, &w, true, &[]).unwrap();
}

fn wait_round(tb: &dcmigrate::testbed::Testbed, vm: &str, n: u32) -> u32 {
    let r = wait_for(120, || progress(tb, "hostA", vm).filter(|p| p.0 >= n || p.2).map(|p| p.0));
    r.unwrap_or_else(|| panic!("{vm} never reached round {n}"))
}

/// MB/s over rounds, from their bytes and times.
fn rate(rounds: &[dcmigrate::engine::report::RoundReport]) -> f64 {
    let bytes: u64 = rounds.iter().map(|r| r.bytes).sum();
    let ms: f64 = rounds.iter().map(|r| r.ms).sum();
    bytes as f64 / 1e6 / (ms / 1e3).max(1e-3)
}

#[test]
fn set_caps_the_rate_and_force_complete_switches_over() {
    let mut tb = testbed(&["hostA", "hostB"]);
    hot_guest(&mut tb, "vm1");
    start_migration(&tb, "hostA", "vm1", "hostB", never_converging());
    wait_round(&tb, "vm1", 2);

    let cap = Steering { max_bandwidth_mbps: Some(2.0), ..Default::default() };
    tb.client("hostA").steer("vm1", cap).expect("set accepted");
    // The round under way when the cap came mixes both rates; the ones
    // after it start under the cap.
    let first_capped = progress(&tb, "hostA", "vm1").unwrap().0 + 1;
    wait_round(&tb, "vm1", first_capped + 3);
    let done = Steering { force_complete: true, ..Default::default() };
    tb.client("hostA").steer("vm1", done).expect("force-complete accepted");
    let report = wait_report(&tb, "hostA", "vm1");

    assert_eq!(report.result, Outcome::Completed, "{report:#?}\n{}", tb.logs());
    assert_eq!(report.switchover, Some(Switchover::Requested), "{report:#?}");
    assert_eq!(report.steering.len(), 2, "{:?}", report.steering);
    // The pacer never lets the source ahead of the cap (one batch of
    // slack at each round's start): capped rounds stay near 2 MB/s, where
    // the first round ran at the first cap, 40 MB/s.
    let live: Vec<_> = report.rounds.iter().filter(|r| r.round < report.rounds.len() as u32 - 1).cloned().collect();
    let before = rate(&live[..1]);
    let after = rate(&live[first_capped as usize..]);
    println!("round 0 {before:.1} MB/s; rounds {first_capped}.. under the 2 MB/s cap: {after:.2} MB/s");
    assert!(after <= 3.0, "capped rounds ran at {after:.2} MB/s: {:#?}", &live[first_capped as usize..]);
    assert!(before > 3.0 * after, "round 0 at {before:.1} MB/s, capped ones at {after:.2}");
    assert_same_bytes(&ram_file(&tb, "hostA", "vm1"), &ram_file(&tb, "hostB", "vm1"));
}

#[test]
fn a_larger_downtime_limit_set_while_running_lets_it_converge() {
    let mut tb = testbed(&["hostA", "hostB"]);
    hot_guest(&mut tb, "vm2");
    start_migration(&tb, "hostA", "vm2", "hostB", never_converging());
    wait_round(&tb, "vm2", 3);
    let limit = Steering { downtime_ms: Some(60_000), ..Default::default() };
    tb.client("hostA").steer("vm2", limit).expect("set accepted");
    let report = wait_report(&tb, "hostA", "vm2");
    assert_eq!(report.result, Outcome::Completed, "{report:#?}\n{}", tb.logs());
    assert_eq!(report.switchover, Some(Switchover::Converged), "{report:#?}");
    assert!(report.steering[0].starts_with("downtime_ms=60000"), "{:?}", report.steering);
    assert_same_bytes(&ram_file(&tb, "hostA", "vm2"), &ram_file(&tb, "hostB", "vm2"));
}

#[test]
fn steering_what_cannot_be_steered_is_refused() {
    let mut tb = testbed(&["hostA", "hostB"]);
    hot_guest(&mut tb, "vm3");
    let c = tb.client("hostA");
    let s = |b: Option<f64>, d: Option<u64>| Steering { max_bandwidth_mbps: b, downtime_ms: d, force_complete: false };
    let e = c.steer("vm3", s(Some(5.0), None)).unwrap_err();
    assert!(e.to_string().contains("no migration"), "{e}");
    start_migration(&tb, "hostA", "vm3", "hostB", held(never_converging()));
    for (bad, why) in [
        (s(None, None), "nothing to change"),
        (s(Some(-1.0), None), "at least 0.1"),
        (s(None, Some(0)), "downtime_ms must be"),
        (s(None, Some(10_000_000)), "downtime_ms must be"),
    ] {
        let e = c.steer("vm3", bad.clone()).unwrap_err();
        assert!(e.to_string().contains(why), "{bad:?}: {e}");
    }
    // Lifting a cap is allowed.
    c.steer("vm3", s(Some(0.0), None)).expect("0 lifts the cap");
    c.cancel("vm3").expect("cancel");
    let e = c.steer("vm3", s(Some(5.0), None)).unwrap_err();
    assert!(e.to_string().contains("already finished"), "{e}");
}

#[test]
fn watch_streams_a_migrations_events_in_order() {
    let mut tb = testbed(&["hostA", "hostB"]);
    hot_guest(&mut tb, "vm4");
    // Subscribed before the migration starts: nothing is missed.
    let mut w = tb.client("hostA").watch(Some("vm4")).expect("watch");
    start_migration(&tb, "hostA", "vm4", "hostB", never_converging());
    wait_round(&tb, "vm4", 3);
    let done = Steering { force_complete: true, ..Default::default() };
    tb.client("hostA").steer("vm4", done).expect("force-complete");
    let report = wait_report(&tb, "hostA", "vm4");
    assert_eq!(report.result, Outcome::Completed, "{report:#?}");

    // The stream ends after the migration's end.
    let mut events = vec![];
    while let Some(e) = w.next_value().expect("event") {
        events.push(e);
    }
    let kinds: Vec<&str> = events.iter().map(|e| e["event"].as_str().unwrap_or("?")).collect();
    println!("{kinds:?}");
    assert_eq!(kinds.first(), Some(&"started"), "{kinds:?}");
    assert_eq!(kinds.last(), Some(&"ended"), "{kinds:?}");
    assert_eq!(events.last().unwrap()["result"], "completed");
    let id = events[0]["migration"].clone();
    assert!(events.iter().all(|e| e["vm"] == "vm4" && e["migration"] == id), "{events:?}");
    let phases: Vec<&str> =
        events.iter().filter(|e| e["event"] == "phase").map(|e| e["phase"].as_str().unwrap()).collect();
    assert_eq!(phases, ["precopy", "paused", "committing", "resume_sent"], "{kinds:?}");
    let rounds: Vec<u64> =
        events.iter().filter(|e| e["event"] == "round").map(|e| e["round"].as_u64().unwrap()).collect();
    assert!(rounds.len() >= 3 && rounds.windows(2).all(|w| w[1] == w[0] + 1), "rounds {rounds:?}");
    assert!(kinds.contains(&"steered"), "{kinds:?}");
    // Progress never runs backwards, though the guest keeps re-dirtying.
    let pct: Vec<f64> =
        events.iter().filter(|e| e["event"] == "progress").map(|e| e["percent"].as_f64().unwrap()).collect();
    assert!(!pct.is_empty() && pct.windows(2).all(|w| w[1] >= w[0]), "progress {pct:?}");
    let ts: Vec<u64> = events.iter().map(|e| e["ts_ms"].as_u64().unwrap()).collect();
    assert!(ts.windows(2).all(|w| w[1] >= w[0]), "timestamps {ts:?}");

    // Watching a migration that already ended gets its end at once; a VM
    // without a migration is refused rather than watched forever.
    let mut late = tb.client("hostA").watch(Some("vm4")).expect("watch after the end");
    let e = late.next_value().unwrap().expect("the end");
    assert_eq!((e["event"].as_str(), e["result"].as_str()), (Some("ended"), Some("completed")), "{e}");
    assert!(late.next_value().unwrap().is_none(), "the stream ends after the end");
    let err = tb.client("hostA").watch(Some("nosuchvm")).err().expect("refused");
    assert!(err.to_string().contains("no migration"), "{err}");
}
