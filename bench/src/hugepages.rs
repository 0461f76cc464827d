//! Huge pages and zero pages, on loopback (as root): the same guest
//! migrated with its RAM on tmpfs (the baseline) and on 2 MiB hugetlbfs
//! pages at both ends, same run: round-0 rate, downtime, total time, and
//! the destination agent's kernel time (allocating and faulting in its
//! pages); then a guest whose pages are zero by content except every 16th,
//! against the random one: bytes on the wire and time.

use crate::harness::*;
use anyhow::{anyhow, bail, Result};
use dcmigrate::engine::MigrateOptions;
use dcmigrate::testbed::huge::HugePool;
use dcmigrate::testbed::Testbed;
use dcmigrate::vm::synthetic::{Pattern, Workload};
use serde_json::{json, Value};
use std::path::Path;

/// User and system CPU seconds of a process so far.
fn cpu_split(pid: u32) -> (f64, f64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let f: Vec<&str> = stat.rsplit_once(')').map(|(_, r)| r.split_whitespace().collect()).unwrap_or_default();
    let t = |i: usize| f.get(i - 3).and_then(|x| x.parse::<f64>().ok()).unwrap_or(0.0) / 100.0;
    (t(14), t(15))
}

/// One case: a guest of `gib` on hostA (its RAM file at `ram`, if given)
/// migrated to hostB; the report's numbers and the destination's CPU.
fn case(tb: &mut Testbed, name: &str, gib: u64, ram: Option<&Path>, extra: &[&str]) -> Result<Value> {
    let idle = Workload { dirty_rate_mbps: 0.0, hot_fraction: 1.0, pattern: Pattern::Random, seed: 7 };
    let vm = name.replace([' ', ','], "-");
    let ram_arg = ram.map(|p| p.join(format!("{vm}.ram")).display().to_string());
    let mut args = vec!["--zero-every", "0"];
    if let Some(r) = &ram_arg {
        args.extend(["--ram-file", r.as_str()]);
    }
    args.extend_from_slice(extra);
    tb.start_guest("hostA", &vm, gib << 30, &idle, false, &args)?;
    let dst = agent_pid(&tb.host("hostB").api).ok_or_else(|| anyhow!("no agent on hostB"))?;
    let (u0, s0) = cpu_split(dst);
    let opts = MigrateOptions { transport: dcmigrate::protocol::TransportKind::Tcp, ..Default::default() };
    let r = migrate(tb, "hostA", &vm, "hostB", opts)?;
    let (u1, s1) = cpu_split(dst);
    if r["result"] != "completed" {
        bail!("{name}: {r}");
    }
    let round0 = &r["rounds"][0];
    let mbps = round0["bytes"].as_f64().unwrap_or(0.0) / round0["ms"].as_f64().unwrap_or(1.0) / 1e3;
    let wire: f64 = r["bytes_by_sender"].as_object().map_or(0.0, |m| m.values().filter_map(Value::as_f64).sum());
    let row = json!({
        "case": name, "guest_gib": gib, "page_size": r["ram"][0]["page_size"],
        "round0_ms": round0["ms"], "round0_mbps": mbps, "total_ms": r["total_ms"], "downtime_ms": r["downtime_ms"],
        "wire_bytes": wire, "zero_pages_sent": r["zero_pages_sent"],
        "dst_user_s": u1 - u0, "dst_sys_s": s1 - s0,
    });
    eprintln!(
        "{name}: round 0 {mbps:.0} MB/s, total {:.1} s, downtime {:.0} ms, {:.0} MiB on the wire, destination \
         CPU {:.2} s user + {:.2} s system",
        r["total_ms"].as_f64().unwrap_or(0.0) / 1e3,
        r["downtime_ms"].as_f64().unwrap_or(f64::NAN),
        wire / (1u64 << 20) as f64,
        u1 - u0,
        s1 - s0
    );
    tb.stop_vm("hostB", &vm);
    // Its RAM goes now: the next case needs the room.
    let _ = std::fs::remove_file(tb.host("hostB").data_dir.join(format!("{vm}-ram0.ram")));
    Ok(row)
}

/// The scenario (root): a `gib` guest on tmpfs, zero by content, and on
/// 2 MiB pages (the pool reserved only then: both copies on tmpfs and
/// both on huge pages would not fit together).
pub fn hugepages(gib: u64) -> Result<Value> {
    let exe = exe()?;
    let mut tb = Testbed::start(&exe, &["hostA", "hostB"])?;
    let mut rows = vec![
        case(&mut tb, "tmpfs, random", gib, None, &[])?,
        case(&mut tb, "tmpfs, zero but every 16th page", gib, None, &["--data-every", "16"])?,
    ];
    // The source's and the destination's copy on huge pages, and slack.
    let mut pool = HugePool::new(2 * gib * 512 + 16)?;
    let (ma, mb) = (pool.mount("a", None)?, pool.mount("b", None)?);
    tb.add_hugepages("hostB", &mb);
    tb.restart_agent("hostB", &[])?;
    rows.insert(1, case(&mut tb, "2 MiB pages, random", gib, Some(&ma), &[])?);
    // The agents and guests go before the mounts.
    drop(tb);
    drop(pool);
    Ok(json!({"rows": rows, "link": "loopback"}))
}
