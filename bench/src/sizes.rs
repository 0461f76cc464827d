//! Scenario 5: what grows with the guest's size. Guests of 1, 2, 4 and
//! 8 GiB (every page data; idle, and dirtying 50 MB/s; and idle with the
//! hash tracker) migrate over a shaped link with default options: downtime,
//! rounds, switchover, verification per pass, tracker cost per round, and
//! the agents' memory beyond the mapped RAM. Then a sparse 64 GiB guest
//! (almost all holes) shows the costs that grow with RAM rather than data.

use crate::harness::*;
use anyhow::{bail, Result};
use dcmigrate::engine::MigrateOptions;
use dcmigrate::testbed::net::{cleanup_stale, Net};
use dcmigrate::testbed::Testbed;
use dcmigrate::vm::synthetic::{Pattern, Workload};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// Peak anonymous memory (MiB) of the agents while `f` runs.
fn peak_anon<T>(tb: &Testbed, f: impl FnOnce() -> Result<T>) -> Result<(T, Vec<f64>)> {
    let pids: Vec<u32> = tb.hosts.iter().map(|h| agent_pid(&h.api).unwrap_or(0)).collect();
    let peaks = Arc::new(Mutex::new(vec![0.0f64; pids.len()]));
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (peaks, stop) = (peaks.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                for (i, p) in pids.iter().enumerate() {
                    let m = anon_mib(*p);
                    let mut pk = peaks.lock().unwrap();
                    pk[i] = pk[i].max(m);
                }
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        })
    };
    let r = f();
    stop.store(true, Ordering::Relaxed);
    let _ = sampler.join();
    let peaks = peaks.lock().unwrap().clone();
    Ok((r?, peaks))
}

/// What one migration's report says about sizes.
fn row(r: &Value, case: &str, size: u64, mem: &[f64], extra: Value) -> Value {
    let rounds = r["rounds"].as_array().cloned().unwrap_or_default();
    // Tracker cost per round: the syncs after pre-copy rounds (not the final one).
    let syncs: Vec<f64> =
        rounds.iter().take(rounds.len().saturating_sub(1)).filter_map(|x| x["sync_ms"].as_f64()).collect();
    let passes = r["verification"]["passes"].as_array().cloned().unwrap_or_default();
    let pass = |when: &str| passes.iter().filter(|p| p["when"] == when).cloned().collect::<Vec<_>>();
    let gib = size as f64 / (1u64 << 30) as f64;
    let mem_pct: Vec<f64> = mem.iter().map(|m| m / (gib * 1024.0) * 100.0).collect();
    json!({
        "case": case, "guest_bytes": size, "guest_gib": gib, "rounds": rounds.len(),
        "switchover": r["switchover"], "downtime_ms": r["downtime_ms"], "verify_ms": r["downtime"]["verify_ms"],
        "final_send_ms": r["downtime"]["final_send_ms"], "total_ms": r["total_ms"],
        "live_passes": pass("live"), "pause_passes": pass("pause"),
        "tracker": r["tracker"], "sync_ms_median": median(syncs.clone()),
        "sync_ms_per_gib": median(syncs) / gib, "tracker_misses": r["verification"]["tracker_misses"],
        "agent_anon_mib": mem, "agent_anon_pct_of_guest": mem_pct, "extra": extra,
    })
}

