//! The blocking driver (iterative, fork, threads, pool): one connection on
//! a blocking socket, read and written in turn, through [`Conn`]; and what
//! those models share: waiting for a client without missing the drain, and
//! UDP listeners on threads of their own.
//!
//! A blocking driver has the seeds' loop exactly: read one block, write the
//! whole reply, repeat. Its read-ahead is zero by construction (the write
//! returns only when the kernel took every byte), and `--idle-timeout` is
//! the socket's own SO_RCVTIMEO and SO_SNDTIMEO: a read or write that makes
//! no progress for that long fails, and the connection is closed as idle.

use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::Instant;

use super::{AcceptBackoff, Config};
use crate::conn::{Conn, Timeout};
use crate::lifecycle::{Lifecycle, wait_readable};
use crate::net::{Listener, Stream};

/// Splits listeners into stream listeners (made non-blocking, since we
/// wait in poll and then accept) and UDP sockets, each of which gets a
/// thread of its own.
pub fn start(
    listeners: Vec<Listener>,
    config: &Config,
    life: &Arc<Lifecycle>,
) -> io::Result<Vec<Listener>> {
    let mut streams = Vec::new();
    for l in listeners {
        match l {
            Listener::Udp(u) => {
                // One thread a socket: threads waiting on the same socket
                // all wake for each datagram, and on this machine two of
                // them answered 43 % fewer than one (docs/BENCHMARKS.md).
                let (svc, thread_life) = (config.udp_service(), life.clone());
                let helper = std::thread::Builder::new()
                    .name("upcase-udp".into())
                    .spawn(move || {
                        if let Err(e) = super::udp::serve_blocking(u, svc, &thread_life) {
                            tracing::error!("udp listener failed: {e}");
                        }
                    })?;
                life.keep_helper(helper);
            }
            l => {
                l.set_nonblocking(true)?;
                streams.push(l);
            }
        }
    }
    Ok(streams)
}

/// The stream listeners of a blocking model, and how accepting is going.
pub struct Acceptor {
    pub listeners: Vec<Listener>,
    backoff: AcceptBackoff,
}

impl Acceptor {
    pub fn new(listeners: Vec<Listener>) -> Self {
        Acceptor {
            listeners,
            backoff: AcceptBackoff::default(),
        }
    }

    /// Waits for the next client on any listener; `None` once the drain
    /// has started. Accept errors are logged and waited out, never fatal.
    pub fn next_client(&mut self, life: &Lifecycle) -> Option<(Stream, String)> {
        loop {
            if life.is_draining() {
                return None;
            }
            let mut fds: Vec<_> = self.listeners.iter().map(|l| l.as_fd()).collect();
            fds.push(life.draining_fd());
            let ready = match wait_readable(&fds, None) {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!("poll: {e}");
                    std::thread::sleep(AcceptBackoff::PAUSE);
                    continue;
                }
            };
            for (l, _) in self.listeners.iter().zip(&ready).filter(|(_, r)| **r) {
                match l.accept() {
                    Ok(c) => {
                        self.backoff.succeeded();
                        return Some(c);
                    }
                    // Another worker took it first.
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => {
                        if let Some(pause) = self.backoff.failed(&e) {
                            // Still readable: waiting in poll would spin.
                            std::thread::sleep(pause);
                        }
                    }
                }
            }
        }
    }
}

/// Serves one connection to its end, by the contract, and logs how it went.
pub fn serve(mut sock: Stream, peer: String, config: &Config) {
    sock.tune(&config.sockopts);
    let origin = config.origin(peer, sock.as_fd());
    let mut conn = Conn::new(origin, config.protocol, config.limits(0), Instant::now());
    if let Err(e) = sock.set_io_timeout(conn.wait_limit(Instant::now())) {
        tracing::warn!("setting the idle timeout: {e}");
    }
    let mut buf = BlockBuf::new(config.block, conn.limits().buffered.clone());
    if let Err(e) = drive(&mut sock, &mut conn, &mut buf) {
        // SO_RCVTIMEO / SO_SNDTIMEO expired: the core's deadline is here
        // (it names which one). A blocked thread cannot look at the socket
        // while it waits, so there is no "bytes were waiting" to ask.
        let timed_out = e.kind() == io::ErrorKind::WouldBlock && conn.poll_timeout().is_some();
        if !timed_out || conn.handle_wait_timeout(Instant::now(), |_| false) != Timeout::Ended {
            conn.on_error(&e);
        }
    }
    super::end_connection(sock.as_fd(), &conn);
}

