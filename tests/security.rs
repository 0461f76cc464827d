//! Peers must authenticate; a remote writer can never write outside what it was given.

mod common;
use common::*;
use dcmigrate::control as peer;
use dcmigrate::memory::{GuestRam, Layout, RegionSpec, PAGE_SIZE};
use dcmigrate::protocol::data::*;
use dcmigrate::protocol::{read_message, write_message, Message, ProtocolError, RemoteOutcome, Token, TOKEN_LEN};
use dcmigrate::tls::{init_certs, TlsConfig};
use dcmigrate::transport::secure::{ClientTls, DataStream};
use dcmigrate::transport::Receiver;
use dcmigrate::transport::TransportError;
use dcmigrate::vm::LaunchSpec;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn rogue_tls(host: &str) -> (tempfile::TempDir, TlsConfig) {
    let d = tempfile::tempdir().unwrap();
    init_certs(d.path(), &["hostA".into(), "hostB".into(), "hostC".into()]).unwrap();
    let t = TlsConfig::load_dir(d.path(), host).unwrap();
    (d, t)
}

#[tokio::test(flavor = "multi_thread")]
async fn agents_refuse_peers_outside_the_ca() {
    let tb = testbed(&["hostA", "hostB"]);
    let a = tb.host("hostA").control;
    // A client whose certificate another CA signed.
    let (_d, rogue) = rogue_tls("hostB");
    let e = peer::connect(&rogue, "hostB", "hostA", a).await.err().expect("rogue client accepted");
    assert!(e.to_string().contains("hostA"), "{e}");
    // A legitimate certificate for hostB cannot pretend to be hostA.
    let legit_b = TlsConfig::load_dir(&tb.certs_dir(), "hostB").unwrap();
    assert!(peer::connect(&legit_b, "hostA", "hostA", a).await.is_err(), "identity not checked");
    // The same legitimate client with its true name gets in (the test can fail).
    assert!(peer::connect(&legit_b, "hostB", "hostA", a).await.is_ok(), "legit peer refused");

    // A server outside the CA is refused by a legitimate client.
    let (_d2, rogue_server) = rogue_tls("hostC");
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        if let Ok((s, _)) = l.accept().await {
            let _ = peer::accept(&rogue_server, "hostC", |_: &str| true, s).await;
        }
    });
    let legit_a = TlsConfig::load_dir(&tb.certs_dir(), "hostA").unwrap();
    assert!(peer::connect(&legit_a, "hostA", "hostC", addr).await.is_err(), "rogue server accepted");
}

struct Rig {
    ram: Arc<GuestRam>,
    addr: std::net::SocketAddr,
    token: Token,
    _dir: tempfile::TempDir,
}

async fn rig() -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let layout = Layout::new(
        vec![
            RegionSpec { id: "a".into(), size: 16 * PAGE_SIZE as u64 },
            RegionSpec { id: "b".into(), size: 8 * PAGE_SIZE as u64 },
        ],
        4 * PAGE_SIZE as u64,
    )
    .unwrap();
    let ram = Arc::new(GuestRam::create(layout, &[dir.path().join("a"), dir.path().join("b")]).unwrap());
    let rx = Receiver::default();
    let token = Token([7u8; TOKEN_LEN]);
    rx.add(token, ram.clone(), None, true);
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(rx.serve(l, Default::default()));
    Rig { ram, addr, token, _dir: dir }
}

fn all_zero(ram: &GuestRam) -> bool {
    region(ram, 0).iter().chain(&region(ram, 1)).all(|&b| b == 0)
}

fn region(ram: &GuestRam, r: u32) -> Vec<u8> {
    let mut out = vec![0u8; ram.layout().regions()[r as usize].size as usize];
    ram.read_at(r, 0, &mut out).unwrap();
    out
}

async fn open(r: &Rig, token: &Token) -> (TcpStream, HelloStatus) {
    let mut s = TcpStream::connect(r.addr).await.unwrap();
    s.write_all(&Hello::new(*token, 0, StreamMode::Tcp).encode()).await.unwrap();
    let mut st = [0u8; 1];
    s.read_exact(&mut st).await.unwrap();
    (s, HelloStatus::try_from(st[0]).unwrap())
}

