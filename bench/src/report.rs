//! Turns `bench/results/*.json` into the tables of `bench/README.md` (between
//! `<!-- results:NAME -->` and `<!-- /results:NAME -->` markers) and into PNG
//! plots in `bench/results/`.

use crate::plot::{line_chart, Series};
use anyhow::{bail, Result};
use serde_json::Value;
use std::fmt::Write as _;
use std::path::Path;

fn load(results: &Path, name: &str) -> Option<Value> {
    serde_json::from_str(&std::fs::read_to_string(results.join(format!("{name}.json"))).ok()?).ok()
}

fn f(v: &Value, k: &str) -> f64 {
    v[k].as_f64().unwrap_or(f64::NAN)
}

fn machine_line(v: &Value) -> String {
    let m = &v["machine"];
    format!(
        "_Measured {} on {} ({} cores); command: `{}`._\n\n",
        m["date"].as_str().unwrap_or("?"),
        m["cpu"].as_str().unwrap_or("?"),
        m["cores"],
        v["command"].as_str().unwrap_or("?")
    )
}

fn retarget(v: &Value, out: &Path) -> Result<String> {
    let rows = v["rows"].as_array().cloned().unwrap_or_default();
    let mut s = machine_line(v);
    let _ = writeln!(
        s,
        "Guest {} GiB, links {} Mbit/s (TCP goodput {:.1} MB/s).\n",
        v["guest_gib"],
        v["rate_mbit"],
        v["link_goodput_mbps"].as_array().and_then(|a| a.first()).and_then(Value::as_f64).unwrap_or(f64::NAN)
    );
    let header = "| dirty MB/s | retarget at | forward s | restart s | qemu-restart s | ideal s | forward/restart | forward/ideal | forward total s |\n|---|---|---|---|---|---|---|---|---|\n";
    let mut dirty: Vec<f64> = rows.iter().map(|r| f(r, "dirty_mbps")).collect();
    dirty.sort_by(f64::total_cmp);
    dirty.dedup();
    for &d in &dirty {
        let mut ats: Vec<f64> = rows.iter().filter(|r| f(r, "dirty_mbps") == d).map(|r| f(r, "retarget_at")).collect();
        ats.sort_by(f64::total_cmp);
        ats.dedup();
        let find = |at: f64, mode: &str| {
            rows.iter().find(|r| f(r, "dirty_mbps") == d && f(r, "retarget_at") == at && r["mode"] == mode).cloned()
        };
        let mut series: Vec<Series> = vec![];
        for mode in ["forward", "restart", "qemu-restart"] {
            let pts: Vec<(f64, f64)> = ats
                .iter()
                .filter_map(|&a| find(a, mode).map(|r| (a * 100.0, f(&r, "after_retarget_ms") / 1e3)))
                .collect();
            if !pts.is_empty() {
                series.push(Series {
                    label: format!("dcmigrate {mode}").replace("dcmigrate qemu-", "stock QEMU "),
                    points: pts,
                    thin: false,
                });
            }
        }
        let ideal: Vec<(f64, f64)> =
            ats.iter().filter_map(|&a| find(a, "forward").map(|r| (a * 100.0, f(&r, "ideal_ms") / 1e3))).collect();
        series.push(Series { label: "ideal (link model)".into(), points: ideal, thin: true });
        let _ = writeln!(s, "Guest dirtying {d} MB/s:\n");
        s += header;
        for &a in &ats {
            let (Some(fw), Some(rs)) = (find(a, "forward"), find(a, "restart")) else { continue };
            let q =
                find(a, "qemu-restart").map_or("–".into(), |r| format!("{:.1}", f(&r, "after_retarget_ms") / 1e3));
            let _ = writeln!(
                s,
                "| {d} | {:.0}% | {:.1} | {:.1} | {q} | {:.1} | {:.2} | {:.2} | {:.1} |",
                a * 100.0,
                f(&fw, "after_retarget_ms") / 1e3,
                f(&rs, "after_retarget_ms") / 1e3,
                f(&fw, "ideal_ms") / 1e3,
                f(&fw, "after_retarget_ms") / f(&rs, "after_retarget_ms"),
                f(&fw, "ratio_to_ideal"),
                f(&fw, "total_ms") / 1e3,
            );
        }
        let png = format!("retarget-dirty{d}.png");
        line_chart(
            &out.join(&png),
            &format!("Time from the retarget to the end, guest dirtying {d} MB/s"),
            "retarget when this % of RAM was at the old destination",
            "seconds after the retarget",
            &series,
        )?;
        let _ = writeln!(s, "\n![retarget, dirty {d} MB/s](results/{png})\n");
    }
    Ok(s)
}

