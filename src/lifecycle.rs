//! One lifecycle for every server model:
//!
//! ```text
//! Running ──signal──► Draining(deadline) ──all done / deadline──► Stopped
//! ```
//!
//! - The signal handlers are installed before anything is bound, so a
//!   script that sends SIGTERM as soon as it reads a `listening` line gets
//!   a drain, never the signal's default action.
//! - At the start of a drain every stream listener is shut here, in one
//!   place, whatever the model (`shutdown(SHUT_RD)` on a listening socket
//!   stops it listening for every descriptor that shares it), and Unix
//!   socket files are removed: a new connect is refused, never accepted by
//!   the kernel and reset later. Models only notice and stop accepting.
//! - The drain deadline is enforced here: what is cut is logged, the socket
//!   files are gone already, and the process exits 0 as documented. A
//!   second signal does the same at once.
//!
//! Signals arrive through a self-pipe (signal-hook writes a byte from the
//! handler, the only safe thing a handler can do). Every model except
//! `fork` has them read by a thread of this module; `fork`, which must not
//! start threads, polls [`Lifecycle::signal_fd`] in its own loop and calls
//! [`Lifecycle::on_signals`]. Models learn of the drain from
//! [`Lifecycle::draining_fd`] (readable for good once it starts, for poll,
//! epoll and io_uring alike) or [`Lifecycle::is_draining`].
//!
//! [`Gauge`] counts the connections being served over all loops, threads
//! and processes of a model: `--max-conns` is taken from it and the drain
//! waits on it.

use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::net::{Listener, UnixPathGuard};

/// The signals that stop the server: SIGINT (Ctrl-C), SIGTERM, and SIGHUP
/// (the terminal went away, or a process manager's "stop"): each drains, as
/// the first of them does; none kills by its default action. SIGHUP does
/// not reload (nginx's meaning): upcase has no configuration file to read
/// again, and a restart is SIGUSR2's.
pub const STOP_SIGNALS: [libc::c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

/// What the host of the signal pipe must do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Keep waiting (until [`Lifecycle::deadline`], if any).
    Wait,
    /// Stop now: a second signal or the drain deadline. The lifecycle has
    /// logged what is cut and removed the socket files; the host ends its
    /// connections (the thread host exits the process with 0).
    Stop,
}

/// The server's lifecycle, shared by every loop of a model.
pub struct Lifecycle {
    draining: AtomicBool,
    /// Readable (end of file) once the drain starts.
    rx: OwnedFd,
    tx: Mutex<Option<OwnedFd>>,
    signals: Mutex<SignalPipe>,
    state: Mutex<State>,
    drain_timeout: Duration,
    /// Connections being served.
    pub conns: Arc<Gauge>,
}

#[derive(Default)]
struct State {
    seen: usize,
    deadline: Option<Instant>,
    /// Second descriptors of the stream listeners, to shut at the drain.
    listeners: Vec<OwnedFd>,
    /// A worker of `--processes`, which tells SIGUSR2 where to go.
    worker: bool,
    /// The listeners are shared with processes that outlive this one (the
    /// other workers, the next server of a restart, systemd): a drain stops
    /// accepting here without shutting them.
    shared: bool,
    unix_files: Vec<UnixPathGuard>,
    /// Threads that end by themselves at the drain (the UDP threads of the
    /// blocking models), joined before the server says it is done.
    helpers: Vec<std::thread::JoinHandle<()>>,
}

impl Lifecycle {
    /// A thread that stops by itself once the drain starts: joined by
    /// [`Lifecycle::join_helpers`], so that its last log line is written.
    pub fn keep_helper(&self, helper: std::thread::JoinHandle<()>) {
        self.state().helpers.push(helper);
    }

    pub fn join_helpers(&self) {
        let helpers = std::mem::take(&mut self.state().helpers);
        for h in helpers {
            let _ = h.join();
        }
    }

