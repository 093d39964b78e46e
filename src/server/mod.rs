//! `upcase serve`: listener setup and limits shared by all models.
//!
//! The sequence is the same whatever the model: bind every listener (so that
//! a port in use fails before anything is announced), print one
//! `listening ENDPOINT` line per listener on stdout, then hand the bound
//! sockets to the model, which waits for clients its own way. Every model
//! moves bytes through [`crate::conn`] and lives by one
//! [`crate::lifecycle`].

pub mod blocking;
pub mod epoll;
pub mod fork;
pub mod handoff;
pub mod iterative;
mod mmsg;
pub mod pidfile;
pub mod pool;
pub mod readiness;
pub mod select;
pub mod supervisor;
pub mod tasks;
pub mod threads;
pub mod udp;
pub mod uring;

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use crate::addr::Endpoint;
use crate::conn::Protocol;
use crate::lifecycle::Lifecycle;
use crate::net::{self, Listener, SockOpts};

/// How the server waits for many clients at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Model {
    /// One client at a time; the others wait in the backlog (tcp_deadlock.py).
    Iterative,
    /// A child process per connection (server-fork.py).
    Fork,
    /// A thread per connection (the seeds' ClientSocket thread).
    Threads,
    /// A fixed pool of --workers threads sharing the listeners (the seeds' pool).
    Pool,
    /// One thread, non-blocking sockets, one poll(2) loop (the select() server).
    Select,
    /// Event loops on epoll (mio), --workers of them sharing the listeners,
    /// ~460 bytes per idle connection; the default where io_uring is not
    /// allowed.
    Epoll,
    /// A task per connection on tokio's multi-threaded runtime (lecture 3's
    /// event loop, on every core).
    Async,
    /// io_uring loops, --workers of them: multishot receives into a ring of
    /// shared blocks, sends batched into one system call (Linux 6.0+), ~480
    /// bytes per idle connection; the default: never measurably worse than
    /// the others under two load engines, better under one (three pinned
    /// runs each, docs/BENCHMARKS.md).
    Uring,
}

impl Model {
    /// The model `serve` uses without `--model`: uring where this kernel
    /// (and its seccomp policy: containers often forbid io_uring) allows
    /// it, else epoll. See docs/BENCHMARKS.md for the measurements.
    pub fn default_here() -> Model {
        if uring::available() {
            Model::Uring
        } else {
            Model::Epoll
        }
    }

    /// Whether this machine can run the model (io_uring may be forbidden).
    pub fn runs_here(self) -> bool {
        self != Model::Uring || uring::available()
    }

    pub const ALL: [Model; 8] = [
        Model::Iterative,
        Model::Fork,
        Model::Threads,
        Model::Pool,
        Model::Select,
        Model::Epoll,
        Model::Async,
        Model::Uring,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Model::Iterative => "iterative",
            Model::Fork => "fork",
            Model::Threads => "threads",
            Model::Pool => "pool",
            Model::Select => "select",
            Model::Epoll => "epoll",
            Model::Async => "async",
            Model::Uring => "uring",
        }
    }
}

/// Everything `serve` needs, validated.
#[derive(Debug, Clone)]
pub struct Config {
    pub listeners: Vec<Endpoint>,
    pub model: Model,
    pub sockopts: SockOpts,
    /// Largest block read from a connection at once.
    pub block: usize,
    /// What is done to the bytes: `--utf8` and `--framing`.
    pub protocol: Protocol,
    /// Connections served at once; more wait in the listen backlog.
    pub max_conns: usize,
    /// How long streams in progress may finish after SIGTERM/SIGINT.
    pub drain_timeout: Duration,
    /// Threads of the pool, event loops of epoll, runtime workers of async.
    pub workers: usize,
    /// Close a connection that moves no bytes either way for this long.
    pub idle_timeout: Option<Duration>,
    /// `--handshake-timeout`: a tls:// handshake is complete this long
    /// after the accept, or the connection is closed.
    pub handshake_timeout: Duration,
    /// `--max-buffered`: the unsent output of all connections together.
    pub buffered: std::sync::Arc<crate::conn::Buffered>,
    /// `--udp-limit`, `--udp-allow`: who gets UDP replies, and how many.
    pub udp: udp::UdpPolicy,
    /// Every UDP source's tokens, shared by the services of this process.
    pub udp_sources: std::sync::Arc<std::sync::Mutex<udp::Sources>>,
    /// `--metrics`: where Prometheus scrapes `/metrics`.
    pub metrics: Option<crate::addr::HostPort>,
    /// `--cert`/`--key`: what tls:// listeners present.
    pub tls: Option<std::sync::Arc<rustls::ServerConfig>>,
    /// The tls:// listeners, by the name of their bound address (set once
    /// bound, so that port 0 is known).
    pub tls_listeners: Vec<String>,
    /// `--processes`: a supervisor and this many workers.
    pub processes: Option<usize>,
    /// `--pid-file`.
    pub pid_file: Option<std::path::PathBuf>,
    /// `--restart-timeout`: how long a restarted server may take to say its
    /// workers are ready before it is stopped (the old one serves on).
    pub restart_timeout: Duration,
    /// `--proxy-protocol` and `--proxy-timeout`: every stream connection
    /// starts with a PROXY header of these versions, complete within this.
    pub proxy: Option<(crate::proxy::Version, Duration)>,
    /// No ADDR was given (`listeners` are the defaults): sockets from
    /// systemd are then served whatever they are.
    pub listeners_defaulted: bool,
}

