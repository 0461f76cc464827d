//! `control_message`: what an agent reads from a peer on the control channel,
//! `dcmigrate::protocol::read_message`, on arbitrary bytes.
//!
//! Checks that reading never panics and never allocates past the protocol's
//! limits (libFuzzer's malloc limit catches that), and that every message it
//! accepts writes back (`write_message`) into bytes that read as the same
//! message. The first input byte picks the mode: even, the rest is the raw
//! stream (length prefixes included, several messages in a row); odd, the
//! rest is one message's JSON body and the harness writes the prefix.
#![no_main]

use dcmigrate::protocol::{read_message, write_message, Message, ProtocolError, MAX_BULK, SMALL_MESSAGE};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

/// Runs a future that never waits: the reader is a slice and the writer a
/// `Vec`, so anything but `Ready` at the first poll is a bug in itself.
fn now<F: Future>(f: F) -> F::Output {
    match pin!(f).poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("reading from memory waited"),
    }
}

/// Equal JSON, floats compared with a little slack (serde_json's default
/// float parsing is not exactly round-trip; the synthetic workload has f64s).
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) if x.is_f64() || y.is_f64() => {
            let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
            x == y || (x - y).abs() <= f64::EPSILON * 4.0 * x.abs().max(y.abs())
        }
        (Value::Array(x), Value::Array(y)) => x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same(x, y)),
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| same(v, w)))
        }
        _ => a == b,
    }
}

fn check_roundtrip(m: &Message) {
    let mut wire = Vec::new();
    now(write_message(&mut wire, m)).expect("an accepted message writes");
    let back = now(read_message(&mut wire.as_slice())).expect("a written message reads back");
    assert_eq!(m.name(), back.name());
    let (a, b) = (serde_json::to_value(m).unwrap(), serde_json::to_value(&back).unwrap());
    assert!(same(&a, &b), "{a} became {b}");
    if let (Message::DeviceStateChunk { len, bytes }, Message::DeviceStateChunk { bytes: got, .. }) = (m, &back) {
        assert!(*len <= MAX_BULK && bytes.len() == *len as usize && got == bytes);
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let framed;
    let mut stream: &[u8] = if mode & 1 == 0 {
        rest
    } else {
        framed = [&(rest.len() as u32).to_be_bytes()[..], rest].concat();
        &framed
    };
    // As an agent does: message after message until the stream fails.
    loop {
        let before = stream.len();
        match now(read_message(&mut stream)) {
            Ok(m) => {
                assert!(stream.len() < before, "a message consumed nothing");
                check_roundtrip(&m);
            }
            Err(ProtocolError::TooLarge(n)) => {
                // Every kind's cap is at least the smallest (`cap_of`).
                assert!(n > SMALL_MESSAGE || n > MAX_BULK as usize, "refused {n} bytes under the limits");
                break;
            }
            Err(_) => break,
        }
    }
});
