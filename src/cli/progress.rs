//! Following a migration from the CLI: a progress bar on a terminal, and
//! the final report for people or (with `--json`) machines.

use crate::agent::api::{self, Request};
use anyhow::Result;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::Value;
use std::io::IsTerminal;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Polls the agent until the VM's migration ends; returns its report.
/// Ctrl-C cancels the migration (the VM keeps running on the source).
pub fn follow(api_path: &Path, vm: &str, quiet: bool) -> Result<Value> {
    follow_with(api_path, vm, quiet, |_| None)
}

/// Like [`follow`]; `hook` sees every status entry and may return a line to
/// print above the progress bar (the demo retargets from it).
pub fn follow_with(
    api_path: &Path,
    vm: &str,
    quiet: bool,
    mut hook: impl FnMut(&Value) -> Option<String>,
) -> Result<Value> {
    let interrupted = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGINT, interrupted.clone())?;
    let bar = (!quiet && std::io::stderr().is_terminal()).then(|| {
        let b = ProgressBar::new(0);
        b.set_style(
            ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bar:32.cyan/blue} {bytes}/{total_bytes} {msg}",
            )
            .expect("template")
            .progress_chars("=> "),
        );
        b
    });
    let mut last_phase = String::new();
    let mut last_target = String::new();
    let mut cancel_sent = false;
    loop {
        if interrupted.load(Ordering::SeqCst) && !cancel_sent {
            eprintln!("interrupted: cancelling the migration of {vm}");
            let _ = api::call(api_path, &Request::Cancel { vm: vm.into() });
            cancel_sent = true;
        }
        let v = api::call(api_path, &Request::Status { vm: Some(vm.into()) })?;
        let m = &v["migrations"][0];
        if let Some(line) = hook(m) {
            if !quiet {
                match &bar {
                    Some(b) => b.println(line),
                    None => eprintln!("{line}"),
                }
            }
        }
        let p = &m["progress"];
        let phase = p["phase"].as_str().unwrap_or("").to_owned();
        match &bar {
            Some(b) => {
                b.set_length(p["ram_bytes"].as_u64().unwrap_or(0));
                b.set_position(p["at_destination_bytes"].as_u64().unwrap_or(0));
                let eta = p["eta_s"].as_f64().map(|e| format!(" eta {e:.1}s")).unwrap_or_default();
                b.set_message(format!(
                    "to {} | {phase} | {:.0} MB/s | dirty {:.0} MB/s{eta}",
                    p["target"].as_str().unwrap_or("?"),
                    p["rate_mbps"].as_f64().unwrap_or(0.0),
                    p["dirty_rate_mbps"].as_f64().unwrap_or(0.0)
                ));
                b.tick();
            }
            None if !quiet && (phase != last_phase || p["target"].as_str() != Some(last_target.as_str())) => {
                eprintln!(
                    "[{:>7.2}s] {phase} to {}: {} of {} MB at destination, {:.0} MB/s",
                    p["elapsed_ms"].as_f64().unwrap_or(0.0) / 1e3,
                    p["target"].as_str().unwrap_or("?"),
                    p["at_destination_bytes"].as_u64().unwrap_or(0) / 1_000_000,
                    p["ram_bytes"].as_u64().unwrap_or(0) / 1_000_000,
                    p["rate_mbps"].as_f64().unwrap_or(0.0)
                );
            }
            None => {}
        }
        last_phase = phase;
        last_target = p["target"].as_str().unwrap_or("").to_owned();
        if m["done"] == Value::Bool(true) {
            if let Some(b) = bar {
                b.finish_and_clear();
            }
            return Ok(m["report"].clone());
        }
        std::thread::sleep(Duration::from_millis(150));
    }
}

pub fn exit_code(report: &Value) -> i32 {
    if report["result"] == "completed" {
        0
    } else {
        1
    }
}

fn mb(v: &Value) -> f64 {
    v.as_f64().unwrap_or(0.0) / 1e6
}

