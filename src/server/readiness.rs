//! The readiness driver (select, epoll): [`Conn`] on a non-blocking socket,
//! moved as far as the socket allows whenever the loop says it is ready.
//!
//! Reads go into a buffer the loop shares between all its connections; a
//! connection keeps bytes of its own only when a write was partial, so an
//! idle connection costs this struct and nothing more. While output is
//! pending the connection asks for writability, not readability: its
//! read-ahead is zero, so it reads nothing more until the client has taken
//! what it was sent.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::conn::{Buffered, Conn, ROOM_RETRY, Timeout};

/// What a non-blocking connection needs next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Wait until the socket is readable.
    WaitRead,
    /// Wait until the socket is writable (output is pending).
    WaitWrite,
    /// Still ready, but this connection used its turn: come back soon.
    Again,
    /// Its held message waits for room in `--max-buffered`: not polled
    /// (its bytes would wake the loop for nothing); the sweep brings it
    /// back once the core says there is room.
    WaitRoom,
    /// Finished (done, failed or idle): log it and drop the socket.
    Done,
}

/// Reads per turn before a busy connection yields to the others.
const TURN: usize = 16;

/// One connection of a readiness loop: the core, and the reply bytes a
/// partial write left over.
pub struct ReadyConn {
    pub conn: Conn,
    pending: Vec<u8>,
    sent: usize,
}

impl ReadyConn {
    pub fn new(conn: Conn) -> Self {
        ReadyConn {
            conn,
            pending: Vec::new(),
            sent: 0,
        }
    }

    /// Makes as much progress as the socket allows, within one turn.
    /// `shutdown` half-closes the socket's write side. Errors end the
    /// connection ([`Step::Done`]; the core knows why).
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
    ) -> Step {
        match self.turn(s, scratch, short_read_drains, shutdown) {
            Ok(step) => step,
            Err(e) => {
                self.conn.on_error(&e);
                Step::Done
            }
        }
    }

    fn turn<S: Read + Write>(
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
            if self.conn.wants_shutdown() {
                shutdown(s)?;
                self.conn.on_shutdown();
                return Ok(Step::Done);
            }
            if self.conn.is_finished() {
                return Ok(Step::Done);
            }
            let budget = self.conn.read_budget().min(scratch.len());
            if budget == 0 {
                // Nothing to write, not finished: waiting for room.
                return Ok(Step::WaitRoom);
            }
            let n = match s.read(&mut scratch[..budget]) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Step::WaitRead),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            let now = Instant::now();
            let reply = if n == 0 {
                self.conn.on_input_end(now)?
            } else {
                self.conn.on_input(&mut scratch[..n], now)?
            };
            // Write straight from the shared buffer; keep only what is left.
            let mut done = 0;
            while done < reply.len() {
                match s.write(&reply[done..]) {
                    Ok(k) => done += k,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e),
                }
            }
            if done < reply.len() {
                self.pending.extend_from_slice(&reply[done..]);
            }
            self.conn.on_written(done, now);
            if !self.pending.is_empty() {
                return Ok(Step::WaitWrite);
            }
            // A short read drained the socket, unless this read ended the
            // input (a framing error): then go on to shut down.
            if short_read_drains && n > 0 && n < budget && self.conn.read_budget() > 0 {
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
                    self.conn.on_written(k, Instant::now());
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

/// What one sweep of an event loop found: the connections a deadline
/// ended (to be ended with [`super::end_connection`] and dropped), and those
/// idle by the clock whose bytes wait in the socket (to be driven now).
#[derive(Debug, Default)]
pub struct Swept {
    pub ended: Vec<usize>,
    pub again: Vec<usize>,
}

/// When an event loop looks at its connections' deadlines: every
/// [`super::sweep_every`] of the shortest timeout, and every [`ROOM_RETRY`]
/// while a connection waits for room in the budget.
pub struct SweepClock {
    every: Option<Duration>,
    last: Instant,
    budget: Arc<Buffered>,
}

impl SweepClock {
    pub fn new(config: &super::Config) -> SweepClock {
        SweepClock {
            every: config.sweep_timeout().map(super::sweep_every),
            last: Instant::now(),
            budget: config.buffered.clone(),
        }
    }

    /// When the loop must wake for the next sweep (if it has connections).
    pub fn wake_at(&self) -> Option<Instant> {
        let room = (self.budget.waiting() > 0).then_some(ROOM_RETRY);
        let every = [self.every, room].into_iter().flatten().min()?;
        Some(self.last + every)
    }

    /// Whether a sweep is due at `now`; if so, it counts as done.
    pub fn due(&mut self, now: Instant) -> bool {
        let due = self.wake_at().is_some_and(|t| now >= t);
        if due {
            self.last = now;
        }
        due
    }
}

/// The one deadline sweep of the event loops (select, epoll, uring): each
/// connection's core is told the time and decides; the loop only removes
/// what ended and drives what could progress. A loop runs it every
/// [`super::sweep_every`] of [`super::Config::sweep_timeout`].
pub fn sweep<'a>(
    now: Instant,
    conns: impl Iterator<Item = (usize, BorrowedFd<'a>, &'a mut Conn)>,
) -> Swept {
    let mut swept = Swept::default();
    for (key, fd, conn) in conns {
        match conn.handle_timeout(now, |c| could_progress(fd, c)) {
            Timeout::Pending => {}
            Timeout::Progress => swept.again.push(key),
            Timeout::Ended => swept.ended.push(key),
        }
    }
    swept
}

/// Whether a connection the idle clock calls idle could in fact make
/// progress right now: its input is waiting (or its peer's end of file),
/// or its socket takes the output it holds. After the server was stopped
/// (SIGSTOP, a long pause) every clock says idle, but a client whose bytes
/// sit in the socket is not; the event loops ask this before closing one,
/// and drive it instead. One poll(2) per idle candidate per sweep.
pub fn could_progress(fd: BorrowedFd<'_>, conn: &Conn) -> bool {
    let mut events = 0;
    if conn.read_budget() > 0 {
        events |= libc::POLLIN;
    }
    if conn.wants_write() {
        events |= libc::POLLOUT;
    }
    poll_now(fd, events)
}

/// Whether `fd` is ready for `events` (or hung up, or failed) right now.
pub fn poll_now(fd: BorrowedFd<'_>, events: libc::c_short) -> bool {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events,
        revents: 0,
    };
    // SAFETY: one valid pollfd; a zero timeout never blocks.
    let r = unsafe { libc::poll(&mut p, 1, 0) };
    r > 0 && p.revents & (events | libc::POLLHUP | libc::POLLERR) != 0
}
