//! The `epoll` model: event loops on epoll (via mio), one per `--workers`
//! (default: one per core), all watching the same listening sockets.
//!
//! This is the `select` model made to scale: epoll reports only the sockets
//! that changed (edge-triggered), so a loop's cost follows the active
//! connections, not all of them. Each loop owns its connections outright (no
//! locks on the data path) and reads into one buffer it shares among them;
//! a connection keeps bytes of its own only after a partial write (see
//! [`ReadyConn`], the readiness driver over the connection core), so an
//! idle connection costs a few hundred bytes.
//!
//! Every loop registers every listener: a new client wakes the loops, one
//! wins the accept and the others find nothing (on two cores, at most one
//! wasted wake-up). The alternative, SO_REUSEPORT with a socket per loop,
//! lets the kernel pin a client to a loop by hash, which can leave one loop
//! idle while another is saturated; we chose sharing and measured it in
//! docs/BENCHMARKS.md. UDP sockets are served by the first loop.
//!
//! `--max-conns` is counted across loops; at the limit a loop stops
//! accepting and retries whenever one of its connections closes.

use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use mio::net::{TcpListener, UnixListener};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use slab::Slab;
use socket2::SockRef;

use super::readiness::{ReadyConn, Step, SweepClock, sweep};
use super::udp::{UdpService, answer_all};
use super::{AcceptBackoff, Config};
use crate::addr::HostPort;
use crate::conn::Conn;
use crate::lifecycle::{Lifecycle, Slot};
use crate::net::{self, Listener, MioStream};

const SHUTDOWN: Token = Token(usize::MAX - 1);
const CONN_BASE: usize = 1 << 20;

pub fn run(config: Config, listeners: Vec<Listener>, life: &Arc<Lifecycle>) -> anyhow::Result<()> {
    let config = Arc::new(config);
    let loops = config.workers.max(1);
    tracing::info!("{loops} event loop(s)");
    let mut handles = Vec::new();
    // Every loop sets up (its epoll descriptor, its registrations) before
    // any starts accepting: else the first could take every descriptor.
    let ready = Arc::new(std::sync::Barrier::new(loops));
    let backoff = Arc::new(Mutex::new(AcceptBackoff::default()));
    for id in 0..loops {
        let mine = clone_for_loop(&listeners, id == 0).context("sharing the listeners")?;
        let (config, life, ready, backoff) =
            (config.clone(), life.clone(), ready.clone(), backoff.clone());
        let h = std::thread::Builder::new()
            .name(format!("upcase-epoll-{id}"))
            .spawn(move || {
                let l = EventLoop::new(mine, &config, &life, &backoff);
                ready.wait();
                if let Err(e) = l.and_then(|l| l.run()) {
                    tracing::error!("event loop {id} failed: {e}");
                }
            })
            .context("starting the event loops")?;
        handles.push(h);
    }
    for h in handles {
        let _ = h.join();
    }
    // The listeners (and Unix socket files) go away only now.
    drop(listeners);
    tracing::info!("all connections finished");
    Ok(())
}

enum Source {
    Tcp(TcpListener),
    Unix(UnixListener),
    /// Kept as a std socket (registered by descriptor) so that the UDP
    /// code is shared with the other models.
    Udp(std::net::UdpSocket),
}

/// Each loop gets its own descriptors for the shared sockets (dup), in
/// non-blocking mode; UDP only for the first loop.
fn clone_for_loop(listeners: &[Listener], with_udp: bool) -> io::Result<Vec<Source>> {
    let mut out = Vec::new();
    for l in listeners {
        match l {
            Listener::Tcp(t) => {
                let t = t.try_clone()?;
                t.set_nonblocking(true)?;
                out.push(Source::Tcp(TcpListener::from_std(t)));
            }
            Listener::Unix(u, _) => {
                let u = u.try_clone()?;
                u.set_nonblocking(true)?;
                out.push(Source::Unix(UnixListener::from_std(u)));
            }
            Listener::Udp(u) if with_udp => {
                let u = u.try_clone()?;
                u.set_nonblocking(true)?;
                out.push(Source::Udp(u));
            }
            Listener::Udp(_) => {}
        }
    }
    Ok(out)
}