fn downtime(v: &Value, out: &Path) -> Result<String> {
    let rows = v["rows"].as_array().cloned().unwrap_or_default();
    let mut s = machine_line(v);
    let _ = writeln!(
        s,
        "Guest {} GiB, link {} Mbit/s, downtime limit 300 ms, budget {} s.\n",
        v["guest_gib"], v["rate_mbit"], v["max_time_s"]
    );
    s += "| dirty MB/s | downtime ms | rounds | total s | switchover | final round ms | verify ms |\n|---|---|---|---|---|---|---|\n";
    for r in &rows {
        let _ = writeln!(
            s,
            "| {} | {:.0} | {} | {:.1} | {} | {:.0} | {:.0} |",
            r["dirty_mbps"],
            f(r, "downtime_ms"),
            r["rounds"],
            f(r, "total_ms") / 1e3,
            r["switchover"].as_str().unwrap_or("?"),
            f(&r["downtime"], "final_send_ms"),
            f(&r["downtime"], "verify_ms"),
        );
    }
    let pts = |k: &str| rows.iter().map(|r| (f(r, "dirty_mbps"), f(r, k))).collect::<Vec<_>>();
    let limit: Vec<(f64, f64)> = rows.iter().map(|r| (f(r, "dirty_mbps"), 300.0)).collect();
    line_chart(
        &out.join("downtime.png"),
        "Downtime against the guest's dirty rate",
        "dirty rate (MB/s)",
        "downtime (ms)",
        &[
            Series { label: "downtime".into(), points: pts("downtime_ms"), thin: false },
            Series { label: "limit".into(), points: limit, thin: true },
        ],
    )?;
    s += "\n![downtime](results/downtime.png)\n";
    Ok(s)
}

fn throughput(v: &Value, out: &Path) -> Result<String> {
    let rows = v["rows"].as_array().cloned().unwrap_or_default();
    let mut s = machine_line(v);
    let _ = writeln!(
        s,
        "tmpfs first touch {:.0} MB/s, warm {:.0} MB/s.\n",
        f(v, "first_touch_mbps"),
        f(v, "warm_touch_mbps")
    );
    s += "| streams | guest | dcmigrate MB/s | iperf3 MB/s | ratio |\n|---|---|---|---|---|\n";
    for r in &rows {
        let _ = writeln!(
            s,
            "| {} | {} GiB idle | {:.0} | {:.0} | {:.2} |",
            r["streams"],
            r["guest_gib"],
            f(r, "migration_mbps"),
            f(r, "iperf3_mbps"),
            f(r, "ratio")
        );
    }
    let pts = |k: &str| rows.iter().map(|r| (f(r, "streams"), f(r, k))).collect::<Vec<_>>();
    line_chart(
        &out.join("throughput.png"),
        "Loopback throughput, idle guest",
        "streams",
        "MB/s",
        &[
            Series { label: "dcmigrate".into(), points: pts("migration_mbps"), thin: false },
            Series { label: "iperf3 (same run)".into(), points: pts("iperf3_mbps"), thin: true },
        ],
    )?;
    s += "\n![throughput](results/throughput.png)\n";
    Ok(s)
}

