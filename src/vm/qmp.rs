//! A QMP session with one QEMU, on top of the `qapi` crate's typed commands:
//! connect with a timeout, learn QEMU's pid from the socket, and the handful
//! of commands migration needs. One short connection per operation, because
//! a QMP socket serves one client at a time.

use super::VmError;
use qapi::qmp;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

type Stream = qapi::Stream<BufReader<LineLimit>, UnixStream>;

/// Longest line a QEMU may send on its monitor, and most bytes on one
/// connection (events pile up while a command waits for its answer): a
/// hostile QEMU (a peer's VM runs on this host) cannot make the agent
/// buffer without end.
const MAX_LINE: usize = 16 << 20;
const MAX_CONNECTION: usize = 256 << 20;

/// A socket read as lines of at most [`MAX_LINE`] bytes, [`MAX_CONNECTION`] in all.
struct LineLimit {
    inner: UnixStream,
    since_newline: usize,
    total: usize,
}

impl std::io::Read for LineLimit {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        match buf[..n].iter().rposition(|&b| b == b'\n') {
            Some(i) => self.since_newline = n - i - 1,
            None => self.since_newline += n,
        }
        self.total += n;
        if self.since_newline > MAX_LINE || self.total > MAX_CONNECTION {
            return Err(std::io::Error::other(format!(
                "QEMU sent a line over {MAX_LINE} bytes, or {MAX_CONNECTION} on one connection"
            )));
        }
        Ok(n)
    }
}

/// An open QMP connection to one QEMU, capabilities negotiated.
pub struct Qmp {
    qmp: qapi::Qmp<Stream>,
    /// The socket itself, for a command that carries a file descriptor.
    raw: UnixStream,
    path: PathBuf,
    /// QEMU's pid, from the socket's peer credentials.
    pub pid: u32,
}

