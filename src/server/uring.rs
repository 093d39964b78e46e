//! The `uring` model: io_uring loops (Linux 6.0 or later), one per
//! `--workers` (default: one per two cores), all accepting from the same
//! listeners as the epoll loops do.
//!
//! The readiness models pay two system calls per message (read, write) plus
//! their share of epoll_wait. Here each connection has one *multishot*
//! receive that lasts as long as the connection: the kernel picks a block
//! from a ring of provided buffers when data arrives and reports it, and
//! the reply is sent from that same block. One `io_uring_enter` submits
//! every send that is ready and collects every completion, so many messages
//! share one system call; an idle connection holds no buffer at all.
//!
//! Backpressure: the connection core ([`crate::conn`]) lets a connection
//! read a few blocks ahead of its sends (its read-ahead is
//! [`MAX_QUEUED`]` - 1` blocks), and the queued blocks go out in one send.
//! Past that its receive is cancelled, and re-armed only when its sends
//! have caught up: a client that does not read stops being read.
//!
//! Fair shares: the blocks are shared by a loop's connections, so its
//! memory for data is bounded by the ring ([`RING_BYTES`]) whatever the
//! number of clients, but clients that never read must not keep them all.
//! A send from blocks never waits inside the kernel (MSG_DONTWAIT): when
//! the socket is full it waits for writability with a poll, which points
//! into no block; and when the ring runs short, the connections waiting so
//! copy their bytes into buffers of their own (a few blocks at most each)
//! and give the blocks back (`reclaim`). Measured: 64 clients that write
//! 32 MiB each and never read used to leave every other client of the loop
//! unanswered; now others are answered at once, at no cost to streams or
//! request/response (docs/BENCHMARKS.md).
//!
//! UDP listeners are served on threads of their own.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use io_uring::{cqueue, opcode, squeue, types};
use slab::Slab;

use super::readiness::{SweepClock, sweep};
use super::{AcceptBackoff, Config, blocking};
use crate::conn::Conn as Core;
use crate::lifecycle::{Lifecycle, Slot};
use crate::net::{Listener, Stream};
use crate::ring::{self, Block, Completion, Ring};

/// A loop's provided-buffer ring: about this many bytes, in blocks of
/// `--block` but at most [`MAX_BLOCK`] (larger blocks starve connections
/// of blocks sooner; see docs/BENCHMARKS.md).
const RING_BYTES: usize = 16 << 20;
const MAX_BLOCK: usize = 64 * 1024;
/// How long a busy loop polls for completions before it sleeps (see
/// [`ring::submit_and_wait`]).
const SPIN: Duration = Duration::from_micros(20);
/// Received blocks a connection may hold before it stops receiving.
const MAX_QUEUED: usize = 8;
const GROUP: u16 = 0;

const LISTENER: u64 = 1;
const SHUTDOWN: u64 = 2;
const RECV: u64 = 3;
const SEND: u64 = 4;
const CANCEL: u64 = 6;
const WRITABLE: u64 = 7;

/// Bytes waiting to be sent: a block of the ring, or (UTF-8 output of
/// another length, the transform's final bytes) a buffer of our own.
enum Out {
    Block { block: Block, len: usize },
    Owned(Vec<u8>),
}

impl Out {
    /// The bytes from `from` on.
    fn bytes<'a>(&'a self, ring: &'a Ring, from: usize) -> &'a [u8] {
        match self {
            Out::Block { block, len } => ring.range(block, from, *len),
            Out::Owned(v) => &v[from..],
        }
    }

    fn len(&self) -> usize {
        match self {
            Out::Block { len, .. } => *len,
            Out::Owned(v) => v.len(),
        }
    }

    fn is_block(&self) -> bool {
        matches!(self, Out::Block { .. })
    }
}

struct Conn {
    /// Counts the connection in the lifecycle's gauge while it lives.
    _slot: Slot,
    sock: Stream,
    core: Core,
    queue: VecDeque<Out>,
    /// Bytes of the queue's front already sent (a send is in flight while
    /// `sending`).
    sent: usize,
    /// The message header of a send that covers several queued blocks;
    /// boxed, and made only for a connection that ever has two queued, so
    /// that a connection in plain request/response pays nothing for it.
    vectored: Option<Box<Vectored>>,
    sending: bool,
    /// The multishot receive is armed; `cancelling` while it is being
    /// stopped for backpressure or closing.
    receiving: bool,
    cancelling: bool,
    /// Being closed (the core knows why): free it once nothing is in flight.
    closing: bool,
    /// Its blocks were reclaimed while its client was not reading: what it
    /// receives is copied out of the ring at once, until it catches up.
    stuck: bool,
    /// Waiting for its socket to take bytes again (a send found it full).
    polling_out: bool,
    /// Listed in the loop's `spillable`.
    listed: bool,
}

