//! `serve --processes N`: a supervisor and N worker processes.
//!
//! One process is bounded by its open-file limit, and one crash takes all
//! its clients with it. So the supervisor binds the listeners once and runs
//! N copies of this binary as workers, each serving the chosen model on
//! the *same* listening sockets, inherited ([`super::handoff`]):
//!
//! - **One shared listener, not SO_REUSEPORT groups.** A connection waits
//!   in one accept queue that every worker takes from, so a worker that
//!   dies loses only the connections it had accepted: those queued are
//!   taken by the others. With SO_REUSEPORT each worker would have its own
//!   queue, chosen by a hash of the client's address, and the connections
//!   waiting in a dead worker's queue would be reset. The cost, measured in
//!   docs/BENCHMARKS.md: the kernel wakes the workers unevenly, so their
//!   shares of the connections differ (each worker logs its count at exit).
//! - **A worker that dies is started again** (at once, or after a growing
//!   pause if it keeps dying young); the others never notice.
//! - **SIGTERM/SIGINT/SIGHUP** stops: the listeners are shut (new connects are
//!   refused), every worker drains as a single server does, and the
//!   supervisor exits 0 when the last one has.
//! - **SIGUSR2** restarts without refusing anyone: the supervisor starts
//!   the binary again (the file at the same path, so an upgrade takes
//!   effect) with the same arguments and the listeners inherited; once
//!   that one's workers are up it says so, and only then are the old
//!   workers drained. The listening sockets are never closed, so the
//!   kernel keeps queueing connections throughout. A SIGUSR2 during a
//!   restart is refused with a log line.

use std::ffi::OsString;
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;

use super::Config;
use super::handoff;
use super::pidfile::PidFile;
use crate::lifecycle::{CHILD_BYTE, RESTART_BYTE, STOP_SIGNALS, SignalPipe, wait_readable};
use crate::net::Listener;

/// A worker that dies younger than this is restarted after a pause that
/// doubles each time, up to [`MAX_PAUSE`].
const YOUNG: Duration = Duration::from_secs(1);
const MAX_PAUSE: Duration = Duration::from_secs(5);
/// Past the drain timeout, how long workers get before they are killed.
const GRACE: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Running,
    /// SIGTERM/SIGINT: the workers drain, then the supervisor exits.
    Stopping,
    /// A restarted supervisor has taken over: the old workers drain.
    Retiring,
}

struct Worker {
    n: usize,
    pid: Option<libc::pid_t>,
    started: Instant,
    /// Open until the worker says it is ready.
    ready: Option<UnixStream>,
    young_deaths: u32,
    start_at: Option<Instant>,
}

struct Upgrade {
    pid: libc::pid_t,
    ready: UnixStream,
    deadline: Instant,
}

struct Supervisor {
    config: Config,
    exe: PathBuf,
    args: Vec<OsString>,
    listeners: Vec<Listener>,
    fds: (String, Vec<std::os::fd::RawFd>),
    signals: SignalPipe,
    workers: Vec<Worker>,
    upgrade: Option<Upgrade>,
    /// The supervisor that took over, once it has.
    successor: Option<libc::pid_t>,
    state: State,
    /// Until every worker has been ready once (then the pid file is
    /// written and a previous supervisor told).
    all_ready: bool,
    /// Kill what is left at this instant (drain timeout plus grace).
    kill_at: Option<Instant>,
    pid_file: Option<PidFile>,
    /// This one was started by the user (not restarted): after a hand-over
    /// it stays, in the foreground, relaying signals to the generation that
    /// serves, until that one ends (see [`Supervisor::keep`]).
    keeper: bool,
    /// A stop signal came while the old workers drained after a hand-over.
    stopped_while_retiring: bool,
    /// A restarted supervisor: readable once the keeper (the one the user
    /// started, which relays the signals) has died. Then this one drains,
    /// rather than serve on with no one in the foreground.
    keeper_gone: Option<std::os::fd::OwnedFd>,
    /// Which generation this is: 1 for the supervisor the user started,
    /// one more at each restart (in the logs of it and its workers).
    generation: u32,
    /// At a stop the listeners are shut, unless systemd holds them (the
    /// connections then wait for its next start).
    shut_at_stop: bool,
    /// `--metrics`: the port's listener (handed to a successor), and each
    /// worker's channel for scrapes.
    metrics: Option<(std::net::TcpListener, crate::metrics::workers::Channels)>,
}

