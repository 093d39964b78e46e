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
        stream.write_all(transform.push(buf.filled(n))?)?;
        log.add(n);
    }
    stream.write_all(transform.finish()?)?;
    shutdown(stream)
}

/// The contract on a tokio stream. With `idle`, a read or a write that
/// makes no progress for that long ends the connection (`--idle-timeout`).
pub async fn relay_async<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    mut transform: Transformer,
    block: usize,
    idle: Option<Duration>,
    log: &mut ConnLog,
) -> io::Result<()> {
    let mut buf = BlockBuf::new(block);
    loop {
        let n = within(idle, stream.read(buf.space())).await??;
        if n == 0 {
            break;
        }
        write_all_async(stream, transform.push(buf.filled(n))?, idle).await?;
        log.add(n);
    }
    write_all_async(stream, transform.finish()?, idle).await?;
    within(idle, stream.shutdown()).await?
}

/// `write_all`, where each write must make progress within `idle`.
async fn write_all_async<S: AsyncWrite + Unpin>(
    stream: &mut S,
    mut data: &[u8],
    idle: Option<Duration>,
) -> io::Result<()> {
    while !data.is_empty() {
        let n = within(idle, stream.write(data)).await??;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        data = &data[n..];
    }
    Ok(())
}

/// Runs `f`, or fails with [`idle_error`] if it takes longer than `idle`.
async fn within<F: Future>(idle: Option<Duration>, f: F) -> io::Result<F::Output> {
    match idle {
        None => Ok(f.await),
        Some(d) => tokio::time::timeout(d, f).await.map_err(|_| idle_error(d)),
    }
}

/// The error that ends a connection idle for `d` (`--idle-timeout`).
pub fn idle_error(d: Duration) -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        format!(
            "idle for {}: closed (--idle-timeout)",
            humantime::format_duration(d)
        ),
    )
}

/// What a non-blocking connection needs next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Wait until the socket is readable.
    WaitRead,
    /// Wait until the socket is writable (output is pending).
    WaitWrite,
    /// Still ready, but this connection used its turn: come back soon.
    Again,
    /// Finished: the reply is sent and the write side shut down.
    Done,
}

/// Reads per turn before a busy connection yields to the others.
const TURN: usize = 16;

/// The contract for readiness loops (`select`, `epoll`), as a state machine.
///
/// Reads go into a buffer the loop shares between all its connections; a
/// connection keeps bytes of its own only when a write was partial, so an
/// idle connection costs this struct and nothing more. While output is
/// pending the connection asks for writability, not readability: it reads
/// nothing more until the client has taken what it was sent.
pub struct ReadyConn {
    /// When a read or write last moved bytes (for `--idle-timeout`).
    pub last_progress: Instant,
    pending: Vec<u8>,
    sent: usize,
    eof: bool,
    finished: bool,
    transform: Transformer,
    pub log: ConnLog,
}

impl ReadyConn {
    pub fn new(transform: Transformer, log: ConnLog) -> Self {
        ReadyConn {
            last_progress: Instant::now(),
            pending: Vec::new(),
            sent: 0,
            eof: false,
            finished: false,
            transform,
            log,
        }
    }

    /// Makes as much progress as the socket allows, within one turn.
    /// `shutdown` half-closes the socket's write side.
    ///
    /// `short_read_drains`: a read that returns less than asked means the
    /// receive queue is empty (epoll(7) says so for stream sockets), so the
    /// connection can wait for the next event without a read that would
    /// only fail with EAGAIN: one system call less per message. The caller
    /// must pass false when the event it is handling already reported the
    /// peer's end of file, which would otherwise never be reported again.
    pub fn drive<S: Read + Write>(
        &mut self,
        s: &mut S,
        scratch: &mut [u8],
        short_read_drains: bool,
        shutdown: impl FnOnce(&S) -> io::Result<()>,
    ) -> io::Result<Step> {
        for _ in 0..TURN {
            if !self.flush(s)? {
                return Ok(Step::WaitWrite);
            }
            if self.eof {
                if !self.finished {
                    self.finished = true;
                    self.pending.extend_from_slice(self.transform.finish()?);
                    continue;
                }
                shutdown(s)?;
                return Ok(Step::Done);
            }
            let n = match s.read(scratch) {
                Ok(0) => {
                    self.eof = true;
                    continue;
                }
                Ok(n) => {
                    self.last_progress = Instant::now();
                    n
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Step::WaitRead),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            self.log.add(n);
            let out = self.transform.push(&mut scratch[..n])?;
            // Write straight from the shared buffer; keep only what is left.
            let mut done = 0;
            while done < out.len() {
                match s.write(&out[done..]) {
                    Ok(k) => done += k,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e),
                }
            }
            if done < out.len() {
                self.pending.extend_from_slice(&out[done..]);
                return Ok(Step::WaitWrite);
            }
            if short_read_drains && n < scratch.len() {
                return Ok(Step::WaitRead);
            }
        }
        Ok(Step::Again)
    }