/// A `sendmsg` header and its iovecs, kept in place while the send is in
/// flight.
struct Vectored {
    hdr: libc::msghdr,
    iov: [libc::iovec; MAX_QUEUED],
}

impl Vectored {
    fn new() -> Box<Self> {
        // SAFETY: msghdr and iovec are plain C structs; all zeroes is a
        // valid (empty) value of each.
        let mut v: Box<Vectored> = Box::new(unsafe { std::mem::zeroed() });
        v.hdr.msg_iov = v.iov.as_mut_ptr();
        v
    }
}

impl Conn {
    fn in_flight(&self) -> bool {
        self.sending || self.receiving || self.polling_out
    }
}

/// What the loops share: the lifecycle (its gauge counts connections for
/// `--max-conns`) and the accept back-off (so that a burst of EMFILE is
/// logged once).
struct Shared {
    life: Arc<Lifecycle>,
    backoff: Mutex<AcceptBackoff>,
}

pub fn run(config: Config, listeners: Vec<Listener>, life: &Arc<Lifecycle>) -> anyhow::Result<()> {
    let listeners = blocking::start(listeners, &config, life)?;
    let shared = Shared {
        life: life.clone(),
        backoff: Mutex::new(AcceptBackoff::default()),
    };
    let loops = config.workers.max(1);
    tracing::info!("{loops} io_uring loop(s)");
    let results: Vec<anyhow::Result<()>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..loops)
            .map(|id| {
                let (config, listeners, shared) = (&config, &listeners, &shared);
                std::thread::Builder::new()
                    .name(format!("upcase-uring-{id}"))
                    .spawn_scoped(s, move || run_loop(config, listeners, shared))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| match h {
                Ok(h) => h
                    .join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("an io_uring loop panicked"))),
                Err(e) => Err(anyhow::anyhow!("starting the io_uring loops: {e}")),
            })
            .collect()
    });
    // The listeners (and Unix socket files) go away only now.
    drop(listeners);
    results.into_iter().collect::<anyhow::Result<Vec<()>>>()?;
    tracing::info!("all connections finished");
    Ok(())
}

fn run_loop(config: &Config, listeners: &[Listener], shared: &Shared) -> anyhow::Result<()> {
    let block = config.block.min(MAX_BLOCK);
    let count = (RING_BYTES / block).next_power_of_two().clamp(256, 4096) as u16;
    let ring = Ring::with_buffers(4096, count, block, GROUP).map_err(|e| {
        anyhow::anyhow!(
            "io_uring with a buffer ring: {e} (the uring model needs Linux 6.0 or later, with io_uring enabled)"
        )
    })?;
    let mut lp = Loop {
        ring,
        backlog: VecDeque::new(),
        conns: Slab::new(),
        listeners,
        polled: vec![false; listeners.len()],
        starved: Vec::new(),
        spillable: Vec::new(),
        config,
        limits: Arc::new(crate::conn::Limits {
            block,
            ..config.limits((MAX_QUEUED - 1) * block)
        }),
        shared,
        paused_until: None,
        draining: false,
        now: Instant::now(),
    };
    lp.push(
        opcode::PollAdd::new(
            types::Fd(shared.life.draining_fd().as_raw_fd()),
            libc::POLLIN as u32,
        )
        .build()
        .user_data(ring::user_data(SHUTDOWN, 0)),
    );
    lp.arm_listeners();
    lp.run()?;
    Ok(())
}

struct Loop<'a> {
    /// The ring and its blocks; dropped first (fields drop in order), so
    /// that every operation is stopped before the connections' owned
    /// buffers it may point to are freed.
    ring: Ring,
    /// Entries that did not fit in the submission queue yet.
    backlog: VecDeque<squeue::Entry>,
    conns: Slab<Conn>,
    listeners: &'a [Listener],
    /// Which listeners have a poll in flight.
    polled: Vec<bool>,
    /// Connections whose receive stopped for want of buffers.
    starved: Vec<usize>,
    /// Connections that waited for writability holding blocks, each listed
    /// once: what `reclaim` may spill, so that it never scans every
    /// connection (with 6,000 clients that never read, that scan, once per
    /// block received, took 89 % of the loop).
    spillable: Vec<usize>,
    config: &'a Config,
    /// Every connection's bounds, shared.
    limits: Arc<crate::conn::Limits>,
    shared: &'a Shared,
    paused_until: Option<Instant>,
    draining: bool,
    /// When the current round's completions were collected.
    now: Instant,
}