/// Runs the supervisor on bound (or inherited) listeners until stopped or
/// replaced. `signals` was installed before anything was bound.
pub fn run(
    config: Config,
    listeners: Vec<Listener>,
    signals: SignalPipe,
    source: handoff::Source,
) -> anyhow::Result<()> {
    let restarted = source == handoff::Source::Upcase;
    if !restarted {
        // The keeper (see `Supervisor::keep`) adopts what its successors
        // leave: a generation that hands over and exits leaves its own
        // successor here, not with init.
        // SAFETY: prctl(2) with an integer argument.
        if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1) } != 0 {
            tracing::warn!("PR_SET_CHILD_SUBREAPER: {}", io::Error::last_os_error());
        }
    }
    let processes = config.processes.unwrap_or(1);
    // The path as started, not /proc/self/exe: after an upgrade replaced
    // the file, a restart must run the new one.
    let exe = std::env::args_os()
        .next()
        .map(PathBuf::from)
        .filter(|p| p.components().count() > 1)
        .map_or_else(std::env::current_exe, Ok)
        .context("finding this program's path")?;
    let exe = std::fs::canonicalize(&exe).unwrap_or(exe);
    let pid_file = match (&config.pid_file, restarted) {
        (Some(p), false) => Some(PidFile::write(p)?),
        _ => None,
    };
    let fds = handoff::fd_list(&listeners);
    let channels = crate::metrics::workers::Channels::default();
    // What can still fail fails before the first `listening` line.
    let metrics = super::bind_metrics(&config)?;
    if !restarted {
        // (A restarted supervisor's listeners were announced by the first.)
        super::announce(&listeners, &config.listeners)?;
    }
    let metrics = match metrics {
        Some(m) => Some((m.serve(channels.source())?, channels)),
        None => None,
    };
    let mut sup = Supervisor {
        exe,
        args: std::env::args_os().skip(1).collect(),
        fds,
        listeners,
        signals,
        workers: (1..=processes)
            .map(|n| Worker {
                n,
                pid: None,
                started: Instant::now(),
                ready: None,
                young_deaths: 0,
                start_at: Some(Instant::now()),
            })
            .collect(),
        upgrade: None,
        successor: None,
        state: State::Running,
        all_ready: false,
        kill_at: None,
        pid_file,
        keeper: !restarted,
        stopped_while_retiring: false,
        keeper_gone: if restarted { watch_keeper() } else { None },
        generation: handoff::generation(),
        shut_at_stop: source != handoff::Source::Systemd,
        metrics,
        config,
    };
    tracing::info!(
        "supervisor {}: {processes} worker process(es) of the {} model; SIGUSR2 restarts, SIGTERM stops",
        std::process::id(),
        sup.config.model.name()
    );
    sup.run()
}

impl Supervisor {
    fn run(&mut self) -> anyhow::Result<()> {
        loop {
            self.reap();
            if self.state != State::Running && self.workers.iter().all(|w| w.pid.is_none()) {
                break;
            }
            let now = Instant::now();
            if self.state == State::Running {
                self.start_due(now);
            }
            if self.kill_at.is_some_and(|t| now >= t) {
                self.kill_at = None;
                self.signal_workers(libc::SIGKILL);
                tracing::warn!("workers still running past the drain timeout: killed");
            }
            if self.upgrade.as_ref().is_some_and(|u| now >= u.deadline) {
                let timeout = humantime::format_duration(self.config.restart_timeout);
                self.abandon_upgrade(&format!(
                    "was not ready within {timeout} (--restart-timeout)"
                ));
            }
            self.wait(now)?;
        }
        match (self.state, self.successor) {
            (State::Retiring, Some(next)) if self.keeper => {
                tracing::info!("old workers finished; pid {next} serves");
                return self.keep(next);
            }
            (State::Retiring, None) if self.keeper => {
                tracing::info!("old workers finished; the service has ended");
            }
            (State::Retiring, _) => {
                tracing::info!("old workers finished; the new server carries on")
            }
            _ => tracing::info!("all workers finished"),
        }
        Ok(())
    }

