//! Migrations over the RDMA data plane. They need an RDMA device: outside
//! `tests/softroce/run` (SoftRoCE in a VM) they skip with the reason; in that
//! VM a missing device is a failure.

mod common;

use common::*;
use dcmigrate::agent::api::RdmaInfo;
use dcmigrate::engine::{MigrateOptions, Outcome, Report, TransportUsed};
use dcmigrate::protocol::{DataPlane, TransportKind};
use dcmigrate::testbed::{wait_for, Testbed};
use dcmigrate::vm::synthetic::{Pattern, Workload};

fn rdma_or_skip(test: &str) -> bool {
    let rdma = dcmigrate::transport::rdma::open(&Default::default()).map(|_| ());
    can_run(test, rdma, true, "tests/softroce/run runs it on SoftRoCE")
}

fn transports(report: &Report) -> Vec<(String, String, DataPlane)> {
    report.senders.iter().map(|s| (s.from.clone(), s.to.clone(), s.transport)).collect()
}

/// Source and forwarder both write over RDMA into the new destination's
/// registered RAM; the result is byte-identical at switchover.
#[test]
#[cfg_attr(not(feature = "test-hooks"), ignore = "needs the test-only switches: cargo test --features test-hooks")]
fn retarget_over_rdma_is_byte_exact() {
    const T: &str = "retarget_over_rdma_is_byte_exact";
    if !rdma_or_skip(T) {
        return;
    }
    let mut tb = testbed(&["A", "B", "C"]);
    tb.start_guest("A", "r1", 96 * MIB, &workload(10.0), true, &[]).unwrap();
    let opts = MigrateOptions {
        transport: TransportKind::Rdma,
        suspend: true,
        streams: 2,
        max_bandwidth_mbps: Some(40.0),
        ..Default::default()
    };
    start_migration(&tb, "A", "r1", "B", held(opts));
    assert!(retarget_when(&tb, "A", "r1", "C", 0.4, true), "migration ended before the retarget");
    release(&tb, "A", "r1");
    let report = wait_report(&tb, "A", "r1");
    assert_eq!(report.result, Outcome::Completed, "{report:#?}\n{}", tb.logs());
    assert_eq!(report.transport, TransportUsed::Rdma, "{report:#?}");
    let t = transports(&report);
    for pair in [("A", "B"), ("A", "C"), ("B", "C")] {
        assert!(
            t.iter().any(|(f, to, k)| (f.as_str(), to.as_str()) == pair && *k == DataPlane::Rdma),
            "{pair:?} over RDMA: {t:?}"
        );
    }
    assert!(report.bytes_by_sender.get("B").copied().unwrap_or(0) > 0, "B forwarded: {report:#?}");
    // Every pair says which path it took, the forwarder's included.
    for s in &report.senders {
        let p = s.rdma.as_ref().unwrap_or_else(|| panic!("no RDMA path for {} to {}: {report:#?}", s.from, s.to));
        assert!(!p.device.is_empty() && p.port >= 1 && [1024, 4096].contains(&p.path_mtu), "{p:?}");
    }
    land(&tb, "A", "C", "r1");
    // RAM is registered once per host and sender: the source's for both of
    // its destinations, B's for receiving and for forwarding from, C's for
    // the source's writes and again for B's (keys of its own, revoked when
    // B is released).
    for (host, target, sender) in [("A", 0, 1), ("B", 1, 0), ("C", 2, 0)] {
        assert_eq!(registrations(&tb, host), (target, sender), "{host}'s registrations\n{}", tb.agent_log(host));
        // In slices pinned at once, one per core (the VM has two or more).
        let log = tb.agent_log(host);
        let line = log.lines().find(|l| l.contains("guest RAM registered for RDMA")).unwrap_or_default();
        let slices: usize = line.split("slices=").nth(1).and_then(|v| v.split(' ').next()?.parse().ok()).unwrap_or(0);
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert!(cores < 2 || slices >= 2, "{host}: {line}");
    }
    std::fs::remove_file(ram_file(&tb, "A", "r1")).unwrap();
}

