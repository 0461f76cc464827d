//! `data_frame`: the data plane's fixed-size headers from an unauthenticated
//! TCP peer, and the receiver's bounds check before it writes guest RAM.
//!
//! Checks, on arbitrary bytes:
//! - `Hello`, `Frame` and `Reply::decode` never panic; whatever decodes
//!   encodes to the same bytes (hello) or decodes back to itself (frame,
//!   reply), and a decoded pages frame obeys the wire's rules (whole pages,
//!   aligned, at most `MAX_PAYLOAD`).
//! - The input as a stream of frames, applied as `transport::tcp::receive`
//!   does (header, decode, `GuestRam::check`, payload, `write_at`; stop at the
//!   first refusal) to a small `GuestRam` of two regions on temp files:
//!   `check` accepts exactly the frames inside a region, `write_at` then
//!   succeeds, and the RAM afterwards equals a plain model of it (nothing
//!   written outside, nothing lost).
//!
//! `tcp::receive` itself takes a `TcpStream`; the loop here restates it (it
//! would drive the real one if that were generic over AsyncRead+AsyncWrite).
#![no_main]

use dcmigrate::memory::{GuestRam, Layout, RegionSpec, PAGE_SIZE};
use dcmigrate::protocol::data::{Frame, Hello, Reply, HEADER_LEN, HELLO_LEN, MAGIC, MAX_PAYLOAD, REPLY_LEN};
use libfuzzer_sys::fuzz_target;
use std::sync::{Mutex, OnceLock};

const SIZES: [u64; 2] = [16 * PAGE_SIZE as u64, 8 * PAGE_SIZE as u64];

/// The RAM (kept for the whole run: mapping it per input would dominate)
/// and what it must hold.
struct Rig {
    ram: GuestRam,
    model: Vec<Vec<u8>>,
    _dir: tempfile::TempDir,
}

fn rig() -> &'static Mutex<Rig> {
    static RIG: OnceLock<Mutex<Rig>> = OnceLock::new();
    RIG.get_or_init(|| {
        let dir = tempfile::tempdir().expect("temp dir");
        let regions = vec![RegionSpec { id: "a".into(), size: SIZES[0] }, RegionSpec { id: "b".into(), size: SIZES[1] }];
        let layout = Layout::new(regions, 4 * PAGE_SIZE as u64).expect("layout");
        let ram = GuestRam::create(layout, &[dir.path().join("a"), dir.path().join("b")]).expect("guest RAM");
        let model = SIZES.iter().map(|&s| vec![0u8; s as usize]).collect();
        Mutex::new(Rig { ram, model, _dir: dir })
    })
}

fn arr<const N: usize>(b: &[u8]) -> Option<&[u8; N]> {
    b.get(..N).map(|b| b.try_into().unwrap())
}

fn decoders(data: &[u8]) {
    if let Some(b) = arr::<HELLO_LEN>(data) {
        match Hello::decode(b) {
            Ok(h) => assert_eq!(&h.encode(), b),
            Err(_) => assert_ne!(&b[..4], MAGIC),
        }
    }
    if let Some(b) = arr::<HEADER_LEN>(data) {
        if let Ok(f) = Frame::decode(b) {
            assert_eq!(Frame::decode(&f.encode()), Ok(f));
            if let Frame::Pages { offset, len, .. } = f {
                assert!(len > 0 && len <= MAX_PAYLOAD && len as usize % PAGE_SIZE == 0);
                assert!(offset % PAGE_SIZE as u64 == 0);
            }
        }
    }
    if let Some(b) = arr::<REPLY_LEN>(data) {
        if let Ok(r) = Reply::decode(b) {
            assert_eq!(Reply::decode(&r.encode()), Ok(r));
        }
    }
}

fn receive(rig: &mut Rig, mut s: &[u8]) {
    while let Some(header) = arr::<HEADER_LEN>(s) {
        s = &s[HEADER_LEN..];
        let Ok(frame) = Frame::decode(header) else { return };
        let Frame::Pages { region, offset, len } = frame else { continue };
        let inside = (region as usize) < SIZES.len() && offset.checked_add(len as u64).is_some_and(|e| e <= SIZES[region as usize]);
        let checked = rig.ram.check(region, offset, len as u64);
        assert_eq!(checked.is_ok(), inside, "check({region}, {offset}, {len}): {checked:?}");
        if !inside {
            return;
        }
        // The sender may close mid-payload: nothing of it is written.
        let Some(payload) = s.get(..len as usize) else { return };
        s = &s[len as usize..];
        rig.ram.write_at(region, offset, payload).expect("a checked frame is written");
        rig.model[region as usize][offset as usize..][..len as usize].copy_from_slice(payload);
    }
}

fuzz_target!(|data: &[u8]| {
    decoders(data);
    let mut rig = rig().lock().unwrap();
    receive(&mut rig, data);
    for (r, want) in rig.model.iter().enumerate() {
        let mut got = vec![0u8; want.len()];
        rig.ram.read_at(r as u32, 0, &mut got).expect("read back");
        assert!(&got == want, "region {r} differs from what was written");
    }
    // Out of bounds in every way, never a panic.
    for (region, offset, len) in [(2, 0, 1), (0, u64::MAX, 1), (0, SIZES[0], 1), (1, 0, SIZES[1] + 1), (u32::MAX, 0, 0)] {
        assert!(rig.ram.check(region, offset, len).is_err());
    }
});