fn encryption(v: &Value) -> String {
    let mut s = machine_line(v);
    let _ = writeln!(
        s,
        "Idle {} GiB guest, two agents on loopback, first round's throughput, median of {} runs each, taking turns:\n",
        v["guest_gib"], v["reps"]
    );
    s += "| streams | plain MB/s | TLS MB/s | TLS / plain |\n|---|---|---|---|\n";
    for r in v["rows"].as_array().into_iter().flatten() {
        let _ = writeln!(
            s,
            "| {} | {:.0} | {:.0} | {:.2} |",
            r["streams"],
            f(r, "plain_mbps"),
            f(r, "tls_mbps"),
            f(r, "ratio")
        );
    }
    s
}

fn scale(v: &Value) -> String {
    let mut s = machine_line(v);
    let _ = writeln!(
        s,
        "Guest {} GiB dirtying {} MB/s, tracker `{}`, three agents on this machine, retarget at 50 %: {:.1} s in all, {:.2} GiB moved.\n",
        v["guest_gib"], v["dirty_mbps"], v["tracker"].as_str().unwrap_or("?"), f(v, "total_ms") / 1e3, f(v, "gib_moved")
    );
    s += "| agent | peak anonymous memory MiB (beyond mapped RAM) | CPU s | CPU s per GiB moved |\n|---|---|---|---|\n";
    for a in v["agents"].as_array().into_iter().flatten() {
        let _ = writeln!(
            s,
            "| {} | {:.0} | {:.1} | {:.2} |",
            a["host"].as_str().unwrap_or("?"),
            f(a, "peak_anon_mib"),
            f(a, "cpu_s"),
            f(a, "cpu_s_per_gib")
        );
    }
    let _ = writeln!(
        s,
        "\nTracker cost per round (dirty sync): median {:.0} ms, max {:.0} ms ({:.0} ms per GiB of guest RAM).",
        f(v, "sync_ms_median"),
        f(v, "sync_ms_max"),
        f(v, "sync_ms_median") / f(v, "guest_gib")
    );
    s
}

fn transport(v: &Value) -> String {
    let mut s = machine_line(v);
    s += "| transport | round 0 MB/s | total s | agents' CPU s per GiB |\n|---|---|---|---|\n";
    for r in v["rows"].as_array().into_iter().flatten() {
        let _ = writeln!(
            s,
            "| {} | {:.0} | {:.1} | {:.1} |",
            r["transport_used"].as_str().unwrap_or("?"),
            f(r, "round0_mbps"),
            f(r, "total_ms") / 1e3,
            f(r, "cpu_s_per_gib")
        );
    }
    s
}

fn hugepages(v: &Value) -> String {
    let rows = v["rows"].as_array().cloned().unwrap_or_default();
    let mut s = machine_line(v);
    s += "| case | page size | round 0 MB/s | against tmpfs | total s | downtime ms | MiB on the wire | pages sent as zero | destination CPU s (user + system) |\n|---|---|---|---|---|---|---|---|---|\n";
    // The baseline: the random guest on tmpfs, same run.
    let base = rows.first();
    for r in &rows {
        let _ = writeln!(
            s,
            "| {} | {} | {:.0} | {:.2}× | {:.1} | {:.0} | {:.0} | {} | {:.2} + {:.2} |",
            r["case"].as_str().unwrap_or("?"),
            r["page_size"],
            f(r, "round0_mbps"),
            base.map_or(f64::NAN, |b| f(r, "round0_mbps") / f(b, "round0_mbps")),
            f(r, "total_ms") / 1e3,
            f(r, "downtime_ms"),
            f(r, "wire_bytes") / (1u64 << 20) as f64,
            r["zero_pages_sent"],
            f(r, "dst_user_s"),
            f(r, "dst_sys_s")
        );
    }
    s
}

