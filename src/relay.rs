//! The connection contract every server model keeps.
//!
//! 1. Read one bounded block (never more than `--block` bytes at a time).
//! 2. Transform it.
//! 3. Write all of it back before reading again. While the client does not
//!    read, that write waits, so the server stops reading from that client:
//!    TCP's flow control reaches the client, and memory per connection stays
//!    at one block. This is the seeds' deadlock seen from the server's side,
//!    and the reason the server never buffers without bound.
//! 4. At end of file (the client's half-close), send what the transform
//!    still owes, then `shutdown(Write)` and close.
//!
//! Models differ only in how they wait for each step; this module holds the
//! drivers for blocking sockets and for tokio, and the per-connection log.

use std::io::{self, Read, Write};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::transform::Transformer;

/// The bytes-processed-so-far line of the seed server, rate-limited to one
/// a second per connection and only computed when debug logging is on.
pub struct ConnLog {
    peer: String,
    started: Instant,
    last_report: Instant,
    verbose: bool,
    pub bytes: u64,
}

const REPORT_EVERY: Duration = Duration::from_secs(1);

impl ConnLog {
    pub fn new(peer: String) -> Self {
        let now = Instant::now();
        tracing::info!("connection from {peer}");
        ConnLog {
            peer,
            started: now,
            last_report: now,
            verbose: tracing::enabled!(tracing::Level::DEBUG),
            bytes: 0,
        }
    }

    #[inline]
    pub fn add(&mut self, n: usize) {
        self.bytes += n as u64;
        if self.verbose && self.last_report.elapsed() >= REPORT_EVERY {
            self.last_report = Instant::now();
            tracing::debug!("{}: {} bytes processed so far", self.peer, self.bytes);
        }
    }

    /// Logs how the connection ended.
    pub fn finish(&self, result: &io::Result<()>) {
        let secs = self.started.elapsed().as_secs_f64();
        match result {
            Ok(()) => tracing::info!(
                "completed {}: {} bytes in {:.3} s",
                self.peer,
                self.bytes,
                secs
            ),
            Err(e) => tracing::warn!(
                "connection {} ended with an error after {} bytes: {e}",
                self.peer,
                self.bytes
            ),
        }
    }
}

/// The block buffer of one connection. It starts small and doubles each
/// time a read fills it, up to `--block`: an idle or chatty connection costs
/// a few KiB, a bulk stream gets large reads (fewer system calls), and no
/// connection ever holds more than one block.
pub struct BlockBuf {
    buf: Vec<u8>,
    max: usize,
}

const FIRST_BLOCK: usize = 4096;

impl BlockBuf {
    pub fn new(max: usize) -> Self {
        BlockBuf {
            buf: vec![0u8; FIRST_BLOCK.min(max)],
            max,
        }
    }

    /// Where the next read goes.
    #[inline]
    pub fn space(&mut self) -> &mut [u8] {
        &mut self.buf
    }

    /// The first `n` bytes just read; grows the buffer if they filled it.
    #[inline]
    pub fn filled(&mut self, n: usize) -> &mut [u8] {
        if n == self.buf.len() && n < self.max {
            // Grow after use: the bytes are still at the front.
            self.buf.resize((n * 2).min(self.max), 0);
        }
        &mut self.buf[..n]
    }
}

/// The contract on a blocking stream (`shutdown` is the stream's own
/// half-close, which `std::io::Write` does not offer).
pub fn relay_blocking<S: Read + Write>(
    stream: &mut S,
    shutdown: impl FnOnce(&mut S) -> io::Result<()>,
    mut transform: Transformer,
    block: usize,
    log: &mut ConnLog,
) -> io::Result<()> {
    let mut buf = BlockBuf::new(block);
    loop {
        let n = match stream.read(buf.space()) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        stream.write_all(transform.push(buf.filled(n)))?;
        log.add(n);
    }
    stream.write_all(transform.finish())?;
    shutdown(stream)
}

/// The contract on a tokio stream.
pub async fn relay_async<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    mut transform: Transformer,
    block: usize,
    log: &mut ConnLog,
) -> io::Result<()> {
    let mut buf = BlockBuf::new(block);
    loop {
        let n = stream.read(buf.space()).await?;
        if n == 0 {
            break;
        }
        stream.write_all(transform.push(buf.filled(n))).await?;
        log.add(n);
    }
    stream.write_all(transform.finish()).await?;
    stream.shutdown().await
}