impl Config {
    /// Who a new connection on `fd` is, which listener it came through, and
    /// whether that one speaks TLS: asked by every driver at accept.
    pub fn origin(&self, peer: String, fd: std::os::fd::BorrowedFd<'_>) -> crate::conn::Origin {
        let listener = crate::net::local_name(fd);
        if self.tls.is_some() && self.tls_listeners.contains(&listener) {
            crate::conn::Origin {
                peer,
                listener: listener.replacen("tcp://", "tls://", 1),
                tls: self.tls.clone(),
                proxy: self.proxy,
            }
        } else {
            crate::conn::Origin {
                peer,
                listener,
                tls: None,
                proxy: self.proxy,
            }
        }
    }

    /// How often the readiness loops must look for connections past their
    /// deadline: the shortest of `--idle-timeout`, `--proxy-timeout` and
    /// (with tls:// listeners) `--handshake-timeout`.
    pub fn sweep_timeout(&self) -> Option<Duration> {
        let proxy = self.proxy.map(|(_, t)| t);
        let handshake = self.tls.as_ref().map(|_| self.handshake_timeout);
        [self.idle_timeout, proxy, handshake]
            .into_iter()
            .flatten()
            .min()
    }

    /// The UDP service of one socket.
    pub fn udp_service(&self) -> udp::UdpService {
        udp::UdpService::new(
            self.protocol.mode,
            self.udp.clone(),
            self.udp_sources.clone(),
        )
    }

    /// The bounds of each connection, for a driver that reads `read_ahead`
    /// bytes ahead of its writes (see [`crate::conn::Limits`]).
    pub fn limits(&self, read_ahead: usize) -> crate::conn::Limits {
        crate::conn::Limits {
            block: self.block,
            read_ahead,
            idle: self.idle_timeout,
            handshake: self.handshake_timeout,
            buffered: self.buffered.clone(),
        }
    }
}

/// Ends a connection as its core decided: every driver ends connections
/// here, so that an ending reads the same on every model. The core chose
/// close or reset and why ([`Conn::resets`](crate::conn::Conn::resets)); this logs it and arms the
/// reset. The socket closes when the caller drops it, right after.
pub fn end_connection(fd: std::os::fd::BorrowedFd<'_>, conn: &crate::conn::Conn) {
    conn.log_end(std::time::Instant::now());
    if conn.resets() {
        crate::net::reset_on_close(fd);
    }
}

/// The default listeners: the seeds' port, on loopback.
pub fn default_listeners() -> Vec<Endpoint> {
    vec![
        "tcp://127.0.0.1:1060".parse().expect("literal"),
        "udp://127.0.0.1:1060".parse().expect("literal"),
    ]
}

/// Default for `--max-conns`: what the file descriptor limit allows, with
/// room for listeners, logs and the runtime.
pub fn default_max_conns() -> usize {
    let (soft, _) = fd_limits();
    (soft.saturating_sub(64) as usize).max(1)
}

/// Raises the soft file descriptor limit to the hard limit, so that
/// `--max-conns` and not EMFILE bounds the connections. Returns the new limit.
pub fn raise_fd_limit() -> u64 {
    let (soft, hard) = fd_limits();
    if soft < hard {
        let lim = libc::rlimit {
            rlim_cur: hard,
            rlim_max: hard,
        };
        // SAFETY: setrlimit reads one valid rlimit struct.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } == 0 {
            return hard;
        }
    }
    soft
}

fn fd_limits() -> (u64, u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit struct through a valid pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return (1024, 1024);
    }
    (lim.rlim_cur, lim.rlim_max)
}

/// Binds every listener, or fails naming the one that could not be bound.
pub fn bind_all(config: &Config) -> anyhow::Result<Vec<Listener>> {
    config
        .listeners
        .iter()
        .map(|ep| net::bind(ep, &config.sockopts).map_err(anyhow::Error::from))
        .collect()
}

