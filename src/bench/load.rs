//! The load generator's event loops: stream, rr and crr over TCP or Unix.
//!
//! Each thread runs one mio loop over its share of the connections. Every
//! reply is verified byte for byte against the uppercased request (a wrong
//! byte is counted as an error, never as a message), and no reply is
//! assumed to arrive in one read: a connection reads until the whole reply
//! is there. Like the server's readiness driver, a short read is taken to
//! mean the socket is drained, which saves a system call per message, the
//! same work the server saves; both share two cores.
//!
//! Latency is measured per message from the moment it was *due*: in
//! closed-loop mode that is when it was sent; with `--rate` it is its slot
//! in the fixed schedule, so a stalled server cannot hide its tail latency
//! behind requests that were never sent (coordinated omission, as in wrk2).

use std::io::{self, Read, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use mio::{Events, Poll, Token};

use super::Workload;
use crate::addr::Endpoint;
use crate::net::{self, MioStream, SockOpts};
use crate::pattern::Pattern;

/// Counters the main thread reads every second for the interval report.
#[derive(Default)]
pub struct Live {
    pub bytes: AtomicU64,
    pub messages: AtomicU64,
    pub errors: AtomicU64,
    pub stop: AtomicBool,
}

/// What one thread measured.
pub struct ThreadResult {
    pub hist: Histogram<u64>,
    pub bytes: u64,
    pub messages: u64,
    pub errors: u64,
    /// Bytes received per connection (stream mode).
    pub per_conn: Vec<u64>,
    /// Connections that completed at least one message.
    pub served: usize,
    pub first_error: Option<String>,
}

pub fn new_hist() -> Histogram<u64> {
    // Nanoseconds, 1 ns to 100 s, 3 significant digits.
    Histogram::new_with_bounds(1, 100_000_000_000, 3).expect("valid bounds")
}

/// One thread's job.
pub struct Job {
    pub workload: Workload,
    pub endpoint: Endpoint,
    pub sockopts: SockOpts,
    pub conns: usize,
    /// Index of this thread's first connection (for staggering the schedule).
    pub first: usize,
    pub total_conns: usize,
    /// Request and reply sizes (they differ in UTF-8 mode).
    pub size: usize,
    pub reply_size: usize,
    /// The request stream, and the reply stream it must produce.
    pub request: Pattern,
    pub reply: Pattern,
    pub mode: crate::transform::Mode,
    /// Messages in one request (`--pipeline` with `--framing`; else 1): a
    /// round sends them back to back and waits for all their replies.
    pub per_round: u64,
    /// Requests per second per connection (open loop), or closed loop.
    pub per_conn_rate: Option<f64>,
    pub deadline: Instant,
}

impl Job {
    /// Time between one connection's requests (open loop), if any.
    pub(super) fn interval(&self) -> Option<Duration> {
        self.per_conn_rate
            .map(|rate| Duration::from_secs_f64(1.0 / rate))
    }

    /// When this thread's connection `i` sends its first request: an
    /// open-loop schedule spreads the first requests of all connections
    /// over one interval.
    pub(super) fn first_due(&self, start: Instant, i: usize) -> Instant {
        let offset = self.interval().map_or(Duration::ZERO, |iv| {
            iv.mul_f64((self.first + i) as f64 / self.total_conns.max(1) as f64)
        });
        start + offset
    }
}

struct Conn {
    sock: Option<MioStream>,
    /// Request bytes written / reply bytes read, of the current message
    /// (stream mode: of the whole stream).
    sent: u64,
    got: u64,
    /// When the current message was due (latency is measured from here).
    due: Instant,
    in_flight: bool,
    /// The peer's end of file (or an error) was reported: that edge will
    /// not come again, so a short read no longer means "drained".
    peer_closed: bool,
    received_total: u64,
    messages: u64,
}

const READ_BUF: usize = 256 * 1024;

impl ThreadResult {
    pub fn new(conns: usize) -> Self {
        ThreadResult {
            hist: new_hist(),
            bytes: 0,
            messages: 0,
            errors: 0,
            per_conn: vec![0; conns],
            served: 0,
            first_error: None,
        }
    }

    /// Counts `data`, which must be the reply's bytes at `*got`; advances
    /// `*got` and the connection's `*total`.
    pub(super) fn received(
        &mut self,
        (got, total): (&mut u64, &mut u64),
        data: &[u8],
        reply: &Pattern,
        live: &Live,
    ) -> io::Result<()> {
        check(data, reply, *got)?;
        let n = data.len() as u64;
        *got += n;
        *total += n;
        self.bytes += n;
        live.bytes.fetch_add(n, Ordering::Relaxed);
        Ok(())
    }
}

pub fn run(job: Job, live: Arc<Live>) -> ThreadResult {
    let mut r = ThreadResult::new(job.conns);
    if let Err(e) = drive(&job, &live, &mut r) {
        r.errors += 1;
        r.first_error.get_or_insert(e.to_string());
    }
    r
}

/// Connects one client. crr opens and closes connections without end, and
/// the side that closes first keeps each one in TIME_WAIT for a minute, so
/// against an IPv4 loopback server it spreads its connections over source
/// addresses 127.0.0.2 to 127.0.0.251: else the ephemeral ports run out in
/// seconds and connect() slows down looking for a free one.
pub(super) fn connect(job: &Job, n: &mut u64) -> io::Result<MioStream> {
    let source = match (&job.endpoint, job.workload) {
        (Endpoint::Tcp(hp), Workload::Crr) => {
            match hp.resolve().ok().and_then(|a| a.first().copied()) {
                Some(std::net::SocketAddr::V4(a)) if a.ip().is_loopback() => {
                    *n += 1;
                    Some(std::net::IpAddr::from([127, 0, 0, 2 + (*n % 250) as u8]))
                }
                _ => None,
            }
        }
        _ => None,
    };
    net::connect_nonblocking(&job.endpoint, &job.sockopts, source).map_err(io::Error::other)
}

fn drive(job: &Job, live: &Live, r: &mut ThreadResult) -> io::Result<()> {
    let mut poll = Poll::new()?;
    let mut events = Events::with_capacity(1024);
    let (request, reply) = (&job.request, &job.reply);
    let start = Instant::now();
    let interval = job.interval();
    let mut conns = Vec::with_capacity(job.conns);
    let mut connects = job.first as u64;
    for i in 0..job.conns {
        let mut sock = connect(job, &mut connects)?;
        sock.register(poll.registry(), Token(i))?;
        conns.push(Conn {
            sock: Some(sock),
            sent: 0,
            got: 0,
            due: job.first_due(start, i),
            in_flight: false,
            peer_closed: false,
            received_total: 0,
            messages: 0,
        });
    }
    let mut buf = vec![0u8; READ_BUF];
    let mut ready: Vec<usize> = (0..conns.len()).collect();
    loop {
        let now = Instant::now();
        if now >= job.deadline || live.stop.load(Ordering::Relaxed) {
            break;
        }
        for i in std::mem::take(&mut ready) {
            let c = &mut conns[i];
            match step(job, c, request, reply, &mut buf, interval, r, live) {
                Ok(()) => {}
                Err(e) => {
                    r.errors += 1;
                    live.errors.fetch_add(1, Ordering::Relaxed);
                    r.first_error.get_or_insert(e.to_string());
                    c.sock = None; // a broken connection is dropped, not retried
                }
            }
            if job.workload == Workload::Crr && c.sock.is_none() && !c.in_flight && r.errors == 0 {
                // Reconnect for the next request; its latency includes the
                // connect (closed loop) or counts from its slot (open loop).
                if interval.is_none() {
                    c.due = Instant::now();
                }
                let mut s = connect(job, &mut connects)?;
                s.register(poll.registry(), Token(i))?;
                c.sock = Some(s);
                c.peer_closed = false;
                ready.push(i);
            }
        }
        // Sleep until an event, the next due request, or the deadline.
        let mut wake = job.deadline;
        if interval.is_some() {
            for (i, c) in conns.iter().enumerate() {
                if !c.in_flight && c.sock.is_some() {
                    if c.due <= now {
                        ready.push(i);
                    } else {
                        wake = wake.min(c.due);
                    }
                }
            }
        }
        let timeout = if ready.is_empty() {
            wake.saturating_duration_since(Instant::now())
        } else {
            Duration::ZERO
        };
        match poll.poll(&mut events, Some(timeout)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
        for ev in events.iter() {
            let i = ev.token().0;
            // Edge-triggered writability comes with every ACK; it matters
            // only to a connection with a request still to write.
            let c = &mut conns[i];
            if ev.is_read_closed() || ev.is_error() {
                c.peer_closed = true;
            }
            let wants_write =
                job.workload == Workload::Stream || (c.in_flight && c.sent < job.size as u64);
            if ev.is_readable() || ev.is_read_closed() || ev.is_error() || wants_write {
                ready.push(i);
            }
        }
        ready.sort_unstable();
        ready.dedup();
    }
    for (i, c) in conns.iter().enumerate() {
        r.per_conn[i] = c.received_total;
    }
    r.served = conns.iter().filter(|c| c.messages > 0).count();
    close_gracefully(&mut poll, &mut conns, &mut buf);
    Ok(())
}

/// Ends every connection as the contract says: half-close, then read (and
/// discard) what the server still sends until its end of file, so that the
/// server sees a clean close rather than a reset. Bounded to one second.
fn close_gracefully(poll: &mut Poll, conns: &mut [Conn], buf: &mut [u8]) {
    let mut open = 0;
    for c in conns.iter_mut() {
        if let Some(s) = &c.sock {
            if s.shutdown_write().is_ok() {
                open += 1;
            } else {
                c.sock = None;
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(1);
    let mut events = Events::with_capacity(1024);
    let mut check: Vec<usize> = (0..conns.len()).collect();
    while open > 0 && Instant::now() < deadline {
        for i in std::mem::take(&mut check) {
            let Some(s) = conns[i].sock.as_mut() else {
                continue;
            };
            loop {
                match s.read(buf) {
                    Ok(0) => {
                        conns[i].sock = None;
                        open -= 1;
                        break;
                    }
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(_) => {
                        conns[i].sock = None;
                        open -= 1;
                        break;
                    }
                }
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if poll.poll(&mut events, Some(left)).is_err() {
            return;
        }
        check.extend(events.iter().map(|e| e.token().0));
    }
}

#[allow(clippy::too_many_arguments)]
fn step(
    job: &Job,
    c: &mut Conn,
    request: &Pattern,
    reply: &Pattern,
    buf: &mut [u8],
    interval: Option<Duration>,
    r: &mut ThreadResult,
    live: &Live,
) -> io::Result<()> {
    if job.workload == Workload::Stream {
        return stream_step(c, request, reply, buf, r, live);
    }
    let Some(sock) = c.sock.as_mut() else {
        return Ok(());
    };
    let size = job.size as u64;
    let reply_size = job.reply_size as u64;
    loop {
        if !c.in_flight {
            // Start the next message, if it is due.
            let now = Instant::now();
            match interval {
                Some(_) if c.due > now => return Ok(()),
                Some(_) => {}
                None if job.workload == Workload::Crr => {} // due = connect time
                None => c.due = now,
            }
            c.in_flight = true;
            c.sent = 0;
            c.got = 0;
        }
        if c.sent < size {
            write_some(sock, request, &mut c.sent, size)?;
            if c.sent < size {
                return Ok(()); // wait for writability
            }
            if job.workload == Workload::Crr {
                // One request per connection: half-close; the server
                // answers and closes first, so TIME_WAIT lands on its side.
                sock.shutdown_write()?;
            }
            // The reply cannot be there yet: wait for the readable edge
            // instead of a read that would only say EAGAIN.
            return Ok(());
        }
        // Read until the whole reply is there, verifying it.
        while c.got < reply_size {
            let want = ((reply_size - c.got) as usize).min(buf.len());
            match sock.read(&mut buf[..want]) {
                Ok(0) => return Err(early_eof(c.got)),
                Ok(n) => {
                    r.received((&mut c.got, &mut c.received_total), &buf[..n], reply, live)?;
                    if n < want && !c.peer_closed {
                        return Ok(()); // drained: the rest comes with an event
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if job.workload == Workload::Crr {
            // The server closes after the reply: wait for its end of file.
            match sock.read(&mut buf[..1]) {
                Ok(0) => {}
                Ok(_) => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "reply longer than the request",
                    ));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        // A whole, verified reply.
        let lat = c.due.elapsed().as_nanos() as u64;
        let _ = r.hist.record(lat.max(1));
        r.messages += job.per_round;
        c.messages += 1;
        live.messages.fetch_add(job.per_round, Ordering::Relaxed);
        c.in_flight = false;
        if let Some(iv) = interval {
            c.due += iv;
        }
        if job.workload == Workload::Crr {
            c.sock = None; // closed here; the loop reconnects
            return Ok(());
        }
    }
}

/// Stream mode: write and read until both directions would block.
fn stream_step(
    c: &mut Conn,
    request: &Pattern,
    reply: &Pattern,
    buf: &mut [u8],
    r: &mut ThreadResult,
    live: &Live,
) -> io::Result<()> {
    let Some(sock) = c.sock.as_mut() else {
        return Ok(());
    };
    loop {
        let before = (c.sent, c.got);
        write_some(sock, request, &mut c.sent, u64::MAX)?;
        match sock.read(buf) {
            Ok(0) => return Err(early_eof(c.got)),
            Ok(n) => r.received((&mut c.got, &mut c.received_total), &buf[..n], reply, live)?,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
        if (c.sent, c.got) == before {
            return Ok(());
        }
    }
}

/// Writes the pattern from `*sent` up to `limit` until the socket is full.
fn write_some(
    sock: &mut MioStream,
    request: &Pattern,
    sent: &mut u64,
    limit: u64,
) -> io::Result<()> {
    while *sent < limit {
        let want = (limit - *sent).min(READ_BUF as u64) as usize;
        match sock.write(request.slice(*sent, want)) {
            Ok(n) => *sent += n as u64,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn check(got: &[u8], reply: &Pattern, offset: u64) -> io::Result<()> {
    if got != reply.slice(offset, got.len()) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("wrong reply bytes at offset {offset}"),
        ));
    }
    Ok(())
}

pub(super) fn early_eof(got: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        format!("server closed the connection after {got} reply bytes"),
    )
}