/// The destination's RAM equals the source's, byte for byte, and the VM
/// runs there once resumed (and nowhere else).
fn land(tb: &Testbed, from: &str, to: &str, vm: &str) {
    assert_same_bytes(&ram_file(tb, from, vm), &ram_file(tb, to, vm));
    tb.client(to).resume(vm).unwrap();
    assert_running_on(tb, to, vm);
}

/// How often an agent registered RAM for RDMA: (for remote writes, for reads only).
fn registrations(tb: &Testbed, host: &str) -> (usize, usize) {
    let log = tb.agent_log(host);
    let lines = log.lines().filter(|l| l.contains("guest RAM registered for RDMA"));
    lines.fold((0, 0), |(t, s), l| if l.contains("remote_write=true") { (t + 1, s) } else { (t, s + 1) })
}

/// `auto` (the default) picks RDMA when both ends have it.
#[test]
fn auto_picks_rdma_when_both_ends_can() {
    const T: &str = "auto_picks_rdma_when_both_ends_can";
    if !rdma_or_skip(T) {
        return;
    }
    let mut tb = testbed(&["A", "B"]);
    tb.start_guest("A", "r2", 32 * MIB, &workload(5.0), false, &[]).unwrap();
    let report = migrate(&tb, "A", "r2", "B", MigrateOptions::default());
    assert_eq!(report.result, Outcome::Completed, "{report:#?}\n{}", tb.logs());
    assert_eq!(report.transport, TransportUsed::Rdma, "{report:#?}");
    assert_running_on(&tb, "B", "r2");
}

/// The netdev under the first RDMA device's port 1 (rxe0's is the VM's NIC).
fn rdma_netdev() -> Option<String> {
    let dev = std::fs::read_dir("/sys/class/infiniband").ok()?.flatten().next()?.path();
    std::fs::read_to_string(dev.join("ports/1/gid_attrs/ndevs/0")).ok().map(|s| s.trim().to_owned())
}

/// A change made with `ip` for as long as it lives, then undone.
struct IpChange(Vec<String>);

impl IpChange {
    /// Runs `ip do_args` now and `ip undo_args` when dropped.
    fn make(do_args: &[&str], undo_args: &[&str]) -> IpChange {
        let st = std::process::Command::new("ip").args(do_args).status().unwrap();
        assert!(st.success(), "ip {}", do_args.join(" "));
        IpChange(undo_args.iter().map(|a| a.to_string()).collect())
    }

    /// The netdev's MTU set to `mtu`.
    fn mtu(dev: &str, mtu: u32) -> IpChange {
        let old = std::fs::read_to_string(format!("/sys/class/net/{dev}/mtu")).unwrap().trim().to_owned();
        IpChange::make(&["link", "set", dev, "mtu", &mtu.to_string()], &["link", "set", dev, "mtu", &old])
    }
}

impl Drop for IpChange {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip").args(&self.0).status();
    }
}

/// Queue pairs use the smaller active MTU of the two ports, which RoCE
/// derives from the netdev's MTU: 1024 at Ethernet's 1500, 4096 at 9000.
/// (Both agents here share one rxe device; ends that differ are the
/// attributes' unit tests.)
#[test]
fn queue_pairs_take_the_path_mtu_of_the_ports() {
    const T: &str = "queue_pairs_take_the_path_mtu_of_the_ports";
    if !rdma_or_skip(T) {
        return;
    }
    let Some(netdev) = rdma_netdev() else { panic!("an RDMA device without a netdev") };
    for (mtu, want) in [(1500, 1024), (9000, 4096)] {
        let _mtu = IpChange::mtu(&netdev, mtu);
        let mut tb = testbed(&["A", "B"]);
        let vm = format!("m{mtu}");
        tb.start_guest("A", &vm, 32 * MIB, &workload(5.0), true, &[]).unwrap();
        let opts = MigrateOptions { transport: TransportKind::Rdma, suspend: true, ..Default::default() };
        let report = migrate(&tb, "A", &vm, "B", opts);
        assert_eq!(report.result, Outcome::Completed, "{report:#?}\n{}", tb.logs());
        let path = report.senders[0].rdma.as_ref().unwrap_or_else(|| panic!("no RDMA path: {report:#?}"));
        assert_eq!(path.path_mtu, want, "{netdev} at MTU {mtu}: {path:?}");
        land(&tb, "A", "B", &vm);
    }
}