    /// After a hand-over, the supervisor the user started stays: it is the
    /// process the terminal, the shell and `--pid-file` know. It relays
    /// every signal to the generation that serves (Ctrl-C drains after any
    /// number of restarts; SIGUSR2 restarts again) and ends when the last
    /// generation ends. It is the subreaper of its descendants, so when a
    /// generation hands over and exits, its successor becomes this one's
    /// child, and the next one to relay to.
    fn keep(&mut self, mut serving: libc::pid_t) -> anyhow::Result<()> {
        drop(self.metrics.take()); // the successor answers scrapes now
        loop {
            loop {
                let mut status = 0;
                // SAFETY: waitpid writes the status through a valid pointer.
                let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
                if pid <= 0 {
                    break;
                }
                if pid == serving {
                    match successor_child() {
                        Some(next) => {
                            tracing::info!("pid {pid} handed over to pid {next}: relaying to it");
                            serving = next;
                        }
                        None => {
                            tracing::info!("pid {pid} {}: the service has ended", describe(status));
                            return Ok(());
                        }
                    }
                }
            }
            wait_readable(&[self.signals.as_fd()], Some(Duration::from_secs(1))).context("poll")?;
            for byte in self.signals.take_bytes() {
                match byte {
                    CHILD_BYTE => {} // reaped above
                    RESTART_BYTE => relay(libc::SIGUSR2),
                    _ => relay(libc::SIGTERM),
                }
            }
        }
    }

    /// Waits for a signal, a worker's "ready", or the next timer.
    fn wait(&mut self, now: Instant) -> anyhow::Result<()> {
        let timers = [
            self.workers.iter().filter_map(|w| w.start_at).min(),
            self.kill_at,
            self.upgrade.as_ref().map(|u| u.deadline),
        ];
        let timeout = timers
            .into_iter()
            .flatten()
            .min()
            .map_or(Duration::from_secs(1), |t| t.saturating_duration_since(now))
            .min(Duration::from_secs(1));
        let mut fds = vec![self.signals.as_fd()];
        let waiting: Vec<usize> = (0..self.workers.len())
            .filter(|&i| self.workers[i].ready.is_some())
            .collect();
        fds.extend(
            waiting
                .iter()
                .filter_map(|&i| self.workers[i].ready.as_ref().map(|r| r.as_fd())),
        );
        let upgrade_at = fds.len();
        if let Some(u) = &self.upgrade {
            fds.push(u.ready.as_fd());
        }
        let keeper_at = fds.len();
        if let Some(k) = &self.keeper_gone {
            fds.push(k.as_fd());
        }
        let ready = wait_readable(&fds, Some(timeout)).context("poll")?;
        if self.keeper_gone.is_some() && ready.get(keeper_at) == Some(&true) {
            self.keeper_gone = None;
            if self.state == State::Running {
                tracing::warn!("the supervisor in the foreground died: stopping");
                self.stop();
            }
        }
        if ready[0] {
            self.on_signals();
        }
        for (k, &i) in waiting.iter().enumerate() {
            if ready[1 + k] {
                self.on_worker_ready(i);
            }
        }
        if self.upgrade.is_some() && ready.get(upgrade_at) == Some(&true) {
            self.on_upgrade_ready();
        }
        Ok(())
    }

    fn on_signals(&mut self) {
        for byte in self.signals.take_bytes() {
            match byte {
                CHILD_BYTE => {} // reaped at the top of the loop
                RESTART_BYTE => self.restart(),
                _ => self.stop(),
            }
        }
    }