fn registration(v: &Value) -> String {
    let rows = v["registration"].as_array().cloned().unwrap_or_default();
    let mut s = machine_line(v);
    s += "| RAM | pages | MiB | threads faulting it in | registration ms | ms per GiB | speed-up | against 4 KiB pages | pinned per GiB |\n|---|---|---|---|---|---|---|---|---|\n";
    let pages = |r: &Value| r["pages"].as_str().unwrap_or("4k").to_owned();
    for r in &rows {
        // The baselines: the same RAM pinned by one thread, and the same
        // RAM on 4 KiB pages, same run.
        let base = rows
            .iter()
            .find(|b| b["side"] == r["side"] && b["mib"] == r["mib"] && b["threads"] == 1 && pages(b) == pages(r));
        let small = rows.iter().find(|b| {
            b["side"] == r["side"] && b["mib"] == r["mib"] && b["threads"] == r["threads"] && pages(b) == "4k"
        });
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {:.0} | {:.0} | {:.2}× | {:.2}× | {:.2} GiB |",
            r["side"].as_str().unwrap_or("?"),
            pages(r),
            r["mib"],
            if r["threads"] == 1 { "none (pinning faults)".to_owned() } else { r["threads"].to_string() },
            f(r, "ms"),
            f(r, "ms") / (f(r, "mib") / 1024.0),
            base.map_or(f64::NAN, |b| f(b, "ms") / f(r, "ms")),
            small.map_or(f64::NAN, |b| f(b, "ms") / f(r, "ms")),
            f(r, "pinned_per_gib") / (1u64 << 30) as f64
        );
    }
    s
}

fn sizes(v: &Value, out: &Path) -> Result<String> {
    let rows = v["rows"].as_array().cloned().unwrap_or_default();
    let mut s = machine_line(v);
    let _ = writeln!(
        s,
        "Link {} Mbit/s ({:.0} MB/s of TCP payload), default options (downtime limit 300 ms, `--verify live`); every page data unless sparse.\n",
        v["rate_mbit"],
        f(v, "link_goodput_mbps")
    );
    s += "| case | guest GiB | rounds | switchover | downtime ms | verify in pause ms (blocks) | live pass ms (blocks) | tracker | sync ms per GiB | agents' memory, % of guest |\n|---|---|---|---|---|---|---|---|---|---|\n";
    let pass = |r: &Value, k: &str| {
        let p = r[k].as_array().cloned().unwrap_or_default();
        let ms: f64 = p.iter().map(|x| f(x, "ms")).sum();
        let blocks: u64 = p.iter().map(|x| x["blocks"].as_u64().unwrap_or(0)).sum();
        format!("{ms:.0} ({blocks})")
    };
    for r in &rows {
        let mem: Vec<String> = r["agent_anon_pct_of_guest"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|m| format!("{:.2}", m.as_f64().unwrap_or(0.0)))
            .collect();
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {:.0} | {} |",
            r["case"].as_str().unwrap_or("?"),
            r["guest_gib"],
            r["rounds"],
            r["switchover"].as_str().unwrap_or("?"),
            match r["downtime_ms_runs"].as_array() {
                Some(runs) => format!(
                    "{:.0} (median of {})",
                    f(r, "downtime_ms"),
                    runs.iter()
                        .map(|x| format!("{:.0}", x.as_f64().unwrap_or(f64::NAN)))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                None => format!("{:.0}", f(r, "downtime_ms")),
            },
            pass(r, "pause_passes"),
            pass(r, "live_passes"),
            r["tracker"].as_str().unwrap_or("?"),
            f(r, "sync_ms_per_gib"),
            mem.join(" / ")
        );
    }
    let series = |case: &str| -> Vec<(f64, f64)> {
        rows.iter().filter(|r| r["case"] == case).map(|r| (f(r, "guest_gib"), f(r, "downtime_ms"))).collect()
    };
    let limit: Vec<(f64, f64)> = series("idle").iter().map(|p| (p.0, 300.0)).collect();
    line_chart(
        &out.join("sizes.png"),
        "Downtime against guest size",
        "guest RAM (GiB)",
        "downtime (ms)",
        &[
            Series { label: "idle".into(), points: series("idle"), thin: false },
            Series { label: "dirty 50 MB/s".into(), points: series("dirty 50 MB/s"), thin: false },
            Series { label: "idle, hash tracker".into(), points: series("idle, hash tracker"), thin: false },
            Series { label: "limit".into(), points: limit, thin: true },
        ],
    )?;
    s += "\n![sizes](results/sizes.png)\n";
    Ok(s)
}

