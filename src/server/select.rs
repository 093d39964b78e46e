//! The `select` model: one thread, non-blocking sockets, one readiness loop
//! (the seeds' select() server), using poll(2), which unlike select(2) is
//! not limited to descriptors below 1024.
//!
//! ```python
//! while True:
//!     r, w, x = select.select([srv] + clisocks.keys(), [], [])
//!     if srv in r: ...accept...
//!     for conn in [i for i in r if i != srv]:
//!         data = conn.recv(1024)
//!         if data: conn.send(data.upper())
//!         else: ...drop...
//! ```
//!
//! The seed's `conn.send()` may send only part of the reply, and a blocking
//! `sendall()` in its place would let one client that does not read stall
//! the whole loop. Here each connection is a [`ReadyConn`] (the readiness
//! driver over the connection core): what a write
//! could not take waits in that connection's pending buffer, the loop waits
//! for *writability* on it and stops reading it meanwhile, and everyone
//! else goes on. A busy connection yields after a turn, so none starves the
//! others. poll(2) is level-triggered, so a short read is taken to mean
//! "nothing more for now" without asking again. At `--max-conns` the listeners leave the poll set and new clients
//! wait in the backlog.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;

use super::readiness::{ReadyConn, Step, SweepClock, sweep};
use super::udp::answer_ready;
use super::{AcceptBackoff, Config};
use crate::conn::Conn;
use crate::lifecycle::{Lifecycle, Slot, poll_ms};
use crate::net::{Listener, Stream};

struct Client {
    /// Counts the connection in the lifecycle's gauge while it lives.
    _slot: Slot,
    sock: Stream,
    conn: ReadyConn,
    step: Step,
}

#[derive(Clone, Copy)]
enum Interest {
    Draining,
    Listener(usize),
    Client(usize),
}

pub fn run(config: Config, listeners: Vec<Listener>, life: &Arc<Lifecycle>) -> anyhow::Result<()> {
    for l in &listeners {
        l.set_nonblocking(true)?;
    }
    let mut listeners = listeners;
    let mut clients: Vec<Client> = Vec::new();
    let mut scratch = vec![0u8; config.block];
    let mut udp = config.udp_service();
    let mut backoff = AcceptBackoff::default();
    let mut paused_until: Option<Instant> = None;
    let mut sweeps = SweepClock::new(&config);

    loop {
        let draining = life.is_draining();
        if draining && !listeners.is_empty() {
            listeners.clear(); // stop accepting (the lifecycle shut them)
        }
        if draining && clients.is_empty() {
            break;
        }

        // Build the interest set, as the seed builds its rlist.
        if paused_until.is_some_and(|t| Instant::now() >= t) {
            paused_until = None;
        }
        let accepting = !life.conns.is_full() && paused_until.is_none();
        let mut pfds: Vec<libc::pollfd> = Vec::with_capacity(clients.len() + listeners.len() + 1);
        let mut slots: Vec<Interest> = Vec::with_capacity(pfds.capacity());
        let mut push = |fd: BorrowedFd<'_>, events: libc::c_short, slot: Interest| {
            pfds.push(libc::pollfd {
                fd: fd.as_raw_fd(),
                events,
                revents: 0,
            });
            slots.push(slot);
        };
        if !draining {
            push(life.draining_fd(), libc::POLLIN, Interest::Draining);
        }
        for (i, l) in listeners.iter().enumerate() {
            if accepting || !l.is_stream() {
                push(l.as_fd(), libc::POLLIN, Interest::Listener(i));
            }
        }
        let mut again = false;
        for (i, c) in clients.iter().enumerate() {
            match c.step {
                Step::WaitRead => push(c.sock.as_fd(), libc::POLLIN, Interest::Client(i)),
                Step::WaitWrite => push(c.sock.as_fd(), libc::POLLOUT, Interest::Client(i)),
                Step::WaitRoom => {} // the sweep brings it back
                Step::Again | Step::Done => again = true,
            }
        }
        // Wake for the end of an accept pause and for the idle sweep.
        let wake = [
            paused_until,
            (!clients.is_empty()).then(|| sweeps.wake_at()).flatten(),
        ]
        .into_iter()
        .flatten()
        .min();
        let timeout = match (again, wake) {
            (true, _) => 0,
            (false, Some(t)) => poll_ms(t.saturating_duration_since(Instant::now())),
            (false, None) => -1,
        };
        poll(&mut pfds, timeout).context("poll")?;

        // Connections first, while the indices of this round hold (reverse
        // order, so that swap_remove moves only connections already seen).
        let mut ready: Vec<bool> = vec![false; clients.len()];
        for (p, s) in pfds.iter().zip(&slots) {
            if let (Interest::Client(i), true) = (s, p.revents != 0) {
                ready[*i] = true;
            }
        }
        for i in (0..clients.len()).rev() {
            if !(ready[i] || clients[i].step == Step::Again) {
                continue;
            }
            let c = &mut clients[i];
            c.step = c
                .conn
                .drive(&mut c.sock, &mut scratch, true, |s| s.shutdown_write());
            if c.step == Step::Done {
                let c = clients.swap_remove(i);
                super::end_connection(c.sock.as_fd(), &c.conn.conn);
            }
        }
        for (p, s) in pfds.iter().zip(&slots) {
            let Interest::Listener(i) = *s else { continue };
            if p.revents == 0 {
                continue;
            }
            match &listeners[i] {
                Listener::Udp(u) => {
                    answer_ready(u, &mut udp, 64);
                }
                l => accept_some(
                    l,
                    &mut clients,
                    &config,
                    life,
                    &mut backoff,
                    &mut paused_until,
                ),
            }
        }
        // Last, once this round's input is taken: the idle sweep.
        if sweeps.due(Instant::now()) {
            close_idle(&mut clients);
        }
    }
    tracing::info!("all connections finished");
    udp.log_totals();
    Ok(())
}

