//! Scenario: evacuating a host (`dcmigrate evacuate`) of several guests
//! over shaped links in network namespaces, two migrations at a time, with
//! one of the two destinations drained half-way through its first
//! migration. Compared, same run: the drained host's migration retargeted
//! with forwarding (what `drain` does) against restarted elsewhere (a
//! retarget without forwarding: the source sends everything again, as
//! tools without retarget do after a cancel).

use crate::harness::*;
use anyhow::{bail, Result};
use dcmigrate::agent::api::Request;
use dcmigrate::agent::evacuate::{EvacuationStatus, Stage};
use dcmigrate::engine::{MigrateOptions, Report};
use dcmigrate::testbed::net::{cleanup_stale, Net};
use dcmigrate::testbed::Testbed;
use dcmigrate::vm::synthetic::{Pattern, Workload};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

const HOSTS: [&str; 3] = ["hostA", "hostB", "hostC"];

/// How one evacuation went.
struct Run {
    total_s: f64,
    /// When the drained host's VM was running elsewhere.
    affected_s: f64,
    /// Payload bytes each host sent, over every attempt.
    bytes: std::collections::BTreeMap<String, u64>,
    /// (seconds, GiB landed at destinations).
    timeline: Vec<(f64, f64)>,
}

fn status(tb: &Testbed) -> Result<EvacuationStatus> {
    Ok(serde_json::from_value(tb.call("hostA", &Request::Evacuation { id: None, cancel: false })?)?)
}

fn add_bytes(into: &mut std::collections::BTreeMap<String, u64>, r: &Report) {
    for (h, b) in &r.bytes_by_sender {
        *into.entry(h.clone()).or_default() += b;
    }
}

/// Evacuates hostA; drains hostC once its first VM is half there. With
/// `restart`, that VM's migration is first moved to hostB without
/// forwarding (hostC's copy dropped), so the drain finds nothing to move.
fn evacuate_once(vms: usize, size: u64, dirty_mbps: f64, rate_mbit: u64, restart: bool) -> Result<Run> {
    let net = Net::create("v", &HOSTS, rate_mbit, None)?;
    let mut tb = Testbed::start_net(&exe()?, net)?;
    for i in 0..vms {
        let w = Workload { dirty_rate_mbps: dirty_mbps, hot_fraction: 1.0, pattern: Pattern::Random, seed: i as u64 };
        tb.start_guest("hostA", &format!("v{i}"), size, &w, false, &["--zero-every", "0"])?;
    }
    let to = vec!["hostB".to_string(), "hostC".to_string()];
    let t0 = Instant::now();
    tb.call("hostA", &Request::Evacuate { to, max_parallel: 2, options: MigrateOptions::default() })?;
    let (mut affected, mut affected_s, mut bytes) = (None::<String>, None, Default::default());
    let mut timeline = vec![];
    let end = loop {
        let s = status(&tb)?;
        let t = t0.elapsed().as_secs_f64();
        let landed: u64 =
            s.vms.iter().map(|v| if v.stage == Stage::Completed { v.ram_bytes } else { v.at_destination_bytes }).sum();
        timeline.push((t, landed as f64 / (1u64 << 30) as f64));
        if affected.is_none() {
            let half = s.vms.iter().find(|v| {
                v.stage == Stage::Migrating
                    && v.destination.as_deref() == Some("hostC")
                    && v.at_destination_bytes * 2 >= v.ram_bytes
            });
            if let Some(v) = half {
                if restart {
                    let r = Request::Retarget { vm: v.vm.clone(), to: "hostB".into(), forward: false };
                    tb.call("hostA", &r)?;
                }
                tb.call("hostC", &Request::Drain)?;
                eprintln!("{t:.1} s: hostC drained with {} half there", v.vm);
                affected = Some(v.vm.clone());
            }
        }
        if let Some(vm) = &affected {
            let moved = s.vms.iter().any(|v| &v.vm == vm && v.stage == Stage::Completed);
            if moved && affected_s.is_none() {
                affected_s = Some(t);
            }
        }
        if s.done {
            break s;
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    if let Some(v) = end.vms.iter().find(|v| v.stage != Stage::Completed) {
        bail!("{} did not move: {:?}", v.vm, v.error);
    }
    let Some(affected_s) = affected_s else { bail!("hostC was never drained: no VM went there") };
    for v in &end.vms {
        let m = tb.call("hostA", &Request::Wait { vm: v.vm.clone() })?;
        add_bytes(&mut bytes, &serde_json::from_value(m["report"].clone())?);
        tb.stop_vm("hostB", &v.vm);
    }
    Ok(Run { total_s: end.elapsed_ms / 1e3, affected_s, bytes, timeline })
}

/// The scenario: both modes, one after the other, on fresh namespaces.
pub fn evacuate(vms: usize, guest_gib: f64, rate_mbit: u64, dirty_mbps: f64) -> Result<Value> {
    cleanup_stale("v");
    let size = ((guest_gib * (1u64 << 30) as f64) as u64) & !((2 << 20) - 1);
    let mut rows = vec![];
    for (mode, restart) in [("forward", false), ("restart", true)] {
        let r = evacuate_once(vms, size, dirty_mbps, rate_mbit, restart)?;
        eprintln!("{mode}: all {vms} moved in {:.1} s, the drained host's VM in {:.1} s", r.total_s, r.affected_s);
        rows.push(json!({
            "mode": mode, "total_s": r.total_s, "affected_s": r.affected_s,
            "bytes_by_sender": r.bytes, "timeline": r.timeline,
        }));
    }
    Ok(json!({"rows": rows, "vms": vms, "guest_gib": guest_gib, "rate_mbit": rate_mbit, "dirty_mbps": dirty_mbps}))
}
