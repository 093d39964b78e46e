//! Shutdown and limits for the models that do not run on tokio.
//!
//! Signals arrive through a self-pipe (signal-hook writes one byte per
//! SIGINT/SIGTERM from the handler, the only safe thing a handler can do).
//! A model then learns of shutdown in one of two ways:
//!
//! - A [`Shutdown`] broadcast: a pipe whose write end is closed on the first
//!   signal, so its read end becomes readable, for good, in every `poll(2)`
//!   or epoll set that holds it. Blocking models wait in `poll` on their
//!   listener and this descriptor instead of in `accept`, so they stop
//!   accepting at once; readiness loops put it in their interest set.
//! - The `fork` model, which must not start threads, polls the signal pipe
//!   itself ([`SignalPipe`]).
//!
//! [`Gauge`] counts connections being served: `--max-conns` blocks on it,
//! and draining waits on it.

use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// The signals that stop the server.
pub const STOP_SIGNALS: [libc::c_int; 2] = [libc::SIGINT, libc::SIGTERM];

/// The read end of the signal self-pipe: one byte per signal received.
pub struct SignalPipe {
    rx: UnixStream,
}

impl SignalPipe {
    /// Routes SIGINT and SIGTERM into a new pipe.
    pub fn install() -> io::Result<Self> {
        Self::for_signals(&STOP_SIGNALS)
    }

    /// Routes `signals` into a new pipe.
    pub fn for_signals(signals: &[libc::c_int]) -> io::Result<Self> {
        let (rx, tx) = UnixStream::pair()?;
        rx.set_nonblocking(true)?;
        for &sig in signals {
            signal_hook::low_level::pipe::register(sig, tx.try_clone()?)?;
        }
        Ok(SignalPipe { rx })
    }

    /// Signals received since the last call (never blocks).
    pub fn take(&mut self) -> usize {
        let mut buf = [0u8; 16];
        let mut n = 0;
        loop {
            match self.rx.read(&mut buf) {
                Ok(0) => return n,
                Ok(k) => n += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return n,
            }
        }
    }
}

impl AsFd for SignalPipe {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.rx.as_fd()
    }
}

pub const RUNNING: u8 = 0;
pub const DRAINING: u8 = 1;

/// A one-shot broadcast of "stop accepting", readable by `poll` and epoll.
pub struct Shutdown {
    phase: AtomicU8,
    rx: OwnedFd,
    tx: Mutex<Option<OwnedFd>>,
}

impl Shutdown {
    pub fn new() -> io::Result<Arc<Self>> {
        let (rx, tx) = UnixStream::pair()?;
        Ok(Arc::new(Shutdown {
            phase: AtomicU8::new(RUNNING),
            rx: rx.into(),
            tx: Mutex::new(Some(tx.into())),
        }))
    }

    /// A broadcast driven by SIGINT/SIGTERM ([`Shutdown::watch_signals`]).
    pub fn on_signals(drain_timeout: Duration) -> anyhow::Result<Arc<Self>> {
        use anyhow::Context;
        let shutdown = Self::new().context("creating the shutdown pipe")?;
        shutdown
            .watch_signals(drain_timeout)
            .context("installing signal handlers")?;
        Ok(shutdown)
    }

    /// Starts the drain: every poller of [`Shutdown::fd`] wakes up.
    pub fn trigger(&self) {
        self.phase.store(DRAINING, Ordering::SeqCst);
        // Closing the write end makes the read end readable (EOF) forever.
        if let Ok(mut tx) = self.tx.lock() {
            tx.take();
        }
    }

    pub fn is_draining(&self) -> bool {
        self.phase.load(Ordering::SeqCst) != RUNNING
    }

    /// Readable once the drain has started.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.rx.as_fd()
    }

    /// Spawns the thread that turns signals into this broadcast: the first
    /// signal starts the drain, a second one, or the end of `drain_timeout`,
    /// exits the process at once (with 0: stopping was asked for).
    pub fn watch_signals(self: &Arc<Self>, drain_timeout: Duration) -> io::Result<()> {
        let mut pipe = SignalPipe::install()?;
        let me = self.clone();
        std::thread::Builder::new()
            .name("upcase-signals".into())
            .spawn(move || {
                let mut seen = 0;
                let mut deadline: Option<Instant> = None;
                loop {
                    let wait = deadline.map(|d| d.saturating_duration_since(Instant::now()));
                    if wait_readable(&[pipe.as_fd()], wait).is_err() {
                        return;
                    }
                    seen += pipe.take();
                    if seen >= 1 && !me.is_draining() {
                        tracing::info!("signal received: no new connections; draining");
                        me.trigger();
                        deadline = Some(Instant::now() + drain_timeout);
                    }
                    if seen >= 2 {
                        tracing::warn!("second signal: exiting now");
                        std::process::exit(0);
                    }
                    if deadline.is_some_and(|d| Instant::now() >= d) {
                        tracing::warn!("drain timeout: exiting with connections still open");
                        std::process::exit(0);
                    }
                }
            })?;
        Ok(())
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
    let ms = timeout.map_or(-1, |t| t.as_millis().min(i32::MAX as u128) as i32);
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

/// How often a full [`Gauge`] is logged at most.
pub const FULL_LOG_EVERY: Duration = Duration::from_secs(10);

/// Connections being served, with an optional ceiling.
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

    /// Takes a slot if one is free.
    pub fn try_acquire(&self) -> bool {
        let mut n = self.active.lock().unwrap_or_else(|e| e.into_inner());
        if *n < self.max {
            *n += 1;
            true
        } else {
            false
        }
    }

    /// Waits for a free slot (logging once that the limit is reached), or
    /// gives up when `shutdown` starts. Returns whether a slot was taken.
    pub fn acquire(&self, shutdown: &Shutdown) -> bool {
        if self.try_acquire() {
            return true;
        }
        self.warn_full(&format!(
            "at --max-conns {}: new connections wait in the backlog",
            self.max
        ));
        let mut n = self.active.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if shutdown.is_draining() {
                return false;
            }
            if *n < self.max {
                *n += 1;
                return true;
            }
            n = self
                .changed
                .wait_timeout(n, Duration::from_millis(100))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Logs that the gauge is full, at most once per [`FULL_LOG_EVERY`]:
    /// under steady overload that is news once, not at every connection.
    pub fn warn_full(&self, msg: &str) {
        let mut last = self.full_logged.lock().unwrap_or_else(|e| e.into_inner());
        if last.is_none_or(|t| t.elapsed() >= FULL_LOG_EVERY) {
            *last = Some(Instant::now());
            tracing::warn!("{msg}");
        }
    }

    pub fn release(&self) {
        let mut n = self.active.lock().unwrap_or_else(|e| e.into_inner());
        *n = n.saturating_sub(1);
        self.changed.notify_all();
    }

    /// Waits until no connection is active or `timeout` passes; returns how
    /// many are still active.
    pub fn wait_idle(&self, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        let mut n = self.active.lock().unwrap_or_else(|e| e.into_inner());
        while *n > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
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

/// The end of a drain for the blocking models: wait, then report.
pub fn drain(gauge: &Gauge, timeout: Duration) {
    let open = gauge.active();
    if open > 0 {
        tracing::info!(
            "shutting down: {open} connection(s) may finish within {timeout:?} (signal again to stop now)"
        );
        let left = gauge.wait_idle(timeout);
        if left > 0 {
            tracing::warn!("drain timeout: closing {left} unfinished connection(s)");
        } else {
            tracing::info!("all connections finished");
        }
    } else {
        tracing::info!("shutting down");
    }
}
