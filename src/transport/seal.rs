//! Sealed records: the record layer a TCP data stream switches to once its
//! TLS 1.3 handshake is done, when both ends offer it (ALPN
//! [`ALPN_SEALED`]); agents that do not keep TLS's own records.
//!
//! TLS authenticates the hosts and agrees the keys (one per direction,
//! exported from the session, RFC 8446 §7.5); after that, each record is
//! `len u32 LE | AES-256-GCM(plaintext) | tag [16]`, its length
//! authenticated too, with a per-direction counter as nonce: a record
//! changed, dropped, replayed or reordered fails to open, and the stream
//! ends. Why not TLS's records: they are at most 16 KiB and rustls reads
//! them 4 KiB at a time, copying each twice more than a plain stream does;
//! a page frame here is one record, sealed and opened in place in the
//! buffer the pages are copied into anyway ([`SealedWriter::write_record`],
//! [`SealedReader::read_record`]), so encryption costs AES and nothing else.

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

/// The ALPN protocol name both ends offer to switch to sealed records.
pub(crate) const ALPN_SEALED: &[u8] = b"dcmigrate-sealed/1";
/// The TLS exporter label the two keys are derived with.
pub(crate) const EXPORTER_LABEL: &[u8] = b"EXPORTER-dcmigrate-sealed-records";
/// Bytes in front of a record's plaintext (its length).
pub(crate) const PREFIX: usize = 4;
/// Bytes after a record's ciphertext (the tag).
pub(crate) const TAG: usize = 16;
/// Largest plaintext of a record: a frame header and the largest payload.
pub(crate) const MAX_RECORD: usize = crate::protocol::data::HEADER_LEN + crate::protocol::data::MAX_PAYLOAD as usize;
/// Plaintext that generic writes gather before sealing a record.
const GATHER: usize = 64 << 10;

/// One direction's key and counter.
struct Direction {
    key: LessSafeKey,
    seq: u64,
}

impl Direction {
    fn new(key: &[u8]) -> Self {
        let key = UnboundKey::new(&AES_256_GCM, key).expect("a 32-byte key");
        Self { key: LessSafeKey::new(key), seq: 0 }
    }

    fn nonce(&mut self) -> io::Result<Nonce> {
        let mut n = [0u8; 12];
        n[4..].copy_from_slice(&self.seq.to_be_bytes());
        self.seq = self.seq.checked_add(1).ok_or_else(|| io::Error::other("record counter exhausted"))?;
        Ok(Nonce::assume_unique_for_key(n))
    }
}

/// The keys of both directions, from 64 bytes of exported key material:
/// the first half seals what the TLS client sends.
pub(crate) fn keys(material: &[u8; 64], client: bool) -> (SealKey, OpenKey) {
    let (c2s, s2c) = material.split_at(32);
    let (send, recv) = if client { (c2s, s2c) } else { (s2c, c2s) };
    (SealKey(Direction::new(send)), OpenKey(Direction::new(recv)))
}

/// The key this end seals with.
pub struct SealKey(Direction);
/// The key this end opens with.
pub struct OpenKey(Direction);

/// Writes sealed records.
pub struct SealedWriter<W> {
    io: W,
    key: SealKey,
    /// Plaintext gathered from generic writes, after `PREFIX` bytes.
    gather: Vec<u8>,
    /// A sealed record being written, and how much of it is out.
    out: Vec<u8>,
    sent: usize,
}

impl<W: AsyncWrite + Unpin> SealedWriter<W> {
    /// Seals with `key` onto `io`.
    pub fn new(io: W, key: SealKey) -> Self {
        Self { io, key, gather: vec![0; PREFIX], out: Vec::new(), sent: 0 }
    }

    /// Seals `buf[PREFIX..]` in place as one record and writes it (after
    /// what generic writes left). `buf` is left holding the sealed record.
    pub async fn write_record(&mut self, buf: &mut Vec<u8>) -> io::Result<()> {
        self.flush().await?;
        seal(&mut self.key, buf)?;
        self.io.write_all(buf).await
    }

    fn seal_gathered(&mut self) -> io::Result<()> {
        if self.gather.len() > PREFIX {
            seal(&mut self.key, &mut self.gather)?;
            std::mem::swap(&mut self.gather, &mut self.out);
            self.gather.clear();
            self.gather.resize(PREFIX, 0);
            self.sent = 0;
        }
        Ok(())
    }

