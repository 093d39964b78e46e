//! Listening sockets handed from one process to another.
//!
//! A listening socket outlives the process that made it as long as some
//! process holds a descriptor of it, and while it lives the kernel queues
//! every new connection: nobody is refused. That is how upcase runs
//! several processes and restarts without refusing anyone:
//!
//! - a supervisor (`serve --processes N`) binds once and starts each
//!   worker with the listeners inherited (`UPCASE_LISTEN_FDS`);
//! - on SIGUSR2 it starts the next supervisor the same way, which tells it
//!   when its workers are up (one byte on `UPCASE_READY_FD`);
//! - systemd's socket activation (`LISTEN_FDS`, `LISTEN_PID`) is the same
//!   idea from outside, and is accepted too.
//!
//! Only descriptor numbers travel through the environment; the descriptors
//! themselves are inherited across exec (their close-on-exec flag cleared
//! in the child, see [`keep_open`]).

use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;

use socket2::{Domain, Socket, Type};

use crate::addr::Endpoint;
use crate::net::{Listener, UnixPathGuard};

/// The listeners a supervisor hands its workers and its successor:
/// descriptor numbers, space-separated, in the order of the ADDR arguments.
pub const LISTEN_FDS: &str = "UPCASE_LISTEN_FDS";
/// A descriptor to write one byte to once ready (workers, and the next
/// supervisor during a restart).
pub const READY_FD: &str = "UPCASE_READY_FD";
/// Set in a worker: its number, from 1.
pub const WORKER: &str = "UPCASE_WORKER";
/// Which generation of a restarted supervisor a process belongs to (1, or
/// absent, for the one the user started).
pub const GENERATION: &str = "UPCASE_GENERATION";

/// The pid of the supervisor the user started (the keeper), for a
/// restarted one: it drains if that one dies.
pub const KEEPER: &str = "UPCASE_KEEPER";

/// This process's generation (see [`GENERATION`]).
pub fn generation() -> u32 {
    std::env::var(GENERATION)
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|g| *g >= 1)
        .unwrap_or(1)
}
/// A worker's end of its channel to the supervisor's metrics port
/// (`--metrics` with `--processes`; see `metrics::workers`).
pub const METRICS_FD: &str = "UPCASE_METRICS_FD";
/// The metrics port's listener, handed to the next supervisor at a
/// restart, as the service's listeners are.
pub const METRICS_LISTENER_FD: &str = "UPCASE_METRICS_LISTENER_FD";

/// Where a process's listeners come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Bound here.
    Bound,
    /// From the supervisor (a worker) or the previous supervisor (a restart).
    Upcase,
    /// From systemd's socket activation.
    Systemd,
}

/// What this process is, from its environment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A server on its own, or a supervisor.
    Main,
    /// Worker number N of a supervisor.
    Worker(usize),
}

pub fn role() -> Role {
    match std::env::var(WORKER).ok().and_then(|v| v.parse().ok()) {
        Some(n) => Role::Worker(n),
        None => Role::Main,
    }
}

/// Descriptor numbers from the environment, checked to be open: `None`
/// when nothing was handed over.
pub fn inherited_fds() -> Result<Option<(Source, Vec<RawFd>)>, String> {
    if let Ok(list) = std::env::var(LISTEN_FDS) {
        let fds = list
            .split_whitespace()
            .map(|f| f.parse::<RawFd>().ok().filter(|fd| *fd >= 3))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| format!("{LISTEN_FDS}={list}: not a list of descriptor numbers"))?;
        return Ok(Some((Source::Upcase, fds)));
    }
    // sd_listen_fds(3): LISTEN_PID must be us (the variables may have been
    // inherited by a child they were not meant for), descriptors from 3.
    let (Ok(pid), Ok(n)) = (std::env::var("LISTEN_PID"), std::env::var("LISTEN_FDS")) else {
        return Ok(None);
    };
    if pid.trim().parse::<u32>().ok() != Some(std::process::id()) {
        return Ok(None);
    }
    let n: RawFd = n
        .trim()
        .parse()
        .map_err(|_| format!("LISTEN_FDS={n}: not a number"))?;
    Ok(Some((Source::Systemd, (3..3 + n).collect())))
}