/// Prints the `listening ENDPOINT` lines scripts wait for, and flushes them.
pub fn announce(listeners: &[Listener], asked: &[Endpoint]) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    for ep in shown(listeners, asked)? {
        writeln!(out, "listening {ep}").context("writing to stdout")?;
        tracing::info!("listening on {ep}");
    }
    out.flush().context("writing to stdout")?;
    Ok(())
}

/// The listeners as users name them: the bound address (the real port
/// when 0 was asked), tls:// where TLS was asked.
fn shown(listeners: &[Listener], asked: &[Endpoint]) -> anyhow::Result<Vec<Endpoint>> {
    listeners
        .iter()
        .zip(asked)
        .map(|(l, asked)| {
            let ep = l.local_endpoint().context("reading the bound address")?;
            Ok(match (asked.is_tls(), ep) {
                (true, Endpoint::Tcp(hp)) => Endpoint::Tls(hp),
                (_, ep) => ep,
            })
        })
        .collect()
}

/// The names of the tls:// listeners as connections see them
/// ([`crate::net::local_name`]), for [`Config::origin`].
fn tls_names(listeners: &[Listener], asked: &[Endpoint]) -> anyhow::Result<Vec<String>> {
    Ok(shown(listeners, asked)?
        .into_iter()
        .filter_map(|ep| match ep {
            Endpoint::Tls(hp) => Some(Endpoint::Tcp(hp).to_string()),
            _ => None,
        })
        .collect())
}

/// Connections a model serves at once: `--max-conns`, except where the
/// model itself sets the bound (one for `iterative`, the workers of `pool`).
pub fn capacity(config: &Config) -> usize {
    match config.model {
        Model::Iterative => 1,
        Model::Pool => config.workers.min(config.max_conns).max(1),
        _ => config.max_conns,
    }
}

/// What this machine lets a model hold beyond its open files, and why: a
/// thread per connection needs memory mappings (its stack and guard, and
/// the signal stack Rust gives every thread, with its guard: 4, measured)
/// and a pid; a process per connection needs a pid. Past these the thread
/// cannot be created, and Rust aborts the whole process when the signal
/// stack of a new thread cannot be mapped: so the model must never try.
pub fn machine_limit(model: Model) -> Option<(usize, String)> {
    let read =
        |path: &str| -> Option<usize> { std::fs::read_to_string(path).ok()?.trim().parse().ok() };
    let pids = read("/proc/sys/kernel/pid_max").map(|p| p.saturating_sub(2048));
    match model {
        Model::Threads => {
            let maps = read("/proc/sys/vm/max_map_count").map(|m| m.saturating_sub(4096) / 4);
            tightest([
                maps.map(|n| (n, "vm.max_map_count, 4 mappings per thread")),
                pids.map(|n| (n, "kernel.pid_max, a pid per thread")),
            ])
        }
        Model::Fork => {
            let mut lim = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            // SAFETY: getrlimit writes one rlimit struct through a valid pointer.
            let nproc = (unsafe { libc::getrlimit(libc::RLIMIT_NPROC, &mut lim) } == 0
                && lim.rlim_cur != libc::RLIM_INFINITY)
                .then(|| (lim.rlim_cur as usize).saturating_sub(64));
            tightest([
                pids.map(|n| (n, "kernel.pid_max, a pid per child")),
                nproc.map(|n| (n, "RLIMIT_NPROC, processes of this user")),
            ])
        }
        _ => None,
    }
}

/// The smallest of the limits this machine states, with its reason.
fn tightest<const N: usize>(limits: [Option<(usize, &str)>; N]) -> Option<(usize, String)> {
    let (n, why) = limits.into_iter().flatten().min()?;
    Some((n.max(1), why.to_string()))
}

