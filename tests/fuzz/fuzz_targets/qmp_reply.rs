//! `qmp_reply`: what QEMU (or whatever listens on its QMP socket) writes to
//! the agent: the greeting, then one reply per command, events in between.
//! Parsed by the `qapi` crate exactly as `dcmigrate::vm::qmp::Qmp` uses it
//! (same `Stream<BufReader<_>, _>` framing, line by line), with the input as
//! QEMU's side of the socket.
//!
//! Runs the handshake (`vm::qmp::handshake`, as `Qmp::connect` does) and
//! then, while the stream lasts, the commands `Qmp` issues, each reading its
//! typed reply (`query-status`, `qom-get`, `migrate-set-capabilities`,
//! `migrate-set-parameters`, `query-migrate-parameters`,
//! `query-migrate-capabilities` as names, `query-migrate`). Checks that no
//! reply, however malformed (or missing: regressions/qmp_reply), panics.
#![no_main]

use dcmigrate::vm::qmp::{handshake, QueryCapabilities};
use libfuzzer_sys::fuzz_target;
use qapi::qmp;
use std::io::{BufReader, Sink};

type Stream<'a> = qapi::Stream<BufReader<&'a [u8]>, Sink>;

fn commands(q: &mut qapi::Qmp<Stream<'_>>) -> Result<(), qapi::ExecuteError> {
    q.execute(&qmp::query_status {})?;
    let v = q.execute(&qmp::qom_get { path: "/machine".into(), property: "type".into() })?;
    let _ = serde_json::to_value(v).unwrap_or_default();
    q.execute(&qmp::migrate_set_capabilities {
        capabilities: vec![qmp::MigrationCapabilityStatus {
            capability: qmp::MigrationCapability::x_ignore_shared,
            state: true,
        }],
    })?;
    q.execute(&qmp::migrate_set_parameters(qmp::MigrateSetParameters {
        max_bandwidth: Some(u32::MAX as u64),
        ..Default::default()
    }))?;
    q.execute(&qmp::query_migrate_parameters {})?;
    q.execute(&QueryCapabilities {})?;
    q.execute(&qmp::query_migrate {})?;
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let mut q = qapi::Qmp::new(qapi::Stream::new(BufReader::new(data), std::io::sink()));
    if handshake(&mut q).is_err() {
        return;
    }
    // A refused command (QEMU's error reply) is answered and the next goes
    // on, as in the agent; a broken or malformed stream ends it.
    while !matches!(commands(&mut q), Err(qapi::ExecuteError::Io(_))) {}
    q.events().for_each(drop);
});
