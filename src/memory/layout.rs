//! The shape of a guest's RAM: regions (one per backing file), pages
//! numbered globally across regions, and chunks (the unit of scheduling and
//! checksums), which never span regions. Layouts come from peers, so
//! building one bounds the work before doing it.

use super::PAGE_SIZE;
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Most regions a layout may have.
pub const MAX_REGIONS: usize = 64;
/// Most chunks a layout may have.
pub const MAX_CHUNKS: u64 = 1 << 24;
/// Largest region (64 TiB).
pub const MAX_REGION_BYTES: u64 = 1 << 46;
/// Largest chunk (64 MiB).
pub const MAX_CHUNK_BYTES: u64 = 64 << 20;

/// One RAM region as announced to a peer.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct RegionSpec {
    /// The region's name (QEMU's memory backend id; `ram0` for the synthetic guest).
    pub id: String,
    /// Bytes, a positive multiple of [`PAGE_SIZE`].
    pub size: u64,
}

/// A contiguous run of pages inside one region: the unit of claims and completion.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Chunk {
    /// Index of its region.
    pub region: u32,
    /// Its first global page.
    pub first_page: usize,
    /// Pages in it.
    pub pages: usize,
}

/// A layout that cannot be built.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum LayoutError {
    /// No regions at all.
    #[error("no RAM regions")]
    Empty,
    /// More than [`MAX_REGIONS`] regions.
    #[error("{0} regions (at most {MAX_REGIONS})")]
    TooManyRegions(usize),
    /// A chunk size that is zero, not whole pages, or above [`MAX_CHUNK_BYTES`].
    #[error("chunk size {0} must be a multiple of {PAGE_SIZE} up to 64 MiB")]
    ChunkSize(u64),
    /// More than [`MAX_CHUNKS`] chunks.
    #[error("{0} chunks (at most 2^24): use larger chunks")]
    TooManyChunks(u64),
    /// A region of zero bytes or not whole pages.
    #[error("region {id} size {size} is not a positive multiple of {PAGE_SIZE}")]
    RegionSize {
        /// The region.
        id: String,
        /// Its size.
        size: u64,
    },
    /// A region above [`MAX_REGION_BYTES`].
    #[error("region {0} is too large")]
    RegionTooLarge(String),
    /// Two regions with one id.
    #[error("duplicate region id {0}")]
    Duplicate(String),
}

/// Regions, pages and chunks of one guest's RAM.
#[derive(Clone, Debug)]
pub struct Layout {
    regions: Vec<RegionSpec>,
    region_first_page: Vec<usize>,
    total_pages: usize,
    chunk_size: u64,
    chunks: Vec<Chunk>,
    /// Index of the first chunk of each region.
    region_first_chunk: Vec<usize>,
}

impl Layout {
    /// Checks `regions` and `chunk_size` and cuts the regions into chunks.
    pub fn new(regions: Vec<RegionSpec>, chunk_size: u64) -> Result<Self, LayoutError> {
        if regions.is_empty() {
            return Err(LayoutError::Empty);
        }
        if chunk_size == 0 || !chunk_size.is_multiple_of(PAGE_SIZE as u64) || chunk_size > MAX_CHUNK_BYTES {
            return Err(LayoutError::ChunkSize(chunk_size));
        }
        if regions.len() > MAX_REGIONS {
            return Err(LayoutError::TooManyRegions(regions.len()));
        }
        let chunks_needed: u64 = regions.iter().map(|r| r.size.div_ceil(chunk_size)).fold(0, u64::saturating_add);
        if chunks_needed > MAX_CHUNKS {
            return Err(LayoutError::TooManyChunks(chunks_needed));
        }
        let chunk_pages = (chunk_size / PAGE_SIZE as u64) as usize;
        let (mut region_first_page, mut region_first_chunk, mut chunks) = (vec![], vec![], vec![]);
        let mut next = 0usize;
        for (i, r) in regions.iter().enumerate() {
            if r.size == 0 || !r.size.is_multiple_of(PAGE_SIZE as u64) {
                return Err(LayoutError::RegionSize { id: r.id.clone(), size: r.size });
            }
            if r.size > MAX_REGION_BYTES {
                return Err(LayoutError::RegionTooLarge(r.id.clone()));
            }
            if regions[..i].iter().any(|o| o.id == r.id) {
                return Err(LayoutError::Duplicate(r.id.clone()));
            }
            let pages = (r.size / PAGE_SIZE as u64) as usize;
            region_first_page.push(next);
            region_first_chunk.push(chunks.len());
            let mut p = 0;
            while p < pages {
                let n = chunk_pages.min(pages - p);
                chunks.push(Chunk { region: i as u32, first_page: next + p, pages: n });
                p += n;
            }
            next += pages;
        }
        Ok(Self { regions, region_first_page, total_pages: next, chunk_size, chunks, region_first_chunk })
    }