/// The RoCEv2 GIDs of the first RDMA device's port 1, by index.
fn roce_v2_gids() -> Vec<(u8, String)> {
    let Some(dev) = std::fs::read_dir("/sys/class/infiniband").ok().and_then(|mut d| d.next()?.ok()) else {
        return vec![];
    };
    let port = dev.path().join("ports/1");
    (0..=255u8)
        .filter(|i| {
            std::fs::read_to_string(port.join(format!("gid_attrs/types/{i}"))).is_ok_and(|t| t.trim() == "RoCE v2")
        })
        .filter_map(|i| Some((i, std::fs::read_to_string(port.join(format!("gids/{i}"))).ok()?.trim().to_owned())))
        .collect()
}

/// Queue pairs send from the GID of the address their pairing connection
/// runs on, not the one chosen at start: agents listening on a second
/// address of the RDMA netdev use that address's GID (the default is the
/// first address's), and say so in the report.
#[test]
fn queue_pairs_send_from_the_gid_of_the_data_plane_address() {
    const T: &str = "queue_pairs_send_from_the_gid_of_the_data_plane_address";
    if !rdma_or_skip(T) {
        return;
    }
    let Some(netdev) = rdma_netdev() else { panic!("an RDMA device without a netdev") };
    let _addr = IpChange::make(
        &["addr", "add", "10.99.0.7/32", "dev", &netdev],
        &["addr", "del", "10.99.0.7/32", "dev", &netdev],
    );
    // The kernel adds the address's GIDs when it sees the address: wait for them.
    let want = "0000:0000:0000:0000:0000:ffff:0a63:0007";
    let mut gids = vec![];
    for _ in 0..100 {
        gids = roce_v2_gids();
        if gids.iter().any(|(_, g)| g == want) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let idx = gids.iter().find(|(_, g)| g == want).unwrap_or_else(|| panic!("no GID for 10.99.0.7: {gids:?}")).0;
    let first_v4 = gids.iter().find(|(_, g)| g.starts_with("0000:0000:0000:0000:0000:ffff:")).map(|(i, _)| *i);
    assert_ne!(first_v4, Some(idx), "the test needs the address's GID not to be the default one: {gids:?}");
    let mut tb = Testbed::start_at(exe(), &["A", "B"], "10.99.0.7".parse().unwrap()).unwrap();
    tb.start_guest("A", "g1", 32 * MIB, &workload(5.0), true, &[]).unwrap();
    let opts = MigrateOptions { transport: TransportKind::Rdma, suspend: true, ..Default::default() };
    let report = migrate(&tb, "A", "g1", "B", opts);
    assert_eq!(report.result, Outcome::Completed, "{report:#?}\n{}", tb.logs());
    let path = report.senders[0].rdma.as_ref().unwrap_or_else(|| panic!("no RDMA path: {report:#?}"));
    assert_eq!(path.gid_index, idx, "GIDs {gids:?}, path {path:?}");
    // And the destination's end of each pair sends from it too.
    let paired: Vec<String> =
        tb.agent_log("B").lines().filter(|l| l.contains("RDMA stream paired")).map(str::to_owned).collect();
    assert!(!paired.is_empty() && paired.iter().all(|l| l.contains(&format!("gid_index={idx} "))), "{paired:?}");
    land(&tb, "A", "B", "g1");
}

/// A queue pair that fails mid-migration (on the source's side, then on the
/// destination's) is replaced: the stream re-pairs, sends again what was in
/// flight, and the migration completes byte-exact, saying how often.
#[test]
#[cfg_attr(not(feature = "test-hooks"), ignore = "needs the test-only switches: cargo test --features test-hooks")]
fn a_failed_queue_pair_is_re_paired() {
    const T: &str = "a_failed_queue_pair_is_re_paired";
    if !rdma_or_skip(T) {
        return;
    }
    let mut tb = testbed(&["A", "B"]);
    // 48 chunks of 2 MiB, one batch each in round 0: the source's pair fails
    // at its 5th batch, the next pair at the 20th the destination receives.
    tb.restart_agent("A", &[("DCMIGRATE_TEST_RDMA_QP_ERROR_AFTER", "5")]).unwrap();
    tb.restart_agent("B", &[("DCMIGRATE_TEST_RDMA_TARGET_QP_ERROR_AFTER", "20")]).unwrap();
    tb.start_guest("A", "q1", 96 * MIB, &workload(5.0), true, &[]).unwrap();
    let opts = MigrateOptions { transport: TransportKind::Rdma, suspend: true, streams: 1, ..Default::default() };
    let report = migrate(&tb, "A", "q1", "B", opts);
    assert_eq!(report.result, Outcome::Completed, "{report:#?}\n{}", tb.logs());
    assert_eq!(report.transport, TransportUsed::Rdma, "{report:#?}");
    assert_eq!(report.senders[0].re_pairs, 2, "{report:#?}");
    land(&tb, "A", "B", "q1");
}

/// A stream whose queue pair fails and cannot be replaced (the path stops
/// carrying RDMA: every later pairing's probe is dropped) goes on over TCP
/// under `--transport auto`, sending again what was in flight: the
/// migration completes byte-exact and the report counts the fallback.
#[test]
#[cfg_attr(not(feature = "test-hooks"), ignore = "needs the test-only switches: cargo test --features test-hooks")]
fn a_stream_that_cannot_re_pair_goes_on_over_tcp() {
    const T: &str = "a_stream_that_cannot_re_pair_goes_on_over_tcp";
    if !rdma_or_skip(T) {
        return;
    }
    let mut tb = testbed(&["A", "B"]);
    // The source's pair fails at its 5th batch; B drops RDMA from its 2nd pairing on.
    tb.restart_agent("A", &[("DCMIGRATE_TEST_RDMA_QP_ERROR_AFTER", "5")]).unwrap();
    tb.restart_agent("B", &[("DCMIGRATE_TEST_RDMA_UNREACHABLE", "2")]).unwrap();
    tb.start_guest("A", "q4", 96 * MIB, &workload(5.0), true, &[]).unwrap();
    let opts = MigrateOptions { suspend: true, streams: 1, ..Default::default() };
    let report = migrate(&tb, "A", "q4", "B", opts);
    assert_eq!(report.result, Outcome::Completed, "{report:#?}\n{}", tb.logs());
    let s = &report.senders[0];
    assert_eq!(s.transport, DataPlane::Rdma, "it began over RDMA: {report:#?}");
    assert_eq!((s.re_pairs, s.tcp_fallbacks), (0, 1), "{report:#?}");
    land(&tb, "A", "B", "q4");
}

/// An agent whose locked-memory limit is smaller than the guest's RAM
/// (no CAP_IPC_LOCK, RLIMIT_MEMLOCK 16 MiB) says so in `info`, refuses to
/// register before faulting anything in, and `auto` moves the guest over
/// TCP with the reason; the same holds on the destination's side.
#[test]
fn a_locked_memory_limit_below_the_ram_means_tcp_with_the_reason() {
    const T: &str = "a_locked_memory_limit_below_the_ram_means_tcp_with_the_reason";
    if !rdma_or_skip(T) {
        return;
    }
    let limited =
        ["setpriv", "--bounding-set=-ipc_lock", "--inh-caps=-ipc_lock", "--", "prlimit", "--memlock=16777216", "--"];
    for (limited_host, vm) in [("A", "l1"), ("B", "l2")] {
        let mut tb = testbed(&["A", "B"]);
        tb.restart_agent_under(limited_host, &limited).unwrap();
        let info = tb.client(limited_host).info().unwrap();
        let warning = match &info.rdma {
            RdmaInfo::Device { warning, .. } => warning.clone().unwrap_or_default(),
            RdmaInfo::Unavailable { unavailable } => panic!("{limited_host}: no RDMA: {unavailable}"),
        };
        assert!(warning.contains("16384 KiB"), "{limited_host}: {info:?}");
        tb.start_guest("A", vm, 32 * MIB, &workload(5.0), true, &[]).unwrap();
        let report = migrate(&tb, "A", vm, "B", MigrateOptions { suspend: true, ..Default::default() });
        assert_eq!(report.result, Outcome::Completed, "{report:#?}\n{}", tb.logs());
        assert_eq!(report.transport, TransportUsed::Tcp, "{report:#?}");
        let why = report.senders[0].why_not_rdma.clone().unwrap_or_default();
        let expected = if limited_host == "A" { "locked-memory limit" } else { "offers no RDMA" };
        assert!(why.contains(expected), "{limited_host}: {why}");
        let log = tb.agent_log(limited_host);
        assert!(log.contains("would pass the locked-memory limit"), "{log}");
        land(&tb, "A", "B", vm);
    }
}

/// The RDMA port going down mid-migration (its netdev set down): the
/// device's async event tells the streams at once, they cannot pair anew
/// (the port is down) and go on over TCP, so the migration completes on the
/// same destination, byte-exact.
#[test]
#[cfg_attr(not(feature = "test-hooks"), ignore = "needs the test-only switches: cargo test --features test-hooks")]
fn a_port_going_down_moves_the_streams_to_tcp() {
    const T: &str = "a_port_going_down_moves_the_streams_to_tcp";
    if !rdma_or_skip(T) {
        return;
    }
    let Some(netdev) = rdma_netdev() else { panic!("an RDMA device without a netdev") };
    let mut tb = testbed(&["A", "B"]);
    tb.start_guest("A", "p1", 96 * MIB, &workload(5.0), true, &[]).unwrap();
    let opts = MigrateOptions { suspend: true, streams: 2, max_bandwidth_mbps: Some(40.0), ..Default::default() };
    start_migration(&tb, "A", "p1", "B", held(opts));
    let third = wait_for(120, || {
        let (_, at, done) = progress(&tb, "A", "p1")?;
        (done || at >= 32 * MIB).then_some(!done)
    });
    assert_eq!(third, Some(true), "a third over RDMA before the port goes down\n{}", tb.logs());
    let down = IpChange::make(&["link", "set", &netdev, "down"], &["link", "set", &netdev, "up"]);
    // Both streams leave RDMA before the switchover may happen.
    let moved = wait_for(60, || (tb.agent_log("A").matches("continues over TCP").count() >= 2).then_some(()));
    drop(down);
    assert!(moved.is_some(), "{}", tb.agent_log("A"));
    release(&tb, "A", "p1");
    let report = wait_report(&tb, "A", "p1");
    assert_eq!(report.result, Outcome::Completed, "{report:#?}\n{}", tb.logs());
    assert_eq!(report.senders[0].tcp_fallbacks, 2, "{report:#?}");
    assert!(tb.agent_log("A").contains("RDMA port down"), "{}", tb.agent_log("A"));
    land(&tb, "A", "B", "p1");
}

/// `--rdma-odp` on both agents: where the device pages RC writes on demand,
/// RAM is registered unpinned and the guest moves over RDMA; where it does
/// not (rxe in Debian's 6.1 kernel), each agent says why and the guest
/// moves over TCP with the reason. Byte-exact either way.
#[test]
fn on_demand_paging_is_used_where_the_device_has_it() {
    const T: &str = "on_demand_paging_is_used_where_the_device_has_it";
    if !rdma_or_skip(T) {
        return;
    }
    let mut tb = testbed(&["A", "B"]);
    for h in ["A", "B"] {
        tb.restart_agent(h, &[("DCMIGRATE_RDMA_ODP", "true")]).unwrap();
    }
    tb.start_guest("A", "o1", 32 * MIB, &workload(5.0), true, &[]).unwrap();
    let report = migrate(&tb, "A", "o1", "B", MigrateOptions { suspend: true, ..Default::default() });
    assert_eq!(report.result, Outcome::Completed, "{report:#?}\n{}", tb.logs());
    let log = tb.agent_log("B");
    if log.contains("does not page RC writes") {
        assert_eq!(report.transport, TransportUsed::Tcp, "{report:#?}");
        let why = report.senders[0].why_not_rdma.clone().unwrap_or_default();
        assert!(why.contains("offers no RDMA"), "{why}");
    } else {
        assert!(log.contains("on_demand=true"), "neither refused nor registered on demand:\n{log}");
        assert_eq!(report.transport, TransportUsed::Rdma, "{report:#?}");
    }
    land(&tb, "A", "B", "o1");
}

/// The largest chunks (64 MiB) with a guest dirtying every other page:
/// batches of thousands of one-page runs, each a work request, fit the
/// send queue, and the result is byte-exact.
#[test]
fn largest_chunks_with_every_other_page_dirty() {
    const T: &str = "largest_chunks_with_every_other_page_dirty";
    if !rdma_or_skip(T) {
        return;
    }
    let mut tb = testbed(&["A", "B"]);
    let w = Workload { pattern: Pattern::Alternate, ..workload(20.0) };
    tb.start_guest("A", "q3", 128 * MIB, &w, true, &[]).unwrap();
    let opts = MigrateOptions {
        transport: TransportKind::Rdma,
        suspend: true,
        chunk_size: 64 * MIB,
        streams: 1,
        ..Default::default()
    };
    let report = migrate(&tb, "A", "q3", "B", opts);
    assert_eq!(report.result, Outcome::Completed, "{report:#?}\n{}", tb.logs());
    assert_eq!(report.transport, TransportUsed::Rdma, "{report:#?}");
    assert!(report.rounds.len() >= 2, "a round after the first sends dirty pages: {report:#?}");
    land(&tb, "A", "B", "q3");
}

/// Where RDMA traffic does not get through although both ends have RDMA
/// (a fabric dropping RoCE), the probe write at pairing fails: `auto` uses
/// TCP and the report says why; `--transport rdma` fails with that reason.
#[test]
#[cfg_attr(not(feature = "test-hooks"), ignore = "needs the test-only switches: cargo test --features test-hooks")]
fn auto_falls_back_to_tcp_when_rdma_traffic_is_dropped() {
    const T: &str = "auto_falls_back_to_tcp_when_rdma_traffic_is_dropped";
    if !rdma_or_skip(T) {
        return;
    }
    let mut tb = testbed(&["A", "B"]);
    tb.restart_agent("B", &[("DCMIGRATE_TEST_RDMA_UNREACHABLE", "1")]).unwrap();
    tb.start_guest("A", "q2", 32 * MIB, &workload(5.0), false, &[]).unwrap();
    let opts = MigrateOptions { transport: TransportKind::Rdma, ..Default::default() };
    let report = migrate(&tb, "A", "q2", "B", opts);
    assert_eq!(report.result, Outcome::Failed, "{report:#?}");
    let e = report.error.as_deref().unwrap();
    assert!(e.contains("--transport rdma") && e.contains("probe"), "{e}");
    assert_running_on(&tb, "A", "q2");
    let report = migrate(&tb, "A", "q2", "B", MigrateOptions::default());
    assert_eq!(report.result, Outcome::Completed, "{report:#?}\n{}", tb.logs());
    assert_eq!(report.transport, TransportUsed::Tcp, "{report:#?}");
    let why = report.senders[0].why_not_rdma.as_deref().unwrap_or_default();
    assert!(why.contains("probe"), "{report:#?}");
    assert_running_on(&tb, "B", "q2");
}

/// Where RDMA is impossible, `--transport rdma` fails with the reason and
/// the VM keeps running on the source; `auto` falls back to TCP.
#[test]
fn rdma_required_but_impossible_fails_clearly() {
    let mut tb = Testbed::start_with_env(exe(), &["A", "B"], &[("DCMIGRATE_NO_RDMA", "true")]).unwrap();
    tb.start_guest("A", "r3", 16 * MIB, &workload(5.0), false, &[]).unwrap();
    let opts = MigrateOptions { transport: TransportKind::Rdma, ..Default::default() };
    let report = migrate(&tb, "A", "r3", "B", opts);
    assert_eq!(report.result, Outcome::Failed, "{report:#?}");
    let e = report.error.as_deref().unwrap();
    assert!(e.contains("--transport rdma") && e.contains("disabled"), "{e}");
    assert_eq!(report.vm_runs_on.as_deref(), Some("A"));
    assert_running_on(&tb, "A", "r3");
    let report = migrate(&tb, "A", "r3", "B", MigrateOptions::default());
    assert_eq!(report.result, Outcome::Completed, "{report:#?}");
    assert_eq!(report.transport, TransportUsed::Tcp);
}

/// A forwarder's RDMA keys are its own and die with its fence. The
/// destination registers its RAM again for forwarder 1 (keys of its own,
/// in the session's protection domain): a queue pair of the session writes
/// with them; once forwarder 1 is fenced they are deregistered, and a
/// write with them fails, landing nothing, while the source's own keys go
/// on working.
#[tokio::test(flavor = "multi_thread")]
async fn a_fenced_forwarders_rdma_keys_no_longer_write() {
    use dcmigrate::memory::{GuestRam, Layout, RegionSpec, PAGE_SIZE};
    use dcmigrate::protocol::Token;
    use dcmigrate::transport::{Batch, Completion, PageSender, Receiver, Run, StreamSpec};
    use std::sync::Arc;
    const T: &str = "a_fenced_forwarders_rdma_keys_no_longer_write";
    if !rdma_or_skip(T) {
        return;
    }
    let rdma = dcmigrate::transport::rdma::open(&Default::default()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let layout = || Layout::new(vec![RegionSpec { id: "ram0".into(), size: 4 << 20 }], 2 << 20).unwrap();
    let src = Arc::new(GuestRam::create(layout(), &[dir.path().join("src")]).unwrap());
    let dst = Arc::new(GuestRam::create(layout(), &[dir.path().join("dst")]).unwrap());
    src.write_at(0, 0, &vec![0x11; 4 << 20]).unwrap();
    let target = rdma.register_target(&dst, false).unwrap();
    let own_keys = target.offer();
    let rx = Receiver::default();
    let token = Token::random();
    let session = rx.add(token, dst.clone(), None, true);
    session.set_rdma(target);
    let forwarder_keys = Receiver::rdma_for(&session, 1).expect("RDMA offered").expect("registered again");
    assert_ne!(forwarder_keys[0].rkey, own_keys[0].rkey, "the forwarder's keys are the source's");
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(rx.clone().serve(l, Default::default()));
    // Sender 0 (the source's queue pairs) writing with the given keys.
    let open = |keys: Vec<dcmigrate::protocol::RdmaRegion>| {
        let (tx, done) = tokio::sync::mpsc::unbounded_channel();
        let spec = StreamSpec {
            addr,
            token,
            sender: 0,
            streams: 1,
            ram: src.clone(),
            observer: None,
            completions: tx,
            stall_timeout: std::time::Duration::from_secs(10),
            tls: None,
            zero_frames: false,
        };
        let rdma = rdma.clone();
        async move {
            let ver = dcmigrate::transport::rdma::ENDPOINT_VERSION;
            (dcmigrate::transport::rdma::connect(&rdma, spec, &keys, ver, false).await.unwrap(), done)
        }
    };
    let page = PAGE_SIZE;
    let batch = |id: u64, first_page: usize| Batch {
        id,
        chunk: first_page / 512,
        from: 0,
        to: 1,
        runs: vec![Run { first_page, pages: 1 }],
        epochs: vec![0],
    };
    let (q, mut done) = open(forwarder_keys.clone()).await;
    q.submit(batch(1, 0)).unwrap();
    let c = tokio::time::timeout(std::time::Duration::from_secs(60), done.recv()).await.unwrap().unwrap();
    assert!(matches!(c, Completion::Applied(_)), "with the forwarder's keys before the fence: {c:?}");
    rx.fence(&session, 1).await.unwrap();
    q.submit(batch(2, 600)).unwrap();
    let c = tokio::time::timeout(std::time::Duration::from_secs(120), done.recv()).await.unwrap().unwrap();
    assert!(matches!(c, Completion::Failed(..)), "a write with fenced keys: {c:?}");
    q.close();
    let mut b = vec![0u8; page];
    dst.read_at(0, 600 * page as u64, &mut b).unwrap();
    assert!(b.iter().all(|&x| x == 0), "a write with fenced keys landed");
    // The source's own keys still write.
    let (q, mut done) = open(own_keys).await;
    q.submit(batch(3, 700)).unwrap();
    let c = tokio::time::timeout(std::time::Duration::from_secs(60), done.recv()).await.unwrap().unwrap();
    assert!(matches!(c, Completion::Applied(_)), "with the source's keys: {c:?}");
}
