//! Scenario 3: downtime, rounds and total time at rising dirty rates on a
//! shaped link.

use crate::harness::*;
use anyhow::Result;
use dcmigrate::engine::MigrateOptions;
use dcmigrate::testbed::Testbed;
use dcmigrate::vm::synthetic::{Pattern, Workload};
use serde_json::{json, Value};

pub fn downtime(guest_gib: f64, rate_mbit: u64, dirty: &[f64], max_time_s: u64) -> Result<Value> {
    use dcmigrate::testbed::net::{cleanup_stale, Net};
    let exe = exe()?;
    ensure_iperf3()?;
    cleanup_stale("d");
    let size = ((guest_gib * (1u64 << 30) as f64) as u64) & !((2 << 20) - 1);
    let net = Net::create("d", &["hostA", "hostB"], rate_mbit, None)?;
    let (a, b) = (&net.hosts[0], &net.hosts[1]);
    let goodput =
        iperf3_between(&["ip", "netns", "exec", &a.ns], &["ip", "netns", "exec", &b.ns], &b.ip.to_string(), 4)?;
    eprintln!("shaped link: {goodput:.1} MB/s of TCP payload");
    let mut tb = Testbed::start_net(&exe, net)?;
    let mut rows = vec![];
    for (i, &d) in dirty.iter().enumerate() {
        let vm = format!("d{i}");
        let w = Workload { dirty_rate_mbps: d, hot_fraction: 1.0, pattern: Pattern::Random, seed: i as u64 };
        tb.start_guest("hostA", &vm, size, &w, false, &["--zero-every", "0"])?;
        let options = MigrateOptions { max_time_s, ..Default::default() };
        let r = migrate(&tb, "hostA", &vm, "hostB", options)?;
        let f = |k: &str| r[k].as_f64().unwrap_or(0.0);
        eprintln!(
            "dirty {d} MB/s: downtime {:.0} ms, {} rounds, total {:.1} s, {}",
            f("downtime_ms"),
            r["rounds"].as_array().map_or(0, Vec::len),
            f("total_ms") / 1e3,
            r["switchover"].as_str().unwrap_or("?")
        );
        rows.push(json!({
            "dirty_mbps": d, "downtime_ms": r["downtime_ms"], "downtime": r["downtime"], "total_ms": r["total_ms"],
            "rounds": r["rounds"].as_array().map_or(0, Vec::len), "switchover": r["switchover"],
            "limit_ms": 300, "link_goodput_mbps": goodput,
        }));
        tb.stop_vm("hostB", &vm);
    }
    Ok(json!({"rows": rows, "guest_gib": guest_gib, "rate_mbit": rate_mbit, "max_time_s": max_time_s}))
}
