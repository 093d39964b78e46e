//! The clients: `send` (pipe, `--bytes`, `--naive`, UDP) and `chat`.
//!
//! Each returns an [`Outcome`] that the binary turns into an exit code, so
//! that scripts can tell "the server was wrong" from "could not connect"
//! from "deadlock diagnosed".

pub mod chat;
pub mod framed;
pub mod naive;
pub mod pipe;
pub mod progress;
pub mod stream;
pub mod udp;
pub mod watchdog;

use std::time::Duration;

use crate::addr::Endpoint;
use crate::net::SockOpts;

/// Exit codes: part of the command-line contract.
pub mod exit {
    /// Everything sent came back, verified.
    pub const OK: i32 = 0;
    /// An error: could not connect, reset, refused, I/O failure.
    pub const ERROR: i32 = 1;
    /// Invalid command-line arguments (clap's code).
    pub const USAGE: i32 = 2;
    /// `--naive` stalled: the deadlock was diagnosed.
    pub const STALLED: i32 = 3;
    /// The reply was wrong, incomplete, or (UDP) datagrams were lost.
    pub const MISMATCH: i32 = 4;
}

/// How a client run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    Stalled,
    Mismatch,
}

impl Outcome {
    pub fn exit_code(self) -> i32 {
        if crate::tls::failed() {
            // Whatever the pipe showed, the session failed (said on stderr).
            return exit::ERROR;
        }
        match self {
            Outcome::Ok => exit::OK,
            Outcome::Stalled => exit::STALLED,
            Outcome::Mismatch => exit::MISMATCH,
        }
    }
}

/// Everything `send` needs, validated.
#[derive(Debug, Clone)]
pub struct SendConfig {
    pub endpoint: Endpoint,
    pub sockopts: SockOpts,
    /// `--bytes N`: generate and verify N bytes instead of piping stdin.
    pub bytes: Option<u64>,
    pub naive: bool,
    pub stall: Duration,
    /// UDP `--size`: bytes per datagram.
    pub size: usize,
    pub udp: UdpRetry,
    pub json: bool,
    pub progress: bool,
    /// The server's transform, to know what a correct reply is.
    pub mode: crate::transform::Mode,
    /// The server's `--framing`: how requests and replies are cut.
    pub framing: crate::framing::Framing,
}

/// The textbook's UDP client: wait `timeout`, then resend and double the
/// wait, `retries` times (and at most `total` in all), before calling a
/// request lost; after `give_up_after` lost in a row the server is taken
/// for gone.
#[derive(Debug, Clone, Copy)]
pub struct UdpRetry {
    pub timeout: Duration,
    pub retries: u32,
    pub total: Option<Duration>,
    pub give_up_after: u32,
    /// `--deadline`: the whole run's time.
    pub deadline: Option<Duration>,
}

impl Default for UdpRetry {
    fn default() -> Self {
        UdpRetry {
            timeout: Duration::from_millis(100),
            retries: 5,
            total: None,
            give_up_after: 3,
            deadline: None,
        }
    }
}

/// Runs `upcase send`.
pub fn send(cfg: &SendConfig) -> anyhow::Result<Outcome> {
    match (&cfg.endpoint, cfg.bytes) {
        (Endpoint::Udp(_), Some(n)) => udp::send_bytes(cfg, n),
        (Endpoint::Udp(_), None) => udp::send_lines(cfg),
        (_, Some(n)) if cfg.naive => naive::run(cfg, n),
        (_, Some(n)) if !cfg.framing.is_stream() => framed::verify(cfg, n),
        (_, Some(n)) => stream::run(cfg, n),
        (_, None) if !cfg.framing.is_stream() => framed::pipe(cfg),
        (_, None) => pipe::run(cfg),
    }
}

/// The error for a server that sent nothing for `-w` while we waited.
pub fn silence(cfg: &SendConfig, received: u64) -> anyhow::Error {
    anyhow::anyhow!(
        "{} sent nothing for {:?} (-w/--timeout), after {received} bytes",
        cfg.endpoint,
        cfg.sockopts.wait.unwrap_or_default()
    )
}

/// A read that gave up after SO_RCVTIMEO (`-w`): Linux says EAGAIN.
pub fn is_timeout(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}

/// Megabytes (10^6 bytes) per second, as iperf and the summaries print it.
pub fn mb_per_s(bytes: u64, secs: f64) -> f64 {
    if secs > 0.0 {
        bytes as f64 / 1e6 / secs
    } else {
        0.0
    }
}