    /// Starts every worker whose start is due.
    fn start_due(&mut self, now: Instant) {
        for i in 0..self.workers.len() {
            if self.workers[i].start_at.is_some_and(|t| now >= t) {
                let n = self.workers[i].n;
                match self.spawn(Some(n)) {
                    Ok((pid, ready)) => {
                        let w = &mut self.workers[i];
                        (w.pid, w.ready, w.started, w.start_at) =
                            (Some(pid), Some(ready), now, None);
                        tracing::info!("started worker {n} (pid {pid})");
                    }
                    Err(e) => {
                        tracing::error!("starting worker {n}: {e}; trying again in 1s");
                        self.workers[i].start_at = Some(now + Duration::from_secs(1));
                    }
                }
            }
        }
    }

    /// Starts this program again with the listeners inherited: a worker
    /// (`Some(n)`), or the next supervisor (`None`). Returns its pid and
    /// the end it writes "ready" to.
    fn spawn(&self, worker: Option<usize>) -> io::Result<(libc::pid_t, UnixStream)> {
        let (rx, tx) = UnixStream::pair()?;
        let mut keep = self.fds.1.clone();
        keep.push(tx.as_raw_fd());
        let mut cmd = std::process::Command::new(&self.exe);
        cmd.env_remove(handoff::METRICS_FD)
            .env_remove(handoff::METRICS_LISTENER_FD);
        // A worker answers scrapes on a channel of its own; the next
        // supervisor takes over the metrics port.
        let mut scrapes = None;
        if let Some((listener, _)) = &self.metrics {
            if worker.is_some() {
                let (ours, theirs) = UnixStream::pair()?;
                keep.push(theirs.as_raw_fd());
                cmd.env(handoff::METRICS_FD, theirs.as_raw_fd().to_string());
                scrapes = Some((ours, theirs));
            } else {
                keep.push(listener.as_raw_fd());
                cmd.env(
                    handoff::METRICS_LISTENER_FD,
                    listener.as_raw_fd().to_string(),
                );
            }
        }
        cmd.args(&self.args)
            .env(handoff::LISTEN_FDS, &self.fds.0)
            .env(handoff::READY_FD, tx.as_raw_fd().to_string())
            .env_remove("LISTEN_FDS")
            .env_remove("LISTEN_PID")
            .env_remove("LISTEN_FDNAMES")
            .stdin(std::process::Stdio::null());
        match worker {
            // Only a supervisor speaks to systemd.
            Some(n) => cmd
                .env(handoff::WORKER, n.to_string())
                .env_remove("NOTIFY_SOCKET"),
            None => cmd.env_remove(handoff::WORKER),
        };
        let is_worker = worker.is_some();
        // A process group of its own, for a worker and for a restarted
        // supervisor alike: what a terminal sends to the foreground group
        // (Ctrl-C, the hangup), or a script with `kill -INT -PGID`, reaches
        // this supervisor alone, which relays it once. In one group, a
        // worker got one Ctrl-C twice (from the terminal and relayed) and
        // cut its streams as at a second signal.
        cmd.process_group(0);
        let generation = self.generation + u32::from(!is_worker);
        cmd.env(handoff::GENERATION, generation.to_string());
        if !is_worker {
            let keeper = if self.keeper {
                std::process::id().to_string()
            } else {
                std::env::var(handoff::KEEPER).unwrap_or_default()
            };
            cmd.env(handoff::KEEPER, keeper);
        }
        // SAFETY: the closure runs between fork and exec and makes only
        // async-signal-safe calls (prctl, fcntl); `keep` was allocated
        // before the fork and is only read.
        unsafe {
            cmd.pre_exec(move || {
                // A worker must not outlive its supervisor: it drains when
                // the supervisor dies. The next supervisor must outlive us.
                if is_worker && libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(io::Error::last_os_error());
                }
                if !handoff::keep_open(&keep) {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            })
        };
        let child = cmd.spawn()?;
        // Our copy of the write end must go, so that a child that dies
        // before it is ready shows as end of file.
        drop(tx);
        if let (Some((ours, theirs)), Some(n), Some((_, channels))) =
            (scrapes, worker, &self.metrics)
        {
            drop(theirs);
            channels.set(n, ours);
        }
        Ok((child.id() as libc::pid_t, rx))
    }