struct Client {
    /// Counts the connection in the lifecycle's gauge while it lives.
    _slot: Slot,
    sock: MioStream,
    conn: ReadyConn,
}

struct EventLoop<'a> {
    poll: Poll,
    sources: Vec<Source>,
    conns: Slab<Client>,
    /// Connections that used their turn and are still ready.
    again: Vec<usize>,
    scratch: Vec<u8>,
    udp: UdpService,
    config: &'a Config,
    /// Every connection's bounds, shared.
    limits: Arc<crate::conn::Limits>,
    life: &'a Lifecycle,
    draining: bool,
    /// Stopped accepting at --max-conns.
    paused: bool,
    /// Shared by the loops, so that a burst is logged once per server.
    backoff: Arc<Mutex<AcceptBackoff>>,
    /// Accepting failed for want of resources: try again at this time.
    retry_at: Option<Instant>,
    /// When to look at the connections' deadlines next.
    sweeps: SweepClock,
}

impl<'a> EventLoop<'a> {
    fn new(
        mut sources: Vec<Source>,
        config: &'a Config,
        life: &'a Lifecycle,
        backoff: &Arc<Mutex<AcceptBackoff>>,
    ) -> io::Result<Self> {
        let poll = Poll::new()?;
        for (i, s) in sources.iter_mut().enumerate() {
            let (r, t) = (poll.registry(), Token(i));
            match s {
                Source::Tcp(l) => r.register(l, t, Interest::READABLE)?,
                Source::Unix(l) => r.register(l, t, Interest::READABLE)?,
                Source::Udp(u) => {
                    r.register(&mut SourceFd(&u.as_raw_fd()), t, Interest::READABLE)?
                }
            }
        }
        let fd = life.draining_fd().as_raw_fd();
        poll.registry()
            .register(&mut SourceFd(&fd), SHUTDOWN, Interest::READABLE)?;
        Ok(EventLoop {
            poll,
            sources,
            conns: Slab::new(),
            again: Vec::new(),
            scratch: vec![0u8; config.block],
            udp: config.udp_service(),
            config,
            limits: Arc::new(config.limits(0)),
            life,
            draining: false,
            paused: false,
            backoff: backoff.clone(),
            retry_at: None,
            sweeps: SweepClock::new(config),
        })
    }

    fn run(mut self) -> io::Result<()> {
        let mut events = Events::with_capacity(1024);
        loop {
            if self.life.is_draining() && !self.draining {
                self.draining = true;
                self.sources.clear();
            }
            if self.draining && self.conns.is_empty() {
                break;
            }
            let timeout = if !self.again.is_empty() {
                Some(Duration::ZERO)
            } else {
                let sweep = (!self.conns.is_empty())
                    .then(|| self.sweeps.wake_at())
                    .flatten();
                [self.retry_at, sweep]
                    .into_iter()
                    .flatten()
                    .min()
                    .map(|t| t.saturating_duration_since(Instant::now()))
            };
            match self.poll.poll(&mut events, timeout) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            let again = std::mem::take(&mut self.again);
            for ev in events.iter() {
                match ev.token() {
                    SHUTDOWN => {} // handled at the top of the loop
                    Token(i) if i >= CONN_BASE => {
                        let key = i - CONN_BASE;
                        // Edge-triggered writability is reported at every
                        // ACK that frees buffer space: without output
                        // waiting, there is nothing to do.
                        if !ev.is_readable()
                            && !ev.is_read_closed()
                            && !ev.is_error()
                            && self.conns.get(key).is_some_and(|c| !c.conn.has_pending())
                        {
                            continue;
                        }
                        // An event that reports the peer's end of file will
                        // not come again: then read until EAGAIN or EOF.
                        let trust = !(ev.is_read_closed() || ev.is_error());
                        self.drive(key, trust)
                    }
                    Token(i) => self.source_ready(i),
                }
            }
            for key in again {
                self.drive(key, false);
            }
            if self.sweeps.due(Instant::now()) {
                self.close_idle();
            }
            if self.retry_at.is_some_and(|t| Instant::now() >= t) {
                self.retry_at = None;
                self.paused = true; // makes resume_accepting try every listener
                self.resume_accepting();
            }
        }
        self.udp.log_totals();
        Ok(())
    }