/// Takes ownership of inherited descriptors as listeners. Each must be a
/// listening TCP or Unix socket or a bound UDP socket. `owns_files`: this
/// process removes their Unix socket files at its end (a restarted
/// supervisor does; a worker, or a server systemd started, does not).
pub fn adopt(fds: &[RawFd], owns_files: bool) -> Result<Vec<Listener>, String> {
    // Each descriptor is owned once: a name given twice would be closed
    // twice (and the second close could hit a descriptor opened since).
    let mut seen = std::collections::HashSet::new();
    if let Some(fd) = fds.iter().find(|fd| !seen.insert(**fd)) {
        return Err(format!("inherited descriptor {fd} is named twice"));
    }
    fds.iter()
        .map(|&fd| {
            // SAFETY: fcntl(F_GETFD) only asks whether `fd` is open.
            if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
                return Err(format!("inherited descriptor {fd} is not open"));
            }
            // SAFETY: the descriptor is open and was handed to this process
            // to own (by the environment that names it); nothing else here
            // uses it, and it is taken once.
            let owned = unsafe { OwnedFd::from_raw_fd(fd) };
            listener_from(owned, owns_files).map_err(|e| format!("inherited descriptor {fd}: {e}"))
        })
        .collect()
}

fn listener_from(fd: OwnedFd, owns_files: bool) -> io::Result<Listener> {
    let sock = Socket::from(fd);
    sock.set_cloexec(true)?;
    let (domain, ty) = (sock.domain()?, sock.r#type()?);
    let listening = || -> io::Result<()> {
        if sock.is_listener()? {
            Ok(())
        } else {
            Err(io::Error::other("a stream socket that is not listening"))
        }
    };
    if domain == Domain::UNIX && ty == Type::STREAM {
        listening()?;
        let path: PathBuf = sock
            .local_addr()?
            .as_pathname()
            .map(PathBuf::from)
            .ok_or_else(|| io::Error::other("a Unix socket without a path"))?;
        let guard = if owns_files {
            UnixPathGuard::owned(path)
        } else {
            UnixPathGuard::unowned(path)
        };
        return Ok(Listener::Unix(sock.into(), guard));
    }
    if domain != Domain::IPV4 && domain != Domain::IPV6 {
        return Err(io::Error::other("not a TCP, UDP or Unix socket"));
    }
    if ty == Type::STREAM {
        listening()?;
        Ok(Listener::Tcp(sock.into()))
    } else if ty == Type::DGRAM {
        Ok(Listener::Udp(sock.into()))
    } else {
        Err(io::Error::other("not a TCP, UDP or Unix socket"))
    }
}

/// Matches inherited listeners with the ADDR arguments: the same count,
/// in order, of the same kinds (a tls:// address is a TCP listener).
/// With no ADDR arguments, systemd's sockets are served as they are.
pub fn check_matches(listeners: &[Listener], asked: &[Endpoint]) -> Result<(), String> {
    if listeners.len() != asked.len() {
        return Err(format!(
            "{} listener(s) were handed over but {} address(es) are given; give the same addresses in the same order",
            listeners.len(),
            asked.len()
        ));
    }
    for (l, ep) in listeners.iter().zip(asked) {
        let ok = matches!(
            (l, ep),
            (Listener::Tcp(_), Endpoint::Tcp(_) | Endpoint::Tls(_))
                | (Listener::Udp(_), Endpoint::Udp(_))
                | (Listener::Unix(..), Endpoint::Unix(_))
        );
        if !ok {
            let got = l
                .local_endpoint()
                .map_or_else(|_| "?".to_string(), |e| e.to_string());
            return Err(format!(
                "the listener handed over as {got} does not match {ep}"
            ));
        }
    }
    Ok(())
}

/// Clears close-on-exec on `fds`, in a child between fork and exec (so
/// that the program it runs inherits them). Returns false if one failed.
///
/// Only async-signal-safe calls: it runs in `Command::pre_exec`.
pub fn keep_open(fds: &[RawFd]) -> bool {
    fds.iter().all(|&fd| {
        // SAFETY: fcntl(F_SETFD) on a descriptor number; it cannot touch
        // memory, and a closed descriptor only makes it fail.
        unsafe { libc::fcntl(fd, libc::F_SETFD, 0) == 0 }
    })
}

/// The descriptor numbers of `listeners`, for [`LISTEN_FDS`].
pub fn fd_list(listeners: &[Listener]) -> (String, Vec<RawFd>) {
    use std::os::fd::AsFd;
    let fds: Vec<RawFd> = listeners.iter().map(|l| l.as_fd().as_raw_fd()).collect();
    let text = fds
        .iter()
        .map(|fd| fd.to_string())
        .collect::<Vec<_>>()
        .join(" ");
    (text, fds)
}

/// The descriptor the process that started this one handed over in `var`
/// (see [`METRICS_FD`], [`METRICS_LISTENER_FD`]), if it is there and open.
/// Only the first call for a variable gets it.
pub fn take_fd(var: &str) -> Option<OwnedFd> {
    static TAKEN: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    let mut taken = TAKEN.lock().unwrap_or_else(|e| e.into_inner());
    if taken.iter().any(|v| v == var) {
        return None;
    }
    let fd = std::env::var(var).ok()?.parse::<RawFd>().ok()?;
    // SAFETY: fcntl(F_GETFD) only asks whether the descriptor is open.
    if fd < 3 || unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return None;
    }
    taken.push(var.to_string());
    // SAFETY: the parent handed this descriptor over for this use alone,
    // and the check above makes sure that it is taken once.
    Some(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Says "ready" to whoever started this process with [`READY_FD`] (the
/// first call only: the descriptor is closed after).
pub fn signal_ready() {
    static DONE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if DONE.swap(true, std::sync::atomic::Ordering::SeqCst) {
        return;
    }
    let Some(fd) = std::env::var(READY_FD)
        .ok()
        .and_then(|v| v.parse::<RawFd>().ok())
    else {
        return;
    };
    // SAFETY: fcntl(F_GETFD) only asks whether the descriptor is open.
    if fd < 3 || unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return;
    }
    // SAFETY: the parent handed this descriptor to us to write "ready" on
    // and close; nothing else in this process uses it.
    let mut pipe = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    if let Err(e) = pipe.write_all(b"R") {
        tracing::warn!("telling the supervisor we are ready: {e}");
    }
}

/// Tells systemd (a `Type=notify` unit) that the server is ready, and that
/// this process is its main one now: after a restart the new supervisor
/// says so, and systemd follows it (the unit needs `NotifyAccess=all`, as
/// the new supervisor is a child of the old). No `NOTIFY_SOCKET`: nothing
/// to do. See sd_notify(3).
pub fn notify_systemd_ready() {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let msg = format!("READY=1\nMAINPID={}\n", std::process::id());
    let sent = (|| -> io::Result<()> {
        use std::os::linux::net::SocketAddrExt;
        let sock = std::os::unix::net::UnixDatagram::unbound()?;
        let bytes = path.as_encoded_bytes();
        let addr = match bytes.strip_prefix(b"@") {
            // An abstract socket name.
            Some(name) => std::os::unix::net::SocketAddr::from_abstract_name(name)?,
            None => std::os::unix::net::SocketAddr::from_pathname(&path)?,
        };
        sock.send_to_addr(msg.as_bytes(), &addr)?;
        Ok(())
    })();
    match sent {
        Ok(()) => tracing::debug!("told systemd: ready, main pid {}", std::process::id()),
        Err(e) => tracing::warn!("telling systemd we are ready (NOTIFY_SOCKET): {e}"),
    }
}

#[cfg(test)]
mod adopt_tests {
    use super::*;
    use std::os::fd::IntoRawFd;

    /// A descriptor named twice is refused before either is taken: two
    /// owners would close it twice.
    #[test]
    fn a_descriptor_is_adopted_once() {
        let fd = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .into_raw_fd();
        let Err(e) = adopt(&[fd, fd], false) else {
            panic!("a descriptor named twice was adopted")
        };
        assert!(e.contains("named twice"), "{e}");
        // Still open, still ours: adopted once, it is a listener.
        let listeners = adopt(&[fd], false).expect("adopted");
        assert_eq!(listeners.len(), 1);
    }
}