/// The scenario. `sizes` in GiB; the link shaped to `rate_mbit`.
pub fn sizes(sizes: &[u64], rate_mbit: u64, sparse_gib: u64) -> Result<Value> {
    let exe = exe()?;
    ensure_iperf3()?;
    cleanup_stale("s");
    let mut signals = signal_hook::iterator::Signals::new([signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM])?;
    std::thread::spawn(move || {
        if signals.forever().next().is_some() {
            kill_strays();
            cleanup_stale("s");
            std::process::exit(130);
        }
    });
    let net = Net::create("s", &["hostA", "hostB"], rate_mbit, None)?;
    let (a, b) = (&net.hosts[0], &net.hosts[1]);
    let goodput =
        iperf3_between(&["ip", "netns", "exec", &a.ns], &["ip", "netns", "exec", &b.ns], &b.ip.to_string(), 4)?;
    eprintln!("shaped link: {goodput:.1} MB/s of TCP payload");
    let mut tb = Testbed::start_net(&exe, net)?;
    let cases: [(&str, f64, &[&str]); 3] =
        [("idle", 0.0, &[]), ("dirty 50 MB/s", 50.0, &[]), ("idle, hash tracker", 0.0, &["--no-dirty-log"])];
    let mut rows = vec![];
    let mut n = 0;
    for &(case, dirty, extra) in &cases {
        for &gib in sizes {
            n += 1;
            let vm = format!("s{n}");
            // Fresh agents: each case's peak memory is its own.
            tb.restart_agent("hostA", &[])?;
            tb.restart_agent("hostB", &[])?;
            let w = Workload { dirty_rate_mbps: dirty, hot_fraction: 1.0, pattern: Pattern::Random, seed: n };
            let mut args = vec!["--zero-every", "0"];
            args.extend_from_slice(extra);
            tb.start_guest("hostA", &vm, gib << 30, &w, false, &args)?;
            let (r, mem) = peak_anon(&tb, || migrate(&tb, "hostA", &vm, "hostB", MigrateOptions::default()))?;
            let mut row = row(&r, case, gib << 30, &mem, json!({}));
            let mut on = "hostB";
            if case == "idle" {
                // Single-digit milliseconds jitter by a few: the median of
                // three (back to hostA and out again) is what is compared.
                let mut runs = vec![row["downtime_ms"].as_f64().unwrap_or(f64::NAN)];
                // What a source leaves behind (its RAM file) goes first: two
                // copies of an 8 GiB guest and a third incoming do not fit.
                let left = |host: &str| tb.host(host).data_dir.join(format!("{vm}-ram0.ram"));
                for (from, to) in [("hostB", "hostA"), ("hostA", "hostB")] {
                    let _ = std::fs::remove_file(left(to));
                    // The source that just handed the guest over frees its
                    // RAM once it has quit: wait for the room.
                    wait_for_room(&tb.host(to).data_dir, gib << 30)?;
                    let again = migrate(&tb, from, &vm, to, MigrateOptions::default())?;
                    runs.push(again["downtime_ms"].as_f64().unwrap_or(f64::NAN));
                    on = to;
                }
                row["downtime_ms_runs"] = json!(runs);
                row["downtime_ms"] = json!(median(runs));
            }
            eprintln!(
                "{case}, {gib} GiB: downtime {:.0} ms ({} rounds, {}), pause {}, sync {:.1} ms/GiB, agents {:?} MiB",
                row["downtime_ms"].as_f64().unwrap_or(f64::NAN),
                row["rounds"],
                row["switchover"],
                r["downtime"],
                row["sync_ms_per_gib"].as_f64().unwrap_or(f64::NAN),
                mem
            );
            rows.push(row);
            tb.stop_vm(on, &vm);
        }
    }
    if sparse_gib > 0 {
        rows.push(sparse(&mut tb, sparse_gib)?);
    }
    Ok(json!({"rows": rows, "rate_mbit": rate_mbit, "link_goodput_mbps": goodput}))
}

/// Waits (up to a minute) until `dir`'s file system has `bytes` free.
fn wait_for_room(dir: &std::path::Path, bytes: u64) -> Result<()> {
    let free = || {
        let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).ok()?;
        // SAFETY: statvfs writes into the zeroed struct we own; the path is NUL-terminated.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        (unsafe { libc::statvfs(c.as_ptr(), &mut st) } == 0).then(|| st.f_bavail as u64 * st.f_frsize as u64)
    };
    let start = std::time::Instant::now();
    loop {
        let f = free().unwrap_or(0);
        if f >= bytes + (64 << 20) {
            return Ok(());
        }
        if start.elapsed() > std::time::Duration::from_secs(60) {
            bail!("{} has {f} bytes free after a minute; {bytes} needed", dir.display());
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// A guest of `gib` GiB that is almost all holes: a hot 1 % written at 10 MB/s.
fn sparse(tb: &mut Testbed, gib: u64) -> Result<Value> {
    tb.restart_agent("hostA", &[])?;
    tb.restart_agent("hostB", &[])?;
    let w = Workload { dirty_rate_mbps: 10.0, hot_fraction: 0.01, pattern: Pattern::Random, seed: 99 };
    // Every page a hole at start ("--zero-every 1"); the workload writes some.
    tb.start_guest("hostA", "sparse", gib << 30, &w, false, &["--zero-every", "1"])?;
    let (r, mem) = peak_anon(tb, || migrate(tb, "hostA", "sparse", "hostB", MigrateOptions::default()))?;
    if r["result"] != "completed" {
        bail!("sparse guest: {r}");
    }
    let extra = json!({"zero_pages_skipped": r["zero_pages_skipped"], "bytes_sent": r["bytes_by_sender"]});
    let row = row(&r, "sparse", gib << 30, &mem, extra);
    eprintln!("sparse {gib} GiB: {row}");
    tb.stop_vm("hostB", "sparse");
    Ok(row)
}