    fn on_worker_ready(&mut self, i: usize) {
        let Some(mut r) = self.workers[i].ready.take() else {
            return;
        };
        let mut byte = [0u8; 1];
        if !matches!(r.read(&mut byte), Ok(1)) {
            return; // it died first; reaped and started again
        }
        self.publish_workers();
        if !self.all_ready
            && self
                .workers
                .iter()
                .all(|w| w.pid.is_some() && w.ready.is_none())
        {
            self.all_ready = true;
            tracing::info!(
                "all {} workers ready: serving with the {} model",
                self.workers.len(),
                self.config.model.name()
            );
            handoff::signal_ready();
            handoff::notify_systemd_ready();
        }
    }

    /// SIGUSR2: start the next supervisor, unless one is starting already.
    fn restart(&mut self) {
        if let Some(u) = &self.upgrade {
            tracing::warn!(
                "SIGUSR2 refused: a restart is in progress already (new server pid {})",
                u.pid
            );
            return;
        }
        match (self.state, &self.successor) {
            (State::Retiring, Some(_)) if self.keeper => {
                relay(libc::SIGUSR2);
                return;
            }
            (State::Retiring, Some(pid)) => {
                tracing::debug!("SIGUSR2: this server handed over to pid {pid}; it restarts");
                return;
            }
            (State::Running, _) if !self.all_ready => {
                tracing::warn!("SIGUSR2 refused: this server is not ready yet");
                return;
            }
            (State::Running, _) => {}
            _ => {
                tracing::warn!("SIGUSR2 refused: this server is stopping");
                return;
            }
        }
        match self.spawn(None) {
            Ok((pid, ready)) => {
                tracing::info!(
                    "SIGUSR2: restarting; new server pid {pid} ({}), the old workers drain once it is ready",
                    self.exe.display()
                );
                self.upgrade = Some(Upgrade {
                    pid,
                    ready,
                    deadline: Instant::now() + self.config.restart_timeout,
                });
            }
            Err(e) => tracing::error!(
                "SIGUSR2: starting {}: {e}; still serving",
                self.exe.display()
            ),
        }
    }

    fn on_upgrade_ready(&mut self) {
        let Some(mut u) = self.upgrade.take() else {
            return;
        };
        let mut byte = [0u8; 1];
        if !matches!(u.ready.read(&mut byte), Ok(1)) {
            self.upgrade = Some(u);
            self.abandon_upgrade("it exited before it was ready");
            return;
        }
        tracing::info!(
            "new server pid {} is ready: draining the old workers",
            u.pid
        );
        self.state = State::Retiring;
        self.successor = Some(u.pid);
        // Scrapes go to the new server, whose workers serve, from now on.
        if self.metrics.is_some() {
            crate::metrics::stop_serving();
        }
        // The socket files and the pid file are the new server's now.
        for l in &mut self.listeners {
            if let Listener::Unix(_, guard) = l {
                guard.disarm();
            }
        }
        if !self.keeper
            && let Some(p) = &mut self.pid_file
        {
            p.disarm();
        }
        self.drain_workers();
    }

    fn abandon_upgrade(&mut self, why: &str) {
        if let Some(u) = self.upgrade.take() {
            tracing::error!(
                "restart failed: new server pid {} {why}; still serving",
                u.pid
            );
            // SAFETY: kill(2) of our own child; if it is gone already the
            // call fails harmlessly (it is not reaped yet, so the pid is
            // not reused).
            unsafe { libc::kill(u.pid, libc::SIGKILL) };
        }
    }

