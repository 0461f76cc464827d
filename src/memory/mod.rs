//! Guest RAM as the engine sees it: its [`Layout`] (regions, pages,
//! chunks) and [`GuestRam`], shared mappings of the files that hold it.
//!
//! Pages are numbered globally across regions; chunks never span regions.
//! The mappings are shared with the guest (and, on a destination, with
//! remote writers): their bytes change under us, the way device DMA does,
//! so they are only ever copied, never borrowed.

pub mod backing;
pub(crate) mod digest;
mod layout;
mod ram;

pub use layout::{
    Block, Blocks, Chunk, Layout, LayoutError, RegionSpec, MAX_CHUNKS, MAX_CHUNK_BYTES, MAX_REGIONS, MAX_REGION_BYTES,
};
pub use ram::GuestRam;

use std::path::PathBuf;
use thiserror::Error;

/// Bytes in a page (the unit of dirty tracking and transfer).
pub const PAGE_SIZE: usize = 4096;
/// Chunk size unless a migration asks for another.
pub const DEFAULT_CHUNK_SIZE: u64 = 2 << 20;

/// Mapping or accessing guest RAM failed.
#[derive(Debug, Error)]
pub enum MemoryError {
    /// The layout and the files do not agree in number.
    #[error("{files} RAM files for {regions} regions")]
    Files {
        /// Files given.
        files: usize,
        /// Regions in the layout.
        regions: usize,
    },
    /// A backing file could not be opened, sized, mapped or written.
    #[error("{path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// A backing file of the wrong size.
    #[error("{path}: file is {actual} bytes, layout says {expected}")]
    Size {
        /// The file.
        path: PathBuf,
        /// Its size.
        actual: u64,
        /// The region's size.
        expected: u64,
    },
    /// A region whose size is not a multiple of its file system's pages.
    #[error("{path}: {size} bytes are not a multiple of the file system's {page_size}-byte pages")]
    PageSize {
        /// The file.
        path: PathBuf,
        /// The region's size.
        size: u64,
        /// The page size.
        page_size: u64,
    },
    /// An access outside the RAM (nothing was read or written).
    #[error("access outside guest RAM: region {region} offset {offset} length {len}")]
    OutOfBounds {
        /// The region asked for.
        region: u32,
        /// The offset asked for.
        offset: u64,
        /// The length asked for.
        len: u64,
    },
}
