//! TCP against RDMA on this machine's RDMA device (SoftRoCE inside the test
//! VM, see bench/transport-in-vm).

use crate::harness::*;
use anyhow::{bail, Result};
use dcmigrate::agent::api::Request;
use dcmigrate::engine::MigrateOptions;
use dcmigrate::testbed::Testbed;
use dcmigrate::vm::synthetic::{Pattern, Workload};
use serde_json::{json, Value};

pub fn transport(guest_mib: u64, streams: usize) -> Result<Value> {
    use dcmigrate::protocol::TransportKind;
    let exe = exe()?;
    let mut tb = Testbed::start(&exe, &["hostA", "hostB"])?;
    let idle = Workload { dirty_rate_mbps: 0.0, hot_fraction: 1.0, pattern: Pattern::Random, seed: 5 };
    // No holes: every page travels.
    tb.start_guest("hostA", "t", guest_mib << 20, &idle, false, &["--zero-every", "0"])?;
    let mut rows = vec![];
    let mut from = ("hostA", "hostB");
    for (kind, name) in [
        (TransportKind::Tcp, "tcp"),
        (TransportKind::Rdma, "rdma"),
        (TransportKind::Tcp, "tcp"),
        (TransportKind::Rdma, "rdma"),
    ] {
        let cpu0 = agents_cpu_s();
        let opts = MigrateOptions {
            transport: kind,
            streams,
            verify: dcmigrate::engine::options::VerifyMode::Off,
            ..Default::default()
        };
        tb.call(from.0, &Request::Migrate { vm: "t".into(), to: from.1.into(), options: opts })?;
        let r = tb.call(from.0, &Request::Wait { vm: "t".into() })?["report"].clone();
        if r["result"] != "completed" {
            bail!("{name} migration failed: {r}");
        }
        let cpu = agents_cpu_s() - cpu0;
        let round0 = &r["rounds"][0];
        let mbps = round0["bytes"].as_f64().unwrap_or(0.0) / round0["ms"].as_f64().unwrap_or(1.0) / 1e3;
        let gib = r["bytes_by_sender"][from.0].as_f64().unwrap_or(0.0) / (1u64 << 30) as f64;
        eprintln!(
            "{name}: {mbps:.0} MB/s, {:.0} ms in all, agents' CPU {cpu:.2} s ({:.2} s/GiB)",
            r["total_ms"].as_f64().unwrap_or(0.0),
            cpu / gib.max(1e-9)
        );
        rows.push(
            json!({"transport": name, "transport_used": r["transport"], "streams": streams, "guest_mib": guest_mib,
            "round0_mbps": mbps, "total_ms": r["total_ms"], "agents_cpu_s": cpu, "cpu_s_per_gib": cpu / gib.max(1e-9)}),
        );
        from = (from.1, from.0);
    }
    #[cfg(feature = "rdma")]
    let registration = crate::registration::registration(&[256, 1024])?;
    #[cfg(not(feature = "rdma"))]
    let registration: Vec<Value> = vec![];
    Ok(json!({"rows": rows, "registration": registration, "machine": machine(), "command": "bench/transport-in-vm"}))
}