impl Qmp {
    /// Connects and negotiates capabilities. A QMP socket that is busy with
    /// another client greets nobody: that shows up as a timeout here.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self, VmError> {
        Self::connect_as(path, None, timeout)
    }

    /// Connects to the socket at `path` if it is the file `want` names
    /// (see [`super::ident`]).
    pub fn connect_as(path: &Path, want: Option<super::ident::FileIdent>, timeout: Duration) -> Result<Self, VmError> {
        let err = |msg: String| VmError::Control { path: path.display().to_string(), msg };
        let s = super::ident::connect(path, want).map_err(|e| err(format!("connect: {e}")))?;
        s.set_read_timeout(Some(timeout))
            .and_then(|_| s.set_write_timeout(Some(timeout)))
            .map_err(|e| err(e.to_string()))?;
        let pid = peer_pid(&s).map_err(|e| err(format!("peer credentials: {e}")))?;
        let r = s.try_clone().map_err(|e| err(e.to_string()))?;
        let raw = s.try_clone().map_err(|e| err(e.to_string()))?;
        let r = LineLimit { inner: r, since_newline: 0, total: 0 };
        let mut qmp = qapi::Qmp::new(qapi::Stream::new(BufReader::new(r), s));
        handshake(&mut qmp).map_err(|e| err(format!("QMP handshake (is another client connected?): {e}")))?;
        Ok(Self { qmp, raw, path: path.to_owned(), pid })
    }

    /// Hands QEMU a file descriptor (`add-fd`, the descriptor riding along
    /// as SCM_RIGHTS) and returns the fdset QEMU put it in: QEMU opens it
    /// as `/dev/fdset/ID`, whatever user it runs as and wherever the file is.
    pub fn add_fd(&mut self, fd: std::os::fd::BorrowedFd<'_>) -> Result<u64, VmError> {
        let reply = self.with_fd("add-fd", b"{\"execute\":\"add-fd\"}\n", fd)?;
        reply.get("fdset-id").and_then(serde_json::Value::as_u64).ok_or_else(|| VmError::Control {
            path: self.path.display().to_string(),
            msg: format!("add-fd: reply without fdset-id: {reply}"),
        })
    }

    /// Hands QEMU a file descriptor under `name` (`getfd`), for a command
    /// that takes `fd:NAME` (an incoming migration's stream).
    pub fn get_fd(&mut self, name: &str, fd: std::os::fd::BorrowedFd<'_>) -> Result<(), VmError> {
        let cmd = serde_json::json!({"execute": "getfd", "arguments": {"fdname": name}});
        self.with_fd("getfd", format!("{cmd}\n").as_bytes(), fd).map(drop)
    }

    /// Sends `cmd` with `fd` attached and returns its reply's `return`.
    fn with_fd(
        &mut self,
        what: &str,
        cmd: &[u8],
        fd: std::os::fd::BorrowedFd<'_>,
    ) -> Result<serde_json::Value, VmError> {
        let ctl = |msg: String| VmError::Control { path: self.path.display().to_string(), msg };
        send_with_fd(&self.raw, cmd, fd).map_err(|e| ctl(format!("{what}: {e}")))?;
        let mut line = String::new();
        loop {
            line.clear();
            let n = self.qmp.inner_mut().read_line(&mut line).map_err(|e| ctl(format!("{what}: {e}")))?;
            if n == 0 {
                return Err(ctl(format!("{what}: QEMU closed the connection")));
            }
            let reply: serde_json::Value =
                serde_json::from_str(&line).map_err(|e| ctl(format!("{what}: bad reply: {e}")))?;
            if reply.get("event").is_some() {
                continue;
            }
            if let Some(desc) = reply.pointer("/error/desc") {
                return Err(VmError::Refused { cmd: what.into(), msg: desc.as_str().unwrap_or("?").into() });
            }
            return reply
                .get("return")
                .cloned()
                .ok_or_else(|| ctl(format!("{what}: reply without return: {}", line.trim())));
        }
    }

    /// Runs one command; QEMU's error reply becomes [`VmError::Refused`],
    /// a broken connection [`VmError::Control`].
    pub fn execute<C: qapi::Command>(&mut self, cmd: &C) -> Result<C::Ok, VmError> {
        self.qmp.execute(cmd).map_err(|e| match e {
            qapi::ExecuteError::Qapi(q) => VmError::Refused { cmd: C::NAME.into(), msg: q.desc },
            qapi::ExecuteError::Io(e) => {
                VmError::Control { path: self.path.display().to_string(), msg: format!("{}: {e}", C::NAME) }
            }
        })
    }

    /// QEMU's run state (`running`, `paused`, `inmigrate`…).
    pub fn status(&mut self) -> Result<qmp::RunState, VmError> {
        Ok(self.execute(&qmp::query_status {})?.status)
    }

    /// Waits until the run state satisfies `want` (QEMU changes it asynchronously).
    pub fn wait_status(
        &mut self,
        what: &str,
        timeout: Duration,
        want: impl Fn(qmp::RunState) -> bool,
    ) -> Result<qmp::RunState, VmError> {
        let end = Instant::now() + timeout;
        loop {
            let s = self.status()?;
            if want(s) {
                return Ok(s);
            }
            if Instant::now() > end {
                return Err(VmError::Refused { cmd: what.into(), msg: format!("still {s:?} after {timeout:?}") });
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// A string property of a QOM object (`qom-get`); any other type is an error.
    pub fn qom_get_string(&mut self, path: &str, property: &str) -> Result<String, VmError> {
        let v = self.execute(&qmp::qom_get { path: path.into(), property: property.into() })?;
        let v = serde_json::to_value(v).unwrap_or_default();
        v.as_str().map(str::to_owned).ok_or_else(|| VmError::Refused {
            cmd: "qom-get".into(),
            msg: format!("{path}.{property} is not a string: {v}"),
        })
    }

    /// Device state only: shared RAM stays where it is, and nothing is capped.
    pub fn prepare_device_migration(&mut self) -> Result<(), VmError> {
        self.set_ignore_shared(true)
    }

    /// Turns QEMU's `x-ignore-shared` capability on or off.
    pub fn set_ignore_shared(&mut self, on: bool) -> Result<(), VmError> {
        self.execute(&qmp::migrate_set_capabilities {
            capabilities: vec![qmp::MigrationCapabilityStatus {
                capability: qmp::MigrationCapability::x_ignore_shared,
                state: on,
            }],
        })?;
        Ok(())
    }

    /// Lifts QEMU's migration bandwidth cap for the device state transfer.
    pub fn uncap_bandwidth(&mut self) -> Result<(), VmError> {
        // QEMU's default cap (32 MiB/s) would stretch the downtime.
        self.set_bandwidth(u32::MAX as u64)
    }

    /// Sets QEMU's migration bandwidth cap (bytes per second).
    pub fn set_bandwidth(&mut self, bytes_per_s: u64) -> Result<(), VmError> {
        self.execute(&qmp::migrate_set_parameters(qmp::MigrateSetParameters {
            max_bandwidth: Some(bytes_per_s),
            ..Default::default()
        }))?;
        Ok(())
    }

    /// QEMU's migration bandwidth cap (bytes per second), if it says.
    pub fn bandwidth(&mut self) -> Result<Option<u64>, VmError> {
        Ok(self.execute(&qmp::query_migrate_parameters {})?.max_bandwidth)
    }

    /// The migration capabilities that are on, by name (read as names:
    /// QEMU releases differ in the set they know).
    pub fn enabled_capabilities(&mut self) -> Result<Vec<String>, VmError> {
        Ok(self.execute(&QueryCapabilities {})?.into_iter().filter(|c| c.state).map(|c| c.capability).collect())
    }

    /// The state of QEMU's own migration (`query-migrate`).
    pub fn query_migrate(&mut self) -> Result<qmp::MigrationInfo, VmError> {
        self.execute(&qmp::query_migrate {})
    }
}

/// QEMU's greeting, then capabilities negotiation. `qapi` panics on a
/// stream that ends before the greeting (a QEMU exiting as we connect): an
/// error here. Public for the fuzz target `qmp_reply` (tests/fuzz).
#[doc(hidden)]
pub fn handshake<S: BufRead + Write>(qmp: &mut qapi::Qmp<S>) -> Result<qmp::QMP, qapi::ExecuteError> {
    if qmp.inner_mut().fill_buf()?.is_empty() {
        return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "closed before QEMU's greeting").into());
    }
    qmp.handshake()
}