    /// Installs the signal handlers. Call before binding anything.
    pub fn install(drain_timeout: Duration, max_conns: usize) -> io::Result<Arc<Lifecycle>> {
        let signals = SignalPipe::for_signals(&STOP_SIGNALS)?;
        // SIGUSR2 restarts a supervisor (`--processes`); here it must not
        // kill the process, which is its default action.
        signals.route(libc::SIGUSR2, RESTART_BYTE)?;
        let (rx, tx) = UnixStream::pair()?;
        Ok(Arc::new(Lifecycle {
            draining: AtomicBool::new(false),
            rx: rx.into(),
            tx: Mutex::new(Some(tx.into())),
            signals: Mutex::new(signals),
            state: Mutex::new(State::default()),
            drain_timeout,
            conns: Gauge::new(max_conns),
        }))
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes charge of the listeners' end: their Unix socket files (removed
    /// at the drain, or when this is dropped) and a second descriptor of
    /// each stream listener (shut at the drain).
    pub fn adopt(&self, listeners: &mut [Listener]) -> io::Result<()> {
        let mut st = self.state();
        for l in listeners {
            if let Listener::Unix(_, guard) = l {
                st.unix_files.push(guard.take());
            }
            if l.is_stream() {
                st.listeners.push(l.as_fd().try_clone_to_owned()?);
            }
        }
        Ok(())
    }

    /// Makes this the lifecycle of one worker of `--processes`.
    pub fn set_worker(&self) {
        let mut st = self.state();
        (st.worker, st.shared) = (true, true);
    }

    /// The listeners belong to someone who outlives us (systemd): a drain
    /// leaves them listening, so that connections wait for the next start.
    pub fn set_listeners_shared(&self) {
        self.state().shared = true;
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Readable for good once the drain has started.
    pub fn draining_fd(&self) -> BorrowedFd<'_> {
        self.rx.as_fd()
    }

    /// Readable when a signal arrived (for the `fork` model's own loop).
    pub fn signal_fd(&self) -> OwnedFd {
        let pipe = self.signals.lock().unwrap_or_else(|e| e.into_inner());
        pipe.as_fd()
            .try_clone_to_owned()
            .expect("duplicating the signal pipe")
    }

    /// When the drain must end, once it has started.
    pub fn deadline(&self) -> Option<Instant> {
        self.state().deadline
    }

    /// Reads the signals that arrived and acts on them: the first starts
    /// the drain, a second stops at once; also stops when the deadline
    /// has passed.
    pub fn on_signals(&self) -> Next {
        let got = self
            .signals
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take_bytes();
        let n = got.iter().filter(|b| **b != RESTART_BYTE).count();
        if n < got.len() {
            if self.state().worker {
                tracing::warn!(
                    "SIGUSR2 to a worker: ignored; send it to the supervisor (--pid-file) to restart"
                );
            } else {
                tracing::warn!(
                    "SIGUSR2: ignored; a restart needs `serve --processes N` (a supervisor)"
                );
            }
        }
        let seen = {
            let mut st = self.state();
            st.seen += n;
            st.seen
        };
        if seen >= 1 && !self.is_draining() {
            self.start_drain();
        }
        if seen >= 2 {
            let open = self.conns.active();
            tracing::warn!("second signal: stopping now, cutting {open} connection(s)");
            self.cleanup();
            return Next::Stop;
        }
        if self.deadline().is_some_and(|d| Instant::now() >= d) {
            let open = self.conns.active();
            // Nothing left to cut: the model is ending by itself.
            self.state().deadline = None;
            if open > 0 {
                tracing::warn!(
                    "drain timeout ({}): cutting {open} unfinished connection(s)",
                    humantime::format_duration(self.drain_timeout)
                );
                self.cleanup();
                return Next::Stop;
            }
        }
        Next::Wait
    }

    /// Starts the drain (also what the first signal does).
    pub fn start_drain(&self) {
        if self.draining.swap(true, Ordering::SeqCst) {
            return;
        }
        crate::metrics::set_draining();
        let mut st = self.state();
        st.deadline = Instant::now().checked_add(self.drain_timeout);
        let shared = if st.shared { 0 } else { st.listeners.len() };
        for fd in &st.listeners[..shared] {
            // SAFETY: shutdown(2) on a descriptor we own. On a listening
            // socket it stops listening (new connects are refused) for
            // every descriptor of that socket, in every loop.
            unsafe { libc::shutdown(fd.as_raw_fd(), libc::SHUT_RD) };
        }
        st.unix_files.clear(); // removes the socket files
        drop(st);
        // Closing the write end makes the read end readable (EOF) forever.
        self.tx.lock().unwrap_or_else(|e| e.into_inner()).take();
        tracing::info!(
            "signal received: no new connections; {} connection(s) may finish within {} (signal again to stop now)",
            self.conns.active(),
            humantime::format_duration(self.drain_timeout)
        );
    }

    /// Removes what must not outlive the server (the socket files).
    pub fn cleanup(&self) {
        self.state().unix_files.clear();
    }

    /// Runs the signal pipe on a thread of its own: the first signal starts
    /// the drain; a second one, or the deadline with connections still
    /// open, logs what is cut, cleans up and exits the process with 0.
    pub fn spawn_signal_thread(self: &Arc<Self>) -> io::Result<()> {
        let me = self.clone();
        let fd = self.signal_fd();
        std::thread::Builder::new()
            .name("upcase-signals".into())
            .spawn(move || {
                loop {
                    let wait = me
                        .deadline()
                        .map(|d| d.saturating_duration_since(Instant::now()));
                    if wait_readable(&[fd.as_fd()], wait).is_err() {
                        return;
                    }
                    if me.on_signals() == Next::Stop {
                        std::process::exit(0);
                    }
                }
            })?;
        Ok(())
    }

    /// Resolves once the drain has started (for tasks on a tokio runtime).
    pub async fn until_draining(&self) {
        // The drain descriptor is one end of a socket pair: tokio watches a
        // copy of it, which turns readable (end of file) for good at the drain.
        let watch = self
            .draining_fd()
            .try_clone_to_owned()
            .map(std::os::unix::net::UnixStream::from)
            .and_then(|s| {
                s.set_nonblocking(true)?;
                tokio::net::UnixStream::from_std(s)
            });
        let watch = match watch {
            Ok(w) => w,
            Err(e) => {
                tracing::error!("watching for the drain: {e}");
                return std::future::pending().await;
            }
        };
        while !self.is_draining() {
            if watch.readable().await.is_err() {
                return std::future::pending().await;
            }
            if !self.is_draining() {
                // A spurious wake-up: clear it by trying a read.
                let _ = watch.try_read(&mut [0u8; 1]);
            }
        }
    }

    /// Waits (blocking) until the drain has started.
    pub fn wait_draining(&self) {
        while !self.is_draining() {
            let _ = wait_readable(&[self.draining_fd()], None);
        }
    }

    /// The end of a drain: waits for the open connections (the deadline is
    /// enforced by the signal host), then says so.
    pub fn finish_drain(&self) {
        self.conns.wait_idle(None);
        tracing::info!("all connections finished");
    }
}

/// A signal self-pipe: each signal routed into it writes one byte, which
/// says which signal it was (so that one pipe can carry a stop, a restart
/// and a child's end, and none is mistaken for another).
pub struct SignalPipe {
    rx: UnixStream,
    tx: UnixStream,
}

/// The byte a stop signal (SIGINT, SIGTERM) writes.
pub const STOP_BYTE: u8 = b's';
/// The byte SIGUSR2 (restart) writes.
pub const RESTART_BYTE: u8 = b'r';
/// The byte SIGCHLD writes.
pub const CHILD_BYTE: u8 = b'c';

impl SignalPipe {
    pub fn new() -> io::Result<Self> {
        let (rx, tx) = UnixStream::pair()?;
        rx.set_nonblocking(true)?;
        tx.set_nonblocking(true)?;
        Ok(SignalPipe { rx, tx })
    }

