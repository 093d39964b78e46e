//! What the blocking models (iterative, threads, pool) share: waiting for a
//! client without missing a shutdown, serving one connection by the
//! contract, and UDP listeners on threads of their own.

use std::io;
use std::os::fd::AsFd;
use std::sync::Arc;

use super::Config;
use super::shutdown::{Shutdown, wait_readable};
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

/// Waits for the next client on any of `listeners`; `None` once the drain
/// has started. Accept errors are logged and waited out, never fatal.
pub fn next_client(listeners: &[Listener], shutdown: &Shutdown) -> Option<(Stream, String)> {
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
                Ok(c) => return Some(c),
                // Another worker took it first.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => accept_error(&e),
            }
        }
    }
}

/// Running out of descriptors or memory would fail again at once: pause.
pub fn accept_error(e: &io::Error) {
    match e.raw_os_error() {
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM) => {
            tracing::warn!("accept: {e}; pausing accepts for 100 ms");
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        _ => tracing::debug!("accept: {e}"),
    }
}

/// Serves one connection to its end, by the contract, and logs how it went.
pub fn serve(mut conn: Stream, peer: String, config: &Config) {
    conn.tune(&config.sockopts);
    let mut log = ConnLog::new(peer);
    let result = relay_blocking(
        &mut conn,
        |s| s.shutdown_write(),
        Transformer::new(config.mode),
        config.block,
        &mut log,
    );
    log.finish(&result);
}