fn trackers(host: Option<&Value>, vm: Option<&Value>) -> String {
    let mut s = String::new();
    for (where_, v) in [("this machine", host), ("the test VM (TCG)", vm)] {
        let Some(v) = v else { continue };
        let _ = writeln!(s, "On {where_}: {}", machine_line(v).trim_end());
        s += "\n| guest GiB | read once, ms per GiB | hash sync, ms per GiB (× read) | soft-dirty sync, ms per GiB (× read) | soft-dirty freeze, ms per GiB |\n|---|---|---|---|---|\n";
        for r in v["rows"].as_array().into_iter().flatten() {
            let g = f(r, "guest_gib");
            let read = f(r, "read_floor_ms") / g;
            let sd = if r["softdirty_sync_ms"].is_null() {
                "not on this kernel".to_string()
            } else {
                format!("{:.1} ({:.2})", f(r, "softdirty_sync_ms") / g, f(r, "softdirty_sync_ms") / g / read)
            };
            let stop = if r["softdirty_stop_ms"].is_null() {
                "-".into()
            } else {
                format!("{:.1}", f(r, "softdirty_stop_ms") / g)
            };
            let _ = writeln!(
                s,
                "| {g} | {read:.0} | {:.0} ({:.2}) | {sd} | {stop} |",
                f(r, "hash_sync_ms") / g,
                f(r, "hash_sync_ms") / g / read
            );
        }
        s += "\n";
    }
    s
}

/// The `qemu`, `hash` and `soft-dirty` trackers on a booted QEMU guest.
fn qemu_trackers(host: Option<&Value>, vm: Option<&Value>) -> String {
    let mut s = String::new();
    for (where_, v) in [("this machine", host), ("the test VM (TCG)", vm)] {
        let Some(v) = v else { continue };
        let _ = writeln!(s, "On {where_}: {}", machine_line(v).trim_end());
        s += "\n| guest MiB | `qemu` sync, ms (per GiB) | guest stopped by `qemu` | `hash` sync, ms per GiB (× qemu) | `soft-dirty` sync, ms per GiB (× qemu) | guest stopped by `soft-dirty`, ms per GiB |\n|---|---|---|---|---|---|\n";
        for r in v["rows"].as_array().into_iter().flatten() {
            let m = f(r, "guest_mib");
            let g = m / 1024.0;
            let q = f(&r["qemu"], "sync_ms") / g;
            let (sd, stop) = if r["softdirty"].is_null() {
                ("not on this kernel".to_string(), "-".to_string())
            } else {
                let sd = f(&r["softdirty"], "sync_ms") / g;
                (format!("{sd:.1} ({:.0})", sd / q), format!("{:.1}", f(&r["softdirty"], "stop_ms") / g))
            };
            let h = f(&r["hash"], "sync_ms") / g;
            let qms = f(&r["qemu"], "sync_ms");
            let _ = writeln!(s, "| {m} | {qms:.2} ({q:.2}) | none | {h:.0} ({:.0}) | {sd} | {stop} |", h / q);
        }
        s += "\n";
    }
    s
}

