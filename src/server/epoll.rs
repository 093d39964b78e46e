//! The `epoll` model: event loops on epoll (via mio), one per `--workers`
//! (default: one per core), all watching the same listening sockets.
//!
//! This is the `select` model made to scale: epoll reports only the sockets
//! that changed (edge-triggered), so a loop's cost follows the active
//! connections, not all of them. Each loop owns its connections outright (no
//! locks on the data path) and reads into one buffer it shares among them;
//! a connection keeps bytes of its own only after a partial write (see
//! [`ReadyConn`]), so an idle connection costs a few hundred bytes.
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
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use mio::net::{TcpListener, UnixListener};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use slab::Slab;
use socket2::SockRef;

use super::shutdown::Shutdown;
use super::udp::{UdpState, answer_ready};
use super::{AcceptBackoff, Config};
use crate::addr::HostPort;
use crate::net::{self, Listener, MioStream};
use crate::relay::{ConnLog, ReadyConn, Step};
use crate::transform::Transformer;

const SHUTDOWN: Token = Token(usize::MAX - 1);
const CONN_BASE: usize = 1 << 20;

pub fn run(config: Config, listeners: Vec<Listener>) -> anyhow::Result<()> {
    let shutdown = Shutdown::on_signals(config.drain_timeout)?;
    let config = Arc::new(config);
    let total = Arc::new(AtomicUsize::new(0));
    let loops = config.workers.max(1);
    tracing::info!("{loops} event loop(s)");
    let mut handles = Vec::new();
    // Every loop sets up (its epoll descriptor, its registrations) before
    // any starts accepting: else the first could take every descriptor.
    let ready = Arc::new(std::sync::Barrier::new(loops));
    let backoff = Arc::new(Mutex::new(AcceptBackoff::default()));
    for id in 0..loops {
        let mine = clone_for_loop(&listeners, id == 0).context("sharing the listeners")?;
        let (config, shutdown, total, ready, backoff) = (
            config.clone(),
            shutdown.clone(),
            total.clone(),
            ready.clone(),
            backoff.clone(),
        );
        let h = std::thread::Builder::new()
            .name(format!("upcase-epoll-{id}"))
            .spawn(move || {
                let l = EventLoop::new(mine, &config, &shutdown, &total, &backoff);
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

struct Conn {
    sock: MioStream,
    conn: ReadyConn,
}

struct EventLoop<'a> {
    poll: Poll,
    sources: Vec<Source>,
    conns: Slab<Conn>,
    /// Connections that used their turn and are still ready.
    again: Vec<usize>,
    scratch: Vec<u8>,
    udp: UdpState,
    config: &'a Config,
    shutdown: &'a Shutdown,
    total: &'a AtomicUsize,
    draining: bool,
    /// Stopped accepting at --max-conns.
    paused: bool,
    /// Shared by the loops, so that a burst is logged once per server.
    backoff: Arc<Mutex<AcceptBackoff>>,
    /// Accepting failed for want of resources: try again at this time.
    retry_at: Option<Instant>,
    /// When to look for idle connections next (with --idle-timeout).
    next_sweep: Option<Instant>,
}

impl<'a> EventLoop<'a> {
    fn new(
        mut sources: Vec<Source>,
        config: &'a Config,
        shutdown: &'a Shutdown,
        total: &'a AtomicUsize,
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
        let fd = shutdown.fd().as_raw_fd();
        poll.registry()
            .register(&mut SourceFd(&fd), SHUTDOWN, Interest::READABLE)?;
        Ok(EventLoop {
            poll,
            sources,
            conns: Slab::new(),
            again: Vec::new(),
            scratch: vec![0u8; config.block],
            udp: UdpState::default(),
            config,
            shutdown,
            total,
            draining: false,
            paused: false,
            backoff: backoff.clone(),
            retry_at: None,
            next_sweep: config
                .idle_timeout
                .map(|d| Instant::now() + super::sweep_every(d)),
        })
    }

    fn run(mut self) -> io::Result<()> {
        let mut events = Events::with_capacity(1024);
        loop {
            if self.shutdown.is_draining() && !self.draining {
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
                    .then_some(self.next_sweep)
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
            if let Some(idle) = self.config.idle_timeout
                && self.next_sweep.is_some_and(|t| Instant::now() >= t)
            {
                self.close_idle(idle);
                self.next_sweep = Some(Instant::now() + super::sweep_every(idle));
            }
            if self.retry_at.is_some_and(|t| Instant::now() >= t) {
                self.retry_at = None;
                self.paused = true; // makes resume_accepting try every listener
                self.resume_accepting();
            }
        }
        if self.udp.answered + self.udp.failed > 0 {
            self.udp.log_totals();
        }
        Ok(())
    }

    /// Closes the connections that moved no bytes for `idle`.
    fn close_idle(&mut self, idle: Duration) {
        let stale: Vec<usize> = self
            .conns
            .iter()
            .filter(|(_, c)| c.conn.last_progress.elapsed() >= idle)
            .map(|(k, _)| k)
            .collect();
        for key in stale {
            let c = self.conns.remove(key);
            c.conn.log.finish(&Err(crate::relay::idle_error(idle)));
            drop(c);
            self.total.fetch_sub(1, Ordering::Relaxed);
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
            while !answer_ready(u, &mut self.udp, self.config.mode, 64) {}
            return;
        }
        self.accept_all(i);
    }

    /// Accepts until the listener is empty or the limit is reached.
    fn accept_all(&mut self, i: usize) {
        loop {
            if self.total.load(Ordering::Relaxed) >= self.config.max_conns {
                if !self.paused {
                    self.paused = true;
                    tracing::warn!(
                        "at --max-conns {}: new connections wait in the backlog",
                        self.config.max_conns
                    );
                }
                return;
            }
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
            self.total.fetch_add(1, Ordering::Relaxed);
            entry.insert(Conn {
                sock,
                conn: ReadyConn::new(Transformer::new(self.config.mode), ConnLog::new(peer)),
            });
            // Data may have arrived with the handshake: drive it now.
            self.again.push(key);
        }
    }

    fn drive(&mut self, key: usize, short_read_drains: bool) {
        let Some(c) = self.conns.get_mut(key) else {
            return; // closed earlier in this round
        };
        let result = c
            .conn
            .drive(&mut c.sock, &mut self.scratch, short_read_drains, |s| {
                s.shutdown_write()
            });
        match result {
            Ok(Step::WaitRead | Step::WaitWrite) => {}
            Ok(Step::Again) => self.again.push(key),
            done => {
                let c = self.conns.remove(key);
                c.conn.log.finish(&done.map(|_| ()));
                drop(c); // deregisters and closes
                self.total.fetch_sub(1, Ordering::Relaxed);
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
