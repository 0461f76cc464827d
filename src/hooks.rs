//! Test-only switches. They are compiled in only with the cargo feature
//! `test-hooks`, which `tests/run` enables; without it every hook is off and
//! the environment is never read, so an operator's build has none of them.

macro_rules! hook {
    ($(#[$doc:meta])* $name:ident: $ty:ty = $var:literal) => {
        $(#[$doc])*
        pub fn $name() -> Option<$ty> {
            #[cfg(feature = "test-hooks")]
            {
                std::env::var($var).ok().and_then(|v| v.parse().ok())
            }
            #[cfg(not(feature = "test-hooks"))]
            {
                None
            }
        }
    };
}

hook!(
    /// `DCMIGRATE_TEST_CORRUPT_CHUNK=N` (destination agent): flips a byte of
    /// chunk N before the first verification, to prove mismatches are found.
    corrupt_chunk: usize = "DCMIGRATE_TEST_CORRUPT_CHUNK"
);

hook!(
    /// `DCMIGRATE_TEST_FORWARD_DELAY_MS=MS` (forwarding agent): holds every
    /// forwarded batch back this long, so its pages land late.
    forward_delay_ms: u64 = "DCMIGRATE_TEST_FORWARD_DELAY_MS"
);

hook!(
    /// `DCMIGRATE_TEST_UNORDERED=1` (source agent): turns the ledger's
    /// one-writer rule off, to prove the stress test catches what it prevents.
    unordered: u8 = "DCMIGRATE_TEST_UNORDERED"
);

hook!(
    /// `DCMIGRATE_TEST_MAX_PROTOCOL=N` (any agent): speaks protocol versions
    /// up to N only, like an agent of an older release (rolling upgrades).
    max_protocol: u32 = "DCMIGRATE_TEST_MAX_PROTOCOL"
);

hook!(
    /// `DCMIGRATE_TEST_DROP_AFTER_COMMIT=1` (destination agent): after
    /// committing a switchover, closes the connection instead of answering,
    /// so the source cannot know the outcome.
    drop_after_commit: u8 = "DCMIGRATE_TEST_DROP_AFTER_COMMIT"
);

hook!(
    /// `DCMIGRATE_TEST_STALL_DEVICE_STATE_MS=MS` (destination agent): waits
    /// this long before loading the device state, like a destination that
    /// hangs in the middle of the pause.
    stall_device_state_ms: u64 = "DCMIGRATE_TEST_STALL_DEVICE_STATE_MS"
);

/// Whether this build has the test switches.
pub const ENABLED: bool = cfg!(feature = "test-hooks");