/// `query-migrate-capabilities` with the capabilities as plain names
/// (public, hidden, for the fuzz target `qmp_reply`).
#[doc(hidden)]
#[derive(serde::Serialize)]
pub struct QueryCapabilities {}

/// One capability and whether it is on.
#[doc(hidden)]
#[derive(serde::Deserialize)]
pub struct CapabilityState {
    capability: String,
    state: bool,
}

impl qapi::Command for QueryCapabilities {
    type Ok = Vec<CapabilityState>;
    const NAME: &'static str = "query-migrate-capabilities";
    const ALLOW_OOB: bool = false;
}

/// Writes `msg` with `fd` attached (SCM_RIGHTS) in one `sendmsg`.
fn send_with_fd(s: &UnixStream, msg: &[u8], fd: std::os::fd::BorrowedFd<'_>) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let raw = fd.as_raw_fd();
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<libc::c_int>() as u32) } as usize;
    // u64 words keep the control buffer aligned for cmsghdr.
    let mut ctl = vec![0u64; space.div_ceil(8)];
    let mut iov = libc::iovec { iov_base: msg.as_ptr() as *mut libc::c_void, iov_len: msg.len() };
    // SAFETY: msghdr is plain data; every pointer set below outlives sendmsg.
    let mut hdr: libc::msghdr = unsafe { std::mem::zeroed() };
    hdr.msg_iov = &raw mut iov;
    hdr.msg_iovlen = 1;
    hdr.msg_control = ctl.as_mut_ptr().cast();
    hdr.msg_controllen = space as _;
    // SAFETY: the control buffer holds one cmsghdr with room for one int
    // (CMSG_SPACE above); CMSG_FIRSTHDR points into it.
    unsafe {
        let c = libc::CMSG_FIRSTHDR(&hdr);
        (*c).cmsg_level = libc::SOL_SOCKET;
        (*c).cmsg_type = libc::SCM_RIGHTS;
        (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<libc::c_int>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<libc::c_int>(), raw);
    }
    // SAFETY: hdr points at live buffers; a short write of a message this
    // small on a unix stream socket does not happen, but is checked.
    let n = unsafe { libc::sendmsg(s.as_raw_fd(), &hdr, libc::MSG_NOSIGNAL) };
    match n {
        n if n < 0 => Err(std::io::Error::last_os_error()),
        n if n as usize != msg.len() => Err(std::io::Error::other("short write")),
        _ => Ok(()),
    }
}

fn peer_pid(s: &UnixStream) -> std::io::Result<u32> {
    use std::os::fd::AsRawFd;
    let mut cred = libc::ucred { pid: 0, uid: 0, gid: 0 };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`.
    let rc = unsafe {
        libc::getsockopt(s.as_raw_fd(), libc::SOL_SOCKET, libc::SO_PEERCRED, (&raw mut cred).cast(), &mut len)
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    u32::try_from(cred.pid).map_err(|_| std::io::Error::other("no peer pid"))
}

/// The pid behind a unix socket (QEMU's QMP, the synthetic guest's
/// control), if it is the file `want` names.
pub fn socket_peer_pid(path: &Path, want: Option<super::ident::FileIdent>) -> std::io::Result<u32> {
    peer_pid(&super::ident::connect(path, want)?)
}