/// Sends a pages frame with payload, then a batch end; returns the reply.
async fn send(
    s: &mut (impl AsyncRead + AsyncWrite + Unpin),
    header: [u8; HEADER_LEN],
    payload_len: usize,
) -> Option<Reply> {
    let _ = s.write_all(&header).await;
    let _ = s.write_all(&vec![0xAB; payload_len]).await;
    let _ = s.write_all(&Frame::BatchEnd { batch: 9 }.encode()).await;
    let _ = s.flush().await;
    let mut b = [0u8; REPLY_LEN];
    s.read_exact(&mut b).await.ok()?;
    Reply::decode(&b).ok()
}

#[tokio::test]
async fn data_plane_rejects_bad_tokens_and_frames_and_writes_nothing() {
    let r = rig().await;
    let (_, st) = open(&r, &Token([1u8; TOKEN_LEN])).await;
    assert_eq!(st, HelloStatus::BadToken);

    let page = PAGE_SIZE as u32;
    let cases = [
        ("unknown region", Frame::Pages { region: 2, offset: 0, len: page }.encode(), RejectCode::OutOfBounds),
        (
            "past the region end",
            Frame::Pages { region: 1, offset: 7 * page as u64, len: 2 * page }.encode(),
            RejectCode::OutOfBounds,
        ),
        (
            "offset overflow",
            Frame::Pages { region: 0, offset: u64::MAX - 4095, len: page }.encode(),
            RejectCode::OutOfBounds,
        ),
        (
            "unaligned",
            {
                let mut h = Frame::Pages { region: 0, offset: 0, len: page }.encode();
                h[8] = 8;
                h
            },
            RejectCode::BadFrame,
        ),
        (
            "huge length",
            {
                let mut h = Frame::Pages { region: 0, offset: 0, len: page }.encode();
                h[16..20].copy_from_slice(&u32::MAX.to_le_bytes());
                h
            },
            RejectCode::BadFrame,
        ),
    ];
    for (what, header, code) in cases {
        let (mut s, st) = open(&r, &r.token).await;
        assert_eq!(st, HelloStatus::Ok);
        assert_eq!(send(&mut s, header, PAGE_SIZE).await, Some(Reply::Rejected { code }), "{what}");
        assert!(all_zero(&r.ram), "{what}: a rejected frame wrote into guest RAM");
    }
    // A valid frame lands and is acknowledged (so the checks above can fail).
    let (mut s, _) = open(&r, &r.token).await;
    let h = Frame::Pages { region: 1, offset: 7 * page as u64, len: page }.encode();
    assert_eq!(send(&mut s, h, PAGE_SIZE).await, Some(Reply::Applied { batch: 9 }));
    assert!(region(&r.ram, 1)[7 * PAGE_SIZE..].iter().all(|&b| b == 0xAB));
    assert!(region(&r.ram, 0).iter().all(|&b| b == 0));
}

/// A source played by hand: `me`'s real certificate, the control protocol
/// spoken message by message.
async fn as_source(tb: &dcmigrate::testbed::Testbed, me: &str, to: &str) -> peer::Connected<peer::ClientStream> {
    let tls = TlsConfig::load_dir(&tb.certs_dir(), me).unwrap();
    peer::connect(&tls, me, to, tb.host(to).control).await.expect("connect as a source")
}

async fn ask(c: &mut peer::Connected<peer::ClientStream>, m: Message) -> Result<Message, ProtocolError> {
    write_message(&mut c.stream, &m).await.unwrap();
    read_message(&mut c.stream).await
}

