//! The load generator's io_uring engine, for request/response (rr, and the
//! active connections of hold).
//!
//! The mio loop ([`super::load`]) pays per message a `write`, a `read` and
//! its share of `epoll_wait`, and epoll re-polls every ready socket before
//! reporting it; profiles showed that work as half of the load generator's
//! time, and the load generator is what limits rr on two cores. Here every
//! connection has one multishot receive into a ring of provided blocks
//! ([`crate::ring`]), and one `io_uring_enter` submits every send that is
//! due and collects every reply that arrived. What it measures is the same:
//! each reply is verified byte for byte, never assumed to come in one piece,
//! and latency counts from when the message was due (open loop with
//! `--rate`, as in wrk2).
//!
//! A message's next request goes out only when the whole reply is in and
//! the kernel has reported the request's send complete; a reply byte that
//! arrives with no request outstanding is an error.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use io_uring::{cqueue, opcode, squeue, types};

use super::load::{self, Job, Live, ThreadResult};
use crate::net::MioStream;
use crate::ring::{self, Block, Completion, Ring};

const GROUP: u16 = 0;
const BLOCK: usize = 16 * 1024;

const RECV: u64 = 1;
const SEND: u64 = 2;
const SHUT_WR: u64 = 3;
const CANCEL: u64 = 4;

/// Whether the engine can run here.
pub fn available() -> bool {
    ring::available()
}

struct Conn {
    sock: MioStream,
    /// Request bytes sent / reply bytes received, of the current message.
    sent: u64,
    got: u64,
    due: Instant,
    in_flight: bool,
    sending: bool,
    receiving: bool,
    /// The receive is being cancelled (the connection is done).
    cancelled: bool,
    /// Broken (counted as an error) or finished: no new messages.
    done: bool,
    /// The server's end of file arrived.
    eof: bool,
    received_total: u64,
    messages: u64,
}

struct Engine<'a> {
    /// The ring and its blocks; dropped first (fields drop in order), so
    /// that every operation is stopped before `request` is freed.
    ring: Ring,
    conns: Vec<Conn>,
    job: &'a Job,
    /// The request, in memory of our own: the kernel reads it during a
    /// send, so it must outlive every send (see `close_gracefully`).
    request: Vec<u8>,
    live: &'a Live,
    interval: Option<Duration>,
    /// Completions of one round, kept to save an allocation per round.
    done: Vec<Completion>,
}

pub fn run(job: Job, live: std::sync::Arc<Live>) -> ThreadResult {
    let mut r = ThreadResult::new(job.conns);
    if let Err(e) = drive(&job, &live, &mut r) {
        r.errors += 1;
        r.first_error.get_or_insert(e.to_string());
    }
    r
}

fn drive(job: &Job, live: &Live, r: &mut ThreadResult) -> io::Result<()> {
    // Two blocks per connection: a reply and the start of the next never
    // need more, so a receive rarely finds the ring empty.
    let count = (job.conns * 2).next_power_of_two().clamp(64, 4096) as u16;
    let ring = Ring::with_buffers(4096, count, BLOCK, GROUP)?;
    let start = Instant::now();
    let mut conns = Vec::with_capacity(job.conns);
    let mut connects = job.first as u64;
    for i in 0..job.conns {
        let sock = load::connect(job, &mut connects)?;
        conns.push(Conn {
            sock,
            sent: 0,
            got: 0,
            due: job.first_due(start, i),
            in_flight: false,
            sending: false,
            receiving: false,
            cancelled: false,
            done: false,
            eof: false,
            received_total: 0,
            messages: 0,
        });
    }
    // Registered ("fixed") descriptors: the kernel looks each socket up
    // once, not at every operation (fget/fput were 5 % of a profile).
    let fds: Vec<RawFd> = conns.iter().map(|c: &Conn| raw(&c.sock)).collect();
    ring.submitter().register_files(&fds)?;
    let mut request = Vec::with_capacity(job.size);
    while request.len() < job.size {
        let more = job
            .request
            .slice(request.len() as u64, job.size - request.len());
        request.extend_from_slice(more);
    }
    let mut e = Engine {
        ring,
        conns,
        job,
        request,
        live,
        interval: job.interval(),
        done: Vec::with_capacity(1024),
    };
    for i in 0..e.conns.len() {
        e.arm_recv(i);
    }
    let result = e.measure(r);
    for (i, c) in e.conns.iter().enumerate() {
        r.per_conn[i] = c.received_total;
    }
    r.served = e.conns.iter().filter(|c| c.messages > 0).count();
    e.close_gracefully(r);
    result
}