    /// The deadline sweep (shared with select and uring): ends what the
    /// cores say is over; one whose input is waiting is driven instead (its
    /// event may still be on the way after a long pause).
    fn close_idle(&mut self) {
        let conns = self.conns.iter_mut();
        let conns = conns.map(|(k, c)| (k, c.sock.as_fd(), &mut c.conn.conn));
        let swept = sweep(Instant::now(), conns);
        self.again.extend(swept.again);
        for key in swept.ended {
            let c = self.conns.remove(key);
            super::end_connection(c.sock.as_fd(), &c.conn.conn);
        }
        self.resume_accepting();
    }

    fn source_ready(&mut self, i: usize) {
        if self.draining || i >= self.sources.len() {
            return;
        }
        if self.retry_at.is_some() && !matches!(self.sources[i], Source::Udp(_)) {
            return; // accepting resumes when the pause ends
        }
        if let Source::Udp(u) = &self.sources[i] {
            // Edge-triggered: read until empty, or the next datagram would
            // never be reported.
            answer_all(u, &mut self.udp);
            return;
        }
        self.accept_all(i);
    }

    /// Accepts until the listener is empty or the limit is reached.
    fn accept_all(&mut self, i: usize) {
        loop {
            if !self.life.conns.try_acquire() {
                self.paused = true;
                return;
            }
            let slot = Slot(self.life.conns.clone());
            let accepted = match &self.sources[i] {
                Source::Tcp(l) => l.accept().map(|(s, peer)| {
                    let _ = net::tune_tcp(SockRef::from(&s), &self.config.sockopts);
                    (MioStream::Tcp(s), format!("tcp://{}", HostPort::from(peer)))
                }),
                Source::Unix(l) => l.accept().map(|(s, _)| {
                    let name = net::unix_peer_name(s.as_raw_fd());
                    (MioStream::Unix(s), name)
                }),
                Source::Udp(_) => return,
            };
            let (mut sock, peer) = match accepted {
                Ok(x) => {
                    self.backoff
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .succeeded();
                    x
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // EMFILE and friends: try again later (edge-triggered,
                    // the listener will not report these clients again).
                    if let Some(pause) = self
                        .backoff
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .failed(&e)
                    {
                        self.retry_at = Some(Instant::now() + pause);
                    }
                    return;
                }
            };
            let entry = self.conns.vacant_entry();
            let key = entry.key();
            if let Err(e) = sock.register(self.poll.registry(), Token(CONN_BASE + key)) {
                tracing::warn!("{peer}: cannot register: {e}");
                continue;
            }
            let origin = self.config.origin(peer, sock.as_fd());
            let conn = Conn::new(
                origin,
                self.config.protocol,
                self.limits.clone(),
                Instant::now(),
            );
            entry.insert(Client {
                _slot: slot,
                sock,
                conn: ReadyConn::new(conn),
            });
            // Data may have arrived with the handshake: drive it now.
            self.again.push(key);
        }
    }

    fn drive(&mut self, key: usize, short_read_drains: bool) {
        let Some(c) = self.conns.get_mut(key) else {
            return; // closed earlier in this round
        };
        let step = c
            .conn
            .drive(&mut c.sock, &mut self.scratch, short_read_drains, |s| {
                s.shutdown_write()
            });
        match step {
            Step::WaitRead | Step::WaitWrite | Step::WaitRoom => {}
            Step::Again => self.again.push(key),
            Step::Done => {
                let c = self.conns.remove(key);
                super::end_connection(c.sock.as_fd(), &c.conn.conn);
                drop(c); // deregisters, closes and frees the slot
                self.resume_accepting();
            }
        }
    }

    /// A slot was freed: clients left waiting at the limit can come in now
    /// (edge-triggered listeners will not report them again).
    fn resume_accepting(&mut self) {
        if self.draining || !self.paused {
            return;
        }
        self.paused = false;
        for i in 0..self.sources.len() {
            if !matches!(self.sources[i], Source::Udp(_)) {
                self.accept_all(i);
            }
        }
    }
}
