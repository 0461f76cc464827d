//! Unit tests of [`GuestRam`](super::GuestRam).

use super::super::layout::RegionSpec;
use super::*;

fn layout() -> Layout {
    let r = |id: &str, pages: u64| RegionSpec { id: id.into(), size: pages * PAGE_SIZE as u64 };
    Layout::new(vec![r("a", 5), r("b", 3)], 2 * PAGE_SIZE as u64).unwrap()
}

#[test]
fn prefault_on_threads_faults_every_page_and_changes_none() {
    let dir = tempfile::tempdir_in("/dev/shm").unwrap();
    let paths = vec![dir.path().join("a")];
    let pages = (7 << 20) / PAGE_SIZE as u64;
    let l = Layout::new(vec![RegionSpec { id: "a".into(), size: pages * PAGE_SIZE as u64 }], 1 << 20).unwrap();
    let ram = GuestRam::create(l, &paths).unwrap();
    ram.store(0, 5 << 20, b"kept").unwrap();
    ram.prefault(0, false, 3).unwrap();
    // 7 MiB on 3 threads: slices of 4 MiB (2.3 rounded up to whole 2 MiB), the last shorter.
    ram.prefault(0, true, 3).unwrap();
    assert_eq!(ram.data_pages().unwrap().count() as u64, pages, "every page resident");
    let mut b = [0u8; 4];
    ram.read_at(0, 5 << 20, &mut b).unwrap();
    assert_eq!(&b, b"kept");
    ram.read_at(0, 6 << 20, &mut b).unwrap();
    assert_eq!(b, [0; 4]);
    assert!(matches!(ram.prefault(1, true, 2), Err(MemoryError::OutOfBounds { region: 1, .. })));
}

#[test]
fn parallel_checksums_match_serial() {
    // tmpfs, where RAM files live (elsewhere mincore reports page cache).
    let dir = tempfile::tempdir_in("/dev/shm").unwrap();
    let paths = vec![dir.path().join("a"), dir.path().join("b")];
    let ram = GuestRam::create(layout(), &paths).unwrap();
    ram.store(0, 4096, b"12345678").unwrap();
    ram.store(1, 2 * 4096, b"12345678").unwrap();
    let data: Vec<usize> = ram.data_pages().unwrap().iter_ones().collect();
    assert_eq!(data, vec![1, 7], "only written pages hold data");
    let sums = ram.checksums();
    assert_eq!(ram.data_pages().unwrap().count(), 2, "hashing allocated nothing");
    let serial: Vec<u64> = (0..5).map(|c| ram.chunk_checksum(c)).collect();
    assert_eq!(sums, serial);
    let every_page = ram.hash_pages(0, 0, 2, |_| true);
    assert_eq!(every_page, serial[0], "skipping holes does not change checksums");
    assert_ne!(serial[0], serial[1]);
    assert_eq!(ram.checksums_of(&[3, 0]), vec![serial[3], serial[0]]);
    let blocks = Blocks::new(ram.layout(), 2);
    assert_eq!(
        ram.block_checksums(&blocks, &[3, 0, 4]),
        vec![serial[3], serial[0], serial[4]],
        "blocks of a chunk's size"
    );
    let mut whole = vec![];
    ram.read_pages(0, 2, &mut whole).unwrap();
    assert_eq!(serial[0], digest::of(&whole), "a chunk's checksum is the xxh3 of its bytes");
}

#[test]
fn pages_hashed_in_blocks_match_one_by_one() {
    let dir = tempfile::tempdir_in("/dev/shm").unwrap();
    let paths = vec![dir.path().join("a"), dir.path().join("b")];
    let ram = GuestRam::create(layout(), &paths).unwrap();
    for (region, page) in [(0, 0), (0, 4), (1, 0), (1, 2)] {
        ram.store(region, page * PAGE_SIZE as u64 + 9, &[region as u8 + 1; 3]).unwrap();
    }
    let data = ram.data_pages().unwrap();
    // Across the region boundary (page 5), holes included.
    let mut got = vec![];
    ram.hash_each_page(2..8, |p| data.get(p), |p, h| got.push((p, h))).unwrap();
    assert_eq!(ram.data_pages().unwrap().count(), 4, "holes were not read");
    // page_hash reads every page it is given (allocating holes): last.
    let want: Vec<(usize, u64)> = (2..8).map(|p| (p, ram.page_hash(p).unwrap())).collect();
    assert_eq!(got, want);
}

#[test]
fn every_access_is_bounds_checked() {
    let dir = tempfile::tempdir().unwrap();
    let paths = vec![dir.path().join("a"), dir.path().join("b")];
    let ram = GuestRam::create(layout(), &paths).unwrap();
    assert!(ram.check(1, 0, 3 * PAGE_SIZE as u64).is_ok());
    assert!(ram.check(1, 1, 3 * PAGE_SIZE as u64).is_err());
    assert!(ram.check(2, 0, 1).is_err());
    assert!(ram.check(0, u64::MAX, 2).is_err());
    assert!(ram.store(1, 3 * PAGE_SIZE as u64 - 2, b"abcd").is_err());
    assert!(ram.write_at(1, 3 * PAGE_SIZE as u64, b"a").is_err());
    ram.store(1, 0, b"abcd").unwrap();
    let mut out = Vec::new();
    ram.read_pages(5, 1, &mut out).unwrap();
    assert_eq!(&out[..4], b"abcd");
    assert!(ram.read_pages(7, 2, &mut out).is_err());
    assert_eq!(out.len(), PAGE_SIZE, "a failed read appends nothing");
    ram.write_at(0, 8, b"xy").unwrap();
    let mut two = [0u8; 2];
    ram.read_at(0, 8, &mut two).unwrap();
    assert_eq!(&two, b"xy");
    ram.touch(0).unwrap();
    assert_eq!(ram.page_hash(5).unwrap(), digest::of(&out[..PAGE_SIZE]));
}
