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
//! SIGINT and SIGTERM are blocked across `fork()` and only unblocked in the
//! child once it ignores them: a Ctrl-C that lands in between would
//! otherwise run the parent's handler in the child, which writes to the
//! parent's signal pipe (a second "signal" that makes the parent kill every
//! child).
//! `--max-conns` bounds the number of children: at the limit the parent
//! stops polling its listeners and new clients wait in the backlog.
//!
//! fork() and threads do not mix (a child gets a copy of one thread and of
//! every lock, held or not), so this model starts no thread at all: one
//! poll(2) loop in the parent watches the listeners, UDP sockets, and two
//! signal self-pipes (the lifecycle's, and SIGCHLD): the parent hosts the
//! lifecycle's signals itself.

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd};
use std::time::Duration;

use anyhow::Context;

use super::udp::answer_ready;
use super::{AcceptBackoff, Config, blocking};
use crate::lifecycle::{Lifecycle, Next, STOP_SIGNALS, SignalPipe, Slot, wait_readable};
use crate::net::{Listener, Stream};

pub fn run(mut config: Config, listeners: Vec<Listener>, life: &Lifecycle) -> anyhow::Result<()> {
    // One --max-buffered for all the children, not a copy each. (A child
    // killed with bytes unsent leaves them counted: only the drain's
    // deadline kills children, and the server is ending then.)
    config.buffered = crate::conn::Buffered::new_shared(config.buffered.max())
        .context("mapping the shared --max-buffered count")?;
    let stop = life.signal_fd();
    let mut chld =
        SignalPipe::for_signals(&[libc::SIGCHLD]).context("installing SIGCHLD handler")?;
    for l in &listeners {
        l.set_nonblocking(true)?;
    }
    let mut listeners = Some(listeners);
    let mut children: Children = HashMap::new();
    let mut udp = config.udp_service();
    let mut backoff = AcceptBackoff::default();

    loop {
        reap(&mut children);
        if life.is_draining() {
            // The lifecycle shut the listeners; close our copies.
            listeners = None;
            if children.is_empty() {
                tracing::info!("all connections finished");
                break;
            }
        }

        let at_limit = life.conns.is_full();
        if at_limit {
            life.conns.warn_full();
        }
        let mut fds = vec![stop.as_fd(), chld.as_fd()];
        let mut polled: Vec<&Listener> = Vec::new();
        for l in listeners.iter().flatten() {
            if !(l.is_stream() && at_limit) {
                fds.push(l.as_fd());
                polled.push(l);
            }
        }
        let wait = life
            .deadline()
            .map(|d| d.saturating_duration_since(std::time::Instant::now()));
        let ready = wait_readable(&fds, wait).context("poll")?;
        // Signals, and the drain deadline: the lifecycle decides.
        if life.on_signals() == Next::Stop {
            kill_all(&mut children);
            break;
        }

        if ready[1] {
            chld.take();
        }
        for (l, _) in polled.iter().zip(&ready[2..]).filter(|(_, r)| **r) {
            match l {
                Listener::Udp(u) => {
                    answer_ready(u, &mut udp, 64);
                }
                _ if life.is_draining() => {}
                _ => accept_and_fork(
                    l,
                    listeners.as_deref().unwrap_or(&[]),
                    &config,
                    life,
                    &mut children,
                    &mut backoff,
                ),
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
    life: &Lifecycle,
    children: &mut Children,
    backoff: &mut AcceptBackoff,
) {
    if !life.conns.try_acquire() {
        return;
    }
    // The permit: given back when dropped, on every path below, and by the
    // parent once the child serving the connection is reaped.
    let slot = Slot(life.conns.clone());
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
    let mask = SignalMask::block(&STOP_SIGNALS);
    // SAFETY: this process has a single thread (the model starts none), so
    // the child may run ordinary code after fork.
    match unsafe { libc::fork() } {
        -1 => {
            drop(mask);
            drop(slot);
            let e = std::io::Error::last_os_error();
            tracing::warn!("fork failed: {e}; closing {peer} and pausing 100 ms");
            std::thread::sleep(Duration::from_millis(100));
        }
        // The child never drops the slot (it ends with _exit): the count
        // is the parent's.
        0 => child(conn, peer, all, config, mask),
        pid => {
            drop(mask);
            // The parent's copy of the connection is closed here (drop).
            tracing::debug!("child {pid} serves {peer}");
            children.insert(pid, (peer, slot));
        }
    }
}

fn child(
    conn: Stream,
    peer: String,
    listeners: &[Listener],
    config: &Config,
    mask: SignalMask,
) -> ! {
    // SAFETY: plain libc calls on signal dispositions and our own fds.
    unsafe {
        // Still blocked since before fork: ignore them, then unblock, so a
        // signal meant for the group never runs the parent's handler here.
        for sig in STOP_SIGNALS {
            libc::signal(sig, libc::SIG_IGN);
        }
        libc::signal(libc::SIGCHLD, libc::SIG_DFL);
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
        // Close the child's copies of the listeners without running their
        // destructors (which would remove the parent's Unix socket file).
        for l in listeners {
            libc::close(l.as_fd().as_raw_fd());
        }
    }
    drop(mask);
    // A panic must not unwind out of here: it would run, in this child, the
    // destructors of the parent's state up the stack (the listeners, the
    // lifecycle). The hook has printed it; the child ends as _exit does.
    let served = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        blocking::serve(conn, peer, config)
    }));
    // SAFETY: _exit skips destructors and atexit handlers that belong to the
    // parent's state (the listeners, the signal pipes).
    unsafe { libc::_exit(if served.is_ok() { 0 } else { 70 }) }
}

/// Collects every child that has exited, so none stays a zombie.
/// The children serving connections: who each serves, and its permit of
/// `--max-conns` (given back when the child is reaped, with the entry).
type Children = HashMap<libc::pid_t, (String, Slot)>;

fn reap(children: &mut Children) {
    loop {
        let mut status = 0;
        // SAFETY: waitpid writes the status through a valid pointer.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if pid <= 0 {
            return;
        }
        let Some((peer, _slot)) = children.remove(&pid) else {
            continue;
        };
        if !(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0) {
            tracing::warn!("child {pid} serving {peer} ended abnormally (status {status:#x})");
        }
    }
}

fn kill_all(children: &mut Children) {
    for &pid in children.keys() {
        // SAFETY: signalling our own children.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    for &pid in children.keys() {
        let mut status = 0;
        // SAFETY: waitpid on our own child, with a valid status pointer.
        unsafe { libc::waitpid(pid, &mut status, 0) };
    }
    children.clear(); // gives their permits back
}

/// Signals blocked for as long as this lives (then the old mask returns).
struct SignalMask {
    old: libc::sigset_t,
}

impl SignalMask {
    fn block(signals: &[libc::c_int]) -> SignalMask {
        // SAFETY: sigset_t is plain data, initialised by sigemptyset before
        // use; pthread_sigmask reads and writes valid sets.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            let mut old: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            for &s in signals {
                libc::sigaddset(&mut set, s);
            }
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut old);
            SignalMask { old }
        }
    }
}

impl Drop for SignalMask {
    fn drop(&mut self) {
        // SAFETY: restores the mask saved in `block`.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &self.old, std::ptr::null_mut()) };
    }
}