    /// SIGTERM/SIGINT: the first stops accepting and drains the workers;
    /// another is passed on (a worker's second signal cuts at once).
    fn stop(&mut self) {
        if self.state == State::Stopping {
            tracing::warn!("second signal: stopping the workers now");
            self.signal_workers(libc::SIGTERM);
            return;
        }
        if self.state == State::Retiring {
            // A successor serves: the keeper relays the stop to every later
            // generation (each gets it once, and the one that serves
            // drains); the old workers here drain already, and only a
            // second signal cuts them.
            if self.keeper {
                relay(libc::SIGTERM);
            }
            if std::mem::replace(&mut self.stopped_while_retiring, true) {
                tracing::warn!("second signal while the old workers drain: stopping them now");
                self.signal_workers(libc::SIGTERM);
            }
            return;
        }
        self.state = State::Stopping;
        crate::metrics::set_draining(); // /healthz: 503 from now on
        self.abandon_upgrade("was cancelled by the stop");
        for w in &mut self.workers {
            w.start_at = None;
        }
        self.drain_workers();
        for l in &mut self.listeners {
            if l.is_stream() && self.shut_at_stop {
                // SAFETY: shutdown(2) on a listener we own: it stops
                // listening for every process that shares it, so new
                // connects are refused while the workers drain.
                unsafe { libc::shutdown(l.as_fd().as_raw_fd(), libc::SHUT_RD) };
            }
            if let Listener::Unix(_, guard) = l {
                drop(guard.take()); // removes the socket file now
            }
        }
        tracing::info!(
            "signal received: no new connections; the workers drain (within {})",
            humantime::format_duration(self.config.drain_timeout)
        );
    }

    fn drain_workers(&mut self) {
        self.signal_workers(libc::SIGTERM);
        self.kill_at = Instant::now()
            .checked_add(self.config.drain_timeout)
            .and_then(|t| t.checked_add(GRACE));
    }

    fn signal_workers(&self, sig: libc::c_int) {
        for pid in self.workers.iter().filter_map(|w| w.pid) {
            // SAFETY: kill(2) of our own child, not yet reaped (so the pid
            // cannot have been reused).
            unsafe { libc::kill(pid, sig) };
        }
    }

    /// Tells the metrics port how many workers there are to be and how
    /// many are ready (started, and said so).
    fn publish_workers(&self) {
        if let Some((_, channels)) = &self.metrics {
            let ready = self
                .workers
                .iter()
                .filter(|w| w.pid.is_some() && w.ready.is_none())
                .count();
            channels.set_workers(self.workers.len(), ready);
        }
    }

    /// Collects every child that ended; a worker is started again unless
    /// the supervisor is stopping or retiring.
    fn reap(&mut self) {
        loop {
            let mut status = 0;
            // SAFETY: waitpid writes the status through a valid pointer.
            let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
            if pid <= 0 {
                self.publish_workers();
                return;
            }
            if self.upgrade.as_ref().is_some_and(|u| u.pid == pid) {
                let u = self.upgrade.take();
                tracing::error!(
                    "restart failed: new server pid {pid} {}; still serving",
                    describe(status)
                );
                drop(u);
                continue;
            }
            if self.successor == Some(pid) {
                // The successor handed over in turn (its own successor is
                // this subreaper's child now) or ended.
                self.successor = successor_child();
                match self.successor {
                    Some(next) => {
                        tracing::info!("pid {pid} handed over to pid {next}: relaying to it")
                    }
                    None => tracing::info!("pid {pid} {}: the service has ended", describe(status)),
                }
                continue;
            }
            let running = self.state == State::Running;
            let Some(w) = self.workers.iter_mut().find(|w| w.pid == Some(pid)) else {
                continue;
            };
            w.pid = None;
            w.ready = None;
            if !running {
                tracing::info!("worker {} (pid {pid}) {}", w.n, describe(status));
                continue;
            }
            let pause = if w.started.elapsed() < YOUNG {
                w.young_deaths += 1;
                (Duration::from_millis(100) * 2u32.saturating_pow(w.young_deaths.min(6)))
                    .min(MAX_PAUSE)
            } else {
                w.young_deaths = 0;
                Duration::ZERO
            };
            if let Some((_, channels)) = &self.metrics {
                channels.worker_restarted();
            }
            tracing::warn!(
                "worker {} (pid {pid}) {}; starting another{}",
                w.n,
                describe(status),
                if pause.is_zero() {
                    String::new()
                } else {
                    format!(" in {}", humantime::format_duration(pause))
                }
            );
            w.start_at = Some(Instant::now() + pause);
        }
    }
}