/// Runs the server until SIGINT or SIGTERM (see [`crate::lifecycle`]):
/// on its own, as the supervisor of `--processes`, or as one of its
/// workers ([`handoff::role`]).
pub fn run(mut config: Config) -> anyhow::Result<()> {
    let inherited = handoff::inherited_fds().map_err(anyhow::Error::msg)?;
    if let handoff::Role::Worker(n) = handoff::role() {
        return run_worker(config, n, inherited);
    }
    if config.processes.is_some() {
        // Signals are caught from before the first `listening` line.
        let signals = supervisor::install_signals().context("installing signal handlers")?;
        let (listeners, source) = listeners_for(&mut config, inherited)?;
        return supervisor::run(config, listeners, signals, source);
    }
    let life = Lifecycle::install(config.drain_timeout, capacity(&config))
        .context("installing signal handlers")?;
    let (mut listeners, source) = listeners_for(&mut config, inherited)?;
    if source == handoff::Source::Systemd {
        life.set_listeners_shared();
    }
    take_charge(&life, &config, &mut listeners)?;
    config.tls_listeners = tls_names(&listeners, &config.listeners)?;
    // What can still fail (the pid file, the metrics port) fails before
    // the first `listening` line: a script that saw one may rely on it.
    let _pid_file = match &config.pid_file {
        Some(p) => Some(pidfile::PidFile::write(p)?),
        None => None,
    };
    let metrics = bind_metrics(&config)?;
    announce(&listeners, &config.listeners)?;
    handoff::notify_systemd_ready();
    crate::metrics::init(config.model.name());
    if let Some(m) = metrics {
        m.serve(crate::metrics::own())?;
    }
    tracing::info!("serving with the {} model", config.model.name());
    let result = serve_model(config, listeners, &life);
    life.cleanup();
    result
}

/// The `--metrics` listener: bound (or handed over by the previous
/// supervisor at a restart, and announced then already), not yet served.
/// Not one of the service's listeners: it keeps answering during a drain,
/// so that the drain can be watched.
pub struct MetricsListener {
    listener: std::net::TcpListener,
    announce: bool,
}

/// Binds the `--metrics` port, if asked, before anything is announced, so
/// that a port in use is an error before the first `listening` line.
pub fn bind_metrics(config: &Config) -> anyhow::Result<Option<MetricsListener>> {
    let Some(hp) = &config.metrics else {
        return Ok(None);
    };
    if let Some(fd) = handoff::take_fd(handoff::METRICS_LISTENER_FD) {
        return Ok(Some(MetricsListener {
            listener: std::net::TcpListener::from(fd),
            announce: false,
        }));
    }
    let endpoint = Endpoint::Tcp(hp.clone());
    let bound = crate::net::bind(&endpoint, &config.sockopts)
        .map_err(|e| anyhow::anyhow!("--metrics: {e}"))?;
    let Listener::Tcp(listener) = bound else {
        unreachable!("a TCP endpoint binds a TCP listener");
    };
    Ok(Some(MetricsListener {
        listener,
        announce: true,
    }))
}

impl MetricsListener {
    /// Prints its `listening http://.../metrics` line (after the
    /// service's) and serves `source` there. Returns a handle of the
    /// listener, for a supervisor to hand to its successor.
    pub fn serve(self, source: crate::metrics::Source) -> anyhow::Result<std::net::TcpListener> {
        let l = self.listener;
        let at = crate::addr::HostPort::from(l.local_addr().context("reading the bound address")?);
        if self.announce {
            let mut out = std::io::stdout().lock();
            writeln!(out, "listening http://{at}/metrics").context("writing to stdout")?;
            out.flush().context("writing to stdout")?;
        }
        tracing::info!("metrics at http://{at}/metrics");
        let kept = l.try_clone().context("keeping the metrics listener")?;
        crate::metrics::serve(l, source).context("starting the metrics thread")?;
        Ok(kept)
    }
}

/// One worker of `--processes`: the model on the supervisor's listeners.
fn run_worker(
    mut config: Config,
    n: usize,
    inherited: Option<(handoff::Source, Vec<std::os::fd::RawFd>)>,
) -> anyhow::Result<()> {
    let life = Lifecycle::install(config.drain_timeout, capacity(&config))
        .context("installing signal handlers")?;
    life.set_worker();
    let Some((_, fds)) = inherited else {
        anyhow::bail!(
            "worker {n}: no listeners were handed over ({})",
            handoff::LISTEN_FDS
        );
    };
    let mut listeners = handoff::adopt(&fds, false).map_err(anyhow::Error::msg)?;
    if config.listeners_defaulted {
        config.listeners = shown(&listeners, &config.listeners)?;
    }
    take_charge(&life, &config, &mut listeners)?;
    config.tls_listeners = tls_names(&listeners, &config.listeners)?;
    crate::metrics::init(config.model.name());
    if let Some(fd) = handoff::take_fd(handoff::METRICS_FD) {
        crate::metrics::workers::answer(std::os::unix::net::UnixStream::from(fd))
            .context("starting the metrics thread")?;
    }
    handoff::signal_ready();
    let result = serve_model(config, listeners, &life);
    tracing::info!(
        "worker {n} (pid {}) accepted {} connection(s)",
        std::process::id(),
        crate::metrics::global().accepted_total()
    );
    life.cleanup();
    result
}

