//! Scenario 4: a large guest, three agents on this machine, a retarget at 50
//! %: agents' memory beyond the mapped RAM, CPU per GiB, tracker cost per
//! round.

use crate::harness::*;
use anyhow::{bail, Result};
use dcmigrate::agent::api::Request;
use dcmigrate::engine::MigrateOptions;
use dcmigrate::testbed::Testbed;
use dcmigrate::vm::synthetic::{Pattern, Workload};
use serde_json::{json, Value};
use std::process::Command;

pub fn scale(guest_gib: u64, dirty_mbps: f64) -> Result<Value> {
    let exe = exe()?;
    let free = Command::new("df").args(["-B1", "--output=avail", "/dev/shm"]).output()?;
    let avail: u64 =
        String::from_utf8_lossy(&free.stdout).lines().nth(1).and_then(|l| l.trim().parse().ok()).unwrap_or(0);
    if avail < (guest_gib << 30) * 5 / 2 {
        bail!(
            "/dev/shm has {} GiB free; a {guest_gib} GiB guest with three hosts needs about {} GiB",
            avail >> 30,
            guest_gib * 5 / 2
        );
    }
    let mut tb = Testbed::start(&exe, &["hostA", "hostB", "hostC"])?;
    let w = Workload { dirty_rate_mbps: dirty_mbps, hot_fraction: 1.0, pattern: Pattern::Random, seed: 11 };
    // No dirty log: the general-purpose hash tracker, as for a QEMU guest here.
    tb.start_guest("hostA", "big", guest_gib << 30, &w, false, &["--zero-every", "0", "--no-dirty-log"])?;
    let pids: Vec<(String, u32)> = tb.hosts.iter().map(|h| (h.name.clone(), agent_pid(&h.api).unwrap_or(0))).collect();
    let cpu0: Vec<f64> = pids.iter().map(|(_, p)| cpu_s(*p)).collect();
    let peaks = std::sync::Arc::new(std::sync::Mutex::new(vec![0.0f64; pids.len()]));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let (peaks, stop, pids) = (peaks.clone(), stop.clone(), pids.clone());
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for (i, (_, p)) in pids.iter().enumerate() {
                    let m = anon_mib(*p);
                    let mut pk = peaks.lock().unwrap();
                    pk[i] = pk[i].max(m);
                }
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
        })
    };
    tb.call("hostA", &Request::Migrate { vm: "big".into(), to: "hostB".into(), options: MigrateOptions::default() })?;
    let reached = dcmigrate::testbed::wait_for(900, || {
        let v = tb.call("hostA", &Request::Status { vm: Some("big".into()) }).ok()?;
        let m = &v["migrations"][0];
        (m["done"] == true || m["progress"]["at_destination_bytes"].as_f64()? >= 0.5 * (guest_gib << 30) as f64)
            .then_some(())
    });
    if reached.is_some() {
        let _ = tb.call("hostA", &Request::Retarget { vm: "big".into(), to: "hostC".into(), forward: true });
    }
    let r = tb.call("hostA", &Request::Wait { vm: "big".into() })?["report"].clone();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = sampler.join();
    if r["result"] != "completed" {
        bail!("scale migration failed: {r}");
    }
    let moved: f64 = r["bytes_by_sender"].as_object().map_or(0.0, |m| m.values().filter_map(Value::as_f64).sum());
    let gib = moved / (1u64 << 30) as f64;
    let peaks = peaks.lock().unwrap().clone();
    let agents: Vec<Value> = pids
        .iter()
        .enumerate()
        .map(|(i, (h, p))| {
            let cpu = cpu_s(*p) - cpu0[i];
            json!({"host": h, "peak_anon_mib": peaks[i], "cpu_s": cpu, "cpu_s_per_gib": cpu / gib.max(1e-9)})
        })
        .collect();
    let syncs: Vec<f64> = r["rounds"].as_array().into_iter().flatten().filter_map(|x| x["sync_ms"].as_f64()).collect();
    let max_sync = syncs.iter().cloned().fold(0.0, f64::max);
    eprintln!("scale: {gib:.2} GiB moved, agents {agents:?}, sync median {:.0} ms", median(syncs.clone()));
    tb.stop_vm("hostC", "big");
    Ok(json!({"guest_gib": guest_gib, "dirty_mbps": dirty_mbps, "tracker": r["tracker"], "total_ms": r["total_ms"],
              "gib_moved": gib, "agents": agents, "sync_ms_median": median(syncs), "sync_ms_max": max_sync,
              "rounds": r["rounds"].as_array().map_or(0, Vec::len), "retargeted": reached.is_some()}))
}
