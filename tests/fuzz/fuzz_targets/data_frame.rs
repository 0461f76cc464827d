//! `data_frame`: the data plane's fixed-size headers from an unauthenticated
//! TCP peer, and the receiver's bounds check before it writes guest RAM.
//!
//! Checks, on arbitrary bytes:
//! - `Hello`, `Frame` and `Reply::decode` never panic; whatever decodes
//!   encodes to the same bytes (hello) or decodes back to itself (frame,
//!   reply), and a decoded pages or zero frame obeys the wire's rules (whole
//!   pages, aligned, at most `MAX_PAYLOAD` or `MAX_ZERO`).
//! - The input as one data stream after its hello, given to the receiver's
//!   own frame loop, `transport::tcp::receive`, over an in-memory stream,
//!   writing into a small `GuestRam` of two regions on temp files: it never
//!   panics; it writes exactly the frames that lie inside a region (up to the
//!   first bad one; a zero frame zeroes its pages), so the RAM afterwards
//!   equals a plain model of what it
//!   should hold; it answers every batch end with `Applied` and a refused
//!   frame with `Rejected`; and `GuestRam::check` agrees with the model on
//!   every frame's bounds.
#![no_main]

use dcmigrate::memory::{GuestRam, Layout, RegionSpec, PAGE_SIZE};
use dcmigrate::protocol::data::{
    Frame, Hello, RejectCode, Reply, HEADER_LEN, HELLO_LEN, MAGIC, MAX_PAYLOAD, MAX_ZERO, REPLY_LEN,
};
use dcmigrate::transport::tcp;
use libfuzzer_sys::fuzz_target;
use std::future::Future;
use std::pin::pin;
use std::sync::{Mutex, OnceLock};
use std::task::{Context, Poll, Waker};

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
        let regions =
            vec![RegionSpec { id: "a".into(), size: SIZES[0] }, RegionSpec { id: "b".into(), size: SIZES[1] }];
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
            if let Frame::Zero { offset, len, .. } = f {
                assert!(len > 0 && len <= MAX_ZERO && len as usize % PAGE_SIZE == 0);
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

/// Runs a future that never waits (in-memory stream): see `control_message`.
fn now<F: Future>(f: F) -> F::Output {
    match pin!(f).poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("an in-memory stream waited"),
    }
}

/// Whether a frame's pages lie inside one of the model's regions.
fn inside(region: u32, offset: u64, len: u32) -> bool {
    let r = region as usize;
    r < SIZES.len() && offset.checked_add(len as u64).is_some_and(|e| e <= SIZES[r])
}

/// What the receiver must do with `s`: the replies it must send, and the
/// model updated with what it must write.
fn expect(model: &mut [Vec<u8>], mut s: &[u8]) -> (Vec<u8>, bool) {
    let mut replies = Vec::new();
    while let Some(header) = arr::<HEADER_LEN>(s) {
        s = &s[HEADER_LEN..];
        let Ok(frame) = Frame::decode(header) else {
            replies.extend(Reply::Rejected { code: RejectCode::BadFrame }.encode());
            return (replies, false);
        };
        match frame {
            Frame::BatchEnd { batch } => replies.extend(Reply::Applied { batch }.encode()),
            Frame::Pages { region, offset, len } => {
                let r = region as usize;
                if !inside(region, offset, len) {
                    replies.extend(Reply::Rejected { code: RejectCode::OutOfBounds }.encode());
                    return (replies, false);
                }
                // The sender may close mid-payload: nothing of it is written.
                let Some(payload) = s.get(..len as usize) else { return (replies, false) };
                s = &s[len as usize..];
                model[r][offset as usize..][..len as usize].copy_from_slice(payload);
            }
            Frame::Zero { region, offset, len } => {
                let r = region as usize;
                if !inside(region, offset, len) {
                    replies.extend(Reply::Rejected { code: RejectCode::OutOfBounds }.encode());
                    return (replies, false);
                }
                model[r][offset as usize..][..len as usize].fill(0);
            }
        }
    }
    // A stream that ends between frames (or inside a header) ends well.
    (replies, true)
}

fn bounds(rig: &Rig, mut s: &[u8]) {
    while let Some(header) = arr::<HEADER_LEN>(s) {
        s = &s[HEADER_LEN..];
        if let Ok(Frame::Pages { region, offset, len } | Frame::Zero { region, offset, len }) = Frame::decode(header) {
            let checked = rig.ram.check(region, offset, len as u64);
            assert_eq!(checked.is_ok(), inside(region, offset, len), "check({region}, {offset}, {len}): {checked:?}");
        }
    }
}

fuzz_target!(|data: &[u8]| {
    decoders(data);
    let mut rig = rig().lock().unwrap();
    bounds(&rig, data);
    let Rig { ram, model, .. } = &mut *rig;
    let (want_replies, want_ok) = expect(model, data);
    let mut stream = tokio::io::join(data, Vec::new());
    let result = now(tcp::receive(ram, &mut stream));
    let (_, replies) = stream.into_inner();
    assert_eq!(result.is_ok(), want_ok, "{result:?}");
    assert!(replies == want_replies, "replies {replies:?}, expected {want_replies:?}");
    for (r, want) in model.iter().enumerate() {
        let mut got = vec![0u8; want.len()];
        ram.read_at(r as u32, 0, &mut got).expect("read back");
        assert!(&got == want, "region {r} differs from what was written");
    }
    // Out of bounds in every way, never a panic.
    for (region, offset, len) in [(2, 0, 1), (0, u64::MAX, 1), (0, SIZES[0], 1), (1, 0, SIZES[1] + 1), (u32::MAX, 0, 0)]
    {
        assert!(ram.check(region, offset, len).is_err());
    }
});