    /// Writes out the pending sealed record.
    fn poll_out(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.out.len() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.out[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        self.out.clear();
        self.sent = 0;
        Poll::Ready(Ok(()))
    }
}

/// Seals `buf[PREFIX..]` in place: length in front, tag appended.
fn seal(key: &mut SealKey, buf: &mut Vec<u8>) -> io::Result<()> {
    let len = buf.len() - PREFIX;
    if len > MAX_RECORD {
        return Err(io::Error::other(format!("a record of {len} bytes is larger than {MAX_RECORD}")));
    }
    let prefix = (len as u32).to_le_bytes();
    buf[..PREFIX].copy_from_slice(&prefix);
    let nonce = key.0.nonce()?;
    let tag = key
        .0
        .key
        .seal_in_place_separate_tag(nonce, Aad::from(prefix), &mut buf[PREFIX..])
        .map_err(|_| io::Error::other("sealing a record"))?;
    buf.extend_from_slice(tag.as_ref());
    Ok(())
}

impl<W: AsyncWrite + Unpin> AsyncWrite for SealedWriter<W> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let me = self.get_mut();
        ready!(me.poll_out(cx))?;
        // A write that fits in a record is never cut across two (a reader
        // takes only whole frames in a record): what is gathered goes first.
        if data.len() <= GATHER && data.len() > PREFIX + GATHER - me.gather.len() {
            me.seal_gathered()?;
            ready!(me.poll_out(cx))?;
        }
        let n = data.len().min(PREFIX + GATHER - me.gather.len());
        me.gather.extend_from_slice(&data[..n]);
        if me.gather.len() == PREFIX + GATHER {
            me.seal_gathered()?;
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        ready!(me.poll_out(cx))?;
        me.seal_gathered()?;
        ready!(me.poll_out(cx))?;
        Pin::new(&mut me.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.as_mut().poll_flush(cx))?;
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// Reads sealed records.
pub struct SealedReader<R> {
    io: R,
    key: OpenKey,
    /// The record being read (prefix, ciphertext, tag), `filled` bytes so far.
    raw: Vec<u8>,
    filled: usize,
    /// Opened plaintext not yet read: `raw[at..end]`.
    at: usize,
    end: usize,
}

fn bad(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

impl<R: AsyncRead + Unpin> SealedReader<R> {
    /// Opens with `key` from `io`.
    pub fn new(io: R, key: OpenKey) -> Self {
        Self { io, key, raw: Vec::new(), filled: 0, at: 0, end: 0 }
    }

    /// Reads the next record into `buf` and opens it there; returns its
    /// plaintext, or None if the stream ended between records. Fails if
    /// generic reads left part of a record unread.
    pub async fn read_record<'b>(&mut self, buf: &'b mut Vec<u8>) -> io::Result<Option<&'b [u8]>> {
        if self.at < self.end || self.filled > 0 {
            return Err(bad("a record read while another was half read".into()));
        }
        buf.resize(PREFIX, 0);
        let mut got = 0;
        while got < PREFIX {
            match self.io.read(&mut buf[got..PREFIX]).await? {
                0 if got == 0 => return Ok(None), // the end, between records
                0 => return Err(io::ErrorKind::UnexpectedEof.into()),
                n => got += n,
            }
        }
        let len = record_len(buf)?;
        buf.resize(PREFIX + len + TAG, 0);
        self.io.read_exact(&mut buf[PREFIX..]).await?;
        let n = open(&mut self.key, buf)?;
        Ok(Some(&buf[PREFIX..PREFIX + n]))
    }
}

/// The plaintext length a record's prefix announces, bounded.
fn record_len(raw: &[u8]) -> io::Result<usize> {
    let len = u32::from_le_bytes(raw[..PREFIX].try_into().expect("prefix")) as usize;
    if len > MAX_RECORD {
        return Err(bad(format!("a record of {len} bytes is larger than {MAX_RECORD}")));
    }
    Ok(len)
}

/// Opens a whole record (prefix, ciphertext, tag) in place; returns the
/// plaintext's length (it is at `raw[PREFIX..]`).
fn open(key: &mut OpenKey, raw: &mut [u8]) -> io::Result<usize> {
    let prefix: [u8; PREFIX] = raw[..PREFIX].try_into().expect("prefix");
    let nonce = key.0.nonce()?;
    key.0
        .key
        .open_in_place(nonce, Aad::from(prefix), &mut raw[PREFIX..])
        .map(|p| p.len())
        .map_err(|_| bad("a record failed authentication".into()))
}

impl<R: AsyncRead + Unpin> AsyncRead for SealedReader<R> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, out: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        while me.at == me.end {
            // Read a record: its prefix, then the rest.
            let need = if me.filled < PREFIX { PREFIX } else { PREFIX + record_len(&me.raw)? + TAG };
            me.raw.resize(need.max(me.raw.len()), 0);
            while me.filled < need {
                let mut rb = ReadBuf::new(&mut me.raw[me.filled..need]);
                ready!(Pin::new(&mut me.io).poll_read(cx, &mut rb))?;
                let n = rb.filled().len();
                if n == 0 {
                    return Poll::Ready(if me.filled == 0 {
                        Ok(()) // the end, between records
                    } else {
                        Err(io::ErrorKind::UnexpectedEof.into())
                    });
                }
                me.filled += n;
            }
            if need > PREFIX {
                let n = open(&mut me.key, &mut me.raw[..need])?;
                (me.at, me.end, me.filled) = (PREFIX, PREFIX + n, 0);
            }
        }
        let n = out.remaining().min(me.end - me.at);
        out.put_slice(&me.raw[me.at..me.at + n]);
        me.at += n;
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (SealedWriter<tokio::io::DuplexStream>, SealedReader<tokio::io::DuplexStream>) {
        let (a, b) = tokio::io::duplex(1 << 20);
        let m = [7u8; 64];
        let (seal, _) = keys(&m, true);
        let (_, open) = keys(&m, false);
        (SealedWriter::new(a, seal), SealedReader::new(b, open))
    }