    /// The regions, in order.
    pub fn regions(&self) -> &[RegionSpec] {
        &self.regions
    }

    /// Pages in all regions.
    pub fn total_pages(&self) -> usize {
        self.total_pages
    }

    /// Bytes in all regions.
    pub fn total_bytes(&self) -> u64 {
        self.total_pages as u64 * PAGE_SIZE as u64
    }

    /// The chunk size.
    pub fn chunk_size(&self) -> u64 {
        self.chunk_size
    }

    /// Every chunk, in page order.
    pub fn chunks(&self) -> &[Chunk] {
        &self.chunks
    }

    /// The global page where a region starts.
    pub fn region_first_page(&self, region: u32) -> usize {
        self.region_first_page[region as usize]
    }

    fn region_of(&self, page: usize) -> usize {
        self.region_first_page.partition_point(|&f| f <= page) - 1
    }

    /// Region index and byte offset of a global page.
    pub fn locate(&self, page: usize) -> (u32, u64) {
        let r = self.region_of(page);
        (r as u32, (page - self.region_first_page[r]) as u64 * PAGE_SIZE as u64)
    }

    /// Global page number of a byte offset inside a region.
    pub fn page_at(&self, region: u32, offset: u64) -> usize {
        self.region_first_page[region as usize] + (offset / PAGE_SIZE as u64) as usize
    }

    /// The chunk a global page belongs to.
    pub fn chunk_of(&self, page: usize) -> usize {
        let r = self.region_of(page);
        let chunk_pages = (self.chunk_size / PAGE_SIZE as u64) as usize;
        self.region_first_chunk[r] + (page - self.region_first_page[r]) / chunk_pages
    }
}

/// The layout cut into verification blocks: each chunk into blocks of
/// `block_pages` pages (the last one of a chunk may be shorter), numbered in
/// page order. Both ends of a migration derive the same blocks from the
/// same layout and block size.
#[derive(Clone, Debug)]
pub struct Blocks {
    block_pages: usize,
    /// The first block of each chunk, and (last) the number of blocks.
    first: Vec<usize>,
}

/// A block: its chunk, first global page and pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Block {
    /// The chunk it lies in.
    pub chunk: usize,
    /// Its first global page.
    pub first_page: usize,
    /// Pages in it.
    pub pages: usize,
}

impl Blocks {
    /// Blocks of `block_pages` pages (at least 1) over `layout`'s chunks.
    pub fn new(layout: &Layout, block_pages: usize) -> Self {
        let block_pages = block_pages.max(1);
        let mut first = Vec::with_capacity(layout.chunks.len() + 1);
        let mut n = 0;
        for c in &layout.chunks {
            first.push(n);
            n += c.pages.div_ceil(block_pages);
        }
        first.push(n);
        Self { block_pages, first }
    }

    /// Pages per block.
    pub fn block_pages(&self) -> usize {
        self.block_pages
    }

