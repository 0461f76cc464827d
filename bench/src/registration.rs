//! Registering guest RAM for RDMA (inside the SoftRoCE VM, run with the
//! `transport` benchmark): pinned by one thread as it faults pages in
//! (the baseline) against faulted in on every core first, for a
//! destination's fresh RAM and for a sender's resident RAM, on 4 KiB
//! (tmpfs) and 2 MiB (hugetlbfs) pages; and how much memory ends up
//! pinned per GiB.

use anyhow::{anyhow, Result};
use dcmigrate::memory::{GuestRam, Layout, RegionSpec};
use dcmigrate::transport::rdma::{self, RdmaOptions};
use serde_json::{json, Value};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

fn ram(mib: u64, filled: bool, huge: Option<&Path>) -> Result<(tempfile::TempDir, Arc<GuestRam>)> {
    let dir = match huge {
        Some(h) => tempfile::tempdir_in(h)?,
        None => tempfile::tempdir_in("/dev/shm")?,
    };
    let layout = Layout::new(vec![RegionSpec { id: "pc.ram".into(), size: mib << 20 }], 2 << 20)?;
    let ram = GuestRam::create(layout, &[dir.path().join("ram")])?;
    if filled {
        let block = vec![0x5au8; 1 << 20];
        for off in (0..mib << 20).step_by(block.len()) {
            ram.write_at(0, off, &block)?;
        }
    }
    Ok((dir, Arc::new(ram)))
}

/// Rows of (pages, side, MiB, threads, ms, pinned bytes per GiB).
pub fn registration(sizes_mib: &[u64]) -> Result<Vec<Value>> {
    let baseline = rdma::pinned_now();
    let mut rows = vec![];
    for &mib in sizes_mib {
        rows.extend(registration_of(mib, None, baseline)?);
        // The same RAM on huge pages, where the kernel gives them.
        let pool = dcmigrate::testbed::huge::HugePool::new(mib / 2)
            .and_then(|mut p| p.mount("registration", None).map(|m| (p, m)));
        match pool {
            // The pool is given back (unmounted) when `_pool` goes.
            Ok((_pool, mount)) => rows.extend(registration_of(mib, Some(&mount), baseline)?),
            Err(e) => eprintln!("register on 2 MiB pages: skipped: {e}"),
        }
    }
    Ok(rows)
}

fn registration_of(mib: u64, huge: Option<&Path>, baseline: u64) -> Result<Vec<Value>> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let pages = if huge.is_some() { "2M" } else { "4k" };
    let mut rows = vec![];
    for side in ["destination", "sender"] {
        for threads in [1, cores] {
            let opts = RdmaOptions { register_threads: Some(threads), ..Default::default() };
            let dev = rdma::open(&opts).map_err(|e| anyhow!("no RDMA device: {e}"))?;
            // The last RAM's huge pages come back once it is unmapped
            // (by a thread of its own): wait for them.
            if huge.is_some() {
                for _ in 0..600 {
                    if dcmigrate::memory::backing::pool_room(2 << 20).unwrap_or(0) >= mib << 20 {
                        break;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
            }
            let (_dir, ram) = ram(mib, side == "sender", huge)?;
            // The last registration is unpinned by a thread of its own: wait for it.
            for _ in 0..600 {
                if rdma::pinned_now() <= baseline {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            let before = rdma::pinned_now();
            let t = Instant::now();
            let held: Box<dyn std::any::Any> = if side == "destination" {
                Box::new(dev.register_target(&ram, true).map_err(|e| anyhow!(e))?)
            } else {
                Box::new(dev.register_sender(&ram).map_err(|e| anyhow!(e))?)
            };
            let ms = t.elapsed().as_secs_f64() * 1e3;
            let per_gib = rdma::pinned_now().saturating_sub(before) as f64 / (mib as f64 / 1024.0);
            drop(held);
            eprintln!(
                    "register {side} {mib} MiB on {pages} pages, {threads} thread(s): {ms:.0} ms, pinned {per_gib:.0} B/GiB"
                );
            rows.push(json!({"pages": pages, "side": side, "mib": mib, "threads": threads, "ms": ms,
                    "pinned_per_gib": per_gib}));
        }
    }
    Ok(rows)
}