    #[tokio::test]
    async fn records_and_generic_bytes_arrive_in_order() {
        let (mut w, mut r) = pair();
        w.write_all(b"hello").await.unwrap();
        w.flush().await.unwrap();
        let mut rec = vec![0u8; PREFIX];
        rec.extend_from_slice(&[9u8; 100_000]);
        w.write_record(&mut rec).await.unwrap();
        w.write_all(&[1u8; 200_000]).await.unwrap(); // several gathered records
        w.shutdown().await.unwrap();
        let mut five = [0u8; 5];
        r.read_exact(&mut five).await.unwrap();
        assert_eq!(&five, b"hello");
        let mut buf = Vec::new();
        assert_eq!(r.read_record(&mut buf).await.unwrap().unwrap(), &[9u8; 100_000][..]);
        let mut rest = Vec::new();
        r.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, vec![1u8; 200_000]);
    }

    #[tokio::test]
    async fn small_writes_are_never_cut_across_records() {
        // Frame headers (24 bytes) written one by one, more than a record
        // holds: each record carries whole headers only.
        let (mut w, mut r) = pair();
        let header = [5u8; 24];
        for _ in 0..6000 {
            w.write_all(&header).await.unwrap();
        }
        w.shutdown().await.unwrap();
        let (mut buf, mut total) = (Vec::new(), 0);
        while let Some(rec) = r.read_record(&mut buf).await.unwrap() {
            assert_eq!(rec.len() % header.len(), 0, "a record of {} bytes cuts a header", rec.len());
            total += rec.len();
        }
        assert_eq!(total, 6000 * header.len());
    }

    #[tokio::test]
    async fn a_changed_or_replayed_record_fails() {
        let (a, mut b) = tokio::io::duplex(1 << 20);
        let m = [3u8; 64];
        let mut w = SealedWriter::new(a, keys(&m, true).0);
        for _ in 0..2 {
            w.write_all(b"page").await.unwrap();
            w.flush().await.unwrap();
        }
        drop(w);
        let mut wire = Vec::new();
        b.read_to_end(&mut wire).await.unwrap();
        let one = PREFIX + 4 + TAG;
        assert_eq!(wire.len(), 2 * one);
        let read = |bytes: Vec<u8>| async move {
            let mut r = SealedReader::new(&bytes[..], keys(&m, false).1);
            let mut out = Vec::new();
            r.read_to_end(&mut out).await.map(|_| out)
        };
        assert_eq!(read(wire.clone()).await.unwrap(), b"pagepage");
        let mut flipped = wire.clone();
        flipped[PREFIX + 1] ^= 1;
        assert!(read(flipped).await.is_err(), "a changed byte");
        let replayed = [&wire[..one], &wire[..one]].concat();
        assert!(read(replayed).await.is_err(), "a record sent twice");
        let swapped = [&wire[one..], &wire[..one]].concat();
        assert!(read(swapped).await.is_err(), "records reordered");
        assert!(read(wire[..one + 3].to_vec()).await.is_err(), "a record cut short");
        assert!(read(wire[..one + 2].to_vec()).await.is_err(), "a prefix cut short");
        let mut r = SealedReader::new(&wire[..one + 2], keys(&m, false).1);
        let mut buf = Vec::new();
        assert_eq!(r.read_record(&mut buf).await.unwrap().unwrap(), b"page");
        assert!(r.read_record(&mut buf).await.is_err(), "a prefix cut short, read as a record");
        let mut huge = wire.clone();
        huge[..PREFIX].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(read(huge).await.is_err(), "a length beyond the bound");
        let wrong = {
            let mut r = SealedReader::new(&wire[..], keys(&[4u8; 64], false).1);
            let mut out = Vec::new();
            r.read_to_end(&mut out).await
        };
        assert!(wrong.is_err(), "another key");
    }
}
