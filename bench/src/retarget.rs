//! Scenario 1: retarget (forwarding) against cancel-and-restart and stock
//! QEMU on shaped links between network namespaces, with the link model's
//! ideal.

use crate::harness::*;
use anyhow::{bail, Result};
use dcmigrate::agent::api::Request;
use dcmigrate::engine::MigrateOptions;
use dcmigrate::memory::{GuestRam, Layout, RegionSpec, DEFAULT_CHUNK_SIZE, PAGE_SIZE};
use dcmigrate::testbed::net::{cleanup_stale, Net};
use dcmigrate::testbed::Testbed;
use dcmigrate::vm::synthetic::{Pattern, Workload};
use serde_json::{json, Value};
use std::path::Path;

/// Ideal time from the retarget to the end (no switchover costs), in ms.
/// Each sender is limited by its egress rate `l`, the guest dirties `d`;
/// `data` bytes must reach the new destination, `held` of them are current
/// at the old one. Forwarding: the source alone must send what only it has,
/// and both together send everything: max((data-held)/(l-d), data/(2l-d)).
/// Restart: the source sends everything: data/(l-d).
pub fn ideal_ms(forward: bool, data: f64, held: f64, l: f64, d: f64) -> f64 {
    let s = if forward { ((data - held).max(0.0) / (l - d)).max(data / (2.0 * l - d)) } else { data / (l - d) };
    s * 1e3
}

/// One point of the scenario: where and how the retarget happens.
struct Point {
    vm: String,
    at: f64,
    forward: bool,
    dirty_mbps: f64,
    size: u64,
    /// The link's TCP goodput, bytes per second.
    link: f64,
}

/// Migrates one guest A→B, retargets to C at `p.at`, and returns its row.
fn run_point(tb: &mut Testbed, p: &Point, seed: u64) -> Result<Value> {
    let vm = p.vm.clone();
    let w = Workload { dirty_rate_mbps: p.dirty_mbps, hot_fraction: 1.0, pattern: Pattern::Random, seed };
    // No holes: "x % of RAM reached the old destination" then means x % of
    // the bytes that must travel.
    tb.start_guest("hostA", &vm, p.size, &w, false, &["--zero-every", "0"])?;
    // Bytes that must travel: RAM less the holes the engine skips.
    let src = tb.host("hostA").data_dir.join(format!("{vm}-ram0.ram"));
    let layout = Layout::new(vec![RegionSpec { id: "ram0".into(), size: p.size }], DEFAULT_CHUNK_SIZE)?;
    let data = GuestRam::open(layout, &[src])?.data_pages()?.count() as f64 * PAGE_SIZE as f64;
    let zero = p.size as f64 - data;
    tb.call("hostA", &Request::Migrate { vm: vm.clone(), to: "hostB".into(), options: MigrateOptions::default() })?;
    let reached = dcmigrate::testbed::wait_for(600, || {
        let v = tb.call("hostA", &Request::Status { vm: Some(vm.clone()) }).ok()?;
        let m = &v["migrations"][0];
        if m["done"] == true {
            return Some(Err(m["report"].to_string()));
        }
        (m["progress"]["at_destination_bytes"].as_f64()? >= p.at * p.size as f64).then_some(Ok(()))
    });
    match reached {
        Some(Ok(())) => {}
        Some(Err(r)) => bail!("{vm} ended before the retarget point: {r}"),
        None => bail!("{vm} never reached {}", p.at),
    }
    tb.call("hostA", &Request::Retarget { vm: vm.clone(), to: "hostC".into(), forward: p.forward })?;
    let r = tb.call("hostA", &Request::Wait { vm: vm.clone() })?["report"].clone();
    if r["result"] != "completed" {
        bail!("{vm}: {r}");
    }
    let at_old = r["retargets"][0]["at_old_destination_bytes"].as_f64().unwrap_or(0.0);
    let held = (at_old - zero).max(0.0);
    let ideal = ideal_ms(p.forward, data, held, p.link, p.dirty_mbps * 1e6);
    let after = r["after_retarget_ms"].as_f64().unwrap_or(0.0);
    let mode = if p.forward { "forward" } else { "restart" };
    eprintln!(
        "dirty {} MB/s, retarget at {}: {mode} {after:.0} ms after retarget (ideal {ideal:.0}), total {:.0} ms",
        p.dirty_mbps,
        p.at,
        r["total_ms"].as_f64().unwrap_or(0.0)
    );
    // The VM now runs on hostC: stop it there.
    tb.stop_vm("hostC", &vm);
    Ok(json!({
        "retarget_at": p.at, "at_old_destination": at_old / p.size as f64, "dirty_mbps": p.dirty_mbps, "mode": mode,
        "after_retarget_ms": after, "total_ms": r["total_ms"], "ideal_ms": ideal,
        "ratio_to_ideal": after / ideal, "downtime_ms": r["downtime_ms"],
        "bytes_after": r["retargets"][0]["bytes_after"], "guest_bytes": p.size, "data_bytes": data,
    }))
}