pub fn print_report(r: &Value, json: bool) {
    if json {
        println!("{}", serde_json::to_string_pretty(r).expect("json"));
        return;
    }
    let s = |k: &str| r[k].as_str().unwrap_or("?").to_owned();
    println!(
        "Migration of {} from {} to {}: {} in {:.2} s",
        s("vm"),
        s("source"),
        s("destination"),
        s("result"),
        r["total_ms"].as_f64().unwrap_or(0.0) / 1e3
    );
    if let Some(e) = r["error"].as_str() {
        println!("  error: {e}");
    }
    if let Some(d) = r["downtime_ms"].as_f64() {
        let p = &r["downtime"];
        let f = |k: &str| p[k].as_f64().unwrap_or(0.0);
        println!(
            "  downtime {d:.1} ms (pause {:.1}, final sync {:.1}, final send {:.1}, verify {:.1}, device state {:.1}, resume {:.1})",
            f("pause_ms"), f("final_sync_ms"), f("final_send_ms"), f("verify_ms"), f("device_state_ms"), f("resume_ms")
        );
    }
    let rounds = r["rounds"].as_array().map(Vec::len).unwrap_or(0);
    println!(
        "  {rounds} rounds, switchover {}, tracker {}, transport {} x{}",
        r["switchover"].as_str().unwrap_or("none"),
        r["tracker"].as_str().unwrap_or("none"),
        s("transport"),
        r["streams"]
    );
    for t in r["retargets"].as_array().into_iter().flatten() {
        let after: Vec<String> = t["bytes_after"]
            .as_object()
            .map(|m| m.iter().map(|(h, b)| format!("{h} {:.1} MB", mb(b))).collect())
            .unwrap_or_default();
        println!(
            "  retarget at {:.2} s: {} -> {} ({}; {:.1} MB were at {}), sent after it: {}",
            t["at_ms"].as_f64().unwrap_or(0.0) / 1e3,
            t["from"].as_str().unwrap_or("?"),
            t["to"].as_str().unwrap_or("?"),
            if t["forwarding"] == true { "old destination forwarded" } else { "old destination dropped" },
            mb(&t["at_old_destination_bytes"]),
            t["from"].as_str().unwrap_or("?"),
            after.join(", ")
        );
    }
    if let Some(ms) = r["after_retarget_ms"].as_f64() {
        println!("  {:.2} s from the last retarget to the end", ms / 1e3);
    }
    if let Some(by) = r["bytes_by_sender"].as_object() {
        let parts: Vec<String> = by.iter().map(|(h, b)| format!("{h} {:.1} MB", mb(b))).collect();
        println!("  sent: {} (RAM {:.1} MB)", parts.join(", "), mb(&r["ram_bytes"]));
    }
    if r["verified"] == Value::Bool(true) {
        println!(
            "  verified: RAM identical at switchover ({} mismatching chunks resent)",
            r["verify_mismatched_chunks"]
        );
    }
    if let Some(h) = r["vm_runs_on"].as_str() {
        println!("  the VM runs on {h}");
    }
}

pub fn print_status(migrations: &Value) {
    let list = migrations.as_array().cloned().unwrap_or_default();
    if list.is_empty() {
        println!("no migrations");
    }
    for m in list {
        let p = &m["progress"];
        println!(
            "{} -> {}: {} ({} of {} MB at destination, {:.0} MB/s)",
            m["vm"].as_str().unwrap_or("?"),
            m["to"].as_str().unwrap_or("?"),
            p["phase"].as_str().unwrap_or("?"),
            p["at_destination_bytes"].as_u64().unwrap_or(0) / 1_000_000,
            p["ram_bytes"].as_u64().unwrap_or(0) / 1_000_000,
            p["rate_mbps"].as_f64().unwrap_or(0.0)
        );
        if m["report"].is_object() {
            print_report(&m["report"], false);
        }
    }
}
