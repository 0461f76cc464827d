//! Scenario: what encrypting the TCP data plane costs. The same idle guest
//! migrates between two agents on loopback with TLS data streams (the
//! default) and between two agents with `--data-encryption off`, taking
//! turns in the same run; the number is the ratio of the first round's
//! throughput (encrypted / plain, medians). Goal: at least 0.8.

use crate::harness::*;
use anyhow::Result;
use dcmigrate::engine::MigrateOptions;
use dcmigrate::testbed::Testbed;
use dcmigrate::vm::synthetic::{Pattern, Workload};
use serde_json::{json, Value};

pub fn encryption(guest_gib: u64, reps: usize) -> Result<Value> {
    let exe = exe()?;
    // Both test beds hold a source and a destination copy at once.
    let warm = touch_memory(4 * guest_gib + 1)?;
    eprintln!("tmpfs write rate after warming: {warm:.0} MB/s");
    let plain = Testbed::start_with_env(&exe, &["hostA", "hostB"], &[("DCMIGRATE_DATA_ENCRYPTION", "off")])?;
    let tls = Testbed::start(&exe, &["hostA", "hostB"])?;
    let idle = Workload { dirty_rate_mbps: 0.0, hot_fraction: 1.0, pattern: Pattern::Random, seed: 5 };
    let mut beds = [("plain", plain, ("hostA", "hostB")), ("tls", tls, ("hostA", "hostB"))];
    for (_, tb, _) in beds.iter_mut() {
        tb.start_guest("hostA", "idle", guest_gib << 30, &idle, false, &["--zero-every", "0"])?;
    }
    let mut rows = vec![];
    for streams in [1usize, 4] {
        let mut rates: [Vec<f64>; 2] = [vec![], vec![]];
        for rep in 0..reps {
            for (i, (label, tb, hosts)) in beds.iter_mut().enumerate() {
                let r = migrate(tb, hosts.0, "idle", hosts.1, MigrateOptions { streams, ..Default::default() })?;
                let round0 = &r["rounds"][0];
                let mbps = round0["bytes"].as_f64().unwrap_or(0.0) / (round0["ms"].as_f64().unwrap_or(1.0) / 1e3) / 1e6;
                eprintln!("{label}, {streams} streams, run {}: {mbps:.0} MB/s", rep + 1);
                rates[i].push(mbps);
                *hosts = (hosts.1, hosts.0);
            }
        }
        let (p, t) = (median(rates[0].clone()), median(rates[1].clone()));
        eprintln!("{streams} streams: plain {p:.0} MB/s, TLS {t:.0} MB/s, ratio {:.2}", t / p);
        rows.push(json!({"streams": streams, "plain_mbps": p, "tls_mbps": t, "ratio": t / p,
                         "plain_runs": rates[0], "tls_runs": rates[1]}));
    }
    Ok(json!({"guest_gib": guest_gib, "reps": reps, "rows": rows, "warm_touch_mbps": warm}))
}