impl Engine<'_> {
    fn push(&mut self, entry: squeue::Entry) -> io::Result<()> {
        // SAFETY: a send points into `self.request`, which outlives every
        // send (see `close_gracefully`); receives use the buffer ring.
        while unsafe { self.ring.push(&entry) }.is_err() {
            self.ring.submit()?; // full: hand the queue to the kernel
        }
        Ok(())
    }

    fn arm_recv(&mut self, i: usize) {
        let fd = fixed(i);
        self.conns[i].receiving = true;
        let e = opcode::RecvMulti::new(fd, GROUP)
            .build()
            .user_data(ring::user_data(RECV, i));
        if let Err(err) = self.push(e) {
            self.conns[i].receiving = false;
            self.conns[i].done = true;
            tracing::debug!("cannot arm a receive: {err}");
        }
    }

    /// Sends what is left of the current request.
    fn send_rest(&mut self, i: usize) -> io::Result<()> {
        let c = &mut self.conns[i];
        let rest = &self.request[c.sent as usize..];
        c.sending = true;
        let e = opcode::Send::new(fixed(i), rest.as_ptr(), rest.len() as u32)
            .flags(libc::MSG_NOSIGNAL)
            .build()
            .user_data(ring::user_data(SEND, i));
        self.push(e)
    }

    /// Starts connection `i`'s next message if it is due.
    fn start(&mut self, i: usize, now: Instant) -> io::Result<()> {
        let c = &mut self.conns[i];
        if c.done || c.in_flight || c.sending {
            return Ok(());
        }
        match self.interval {
            Some(_) if c.due > now => return Ok(()),
            Some(_) => {}
            None => c.due = now,
        }
        c.in_flight = true;
        c.sent = 0;
        c.got = 0;
        self.send_rest(i)
    }

    /// The measured part: until the deadline or a stop.
    fn measure(&mut self, r: &mut ThreadResult) -> io::Result<()> {
        let now = Instant::now();
        for i in 0..self.conns.len() {
            let res = self.start(i, now);
            self.check(i, res, r);
        }
        loop {
            let now = Instant::now();
            if now >= self.job.deadline || self.live.stop.load(Ordering::Relaxed) {
                return Ok(());
            }
            let mut wake = self.job.deadline;
            if self.interval.is_some() {
                for i in 0..self.conns.len() {
                    let res = self.start(i, now);
                    self.check(i, res, r);
                    let c = &self.conns[i];
                    if !c.done && !c.in_flight {
                        wake = wake.min(c.due);
                    }
                }
            }
            self.wait(wake)?;
            let mut done = std::mem::take(&mut self.done);
            for c in done.drain(..) {
                let (kind, i) = ring::split(c.data);
                let outcome = match kind {
                    RECV => self.received(i, c.res, c.flags, c.block, r),
                    // The reply may have come in before the send's own
                    // completion was read: the message may end here too.
                    SEND => self.sent(i, c.res).and_then(|()| self.complete(i, r)),
                    _ => Ok(()),
                };
                self.check(i, outcome, r);
            }
            self.done = done;
        }
    }

    /// Submits, waits for a completion or `until`, and collects them.
    fn wait(&mut self, until: Instant) -> io::Result<()> {
        // The load generator sleeps between rounds, as it did for every
        // figure in docs/BENCHMARKS.md: no spinning in the instrument.
        self.ring
            .submit_and_wait(until, Duration::ZERO, &mut self.done)
    }

    /// Counts a connection's failure as the mio loop does: an error, and
    /// the connection is dropped from the run (not retried).
    fn check(&mut self, i: usize, outcome: io::Result<()>, r: &mut ThreadResult) {
        if let Err(e) = outcome {
            r.errors += 1;
            self.live.errors.fetch_add(1, Ordering::Relaxed);
            r.first_error.get_or_insert(e.to_string());
            self.stop_conn(i);
        }
    }

    fn stop_conn(&mut self, i: usize) {
        let c = &mut self.conns[i];
        c.done = true;
        c.in_flight = false;
        if c.receiving && !c.cancelled {
            c.cancelled = true;
            let e = opcode::AsyncCancel::new(ring::user_data(RECV, i))
                .build()
                .user_data(ring::user_data(CANCEL, i));
            let _ = self.push(e);
        }
    }

    fn received(
        &mut self,
        i: usize,
        res: i32,
        flags: u32,
        block: Option<Block>,
        r: &mut ThreadResult,
    ) -> io::Result<()> {
        let c = &mut self.conns[i];
        if !cqueue::more(flags) {
            c.receiving = false;
        }
        let outcome = match (res, block) {
            (n, Some(b)) if n > 0 => {
                let data = self.ring.block(&b, n as usize);
                let want = self.job.reply_size as u64 - c.got;
                let result = if c.done {
                    Ok(()) // closing: what the server still sends is discarded
                } else if !c.in_flight || data.len() as u64 > want {
                    Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "reply longer than the request",
                    ))
                } else {
                    r.received(
                        (&mut c.got, &mut c.received_total),
                        data,
                        &self.job.reply,
                        self.live,
                    )
                };
                self.ring.give_back(b);
                result
            }
            (_, Some(b)) => {
                self.ring.give_back(b);
                Ok(())
            }
            (0, _) => {
                c.eof = true;
                if c.done {
                    Ok(())
                } else {
                    Err(load::early_eof(c.got))
                }
            }
            (e, _) if e == -libc::ENOBUFS || e == -libc::ECANCELED => Ok(()),
            (e, _) if e < 0 => Err(io::Error::from_raw_os_error(-e)),
            _ => Ok(()),
        };
        let c = &self.conns[i];
        if outcome.is_ok() && !c.receiving && !c.eof && !c.cancelled {
            // The kernel ended the multishot (out of blocks, or its own
            // limit): arm it again.
            self.arm_recv(i);
        }
        outcome?;
        self.complete(i, r)
    }

    fn sent(&mut self, i: usize, res: i32) -> io::Result<()> {
        let c = &mut self.conns[i];
        c.sending = false;
        if c.done {
            return Ok(());
        }
        if res < 0 {
            return Err(io::Error::from_raw_os_error(-res));
        }
        c.sent += res as u64;
        if c.sent < self.job.size as u64 {
            return self.send_rest(i);
        }
        Ok(())
    }

    /// A message is complete when its whole reply is in and its request's
    /// send has completed; then the next one starts (closed loop) or waits
    /// for its slot (open loop).
    fn complete(&mut self, i: usize, r: &mut ThreadResult) -> io::Result<()> {
        let c = &mut self.conns[i];
        if !c.in_flight || c.sending || c.got < self.job.reply_size as u64 {
            return Ok(());
        }
        let now = Instant::now();
        let lat = now.saturating_duration_since(c.due).as_nanos() as u64;
        let _ = r.hist.record(lat.max(1));
        r.messages += self.job.per_round;
        c.messages += 1;
        self.live
            .messages
            .fetch_add(self.job.per_round, Ordering::Relaxed);
        c.in_flight = false;
        if let Some(iv) = self.interval {
            c.due += iv;
        }
        self.start(i, now)
    }

    /// Ends every connection as the contract says (half-close, then read
    /// to the server's end of file), bounded to one second; then cancels
    /// what is still in flight.
    fn close_gracefully(mut self, r: &mut ThreadResult) {
        for i in 0..self.conns.len() {
            let c = &mut self.conns[i];
            c.done = true;
            if !c.eof && c.receiving {
                let e = opcode::Shutdown::new(fixed(i), libc::SHUT_WR)
                    .build()
                    .user_data(ring::user_data(SHUT_WR, i));
                let _ = self.push(e);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(1);
        while self.in_flight() && Instant::now() < deadline {
            if self.wait(deadline).is_err() {
                break;
            }
            let mut done = std::mem::take(&mut self.done);
            for c in done.drain(..) {
                let (kind, i) = ring::split(c.data);
                match kind {
                    RECV => {
                        let _ = self.received(i, c.res, c.flags, c.block, r);
                    }
                    SEND => self.conns[i].sending = false,
                    _ => {}
                }
            }
            self.done = done;
            if Instant::now() + Duration::from_millis(200) >= deadline {
                for i in 0..self.conns.len() {
                    self.stop_conn(i);
                }
            }
        }
        // Dropping the engine drops the ring first: it cancels what is
        // still in flight and waits for it (see `ring::Ring`'s Drop).
    }

    fn in_flight(&self) -> bool {
        self.conns.iter().any(|c| c.receiving || c.sending)
    }
}

/// Connection `i`'s registered descriptor.
fn fixed(i: usize) -> types::Fixed {
    types::Fixed(i as u32)
}

fn raw(s: &MioStream) -> RawFd {
    match s {
        MioStream::Tcp(t) => t.as_raw_fd(),
        MioStream::Unix(u) => u.as_raw_fd(),
    }
}
