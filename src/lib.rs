//! upcase: the textbook uppercase service, built as real software.
//!
//! The pure core (no I/O, tested and fuzzed alone):
//! - [`transform`]: what happens to the bytes;
//! - [`addr`]: the one address syntax every command takes;
//! - [`pattern`]: the seeds' test stream and its verifier;
//! - [`units`]: sizes and durations as users type them;
//! - [`proxy`]: the PROXY protocol header a load balancer sends first;
//! - [`conn`]: the connection core, one connection's whole contract (read
//!   budget, transform, backpressure, half-close, idle), with no socket.
//!
//! The drivers around it:
//! - [`net`]: sockets, options, binding and connecting;
//! - [`lifecycle`]: signals, the drain and its deadline, cleanup;
//! - [`server`]: `upcase serve` and its models;
//! - [`client`]: `upcase send` and `upcase chat`;
//! - [`bench`]: `upcase bench`, the load generator and the model comparison.

pub mod addr;
pub mod bench;
pub mod cli;
pub mod client;
pub mod conn;
pub mod framing;
pub mod lifecycle;
pub mod metrics;
pub mod net;
pub mod pattern;
pub mod proxy;
pub mod ring;
pub mod server;
pub mod tls;
pub mod transform;
pub mod units;
