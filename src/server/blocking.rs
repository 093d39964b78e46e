//! What the blocking models (iterative, threads, pool) share: waiting for a
//! client without missing a shutdown, serving one connection by the
//! contract, and UDP listeners on threads of their own.

use std::io;
use std::os::fd::AsFd;
use std::sync::Arc;

use super::shutdown::{Shutdown, wait_readable};
use super::{AcceptBackoff, Config};
use crate::net::{Listener, Stream};
use crate::relay::{ConnLog, relay_blocking};
use crate::transform::Transformer;

/// Splits listeners into stream listeners (made non-blocking, since we
/// wait in poll and then accept) and UDP sockets, each of which gets a
/// thread of its own.
pub fn start(
    listeners: Vec<Listener>,
    config: &Config,
    shutdown: &Arc<Shutdown>,
) -> io::Result<Vec<Listener>> {
    let mut streams = Vec::new();
    for l in listeners {
        match l {
            Listener::Udp(u) => {
                let (mode, shutdown) = (config.mode, shutdown.clone());
                std::thread::Builder::new()
                    .name("upcase-udp".into())
                    .spawn(move || {
                        if let Err(e) = super::udp::serve_blocking(u, mode, shutdown) {
                            tracing::error!("udp listener failed: {e}");
                        }
                    })?;
            }
            l => {
                l.set_nonblocking(true)?;
                streams.push(l);
            }
        }
    }
    Ok(streams)
}

/// The stream listeners of a blocking model, and how accepting is going.
pub struct Acceptor {
    pub listeners: Vec<Listener>,
    backoff: AcceptBackoff,
}

impl Acceptor {
    pub fn new(listeners: Vec<Listener>) -> Self {
        Acceptor {
            listeners,
            backoff: AcceptBackoff::default(),
        }
    }

    /// Waits for the next client; `None` once the drain has started.
    pub fn next_client(&mut self, shutdown: &Shutdown) -> Option<(Stream, String)> {
        next_client(&self.listeners, &mut self.backoff, shutdown)
    }
}

/// Waits for the next client on any of `listeners`; `None` once the drain
/// has started. Accept errors are logged and waited out, never fatal.
fn next_client(
    listeners: &[Listener],
    backoff: &mut AcceptBackoff,
    shutdown: &Shutdown,
) -> Option<(Stream, String)> {
    loop {
        if shutdown.is_draining() {
            return None;
        }
        let mut fds: Vec<_> = listeners.iter().map(|l| l.as_fd()).collect();
        fds.push(shutdown.fd());
        let ready = match wait_readable(&fds, None) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!("poll: {e}");
                std::thread::sleep(std::time::Duration::from_millis(100));
                continue;
            }
        };
        for (l, _) in listeners.iter().zip(&ready).filter(|(_, r)| **r) {
            match l.accept() {
                Ok(c) => {
                    backoff.succeeded();
                    return Some(c);
                }
                // Another worker took it first.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => {
                    if let Some(pause) = backoff.failed(&e) {
                        // Still readable: waiting in poll would spin.
                        std::thread::sleep(pause);
                    }
                }
            }
        }
    }
}

/// Serves one connection to its end, by the contract, and logs how it went.
pub fn serve(mut conn: Stream, peer: String, config: &Config) {
    conn.tune(&config.sockopts);
    let mut log = ConnLog::new(peer);
    // --idle-timeout: every blocking read and write must make progress in
    // time (SO_RCVTIMEO, SO_SNDTIMEO), else it fails with EAGAIN.
    if let Err(e) = conn.set_io_timeout(config.idle_timeout) {
        tracing::warn!("setting the idle timeout: {e}");
    }
    let result = relay_blocking(
        &mut conn,
        |s| s.shutdown_write(),
        Transformer::new(config.mode),
        config.block,
        &mut log,
    );
    let result = match (result, config.idle_timeout) {
        (Err(e), Some(d)) if e.kind() == io::ErrorKind::WouldBlock => {
            Err(crate::relay::idle_error(d))
        }
        (r, _) => r,
    };
    log.finish(&result);
}