    /// Whether output waits for the socket to become writable.
    pub fn has_pending(&self) -> bool {
        self.sent < self.pending.len()
    }

    /// Writes pending output; true when none is left.
    fn flush<S: Write>(&mut self, s: &mut S) -> io::Result<bool> {
        while self.sent < self.pending.len() {
            match s.write(&self.pending[self.sent..]) {
                Ok(k) => {
                    self.sent += k;
                    self.last_progress = Instant::now();
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        if !self.pending.is_empty() {
            // Give the memory back: most connections never need it again.
            self.pending = Vec::new();
            self.sent = 0;
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transform::Mode;

    /// An in-memory socket: reads come from `input` in chunks of `read_max`
    /// (then WouldBlock until `closed`); writes take at most `room` bytes
    /// before WouldBlock, and `room` is refilled by the test.
    struct FakeSock {
        input: Vec<u8>,
        pos: usize,
        read_max: usize,
        closed: bool,
        room: usize,
        output: Vec<u8>,
    }

    impl Read for FakeSock {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let left = self.input.len() - self.pos;
            if left == 0 {
                return if self.closed {
                    Ok(0)
                } else {
                    Err(io::ErrorKind::WouldBlock.into())
                };
            }
            let n = left.min(buf.len()).min(self.read_max);
            buf[..n].copy_from_slice(&self.input[self.pos..self.pos + n]);
            self.pos += n;
            Ok(n)
        }
    }

    impl Write for FakeSock {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if self.room == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let n = buf.len().min(self.room);
            self.room -= n;
            self.output.extend_from_slice(&buf[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn conn() -> ReadyConn {
        ReadyConn::new(Transformer::new(Mode::Ascii), ConnLog::new("test".into()))
    }

    #[test]
    fn backpressure_stops_reading_until_the_peer_takes_output() {
        let input: Vec<u8> = b"capitalize this!".repeat(4096); // 64 KiB
        let mut s = FakeSock {
            input: input.clone(),
            pos: 0,
            read_max: 1000,
            closed: true,
            room: 3000,
            output: Vec::new(),
        };
        let mut c = conn();
        let mut scratch = vec![0u8; 4096];
        let mut rounds = 0;
        loop {
            let step = c.drive(&mut s, &mut scratch, false, |_| Ok(())).unwrap();
            if step == Step::Done {
                break;
            }
            if step == Step::WaitWrite {
                // Never more read than written plus one block in flight.
                assert!(s.pos <= s.output.len() + 1000 + c.pending.len());
                assert!(c.pending.len() <= 1000, "pending is at most one block");
                s.room = 3000; // the peer reads
            }
            rounds += 1;
            assert!(rounds < 10_000, "no progress");
        }
        assert_eq!(s.output, crate::transform::upper(&input));
    }

    #[test]
    fn half_close_after_everything_is_sent() {
        let mut s = FakeSock {
            input: b"abc".to_vec(),
            pos: 0,
            read_max: 2,
            closed: false,
            room: usize::MAX,
            output: Vec::new(),
        };
        let mut c = conn();
        let mut scratch = vec![0u8; 16];
        let mut shut = false;
        assert_eq!(
            c.drive(&mut s, &mut scratch, false, |_| Ok(())).unwrap(),
            Step::WaitRead
        );
        assert_eq!(s.output, b"ABC");
        s.closed = true; // the client half-closes
        let step = c
            .drive(&mut s, &mut scratch, false, |_| {
                shut = true;
                Ok(())
            })
            .unwrap();
        assert_eq!((step, shut), (Step::Done, true));
    }
}