impl Loop<'_> {
    fn push(&mut self, e: squeue::Entry) {
        // SAFETY: every buffer an entry points to (a ring block being sent,
        // or a connection's owned buffer at the front of its queue) stays
        // in place and untouched until the entry's completion arrives.
        if !self.backlog.is_empty() || unsafe { self.ring.push(&e) }.is_err() {
            self.backlog.push_back(e);
        }
    }

    fn flush_backlog(&mut self) {
        while let Some(e) = self.backlog.front() {
            // SAFETY: as in `push`.
            if unsafe { self.ring.push(e) }.is_err() {
                return;
            }
            self.backlog.pop_front();
        }
    }

    fn run(&mut self) -> io::Result<()> {
        let mut sweeps = SweepClock::new(self.config);
        let second = Duration::from_secs(1);
        // Kept across rounds, so that a round allocates nothing.
        let mut done: Vec<Completion> = Vec::with_capacity(1024);
        loop {
            if self.draining && self.conns.is_empty() {
                return Ok(());
            }
            self.flush_backlog();
            let next_sweep = sweeps.wake_at().unwrap_or(Instant::now() + second);
            let wake = self.paused_until.map_or(next_sweep, |p| p.min(next_sweep));
            // Poll briefly before sleeping, but only while there is work.
            let spin = if done.is_empty() {
                Duration::ZERO
            } else {
                SPIN
            };
            self.ring.submit_and_wait(wake, spin, &mut done)?;
            // One clock read per round, not per message: progress times
            // need no finer grain than the idle timeout's.
            self.now = Instant::now();
            for c in done.drain(..) {
                self.complete(c);
            }
            let now = self.now;
            if self.paused_until.is_some_and(|t| now >= t) {
                self.paused_until = None;
                self.arm_listeners();
            }
            if sweeps.due(now) {
                self.sweep();
            }
        }
    }

    fn complete(&mut self, c: Completion) {
        let (kind, key) = ring::split(c.data);
        match kind {
            SHUTDOWN => {
                self.draining = true; // stop accepting
            }
            LISTENER => {
                if let Some(p) = self.polled.get_mut(key) {
                    *p = false;
                }
                self.accept(key);
                self.arm_listeners();
            }
            RECV => self.received(key, c.res, c.flags, c.block),
            SEND => self.sent(key, c.res),
            WRITABLE => self.writable(key),
            _ => {} // CANCEL
        }
    }

    /// Polls every listener that is not polled yet, unless accepting is
    /// paused (at --max-conns, or out of descriptors).
    fn arm_listeners(&mut self) {
        if self.draining || self.paused_until.is_some() || self.shared.life.is_draining() {
            return;
        }
        if self.shared.life.conns.is_full() {
            self.shared.life.conns.warn_full();
            return;
        }
        for i in 0..self.listeners.len() {
            if !self.polled[i] {
                self.polled[i] = true;
                let fd = types::Fd(self.listeners[i].as_fd().as_raw_fd());
                self.push(
                    opcode::PollAdd::new(fd, libc::POLLIN as u32)
                        .build()
                        .user_data(ring::user_data(LISTENER, i)),
                );
            }
        }
    }

    fn accept(&mut self, i: usize) {
        while !self.draining && !self.shared.life.is_draining() {
            let Some(l) = self.listeners.get(i) else {
                return;
            };
            if !self.shared.life.conns.try_acquire() {
                return;
            }
            let slot = Slot(self.shared.life.conns.clone());
            match l.accept() {
                Ok((sock, peer)) => {
                    self.backoff().succeeded();
                    sock.tune(&self.config.sockopts);
                    let origin = self.config.origin(peer, sock.as_fd());
                    let key = self.conns.insert(Conn {
                        _slot: slot,
                        sock,
                        core: Core::new(
                            origin,
                            self.config.protocol,
                            self.limits.clone(),
                            self.now,
                        ),
                        queue: VecDeque::new(),
                        sent: 0,
                        vectored: None,
                        sending: false,
                        receiving: false,
                        cancelling: false,
                        closing: false,
                        stuck: false,
                        polling_out: false,
                        listed: false,
                    });
                    if self.conns[key].core.is_finished() {
                        self.close(key); // a TLS session that could not be set up
                    } else {
                        self.arm_recv(key);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    let pause = self.backoff().failed(&e);
                    if let Some(pause) = pause {
                        self.paused_until = Some(Instant::now() + pause);
                    }
                    return;
                }
            }
        }
    }

    fn backoff(&self) -> std::sync::MutexGuard<'_, AcceptBackoff> {
        self.shared
            .backoff
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    fn fd(&self, key: usize) -> types::Fd {
        types::Fd(raw(&self.conns[key].sock))
    }

    /// Arms the connection's receive: a multishot one that lasts, or,
    /// while the core allows less than a block (over `--max-buffered`), a
    /// single receive of just that much.
    fn arm_recv(&mut self, key: usize) {
        let fd = self.fd(key);
        let budget = self.conns[key].core.read_budget();
        self.conns[key].receiving = true;
        let e = if budget >= self.ring.block_size() {
            opcode::RecvMulti::new(fd, GROUP).build()
        } else {
            opcode::Recv::new(fd, std::ptr::null_mut(), budget as u32)
                .buf_group(GROUP)
                .build()
                .flags(squeue::Flags::BUFFER_SELECT)
        };
        self.push(e.user_data(ring::user_data(RECV, key)));
    }

    fn cancel_recv(&mut self, key: usize) {
        let c = &mut self.conns[key];
        if c.receiving && !c.cancelling {
            c.cancelling = true;
            self.push(
                opcode::AsyncCancel::new(ring::user_data(RECV, key))
                    .build()
                    .user_data(ring::user_data(CANCEL, key)),
            );
        }
    }

    fn received(&mut self, key: usize, res: i32, flags: u32, block: Option<Block>) {
        let Some(c) = self.conns.get_mut(key) else {
            if let Some(b) = block {
                self.ring.give_back(b);
            }
            return;
        };
        if !cqueue::more(flags) {
            c.receiving = false;
            c.cancelling = false;
        }
        if c.closing {
            if let Some(b) = block {
                self.ring.give_back(b);
            }
            return self.maybe_free(key);
        }
        match (res, block) {
            (n, Some(b)) if n > 0 => {
                let data = self.ring.block(&b, n as usize);
                let at = data.as_ptr();
                let (in_place, owned) = match c.core.on_input(data, self.now) {
                    Ok(out) if out.as_ptr() == at => (Some(out.len()), None),
                    Ok(out) => (None, Some(out.to_vec())),
                    Err(_) => {
                        self.ring.give_back(b);
                        return self.close(key);
                    }
                };
                let out = match (in_place, owned) {
                    (Some(len), _) if !c.stuck => Out::Block { block: b, len },
                    (Some(len), _) => {
                        let copy = self.ring.range(&b, 0, len).to_vec();
                        self.ring.give_back(b);
                        Out::Owned(copy)
                    }
                    (None, owned) => {
                        self.ring.give_back(b);
                        Out::Owned(owned.unwrap_or_default())
                    }
                };
                let c = &mut self.conns[key];
                c.queue.push_back(out);
                if c.core.read_budget() < self.ring.block_size() {
                    // Backpressure (none), or the server's budget (less
                    // than a block): stop this receive; `resume` re-arms.
                    self.cancel_recv(key);
                }
                self.send_next(key);
                if self.ring.blocks_free() < self.ring.blocks() / 4 {
                    self.reclaim();
                }
            }
            (0, _) => {
                // End of file: what the transform still owes, then half-close.
                match c.core.on_input_end(self.now) {
                    Ok(tail) if !tail.is_empty() => c.queue.push_back(Out::Owned(tail.to_vec())),
                    Ok(_) => {}
                    Err(_) => return self.close(key),
                }
                self.send_next(key);
            }
            (_, Some(b)) => self.ring.give_back(b), // a block with no bytes
            (e, _) if e == -libc::ENOBUFS => {
                // Every block is in use: try again when some come back
                // (and take back those that clients are not reading).
                self.starved.push(key);
                self.reclaim();
            }
            (e, _) if e == -libc::ECANCELED => self.resume(key),
            (e, _) if e < 0 => {
                c.core.on_error(&io::Error::from_raw_os_error(-e));
                self.close(key);
            }
            _ => {}
        }
    }

    /// Sends the front of the queue, if nothing is being sent.
    fn send_next(&mut self, key: usize) {
        let fd = self.fd(key);
        let c = &mut self.conns[key];
        if c.sending || c.closing {
            return;
        }
        let Some(front) = c.queue.front() else {
            if c.core.wants_shutdown() {
                // The half-close as a plain system call: io_uring always
                // hands IORING_OP_SHUTDOWN to a worker thread, a wake-up
                // and a thread switch per connection; shutdown(2) on a
                // socket never blocks.
                match c.sock.shutdown_write() {
                    Ok(()) => c.core.on_shutdown(),
                    Err(e) => c.core.on_error(&e),
                }
                self.close(key);
            } else if c.core.is_finished() {
                // Over with nothing to send: a PROXY header cut short by
                // the client's close, a TLS client gone mid-handshake.
                self.close(key);
            }
            return;
        };
        let bufs = &self.ring;
        c.sending = true;
        // A send from ring blocks must not wait for the client: if its
        // socket is full, the send fails at once (EAGAIN) and the bytes move
        // out of the ring (see `spill`), so a client that does not read
        // never holds the blocks every connection of the loop shares.
        let flags = if c.queue.iter().any(Out::is_block) {
            libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT
        } else {
            libc::MSG_NOSIGNAL
        };
        let e = if c.queue.len() == 1 {
            let rest = front.bytes(bufs, c.sent);
            opcode::Send::new(fd, rest.as_ptr(), rest.len() as u32)
                .flags(flags)
                .build()
        } else {
            // Everything queued in one send: with a paced congestion
            // control (BBR, the default on many systems) the size of each
            // send decides the throughput, and one block is too little.
            let v = c.vectored.get_or_insert_with(Vectored::new);
            let mut n = 0;
            for (i, out) in c.queue.iter().enumerate().take(MAX_QUEUED) {
                let part = out.bytes(bufs, if i == 0 { c.sent } else { 0 });
                v.iov[i] = libc::iovec {
                    iov_base: part.as_ptr() as *mut libc::c_void,
                    iov_len: part.len(),
                };
                n += 1;
            }
            v.hdr.msg_iov = v.iov.as_mut_ptr();
            v.hdr.msg_iovlen = n;
            opcode::SendMsg::new(fd, &v.hdr).flags(flags as u32).build()
        };
        self.push(e.user_data(ring::user_data(SEND, key)));
    }

    fn sent(&mut self, key: usize, res: i32) {
        let Some(c) = self.conns.get_mut(key) else {
            return;
        };
        c.sending = false;
        if c.closing {
            return self.maybe_free(key);
        }
        if res == -libc::EAGAIN {
            // The socket is full: wait until it takes bytes again, with no
            // operation pointing into the blocks meanwhile, so that they
            // can be reclaimed if the loop runs short (see `reclaim`).
            c.polling_out = true;
            if !c.listed && c.queue.iter().any(Out::is_block) {
                c.listed = true;
                self.spillable.push(key);
                if self.spillable.len() > 2 * self.conns.len() + 64 {
                    // Entries of connections closed since the last reclaim
                    // (a slab key may even be taken again): drop them, so
                    // that the list stays bounded if the ring never runs
                    // short. A key listed twice is harmless: `reclaim`
                    // acts only while `listed` is set, and clears it.
                    let conns = &self.conns;
                    self.spillable
                        .retain(|&k| conns.get(k).is_some_and(|c| c.listed));
                }
            }
            let fd = self.fd(key);
            self.push(
                opcode::PollAdd::new(fd, libc::POLLOUT as u32)
                    .build()
                    .user_data(ring::user_data(WRITABLE, key)),
            );
            return;
        }
        if res < 0 {
            c.core.on_error(&io::Error::from_raw_os_error(-res));
            return self.close(key);
        }
        c.sent += res as usize;
        c.core.on_written(res as usize, self.now);
        // The send may have covered several queued blocks.
        let mut freed = false;
        while let Some(front) = c.queue.front() {
            let len = front.len();
            if c.sent < len {
                break;
            }
            c.sent -= len;
            if let Some(Out::Block { block, .. }) = c.queue.pop_front() {
                self.ring.give_back(block);
            }
            freed = true;
        }
        if c.queue.is_empty() {
            c.stuck = false; // caught up: back to sending from the ring
        }
        if freed {
            self.feed_starved();
        }
        self.send_next(key);
        self.resume(key);
    }

    /// The socket takes bytes again: send what waits.
    fn writable(&mut self, key: usize) {
        let Some(c) = self.conns.get_mut(key) else {
            return;
        };
        c.polling_out = false;
        if c.closing {
            return self.maybe_free(key);
        }
        self.send_next(key);
    }

    /// The ring runs short of blocks: the connections whose clients are not
    /// taking their replies (waiting for writability, no send in flight)
    /// give theirs back, keeping copies of their own (at most a few blocks
    /// each); what they receive next is copied at once until they catch
    /// up. So clients that never read cannot take every block of the loop
    /// and starve the others; they hold only their own bounded memory.
    fn reclaim(&mut self) {
        for key in std::mem::take(&mut self.spillable) {
            let Some(c) = self.conns.get_mut(key).filter(|c| c.listed) else {
                continue;
            };
            c.listed = false;
            if c.polling_out && !c.sending && c.queue.iter().any(Out::is_block) {
                self.spill(key);
            }
        }
    }

    /// Moves a connection's unsent bytes out of the ring into one buffer of
    /// its own (at most its read-ahead, a few blocks) and gives the blocks
    /// back to the loop.
    fn spill(&mut self, key: usize) {
        let c = &mut self.conns[key];
        let mut owned = Vec::with_capacity(c.core.unsent());
        for (i, out) in c.queue.drain(..).enumerate() {
            owned.extend_from_slice(out.bytes(&self.ring, if i == 0 { c.sent } else { 0 }));
            if let Out::Block { block, .. } = out {
                self.ring.give_back(block);
            }
        }
        c.sent = 0;
        c.stuck = true;
        c.queue.push_back(Out::Owned(owned));
        self.feed_starved();
    }

    /// Re-arms a connection's receive once its queue has room again.
    fn resume(&mut self, key: usize) {
        let Some(c) = self.conns.get(key) else { return };
        if !c.receiving && !c.closing && c.core.read_budget() > 0 {
            self.arm_recv(key);
        }
    }

    /// Blocks came back: connections that ran out of them may receive.
    fn feed_starved(&mut self) {
        for key in std::mem::take(&mut self.starved) {
            self.resume(key);
        }
    }

    /// Starts closing: stops everything in flight, frees when all is done.
    fn close(&mut self, key: usize) {
        let Some(c) = self.conns.get_mut(key) else {
            return;
        };
        c.closing = true;
        let polling = c.polling_out;
        self.cancel_recv(key);
        if polling {
            self.push(
                opcode::AsyncCancel::new(ring::user_data(WRITABLE, key))
                    .build()
                    .user_data(ring::user_data(CANCEL, key)),
            );
        }
        self.maybe_free(key);
    }

    fn maybe_free(&mut self, key: usize) {
        let Some(c) = self.conns.get(key) else { return };
        if !c.closing || c.in_flight() {
            return;
        }
        let mut c = self.conns.remove(key);
        for out in c.queue.drain(..) {
            if let Out::Block { block, .. } = out {
                self.ring.give_back(block);
            }
        }
        super::end_connection(c.sock.as_fd(), &c.core);
        drop(c); // closes the socket and frees the gauge's slot
        self.feed_starved();
        self.arm_listeners();
    }

    /// The deadline sweep (shared with select and epoll): closes what the
    /// cores say is over. One whose input already waits in its socket is
    /// not idle, however long the loop was away (stopped, or starved of
    /// CPU): its completion is on the way.
    fn sweep(&mut self) {
        let conns = self.conns.iter_mut().filter(|(_, c)| !c.closing);
        let conns = conns.map(|(k, c)| (k, c.sock.as_fd(), &mut c.core));
        let swept = sweep(self.now, conns);
        for key in swept.again {
            // Room in the budget (or bytes waiting): receive again.
            self.resume(key);
        }
        for key in swept.ended {
            if self.conns[key].sending {
                let e = opcode::AsyncCancel::new(ring::user_data(SEND, key))
                    .build()
                    .user_data(ring::user_data(CANCEL, key));
                self.push(e);
            }
            self.close(key);
        }
    }
}

fn raw(s: &Stream) -> RawFd {
    match s {
        Stream::Tcp(t) => t.as_raw_fd(),
        Stream::Unix(u) => u.as_raw_fd(),
    }
}

/// Whether this kernel can run the model (for tests and `--compare`).
pub fn available() -> bool {
    ring::available()
}