    /// Routes `signals` into a new pipe, each as [`STOP_BYTE`].
    pub fn for_signals(signals: &[libc::c_int]) -> io::Result<Self> {
        let pipe = SignalPipe::new()?;
        for &sig in signals {
            pipe.route(sig, STOP_BYTE)?;
        }
        Ok(pipe)
    }

    /// From now on `signal` writes `byte` into the pipe (and no longer
    /// has its default action).
    pub fn route(&self, signal: libc::c_int, byte: u8) -> io::Result<()> {
        let fd = self.tx.try_clone()?;
        let action = move || {
            // SAFETY: send(2) is async-signal-safe; it writes one byte from
            // a valid buffer to a descriptor this closure owns for ever
            // (signal-hook keeps the closure). A full pipe drops the byte:
            // one already waiting wakes the reader just as well.
            unsafe {
                libc::send(
                    fd.as_raw_fd(),
                    (&raw const byte).cast(),
                    1,
                    libc::MSG_DONTWAIT,
                )
            };
        };
        // SAFETY: the action does nothing but an async-signal-safe send(2)
        // (no allocation, no lock), as a signal handler must.
        unsafe { signal_hook::low_level::register(signal, action) }?;
        Ok(())
    }

    /// Signals received since the last call (never blocks).
    pub fn take(&mut self) -> usize {
        self.take_bytes().len()
    }

