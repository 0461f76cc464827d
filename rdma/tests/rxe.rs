//! Verbs-level tests on a real RDMA device (SoftRoCE in `tests/softroce/run`).
//! Without a device they skip with the reason, except inside the test VM
//! (`DCMIGRATE_IN_VM`), where a missing device is a failure.

use dcmigrate_rdma::{CompletionKind, Device, QueuePair, Region, Write};
use std::sync::Arc;
use std::time::Duration;

fn device_or_skip(test: &str) -> Option<Arc<Device>> {
    match Device::open(None, None) {
        Ok(d) => Some(d),
        Err(e) if std::env::var_os("DCMIGRATE_IN_VM").is_some() => panic!("{test}: no RDMA device in the test VM: {e}"),
        Err(e) => {
            eprintln!("SKIP {test}: {e} (tests/softroce/run runs it on SoftRoCE)");
            if let Some(p) = std::env::var_os("DCMIGRATE_SKIP_LOG") {
                use std::io::Write as _;
                let f = std::fs::OpenOptions::new().create(true).append(true).open(p);
                // One write per line: tests running in parallel append here.
                let _ = f.and_then(|mut f| f.write_all(format!("{test}: {e}\n").as_bytes()));
            }
            None
        }
    }
}

/// A tmpfs-backed shared mapping, like guest RAM files.
fn ram(len: usize, fill: u8) -> (tempfile::NamedTempFile, memmap2::MmapMut) {
    let dir = if std::path::Path::new("/dev/shm").is_dir() { "/dev/shm" } else { "/tmp" };
    let f = tempfile::NamedTempFile::new_in(dir).unwrap();
    f.as_file().set_len(len as u64).unwrap();
    let mut m = unsafe { memmap2::MmapMut::map_mut(f.as_file()).unwrap() };
    if fill != 0 {
        for (i, b) in m.iter_mut().enumerate() {
            *b = fill.wrapping_add((i / 4096) as u8).wrapping_add(i as u8);
        }
    }
    (f, m)
}

fn reg(dev: &Device, m: &mut memmap2::MmapMut, remote: bool) -> Region {
    unsafe { dev.register(m.as_mut_ptr(), m.len(), remote, false) }.unwrap()
}

fn pair(dev: &Arc<Device>) -> (QueuePair, QueuePair) {
    let (a, b) = (
        QueuePair::new(dev, dev.default_gid(), 64, 16, false, 0).unwrap(),
        QueuePair::new(dev, dev.default_gid(), 64, 16, true, 0).unwrap(),
    );
    let mtu = dev.port_info().unwrap().active_mtu;
    let (ea, eb) = (a.endpoint(Some(mtu)), b.endpoint(Some(mtu)));
    let attrs = |e: &dcmigrate_rdma::Endpoint| {
        dcmigrate_rdma::qp_attrs(&dev.port_info().unwrap(), e.mtu, e.gid == [0; 16], &Default::default()).unwrap()
    };
    a.connect(&eb, &attrs(&eb)).unwrap();
    b.connect(&ea, &attrs(&ea)).unwrap();
    (a, b)
}

#[track_caller]
fn next(qp: &QueuePair) -> impl std::future::Future<Output = Vec<dcmigrate_rdma::Completion>> + '_ {
    let at = std::panic::Location::caller();
    async move {
        tokio::time::timeout(Duration::from_secs(20), qp.completions())
            .await
            .unwrap_or_else(|_| panic!("no completion within 20 s at {at}"))
            .unwrap()
    }
}

#[tokio::test]
async fn registers_a_memmap2_mapping() {
    let Some(dev) = device_or_skip("registers_a_memmap2_mapping") else { return };
    let (_f, mut m) = ram(8 << 20, 1);
    let r = reg(&dev, &mut m, true);
    assert_eq!(r.addr(), m.as_ptr() as u64);
    assert_eq!(r.len(), 8 << 20);
    assert_ne!(r.rkey(), 0);
    let remote = r.remote();
    assert_eq!((remote.addr, remote.len, remote.rkey), (r.addr(), r.len(), r.rkey()));
}