/// Hands the listeners' end to the lifecycle and starts its signal thread
/// (the same for a single server and a worker).
fn take_charge(
    life: &Arc<Lifecycle>,
    config: &Config,
    listeners: &mut [Listener],
) -> anyhow::Result<()> {
    life.adopt(listeners).context("sharing the listeners")?;
    if config.model != Model::Fork {
        // fork() and threads do not mix: that model hosts the signals itself.
        life.spawn_signal_thread()
            .context("starting the signal thread")?;
    }
    Ok(())
}

/// The listeners: inherited (from a supervisor or systemd) or bound here.
fn listeners_for(
    config: &mut Config,
    inherited: Option<(handoff::Source, Vec<std::os::fd::RawFd>)>,
) -> anyhow::Result<(Vec<Listener>, handoff::Source)> {
    let Some((source, fds)) = inherited else {
        return Ok((bind_all(config)?, handoff::Source::Bound));
    };
    // A restarted supervisor answers for the socket files, as the first
    // did; systemd's are systemd's.
    let listeners =
        handoff::adopt(&fds, source == handoff::Source::Upcase).map_err(anyhow::Error::msg)?;
    if config.listeners_defaulted && source == handoff::Source::Systemd {
        // No ADDR: each socket is served as what it is.
        config.listeners = listeners
            .iter()
            .map(|l| l.local_endpoint().context("reading an inherited address"))
            .collect::<anyhow::Result<_>>()?;
    } else {
        handoff::check_matches(&listeners, &config.listeners).map_err(anyhow::Error::msg)?;
    }
    tracing::info!(
        "serving {} listener(s) handed over by {}",
        listeners.len(),
        match source {
            handoff::Source::Systemd => "systemd",
            _ => "the previous server",
        }
    );
    Ok((listeners, source))
}

fn serve_model(
    config: Config,
    listeners: Vec<Listener>,
    life: &Arc<Lifecycle>,
) -> anyhow::Result<()> {
    let served = match config.model {
        Model::Iterative => iterative::run(config, listeners, life),
        Model::Fork => fork::run(config, listeners, life),
        Model::Threads => threads::run(config, listeners, life),
        Model::Pool => pool::run(config, listeners, life),
        Model::Select => select::run(config, listeners, life),
        Model::Epoll => epoll::run(config, listeners, life),
        Model::Async => tasks::run(config, listeners, life),
        Model::Uring => uring::run(config, listeners, life),
    };
    life.join_helpers();
    served
}

/// What every model does when accept(2) fails.
///
/// Running out of descriptors (EMFILE, ENFILE) or kernel memory would fail
/// again at once, and a readiness loop would spin on the still-readable
/// listener: so accepting pauses for [`AcceptBackoff::PAUSE`] while the
/// connections already open are served, and resumes by itself. The warning
/// is logged once per burst (a burst ends when accepting has worked for
/// [`AcceptBackoff::QUIET`]), and a line when accepting works again. Other
/// errors (a client that reset before we accepted it) are passing.
#[derive(Debug, Default)]
pub struct AcceptBackoff {
    /// Failures since the warning.
    failures: u64,
    /// When the last failure was, while a burst lasts.
    last_failure: Option<std::time::Instant>,
    /// The warning was logged and the recovery not yet.
    warned: bool,
}

impl AcceptBackoff {
    pub const PAUSE: Duration = Duration::from_millis(100);
    pub const QUIET: Duration = Duration::from_secs(10);

    /// Records a failed accept; returns how long to stop accepting.
    pub fn failed(&mut self, e: &std::io::Error) -> Option<Duration> {
        match e.raw_os_error() {
            Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM) => {
                let new_burst = self.last_failure.is_none_or(|t| t.elapsed() >= Self::QUIET);
                if new_burst {
                    tracing::warn!(
                        "accept: {e}: pausing new connections (existing ones are still served); \
                         raise the open-file limit or lower --max-conns"
                    );
                    self.warned = true;
                    self.failures = 0;
                }
                self.failures += 1;
                self.last_failure = Some(std::time::Instant::now());
                Some(Self::PAUSE)
            }
            _ => {
                tracing::debug!("accept: {e}");
                None
            }
        }
    }

    /// Records a successful accept.
    #[inline]
    pub fn succeeded(&mut self) {
        if self.warned {
            self.warned = false;
            tracing::info!("accepting again after {} failed attempt(s)", self.failures);
        }
    }
}

/// How often readiness loops look for idle connections (`--idle-timeout`):
/// often enough that one is closed at most a quarter of the timeout late.
pub fn sweep_every(idle: Duration) -> Duration {
    (idle / 4).clamp(Duration::from_millis(10), Duration::from_secs(1))
}