fn evacuate(v: &Value, out: &Path) -> Result<String> {
    let mut s = format!(
        "{} guests of {} GiB dirtying {} MB/s leave hostA for hostB and hostC, two at a time, over {} Mbit/s links; hostC is drained when its first guest is half there. {}\n\n",
        v["vms"], v["guest_gib"], v["dirty_mbps"], v["rate_mbit"], machine_line(v)
    );
    s += "| drained host's migration | evacuation s | its guest elsewhere after s | sent by hostA GB | forwarded by hostC GB |\n|---|---|---|---|---|\n";
    let rows = v["rows"].as_array().cloned().unwrap_or_default();
    let gb = |r: &Value, h: &str| r["bytes_by_sender"][h].as_f64().unwrap_or(0.0) / 1e9;
    let mut series = vec![];
    for r in &rows {
        let mode = if r["mode"] == "forward" { "retargeted, forwarding" } else { "restarted (no forwarding)" };
        let _ = writeln!(
            s,
            "| {mode} | {:.1} | {:.1} | {:.2} | {:.2} |",
            f(r, "total_s"),
            f(r, "affected_s"),
            gb(r, "hostA"),
            gb(r, "hostC")
        );
        let points = r["timeline"].as_array().cloned().unwrap_or_default();
        let points = points.iter().filter_map(|p| Some((p[0].as_f64()?, p[1].as_f64()?))).collect();
        series.push(Series { label: mode.into(), points, thin: false });
    }
    let find = |m: &str| rows.iter().find(|r| r["mode"] == m);
    if let (Some(fw), Some(rs)) = (find("forward"), find("restart")) {
        let _ = writeln!(
            s,
            "\nForwarding / restart: evacuation {:.2}, the drained host's guest {:.2}.",
            f(fw, "total_s") / f(rs, "total_s"),
            f(fw, "affected_s") / f(rs, "affected_s")
        );
    }
    line_chart(
        &out.join("evacuate.png"),
        "Evacuation: RAM landed at the destinations",
        "seconds since the evacuation started",
        "GiB at destinations (current pages)",
        &series,
    )?;
    s += "\n![evacuation](results/evacuate.png)\n";
    Ok(s)
}

/// Rewrites the marked sections of bench/README.md and draws the plots.
pub fn update(bench_dir: &Path) -> Result<()> {
    let results = bench_dir.join("results");
    let readme_path = bench_dir.join("README.md");
    let mut readme = std::fs::read_to_string(&readme_path)?;
    let mut sections: Vec<(&str, String)> = vec![];
    if let Some(v) = load(&results, "retarget") {
        sections.push(("retarget", retarget(&v, &results)?));
    }
    if let Some(v) = load(&results, "downtime") {
        sections.push(("downtime", downtime(&v, &results)?));
    }
    if let Some(v) = load(&results, "evacuate") {
        sections.push(("evacuate", evacuate(&v, &results)?));
    }
    if let Some(v) = load(&results, "throughput") {
        sections.push(("throughput", throughput(&v, &results)?));
    }
    if let Some(v) = load(&results, "encryption") {
        sections.push(("encryption", encryption(&v)));
    }
    if let Some(v) = load(&results, "scale") {
        sections.push(("scale", scale(&v)));
    }
    if let Some(v) = load(&results, "sizes") {
        sections.push(("sizes", sizes(&v, &results)?));
    }
    if let Some(v) = load(&results, "hugepages") {
        sections.push(("hugepages", hugepages(&v)));
    }
    let (th, tv) = (load(&results, "trackers"), load(&results, "trackers-vm"));
    if th.is_some() || tv.is_some() {
        sections.push(("trackers", trackers(th.as_ref(), tv.as_ref())));
    }
    let (qh, qv) = (load(&results, "qemu-trackers"), load(&results, "qemu-trackers-vm"));
    if qh.is_some() || qv.is_some() {
        sections.push(("qemu-trackers", qemu_trackers(qh.as_ref(), qv.as_ref())));
    }
    if let Some(v) = load(&results, "transport") {
        sections.push(("transport", transport(&v)));
        sections.push(("registration", registration(&v)));
    }
    for (name, body) in sections {
        let (open, close) = (format!("<!-- results:{name} -->"), format!("<!-- /results:{name} -->"));
        let (Some(a), Some(b)) = (readme.find(&open), readme.find(&close)) else {
            bail!("bench/README.md lacks the {open} … {close} markers");
        };
        readme.replace_range(a + open.len()..b, &format!("\n{body}\n"));
    }
    std::fs::write(&readme_path, readme)?;
    Ok(())
}
