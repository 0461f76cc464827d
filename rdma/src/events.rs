//! A device's asynchronous events (a port going down or up, its GID table
//! changing, the device failing), read from the context's event file
//! without blocking, through tokio.

use crate::{chain, Device, RdmaError};
use rdma_mummy_sys::{ibv_ack_async_event, ibv_async_event, ibv_get_async_event};
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use tokio::io::unix::AsyncFd;

/// What happened to the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceEvent {
    /// A port became active.
    PortActive(u8),
    /// A port went down (link lost, netdev down).
    PortDown(u8),
    /// A port's GID table changed (addresses came or went).
    GidChange(u8),
    /// The device failed; nothing on it works any more.
    DeviceFatal,
    /// Anything else (queue pair and completion queue events among them),
    /// by its `ibv_event_type` number.
    Other(u32),
}

/// The event file of a device's context (owned by the context).
struct EventFd(RawFd);

impl AsRawFd for EventFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

/// A device's events, one at a time.
pub struct DeviceEvents {
    // Before `dev`: deregistered from the reactor while the file is open.
    fd: AsyncFd<EventFd>,
    dev: Arc<Device>,
}

impl Device {
    /// Its asynchronous events. Must be called inside a tokio runtime.
    pub fn events(self: &Arc<Self>) -> Result<DeviceEvents, RdmaError> {
        let verr = |op, e: std::io::Error| RdmaError::Verbs { op, msg: chain(&e) };
        // SAFETY: the context is open while `self` lives, and DeviceEvents
        // keeps `self`; async_fd is a plain field set when it was opened.
        let fd = unsafe { (*self.ctx.context().as_ptr()).async_fd };
        // SAFETY: fcntl on a file descriptor the context owns; only its
        // status flags change (non-blocking, so reads never stall a worker).
        let rc = unsafe {
            let flags = libc::fcntl(fd, libc::F_GETFL);
            if flags < 0 {
                flags
            } else {
                libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK)
            }
        };
        if rc < 0 {
            return Err(verr("making the async event file non-blocking", std::io::Error::last_os_error()));
        }
        // SAFETY: the file stays open while registered: DeviceEvents holds
        // the device (and its context), and drops `fd` first.
        let fd = unsafe { AsyncFd::register_with_interest(EventFd(fd), tokio::io::Interest::READABLE) }
            .map_err(|e| RdmaError::Verbs { op: "registering the async event file", msg: e.to_string() })?;
        Ok(DeviceEvents { fd, dev: self.clone() })
    }
}

impl DeviceEvents {
    /// The next event (acknowledged before it is returned).
    pub async fn next(&self) -> Result<DeviceEvent, RdmaError> {
        loop {
            let mut ready = self
                .fd
                .readable()
                .await
                .map_err(|e| RdmaError::Verbs { op: "waiting for an async event", msg: chain(&e) })?;
            let mut ev = MaybeUninit::<ibv_async_event>::uninit();
            // SAFETY: the context is open (we hold its device); the event is
            // written into memory we own.
            let rc = unsafe { ibv_get_async_event(self.dev.ctx.context().as_ptr(), ev.as_mut_ptr()) };
            if rc != 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::WouldBlock {
                    ready.clear_ready();
                    continue;
                }
                return Err(RdmaError::Verbs { op: "ibv_get_async_event", msg: chain(&e) });
            }
            let p = ev.as_mut_ptr();
            // SAFETY: ibv_get_async_event filled the event. The type is read
            // as the C enum's u32 (a newer kernel's value is no Rust enum
            // variant), the element as the port number (only port events are
            // asked for it); then the event is acknowledged, once.
            let (kind, port) = unsafe {
                let kind = std::ptr::addr_of!((*p).event_type).cast::<u32>().read();
                let port = std::ptr::addr_of!((*p).element).cast::<libc::c_int>().read();
                ibv_ack_async_event(p);
                (kind, u8::try_from(port).unwrap_or(0))
            };
            return Ok(match kind {
                8 => DeviceEvent::DeviceFatal,
                9 => DeviceEvent::PortActive(port),
                10 => DeviceEvent::PortDown(port),
                18 => DeviceEvent::GidChange(port),
                k => DeviceEvent::Other(k),
            });
        }
    }
}
