//! The `fork` model: a child process per connection (server-fork.py).
//!
//! ```python
//! while True:
//!     conn, addr = srv.accept()
//!     if os.fork() == 0:      # child process
//!         ...serve conn...
//!         conn.close()
//!         break
//! ```
//!
//! Fixed here, beyond the seed: the parent closes its copy of each
//! connection (else the client would never see end of file); it reaps every
//! child as SIGCHLD arrives (no zombies); the child closes its copy of the
//! listeners and ignores SIGINT/SIGTERM, so that Ctrl-C, which the terminal
//! sends to the whole process group, lets the parent decide: stop accepting,
//! let children finish within `--drain-timeout`, then SIGKILL the rest. A
//! child also dies with its parent (PR_SET_PDEATHSIG), so none is orphaned.
//! `--max-conns` bounds the number of children: at the limit the parent
//! stops polling its listeners and new clients wait in the backlog.
//!
//! fork() and threads do not mix (a child gets a copy of one thread and of
//! every lock, held or not), so this model starts no thread at all: one
//! poll(2) loop in the parent watches the listeners, UDP sockets, and two
//! signal self-pipes (stop, and SIGCHLD).

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd};
use std::time::{Duration, Instant};

use anyhow::Context;

use super::shutdown::{SignalPipe, wait_readable};
use super::udp::{UdpState, answer_ready};
use super::{AcceptBackoff, Config, blocking};
use crate::net::{Listener, Stream};

pub fn run(config: Config, listeners: Vec<Listener>) -> anyhow::Result<()> {
    let mut stop = SignalPipe::install().context("installing signal handlers")?;
    let mut chld =
        SignalPipe::for_signals(&[libc::SIGCHLD]).context("installing SIGCHLD handler")?;
    for l in &listeners {
        l.set_nonblocking(true)?;
    }
    let mut listeners = Some(listeners);
    let mut children: HashMap<libc::pid_t, String> = HashMap::new();
    let mut udp = UdpState::default();
    let mut backoff = AcceptBackoff::default();
    let mut signals = 0;
    let mut deadline: Option<Instant> = None;
    let mut at_limit_logged = false;

    loop {
        reap(&mut children);
        if let Some(d) = deadline {
            if children.is_empty() {
                tracing::info!("all connections finished");
                break;
            }
            if Instant::now() >= d {
                tracing::warn!("drain timeout: killing {} child(ren)", children.len());
                kill_all(&mut children);
                break;
            }
        }

        let at_limit = children.len() >= config.max_conns;
        if at_limit && !at_limit_logged {
            tracing::warn!(
                "at --max-conns {}: new connections wait in the backlog",
                config.max_conns
            );
        }
        at_limit_logged = at_limit;
        let mut fds = vec![stop.as_fd(), chld.as_fd()];
        let mut polled: Vec<&Listener> = Vec::new();
        for l in listeners.iter().flatten() {
            if !(l.is_stream() && at_limit) {
                fds.push(l.as_fd());
                polled.push(l);
            }
        }
        let wait = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        let ready = wait_readable(&fds, wait).context("poll")?;

        if ready[1] {
            chld.take();
        }
        for (l, _) in polled.iter().zip(&ready[2..]).filter(|(_, r)| **r) {
            match l {
                Listener::Udp(u) => {
                    answer_ready(u, &mut udp, config.mode, 64);
                }
                _ => accept_and_fork(
                    l,
                    listeners.as_deref().unwrap_or(&[]),
                    &config,
                    &mut children,
                    &mut backoff,
                ),
            }
        }
        if ready[0] {
            signals += stop.take();
            if signals >= 2 {
                tracing::warn!("second signal: killing {} child(ren) now", children.len());
                kill_all(&mut children);
                break;
            }
            if signals >= 1 && deadline.is_none() {
                // Closing the listeners (and removing Unix socket files)
                // stops new clients at once.
                listeners = None;
                deadline = Some(Instant::now() + config.drain_timeout);
                if !children.is_empty() {
                    tracing::info!(
                        "shutting down: {} connection(s) may finish within {:?} (signal again to stop now)",
                        children.len(),
                        config.drain_timeout
                    );
                }
            }
        }
    }
    udp.log_totals();
    Ok(())
}

fn accept_and_fork(
    listener: &Listener,
    all: &[Listener],
    config: &Config,
    children: &mut HashMap<libc::pid_t, String>,
    backoff: &mut AcceptBackoff,
) {
    let (conn, peer) = match listener.accept() {
        Ok(c) => {
            backoff.succeeded();
            c
        }
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
        Err(e) => {
            if let Some(pause) = backoff.failed(&e) {
                // Single-threaded: the pause also holds UDP, briefly.
                std::thread::sleep(pause);
            }
            return;
        }
    };
    // SAFETY: this process has a single thread (the model starts none), so
    // the child may run ordinary code after fork.
    match unsafe { libc::fork() } {
        -1 => {
            let e = std::io::Error::last_os_error();
            tracing::warn!("fork failed: {e}; closing {peer} and pausing 100 ms");
            std::thread::sleep(Duration::from_millis(100));
        }
        0 => child(conn, peer, all, config),
        pid => {
            // The parent's copy of the connection is closed here (drop).
            tracing::debug!("child {pid} serves {peer}");
            children.insert(pid, peer);
        }
    }
}

fn child(conn: Stream, peer: String, listeners: &[Listener], config: &Config) -> ! {
    // SAFETY: plain libc calls on signal dispositions and our own fds.
    unsafe {
        libc::signal(libc::SIGINT, libc::SIG_IGN);
        libc::signal(libc::SIGTERM, libc::SIG_IGN);
        libc::signal(libc::SIGCHLD, libc::SIG_DFL);
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
        // Close the child's copies of the listeners without running their
        // destructors (which would remove the parent's Unix socket file).
        for l in listeners {
            libc::close(l.as_fd().as_raw_fd());
        }
    }
    blocking::serve(conn, peer, config);
    // SAFETY: _exit skips destructors and atexit handlers that belong to the
    // parent's state (the listeners, the signal pipes).
    unsafe { libc::_exit(0) }
}

/// Collects every child that has exited, so none stays a zombie.
fn reap(children: &mut HashMap<libc::pid_t, String>) {
    loop {
        let mut status = 0;
        // SAFETY: waitpid writes the status through a valid pointer.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if pid <= 0 {
            return;
        }
        if let Some(peer) = children.remove(&pid)
            && !(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0)
        {
            tracing::warn!("child {pid} serving {peer} ended abnormally (status {status:#x})");
        }
    }
}

fn kill_all(children: &mut HashMap<libc::pid_t, String>) {
    for &pid in children.keys() {
        // SAFETY: signalling our own children.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    for &pid in children.keys() {
        let mut status = 0;
        // SAFETY: waitpid on our own child, with a valid status pointer.
        unsafe { libc::waitpid(pid, &mut status, 0) };
    }
    children.clear();
}
