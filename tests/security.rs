//! Peers must authenticate; a remote writer can never write outside what it was given.

mod common;
use common::*;
use dcmigrate::control as peer;
use dcmigrate::memory::{GuestRam, Layout, RegionSpec, PAGE_SIZE};
use dcmigrate::protocol::data::*;
use dcmigrate::protocol::{Token, TOKEN_LEN};
use dcmigrate::tls::{init_certs, TlsConfig};
use dcmigrate::transport::Receiver;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
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
            let _ = peer::accept(&rogue_server, "hostC", s).await;
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
    rx.add(token, ram.clone());
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(rx.serve(l));
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
async fn send(s: &mut TcpStream, header: [u8; HEADER_LEN], payload_len: usize) -> Option<Reply> {
    let _ = s.write_all(&header).await;
    let _ = s.write_all(&vec![0xAB; payload_len]).await;
    let _ = s.write_all(&Frame::BatchEnd { batch: 9 }.encode()).await;
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