/// The deadline sweep (shared with epoll and uring): ends what the cores
/// say is over; one whose input is waiting is driven next round instead.
fn close_idle(clients: &mut Vec<Client>) {
    let conns = clients.iter_mut().enumerate();
    let conns = conns.map(|(i, c)| (i, c.sock.as_fd(), &mut c.conn.conn));
    let swept = sweep(Instant::now(), conns);
    for i in swept.again {
        clients[i].step = Step::Again;
    }
    // Highest index first, so that swap_remove moves only kept ones.
    for i in swept.ended.into_iter().rev() {
        let c = clients.swap_remove(i);
        super::end_connection(c.sock.as_fd(), &c.conn.conn);
    }
}

/// Accepts the clients waiting on `l` (a few at a time, to stay fair).
fn accept_some(
    l: &Listener,
    clients: &mut Vec<Client>,
    config: &Config,
    life: &Lifecycle,
    backoff: &mut AcceptBackoff,
    paused_until: &mut Option<Instant>,
) {
    for _ in 0..64 {
        if !life.conns.try_acquire() {
            return;
        }
        let slot = Slot(life.conns.clone());
        match l.accept() {
            Ok((sock, peer)) => {
                backoff.succeeded();
                if let Err(e) = sock.set_nonblocking(true) {
                    tracing::warn!("{peer}: {e}");
                    continue;
                }
                sock.tune(&config.sockopts);
                let origin = config.origin(peer, sock.as_fd());
                let conn = Conn::new(origin, config.protocol, config.limits(0), Instant::now());
                clients.push(Client {
                    _slot: slot,
                    sock,
                    conn: ReadyConn::new(conn),
                    // Data may already be waiting: drive it next round.
                    step: Step::Again,
                });
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(e) => {
                if let Some(pause) = backoff.failed(&e) {
                    // The listener stays readable: leave it out of the poll
                    // set for a while, or the loop would spin.
                    *paused_until = Some(Instant::now() + pause);
                }
                return;
            }
        }
    }
}

fn poll(pfds: &mut [libc::pollfd], timeout_ms: i32) -> io::Result<usize> {
    loop {
        // SAFETY: pfds is a valid array of initialised pollfd of that length.
        let r = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, timeout_ms) };
        if r >= 0 {
            return Ok(r as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}
