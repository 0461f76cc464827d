//! dcmigrate: live VM migration whose destination can change while it runs.
pub mod bitmap;
pub mod ledger;
pub mod memory;
pub mod dirty;
pub mod protocol;
pub mod tls;
pub mod guest;
pub mod vm;
pub mod transport;
pub mod agent;
pub mod engine;
pub mod cli;
pub mod testbed;