/// Stock QEMU, an idle guest of the same size full of data, the same links:
/// cancel at each point and restart towards the new destination.
fn qemu_rows(rate_mbit: u64, at: &[f64], size: u64, link: f64) -> Result<Vec<Value>> {
    let net = Net::create("b", &["hostA", "hostB", "hostC"], rate_mbit, None)?;
    let dir = Path::new("/dev/shm/dcmigrate-bench-qemu");
    std::fs::create_dir_all(dir)?;
    let mut rows = vec![];
    for &f in at {
        let (after, total) = crate::qemu::restart(&net.hosts, dir, size, f)?;
        let ideal = ideal_ms(true, size as f64, f * size as f64, link, 0.0);
        eprintln!("stock QEMU, cancel at {f} and restart: {after:.0} ms after the cancel (ideal with forwarding {ideal:.0}), total {total:.0} ms");
        rows.push(json!({
            "retarget_at": f, "dirty_mbps": 0.0, "mode": "qemu-restart", "after_retarget_ms": after,
            "total_ms": total, "ideal_ms": ideal, "ratio_to_ideal": after / ideal, "guest_bytes": size,
        }));
    }
    let _ = std::fs::remove_dir_all(dir);
    Ok(rows)
}

/// The scenario: every dirty rate, retarget point and mode.
pub fn retarget(guest_gib: f64, rate_mbit: u64, at: &[f64], dirty: &[f64], with_qemu: bool) -> Result<Value> {
    let exe = exe()?;
    cleanup_stale("b");
    let mut signals = signal_hook::iterator::Signals::new([signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM])?;
    std::thread::spawn(move || {
        if signals.forever().next().is_some() {
            kill_strays();
            cleanup_stale("b");
            std::process::exit(130);
        }
    });
    ensure_iperf3()?;
    let size = ((guest_gib * (1u64 << 30) as f64) as u64) & !((2 << 20) - 1);
    let (mut rows, mut goodputs, mut n) = (vec![], vec![], 0);
    for &d in dirty {
        let net = Net::create("b", &["hostA", "hostB", "hostC"], rate_mbit, None)?;
        // The link model's rate: TCP payload over one shaped egress, measured
        // now (headers take ~5 % of the nominal rate).
        let (a, c) = (&net.hosts[0], &net.hosts[2]);
        let l = iperf3_between(&["ip", "netns", "exec", &a.ns], &["ip", "netns", "exec", &c.ns], &c.ip.to_string(), 4)?
            * 1e6;
        eprintln!("shaped link: {:.1} MB/s of TCP payload ({rate_mbit} Mbit/s nominal)", l / 1e6);
        goodputs.push(l / 1e6);
        let mut tb = Testbed::start_net(&exe, net)?;
        for &f in at {
            for forward in [true, false] {
                n += 1;
                let p = Point { vm: format!("g{n}"), at: f, forward, dirty_mbps: d, size, link: l };
                rows.push(run_point(&mut tb, &p, n)?);
            }
        }
    }
    if with_qemu && dcmigrate::testbed::qemu::qemu_available() {
        let l = goodputs.first().copied().unwrap_or(f64::NAN) * 1e6;
        rows.extend(qemu_rows(rate_mbit, at, size, l)?);
    } else if with_qemu {
        eprintln!("qemu-system-x86_64 not installed: no stock-QEMU rows");
    }
    Ok(json!({"rows": rows, "rate_mbit": rate_mbit, "guest_gib": guest_gib, "link_goodput_mbps": goodputs}))
}
