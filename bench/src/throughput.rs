//! Scenario 2: loopback throughput of an idle guest with 1, 2 and 4 streams,
//! against iperf3 and first-touch memory in the same run.

use crate::harness::*;
use anyhow::Result;
use dcmigrate::engine::MigrateOptions;
use dcmigrate::testbed::Testbed;
use dcmigrate::vm::synthetic::{Pattern, Workload};
use serde_json::{json, Value};

pub fn throughput(guest_gib: u64) -> Result<Value> {
    ensure_iperf3()?;
    let exe = exe()?;
    let first_touch = touch_memory(2 * guest_gib + 1)?;
    let warm_touch = touch_memory(2 * guest_gib + 1)?;
    eprintln!("tmpfs write rate: first touch {first_touch:.0} MB/s, warm {warm_touch:.0} MB/s");
    let mut rows = vec![];
    let mut tb = Testbed::start(&exe, &["hostA", "hostB"])?;
    let idle = Workload { dirty_rate_mbps: 0.0, hot_fraction: 1.0, pattern: Pattern::Random, seed: 3 };
    tb.start_guest("hostA", "idle", guest_gib << 30, &idle, false, &["--zero-every", "0"])?;
    let mut hosts = ("hostA", "hostB");
    for streams in [1usize, 2, 4] {
        let baseline = iperf3(streams)?;
        let r = migrate(&tb, hosts.0, "idle", hosts.1, MigrateOptions { streams, ..Default::default() })?;
        let round0 = &r["rounds"][0];
        let mbps = round0["bytes"].as_f64().unwrap() / (round0["ms"].as_f64().unwrap() / 1e3) / 1e6;
        eprintln!("idle {guest_gib} GiB, {streams} streams: {mbps:.0} MB/s vs iperf3 {baseline:.0} MB/s");
        rows.push(json!({"streams": streams, "guest_gib": guest_gib, "migration_mbps": mbps, "iperf3_mbps": baseline,
                         "ratio": mbps / baseline, "total_ms": r["total_ms"], "downtime_ms": r["downtime_ms"]}));
        hosts = (hosts.1, hosts.0);
    }
    Ok(json!({"rows": rows, "first_touch_mbps": first_touch, "warm_touch_mbps": warm_touch}))
}