/// The seeds' loop: read a block, write all of the reply, until the peer's
/// end of input; then shut the write side.
fn drive(sock: &mut Stream, conn: &mut Conn, buf: &mut BlockBuf) -> io::Result<()> {
    while !conn.is_finished() {
        if conn.wants_shutdown() {
            sock.shutdown_write()?;
            conn.on_shutdown();
            break;
        }
        if conn.read_budget() == 0 {
            // The message it holds waits for room in --max-buffered: sleep
            // until the core's next deadline, which asks again.
            let Some(at) = conn.poll_timeout() else { break };
            std::thread::sleep(at.saturating_duration_since(Instant::now()));
            conn.handle_timeout(Instant::now(), |_| false);
            continue;
        }
        let in_setup = conn.in_setup();
        if in_setup {
            // The PROXY header's and the handshake's deadlines count from
            // the accept, not per read.
            sock.set_io_timeout(conn.wait_limit(Instant::now()))?;
        }
        let n = match sock.read(buf.space(conn.read_budget())) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        let now = Instant::now();
        let reply = if n == 0 {
            conn.on_input_end(now)?
        } else {
            conn.on_input(buf.filled(n), now)?
        };
        let len = reply.len();
        sock.write_all(reply)?;
        conn.on_written(len, Instant::now());
        if in_setup && !conn.in_setup() {
            sock.set_io_timeout(conn.limits().idle)?;
        }
    }
    Ok(())
}

/// The block buffer of one connection. It starts small and doubles each
/// time a read fills it, up to `--block`: an idle or chatty connection costs
/// a few KiB, a bulk stream gets large reads (fewer system calls), and no
/// connection ever holds more than one block.
pub struct BlockBuf {
    buf: Vec<u8>,
    max: usize,
    /// `--max-buffered`: what the buffer grew beyond its first block is
    /// charged to it, and it grows only while there is room.
    budget: Arc<crate::conn::Buffered>,
}

const FIRST_BLOCK: usize = 4096;

impl BlockBuf {
    pub fn new(max: usize, budget: Arc<crate::conn::Buffered>) -> Self {
        BlockBuf {
            buf: vec![0u8; FIRST_BLOCK.min(max)],
            max,
            budget,
        }
    }

    /// The bytes charged to the budget.
    fn charged(&self) -> usize {
        self.buf.len().saturating_sub(FIRST_BLOCK.min(self.max))
    }

    /// Where the next read goes: at most `budget` bytes (at least one, so
    /// that a read can still see the end of input). A budget far below the
    /// buffer (the server is over `--max-buffered`) shrinks it back: what a
    /// connection holds is its buffer, not only its unsent bytes.
    #[inline]
    pub fn space(&mut self, budget: usize) -> &mut [u8] {
        if budget < self.buf.len() / 8 && self.buf.len() > FIRST_BLOCK {
            self.budget.release(self.charged());
            self.buf = vec![0u8; FIRST_BLOCK.min(self.max)];
        }
        let n = budget.clamp(1, self.buf.len());
        &mut self.buf[..n]
    }

    /// The first `n` bytes just read; grows the buffer if they filled it
    /// and the budget has room.
    #[inline]
    pub fn filled(&mut self, n: usize) -> &mut [u8] {
        if n == self.buf.len() && n < self.max {
            let to = (n * 2).min(self.max);
            if self.budget.try_charge(to - n) {
                // Grow after use: the bytes are still at the front.
                self.buf.resize(to, 0);
            }
        }
        &mut self.buf[..n]
    }
}

impl Drop for BlockBuf {
    fn drop(&mut self) {
        self.budget.release(self.charged());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conn::Buffered;

    /// A read buffer grows only while `--max-buffered` has room for its
    /// growth, and gives what it took back when it shrinks or is dropped.
    #[test]
    fn a_read_buffer_grows_within_the_budget() {
        let budget = Buffered::new(10_000);
        let mut buf = BlockBuf::new(256 * 1024, budget.clone());
        let n = buf.space(usize::MAX).len();
        assert_eq!(n, 4096);
        buf.filled(n); // 4K to 8K: 4,096 charged
        assert_eq!(budget.held(), 4096);
        let n = buf.space(usize::MAX).len();
        assert_eq!(n, 8192);
        buf.filled(n); // 8K to 16K would charge 12,288 in all: refused
        assert_eq!(budget.held(), 4096);
        assert_eq!(buf.space(usize::MAX).len(), 8192);
        // Over the budget a connection reads little, and the buffer shrinks.
        assert_eq!(buf.space(512).len(), 512);
        assert_eq!(budget.held(), 0);
        buf.filled(512);
        let n = buf.space(usize::MAX).len();
        buf.filled(n);
        assert_eq!(budget.held(), 4096);
        drop(buf);
        assert_eq!(budget.held(), 0);
    }
}