    /// The bytes of the signals received since the last call, in order.
    pub fn take_bytes(&mut self) -> Vec<u8> {
        let mut buf = [0u8; 64];
        let mut got = Vec::new();
        loop {
            match self.rx.read(&mut buf) {
                Ok(0) => return got,
                Ok(k) => got.extend_from_slice(&buf[..k]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return got,
            }
        }
    }
}

impl AsFd for SignalPipe {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.rx.as_fd()
    }
}

/// Waits until one of `fds` is readable (or hung up); returns which ones.
/// `None` waits forever.
pub fn wait_readable(fds: &[BorrowedFd<'_>], timeout: Option<Duration>) -> io::Result<Vec<bool>> {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|fd| libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let ms = timeout.map_or(-1, poll_ms);
    loop {
        // SAFETY: pfds is a valid, initialised array of pollfd of that length.
        let r = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, ms) };
        if r >= 0 {
            return Ok(pfds.iter().map(|p| p.revents != 0).collect());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// A poll(2) timeout in milliseconds, rounded up so a wait never ends
/// before its time (which would spin), and capped.
pub fn poll_ms(d: Duration) -> i32 {
    let ms = d.as_micros().div_ceil(1000);
    ms.min(i32::MAX as u128) as i32
}

/// How often a full [`Gauge`] is logged at most.
pub const FULL_LOG_EVERY: Duration = Duration::from_secs(10);

/// Connections being served, with a ceiling (`--max-conns`).
pub struct Gauge {
    max: usize,
    full_logged: Mutex<Option<Instant>>,
    active: Mutex<usize>,
    changed: Condvar,
}

impl Gauge {
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Gauge {
            max,
            full_logged: Mutex::new(None),
            active: Mutex::new(0),
            changed: Condvar::new(),
        })
    }

    pub fn max(&self) -> usize {
        self.max
    }

    pub fn active(&self) -> usize {
        *self.active.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn is_full(&self) -> bool {
        self.active() >= self.max
    }

    /// Takes a slot if one is free; else logs (at most every
    /// [`FULL_LOG_EVERY`]) that new clients wait in the backlog.
    pub fn try_acquire(&self) -> bool {
        let mut n = self.active.lock().unwrap_or_else(|e| e.into_inner());
        if *n < self.max {
            *n += 1;
            true
        } else {
            drop(n);
            crate::metrics::global().max_conns_reached();
            self.warn_full();
            false
        }
    }

    /// Waits until a slot is free, or gives up when the drain starts.
    /// Returns whether one is free. Takes nothing: a loop that waits here
    /// before accepting, and is the only one taking slots, takes its slot
    /// with [`Gauge::take`] once it holds a connection. (Taking it before
    /// accepting would count a connection that does not exist yet, and the
    /// drain would report one more than it waits for.)
    pub fn wait_for_room(&self, life: &Lifecycle) -> bool {
        let mut n = self.active.lock().unwrap_or_else(|e| e.into_inner());
        if *n >= self.max {
            drop(n);
            crate::metrics::global().max_conns_reached();
            self.warn_full();
            n = self.active.lock().unwrap_or_else(|e| e.into_inner());
        }
        loop {
            if life.is_draining() {
                return false;
            }
            if *n < self.max {
                return true;
            }
            n = self
                .changed
                .wait_timeout(n, Duration::from_millis(100))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Takes a slot whatever the count, for the one taker that waited
    /// with [`Gauge::wait_for_room`]: nobody else can have filled it.
    pub fn take(self: &Arc<Self>) -> Slot {
        *self.active.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        Slot(self.clone())
    }

    /// Logs that the gauge is full, at most once per [`FULL_LOG_EVERY`]:
    /// under steady overload that is news once, not at every connection.
    pub fn warn_full(&self) {
        let mut last = self.full_logged.lock().unwrap_or_else(|e| e.into_inner());
        if last.is_none_or(|t| t.elapsed() >= FULL_LOG_EVERY) {
            *last = Some(Instant::now());
            tracing::warn!(
                "at --max-conns {}: new connections wait in the backlog",
                self.max
            );
        }
    }

    pub fn release(&self) {
        let mut n = self.active.lock().unwrap_or_else(|e| e.into_inner());
        *n = n.saturating_sub(1);
        self.changed.notify_all();
    }

    /// Waits until no connection is active (or `timeout` passes); returns
    /// how many are still active.
    pub fn wait_idle(&self, timeout: Option<Duration>) -> usize {
        let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
        let mut n = self.active.lock().unwrap_or_else(|e| e.into_inner());
        while *n > 0 {
            let left = match deadline {
                Some(d) => d.saturating_duration_since(Instant::now()),
                None => Duration::from_secs(3600),
            };
            if left.is_zero() {
                break;
            }
            n = self
                .changed
                .wait_timeout(n, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        *n
    }
}

/// Releases a gauge slot when dropped, even if the connection panics.
pub struct Slot(pub Arc<Gauge>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.release();
    }
}
