//! `rdma_endpoint`: a peer's queue pair endpoint, read from the pairing
//! connection before any RDMA traffic: `dcmigrate_rdma::Endpoint::decode`
//! on 32 arbitrary bytes.
//!
//! Checks: never panics; only 24-bit, non-zero queue pair numbers and 24-bit
//! PSNs are accepted, with the reserved bytes zero, in version 0 (no MTU)
//! or 1 (a known MTU code); and whatever decodes encodes to exactly the
//! bytes it came from.
//!
//! (The sender's check of a destination's offered `RdmaRegion`s is inline
//! in `transport::rdma::imp::connect`, behind a verbs device: not reachable
//! from here. Their JSON decoding is covered by `control_message`.)
#![no_main]

use dcmigrate_rdma::{Endpoint, ENDPOINT_LEN};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for b in data.chunks_exact(ENDPOINT_LEN) {
        let b: &[u8; ENDPOINT_LEN] = b.try_into().unwrap();
        if let Ok(ep) = Endpoint::decode(b) {
            assert!(ep.qpn != 0 && ep.qpn < 1 << 24 && ep.psn < 1 << 24, "{ep:?}");
            assert_eq!(&ep.encode(), b);
        }
    }
});