    /// How many blocks there are.
    pub fn len(&self) -> usize {
        self.first.last().copied().unwrap_or(0)
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The block of a global page.
    pub fn of_page(&self, layout: &Layout, page: usize) -> usize {
        let c = layout.chunk_of(page);
        self.first[c] + (page - layout.chunks[c].first_page) / self.block_pages
    }

    /// The blocks of chunk `c`.
    pub fn of_chunk(&self, c: usize) -> std::ops::Range<usize> {
        self.first[c]..self.first[c + 1]
    }

    /// Where block `b` lies, if there is such a block.
    pub fn get(&self, layout: &Layout, b: usize) -> Option<Block> {
        if b >= self.len() {
            return None;
        }
        let chunk = self.first.partition_point(|&f| f <= b) - 1;
        let c = layout.chunks[chunk];
        let k = b - self.first[chunk];
        let first_page = c.first_page + k * self.block_pages;
        Some(Block { chunk, first_page, pages: self.block_pages.min(c.first_page + c.pages - first_page) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn two_regions() -> Layout {
        Layout::new(
            vec![
                RegionSpec { id: "a".into(), size: 5 * PAGE_SIZE as u64 },
                RegionSpec { id: "b".into(), size: 3 * PAGE_SIZE as u64 },
            ],
            2 * PAGE_SIZE as u64,
        )
        .unwrap()
    }

    #[test]
    fn chunks_do_not_span_regions() {
        let l = two_regions();
        assert_eq!(l.total_pages(), 8);
        let c: Vec<_> = l.chunks().iter().map(|c| (c.region, c.first_page, c.pages)).collect();
        assert_eq!(c, vec![(0, 0, 2), (0, 2, 2), (0, 4, 1), (1, 5, 2), (1, 7, 1)]);
        assert_eq!(l.locate(6), (1, PAGE_SIZE as u64));
        assert_eq!(l.chunk_of(4), 2);
        assert_eq!(l.chunk_of(7), 4);
        assert_eq!(l.page_at(1, PAGE_SIZE as u64), 6);
    }

    #[test]
    fn blocks_cut_chunks() {
        let l = two_regions();
        let b = Blocks::new(&l, 2);
        // Chunks of 2, 2, 1, 2, 1 pages: one block each.
        assert_eq!(b.len(), 5);
        let b = Blocks::new(&l, 1);
        assert_eq!(b.len(), 8);
        assert_eq!(b.of_page(&l, 6), 6);
        assert_eq!(b.get(&l, 6), Some(Block { chunk: 3, first_page: 6, pages: 1 }));
        let l = Layout::new(vec![RegionSpec { id: "r".into(), size: 10 * PAGE_SIZE as u64 }], 4 * PAGE_SIZE as u64)
            .unwrap();
        let b = Blocks::new(&l, 3);
        // Chunks of 4, 4, 2 pages: blocks of 3+1, 3+1, 2.
        assert_eq!(b.len(), 5);
        assert_eq!(b.get(&l, 1), Some(Block { chunk: 0, first_page: 3, pages: 1 }));
        assert_eq!(b.get(&l, 4), Some(Block { chunk: 2, first_page: 8, pages: 2 }));
        assert_eq!(b.of_page(&l, 7), 3);
        assert_eq!(b.of_chunk(1), 2..4);
        assert_eq!(b.get(&l, 5), None);
    }

    #[test]
    fn rejects_bad_layouts() {
        let r = |id: &str, size| RegionSpec { id: id.into(), size };
        assert_eq!(Layout::new(vec![], 4096).unwrap_err(), LayoutError::Empty);
        assert!(matches!(Layout::new(vec![r("a", 100)], 4096), Err(LayoutError::RegionSize { .. })));
        assert_eq!(
            Layout::new(vec![r("a", 4096), r("a", 4096)], 4096).unwrap_err(),
            LayoutError::Duplicate("a".into())
        );
        assert_eq!(Layout::new(vec![r("a", 4096)], 1000).unwrap_err(), LayoutError::ChunkSize(1000));
        let many: Vec<_> = (0..65).map(|i| r(&i.to_string(), 4096)).collect();
        assert_eq!(Layout::new(many, 4096).unwrap_err(), LayoutError::TooManyRegions(65));
        assert!(matches!(Layout::new(vec![r("a", 1 << 46)], 4096), Err(LayoutError::TooManyChunks(_))));
    }
}