fn synthetic_session(vm: &str, size: u64) -> Message {
    Message::OpenSession {
        vm: vm.into(),
        regions: vec![RegionSpec { id: "ram0".into(), size }],
        chunk_size: 2 << 20,
        launch: LaunchSpec::Synthetic { workload: Default::default() },
        rdma_slices: false,
        holes: 0,
        migration: Some(dcmigrate::protocol::MigrationId::random()),
        page_sizes: vec![],
        transport: None,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_destination_takes_migrations_only_from_the_peers_it_accepts() {
    let mut tb = testbed(&["hostA", "hostB", "hostC"]);
    tb.restart_agent("hostA", &[("DCMIGRATE_ACCEPT_FROM", "hostC")]).unwrap();
    let a = tb.host("hostA").control;
    let b = TlsConfig::load_dir(&tb.certs_dir(), "hostB").unwrap();
    let e = peer::connect(&b, "hostB", "hostA", a).await.err().expect("hostB accepted");
    let msg = dcmigrate::error_chain(&e);
    assert!(msg.contains("does not accept migrations from hostB"), "{msg}");
    // The peer it does accept gets in (so the refusal can fail).
    let c = TlsConfig::load_dir(&tb.certs_dir(), "hostC").unwrap();
    assert!(peer::connect(&c, "hostC", "hostA", a).await.is_ok(), "hostC refused");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_session_larger_than_the_data_dir_is_refused_without_allocating() {
    let tb = testbed(&["hostA", "hostB"]);
    let mut c = as_source(&tb, "hostB", "hostA").await;
    match ask(&mut c, synthetic_session("huge", 16 << 40)).await {
        Err(ProtocolError::Peer(msg)) => assert!(msg.contains("do not fit"), "{msg}"),
        other => panic!("16 TiB session: {other:?}"),
    }
    assert!(vm_files(&tb, "hostA", "huge").is_empty(), "files left: {:?}", vm_files(&tb, "hostA", "huge"));
    // One that fits opens on the same connection (so the refusal can fail).
    let opened = ask(&mut c, synthetic_session("small", 8 * MIB)).await;
    assert!(matches!(opened, Ok(Message::SessionOpened { .. })), "{opened:?}");
}

/// Once the pause's verification began, a stream with the session's token
/// is refused (a sniffed token cannot write a page the verification did not
/// see); streams already open stay usable for the pause's resends.
#[tokio::test(flavor = "multi_thread")]
async fn data_streams_are_refused_once_the_pause_verification_began() {
    let tb = testbed(&["hostA", "hostB"]);
    let mut c = as_source(&tb, "hostB", "hostA").await;
    let (port, token) = match ask(&mut c, synthetic_session("sealed", 8 * MIB)).await {
        Ok(Message::SessionOpened { data_port, token, .. }) => (data_port, token),
        other => panic!("open: {other:?}"),
    };
    let addr = std::net::SocketAddr::new(tb.host("hostA").control.ip(), port);
    let tls = data_tls(&tb, "hostB", "hostA");
    let mut before = stream(addr, &token, Some(&tls)).await.expect("a stream before the pause");
    // A live pass does not seal.
    let live = Message::ChecksumRequest { blocks: Some(vec![0]), block_pages: Some(4), pause: false };
    assert!(matches!(ask(&mut c, live).await, Ok(Message::Checksums { .. })));
    assert!(stream(addr, &token, Some(&tls)).await.is_ok(), "sealed before the pause");
    let paused = Message::ChecksumRequest { blocks: Some(vec![0]), block_pages: Some(4), pause: true };
    assert!(matches!(ask(&mut c, paused).await, Ok(Message::Checksums { .. })));
    let e = stream(addr, &token, Some(&tls)).await.err().expect("a stream after the pause's verification began");
    assert!(matches!(e, TransportError::Refused(HelloStatus::Sealed)), "{e}");
    let h = Frame::Pages { region: 0, offset: 0, len: PAGE_SIZE as u32 }.encode();
    assert_eq!(send(&mut before, h, PAGE_SIZE).await, Some(Reply::Applied { batch: 9 }), "an open stream was cut");
}

/// The TCP data plane is encrypted by default: a plain stream is refused
/// even with the right token (one seen on the path is useless), and so is a
/// TLS stream from outside the CA; an agent set to `--data-encryption off`
/// takes plain streams, and one that encrypts sends to it in TLS.
#[tokio::test(flavor = "multi_thread")]
async fn data_streams_must_be_encrypted_by_a_peer_unless_the_operator_says_off() {
    let mut tb = testbed(&["hostA", "hostB"]);
    let mut c = as_source(&tb, "hostB", "hostA").await;
    let (port, token) = match ask(&mut c, synthetic_session("wire", 8 * MIB)).await {
        Ok(Message::SessionOpened { data_port, token, .. }) => (data_port, token),
        other => panic!("open: {other:?}"),
    };
    let addr = std::net::SocketAddr::new(tb.host("hostA").control.ip(), port);
    let e = stream(addr, &token, None).await.err().expect("a plain stream was accepted");
    assert!(matches!(e, TransportError::Refused(HelloStatus::EncryptionRequired)), "{e}");
    let (_d, rogue) = rogue_tls("hostB");
    let outsider = ClientTls { config: rogue.client, host: "hostA".into() };
    assert!(stream(addr, &token, Some(&outsider)).await.is_err(), "a certificate outside the CA was accepted");
    let mut s = stream(addr, &token, Some(&data_tls(&tb, "hostB", "hostA"))).await.expect("a peer's TLS stream");
    assert!(matches!(s, DataStream::Sealed(_)), "both ends offer sealed records: they are used");
    let h = Frame::Pages { region: 0, offset: 0, len: PAGE_SIZE as u32 }.encode();
    assert_eq!(send(&mut s, h, PAGE_SIZE).await, Some(Reply::Applied { batch: 9 }));
    // Bounds are checked inside sealed records too.
    let mut s = stream(addr, &token, Some(&data_tls(&tb, "hostB", "hostA"))).await.expect("a peer's TLS stream");
    let outside = Frame::Pages { region: 0, offset: 8 * MIB, len: PAGE_SIZE as u32 }.encode();
    assert_eq!(send(&mut s, outside, PAGE_SIZE).await, Some(Reply::Rejected { code: RejectCode::OutOfBounds }));
    // A sender of an earlier release (TLS without ALPN) keeps TLS's records.
    let mut old = legacy_tls_stream(addr, &token, &data_tls(&tb, "hostB", "hostA")).await;
    let h = Frame::Pages { region: 0, offset: PAGE_SIZE as u64, len: PAGE_SIZE as u32 }.encode();
    assert_eq!(send(&mut old, h, PAGE_SIZE).await, Some(Reply::Applied { batch: 9 }));
    drop(c);

    // Encryption off on the destination: plain streams are taken, TLS too.
    tb.restart_agent("hostA", &[("DCMIGRATE_DATA_ENCRYPTION", "off")]).unwrap();
    let mut c = as_source(&tb, "hostB", "hostA").await;
    let (port, token) = match ask(&mut c, synthetic_session("plain", 8 * MIB)).await {
        Ok(Message::SessionOpened { data_port, token, .. }) => (data_port, token),
        other => panic!("open: {other:?}"),
    };
    let addr = std::net::SocketAddr::new(tb.host("hostA").control.ip(), port);
    let mut s = stream(addr, &token, None).await.expect("a plain stream with encryption off");
    let h = Frame::Pages { region: 0, offset: 0, len: PAGE_SIZE as u32 }.encode();
    assert_eq!(send(&mut s, h, PAGE_SIZE).await, Some(Reply::Applied { batch: 9 }));
    assert!(stream(addr, &token, Some(&data_tls(&tb, "hostB", "hostA"))).await.is_ok());
}

fn data_tls(tb: &dcmigrate::testbed::Testbed, me: &str, to: &str) -> ClientTls {
    ClientTls { config: TlsConfig::load_dir(&tb.certs_dir(), me).unwrap().client, host: to.into() }
}

/// A TLS data stream as agents before sealed records opened it (no ALPN).
async fn legacy_tls_stream(
    addr: std::net::SocketAddr,
    token: &Token,
    tls: &ClientTls,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from(tls.host.clone()).unwrap();
    let mut s = tokio_rustls::TlsConnector::from(tls.config.clone()).connect(name, tcp).await.unwrap();
    assert_eq!(s.get_ref().1.alpn_protocol(), None);
    s.write_all(&Hello::new(*token, 0, StreamMode::Tcp).encode()).await.unwrap();
    s.flush().await.unwrap();
    let mut st = [0u8; 1];
    s.read_exact(&mut st).await.unwrap();
    assert_eq!(HelloStatus::try_from(st[0]), Ok(HelloStatus::Ok));
    s
}

/// A data stream to `addr` for `token`, over TLS when `tls` is given.
async fn stream(
    addr: std::net::SocketAddr,
    token: &Token,
    tls: Option<&ClientTls>,
) -> Result<DataStream, TransportError> {
    stream_as(addr, token, 0, tls).await
}

/// A data stream as sender `sender`.
async fn stream_as(
    addr: std::net::SocketAddr,
    token: &Token,
    sender: u8,
    tls: Option<&ClientTls>,
) -> Result<DataStream, TransportError> {
    dcmigrate::transport::handshake::open(addr, Hello::new(*token, sender, StreamMode::Tcp), tls).await
}

/// Opens a session on hostA as its source hostB; the data address and the source's token.
async fn session_on_a(
    tb: &dcmigrate::testbed::Testbed,
    c: &mut peer::Connected<peer::ClientStream>,
    vm: &str,
) -> (std::net::SocketAddr, Token) {
    match ask(c, synthetic_session(vm, 8 * MIB)).await {
        Ok(Message::SessionOpened { data_port, token, .. }) => {
            (std::net::SocketAddr::new(tb.host("hostA").control.ip(), data_port), token)
        }
        other => panic!("open: {other:?}"),
    }
}

/// A forwarder's token for host `host`, as sender `sender`.
async fn forwarder_token(c: &mut peer::Connected<peer::ClientStream>, sender: u8, host: &str) -> Token {
    match ask(c, Message::AddSender { sender, host: host.into(), rdma: false }).await {
        Ok(Message::SenderAdded { token, .. }) => token,
        other => panic!("add_sender: {other:?}"),
    }
}

fn refused(r: Result<DataStream, TransportError>) -> HelloStatus {
    match r {
        Err(TransportError::Refused(s)) => s,
        Err(e) => panic!("refused otherwise: {e}"),
        Ok(_) => panic!("accepted"),
    }
}

/// Each sender's data-plane token is its own: bound to its sender id and
/// to the host its certificate names. A forwarder's token is refused from
/// another host or as another sender, the source's token is refused from
/// the forwarder, and once the source fences the forwarder its token is
/// refused for good and its open stream is cut; the source's stream goes on.
#[tokio::test(flavor = "multi_thread")]
async fn a_forwarders_token_is_its_own_and_dies_with_its_fence() {
    let tb = testbed(&["hostA", "hostB", "hostC"]);
    let mut c = as_source(&tb, "hostB", "hostA").await;
    let (addr, source_token) = session_on_a(&tb, &mut c, "fwd").await;
    let forwarder = forwarder_token(&mut c, 1, "hostC").await;
    let (tls_b, tls_c) = (data_tls(&tb, "hostB", "hostA"), data_tls(&tb, "hostC", "hostA"));
    let mut live = stream_as(addr, &forwarder, 1, Some(&tls_c)).await.expect("the forwarder's own stream");
    let mut source = stream_as(addr, &source_token, 0, Some(&tls_b)).await.expect("the source's stream");
    assert_eq!(refused(stream_as(addr, &forwarder, 1, Some(&tls_b)).await), HelloStatus::WrongSender, "another host");
    assert_eq!(refused(stream_as(addr, &forwarder, 2, Some(&tls_c)).await), HelloStatus::WrongSender, "another id");
    assert_eq!(refused(stream_as(addr, &source_token, 0, Some(&tls_c)).await), HelloStatus::WrongSender);
    assert_eq!(refused(stream_as(addr, &source_token, 1, Some(&tls_c)).await), HelloStatus::WrongSender);
    let h = Frame::Pages { region: 0, offset: 0, len: PAGE_SIZE as u32 }.encode();
    assert_eq!(send(&mut live, h, PAGE_SIZE).await, Some(Reply::Applied { batch: 9 }), "the forwarder writes");
    assert!(matches!(ask(&mut c, Message::Fence { sender: 1 }).await, Ok(Message::Ok)));
    assert_eq!(refused(stream_as(addr, &forwarder, 1, Some(&tls_c)).await), HelloStatus::BadToken, "revoked");
    assert_eq!(send(&mut live, h, PAGE_SIZE).await, None, "the fenced forwarder's stream still writes");
    assert_eq!(send(&mut source, h, PAGE_SIZE).await, Some(Reply::Applied { batch: 9 }), "the source's was cut");
    // A host that may not send data here gets no token.
    let e =
        ask(&mut c, Message::AddSender { sender: 3, host: "hostZ".into(), rdma: false }).await.unwrap_err().to_string();
    assert!(e.contains("hostZ"), "{e}");
}

/// When the pause's verification begins, only the source's streams go
/// on: a forwarder's open stream is cut and its token refused, so nothing
/// but the source can change what is being verified.
#[tokio::test(flavor = "multi_thread")]
async fn a_forwarders_stream_is_cut_when_the_pause_verification_begins() {
    let tb = testbed(&["hostA", "hostB", "hostC"]);
    let mut c = as_source(&tb, "hostB", "hostA").await;
    let (addr, source_token) = session_on_a(&tb, &mut c, "seal").await;
    let forwarder = forwarder_token(&mut c, 1, "hostC").await;
    let tls_c = data_tls(&tb, "hostC", "hostA");
    let mut live = stream_as(addr, &forwarder, 1, Some(&tls_c)).await.expect("the forwarder's stream");
    let mut source = stream(addr, &source_token, Some(&data_tls(&tb, "hostB", "hostA"))).await.unwrap();
    let paused = Message::ChecksumRequest { blocks: Some(vec![0]), block_pages: Some(4), pause: true };
    assert!(matches!(ask(&mut c, paused).await, Ok(Message::Checksums { .. })));
    let h = Frame::Pages { region: 0, offset: 0, len: PAGE_SIZE as u32 }.encode();
    assert_eq!(send(&mut live, h, PAGE_SIZE).await, None, "a forwarder wrote after the pause's verification began");
    assert_eq!(refused(stream_as(addr, &forwarder, 1, Some(&tls_c)).await), HelloStatus::BadToken);
    assert_eq!(send(&mut source, h, PAGE_SIZE).await, Some(Reply::Applied { batch: 9 }), "the source's was cut");
}

/// CPU seconds `pid` has used (user + system).
fn cpu_s(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces): utime, stime are 14 and 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let f: Vec<f64> = rest.split_whitespace().filter_map(|x| x.parse().ok()).collect();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (f.get(11).copied().unwrap_or(0.0) + f.get(12).copied().unwrap_or(0.0)) / hz
}

/// A connection flood on both listeners, under a low file-descriptor
/// limit, neither spins the agent nor locks it up: it uses little CPU
/// during the flood, its API answers, and once the flood ends a migration
/// to it completes byte for byte.
#[test]
fn a_connection_flood_under_a_low_fd_limit_leaves_the_agent_usable() {
    let mut tb = testbed(&["hostA", "hostB"]);
    tb.start_guest("hostA", "flooded", 16 * MIB, &workload(1.0), false, &[]).unwrap();
    let pid = tb.agent_pid("hostB").expect("hostB's agent");
    let lim = libc::rlimit { rlim_cur: 128, rlim_max: 128 };
    // SAFETY: sets the limit of our own child process; `lim` outlives the call.
    assert_eq!(unsafe { libc::prlimit(pid as i32, libc::RLIMIT_NOFILE, &lim, std::ptr::null_mut()) }, 0);
    let control = tb.host("hostB").control;
    let data = std::net::SocketAddr::new(control.ip(), tb.client("hostB").info().unwrap().data_port);
    // Twice the limit, held open and silent (a TLS handshake that never comes).
    let flood: Vec<std::net::TcpStream> = (0..256)
        .flat_map(|_| [control, data])
        .filter_map(|a| std::net::TcpStream::connect_timeout(&a, std::time::Duration::from_secs(2)).ok())
        .collect();
    assert!(flood.len() > 128, "only {} flood connections", flood.len());
    let (cpu0, t0) = (cpu_s(pid), std::time::Instant::now());
    std::thread::sleep(std::time::Duration::from_secs(3));
    let busy = (cpu_s(pid) - cpu0) / t0.elapsed().as_secs_f64();
    assert!(busy < 0.5, "the agent used {:.0} % of a core during the flood", busy * 100.0);
    assert!(tb.client("hostB").info().is_ok(), "the API did not answer during the flood");
    drop(flood);
    let r = migrate(&tb, "hostA", "flooded", "hostB", Default::default());
    assert_eq!(r.result, dcmigrate::engine::Outcome::Completed, "{r:#?}");
    assert!(r.verified);
    assert_eq!(state(&tb, "hostB", "flooded").map(|s| s.phase.is_some()), Some(true));
}

/// Connections of `held` the server closed (read at once as the end of
/// the stream): refused by its caps, as no byte was ever sent.
fn closed_by_server(held: &[socket2::Socket]) -> usize {
    held.iter()
        .filter(|s| {
            s.set_nonblocking(true).is_ok() && {
                let mut b = [std::mem::MaybeUninit::<u8>::uninit(); 1];
                matches!(s.peek(&mut b), Ok(0))
            }
        })
        .count()
}

/// Keeps `addrs` dialled full of idle connections (opened, never written)
/// from loopback addresses that are not any agent's, until `stop`; counts
/// the connections the servers closed at once (refused by their caps).
fn flood(addrs: Vec<std::net::SocketAddr>, stop: Arc<std::sync::atomic::AtomicBool>) -> std::thread::JoinHandle<usize> {
    std::thread::spawn(move || {
        use std::sync::atomic::Ordering;
        let mut refused = 0;
        while !stop.load(Ordering::SeqCst) {
            let mut held = vec![];
            for from in 2..=21u8 {
                for to in &addrs {
                    for _ in 0..40 {
                        let Ok(s) = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None) else {
                            continue;
                        };
                        let src = std::net::SocketAddr::from(([127, 0, 0, from], 0));
                        if s.bind(&src.into()).is_ok()
                            && s.connect_timeout(&(*to).into(), std::time::Duration::from_millis(200)).is_ok()
                        {
                            held.push(s);
                        }
                    }
                }
            }
            // Well before the first-byte deadline: what is closed now was refused.
            std::thread::sleep(std::time::Duration::from_millis(500));
            refused += closed_by_server(&held);
            // Held past the deadline now and then: slots are both taken and
            // handed back while the migration runs.
            std::thread::sleep(std::time::Duration::from_millis(1000));
        }
        refused
    })
}

/// Raises this process's descriptor limit to its hard limit (a flood holds thousands).
fn raise_fd_limit() {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit and setrlimit read and write the struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// A flood of idle connections from addresses that are not peers, on the
/// control and data listeners of both destinations, all through a
/// migration that is retargeted half-way: the peers' own connections get
/// the slots kept for them, the migration completes verified, and the
/// flood ran at its full size.
#[test]
#[cfg_attr(not(feature = "test-hooks"), ignore = "needs the test-only switches: cargo test --features test-hooks")]
fn a_flood_of_idle_connections_leaves_a_retargeted_migration_through() {
    raise_fd_limit();
    let mut tb = testbed(&["hostA", "hostB", "hostC"]);
    tb.start_guest("hostA", "stormy", 64 * MIB, &workload(5.0), false, &[]).unwrap();
    let mut addrs = vec![];
    for h in ["hostB", "hostC"] {
        let control = tb.host(h).control;
        addrs.push(control);
        addrs.push(std::net::SocketAddr::new(control.ip(), tb.client(h).info().unwrap().data_port));
    }
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flooding = flood(addrs.clone(), stop.clone());
    std::thread::sleep(std::time::Duration::from_secs(1));
    let opts = dcmigrate::engine::MigrateOptions { max_bandwidth_mbps: Some(40.0), ..Default::default() };
    start_migration(&tb, "hostA", "stormy", "hostB", held(opts));
    assert!(retarget_when(&tb, "hostA", "stormy", "hostC", 0.3, true), "the migration ended before the retarget");
    release(&tb, "hostA", "stormy");
    let r = wait_report(&tb, "hostA", "stormy");
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let refused = flooding.join().unwrap();
    assert_eq!(r.result, dcmigrate::engine::Outcome::Completed, "{r:#?}\n{}", tb.logs());
    assert!(r.verified && r.retargets.len() == 1, "{r:#?}");
    assert_eq!(r.vm_runs_on.as_deref(), Some("hostC"));
    // Each round dials 20 addresses x 40 x 4 listeners: past the caps,
    // which closed some at once (so the flood did reach them).
    assert!(refused > 0, "the listeners' caps never closed a flood connection");
    assert!(tb.vm_on("hostB", "stormy").is_none() && tb.vm_on("hostC", "stormy").is_some());
}

fn session_with_id(vm: &str, id: dcmigrate::protocol::MigrationId) -> Message {
    match synthetic_session(vm, 8 * MIB) {
        Message::OpenSession { vm, regions, chunk_size, launch, rdma_slices, holes, page_sizes, transport, .. } => {
            Message::OpenSession {
                vm,
                regions,
                chunk_size,
                launch,
                rdma_slices,
                holes,
                migration: Some(id),
                page_sizes,
                transport,
            }
        }
        _ => unreachable!("an OpenSession"),
    }
}

/// What a destination knows of a migration it tells the source that opened
/// it, alone: another peer that asks with the right id learns nothing, and
/// cannot open a session under that id either.
#[tokio::test(flavor = "multi_thread")]
async fn an_outcome_is_told_only_to_the_source_that_opened_the_session() {
    let tb = testbed(&["hostA", "hostB", "hostC"]);
    let id = dcmigrate::protocol::MigrationId::random();
    let mut b = as_source(&tb, "hostB", "hostA").await;
    assert!(matches!(ask(&mut b, session_with_id("mine", id)).await, Ok(Message::SessionOpened { .. })));
    let query = || Message::OutcomeQuery { vm: "mine".into(), migration: Some(id) };
    let mut c = as_source(&tb, "hostC", "hostA").await;
    match ask(&mut c, query()).await {
        Ok(Message::OutcomeAnswer { outcome, .. }) => assert_eq!(outcome, RemoteOutcome::NotHere),
        other => panic!("hostC's question: {other:?}"),
    }
    let e = ask(&mut c, session_with_id("theirs", id)).await.unwrap_err().to_string();
    assert!(e.contains("already has a session"), "{e}");
    let mut b2 = as_source(&tb, "hostB", "hostA").await;
    match ask(&mut b2, query()).await {
        Ok(Message::OutcomeAnswer { outcome, .. }) => assert_eq!(outcome, RemoteOutcome::Pending),
        other => panic!("hostB's question: {other:?}"),
    }
}

/// The destination seals the session itself before it takes the device
/// state, whatever the source asked (here no verification at all): a
/// forwarder's open stream is cut and its token refused.
#[tokio::test(flavor = "multi_thread")]
async fn the_session_is_sealed_before_the_device_state_without_a_verification() {
    let tb = testbed(&["hostA", "hostB", "hostC"]);
    let mut c = as_source(&tb, "hostB", "hostA").await;
    let (addr, _) = session_on_a(&tb, &mut c, "unverified").await;
    let forwarder = forwarder_token(&mut c, 1, "hostC").await;
    let tls_c = data_tls(&tb, "hostC", "hostA");
    let mut live = stream_as(addr, &forwarder, 1, Some(&tls_c)).await.expect("the forwarder's stream");
    // The reply (the synthetic guest refusing an empty state) does not matter.
    let _ = ask(&mut c, Message::DeviceStateEnd { total: 0 }).await;
    let h = Frame::Pages { region: 0, offset: 0, len: PAGE_SIZE as u32 }.encode();
    assert_eq!(send(&mut live, h, PAGE_SIZE).await, None, "a forwarder wrote once the device state came");
    assert_eq!(refused(stream_as(addr, &forwarder, 1, Some(&tls_c)).await), HelloStatus::BadToken);
}

/// A source that sends the switchover's messages out of order is refused by
/// the destination's session itself, which names what came too early; the
/// session stays usable and aborts cleanly.
#[tokio::test(flavor = "multi_thread")]
async fn out_of_order_messages_are_refused_by_name() {
    let tb = testbed(&["hostA", "hostB"]);
    let mut c = as_source(&tb, "hostB", "hostA").await;
    let opened = ask(&mut c, synthetic_session("order", 8 * MIB)).await;
    assert!(matches!(opened, Ok(Message::SessionOpened { .. })), "{opened:?}");
    let resume = || Message::Resume { start: true, migration: None };
    match ask(&mut c, resume()).await {
        Err(ProtocolError::Peer(msg)) => {
            assert!(msg.starts_with("resume before the device state ended"), "{msg}")
        }
        other => panic!("resume first: {other:?}"),
    }
    // Between the device state's chunks only their end may come.
    write_message(&mut c.stream, &Message::DeviceStateChunk { len: 2, bytes: b"{}".to_vec() }).await.unwrap();
    let sums = Message::ChecksumRequest { blocks: None, block_pages: None, pause: true };
    match ask(&mut c, sums).await {
        Err(ProtocolError::Peer(msg)) => {
            assert_eq!(msg, "checksum_request refused: the session is receiving the device state")
        }
        other => panic!("checksums between chunks: {other:?}"),
    }
    // The state's end is taken (so the refusals above can fail), and the
    // VM is still here, paused, until the source aborts.
    let end = ask(&mut c, Message::DeviceStateEnd { total: 2 }).await;
    assert!(matches!(end, Ok(Message::Ok) | Err(ProtocolError::Peer(_))), "{end:?}");
    assert!(tb.vm_on("hostA", "order").is_none(), "committed without a resume");
    let abort = Message::Abort { reason: "test".into(), migration: None };
    assert!(matches!(ask(&mut c, abort).await, Ok(Message::Ok)));
    assert!(vm_files(&tb, "hostA", "order").is_empty(), "files left: {:?}", vm_files(&tb, "hostA", "order"));
}