/// A descriptor that becomes readable when the keeper named in the
/// environment exits (a pidfd). `None` without one; if the keeper is gone
/// already, a descriptor that is readable at once.
fn watch_keeper() -> Option<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    let pid: libc::pid_t = std::env::var(handoff::KEEPER).ok()?.parse().ok()?;
    // SAFETY: pidfd_open(2) takes a pid and flags and returns a new
    // descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd >= 0 {
        // SAFETY: a descriptor just returned, owned by nothing else.
        return Some(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) });
    }
    if io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH) {
        // Gone before we looked: a socket pair whose other end is closed
        // reads end of file at once.
        let (a, _) = UnixStream::pair().ok()?;
        return Some(a.into());
    }
    None
}

/// Sends `sig` to every supervisor below this one (each generation once):
/// the one that serves acts on it; one that handed over and still drains
/// its old workers only counts a stop (a second cuts them); one not ready
/// yet refuses a restart. Sent to all, because which one serves can change
/// between a look and the signal, and a stop sent to one that has just
/// finished would be lost.
fn relay(sig: libc::c_int) {
    // All of them first, then the signal: one that acts on it may start a
    // new generation, which must not get it (before its handlers are in
    // place, SIGUSR2 would kill it).
    let mut todo = vec![std::process::id() as libc::pid_t];
    let mut all = Vec::new();
    while let Some(p) = todo.pop() {
        let children = supervisor_children(p);
        all.extend(&children);
        todo.extend(children);
    }
    for &pid in &all {
        // SAFETY: kill(2) of a descendant of ours.
        unsafe { libc::kill(pid, sig) };
    }
    tracing::info!("relayed signal {sig} to {all:?}");
}

/// The children of `pid` that are supervisors (not workers, whose
/// environment names their number).
fn supervisor_children(pid: libc::pid_t) -> Vec<libc::pid_t> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    let worker = format!("{}=", handoff::WORKER);
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|list| {
            list.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<libc::pid_t>>()
        })
        .filter(|child| {
            std::fs::read(format!("/proc/{child}/environ")).is_ok_and(|env| {
                !env.split(|b| *b == 0)
                    .any(|var| var.starts_with(worker.as_bytes()))
            })
        })
        .collect()
}

/// A child of this process that is a supervisor (not a worker, whose
/// environment names its number): the successor a generation handed over
/// to before it exited, now this subreaper's child.
fn successor_child() -> Option<libc::pid_t> {
    supervisor_children(std::process::id() as libc::pid_t)
        .into_iter()
        .next()
}

/// A wait status in words.
fn describe(status: libc::c_int) -> String {
    if libc::WIFSIGNALED(status) {
        let sig = libc::WTERMSIG(status);
        format!("was killed by signal {sig}")
    } else if libc::WIFEXITED(status) {
        format!("exited with status {}", libc::WEXITSTATUS(status))
    } else {
        format!("ended (status {status:#x})")
    }
}

/// The signal pipe of a supervisor: stop, restart and child signals, told
/// apart by their bytes. Installed before anything is bound.
pub fn install_signals() -> io::Result<SignalPipe> {
    let pipe = SignalPipe::for_signals(&STOP_SIGNALS)?;
    pipe.route(libc::SIGUSR2, RESTART_BYTE)?;
    pipe.route(libc::SIGCHLD, CHILD_BYTE)?;
    Ok(pipe)
}