#[tokio::test]
async fn writes_land_and_the_immediate_says_so() {
    let Some(dev) = device_or_skip("writes_land_and_the_immediate_says_so") else { return };
    let (_fs, mut src) = ram(4 << 20, 3);
    let (_fd, mut dst) = ram(4 << 20, 0);
    let (rs, rd) = (reg(&dev, &mut src, false), reg(&dev, &mut dst, true));
    let (sender, receiver) = pair(&dev);
    receiver.post_recvs(0, 4).unwrap();
    // Three runs of pages at different offsets, then the immediate.
    let runs = [(0usize, 4096usize), (3 * 4096, 5 * 4096), (700 * 4096, 300 * 4096)];
    let writes: Vec<Write> = runs
        .iter()
        .map(|&(off, len)| Write {
            local_addr: rs.addr() + off as u64,
            len: len as u32,
            lkey: rs.lkey(),
            remote_addr: rd.addr() + off as u64,
            rkey: rd.rkey(),
        })
        .collect();
    sender.post_batch(7, &writes, 42, (rd.addr(), rd.rkey())).unwrap();
    let got = next(&receiver).await;
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].result, Ok(CompletionKind::Received { imm: 42 }));
    let sent = next(&sender).await;
    assert_eq!((sent[0].wr_id, sent[0].result.clone()), (7, Ok(CompletionKind::Sent)));
    for &(off, len) in &runs {
        assert!(src[off..off + len] == dst[off..off + len], "run at {off} landed");
    }
    assert!(dst[4096..2 * 4096].iter().all(|&b| b == 0), "nothing outside the runs");
}

#[tokio::test]
async fn a_queue_pair_in_error_stops_writes_and_a_new_one_works() {
    let Some(dev) = device_or_skip("a_queue_pair_in_error_stops_writes_and_a_new_one_works") else { return };
    let (_fs, mut src) = ram(1 << 20, 9);
    let (_fd, mut dst) = ram(1 << 20, 0);
    let (rs, rd) = (reg(&dev, &mut src, false), reg(&dev, &mut dst, true));
    let w = Write { local_addr: rs.addr(), len: 8192, lkey: rs.lkey(), remote_addr: rd.addr(), rkey: rd.rkey() };
    let (sender, receiver) = pair(&dev);
    receiver.post_recvs(0, 2).unwrap();
    // The receiver fences itself: its posted receives flush, and a write
    // sent afterwards does not land.
    receiver.set_error().unwrap();
    let flushed = next(&receiver).await;
    assert!(flushed.iter().all(|c| c.result.is_err()), "{flushed:?}");
    sender.post_batch(1, &[w], 1, (rd.addr(), rd.rkey())).unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(dst[..8192].iter().all(|&b| b == 0), "nothing landed through the fenced queue pair");
    // The sender learns of the fence out of band (the data plane closes the
    // TCP stream that paired the queue pairs) and errors its own: the
    // outstanding request completes with an error instead of hanging.
    sender.set_error().unwrap();
    let failed = next(&sender).await;
    assert!(failed.iter().any(|c| c.wr_id == 1 && c.result.is_err()), "{failed:?}");
    assert!(dst[..8192].iter().all(|&b| b == 0), "still nothing landed");
    // Reconnect with fresh queue pairs: the same memory, the same keys.
    let (sender, receiver) = pair(&dev);
    receiver.post_recvs(0, 2).unwrap();
    sender.post_batch(2, &[w], 2, (rd.addr(), rd.rkey())).unwrap();
    assert_eq!(next(&receiver).await[0].result, Ok(CompletionKind::Received { imm: 2 }));
    assert!(src[..8192] == dst[..8192]);
}

#[tokio::test]
async fn without_a_device_open_explains_why() {
    // Meaningful outside the VM: a host without RDMA gets a reason, not a crash.
    if let Err(e) = Device::open(Some("no-such-device"), None) {
        assert!(e.to_string().contains("RDMA unavailable"), "{e}");
    } else {
        panic!("a device named no-such-device opened");
    }
}
