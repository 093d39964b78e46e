//! upcase: the textbook uppercase service, built as real software.
//!
//! The pure core (no I/O, tested and fuzzed alone):
//! - [`transform`]: what happens to the bytes;
//! - [`addr`]: the one address syntax every command takes;
//! - [`pattern`]: the seeds' test stream and its verifier;
//! - [`units`]: sizes and durations as users type them.
//!
//! The drivers around it:
//! - [`net`]: sockets, options, binding and connecting;
//! - [`relay`]: the connection contract every server model keeps;
//! - [`server`]: `upcase serve` and its models;
//! - [`client`]: `upcase send` and `upcase chat`;
//! - [`bench`]: `upcase bench`, the load generator and the model comparison.

pub mod addr;
pub mod bench;
pub mod cli;
pub mod client;
pub mod conn;
pub mod net;
pub mod pattern;
pub mod relay;
pub mod ring;
pub mod server;
pub mod transform;
pub mod units;
