//! Test-only switches. They are compiled in only with the cargo feature
//! `test-hooks`, which `tests/run` enables; without it every hook is off and
//! the environment is never read, so an operator's build has none of them.

macro_rules! hook {
    ($(#[$doc:meta])* $name:ident: $ty:ty = $var:literal) => {
        $(#[$doc])*
        pub(crate) fn $name() -> Option<$ty> {
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
    /// `DCMIGRATE_TEST_DROP_BEFORE_COMMIT=1` (destination agent): the first
    /// `Resume` of the process closes the connection instead of committing,
    /// so the source cannot know the outcome and the VM is not here.
    drop_before_commit: u8 = "DCMIGRATE_TEST_DROP_BEFORE_COMMIT"
);

hook!(
    /// `DCMIGRATE_TEST_STALL_DEVICE_STATE_MS=MS` (destination agent): waits
    /// this long before loading the device state, like a destination that
    /// hangs in the middle of the pause.
    stall_device_state_ms: u64 = "DCMIGRATE_TEST_STALL_DEVICE_STATE_MS"
);

hook!(
    #[cfg(feature = "rdma")]
    /// `DCMIGRATE_TEST_RDMA_QP_ERROR_AFTER=N` (sending agent): the first RDMA
    /// stream of the process to post its Nth batch then moves its queue pair
    /// to the error state, once, as a link flap past the retry budget would.
    rdma_qp_error_after: u64 = "DCMIGRATE_TEST_RDMA_QP_ERROR_AFTER"
);

hook!(
    #[cfg(feature = "rdma")]
    /// `DCMIGRATE_TEST_RDMA_TARGET_QP_ERROR_AFTER=N` (destination agent): the
    /// first RDMA stream of the process to receive its Nth batch then moves
    /// its queue pair to the error state, once.
    rdma_target_qp_error_after: u64 = "DCMIGRATE_TEST_RDMA_TARGET_QP_ERROR_AFTER"
);

hook!(
    #[cfg(feature = "rdma")]
    /// `DCMIGRATE_TEST_RDMA_UNREACHABLE=N` (destination agent): from the
    /// process's Nth RDMA pairing on (1: all), each queue pair is moved to
    /// the error state as soon as it is connected, so nothing a sender
    /// writes arrives, as when RoCE traffic is dropped on the path.
    rdma_unreachable: u64 = "DCMIGRATE_TEST_RDMA_UNREACHABLE"
);

/// `DCMIGRATE_TEST_GATE=POINT[,POINT…]` with `DCMIGRATE_TEST_GATE_DIR=DIR`
/// (any agent): at each listed point, agent `host` creates
/// `DIR/HOST.POINT.reached` and waits (at most a minute) for
/// `DIR/HOST.POINT.open`, so a test acts at exactly that moment. Points:
/// `incoming-open` (destination, before answering `Open`),
/// `retarget-install` (source, the new destination is open), `final-round`,
/// `verify`, `device-state` (source, in the pause, before each), `commit`
/// (destination, after committing, before answering `Resume`).
pub(crate) async fn gate(host: &str, point: &str) {
    #[cfg(feature = "test-hooks")]
    {
        use std::time::Duration;
        let (Ok(points), Ok(dir)) = (std::env::var("DCMIGRATE_TEST_GATE"), std::env::var("DCMIGRATE_TEST_GATE_DIR"))
        else {
            return;
        };
        if !points.split(',').any(|p| p == point) {
            return;
        }
        let dir = std::path::Path::new(&dir);
        let _ = std::fs::write(dir.join(format!("{host}.{point}.reached")), b"");
        tracing::warn!(point, "test hook: waiting at a gate");
        let open = dir.join(format!("{host}.{point}.open"));
        let end = tokio::time::Instant::now() + Duration::from_secs(60);
        while !open.exists() && tokio::time::Instant::now() < end {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    #[cfg(not(feature = "test-hooks"))]
    let _ = (host, point);
}
